"""Image-token formulas (DESIGN.md) and cost."""

import pytest

from shared.tokens import (
    cost_usd,
    family_for,
    high_detail_size,
    image_tokens,
    known_family,
    model_view_size,
    patch_size,
    prompt_tokens,
    text_tokens,
)


@pytest.mark.parametrize(
    ("w", "h", "detail", "model", "tokens"),
    [
        (1024, 1024, "high", "gpt-4o", 765),
        (2048, 4096, "high", "gpt-4o", 1105),
        (4032, 3024, "low", "gpt-4o", 85),
        (512, 512, "high", "gpt-4o", 255),
        (4032, 3024, "high", "gpt-4o", 765),  # 1024x768 after fitting: 2x2 tiles
        (1024, 1024, "low", "gpt-4o-mini", 2833),
        (1024, 1024, "high", "gpt-4o-mini", 2833 + 4 * 5667),
        (1024, 1024, "high", "o1", 75 + 4 * 150),
        (1024, 1024, "high", "gpt-5", 70 + 4 * 140),
        (1024, 1024, "high", "gpt-4.1-mini", 1659),  # 32x32 patches x 1.62
        (1800, 2400, "high", "gpt-4.1-mini", 2353),  # OpenAI's worked example: 1056x1408, 1452 patches, x 1.62
        (100, 100, "low", "gpt-4.1-nano", 40),  # 4x4 patches x 2.46, rounded up
    ],
)
def test_image_tokens(w, h, detail, model, tokens):
    assert image_tokens(w, h, detail, model) == tokens


def test_views_never_upscale():
    assert high_detail_size(300, 200) == (300, 200)
    assert model_view_size(300, 200, "low") == (300, 200)
    assert model_view_size(4032, 3024, "low") == (512, 384)
    assert model_view_size(4032, 3024, "high") == (1024, 768)
    assert patch_size(100, 100) == (100, 100)


def test_patch_shrink_fits_the_cap():
    assert patch_size(1800, 2400) == (1056, 1408)


def test_family_prefixes():
    assert family_for("gpt-4o-mini-2024-07-18").name == "gpt-4o-mini"
    assert family_for("gpt-4o-2024-11-20").name == "gpt-4o"
    assert family_for("my-custom-deployment").name == "gpt-4o"
    assert known_family("my-custom-deployment") is None
    assert known_family("local-ocr-rapidocr").name == "local-ocr"


def test_text_and_cost():
    assert text_tokens("") == 0 and text_tokens("abcd" * 10) == 10
    assert prompt_tokens(["abcd"], messages=2) == 3 + 2 * 3 + 1
    assert cost_usd(1_000_000, 1_000_000, "gpt-4o") == 12.5
    assert cost_usd(1000, 1000, "local-ocr-rapidocr") == 0.0
