"""N limiters sharing one quota, in virtual time: what a limiter rule does to 429s and elapsed time.

`python -m bench.limiter_sim [--instances 8[,16,...]] [--seeds 10] [--windows 10,60] [--callers 4] [--call-tokens 232]
[--join K]`

The real bench (`bench.throughput --instances N`) takes minutes a run on 2 cores and moves with the
machine's load; this one takes seconds and isolates the limiter. Each instance is a `RateLimiter` as
the router builds it (slow start, `CALL` set around the call and its request and response hooks, 429s
retried through `acquire`),
with `--callers` callers each (4, the bench's `--per-instance`) pulling from one shared queue, against the stand-in's
sliding-window quota
(`local.model_quota`) on one FakeClock. Latency is jittered (1 s x (1 + 0.5 Exp(1)), plus up to
0.2 s between admission and arrival), so answers come back out of order as they do under load.
Calls are charged `--call-tokens`, 232 by default: the bench's mean charge (83,337 tokens for 360 calls, the first
ones before budgets are learned included), so that 360 calls need 2.78 windows of 30,000 TPM as on the bench. At 227
(describe's prompt plus its learned budget, used until session 7: 2.72 windows) the third window had 2% more slack,
and the simulation spilled into a fourth window in 1 run of 10 at 8 instances where the bench spilled in half its
runs; at 232 it spills in 15 of 50, which is how near the bench's 60 s run is to its bar. 180 RPM.

Designs, side by side on the same seeds:
- `ours`: the limiter as it is without the count (`VLM_RATE_PEERS=off`: the adaptive share);
- `no-follow`: the same without following fresh readings (FOLLOW_FRESH = 0: the share drops to a
  lower reading at once and rises by RISE of the gap, as at a 10 s window);
- `no-probe`: the same with the idle probe switched off (PROBE_WAIT = inf);
- `neither`: no following, and the probe after a quarter of a window, as session 5 left them (but with
  charges counted from when their request left, which cannot be switched off);
- `static-split`: the limiter with its bound at quota / N (`VLM_TPM` / `VLM_RPM` divided, the bench's
  `ours-static-split`);
- `fixed-split`: the limiter's fixed split (`VLM_RATE_SPLIT` = N: quota / N each, no share learned);
- `counted`: the limiter with `VLM_RATE_PEERS=storage`, the default: each instance's `PeerRegistry`
  (shared/peers.py) beats and lists in one in-memory store stamped by the virtual clock, so the count
  comes with its real delays (the first listing a second after start, a period between listings, an
  idle instance leaving once its charges have left), and the partial call goes by rank;
- `equal-split`, a reference rather than a rule: each instance paces to exactly quota / N and reads
  nothing from the answers but the server's limit and retry-after, the split an operator who knew N
  would set. Where ours falls short of it, the shares cost the time, not the window accounting
  (docs/throughput.md, session 8).

`--join K`: K of the N instances start only after JOIN_AFTER_WINDOWS windows, into a quota the others
already use in full, as Flex Consumption adds instances under load; every caller sends for JOIN_WINDOWS
windows, with no end of work. It prints what each group sent per window over the last
JOIN_MEASURED_WINDOWS windows and Jain's fairness index over every instance (1 = equal, 1/N = one
instance has it all).

"elapsed / fastest" uses the bench's fastest possible run: a full window at the start and at each
window boundary, then one latency. The last line is one JSON object with every figure, keyed
"<instances>x<window>s" under "runs" (under "joins", "<instances>x<window>s+<K>", with `--join`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import shared.limiter as limiter_module
from local.model_quota import Quota, QuotaLimits
from shared.limiter import CALL, LIMIT_REQUESTS, LIMIT_TOKENS, RETRY_AFTER_MS, RateLimiter
from shared.peers import PeerRegistry, period_for
from tests.blob_fakes import MemoryPeerStore
from tests.fake_clock import FakeClock

TPM = 30_000
RPM = 180
CALL_TOKENS = 232
LATENCY_S = 1.0
JITTER = 0.5
PRE_DELAY_S = 0.2
CALLERS_PER_INSTANCE = 4
DESIGNS: dict[str, dict[str, float]] = {
    "ours": {},
    "no-follow": {"FOLLOW_FRESH": 0.0},
    "no-probe": {"PROBE_WAIT": math.inf},
    "neither": {"FOLLOW_FRESH": 0.0, "PROBE_WAIT": 0.25},
}
STATIC_SPLIT = "static-split"  # the limiter with its bound at quota / N
FIXED_SPLIT = "fixed-split"  # the limiter with VLM_RATE_SPLIT = N
EQUAL_SPLIT = "equal-split"  # a reference: quota / N per instance, nothing read from the answers (see above)
COUNTED = "counted"  # the limiter with VLM_RATE_PEERS: the live instances counted in (simulated) storage
SPLITS = (STATIC_SPLIT, FIXED_SPLIT, EQUAL_SPLIT, COUNTED)
JOIN_AFTER_WINDOWS = 3
JOIN_WINDOWS = 15
JOIN_MEASURED_WINDOWS = 3


@contextmanager
def _constants(overrides: dict[str, float]) -> Iterator[None]:
    saved = {name: getattr(limiter_module, name) for name in overrides}
    try:
        for name, value in overrides.items():
            setattr(limiter_module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(limiter_module, name, value)


@dataclass
class _Run:
    """One simulated run: the server's quota on a virtual clock, and what each instance got admitted."""

    window_s: float
    seed: int
    call_tokens: int
    clock: FakeClock = field(default_factory=FakeClock)
    admitted: Counter[tuple[int, int]] = field(default_factory=Counter)  # (instance, window) -> calls
    refused: int = 0
    end: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.quota = Quota(QuotaLimits(rpm=RPM, tpm=TPM, window_s=self.window_s), clock=self.clock.now)
        self.peer_store = MemoryPeerStore(self.clock)
        self.registries: list[PeerRegistry] = []

    def limiter(
        self, index: int, instances: int, split: str | None
    ) -> tuple[RateLimiter, Callable[[Any], Awaitable[None]]]:
        """An instance's limiter as the router builds it (its bound at quota / N for `STATIC_SPLIT`, its split at N
        for `FIXED_SPLIT`), and the hook its answers go through; `EQUAL_SPLIT`: the reference."""
        if split == COUNTED:
            registry = PeerRegistry(self.peer_store, f"i{index:04d}", period_for(self.window_s), clock=self.clock)
            self.registries.append(registry)
            limiter = RateLimiter(
                RPM,
                TPM,
                clock=self.clock,
                window_s=self.window_s,
                seed=self.seed * 100 + index,
                slow_start=True,
                peers=registry,
            )
            return limiter, limiter.httpx_response_hook(wall_clock=lambda: 0.0, pace_retries=True)
        if split != EQUAL_SPLIT:
            divisor = instances if split == STATIC_SPLIT else 1
            limiter = RateLimiter(
                RPM // divisor,
                TPM // divisor,
                clock=self.clock,
                window_s=self.window_s,
                seed=self.seed * 100 + index,
                slow_start=True,
                split=instances if split == FIXED_SPLIT else 0,
            )
            return limiter, limiter.httpx_response_hook(wall_clock=lambda: 0.0, pace_retries=True)
        limiter = RateLimiter(
            RPM // instances, TPM // instances, clock=self.clock, window_s=self.window_s, seed=self.seed * 100 + index
        )

        async def split_hook(response: Any) -> None:  # the server's limit and retry-after, nothing else
            limits = {k: v for k, v in response.headers.items() if k in (LIMIT_REQUESTS, LIMIT_TOKENS)}
            limiter.observe_headers(limits)
            if response.status_code == 429:
                limiter.on_throttled(int(response.headers[RETRY_AFTER_MS]) / 1000, congestion=False)

        return limiter, split_hook

    async def call(self, index: int, limiter: RateLimiter, hook: Callable[[Any], Awaitable[None]]) -> None:
        """One call, retried through the limiter until the quota admits it."""
        sending = limiter.httpx_request_hook()
        while True:
            reservation = await limiter.acquire(self.call_tokens)
            token = CALL.set(reservation)
            try:
                await self.clock.sleep(self.rng.random() * PRE_DELAY_S)
                await sending(None)
                decision = self.quota.try_acquire("d", self.call_tokens)
                answered_in = LATENCY_S * (1 + JITTER * self.rng.expovariate(1.0)) if decision.allowed else 0.1
                if decision.allowed:
                    self.admitted[(index, int(self.clock.now() // self.window_s))] += 1
                await self.clock.sleep(answered_in)
                status = 200 if decision.allowed else 429
                await hook(SimpleNamespace(status_code=status, headers=decision.headers()))
            finally:
                CALL.reset(token)
            if decision.allowed:
                reservation.settle(self.call_tokens)
                return
            reservation.cancel()
            self.refused += 1

    async def drive(
        self,
        instances: int,
        split: str | None,
        callers: int,
        caller: Callable[[int, RateLimiter, Callable[[Any], Awaitable[None]]], Awaitable[None]],
    ) -> None:
        """Every instance's callers, to the end, on the virtual clock."""
        limiters = [self.limiter(i, instances, split) for i in range(instances)]

        async def everyone() -> None:
            await asyncio.gather(*(caller(i, *limiters[i]) for i in range(instances) for _ in range(callers)))
            self.end = self.clock.now()
            for registry in self.registries:
                await registry.close()

        await self.clock.run(everyone())

    @property
    def calls_429_share(self) -> float:
        total = sum(self.admitted.values()) + self.refused
        return self.refused / total if total else 0.0


async def simulate(
    instances: int,
    window_s: float,
    calls: int,
    seed: int,
    callers: int = CALLERS_PER_INSTANCE,
    call_tokens: int = CALL_TOKENS,
    split: str | None = None,
) -> dict[str, float]:
    """One run: every call admitted in the end; returns 429 share and elapsed over the fastest possible.
    `split`: one of SPLITS instead of the limiter at the quota."""
    run = _Run(window_s, seed, call_tokens)
    work = list(range(calls))

    async def caller(index: int, limiter: RateLimiter, hook: Callable[[Any], Awaitable[None]]) -> None:
        while work:
            work.pop()
            await run.call(index, limiter, hook)

    await run.drive(instances, split, callers, caller)
    windows_needed = calls * call_tokens / (TPM * window_s / 60)
    fastest = (math.ceil(windows_needed) - 1) * window_s + LATENCY_S
    return {"calls_429_share": run.calls_429_share, "elapsed_over_fastest": run.end / fastest}


async def simulate_join(
    instances: int,
    joiners: int,
    window_s: float,
    seed: int,
    callers: int = CALLERS_PER_INSTANCE,
    call_tokens: int = CALL_TOKENS,
    split: str | None = None,
) -> dict[str, float]:
    """`joiners` of `instances` start after JOIN_AFTER_WINDOWS windows; every caller sends until JOIN_WINDOWS
    windows have passed. Returns the calls per window per instance of each group over the last
    JOIN_MEASURED_WINDOWS windows, Jain's index over all instances, and the 429 share."""
    run = _Run(window_s, seed, call_tokens)
    end = JOIN_WINDOWS * window_s
    first = instances - joiners

    async def caller(index: int, limiter: RateLimiter, hook: Callable[[Any], Awaitable[None]]) -> None:
        if index >= first:
            await run.clock.sleep(JOIN_AFTER_WINDOWS * window_s)
        while run.clock.now() < end:
            await run.call(index, limiter, hook)

    await run.drive(instances, split, callers, caller)
    measured = range(JOIN_WINDOWS - JOIN_MEASURED_WINDOWS, JOIN_WINDOWS)
    per_window = [sum(run.admitted[(i, w)] for w in measured) / len(measured) for i in range(instances)]
    squares = sum(x * x for x in per_window)
    return {
        "incumbents_calls_per_window": statistics.mean(per_window[:first]) if first else 0.0,
        "joiners_calls_per_window": statistics.mean(per_window[first:]) if joiners else 0.0,
        "jain_index": sum(per_window) ** 2 / (instances * squares) if squares else 0.0,
        "calls_429_share": run.calls_429_share,
    }


def _runs(design: str, seeds: int, one_run: Callable[..., Awaitable[dict[str, float]]]) -> list[dict[str, float]]:
    """Every seed of one design: a rule variant (its constants overridden) or a split."""
    with _constants(DESIGNS.get(design, {})):
        split = design if design in SPLITS else None
        return [asyncio.run(one_run(seed=seed, split=split)) for seed in range(seeds)]


def _bench_figures(runs: list[dict[str, float]]) -> dict[str, float]:
    share = [r["calls_429_share"] for r in runs]
    over = [r["elapsed_over_fastest"] for r in runs]
    return {
        "calls_429_share_mean": statistics.mean(share),
        "calls_429_share_max": max(share),
        "elapsed_over_fastest_mean": statistics.mean(over),
        "elapsed_over_fastest_max": max(over),
        "runs_over_1_15": sum(o > 1.15 for o in over),
    }


def _join_figures(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.mean(r[name] for r in runs) for name in runs[0]} | {
        "jain_index_min": min(r["jain_index"] for r in runs)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", default="8", help="instance counts, comma-separated")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--windows", default="10,60", help="server windows in seconds, comma-separated")
    parser.add_argument("--callers", type=int, default=CALLERS_PER_INSTANCE, help="calls in flight per instance")
    parser.add_argument("--call-tokens", type=int, default=CALL_TOKENS, help="what the quota charges a call")
    parser.add_argument("--join", type=int, default=0, help="this many of the instances start late (see above)")
    args = parser.parse_args()
    calls_for = {10.0: 300, 60.0: 360}  # the real bench's runs: 13.6 and 2.7 windows of calls
    designs = [*DESIGNS, *SPLITS]
    results: dict[str, dict[str, dict[str, float]]] = {}
    if args.join:
        print(
            f"| instances | window | design | calls / window, the {args.join} joiners "
            "| calls / window, the others | Jain's index, mean (min) | 429s per call |"
        )
    else:
        print(
            "| instances | window | design | 429s per call, mean (max) | elapsed / fastest, mean (max) "
            "| runs over 1.15x |"
        )
    print("|---|---|---|---|---|---|---|" if args.join else "|---|---|---|---|---|---|")
    for instances, window_s in itertools.product(
        (int(n) for n in args.instances.split(",")), [float(w) for w in args.windows.split(",")]
    ):
        calls = calls_for.get(window_s, 300)
        for design in designs:
            if args.join:
                joiners = min(args.join, instances - 1)
                figures = _join_figures(
                    _runs(
                        design,
                        args.seeds,
                        partial(
                            simulate_join,
                            instances,
                            joiners,
                            window_s,
                            callers=args.callers,
                            call_tokens=args.call_tokens,
                        ),
                    )
                )
                results.setdefault(f"{instances}x{window_s:g}s+{joiners}", {})[design] = figures
                print(
                    f"| {instances} | {window_s:g} s | {design} | {figures['joiners_calls_per_window']:.1f} "
                    f"| {figures['incumbents_calls_per_window']:.1f} | {figures['jain_index']:.2f} "
                    f"({figures['jain_index_min']:.2f}) | {figures['calls_429_share']:.1%} |"
                )
                continue
            figures = _bench_figures(
                _runs(
                    design,
                    args.seeds,
                    partial(simulate, instances, window_s, calls, callers=args.callers, call_tokens=args.call_tokens),
                )
            )
            results.setdefault(f"{instances}x{window_s:g}s", {})[design] = figures
            print(
                f"| {instances} | {window_s:g} s, {calls} calls | {design} | {figures['calls_429_share_mean']:.1%} "
                f"({figures['calls_429_share_max']:.1%}) | {figures['elapsed_over_fastest_mean']:.2f} "
                f"({figures['elapsed_over_fastest_max']:.2f}) | {figures['runs_over_1_15']} of {args.seeds} |"
            )
    print(json.dumps({"seeds": args.seeds, "joins" if args.join else "runs": results}))


if __name__ == "__main__":
    main()
