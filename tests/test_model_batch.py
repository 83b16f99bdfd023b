"""The local model server's Batch API (local/model_batch.py), driven by the real openai SDK.

One in-process server (facts mode: no OCR) per module; each test starts from /admin/reset. Jobs
run in the background; `wait_for` polls `batches.retrieve` a bounded number of times.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from local.model_server import SERVER_KEY, ModelServerConfig, build_app

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def png(size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(text: str, model: str = "gpt-batch", image: bool = True) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        parts.append({"type": "image_url", "image_url": {"url": png(), "detail": "low"}})
    return {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 200}


def line(cid: str, body: dict[str, Any], url: str = "/chat/completions") -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def read_jsonl(data: bytes) -> dict[str, dict[str, Any]]:
    return {x["custom_id"]: x for x in (json.loads(r) for r in data.splitlines() if r.strip())}


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[TestServer]:
    srv = TestServer(build_app(ModelServerConfig(mode="facts", seed=1)), host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


@pytest.fixture
async def admin(server: TestServer) -> AsyncIterator[Callable[..., Any]]:
    token = server.app[SERVER_KEY].config.admin_token
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:

        async def call(path: str, body: dict[str, Any] | None = None, method: str = "POST", status: int = 200) -> Any:
            async with session.request(method, base + path, json=body if method == "POST" else None) as resp:
                assert resp.status == status, await resp.text()
                return await resp.json()

        await call("/admin/reset", {})
        yield call


@pytest.fixture
async def client(server: TestServer, admin: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/openai/v1", api_key="x", max_retries=0)
    yield c
    await c.close()


async def upload(client: openai.AsyncOpenAI, lines: list[dict[str, Any]]) -> str:
    f = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(jsonl(lines))
    return f.id


async def submit(client: openai.AsyncOpenAI, lines: list[dict[str, Any]]) -> Any:
    fid = await upload(client, lines)
    return await client.batches.create(input_file_id=fid, endpoint="/chat/completions", completion_window="24h")


async def wait_for(client: openai.AsyncOpenAI, batch_id: str, states: set[str] = TERMINAL) -> Any:
    for _ in range(2000):
        b = await client.batches.retrieve(batch_id)
        if b.status in states:
            return b
        await asyncio.sleep(0.01)
    raise AssertionError(f"batch {batch_id} never reached {states}")


async def content(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    assert file_id is not None
    return read_jsonl((await client.files.content(file_id)).content)


# ------------------------------------------------------------------------------- lifecycle


async def test_lifecycle_answers_each_line_once_like_the_chat_route(client: openai.AsyncOpenAI, admin: Any) -> None:
    bodies = {f"r{i}": chat_body(f"Describe picture {i}.") for i in range(3)}
    batch = await submit(client, [line(cid, b) for cid, b in bodies.items()])
    assert batch.status == "validating" and batch.completion_window == "24h" and batch.endpoint == "/chat/completions"
    done = await wait_for(client, batch.id)
    assert done.status == "completed"
    assert (await client.files.content(done.error_file_id)).content == b""  # Azure: an empty error file
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 3, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    out = await content(client, done.output_file_id)
    assert set(out) == set(bodies)
    online = await client.chat.completions.create(**bodies["r1"])  # the same body, asked online
    answer = out["r1"]["response"]
    assert answer["status_code"] == 200 and out["r1"]["error"] is None
    assert answer["body"]["object"] == "chat.completion"
    assert answer["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content
    assert answer["body"]["usage"]["prompt_tokens"] == online.usage.prompt_tokens
    stats = await admin("/stats", method="GET")
    assert stats["batch"] == {"answered": 3, "failed": 0, "repeated_custom_ids": 0}
    assert stats["completed"] == 4  # three batch lines and the one online request
    listed = await client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]
    meta = await client.files.retrieve(done.output_file_id)
    assert meta.purpose == "batch_output"
    await client.files.delete(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(batch.input_file_id)


async def test_list_pages_with_after_and_limit(client: openai.AsyncOpenAI) -> None:
    ids = [(await submit(client, [line("a", chat_body("x", image=False))])).id for _ in range(3)]
    first = await client.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    rest = await client.batches.list(limit=2, after=first.data[-1].id)
    assert not rest.has_more
    assert {b.id for b in first.data} | {b.id for b in rest.data} == set(ids)
    for i in ids:
        await wait_for(client, i)


# ----------------------------------------------------------------------------------- quota


async def test_enqueued_token_quota_fails_a_job_that_would_exceed_it(client: openai.AsyncOpenAI, admin: Any) -> None:
    lines = [line(f"q{i}", chat_body(f"Invoice {i}?")) for i in range(2)]
    await admin("/admin/batch", {"enqueued_tokens": 10})
    failed = await wait_for(client, (await submit(client, lines)).id)
    assert failed.status == "failed" and failed.output_file_id is None
    assert [e.code for e in failed.errors.data] == ["token_limit_exceeded"]
    assert "10" in failed.errors.data[0].message
    stats = await admin("/stats", method="GET")
    assert stats["batch"]["answered"] == 0  # nothing was answered, nothing billed

    # a quota that holds one job: a second job submitted while the first waits is refused, the first completes
    await admin("/admin/batch", {"enqueued_tokens": 200, "turnaround_s": 60})
    first = await submit(client, lines)
    await wait_for(client, first.id, {"in_progress"})
    second = await wait_for(client, (await submit(client, lines)).id)
    assert second.status == "failed" and second.errors.data[0].code == "token_limit_exceeded"
    await admin(f"/admin/batches/{first.id}", {"action": "cancel", "after": 2})
    assert (await wait_for(client, first.id)).status == "cancelled"


async def test_fail_fast_quota_refuses_the_create(client: openai.AsyncOpenAI, admin: Any) -> None:
    """Azure's "fail fast" regions answer the create itself with 400 token_limit_exceeded."""
    await admin("/admin/batch", {"enqueued_tokens": 10, "fail_fast": True})
    fid = await upload(client, [line("a", chat_body("Invoice?"))])
    with pytest.raises(openai.BadRequestError) as exc:
        await client.batches.create(input_file_id=fid, endpoint="/chat/completions", completion_window="24h")
    assert exc.value.code == "token_limit_exceeded"
    assert (await client.batches.list()).data == []  # no job was created
    await admin("/admin/batch", {"enqueued_tokens": 100_000})
    done = await wait_for(
        client,
        (await client.batches.create(input_file_id=fid, endpoint="/chat/completions", completion_window="24h")).id,
    )
    assert done.status == "completed"


# -------------------------------------------------------------------------- failure switches


async def test_failed_lines_go_to_the_error_file(client: openai.AsyncOpenAI, admin: Any) -> None:
    await admin("/admin/batch", {"fail_custom_ids": ["bad"]})
    bad_body = {"model": "gpt-batch", "messages": []}  # the chat route refuses this with a 400
    done = await wait_for(
        client,
        (await submit(client, [line("ok", chat_body("hi")), line("bad", chat_body("hi")), line("empty", bad_body)])).id,
    )
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    out, err = await content(client, done.output_file_id), await content(client, done.error_file_id)
    assert set(out) == {"ok"} and set(err) == {"bad", "empty"}
    assert err["bad"]["response"]["status_code"] == 500
    assert err["empty"]["response"]["status_code"] == 400
    assert err["empty"]["response"]["body"]["error"]["param"] == "messages"


async def test_expire_returns_finished_lines_and_marks_the_rest(client: openai.AsyncOpenAI, admin: Any) -> None:
    await admin("/admin/batch", {"turnaround_s": 60})
    batch = await submit(client, [line(f"e{i}", chat_body(f"p{i}")) for i in range(3)])
    await wait_for(client, batch.id, {"in_progress"})
    await admin(f"/admin/batches/{batch.id}", {"action": "expire", "after": 1})
    done = await wait_for(client, batch.id)
    assert done.status == "expired" and done.expired_at
    out, err = await content(client, done.output_file_id), await content(client, done.error_file_id)
    assert set(out) == {"e0"} and set(err) == {"e1", "e2"}
    assert err["e1"]["response"] is None and err["e1"]["error"]["code"] == "batch_expired"
    assert (await admin("/stats", method="GET"))["batch"]["answered"] == 1


async def test_cancel_and_forced_failure(client: openai.AsyncOpenAI, admin: Any) -> None:
    await admin("/admin/batch", {"turnaround_s": 60})
    batch = await submit(client, [line("c0", chat_body("p"))])
    await wait_for(client, batch.id, {"in_progress"})
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await wait_for(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert await content(client, done.output_file_id) == {}  # cancelled before any line was answered
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)

    failing = await submit(client, [line("f0", chat_body("p"))])
    await wait_for(client, failing.id, {"in_progress"})
    await admin(f"/admin/batches/{failing.id}", {"action": "fail"})
    failed = await wait_for(client, failing.id)
    assert failed.status == "failed" and failed.errors.data[0].code == "server_error"
    assert (await admin("/stats", method="GET"))["batch"]["answered"] == 0


# ---------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"custom_id": "a"}\nnot json\n', "invalid_json_line"),
        (b"[1, 2]\n", "invalid_json_line"),
        (b"\n\n", "empty_batch"),
        (b"\xef\xbb\xbf{}\n", "invalid_json_line"),  # UTF-8 BOM: Azure refuses it
        (b"[" * 100_000 + b"\n", "invalid_json_line"),  # nesting too deep for json: refused, not a 500
    ],
)
async def test_upload_refuses_files_that_are_not_jsonl_objects(
    client: openai.AsyncOpenAI, data: bytes, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.create(file=("in.jsonl", data), purpose="batch")
    assert exc.value.code == code


async def test_upload_bounds_size_lines_and_files(client: openai.AsyncOpenAI, server: TestServer) -> None:
    limits = server.app[SERVER_KEY].batches.limits  # the admin reset restores them
    limits.max_lines, limits.max_file_bytes, limits.max_files = 2, 4096, 1
    three = jsonl([line(str(i), {"model": "m"}) for i in range(3)])
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.create(file=("in.jsonl", three), purpose="batch")
    assert exc.value.code == "too_many_tasks"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.create(file=("in.jsonl", b"{}\n" * 2000), purpose="batch")
    assert exc.value.code == "file_too_large"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.create(file=("in.jsonl", b"{}\n"), purpose="fine-tune")
    assert exc.value.param == "purpose"
    await client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        await client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    assert exc.value.code == "quota_exceeded"


async def test_invalid_lines_fail_validation_with_their_line_numbers(client: openai.AsyncOpenAI) -> None:
    lines = [
        line("same", chat_body("a")),
        line("same", chat_body("b")),
        line("url", chat_body("c"), url="/embeddings"),
        line("other", chat_body("d", model="another-deployment")),
        {"custom_id": "get", "method": "GET", "url": "/chat/completions", "body": chat_body("e")},
    ]
    failed = await wait_for(client, (await submit(client, lines)).id)
    assert failed.status == "failed"
    assert [(e.code, e.line) for e in failed.errors.data] == [
        ("duplicate_custom_id", 2),
        ("url_mismatch", 3),
        ("model_mismatch", 4),
        ("invalid_request", 5),
    ]


async def test_create_refuses_bad_parameters(client: openai.AsyncOpenAI) -> None:
    fid = await upload(client, [line("a", chat_body("a"))])
    with pytest.raises(openai.BadRequestError) as exc:
        await client.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
    assert exc.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.batches.create(input_file_id="file-nope", endpoint="/chat/completions", completion_window="24h")
    assert exc.value.param == "input_file_id"
    with pytest.raises(openai.BadRequestError):
        await client.batches.create(input_file_id=fid, endpoint="/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")


async def test_admin_knobs_are_bounded(admin: Any) -> None:
    await admin("/admin/batch", {"turnaround_s": 1e308}, status=400)
    await admin("/admin/batch", {"enqueued_tokens": -1}, status=400)
    await admin("/admin/batch", {"fail_custom_ids": "x"}, status=400)
    await admin("/admin/batches/batch_nope", {"action": "fail"}, status=404)


async def test_create_reports_the_token_estimate_and_quota_in_headers(client: openai.AsyncOpenAI, admin: Any) -> None:
    await admin("/admin/batch", {"enqueued_tokens": 100_000, "turnaround_s": 60})
    fid = await upload(client, [line("h", chat_body("Count my tokens."))])
    raw = await client.batches.with_raw_response.create(
        input_file_id=fid, endpoint="/chat/completions", completion_window="24h"
    )
    assert raw.headers["deployment-maximum-enqueued-tokens"] == "100000"
    batch = raw.parse()
    running = await wait_for(client, batch.id, {"in_progress"})
    assert running.status == "in_progress"
    estimate = int(
        (
            await client.batches.with_raw_response.create(
                input_file_id=fid, endpoint="/chat/completions", completion_window="24h"
            )
        ).headers["deployment-enqueued-tokens"]
    )
    assert estimate > 0  # the second job's own estimate, known at create
    for b in (await client.batches.list()).data:
        await client.batches.cancel(b.id)


async def test_jobs_kept_are_bounded(client: openai.AsyncOpenAI, admin: Any, server: TestServer) -> None:
    server.app[SERVER_KEY].batches.limits.max_batches = 1  # the admin reset restores it
    first = await wait_for(client, (await submit(client, [line("a", chat_body("a"))])).id)
    assert first.status == "completed"
    await admin("/admin/batch", {"turnaround_s": 60})
    second = await submit(client, [line("b", chat_body("b"))])  # the finished job makes room, its files go too
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(first.output_file_id)
    assert (await wait_for(client, second.id, {"in_progress"})).status == "in_progress"
    with pytest.raises(openai.RateLimitError):  # the one job kept is still running: no room
        await submit(client, [line("c", chat_body("c"))])
    await client.batches.cancel(second.id)
