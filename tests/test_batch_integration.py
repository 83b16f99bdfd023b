"""The batch route on the real local stack (issue 13's acceptance), the host killed twice on the way.

Azurite, the model server (facts mode: no OCR, a Batch API turnaround) and the local Functions host with the
real function.json files: `local.drop --mode batch` uploads the corpus invoices; the blob trigger
queues them, the `batch_submit` / `batch_collect` timers (every second here) run the jobs. The host
is SIGKILLed once while jobs are being submitted and once while records are being written; the run
still ends with one batch record per file and the model server answered each request once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob.aio import BlobServiceClient

from local.drop import DropOptions, drop
from shared.results import record_names
from tests.conftest import corpus, make_stack
from tests.constants import TEST_DEPLOYMENT

pytestmark = [pytest.mark.integration, pytest.mark.long]

PREFIX = "inv/"
TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def batch_stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = make_stack(
        tmp_path_factory.mktemp("batch-stack"),
        model_args=["--mode", "facts", "--batch-turnaround-s", "4"],  # the test reads no text: no OCR
        host_args=["--poll-interval", "0.2", "--retry-base-delay", "0.05"],
        VLM_BATCH_DEPLOYMENT=f"{TEST_DEPLOYMENT}-batch",
        BATCH_SUBMIT_SCHEDULE="* * * * * *",
        BATCH_COLLECT_SCHEDULE="* * * * * *",
        TASK_CONFIG_TTL_S="0.5",
    )
    yield s
    s.stop()


def kill_host(stack: Any) -> None:
    """SIGKILL: no grace, no cleanup (a crashed instance), then a fresh host on the same storage."""
    os.killpg(stack.host.pid, signal.SIGKILL)
    stack.host.popen.wait(timeout=10)
    stack.restart_host()


async def blobs(service: BlobServiceClient, container: str, prefix: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    client = service.get_container_client(container)
    try:
        async for b in client.list_blobs(name_starts_with=prefix):
            with contextlib.suppress(ResourceNotFoundError):  # finished and deleted meanwhile
                out[b.name] = await (await client.download_blob(b.name)).readall()
    except ResourceNotFoundError:
        pass  # the container is not there yet
    return out


async def wait_for(what: str, check: Any) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


async def test_drop_in_batch_mode_survives_two_host_kills(batch_stack: Any, tmp_path: Path) -> None:
    admin = batch_stack.model_admin()
    folder = tmp_path / "docs"  # a few corpus invoices, copied outside the repo
    folder.mkdir()
    for name in ("FlipkartInvoice.png", "SammyMaystoneLinesTest.png", "NetpresseInvoice.pdf", "oyo.png"):
        shutil.copyfile(corpus("documents", name), folder / name)
    options = DropOptions(
        folder,
        prefix=PREFIX,
        task="invoice",
        mode="batch",
        wait=False,
        out=tmp_path / "table",
        connection_string=batch_stack.connection_string,
    )
    await drop(options, say=lambda _: None)
    async with BlobServiceClient.from_connection_string(batch_stack.connection_string) as service:
        uploaded = [n async for n in service.get_container_client("images").list_blob_names(name_starts_with=PREFIX)]
        files = [n for n in uploaded if not n.endswith("_task.json")]
        assert len(files) == 4

        async def jobs() -> dict[str, bytes]:
            return await blobs(service, "cache", "batch/jobs/")

        await wait_for("a batch job being submitted", jobs)
        kill_host(batch_stack)  # during submit: a job sealed, uploaded or just created

        async def some_records() -> bool:
            return bool(await blobs(service, "results", PREFIX))

        await wait_for("the first record", some_records)
        kill_host(batch_stack)  # during collect: some records written, others not yet

        async def all_records() -> dict[str, dict[str, Any]] | None:
            found = {}
            results = await blobs(service, "results", PREFIX)
            for name in files:
                names = record_names(name)
                raw = results.get(names.success) or results.get(names.error)
                if raw is None:
                    return None
                found[name] = json.loads(raw)
            return found

        records = await wait_for("a record for every file", all_records)

        async def cleaned_up() -> bool:
            # a collect writes a job's records, then deletes its files and drops it; a kill between the two
            # leaves the job for the next collect (a second later here), which finds its items done and drops it
            return await blobs(service, "cache", "batch/") == {}

        await wait_for("every queued request and job document to be removed", cleaned_up)
        leftover = await blobs(service, "cache", "batch/")
    assert all(r["status"] == "succeeded" for r in records.values()), [r.get("error") for r in records.values()]
    assert all(r["mode"] == "batch" and r["batch_id"] for r in records.values())
    assert leftover == {}  # every queued request and job document was finished and removed
    stats = admin.batch_stats()
    assert stats["repeated_custom_ids"] == 0  # nothing answered (billed) twice
    assert stats["answered"] == len(files)
    online = admin.stats()
    assert online["requests"] == len(files) + sum(r.get("reask", {}).get("calls", 0) for r in records.values())
