"""Continuous batching: answers in a batch are the answers alone, and the batch really is one.

The reference for every request is ``Pipeline.chat`` (one sequence, the ``flashvl chat`` path). The
tiny bundles' LLM weights are scaled so greedy decoding depends on its input; each "broken" variant
below (padding attended, positions shared, rows mixed, cache dropped) must make the comparison fail,
which shows the comparison can fail.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from events import MIXED_REQUESTS, collect
from flashvl_edge.runtime.backends.base import BatchKVCache
from flashvl_edge.runtime.generate import SamplingParams
from flashvl_edge.runtime.pipeline import Pipeline
from flashvl_edge.runtime.samples import test_photo as photo
from flashvl_edge.runtime.scheduler import (FinishEvent, GenerationRequest, QueueFullError, Scheduler,
                                            ShuttingDownError, TokenEvent)

NEW_TOKENS = 12
CASES = MIXED_REQUESTS


@pytest.fixture(scope="module")
def pipe(tiny_dynamic_bundle):
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def photos():
    return {name: photo(name) for name in ("astronaut", "coffee", "chelsea")}


def reference(pipe, photos, question, names, **sampling):
    r = pipe.chat(question, images=[photos[n] for n in names], max_new_tokens=NEW_TOKENS, **sampling)
    return [t for t in r.token_ids if t not in pipe.generator.stop_token_ids], r


def prepared(pipe, photos, question, names):
    user = pipe.prompts.user_message(question, len(names))
    return pipe.prepare_prompt([user], [photos[n] for n in names])


def run_batch(pipe, photos, cases, max_batch=8, **sampling):
    """Submit the first half of ``cases`` together; once the first of them has decoded a few tokens,
    submit the rest, so they join a running batch (their prefill runs between two decode steps)."""
    reqs = [GenerationRequest(prepared(pipe, photos, q, n), SamplingParams(max_new_tokens=NEW_TOKENS, **sampling))
            for q, n in cases]
    half = max(1, len(reqs) // 2)

    async def main():
        sched = Scheduler(pipe, max_batch=max_batch).start()
        try:
            first = [sched.submit(r) for r in reqs[:half]]
            results = {}

            async def lead():  # the first request's events; the rest are submitted after its 3rd token
                tokens, text, finish, rest = [], "", None, []
                async for ev in first[0]:
                    if isinstance(ev, TokenEvent):
                        tokens.append(ev.token_id)
                        text += ev.text
                        if len(tokens) == 3:
                            rest.extend(sched.submit(r) for r in reqs[half:])
                    else:
                        finish, text = ev, text + ev.text
                if not rest:
                    rest.extend(sched.submit(r) for r in reqs[half:])
                results[0] = (tokens, text, finish)
                return rest
            rest = await asyncio.wait_for(lead(), 120)
            others = first[1:] + rest
            got = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in others]), 120)
            return [results[0], *got], sched.steps, sched.max_batch
        finally:
            sched.shutdown(grace_s=5)
    return asyncio.run(main())


def test_batched_greedy_equals_each_request_alone(pipe, photos):
    refs = [reference(pipe, photos, q, n) for q, n in CASES]
    assert len({tuple(r[0]) for r in refs}) == len(CASES)  # the cases really differ
    out, steps, _ = run_batch(pipe, photos, CASES)
    for (tokens, text, finish), (ref_tokens, ref) in zip(out, refs):
        assert tokens == ref_tokens
        assert text == ref.text and finish.finish_reason == ref.finish_reason
        assert finish.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert finish.usage.completion_tokens == len(ref.token_ids)
    # one graph run per step for the whole batch: far fewer steps than tokens decoded alone
    assert steps < sum(len(r[0]) for r in refs) - len(CASES)


def test_seeded_sampling_in_a_batch_equals_alone(pipe, photos):
    cases = CASES[:4]
    refs = [reference(pipe, photos, q, n, temperature=0.9, top_k=40, seed=7 + i)[0]
            for i, (q, n) in enumerate(cases)]
    async def main():
        sched = Scheduler(pipe, max_batch=4).start()
        try:
            handles = [sched.submit(GenerationRequest(prepared(pipe, photos, q, n), SamplingParams(
                max_new_tokens=NEW_TOKENS, temperature=0.9, top_k=40, seed=7 + i)))
                for i, (q, n) in enumerate(cases)]
            return [await asyncio.wait_for(collect(h), 120) for h in handles]
        finally:
            sched.shutdown(5)
    out = asyncio.run(main())
    assert [o[0] for o in out] == refs


@pytest.mark.parametrize("broken", ["padding attended", "positions shared", "rows mixed", "cache dropped"])
def test_the_comparison_fails_on_a_broken_batch(pipe, photos, monkeypatch, broken):
    from flashvl_edge.runtime.backends import ort

    if broken == "padding attended":
        monkeypatch.setattr(BatchKVCache, "attention_mask",
                            lambda self, new=1: np.ones((self.rows, self.total + new), np.int64))
    elif broken == "positions shared":
        monkeypatch.setattr(BatchKVCache, "position_ids",
                            lambda self: np.full((self.rows, 1), self.total, np.int64))
    elif broken == "rows mixed":
        real = ort.OrtDecoder.forward_batch
        monkeypatch.setattr(ort.OrtDecoder, "forward_batch", lambda self, x, b: real(self, x, b)[::-1].copy())
    else:
        real_add = ort.OrtDecoder.batch_add

        def forget(self, batch, cache):  # joins with an empty cache of the right length
            fresh = self.new_cache()
            self.forward(np.zeros((1, cache.length, self.get_input_metadata()["inputs_embeds"].shape[-1]),
                                  self.embeds_dtype), fresh)
            real_add(self, batch, fresh)
        monkeypatch.setattr(ort.OrtDecoder, "batch_add", forget)
    refs = [reference(pipe, photos, q, n)[0] for q, n in CASES[:4]]
    out, _, _ = run_batch(pipe, photos, CASES[:4])
    assert [o[0] for o in out] != refs


def test_cancel_frees_the_slot_and_others_finish(pipe, photos):
    async def main():
        sched = Scheduler(pipe, max_batch=2).start()
        try:
            long = GenerationRequest(prepared(pipe, photos, "Hi", []),
                                     SamplingParams(max_new_tokens=200, ignore_eos=True))
            h = sched.submit(long)
            async for ev in h:  # wait for the first token, then hang up
                assert isinstance(ev, TokenEvent)
                break
            steps_at_cancel, cancelled_at = sched.steps, time.perf_counter()
            h.cancel()
            events = [ev async for ev in h]  # what was already queued, then the finish
            assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "cancelled"
            # the slot is freed within one step: at most one more token was made after the cancel
            late = [ev for ev in events[:-1] if ev.time > cancelled_at]
            assert len(late) <= 1 and sched.steps - steps_at_cancel <= 1
            assert events[-1].usage.completion_tokens < 200
            deadline = time.monotonic() + 10
            while sched.running and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert sched.running == 0
            other = sched.submit(GenerationRequest(prepared(pipe, photos, "x", ["coffee"]),
                                                   SamplingParams(max_new_tokens=4)))
            tokens, _, fin = await asyncio.wait_for(collect(other), 60)
            assert fin.finish_reason in ("stop", "length") and tokens
        finally:
            sched.shutdown(5)
    asyncio.run(main())


def test_requests_submitted_together_join_one_batch(pipe, photos, monkeypatch):
    from flashvl_edge.runtime.backends import ort

    rows = []
    real = ort.OrtDecoder.forward_batch

    def spy(self, x, batch):
        rows.append(x.shape[0])
        return real(self, x, batch)
    monkeypatch.setattr(ort.OrtDecoder, "forward_batch", spy)
    cases = CASES[:4]
    refs = [pipe.chat(q, images=[photos[n] for n in names], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
            for q, names in cases]

    async def main():
        sched = Scheduler(pipe, max_batch=8).start()
        try:
            handles = sched.submit_all([GenerationRequest(prepared(pipe, photos, q, n), SamplingParams(
                max_new_tokens=NEW_TOKENS, ignore_eos=True)) for q, n in cases])
            return await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 120), sched.steps
        finally:
            sched.shutdown(5)
    out, steps = asyncio.run(main())
    assert [tokens for tokens, _, _ in out] == refs
    # they join one batch as their prefills end (chunks under the token budget), none leaves early:
    # the decode batch only grows, and all of them decode together until the first one is done
    assert rows == sorted(rows) and rows[-1] == len(cases)
    assert rows.count(len(cases)) >= NEW_TOKENS - 1 - (len(rows) - rows.count(len(cases)))


def test_submit_all_queues_all_or_none(pipe, photos):
    async def main():
        sched = Scheduler(pipe, max_batch=1, max_queue=3)  # not started: nothing leaves the queue
        sched._accepting = True
        req = lambda: GenerationRequest(prepared(pipe, photos, "Hi", []), SamplingParams(max_new_tokens=2))  # noqa: E731
        sched.submit(req())
        with pytest.raises(QueueFullError, match="max-queue"):
            sched.submit_all([req(), req(), req()])
        assert sched.queue_depth == 1
        assert len(sched.submit_all([req(), req()])) == 2 and sched.queue_depth == 3
        sched.start()
        sched.shutdown(grace_s=10)
    asyncio.run(main())


def test_queue_limit_and_shutdown_refuse_new_requests(pipe, photos):
    async def main():
        sched = Scheduler(pipe, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
        sched._accepting = True
        req = lambda: GenerationRequest(prepared(pipe, photos, "Hi", []), SamplingParams(max_new_tokens=2))  # noqa: E731
        sched.submit(req())
        sched.submit(req())
        with pytest.raises(QueueFullError, match="max-queue"):
            sched.submit(req())
        sched.start()
        sched.shutdown(grace_s=10)  # the two queued requests finish within the grace period
        with pytest.raises(ShuttingDownError):
            sched.submit(req())
    asyncio.run(main())


def test_batch_is_capped_by_max_batch(pipe, photos):
    seen = []
    from flashvl_edge.runtime.backends import ort

    real = ort.OrtDecoder.forward_batch

    def spy(self, x, batch):
        seen.append(x.shape[0])
        return real(self, x, batch)
    mp = pytest.MonkeyPatch()
    mp.setattr(ort.OrtDecoder, "forward_batch", spy)
    try:
        out, _, max_batch = run_batch(pipe, photos, CASES[:5], max_batch=3)
    finally:
        mp.undo()
    assert max_batch == 3 and max(seen) == 3 and all(f.finish_reason in ("stop", "length") for _, _, f in out)
