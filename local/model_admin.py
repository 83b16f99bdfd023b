"""A small client for the local model server's test endpoints: request counts, faults, quota, config.

Used by the integration tests, the soak test and the benchmarks; plain urllib, so it works
from synchronous test code and scripts alike.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any


class ModelAdmin:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={"content-type": "application/json"},
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

    def config(self, **body: Any) -> None:
        self.call("/admin/config", body)

    def model(self, **body: Any) -> dict[str, Any]:
        """Change the model the server plays (model_name, reasoning, image_tokens, deployments, ...)."""
        return self.call("/admin/model", body)["model"]
