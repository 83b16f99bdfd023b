"""Tests for `python -m local.report`: the sums on constructed records, and one run against Azurite."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from local import report as rp

# --------------------------------------------------------------------------- constructed records


def success(
    task: str = "ocr",
    model: str = "gpt-5.4-mini-2026-03-17",
    *,
    prompt: int = 1000,
    completion: int = 200,
    reasoning: int | None = None,
    cost: float = 0.001,
    model_ms: float = 800.0,
    cached: bool = False,
    day: str = "2026-11-29",
    images: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A success record shaped like shared/blob_job.py writes it (reasoning only when given)."""
    usage: dict[str, Any] = {
        "prompt_tokens": 0 if cached else prompt,
        "completion_tokens": 0 if cached else completion,
        "total_tokens": 0 if cached else prompt + completion,
        "estimated_image_tokens": 765,
    }
    if reasoning is not None:
        usage["reasoning_tokens"] = reasoning
        usage["estimated_prompt_tokens"] = prompt - 10
    return {
        "status": "succeeded",
        "id": "x",
        "task": task,
        "model": model,
        "deployment": "gpt-5.4-mini",
        "result": {"text": "hello"},
        "cached": cached,
        "usage": usage,
        "cost_usd": 0.0 if cached else cost,
        "images": images if images is not None else [{"detail": "high", "estimated_tokens": 765}],
        "timings_ms": {"prepare": 12.0, "model": 0.0 if cached else model_ms, "total": model_ms + 20},
        "source": {"container": "images", "name": "a.png", "etag": "e", "sha256": "0" * 64, "size": 10},
        "processed_at": f"{day}T10:00:00.000Z",
    }


def failure(code: str = "content_filtered", task: str = "ocr", day: str = "2026-11-30") -> dict[str, Any]:
    return {
        "status": "failed",
        "error": {"code": code, "message": "the model refused"},
        "task": task,
        "attempts": 1,
        "processed_at": f"{day}T11:00:00.000Z",
    }


def parsed(name: str, doc: dict[str, Any]) -> rp.Record:
    record = rp.parse_record(name, doc)
    assert record is not None
    return record


def test_parse_success_with_and_without_the_newer_usage_fields() -> None:
    old = parsed("a.png.json", success(prompt=1000, completion=200))
    assert (old.prompt_tokens, old.completion_tokens, old.reasoning_tokens, old.total_tokens) == (1000, 200, 0, 1200)
    new = parsed("b.png.json", success(prompt=500, completion=300, reasoning=250))
    assert (new.reasoning_tokens, new.total_tokens) == (250, 800)
    assert new.task == "ocr" and new.model == "gpt-5.4-mini-2026-03-17" and new.deployment == "gpt-5.4-mini"
    assert new.model_ms == 800.0 and new.processed_at == datetime(2026, 11, 29, 10, tzinfo=UTC)
    assert new.images == (rp.ImageTokens("high", 765),)


def test_parse_error_record_by_suffix_or_status() -> None:
    by_suffix = parsed("x/a.png.error.json", {"error": {"code": "invalid_image"}, "task": "describe"})
    assert by_suffix.failed and by_suffix.error_code == "invalid_image" and by_suffix.model == rp.NO_MODEL
    by_status = parsed("x/b.png.json", failure("poison"))
    assert by_status.failed and by_status.error_code == "poison"
    no_code = parsed("c.png.error.json", {"status": "failed", "error": "boom"})
    assert no_code.error_code == rp.UNKNOWN and no_code.task == rp.UNKNOWN


@pytest.mark.parametrize(
    "doc",
    [[], "text", 3, {"status": "succeeded"}, {"status": "pending", "usage": {}}, {"usage": "lots"}],
)
def test_parse_rejects_what_is_not_a_record(doc: Any) -> None:
    assert rp.parse_record("a.png.json", doc) is None


def test_parse_neutralises_hostile_field_values() -> None:
    doc = success()
    doc["task"] = "</script><script>alert(1)</script>" + "x" * 500
    doc["model"] = 42
    doc["usage"] = {"prompt_tokens": "9999", "completion_tokens": -5, "total_tokens": True, "reasoning_tokens": 1e400}
    doc["cost_usd"] = float("nan")
    doc["timings_ms"] = {"model": "slow"}
    doc["images"] = [{"detail": "<b>", "estimated_tokens": "1"}, "junk"] + [{"detail": "low"}] * 5000
    doc["processed_at"] = "yesterday"
    r = parsed("a.png.json", doc)
    assert "<" not in r.task and ">" not in r.task and len(r.task) == rp.MAX_LABEL_CHARS
    assert r.model == rp.UNKNOWN
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens, r.reasoning_tokens) == (0, 0, 0, 0)
    assert r.cost_usd == 0.0 and r.model_ms == 0.0 and r.processed_at is None
    # only the first MAX_IMAGES_PER_RECORD entries are looked at; "junk" among them is dropped
    assert len(r.images) == rp.MAX_IMAGES_PER_RECORD - 1 and r.images[0] == rp.ImageTokens("?b?", 0)


def _records() -> list[rp.Record]:
    docs = [
        ("a.json", success("ocr", prompt=1000, completion=200, cost=0.0010, model_ms=700, day="2026-11-28")),
        ("b.json", success("ocr", prompt=1500, completion=100, reasoning=60, cost=0.0020, model_ms=900)),
        ("c.json", success("ocr", cached=True)),
        ("d.json", success("invoice", "gpt-5.4-nano", prompt=3000, completion=900, cost=0.0031, model_ms=1500)),
        ("e.error.json", failure("content_filtered", "ocr")),
        ("f.error.json", failure("invalid_image", "invoice")),
        ("g.error.json", failure("invalid_image", "invoice")),
    ]
    return [parsed(name, doc) for name, doc in docs]


def test_totals_equal_the_sum_of_the_records_and_of_the_groups() -> None:
    records = _records()
    report = rp.aggregate(records)
    t = report.totals
    assert t.files == len(records) == sum(g.files for g in report.groups.values())
    assert (t.ok, t.failed, t.cached) == (4, 3, 1)
    for attr in ("prompt_tokens", "completion_tokens", "reasoning_tokens", "total_tokens"):
        assert getattr(t, attr) == sum(getattr(r, attr) for r in records)
        assert getattr(t, attr) == sum(getattr(g, attr) for g in report.groups.values())
    assert t.cost_usd == pytest.approx(sum(r.cost_usd for r in records))
    assert t.cost_usd == pytest.approx(0.0061)
    assert (t.prompt_tokens, t.completion_tokens, t.reasoning_tokens) == (5500, 1200, 60)
    assert t.error_codes == {"content_filtered": 1, "invalid_image": 2}
    ocr = report.groups[("ocr", "gpt-5.4-mini-2026-03-17")]
    assert (ocr.files, ocr.ok, ocr.cached, ocr.total_tokens) == (3, 3, 1, 2800)
    assert ocr.cache_hit_share == pytest.approx(1 / 3)
    assert report.groups[("invoice", rp.NO_MODEL)].error_codes == {"invalid_image": 2}
    assert report.cost_per_day[("2026-11-28", "ocr")] == pytest.approx(0.0010)
    assert report.cost_per_day[("2026-11-29", "ocr")] == pytest.approx(0.0020)


def test_latency_percentiles_leave_out_cached_answers() -> None:
    records = [parsed(f"{i}.json", success(model_ms=100.0 * i)) for i in range(1, 21)]
    records += [parsed(f"c{i}.json", success(cached=True)) for i in range(30)]  # model time 0: not a model call
    g = rp.aggregate(records).totals
    assert (g.p50_model_ms, g.p95_model_ms) == (1000.0, 1900.0)
    assert rp.percentile([], 50) is None and rp.percentile([5.0], 95) == 5.0


def test_time_window_is_half_open_and_counts_what_it_leaves_out() -> None:
    records = [*_records(), parsed("u.json", {**success(), "processed_at": None})]
    since = datetime(2026, 11, 29, tzinfo=UTC)
    until = datetime(2026, 11, 30, 11, tzinfo=UTC)  # the failures are at 11:00 on the 30th: excluded
    report = rp.aggregate(records, since, until)
    assert report.totals.files == 3  # b, c, d (a is on the 28th, e-g at the `until` instant)
    assert report.skipped.outside_window == 4 and report.skipped.undated == 1
    assert report.totals.failed == 0


def test_render_prints_groups_errors_totals_and_skips() -> None:
    report = rp.aggregate(_records())
    report.skipped.oversize, report.skipped.invalid = 2, 1
    text = rp.render(report, "results/")
    total = _total_line(text)
    assert total[:5] == ["TOTAL", "7", "4", "3", "5500"]
    assert "ocr: content_filtered x1" in text and "invoice: invalid_image x2" in text
    assert "skipped: 2 over the size cap, 1 not a result record" in text


def _total_line(text: str) -> list[str]:
    (line,) = [x for x in text.splitlines() if x.startswith("TOTAL")]
    return line.split()


SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=", re.IGNORECASE)


def test_html_is_self_contained_with_the_three_charts() -> None:
    records = _records()
    hostile = success("</script><img src=x onerror=alert(1)>")
    records.append(parsed("h.json", hostile))
    page = rp.render_html(rp.aggregate(records), "results/<prefix>")
    for div in ("chart-cost-per-day", "chart-latency", "chart-tokens-per-image"):
        assert f'id="{div}"' in page
    from plotly.offline import get_plotlyjs

    library = get_plotlyjs()
    assert library in page  # the library itself is inlined
    # nothing outside it points at the network (the library's own default topojson URL is for geo maps)
    assert not SCRIPT_SRC.search(page) and not re.search(r"https?://", page.replace(library, ""))
    assert page.count("</script>") == page.count("<script")  # no caller text closes a script early
    assert "<img" not in page and "results/&lt;prefix&gt;" in page


def test_parse_when_and_cli_arguments() -> None:
    assert rp.parse_when("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert rp.parse_when("2026-11-01T12:30:00+01:00") == datetime(2026, 11, 1, 11, 30, tzinfo=UTC)
    with pytest.raises(SystemExit):
        rp.parse_args(["--since", "2026-12-01", "--until", "2026-11-01"])
    with pytest.raises(SystemExit):
        rp.parse_args(["--since", "last week"])
    options = rp.parse_args(["--prefix", "inv/", "--max-record-bytes", "4096", "--html", "r.html"])
    assert (options.prefix, options.max_record_bytes, options.html) == ("inv/", 4096, Path("r.html"))


# --------------------------------------------------------------------------- against Azurite


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Azurite on free ports, in memory (the project's launcher); yields its connection string."""
    from local.azurite import start_azurite
    from local.procs import free_port

    az = start_azurite(
        tmp_path_factory.mktemp("azurite"), blob_port=free_port(), queue_port=free_port(), in_memory=True
    )
    try:
        yield az.connection_string
    finally:
        az.stop()


async def _upload(conn: str, blobs: dict[str, bytes]) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob.aio import BlobServiceClient

    async with BlobServiceClient.from_connection_string(conn) as service:
        container = service.get_container_client("results")
        try:
            await container.create_container()
        except ResourceExistsError:
            pass
        for name, data in blobs.items():
            await container.upload_blob(name, data, overwrite=True)


async def test_cli_against_azurite_prints_totals_equal_to_the_records_and_writes_the_page(
    azurite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = {
        "run/a.png.json": success("ocr", prompt=1200, completion=300, cost=0.0015, model_ms=650),
        "run/sub/b.pdf.json": success("invoice", prompt=4000, completion=800, reasoning=500, cost=0.0042),
        "run/sub/c.jpg.json": success("ocr", cached=True),
        "run/d.png.error.json": failure("content_filtered"),
        "run/e.png.error.json": failure("poison", "invoice"),
    }
    blobs = {name: json.dumps(doc).encode() for name, doc in docs.items()}
    big = success("ocr", images=[{"detail": "low", "estimated_tokens": 85}] * 400)
    blobs["run/big.png.json"] = json.dumps(big).encode()  # over the cap given below: skipped, counted
    blobs["run/broken.png.json"] = b'{"status": "succ'
    blobs["run/list.png.json"] = b"[1, 2, 3]"
    blobs["run/notes.txt"] = b"not a record"
    blobs["other/z.png.json"] = json.dumps(success(prompt=99999)).encode()  # another prefix
    assert len(blobs["run/big.png.json"]) > 8192 > max(len(b) for n, b in blobs.items() if n != "run/big.png.json")
    await _upload(azurite, blobs)

    page = tmp_path / "report.html"
    argv = ["--connection-string", azurite, "--prefix", "run/", "--max-record-bytes", "8192", "--html", str(page)]
    code = await asyncio.to_thread(rp.main, argv)
    out = capsys.readouterr().out
    assert code == rp.EXIT_OK, out

    counted = [rp.parse_record(n, d) for n, d in docs.items()]
    expected = rp.aggregate([r for r in counted if r is not None]).totals
    total = _total_line(out)
    files, ok, failed, prompt, completion, reasoning, tokens, cost = total[1:9]
    assert (int(files), int(ok), int(failed)) == (5, 3, 2)
    assert int(prompt) == expected.prompt_tokens == 1200 + 4000
    assert int(completion) == expected.completion_tokens == 300 + 800
    assert int(reasoning) == 500
    assert (
        int(tokens) == expected.total_tokens == sum(d["usage"]["total_tokens"] for d in docs.values() if "usage" in d)
    )
    assert float(cost) == pytest.approx(0.0057)
    assert "ocr: content_filtered x1" in out and "invoice: poison x1" in out
    assert "skipped: 1 over the size cap, 2 not a result record" in out
    assert f"charts: {page}" in out

    text = page.read_text(encoding="utf-8")
    for div in ("chart-cost-per-day", "chart-latency", "chart-tokens-per-image"):
        assert f'id="{div}"' in text
    assert not SCRIPT_SRC.search(text) and not re.search(r"""src\s*=\s*["']https?://""", text)
    assert len(text) > 1_000_000  # plotly.js is in the page


async def test_cli_window_and_a_missing_container(
    azurite: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await _upload(azurite, {"win/a.png.json": json.dumps(success(day="2026-11-29")).encode()})
    code = await asyncio.to_thread(
        rp.main, ["--connection-string", azurite, "--prefix", "win/", "--since", "2026-11-30"]
    )
    out = capsys.readouterr().out
    assert code == rp.EXIT_OK and _total_line(out)[1] == "0" and "1 outside the time window" in out
    code = await asyncio.to_thread(rp.main, ["--connection-string", azurite, "--results-container", "nosuch"])
    assert code == rp.EXIT_ERROR and "report failed" in capsys.readouterr().err


class _Blob:
    def __init__(self, name: str, size: int, modified: datetime) -> None:
        self.name, self.size, self.last_modified = name, size, modified


class _Downloader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def readall(self) -> bytes:
        return self.data


class FakeContainer:
    """Just enough of an aio ContainerClient: a listing, and downloads that are counted."""

    def __init__(self, blobs: dict[str, tuple[bytes, datetime]]) -> None:
        self.blobs = blobs
        self.downloaded: list[str] = []

    async def list_blobs(self, name_starts_with: str | None = None):
        for name, (data, modified) in self.blobs.items():
            if name.startswith(name_starts_with or ""):
                yield _Blob(name, len(data), modified)

    async def download_blob(self, name: str, offset: int = 0, length: int | None = None) -> _Downloader:
        self.downloaded.append(name)
        data = self.blobs[name][0]
        return _Downloader(data[offset : offset + length if length is not None else None])


async def test_listing_budget_skips_before_downloading() -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    old = datetime(2026, 11, 1, tzinfo=UTC)
    small = json.dumps(success()).encode()
    container = FakeContainer(
        {
            "p/a.png.json": (small, now),
            "p/big.png.json": (b" " * 5000, now),  # over the cap by its listed size: never downloaded
            "p/old.png.json": (small, old),  # written before --since: processed before it, never downloaded
            "p/readme.txt": (b"x", now),  # not a record name
            **{f"p/{i}.png.json": (small, now) for i in range(10)},
        }
    )
    options = rp.ReportOptions(prefix="p/", since=datetime(2026, 11, 29, tzinfo=UTC), max_record_bytes=4096)
    report = await rp.collect(container, options)
    assert report.totals.files == 11
    assert "p/big.png.json" not in container.downloaded and "p/old.png.json" not in container.downloaded
    assert (report.skipped.oversize, report.skipped.outside_window) == (1, 1)
    assert len(container.downloaded) == 11 and not report.truncated

    capped = await rp.collect(FakeContainer(container.blobs), rp.ReportOptions(prefix="p/", max_records=5))
    assert capped.truncated and capped.totals.files + capped.skipped.invalid == 5  # big.png.json: 5000 spaces
    assert "stopped at --max-records" in rp.render(capped)
