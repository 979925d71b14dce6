"""A checkpoint built from transformers modules only, exported and chatted with through the CLI, must
give transformers' answer: image features as ``InternVLModel.get_image_features`` selects them
(``vision_feature_layer: -1`` = the tower's ``last_hidden_state``, final norm included), and the same
32 greedy tokens as ``Qwen2ForCausalLM.generate(inputs_embeds=...)``.

Nothing of the project's model code builds the checkpoint or the reference: the directory is written
by hand in the canonical Flash-VL layout from a transformers vision tower, an InternVL-style mlp1 and a
Qwen2ForCausalLM; the photo goes through transformers' CLIPImageProcessor. Only the tokenizer comes
from export/tokenizer.py (transformers cannot train one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from torch import nn

from flashvl_edge.export import tokenizer as tok
from flashvl_edge.main import main

PROMPT = "Describe this image."
NEW_TOKENS = 32
SEED = 0  # both references run 32 tokens without a stop token, so the CLI must give all 32
# Random-init Qwen2 at init scale greedily repeats one token whatever the input; scaled matrices
# make the continuation depend on the image, so a wrong vision convention changes the tokens.
LLM_SCALE = 12.0
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=False)
CASES = {
    # 64/8 = 8x8 patches -> 4x4 = 16 tokens; SigLIP's final norm is post_layernorm.
    "siglip": dict(config="SiglipVisionConfig", model="SiglipVisionModel", norm="post_layernorm",
                   mean=[0.5] * 3, std=[0.5] * 3,
                   vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=64, patch_size=8, hidden_act="gelu_pytorch_tanh", vision_use_head=False)),
    # 84/7 = 12x12 patches -> 6x6 = 36 tokens; AIMv2's final norm is rms_norm.
    "aimv2": dict(config="Aimv2VisionConfig", model="Aimv2VisionModel", norm="rms_norm",
                  mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
                  vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=84, patch_size=7, hidden_act="silu", use_head=False)),
}


class Reference(nn.Module):
    """The transformers pieces of one checkpoint, and the transformers way of running them."""

    def __init__(self, case: dict, vocab_size: int, seed: int):
        super().__init__()
        import transformers

        torch.manual_seed(seed)
        self.vision_config = getattr(transformers, case["config"])(**case["vision"])
        self.tower = getattr(transformers, case["model"])(self.vision_config).eval()
        with torch.no_grad():  # a final norm that is not the identity, so leaving it out shows
            norm = getattr(self.tower, case["norm"])
            norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(0.2 * torch.randn_like(norm.bias))
        c_in, d = 4 * self.vision_config.hidden_size, TEXT["hidden_size"]
        self.mlp1 = nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, d), nn.GELU(), nn.Linear(d, d)).eval()
        self.text_config = transformers.Qwen2Config(vocab_size=vocab_size, **TEXT)
        self.llm = transformers.Qwen2ForCausalLM(self.text_config).eval()
        with torch.no_grad():
            for param in self.llm.parameters():
                if param.dim() >= 2:
                    param.mul_(LLM_SCALE)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternVLModel.get_image_features with vision_feature_layer=-1 (no CLS token to drop)."""
        from transformers.models.internvl.modeling_internvl import InternVLModel

        features = self.tower(pixel_values=pixel_values).last_hidden_state
        n, patches, channels = features.shape
        side = int(patches**0.5)
        features = InternVLModel.pixel_shuffle(None, features.reshape(n, side, side, channels).contiguous(),
                                              scale_factor=0.5)
        return self.mlp1(features.reshape(n, -1, features.shape[-1]))

    @torch.no_grad()
    def greedy(self, input_ids: list[int], image_token_id: int, image_embeds: torch.Tensor) -> list[int]:
        from transformers import GenerationConfig

        ids = torch.tensor([input_ids])
        embeds = self.llm.get_input_embeddings()(ids)
        embeds[ids == image_token_id] = image_embeds.reshape(-1, embeds.shape[-1])
        config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  eos_token_id=None, pad_token_id=0)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0].tolist()

    def save_canonical(self, directory: Path, image_token_id: int) -> None:
        """config.json + model.safetensors with the canonical Flash-VL key names."""
        directory.mkdir(parents=True)
        state = {f"vision_model.{k}": v for k, v in self.tower.state_dict().items()}
        state.update({f"mlp1.{k}": v for k, v in self.mlp1.state_dict().items()})
        state.update({f"language_model.{k}": v for k, v in self.llm.state_dict().items()})
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
        config = {
            "model_type": "flashvl", "architectures": ["FlashVLModel"], "variant": "static",
            "vision_config": self.vision_config.to_dict(), "text_config": self.text_config.to_dict(),
            "downsample_ratio": 0.5, "vision_feature_layer": -1, "image_token": "<image>",
            "image_token_id": image_token_id,
        }
        (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def chat_json(bundle: Path, photo: Path, capsys) -> dict:
    capsys.readouterr()
    rc = main(["chat", str(bundle), "--image", str(photo), "--prompt", PROMPT, "--json",
               "--max-new-tokens", str(NEW_TOKENS)])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", CASES)
def test_exported_bundle_follows_transformers(name, tmp_path, capsys):
    from transformers import CLIPImageProcessor

    case = CASES[name]
    tokenizer_json = tok.preset_tokenizer_json("flashvl")
    tokenizer = tok.load_tokenizer_json(tokenizer_json)
    image_token_id = tokenizer.token_to_id("<image>")
    ref = Reference(case, tokenizer.get_vocab_size(), SEED)

    ckpt = tmp_path / "ckpt"
    ref.save_canonical(ckpt, image_token_id)
    (ckpt / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok.make_tokenizer_config("flashvl", 2048)), encoding="utf-8")
    size = case["vision"]["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=case["mean"], image_std=case["std"])
    processor.save_pretrained(str(ckpt))

    bundle = tmp_path / "bundle"
    assert main(["export", str(ckpt), "--out", str(bundle), "--quiet"]) == 0

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(photo)
    pixels = processor(Image.open(photo), return_tensors="pt")["pixel_values"].float()
    expected = ref.image_features(pixels)

    # The vision graph, on transformers' preprocessing of the photo.
    session = ort.InferenceSession(str(bundle / "vision.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["image_embeds"], {"pixel_values": pixels.numpy()})
    vision_err = relative_error(got, expected.numpy())

    # The whole CLI: the bundle's own preprocessing, vision graph, prompt and greedy decode.
    answer = chat_json(bundle, photo, capsys)
    prompt_ids = answer["prompt_token_ids"]
    assert answer["image_token_id"] == image_token_id
    assert prompt_ids.count(image_token_id) == answer["n_image_tokens"] == expected.shape[1]
    reference_tokens = ref.greedy(prompt_ids, image_token_id, expected)
    stops = {tokenizer.token_to_id(t) for t in (tok.IM_END, tok.ENDOFTEXT)}
    assert not stops & set(reference_tokens), "the reference stops early: pick another seed"
    agree = next((i for i, (a, b) in enumerate(zip(answer["token_ids"], reference_tokens)) if a != b),
                 min(len(answer["token_ids"]), len(reference_tokens)))
    print(f"{name}: vision relative error {vision_err:.2e}; greedy tokens agreeing {agree}/{NEW_TOKENS}")
    assert vision_err < 1e-4, vision_err
    assert len(set(reference_tokens)) >= 8, reference_tokens  # not a degenerate repeat
    assert answer["token_ids"] == reference_tokens, (answer["token_ids"], reference_tokens)
