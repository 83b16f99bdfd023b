"""The blob path end to end: drop folders into Azurite, the local host runs blob_trigger,
every image ends with exactly one result or error record, redeliveries cost nothing."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

from shared.results import record_names
from tests.conftest import corpus, wait_handled

pytestmark = pytest.mark.integration
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".heic", ".heif", ".webp", ".gif", ".bmp", ".pdf"}


def service(stack) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(stack.connection_string)


def records(stack, prefix: str) -> dict[str, dict]:
    """results/<prefix>... -> {blob name of the source: record}."""
    results = service(stack).get_container_client("results")
    out = {}
    if not results.exists():  # created by the first record written
        return out
    for blob in results.list_blobs(name_starts_with=prefix):
        doc = json.loads(results.download_blob(blob.name).readall())
        out[blob.name] = doc
    return out


def record_count(stack, prefix: str) -> int:
    """How many records exist under `prefix` (names only: polling downloads nothing)."""
    results = service(stack).get_container_client("results")
    return sum(1 for _ in results.list_blob_names(name_starts_with=prefix)) if results.exists() else 0


def wait_for(stack, names: list[str], prefix: str, timeout_s: float = 240) -> dict[str, dict]:
    """Every record under `prefix` once each of `names` has one; polls names, downloads once at the end."""
    results = service(stack).get_container_client("results")
    deadline = time.monotonic() + timeout_s
    while True:
        have = set(results.list_blob_names(name_starts_with=prefix)) if results.exists() else set()
        missing = [n for n in names if record_names(n).success not in have and record_names(n).error not in have]
        if not missing:
            return records(stack, prefix)
        if time.monotonic() > deadline:
            pytest.fail(f"no record within {timeout_s} s for {len(missing)} blobs, e.g. {missing[:5]}")
        time.sleep(0.5)


def upload(stack, name: str, data: bytes) -> None:
    container = service(stack).get_container_client("images")
    if not container.exists():
        container.create_container()
    container.upload_blob(name, data, overwrite=True)


def drop_folder(stack, folder: Path, prefix: str, **options) -> list[str]:
    from local.drop import DropOptions, drop

    summary = asyncio.run(
        drop(
            DropOptions(
                folder=folder,
                prefix=prefix,
                wait=False,
                out=None,
                connection_string=stack.connection_string,
                **options,
            ),
            say=lambda *_: None,
        )
    )
    return [row.blob for row in summary.rows]


@pytest.mark.long
def test_drop_photos_and_orientations_every_blob_gets_one_record(stack, model_admin, facts_only):
    names = drop_folder(stack, corpus("photos"), "batch/photos/")
    names += drop_folder(stack, corpus("orientation"), "batch/orientation/")
    assert len(names) >= 25
    upload(stack, "batch/notes.txt", b"this is not an image\n")
    upload(stack, "batch/broken/truncated.jpg", corpus("broken", "truncated_3648x2736.jpg").read_bytes())
    all_names = [*names, "batch/notes.txt", "batch/broken/truncated.jpg"]
    got = wait_for(stack, all_names, "batch/")

    for name in names:
        assert record_names(name).success in got, (name, got.get(record_names(name).error))
        assert record_names(name).error not in got
        rec = got[record_names(name).success]
        assert rec["status"] == "succeeded" and rec["source"]["name"] == name
        assert len(rec["source"]["sha256"]) == 64 and rec["source"]["size"] > 0 and rec["source"]["etag"]
        assert rec["task"] == "describe" and rec["model"] and rec["deployment"] == stack.values["VLM_DEPLOYMENT"]
        assert rec["usage"]["total_tokens"] > 0 or rec["cached"]
        assert {"cost_usd", "attempts", "processed_at"} <= set(rec)
    text = got[record_names("batch/notes.txt").error]
    assert text["status"] == "failed" and text["error"]["code"] == "unsupported_media_type"
    assert record_names("batch/notes.txt").success not in got
    # The corpus' truncated JPEG lacks only its last 24 of 2736 rows: the product decodes what is
    # there (shared/images.py, MIN_TRUNCATED_FRACTION) and describes it, so one result and no error.
    truncated = record_names("batch/broken/truncated.jpg")
    assert truncated.error not in got, got.get(truncated.error)
    assert got[truncated.success]["status"] == "succeeded"

    # the same files again: the recorded sha256 matches, so no model call at all
    before = model_admin.requests()
    again = drop_folder(stack, corpus("photos"), "batch/photos/")
    upload(stack, "batch/notes.txt", b"this is not an image\n")
    wait_handled(stack, [*again, "batch/notes.txt"])  # the function has run for every new version
    after = records(stack, "batch/")
    assert model_admin.requests() == before
    assert {k: v["processed_at"] for k, v in after.items()} == {k: v["processed_at"] for k, v in got.items()}


def test_a_blob_over_the_size_limit_gets_an_error_record_without_being_read(stack):
    upload(stack, "big/huge.jpg", b"\xff\xd8\xff\xe0" + bytes(9 * 1024 * 1024))  # the test stack allows 8 MiB
    got = wait_for(stack, ["big/huge.jpg"], "big/")
    err = got[record_names("big/huge.jpg").error]
    assert err["error"]["code"] == "image_too_large" and err["source"]["size"] > 8 * 1024 * 1024


def test_same_image_in_another_folder_is_served_from_the_cache(stack, model_admin):
    data = corpus("photos", "gps_tagged_640x480.jpg").read_bytes()
    upload(stack, "dupes/a/one.jpg", data)
    got = wait_for(stack, ["dupes/a/one.jpg"], "dupes/")
    before = model_admin.requests()
    upload(stack, "dupes/b/two.jpg", data)
    got = wait_for(stack, ["dupes/b/two.jpg"], "dupes/")
    assert got[record_names("dupes/b/two.jpg").success]["cached"] is True
    assert model_admin.requests() == before


def test_task_json_configures_a_folder_and_is_never_analysed(stack):
    upload(stack, "folder-ocr/_task.json", json.dumps({"task": "ocr"}).encode())
    upload(stack, "folder-ocr/sub/receipt.png", corpus("documents", "oyo.png").read_bytes())
    got = wait_for(stack, ["folder-ocr/sub/receipt.png"], "folder-ocr/")
    rec = got[record_names("folder-ocr/sub/receipt.png").success]
    assert rec["task"] == "ocr" and "OYO" in rec["result"].upper()
    assert rec["task_config"] == "folder-ocr/_task.json"
    assert not any(k.startswith("folder-ocr/_task.json") for k in got)


def test_invalid_task_json_gives_each_file_an_error_record(stack):
    upload(stack, "badcfg/_task.json", b'{"task": "paint"}')
    img = corpus("photos", "gps_tagged_640x480.jpg").read_bytes()
    upload(stack, "badcfg/x.jpg", img)
    upload(stack, "badcfg/y.jpg", img[:-10] + b"0123456789")
    got = wait_for(stack, ["badcfg/x.jpg", "badcfg/y.jpg"], "badcfg/")
    for name in ("badcfg/x.jpg", "badcfg/y.jpg"):
        err = got[record_names(name).error]["error"]
        assert err["code"] == "invalid_task_config" and "paint" in err["message"]


def test_names_from_folders_stay_in_their_folder_and_records_never_collide(stack, model_admin):
    """x.error succeeding and x failing are two records; a manifest reaching into the cache
    container is an invalid_task_config on the first attempt with no model call."""
    img = corpus("photos", "gps_tagged_640x480.jpg").read_bytes()
    upload(stack, "names/x", b"not an image at all")
    upload(stack, "names/x.error", img)
    got = wait_for(stack, ["names/x", "names/x.error"], "names/")
    assert got[record_names("names/x").error]["error"]["code"] == "unsupported_media_type"
    assert got[record_names("names/x.error").success]["status"] == "succeeded"

    before = model_admin.requests()
    upload(stack, "names/job/_task.json", json.dumps({"task": "compare"}).encode())
    upload(stack, "names/job/a.jpg", img)
    upload(stack, "names/job/_manifest.json", json.dumps({"images": ["a.jpg", "../../../cache/x"]}).encode())
    rec = wait_for(stack, ["names/job/_manifest.json"], "names/job/")[record_names("names/job/_manifest.json").error]
    assert rec["error"]["code"] == "invalid_task_config" and rec["error"]["details"]["field"] == "images[1]"
    assert rec["attempts"] == 1 and model_admin.requests() == before


def _synthetic_images(n: int, seed: int, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for i in range(n):
        im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(im)
        for _ in range(12):
            x, y = rng.randrange(size[0] - 40), rng.randrange(size[1] - 40)
            draw.rectangle([x, y, x + 40, y + 40], fill=tuple(rng.randrange(256) for _ in range(3)))
        draw.text((20, 20), f"IMAGE {seed}-{i}", fill=(0, 0, 0))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@pytest.mark.long
def test_host_restart_mid_drop_loses_nothing_and_recomputes_little(stack, model_admin, facts_only):
    # 30 images, the host restarted once 8 have records: some finished, up to 4 in flight, most still ahead
    images = _synthetic_images(30, seed=7, size=(320, 240))
    names = [f"restart/img{i:02d}.png" for i in range(len(images))]
    model_admin.config(latency_ms=300)  # ~2.5 s for the drop at 4 in parallel: a restart lands mid-drop, no CPU
    before = model_admin.requests()
    for name, data in zip(names, images, strict=True):
        upload(stack, name, data)
    deadline = time.monotonic() + 120
    while (done_before_restart := record_count(stack, "restart/")) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 8 <= done_before_restart < len(names) - 4, f"{done_before_restart} records: the restart was not mid-drop"
    stack.restart_host()
    got = wait_for(stack, names, "restart/")
    for name in names:
        kinds = [k for k in got if k in (record_names(name).success, record_names(name).error)]
        assert kinds == [record_names(name).success], (name, kinds)
    in_flight_bound = 4  # host.json extensions.blobs.maxDegreeOfParallelism
    assert model_admin.requests() - before <= len(images) + in_flight_bound


def test_a_blob_failing_transiently_five_times_is_poisoned_and_recorded(stack, model_admin):
    model_admin.faults(rates={"503": 1.0}, match="POISON-PROBE", retry_after_ms=10)
    try:
        upload(stack, "poison/_task.json", json.dumps({"task": "describe", "prompt": "POISON-PROBE"}).encode())
        upload(stack, "poison/doomed.jpg", corpus("photos", "rgb_436x547.tiff").read_bytes())
        upload(stack, "flowing/fine.jpg", _synthetic_images(1, seed=99)[0])
        got = wait_for(stack, ["flowing/fine.jpg"], "flowing/")
        assert got[record_names("flowing/fine.jpg").success]["status"] == "succeeded"
        got = wait_for(stack, ["poison/doomed.jpg"], "poison/", timeout_s=120)
    finally:
        model_admin.faults(rates={})
        # five failed calls opened the host's circuit for the deployment (VLM_BREAKER_COOLDOWN_S, 30 s): a fresh
        # host, so the next test on this stack (whichever runs next under xdist) does not start against it
        stack.restart_host()
    err = got[record_names("poison/doomed.jpg").error]
    assert record_names("poison/doomed.jpg").success not in got
    assert err["error"]["code"] == "poison"
    assert err["attempts"] == 5
    assert err["error"]["details"]["last_error"]["code"] == "upstream_unavailable"
    assert err["source"]["name"] == "poison/doomed.jpg" and len(err["source"]["sha256"]) == 64


def test_a_changed_task_json_makes_the_same_file_new_work(stack, model_admin):
    png = corpus("documents", "oyo.png").read_bytes()
    upload(stack, "retask/_task.json", json.dumps({"task": "describe"}).encode())
    upload(stack, "retask/r.png", png)
    got = wait_for(stack, ["retask/r.png"], "retask/")
    assert record_names("retask/r.png").success in got, got.get(record_names("retask/r.png").error)
    first = got[record_names("retask/r.png").success]
    assert first["task"] == "describe"
    upload(stack, "retask/_task.json", json.dumps({"task": "ocr"}).encode())
    time.sleep(1)  # past the folder-config TTL the test stack sets
    upload(stack, "retask/r.png", png)
    deadline = time.monotonic() + 60
    while records(stack, "retask/")[record_names("retask/r.png").success]["task"] != "ocr":
        assert time.monotonic() < deadline, "the re-dropped file was not re-analysed with the new task"
        time.sleep(0.3)


def test_blob_metadata_names_the_task_when_no_folder_config_does(stack):
    container = service(stack).get_container_client("images")
    container.upload_blob(
        "meta/receipt.png", corpus("documents", "oyo.png").read_bytes(), overwrite=True, metadata={"task": "ocr"}
    )
    rec = wait_for(stack, ["meta/receipt.png"], "meta/")[record_names("meta/receipt.png").success]
    assert rec["task"] == "ocr" and rec["task_config"] == "metadata" and "OYO" in rec["result"].upper()
