"""docs/architecture.md stays true: its table names every module of shared/ and its diagram every entry point."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def test_every_shared_module_has_an_owner_row() -> None:
    table = [line for line in DOC.split("## Who owns what", 1)[1].splitlines() if line.startswith("| `")]
    named = {name for line in table for name in re.findall(r"`([a-z_]+)`", line.split("|")[1])}
    modules = {p.stem for p in (ROOT / "shared").glob("*.py") if p.stem != "__init__"}
    assert sorted(modules - named) == []
    assert sorted(named - modules) == []


def test_the_diagram_shows_every_entry_point() -> None:
    diagram = DOC.split("```mermaid", 1)[1].split("```", 1)[0]
    folders = sorted(p.parent.name for p in ROOT.glob("*/function.json"))
    assert [f for f in folders if f not in diagram] == []
