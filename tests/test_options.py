"""The one options parser: same coercion and messages for HTTP fields, metadata and folder configs."""

from __future__ import annotations

import pytest

from shared.blob_job import InvalidTaskConfig, config_options
from shared.errors import InvalidRequest, InvalidSchema
from shared.options import OptionLimits, RequestOptions, check_known_keys, parse_labels, parse_options

LIMITS = OptionLimits()
SOURCES = ("http", "metadata", "a/b/_task.json")


def parse(fields: dict, source: str = "http", **limits) -> RequestOptions:
    return parse_options(
        fields,
        source=source,
        default_task="describe",
        default_detail="auto",
        limits=OptionLimits(**limits) if limits else LIMITS,
    )


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    ("raw", "expected"),
    [("on", True), ("Yes", True), ("1", True), ("true", True), (True, True), ("off", False), ("0", False), ("", False)],
)
def test_strips_words_mean_the_same_everywhere(source, raw, expected):
    assert parse({"strips": raw}, source).strips is expected


@pytest.mark.parametrize("source", SOURCES)
def test_string_fields_from_forms_and_metadata_are_coerced_alike(source):
    opts = parse(
        {
            "task": "classify",
            "labels": "cat, dog ,",
            "max_tokens": " 300 ",
            "detail": "LOW",
            "pages": "1-2, 4",
            "reasoning_effort": "minimal",
            "prompt": "Which animal?",
        },
        source,
    )
    assert opts == RequestOptions(
        task="classify",
        prompt="Which animal?",
        detail="low",
        labels=["cat", "dog"],
        max_tokens=300,
        pages="1-2,4",
        reasoning_effort="minimal",
    )


def test_defaults_and_a_schema_implies_the_schema_task():
    assert parse({}) == RequestOptions(task="describe")
    opts = parse({"schema": '{"type": "object"}'})
    assert opts.task == "schema" and opts.schema == {"type": "object"}


def test_a_schema_name_is_allowed_only_in_folder_configs():
    assert parse({"task": "invoice", "schema": "invoice-v2"}, "a/_task.json").schema == "invoice-v2"
    with pytest.raises(InvalidSchema):
        parse({"task": "invoice", "schema": "invoice-v2"}, "http")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": "lots"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 16_385}, "max_tokens"),
        ({"max_tokens": False}, "max_tokens"),
        ({"max_tokens": 12.0}, "max_tokens"),
        ({"max_tokens": float("inf")}, "max_tokens"),
        ({"max_tokens": "１２"}, "max_tokens"),  # full-width digits are digits to str.isdigit, not to us
        ({"max_tokens": 10**5000}, "max_tokens"),
        ({"pages": 3}, "pages"),
        ({"pages": "1-3;5"}, "pages"),
        ({"pages": "1," * 100}, "pages"),
        ({"strips": "maybe"}, "strips"),
        ({"strips": 2}, "strips"),
        ({"detail": 1}, "detail"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "p" * 20_001}, "prompt"),
        ({"task": ["ocr"]}, "task"),
        ({"task": "paint"}, "task"),
        ({"labels": ["a", 1]}, "labels"),
        ({"labels": ["a"] * 101}, "labels"),
        ({"labels": ["x" * 101]}, "labels"),
        ({"labels": "[" * 50_000}, "labels"),
        ({"labels": {"a": 1}}, "labels"),
        ({"reasoning_effort": "max"}, "reasoning_effort"),
        ({"reasoning_effort": 3}, "reasoning_effort"),
    ],
)
@pytest.mark.parametrize("source", SOURCES)
def test_bad_fields_name_the_field_and_the_source(fields, field, source):
    with pytest.raises(InvalidRequest) as info:
        parse(fields, source)
    err = info.value
    assert err.status == 400 and err.details["field"] == field
    assert err.message.startswith(field) and len(err.message) < 300
    assert (source in err.message) == (source != "http")


@pytest.mark.parametrize(
    "schema",
    [
        "[" * 100_000,
        "{" * 10_000,
        '{"a": ' * 70 + "1" + "}" * 70,
        {"a": {"b": {"c": 1}}},
        "[1, 2]",
        7,
        '{"x": 1e400}',
        '{"x": NaN}',
        "{bad",
        '{"description": "' + "d" * 70_000 + '"}',
    ],
)
def test_bad_schemas_are_invalid_schema_naming_the_field(schema):
    limits = {"max_json_depth": 2} if isinstance(schema, dict) else {}
    with pytest.raises(InvalidSchema) as info:
        parse({"schema": schema}, **limits)
    assert info.value.details["field"] == "schema" and len(info.value.message) < 200


def test_labels_in_every_form():
    assert parse_labels('["a", " b "]') == ["a", "b"]
    assert parse_labels("a,b") == ["a", "b"]
    assert parse_labels(["a"]) == ["a"]
    assert parse_labels("") is None and parse_labels(None) is None


def test_unknown_keys_are_listed_bounded():
    with pytest.raises(InvalidRequest) as info:
        check_known_keys({"task": "ocr", "colour": 1, "x" * 5000: 2}, "f/_task.json")
    assert "unknown keys: colour" in info.value.message and len(info.value.message) < 400


@pytest.mark.parametrize("source", ["metadata", "f/_task.json"])
def test_folder_config_errors_become_invalid_task_config_naming_the_field(source):
    with pytest.raises(InvalidTaskConfig) as info:
        config_options({"task": "ocr", "max_tokens": "lots"}, source, LIMITS, default_task="describe")
    err = info.value
    assert err.code == "invalid_task_config" and not err.transient
    assert err.details["field"] == "max_tokens" and source in err.message
