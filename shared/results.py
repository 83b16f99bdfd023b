"""Result records in the results container: `<path>.json` for success, `<path>.error.json` for a
permanent failure, exactly one of them per source blob.

Each record is written with a single Put Blob, which Azure commits atomically, so a
reader sees the old record or the new one, never half a JSON document. Writing one
kind removes the other, so a later success clears a stale error and vice versa.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

SUCCESS_SUFFIX = ".json"
ERROR_SUFFIX = ".error.json"


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

    async def read(self, name: str, suffix: str) -> dict[str, Any] | None:
        from azure.core.exceptions import ResourceNotFoundError

        client = await self.blobs.container(self.container)
        try:
            downloader = await client.download_blob(name + suffix)
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
        record = await self.read(name, SUCCESS_SUFFIX)
        if record and (record.get("source") or {}).get("sha256") == sha256 and record.get("job") == job:
            return record
        record = await self.read(name, ERROR_SUFFIX)
        if not record or (record.get("source") or {}).get("sha256") != sha256 or record.get("job") != job:
            return None  # invalid_task_config records have no job: a fixed folder config is retried
        if (record.get("error") or {}).get("code") == "poison" and record["source"].get("etag") != etag:
            return None
        return record

    async def write_success(self, name: str, record: dict[str, Any]) -> None:
        await self._put(name + SUCCESS_SUFFIX, record)
        await self._delete(name + ERROR_SUFFIX)

    async def write_error(self, name: str, record: dict[str, Any]) -> None:
        await self._put(name + ERROR_SUFFIX, record)
        await self._delete(name + SUCCESS_SUFFIX)

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
