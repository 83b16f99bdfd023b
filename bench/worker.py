"""One simulated Flex instance for bench/multi.py: its own pipeline, limiter and SDK client.

Each worker is a separate process (as instances are separate machines): nothing in memory is
shared with the other workers, only the model server's quota and the work queue. It pulls items
from the queue until every item is settled and reports what it saw.

- blob path: `shared.blob_job.BlobProcessor.process`, the call blob_trigger/__init__.py makes,
  against an in-memory blob store (the bench measures quota handling, not storage). A transient
  error is raised to "the host", which hands the blob back to the queue, up to `BLOB_ATTEMPTS`
  deliveries (host.json: poisonBlobThreshold 5); then it is poisoned, a failed item.
- http path: `shared.http_api.handle_analyze`, the call analyze_http/__init__.py makes, with the
  raw image as the body; anything but 200 is a failed item (the caller got an error).
- seed: bench/seed_baseline_client.py's `SeedClient.analyze` for both paths; on the blob path its
  exception goes to the host the same way.
"""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import asdict, dataclass, field
from typing import Any

BLOB_ATTEMPTS = 5  # host.json extensions.blobs.poisonBlobThreshold
POLL_S = 0.05
TRACE_S = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    """What the parent tells one worker: the design, the path and its share of the quota."""

    design: str  # "ours" | "ours-static-split" | "ours-fixed-split" | "seed"
    path: str  # "blob" | "http"
    url: str  # the model server, OpenAI-compatible base (…/v1)
    rpm: int  # this instance's client-side limiter
    tpm: int
    window_s: float
    concurrency: int  # items in flight on this instance
    total: int  # items in the whole run; a worker stops when this many are settled
    split: int = 0  # VLM_RATE_SPLIT (ours-fixed-split: the instance count)
    # ours: the storage every instance counts itself in (VLM_RATE_PEERS, shared/peers.py), a connection string to
    # the bench's Azurite, and the container for this run's count; "": VLM_RATE_PEERS off (the other designs)
    peers: str = ""
    peers_container: str = "cache"


@dataclass
class WorkerReport:
    index: int
    done: int = 0
    failed: int = 0
    poisoned: int = 0
    redeliveries: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    limiter_pauses: int = 0
    share: float | None = None  # the limiter's share of the quota when the run ended (ours only)
    split: int = 0  # the limiter's split when the run ended: fixed, or the instances it counted (0: the share)
    split_max: int = 0  # the most instances it counted at once (sampled once a second)
    last_settled_s: float = 0.0  # from the common start to this instance's last settled item
    latency_s: float | None = None  # the limiter's running mean from admission to answer (ours only)
    probes: int = 0  # calls its limiter sent as idle probes
    # (seconds from the common start, part of the quota it paces to, calls waiting, calls in flight, probes so far),
    # once a second (ours); the part is 1 / split under a split, else the learned share
    trace: list[tuple[float, float, int, int, int]] = field(default_factory=list)


def build_pipeline(settings: Any, blobs: Any = None, peer_blobs: Any = None) -> Any:
    """The one place a worker builds what the pipeline talks to: an instance's application object.

    Nothing is cached (every image costs a model call); `blobs` is the instance's blob store; `peer_blobs` the
    storage shared by every instance, where they count themselves (VLM_RATE_PEERS; else `blobs`).
    """
    from shared.app import App, peer_registry
    from shared.cache import MemoryLRU, ResultCache
    from shared.model import ModelRouter

    peers = peer_registry(settings, peer_blobs if peer_blobs is not None else blobs)
    model = ModelRouter(settings, peers=peers)
    return App.build(settings, model=model, cache=ResultCache(MemoryLRU(0)), blobs=blobs)


def worker_settings(cfg: WorkerConfig) -> Any:
    from shared.settings import Settings

    return Settings.from_env(
        {
            "VLM_ENDPOINT": cfg.url,
            # the blob store is in memory; storage is contacted only for the instance count (ours)
            "VlmStorage": cfg.peers or "UseDevelopmentStorage=true",
            "VLM_RATE_PEERS": "storage" if cfg.peers else "off",
            "CACHE_CONTAINER": cfg.peers_container,
            "VLM_DEPLOYMENT": "bench",  # the local model server takes any deployment name
            "VLM_TPM": str(cfg.tpm),
            "VLM_RPM": str(cfg.rpm),
            "VLM_RATE_WINDOW_S": str(cfg.window_s),
            "VLM_RATE_SPLIT": str(cfg.split),
            "VLM_TIMEOUT_S": "60",
            "VLM_MAX_RETRIES": "3",
        }
    )


def memory_blobs() -> Any:
    # The in-memory blob service the blob-path tests use (tests/blob_fakes.py): Azure's naming rules,
    # no network. The bench runs from the repository root, where `tests` is importable.
    from tests.blob_fakes import FakeBlobService

    return MemoryBlobs(FakeBlobService())


class MemoryBlobs:
    """The BlobStore interface (container(), close()) over the fake service."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def container(self, name: str) -> Any:
        return await self.service.container(name)

    async def close(self) -> None:
        return None


def _code(err: BaseException) -> str:
    code = getattr(err, "code", None)
    return code if isinstance(code, str) else type(err).__name__


class Worker:
    """One instance: `handle(data)` runs one item by the design's path; True when it succeeded."""

    def __init__(self, cfg: WorkerConfig, report: WorkerReport) -> None:
        self.cfg = cfg
        self.report = report
        self.app: Any = None
        self.processor: Any = None
        self.seed: Any = None
        self.peer_blobs: Any = None

    async def open(self) -> None:
        if self.cfg.design == "seed":
            from bench.seed_baseline_client import SeedClient

            self.seed = SeedClient(self.cfg.url, rpm=self.cfg.rpm, tpm=self.cfg.tpm, timeout_s=60)
            return
        settings = worker_settings(self.cfg)
        if self.cfg.peers:
            from shared.storage import BlobStore

            self.peer_blobs = BlobStore(settings)
        self.app = build_pipeline(settings, memory_blobs(), self.peer_blobs)
        if self.cfg.path == "blob":
            from shared.blob_job import BlobProcessor

            self.processor = BlobProcessor(self.app)
        # Warm: what a running instance has loaded already (the seed's client builds its SDK client
        # and imports PIL in its constructor), so the timed run compares pacing, not imports.
        import shared.http_api
        import shared.images
        import shared.schemas
        import shared.tasks  # noqa: F401

        self.app.model.client(self.app.settings.primary)

    async def close(self) -> None:
        if self.seed is not None:
            await self.seed.close()
        if self.app is not None:
            limiter = self.limiter().stats()
            self.report.limiter_pauses = int(limiter.get("throttles", 0))
            self.report.share = float(limiter["share"])
            self.report.split = int(limiter["split"])
            self.report.latency_s = float(limiter["latency_s"])
            self.report.probes = int(limiter["probes"])
            await self.app.close()
        if self.peer_blobs is not None:
            await self.peer_blobs.close()

    def limiter(self) -> Any:
        """The instance's limiter for its primary deployment (ours and its splits, not the seed)."""
        return self.app.model.limiter(self.app.settings.primary)

    async def handle(self, name: str, data: bytes) -> bool:
        """Blob path: raises what the host would retry. HTTP path: True for a 200."""
        if self.seed is not None:
            if self.cfg.path == "blob":
                await self.seed.analyze(data)  # the seed's function lets the error reach the host
                return True
            try:
                await self.seed.analyze(data)
                return True
            except Exception as err:
                self._fail(_code(err))
                return False
        if self.cfg.path == "blob":
            outcome = await self.processor.process(name, data, f'"{name}"', {})
            if outcome.status != "succeeded":
                self._fail(f"record {outcome.status}")
                return False
            return True
        from shared.http_api import HttpInput, handle_analyze

        out = await handle_analyze(
            HttpInput(method="POST", headers={"content-type": "image/png"}, params={"task": "describe"}, body=data),
            self.app,
        )
        if out.status != 200:
            self._fail(f"http {out.status}")
            return False
        return True

    def _fail(self, code: str) -> None:
        self.report.failures[code] = self.report.failures.get(code, 0) + 1


async def _serve(
    index: int, cfg: WorkerConfig, work: Any, settled: Any, images: list[bytes], ready: Any, go: Any
) -> WorkerReport:
    report = WorkerReport(index)
    worker = Worker(cfg, report)
    await worker.open()
    with ready.get_lock():
        ready.value += 1
    await asyncio.to_thread(go.wait)  # every instance starts together: start-up is not timed
    started = time.perf_counter()

    def settle(ok: bool) -> None:
        report.last_settled_s = time.perf_counter() - started
        if ok:
            report.done += 1
        else:
            report.failed += 1
        with settled.get_lock():
            settled.value += 1

    async def lane() -> None:
        while settled.value < cfg.total:
            try:
                item, attempt = work.get_nowait()
            except queue.Empty:
                await asyncio.sleep(POLL_S)
                continue
            name = f"bench/{item:05d}.png"
            try:
                settle(await worker.handle(name, images[item]))
            except Exception as err:  # the blob path's "host": hand the blob back, or poison it
                if attempt + 1 >= BLOB_ATTEMPTS:
                    report.poisoned += 1
                    worker._fail(f"poisoned after {BLOB_ATTEMPTS} attempts ({_code(err)})")
                    settle(False)
                else:
                    report.redeliveries += 1
                    work.put((item, attempt + 1))

    async def sample() -> None:  # the limiter over time: which instance fell behind, and when
        limiter = worker.limiter()
        while settled.value < cfg.total:
            s = limiter.stats()
            report.split_max = max(report.split_max, int(s["split"]))
            at = round(time.perf_counter() - started, 1)
            part = 1 / s["split"] if s["split"] else s["share"]
            report.trace.append((at, round(part, 4), s["waiting"], s["in_flight"], s["probes"]))
            await asyncio.sleep(TRACE_S)

    tasks = [lane() for _ in range(cfg.concurrency)] + ([sample()] if worker.app is not None else [])
    try:
        await asyncio.gather(*tasks)
    finally:
        await worker.close()
    return report


def run_worker(
    index: int, cfg: WorkerConfig, work: Any, settled: Any, ready: Any, go: Any, results: Any, seed: int, count: int
) -> None:
    """Process entry (multiprocessing, spawn): make the images, serve, put the report on `results`."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    from bench.throughput import synthetic_images

    images = synthetic_images(count, seed=seed)
    t0 = time.perf_counter()
    try:
        report = asyncio.run(_serve(index, cfg, work, settled, images, ready, go))
        results.put(asdict(report))
    except BaseException as err:  # the parent must hear from every worker
        results.put({"index": index, "error": f"{type(err).__name__}", "after_s": time.perf_counter() - t0})
        raise
