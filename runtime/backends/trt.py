"""TensorRT backend: runs the engines ``flashvl build`` recorded in the manifest, through Polygraphy's CUDA helpers.

Same runner interface as the ONNX Runtime backend (``base.py``): ``open_vision``/``open_llm``, runners with
activate/deactivate, metadata and ``infer(feed)``, and the decoder's ``new_cache``/``forward``.
What is specific to TensorRT:

- **Engine choice and refusal.** ``manifest["engines"]`` maps an engine directory
  (``engines/<gpu>_sm<cc>_trt<version>/``) to what it was built for. :func:`select_engine` picks the entry
  that matches this machine; an entry built for another platform (x86_64 vs aarch64), GPU, compute
  capability or TensorRT version is refused with :class:`EngineMismatchError` naming both sides. A
  version-compatible engine runs on the same or a newer TensorRT only; a hardware-compatible (Ampere+) one
  on a discrete Ampere-or-newer GPU only (TensorRT does not support hardware compatibility on Jetson).
- **KV cache stays on the GPU.** Each :class:`TrtKVCache` owns two device buffer sets sized for
  ``max_context`` and the decoder ping-pongs between them: a step reads ``past`` from one set and writes
  ``present`` into the other, then they swap. Only the last-position logits cross to the host.
- **One CUDA stream, up to three optimization profiles** on one execution context, chosen from the shapes
  of each call (:func:`profile_steps`): **prefill** (past = 0), **decode** (seq = 1) and **extend** (seq > 1
  on a non-empty cache: a later turn, a reused prefix, a sequence joining a batch). A prompt longer than
  the prefill profile goes in chunks (prefill, then extend). Engines built before the extend profile
  existed run such tokens one at a time through decode: exact, just not batched.
- **No allocation per call.** Input buffers are allocated once at the largest shape of the engine's
  profiles and bound as views; the attention mask (all ones) is uploaded once at ``max_context``.
- **Every TensorRT status is checked**: a shape outside the profile, a failed profile switch or an
  execution context that cannot be created (out of device memory) is a :class:`BackendError` naming what
  was asked and what the engine allows.
- **INT64 on TensorRT 8.6.** 8.6 casts INT64 inputs to INT32: int64 host arrays are converted before upload.

``tensorrt`` and ``polygraphy`` are imported lazily: this module imports on a machine without them, and
:func:`require_tensorrt` turns their absence into one clear :class:`BackendError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import re
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Mapping

import numpy as np

from ..contract import EngineEntry, Manifest
from ..errors import BackendError, EngineMismatchError
from .base import BatchKVCache, DecoderRunner, KVCache, Runner, TensorMeta, feed_size

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# the LLM engine's optimization profiles, in build order (profile 0 stays prefill, 1 decode)
LLM_PROFILES = ("prefill", "decode", "extend")
# Version-compatible engines run on the same or a newer TensorRT of the same major version, and across
# these (built, runtime) major versions: "engines built with TensorRT 8 work with TensorRT 9 and TensorRT
# 10 runtimes" (TensorRT 10 developer guide, Version Compatibility) and TensorRT 10 with 11 (the 11.x
# support matrix). Never on an older runtime.
VC_CROSS_MAJOR = frozenset({(8, 9), (8, 10), (10, 11)})

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
    integrated: bool = False  # an iGPU sharing memory with the CPU: Jetson (JetPack)


def host_platform() -> str:
    """This machine's platform as engines record it: ``"linux-aarch64"``, ``"linux-x86_64"``."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{platform.system().lower() or 'unknown'}-{machine or 'unknown'}"


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
    integrated = ctypes.c_int()
    lib.cuDeviceGetAttribute(ctypes.byref(integrated), 18, dev)  # CU_DEVICE_ATTRIBUTE_INTEGRATED
    return GpuInfo(buf.value.decode(errors="replace"), f"{major.value}.{minor.value}", int(total.value),
                   bool(integrated.value))


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


def engine_mismatch(entry: EngineEntry, gpu: GpuInfo | None, trt_ver: str | None,
                    host: str | None = None) -> str | None:
    """Why the engine ``entry`` cannot run here (one line naming both sides), or None if it can.

    - platform: a plan runs only on the platform that built it (``host``, default :func:`host_platform`);
    - TensorRT: the exact version, unless built version-compatible: then the same or a newer runtime of
      the same major version (or of a major in :data:`VC_CROSS_MAJOR`), never an older one;
    - GPU: the same compute capability, unless built hardware-compatible (Ampere+): then any discrete GPU
      with cc >= 8.0; TensorRT does not support hardware compatibility on Jetson's integrated GPUs.
    """
    built = (f"built for {entry.gpu} (sm{(entry.compute_capability or '?').replace('.', '')}) "
             f"with TensorRT {entry.trt_version}")
    host = host or host_platform()
    if entry.platform and entry.platform != host:
        return (f"engine {built} on {entry.platform}; this machine is {host}: TensorRT engines do not run "
                "across platforms; rebuild with 'flashvl build' on this device")
    if gpu is None:
        return f"engine {built}, but no NVIDIA GPU is visible on this machine"
    here = f"this machine has {gpu.name} (sm{gpu.compute_capability.replace('.', '')}) with TensorRT {trt_ver or 'not installed'}"
    if trt_ver is None:
        return f"engine {built}; {here}"
    ev = entry.trt_version
    if entry.version_compatible:
        b, r = parse_version(ev)[:3], parse_version(trt_ver)[:3]
        if not b or not r or r < b:
            return (f"engine {built} (version-compatible: runs on TensorRT {ev} or newer); {here}: "
                    "rebuild with 'flashvl build'")
        if b[0] != r[0] and (b[0], r[0]) not in VC_CROSS_MAJOR:
            return (f"engine {built} (version-compatible within TensorRT {b[0]}.x); {here}: "
                    "rebuild with 'flashvl build'")
    elif ev != trt_ver:
        return f"engine {built}; {here}: rebuild with 'flashvl build'"
    cc = entry.compute_capability
    if entry.hardware_compatibility == "ampere+":
        if gpu.integrated:
            return (f"engine {built} (hardware-compatible, Ampere+); {here}, an integrated Jetson GPU, where "
                    "TensorRT does not support hardware-compatible engines: rebuild without --hardware-compat")
        if parse_version(gpu.compute_capability)[:2] < (8, 0):
            return f"engine {built} (Ampere+ compatible); {here}, which is older than Ampere"
    elif cc != gpu.compute_capability:
        return f"engine {built}; {here}: rebuild with 'flashvl build' on this device"
    return None


def select_engine(manifest: Manifest, gpu: GpuInfo | None, trt_ver: str | None,
                  host: str | None = None) -> tuple[str, EngineEntry]:
    """The manifest's engine entry that runs here; EngineMismatchError naming both sides otherwise."""
    engines = manifest.engines
    if not engines:
        raise BackendError("the bundle has no TensorRT engines; build them on this device with "
                           "'flashvl build BUNDLE --precision fp16'")
    reasons = []
    for name, entry in engines.items():
        why = engine_mismatch(entry, gpu, trt_ver, host)
        if why is None:
            return name, entry
        reasons.append(why)
    raise EngineMismatchError(reasons[0] if len(reasons) == 1 else
                              f"none of the {len(reasons)} engine sets matches this machine: " + "; ".join(reasons))


def engine_kv_dtype(graph_kv_dtype: str, strongly_typed: bool) -> str:
    """The KV dtype of an engine built from a graph whose past/present tensors are ``graph_kv_dtype``:
    a strongly typed build keeps the graph's types; every other build sets the KV inputs/outputs to
    float16 (``flashvl build`` does, so the cache is half the bytes of an fp32 graph's)."""
    return graph_kv_dtype if strongly_typed else "float16"


def profile_steps(past: int, seq: int, ranges: Mapping[str, tuple[int, int, int]]) -> list[tuple[str, int]]:
    """How ``seq`` new tokens on a cache of ``past`` run: ``[(profile, tokens), ...]`` in order.

    ``ranges``: per profile of the engine, (largest seq, smallest past, largest past). Prefill takes an
    empty cache, extend seq > 1 on a cache within its past range, decode one token; a run longer than
    a profile's seq goes in chunks. Without an extend profile (older engines), tokens on a cache go one
    at a time through decode.
    """
    steps: list[tuple[str, int]] = []
    while seq > 0:
        role = "decode"
        if past == 0 and "prefill" in ranges:
            role = "prefill"
        elif seq > 1 and "extend" in ranges and ranges["extend"][1] <= past <= ranges["extend"][2]:
            role = "extend"
        n = max(1, min(seq, ranges[role][0]))
        steps.append((role, n))
        past += n
        seq -= n
    return steps


# --------------------------------------------------------------------------------------------
# Runners (need tensorrt + polygraphy + a GPU)


def _np_dtype(trt, dt) -> np.dtype:
    return np.dtype(trt.nptype(dt))


def _dims(d) -> tuple[int, ...]:
    return tuple(int(x) for x in d)


class TrtRunner(Runner):
    """One engine, one execution context, one CUDA stream.

    Device buffers are allocated once per input at the largest shape the engine's profiles allow and
    reused for every call (an array's size is its capacity; each call binds the first elements), so a
    call never frees and reallocates device memory (a ``cudaFree`` synchronizes the whole device)."""

    def __init__(self, engine_path, name: str, version_compatible: bool = False,
                 profiles: list[str] | tuple[str, ...] | None = None) -> None:
        super().__init__(name)
        self.engine_path = engine_path
        self.version_compatible = version_compatible
        self.profile_names = list(profiles or [name])
        self.engine = self.context = self.stream = None
        self._buffers: dict[str, Any] = {}
        self._capacity: dict[str, int] = {}   # elements each buffer in _buffers holds
        self._profile = 0                     # the context's optimization profile

    # -- lifecycle ------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        from .trt_library import engine_loaders, library_for_engine  # TensorRT or TensorRT-RTX, per manifest entry

        trt = library_for_engine(self.engine_path)
        from polygraphy import cuda
        engine_from_bytes, get_trt_logger = engine_loaders(trt)
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
        # None when the activation memory (the engine's device memory) cannot be allocated
        self.context = self.engine.create_execution_context()
        if self.context is None:
            need = getattr(self.engine, "device_memory_size", None)
            self.engine = None
            raise BackendError(
                f"TensorRT could not create an execution context for {self.engine_path}: out of device memory"
                + (f" (the engine needs {int(need) / 2**20:.0f} MiB for activations)" if need else "")
                + "; close other GPU programs, or rebuild with a smaller --max-context/--max-input-len/--max-tiles")
        self._profile = 0
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _np_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def deactivate_impl(self) -> None:
        for b in self._buffers.values():
            b.free()
        self._buffers, self._capacity = {}, {}
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

    # -- profiles -------------------------------------------------------------------------------
    def profile_range(self, name: str, profile: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shape of input ``name`` in optimization profile ``profile``."""
        lo, opt, hi = self.engine.get_tensor_profile_shape(name, profile)
        return _dims(lo), _dims(opt), _dims(hi)

    def _profile_label(self, profile: int) -> str:
        return f"{profile} ({self.profile_names[profile]!r})" if profile < len(self.profile_names) else str(profile)

    def _max_elements(self, name: str) -> int:
        """Elements of input ``name`` at the largest shape any profile allows (its static shape if it has one)."""
        shape = _dims(self.engine.get_tensor_shape(name))
        if all(d >= 0 for d in shape):
            return int(np.prod(shape))
        return max(int(np.prod(self.profile_range(name, p)[2])) for p in range(self.engine.num_optimization_profiles))

    # -- binding --------------------------------------------------------------------------------
    def _device(self, key: str, elements: int, dtype):
        """The device buffer ``key`` holding at least ``elements`` (allocated once, grown only if it must)."""
        from polygraphy import cuda

        elements = max(1, int(elements))  # empty tensors still get a valid address
        buf = self._buffers.get(key)
        if buf is None or self._capacity[key] < elements:
            if buf is not None:
                buf.free()
            buf = self._buffers[key] = cuda.DeviceArray(shape=(elements,), dtype=dtype)
            self._capacity[key] = elements
        return buf

    def _host(self, name: str, value) -> np.ndarray:
        arr = np.ascontiguousarray(np.asarray(value))
        want = self.dtypes[name]
        if arr.dtype != want:
            if arr.dtype.kind != want.kind and not (arr.dtype.kind in "iu" and want.kind in "iu"):
                raise BackendError(f"input {name!r} has dtype {arr.dtype}; the engine expects {want}")
            arr = np.ascontiguousarray(arr.astype(want))  # e.g. int64 -> int32 on TensorRT 8.6
        return arr

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        shape = tuple(int(d) for d in shape)
        if not self.context.set_input_shape(name, shape):
            lo, _, hi = self.profile_range(name, self._profile)
            raise BackendError(
                f"the {self.name} engine does not take input {name!r} of shape {list(shape)}: its optimization "
                f"profile {self._profile_label(self._profile)} allows {list(lo)} to {list(hi)} "
                f"({self.engine_path}); rebuild with 'flashvl build' for larger limits")

    def _set_address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise BackendError(f"TensorRT refused the device address of {name!r} for the {self.name} engine")

    def _bind_input(self, name: str, value) -> None:
        arr = self._host(name, value)
        self._set_shape(name, arr.shape)  # refused before anything is uploaded
        if name not in self._buffers:
            self._device(name, self._max_elements(name), arr.dtype)
        buf = self._device(name, arr.size, arr.dtype)
        buf.copy_from(arr, stream=self.stream)
        self._set_address(name, buf.ptr)

    def _bind_output(self, name: str):
        shape = _dims(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendError(f"TensorRT could not infer the shape of output {name!r} of the {self.name} "
                               f"engine ({list(shape)}) from the input shapes")
        buf = self._device(name, int(np.prod(shape)), self.dtypes[name])
        self._set_address(name, buf.ptr)
        return buf, shape

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.ptr):
            raise BackendError(f"TensorRT execution failed for {self.engine_path}")

    def _fetch(self, name: str, buf, shape) -> np.ndarray:
        # the dtype the runner read from the engine: a Polygraphy DeviceView's own ``dtype`` is deprecated
        # (0.49-0.54 print a warning on every read) and becomes a Polygraphy DataType after that
        host = np.empty(shape, dtype=self.dtypes[name])
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
        out = {n: self._fetch(n, buf, shape) for n, (buf, shape) in bound.items()}
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


class TrtBatchKVCache(BatchKVCache):
    """Rows of sequences in two device buffer sets of [max_batch, kv, max_context, head_dim] elements;
    the current cache is written contiguously as [rows, kv, total, head_dim] at the start of ``slot``'s."""

    def __init__(self) -> None:
        super().__init__()
        self.slot = 0
        self.buffers: dict[tuple[str, int], Any] = {}

    free = TrtKVCache.free
    __del__ = TrtKVCache.__del__


class TrtDecoder(TrtRunner, DecoderRunner):
    """The LLM engine: profile choice per call, KV ping-pong between two device buffer sets.

    Batched decode (the step core's running rows) keeps the batch's KV on the device as well and runs
    one engine execution per step for every row (per-row attention mask and positions); rows join and
    leave through a host copy of the batch (rare next to steps). It needs an engine built for more than
    one row (``flashvl build --max-batch``); with ``max_batch`` 1 the core runs requests one at a time.
    """

    def __init__(self, engine_path, profiles: list[str], max_context: int, max_input_len: int,
                 version_compatible: bool = False) -> None:
        super().__init__(engine_path, "llm", version_compatible, profiles)
        self.profile_index = {name: i for i, name in enumerate(profiles)}
        if not {"prefill", "decode"} <= set(self.profile_index) or set(self.profile_index) - set(LLM_PROFILES):
            raise BackendError(f"the LLM engine entry records profiles {list(profiles)}, expected prefill and "
                               "decode (and extend); rebuild it")
        self.max_context = int(max_context)
        self.max_input_len = int(max_input_len)
        self._mask = None

    def activate_impl(self) -> None:
        super().activate_impl()
        self.past_names = [n for n in self.inputs if n.startswith(PAST_PREFIX)]
        self.present_of = {p: PRESENT_PREFIX + p[len(PAST_PREFIX):] for p in self.past_names}
        if not self.past_names or set(self.present_of.values()) - set(self.outputs) or "logits" not in self.outputs:
            raise BackendError(f"{self.engine_path} does not have the LLM graph interface; rebuild the engines")
        # [batch, kv_heads, past, head_dim]: kv_heads and head_dim are static in the engine
        self.kv_dims = {p: tuple(self.engine.get_tensor_shape(p)) for p in self.past_names}
        # what each profile takes, read from the engine: (largest seq, smallest past, largest past)
        self.profile_ranges = {}
        for role, idx in self.profile_index.items():
            seq_hi = self.profile_range("inputs_embeds", idx)[2][1]
            past_lo, _, past_hi = (d[2] for d in self.profile_range(self.past_names[0], idx))
            self.profile_ranges[role] = (seq_hi, past_lo, past_hi)
        # the mask is all ones (one unpadded sequence): uploaded once at its largest shape, every call binds
        # its first ``total`` elements
        n = self._max_elements("attention_mask")
        self._mask = self._device("attention_mask", n, self.dtypes["attention_mask"])
        self._mask.copy_from(np.ones(n, self.dtypes["attention_mask"]), stream=self.stream)
        self.stream.synchronize()

    def deactivate_impl(self) -> None:
        super().deactivate_impl()
        self._mask = None

    @property
    def embeds_dtype(self) -> np.dtype:
        return self.dtypes["inputs_embeds"]

    def new_cache(self) -> TrtKVCache:
        return TrtKVCache()

    def _kv(self, cache: "TrtKVCache | TrtBatchKVCache", name: str, slot: int, rows: int = 1):
        """Slot ``slot``'s device buffer of past ``name``, room for ``rows`` rows (allocated on first use)."""
        from polygraphy import cuda

        key = (name, slot)
        if key not in cache.buffers:
            _, kv_heads, _, head_dim = self.kv_dims[name]
            cache.buffers[key] = cuda.DeviceArray(shape=(rows, kv_heads, self.max_context, head_dim),
                                                  dtype=self.dtypes[name])
        return cache.buffers[key]

    # -- batched decode -------------------------------------------------------------------------
    @property
    def supports_batching(self) -> bool:
        return self.limits is not None and self.limits.max_batch > 1

    def new_batch(self) -> TrtBatchKVCache:
        return TrtBatchKVCache()

    def _batch_kv(self, batch: TrtBatchKVCache, name: str, slot: int):
        return self._kv(batch, name, slot, self.limits.max_batch)

    def _download(self, buf, shape: tuple[int, ...], name: str) -> np.ndarray:
        host = np.empty(shape, dtype=self.dtypes[name])
        if host.size:
            buf.view(shape).copy_to(host, stream=self.stream)
        return host

    def _batch_arrays(self, batch: TrtBatchKVCache) -> list[np.ndarray]:
        out = []
        for p in self.past_names:
            _, kv_heads, _, head_dim = self.kv_dims[p]
            out.append(self._download(self._batch_kv(batch, p, batch.slot), (batch.rows, kv_heads, batch.total, head_dim), p))
        self.stream.synchronize()
        return out

    def _upload(self, buf, array: np.ndarray) -> None:
        if array.size:
            buf.copy_from(np.ascontiguousarray(array), stream=self.stream)

    def _set_batch(self, batch: TrtBatchKVCache, arrays: list[np.ndarray], lengths: list[int], total: int) -> None:
        for p, a in zip(self.past_names, arrays):
            self._upload(self._batch_kv(batch, p, batch.slot), a)
        self.stream.synchronize()
        batch.lengths, batch.total = list(lengths), total

    def batch_add(self, batch: TrtBatchKVCache, cache: TrtKVCache) -> None:
        if batch.rows >= self.limits.max_batch:
            raise BackendError(f"the llm engine was built for at most {self.limits.max_batch} rows")
        old = self._batch_arrays(batch) if batch.rows else [None] * len(self.past_names)
        total = max(batch.total, cache.length)
        merged = []
        for p, o in zip(self.past_names, old):
            _, kv_heads, _, head_dim = self.kv_dims[p]
            new = self._download(self._kv(cache, p, cache.slot), (1, kv_heads, cache.length, head_dim), p)
            new = np.pad(new, ((0, 0), (0, 0), (total - cache.length, 0), (0, 0)))
            merged.append(new if o is None else
                          np.concatenate([np.pad(o, ((0, 0), (0, 0), (total - batch.total, 0), (0, 0))), new]))
        self.stream.synchronize()
        self._set_batch(batch, merged, batch.lengths + [cache.length], total)

    def batch_keep(self, batch: TrtBatchKVCache, rows: list[int]) -> None:
        if rows == list(range(batch.rows)):
            return
        lengths = [batch.lengths[i] for i in rows]
        total = max(lengths, default=0)
        kept = [a[np.asarray(rows, np.int64)][:, :, batch.total - total:, :] for a in self._batch_arrays(batch)] \
            if rows else []
        self._set_batch(batch, kept, lengths, total)

    def batch_take(self, batch: TrtBatchKVCache, row: int, into: TrtKVCache) -> None:
        length = batch.lengths[row]
        for p, a in zip(self.past_names, self._batch_arrays(batch)):
            self._upload(self._kv(into, p, into.slot), a[row:row + 1, :, batch.total - length:, :])
        self.stream.synchronize()
        into.length = length

    def forward_batch(self, inputs_embeds: np.ndarray, batch: TrtBatchKVCache) -> np.ndarray:
        if not self.is_active:
            raise BackendError("runner 'llm' is not active; call activate() first")
        rows = inputs_embeds.shape[0]
        if rows != batch.rows or inputs_embeds.shape[1] != 1:
            raise BackendError(f"forward_batch takes one token per row: got {list(inputs_embeds.shape[:2])} "
                               f"for {batch.rows} rows")
        if batch.total + 1 > self.max_context:
            raise BackendError(f"context of {batch.total + 1} tokens exceeds the engines' max_context "
                               f"{self.max_context}; rebuild with a larger --max-context")
        self._set_profile("decode")
        self._bind_input("inputs_embeds", inputs_embeds)
        # the rows' own mask, in a buffer of its own: "attention_mask"'s buffer holds the all-ones mask
        # single sequences bind without uploading
        mask = self._host("attention_mask", batch.attention_mask(1))
        self._set_shape("attention_mask", mask.shape)
        mask_buf = self._device("attention_mask.rows", self._max_elements("attention_mask"), mask.dtype)
        mask_buf.copy_from(mask, stream=self.stream)
        self._set_address("attention_mask", mask_buf.ptr)
        self._bind_input("position_ids", batch.position_ids())
        logits = self._run_on_kv(batch, rows, batch.total, rows)
        batch.lengths = [n + 1 for n in batch.lengths]
        batch.total += 1
        return logits[:, -1].astype(np.float32, copy=False)

    def _run_on_kv(self, cache: "TrtKVCache | TrtBatchKVCache", rows: int, past: int, size: int) -> np.ndarray:
        """Bind the current slot's KV ([rows, kv, past, hd], written contiguously at the start of the slot's
        buffer) as the past and the other slot as the present, run once, swap the slots: the logits."""
        read, write = cache.slot, 1 - cache.slot
        capacity = self.limits.max_batch if isinstance(cache, TrtBatchKVCache) else 1
        for p in self.past_names:
            _, kv_heads, _, head_dim = self.kv_dims[p]
            self._set_shape(p, (rows, kv_heads, past, head_dim))
            self._set_address(p, self._kv(cache, p, read, capacity).ptr)
            self._set_address(self.present_of[p], self._kv(cache, p, write, capacity).ptr)
        logits_buf, logits_shape = self._bind_output("logits")
        # timed as TrtRunner.infer_impl: execution + logits copy; the bindings above are host overhead.
        # A multi-token later turn is one engine execution (and one timed call) per profile step.
        start = perf_counter()
        self._execute()
        logits = self._fetch("logits", logits_buf, logits_shape)
        self.stream.synchronize()
        self._timed(start, size)
        cache.slot = write
        return logits

    def _set_profile(self, role: str) -> None:
        idx = self.profile_index[role]
        if self._profile != idx:
            if not self.context.set_optimization_profile_async(idx, self.stream.ptr):
                raise BackendError(f"TensorRT could not switch the llm engine to optimization profile "
                                   f"{self._profile_label(idx)} ({self.engine_path})")
            self._profile = idx

    def forward(self, inputs_embeds: np.ndarray, cache: TrtKVCache) -> np.ndarray:
        if not self.is_active:
            raise BackendError("runner 'llm' is not active; call activate() first")
        seq = inputs_embeds.shape[1]
        if cache.length + seq > self.max_context:
            raise BackendError(f"context of {cache.length + seq} tokens exceeds the engines' max_context "
                               f"{self.max_context}; rebuild with a larger --max-context")
        logits, pos = None, 0
        for role, n in profile_steps(cache.length, seq, self.profile_ranges):
            logits = self._step(inputs_embeds[:, pos:pos + n], cache, role)
            pos += n
        return logits

    def _step(self, embeds: np.ndarray, cache: TrtKVCache, role: str) -> np.ndarray:
        self._set_profile(role)
        seq = embeds.shape[1]
        past, total = cache.length, cache.length + seq
        self._bind_input("inputs_embeds", embeds)
        self._set_shape("attention_mask", (1, total))
        self._set_address("attention_mask", self._mask.ptr)
        self._bind_input("position_ids", np.arange(past, total, dtype=np.int64)[None, :])
        logits = self._run_on_kv(cache, 1, past, seq)
        cache.length = total
        return logits[0, -1].astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Backend entry points (see runtime/backends/__init__.py)


def _engine_set(bundle) -> EngineEntry:
    from .trt_library import rtx_engine_entry  # a TensorRT-RTX entry that runs here, or its one-line reason

    if (rtx_entry := rtx_engine_entry(bundle.manifest)) is not None:
        return rtx_entry
    require_tensorrt()
    _, entry = select_engine(bundle.manifest, gpu_info(), trt_version())
    return entry


def open_vision(bundle, device: str = "auto", threads: int | None = None, **_options) -> TrtRunner:
    """The vision engine (``device``/``threads`` are ONNX Runtime options; TensorRT uses GPU 0)."""
    entry = _engine_set(bundle)
    g = entry.graphs["vision"]
    runner = TrtRunner(bundle.path(g.file), "vision", entry.version_compatible, list(g.profiles))
    runner.limits = entry.limits  # the pipeline plans images within the tiles the engine was built for
    return runner.activate()


def open_llm(bundle, device: str = "auto", threads: int | None = None, **_options) -> TrtDecoder:
    entry = _engine_set(bundle)
    g = entry.graphs["llm"]
    runner = TrtDecoder(bundle.path(g.file), list(g.profiles), entry.limits.max_context,
                        entry.limits.max_input_len, entry.version_compatible)
    runner.limits = entry.limits  # the pipeline refuses prompts longer than the engine's context up front
    return runner.activate()
