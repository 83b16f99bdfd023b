"""Fakes below the SDK: a scripted HTTP transport, so the openai SDK parses real responses into real types."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
from openai import AsyncOpenAI

from shared.settings import ModelTarget
from tests.constants import TEST_MODEL_VERSION


def completion(content: Any = "ok", *, finish_reason: str = "stop", model: str = TEST_MODEL_VERSION, **extra) -> dict:
    text = content if content is None or isinstance(content, str) else json.dumps(content)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": extra.pop("refusal", None)},
        "finish_reason": finish_reason,
    }
    if "content_filter_results" in extra:
        choice["content_filter_results"] = extra.pop("content_filter_results")
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": extra.pop("prompt_tokens", 100), "completion_tokens": 10, "total_tokens": 110},
    }


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=completion)
    headers: dict[str, str] = field(default_factory=dict)
    exception: Exception | None = None


@dataclass
class ScriptedModel:
    """Answers each request with the next scripted reply for its deployment (the last one repeats)."""

    script: dict[str, list[Reply]] = field(default_factory=dict)
    default: Callable[[dict], Reply] = lambda body: Reply()
    requests: list[dict] = field(default_factory=list)

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        queue = self.script.get(body["model"])
        reply = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else self.default(body)
        if reply.exception is not None:
            raise reply.exception
        return httpx2.Response(reply.status, json=reply.body, headers=reply.headers)

    def calls_to(self, deployment: str) -> int:
        return sum(1 for r in self.requests if r["model"] == deployment)

    def client_factory(self, max_retries: int = 0) -> Callable[[ModelTarget, dict], AsyncOpenAI]:
        def make(target: ModelTarget, hooks: dict) -> AsyncOpenAI:
            http = httpx2.AsyncClient(transport=httpx2.MockTransport(self.handler), event_hooks=hooks)
            return AsyncOpenAI(base_url=target.endpoint, api_key="test", max_retries=max_retries, http_client=http)

        return make
