"""N limiters sharing one quota, in virtual time: what a limiter rule does to 429s and elapsed time.

`python -m bench.limiter_sim [--instances 8[,16,...]] [--seeds 10] [--windows 10,60] [--callers 4] [--call-tokens 232]`

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
- `ours`: the limiter as it is;
- `no-follow`: the same without following fresh readings (FOLLOW_FRESH = 0: the share drops to a
  lower reading at once and rises by RISE of the gap, as at a 10 s window);
- `no-probe`: the same with the idle probe switched off (PROBE_WAIT = inf);
- `neither`: no following, and the probe after a quarter of a window, as session 5 left them (but with
  charges counted from when their request left, which cannot be switched off).

"elapsed / fastest" uses the bench's fastest possible run: a full window at the start and at each
window boundary, then one latency. The last line is one JSON object with every figure, keyed
"<instances>x<window>s".
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import shared.limiter as limiter_module
from local.model_quota import Quota, QuotaLimits
from shared.limiter import CALL, RateLimiter
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


async def simulate(
    instances: int,
    window_s: float,
    calls: int,
    seed: int,
    callers: int = CALLERS_PER_INSTANCE,
    call_tokens: int = CALL_TOKENS,
) -> dict[str, float]:
    """One run: every call admitted in the end; returns 429 share and elapsed over the fastest possible."""
    rng = random.Random(seed)
    clock = FakeClock()
    quota = Quota(QuotaLimits(rpm=RPM, tpm=TPM, window_s=window_s), clock=clock.now)
    limiters = [
        RateLimiter(RPM, TPM, clock=clock, window_s=window_s, seed=seed * 100 + i, slow_start=True)
        for i in range(instances)
    ]
    work = list(range(calls))
    counts = {"admitted": 0, "refused": 0}

    async def caller(limiter: RateLimiter) -> None:
        hook = limiter.httpx_response_hook(wall_clock=lambda: 0.0, pace_retries=True)
        sending = limiter.httpx_request_hook()
        while work:
            work.pop()
            while True:
                reservation = await limiter.acquire(call_tokens)
                token = CALL.set(reservation)
                try:
                    await clock.sleep(rng.random() * PRE_DELAY_S)
                    await sending(None)
                    decision = quota.try_acquire("d", call_tokens)
                    answered_in = LATENCY_S * (1 + JITTER * rng.expovariate(1.0)) if decision.allowed else 0.1
                    await clock.sleep(answered_in)
                    status = 200 if decision.allowed else 429
                    await hook(SimpleNamespace(status_code=status, headers=decision.headers()))
                finally:
                    CALL.reset(token)
                if decision.allowed:
                    reservation.settle(call_tokens)
                    counts["admitted"] += 1
                    break
                reservation.cancel()
                counts["refused"] += 1

    await clock.run(asyncio.gather(*(caller(lim) for lim in limiters for _ in range(callers))))
    windows_needed = calls * call_tokens / (TPM * window_s / 60)
    fastest = (math.ceil(windows_needed) - 1) * window_s + LATENCY_S
    total = counts["admitted"] + counts["refused"]
    return {"calls_429_share": counts["refused"] / total, "elapsed_over_fastest": clock.now() / fastest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", default="8", help="instance counts, comma-separated")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--windows", default="10,60", help="server windows in seconds, comma-separated")
    parser.add_argument("--callers", type=int, default=CALLERS_PER_INSTANCE, help="calls in flight per instance")
    parser.add_argument("--call-tokens", type=int, default=CALL_TOKENS, help="what the quota charges a call")
    args = parser.parse_args()
    calls_for = {10.0: 300, 60.0: 360}  # the real bench's runs: 13.6 and 2.7 windows of calls
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(
        "| instances | window | design | 429s per call, mean (max) | elapsed / fastest, mean (max) | runs over 1.15x |"
    )
    print("|---|---|---|---|---|---|")
    for instances, window_s in itertools.product(
        (int(n) for n in args.instances.split(",")), [float(w) for w in args.windows.split(",")]
    ):
        calls = calls_for.get(window_s, 300)
        for design, overrides in DESIGNS.items():
            with _constants(overrides):
                runs = [
                    asyncio.run(simulate(instances, window_s, calls, seed, args.callers, args.call_tokens))
                    for seed in range(args.seeds)
                ]
            share = [r["calls_429_share"] for r in runs]
            over = [r["elapsed_over_fastest"] for r in runs]
            figures = {
                "calls_429_share_mean": statistics.mean(share),
                "calls_429_share_max": max(share),
                "elapsed_over_fastest_mean": statistics.mean(over),
                "elapsed_over_fastest_max": max(over),
                "runs_over_1_15": sum(o > 1.15 for o in over),
            }
            results.setdefault(f"{instances}x{window_s:g}s", {})[design] = figures
            print(
                f"| {instances} | {window_s:g} s, {calls} calls | {design} | {figures['calls_429_share_mean']:.1%} "
                f"({figures['calls_429_share_max']:.1%}) | {figures['elapsed_over_fastest_mean']:.2f} "
                f"({figures['elapsed_over_fastest_max']:.2f}) | {figures['runs_over_1_15']} of {args.seeds} |"
            )
    print(json.dumps({"seeds": args.seeds, "runs": results}))


if __name__ == "__main__":
    main()
