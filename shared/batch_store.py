"""Where batch work lives between steps: JSON documents in the cache container, under `batch/`.

- `batch/pending/<custom_id>.json`: one queued request (its source blob, etag, job and JSONL line).
  Written once per source blob + etag + job (a re-delivered event finds it and adds nothing);
  deleted only after its record is written.
- `batch/jobs/<key>.json`: one input file / batch job and the custom_ids it carries, with the last
  step it reached: `sealed` -> `uploaded` -> `created` -> (deleted when collected). A host that stops
  between steps resumes from the step recorded here.

A request is "pending" while no job document names it; a job that ends without answering it
(expired, failed, cancelled) simply stops naming it.
"""

from __future__ import annotations

import json
from typing import Any

PENDING = "batch/pending/"
JOBS = "batch/jobs/"


class BatchStore:
    def __init__(self, blobs: Any, container: str) -> None:
        self.blobs = blobs
        self.container_name = container

    async def _container(self) -> Any:
        return await self.blobs.container(self.container_name)

    async def _read(self, blob: str) -> dict[str, Any] | None:
        from azure.core.exceptions import ResourceNotFoundError

        container = await self._container()
        try:
            return json.loads(await (await container.download_blob(blob)).readall())
        except ResourceNotFoundError:
            return None

    async def _write(self, blob: str, doc: dict[str, Any]) -> None:
        container = await self._container()
        await container.upload_blob(blob, json.dumps(doc, separators=(",", ":")).encode(), overwrite=True)

    async def _delete(self, blob: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        container = await self._container()
        try:
            await container.delete_blob(blob)
        except ResourceNotFoundError:
            pass

    async def _names(self, prefix: str) -> list[str]:
        from azure.core.exceptions import ResourceNotFoundError

        container = await self._container()
        try:
            return [b.name async for b in container.list_blobs(name_starts_with=prefix)]
        except ResourceNotFoundError:
            return []  # no container yet: nothing was ever queued

    # --- pending requests ---
    async def add_item(self, item: dict[str, Any]) -> bool:
        """Queue a request once: False when it is already queued (a re-delivered event)."""
        from azure.core.exceptions import ResourceExistsError

        if await self._read(PENDING + item["custom_id"] + ".json") is not None:
            return False
        container = await self._container()
        try:
            data = json.dumps(item, separators=(",", ":")).encode()
            await container.upload_blob(PENDING + item["custom_id"] + ".json", data, overwrite=False)
        except ResourceExistsError:
            return False
        return True

    async def item(self, cid: str) -> dict[str, Any] | None:
        return await self._read(PENDING + cid + ".json")

    async def put_item(self, item: dict[str, Any]) -> None:
        await self._write(PENDING + item["custom_id"] + ".json", item)

    async def drop_item(self, cid: str) -> None:
        await self._delete(PENDING + cid + ".json")

    async def item_ids(self) -> list[str]:
        return [n[len(PENDING) : -len(".json")] for n in await self._names(PENDING) if n.endswith(".json")]

    # --- jobs ---
    async def jobs(self) -> list[dict[str, Any]]:
        docs = []
        for name in await self._names(JOBS):
            doc = await self._read(name)
            if doc is not None:
                docs.append(doc)
        return sorted(docs, key=lambda d: d.get("sealed_at", ""))

    async def put_job(self, job: dict[str, Any]) -> None:
        await self._write(JOBS + job["key"] + ".json", job)

    async def drop_job(self, key: str) -> None:
        await self._delete(JOBS + key + ".json")
