"""The blob path without servers: folder walk, task files, and process() over in-memory storage."""

import json
import logging
from collections import defaultdict

import pytest
from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError

from shared.app import App
from shared.blob_job import BlobProcessor, InvalidTaskConfig, _parse_task_file, folders_up, is_control_file
from shared.cache import MemoryLRU, ResultCache
from shared.model import ModelRouter
from shared.settings import Settings
from tests.constants import TEST_DEPLOYMENT
from tests.fakes import ScriptedModel


def test_folders_are_walked_nearest_first():
    assert folders_up("a/b/c.jpg") == ["a/b/", "a/", ""]
    assert folders_up("c.jpg") == [""]


def test_control_files():
    assert is_control_file("x/_task.json") and is_control_file("_manifest.json")
    assert not is_control_file("x/task.json")


def test_valid_task_file():
    doc = _parse_task_file(b'{"task": " Invoice ", "detail": "high", "schema": "inv"}', "a/_task.json")
    assert doc["task"] == "invoice"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{nope", "not valid JSON"),
        (b"[]", '"task" string'),
        (b'{"task": "paint"}', "unknown task"),
        (b'{"task": "ocr", "colour": "red"}', "unknown keys: colour"),
        (b"[" * 100_000, "nested deeper than"),
        (b'{"task": "ocr", "max_tokens": 1e400}', "number out of range"),
        (b'{"task": "ocr", "max_tokens": "lots"}', "max_tokens must be an integer"),
        (b'{"task": "ocr", "pages": 3}', "pages must be a string"),
    ],
)
def test_invalid_task_files_say_why(raw, says):
    with pytest.raises(InvalidTaskConfig) as info:
        _parse_task_file(raw, "f/_task.json")
    assert says in info.value.message and "f/_task.json" in info.value.message
    assert info.value.code == "invalid_task_config" and not info.value.transient


# --- process() with in-memory storage: folder config errors and error classification -------

ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}


class _Downloader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def readall(self) -> bytes:
        return self.data


class _Container:
    def __init__(self, store: dict[str, bytes]) -> None:
        self.store = store

    async def download_blob(self, name: str) -> _Downloader:
        if name not in self.store:
            raise ResourceNotFoundError("not found")
        return _Downloader(self.store[name])

    async def upload_blob(self, name: str, data: bytes, overwrite: bool = False, **_) -> None:
        self.store[name] = data

    async def delete_blob(self, name: str) -> None:
        if self.store.pop(name, None) is None:
            raise ResourceNotFoundError("not found")


class MemoryBlobs:
    """The few container operations the blob path uses, over dicts."""

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, bytes]] = defaultdict(dict)

    async def container(self, name: str) -> _Container:
        return _Container(self.containers[name])

    def record(self, name: str) -> dict:
        return json.loads(self.containers["results"][name])


def processor(files: dict[str, bytes] | None = None) -> tuple[BlobProcessor, MemoryBlobs, ScriptedModel]:
    settings = Settings.from_env(ENV)
    scripted, blobs = ScriptedModel(), MemoryBlobs()
    blobs.containers["images"].update(files or {})
    model = ModelRouter(settings, client_factory=scripted.client_factory())
    deps = App.build(settings, model=model, cache=ResultCache(MemoryLRU(4)), blobs=blobs)
    return BlobProcessor(deps), blobs, scripted


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"task": "ocr", "max_tokens": "lots"}, "max_tokens"),
        ({"task": "ocr", "pages": 3}, "pages"),
        ({"task": "ocr", "strips": "sometimes"}, "strips"),
        ({"task": "ocr", "prompt": ["x"]}, "prompt"),
    ],
)
async def test_a_wrongly_typed_task_file_is_an_invalid_task_config_record_on_the_first_attempt(config, field):
    proc, blobs, scripted = processor({"f/_task.json": json.dumps(config).encode()})
    outcome = await proc.process("f/a.jpg", b"\xff\xd8\xff", "etag1", None)
    assert outcome.status == "failed"
    error = blobs.record("f/a.jpg.error.json")["error"]
    assert error["code"] == "invalid_task_config" and error["details"]["field"] == field
    assert error["details"]["task_file"] == "f/_task.json" and "f/_task.json" in error["message"]
    assert scripted.requests == [] and blobs.record("f/a.jpg.error.json")["attempts"] == 1


async def test_bad_metadata_is_an_invalid_task_config_record_naming_metadata():
    proc, blobs, scripted = processor()
    await proc.process("a.jpg", b"\xff\xd8\xff", "e", {"Task": "ocr", "max_tokens": "1e400"})
    error = blobs.record("a.jpg.error.json")["error"]
    assert error["code"] == "invalid_task_config" and error["details"] == {
        "field": "max_tokens",
        "limit": 16384,
        "source": "metadata",
    }
    assert scripted.requests == []


async def test_metadata_strips_on_means_true_as_over_http(monkeypatch):
    seen = []

    async def fake_analyze(req, deps):
        seen.append(req)
        raise RuntimeError("stop here")

    monkeypatch.setattr("shared.blob_job.analyze", fake_analyze)
    proc, _, _ = processor()
    await proc.process("a.jpg", b"\xff\xd8\xff", "e", {"task": "ocr", "strips": "on", "reasoning_effort": "low"})
    assert seen[0].strips is True and seen[0].reasoning_effort == "low"


async def test_an_unexpected_error_is_a_permanent_internal_error_record_with_a_logged_id(monkeypatch, caplog):
    async def broken(req, deps):
        raise ValueError("invalid literal for int() with base 10: 'lots'")

    monkeypatch.setattr("shared.blob_job.analyze", broken)
    caplog.set_level(logging.ERROR, logger="shared.blob_job")
    proc, blobs, _ = processor()
    outcome = await proc.process("a.jpg", b"\xff\xd8\xff", "e", None)
    assert outcome.status == "failed"
    error = blobs.record("a.jpg.error.json")["error"]
    assert error["code"] == "internal_error" and "invalid literal" not in json.dumps(error)
    assert error["details"]["error_id"] in caplog.text and "invalid literal" in caplog.text
    assert not any(k.startswith("attempts/") for k in blobs.containers["cache"])


@pytest.mark.parametrize(
    "exc", [ServiceRequestError("connection reset"), ConnectionResetError("reset"), TimeoutError()]
)
async def test_storage_and_network_errors_stay_transient(monkeypatch, exc):
    async def flaky(req, deps):
        raise exc

    monkeypatch.setattr("shared.blob_job.analyze", flaky)
    proc, blobs, _ = processor()
    with pytest.raises(type(exc)):
        await proc.process("a.jpg", b"\xff\xd8\xff", "e", None)
    noted = json.loads(blobs.containers["cache"]["attempts/a.jpg.json"])
    assert noted["failures"] == 1 and noted["last_error"]["code"] == "transient_error"
    assert "a.jpg.error.json" not in blobs.containers["results"]
