"""Strict structured-output conversion, answer validation and tolerant parsing (shared.schemas).

Every conversion case asserts the exact strict dict, and every strict dict produced here is
also checked against the strict rules themselves (closed objects, all properties required).
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest

from shared import schemas, task_schemas
from shared.errors import InvalidRequest, InvalidSchema
from shared.schemas import OPENAI_LIMITS, StrictSchema, to_strict

NULL = {"type": "null"}


def obj(props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A strict object: every property required, closed."""
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False, **extra}


def strict_rule_violations(schema: Any, path: str = "") -> list[str]:
    """Where a schema breaks the strict rules: every object closed and requiring all its properties."""
    found: list[str] = []
    if isinstance(schema, dict):
        t = schema.get("type")
        if t == "object" or (isinstance(t, list) and "object" in t):
            if schema.get("additionalProperties") is not False:
                found.append(f"{path}: additionalProperties is not false")
            if schema.get("required") != list(schema.get("properties", {})):
                found.append(f"{path}: required != all properties")
            if not schema.get("properties"):
                found.append(f"{path}: object without properties")
        for key in ("allOf", "oneOf", "not", "if", "then", "else", "definitions", "format", "pattern", "minimum"):
            if key in schema:
                found.append(f"{path}: unsupported keyword {key}")
        for key, value in schema.items():
            if key in ("enum", "const", "description", "title"):
                continue
            found.extend(strict_rule_violations(value, f"{path}/{key}"))
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found.extend(strict_rule_violations(value, f"{path}/{i}"))
    return found


def strict_of(schema: dict[str, Any], **kw: Any) -> StrictSchema:
    result = to_strict(schema, **kw)
    assert strict_rule_violations(result.schema) == []
    assert result.schema.get("type") == "object", "the strict root must be an object"
    return result


# --- conversion: exact outputs ---------------------------------------------------------------------

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "flat_required_and_optional",
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name"],
        },
        obj({"name": {"type": "string"}, "age": {"type": ["integer", "null"]}}),
    ),
    (
        "nested_objects",
        {
            "type": "object",
            "properties": {
                "person": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "address": {
                            "type": "object",
                            "description": "Home",
                            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                            "required": ["city"],
                        },
                    },
                    "required": ["name"],
                }
            },
            "required": ["person"],
        },
        obj(
            {
                "person": obj(
                    {
                        "name": {"type": "string"},
                        "address": {
                            "anyOf": [obj({"city": {"type": "string"}, "zip": {"type": ["string", "null"]}}), NULL],
                            "description": "Home",
                        },
                    }
                )
            }
        ),
    ),
    (
        "array_of_objects",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "number"}},
                        "required": ["sku", "qty"],
                    },
                }
            },
            "required": ["items"],
        },
        obj({"items": {"type": "array", "items": obj({"sku": {"type": "string"}, "qty": {"type": "number"}})}}),
    ),
    (
        "optional_array_of_strings",
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}},
        obj({"tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, NULL]}}),
    ),
    (
        "enums_required_and_optional",
        {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["open", "paid"]},
                "priority": {"enum": ["low", "high"], "description": "Urgency"},
            },
            "required": ["status"],
        },
        obj(
            {
                "status": {"type": "string", "enum": ["open", "paid"]},
                "priority": {"anyOf": [{"type": "string", "enum": ["low", "high"]}, NULL], "description": "Urgency"},
            }
        ),
    ),
    (
        "defs_and_refs",
        {
            "type": "object",
            "properties": {
                "home": {"$ref": "#/$defs/Address", "description": "Where they live"},
                "work": {"$ref": "#/$defs/Address"},
            },
            "required": ["work"],
            "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        },
        obj(
            {
                "home": {"anyOf": [{"$ref": "#/$defs/Address"}, NULL], "description": "Where they live"},
                "work": {"$ref": "#/$defs/Address"},
            },
            **{"$defs": {"Address": obj({"city": {"type": "string"}})}},
        ),
    ),
    (
        "null_already_present_is_not_added_twice",
        {
            "type": "object",
            "properties": {
                "a": {"type": ["string", "null"]},
                "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "c": {"type": ["string", "null"], "enum": ["x", None]},
                "d": {"type": ["string", "null"], "enum": ["x", "y"]},
            },
        },
        obj(
            {
                "a": {"type": ["string", "null"]},
                "b": {"anyOf": [{"type": "integer"}, NULL]},
                "c": {"type": ["string", "null"], "enum": ["x", None]},
                # null in `type` but not in `enum` still rejects null: the enum gets it too.
                "d": {"type": ["string", "null"], "enum": ["x", "y", None]},
            }
        ),
    ),
    (
        "type_lists",
        {
            "type": "object",
            "properties": {
                "cell": {"type": ["string", "number"]},
                "maybe_cell": {"type": ["string", "number"]},
                "maybe_obj": {"type": ["object", "null"], "properties": {"k": {"type": "string"}}, "required": ["k"]},
            },
            "required": ["cell", "maybe_obj"],
        },
        obj(
            {
                "cell": {"anyOf": [{"type": "string"}, {"type": "number"}]},
                "maybe_cell": {"anyOf": [{"type": "string"}, {"type": "number"}, NULL]},
                "maybe_obj": {"anyOf": [obj({"k": {"type": "string"}}), NULL]},
            }
        ),
    ),
    (
        "unsupported_keywords_without_description",
        {
            "type": "object",
            "properties": {
                "day": {"type": "string", "format": "date", "minLength": 10},
                "n": {"type": "integer", "minimum": 0, "maximum": 9, "multipleOf": 3, "default": 3},
                "list": {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": True},
            },
            "required": ["day", "n", "list"],
        },
        obj(
            {
                "day": {"type": "string", "description": "format: date; minLength: 10"},
                "n": {"type": "integer", "description": "minimum: 0; maximum: 9; multipleOf: 3; default: 3"},
                "list": {"type": "array", "items": {"type": "string"}, "description": "minItems: 1; uniqueItems: true"},
            }
        ),
    ),
    (
        "unsupported_keywords_with_description",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Currency", "pattern": "^[A-Z]{3}$", "examples": ["EUR"]},
                "when": {"type": "string", "description": "Due", "format": "date-time"},
            },
            "required": ["code"],
        },
        obj(
            {
                "code": {"type": "string", "description": 'Currency (pattern: ^[A-Z]{3}$; examples: ["EUR"])'},
                "when": {"type": ["string", "null"], "description": "Due (format: date-time)"},
            }
        ),
    ),
    (
        "array_root_wrapped",
        {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}},
        obj({"value": {"type": "array", "items": obj({"x": {"type": ["number", "null"]}})}}),
    ),
    (
        "string_root_wrapped",
        {"type": "string", "maxLength": 5, "description": "A code"},
        obj({"value": {"type": "string", "description": "A code (maxLength: 5)"}}),
    ),
    (
        "definitions_become_defs",
        {
            "type": "object",
            "properties": {"owner": {"$ref": "#/definitions/Person"}},
            "required": ["owner"],
            "definitions": {"Person": {"type": "object", "properties": {"name": {"type": "string"}}}},
        },
        obj(
            {"owner": {"$ref": "#/$defs/Person"}},
            **{"$defs": {"Person": obj({"name": {"type": ["string", "null"]}})}},
        ),
    ),
    (
        "one_of_becomes_any_of_and_branches_are_closed",
        {
            "type": "object",
            "properties": {
                "id": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                "shape": {
                    "anyOf": [
                        {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"]},
                        {"type": "object", "properties": {"w": {"type": "number"}, "h": {"type": "number"}}},
                    ]
                },
            },
            "required": ["id", "shape"],
        },
        obj(
            {
                "id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "shape": {
                    "anyOf": [
                        obj({"r": {"type": "number"}}),
                        obj({"w": {"type": ["number", "null"]}, "h": {"type": ["number", "null"]}}),
                    ]
                },
            }
        ),
    ),
    (
        "single_all_of_inlined",
        {
            "type": "object",
            "properties": {"a": {"allOf": [{"$ref": "#/$defs/A"}], "description": "The A"}},
            "required": ["a"],
            "$defs": {"A": {"type": "string", "enum": ["x"]}},
        },
        obj(
            {"a": {"$ref": "#/$defs/A", "description": "The A"}},
            **{"$defs": {"A": {"type": "string", "enum": ["x"]}}},
        ),
    ),
    (
        "additional_properties_closed_with_note",
        {
            "type": "object",
            "properties": {
                "meta": {"type": "object", "properties": {"k": {"type": "string"}}, "additionalProperties": True}
            },
            "required": ["meta"],
            "additionalProperties": {"type": "string"},
        },
        obj(
            {"meta": obj({"k": {"type": ["string", "null"]}}, description="additionalProperties: not supported")},
            description="additionalProperties: not supported",
        ),
    ),
    (
        "root_ref_resolved_and_recursion_kept",
        {
            "$ref": "#/$defs/Node",
            "$defs": {
                "Node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                    },
                    "required": ["name", "children"],
                }
            },
        },
        obj(
            {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            **{
                "$defs": {
                    "Node": obj(
                        {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}
                    )
                }
            },
        ),
    ),
    (
        "meta_keywords_dropped_title_kept",
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://example.com/s",
            "$comment": "internal",
            "title": "Thing",
            "type": "object",
            "properties": {"x": {"type": "boolean", "x-custom": 1}},
            "required": ["x"],
        },
        obj({"x": {"type": "boolean"}}, title="Thing"),
    ),
    (
        "const_and_untyped_enums",
        {
            "type": "object",
            "properties": {
                "kind": {"const": "invoice"},
                "level": {"enum": ["a", 1, None]},
                "ratio": {"enum": [1, 2.5]},
            },
            "required": ["level", "ratio"],
        },
        obj(
            {
                "kind": {"anyOf": [{"type": "string", "const": "invoice"}, NULL]},
                "level": {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "integer", "enum": [1]}, NULL]},
                "ratio": {"type": "number", "enum": [1, 2.5]},
            }
        ),
    ),
    (
        "unused_defs_dropped",
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/Used"}},
            "required": ["a"],
            "$defs": {"Used": {"type": "string"}, "Unused": {"type": "object"}},
        },
        obj({"a": {"$ref": "#/$defs/Used"}}, **{"$defs": {"Used": {"type": "string"}}}),
    ),
    (
        "root_recursion_kept",
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "parent": {"$ref": "#"}},
            "required": ["name"],
        },
        obj({"name": {"type": "string"}, "parent": {"anyOf": [{"$ref": "#"}, NULL]}}),
    ),
]


@pytest.mark.parametrize(("caller", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_to_strict_exact(caller: dict[str, Any], expected: dict[str, Any]) -> None:
    before = copy.deepcopy(caller)
    result = strict_of(caller)
    assert result.schema == expected
    assert result.original == caller
    assert caller == before, "to_strict must not mutate its input"
    assert result.wrapped == (caller.get("type") in ("array", "string"))


def test_strict_schema_shares_nothing_with_the_input() -> None:
    caller = {"type": "object", "properties": {"e": {"type": "string", "enum": ["a"]}}, "required": ["e"]}
    result = to_strict(caller)
    result.schema["properties"]["e"]["enum"].append("b")
    result.original["properties"]["e"]["enum"].append("c")
    assert caller["properties"]["e"]["enum"] == ["a"]


def test_wrapped_root_unwrap() -> None:
    strict = to_strict({"type": "array", "items": {"type": "string"}})
    assert strict.wrapped
    assert schemas.unwrap(strict, {"value": ["a", "b"]}) == ["a", "b"]
    # Lenient: a bare value (json_object fallback) passes through for validation to judge.
    assert schemas.unwrap(strict, ["a"]) == ["a"]
    plain = to_strict({"type": "object", "properties": {"value": {"type": "string"}}})
    assert not plain.wrapped
    assert schemas.unwrap(plain, {"value": "x"}) == {"value": "x"}


def test_response_format_and_name() -> None:
    strict = to_strict({"type": "string"}, name="my schema.json")
    assert strict.name == "my_schema_json"
    assert strict.response_format() == {
        "type": "json_schema",
        "json_schema": {"name": "my_schema_json", "schema": strict.schema, "strict": True},
    }


# --- conversion: limits and rejections -------------------------------------------------------------


def chain(levels: int) -> dict[str, Any]:
    """Objects nested `levels` deep: root -> l1 -> ... -> l<levels>, a string leaf."""
    schema: dict[str, Any] = {"type": "string"}
    for i in range(levels, 0, -1):
        schema = {"type": "object", "properties": {f"l{i}": schema}, "required": [f"l{i}"]}
    return schema


def test_five_levels_are_accepted() -> None:
    strict_of(chain(5))


def test_six_levels_rejected_naming_the_path() -> None:
    with pytest.raises(InvalidSchema) as info:
        to_strict(chain(6))
    path = "/properties/l1/properties/l2/properties/l3/properties/l4/properties/l5/properties/l6"
    assert info.value.status == 400
    assert info.value.details == {"path": path, "via": [], "depth": 6, "limit": 5}
    assert path in info.value.message


def test_depth_counts_through_refs_and_arrays() -> None:
    def row(leaf: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": {"cells": {"type": "array", "items": {"type": "array", "items": leaf}}}}

    def table(leaf: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"rows": {"type": "array", "items": {"$ref": "#/$defs/Row"}}},
            "$defs": {"Row": row(leaf)},
        }

    # rows(1) / item(2) -> Row: cells(3) / item(4) / item(5): exactly 5 levels.
    strict_of(table({"type": "string"}))
    with pytest.raises(InvalidSchema) as info:
        to_strict(table({"type": "object", "properties": {"v": {"type": "string"}}}))
    assert info.value.details == {
        "path": "/$defs/Row/properties/cells/items/items/properties/v",
        "via": ["/properties/rows/items"],
        "depth": 6,
        "limit": 5,
    }
    assert "reached via $ref at /properties/rows/items" in info.value.message


def test_wrapping_counts_as_a_level() -> None:
    # An array of 4-level objects is 5 levels deep; the {"value": ...} wrapper makes it 6.
    with pytest.raises(InvalidSchema, match="wrapper") as info:
        to_strict({"type": "array", "items": chain(4)})
    assert info.value.details["path"] == "/items/properties/l1/properties/l2/properties/l3/properties/l4"
    strict_of({"type": "array", "items": chain(3)})


def test_openai_limits_allow_deeper_schemas() -> None:
    strict_of(chain(6), limits=OPENAI_LIMITS)


def test_100_properties_accepted_101_rejected() -> None:
    props = {f"p{i}": {"type": "string"} for i in range(100)}
    strict_of({"type": "object", "properties": props})
    props["p100"] = {"type": "string"}
    with pytest.raises(InvalidSchema) as info:
        to_strict({"type": "object", "properties": props})
    assert info.value.details == {"path": "/properties/p100", "count": 101, "limit": 100}
    assert "/properties/p100" in info.value.message


def test_too_many_enum_values() -> None:
    schema = {"type": "object", "properties": {"e": {"type": "integer", "enum": list(range(501))}}, "required": ["e"]}
    with pytest.raises(InvalidSchema) as info:
        to_strict(schema)
    assert info.value.details["path"] == "/properties/e/enum"


@pytest.mark.parametrize(
    ("schema", "path", "words"),
    [
        ({"type": 5}, "/type", "not a valid JSON Schema"),
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "/properties/a/type", "not a valid JSON Schema"),
        ({}, "", "any value"),
        ({"type": "object"}, "", "free-form map"),
        (
            {"type": "object", "properties": {"m": {"type": "object", "additionalProperties": {"type": "number"}}}},
            "/properties/m",
            "map",
        ),
        ({"type": "object", "properties": {"a": {"type": "array"}}}, "/properties/a", "without `items`"),
        ({"type": "object", "properties": {"a": True}}, "/properties/a", "any value"),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]},
            "/required",
            "not defined",
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/x.json"}}},
            "/properties/a/$ref",
            "must be a JSON pointer within this schema",
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
            "/properties/a/$ref",
            "names nothing in this schema",
        ),
        (
            {"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"minLength": 1}]}}},
            "/properties/a/allOf",
            "allOf` with 2",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{"type": "string"}]}}},
            "/properties/a/prefixItems",
            "tuple",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/A", "type": "string"}},
                "$defs": {"A": {"type": "string"}},
            },
            "/properties/a",
            "combined with",
        ),
        ({"type": "array", "items": {"$ref": "#"}}, "/items/$ref", "recursive"),
    ],
)
def test_rejections_name_the_path(schema: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(InvalidSchema) as info:
        to_strict(schema)
    assert info.value.code == "invalid_schema"
    assert info.value.details["path"] == path
    assert words in info.value.message


@pytest.mark.parametrize("bad", [[], "schema", 3, None])
def test_non_dict_schema_rejected(bad: Any) -> None:
    with pytest.raises(InvalidSchema, match="must be a JSON object"):
        to_strict(bad)


def test_check_caller_schema_accepts_other_drafts() -> None:
    schemas.check_caller_schema(
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "definitions": {}, "properties": {}}
    )
    with pytest.raises(InvalidSchema) as info:
        schemas.check_caller_schema({"type": "object", "required": "a"})
    assert info.value.details["path"] == "/required"


# --- validation and null pruning ------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "nickname": {"type": ["string", "null"]},
        "address": {"$ref": "#/$defs/Address"},
        "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
    },
    "required": ["name"],
    "$defs": {
        "Address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
        "Pet": {
            "type": "object",
            "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "number"}},
            "required": ["kind"],
        },
    },
}


def test_optional_nulls_are_dropped_and_the_answer_validates() -> None:
    answer = {
        "name": "Ada",
        "age": None,
        "nickname": None,
        "address": {"city": "Paris", "zip": None},
        "pets": [{"kind": "cat", "age": None}, {"kind": "dog", "age": 3}],
    }
    before = copy.deepcopy(answer)
    expected = {
        "name": "Ada",
        "nickname": None,  # the original allows null here, so it stays
        "address": {"city": "Paris"},
        "pets": [{"kind": "cat"}, {"kind": "dog", "age": 3}],
    }
    assert schemas.prune_nulls(PERSON, answer) == expected
    assert schemas.normalise(PERSON, answer) == expected
    assert schemas.validate(PERSON, answer) == []
    assert answer == before, "pruning must not mutate the answer"


def test_required_null_is_an_error() -> None:
    assert schemas.validate(PERSON, {"name": None}) == ["/name: None is not of type 'string'"]
    assert schemas.validate(PERSON, {"name": "x", "address": {"city": None}}) == [
        "/address/city: None is not of type 'string'"
    ]


def test_null_optional_whole_object_dropped() -> None:
    assert schemas.normalise(PERSON, {"name": "x", "address": None, "pets": None}) == {"name": "x"}


def test_errors_are_readable_with_paths() -> None:
    answer = {"name": "Ada", "age": -1, "pets": [{"kind": "cow"}], "extra": 1}
    assert schemas.validate(PERSON, answer) == [
        "/age: -1 is less than the minimum of 0",
        "/pets/0/kind: 'cow' is not one of ['cat', 'dog']",
    ]
    assert schemas.validate(PERSON, {"age": 3}) == ["(root): 'name' is a required property"]


def test_null_pruning_inside_unions() -> None:
    schema = {
        "type": "object",
        "properties": {
            "v": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                        "required": ["a"],
                    },
                    {"type": "string"},
                ]
            }
        },
        "required": ["v"],
    }
    assert schemas.normalise(schema, {"v": {"a": "x", "b": None}}) == {"v": {"a": "x"}}
    assert schemas.validate(schema, {"v": {"a": "x", "b": None}}) == []


def test_union_error_names_the_closest_branch() -> None:
    schema = {"type": "object", "properties": {"v": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}
    [line] = schemas.validate(schema, {"v": 1.5})
    assert line.startswith("/v: 1.5 is not valid under any of the given schemas (closest: /v: ")


def test_format_is_checked() -> None:
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}
    assert schemas.validate(schema, {"d": "2024-03-01"}) == []
    assert schemas.validate(schema, {"d": "1 March 2024"}) == ["/d: '1 March 2024' is not a 'date'"]
    assert schemas.validate(schema, {"d": "1 March 2024"}, check_formats=False) == []


def test_wrapped_round_trip() -> None:
    original = {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}}
    strict = strict_of(original)
    answer = schemas.unwrap(strict, {"value": [{"x": None}, {"x": 2}]})
    assert schemas.normalise(original, answer) == [{}, {"x": 2}]
    assert schemas.validate(original, answer) == []


# --- tolerant parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  [1, 2]\n", [1, 2]),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('Here you go:\n```\n{"a": [1, 2]}\n```\nAnything else?', {"a": [1, 2]}),
        ('Sure! The result is {"a": {"b": 2}} as requested.', {"a": {"b": 2}}),
        ('{"s": "a } and { and ] \\" quote", "t": [1]} trailing }', {"s": 'a } and { and ] " quote', "t": [1]}),
        ('Use {braces} like this: {"ok": true}', {"ok": True}),
        ('prefix [{"x": "]"}] suffix', [{"x": "]"}]),
        ('\ufeff{"a": 1}', {"a": 1}),
    ],
)
def test_parse_json_tolerant(text: str, expected: Any) -> None:
    assert schemas.parse_json_tolerant(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "no json here", "{unclosed", '{"a": NaN}', "{'single': 'quotes'}"])
def test_parse_json_tolerant_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"JSON|empty"):
        schemas.parse_json_tolerant(text)


def test_parse_json_tolerant_is_not_quadratic_on_garbage() -> None:
    text = "{" * 20_000 + "nothing"
    start = time.perf_counter()
    with pytest.raises(ValueError):
        schemas.parse_json_tolerant(text)
    assert time.perf_counter() - start < 5


# --- built-in task schemas ------------------------------------------------------------------------

REALISTIC_INVOICE = {
    "vendor": {
        "name": "Müller Bürobedarf GmbH",
        "address": "Hauptstr. 5, 10115 Berlin, Germany",
        "tax_id": "DE123456789",
    },
    "customer": {"name": "Acme Ltd", "address": None},
    "invoice_number": "RE-2024-0042",
    "invoice_date": "2024-03-01",
    "due_date": None,
    "line_items": [
        {"description": "A4 paper, 500 sheets", "quantity": 10, "unit_price": 4.99, "total": 49.9},
        {"description": "Delivery", "quantity": None, "unit_price": None, "total": 5.0},
    ],
    "subtotal": 54.9,
    "tax": 10.43,
    "total": 65.33,
    "currency": "EUR",
}


def test_invoice_schema_is_within_limits_and_strict() -> None:
    schemas.check_caller_schema(task_schemas.INVOICE_SCHEMA)
    strict = strict_of(task_schemas.INVOICE_SCHEMA, name="invoice")
    assert not strict.wrapped
    line = strict.schema["properties"]["line_items"]["items"]["properties"]["total"]
    assert line == {"type": ["number", "null"], "description": "Line total as a number, without currency symbol"}
    assert strict.schema["properties"]["invoice_date"] == {
        "type": ["string", "null"],
        "description": "Issue date, ISO 8601 (YYYY-MM-DD) (format: date)",
    }


def test_realistic_invoice_validates_and_keeps_its_nulls() -> None:
    assert schemas.validate(task_schemas.INVOICE_SCHEMA, REALISTIC_INVOICE) == []
    assert schemas.normalise(task_schemas.INVOICE_SCHEMA, REALISTIC_INVOICE) == REALISTIC_INVOICE


def test_invoice_errors() -> None:
    bad = copy.deepcopy(REALISTIC_INVOICE)
    bad["currency"] = "€"
    bad["invoice_date"] = "01.03.2024"
    bad["line_items"][0]["total"] = "49,90 €"
    del bad["tax"]
    assert schemas.validate(task_schemas.INVOICE_SCHEMA, bad) == [
        "(root): 'tax' is a required property",
        "/currency: '€' does not match '^[A-Z]{3}$'",
        "/invoice_date: '01.03.2024' is not a 'date'",
        "/line_items/0/total: '49,90 €' is not of type 'number', 'null'",
    ]


def test_table_schema() -> None:
    strict = strict_of(task_schemas.TABLE_SCHEMA, name="table")
    assert strict.schema["properties"]["rows"]["items"] == {
        "type": "array",
        "items": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
    }
    answer = {"columns": ["Item", "Qty"], "rows": [["Paper", 10], ["Toner", None]]}
    assert schemas.validate(task_schemas.TABLE_SCHEMA, answer) == []


def test_classify_schema_exact_strict() -> None:
    strict = strict_of(task_schemas.classify_schema(["cat", "dog"]))
    assert strict.schema == {
        "type": "object",
        "title": "Classification",
        "properties": {
            "label": {
                "type": "string",
                "enum": ["cat", "dog"],
                "description": "The one label that best fits the image",
            },
            "confidence": {
                "type": "number",
                "description": "How sure you are that the label is right, from 0 to 1 (minimum: 0; maximum: 1)",
            },
        },
        "required": ["label", "confidence"],
        "additionalProperties": False,
    }
    original = task_schemas.classify_schema(["cat", "dog"])
    assert schemas.validate(original, {"label": "cat", "confidence": 0.9}) == []
    assert schemas.validate(original, {"label": "cow", "confidence": 1.5}) == [
        "/confidence: 1.5 is greater than the maximum of 1",
        "/label: 'cow' is not one of ['cat', 'dog']",
    ]


def test_classify_accepts_100_labels_within_limits() -> None:
    labels = [f"label-{i:03d}-" + "x" * 90 for i in range(100)]
    assert all(len(label) == 100 for label in labels)
    strict_of(task_schemas.classify_schema(labels))


@pytest.mark.parametrize(
    "labels",
    [[], ["a", "a"], ["a", " "], ["a", ""], ["a", 3], "a,b", [f"l{i}" for i in range(101)], ["x" * 101]],
)
def test_classify_schema_rejects_bad_labels(labels: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        task_schemas.classify_schema(labels)
    assert info.value.status == 400
    assert info.value.details["field"] == "labels"


def test_prompts_and_messages() -> None:
    assert "YYYY-MM-DD" in task_schemas.INVOICE_PROMPT and "null" in task_schemas.INVOICE_PROMPT
    assert "invent" in task_schemas.TABLE_PROMPT and "invent" in task_schemas.SCHEMA_PROMPT
    assert "- cat\n- dog" in task_schemas.classify_prompt(["cat", "dog"])
    msg = task_schemas.reask_message(["/a: 1 is not of type 'string'", "(root): 'b' is a required property"])
    assert msg.startswith("Your previous answer did not match the schema:\n- /a: 1 is not of type 'string'\n")
    assert "Return a corrected JSON object" in msg
    assert "and 5 more" in task_schemas.reask_message([f"e{i}" for i in range(25)])
    strict = to_strict(task_schemas.TABLE_SCHEMA)
    for given in (strict, strict.schema):
        text = task_schemas.json_object_instructions(given)
        assert json.dumps(strict.schema, ensure_ascii=False, separators=(",", ":")) in text
        assert "Return only a JSON object" in text and "JSON" in text
