"""Image optimiser benchmark: "baseline (seed design)" against vlm-functions, side by side, in one run.

    python -m bench.optimize [--repeat N] [--no-ocr] [--no-filters] [--no-memory]

Reads ../shared/corpus (photos/ and documents/) and prints markdown tables. Contenders are
timed in turns (a b a b ...), so load from anything else on the machine hits both alike.

- photos and HEIC (task describe, detail auto for both): ms per image (min and median over N repeats,
  base64 included for both, since both send base64), size, JPEG bytes and estimated tokens;
- large photos (the 8-12 MP JPEGs): the "decode floor", i.e. what Pillow needs just to decode
  at the reduced DCT scale we decode at (Image.draft + load), and our time as a multiple of it;
- resize filters after the DCT-scaled decode: time and PSNR against a full-resolution Lanczos
  reference (why photos use Hamming and documents Lanczos);
- peak memory (RSS growth, fresh process) for two large photos;
- documents (task ocr, high detail for both): the seed design cannot take PDFs, so it gets the
  PNG renders where the corpus has them and "unsupported" otherwise; ours takes both, and
  strips mode too. Legibility is the local OCR's (RapidOCR) word recall on what the model sees,
  against the words it finds on a full-resolution render of the same page (page 1; the PDF at
  300 dpi, or the PNG itself). The baseline sends up to 2048 px at high detail, but the model
  scales that to a 768 px short side, so its image is scaled to that view before OCR (Lanczos).
  Strips are read pasted back into one page (the same pixels; RapidOCR's detector misses
  lines on short, wide images), with the strip-by-strip figure alongside.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pillow_heif import register_heif_opener

from bench import seed_baseline
from shared.images import plan_strips, prepare
from shared.tasks import TASKS
from shared.tokens import model_view_size

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
OURS = "vlm-functions"
BASE = seed_baseline.LABEL
LARGE_PIXELS = 7_500_000  # the 8-12 MP camera JPEGs


Timing = tuple[float, float, Any]  # (min ms, median ms, last result)


def timed(fn: Callable[[], Any], repeat: int) -> Timing:
    return interleaved({"only": fn}, repeat)["only"]


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, Timing]:
    """Time several functions in turns (a b c a b c ...) after one warm-up each.

    The machine is shared: taking turns means a burst of someone else's load hits every
    contender alike, and the ratios between them stay fair.
    """
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: (min(ts), statistics.median(ts), results[name]) for name, ts in times.items()}


def ours(data: bytes, task: str = "describe", **kw: Any) -> list[Any]:
    prepared = prepare(data, policy=TASKS[task].images, **kw)
    for p in prepared:
        p.data_url()  # the request carries base64, as the baseline's does
    return prepared


def fmt_ms(lo: float, med: float) -> str:
    return f"{lo:.1f} / {med:.1f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- photos --------------------------------------------------------------------------


@dataclass
class PhotoRun:
    name: str
    size: tuple[int, int]
    base: Timing | None
    ours: Timing
    floor: Timing | None  # large JPEGs: Pillow's draft + load at the DCT scale we decode at
    target: tuple[int, int]


def bench_photos(repeat: int) -> list[PhotoRun]:
    runs = []
    register_heif_opener()  # so the table can show HEIC sizes; prepare() registers it itself
    for path in [*sorted((CORPUS / "photos").iterdir()), *sorted((CORPUS / "heic").iterdir())]:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            large_jpeg = im.format == "JPEG" and size[0] * size[1] >= LARGE_PIXELS
        fns: dict[str, Callable[[], Any]] = {"ours": lambda d=data: ours(d, task="describe")}
        ctype = seed_baseline.content_type_for(path.name)
        if ctype in seed_baseline.ACCEPTED_TYPES:
            fns["base"] = lambda d=data, c=ctype: seed_baseline.optimize(d, c, task="describe")
        target = stored_target(data)
        if large_jpeg:
            fns["floor"] = lambda d=data, t=target: decode_floor(d, t)
        t = interleaved(fns, repeat)
        runs.append(PhotoRun(path.name, size, t.get("base"), t["ours"], t.get("floor"), target))
    return runs


def photo_table(runs: list[PhotoRun]) -> str:
    rows = []
    for r in runs:
        o = r.ours[2][0].facts
        ours_cells = [
            fmt_ms(r.ours[0], r.ours[1]),
            f"{o.sent_width}x{o.sent_height} {o.detail}",
            f"{o.bytes_sent:,}",
            o.estimated_tokens,
        ]
        if r.base is None:
            base_cells = [f"unsupported ({seed_baseline.content_type_for(r.name)})", "-", "-", "-"]
            speedup = "-"
        else:
            b = r.base[2]
            base_cells = [
                fmt_ms(r.base[0], r.base[1]),
                f"{b.sent_width}x{b.sent_height} {b.detail}",
                f"{b.bytes_sent:,}",
                b.estimated_tokens,
            ]
            speedup = f"{r.base[1] / r.ours[1]:.1f}x"
        rows.append([r.name, f"{r.size[0]}x{r.size[1]}", *base_cells, *ours_cells, speedup])
    header = [
        "photo",
        "size",
        f"{BASE} ms min / median",
        "sent",
        "bytes",
        "tokens",
        f"{OURS} ms min / median",
        "sent",
        "bytes",
        "tokens",
        "speed-up (median)",
    ]
    return table(header, rows)


def decode_floor(data: bytes, target: tuple[int, int]) -> Image.Image:
    """What Pillow needs just to decode at the reduced DCT scale that still covers the target."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", target)
    im.load()
    return im


def stored_target(data: bytes, task: str = "describe") -> tuple[int, int]:
    """Our target size in the file's stored orientation (what the draft is asked for)."""
    facts = prepare(data, policy=TASKS[task].images)[0].facts
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(0x0112, 1)
    w, h = facts.sent_width, facts.sent_height
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def floor_table(runs: list[PhotoRun]) -> tuple[str, list[str]]:
    rows, ratios, speedups, twelve = [], [], [], []
    for r in runs:
        if r.floor is None or r.base is None:
            continue
        lo, med, im = r.floor
        ratio, ratio_min = r.ours[1] / med, r.ours[0] / lo
        speedup = r.base[1] / r.ours[1]
        ratios.append(ratio)
        speedups.append(speedup)
        if r.size[0] * r.size[1] >= 12_000_000:
            twelve.append((r.name, ratio, ratio_min, speedup))
        rows.append(
            [
                r.name,
                f"{r.size[0] / 1e6 * r.size[1]:.1f} MP",
                f"{r.target[0]}x{r.target[1]}",
                f"{im.width}x{im.height}",
                fmt_ms(lo, med),
                fmt_ms(r.ours[0], r.ours[1]),
                f"{ratio_min:.2f}x / {ratio:.2f}x",
                fmt_ms(r.base[0], r.base[1]),
                f"{speedup:.1f}x",
            ]
        )
    header = [
        "photo",
        "pixels",
        "sent",
        "decoded at (DCT scale)",
        "decode floor ms min / median",
        f"{OURS} ms min / median",
        f"{OURS} / floor (min / median)",
        f"{BASE} ms min / median",
        "speed-up (median)",
    ]
    summary = []
    if ratios:
        summary.append(
            f"Large photos (8-12 MP, {len(ratios)} files): median {OURS} / decode floor = "
            f"{statistics.median(ratios):.2f}x; median speed-up over {BASE} = {statistics.median(speedups):.1f}x."
        )
    for name, ratio, ratio_min, speedup in twelve:
        summary.append(
            f"12 MP photo {name}: {ratio:.2f}x the decode floor (medians; {ratio_min:.2f}x by minima), "
            f"{speedup:.1f}x faster than {BASE}."
        )
    return table(header, rows), summary


# --- resize filters --------------------------------------------------------------------


def psnr(a: Image.Image, b: Image.Image) -> float:
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def filter_table(repeat: int) -> str:
    filters = ["BOX", "BILINEAR", "HAMMING", "BICUBIC", "LANCZOS"]
    rows = []
    for path in sorted((CORPUS / "photos").glob("*.jpg")):
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height < LARGE_PIXELS:
                continue
            full = im.convert("RGB")
        target = model_view_size(*full.size, "high")
        reference = full.resize(target, Image.Resampling.LANCZOS)

        def run(d: bytes, t: tuple[int, int], f: Image.Resampling) -> bytes:
            small = decode_floor(d, t).resize(t, f)
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=85)
            return buf.getvalue()

        fns: dict[str, Callable[[], Any]] = {"floor": lambda d=data, t=target: decode_floor(d, t)}
        for name in filters:
            fns[name] = lambda d=data, t=target, f=getattr(Image.Resampling, name): run(d, t, f)
        timings = interleaved(fns, repeat)
        floor = timings["floor"][0]
        cells = [path.name, f"{target[0]}x{target[1]}"]
        for name in filters:
            lo, _, out = timings[name]
            cells.append(f"{lo / floor:.2f}x / {psnr(Image.open(io.BytesIO(out)), reference):.1f} dB")
        rows.append(cells)
    return table(["photo", "high view", *[f"{f.lower()}: time / PSNR" for f in filters]], rows)


# --- memory ------------------------------------------------------------------------------

_MEMORY_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path

def status(key):  # /proc/self/status: VmHWM (peak) is per process image, unlike ru_maxrss across exec
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])

data = Path({path!r}).read_bytes()
if {impl!r} == "ours":
    from shared.images import plan_strips, prepare
    run = lambda: prepare(data)[0].data_url()  # the default policy is describe's (PHOTO_IMAGES)
else:
    from bench import seed_baseline
    run = lambda: seed_baseline.optimize(data, "image/jpeg", task="describe")
before = status("VmRSS")
run()
print(status("VmHWM") - before)
"""


def memory_table() -> str:
    rows = []
    for name in ("phone_4032x3024.jpg", "nokia_4608x1976.jpg"):
        path = CORPUS / "photos" / name
        cells = [name]
        for impl in ("baseline", "ours"):
            script = _MEMORY_SCRIPT.format(root=str(ROOT), path=str(path), impl=impl)
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
            cells.append(f"{int(out.stdout.strip()) / 1024:.0f} MB")
        rows.append(cells)
    return table(["photo", f"{BASE}: peak RSS growth", f"{OURS}: peak RSS growth"], rows)


# --- documents ----------------------------------------------------------------------------


class Ocr:
    """RapidOCR at native resolution (its default shrinks anything over 2000 px first)."""

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR(max_side_len=5000)

    def lines(self, images: list[Image.Image]) -> list[str]:
        import numpy as np

        out: list[str] = []
        for im in images:
            result, _ = self.engine(np.asarray(im.convert("RGB")))
            out.extend(text for _, text, _ in (result or []))
        return out


def reference_words(lines: list[str]) -> collections.Counter[str]:
    words: collections.Counter[str] = collections.Counter()
    for line in lines:
        words.update(w for w in re.findall(r"[a-z0-9]+", line.lower()) if len(w) >= 3)
    return words


def recall(reference: collections.Counter[str], lines: list[str]) -> float:
    """Share of the reference's words (3+ letters/digits) found in the text; OCR's word gaps do not matter."""
    blob = "|".join(re.sub(r"[^a-z0-9]", "", line.lower()) for line in lines)
    found = sum(min(n, blob.count(w)) for w, n in reference.items())
    return found / max(1, sum(reference.values()))


def jpeg(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def pdf_page_300dpi(data: bytes) -> Image.Image:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(data)
    try:
        return doc[0].render(scale=300 / 72).to_pil()
    finally:
        doc.close()


def _facts(prepared: list[Any]) -> list[tuple[int, int, int, int]]:
    return [(p.facts.sent_width, p.facts.sent_height, p.facts.bytes_sent, p.facts.estimated_tokens) for p in prepared]


def _page1(prepared: list[Any]) -> list[Image.Image]:
    return [jpeg(p.data) for p in prepared if p.facts.page in (None, 1)]


def _row(
    stem: str, source: str, impl: str, timing: tuple[float, float], images: list[tuple[int, int, int, int]], rec: str
) -> list[Any]:
    sizes = sorted({f"{w}x{h}" for w, h, _, _ in images})
    return [
        stem,
        source,
        impl,
        fmt_ms(*timing),
        len(images),
        ", ".join(sizes),
        f"{sum(b for _, _, b, _ in images):,}",
        sum(t for _, _, _, t in images),
        rec,
    ]


def stitched(prepared: list[Any]) -> Image.Image:
    """Page 1's strips pasted back at their rows: the same pixels the model gets, as one page."""
    strips = [p for p in prepared if p.facts.page in (None, 1)]
    f = strips[0].facts
    plan = plan_strips(f.width, f.height)
    page = Image.new("RGB", (plan.width, plan.height), "white")
    for p, (top, _) in zip(strips, plan.bands, strict=True):
        page.paste(jpeg(p.data), (0, top))
    return page


def document_rows(pdf_path: Path, repeat: int, ocr: Ocr | None) -> list[list[Any]]:
    stem = pdf_path.stem
    png_path = pdf_path.with_suffix(".png")
    pdf = pdf_path.read_bytes()
    png = png_path.read_bytes() if png_path.exists() else None
    rows = []
    if png is None:  # the seed design takes JPEG, PNG and WebP only
        rows.append([stem, "pdf", BASE, "unsupported (application/pdf)", "-", "-", "-", "-", "-"])
    else:
        t = interleaved(
            {
                "base": lambda: seed_baseline.optimize(png, "image/png", task="ocr"),
                "ours": lambda: ours(png, task="ocr"),
            },
            repeat,
        )
        b, p = t["base"][2], t["ours"][2]
        base_rec = ours_rec = "-"
        if ocr:
            png_ref = reference_words(ocr.lines([Image.open(io.BytesIO(png))]))
            sent = jpeg(base64.b64decode(b.b64))
            view = sent.resize(model_view_size(*sent.size, "high"), Image.Resampling.LANCZOS)
            base_rec = f"{recall(png_ref, ocr.lines([view])):.1%}"
            ours_rec = f"{recall(png_ref, ocr.lines(_page1(p))):.1%}"
        base_facts = [(b.sent_width, b.sent_height, b.bytes_sent, b.estimated_tokens)]
        rows.append(_row(stem, "png", BASE, t["base"][:2], base_facts, base_rec))
        rows.append(_row(stem, "png", OURS, t["ours"][:2], _facts(p), ours_rec))
    t = interleaved(
        {"single": lambda: ours(pdf, task="ocr"), "strips": lambda: ours(pdf, task="ocr", strips=True)}, repeat
    )
    single, strips = t["single"][2], t["strips"][2]
    single_rec = strips_rec = "-"
    if ocr:
        pdf_ref = reference_words(ocr.lines([pdf_page_300dpi(pdf)]))
        single_rec = f"{recall(pdf_ref, ocr.lines(_page1(single))):.1%}"
        per_strip = recall(pdf_ref, ocr.lines(_page1(strips)))
        strips_rec = f"{recall(pdf_ref, ocr.lines([stitched(strips)])):.1%} (per strip {per_strip:.1%})"
    rows.append(_row(stem, "pdf", OURS, t["single"][:2], _facts(single), single_rec))
    rows.append(_row(stem, "pdf", f"{OURS} strips", t["strips"][:2], _facts(strips), strips_rec))
    return rows


def bench_documents(repeat: int, ocr: Ocr | None) -> str:
    rows = []
    for pdf_path in sorted((CORPUS / "documents").glob("*.pdf")):
        rows.extend(document_rows(pdf_path, repeat, ocr))
    header = [
        "document",
        "input",
        "optimiser",
        "ms min / median",
        "images",
        "sent",
        "bytes",
        "tokens",
        "OCR recall (page 1)",
    ]
    return table(header, rows)


# --- main -----------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import PIL

    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, Pillow {PIL.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per image (after one warm-up)")
    parser.add_argument("--no-ocr", action="store_true", help="skip the OCR legibility column (the slow part)")
    parser.add_argument("--no-filters", action="store_true", help="skip the resize-filter comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory comparison")
    args = parser.parse_args(argv)
    if not CORPUS.exists():
        print(f"corpus not found at {CORPUS}", file=sys.stderr)
        return 2
    print(f"# Image optimiser: {BASE} vs {OURS}\n")
    print(f"Machine: {machine()}; --repeat {args.repeat}\n")
    runs = bench_photos(args.repeat)
    print("## Photos and HEIC (task describe, detail auto)\n")
    print(photo_table(runs) + "\n")
    floor, summary = floor_table(runs)
    print("## Large photos against the decode floor\n")
    print(floor + "\n")
    for line in summary:
        print(f"- {line}")
    print()
    if not args.no_filters:
        print(
            "## Resize filter after the DCT-scaled decode (high view; decode + resize + encode as a multiple of the decode floor, minima; PSNR against full-resolution Lanczos)\n"
        )
        print(filter_table(max(3, args.repeat // 2)) + "\n")
    if not args.no_memory:
        print("## Peak memory (fresh process, one image)\n")
        print(memory_table() + "\n")
    print("## Documents (task ocr: high detail for both)\n")
    print(bench_documents(args.repeat, None if args.no_ocr else Ocr()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
