"""The batch route (issue 13): queue in the blob trigger, submit and collect on timers.

Driven end to end in process: the real BlobProcessor and pipeline over the in-memory blob fake,
against the local model server's Batch API stand-in (facts mode) through the openai SDK. A host
that stops between steps is modelled by a client or writer that raises after a step succeeded;
a fresh runner then resumes, and the model server's counters show each request answered once.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from local.model_server import SERVER_KEY, ModelServerConfig, build_app
from shared.app import App
from shared.batch import BatchAnswer, ReplayBackend, request_digest
from shared.batch_jobs import BatchRunner
from shared.blob_job import BlobProcessor, InvalidTaskConfig, _parse_task_file
from shared.catalog import Prices, load_catalog
from shared.model import ChatRequest
from shared.results import record_names
from shared.settings import ModelTarget, Settings
from shared.tokens import price_usd
from tests.blob_fakes import FakeBlobService
from tests.constants import TEST_DEPLOYMENT

BATCH_DEPLOYMENT = "gpt-batch"


class HostStopped(Exception):
    """Stands for the host process dying right after a step succeeded."""


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 200), (shade, 40, 255 - shade)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[TestServer]:
    srv = TestServer(
        build_app(ModelServerConfig(mode="facts", seed=1, model_name="gpt-5.4-mini-2026-03-17")), host="127.0.0.1"
    )
    await srv.start_server()
    yield srv
    await srv.close()


@pytest.fixture
async def admin(server: TestServer) -> AsyncIterator[Any]:
    token = server.app[SERVER_KEY].config.admin_token
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:

        async def call(path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
            async with session.request(method, base + path, json=body if method == "POST" else None) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        await call("/admin/reset", {})
        yield call


def settings_for(server: TestServer, **extra: str) -> Settings:
    env = {
        "VLM_ENDPOINT": f"http://127.0.0.1:{server.port}/v1",
        "VlmStorage": "UseDevelopmentStorage=true",
        "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
        "VLM_BATCH_DEPLOYMENT": BATCH_DEPLOYMENT,
        "VLM_MAX_RETRIES": "0",
    }
    return Settings.from_env(env | extra)


class Stack:
    """One 'host': a processor over shared storage; `restart` is a new host on the same storage."""

    def __init__(self, server: TestServer, blobs: FakeBlobService, **extra: str) -> None:
        self.server, self.blobs, self.extra = server, blobs, extra
        self.settings = settings_for(server, **extra)
        self.restart()

    def restart(self) -> None:
        self.processor = BlobProcessor(App.build(self.settings, blobs=self.blobs))
        self.runner = BatchRunner(self.processor)

    def drop(self, folder: str, files: dict[str, bytes], task: dict[str, Any]) -> None:
        self.blobs.put(self.settings.images_container, f"{folder}_task.json", json.dumps(task).encode())
        for name, data in files.items():
            self.blobs.put(self.settings.images_container, folder + name, data)

    async def deliver(self, name: str) -> Any:
        blob = self.blobs.blobs[f"{self.settings.images_container}/{name}"]
        return await self.processor.process(name, blob.data, blob.etag, {})

    def record(self, name: str) -> dict[str, Any] | None:
        names = record_names(name)
        for blob in (names.success, names.error):
            data = self.blobs.get(self.settings.results_container, blob)
            if data is not None:
                return json.loads(data)
        return None

    def jobs(self) -> list[dict[str, Any]]:
        prefix = f"{self.settings.cache_container}/batch/jobs/"
        return [json.loads(b.data) for k, b in self.blobs.blobs.items() if k.startswith(prefix)]

    def pending(self) -> int:
        prefix = f"{self.settings.cache_container}/batch/pending/"
        return sum(1 for k in self.blobs.blobs if k.startswith(prefix))

    async def until_ended(self) -> None:
        """Poll the stand-in (bounded) until every created job is terminal; asserts nothing about time."""
        client = self.runner.client
        for job in self.jobs():
            for _ in range(400):
                if (await client.batches.retrieve(job["batch_id"])).status in (
                    "completed",
                    "failed",
                    "expired",
                    "cancelled",
                ):
                    break
                await asyncio.sleep(0.02)


FILES = {f"p{i}.png": png(30 * i) for i in range(1, 4)}


async def drop_and_queue(stack: Stack, folder: str = "inv/", task: str = "describe") -> list[str]:
    stack.drop(folder, FILES, {"task": task, "mode": "batch"})
    names = [folder + n for n in FILES]
    for name in names:
        assert (await stack.deliver(name)).status == "queued"
    return names


async def test_queueing_is_idempotent_and_calls_no_model(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService())
    names = await drop_and_queue(stack)
    for name in names:  # the event is delivered again
        assert (await stack.deliver(name)).status == "queued"
    assert stack.pending() == 3
    assert all(stack.record(n) is None for n in names)
    assert (await admin("/stats", method="GET"))["requests"] == 0


async def test_batch_records_cost_half_the_realtime_price(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService())
    names = await drop_and_queue(stack)
    report = await stack.runner.submit()
    assert (report.sealed, report.created, report.requests) == (1, 1, 3)
    await stack.until_ended()
    counts = await stack.runner.collect()
    assert counts["written"] == 3 and stack.pending() == 0 and stack.jobs() == []
    catalog = load_catalog()
    for name in names:
        record = stack.record(name)
        assert record is not None and record["status"] == "succeeded", record
        assert record["mode"] == "batch" and record["batch_id"].startswith("batch_")
        assert record["result"] and not record["cached"]
        family = catalog.lookup(record["model"])
        assert family is not None
        usage = record["usage"]
        realtime = price_usd(family.prices, usage["prompt_tokens"], usage["completion_tokens"])
        assert record["cost_usd"] == pytest.approx(realtime / 2, abs=2e-6) and record["cost_usd"] > 0
    stats = await admin("/stats", method="GET")
    assert stats["batch"] == {"answered": 3, "failed": 0, "repeated_custom_ids": 0}
    # a re-delivered event after the record is written is a no-op
    assert (await stack.deliver(names[0])).status == "skipped"


async def test_a_cache_hit_answers_at_once(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService())
    stack.drop("rt/", {"a.png": FILES["p1.png"]}, {"task": "describe"})
    first = await stack.deliver("rt/a.png")
    assert first.status == "succeeded"
    stack.drop("b/", {"a.png": FILES["p1.png"]}, {"task": "describe", "mode": "batch"})
    outcome = await stack.deliver("b/a.png")
    assert outcome.status == "succeeded" and outcome.record["cached"] and outcome.record["mode"] == "realtime"
    assert stack.pending() == 0


class StopAfter:
    """The openai client, but the host 'dies' right after the named call succeeds (once)."""

    def __init__(self, client: openai.AsyncOpenAI, where: str) -> None:
        self._client, self.where = client, where
        outer = self

        class Files:
            deleted = 0

            async def create(self, **kw: Any) -> Any:
                out = await client.files.create(**kw)
                outer._maybe_stop("files.create")
                return out

            async def delete(self, file_id: str) -> Any:
                out = await client.files.delete(file_id)
                self.deleted += 1
                outer._maybe_stop(f"files.delete#{self.deleted}")
                return out

            def __getattr__(self, name: str) -> Any:
                return getattr(client.files, name)

        class Batches:
            async def create(self, **kw: Any) -> Any:
                out = await client.batches.create(**kw)
                outer._maybe_stop("batches.create")
                return out

            def __getattr__(self, name: str) -> Any:
                return getattr(client.batches, name)

        self.files, self.batches = Files(), Batches()

    def _maybe_stop(self, step: str) -> None:
        if step == self.where:
            self.where = ""
            raise HostStopped(step)

    async def close(self) -> None:
        await self._client.close()


@pytest.mark.parametrize("where", ["files.create", "batches.create"])
async def test_a_host_stopped_during_submit_resumes_and_answers_once(
    server: TestServer, admin: Any, where: str
) -> None:
    stack = Stack(server, FakeBlobService())
    names = await drop_and_queue(stack)
    stack.runner = BatchRunner(stack.processor, StopAfter(stack.runner.client, where))
    with pytest.raises(HostStopped):
        await stack.runner.submit()
    stack.restart()
    await stack.runner.submit()  # resumes: uploads again (harmless) or finds the job it created
    assert len(stack.jobs()) == 1
    await stack.until_ended()
    await stack.runner.collect()
    assert all((stack.record(n) or {}).get("mode") == "batch" for n in names)
    listed = [b async for b in stack.runner.client.batches.list(limit=100)]
    assert len(listed) == 1  # one job created, never two
    stats = await admin("/stats", method="GET")
    assert stats["batch"] == {"answered": 3, "failed": 0, "repeated_custom_ids": 0}


async def test_a_host_stopped_during_collect_resumes_and_answers_once(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService())
    names = await drop_and_queue(stack)
    await stack.runner.submit()
    await stack.until_ended()
    writer = stack.processor.writer
    real_write, written = writer.write_success, []

    async def write_then_stop(name: str, record: dict[str, Any]) -> None:
        await real_write(name, record)
        written.append(name)
        if len(written) == 2:
            raise HostStopped("after the second record")

    writer.write_success = write_then_stop
    with pytest.raises(HostStopped):
        await stack.runner.collect()
    stack.restart()
    await stack.runner.collect()
    records = [stack.record(n) for n in names]
    assert all(r is not None and r["mode"] == "batch" and r["cost_usd"] > 0 for r in records), records
    assert stack.pending() == 0 and stack.jobs() == []
    stats = await admin("/stats", method="GET")
    assert stats["requests"] == 3  # no realtime call stood in for a batch answer
    assert stats["batch"] == {"answered": 3, "failed": 0, "repeated_custom_ids": 0}


async def test_an_expired_job_resubmits_only_its_unfinished_requests(server: TestServer, admin: Any) -> None:
    await admin("/admin/batch", {"turnaround_s": 0.2})
    try:
        stack = Stack(server, FakeBlobService())
        names = await drop_and_queue(stack)
        await stack.runner.submit()
        await admin(f"/admin/batches/{stack.jobs()[0]['batch_id']}", {"action": "expire", "after": 1})
        await stack.until_ended()
        counts = await stack.runner.collect()
        assert (counts["written"], counts["requeued"]) == (1, 2)
        report = await stack.runner.submit()
        assert report.requests == 2
        await stack.until_ended()
        await stack.runner.collect()
    finally:
        await admin("/admin/batch", {"turnaround_s": 0})
    records = [stack.record(n) for n in names]
    assert all(r is not None and r["status"] == "succeeded" for r in records)
    assert sorted(r["attempts"] for r in records) == [1, 2, 2]
    stats = await admin("/stats", method="GET")
    assert stats["batch"]["answered"] == 3 and stats["batch"]["repeated_custom_ids"] == 0


async def test_resubmits_are_bounded(server: TestServer, admin: Any) -> None:
    await admin("/admin/batch", {"turnaround_s": 0.2})
    try:
        stack = Stack(server, FakeBlobService(), BATCH_MAX_RESUBMITS="1")
        names = await drop_and_queue(stack)
        for _ in range(2):
            await stack.runner.submit()
            await admin(f"/admin/batches/{stack.jobs()[0]['batch_id']}", {"action": "cancel", "after": 0})
            await stack.until_ended()
            await stack.runner.collect()
    finally:
        await admin("/admin/batch", {"turnaround_s": 0})
    records = [stack.record(n) for n in names]
    assert all(r is not None and r["error"]["code"] == "batch_unfinished" for r in records), records
    assert stack.pending() == 0 and (await stack.runner.submit()).requests == 0


async def test_a_request_error_becomes_its_error_record(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService())
    names = await drop_and_queue(stack)
    item = json.loads(next(b.data for k, b in stack.blobs.blobs.items() if "batch/pending/" in k))
    await admin("/admin/batch", {"fail_custom_ids": [item["custom_id"]]})
    try:
        await stack.runner.submit()
        await stack.until_ended()
        counts = await stack.runner.collect()
    finally:
        await admin("/admin/batch", {"fail_custom_ids": []})
    assert (counts["written"], counts["failed"]) == (2, 1)
    failed = stack.record(item["name"])
    assert failed is not None and failed["error"]["code"] == "batch_request_failed"
    assert failed["mode"] == "batch" and failed["error"]["details"]["status_code"] == 500
    assert sum(1 for n in names if (stack.record(n) or {}).get("status") == "succeeded") == 2


async def test_files_respect_the_requests_per_file_limit(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService(), BATCH_MAX_REQUESTS_PER_FILE="2")
    await drop_and_queue(stack)
    report = await stack.runner.submit()
    assert (report.sealed, report.requests) == (2, 3)
    assert sorted(len(j["items"]) for j in stack.jobs()) == [1, 2]


async def test_the_file_limit_holds_the_rest_back(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService(), BATCH_MAX_REQUESTS_PER_FILE="1", BATCH_MAX_FILES="6")
    await drop_and_queue(stack)
    report = await stack.runner.submit()  # two jobs of one request: six files (input, output, error) at most
    assert (report.created, report.requests, report.blocked) == (2, 2, "batch_max_files")
    await stack.until_ended()
    await stack.runner.collect()  # collected: their files are deleted
    assert (await stack.runner.submit()).requests == 1


async def test_the_enqueued_token_quota_holds_the_rest_back(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService())
    await drop_and_queue(stack)
    one = json.loads(next(b.data for k, b in stack.blobs.blobs.items() if "batch/pending/" in k))["tokens"]
    stack.settings = settings_for(server, BATCH_ENQUEUED_TOKENS=str(int(one * 1.5)))
    stack.restart()
    report = await stack.runner.submit()
    assert report.requests == 1 and report.blocked == "enqueued_tokens"
    assert (await stack.runner.submit()).requests == 0  # still running: nothing more is enqueued


async def test_fail_fast_quota_keeps_the_file_for_the_next_run(server: TestServer, admin: Any) -> None:
    stack = Stack(server, FakeBlobService())
    await drop_and_queue(stack)
    await admin("/admin/batch", {"enqueued_tokens": 10, "fail_fast": True})
    try:
        report = await stack.runner.submit()
        assert report.blocked == "token_limit_exceeded" and stack.jobs()[0]["state"] == "uploaded"
    finally:
        await admin("/admin/batch", {"enqueued_tokens": 0, "fail_fast": False})
    report = await stack.runner.submit()
    assert report.created == 1 and report.uploaded == 0 and stack.jobs()[0]["state"] == "created"


class Online:
    def __init__(self) -> None:
        self.calls: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> Any:
        self.calls.append(request)
        raise HostStopped("online")


async def test_replay_sends_a_changed_request_or_a_reask_online(server: TestServer) -> None:
    settings = settings_for(server)
    book = App.build(settings).book
    online = Online()
    messages = [{"role": "user", "content": "x"}]
    body = {"model": "m", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": {}}
    target = ModelTarget(settings.vlm_endpoint, BATCH_DEPLOYMENT)
    replay = ReplayBackend(
        BatchAnswer(body, request_digest(messages), "batch_1"), target, settings.primary, book, online, "id"
    )
    assert (await replay.complete(ChatRequest(messages, 10))).content == "hi"
    with pytest.raises(HostStopped):  # the second call (a re-ask) goes to the realtime route
        await replay.complete(ChatRequest(messages, 10))
    assert replay.realtime_calls == 1 and len(online.calls) == 1
    changed = ReplayBackend(BatchAnswer(body, "other", "batch_1"), target, settings.primary, book, online, "id")
    with pytest.raises(HostStopped):
        await changed.complete(ChatRequest(messages, 10))
    assert changed.mismatch and not changed.batch_calls


def test_mode_is_a_folder_key_checked_on_the_first_attempt() -> None:
    assert _parse_task_file(b'{"task": "describe", "mode": " Batch "}', "a/_task.json")["mode"] == " Batch "
    with pytest.raises(InvalidTaskConfig, match="mode"):
        _parse_task_file(b'{"task": "describe", "mode": "later"}', "a/_task.json")


def test_the_catalog_prices_batch_at_half() -> None:
    for family in load_catalog().families:
        p = family.prices
        if p.input and p.batch_input:
            half = Prices(input=p.batch_input, output=p.batch_output)
            assert price_usd(half, 1000, 1000) == pytest.approx(price_usd(p, 1000, 1000) / 2, rel=1e-6)


async def test_local_drop_names_each_file_s_batch_request_as_the_service_does(
    server: TestServer, admin: Any, tmp_path: Any
) -> None:
    from local.drop import DropOptions, _batch_ids, _Upload

    stack = Stack(server, FakeBlobService())
    options = DropOptions(tmp_path, task=" Describe ", mode="batch")
    config = options.task_config()
    stack.drop("d/", FILES, config)
    uploads = []
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
        etag = stack.blobs.blobs[f"{stack.settings.images_container}/d/{name}"].etag
        uploads.append(_Upload(tmp_path / name, name, "d/" + name, "png", etag=etag))
    queued = {u.blob: (await stack.deliver(u.blob)).reason for u in uploads}
    assert _batch_ids(uploads, config) == queued


async def test_batch_mode_without_a_batch_deployment_is_recorded_on_the_first_attempt(
    server: TestServer, admin: Any
) -> None:
    stack = Stack(server, FakeBlobService())
    stack.settings = Settings.from_env(
        {
            "VLM_ENDPOINT": f"http://127.0.0.1:{server.port}/v1",
            "VlmStorage": "UseDevelopmentStorage=true",
            "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
        }
    )
    stack.processor = BlobProcessor(App.build(stack.settings, blobs=stack.blobs))
    stack.drop("x/", {"a.png": FILES["p1.png"]}, {"task": "describe", "mode": "batch"})
    outcome = await stack.deliver("x/a.png")
    assert outcome.status == "failed" and "VLM_BATCH_DEPLOYMENT" in outcome.record["error"]["message"]
    assert (await admin("/stats", method="GET"))["requests"] == 0


async def test_a_host_stopped_after_deleting_a_jobs_files_drops_the_job_on_the_next_run(
    server: TestServer, admin: Any
) -> None:
    """Records written, input and output files deleted, job not yet dropped: the next collect must not
    read the deleted output file forever (it did: a 404 on every timer run)."""
    stack = Stack(server, FakeBlobService())
    names = await drop_and_queue(stack)
    await stack.runner.submit()
    await stack.until_ended()
    stack.runner = BatchRunner(stack.processor, StopAfter(stack.runner.client, "files.delete#2"))
    with pytest.raises(HostStopped):
        await stack.runner.collect()
    stack.restart()
    await stack.runner.collect()
    assert all((stack.record(n) or {}).get("mode") == "batch" for n in names)
    assert stack.pending() == 0 and stack.jobs() == []
    stats = await admin("/stats", method="GET")
    assert stats["batch"] == {"answered": 3, "failed": 0, "repeated_custom_ids": 0}
