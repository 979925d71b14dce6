"""Model families: everything the exporter needs about a model, as a :class:`LoadedModel`.

A LoadedModel carries the torch module (float32, eval), the tokenizer files, and the manifest
sections the family knows (docs/architecture.md). Sources: presets (``presets.py``, random init from
a seed) and checkpoint directories, loaded by the family registered for config.json's
``model_type``; a config.json with ``auto_map`` goes to the remote-code family, only with
``trust_remote_code=True``.

Modules: ``registry`` (``register``, ``FAMILIES``, dispatch), ``common`` (LoadedModel,
pixel_shuffle, reference generate, shared section helpers), ``checkpoint`` (safetensors, JSON and
tokenizer reading), ``presets`` (preset data); every other module here is one family and is imported
below, which registers it.

Adding a family is one new module here plus its test:

    # export/families/llava.py
    from .registry import register

    @register("llava", model_types=("llava",))
    def load_llava(ckpt_dir, config):   # -> LoadedModel: module, tokenizer, manifest sections
        ...

Build its manifest sections as plain dicts with the helpers in ``common`` (``llm_section``,
``generation_section``, ...), the way ``internvl.py`` does.
"""

from __future__ import annotations

import importlib
import pkgutil

from .common import LoadedModel, pixel_shuffle
from .presets import PRESETS, preset_reference
from .registry import FAMILIES, Family, build_preset, family_for, load_checkpoint, load_model, register

_SUPPORT_MODULES = {"checkpoint", "common", "presets", "registry"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "FAMILIES",
    "Family",
    "LoadedModel",
    "PRESETS",
    "build_preset",
    "family_for",
    "load_checkpoint",
    "load_model",
    "pixel_shuffle",
    "preset_reference",
    "register",
]
