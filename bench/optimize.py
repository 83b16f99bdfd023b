"""Image optimiser benchmark: "baseline (seed design)" against vlm-functions, side by side, in one run.

    python -m bench.optimize [--repeat N] [--no-ocr] [--no-filters] [--no-memory]

Reads ../shared/corpus (photos/ and documents/) and prints markdown tables:

- photos (task describe, detail auto for both): ms per image (min and median over N repeats,
  base64 included for both, since both send base64), size, JPEG bytes and estimated tokens;
- large photos (the 8-12 MP JPEGs): the "decode floor", i.e. what Pillow needs just to decode
  at the reduced DCT scale we decode at (Image.draft + load), and our time as a multiple of it;
- resize filters after the DCT-scaled decode: time and PSNR against a full-resolution Lanczos
  reference (why photos use Hamming and documents Lanczos);
- peak memory (RSS, fresh process) for the 12 MP photo;
- documents (task ocr, high detail for both): the seed design cannot take PDFs, so it gets the
  PNG renders where the corpus has them and "unsupported" otherwise; ours takes both, and
  strips mode too. Legibility is the local OCR's (RapidOCR) word recall on what the model sees,
  against the words it finds on a full-resolution render of the same page (page 1; the PDF at
  300 dpi, or the PNG itself). The baseline sends up to 2048 px at high detail, but the model
  scales that to a 768 px short side, so its image is scaled to that view before OCR (Lanczos).
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

from bench import seed_baseline
from shared.images import prepare
from shared.tokens import model_view_size

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
OURS = "vlm-functions"
BASE = seed_baseline.LABEL
LARGE_PIXELS = 7_500_000  # the 8-12 MP camera JPEGs


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(min ms, median ms, last result) over `repeat` runs after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t) * 1000)
    return min(times), statistics.median(times), result


def ours(data: bytes, **kw: Any) -> list[Any]:
    prepared = prepare(data, **kw)
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
    base: tuple[float, float, Any] | None
    ours: tuple[float, float, Any]


def bench_photos(repeat: int) -> list[PhotoRun]:
    runs = []
    for path in sorted((CORPUS / "photos").iterdir()):
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
        ctype = seed_baseline.content_type_for(path.name)
        base = None
        if ctype in seed_baseline.ACCEPTED_TYPES:
            base = timed(lambda d=data, c=ctype: seed_baseline.optimize(d, c, task="describe"), repeat)
        mine = timed(lambda d=data: ours(d, task="describe"), repeat)
        runs.append(PhotoRun(path.name, size, base, mine))
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
            base_cells = ["unsupported (image/tiff)", "-", "-", "-"]
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
    facts = prepare(data, task=task)[0].facts
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(0x0112, 1)
    w, h = facts.sent_width, facts.sent_height
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def floor_table(runs: list[PhotoRun], repeat: int) -> tuple[str, list[str]]:
    rows, ratios, speedups, twelve = [], [], [], []
    for r in runs:
        if r.size[0] * r.size[1] < LARGE_PIXELS or r.base is None:
            continue
        data = (CORPUS / "photos" / r.name).read_bytes()
        target = stored_target(data)
        lo, med, im = timed(lambda d=data, t=target: decode_floor(d, t), repeat)
        ratio = r.ours[1] / med
        speedup = r.base[1] / r.ours[1]
        ratios.append(ratio)
        speedups.append(speedup)
        if r.size[0] * r.size[1] >= 12_000_000:
            twelve.append((r.name, ratio, speedup))
        rows.append(
            [
                r.name,
                f"{r.size[0] / 1e6 * r.size[1]:.1f} MP",
                f"{target[0]}x{target[1]}",
                f"{im.width}x{im.height}",
                fmt_ms(lo, med),
                fmt_ms(r.ours[0], r.ours[1]),
                f"{ratio:.2f}x",
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
        f"{OURS} ms",
        f"{OURS} / floor",
        f"{BASE} ms",
        "speed-up",
    ]
    summary = []
    if ratios:
        summary.append(
            f"Large photos (8-12 MP, {len(ratios)} files): median {OURS} / decode floor = "
            f"{statistics.median(ratios):.2f}x; median speed-up over {BASE} = {statistics.median(speedups):.1f}x."
        )
    for name, ratio, speedup in twelve:
        summary.append(f"12 MP photo {name}: {ratio:.2f}x the decode floor, {speedup:.1f}x faster than {BASE}.")
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
        floor = timed(lambda d=data, t=target: decode_floor(d, t), repeat)[1]
        cells = [path.name, f"{target[0]}x{target[1]}"]
        for name in filters:
            resample = getattr(Image.Resampling, name)

            def run(d: bytes = data, t: tuple[int, int] = target, f: Image.Resampling = resample) -> bytes:
                small = decode_floor(d, t).resize(t, f)
                buf = io.BytesIO()
                small.save(buf, "JPEG", quality=85)
                return buf.getvalue()

            _, med, jpeg = timed(run, repeat)
            cells.append(f"{med / floor:.2f}x / {psnr(Image.open(io.BytesIO(jpeg)), reference):.1f} dB")
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
    from shared.images import prepare
    run = lambda: prepare(data, task="describe")[0].data_url()
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


def document_rows(pdf_path: Path, repeat: int, ocr: Ocr | None) -> list[list[Any]]:
    stem = pdf_path.stem
    png_path = pdf_path.with_suffix(".png")
    pdf = pdf_path.read_bytes()
    png = png_path.read_bytes() if png_path.exists() else None
    rows = []
    if png is None:  # the seed design takes JPEG, PNG and WebP only
        rows.append([stem, "pdf", BASE, "unsupported (application/pdf)", "-", "-", "-", "-", "-"])
    else:
        png_ref = reference_words(ocr.lines([Image.open(io.BytesIO(png))])) if ocr else None
        lo, med, b = timed(lambda: seed_baseline.optimize(png, "image/png", task="ocr"), repeat)
        rec = "-"
        if ocr and png_ref is not None:
            sent = jpeg(base64.b64decode(b.b64))
            view = sent.resize(model_view_size(*sent.size, "high"), Image.Resampling.LANCZOS)
            rec = f"{recall(png_ref, ocr.lines([view])):.1%}"
        rows.append(
            _row(stem, "png", BASE, (lo, med), [(b.sent_width, b.sent_height, b.bytes_sent, b.estimated_tokens)], rec)
        )
        lo, med, p = timed(lambda: ours(png, task="ocr"), repeat)
        rec = f"{recall(png_ref, ocr.lines(_page1(p))):.1%}" if ocr and png_ref is not None else "-"
        rows.append(_row(stem, "png", OURS, (lo, med), _facts(p), rec))
    pdf_ref = reference_words(ocr.lines([pdf_page_300dpi(pdf)])) if ocr else None
    for impl, strips in ((OURS, False), (f"{OURS} strips", True)):
        lo, med, p = timed(lambda s=strips: ours(pdf, task="ocr", strips=s), repeat)
        rec = f"{recall(pdf_ref, ocr.lines(_page1(p))):.1%}" if ocr and pdf_ref is not None else "-"
        rows.append(_row(stem, "pdf", impl, (lo, med), _facts(p), rec))
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
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per image (after one warm-up)")
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
    print("## Photos (task describe, detail auto)\n")
    print(photo_table(runs) + "\n")
    floor, summary = floor_table(runs, args.repeat)
    print("## Large photos against the decode floor\n")
    print(floor + "\n")
    for line in summary:
        print(f"- {line}")
    print()
    if not args.no_filters:
        print("## Resize filter after the DCT-scaled decode (high view; time as a multiple of the decode floor)\n")
        print(filter_table(max(3, args.repeat // 2)) + "\n")
    if not args.no_memory:
        print("## Peak memory (fresh process, one image)\n")
        print(memory_table() + "\n")
    print("## Documents (task ocr: high detail for both)\n")
    print(bench_documents(args.repeat, None if args.no_ocr else Ocr()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
