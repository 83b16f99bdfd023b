"""Shared fixtures. Integration fixtures start the real local stand-ins on free ports:
Azurite, the local model server and the local Functions host (driven by the real function.json files)."""

from __future__ import annotations

import json
import secrets
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


def corpus(*parts: str) -> Path:
    path = CORPUS.joinpath(*parts)
    assert path.exists(), f"missing corpus file {path}: the corpus lives in ../shared/corpus"
    return path


class ModelAdmin:
    """The local model server's test endpoints: request counts, faults, quota."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def stats(self) -> dict[str, Any]:
        return self._call("/stats")

    def requests(self) -> int:
        return int(self.stats()["requests"])

    def reset(self) -> None:
        self._call("/admin/reset", {})

    def faults(self, **body: Any) -> None:
        self._call("/admin/faults", body)

    def quota(self, **body: Any) -> None:
        self._call("/admin/quota", body)

    def config(self, **body: Any) -> None:
        self._call("/admin/config", body)


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
    return ModelAdmin(stack.model_url)
