"""What did it cost, and how did it behave: a report over the records in `results/` (issue 14 part 3).

Every success record already holds tokens, cost and timings, every `.error.json` its error code;
this tool reads them (streaming the listing, one bounded download at a time per worker), sums them
per task and model, and prints files, tokens, cost, cache-hit share, p50/p95 model latency and the
error codes. `--html FILE` also writes a self-contained page (plotly.js embedded, opens offline)
with cost per day per task, the model latency distribution and tokens per image by detail level.

    python -m local.report [--prefix invoices/] [--since 2026-11-01] [--until 2026-12-01] [--html report.html]

Records are caller-influenced data: each is size-capped before download, parsed defensively, and
every label (task, model, deployment, error code, detail) is reduced to a short, safe string before
it is printed or put in the page. Records that are too large or not records are skipped and counted.
Memory grows with the records read only by a few numbers each (model latencies and per-image token
estimates for the percentiles and charts); `--max-records` bounds a run over a huge container.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from shared.results import ERROR_SUFFIX, SUCCESS_SUFFIX

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_SETTINGS = REPO_ROOT / "local.settings.json"

EXIT_OK = 0
EXIT_ERROR = 3

MAX_RECORD_BYTES = 1 << 20  # a success record is a few KiB; anything near this is not ours
MAX_LABEL_CHARS = 64
MAX_IMAGES_PER_RECORD = 1000  # more image facts than any request may carry: keep the first ones
NO_MODEL = "-"  # error records name no model
UNKNOWN = "unknown"

_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+=-]")


# --------------------------------------------------------------------------- one record


def label(value: Any, default: str = UNKNOWN) -> str:
    """A short, printable, HTML- and script-safe label from a record field (anything else: default)."""
    if not isinstance(value, str) or not value:
        return default
    return _LABEL_UNSAFE.sub("?", value[:MAX_LABEL_CHARS])


def _count(value: Any) -> int:
    """A token count: a non-negative int, else 0 (absent fields and older records)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


def _amount(value: Any) -> float:
    """A non-negative finite number (cost, milliseconds), else 0.0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0.0
    return float(value)


def _timestamp(value: Any) -> datetime | None:
    """`processed_at` as an aware UTC datetime (records write ISO 8601 with Z), or None."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


@dataclass(frozen=True)
class ImageTokens:
    """One sent image: its detail level and its estimated tokens (for the tokens-per-image chart)."""

    detail: str
    tokens: int


@dataclass(frozen=True)
class Record:
    """What the report needs from one result or error record."""

    name: str
    failed: bool
    task: str
    model: str
    deployment: str
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    estimated_image_tokens: int = 0
    cost_usd: float = 0.0
    model_ms: float | None = None
    total_ms: float | None = None
    processed_at: datetime | None = None
    error_code: str | None = None
    images: tuple[ImageTokens, ...] = ()


def parse_record(name: str, doc: Any) -> Record | None:
    """A Record from a parsed JSON document, or None if it is not a result/error record."""
    if not isinstance(doc, dict):
        return None
    failed = name.endswith(ERROR_SUFFIX) or doc.get("status") == "failed"
    processed_at = _timestamp(doc.get("processed_at"))
    if failed:
        error = doc.get("error")
        code = label(error.get("code")) if isinstance(error, dict) else UNKNOWN
        return Record(
            name=name,
            failed=True,
            task=label(doc.get("task")),
            model=NO_MODEL,
            deployment=NO_MODEL,
            processed_at=processed_at,
            error_code=code,
        )
    if doc.get("status") not in (None, "succeeded") or not isinstance(doc.get("usage"), dict):
        return None
    usage = doc["usage"]
    timings = doc.get("timings_ms") if isinstance(doc.get("timings_ms"), dict) else {}
    images: list[ImageTokens] = []
    raw_images = doc.get("images")
    if isinstance(raw_images, list):
        for fact in raw_images[:MAX_IMAGES_PER_RECORD]:
            if isinstance(fact, dict):
                images.append(ImageTokens(label(fact.get("detail")), _count(fact.get("estimated_tokens"))))
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens")) if "total_tokens" in usage else prompt + completion
    model_ms = timings.get("model")
    total_ms = timings.get("total")
    return Record(
        name=name,
        failed=False,
        task=label(doc.get("task")),
        model=label(doc.get("model")),
        deployment=label(doc.get("deployment")),
        cached=doc.get("cached") is True,
        prompt_tokens=prompt,
        completion_tokens=completion,
        reasoning_tokens=_count(usage.get("reasoning_tokens")),
        total_tokens=total,
        estimated_image_tokens=_count(usage.get("estimated_image_tokens")),
        cost_usd=_amount(doc.get("cost_usd")),
        model_ms=_amount(model_ms) if model_ms is not None else None,
        total_ms=_amount(total_ms) if total_ms is not None else None,
        processed_at=processed_at,
        images=tuple(images),
    )


# --------------------------------------------------------------------------- sums


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Group:
    """Sums for one (task, model), or for everything (the totals)."""

    files: int = 0
    ok: int = 0
    failed: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    model_ms: list[float] = field(default_factory=list)  # calls that went to the model (not cached)
    error_codes: Counter[str] = field(default_factory=Counter)

    def add(self, r: Record) -> None:
        self.files += 1
        if r.failed:
            self.failed += 1
            self.error_codes[r.error_code or UNKNOWN] += 1
            return
        self.ok += 1
        self.cached += int(r.cached)
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.reasoning_tokens += r.reasoning_tokens
        self.total_tokens += r.total_tokens
        self.cost_usd += r.cost_usd
        if not r.cached and r.model_ms is not None:
            self.model_ms.append(r.model_ms)

    @property
    def cache_hit_share(self) -> float | None:
        """Cached answers over successful ones (None when nothing succeeded)."""
        return self.cached / self.ok if self.ok else None

    @property
    def p50_model_ms(self) -> float | None:
        return percentile(self.model_ms, 50)

    @property
    def p95_model_ms(self) -> float | None:
        return percentile(self.model_ms, 95)


@dataclass
class Skips:
    """Records not counted, and why (printed, so nothing is dropped silently)."""

    oversize: int = 0
    invalid: int = 0
    outside_window: int = 0
    undated: int = 0  # no usable processed_at while a window was asked for
    unreadable: int = 0  # the download failed


@dataclass
class Report:
    """The sums per (task, model), the totals, and what the charts need."""

    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    totals: Group = field(default_factory=Group)
    skipped: Skips = field(default_factory=Skips)
    cost_per_day: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))  # (day, task)
    image_tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # detail -> tokens
    model_ms_by_task: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    truncated: bool = False  # stopped at --max-records

    def add(self, r: Record) -> None:
        self.groups.setdefault((r.task, r.model), Group()).add(r)
        self.totals.add(r)
        if r.failed:
            return
        day = r.processed_at.date().isoformat() if r.processed_at else UNKNOWN
        self.cost_per_day[(day, r.task)] += r.cost_usd
        for image in r.images:
            self.image_tokens[image.detail].append(image.tokens)
        if not r.cached and r.model_ms is not None:
            self.model_ms_by_task[r.task].append(r.model_ms)


def in_window(r: Record, since: datetime | None, until: datetime | None) -> bool:
    """True when the record's processed_at is in [since, until)."""
    if r.processed_at is None:
        return False
    return (since is None or r.processed_at >= since) and (until is None or r.processed_at < until)


def aggregate(records: Iterable[Record], since: datetime | None = None, until: datetime | None = None) -> Report:
    """Sum records (already parsed) into a Report, keeping only those in the window."""
    report = Report()
    for r in records:
        fold(report, r, since, until)
    return report


def fold(report: Report, r: Record, since: datetime | None, until: datetime | None) -> bool:
    """Add one record to the report if it is in the window; count it as skipped otherwise."""
    if since is not None or until is not None:
        if r.processed_at is None:
            report.skipped.undated += 1
            return False
        if not in_window(r, since, until):
            report.skipped.outside_window += 1
            return False
    report.add(r)
    return True


# --------------------------------------------------------------------------- printing


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


COLUMNS = (
    "task",
    "model",
    "files",
    "ok",
    "failed",
    "prompt",
    "completion",
    "reasoning",
    "total tok",
    "cost USD",
    "cache hits",
    "p50 ms",
    "p95 ms",
)


def _row(task: str, model: str, g: Group) -> list[str]:
    return [
        task,
        model,
        str(g.files),
        str(g.ok),
        str(g.failed),
        str(g.prompt_tokens),
        str(g.completion_tokens),
        str(g.reasoning_tokens),
        str(g.total_tokens),
        f"{g.cost_usd:.6f}",
        _fmt_share(g.cache_hit_share),
        _fmt_ms(g.p50_model_ms),
        _fmt_ms(g.p95_model_ms),
    ]


def render(report: Report, where: str = "") -> str:
    """The text report: one row per task and model, the error codes, the totals, what was skipped."""
    rows = [_row(task, model, g) for (task, model), g in sorted(report.groups.items())]
    total_row = _row("TOTAL", "", report.totals)
    widths = [max(len(c), *(len(r[i]) for r in [*rows, total_row])) for i, c in enumerate(COLUMNS)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [f"cost report{(' for ' + where) if where else ''}: {report.totals.files} record(s)"]
    out.append(line(COLUMNS))
    out.append(line(["-" * w for w in widths]))
    out.extend(line(r) for r in rows)
    out.append(line(["-" * w for w in widths]))
    out.append(line(total_row))
    codes = [
        (task, code, n)
        for (task, _model), g in sorted(report.groups.items())
        for code, n in sorted(g.error_codes.items())
    ]
    if codes:
        out.append("errors:")
        out.extend(f"  {task}: {code} x{n}" for task, code, n in codes)
    s = report.skipped
    skipped = {
        "over the size cap": s.oversize,
        "not a result record": s.invalid,
        "outside the time window": s.outside_window,
        "without processed_at": s.undated,
        "unreadable": s.unreadable,
    }
    if any(skipped.values()):
        out.append("skipped: " + ", ".join(f"{n} {why}" for why, n in skipped.items() if n))
    if report.truncated:
        out.append("stopped at --max-records: the sums above cover only the records read")
    return "\n".join(out)


# --------------------------------------------------------------------------- the HTML page


def _figures(report: Report) -> list[tuple[str, Any]]:
    """(div id, plotly figure) for the three charts."""
    import plotly.graph_objects as go

    days = sorted({day for day, _ in report.cost_per_day})
    tasks = sorted({task for _, task in report.cost_per_day})
    cost = go.Figure(
        [go.Bar(name=t, x=days, y=[report.cost_per_day.get((d, t), 0.0) for d in days]) for t in tasks],
        layout={"barmode": "stack", "title": "Cost per day per task (USD)", "xaxis": {"type": "category"}},
    )
    latency = go.Figure(
        [go.Histogram(name=t, x=v, opacity=0.7) for t, v in sorted(report.model_ms_by_task.items())],
        layout={
            "barmode": "overlay",
            "title": "Model latency distribution (ms, answers that were not cached)",
            "xaxis": {"title": "ms"},
            "yaxis": {"title": "answers"},
        },
    )
    tokens = go.Figure(
        [go.Box(name=d, y=v, boxpoints="outliers") for d, v in sorted(report.image_tokens.items())],
        layout={"title": "Estimated tokens per image by detail level", "yaxis": {"title": "tokens"}},
    )
    return [("chart-cost-per-day", cost), ("chart-latency", latency), ("chart-tokens-per-image", tokens)]


def render_html(report: Report, where: str = "") -> str:
    """A self-contained page: the table, and the charts with plotly.js inlined (no network needed)."""
    from plotly.offline import get_plotlyjs

    charts = "\n".join(
        f'<section class="chart">{fig.to_html(full_html=False, include_plotlyjs=False, div_id=div)}</section>'
        for div, fig in _figures(report)
    )
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>vlm-functions cost report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; }}
pre {{ background: #f6f8fa; padding: 1rem; overflow-x: auto; }}
.chart {{ margin: 1.5rem 0; }}
</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head>
<body>
<h1>vlm-functions cost report</h1>
<p>{html.escape(where or "all records")}; generated {generated}</p>
<pre>{html.escape(render(report, where))}</pre>
{charts}
</body>
</html>
"""


# --------------------------------------------------------------------------- reading the container


@dataclass
class ReportOptions:
    """Everything the CLI can say; tests build this directly."""

    prefix: str = ""
    since: datetime | None = None
    until: datetime | None = None
    html: Path | None = None
    connection_string: str | None = None
    account_url: str | None = None
    results_container: str = "results"
    max_record_bytes: int = MAX_RECORD_BYTES
    max_records: int | None = None
    concurrency: int = 8
    settings_path: Path = LOCAL_SETTINGS


def is_record_name(name: str) -> bool:
    """Result and error records end in .json (an error record's .error.json does too)."""
    return name.endswith(SUCCESS_SUFFIX)


async def _listing(container: Any, options: ReportOptions, report: Report) -> AsyncIterator[str]:
    """Names of the records to read, streamed page by page; oversize and too-old ones counted, not read."""
    listed = 0
    async for blob in container.list_blobs(name_starts_with=options.prefix or None):
        if not is_record_name(blob.name):
            continue
        if options.max_records is not None and listed >= options.max_records:
            report.truncated = True
            return
        listed += 1
        if blob.size is not None and blob.size > options.max_record_bytes:
            report.skipped.oversize += 1
            continue
        # A record is written right after its processed_at is taken: last written before `since`
        # means processed before it, so there is no need to download it.
        modified = blob.last_modified
        if options.since is not None and modified is not None and modified.astimezone(UTC) < options.since:
            report.skipped.outside_window += 1
            continue
        yield blob.name


async def _read(container: Any, name: str, options: ReportOptions, report: Report) -> Record | None:
    """Download one record within the size cap and parse it; failures are counted, not raised."""
    try:
        downloader = await container.download_blob(name, offset=0, length=options.max_record_bytes + 1)
        raw = await downloader.readall()
    except Exception:  # a record deleted meanwhile, a network error: count it, keep going
        report.skipped.unreadable += 1
        return None
    if len(raw) > options.max_record_bytes:
        report.skipped.oversize += 1
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        report.skipped.invalid += 1
        return None
    record = parse_record(name, doc)
    if record is None:
        report.skipped.invalid += 1
    return record


async def collect(container: Any, options: ReportOptions) -> Report:
    """Stream the listing and fold each record in; at most `concurrency` downloads in flight."""
    report = Report()
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=options.concurrency * 2)
    workers_n = max(1, options.concurrency)

    async def worker() -> None:
        while (name := await queue.get()) is not None:
            record = await _read(container, name, options, report)
            if record is not None:
                fold(report, record, options.since, options.until)

    workers = [asyncio.create_task(worker()) for _ in range(workers_n)]
    try:
        async for name in _listing(container, options, report):
            await queue.put(name)
    finally:
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    return report


def _drop_options(options: ReportOptions) -> Any:
    """The storage flags as local.drop takes them: both tools resolve and open storage the same way."""
    from local.drop import DropOptions

    return DropOptions(
        folder=Path("."),
        connection_string=options.connection_string,
        account_url=options.account_url,
        settings_path=options.settings_path,
    )


async def run(options: ReportOptions) -> Report:
    """Read the results container and build the report."""
    from local.drop import blob_service

    async with blob_service(_drop_options(options)) as service:
        return await collect(service.get_container_client(options.results_container), options)


# --------------------------------------------------------------------------- CLI


def parse_when(text: str) -> datetime:
    """An ISO date or date-time; a date means its midnight UTC, a naive time is UTC."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def parse_args(argv: list[str] | None = None) -> ReportOptions:
    from local.drop import add_storage_flags

    p = argparse.ArgumentParser(
        prog="python -m local.report",
        description="Sum the result records: files, tokens, cost, cache hits, latency and errors per task and model.",
    )
    p.add_argument("--prefix", default="", help="only records under this folder of the results container")
    p.add_argument("--since", type=parse_when, help="processed_at on or after this ISO date/date-time (UTC)")
    p.add_argument("--until", type=parse_when, help="processed_at before this ISO date/date-time (UTC)")
    p.add_argument("--html", type=Path, help="also write a self-contained HTML page with charts to this file")
    add_storage_flags(p)
    p.add_argument("--results-container", default="results")
    p.add_argument(
        "--max-record-bytes",
        type=_positive,
        default=MAX_RECORD_BYTES,
        help=f"skip (and count) records larger than this (default {MAX_RECORD_BYTES})",
    )
    p.add_argument("--max-records", type=_positive, help="stop after this many records (default: all)")
    p.add_argument("--concurrency", type=_positive, default=8, help="parallel downloads (default 8)")
    a = p.parse_args(argv)
    if a.since and a.until and a.since >= a.until:
        p.error("--since must be before --until")
    return ReportOptions(
        prefix=a.prefix,
        since=a.since,
        until=a.until,
        html=a.html,
        connection_string=a.connection_string,
        account_url=a.account_url,
        results_container=a.results_container,
        max_record_bytes=a.max_record_bytes,
        max_records=a.max_records,
        concurrency=a.concurrency,
    )


def describe(options: ReportOptions) -> str:
    """The scope in words, for the heading."""
    parts = [f"{options.results_container}/{options.prefix}"]
    if options.since:
        parts.append(f"since {options.since.isoformat()}")
    if options.until:
        parts.append(f"until {options.until.isoformat()}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the report, print it, write the page if asked."""
    options = parse_args(argv)
    try:
        report = asyncio.run(run(options))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # storage unreachable, container missing, sign-in failed
        print(f"report failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return EXIT_ERROR
    where = describe(options)
    print(render(report, where))
    if options.html:
        options.html.write_text(render_html(report, where), encoding="utf-8")
        print(f"charts: {options.html}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
