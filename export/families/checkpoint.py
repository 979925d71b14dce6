"""Reading checkpoint directories: JSON files, the tokenizer, safetensors weights with strict key checks.

Weights are read from safetensors only; pickle (``.bin``/``.pt``) is refused, never unpickled.
Every problem is one single-line :class:`CheckpointError` that says what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flashvl_edge.export import tokenizer as tok
from flashvl_edge.runtime.errors import CheckpointError, one_line

from .presets import PRESETS

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


def list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return shown + (f" (+{more} more)" if more > 0 else "")


# --- JSON and tokenizer -------------------------------------------------------------------------------
def read_json(path: Path, required: bool = True) -> dict | None:
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


def read_tokenizer(ckpt_dir: Path):
    """(tokenizer.json path, tokenizers.Tokenizer, tokenizer_config with a chat_template)."""
    path = ckpt_dir / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no tokenizer.json (a tokenizers file is required to build a bundle)")
    try:
        tokenizer = tok.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{path}: not a readable tokenizers file ({one_line(err)})") from None
    config = read_json(ckpt_dir / "tokenizer_config.json", required=False) or {}
    if not config.get("chat_template"):
        # Newer transformers save the template as chat_template.jinja / chat_template.json.
        jinja = ckpt_dir / "chat_template.jinja"
        cjson = ckpt_dir / "chat_template.json"
        if jinja.exists():
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        elif cjson.exists():
            config["chat_template"] = (read_json(cjson) or {}).get("chat_template")
    if not config.get("chat_template"):
        config["chat_template"] = tok.CHATML_TEMPLATE
    return path, tokenizer, config


def require_token(tokenizer, token: str, ckpt_dir: Path) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise CheckpointError(f"{ckpt_dir}: the tokenizer has no {token!r} token")
    return tid


# --- safetensors ----------------------------------------------------------------------------------------
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
            raise CheckpointError(f"{ckpt_dir}: shards listed in the index are missing: {list_keys(missing)}")
        return [ckpt_dir / n for n in names]
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in ckpt_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{ckpt_dir}: only pickle weights found ({list_keys(pickled)}); .bin/.pt are not supported "
            "(loading them can run arbitrary code): convert to safetensors"
        )
    raise CheckpointError(f"{ckpt_dir}: no *.safetensors weight files found")


def _unreadable(path: Path, err) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable safetensors file ({one_line(err)}); the file is damaged or incomplete: "
        "copy or download it again"
    )


def check_safetensors_headers(files: list[Path]) -> None:
    """Open every weight file's header (cheap: no tensor data) so a truncated or empty file is one
    CheckpointError naming it, before transformers' loader meets it and raises SafetensorError."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as sf:
                sf.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise _unreadable(path, err) from None


def canonical_key(key: str, expected: dict) -> str | None:
    """``key`` as a key of ``expected``, directly or through the first matching KEY_ALIASES entry."""
    if key in expected:
        return key
    for old, new in KEY_ALIASES:
        if key.startswith(old):
            candidate = new + key[len(old):]
            if candidate in expected:
                return candidate
    return None


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
                    canonical = canonical_key(key, expected)
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
            raise _unreadable(path, err) from None
    missing = sorted(k for k in expected if k not in found and k not in optional and k not in reported)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {list_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shape: {list_keys(wrong_shape)}")
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} not floating point: {list_keys(wrong_dtype)}")
    if duplicated:
        problems.append(f"{len(duplicated)} duplicated (after aliasing): {list_keys(duplicated)}")
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


def check_loading_info(info: dict, where: Path) -> None:
    """transformers' ``output_loading_info`` as one CheckpointError when any key did not match."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else str(k[0]) for k in (info.get(kind) or [])]
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_keys', '')}: {list_keys(sorted(keys))}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(problems) + f"; {HF_WEIGHTS_HINT}")


def new_empty(factory):
    """Build a module without running random init (every parameter is loaded afterwards)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return factory()
