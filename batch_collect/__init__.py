"""Timer: poll the Batch API jobs; for each that ended, write every file's record and requeue the rest.

Azure asks pollers to wait at least 60 s between status calls (docs/batch.md): BATCH_COLLECT_SCHEDULE
defaults to every 5 minutes. Does nothing when the service has no batch deployment.
"""

from __future__ import annotations

import logging

import azure.functions as func


async def main(timer: func.TimerRequest) -> None:
    from shared.batch_jobs import run_step

    logging.info("batch_collect: %s", await run_step("collect"))
