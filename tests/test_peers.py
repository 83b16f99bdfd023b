"""The busy-instance count (shared/peers.py) and what the limiter does with it (VLM_RATE_PEERS=storage)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from shared.app import App, peer_registry
from shared.limiter import RateLimiter
from shared.peers import FIRST_LIST_S, PREFIX, STALE_S, BlobPeerStore, PeerRegistry, PeerView, blob_name, period_for
from shared.settings import ConfigurationError, Settings
from tests.blob_fakes import FakeBlobService, MemoryPeerStore
from tests.fake_clock import FakeClock

ENV = {"VLM_ENDPOINT": "http://127.0.0.1:1/v1", "VlmStorage": "UseDevelopmentStorage=true", "VLM_DEPLOYMENT": "d"}


def registries(store: MemoryPeerStore, clock: FakeClock, n: int, period_s: float = 2.0) -> list[PeerRegistry]:
    return [PeerRegistry(store, f"i{k}", period_s, clock=clock) for k in range(n)]


async def test_each_instance_counts_every_live_one_and_gets_its_own_rank() -> None:
    clock = FakeClock()
    store = MemoryPeerStore(clock)
    regs = registries(store, clock, 3)
    for r in regs:
        await r.refresh()
    assert [r.view.count for r in regs] == [1, 2, 3]  # each counted those that wrote before it
    for r in regs:
        await r.refresh()
    assert [r.view for r in regs] == [PeerView(3, 0), PeerView(3, 1), PeerView(3, 2)]


async def test_a_beat_older_than_the_ttl_is_not_counted_and_one_a_day_old_is_deleted() -> None:
    clock = FakeClock()
    store = MemoryPeerStore(clock)
    gone, stale, me = registries(store, clock, 3)
    await gone.refresh()
    await clock.advance(STALE_S - 1)
    await stale.refresh()
    await clock.advance(me.ttl_s + 2)  # `stale` last wrote just over a ttl ago, `gone` over a day ago
    await me.refresh()
    assert me.view == PeerView(1, 0)
    assert sorted(store.beats) == [blob_name("i1"), blob_name("i2")]  # the day-old one was cleared


async def test_a_storage_fault_keeps_the_last_count_and_never_raises() -> None:
    clock = FakeClock()
    store = MemoryPeerStore(clock)
    a, b = registries(store, clock, 2)
    await a.refresh()
    await b.refresh()
    await a.refresh()
    store.fail = True
    await a.refresh()
    assert (a.view, a.faults) == (PeerView(2, 0), 1)
    fresh = PeerRegistry(store, "new", 2.0, clock=clock)
    await fresh.refresh()
    assert fresh.view.count == 0  # never read: the limiter keeps its adaptive share


def test_hostile_or_odd_instance_ids_become_safe_blob_names() -> None:
    assert blob_name("abc-1_2") == PREFIX + "abc-1_2"
    for hostile in ("../../images/x", "a/b", "x" * 500, "é", ""):
        name = blob_name(hostile)
        assert name.startswith(PREFIX) and "/" not in name[len(PREFIX) :] and len(name) <= len(PREFIX) + 64


def test_the_period_is_a_fifth_of_the_window_within_2_to_10_s() -> None:
    assert [period_for(w) for w in (1, 10, 30, 60, 600)] == [2.0, 2.0, 6.0, 10.0, 10.0]


async def test_instances_that_start_together_all_see_each_other_at_their_first_reading() -> None:
    """The first listing waits FIRST_LIST_S after the first write, so no instance counts only itself and takes the
    whole quota for a period."""
    clock = FakeClock()
    store = MemoryPeerStore(clock)
    regs = registries(store, clock, 4)
    busy = [True]

    async def run() -> None:
        for r in regs:
            r.watch(lambda: busy[0], lambda: None)
            r.wake()
        await clock.sleep(FIRST_LIST_S + 0.01)
        assert [r.view.count for r in regs] == [4, 4, 4, 4]
        assert sorted(r.view.rank for r in regs) == [0, 1, 2, 3]
        busy[0] = False
        await clock.sleep(3 * regs[0].period_s)
        for r in regs:
            await r.close()

    await clock.run(run())


async def test_an_instance_idle_for_a_period_leaves_the_count_and_a_busy_one_stays() -> None:
    clock = FakeClock()
    store = MemoryPeerStore(clock)
    worker, idle = registries(store, clock, 2)
    busy = {"worker": True, "idle": True}
    changes: list[PeerView] = []

    async def run() -> None:
        worker.watch(lambda: busy["worker"], lambda: changes.append(worker.view))
        idle.watch(lambda: busy["idle"], lambda: None)
        worker.wake()
        idle.wake()
        await clock.sleep(FIRST_LIST_S + 0.01)
        assert worker.view.count == 2
        busy["idle"] = False
        await clock.sleep(3 * idle.period_s)
        assert blob_name("i1") not in store.beats  # left at once, not after a ttl
        assert worker.view == PeerView(1, 0) and changes[-1] == PeerView(1, 0)  # told the limiter
        writes = store.writes
        await clock.sleep(5 * worker.period_s)
        assert store.writes - writes == 5  # the busy one keeps writing, one beat a period
        busy["worker"] = False
        await clock.sleep(3 * worker.period_s)
        assert store.beats == {} and worker._task is not None and worker._task.done()
        idle.wake()  # a new call: it beats again
        await clock.sleep(0.01)
        assert blob_name("i1") in store.beats
        for r in (worker, idle):
            await r.close()
        assert store.beats == {}

    await clock.run(run())


class _View:
    """A count fixed by the test (the registry's view and hooks, as the limiter uses them)."""

    def __init__(self, count: int, rank: int) -> None:
        self.view = PeerView(count, rank)
        self.changed: list = []

    def watch(self, busy, changed) -> None:
        self.changed.append(changed)

    def wake(self) -> None:
        pass


async def test_counted_instances_each_take_one_nth_and_floor_n_f_of_them_their_partial_call() -> None:
    """8 instances, 5000 tokens a 10 s window, 232-token calls: 625 tokens each, 2.69 calls. Each takes 2 at once;
    of the eight third calls (fraction 0.69), floor(8 x 0.69) = 5 go, by rank, never a draw: 21 calls, under the
    21.55 the window holds."""
    clock = FakeClock()
    limiters = [
        RateLimiter(180, 30_000, clock=clock, window_s=10, seed=k, slow_start=True, peers=_View(8, k)) for k in range(8)
    ]
    taken = []
    for lim in limiters:
        n = 0
        for _ in range(4):
            try:
                async with asyncio.timeout(0.001):
                    await lim.acquire(232)
                n += 1
            except TimeoutError:
                break
        taken.append(n)
    assert sum(taken) == 21 and sorted(taken) == [2, 2, 2, 3, 3, 3, 3, 3]
    assert all(lim.split == 8 for lim in limiters)


async def test_a_call_parked_on_its_split_goes_when_the_count_falls() -> None:
    clock = FakeClock()
    view = _View(4, 0)
    lim = RateLimiter(180, 30_000, clock=clock, window_s=10, seed=1, peers=view)

    async def run() -> float:
        for _ in range(5):  # 1250 tokens each: five of 232, and the sixth waits for a charge to leave (10 s)
            await lim.acquire(232)
        waiting = asyncio.ensure_future(lim.acquire(232))
        await clock.sleep(1.0)
        assert not waiting.done()
        view.view = PeerView(1, 0)  # the others left
        for changed in view.changed:
            changed()
        await waiting
        return clock.now()

    assert await clock.run(run()) == pytest.approx(1.0)


def test_settings_and_wiring() -> None:
    default = Settings.from_env(ENV)
    assert default.vlm_rate_peers == "storage"
    blobs = FakeBlobService()
    assert isinstance(peer_registry(default, blobs), PeerRegistry)
    assert peer_registry(Settings.from_env({**ENV, "VLM_RATE_PEERS": "off"}), blobs) is None
    assert peer_registry(Settings.from_env({**ENV, "VLM_RATE_SPLIT": "8"}), blobs) is None  # a pinned count wins
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({**ENV, "VLM_RATE_PEERS": "redis"})
    assert err.value.details == {"variable": "VLM_RATE_PEERS"}
    app = App.build(default, blobs=blobs)
    assert app.model.limiter(default.primary)._peers is app.model.peers is not None


async def test_the_app_counts_itself_in_its_cache_container_and_leaves_on_close() -> None:
    settings = Settings.from_env({**ENV, "VLM_TPM": "6000"})
    blobs = FakeBlobService()
    app = App.build(settings, blobs=blobs)
    limiter = app.model.limiter(settings.primary)
    await limiter.acquire(100)
    await asyncio.sleep(FIRST_LIST_S + 0.3)  # the real clock: the first listing after a second
    assert app.model.peers.view == PeerView(1, 0) and limiter.split == 1
    names = [k for k in blobs.blobs if k.startswith(f"{settings.cache_container}/{PREFIX}")]
    assert len(names) == 1
    await app.close()
    assert not [k for k in blobs.blobs if k.startswith(f"{settings.cache_container}/{PREFIX}")]


@pytest.mark.integration
async def test_blob_peer_store_against_azurite(stack) -> None:
    """The real SDK against Azurite: the service's last_modified ages the beats, three registries see each other."""
    from azure.storage.blob.aio import BlobServiceClient

    async with BlobServiceClient.from_connection_string(stack.connection_string) as service:
        container = service.get_container_client(f"peers-test-{uuid.uuid4().hex[:8]}")
        await container.create_container()

        async def get() -> object:
            return container

        store = BlobPeerStore(get)
        regs = [PeerRegistry(store, uuid.uuid4().hex, 2.0) for _ in range(3)]
        for r in regs + regs:
            await r.refresh()
        assert sorted(r.view.rank for r in regs) == [0, 1, 2] and {r.view.count for r in regs} == {3}
        rows = await store.listing(PREFIX)
        stamped = max(at for _, at in rows)
        assert all(stamped - at < timedelta(seconds=30) for _, at in rows)
        await regs[0].close()
        await regs[1].refresh()
        assert regs[1].view.count == 2
        await store.remove(blob_name("never-written"))  # deleting what is gone is not an error
        await container.delete_container()
