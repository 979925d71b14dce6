"""TensorRT backend: runs the engines ``flashvl build`` recorded in the manifest, through Polygraphy's CUDA helpers.

Same runner interface as the ONNX Runtime backend (``base.py``): ``open_vision``/``open_llm``, runners with
activate/deactivate, metadata and ``infer(feed)``, and the decoder's ``new_cache``/``forward``.
What is specific to TensorRT:

- **Engine choice and refusal.** ``manifest["engines"]`` maps an engine directory
  (``engines/<gpu>_sm<cc>_trt<version>/``) to what it was built for. :func:`select_engine` picks the entry
  that matches this GPU and TensorRT; an entry built for another GPU, compute capability or TensorRT
  version is refused with :class:`EngineMismatchError` naming both sides (TensorRT plans are not portable
  unless built hardware-/version-compatible, which the entry records).
- **KV cache stays on the GPU.** Each :class:`TrtKVCache` owns two device buffer sets sized for
  ``max_context`` and the decoder ping-pongs between them: a step reads ``past`` from one set and writes
  ``present`` into the other, then they swap. Only the last-position logits cross to the host.
- **One CUDA stream, two optimization profiles** on one execution context: the prefill profile
  (past = 0) and the decode profile (seq = 1). New tokens on a non-empty cache with seq > 1 (a later
  turn of a session) run token by token through the decode profile: exact, just not batched.
- **INT64 on TensorRT 8.6.** 8.6 casts INT64 inputs to INT32: int64 host arrays are converted before upload.

``tensorrt`` and ``polygraphy`` are imported lazily: this module imports on a machine without them, and
:func:`require_tensorrt` turns their absence into one clear :class:`BackendError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Mapping

import numpy as np

from ..contract import EngineEntry, Manifest
from ..errors import BackendError, EngineMismatchError
from .base import DecoderRunner, KVCache, Runner, TensorMeta, feed_size

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

INSTALL_HINT = (
    "TensorRT is not installed: on a Jetson it comes with JetPack (sudo apt install nvidia-tensorrt, "
    "which provides python3-libnvinfer); on x86 run 'pip install tensorrt' (NVIDIA's index, "
    "https://pypi.nvidia.com); Polygraphy, which drives it: pip install 'flashvl-edge[tensorrt]'")


# --------------------------------------------------------------------------------------------
# What machine is this (pure helpers + ctypes; no tensorrt needed)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str   # "8.7"
    total_bytes: int


def gpu_info() -> GpuInfo | None:
    """GPU 0 via the CUDA driver API (libcuda, present wherever the NVIDIA driver is, Jetson included)."""
    names = ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
    lib = None
    for n in names:
        if not n:
            continue
        try:
            lib = ctypes.CDLL(n)
            break
        except OSError:
            continue
    if lib is None:
        return None
    dev = ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return None
    buf = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(buf, 256, dev)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    total = ctypes.c_size_t()
    lib.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
    return GpuInfo(buf.value.decode(errors="replace"), f"{major.value}.{minor.value}", int(total.value))


# the distributions a TensorRT Python package can be installed as (pip wheels; JetPack's python3-libnvinfer
# registers "tensorrt")
TRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu12", "tensorrt_cu12", "tensorrt-libs", "tensorrt-cu13")


def trt_version(import_module: bool = True) -> str | None:
    """The installed TensorRT's version (``"10.3.0"``), or None when there is none.

    ``import_module=False`` reads the package metadata instead of importing ``tensorrt`` (which loads
    the CUDA libraries): what ``flashvl build --dry-run`` uses, as it must work without a GPU.
    """
    if import_module:
        try:
            return getattr(require_tensorrt(), "__version__", None)
        except BackendError:
            return None
    from importlib import metadata

    for dist in TRT_DISTRIBUTIONS:
        try:
            parts = parse_version(metadata.version(dist))
        except metadata.PackageNotFoundError:
            continue
        if parts and parts[0] >= 8:  # placeholder packages on PyPI carry version 0.0.x
            return ".".join(str(p) for p in parts[:3])
    return None


def parse_version(text: Any, strict: bool = False) -> tuple[int, ...]:
    """The numbers of a dotted version: ``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; a suffix that is not a
    number ends it (``"8.6.1.post1"`` -> ``(8, 6, 1)``) and text without a leading number gives ``()``.
    ``strict``: anything but dotted numbers raises ValueError (versions a user typed)."""
    text = str(text).strip()
    if strict:
        if not re.fullmatch(r"\d+(\.\d+)*", text):
            raise ValueError(f"{text!r} is not a version number like 10.3 or 8.6")
        return tuple(int(p) for p in text.split("."))
    m = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(p) for p in m.group().split(".")) if m else ()


def require_tensorrt():
    """Import and return ``tensorrt``, or raise the one-line install hint."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception:
        raise BackendError(INSTALL_HINT) from None
    return trt


def engine_dir_name(gpu_name: str, compute_capability: str, trt_ver: str) -> str:
    """``engines/<gpu-name>_sm<cc>_trt<version>`` directory name, e.g. ``orin_sm87_trt10.3.0``."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    return f"{slug}_sm{compute_capability.replace('.', '')}_trt{trt_ver}"


def engine_mismatch(entry: EngineEntry, gpu: GpuInfo | None, trt_ver: str | None) -> str | None:
    """Why the engine ``entry`` cannot run here (one line naming both sides), or None if it can.

    Exact TensorRT version is required unless the engine was built version-compatible (then same major);
    the same compute capability is required unless built with a hardware-compatibility level (Ampere+,
    then any cc >= 8.0).
    """
    built = (f"built for {entry.gpu} (sm{(entry.compute_capability or '?').replace('.', '')}) "
             f"with TensorRT {entry.trt_version}")
    if gpu is None:
        return f"engine {built}, but no NVIDIA GPU is visible on this machine"
    here = f"this machine has {gpu.name} (sm{gpu.compute_capability.replace('.', '')}) with TensorRT {trt_ver or 'not installed'}"
    if trt_ver is None:
        return f"engine {built}; {here}"
    ev = entry.trt_version
    if entry.version_compatible:
        major = parse_version(ev)[:1]
        if major != parse_version(trt_ver)[:1]:
            return f"engine {built} (version-compatible within TensorRT {major[0] if major else ev}.x); {here}"
    elif ev != trt_ver:
        return f"engine {built}; {here}: rebuild with 'flashvl build'"
    cc = entry.compute_capability
    if entry.hardware_compatibility == "ampere+":
        if parse_version(gpu.compute_capability)[:2] < (8, 0):
            return f"engine {built} (Ampere+ compatible); {here}, which is older than Ampere"
    elif cc != gpu.compute_capability:
        return f"engine {built}; {here}: rebuild with 'flashvl build' on this device"
    return None


def select_engine(manifest: Manifest, gpu: GpuInfo | None, trt_ver: str | None) -> tuple[str, EngineEntry]:
    """The manifest's engine entry that runs here; EngineMismatchError naming both sides otherwise."""
    engines = manifest.engines
    if not engines:
        raise BackendError("the bundle has no TensorRT engines; build them on this device with "
                           "'flashvl build BUNDLE --precision fp16'")
    reasons = []
    for name, entry in engines.items():
        why = engine_mismatch(entry, gpu, trt_ver)
        if why is None:
            return name, entry
        reasons.append(why)
    raise EngineMismatchError(reasons[0] if len(reasons) == 1 else
                              f"none of the {len(reasons)} engine sets matches this machine: " + "; ".join(reasons))


# --------------------------------------------------------------------------------------------
# Runners (need tensorrt + polygraphy + a GPU)


def _np_dtype(trt, dt) -> np.dtype:
    return np.dtype(trt.nptype(dt))


class TrtRunner(Runner):
    """One engine, one execution context, one CUDA stream."""

    def __init__(self, engine_path, name: str, version_compatible: bool = False) -> None:
        super().__init__(name)
        self.engine_path = engine_path
        self.version_compatible = version_compatible
        self.engine = self.context = self.stream = None
        self._buffers: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        trt = require_tensorrt()
        from polygraphy import cuda
        from polygraphy.backend.trt import engine_from_bytes, get_trt_logger
        from polygraphy.exception import PolygraphyException

        self.trt = trt
        with open(self.engine_path, "rb") as f:
            data = f.read()
        runtime = trt.Runtime(get_trt_logger())
        if self.version_compatible:
            # a version-compatible plan carries its own lean runtime, which TensorRT runs only if allowed
            runtime.engine_host_code_allowed = True
        try:
            self.engine = engine_from_bytes(data, runtime=runtime)
        except PolygraphyException:
            self.engine = None
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT {trt.__version__} could not load {self.engine_path}: it was built "
                                      "with another TensorRT version or for another GPU; rebuild with 'flashvl build'")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _np_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def deactivate_impl(self) -> None:
        for b in self._buffers.values():
            b.free()
        self._buffers = {}
        if self.stream is not None:
            self.stream.free()
        self.context = self.engine = self.stream = None

    # -- metadata -------------------------------------------------------------------------------
    def _meta(self, names) -> dict[str, TensorMeta]:
        return {n: TensorMeta(n, self.dtypes[n], tuple(self.engine.get_tensor_shape(n))) for n in names}

    def get_input_metadata(self) -> dict[str, TensorMeta]:
        return self._meta(self.inputs)

    def get_output_metadata(self) -> dict[str, TensorMeta]:
        return self._meta(self.outputs)

    # -- binding --------------------------------------------------------------------------------
    def _buffer(self, key: str, shape: tuple[int, ...], dtype):
        """A device buffer reused across calls (grows when needed); empty tensors get a valid address."""
        from polygraphy import cuda

        shape = tuple(int(d) for d in shape)
        alloc = shape if int(np.prod(shape)) else (1,)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = cuda.DeviceArray(shape=alloc, dtype=dtype)
        else:
            buf.resize(alloc)  # reallocates only when it must grow
        return buf

    def _host(self, name: str, value) -> np.ndarray:
        arr = np.ascontiguousarray(np.asarray(value))
        want = self.dtypes[name]
        if arr.dtype != want:
            if arr.dtype.kind != want.kind and not (arr.dtype.kind in "iu" and want.kind in "iu"):
                raise BackendError(f"input {name!r} has dtype {arr.dtype}; the engine expects {want}")
            arr = np.ascontiguousarray(arr.astype(want))  # e.g. int64 -> int32 on TensorRT 8.6
        return arr

    def _bind_input(self, name: str, value) -> None:
        arr = self._host(name, value)
        buf = self._buffer(name, arr.shape, arr.dtype)
        buf.copy_from(arr, stream=self.stream)
        self.context.set_input_shape(name, arr.shape)
        self.context.set_tensor_address(name, buf.ptr)

    def _bind_output(self, name: str):
        shape = tuple(self.context.get_tensor_shape(name))
        buf = self._buffer(name, shape, self.dtypes[name])
        self.context.set_tensor_address(name, buf.ptr)
        return buf, shape

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.ptr):
            raise BackendError(f"TensorRT execution failed for {self.engine_path}")

    def _fetch(self, buf, shape) -> np.ndarray:
        host = np.empty(shape, dtype=buf.dtype)
        buf.view(shape).copy_to(host, stream=self.stream)
        return host

    def infer_impl(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feed)
        if missing:
            raise BackendError(f"missing inputs for the TensorRT engine: {', '.join(sorted(missing))}")
        for name in self.inputs:
            self._bind_input(name, feed[name])
        bound = {n: self._bind_output(n) for n in self.outputs}
        # the backend call: the execution and the output copies, up to the stream's synchronize
        start = perf_counter()
        self._execute()
        out = {n: self._fetch(buf, shape) for n, (buf, shape) in bound.items()}
        self.stream.synchronize()
        self._timed(start, feed_size(feed))
        return out


class TrtKVCache(KVCache):
    """Two device buffer sets sized for max_context; ``slot`` says which one holds the current cache."""

    def __init__(self) -> None:
        self.length = 0
        self.slot = 0
        self.buffers: dict[tuple[str, int], Any] = {}   # (past name, slot) -> DeviceArray

    def free(self) -> None:
        for b in self.buffers.values():
            b.free()
        self.buffers = {}

    def __del__(self) -> None:  # device memory is not garbage collected by Python
        try:
            self.free()
        except Exception:
            pass


class TrtDecoder(TrtRunner, DecoderRunner):
    """The LLM engine: prefill/decode profile switch, KV ping-pong between two device buffer sets."""

    def __init__(self, engine_path, profiles: list[str], max_context: int, max_input_len: int,
                 version_compatible: bool = False) -> None:
        super().__init__(engine_path, "llm", version_compatible)
        self.profile_index = {name: i for i, name in enumerate(profiles)}
        if set(self.profile_index) != {"prefill", "decode"}:
            raise BackendError("the LLM engine entry does not record prefill and decode profiles; rebuild it")
        self.max_context = int(max_context)
        self.max_input_len = int(max_input_len)
        self._profile = None

    def activate_impl(self) -> None:
        super().activate_impl()
        self.past_names = [n for n in self.inputs if n.startswith(PAST_PREFIX)]
        self.present_of = {p: PRESENT_PREFIX + p[len(PAST_PREFIX):] for p in self.past_names}
        if not self.past_names or set(self.present_of.values()) - set(self.outputs) or "logits" not in self.outputs:
            raise BackendError(f"{self.engine_path} does not have the LLM graph interface; rebuild the engines")
        # [batch, kv_heads, past, head_dim]: kv_heads and head_dim are static in the engine
        self.kv_dims = {p: tuple(self.engine.get_tensor_shape(p)) for p in self.past_names}
        self._profile = None

    def deactivate_impl(self) -> None:
        super().deactivate_impl()
        self._profile = None

    @property
    def embeds_dtype(self) -> np.dtype:
        return self.dtypes["inputs_embeds"]

    def new_cache(self) -> TrtKVCache:
        return TrtKVCache()

    def _kv(self, cache: TrtKVCache, name: str, slot: int):
        from polygraphy import cuda

        key = (name, slot)
        if key not in cache.buffers:
            _, kv_heads, _, head_dim = self.kv_dims[name]
            cache.buffers[key] = cuda.DeviceArray(shape=(1, kv_heads, self.max_context, head_dim),
                                                  dtype=self.dtypes[name])
        return cache.buffers[key]

    def _set_profile(self, role: str) -> None:
        idx = self.profile_index[role]
        if self._profile != idx:
            self.context.set_optimization_profile_async(idx, self.stream.ptr)
            self._profile = idx

    def forward(self, inputs_embeds: np.ndarray, cache: TrtKVCache) -> np.ndarray:
        if not self.is_active:
            raise BackendError("runner 'llm' is not active; call activate() first")
        seq = inputs_embeds.shape[1]
        if cache.length + seq > self.max_context:
            raise BackendError(f"context of {cache.length + seq} tokens exceeds the engines' max_context "
                               f"{self.max_context}; rebuild with a larger --max-context")
        if cache.length == 0:
            if seq > self.max_input_len:
                raise BackendError(f"a prompt of {seq} tokens exceeds the engines' max_input_len "
                                   f"{self.max_input_len}; rebuild with a larger --max-input-len")
            return self._step(inputs_embeds, cache, "prefill")
        logits = None
        for t in range(seq):  # a later turn: no profile has past > 0 and seq > 1, so one token at a time
            logits = self._step(inputs_embeds[:, t:t + 1], cache, "decode")
        return logits

    def _step(self, embeds: np.ndarray, cache: TrtKVCache, role: str) -> np.ndarray:
        self._set_profile(role)
        seq = embeds.shape[1]
        past, total = cache.length, cache.length + seq
        self._bind_input("inputs_embeds", embeds)
        self._bind_input("attention_mask", np.ones((1, total), np.int64))
        self._bind_input("position_ids", np.arange(past, total, dtype=np.int64)[None, :])
        read, write = cache.slot, 1 - cache.slot
        for p in self.past_names:
            _, kv_heads, _, head_dim = self.kv_dims[p]
            # the cache is written contiguously as [1, kv, length, hd] at the start of the slot's buffer
            self.context.set_input_shape(p, (1, kv_heads, past, head_dim))
            self.context.set_tensor_address(p, self._kv(cache, p, read).ptr)
            self.context.set_tensor_address(self.present_of[p], self._kv(cache, p, write).ptr)
        logits_buf, logits_shape = self._bind_output("logits")
        # timed as TrtRunner.infer_impl: execution + logits copy; the bindings above are host overhead.
        # A multi-token later turn is one engine execution (and one timed call) per token.
        start = perf_counter()
        self._execute()
        logits = self._fetch(logits_buf, logits_shape)
        self.stream.synchronize()
        self._timed(start, seq)
        cache.slot, cache.length = write, total
        return logits[0, -1].astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Backend entry points (see runtime/backends/__init__.py)


def _engine_set(bundle) -> EngineEntry:
    require_tensorrt()
    _, entry = select_engine(bundle.manifest, gpu_info(), trt_version())
    return entry


def open_vision(bundle, device: str = "auto", threads: int | None = None, **_options) -> TrtRunner:
    """The vision engine (``device``/``threads`` are ONNX Runtime options; TensorRT uses GPU 0)."""
    entry = _engine_set(bundle)
    runner = TrtRunner(bundle.path(entry.graphs["vision"].file), "vision", entry.version_compatible)
    runner.limits = entry.limits  # the pipeline plans images within the tiles the engine was built for
    return runner.activate()


def open_llm(bundle, device: str = "auto", threads: int | None = None, **_options) -> TrtDecoder:
    entry = _engine_set(bundle)
    g = entry.graphs["llm"]
    runner = TrtDecoder(bundle.path(g.file), list(g.profiles), entry.limits.max_context,
                        entry.limits.max_input_len, entry.version_compatible)
    runner.limits = entry.limits  # the pipeline refuses prompts longer than the engine's context up front
    return runner.activate()
