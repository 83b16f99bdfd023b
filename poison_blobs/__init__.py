"""Queue trigger on `webjobs-blobtrigger-poison`: the host gave up on a blob after its retries.

Writes `results/<path>.error.json` with the last error seen, so a poisoned blob is
recorded where users look, never lost silently.
"""

from __future__ import annotations

import json
import logging

import azure.functions as func

from shared.blob_job import get_processor


async def main(msg: func.QueueMessage) -> None:
    body = json.loads(msg.get_body())
    processor = get_processor()
    if body.get("ContainerName") != processor.deps.settings.images_container:
        logging.warning("poison message for another container ignored: %s", body)
        return
    record = await processor.record_poison(body["BlobName"], body.get("ETag"))
    logging.error("blob %s poisoned: %s", body["BlobName"], record["error"]["message"])
