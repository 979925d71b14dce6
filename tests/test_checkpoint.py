"""Checkpoint loading and saving (export/families/): canonical Flash-VL, InternVL, remote code, the registry, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import make_canonical_checkpoint, make_internvl_checkpoint
from flashvl_edge.export import families as F
from flashvl_edge.export import tokenizer as tok
from flashvl_edge.export.families import flashvl as FV
from flashvl_edge.export.families import registry
from flashvl_edge.export.families.remote_code import RemoteCodeVLM
from flashvl_edge.runtime.errors import CheckpointError


@pytest.fixture(scope="module")
def static_ckpt(tmp_path_factory):
    return make_canonical_checkpoint(tmp_path_factory.mktemp("static") / "ckpt", "tiny-static", seed=5)


@pytest.fixture(scope="module")
def internvl_ckpt(tmp_path_factory):
    return make_internvl_checkpoint(tmp_path_factory.mktemp("internvl") / "ckpt", seed=1)


def outputs(model, pixels, ids):
    with torch.no_grad():
        feats = model.get_image_features(pixels)
        logits = model.lm_head(model.text_model(inputs_embeds=model.get_input_embeddings()(ids)).last_hidden_state)
    return feats, logits


@pytest.mark.parametrize("preset,shard_bytes", [("tiny-static", 2**31), ("tiny-dynamic-iss", 40_000)])
def test_canonical_round_trip_is_identical(tmp_path, preset, shard_bytes):
    original = F.build_preset(preset, seed=7)
    FV.save_checkpoint(original, tmp_path, max_shard_bytes=shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (shard_bytes < 2**31)
    loaded = F.load_checkpoint(tmp_path)
    size = original.manifest_sections["vision"]["image_size"]
    pixels, ids = torch.randn(2, 3, size, size), torch.randint(0, 500, (1, 12))
    for a, b in zip(outputs(original.model, pixels, ids), outputs(loaded.model, pixels, ids)):
        assert torch.equal(a, b)
    assert original.model.reference_generate(ids, None, 8) == loaded.model.reference_generate(ids, None, 8)
    lm = loaded.model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # still tied
    a, b = dict(original.manifest_sections), dict(loaded.manifest_sections)
    assert b.pop("source") == {"model": str(tmp_path.resolve()), "preset": None, "seed": None, "reference": {}}
    a.pop("source")
    assert a == b
    assert Path(loaded.tokenizer_file).read_text() == Path(original.tokenizer_file).read_text()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "flashvl" and config["vision_config"]["model_type"] in FV.VISION_MODEL_TYPES
    assert "size" in json.loads((tmp_path / "preprocessor_config.json").read_text())


def test_config_json_has_no_post_norm_flag_and_layer_choices_round_trip(tmp_path):
    original = F.build_preset("tiny-static", seed=2)
    n_layers = original.model.config.vision_config.num_hidden_layers
    pixels = torch.randn(1, 3, 64, 64)
    for layer in (n_layers, -2):
        original.model.config.vision_feature_layer = layer
        try:
            FV.save_checkpoint(original, tmp_path / str(layer))
            expected = original.model.get_image_features(pixels)
        finally:
            original.model.config.vision_feature_layer = -1
        config = json.loads((tmp_path / str(layer) / "config.json").read_text())
        assert config["vision_feature_layer"] == layer and "vision_use_post_norm" not in config
        loaded = F.load_checkpoint(tmp_path / str(layer))
        assert loaded.manifest_sections["vision"]["vision_feature_layer"] == layer
        with torch.no_grad():
            assert torch.equal(loaded.model.get_image_features(pixels), expected)
    with torch.no_grad():  # the default (-1, after the final norm) is another choice than num_layers
        assert not torch.allclose(original.model.get_image_features(pixels), expected)


@pytest.mark.parametrize("layer,post_norm,advice", [
    (-1, False, '"vision_feature_layer": 2'),  # tiny-static has 2 layers: the last without the norm
    (2, False, '"vision_feature_layer": 2'),
    (-1, True, '"vision_feature_layer": -1'),
    (1, False, '"vision_feature_layer": 1'),
])
def test_post_norm_flag_is_refused_with_the_layer_to_use(static_ckpt, tmp_path, layer, post_norm, advice):
    old = tmp_path / "old"
    shutil.copytree(static_ckpt, old)
    config = json.loads((old / "config.json").read_text())
    config.update(vision_feature_layer=layer, vision_use_post_norm=post_norm)
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        F.load_checkpoint(old)
    message = str(err.value)
    assert "\n" not in message and "vision_use_post_norm" in message and message.endswith(advice), message


def rewrite_weights(ckpt: Path, out: Path, edit) -> Path:
    shutil.copytree(ckpt, out)
    state = load_file(str(out / "model.safetensors"))
    save_file(edit(state), str(out / "model.safetensors"))
    return out


def test_key_aliases_for_remote_code_layouts_load_identically(static_ckpt, tmp_path):
    aliases = [("vision_model.", "vision_tower."), ("mlp1.", "mm_projector."), ("language_model.model.", "model.language_model.")]

    def rename(state):
        out = {}
        for key, value in state.items():
            for old, new in aliases:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            out[key] = value
        return out

    renamed = rewrite_weights(static_ckpt, tmp_path / "renamed", rename)
    assert not any(k.startswith("mlp1.") for k in load_file(str(renamed / "model.safetensors")))
    a, b = F.load_checkpoint(static_ckpt), F.load_checkpoint(renamed)
    pixels, ids = torch.randn(1, 3, 64, 64), torch.randint(0, 500, (1, 6))
    for x, y in zip(outputs(a.model, pixels, ids), outputs(b.model, pixels, ids)):
        assert torch.equal(x, y)


def test_missing_unexpected_and_wrong_shape_keys_in_one_error(static_ckpt, tmp_path):
    def damage(state):
        state.pop("mlp1.1.bias")
        state.pop("language_model.model.norm.weight")
        state["extra.thing.weight"] = torch.zeros(3)
        state["mlp1.3.weight"] = torch.zeros(5, 5)
        return state

    bad = rewrite_weights(static_ckpt, tmp_path / "bad", damage)
    with pytest.raises(CheckpointError) as err:
        F.load_checkpoint(bad)
    message = str(err.value)
    assert "\n" not in message
    for key in ("mlp1.1.bias", "language_model.model.norm.weight", "extra.thing.weight", "mlp1.3.weight"):
        assert key in message
    assert "2 missing" in message and "1 unexpected" in message and "1 wrong shape" in message


def test_error_lists_are_capped(static_ckpt, tmp_path):
    bad = rewrite_weights(static_ckpt, tmp_path / "bad", lambda s: {k: v for k, v in s.items() if not k.startswith("vision_model.")})
    message = str(pytest.raises(CheckpointError, F.load_checkpoint, bad).value)
    assert "more)" in message and len(message) < 1500


def test_internvl_directory_matches_transformers(internvl_ckpt):
    from transformers import InternVLForConditionalGeneration

    loaded = F.load_checkpoint(internvl_ckpt)
    assert (loaded.family, loaded.variant) == ("internvl", "dynamic")
    reference = InternVLForConditionalGeneration.from_pretrained(str(internvl_ckpt), dtype=torch.float32).eval()
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = reference.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
        ours = loaded.model.get_image_features(pixels)
    assert ours.shape == (3, 16, 64)
    assert torch.equal(ours, expected)
    # Full forward through transformers (pixel_values + input_ids) vs our splice + text_model + lm_head.
    image_id = loaded.model.image_token_id
    ids = torch.tensor([[1, 7, 8, *([image_id] * 16), 9, 10]])
    with torch.no_grad():
        hf_logits = reference(input_ids=ids, pixel_values=pixels[:1]).logits
        embeds = loaded.model.embed_with_images(ids, ours[0])
        our_logits = loaded.model.lm_head(loaded.model.text_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-5, atol=1e-5)
    tokens = loaded.model.reference_generate(ids, ours[0], 12)
    assert len(set(tokens)) >= 4  # scaled LLM weights: not a repeated token
    assert loaded.model.reference_generate(ids, ours[1], 12) != tokens


def test_internvl_manifest_sections(internvl_ckpt):
    s = F.load_checkpoint(internvl_ckpt).manifest_sections
    tokenizer = tok.Tokenizer.from_file(str(internvl_ckpt / "tokenizer.json"))
    assert s["image"] == {"placeholder": "<image>", "image_token": "<IMG_CONTEXT>",
                          "image_token_id": tokenizer.token_to_id("<IMG_CONTEXT>"),
                          "start_token": "<img>", "end_token": "</img>", "tokens_per_tile": 16}
    p = s["preprocess"]
    assert (p["mode"], p["image_size"], p["max_tiles"], p["min_tiles"], p["use_thumbnail"]) == ("tiles", 56, 6, 1, True)
    assert s["iss"]["enabled"] is False
    assert s["vision"]["tokens_per_side"] == 4 and s["llm"]["vocab_size"] == tokenizer.get_vocab_size()


# --- errors --------------------------------------------------------------------------------------------
def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        F.load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        F.load_checkpoint(tmp_path)


def test_no_safetensors_and_pickle_only_refused(static_ckpt, tmp_path):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(static_ckpt, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        F.load_checkpoint(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="convert to safetensors"):
        F.load_checkpoint(no_weights)


def test_corrupt_safetensors_is_a_checkpoint_error(static_ckpt, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(static_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        F.load_checkpoint(bad)


def test_unsupported_model_type_and_vision_type(static_ckpt, tmp_path):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        F.load_checkpoint(other)
    naflex = tmp_path / "naflex"
    shutil.copytree(static_ckpt, naflex)
    config = json.loads((naflex / "config.json").read_text())
    config["vision_config"]["model_type"] = "siglip2_vision_model"
    (naflex / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="siglip2_vision_model"):
        F.load_checkpoint(naflex)


def test_remote_code_refused_without_flag(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "flashvl_dynamic_iss", "auto_map": {"AutoModel": "modeling_x.XModel"}})
    )
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        F.load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        F.load_model(str(tmp_path))


REMOTE_MODELING = '''
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote_vlm"

    def __init__(self, text_config=None, vision_config=None, image_token_id=3, **kwargs):
        self.text_config = Qwen2Config(**text_config) if isinstance(text_config, dict) else text_config
        self.vision_config = vision_config or {"image_size": 32, "patch_size": 8, "hidden_size": 16}
        self.image_token_id = image_token_id
        super().__init__(**kwargs)


class TinyRemoteModel(PreTrainedModel):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.patch = nn.Conv2d(3, 16, 8, 8)
        self.proj = nn.Linear(16, config.text_config.hidden_size)
        self.language_model = Qwen2ForCausalLM(config.text_config)
        self.post_init()

    def extract_feature(self, pixel_values):  # InternVL-chat naming
        return self.proj(self.patch(pixel_values).flatten(2).transpose(1, 2))
'''


def test_remote_code_with_flag_wraps_the_models_own_methods(tmp_path):
    tokenizer_json = tok.preset_tokenizer_json("flashvl")
    vocab = tok.load_tokenizer_json(tokenizer_json).get_vocab_size()
    (tmp_path / "modeling_tiny.py").write_text(REMOTE_MODELING)
    ns: dict = {}
    exec(compile(REMOTE_MODELING, "modeling_tiny", "exec"), ns)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    config = ns["TinyRemoteConfig"](text_config=text)
    config.auto_map = {"AutoConfig": "modeling_tiny.TinyRemoteConfig", "AutoModel": "modeling_tiny.TinyRemoteModel"}
    torch.manual_seed(0)
    original = ns["TinyRemoteModel"](config).eval()
    original.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(tokenizer_json)
    loaded = F.load_checkpoint(tmp_path, trust_remote_code=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model.get_image_features(pixels), original.extract_feature(pixels))
    assert loaded.manifest_sections["vision"]["tokens_per_tile"] == 16  # measured from the model
    assert loaded.model.lm_head.weight.shape == (vocab, 32)


def test_remote_code_that_matches_nothing_fails_loudly():
    with pytest.raises(CheckpointError, match="extract_feature, get_image_features, encode_images"):
        RemoteCodeVLM(torch.nn.Linear(2, 2), image_token_id=3)


# --- the registry -------------------------------------------------------------------------------------
def test_families_are_registered_by_model_type_and_auto_map():
    assert {"flashvl", "internvl", "remote_code"} <= set(F.FAMILIES)
    assert registry.family_for({"model_type": "flashvl"}, Path(".")).name == "flashvl"
    assert registry.family_for({"model_type": "internvl"}, Path(".")).name == "internvl"
    assert registry.family_for({"model_type": "x", "auto_map": {"AutoModel": "m.M"}}, Path(".")).name == "remote_code"
    # a known model_type wins over auto_map: the canonical loader runs, not the checkpoint's code
    assert registry.family_for({"model_type": "flashvl", "auto_map": {"AutoModel": "m.M"}}, Path(".")).name == "flashvl"


def test_a_registered_family_is_dispatched_to(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    seen = []

    @registry.register("toy", model_types=("toy_vlm",))
    def load_toy(ckpt_dir, config):
        seen.append((ckpt_dir, config["model_type"]))
        return "loaded"

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy_vlm"}))
    assert F.load_checkpoint(tmp_path) == "loaded" and seen == [(tmp_path, "toy_vlm")]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("toy")(load_toy)
    with pytest.raises(ValueError, match="another family"):
        registry.register("toy2", model_types=("flashvl",))(load_toy)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'flashvl', 'internvl', 'toy_vlm'"):
        F.load_checkpoint(other)
