"""The model catalog: shipped file, overrides, validation with clear errors, longest-prefix lookup."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from shared.catalog import CatalogError, load_catalog, parse_catalog
from shared.tokens import image_tokens

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {
    "family": "acme-vl",
    "match": ["acme-vl"],
    "image_tokens": {"kind": "patch", "patch_px": 32, "max_patches": 1024, "multiplier": 1.2},
    "details": ["low", "high", "auto"],
    "parameters": "reasoning",
    "reasoning_efforts": ["low", "high"],
    "price_usd_per_mtok": {"input": 1.0, "cached_input": 0.1, "output": 4.0, "batch_input": None, "batch_output": None},
    "context_window": 200000,
    "max_output_tokens": 32000,
    "versions": {"2026-01-01": {"retirement": "2027-01-01"}},
    "sources": {"prices": "https://example.invalid/prices"},
    "notes": "",
}


def doc(*families: dict) -> dict:
    return {"schema_version": 1, "checked_on": "2026-11-30", "families": list(families)}


def test_the_shipped_catalog_loads_and_every_family_is_usable():
    cat = load_catalog()
    assert cat.families
    for fam in cat.families:
        assert fam.match and fam.parameters in ("chat", "reasoning", None)
        assert fam.image_tokens.kind in ("tile", "patch")
    assert load_catalog() is load_catalog()  # read once per worker


def test_the_longest_prefix_over_all_families_wins():
    cat = load_catalog()
    assert cat.lookup("gpt-4o-mini-2024-07-18").family == "gpt-4o-mini"
    assert cat.lookup("GPT-4o-2024-11-20").family == "gpt-4o"
    assert cat.lookup("gpt-5-mini-2025-08-07").family == "gpt-5-mini"
    assert cat.lookup("vision") is None and cat.lookup(None) is None and cat.lookup("") is None


def test_an_override_adds_families_and_replaces_entries_whole(tmp_path):
    replaced = {"family": "gpt-4o", "match": ["gpt-4o"], "image_tokens": {"kind": "tile", "base": 1, "per_tile": 2,
                "tile_px": 512, "fit_px": 2048, "short_side_px": 768, "low_px": 512}}  # fmt: skip
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc(ENTRY, replaced)))
    cat = load_catalog(str(path))
    assert cat.lookup("acme-vl-2") .family == "acme-vl"  # fmt: skip
    gpt4o = cat.lookup("gpt-4o-2024-11-20")
    assert (gpt4o.image_tokens.base, gpt4o.prices.input) == (1, None)  # whole entry replaced, prices too
    assert cat.lookup("gpt-4o-mini").family == "gpt-4o-mini"  # the rest stays
    assert image_tokens(1024, 1024, "high", cat.image_tokens_for("gpt-4o")) == 1 + 4 * 2


def test_the_local_stand_in_has_its_entry_only_through_the_override():
    assert load_catalog().lookup("local-ocr-rapidocr") is None
    cat = load_catalog(str(ROOT / "local" / "model_catalog.local.json"))
    fam = cat.lookup("local-ocr-rapidocr")
    assert fam is not None and fam.priced_as is not None
    assert fam.prices == cat.named(fam.priced_as).prices and fam.prices.batch_input == fam.prices.input / 2


def test_priced_as_borrows_another_familys_prices_and_refuses_what_it_cannot_resolve(tmp_path):
    def load(entry: dict) -> object:
        path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(doc(entry)))
        return load_catalog(str(path))

    borrower = {k: v for k, v in ENTRY.items() if k != "price_usd_per_mtok"} | {"priced_as": "gpt-4o"}
    cat = load(borrower)
    assert cat.lookup("acme-vl-2").prices == cat.named("gpt-4o").prices and cat.named("gpt-4o").prices.input
    for bad in ({"priced_as": "no-such-family"}, {"priced_as": "acme-vl"}, {"priced_as": 3}):
        with pytest.raises(CatalogError):
            load(borrower | bad)
    with pytest.raises(CatalogError):
        load(ENTRY | {"priced_as": "gpt-4o"})  # prices and priced_as: which one holds?


def _broken(path: str, value) -> dict:
    entry = copy.deepcopy(ENTRY)
    *parents, last = path.split(".")
    node = entry
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return doc(entry)


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ([], "JSON object"),
        ({"schema_version": 2, "families": []}, "schema_version"),
        ({"schema_version": 1, "families": {}}, "families must be a list"),
        (_broken("match", []), "match"),
        (_broken("match", ["ACME"]), "lower case"),
        (_broken("image_tokens.kind", "hexagon"), "image_tokens"),
        (_broken("image_tokens.multiplier", "1.2"), "multiplier"),
        (_broken("image_tokens.multiplier", -1), "multiplier"),
        (_broken("image_tokens.tile_px", 512), "unknown field"),
        (_broken("parameters", "completion"), "parameters"),
        (_broken("reasoning_efforts", ["turbo"]), "reasoning_efforts"),
        (_broken("price_usd_per_mtok.input", True), "input"),
        (_broken("context_window", 1.5), "context_window"),
        (_broken("versions", {"2026": "2027"}), "versions"),
        (_broken("prices", {}), "unknown field"),
        (doc(ENTRY, ENTRY), "twice"),
    ],
)
def test_a_malformed_catalog_is_refused_with_a_clear_error(document, words):
    with pytest.raises(CatalogError) as info:
        parse_catalog(document, "mine.json")
    assert words in info.value.message and "mine.json" in info.value.message
    if isinstance(document, dict) and document.get("families") and isinstance(document["families"], list):
        assert "acme-vl" in info.value.message


def test_null_values_are_allowed_and_an_incomplete_formula_falls_back_to_the_unknown_estimate():
    cat = parse_catalog(_broken("image_tokens.multiplier", None), "mine.json")
    assert cat.image_tokens_for("acme-vl") == cat.unknown_image_tokens()
    cat = parse_catalog(_broken("price_usd_per_mtok.input", None), "mine.json")
    assert cat.lookup("acme-vl").prices.input is None


def test_an_unreadable_override_names_the_setting(tmp_path):
    with pytest.raises(CatalogError) as info:
        load_catalog(str(tmp_path / "missing.json"))
    assert "VLM_MODEL_CATALOG" in info.value.message
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(CatalogError) as info:
        load_catalog(str(bad))
    assert "not valid JSON" in info.value.message and "{nope" not in info.value.message


@pytest.mark.parametrize("size", [(640, 480), (1024, 1024), (4032, 3024), (800, 3000), (300, 200)])
@pytest.mark.parametrize("detail", ["low", "high"])
def test_the_unknown_estimate_is_at_or_above_every_family_for_what_is_sent(size, detail):
    """Conservative: whatever the model turns out to be, the first reservation is not too small."""
    cat = load_catalog()
    unknown = cat.unknown_image_tokens()
    w, h = catalog_module_view(unknown, size, detail)
    estimate = image_tokens(w, h, detail, unknown)
    for fam in cat.families:
        if fam.family == "gpt-4o-mini":  # its tile counts are inflated to keep its price at gpt-4o's
            continue
        assert estimate >= image_tokens(w, h, detail, fam.image_tokens), fam.family


def catalog_module_view(spec, size, detail):
    from shared.tokens import model_view_size

    return model_view_size(*size, detail, spec)
