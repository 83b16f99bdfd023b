"""The OpenAPI description (shared/openapi.json) is valid, served, and true of the running service.

Schemathesis generates requests from the description (valid and invalid ones) and sends them to the
local stack: no 5xx, every status, content type, header and body as described, and data the
description forbids is refused with a 4xx. `positive_data_acceptance` is left out on purpose:
generated "images" are random bytes, which the service rightly refuses with 415.
Examples are bounded (EXAMPLES per operation) so this runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import schemathesis
import urllib3
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = ROOT / "shared" / "openapi.json"
EXAMPLES = 50
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

schema = schemathesis.openapi.from_path(DESCRIPTION)


def test_the_description_is_openapi_3_1_and_names_every_field():
    doc = json.loads(DESCRIPTION.read_text())
    assert doc["openapi"].startswith("3.1")
    post = doc["paths"]["/api/analyze"]["post"]
    kinds = post["requestBody"]["content"]
    assert set(kinds) == {"multipart/form-data", "application/json", "application/octet-stream"}
    fields = {"task", "prompt", "detail", "schema", "labels", "max_tokens", "pages", "strips", "reasoning_effort"}
    assert fields <= set(kinds["multipart/form-data"]["schema"]["properties"])
    assert fields <= set(kinds["application/json"]["schema"]["properties"])
    assert fields <= {p["name"] for p in post["parameters"]}
    effort = kinds["application/json"]["schema"]["properties"]["reasoning_effort"]["enum"]
    assert effort == ["none", "minimal", "low", "medium", "high", "xhigh"]
    usage = doc["components"]["schemas"]["Usage"]["required"]
    assert set(usage) == {
        "prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "total_tokens",
        "estimated_prompt_tokens",
        "estimated_image_tokens",
    }
    for status, response in post["responses"].items():
        if status != "200" and "content" in response:
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


def test_the_readme_documents_the_same_fields_and_error_codes():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## HTTP API", 1)[1].split("\n## ", 1)[0]
    doc = json.loads(DESCRIPTION.read_text())
    post = doc["paths"]["/api/analyze"]["post"]
    for name in post["requestBody"]["content"]["application/json"]["schema"]["properties"]:
        assert f"`{name}`" in section, f"README's API section does not document {name}"
    for status in post["responses"]:
        assert re.search(rf"\b{status}\b", section), f"README's API section lacks status {status}"
    assert "/api/openapi.json" in section


@pytest.mark.integration
def test_the_host_serves_the_description_without_a_key(stack):
    resp = urllib3.request("GET", f"{stack.host_url}/api/openapi.json", timeout=30)
    assert resp.status == 200 and resp.headers["content-type"].startswith("application/json")
    assert json.loads(resp.data) == json.loads(DESCRIPTION.read_text())


@pytest.mark.integration
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_service_matches_its_description(case, stack):
    case.call_and_validate(base_url=stack.host_url, params={"code": stack.function_key}, checks=CHECKS, timeout=60)
