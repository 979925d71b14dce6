"""InternVL 2.5/3 as transformers saves it (``model_type: "internvl"``), through
``InternVLForConditionalGeneration``'s own methods, so its vision_feature_layer rule (-1 =
last_hidden_state, else hidden_states[k]) and its CLS-token drop are transformers' own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flashvl_edge.export import tokenizer as tok
from flashvl_edge.runtime.errors import CheckpointError, one_line

from . import checkpoint as ck
from .common import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_IMAGE_PIXELS,
    LoadedModel,
    ReferenceGenerateMixin,
    checkpoint_source,
    edge,
    generation_section,
    llm_section,
    resample_name,
)
from .registry import register

IMAGE_TOKEN = "<IMG_CONTEXT>"
IMAGE_START, IMAGE_END = "<img>", "</img>"


class InternVLWrapper(ReferenceGenerateMixin, nn.Module):
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


def internvl_manifest_sections(hf_model, tokenizer, tokenizer_config: dict, preprocessor: dict, source: dict) -> dict:
    """The manifest sections (docs/architecture.md) for a transformers InternVL model."""
    cfg = hf_model.config
    vcfg = cfg.vision_config
    image_size = edge(vcfg.image_size, 448)
    patch_size = edge(vcfg.patch_size, 14)
    side = int(round((image_size // patch_size) * cfg.downsample_ratio))
    image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_token_id != int(cfg.image_token_id):
        raise CheckpointError(
            f"config image_token_id {cfg.image_token_id} is not the tokenizer's {IMAGE_TOKEN!r} ({image_token_id})"
        )
    for special in (IMAGE_START, IMAGE_END):
        if tokenizer.token_to_id(special) is None:
            raise CheckpointError(f"the tokenizer has no {special!r} token (InternVL wraps image tokens in <img>...</img>)")
    size = preprocessor.get("size") or {}
    tile = int(size.get("height", image_size)) if isinstance(size, dict) else edge(size, image_size)
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
        "llm": llm_section(cfg.text_config),
        "image": {
            "placeholder": "<image>",
            "image_token": IMAGE_TOKEN,
            "image_token_id": image_token_id,
            "start_token": IMAGE_START,
            "end_token": IMAGE_END,
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
            "resample": resample_name(preprocessor.get("resample", 3)),
            "max_tiles": int(preprocessor.get("max_patches", 12)) if crop_to_patches else 1,
            "min_tiles": int(preprocessor.get("min_patches", 1)) if crop_to_patches else 1,
            # GotOcr2's crop_to_patches appends a whole-image thumbnail when it makes > 1 patch.
            "use_thumbnail": crop_to_patches,
            "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
        },
        "iss": {"enabled": False, "overlap_tokens": 0, "pixels_per_token": int(round(patch_size / cfg.downsample_ratio))},
        "chat_template": tokenizer_config.get("chat_template") or tok.CHATML_TEMPLATE,
        "generation": generation_section(tokenizer, cfg.text_config.max_position_embeddings),
    }


@register("internvl", model_types=("internvl",))
def load_internvl(ckpt_dir: Path, config: dict) -> LoadedModel:
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers import InternVLForConditionalGeneration

    # Refuse pickle and unreadable weight files before transformers looks at the directory.
    ck.check_safetensors_headers(ck.safetensors_files(ckpt_dir))
    tokenizer_file, tokenizer, tokenizer_config = ck.read_tokenizer(ckpt_dir)
    preprocessor = ck.read_json(ckpt_dir / "preprocessor_config.json", required=False)
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
    ck.check_loading_info(info, ckpt_dir)
    try:
        sections = internvl_manifest_sections(hf_model, tokenizer, tokenizer_config, preprocessor,
                                              checkpoint_source(ckpt_dir))
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
