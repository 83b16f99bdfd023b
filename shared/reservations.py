"""Right-sized completion budgets: learn `max_tokens` per deployment and task from observed answers.

Why: Azure charges the quota with prompt + `max_tokens` when it admits a call and refunds nothing,
so describe's 1000-token budget for ~150-token answers spends six times the quota it uses. This
module remembers the last completion sizes per (deployment, task kind) and proposes a budget of a
high percentile of them plus a margin; reasoning tokens are inside `completion_tokens`, so they are
covered. The proposal is never above the caller's budget.

Right-sized from the first call: learning is per instance, and eight instances that each reserved the
caller's budget until they had answers of their own charged the quota 6.5x what they used (and a
10 s window holds only four such calls). So a key nobody has answered yet starts from `prior` (the
`VLM_BUDGET_PRIOR_TOKENS` setting; 0 = the caller's budget), after one answer the budget is the largest
size seen x `few_margin` (a wide margin while little is known), and from `min_samples` answers on
the percentile. Reasoning models skip the prior and the few-answer guess (their reasoning length
varies too much): the caller's budget until `min_samples` answers. An answer truncated at any budget below the caller's is retried once by the router at
the caller's full budget (shared/model.py), so a guess never reaches the user as a truncation; the
full answer's size is then learned.

Memory is bounded: at most `max_keys` keys (least recently used dropped) of `window` sizes each.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

PROMPT_KEY_CHARS = 80  # the task's fixed instruction starts the prompt; a caller's question comes later


@dataclass(frozen=True)
class BudgetPolicy:
    percentile: float = 0.95
    margin: float = 1.25  # x the percentile ...
    margin_tokens: int = 32  # ... plus this, for answers a little longer than any seen
    min_samples: int = 3  # below this (and from one answer on), the largest size seen x few_margin
    few_margin: float = 2.0
    prior: int = 0  # a key with no answers yet: this budget (0: the caller's); never above the caller's
    window: int = 200  # sizes kept per key
    max_keys: int = 512


class BudgetBook:
    """Observed completion sizes per key -> the budget to reserve (see the module docstring)."""

    def __init__(self, policy: BudgetPolicy | None = None) -> None:
        self.policy = policy or BudgetPolicy()
        self._sizes: OrderedDict[str, deque[int]] = OrderedDict()

    def budget(self, key: str, full: int, *, guess: bool = True) -> int:
        """The completion budget to send: learned, or `full` (the caller's, with any reasoning allowance).

        `guess=False` (reasoning models: how long they reason varies too much to size from one answer)
        skips the prior and the few-answer margin: the caller's budget until `min_samples` answers."""
        sizes = self._sizes.get(key)
        if not guess and (sizes is None or len(sizes) < self.policy.min_samples):
            return full
        if not sizes:
            return max(1, min(full, self.policy.prior)) if self.policy.prior > 0 else full
        self._sizes.move_to_end(key)
        if len(sizes) < self.policy.min_samples:
            return max(1, min(full, math.ceil(max(sizes) * self.policy.few_margin) + self.policy.margin_tokens))
        ordered = sorted(sizes)
        rank = min(len(ordered) - 1, max(0, math.ceil(self.policy.percentile * len(ordered)) - 1))
        learned = math.ceil(ordered[rank] * self.policy.margin) + self.policy.margin_tokens
        return max(1, min(full, learned))

    def observe(self, key: str, completion_tokens: int) -> None:
        """Record one complete (not truncated) answer's size, reasoning tokens included."""
        if completion_tokens < 0:
            return
        sizes = self._sizes.get(key)
        if sizes is None:
            sizes = self._sizes[key] = deque(maxlen=self.policy.window)
            while len(self._sizes) > self.policy.max_keys:
                self._sizes.popitem(last=False)
        else:
            self._sizes.move_to_end(key)
        sizes.append(int(completion_tokens))

    def __len__(self) -> int:
        return len(self._sizes)


def budget_key(deployment: str, messages: list[dict[str, Any]], response_format: dict[str, Any] | None) -> str:
    """What makes answers comparable: the deployment, the task's instruction (the start of the user
    prompt) and the response format's name. A digest, so caller text is never kept."""
    prompt = ""
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            prompt = content
        elif isinstance(content, list):
            prompt = next((p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"), "")
        break
    fmt = ""
    if response_format:
        schema = response_format.get("json_schema")
        fmt = f"{response_format.get('type', '')}:{schema.get('name', '') if isinstance(schema, dict) else ''}"
    digest = hashlib.sha256(f"{prompt[:PROMPT_KEY_CHARS]}\x00{fmt}".encode()).hexdigest()[:16]
    return f"{deployment}:{digest}"
