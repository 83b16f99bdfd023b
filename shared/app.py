"""The application object: everything one worker talks to, built once and handed to the entry points.

`App` holds the settings, the blob store, the model (a `ModelRouter` in production: clients,
limiters, breakers, the deployment book with its calibration), the result cache, the in-flight
table, the prepare slots and the blob path's task resolver. Entry points call `get_app()`, which
builds it on first use (never at import: importing an entry point reads no settings and loads no
SDK, see tests/test_cold_start.py).

Every in-memory table it holds is bounded:
- the result cache's memory LRU: CACHE_MEMORY_ITEMS entries;
- the task resolver: TASK_CONFIG_CACHE_ITEMS folders, each for TASK_CONFIG_TTL_S;
- the in-flight table: one entry per request at the model, removed when its run ends (so it is
  bounded by the requests this worker runs at once);
- clients, limiters, breakers, parameter styles and calibrations: one per configured deployment
  (VLM_DEPLOYMENT plus VLM_FALLBACK_DEPLOYMENTS), never keyed by caller input.

aio clients (openai, azure-storage-blob) are bound to the event loop that created them. The
Functions Python worker runs every async function on one loop, so one `App` serves the worker's
life. If `get_app()` is called on a different running loop (a second `asyncio.run`, a test),
the app is rebuilt for that loop; the old one is closed on its own loop when that loop still
runs, else dropped (its connections went with its loop), and a warning says so.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .pipeline import PrepareSlots

if TYPE_CHECKING:
    from .blob_job import TaskResolver
    from .cache import CachedAnswer, RawAlias
    from .deployments import DeploymentBook
    from .model import ChatBackend
    from .settings import Settings

log = logging.getLogger(__name__)


class BlobContainers(Protocol):
    """What the service needs from storage: a container client by name (shared.storage.BlobStore)."""

    async def container(self, name: str) -> Any: ...


class ResultStore(Protocol):
    """Answers by content address, and raw-bytes aliases pointing at them (shared.cache.ResultCache)."""

    async def get_result(self, key: str) -> CachedAnswer | None: ...
    async def put_result(self, key: str, answer: CachedAnswer) -> None: ...
    async def get_alias(self, raw_key: str) -> RawAlias | None: ...
    async def put_alias(self, raw_key: str, alias: RawAlias) -> None: ...


@dataclass
class App:
    """One worker's dependencies; build it with `App.build` (tests inject fakes there)."""

    settings: Settings
    blobs: BlobContainers
    model: ChatBackend
    book: DeploymentBook  # what this worker learned per deployment (the router's own book)
    cache: ResultStore
    prepare_slots: PrepareSlots
    resolver: TaskResolver
    inflight: dict[str, asyncio.Future[Any]] = field(default_factory=dict)  # cache key -> the one run for it
    loop: asyncio.AbstractEventLoop | None = None  # the loop its aio clients are bound to (None: not yet known)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        model: ChatBackend | None = None,
        cache: ResultStore | None = None,
        blobs: BlobContainers | None = None,
    ) -> App:
        """The production wiring, with any part replaced. Creates no connection: clients open on first use."""
        from .blob_job import TaskResolver
        from .cache import MemoryLRU, ResultCache
        from .deployments import DeploymentBook
        from .model import ModelRouter
        from .storage import BlobStore

        blobs = blobs if blobs is not None else BlobStore(settings)
        model = model if model is not None else ModelRouter(settings, peers=peer_registry(settings, blobs))
        book = getattr(model, "book", None)
        if not isinstance(book, DeploymentBook):  # a plain ChatBackend (tests): a book of its own
            book = DeploymentBook(settings)
        if cache is None:
            cache = ResultCache(MemoryLRU(settings.cache_memory_items), blobs, settings.cache_container)
        return cls(
            settings=settings,
            blobs=blobs,
            model=model,
            book=book,
            cache=cache,
            prepare_slots=PrepareSlots(settings.prepare_concurrency),
            resolver=TaskResolver(settings, blobs),
        )

    async def close(self) -> None:
        """Close the clients (on the loop they belong to); the model first, so its instance count can leave."""
        for part in (self.model, self.blobs):
            close = getattr(part, "close", None)
            if close is not None:
                await close()


_app: App | None = None


def get_app() -> App:
    """This worker's App, built on first use for the running event loop (see the module docstring)."""
    global _app
    loop = asyncio.get_running_loop()
    if _app is not None and _app.loop is loop:
        return _app
    from .settings import get_settings

    old, _app = _app, App.build(get_settings())
    _app.loop = loop
    if old is not None:
        _retire(old)
    return _app


def _retire(old: App) -> None:
    """Close an app built for another loop on that loop if it still runs; else its connections died with it."""
    log.warning("the event loop changed: the application object was rebuilt for the new loop")
    if old.loop is not None and old.loop.is_running() and not old.loop.is_closed():
        asyncio.run_coroutine_threadsafe(old.close(), old.loop)


async def close_app() -> None:
    """Close and forget this worker's App (tests, and an orderly shutdown)."""
    global _app
    old, _app = _app, None
    if old is not None and old.loop is asyncio.get_running_loop():
        await old.close()


def peer_registry(settings: Settings, blobs: BlobContainers) -> Any:
    """This worker's entry in the count of busy instances (shared/peers.py), or None: VLM_RATE_PEERS off, or a
    fixed VLM_RATE_SPLIT. The id is this process's own: each worker process has its own limiter."""
    if settings.vlm_rate_peers != "storage" or settings.vlm_rate_split:
        return None
    import uuid

    from .peers import BlobPeerStore, PeerRegistry, period_for

    store = BlobPeerStore(lambda: blobs.container(settings.cache_container))
    return PeerRegistry(store, uuid.uuid4().hex, period_for(settings.vlm_rate_window_s))
