"""The image optimiser (shared/images.py): formats, limits, orientation, metadata, sizing, pages, strips.

Real files come from ../shared/corpus; the odd cases (CMYK, 16-bit, palette transparency,
multi-page, bombs, encrypted PDFs) are made here, in memory.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from shared import images
from shared.errors import ImageTooLarge, InvalidRequest, TooManyPixels, UnsupportedMediaType, VlmError
from shared.images import (
    ImageFacts,
    ImageLimits,
    ImagePolicy,
    PreparedImage,
    choose_detail,
    estimate_strips,
    parse_pages,
    plan_strips,
    prepare,
    sniff,
)
from shared.settings import Settings
from shared.tasks import DOCUMENT_IMAGES, GLANCE_IMAGES, PHOTO_IMAGES, TASKS
from shared.tokens import image_tokens
from tests.constants import TEST_DEPLOYMENT, TEST_MODEL

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def corpus(*parts: str) -> bytes:
    path = CORPUS.joinpath(*parts)
    assert path.exists(), f"missing corpus file {path}: the corpus lives in ../shared/corpus"
    return path.read_bytes()


def decoded(p: PreparedImage) -> Image.Image:
    im = Image.open(io.BytesIO(p.data))
    im.load()
    return im


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_markers(data: bytes) -> list[int]:
    """The JPEG segment markers before the first scan."""
    assert data[:2] == b"\xff\xd8"
    i, markers = 2, []
    while i < len(data):
        assert data[i] == 0xFF
        marker = data[i + 1]
        markers.append(marker)
        if marker == 0xDA:  # start of scan
            break
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return markers


def assert_within_view(f: ImageFacts) -> None:
    short, long = sorted((f.sent_width, f.sent_height))
    if f.detail == "low":
        assert long <= 512, f
    else:
        assert short <= 768 and long <= 2048, f
    assert f.sent_width <= max(f.width, f.height) and f.sent_height <= max(f.width, f.height)
    assert f.estimated_tokens == image_tokens(f.sent_width, f.sent_height, f.detail)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def make_pdf(pages: list[tuple[float, float, float]], *, rotate: int = 0, encrypt: bool = False) -> bytes:
    """A small PDF by hand: each page (width_pt, height_pt, grey) is filled with that grey level."""
    objs: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    for i, (w, h, grey) in enumerate(pages):
        content = f"{grey:.2f} g 0 0 {w} {h} re f 0 g 10 10 50 50 re f".encode()
        page = f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] /Contents {4 + 2 * i} 0 R"
        page += f" /Rotate {rotate} >>" if rotate else " >>"
        objs.append(page.encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    trailer = b""
    if encrypt:  # standard security handler, RC4 40-bit; the user password is not empty
        objs.append(b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>")
        trailer = b"/Encrypt %d 0 R /ID [<%s> <%s>] " % (len(objs), b"33" * 16, b"33" * 16)
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for n, obj in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % n + obj + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R " % (len(objs) + 1) + trailer + b">>\n")
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def grey_level(im: Image.Image) -> float:
    """Mean of the middle of the image (away from the black marker square in the corner)."""
    w, h = im.size
    return ImageStat.Stat(im.convert("L").crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))).mean[0]


def noise(size: tuple[int, int]) -> Image.Image:
    """A detailed picture (so JPEG has data everywhere) that is not symmetric."""
    base = Image.effect_noise(size, 60).convert("RGB")
    grad = Image.linear_gradient("L").resize(size).convert("RGB")
    return Image.blend(base, grad, 0.5)


# --- orientation -------------------------------------------------------------------


def _thumb(im: Image.Image) -> Image.Image:
    return im.convert("L").resize((32, 32), Image.Resampling.BILINEAR)


def _diff(a: Image.Image, b: Image.Image) -> float:
    return ImageStat.Stat(ImageChops.difference(a, b)).mean[0]


@pytest.mark.parametrize("kind", ["landscape", "portrait"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(kind: str, orientation: int) -> None:
    twin = _thumb(Image.open(io.BytesIO(corpus("orientation", f"{kind}_1.jpg"))))
    [p] = prepare(corpus("orientation", f"{kind}_{orientation}.jpg"), detail="high")
    im = decoded(p)
    assert (im.width > im.height) == (kind == "landscape")
    upright = _diff(twin, _thumb(im))
    wrong = min(_diff(twin, _thumb(im.transpose(m))) for m in Image.Transpose)
    # each sample carries its own orientation digit, so upright is ~15, not 0; any wrong way is > 27
    assert upright < 20, upright
    assert wrong > 24 and upright < 0.7 * wrong, (upright, wrong)
    assert (p.facts.width, p.facts.height) == (im.width, im.height) == (600, 450)[:: 1 if kind == "landscape" else -1]


def test_orientation_6_photo_is_portrait() -> None:
    [p] = prepare(corpus("photos", "canon_2048x1536_orient6.jpg"))
    assert (p.facts.width, p.facts.height) == (1536, 2048)
    assert decoded(p).size == (768, 1024) == (p.facts.sent_width, p.facts.sent_height)


def test_heic_orientation_is_honoured() -> None:
    [p] = prepare(corpus("heic", "iphone_13_pro_max.heic"), detail="low")
    assert p.facts.format == "heic"
    assert (p.facts.width, p.facts.height) == (3024, 4032)  # stored landscape with a rotation: shown portrait
    assert decoded(p).size == (384, 512)


# --- metadata ------------------------------------------------------------------------


def test_gps_and_all_other_metadata_are_gone() -> None:
    data = corpus("photos", "gps_tagged_640x480.jpg")
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(0x8825), "the corpus file should carry GPS"
    for detail in ("low", "high"):
        [p] = prepare(data, detail=detail)
        im = decoded(p)
        assert not im.getexif()
        assert "exif" not in im.info and "icc_profile" not in im.info and "xmp" not in im.info
        markers = jpeg_markers(p.data)
        assert not [m for m in markers if 0xE1 <= m <= 0xEF or m == 0xFE], [hex(m) for m in markers]
        assert b"GPS" not in p.data and b"Exif" not in p.data


def test_comment_and_icc_profile_are_not_copied() -> None:
    src = encode(noise((800, 600)), "JPEG", comment=b"secret serial 1234", icc_profile=b"\x00" * 128)
    [p] = prepare(src, detail="high")
    assert b"secret" not in p.data
    assert not [m for m in jpeg_markers(p.data) if m in (0xE2, 0xFE)]


# --- broken and hostile inputs ---------------------------------------------------------


def test_corpus_truncated_jpeg_is_decoded() -> None:
    # The corpus file keeps an end marker; libjpeg fills the missing last MCU row with grey.
    [p] = prepare(corpus("broken", "truncated_3648x2736.jpg"))
    assert (p.facts.width, p.facts.height) == (3648, 2736)
    assert decoded(p).size == (1024, 768)


def test_jpeg_cut_short_is_decoded_as_far_as_it_goes_or_refused() -> None:
    whole = encode(noise((640, 480)), "JPEG", quality=90)
    [p] = prepare(whole[: int(len(whole) * 0.8)], detail="high")  # no end marker: Pillow alone would refuse
    im = decoded(p).convert("L")
    assert im.size == (640, 480)
    assert ImageStat.Stat(im.crop((0, 460, 640, 480))).stddev[0] < 2  # the missing tail is flat grey
    assert ImageStat.Stat(im.crop((0, 0, 640, 200))).stddev[0] > 10  # the top is the picture
    with pytest.raises(InvalidRequest, match="truncated") as err:
        prepare(whole[: int(len(whole) * 0.2)], detail="high")
    assert err.value.status == 400 and err.value.code == "invalid_request"


def test_png_header_declaring_30000x30000_is_refused_before_decoding() -> None:
    data = png_header_only(30_000, 30_000)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(TooManyPixels) as err:
            prepare(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 50 * 1024 * 1024
    assert err.value.status == 400 and err.value.code == "too_many_pixels"


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = png_header_only(8_000, 8_000)  # 64 MP: over our 50 MP, under Pillow's own bomb limit
    with pytest.raises(TooManyPixels, match="64,000,000 pixels"):
        prepare(data)
    with pytest.raises(TooManyPixels):
        prepare(encode(Image.new("RGB", (200, 100)), "PNG"), limits=ImageLimits(max_pixels=10_000))


def test_pillow_decompression_bomb_error_maps_to_too_many_pixels() -> None:
    with pytest.raises(TooManyPixels, match="decompression bomb"):
        prepare(png_header_only(30_000, 30_000), limits=ImageLimits(max_pixels=10**12))


def test_broken_png_is_a_clear_400() -> None:
    data = png_header_only(100, 100)  # IDAT far too short for 100x100
    with pytest.raises(InvalidRequest, match="could not decode image") as err:
        prepare(data)
    assert err.value.to_dict()["error"]["code"] == "invalid_request"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "PDF", "HEIF"])
def test_corrupted_inputs_give_an_image_or_a_4xx_never_a_crash(fmt: str) -> None:
    import random

    if fmt == "PDF":
        seed = make_pdf([(300, 400, 0.5)] * 2)
    elif fmt == "HEIF":
        seed = corpus("heic", "small_640x426.heif")
    elif fmt in ("GIF", "TIFF"):
        seed = _frames(fmt, 3)
    else:
        seed = encode(noise((160, 120)), fmt)
    rng = random.Random(fmt)
    for _ in range(40):
        data = bytearray(seed)
        if rng.random() < 0.3:
            data = data[: rng.randrange(12, len(data))]
        else:
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(12, len(data))] = rng.randrange(256)
        try:
            for p in prepare(bytes(data), policy=TASKS["ocr"].images):
                assert_within_view(p.facts)
        except VlmError as e:
            assert 400 <= e.status < 500, e


def test_text_is_415_naming_what_it_is() -> None:
    with pytest.raises(UnsupportedMediaType, match="text/plain") as err:
        prepare(b"hello, this is not an image\n" * 10)
    assert err.value.status == 415 and err.value.details["found"] == "text/plain"
    with pytest.raises(UnsupportedMediaType, match="zip"):
        sniff(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(UnsupportedMediaType, match="base64"):
        sniff(b"/9j/4AAQSkZJRgABAQAAAQABAAD")
    with pytest.raises(UnsupportedMediaType, match="unknown"):
        sniff(bytes(range(256)))


def test_empty_and_oversized_inputs() -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        prepare(b"")
    with pytest.raises(ImageTooLarge) as err:
        prepare(corpus("photos", "gps_tagged_640x480.jpg"), limits=ImageLimits(max_bytes=1000))
    assert err.value.status == 413 and err.value.code == "image_too_large"


def test_sniff_formats() -> None:
    im = Image.new("RGB", (8, 8))
    assert sniff(encode(im, "JPEG")) == "jpeg"
    assert sniff(encode(im, "PNG")) == "png"
    assert sniff(encode(im, "WEBP")) == "webp"
    assert sniff(encode(im, "GIF")) == "gif"
    assert sniff(encode(im, "BMP")) == "bmp"
    assert sniff(encode(im, "TIFF")) == "tiff"
    assert sniff(corpus("heic", "iphone_13_pro_max.heic")) == "heic"
    assert sniff(make_pdf([(100, 100, 0.5)])) == "pdf"


# --- modes -----------------------------------------------------------------------------


def test_cmyk_jpeg_adobe_inverted_keeps_its_colours() -> None:
    cmyk = Image.new("CMYK", (600, 400), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG")  # Pillow writes Adobe-style inverted CMYK with an APP14 marker
    assert 0xEE in jpeg_markers(data)
    [p] = prepare(data)
    r, g, b = ImageStat.Stat(decoded(p)).mean
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_not_clipped() -> None:
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))  # dark left, bright right
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    [p] = prepare(data)
    im = decoded(p)
    assert im.mode == "L"
    left, mid, right = (ImageStat.Stat(im.crop((x, 0, x + 16, 256))).mean[0] for x in (0, 120, 240))
    assert left < 30 and 90 < mid < 170 and right > 225, (left, mid, right)


def test_palette_with_transparency_goes_on_white() -> None:
    im = Image.new("P", (300, 200), 0)
    im.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    im.paste(1, (0, 0, 150, 200))
    data = encode(im, "PNG", transparency=0)  # index 0 (the blue right half) is transparent
    [p] = prepare(data)
    out = decoded(p)
    right = ImageStat.Stat(out.crop((200, 50, 280, 150))).mean
    left = ImageStat.Stat(out.crop((20, 50, 100, 150))).mean
    assert min(right) > 245  # white, not blue or black
    assert left[0] > 200 and left[1] < 60


def test_la_goes_on_white_and_stays_grey() -> None:
    im = Image.new("LA", (300, 200), (40, 255))
    im.paste((40, 0), (150, 0, 300, 200))
    [p] = prepare(encode(im, "PNG"))
    out = decoded(p)
    assert out.mode == "L"
    assert ImageStat.Stat(out.crop((200, 50, 280, 150))).mean[0] > 245
    assert ImageStat.Stat(out.crop((20, 50, 100, 150))).mean[0] < 60


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "I", "F", "CMYK"])
def test_other_modes_come_out_as_jpeg(mode: str) -> None:
    im = noise((900, 700)).convert(mode) if mode not in ("I", "F") else noise((900, 700)).convert("L").convert(mode)
    fmt = "TIFF" if mode in ("I", "F", "CMYK") else "PNG"
    [p] = prepare(encode(im, fmt))
    out = decoded(p)
    assert out.format == "JPEG" and out.mode in ("L", "RGB")
    assert_within_view(p.facts)


def test_webp_bmp_gif_single_images() -> None:
    for fmt in ("WEBP", "BMP", "GIF"):
        [p] = prepare(encode(noise((1200, 800)), fmt))
        assert p.facts.format == fmt.lower()
        assert (p.facts.sent_width, p.facts.sent_height) == (1152, 768)


# --- sizing and tokens ---------------------------------------------------------------------


def test_token_values_through_prepare() -> None:
    assert image_tokens(1024, 1024, "high", TEST_MODEL) == 765
    assert image_tokens(2048, 4096, "high", TEST_MODEL) == 1105
    assert image_tokens(2048, 4096, "low", TEST_MODEL) == 85
    square = encode(Image.new("RGB", (1024, 1024), "white"), "PNG")
    [p] = prepare(square, detail="high", model=TEST_MODEL)
    assert (p.facts.sent_width, p.facts.sent_height, p.facts.estimated_tokens) == (768, 768, 765)
    tall = encode(Image.new("RGB", (2048, 4096), "white"), "PNG")
    [p] = prepare(tall, detail="high", model=TEST_MODEL)
    assert (p.facts.sent_width, p.facts.sent_height, p.facts.estimated_tokens) == (768, 1536, 1105)
    [p] = prepare(tall, detail="low", model=TEST_MODEL)
    assert (p.facts.sent_width, p.facts.sent_height, p.facts.estimated_tokens) == (256, 512, 85)
    assert p.facts.to_dict() == {
        "format": "png",
        "width": 2048,
        "height": 4096,
        "sent_width": 256,
        "sent_height": 512,
        "bytes_in": len(tall),
        "bytes_sent": len(p.data),
        "detail": "low",
        "estimated_tokens": 85,
    }


def test_patch_models_get_their_own_view() -> None:
    [p] = prepare(corpus("photos", "phone_4032x3024.jpg"), detail="high", model="gpt-4.1-mini")
    f = p.facts
    assert (f.sent_width // 32 + 1) * (f.sent_height // 32 + 1) <= 1536 + 100
    assert f.estimated_tokens == image_tokens(f.sent_width, f.sent_height, "high", "gpt-4.1-mini")


def test_never_upscales() -> None:
    [p] = prepare(encode(noise((300, 200)), "PNG"), detail="high")
    assert (p.facts.sent_width, p.facts.sent_height) == (300, 200)


def test_choose_detail_rule() -> None:
    assert choose_detail(DOCUMENT_IMAGES.auto_detail, 300, 300) == "high"
    assert choose_detail(GLANCE_IMAGES.auto_detail, 4000, 3000) == "low"
    assert choose_detail(PHOTO_IMAGES.auto_detail, 640, 480) == "low"
    assert choose_detail(PHOTO_IMAGES.auto_detail, 767, 767) == "low"
    assert choose_detail(PHOTO_IMAGES.auto_detail, 1024, 300) == "high"
    assert choose_detail(PHOTO_IMAGES.auto_detail, 4000, 3000) == "high"
    assert choose_detail(DOCUMENT_IMAGES.auto_detail, 4000, 3000, "low") == "low"
    assert choose_detail(GLANCE_IMAGES.auto_detail, 100, 100, "high") == "high"
    with pytest.raises(InvalidRequest):
        choose_detail(PHOTO_IMAGES.auto_detail, 10, 10, "medium")
    with pytest.raises(InvalidRequest):
        prepare(corpus("photos", "gps_tagged_640x480.jpg"), detail="ultra")


def _corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix.lower() not in (".json", ".md"))


@pytest.mark.parametrize("path", _corpus_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_corpus_file_prepares_within_the_view(path: Path) -> None:
    data = path.read_bytes()
    for task in ("describe", "ocr"):
        try:
            prepared = prepare(data, policy=TASKS[task].images)
        except VlmError as e:  # a clear client error is acceptable; a crash is not
            assert 400 <= e.status < 500
            continue
        assert prepared
        for p in prepared:
            assert_within_view(p.facts)
            im = decoded(p)
            assert im.format == "JPEG" and im.size == (p.facts.sent_width, p.facts.sent_height)
            assert p.facts.bytes_sent == len(p.data) and p.facts.bytes_in == len(data)
            assert p.facts.format == sniff(data)
            if task == "ocr":
                assert p.facts.detail == "high"
            assert p.data_url().startswith("data:image/jpeg;base64,/9j/")


# --- pages ---------------------------------------------------------------------------------


def test_pdf_pages_expand_for_documents_only() -> None:
    pdf = make_pdf([(612, 792, 0.2), (612, 792, 0.5), (612, 792, 0.8)])
    out = prepare(pdf, policy=TASKS["ocr"].images)
    assert [p.facts.page for p in out] == [1, 2, 3]
    assert [round(grey_level(decoded(p)) / 255, 1) for p in out] == [0.2, 0.5, 0.8]
    f = out[0].facts
    assert (f.width, f.height) == (2550, 3300)  # letter at 300 dpi
    assert (f.sent_width, f.sent_height, f.detail) == (768, 994, "high")
    # describe sends the first (selected) page, as the README says (it sent every PDF page before)
    [first] = prepare(pdf, policy=TASKS["describe"].images)
    assert first.facts.page == 1
    [second] = prepare(pdf, policy=TASKS["describe"].images, pages="2")
    assert second.facts.page == 2
    [only] = prepare(pdf, policy=TASKS["classify"].images)
    assert only.facts.page == 1 and only.facts.detail == "low"
    picked = prepare(pdf, policy=TASKS["invoice"].images, pages="2-3")
    assert [p.facts.page for p in picked] == [2, 3]
    [second] = prepare(pdf, policy=TASKS["compare"].images, pages="2")
    assert second.facts.page == 2 and round(grey_level(decoded(second)) / 255, 1) == 0.5


def test_pdf_page_limit_is_a_400_unless_pages_selects_within_it() -> None:
    pdf = make_pdf([(300, 400, 0.5)] * 3)
    limits = ImageLimits(max_pages=2)
    with pytest.raises(InvalidRequest, match="at most 2") as err:
        prepare(pdf, policy=TASKS["ocr"].images, limits=limits)
    assert err.value.details["page_count"] == 3
    assert len(prepare(pdf, policy=TASKS["ocr"].images, limits=limits, pages="1-2")) == 2
    with pytest.raises(InvalidRequest, match="selects 3 pages"):
        prepare(pdf, policy=TASKS["ocr"].images, limits=limits, pages="1-3")
    assert len(prepare(pdf, policy=TASKS["classify"].images, limits=limits)) == 1  # one page only: no limit to hit


def test_pages_syntax_and_range() -> None:
    assert parse_pages("1-3,5", 9) == [1, 2, 3, 5]
    assert parse_pages(" 2 , 2-3 ", 3) == [2, 3]
    pdf = make_pdf([(300, 400, 0.5)] * 2)
    for bad in ("abc", "0", "3-1", "1,,2", "-2", "1-"):
        with pytest.raises(InvalidRequest, match="pages"):
            prepare(pdf, policy=TASKS["ocr"].images, pages=bad)
    with pytest.raises(InvalidRequest, match="page 5"):
        prepare(pdf, policy=TASKS["ocr"].images, pages="5")
    with pytest.raises(InvalidRequest, match="page 2"):
        prepare(corpus("photos", "gps_tagged_640x480.jpg"), pages="2")
    assert len(prepare(corpus("photos", "gps_tagged_640x480.jpg"), pages="1")) == 1


def test_rotated_pdf_page_is_shown_as_a_viewer_shows_it() -> None:
    [p] = prepare(make_pdf([(612, 792, 0.5)], rotate=90), policy=TASKS["ocr"].images)
    assert (p.facts.width, p.facts.height) == (3300, 2550)
    assert (p.facts.sent_width, p.facts.sent_height) == (994, 768)


def test_encrypted_pdf_is_a_400() -> None:
    with pytest.raises(InvalidRequest, match="PDF is encrypted") as err:
        prepare(make_pdf([(612, 792, 0.5)], encrypt=True), policy=TASKS["ocr"].images)
    assert err.value.status == 400 and err.value.code == "invalid_request"


def test_broken_pdf_is_a_400() -> None:
    with pytest.raises(InvalidRequest, match="could not read PDF"):
        prepare(b"%PDF-1.4\nthis is not really a pdf\n", policy=TASKS["ocr"].images)


def _frames(fmt: str, n: int) -> bytes:
    frames = [Image.new("RGB", (400, 300), (40 * i, 40 * i, 40 * i)) for i in range(1, n + 1)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "WEBP"])
def test_multi_frame_images(fmt: str) -> None:
    data = _frames(fmt, 4)
    out = prepare(data, policy=TASKS["ocr"].images)
    assert [p.facts.page for p in out] == [1, 2, 3, 4]
    levels = [grey_level(decoded(p)) for p in out]
    assert levels == sorted(levels) and levels[-1] - levels[0] > 100
    [first] = prepare(data, policy=TASKS["describe"].images)
    assert abs(grey_level(decoded(first)) - levels[0]) < 5
    [third] = prepare(data, policy=TASKS["table"].images, pages="3")
    assert third.facts.page == 3 and abs(grey_level(decoded(third)) - levels[2]) < 5
    with pytest.raises(InvalidRequest, match="at most 3"):
        prepare(data, policy=TASKS["ocr"].images, limits=ImageLimits(max_pages=3))


def test_expansion_is_per_format_as_the_policy_says() -> None:
    tiff, pdf = _frames("TIFF", 3), make_pdf([(612, 792, 0.2), (612, 792, 0.5)])
    tiff_only = ImagePolicy(expand=frozenset({"tiff"}))
    assert [p.facts.page for p in prepare(tiff, policy=tiff_only)] == [1, 2, 3]
    assert [p.facts.page for p in prepare(pdf, policy=tiff_only)] == [1]
    pdf_only = ImagePolicy(expand=frozenset({"pdf"}))
    assert len(prepare(tiff, policy=pdf_only)) == 1
    assert [p.facts.page for p in prepare(pdf, policy=pdf_only)] == [1, 2]
    with pytest.raises(ValueError):
        ImagePolicy(expand=frozenset({"jpeg"}))  # a JPEG has no pages to expand


def test_resampling_follows_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise((1800, 1400)), "PNG")
    used = []
    real = Image.Image.resize

    def spy(self, size, resample=None, *args, **kwargs):
        used.append(resample)
        return real(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    prepare(data, policy=ImagePolicy(resample="document"))
    prepare(data, policy=ImagePolicy(resample="photo"))
    assert used == [images.DOCUMENT_RESAMPLE, images.PHOTO_RESAMPLE]


# --- strips --------------------------------------------------------------------------------


def test_strips_plan_is_within_the_view_and_overlaps() -> None:
    for size in ((2550, 3300), (2480, 3508), (945, 6000), (600, 3000), (1000, 800)):
        plan = plan_strips(*size)
        assert plan.count <= images.MAX_STRIPS_PER_PAGE
        assert plan.width == min(size[0], images.STRIP_TEXT_WIDTH) or plan.width < images.STRIP_TEXT_WIDTH
        assert plan.bands[0][0] == 0 and plan.bands[-1][1] == plan.height
        for (t1, b1), (t2, _) in zip(plan.bands, plan.bands[1:], strict=False):
            assert b1 - t2 >= 0.1 * (b1 - t1) - 1  # at least ~10% overlap
        for top, bottom in plan.bands:
            short, long = sorted((plan.width, bottom - top))
            assert short <= 768 and long <= 2048
        assert plan.tokens == sum(image_tokens(plan.width, b - t, "high") for t, b in plan.bands)
        assert estimate_strips(*size) == (plan.count, plan.tokens)


def test_strips_for_a_pdf_page() -> None:
    pdf = corpus("documents", "coolblue1.pdf")
    [single] = prepare(pdf, policy=TASKS["ocr"].images)
    strips = prepare(pdf, policy=TASKS["ocr"].images, strips=True)
    count, tokens = estimate_strips(single.facts.width, single.facts.height)
    assert len(strips) == count > 1
    assert sum(p.facts.estimated_tokens for p in strips) == tokens
    assert [p.facts.strip for p in strips] == list(range(1, count + 1))
    for p in strips:
        assert p.facts.page == 1 and p.facts.detail == "high"
        assert p.facts.sent_width == images.STRIP_TEXT_WIDTH
        assert decoded(p).size == (p.facts.sent_width, p.facts.sent_height)
        assert_within_view(p.facts)
        assert p.facts.to_dict()["strip"] == p.facts.strip


def test_strips_for_a_tall_image_keep_the_top_on_top() -> None:
    im = Image.new("L", (900, 4000), 255)
    im.paste(0, (0, 0, 900, 300))  # a black band at the top only
    strips = prepare(encode(im, "PNG"), policy=TASKS["ocr"].images, strips=True)
    assert len(strips) > 2
    assert grey_level(decoded(strips[0]).crop((0, 0, 900, 40))) < 30
    assert grey_level(decoded(strips[-1])) > 240
    with pytest.raises(InvalidRequest, match="high detail"):
        prepare(encode(im, "PNG"), strips=True, detail="low")


def test_strips_need_a_sane_page() -> None:
    with pytest.raises(InvalidRequest, match="too tall"):
        plan_strips(100, 100_000)


# --- interface -----------------------------------------------------------------------------


def test_limits_from_settings() -> None:
    s = Settings.from_env(
        {
            "VLM_ENDPOINT": "http://127.0.0.1:8089/v1",
            "VlmStorage": "UseDevelopmentStorage=true",
            "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
            "MAX_IMAGE_BYTES": "1000",
            "MAX_IMAGE_PIXELS": "2000",
            "MAX_PDF_PAGES": "3",
        }
    )
    assert ImageLimits.from_settings(s) == ImageLimits(max_bytes=1000, max_pixels=2000, max_pages=3)


def test_data_url() -> None:
    [p] = prepare(corpus("photos", "gps_tagged_640x480.jpg"))
    url = p.data_url()
    assert url.startswith("data:image/jpeg;base64,")
    import base64

    assert base64.b64decode(url.split(",", 1)[1]) == p.data
