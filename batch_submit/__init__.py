"""Timer: seal the folders' pending batch requests into JSONL files and create Batch API jobs.

Resumes any job a stopped host left sealed or uploaded first (shared/batch_jobs.py). Does nothing
when the service has no batch deployment (VLM_BATCH_DEPLOYMENT unset).
"""

from __future__ import annotations

import logging

import azure.functions as func


async def main(timer: func.TimerRequest) -> None:
    from shared.batch_jobs import run_step

    logging.info("batch_submit: %s", await run_step("submit"))
