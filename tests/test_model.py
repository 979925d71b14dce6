"""Flash-VL model definition, presets and tokenizers (export/families/, export/tokenizer.py)."""

from __future__ import annotations

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers.models.internvl.modeling_internvl import InternVLModel

from flashvl_edge.export import families as F
from flashvl_edge.export import tokenizer as tok
from flashvl_edge.export.families import flashvl as FV
from flashvl_edge.export.families import presets as P
from flashvl_edge.runtime.errors import CheckpointError, FlashVLError

PHOTOS = {"astronaut": skdata.astronaut, "coffee": skdata.coffee, "chelsea": skdata.chelsea}


@pytest.fixture(scope="module")
def tiny_static():
    return F.build_preset("tiny-static", seed=0)


@pytest.fixture(scope="module")
def tiny_dynamic():
    return F.build_preset("tiny-dynamic-iss", seed=0)


def photo_pixels(name: str, loaded) -> torch.Tensor:
    """A real photo resized to the tile size and normalized with the preset's mean/std: [1,3,H,W]."""
    pre = loaded.manifest_sections["preprocess"]
    size = pre["image_size"]
    arr = np.asarray(Image.fromarray(PHOTOS[name]()).convert("RGB").resize((size, size), Image.BICUBIC), np.float32)
    arr = (arr * pre["rescale_factor"] - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def chat_ids(loaded, prompt: str, n_image_tokens: int) -> torch.Tensor:
    """ChatML prompt with <image> expanded to n_image_tokens image-token ids: [1, L]."""
    tokenizer = tok.Tokenizer.from_file(str(loaded.tokenizer_file))
    text = jinja2.Template(loaded.tokenizer_config["chat_template"]).render(
        messages=[{"role": "user", "content": f"<image>\n{prompt}"}], add_generation_prompt=True
    )
    image_id = loaded.model.image_token_id
    ids: list[int] = []
    for tid in tokenizer.encode(text).ids:
        ids.extend([image_id] * n_image_tokens if tid == image_id else [tid])
    return torch.tensor([ids])


# --- pixel shuffle / adapter ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 8, 8, 12), (1, 32, 32, 5), (3, 6, 6, 1)])
def test_pixel_shuffle_equals_transformers(shape):
    x = torch.randn(*shape)
    ours = F.pixel_shuffle(x, 0.5)
    theirs = InternVLModel.pixel_shuffle(None, x, scale_factor=0.5)  # does not use self
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_pixel_shuffle_output_is_raster_order_of_2x2_blocks():
    # Feature = (row, col) of the patch: output token (i, j) must hold exactly the 2x2 block at
    # rows 2i..2i+1, cols 2j..2j+1, so flattening the output is raster order over the token grid.
    side = 6
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    x = torch.stack([rows, cols], -1).float()[None]  # [1, side, side, 2], dim 1 = row
    out = F.pixel_shuffle(x, 0.5)[0]
    for i in range(side // 2):
        for j in range(side // 2):
            block = {(int(out[i, j, 2 * k]), int(out[i, j, 2 * k + 1])) for k in range(4)}
            assert block == {(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1)}


def transformers_features(tower_out, vision_feature_layer: int) -> torch.Tensor:
    """The selection rule of transformers' InternVLModel.get_image_features, written out."""
    if vision_feature_layer == -1:
        return tower_out.last_hidden_state
    return tower_out.hidden_states[vision_feature_layer]


@pytest.mark.parametrize("fixture", ["tiny_static", "tiny_dynamic"])
def test_image_features_equal_transformers_tower_plus_internvl_adapter(fixture, request):
    """Independent composition: the transformers tower's own outputs selected as InternVLModel does,
    transformers' pixel shuffle, then mlp1 — must equal get_image_features for every layer choice."""
    loaded = request.getfixturevalue(fixture)
    model = loaded.model
    size = loaded.manifest_sections["vision"]["image_size"]
    n_layers = model.config.vision_config.num_hidden_layers
    pixels = torch.randn(2, 3, size, size)
    side = model.config.patches_per_side
    with torch.no_grad():
        tower_out = model.vision_model(pixels, output_hidden_states=True)
        assert len(tower_out.hidden_states) == n_layers + 1
        for layer in range(-(n_layers + 1), n_layers + 1):
            model.config.vision_feature_layer = layer
            try:
                ours = model.get_image_features(pixels)
            finally:
                model.config.vision_feature_layer = -1
            grid = transformers_features(tower_out, layer).reshape(2, side, side, -1).contiguous()
            expected = model.mlp1(InternVLModel.pixel_shuffle(None, grid, 0.5).reshape(2, -1, grid.shape[-1] * 4))
            assert ours.shape == (2, model.config.tokens_per_tile, model.text_config.hidden_size)
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6, msg=f"vision_feature_layer {layer}")
        # -1 includes the final norm (SigLIP post_layernorm / AIMv2 rms_norm), num_layers does not:
        # the two choices really differ, so the comparisons above can fail
        assert not torch.allclose(tower_out.hidden_states[n_layers], tower_out.last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("fixture,norm", [("tiny_static", "post_layernorm"), ("tiny_dynamic", "rms_norm")])
@pytest.mark.parametrize("layer,runs,normed", [(-1, 2, True), (2, 2, False), (1, 1, False), (-2, 1, False), (0, 0, False)])
def test_only_the_needed_layers_run(fixture, norm, layer, runs, normed, request, monkeypatch):
    model = request.getfixturevalue(fixture).model
    calls = []
    hooks = [m.register_forward_hook(lambda *a, name=name: calls.append(name))
             for name, m in [*((f"layer{i}", l) for i, l in enumerate(model.vision_model.encoder.layers)),
                             ("norm", getattr(model.vision_model, norm))]]
    monkeypatch.setattr(model.config, "vision_feature_layer", layer)
    try:
        with torch.no_grad():
            model.vision_features(torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size))
    finally:
        for h in hooks:
            h.remove()
    assert calls == [f"layer{i}" for i in range(runs)] + (["norm"] if normed else [])


def test_adapter_module_names_match_the_checkpoint_layout(tiny_static):
    names = {k for k in tiny_static.model.state_dict() if k.startswith("mlp1.")}
    assert names == {"mlp1.0.weight", "mlp1.0.bias", "mlp1.1.weight", "mlp1.1.bias", "mlp1.3.weight", "mlp1.3.bias"}
    assert isinstance(tiny_static.model.vision_model, __import__("transformers").SiglipVisionModel)


# --- presets ----------------------------------------------------------------------------------------
def test_preset_is_deterministic_per_seed():
    a = F.build_preset("tiny-static", seed=3).model.state_dict()
    b = F.build_preset("tiny-static", seed=3).model.state_dict()
    c = F.build_preset("tiny-static", seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mlp1.1.weight"], c["mlp1.1.weight"])


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(CheckpointError) as err:
        F.build_preset("flashvl-7b")
    for name in P.PRESETS:
        assert name in str(err.value)
    with pytest.raises(FlashVLError, match="valid presets"):
        F.load_model("no-such-preset")


@pytest.mark.parametrize("name", ["flashvl-2b-static", "flashvl-2b-dynamic-iss"])
def test_full_size_preset_dims_without_building_weights(name):
    cfg = FV.preset_config(name)
    assert cfg.tokens_per_tile == 256 and cfg.patches_per_side == 32
    tc = cfg.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (1536, 28, 12, 2)
    assert (tc.intermediate_size, tc.vocab_size, tc.tie_word_embeddings) == (8960, 151936, True)
    assert tc.rope_parameters["rope_theta"] == 1e6
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = FV.FlashVLModel(cfg, image_token_id=3)
    n_params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.vision_model.parameters())
    if name == "flashvl-2b-static":
        assert type(model.vision_model).__name__ == "SiglipVisionModel"
        assert 0.40e9 < vision < 0.43e9  # so400m without the pooling head
    else:
        assert type(model.vision_model).__name__ == "Aimv2VisionModel"
        assert 0.67e9 < vision < 0.69e9  # AIMv2-huge (681M)
    assert 1.9e9 < n_params < 2.4e9


def test_full_size_presets_name_the_model_cards_checkpoints():
    assert F.preset_reference("flashvl-2b-static") == {
        "llm": "Qwen/Qwen2-1.5B-Instruct", "vision": "google/siglip2-so400m-patch16-512"}
    assert F.preset_reference("flashvl-2b-dynamic-iss") == {
        "llm": "Qwen/Qwen2-1.5B-Instruct", "vision": "apple/aimv2-huge-patch14-448"}
    assert F.preset_reference("tiny-static") is None
    with pytest.raises(CheckpointError, match="valid presets"):
        F.preset_reference("flashvl-7b")
    for name in P.PRESETS:  # presets are built by the family they name
        assert P.PRESETS[name]["family"] in F.FAMILIES and F.FAMILIES[P.PRESETS[name]["family"]].build_preset


def test_tiny_preset_vocab_equals_tokenizer_and_full_size_is_larger(tiny_static):
    tokenizer = tok.Tokenizer.from_file(str(tiny_static.tokenizer_file))
    assert tiny_static.model.text_config.vocab_size == tokenizer.get_vocab_size()
    assert FV.preset_config("flashvl-2b-static").text_config.vocab_size == 151936 > tokenizer.get_vocab_size()


def greedy_profile(loaded, prompts=("Describe this image.", "What color is the cat?")):
    """Greedy continuations and first-step argmax margins for 3 photos x the prompts."""
    model = loaded.model
    outs, margins = [], []
    for photo in PHOTOS:
        feats = model.get_image_features(photo_pixels(photo, loaded))[0]
        for prompt in prompts:
            ids = chat_ids(loaded, prompt, feats.shape[0])
            outs.append(tuple(model.reference_generate(ids, feats, 12)))
            with torch.no_grad():
                hidden = model.text_model(inputs_embeds=model.embed_with_images(ids, feats)).last_hidden_state
                top = model.lm_head(hidden[0, -1]).topk(2).values
            margins.append(float(top[0] - top[1]))
    return outs, margins


def non_degenerate(outs, n_prompts) -> bool:
    by_image = outs[::n_prompts]  # same prompt, different photos
    return len(set(by_image)) == len(by_image) and min(len(set(o)) for o in outs) >= 4


@pytest.mark.parametrize("name,fixture", [("tiny-static", "tiny_static"), ("tiny-dynamic-iss", "tiny_dynamic")])
def test_tiny_presets_decode_non_degenerately(name, fixture, request, monkeypatch):
    outs, margins = greedy_profile(request.getfixturevalue(fixture))
    assert non_degenerate(outs, 2), outs
    assert len(set(outs)) == len(outs)  # every (photo, prompt) pair continues differently
    assert np.median(margins) > 0.05, margins
    # The check can fail: at transformers' init scale the same model repeats one token.
    monkeypatch.setitem(P.PRESETS, name, {**P.PRESETS[name], "llm_init_scale": 1.0})
    degenerate_outs, _ = greedy_profile(F.build_preset(name, seed=0), prompts=("Describe this image.",))
    assert not non_degenerate(degenerate_outs, 1), degenerate_outs


def test_reference_generate_equals_manual_greedy_without_cache(tiny_dynamic):
    model = tiny_dynamic.model
    feats = model.get_image_features(photo_pixels("chelsea", tiny_dynamic))[0]
    ids = chat_ids(tiny_dynamic, "Describe this image.", feats.shape[0])

    def manual(image_embeds, steps=10):
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[ids == model.image_token_id] = image_embeds  # splice, in order
        out = []
        with torch.no_grad():
            for _ in range(steps):
                hidden = model.text_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
                nxt = int(model.lm_head(hidden[0, -1]).argmax())
                out.append(nxt)
                embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
        return out

    ref = model.reference_generate(ids, feats, 10)
    assert ref == manual(feats)
    # the splice matters: other image embeddings (another photo, or the same tokens reversed) change the output
    other = model.get_image_features(photo_pixels("coffee", tiny_dynamic))[0]
    assert model.reference_generate(ids, other, 10) != ref
    assert model.reference_generate(ids, feats.flip(0), 10) != ref
    with pytest.raises(ValueError, match="image-token positions"):
        model.reference_generate(ids, feats[:-1], 4)


def test_reference_generate_stops_at_eos_when_asked(tiny_static):
    model = tiny_static.model
    ids = torch.tensor([[1, 10, 20, 30]])
    full = model.reference_generate(ids, None, 8)
    assert len(full) == 8
    stop = full[2]
    stopped = model.reference_generate(ids, None, 8, eos_token_ids=[stop])
    assert stopped == full[: full.index(stop) + 1]


# --- manifest sections ------------------------------------------------------------------------------
SECTION_KEYS = {
    "vision": {"model_type", "image_size", "patch_size", "hidden_size", "num_layers", "downsample_ratio",
               "vision_feature_layer", "tokens_per_tile", "tokens_per_side"},
    "llm": {"model_type", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
            "vocab_size", "max_position_embeddings", "rope_theta"},
    "image": {"placeholder", "image_token", "image_token_id", "start_token", "end_token", "tokens_per_tile"},
    "preprocess": {"mode", "image_size", "resize_shortest_edge", "crop_size", "do_center_crop", "rescale_factor",
                   "image_mean", "image_std", "resample", "max_tiles", "min_tiles", "use_thumbnail", "max_image_pixels"},
    "iss": {"enabled", "overlap_tokens", "pixels_per_token"},
    "generation": {"eos_token_ids", "stop_tokens", "max_context"},
    "source": {"model", "preset", "seed", "reference"},
}


def check_section_keys(sections: dict) -> None:
    assert set(sections) == set(SECTION_KEYS) | {"family", "variant", "chat_template"}
    for name, keys in SECTION_KEYS.items():
        assert set(sections[name]) == keys, name


def test_manifest_sections_static(tiny_static):
    s = tiny_static.manifest_sections
    check_section_keys(s)
    tokenizer = tok.Tokenizer.from_file(str(tiny_static.tokenizer_file))
    assert (s["family"], s["variant"]) == ("flashvl", "static")
    assert s["source"] == {"model": "tiny-static", "preset": "tiny-static", "seed": 0, "reference": {}}
    assert s["vision"]["tokens_per_tile"] == 16 and s["vision"]["tokens_per_side"] == 4
    assert s["image"]["image_token_id"] == tokenizer.token_to_id("<image>") == tiny_static.model.image_token_id
    assert s["preprocess"]["mode"] == "clip" and s["preprocess"]["max_tiles"] == 1
    assert s["preprocess"]["max_image_pixels"] == 50_000_000
    assert s["iss"]["enabled"] is False
    assert s["generation"]["eos_token_ids"] == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    assert s["llm"]["head_dim"] == 16 and s["llm"]["num_kv_heads"] == 2 and s["llm"]["rope_theta"] == 1e6


def test_manifest_sections_dynamic_iss(tiny_dynamic):
    s = tiny_dynamic.manifest_sections
    check_section_keys(s)
    assert (s["family"], s["variant"]) == ("flashvl", "dynamic-iss")
    assert s["vision"]["tokens_per_side"] == 6  # >= 6 so a 2-token ISS overlap is meaningful
    p = s["preprocess"]
    assert (p["mode"], p["max_tiles"], p["min_tiles"], p["use_thumbnail"]) == ("tiles", 4, 1, True)
    assert s["iss"] == {"enabled": True, "overlap_tokens": 2, "pixels_per_token": 14}  # patch 7 / 0.5
    full = FV.preset_config("flashvl-2b-dynamic-iss")
    assert round(full.vision_config.patch_size / full.downsample_ratio) == 28


# --- tokenizer ----------------------------------------------------------------------------------------
def test_tokenizer_is_deterministic_and_has_single_id_special_tokens():
    a = tok.train_bpe_tokenizer(tok.CHATML_SPECIAL_TOKENS + tok.FLASHVL_IMAGE_TOKENS)
    b = tok.train_bpe_tokenizer(tok.CHATML_SPECIAL_TOKENS + tok.FLASHVL_IMAGE_TOKENS)
    assert a.to_str() == b.to_str()
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"):
        assert a.encode(special).ids == [a.token_to_id(special)]
    text = "Describe this image: the cat's eyes are green. 123 ünïcode ✓"
    assert a.decode(a.encode(text).ids) == text  # byte-level: anything round-trips
    assert len(a.encode("Describe this image").ids) < len("Describe this image")  # real merges


def test_chat_template_is_chatml_with_default_system():
    render = jinja2.Template(tok.CHATML_TEMPLATE).render
    text = render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    text = render(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello"}], add_generation_prompt=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n")
