"""HTTP trigger: POST /api/analyze. Translates Functions types to and from shared.http_api.

The worker's App (shared.app.get_app) is fetched inside handle_analyze, so a configuration
error answers with the JSON error shape like every other failure.
"""

from __future__ import annotations

import azure.functions as func

from shared.http_api import HttpInput, handle_analyze


async def main(req: func.HttpRequest) -> func.HttpResponse:
    out = await handle_analyze(
        HttpInput(
            method=req.method,
            headers={k.lower(): v for k, v in req.headers.items()},
            params=dict(req.params),
            body=req.get_body() or b"",
        )
    )
    return func.HttpResponse(
        out.json_bytes(), status_code=out.status, headers=out.headers, mimetype="application/json", charset="utf-8"
    )
