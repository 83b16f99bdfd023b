"""Queue, seal, submit and collect: the batch route's steps, each resumable (issue 13, docs/batch.md).

`enqueue` (blob trigger) runs the pipeline up to the model call and queues the request;
`submit` (timer `batch_submit`) seals queued requests into JSONL files within the Batch API's
limits (requests and bytes per file, enqueued tokens), uploads them (`purpose=batch`) and creates
the jobs on VLM_BATCH_DEPLOYMENT; `collect` (timer `batch_collect`) polls the jobs, replays each
answer through the pipeline and writes today's record with `mode: "batch"`, `batch_id` and the
batch price. Every step is written to storage before the next starts (shared/batch_store.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .batch import (
    CHAT_URL,
    BatchAnswer,
    Deferred,
    DeferringBackend,
    ReplayBackend,
    batch_discount,
    batch_target,
    custom_id,
    line_body,
    request_digest,
    with_model,
)
from .batch_store import BatchStore
from .errors import InternalError, VlmError
from .pipeline import AnalysisRequest, AnalysisResult, analyze
from .results import Source, now_iso

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled")
NOTHING_RAN = "token_limit_exceeded"  # a job failed on quota: none of its lines ran (docs/batch.md)
MAX_LISTED_BATCHES = 1000  # how far back a resumed create looks for the job it may have created
MAX_ERROR_CODE_CHARS = 64
FILES_PER_JOB = 3  # input, output and error file, all counted by BATCH_MAX_FILES until deleted


def store_for(app: Any) -> BatchStore:
    return BatchStore(app.blobs, app.settings.cache_container)


@dataclass
class Queued:
    """The blob trigger's outcome in batch mode: queued (or already queued) under `custom_id`."""

    custom_id: str
    added: bool


async def enqueue(
    processor: Any, config: Any, name: str, source: Source, job: str, request: AnalysisRequest
) -> AnalysisResult | Queued:
    """The pipeline without the model: a cache hit answers at once (an AnalysisResult); otherwise the
    task's request is queued once per source blob + etag + job."""
    app = processor.app
    target = batch_target(app.settings)  # no batch deployment: a permanent error, recorded on the first attempt
    try:
        return await analyze(request, with_model(app, DeferringBackend(app.book)))
    except Deferred as deferred:
        chat = deferred.request
    cid = custom_id(name, source.etag, job)
    item = {
        "custom_id": cid,
        "name": name,
        "etag": source.etag,
        "sha256": source.sha256,
        "size": source.size,
        "job": job,
        "task": config.task,
        "task_config": config.origin,
        "fields": config.fields,
        "digest": request_digest(chat.messages),
        "tokens": chat.estimated_tokens,
        "line": {
            "custom_id": cid,
            "method": "POST",
            "url": CHAT_URL,
            "body": line_body(chat, app.settings.primary, target.deployment, app.book),
        },
        "queued_at": now_iso(),
        "tried": [],  # batch ids that ended without answering it
    }
    return Queued(cid, await store_for(app).add_item(item))


def _line_bytes(item: dict[str, Any]) -> bytes:
    return json.dumps(item["line"], separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


@dataclass
class SubmitReport:
    sealed: int = 0
    uploaded: int = 0
    created: int = 0
    requests: int = 0
    blocked: str = ""  # why submitting stopped early (quota), "" when it did not
    refused: list[str] = field(default_factory=list)  # custom_ids too large for any file


class BatchRunner:
    """Both timers' work for one processor (its dependencies, writer and task resolver)."""

    def __init__(self, processor: Any, client: Any = None) -> None:
        self.processor = processor
        self.app = processor.app
        self.settings = processor.app.settings
        self.store = store_for(processor.app)
        self.target = batch_target(self.settings)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from .model import build_client

            self._client = build_client(self.target, self.settings)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    # --- submit ---
    async def submit(self) -> SubmitReport:
        """Resume sealed/uploaded jobs, then seal the requests no job names, within the limits."""
        report = SubmitReport()
        jobs = await self.store.jobs()
        named = {cid for j in jobs for cid in j["items"]}
        for job in jobs:
            if job["state"] in ("sealed", "uploaded") and not await self._advance(job, report):
                return report
        quota = self.settings.batch_enqueued_tokens
        enqueued = sum(j.get("tokens", 0) for j in jobs if j["state"] == "created")
        # Each job keeps up to three files on the resource (input, output, error) until it is collected.
        files_free = self.settings.batch_max_files - FILES_PER_JOB * len(jobs)
        max_requests, max_bytes = self.settings.batch_max_requests_per_file, self.settings.batch_max_file_bytes
        group: list[dict[str, Any]] = []
        size = tokens = 0
        for cid in sorted(set(await self.store.item_ids()) - named):
            item = await self.store.item(cid)
            if item is None:
                continue
            n, t = len(_line_bytes(item)), int(item.get("tokens", 0))
            if n > max_bytes or (quota and t > quota):
                await self._refuse(item, n, t)
                report.refused.append(cid)
                continue
            if group and (
                len(group) >= max_requests or size + n > max_bytes or (quota and enqueued + tokens + t > quota)
            ):
                if not await self._seal(group, tokens, report):
                    return report
                enqueued += tokens
                files_free -= FILES_PER_JOB
                group, size, tokens = [], 0, 0
            if not group and files_free < FILES_PER_JOB:
                report.blocked = "batch_max_files"  # the rest waits for jobs to be collected (files deleted)
                break
            if quota and enqueued + t > quota:
                report.blocked = "enqueued_tokens"  # the rest waits for running jobs to finish
                break
            group.append(item)
            size, tokens = size + n, tokens + t
        if group:
            await self._seal(group, tokens, report)
        return report

    async def _seal(self, group: list[dict[str, Any]], tokens: int, report: SubmitReport) -> bool:
        ids = sorted(i["custom_id"] for i in group)
        key = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
        job = {"key": key, "state": "sealed", "items": ids, "tokens": tokens, "sealed_at": now_iso(), "tries": 0}
        await self.store.put_job(job)
        report.sealed += 1
        report.requests += len(ids)
        return await self._advance(job, report, {i["custom_id"]: i for i in group})

    async def _advance(self, job: dict[str, Any], report: SubmitReport, items: dict[str, Any] | None = None) -> bool:
        """sealed -> uploaded -> created; False when the service refused for now (quota): stop submitting."""
        import openai

        if job["state"] == "sealed":
            lines = []
            for cid in job["items"]:
                item = (items or {}).get(cid) or await self.store.item(cid)
                if item is not None:
                    lines.append(_line_bytes(item))
            if not lines:
                await self.store.drop_job(job["key"])
                return True
            uploaded = await self.client.files.create(
                file=(f"vlm-{job['key']}.jsonl", b"".join(lines)), purpose="batch"
            )
            job.update(state="uploaded", file_id=uploaded.id)
            await self.store.put_job(job)
            report.uploaded += 1
        if job["state"] == "uploaded":
            existing = await self._created_before(job) if job.get("create_tried") else None
            if existing is None:
                job["create_tried"] = True
                await self.store.put_job(job)
                try:
                    created = await self.client.batches.create(
                        input_file_id=job["file_id"],
                        endpoint=CHAT_URL,
                        completion_window="24h",  # the only value Azure takes (docs/batch.md, [B])
                        metadata={"vlm_job": job["key"]},
                    )
                except openai.APIStatusError as exc:
                    code = _error_code(exc.body)
                    report.blocked = code or f"http_{exc.status_code}"
                    log.warning("batch create for %s refused (%s): retried on the next run", job["key"], report.blocked)
                    return False
                existing = created.id
            job.update(state="created", batch_id=existing, status="validating", created_at=now_iso())
            await self.store.put_job(job)
            report.created += 1
        return True

    async def _created_before(self, job: dict[str, Any]) -> str | None:
        """A create that may have succeeded before the host stopped: find it instead of creating twice."""
        seen = 0
        async for batch in self.client.batches.list(limit=100):
            seen += 1
            if (batch.metadata or {}).get("vlm_job") == job["key"] or batch.input_file_id == job.get("file_id"):
                return str(batch.id)
            if seen >= MAX_LISTED_BATCHES:
                break
        return None

    async def _refuse(self, item: dict[str, Any], nbytes: int, tokens: int) -> None:
        from .errors import InvalidRequest

        err = InvalidRequest(
            "the request is too large for one batch input file (BATCH_MAX_FILE_BYTES / BATCH_ENQUEUED_TOKENS)",
            details={"bytes": nbytes, "tokens": tokens},
        )
        await self._write_error(item, err.to_dict()["error"], None)

    # --- collect ---
    async def collect(self) -> dict[str, int]:
        """Poll created jobs; for each that ended, write every answered request's record and free the rest."""
        counts = {"polled": 0, "ended": 0, "written": 0, "failed": 0, "requeued": 0}
        for job in await self.store.jobs():
            if job["state"] != "created":
                continue
            counts["polled"] += 1
            batch = await self.client.batches.retrieve(job["batch_id"])
            if batch.status != job.get("status"):
                job["status"] = batch.status
                await self.store.put_job(job)
            if batch.status not in TERMINAL:
                continue
            counts["ended"] += 1
            await self._collect_job(job, batch, counts)
        return counts

    async def _collect_job(self, job: dict[str, Any], batch: Any, counts: dict[str, int]) -> None:
        errors = [e.code for e in (getattr(batch.errors, "data", None) or [])] if batch.errors else []
        nothing_ran = batch.status == "failed" and NOTHING_RAN in errors
        answered = await self._lines(batch.output_file_id)
        failed = await self._lines(batch.error_file_id)
        for cid in job["items"]:
            item = await self.store.item(cid)
            if item is None:
                continue  # written by an earlier run that stopped before it finished this job
            response = (answered.get(cid) or failed.get(cid) or {}).get("response")
            status = response.get("status_code") if isinstance(response, dict) else None
            if status == 200 and isinstance(response, dict):
                await self._finish(item, response.get("body") or {}, batch.id)
                counts["written"] += 1
            elif isinstance(status, int) and isinstance(response, dict):  # "response": null is unfinished
                await self._line_error(item, response, batch.id)
                counts["failed"] += 1
            elif nothing_ran:
                counts["requeued"] += 1  # no line ran: pending again, not a resubmit
            elif batch.id in item["tried"]:
                counts["requeued"] += 1
            elif len(item["tried"]) >= self.settings.batch_max_resubmits:
                unfinished = {
                    "code": "batch_unfinished",
                    "message": f"the batch job ended {batch.status} "
                    f"{len(item['tried']) + 1} times without answering this request",
                }
                await self._write_error(item, unfinished, batch.id)
                counts["failed"] += 1
            else:
                item["tried"].append(batch.id)
                await self.store.put_item(item)
                counts["requeued"] += 1
        for file_id in (job.get("file_id"), batch.output_file_id, batch.error_file_id):
            await self._delete_file(file_id)  # BATCH_MAX_FILES counts input and output files
        await self.store.drop_job(job["key"])

    async def _lines(self, file_id: str | None) -> dict[str, dict[str, Any]]:
        """A result file's lines by custom_id. A file already deleted means an earlier run finished
        every line of this job and stopped before dropping it: its items are gone, and any that are
        not take the unfinished path (bounded resubmits), so the job is never read again forever."""
        import openai

        if not file_id:
            return {}
        try:
            content = await self.client.files.content(file_id)
        except openai.NotFoundError:
            log.info("batch file %s is gone: its lines were collected by an earlier run", file_id)
            return {}
        lines: dict[str, dict[str, Any]] = {}
        for raw in content.content.splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("custom_id"), str):
                lines[doc["custom_id"]] = doc
        return lines

    async def _delete_file(self, file_id: str | None) -> None:
        import openai

        if not file_id:
            return
        try:
            await self.client.files.delete(file_id)
        except openai.APIError as exc:
            log.info("could not delete batch file %s: %s", file_id, type(exc).__name__)

    async def _finish(self, item: dict[str, Any], body: dict[str, Any], batch_id: str) -> None:
        """Replay the pipeline with the batch's answer as the first call: today's validation and record."""
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        from .blob_job import MANIFEST_FILE, TaskConfig, _download_unchanged, blob_record

        p = self.processor
        source = Source(self.settings.images_container, item["name"], item["etag"], item["sha256"], item["size"])
        if await p.writer.existing_for(item["name"], item["sha256"], item["job"], item["etag"]) is not None:
            await self.store.drop_item(item["custom_id"])  # written before the host stopped
            return
        container = await self.app.blobs.container(self.settings.images_container)
        try:
            data = await _download_unchanged(container, item["name"], item["etag"])
        except (ResourceNotFoundError, ResourceModifiedError):
            log.warning("batch answer for %s dropped: the blob changed or went since it was queued", item["name"][:300])
            await self.store.drop_item(item["custom_id"])  # a rewritten blob has its own event and record
            return
        config = TaskConfig(item["task"], item["task_config"], item["fields"])
        replay = ReplayBackend(
            BatchAnswer(body, item["digest"], batch_id),
            self.target,
            self.settings.primary,
            self.app.book,
            self.app.model,
            self.app.book.identity(self.settings.primary),
        )
        try:
            if item["name"].rsplit("/", 1)[-1] == MANIFEST_FILE:
                config, images = await p._manifest(item["name"], data)
            else:
                images = [data]
            result = await analyze(await p._request(config, images), with_model(self.app, replay))
        except VlmError as err:
            if err.transient:
                raise  # the job stays: the next collect reads its output again
            await self._write_error(item, err.to_dict()["error"], batch_id, reask=bool(replay.realtime_calls))
            return
        except Exception:
            internal = InternalError.logged(log, f"unexpected error finishing {item['name'][:300]}")
            await self._write_error(item, internal.to_dict()["error"], batch_id)
            return
        cost = result.cost_usd
        if not result.cached and replay.batch_calls:
            discount = batch_discount(replay.batch_calls, self.settings)
            cost = None if cost is None or discount is None else round(max(0.0, cost + discount), 6)
        record = blob_record(
            "succeeded",
            source,
            result={**result.to_dict(), "cost_usd": cost},
            task_config=item["task_config"],
            job=item["job"],
            attempts=1 + len(item["tried"]),
        )
        record |= {"mode": "batch", "batch_id": batch_id}
        if replay.realtime_calls:
            record["reask"] = {"route": "realtime", "calls": replay.realtime_calls, "request_changed": replay.mismatch}
        await p.writer.write_success(item["name"], record)
        await self.store.drop_item(item["custom_id"])

    async def _line_error(self, item: dict[str, Any], response: dict[str, Any], batch_id: str) -> None:
        """A request's own error: its status and error code, never the upstream message text."""
        status = response.get("status_code") if isinstance(response.get("status_code"), int) else 0
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        code = _error_code(body)
        error = {
            "code": "batch_request_failed",
            "message": f"the batch deployment answered this request with status {status}",
            "details": {"status_code": status, "upstream_code": code},
        }
        await self._write_error(item, error, batch_id)

    async def _write_error(
        self, item: dict[str, Any], error: dict[str, Any], batch_id: str | None, reask: bool = False
    ) -> None:
        from .blob_job import blob_record

        source = Source(self.settings.images_container, item["name"], item["etag"], item["sha256"], item["size"])
        record = blob_record(
            "failed", source, error=error, task=item["task"], job=item["job"], attempts=1 + len(item["tried"])
        )
        record |= {"mode": "batch", "batch_id": batch_id}
        if reask:
            record["reask"] = {"route": "realtime"}
        await self.processor.writer.write_error(item["name"], record)
        await self.store.drop_item(item["custom_id"])


def _error_code(body: Any) -> str:
    """An OpenAI-style error body's code, bounded (never its message)."""
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        code = inner.get("code")
        if isinstance(code, str):
            return code[:MAX_ERROR_CODE_CHARS]
    return ""


async def run_step(step: str) -> Any:
    """A timer's work on this worker's App: "submit" -> SubmitReport, "collect" -> counts; None when
    batch mode is off (no VLM_BATCH_DEPLOYMENT). The Batch API client lives for one run (a timer
    fires every few minutes) and is closed after it, so no connection outlives its loop."""
    from .app import get_app
    from .blob_job import BlobProcessor

    app = get_app()
    if not app.settings.vlm_batch_deployment:
        return None
    runner = BatchRunner(BlobProcessor(app))
    try:
        return await (runner.submit() if step == "submit" else runner.collect())
    finally:
        await runner.close()
