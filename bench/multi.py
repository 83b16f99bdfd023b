"""Many instances, one quota: `python -m bench.throughput --instances N`.

N worker processes (bench/worker.py), each with its own pipeline, limiter and SDK client as Flex
instances have, share one local model server's quota and one work queue of M images. Both paths
run: blob (each worker pulls images and runs the blob trigger's processor; a transient error hands
the image back, up to 5 deliveries, then it is poisoned) and HTTP (each worker is a set of
concurrent callers of the HTTP handler). Three designs:

- ours: today's defaults, VLM_TPM / VLM_RPM at the deployment's quota on every instance, each counting
  the busy instances in shared storage (VLM_RATE_PEERS=storage, shared/peers.py: an Azurite the bench
  starts, in memory, as the storage account every Flex instance of an app shares);
- ours-static-split: the adaptive share with the README's old advice, quota / N per instance;
- seed: bench/seed_baseline_client.py, its limiter at the deployment's quota on every instance;

and, when asked for (`--designs ...`): ours-fixed-split, VLM_RATE_SPLIT = N, each instance at a fixed
1/N of the quota (the opt-in for pinned instance counts); ours-adaptive, VLM_RATE_PEERS=off, the share
each instance learns from the answers alone (the default until the count, session 9).

Per design and path: images/min, share of the quota charged, 429s per call, failed items, elapsed
against the fastest possible, tokens charged against tokens used. The last line printed is one
JSON object, {"designs": {...}}, each design's figures over both paths together (and per path
under "paths").
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from bench.worker import WorkerConfig, run_worker
from shared.limiter import FRESH_LATENCY

DESIGNS = ("ours", "ours-static-split", "seed")  # the default run, issue 12's three
FIXED_SPLIT = "ours-fixed-split"
ADAPTIVE = "ours-adaptive"
ALL_DESIGNS = (*DESIGNS, FIXED_SPLIT, ADAPTIVE)
COUNTED = ("ours",)  # designs whose instances count themselves in storage
PATHS = ("blob", "http")
DESCRIBE_MAX_TOKENS = 1000  # what both designs reserve for describe (shared/tasks.py DEFAULT_MAX_TOKENS)
START_TIMEOUT_S = 180.0
IMAGE_SEED = 7


@dataclass
class Quota:
    tpm: int
    rpm: int
    window_s: float
    latency_s: float

    @property
    def tokens_per_window(self) -> float:
        return self.tpm * self.window_s / 60  # the server scales the per-minute quota to its window

    @property
    def requests_per_window(self) -> float:
        return self.rpm * self.window_s / 60


@dataclass
class PathRun:
    design: str
    path: str
    images: int
    elapsed_s: float = 0.0
    done: int = 0
    failed: int = 0
    poisoned: int = 0
    redeliveries: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    timeline: list[list[Any]] = field(default_factory=list)  # the server's quota decisions: [s, tokens, admitted]
    instances: list[dict[str, Any]] = field(default_factory=list)  # each worker's report

    @property
    def requests(self) -> int:
        return int(self.server.get("requests", 0))

    @property
    def throttled(self) -> int:
        return int(self.server.get("by_status", {}).get("429", 0))

    @property
    def admitted(self) -> int:
        return int(self.server.get("completed", 0))

    @property
    def used(self) -> int:
        t = self.server.get("tokens", {})
        return int(t.get("prompt", 0)) + int(t.get("completion", 0))

    @property
    def charged(self) -> int:
        """What the quota counted: prompt + max_tokens for every admitted request (the server's own count,
        which sees learned budgets; before it had one: describe's max_tokens for every call)."""
        if "charged_tokens" in self.server:
            return int(self.server["charged_tokens"])
        return int(self.server.get("tokens", {}).get("prompt", 0)) + self.admitted * DESCRIBE_MAX_TOKENS

    def fastest_s(self, q: Quota) -> float:
        """The shortest run any client could make with these charges: a full window at the start and
        at each boundary after it (tokens and requests both), then one call's latency."""
        windows = max(
            math.ceil(self.charged / q.tokens_per_window) if q.tpm else 1,
            math.ceil(self.admitted / q.requests_per_window) if q.rpm else 1,
            1,
        )
        return q.window_s * (windows - 1) + q.latency_s


def figures(runs: list[PathRun], q: Quota) -> dict[str, Any]:
    """The issue's six figures over one or more runs taken together."""
    minutes = sum(r.elapsed_s for r in runs) / 60
    requests = sum(r.requests for r in runs)
    charged, used = sum(r.charged for r in runs), sum(r.used for r in runs)
    fastest = sum(r.fastest_s(q) for r in runs)
    return {
        "images_per_min": round(sum(r.done for r in runs) / minutes, 2) if minutes else 0.0,
        "quota_utilisation": round(charged / (q.tpm * minutes), 3) if minutes and q.tpm else 0.0,
        "calls_429_share": round(sum(r.throttled for r in runs) / requests, 3) if requests else 0.0,
        "failed": sum(r.failed for r in runs),
        "elapsed_over_fastest": round(sum(r.elapsed_s for r in runs) / fastest, 2) if fastest else 0.0,
        "charged_over_used": round(charged / used, 2) if used else 0.0,
    }


def where_time_went(r: PathRun, q: Quota) -> dict[str, Any]:
    """What the server's timeline and the instances' reports say about a run's elapsed time.

    Per server window (from the common start): calls admitted, the part of the window's tokens they
    charged, when 90% of them and the last one were admitted (seconds into the window), and 429s. A run
    that needs k windows and spills into a k+1st is slow by a window; this shows which calls spilled and
    whether the windows before were full. Per instance: its limiter's share at the end (an equal split is
    1 / instances) and when it settled its last item: an instance left with a small share and a few items
    is the usual straggler.
    """
    windows: list[dict[str, Any]] = []
    for at_s, tokens, allowed in r.timeline:
        k = max(0, math.floor(float(at_s) / q.window_s))
        while len(windows) <= k:
            windows.append({"admitted": 0, "tokens": 0, "refused": 0, "times": []})
        w = windows[k]
        if allowed:
            w["admitted"] += 1
            w["tokens"] += int(tokens)
            w["times"].append(float(at_s) - k * q.window_s)
        else:
            w["refused"] += 1
    out_windows = []
    for w in windows:
        times = sorted(w.pop("times"))
        out_windows.append(
            {
                **w,
                "of_window": round(w["tokens"] / q.tokens_per_window, 3) if q.tpm else None,
                "p90_s": round(times[math.ceil(0.9 * len(times)) - 1], 1) if times else None,
                "last_s": round(times[-1], 1) if times else None,
            }
        )
    shares = [float(i["share"]) for i in r.instances if i.get("share") is not None]
    last = [float(i.get("last_settled_s", 0.0)) for i in r.instances]
    latency = [float(i["latency_s"]) for i in r.instances if i.get("latency_s") is not None]
    counted = [int(i.get("split_max", 0)) for i in r.instances] if r.design in COUNTED else []
    return {
        "windows": out_windows,
        "share_min": round(min(shares), 4) if shares else None,
        "share_max": round(max(shares), 4) if shares else None,
        "last_settled_s": [round(min(last), 1), round(max(last), 1)] if last else None,
        # the limiters' latency (admission to answer): their fresh-figure rules apply up to FRESH_LATENCY of the window
        "latency_s": [round(min(latency), 2), round(max(latency), 2)] if latency else None,
        "probes": sum(int(i.get("probes", 0)) for i in r.instances),
        # ours: the most instances each counted at once (VLM_RATE_PEERS), lowest and highest over the instances
        "counted": [min(counted), max(counted)] if any(counted) else None,
    }


def describe_time(r: PathRun, q: Quota, instances: int) -> str:
    """Two printed lines from where_time_went."""
    t = where_time_went(r, q)
    parts = []
    for k, w in enumerate(t["windows"]):
        filled = f", {w['of_window']:.0%} of its tokens" if w["of_window"] is not None else ""
        timing = f", 90% by {w['p90_s']} s, last at {w['last_s']} s" if w["last_s"] is not None else ""
        parts.append(f"{k}: {w['admitted']} calls{filled}{timing}, {w['refused']} 429s")
    lines = ["  windows: " + "; ".join(parts)]
    if t["share_min"] is not None:
        shares = f"shares {t['share_min']:.3f}-{t['share_max']:.3f} (an equal split is {1 / instances:.3f})"
        if r.design == FIXED_SPLIT:
            shares = f"a fixed split, 1/{instances} each"
        elif t.get("counted"):
            shares = f"counted up to {t['counted'][0]}-{t['counted'][1]} busy instances in storage, 1/N each"
        lines.append(
            f"  instances: {shares}; last items settled at {t['last_settled_s'][0]}-{t['last_settled_s'][1]} s"
        )
    if t["latency_s"] is not None:
        lines.append(
            f"  limiters: latency {t['latency_s'][0]}-{t['latency_s'][1]} s (fresh figures up to "
            f"{FRESH_LATENCY * q.window_s:g} s); {t['probes']} idle probes"
        )
    last = max(r.instances, key=lambda i: float(i.get("last_settled_s", 0.0)), default=None)
    if last is not None and last.get("trace"):
        end = float(last["last_settled_s"])
        step = max(1.0, q.window_s / 12)
        shown: list[str] = []
        next_at = end - q.window_s
        for at, share, waiting, in_flight, probes in last["trace"]:
            if at >= next_at:
                shown.append(f"{at:g} s {share:.3f} {waiting}/{in_flight}/{probes}")
                next_at = at + step
        lines.append(
            f"  the last instance ({last['index']}), its last window: seconds, part of the quota, calls waiting/in "
            "flight/probes "
            "so far: " + "; ".join(shown)
        )
    return "\n".join(lines)


def instance_quota(design: str, instances: int, q: Quota) -> tuple[int, int]:
    """(rpm, tpm) of one instance's client-side limiter."""
    if design == "ours-static-split":
        return max(1, q.rpm // instances), max(1, q.tpm // instances)
    return q.rpm, q.tpm


def run_path(
    url: str,
    admin: Any,
    design: str,
    path: str,
    instances: int,
    per_instance: int,
    images: int,
    q: Quota,
    peers: str = "",
) -> PathRun:
    """One design on one path: reset the server, start N workers, time from the common start to the last item."""
    ctx = mp.get_context("spawn")  # fresh interpreters: nothing inherited, as on separate instances
    work, results = ctx.Queue(), ctx.Queue()
    settled, ready, go = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Event()
    for i in range(images):
        work.put((i, 0))
    rpm, tpm = instance_quota(design, instances, q)
    split = instances if design == FIXED_SPLIT else 0
    counted = peers if design in COUNTED else ""
    # a container per run: the last run's instances leave the count when they close, but only best effort
    container = f"peers-{path}-{time.time_ns() % 10**12}"
    cfg = WorkerConfig(design, path, f"{url}/v1", rpm, tpm, q.window_s, per_instance, images, split, counted, container)
    procs = [
        ctx.Process(
            target=run_worker,
            args=(i, cfg, work, settled, ready, go, results, IMAGE_SEED, images),
            name=f"bench-instance-{i}",
        )
        for i in range(instances)
    ]
    run = PathRun(design, path, images)
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready.value < instances:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"{design}/{path}: only {ready.value} of {instances} instances started")
            time.sleep(0.05)
        admin.reset()  # an empty window and zeroed counters at the common start
        go.set()
        t0 = time.perf_counter()
        while settled.value < images:
            if all(p.exitcode is not None for p in procs):
                raise RuntimeError(f"{design}/{path}: every instance exited with {settled.value}/{images} settled")
            time.sleep(0.05)
        run.elapsed_s = time.perf_counter() - t0
        run.server = admin.stats()
        run.timeline = admin.quota_timeline()
        for _ in procs:
            report = results.get(timeout=120)
            if "error" in report:
                raise RuntimeError(f"{design}/{path}: instance {report['index']} failed: {report['error']}")
            run.instances.append(report)
            run.done += report["done"]
            run.failed += report["failed"]
            run.poisoned += report["poisoned"]
            run.redeliveries += report["redeliveries"]
            for k, v in report["failures"].items():
                run.failures[k] = run.failures.get(k, 0) + v
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()  # only our own children, by handle
                p.join(timeout=10)
    return run


def table(runs: list[PathRun], q: Quota) -> str:
    head = (
        "| design | path | images | done | failed | poisoned | redeliveries | elapsed s | fastest s | elapsed / fastest "
        "| images/min | calls | 429s | 429s / call | quota charged | tokens charged | tokens used | charged / used |"
    )
    rows = [head, "|" + "---|" * 18]
    for r in runs:
        f = figures([r], q)
        rows.append(
            f"| {r.design} | {r.path} | {r.images} | {r.done} | {r.failed} | {r.poisoned} | {r.redeliveries} "
            f"| {r.elapsed_s:.1f} | {r.fastest_s(q):.1f} | {f['elapsed_over_fastest']:.2f} | {f['images_per_min']:.1f} "
            f"| {r.requests} | {r.throttled} | {f['calls_429_share']:.1%} | {f['quota_utilisation']:.0%} "
            f"| {r.charged:,} | {r.used:,} | {f['charged_over_used']:.1f} |"
        )
    return "\n".join(rows)


def run(
    url: str,
    admin: Any,
    *,
    instances: int,
    per_instance: int,
    images: int,
    quota: Quota,
    designs: tuple[str, ...] = DESIGNS,
    paths: tuple[str, ...] = PATHS,
) -> dict[str, Any]:
    """Every design on every path; prints progress and the table; returns the JSON document."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        peers = ""
        if any(d in COUNTED for d in designs):  # the storage account the instances count themselves in
            from local import procs
            from local.azurite import start_azurite

            azurite = stack.enter_context(
                start_azurite(
                    stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-azurite-")),
                    blob_port=procs.free_port(),
                    queue_port=procs.free_port(),
                    in_memory=True,
                )
            )
            peers = azurite.connection_string
        runs: list[PathRun] = []
        for design in designs:
            for path in paths:
                print(
                    f"running {design}, {path} path, {instances} instances x {per_instance} in flight ...", flush=True
                )
                r = run_path(url, admin, design, path, instances, per_instance, images, quota, peers)
                runs.append(r)
                fails = ", ".join(f"{k} {v}" for k, v in sorted(r.failures.items()))
                print(
                    f"  {r.done}/{r.images} done, {r.failed} failed{f' ({fails})' if fails else ''} in {r.elapsed_s:.1f} s; "
                    f"{r.throttled} 429s of {r.requests} calls",
                    flush=True,
                )
                print(describe_time(r, quota, instances), flush=True)
    return _document(runs, instances, per_instance, images, quota, designs)


def _document(
    runs: list[PathRun], instances: int, per_instance: int, images: int, quota: Quota, designs: tuple[str, ...]
) -> dict[str, Any]:
    """Print the table of every run; the JSON document of every design's figures (over both paths, and per path)."""
    print()
    print(table(runs, quota))
    print()
    doc: dict[str, Any] = {
        "instances": instances,
        "per_instance": per_instance,
        "images": images,
        "tpm": quota.tpm,
        "rpm": quota.rpm,
        "window_s": quota.window_s,
        "designs": {},
    }
    for design in designs:
        mine = [r for r in runs if r.design == design]
        doc["designs"][design] = {
            **figures(mine, quota),
            "paths": {r.path: {**figures([r], quota), "time": where_time_went(r, quota)} for r in mine},
        }
    return doc


def print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, separators=(",", ":")), flush=True)
