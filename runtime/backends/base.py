"""The runner interface every backend implements (ONNX Runtime here, TensorRT in ``trt.py``).

The shape follows Polygraphy's runners (``polygraphy/backend/<name>/runner.py``): a runner is
*activated* once (sessions / engines / contexts created), answers ``get_input_metadata()``, and
``infer(feed) -> outputs`` maps input names to arrays and returns output names to arrays. That is all
the vision graph needs.

Runners time themselves, as Polygraphy's do: each backend call (the ONNX Runtime session run, the
TensorRT execution up to its stream synchronize) is recorded by the runner that makes it, and
:meth:`~Runner.last_inference_time` gives the last one. Work around that call (binding, building
feeds, copying logits into numpy) is not in it, so a caller's wall time minus it is the host overhead.
(An ``infer_impl`` that does not time its own backend call is timed whole by ``infer``.)
For benchmarks, :meth:`~Runner.start_timeline` keeps every call's (start, end, size) until
:meth:`~Runner.stop_timeline`.

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
from time import perf_counter
from typing import Any, Mapping, NamedTuple

import numpy as np

from ..contract import EngineLimits
from ..errors import BackendError


@dataclass(frozen=True)
class TensorMeta:
    """Name, numpy dtype and shape of a graph input/output (dims are ints or symbolic strings)."""

    name: str
    dtype: np.dtype
    shape: tuple


class Call(NamedTuple):
    """One backend call: ``perf_counter`` start and end, and its size (tiles for the vision graph, new
    tokens for the LLM)."""

    start: float
    end: float
    size: int


def feed_size(feed: Mapping[str, Any]) -> int:
    """The leading dimension of a feed's first input (tiles for ``pixel_values``), 0 if it has none."""
    for value in feed.values():
        shape = getattr(value, "shape", None)
        return int(shape[0]) if shape else 0
    return 0


class Runner(abc.ABC):
    """One graph on one backend. Use as a context manager or call activate()/deactivate()."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False
        self.inference_time: float | None = None  # seconds of the last backend call
        self.timeline: list[Call] | None = None  # every call while a benchmark records them
        # what an engine was built for (batch, input length, context, tiles); None: the graph takes any
        # shape (ONNX Runtime), so only the manifest limits apply
        self.limits: EngineLimits | None = None

    # -- timing -------------------------------------------------------------------------------
    def last_inference_time(self) -> float | None:
        """Seconds the last ``infer`` / ``forward`` spent in the backend call itself (None before any)."""
        return self.inference_time

    def start_timeline(self) -> list[Call]:
        """Record every backend call from now on; returns the (new, empty) list they are appended to."""
        self.timeline = []
        return self.timeline

    def stop_timeline(self) -> None:
        self.timeline = None

    def _timed(self, start: float, size: int) -> None:
        """Note a backend call that began at ``start`` (``perf_counter``) and has just ended."""
        end = perf_counter()
        self.inference_time = end - start
        if self.timeline is not None:
            self.timeline.append(Call(start, end, size))

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
        """Run the graph once: ``feed`` maps every input name to an array; returns numpy outputs.

        ``infer_impl`` times its backend call with ``_timed``; one that does not is timed whole here."""
        if not self.is_active:
            raise BackendError(f"runner {self.name!r} is not active; call activate() first")
        self.inference_time = None
        start = perf_counter()
        out = self.infer_impl(feed)
        if self.inference_time is None:
            self._timed(start, feed_size(feed))
        return out


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
        """Prefill (seq > 1) or decode (seq == 1): returns last-position logits, cache extended in place.

        Implementations time their backend call with ``_timed(start, seq)`` (see the module docstring)."""

    @property
    @abc.abstractmethod
    def embeds_dtype(self) -> np.dtype:
        """The float dtype the graph wants for ``inputs_embeds`` (float32 or float16)."""

    # -- the cache as host arrays (prefix reuse across requests) -------------------------------
    supports_cache_arrays: bool = False

    def cache_arrays(self, cache: KVCache) -> list[np.ndarray]:
        """The cache's past tensors as numpy copies, [1, kv_heads, length, head_dim] each, past order."""
        raise BackendError(f"the {self.name} runner cannot export its KV cache (no prefix reuse)")

    def cache_from_arrays(self, arrays: list[np.ndarray], length: int) -> KVCache:
        """A cache holding ``arrays`` (as :meth:`cache_arrays` gives them) as its first ``length`` positions."""
        raise BackendError(f"the {self.name} runner cannot import a KV cache (no prefix reuse)")

    # -- several sequences in one step -------------------------------------------------------
    # Prefill chunks of several requests run as one call (:meth:`forward_rows`): each row brings its
    # own cache and any number of new tokens. The running rows decode in a persistent left-padded
    # batch (:meth:`new_batch` ... :meth:`forward_batch`, one token per row), so a decode step copies no
    # cache. A backend without batching keeps the defaults: ``forward_rows`` runs the rows one at a
    # time through ``forward`` and the step core never builds a batch (``supports_batching`` False).
    supports_batching: bool = False
    # A decode step and a prefill chunk may run at the same time on different caches (ONNX Runtime sessions
    # take concurrent runs): the step core then runs prefill chunks beside the decode steps. A TensorRT
    # decoder has one execution context and its buffers, so it keeps them one after the other.
    supports_concurrent_runs: bool = False

    def forward_rows(self, caches: list[KVCache], inputs: list[np.ndarray]) -> np.ndarray:
        """Row i's new tokens ``inputs[i]`` [n_i, hidden] on top of ``caches[i]`` (each extended in
        place): last-position logits [rows, vocab]. This default runs each row alone (a batch of one)."""
        return np.stack([self.forward(x[None], cache) for x, cache in zip(inputs, caches)])

    def new_batch(self) -> "BatchKVCache":
        raise BackendError(f"the {self.name} runner decodes one sequence at a time (no batched decode)")

    def batch_add(self, batch: "BatchKVCache", cache: KVCache) -> None:
        """Append ``cache`` (one prefilled sequence) as the batch's last row."""
        raise BackendError(f"the {self.name} runner decodes one sequence at a time (no batched decode)")

    def batch_keep(self, batch: "BatchKVCache", rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), dropping the padding no kept row needs."""
        raise BackendError(f"the {self.name} runner decodes one sequence at a time (no batched decode)")

    def forward_batch(self, inputs_embeds: np.ndarray, batch: "BatchKVCache") -> np.ndarray:
        """One new token per row, ``inputs_embeds`` [rows, 1, hidden]: last-position logits [rows, vocab]."""
        raise BackendError(f"the {self.name} runner decodes one sequence at a time (no batched decode)")

    def batch_take(self, batch: "BatchKVCache", row: int, into: KVCache) -> None:
        """Copy row ``row``'s positions out of the batch into the single-sequence cache ``into``."""
        raise BackendError(f"the {self.name} runner decodes one sequence at a time (no batched decode)")


def step_inputs(past_lengths, new_lengths, past_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """``attention_mask`` [rows, past_columns + S] and ``position_ids`` [rows, S] for one LLM run,
    S = max(new_lengths): the only place the project builds them.

    Row i's cache holds its ``past_lengths[i]`` real positions at the *end* of ``past_columns``
    (left padding before them); its ``new_lengths[i]`` new tokens stand at the end of the S new
    columns (left padding there too). The mask is 1 exactly over real positions, so a row attends to
    its own tokens only, whatever the other rows hold; positions continue each row's own count
    (padding takes none; a padding slot's position is never attended to)."""
    past = np.asarray(past_lengths, np.int64)
    new = np.asarray(new_lengths, np.int64)
    seq = int(new.max())
    cols = np.arange(past_columns + seq)
    in_past = (cols[None, :] >= past_columns - past[:, None]) & (cols[None, :] < past_columns)
    in_new = cols[None, :] >= past_columns + seq - new[:, None]
    mask = (in_past | in_new).astype(np.int64)
    positions = past[:, None] + np.arange(seq)[None, :] - (seq - new)[:, None]
    return mask, np.maximum(positions, 0)


class BatchKVCache:
    """Rows of sequences in one KV cache, left padded: row i holds ``lengths[i]`` real positions at
    the end of ``total`` columns."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.total = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def attention_mask(self, new: int = 1) -> np.ndarray:
        """[rows, total + new] int64: 0 over each row's left padding, 1 over its positions and the new ones."""
        return step_inputs(self.lengths, [new] * self.rows, self.total)[0]

    def position_ids(self) -> np.ndarray:
        """[rows, 1]: each row's next position is its own length (padding takes no position)."""
        return step_inputs(self.lengths, [1] * self.rows, self.total)[1]
