"""The local model server's admin API, both sides: the guard in front of `/admin/*` and a small client.

The admin endpoints change how the server behaves for everyone (faults, quota, latency), so they
are not open to whatever can reach the port. Each start makes a fresh admin token; a request
to `/admin/*` must carry it as `Authorization: Bearer <token>`, and a POST must be
`Content-Type: application/json`. A web page in a browser can send neither a custom
`Authorization` header nor a JSON content type to another origin without a CORS preflight, which
this server never grants, so a page cannot drive it. Every numeric knob is bounded
(`bounded_number`), so `latency_ms: 1e308` is a 400, not a request held forever.

`python -m local.model_server --admin-token-file PATH` writes the token there (the local stack
uses `.local/model-admin-token`); the client reads it with `read_token`. The client is plain
urllib, so it works from synchronous test code and scripts alike.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

ADMIN_PREFIX = "/admin/"
ADMIN_TOKEN_FILE = "model-admin-token"  # under the stack's data folder (.local/ for `make run`)
READ_METHODS = ("GET", "HEAD")


def new_admin_token() -> str:
    return secrets.token_urlsafe(24)


def write_token(path: Path | str, token: str) -> Path:
    """Write the token readable by its owner only (0600), replacing any earlier one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
    return path


def read_token(path: Path | str) -> str:
    return Path(path).read_text().strip()


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return web.json_response(body, status=status)


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison that also copes with header bytes that are not UTF-8."""
    if not given or not expected:
        return False
    # aiohttp hands undecodable header bytes over as surrogate escapes; compare bytes, never raise
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def admin_guard(token: Callable[[], str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware: `/admin/*` needs the bearer token, and a POST needs a JSON content type."""

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if not request.path.startswith(ADMIN_PREFIX):
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token_matches(given.strip(), token()):
            return _error(
                401,
                "the admin API needs 'Authorization: Bearer <token>' (the token is in the file given by "
                "--admin-token-file, .local/model-admin-token under `make run`)",
                "unauthorized",
            )
        if request.method not in READ_METHODS and request.content_type != "application/json":
            return _error(415, "admin requests must be sent as Content-Type: application/json", "unsupported_media")
        return await handler(request)

    return guard


def bounded_number(
    body: Mapping[str, Any], key: str, default: float, *, lo: float, hi: float, integer: bool = False
) -> Any:
    """`body[key]` (or `default`) as a finite number in [lo, hi]; ValueError naming the knob otherwise.

    Booleans, strings and non-finite values (NaN, inf, 1e400) are refused rather than coerced.
    """
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number")
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{key} must be a whole number")
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be between {lo:g} and {hi:g}")
    return int(value) if integer else float(value)


class ModelAdmin:
    """Client for /stats and the token-guarded /admin/* endpoints."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(
            self.url + path, data=data, method="GET" if body is None else "POST", headers=headers
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def stats(self) -> dict[str, Any]:
        return self.call("/stats")

    def requests(self) -> int:
        """Chat requests the server has received (every attempt, whatever its outcome)."""
        return int(self.stats()["requests"])

    def reset(self) -> None:
        self.call("/admin/reset", {})

    def faults(self, **body: Any) -> None:
        self.call("/admin/faults", body)

    def quota(self, **body: Any) -> None:
        self.call("/admin/quota", body)

    def quota_timeline(self) -> list[list[Any]]:
        """Every quota decision since the last reset: [seconds, tokens, admitted]."""
        return list(self.call("/admin/quota/timeline")["timeline"])

    def config(self, **body: Any) -> None:
        self.call("/admin/config", body)

    def batch(self, **body: Any) -> dict[str, Any]:
        """Batch API knobs (local/model_batch.py): turnaround_s, enqueued_tokens, fail_fast, fail_custom_ids."""
        return self.call("/admin/batch", body)["batch"]

    def batch_job(self, batch_id: str, action: str, after: int = 0) -> dict[str, Any]:
        """End a job: action fail | expire | cancel, after `after` more lines are answered."""
        return self.call(f"/admin/batches/{batch_id}", {"action": action, "after": after})

    def batch_stats(self) -> dict[str, Any]:
        """Batch lines answered and failed, and custom_ids answered more than once (should stay 0)."""
        return dict(self.stats()["batch"])

    def model(self, **body: Any) -> dict[str, Any]:
        """Change the model the server plays (model_name, reasoning, image_tokens, deployments, ...)."""
        return self.call("/admin/model", body)["model"]
