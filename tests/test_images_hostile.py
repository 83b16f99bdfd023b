"""Hostile inputs to the image optimiser and the local model server, each built from code (issue 10).

Every case asserts that the work is refused *before* it is done: the decoder, seek or render
that would have cost minutes or gigabytes is replaced by one that fails the test if called.
No wall-clock assertions: whether a step ran is what is checked.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import GifImagePlugin, Image, ImageFile, TiffImagePlugin

import shared.images as images
from shared.errors import InvalidRequest, TooManyPixels, VlmError
from shared.frame_count import MAX_IFD_ENTRIES, gif_frames, tiff_frames
from shared.images import Budget, ImageLimits, plan_strips, prepare
from shared.pipeline import AnalysisRequest, PrepareSlots, _prepare_all
from shared.settings import Settings
from shared.tasks import TASKS
from tests.constants import TEST_DEPLOYMENT

# ------------------------------------------------------------------------------- builders


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_16bit_grey(width: int, height: int) -> bytes:
    """A real, valid 16-bit greyscale PNG of zeros, compressed row by row (never whole in memory)."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 2 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


# One 1x1 frame at (0, 0): image descriptor with a 2-colour local table, LZW code size 2,
# codes clear(4), 0, end(5) packed LSB first (0x44 0x01), then the block terminator.
_GIF_FRAME = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0x80) + b"\x00\x00\x00\xff\xff\xff" + b"\x02\x02\x44\x01\x00"


def gif_canvas(width: int, height: int, frames: int) -> bytes:
    """An animated GIF with a huge logical screen and tiny frames: a few bytes per frame."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    return head + _GIF_FRAME * frames + b"\x3b"


def _tiff_ifd(pixel_at: int, next_at: int) -> bytes:
    """A complete IFD for a 1x1 8-bit greyscale image whose one pixel is at `pixel_at`."""
    tags = [  # (tag, type, value): SHORT=3, LONG=4
        (256, 3, 1),
        (257, 3, 1),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, pixel_at),
        (277, 3, 1),
        (278, 3, 1),
        (279, 4, 1),
    ]
    body = struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        body += struct.pack("<HHI", tag, typ, 1) + packed
    return body + struct.pack("<I", next_at)


TIFF_IFD_SIZE = len(_tiff_ifd(0, 0))  # 114 bytes
TIFF_CHAIN_AT = 8 + 2  # header, then the shared pixel (padded to a word), then the IFDs


def tiff_chain(ifds: int) -> bytes:
    """A valid TIFF of `ifds` 1x1 pages chained one after another, all sharing one pixel."""
    at = [TIFF_CHAIN_AT + i * TIFF_IFD_SIZE for i in range(ifds)]
    chain = b"".join(_tiff_ifd(8, at[i + 1] if i + 1 < ifds else 0) for i in range(ifds))
    return b"II*\x00" + struct.pack("<I", TIFF_CHAIN_AT) + b"\x80\x00" + chain


def pdf_with_mediabox(width_pt: float, height_pt: float) -> bytes:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    page = doc.new_page(612, 792)
    page.set_mediabox(0, 0, width_pt, height_pt)
    page.close()
    buf = io.BytesIO()
    doc.save(buf)
    doc.close()
    return buf.getvalue()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decode fails the test: the refusal must come first."""

    def forbidden(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pixels were decoded before the input was refused")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden)


# ------------------------------------------------------------------------- frames and pages


def test_frame_counters_agree_with_pillow_on_real_multi_frame_files() -> None:
    for n in (1, 2, 7):
        frames = [Image.new("RGB", (40 + i, 30), (30 * i, 0, 0)) for i in range(n)]
        gif = io.BytesIO()
        frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], comment=b"hi", loop=0)
        tif = io.BytesIO()
        frames[0].save(tif, "TIFF", save_all=True, append_images=frames[1:])
        big = io.BytesIO()
        frames[0].save(big, "TIFF", save_all=True, append_images=frames[1:], big_tiff=True)
        for data, count in ((gif, gif_frames), (tif, tiff_frames), (big, tiff_frames)):
            assert count(data.getvalue(), 100) == Image.open(data).n_frames == n
    assert gif_frames(gif_canvas(10, 10, 50), 20) == 21  # stops just past the cap
    assert tiff_frames(tiff_chain(50), 20) == 21
    assert len(prepare(tiff_chain(3), policy=TASKS["ocr"].images, limits=ImageLimits(min_side=1))) == 3


def test_seeking_far_into_a_huge_canvas_gif_is_refused_before_compositing(monkeypatch) -> None:
    def no_seek(self: Any, frame: int) -> None:
        raise AssertionError("frames were composited before the budget was checked")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", no_seek)
    data = gif_canvas(5000, 5000, 900)  # 19 KB; 900 frames of a 100 MB canvas to composite
    with pytest.raises(TooManyPixels, match="MAX_REQUEST_DECODED_BYTES") as err:
        prepare(data, policy=TASKS["describe"].images, pages="900")
    assert err.value.details["limit"] == "MAX_REQUEST_DECODED_BYTES"
    assert err.value.status == 400
    data = gif_canvas(5000, 5000, 3000)
    with pytest.raises(InvalidRequest, match="MAX_FRAMES"):
        prepare(data, policy=TASKS["describe"].images, pages="3000")


def test_a_small_animated_gif_still_gives_the_selected_frame() -> None:
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    [third] = prepare(buf.getvalue(), policy=TASKS["describe"].images, pages="3")
    assert third.facts.page == 3
    assert len(prepare(buf.getvalue(), policy=TASKS["ocr"].images)) == 3
    with pytest.raises(InvalidRequest, match="page 4"):
        prepare(buf.getvalue(), policy=TASKS["describe"].images, pages="4")


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_frames_composited_on_the_way_to_a_selected_one_are_charged(fmt: str) -> None:
    frames = [Image.new("RGB", (400, 400), (60 * i, 0, 0)) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100)
    data = buf.getvalue()
    canvas = 400 * 400 * 4  # bytes a composited frame costs
    limits = ImageLimits(max_request_decoded_bytes=3 * canvas)
    assert prepare(data, pages="2", limits=limits)[0].facts.page == 2  # frames 1-2 composited, then loaded
    with pytest.raises(TooManyPixels, match="reaching frame 4"):
        prepare(data, pages="4", limits=limits)  # frames 1-4 composited: over before seeking


def test_a_tiff_with_200k_chained_ifds_is_refused_without_walking_them(monkeypatch) -> None:
    data = tiff_chain(170_000)  # 19 MB of valid pages: Pillow's n_frames takes minutes over it
    assert len(data) < 20 * 1024 * 1024

    def no_walk(self: Any) -> int:
        raise AssertionError("Pillow walked every IFD")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "n_frames", property(no_walk))
    with pytest.raises(InvalidRequest, match="more than 1000 frames") as err:
        prepare(data, policy=TASKS["ocr"].images)
    assert err.value.details == {"format": "tiff", "limit": "MAX_FRAMES", "max_frames": 1000}
    with pytest.raises(InvalidRequest, match="MAX_FRAMES"):
        prepare(data, policy=TASKS["describe"].images, pages="2")


def test_a_tiff_chain_of_giant_ifds_ends_where_a_reader_would_stall() -> None:
    base = bytearray(tiff_chain(3))
    assert tiff_frames(bytes(base), 1000) == 3 == Image.open(io.BytesIO(bytes(base))).n_frames
    second = TIFF_CHAIN_AT + TIFF_IFD_SIZE  # make the second IFD claim MAX_IFD_ENTRIES + 1 tags
    base[second : second + 2] = struct.pack("<H", MAX_IFD_ENTRIES + 1)
    assert tiff_frames(bytes(base), 1000) == 1


# -------------------------------------------------------------------------------------- PDF


@pytest.mark.parametrize("strips", [False, True])
def test_a_pdf_page_2_31_points_tall_is_refused_before_planning(monkeypatch, strips: bool) -> None:
    data = pdf_with_mediabox(612, 2147483647)
    monkeypatch.setattr(images, "plan_strips", lambda *a, **k: pytest.fail("a hopeless page was planned"))
    monkeypatch.setattr("shared.pdf.render", lambda *a, **k: pytest.fail("a hopeless page was rendered"))
    with pytest.raises(InvalidRequest, match="200 inches") as err:
        prepare(data, policy=TASKS["ocr"].images, strips=strips)
    assert "PDFium" not in err.value.message


def test_strip_planning_never_lists_more_bands_than_it_may_send(monkeypatch) -> None:
    listed: list[int] = []
    real = images._bands
    monkeypatch.setattr(images, "_bands", lambda total, h: listed.append(len(b := real(total, h))) or b)
    with pytest.raises(InvalidRequest, match="too tall for strips"):
        plan_strips(2550, 8_947_848_613)  # 612 x 2^31 pt at 300 dpi: millions of bands
    assert max(listed, default=0) <= images.MAX_STRIPS_PER_PAGE


def test_images_sent_per_request_are_capped_across_inputs() -> None:
    from test_images import make_pdf

    pdf = make_pdf([(612, 792, 0.5)] * 3)
    limits = ImageLimits(max_sent_images=4)
    budget = Budget(limits)
    assert len(prepare(pdf, policy=TASKS["ocr"].images, limits=limits, budget=budget)) == 3
    with pytest.raises(InvalidRequest, match="MAX_SENT_IMAGES") as err:
        prepare(pdf, policy=TASKS["ocr"].images, limits=limits, budget=budget)
    assert err.value.details["limit"] == "MAX_SENT_IMAGES"


# ------------------------------------------------------------------------ aspect and memory


def test_a_20000x2_png_is_refused_naming_the_minimum_side(no_decoding) -> None:
    data = png(Image.new("L", (20000, 2), 255))
    with pytest.raises(InvalidRequest, match="MIN_IMAGE_SIDE") as err:
        prepare(data)
    assert err.value.details["min_image_side"] == 8 and err.value.status == 400


def test_thin_but_sendable_images_still_go() -> None:
    [banner] = prepare(png(Image.new("RGB", (1000, 16), (9, 9, 9))), detail="low")
    assert (banner.facts.sent_width, banner.facts.sent_height) == (512, 8)
    with pytest.raises(InvalidRequest, match="MIN_IMAGE_SIDE"):
        prepare(png(Image.new("RGB", (1000, 14), (9, 9, 9))), detail="low")
    assert prepare(png(Image.new("RGB", (1000, 14), (9, 9, 9))), limits=ImageLimits(min_side=4), detail="low")


def test_a_7071_square_16_bit_png_is_refused_from_its_header(no_decoding) -> None:
    data = png_16bit_grey(7071, 7071)
    assert len(data) < 200_000
    with pytest.raises(TooManyPixels, match="MAX_DECODED_BYTES") as err:
        prepare(data)
    assert err.value.details["limit"] == "MAX_DECODED_BYTES"


def test_decoded_bytes_count_the_mode_not_only_pixels() -> None:
    grey16 = png_16bit_grey(600, 600)  # 360k px: 2 bytes stored + 8 converting = 3.6 MB
    rgb = png(Image.new("RGB", (600, 600), (1, 2, 3)))  # 360k px x 4 bytes = 1.44 MB
    limits = ImageLimits(max_decoded_bytes=2_000_000)
    assert prepare(rgb, limits=limits)
    with pytest.raises(TooManyPixels, match="MAX_DECODED_BYTES"):
        prepare(grey16, limits=limits)
    assert prepare(grey16)[0].facts.width == 600  # within the default budget it decodes


def test_a_jpeg_is_charged_at_its_reduced_decode_size() -> None:
    data = jpeg(Image.new("RGB", (4000, 3000), (200, 10, 10)))  # 48 MB decoded full size
    [p] = prepare(data, detail="low", limits=ImageLimits(max_decoded_bytes=8_000_000))
    assert p.facts.sent_width == 512  # decoded at 1/4 or 1/8 scale, within the 8 MB budget


def test_the_request_budget_adds_up_across_inputs(monkeypatch) -> None:
    env = {
        "VLM_ENDPOINT": "http://127.0.0.1:1/v1",
        "VlmStorage": "UseDevelopmentStorage=true",
        "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
        "MAX_REQUEST_DECODED_BYTES": "3000000",
    }
    settings = Settings.from_env(env)
    one = png(Image.new("RGB", (600, 600), (1, 2, 3)))  # 1.44 MB each
    assert len(_prepare_all(AnalysisRequest(images=[one, one], task="compare"), settings)) == 2
    with pytest.raises(TooManyPixels, match="MAX_REQUEST_DECODED_BYTES") as err:
        _prepare_all(AnalysisRequest(images=[one, one, one], task="compare"), settings)
    assert err.value.details["image"] == 3


def test_settings_for_the_image_budget() -> None:
    base = {
        "VLM_ENDPOINT": "http://127.0.0.1:1/v1",
        "VlmStorage": "UseDevelopmentStorage=true",
        "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
    }
    s = Settings.from_env(base)
    assert ImageLimits.from_settings(s) == ImageLimits()
    assert s.prepare_concurrency == 2
    s = Settings.from_env(
        base
        | {
            "MAX_DECODED_BYTES": "1",
            "MAX_REQUEST_DECODED_BYTES": "2",
            "MAX_FRAMES": "3",
            "MIN_IMAGE_SIDE": "4",
            "MAX_SENT_IMAGES": "5",
            "PREPARE_CONCURRENCY": "6",
        }
    )
    assert ImageLimits.from_settings(s) == ImageLimits(
        max_decoded_bytes=1, max_request_decoded_bytes=2, max_frames=3, min_side=4, max_sent_images=5
    )
    assert s.prepare_concurrency == 6


# ----------------------------------------------------------------------- messages are ours


def test_decoder_and_pdfium_text_never_reaches_the_caller() -> None:
    broken_png = png(Image.new("RGB", (50, 50)))[:-40] + b"\x00" * 40
    cases = [
        broken_png,
        b"%PDF-1.4\nthis is not really a pdf\n",
        b"GIF89a" + b"\xff" * 40,
        b"II*\x00" + b"\xff" * 40,
    ]
    for data in cases:
        with pytest.raises(VlmError) as err:
            prepare(data, policy=TASKS["ocr"].images)
        text = err.value.message
        for leak in ("PDFium", "Errno", "BytesIO", "broken data stream", "cannot identify", "Truncated"):
            assert leak not in text, (data[:8], text)
    with pytest.raises(InvalidRequest) as err:
        prepare(broken_png, pages="1," + "9" * 100_000)
    assert len(err.value.message) < 200 and len(err.value.details["pages"]) < 50


# ------------------------------------------------------------------ bounded concurrent prepares


async def test_prepare_slots_hold_until_the_decode_finishes_even_when_the_caller_gives_up() -> None:
    slots = PrepareSlots(1)
    gate = threading.Event()
    started: list[str] = []
    first_started = threading.Event()

    def work(name: str) -> str:
        started.append(name)
        first_started.set()
        if name == "first":
            assert gate.wait(10)
        return name

    first = asyncio.create_task(slots.run(work, "first"))
    assert await asyncio.to_thread(first_started.wait, 10)
    first.cancel()  # the request's deadline passed: its thread still decodes
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.create_task(slots.run(work, "second"))
    await asyncio.sleep(0.1)
    assert started == ["first"]  # the slot is still taken by the running decode
    gate.set()
    assert await second == "second"
    assert started == ["first", "second"]


async def test_the_pipeline_prepares_through_the_dependencies_slots(monkeypatch) -> None:
    from shared.app import App

    settings = Settings.from_env(
        {
            "VLM_ENDPOINT": "http://127.0.0.1:1/v1",
            "VlmStorage": "UseDevelopmentStorage=true",
            "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
            "PREPARE_CONCURRENCY": "3",
        }
    )
    deps = App.build(settings)
    assert deps.prepare_slots is deps.prepare_slots and deps.prepare_slots.size == 3


# --------------------------------------------------------------------- the local model server


@pytest.fixture
async def model_server() -> AsyncIterator[Any]:
    from aiohttp.test_utils import TestClient, TestServer

    from local.model_server import ModelServerConfig, build_app

    client = TestClient(TestServer(build_app(ModelServerConfig(mode="facts", seed=1)), host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


def _chat(data: bytes, mime: str = "image/png", detail: str = "high") -> dict[str, Any]:
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    parts = [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": url, "detail": detail}}]
    return {"model": TEST_DEPLOYMENT, "messages": [{"role": "user", "content": parts}]}


async def test_the_model_server_survives_what_a_caller_or_the_service_can_send(model_server) -> None:
    hostile = {
        "20000x2 png": png(Image.new("L", (20000, 2), 0)),
        "512x1 jpeg (what the service sent for it)": jpeg(Image.new("RGB", (512, 1))),
        "2 px high": png(Image.new("RGB", (300, 2), (250, 0, 0))),
        "7071^2 16-bit png": png_16bit_grey(7071, 7071),
        "5000^2 canvas gif, 3000 frames": gif_canvas(5000, 5000, 3000),
        "tiff (not an OpenAI format)": tiff_chain(3),
        "garbage": b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
    }
    for name, data in hostile.items():
        for detail in ("low", "high"):
            resp = await model_server.post("/v1/chat/completions", json=_chat(data, detail=detail))
            assert resp.status == 200 or 400 <= resp.status < 500, (name, resp.status)
            body = await resp.json()
            assert ("error" in body) == (resp.status != 200), name
    ok = await model_server.post("/v1/chat/completions", json=_chat(png(Image.new("RGB", (64, 64)))))
    assert ok.status == 200


def test_ocr_input_is_padded_to_a_bounded_aspect() -> None:
    from local.ocr_engine import OCR_MAX_ASPECT, OCR_MIN_SIDE, ocr_canvas

    for size in ((2048, 1), (1, 2048), (512, 1), (3, 3), (2048, 600)):
        out = ocr_canvas(Image.new("RGB", size, (0, 0, 0)))
        w, h = out.size
        assert w >= size[0] and h >= size[1] and min(w, h) >= OCR_MIN_SIDE
        assert max(w, h) <= max(OCR_MAX_ASPECT * min(w, h), OCR_MIN_SIDE)
        assert out.crop((0, 0, *size)).getextrema() == ((0, 0), (0, 0), (0, 0))  # the view is unchanged, top-left
    view = Image.new("RGB", (800, 600))
    assert ocr_canvas(view) is view


@pytest.mark.integration  # loads RapidOCR
def test_ocr_reads_a_view_one_pixel_high_without_blowing_up() -> None:
    """RapidOCR alone would scale a 2048x1 view to 61440x7680 on the way in (~23 GB): padded, it is tiny."""
    from local.ocr_engine import OcrEngine

    engine = OcrEngine()
    try:
        for size in ((2048, 1), (1, 2048), (512, 2)):
            assert engine.read_sync(Image.new("RGB", size, (255, 255, 255))) == []
    finally:
        engine.close()


# ---------------------------------------------------------------------- over HTTP, in-process


def _hostile_uploads() -> dict[str, tuple[bytes, dict[str, str]]]:
    return {
        "huge-canvas gif, seek to frame 900": (gif_canvas(5000, 5000, 900), {"task": "describe", "pages": "900"}),
        "gif with 3000 frames": (gif_canvas(5000, 5000, 3000), {"task": "ocr"}),
        "tiff with 170k pages": (tiff_chain(170_000), {"task": "ocr"}),
        "pdf page 2^31 pt tall, strips": (pdf_with_mediabox(612, 2147483647), {"task": "ocr", "strips": "true"}),
        "20000x2 png": (png(Image.new("L", (20000, 2), 255)), {"task": "describe"}),
        "7071^2 16-bit png": (png_16bit_grey(7071, 7071), {"task": "describe"}),
        "broken png": (png(Image.new("RGB", (50, 50)))[:-40] + b"\x00" * 40, {"task": "describe"}),
    }


async def test_hostile_uploads_over_http_are_4xx_json_errors_without_a_model_call() -> None:
    from shared.http_api import HttpInput, handle_analyze
    from tests.fakes import ScriptedModel
    from tests.test_pipeline import deps_with, router

    scripted = ScriptedModel()
    deps = deps_with(router(scripted))
    for name, (data, params) in _hostile_uploads().items():
        request = HttpInput("POST", {"content-type": "application/octet-stream"}, params, data)
        out = await handle_analyze(request, deps)
        assert 400 <= out.status < 500, (name, out.status, out.body)
        error = out.body["error"]
        assert error["code"] in ("invalid_request", "too_many_pixels"), name
        assert "Error" not in error["message"] and "PDFium" not in error["message"], name
    assert scripted.requests == []
    ok = HttpInput("POST", {"content-type": "image/png"}, {}, png(Image.new("RGB", (64, 64), (9, 9, 9))))
    assert (await handle_analyze(ok, deps)).status == 200
