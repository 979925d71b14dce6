"""Flash-VL (vision tower -> InternVL-style adapter -> Qwen2), its presets, and checkpoint loading.

Everything the exporter needs about a model comes out of here as a :class:`LoadedModel`: the torch
module (float32, eval), the tokenizer files, and the manifest sections this layer knows (see
docs/architecture.md). Three sources are supported:

* presets (random init from a seed; dims as data in ``PRESETS``), with a generated tokenizer;
* checkpoint directories: the canonical Flash-VL layout (``model_type: "flashvl"``), InternVL 2.5/3
  saved by transformers (``model_type: "internvl"``), and, only with ``trust_remote_code=True``,
  remote-code checkpoints wrapped through their own methods (best effort, fails loudly).

Weights are read from safetensors only; pickle (``.bin``/``.pt``) is refused, never unpickled.

Which vision layer feeds the adapter: ``vision_feature_layer`` indexes the tower's
``hidden_states`` tuple (index 0 = patch embeddings, index i = output of encoder layer i, so -1 is
the last encoder layer's output *before* the tower's final norm). That is InternVL's own semantics
(``vit(...).hidden_states[select_layer]``; InternViT has no final norm, so -1 there equals its
last_hidden_state). SigLIP's and AIMv2's ``last_hidden_state`` include a final norm
(``post_layernorm`` / ``rms_norm``): set ``vision_use_post_norm: true`` in config.json to apply it after
the last layer. Only the layers that are needed are run, so an exported vision graph carries no dead
layers.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from flashvl_edge.export import tokenizer as tok
from flashvl_edge.runtime.errors import CheckpointError

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

VISION_MODEL_TYPES = {
    # model_type in vision_config -> transformers class name. Siglip2VisionModel is NaFlex (variable
    # patch count, different embeddings) and is deliberately not accepted for the static model.
    "siglip_vision_model": "SiglipVisionModel",
    "aimv2_vision_model": "Aimv2VisionModel",
}

# ---------------------------------------------------------------------------------------------
# Presets: dims as data. "vocab_size": "tokenizer" means "the generated tokenizer's size".
# ---------------------------------------------------------------------------------------------
_QWEN25_1_5B = {
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
_TINY_QWEN2 = {
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
        "variant": "static",
        # SigLIP so400m-patch16-512: 512/16 = 32x32 = 1024 patches -> pixel shuffle -> 16x16 = 256 tokens.
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
        "text_config": _QWEN25_1_5B,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "llm_init_scale": 1.0,
    },
    "flashvl-2b-dynamic-iss": {
        "variant": "dynamic-iss",
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
        "text_config": _QWEN25_1_5B,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "llm_init_scale": 1.0,
    },
    "tiny-static": {
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
        "text_config": _TINY_QWEN2,
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
        "text_config": _TINY_QWEN2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "llm_init_scale": 12.0,
    },
}


# ---------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------
@dataclass
class FlashVLConfig:
    """What config.json of the canonical layout holds (transformers sub-configs as objects)."""

    variant: str  # "static" | "dynamic-iss"
    vision_config: Any  # SiglipVisionConfig | Aimv2VisionConfig
    text_config: Any  # Qwen2Config
    downsample_ratio: float = 0.5
    vision_feature_layer: int = -1
    vision_use_post_norm: bool = False
    image_token: str = "<image>"
    # Tiling / ISS (dynamic-iss only).
    max_tiles: int = 4
    min_tiles: int = 1
    use_thumbnail: bool = True
    iss_overlap_tokens: int = 2

    @property
    def patches_per_side(self) -> int:
        return int(self.vision_config.image_size) // int(self.vision_config.patch_size)

    @property
    def tokens_per_side(self) -> int:
        return int(round(self.patches_per_side * self.downsample_ratio))

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side**2

    def to_dict(self) -> dict:
        return {
            "model_type": "flashvl",
            "architectures": ["FlashVLModel"],
            "variant": self.variant,
            "vision_config": self.vision_config.to_dict(),
            "text_config": self.text_config.to_dict(),
            "downsample_ratio": self.downsample_ratio,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_use_post_norm": self.vision_use_post_norm,
            "image_token": self.image_token,
            "max_tiles": self.max_tiles,
            "min_tiles": self.min_tiles,
            "use_thumbnail": self.use_thumbnail,
            "iss_overlap_tokens": self.iss_overlap_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "config.json") -> "FlashVLConfig":
        import transformers

        variant = data.get("variant")
        if variant not in ("static", "dynamic-iss"):
            raise CheckpointError(f"{where}: variant must be 'static' or 'dynamic-iss', got {variant!r}")
        for key in ("vision_config", "text_config"):
            if not isinstance(data.get(key), dict):
                raise CheckpointError(f"{where}: missing '{key}' (a transformers config dict)")
        vdict = dict(data["vision_config"])
        vtype = vdict.get("model_type")
        if vtype not in VISION_MODEL_TYPES:
            raise CheckpointError(
                f"{where}: vision_config.model_type {vtype!r} is not supported "
                f"(supported: {', '.join(VISION_MODEL_TYPES)})"
            )
        tdict = dict(data["text_config"])
        if tdict.get("model_type", "qwen2") != "qwen2":
            raise CheckpointError(f"{where}: text_config.model_type {tdict.get('model_type')!r} is not supported (qwen2 only)")
        vision_config = _build_hf_config(lambda: transformers.CONFIG_MAPPING[vtype].from_dict(vdict), where, "vision_config")
        text_config = _build_hf_config(lambda: transformers.Qwen2Config.from_dict(tdict), where, "text_config")
        cfg = cls(
            variant=variant,
            vision_config=vision_config,
            text_config=text_config,
            downsample_ratio=float(data.get("downsample_ratio", 0.5)),
            vision_feature_layer=int(data.get("vision_feature_layer", -1)),
            vision_use_post_norm=bool(data.get("vision_use_post_norm", False)),
            image_token=str(data.get("image_token", "<image>")),
            max_tiles=int(data.get("max_tiles", 4)),
            min_tiles=int(data.get("min_tiles", 1)),
            use_thumbnail=bool(data.get("use_thumbnail", True)),
            iss_overlap_tokens=int(data.get("iss_overlap_tokens", 2)),
        )
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        n_layers = int(self.vision_config.num_hidden_layers)
        if not -(n_layers + 1) <= self.vision_feature_layer <= n_layers:
            raise CheckpointError(
                f"{where}: vision_feature_layer {self.vision_feature_layer} is outside the tower's "
                f"hidden_states (-{n_layers + 1}..{n_layers})"
            )
        side = self.patches_per_side
        if side * int(self.vision_config.patch_size) != int(self.vision_config.image_size):
            raise CheckpointError(f"{where}: vision image_size must be a multiple of patch_size")
        if abs(side * self.downsample_ratio - round(side * self.downsample_ratio)) > 1e-6 or self.tokens_per_side < 1:
            raise CheckpointError(
                f"{where}: downsample_ratio {self.downsample_ratio} does not divide the {side}x{side} patch grid"
            )


def _build_hf_config(factory, where: str, section: str):
    """Run a transformers config constructor, turning its validation errors into one CheckpointError.

    transformers validates config fields (types, cross-field rules) with huggingface_hub's strict
    dataclasses; their messages name the field but span several lines and end in a traceback.
    """
    from huggingface_hub.errors import StrictDataclassError

    try:
        return factory()
    except (StrictDataclassError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{where}: invalid {section} ({one_line(err)[:300]}); fix that value in config.json or re-save the checkpoint"
        ) from None


def pixel_shuffle(features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle, op for op the same as transformers' ``InternVLModel.pixel_shuffle``.

    [N, S, S, C] -> [N, S*r, S*r, C/r^2] with r = scale_factor; a test checks equality with the
    transformers function. With tokens reshaped row-major into the grid, the output grid is again
    row-major (dim 1 = rows), so flattening it gives the tile's tokens in raster order.
    """
    n, width, height, channels = features.shape
    if (height * scale_factor) % 1 or (width * scale_factor) % 1 or (channels / scale_factor) % 1:
        raise ValueError(f"pixel_shuffle: grid {width}x{height} is not divisible by 1/{scale_factor}")
    features = features.reshape(n, width, int(height * scale_factor), int(channels / scale_factor))
    features = features.permute(0, 2, 1, 3)
    features = features.reshape(
        n, int(height * scale_factor), int(width * scale_factor), int(channels / (scale_factor * scale_factor))
    )
    return features.permute(0, 2, 1, 3)


class _ReferenceGenerateMixin:
    """``reference_generate`` shared by every VLM: greedy via transformers' ``generate(inputs_embeds=...)``."""

    image_token_id: int

    def _generation_model(self) -> nn.Module:  # the module with .generate()
        raise NotImplementedError

    def embed_with_images(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with ``image_embeds`` spliced in (in order) at the image-token positions."""
        embeds = self.get_input_embeddings()(input_ids)
        positions = input_ids == self.image_token_id
        n_positions = int(positions.sum())
        n_given = 0 if image_embeds is None else int(image_embeds.shape[0])
        if n_positions != n_given:
            raise ValueError(f"{n_positions} image-token positions in input_ids but {n_given} image embeddings")
        if n_given:
            embeds = embeds.clone()
            embeds[positions] = image_embeds.to(embeds.dtype).reshape(n_given, -1)
        return embeds

    @torch.no_grad()
    def reference_generate(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_ids: list[int] | None = None,
    ) -> list[int]:
        """Greedy continuation of ``input_ids`` [1, L]; generates exactly ``max_new_tokens`` unless
        ``eos_token_ids`` is given (then it stops after the first one, which is included)."""
        from transformers import GenerationConfig

        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("reference_generate takes input_ids of shape [1, L]")
        embeds = self.embed_with_images(input_ids, image_embeds)
        gen_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=int(max_new_tokens),
            min_new_tokens=0 if eos_token_ids else int(max_new_tokens),
            eos_token_id=list(eos_token_ids) if eos_token_ids else None,
            pad_token_id=0,
        )
        out = self._generation_model().generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(input_ids.shape, dtype=torch.long),
            generation_config=gen_config,
        )
        # Decoder-only generate with inputs_embeds only returns the new tokens.
        return [int(t) for t in out[0].tolist()]


class FlashVLModel(_ReferenceGenerateMixin, nn.Module):
    """Vision tower (SigLIP | AIMv2) -> pixel shuffle -> mlp1 -> Qwen2ForCausalLM."""

    def __init__(self, config: FlashVLConfig, image_token_id: int):
        super().__init__()
        import transformers

        config.validate()
        self.config = config
        self.image_token_id = int(image_token_id)
        vision_cls = getattr(transformers, VISION_MODEL_TYPES[config.vision_config.model_type])
        self.vision_model = vision_cls(config.vision_config)
        c_vit = int(config.vision_config.hidden_size)
        c_in = int(round(c_vit / (config.downsample_ratio**2)))
        d_llm = int(config.text_config.hidden_size)
        # Indices 0, 1, 3 are the checkpoint key names (InternVL's mlp1); 2 is the parameter-free GELU.
        self.mlp1 = nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))
        self.language_model = transformers.Qwen2ForCausalLM(config.text_config)
        self.eval()

    # --- VLM interface ---------------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        return self.language_model.model

    @property
    def lm_head(self) -> nn.Module:
        return self.language_model.lm_head

    @property
    def text_config(self):
        return self.config.text_config

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def _generation_model(self) -> nn.Module:
        return self.language_model

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """hidden_states[vision_feature_layer] of the tower, [N, patches, C_vit] (see module docstring)."""
        tower = self.vision_model
        layers = tower.encoder.layers
        n_layers = len(layers)
        index = self.config.vision_feature_layer
        index = index if index >= 0 else n_layers + 1 + index
        hidden = tower.embeddings(pixel_values)
        for layer in layers[:index]:
            hidden = layer(hidden, None)
        if self.config.vision_use_post_norm and index == n_layers:
            final_norm = tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.rms_norm
            hidden = final_norm(hidden)
        return hidden

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_tile, D_llm], tokens in raster order of the tile's token grid."""
        hidden = self.vision_features(pixel_values)
        n, n_patches, channels = hidden.shape
        side = self.config.patches_per_side
        hidden = hidden.reshape(n, side, side, channels)
        hidden = pixel_shuffle(hidden, self.config.downsample_ratio)
        hidden = hidden.reshape(n, -1, hidden.shape[-1])
        return self.mlp1(hidden)


class InternVLWrapper(_ReferenceGenerateMixin, nn.Module):
    """The VLM interface over transformers' ``InternVLForConditionalGeneration``, using its own methods."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model.eval()
        self.image_token_id = int(hf_model.config.image_token_id)

    @property
    def text_model(self) -> nn.Module:
        return self.hf_model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.hf_model.lm_head

    @property
    def text_config(self):
        return self.hf_model.config.text_config

    def get_input_embeddings(self) -> nn.Module:
        return self.hf_model.get_input_embeddings()

    def _generation_model(self) -> nn.Module:
        return self.hf_model

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.hf_model.config
        out = self.hf_model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        return out.pooler_output if hasattr(out, "pooler_output") else out


# Conventional names in remote-code VLMs (InternVL-chat: extract_feature + language_model;
# LLaVA-likes: get_image_features / encode_images). Guesses: the published Flash-VL code is unseen.
REMOTE_IMAGE_FEATURE_METHODS = ("extract_feature", "get_image_features", "encode_images")
REMOTE_LANGUAGE_MODEL_ATTRS = ("language_model", "llm", "model.language_model")


class RemoteCodeVLM(_ReferenceGenerateMixin, nn.Module):
    """Best-effort VLM interface over a trusted remote-code model: wraps its own methods."""

    def __init__(self, hf_model: nn.Module, image_token_id: int):
        super().__init__()
        self.hf_model = hf_model.eval()
        self.image_token_id = int(image_token_id)
        self._image_method = next((m for m in REMOTE_IMAGE_FEATURE_METHODS if callable(getattr(hf_model, m, None))), None)
        self._causal_lm = None
        for path in REMOTE_LANGUAGE_MODEL_ATTRS:
            obj = hf_model
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if obj is not None:
                self._causal_lm = obj
                break
        problems = []
        if self._image_method is None:
            problems.append(f"no image-feature method (looked for {', '.join(REMOTE_IMAGE_FEATURE_METHODS)})")
        if self._causal_lm is None:
            problems.append(f"no language model (looked for attributes {', '.join(REMOTE_LANGUAGE_MODEL_ATTRS)})")
        elif not (hasattr(self._causal_lm, "lm_head") and hasattr(self._causal_lm, "model")):
            problems.append("the language model has no .model/.lm_head (expected a Qwen2ForCausalLM-like module)")
        if problems:
            raise CheckpointError(f"remote-code model {type(hf_model).__name__} cannot be wrapped: {'; '.join(problems)}")

    @property
    def text_model(self) -> nn.Module:
        return self._causal_lm.model

    @property
    def lm_head(self) -> nn.Module:
        return self._causal_lm.lm_head

    @property
    def text_config(self):
        return self._causal_lm.config

    def get_input_embeddings(self) -> nn.Module:
        return self._causal_lm.get_input_embeddings()

    def _generation_model(self) -> nn.Module:
        return self._causal_lm

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = getattr(self.hf_model, self._image_method)(pixel_values)
        if hasattr(out, "pooler_output"):
            out = out.pooler_output
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not torch.is_tensor(out) or out.dim() != 3 or out.shape[0] != pixel_values.shape[0]:
            raise CheckpointError(
                f"remote-code {self._image_method}() returned {getattr(out, 'shape', type(out))}, "
                "expected [num_tiles, tokens, hidden]"
            )
        return out


# ---------------------------------------------------------------------------------------------
# LoadedModel and manifest sections
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: nn.Module  # FlashVLModel | InternVLWrapper | RemoteCodeVLM; eval(), float32
    family: str  # "flashvl" | "internvl"
    variant: str  # "static" | "dynamic-iss" | "dynamic"
    tokenizer_file: Path
    tokenizer_config: dict
    manifest_sections: dict = field(default_factory=dict)
    # Extra checkpoint files save_checkpoint writes back (preprocessor_config.json content).
    preprocessor_config: dict | None = None


def _clip_preprocessor_config(image_size: int, mean, std) -> dict:
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


def _edge(value, default: int) -> int:
    """A CLIP size field (int, {"shortest_edge"}, {"height","width"}) as one int."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in value:
                return int(value[key])
    if isinstance(value, (list, tuple)) and value:
        return int(value[0])
    return default


def _shortest_edge(size, default: int) -> int | None:
    """CLIP's ``size`` as a shortest edge, or None for an exact {"height","width"} resize."""
    if isinstance(size, dict) and "shortest_edge" not in size and ("height" in size or "width" in size):
        return None
    return _edge(size, default)


def _resample_name(value) -> str:
    if isinstance(value, str):
        return value.lower()
    return PIL_RESAMPLE_NAMES.get(int(value if value is not None else 3), "bicubic")


def _generation_section(tokenizer, max_context: int) -> dict:
    stop_tokens = [t for t in (tok.IM_END, tok.ENDOFTEXT) if tokenizer.token_to_id(t) is not None]
    return {
        "eos_token_ids": [tokenizer.token_to_id(t) for t in stop_tokens],
        "stop_tokens": stop_tokens,
        "max_context": int(max_context),
    }


def _llm_section(text_config) -> dict:
    heads = int(text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads
    rope = getattr(text_config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(text_config, "rope_theta", None))
    return {
        "model_type": text_config.model_type,
        "hidden_size": int(text_config.hidden_size),
        "num_layers": int(text_config.num_hidden_layers),
        "num_attention_heads": heads,
        "num_kv_heads": int(getattr(text_config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "vocab_size": int(text_config.vocab_size),
        "max_position_embeddings": int(text_config.max_position_embeddings),
        "rope_theta": float(rope_theta) if rope_theta is not None else None,
    }


def flashvl_manifest_sections(cfg: FlashVLConfig, tokenizer, tokenizer_config: dict, preprocessor: dict, source: dict) -> dict:
    """The manifest sections (docs/architecture.md) for a canonical Flash-VL model."""
    image_size = int(cfg.vision_config.image_size)
    image_token_id = tokenizer.token_to_id(cfg.image_token)
    tiles = cfg.variant == "dynamic-iss"
    pixels_per_token = int(round(int(cfg.vision_config.patch_size) / cfg.downsample_ratio))
    return {
        "source": source,
        "family": "flashvl",
        "variant": cfg.variant,
        "vision": {
            "model_type": cfg.vision_config.model_type,
            "image_size": image_size,
            "patch_size": int(cfg.vision_config.patch_size),
            "hidden_size": int(cfg.vision_config.hidden_size),
            "num_layers": int(cfg.vision_config.num_hidden_layers),
            "downsample_ratio": cfg.downsample_ratio,
            "vision_feature_layer": cfg.vision_feature_layer,
            "tokens_per_tile": cfg.tokens_per_tile,
            "tokens_per_side": cfg.tokens_per_side,
        },
        "llm": _llm_section(cfg.text_config),
        "image": {
            "placeholder": "<image>",
            "image_token": cfg.image_token,
            "image_token_id": image_token_id,
            "start_token": None,
            "end_token": None,
            "tokens_per_tile": cfg.tokens_per_tile,
        },
        "preprocess": {
            "mode": "tiles" if tiles else "clip",
            "image_size": image_size,
            # {"height","width"} (SigLIP-style) means "resize straight to that size": no shortest-edge step.
            "resize_shortest_edge": _shortest_edge(preprocessor.get("size"), image_size),
            "crop_size": _edge(preprocessor.get("crop_size"), image_size),
            # Tiles are resized to image_size x image_size as a whole; only "clip" center-crops.
            "do_center_crop": bool(preprocessor.get("do_center_crop", True)) and not tiles,
            "rescale_factor": float(preprocessor.get("rescale_factor", 1 / 255)),
            "image_mean": [float(v) for v in preprocessor.get("image_mean", CLIP_MEAN)],
            "image_std": [float(v) for v in preprocessor.get("image_std", CLIP_STD)],
            "resample": _resample_name(preprocessor.get("resample", 3)),
            "max_tiles": cfg.max_tiles if tiles else 1,
            "min_tiles": cfg.min_tiles if tiles else 1,
            "use_thumbnail": cfg.use_thumbnail if tiles else False,
            "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
        },
        "iss": {
            "enabled": tiles,
            "overlap_tokens": cfg.iss_overlap_tokens if tiles else 0,
            "pixels_per_token": pixels_per_token,
        },
        "chat_template": tokenizer_config.get("chat_template") or tok.CHATML_TEMPLATE,
        "generation": _generation_section(tokenizer, cfg.text_config.max_position_embeddings),
    }


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def _scale_llm_weights(language_model: nn.Module, scale: float) -> None:
    """Multiply the LLM's matrices (embeddings, projections; not norms/biases) by ``scale`` in place."""
    if scale == 1.0:
        return
    with torch.no_grad():
        for param in language_model.parameters():  # parameters() yields a tied tensor once
            if param.dim() >= 2:
                param.mul_(scale)


def preset_config(name: str) -> FlashVLConfig:
    """The FlashVLConfig of a preset (no weights built); vocab resolved against the generated tokenizer."""
    import transformers

    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    preset = copy.deepcopy(PRESETS[name])
    tokenizer = tok.load_tokenizer_json(tok.preset_tokenizer_json("flashvl"))
    tdict = preset["text_config"]
    if tdict["vocab_size"] == "tokenizer":
        tdict["vocab_size"] = tokenizer.get_vocab_size()
    tdict["eos_token_id"] = tokenizer.token_to_id(tok.IM_END)
    tdict["pad_token_id"] = tokenizer.token_to_id(tok.ENDOFTEXT)
    vdict = preset["vision_config"]
    return FlashVLConfig(
        variant=preset["variant"],
        vision_config=transformers.CONFIG_MAPPING[vdict["model_type"]](**{k: v for k, v in vdict.items() if k != "model_type"}),
        text_config=transformers.Qwen2Config(**{k: v for k, v in tdict.items() if k != "model_type"}),
    )


def build_preset(name: str, seed: int = 0) -> LoadedModel:
    """A random-init model from ``PRESETS[name]`` (deterministic for a seed) with a generated tokenizer.

    Full-size presets are built once, on CPU in float32 (~2.1B params, ~8.5 GB); the LLM scaling
    for tiny presets is in place, so there is never a second copy of the weights.
    """
    cfg = preset_config(name)
    preset = PRESETS[name]
    tokenizer_json = tok.preset_tokenizer_json("flashvl")
    tokenizer = tok.load_tokenizer_json(tokenizer_json)
    torch.manual_seed(seed)
    model = FlashVLModel(cfg, image_token_id=tokenizer.token_to_id(cfg.image_token))
    _scale_llm_weights(model.language_model, float(preset.get("llm_init_scale", 1.0)))
    model.eval()
    tokenizer_config = tok.make_tokenizer_config("flashvl", model_max_length=cfg.text_config.max_position_embeddings)
    preprocessor = _clip_preprocessor_config(int(cfg.vision_config.image_size), preset["image_mean"], preset["image_std"])
    source = {"model": name, "preset": name, "seed": int(seed)}
    return LoadedModel(
        model=model,
        family="flashvl",
        variant=cfg.variant,
        tokenizer_file=tok.materialize_tokenizer_file(tokenizer_json),
        tokenizer_config=tokenizer_config,
        manifest_sections=flashvl_manifest_sections(cfg, tokenizer, tokenizer_config, preprocessor, source),
        preprocessor_config=preprocessor,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors reading with strict key checks
# ---------------------------------------------------------------------------------------------
# Key-prefix aliases: checkpoint prefix -> canonical prefix, tried in order for keys that do not
# match the canonical layout. The entries for published remote-code checkpoints are GUESSES from the
# conventions of InternVL-chat / LLaVA-style code (the Flash-VL remote code could not be read); any
# key still unmatched is reported, never dropped silently.
KEY_ALIASES: tuple[tuple[str, str], ...] = (
    # transformers 4.x SiglipVisionModel nested its transformer under .vision_model
    ("vision_model.vision_model.", "vision_model."),
    ("model.vision_model.", "vision_model."),
    ("vision_tower.vision_model.", "vision_model."),
    ("model.vision_tower.", "vision_model."),
    ("vision_tower.", "vision_model."),
    ("visual.", "vision_model."),
    # adapter
    ("model.mlp1.", "mlp1."),
    ("mm_projector.", "mlp1."),
    ("model.mm_projector.", "mlp1."),
    ("multi_modal_projector.layer_norm.", "mlp1.0."),
    ("multi_modal_projector.linear_1.", "mlp1.1."),
    ("multi_modal_projector.linear_2.", "mlp1.3."),
    ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
    ("model.multi_modal_projector.linear_1.", "mlp1.1."),
    ("model.multi_modal_projector.linear_2.", "mlp1.3."),
    # language model: Qwen2Model directly under language_model. / model.language_model.
    ("language_model.embed_tokens.", "language_model.model.embed_tokens."),
    ("language_model.layers.", "language_model.model.layers."),
    ("language_model.norm.", "language_model.model.norm."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("llm.", "language_model."),
    ("model.llm.", "language_model."),
)
MAX_LISTED_KEYS = 8

# What to do when a checkpoint's weights do not match its config (appended to those errors).
CANONICAL_WEIGHTS_HINT = (
    "check that the directory is a complete Flash-VL checkpoint in the canonical layout "
    "(config.json matching the weights), or re-save it with `save_checkpoint`"
)
HF_WEIGHTS_HINT = (
    "check that the directory is a complete checkpoint whose config.json matches its weights, "
    "or re-save it with transformers' save_pretrained"
)

# Pickle-based weight formats we refuse to open (unpickling runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _canonical_key(key: str, expected: dict) -> str | None:
    if key in expected:
        return key
    for old, new in KEY_ALIASES:
        if key.startswith(old):
            candidate = new + key[len(old):]
            if candidate in expected:
                return candidate
    return None


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return shown + (f" (+{more} more)" if more > 0 else "")


def safetensors_files(ckpt_dir: Path) -> list[Path]:
    """The weight files of a checkpoint (from the index when there is one); refuses pickle-only dirs."""
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index}: unreadable index ({err}); re-save the checkpoint") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (ckpt_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{ckpt_dir}: shards listed in the index are missing: {_list_keys(missing)}")
        return [ckpt_dir / n for n in names]
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in ckpt_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{ckpt_dir}: only pickle weights found ({_list_keys(pickled)}); .bin/.pt are not supported "
            "(loading them can run arbitrary code): convert to safetensors"
        )
    raise CheckpointError(f"{ckpt_dir}: no *.safetensors weight files found")


def check_safetensors_headers(files: list[Path]) -> None:
    """Open every weight file's header (cheap: no tensor data) so a truncated or empty file is one
    CheckpointError naming it, before transformers' loader meets it and raises SafetensorError."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as sf:
                sf.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({one_line(err)}); the file is damaged or incomplete: "
                "copy or download it again"
            ) from None


def load_safetensors_into(model: nn.Module, files: list[Path], optional: set[str] = frozenset(), where: str = "") -> None:
    """Copy checkpoint tensors into ``model`` one at a time (no second full copy in memory).

    Checks everything first: keys mapped through KEY_ALIASES; every missing, unexpected, duplicated
    or wrong-shape key is reported in one CheckpointError before any weight is touched.
    """
    from safetensors import SafetensorError, safe_open

    expected = model.state_dict()
    plan: list[tuple[Path, str, str]] = []
    found: set[str] = set()
    reported: set[str] = set()  # wrong-shape keys: reported once, not again as missing
    unexpected, wrong_shape, duplicated, wrong_dtype = [], [], [], []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as sf:
                for key in sf.keys():
                    canonical = _canonical_key(key, expected)
                    if canonical is None:
                        unexpected.append(key)
                        continue
                    if canonical in found:
                        duplicated.append(key)
                        continue
                    shape = list(sf.get_slice(key).get_shape())
                    if shape != list(expected[canonical].shape):
                        wrong_shape.append(f"{key} {shape} (expected {list(expected[canonical].shape)})")
                        reported.add(canonical)
                        continue
                    dtype = sf.get_slice(key).get_dtype()
                    if dtype not in ("F16", "BF16", "F32", "F64"):  # e.g. already-quantized integer weights
                        wrong_dtype.append(f"{key} ({dtype})")
                        reported.add(canonical)
                        continue
                    found.add(canonical)
                    plan.append((path, key, canonical))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({one_line(err)}); the file is damaged or incomplete: "
                "copy or download it again"
            ) from None
    missing = sorted(k for k in expected if k not in found and k not in optional and k not in reported)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_list_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shape: {_list_keys(wrong_shape)}")
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} not floating point: {_list_keys(wrong_dtype)}")
    if duplicated:
        problems.append(f"{len(duplicated)} duplicated (after aliasing): {_list_keys(duplicated)}")
    if problems:
        raise CheckpointError(
            f"{where or 'checkpoint'}: weights do not match the config: " + "; ".join(problems) + f"; {CANONICAL_WEIGHTS_HINT}"
        )
    with torch.no_grad():
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for path, key, canonical in plan:
            by_file.setdefault(path, []).append((key, canonical))
        for path, pairs in by_file.items():
            with safe_open(str(path), framework="pt") as sf:
                for key, canonical in pairs:
                    expected[canonical].copy_(sf.get_tensor(key))


def one_line(err) -> str:
    return " ".join(str(err).split())


def _read_json(path: Path, required: bool = True) -> dict | None:
    if not path.exists():
        if required:
            raise CheckpointError(
                f"{path.parent}: no {path.name} found, so this is not a checkpoint directory; give a checkpoint "
                f"directory (config.json, tokenizer.json, *.safetensors) or a preset name ({', '.join(PRESETS)})"
            )
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(err)}); fix or re-save the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _checkpoint_tokenizer(ckpt_dir: Path):
    path = ckpt_dir / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no tokenizer.json (a tokenizers file is required to build a bundle)")
    try:
        tokenizer = tok.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{path}: not a readable tokenizers file ({one_line(err)})") from None
    config = _read_json(ckpt_dir / "tokenizer_config.json", required=False) or {}
    if not config.get("chat_template"):
        # Newer transformers save the template as chat_template.jinja / chat_template.json.
        jinja = ckpt_dir / "chat_template.jinja"
        cjson = ckpt_dir / "chat_template.json"
        if jinja.exists():
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        elif cjson.exists():
            config["chat_template"] = (_read_json(cjson) or {}).get("chat_template")
    if not config.get("chat_template"):
        config["chat_template"] = tok.CHATML_TEMPLATE
    return path, tokenizer, config


def _require_token(tokenizer, token: str, ckpt_dir: Path) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise CheckpointError(f"{ckpt_dir}: the tokenizer has no {token!r} token")
    return tid


def _new_empty(factory):
    """Build a module without running random init (every parameter is loaded afterwards)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return factory()


def _load_flashvl(ckpt_dir: Path, config: dict) -> LoadedModel:
    cfg = FlashVLConfig.from_dict(config, where=str(ckpt_dir / "config.json"))
    tokenizer_file, tokenizer, tokenizer_config = _checkpoint_tokenizer(ckpt_dir)
    image_token_id = _require_token(tokenizer, cfg.image_token, ckpt_dir)
    if "image_token_id" in config and int(config["image_token_id"]) != image_token_id:
        raise CheckpointError(
            f"{ckpt_dir}: config image_token_id {config['image_token_id']} != tokenizer id {image_token_id} of {cfg.image_token!r}"
        )
    if image_token_id >= int(cfg.text_config.vocab_size):
        raise CheckpointError(f"{ckpt_dir}: image token id {image_token_id} is outside the LLM vocab ({cfg.text_config.vocab_size})")
    files = safetensors_files(ckpt_dir)
    try:
        model = _new_empty(lambda: FlashVLModel(cfg, image_token_id))
    except (RuntimeError, MemoryError) as err:  # torch's allocator raises RuntimeError, not MemoryError
        if isinstance(err, RuntimeError) and "alloc" not in str(err).lower():
            raise
        raise CheckpointError(f"{ckpt_dir}: there is not enough memory for the model config.json describes "
                              f"({one_line(err)[:160]}); check the sizes in config.json") from None
    optional = {"language_model.lm_head.weight"} if cfg.text_config.tie_word_embeddings else set()
    load_safetensors_into(model, files, optional=optional, where=str(ckpt_dir))
    if cfg.text_config.tie_word_embeddings:
        model.language_model.tie_weights()
    model.eval()
    preprocessor = _read_json(ckpt_dir / "preprocessor_config.json", required=False)
    if preprocessor is None:
        raise CheckpointError(f"{ckpt_dir}: no preprocessor_config.json (CLIPImageProcessor fields are needed)")
    source = {"model": str(ckpt_dir.resolve()), "preset": None, "seed": None}
    return LoadedModel(
        model=model,
        family="flashvl",
        variant=cfg.variant,
        tokenizer_file=tokenizer_file,
        tokenizer_config=tokenizer_config,
        manifest_sections=flashvl_manifest_sections(cfg, tokenizer, tokenizer_config, preprocessor, source),
        preprocessor_config=preprocessor,
    )


def _check_loading_info(info: dict, where: Path) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else str(k[0]) for k in (info.get(kind) or [])]
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_keys', '')}: {_list_keys(sorted(keys))}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(problems) + f"; {HF_WEIGHTS_HINT}")


def _internvl_sections(hf_model, tokenizer, tokenizer_config: dict, preprocessor: dict, source: dict) -> dict:
    cfg = hf_model.config
    vcfg = cfg.vision_config
    image_size = _edge(vcfg.image_size, 448)
    patch_size = _edge(vcfg.patch_size, 14)
    side = int(round((image_size // patch_size) * cfg.downsample_ratio))
    image_token = "<IMG_CONTEXT>"
    image_token_id = tokenizer.token_to_id(image_token)
    if image_token_id != int(cfg.image_token_id):
        raise CheckpointError(
            f"config image_token_id {cfg.image_token_id} is not the tokenizer's {image_token!r} ({image_token_id})"
        )
    for special in ("<img>", "</img>"):
        if tokenizer.token_to_id(special) is None:
            raise CheckpointError(f"the tokenizer has no {special!r} token (InternVL wraps image tokens in <img>...</img>)")
    size = preprocessor.get("size") or {}
    tile = int(size.get("height", image_size)) if isinstance(size, dict) else _edge(size, image_size)
    crop_to_patches = bool(preprocessor.get("crop_to_patches", True))
    return {
        "source": source,
        "family": "internvl",
        "variant": "dynamic",
        "vision": {
            "model_type": vcfg.model_type,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": int(vcfg.hidden_size),
            "num_layers": int(vcfg.num_hidden_layers),
            "downsample_ratio": float(cfg.downsample_ratio),
            "vision_feature_layer": int(cfg.vision_feature_layer),
            "tokens_per_tile": side * side,
            "tokens_per_side": side,
        },
        "llm": _llm_section(cfg.text_config),
        "image": {
            "placeholder": "<image>",
            "image_token": image_token,
            "image_token_id": image_token_id,
            "start_token": "<img>",
            "end_token": "</img>",
            "tokens_per_tile": side * side,
        },
        "preprocess": {
            "mode": "tiles",
            "image_size": tile,
            "resize_shortest_edge": tile,
            "crop_size": tile,
            "do_center_crop": False,
            "rescale_factor": float(preprocessor.get("rescale_factor", 1 / 255)),
            "image_mean": [float(v) for v in preprocessor.get("image_mean", CLIP_MEAN)],
            "image_std": [float(v) for v in preprocessor.get("image_std", CLIP_STD)],
            "resample": _resample_name(preprocessor.get("resample", 3)),
            "max_tiles": int(preprocessor.get("max_patches", 12)) if crop_to_patches else 1,
            "min_tiles": int(preprocessor.get("min_patches", 1)) if crop_to_patches else 1,
            # GotOcr2's crop_to_patches appends a whole-image thumbnail when it makes > 1 patch.
            "use_thumbnail": crop_to_patches,
            "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
        },
        "iss": {"enabled": False, "overlap_tokens": 0, "pixels_per_token": int(round(patch_size / cfg.downsample_ratio))},
        "chat_template": tokenizer_config.get("chat_template") or tok.CHATML_TEMPLATE,
        "generation": _generation_section(tokenizer, cfg.text_config.max_position_embeddings),
    }


def _load_internvl(ckpt_dir: Path, config: dict) -> LoadedModel:
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers import InternVLForConditionalGeneration

    # Refuse pickle and unreadable weight files before transformers looks at the directory.
    check_safetensors_headers(safetensors_files(ckpt_dir))
    tokenizer_file, tokenizer, tokenizer_config = _checkpoint_tokenizer(ckpt_dir)
    preprocessor = _read_json(ckpt_dir / "preprocessor_config.json", required=False)
    if preprocessor is None:
        raise CheckpointError(f"{ckpt_dir}: no preprocessor_config.json (GotOcr2 image processor fields are needed)")
    try:
        hf_model, info = InternVLForConditionalGeneration.from_pretrained(
            str(ckpt_dir), dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError, StrictDataclassError) as err:
        raise CheckpointError(
            f"{ckpt_dir}: cannot load the InternVL checkpoint ({one_line(err)[:300]}); check that config.json and "
            "the weights are complete and consistent"
        ) from None
    _check_loading_info(info, ckpt_dir)
    source = {"model": str(ckpt_dir.resolve()), "preset": None, "seed": None}
    try:
        sections = _internvl_sections(hf_model, tokenizer, tokenizer_config, preprocessor, source)
    except CheckpointError as err:
        raise CheckpointError(f"{ckpt_dir}: {err}") from None
    return LoadedModel(
        model=InternVLWrapper(hf_model),
        family="internvl",
        variant="dynamic",
        tokenizer_file=tokenizer_file,
        tokenizer_config=tokenizer_config,
        manifest_sections=sections,
        preprocessor_config=preprocessor,
    )


def _load_remote_code(ckpt_dir: Path, config: dict) -> LoadedModel:
    """Best effort (see docs/design-sketch): wrap the model's own methods; fail loudly otherwise."""
    from transformers import AutoModel

    check_safetensors_headers(safetensors_files(ckpt_dir))
    tokenizer_file, tokenizer, tokenizer_config = _checkpoint_tokenizer(ckpt_dir)
    try:
        hf_model, info = AutoModel.from_pretrained(
            str(ckpt_dir), trust_remote_code=True, dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    except Exception as err:  # remote code can raise anything; report it as a checkpoint problem
        raise CheckpointError(f"{ckpt_dir}: the remote code failed to load ({type(err).__name__}: {one_line(err)[:300]})") from None
    _check_loading_info(info, ckpt_dir)
    image_token = next((t for t in ("<image>", "<IMG_CONTEXT>") if tokenizer.token_to_id(t) is not None), None)
    if image_token is None:
        raise CheckpointError(f"{ckpt_dir}: the tokenizer has neither '<image>' nor '<IMG_CONTEXT>'")
    image_token_id = int(config.get("image_token_id", tokenizer.token_to_id(image_token)))
    model = RemoteCodeVLM(hf_model, image_token_id)
    vcfg = getattr(hf_model.config, "vision_config", None)
    if vcfg is None:
        raise CheckpointError(f"{ckpt_dir}: remote-code config has no vision_config (cannot size the vision graph)")
    vget = vcfg.get if isinstance(vcfg, dict) else (lambda k, d=None: getattr(vcfg, k, d))
    image_size = _edge(vget("image_size"), 448)
    patch_size = _edge(vget("patch_size"), 14)
    with torch.no_grad():  # measure tokens per tile from the model itself rather than guessing
        probe = model.get_image_features(torch.zeros(1, 3, image_size, image_size))
    tokens_per_tile = int(probe.shape[1])
    side = int(math.isqrt(tokens_per_tile))
    name = " ".join([str(config.get("model_type", "")), *(config.get("architectures") or [])]).lower()
    variant = "dynamic-iss" if "iss" in name or "dynamic" in name else "static"
    ratio = float(config.get("downsample_ratio", 0.5))
    preprocessor = _read_json(ckpt_dir / "preprocessor_config.json", required=False) or _clip_preprocessor_config(
        image_size, CLIP_MEAN, CLIP_STD
    )
    # The remote config's vision fields, shaped like a transformers vision config for the section builder.
    vision_like = SimpleNamespace(
        model_type=vget("model_type", "remote"),
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vget("hidden_size", 0),
        num_hidden_layers=vget("num_hidden_layers", 0),
    )
    cfg_like = FlashVLConfig(
        variant=variant,
        vision_config=vision_like,
        text_config=model.text_config,
        downsample_ratio=ratio,
        vision_feature_layer=int(config.get("vision_feature_layer", config.get("select_layer", -1))),
        image_token=image_token,
        max_tiles=int(config.get("max_dynamic_patch", 4)),
        min_tiles=int(config.get("min_dynamic_patch", 1)),
        use_thumbnail=bool(config.get("use_thumbnail", True)),
    )
    source = {"model": str(ckpt_dir.resolve()), "preset": None, "seed": None}
    sections = flashvl_manifest_sections(cfg_like, tokenizer, tokenizer_config, preprocessor, source)
    sections["vision"].update(tokens_per_tile=tokens_per_tile, tokens_per_side=side)
    sections["image"].update(tokens_per_tile=tokens_per_tile, image_token_id=image_token_id)
    return LoadedModel(model, "flashvl", variant, tokenizer_file, tokenizer_config, sections, preprocessor)


def load_checkpoint(path, trust_remote_code: bool = False) -> LoadedModel:
    """Load a checkpoint directory (canonical Flash-VL, InternVL, or trusted remote code)."""
    ckpt_dir = Path(path).expanduser()
    if not ckpt_dir.exists():
        raise CheckpointError(f"{ckpt_dir}: no such directory (give a checkpoint directory or a preset: {', '.join(PRESETS)})")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a directory (give a checkpoint directory or a preset name)")
    config = _read_json(ckpt_dir / "config.json")
    model_type = config.get("model_type")
    if model_type == "flashvl":
        return _load_flashvl(ckpt_dir, config)
    if model_type == "internvl":
        return _load_internvl(ckpt_dir, config)
    if config.get("auto_map"):
        if not trust_remote_code:
            raise CheckpointError(
                f"{ckpt_dir}: model_type {model_type!r} needs the checkpoint's own Python code (auto_map); "
                "review it, then pass --trust-remote-code to run it"
            )
        return _load_remote_code(ckpt_dir, config)
    raise CheckpointError(
        f"{ckpt_dir}: unsupported model_type {model_type!r} (supported: 'flashvl', 'internvl'; "
        "remote-code checkpoints with --trust-remote-code)"
    )


def load_model(model: str, seed: int = 0, trust_remote_code: bool = False) -> LoadedModel:
    """A preset name or a checkpoint directory -> LoadedModel."""
    if str(model) in PRESETS:
        return build_preset(str(model), seed=seed)
    path = Path(model).expanduser()
    if not path.exists() and "/" not in str(model) and "\\" not in str(model):
        raise CheckpointError(f"unknown preset {model!r} and no such directory; valid presets: {', '.join(PRESETS)}")
    return load_checkpoint(path, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------
# Saving (canonical layout)
# ---------------------------------------------------------------------------------------------
def _flashvl_state_dict(model: FlashVLModel) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.text_config.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)  # tied: same tensor as embed_tokens
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_checkpoint(loaded: LoadedModel, out_dir, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write ``loaded`` (a Flash-VL model) in the canonical layout; shards above ``max_shard_bytes``."""
    from safetensors.torch import save_file

    model = loaded.model
    if not isinstance(model, FlashVLModel):
        raise CheckpointError(f"save_checkpoint writes the canonical Flash-VL layout; got a {type(model).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["image_token_id"] = model.image_token_id
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = _flashvl_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    tok.write_tokenizer_files(out_dir, loaded.tokenizer_file, loaded.tokenizer_config)
    preprocessor = loaded.preprocessor_config or _clip_preprocessor_config(
        int(model.config.vision_config.image_size),
        loaded.manifest_sections["preprocess"]["image_mean"],
        loaded.manifest_sections["preprocess"]["image_std"],
    )
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FlashVLConfig",
    "FlashVLModel",
    "InternVLWrapper",
    "KEY_ALIASES",
    "LoadedModel",
    "PRESETS",
    "RemoteCodeVLM",
    "build_preset",
    "load_checkpoint",
    "load_model",
    "pixel_shuffle",
    "preset_config",
    "save_checkpoint",
]
