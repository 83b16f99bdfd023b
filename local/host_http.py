"""HTTP triggers on aiohttp: routes, methods, function keys, and the request/response mapping.

Routes are `/<routePrefix>/<route or folder name>` (routePrefix from host.json, default `api`),
with `{param}`, `{param?}`, `{param:int}` and `{*rest}` templates. A function whose `authLevel`
is `function` or `admin` needs the key in the `LOCAL_FUNCTION_KEY` setting, sent as the
`x-functions-key` header or the `code` query parameter; so does `GET /admin/host/status` (the real
host guards its admin API with the master key; here the one local key stands for both). A key
that is not valid UTF-8 is simply a wrong key (401). The function gets a real
`azure.functions.HttpRequest` and its `HttpResponse` is sent back with the worker's content-type
rule (`text/*` mimetypes get `; charset=...`).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import azure.functions as func
from aiohttp import web
from azure.functions.http import HttpRequest as WorkerHttpRequest
from multidict import CIMultiDict

from local.host_blob import InvocationLogger
from local.host_loader import LoadedFunction

log = logging.getLogger("local.host")

ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE")
STATUS_PATH = "/admin/host/status"

_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "bool": r"(?:true|false)",
    "alpha": r"[A-Za-z]+",
    "guid": r"[0-9A-Fa-f]{8}-?(?:[0-9A-Fa-f]{4}-?){3}[0-9A-Fa-f]{12}",
    "double": r"-?\d+(?:\.\d+)?",
    "float": r"-?\d+(?:\.\d+)?",
    "decimal": r"-?\d+(?:\.\d+)?",
}


def compile_route(prefix: str, route: str) -> re.Pattern[str]:
    """An ASP.NET-style route template as a case-insensitive regex over the URL path."""
    segments = [s for s in f"{prefix.strip('/')}/{route.strip('/')}".split("/") if s]
    out = ""
    for seg in segments:
        m = re.fullmatch(r"\{(\*)?([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z]+)(?:\([^)]*\))?)?(\?)?\}", seg)
        if not m:
            out += "/" + re.escape(seg)
            continue
        catch_all, name, constraint, optional = m.groups()
        if catch_all:
            out += f"(?:/(?P<{name}>.*))?"
        else:
            body = _CONSTRAINTS.get((constraint or "").lower(), r"[^/]+")
            out += f"(?:/(?P<{name}>{body})){'?' if optional else ''}"
    return re.compile("^" + (out or "/") + "/?$", re.IGNORECASE)


def error_body(code: str, message: str) -> bytes:
    """The app's error shape ({"error": {"code", "message", "details"}}) for the host's own refusals."""
    return json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()


def json_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(code, message), content_type="application/json", headers=headers)


@dataclass(frozen=True)
class HttpRoute:
    fn: LoadedFunction
    template: str
    regex: re.Pattern[str]
    methods: tuple[str, ...]
    auth_level: str

    @classmethod
    def from_function(cls, fn: LoadedFunction, route_prefix: str) -> HttpRoute:
        trig = fn.spec.trigger
        template = str(trig.get("route") or fn.spec.name)
        methods = tuple(m.upper() for m in (trig.get("methods") or ALL_METHODS))
        return cls(
            fn=fn,
            template=template,
            regex=compile_route(route_prefix, template),
            methods=methods,
            auth_level=str(trig.get("authLevel", "function")).lower(),
        )


def to_aiohttp_response(result: Any) -> web.Response:
    """Whatever `main` returned, as the worker would send it."""
    if result is None:
        return web.Response(status=204)
    if isinstance(result, str):
        return web.Response(
            status=200, body=result.encode("utf-8"), headers={"Content-Type": "text/plain; charset=utf-8"}
        )
    if isinstance(result, bytes | bytearray):
        return web.Response(status=200, body=bytes(result), headers={"Content-Type": "application/octet-stream"})
    if not isinstance(result, func.HttpResponse):
        raise TypeError(
            f"an HTTP function must return azure.functions.HttpResponse, str or None, not {type(result).__name__}"
        )
    headers: CIMultiDict[str] = CIMultiDict()
    for k, v in result.headers.items():
        headers.add(k, v)
    if "content-type" not in headers:
        mimetype = result.mimetype or "text/plain"
        headers["Content-Type"] = f"{mimetype}; charset={result.charset}" if mimetype.startswith("text/") else mimetype
    headers.pop("Content-Length", None)
    headers.pop("Transfer-Encoding", None)
    return web.Response(status=result.status_code, body=result.get_body() or b"", headers=headers)


class HttpFrontEnd:
    """The aiohttp application serving every HTTP-triggered function plus the admin status."""

    def __init__(
        self,
        routes: list[HttpRoute],
        *,
        function_key: Callable[[], str | None],
        status: Callable[[], dict[str, Any]],
        timeout_s: float | None,
        log_invocation: InvocationLogger,
        max_body_bytes: int,
    ) -> None:
        self.routes = routes
        self._function_key = function_key
        self._status = status
        self._timeout_s = timeout_s
        self._log_invocation = log_invocation
        self.app = web.Application(client_max_size=max_body_bytes)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    def _authorized(self, request: web.Request, route: HttpRoute | None) -> tuple[bool, str]:
        """`route` None is the host's own admin status, which always needs the key."""
        if route is not None and route.auth_level == "anonymous":
            return True, ""
        expected = self._function_key()
        if not expected:
            return False, "this function needs a key and LOCAL_FUNCTION_KEY is not set on the host"
        given = request.headers.get("x-functions-key") or request.query.get("code")
        if not given:
            return False, "missing function key: send the x-functions-key header or the code query parameter"
        # undecodable header bytes arrive as surrogate escapes: compare bytes, never raise
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
            return False, "invalid function key"
        return True, ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.rstrip("/").lower() == STATUS_PATH:
            if request.method not in ("GET", "HEAD"):
                return json_response(405, "method_not_allowed", "use GET", {"Allow": "GET, HEAD"})
            ok, why = self._authorized(request, None)
            if not ok:
                return json_response(401, "unauthorized", why)
            return web.json_response(self._status())
        matches = [(r, m) for r in self.routes if (m := r.regex.match(path))]
        if not matches:
            return json_response(404, "not_found", f"no function is bound to {path}")
        chosen = next(((r, m) for r, m in matches if request.method in r.methods), None)
        if chosen is None:
            allowed = sorted({meth for r, _ in matches for meth in r.methods})
            return json_response(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {path}; allowed: {', '.join(allowed)}",
                {"Allow": ", ".join(allowed)},
            )
        route, match = chosen
        ok, why = self._authorized(request, route)
        if not ok:
            return json_response(401, "unauthorized", why)
        route_params = {k: v for k, v in match.groupdict().items() if v is not None}
        return await self._invoke(request, route, route_params)

    async def _invoke(self, request: web.Request, route: HttpRoute, route_params: dict[str, str]) -> web.StreamResponse:
        body = await request.read()
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        params: dict[str, str] = {}
        for k, v in request.query.items():
            params.setdefault(k, v)
        req = WorkerHttpRequest(
            method=request.method,
            url=str(request.url),
            headers=headers,
            params=params,
            route_params=route_params,
            body_type="bytes",
            body=body,
        )
        invocation_id = str(uuid.uuid4())
        started = time.monotonic()
        error: BaseException | None = None
        try:
            result = await route.fn.invoke(req, invocation_id=invocation_id, timeout_s=self._timeout_s)
            response = to_aiohttp_response(result)
        except Exception as e:
            error = e
            response = json_response(
                500,
                "internal_error",
                f"Exception while executing function: Functions.{route.fn.spec.name} (invocation {invocation_id})",
            )
        self._log_invocation(
            route.fn.spec.name,
            "http",
            invocation_id,
            time.monotonic() - started,
            error,
            f"{request.method} {request.path} -> {response.status}",
        )
        return response
