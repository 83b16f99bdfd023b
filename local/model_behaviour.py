"""Which model the local server plays: its name, parameter style, reasoning, image counting, deployments.

Set per start by CLI flags (`--model-name`, `--reasoning`, `--image-tokens`, `--deployments`, ...) and
at run time through `POST /admin/model` (local.model_admin.ModelAdmin.model). `/admin/reset` goes back
to what the server started with, so one test's model never leaks into the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from local.model_params import (
    DEFAULT_EFFORT,
    DEFAULT_EFFORTS,
    DEFAULT_REASONING_TOKENS,
    parse_efforts,
    parse_reasoning_tokens,
)
from local.model_tokens import DEFAULT_SPEC, ImageTokenRule, ImageTokenSpecError, parse_image_tokens

# Azure's answer for a deployment name the resource does not have (seen in
# github.com/Azure-Samples/azure-search-openai-demo-csharp/issues/379 and chatboxai/chatbox#861).
DEPLOYMENT_NOT_FOUND = {
    "error": {
        "code": "DeploymentNotFound",
        "message": "The API deployment for this resource does not exist. If you created the deployment within the "
        "last 5 minutes, please wait a moment and try again.",
    }
}


@dataclass(frozen=True)
class ModelBehaviour:
    model_name: str
    reasoning: bool = False  # reasoning-model parameters (see local.model_params)
    efforts: tuple[str, ...] = DEFAULT_EFFORTS
    default_effort: str = DEFAULT_EFFORT
    reasoning_tokens: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_REASONING_TOKENS))
    image_rule: ImageTokenRule = field(default_factory=lambda: parse_image_tokens(DEFAULT_SPEC))
    deployments: tuple[str, ...] = ()  # empty: every deployment name exists

    def knows(self, deployment: str) -> bool:
        return not self.deployments or deployment in self.deployments

    def state(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "reasoning": self.reasoning,
            "reasoning_efforts": list(self.efforts),
            "default_reasoning_effort": self.default_effort,
            "reasoning_tokens": dict(self.reasoning_tokens),
            "image_tokens": self.image_rule.spec,
            "deployments": list(self.deployments),
        }

    def updated(self, body: dict[str, Any]) -> ModelBehaviour:
        """A copy with the fields `body` names (the /admin/model body); ValueError on a bad value."""
        known = set(self.state())
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; use {sorted(known)}")
        changes: dict[str, Any] = {}
        if "model_name" in body:
            name = body["model_name"]
            if not isinstance(name, str) or not name.strip() or len(name) > 200:
                raise ValueError("model_name must be a non-empty string of at most 200 characters")
            changes["model_name"] = name.strip()
        if "reasoning" in body:
            if not isinstance(body["reasoning"], bool):
                raise ValueError("reasoning must be a boolean")
            changes["reasoning"] = body["reasoning"]
        if "reasoning_efforts" in body:
            changes["efforts"] = parse_efforts(body["reasoning_efforts"])
        if "default_reasoning_effort" in body:
            changes["default_effort"] = body["default_reasoning_effort"]
        if "reasoning_tokens" in body:
            changes["reasoning_tokens"] = parse_reasoning_tokens(body["reasoning_tokens"])
        if "image_tokens" in body:
            try:
                changes["image_rule"] = parse_image_tokens(body["image_tokens"])
            except ImageTokenSpecError as exc:
                raise ValueError(str(exc)) from exc
        if "deployments" in body:
            changes["deployments"] = parse_deployments(body["deployments"])
        new = replace(self, **changes)
        if new.default_effort not in new.efforts:
            raise ValueError(f"default_reasoning_effort {new.default_effort!r} is not one of {list(new.efforts)}")
        return new


def parse_deployments(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'vision,backup' (or a list) -> names; empty means any name is a deployment."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not all(isinstance(s, str) for s in items):
        raise ValueError("deployments must be a comma-separated string or a list of strings")
    return tuple(s.strip() for s in items if s.strip())
