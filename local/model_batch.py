"""The local model server's Batch API: OpenAI-compatible `/v1/files` and `/v1/batches` (docs/batch.md).

It stands in for an Azure OpenAI Global Batch deployment so the batch route can be tested on one
machine. Shapes follow the OpenAI/Azure v1 API: a JSONL input file uploaded with purpose `batch`,
a job created from it with endpoint `/chat/completions` and completion window `24h`, states
validating -> in_progress -> finalizing -> completed (or failed / expired / cancelling -> cancelled),
an output file of answered lines and an error file of the rest.

Each line is answered by the chat route's own code (`ModelServer.parse` and `ModelServer.complete`),
after a configurable turnaround, and counted in /stats (`batch`). An enqueued-token quota per
deployment fails a job that would exceed it the way Azure does (`token_limit_exceeded`). The admin
API (`/admin/batch`, `/admin/batches/{id}`) sets the turnaround and quota, fails chosen lines, and
fails, expires or cancels a job. Everything is bounded: file bytes, lines, line length, files and
total bytes kept, jobs kept.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from local.model_admin import bounded_number
from local.model_faults import error_body, server_error_body

if TYPE_CHECKING:  # the server imports this module; no cycle at run time
    from local.model_server import ModelServer

MB = 1000 * 1000
ENDPOINTS = ("/chat/completions", "/v1/chat/completions")
WINDOW = "24h"
WINDOW_S = 24 * 3600
TERMINAL = ("completed", "failed", "expired", "cancelled")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MAX_LIST_LIMIT = 100
MAX_FAIL_IDS = 10_000
MAX_CUSTOM_ID = 512
MAX_ERRORS = 100  # validation errors reported per job
MAX_TRACKED_IDS = 1_000_000  # custom_ids /stats remembers to spot a request answered twice


@dataclass
class BatchLimits:
    """Azure's published limits by default (docs/batch.md), plus what the stand-in keeps in memory."""

    max_file_bytes: int = 200 * MB
    max_lines: int = 100_000
    max_line_bytes: int = 64 * 1024 * 1024
    max_files: int = 500
    max_total_bytes: int = 512 * 1024 * 1024  # all stored files together (in memory)
    max_batches: int = 1000  # jobs kept; the oldest finished one is dropped first
    enqueued_tokens: int = 0  # per deployment; 0 = no quota
    turnaround_s: float = 0.0  # time a job spends in_progress before its lines are answered
    # over the quota: True refuses the create (400 token_limit_exceeded, Azure's "fail fast" regions);
    # False creates the job and fails it in validation (the older behaviour, still seen elsewhere)
    fail_fast: bool = False


class BatchApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> web.Response:
        return web.json_response(
            error_body(self.message, "invalid_request_error", self.param, self.code), status=self.status
        )


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    lines: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class Job:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    created_at: int
    status: str = "validating"
    deployment: str | None = None
    enqueued: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    stamps: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    total: int = 0
    completed: int = 0
    failed: int = 0
    forced: str | None = None  # fail | expire | cancel (admin or cancel API)
    stop_after: int = 0  # lines answered before a forced stop takes effect
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def as_json(self) -> dict[str, Any]:
        s = self.stamps
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": WINDOW,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": s.get("in_progress_at"),
            "expires_at": self.created_at + WINDOW_S,
            "finalizing_at": s.get("finalizing_at"),
            "completed_at": s.get("completed_at"),
            "failed_at": s.get("failed_at"),
            "expired_at": s.get("expired_at"),
            "cancelling_at": s.get("cancelling_at"),
            "cancelled_at": s.get("cancelled_at"),
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


@dataclass
class BatchStats:
    answered: int = 0  # lines answered 200
    failed: int = 0  # lines in error files
    by_custom_id: Counter[str] = field(default_factory=Counter)  # at most MAX_TRACKED_IDS keys

    def count(self, custom_id: str) -> None:
        if custom_id in self.by_custom_id or len(self.by_custom_id) < MAX_TRACKED_IDS:
            self.by_custom_id[custom_id] += 1

    def as_json(self) -> dict[str, Any]:
        repeated = sum(1 for n in self.by_custom_id.values() if n > 1)
        return {"answered": self.answered, "failed": self.failed, "repeated_custom_ids": repeated}


def token_limit_message(quota: int, deployment: Any) -> str:
    """Azure's wording (docs/batch.md); the deployment name is cut short, it comes from the caller's file."""
    name = deployment[:100] if isinstance(deployment, str) else ""
    return (
        f"The number of enqueued tokens has surpassed the configured limit of {quota} for the deployment '{name}'. "
        "Please either increase the limit or try again once the current jobs have finished."
    )


def _now() -> int:
    return int(time.time())


class BatchService:
    """Files and jobs in memory, and the background runner that answers them."""

    def __init__(self, server: ModelServer, limits: BatchLimits | None = None) -> None:
        self.server = server
        self.limits = limits or BatchLimits()
        self.start_limits = BatchLimits(**{k: getattr(self.limits, k) for k in BatchLimits.__dataclass_fields__})
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, Job] = {}
        self.fail_ids: set[str] = set()
        self.stats = BatchStats()

    # ------------------------------------------------------------------------------- files
    async def upload(self, request: web.Request) -> web.Response:
        try:
            return web.json_response((await self._upload(request)).as_json())
        except BatchApiError as e:
            return e.response()

    async def _upload(self, request: web.Request) -> StoredFile:
        lim = self.limits
        if not request.content_type.startswith("multipart/"):
            raise BatchApiError(
                400, "The request must be multipart/form-data with 'file' and 'purpose'.", "invalid_request"
            )
        if len(self.files) >= lim.max_files:
            raise BatchApiError(
                400,
                f"The maximum number of files ({lim.max_files}) has been reached; delete files first.",
                "quota_exceeded",
            )
        purpose: str | None = None
        filename, data = "", b""
        got_file = False
        reader = await request.multipart()
        for _ in range(8):  # a handful of parts at most
            part = await reader.next()
            if part is None:
                break
            if isinstance(part, BodyPartReader):
                name = part.name
                if name == "purpose":
                    purpose = (await part.read_chunk(64)).decode("utf-8", "replace")
                elif name == "file":
                    filename = (part.filename or "input.jsonl")[:255]
                    data = await self._read_bounded(part, lim.max_file_bytes)
                    got_file = True
                else:
                    await part.release()
        else:
            raise BatchApiError(400, "Too many form parts.", "invalid_request")
        if purpose != "batch":
            raise BatchApiError(
                400, "Only purpose 'batch' is supported by the local model server.", "invalid_value", "purpose"
            )
        if not got_file:
            raise BatchApiError(400, "Missing required parameter: 'file'.", "missing_required_parameter", "file")
        if sum(len(f.data) for f in self.files.values()) + len(data) > lim.max_total_bytes:
            raise BatchApiError(400, "The files stored here have reached their total size limit.", "quota_exceeded")
        lines = self._check_jsonl(data)
        f = StoredFile(f"file-{uuid.uuid4().hex}", filename, "batch", data, _now(), lines)
        self.files[f.id] = f
        return f

    async def _read_bounded(self, part: Any, limit: int) -> bytes:
        buf = bytearray()
        while chunk := await part.read_chunk(64 * 1024):
            buf += chunk
            if len(buf) > limit:
                raise BatchApiError(
                    400,
                    f"The file is too large: the limit for batch input files is {limit} bytes.",
                    "file_too_large",
                    "file",
                )
        return bytes(buf)

    def _check_jsonl(self, data: bytes) -> int:
        """Every non-empty line is a JSON object; line count and length bounded. Returns the line count."""
        lim = self.limits
        if data.startswith(codecs.BOM_UTF8):  # Azure refuses UTF-8-BOM files (docs/batch.md)
            raise BatchApiError(
                400, "The file starts with a UTF-8 byte-order mark; send plain UTF-8.", "invalid_json_line", "file"
            )
        count = 0
        for n, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            count += 1
            if count > lim.max_lines:
                raise BatchApiError(400, f"The file has more than {lim.max_lines} requests.", "too_many_tasks", "file")
            if len(raw) > lim.max_line_bytes:
                raise BatchApiError(
                    400, f"Line {n} is longer than {lim.max_line_bytes} bytes.", "invalid_json_line", "file"
                )
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):
                raise BatchApiError(400, f"Line {n} is not valid JSON.", "invalid_json_line", "file") from None
            if not isinstance(obj, dict):
                raise BatchApiError(400, f"Line {n} is not a JSON object.", "invalid_json_line", "file")
        if count == 0:
            raise BatchApiError(400, "The file has no requests.", "empty_batch", "file")
        return count

    def _file(self, request: web.Request) -> StoredFile:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            raise BatchApiError(404, f"No such File object: {request.match_info['file_id'][:100]}", "not_found", "id")
        return f

    async def get_file(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._file(request).as_json())
        except BatchApiError as e:
            return e.response()

    async def file_content(self, request: web.Request) -> web.Response:
        try:
            f = self._file(request)
        except BatchApiError as e:
            return e.response()
        return web.Response(body=f.data, content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        try:
            f = self._file(request)
        except BatchApiError as e:
            return e.response()
        del self.files[f.id]
        return web.json_response({"id": f.id, "object": "file", "deleted": True})

    def _store(self, name: str, lines: list[dict[str, Any]]) -> str:
        data = b"".join(json.dumps(x, ensure_ascii=False).encode() + b"\n" for x in lines)
        f = StoredFile(f"file-{uuid.uuid4().hex}", name, "batch_output", data, _now(), len(lines))
        self.files[f.id] = f  # outputs count against nothing: they are bounded by their inputs
        return f.id

    # -------------------------------------------------------------------------------- jobs
    async def create(self, request: web.Request) -> web.Response:
        try:
            try:
                body = await request.json()
            except (ValueError, RecursionError):
                raise BatchApiError(400, "We could not parse the JSON body of your request.", None) from None
            if not isinstance(body, dict):
                raise BatchApiError(400, "Invalid request body: expected a JSON object.", None)
            job = self._new_job(body)
        except BatchApiError as e:
            return e.response()
        self.jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return web.json_response(job.as_json(), headers=self._quota_headers(job))

    def _new_job(self, body: dict[str, Any]) -> Job:
        fid = body.get("input_file_id")
        if not isinstance(fid, str) or fid not in self.files or self.files[fid].purpose != "batch":
            raise BatchApiError(
                400, "Invalid 'input_file_id': no batch input file has that id.", "invalid_value", "input_file_id"
            )
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise BatchApiError(
                400,
                "Invalid 'endpoint': the local model server supports '/chat/completions'.",
                "invalid_value",
                "endpoint",
            )
        if body.get("completion_window") != WINDOW:
            raise BatchApiError(
                400, "Invalid 'completion_window': supported value is '24h'.", "invalid_value", "completion_window"
            )
        meta = body.get("metadata")
        if meta is not None and not (
            isinstance(meta, dict)
            and len(meta) <= 16
            and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in meta.items()
            )
        ):
            raise BatchApiError(400, "Invalid 'metadata': at most 16 string pairs.", "invalid_value", "metadata")
        deployment, estimate = self._file_estimate(fid)
        self._fail_fast(deployment, estimate)
        if len(self.jobs) >= self.limits.max_batches:
            done = [j for j in self.jobs.values() if j.status in TERMINAL]
            if not done:
                raise BatchApiError(429, "Too many batches in progress.", "too_many_batches")
            oldest = self.jobs.pop(min(done, key=lambda j: j.created_at).id)
            for result in (oldest.output_file_id, oldest.error_file_id):  # its results go with it
                self.files.pop(result or "", None)
        return Job(f"batch_{uuid.uuid4()}", fid, str(endpoint), meta, _now(), deployment=deployment, enqueued=estimate)

    def _file_estimate(self, fid: str) -> tuple[str | None, int]:
        """The deployment a file names first and its prompt tokens: Azure estimates these at create."""
        lines = (json.loads(r).get("body") for r in self.files[fid].data.split(b"\n") if r.strip())
        bodies = [b for b in lines if isinstance(b, dict)]
        model = bodies[0].get("model") if bodies else None
        return (model if isinstance(model, str) else None), sum(self._estimate(b) for b in bodies)

    def _fail_fast(self, deployment: str | None, estimate: int) -> None:
        """Regions with "fail fast" refuse a create whose token estimate does not fit the quota left (400)."""
        quota = self.limits.enqueued_tokens
        if quota and self.limits.fail_fast and self.enqueued(deployment) + estimate > quota:
            raise BatchApiError(400, token_limit_message(quota, deployment), "token_limit_exceeded")

    def _job(self, request: web.Request) -> Job:
        job = self.jobs.get(request.match_info["batch_id"])
        if job is None:
            raise BatchApiError(
                404, f"Batch {request.match_info['batch_id'][:100]} not found.", "not_found", "batch_id"
            )
        return job

    async def retrieve(self, request: web.Request) -> web.Response:
        try:
            job = self._job(request)
        except BatchApiError as e:
            return e.response()
        return web.json_response(job.as_json())

    async def list(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_LIST_LIMIT:
            return BatchApiError(400, f"'limit' must be 1..{MAX_LIST_LIMIT}.", "invalid_value", "limit").response()
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, j.id), reverse=True)
        after = request.query.get("after")
        if after:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        page = jobs[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": [j.as_json() for j in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(jobs) > limit,
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        try:
            job = self._job(request)
        except BatchApiError as e:
            return e.response()
        if job.status in TERMINAL:
            return BatchApiError(409, f"Cannot cancel a batch with status '{job.status}'.", "invalid_state").response()
        self._force(job, "cancel", 0)
        return web.json_response(job.as_json())

    def _force(self, job: Job, action: str, after: int) -> None:
        job.forced, job.stop_after = action, after
        if action == "cancel" and job.status not in TERMINAL:
            job.status = "cancelling"
            job.stamps["cancelling_at"] = _now()
        job.wake.set()

    def enqueued(self, deployment: str | None) -> int:
        return sum(j.enqueued for j in self.jobs.values() if j.deployment == deployment and j.status in ACTIVE)

    def _quota_headers(self, job: Job) -> dict[str, str]:
        """Azure answers a create with the job's token estimate and the deployment's quota (docs/batch.md)."""
        h = {"deployment-enqueued-tokens": str(job.enqueued)}
        if self.limits.enqueued_tokens:
            h["deployment-maximum-enqueued-tokens"] = str(self.limits.enqueued_tokens)
        return h

    # ------------------------------------------------------------------------------ runner
    def _validate(self, job: Job) -> list[tuple[str, dict[str, Any]]]:
        """The (custom_id, body) of each line; job.errors filled (and [] returned) when the file is invalid."""
        lines: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        f = self.files.get(job.input_file_id)
        raw_lines = [] if f is None else [r for r in f.data.split(b"\n") if r.strip()]
        for n, raw in enumerate(raw_lines, start=1):
            obj = json.loads(raw)  # checked at upload
            cid, method, url, body = obj.get("custom_id"), obj.get("method"), obj.get("url"), obj.get("body")
            problem = None
            if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
                problem = (
                    "invalid_request",
                    f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters.",
                )
            elif cid in seen:
                problem = ("duplicate_custom_id", "The custom_id for this request is a duplicate of another request.")
            elif method != "POST":
                problem = ("invalid_request", "The method must be POST.")
            elif url not in ENDPOINTS or url.removeprefix("/v1") != job.endpoint.removeprefix("/v1"):
                problem = ("url_mismatch", "The url does not match the batch's endpoint.")
            elif not isinstance(body, dict) or not isinstance(body.get("model"), str):
                problem = ("invalid_request", "The body must be an object naming the deployment as 'model'.")
            elif job.deployment is not None and body["model"] != job.deployment:
                problem = ("model_mismatch", "Every request in a file must name the same deployment.")
            if problem:
                if len(job.errors) < MAX_ERRORS:
                    job.errors.append({"code": problem[0], "message": problem[1], "param": None, "line": n})
                continue
            seen.add(cid)
            job.deployment = body["model"]
            lines.append((cid, body))
        if not raw_lines:
            job.errors.append(
                {"code": "invalid_file", "message": "The input file no longer exists.", "param": None, "line": None}
            )
        if job.deployment is not None and not job.errors and not self.server.behaviour.knows(job.deployment):
            job.errors.append(
                {
                    "code": "model_not_found",
                    "message": f"The deployment '{job.deployment[:100]}' does not exist or is not a batch deployment.",
                    "param": None,
                    "line": None,
                }
            )
        return [] if job.errors else lines

    def _estimate(self, body: dict[str, Any]) -> int:
        """Prompt tokens of one line as the chat route counts them (0 if it would be refused anyway)."""
        try:
            return self.server.parse(body, None, None).prompt_tokens()
        except Exception:
            return 0

    def _finish(self, job: Job, status: str) -> None:
        job.status = status
        job.stamps[f"{status}_at"] = _now()

    async def _run(self, job: Job) -> None:
        try:
            await self._process(job)
        except Exception:
            job.errors.append({"code": "server_error", "message": "The batch failed.", "param": None, "line": None})
            self._finish(job, "failed")

    async def _process(self, job: Job) -> None:
        await asyncio.sleep(0)  # let create answer `validating` first
        lines = self._validate(job)
        job.total = len(lines)
        if not lines:
            self._finish(job, "failed")
            return
        job.enqueued = sum(self._estimate(b) for _, b in lines)
        quota = self.limits.enqueued_tokens
        if quota and self.enqueued(job.deployment) > quota:  # this job (validating) is already counted
            job.errors.append(
                {
                    "code": "token_limit_exceeded",
                    "message": token_limit_message(quota, job.deployment),
                    "param": None,
                    "line": None,
                }
            )
            job.enqueued = 0
            self._finish(job, "failed")
            return
        if job.forced is None:
            job.status = "in_progress"
            job.stamps["in_progress_at"] = _now()
        if job.forced is None and self.limits.turnaround_s > 0:
            try:
                await asyncio.wait_for(job.wake.wait(), self.limits.turnaround_s)
            except TimeoutError:
                pass
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        done = 0
        for cid, body in lines:
            if job.forced is not None and done >= job.stop_after:
                break
            line = await self._answer(cid, body)
            (out if line["response"]["status_code"] == 200 else err).append(line)
            done += 1
            job.completed, job.failed = len(out), len(err)
        if job.forced == "expire":
            for cid, _ in lines[done:]:
                err.append(
                    {
                        "id": f"batch_req_{uuid.uuid4().hex}",
                        "custom_id": cid,
                        "response": None,
                        "error": {
                            "code": "batch_expired",
                            "message": "This request could not be executed before the completion window expired.",
                        },
                    }
                )
            job.failed = len(err)
        if job.forced is None:
            job.status = "finalizing"
            job.stamps["finalizing_at"] = _now()
        self.server.rng.shuffle(out)  # Azure: "responses won't be returned in identical order" (docs/batch.md)
        # Azure writes both files for every job that ran, the error file empty (0 bytes) when nothing failed
        job.output_file_id = self._store(f"{job.id}_output.jsonl", out)
        job.error_file_id = self._store(f"{job.id}_error.jsonl", err)
        job.enqueued = 0
        if job.forced == "fail":
            job.errors.append(
                {"code": "server_error", "message": "The batch failed (forced).", "param": None, "line": None}
            )
        status = {"fail": "failed", "expire": "expired", "cancel": "cancelled"}.get(job.forced or "", "completed")
        self._finish(job, status)

    async def _answer(self, cid: str, body: dict[str, Any]) -> dict[str, Any]:
        """One output/error file line, answered by the chat route's own code."""
        srv = self.server
        srv.stats.requests += 1
        self.stats.count(cid)
        status, answer = 200, None
        if cid in self.fail_ids:
            status, answer = 500, server_error_body(500)
        else:
            status, answer = await srv.answer_body(body)
        srv.stats.by_status[f"batch:{status}"] += 1
        if status == 200:
            self.stats.answered += 1
        else:
            self.stats.failed += 1
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": cid,
            "response": {"status_code": status, "request_id": str(uuid.uuid4()), "body": answer},
            "error": None,
        }

    # ------------------------------------------------------------------------------- admin
    def state(self) -> dict[str, Any]:
        lim = self.limits
        return {
            "turnaround_s": lim.turnaround_s,
            "enqueued_tokens": lim.enqueued_tokens,
            "fail_fast": lim.fail_fast,
            "fail_custom_ids": sorted(self.fail_ids)[:100],
            "files": len(self.files),
            "batches": len(self.jobs),
        }

    async def admin(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        """POST /admin/batch {turnaround_s, enqueued_tokens, fail_custom_ids}; fields not named stay."""
        if request.method == "POST":
            try:
                turnaround = bounded_number(body, "turnaround_s", self.limits.turnaround_s, lo=0, hi=WINDOW_S)
                quota = bounded_number(
                    body, "enqueued_tokens", self.limits.enqueued_tokens, lo=0, hi=10**12, integer=True
                )
                fail_fast = body.get("fail_fast", self.limits.fail_fast)
                if not isinstance(fail_fast, bool):
                    raise ValueError("fail_fast must be a boolean")
                ids = body.get("fail_custom_ids", sorted(self.fail_ids))
                if (
                    not isinstance(ids, list)
                    or len(ids) > MAX_FAIL_IDS
                    or not all(isinstance(i, str) and len(i) <= MAX_CUSTOM_ID for i in ids)
                ):
                    raise ValueError(f"fail_custom_ids must be a list of at most {MAX_FAIL_IDS} custom_id strings")
            except ValueError as exc:
                return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
            self.limits.turnaround_s, self.limits.enqueued_tokens, self.fail_ids = turnaround, quota, set(ids)
            self.limits.fail_fast = fail_fast
        return web.json_response({"batch": self.state()})

    async def admin_job(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        """POST /admin/batches/{id} {"action": fail|expire|cancel, "after": N}: end a job after N more lines."""
        try:
            job = self._job(request)
        except BatchApiError as e:
            return e.response()
        action = body.get("action")
        if action not in ("fail", "expire", "cancel"):
            return web.json_response(
                error_body("action must be fail, expire or cancel", "invalid_request_error"), status=400
            )
        try:
            after = bounded_number(body, "after", 0, lo=0, hi=self.limits.max_lines, integer=True)
        except ValueError as exc:
            return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
        if job.status in TERMINAL:
            return web.json_response(
                error_body(f"the batch is already {job.status}", "invalid_request_error"), status=409
            )
        self._force(job, action, after)
        return web.json_response(job.as_json())

    async def reset(self) -> None:
        for job in self.jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        self.files.clear()
        self.jobs.clear()
        self.fail_ids.clear()
        self.stats = BatchStats()
        self.limits = BatchLimits(**{k: getattr(self.start_limits, k) for k in BatchLimits.__dataclass_fields__})


def add_routes(app: web.Application, service: BatchService) -> None:
    """The Batch API under /v1 and Azure's /openai/v1, like the chat route."""
    for prefix in ("/v1", "/openai/v1"):
        app.router.add_post(f"{prefix}/files", service.upload)
        app.router.add_get(f"{prefix}/files/{{file_id}}", service.get_file)
        app.router.add_delete(f"{prefix}/files/{{file_id}}", service.delete_file)
        app.router.add_get(f"{prefix}/files/{{file_id}}/content", service.file_content)
        app.router.add_post(f"{prefix}/batches", service.create)
        app.router.add_get(f"{prefix}/batches", service.list)
        app.router.add_get(f"{prefix}/batches/{{batch_id}}", service.retrieve)
        app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", service.cancel)
