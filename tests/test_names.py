"""Blob names from callers and folder files: one name rule, collision-free bounded record names,
manifests and schema blobs budgeted from their properties before anything is downloaded."""

from __future__ import annotations

import hashlib
import io
import itertools
import json

import pytest
from PIL import Image

from shared.app import App
from shared.blob_job import BlobProcessor, InvalidTaskConfig, folders_up
from shared.cache import MemoryLRU, ResultCache
from shared.errors import ImageTooLarge
from shared.model import ModelRouter
from shared.names import MAX_BLOB_NAME, is_safe_name, name_problem
from shared.results import ResultWriter, record_names
from shared.settings import Settings
from tests.blob_fakes import FakeBlobService
from tests.constants import TEST_DEPLOYMENT
from tests.fakes import ScriptedModel

ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}


def png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "PNG")
    return buf.getvalue()


def processor(blobs: FakeBlobService, scripted: ScriptedModel | None = None, **env: str) -> BlobProcessor:
    settings = Settings.from_env({**ENV, **env})
    scripted = scripted or ScriptedModel()
    model = ModelRouter(settings, client_factory=scripted.client_factory())
    return BlobProcessor(App.build(settings, model=model, cache=ResultCache(MemoryLRU(16)), blobs=blobs))


def record(blobs: FakeBlobService, blob: str) -> dict:
    raw = blobs.get("results", blob)
    assert raw is not None, f"no record at results/{blob}; have {sorted(blobs.blobs)}"
    return json.loads(raw)


# --- the name rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.jpg", "folder/sub/x.png", "..a/b..", "a/.hidden", "ünï/çødé.png", "x" * 1024])
def test_safe_names_pass(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "non-empty"),
        (None, "non-empty"),
        (3, "non-empty"),
        ("x" * 1025, "longer than 1024"),
        ("/etc/passwd", "start with /"),
        ("a//b.jpg", "empty path segments"),
        ("folder/", "empty path segments"),
        ("../../cache/x", ". or .."),
        ("a/./b.jpg", ". or .."),
        ("a/..", ". or .."),
        ("a\\..\\b.jpg", "backslash"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("a\x7fb", "control"),
        ("a/" * 254 + "b", "254 path segments"),
    ],
)
def test_unsafe_names_are_refused_without_echoing_them(name: object, says: str) -> None:
    problem = name_problem(name)
    assert problem is not None and says in problem
    assert not (isinstance(name, str) and name and name in problem)


# --- record names ---------------------------------------------------------------------------------

HEX = hashlib.sha256(b"x").hexdigest()
PIECES = ["x", ".error", "~", f".sha256-{HEX}", "/", ".json"]


def tricky_names() -> list[str]:
    """Every name made of up to four pieces that could confuse a suffix scheme, plus long ones."""
    names = {"".join(p) for n in range(1, 5) for p in itertools.product(PIECES, repeat=n)}
    for length in (1000, 1005, 1010, 1011, 1013, 1020, 1024):
        for tail in ("", ".error", ".error~", ".jpg"):
            names.add(("d/" + "n" * length)[: length - len(tail)] + tail)
    names.update({"a/../b.jpg", "../cache/x", "a\\b", "/abs.jpg"})
    return sorted(names)


def test_record_names_never_collide_across_sources_or_kinds() -> None:
    owner: dict[str, tuple[str, str]] = {}
    for name in tricky_names():
        names = record_names(name)
        for kind, blob in (("success", names.success), ("error", names.error), ("attempts", names.attempts)):
            place = ("cache" if kind == "attempts" else "results") + "/" + blob
            assert place not in owner, f"{kind} of {name!r} collides with {owner[place]}"
            owner[place] = (name, kind)


def test_a_blob_named_x_error_does_not_succeed_into_xs_error_record() -> None:
    assert record_names("x").error == "x.error.json"
    assert record_names("x.error").success == "x.error~.json"
    assert record_names("x").success == "x.json" and record_names("photos/a.jpg").error == "photos/a.jpg.error.json"


def test_record_names_are_bounded_safe_blob_names() -> None:
    for name in tricky_names():
        for blob in (record_names(name).success, record_names(name).error, record_names(name).attempts):
            assert len(blob) <= MAX_BLOB_NAME and is_safe_name(blob), (name, blob)


def test_long_names_keep_their_folder_and_end_in_the_full_names_hash() -> None:
    long = "scans/2026/" + "n" * 1005 + ".png"
    names = record_names(long)
    digest = hashlib.sha256(long.encode()).hexdigest()
    assert names.error.startswith("scans/2026/nnn") and names.error.endswith(f".sha256-{digest}.error.json")
    assert len(names.error) == MAX_BLOB_NAME - len("attempts/.json") + len(".error.json")
    assert record_names("a/../b.jpg").success == f".sha256-{hashlib.sha256(b'a/../b.jpg').hexdigest()}.json"


async def test_success_of_x_error_and_failure_of_x_are_two_records() -> None:
    blobs = FakeBlobService()
    writer = ResultWriter(blobs, "results")
    await writer.write_success("x.error", {"status": "succeeded", "source": {"sha256": "s1"}, "job": "j"})
    await writer.write_error("x", {"status": "failed", "source": {"sha256": "s2"}, "job": "j"})
    assert (await writer.existing_for("x.error", "s1", "j", None) or {}).get("status") == "succeeded"
    assert (await writer.existing_for("x", "s2", "j", None) or {}).get("status") == "failed"


async def test_a_source_name_near_the_limit_still_gets_its_record() -> None:
    """Azure refuses names over 1,024 characters: `<1020 chars>.error.json` would fail on every retry."""
    blobs = FakeBlobService()
    name = "d/" + "n" * 1018
    await ResultWriter(blobs, "results").write_error(name, {"status": "failed"})
    assert record(blobs, record_names(name).error)["status"] == "failed"


async def test_a_blob_over_the_limit_gets_a_record_and_a_long_success_too() -> None:
    blobs = FakeBlobService()
    name = "photos/" + "p" * 1010 + ".png"
    blobs.put("images", name, png())
    scripted = ScriptedModel()
    outcome = await processor(blobs, scripted).process(name, png(), '"e1"', {})
    assert outcome.status == "succeeded" and len(scripted.requests) == 1
    assert record(blobs, record_names(name).success)["source"]["name"] == name


async def test_an_unsafe_source_name_is_recorded_once_and_never_walked() -> None:
    blobs = FakeBlobService()
    blobs.put("cache", "_task.json", b'{"task": "ocr"}')  # what `../cache/x.png` would find walking up
    scripted = ScriptedModel()
    outcome = await processor(blobs, scripted).process("../cache/x.png", png(), '"e1"', {})
    assert outcome.status == "failed" and outcome.record["error"]["code"] == "invalid_blob_name"
    assert outcome.record["attempts"] == 1 and not scripted.requests
    assert "cache/_task.json" not in blobs.reads()
    assert record(blobs, record_names("../cache/x.png").error)["error"]["code"] == "invalid_blob_name"


def test_folders_too_long_for_a_task_file_are_not_looked_up() -> None:
    name = "a" * 1014 + "/x.png"
    assert folders_up(name) == [""]


# --- manifests ------------------------------------------------------------------------------------


def manifest(**doc) -> bytes:
    return json.dumps({"task": "compare", **doc}).encode()


@pytest.mark.parametrize(
    "entry", ["../../cache/secret.png", "../other/a.png", "/a.png", "a//b.png", "./a.png", "sub\\..\\..\\x.png"]
)
async def test_manifest_entries_cannot_reach_outside_their_folder(entry: str) -> None:
    blobs = FakeBlobService()
    blobs.put("cache", "secret.png", png())
    blobs.put("images", "other/a.png", png())
    blobs.put("images", "jobs/a.png", png())
    p = processor(blobs)
    with pytest.raises(InvalidTaskConfig) as info:
        await p._manifest("jobs/_manifest.json", manifest(images=["a.png", entry]))
    assert info.value.details["field"] == "images[1]" and entry not in info.value.message
    assert blobs.reads() == [] and blobs.reads("properties") == []


async def test_a_traversing_manifest_gives_an_invalid_task_config_record_on_the_first_attempt() -> None:
    blobs = FakeBlobService()
    blobs.put("cache", "secret.png", png())
    blobs.put("images", "jobs/a.png", png())
    scripted = ScriptedModel()
    data = manifest(images=["a.png", "../../cache/secret.png"])
    outcome = await processor(blobs, scripted).process("jobs/_manifest.json", data, '"e1"', {})
    assert outcome.status == "failed" and outcome.record["error"]["code"] == "invalid_task_config"
    assert outcome.record["attempts"] == 1 and not scripted.requests
    assert "cache/secret.png" not in blobs.reads()


async def test_manifest_list_is_capped_before_anything_is_read() -> None:
    blobs = FakeBlobService()
    p = processor(blobs, MAX_MANIFEST_IMAGES="3")
    with pytest.raises(InvalidTaskConfig) as info:
        await p._manifest("jobs/_manifest.json", manifest(images=[f"{i}.png" for i in range(4)]))
    assert "MAX_MANIFEST_IMAGES (3)" in info.value.message and blobs.calls == []


async def test_a_folder_manifest_stops_listing_past_the_cap() -> None:
    blobs = FakeBlobService()
    for i in range(5):
        blobs.put("images", f"jobs/{i}.png", png())
    p = processor(blobs, MAX_MANIFEST_IMAGES="3")
    with pytest.raises(InvalidTaskConfig, match="MAX_MANIFEST_IMAGES"):
        await p._manifest("jobs/_manifest.json", manifest())
    assert blobs.reads() == []


async def test_manifest_images_are_sized_from_properties_before_download() -> None:
    blobs = FakeBlobService()
    blobs.put("images", "jobs/a.png", png())
    blobs.put("images", "jobs/huge.png", b"\x89PNG" + b"\0" * 5000)
    p = processor(blobs, MAX_IMAGE_BYTES="4000")
    with pytest.raises(ImageTooLarge) as info:
        await p._manifest("jobs/_manifest.json", manifest(images=["a.png", "huge.png"]))
    assert "MAX_IMAGE_BYTES (4000)" in info.value.message and not info.value.transient
    assert blobs.reads() == [] and "images/jobs/huge.png" in blobs.reads("properties")


async def test_manifest_images_together_are_budgeted() -> None:
    blobs = FakeBlobService()
    for i in range(3):
        blobs.put("images", f"jobs/{i}.png", png((i, 0, 0)))
    p = processor(blobs, MAX_MANIFEST_BYTES=str(2 * len(png()) + 10))
    with pytest.raises(ImageTooLarge, match="MAX_MANIFEST_BYTES"):
        await p._manifest("jobs/_manifest.json", manifest())
    assert blobs.reads() == []


async def test_a_good_manifest_still_reads_its_folder_in_name_order() -> None:
    blobs = FakeBlobService()
    blobs.put("images", "jobs/b.png", png((0, 0, 1)))
    blobs.put("images", "jobs/a.png", png((0, 0, 2)))
    blobs.put("images", "jobs/_task.json", b'{"task": "compare"}')
    blobs.put("images", "jobs/sub/c.png", png())
    config, images = await processor(blobs)._manifest("jobs/_manifest.json", manifest())
    assert config.task == "compare" and images == [png((0, 0, 2)), png((0, 0, 1))]


# --- schema blobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["../cache/x", "/abs", "a//b", "a\\b", "x" * 1024])
async def test_schema_names_are_checked_before_any_read(ref: str) -> None:
    blobs = FakeBlobService()
    blobs.put("cache", "x", b'{"type": "object"}')
    with pytest.raises(InvalidTaskConfig) as info:
        await processor(blobs)._schema(ref, "f/_task.json")
    assert info.value.details["field"] == "schema" and ref not in info.value.message
    assert blobs.calls == []


async def test_schema_blob_size_comes_from_its_properties() -> None:
    blobs = FakeBlobService()
    blobs.put("schemas", "big.json", json.dumps({"type": "object", "description": "d" * 5000}).encode())
    blobs.put("schemas", "small", b'{"type": "object"}')
    p = processor(blobs, MAX_SCHEMA_BLOB_BYTES="1000")
    with pytest.raises(InvalidTaskConfig, match=r"MAX_SCHEMA_BLOB_BYTES \(1000\)"):
        await p._schema("big", "f/_task.json")
    assert blobs.reads() == []
    assert await p._schema("small", "f/_task.json") == {"type": "object"}


async def test_deeply_nested_schema_blob_is_invalid_config_not_a_crash() -> None:
    blobs = FakeBlobService()
    blobs.put("schemas", "deep", b"[" * 100_000)
    with pytest.raises(InvalidTaskConfig, match="not valid JSON"):
        await processor(blobs, MAX_SCHEMA_BLOB_BYTES="200000")._schema("deep", "f/_task.json")


# --- poison records -------------------------------------------------------------------------------


async def test_poison_record_of_a_huge_blob_does_not_download_it() -> None:
    blobs = FakeBlobService()
    blobs.put("images", "big/x.png", b"\0" * 5000)
    rec = await processor(blobs, MAX_IMAGE_BYTES="1000").record_poison("big/x.png", '"e1"')
    assert rec["error"]["code"] == "poison" and rec["source"]["size"] == 5000 and rec["source"]["sha256"] == ""
    assert "images/big/x.png" not in blobs.reads()
    assert record(blobs, "big/x.png.error.json")["error"]["code"] == "poison"


async def test_poison_record_of_an_unsafe_name_reads_nothing() -> None:
    blobs = FakeBlobService()
    blobs.put("cache", "x.png", png())
    rec = await processor(blobs).record_poison("../cache/x.png", None)
    assert rec["source"]["size"] == 0 and not any(r.startswith("images/") for r in blobs.reads("properties"))
    assert "cache/x.png" not in blobs.reads()
    assert record(blobs, record_names("../cache/x.png").error)["error"]["code"] == "poison"


def test_name_settings_have_defaults_and_are_read() -> None:
    s = Settings.from_env(ENV)
    assert (s.max_manifest_images, s.max_manifest_bytes, s.max_schema_blob_bytes) == (50, 64 << 20, 256 << 10)
    s = Settings.from_env(
        {**ENV, "MAX_MANIFEST_IMAGES": "7", "MAX_MANIFEST_BYTES": "1000", "MAX_SCHEMA_BLOB_BYTES": "99"}
    )
    assert (s.max_manifest_images, s.max_manifest_bytes, s.max_schema_blob_bytes) == (7, 1000, 99)


# --- the blob trigger -----------------------------------------------------------------------------


async def test_blob_trigger_never_looks_up_an_unsafe_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import azure.functions as func

    import blob_trigger

    blobs = FakeBlobService()
    blobs.put("cache", "x.png", png())
    p = processor(blobs)
    monkeypatch.setattr(blob_trigger, "get_app", lambda: p.app)
    stream = func.blob.InputStream(data=png(), name="images/../cache/x.png", length=len(png()))
    await blob_trigger.main(stream)
    assert blobs.calls and not any(key == "cache/x.png" for _, key in blobs.calls)
    assert record(blobs, record_names("../cache/x.png").error)["error"]["code"] == "invalid_blob_name"


async def test_blob_trigger_records_an_oversized_blob_without_reading_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import azure.functions as func

    import blob_trigger

    blobs = FakeBlobService()
    blobs.put("images", "big.png", b"\0" * 500)
    p = processor(blobs, MAX_IMAGE_BYTES="100")
    monkeypatch.setattr(blob_trigger, "get_app", lambda: p.app)
    stream = func.blob.InputStream(data=b"\0" * 500, name="images/big.png", length=500, blob_properties={"ETag": '"e"'})
    stream.read = lambda *a: pytest.fail("read() of an oversized blob")  # type: ignore[method-assign]
    await blob_trigger.main(stream)
    assert record(blobs, "big.png.error.json")["error"]["code"] == "image_too_large"
