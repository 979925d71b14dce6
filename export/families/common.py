"""What every model family shares: the loaded-model record, the VLM interface's reference generate,
InternVL's pixel shuffle, and the helpers the families' manifest sections are built from.

Manifest sections are plain dicts (docs/architecture.md); the helpers here build the parts that
do not depend on the family (``llm``, ``generation``) and read CLIP-style preprocessor fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flashvl_edge.export import tokenizer as tok

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class LoadedModel:
    model: nn.Module  # FlashVLModel | InternVLWrapper | RemoteCodeVLM; eval(), float32
    family: str  # the manifest's family: "flashvl" | "internvl"
    variant: str  # "static" | "dynamic-iss" | "dynamic"
    tokenizer_file: Path
    tokenizer_config: dict
    manifest_sections: dict = field(default_factory=dict)
    # Extra checkpoint files save_checkpoint writes back (preprocessor_config.json content).
    preprocessor_config: dict | None = None


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


class ReferenceGenerateMixin:
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


def scale_llm_weights(language_model: nn.Module, scale: float) -> None:
    """Multiply the LLM's matrices (embeddings, projections; not norms/biases) by ``scale`` in place."""
    if scale == 1.0:
        return
    with torch.no_grad():
        for param in language_model.parameters():  # parameters() yields a tied tensor once
            if param.dim() >= 2:
                param.mul_(scale)


# --- preprocessor_config.json fields ----------------------------------------------------------------
def clip_preprocessor_config(image_size: int, mean, std) -> dict:
    """A CLIPImageProcessor preprocessor_config.json for ``image_size`` square inputs."""
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


def edge(value, default: int) -> int:
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


def shortest_edge(size, default: int) -> int | None:
    """CLIP's ``size`` as a shortest edge, or None for an exact {"height","width"} resize."""
    if isinstance(size, dict) and "shortest_edge" not in size and ("height" in size or "width" in size):
        return None
    return edge(size, default)


def resample_name(value) -> str:
    if isinstance(value, str):
        return value.lower()
    return PIL_RESAMPLE_NAMES.get(int(value if value is not None else 3), "bicubic")


# --- manifest sections every family writes the same way -----------------------------------------------
def generation_section(tokenizer, max_context: int) -> dict:
    stop_tokens = [t for t in (tok.IM_END, tok.ENDOFTEXT) if tokenizer.token_to_id(t) is not None]
    return {
        "eos_token_ids": [tokenizer.token_to_id(t) for t in stop_tokens],
        "stop_tokens": stop_tokens,
        "max_context": int(max_context),
    }


def llm_section(text_config) -> dict:
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


def source_section(model: str, preset: str | None = None, seed: int | None = None,
                   reference: dict[str, str] | None = None) -> dict:
    return {"model": model, "preset": preset, "seed": seed, "reference": dict(reference or {})}


def checkpoint_source(ckpt_dir: Path) -> dict:
    return source_section(str(Path(ckpt_dir).resolve()))
