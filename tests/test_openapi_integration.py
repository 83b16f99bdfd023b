"""The OpenAPI description (shared/openapi.json) is served and true of the running service.

Schemathesis generates requests from the description (valid and invalid ones) and sends them to the
local stack: no 5xx, every status, content type, header and body as described, and data the
description forbids is refused with a 4xx. `positive_data_acceptance` is left out on purpose:
generated "images" are random bytes, which the service rightly refuses with 415.
Examples are bounded (EXAMPLES per operation) so this runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.integration
schema = schemathesis.openapi.from_path(DESCRIPTION)


def test_the_host_serves_the_description_without_a_key(stack):
    resp = urllib3.request("GET", f"{stack.host_url}/api/openapi.json", timeout=30)
    assert resp.status == 200 and resp.headers["content-type"].startswith("application/json")
    assert json.loads(resp.data) == json.loads(DESCRIPTION.read_text())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_service_matches_its_description(case, stack):
    case.call_and_validate(base_url=stack.host_url, params={"code": stack.function_key}, checks=CHECKS, timeout=60)
