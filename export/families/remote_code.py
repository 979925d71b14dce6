"""Checkpoints that ship their own Python code (config.json ``auto_map``), only with
``trust_remote_code=True``: best effort, wrapping the model's own methods, failing loudly otherwise.

The image features are whatever the model's own method returns; for InternVL-chat code that is
``extract_feature``, whose ``select_layer`` follows the same rule as ``vision_feature_layer``
(-1 = the tower's last_hidden_state, else hidden_states[k]); the manifest records that number.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from flashvl_edge.runtime.errors import CheckpointError, one_line

from . import checkpoint as ck
from .common import CLIP_MEAN, CLIP_STD, LoadedModel, ReferenceGenerateMixin, checkpoint_source, clip_preprocessor_config, edge
from .flashvl import FlashVLConfig, flashvl_manifest_sections
from .registry import register

# Conventional names in remote-code VLMs (InternVL-chat: extract_feature + language_model;
# LLaVA-likes: get_image_features / encode_images). Guesses: the published Flash-VL code is unseen.
REMOTE_IMAGE_FEATURE_METHODS = ("extract_feature", "get_image_features", "encode_images")
REMOTE_LANGUAGE_MODEL_ATTRS = ("language_model", "llm", "model.language_model")


class RemoteCodeVLM(ReferenceGenerateMixin, nn.Module):
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


@register("remote_code", remote_code=True)
def load_remote_code(ckpt_dir: Path, config: dict) -> LoadedModel:
    """Reached only after load_checkpoint checked trust_remote_code (see the registry)."""
    from transformers import AutoModel

    ck.check_safetensors_headers(ck.safetensors_files(ckpt_dir))
    tokenizer_file, tokenizer, tokenizer_config = ck.read_tokenizer(ckpt_dir)
    try:
        hf_model, info = AutoModel.from_pretrained(
            str(ckpt_dir), trust_remote_code=True, dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    except Exception as err:  # remote code can raise anything; report it as a checkpoint problem
        raise CheckpointError(f"{ckpt_dir}: the remote code failed to load ({type(err).__name__}: {one_line(err)[:300]})") from None
    ck.check_loading_info(info, ckpt_dir)
    image_token = next((t for t in ("<image>", "<IMG_CONTEXT>") if tokenizer.token_to_id(t) is not None), None)
    if image_token is None:
        raise CheckpointError(f"{ckpt_dir}: the tokenizer has neither '<image>' nor '<IMG_CONTEXT>'")
    image_token_id = int(config.get("image_token_id", tokenizer.token_to_id(image_token)))
    model = RemoteCodeVLM(hf_model, image_token_id)
    vcfg = getattr(hf_model.config, "vision_config", None)
    if vcfg is None:
        raise CheckpointError(f"{ckpt_dir}: remote-code config has no vision_config (cannot size the vision graph)")
    vget = vcfg.get if isinstance(vcfg, dict) else (lambda k, d=None: getattr(vcfg, k, d))
    image_size = edge(vget("image_size"), 448)
    patch_size = edge(vget("patch_size"), 14)
    with torch.no_grad():  # measure tokens per tile from the model itself rather than guessing
        probe = model.get_image_features(torch.zeros(1, 3, image_size, image_size))
    tokens_per_tile = int(probe.shape[1])
    side = int(math.isqrt(tokens_per_tile))
    name = " ".join([str(config.get("model_type", "")), *(config.get("architectures") or [])]).lower()
    variant = "dynamic-iss" if "iss" in name or "dynamic" in name else "static"
    ratio = float(config.get("downsample_ratio", 0.5))
    preprocessor = ck.read_json(ckpt_dir / "preprocessor_config.json", required=False) or clip_preprocessor_config(
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
    sections = flashvl_manifest_sections(cfg_like, tokenizer, tokenizer_config, preprocessor, checkpoint_source(ckpt_dir))
    sections["vision"].update(tokens_per_tile=tokens_per_tile, tokens_per_side=side)
    sections["image"].update(tokens_per_tile=tokens_per_tile, image_token_id=image_token_id)
    return LoadedModel(model, "flashvl", variant, tokenizer_file, tokenizer_config, sections, preprocessor)
