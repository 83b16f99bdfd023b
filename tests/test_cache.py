"""Cache keys are content addresses; the LRU is bounded; only what is put comes back, as the kind it was put."""

import asyncio
import json

from shared.cache import CachedAnswer, MemoryLRU, RawAlias, ResultCache, blob_name, cache_key
from tests.blob_fakes import FakeBlobService
from tests.constants import TEST_DEPLOYMENT, TEST_FALLBACK_MODEL, TEST_MODEL

BASE = dict(
    task="describe",
    prompt=None,
    detail="auto",
    schema=None,
    answered_by=f"{TEST_DEPLOYMENT}|{TEST_MODEL}",
    max_tokens=None,
)


def test_key_is_stable_and_hex():
    a = cache_key(**BASE, images=[b"abc"])
    assert a == cache_key(**BASE, images=[b"abc"])
    assert len(a) == 64 and int(a, 16) >= 0


def test_key_changes_with_every_input():
    ref = cache_key(**BASE, images=[b"abc"])
    variants = [
        cache_key(**{**BASE, "task": "ocr"}, images=[b"abc"]),
        cache_key(**{**BASE, "prompt": "x"}, images=[b"abc"]),
        cache_key(**{**BASE, "detail": "high"}, images=[b"abc"]),
        cache_key(**{**BASE, "schema": {"type": "object"}}, images=[b"abc"]),
        cache_key(**{**BASE, "answered_by": f"backup|{TEST_FALLBACK_MODEL}"}, images=[b"abc"]),
        cache_key(**{**BASE, "max_tokens": 10}, images=[b"abc"]),
        cache_key(**BASE, images=[b"abd"]),
        cache_key(**BASE, images=[b"abc", b"abc"]),
        cache_key(**BASE, images=[b"abc"], options={"labels": ["a"]}),
    ]
    assert len({ref, *variants}) == len(variants) + 1


def test_key_depends_on_image_order():
    assert cache_key(**BASE, images=[b"a", b"b"]) != cache_key(**BASE, images=[b"b", b"a"])


def test_schema_key_order_does_not_matter():
    a = cache_key(**{**BASE, "schema": {"a": 1, "b": 2}}, images=[b"x"])
    b = cache_key(**{**BASE, "schema": {"b": 2, "a": 1}}, images=[b"x"])
    assert a == b


def test_lru_is_bounded_and_returns_copies():
    lru = MemoryLRU(2)
    lru.put("a", {"v": 1})
    lru.put("b", {"v": 2})
    assert lru.get("a") == {"v": 1}  # a is now most recent
    lru.put("c", {"v": 3})
    assert lru.get("b") is None and len(lru) == 2
    got = lru.get("a")
    got["v"] = 99
    assert lru.get("a") == {"v": 1}


def test_memory_only_cache_round_trip():
    cache = ResultCache(MemoryLRU(4))

    async def go():
        assert await cache.get_result("k") is None
        await cache.put_result("k", CachedAnswer("m", "d", {"x": 1}))
        return await cache.get_result("k")

    assert asyncio.run(go()) == CachedAnswer("m", "d", {"x": 1})


def test_results_and_aliases_are_kept_apart_by_kind():
    """An alias is never served as an answer (nor an answer as an alias), even under the same key."""
    blobs = FakeBlobService()
    cache = ResultCache(MemoryLRU(4), blobs, "cache")

    async def go():
        await cache.put_alias("k", RawAlias("other", [{"estimated_tokens": 1}]))
        assert await cache.get_result("k") is None
        await cache.put_result("k", CachedAnswer("m", "d", "answer"))
        alias, answer = await cache.get_alias("k"), await cache.get_result("k")
        cold = ResultCache(MemoryLRU(4), blobs, "cache")  # another instance: read back from storage
        return alias, answer, await cold.get_alias("k"), await cold.get_result("k")

    alias, answer, cold_alias, cold_answer = asyncio.run(go())
    assert alias == cold_alias == RawAlias("other", [{"estimated_tokens": 1}])
    assert answer == cold_answer == CachedAnswer("m", "d", "answer")
    assert sorted(blobs.blobs) == [f"cache/aliases/{blob_name('k')}", f"cache/{blob_name('k')}"]


def test_a_record_of_the_wrong_shape_is_a_miss():
    """An older layout (an alias stored where answers live) or a damaged blob is a miss, not an answer."""
    blobs = FakeBlobService()
    blobs.put("cache", blob_name("k"), json.dumps({"key": "x", "images": []}).encode())
    blobs.put("cache", "aliases/" + blob_name("k"), json.dumps({"key": 3}).encode())
    cache = ResultCache(MemoryLRU(4), blobs, "cache")

    async def go():
        return await cache.get_result("k"), await cache.get_alias("k")

    assert asyncio.run(go()) == (None, None)


def test_blob_names_are_sharded():
    key = "ab" + "0" * 62
    assert blob_name(key) == f"ab/{key}.json"
