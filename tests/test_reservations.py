"""Learned completion budgets: a percentile plus a margin, never above the caller's, bounded memory;
an answer cut at a learned budget is asked again at the full one (no truncation of our making)."""

from __future__ import annotations

from typing import Any

from shared.model import ChatRequest, ModelRouter
from shared.reservations import BudgetBook, BudgetPolicy, budget_key
from shared.settings import Settings
from tests.constants import TEST_DEPLOYMENT
from tests.fakes import Reply, ScriptedModel, completion

ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}


def _request(prompt: str = "Describe the image.", max_tokens: int = 1000) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        max_tokens=max_tokens,
        estimated_tokens=100 + max_tokens,
    )


def _sized(completion_tokens: int, finish_reason: str = "stop") -> Reply:
    body = completion("x", finish_reason=finish_reason)
    body["usage"]["completion_tokens"] = completion_tokens
    return Reply(body=body)


def test_no_answers_yet_the_prior_never_above_the_callers_or_the_callers_without_one() -> None:
    assert BudgetBook(BudgetPolicy(prior=384)).budget("k", 1000) == 384
    assert BudgetBook(BudgetPolicy(prior=384)).budget("k", 200) == 200
    assert BudgetBook(BudgetPolicy(prior=0)).budget("k", 1000) == 1000


def test_without_a_guess_the_callers_budget_until_enough_answers_were_seen() -> None:
    book = BudgetBook(BudgetPolicy(min_samples=3, prior=384))
    for size in (150, 160):
        assert book.budget("k", 5000, guess=False) == 5000
        book.observe("k", size)
    assert book.budget("k", 5000, guess=False) == 5000
    book.observe("k", 150)
    assert book.budget("k", 5000, guess=False) == 232  # ceil(160 x 1.25) + 32


def test_from_one_answer_the_largest_size_with_a_wide_margin_until_enough_were_seen() -> None:
    book = BudgetBook(BudgetPolicy(min_samples=3, few_margin=2.0, margin_tokens=32, prior=384))
    book.observe("k", 150)
    assert book.budget("k", 1000) == 332  # 150 x 2 + 32: right-sized from the first answer on
    book.observe("k", 240)
    assert book.budget("k", 1000) == 512  # the largest of the few
    assert book.budget("k", 400) == 400  # never above the caller's
    book.observe("k", 100)
    assert book.budget("k", 1000) == 332  # three answers: the percentile (240 x 1.25 + 32)


def test_a_high_percentile_plus_margin_never_above_the_callers_budget() -> None:
    book = BudgetBook(BudgetPolicy(percentile=0.95, margin=1.25, margin_tokens=32, min_samples=3))
    for size in [100] * 19 + [200]:
        book.observe("k", size)
    assert book.budget("k", 1000) == 100 * 1.25 + 32  # the 95th of 20 sizes is the 19th: one outlier is ignored
    book.observe("k", 900)
    book.observe("k", 900)
    assert book.budget("k", 1000) == 1000  # 900 x 1.25 + 32 is over the caller's budget: capped
    assert book.budget("k", 300) == 300


def test_memory_is_bounded_in_keys_and_sizes() -> None:
    book = BudgetBook(BudgetPolicy(window=5, max_keys=3, min_samples=1))
    for n in range(10):
        book.observe(f"k{n}", 10)
    assert len(book) == 3
    for size in [1000] * 5 + [10] * 5:
        book.observe("k9", size)
    assert book.budget("k9", 5000) == 45  # ceil(10 x 1.25) + 32: the old sizes left the window


def test_the_key_ignores_the_callers_text_after_the_instruction_and_keeps_no_text() -> None:
    a = budget_key("d", [{"role": "user", "content": "Answer the question. " + "q1" * 100}], None)
    b = budget_key("d", [{"role": "user", "content": "Answer the question. " + "q2" * 100}], None)
    other = budget_key("d", [{"role": "user", "content": "Describe the image."}], None)
    assert a != other and "Answer" not in a
    assert budget_key("d2", [{"role": "user", "content": "Describe the image."}], None) != other
    assert len({a, b}) in (1, 2)  # same start; the digest covers only the first characters
    fmt: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "invoice"}}
    assert budget_key("d", [{"role": "user", "content": "Describe the image."}], fmt) != other


async def test_the_router_reserves_the_prior_then_the_learned_budget() -> None:
    model = ScriptedModel(default=lambda body: _sized(150))
    router = ModelRouter(Settings.from_env(ENV), client_factory=model.client_factory())
    for _ in range(4):
        result = await router.complete(_request())
        assert result.finish_reason == "stop"
    budgets = [r["max_tokens"] for r in model.requests]
    assert budgets == [384, 332, 332, 220]  # the prior; 150 x 2 + 32 while few; ceil(150 x 1.25) + 32


async def test_without_a_prior_the_first_call_reserves_the_callers_budget() -> None:
    model = ScriptedModel(default=lambda body: _sized(150))
    settings = Settings.from_env({**ENV, "VLM_BUDGET_PRIOR_TOKENS": "0"})
    router = ModelRouter(settings, client_factory=model.client_factory())
    await router.complete(_request())
    assert model.requests[0]["max_tokens"] == 1000


async def test_an_answer_cut_at_the_prior_is_asked_again_at_the_callers_budget_and_learned() -> None:
    model = ScriptedModel(
        default=lambda body: _sized(body["max_tokens"], "length") if body["max_tokens"] < 600 else _sized(600)
    )
    router = ModelRouter(Settings.from_env(ENV), client_factory=model.client_factory())
    result = await router.complete(_request())
    assert (result.finish_reason, result.completion_tokens) == ("stop", 600)
    await router.complete(_request())
    assert [r["max_tokens"] for r in model.requests] == [384, 1000, 1000]  # 600 x 2 + 32 is over 1000: capped
    assert router.retried_truncations == 1


async def test_an_answer_cut_at_the_learned_budget_is_asked_again_at_the_callers_budget() -> None:
    def reply(body: dict) -> Reply:
        return _sized(body["max_tokens"], "length") if body["max_tokens"] < 400 else _sized(400)

    sizes = iter([150, 150, 150])
    model = ScriptedModel(default=lambda body: _sized(next(sizes)) if len(model.requests) <= 3 else reply(body))
    router = ModelRouter(Settings.from_env(ENV), client_factory=model.client_factory())
    for _ in range(3):
        await router.complete(_request())
    result = await router.complete(_request())  # would be cut at the learned 220: asked again at 1000
    assert (result.finish_reason, result.completion_tokens) == ("stop", 400)
    assert [r["max_tokens"] for r in model.requests[:3]] == [384, 332, 332]
    assert [r["max_tokens"] for r in model.requests[3:]] == [220, 1000]
    assert router.retried_truncations == 1


async def test_truncation_at_the_callers_own_budget_is_not_retried() -> None:
    model = ScriptedModel(default=lambda body: _sized(body["max_tokens"], "length"))
    router = ModelRouter(Settings.from_env(ENV), client_factory=model.client_factory())
    try:
        await router.complete(_request(max_tokens=50))
    except Exception as err:  # OutputTruncated: the caller's budget was too small, which is theirs to raise
        assert type(err).__name__ == "OutputTruncated"
    assert len(model.requests) == 1 and router.retried_truncations == 0


async def test_a_429_is_retried_through_the_limiter_not_by_the_sdk() -> None:
    """The SDK's own retries would all wake at the same retry-after and bypass the limiter; the router
    makes them instead, each one admitted again by the limiter (paused until the retry-after)."""
    throttled = Reply(429, {"error": {"code": "429", "message": "slow down"}}, {"retry-after-ms": "1"})
    model = ScriptedModel(script={TEST_DEPLOYMENT: [throttled, Reply()]})
    router = ModelRouter(Settings.from_env(ENV), client_factory=model.client_factory(max_retries=2))
    result = await router.complete(_request())
    assert result.deployment == TEST_DEPLOYMENT and len(model.requests) == 2
    stats = router.limiter(Settings.from_env(ENV).primary).stats()
    assert stats["acquired"] == 2 and stats["throttles"] == 1  # two admissions: the retry went through it
