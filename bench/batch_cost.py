"""Cost per 1,000 files: the realtime route, the batch route and the seed design, side by side (issue 13).

    python -m bench.batch_cost [--family gpt-5.4-mini] [--ocr] [--limit N]

Every corpus photo (task describe) and document (task invoice: PDFs and PNG renders) goes through
the real blob pipeline twice, in process, against the local model server playing a catalog model
(its name, its image-token rule, reasoning parameters): once in a realtime folder and once in a
`"mode": "batch"` folder (queued by the blob path, sealed and submitted by `BatchRunner.submit`,
answered by the stand-in's Batch API, written by `BatchRunner.collect`). Each route starts with an
empty cache, so nothing is a cache hit. Costs are the records' own `cost_usd`: prices from the model
catalog (`price_usd_per_mtok`: input/output, batch_input/batch_output), tokens as the server
measured them (`usage`). The seed design ("baseline (seed design)", bench/seed_baseline.py) sends the
same prompt with its own image: its prompt tokens are ours minus our image tokens plus its image's
tokens (the catalog formula), its answer is taken to be as long as ours, at the realtime price; it
cannot take PDFs or TIFFs (counted under "not priced") and has no batch route, so a last row
prices our realtime route on exactly the files the seed design takes.

By default the server answers in facts mode (no OCR: fast, shorter answers); `--ocr` uses its real
OCR, which makes the invoice answers realistic in length but takes minutes on a small machine.
Storage is the in-memory blob fake the tests use (tests/blob_fakes.py), so no Azurite is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
GROUPS = (("photos", "describe", ("photos",)), ("invoices", "invoice", ("documents",)))
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".pdf", ".heic"}
SEED_LABEL = "baseline (seed design)"


@dataclass
class Route:
    costs: list[float] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    completion: list[int] = field(default_factory=list)
    failed: int = 0

    def per_1000(self) -> str:
        return f"${statistics.fmean(self.costs) * 1000:,.2f}" if self.costs else "n/a"

    def tokens(self) -> str:
        if not self.prompt:
            return "n/a"
        return f"{statistics.fmean(self.prompt):,.0f} + {statistics.fmean(self.completion):,.0f}"


def image_spec(family: Any) -> str:
    """The server's image-token rule for a catalog family (local/model_tokens.py syntax)."""
    t = family.image_tokens
    if t.kind == "patch":
        return f"patch:{t.multiplier}:{t.max_patches}"
    return f"tile:{t.base}:{t.per_tile}:{t.tile_px}"


async def start_server(family: Any, ocr: bool) -> tuple[web.AppRunner, int]:
    from local.model_server import ModelServerConfig, build_app
    from local.procs import free_port

    config = ModelServerConfig(
        mode="ocr" if ocr else "facts",
        seed=1,
        model_name=family.match[0],
        image_tokens=image_spec(family),
        reasoning=family.parameters == "reasoning",
    )
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def files(group: tuple[str, ...], limit: int | None) -> list[Path]:
    found = sorted(p for d in group for p in (CORPUS / d).iterdir() if p.suffix.lower() in SUFFIXES)
    return found[:limit] if limit else found


async def run_route(port: int, model: str, task: str, paths: list[Path], mode: str) -> list[dict[str, Any]]:
    """Drop the files into a folder of `mode` on fresh storage; -> their records."""
    from shared.app import App
    from shared.batch_jobs import BatchRunner
    from shared.blob_job import BlobProcessor
    from shared.results import record_names
    from shared.settings import Settings
    from tests.blob_fakes import FakeBlobService

    env = {
        "VLM_ENDPOINT": f"http://127.0.0.1:{port}/v1",
        "VlmStorage": "UseDevelopmentStorage=true",
        "VLM_DEPLOYMENT": "bench",
        "VLM_BATCH_DEPLOYMENT": "bench-batch",
        "VLM_MODEL": model,  # the parameter style of batch lines comes from the catalog entry (shared/batch.py)
        "MAX_IMAGE_BYTES": str(32 * 1024 * 1024),
    }
    settings = Settings.from_env(env)
    blobs = FakeBlobService()
    processor = BlobProcessor(App.build(settings, blobs=blobs))
    folder = f"{mode}/"
    blobs.put(settings.images_container, folder + "_task.json", json.dumps({"task": task, "mode": mode}).encode())
    names = []
    for path in paths:
        name = folder + path.name
        blobs.put(settings.images_container, name, path.read_bytes())
        names.append(name)
    for name in names:
        blob = blobs.blobs[f"{settings.images_container}/{name}"]
        await processor.process(name, blob.data, blob.etag, {})
    if mode == "batch":
        runner = BatchRunner(processor)
        await runner.submit()
        for _ in range(100_000):  # the stand-in answers in the background; bounded by its own work
            counts = await runner.collect()
            if counts["polled"] == 0:
                break
            await asyncio.sleep(0.2)
        await runner.close()
    await processor.app.model.close()
    records = []
    for name in names:
        rn = record_names(name)
        raw = blobs.get(settings.results_container, rn.success) or blobs.get(settings.results_container, rn.error)
        records.append(json.loads(raw) if raw else {"status": "missing"})
    return records


def add(route: Route, record: dict[str, Any]) -> None:
    if record.get("status") != "succeeded" or record.get("cost_usd") is None:
        route.failed += 1
        return
    route.costs.append(record["cost_usd"])
    route.prompt.append(record["usage"]["prompt_tokens"])
    route.completion.append(record["usage"]["completion_tokens"])


def add_seed(route: Route, path: Path, task: str, record: dict[str, Any], family: Any) -> None:
    """The seed design's cost for the same file: its image in place of ours, the same text and answer."""
    from bench import seed_baseline
    from shared.tokens import price_usd

    if record.get("status") != "succeeded":
        return
    try:
        seed = seed_baseline.optimize(
            path.read_bytes(), seed_baseline.content_type_for(path.name), task, model=family.image_tokens
        )
    except seed_baseline.Unsupported:
        route.failed += 1  # PDFs, TIFFs: the seed design refuses them
        return
    usage = record["usage"]
    prompt = usage["prompt_tokens"] - usage["estimated_image_tokens"] + seed.estimated_tokens
    cost = price_usd(family.prices, prompt, usage["completion_tokens"])
    if cost is None:
        route.failed += 1
        return
    route.costs.append(cost)
    route.prompt.append(prompt)
    route.completion.append(usage["completion_tokens"])


async def main_async(args: argparse.Namespace) -> int:
    from shared.catalog import load_catalog

    family = load_catalog().named(args.family)
    if family is None:
        print(f"no catalog family {args.family!r}", file=sys.stderr)
        return 2
    p = family.prices
    runner, port = await start_server(family, args.ocr)
    try:
        print(
            f"model: {family.family} (catalog prices per 1M tokens: input ${p.input}, output ${p.output}; "
            f"batch input ${p.batch_input}, batch output ${p.batch_output}); server mode: "
            f"{'ocr' if args.ocr else 'facts'}\n"
        )
        print("| files | task | n | route | prompt + completion tokens per file | cost per 1,000 files | not priced |")
        print("|---|---|---:|---|---:|---:|---:|")
        for label, task, dirs in GROUPS:
            paths = files(dirs, args.limit)
            realtime_records = await run_route(port, family.match[0], task, paths, "realtime")
            batch_records = await run_route(port, family.match[0], task, paths, "batch")
            realtime, batch, seed, same = Route(), Route(), Route(), Route()
            for path, rt, bt in zip(paths, realtime_records, batch_records, strict=True):
                add(realtime, rt)
                add(batch, bt)
                before = len(seed.costs)
                add_seed(seed, path, task, rt, family)
                if len(seed.costs) > before:
                    add(same, rt)  # ours on exactly the files the seed design takes
            rows = (("realtime", realtime), ("batch", batch), (SEED_LABEL, seed), ("realtime, the seed's files", same))
            for name, route in rows:
                print(
                    f"| {label} | {task} | {len(paths)} | {name} | {route.tokens()} | {route.per_1000()} | {route.failed} |"
                )
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="gpt-5.4-mini", help="catalog family the server plays and prices come from")
    parser.add_argument("--ocr", action="store_true", help="real OCR answers (slow) instead of facts mode")
    parser.add_argument("--limit", type=int, default=None, help="at most N files per group")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
