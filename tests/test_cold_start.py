"""Importing the entry points is cheap: no openai, no Pillow, no client, no settings read."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # a fresh interpreter, so imports are measured from zero
ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_functions_loads_no_sdk_and_reads_no_settings():
    code = (
        "import sys, analyze_http, batch_collect, batch_submit, blob_trigger, openapi_http, poison_blobs\n"
        "from shared.settings import get_settings\n"
        "heavy = [m for m in ('openai', 'PIL', 'azure.storage.blob', 'azure.identity', 'pypdfium2', 'jsonschema',"
        " 'opentelemetry', 'azure.monitor.opentelemetry')"
        " if m in sys.modules]\n"
        "print(heavy, get_settings.cache_info().currsize)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin"}, check=True
    )
    assert out.stdout.strip() == "[] 0", out.stdout + out.stderr
