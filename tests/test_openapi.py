"""The OpenAPI description (shared/openapi.json) is OpenAPI 3.1, names every field, and the README's
API section agrees with it. That it is served and true of the running service is checked against
the local stack in test_openapi_integration.py (schemathesis)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = ROOT / "shared" / "openapi.json"


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
