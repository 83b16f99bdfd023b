"""Queue trigger on `webjobs-blobtrigger-poison`: the host gave up on a blob after its retries.

Writes the blob's error record (`results/<path>.error.json`, named by shared.results.record_names)
with the last error seen, so a poisoned blob is recorded where users look, never lost silently.
The blob name in the message is only used through record_poison, which never reads a blob whose
name is not a safe name (shared/names.py).
"""

from __future__ import annotations

import json
import logging

import azure.functions as func

from shared.app import get_app
from shared.blob_job import BlobProcessor


async def main(msg: func.QueueMessage) -> None:
    try:
        body = json.loads(msg.get_body())
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("BlobName"), str):
        logging.warning("poison message without a blob name ignored")  # retrying it would not help
        return
    app = get_app()
    if body.get("ContainerName") != app.settings.images_container:
        logging.warning("poison message for another container ignored: %s", body)
        return
    record = await BlobProcessor(app).record_poison(body["BlobName"], body.get("ETag"))
    logging.error("blob %s poisoned: %s", body["BlobName"], record["error"]["message"])
