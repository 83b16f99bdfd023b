"""The optional API Management gateway (infra/modules/apim.bicep, infra/apim/policy.xml), offline.

What a deployment would otherwise find out late: the policy is well-formed XML and does what the
README promises (only the app's identity gets in, one token counter shared by every instance, APIM's
own managed identity to Azure OpenAI, the backend pool), every {{named value}} it reads exists, the
pool's members have circuit breakers, and main.bicep only deploys it and points VLM_ENDPOINT at it
when useApim is on.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from test_infra import (
    EXPECTED_ROLE_IDS,
    INFRA,
    MAIN,
    called_functions,
    get,
    modules,
    outputs,
    params,
    parse_file,
    properties,
    resources,
    string_value,
    text,
    variables,
    walk,
)

APIM = INFRA / "modules" / "apim.bicep"
POLICY = INFRA / "apim" / "policy.xml"
OPENAI_ACCESS = INFRA / "modules" / "openai-access.bicep"
AZURE_OPENAI_AUDIENCE = "https://cognitiveservices.azure.com"


def policy_root(source: str | None = None) -> ET.Element:
    return ET.fromstring(source if source is not None else POLICY.read_text())


def inbound(root: ET.Element) -> list[ET.Element]:
    section = root.find("inbound")
    assert section is not None, "policy has no <inbound>"
    return list(section)


def apim_resources(type_suffix: str):
    return [r for r in resources(APIM) if r.type.split("@")[0] == f"Microsoft.ApiManagement/{type_suffix}"]


def default_of(path: Path, name: str) -> str | None:
    for node in parse_file(path).root_node.children:
        if node.type == "parameter_declaration" and text(node.named_children[0]) == name:
            return text(node.children[-1])
    return None


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


def check_policy(root: ET.Element) -> None:
    """Everything the gateway promises, in order: who, how much, as whom, where."""
    steps = [el.tag for el in inbound(root)]
    for tag in ("validate-azure-ad-token", "llm-token-limit", "authentication-managed-identity", "set-backend-service"):
        assert tag in steps, f"inbound lacks <{tag}>"
    order = [steps.index(t) for t in ("validate-azure-ad-token", "llm-token-limit", "authentication-managed-identity")]
    assert order == sorted(order), f"inbound order {steps}: validate the caller, count tokens, then authenticate out"

    validate = root.find("inbound/validate-azure-ad-token")
    ids = [el.text for el in validate.findall("client-application-ids/application-id")]
    assert ids == ["{{vlm-app-client-id}}"], "only the function app's identity may call the gateway"
    audiences = {el.text.rstrip("/") for el in validate.findall("audiences/audience")}
    assert audiences == {AZURE_OPENAI_AUDIENCE}, "the app's token is for Azure OpenAI (shared/model.py AZURE_SCOPE)"

    limit = root.find("inbound/llm-token-limit")
    key = limit.get("counter-key", "")
    # A constant key: one counter for every instance. Anything per request (an expression on the caller's
    # IP, a header, the instance) would give each Flex instance its own budget again.
    assert key and not key.startswith("@") and "{{" not in key, f"counter key {key!r} is not shared by every instance"
    assert limit.get("tokens-per-minute") == "{{vlm-gateway-tpm}}"
    assert limit.get("estimate-prompt-tokens") == "true", "refuse at the gateway before the backend is charged"
    assert limit.get("remaining-tokens-header-name") == "x-ratelimit-remaining-tokens", (
        "the gateway's shared budget is reported under Azure OpenAI's own header name"
    )

    auth = root.find("inbound/authentication-managed-identity")
    assert auth.get("resource") == AZURE_OPENAI_AUDIENCE
    assert auth.get("client-id") is None, "APIM's system-assigned identity is the one granted on the account"
    assert root.find("inbound/set-backend-service").get("backend-id") == pool_name()
    retry = root.find("backend/retry")
    assert retry is not None and retry.find("forward-request") is not None, "a tripped member falls over to the next"
    assert int(retry.get("count")) <= 3, "bounded retries"


def test_policy_is_well_formed_and_does_what_the_readme_says():
    check_policy(policy_root())


def test_policy_check_catches_a_per_instance_counter_and_a_missing_identity():
    source = POLICY.read_text()
    broken = [
        re.sub(r'counter-key="[^"]*"', 'counter-key="@(context.Request.IpAddress)"', source),
        re.sub(r"\s*<authentication-managed-identity[^>]*/>", "", source),
        re.sub(r"\s*<validate-azure-ad-token.*?</validate-azure-ad-token>", "", source, flags=re.S),
        source.replace('estimate-prompt-tokens="true"', 'estimate-prompt-tokens="false"'),
    ]
    for variant in broken:
        assert variant != source
        try:
            check_policy(policy_root(variant))
        except AssertionError:
            continue
        raise AssertionError(f"check_policy accepted a broken policy:\n{variant}")


def pool_name() -> str:
    pools = [r for r in apim_resources("service/backends") if string_value(get(r.body, "properties.type")) == "Pool"]
    assert len(pools) == 1, "expected one backend pool"
    name = get(pools[0].body, "name")
    if string_value(name) is not None:
        return string_value(name)
    return string_value(variables(APIM)[text(name)])


def test_every_named_value_the_policy_reads_is_created():
    values = [v for el in policy_root().iter() for v in (*el.attrib.values(), el.text or "")]  # comments dropped
    used = {name for v in values for name in re.findall(r"\{\{([A-Za-z0-9._-]+)\}\}", v)}
    created = {string_value(get(r.body, "name")) for r in apim_resources("service/namedValues")}
    assert used, "the policy reads no named values: the checks below test nothing"
    assert used <= created, f"policy reads named values the module does not create: {sorted(used - created)}"


def test_policy_is_loaded_from_the_file_and_waits_for_what_it_references():
    (policy,) = apim_resources("service/apis/policies")
    value = get(policy.body, "properties.value")
    assert "loadTextContent" in called_functions(value)
    loaded = [string_value(n) for n in walk(value) if n.type == "string" and string_value(n)]
    assert (APIM.parent / loaded[0]).resolve() == POLICY.resolve()
    assert string_value(get(policy.body, "properties.format")) == "rawxml"
    waits_for = {text(n) for n in get(policy.body, "dependsOn").named_children}
    symbols = {r.symbol for r in apim_resources("service/namedValues")} | {"pool"}
    assert symbols <= waits_for


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


def test_pool_members_have_circuit_breakers_on_429_and_5xx():
    members = [r for r in apim_resources("service/backends") if get(r.body, "properties.circuitBreaker")]
    assert members, "no backend with a circuit breaker"
    for member in members:
        rules = get(member.body, "properties.circuitBreaker.rules").named_children
        assert rules
        rule = rules[0]
        assert text(get(rule, "acceptRetryAfter")) == "true", "the breaker stays open as long as Azure asks"
        ranges = [
            (int(text(get(r, "min"))), int(text(get(r, "max"))))
            for r in get(rule, "failureCondition.statusCodeRanges").named_children
        ]
        assert any(lo <= 429 <= hi for lo, hi in ranges)
        assert any(lo <= 503 <= hi for lo, hi in ranges)
        assert "openai" in text(get(member.body, "properties.url"))
    pool = next(r for r in apim_resources("service/backends") if get(r.body, "properties.type"))
    services = text(get(pool.body, "properties.pool.services"))
    assert "members[i].id" in services and "priority" in services


def test_only_the_chat_completions_call_is_exposed_without_a_subscription_key():
    (api,) = apim_resources("service/apis")
    assert string_value(get(api.body, "properties.path")) == "openai"
    assert text(get(api.body, "properties.subscriptionRequired")) == "false", "Entra token instead of a key"
    ops = apim_resources("service/apis/operations")
    assert [
        (string_value(get(o.body, "properties.method")), string_value(get(o.body, "properties.urlTemplate")))
        for o in ops
    ] == [("POST", "/v1/chat/completions")]
    (service,) = apim_resources("service")
    assert string_value(get(service.body, "identity.type")) == "SystemAssigned"
    assert "gatewayUrl" in outputs(APIM) and "principalId" in outputs(APIM)


def test_consumption_tier_is_not_offered():
    """llm-token-limit does not run on the Consumption tier."""
    allowed = re.search(r"@allowed\(\[(.*?)\]\)\s*param skuName", APIM.read_text(), re.S).group(1)
    assert "Consumption" not in allowed


# ---------------------------------------------------------------------------------------------
# main.bicep wiring
# ---------------------------------------------------------------------------------------------


def main_module(symbol: str):
    return next((m for m in modules(MAIN) if m[0] == symbol), None)


def module_condition(symbol: str) -> str:
    for node in parse_file(MAIN).root_node.children:
        if node.type == "module_declaration" and text(node.named_children[0]) == symbol:
            cond = next(c for c in node.children if c.type == "if_statement")
            return text(cond.named_children[0])
    raise AssertionError(f"module {symbol} not found")


def test_use_apim_defaults_off_and_gates_the_gateway():
    assert params(MAIN)["useApim"] and default_of(MAIN, "useApim") == "false"
    assert main_module("apim")[1] == "modules/apim.bicep"
    assert "useApim" in module_condition("apim")
    supplied = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert supplied["useApim"]["value"] == "${USE_APIM=false}"


def test_vlm_endpoint_is_the_gateway_when_on_and_the_account_otherwise():
    endpoint = text(variables(MAIN)["vlmEndpoint"])
    assert re.fullmatch(r"useApim \? apim\.outputs\.gatewayUrl : openAiEndpoint", endpoint), endpoint
    _, _, fn = main_module("functionApp")
    assert text(properties(get(fn, "params"))["vlmEndpoint"]) == "vlmEndpoint"
    assert text(outputs(MAIN)["VLM_ENDPOINT"]) == "vlmEndpoint"


def test_gateway_identity_gets_openai_user_on_the_account_and_the_app_identity_is_the_only_caller():
    role_id = EXPECTED_ROLE_IDS["cognitiveServicesOpenAIUserRoleId"]
    assert text(variables(OPENAI_ACCESS)["cognitiveServicesOpenAIUserRoleId"]).strip("'") == role_id
    grants = {m[0]: m for m in modules(MAIN) if m[1] == "modules/openai-access.bicep"}
    apim_grants = [s for s in grants if "useApim" in module_condition(s)]
    assert {"createOpenAi", "grantOnExistingOpenAi"} <= {
        word for s in apim_grants for word in re.findall(r"\w+", module_condition(s))
    }, "the gateway needs the role on a new account and on an existing one"
    for symbol in apim_grants:
        principal = text(properties(get(grants[symbol][2], "params"))["identityPrincipalId"])
        assert "apim.outputs.principalId" in principal
    _, _, apim = main_module("apim")
    passed = properties(get(apim, "params"))
    assert text(passed["appClientId"]) == "identity.outputs.clientId"
    assert "tenant" in called_functions(passed["tenantId"])
