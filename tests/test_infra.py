"""Offline checks of the azd/Bicep deployment (issue #6): no Azure, no Bicep compiler.

The Bicep files are parsed with tree-sitter-bicep and inspected through the syntax tree
(resources, params, modules, app settings); shared/settings.py is parsed with `ast` to learn
which settings the code reads, and the function.json files say which connections and
%SETTINGS% the bindings need. Together they pin the contract between code and infra: every
setting the code requires is deployed, every deployed setting is read by something, and the
deployment stays keyless.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path

import pytest
import tree_sitter_bicep
from tree_sitter import Language, Node, Parser, Tree

pytestmark = pytest.mark.subprocess  # the hook scripts run under sh and bash
ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
FUNCTION_APP = INFRA / "modules" / "functionapp.bicep"
HOOK_SH = INFRA / "hooks" / "postdeploy.sh"
HOOK_PS1 = INFRA / "hooks" / "postdeploy.ps1"
AZD_ENV_SH = INFRA / "hooks" / "azd_env.sh"  # sourced by the sh hooks: say, fail, load_azd_env
SETTINGS_PY = ROOT / "shared" / "settings.py"

# Built-in role definition ids, as published by Microsoft (identical in every tenant).
EXPECTED_ROLE_IDS = {
    "storageBlobDataOwnerRoleId": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "storageQueueDataContributorRoleId": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "cognitiveServicesOpenAIUserRoleId": "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd",
    "monitoringMetricsPublisherRoleId": "3913510d-42f4-4e42-8a64-420c390055eb",
}

# App settings the Flex Consumption plan removed (their job moved to functionAppConfig or is gone),
# plus the ones a keyless deployment must never carry.
FORBIDDEN_APP_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_WORKER_RUNTIME_VERSION",
    "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_MAX_HTTP_CONCURRENCY",
    "FUNCTIONS_WORKER_PROCESS_COUNT",
    "FUNCTIONS_WORKER_DYNAMIC_CONCURRENCY_ENABLED",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTOVERVNET",
    "WEBSITE_SKIP_CONTENTSHARE_VALIDATION",
    "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT",
    "WEBSITE_NODE_DEFAULT_VERSION",
    "WEBSITE_VNET_ROUTE_ALL",
    "WEBSITE_DNS_SERVER",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD",
    "PYTHON_THREADPOOL_THREAD_COUNT",
    "APPINSIGHTS_INSTRUMENTATIONKEY",
    "AzureWebJobsStorage",  # a connection string; identity-based __ settings instead
    "VlmStorage",  # likewise
    "VLM_API_KEY",  # keyless: Entra ID through the managed identity
}

# Settings the Functions platform itself reads (not shared/settings.py).
PLATFORM_SETTING_PREFIXES = ("AzureWebJobsStorage__", "APPLICATIONINSIGHTS_")

# Outputs azd and the postdeploy hook rely on.
REQUIRED_OUTPUTS = {
    "AZURE_LOCATION",
    "AZURE_TENANT_ID",
    "RESOURCE_GROUP",
    "AZURE_FUNCTION_APP_NAME",
    "SERVICE_API_NAME",
    "EVENT_GRID_SYSTEM_TOPIC",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_BLOB_ENDPOINT",
    "VLM_ENDPOINT",
    "VLM_DEPLOYMENT",
}


# ---------------------------------------------------------------------------------------------
# Bicep syntax tree helpers
# ---------------------------------------------------------------------------------------------


@cache
def _parser() -> Parser:
    return Parser(Language(tree_sitter_bicep.language()))


def parse(source: bytes) -> Tree:
    return _parser().parse(source)


@cache
def parse_file(path: Path) -> Tree:
    return parse(path.read_bytes())


def walk(node: Node):
    yield node
    for child in node.children:
        yield from walk(child)


def syntax_problems(tree: Tree) -> list[str]:
    """Every ERROR or MISSING node, as `line:col type text` (empty when the file parses cleanly)."""
    problems = []
    for node in walk(tree.root_node):
        if node.type == "ERROR" or node.is_missing:
            kind = "MISSING " + node.type if node.is_missing else "ERROR"
            text = node.text.decode(errors="replace")[:60].replace("\n", "\\n")
            problems.append(f"{node.start_point[0] + 1}:{node.start_point[1] + 1} {kind} {text!r}")
    return problems


def text(node: Node) -> str:
    return node.text.decode()


def string_value(node: Node | None) -> str | None:
    """The value of a plain string literal; None for anything else (including interpolated strings)."""
    if node is None or node.type != "string":
        return None
    if any(child.type == "interpolation" for child in node.children):
        return None
    return "".join(text(child) for child in node.children if child.type == "string_content")


def first_child(node: Node, *types: str) -> Node | None:
    return next((child for child in node.children if child.type in types), None)


def name_of(declaration: Node) -> str:
    identifier = first_child(declaration, "identifier")
    assert identifier is not None, text(declaration)[:80]
    return text(identifier)


def property_key(prop: Node) -> str | None:
    key = prop.children[0] if prop.children else None
    if key is None:
        return None
    if key.type == "identifier":
        return text(key)
    return string_value(key)


def properties(obj: Node) -> dict[str, Node]:
    """Key -> value node of an object literal (nested resource declarations are skipped)."""
    result = {}
    for prop in obj.children:
        if prop.type != "object_property":
            continue
        key = property_key(prop)
        values = [c for c in prop.children[1:] if c.type != ":" and c.is_named]
        if key is not None and values:
            result[key] = values[-1]
    return result


def get(obj: Node | None, path: str) -> Node | None:
    """Follow `a.b.c` through nested object literals."""
    node = obj
    for part in path.split("."):
        if node is None or node.type != "object":
            return None
        node = properties(node).get(part)
    return node


def body(declaration: Node) -> Node | None:
    """The object literal of a resource/module, also under `if (...)` and `[for ...: ...]`."""
    for child in declaration.children:
        if child.type == "object":
            return child
        if child.type in ("if_statement", "for_statement"):
            return body(child)
    return None


@dataclass(frozen=True)
class Resource:
    symbol: str
    type: str
    existing: bool
    body: Node
    file: Path


def resources(path: Path) -> list[Resource]:
    found = []
    for node in walk(parse_file(path).root_node):
        if node.type != "resource_declaration":
            continue
        type_node = first_child(node, "string")
        found.append(
            Resource(
                symbol=name_of(node),
                type=string_value(type_node) or "",
                existing=first_child(node, "existing") is not None,
                body=body(node),
                file=path,
            )
        )
    return found


def all_resources() -> list[Resource]:
    return [r for path in bicep_files() for r in resources(path)]


def deployed(type_prefix: str) -> list[Resource]:
    """Resources this template creates (not `existing` references) whose type starts with the prefix."""
    return [r for r in all_resources() if not r.existing and r.type.split("@")[0] == type_prefix]


def params(path: Path) -> dict[str, bool]:
    """Parameter name -> whether it has a default value."""
    result = {}
    for node in parse_file(path).root_node.children:
        if node.type == "parameter_declaration":
            result[name_of(node)] = first_child(node, "=") is not None
    return result


def variables(path: Path) -> dict[str, Node]:
    return {
        name_of(node): node.children[-1]
        for node in parse_file(path).root_node.children
        if node.type == "variable_declaration"
    }


def outputs(path: Path) -> dict[str, Node]:
    return {
        name_of(node): node.children[-1]
        for node in parse_file(path).root_node.children
        if node.type == "output_declaration"
    }


def modules(path: Path) -> list[tuple[str, str, Node]]:
    """(symbol, path string, body) of each module declaration."""
    found = []
    for node in parse_file(path).root_node.children:
        if node.type == "module_declaration":
            found.append((name_of(node), string_value(first_child(node, "string")) or "", body(node)))
    return found


def called_functions(node: Node) -> set[str]:
    """Names of every function called under the node, free (`f()`) or as a member (`x.f()`)."""
    names = set()
    for sub in walk(node):
        if sub.type == "call_expression" and sub.children:
            callee = sub.children[0]
            if callee.type == "member_expression":
                callee = callee.children[-1]
            names.add(text(callee))
    return names


@dataclass(frozen=True)
class Setting:
    value: Node
    conditional: bool  # only present in one branch of a ternary


def collect_object_keys(expr: Node, var_values: dict[str, Node], conditional: bool = False) -> dict[str, Setting]:
    """Keys of the object an expression builds from literals, variables, union() and ternaries."""
    kind = expr.type
    if kind == "object":
        return {key: Setting(value, conditional) for key, value in properties(expr).items()}
    if kind == "identifier" and text(expr) in var_values:
        return collect_object_keys(var_values[text(expr)], var_values, conditional)
    if kind == "parenthesized_expression":
        return collect_object_keys(expr.named_children[0], var_values, conditional)
    if kind == "call_expression" and text(expr.children[0]) == "union":
        merged: dict[str, Setting] = {}
        for arg in first_child(expr, "arguments").named_children:
            merged.update(collect_object_keys(arg, var_values, conditional))
        return merged
    if kind == "ternary_expression":
        _, when_true, when_false = expr.named_children
        merged = collect_object_keys(when_true, var_values, True)
        merged.update(collect_object_keys(when_false, var_values, True))
        return merged
    raise AssertionError(f"cannot tell which app settings {text(expr)[:80]!r} produces")


@cache
def app_settings() -> dict[str, Setting]:
    """The function app's app settings: the `appsettings` config resource under the site."""
    configs = [
        r
        for r in resources(FUNCTION_APP)
        if r.type.split("@")[0] in ("config", "Microsoft.Web/sites/config")
        and string_value(get(r.body, "name")) == "appsettings"
    ]
    assert len(configs) == 1, "expected one appsettings config resource in functionapp.bicep"
    expr = get(configs[0].body, "properties")
    assert expr is not None
    return collect_object_keys(expr, variables(FUNCTION_APP))


def bicep_files() -> list[Path]:
    files = sorted(INFRA.rglob("*.bicep"))
    assert MAIN in files
    return files


# ---------------------------------------------------------------------------------------------
# What the code reads: shared/settings.py and */function.json
# ---------------------------------------------------------------------------------------------

READER_METHODS = {"optional", "required", "integer", "number", "choice"}


@cache
def settings_module() -> ast.Module:
    return ast.parse(SETTINGS_PY.read_text(encoding="utf-8"))


def module_constants() -> dict[str, str]:
    constants = {}
    for stmt in settings_module().body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = stmt.value.value
    return constants


def _literal(node: ast.expr, constants: dict[str, str]) -> str | None:
    """A str literal, a module constant, or an f-string of those; None if not static."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            part = _literal(value.value if isinstance(value, ast.FormattedValue) else value, constants)
            if part is None:
                return None
            parts.append(part)
        return "".join(parts)
    return None


@cache
def settings_reads() -> dict[str, str]:
    """Every setting name shared/settings.py reads through its reader -> the reader method used."""
    constants = module_constants()
    reads = {}
    for node in ast.walk(settings_module()):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in READER_METHODS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "r"
            and node.args
        ):
            name = _literal(node.args[0], constants)
            assert name is not None, f"settings.py reads a setting whose name is not static: {ast.unparse(node)}"
            reads[name] = node.func.attr
    return reads


def settings_defaults() -> dict[str, object]:
    """Field defaults of the Settings dataclass."""
    for node in settings_module().body:
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            return {
                stmt.target.id: ast.literal_eval(stmt.value)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(stmt.value, ast.Constant)
            }
    raise AssertionError("no Settings class in shared/settings.py")


def function_jsons() -> dict[str, dict]:
    found = {path.parent.name: json.loads(path.read_text()) for path in sorted(ROOT.glob("*/function.json"))}
    assert found, "no */function.json found"
    return found


def binding_connections() -> set[str]:
    return {
        binding["connection"]
        for spec in function_jsons().values()
        for binding in spec["bindings"]
        if binding.get("connection")
    }


def binding_setting_references() -> set[str]:
    """%NAME% app-setting references in binding properties (e.g. the blob trigger's path)."""
    names = set()
    for spec in function_jsons().values():
        for binding in spec["bindings"]:
            for value in binding.values():
                if isinstance(value, str):
                    names.update(re.findall(r"%([A-Za-z0-9_]+)%", value))
    return names


# ---------------------------------------------------------------------------------------------
# Syntax
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", bicep_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_bicep_file_parses_without_errors(path: Path):
    tree = parse_file(path)
    assert syntax_problems(tree) == []
    assert not tree.root_node.has_error


@pytest.mark.parametrize(
    "snippet",
    [
        b"resource site 'Microsoft.Web/sites@2024-04-01' = {\n  name: 'x'\n  properties: {\n",  # unclosed
        b"param = 3\n",  # no name
        b"var settings = {\n  a: 'b'\n",  # unclosed object
        b"output o string = concat('a', \n",  # unclosed call
        b"var s = 'unterminated\n",  # unterminated string
    ],
)
def test_syntax_check_detects_broken_snippets(snippet: bytes):
    assert syntax_problems(parse(snippet)), "a broken snippet parsed cleanly: the syntax check would miss errors"


def test_syntax_check_detects_a_broken_main_bicep():
    source = MAIN.read_bytes()
    broken = source.rsplit(b"}", 1)[0]  # drop the last closing brace
    assert syntax_problems(parse(broken))
    assert syntax_problems(parse(source.replace(b"param location string", b"param location", 1)))


def test_no_registry_modules_or_missing_module_files():
    for path in bicep_files():
        for symbol, source, _ in modules(path):
            assert not source.startswith(("br:", "br/", "ts:", "ts/")), f"{path.name}: module {symbol} uses a registry"
            assert (path.parent / source).is_file(), f"{path.name}: module {symbol} points at missing {source}"
        assert not re.search(r"['\"](br|ts)[:/]", path.read_text()), f"{path.name} mentions a registry module"


def test_module_params_match_the_module_files():
    """What a compiler would check: every param passed exists, every required one is passed."""
    for path in bicep_files():
        for symbol, source, module_body in modules(path):
            if not (path.parent / source).is_file():
                continue  # reported by test_no_registry_modules_or_missing_module_files
            declared = params(path.parent / source)
            passed = set(properties(get(module_body, "params")))
            unknown = passed - set(declared)
            missing = {name for name, has_default in declared.items() if not has_default} - passed
            assert not unknown, f"{path.name}: module {symbol} passes unknown params {sorted(unknown)}"
            assert not missing, f"{path.name}: module {symbol} does not pass required params {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# main.bicep and main.parameters.json
# ---------------------------------------------------------------------------------------------


def test_main_is_subscription_scoped_with_resource_group_token_and_tags():
    source = MAIN.read_text()
    assert re.search(r"^targetScope\s*=\s*'subscription'", source, re.M)
    groups = deployed("Microsoft.Resources/resourceGroups")
    assert len(groups) == 1 and groups[0].file == MAIN
    var_values = variables(MAIN)
    assert "uniqueString" in called_functions(var_values["resourceToken"])
    assert "abbreviations.json" in text(var_values["abbrs"])
    assert (INFRA / "abbreviations.json").is_file()
    json.loads((INFRA / "abbreviations.json").read_text())
    assert "azd-env-name" in properties(var_values["tags"])


def test_parameters_file_matches_main_params():
    declared = params(MAIN)
    supplied = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    unknown = set(supplied) - set(declared)
    assert not unknown, f"main.parameters.json sets params main.bicep lacks: {sorted(unknown)}"
    required = {name for name, has_default in declared.items() if not has_default}
    assert required <= set(supplied), f"required params not supplied: {sorted(required - set(supplied))}"
    assert supplied["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert supplied["location"]["value"] == "${AZURE_LOCATION}"
    assert supplied["principalId"]["value"] == "${AZURE_PRINCIPAL_ID}"
    assert supplied["cacheTtlDays"]["value"].startswith("${CACHE_TTL_DAYS")
    for name, entry in supplied.items():
        assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*(=[^}]*)?\}", entry["value"]), f"{name}: not an azd ${{VAR}}"


def test_outputs_cover_azd_and_the_hook_and_hold_no_secret():
    declared = outputs(MAIN)
    assert REQUIRED_OUTPUTS <= set(declared), f"missing outputs: {sorted(REQUIRED_OUTPUTS - set(declared))}"
    for name, value in declared.items():
        assert not re.search(r"KEY|SECRET|PASSWORD|CONNECTION_STRING", name), f"output {name} looks like a secret"
        listed = {f for f in called_functions(value) if f.lower().startswith("list")}
        assert not listed, f"output {name} calls {sorted(listed)}"


def test_no_list_functions_anywhere():
    """listKeys()/listSecrets() would put a key into the deployment; everything is identity-based."""
    for path in bicep_files():
        listed = {f for f in called_functions(parse_file(path).root_node) if f.lower().startswith("list")}
        assert not listed, f"{path.name} calls {sorted(listed)}"


# ---------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------


def test_storage_account_is_keyless_and_private():
    (account,) = deployed("Microsoft.Storage/storageAccounts")
    props = get(account.body, "properties")
    assert text(get(props, "allowSharedKeyAccess")) == "false"
    assert text(get(props, "allowBlobPublicAccess")) == "false"
    assert text(get(props, "supportsHttpsTrafficOnly")) == "true"
    assert string_value(get(props, "minimumTlsVersion")) == "TLS1_2"


def test_containers_match_the_settings_defaults_and_are_created():
    defaults = settings_defaults()
    var_values = variables(MAIN)
    for field in ("images_container", "results_container", "cache_container", "schemas_container"):
        var_name = field.replace("_container", "ContainerName")
        assert string_value(var_values[var_name]) == defaults[field], f"{var_name} differs from Settings.{field}"
    storage_module = next(b for _, source, b in modules(MAIN) if source.endswith("storage.bicep"))
    created = {text(item) for item in get(storage_module, "params.containerNames").named_children}
    assert {
        "imagesContainerName",
        "resultsContainerName",
        "cacheContainerName",
        "schemasContainerName",
        "deploymentContainerName",
    } <= created


def test_cache_lifecycle_rule_deletes_after_cache_ttl_days():
    (policy,) = deployed("Microsoft.Storage/storageAccounts/managementPolicies")
    (rule,) = get(policy.body, "properties.policy.rules").named_children
    assert text(get(rule, "enabled")) == "true"
    prefixes = [text(p) for p in get(rule, "definition.filters.prefixMatch").named_children]
    assert prefixes == ["'${cacheContainerName}/'"]
    assert text(get(rule, "definition.actions.baseBlob.delete.daysAfterModificationGreaterThan")) == "cacheTtlDays"
    storage_module = next(b for _, source, b in modules(MAIN) if source.endswith("storage.bicep"))
    assert text(get(storage_module, "params.cacheTtlDays")) == "cacheTtlDays"
    assert text(get(storage_module, "params.cacheContainerName")) == "cacheContainerName"


def test_flex_consumption_plan_and_python_function_app():
    (plan,) = deployed("Microsoft.Web/serverfarms")
    assert string_value(get(plan.body, "sku.name")) == "FC1"
    assert string_value(get(plan.body, "sku.tier")) == "FlexConsumption"
    (site,) = deployed("Microsoft.Web/sites")
    assert string_value(get(site.body, "kind")) == "functionapp,linux"
    assert "azd-service-name" in text(get(site.body, "tags"))
    config = get(site.body, "properties.functionAppConfig")
    assert string_value(get(config, "runtime.name")) == "python"
    assert string_value(get(config, "runtime.version")) == "3.11"
    assert text(get(config, "scaleAndConcurrency.instanceMemoryMB")) == "instanceMemoryMB"
    assert text(get(config, "scaleAndConcurrency.maximumInstanceCount")) == "maximumInstanceCount"
    assert string_value(get(config, "deployment.storage.type")) == "blobContainer"
    assert string_value(get(config, "deployment.storage.authentication.type")) == "UserAssignedIdentity"
    assert get(config, "deployment.storage.authentication.userAssignedIdentityResourceId") is not None
    assert string_value(get(site.body, "identity.type")) == "UserAssigned"
    assert {"instanceMemoryMB", "maximumInstanceCount"} <= set(params(MAIN))


def test_azure_openai_is_keyless_with_primary_and_optional_fallback_deployment():
    (account,) = deployed("Microsoft.CognitiveServices/accounts")
    assert string_value(get(account.body, "kind")) == "OpenAI"
    assert text(get(account.body, "properties.disableLocalAuth")) == "true"
    assert get(account.body, "properties.customSubDomainName") is not None
    openai_bicep = account.file
    deployments = [
        node
        for node in walk(parse_file(openai_bicep).root_node)
        if node.type == "resource_declaration"
        and (string_value(first_child(node, "string")) or "").startswith(
            "Microsoft.CognitiveServices/accounts/deployments@"
        )
    ]
    assert len(deployments) == 3  # primary, fallback, batch
    conditional = [d for d in deployments if first_child(d, "if_statement") is not None]
    assert len(conditional) == 2, "the fallback and batch deployments must be conditional"
    conditions = sorted(text(first_child(d, "if_statement").children[1]) for d in conditional)
    assert conditions == ["(deployBatch)", "(deployFallback)"]
    # the account is skipped when an existing endpoint is given
    openai_module = next(
        node
        for node in parse_file(MAIN).root_node.children
        if node.type == "module_declaration" and string_value(first_child(node, "string")) == "modules/openai.bicep"
    )
    assert first_child(openai_module, "if_statement") is not None
    assert "existingOpenAiEndpoint" in params(MAIN)
    for name in ("openAiModelName", "openAiModelVersion", "openAiDeploymentSkuName", "openAiDeploymentCapacity"):
        assert name in params(MAIN)


def test_monitoring_is_entra_id_only():
    (component,) = deployed("Microsoft.Insights/components")
    assert text(get(component.body, "properties.DisableLocalAuth")) == "true"
    assert get(component.body, "properties.WorkspaceResourceId") is not None
    assert deployed("Microsoft.OperationalInsights/workspaces")


def test_event_grid_system_topic_on_the_storage_account_with_the_app_identity():
    (topic,) = deployed("Microsoft.EventGrid/systemTopics")
    assert string_value(get(topic.body, "properties.topicType")) == "Microsoft.Storage.StorageAccounts"
    assert string_value(get(topic.body, "identity.type")) == "UserAssigned"
    eventgrid_module = next(b for _, source, b in modules(MAIN) if source.endswith("eventgrid.bicep"))
    assert text(get(eventgrid_module, "params.storageAccountId")) == "storage.outputs.id"
    assert text(get(eventgrid_module, "params.identityId")) == "identity.outputs.id"


def test_role_definition_ids_are_the_built_in_ones():
    found: dict[str, str] = {}
    for path in bicep_files():
        for name, value in variables(path).items():
            if name.endswith("RoleId"):
                assert name in EXPECTED_ROLE_IDS, f"{path.name}: unexpected role {name}"
                assert string_value(value) == EXPECTED_ROLE_IDS[name], f"{path.name}: {name} has the wrong GUID"
                found[name] = string_value(value)
                uses = re.findall(rf"\b{name}\b", path.read_text())
                assert len(uses) >= 2, f"{path.name}: {name} is declared but never assigned"
        guids = set(re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", path.read_text()))
        assert guids <= set(EXPECTED_ROLE_IDS.values()), f"{path.name}: unknown GUIDs {guids}"
    assert found == EXPECTED_ROLE_IDS
    assignments = deployed("Microsoft.Authorization/roleAssignments")
    assert len(assignments) >= 4
    for assignment in assignments:
        assert "subscriptionResourceId" in called_functions(get(assignment.body, "properties.roleDefinitionId"))
        assert "guid" in called_functions(get(assignment.body, "name"))


def test_deploying_principal_gets_data_roles_only_when_asked():
    assert params(MAIN)["principalId"] is True  # optional
    assert "grantPrincipalDataAccess" in params(MAIN)
    user_assignments = [
        r for r in deployed("Microsoft.Authorization/roleAssignments") if "userPrincipalId" in text(r.body)
    ]
    assert user_assignments
    for assignment in user_assignments:
        declaration = assignment.body.parent
        assert declaration.type == "if_statement", f"{assignment.symbol} must be conditional on a principal"


# ---------------------------------------------------------------------------------------------
# App settings against shared/settings.py and the bindings
# ---------------------------------------------------------------------------------------------


def test_settings_reader_parse_finds_what_settings_py_reads():
    reads = settings_reads()
    assert reads["VLM_ENDPOINT"] == "required"
    assert {"VLM_DEPLOYMENT", "VLM_FALLBACK_DEPLOYMENTS", "AZURE_CLIENT_ID", "IMAGES_CONTAINER"} <= set(reads)
    assert {"VlmStorage", "VlmStorage__blobServiceUri", "VlmStorage__queueServiceUri"} <= set(reads)
    assert {"VlmStorage__credential", "VlmStorage__clientId"} <= set(reads)


def test_every_required_setting_is_deployed_unconditionally():
    deployed_settings = app_settings()
    required = {name for name, method in settings_reads().items() if method == "required"}
    # storage: a connection string locally, the identity-based service URI in Azure
    required.add("VlmStorage__blobServiceUri")
    for name in required:
        assert name in deployed_settings, f"{name} is required by shared/settings.py but not an app setting"
        assert not deployed_settings[name].conditional, f"{name} must always be set"


def test_every_app_setting_is_read_by_something():
    readers = set(settings_reads()) | binding_setting_references()
    connection_prefixes = tuple(f"{name}__" for name in binding_connections())
    for name in app_settings():
        assert name in readers or name.startswith(PLATFORM_SETTING_PREFIXES) or name.startswith(connection_prefixes), (
            f"app setting {name} is read by nothing (shared/settings.py, a binding or the platform)"
        )


def test_no_deprecated_or_secret_app_settings():
    present = FORBIDDEN_APP_SETTINGS & set(app_settings())
    assert not present, f"forbidden app settings: {sorted(present)}"
    for path in bicep_files():
        for node in walk(parse_file(path).root_node):
            if node.type == "object_property":
                assert property_key(node) not in FORBIDDEN_APP_SETTINGS, f"{path.name}: {property_key(node)}"


def test_identity_based_connections_use_the_user_assigned_identity():
    settings = app_settings()
    for prefix in ("AzureWebJobsStorage", *sorted(binding_connections())):
        assert f"{prefix}__blobServiceUri" in settings
        assert f"{prefix}__queueServiceUri" in settings
        assert string_value(settings[f"{prefix}__credential"].value) == "managedidentity"
        assert text(settings[f"{prefix}__clientId"].value) == "identityClientId"
    assert text(settings["AZURE_CLIENT_ID"].value) == "identityClientId"
    auth = text(settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"].value)
    assert auth == "'ClientId=${identityClientId};Authorization=AAD'"
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in settings


def test_fallback_setting_only_when_a_fallback_exists():
    settings = app_settings()
    assert settings["VLM_FALLBACK_DEPLOYMENTS"].conditional
    assert {"VLM_ENDPOINT", "VLM_DEPLOYMENT", "VLM_RPM", "VLM_TPM"} <= set(settings)


def test_batch_deployment_is_a_global_batch_of_the_primary_model():
    """Issue 13: a GlobalBatch deployment of the same model, created only when asked for, after the others."""
    openai_bicep = INFRA / "modules" / "openai.bicep"
    (batch,) = [r for r in resources(openai_bicep) if r.symbol == "batch"]
    assert batch.type.startswith("Microsoft.CognitiveServices/accounts/deployments@")
    (node,) = [
        n
        for n in walk(parse_file(openai_bicep).root_node)
        if n.type == "resource_declaration" and name_of(n) == "batch"
    ]
    assert text(first_child(node, "if_statement").children[1]) == "(deployBatch)"
    assert text(get(batch.body, "sku.name")) == "batchSkuName"
    assert text(get(batch.body, "sku.capacity")) == "batchCapacity"
    # the same model and version as the primary deployment: the batch route answers like the online one
    assert text(get(batch.body, "properties.model.name")) == "modelName"
    assert text(get(batch.body, "properties.model.version")) == "modelVersion"
    depends = text(get(batch.body, "dependsOn"))
    assert "primary" in depends and "fallback" in depends  # deployments on one account go one at a time
    declared = parse_file(MAIN).root_node.children
    sku = next(n for n in declared if n.type == "parameter_declaration" and name_of(n) == "batchDeploymentSkuName")
    assert "'GlobalBatch'" in text(sku)
    for name in ("deployBatch", "batchDeploymentName", "batchDeploymentCapacity", "batchSubmitSchedule"):
        assert name in params(MAIN)
    assert "VLM_BATCH_DEPLOYMENT" in outputs(MAIN)


def test_batch_settings_only_with_a_batch_deployment_and_schedules_always():
    settings = app_settings()
    assert settings["VLM_BATCH_DEPLOYMENT"].conditional
    assert settings["BATCH_ENQUEUED_TOKENS"].conditional
    for name in ("BATCH_SUBMIT_SCHEDULE", "BATCH_COLLECT_SCHEDULE"):
        assert not settings[name].conditional, f"{name}: a timer's %schedule% must always resolve"
    reads = settings_reads()
    for name in ("VLM_BATCH_DEPLOYMENT", "BATCH_ENQUEUED_TOKENS", "BATCH_SUBMIT_SCHEDULE", "BATCH_COLLECT_SCHEDULE"):
        assert name in reads, f"{name} is deployed but shared/settings.py does not read it"
    defaults = settings_defaults()
    main_defaults = {
        name_of(n): text(n.children[-1])
        for n in parse_file(MAIN).root_node.children
        if n.type == "parameter_declaration"
    }
    assert main_defaults["batchSubmitSchedule"] == repr(defaults["batch_submit_schedule"])
    assert main_defaults["batchCollectSchedule"] == repr(defaults["batch_collect_schedule"])


def test_every_binding_connection_and_setting_reference_is_an_app_setting():
    settings = set(app_settings())
    for connection in binding_connections():
        assert connection in settings or any(name.startswith(f"{connection}__") for name in settings), (
            f"binding connection {connection} has no app setting"
        )
    for name in binding_setting_references():
        assert name in settings, f"%{name}% in a function.json is not an app setting"


def test_container_app_settings_come_from_main_bicep():
    settings = app_settings()
    for setting, param in [
        ("IMAGES_CONTAINER", "imagesContainerName"),
        ("RESULTS_CONTAINER", "resultsContainerName"),
        ("CACHE_CONTAINER", "cacheContainerName"),
        ("SCHEMAS_CONTAINER", "schemasContainerName"),
    ]:
        assert text(settings[setting].value) == param


# ---------------------------------------------------------------------------------------------
# azure.yaml and the postdeploy hook
# ---------------------------------------------------------------------------------------------


def read_simple_yaml(source: str) -> dict:
    """The subset of YAML azure.yaml uses: nested mappings of scalars, two-space indentation."""
    root: dict = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    for raw in source.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, value = line.strip().partition(":")
        assert sep, f"not a mapping line: {raw!r}"
        while indent <= stack[-1][0]:
            stack.pop()
        parent = stack[-1][1]
        value = value.strip().strip("'\"")
        if value:
            parent[key] = value
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
    return root


def test_read_simple_yaml():
    parsed = read_simple_yaml("a: 1\nb:\n  c: 'x'  # note\n  d:\n    e: f\ng: h\n")
    assert parsed == {"a": "1", "b": {"c": "x", "d": {"e": "f"}}, "g": "h"}


def test_azure_yaml_declares_the_api_function_service_and_the_hook():
    config = read_simple_yaml((ROOT / "azure.yaml").read_text())
    assert config["services"]["api"] == {"project": ".", "language": "python", "host": "function"}
    hook = config["hooks"]["postdeploy"]
    assert hook["posix"]["shell"] == "sh"
    assert hook["windows"]["shell"] == "pwsh"
    assert (ROOT / hook["posix"]["run"]).resolve() == HOOK_SH
    assert (ROOT / hook["windows"]["run"]).resolve() == HOOK_PS1
    assert config.get("infra", {}).get("path", "infra") == "infra"


def blob_trigger_folder() -> str:
    folders = [
        name
        for name, spec in function_jsons().items()
        if any(binding["type"] == "blobTrigger" for binding in spec["bindings"])
    ]
    assert len(folders) == 1
    return folders[0]


@pytest.mark.parametrize("hook", [HOOK_SH, HOOK_PS1], ids=lambda p: p.name)
def test_hook_subscribes_the_blob_trigger_function(hook: Path):
    source = hook.read_text() + (AZD_ENV_SH.read_text() if hook.suffix == ".sh" else "")
    names = set(re.findall(r"functionName=Host\.Functions\.([A-Za-z0-9_]+)", source))
    assert names == {blob_trigger_folder()}
    assert "runtime/webhooks/blobs" in source
    assert "systemKeys.blobs_extension" in source
    assert "Microsoft.Storage.BlobCreated" in source
    assert "/blobServices/default/containers/$container/" in source
    assert "azd env get-values" in source
    for name in ("AZURE_FUNCTION_APP_NAME", "RESOURCE_GROUP", "EVENT_GRID_SYSTEM_TOPIC"):
        assert name in source and name in outputs(MAIN)


def test_hook_default_container_is_the_images_container():
    images = settings_defaults()["images_container"]
    assert "${IMAGES_CONTAINER:-" + images + "}" in HOOK_SH.read_text()
    assert f"else {{ '{images}' }}" in HOOK_PS1.read_text()


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_sh_hook_syntax(shell: str):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    for script in (HOOK_SH, AZD_ENV_SH):
        result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr


def test_sh_hook_syntax_check_detects_errors(tmp_path: Path):
    if shutil.which("bash") is None:
        pytest.skip("bash not installed")
    broken = tmp_path / "broken.sh"
    broken.write_text(HOOK_SH.read_text().replace("\ndone", "\n", 1))
    result = subprocess.run(["bash", "-n", str(broken)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0


# ---------------------------------------------------------------------------------------------
# The model: defaults deployable today (catalog retirement dates), VLM_MODEL, fallback form
# ---------------------------------------------------------------------------------------------

CATALOG = ROOT / "shared" / "model_catalog.json"
PARAMETERS = INFRA / "main.parameters.json"
PREPROVISION_SH = INFRA / "hooks" / "preprovision.sh"
PREPROVISION_PS1 = INFRA / "hooks" / "preprovision.ps1"


def param_default(path: Path, name: str) -> str | None:
    """The literal default of a string parameter (None when it has none or it is not a plain string)."""
    for node in parse_file(path).root_node.children:
        if node.type == "parameter_declaration" and name_of(node) == name:
            values = [c for c in node.children if c.type == "string"]
            return string_value(values[-1]) if values else None
    raise AssertionError(f"{path.name} has no param {name}")


def azd_default(name: str) -> str:
    """The `${VAR=default}` default main.parameters.json gives a main.bicep parameter."""
    value = json.loads(PARAMETERS.read_text())["parameters"][name]["value"]
    match = re.fullmatch(r"\$\{([A-Z0-9_]+)=([^}]*)\}", value)
    assert match, f"main.parameters.json: {name} has no default ({value})"
    return match.group(2)


def catalog_family(catalog: dict, model: str) -> dict | None:
    """The family whose `match` prefix is the longest prefix of the model name (CONTRACTS C2)."""
    best, best_len = None, -1
    for family in catalog["families"]:
        for prefix in family["match"]:
            if model.lower().startswith(prefix) and len(prefix) > best_len:
                best, best_len = family, len(prefix)
    return best


def retirement_problem(catalog: dict, model: str, version: str, today: date) -> str | None:
    """Why a new deployment of model+version is not safe today per the catalog; None when it is."""
    family = catalog_family(catalog, model)
    if family is None:
        return f"{model} is in no catalog family"
    entry = family.get("versions", {}).get(version)
    if entry is None:
        return f"{model} version {version} is not in the catalog family {family['family']}"
    retirement = entry.get("retirement")
    if retirement is None:
        return f"{model} {version} has no retirement date in the catalog"
    if date.fromisoformat(retirement) <= today:
        return f"{model} {version} retired on {retirement}"
    return None


def default_models() -> list[tuple[str, str, str]]:
    """(label, model, version) of the primary and fallback defaults, from main.bicep."""
    return [
        ("primary", param_default(MAIN, "openAiModelName"), param_default(MAIN, "openAiModelVersion")),
        ("fallback", param_default(MAIN, "fallbackModelName"), param_default(MAIN, "fallbackModelVersion")),
    ]


def test_catalog_has_the_contract_shape():
    catalog = json.loads(CATALOG.read_text())
    assert catalog["schema_version"] == 1
    date.fromisoformat(catalog["checked_on"])
    for family in catalog["families"]:
        assert {"family", "match", "image_tokens", "details", "parameters", "price_usd_per_mtok", "versions"} <= set(
            family
        ), family["family"]
        assert family["parameters"] in ("chat", "reasoning"), family["family"]
        assert all(prefix == prefix.lower() for prefix in family["match"]), family["family"]
        for version, entry in family["versions"].items():
            assert entry.get("retirement") is None or date.fromisoformat(entry["retirement"]), (
                family["family"],
                version,
            )
        if family["family"] != "local-ocr":
            assert family.get("sources"), f"{family['family']}: no sources"


def test_the_local_stand_in_is_priced_as_the_model_infra_deploys_by_default():
    """Local cost figures (and batch's half price) are those of the default deployment, not $0."""
    local = json.loads((ROOT / "local" / "model_catalog.local.json").read_text())
    (stand_in,) = local["families"]
    assert stand_in["priced_as"] == param_default(MAIN, "openAiModelName")


@pytest.mark.parametrize("label", ["primary", "fallback"])
def test_default_model_version_is_in_the_catalog_and_not_retired(label: str):
    catalog = json.loads(CATALOG.read_text())
    ((_, model, version),) = [entry for entry in default_models() if entry[0] == label]
    assert model and version, f"main.bicep has no literal default {label} model and version"
    problem = retirement_problem(catalog, model, version, date.today())
    assert problem is None, f"default {label} model in infra/main.bicep: {problem}; pick one a new customer can deploy"


def test_retirement_check_flags_retired_and_missing_versions():
    """The check above bites: the former default (gpt-4o 2024-11-20) and an unknown version fail it."""
    catalog = json.loads(CATALOG.read_text())
    assert "retired on 2026-10-01" in retirement_problem(catalog, "gpt-4o", "2024-11-20", date(2026, 11, 30))
    assert retirement_problem(catalog, "gpt-4o", "2024-11-20", date(2026, 9, 30)) is None
    assert "not in the catalog" in retirement_problem(catalog, "gpt-5.4-mini", "1999-01-01", date(2026, 11, 30))
    assert "no catalog family" in retirement_problem(catalog, "unknown-model", "1", date(2026, 11, 30))
    # longest prefix wins: gpt-5.4-mini is not priced as gpt-5.4 nor gpt-4o-mini as gpt-4o
    assert catalog_family(catalog, "gpt-5.4-mini-2026-03-17")["family"] == "gpt-5.4-mini"
    assert catalog_family(catalog, "gpt-4o-mini")["family"] == "gpt-4o-mini"


def test_model_parameters_have_azd_defaults_equal_to_the_bicep_defaults():
    for param, env_default_param in [
        ("openAiModelName", "openAiModelName"),
        ("openAiModelVersion", "openAiModelVersion"),
        ("openAiDeploymentSkuName", "openAiDeploymentSkuName"),
        ("fallbackModelName", "fallbackModelName"),
        ("fallbackModelVersion", "fallbackModelVersion"),
        ("fallbackDeploymentSkuName", "fallbackDeploymentSkuName"),
    ]:
        assert azd_default(env_default_param) == param_default(MAIN, param), param
    assert "openAiDeploymentCapacity" in params(MAIN) and "fallbackDeploymentCapacity" in params(MAIN)


def test_the_limiter_is_given_the_created_deployments_quota_unless_told_otherwise():
    """Azure's chat answers name what remains, not always the limit: with VLM_TPM/VLM_RPM at 0 and no
    x-ratelimit-limit-* the limiter would pace nothing. The template passes the deployment it creates
    (capacity x 1000 TPM, 6 RPM per 1000 TPM); a value set in azd, or an existing endpoint, is passed as is."""
    app_module = next(b for _, source, b in modules(MAIN) if source.endswith("functionapp.bicep"))
    tpm, rpm = text(get(app_module, "params.vlmTpm")), text(get(app_module, "params.vlmRpm"))
    assert tpm == "vlmTpm > 0 || !createOpenAi ? vlmTpm : openAiDeploymentCapacity * 1000"
    assert rpm == "vlmRpm > 0 || !createOpenAi ? vlmRpm : openAiDeploymentCapacity * 6"
    assert text(get(app_module, "params.vlmRateSplit")) == "vlmRateSplit"
    assert {"VLM_TPM", "VLM_RPM", "VLM_RATE_SPLIT"} <= set(app_settings())


def test_the_instance_count_is_on_by_default_and_kept_in_the_cache_container():
    """VLM_RATE_PEERS: the template's default is the code's, azd can turn it off, and its beats go to the cache
    container the app already writes (Storage Blob Data Contributor) and the lifecycle rule already ages."""
    from shared.settings import RATE_PEERS, Settings

    app_module = next(b for _, source, b in modules(MAIN) if source.endswith("functionapp.bicep"))
    assert text(get(app_module, "params.vlmRatePeers")) == "vlmRatePeers"
    assert text(app_settings()["VLM_RATE_PEERS"].value) == "vlmRatePeers"
    assert param_default(MAIN, "vlmRatePeers") == Settings.vlm_rate_peers == "storage"
    assert azd_default("vlmRatePeers") == "storage" and "VLM_RATE_PEERS" in settings_reads()
    allowed = re.search(r"@allowed\(\[([^\]]*)\]\)\s*@description\([^\n]*\)\s*param vlmRatePeers", MAIN.read_text())
    assert allowed is not None and set(re.findall(r"'(\w+)'", allowed.group(1))) == set(RATE_PEERS)


def test_vlm_model_and_fallback_model_are_wired_from_the_parameters():
    settings = app_settings()
    assert text(settings["VLM_MODEL"].value) == "vlmModel"
    assert "VLM_MODEL" in settings_reads(), "shared/settings.py must read VLM_MODEL"
    app_module = next(b for _, source, b in modules(MAIN) if source.endswith("functionapp.bicep"))
    assert text(get(app_module, "params.vlmModel")) == "openAiModelName"
    assert text(get(app_module, "params.vlmFallbackDeployments")) == "vlmFallbackDeployments"
    fallback = text(variables(MAIN)["vlmFallbackDeployments"])
    assert "deployFallback" in fallback
    assert "'${fallbackDeploymentName}=${fallbackModelName}'" in fallback, "fallback must be <deployment>=<model>"
    openai_module = next(b for _, source, b in modules(MAIN) if source.endswith("openai.bicep"))
    assert text(get(openai_module, "params.modelName")) == "openAiModelName"
    assert text(get(openai_module, "params.fallbackModelName")) == "fallbackModelName"
    assert text(outputs(MAIN)["VLM_MODEL"]) == "openAiModelName"


# ---------------------------------------------------------------------------------------------
# The preprovision hook: offline, with a fake `az` on PATH
# ---------------------------------------------------------------------------------------------


def test_sh_hooks_read_only_the_azd_values_they_name(tmp_path: Path):
    """azd_env.sh: a name the hook lists is taken from `azd env get-values`, unless already set; others never."""
    if shutil.which("sh") is None:
        pytest.skip("sh not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    azd = bin_dir / "azd"
    azd.write_text("#!/bin/sh\nprintf '%s\\n' 'A=\"1\"' 'B=\"from azd\"' 'C=\"3\"' 'D=\"$(touch pwned)\"'\n")
    azd.chmod(0o755)
    script = f'HOOK=t; . "{AZD_ENV_SH}"; load_azd_env A B D; printf "%s|%s|%s|%s" "$A" "$B" "${{C:-}}" "$D"'
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "B": "set before"}
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1|set before||$(touch pwned)"
    assert not (tmp_path / "pwned").exists()
    for hook in (HOOK_SH, PREPROVISION_SH):
        assert '. "$(dirname "$0")/azd_env.sh"' in hook.read_text(), hook.name


def test_azure_yaml_declares_the_preprovision_hook():
    config = read_simple_yaml((ROOT / "azure.yaml").read_text())
    hook = config["hooks"]["preprovision"]
    assert hook["posix"]["shell"] == "sh"
    assert hook["windows"]["shell"] == "pwsh"
    assert (ROOT / hook["posix"]["run"]).resolve() == PREPROVISION_SH
    assert (ROOT / hook["windows"]["run"]).resolve() == PREPROVISION_PS1
    assert hook["posix"]["continueOnError"] == "false"


@pytest.mark.parametrize("hook", [PREPROVISION_SH, PREPROVISION_PS1], ids=lambda p: p.name)
def test_preprovision_hooks_default_to_the_parameters_file_defaults(hook: Path):
    source = hook.read_text()
    assert "az cognitiveservices model list --location" in source
    for env, param in [
        ("AZURE_OPENAI_MODEL", "openAiModelName"),
        ("AZURE_OPENAI_MODEL_VERSION", "openAiModelVersion"),
        ("AZURE_OPENAI_DEPLOYMENT_SKU", "openAiDeploymentSkuName"),
        ("AZURE_OPENAI_FALLBACK_MODEL", "fallbackModelName"),
        ("AZURE_OPENAI_FALLBACK_MODEL_VERSION", "fallbackModelVersion"),
        ("AZURE_OPENAI_FALLBACK_SKU", "fallbackDeploymentSkuName"),
    ]:
        expected = azd_default(param)
        if hook.suffix == ".sh":  # read from main.parameters.json by azd_env.sh, not copied
            assert f"${{{env}:-$(azd_default {env})}}" in source, f"{hook.name}: {env} default is not read"
            assert sh_azd_default(env) == expected, f"azd_default {env} is not {expected}"
        else:
            assert f"Setting '{env}' '{expected}'" in source, f"{hook.name}: {env} default is not {expected}"


def sh_azd_default(name: str) -> str:
    """What infra/hooks/azd_env.sh's azd_default answers for an azd variable."""
    script = f'HOOKS_DIR="{AZD_ENV_SH.parent}"; HOOK=t; . "{AZD_ENV_SH}"; azd_default {name}'
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sh_azd_default_reads_the_parameters_file_and_fails_on_a_missing_name():
    assert sh_azd_default("VLM_DEPLOYMENT") == azd_default("openAiDeploymentName")
    script = f'HOOKS_DIR="{AZD_ENV_SH.parent}"; HOOK=t; . "{AZD_ENV_SH}"; azd_default NO_SUCH_VARIABLE'
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "gives NO_SUCH_VARIABLE no default" in result.stderr


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_preprovision_sh_syntax(shell: str):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    result = subprocess.run([shell, "-n", str(PREPROVISION_SH)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# What `az cognitiveservices model list --location <region>` answers: a JSON array of the REST
# ListLocationModels items (https://learn.microsoft.com/rest/api/aiservices/accountmanagement/models/list).
def offered_model(name: str, version: str, *skus: tuple[str, str | None]) -> dict:
    return {
        "kind": "OpenAI",
        "skuName": "S0",
        "model": {
            "format": "OpenAI",
            "name": name,
            "version": version,
            "maxCapacity": 1000,
            "capabilities": {"chatCompletion": "true", "inference": "true"},
            "deprecation": {"inference": "2027-03-18T00:00:00Z"},
            "lifecycleStatus": "GenerallyAvailable",
            "skus": [
                {
                    "name": sku,
                    "usageName": f"OpenAI.{sku}.{name}",
                    "capacity": {"minimum": 1, "maximum": 1000, "step": 1, "default": 10},
                    "rateLimits": [{"key": "request", "renewalPeriod": 10, "count": 1}],
                    **({"deprecationDate": closes} if closes else {}),
                }
                for sku, closes in skus
            ],
        },
    }


REGION_OFFERS = [
    offered_model("gpt-5.4-mini", "2026-03-17", ("GlobalStandard", None), ("DataZoneStandard", "2020-01-01T00:00:00Z")),
    offered_model("gpt-5.4-nano", "2026-03-17", ("GlobalStandard", "2999-01-01T00:00:00Z")),
    offered_model("gpt-5.5", "2026-04-24", ("GlobalStandard", None), ("Standard", None)),
    {
        "kind": "AIServices",
        "skuName": "S0",
        "model": {"format": "Microsoft", "name": "gpt-4o", "version": "2024-11-20"},
    },
    {"kind": "OpenAI", "skuName": "S0", "model": {"format": "OpenAI", "name": "ada", "version": "1"}},  # no skus
]

# A stand-in for `az`: applies the hook's --query with jmespath (the library az itself uses) to
# canned JSON and prints it as `--output tsv` does; logs every call.
FAKE_AZ = r"""#!{python}
import json, os, sys
import jmespath
args = sys.argv[1:]
with open(os.environ["FAKE_AZ_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[:2] == ["account", "show"]:
    sys.exit(int(os.environ.get("FAKE_AZ_SIGNED_OUT", "0")))
if args[:2] == ["account", "set"]:
    sys.exit(0)
if args[:3] == ["cognitiveservices", "model", "list"]:
    opts = dict(zip(args[3::2], args[4::2]))
    data = json.load(open(os.environ["FAKE_AZ_MODELS"]))
    if "--query" in opts:
        data = jmespath.search(opts["--query"], data)
    if opts.get("--output") == "tsv":
        for row in data or []:
            row = row if isinstance(row, list) else [row]
            print("\t".join("" if v is None else str(v) for v in row))
    else:
        print(json.dumps(data))
    sys.exit(0)
sys.exit(2)
"""


def run_preprovision(tmp_path: Path, env: dict[str, str], offers: list[dict] = REGION_OFFERS):
    if shutil.which("sh") is None:
        pytest.skip("sh not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    az = bin_dir / "az"
    az.write_text(FAKE_AZ.replace("{python}", sys.executable))
    az.chmod(0o755)
    azd = bin_dir / "azd"  # a signed-out azd: the hook falls back to the environment it was given
    azd.write_text("#!/bin/sh\nexit 1\n")
    azd.chmod(0o755)
    models = tmp_path / "models.json"
    models.write_text(json.dumps(offers))
    log = tmp_path / "az.log"
    log.write_text("")
    full_env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "FAKE_AZ_MODELS": str(models),
        "FAKE_AZ_LOG": str(log),
        "AZURE_LOCATION": "swedencentral",
        **env,
    }
    result = subprocess.run(["sh", str(PREPROVISION_SH)], capture_output=True, text=True, timeout=60, env=full_env)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return result, calls


def test_preprovision_passes_when_the_region_offers_the_defaults(tmp_path: Path):
    result, calls = run_preprovision(tmp_path, {"AZURE_OPENAI_DEPLOY_FALLBACK": "true"})
    assert result.returncode == 0, result.stderr
    assert "swedencentral offers primary gpt-5.4-mini 2026-03-17 as GlobalStandard" in result.stdout
    assert "offers fallback gpt-5.4-nano 2026-03-17 as GlobalStandard until 2999-01-01" in result.stdout
    listed = [c for c in calls if c[:3] == ["cognitiveservices", "model", "list"]]
    assert listed and listed[0][3:5] == ["--location", "swedencentral"]


def test_preprovision_stops_and_lists_offers_when_the_version_is_not_offered(tmp_path: Path):
    result, _ = run_preprovision(tmp_path, {"AZURE_OPENAI_MODEL": "gpt-4o", "AZURE_OPENAI_MODEL_VERSION": "2024-11-20"})
    assert result.returncode == 1
    assert "swedencentral does not offer primary model gpt-4o version 2024-11-20" in result.stderr
    assert "Models offered in swedencentral as GlobalStandard:" in result.stderr
    offered = result.stderr.split("as GlobalStandard:\n", 1)[1]
    assert "gpt-5.4-mini 2026-03-17" in offered and "gpt-5.5 2026-04-24" in offered
    assert "ada" not in offered and "gpt-4o 2024-11-20" not in offered  # no SKUs / not an OpenAI-kind offer
    assert "azd env set AZURE_OPENAI_MODEL" in result.stderr


def test_preprovision_stops_when_the_sku_is_not_offered_or_closed(tmp_path: Path):
    result, _ = run_preprovision(tmp_path, {"AZURE_OPENAI_DEPLOYMENT_SKU": "Standard"})
    assert result.returncode == 1
    assert "offers primary model gpt-5.4-mini version 2026-03-17, but not as Standard" in result.stderr
    assert "gpt-5.4-mini 2026-03-17 (GlobalStandard@,DataZoneStandard@2020-01-01T00:00:00Z)" in result.stderr
    assert "  gpt-5.5 2026-04-24" in result.stderr.split("as Standard:\n", 1)[1]

    (tmp_path / "closed").mkdir()
    result, _ = run_preprovision(tmp_path / "closed", {"AZURE_OPENAI_DEPLOYMENT_SKU": "DataZoneStandard"})
    assert result.returncode == 1
    assert "takes no new DataZoneStandard deployments in swedencentral since 2020-01-01" in result.stderr


def test_preprovision_checks_the_fallback_only_when_it_is_deployed(tmp_path: Path):
    env = {"AZURE_OPENAI_FALLBACK_MODEL": "gpt-4o-mini", "AZURE_OPENAI_FALLBACK_MODEL_VERSION": "2024-07-18"}
    result, _ = run_preprovision(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "fallback" not in result.stdout
    (tmp_path / "with").mkdir()
    result, _ = run_preprovision(tmp_path / "with", {**env, "AZURE_OPENAI_DEPLOY_FALLBACK": "true"})
    assert result.returncode == 1
    assert "does not offer fallback model gpt-4o-mini version 2024-07-18" in result.stderr
    assert "AZURE_OPENAI_FALLBACK_MODEL_VERSION" in result.stderr


def test_preprovision_region_and_existing_endpoint(tmp_path: Path):
    # AZURE_OPENAI_LOCATION (the account's region) wins over the main region
    result, calls = run_preprovision(tmp_path, {"AZURE_OPENAI_LOCATION": "eastus2"})
    assert result.returncode == 0, result.stderr
    assert [c[3:5] for c in calls if c[:2] == ["cognitiveservices", "model"]] == [["--location", "eastus2"]]
    # an existing endpoint creates no deployment: nothing to check, az is not called
    (tmp_path / "existing").mkdir()
    result, calls = run_preprovision(
        tmp_path / "existing",
        {"AZURE_OPENAI_EXISTING_ENDPOINT": "https://x.openai.azure.com", "AZURE_OPENAI_MODEL": "gpt-4o"},
    )
    assert result.returncode == 0 and calls == []
    # az signed out: a clear stop, not a listing of nothing
    (tmp_path / "signed-out").mkdir()
    result, _ = run_preprovision(tmp_path / "signed-out", {"FAKE_AZ_SIGNED_OUT": "1"})
    assert result.returncode == 1 and "az login" in result.stderr
