"""Throughput at a fixed quota: images per minute and the share of the TPM quota used.

    python -m bench.throughput [--images N] [--tpm T] [--rpm R] [--latency-ms L]
                               [--concurrency C] [--baseline-quota both|same|seed] [--only ours|baseline]
    python -m bench.throughput --instances N [--per-instance K] [--paths blob,http]
                               [--designs ours,ours-static-split,seed] [--images M] [--window-s W] ...

With --instances, N worker processes share the quota (bench/multi.py, bench/worker.py) and the
last line printed is one JSON object {"designs": {...}}; without it, the one-process comparison
below.

One local model server subprocess (facts mode: no OCR, answers from measured image facts; no
random faults; quota enforced as Azure does: each request is charged its prompt tokens plus
max_tokens when it is admitted, nothing is refunded, over a sliding window of 60 s, and a request
that does not fit is refused with 429 + retry-after-ms). The same distinct synthetic images go
through, with C in flight (default 10, the seed's semaphore):

- ours: `shared.pipeline.analyze` with a memory-only cache that stores nothing (every image
  costs a model call) and the real ModelRouter (the openai SDK as the only retry layer, the
  client-side limiter set to the server's quota with VLM_TPM / VLM_RPM);
- baseline (seed design): bench/seed_baseline_client.py, the seed's semaphore, sliding-log
  limiter and retry loop, with the openai SDK's own retries off; its limiter set to the server's
  quota (fair) and/or to the seed's own 100 RPM / 100,000 TPM.

The server is reset between runs (empty quota window, zeroed counters). Per design: images done,
failed items, elapsed, images/min, tokens from the server's stats, quota utilisation, 429s.
Two token figures, both from the server:

- charged: what the quota counts, prompt tokens + max_tokens per admitted request;
- used: prompt + completion tokens as billed (what `usage` reports).

quota utilisation = charged / (TPM x elapsed minutes). The same ratio over used tokens is printed
too; it can never exceed used/charged per request (~15% here), whatever the client does.

Mind the window: the server's window starts empty, so any client may send a whole window's quota
at once and again at each window boundary; a run that needs k windows can therefore end a little
after (k-1) minutes (utilisation above 100%) if the client bursts, or after k minutes if it paces
evenly. "fastest possible s" is that lower bound for the run's charges; in a short run the
difference between bursting and pacing dominates, over many windows it fades.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.seed_baseline import LABEL as BASELINE
from local.model_admin import ModelAdmin, read_token

ROOT = Path(__file__).resolve().parent.parent
OURS = "ours (vlm-functions)"
WINDOW_S = 60.0  # the model server's default quota window


def synthetic_images(n: int, seed: int = 1, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    """`n` distinct PNGs: random background, random rectangles, an index label."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    w, h = size
    out = []
    for i in range(n):
        im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(im)
        for _ in range(8):
            x, y = rng.randrange(w - 30), rng.randrange(h - 30)
            draw.rectangle([x, y, x + rng.randrange(10, 60), y + rng.randrange(10, 60)], fill=_colour(rng))
        draw.text((10, 10), f"bench {seed}-{i}", fill=(0, 0, 0))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


@dataclass
class Run:
    design: str
    limiter: str
    images: int
    done: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    server: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 0
    tpm: int = 0
    notes: str = ""

    @property
    def minutes(self) -> float:
        return self.elapsed_s / 60.0

    @property
    def images_per_min(self) -> float:
        return self.done / self.minutes if self.elapsed_s else 0.0

    @property
    def used_tokens(self) -> int:
        t = self.server.get("tokens", {})
        return int(t.get("prompt", 0)) + int(t.get("completion", 0))

    @property
    def charged_tokens(self) -> int:
        """What the server's quota counted: prompt + max_tokens for each admitted (completed) request."""
        if "charged_tokens" in self.server:
            return int(self.server["charged_tokens"])
        return (
            int(self.server.get("tokens", {}).get("prompt", 0)) + int(self.server.get("completed", 0)) * self.max_tokens
        )

    @property
    def throttled(self) -> int:
        return int(self.server.get("by_status", {}).get("429", 0))

    def fastest_s(self, window_s: float, latency_s: float) -> float:
        """The shortest run any client could achieve for these charges: one full window at the start and at
        every window boundary after it, then the latency of the last call."""
        if not self.tpm:
            return latency_s
        per_window = self.tpm * window_s / 60  # the server scales the per-minute quota to its window
        return window_s * (math.ceil(self.charged_tokens / per_window) - 1) + latency_s

    def share(self, tokens: int) -> float:
        return tokens / (self.tpm * self.minutes) if self.elapsed_s and self.tpm else 0.0


async def run_ours(
    url: str, images: list[bytes], tpm: int, rpm: int, concurrency: int, window_s: float = WINDOW_S
) -> Run:
    from shared.app import App
    from shared.cache import MemoryLRU, ResultCache
    from shared.errors import VlmError
    from shared.pipeline import AnalysisRequest, analyze
    from shared.settings import Settings
    from shared.tasks import TASKS

    settings = Settings.from_env(
        {
            "VLM_ENDPOINT": f"{url}/v1",
            "VlmStorage": "UseDevelopmentStorage=true",  # never touched: the cache below has no blob tier
            "VLM_DEPLOYMENT": "bench",  # the local model server takes any deployment name
            "VLM_TPM": str(tpm),
            "VLM_RPM": str(rpm),
            "VLM_RATE_WINDOW_S": str(window_s),  # the limiter's burst matches the server's window
            "VLM_TIMEOUT_S": "60",
            "VLM_MAX_RETRIES": "3",
        }
    )
    deps = App.build(settings, cache=ResultCache(MemoryLRU(0)))
    run = Run(OURS, f"RateLimiter {rpm} RPM / {tpm} TPM, {window_s:g} s burst (the server's quota)", len(images))
    run.max_tokens = TASKS["describe"].max_tokens
    gate = asyncio.Semaphore(concurrency)

    async def one(data: bytes) -> None:
        async with gate:
            try:
                await analyze(AnalysisRequest(images=[data], task="describe"), deps)
                run.done += 1
            except VlmError as err:
                run.failed += 1
                run.failures[err.code] = run.failures.get(err.code, 0) + 1

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(d) for d in images))
    finally:
        run.elapsed_s = time.perf_counter() - t0
        limiter = deps.model.limiter(settings.primary).stats()
        run.notes = f"limiter: {limiter['throttles']} pauses after 429, longest wait {limiter['max_wait_s']:.1f} s"
        await deps.close()
    return run


async def run_baseline(url: str, images: list[bytes], tpm: int, rpm: int, concurrency: int, quota: str) -> Run:
    from bench.seed_baseline_client import SEED_RPM, SEED_TPM, SeedClient

    if quota == "seed":
        rpm_b, tpm_b, which = SEED_RPM, SEED_TPM, "the seed's own setting"
    else:
        rpm_b, tpm_b, which = rpm, tpm, "set to the server's quota for fairness"
    max_tokens = 1000  # the same as ours for describe, so both are charged alike
    client = SeedClient(f"{url}/v1", rpm=rpm_b, tpm=tpm_b, timeout_s=60)
    run = Run(BASELINE, f"sliding-log limiter {rpm_b} RPM / {tpm_b} TPM ({which})", len(images))
    run.max_tokens = max_tokens
    t0 = time.perf_counter()
    try:
        results = await client.process_batch(images, concurrency=concurrency, max_tokens=max_tokens)
    finally:
        run.elapsed_s = time.perf_counter() - t0
        await client.close()
    for r in results:
        if r.get("success"):
            run.done += 1
        else:
            run.failed += 1
            code = r.get("error", "error")
            key = "content_filtered" if code == "content_filtered" else ("rate limited" if "429" in code else "other")
            run.failures[key] = run.failures.get(key, 0) + 1
    s = client.stats
    run.notes = f"retry loop: {s.rate_limited} rate-limit errors, {s.other_errors} other, slept {s.slept_s:.0f} s"
    return run


def table(runs: list[Run], latency_s: float, window_s: float = WINDOW_S) -> str:
    head = (
        "| design | client limiter | images | done | failed | elapsed s | fastest possible s | images/min "
        "| model calls | 429s | tokens charged | quota utilisation | tokens used (prompt+completion) "
        "| used / (TPM x min) |"
    )
    rows = [head, "|" + "---|" * 14]
    for r in runs:
        mark = " *" if r.failed else ""  # figures over what finished only: not a throughput at this quota
        failed = str(r.failed) + (
            f" ({', '.join(f'{k} {v}' for k, v in sorted(r.failures.items()))})" if r.failed else ""
        )
        rows.append(
            f"| {r.design} | {r.limiter} | {r.images} | {r.done} | {failed} | {r.elapsed_s:.1f} "
            f"| {'n/a' if r.failed else f'{r.fastest_s(window_s, latency_s):.0f}'} | {r.images_per_min:.1f}{mark} "
            f"| {r.server.get('requests', 0)} "
            f"| {r.throttled} | {r.charged_tokens:,} | {r.share(r.charged_tokens):.0%}{mark} | {r.used_tokens:,} "
            f"| {r.share(r.used_tokens):.0%}{mark} |"
        )
    if any(r.failed for r in runs):
        rows.append(
            "\n\\* items failed: the figures count only what finished, so they are no throughput at this quota."
        )
    return "\n".join(rows)


def _choices(given: str, allowed: tuple[str, ...], p: argparse.ArgumentParser) -> tuple[str, ...]:
    picked = tuple(x.strip() for x in given.split(",") if x.strip())
    unknown = [x for x in picked if x not in allowed]
    if unknown or not picked:
        p.error(f"choose from {', '.join(allowed)}")
    return picked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=40, help="distinct synthetic images per design (default 40)")
    p.add_argument("--tpm", type=int, default=30_000, help="the server's token quota per 60 s (default 30000)")
    p.add_argument("--rpm", type=int, default=None, help="request quota per 60 s (default: 6 per 1000 TPM, as Azure)")
    p.add_argument("--latency-ms", type=float, default=1000.0, help="model latency per call (default 1000)")
    p.add_argument("--concurrency", type=int, default=10, help="images in flight per design (default 10, the seed's)")
    p.add_argument(
        "--baseline-quota",
        choices=["both", "same", "seed"],
        default="both",
        help="baseline limiter: set to the server's quota (same, fair), the seed's own 100 RPM / 100,000 TPM "
        "(seed), or one run of each (both, the default)",
    )
    p.add_argument("--only", choices=["ours", "baseline"], default=None, help="run one design only")
    p.add_argument(
        "--window-s",
        type=float,
        default=WINDOW_S,
        help="the server's quota window (default 60; Azure evaluates over 1-10 s windows: try 10)",
    )
    p.add_argument(
        "--limiter-window-s",
        type=float,
        default=None,
        help="our limiter's burst window, VLM_RATE_WINDOW_S (default: the same as --window-s)",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=None,
        help="N independent worker processes (simulated Flex instances) sharing the quota: bench/multi.py",
    )
    p.add_argument("--per-instance", type=int, default=4, help="with --instances: items in flight per instance")
    p.add_argument("--paths", default="blob,http", help="with --instances: blob, http or both (default)")
    p.add_argument(
        "--designs",
        default="ours,ours-static-split,seed",
        help="with --instances: which designs (also ours-fixed-split: VLM_RATE_SPLIT = N; ours-adaptive: VLM_RATE_PEERS=off)",
    )
    a = p.parse_args(argv)
    if a.instances is not None and a.instances < 1:
        p.error("--instances must be at least 1")
    rpm = a.rpm if a.rpm is not None else max(1, a.tpm * 6 // 1000)
    from local import procs

    images = synthetic_images(a.images)
    port = procs.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "local.model_server",
        "--port",
        str(port),
        "--mode",
        "facts",
        "--tpm",
        str(a.tpm),
        "--rpm",
        str(rpm),
        "--window-s",
        str(a.window_s),
        "--latency-ms",
        str(a.latency_ms),
        "--seed",
        "1",
        "--log-level",
        "WARNING",
    ]
    print(
        f"model server: facts mode, {a.tpm} TPM / {rpm} RPM over a {a.window_s:g} s sliding window, latency {a.latency_ms:.0f} ms; "
        f"{a.images} distinct 320x240 PNGs per design; "
        + (
            f"{a.instances} instances x {a.per_instance} in flight"
            if a.instances is not None
            else f"{a.concurrency} in flight"
        ),
        flush=True,
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        token_file = Path(tmp) / "model-admin-token"
        cmd += ["--admin-token-file", str(token_file)]
        server = procs.start_process(cmd, name="model-server", log_path=Path(tmp) / "model_server.log", cwd=ROOT)
        try:
            procs.wait_for_http(f"{url}/health", timeout_s=60, proc=server)
            admin = ModelAdmin(url, read_token(token_file))
            if a.instances is not None:
                from bench import multi

                doc = multi.run(
                    url,
                    admin,
                    instances=a.instances,
                    per_instance=a.per_instance,
                    images=a.images,
                    quota=multi.Quota(a.tpm, rpm, a.window_s, a.latency_ms / 1000),
                    designs=_choices(a.designs, multi.ALL_DESIGNS, p),
                    paths=_choices(a.paths, multi.PATHS, p),
                )
                multi.print_json(doc)  # the last line printed
                return 0
            quotas = ["same", "seed"] if a.baseline_quota == "both" else [a.baseline_quota]
            plan = [("ours", "")] if a.only != "baseline" else []
            plan += [("baseline", q) for q in quotas] if a.only != "ours" else []
            for key, quota in plan:
                admin.reset()
                print(f"running {OURS if key == 'ours' else f'{BASELINE}, limiter quota: {quota}'} ...", flush=True)
                if key == "ours":
                    limiter_window = a.limiter_window_s if a.limiter_window_s is not None else a.window_s
                    run = asyncio.run(run_ours(url, images, a.tpm, rpm, a.concurrency, limiter_window))
                else:
                    run = asyncio.run(run_baseline(url, images, a.tpm, rpm, a.concurrency, quota))
                run.tpm = a.tpm
                run.server = admin.stats()
                runs.append(run)
                print(
                    f"  {run.done}/{run.images} done, {run.failed} failed in {run.elapsed_s:.1f} s; "
                    f"{run.throttled} 429s; {run.notes}",
                    flush=True,
                )
        finally:
            server.stop()
    print()
    print(table(runs, a.latency_ms / 1000, a.window_s))
    print()
    ours_runs = [r for r in runs if r.design == OURS]
    for base in (r for r in runs if r.design == BASELINE):
        if ours_runs and base.images_per_min:
            ours = ours_runs[0]
            speed = (
                f"images/min x{ours.images_per_min / base.images_per_min:.2f}, "
                if not (ours.failed or base.failed)
                else ""  # a rate over a run that dropped items compares nothing
            )
            print(
                f"ours vs baseline ({base.limiter}): {speed}done {ours.done} vs {base.done}, "
                f"failed {ours.failed} vs {base.failed}, 429s {ours.throttled} vs {base.throttled}"
            )
    for run in runs:
        if run.design == OURS:
            per_image = run.charged_tokens / max(1, run.server.get("completed", 1))
            met = run.share(run.charged_tokens) >= 0.9 and run.failed == 0
            print(
                f"ours: {per_image:.0f} tokens charged per call; target (>= 90% quota utilisation, no failed items): "
                f"{'met' if met else 'NOT met'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
