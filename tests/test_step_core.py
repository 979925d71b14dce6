"""The step core (runtime/core.py): chunked and batched prefill give the answer of a plain prefill,
whatever else runs and whenever a request arrives; a runner without batching serves in batches of
one; a failure of one request ends that request, a failure of the model ends every request.

The chunk size here (24) is not a multiple of the prefix cache's 16-token blocks, so chunks end inside
image tokens and inside cached prefixes. The tiny bundles' LLM weights are scaled so greedy decoding
depends on its input, and every comparison is shown to fail on a broken variant: a chunk's positions
off by one, a chunk's KV dropped, two rows' chunks swapped, a chunk run beside the decode steps (the
prefill lane) that loses its KV.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from events import MIXED_REQUESTS, collect

from flashvl_edge.main import main
from flashvl_edge.runtime.backends import base, ort
from flashvl_edge.runtime.core import ModelError, Sequence, StepCore
from flashvl_edge.runtime.generate import SamplingParams
from flashvl_edge.runtime.pipeline import Pipeline
from flashvl_edge.runtime.samples import test_photo as photo
from flashvl_edge.runtime.scheduler import GenerationRequest, Scheduler

CHUNK = 24
NEW = 10
# 8 requests of different lengths, images and texts: (question, photo names)
CASES = [*MIXED_REQUESTS[:4], ("a b c d e f g h i j k l m n o p q r s t u v w x y z", []), *MIXED_REQUESTS[5:],
         ("Count the cats.", ["chelsea"])]


@pytest.fixture(scope="module")
def photos():
    return {name: photo(name) for name in ("astronaut", "coffee", "chelsea")}


@pytest.fixture(scope="module")
def int4_bundle(tiny_dynamic_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-dynamic-int4"
    assert main(["calibrate", str(tiny_dynamic_bundle), "--out", str(out), "--vision", "int8", "--llm", "int4",
                 "--samples", "4", "--holdout", "1", "--report-tokens", "4", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module", params=["fp32", "int4"])
def pipe(request, tiny_dynamic_bundle):
    bundle = tiny_dynamic_bundle if request.param == "fp32" else request.getfixturevalue("int4_bundle")
    with Pipeline.from_bundle(bundle, device="cpu", prefill_chunk=CHUNK, kv_cache_bytes=0, image_cache_bytes=0) as p:
        p.kind = request.param
        yield p


def prepared(pipe, photos, question, names):
    return pipe.prepare_prompt([pipe.prompts.user_message(question, len(names))], [photos[n] for n in names])


def whole_prefill_reference(pipe, photos, question, names, n=NEW) -> list[int]:
    """Greedy tokens with the prompt run in ONE forward and each token fed alone: the plain loop,
    written here without the step core."""
    prep = prepared(pipe, photos, question, names)
    gen = pipe.generator
    embeds = gen.embed(prep.token_ids, pipe.encode_prompt_images(prep), prep.image_mask)
    cache = pipe.llm.new_cache()
    logits = pipe.llm.forward(embeds, cache)
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] in gen.stop_token_ids:
            break
        logits = pipe.llm.forward(np.asarray(gen.embed_table[tokens[-1]:tokens[-1] + 1])[None], cache)
    return tokens


def alone(pipe, photos, cases=CASES) -> list[list[int]]:
    return [pipe.chat(q, images=[photos[x] for x in names], max_new_tokens=NEW).token_ids for q, names in cases]


def together(pipe, photos, cases=CASES, max_batch=8, budget=None, **kw) -> list[list[int]]:
    """All requests through the server's scheduler: half at once, the rest after the first request's
    second token, so they join running rows and each other's chunks mid-way."""
    reqs = [GenerationRequest(prepared(pipe, photos, q, n), SamplingParams(max_new_tokens=NEW)) for q, n in cases]
    half = len(reqs) // 2

    async def run():
        sched = Scheduler(pipe, max_batch=max_batch, max_num_batched_tokens=budget, **kw).start()
        try:
            first = [sched.submit(r) for r in reqs[:half]]
            rest, tokens = [], []
            async for ev in first[0]:
                if getattr(ev, "token_id", None) is not None:
                    tokens.append(ev.token_id)
                    if len(tokens) == 2:
                        rest = [sched.submit(r) for r in reqs[half:]]
            rest = rest or [sched.submit(r) for r in reqs[half:]]
            got = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in first[1:] + rest]), 120)
            for fin in [first[0].finished] + [g[2] for g in got]:
                assert fin.finish_reason in ("stop", "length"), fin.error
            return [tokens] + [g[0] for g in got]
        finally:
            sched.shutdown(5)
    return asyncio.run(run())


def case_sequence(pipe, photos, question, names, max_new_tokens=NEW, ignore_eos=False) -> Sequence:
    """A case as the step core's row, its images already encoded (no encoder thread)."""
    prep = prepared(pipe, photos, question, names)
    return Sequence(SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos), prompt_ids=prep.token_ids,
                    image_mask=prep.image_mask, image_embeds=pipe.encode_prompt_images(prep),
                    cache=pipe.llm.new_cache(), decode=pipe.prompts.decode)


def in_one_core(pipe, photos, cases=CASES, budget=None) -> list[list[int]]:
    """All requests through one step core with their images already encoded: half at once, the rest
    after two steps, so several requests' chunks are ready together and share LLM calls whatever the
    timing (the server's encoder thread staggers its requests' images)."""
    gen = pipe.generator
    core = StepCore(gen, max_num_seqs=len(cases), max_num_batched_tokens=budget or BATCHED, prefill_chunk=CHUNK)
    seqs = [case_sequence(pipe, photos, q, names) for q, names in cases]
    half = len(seqs) // 2
    for seq in seqs[:half]:
        core.add(seq)
    tokens = {id(s): [] for s in seqs}
    steps = 0
    while core.has_work or steps < 2:
        for e in core.step():
            if e.token is not None:
                tokens[id(e.seq)].append(e.token)
        steps += 1
        if steps == 2:
            for seq in seqs[half:]:
                core.add(seq)
    assert all(s.finish_reason in ("stop", "length") for s in seqs), [s.error for s in seqs]
    return [tokens[id(s)] for s in seqs]


def strip_stop(pipe, tokens):
    return [t for t in tokens if t not in pipe.generator.stop_token_ids]


# -- chunked prefill = plain prefill ----------------------------------------------------------------

def test_chunks_end_inside_image_tokens(pipe, photos):
    """The cases really cut images: some chunk boundary (a multiple of CHUNK) falls strictly inside a
    run of image positions."""
    cut = 0
    for q, names in CASES:
        mask = np.asarray(prepared(pipe, photos, q, names).image_mask)
        inside = [b for b in range(CHUNK, len(mask), CHUNK) if mask[b - 1] and mask[b]]
        cut += len(inside)
    assert cut >= 4


def test_chunked_prefill_equals_whole_prefill(pipe, photos):
    refs = [whole_prefill_reference(pipe, photos, q, n) for q, n in CASES]
    assert len({tuple(r) for r in refs}) == len(refs)  # greedy depends on the input
    assert alone(pipe, photos) == refs


def _off_by_one(monkeypatch):
    real = base.step_inputs

    def shifted(past, new, cols):
        mask, pos = real(past, new, cols)
        return mask, pos + (1 if max(new) > 1 and max(past) > 0 else 0)  # chunks after the first
    monkeypatch.setattr(ort, "step_inputs", shifted)


def _kv_dropped(monkeypatch):
    real = ort.OrtDecoder.forward

    def forget(self, x, cache):
        if x.shape[1] > 1 and cache.length > 0:  # a later chunk runs as if the earlier ones were not there
            length = cache.length
            fresh = self.new_cache()
            logits = real(self, x, fresh)
            pad = [np.concatenate([np.zeros(a.shape[:2] + (length,) + a.shape[3:], a.dtype), a], axis=2)
                   for a in self.cache_arrays(fresh)]
            new = self.cache_from_arrays(pad, length + x.shape[1])
            cache.values, cache.offset, cache.length, cache.hold = new.values, 0, new.length, new.hold
            return logits
        return real(self, x, cache)
    monkeypatch.setattr(ort.OrtDecoder, "forward", forget)


@pytest.mark.parametrize("broken", ["positions off by one", "chunk KV dropped"])
def test_the_chunk_comparison_fails_on_a_broken_chunk(pipe, photos, monkeypatch, broken):
    if pipe.kind != "fp32":
        pytest.skip("shown once, on the fp32 bundle")
    refs = [whole_prefill_reference(pipe, photos, q, n) for q, n in CASES[:4]]
    (_off_by_one if broken == "positions off by one" else _kv_dropped)(monkeypatch)
    assert alone(pipe, photos, CASES[:4]) != refs


# -- the same answer whatever the load ------------------------------------------------------------

BATCHED = 3 * CHUNK + 8  # a budget that runs several requests' chunks in one LLM call


def on_lane() -> bool:
    return threading.current_thread().name.startswith("flashvl-prefill")


@pytest.mark.parametrize("itl_stretch", [4.0, 0.0])
def test_eight_requests_together_equal_each_alone(pipe, photos, monkeypatch, itl_stretch):
    """Through the server's scheduler, with chunks beside the decode steps (the prefill lane, the
    default) and between them."""
    refs = [strip_stop(pipe, t) for t in alone(pipe, photos)]
    lane = []
    real = ort.OrtDecoder.forward_rows

    def spy(self, caches, inputs):
        lane.append(on_lane())
        return real(self, caches, inputs)
    monkeypatch.setattr(ort.OrtDecoder, "forward_rows", spy)
    out = together(pipe, photos, budget=BATCHED, itl_stretch=itl_stretch)
    assert [strip_stop(pipe, t) for t in out] == refs
    if not itl_stretch:
        assert not any(lane)  # no chunk ran beside the decode steps


def test_several_requests_chunks_in_one_call_equal_each_alone(pipe, photos, monkeypatch):
    refs = [strip_stop(pipe, t) for t in alone(pipe, photos)]
    multi = []
    real = ort.OrtDecoder.forward_rows

    def spy(self, caches, inputs):
        multi.append((len(inputs), on_lane()))
        return real(self, caches, inputs)
    monkeypatch.setattr(ort.OrtDecoder, "forward_rows", spy)
    assert [strip_stop(pipe, t) for t in in_one_core(pipe, photos)] == refs
    assert max(n for n, _ in multi) >= 2  # chunks of several requests did run as one call
    assert any(beside for _, beside in multi)  # and some ran on the prefill lane, beside decode steps


def test_the_load_comparison_fails_when_the_lane_loses_a_chunks_kv(pipe, photos, monkeypatch):
    """A prefill lane that runs a chunk on a copy of the rows' caches (its KV never reaches them)."""
    if pipe.kind != "fp32":
        pytest.skip("shown once, on the fp32 bundle")
    refs = [strip_stop(pipe, t) for t in alone(pipe, photos)]
    real = ort.OrtDecoder.forward_rows

    def on_copies(self, caches, inputs):
        if on_lane():
            caches = [self.cache_from_arrays(self.cache_arrays(c), c.length) for c in caches]
        return real(self, caches, inputs)
    monkeypatch.setattr(ort.OrtDecoder, "forward_rows", on_copies)
    out = in_one_core(pipe, photos)
    assert [strip_stop(pipe, t) for t in out] != refs


def test_a_tight_budget_changes_no_answer(pipe, photos):
    """The smallest budget that fits a chunk beside the decode rows: prefills take many steps and
    requests wait for room, and still every answer is the one alone."""
    refs = [strip_stop(pipe, t) for t in alone(pipe, photos, CASES[:5])]
    out = together(pipe, photos, CASES[:5], max_batch=3, budget=CHUNK + 2)
    assert [strip_stop(pipe, t) for t in out] == refs


def test_the_load_comparison_fails_when_two_rows_chunks_are_swapped(pipe, photos, monkeypatch):
    if pipe.kind != "fp32":
        pytest.skip("shown once, on the fp32 bundle")
    refs = [strip_stop(pipe, t) for t in alone(pipe, photos)]
    real = ort.OrtDecoder.forward_rows

    def swapped(self, caches, inputs):  # the last positions of two rows' chunks trade places
        if len(inputs) > 1:
            inputs = [x.copy() for x in inputs]
            inputs[0][-1], inputs[1][-1] = inputs[1][-1].copy(), inputs[0][-1].copy()
        return real(self, caches, inputs)
    monkeypatch.setattr(ort.OrtDecoder, "forward_rows", swapped)
    out = in_one_core(pipe, photos)
    assert [strip_stop(pipe, t) for t in out] != refs


# -- the plan -------------------------------------------------------------------------------------

def test_the_plan_decodes_first_and_keeps_to_the_budget(pipe, photos):
    if pipe.kind != "fp32":
        pytest.skip("planning does not depend on the weights")
    gen = pipe.generator
    core = StepCore(gen, max_num_seqs=4, max_num_batched_tokens=CHUNK + 3, prefill_chunk=CHUNK)
    seqs = [case_sequence(pipe, photos, q, names) for q, names in CASES[1:5]]
    for seq in seqs:
        core.add(seq)
    plans = []
    while core.has_work:
        plan = core.schedule()
        core.waiting.extendleft(reversed(plan.admit))  # schedule() is pure planning: let step() redo it
        for s in plan.admit:
            core.prefilling.remove(s)
        plans.append(plan)
        core.step()
    for plan in plans:
        assert plan.tokens <= core.budget
        running = [s for s in plan.decode]
        assert all(s.prefill_done for s in running)
        for seq, a, b in plan.prefill:  # chunks end on multiples of CHUNK or at the prompt's end
            assert (seq.start + b) % CHUNK == 0 or b == seq.n_new
    assert any(plan.decode and plan.prefill for plan in plans)  # decode rows and chunks share steps
    assert all(s.finish_reason == "length" for s in seqs)


# -- a runner without batching, failures ------------------------------------------------------------

class OneRowRunner:
    """Like the TensorRT decoder: ``forward`` only, no batched decode (the rest is the real runner)."""

    supports_batching = False

    def __init__(self, llm):
        self._llm = llm
        self.rows_seen: list[int] = []

    def __getattr__(self, name):
        if name in ("new_batch", "batch_add", "batch_keep", "forward_batch"):
            raise AttributeError(name)  # never called: the core must not need them
        return getattr(self._llm, name)

    def forward(self, x, cache):
        self.rows_seen.append(x.shape[0])
        return self._llm.forward(x, cache)

    def forward_rows(self, caches, inputs):
        return base.DecoderRunner.forward_rows(self, caches, inputs)


def test_a_runner_without_batching_serves_in_batches_of_one(tiny_dynamic_bundle, photos):
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu", prefill_chunk=CHUNK) as p:
        refs = [strip_stop(p, t) for t in alone(p, photos, CASES[:4])]
        p.llm = p.generator.llm = OneRowRunner(p.llm)
        out = together(p, photos, CASES[:4], max_batch=4)
        assert [strip_stop(p, t) for t in out] == refs
        assert set(p.llm.rows_seen) == {1}


def test_one_requests_failure_ends_that_request_only(tiny_dynamic_bundle, photos, monkeypatch):
    from flashvl_edge.runtime import core

    real = core.sample

    def sample(logits, seen, params, rng):
        if params.seed == 666:
            raise FloatingPointError("probabilities are not finite")
        return real(logits, seen, params, rng)
    monkeypatch.setattr(core, "sample", sample)
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu") as p:
        good = GenerationRequest(prepared(p, photos, "Hi", []), SamplingParams(max_new_tokens=6))
        bad = GenerationRequest(prepared(p, photos, "x", ["coffee"]), SamplingParams(max_new_tokens=6, seed=666))

        async def run():
            sched = Scheduler(p, max_batch=4).start()
            try:
                hs = [sched.submit(good), sched.submit(bad)]
                out = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in hs]), 60)
                assert sched.ready  # still serving
                again = await asyncio.wait_for(collect(sched.submit(GenerationRequest(
                    prepared(p, photos, "Hi", []), SamplingParams(max_new_tokens=6)))), 60)
                return out, again
            finally:
                sched.shutdown(5)
        (ok, failed), again = asyncio.run(run())
    assert ok[2].finish_reason == "length" and again[0] == ok[0]
    assert failed[2].finish_reason == "error" and "not finite" in failed[2].error


def serve_all(p, reqs, fatal: list, max_batch: int = 2):
    """Every request through a scheduler of ``max_batch`` rows: each one's (tokens, text, finish), and
    whether the scheduler is still ready at the end (``on_fatal`` messages go to ``fatal``)."""
    async def run():
        sched = Scheduler(p, max_batch=max_batch, on_fatal=fatal.append).start()
        try:
            hs = [sched.submit(r) for r in reqs]
            return await asyncio.wait_for(asyncio.gather(*[collect(h) for h in hs]), 60), sched.ready
        finally:
            sched.shutdown(5)
    return asyncio.run(run())


def test_a_model_failure_ends_every_request_and_stops_the_scheduler(tiny_dynamic_bundle, photos, monkeypatch):
    fatal = []
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu") as p:
        reqs = [GenerationRequest(prepared(p, photos, q, n), SamplingParams(max_new_tokens=50, ignore_eos=True))
                for q, n in CASES[:3]]
        calls = []
        real = ort.OrtDecoder.forward_batch

        def dies(self, x, batch):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(self, x, batch)
        monkeypatch.setattr(ort.OrtDecoder, "forward_batch", dies)
        out, ready = serve_all(p, reqs, fatal)  # two at a time: the third request waits
    assert [fin.finish_reason for _, _, fin in out] == ["error"] * 3
    assert all("illegal memory access" in fin.error for _, _, fin in out)
    assert not ready and fatal and "illegal memory access" in fatal[0]


def test_a_model_failure_on_the_prefill_lane_ends_every_request(tiny_dynamic_bundle, photos, monkeypatch):
    """A chunk run that fails beside the decode steps is the model's failure like any other."""
    fatal = []
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu") as p:
        reqs = [GenerationRequest(prepared(p, photos, q, n), SamplingParams(max_new_tokens=k, ignore_eos=True))
                for (q, n), k in zip(CASES[:3], (8, 200, 200))]
        real = ort.OrtDecoder.forward_rows

        def dies_on_lane(self, caches, inputs):
            if on_lane():
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(self, caches, inputs)
        monkeypatch.setattr(ort.OrtDecoder, "forward_rows", dies_on_lane)
        out, ready = serve_all(p, reqs, fatal)  # the third request's chunks run beside the second one's decode steps
    reasons = [fin.finish_reason for _, _, fin in out]
    assert reasons[1:] == ["error"] * 2 and reasons[0] in ("length", "error")
    assert all("illegal memory access" in fin.error for _, _, fin in out[1:])
    assert not ready and fatal and "illegal memory access" in fatal[0]

def test_one_row_clients_raise_model_errors(tiny_dynamic_bundle, monkeypatch):
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu") as p:
        monkeypatch.setattr(ort.OrtDecoder, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(ModelError, match="boom"):
            p.chat("Hi", max_new_tokens=3)


# -- batch-invariant mode ---------------------------------------------------------------------------

def _logits(pipe, photos, cases, together_: bool, invariant: bool) -> list[np.ndarray]:
    """Each case's greedy logits, every case alone (one-row cores) or all in one core. A case is
    (question, image names) or a list of token ids."""
    gen = pipe.generator
    seqs = []
    for case in cases:
        if isinstance(case, list):
            kw = dict(prompt_ids=case)
        else:
            prep = prepared(pipe, photos, *case)
            kw = dict(prompt_ids=prep.token_ids, image_mask=prep.image_mask,
                      image_embeds=pipe.encode_prompt_images(prep))
        seqs.append(Sequence(SamplingParams(max_new_tokens=NEW, ignore_eos=True), cache=pipe.llm.new_cache(),
                             keep_logits=True, **kw))
    if together_:
        core = StepCore(gen, max_num_seqs=len(cases), max_num_batched_tokens=len(cases) * (CHUNK + 1),
                        prefill_chunk=CHUNK, batch_invariant=invariant)
        for s in seqs:
            core.add(s)
        while core.has_work:
            core.step()
    else:
        for s in seqs:
            for _ in StepCore(gen, prefill_chunk=CHUNK, batch_invariant=invariant).run(s):
                pass
    return [np.stack(s.logits) for s in seqs]


@pytest.mark.parametrize("invariant", [True, False])
def test_batch_invariant_mode_gives_a_row_the_same_logits_alone_and_together(pipe, photos, invariant):
    """Rows of equal length (no padding anywhere): a row's logits alone and beside others are bitwise
    equal on fp32 always, and on the INT4 bundle in batch-invariant mode; without it an INT4 row that
    ends up the odd one out of a run takes another kernel and its logits differ."""
    ids = prepared(pipe, photos, "a b c d e f g h", []).token_ids
    cases = [ids[:8] + [100 + 7 * i] + ids[9:] for i in range(3)]
    alone_ = _logits(pipe, photos, cases, False, invariant)
    both = _logits(pipe, photos, cases, True, invariant)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(alone_, both))
    if invariant or pipe.kind == "fp32":
        assert worst == 0.0
    else:
        assert worst > 0.0


def test_batch_invariant_mode_never_runs_one_row(pipe, photos, monkeypatch):
    """Structurally: in batch-invariant mode every LLM run (prefill chunks, decode steps) has an even
    number of sequences, alone or together; a one-row client still gets its cache back for the next turn."""
    if pipe.kind != "fp32":
        pytest.skip("structure, not numerics")
    rows = []
    real = ort.OrtDecoder._vector_run

    def spy(self, embeds, mask, positions, past, size):
        rows.append(embeds.shape[0])
        return real(self, embeds, mask, positions, past, size)
    monkeypatch.setattr(ort.OrtDecoder, "_vector_run", spy)
    _logits(pipe, photos, [CASES[0]], False, True)
    _logits(pipe, photos, CASES[:3], True, True)
    assert rows and all(n % 2 == 0 for n in rows)
    pipe.generator.batch_invariant = True
    try:
        chat = pipe.session()
        r1 = chat.ask("Hi", max_new_tokens=4)
        assert chat.cache.length == len(r1.prompt_token_ids) + len(r1.token_ids) - 1
        r2 = chat.ask("And then?", max_new_tokens=4)
    finally:
        pipe.generator.batch_invariant = False
    again = pipe.session()
    assert again.ask("Hi", max_new_tokens=4).token_ids == r1.token_ids
    assert again.ask("And then?", max_new_tokens=4).token_ids == r2.token_ids


@pytest.mark.parametrize("broken", [False, True])
def test_chunks_cut_inside_a_cached_prefix_change_no_answer(tiny_dynamic_bundle, photos, monkeypatch, broken):
    """With the prefix cache on, a request resumes after its longest cached prefix (a multiple of the
    16-token block), which is not a chunk boundary: its first chunk is a short one up to the next
    multiple of CHUNK. The answers are those of a cold cache (and not when the reused KV is lost)."""
    cases = CASES[1:4]
    if broken:
        from flashvl_edge.runtime import pipeline

        real = pipeline.join_blocks
        monkeypatch.setattr(pipeline, "join_blocks", lambda blocks: [np.zeros_like(a) for a in real(blocks)])
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu", prefill_chunk=CHUNK, kv_cache_bytes=0) as cold:
        refs = [strip_stop(cold, t) for t in alone(cold, photos, cases)]
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu", prefill_chunk=CHUNK) as warm:
        alone(warm, photos, cases)  # fills the prefix cache

        async def run():
            sched = Scheduler(warm, max_batch=4, max_num_batched_tokens=BATCHED).start()
            try:
                hs = [sched.submit(GenerationRequest(prepared(warm, photos, q, n), SamplingParams(max_new_tokens=NEW)))
                      for q, n in cases]
                return await asyncio.wait_for(asyncio.gather(*[collect(h) for h in hs]), 120)
            finally:
                sched.shutdown(5)
        out = asyncio.run(run())
    cached = [fin.usage.cached_tokens for _, _, fin in out]
    assert all(c > 0 for c in cached) and any(c % CHUNK for c in cached)
    assert ([t for t, _, _ in out] == refs) is not broken


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_bad_itl_stretch_is_one_line_before_the_bundle_loads(tmp_path, capsys, value):
    assert main(["serve", str(tmp_path / "no-bundle"), "--itl-stretch", value]) != 0
    err = capsys.readouterr().err.strip()
    assert "--itl-stretch must be a number >= 0" in err and len(err.splitlines()) == 1


def test_a_request_cancelled_while_its_chunk_is_on_the_lane(pipe, photos, monkeypatch):
    """The cancelled row leaves at once (its chunk still running) and gets nothing after its finish when
    the chunk lands (each prompt is one chunk here, so the landing chunk completes it); the chunk's other
    rows land and every other request answers as alone."""
    if pipe.kind != "fp32":
        pytest.skip("scheduling, not numerics")
    cases = CASES[1:5]
    refs = [strip_stop(pipe, t) for t in alone(pipe, photos, cases)]
    release = threading.Event()
    real = ort.OrtDecoder.forward_rows

    def held(self, caches, inputs):  # a chunk on the lane runs only once the test lets it
        if on_lane():
            release.wait(30)
        return real(self, caches, inputs)
    monkeypatch.setattr(ort.OrtDecoder, "forward_rows", held)
    core = StepCore(pipe.generator, max_num_seqs=5, max_num_batched_tokens=4 * 512, prefill_chunk=512)
    # decodes throughout, so the others' chunks go to the lane
    runner = case_sequence(pipe, photos, *CASES[0], max_new_tokens=500, ignore_eos=True)
    core.add(runner)
    while not core.running:
        core.step()
    seqs = [case_sequence(pipe, photos, q, names) for q, names in cases]
    for s in seqs:
        core.add(s)
    tokens = {id(s): [] for s in seqs}
    events = []

    def step():
        for e in core.step():
            events.append(e)
            if e.token is not None and id(e.seq) in tokens:
                tokens[id(e.seq)].append(e.token)
    while core.inflight is None:
        step()
    victim = core.inflight[1][0][0]
    victim.cancelled = True
    step()  # the chunk is still held: decode steps go on, the victim leaves
    assert victim.finish_reason == "cancelled" and victim not in core.prefilling and core.inflight is not None
    release.set()
    while any(not s.finished for s in seqs):
        step()
    runner.cancelled = True
    step()
    mine = [e for e in events if e.seq is victim]
    assert mine and mine[-1].finished and sum(e.finished for e in mine) == 1
    for s, ref in zip(seqs, refs):
        if s is not victim:
            assert s.finish_reason in ("stop", "length") and strip_stop(pipe, tokens[id(s)]) == ref
