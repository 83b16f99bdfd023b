"""The blob path: one dropped blob -> exactly one result or error record.

Task resolution: the nearest `_task.json` in the blob's folder or a parent folder
(cached per worker: TASK_CONFIG_CACHE_ITEMS folders for TASK_CONFIG_TTL_S), else blob metadata,
else DEFAULT_TASK. Permanent failures become `.error.json` records; transient ones raise so the
host retries.

Attempt counters: each transient failure is noted in `<cache container>/attempts/<stem>.json`
(`record_names(name).attempts`; the stem is the record's, see shared/results.py), holding the
blob's etag, the failure count, the task, the job and the last error. They live in the cache
container, not next to the records, because the results container holds records only (every
`.json` there is a record to tools that list it); like the rest of that container they are
worker state, safe to delete. A record (success, failure or poison) removes the note; the
poison record quotes its count and last error. `AttemptLog` is the one place that reads and
writes them, and `blob_record` the one place that builds a record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import telemetry
from .clock import MonotonicClock
from .errors import ImageTooLarge, InternalError, InvalidRequest, UpstreamThrottled, VlmError
from .names import MAX_BLOB_NAME, name_problem
from .options import (
    OPTION_KEYS,
    OptionLimits,
    RequestOptions,
    check_known_keys,
    loads_bounded,
    parse_mode,
    parse_options,
)
from .pipeline import AnalysisRequest, analyze
from .results import ResultWriter, Source, now_iso, record_names
from .telemetry_names import ENTRY_BLOB, SPAN_POISON, VLM_ERROR_CODE, VLM_TASK

if TYPE_CHECKING:
    from .app import App, BlobContainers
    from .settings import Settings

log = logging.getLogger(__name__)
THROTTLE_MIN_WAIT_S = 1.0  # a 429 without retry-after still waits this long before the next try

TASK_FILE = "_task.json"
MANIFEST_FILE = "_manifest.json"
CONTROL_FILES = (TASK_FILE, MANIFEST_FILE)
FOLDER_KEYS = (*OPTION_KEYS, "mode")  # `mode` is a folder's route, not a request option (HTTP refuses it)
TASK_KEYS = set(FOLDER_KEYS)


class InvalidTaskConfig(InvalidRequest):
    code = "invalid_task_config"


class InvalidBlobName(InvalidRequest):
    """A source blob whose name is not a safe name (shared/names.py): recorded, never walked or joined."""

    code = "invalid_blob_name"


class ManifestIncomplete(VlmError):
    """A manifest names images that are not (yet) in the container: retried, then poisoned."""

    status = 503
    code = "manifest_incomplete"
    transient = True


@dataclass
class TaskConfig:
    task: str
    origin: str  # which _task.json, "metadata" or "default"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlobOutcome:
    status: str  # "succeeded", "failed", "skipped", "queued" (batch mode: waiting for batch_collect)
    record: dict[str, Any] | None = None
    reason: str = ""


def _waits_for_manifest(task: str) -> bool:
    """Whether a file of this task waits for its folder's `_manifest.json` (multi-image tasks: the TaskSpec says)."""
    from .tasks import TASKS

    return TASKS[task].waits_for_manifest


def job_fingerprint(fields: dict[str, Any], images: list[bytes]) -> str:
    """What was asked of which bytes: a changed `_task.json` or manifest image makes a new job."""
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for image in images:
        h.update(hashlib.sha256(image).digest())
    return h.hexdigest()


def folders_up(name: str) -> list[str]:
    """'a/b/c.jpg' -> ['a/b/', 'a/', ''] (nearest first); folders too long to hold a `_task.json` are left out."""
    parts = name.split("/")[:-1]
    folders = ["/".join(parts[:i]) + "/" if i else "" for i in range(len(parts), -1, -1)]
    return [f for f in folders if len(f) + len(TASK_FILE) <= MAX_BLOB_NAME]


def is_control_file(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in CONTROL_FILES


_MISSING = object()


class TaskResolver:
    """Finds the nearest `_task.json`; remembers look-ups (including misses) for TASK_CONFIG_TTL_S,
    for at most TASK_CONFIG_CACHE_ITEMS folders (least recently used go first)."""

    def __init__(self, settings: Settings, blobs: BlobContainers) -> None:
        from cachetools import TTLCache

        self.settings = settings
        self.blobs = blobs
        self.limits = OptionLimits.from_settings(settings)
        self._cache: TTLCache[str, dict[str, Any] | InvalidTaskConfig | None] = TTLCache(
            maxsize=max(1, settings.task_config_cache_items), ttl=settings.task_config_ttl_s, timer=time.monotonic
        )

    async def _load(self, folder: str) -> dict[str, Any] | InvalidTaskConfig | None:
        hit = self._cache.get(folder, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        from azure.core.exceptions import ResourceNotFoundError

        path = folder + TASK_FILE
        container = await self.blobs.container(self.settings.images_container)
        value: dict[str, Any] | InvalidTaskConfig | None
        try:
            raw = await (await container.download_blob(path)).readall()
            value = _parse_task_file(raw, path, self.limits)
        except ResourceNotFoundError:
            value = None
        except InvalidTaskConfig as err:
            value = err
        if self.settings.task_config_ttl_s > 0:
            self._cache[folder] = value
        return value

    async def resolve(self, name: str, metadata: dict[str, str] | None) -> TaskConfig:
        for folder in folders_up(name):
            found = await self._load(folder)
            if isinstance(found, InvalidTaskConfig):
                raise found
            if found is not None:
                return TaskConfig(found["task"], folder + TASK_FILE, found)
        meta = {k.lower(): v for k, v in (metadata or {}).items()}
        if meta.get("task"):
            fields = {k: v for k, v in meta.items() if k in TASK_KEYS}
            # bad metadata fails here, on the first attempt
            options = config_options(fields, "metadata", self.limits, default_task=self.settings.default_task)
            _mode(fields, "metadata")
            return TaskConfig(options.task, "metadata", fields)
        return TaskConfig(self.settings.default_task, "default", {"task": self.settings.default_task})


def config_options(
    fields: dict[str, Any],
    source: str,
    limits: OptionLimits,
    *,
    default_task: str,
    default_detail: str = "auto",
) -> RequestOptions:
    """`parse_options` for a folder config or metadata: a caller error becomes a permanent
    `invalid_task_config` naming the field and the file (or "metadata")."""
    try:
        return parse_options(
            fields, source=source, default_task=default_task, default_detail=default_detail, limits=limits
        )
    except VlmError as err:
        if err.status >= 500:
            raise
        where = {"source": "metadata"} if source == "metadata" else {"task_file": source}
        raise InvalidTaskConfig(err.message, details={**err.details, **where}) from None


def _parse_task_file(raw: bytes, path: str, limits: OptionLimits | None = None) -> dict[str, Any]:
    """A `_task.json` (or a manifest's task keys), checked in full: JSON, keys, and every field's type."""
    limits = limits or OptionLimits()
    try:
        doc = loads_bounded(raw, field="the file", limits=limits, source=path)
    except VlmError as err:
        raise InvalidTaskConfig(err.message, details={"task_file": path}) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
        raise InvalidTaskConfig(f'{path} must be an object with a "task" string', details={"task_file": path})
    try:
        check_known_keys(doc, path, FOLDER_KEYS)
        _mode(doc, path)
    except InvalidRequest as err:
        raise InvalidTaskConfig(err.message, details={**err.details, "task_file": path}) from None
    doc["task"] = config_options(doc, path, limits, default_task=doc["task"]).task  # normalised (" OCR " is "ocr")
    return doc


def _batchable(task: str) -> bool:
    from .tasks import task_spec

    return task_spec(task).one_call


def _mode(fields: dict[str, Any], source: str) -> str:
    """The folder's route ("realtime" or "batch"); a bad value is an invalid_task_config on the first attempt."""
    try:
        return parse_mode(fields.get("mode"), source)
    except VlmError as err:
        where = {"source": "metadata"} if source == "metadata" else {"task_file": source}
        raise InvalidTaskConfig(err.message, details={**err.details, **where}) from None


def _is_transient(err: Exception) -> bool:
    """Storage and network trouble is worth a retry; not-found, permission and anything else are not
    (a bug retried five times is still a bug, and hides behind a poison record)."""
    import aiohttp
    from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

    if isinstance(err, (ResourceNotFoundError, ClientAuthenticationError)):
        return False
    if isinstance(err, HttpResponseError) and err.status_code in (401, 403, 404):
        return False
    return isinstance(err, (AzureError, aiohttp.ClientError, OSError, TimeoutError))


def blob_record(
    status: str,
    source: Source,
    *,
    attempts: int,
    task: str | None = None,
    job: str | None = None,
    error: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    task_config: str | None = None,
) -> dict[str, Any]:
    """The one shape of a blob record: a success carries the analysis result, a failure its error."""
    if status == "succeeded":
        assert result is not None
        body = {k: v for k, v in result.items() if k != "model_calls"}
        return {
            "status": status,
            **body,
            "source": source.to_dict(),
            "attempts": attempts,
            "task_config": task_config,
            "job": job,
            "processed_at": now_iso(),
        }
    return {
        "status": status,
        "error": error,
        "source": source.to_dict(),
        "task": task,
        "job": job,
        "attempts": attempts,
        "processed_at": now_iso(),
    }


class AttemptLog:
    """Transient failures of one blob version, noted across instances (see the module docstring)."""

    def __init__(self, blobs: BlobContainers, container: str) -> None:
        self.blobs = blobs
        self.container = container

    async def read(self, name: str, etag: str | None) -> dict[str, Any]:
        """The note for this etag; a fresh one (no failures) when there is none or it is for another version."""
        from azure.core.exceptions import ResourceNotFoundError

        fresh = {"etag": etag, "failures": 0}
        client = await self.blobs.container(self.container)
        try:
            doc = json.loads(await (await client.download_blob(record_names(name).attempts)).readall())
        except (ResourceNotFoundError, json.JSONDecodeError):
            return fresh
        return doc if isinstance(doc, dict) and doc.get("etag") == etag else fresh

    async def note(self, name: str, etag: str | None, err: Exception, task: str, job: str | None) -> None:
        try:
            doc = await self.read(name, etag)
            doc["failures"] = int(doc.get("failures", 0)) + 1
            doc["task"], doc["job"] = task, job
            doc["last_error"] = (
                err.to_dict()["error"]
                if isinstance(err, VlmError)
                else {"code": "transient_error", "message": f"{type(err).__name__} (details in the logs)"}
            )
            doc["at"] = now_iso()
            client = await self.blobs.container(self.container)
            await client.upload_blob(record_names(name).attempts, json.dumps(doc).encode(), overwrite=True)
        except Exception as exc:  # bookkeeping only; the host still retries
            log.warning("could not record the failed attempt for %s: %s", name[:300], type(exc).__name__)

    async def clear(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        client = await self.blobs.container(self.container)
        try:
            await client.delete_blob(record_names(name).attempts)
        except ResourceNotFoundError:
            pass


class BlobProcessor:
    """Processes blobs with the worker's App (the resolver's cache lives there, shared by every blob)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.settings = app.settings
        self.resolver = app.resolver
        self.writer = ResultWriter(app.blobs, app.settings.results_container)
        self.attempts = AttemptLog(app.blobs, app.settings.cache_container)
        self.throttle_waits = 0  # model calls still throttled after the retries, waited out here

    async def _analyze_through_throttling(self, request: AnalysisRequest) -> Any:
        """Throttling is the quota's doing, not this blob's: wait as long as the service says and try again,
        within BLOB_THROTTLE_WAIT_S (below the function timeout), instead of failing the invocation (five
        failures would poison it). Past that budget the 429 goes to the host, which redelivers the blob."""
        budget = self.settings.blob_throttle_wait_s
        clock = getattr(self.app.model, "clock", None) or MonotonicClock()
        deadline = clock.now() + budget
        while True:
            try:
                return await analyze(request, self.app)
            except UpstreamThrottled as err:
                wait = max(THROTTLE_MIN_WAIT_S, err.retry_after_s or THROTTLE_MIN_WAIT_S)
                if clock.now() + wait > deadline:
                    raise
                self.throttle_waits += 1
                log.info("throttled: waiting %.1f s within the blob's throttle budget", wait)
                await clock.sleep(wait)

    async def _schema(self, ref: Any, origin: str) -> dict[str, Any] | None:
        """An inline schema, or one named in the schemas container: the name checked, the blob's size from its properties."""
        if ref is None or isinstance(ref, dict):
            return ref
        details = {"task_file": origin, "field": "schema"}
        if not isinstance(ref, str) or not ref:
            raise InvalidTaskConfig(f"{origin}: schema must be an object or a blob name", details=details)
        problem = name_problem(ref, max_length=MAX_BLOB_NAME - len(".json"))
        if problem is not None:
            raise InvalidTaskConfig(f"{origin}: the schema name {problem}", details=details)
        from azure.core.exceptions import ResourceNotFoundError

        limit = self.settings.max_schema_blob_bytes
        container = await self.app.blobs.container(self.settings.schemas_container)
        for candidate in (ref, ref + ".json"):
            try:
                size, raw = await read_within(container, candidate, limit)
            except ResourceNotFoundError:
                continue
            if raw is None:
                raise InvalidTaskConfig(
                    f"{origin}: schema blob {candidate} is {size} bytes, over MAX_SCHEMA_BLOB_BYTES ({limit})",
                    details={**details, "limit": limit},
                )
            try:
                schema = json.loads(raw)
            except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise InvalidTaskConfig(f"schema blob {candidate} is not valid JSON", details=details) from None
            if not isinstance(schema, dict):
                raise InvalidTaskConfig(f"schema blob {candidate} must hold a JSON object", details=details)
            return schema
        raise InvalidTaskConfig(
            f"{origin} names schema {ref!r}, which is not in the {self.settings.schemas_container} container",
            details={**details, "schema": ref},
        )

    async def process(self, name: str, data: bytes, etag: str | None, metadata: dict[str, str] | None) -> BlobOutcome:
        settings = self.settings
        basename = name.rsplit("/", 1)[-1]
        if basename == TASK_FILE:
            return BlobOutcome("skipped", reason="control file")
        sha = hashlib.sha256(data).hexdigest()
        source = Source(settings.images_container, name, etag, sha, len(data))
        task = settings.default_task
        job: str | None = None
        attempts = 1
        mode = "realtime"
        try:
            problem = name_problem(name)
            if problem is not None:  # never walked for _task.json nor joined with manifest entries
                raise InvalidBlobName(f"the blob name {problem}", details={"field": "name"})
            if basename == MANIFEST_FILE:
                config, images = await self._manifest(name, data)
            else:
                config, images = await self.resolver.resolve(name, metadata), [data]
                if _waits_for_manifest(config.task):
                    log.info("skip %s: part of a %s job, run by its %s", name, config.task, MANIFEST_FILE)
                    return BlobOutcome("skipped", reason=f"waiting for {MANIFEST_FILE}")
            task = config.task
            job = job_fingerprint(config.fields, images)
            existing = await self.writer.existing_for(name, sha, job, etag)
            if existing is not None:
                log.info("skip %s: a record for this content and task exists", name)
                return BlobOutcome("skipped", existing, reason="already processed")
            attempts += int((await self.attempts.read(name, etag)).get("failures", 0))
            request = await self._request(config, images)
            mode = _mode(config.fields, config.origin)
            if mode == "batch" and _batchable(config.task):
                from .batch_jobs import Queued, enqueue

                queued = await enqueue(self, config, name, source, job, request)
                if isinstance(queued, Queued):
                    log.info("queue %s for the batch route: %s", name, "added" if queued.added else "already queued")
                    if attempts > 1:
                        await self.attempts.clear(name)
                    return BlobOutcome("queued", reason=queued.custom_id)
                result = queued  # a cache hit: answered at once
            else:
                with telemetry.entry(ENTRY_BLOB):
                    result = await self._analyze_through_throttling(request)
        except Exception as err:
            transient = err.transient if isinstance(err, VlmError) else _is_transient(err)
            if transient:
                await self.attempts.note(name, etag, err, task, job)
                raise
            if not isinstance(err, VlmError):
                err = InternalError.logged(log, f"unexpected error processing {name[:300]}")
            record = blob_record("failed", source, error=err.to_dict()["error"], task=task, job=job, attempts=attempts)
            await self.writer.write_error(name, record)
            await self.attempts.clear(name)
            return BlobOutcome("failed", record)
        record = blob_record(
            "succeeded", source, result=result.to_dict(), task_config=config.origin, job=job, attempts=attempts
        )
        if mode == "batch":  # answered from the cache, or a task the batch route cannot carry (several calls)
            record["mode"] = "realtime"
            record["mode_note"] = "cache hit" if result.cached else f"task {config.task} makes several model calls"
        await self.writer.write_success(name, record)
        if attempts > 1:
            await self.attempts.clear(name)
        return BlobOutcome("succeeded", record)

    async def too_large(self, name: str, etag: str | None, size: int) -> BlobOutcome:
        """A blob over MAX_IMAGE_BYTES is refused before it is read into memory."""
        limit = self.settings.max_image_bytes
        err = ImageTooLarge(f"the blob is {size} bytes, over MAX_IMAGE_BYTES ({limit})", details={"limit": limit})
        source = Source(self.settings.images_container, name, etag, "", size)
        record = blob_record("failed", source, error=err.to_dict()["error"], attempts=1)
        await self.writer.write_error(name, record)
        return BlobOutcome("failed", record)

    async def _request(self, config: TaskConfig, images: list[bytes]) -> AnalysisRequest:
        settings = self.settings
        options = config_options(
            config.fields,
            config.origin,
            self.resolver.limits,
            default_task=config.task,
            default_detail=settings.default_detail,
        )
        return AnalysisRequest(
            images=images,
            task=options.task,
            prompt=options.prompt,
            detail=options.detail,
            schema=await self._schema(options.schema, config.origin),
            labels=options.labels,
            max_tokens=options.max_tokens,
            pages=options.pages,
            strips=options.strips,
            reasoning_effort=options.reasoning_effort,
        )

    async def _manifest(self, name: str, data: bytes) -> tuple[TaskConfig, list[bytes]]:
        """A multi-image job: `_manifest.json` names the images (relative to its folder; default: all of them).

        Every entry is checked as a name before any storage call (no `..` reaching into other
        containers), the list is capped (MAX_MANIFEST_IMAGES) and each image's size is read from
        its properties before it is downloaded (MAX_IMAGE_BYTES each, MAX_MANIFEST_BYTES together).
        """
        from azure.core.exceptions import ResourceNotFoundError

        settings = self.settings
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InvalidTaskConfig(f"{name} is not valid JSON", details={"manifest": name}) from None
        if not isinstance(doc, dict):
            raise InvalidTaskConfig(f"{name} must be a JSON object", details={"manifest": name})
        folder = name[: -len(MANIFEST_FILE)]
        fields = {k: v for k, v in doc.items() if k in TASK_KEYS}
        if "task" not in fields:
            inherited = await self.resolver.resolve(name, None)
            fields = {**inherited.fields, **fields, "task": inherited.task}
        else:
            _parse_task_file(json.dumps(fields).encode(), name)  # same checks as _task.json
        container = await self.app.blobs.container(settings.images_container)
        cap = settings.max_manifest_images
        listed = doc.get("images")
        if listed is None:
            listed = await _folder_images(container, folder, cap)
        if not isinstance(listed, list) or not all(isinstance(x, str) and x for x in listed):
            raise InvalidTaskConfig(
                f'{name}: "images" must be a list of blob names', details={"manifest": name, "field": "images"}
            )
        if len(listed) > cap:
            raise InvalidTaskConfig(
                f"{name} names {len(listed)} images, over MAX_MANIFEST_IMAGES ({cap})",
                details={"manifest": name, "field": "images", "limit": cap},
            )
        for i, rel in enumerate(listed):
            problem = name_problem(rel) or name_problem(folder + rel)
            if problem is not None:
                raise InvalidTaskConfig(
                    f"{name}: images[{i}] {problem}", details={"manifest": name, "field": f"images[{i}]"}
                )
        per_image, total_limit = settings.max_image_bytes, settings.max_manifest_bytes
        sizes: dict[str, tuple[int, str | None]] = {}
        missing: list[str] = []
        for rel in listed:
            try:
                props = await container.get_blob_client(folder + rel).get_blob_properties()
            except ResourceNotFoundError:
                missing.append(rel)
                continue
            sizes[rel] = (int(props.size), props.etag)
        if missing:
            raise ManifestIncomplete(
                f"{name} lists {len(missing)} images that are not in the container yet: {', '.join(missing[:10])}",
                details={"manifest": name, "missing": missing[:100]},
            )
        for i, rel in enumerate(listed):
            if sizes[rel][0] > per_image:
                raise ImageTooLarge(
                    f"{name}: images[{i}] is {sizes[rel][0]} bytes, over MAX_IMAGE_BYTES ({per_image})",
                    details={"manifest": name, "field": f"images[{i}]", "limit": per_image},
                )
        total = sum(sizes[rel][0] for rel in listed)
        if total > total_limit:
            raise ImageTooLarge(
                f"{name}: its images add up to {total} bytes, over MAX_MANIFEST_BYTES ({total_limit})",
                details={"manifest": name, "field": "images", "limit": total_limit},
            )
        images = []
        for rel in listed:
            images.append(await _download_unchanged(container, folder + rel, sizes[rel][1]))
        return TaskConfig(fields["task"], name, fields), images

    async def record_poison(self, name: str, etag: str | None) -> dict[str, Any]:
        """After the host gave up on a blob: an `.error.json` with the last error seen, so nothing is lost silently."""
        tel = telemetry.current(self.settings)
        with tel.span(SPAN_POISON) as span:
            record = await self._poison_record(name, etag)
            span.set_attributes({VLM_TASK: record.get("task") or "unknown", VLM_ERROR_CODE: "poison"})
        tel.poison(record.get("task"))
        return record

    async def _poison_record(self, name: str, etag: str | None) -> dict[str, Any]:
        from azure.core.exceptions import ResourceNotFoundError

        container = await self.app.blobs.container(self.settings.images_container)
        size, data = 0, None
        if name_problem(name) is None:  # an unsafe name is recorded (under a hashed name) but never read
            try:
                size, data = await read_within(container, name, self.settings.max_image_bytes)
            except ResourceNotFoundError:
                pass  # deleted since: still record that it was given up on
        sha = hashlib.sha256(data).hexdigest() if data else ""  # "" when absent or too large to hash
        previous = await self.attempts.read(name, etag)
        last = previous.get("last_error") or {"code": "unknown", "message": "no failure was recorded"}
        error = {
            "code": "poison",
            "message": f"gave up after {previous.get('failures', 0) or 'repeated'} failed attempts; "
            f"last error: {last.get('code')}: {last.get('message')}",
            "details": {"last_error": last},
        }
        record = blob_record(
            "failed",
            Source(self.settings.images_container, name, etag, sha, size),
            error=error,
            task=previous.get("task"),
            job=previous.get("job"),
            attempts=previous.get("failures", 0),
        )
        await self.writer.write_error(name, record)
        await self.attempts.clear(name)
        return record


async def read_within(container: Any, blob: str, limit: int) -> tuple[int, bytes | None]:
    """(size, content) of a blob; its size comes from its properties, and the content is None
    (never downloaded) when that is over `limit`. Raises ResourceNotFoundError."""
    props = await container.get_blob_client(blob).get_blob_properties()
    size = int(props.size)
    if size > limit:
        return size, None
    return size, await _download_unchanged(container, blob, props.etag)


async def _download_unchanged(container: Any, blob: str, etag: str | None) -> bytes:
    """The blob's content if it still has `etag` (a blob rewritten since its size was checked
    fails with ResourceModifiedError, a storage error: retried, then checked again)."""
    from azure.core import MatchConditions

    if etag is None:
        return await (await container.download_blob(blob)).readall()
    downloader = await container.download_blob(blob, etag=etag, match_condition=MatchConditions.IfNotModified)
    return await downloader.readall()


async def _folder_images(container: Any, folder: str, cap: int) -> list[str]:
    """The folder's own files (not its subfolders' nor control files), in name order; refuses a
    folder with more than `cap` of them (or 10x as many entries of any kind) without listing the rest."""
    names: list[str] = []
    seen = 0
    async for item in container.walk_blobs(name_starts_with=folder, delimiter="/"):
        seen += 1
        rel = item.name[len(folder) :]
        if rel and not rel.endswith("/") and rel not in CONTROL_FILES:  # not a subfolder (BlobPrefix)
            names.append(rel)
        if len(names) > cap or seen > 10 * cap + 10:
            raise InvalidTaskConfig(
                f"{folder}{MANIFEST_FILE} takes every file in its folder, which holds more than "
                f"MAX_MANIFEST_IMAGES ({cap}); list the images in it",
                details={"manifest": folder + MANIFEST_FILE, "field": "images", "limit": cap},
            )
    return sorted(names)
