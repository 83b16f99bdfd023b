"""Tests for `python -m local.drop` against a real Azurite, with a fake worker writing result records.

The fake worker stands in for the blob-trigger function: it watches the images container and writes
`results/<blob>.json` / `.error.json` in the contract's format, so these tests exercise the tool's
upload, matching (sha256) and reporting without the model or the Functions host.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from azure.storage.blob import ContentSettings
from azure.storage.blob.aio import BlobServiceClient, ContainerClient
from PIL import Image

from local import drop as d
from shared.results import record_names
from shared.storage import dev_connection_string

REPO = Path(__file__).resolve().parent.parent
AZURITE_BLOB = REPO / "node_modules" / ".bin" / "azurite-blob"


# --------------------------------------------------------------------------- Azurite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite on free ports with its own data dir; yields its connection string.

    Uses local.azurite when it is there (the project's launcher), else starts azurite-blob itself.
    """
    data = tmp_path_factory.mktemp("azurite")
    try:
        from local import azurite as launcher
    except ImportError:
        launcher = None
    if launcher is not None:
        az = launcher.start_azurite(data, blob_port=_free_port(), queue_port=_free_port())
        try:
            yield az.connection_string
        finally:
            az.stop()
        return
    yield from _azurite_blob_only(data)


def _azurite_blob_only(data: Path) -> Iterator[str]:
    """Fallback: a blob-only Azurite child process, stopped when the generator closes."""
    if not AZURITE_BLOB.exists():
        pytest.skip("azurite not installed (make install)")
    port = _free_port()
    cmd = [str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data)]
    proc = subprocess.Popen(
        [*cmd, "--silent", "--skipApiVersionCheck", "--loose"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail("azurite exited during start-up")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("azurite did not start")
                time.sleep(0.1)
        yield dev_connection_string(blob_port=port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- a folder to drop


def _image(fmt: str, color: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path, flavour: str = "") -> Path:
    """Images (some nested), a PDF, a folder-level _task.json, a text file and hidden files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.png").write_bytes(_image("PNG", "red") + flavour.encode())
    (root / "b.jpg").write_bytes(_image("JPEG", "green"))
    (root / "stale.png").write_bytes(_image("PNG", "blue", (30, 30)))
    (root / "doc.pdf").write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    sub = root / "sub"
    (sub / "deeper").mkdir(parents=True, exist_ok=True)
    (sub / "c.webp").write_bytes(_image("WEBP", "yellow"))
    (sub / "filtered.gif").write_bytes(_image("GIF", "white"))
    (sub / "deeper" / "bad.png").write_bytes(_image("PNG", "black"))
    (sub / "_task.json").write_text(json.dumps({"task": "receipt"}))
    (root / "notes.txt").write_text("BMW is not a bitmap\n")
    (root / ".hidden.png").write_bytes(_image("PNG", "red"))
    (root / ".git").mkdir(exist_ok=True)
    (root / ".git" / "x.png").write_bytes(_image("PNG", "red"))
    return root


# --------------------------------------------------------------------------- the fake worker


@dataclass
class FakeWorker:
    """Writes contract-shaped result records for blobs under `prefix`, like the blob trigger does."""

    images: ContainerClient
    results: ContainerClient
    prefix: str
    slow: dict[str, float] = field(default_factory=dict)  # blob basename -> delay before writing
    ignore: set[str] = field(default_factory=set)  # blob basenames never processed
    seen: dict[str, str] = field(default_factory=dict)  # blob -> etag processed
    task_config_seen_first: list[bool] = field(default_factory=list)

    async def run(self) -> None:
        pending: set[asyncio.Task[None]] = set()
        while True:
            async for blob in self.images.list_blobs(name_starts_with=self.prefix):
                name = blob.name
                base = name.rsplit("/", 1)[-1]
                if base == d.TASK_FILE or base in self.ignore or self.seen.get(name) == blob.etag:
                    continue
                self.seen[name] = blob.etag
                task = asyncio.create_task(self.process(name, blob.etag, blob.size))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(0.05)

    async def task_for(self, name: str) -> str:
        """Nearest _task.json, as the contract says (folder, then parents)."""
        parts = name.split("/")[:-1]
        while True:
            path = "/".join([*parts, d.TASK_FILE])
            try:
                body = await (await self.images.download_blob(path)).readall()
                return json.loads(body)["task"]
            except Exception:
                if not parts:
                    return "default"
                parts.pop()

    async def process(self, name: str, etag: str, size: int) -> None:
        base = name.rsplit("/", 1)[-1]
        top_config = await self.images.get_blob_client(self.prefix + d.TASK_FILE).exists()
        self.task_config_seen_first.append(top_config)
        data = await (await self.images.download_blob(name)).readall()
        sha = hashlib.sha256(data).hexdigest()
        task = await self.task_for(name)
        await asyncio.sleep(self.slow.get(base, 0.0))
        source = {"container": "images", "name": name, "etag": etag, "sha256": sha, "size": size}
        if base in ("bad.png", "filtered.gif"):
            code = "invalid_image" if base == "bad.png" else "content_filtered"
            record = {
                "status": "failed",
                "error": {"code": code, "message": f"{code} for test", "details": {}},
                "source": source,
                "task": task,
                "attempts": 1,
                "processed_at": "2025-01-01T00:00:00Z",
            }
            blob = record_names(name).error
        else:
            record = {
                "status": "succeeded",
                "id": sha,
                "task": task,
                "result": {"text": base},
                "source": source,
                "model": "fake-model",
                "deployment": "fake-deployment",
                "usage": {
                    "prompt_tokens": 90,
                    "completion_tokens": 10,
                    "total_tokens": 100,
                    "estimated_image_tokens": 85,
                },
                "cost_usd": 0.0025,
                "cached": base == "b.jpg",
                "attempts": 1,
                "images": [],
                "processed_at": "2025-01-01T00:00:00Z",
                "timings_ms": {"total": 1},
            }
            blob = record_names(name).success
        await self.results.upload_blob(
            blob,
            json.dumps(record).encode(),
            overwrite=True,
            content_settings=ContentSettings(content_type="application/json"),
        )


async def _containers(conn: str) -> tuple[BlobServiceClient, ContainerClient, ContainerClient]:
    service = BlobServiceClient.from_connection_string(conn)
    images = service.get_container_client("images")
    results = service.get_container_client("results")
    for c in (images, results):
        if not await c.exists():
            await c.create_container()
    return service, images, results


# --------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (_image("PNG", "red"), "png"),
        (_image("JPEG", "red"), "jpeg"),
        (_image("WEBP", "red"), "webp"),
        (_image("GIF", "red"), "gif"),
        (_image("BMP", "red"), "bmp"),
        (_image("TIFF", "red"), "tiff"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heic"),
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heicmiaf", "heic"),  # HEVC-coded HEIF
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", None),  # an MP4 is not an image
        (b"%PDF-1.7\n", "pdf"),
        (b"BMW is a car, not a bitmap header at all", None),
        (b"hello", None),
        (b"", None),
    ],
)
def test_sniff(data: bytes, kind: str | None) -> None:
    assert d.sniff(data[: d.SNIFF_BYTES]) == kind


def test_storage_resolution(tmp_path: Path) -> None:
    missing = d.DropOptions(folder=tmp_path, settings_path=tmp_path / "nope.json")
    conn, url = d.resolve_storage(missing)
    assert url is None and conn and "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1" in conn

    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps({"Values": {"VlmStorage": "UseDevelopmentStorage=true"}}))
    assert d.resolve_storage(d.DropOptions(folder=tmp_path, settings_path=settings))[0] == conn

    real = "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=eQ==;EndpointSuffix=core.windows.net"
    settings.write_text(json.dumps({"Values": {"VlmStorage": real}}))
    assert d.resolve_storage(d.DropOptions(folder=tmp_path, settings_path=settings)) == (real, None)
    flag = d.DropOptions(folder=tmp_path, settings_path=settings, connection_string="UseDevelopmentStorage=true")
    assert d.resolve_storage(flag) == (conn, None)
    keyless = d.DropOptions(folder=tmp_path, account_url="https://acct.blob.core.windows.net")
    assert d.resolve_storage(keyless) == (None, "https://acct.blob.core.windows.net")


def test_parse_args() -> None:
    o = d.parse_args(["f", "--prefix", "invoices", "--task", "invoice", "--detail", "high", "--no-wait"])
    assert (o.prefix, o.wait, o.task_config()) == ("invoices", False, {"task": "invoice", "detail": "high"})
    assert d.normalise_prefix(o.prefix) == "invoices/"
    assert d.parse_args(["f"]).task_config() is None
    with pytest.raises(SystemExit):
        d.parse_args(["f", "--prompt", "x"])  # a prompt without a task means nothing


def test_progress_line() -> None:
    p = d.Progress(50, io.StringIO(), interval=0)
    assert p.line(23, 2).startswith("[=============>                ] 23/50 done, 2 failed, ")
    states = {"pending": 5, "submitted": 12, "in progress": 10}
    assert "] 5 pending, 12 submitted, 10 in progress, 23/50 done, 2 failed" in p.line(23, 2, states)


def test_mode_goes_into_the_task_file() -> None:
    o = d.parse_args(["f", "--task", "invoice", "--mode", "batch"])
    assert o.task_config() == {"task": "invoice", "mode": "batch"}
    for bad in (["f", "--mode", "batch"], ["f", "--task", "ocr", "--mode", "later"]):
        with pytest.raises(SystemExit):
            d.parse_args(bad)  # a mode needs a task; only the two routes exist


# --------------------------------------------------------------------------- end to end on Azurite


async def test_drop_folder_end_to_end(azurite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    service, images, results = await _containers(azurite)
    prefix = "invoices/"
    folder = make_folder(tmp_path / "drop")
    # A stale result from an earlier, different stale.png: must not count for this upload.
    stale = {
        "status": "succeeded",
        "source": {"sha256": "0" * 64},
        "model": "stale-model",
        "usage": {"total_tokens": 9999},
    }
    await results.upload_blob(record_names(prefix + "stale.png").success, json.dumps(stale).encode(), overwrite=True)

    worker = FakeWorker(images, results, prefix, slow={"stale.png": 1.0})
    worker_task = asyncio.create_task(worker.run())
    options = d.DropOptions(
        folder=folder,
        prefix="invoices",
        task="invoice",
        detail="high",
        timeout=20,
        out=tmp_path / "out",
        connection_string=azurite,
        poll_interval=0.2,
        progress_interval=0.5,
    )
    try:
        summary = await d.drop(options)
    finally:
        worker_task.cancel()
    err = capsys.readouterr().err

    # uploads under the prefix, relative paths kept; skipped files announced
    names = {b.name async for b in images.list_blobs(name_starts_with=prefix)}
    assert names == {
        "invoices/_task.json",
        "invoices/a.png",
        "invoices/b.jpg",
        "invoices/stale.png",
        "invoices/doc.pdf",
        "invoices/sub/_task.json",
        "invoices/sub/c.webp",
        "invoices/sub/filtered.gif",
        "invoices/sub/deeper/bad.png",
    }
    assert "skipped notes.txt: not an image or PDF" in err
    assert "skipped .hidden.png: hidden file" in err
    assert "skipped .git: hidden directory" in err
    props = await images.get_blob_client("invoices/sub/c.webp").get_blob_properties()
    assert props.content_settings.content_type == "image/webp"

    # _task.json written with only the given keys, before any image was seen
    config = json.loads(await (await images.download_blob("invoices/_task.json")).readall())
    assert config == {"task": "invoice", "detail": "high"}
    assert worker.task_config_seen_first and all(worker.task_config_seen_first)

    # counts, codes, sums
    assert summary.exit_code == d.EXIT_FAILED
    assert (summary.ok, summary.failed, len(summary.pending)) == (5, 2, 0)
    assert summary.failed_by_code == {"invalid_image": 1, "content_filtered": 1}
    assert summary.total_tokens == 500
    assert summary.cost_usd == pytest.approx(0.0125)
    assert summary.cached == 1
    rows = {r.blob: r for r in summary.rows}
    assert rows["invoices/sub/c.webp"].task == "receipt"  # the folder's own _task.json was uploaded as-is
    assert rows["invoices/a.png"].task == "invoice"
    # the stale record (other sha256) was ignored; the fresh one, written later, counted
    assert rows["invoices/stale.png"].model == "fake-model" and rows["invoices/stale.png"].tokens == 100
    assert rows["invoices/sub/deeper/bad.png"].result_blob == record_names("invoices/sub/deeper/bad.png").error
    assert "7/7 done, 2 failed" in err

    # tables
    assert summary.jsonl_path and summary.csv_path
    lines = [json.loads(x) for x in summary.jsonl_path.read_text().splitlines()]
    assert [x["file"] for x in lines] == [r.file for r in summary.rows]
    assert list(lines[0]) == list(d.COLUMNS)
    with summary.csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7 and set(table[0]) == set(d.COLUMNS)
    assert {x["status"] for x in table} == {"ok", "failed"}
    text = summary.render()
    assert "invalid_image: 1" in text and "tokens 500" in text and str(summary.jsonl_path) in text
    await service.close()


async def test_timeout_leaves_pending_and_exit_2(azurite: str, tmp_path: Path) -> None:
    service, images, results = await _containers(azurite)
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "one.png").write_bytes(_image("PNG", "red"))
    (folder / "two.png").write_bytes(_image("PNG", "blue"))
    prefix = "timeout/"
    # two.png has a stale result already and the worker never gets to it
    stale = {"status": "succeeded", "source": {"sha256": "f" * 64}, "usage": {"total_tokens": 1}}
    await results.upload_blob(record_names(prefix + "two.png").success, json.dumps(stale).encode(), overwrite=True)
    worker = FakeWorker(images, results, prefix, ignore={"two.png"})
    worker_task = asyncio.create_task(worker.run())
    options = d.DropOptions(
        folder=folder,
        prefix=prefix,
        timeout=1.5,
        out=tmp_path / "t.jsonl",
        connection_string=azurite,
        poll_interval=0.2,
    )
    try:
        summary = await d.drop(options)
    finally:
        worker_task.cancel()
    assert summary.exit_code == d.EXIT_PENDING
    assert [r.blob for r in summary.pending] == ["timeout/two.png"]
    assert summary.ok == 1
    assert summary.jsonl_path == tmp_path / "t.jsonl" and summary.csv_path == tmp_path / "t.csv"
    assert "still pending after the timeout (1):\n  pending timeout/two.png" in summary.render()
    await service.close()


def test_cli_no_wait(azurite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cli"
    folder.mkdir()
    (folder / "x.png").write_bytes(_image("PNG", "red"))
    shutil.copy(folder / "x.png", folder / "y.png")
    out = tmp_path / "cli-out"
    code = d.main([str(folder), "--prefix", "cli/", "--no-wait", "--connection-string", azurite, "--out", str(out)])
    assert code == d.EXIT_OK
    stdout = capsys.readouterr().out
    assert "uploaded 2 file(s)" in stdout and "results table:" in stdout
    (jsonl,) = out.glob("*.jsonl")
    assert [json.loads(x)["status"] for x in jsonl.read_text().splitlines()] == ["pending", "pending"]
    assert d.main([str(tmp_path / "missing"), "--connection-string", azurite]) == d.EXIT_ERROR
