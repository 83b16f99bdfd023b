"""The model catalog: what the service knows about each model family, as data.

Why data: models turn over every few months; their image-token accounting, parameter
style, prices and limits live in `shared/model_catalog.json` (CONTRACTS C2), which users
extend or override with a file named by the setting `VLM_MODEL_CATALOG` (same shape;
a family with the same "family" name replaces the shipped entry whole). The file is
read once per worker, on first use, never at import.

A model name (the answer's `model` field, e.g. "gpt-5.4-mini-2026-03-17", or VLM_MODEL)
is matched by the longest `match` prefix over all families. A name no family matches
gets `Catalog.unknown_image_tokens()`: a deliberately high estimate (see there) that
the per-deployment calibration (shared/calibration.py) then corrects from usage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .settings import DETAILS
from .settings import REASONING_EFFORTS as EFFORTS  # ordered, cheapest first

SHIPPED = Path(__file__).with_name("model_catalog.json")
SCHEMA_VERSION = 1
PARAMETER_STYLES = ("chat", "reasoning")
TILE_FIELDS = ("base", "per_tile", "tile_px", "fit_px", "short_side_px", "low_px")
PATCH_FIELDS = ("patch_px", "max_patches", "multiplier")
PRICE_FIELDS = ("input", "cached_input", "output", "batch_input", "batch_output")
FAMILY_FIELDS = {
    "family",
    "match",
    "image_tokens",
    "details",
    "parameters",
    "reasoning_efforts",
    "price_usd_per_mtok",
    "priced_as",
    "context_window",
    "max_output_tokens",
    "versions",
    "sources",
    "notes",
}
# Used only when a catalog has no complete tile or patch family to derive the unknown-model
# estimate from (an override file could in principle hold none): the tile view and the largest
# patch multiplier in the first catalog (2.46, rounded up; converted from the formulas used before).
_FALLBACK_VIEW_FIELDS = {"base": 1, "per_tile": 1, "tile_px": 512, "fit_px": 2048, "short_side_px": 768, "low_px": 512}
_FALLBACK_PATCH_FIELDS = {"patch_px": 32, "max_patches": 1536, "multiplier": 2.5}


class CatalogError(ConfigurationError):
    """The catalog file (shipped or VLM_MODEL_CATALOG) is unreadable or not of the documented shape."""

    code = "catalog_error"


@dataclass(frozen=True)
class ImageTokens:
    """How a family counts one image: tile (base + per 512-px tile) or patch (32-px patches x multiplier).

    The internal kind "estimate" (never in a catalog file) is the unknown-model estimate: the tile
    view, counted per patch (`Catalog.unknown_image_tokens`).
    """

    kind: str
    base: int | None = None
    per_tile: int | None = None
    tile_px: int | None = None
    fit_px: int | None = None
    short_side_px: int | None = None
    low_px: int | None = None
    patch_px: int | None = None
    max_patches: int | None = None
    multiplier: float | None = None

    @property
    def complete(self) -> bool:
        """False when the catalog says a value is unknown (null): the estimate then uses the unknown spec."""
        names = TILE_FIELDS if self.kind == "tile" else PATCH_FIELDS
        return all(getattr(self, n) is not None for n in names)


@dataclass(frozen=True)
class Prices:
    """USD per million tokens; None where the catalog says the price is unknown."""

    input: float | None = None
    cached_input: float | None = None
    output: float | None = None
    batch_input: float | None = None
    batch_output: float | None = None


@dataclass(frozen=True)
class Family:
    family: str
    match: tuple[str, ...]
    image_tokens: ImageTokens
    details: tuple[str, ...] = DETAILS
    parameters: str | None = None  # "chat" or "reasoning"; None: learned from the endpoint's answers
    reasoning_efforts: tuple[str, ...] = ()
    prices: Prices = field(default_factory=Prices)
    priced_as: str | None = None  # another family whose prices these are (the local stand-in's)
    context_window: int | None = None
    max_output_tokens: int | None = None
    versions: dict[str, dict[str, str | None]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True)
class Catalog:
    families: tuple[Family, ...]
    checked_on: str = ""

    def lookup(self, model: str | None) -> Family | None:
        """The family whose longest `match` prefix starts this model name (case-insensitive), or None."""
        name = (model or "").strip().lower()
        if not name:
            return None
        best: tuple[int, Family] | None = None
        for fam in self.families:
            for prefix in fam.match:
                if name.startswith(prefix) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), fam)
        return best[1] if best else None

    def named(self, family: str | None) -> Family | None:
        """The family of this exact name (as recorded on an answer), or None."""
        return next((f for f in self.families if f.family == family), None) if family else None

    def image_tokens_for(self, model: str | None) -> ImageTokens:
        """The image accounting for a model name: its family's if complete, else the unknown estimate."""
        fam = self.lookup(model)
        if fam is not None and fam.image_tokens.complete:
            return fam.image_tokens
        return self.unknown_image_tokens()

    def unknown_image_tokens(self) -> ImageTokens:
        """A deliberately high estimate for a model the catalog cannot count for (kind "estimate").

        The view is the tile families' (long side fitted, short side capped: the smallest
        images any family wants, which patch models read too); the count is per `patch_px`
        patch of what is sent (high detail: at least one tile's worth), at the largest patch
        multiplier in the catalog. That is at
        or above what every family counts for the same image (gpt-4o-mini's inflated tile
        counts, a price-parity device, aside), so the limiter reserves too much rather than
        too little at first; and being proportional to the pixels sent, one calibration
        factor (shared/calibration.py) fits every image size once the first answers are in.
        """
        tiles = [f.image_tokens for f in self.families if f.image_tokens.kind == "tile" and f.image_tokens.complete]
        patches = [f.image_tokens for f in self.families if f.image_tokens.kind == "patch" and f.image_tokens.complete]
        view = min(tiles, key=lambda t: (t.short_side_px or 0, t.fit_px or 0)) if tiles else _FALLBACK_VIEW
        top = max(patches, key=lambda p: p.multiplier or 0.0) if patches else _FALLBACK_PATCH
        return ImageTokens(
            kind="estimate",
            tile_px=view.tile_px,
            fit_px=view.fit_px,
            short_side_px=view.short_side_px,
            low_px=view.low_px,
            patch_px=top.patch_px,
            multiplier=top.multiplier,
        )


_FALLBACK_VIEW = ImageTokens("tile", **_FALLBACK_VIEW_FIELDS)
_FALLBACK_PATCH = ImageTokens("patch", **_FALLBACK_PATCH_FIELDS)


# --- loading and validation ----------------------------------------------------------


def parse_catalog(data: Any, source: str) -> Catalog:
    """Validate a catalog document and build it; errors name the file, the family and the field."""
    if not isinstance(data, dict):
        raise _bad(source, "the document must be a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise _bad(source, f"schema_version must be {SCHEMA_VERSION}")
    families = data.get("families")
    if not isinstance(families, list):
        raise _bad(source, "families must be a list")
    seen: set[str] = set()
    out = []
    for n, entry in enumerate(families):
        fam = _family(entry, source, n)
        if fam.family in seen:
            raise _bad(source, f"family {fam.family!r} appears twice")
        seen.add(fam.family)
        out.append(fam)
    checked = data.get("checked_on", "")
    return Catalog(tuple(out), checked if isinstance(checked, str) else "")


def merge(base: Catalog, override: Catalog) -> Catalog:
    """Override entries replace base entries of the same family whole; new families are added."""
    replaced = {f.family: f for f in override.families}
    kept = tuple(f for f in base.families if f.family not in replaced)
    return Catalog(kept + override.families, override.checked_on or base.checked_on)


@lru_cache(maxsize=8)
def load_catalog(override_path: str | None = None) -> Catalog:
    """The shipped catalog, merged with the override file if one is named; read once per worker."""
    catalog = parse_catalog(_read(SHIPPED), str(SHIPPED.name))
    source = str(SHIPPED.name)
    if override_path:
        catalog = merge(catalog, parse_catalog(_read(Path(override_path)), "VLM_MODEL_CATALOG"))
        source = "VLM_MODEL_CATALOG"
    return resolve_priced_as(catalog, source)


def resolve_priced_as(catalog: Catalog, source: str) -> Catalog:
    """Give each family that names `priced_as` the prices of that family (one level, no chains).

    The local stand-in uses it: its answers stay labelled as the stand-in's, while local records
    cost what the model infra deploys by default would charge, so cost figures (and batch's half
    price) mean something locally without copying prices that would go stale."""
    out = []
    for fam in catalog.families:
        if fam.priced_as is not None:
            model = catalog.named(fam.priced_as)
            if model is None or model.priced_as is not None:
                raise _bad(source, f"priced_as names {fam.priced_as!r}, which is not a priced family", fam.family)
            fam = replace(fam, prices=model.prices)
        out.append(fam)
    return Catalog(tuple(out), catalog.checked_on)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise CatalogError(
            f"model catalog {path.name} cannot be read; check VLM_MODEL_CATALOG", details={"file": path.name}
        ) from None
    except (ValueError, RecursionError):
        raise CatalogError(f"model catalog {path.name} is not valid JSON", details={"file": path.name}) from None


def _bad(source: str, message: str, family: str | None = None) -> CatalogError:
    where = f" (family {family})" if family else ""
    details = {"file": source} | ({"family": family} if family else {})
    return CatalogError(f"model catalog {source}{where}: {message}", details=details)


def _family(entry: Any, source: str, index: int) -> Family:
    if not isinstance(entry, dict):
        raise _bad(source, f"families[{index}] must be an object")
    name = entry.get("family")
    if not isinstance(name, str) or not name:
        raise _bad(source, f"families[{index}].family must be a non-empty string")
    unknown = set(entry) - FAMILY_FIELDS
    if unknown:
        raise _bad(source, f"unknown field(s) {', '.join(sorted(unknown))}", name)
    match = entry.get("match")
    if not isinstance(match, list) or not match or not all(isinstance(m, str) and m for m in match):
        raise _bad(source, "match must be a non-empty list of model-name prefixes", name)
    if any(m != m.lower() for m in match):
        raise _bad(source, "match prefixes must be lower case", name)
    details = entry.get("details", list(DETAILS))
    if not isinstance(details, list) or not set(details) <= set(DETAILS):
        raise _bad(source, f"details must be a list of {', '.join(DETAILS)}", name)
    parameters = entry.get("parameters")
    if parameters is not None and parameters not in PARAMETER_STYLES:
        raise _bad(source, "parameters must be 'chat', 'reasoning' or null", name)
    efforts = entry.get("reasoning_efforts") or []  # null: a chat model takes none
    if not isinstance(efforts, list) or not set(efforts) <= set(EFFORTS):
        raise _bad(source, f"reasoning_efforts must be a list of {', '.join(EFFORTS)}", name)
    return Family(
        family=name,
        match=tuple(match),
        image_tokens=_image_tokens(entry.get("image_tokens"), source, name),
        details=tuple(details),
        parameters=parameters,
        reasoning_efforts=tuple(e for e in EFFORTS if e in efforts),
        prices=Prices(**{k: _number(entry.get("price_usd_per_mtok") or {}, k, source, name) for k in PRICE_FIELDS}),
        priced_as=_priced_as(entry, source, name),
        context_window=_count(entry, "context_window", source, name),
        max_output_tokens=_count(entry, "max_output_tokens", source, name),
        versions=_versions(entry.get("versions", {}), source, name),
        sources=_strings(entry.get("sources", {}), "sources", source, name),
        notes=entry.get("notes", "") if isinstance(entry.get("notes", ""), str) else "",
    )


def _priced_as(entry: dict[str, Any], source: str, name: str) -> str | None:
    value = entry.get("priced_as")
    if value is None:
        return None
    if not isinstance(value, str) or not value or value == name:
        raise _bad(source, "priced_as must name another family", name)
    if entry.get("price_usd_per_mtok"):
        raise _bad(source, "give either price_usd_per_mtok or priced_as, not both", name)
    return value


def _image_tokens(raw: Any, source: str, name: str | None = None) -> ImageTokens:
    if not isinstance(raw, dict) or raw.get("kind") not in ("tile", "patch"):
        raise _bad(source, "image_tokens must be an object with kind 'tile' or 'patch'", name)
    names = TILE_FIELDS if raw["kind"] == "tile" else PATCH_FIELDS
    unknown = set(raw) - {"kind", *names}
    if unknown:
        raise _bad(source, f"image_tokens has unknown field(s) {', '.join(sorted(unknown))}", name)
    values: dict[str, Any] = {}
    for key in names:
        value = _number(raw, key, source, name or "")
        if value is not None and value <= 0:
            raise _bad(source, f"image_tokens.{key} must be > 0 or null", name)
        values[key] = value if key == "multiplier" or value is None else int(value)
    return ImageTokens(kind=raw["kind"], **values)


def _number(raw: Any, key: str, source: str, name: str) -> float | None:
    value = raw.get(key) if isinstance(raw, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != value:
        raise _bad(source, f"{key} must be a non-negative number or null", name)
    return float(value)


def _count(entry: dict[str, Any], key: str, source: str, name: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(source, f"{key} must be a positive integer or null", name)
    return value


def _versions(raw: Any, source: str, name: str) -> dict[str, dict[str, str | None]]:
    if not isinstance(raw, dict):
        raise _bad(source, "versions must be an object of version -> {retirement}", name)
    out: dict[str, dict[str, str | None]] = {}
    for version, info in raw.items():
        if not isinstance(info, dict) or not all(v is None or isinstance(v, str) for v in info.values()):
            raise _bad(source, f"versions.{version} must be an object of dates (strings or null)", name)
        out[version] = dict(info)
    return out


def _strings(raw: Any, key: str, source: str, name: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise _bad(source, f"{key} must be an object of strings", name)
    return dict(raw)
