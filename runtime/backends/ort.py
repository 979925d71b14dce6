"""ONNX Runtime backend: the vision graph as a plain runner, the LLM as a decoder with an OrtValue KV cache.

Choices, and why:
- Providers: ``CUDAExecutionProvider`` first when onnxruntime-gpu provides it (``device="auto"``), the CPU
  provider otherwise. ``device="cpu"`` / ``"cuda"`` forces one (``"cuda"`` without it is an error, not a
  silent fallback to CPU).
- Threads: intra-op threads = physical cores this process may run on. ORT's own default counts the
  host's cores, which in a container or under ``taskset`` oversubscribes; and hyper-threads do not help
  memory-bound matmuls. Inter-op is 1 and execution sequential: both graphs are single chains.
- Graph optimization ``ORT_ENABLE_ALL``: the layer-norm / GELU / attention / matmul fusions cut memory
  traffic, which is what decode time is made of. ``FLASHVL_ORT_OPT=basic|extended|all|none`` overrides it
  for debugging numerics.
- Models are opened *by path*, never read into Python bytes: ORT resolves the LLM's external data file
  next to the model itself, so multi-GB weights are not copied through the Python heap.
- KV cache: the previous step's ``present.*`` OrtValues are fed back as the next ``past_key_values.*``
  and the new ``present.*`` are allocated on the provider's device. On CUDA the cache never leaves the
  GPU; on CPU it stays in ORT-allocated buffers and only the last-position logits are copied out as
  numpy. (The graph returns ``present`` = past + new as a fresh tensor, so each step still allocates
  it; in-place KV update needs a custom attention op, which the bundle avoids so that TensorRT can
  parse the same graph.)
- The step goes through ``Session.run_with_ortvaluevector`` (ORT >= 1.16): feeds and fetches are C++
  ``OrtValueVector``s, so the 2 x layers cache tensors pass from one step to the next without a
  Python object each. With per-name IO binding that was ~0.7 ms of Python per token on a 28-layer
  model (56 binds + 57 output wrappers), more than the whole per-token overhead budget. Older ORT
  falls back to IO binding (same results; ``FLASHVL_ORT_IOBINDING=1`` forces it, to compare).
"""

from __future__ import annotations

import os
from pathlib import Path
from time import perf_counter
from typing import Any, Mapping

import numpy as np

from ..errors import BackendError
from .base import BatchKVCache, DecoderRunner, KVCache, Runner, TensorMeta, feed_size, step_inputs

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("onnxruntime is not installed; run 'pip install onnxruntime' "
                           "(or onnxruntime-gpu on a CUDA machine)") from None
    return onnxruntime


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (Linux sysfs; logical count elsewhere)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((base.joinpath("physical_package_id").read_text().strip(),
                       base.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def available_devices() -> list[str]:
    providers = _ort().get_available_providers()
    return (["cuda"] if "CUDAExecutionProvider" in providers else []) + ["cpu"]


def _providers(device: str) -> tuple[list, str]:
    devices = available_devices()
    if device == "auto":
        device = devices[0]
    if device not in ("cpu", "cuda"):
        raise BackendError(f"unknown ONNX Runtime device {device!r}; use auto, cpu or cuda")
    if device not in devices:
        raise BackendError("CUDAExecutionProvider is not available; install onnxruntime-gpu "
                           "(matching your CUDA) or use the CPU device")
    if device == "cuda":
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


def session_options(threads: int | None = None, spinning: bool = True):
    ort = _ort()
    so = ort.SessionOptions()
    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so.graph_optimization_level = levels.get(os.environ.get("FLASHVL_ORT_OPT", "all"), levels["all"])
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    if not spinning:  # idle threads sleep instead of spinning (see OrtRunner)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _meta(args) -> dict[str, TensorMeta]:
    return {a.name: TensorMeta(a.name, np.dtype(_ORT_TYPES.get(a.type, np.float32)), tuple(a.shape))
            for a in args}


class OrtRunner(Runner):
    """One ONNX graph in one ``InferenceSession``."""

    def __init__(self, model_path: str | os.PathLike, name: str | None = None, device: str = "auto",
                 threads: int | None = None, spinning: bool = True) -> None:
        super().__init__(name or Path(model_path).stem)
        self.model_path = Path(model_path)
        self.requested_device = device
        self.threads = threads
        # ORT's pool threads spin between kernels by default. The vision graph may run on the server's
        # encoder thread beside the LLM's decode steps: its threads must not spin on the cores the
        # decode needs (on 2 cores, spinning pools of two sessions at once cost the decode several x).
        self.spinning = spinning
        self.session = None
        self.device = None

    def activate_impl(self) -> None:
        ort = _ort()
        providers, self.device = _providers(self.requested_device)
        try:
            self.session = ort.InferenceSession(str(self.model_path),
                                                sess_options=session_options(self.threads, self.spinning),
                                                providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            msg = " ".join(str(e).split())[:300]
            raise BackendError(f"ONNX Runtime cannot load {self.model_path.name}: {msg}; "
                               "re-export the bundle") from None

    def deactivate_impl(self) -> None:
        self.session = None

    def get_input_metadata(self) -> dict[str, TensorMeta]:
        return _meta(self.session.get_inputs())

    def get_output_metadata(self) -> dict[str, TensorMeta]:
        return _meta(self.session.get_outputs())

    def infer_impl(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        feed = dict(feed)
        start = perf_counter()
        outputs = self.session.run(names, feed)
        self._timed(start, feed_size(feed))
        return dict(zip(names, outputs))


class OrtKVCache(KVCache):
    """The ``past_key_values.*`` OrtValues on the session's device, in the decoder's ``past_names``
    order: a Python list (from ``new_cache`` or the IO-binding path) or the C++ ``OrtValueVector`` of
    the last run's fetches, where they start at index ``offset`` (index 0 is the logits)."""

    def __init__(self, values: Any, length: int = 0, offset: int = 0) -> None:
        self.values = values
        self.length = length
        self.offset = offset
        self.hold: Any = None  # Python wrappers whose buffers ``values`` point into, when made from numpy

    def tensors(self) -> list:
        """The cache's C++ OrtValues, in ``past_names`` order."""
        return [self.values[i] for i in range(self.offset, len(self.values))]


class OrtDecoder(OrtRunner, DecoderRunner):
    """The LLM graph with IO binding: the KV cache stays in OrtValues between steps."""

    def activate_impl(self) -> None:
        super().activate_impl()
        ort = _ort()
        inputs = self.get_input_metadata()
        outputs = self.get_output_metadata()
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        # present.{i}.key -> past_key_values.{i}.key: the graph's outputs feed its own inputs
        self.present_to_past = {n: PAST_PREFIX + n[len(PRESENT_PREFIX):] for n in outputs
                                if n.startswith(PRESENT_PREFIX)}
        missing = {"inputs_embeds", "attention_mask", "position_ids"} - set(inputs)
        if missing or "logits" not in outputs or set(self.present_to_past.values()) != set(self.past_names):
            raise BackendError(f"{self.model_path.name} does not have the LLM graph interface "
                               f"(inputs_embeds, attention_mask, position_ids, past_key_values.* -> logits, "
                               f"present.*); re-export the bundle")
        self._embeds_dtype = inputs["inputs_embeds"].dtype
        self._past_meta = {n: inputs[n] for n in self.past_names}
        self._ort_device = "cuda" if self.device == "cuda" else "cpu"
        # fetch order = past order, so a run's fetches[1:] are the next run's past feeds as they are
        past_to_present = {v: k for k, v in self.present_to_past.items()}
        self.fetch_names = ["logits"] + [past_to_present[n] for n in self.past_names]
        self.feed_names = ["inputs_embeds", "attention_mask", "position_ids"] + self.past_names
        self.use_vector_run = (hasattr(self.session, "run_with_ortvaluevector")
                               and os.environ.get("FLASHVL_ORT_IOBINDING", "") in ("", "0"))
        if self.use_vector_run:
            from onnxruntime.capi import _pybind_state as C

            cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
            kv = ort.OrtDevice.make(self._ort_device, 0)._get_c_device()
            self._C, self._cpu_device = C, cpu
            self._fetch_devices = [cpu] + [kv] * len(self.past_names)
            self._run_options = ort.RunOptions()

    @property
    def embeds_dtype(self) -> np.dtype:
        return self._embeds_dtype

    def new_cache(self) -> OrtKVCache:
        ort = _ort()
        values = []
        for name, meta in self._past_meta.items():
            # [batch, kv_heads, past, head_dim] with past = 0; kv_heads/head_dim are static in the graph
            dims = [1 if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(meta.shape)]
            dims[2] = 0
            values.append(ort.OrtValue.ortvalue_from_numpy(np.zeros(dims, meta.dtype), self._ort_device, 0)
                          ._get_c_value())
        return OrtKVCache(values, 0)

    def forward(self, inputs_embeds: np.ndarray, cache: OrtKVCache) -> np.ndarray:
        if not self.is_active:
            raise BackendError(f"runner {self.name!r} is not active; call activate() first")
        seq = inputs_embeds.shape[1]
        total = cache.length + seq
        # the host inputs must outlive the run: a CPU OrtValue made from numpy points into its buffer
        embeds = np.ascontiguousarray(inputs_embeds, dtype=self._embeds_dtype)
        mask, positions = step_inputs([cache.length], [seq], cache.length)
        if self.use_vector_run:
            fetches = self._vector_run(embeds, mask, positions, cache.tensors(), seq)
            cache.values, cache.offset, cache.length, cache.hold = fetches, 1, total, None
            return fetches[0].numpy()[0, -1].astype(np.float32, copy=False)
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", embeds)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        ort = _ort()
        for name, value in zip(self.past_names, cache.tensors()):
            io.bind_ortvalue_input(name, ort.OrtValue(value))
        for name in self.fetch_names:
            io.bind_output(name, "cpu" if name == "logits" else self._ort_device, 0)
        start = perf_counter()
        self.session.run_with_iobinding(io)
        self._timed(start, seq)
        out = io.get_outputs()
        cache.values, cache.offset, cache.length = [v._get_c_value() for v in out[1:]], 0, total
        cache.hold = None
        return out[0].numpy()[0, -1].astype(np.float32, copy=False)

    def _vector_run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list, size: int):
        """One decoder run through ``run_with_ortvaluevector``: the KV OrtValues go in as they are and the
        fetches come back as C++ values (logits first, then the presents in past order)."""
        C = self._C
        feeds = C.OrtValueVector()
        feeds.reserve(len(self.feed_names))
        for array in (embeds, mask, positions):
            feeds.push_back(C.OrtValue.ortvalue_from_numpy(array, self._cpu_device))
        for value in past:
            feeds.push_back(value)
        fetches = C.OrtValueVector()
        start = perf_counter()
        self.session.run_with_ortvaluevector(self._run_options, self.feed_names, feeds, self.fetch_names,
                                             fetches, self._fetch_devices)
        self._timed(start, size)
        return fetches

    def infer_impl(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return OrtRunner.infer_impl(self, feed)

    # -- the cache as host arrays ------------------------------------------------------------
    supports_cache_arrays = True

    def cache_arrays(self, cache: OrtKVCache) -> list[np.ndarray]:
        return [v.numpy() for v in cache.tensors()]

    def cache_from_arrays(self, arrays: list[np.ndarray], length: int) -> OrtKVCache:
        ort = _ort()
        dtypes = [self._past_meta[n].dtype for n in self.past_names]
        wrappers = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=d), self._ort_device, 0)
                    for a, d in zip(arrays, dtypes)]
        cache = OrtKVCache([w._get_c_value() for w in wrappers], length)
        cache.hold = wrappers  # keeps the numpy buffers alive until the first run replaces the values
        return cache

    # -- batched decoding ---------------------------------------------------------------------
    supports_batching = True
    supports_concurrent_runs = True  # a run's state is its own feeds and fetches

    def new_batch(self) -> "OrtBatchKVCache":
        return OrtBatchKVCache()

    def _to_values(self, arrays: list[np.ndarray], batch: "OrtBatchKVCache") -> list:
        """numpy KV arrays as C OrtValues on the cache device; the Python wrappers (which keep the
        numpy buffers alive on the CPU) are held by the batch until its next run replaces them."""
        ort = _ort()
        wrappers = [ort.OrtValue.ortvalue_from_numpy(a, self._ort_device, 0) for a in arrays]
        batch.hold = wrappers
        return [w._get_c_value() for w in wrappers]

    @staticmethod
    def _numpy(values: list) -> list[np.ndarray]:
        return [v.numpy() for v in values]

    def batch_add(self, batch: "OrtBatchKVCache", cache: OrtKVCache) -> None:
        new = cache.tensors()
        if batch.rows == 0:  # the first row: its cache is the batch as it is (no copy)
            batch.values, batch.lengths, batch.total = new, [cache.length], cache.length
            batch.hold = [cache.values, cache.hold]  # the values, and the buffers they may point into
            return
        # Membership changes copy the cache once (rare next to decode steps, which copy nothing).
        total = max(batch.total, cache.length)
        merged = []
        for old, add in zip(self._numpy(batch.values), self._numpy(new)):
            old = np.pad(old, ((0, 0), (0, 0), (total - batch.total, 0), (0, 0)))
            add = np.pad(add, ((0, 0), (0, 0), (total - cache.length, 0), (0, 0)))
            merged.append(np.ascontiguousarray(np.concatenate([old, add], axis=0)))
        batch.values = self._to_values(merged, batch)
        batch.lengths = batch.lengths + [cache.length]
        batch.total = total

    def batch_keep(self, batch: "OrtBatchKVCache", rows: list[int]) -> None:
        if rows == list(range(batch.rows)):
            return
        lengths = [batch.lengths[i] for i in rows]
        if not rows:
            batch.values, batch.lengths, batch.total, batch.hold = [], [], 0, []
            return
        total = max(lengths)  # columns every kept row leaves as padding are dropped
        cut = batch.total - total
        index = np.asarray(rows)
        kept = [np.ascontiguousarray(a[index][:, :, cut:, :]) for a in self._numpy(batch.values)]
        batch.values = self._to_values(kept, batch)
        batch.lengths, batch.total = lengths, total

    def batch_take(self, batch: "OrtBatchKVCache", row: int, into: OrtKVCache) -> None:
        cut = batch.total - batch.lengths[row]
        self._refill(into, [a[row:row + 1, :, cut:, :] for a in self._numpy(batch.values)], batch.lengths[row])

    def _refill(self, cache: OrtKVCache, arrays: list[np.ndarray], length: int) -> None:
        """``cache`` (the caller's object) now holds ``arrays`` as its ``length`` positions."""
        fresh = self.cache_from_arrays(arrays, length)
        cache.values, cache.offset, cache.length, cache.hold = fresh.values, 0, length, fresh.hold

    def forward_rows(self, caches: list[OrtKVCache], inputs: list[np.ndarray]) -> np.ndarray:
        """Several sequences' new tokens in one run (batched prefill chunks).

        The rows' caches are joined left padded, their new tokens left padded to the longest, and after
        the run each row's real columns are cut back out into its own cache: the padding computed in
        the run never reaches a cache. One row alone is ``forward`` itself (no copy)."""
        if len(caches) == 1:
            return self.forward(inputs[0][None], caches[0])[None]
        if not self.is_active:
            raise BackendError(f"runner {self.name!r} is not active; call activate() first")
        past = [c.length for c in caches]
        new = [len(x) for x in inputs]
        cols, seq = max(past), max(new)
        embeds = np.zeros((len(caches), seq, inputs[0].shape[-1]), self._embeds_dtype)
        for i, x in enumerate(inputs):
            embeds[i, seq - len(x):] = x
        mask, positions = step_inputs(past, new, cols)
        joined = []
        for layer in zip(*(self.cache_arrays(c) for c in caches)):
            joined.append(np.ascontiguousarray(np.concatenate(
                [np.pad(a, ((0, 0), (0, 0), (cols - a.shape[2], 0), (0, 0))) for a in layer], axis=0)))
        if self.use_vector_run:
            joint = self.cache_from_arrays(joined, cols)  # keeps the joined buffers alive for the run
            fetches = self._vector_run(embeds, mask, positions, joint.tensors(), sum(new))
            logits = fetches[0].numpy()[:, -1].astype(np.float32, copy=True)
            presents = [fetches[i].numpy() for i in range(1, len(fetches))]
        else:
            feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                    **dict(zip(self.past_names, joined))}
            start = perf_counter()
            out = self.session.run(self.fetch_names, feed)
            self._timed(start, sum(new))
            logits = np.asarray(out[0])[:, -1].astype(np.float32, copy=True)
            presents = out[1:]
        for i, cache in enumerate(caches):
            keep = np.r_[cols - past[i]:cols, cols + seq - new[i]:cols + seq]
            self._refill(cache, [p[i:i + 1][:, :, keep] for p in presents], past[i] + new[i])
        return logits

    def forward_batch(self, inputs_embeds: np.ndarray, batch: "OrtBatchKVCache") -> np.ndarray:
        if not self.is_active:
            raise BackendError(f"runner {self.name!r} is not active; call activate() first")
        rows = inputs_embeds.shape[0]
        if rows != batch.rows or inputs_embeds.shape[1] != 1:
            raise BackendError(f"forward_batch takes one token per row: got {list(inputs_embeds.shape[:2])} "
                               f"for {batch.rows} rows")
        embeds = np.ascontiguousarray(inputs_embeds, dtype=self._embeds_dtype)
        mask, positions = batch.attention_mask(1), batch.position_ids()
        if self.use_vector_run:
            fetches = self._vector_run(embeds, mask, positions, batch.values, rows)
            logits = fetches[0].numpy()[:, -1].astype(np.float32, copy=False)
            batch.values = [fetches[i] for i in range(1, len(fetches))]
            batch.hold = [fetches]  # the run's fetch vector owns the new KV tensors
        else:  # ONNX Runtime < 1.16: plain run on numpy values
            feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                    **dict(zip(self.past_names, self._numpy(batch.values)))}
            start = perf_counter()
            out = self.session.run(self.fetch_names, feed)
            self._timed(start, rows)
            logits = np.asarray(out[0])[:, -1].astype(np.float32, copy=False)
            batch.values = self._to_values([np.ascontiguousarray(a) for a in out[1:]], batch)
        batch.lengths = [n + 1 for n in batch.lengths]
        batch.total += 1
        return logits


class OrtBatchKVCache(BatchKVCache):
    """The batch's ``past_key_values.*`` as C OrtValues [rows, kv_heads, total, head_dim], past order."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list = []
        self.hold: list = []


def open_vision(bundle, device: str = "auto", threads: int | None = None) -> OrtRunner:
    return OrtRunner(bundle.graph_path("vision"), "vision", device=device, threads=threads, spinning=False).activate()


def open_llm(bundle, device: str = "auto", threads: int | None = None) -> OrtDecoder:
    return OrtDecoder(bundle.graph_path("llm"), "llm", device=device, threads=threads).activate()
