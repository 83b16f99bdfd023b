"""The README's Limits table and the code agree: every limit setting is listed with its real default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
LIMIT_PREFIXES = ("MAX_", "MIN_", "SCHEMA_MAX_", "ANSWER_MAX_", "PREPARE_CONCURRENCY")


def _limits_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]  # skip the header


def _code_defaults() -> dict[str, int]:
    """NAME -> default, from the `r.integer("NAME", default, ...)` calls in shared/settings.py."""
    source = (ROOT / "shared" / "settings.py").read_text()
    found = {}
    for name, expr in re.findall(r'r\.(?:integer|number)\("([A-Z_]+)",\s*([^,)]+)', source):
        found[name] = int(eval(expr, {"MIB": 1024 * 1024}))  # literals and MIB products only
    return found


def _readme_number(text: str) -> int:
    """'64 MiB' -> 67108864; '20,000 characters' -> 20000; '8 px' -> 8."""
    m = re.match(r"^([\d,]+)\s*(KiB|MiB|GiB)?", text.strip())
    assert m, f"not a number: {text!r}"
    return int(m.group(1).replace(",", "")) * UNITS.get(m.group(2) or "", 1)


def test_every_listed_setting_exists_with_the_default_the_table_shows() -> None:
    code = _code_defaults()
    rows = _limits_rows()
    assert len(rows) >= 20
    for what, setting, default, _ in rows:
        names = re.findall(r"`([A-Z][A-Z_]+)`", setting)
        if not names:
            assert "fixed" in setting, f"row {what!r} names no setting and does not say it is fixed"
            continue
        values = [v for v in default.split(", ")]
        assert len(values) == len(names), f"row {what!r}: {len(names)} settings but {len(values)} defaults"
        for name, value in zip(names, values, strict=True):
            assert name in code, f"{name} is in the README's Limits table but not read in shared/settings.py"
            assert _readme_number(value) == code[name], f"{name}: README says {value}, code says {code[name]}"


def test_every_limit_setting_in_the_code_is_in_the_table() -> None:
    listed = {name for row in _limits_rows() for name in re.findall(r"`([A-Z][A-Z_]+)`", row[1])}
    limits = {name for name in _code_defaults() if name.startswith(LIMIT_PREFIXES)}
    assert limits - listed == set(), f"limit settings missing from the README's Limits table: {limits - listed}"


@pytest.mark.parametrize(("text", "value"), [("64 MiB", 64 * 1024**2), ("20,000 characters", 20000), ("8 px", 8)])
def test_readme_numbers_parse(text: str, value: int) -> None:
    assert _readme_number(text) == value
