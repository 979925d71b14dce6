"""Several images per request: one placeholder and one tile grid (ISS stitch) per image, every tile in
as few vision-graph runs as the limits allow, checks before any graph runs, sessions, the server's
two-call path (``prepare_prompt`` + ``encode_prompt_images``) and ``flashvl chat --image A --image B``.

The tiny bundles' LLM weights are scaled so greedy decoding depends on the input: a different image,
or the same images in another order, gives other tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from events import prefill_chunks

from flashvl_edge.runtime import FlashVLError, Pipeline, PromptError
from flashvl_edge.runtime import images as image_lib
from flashvl_edge.runtime.contract import EngineLimits
from flashvl_edge.runtime.samples import test_photo

GREEDY = dict(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def photos():
    return {name: test_photo(name) for name in ("astronaut", "coffee", "chelsea")}


class VisionCalls:
    """Wraps a pipeline's vision runner: the tile count of every ``infer`` call."""

    def __init__(self, pipe, monkeypatch):
        self.sizes: list[int] = []
        real = pipe.vision.infer

        def infer(feed):
            self.sizes.append(int(feed["pixel_values"].shape[0]))
            return real(feed)

        monkeypatch.setattr(pipe.vision, "infer", infer)


class LLMCalls:
    """Wraps a pipeline's decoder: the sequence length of every ``forward`` call."""

    def __init__(self, pipe, monkeypatch):
        self.seq_lens: list[int] = []
        real = pipe.llm.forward

        def forward(x, cache):
            self.seq_lens.append(int(x.shape[1]))
            return real(x, cache)

        monkeypatch.setattr(pipe.llm, "forward", forward)


def mask_runs(mask) -> list[int]:
    """Lengths of the consecutive runs of image positions in a mask."""
    runs, n = [], 0
    for m in list(mask) + [False]:
        if m:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def same_pipeline(pipe, **options) -> Pipeline:
    """Another Pipeline over ``pipe``'s already open runners (cheap: no graph is loaded again)."""
    return Pipeline(pipe.bundle, pipe.vision, pipe.llm, pipe.prompts, pipe.generator.embed_table,
                    **{"image_cache_bytes": 0, "kv_cache_bytes": 0, **options})


# --------------------------------------------------------------------------------------------
# answers


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_two_images_answer_differs_from_each_alone_and_from_the_swap(which, pipes, photos):
    pipe = pipes[which]
    a, b = photos["astronaut"], photos["coffee"]
    alone_a = pipe.chat("Describe.", image=a, **GREEDY)
    alone_b = pipe.chat("Describe.", image=b, **GREEDY)
    both = pipe.chat("Describe.", images=[a, b], **GREEDY)
    swapped = pipe.chat("Describe.", images=[b, a], **GREEDY)
    assert len({tuple(r.token_ids) for r in (alone_a, alone_b, both, swapped)}) == 4
    assert both.n_image_tokens == alone_a.n_image_tokens + alone_b.n_image_tokens
    assert both.n_tiles == alone_a.n_tiles + alone_b.n_tiles
    assert both.prompt_token_ids.count(both.image_token_id) == both.n_image_tokens
    # reproducible, and images=[x] is image=x
    assert pipe.chat("Describe.", images=[a, b], **GREEDY).token_ids == both.token_ids
    assert pipe.chat("Describe.", images=[a], **GREEDY).token_ids == alone_a.token_ids
    # stream gives the same answer
    stream = pipe.stream("Describe.", images=[a, b], **GREEDY)
    assert "".join(stream) == both.text and stream.result.token_ids == both.token_ids


def test_each_image_gets_its_own_tile_grid_and_iss_token_count(pipes, photos):
    pipe = pipes["dynamic"]
    wide = np.full((100, 800, 3), 200, np.uint8)  # a 4x1 grid
    small = np.full((40, 40, 3), 90, np.uint8)  # one tile, no thumbnail
    srcs = [photos["astronaut"], wide, small]
    plans = [image_lib.image_to_tokens_plan(*image_lib.load_image(s).size, pipe.preprocess_config) for s in srcs]
    expected = [p.n_image_tokens for p in plans]
    assert len(set(expected)) == 3 and all(p.stitch is not None for p in plans[:2])  # ISS per image

    # no placeholder in the text: the images go first, back to back
    res = pipe.chat("Compare them.", images=srcs, max_new_tokens=2)
    mask = [tid == res.image_token_id for tid in res.prompt_token_ids]
    assert mask_runs(mask) == [sum(expected)]
    assert res.n_image_tokens == sum(expected) and res.n_tiles == sum(p.num_tiles for p in plans)

    # placeholders in the text put each image where it is named, in order
    prompt = "First <image> then <image> and last <image>, compare."
    res = pipe.chat(prompt, images=srcs, max_new_tokens=2)
    assert mask_runs([tid == res.image_token_id for tid in res.prompt_token_ids]) == expected
    prepared = pipe.prepare_prompt([pipe.prompts.user_message(prompt, 3)], srcs)
    assert prepared.token_ids == res.prompt_token_ids and mask_runs(prepared.image_mask) == expected
    assert prepared.n_image_tokens == sum(expected) and len(prepared.images) == 3
    with pytest.raises(PromptError, match="placeholder"):
        pipe.chat("Only <image> here.", images=srcs[:2])


# --------------------------------------------------------------------------------------------
# the vision graph: batched runs


def test_encode_images_runs_the_vision_graph_once_with_the_same_embeddings(pipes, photos, monkeypatch):
    pipe = pipes["dynamic"]
    a, b = photos["astronaut"], photos["chelsea"]
    alone = [pipe.encode_image(pipe.prepare_image(x)) for x in (a, b)]
    calls = VisionCalls(pipe, monkeypatch)
    encs = [pipe.prepare_image(a), pipe.prepare_image(b)]
    tiles = [e.n_tiles for e in encs]
    pipe.encode_images(encs)
    assert calls.sizes == [sum(tiles)]  # one run for both images
    for enc, ref in zip(encs, alone):
        assert np.array_equal(enc.embeds, ref) and enc.preprocessed is None
    pipe.encode_images(encs)  # already encoded: nothing runs again
    assert calls.sizes == [sum(tiles)]


def test_a_tile_cap_splits_runs_with_identical_results(pipes, photos, monkeypatch):
    pipe = pipes["dynamic"]
    a, b = photos["astronaut"], photos["coffee"]
    one_run = [pipe.prepare_image(x) for x in (a, b)]
    pipe.encode_images(one_run)
    ref = pipe.chat("Describe.", images=[a, b], **GREEDY)

    capped = same_pipeline(pipe, max_vision_batch=3)
    assert capped.max_vision_batch == 3
    calls = VisionCalls(pipe, monkeypatch)
    encs = [capped.prepare_image(x) for x in (a, b)]
    n = sum(e.n_tiles for e in encs)
    capped.encode_images(encs)
    assert calls.sizes == [3] * (n // 3) + ([n % 3] if n % 3 else []) and len(calls.sizes) > 2
    for enc, want in zip(encs, one_run):
        assert np.array_equal(enc.embeds, want.embeds)
    calls.sizes.clear()
    assert capped.chat("Describe.", images=[a, b], **GREEDY).token_ids == ref.token_ids
    assert max(calls.sizes) <= 3


def test_vision_batch_defaults(pipes):
    for pipe in pipes.values():
        pre = pipe.manifest.preprocess
        assert pipe.max_images == 8
        assert pipe.max_vision_batch == pre.vision_batch() * 8  # ONNX Runtime: a request in one run
        assert same_pipeline(pipe, max_images=3).max_vision_batch == pre.vision_batch() * 3
    with pytest.raises(FlashVLError, match="max_images"):
        same_pipeline(pipes["static"], max_images=0)
    with pytest.raises(FlashVLError, match="max_vision_batch"):
        same_pipeline(pipes["static"], max_vision_batch=0)


def test_an_engine_limit_bounds_the_tiles_per_run(pipes, photos, monkeypatch):
    """A TensorRT vision engine built for 2 crop tiles takes 3 images per run (2 + the thumbnail)."""
    pipe = pipes["dynamic"]
    monkeypatch.setattr(pipe.vision, "limits", EngineLimits(max_batch=1, max_input_len=2048, max_context=2048,
                                                            max_tiles=2))
    engine = same_pipeline(pipe)
    assert engine.max_vision_batch == pipe.manifest.preprocess.vision_batch(2) == 3
    calls = VisionCalls(pipe, monkeypatch)
    res = engine.chat("Describe.", images=[photos["coffee"], photos["chelsea"]], max_new_tokens=2)
    assert res.n_tiles == 6 and calls.sizes == [3, 3]  # each 3:2 photo: 2 crop tiles + thumbnail


# --------------------------------------------------------------------------------------------
# the server's path: prepare_prompt + encode_prompt_images


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_image_then_text_content_renders_what_chat_renders(which, pipes, photos):
    pipe = pipes[which]
    ph = pipe.prompts.placeholder
    a, b = photos["astronaut"], photos["coffee"]
    one = pipe.chat("Describe the image.", image=a, **GREEDY)
    prepared = pipe.prepare_prompt([{"role": "user", "content": ph + "\n" + "Describe the image."}], [a])
    assert prepared.token_ids == one.prompt_token_ids
    assert prepared.n_image_tokens == one.n_image_tokens and prepared.n_tiles == one.n_tiles
    embeds = pipe.encode_prompt_images(prepared)
    done = pipe.complete(prepared.token_ids, embeds, image_mask=prepared.image_mask, **GREEDY)
    assert done.token_ids == one.token_ids

    two = pipe.chat("Compare.", images=[a, b], system="Be brief.", **GREEDY)
    prepared = pipe.prepare_prompt([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": ph + ph + "\nCompare.", "name": "ignored"}], [a, b])
    assert prepared.token_ids == two.prompt_token_ids
    embeds = pipe.encode_prompt_images(prepared)
    assert embeds.shape[0] == two.n_image_tokens
    assert pipe.complete(prepared.token_ids, embeds, image_mask=prepared.image_mask, **GREEDY).token_ids \
        == two.token_ids
    # text only
    text = pipe.prepare_prompt([{"role": "user", "content": "Hi"}])
    assert text.images == [] and pipe.encode_prompt_images(text) is None
    assert text.token_ids == pipe.chat("Hi", max_new_tokens=1).prompt_token_ids


def test_prepare_prompt_refuses_bad_messages_before_decoding(pipes, photo_file, pixel_decodes):
    pipe = pipes["static"]
    ph = pipe.prompts.placeholder
    bad = [
        ([], [], "messages"),
        ([{"role": "robot", "content": "x"}], [], "role"),
        ([{"role": "user", "content": ["x"]}], [], "role"),
        ([{"role": "user", "content": "no placeholder"}], [photo_file], "placeholder"),
        ([{"role": "user", "content": ph + ph + "x"}], [photo_file], "placeholder"),
        ([{"role": "assistant", "content": ph}, {"role": "user", "content": "x"}], [photo_file], "assistant"),
    ]
    for messages, imgs, match in bad:
        with pytest.raises(PromptError, match=match) as e:
            pipe.prepare_prompt(messages, imgs)
        assert "\n" not in str(e.value)
    assert pixel_decodes == []


def test_prefill_inputs_with_several_images(pipes, photos):
    pipe = pipes["dynamic"]
    a, b = photos["astronaut"], photos["coffee"]
    inputs = pipe.prefill_inputs("Compare.", images=[a, b])
    ea, eb = (pipe.prepare_image(x) for x in (a, b))
    assert inputs.pixel_values.shape[0] == ea.n_tiles + eb.n_tiles
    assert inputs.image_embeds.shape[0] == ea.n_tokens + eb.n_tokens == sum(inputs.image_mask)
    assert inputs.token_ids == pipe.chat("Compare.", images=[a, b], max_new_tokens=1).prompt_token_ids


# --------------------------------------------------------------------------------------------
# refusals before any graph runs


def test_too_many_images_is_one_line_before_anything_runs(pipes, photo_file, pixel_decodes, monkeypatch):
    pipe = same_pipeline(pipes["static"], max_images=2)
    vision, llm = VisionCalls(pipe, monkeypatch), LLMCalls(pipe, monkeypatch)
    three = [photo_file] * 3
    attempts = [
        lambda: pipe.chat("Describe.", images=three),
        lambda: list(pipe.stream("Describe.", images=three)),
        lambda: pipe.session().ask("Describe.", images=three),
        lambda: pipe.prepare_prompt([{"role": "user", "content": "<image>" * 3 + "x"}], three),
        lambda: pipe.prefill_inputs("Describe.", images=three),
    ]
    for attempt in attempts:
        with pytest.raises(PromptError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and "3 images" in msg and "at most 2" in msg and "max_images" in msg
    assert pixel_decodes == [] and vision.sizes == [] and llm.seq_lens == []
    assert pipe.chat("Describe.", images=three[:2], max_new_tokens=1).n_image_tokens > 0


def test_images_that_overflow_the_context_are_refused_before_the_vision_graph(pipes, photos, monkeypatch):
    pipe = pipes["dynamic"]
    a, b = photos["astronaut"], photos["coffee"]
    one = pipe.chat("Describe.", image=a, max_new_tokens=1)
    monkeypatch.setattr(pipe.generator, "max_context", len(one.prompt_token_ids) + 20)  # one image fits, not two
    vision, llm = VisionCalls(pipe, monkeypatch), LLMCalls(pipe, monkeypatch)
    for attempt in (lambda: pipe.chat("Describe.", images=[a, b]),
                    lambda: pipe.prepare_prompt([{"role": "user", "content": "<image><image>\nDescribe."}], [a, b])):
        with pytest.raises(PromptError, match="context") as e:
            attempt()
        assert "\n" not in str(e.value)
    assert vision.sizes == [] and llm.seq_lens == []
    assert pipe.chat("Describe.", images=[a], max_new_tokens=1).token_ids == one.token_ids


def test_image_and_images_together_or_not_a_list(pipes, photos):
    pipe = pipes["static"]
    a = photos["astronaut"]
    with pytest.raises(PromptError, match="not both"):
        pipe.chat("Describe.", image=a, images=[a])
    with pytest.raises(PromptError, match="list"):
        pipe.chat("Describe.", images="photo.jpg")
    assert pipe.chat("Hi", images=[], max_new_tokens=1).n_image_tokens == 0


# --------------------------------------------------------------------------------------------
# sessions


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_session_new_image_in_a_later_turn_reuses_the_kv_cache(which, pipes, photos, monkeypatch):
    pipe = pipes[which]
    a, b, c = photos["astronaut"], photos["coffee"], photos["chelsea"]
    vision, llm = VisionCalls(pipe, monkeypatch), LLMCalls(pipe, monkeypatch)
    chat = pipe.session()
    r1 = chat.ask("Describe.", image=a, max_new_tokens=4)
    cached = list(chat.token_ids)
    n_a = pipe.prepare_image(a).n_tiles
    assert vision.sizes == [n_a]

    llm.seq_lens.clear()
    r2 = chat.ask("Compare <image> with <image>.", images=[b, c], max_new_tokens=4)
    assert vision.sizes[1:] == [pipe.prepare_image(b).n_tiles + pipe.prepare_image(c).n_tiles]  # new images only
    assert r2.prefill_tokens == len(r2.prompt_token_ids) - len(cached)
    runs = prefill_chunks(len(cached), r2.prefill_tokens, pipe.generator.prefill_chunk)
    assert llm.seq_lens[:len(runs)] == runs
    assert r2.prefill_tokens < len(r2.prompt_token_ids)
    assert r2.prompt_token_ids[:len(cached)] == cached
    assert mask_runs(chat.image_mask) == [r1.n_image_tokens] + [pipe.prepare_image(x).n_tokens for x in (b, c)]

    # the same conversation run fresh, from all three images' embeddings, gives the same tokens
    embeds = np.concatenate([pipe.encode_image(pipe.prepare_image(x)) for x in (a, b, c)])
    fresh = pipe.complete(r2.prompt_token_ids, embeds, image_mask=chat.image_mask[:len(r2.prompt_token_ids)],
                          max_new_tokens=4)
    assert fresh.token_ids == r2.token_ids


def test_session_reprefill_keeps_every_images_embeddings(pipes, photos, monkeypatch):
    """A turn cut by a stop string re-prefills the whole conversation: earlier images come from their
    stored embeddings (no second vision run) and the result equals a fresh run."""
    pipe = pipes["dynamic"]
    a, b = photos["astronaut"], photos["coffee"]
    prompt = "Go on: <image> then <image>."
    full = pipe.chat(prompt, images=[a, b], max_new_tokens=12, ignore_eos=True)
    assert len(full.text) >= 4
    stop = full.text[2:4]
    vision = VisionCalls(pipe, monkeypatch)
    chat = pipe.session()
    r1 = chat.ask(prompt, images=[a, b], max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert r1.finish_reason == "stop" and len(vision.sizes) == 1
    r2 = chat.ask("More.", max_new_tokens=6)
    assert r2.prefill_tokens == len(r2.prompt_token_ids) and len(vision.sizes) == 1
    mask = chat.image_mask[:len(r2.prompt_token_ids)]
    assert mask_runs(mask) == [pipe.prepare_image(x).n_tokens for x in (a, b)]
    embeds = np.concatenate([pipe.encode_image(pipe.prepare_image(x)) for x in (a, b)])
    assert pipe.complete(r2.prompt_token_ids, embeds, image_mask=mask, max_new_tokens=6).token_ids == r2.token_ids


# --------------------------------------------------------------------------------------------
# the CLI


def test_cli_chat_takes_several_images(tiny_dynamic_bundle, pipes, photos, tmp_path, capsys):
    from flashvl_edge.main import main

    paths = []
    for name in ("astronaut", "coffee"):
        paths.append(tmp_path / f"{name}.png")
        photos[name].save(paths[-1])
    args = ["chat", str(tiny_dynamic_bundle), "--image", str(paths[0]), "--image", str(paths[1]),
            "--prompt", "Compare.", "--max-new-tokens", "6", "--json"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    api = pipes["dynamic"].chat("Compare.", images=[str(p) for p in paths], max_new_tokens=6)
    assert obj["token_ids"] == api.token_ids and obj["n_image_tokens"] == api.n_image_tokens
    assert obj["prompt_token_ids"] == api.prompt_token_ids

    assert main(args[:-1] + ["--max-images", "1", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_images" in err[0]


def test_cli_interactive_image_lines_add_up(tiny_static_bundle, pipes, photos, tmp_path, capsys, monkeypatch):
    import io

    from flashvl_edge.main import main

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    photos["astronaut"].save(a)
    photos["coffee"].save(b)
    script = f"/image {a}\n/image {b}\nCompare.\nAnd now?\n/image {a}\n/image\nPlain.\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", str(tiny_static_bundle), "--max-new-tokens", "3", "--json"]) == 0
    first, second, third = map(json.loads, capsys.readouterr().out.strip().splitlines())
    per_image = pipes["static"].prepare_image(a).n_tokens
    assert first["n_image_tokens"] == 2 * per_image  # both attached images went with the question
    assert second["n_image_tokens"] == 0 and third["n_image_tokens"] == 0  # "/image" alone dropped one
