"""Smoke test of the multi-instance bench (`python -m bench.throughput --instances N`).

A benchmark, not a timed test: two instances, a few images, a generous quota, and only the
shape of the last line is checked (the issue's contract for every design). The figures
themselves come from running the bench (docs/throughput.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "images_per_min",
    "quota_utilisation",
    "calls_429_share",
    "failed",
    "elapsed_over_fastest",
    "charged_over_used",
}


@pytest.mark.integration
@pytest.mark.long
def test_two_instances_print_one_json_line_with_every_design_and_figure():
    cmd = [
        sys.executable,
        "-m",
        "bench.throughput",
        "--instances",
        "2",
        "--per-instance",
        "2",
        "--images",
        "4",
        "--tpm",
        "600000",
        "--latency-ms",
        "50",
        "--window-s",
        "10",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    doc = json.loads(last)
    assert set(doc["designs"]) == {"ours", "ours-static-split", "seed"}
    for name, design in doc["designs"].items():
        assert FIGURES <= set(design), f"{name} lacks {sorted(FIGURES - set(design))}"
        assert set(design["paths"]) == {"blob", "http"}
        for figure in FIGURES:
            assert isinstance(design[figure], (int, float)) and design[figure] >= 0, (name, figure)
        assert isinstance(design["failed"], int)
        assert 0 <= design["calls_429_share"] <= 1


def test_static_split_divides_the_quota_and_the_others_take_all_of_it():
    from bench.multi import Quota, instance_quota

    q = Quota(tpm=30_000, rpm=180, window_s=10, latency_s=1)
    assert instance_quota("ours-static-split", 8, q) == (22, 3750)
    assert instance_quota("ours", 8, q) == (180, 30_000)
    assert instance_quota("seed", 8, q) == (180, 30_000)


def test_the_fixed_split_design_gives_each_worker_the_whole_quota_and_the_split():
    from bench.multi import FIXED_SPLIT, Quota, instance_quota
    from bench.worker import WorkerConfig, worker_settings

    q = Quota(tpm=30_000, rpm=180, window_s=60, latency_s=1)
    assert instance_quota(FIXED_SPLIT, 8, q) == (180, 30_000)  # VLM_TPM stays the quota: the split divides it
    settings = worker_settings(WorkerConfig(FIXED_SPLIT, "blob", "http://x/v1", 180, 30_000, 60, 4, 10, split=8))
    assert (settings.vlm_rate_split, settings.vlm_tpm) == (8, 30_000)
    assert worker_settings(WorkerConfig("ours", "blob", "http://x/v1", 180, 30_000, 60, 4, 10)).vlm_rate_split == 0


def test_ours_counts_its_instances_in_the_shared_storage_and_the_other_designs_do_not():
    """ours: VLM_RATE_PEERS=storage against the storage the run shares (the bench's Azurite), a container per
    run; ours-adaptive and the splits: off, as their names say."""
    from bench.multi import ADAPTIVE, COUNTED
    from bench.worker import WorkerConfig, worker_settings

    conn = "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:1/a;"
    ours = worker_settings(WorkerConfig("ours", "blob", "http://x/v1", 180, 30_000, 60, 4, 10, 0, conn, "peers-1"))
    assert (ours.vlm_rate_peers, ours.cache_container, ours.storage.connection_string) == ("storage", "peers-1", conn)
    for design in (ADAPTIVE, "ours-static-split"):
        assert design not in COUNTED
        assert (
            worker_settings(WorkerConfig(design, "blob", "http://x/v1", 180, 30_000, 60, 4, 10)).vlm_rate_peers == "off"
        )


def test_fastest_possible_counts_a_window_per_windows_worth_of_charges():
    from bench.multi import PathRun, Quota

    q = Quota(tpm=30_000, rpm=180, window_s=10, latency_s=1)  # 5,000 tokens and 30 requests per window
    run = PathRun("ours", "blob", 10, server={"completed": 10, "tokens": {"prompt": 1_000}})  # 11,000 charged
    assert run.charged == 11_000
    assert run.fastest_s(q) == 10 * 2 + 1  # three windows' worth: two boundaries to wait for, then one call
    many = PathRun("ours", "http", 100, server={"completed": 100, "tokens": {"prompt": 0}})
    assert many.fastest_s(Quota(tpm=10**9, rpm=180, window_s=10, latency_s=1)) == 10 * 3 + 1  # requests bind


def test_where_time_went_shows_a_spilled_call_and_the_straggler_that_sent_it():
    from bench.multi import PathRun, Quota, describe_time, where_time_went

    q = Quota(tpm=6_000, rpm=0, window_s=60, latency_s=1)  # 6,000 tokens a window
    run = PathRun("ours", "blob", 12)
    run.timeline = [[0.5 + i / 10, 500, True] for i in range(10)]  # window 0: 10 calls by 1.4 s
    run.timeline += [[59.9, 500, False], [60.2, 500, True], [121.0, 500, True]]  # one 429, then one spilled call
    run.instances = [
        {"share": 0.45, "last_settled_s": 61.3, "latency_s": 1.2, "probes": 0},
        {
            "share": 0.05,
            "last_settled_s": 122.1,
            "latency_s": 3.4,
            "probes": 2,
            "index": 1,  # the straggler
            "trace": [[1.0, 0.5, 0, 1, 0], [62.5, 0.05, 1, 0, 0], [63.0, 0.05, 1, 0, 1], [70.0, 0.04, 1, 0, 2]],
        },
    ]
    t = where_time_went(run, q)
    assert [(w["admitted"], w["refused"]) for w in t["windows"]] == [(10, 1), (1, 0), (1, 0)]
    first = t["windows"][0]
    assert first["of_window"] == round(5_000 / 6_000, 3) and first["p90_s"] == 1.3 and first["last_s"] == 1.4
    assert t["windows"][2]["last_s"] == 1.0
    assert (t["share_min"], t["share_max"], t["last_settled_s"]) == (0.05, 0.45, [61.3, 122.1])
    text = describe_time(run, q, instances=2)
    assert "2: 1 calls, 8% of its tokens" in text and "shares 0.050-0.450 (an equal split is 0.500)" in text
    assert (t["latency_s"], t["probes"]) == ([1.2, 3.4], 2)
    assert "latency 1.2-3.4 s (fresh figures up to 3 s); 2 idle probes" in text
    assert "the last instance (1), its last window" in text and "62.5 s 0.050 1/0/0; 70 s 0.040 1/0/2" in text
