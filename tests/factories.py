"""Checkpoint directories built from tiny configs, for tests (no model hub here).

* ``make_canonical_checkpoint``: a preset saved in the canonical Flash-VL layout by ``save_checkpoint``.
* ``make_internvl_checkpoint``: a tiny ``InternVLForConditionalGeneration`` saved by transformers itself
  (``save_pretrained``), with an InternVL-style tokenizer and a GotOcr2 preprocessor_config.json, i.e.
  the layout of a real InternVL 2.5/3 "-hf" directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flashvl_edge.export import tokenizer as tok
from flashvl_edge.export.families import build_preset
from flashvl_edge.export.families.common import CLIP_MEAN, CLIP_STD, scale_llm_weights
from flashvl_edge.export.families.flashvl import save_checkpoint

# Tiny InternVL: 56/7 = 8x8 patches (+ CLS, dropped) -> pixel shuffle -> 4x4 = 16 tokens per tile.
INTERNVL_TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": [56, 56],
    "patch_size": [7, 7],
}
INTERNVL_TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
}
# Same reason and value as the tiny presets' llm_init_scale (see export/families/presets.py).
INTERNVL_TINY_LLM_INIT_SCALE = 12.0


def make_canonical_checkpoint(directory, preset: str = "tiny-static", seed: int = 0, max_shard_bytes: int = 2 * 1024**3) -> Path:
    directory = Path(directory)
    save_checkpoint(build_preset(preset, seed=seed), directory, max_shard_bytes=max_shard_bytes)
    return directory


def make_internvl_checkpoint(directory, seed: int = 0, max_patches: int = 6) -> Path:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = tok.preset_tokenizer_json("internvl")
    tokenizer = tok.load_tokenizer_json(tokenizer_json)
    text = Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(),
        eos_token_id=tokenizer.token_to_id(tok.IM_END),
        pad_token_id=tokenizer.token_to_id(tok.ENDOFTEXT),
        **INTERNVL_TINY_TEXT,
    )
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**INTERNVL_TINY_VISION),
        text_config=text,
        image_token_id=tokenizer.token_to_id("<IMG_CONTEXT>"),
        image_seq_length=16,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    scale_llm_weights(model.model.language_model, INTERNVL_TINY_LLM_INIT_SCALE)
    scale_llm_weights(model.lm_head, INTERNVL_TINY_LLM_INIT_SCALE)
    model.save_pretrained(str(directory))
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tok.make_tokenizer_config("internvl", model_max_length=2048), indent=2), encoding="utf-8"
    )
    size = INTERNVL_TINY_VISION["image_size"][0]
    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": max_patches,
        "size": {"height": size, "width": size},
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
    return directory


def tiles_manifest(image_size=84, pixels_per_token=14, overlap=2, iss=True, max_tiles=4, thumbnail=True,
                   min_tiles=1) -> dict:
    """The manifest sections the runtime's tile preprocessing and ISS read, for synthetic geometries.

    Defaults are tiny-dynamic-iss's: 84 px tiles, 14 px per token (t = 6), overlap 2."""
    t = image_size // pixels_per_token
    return {
        "vision": {"image_size": image_size, "tokens_per_tile": t * t, "tokens_per_side": t},
        "image": {"tokens_per_tile": t * t},
        "preprocess": {"mode": "tiles", "image_size": image_size, "resize_shortest_edge": image_size,
                       "crop_size": image_size, "do_center_crop": False, "rescale_factor": 1 / 255,
                       "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": "bicubic",
                       "max_tiles": max_tiles, "min_tiles": min_tiles, "use_thumbnail": thumbnail,
                       "max_image_pixels": 50_000_000},
        "iss": {"enabled": iss, "overlap_tokens": overlap if iss else 0, "pixels_per_token": pixels_per_token},
    }


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def manifest_json(sections: dict | None = None) -> dict:
    """A complete, valid manifest as JSON (tiny dims, no files) with ``sections`` merged over it.

    The graph interfaces are derived from the merged vision/llm sections unless ``sections`` gives
    ``graphs``, so a test that changes a geometry still gets a manifest that passes validation."""
    from flashvl_edge.runtime import contract as C
    from flashvl_edge.runtime.prompt import CHATML_TEMPLATE

    base = {
        "schema_version": C.SCHEMA_VERSION, "family": "flashvl", "variant": "static",
        "source": {"model": "test", "preset": None, "seed": None}, "dtype": "fp32",
        "vision": {"model_type": "siglip_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 32,
                   "num_layers": 2, "downsample_ratio": 0.5, "vision_feature_layer": -1, "tokens_per_tile": 16,
                   "tokens_per_side": 4},
        "llm": {"model_type": "qwen2", "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
                "num_kv_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 2048,
                "rope_theta": 1e6},
        "image": {"placeholder": "<image>", "image_token": "<image>", "image_token_id": 3, "start_token": None,
                  "end_token": None, "tokens_per_tile": 16},
        "preprocess": {"mode": "clip", "image_size": 64, "resize_shortest_edge": 64, "crop_size": 64,
                       "do_center_crop": True, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3,
                       "image_std": [0.5] * 3, "resample": "bicubic", "max_tiles": 1, "min_tiles": 1,
                       "use_thumbnail": False, "max_image_pixels": 50_000_000},
        "iss": {"enabled": False, "overlap_tokens": 0, "pixels_per_token": 16},
        "chat_template": CHATML_TEMPLATE,
        "generation": {"eos_token_ids": [2, 0], "stop_tokens": ["<|im_end|>", "<|endoftext|>"], "max_context": 2048},
        "tokenizer": {"file": "tokenizer.json", "config_file": "tokenizer_config.json"},
        "embeddings": {"file": "embed_tokens.npy", "dtype": "float32", "shape": [512, 64]},
        "quantization": None, "engines": {}, "tools": {}, "files": {},
    }
    m = _merge(base, sections or {})
    if "graphs" not in (sections or {}):
        v, llm = m["vision"], m["llm"]
        m["embeddings"]["shape"] = [llm["vocab_size"], llm["hidden_size"]]
        m["graphs"] = {
            "vision": {"file": "vision.onnx", "external_data": None, "opset": 18, "weight_bytes": 0,
                       **C.vision_io(m["preprocess"]["image_size"], v["tokens_per_tile"], llm["hidden_size"]).to_json()},
            "llm": {"file": "llm.onnx", "external_data": None, "opset": 18, "weight_bytes": 0,
                    **C.llm_io(llm["num_layers"], llm["hidden_size"], llm["num_kv_heads"], llm["head_dim"],
                               llm["vocab_size"]).to_json()},
        }
    return m


def as_manifest(data: dict):
    """``data`` (a complete manifest as JSON, or sections to merge over :func:`manifest_json`'s) typed."""
    from flashvl_edge.runtime.contract import Manifest

    full = data if "graphs" in data and "llm" in data else manifest_json(data)
    return Manifest.from_json(full, require_files=False)
