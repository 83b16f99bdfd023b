"""What a worker has learned about each deployment: its model, its parameter style, its token ratio.

Why: a deployment's name says nothing reliable about its model (a deployment named
`vision` may run gpt-5.4-mini). The model comes from VLM_MODEL / a fallback's `=model`,
or else from the first answer's `model` field; the catalog entry for it then decides
image accounting, parameter style and prices. When an endpoint refuses a parameter
anyway, the style switches for that deployment and stays switched. One `DeploymentBook`
per worker, shared by the router (which writes it) and the pipeline (which reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .calibration import Calibration
from .catalog import EFFORTS, Catalog, Family, ImageTokens, load_catalog

if TYPE_CHECKING:
    from .settings import ModelTarget, Settings

# Azure's 400 for a parameter a model does not take, e.g. {"code": "unsupported_parameter",
# "param": "max_tokens", "message": "Unsupported parameter: 'max_tokens' is not supported with this
# model. Use 'max_completion_tokens' instead."} or {"code": "unsupported_value", "param":
# "temperature", "message": "Unsupported value: 'temperature' does not support 0 with this model.
# Only the default (1) value is supported."} (as reported in
# https://github.com/lobehub/lobehub/issues/5909 and https://github.com/gabrii/Cursor-Azure-GPT-5/issues/33).
ADAPTABLE_CODES = ("unsupported_parameter", "unsupported_value")
ADAPTABLE_PARAMS = ("max_tokens", "max_completion_tokens", "temperature", "reasoning_effort")


@dataclass(frozen=True)
class ParamStyle:
    """How a deployment takes the completion budget, temperature and reasoning effort."""

    name: str  # "chat" or "reasoning", for logs and tests
    budget_param: str  # "max_tokens" or "max_completion_tokens"
    temperature: bool  # send temperature=0 (chat models); reasoning models refuse it
    effort: bool  # send reasoning_effort
    refused_efforts: frozenset[str] = frozenset()  # values the endpoint answered unsupported_value for


CHAT = ParamStyle("chat", "max_tokens", temperature=True, effort=False)
REASONING = ParamStyle("reasoning", "max_completion_tokens", temperature=False, effort=True)


def adapt(style: ParamStyle, param: str, code: str, effort: str | None) -> ParamStyle | None:
    """The style to retry with after a 400 for `param`, or None when that 400 is not about style."""
    if code not in ADAPTABLE_CODES or param not in ADAPTABLE_PARAMS:
        return None
    if param in ("max_tokens", "temperature"):
        return REASONING if style != REASONING else replace(style, temperature=False)
    if param == "max_completion_tokens":
        return CHAT
    # reasoning_effort: a model without reasoning refuses the parameter; a reasoning model the value
    if code == "unsupported_parameter" or effort is None:
        return replace(style, effort=False)
    return replace(style, refused_efforts=style.refused_efforts | {effort})


def choose_effort(wanted: str | None, family: Family | None, style: ParamStyle) -> str | None:
    """The effort to send: the wanted one, or the next higher one the model takes (catalog, refusals)."""
    if not style.effort or wanted is None or wanted not in EFFORTS:
        return None
    offered = family.reasoning_efforts if family and family.reasoning_efforts else EFFORTS
    allowed = [e for e in offered if e not in style.refused_efforts]
    for effort in EFFORTS[EFFORTS.index(wanted) :]:
        if effort in allowed:
            return effort
    return allowed[-1] if allowed else None


@dataclass
class _Deployment:
    learned_model: str | None = None
    style: ParamStyle | None = None  # set once the endpoint refused the catalog's style
    calibration: Calibration = field(default_factory=Calibration)


class DeploymentBook:
    """Per-deployment knowledge for one worker (see the module docstring)."""

    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or load_catalog(settings.vlm_model_catalog)
        self._entries: dict[str, _Deployment] = {}

    def _get(self, target: ModelTarget) -> _Deployment:
        entry = self._entries.get(target.label)
        if entry is None:
            entry = self._entries[target.label] = _Deployment(
                calibration=Calibration(window=self.settings.vlm_calibration_window)
            )
        return entry

    # --- the model ---------------------------------------------------------------------

    def model(self, target: ModelTarget) -> str | None:
        """The model behind a deployment: as last reported by it, else as configured, else unknown."""
        return self._get(target).learned_model or target.model

    def family(self, target: ModelTarget) -> Family | None:
        entry = self._get(target)
        return self.catalog.lookup(entry.learned_model) or self.catalog.lookup(target.model)

    def learn(self, target: ModelTarget, reported_model: str | None) -> None:
        """Remember the model an answer reports (a deployment can be upgraded in place: latest wins)."""
        if reported_model:
            self._get(target).learned_model = reported_model[:200]

    def identity(self, target: ModelTarget) -> str:
        """What a cached answer is keyed on: the deployment and the family (or name) of its model."""
        family = self.family(target)
        name = family.family if family else (self.model(target) or "").lower()
        return f"{target.label}|{name}"

    def image_tokens(self, target: ModelTarget) -> ImageTokens:
        family = self.family(target)
        if family is not None and family.image_tokens.complete:
            return family.image_tokens
        return self.catalog.unknown_image_tokens()

    # --- parameters --------------------------------------------------------------------

    def style(self, target: ModelTarget) -> ParamStyle:
        """What the endpoint has shown it takes, else what the catalog says, else chat."""
        entry = self._get(target)
        if entry.style is not None:
            return entry.style
        family = self.family(target)
        return REASONING if family is not None and family.parameters == "reasoning" else CHAT

    def set_style(self, target: ModelTarget, style: ParamStyle) -> None:
        self._get(target).style = style

    def completion_budget(self, target: ModelTarget, max_tokens: int, style: ParamStyle) -> int:
        """max_tokens, plus the reasoning allowance for reasoning models, within the model's output limit."""
        budget = max_tokens + (self.settings.vlm_reasoning_allowance if style.budget_param != "max_tokens" else 0)
        family = self.family(target)
        if family is not None and family.max_output_tokens:
            budget = min(budget, max(max_tokens, family.max_output_tokens))
        return budget

    # --- calibration -------------------------------------------------------------------

    def calibration(self, target: ModelTarget) -> Calibration:
        return self._get(target).calibration
