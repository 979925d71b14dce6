"""Backends behind one runner interface (see ``base.py``). Each is imported only when chosen.

``ort``: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu). ``trt``: TensorRT engines built by
``flashvl build`` (``trt.py``, needs tensorrt on an NVIDIA GPU).
"""

from __future__ import annotations

import importlib

from ..errors import BackendError

BACKENDS = ("ort", "trt")


def load_backend(name: str):
    """The backend module (with ``open_vision`` and ``open_llm``), imported on demand."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(f"{__name__}.{name}"):
            raise BackendError(f"the {name!r} backend is not part of this installation") from None
        raise BackendError(f"the {name!r} backend needs {e.name!r}, which is not installed "
                           f"(see 'flashvl doctor')") from None


def open_runners(bundle, backend: str = "ort", **options):
    """(vision runner, LLM decoder runner) for a loaded bundle, both activated."""
    module = load_backend(backend)
    return module.open_vision(bundle, **options), module.open_llm(bundle, **options)
