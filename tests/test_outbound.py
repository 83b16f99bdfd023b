"""Nothing outside the model endpoint and storage is ever contacted (issue 10, SSRF).

A listener on a free port records every connection while schemas whose `$ref`s name it (and
`file:///etc/passwd`) are processed: posted over HTTP, named from a folder's `_task.json` as a blob
in the schemas container, and inline in a `_task.json`. Zero connections are allowed. The listener
accepts and never answers, the worst case for a client, so a fetch shows up even if it then hangs.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests import hostile_inputs as h

pytestmark = pytest.mark.integration
ANSWER_TIMEOUT_S = 15.0  # a fetch that hangs on the listener must not hang the test too
RECORD_TIMEOUT_S = 30.0


@pytest.fixture
def listener():
    with h.SilentListener() as listener:
        yield listener


def _blob_service(stack):
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(stack.connection_string)


def _upload(stack, container: str, name: str, data: bytes) -> None:
    client = _blob_service(stack).get_container_client(container)
    if not client.exists():
        client.create_container()
    client.upload_blob(name, data, overwrite=True)


def _wait_for_records(stack, folders: list[str]) -> None:
    """Until each folder has a record (or the timeout: the assertion is about connections)."""
    results = _blob_service(stack).get_container_client("results")
    deadline = time.monotonic() + RECORD_TIMEOUT_S
    waiting = list(folders)
    while waiting and time.monotonic() < deadline:
        if results.exists():
            waiting = [f for f in waiting if not any(True for _ in results.list_blobs(name_starts_with=f))]
        time.sleep(0.3)


def test_hostile_schemas_over_http_contact_nothing(stack, listener):
    statuses = {}
    for name, schema in h.ssrf_schemas(listener.url).items():
        body = json.dumps({"images": [{"data": h._b64_png()}], "task": "schema", "schema": schema})
        try:
            statuses[name] = h.send(stack.host_url, stack.function_key, h.json_body(body), ANSWER_TIMEOUT_S).status
        except TimeoutError:
            statuses[name] = "timeout"
    time.sleep(0.5)  # a connection attempt in flight lands before we look
    assert listener.connections == [], f"the host connected out: {listener.connections} (statuses {statuses})"


def test_hostile_schemas_from_the_schemas_container_and_task_json_contact_nothing(stack, listener):
    schemas = h.ssrf_schemas(listener.url)
    base = f"outbound/{uuid.uuid4().hex[:8]}/"
    named = {}
    for name, schema in schemas.items():
        _upload(stack, "schemas", f"outbound-{name}.json", json.dumps(schema).encode())
        named[f"{base}named-{name}/"] = {"task": "schema", "schema": f"outbound-{name}"}
    inline = {f"{base}inline-{name}/": {"task": "schema", "schema": schema} for name, schema in schemas.items()}
    for folder, task in {**named, **inline}.items():
        _upload(stack, "images", folder + "_task.json", json.dumps(task).encode())
        _upload(stack, "images", folder + "doc.png", h.normal_png())
    _wait_for_records(stack, [*named, *inline])
    time.sleep(0.5)
    assert listener.connections == [], f"the host connected out: {listener.connections}"
