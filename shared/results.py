"""Result records: exactly one success or error record per source blob, under names that cannot collide.

Each record is written with a single Put Blob, which Azure commits atomically, so a
reader sees the old record or the new one, never half a JSON document. Writing one
kind removes the other, so a later success clears a stale error and vice versa.

Naming (`record_names` is the one function that maps a source name to them):

- success: `<name>.json`, error: `<name>.error.json`, attempt notes (cache container):
  `attempts/<name>.json`.
- Escaping keeps the kinds apart: a source whose name already ends in `.error` (or in a hash
  tag, below), optionally followed by `~`s, gets one more `~`. So `x.error` succeeds into
  `x.error~.json`, never into `x.error.json`, which is `x`'s error record.
- Bounded: Azure allows 1,024 characters per blob name (see shared/names.py). When a derived
  name would pass that, or the source name is not a safe name (shared/names.py), the stem is the
  first characters of the name (none for an unsafe name) plus `.sha256-<64 hex of the full
  name>`: `very/long/na….sha256-3fa9….json`. Hash stems end in the hash and escaped stems never
  do, so the two families cannot meet. The record's `source.name` always holds the full name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .names import MAX_BLOB_NAME, is_safe_name

SUCCESS_SUFFIX = ".json"
ERROR_SUFFIX = ".error.json"
ATTEMPTS_PREFIX = "attempts/"
HASH_TAG = ".sha256-"
# the longest name built from a stem: `<stem>.error.json` or `attempts/<stem>.json`
STEM_MAX = MAX_BLOB_NAME - max(len(ERROR_SUFFIX), len(ATTEMPTS_PREFIX) + len(SUCCESS_SUFFIX))
_HASH_LEN = len(HASH_TAG) + 64
_RESERVED_END = re.compile(r"(?:\.error|\.sha256-[0-9a-f]{64})~*\Z")


@dataclass(frozen=True)
class RecordNames:
    """Where the records of one source blob live."""

    success: str  # in the results container
    error: str  # in the results container
    attempts: str  # in the cache container: transient failures noted so far


def record_stem(name: str) -> str:
    """The collision-free, bounded stem every record name of `name` is built from."""
    escaped = name + "~" if _RESERVED_END.search(name) else name
    if len(escaped) <= STEM_MAX and is_safe_name(name):
        return escaped
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    keep = name[: STEM_MAX - _HASH_LEN] if is_safe_name(name) else ""
    return f"{keep}{HASH_TAG}{digest}"


def record_names(name: str) -> RecordNames:
    stem = record_stem(name)
    return RecordNames(stem + SUCCESS_SUFFIX, stem + ERROR_SUFFIX, ATTEMPTS_PREFIX + stem + SUCCESS_SUFFIX)


@dataclass(frozen=True)
class Source:
    container: str
    name: str
    etag: str | None
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "name": self.name,
            "etag": self.etag,
            "sha256": self.sha256,
            "size": self.size,
        }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ResultWriter:
    def __init__(self, blobs: Any, container: str) -> None:
        self.blobs = blobs  # shared.storage.BlobStore
        self.container = container

    async def read(self, blob: str) -> dict[str, Any] | None:
        from azure.core.exceptions import ResourceNotFoundError

        client = await self.blobs.container(self.container)
        try:
            downloader = await client.download_blob(blob)
            return json.loads(await downloader.readall())
        except ResourceNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # unreadable: treat as absent, it will be rewritten

    async def existing_for(self, name: str, sha256: str, job: str, etag: str | None) -> dict[str, Any] | None:
        """A record already written for exactly this content and job, if any.

        Both kinds must match the job (a changed `_task.json` is new work). A poison record
        stands only for the same etag, so uploading the same file again retries what failed for
        transient reasons.
        """
        names = record_names(name)
        record = await self.read(names.success)
        if record and (record.get("source") or {}).get("sha256") == sha256 and record.get("job") == job:
            return record
        record = await self.read(names.error)
        if not record or (record.get("source") or {}).get("sha256") != sha256 or record.get("job") != job:
            return None  # invalid_task_config records have no job: a fixed folder config is retried
        if (record.get("error") or {}).get("code") == "poison" and record["source"].get("etag") != etag:
            return None
        return record

    async def write_success(self, name: str, record: dict[str, Any]) -> None:
        names = record_names(name)
        await self._put(names.success, record)
        await self._delete(names.error)

    async def write_error(self, name: str, record: dict[str, Any]) -> None:
        names = record_names(name)
        await self._put(names.error, record)
        await self._delete(names.success)

    async def _put(self, blob: str, record: dict[str, Any]) -> None:
        from azure.storage.blob import ContentSettings

        client = await self.blobs.container(self.container)
        body = json.dumps(record, ensure_ascii=False, indent=1).encode()
        await client.upload_blob(
            blob, body, overwrite=True, content_settings=ContentSettings(content_type="application/json")
        )

    async def _delete(self, blob: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        client = await self.blobs.container(self.container)
        try:
            await client.delete_blob(blob)
        except ResourceNotFoundError:
            pass
