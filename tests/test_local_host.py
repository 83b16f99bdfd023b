"""The local Functions host against a real Azurite, with toy function folders built in a temp dir.

Checks the host's own semantics (not the project's functions): HTTP routes, methods, keys and
concurrency; blob triggers with receipts, change detection, restart, retries, poison messages
and maxDegreeOfParallelism; queue triggers with poison queues; settings loading; the CLI.
Retry backoff is configured to 0, so nothing waits for a real delay.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob.aio import BlobServiceClient
from azure.storage.queue.aio import QueueServiceClient

from local import azurite as azurite_mod
from local import procs
from local.host import HostOptions, LocalHost
from local.host_blob import (
    POISON_QUEUE,
    RECEIPTS_CONTAINER,
    BlobPathPattern,
    RetryPolicy,
    encode_message,
    poison_message,
    receipt_blob_name,
)
from local.host_config import apply_settings, load_host_json, parse_timespan, resolve_setting_refs
from local.host_http import compile_route

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-" + uuid.uuid4().hex[:8]
CONTAINER = "toys"
JOBS_QUEUE = "toy-jobs"
POLL_S = 0.1


# --- toy function app -------------------------------------------------------------------------

HOST_JSON = {
    "version": "2.0",
    "extensions": {
        "blobs": {"maxDegreeOfParallelism": 2, "poisonBlobThreshold": 5},
        "queues": {"maxDequeueCount": 5},
    },
    "functionTimeout": "00:01:00",
}

TOYS: dict[str, tuple[dict[str, Any], str]] = {
    "secure_post": (
        {
            "bindings": [
                {
                    "authLevel": "function",
                    "type": "httpTrigger",
                    "direction": "in",
                    "name": "req",
                    "methods": ["post"],
                    "route": "echo/{id?}",
                },
                {"type": "http", "direction": "out", "name": "$return"},
            ]
        },
        """
        import asyncio, json
        import azure.functions as func

        _arrived: dict[str, int] = {}

        async def main(req: func.HttpRequest) -> func.HttpResponse:
            meet = req.params.get("meet")
            if meet:  # wait (up to 10 s) until `n` requests with this tag are in here at the same time
                _arrived[meet] = _arrived.get(meet, 0) + 1
                for _ in range(1000):
                    if _arrived[meet] >= int(req.params["n"]):
                        break
                    await asyncio.sleep(0.01)
                return func.HttpResponse(json.dumps({"met": _arrived[meet] >= int(req.params["n"])}))
            doc = {
                "method": req.method,
                "body": req.get_body().decode(),
                "route_params": dict(req.route_params),
                "params": dict(req.params),
                "x_test": req.headers.get("x-test"),
                "url": req.url,
                "type": type(req).__module__ + "." + type(req).__name__,
            }
            return func.HttpResponse(json.dumps(doc), mimetype="application/json", headers={"x-toy": "1"})
        """,
    ),
    "public_get": (
        {
            "bindings": [
                {
                    "authLevel": "anonymous",
                    "type": "httpTrigger",
                    "direction": "in",
                    "name": "req",
                    "methods": ["get"],
                    "route": "hello",
                },
                {"type": "http", "direction": "out", "name": "$return"},
            ]
        },
        """
        import os, threading
        import azure.functions as func

        _barriers: dict[str, threading.Barrier] = {}
        _lock = threading.Lock()

        def main(req: func.HttpRequest) -> func.HttpResponse:  # sync on purpose: runs in a thread
            meet = req.params.get("meet")
            if meet:  # `n` threads must be in here at the same time, else the barrier breaks after 10 s
                with _lock:
                    barrier = _barriers.setdefault(meet, threading.Barrier(int(req.params["n"]), timeout=10))
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    return func.HttpResponse("not met")
                return func.HttpResponse("met")
            return func.HttpResponse("hello " + os.environ.get("TOY_GREETING", "?") + " from " + threading.current_thread().name)
        """,
    ),
    "boom": (
        {
            "bindings": [
                {"authLevel": "anonymous", "type": "httpTrigger", "direction": "in", "name": "req", "methods": ["get"]},
                {"type": "http", "direction": "out", "name": "$return"},
            ]
        },
        """
        def main(req):
            raise RuntimeError("secret detail that must not leak")
        """,
    ),
    "blob_record": (
        {
            "bindings": [
                {
                    "name": "blob",
                    "type": "blobTrigger",
                    "direction": "in",
                    "path": "%TOY_CONTAINER%/{name}",
                    "source": "EventGrid",
                    "connection": "ToyStorage",
                }
            ]
        },
        """
        import asyncio, json, os
        import azure.functions as func

        _active = 0

        async def main(blob: func.InputStream, context: func.Context) -> None:
            global _active
            data = blob.read()
            rec = {
                "name": blob.name, "length": blob.length, "data": data.decode(errors="replace"),
                "uri": blob.uri, "etag": blob.blob_properties.get("ETag"),
                "props_length": blob.blob_properties.get("ContentLength"),
                "last_modified": blob.blob_properties.get("LastModified"),
                "metadata": blob.metadata, "invocation_id": context.invocation_id,
                "function_name": context.function_name,
            }
            short = blob.name.split("/", 1)[1]
            if "/slow/" in "/" + short:
                _active += 1
                try:
                    rec["active"] = _active
                    await asyncio.sleep(0.25)
                finally:
                    _active -= 1
            with open(os.path.join(os.environ["CALLS_DIR"], "blob.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\\n")
            if "/fail/" in "/" + short:
                raise RuntimeError("this blob always fails")
        """,
    ),
    "poison_watch": (
        {
            "bindings": [
                {
                    "name": "msg",
                    "type": "queueTrigger",
                    "direction": "in",
                    "queueName": "webjobs-blobtrigger-poison",
                    "connection": "ToyStorage",
                }
            ]
        },
        """
        import json, os
        import azure.functions as func

        def main(msg: func.QueueMessage) -> None:
            rec = {"body": json.loads(msg.get_body()), "dequeue_count": msg.dequeue_count, "id": msg.id}
            with open(os.path.join(os.environ["CALLS_DIR"], "poison.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\\n")
        """,
    ),
    "queue_flaky": (
        {
            "bindings": [
                {
                    "name": "msg",
                    "type": "queueTrigger",
                    "direction": "in",
                    "queueName": "%TOY_QUEUE%",
                    "connection": "ToyStorage",
                }
            ]
        },
        """
        import json, os
        import azure.functions as func

        async def main(msg: func.QueueMessage) -> None:
            body = msg.get_body().decode()
            with open(os.path.join(os.environ["CALLS_DIR"], "queue.jsonl"), "a") as f:
                f.write(json.dumps({"body": body, "dequeue_count": msg.dequeue_count}) + "\\n")
            if body.startswith("always-fail"):
                raise ValueError("queue message always fails")
        """,
    ),
}


def build_app(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "host.json").write_text(json.dumps(HOST_JSON))
    for name, (function_json, code) in TOYS.items():
        folder = root / name
        folder.mkdir()
        (folder / "function.json").write_text(json.dumps(function_json))
        (folder / "__init__.py").write_text(textwrap.dedent(code).lstrip())
    # Not a function: no function.json.
    (root / "helpers").mkdir()
    (root / "helpers" / "__init__.py").write_text("")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[azurite_mod.Azurite]:
    try:
        azurite_mod.azurite_binary()
    except procs.ProcessError as e:
        pytest.skip(str(e))
    location = tmp_path_factory.mktemp("azurite")
    az = azurite_mod.start_azurite(location, blob_port=procs.free_port(), queue_port=procs.free_port(), in_memory=True)
    try:
        yield az
    finally:
        az.stop()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("app") / "toyapp"
    build_app(root)
    calls = tmp_path_factory.mktemp("calls")
    return root, calls


@pytest.fixture(scope="module")
def values(azurite: azurite_mod.Azurite, app: tuple[Path, Path]) -> dict[str, str]:
    return {
        "ToyStorage": azurite.connection_string,
        "TOY_CONTAINER": CONTAINER,
        "TOY_QUEUE": JOBS_QUEUE,
        "TOY_GREETING": "world",
        "CALLS_DIR": str(app[1]),
        "LOCAL_FUNCTION_KEY": KEY,
    }


def make_host(app: tuple[Path, Path], values: dict[str, str], **opts: Any) -> LocalHost:
    options = HostOptions(port=0, poll_interval_s=POLL_S, retry_base_delay_s=0.0, shutdown_grace_s=2.0, **opts)
    return LocalHost(app[0], settings_path=None, values=values, options=options)


@pytest_asyncio.fixture(scope="module")
async def host(app: tuple[Path, Path], values: dict[str, str]) -> AsyncIterator[LocalHost]:
    h = make_host(app, values)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


@pytest_asyncio.fixture(scope="module")
async def blob_service(azurite: azurite_mod.Azurite) -> AsyncIterator[BlobServiceClient]:
    """The toy app's container exists before any test drops into it, as a deployment's does. The host
    creates it on its first poll too, but a test that ran first (and stopped that host) raced it."""
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as svc:
        try:
            await svc.create_container(CONTAINER)
        except ResourceExistsError:
            pass
        yield svc


@pytest_asyncio.fixture(scope="module")
async def queue_service(azurite: azurite_mod.Azurite) -> AsyncIterator[QueueServiceClient]:
    async with QueueServiceClient.from_connection_string(azurite.connection_string) as svc:
        yield svc


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def blob_calls(app: tuple[Path, Path], prefix: str) -> list[dict[str, Any]]:
    return [c for c in read_jsonl(app[1] / "blob.jsonl") if c["name"].startswith(f"{CONTAINER}/{prefix}")]


async def host_caught_up(svc: BlobServiceClient, app: tuple[Path, Path]) -> None:
    """The positive control for "nothing more happens": two sentinel blobs, the second dropped only
    after the first was handled, so a whole poll has run after everything the test did before."""
    for _ in range(2):
        prefix = f"sentinel-{uuid.uuid4().hex[:6]}/"
        await upload(svc, prefix + "s.txt", b"s")
        await wait_until(lambda p=prefix: blob_calls(app, p), what="a sentinel blob")


async def upload(svc: BlobServiceClient, name: str, data: bytes, **kw: Any) -> str:
    result = await svc.get_blob_client(CONTAINER, name).upload_blob(data, overwrite=True, **kw)
    return str(result["etag"])


# --- pure units -----------------------------------------------------------------------------------


def test_route_templates() -> None:
    r = compile_route("api", "echo/{id?}")
    assert r.match("/api/echo") and r.match("/api/echo/42").group("id") == "42"
    assert r.match("/API/Echo/")  # case-insensitive, trailing slash ok
    assert not r.match("/api/echo/1/2")
    assert compile_route("api", "items/{n:int}").match("/api/items/7")
    assert not compile_route("api", "items/{n:int}").match("/api/items/x")
    assert compile_route("api", "files/{*rest}").match("/api/files/a/b/c").group("rest") == "a/b/c"
    assert compile_route("", "root").match("/root")


def test_blob_path_pattern_and_formats() -> None:
    p = BlobPathPattern.parse("images/{name}")
    assert (p.container, p.prefix) == ("images", "")
    assert p.match("a/b/c.jpg") == {"name": "a/b/c.jpg"}
    q = BlobPathPattern.parse("in/scans/{folder}/{name}.pdf")
    assert q.prefix == "scans/"
    assert q.match("scans/x/y.pdf") == {"folder": "x", "name": "y"}
    assert q.match("scans/x/y.jpg") is None
    assert receipt_blob_name("h1", "Host.Functions.f", "0x8D", "images", "a/b.jpg") == (
        'blobreceipts/h1/Host.Functions.f/"0x8D"/images/a/b.jpg'
    )
    msg = poison_message("Host.Functions.f", "images", "a/b.jpg", '"0x8D"')
    assert json.loads(msg) == {
        "Type": "BlobTrigger",
        "FunctionId": "Host.Functions.f",
        "BlobType": "BlockBlob",
        "ContainerName": "images",
        "BlobName": "a/b.jpg",
        "ETag": '"0x8D"',
    }
    assert base64.b64decode(encode_message(msg)).decode() == msg
    assert [RetryPolicy(1.0, 5.0).delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert RetryPolicy(0.0).delay(3) == 0.0


def test_settings_and_host_json(tmp_path: Path) -> None:
    env = {"KEEP": "from-env"}
    skipped = apply_settings({"KEEP": "from-file", "NEW": "x"}, env)
    assert skipped == ["KEEP"] and env == {"KEEP": "from-env", "NEW": "x"}
    assert resolve_setting_refs("%A%/{name}", {"A": "images"}) == "images/{name}"
    with pytest.raises(ValueError, match="MISSING"):
        resolve_setting_refs("%MISSING%/{name}", {})
    assert parse_timespan("00:10:00") == 600 and parse_timespan("1.00:00:01") == 86401 and parse_timespan("-1") is None
    hj = load_host_json(ROOT)  # the project's own host.json
    assert hj.max_degree_of_parallelism == 4 and hj.poison_blob_threshold == 5 and hj.route_prefix == "api"
    assert load_host_json(tmp_path).max_degree_of_parallelism == 8  # the default when absent


# --- HTTP -----------------------------------------------------------------------------------------


async def raw_status_line(url: str, request: bytes) -> bytes:
    """Send bytes aiohttp's client would refuse to send (a header that is not UTF-8); the status line."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return line


async def test_status(host: LocalHost, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{host.url}/admin/host/status", headers={"x-functions-key": KEY}) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["state"] == "Running" and doc["id"] == host.host_id
    async with http.get(f"{host.url}/admin/host/status?code={KEY}") as r:
        assert r.status == 200


async def test_status_needs_the_key(host: LocalHost, http: aiohttp.ClientSession) -> None:
    for headers in ({}, {"x-functions-key": "wrong"}):
        async with http.get(f"{host.url}/admin/host/status", headers=headers) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
            assert "Running" not in await r.text()


@pytest.mark.parametrize("line", [b"GET /admin/host/status", b"POST /api/echo/42"])
async def test_a_key_that_is_not_utf8_is_401_not_500(host: LocalHost, line: bytes) -> None:
    request = (
        line
        + b" HTTP/1.1\r\nContent-Length: 0\r\nHost: x\r\nx-functions-key: \xff\xfe\x80k\r\nConnection: close\r\n\r\n"
    )
    assert (await raw_status_line(host.url, request)).split()[1] == b"401"


async def test_http_keys_and_methods(host: LocalHost, http: aiohttp.ClientSession) -> None:
    url = f"{host.url}/api/echo/42?x=1"
    async with http.post(url, data=b"hi") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "unauthorized"
    async with http.post(url, data=b"hi", headers={"x-functions-key": "wrong"}) as r:
        assert r.status == 401
    async with http.post(url, data=b"hi", headers={"x-functions-key": KEY, "x-test": "t"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json" and r.headers["x-toy"] == "1"
        doc = await r.json()
    assert doc["method"] == "POST" and doc["body"] == "hi" and doc["x_test"] == "t"
    assert doc["route_params"] == {"id": "42"} and doc["params"] == {"x": "1"}
    assert doc["type"].startswith("azure.functions") and doc["url"].endswith("/api/echo/42?x=1")
    async with http.post(f"{host.url}/api/echo?code={KEY}", data=b"") as r:
        assert r.status == 200
        assert (await r.json())["route_params"] == {}
    async with http.get(f"{host.url}/api/echo", headers={"x-functions-key": KEY}) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST"
    async with http.get(f"{host.url}/api/hello") as r:  # anonymous: no key needed
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert (await r.text()).startswith("hello world from func")
    async with http.get(f"{host.url}/api/nothing-here") as r:
        assert r.status == 404


async def test_http_unhandled_exception_is_500_json(host: LocalHost, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{host.url}/api/boom") as r:
        assert r.status == 500
        doc = await r.json()
    assert doc["error"]["code"] == "internal_error"
    assert "secret detail" not in json.dumps(doc)


async def test_http_requests_run_concurrently(host: LocalHost, http: aiohttp.ClientSession) -> None:
    """Two async and two sync requests must be inside their functions at the same time: each pair
    waits for the other (a rendezvous that gives up after 10 s), so serial handling answers 'not met'."""
    tag = uuid.uuid4().hex[:8]

    async def meet_async() -> bool:
        url = f"{host.url}/api/echo?meet=a{tag}&n=2"
        async with http.post(url, headers={"x-functions-key": KEY}) as r:
            return bool((await r.json(content_type=None))["met"])

    async def meet_sync() -> str:
        async with http.get(f"{host.url}/api/hello?meet=s{tag}&n=2") as r:
            return await r.text()

    met = await asyncio.gather(meet_async(), meet_async(), meet_sync(), meet_sync())
    assert met == [True, True, "met", "met"]


# --- blob trigger ---------------------------------------------------------------------------------


async def test_blob_once_then_again_on_change(
    host: LocalHost, app: tuple[Path, Path], blob_service: BlobServiceClient
) -> None:
    prefix = f"once-{uuid.uuid4().hex[:6]}/"
    etag1 = await upload(blob_service, prefix + "a.txt", b"first", metadata={"task": "ocr"})
    calls = await wait_until(lambda: blob_calls(app, prefix), what="first invocation")
    await host_caught_up(blob_service, app)  # polls after it: no second call for the same version
    calls = blob_calls(app, prefix)
    assert len(calls) == 1
    c = calls[0]
    assert c["name"] == f"{CONTAINER}/{prefix}a.txt" and c["data"] == "first" and c["length"] == 5
    assert c["etag"] == etag1 and c["props_length"] == 5 and c["last_modified"]
    assert c["metadata"] == {"task": "ocr"} and c["function_name"] == "blob_record"
    assert c["uri"].endswith(f"/{CONTAINER}/{prefix}a.txt")
    receipt = receipt_blob_name(host.host_id, "Host.Functions.blob_record", etag1, CONTAINER, prefix + "a.txt")
    assert await blob_service.get_blob_client(RECEIPTS_CONTAINER, receipt).exists()

    etag2 = await upload(blob_service, prefix + "a.txt", b"second")
    assert etag2 != etag1
    await wait_until(lambda: len(blob_calls(app, prefix)) == 2, what="invocation for the new version")
    assert blob_calls(app, prefix)[1]["data"] == "second"


async def test_restart_skips_receipted_blobs(
    host: LocalHost, app: tuple[Path, Path], values: dict[str, str], blob_service: BlobServiceClient
) -> None:
    prefix = f"restart-{uuid.uuid4().hex[:6]}/"
    await host.stop()
    try:
        first = make_host(app, values)  # same root, so the same host id (and receipts) as `host`
        async with first:
            await upload(blob_service, prefix + "one.txt", b"1")
            await upload(blob_service, prefix + "two.txt", b"2")
            await wait_until(lambda: len(blob_calls(app, prefix)) == 2, what="both blobs")
        await upload(blob_service, prefix + "three.txt", b"3")  # dropped while no host runs
    finally:
        await host.start()  # "restarted"
    await wait_until(lambda: len(blob_calls(app, prefix)) == 3, what="the blob dropped while down")
    await host_caught_up(blob_service, app)
    names = sorted(c["name"].rsplit("/", 1)[-1] for c in blob_calls(app, prefix))
    assert names == ["one.txt", "three.txt", "two.txt"]  # nothing done twice, nothing left behind


async def test_failing_blob_goes_to_poison_queue(
    host: LocalHost, app: tuple[Path, Path], blob_service: BlobServiceClient
) -> None:
    prefix = f"fail/{uuid.uuid4().hex[:6]}/"
    name = prefix + "bad.txt"
    etag = await upload(blob_service, name, b"bad")

    def poisoned() -> list[dict[str, Any]]:
        return [p for p in read_jsonl(app[1] / "poison.jsonl") if p["body"]["BlobName"] == name]

    got = await wait_until(poisoned, what="poison message seen by the queue trigger")
    assert got[0]["body"] == {
        "Type": "BlobTrigger",
        "FunctionId": "Host.Functions.blob_record",
        "BlobType": "BlockBlob",
        "ContainerName": CONTAINER,
        "BlobName": name,
        "ETag": etag,
    }
    assert got[0]["dequeue_count"] == 1
    assert len(blob_calls(app, prefix)) == 5  # poisonBlobThreshold attempts, then no more
    receipt = receipt_blob_name(host.host_id, "Host.Functions.blob_record", etag, CONTAINER, name)
    assert await blob_service.get_blob_client(RECEIPTS_CONTAINER, receipt).exists()
    await host_caught_up(blob_service, app)
    assert len(blob_calls(app, prefix)) == 5 and len(poisoned()) == 1


async def test_poison_message_on_the_wire_is_base64(
    host: LocalHost,
    app: tuple[Path, Path],
    values: dict[str, str],
    blob_service: BlobServiceClient,
    queue_service: QueueServiceClient,
) -> None:
    # Only the blob function runs (the module's host, whose queue trigger would consume the
    # message, is paused), so the poison message stays in the queue to be read raw.
    prefix = f"fail/wire-{uuid.uuid4().hex[:6]}/"
    name = prefix + "x.txt"
    queue = queue_service.get_queue_client(POISON_QUEUE)

    async def find() -> dict[str, Any] | None:
        try:
            messages = await queue.peek_messages(max_messages=32)
        except ResourceNotFoundError:
            return None
        for m in messages:
            doc = json.loads(base64.b64decode(m.content, validate=True))
            if doc["BlobName"] == name:
                return doc
        return None

    await host.stop()
    try:
        only_blob = make_host(app, values, functions=("blob_record",))
        async with only_blob:
            etag = await upload(blob_service, name, b"x")
            await wait_until(lambda: len(blob_calls(app, prefix)) == 5, what="five attempts")
            deadline = time.monotonic() + 10
            doc = await find()
            while doc is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                doc = await find()
    finally:
        await host.start()
    assert doc is not None and doc["ETag"] == etag and doc["Type"] == "BlobTrigger"


async def test_max_degree_of_parallelism(
    host: LocalHost, app: tuple[Path, Path], blob_service: BlobServiceClient
) -> None:
    prefix = f"slow/{uuid.uuid4().hex[:6]}/"
    await asyncio.gather(*(upload(blob_service, f"{prefix}{i}.txt", b"s") for i in range(6)))
    await wait_until(lambda: len(blob_calls(app, prefix)) == 6, what="six slow blobs")
    peak = max(c["active"] for c in blob_calls(app, prefix))
    assert peak == 2  # host.json maxDegreeOfParallelism: used, and never exceeded


# --- queue trigger --------------------------------------------------------------------------------


async def test_queue_trigger_retries_then_poison(
    host: LocalHost, app: tuple[Path, Path], queue_service: QueueServiceClient
) -> None:
    tag = uuid.uuid4().hex[:6]
    queue = queue_service.get_queue_client(JOBS_QUEUE)
    await queue.send_message(encode_message(f"ok-{tag}"))
    await queue.send_message(encode_message(f"always-fail-{tag}"))

    def calls(body: str) -> list[dict[str, Any]]:
        return [c for c in read_jsonl(app[1] / "queue.jsonl") if c["body"] == body]

    await wait_until(lambda: len(calls(f"always-fail-{tag}")) == 5, what="five attempts")
    assert [c["dequeue_count"] for c in calls(f"always-fail-{tag}")] == [1, 2, 3, 4, 5]
    assert len(calls(f"ok-{tag}")) == 1
    poison = queue_service.get_queue_client(JOBS_QUEUE + "-poison")

    async def in_poison() -> bool:
        try:
            messages = await poison.peek_messages(max_messages=32)
        except ResourceNotFoundError:  # created by the host when it moves the first message
            return False
        for m in messages:
            if base64.b64decode(m.content).decode() == f"always-fail-{tag}":
                return True
        return False

    deadline = time.monotonic() + 10
    while not await in_poison():
        assert time.monotonic() < deadline, "message never reached the poison queue"
        await asyncio.sleep(0.05)


# --- settings file and the CLI ----------------------------------------------------------------------


async def test_settings_file_env_wins_and_restored(
    app: tuple[Path, Path], values: dict[str, str], tmp_path: Path
) -> None:
    settings = tmp_path / "local.settings.json"
    file_values = {**values, "TOY_GREETING": "from-file", "TOY_ONLY_IN_FILE": "1"}
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": file_values}))
    env: dict[str, str] = {"TOY_GREETING": "from-env"}
    h = LocalHost(app[0], settings_path=settings, options=HostOptions(port=0, functions=("public_get",)), environ=env)
    await h.start()
    try:
        assert env["TOY_GREETING"] == "from-env" and env["TOY_ONLY_IN_FILE"] == "1"
    finally:
        await h.stop()
    assert env == {"TOY_GREETING": "from-env"}


async def test_cli_subprocess(app: tuple[Path, Path], values: dict[str, str], tmp_path: Path) -> None:
    settings = tmp_path / "cli.settings.json"
    settings.write_text(json.dumps({"Values": values}))
    port = procs.free_port()
    env = {k: v for k, v in os.environ.items() if k not in values}
    proc = procs.start_process(
        [
            sys.executable,
            "-m",
            "local.host",
            "--root",
            str(app[0]),
            "--port",
            str(port),
            "--settings",
            str(settings),
            "--functions",
            "secure_post",
            "public_get",
        ],
        name="local-host",
        log_path=tmp_path / "host.log",
        cwd=ROOT,
        env=env,
    )
    try:
        await asyncio.to_thread(
            procs.wait_for_http,
            f"http://127.0.0.1:{port}/admin/host/status",
            timeout_s=30,
            proc=proc,
            headers={"x-functions-key": KEY},
        )
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/api/echo", headers={"x-functions-key": KEY}) as r:
                assert r.status == 200
    finally:
        code = await asyncio.to_thread(proc.stop, 10.0)
    assert code == 0, proc.tail()  # it stopped on SIGTERM by itself: a SIGKILL after the grace would be -9
    log = proc.tail(200)
    assert "Executed 'Functions.secure_post' (Succeeded" in log and "Host stopped" in log


@pytest.mark.subprocess
def test_procs_errors_carry_the_log_tail(tmp_path: Path) -> None:
    proc = procs.start_process(
        [sys.executable, "-c", "print('about to fail', flush=True); raise SystemExit(3)"],
        name="dies",
        log_path=tmp_path / "dies.log",
    )
    with pytest.raises(procs.ProcessError, match="about to fail"):
        procs.wait_for_http(f"http://127.0.0.1:{procs.free_port()}/", timeout_s=10, proc=proc)
    assert proc.stop() == 3


async def test_broken_function_is_reported_and_others_run(tmp_path: Path) -> None:
    root = tmp_path / "brokenapp"
    build_app(root)
    (root / "boom" / "__init__.py").write_text("import no_such_module_anywhere\n")
    options = HostOptions(port=0, functions=("public_get", "boom", "blob_record"))
    env: dict[str, str] = {"LOCAL_FUNCTION_KEY": KEY}  # blob_record's %TOY_CONTAINER% is not set: also in error
    async with LocalHost(root, settings_path=None, options=options, environ=env) as h, aiohttp.ClientSession() as s:
        async with s.get(f"{h.url}/admin/host/status", headers={"x-functions-key": KEY}) as r:
            doc = await r.json()
        assert doc["state"] == "Running" and doc["functions"] == ["public_get"]
        errors = " | ".join(doc["errors"])
        assert "no_such_module_anywhere" in errors and "TOY_CONTAINER" in errors
        async with s.get(f"{h.url}/api/hello") as r:
            assert r.status == 200
    with pytest.raises(ValueError, match="no_such_module_anywhere"):
        strict = HostOptions(port=0, strict=True, functions=("boom",))
        await LocalHost(root, settings_path=None, options=strict, environ={}).start()
