"""Presets as data: random-init models of a family with the dims of a published model (or tiny ones).

Each entry names the ``family`` that builds it (its ``build_preset``), and the full-size presets name
the published checkpoints whose shapes they copy under ``reference`` (the Flash-VL model cards), so
docs and ``doctor`` can print them (:func:`preset_reference`). ``"vocab_size": "tokenizer"`` means
"the generated tokenizer's size".
"""

from __future__ import annotations

import copy
from typing import Any

from flashvl_edge.runtime.errors import CheckpointError

from .common import CLIP_MEAN, CLIP_STD

# Qwen/Qwen2-1.5B-Instruct, the LLM of both Flash-VL 2B variants.
QWEN2_1_5B_INSTRUCT = {
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
TINY_QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": "tokenizer",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}

PRESETS: dict[str, dict[str, Any]] = {
    "flashvl-2b-static": {
        "family": "flashvl",
        "variant": "static",
        "reference": {"llm": "Qwen/Qwen2-1.5B-Instruct", "vision": "google/siglip2-so400m-patch16-512"},
        # SigLIP2-so400m-patch16-512 (the fixed-resolution SigLIP2 checkpoints use SigLIP's architecture,
        # hence siglip_vision_model): 512/16 = 32x32 = 1024 patches -> pixel shuffle -> 16x16 = 256 tokens.
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 512,
            "patch_size": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
        },
        "text_config": QWEN2_1_5B_INSTRUCT,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "llm_init_scale": 1.0,
    },
    "flashvl-2b-dynamic-iss": {
        "family": "flashvl",
        "variant": "dynamic-iss",
        "reference": {"llm": "Qwen/Qwen2-1.5B-Instruct", "vision": "apple/aimv2-huge-patch14-448"},
        # AIMv2-huge-patch14-448: 448/14 = 32x32 = 1024 patches -> 256 tokens per tile; SwiGLU MLP 4096.
        "vision_config": {
            "model_type": "aimv2_vision_model",
            "hidden_size": 1536,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 12,
            "image_size": 448,
            "patch_size": 14,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "use_head": False,
        },
        "text_config": QWEN2_1_5B_INSTRUCT,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "llm_init_scale": 1.0,
    },
    "tiny-static": {
        "family": "flashvl",
        "variant": "static",
        # 64/8 = 8x8 patches -> 4x4 = 16 tokens.
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
        },
        "text_config": TINY_QWEN2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        # At transformers' init scale (std 0.02) a random Qwen2 decodes degenerately (greedy repeats
        # the last prompt token whatever the image or cache), which lets broken runtimes pass parity
        # tests. Measured on these dims (3 photos x 2 prompts, 16 greedy tokens): x4 still repeats one
        # token; x12 gives 14-16 distinct tokens per continuation, a different continuation per
        # image and prompt, and top-1/top-2 logit margins mostly 0.1-2.7.
        "llm_init_scale": 12.0,
    },
    "tiny-dynamic-iss": {
        "family": "flashvl",
        "variant": "dynamic-iss",
        # 84/7 = 12x12 patches -> 6x6 = 36 tokens per tile, so an ISS overlap of 2 tokens is meaningful.
        "vision_config": {
            "model_type": "aimv2_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 84,
            "patch_size": 7,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "use_head": False,
        },
        "text_config": TINY_QWEN2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "llm_init_scale": 12.0,
    },
}


def preset(name: str) -> dict[str, Any]:
    """A deep copy of ``PRESETS[name]``; an unknown name is a CheckpointError listing the valid ones."""
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_reference(name: str) -> dict[str, str] | None:
    """The published models a preset copies the shapes of ({"llm": ..., "vision": ...}), or None."""
    reference = preset(name).get("reference")
    return dict(reference) if reference else None
