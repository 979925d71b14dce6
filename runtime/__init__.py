"""The flashvl-edge runtime: run a bundle with numpy, pillow, tokenizers and onnxruntime (no torch).

    from flashvl_edge.runtime import Pipeline
    pipe = Pipeline.from_bundle("bundles/fvl")
    print(pipe.chat("Describe the image.", image="photo.jpg").text)

Importing this package is cheap: the pipeline (and with it onnxruntime) loads on first use of a name.
"""

from __future__ import annotations

from .errors import (BackendError, BundleError, FlashVLError, ImageError, IntegrityError,  # noqa: F401
                     PromptError)

_LAZY = {
    "Pipeline": "pipeline",
    "ChatSession": "pipeline",
    "ChatResult": "pipeline",
    "ChatStream": "pipeline",
    "SamplingParams": "generate",
    "Bundle": "bundle",
}

__all__ = sorted(_LAZY) + ["FlashVLError", "BundleError", "IntegrityError", "ImageError", "PromptError",
                           "BackendError"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
