"""HTTP trigger: GET /api/openapi.json, the OpenAPI 3.1 description of POST /api/analyze.

Anonymous on purpose: the description holds no secret (the analyze endpoint itself still needs
the function key), and API tools and portals can read it without one. The file is read once per
worker, on the first call, so importing this module costs nothing at cold start.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import azure.functions as func

DESCRIPTION = Path(__file__).resolve().parent.parent / "shared" / "openapi.json"


@cache
def description() -> bytes:
    return DESCRIPTION.read_bytes()


def main(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        description(),
        status_code=200,
        mimetype="application/json",
        charset="utf-8",
        headers={"Cache-Control": "public, max-age=300"},
    )
