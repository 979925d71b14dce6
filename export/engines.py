"""``flashvl build``: TensorRT engines for a bundle, through Polygraphy's loaders.

    flashvl build BUNDLE --precision fp16|int8|best [--max-batch B] [--max-input-len L] [--max-context C]
                  [--max-tiles N] [--timing-cache PATH] [--opt-level 0-5] [--hardware-compat ampere+]
                  [--version-compatible] [--workspace-gb G] [--dry-run]

Everything up to the TensorRT call is plain Python and runs on CPU (CI checks it): the optimization
profiles are derived from the manifest's declared graph inputs (:func:`graph_profiles`), the builder
configuration from the options and the bundle (:func:`plan_build`), and every graph is linted against the
target TensorRT's ONNX parser first (:mod:`trt_support`). ``--dry-run`` prints all of it and never imports
``tensorrt``.

Profiles (dimension names from docs/architecture.md):

- vision: ``num_tiles`` 1..max_tiles.
- llm, three profiles on one engine, chosen per call from the shapes (runtime/backends/trt.py
  ``profile_steps``): **prefill** (``seq`` 1..max_input_len, ``past`` 0, ``total`` = seq), **decode**
  (``seq`` 1, ``past`` 1..max_context-1, ``total`` = past+1 up to max_context) and **extend** (``seq``
  1..E on a cache, ``past`` 0..max_context-E, E = min(max_input_len, 256, max_context / 2)): a later turn
  of a session, a prefix reused from a cache, a sequence joining a batch, or the rest of a prompt longer
  than max_input_len; runs longer than E go in E-token chunks.
  ``past`` = 0 is expressed as min = opt = max = 0: TensorRT accepts zero-length dimensions in profiles
  and empty input tensors (the runtime still binds a valid 1-element address for them). Prefill and
  decode stay separate so their kernels are tuned for an empty cache and for seq = 1. Each profile's
  min, opt and max are each a shape the graph can take (``total`` = ``past`` + ``seq``), which is why
  extend's past stops at max_context - E: past that, new tokens go one at a time (decode).

Precision: fp16 builds an FP16 engine. An fp16 bundle builds as a strongly typed network on TensorRT >= 10:
the graph's types are the engine's, so the casts that keep rotary angles and RMSNorm statistics in fp32
are obeyed. Otherwise (an fp32 bundle, or TensorRT 8.6) the network is weakly typed with the FP16 flag, and
those layers (``trt_support.fp32_layers``) are pinned to FP32 with precision constraints ("obey"); the
KV cache inputs/outputs are set to fp16 so the cache is the size ``flashvl doctor`` budgets. A quantized
(QDQ) bundle builds as explicit quantization: strongly typed on TensorRT >= 10 when the graph is already
fp16 or its LLM is INT4, otherwise weakly typed with INT8 + FP16 enabled so the Q/DQ nodes decide what
runs in INT8 and the rest runs in FP16 (with the same fp32 pins and fp16 KV). ``int8`` on an
unquantized bundle is refused (TensorRT's implicit calibration is deprecated): run ``flashvl calibrate``
first.

The build serializes each engine straight to its file (``engine_bytes_from_network`` + ``save_bytes``):
the plan is never deserialized in the builder's process, which on Jetson's shared memory would be one
more copy of the weights at the peak. TensorRT's own error messages are captured with an error recorder
on the builder, so an out-of-memory build is reported as one.

The real build writes ``BUNDLE/engines/<gpu>_sm<cc>_trt<version>/<build-id>/`` through a staging directory
renamed at the end (a failed or out-of-memory build leaves nothing where the runtime looks); only the
manifest's atomic rewrite (``finalize_manifest``) publishes it, so a kill at any instant leaves the manifest
naming a complete, hash-checked engine set. The previous build of the same name is removed afterwards. The timing cache is shared across builds (per GPU + TensorRT
version, in the user cache directory unless ``--timing-cache`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from flashvl_edge.runtime.backends.trt import LLM_PROFILES, engine_kv_dtype, parse_version
from flashvl_edge.runtime.bundle import Bundle, finalize_manifest, staging_dir
from flashvl_edge.runtime.contract import (PAST_PREFIX, PRESENT_PREFIX, EngineEntry, EngineGraph, EngineLimits,
                                           Manifest, TensorSpec)
from flashvl_edge.runtime.errors import BackendError, BundleError, ExportError

PRECISIONS = ("fp16", "int8", "best")
DEFAULT_WORKSPACE_GB = 4.0
# the profiles' "opt" point: a typical 4:3 photo (tiled by the runtime's own grid choice) plus a short question
TYPICAL_IMAGE_SIZE = (1024, 768)
TYPICAL_TEXT_TOKENS = 64
# the extend profile's largest seq (see _dim_ranges)
EXTEND_MAX_SEQ = 256


# --------------------------------------------------------------------------------------------
# Profiles (pure; from the manifest)


def default_limits(manifest: Manifest, max_batch: int | None = None, max_input_len: int | None = None,
                   max_context: int | None = None, max_tiles: int | None = None) -> EngineLimits:
    """Limits from the manifest unless overridden; checked for consistency (one clear line each).
    ``max_tiles`` counts crop tiles, as the manifest's preprocess.max_tiles does; the vision profile adds
    the thumbnail that preprocessing adds to a multi-tile grid."""
    pre = manifest.preprocess
    tiles = int(pre.max_tiles if max_tiles is None else max_tiles)
    ctx = int(max_context or manifest.max_context)
    batch = int(max_batch or 1)
    if tiles < 1 or batch < 1:
        raise ExportError("--max-tiles and --max-batch must be at least 1")
    if tiles > pre.max_tiles:
        raise ExportError(f"--max-tiles {tiles} exceeds the bundle's tile budget ({pre.max_tiles}): preprocessing "
                          "never makes more; re-export with a larger --max-tiles")
    if tiles < pre.min_tiles:
        raise ExportError(f"--max-tiles {tiles} is below the bundle's min_tiles {pre.min_tiles}")
    inp = int(max_input_len or min(ctx, pre.vision_batch(tiles) * manifest.image.tokens_per_tile + 256))
    if ctx < 2:
        raise ExportError("--max-context must be at least 2 (one prompt token and one generated token)")
    if ctx > manifest.llm.max_position_embeddings:
        raise ExportError(f"--max-context {ctx} exceeds the model's max_position_embeddings "
                          f"{manifest.llm.max_position_embeddings}")
    if not 1 <= inp <= ctx:
        raise ExportError(f"--max-input-len {inp} must be between 1 and --max-context {ctx}")
    return EngineLimits(batch, inp, ctx, tiles)


def _dim_ranges(limits: EngineLimits, manifest: Manifest) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of every named dimension, per profile."""
    from flashvl_edge.runtime.images import image_to_tokens_plan

    typical = image_to_tokens_plan(*TYPICAL_IMAGE_SIZE, manifest, max_tiles=limits.max_tiles)
    vision_batch = manifest.preprocess.vision_batch(limits.max_tiles)
    opt_tiles = min(vision_batch, typical.num_tiles)
    opt_seq = min(limits.max_input_len, typical.n_image_tokens + TYPICAL_TEXT_TOKENS)
    c = limits.max_context
    opt_past = max(1, min(c - 1, opt_seq + 128))
    batch = (1, 1, limits.max_batch)
    # extend: its max is (past c - E, seq E, total c). What lands on a cache is mostly short (a follow-up
    # question, the rest of a prompt after a cached prefix) on a long past (a first turn with a tiled image
    # is thousands of tokens), so E is capped: longer runs go in E-token chunks, and past reaches c - E.
    ext_seq = max(1, min(limits.max_input_len, EXTEND_MAX_SEQ, c // 2))
    ext_past_max = c - ext_seq
    ext_opt_seq = min(ext_seq, TYPICAL_TEXT_TOKENS)
    ext_opt_past = max(0, min(ext_past_max, opt_past, c - ext_opt_seq))
    return {
        "vision": {"num_tiles": (1, opt_tiles, vision_batch)},
        "prefill": {"batch": batch, "seq": (1, opt_seq, limits.max_input_len), "past": (0, 0, 0),
                    "total": (1, opt_seq, limits.max_input_len)},
        "decode": {"batch": batch, "seq": (1, 1, 1), "past": (1, opt_past, c - 1), "total": (2, opt_past + 1, c)},
        "extend": {"batch": batch, "seq": (1, ext_opt_seq, ext_seq), "past": (0, ext_opt_past, ext_past_max),
                   "total": (1, ext_opt_past + ext_opt_seq, c)},
    }


def _profile(name: str, inputs: Sequence[TensorSpec], ranges: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    shapes = {}
    for inp in inputs:
        mn, opt, mx = [], [], []
        for d in inp.shape:
            if isinstance(d, int):
                lo = hi = o = d
            elif d in ranges:
                lo, o, hi = ranges[d]
            else:
                raise BundleError(f"input {inp.name!r} has dimension {d!r}, which the engine builder does not "
                                  f"know (known: {', '.join(sorted(ranges))}); re-export the bundle")
            mn.append(lo), opt.append(o), mx.append(hi)
        shapes[inp.name] = (tuple(mn), tuple(opt), tuple(mx))
    return {"name": name, "shapes": shapes}


def graph_profiles(manifest: Manifest, limits: EngineLimits) -> dict[str, list[dict[str, Any]]]:
    """``{"vision": [profile], "llm": [prefill, decode, extend]}``; each profile ``{"name", "shapes": {input:
    (min, opt, max)}}``. The LLM's profile order is the engine's profile index (0 stays prefill)."""
    ranges = _dim_ranges(limits, manifest)
    out = {"vision": [_profile("vision", manifest.graph("vision").inputs, ranges["vision"])]}
    out["llm"] = [_profile(role, manifest.graph("llm").inputs, ranges[role]) for role in LLM_PROFILES]
    return out


# --------------------------------------------------------------------------------------------
# Builder configuration (pure)


@dataclass
class BuildPlan:
    """Everything the build will do, printable without TensorRT."""

    bundle: str
    precision: str
    trt_target: str               # the TensorRT version the plan is for (installed one, or --trt-version)
    quantized: bool
    strongly_typed: bool
    fp16: bool
    int8: bool
    tf32: bool
    builder_optimization_level: int | None
    hardware_compatibility: str | None
    version_compatible: bool
    workspace_bytes: int
    timing_cache: str
    limits: EngineLimits
    profiles: dict[str, list[dict[str, Any]]]
    graphs: dict[str, str] = field(default_factory=dict)   # graph -> onnx file (relative to bundle)
    notes: list[str] = field(default_factory=list)
    # weakly typed fp16 builds: per graph, the layers pinned to FP32 ({"kind", "node", "tensor"}), obeyed
    # through precision constraints
    fp32_layers: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    precision_constraints: str | None = None
    # per graph, network I/O tensors whose type the build sets ({name: "float16"}): the KV cache
    io_dtypes: dict[str, dict[str, str]] = field(default_factory=dict)
    kv_dtype: str = "float16"   # the engine's past/present tensors, as built

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = {g: [{"name": p["name"], "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                                                             for k, v in p["shapes"].items()}} for p in ps]
                         for g, ps in self.profiles.items()}
        return d

    def polygraphy_command(self, graph: str, engine_out: str) -> str:
        """The equivalent ``polygraphy convert`` command line (for reproducing a build by hand)."""
        cmd = ["polygraphy", "convert", str(Path(self.bundle) / self.graphs[graph]), "-o", engine_out]
        if self.strongly_typed:
            cmd.append("--strongly-typed")
        else:
            cmd += ["--fp16"] if self.fp16 else []
            cmd += ["--int8"] if self.int8 else []
            cmd += ["--tf32"] if self.tf32 else []
        if self.precision_constraints and self.fp32_layers.get(graph):
            cmd += ["--precision-constraints", self.precision_constraints, "--layer-precisions"]
            cmd += [f"{layer['node']}:float32" for layer in self.fp32_layers[graph]]
        if self.io_dtypes.get(graph):
            cmd.append("--tensor-datatypes")
            cmd += [f"{name}:{dtype}" for name, dtype in self.io_dtypes[graph].items()]
        for which, key in (("min", 0), ("opt", 1), ("max", 2)):
            for p in self.profiles[graph]:
                cmd.append(f"--trt-{which}-shapes")
                cmd += [f"{n}:[{','.join(str(x) for x in s[key])}]" for n, s in p["shapes"].items()]
        if self.builder_optimization_level is not None:
            cmd += ["--builder-optimization-level", str(self.builder_optimization_level)]
        if self.hardware_compatibility:
            cmd += ["--hardware-compatibility-level", "ampere_plus"]
        if self.version_compatible:
            cmd.append("--version-compatible")
        cmd += ["--pool-limit", f"workspace:{self.workspace_bytes}"]
        cmd += ["--load-timing-cache", self.timing_cache, "--save-timing-cache", self.timing_cache]
        return " ".join(shlex.quote(c) for c in cmd)


def default_timing_cache(name: str) -> Path:
    base = os.environ.get("FLASHVL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashvl-edge")
    return Path(base) / "trt-timing" / f"{name}.cache"


def plan_build(bundle: Bundle, precision: str, trt_target: str, limits: EngineLimits, opt_level: int | None = None,
               hardware_compat: str | None = None, version_compatible: bool = False,
               workspace_gb: float = DEFAULT_WORKSPACE_GB, timing_cache: str | None = None,
               cache_name: str = "default") -> BuildPlan:
    m = bundle.manifest
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}")
    quant = m.quantization
    quantized = bool(quant and (quant.vision or quant.llm))
    if precision == "int8" and not quantized:
        raise ExportError("--precision int8 needs a calibrated (QDQ) bundle: run 'flashvl calibrate BUNDLE --out "
                          "BUNDLE_Q' first (TensorRT's implicit INT8 calibration is deprecated)")
    if precision == "fp16" and quantized:
        raise ExportError("the bundle is quantized (QDQ): build it with --precision int8 or best, or build the "
                          "unquantized bundle with --precision fp16")
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise ExportError("--opt-level must be between 0 and 5")
    if hardware_compat not in (None, "ampere+"):
        raise ExportError("--hardware-compat accepts only 'ampere+'")
    if workspace_gb <= 0:
        raise ExportError("--workspace-gb must be positive")
    target = parse_version(trt_target)[:2]
    trt10 = target >= (10, 0)
    if (hardware_compat or version_compatible) and target < (8, 6):
        raise ExportError("--hardware-compat and --version-compatible need TensorRT 8.6 or newer")
    # INT4 weight-only Q/DQ is built strongly typed (TensorRT 10's path for INT4); an fp16 QDQ graph too, since
    # its types are then exactly the engine's. An fp32 QDQ graph builds weakly typed with INT8+FP16 flags.
    int4 = bool(quant and quant.llm == "int4")
    if int4 and not trt10:
        raise ExportError("the bundle's LLM is INT4 (block-quantized DequantizeLinear), which needs TensorRT 10 "
                          f"(target {trt_target}); use JetPack 6.1+ or calibrate with --llm int8")
    # An fp16 graph builds strongly typed on TensorRT 10 (its fp32 casts for rotary angles and RMSNorm
    # statistics are then obeyed, and its KV tensors are fp16 already); so does INT4. Everything else is
    # weakly typed with the FP16 flag: those layers are pinned to FP32 and the KV I/O set to fp16.
    strongly = trt10 and (m.dtype == "fp16" or int4)
    notes = []
    if strongly and m.dtype != "fp16":
        notes.append("strongly typed on an fp32 graph: layers without Q/DQ run in FP32 and the KV cache is float32 "
                     "(twice the bytes); export with --dtype fp16 before calibrating for faster, smaller engines")
    llm_past = [t for t in m.graph("llm").inputs if t.name.startswith(PAST_PREFIX)]
    graph_kv = llm_past[0].dtype if llm_past else "float16"
    kv_dtype = engine_kv_dtype(graph_kv, strongly)
    io_dtypes: dict[str, dict[str, str]] = {}
    if kv_dtype != graph_kv:
        present = [t.name for t in m.graph("llm").outputs if t.name.startswith(PRESENT_PREFIX)]
        kv_io = [t.name for t in llm_past] + present
        io_dtypes["llm"] = {name: kv_dtype for name in kv_io}
    fp32_layers: dict[str, list[dict[str, str]]] = {}
    if not strongly:
        from .trt_support import fp32_layers_of

        fp32_layers = {g: [vars(layer) for layer in fp32_layers_of(bundle.graph_path(g))] for g in m.graphs}
        fp32_layers = {g: layers for g, layers in fp32_layers.items() if layers}
    return BuildPlan(
        bundle=str(bundle.root), precision=precision, trt_target=trt_target, quantized=quantized,
        strongly_typed=strongly, fp16=not strongly, int8=quantized and not strongly,
        tf32=not strongly, builder_optimization_level=opt_level, hardware_compatibility=hardware_compat,
        version_compatible=version_compatible, workspace_bytes=int(workspace_gb * (1 << 30)),
        timing_cache=str(timing_cache or default_timing_cache(cache_name)), limits=limits,
        profiles=graph_profiles(m, limits), graphs={g: e.file for g, e in m.graphs.items()}, notes=notes,
        fp32_layers=fp32_layers, precision_constraints="obey" if fp32_layers else None, io_dtypes=io_dtypes,
        kv_dtype=kv_dtype)


def lint_for_plan(bundle: Bundle, plan: BuildPlan) -> dict[str, list]:
    # needs the onnx package, which the 'tensorrt' extra installs; without it the command says so in one line
    from .trt_support import lint

    # lint() takes the graph's manifest entry as JSON (it also lints entries outside a loaded bundle)
    return {g: lint(bundle.graph_path(g), plan.trt_target, bundle.graph(g), plan.profiles.get(g))
            for g in plan.graphs}


def format_plan(plan: BuildPlan, engine_dir: str) -> str:
    """The dry-run report: builder configuration, every profile, the equivalent Polygraphy commands."""
    if plan.strongly_typed:
        types = "strongly typed network (precisions come from the graph's Q/DQ and tensor types)"
    else:
        flags = [f for f, on in (("FP16", plan.fp16), ("INT8", plan.int8), ("TF32", plan.tf32)) if on]
        types = ("explicit quantization (Q/DQ), " if plan.quantized else "") + "builder flags " + "+".join(flags)
    lines = [
        f"flashvl build plan for {plan.bundle}",
        f"  target TensorRT     {plan.trt_target}",
        f"  precision           {plan.precision}: {types}",
        f"  optimization level  {plan.builder_optimization_level if plan.builder_optimization_level is not None else 'TensorRT default (3)'}",
        f"  hardware compat     {plan.hardware_compatibility or 'none (this GPU only)'}",
        f"  version compatible  {'yes' if plan.version_compatible else 'no'}",
        f"  workspace limit     {plan.workspace_bytes} bytes ({plan.workspace_bytes / 2**30:g} GiB)",
        f"  timing cache        {plan.timing_cache}",
        f"  limits              batch<={plan.limits.max_batch} input_len<={plan.limits.max_input_len} "
        f"context<={plan.limits.max_context} tiles<={plan.limits.max_tiles}",
        f"  output              {engine_dir}/",
    ]
    if plan.strongly_typed:
        lines.append("  fp32 layers         the graph's own types: its casts keep rotary angles and RMSNorm "
                     "statistics in FP32")
    elif plan.fp32_layers:
        for g, layers in plan.fp32_layers.items():
            kinds: dict[str, int] = {}
            for layer in layers:
                kinds[layer["kind"]] = kinds.get(layer["kind"], 0) + 1
            lines.append(f"  fp32 layers         {g}: {len(layers)} layers pinned to FP32 (precision constraints "
                         f"{plan.precision_constraints}): " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    else:
        lines.append("  fp32 layers         none found to pin (no rotary embedding or normalization pattern)")
    kv_how = "set on the past/present I/O tensors" if plan.io_dtypes.get("llm") else "the graph's type"
    lines.append(f"  KV cache            {plan.kv_dtype} ({kv_how})")
    lines.append("  llm profile choice  per call, from the shapes: prefill when past = 0, decode when seq = 1, "
                 "extend for seq > 1 on a cache (longer runs in chunks)")
    lines += [f"  note                {n}" for n in plan.notes]
    for g, profs in plan.profiles.items():
        for i, p in enumerate(profs):
            lines.append(f"profile {g}[{i}] {p['name']}:")
            for name, (mn, opt, mx) in p["shapes"].items():
                fmt = lambda t: "[" + ",".join(str(x) for x in t) + "]"  # noqa: E731
                lines.append(f"  {name:28s} min {fmt(mn):18s} opt {fmt(opt):18s} max {fmt(mx)}")
    lines.append("equivalent Polygraphy commands:")
    for g in plan.graphs:
        lines.append("  " + plan.polygraphy_command(g, f"{engine_dir}/{g}.engine"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The real build (needs tensorrt + a GPU)


# How TensorRT words an out-of-memory build (its own messages: Polygraphy replaces a failed build with a
# fixed "Invalid Engine" text), e.g. "Requested amount of GPU memory (N bytes) could not be allocated",
# "Error Code 2: OutOfMemory (no further information)", "[virtualMemoryBuffer.cpp::resizePhysical] ...
# cudaErrorMemoryAllocation"
_OOM_HINTS = ("out of memory", "outofmemory", "insufficient memory", "could not be allocated",
              "cudaerrormemoryallocation", "failed to allocate", "memory allocation", "workspace")


def _error_recorder(trt):
    """An ``IErrorRecorder`` that keeps every error TensorRT reports (code and text) for the message.

    Set on the builder, it receives the errors of the network, the parser and the build: with it set,
    TensorRT reports errors to it rather than only to the logger."""

    class Recorder(trt.IErrorRecorder):
        def __init__(self) -> None:
            trt.IErrorRecorder.__init__(self)
            self.errors: list[tuple[Any, str]] = []

        def clear(self) -> None:
            self.errors = []

        def get_num_errors(self) -> int:
            return len(self.errors)

        def get_error_code(self, index: int):
            return self.errors[index][0]

        def get_error_desc(self, index: int) -> str:
            return self.errors[index][1]

        def has_overflowed(self) -> bool:
            return False

        def report_error(self, code, desc) -> bool:
            self.errors.append((code, str(desc)))
            return False  # False: the error is not fatal to the process; TensorRT fails the call itself

        def messages(self) -> list[str]:
            return [f"{getattr(code, 'name', code)}: {' '.join(desc.split())}" for code, desc in self.errors]

    return Recorder()


def _is_oom(trt, recorder, text: str) -> bool:
    failed_alloc = getattr(getattr(trt, "ErrorCode", None), "FAILED_ALLOCATION", object())
    return any(code == failed_alloc for code, _ in recorder.errors) or any(h in text.lower() for h in _OOM_HINTS)


def _shape_network(trt, network, pinned: list[dict[str, str]], io_dtypes: dict[str, str]) -> int:
    """Set the I/O types ``io_dtypes`` ({tensor: "float16"}) and pin the ``pinned`` layers to FP32: a layer
    is pinned when it is named after a pinned ONNX node or produces a pinned ONNX tensor and all its
    outputs are floating point (shape and index layers are left alone). Returns the layers pinned."""
    types = {"float16": trt.float16, "float32": trt.float32}
    io = {}
    for i in range(network.num_inputs):
        io[network.get_input(i).name] = network.get_input(i)
    for i in range(network.num_outputs):
        io[network.get_output(i).name] = network.get_output(i)
    for name, dtype in io_dtypes.items():
        if name not in io:
            raise ExportError(f"the network has no I/O tensor {name!r}; re-export the bundle")
        io[name].dtype = types[dtype]
    nodes = {p["node"] for p in pinned}
    tensors = {p["tensor"] for p in pinned}
    floats = (trt.float32, trt.float16)
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or not (layer.name in nodes or any(o.name in tensors for o in outs)):
            continue
        if not all(o.dtype in floats for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        n += 1
    return n


def _build_one(plan: BuildPlan, graph: str, onnx_path: Path, engine_path: Path) -> None:
    import tensorrt as trt
    from polygraphy.backend.common import save_bytes
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.exception import PolygraphyException

    profiles = []
    for p in plan.profiles[graph]:
        prof = Profile()
        for name, (mn, opt, mx) in p["shapes"].items():
            prof.add(name, min=mn, opt=opt, max=mx)
        profiles.append(prof)
    kwargs: dict[str, Any] = dict(
        profiles=profiles, load_timing_cache=plan.timing_cache,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes},
        builder_optimization_level=plan.builder_optimization_level,
        version_compatible=plan.version_compatible or None)
    if plan.hardware_compatibility:
        kwargs["hardware_compatibility_level"] = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if not plan.strongly_typed:
        kwargs.update(fp16=plan.fp16, int8=plan.int8, tf32=plan.tf32)
    pinned = plan.fp32_layers.get(graph, [])
    if pinned and plan.precision_constraints:
        kwargs["precision_constraints"] = plan.precision_constraints
    recorder = _error_recorder(trt)
    try:
        builder, network, parser = network_from_onnx_path(str(onnx_path), strongly_typed=plan.strongly_typed or None)
        builder.error_recorder = network.error_recorder = recorder
        _shape_network(trt, network, pinned, plan.io_dtypes.get(graph, {}))
        # the serialized plan goes straight to the file: deserializing it here only to serialize it again
        # would hold one more copy of the weights at the build's peak
        data = engine_bytes_from_network((builder, network, parser), config=CreateConfig(**kwargs),
                                         save_timing_cache=plan.timing_cache)
        save_bytes(data, str(engine_path))
    except (PolygraphyException, RuntimeError, MemoryError) as e:
        said = recorder.messages()
        text = " ".join([str(e)] + said)
        why = f" (TensorRT: {said[-1][:300]})" if said else ""
        if isinstance(e, MemoryError) or _is_oom(trt, recorder, text):
            raise ExportError(f"building the {graph} engine ran out of memory (workspace "
                              f"{plan.workspace_bytes / 2**30:g} GiB){why}: close other GPU programs, lower "
                              "--max-context/--max-input-len/--max-tiles, or raise --workspace-gb") from None
        detail = "; ".join(said) if said else " ".join(str(e).split())
        raise ExportError(f"TensorRT could not build the {graph} engine: {detail[:400]}") from None


def check_device(gpu, hardware_compat: str | None) -> None:
    """Builder options this GPU cannot honour: hardware-compatible engines are not supported on Jetson's
    integrated GPUs (TensorRT developer guide, Hardware Compatibility)."""
    if hardware_compat and gpu is not None and getattr(gpu, "integrated", False):
        raise ExportError(f"--hardware-compat {hardware_compat}: TensorRT does not support hardware-compatible "
                          f"engines on Jetson ({gpu.name}); build without it")


@dataclass(frozen=True)
class BuildOptions:
    """What ``flashvl build`` was asked: the limits to build for (None: the manifest's) and builder settings."""

    precision: str = "fp16"
    max_batch: int | None = None
    max_input_len: int | None = None
    max_context: int | None = None
    max_tiles: int | None = None  # crop tiles, as preprocess.max_tiles
    opt_level: int | None = None
    hardware_compat: str | None = None
    version_compatible: bool = False
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    timing_cache: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BuildOptions":
        return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__})

    def plan(self, bundle: Bundle, trt_target: str, cache_name: str) -> BuildPlan:
        limits = default_limits(bundle.manifest, self.max_batch, self.max_input_len, self.max_context, self.max_tiles)
        return plan_build(bundle, self.precision, trt_target, limits, self.opt_level, self.hardware_compat,
                          self.version_compatible, self.workspace_gb, self.timing_cache, cache_name=cache_name)


def build(bundle_path: str, opts: BuildOptions = BuildOptions()) -> Path:
    from flashvl_edge.runtime.backends.trt import (engine_dir_name, gpu_info, host_platform, require_tensorrt,
                                                   trt_version)

    bundle = Bundle.load(bundle_path)
    require_tensorrt()  # the one-line install hint when TensorRT is missing
    gpu = gpu_info()
    if gpu is None:
        raise BackendError("no NVIDIA GPU is visible (the CUDA driver library libcuda could not enumerate a device); "
                           "TensorRT engines must be built on the GPU that will run them")
    ver = trt_version()
    check_device(gpu, opts.hardware_compat)
    name = engine_dir_name(gpu.name, gpu.compute_capability, ver)
    plan = opts.plan(bundle, ver, name)
    limits = plan.limits
    _fail_on_lint(lint_for_plan(bundle, plan))
    Path(plan.timing_cache).parent.mkdir(parents=True, exist_ok=True)

    # Each build writes a fresh engines/<name>/<build-id>/ that only the manifest's atomic rewrite
    # publishes: killed at any instant, the manifest still names a complete, hash-checked set of
    # engines (the previous build's or this one's). Builds no manifest refers to are removed after.
    build_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    rel_dir = f"engines/{name}/{build_id}"
    graphs_entry = {}
    with staging_dir(bundle.root / rel_dir) as tmp:
        for graph, rel in plan.graphs.items():
            t0 = time.perf_counter()
            print(f"building {graph} engine ({rel}) ...", flush=True)
            _build_one(plan, graph, bundle.graph_path(graph), tmp / f"{graph}.engine")
            print(f"  {graph}.engine built in {time.perf_counter() - t0:.1f} s", flush=True)
            graphs_entry[graph] = EngineGraph(file=f"{rel_dir}/{graph}.engine", built_from=rel,
                                              sha256=bundle.manifest.files[rel].sha256,
                                              profiles=tuple(p["name"] for p in plan.profiles[graph]))
    engines = dict(bundle.manifest.engines)
    engines[name] = EngineEntry(
        dir=rel_dir, gpu=gpu.name, compute_capability=gpu.compute_capability, trt_version=ver,
        precision=plan.precision, strongly_typed=plan.strongly_typed,
        hardware_compatibility=plan.hardware_compatibility, version_compatible=plan.version_compatible,
        limits=limits, profiles=plan.to_json()["profiles"], graphs=graphs_entry,
        builder={**{k: v for k, v in plan.to_json().items() if k in (
            "fp16", "int8", "tf32", "builder_optimization_level", "workspace_bytes", "precision_constraints")},
                 "fp32_layers": {g: len(layers) for g, layers in plan.fp32_layers.items()}},
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        platform=host_platform(), kv_dtype=plan.kv_dtype,
    )
    manifest = bundle.manifest.replace(engines=engines)
    live = {e.dir for e in engines.values()}
    stale = [d.relative_to(bundle.root).as_posix() for d in (bundle.root / "engines").glob("*/*")
             if d.is_dir() and d.relative_to(bundle.root).as_posix() not in live]
    finalize_manifest(bundle.root, manifest, exclude=tuple(stale))
    for rel in stale:  # the previous build of this name, and builds a kill left unpublished
        shutil.rmtree(bundle.root / rel, ignore_errors=True)
    print(f"engines written to {bundle.root / rel_dir}")
    return bundle.root / rel_dir


def _fail_on_lint(results: dict[str, list]) -> None:
    from .trt_support import errors

    problems = [f"{g}: {f}" for g, fs in results.items() for f in errors(fs)]
    if problems:
        more = f" (+{len(problems) - 3} more; run with --dry-run to see all)" if len(problems) > 3 else ""
        raise ExportError("the graphs will not build with TensorRT: " + "; ".join(problems[:3]) + more)


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (from 'flashvl export' or 'flashvl calibrate')")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="fp16; int8 (a calibrated QDQ bundle); best (fp16 + int8 where quantized)")
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch (default 1)")
    parser.add_argument("--max-input-len", type=int, default=None,
                        help="longest prefill in tokens (default: max tiles x tokens per tile + 256, capped at the context)")
    parser.add_argument("--max-context", type=int, default=None, help="longest context (default: manifest generation.max_context)")
    parser.add_argument("--max-tiles", type=int, default=None, help="most image tiles per call (default: manifest)")
    parser.add_argument("--timing-cache", default=None, help="timing cache file, reused across builds")
    parser.add_argument("--opt-level", type=int, default=None, help="builder optimization level 0-5 (TensorRT default 3)")
    parser.add_argument("--hardware-compat", choices=["ampere+"], default=None,
                        help="build engines that run on any Ampere-or-newer GPU (slower)")
    parser.add_argument("--version-compatible", action="store_true",
                        help="engines that later TensorRT releases of the same major version can run")
    parser.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB, help="builder workspace limit in GiB")
    parser.add_argument("--trt-version", default=None,
                        help="TensorRT version to plan and lint for with --dry-run (default: the installed one, else 10.3)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the builder configuration, profiles and lint; do not import TensorRT")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan and lint as JSON")


def run(args: argparse.Namespace) -> int:
    opts = BuildOptions.from_args(args)
    if not args.dry_run:
        build(args.bundle, opts)
        return 0
    from flashvl_edge.runtime.backends.trt import engine_dir_name, gpu_info, trt_version
    from .trt_support import resolve_trt_version

    bundle = Bundle.load(args.bundle)
    target = args.trt_version or trt_version(import_module=False) or "10.3"
    target_v = resolve_trt_version(target)
    gpu = gpu_info()
    check_device(gpu, opts.hardware_compat)
    name = engine_dir_name(gpu.name, gpu.compute_capability, target) if gpu else f"<gpu>_sm<cc>_trt{target}"
    plan = opts.plan(bundle, target_v, name)
    results = lint_for_plan(bundle, plan)
    if args.json:
        doc = plan.to_json()
        doc["engine_dir"] = f"engines/{name}/<build-id>"
        doc["lint"] = {g: [vars(f) for f in fs] for g, fs in results.items()}
        print(json.dumps(doc, indent=2))
        return 1 if any(f.severity == "error" for fs in results.values() for f in fs) else 0
    print(format_plan(plan, f"{bundle.root}/engines/{name}/<build-id>"))
    n_err = 0
    for g, findings in results.items():
        print(f"lint {g} (TensorRT {target_v}): " + ("ok" if not findings else f"{len(findings)} finding(s)"))
        for f in findings:
            print(f"  {f}")
            n_err += f.severity == "error"
    return 1 if n_err else 0

