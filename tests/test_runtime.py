"""The runtime end to end on the tiny bundles: parity with the PyTorch reference, streaming, sessions.

Parity: the runtime's greedy tokens must equal ``reference_generate`` (transformers ``generate`` on the
same weights) for the SAME prompt token ids and image embeddings computed by torch from the same pixel
values (ISS: stitched with the runtime's ``select_tokens``). Each parity test also runs broken variants
of the runtime (image ignored, KV cache dropped) and requires them to differ from the reference, so the
comparison cannot pass on a runtime that does not use the image or the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
from events import prefill_chunks
import skimage.data

from flashvl_edge.runtime import PromptError
from flashvl_edge.runtime import images

N_TOKENS = 32


@pytest.fixture(scope="module")
def loaded(tiny_static_loaded, tiny_dynamic_loaded):
    return {"static": tiny_static_loaded, "dynamic": tiny_dynamic_loaded}


def torch_image_tokens(model, manifest, image) -> np.ndarray:
    """Image tokens computed by torch from the runtime's pixel values (stitched by the runtime's plan)."""
    import torch

    pre = images.preprocess(image, manifest)
    with torch.no_grad():
        feats = model.get_image_features(torch.from_numpy(pre.pixel_values)).numpy()
    return pre.select_tokens(feats)


def reference(model, prompt_ids, image_tokens, n=N_TOKENS) -> list[int]:
    import torch

    emb = None if image_tokens is None else torch.from_numpy(np.ascontiguousarray(image_tokens))
    return model.reference_generate(torch.tensor([prompt_ids]), emb, n)


class ForwardRecorder:
    """Wraps a decoder's forward to record the sequence length of every call (prefill vs decode)."""

    def __init__(self, llm, monkeypatch, drop_kv: bool = False):
        self.seq_lens: list[int] = []
        self.orig = llm.forward
        self.llm = llm
        self.drop_kv = drop_kv
        monkeypatch.setattr(llm, "forward", self)

    def __call__(self, x, cache):
        self.seq_lens.append(x.shape[1])
        if self.drop_kv and x.shape[1] == 1:
            # broken variant: each decode step sees only its own token (positions restart at 0)
            logits = self.orig(x, self.llm.new_cache())
            cache.length += 1
            return logits
        return self.orig(x, cache)


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_greedy_matches_torch_reference_with_image(which, pipes, loaded, monkeypatch):
    pipe, model = pipes[which], loaded[which].model
    photo = skimage.data.astronaut()
    res = pipe.chat("Describe the image.", image=photo, max_new_tokens=N_TOKENS, ignore_eos=True)
    assert res.n_image_tokens > 0 and res.prompt_token_ids.count(res.image_token_id) == res.n_image_tokens
    if which == "dynamic":
        assert res.n_tiles > 1  # the astronaut (512x512) is tiled

    img_tokens = torch_image_tokens(model, pipe.manifest, photo)
    ref = reference(model, res.prompt_token_ids, img_tokens)
    assert len(ref) == N_TOKENS
    assert res.token_ids == ref

    # runtime's own vision output agrees with torch's within fp32 noise
    enc = pipe.prepare_image(photo)
    np.testing.assert_allclose(pipe.encode_image(enc), img_tokens, rtol=1e-4, atol=1e-4)

    # teeth 1: the image ignored (image positions keep the image token's own embedding)
    table_row = np.asarray(pipe.generator.embed_table[pipe.generator.image_token_id])
    no_image = pipe.complete(res.prompt_token_ids, np.tile(table_row, (res.n_image_tokens, 1)),
                             max_new_tokens=N_TOKENS, ignore_eos=True)
    assert no_image.token_ids != ref
    # teeth 2: another photo gives other tokens (the image really steers the output)
    other = pipe.chat("Describe the image.", image=skimage.data.coffee(), max_new_tokens=N_TOKENS, ignore_eos=True)
    assert other.token_ids != ref
    # teeth 3: the KV cache dropped between decode steps
    ForwardRecorder(pipe.llm, monkeypatch, drop_kv=True)
    dropped = pipe.chat("Describe the image.", image=photo, max_new_tokens=N_TOKENS, ignore_eos=True)
    assert dropped.token_ids != ref


def test_greedy_matches_torch_reference_text_only(pipes, loaded):
    pipe, model = pipes["static"], loaded["static"].model
    res = pipe.chat("Write a haiku about the sea.", max_new_tokens=N_TOKENS, ignore_eos=True)
    assert res.n_image_tokens == 0 and res.image_token_id not in res.prompt_token_ids
    assert res.vision_s == 0.0
    assert res.token_ids == reference(model, res.prompt_token_ids, None)


def test_stops_on_eos_like_the_reference(pipes, loaded, monkeypatch):
    """Without ignore_eos, generation ends at the first stop id (included in token_ids, not in text)."""
    pipe, model = pipes["static"], loaded["static"].model
    free = pipe.chat("Hello!", max_new_tokens=8, ignore_eos=True)
    stop_id = free.token_ids[3]  # pretend the 4th greedy token is an end-of-turn token
    monkeypatch.setattr(pipe.generator, "stop_token_ids", frozenset({stop_id}))
    res = pipe.chat("Hello!", max_new_tokens=8)
    cut = free.token_ids.index(stop_id) + 1
    assert res.token_ids == free.token_ids[:cut] and res.finish_reason == "stop"
    import torch
    ref = model.reference_generate(torch.tensor([res.prompt_token_ids]), None, 8, eos_token_ids=[stop_id])
    assert res.token_ids == ref
    assert res.text == pipe.prompts.decode(res.token_ids[:-1])


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_stream_equals_chat(which, pipes):
    pipe = pipes[which]
    kw = dict(image=skimage.data.chelsea(), max_new_tokens=24, temperature=0.9, seed=7)
    res = pipe.chat("What animal is this?", **kw)
    stream = pipe.stream("What animal is this?", **kw)
    pieces = list(stream)
    assert "".join(pieces) == res.text == stream.result.text
    assert stream.result.token_ids == res.token_ids
    # and the text is the plain decode of the generated ids
    body = res.token_ids[:-1] if res.finish_reason == "stop" else res.token_ids
    assert res.text == pipe.prompts.decode(body)


def test_stop_string_cuts_text_and_stream(pipes):
    pipe = pipes["static"]
    full = pipe.chat("Say something.", max_new_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    assert len(full.text) >= 6
    stop = full.text[3:5]
    first = full.text.find(stop)
    res = pipe.chat("Say something.", max_new_tokens=24, temperature=1.0, seed=3, ignore_eos=True, stop=[stop])
    assert res.text == full.text[:first] and res.finish_reason == "stop"
    pieces = list(pipe.stream("Say something.", max_new_tokens=24, temperature=1.0, seed=3, ignore_eos=True,
                              stop=[stop]))
    assert "".join(pieces) == res.text


def test_sampling_is_reproducible_with_a_seed(pipes):
    pipe = pipes["static"]
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=100, top_p=0.95, repetition_penalty=1.1, ignore_eos=True)
    a = pipe.chat("Tell me a story.", seed=123, **kw)
    b = pipe.chat("Tell me a story.", seed=123, **kw)
    assert a.token_ids == b.token_ids
    others = [pipe.chat("Tell me a story.", seed=s, **kw).token_ids for s in (1, 2, 3)]
    assert any(o != a.token_ids for o in others)
    greedy = pipe.chat("Tell me a story.", max_new_tokens=16, ignore_eos=True)
    assert any(o != greedy.token_ids for o in others + [a.token_ids])


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_session_reuses_kv_cache_and_equals_one_shot(which, pipes, monkeypatch):
    pipe = pipes[which]
    photo = skimage.data.astronaut()
    rec = ForwardRecorder(pipe.llm, monkeypatch)
    vision_calls = []
    orig_infer = pipe.vision.infer
    monkeypatch.setattr(pipe.vision, "infer", lambda feed: vision_calls.append(1) or orig_infer(feed))

    chat = pipe.session()
    r1 = chat.ask("Describe the image.", image=photo, max_new_tokens=6)
    chunk = pipe.generator.prefill_chunk
    assert len(r1.prompt_token_ids) == r1.prefill_tokens
    assert rec.seq_lens[:len(prefill_chunks(0, r1.prefill_tokens, chunk))] == prefill_chunks(0, r1.prefill_tokens, chunk)
    cached = list(chat.token_ids)
    assert chat.cache.length == len(cached) == len(r1.prompt_token_ids) + len(r1.token_ids) - 1

    rec.seq_lens.clear()
    r2 = chat.ask("What colours do you see?", max_new_tokens=6)
    assert len(vision_calls) == 1  # the image was encoded once, in turn 1
    # turn 2 prefilled only the new tokens: the last reply token + the template's new-turn text
    assert r2.prefill_tokens == len(r2.prompt_token_ids) - len(cached)
    runs = prefill_chunks(len(cached), r2.prefill_tokens, chunk)
    assert rec.seq_lens[:len(runs)] == runs
    assert r2.prompt_token_ids[:len(cached)] == cached
    assert r2.prompt_token_ids[len(cached)] == r1.token_ids[-1]
    assert r2.prefill_tokens < len(r1.prompt_token_ids)
    assert r2.n_image_tokens == 0

    # a fresh one-shot over the same conversation gives the same tokens
    enc = pipe.prepare_image(photo)
    mask = chat.image_mask[:len(r2.prompt_token_ids)]  # image positions (a generated image id is text)
    fresh = pipe.complete(r2.prompt_token_ids, pipe.encode_image(enc), image_mask=mask, max_new_tokens=6)
    assert fresh.token_ids == r2.token_ids

    # and a third turn with a new image only encodes that image
    r3 = chat.ask("Compare with this one.", image=skimage.data.coffee(), max_new_tokens=4)
    assert len(vision_calls) == 3  # turn 1, the one-shot check above, turn 3
    assert r3.n_image_tokens > 0 and r3.prompt_token_ids[:len(r2.prompt_token_ids)] == r2.prompt_token_ids


def test_session_after_a_stop_token_feeds_the_template_end_of_turn(pipes, monkeypatch):
    """Turn 1 ends on a stop id: turn 2 re-enters through the template's own end-of-turn text."""
    pipe = pipes["static"]
    free = pipe.chat("Hi there.", max_new_tokens=6, ignore_eos=True)
    monkeypatch.setattr(pipe.generator, "stop_token_ids", frozenset({free.token_ids[2]}))
    chat = pipe.session()
    r1 = chat.ask("Hi there.", max_new_tokens=6)
    assert r1.finish_reason == "stop"
    r2 = chat.ask("And then?", max_new_tokens=6)
    assert r2.prompt_token_ids[:len(r1.prompt_token_ids)] == r1.prompt_token_ids
    im_end = pipe.prompts.token_id("<|im_end|>")
    n1 = len(r1.prompt_token_ids) + len(r1.token_ids) - 1
    assert r2.prompt_token_ids[n1] == im_end  # the template's end of turn, not the sampled stop id
    assert r2.prefill_tokens == len(r2.prompt_token_ids) - n1
    assert pipe.complete(r2.prompt_token_ids, max_new_tokens=6).token_ids == r2.token_ids


def test_session_after_a_stop_string_reprefills_exactly(pipes, monkeypatch):
    pipe = pipes["static"]
    full = pipe.chat("Go on.", max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    assert len(full.text) >= 4
    stop = full.text[2:4]
    chat = pipe.session()
    r1 = chat.ask("Go on.", max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True, stop=[stop])
    assert r1.finish_reason == "stop"
    r2 = chat.ask("More.", max_new_tokens=6)
    # the cut reply is what the conversation holds now, so the whole conversation is re-prefilled
    assert r2.prefill_tokens == len(r2.prompt_token_ids)
    assert pipe.complete(r2.prompt_token_ids, max_new_tokens=6).token_ids == r2.token_ids


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1), dict(top_k=1.5),
    dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0), dict(max_new_tokens=0),
    dict(max_new_tokens=True), dict(seed=-3), dict(stop=[""]),
])
def test_invalid_sampling_params_raise_prompt_error(bad, pipes, monkeypatch):
    pipe = pipes["static"]
    rec = ForwardRecorder(pipe.llm, monkeypatch)
    with pytest.raises(PromptError):
        pipe.chat("Hello", **bad)
    assert rec.seq_lens == []


def test_too_long_prompt_is_refused_before_running_anything(pipes, monkeypatch):
    pipe = pipes["dynamic"]
    rec = ForwardRecorder(pipe.llm, monkeypatch)
    calls = []
    monkeypatch.setattr(pipe.vision, "infer", lambda feed: calls.append(1))
    max_context = pipe.generator.max_context
    with pytest.raises(PromptError, match="context"):
        pipe.chat("word " * (max_context + 10), image=skimage.data.astronaut())
    assert rec.seq_lens == [] and calls == []
    # an empty prompt and a placeholder without an image are refused too
    with pytest.raises(PromptError):
        pipe.chat("   ")
    with pytest.raises(PromptError, match="placeholder"):
        pipe.chat("Look: <image>")


def test_generation_stops_at_the_context_limit(pipes, monkeypatch):
    pipe = pipes["static"]
    prompt_len = len(pipe.chat("Hi", max_new_tokens=1).prompt_token_ids)
    monkeypatch.setattr(pipe.generator, "max_context", prompt_len + 5)
    res = pipe.chat("Hi", max_new_tokens=50, ignore_eos=True)
    assert len(res.token_ids) == 5 and res.finish_reason == "length"


def test_chat_result_fields(pipes):
    res = pipes["dynamic"].chat("Describe.", image=skimage.data.coffee(), max_new_tokens=5, ignore_eos=True)
    d = res.to_dict()
    for key in ("text", "token_ids", "prompt_token_ids", "image_token_id", "n_image_tokens", "vision_s",
                "ttft_s", "decode_tokens_per_s"):
        assert key in d
    assert len(d["token_ids"]) == 5 and d["vision_s"] > 0 and d["ttft_s"] >= d["vision_s"]
    assert d["decode_tokens_per_s"] > 0


def test_iobinding_fallback_decodes_the_same_tokens(pipes, loaded, monkeypatch):
    """Older ONNX Runtime has no ``run_with_ortvaluevector``: the IO-binding path must decode the
    same tokens as the default path and as the torch reference, including a cache carried over turns."""
    pipe, model = pipes["static"], loaded["static"].model
    assert pipe.llm.use_vector_run  # this ORT has it, so the default below is the vector path
    photo = skimage.data.astronaut()
    fast = pipe.chat("Describe the image.", image=photo, max_new_tokens=N_TOKENS, ignore_eos=True)
    monkeypatch.setattr(pipe.llm, "use_vector_run", False)
    slow = pipe.chat("Describe the image.", image=photo, max_new_tokens=N_TOKENS, ignore_eos=True)
    assert slow.token_ids == fast.token_ids
    assert slow.token_ids == reference(model, slow.prompt_token_ids, torch_image_tokens(model, pipe.manifest, photo))
    # a cache written by one path is read by the other (same OrtKVCache contract)
    session = pipe.session()
    session.ask("Describe the image.", image=photo, max_new_tokens=4, ignore_eos=True)
    monkeypatch.setattr(pipe.llm, "use_vector_run", True)
    mixed = session.ask("And the colours?", max_new_tokens=8, ignore_eos=True)
    one_shot = pipe.session()
    one_shot.ask("Describe the image.", image=photo, max_new_tokens=4, ignore_eos=True)
    assert mixed.token_ids == one_shot.ask("And the colours?", max_new_tokens=8, ignore_eos=True).token_ids
