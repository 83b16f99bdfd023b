"""TaskSpec owns every task policy: the README's table agrees with it, and no other module decides by a task's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from shared.errors import InvalidRequest
from shared.image_policy import PAGED_FORMATS, ImagePolicy
from shared.model import ChatRequest, ChatResult
from shared.pipeline import AnalysisRequest, validate_request
from shared.settings import Settings
from shared.tasks import JSON_OBJECT, JSON_SCHEMA, TASKS, TaskInput, run_task, task_spec
from tests.constants import TEST_DEPLOYMENT, TEST_MODEL

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_MODEL": TEST_MODEL,
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}
NOT_AN_IMAGE = b"this is not an image: nothing here can be decoded"
# The product's modules: the shared library and the Functions entry points (not local/, bench/, tests/).
PRODUCT = [ROOT / "shared", *(p.parent for p in ROOT.glob("*/function.json")), ROOT / "openapi_http"]
TASK_NAMES = frozenset(TASKS)


# --- README -----------------------------------------------------------------------------


def _readme_task_table() -> dict[str, dict[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Tasks\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        row = dict(zip(header, cells, strict=False))
        rows[row["task"]] = row
    return rows


def _files(spec_min: int, spec_max: int | None) -> str:
    if spec_max is None:
        return f"{spec_min}-`MAX_IMAGES_PER_REQUEST`"
    return str(spec_min) if spec_min == spec_max else f"{spec_min}-{spec_max}"


def _pages(policy: ImagePolicy) -> str:
    if policy.expand == PAGED_FORMATS:
        return "every page (PDF) and frame (TIFF, GIF, WebP)"
    assert not policy.expand, "a policy that expands some formats needs its own README wording"
    return "the first"


AUTO_DETAIL_WORDS = {"high": "high", "low": "low", "by_size": "low if both sides < 768 px, else high"}


def test_readme_task_table_matches_the_task_specs() -> None:
    table = _readme_task_table()
    assert list(table) == list(TASKS)
    for name, spec in TASKS.items():
        row = table[name]
        assert row["files"] == _files(spec.min_images, spec.max_images), name
        assert row["pages and frames sent"] == _pages(spec.images), name
        assert row["detail when `auto`"] == AUTO_DETAIL_WORDS[spec.images.auto_detail], name
        assert row["default `max_tokens`"] == str(spec.max_tokens), name
        assert row["needs"] == ", ".join(f"`{f}`" for f in spec.requires), name
        assert row["strips"] == ("yes" if spec.strips else "no"), name


def test_readme_names_the_sequence_item_budget() -> None:
    spec = TASKS["sequence"]
    assert f"{spec.item_max_tokens} tokens each" in _readme_task_table()["sequence"]["result"]


# --- nothing outside tasks.py decides by a task's name ----------------------------------


def _task_literals(node: ast.AST) -> list[str]:
    return [
        n.value
        for n in ast.walk(node)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in TASK_NAMES
    ]


def _name_branches(tree: ast.AST) -> list[tuple[int, str]]:
    """Comparisons and `in` checks against task-name literals, `case "ocr":`, and literal collections
    or dict keys naming two or more tasks (a task registry of one's own)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for name in _task_literals(ast.Tuple(elts=[node.left, *node.comparators], ctx=ast.Load())):
                found.append((node.lineno, f"compares with {name!r}"))
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, f"matches {name!r}") for name in _task_literals(node)]
        elif isinstance(node, ast.Set | ast.List | ast.Tuple | ast.Dict):
            elts = node.keys if isinstance(node, ast.Dict) else node.elts
            names = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in TASK_NAMES]
            if len(names) >= 2:
                found.append((node.lineno, f"lists tasks {names}"))
    return found


def test_no_module_outside_tasks_branches_on_a_task_name() -> None:
    offenders = []
    for root in PRODUCT:
        for path in sorted(root.rglob("*.py")):
            if path == ROOT / "shared" / "tasks.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            offenders += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in _name_branches(tree)]
    assert offenders == []


def test_the_name_check_catches_the_forms_it_names() -> None:
    code = (
        'if task == "describe": pass\n'
        "if job.task in DOCUMENT: pass\n"
        'DOCUMENT = frozenset({"ocr", "invoice"})\n'
        'expand = name in ("ocr",)\n'
        'match task:\n    case "sequence": pass\n'
    )
    found = _name_branches(ast.parse(code))
    assert sorted(line for line, _ in found) == [1, 3, 4, 6]


def test_the_task_a_field_implies_comes_from_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from shared.options import OptionLimits, parse_options

    def parse(fields: dict[str, Any]) -> str:
        return parse_options(
            fields, source="http", default_task="ocr", default_detail="auto", limits=OptionLimits()
        ).task

    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}}'
    implied = [name for name, spec in TASKS.items() if spec.implied_by == "schema"]
    assert [parse({"schema": schema})] == implied and parse({"prompt": "x"}) == "ocr"
    # the spec decides: a table whose schema task implies nothing falls back to the default
    without = {n: dataclasses.replace(s, implied_by=None) for n, s in TASKS.items()}
    monkeypatch.setattr("shared.tasks.TASKS", without)
    assert parse({"schema": schema}) == "ocr"


# --- checks before any image is decoded -------------------------------------------------


@pytest.mark.parametrize("name", [n for n, s in TASKS.items() if s.requires])
def test_required_fields_are_refused_before_any_image_is_decoded(name: str) -> None:
    spec = TASKS[name]
    req = AnalysisRequest(images=[NOT_AN_IMAGE] * spec.min_images, task=name)
    with pytest.raises(InvalidRequest) as info:
        validate_request(req, Settings.from_env(ENV))
    assert info.value.details["field"] == spec.requires[0]


@pytest.mark.parametrize("name", [n for n, s in TASKS.items() if not s.strips])
def test_strips_are_refused_for_tasks_that_look_at_whole_images(name: str) -> None:
    spec = TASKS[name]
    fields: dict[str, Any] = {"labels": ["a", "b"]} if "labels" in spec.requires else {}
    req = AnalysisRequest(images=[NOT_AN_IMAGE] * spec.min_images, task=name, strips=True, **fields)
    with pytest.raises(InvalidRequest) as info:
        validate_request(req, Settings.from_env(ENV))
    assert info.value.details["field"] == "strips"


def test_image_limits_come_from_the_spec() -> None:
    assert TASKS["compare"].image_limit(4) == 4  # MAX_IMAGES_PER_REQUEST caps compare ...
    assert TASKS["sequence"].image_limit(4) == 50  # ... but not sequence
    assert TASKS["ocr"].image_limit(7) == 7
    settings = Settings.from_env({**ENV, "MAX_IMAGES_PER_REQUEST": "3"})
    with pytest.raises(InvalidRequest) as info:
        validate_request(AnalysisRequest(images=[NOT_AN_IMAGE] * 4, task="compare"), settings)
    assert info.value.details["max"] == 3
    assert validate_request(AnalysisRequest(images=[NOT_AN_IMAGE] * 4, task="sequence"), settings) is None


def test_validate_request_returns_the_strict_schema_it_checked() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    strict = validate_request(
        AnalysisRequest(images=[NOT_AN_IMAGE], task="schema", schema=schema), Settings.from_env(ENV)
    )
    assert strict.original == schema
    assert strict.schema["additionalProperties"] is False and strict.schema["required"] == ["n"]


def test_unknown_task_is_a_400() -> None:
    with pytest.raises(InvalidRequest):
        task_spec("summarise")


# --- the response format and its fallback ------------------------------------------------


class Recorder:
    """A ChatBackend that records requests and answers with a fixed content."""

    def __init__(self, content: str) -> None:
        self.content = content
        self.requests: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        return ChatResult(self.content, "stop", 10, 5, TEST_DEPLOYMENT, TEST_DEPLOYMENT)


@pytest.mark.parametrize("name", [n for n, s in TASKS.items() if s.structured and n != "sequence"])
async def test_structured_requests_carry_the_specs_fallback(name: str) -> None:
    from shared import schemas, task_schemas

    spec = TASKS[name]
    assert (spec.response_format, spec.fallback_format) == (JSON_SCHEMA, JSON_OBJECT)
    caller = schemas.to_strict({"type": "object", "properties": {"label": {"type": "string"}}})
    model = Recorder('{"label": "a", "confidence": 0.5}')
    inp = TaskInput(task=name, images=[], labels=["a", "b"], schema=caller)
    try:
        await run_task(inp, model)
    except Exception:  # the canned answer fits classify only; the request is what is checked
        pass
    first = model.requests[0]
    assert first.response_format is not None and first.response_format["type"] == JSON_SCHEMA
    assert first.fallback is not None and first.fallback.response_format == {"type": JSON_OBJECT}
    strict_sent = first.response_format["json_schema"]["schema"]
    fallback_prompt = first.fallback.messages[1]["content"][0]["text"]
    assert task_schemas.json_object_instructions(strict_sent) in fallback_prompt


async def test_text_tasks_use_the_specs_prompt_label_and_budget() -> None:
    model = Recorder("two pictures")
    await run_task(TaskInput(task="compare", images=[]), model)
    [request] = model.requests
    spec = TASKS["compare"]
    assert request.messages[1]["content"][0]["text"] == spec.prompt
    assert request.max_tokens == spec.max_tokens and request.response_format is None


def test_every_task_has_a_runner_and_consistent_fields() -> None:
    from shared.tasks import RUNNERS

    assert set(RUNNERS) == set(TASKS)
    for spec in TASKS.values():
        assert (spec.response_format is None) == (spec.fallback_format is None), spec.name
        assert spec.structured or spec.prompt, f"{spec.name}: a text task needs a default prompt"
        assert re.fullmatch(r"[a-z]+", spec.name)
        assert spec.waits_for_manifest == (spec.min_images > 1), spec.name
