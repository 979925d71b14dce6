"""Flash-VL, the canonical layout: vision tower (SigLIP | AIMv2) -> pixel shuffle -> mlp1 -> Qwen2.

Variants: ``static`` (one tile) and ``dynamic-iss`` (tiles + ISS stitching). config.json has
``model_type: "flashvl"``; weights are safetensors with the keys of :class:`FlashVLModel`
(``vision_model.*``, ``mlp1.{0,1,3}.*``, ``language_model.*``).

Which vision features feed the adapter follows transformers' ``InternVLModel.get_image_features``
(and InternVL's remote ``extract_feature``, whose ``select_layer`` is the same number):
``vision_feature_layer == -1`` (the default) is the tower's ``last_hidden_state``: all encoder
layers, then the tower's final norm (SigLIP ``post_layernorm``, AIMv2 ``rms_norm``). Any other k
is ``hidden_states[k]`` of the tower (index 0 = patch embeddings, i = output of encoder layer i), with
no final norm; negative k counts from the end of that tuple of num_layers + 1 entries, as Python
indexing does, so the last layer's output without the norm is k = num_hidden_layers. Only the layers
needed are run, so an exported vision graph carries no dead layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    clip_preprocessor_config,
    edge,
    generation_section,
    llm_section,
    pixel_shuffle,
    resample_name,
    scale_llm_weights,
    shortest_edge,
    source_section,
)
from .presets import preset, preset_reference
from .registry import register


@dataclass(frozen=True)
class VisionTower:
    class_name: str  # the transformers class
    final_norm: str | None  # its norm after the last encoder layer (part of last_hidden_state)


VISION_TOWERS = {
    # Siglip2VisionModel is NaFlex (variable patch count, different embeddings) and is deliberately
    # not accepted; the fixed-resolution SigLIP2 checkpoints are SiglipVisionModel.
    "siglip_vision_model": VisionTower("SiglipVisionModel", "post_layernorm"),
    "aimv2_vision_model": VisionTower("Aimv2VisionModel", "rms_norm"),
}
VISION_MODEL_TYPES = {name: tower.class_name for name, tower in VISION_TOWERS.items()}


@dataclass
class FlashVLConfig:
    """What config.json of the canonical layout holds (transformers sub-configs as objects)."""

    variant: str  # "static" | "dynamic-iss"
    vision_config: Any  # SiglipVisionConfig | Aimv2VisionConfig
    text_config: Any  # Qwen2Config
    downsample_ratio: float = 0.5
    vision_feature_layer: int = -1  # -1: last_hidden_state (with the final norm); k: hidden_states[k]
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
        if vtype not in VISION_TOWERS:
            raise CheckpointError(
                f"{where}: vision_config.model_type {vtype!r} is not supported "
                f"(supported: {', '.join(VISION_TOWERS)})"
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
            image_token=str(data.get("image_token", "<image>")),
            max_tiles=int(data.get("max_tiles", 4)),
            min_tiles=int(data.get("min_tiles", 1)),
            use_thumbnail=bool(data.get("use_thumbnail", True)),
            iss_overlap_tokens=int(data.get("iss_overlap_tokens", 2)),
        )
        cfg.validate(where)
        if "vision_use_post_norm" in data:
            raise _post_norm_flag_error(cfg, bool(data["vision_use_post_norm"]), where)
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


def _post_norm_flag_error(cfg: FlashVLConfig, post_norm: bool, where: str) -> CheckpointError:
    """A config written for the rule where vision_feature_layer always skipped the final norm and
    ``vision_use_post_norm`` added it: name the features it meant in the one-number rule."""
    n_layers = int(cfg.vision_config.num_hidden_layers)
    layer = cfg.vision_feature_layer
    if layer % (n_layers + 1) == n_layers:  # the last layer's output
        same = -1 if post_norm else n_layers
        meant = "the last layer's output " + ("after the tower's final norm" if post_norm else "without the final norm")
    else:
        same, meant = layer, f"hidden_states[{layer}]"
    return CheckpointError(
        f"{where}: 'vision_use_post_norm' is not supported: vision_feature_layer alone picks the vision features "
        "(-1 = the tower's last_hidden_state, after its final norm, as in transformers' InternVL; k = hidden_states[k], "
        f"no norm; the last layer without the norm is {n_layers}). This config means {meant}: delete "
        f"'vision_use_post_norm' and set \"vision_feature_layer\": {same}"
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


class FlashVLModel(ReferenceGenerateMixin, nn.Module):
    """Vision tower (SigLIP | AIMv2) -> pixel shuffle -> mlp1 -> Qwen2ForCausalLM."""

    def __init__(self, config: FlashVLConfig, image_token_id: int):
        super().__init__()
        import transformers

        config.validate()
        self.config = config
        self.image_token_id = int(image_token_id)
        vision_cls = getattr(transformers, VISION_TOWERS[config.vision_config.model_type].class_name)
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
        """The tower's features for the adapter, [N, patches, C_vit]: ``last_hidden_state`` for
        vision_feature_layer -1, else ``hidden_states[vision_feature_layer]`` (module docstring)."""
        tower = self.vision_model
        layers = tower.encoder.layers
        layer = self.config.vision_feature_layer
        n_run = len(layers) if layer == -1 else layer % (len(layers) + 1)  # hidden_states[k] = after k layers
        hidden = tower.embeddings(pixel_values)
        for block in layers[:n_run]:
            hidden = block(hidden, None)
        final_norm = VISION_TOWERS[self.config.vision_config.model_type].final_norm
        if layer == -1 and final_norm is not None:
            hidden = getattr(tower, final_norm)(hidden)
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


# --- manifest sections ------------------------------------------------------------------------------
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
        "llm": llm_section(cfg.text_config),
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
            "resize_shortest_edge": shortest_edge(preprocessor.get("size"), image_size),
            "crop_size": edge(preprocessor.get("crop_size"), image_size),
            # Tiles are resized to image_size x image_size as a whole; only "clip" center-crops.
            "do_center_crop": bool(preprocessor.get("do_center_crop", True)) and not tiles,
            "rescale_factor": float(preprocessor.get("rescale_factor", 1 / 255)),
            "image_mean": [float(v) for v in preprocessor.get("image_mean", CLIP_MEAN)],
            "image_std": [float(v) for v in preprocessor.get("image_std", CLIP_STD)],
            "resample": resample_name(preprocessor.get("resample", 3)),
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
        "generation": generation_section(tokenizer, cfg.text_config.max_position_embeddings),
    }


# --- presets -----------------------------------------------------------------------------------------
def preset_config(name: str) -> FlashVLConfig:
    """The FlashVLConfig of a preset (no weights built); vocab resolved against the generated tokenizer."""
    import transformers

    spec = preset(name)
    tokenizer = tok.load_tokenizer_json(tok.preset_tokenizer_json("flashvl"))
    tdict = spec["text_config"]
    if tdict["vocab_size"] == "tokenizer":
        tdict["vocab_size"] = tokenizer.get_vocab_size()
    tdict["eos_token_id"] = tokenizer.token_to_id(tok.IM_END)
    tdict["pad_token_id"] = tokenizer.token_to_id(tok.ENDOFTEXT)
    vdict = spec["vision_config"]
    return FlashVLConfig(
        variant=spec["variant"],
        vision_config=transformers.CONFIG_MAPPING[vdict["model_type"]](**{k: v for k, v in vdict.items() if k != "model_type"}),
        text_config=transformers.Qwen2Config(**{k: v for k, v in tdict.items() if k != "model_type"}),
    )


def build_preset(name: str, seed: int = 0) -> LoadedModel:
    """A random-init model from ``PRESETS[name]`` (deterministic for a seed) with a generated tokenizer.

    Full-size presets are built once, on CPU in float32 (~2.1B params, ~8.5 GB); the LLM scaling
    for tiny presets is in place, so there is never a second copy of the weights.
    """
    cfg = preset_config(name)
    spec = preset(name)
    tokenizer_json = tok.preset_tokenizer_json("flashvl")
    tokenizer = tok.load_tokenizer_json(tokenizer_json)
    torch.manual_seed(seed)
    model = FlashVLModel(cfg, image_token_id=tokenizer.token_to_id(cfg.image_token))
    scale_llm_weights(model.language_model, float(spec.get("llm_init_scale", 1.0)))
    model.eval()
    tokenizer_config = tok.make_tokenizer_config("flashvl", model_max_length=cfg.text_config.max_position_embeddings)
    preprocessor = clip_preprocessor_config(int(cfg.vision_config.image_size), spec["image_mean"], spec["image_std"])
    source = source_section(name, preset=name, seed=int(seed), reference=preset_reference(name))
    return LoadedModel(
        model=model,
        family="flashvl",
        variant=cfg.variant,
        tokenizer_file=tok.materialize_tokenizer_file(tokenizer_json),
        tokenizer_config=tokenizer_config,
        manifest_sections=flashvl_manifest_sections(cfg, tokenizer, tokenizer_config, preprocessor, source),
        preprocessor_config=preprocessor,
    )


# --- loading and saving the canonical layout ---------------------------------------------------------
@register("flashvl", model_types=("flashvl",), build_preset=build_preset)
def load_flashvl(ckpt_dir: Path, config: dict) -> LoadedModel:
    cfg = FlashVLConfig.from_dict(config, where=str(ckpt_dir / "config.json"))
    tokenizer_file, tokenizer, tokenizer_config = ck.read_tokenizer(ckpt_dir)
    image_token_id = ck.require_token(tokenizer, cfg.image_token, ckpt_dir)
    if "image_token_id" in config and int(config["image_token_id"]) != image_token_id:
        raise CheckpointError(
            f"{ckpt_dir}: config image_token_id {config['image_token_id']} != tokenizer id {image_token_id} of {cfg.image_token!r}"
        )
    if image_token_id >= int(cfg.text_config.vocab_size):
        raise CheckpointError(f"{ckpt_dir}: image token id {image_token_id} is outside the LLM vocab ({cfg.text_config.vocab_size})")
    files = ck.safetensors_files(ckpt_dir)
    try:
        model = ck.new_empty(lambda: FlashVLModel(cfg, image_token_id))
    except (RuntimeError, MemoryError) as err:  # torch's allocator raises RuntimeError, not MemoryError
        if isinstance(err, RuntimeError) and "alloc" not in str(err).lower():
            raise
        raise CheckpointError(f"{ckpt_dir}: there is not enough memory for the model config.json describes "
                              f"({one_line(err)[:160]}); check the sizes in config.json") from None
    optional = {"language_model.lm_head.weight"} if cfg.text_config.tie_word_embeddings else set()
    ck.load_safetensors_into(model, files, optional=optional, where=str(ckpt_dir))
    if cfg.text_config.tie_word_embeddings:
        model.language_model.tie_weights()
    model.eval()
    preprocessor = ck.read_json(ckpt_dir / "preprocessor_config.json", required=False)
    if preprocessor is None:
        raise CheckpointError(f"{ckpt_dir}: no preprocessor_config.json (CLIPImageProcessor fields are needed)")
    return LoadedModel(
        model=model,
        family="flashvl",
        variant=cfg.variant,
        tokenizer_file=tokenizer_file,
        tokenizer_config=tokenizer_config,
        manifest_sections=flashvl_manifest_sections(cfg, tokenizer, tokenizer_config, preprocessor,
                                                    checkpoint_source(ckpt_dir)),
        preprocessor_config=preprocessor,
    )


def _state_dict(model: FlashVLModel) -> dict[str, torch.Tensor]:
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
    state = _state_dict(model)
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
    preprocessor = loaded.preprocessor_config or clip_preprocessor_config(
        int(model.config.vision_config.image_size),
        loaded.manifest_sections["preprocess"]["image_mean"],
        loaded.manifest_sections["preprocess"]["image_std"],
    )
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
