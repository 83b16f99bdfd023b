"""local.stack's banner names every function of the app, with the URL of each HTTP one (no servers started)."""

from __future__ import annotations

import json
from pathlib import Path

from local.stack import Stack, StackConfig, banner

ROOT = Path(__file__).resolve().parent.parent


def _banner(tmp_path: Path) -> str:
    values = {"LOCAL_FUNCTION_KEY": "k3y", "VLM_ENDPOINT": "http://127.0.0.1:8089/v1", "VlmStorage": "x"}
    return banner(Stack(StackConfig(data_dir=tmp_path, host_port=7171, values=values)))


def test_the_banner_lists_every_function_folder(tmp_path: Path) -> None:
    text = _banner(tmp_path)
    folders = sorted(p.parent.name for p in ROOT.glob("*/function.json"))
    assert folders and all(f"    {name} " in text for name in folders)


def test_the_banner_gives_each_http_route_with_its_method_and_key(tmp_path: Path) -> None:
    text = _banner(tmp_path)
    assert "GET   http://127.0.0.1:7171/api/openapi.json\n" in text  # anonymous: no key
    assert "POST  http://127.0.0.1:7171/api/analyze?code=k3y\n" in text
    for fj in ROOT.glob("*/function.json"):
        trigger = json.loads(fj.read_text())["bindings"][0]
        if trigger["type"] == "httpTrigger":
            assert f"http://127.0.0.1:7171/api/{trigger['route']}" in text, fj.parent.name
