"""Strict structured output: caller JSON Schema -> the strict subset, and answers back.

Structured outputs (`response_format` json_schema, `strict: true`) accept only a subset of
JSON Schema: the root is an object, every object lists all its properties in `required` and
sets `additionalProperties: false`, optional values are expressed as a union with null, and
only some keywords are allowed. Callers write ordinary draft 2020-12 schemas, so `to_strict`
converts theirs into that subset. `validate` then checks the answer against the caller's
*original* schema, which still carries every constraint the strict form had to drop.

Limits and keywords follow the Azure OpenAI documentation (the deployment target here), which
also matches OpenAI's own SDK-side validator (openai-java `JsonSchemaValidator`): at most 100
object properties in total, 5 levels of nesting, 500 enum values, 15,000 characters of
property names, definition names, enum and const values, and 7,500 characters for one string
enum of more than 250 values. OpenAI's current API documentation allows more (5,000
properties, 10 levels, 1,000 enum values, 120,000 characters) and also accepts some
validation keywords (`pattern`, `format`, `minimum`, `minItems`, ...), but older Azure
deployments and OpenAI-compatible servers do not. So every validation keyword is moved into the
description text, where the model still reads it, and the local validation still enforces it.

Caller schemas are hostile input. `check_caller_schema` (run by `to_strict`, so for HTTP
schemas and schemas-container blobs alike) first lets `schema_guard` budget the document and
refuse non-local references, nested `$id`/`$schema`, regexes RE2 cannot run, and reference
shapes that never end or explode; only then is the meta-schema checked. Validators are the
stock jsonschema ones extended with linear-time keywords (RE2 regexes, hashed `uniqueItems`,
overflow-free `multipleOf`) and a step counter, built with a registry that retrieves nothing.
Answers are size-checked before the (recursive) pruning and validation. Error messages name
the JSON pointer and the rule, bounded in length; they never carry Python exception text.

Nothing here does I/O, and no function mutates its arguments.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable

from . import safe_regex
from .errors import InvalidSchema
from .schema_guard import DEFAULT_BUDGET, SchemaBudget, bounded_path, check_answer_size, guard_schema

__all__ = [
    "AZURE_LIMITS",
    "DEFAULT_BUDGET",
    "MOVED_KEYWORDS",
    "OPENAI_LIMITS",
    "AnswerNotJson",
    "AnswerTooLarge",
    "SchemaBudget",
    "StrictLimits",
    "StrictSchema",
    "check_caller_schema",
    "normalise",
    "parse_json_tolerant",
    "prune_nulls",
    "to_strict",
    "unwrap",
    "validate",
]


@dataclass(frozen=True)
class StrictLimits:
    """Size limits a strict schema must stay within (the endpoint rejects it otherwise)."""

    max_properties: int = 100
    max_depth: int = 5
    max_enum_values: int = 500
    max_string_chars: int = 15_000
    large_enum_values: int = 250
    max_large_enum_chars: int = 7_500


# Azure OpenAI's documented limits: the deployment target, and the conservative choice.
AZURE_LIMITS = StrictLimits()
# OpenAI's current platform limits, for an endpoint known to be api.openai.com.
OPENAI_LIMITS = StrictLimits(
    max_properties=5_000,
    max_depth=10,
    max_enum_values=1_000,
    max_string_chars=120_000,
    large_enum_values=250,
    max_large_enum_chars=15_000,
)


@dataclass(frozen=True)
class StrictSchema:
    """A caller's schema and the strict version sent to the model.

    `wrapped` is true when the caller's root was not an object and was placed under
    `properties.value` of a wrapper object (strict mode needs an object root); `unwrap`
    undoes that on the answer.
    """

    schema: dict[str, Any]
    original: dict[str, Any]
    wrapped: bool
    name: str

    def response_format(self) -> dict[str, Any]:
        """The `response_format` request field for this schema."""
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema, "strict": True}}


# --- keyword tables -------------------------------------------------------------------------

# Validation and annotation keywords strict mode does not take (or not on every endpoint):
# moved into the description as "keyword: value", still enforced by `validate`.
MOVED_KEYWORDS: frozenset[str] = frozenset(
    {
        # strings
        "format",
        "pattern",
        "minLength",
        "maxLength",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
        # numbers
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        # arrays
        "minItems",
        "maxItems",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "unevaluatedItems",
        # objects
        "patternProperties",
        "propertyNames",
        "minProperties",
        "maxProperties",
        "unevaluatedProperties",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        # composition that cannot be expressed
        "not",
        "if",
        "then",
        "else",
        # annotations
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)

# Identification keywords: meaningless in the strict copy, dropped.
_DROPPED = frozenset({"$schema", "$id", "$comment", "$anchor", "$dynamicAnchor", "$vocabulary"})

# Keywords that shape the value; `$ref` and `anyOf` nodes may carry none of them.
_SHAPE = frozenset({"type", "properties", "required", "additionalProperties", "items", "enum", "const"})

_SIMPLE_TYPES = frozenset({"string", "number", "integer", "boolean"})
_OBJECT_HINTS = ("properties", "required", "additionalProperties")

_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_DEF_REF = re.compile(r"^#/(\$defs|definitions)/([^/]+)$")


def _esc(token: str) -> str:
    """One JSON pointer token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def _unesc(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _fmt(value: Any) -> str:
    """A keyword value as the model will read it in a description."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def json_type(value: Any) -> str:
    """The JSON type of an enum/const value (booleans are not integers here)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "array"


def _matches(value: Any, type_name: str) -> bool:
    vt = json_type(value)
    if vt == type_name:
        return True
    if type_name == "number" and vt == "integer":
        return True
    return type_name == "integer" and vt == "number" and float(value).is_integer()


# --- caller schema checks --------------------------------------------------------------------


def _validator_class(schema: Any) -> Any:
    """The safe validator for the draft the schema declares (2020-12 when it declares none)."""
    if isinstance(schema, dict):
        return _safe_class(validators.validator_for(schema, default=Draft202012Validator))
    return _safe_class(Draft202012Validator)


def check_caller_schema(schema: Any, budget: SchemaBudget = DEFAULT_BUDGET) -> None:
    """Refuse a caller's schema that is not a JSON Schema, is over budget, or could reach or stall.

    Run before anything else (HTTP schemas and schemas-container blobs alike), so a hostile or
    malformed schema is a 400 naming the JSON pointer and the rule, never a fetch, a stalled
    worker or a 500. Order matters: `schema_guard` budgets and inspects the document first,
    because meta-validation itself is super-linear on some inputs; only then is the
    meta-schema checked, by the same safe validator classes the answers use.
    """
    if not isinstance(schema, dict):
        raise InvalidSchema(
            f"the schema must be a JSON object, got {type(schema).__name__}",
            details={"path": "", "reason": "not an object"},
        )
    guard_schema(schema, budget)
    # One request checks its schema more than once (request validation, then the task's
    # conversion); meta-validation is the costly part (~1 s at SCHEMA_MAX_BYTES), so schemas
    # that passed are remembered by content (the guard above bounds the serialisation).
    key = (_fingerprint(schema), budget)
    with _PASSED_LOCK:
        if key in _PASSED:
            _PASSED.move_to_end(key)
            return
    _meta_validate(schema, budget)
    with _PASSED_LOCK:
        _PASSED[key] = None
        while len(_PASSED) > _PASSED_MAX:
            _PASSED.popitem(last=False)


_PASSED: OrderedDict[tuple[str, SchemaBudget], None] = OrderedDict()
_PASSED_LOCK = threading.Lock()
_PASSED_MAX = 256


def _fingerprint(schema: dict[str, Any]) -> str:
    text = json.dumps(schema, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _meta_validate(schema: dict[str, Any], budget: SchemaBudget) -> None:
    """The schema against its draft's meta-schema; the first error, with its path, as a 400."""
    cls = _validator_class(schema)
    meta = _safe_class(validators.validator_for(cls.META_SCHEMA, default=cls))
    checker = meta(cls.META_SCHEMA, format_checker=_format_checker(), registry=_NO_RETRIEVAL)
    with _step_budget(budget.max_validation_steps):
        try:
            error = next(iter(checker.iter_errors(schema)), None)
        except _StepsExceeded:
            raise InvalidSchema(
                f"checking the schema took more than {budget.max_validation_steps} steps; simplify it",
                details={"path": "", "limit": budget.max_validation_steps, "setting": "SCHEMA_MAX_VALIDATION_STEPS"},
            ) from None
    if error is not None:
        closest = best_match(error.context) if error.context else None
        path = bounded_path("".join(f"/{_esc(str(p))}" for p in (closest or error).absolute_path))
        reason = _meta_reason(closest or error)
        raise InvalidSchema(
            f"the schema is not a valid JSON Schema: at {path or '(root)'}: {reason}",
            details={"path": path, "reason": reason, "rule": str(error.validator)},
        )


_META_RULES = {
    "type": "must be of type {}",
    "enum": "must be one of {}",
    "const": "must be {}",
    "minimum": "must be at least {}",
    "exclusiveMinimum": "must be more than {}",
    "maximum": "must be at most {}",
    "minItems": "must have at least {} items",
    "minLength": "must be at least {} characters long",
    "uniqueItems": "must not repeat an item",
    "format": "must be in the format {}",
}


def _meta_reason(error: ValidationError) -> str:
    """Our words for a meta-schema failure: the rule and what it expects, both from the meta-schema.

    jsonschema's own message quotes the caller's value (and is library text), so it is not sent.
    """
    rule = str(error.validator)
    value = error.validator_value
    if isinstance(value, list) and all(isinstance(v, str | int | float | bool) for v in value):
        shown = ", ".join(str(v) for v in value)
    elif isinstance(value, str | int | float | bool):
        shown = str(value)
    else:
        shown = None
    if rule in _META_RULES and shown is not None:
        return _short(_META_RULES[rule].format(shown), 200)
    return f"breaks the meta-schema rule `{_short(rule, 40)}`"


# --- safe validators -------------------------------------------------------------------------
#
# jsonschema's stock validators evaluate caller regexes with Python's backtracking `re`
# (`pattern`, `patternProperties`, `additionalProperties` next to patternProperties, the
# `regex` format), compare `uniqueItems` pairwise when items are unhashable, can overflow in
# `multipleOf`, and fetch any `$ref` they cannot resolve over HTTP or from file:// URLs. The
# classes below are the stock ones extended with linear replacements for those keywords, a
# step counter on every keyword, and are always built with a registry that retrieves nothing.
# (`unevaluatedProperties` next to `patternProperties` still uses `re` inside jsonschema, so
# schema_guard refuses that combination.)


class _StepsExceeded(Exception):
    """Raised inside validation when the step budget is spent; never leaves this module."""


class _Steps:
    def __init__(self, limit: int) -> None:
        self.left = limit

    def tick(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _StepsExceeded


_STEPS: ContextVar[_Steps | None] = ContextVar("schema_validation_steps", default=None)


@contextmanager
def _step_budget(limit: int) -> Iterator[None]:
    token = _STEPS.set(_Steps(limit))
    try:
        yield
    finally:
        _STEPS.reset(token)


def _refuse_retrieval(uri: str) -> Any:
    """The registry's retrieve function: no URL, file or anything else is ever fetched."""
    raise NoSuchResource(ref=uri)


_NO_RETRIEVAL: Registry[Any] = Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]


def _counted(keyword: Any) -> Any:
    def run(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        steps = _STEPS.get()
        if steps is not None:
            steps.tick()
        return keyword(validator, value, instance, schema)

    return run


def _pattern(validator: Any, patrn: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _re_search(patrn, instance):
        yield ValidationError(f"{_short(repr(instance), 100)} does not match {_short(repr(patrn), 100)}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for patrn, subschema in patterns.items():
        for key, value in instance.items():
            if _re_search(patrn, key):
                yield from validator.descend(value, subschema, path=key, schema_path=patrn)


def _additional_properties(validator: Any, aP: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    props = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in props and not any(_re_search(p, k) for p in patterns)]
    if validator.is_type(aP, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], aP, path=extra)
    elif not aP and extras:
        # jsonschema's wording, with the caller's keys bounded.
        names = ", ".join(_short(repr(e), 60) for e in sorted(extras)[:10])
        names += f" and {len(extras) - 10} more" if len(extras) > 10 else ""
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            listed = ", ".join(_short(repr(p), 60) for p in sorted(patterns)[:10])
            yield ValidationError(f"{names} {verb} not match any of the regexes: {listed}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({names} {verb} unexpected)")


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        key = _hashable(item)
        if key in seen:
            yield ValidationError("the array has non-unique elements")
            return
        seen.add(key)


def _hashable(value: Any) -> Any:
    """A key equal for values JSON Schema calls equal (1 == 1.0, True != 1, key order ignored)."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, dict):
        return ("o", frozenset((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("a", tuple(_hashable(v) for v in value))
    return ("s", value)


def _multiple_of(validator: Any, factor: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "number"):
        return
    try:
        if isinstance(factor, float):
            quotient = instance / factor
            failed = int(quotient) != quotient
        else:
            failed = bool(instance % factor)
    except (OverflowError, ValueError, ZeroDivisionError):  # exact arithmetic cannot overflow
        failed = factor == 0 or (Fraction(instance) / Fraction(factor)).denominator != 1
    if failed:
        yield ValidationError(f"{_short(repr(instance), 60)} is not a multiple of {_short(repr(factor), 60)}")


def _re_search(pattern: Any, text: str) -> bool:
    try:
        return safe_regex.search(pattern, text)
    except safe_regex.RegexRefused:
        # schema_guard refuses such patterns up front; one reached here (e.g. meta-validation
        # of a refused schema) simply does not match.
        return False


_REPLACED = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
    "multipleOf": _multiple_of,
}


@lru_cache(maxsize=16)
def _safe_class(base: Any) -> Any:
    """`base` with the linear keyword replacements and a step counter on every keyword."""
    keywords = {k: _counted(_REPLACED.get(k, fn)) for k, fn in base.VALIDATORS.items()}
    return validators.extend(base, keywords)


@lru_cache(maxsize=1)
def _format_checker() -> FormatChecker:
    """jsonschema's format checks, with `regex` decided by RE2 (compiling with `re` can overflow)."""
    checker = FormatChecker()
    checker.checks("regex")(safe_regex.is_valid_regex)
    return checker


# --- conversion ------------------------------------------------------------------------------


def to_strict(
    schema: dict[str, Any],
    name: str = "result",
    *,
    limits: StrictLimits = AZURE_LIMITS,
    budget: SchemaBudget = DEFAULT_BUDGET,
) -> StrictSchema:
    """Convert a caller's JSON Schema into the strict structured-output subset.

    Every property becomes required, properties the caller left optional become nullable,
    every object is closed (`additionalProperties: false`), validation keywords move into the
    description, `definitions` become `$defs`, `oneOf` becomes `anyOf`, a single-item `allOf`
    is inlined, and a non-object root is wrapped as `{"value": <root>}`. Anything strict mode
    cannot express, and schemas over `limits` or `budget`, raise InvalidSchema naming the JSON
    pointer.
    """
    check_caller_schema(schema, budget)
    original = copy.deepcopy(schema)
    try:
        converter = _Converter(original)
        strict, wrapped = converter.run()
        _Measure(strict, converter.origin, wrapped, limits).run()
    except InvalidSchema as err:
        raise _bounded(err) from None
    return StrictSchema(schema=strict, original=original, wrapped=wrapped, name=_clean_name(name))


_MAX_MESSAGE = 600
_MAX_DETAIL = 200


def _bounded(err: InvalidSchema) -> InvalidSchema:
    """The same error with its message and details cut to size.

    Conversion messages quote the caller's keys, references and names; those are bounded by
    the schema budget, but not tightly enough for an error body.
    """

    def cut(value: Any) -> Any:
        if isinstance(value, str):
            return _short(value, _MAX_DETAIL)
        if isinstance(value, list):
            return [cut(v) for v in value[:10]]
        return value

    details = {k: cut(v) for k, v in err.details.items()}
    return InvalidSchema(_short(err.message, _MAX_MESSAGE), details=details)


def _clean_name(name: str) -> str:
    """`json_schema.name` must match ^[a-zA-Z0-9_-]{1,64}$."""
    cleaned = _NAME_BAD.sub("_", name or "").strip("_")[:64]
    return cleaned or "result"


def unwrap(strict: StrictSchema, answer: Any) -> Any:
    """Undo the root wrapping on an answer.

    Lenient on purpose: an answer that is not `{"value": ...}` (a json_object fallback may
    return the bare value) is returned as is, and validation against the original decides.
    """
    if strict.wrapped and isinstance(answer, dict) and set(answer) == {"value"}:
        return answer["value"]
    return answer


class _Converter:
    """One conversion: holds the root's definitions and where each output node came from."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.defs_key = "definitions" if "definitions" in root else "$defs"
        if "$defs" in root and "definitions" in root:
            raise InvalidSchema(
                "the schema has both `$defs` and `definitions`; use `$defs` only",
                details={"path": "/definitions"},
            )
        defs = root.get(self.defs_key, {})
        if not isinstance(defs, dict):
            raise InvalidSchema(f"`{self.defs_key}` must be an object", details={"path": f"/{self.defs_key}"})
        self.defs: dict[str, Any] = defs
        self.wrapped = False
        self.used: list[str] = []  # definitions referenced so far, in first-use order
        # id(output node) -> JSON pointer of the caller's schema it was made from.
        self.origin: dict[int, str] = {}

    # -- entry ------------------------------------------------------------------------------

    def run(self) -> tuple[dict[str, Any], bool]:
        root_node, root_path = self._resolve_root()
        if isinstance(root_node, dict):
            root_node = {k: v for k, v in root_node.items() if k not in ("$defs", "definitions")}
        self.wrapped = not self._is_object(root_node)
        body = self._convert(root_node, root_path)
        # Only definitions the schema reaches are converted and sent: an unused one can
        # neither fail the conversion nor count against the limits.
        converted: dict[str, dict[str, Any]] = {}
        while pending := [n for n in self.used if n not in converted]:
            for name in pending:
                converted[name] = self._convert(self.defs[name], f"/{_esc(self.defs_key)}/{_esc(name)}")
        defs = {name: converted[name] for name in self.defs if name in converted}
        if self.wrapped:
            out: dict[str, Any] = {
                "type": "object",
                "properties": {"value": body},
                "required": ["value"],
                "additionalProperties": False,
            }
        else:
            out = body
        if defs:
            out["$defs"] = defs
        return out, self.wrapped

    def _resolve_root(self) -> tuple[Any, str]:
        """Follow a root `$ref` to the definition it names (strict needs a concrete object root)."""
        node: Any = self.root
        path = ""
        seen: set[str] = set()
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            extra = set(node) - {"$ref", "$defs", "definitions", "title", "description"} - _DROPPED - MOVED_KEYWORDS
            if extra:
                raise InvalidSchema(
                    f"at {path or '(root)'}: keywords next to a root `$ref` are not supported: {sorted(extra)}",
                    details={"path": path, "keywords": sorted(extra)},
                )
            name = self._def_name(ref, path)
            if name is None or name in seen:
                raise InvalidSchema(
                    f"at {path or '(root)'}: the root `$ref` {ref!r} does not lead to a definition",
                    details={"path": f"{path}/$ref"},
                )
            seen.add(name)
            target = self.defs[name]
            merged = dict(target) if isinstance(target, dict) else target
            if isinstance(merged, dict):
                for key, value in node.items():
                    if (key in ("title", "description") or key in MOVED_KEYWORDS) and key not in merged:
                        merged[key] = value
            node, path = merged, f"/{_esc(self.defs_key)}/{_esc(name)}"
        return node, path

    @staticmethod
    def _is_object(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        t = node.get("type")
        if t is None:
            return "anyOf" not in node and "oneOf" not in node and any(k in node for k in _OBJECT_HINTS)
        return t == "object" or t == ["object"]

    # -- refs -------------------------------------------------------------------------------

    def _def_name(self, ref: Any, path: str) -> str | None:
        """The definition a local `#/$defs/Name` (or `#/definitions/Name`) ref names; None for `#`."""
        if not isinstance(ref, str):
            raise InvalidSchema(f"at {path}/$ref: `$ref` must be a string", details={"path": f"{path}/$ref"})
        if ref == "#":
            return None
        m = _DEF_REF.match(ref)
        if not m:
            raise InvalidSchema(
                f"at {path}/$ref: unsupported reference {ref!r}; only `#` and `#/$defs/<name>` "
                "(or `#/definitions/<name>`) within the same schema are supported",
                details={"path": f"{path}/$ref", "ref": ref},
            )
        if m.group(1) != self.defs_key and m.group(1) in self.root:
            raise InvalidSchema(
                f"at {path}/$ref: {ref!r} points into `{m.group(1)}`, but the definitions are in `{self.defs_key}`",
                details={"path": f"{path}/$ref", "ref": ref},
            )
        name = _unesc(m.group(2))
        if name not in self.defs:
            raise InvalidSchema(
                f"at {path}/$ref: {ref!r} names no definition", details={"path": f"{path}/$ref", "ref": ref}
            )
        return name

    def _rewrite_ref(self, ref: Any, path: str) -> str:
        name = self._def_name(ref, path)
        if name is None:
            if self.wrapped:
                raise InvalidSchema(
                    f"at {path}/$ref: a recursive `#` reference needs an object root; "
                    "move the root into `$defs` and reference it from there",
                    details={"path": f"{path}/$ref"},
                )
            return "#"
        if name not in self.used:
            self.used.append(name)
        return f"#/$defs/{_esc(name)}"

    # -- nodes ------------------------------------------------------------------------------

    def _note(self, out: dict[str, Any], path: str) -> dict[str, Any]:
        self.origin[id(out)] = path
        return out

    def _convert(self, node: Any, path: str) -> dict[str, Any]:
        """One (sub)schema, not yet made nullable."""
        if not isinstance(node, dict):
            what = "any value" if node is True else "no value" if node is False else repr(node)
            raise InvalidSchema(
                f"at {path or '(root)'}: a schema of {what} cannot be expressed in strict structured output; "
                "give it a `type`",
                details={"path": path},
            )
        for key in ("$defs", "definitions"):
            if key in node:
                raise InvalidSchema(
                    f"at {path}: `{key}` is only supported at the root of the schema",
                    details={"path": f"{path}/{key}"},
                )
        for key in ("$dynamicRef", "$recursiveRef", "prefixItems"):
            if key in node:
                what = "tuple arrays (`prefixItems`)" if key == "prefixItems" else f"`{key}`"
                raise InvalidSchema(
                    f"at {path or '(root)'}: {what} cannot be expressed in strict structured output",
                    details={"path": f"{path}/{key}"},
                )
        if "allOf" in node:
            return self._convert(*self._inline_all_of(node, path))

        notes = [f"{k}: {_fmt(v)}" for k, v in node.items() if k in MOVED_KEYWORDS]
        if "$ref" in node:
            self._only_annotations(node, "$ref", path)
            out = {"$ref": self._rewrite_ref(node["$ref"], path)}
        elif "anyOf" in node or "oneOf" in node:
            out = self._any_of(node, path)
        else:
            out = self._typed(node, path, notes)
        return self._annotate(out, node, notes, path)

    def _annotate(self, out: dict[str, Any], node: dict[str, Any], notes: list[str], path: str) -> dict[str, Any]:
        if "title" in node:
            out["title"] = node["title"]
        description = node.get("description")
        if notes:
            text = "; ".join(notes)
            description = f"{description} ({text})" if description else text
        if description is not None:
            out["description"] = description
        return self._note(out, path)

    def _only_annotations(self, node: dict[str, Any], kind: str, path: str) -> None:
        """A `$ref` or union node may carry annotations and moved keywords, but no shape of its own."""
        shape = _SHAPE | ({"anyOf", "oneOf"} if kind == "$ref" else {"$ref"})
        extra = sorted(k for k in node if k in shape)
        if extra:
            raise InvalidSchema(
                f"at {path or '(root)'}: `{kind}` combined with {', '.join(f'`{k}`' for k in extra)} is not "
                f"supported in strict structured output; put those keywords inside the `{kind}` target",
                details={"path": path, "keywords": extra},
            )

    def _inline_all_of(self, node: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        items = node["allOf"]
        if len(items) != 1:
            raise InvalidSchema(
                f"at {path or '(root)'}: `allOf` with {len(items)} schemas is not supported in strict structured "
                "output; merge them into one schema",
                details={"path": f"{path}/allOf", "count": len(items)},
            )
        inner = items[0]
        if not isinstance(inner, dict):
            return inner, f"{path}/allOf/0"
        outer = {k: v for k, v in node.items() if k != "allOf"}
        clash = sorted(set(outer) & set(inner) - {"title", "description"})
        if clash:
            raise InvalidSchema(
                f"at {path or '(root)'}: `allOf` repeats {', '.join(f'`{k}`' for k in clash)} from its parent; "
                "merge them into one schema",
                details={"path": f"{path}/allOf/0", "keywords": clash},
            )
        merged = {**inner, **outer}  # the parent's title/description win
        # Report errors inside the inlined schema at its own path when the parent adds no shape.
        sub_path = path if any(k in outer for k in _SHAPE | {"$ref", "anyOf", "oneOf"}) else f"{path}/allOf/0"
        return merged, sub_path

    def _any_of(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        if "anyOf" in node and "oneOf" in node:
            raise InvalidSchema(
                f"at {path or '(root)'}: `anyOf` together with `oneOf` is not supported; use one of them",
                details={"path": path},
            )
        key = "anyOf" if "anyOf" in node else "oneOf"
        self._only_annotations(node, key, path)
        branches: list[dict[str, Any]] = []
        for i, sub in enumerate(node[key]):
            conv = self._convert(sub, f"{path}/{key}/{i}")
            if set(conv) == {"anyOf"}:  # a bare union inside a union: splice it in
                branches.extend(conv["anyOf"])
            else:
                branches.append(conv)
        return {"anyOf": branches}

    def _types(self, node: dict[str, Any], path: str) -> list[str]:
        """The declared types, or the ones implied by the keywords and enum/const values."""
        t = node.get("type")
        if isinstance(t, str):
            return [t]
        if isinstance(t, list):
            return list(dict.fromkeys(t))
        if any(k in node for k in _OBJECT_HINTS):
            return ["object"]
        if "items" in node:
            return ["array"]
        values = node["enum"] if "enum" in node else [node["const"]] if "const" in node else None
        if values is None:
            raise InvalidSchema(
                f"at {path or '(root)'}: the schema has no `type` (nor `properties`, `items`, `enum`, `const`, "
                "`$ref` or `anyOf`), so it allows any value, which strict structured output cannot express",
                details={"path": path},
            )
        found: list[str] = []  # in order of first appearance, so branches follow the caller's values
        for value in values:
            t = json_type(value)
            if t == "number" and "integer" in found:
                found[found.index("integer")] = "number"
            elif t not in found and not (t == "integer" and "number" in found):
                found.append(t)
        return found

    def _typed(self, node: dict[str, Any], path: str, notes: list[str]) -> dict[str, Any]:
        types = self._types(node, path)
        for value in node.get("enum", []) + ([node["const"]] if "const" in node else []):
            if isinstance(value, (dict, list)):
                raise InvalidSchema(
                    f"at {path or '(root)'}: enum/const values must be strings, numbers, booleans or null",
                    details={"path": path},
                )
        if "object" in types and node.get("additionalProperties", False) is not False:
            notes.append("additionalProperties: not supported")
        non_null = [t for t in types if t != "null"]
        if len(non_null) == 1 and (non_null[0] in _SIMPLE_TYPES or len(types) == 1):
            # One type, or [simple, "null"]: stays a plain typed schema.
            out = self._single(node, non_null[0], path, node.get("enum"), node.get("const", _MISSING))
            if "null" in types:
                out["type"] = [non_null[0], "null"]
            return out
        if not non_null:
            return {"type": "null"}
        # Several types, or object/array with null: a union, one branch per type.
        branches = []
        for t in types:
            if t == "null":
                branches.append({"type": "null"})
                continue
            enum = None
            if "enum" in node:
                enum = [v for v in node["enum"] if _matches(v, t)]
                if not enum:
                    continue
            const = node.get("const", _MISSING)
            if const is not _MISSING and not _matches(const, t):
                continue
            branches.append(self._note(self._single(node, t, path, enum, const), path))
        if not any(b.get("type") != "null" for b in branches):
            raise InvalidSchema(
                f"at {path or '(root)'}: no enum/const value matches the declared types {types}",
                details={"path": path},
            )
        return {"anyOf": branches}

    def _single(self, node: dict[str, Any], t: str, path: str, enum: Any, const: Any) -> dict[str, Any]:
        if t == "object":
            return self._object(node, path)
        if t == "array":
            return self._array(node, path)
        out: dict[str, Any] = {"type": t}
        if enum is not None:
            out["enum"] = list(enum)
        if const is not _MISSING:
            out["const"] = const
        return out

    def _object(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        props = node.get("properties") or {}
        if not props:
            raise InvalidSchema(
                f"at {path or '(root)'}: an object without named `properties` (a free-form map) cannot be "
                "expressed in strict structured output; list its properties, or use an array of "
                '{"key": ..., "value": ...} objects',
                details={"path": path},
            )
        required = node.get("required", [])
        missing = [r for r in required if r not in props]
        if missing:
            raise InvalidSchema(
                f"at {path or '(root)'}/required: {missing} required but not defined in `properties`; "
                "strict structured output cannot produce keys it has no schema for",
                details={"path": f"{path}/required", "names": missing},
            )
        out_props: dict[str, Any] = {}
        for key, sub in props.items():
            conv = self._convert(sub, f"{path}/properties/{_esc(key)}")
            out_props[key] = conv if key in required else self._nullable(conv)
        return {"type": "object", "properties": out_props, "required": list(props), "additionalProperties": False}

    def _array(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        if "items" not in node:
            raise InvalidSchema(
                f"at {path or '(root)'}: an array without `items` allows any values, which strict structured "
                "output cannot express; give `items` a schema",
                details={"path": path},
            )
        return {"type": "array", "items": self._convert(node["items"], f"{path}/items")}

    def _nullable(self, conv: dict[str, Any]) -> dict[str, Any]:
        """Let an optional property be null (strict mode has no optional keys)."""
        if _allows_null(conv):
            return conv
        origin = self.origin.get(id(conv), "")
        t = conv.get("type")
        if isinstance(t, list):
            # [simple, "null"] whose enum/const still excludes null.
            if "const" not in conv:
                return self._note({**conv, "enum": [*conv["enum"], None]}, origin)
        elif "anyOf" in conv:
            return self._note({**conv, "anyOf": [*conv["anyOf"], {"type": "null"}]}, origin)
        elif t in _SIMPLE_TYPES and "enum" not in conv and "const" not in conv:
            return self._note({**conv, "type": [t, "null"]}, origin)
        # $ref, object, array, enum, const: a union with null; title/description stay outside.
        inner = {k: v for k, v in conv.items() if k not in ("title", "description")}
        self._note(inner, origin)
        outer: dict[str, Any] = {"anyOf": [inner, {"type": "null"}]}
        for key in ("title", "description"):
            if key in conv:
                outer[key] = conv[key]
        return self._note(outer, origin)


class _Missing:
    pass


_MISSING: Any = _Missing()


def _allows_null(conv: dict[str, Any]) -> bool:
    """Whether a converted node already accepts null (so nothing is added twice)."""
    t = conv.get("type")
    if "anyOf" in conv:
        return any(_allows_null(b) for b in conv["anyOf"])
    if t == "null":
        return True
    if isinstance(t, list) and "null" in t:
        if "enum" in conv and None not in conv["enum"]:
            return False
        return not ("const" in conv and conv["const"] is not None)
    return False


class _Measure:
    """Checks a strict schema against the size limits, naming the caller's JSON pointer."""

    def __init__(self, strict: dict[str, Any], origin: dict[int, str], wrapped: bool, limits: StrictLimits) -> None:
        self.strict = strict
        self.origin = origin
        self.wrapped = wrapped
        self.limits = limits
        self.defs: dict[str, Any] = strict.get("$defs", {})
        self._heights: dict[str, tuple[int, list[str]]] = {}
        self._in_progress: set[str] = set()

    def _where(self, node: Any, fallback: str) -> str:
        return self.origin.get(id(node), fallback)

    def run(self) -> None:
        self._totals()
        height, chain = self._height(self.strict, "")
        if height > self.limits.max_depth:
            where = chain[-1]
            via = chain[:-1]
            note = " (counting the wrapper around the non-object root)" if self.wrapped else ""
            via_text = f" (reached via $ref at {', '.join(via)})" if via else ""
            raise InvalidSchema(
                f"the schema nests {height} levels deep at {where or '(root)'}{via_text}{note}; "
                f"strict structured output allows at most {self.limits.max_depth}",
                details={"path": where, "via": via, "depth": height, "limit": self.limits.max_depth},
            )

    def _nodes(self, node: Any, parent: str) -> Iterator[tuple[dict[str, Any], str]]:
        """Every schema location once (definitions once, not per use), with its caller pointer."""
        if not isinstance(node, dict):
            return
        here = self._where(node, parent)
        yield node, here
        for key, sub in node.get("properties", {}).items():
            yield from self._nodes(sub, f"{here}/properties/{_esc(key)}")
        if "items" in node:
            yield from self._nodes(node["items"], f"{here}/items")
        for sub in node.get("anyOf", []):
            yield from self._nodes(sub, here)
        for name, sub in node.get("$defs", {}).items():
            yield from self._nodes(sub, f"/$defs/{_esc(name)}")

    def _totals(self) -> None:
        lim = self.limits
        props = enum_values = chars = 0
        for name in self.defs:
            chars += len(name)
        for node, where in self._nodes(self.strict, ""):
            for key in node.get("properties", {}):
                props += 1
                chars += len(key)
                if props > lim.max_properties:
                    at = f"{where}/properties/{_esc(key)}"
                    raise InvalidSchema(
                        f"the schema has more than {lim.max_properties} object properties in total "
                        f"(property {props} is at {at}); strict structured output allows at most {lim.max_properties}",
                        details={"path": at, "count": props, "limit": lim.max_properties},
                    )
            values = list(node.get("enum", [])) + ([node["const"]] if "const" in node else [])
            enum_values += len(node.get("enum", []))
            strings = [str(v) for v in values if v is not None]
            chars += sum(len(s) for s in strings)
            if enum_values > lim.max_enum_values:
                raise InvalidSchema(
                    f"the schema has more than {lim.max_enum_values} enum values in total (exceeded at "
                    f"{where or '(root)'}); strict structured output allows at most {lim.max_enum_values}",
                    details={"path": f"{where}/enum", "count": enum_values, "limit": lim.max_enum_values},
                )
            enum_strings = [v for v in node.get("enum", []) if isinstance(v, str)]
            if len(enum_strings) > lim.large_enum_values:
                size = sum(len(s) for s in enum_strings)
                if size > lim.max_large_enum_chars:
                    raise InvalidSchema(
                        f"the enum at {where or '(root)'} has {len(enum_strings)} values of {size} characters; "
                        f"an enum of more than {lim.large_enum_values} values may have at most "
                        f"{lim.max_large_enum_chars} characters",
                        details={"path": f"{where}/enum", "chars": size, "limit": lim.max_large_enum_chars},
                    )
            if chars > lim.max_string_chars:
                raise InvalidSchema(
                    f"the schema's property names, definition names, enum and const values exceed "
                    f"{lim.max_string_chars} characters (exceeded at {where or '(root)'})",
                    details={"path": where, "chars": chars, "limit": lim.max_string_chars},
                )

    def _height(self, node: Any, parent: str) -> tuple[int, list[str]]:
        """Levels of value nesting below `node`, and the pointer chain to the deepest schema.

        A property or an array item is one level; `anyOf` adds none; a `$ref` is followed
        (its definition counted where it is used), except back into a definition already
        being expanded: recursion is allowed and has no fixed depth.
        """
        if not isinstance(node, dict):
            return 0, [parent]
        here = self._where(node, parent)
        best: tuple[int, list[str]] = (0, [here])
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = _unesc(ref[len("#/$defs/") :])
            if name not in self._in_progress:
                h, chain = self._def_height(name)
                best = (h, [here, *chain] if h else [here])
        for key, sub in node.get("properties", {}).items():
            h, chain = self._height(sub, f"{here}/properties/{_esc(key)}")
            if h + 1 > best[0]:
                best = (h + 1, chain)
        if "items" in node:
            h, chain = self._height(node["items"], f"{here}/items")
            if h + 1 > best[0]:
                best = (h + 1, chain)
        for sub in node.get("anyOf", []):
            h, chain = self._height(sub, here)
            if h > best[0]:
                best = (h, chain)
        return best

    def _def_height(self, name: str) -> tuple[int, list[str]]:
        if name not in self._heights:
            self._in_progress.add(name)
            try:
                self._heights[name] = self._height(self.defs[name], f"/$defs/{_esc(name)}")
            finally:
                self._in_progress.discard(name)
        return self._heights[name]


# --- answers ---------------------------------------------------------------------------------


class AnswerTooLarge(ValueError):
    """The model's answer is over the answer budget (values, nesting); its text is ours, bounded."""


def _validator(original: dict[str, Any], check_formats: bool = True) -> Any:
    cls = _validator_class(original)
    return cls(original, format_checker=_format_checker() if check_formats else None, registry=_NO_RETRIEVAL)


@contextmanager
def _bounded_answer(answer: Any, budget: SchemaBudget) -> Iterator[None]:
    """Refuse an oversized answer, then run the block under the validation step budget.

    Two bounds keep answer validation from stalling a worker: the answer's size and nesting are
    checked first (iteratively), and every keyword evaluated counts against
    `max_validation_steps`, so no schema/answer pair can take more than that many steps, whatever
    the schema's shape. Running out is the schema's doing (schema_guard already refused the
    shapes known to blow up), so it is an InvalidSchema, never a retry.
    """
    why = check_answer_size(answer, budget)
    if why is not None:
        raise AnswerTooLarge(why)
    try:
        with _step_budget(budget.max_validation_steps):
            yield
    except _StepsExceeded:
        raise InvalidSchema(
            f"validating the answer against the schema took more than {budget.max_validation_steps} steps; "
            "simplify the schema",
            details={"limit": budget.max_validation_steps, "setting": "SCHEMA_MAX_VALIDATION_STEPS"},
        ) from None
    except Unresolvable:
        raise InvalidSchema("the schema has a reference that cannot be resolved", details={"rule": "ref"}) from None


def prune_nulls(original: dict[str, Any], answer: Any, *, budget: SchemaBudget = DEFAULT_BUDGET) -> Any:
    """Drop null values of optional keys the caller's schema does not let be null.

    The strict schema made every optional property nullable, so the model answers `null`
    where it would have left a key out; the caller's schema may not allow that null, but it
    does allow the key to be absent. Follows local `$ref`s; in unions, uses the first branch
    that accepts the pruned value. Returns a new value; `answer` is not changed.
    """
    with _bounded_answer(answer, budget):
        return _prune(_validator(original, check_formats=False), original, original, copy.deepcopy(answer))


def _resolve_local(root: dict[str, Any], ref: Any) -> Any:
    """The subschema a same-document `$ref` ("#", "#/$defs/A", any "#/..." pointer) names, or None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for token in [t for t in ref[1:].split("/") if t] if ref != "#" else []:
        token = _unesc(token)
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _prune(v: Any, root: dict[str, Any], schema: Any, value: Any, _refs: int = 0) -> Any:
    if not isinstance(schema, dict) or not isinstance(value, (dict, list)):
        return value
    steps = _STEPS.get()
    if steps is not None:  # pruning recurses into union branches too: it shares the step budget
        steps.tick()
    if "$ref" in schema and _refs < 64:  # the bound stops a schema that is only a ref cycle
        value = _prune(v, root, _resolve_local(root, schema["$ref"]), value, _refs + 1)
    for sub in schema.get("allOf", []):
        value = _prune(v, root, sub, value, _refs)
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key, []):
            cand = _prune(v, root, sub, value, _refs)
            if v.evolve(schema=sub).is_valid(cand):
                value = cand
                break
    if isinstance(value, dict):
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if item is None and key in props and key not in required and not v.evolve(schema=sub).is_valid(None):
                continue
            out[key] = _prune(v, root, sub, item)
        return out
    items = schema.get("items")
    if isinstance(items, dict):
        return [_prune(v, root, items, x) for x in value]
    return value


def normalise(original: dict[str, Any], answer: Any, *, budget: SchemaBudget = DEFAULT_BUDGET) -> Any:
    """The answer as returned to the caller: `prune_nulls` applied (the only normalisation)."""
    return prune_nulls(original, answer, budget=budget)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pointer(path: Any) -> str:
    return bounded_path("".join(f"/{_esc(str(p))}" for p in path)) or "(root)"


def validate(
    original: dict[str, Any],
    answer: Any,
    *,
    check_formats: bool = True,
    max_errors: int = 20,
    budget: SchemaBudget = DEFAULT_BUDGET,
) -> list[str]:
    """Errors of the (null-pruned) answer against the caller's original schema, as readable lines.

    Each line is "<JSON pointer>: <message>", e.g. "/line_items/0/total: 'abc' is not of type
    'number'", short enough to send back to the model in the re-ask. Formats (date, email, ...)
    are checked when `check_formats`. The work is bounded by `budget` (see `_bounded_answer`):
    AnswerTooLarge for an oversized answer, InvalidSchema when validation runs out of steps.
    """
    with _bounded_answer(answer, budget):
        v = _validator(original, check_formats)
        pruned = _prune(v, original, original, copy.deepcopy(answer))
        errors = sorted(v.iter_errors(pruned), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    lines: list[str] = []
    for err in errors[:max_errors]:
        line = f"{_pointer(err.absolute_path)}: {_short(err.message)}"
        if err.context:
            closest: ValidationError | None = best_match(err.context)
            if closest is not None:
                line += f" (closest: {_pointer(closest.absolute_path)}: {_short(closest.message, 200)})"
        lines.append(line)
    if len(errors) > max_errors:
        lines.append(f"... and {len(errors) - max_errors} more errors")
    return lines


# --- tolerant JSON ---------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|json5)?[ \t]*\r?\n?(.*?)```", re.DOTALL)
_MAX_SPAN_TRIES = 20


class AnswerNotJson(ValueError):
    """The model's answer holds no JSON; the message is ours (it may quote the answer's first 80 characters)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def parse_json_tolerant(text: str) -> Any:
    """Parse a model's JSON answer, tolerating code fences and text around it.

    Tries, in order: the whole text; each fenced block; the first balanced `{...}` or `[...]`
    span that parses (brackets matched properly, ignoring those inside JSON strings). Needed for
    the json_object fallback and for OpenAI-compatible servers that wrap their JSON in prose.
    """
    if not isinstance(text, str):
        raise AnswerNotJson(f"expected the model's text, got {type(text).__name__}")
    body = text.lstrip("\ufeff").strip()
    if not body:
        raise AnswerNotJson("the model's answer is empty, not JSON")
    try:
        return _loads(body)
    except ValueError:
        pass
    for m in _FENCE.finditer(body):
        try:
            return _loads(m.group(1).strip())
        except ValueError:
            continue
    for start, end in _bracket_spans(body)[:_MAX_SPAN_TRIES]:
        try:
            return _loads(body[start:end])
        except ValueError:
            continue
    preview = body[:80].replace("\n", " ")
    raise AnswerNotJson(f"no JSON object or array found in the model's answer (starts: {preview!r})")


def _bracket_spans(text: str) -> list[tuple[int, int]]:
    """Every balanced `{...}`/`[...]` span, outermost first, in one linear pass.

    Quotes count only inside brackets (prose around the JSON may hold a stray `"`); a
    mismatched closer abandons the brackets open so far. An unclosed `{` in the prose before
    the JSON leaves the spans inside it intact.
    """
    closer = {"{": "}", "[": "]"}
    stack: list[tuple[str, int]] = []
    spans: list[tuple[int, int]] = []
    in_string = escaped = False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"' and stack:
            in_string = True
        elif c in closer:
            stack.append((closer[c], i))
        elif c in "}]" and stack:
            want, start = stack.pop()
            if want == c:
                spans.append((start, i + 1))
            else:
                stack.clear()
    return sorted(spans)
