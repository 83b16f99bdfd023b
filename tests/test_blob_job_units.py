"""Pure parts of the blob path: folder walk, task files."""

import pytest

from shared.blob_job import InvalidTaskConfig, _parse_task_file, folders_up, is_control_file


def test_folders_are_walked_nearest_first():
    assert folders_up("a/b/c.jpg") == ["a/b/", "a/", ""]
    assert folders_up("c.jpg") == [""]


def test_control_files():
    assert is_control_file("x/_task.json") and is_control_file("_manifest.json")
    assert not is_control_file("x/task.json")


def test_valid_task_file():
    doc = _parse_task_file(b'{"task": "invoice", "detail": "high", "schema": "inv"}', "a/_task.json")
    assert doc["task"] == "invoice"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{nope", "not valid JSON"),
        (b"[]", '"task" string'),
        (b'{"task": "paint"}', "unknown task"),
        (b'{"task": "ocr", "colour": "red"}', "unknown keys: colour"),
    ],
)
def test_invalid_task_files_say_why(raw, says):
    with pytest.raises(InvalidTaskConfig) as info:
        _parse_task_file(raw, "f/_task.json")
    assert says in info.value.message and "f/_task.json" in info.value.message
    assert info.value.code == "invalid_task_config" and not info.value.transient
