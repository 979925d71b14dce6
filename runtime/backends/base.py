"""The runner interface every backend implements (ONNX Runtime here, TensorRT in ``trt.py``).

The shape follows Polygraphy's runners (``polygraphy/backend/<name>/runner.py``): a runner is
*activated* once (sessions / engines / contexts created), answers ``get_input_metadata()``, and
``infer(feed) -> outputs`` maps input names to arrays and returns output names to arrays. That is all
the vision graph needs.

The LLM needs one thing more: a decode step that keeps the KV cache where the backend can keep it
(ONNX Runtime ``OrtValue``\\ s, device buffers for CUDA / TensorRT) instead of copying every layer's
``present`` through numpy and back as the next ``past`` on every token. :class:`DecoderRunner` adds
:meth:`~DecoderRunner.new_cache` and :meth:`~DecoderRunner.forward` for that; the cache object is
opaque to the caller apart from its ``length`` (tokens already in it).

A backend module (``runtime/backends/<name>.py``) exposes two functions, used by
:func:`flashvl_edge.runtime.backends.open_runners`::

    open_vision(bundle, **options) -> Runner          # pixel_values -> image_embeds
    open_llm(bundle, **options) -> DecoderRunner      # inputs_embeds + KV cache -> last logits
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import BackendError


@dataclass(frozen=True)
class TensorMeta:
    """Name, numpy dtype and shape of a graph input/output (dims are ints or symbolic strings)."""

    name: str
    dtype: np.dtype
    shape: tuple


class Runner(abc.ABC):
    """One graph on one backend. Use as a context manager or call activate()/deactivate()."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False

    # -- lifecycle ----------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abc.abstractmethod
    def activate_impl(self) -> None:
        """Create the session / engine context (the expensive part, done once)."""

    @abc.abstractmethod
    def deactivate_impl(self) -> None:
        """Release what activate_impl created."""

    # -- metadata and inference ---------------------------------------------------------------
    @abc.abstractmethod
    def get_input_metadata(self) -> dict[str, TensorMeta]:
        ...

    @abc.abstractmethod
    def get_output_metadata(self) -> dict[str, TensorMeta]:
        ...

    @abc.abstractmethod
    def infer_impl(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        ...

    def infer(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the graph once: ``feed`` maps every input name to an array; returns numpy outputs."""
        if not self.is_active:
            raise BackendError(f"runner {self.name!r} is not active; call activate() first")
        return self.infer_impl(feed)


class KVCache(abc.ABC):
    """The decoder's KV cache on a backend. ``length`` = tokens already processed (past length)."""

    length: int = 0


class DecoderRunner(Runner):
    """The LLM graph: ``forward`` runs new tokens' embeddings against the cache and extends it.

    ``inputs_embeds`` is [1, seq, hidden]; attention mask (all ones: one unpadded sequence) and
    position ids (``cache.length ... cache.length + seq - 1``) are derived from the cache, so callers
    only say *what* the new tokens are. Returns the logits of the last position as a 1-D float32
    array [vocab].
    """

    @abc.abstractmethod
    def new_cache(self) -> KVCache:
        """An empty cache (past length 0)."""

    @abc.abstractmethod
    def forward(self, inputs_embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        """Prefill (seq > 1) or decode (seq == 1): returns last-position logits, cache extended in place."""

    @property
    @abc.abstractmethod
    def embeds_dtype(self) -> np.dtype:
        """The float dtype the graph wants for ``inputs_embeds`` (float32 or float16)."""
