"""Reuse across requests: image-embedding cache and prefix KV cache change no answer, only the work.

Every comparison is against the same bundle with both caches off. The broken variant (block keys
from token ids alone, so two images behind the same ids share KV) must make a comparison fail.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from events import collect
from flashvl_edge.runtime import cache as C
from flashvl_edge.runtime.generate import SamplingParams
from flashvl_edge.runtime.pipeline import Pipeline
from flashvl_edge.runtime.samples import test_photo as photo
from flashvl_edge.runtime.scheduler import GenerationRequest, Scheduler

GREEDY = dict(max_new_tokens=10, ignore_eos=True)
SYSTEM = "You are a careful assistant that describes photos for a robot arm. Answer briefly and exactly."


@pytest.fixture(scope="module")
def photos():
    return {n: photo(n) for n in ("astronaut", "coffee", "chelsea")}


@pytest.fixture(scope="module")
def off(tiny_dynamic_bundle):
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu", image_cache_bytes=0, kv_cache_bytes=0) as p:
        yield p


def fresh(bundle, **sizes):
    return Pipeline.from_bundle(bundle, device="cpu", **sizes)


def count_vision(pipe):
    calls = []
    real = pipe.vision.infer
    pipe.vision.infer = lambda feed: (calls.append(feed["pixel_values"].shape[0]), real(feed))[1]
    return calls


def test_same_image_different_questions_runs_vision_once(tiny_dynamic_bundle, off, photos):
    pipe = fresh(tiny_dynamic_bundle)
    calls = count_vision(pipe)
    questions = ["What is in the picture?", "What colour is the suit?", "Is it daytime?"]
    for q in questions:
        got = pipe.chat(q, image=photos["astronaut"], **GREEDY)
        ref = off.chat(q, image=photos["astronaut"], **GREEDY)
        assert got.token_ids == ref.token_ids and got.text == ref.text
    assert len(calls) == 1  # the later questions took the embeddings from the cache
    stats = pipe.image_cache.stats()
    assert stats["hits"] == 2 and stats["misses"] == 1 and 0 < stats["bytes"] <= stats["max_bytes"]
    # the questions share the system prompt and the image: later ones reuse that prefix's KV
    again = pipe.chat("Where is this?", image=photos["astronaut"], **GREEDY)
    assert again.cached_tokens >= 16 * ((pipe.manifest.image.tokens_per_tile) // 16)
    assert again.token_ids == off.chat("Where is this?", image=photos["astronaut"], **GREEDY).token_ids


def test_shared_system_prompt_is_prefilled_once(tiny_dynamic_bundle, off):
    pipe = fresh(tiny_dynamic_bundle)
    first = pipe.chat("Hello there.", system=SYSTEM, **GREEDY)
    second = pipe.chat("What can you do?", system=SYSTEM, **GREEDY)
    assert first.cached_tokens == 0 and second.cached_tokens >= 16
    assert second.prefill_tokens + second.cached_tokens == len(second.prompt_token_ids)
    for r, q in ((first, "Hello there."), (second, "What can you do?")):
        assert r.token_ids == off.chat(q, system=SYSTEM, **GREEDY).token_ids
    assert pipe.prefix_cache.stats()["reused_tokens"] == second.cached_tokens


def test_two_images_behind_the_same_text_do_not_share_image_kv(tiny_dynamic_bundle, off, photos):
    pipe = fresh(tiny_dynamic_bundle)
    a = pipe.chat("Describe it.", image=photos["astronaut"], **GREEDY)
    b = pipe.chat("Describe it.", image=photos["coffee"], **GREEDY)
    # only the text before the image can be shared
    prompt_before_image = b.prompt_token_ids.index(pipe.prompts.image_token_id)
    assert b.cached_tokens <= prompt_before_image
    assert a.token_ids == off.chat("Describe it.", image=photos["astronaut"], **GREEDY).token_ids
    assert b.token_ids == off.chat("Describe it.", image=photos["coffee"], **GREEDY).token_ids
    assert a.token_ids != b.token_ids


def test_the_comparison_fails_when_keys_ignore_image_identity(tiny_dynamic_bundle, off, photos, monkeypatch):
    pipe = fresh(tiny_dynamic_bundle, image_cache_bytes=0)
    real = C.block_keys
    monkeypatch.setattr("flashvl_edge.runtime.pipeline.block_keys",
                        lambda ids, tags, salt, block=C.BLOCK_TOKENS: real(ids, [None] * len(tags), salt, block))
    pipe.chat("Describe it.", image=photos["astronaut"], **GREEDY)
    b = pipe.chat("Describe it.", image=photos["coffee"], **GREEDY)
    assert b.cached_tokens > b.prompt_token_ids.index(pipe.prompts.image_token_id)  # wrongly shared
    assert b.token_ids != off.chat("Describe it.", image=photos["coffee"], **GREEDY).token_ids


def test_eviction_under_a_tiny_budget_keeps_answers(tiny_dynamic_bundle, off, photos):
    block_bytes = None
    pipe = fresh(tiny_dynamic_bundle, image_cache_bytes=40_000, kv_cache_bytes=60_000)
    for name in ("astronaut", "coffee", "chelsea", "astronaut", "coffee"):
        got = pipe.chat("What is this?", image=photos[name], **GREEDY)
        assert got.token_ids == off.chat("What is this?", image=photos[name], **GREEDY).token_ids
        for c in (pipe.image_cache, pipe.prefix_cache):
            s = c.stats()
            assert s["bytes"] <= s["max_bytes"]
        block_bytes = block_bytes or max((n for _, n in pipe.prefix_cache.entries.values()), default=None)
    assert pipe.prefix_cache.stats()["evictions"] > 0 and pipe.image_cache.stats()["evictions"] > 0
    assert block_bytes is not None and block_bytes <= 60_000


def test_concurrent_requests_racing_for_the_same_prefix(tiny_dynamic_bundle, off, photos):
    pipe = fresh(tiny_dynamic_bundle)
    questions = ["One?", "Two two?", "Three three three?", "Four?"]
    refs = [off.chat(q, image=photos["chelsea"], system=SYSTEM, **GREEDY) for q in questions]

    def prepared(q):
        msgs = [{"role": "system", "content": SYSTEM}, pipe.prompts.user_message(q, 1)]
        return pipe.prepare_prompt(msgs, [photos["chelsea"]])

    async def wave():
        handles = [sched.submit(GenerationRequest(prepared(q), SamplingParams(**GREEDY))) for q in questions]
        return [(tokens, fin) for tokens, _, fin in [await collect(h) for h in handles]]

    async def main():
        try:
            return await wave(), await wave()
        finally:
            sched.shutdown(5)
    sched = Scheduler(pipe, max_batch=4).start()
    first, second = asyncio.run(asyncio.wait_for(main(), 120))
    for out in (first, second):
        for (tokens, fin), ref in zip(out, refs):
            assert tokens == [t for t in ref.token_ids if t not in pipe.generator.stop_token_ids]
            assert fin.usage.prompt_tokens == len(ref.prompt_token_ids)
    # requests admitted in the same step compute their prefix side by side (a block is shared once it
    # is stored, at the end of its request's prefill); the next wave reuses what the first stored
    assert all(fin.usage.cached_tokens > 0 for _, fin in second)


def test_cache_sizes_are_checked():
    with pytest.raises(ValueError, match="bytes"):
        C.ByteLRU(-1)
    lru = C.ByteLRU(100)
    lru.put(b"a", 1, 60)
    lru.put(b"b", 2, 60)  # evicts a
    assert lru.get(b"a") is None and lru.get(b"b") == 2 and lru.stats()["evictions"] == 1
    lru.put(b"c", 3, 1000)  # larger than the budget: not kept, nothing evicted for it
    assert lru.get(b"b") == 2 and lru.get(b"c") is None


def test_block_keys_chain_and_tag_images():
    salt = b"s"
    ids = list(range(40))
    k1 = C.block_keys(ids, [None] * 40, salt)
    assert len(k1) == 2  # full blocks only
    k2 = C.block_keys(ids[:16] + [0] * 24, [None] * 40, salt)
    assert k2[0] == k1[0] and k2[1] != k1[1]
    tagged = C.block_keys(ids, [None] * 20 + [b"img" + bytes([i]) for i in range(20)], salt)
    assert tagged[0] == k1[0] and tagged[1] != k1[1]
    assert np.all([len(k) == 32 for k in k1])
