"""Blob trigger (Event Grid source): each blob dropped under images/ gets one result or error record.

Permanent failures are written as `.error.json` by shared.blob_job; transient ones
raise so the host retries (and poisons after its threshold, see poison_blobs).
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared.blob_job import get_processor


def _split(path: str, container: str) -> str:
    prefix = container + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


async def main(blob: func.InputStream) -> None:
    processor = get_processor()
    settings = processor.deps.settings
    name = _split(blob.name or "", settings.images_container)
    props = getattr(blob, "blob_properties", None) or {}
    etag = props.get("ETag") or props.get("Etag") or props.get("etag")
    metadata = getattr(blob, "metadata", None)
    if etag is None or metadata is None:
        container = await processor.deps.blobs.container(settings.images_container)
        live = await container.get_blob_client(name).get_blob_properties()
        etag, metadata = etag or live.etag, metadata if metadata is not None else dict(live.metadata or {})
    if blob.length is not None and blob.length > settings.max_image_bytes:
        outcome = await processor.too_large(name, etag, blob.length)
    else:
        outcome = await processor.process(name, blob.read(), etag, metadata)
    logging.info("blob %s: %s %s", name, outcome.status, outcome.reason)
