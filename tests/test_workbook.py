"""Offline checks of the Azure Monitor workbook and alert rules (issue 14 part 4) against the names the
code emits (shared/telemetry_names.py).

The workbook JSON and the alert KQL live in infra/monitoring/ and are loaded by
infra/modules/monitoring-workbook.bicep. Each query is read as KQL text: the table it starts from,
the metric or span names it filters on (`name == "..."`, `name in (...)`), the attributes it reads
(`customDimensions["..."]`) and the values it compares them with. Every one must be a name defined
in shared/telemetry_names.py, and an attribute must be one that metric or span carries; otherwise
the tile would stay empty in Azure and nobody would notice. The typo tests show the check bites.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import telemetry_names as tn
from tests.test_infra import get, modules, parse_file, resources, string_value, syntax_problems, text

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MONITORING = INFRA / "monitoring"
WORKBOOK = MONITORING / "workbook.json"
ALERTS = {"throttling": MONITORING / "alert-throttling.kql", "poison": MONITORING / "alert-poison.kql"}
MODULE = INFRA / "modules" / "monitoring-workbook.bicep"
NAMES_PY = ROOT / "shared" / "telemetry_names.py"

TABLES = {"customMetrics", "dependencies", "requests"}
# Values a query may compare an attribute with (only attributes with a closed set of values).
KNOWN_VALUES: dict[str, tuple[str, ...]] = {
    tn.VLM_TOKEN_KIND: tn.TOKEN_KINDS,
    tn.VLM_OUTCOME: tn.OUTCOMES,
    tn.VLM_ENTRY: (tn.ENTRY_HTTP, tn.ENTRY_BLOB),
    tn.GEN_AI_OPERATION_NAME: (tn.GEN_AI_OPERATION_CHAT,),
}
# Bicep fills these in (monitoring-workbook.bicep); values as its defaults.
PLACEHOLDERS = {"__MIN_MODEL_CALLS__": "20", "__MAX_THROTTLED_SHARE__": "0.2"}

_DIM = re.compile(r"""customDimensions\[\s*["']([^"']+)["']\s*\]""")
_NAME_EQ = re.compile(r"""\bname\s*==\s*["']([^"']+)["']""")
_NAME_IN = re.compile(r"""\bname\s+in\s*\(([^)]*)\)""")
_STRING = re.compile(r"""["']([^"'\n]*)["']""")
_EXTEND_DIM = re.compile(r"""\b(\w+)\s*=\s*tostring\(\s*customDimensions\[\s*["']([^"']+)["']\s*\]\s*\)""")
_DIRECT_CMP = re.compile(r"""tostring\(\s*customDimensions\[\s*["']([^"']+)["']\s*\]\s*\)\s*==\s*["']([^"']*)["']""")
_TELEMETRY_NAME = re.compile(r"^(vlm|gen_ai)\.[a-z0-9_.]+$")


# --------------------------------------------------------------------------- the checker


def strip_comments(kql: str) -> str:
    return re.sub(r"^\s*//.*$", "", kql, flags=re.M)


def check_query(kql: str) -> list[str]:
    """Every problem with the names one query uses (empty: all of them are names the code emits)."""
    kql = strip_comments(kql)
    problems: list[str] = []
    first = re.match(r"\s*(\w+)", kql)
    table = first.group(1) if first else ""
    if table not in TABLES:
        return [f"query starts from {table!r}, not one of {sorted(TABLES)}"]
    if re.search(r"customDimensions\.", kql):
        problems.append('dotted names cannot be read as customDimensions.x: use customDimensions["..."]')

    compared = _NAME_EQ.findall(kql)
    for group in _NAME_IN.findall(kql):
        compared += _STRING.findall(group)
    dims = _DIM.findall(kql)
    allowed: set[str] = set()
    if table == "customMetrics":
        if not compared:
            problems.append("a customMetrics query must filter on metric names")
        for metric in compared:
            if metric in tn.METRICS:
                allowed |= set(tn.METRICS[metric].attributes)
            else:
                problems.append(f"unknown metric {metric!r}")
    else:
        chat = any(a == tn.GEN_AI_OPERATION_NAME for a, _ in _DIRECT_CMP.findall(kql))
        if not compared and not chat:
            problems.append(f"a {table} query must filter on span names or gen_ai.operation.name")
        for span in compared:
            if span in tn.SPAN_ATTRIBUTES:
                allowed |= set(tn.SPAN_ATTRIBUTES[span])
            else:
                problems.append(f"unknown span {span!r}")
        if chat:
            allowed |= set(tn.MODEL_CALL_ATTRIBUTES)
    for dim in dims:
        if dim not in tn.ALL_ATTRIBUTES:
            problems.append(f"unknown attribute {dim!r}")
        elif dim not in allowed:
            problems.append(f"attribute {dim!r} is not recorded on {sorted(compared) or 'gen_ai chat spans'}")

    # Values compared with attributes that have a closed set of values.
    columns = dict(_EXTEND_DIM.findall(kql))
    comparisons = list(_DIRECT_CMP.findall(kql))
    for column, attribute in columns.items():
        comparisons += [(attribute, v) for v in re.findall(rf"""\b{column}\s*==\s*["']([^"']*)["']""", kql)]
    for attribute, value in comparisons:
        if attribute in KNOWN_VALUES and value not in KNOWN_VALUES[attribute]:
            problems.append(f"{attribute} is never {value!r} (one of {KNOWN_VALUES[attribute]})")

    # Anything that looks like one of our names must be one.
    known = set(tn.METRICS) | tn.SPAN_NAMES | tn.ALL_ATTRIBUTES
    for literal in _STRING.findall(kql):
        if _TELEMETRY_NAME.match(literal) and literal not in known:
            problems.append(f"{literal!r} is not a name in shared/telemetry_names.py")
    return sorted(set(problems))


def workbook_queries(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(item name, content) of every query item, also inside groups."""
    for item in doc.get("items", []):
        if item.get("type") == 3:
            yield item.get("name", "?"), item["content"]
        elif item.get("type") == 12:
            yield from workbook_queries(item.get("content", {}))


def workbook() -> dict[str, Any]:
    return json.loads(WORKBOOK.read_text(encoding="utf-8"))


def alert_query(path: Path) -> str:
    query = path.read_text(encoding="utf-8")
    for placeholder, value in PLACEHOLDERS.items():
        query = query.replace(placeholder, value)
    return query


def all_queries(workbook_text: str | None = None) -> dict[str, str]:
    doc = json.loads(workbook_text) if workbook_text is not None else workbook()
    found = {f"workbook:{name}": content["query"] for name, content in workbook_queries(doc)}
    found.update({f"alert:{name}": alert_query(path) for name, path in ALERTS.items()})
    return found


# --------------------------------------------------------------------------- the workbook and the alerts


def test_workbook_is_a_workbook_over_application_insights() -> None:
    doc = workbook()
    assert doc["version"] == "Notebook/1.0"
    assert doc["fallbackResourceIds"] == []  # portable: Bicep adds the component's id
    assert "/subscriptions/" not in WORKBOOK.read_text()
    names = [item.get("name") for item in doc["items"]]
    assert len(names) == len(set(names)), "workbook item names must be unique"
    params = [p for item in doc["items"] if item["type"] == 9 for p in item["content"]["parameters"]]
    assert [p["name"] for p in params] == ["TimeRange"]
    for name, content in workbook_queries(doc):
        assert content["queryType"] == 0, name  # Logs (KQL)
        assert content["resourceType"] == "microsoft.insights/components", name
        assert content["timeContextFromParameter"] == "TimeRange", name
        assert "{TimeRange}" in content["query"], name


def test_workbook_shows_what_the_issue_asks_for() -> None:
    queries = " ".join(q for n, q in all_queries().items() if n.startswith("workbook:"))
    for metric in (
        tn.VLM_TOKENS_METRIC,
        tn.VLM_COST_METRIC,
        tn.VLM_THROTTLED_METRIC,
        tn.VLM_MODEL_CALLS_METRIC,
        tn.VLM_CACHE_HITS_METRIC,
        tn.VLM_POISON_METRIC,
    ):
        assert f'"{metric}"' in queries, f"the workbook does not show {metric}"
    for attribute in (tn.VLM_TASK, tn.VLM_DEPLOYMENT, tn.VLM_TOKEN_KIND):
        assert f'customDimensions["{attribute}"]' in queries
    assert f'"{tn.SPAN_ANALYZE}"' in queries and "percentile(duration, 95)" in queries
    for kind in tn.TOKEN_KINDS:
        assert f'kind == "{kind}"' in queries


@pytest.mark.parametrize("name", sorted(all_queries()))
def test_every_name_a_query_uses_is_one_the_code_emits(name: str) -> None:
    assert check_query(all_queries()[name]) == []


WORKBOOK_TYPOS = [
    ('\\"vlm.tokens\\"', '\\"vlm.token\\"'),  # metric name
    ('customDimensions[\\"vlm.deployment\\"]', 'customDimensions[\\"vlm.deploymnet\\"]'),  # attribute name
    ('\\"vlm.analyze\\"', '\\"vlm.analyse\\"'),  # span name
    ('kind == \\"prompt\\"', 'kind == \\"prompts\\"'),  # attribute value
    ('\\"vlm.poison.records\\"', '\\"vlm.poison.record\\"'),
    ('customDimensions[\\"vlm.outcome\\"]', 'customDimensions[\\"vlm.cached\\"]'),  # a real name, wrong metric
]


@pytest.mark.parametrize(("good", "bad"), WORKBOOK_TYPOS, ids=[b for _, b in WORKBOOK_TYPOS])
def test_a_typo_in_the_workbook_is_caught(good: str, bad: str) -> None:
    source = WORKBOOK.read_text(encoding="utf-8")
    assert good in source, f"{good} is not in the workbook: update this test"
    broken = all_queries(source.replace(good, bad, 1))
    assert any(check_query(q) for q in broken.values()), f"{bad} went unnoticed"


@pytest.mark.parametrize(
    ("alert", "good", "bad"),
    [
        ("throttling", '"vlm.model.throttled"', '"vlm.model.throttle"'),
        ("throttling", 'customDimensions["vlm.deployment"]', 'customDimensions["deployment"]'),
        ("poison", '"vlm.poison.records"', '"vlm.poisoned"'),
        ("poison", 'customDimensions["vlm.task"]', 'customDimensions["vlm.tsak"]'),
    ],
)
def test_a_typo_in_an_alert_is_caught(alert: str, good: str, bad: str) -> None:
    query = alert_query(ALERTS[alert])
    assert good in query
    assert check_query(query.replace(good, bad)), f"{bad} went unnoticed"


def test_checker_rejects_other_tables_and_dotted_access() -> None:
    assert check_query("AppMetrics | where Name == 'vlm.tokens'")
    assert check_query('customMetrics | where name == "vlm.cost" | extend t = customDimensions.vlm_task')


# --------------------------------------------------------------------------- the Bicep module


def test_module_is_wired_from_main_and_loads_files_that_exist() -> None:
    assert syntax_problems(parse_file(MODULE)) == []
    wired = [
        (s, body) for s, path, body in modules(INFRA / "main.bicep") if path == "modules/monitoring-workbook.bicep"
    ]
    assert len(wired) == 1, "main.bicep must declare the monitoring-workbook module once"
    _, body = wired[0]
    assert text(get(body, "params.applicationInsightsName")) == "monitoring.outputs.applicationInsightsName"
    source = MODULE.read_text()
    loaded = re.findall(r"load(?:Json|Text)Content\('([^']+)'\)", source)
    assert {(MODULE.parent / p).resolve() for p in loaded} == {WORKBOOK, *ALERTS.values()}
    for placeholder in PLACEHOLDERS:
        assert f"'{placeholder}'" in source, f"the module does not fill {placeholder}"
    for path in ALERTS.values():
        leftover = set(re.findall(r"__[A-Z_]+__", path.read_text())) - set(PLACEHOLDERS)
        assert not leftover, f"{path.name}: placeholders the module does not fill: {leftover}"


def test_workbook_and_two_alert_rules_on_the_application_insights_component() -> None:
    found = resources(MODULE)
    (component,) = [r for r in found if r.existing]
    assert component.type.startswith("Microsoft.Insights/components@")
    (book,) = [r for r in found if r.type.split("@")[0] == "Microsoft.Insights/workbooks"]
    assert string_value(get(book.body, "kind")) == "shared"
    assert text(get(book.body, "properties.sourceId")) == f"{component.symbol}.id"
    assert "guid(" in text(get(book.body, "name"))
    rules = [r for r in found if r.type.split("@")[0] == "Microsoft.Insights/scheduledQueryRules"]
    assert len(rules) == 2
    for rule in rules:
        assert string_value(get(rule.body, "kind")) == "LogAlert"
        assert text(get(rule.body, "properties.scopes")).split() == ["[", f"{component.symbol}.id", "]"]
        assert text(get(rule.body, "properties.actions.actionGroups")) == "actionGroupIds"


# --------------------------------------------------------------------------- the names themselves


def test_names_land_in_custom_dimensions_and_follow_the_namespaces() -> None:
    for name in tn.ALL_ATTRIBUTES:
        assert not name.startswith(tn.RESERVED_EXPORTER_PREFIXES), f"{name}: the exporter drops it"
        assert name.startswith(("vlm.", "gen_ai.", "server.", "error.")), name
    for name in [*tn.METRICS, *tn.SPAN_NAMES]:
        assert name.startswith(("vlm.", "gen_ai.")), name
    for metric in tn.METRICS.values():
        assert metric.kind in ("counter", "histogram") and metric.unit and metric.attributes
    assert tn.model_call_span_name("gpt-5.4-mini") == "chat gpt-5.4-mini"


def test_telemetry_names_import_nothing_but_the_standard_library() -> None:
    tree = ast.parse(NAMES_PY.read_text(encoding="utf-8"))
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "dataclasses"}, imported


def test_every_constant_is_documented() -> None:
    """Each name constant has its docstring right below it (what it is, where it is recorded)."""
    body = ast.parse(NAMES_PY.read_text(encoding="utf-8")).body
    for i, node in enumerate(body):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            (target,) = node.targets
            name = target.id  # type: ignore[attr-defined]
            if node.value.value.startswith(("vlm.", "gen_ai.")):
                following = body[i + 1] if i + 1 < len(body) else None
                documented = (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                )
                assert documented, f"{name} has no docstring"
