"""Content-addressed result cache: a bounded in-memory LRU in front of JSON blobs.

The key is a sha256 over everything that determines the answer (task, prompt,
detail, schema, the deployment and model that answer, max_tokens and the optimised
image bytes), so it doubles as the result id and a duplicate image anywhere never
costs a second model call. v2: keyed on who answered (deployment and model family),
so a fallback's answer is never served as the primary's (v1 keys were the primary's).

Two kinds of record, kept apart by type and by place:
- `CachedAnswer` (model, deployment, result) under the key over the optimised bytes:
  `<cache>/<kk>/<key>.json`. Only answers are stored: a request that fails stores nothing.
- `RawAlias` (the answer's key and the image facts) under the key over the bytes as received:
  `<cache>/aliases/<kk>/<key>.json`, so a repeat of the very same bytes skips decoding.
Storage trouble makes the cache miss, never fail a request. A record that does not have the
shape of its kind (an older layout, a damaged blob) is a miss too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import BlobContainers

log = logging.getLogger(__name__)

KEY_VERSION = "v2"


def cache_key(
    *,
    task: str,
    prompt: str | None,
    detail: str,
    schema: Any,
    answered_by: str,
    max_tokens: int | None,
    images: Sequence[bytes],
    options: dict[str, Any] | None = None,
) -> str:
    """sha256 hex of a canonical header plus each image's own sha256 (order matters)."""
    header = {
        "v": KEY_VERSION,
        "task": task,
        "prompt": prompt,
        "detail": detail,
        "schema": schema,
        "answered_by": answered_by,
        "max_tokens": max_tokens,
        "options": options or {},
    }
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":"), default=str).encode())
    for image in images:
        h.update(b"\x00image\x00")
        h.update(hashlib.sha256(image).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """A validated answer and who gave it."""

    model: str
    deployment: str
    result: Any

    @classmethod
    def from_dict(cls, doc: Any) -> CachedAnswer | None:
        if not isinstance(doc, dict) or not {"model", "deployment", "result"} <= doc.keys():
            return None
        return cls(str(doc["model"]), str(doc["deployment"]), doc["result"])


@dataclass(frozen=True)
class RawAlias:
    """Where the answer for a request's bytes as received lives, and the facts of its optimised images."""

    key: str
    images: list[dict[str, Any]]

    @classmethod
    def from_dict(cls, doc: Any) -> RawAlias | None:
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or not isinstance(doc.get("images"), list):
            return None
        return cls(doc["key"], doc["images"])


class MemoryLRU:
    """A bounded LRU of JSON-able dicts (copies go in and out so callers cannot alias entries)."""

    def __init__(self, max_items: int = 256) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self._items.get(key)
        if raw is None:
            return None
        self._items.move_to_end(key)
        return json.loads(raw)

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.max_items <= 0:
            return
        self._items[key] = json.dumps(value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


ALIAS_PREFIX = "aliases/"


def blob_name(key: str) -> str:
    return f"{key[:2]}/{key}.json"


class ResultCache:
    """Memory first, then the cache container; writes go to both."""

    def __init__(self, memory: MemoryLRU, blobs: BlobContainers | None = None, container: str = "cache") -> None:
        self.memory = memory
        self.blobs = blobs  # a shared.storage.BlobStore, or None for memory only
        self.container = container

    async def get_result(self, key: str) -> CachedAnswer | None:
        return CachedAnswer.from_dict(await self._get(blob_name(key)))

    async def put_result(self, key: str, answer: CachedAnswer) -> None:
        await self._put(blob_name(key), asdict(answer))

    async def get_alias(self, raw_key: str) -> RawAlias | None:
        return RawAlias.from_dict(await self._get(ALIAS_PREFIX + blob_name(raw_key)))

    async def put_alias(self, raw_key: str, alias: RawAlias) -> None:
        await self._put(ALIAS_PREFIX + blob_name(raw_key), asdict(alias))

    async def _get(self, key: str) -> dict[str, Any] | None:
        hit = self.memory.get(key)
        if hit is not None or self.blobs is None:
            return hit
        from azure.core.exceptions import ResourceNotFoundError

        try:
            container = await self.blobs.container(self.container)
            downloader = await container.download_blob(key)
            value = json.loads(await downloader.readall())
        except ResourceNotFoundError:
            return None
        except Exception as exc:  # the cache is an optimisation: a storage fault is a miss
            log.warning("cache read failed for %s: %s", key, exc)
            return None
        self.memory.put(key, value)
        return value

    async def _put(self, key: str, value: dict[str, Any]) -> None:
        self.memory.put(key, value)
        if self.blobs is None:
            return
        try:
            from azure.storage.blob import ContentSettings

            container = await self.blobs.container(self.container)
            await container.upload_blob(
                key,
                json.dumps(value, ensure_ascii=False).encode(),
                overwrite=True,
                content_settings=ContentSettings(content_type="application/json"),
            )
        except Exception as exc:
            log.warning("cache write failed for %s: %s", key, exc)
