"""The application object: one per worker and loop, no registries, bounded task-config memory."""

from __future__ import annotations

import asyncio

import pytest

import shared.app as app_module
from shared.app import App, close_app, get_app
from shared.blob_job import TaskResolver
from shared.settings import Settings
from tests.blob_fakes import FakeBlobService
from tests.constants import TEST_DEPLOYMENT

ENV = {
    "VLM_ENDPOINT": "http://127.0.0.1:1/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    s = Settings.from_env(ENV)
    monkeypatch.setattr("shared.settings.get_settings", lambda: s)
    monkeypatch.setattr(app_module, "_app", None)
    return s


def test_one_app_per_loop_and_a_new_loop_gets_a_new_app(settings: Settings) -> None:
    async def twice() -> tuple[App, App]:
        return get_app(), get_app()

    a1, a2 = asyncio.run(twice())
    assert a1 is a2 and a1.settings is settings and a1.book is a1.model.book
    b1, _ = asyncio.run(twice())  # another loop: its aio clients could not serve this one
    assert b1 is not a1 and b1.loop is not a1.loop


def test_close_app_forgets_the_app(settings: Settings) -> None:
    async def go() -> tuple[App, App]:
        first = get_app()
        await close_app()
        return first, get_app()

    first, second = asyncio.run(go())
    assert first is not second


def test_the_task_resolver_remembers_a_bounded_number_of_folders() -> None:
    settings = Settings.from_env({**ENV, "TASK_CONFIG_CACHE_ITEMS": "3"})
    blobs = FakeBlobService()
    resolver = TaskResolver(settings, blobs)

    async def go() -> None:
        for n in range(10):
            await resolver.resolve(f"f{n}/a.jpg", None)

    asyncio.run(go())
    assert len(resolver._cache) == 3
    assert set(resolver._cache) == {"", "f8/", "f9/"}  # the least recently used went first


def test_the_task_resolver_serves_a_remembered_miss_without_storage() -> None:
    settings = Settings.from_env(ENV)
    blobs = FakeBlobService()
    resolver = TaskResolver(settings, blobs)

    async def go() -> int:
        await resolver.resolve("f/a.jpg", None)
        before = len(blobs.calls)
        await resolver.resolve("f/b.jpg", None)
        return len(blobs.calls) - before

    assert asyncio.run(go()) == 0
