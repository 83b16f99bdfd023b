"""Blob trigger (Event Grid source): each blob dropped under images/ gets one result or error record.

Permanent failures are written as `.error.json` by shared.blob_job; transient ones
raise so the host retries (and poisons after its threshold, see poison_blobs).

Size check, honestly: in the Python v1 programming model (function.json) the host downloads the
whole blob and hands its bytes to the worker before `main` runs; `InputStream.length` comes from
the blob's properties (`ContentLength`), but the content is already in memory by then. Bindings
that give a function a `BlobClient` or a stream instead (SDK-type bindings, the
`azurefunctions-extensions-bindings-blob` package) exist only for the v2 programming model
(https://techcommunity.microsoft.com/blog/azurecompute/azure-functions-sdk-type-bindings-for-azure-blob-storage-with-azure-functions-in/4146744),
and `dataType` only changes the type the bytes arrive as. So the MAX_IMAGE_BYTES check below is the
earliest this model allows: it runs before anything else touches the bytes (no hashing, decoding
or model call) and records `image_too_large`. Blobs the service reads itself (manifest images,
schema blobs) are sized from their properties before they are downloaded.
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared.app import get_app
from shared.blob_job import BlobProcessor
from shared.names import name_problem


def _split(path: str, container: str) -> str:
    prefix = container + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


async def main(blob: func.InputStream) -> None:
    app = get_app()
    processor = BlobProcessor(app)
    settings = app.settings
    name = _split(blob.name or "", settings.images_container)
    props = getattr(blob, "blob_properties", None) or {}
    etag = props.get("ETag") or props.get("Etag") or props.get("etag")
    metadata = getattr(blob, "metadata", None)
    if (etag is None or metadata is None) and name_problem(name) is None:  # an unsafe name is only recorded
        container = await app.blobs.container(settings.images_container)
        live = await container.get_blob_client(name).get_blob_properties()
        etag, metadata = etag or live.etag, metadata if metadata is not None else dict(live.metadata or {})
    # checked before read(): nothing copies, hashes or decodes an oversized blob (the host buffered it already)
    if blob.length is not None and blob.length > settings.max_image_bytes:
        outcome = await processor.too_large(name, etag, blob.length)
    else:
        outcome = await processor.process(name, blob.read(), etag, metadata)
    logging.info("blob %s: %s %s", name, outcome.status, outcome.reason)
