"""An in-memory blob service that behaves like Azure's where names matter.

Blob names go into a URL path, and the service normalises `.`/`..` segments before it looks a
blob up, so `images/jobs/../../cache/x` is `cache/x`. This fake does the same, enforces the
1,024-character name limit with a 400 as Azure does, and logs every call, so tests can assert
what was (not) read.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceModifiedError, ResourceNotFoundError


@dataclass
class StoredBlob:
    data: bytes
    etag: str
    metadata: dict[str, str] = field(default_factory=dict)
    last_modified: datetime = field(default_factory=lambda: datetime.now(UTC))


class FakeBlobService:
    """Every container's blobs in one dict keyed by 'container/name' (after URL normalisation)."""

    def __init__(self) -> None:
        self.blobs: dict[str, StoredBlob] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, resolved 'container/name')
        self._etags = 0

    def key(self, container: str, name: str) -> str:
        if len(name) > 1024:
            raise HttpResponseError(message="InvalidUriOrName")  # Azure: 400, the name is too long
        return posixpath.normpath(f"{container}/{name}").replace("\\", "/")

    def put(self, container: str, name: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        self._etags += 1
        self.blobs[self.key(container, name)] = StoredBlob(data, f'"0x{self._etags:04x}"', dict(metadata or {}))

    def get(self, container: str, name: str) -> bytes | None:
        blob = self.blobs.get(self.key(container, name))
        return None if blob is None else blob.data

    def reads(self, op: str = "download") -> list[str]:
        return [k for o, k in self.calls if o == op]

    async def container(self, name: str) -> FakeContainer:  # the BlobStore interface
        return FakeContainer(self, name)


class _Downloader:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def readall(self) -> bytes:
        return self._data


@dataclass
class FakeContainer:
    service: FakeBlobService
    name: str

    def _find(self, op: str, blob: str) -> tuple[str, StoredBlob]:
        key = self.service.key(self.name, blob)
        self.service.calls.append((op, key))
        found = self.service.blobs.get(key)
        if found is None:
            raise ResourceNotFoundError(message="BlobNotFound")
        return key, found

    async def download_blob(self, blob: str, *, etag: str | None = None, match_condition: Any = None) -> _Downloader:
        _, found = self._find("download", blob)
        if etag is not None and found.etag != etag:
            raise ResourceModifiedError(message="ConditionNotMet")
        return _Downloader(found.data)

    def get_blob_client(self, blob: str) -> SimpleNamespace:
        async def get_blob_properties() -> SimpleNamespace:
            _, found = self._find("properties", blob)
            return SimpleNamespace(size=len(found.data), etag=found.etag, metadata=found.metadata)

        async def upload_blob(data: bytes, *, overwrite: bool = False, **_: Any) -> dict[str, Any]:
            await self.upload_blob(blob, data, overwrite=overwrite)
            stored = self.service.blobs[self.service.key(self.name, blob)]
            return {"etag": stored.etag, "last_modified": stored.last_modified}  # what BlobClient.upload_blob returns

        return SimpleNamespace(get_blob_properties=get_blob_properties, upload_blob=upload_blob)

    async def upload_blob(self, blob: str, data: bytes, *, overwrite: bool = False, **_: Any) -> None:
        self.service.calls.append(("upload", self.service.key(self.name, blob)))
        self.service.put(self.name, blob, data)

    async def delete_blob(self, blob: str) -> None:
        key, _ = self._find("delete", blob)
        del self.service.blobs[key]

    async def list_blobs(self, name_starts_with: str | None = None):
        prefix = f"{self.name}/{name_starts_with or ''}"
        for key in sorted(self.service.blobs):
            if key.startswith(prefix):
                stored = self.service.blobs[key]
                yield SimpleNamespace(
                    name=key[len(self.name) + 1 :], etag=stored.etag, last_modified=stored.last_modified
                )

    async def walk_blobs(self, name_starts_with: str = "", delimiter: str = "/"):
        seen: set[str] = set()
        async for blob in self.list_blobs(name_starts_with):
            rest = blob.name[len(name_starts_with) :]
            if delimiter in rest:
                sub = name_starts_with + rest.split(delimiter, 1)[0] + delimiter
                if sub not in seen:
                    seen.add(sub)
                    yield SimpleNamespace(name=sub)
            else:
                yield blob


class MemoryPeerStore:
    """shared.peers.PeerStore in memory, stamped by a (fake) clock as the storage service stamps `last_modified`.

    `fail` makes every operation raise, as an unreachable account does."""

    EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.beats: dict[str, datetime] = {}
        self.fail = False
        self.writes = 0

    def _stamp(self) -> datetime:
        return self.EPOCH + timedelta(seconds=self.clock.now())

    def _check(self) -> None:
        if self.fail:
            raise OSError("storage unreachable")

    async def beat(self, name: str) -> datetime:
        self._check()
        self.writes += 1
        self.beats[name] = self._stamp()
        return self.beats[name]

    async def listing(self, prefix: str) -> list[tuple[str, datetime]]:
        self._check()
        return [(name, at) for name, at in self.beats.items() if name.startswith(prefix)]

    async def remove(self, name: str) -> None:
        self._check()
        self.beats.pop(name, None)
