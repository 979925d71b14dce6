"""The family registry: which module loads a checkpoint directory, chosen from its config.json.

A family registers its loader with :func:`register`; :func:`load_checkpoint` picks the family whose
``model_types`` contain config.json's ``model_type``, else (config.json has ``auto_map``) the
remote-code family, which runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flashvl_edge.runtime.errors import CheckpointError

from .checkpoint import read_json
from .common import LoadedModel
from .presets import PRESETS, preset

Loader = Callable[[Path, dict], LoadedModel]  # (checkpoint directory, its config.json) -> LoadedModel


@dataclass(frozen=True)
class Family:
    name: str
    load: Loader
    model_types: tuple[str, ...] = ()  # config.json model_type values this family loads
    remote_code: bool = False  # loads any config.json with auto_map; runs the checkpoint's own code
    build_preset: Callable[[str, int], LoadedModel] | None = None  # (preset name, seed) -> LoadedModel


FAMILIES: dict[str, Family] = {}


def register(name: str, *, model_types: tuple[str, ...] = (), remote_code: bool = False,
             build_preset: Callable[[str, int], LoadedModel] | None = None) -> Callable[[Loader], Loader]:
    """Decorator for a family's loader: ``@register("internvl", model_types=("internvl",))``."""
    def decorate(load: Loader) -> Loader:
        if name in FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice")
        taken = {t for f in FAMILIES.values() for t in f.model_types} & set(model_types)
        if taken:
            raise ValueError(f"model_type {sorted(taken)} already belongs to another family")
        FAMILIES[name] = Family(name, load, tuple(model_types), remote_code, build_preset)
        return load

    return decorate


def family_for(config: dict, where: Path) -> Family:
    """The family that loads a checkpoint with this config.json."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if config.get("auto_map"):
        for family in FAMILIES.values():
            if family.remote_code:
                return family
    supported = ", ".join(repr(t) for f in FAMILIES.values() for t in f.model_types)
    raise CheckpointError(
        f"{where}: unsupported model_type {model_type!r} (supported: {supported}; "
        "remote-code checkpoints with --trust-remote-code)"
    )


def load_checkpoint(path, trust_remote_code: bool = False) -> LoadedModel:
    """Load a checkpoint directory through the family its config.json names."""
    ckpt_dir = Path(path).expanduser()
    if not ckpt_dir.exists():
        raise CheckpointError(f"{ckpt_dir}: no such directory (give a checkpoint directory or a preset: {', '.join(PRESETS)})")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a directory (give a checkpoint directory or a preset name)")
    config = read_json(ckpt_dir / "config.json")
    family = family_for(config, ckpt_dir)
    if family.remote_code and not trust_remote_code:
        raise CheckpointError(
            f"{ckpt_dir}: model_type {config.get('model_type')!r} needs the checkpoint's own Python code (auto_map); "
            "review it, then pass --trust-remote-code to run it"
        )
    return family.load(ckpt_dir, config)


def build_preset(name: str, seed: int = 0) -> LoadedModel:
    """A random-init model from ``PRESETS[name]``, built by the family the preset names."""
    builder = FAMILIES[preset(name)["family"]].build_preset
    if builder is None:
        raise CheckpointError(f"preset {name!r}: its family builds no presets")
    return builder(name, seed)


def load_model(model: str, seed: int = 0, trust_remote_code: bool = False) -> LoadedModel:
    """A preset name or a checkpoint directory -> LoadedModel."""
    if str(model) in PRESETS:
        return build_preset(str(model), seed=seed)
    path = Path(model).expanduser()
    if not path.exists() and "/" not in str(model) and "\\" not in str(model):
        raise CheckpointError(f"unknown preset {model!r} and no such directory; valid presets: {', '.join(PRESETS)}")
    return load_checkpoint(path, trust_remote_code=trust_remote_code)
