"""Which TensorRT library runs an engine set: TensorRT or TensorRT-RTX, chosen from the manifest's engine entry.

``flashvl build --library tensorrt`` (the default) writes engines for TensorRT 8.6/10 (JetPack on Jetson,
NVIDIA's index on x86); ``--library tensorrt-rtx`` writes engines for NVIDIA TensorRT for RTX (the
``tensorrt-rtx`` extra: the ``tensorrt-rtx-cu12-libs`` and ``tensorrt-rtx-cu12-bindings`` wheels, import name
``tensorrt_rtx_bindings``), which builds ahead of time without a GPU and runs on GeForce / RTX workstation GPUs
of the compute capabilities the engine was built for. Both libraries have the same Python API (Runtime,
ICudaEngine, IExecutionContext, execute_async_v3), so the runners in ``trt.py`` are shared; only the module
they use differs.

An engine entry names its library in ``builder.library`` (an entry without it is TensorRT's), the
library's version in ``trt_version`` and, for TensorRT-RTX, its target compute capabilities in
``builder.compute_capabilities``. Every function here that cannot give what is asked raises a one-line
:class:`BackendError`: the library is not installed, no GPU is visible, or this GPU is not one the
engines were built for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..contract import EngineEntry, Manifest
from ..errors import BackendError, EngineMismatchError

TENSORRT, TENSORRT_RTX = "tensorrt", "tensorrt-rtx"
LIBRARIES = (TENSORRT, TENSORRT_RTX)
LABELS = {TENSORRT: "TensorRT", TENSORRT_RTX: "TensorRT-RTX"}
RTX_MODULE = "tensorrt_rtx_bindings"
# the wheels that carry the bindings (the tensorrt-rtx / tensorrt-rtx-cu12 metapackages are source
# distributions that download from elsewhere: not used)
RTX_DISTRIBUTIONS = ("tensorrt-rtx-cu12-bindings", "tensorrt-rtx-cu13-bindings")
# the compute capabilities TensorRT-RTX 1.7 can target (its ComputeCapability enum: SM75 ... SM121)
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
# what an engine targets when none is asked for: "compute capability 8.0, 8.6, 8.9, 12.0, and later"
# (TensorRT-RTX docs, CPU-Only AOT); Turing (7.5) only on request, as the library does
RTX_DEFAULT_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0", "12.1")
RTX_INSTALL_HINT = ("TensorRT-RTX is not installed: pip install 'flashvl-edge[tensorrt-rtx]' (NVIDIA's "
                    "tensorrt-rtx-cu12-libs and tensorrt-rtx-cu12-bindings wheels)")

_UNSET: Any = object()


def entry_library(entry: EngineEntry) -> str:
    """The library an engine entry was built with (entries written before TensorRT-RTX are TensorRT's)."""
    return str((entry.builder or {}).get("library") or TENSORRT)


def entry_compute_capabilities(entry: EngineEntry) -> tuple[str, ...]:
    ccs = (entry.builder or {}).get("compute_capabilities")
    if ccs:
        return tuple(str(c) for c in ccs)
    return tuple(c for c in (entry.compute_capability or "").split(",") if c)


def import_library(name: str):
    """The imported Python module of library ``name``, or the one-line install hint."""
    if name == TENSORRT:
        from .trt import require_tensorrt

        return require_tensorrt()
    if name == TENSORRT_RTX:
        try:
            import tensorrt_rtx_bindings as trt_rtx  # noqa: PLC0415
        except Exception:
            raise BackendError(RTX_INSTALL_HINT) from None
        return trt_rtx
    raise BackendError(f"the engines were built with {name!r}, which this flashvl-edge does not know "
                       f"(known: {', '.join(LIBRARIES)}); upgrade flashvl-edge or rebuild the engines")


def library_version(name: str, import_module: bool = True) -> str | None:
    """The installed version of library ``name`` (None when it is not installed). ``import_module=False``
    reads package metadata only: no CUDA library is loaded (``flashvl build --dry-run``, ``flashvl doctor``)."""
    if name == TENSORRT:
        from .trt import trt_version

        return trt_version(import_module)
    if name != TENSORRT_RTX:
        return None
    if import_module:
        try:
            return str(import_library(name).__version__)
        except BackendError:
            return None
    from importlib import metadata

    for dist in RTX_DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def rtx_mismatch(entry: EngineEntry, gpu, version: str | None) -> str | None:
    """Why the TensorRT-RTX engine set ``entry`` cannot run here (one line naming both sides), or None.

    TensorRT-RTX engines need the TensorRT-RTX version that built them and a GPU of one of the compute
    capabilities they were built for; they are not tied to the GPU model or the operating system."""
    ccs = entry_compute_capabilities(entry)
    built = (f"engines built with TensorRT-RTX {entry.trt_version} for compute capability "
             f"{', '.join(ccs) or 'unrecorded'}")
    if version is None:
        return f"{built}; {RTX_INSTALL_HINT}"
    if gpu is None:
        return (f"{built} need an NVIDIA GPU of one of those compute capabilities (GeForce / RTX class); "
                "no NVIDIA GPU is visible on this machine")
    if gpu.compute_capability not in ccs:
        here = f"this machine's {gpu.name} is compute capability {gpu.compute_capability}"
        if gpu.compute_capability in RTX_COMPUTE_CAPABILITIES:
            return (f"{built}; {here}: rebuild with 'flashvl build BUNDLE --library tensorrt-rtx "
                    f"--compute-capability {gpu.compute_capability}'")
        return (f"{built}; {here}, which TensorRT-RTX does not support: build TensorRT engines with "
                "'flashvl build BUNDLE' (the default --library tensorrt)")
    if version != entry.trt_version:
        return (f"{built}; this machine has TensorRT-RTX {version}: rebuild with 'flashvl build BUNDLE "
                "--library tensorrt-rtx'")
    return None


def library_for_entry(entry: EngineEntry, gpu=_UNSET):
    """The imported library module for the manifest engine entry ``entry``.

    For a TensorRT-RTX entry this also checks that it runs here (library version, a GPU of one of its
    compute capabilities) and raises a one-line error otherwise; a TensorRT entry's device checks are
    ``trt.select_engine``'s. ``gpu``: a :class:`~.trt.GpuInfo` or None (default: GPU 0 of this machine)."""
    name = entry_library(entry)
    if name != TENSORRT_RTX:
        return import_library(name)
    if gpu is _UNSET:
        from .trt import gpu_info

        gpu = gpu_info()
    module = import_library(name)
    why = rtx_mismatch(entry, gpu, str(getattr(module, "__version__", "")) or None)
    if why:
        raise EngineMismatchError(why)
    return module


def rtx_engine_entry(manifest: Manifest, gpu=_UNSET) -> EngineEntry | None:
    """The manifest's TensorRT-RTX engine entry that runs here.

    None when the manifest has no TensorRT-RTX entry, or also has TensorRT entries and no TensorRT-RTX one
    runs here (TensorRT's own selection decides then); when it has TensorRT-RTX entries only and none runs
    here, the one-line reason (library missing, no GPU, another compute capability or version)."""
    rtx = [e for e in manifest.engines.values() if entry_library(e) == TENSORRT_RTX]
    if not rtx:
        return None
    reasons = []
    for entry in rtx:
        try:
            library_for_entry(entry, gpu)
            return entry
        except BackendError as e:
            reasons.append(str(e))
    if len(rtx) < len(manifest.engines):
        return None
    if len(reasons) == 1:
        raise (EngineMismatchError if "not installed" not in reasons[0] else BackendError)(reasons[0])
    raise EngineMismatchError(f"none of the {len(reasons)} TensorRT-RTX engine sets runs here: " + "; ".join(reasons))


def library_for_engine(engine_path):
    """The library module for an engine file, from the manifest entry of the engine set it belongs to
    (``BUNDLE/engines/<name>/<build-id>/<graph>.engine``, entry read from ``BUNDLE/manifest.json``).
    A file outside a bundle's engine sets is TensorRT's."""
    path = Path(engine_path).resolve()
    name = TENSORRT
    if len(path.parents) > 3 and path.parents[2].name == "engines":
        root = path.parents[3]
        try:
            data = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        rel = path.parent.relative_to(root).as_posix()
        for entry in (data.get("engines") or {}).values():
            if isinstance(entry, dict) and entry.get("dir") == rel:
                name = str((entry.get("builder") or {}).get("library") or TENSORRT)
                break
    return import_library(name)


_RTX_LOGGERS: dict[int, Any] = {}


def engine_loaders(trt):
    """``(engine_from_bytes(data, runtime=...), get_trt_logger())`` for the library module ``trt``.

    TensorRT: Polygraphy's. TensorRT-RTX: Polygraphy drives it only under a process-wide switch
    (``POLYGRAPHY_USE_TENSORRT_RTX``, read once at import) and under another module name, so its engines are
    deserialized with the library's own ``Runtime.deserialize_cuda_engine`` and a logger of that library;
    a plan it cannot load gives None, as Polygraphy's loader failing does."""
    if getattr(trt, "__name__", TENSORRT) != RTX_MODULE:
        from polygraphy.backend.trt import engine_from_bytes, get_trt_logger

        return engine_from_bytes, get_trt_logger

    def engine_from_bytes_rtx(data, runtime=None):
        runtime = runtime or trt.Runtime(get_logger_rtx())
        return runtime.deserialize_cuda_engine(data)

    def get_logger_rtx():
        if id(trt) not in _RTX_LOGGERS:
            _RTX_LOGGERS[id(trt)] = trt.Logger(trt.Logger.WARNING)
        return _RTX_LOGGERS[id(trt)]

    return engine_from_bytes_rtx, get_logger_rtx
