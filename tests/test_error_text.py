"""No exception or upstream text reaches a caller: our own words in the error, the rest in the log."""

from __future__ import annotations

import json
import logging

import pytest

from shared import schemas
from shared.errors import InvalidSchema, ModelOutputInvalid, VlmError
from shared.model import ChatRequest, ChatResult, ModelRouter
from shared.settings import Settings
from shared.tasks import TaskInput, run_task
from tests.constants import TEST_DEPLOYMENT
from tests.fakes import Reply, ScriptedModel

SECRET = "SECRET-caller-text-7f3a"  # what an upstream or an exception could echo: never in an error body
ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}
REQ = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=50, estimated_tokens=60)


def _body(err: VlmError) -> str:
    return json.dumps(err.to_dict())


def _upstream(status: int, message: str, **fields: str) -> Reply:
    return Reply(status, {"error": {"message": message, **fields}})


@pytest.mark.parametrize(
    "reply",
    [
        _upstream(400, f"Invalid image data: {SECRET}", code="invalid_request_error"),
        _upstream(400, f"Invalid schema for response_format 'result': {SECRET}", param="response_format"),
        _upstream(400, f"response_format json_schema is not supported {SECRET}", param="response_format"),
        _upstream(413, f"too large {SECRET}"),
        _upstream(422, f"unprocessable {SECRET}"),
        _upstream(429, f"Rate limit exceeded {SECRET}"),
        _upstream(500, f"The server had an error {SECRET}"),
        _upstream(503, f"Service unavailable {SECRET}"),
        _upstream(504, f"Gateway timeout {SECRET}"),
        Reply(200, f"<html>{SECRET}</html>"),  # a 200 whose body is not a completion
        Reply(exception=ValueError(f"exploded {SECRET}")),
    ],
    ids=["400", "400-schema", "400-format", "413", "422", "429", "500", "503", "504", "200-garbage", "raised"],
)
async def test_upstream_and_exception_text_is_logged_not_returned(
    reply: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    model = ScriptedModel(script={TEST_DEPLOYMENT: [reply]})
    router = ModelRouter(Settings.from_env(ENV), client_factory=model.client_factory())
    with caplog.at_level(logging.WARNING, logger="shared.model"), pytest.raises(VlmError) as info:
        await router.complete(REQ)
    assert SECRET not in _body(info.value)
    assert info.value.message  # a message of ours, not an empty one
    if reply.status != 200 and reply.exception is None:
        assert SECRET in caplog.text  # the operator still sees what the endpoint said


class Answer:
    """A ChatBackend answering every request with one fixed content."""

    def __init__(self, content: str) -> None:
        self.content = content

    async def complete(self, request: ChatRequest) -> ChatResult:
        return ChatResult(self.content, "stop", 10, 5, TEST_DEPLOYMENT, TEST_DEPLOYMENT)


async def test_an_exception_while_checking_the_answer_is_not_echoed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise TypeError(f"internal detail {SECRET}")

    monkeypatch.setattr(schemas, "normalise", broken)
    strict = schemas.to_strict({"type": "object", "properties": {"n": {"type": "integer"}}})
    with caplog.at_level(logging.WARNING, logger="shared.tasks"), pytest.raises(ModelOutputInvalid) as info:
        await run_task(TaskInput(task="schema", images=[], schema=strict), Answer('{"n": 1}'))
    assert SECRET not in _body(info.value)
    assert info.value.details["errors"] == ["the answer could not be read as JSON matching the schema"]
    assert SECRET in caplog.text


async def test_an_answer_that_is_not_json_is_described_in_our_words() -> None:
    strict = schemas.to_strict({"type": "object", "properties": {"n": {"type": "integer"}}})
    with pytest.raises(ModelOutputInvalid) as info:
        await run_task(TaskInput(task="schema", images=[], schema=strict), Answer("no braces here"))
    [line] = info.value.details["errors"]
    assert line.startswith("no JSON object or array found in the model's answer")
    assert "Expecting value" not in line  # the json module's text


@pytest.mark.parametrize(
    ("schema", "path", "reason"),
    [
        ({"type": SECRET}, "/type", "must be one of array, boolean, integer, null, number, object, string"),
        ({"type": "object", "properties": {"a": {"minLength": -7}}}, "/properties/a/minLength", "must be at least 0"),
        ({"type": "object", "properties": {"a": {"pattern": 5}}}, "/properties/a/pattern", "must be of type string"),
        ({"type": "object", "required": SECRET}, "/required", "must be of type array"),
    ],
)
def test_a_schema_the_meta_schema_refuses_is_described_without_quoting_it(schema: dict, path: str, reason: str) -> None:
    with pytest.raises(InvalidSchema) as info:
        schemas.to_strict(schema)
    assert SECRET not in _body(info.value) and "-7" not in _body(info.value)
    assert info.value.details["path"] == path and info.value.details["reason"] == reason


async def test_content_filter_details_carry_only_identifier_like_categories() -> None:
    results = {
        "violence": {"filtered": True, "severity": "medium"},
        "hate": {"filtered": False, "severity": "safe"},
        f"Weird {SECRET}": {"filtered": True, "severity": "high"},
        "self_harm": {"filtered": True, "severity": f"x {SECRET}"},
        **{f"c{i:03d}": {"filtered": True, "severity": "low"} for i in range(500)},
    }
    body = {"error": {"message": SECRET, "code": "content_filter", "innererror": {"content_filter_result": results}}}
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(400, body)]})
    router = ModelRouter(Settings.from_env(ENV), client_factory=model.client_factory())
    with pytest.raises(VlmError) as info:
        await router.complete(REQ)
    categories = info.value.details["categories"]
    assert SECRET not in _body(info.value)
    assert categories["violence"] == {"severity": "medium", "filtered": True}
    assert categories["self_harm"] == {"severity": None, "filtered": True}
    assert "hate" not in categories and len(categories) <= 16


async def test_a_refusal_is_quoted_bounded() -> None:
    from shared.errors import Refused
    from tests.fakes import completion

    body = completion(None, refusal="I can't help with that. " * 2000)
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(200, body)]})
    router = ModelRouter(Settings.from_env(ENV), client_factory=model.client_factory())
    with pytest.raises(Refused) as info:
        await router.complete(REQ)
    assert info.value.message.startswith("the model refused: I can't help with that.")
    assert len(info.value.message) < 600
