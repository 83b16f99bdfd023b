"""The blob trigger, with the real host's bookkeeping: receipts, retries, poison messages.

Azure delivers blob events through Event Grid (`"source": "EventGrid"`); locally nothing pushes,
so the container is polled (a names-and-ETags listing every `poll_interval_s`, or less often when listing a large
container would otherwise take more than a fifth of the host's time: see POLL_DUTY). Each blob *version* (name,
ETag) is handled once:

- A receipt `azure-webjobs-hosts/blobreceipts/<hostId>/<functionId>/"<etag>"/<container>/<blob>`
  (the real host's path; an empty blob without the `Incomplete` metadata key means done) is
  written after success or after the blob is declared poison, so a restarted host skips what is
  done and carries on with the rest. A rewritten blob has a new ETag, so it triggers again.
- A failed invocation is retried with exponential backoff; after `poison_threshold` failed
  attempts (host.json `extensions.blobs.poisonBlobThreshold`, default 5) the real host's message
  `{"Type":"BlobTrigger","FunctionId":"Host.Functions.<name>","BlobType":"BlockBlob",
  "ContainerName":...,"BlobName":...,"ETag":"\"0x...\""}` goes, base64-encoded like every message
  the Functions queue extension writes, to the queue `webjobs-blobtrigger-poison` of the same
  storage account.
- Invocations of all blob-triggered functions together are bounded by host.json
  `extensions.blobs.maxDegreeOfParallelism`.

Difference from Azure: the real host writes the receipt when it queues the blob internally and
retries through that queue; here the receipt is written when the blob is finished. Delivery is at
least once in both (work cut short by a stop is redone on the next start).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.functions.blob import InputStream

from local.blob_listing import list_versions
from local.host_loader import LoadedFunction, stop_listener
from local.host_storage import StorageConnection

log = logging.getLogger("local.host")

RECEIPTS_CONTAINER = "azure-webjobs-hosts"
RECEIPTS_DIRECTORY = "blobreceipts"
POISON_QUEUE = "webjobs-blobtrigger-poison"
INCOMPLETE_KEY = "Incomplete"
# A listing costs Azurite ~0.1 ms of CPU per blob (and the host ~0.04 ms with local/blob_listing.py; the
# SDK's list_blobs took 0.3 ms): at a 0.2 s interval a container of a few hundred blobs would take a
# third of a core from the functions the host runs. The pause after a scan is at least
# (1 - POLL_DUTY) / POLL_DUTY times the scan's own length: a 300-blob container is scanned about once
# a second, a 50-blob one every poll interval.
POLL_DUTY = 0.05


def quoted_etag(etag: str) -> str:
    """ETags as the HTTP header carries them ("0x..."); listings return them unquoted."""
    etag = etag.strip()
    return etag if etag.startswith('"') else f'"{etag}"'


def receipt_blob_name(host_id: str, function_id: str, etag: str, container: str, blob_name: str) -> str:
    """The receipt's name inside `azure-webjobs-hosts`; the ETag goes before the (slashed) blob name."""
    return f"{RECEIPTS_DIRECTORY}/{host_id}/{function_id}/{quoted_etag(etag)}/{container}/{blob_name}"


def poison_message(function_id: str, container: str, blob_name: str, etag: str, blob_type: str = "BlockBlob") -> str:
    """The JSON the real host puts on `webjobs-blobtrigger-poison` (before base64)."""
    return json.dumps(
        {
            "Type": "BlobTrigger",
            "FunctionId": function_id,
            "BlobType": blob_type,
            "ContainerName": container,
            "BlobName": blob_name,
            "ETag": quoted_etag(etag),
        },
        separators=(",", ":"),
    )


def encode_message(text: str) -> str:
    """Base64, the Functions queue extension's default `messageEncoding`."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


@dataclass(frozen=True)
class BlobPathPattern:
    """A blobTrigger `path` like `images/{name}` or `in/{folder}/{name}.jpg` (after %SETTING% resolution)."""

    container: str
    blob_pattern: str
    regex: re.Pattern[str]
    prefix: str

    @classmethod
    def parse(cls, path: str) -> BlobPathPattern:
        container, _, blob_pattern = path.strip("/").partition("/")
        if not container or "{" in container:
            raise ValueError(f"blob trigger path {path!r}: the container must be a literal name")
        blob_pattern = blob_pattern or "{name}"
        parts: list[str] = []
        pos = 0
        for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", blob_pattern):
            parts.append(re.escape(blob_pattern[pos : m.start()]))
            parts.append(f"(?P<{m.group(1)}>.+?)")
            pos = m.end()
        parts.append(re.escape(blob_pattern[pos:]))
        prefix = blob_pattern.split("{", 1)[0]
        return cls(container, blob_pattern, re.compile("".join(parts) + r"\Z", re.DOTALL), prefix)

    def match(self, blob_name: str) -> dict[str, str] | None:
        m = self.regex.match(blob_name)
        return m.groupdict() if m else None


@dataclass(frozen=True)
class RetryPolicy:
    """Delay before the next attempt after `failures` failed ones: base, 2*base, 4*base... up to max."""

    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay(self, failures: int) -> float:
        if self.base_delay_s <= 0:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * (2 ** max(0, failures - 1)))


InvocationLogger = Callable[..., None]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def blob_properties_dict(props: Any, etag: str) -> dict[str, Any]:
    """Blob properties under the .NET names the worker passes (`ETag`, `ContentLength`, `LastModified`, ...)."""
    cs = getattr(props, "content_settings", None)
    md5 = getattr(cs, "content_md5", None) if cs is not None else None
    blob_type = str(getattr(props, "blob_type", "BlockBlob"))
    blob_type = {
        "BlobType.BLOCKBLOB": "BlockBlob",
        "BlobType.PAGEBLOB": "PageBlob",
        "BlobType.APPENDBLOB": "AppendBlob",
    }.get(blob_type, blob_type)
    return {
        "ETag": etag,
        "Etag": etag,
        "ContentLength": int(getattr(props, "size", 0) or 0),
        "Length": int(getattr(props, "size", 0) or 0),
        "ContentType": getattr(cs, "content_type", None) if cs is not None else None,
        "ContentEncoding": getattr(cs, "content_encoding", None) if cs is not None else None,
        "ContentLanguage": getattr(cs, "content_language", None) if cs is not None else None,
        "ContentDisposition": getattr(cs, "content_disposition", None) if cs is not None else None,
        "CacheControl": getattr(cs, "cache_control", None) if cs is not None else None,
        "ContentMD5": base64.b64encode(bytes(md5)).decode("ascii") if md5 else None,
        "LastModified": _iso(getattr(props, "last_modified", None)),
        "CreatedOn": _iso(getattr(props, "creation_time", None)),
        "BlobType": blob_type,
        "Metadata": dict(getattr(props, "metadata", None) or {}),
    }


@dataclass
class BlobTriggerListener:
    """Watches one container for one function and drives its invocations."""

    fn: LoadedFunction
    pattern: BlobPathPattern
    storage: StorageConnection
    host_id: str
    poison_threshold: int
    parallelism: asyncio.Semaphore
    retry: RetryPolicy
    poll_interval_s: float
    timeout_s: float | None
    log_invocation: InvocationLogger
    _known: set[tuple[str, str]] = field(default_factory=set, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _poller: asyncio.Task[None] | None = field(default=None, repr=False)
    _ready: bool = field(default=False, repr=False)

    @property
    def function_id(self) -> str:
        return self.fn.spec.function_id

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_loop(), name=f"blob-poll:{self.fn.spec.name}")

    async def stop(self, grace_s: float) -> None:
        await stop_listener(self._poller, self._tasks, grace_s)

    async def scan_once(self) -> int:
        """List the container once and start work for each unseen blob version; returns how many."""
        svc = self.storage.blob_service()
        if not self._ready:
            await _ensure_container(svc, self.pattern.container)
            await _ensure_container(svc, RECEIPTS_CONTAINER)
            self._ready = True
        container = svc.get_container_client(self.pattern.container)
        started = 0
        async for blob_name, etag in list_versions(container, self.pattern.prefix or None):
            if self.pattern.match(blob_name) is None:
                continue
            key = (blob_name, quoted_etag(etag))
            if key in self._known:
                continue
            self._known.add(key)
            task = asyncio.create_task(self._process(*key), name=f"blob:{self.fn.spec.name}:{blob_name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def _poll_loop(self) -> None:
        failing_since: float | None = None
        while True:
            scan_started = time.monotonic()
            try:
                await self.scan_once()
                if failing_since is not None:
                    log.info("blob trigger %s: storage reachable again", self.fn.spec.name)
                failing_since = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "blob trigger %s: cannot list %s (%s: %s); retrying every %.1fs",
                        self.fn.spec.name,
                        self.pattern.container,
                        type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "",
                        self.poll_interval_s,
                    )
            scan_s = time.monotonic() - scan_started
            await asyncio.sleep(max(self.poll_interval_s, scan_s * (1 - POLL_DUTY) / POLL_DUTY))

    # --- one blob version ---------------------------------------------------------------------

    def _receipt(self, blob_name: str, etag: str) -> Any:
        name = receipt_blob_name(self.host_id, self.function_id, etag, self.pattern.container, blob_name)
        return self.storage.blob_service().get_blob_client(RECEIPTS_CONTAINER, name)

    async def _receipt_done(self, blob_name: str, etag: str) -> bool:
        try:
            props = await self._receipt(blob_name, etag).get_blob_properties()
        except ResourceNotFoundError:
            return False
        return not any(k.lower() == INCOMPLETE_KEY.lower() for k in (props.metadata or {}))

    async def _write_receipt(self, blob_name: str, etag: str, outcome: str) -> None:
        client = self._receipt(blob_name, etag)
        metadata = {"LocalHostOutcome": outcome}
        try:
            await client.upload_blob(b"", overwrite=True, metadata=metadata)
        except ResourceNotFoundError:
            await _ensure_container(self.storage.blob_service(), RECEIPTS_CONTAINER)
            await client.upload_blob(b"", overwrite=True, metadata=metadata)

    async def _send_poison(self, blob_name: str, etag: str, blob_type: str) -> None:
        queue = self.storage.queue_service().get_queue_client(POISON_QUEUE)
        text = encode_message(poison_message(self.function_id, self.pattern.container, blob_name, etag, blob_type))
        try:
            await queue.send_message(text)
        except ResourceNotFoundError:
            try:
                await queue.create_queue()
            except ResourceExistsError:
                pass
            await queue.send_message(text)

    async def _process(self, blob_name: str, etag: str) -> None:
        try:
            await self._process_inner(blob_name, etag)
        except asyncio.CancelledError:
            self._known.discard((blob_name, etag))
            raise
        except Exception:
            # Storage trouble (not the function's): forget the version so the next scan retries it.
            log.exception("blob trigger %s: error handling %s/%s", self.fn.spec.name, self.pattern.container, blob_name)
            self._known.discard((blob_name, etag))

    async def _process_inner(self, blob_name: str, etag: str) -> None:
        name = f"{self.pattern.container}/{blob_name}"
        failures = 0
        blob_type = "BlockBlob"
        while True:
            async with self.parallelism:
                if failures == 0 and await self._receipt_done(blob_name, etag):
                    log.debug("blob trigger %s: %s (%s) already has a receipt", self.fn.spec.name, name, etag)
                    return
                blob = self.storage.blob_service().get_blob_client(self.pattern.container, blob_name)
                try:
                    downloader = await blob.download_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
                    data = await downloader.readall()
                except (ResourceNotFoundError, ResourceModifiedError) as e:
                    # Deleted or rewritten since it was listed: the new version (if any) is its own event.
                    log.info(
                        "blob trigger %s: %s changed or vanished before it ran (%s)",
                        self.fn.spec.name,
                        name,
                        type(e).__name__,
                    )
                    return
                props = downloader.properties
                bp = blob_properties_dict(props, etag)
                blob_type = bp["BlobType"] or blob_type
                stream = InputStream(
                    data=data,
                    name=name,
                    uri=blob.url,
                    length=len(data),
                    blob_properties=bp,
                    metadata=dict(props.metadata or {}),
                )
                error = await self.fn.invoke_logged(
                    stream,
                    trigger="blob",
                    detail=f"{name} etag={etag} attempt={failures + 1}/{self.poison_threshold}",
                    timeout_s=self.timeout_s,
                    log_invocation=self.log_invocation,
                )
            if error is None:
                await self._write_receipt(blob_name, etag, "succeeded")
                return
            failures += 1
            if failures >= self.poison_threshold:
                await self._send_poison(blob_name, etag, blob_type)
                await self._write_receipt(blob_name, etag, "poisoned")
                log.error(
                    "blob trigger %s: %s failed %d times; message sent to queue %s",
                    self.fn.spec.name,
                    name,
                    failures,
                    POISON_QUEUE,
                )
                return
            await asyncio.sleep(self.retry.delay(failures))


async def _ensure_container(svc: Any, name: str) -> None:
    try:
        await svc.get_container_client(name).create_container()
    except ResourceExistsError:
        pass
