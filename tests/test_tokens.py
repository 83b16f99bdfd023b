"""Image-token geometry with parameters from the catalog, the text estimate, and pricing."""

import pytest

from shared.catalog import ImageTokens, Prices, load_catalog
from shared.tokens import (
    high_detail_size,
    image_tokens,
    model_view_size,
    patch_size,
    price_usd,
    prompt_tokens,
    spec_for,
    text_tokens,
)
from tests.constants import TEST_FALLBACK_MODEL, TEST_MODEL


@pytest.mark.parametrize(
    ("w", "h", "detail", "model", "tokens"),
    [
        (1024, 1024, "high", TEST_MODEL, 765),
        (2048, 4096, "high", TEST_MODEL, 1105),
        (4032, 3024, "low", TEST_MODEL, 85),
        (512, 512, "high", TEST_MODEL, 255),
        (4032, 3024, "high", TEST_MODEL, 765),  # 1024x768 after fitting: 2x2 tiles
        (1024, 1024, "low", TEST_FALLBACK_MODEL, 2833),
        (1024, 1024, "high", TEST_FALLBACK_MODEL, 2833 + 4 * 5667),
        (1024, 1024, "high", "o1", 75 + 4 * 150),
        (1024, 1024, "high", "gpt-5", 70 + 4 * 140),
        (1024, 1024, "high", "gpt-4.1-mini", 1659),  # 32x32 patches x 1.62
        (1800, 2400, "high", "gpt-4.1-mini", 2353),  # OpenAI's worked example: 1056x1408, 1452 patches, x 1.62
        (100, 100, "low", "gpt-4.1-nano", 40),  # 4x4 patches x 2.46, rounded up
    ],
)
def test_image_tokens_by_model_name(w, h, detail, model, tokens):
    assert image_tokens(w, h, detail, model) == tokens


def test_the_geometry_takes_its_numbers_from_the_entry_it_is_given():
    """No constant in code: a made-up tile family and patch family count by their own parameters."""
    tile = ImageTokens("tile", base=10, per_tile=20, tile_px=256, fit_px=1024, short_side_px=512, low_px=128)
    assert image_tokens(1024, 1024, "high", tile) == 10 + 2 * 2 * 20  # 512x512 after the short side: 2x2 tiles
    assert image_tokens(1024, 1024, "low", tile) == 10
    assert model_view_size(1024, 1024, "low", tile) == (128, 128)
    patch = ImageTokens("patch", patch_px=16, max_patches=100, multiplier=1.5)
    assert image_tokens(160, 160, "high", patch) == 150  # 10x10 patches x 1.5
    w, h = patch_size(1000, 1000, patch)
    assert (w // 16) * (h // 16) <= 100


def test_views_never_upscale():
    assert high_detail_size(300, 200, TEST_MODEL) == (300, 200)
    assert model_view_size(300, 200, "low", TEST_MODEL) == (300, 200)
    assert model_view_size(4032, 3024, "low", TEST_MODEL) == (512, 384)
    assert model_view_size(4032, 3024, "high", TEST_MODEL) == (1024, 768)
    assert patch_size(100, 100, "gpt-4.1-mini") == (100, 100)


def test_patch_shrink_fits_the_cap():
    assert patch_size(1800, 2400, "gpt-4.1-mini") == (1056, 1408)


def test_an_unknown_model_is_not_counted_as_gpt_4o():
    """A custom deployment name or an unknown model gets the catalog's high estimate, not some family."""
    catalog = load_catalog()
    assert spec_for("my-custom-deployment") == catalog.unknown_image_tokens()
    assert spec_for(None) == catalog.unknown_image_tokens()
    assert image_tokens(1024, 1024, "high", "my-custom-deployment") > image_tokens(1024, 1024, "high", TEST_MODEL)


def test_text_estimate():
    assert text_tokens("") == 0 and text_tokens("abcd" * 10) == 10
    assert prompt_tokens(["abcd"], messages=2) == 3 + 2 * 3 + 1


def test_price_counts_cached_input_and_output_and_says_when_it_cannot():
    p = Prices(input=2.0, cached_input=0.5, output=8.0)
    assert price_usd(p, 1_000_000, 1_000_000) == 10.0
    assert price_usd(p, 1_000_000, 0, cached=400_000) == round((600_000 * 2.0 + 400_000 * 0.5) / 1e6, 6)
    assert price_usd(Prices(input=2.0, output=8.0), 1_000_000, 0, cached=500_000) == 2.0  # no cached price: input
    assert price_usd(Prices(input=None, output=8.0), 10, 10) is None
    assert price_usd(Prices(input=0.0, output=0.0), 1000, 1000) == 0.0
