"""Shared fixtures. Integration fixtures start the real local stand-ins on free ports:
Azurite, the local model server and the local Functions host (driven by the real function.json files)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from local.model_admin import ModelAdmin

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


def corpus(*parts: str) -> Path:
    path = CORPUS.joinpath(*parts)
    assert path.exists(), f"missing corpus file {path}: the corpus lives in ../shared/corpus"
    return path


def make_stack(tmp: Path, *, model_args: list[str], host_args: list[str] | None = None, **values: str):
    from local.procs import free_port
    from local.stack import EXAMPLE, Stack, StackConfig

    base = json.loads(EXAMPLE.read_text())["Values"]
    base.update({"LOCAL_FUNCTION_KEY": secrets.token_urlsafe(16), **values})
    ports = {name: free_port() for name in ("host", "blob", "queue", "model")}
    config = StackConfig(
        root=ROOT,
        data_dir=tmp,
        host_port=ports["host"],
        blob_port=ports["blob"],
        queue_port=ports["queue"],
        model_port=ports["model"],
        values=base,
        model_args=model_args,
        host_args=host_args or [],
    )
    return Stack(config).start()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The stack as `make run` starts it, with real OCR, on free ports."""
    s = make_stack(
        tmp_path_factory.mktemp("stack"),
        model_args=["--mode", "ocr"],
        host_args=["--poll-interval", "0.2", "--retry-base-delay", "0.05"],
        MAX_IMAGE_BYTES=str(8 * 1024 * 1024),
        TASK_CONFIG_TTL_S="0.5",  # tests change folder configs and re-drop at once
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def model_admin(stack) -> ModelAdmin:
    return stack.model_admin()
