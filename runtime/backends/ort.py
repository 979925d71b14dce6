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
- KV cache: each step binds the previous step's ``present.*`` OrtValues as the next ``past_key_values.*``
  with IO binding, and binds the new ``present.*`` outputs to the provider's device. On CUDA the cache
  never leaves the GPU; on CPU it stays in ORT-allocated buffers and only the last-position logits are
  copied out as numpy. (The graph returns ``present`` = past + new as a fresh tensor, so each step
  still allocates it; in-place KV update needs a custom attention op, which the bundle avoids so that
  TensorRT can parse the same graph.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BackendError
from .base import DecoderRunner, KVCache, Runner, TensorMeta

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


def session_options(threads: int | None = None):
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
    return so


def _meta(args) -> dict[str, TensorMeta]:
    return {a.name: TensorMeta(a.name, np.dtype(_ORT_TYPES.get(a.type, np.float32)), tuple(a.shape))
            for a in args}


class OrtRunner(Runner):
    """One ONNX graph in one ``InferenceSession``."""

    def __init__(self, model_path: str | os.PathLike, name: str | None = None, device: str = "auto",
                 threads: int | None = None) -> None:
        super().__init__(name or Path(model_path).stem)
        self.model_path = Path(model_path)
        self.requested_device = device
        self.threads = threads
        self.session = None
        self.device = None

    def activate_impl(self) -> None:
        ort = _ort()
        providers, self.device = _providers(self.requested_device)
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=session_options(self.threads),
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
        return dict(zip(names, self.session.run(names, dict(feed))))


class OrtKVCache(KVCache):
    """Per-layer ``past_key_values.*`` as OrtValues on the session's device."""

    def __init__(self, values: dict[str, Any], length: int = 0) -> None:
        self.values = values
        self.length = length


class OrtDecoder(OrtRunner, DecoderRunner):
    """The LLM graph with IO binding: the KV cache stays in OrtValues between steps."""

    def activate_impl(self) -> None:
        super().activate_impl()
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

    @property
    def embeds_dtype(self) -> np.dtype:
        return self._embeds_dtype

    def new_cache(self) -> OrtKVCache:
        ort = _ort()
        values = {}
        for name, meta in self._past_meta.items():
            # [batch, kv_heads, past, head_dim] with past = 0; kv_heads/head_dim are static in the graph
            dims = [1 if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(meta.shape)]
            dims[2] = 0
            values[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(dims, meta.dtype), self._ort_device, 0)
        return OrtKVCache(values, 0)

    def forward(self, inputs_embeds: np.ndarray, cache: OrtKVCache) -> np.ndarray:
        if not self.is_active:
            raise BackendError(f"runner {self.name!r} is not active; call activate() first")
        seq = inputs_embeds.shape[1]
        total = cache.length + seq
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=self._embeds_dtype))
        io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        io.bind_cpu_input("position_ids", np.arange(cache.length, total, dtype=np.int64)[None, :])
        for name, value in cache.values.items():
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        present_names = list(self.present_to_past)
        for name in present_names:
            io.bind_output(name, self._ort_device, 0)
        self.session.run_with_iobinding(io)
        out = dict(zip(["logits"] + present_names, io.get_outputs()))
        cache.values = {self.present_to_past[n]: out[n] for n in present_names}
        cache.length = total
        return out["logits"].numpy()[0, -1].astype(np.float32, copy=False)

    def infer_impl(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return OrtRunner.infer_impl(self, feed)


def open_vision(bundle, device: str = "auto", threads: int | None = None) -> OrtRunner:
    return OrtRunner(bundle.graph_path("vision"), "vision", device=device, threads=threads).activate()


def open_llm(bundle, device: str = "auto", threads: int | None = None) -> OrtDecoder:
    return OrtDecoder(bundle.graph_path("llm"), "llm", device=device, threads=threads).activate()
