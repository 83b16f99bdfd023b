"""Shared fixtures. Integration fixtures start the real local stand-ins on free ports:
Azurite, the local model server and the local Functions host (driven by the real function.json files)."""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local.model_admin import ModelAdmin

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


def corpus(*parts: str) -> Path:
    path = CORPUS.joinpath(*parts)
    assert path.exists(), f"missing corpus file {path}: the corpus lives in ../shared/corpus"
    return path


def make_stack(tmp: Path, *, model_args: list[str], host_args: list[str] | None = None, **values: str):
    from local.procs import free_port
    from local.stack import EXAMPLE, Stack, StackConfig

    base = json.loads(EXAMPLE.read_text())["Values"]
    base.update({"LOCAL_FUNCTION_KEY": secrets.token_urlsafe(16), **values})
    ports = {name: free_port() for name in ("host", "blob", "queue", "model")}
    config = StackConfig(
        root=ROOT,
        data_dir=tmp,
        host_port=ports["host"],
        blob_port=ports["blob"],
        queue_port=ports["queue"],
        model_port=ports["model"],
        values=base,
        model_args=model_args,
        host_args=host_args or [],
    )
    return Stack(config).start()


def wait_handled(stack, names: list[str], timeout_s: float = 120) -> None:
    """Until the host has run the function to the end for the current version of every blob: its
    receipt for that ETag exists (local/host_blob.py writes it after the function returns)."""
    from azure.storage.blob import BlobServiceClient

    from local.host_blob import RECEIPTS_CONTAINER, RECEIPTS_DIRECTORY, quoted_etag

    service = BlobServiceClient.from_connection_string(stack.connection_string)
    images = service.get_container_client("images")
    hosts = service.get_container_client(RECEIPTS_CONTAINER)
    # a receipt is blobreceipts/<host id>/<function id>/<quoted etag>/<container>/<blob name>
    wanted = {f"{quoted_etag(images.get_blob_client(n).get_blob_properties().etag)}/images/{n}" for n in names}
    deadline = time.monotonic() + timeout_s
    while True:
        listing = hosts.list_blob_names(name_starts_with=RECEIPTS_DIRECTORY + "/")  # names only: cheap to poll
        receipts = {name.split("/", 3)[-1] for name in listing}
        missing = sorted(wanted - receipts)
        if not missing:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the host did not finish {len(missing)} blobs within {timeout_s} s, e.g. {missing[:3]}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The stack as `make run` starts it, with real OCR, on free ports."""
    s = make_stack(
        tmp_path_factory.mktemp("stack"),
        model_args=["--mode", "ocr"],
        host_args=["--poll-interval", "0.2", "--retry-base-delay", "0.05"],
        MAX_IMAGE_BYTES=str(8 * 1024 * 1024),
        TASK_CONFIG_TTL_S="0.5",  # tests change folder configs and re-drop at once
    )
    yield s
    s.stop()


@pytest.fixture
def model_admin(stack) -> ModelAdmin:
    """Per test: a model server restarted by an earlier test (test_hostile) has a new admin token."""
    return stack.model_admin()


@pytest.fixture
def facts_only(model_admin):
    """The session stack's stand-in answers from each image's measured facts, without OCR, for a test that
    reads no text (OCR is most of the suite's CPU); images are still decoded on both sides. Restored after."""
    was = model_admin.call("/admin/config")["config"]
    model_admin.config(mode="facts")
    yield
    model_admin.config(mode=was["mode"], latency_ms=was["latency_ms"])


# --- layers: what needs a server or OCR is `integration`; the fast layer starts nothing --------------

# Fixtures that start a server or load OCR. A test that uses one (directly or through another fixture)
# is marked `integration` here, so a new test cannot slip into the fast layer by forgetting a marker.
SERVER_FIXTURES = frozenset(
    {"stack", "model_admin", "azurite", "host", "server", "ocr_engine", "models_stack", "soak_stack"}
)
_GUARD = pytest.StashKey[tuple[set[int], int, int]]()


def wholly_integration(path: Path) -> bool:
    """Modules that are integration as a whole, by name; `make test-fast` does not even import them
    (their imports, schemathesis and the stand-ins, cost more than the fast layer's budget)."""
    return path.name.endswith("_integration.py") or path.name in {"test_soak.py", "test_hostile.py", "test_outbound.py"}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    fast = config.option.markexpr.replace(" ", "") == "notintegration"
    return True if fast and wholly_integration(collection_path) else None


@pytest.hookimpl(tryfirst=True)  # before -m deselects, and before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("soak") or SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if wholly_integration(item.path) and not item.get_closest_marker("integration"):
            raise pytest.UsageError(
                f"{item.nodeid}: make test-fast skips this module, so every test in it is integration"
            )
        if (
            _uses_module_fixture(item)
            and not item.get_closest_marker("xdist_group")
            and not item.get_closest_marker("spread")
        ):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    # Longest first: under xdist the run cannot end with one worker still in a long test while the others idle.
    items.sort(key=_minutes, reverse=True)


# --- running in parallel ---------------------------------------------------------------------------
# `make test` runs on pytest-xdist workers with `--dist loadgroup`. Each worker is a session of its own:
# it starts its own `stack` the first time a test asks for it. A module whose tests share a fixture of
# module scope (a private stack, a server) is one unit of work (an `xdist_group` named after the module),
# so that fixture starts once, on one worker, and its tests run in file order (unless the module is
# marked `spread`: its module fixtures start nothing, so its tests may run on every worker). Other
# tests go to whichever worker is free.


def _minutes(item: pytest.Item) -> float:
    """`long(minutes)`: roughly how long the test runs (1 when not said); 0 for every other test."""
    mark = item.get_closest_marker("long")
    return 0.0 if mark is None else float(mark.args[0] if mark.args else 1)


def _uses_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(d.scope in ("module", "package", "class") for defs in info.name2fixturedefs.values() for d in defs)


def _children() -> set[int]:
    """PIDs of this process's live children (from /proc; no extra dependency)."""
    me = str(os.getpid())
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[1].decode() == me and fields[0] != b"Z":  # state, ppid
            out.add(int(entry))
    return out


_spawned: list[list[str]] = []  # argv of every child process started in this session
_ocr_loads = [0]


def _record_spawns() -> None:
    """Wrap Popen once (asyncio's subprocesses go through it too) so the guard sees every spawn."""
    if getattr(subprocess.Popen._execute_child, "_recorded", False):
        return
    platform.processor()  # runs `uname -p` once and caches it (the openai SDK asks on its first request)
    original = subprocess.Popen._execute_child

    def execute_child(self, args, *rest, **kwargs):
        _spawned.append([str(a) for a in args] if isinstance(args, list | tuple) else [str(args)])
        return original(self, args, *rest, **kwargs)

    execute_child._recorded = True  # type: ignore[attr-defined]
    subprocess.Popen._execute_child = execute_child  # type: ignore[method-assign]


def _count_ocr_loads() -> None:
    """Wrap OcrEngine.load once so the guard can see whether a test loaded RapidOCR."""
    module = sys.modules.get("local.ocr_engine")
    if module is None or getattr(module.OcrEngine.load, "_counted", False):
        return
    original = module.OcrEngine.load

    def load(self, *args, **kwargs):
        _ocr_loads[0] += 1
        return original(self, *args, **kwargs)

    load._counted = True  # type: ignore[attr-defined]
    module.OcrEngine.load = load


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if not item.get_closest_marker("integration"):
        _record_spawns()
        _count_ocr_loads()
        ocr_loads = _ocr_loads[0] + ("rapidocr_onnxruntime" not in sys.modules)  # an import counts as a load
        item.stash[_GUARD] = (_children(), len(_spawned), ocr_loads)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """The fast layer's guard. A test outside `integration` fails when it (or its fixtures):
    loads RapidOCR; starts a process without the `subprocess` marker; or leaves a child running."""
    result = yield
    before = item.stash.get(_GUARD, None)
    if before is not None:
        children, spawns, loads = before
        if _ocr_loads[0] + ("rapidocr_onnxruntime" not in sys.modules) != loads:
            pytest.fail("this test loads RapidOCR: mark it integration", False)
        started = _spawned[spawns:]
        if started and not item.get_closest_marker("subprocess"):
            pytest.fail(f"this test starts a process ({started[0][:3]}...): mark it integration or subprocess", False)
        alive = _children() - children
        if alive:
            pytest.fail(f"this test leaves child processes {sorted(alive)} running: mark it integration", False)
    return result
