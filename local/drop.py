"""Drop a folder into the images container and wait for its results (issue #3 part 6).

The blob pipeline is driven by files landing in ``images/``; this tool is how a person uses it from
a shell: configure the folder's task once (``_task.json``), upload everything that is an image or a
PDF, then watch ``results/`` until every upload has a result that belongs to *this* upload (same
sha256), and leave a JSONL/CSV table behind for whoever has to look at the numbers afterwards.

    python -m local.drop FOLDER [--prefix invoices/] [--task invoice] [--mode batch] [--wait/--no-wait] ...
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import ContentSettings
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from shared.errors import UnsupportedMediaType
from shared.image_formats import sniff as sniff_format
from shared.names import name_problem
from shared.results import record_names
from shared.storage import dev_connection_string, expand_connection_string

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_SETTINGS = REPO_ROOT / "local.settings.json"
TASK_FILE = "_task.json"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PENDING = 2
EXIT_ERROR = 3

# --------------------------------------------------------------------------- format sniffing

SNIFF_BYTES = 1024

CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "heic": "image/heic",
    "heif": "image/heif",
    "pdf": "application/pdf",
}


def sniff(head: bytes) -> str | None:
    """Name the format from the first bytes (the service's own sniffer), or None if it is not analysable."""
    try:
        return sniff_format(head)
    except UnsupportedMediaType:
        return None


# --------------------------------------------------------------------------- options and results


@dataclass
class DropOptions:
    """Everything the CLI can say; the test and other tools build this directly."""

    folder: Path
    prefix: str = ""
    task: str | None = None
    prompt: str | None = None
    detail: str | None = None
    schema: str | None = None
    mode: str | None = None  # "batch" | "realtime" (the folder's route); None: not written
    wait: bool = True
    timeout: float = 600.0
    out: Path | None = Path("drop-results")
    connection_string: str | None = None
    account_url: str | None = None
    images_container: str = "images"
    results_container: str = "results"
    cache_container: str = "cache"  # where the service keeps its batch jobs (progress by batch state)
    concurrency: int = 8
    poll_interval: float = 2.0
    progress_interval: float = 5.0
    settings_path: Path = LOCAL_SETTINGS

    def task_config(self) -> dict[str, str] | None:
        """The `_task.json` body for the given flags (only keys given), or None without --task."""
        if not self.task:
            return None
        body = {"task": self.task, "prompt": self.prompt, "detail": self.detail, "schema": self.schema}
        body["mode"] = self.mode
        return {k: v for k, v in body.items() if v is not None}


@dataclass
class Skipped:
    """A file that was not uploaded, and why (so the user sees nothing was silently dropped)."""

    file: str
    reason: str


@dataclass
class Row:
    """One line of the results table: one file from the folder."""

    file: str
    blob: str
    status: str  # ok | failed | pending
    error_code: str | None = None
    task: str | None = None
    model: str | None = None
    deployment: str | None = None
    tokens: int | None = None
    cost_usd: float | None = None
    cached: bool | None = None
    result_blob: str | None = None


COLUMNS = tuple(f.name for f in fields(Row))  # the JSONL and CSV columns, in order


@dataclass
class Summary:
    """What `drop()` did; `exit_code` is what the CLI returns."""

    rows: list[Row] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    task_blobs: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    waited: bool = True
    jsonl_path: Path | None = None
    csv_path: Path | None = None

    @property
    def uploaded(self) -> int:
        return sum(1 for r in self.rows if r.error_code != "upload_failed")

    @property
    def ok(self) -> int:
        return sum(1 for r in self.rows if r.status == "ok")

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r.status == "failed")

    @property
    def pending(self) -> list[Row]:
        return [r for r in self.rows if r.status == "pending"]

    @property
    def failed_by_code(self) -> dict[str, int]:
        return dict(Counter(r.error_code or "unknown" for r in self.rows if r.status == "failed"))

    @property
    def total_tokens(self) -> int:
        return sum(r.tokens or 0 for r in self.rows)

    @property
    def cost_usd(self) -> float:
        return sum(r.cost_usd or 0.0 for r in self.rows)

    @property
    def cached(self) -> int:
        return sum(1 for r in self.rows if r.cached)

    @property
    def exit_code(self) -> int:
        if self.waited and self.pending:
            return EXIT_PENDING
        if self.failed:
            return EXIT_FAILED
        return EXIT_OK

    def render(self) -> str:
        """The human summary printed at the end."""
        lines = [
            f"uploaded {self.uploaded} file(s), skipped {len(self.skipped)}"
            + (f", task config {', '.join(self.task_blobs)}" if self.task_blobs else ""),
        ]
        if self.waited:
            codes = ", ".join(f"{c}: {n}" for c, n in sorted(self.failed_by_code.items()))
            lines.append(
                f"done {self.ok + self.failed}/{len(self.rows)}: {self.ok} ok, {self.failed} failed"
                + (f" ({codes})" if codes else "")
            )
            lines.append(
                f"tokens {self.total_tokens}, estimated cost ${self.cost_usd:.4f}, "
                f"cached {self.cached}, elapsed {self.elapsed_s:.1f} s"
            )
            for r in self.rows:
                if r.status == "failed":
                    lines.append(f"  failed  {r.blob}: {r.error_code}")
            if self.pending:
                lines.append(f"still pending after the timeout ({len(self.pending)}):")
                lines.extend(f"  pending {r.blob}" for r in self.pending)
        else:
            upload_failures = [r for r in self.rows if r.status == "failed"]
            lines.append(f"not waiting for results (--no-wait), elapsed {self.elapsed_s:.1f} s")
            lines.extend(f"  failed  {r.blob}: {r.error_code}" for r in upload_failures)
        if self.jsonl_path:
            lines.append(f"results table: {self.jsonl_path} (and {self.csv_path})")
        return "\n".join(lines)


@dataclass
class _Upload:
    """A file chosen for upload, before and after it went up."""

    path: Path
    rel: str
    blob: str
    kind: str
    sha256: str = ""
    etag: str | None = None  # as uploaded: with the job fingerprint it names the file's batch request
    row: Row | None = None
    seen_etags: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- storage connection


def resolve_storage(options: DropOptions) -> tuple[str | None, str | None]:
    """(connection string, account url): flags first, then local.settings.json, then Azurite."""
    if options.account_url:
        return None, options.account_url
    if options.connection_string:
        return expand_connection_string(options.connection_string), None
    values: dict[str, Any] = {}
    try:
        values = json.loads(options.settings_path.read_text(encoding="utf-8")).get("Values", {})
    except FileNotFoundError:
        pass
    if values.get("VlmStorage"):
        return expand_connection_string(values["VlmStorage"]), None
    if values.get("VlmStorage__blobServiceUri"):
        return None, values["VlmStorage__blobServiceUri"]
    return dev_connection_string(), None


def add_storage_flags(p: argparse.ArgumentParser) -> None:
    """--connection-string / --account-url, as local.drop and local.report both take them."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--connection-string", help="storage connection string (default: local.settings.json, Azurite)")
    where.add_argument(
        "--account-url", help="https://ACCOUNT.blob.core.windows.net, signed in with DefaultAzureCredential"
    )


@asynccontextmanager
async def blob_service(options: DropOptions) -> AsyncIterator[BlobServiceClient]:
    """The storage `resolve_storage` names, open: a connection string, or an account URL signed in with
    DefaultAzureCredential (closed afterwards). local.report opens its storage the same way."""
    conn, account_url = resolve_storage(options)
    credential = None
    if account_url:
        from azure.identity.aio import DefaultAzureCredential

        credential = DefaultAzureCredential()
        service = BlobServiceClient(account_url, credential=credential)
    else:
        assert conn is not None
        service = BlobServiceClient.from_connection_string(conn)
    try:
        async with service:
            yield service
    finally:
        if credential is not None:
            await credential.close()


# --------------------------------------------------------------------------- scanning the folder


def normalise_prefix(prefix: str) -> str:
    """'invoices' and '/invoices/' both mean the folder 'invoices/' in the container."""
    prefix = prefix.replace("\\", "/").strip("/")
    return f"{prefix}/" if prefix else ""


def _walk(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """Yield (file, skip reason or None), pruning hidden directories instead of descending."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith("."):
                yield here / d, "hidden directory"
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield here / name, "hidden file" if name.startswith(".") else None


def scan(folder: Path, prefix: str) -> tuple[list[_Upload], list[_Upload], list[Skipped]]:
    """Split the folder into task configs, uploadable files, and skipped files."""
    tasks: list[_Upload] = []
    files: list[_Upload] = []
    skipped: list[Skipped] = []
    for path, reason in _walk(folder):
        rel = path.relative_to(folder).as_posix()
        if reason:
            skipped.append(Skipped(rel, reason))
            continue
        problem = name_problem(prefix + rel)
        if problem is not None:  # the service would only record it as invalid_blob_name
            skipped.append(Skipped(rel, f"its blob name {problem}"))
            continue
        if path.name == TASK_FILE:
            tasks.append(_Upload(path, rel, prefix + rel, "task"))
            continue
        try:
            with path.open("rb") as f:
                kind = sniff(f.read(SNIFF_BYTES))
        except OSError as exc:
            skipped.append(Skipped(rel, f"unreadable: {exc}"))
            continue
        if kind is None:
            skipped.append(Skipped(rel, "not an image or PDF"))
            continue
        files.append(_Upload(path, rel, prefix + rel, kind))
    return tasks, files, skipped


def _read_and_hash(path: Path) -> tuple[bytes, str]:
    """Read a file and hash it in the same pass; the hash is how we recognise our own result."""
    digest = hashlib.sha256()
    chunks = []
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            chunks.append(chunk)
    return b"".join(chunks), digest.hexdigest()


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line bar on a TTY, periodic plain lines otherwise (CI logs hate carriage returns)."""

    def __init__(self, total: int, stream: TextIO, interval: float, width: int = 30) -> None:
        self.total, self.stream, self.interval, self.width = total, stream, interval, width
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.last_line = 0.0
        self.last_text = ""

    def line(self, done: int, failed: int, states: dict[str, int] | None = None) -> str:
        frac = done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * max(0, self.width - filled - 1)
        batch = "".join(f"{states[s]} {s}, " for s in BATCH_STATES if states) if states else ""
        return f"[{bar}] {batch}{done}/{self.total} done, {failed} failed, {time.monotonic() - self.start:.1f} s"

    def update(self, done: int, failed: int, final: bool = False, states: dict[str, int] | None = None) -> None:
        text = self.line(done, failed, states)
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
            self.stream.flush()
            return
        now = time.monotonic()
        if final or now - self.last_line >= self.interval:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_line = now


# --------------------------------------------------------------------------- the tool


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _ensure_container(container: ContainerClient) -> None:
    try:
        await container.create_container()
    except ResourceExistsError:
        pass


async def _upload_one(container: ContainerClient, item: _Upload, sem: asyncio.Semaphore) -> None:
    """Upload one file (overwriting), recording its sha256; an upload error becomes a failed row."""
    async with sem:
        try:
            data, item.sha256 = await asyncio.to_thread(_read_and_hash, item.path)
            content_type = "application/json" if item.kind == "task" else CONTENT_TYPES[item.kind]
            sent = await container.get_blob_client(item.blob).upload_blob(  # the blob client's answer has the etag
                data, overwrite=True, content_settings=ContentSettings(content_type=content_type)
            )
            item.etag = sent.get("etag")
        except Exception as exc:  # any failure to upload is reported per file, not fatal for the rest
            item.row = Row(item.rel, item.blob, "failed", error_code="upload_failed")
            _say(f"upload failed: {item.rel}: {exc}")


def _row_from_record(item: _Upload, record: dict[str, Any], result_blob: str) -> Row:
    """Turn a result/error record into a table row."""
    if record.get("status") == "failed" or result_blob == record_names(item.blob).error:
        error = record.get("error") or {}
        return Row(
            item.rel,
            item.blob,
            "failed",
            error_code=error.get("code") or "unknown",
            task=record.get("task"),
            result_blob=result_blob,
        )
    usage = record.get("usage") or {}
    return Row(
        item.rel,
        item.blob,
        "ok",
        task=record.get("task"),
        model=record.get("model"),
        deployment=record.get("deployment"),
        tokens=usage.get("total_tokens"),
        cost_usd=record.get("cost_usd"),
        cached=record.get("cached"),
        result_blob=result_blob,
    )


async def _check_one(results: ContainerClient, item: _Upload, listing: dict[str, str], sem: asyncio.Semaphore) -> None:
    """Read this upload's result (or error) record if it changed, and accept it if the sha256 is ours.

    Record names come from shared.results.record_names, the service's own mapping (escaped, or
    hashed when long), so this never guesses a suffix.
    """
    names = record_names(item.blob)
    for name in (names.success, names.error):  # a success wins over an older error
        etag = listing.get(name)
        if etag is None or item.seen_etags.get(name) == etag:
            continue
        async with sem:
            try:
                raw = await (await results.download_blob(name)).readall()
            except ResourceNotFoundError:
                continue
        item.seen_etags[name] = etag
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # half-written or foreign; look again when its etag changes
        if (record.get("source") or {}).get("sha256") == item.sha256:
            item.row = _row_from_record(item, record, name)
            return


BATCH_STATES = ("pending", "submitted", "in progress")  # then "done": the record arrived
_IN_PROGRESS = ("in_progress", "finalizing", "cancelling")


def _batch_ids(items: list[_Upload], config: dict[str, Any] | None) -> dict[str, str]:
    """Each upload's batch custom_id, as the service computes it (shared.batch.custom_id over the blob,
    its etag and the job fingerprint of the folder config and bytes); {} when the files are not ours to name."""
    if not config:
        return {}
    from shared.batch import custom_id
    from shared.blob_job import job_fingerprint

    fields = {**config, "task": str(config["task"]).strip().lower()}  # normalised as the service does
    ids = {}
    for item in items:
        if item.kind != "task" and item.etag and item.row is None:
            data = item.path.read_bytes()
            ids[item.blob] = custom_id(item.blob, item.etag, job_fingerprint(fields, [data]))
    return ids


async def _batch_states(cache: ContainerClient, waiting: list[_Upload], ids: dict[str, str]) -> dict[str, int]:
    """How many waiting files are pending (queued, no job yet), submitted (in a job being created or
    validated) or in progress, from the service's job documents (shared/batch_store.py)."""
    status: dict[str, str] = {}
    try:
        async for blob in cache.list_blobs(name_starts_with="batch/jobs/"):
            try:
                doc = json.loads(await (await cache.download_blob(blob.name)).readall())
            except (ResourceNotFoundError, ValueError):
                continue  # collected meanwhile, or half-written
            state = "in progress" if doc.get("status") in _IN_PROGRESS else "submitted"
            for cid in doc.get("items") or []:
                status[cid] = state
    except ResourceNotFoundError:
        pass  # no cache container yet
    counts = dict.fromkeys(BATCH_STATES, 0)
    for item in waiting:
        counts[status.get(ids.get(item.blob, ""), "pending")] += 1
    return counts


async def _wait_for_results(
    results: ContainerClient,
    items: list[_Upload],
    options: DropOptions,
    stream: TextIO,
    cache: ContainerClient | None = None,
    batch_ids: dict[str, str] | None = None,
) -> None:
    """Poll the results container (one listing per round) until every upload has its result or time runs out."""
    waiting = [i for i in items if i.row is None]
    total = len(items)
    progress = Progress(total, stream, options.progress_interval)
    deadline = time.monotonic() + options.timeout
    sem = asyncio.Semaphore(options.concurrency)
    prefix = normalise_prefix(options.prefix)

    def counts() -> tuple[int, int]:
        arrived = [i for i in items if i.row is not None]
        return len(arrived), sum(1 for i in arrived if i.row and i.row.status == "failed")

    while True:
        if waiting:
            listing: dict[str, str] = {}
            try:
                async for blob in results.list_blobs(name_starts_with=prefix or None):
                    listing[blob.name] = blob.etag
            except ResourceNotFoundError:
                pass  # no results container yet: nothing has finished
            await asyncio.gather(*(_check_one(results, i, listing, sem) for i in waiting))
            waiting = [i for i in waiting if i.row is None]
        done, failed = counts()
        states = await _batch_states(cache, waiting, batch_ids or {}) if cache is not None else None
        if not waiting or time.monotonic() >= deadline:
            progress.update(done, failed, final=True, states=states)
            return
        progress.update(done, failed, states=states)
        await asyncio.sleep(min(options.poll_interval, max(0.0, deadline - time.monotonic())))


def write_table(rows: list[Row], out: Path) -> tuple[Path, Path]:
    """Write the JSONL and CSV tables; `out` is a directory, or a path whose stem names both files."""
    if out.suffix in (".jsonl", ".csv"):
        stem = out.with_suffix("")
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        stem = out / stamp
        n = 1
        while stem.with_suffix(".jsonl").exists():  # two runs in the same second keep both tables
            n += 1
            stem = out / f"{stamp}-{n}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    jsonl_path, csv_path = stem.with_suffix(".jsonl"), stem.with_suffix(".csv")
    with jsonl_path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row)) + "\n")
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return jsonl_path, csv_path


async def drop(
    options: DropOptions,
    *,
    say: Callable[[str], None] = _say,
    progress_stream: TextIO | None = None,
) -> Summary:
    """Upload the folder (task config first), optionally wait for results, and write the table."""
    started = time.monotonic()
    folder = options.folder
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    prefix = normalise_prefix(options.prefix)
    task_items, items, skipped = scan(folder, prefix)
    config = options.task_config()
    if config is not None:
        overridden = [t for t in task_items if t.blob == prefix + TASK_FILE]
        for t in overridden:
            skipped.append(Skipped(t.rel, "replaced by --task"))
            task_items.remove(t)
    for s in skipped:
        say(f"skipped {s.file}: {s.reason}")

    summary = Summary(skipped=skipped, waited=options.wait)
    async with blob_service(options) as service:
        images = service.get_container_client(options.images_container)
        await _ensure_container(images)
        # The task config must exist before any image lands, or the trigger uses the default task.
        if config is not None:
            blob = prefix + TASK_FILE
            await images.upload_blob(
                blob,
                json.dumps(config).encode(),
                overwrite=True,
                content_settings=ContentSettings(content_type="application/json"),
            )
            summary.task_blobs.append(blob)
        sem = asyncio.Semaphore(max(1, options.concurrency))
        await asyncio.gather(*(_upload_one(images, t, sem) for t in task_items))
        for t in task_items:
            if t.row is not None:
                raise RuntimeError(f"could not upload task config {t.rel}; not uploading the images")
            summary.task_blobs.append(t.blob)
        await asyncio.gather(*(_upload_one(images, i, sem) for i in items))
        say(f"uploaded {sum(1 for i in items if i.row is None)} file(s) to {options.images_container}/{prefix}")

        if options.wait and items:
            results = service.get_container_client(options.results_container)
            cache = ids = None
            if options.mode == "batch":
                cache = service.get_container_client(options.cache_container)
                ids = _batch_ids(items, config)
            await _wait_for_results(results, items, options, progress_stream or sys.stderr, cache, ids)

    default_task = config.get("task") if config else None
    summary.rows = [i.row or Row(i.rel, i.blob, "pending", task=default_task) for i in items]
    summary.elapsed_s = time.monotonic() - started
    if options.out is not None:
        summary.jsonl_path, summary.csv_path = write_table(summary.rows, options.out)
    return summary


# --------------------------------------------------------------------------- CLI

EPILOG = """\
exit codes:
  0  every file has a successful result (or, with --no-wait, every file was uploaded)
  1  some files failed permanently (results/<blob>.error.json) or could not be uploaded
  2  --timeout passed with results still pending (also: bad command line)
  3  the tool itself failed (folder missing, storage unreachable, ...)

A result counts only if its source.sha256 equals the uploaded file's, so a stale result left by an
earlier file with the same name is ignored.
"""


def parse_args(argv: list[str] | None = None) -> DropOptions:
    """Build DropOptions from the command line."""
    p = argparse.ArgumentParser(
        prog="python -m local.drop",
        description="Upload a folder of images/PDFs to the images container and collect the results.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="folder to upload (recursively; hidden files are skipped)")
    p.add_argument("--prefix", default="", help="folder in the images container, e.g. invoices/")
    p.add_argument("--task", help="write <prefix>_task.json with this task before uploading")
    p.add_argument("--prompt", help="prompt for _task.json (with --task)")
    p.add_argument("--detail", choices=["low", "high", "auto"], help="image detail for _task.json (with --task)")
    p.add_argument("--schema", help="schema name (in the schemas container) for _task.json (with --task)")
    p.add_argument(
        "--mode",
        choices=["realtime", "batch"],
        help="the folder's route for _task.json (with --task): batch queues files for the Batch API at half "
        "price (answers within 24 h on Azure); progress then shows pending, submitted, in progress, done",
    )
    p.add_argument(
        "--wait", action=argparse.BooleanOptionalAction, default=True, help="wait for results (default: yes)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for results (default 600)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("drop-results"),
        help="folder for the <timestamp>.jsonl/.csv results table, or a .jsonl/.csv path (default drop-results/)",
    )
    add_storage_flags(p)
    p.add_argument("--images-container", default="images")
    p.add_argument("--results-container", default="results")
    p.add_argument("--cache-container", default="cache", help="where the service keeps batch jobs (--mode batch)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel uploads and downloads (default 8)")
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between looks at results (default 2)")
    a = p.parse_args(argv)
    for flag in ("prompt", "detail", "schema", "mode"):
        if getattr(a, flag) and not a.task:
            p.error(f"--{flag} needs --task")
    if a.concurrency < 1:
        p.error("--concurrency must be at least 1")
    return DropOptions(
        folder=a.folder,
        prefix=a.prefix,
        task=a.task,
        prompt=a.prompt,
        detail=a.detail,
        schema=a.schema,
        mode=a.mode,
        wait=a.wait,
        timeout=a.timeout,
        out=a.out,
        connection_string=a.connection_string,
        account_url=a.account_url,
        images_container=a.images_container,
        results_container=a.results_container,
        cache_container=a.cache_container,
        concurrency=a.concurrency,
        poll_interval=a.poll_interval,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run `drop()`, print the summary, return the exit code."""
    options = parse_args(argv)
    try:
        summary = asyncio.run(drop(options))
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as exc:
        _say(f"drop failed: {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    print(summary.render())
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
