"""Hostile caller JSON Schemas (issue 10): they reach nothing, stall nothing and never answer 500.

Every input here is built from code. "Stall nothing" is shown by behaviour, not by timing:
Python's backtracking `re` is replaced by a tripwire while caller regexes are evaluated, and
exponential validation must end in the step budget's error. The pytest timeouts only stop a
regression from hanging the suite.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema._format
import jsonschema._keywords
import jsonschema._utils
import pytest

from shared import schemas
from shared.errors import InvalidSchema
from shared.pipeline import AnalysisRequest, validate_request
from shared.settings import Settings
from tests.constants import TEST_DEPLOYMENT

OBJ: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}


def refused(schema: Any, **kw: Any) -> InvalidSchema:
    """The InvalidSchema both entry points raise for `schema` (check and strict conversion)."""
    with pytest.raises(InvalidSchema) as checked:
        schemas.check_caller_schema(schema, **kw)
    with pytest.raises(InvalidSchema):
        schemas.to_strict(schema, **kw)
    err = checked.value
    assert err.status == 400 and err.code == "invalid_schema"
    return err


def nested(depth: int, key: str = "not", leaf: Any = None) -> dict[str, Any]:
    node: Any = leaf if leaf is not None else {"type": "string"}
    for _ in range(depth):
        node = {key: node}
    return node


# --- no outbound access ---------------------------------------------------------------------


class Listener:
    """A TCP listener on a free local port that counts every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()  # answer nothing: a fetching validator fails fast instead of hanging

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def outbound_schemas(url: str) -> list[dict[str, Any]]:
    """A non-local reference under every keyword, including those strict conversion moves aside."""
    ref = {"$ref": url}
    return [
        {**OBJ, "not": ref},
        {**OBJ, "if": ref, "then": {"type": "object"}},
        {**OBJ, "if": {"type": "object"}, "then": ref},
        {**OBJ, "if": {"type": "string"}, "else": ref},
        {"type": "array", "items": {"type": "string"}, "contains": ref},
        {**OBJ, "dependentSchemas": {"a": ref}},
        {**OBJ, "properties": {"a": ref}},
        {**OBJ, "propertyNames": ref},
        {**OBJ, "anyOf": [ref, {"type": "object"}]},
        {**OBJ, "allOf": [ref]},
        {**OBJ, "$defs": {"X": ref}},
        {**OBJ, "not": {"$dynamicRef": url}},
        {**OBJ, "default": ref},  # data a JSON pointer could still make act as a schema
        {"$ref": url},
    ]


def test_no_schema_reaches_outside(listener: Listener) -> None:
    base = f"http://127.0.0.1:{listener.port}"
    cases = [
        *outbound_schemas(f"{base}/secret.json"),
        *outbound_schemas("file:///etc/passwd"),
        # `$id`-based resolution: a relative reference against the caller's base URI.
        {"$id": f"{base}/root.json", **OBJ, "not": {"$ref": "other.json"}},
        {**OBJ, "properties": {"a": {"$id": f"{base}/sub.json", "not": {"$ref": "#/x"}}}},
    ]
    for schema in cases:
        err = refused(schema)
        assert err.details["path"].endswith(("$ref", "$dynamicRef", "$id")), err.details
    # Even a schema that bypasses the check (as validate() alone would see it) fetches nothing:
    # the validators' registry refuses every retrieval, and that is a 400, not a hang or a 500.
    for schema in [*outbound_schemas(f"{base}/secret.json")[:6], *outbound_schemas("file:///etc/passwd")[:6]]:
        with pytest.raises(InvalidSchema) as info:
            schemas.validate(schema, {"a": "x"} if schema.get("type") == "object" else ["x"])
        assert "cannot be resolved" in info.value.message
    assert listener.connections == 0


@pytest.mark.parametrize("ref", ["#foo", "other.json#/a", "urn:x", "//host/x", "#/$defs/missing", "#/anyOf/x"])
def test_only_local_json_pointers_that_resolve(ref: str) -> None:
    err = refused({**OBJ, "anyOf": [{"type": "object"}], "not": {"$ref": ref}})
    assert err.details["path"] == "/not/$ref"


def test_local_pointers_anywhere_are_fine() -> None:
    schema = {
        **OBJ,
        "$defs": {"S": {"type": "string", "minLength": 1}},
        "properties": {"a": {"$ref": "#/$defs/S"}, "b": {"$ref": "#/$defs/S"}},
        "not": {"properties": {"a": {"$ref": "#/properties/b"}}},
    }
    schemas.check_caller_schema(schema)
    schemas.to_strict(schema)
    assert schemas.validate(schema, {"a": "", "b": "x"}) == ["/a: '' should be non-empty"]
    [line] = schemas.validate(schema, {"a": "x", "b": "x"})
    assert line.startswith("(root): ") and "should not be valid under" in line


# --- linear-time regexes ----------------------------------------------------------------------


class Tripwire:
    """Stands in for the `re` module inside jsonschema: any use is a test failure."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Python's re.{name} was used on a caller regex")


@pytest.fixture
def no_python_re(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (jsonschema._keywords, jsonschema._utils, jsonschema._format):
        monkeypatch.setattr(module, "re", Tripwire())


EVIL = "^(a+)+$"
LONG_A = "a" * 50_000
LONG_KEY = LONG_A + "!"  # the worst case for EVIL under a backtracking engine


@pytest.mark.timeout(60)
def test_catastrophic_patterns_run_in_linear_time(no_python_re: None) -> None:
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": EVIL}, "r": {"type": "string", "format": "regex"}},
        "patternProperties": {EVIL: {"type": "integer"}},
        "propertyNames": {"pattern": "^(a|aa)+!?$|^[sr]$"},
        "additionalProperties": False,
    }
    schemas.check_caller_schema(schema)
    answer = {"s": LONG_KEY, "r": "(a+)+", LONG_A: "not an integer", LONG_KEY: 1}
    errors = schemas.validate(schema, answer)
    assert len(errors) == 3
    assert errors[0].startswith("(root): ") and "does not match any of the regexes" in errors[0]
    assert errors[1].startswith("/aaaa") and "is not of type 'integer'" in errors[1]
    assert errors[2].startswith("/s: ") and "does not match" in errors[2]
    assert schemas.validate(schema, {"s": "aaa", "r": "^a$", "aaaa": 1}) == []


def test_pattern_semantics_are_unanchored_search(no_python_re: None) -> None:
    schema = {"type": "object", "properties": {"c": {"type": "string", "pattern": "[0-9]{3}"}}}
    assert schemas.validate(schema, {"c": "ab123cd"}) == []
    assert len(schemas.validate(schema, {"c": "ab12cd"})) == 1


def test_huge_repetition_counts_are_no_500() -> None:
    schema = {"type": "object", "properties": {"r": {"type": "string", "format": "regex"}}}
    for bad in ("a{4294967296}", "(a{1000}){1000}", "x{1001}", "(?<=a)b", "(a)\\1", "(", "\ud800"):
        errors = schemas.validate(schema, {"r": bad})
        assert all(isinstance(e, str) for e in errors)
    assert schemas.validate(schema, {"r": "(a)\\1"}) == ["/r: '(a)\\\\1' is not a 'regex'"]
    # As a schema `pattern` it compiles (RE2 reads an out-of-range count literally) or is a 400.
    for pattern in ("a{4294967296}", "(a{1000}){1000}"):
        try:
            schemas.check_caller_schema({"type": "string", "pattern": pattern})
        except InvalidSchema as err:
            assert err.details["path"] == "/pattern"


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        ({"type": "string", "pattern": "(a)\\1"}, "/pattern"),
        ({"type": "string", "pattern": "(?=a)a"}, "/pattern"),
        ({**OBJ, "patternProperties": {"(?<!x)y": {"type": "string"}}}, "/patternProperties/(?<!x)y"),
        ({**OBJ, "propertyNames": {"pattern": "(?!a)"}}, "/propertyNames/pattern"),
        ({**OBJ, "properties": {"a": {"type": "string", "pattern": "x" * 3000}}}, "/properties/a/pattern"),
    ],
)
def test_regexes_re2_cannot_run_are_refused_with_their_path(schema: dict[str, Any], path: str) -> None:
    err = refused(schema)
    assert err.details["path"] == path
    assert err.details["rule"] == "regex"


def test_unevaluated_properties_next_to_pattern_properties_is_refused() -> None:
    err = refused({**OBJ, "patternProperties": {EVIL: {}}, "unevaluatedProperties": False})
    assert err.details["path"] == "/unevaluatedProperties"


# --- budgets before meta-validation -----------------------------------------------------------


def test_issue_cases_are_400s() -> None:
    assert refused(nested(200)).details["setting"] == "SCHEMA_MAX_DEPTH"
    assert refused({**OBJ, "properties": {"a": nested(200)}}).details["setting"] == "SCHEMA_MAX_DEPTH"
    enum = [i if i % 3 == 0 else str(i) if i % 3 == 1 else {"k": [i]} for i in range(100_000)]
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "enum": enum, "uniqueItems": True}
    assert refused(draft4).details["setting"] == "SCHEMA_MAX_ENUM_ITEMS"
    assert refused(nested(100_000, key="x")).details["setting"] == "SCHEMA_MAX_DEPTH"  # no RecursionError
    with pytest.raises(InvalidSchema, match="must be a JSON object"):
        schemas.check_caller_schema("[" * 100_000)


def budget(**kw: int) -> Any:
    from shared.schemas import SchemaBudget

    return SchemaBudget(**kw)


@pytest.mark.parametrize(
    ("schema", "limits", "setting"),
    [
        ({**OBJ, "description": "d" * 200}, {"max_bytes": 150}, "SCHEMA_MAX_BYTES"),
        ({**OBJ, "description": "d" * 200}, {"max_string_chars": 100}, "SCHEMA_MAX_STRING_CHARS"),
        ({**OBJ, "examples": list(range(50))}, {"max_list_items": 20}, "SCHEMA_MAX_LIST_ITEMS"),
        ({**OBJ, "examples": list(range(50))}, {"max_nodes": 40}, "SCHEMA_MAX_NODES"),
        ({"type": "string", "enum": [str(i) for i in range(30)]}, {"max_enum_items": 20}, "SCHEMA_MAX_ENUM_ITEMS"),
        (
            {**OBJ, "properties": {k: {"enum": ["x"] * 1 + [str(i) for i in range(9)]} for k in "abc"}},
            {"max_enum_total": 25},
            "SCHEMA_MAX_ENUM_TOTAL",
        ),
        (
            {**OBJ, "allOf": [{"not": {"type": "null"}} for _ in range(5)]},
            {"max_combinators": 4},
            "SCHEMA_MAX_COMBINATORS",
        ),
        ({**OBJ, "properties": {"a": nested(10, leaf={"type": "string"})}}, {"max_depth": 8}, "SCHEMA_MAX_DEPTH"),
    ],
)
def test_each_budget_is_enforced_and_named(schema: dict[str, Any], limits: dict[str, int], setting: str) -> None:
    schemas.check_caller_schema(schema)  # fine under the defaults
    err = refused(schema, budget=budget(**limits))
    assert err.details["setting"] == setting
    assert err.details["limit"] == next(iter(limits.values()))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1, 2}, b"x"])
def test_non_json_values_are_refused(value: Any) -> None:
    refused({**OBJ, "default": value})


def test_settings_reach_the_request_check() -> None:
    from shared.schemas import SchemaBudget

    env = {
        "VLM_ENDPOINT": "http://model.test/v1",
        "VlmStorage": "UseDevelopmentStorage=true",
        "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
    }
    settings = Settings.from_env({**env, "SCHEMA_MAX_DEPTH": "3", "SCHEMA_MAX_VALIDATION_STEPS": "77"})
    assert SchemaBudget.from_settings(settings).max_depth == 3
    assert SchemaBudget.from_settings(settings).max_validation_steps == 77
    assert SchemaBudget.from_settings(Settings.from_env(env)) == SchemaBudget()
    schema = {**OBJ, "properties": {"a": nested(3, key="items")}}
    request = AnalysisRequest(images=[b"x"], task="schema", schema=schema)
    validate_request(request, Settings.from_env(env))
    with pytest.raises(InvalidSchema) as info:
        validate_request(request, settings)
    assert info.value.details["setting"] == "SCHEMA_MAX_DEPTH"


# --- reference cycles and exponential validation ----------------------------------------------

REC = {"type": "object", "properties": {"root": {"$ref": "#/$defs/n"}}, "required": ["root"]}


@pytest.mark.parametrize(
    ("schema", "rule"),
    [
        ({**OBJ, "not": {"$ref": "#/not"}}, "ref_cycle"),
        ({"$ref": "#"}, "ref_cycle"),
        ({**OBJ, "allOf": [{"$ref": "#"}]}, "ref_cycle"),
        ({**REC, "$defs": {"n": {"$ref": "#/$defs/m"}, "m": {"anyOf": [{"$ref": "#/$defs/n"}]}}}, "ref_cycle"),
        (
            {
                **REC,
                "$defs": {
                    "n": {
                        "oneOf": [
                            {"type": "array", "items": {"$ref": "#/$defs/n"}},
                            {"type": "array", "items": {"$ref": "#/$defs/n"}},
                        ]
                    }
                },
            },
            "branching_recursion",
        ),
        (
            {
                **REC,
                "$defs": {
                    "n": {
                        "type": "object",
                        "properties": {"c": {"$ref": "#/$defs/n"}},
                        "allOf": [{"$ref": "#/$defs/m"}],
                    },
                    "m": {"properties": {"c": {"$ref": "#/$defs/n"}}},
                },
            },
            "branching_recursion",
        ),
    ],
)
def test_cycles_that_never_end_or_explode_are_refused(schema: dict[str, Any], rule: str) -> None:
    assert refused(schema).details["rule"] == rule


@pytest.mark.parametrize(
    "defs",
    [
        # A tree, a binary tree, and a union of which only one branch recurses: linear work.
        {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
        {"n": {"type": "object", "properties": {"l": {"$ref": "#/$defs/n"}, "r": {"$ref": "#/$defs/n"}}}},
        {"n": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"$ref": "#/$defs/n"}}]}},
    ],
)
def test_ordinary_recursion_is_accepted(defs: dict[str, Any]) -> None:
    schemas.check_caller_schema({**REC, "$defs": defs})


def doubling_schema() -> dict[str, Any]:
    """Exponential for a plain validator: both `oneOf` branches recurse into the same item."""
    branch = {"type": "array", "items": {"$ref": "#/$defs/n"}}
    return {"$ref": "#/$defs/n", "$defs": {"n": {"oneOf": [branch, dict(branch), {"type": "integer"}]}}}


@pytest.mark.timeout(60)
def test_answer_validation_work_is_bounded() -> None:
    answer: Any = 1
    for _ in range(35):  # 2**35 evaluations without a bound
        answer = [answer]
    # validate() alone (as for a schema that skipped the check) still stops, with a 400.
    with pytest.raises(InvalidSchema) as info:
        schemas.validate(doubling_schema(), answer)
    assert info.value.details["setting"] == "SCHEMA_MAX_VALIDATION_STEPS"
    with pytest.raises(InvalidSchema):
        schemas.normalise(doubling_schema(), answer, budget=budget(max_validation_steps=2_000))
    # The check refuses it up front.
    assert refused(doubling_schema()).details["rule"] == "branching_recursion"


def test_answer_size_is_bounded_before_recursion() -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    for run in (schemas.validate, schemas.normalise):
        with pytest.raises(schemas.AnswerTooLarge, match="nests deeper than 40"):
            run({"type": "array"}, deep)
        with pytest.raises(schemas.AnswerTooLarge, match="more than 20000"):
            run({"type": "array"}, list(range(30_000)))
    assert isinstance(schemas.AnswerTooLarge("x"), ValueError)  # structured_call re-asks on ValueError


def test_unique_items_is_not_pairwise_and_keeps_json_equality() -> None:
    schema = {"type": "array", "uniqueItems": True}
    mixed: list[Any] = [v for i in range(3_000) for v in (i, str(i), {"k": [i]})]
    assert schemas.validate(schema, mixed) == []
    assert schemas.validate(schema, [*mixed, {"k": [7]}]) == ["(root): the array has non-unique elements"]
    assert schemas.validate(schema, [1, 1.0]) != []
    assert schemas.validate(schema, [True, 1, False, 0]) == []
    assert schemas.validate(schema, [{"a": 1, "b": 2}, {"b": 2, "a": 1}]) != []


def test_multiple_of_cannot_overflow() -> None:
    # Python would raise OverflowError on `10**400 / 0.1`; exact arithmetic decides instead.
    for factor, value in [(0.1, 10**400), (1e-300, 1e300), (0.5, 10**400 + 1)]:
        assert isinstance(schemas.validate({"type": "number", "multipleOf": factor}, value), list)
    assert schemas.validate({"type": "number", "multipleOf": 0.5}, 10**400) == []
    assert schemas.validate({"type": "number", "multipleOf": 3}, 10**400) != []


# --- messages ---------------------------------------------------------------------------------


def test_messages_carry_no_exception_text_and_are_bounded() -> None:
    long_key = "k" * 4_000
    cases = [
        {**OBJ, "properties": {long_key: {"properties": {long_key: {"type": "string", "pattern": "(a"}}}}},
        {**OBJ, "properties": {long_key: {"type": "nonsense"}}},
        {**OBJ, "properties": {long_key: {"$ref": "https://x/" + "y" * 4_000}}},
        {**OBJ, "not": {"$ref": "#/" + "z" * 4_000}},
    ]
    for schema in cases:
        err = refused(schema)
        assert len(err.message) < 700, len(err.message)
        assert len(str(err.details)) < 1_000
        for leak in ("missing )", "re2", "Traceback", "Error", "PointerToNowhere"):
            assert leak not in err.message


def test_conversion_messages_are_bounded() -> None:
    long = "n" * 4_000
    cases = [
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": [f"{long}{i}" for i in range(12)]},
        {"$ref": "#/$defs/A", "$defs": {"A": OBJ}, **{f"{long}{i}": 1 for i in range(10)}},
        {"type": "object", "properties": {long: {"type": "object", "properties": {long: {"type": "object"}}}}},
    ]
    for schema in cases:
        schemas.check_caller_schema(schema)  # a valid JSON Schema: the conversion refuses it
        with pytest.raises(InvalidSchema) as info:
            schemas.to_strict(schema)
        assert len(info.value.message) <= 600
        assert len(str(info.value.details)) < 3_000


def test_bad_labels_are_not_echoed() -> None:
    from shared import task_schemas
    from shared.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        task_schemas.classify_schema(["a", {"k": "v" * 100_000}])
    assert "vvvv" not in info.value.message and len(info.value.message) < 100


def test_references_that_fan_out_without_a_cycle_are_refused_before_any_validation() -> None:
    """d0..d40, each a oneOf of two refs to the next: tiny on the wire, 2^41 evaluations of one value."""
    from shared.schema_guard import guard_schema

    defs: dict = {f"d{k}": {"oneOf": [{"$ref": f"#/$defs/d{k + 1}"}, {"$ref": f"#/$defs/d{k + 1}"}]} for k in range(40)}
    defs["d40"] = {"type": "string"}
    schema = {"type": "object", "properties": {"v": {"$ref": "#/$defs/d0"}}, "required": ["v"], "$defs": defs}
    with pytest.raises(InvalidSchema) as err:
        guard_schema(schema)
    assert err.value.details["rule"] == "ref_expansion" and err.value.details["limit"] == "SCHEMA_MAX_NODES"
    # a shared definition reached along a few paths is fine
    defs = {f"d{k}": {"oneOf": [{"$ref": f"#/$defs/d{k + 1}"}, {"$ref": f"#/$defs/d{k + 1}"}]} for k in range(5)}
    defs["d5"] = {"type": "string"}
    guard_schema({**schema, "$defs": defs})
