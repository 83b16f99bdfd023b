"""Property-based fuzzing of caller-schema checking, strict conversion and answer validation.

For arbitrary JSON-ish schemas (keyword-shaped, and plain arbitrary JSON), `check_caller_schema`
and `to_strict` either succeed or raise InvalidSchema (a VlmError, so a 400), and `validate` /
`normalise` of an arbitrary answer return error lines or raise InvalidSchema / AnswerTooLarge:
never any other exception, and never a network connection (a tripwire replaces `connect`).
Work is bounded by the schema budget and the validation step counter, not by a clock; the
examples are derandomised so the suite is stable, and sized to run in a few seconds.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import schemas
from shared.errors import InvalidSchema, VlmError

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAMES = st.sampled_from(["a", "b", "c", "id", "$ref", "x y", "ü", ""])
REFS = st.sampled_from(
    [
        "#",
        "#/$defs/A",
        "#/$defs/B",
        "#/definitions/A",
        "#/properties/a",
        "#/not",
        "#/anyOf/0",
        "#/anyOf/x",
        "#foo",
        "other.json",
        "http://127.0.0.1:9/x.json",
        "file:///etc/passwd",
    ]
)
PATTERNS = st.sampled_from(["^[A-Z]{3}$", "^(a+)+$", "(a)\\1", "(?=a)", "a{4294967296}", "(", "\\p{L}+", ""])
TYPES = st.sampled_from(["string", "number", "integer", "boolean", "object", "array", "null", "nonsense"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=20,
)


def _schema_dict(sub: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of schema keywords whose values are (mostly) the right shape."""
    keyword_values: dict[str, st.SearchStrategy[Any]] = {
        "type": st.one_of(TYPES, st.lists(TYPES, max_size=3)),
        "properties": st.dictionaries(NAMES, sub, max_size=3),
        "required": st.lists(NAMES, max_size=3),
        "additionalProperties": st.one_of(st.booleans(), sub),
        "items": sub,
        "prefixItems": st.lists(sub, max_size=2),
        "enum": st.lists(SCALARS, min_size=1, max_size=4),
        "const": SCALARS,
        "anyOf": st.lists(sub, min_size=1, max_size=3),
        "oneOf": st.lists(sub, min_size=1, max_size=3),
        "allOf": st.lists(sub, min_size=1, max_size=2),
        "not": sub,
        "if": sub,
        "then": sub,
        "else": sub,
        "contains": sub,
        "$ref": REFS,
        "$dynamicRef": REFS,
        "pattern": PATTERNS,
        "patternProperties": st.dictionaries(PATTERNS, sub, max_size=2),
        "propertyNames": sub,
        "format": st.sampled_from(["regex", "date", "email", "uuid", "ipv4", "made-up"]),
        "minimum": SCALARS,
        "multipleOf": st.one_of(st.floats(min_value=1e-300, max_value=1e10), st.integers(1, 10)),
        "uniqueItems": st.booleans(),
        "minLength": st.integers(-1, 5),
        "dependentSchemas": st.dictionaries(NAMES, sub, max_size=2),
        "unevaluatedProperties": st.one_of(st.booleans(), sub),
        "description": st.text(max_size=10),
        "$id": st.sampled_from(["http://127.0.0.1:9/s.json", "s.json", "#x"]),
        "$schema": st.sampled_from(
            ["https://json-schema.org/draft/2020-12/schema", "http://json-schema.org/draft-04/schema#", "x"]
        ),
    }
    # A few keywords per schema: drawing only the chosen ones keeps generation cheap.
    chosen = st.lists(st.sampled_from(sorted(keyword_values)), max_size=4, unique=True)
    return chosen.flatmap(lambda keys: st.fixed_dictionaries({k: keyword_values[k] for k in keys}))


SUBSCHEMAS = st.recursive(st.one_of(st.booleans(), _schema_dict(st.just({}))), _schema_dict, max_leaves=8)


@st.composite
def caller_schemas(draw: st.DrawFn) -> dict[str, Any]:
    root = draw(_schema_dict(SUBSCHEMAS))
    if draw(st.booleans()):
        root["$defs"] = draw(st.dictionaries(st.sampled_from(["A", "B"]), SUBSCHEMAS, max_size=2))
    return root


@contextmanager
def no_connections() -> Iterator[list[Any]]:
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError(f"a connection to {address} was attempted")

    with mock.patch.object(socket.socket, "connect", refuse), mock.patch.object(socket.socket, "connect_ex", refuse):
        yield attempts


def exercise(schema: Any, answer: Any) -> None:
    """check -> convert -> validate, allowing only the service's own errors."""
    try:
        schemas.check_caller_schema(schema)
        strict = schemas.to_strict(schema)
    except InvalidSchema as err:
        assert isinstance(err, VlmError) and err.status == 400
        assert len(err.message) < 1_000
        return
    assert isinstance(strict.response_format(), dict)
    for run in (schemas.normalise, schemas.validate):
        try:
            out = run(schema, answer)
        except (InvalidSchema, schemas.AnswerTooLarge):
            continue
        if run is schemas.validate:
            assert isinstance(out, list) and all(isinstance(line, str) and len(line) < 1_000 for line in out)


@pytest.mark.timeout(120)
@FUZZ
@given(schema=caller_schemas(), answer=JSON)
def test_keyword_shaped_schemas(schema: dict[str, Any], answer: Any) -> None:
    with no_connections() as attempts:
        exercise(schema, answer)
    assert attempts == []


@pytest.mark.timeout(120)
@FUZZ
@given(schema=JSON, answer=JSON)
def test_arbitrary_json_as_schema(schema: Any, answer: Any) -> None:
    with no_connections() as attempts:
        exercise(schema, answer)
    assert attempts == []
