"""Budget a caller's JSON Schema, and refuse what would reach out or stall, before any other work.

A caller's schema (HTTP `schema`, or a blob in the schemas container) is hostile input: it is
walked once, iteratively, and refused with InvalidSchema (400 `invalid_schema`, naming the JSON
pointer and the rule) when it

- is larger than the budget (serialised bytes, JSON values, nesting depth, string and list
  lengths, enum items, combinators): all counted before meta-validation, which is itself
  super-linear on some inputs (`uniqueItems` on mixed lists is pairwise);
- refers outside itself: every `$ref`/`$dynamicRef`/`$recursiveRef` must be a JSON pointer
  into the same document (`#` or `#/...`), and no `$id` or `$schema` may appear below the root
  (they would change what `#` means, or switch validator class). This holds *anywhere* in the
  document, enum and default values included, because a pointer can make any location act as
  a schema. Validators also run with a registry that retrieves nothing (see schemas.py);
- holds a regex RE2 cannot run in linear time (`pattern`, `patternProperties` keys);
- makes validation infinite or exponential: a reference cycle that never descends into the
  value (`"not": {"$ref": "#/not"}`), or a recursive schema in which two paths reach the
  recursion at the same place of the value (two `oneOf` branches that both recurse), so the
  work doubles at every level of the answer.

Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .errors import InvalidSchema
from .safe_regex import RegexRefused, compile_safe
from .settings import from_settings, mirror

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["DEFAULT_BUDGET", "SchemaBudget", "bounded_path", "check_answer_size", "guard_schema"]

REF_KEYS = ("$ref", "$dynamicRef", "$recursiveRef")
COMBINATORS = ("allOf", "anyOf", "oneOf", "not")
_OLD_DRAFTS = ("http://json-schema.org/draft-03/schema", "http://json-schema.org/draft-04/schema")
_MAX_MESSAGE_VALUE = 60
_MAX_MESSAGE_PATH = 200
_MAX_ANALYSIS_STEPS = 1_000_000


@dataclass(frozen=True)
class SchemaBudget:
    """How much of a caller's schema, and of an answer validated against it, is accepted.

    Each field mirrors a setting (SCHEMA_MAX_* / ANSWER_MAX_*): its default and its value come from there.
    """

    max_bytes: int = mirror("schema_max_bytes")
    max_nodes: int = mirror("schema_max_nodes")
    max_depth: int = mirror("schema_max_depth")
    max_string_chars: int = mirror("schema_max_string_chars")
    max_list_items: int = mirror("schema_max_list_items")
    max_enum_items: int = mirror("schema_max_enum_items")
    max_enum_total: int = mirror("schema_max_enum_total")
    max_combinators: int = mirror("schema_max_combinators")
    max_validation_steps: int = mirror("schema_max_validation_steps")
    max_answer_nodes: int = mirror("answer_max_nodes")
    max_answer_depth: int = mirror("answer_max_depth")

    @classmethod
    def from_settings(cls, settings: Settings) -> SchemaBudget:
        return from_settings(cls, settings)


DEFAULT_BUDGET = SchemaBudget()


def esc(token: str) -> str:
    """One JSON pointer token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def _where(path: str) -> str:
    return path or "(root)"


def bounded_path(path: str) -> str:
    """A JSON pointer for a message: caller keys can be long, so it is cut in the middle."""
    if len(path) <= _MAX_MESSAGE_PATH:
        return path
    half = _MAX_MESSAGE_PATH // 2
    return path[:half] + "…" + path[-half:]


def _refuse(path: str, message: str, **details: Any) -> InvalidSchema:
    path = bounded_path(path)
    return InvalidSchema(f"at {_where(path)}: {message}", details={"path": path, **details})


def _over(path: str, what: str, limit: int, setting: str) -> InvalidSchema:
    return _refuse(path, f"the schema has more {what} than the limit of {limit}", limit=limit, setting=setting)


# --- one walk: budget, references, identifiers, regexes ----------------------------------------


def guard_schema(schema: dict[str, Any], budget: SchemaBudget = DEFAULT_BUDGET) -> None:
    """Every static check above; raises InvalidSchema at the first failure."""
    _walk(schema, budget)
    _RefGraph(schema, budget.max_nodes).check()


def _walk(root: dict[str, Any], b: SchemaBudget) -> None:
    old_draft = isinstance(root.get("$schema"), str) and root["$schema"].rstrip("#").startswith(_OLD_DRAFTS)
    nodes = size = enum_total = combinators = 0
    pattern_props: str | None = None
    uneval_props: str | None = None
    stack: list[tuple[Any, str, int]] = [(root, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        nodes += 1
        if nodes > b.max_nodes:
            raise _over(path, "JSON values", b.max_nodes, "SCHEMA_MAX_NODES")
        if depth > b.max_depth:
            raise _refuse(
                path,
                f"the schema nests deeper than {b.max_depth} levels",
                limit=b.max_depth,
                setting="SCHEMA_MAX_DEPTH",
            )
        size += _scalar_size(value, path, b)
        if size > b.max_bytes:
            raise _refuse(
                path,
                f"the schema is larger than {b.max_bytes} bytes",
                limit=b.max_bytes,
                setting="SCHEMA_MAX_BYTES",
            )
        if isinstance(value, list):
            if len(value) > b.max_list_items:
                raise _over(path, "items in one list", b.max_list_items, "SCHEMA_MAX_LIST_ITEMS")
            size += len(value) + 1
            stack.extend((item, f"{path}/{i}", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, dict):
            size += 2 * len(value) + 1
            for key, item in value.items():
                if not isinstance(key, str):
                    raise _refuse(path, "object keys must be strings")
                size += _scalar_size(key, path, b)
                here = f"{path}/{esc(key)}"
                if key == "enum" and isinstance(item, list):
                    if len(item) > b.max_enum_items:
                        raise _over(here, "enum values in one enum", b.max_enum_items, "SCHEMA_MAX_ENUM_ITEMS")
                    enum_total += len(item)
                    if enum_total > b.max_enum_total:
                        raise _over(here, "enum values in total", b.max_enum_total, "SCHEMA_MAX_ENUM_TOTAL")
                if key in COMBINATORS:
                    combinators += 1
                    if combinators > b.max_combinators:
                        raise _over(
                            here, "combinators (allOf, anyOf, oneOf, not)", b.max_combinators, "SCHEMA_MAX_COMBINATORS"
                        )
                _check_keyword(key, item, here, path, old_draft)
                if key == "patternProperties":
                    pattern_props = here
                elif key == "unevaluatedProperties":
                    uneval_props = here
                stack.append((item, here, depth + 1))
        if size > b.max_bytes:
            raise _refuse(
                path,
                f"the schema is larger than {b.max_bytes} bytes",
                limit=b.max_bytes,
                setting="SCHEMA_MAX_BYTES",
            )
    if pattern_props is not None and uneval_props is not None:
        # jsonschema matches patternProperties with Python's backtracking `re` while working out
        # unevaluated properties; the two together are refused rather than run that way.
        raise _refuse(
            uneval_props,
            "`unevaluatedProperties` cannot be combined with `patternProperties` "
            f"(at {bounded_path(pattern_props)}) in one schema",
            rule="unevaluated_with_patterns",
        )


def _scalar_size(value: Any, path: str, b: SchemaBudget) -> int:
    """Serialised size of a scalar (containers count their punctuation separately)."""
    if isinstance(value, str):
        if len(value) > b.max_string_chars:
            raise _refuse(
                path,
                f"a string in the schema is longer than {b.max_string_chars} characters",
                limit=b.max_string_chars,
                setting="SCHEMA_MAX_STRING_CHARS",
            )
        return len(value.encode("utf-8", "surrogatepass")) + 2
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return value.bit_length() * 30103 // 100000 + 2  # decimal digits, without converting
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _refuse(path, "numbers must be finite (no NaN or Infinity)")
        return len(repr(value))
    if isinstance(value, (dict, list)):
        return 0
    raise _refuse(path, "the schema holds a value that is not JSON")


def _check_keyword(key: str, value: Any, here: str, parent: str, old_draft: bool) -> None:
    """Reference, identifier, regex and string-list rules for one keyword occurrence."""
    if key in REF_KEYS and isinstance(value, str):
        if not (value == "#" or value.startswith("#/")):
            raise _refuse(
                here,
                f"`{key}` must be a JSON pointer within this schema (`#` or `#/...`); references to other "
                "documents, URLs, files or anchors are not allowed",
                rule="local_reference",
            )
    elif key == "$id" and isinstance(value, str) and parent:
        raise _refuse(
            here, "`$id` is only allowed at the root (a nested `$id` changes what `#` refers to)", rule="nested_id"
        )
    elif key == "id" and old_draft and isinstance(value, str) and parent:
        raise _refuse(here, "`id` is only allowed at the root in draft-04 schemas", rule="nested_id")
    elif key == "$schema" and isinstance(value, str) and parent:
        raise _refuse(here, "`$schema` is only allowed at the root", rule="nested_schema")
    elif key == "pattern" and isinstance(value, str):
        _check_regex(value, here)
    elif key == "patternProperties" and isinstance(value, dict):
        for pattern in value:
            _check_regex(pattern, f"{here}/{esc(pattern)}")
    elif key in ("required", "type") and isinstance(value, list):
        # Meta-validation checks these for uniqueness; with mixed types that check is pairwise.
        if not all(isinstance(v, str) for v in value):
            raise _refuse(here, f"`{key}` must list strings only", rule="string_list")
    elif key == "dependentRequired" and isinstance(value, dict):
        for name, names in value.items():
            if isinstance(names, list) and not all(isinstance(v, str) for v in names):
                raise _refuse(f"{here}/{esc(name)}", "`dependentRequired` must list strings only", rule="string_list")


def _check_regex(pattern: str, path: str) -> None:
    try:
        compile_safe(pattern)
    except RegexRefused as exc:
        raise _refuse(path, f"the regular expression is refused: {exc.reason}", rule="regex") from None


# --- the reference graph ----------------------------------------------------------------------

# Keywords evaluated against the same value (in place), and those that descend into a part of
# it, with the part they reach: ("prop", name), ("item", index) or a wildcard (name None).
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_MAPS = ("dependentSchemas", "dependencies")
_DESCEND_ANY_PROP = ("additionalProperties", "unevaluatedProperties")
_DESCEND_ANY_ITEM = ("additionalItems", "unevaluatedItems", "contains")

Pointer = tuple[str, ...]
Part = tuple[str, Any]


def _schema_like(value: Any) -> bool:
    return isinstance(value, (dict, bool))


class _RefGraph:
    """Schema locations reachable from the root, and how each is evaluated.

    A location is its JSON pointer (tuple of tokens). Edges are "in place" (the same value is
    checked again: combinators, `not`, `if/then/else`, references) or "descending" (a part of
    the value: properties, items, ...). A cycle of in-place edges never terminates; in a
    recursive cycle, two in-place paths that reach the same part of the value make the work
    exponential in the depth of the answer.
    """

    def __init__(self, root: dict[str, Any], max_expansion: int = DEFAULT_BUDGET.max_nodes) -> None:
        self.root = root
        self.max_expansion = max_expansion
        self.in_place: dict[Pointer, list[Pointer]] = {}
        self.descend: dict[Pointer, list[tuple[Part, Pointer]]] = {}
        self.steps = 0

    def _tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > _MAX_ANALYSIS_STEPS:
            raise _refuse("", "the schema's references are too intricate to check", rule="analysis_budget")

    # -- building ---------------------------------------------------------------------------

    def _value(self, ptr: Pointer) -> Any:
        node: Any = self.root
        for token in ptr:
            node = node[int(token)] if isinstance(node, list) else node[token]
        return node

    def _target(self, ref: str, at: Pointer) -> Pointer:
        """The location a local JSON pointer reference names (as `referencing` reads it)."""
        node: Any = self.root
        tokens: list[str] = []
        if ref != "#":
            for raw in unquote(ref[2:]).split("/"):
                token = raw.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and token in node:
                    node = node[token]
                elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                    node = node[int(token)]
                else:
                    raise _refuse(_ptr(at), f"the reference {_show(ref)} names nothing in this schema", rule="ref")
                tokens.append(token)
        if not _schema_like(node):
            raise _refuse(_ptr(at), f"the reference {_show(ref)} does not point to a schema", rule="ref")
        return tuple(tokens)

    def _edges(self, ptr: Pointer, node: dict[str, Any]) -> tuple[list[Pointer], list[tuple[Part, Pointer]]]:
        here: list[Pointer] = []
        down: list[tuple[Part, Pointer]] = []
        for key, value in node.items():
            at = (*ptr, key)
            if key in REF_KEYS and isinstance(value, str):
                here.append(self._target(value, at))
            elif key in _IN_PLACE_LISTS and isinstance(value, list):
                here.extend((*at, str(i)) for i, v in enumerate(value) if _schema_like(v))
            elif key in _IN_PLACE_ONE and _schema_like(value):
                here.append(at)
            elif key in _IN_PLACE_MAPS and isinstance(value, dict):
                here.extend((*at, k) for k, v in value.items() if _schema_like(v))
            elif key == "properties" and isinstance(value, dict):
                down.extend((("prop", k), (*at, k)) for k, v in value.items() if _schema_like(v))
            elif key == "patternProperties" and isinstance(value, dict):
                down.extend((("prop", None), (*at, k)) for k, v in value.items() if _schema_like(v))
            elif key in _DESCEND_ANY_PROP and _schema_like(value):
                down.append((("prop", None), at))
            elif key == "propertyNames" and _schema_like(value):
                down.append((("key", None), at))
            elif key in ("items", "prefixItems") and isinstance(value, list):
                down.extend((("item", i), (*at, str(i))) for i, v in enumerate(value) if _schema_like(v))
            elif key in (*_DESCEND_ANY_ITEM, "items") and _schema_like(value):
                down.append((("item", None), at))
        return here, down

    def _build(self) -> None:
        todo: list[Pointer] = [()]
        seen: set[Pointer] = {()}
        while todo:
            ptr = todo.pop()
            node = self._value(ptr)
            self._tick()
            here, down = self._edges(ptr, node) if isinstance(node, dict) else ([], [])
            self.in_place[ptr] = here
            self.descend[ptr] = down
            for nxt in [*here, *(t for _, t in down)]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)

    # -- checks -----------------------------------------------------------------------------

    def check(self) -> None:
        self._build()
        order = self._in_place_order()
        self._expansion(order)
        scc = self._components()
        self._fan_out(order, scc)

    def _expansion(self, order: list[Pointer]) -> None:
        """Refuse a schema whose references expand, for ONE value, past the node budget.

        Without a cycle, references still multiply work: d0..d40 with `oneOf` [d(k+1), d(k+1)] is a
        small document but 2^41 evaluations of the same value. Counting, per location, the
        locations evaluated in place beneath it (children first, capped) is linear in the schema
        and catches every such blow-up; a plain tree never expands past its own node count.
        """
        cap = self.max_expansion + 1
        size: dict[Pointer, int] = {}
        for ptr in order:  # children before parents
            total = 1
            for child in self.in_place[ptr]:
                total = min(cap, total + size[child])
            self._tick()
            size[ptr] = total
            if total >= cap:
                raise _refuse(
                    _ptr(ptr),
                    f"references here expand to more than {self.max_expansion} schema evaluations of one value "
                    "(SCHEMA_MAX_NODES): the same definition is reached along many paths",
                    rule="ref_expansion",
                    limit="SCHEMA_MAX_NODES",
                )

    def _in_place_order(self) -> list[Pointer]:
        """Post-order of the in-place graph; refuses an in-place cycle (it never terminates)."""
        state: dict[Pointer, int] = {}  # 1 = on the stack, 2 = done
        order: list[Pointer] = []
        for start in sorted(self.in_place):
            if start in state:
                continue
            stack: list[tuple[Pointer, Iterator[Pointer]]] = [(start, iter(self.in_place[start]))]
            state[start] = 1
            while stack:
                ptr, children = stack[-1]
                child = next(children, None)
                self._tick()
                if child is None:
                    stack.pop()
                    state[ptr] = 2
                    order.append(ptr)
                elif state.get(child) == 1:
                    raise _refuse(
                        _ptr(ptr),
                        f"the references loop back to {_where(_ptr(child))} without descending into the value, "
                        "so validation would never end",
                        rule="ref_cycle",
                    )
                elif child not in state:
                    state[child] = 1
                    stack.append((child, iter(self.in_place[child])))
        return order

    def _components(self) -> dict[Pointer, int]:
        """Strongly connected components over all edges (iterative Tarjan); -1 = not on a cycle."""
        index: dict[Pointer, int] = {}
        low: dict[Pointer, int] = {}
        on_stack: set[Pointer] = set()
        stack: list[Pointer] = []
        comp: dict[Pointer, int] = {}
        counter = 0

        def succ(p: Pointer) -> list[Pointer]:
            return [*self.in_place[p], *(t for _, t in self.descend[p])]

        for start in sorted(self.in_place):
            if start in index:
                continue
            work: list[tuple[Pointer, Iterator[Pointer]]] = [(start, iter(succ(start)))]
            index[start] = low[start] = counter
            counter += 1
            stack.append(start)
            on_stack.add(start)
            while work:
                ptr, children = work[-1]
                child = next(children, None)
                self._tick()
                if child is not None:
                    if child not in index:
                        index[child] = low[child] = counter
                        counter += 1
                        stack.append(child)
                        on_stack.add(child)
                        work.append((child, iter(succ(child))))
                    elif child in on_stack:
                        low[ptr] = min(low[ptr], index[child])
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[ptr])
                if low[ptr] == index[ptr]:
                    members = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        members.append(member)
                        if member == ptr:
                            break
                    cyclic = len(members) > 1 or ptr in succ(ptr)
                    for member in members:
                        comp[member] = index[ptr] if cyclic else -1
        return comp

    def _fan_out(self, order: list[Pointer], comp: dict[Pointer, int]) -> None:
        """Per recursive location: how many in-place paths reach each part of the value and recurse."""
        counts: dict[Pointer, dict[Part, int]] = {}
        for ptr in order:  # children before parents
            c = comp[ptr]
            if c < 0:
                continue
            mine: dict[Part, int] = {}
            for part, target in self.descend[ptr]:
                if comp[target] == c:
                    mine[part] = min(2, mine.get(part, 0) + 1)
            for child in self.in_place[ptr]:
                if comp[child] == c:
                    sub = counts.get(child, {})
                    self._tick(len(sub) + 1)
                    for part, n in sub.items():
                        mine[part] = min(2, mine.get(part, 0) + n)
            counts[ptr] = mine
            if _conflict(mine):
                raise _refuse(
                    _ptr(ptr),
                    "two paths (e.g. two `oneOf`/`anyOf` branches, or `allOf` items) recurse into the same part "
                    "of the value, so validation work doubles at every level of the answer; make only one of "
                    "them recursive",
                    rule="branching_recursion",
                )


def _conflict(counts: dict[Part, int]) -> bool:
    """Whether two counted paths may reach the same part of one value."""
    for kind in ("prop", "item", "key"):
        wild = counts.get((kind, None), 0)
        named = [n for (k, name), n in counts.items() if k == kind and name is not None]
        if wild >= 2 or any(n >= 2 for n in named) or (wild and named):
            return True
    return False


def _ptr(tokens: Pointer) -> str:
    return "".join(f"/{esc(t)}" for t in tokens)


def _show(text: str) -> str:
    """A caller string for a message: bounded, quoted."""
    if len(text) > _MAX_MESSAGE_VALUE:
        text = text[: _MAX_MESSAGE_VALUE - 1] + "…"
    return repr(text)


# --- answers ----------------------------------------------------------------------------------


def check_answer_size(answer: Any, budget: SchemaBudget = DEFAULT_BUDGET) -> str | None:
    """Why an answer is too large to validate (values, nesting), or None when it is within budget.

    Iterative, so a deeply nested answer cannot exhaust the stack here; validation and null
    pruning are recursive and run only on answers this accepts.
    """
    nodes = 0
    stack: list[tuple[Any, int]] = [(answer, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > budget.max_answer_nodes:
            return f"the answer has more than {budget.max_answer_nodes} JSON values"
        if depth > budget.max_answer_depth:
            return f"the answer nests deeper than {budget.max_answer_depth} levels"
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return None
