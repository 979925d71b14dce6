"""``flashvl build``: TensorRT or TensorRT-RTX engines for a bundle, from one build plan.

    flashvl build BUNDLE --precision fp16|int8|best|fp32 [--library tensorrt|tensorrt-rtx]
                  [--compute-capability CC ...] [--max-batch B] [--max-input-len L] [--max-context C]
                  [--max-tiles N] [--max-num-batched-tokens N] [--timing-cache PATH] [--opt-level 0-5]
                  [--hardware-compat ampere+] [--version-compatible] [--workspace-gb G] [--dry-run]

Everything up to the library call is plain Python and runs on CPU (CI checks it): the optimization
profiles are derived from the manifest's declared graph inputs (:func:`graph_profiles`), the builder
configuration from the options and the bundle (:func:`plan_build`), and every graph is linted against the
target TensorRT's ONNX parser first (:mod:`trt_support`). ``--dry-run`` prints all of it and never imports
``tensorrt``; when TensorRT-RTX is installed (the ``tensorrt-rtx`` extra) it also parses every graph with
NVIDIA's real ONNX parser (:func:`real_parse`).

One plan, two libraries. :class:`BuildPlan` holds everything that decides the engine (profiles, limits,
strong or weak typing, the Q/DQ it keeps, FP32 pins, KV dtype); :func:`_build_one` runs it through the
TensorRT Python API, which TensorRT and TensorRT-RTX share. What differs is a thin adapter
(:data:`ADAPTERS`): which module to import, which version to record, where engines go and which builder
settings only that library has. TensorRT (``--library tensorrt``, the default) needs the GPU that will run
the engines; TensorRT-RTX (``--library tensorrt-rtx``) builds ahead of time on any machine, GPU or not,
for the compute capabilities asked (``--compute-capability``; default: the library's own portable set), and
is strongly typed only: options without a TensorRT-RTX meaning (``--hardware-compat``,
``--version-compatible``, ``--precision fp16`` of an fp32 graph, which needs weak typing) are refused.

Profiles (dimension names from docs/architecture.md):

- vision: ``num_tiles`` 1..max_tiles.
- llm, three profiles on one engine, chosen per call from the shapes (runtime/backends/trt.py
  ``profile_steps``): **prefill** (``seq`` 1..max_input_len, ``past`` 0, ``total`` = seq), **decode**
  (``seq`` 1, ``past`` 1..max_context-1, ``total`` = past+1 up to max_context) and **extend** (``seq``
  1..E on a cache, ``past`` 0..max_context-E, E = min(max_input_len, max_num_batched_tokens, max_context / 2)):
  a later turn
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
first. ``fp32`` builds the graph as it is (strongly typed on TensorRT >= 10 and on TensorRT-RTX: an fp32
graph gives an FP32 engine with an fp32 KV cache). TensorRT-RTX builds every network strongly typed, so
its engine's precisions are always the graph's: an fp16 bundle gives an FP16 engine, a QDQ bundle an
INT8/INT4 one with the rest in the graph's float type.

``--max-num-batched-tokens N`` (vLLM's name for the serving per-step token budget) is the extend profile's
largest ``seq``: a server that schedules at most N new tokens per step never needs more, and E bounds the
extend profile's kernels and activation memory.

The build serializes each engine straight to its file (``build_serialized_network_to_stream`` where the
library has it, else ``build_serialized_network`` written out at once): the plan is never deserialized in
the builder's process, which on Jetson's shared memory would be one more copy of the weights at the peak.
The library's own error messages are captured by the builder's logger, so an out-of-memory build is
reported as one.

The real build writes ``BUNDLE/engines/<gpu>_sm<cc>_trt<version>/<build-id>/`` (TensorRT-RTX:
``BUNDLE/engines/rtx_sm<cc>[-<cc>...]_rtx<version>/<build-id>/``) through a staging directory
renamed at the end (a failed or out-of-memory build leaves nothing where the runtime looks); only the
manifest's atomic rewrite (``finalize_manifest``) publishes it, so a kill at any instant leaves the manifest
naming a complete, hash-checked engine set. The previous build of the same name is removed afterwards.
The manifest entry names the library (``builder.library``), its version (``trt_version``) and the compute
capabilities (``compute_capability``; all of TensorRT-RTX's targets in ``builder.compute_capabilities``).
TensorRT's timing cache is shared across builds (per GPU + TensorRT version, in the user cache directory
unless ``--timing-cache`` is given).
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

from flashvl_edge.runtime.backends import trt_library
from flashvl_edge.runtime.backends.trt import LLM_PROFILES, engine_kv_dtype, parse_version
from flashvl_edge.runtime.bundle import Bundle, finalize_manifest, staging_dir
from flashvl_edge.runtime.contract import (PAST_PREFIX, PRESENT_PREFIX, EngineEntry, EngineGraph, EngineLimits,
                                           Manifest, TensorSpec)
from flashvl_edge.runtime.core import DEFAULT_MAX_NUM_BATCHED_TOKENS
from flashvl_edge.runtime.errors import BackendError, BundleError, ExportError

PRECISIONS = ("fp16", "int8", "best", "fp32")
LIBRARIES = trt_library.LIBRARIES
DEFAULT_WORKSPACE_GB = 4.0
# the profiles' "opt" point: a typical 4:3 photo (tiled by the runtime's own grid choice) plus a short question
TYPICAL_IMAGE_SIZE = (1024, 768)
TYPICAL_TEXT_TOKENS = 64
# the extend profile's largest seq unless --max-num-batched-tokens says otherwise (see _dim_ranges): the
# serving side's default per-step token budget (flashvl serve --max-num-batched-tokens), so a step's
# prefill chunk is one engine run
# TensorRT-RTX's decode profile takes seq 1..2, not exactly 1: with a seq = 1 profile beside the others the
# engine holds the LLM's weights twice (full-size fp16 LLM, 3 profiles: 5.73 GB with seq = 1, 3.10 GB = 1.00x
# the ONNX weights with seq 1..2; docs/jetson.md). The runtime still decodes one token per call.
RTX_DECODE_MAX_SEQ = 2
# the TensorRT release whose ONNX parser TensorRT-RTX 1.x's is linted as (the newest in the lint's table)
RTX_LINT_TARGET = "10.13"


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


def _dim_ranges(limits: EngineLimits, manifest: Manifest, max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                decode_max_seq: int = 1) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of every named dimension, per profile. ``decode_max_seq`` > 1 (TensorRT-RTX) makes the
    decode profile's max point (past max_context - 1 plus seq) one the graph never takes; the builder
    accepts it and the runtime never asks it."""
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
    # is thousands of tokens), so E is capped at the per-step token budget: longer runs go in E-token
    # chunks, and past reaches c - E.
    ext_seq = max(1, min(limits.max_input_len, int(max_num_batched_tokens), c // 2))
    ext_past_max = c - ext_seq
    ext_opt_seq = min(ext_seq, TYPICAL_TEXT_TOKENS)
    ext_opt_past = max(0, min(ext_past_max, opt_past, c - ext_opt_seq))
    return {
        "vision": {"num_tiles": (1, opt_tiles, vision_batch)},
        "prefill": {"batch": batch, "seq": (1, opt_seq, limits.max_input_len), "past": (0, 0, 0),
                    "total": (1, opt_seq, limits.max_input_len)},
        "decode": {"batch": batch, "seq": (1, 1, decode_max_seq), "past": (1, opt_past, c - 1),
                   "total": (2, opt_past + 1, c)},
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


def graph_profiles(manifest: Manifest, limits: EngineLimits,
                   max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                   decode_max_seq: int = 1) -> dict[str, list[dict[str, Any]]]:
    """``{"vision": [profile], "llm": [prefill, decode, extend]}``; each profile ``{"name", "shapes": {input:
    (min, opt, max)}}``. The LLM's profile order is the engine's profile index (0 stays prefill)."""
    ranges = _dim_ranges(limits, manifest, max_num_batched_tokens, decode_max_seq)
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
    library: str = "tensorrt"   # trt_library.LIBRARIES
    # TensorRT-RTX: the compute capabilities the engines target ("8.6"); TensorRT: the building GPU's
    compute_capabilities: list[str] = field(default_factory=list)
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = {g: [{"name": p["name"], "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                                                             for k, v in p["shapes"].items()}} for p in ps]
                         for g, ps in self.profiles.items()}
        return d

    def polygraphy_command(self, graph: str, engine_out: str) -> str:
        """The equivalent ``polygraphy convert`` command line (for reproducing a build by hand)."""
        cmd = ["polygraphy", "convert", str(Path(self.bundle) / self.graphs[graph]), "-o", engine_out]
        if self.library == trt_library.TENSORRT_RTX:
            # Polygraphy's TensorRT-RTX mode (it imports the module as tensorrt_rtx)
            cmd = ["env", "POLYGRAPHY_USE_TENSORRT_RTX=1", *cmd, "--compute-capabilities", *self.compute_capabilities]
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
        if self.library == trt_library.TENSORRT:
            cmd += ["--load-timing-cache", self.timing_cache, "--save-timing-cache", self.timing_cache]
        return " ".join(shlex.quote(c) for c in cmd)


def default_timing_cache(name: str) -> Path:
    base = os.environ.get("FLASHVL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashvl-edge")
    return Path(base) / "trt-timing" / f"{name}.cache"


def plan_build(bundle: Bundle, precision: str, trt_target: str, limits: EngineLimits, opt_level: int | None = None,
               hardware_compat: str | None = None, version_compatible: bool = False,
               workspace_gb: float = DEFAULT_WORKSPACE_GB, timing_cache: str | None = None,
               cache_name: str = "default", library: str = trt_library.TENSORRT,
               compute_capabilities: Sequence[str] = (),
               max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS) -> BuildPlan:
    """The one build plan, for either library (``trt_target``: the library's version; TensorRT-RTX plans are
    made as TensorRT 10's, whose parser and strongly typed network they share)."""
    m = bundle.manifest
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if library not in LIBRARIES:
        raise ExportError(f"--library must be one of {', '.join(LIBRARIES)}")
    if max_num_batched_tokens < 1:
        raise ExportError("--max-num-batched-tokens must be at least 1")
    rtx = library == trt_library.TENSORRT_RTX
    if rtx:
        _refuse_without_rtx_meaning(m, precision, hardware_compat, version_compatible)
        compute_capabilities = rtx_compute_capabilities(compute_capabilities)
        trt_target = RTX_LINT_TARGET
    elif compute_capabilities:
        raise ExportError("--compute-capability is a TensorRT-RTX option (TensorRT builds for the GPU it runs on); "
                          "add --library tensorrt-rtx")
    quant = m.quantization
    quantized = bool(quant and (quant.vision or quant.llm))
    if precision == "int8" and not quantized:
        raise ExportError("--precision int8 needs a calibrated (QDQ) bundle: run 'flashvl calibrate BUNDLE --out "
                          "BUNDLE_Q' first (TensorRT's implicit INT8 calibration is deprecated)")
    if precision in ("fp16", "fp32") and quantized:
        raise ExportError("the bundle is quantized (QDQ): build it with --precision int8 or best, or build the "
                          f"unquantized bundle with --precision {precision}")
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise ExportError("--opt-level must be between 0 and 5")
    if hardware_compat not in (None, "ampere+"):
        raise ExportError("--hardware-compat accepts only 'ampere+'")
    if workspace_gb <= 0:
        raise ExportError("--workspace-gb must be positive")
    target = parse_version(resolve_target(trt_target))[:2]
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
    strongly = rtx or (trt10 and (m.dtype == "fp16" or int4 or precision == "fp32"))
    notes = []
    if precision == "fp32":
        notes.append("fp32: the graph's own types (no reduced precision); --precision fp16 for an FP16 engine")
    elif strongly and m.dtype != "fp16":
        notes.append("strongly typed on an fp32 graph: layers without Q/DQ run in FP32 and the KV cache is float32 "
                     "(twice the bytes); export with --dtype fp16 before calibrating for faster, smaller engines")
    llm_past = [t for t in m.graph("llm").inputs if t.name.startswith(PAST_PREFIX)]
    graph_kv = llm_past[0].dtype if llm_past else "float16"
    kv_dtype = engine_kv_dtype(graph_kv, strongly or precision == "fp32")
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
        strongly_typed=strongly, fp16=not strongly and precision != "fp32", int8=quantized and not strongly,
        tf32=not strongly, builder_optimization_level=opt_level, hardware_compatibility=hardware_compat,
        version_compatible=version_compatible, workspace_bytes=int(workspace_gb * (1 << 30)),
        timing_cache=str(timing_cache or default_timing_cache(cache_name)), limits=limits,
        profiles=graph_profiles(m, limits, max_num_batched_tokens, RTX_DECODE_MAX_SEQ if rtx else 1),
        graphs={g: e.file for g, e in m.graphs.items()},
        notes=notes, fp32_layers=fp32_layers, precision_constraints="obey" if fp32_layers else None,
        io_dtypes=io_dtypes, kv_dtype=kv_dtype, library=library, compute_capabilities=list(compute_capabilities),
        max_num_batched_tokens=int(max_num_batched_tokens))


def resolve_target(trt_target: str) -> str:
    """A plan's TensorRT target as a version ("10" -> "10.3", "jetpack7" -> "10.13"; see trt_support)."""
    if parse_version(trt_target):
        return trt_target
    from .trt_support import resolve_trt_version

    return resolve_trt_version(trt_target)


def _refuse_without_rtx_meaning(m: Manifest, precision: str, hardware_compat: str | None,
                                version_compatible: bool) -> None:
    """Options TensorRT-RTX has no meaning for, refused in one line each."""
    if hardware_compat:
        raise ExportError("--hardware-compat has no TensorRT-RTX meaning: its engines target the compute "
                          "capabilities given with --compute-capability")
    if version_compatible:
        raise ExportError("--version-compatible has no TensorRT-RTX meaning: its engines run on the TensorRT-RTX "
                          "version that built them")
    quant = m.quantization
    if precision == "fp16" and m.dtype != "fp16" and not (quant and (quant.vision or quant.llm)):
        raise ExportError("--precision fp16 of an fp32 bundle needs a weakly typed network, which TensorRT-RTX "
                          "does not build (strongly typed only: the engine keeps the graph's types): export "
                          "with --dtype fp16, or build this bundle with --precision fp32")


def rtx_compute_capabilities(asked: Sequence[str]) -> list[str]:
    """``--compute-capability`` values checked against TensorRT-RTX's targets (default: its portable set)."""
    out = []
    for cc in asked or trt_library.RTX_DEFAULT_COMPUTE_CAPABILITIES:
        norm = str(cc).strip().lower().removeprefix("sm")
        if "." not in norm and norm.isdigit() and len(norm) >= 2:
            norm = f"{norm[:-1]}.{norm[-1]}"  # 86 -> 8.6, 120 -> 12.0
        if norm not in trt_library.RTX_COMPUTE_CAPABILITIES:
            raise ExportError(f"--compute-capability {cc}: TensorRT-RTX targets "
                              f"{', '.join(trt_library.RTX_COMPUTE_CAPABILITIES)}")
        if norm not in out:
            out.append(norm)
    return out


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
    rtx = plan.library == trt_library.TENSORRT_RTX
    target = (f"TensorRT-RTX, compute capability {', '.join(plan.compute_capabilities)} (parser linted as TensorRT "
              f"{plan.trt_target}'s)" if rtx else f"TensorRT {plan.trt_target}")
    lines = [
        f"flashvl build plan for {plan.bundle}",
        f"  library / target    {target}",
        f"  precision           {plan.precision}: {types}",
        f"  optimization level  {plan.builder_optimization_level if plan.builder_optimization_level is not None else 'TensorRT default (3)'}",
        f"  hardware compat     {plan.hardware_compatibility or 'none (this GPU only)'}" if not rtx else
        "  portable to         GPUs of the compute capabilities above (specialised on the device at first load)",
        f"  version compatible  {'yes' if plan.version_compatible else 'no'}" if not rtx else
        "  version compatible  no (engines run on the TensorRT-RTX version that built them)",
        f"  workspace limit     {plan.workspace_bytes} bytes ({plan.workspace_bytes / 2**30:g} GiB)",
        f"  timing cache        {'none (TensorRT-RTX tunes on the device)' if rtx else plan.timing_cache}",
        f"  limits              batch<={plan.limits.max_batch} input_len<={plan.limits.max_input_len} "
        f"context<={plan.limits.max_context} tiles<={plan.limits.max_tiles} "
        f"batched_tokens<={plan.max_num_batched_tokens} (extend)",
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


def _capturing_logger(trt):
    """An ``ILogger`` of library ``trt`` that keeps every error TensorRT reports, for the message: the
    parser's, the network's and the build's errors all reach the builder's logger. (A Python
    ``IErrorRecorder`` is not used: TensorRT-RTX 1.7 crashes the process when it releases a network or
    parser that had one set.)"""

    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(" ".join(str(msg).split()))

        def messages(self) -> list[str]:
            return list(self.errors)

    return Capture()


def _is_oom(text: str) -> bool:
    return any(h in text.lower() for h in _OOM_HINTS)


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


class _Adapter:
    """What one library does differently; everything else is the plan and :func:`_build_one`."""

    name = trt_library.TENSORRT

    @property
    def label(self) -> str:
        return trt_library.LABELS[self.name]

    def module(self):
        return trt_library.import_library(self.name)

    def version(self, import_module: bool = True) -> str | None:
        return trt_library.library_version(self.name, import_module)

    def configure(self, trt, config, plan: BuildPlan, graph: str) -> None:
        """Builder settings of this library beyond the profiles and the workspace."""


class _TensorRTAdapter(_Adapter):
    """TensorRT 8.6 / 10 (JetPack, NVIDIA's index): built on and for the GPU that runs the engines."""

    name = trt_library.TENSORRT

    def target(self, opts: "BuildOptions"):
        """(engine directory name, gpu name, compute capability) for a build on this machine."""
        from flashvl_edge.runtime.backends.trt import engine_dir_name, gpu_info, require_tensorrt

        require_tensorrt()  # the one-line install hint when TensorRT is missing
        gpu = gpu_info()
        if gpu is None:
            raise BackendError("no NVIDIA GPU is visible (the CUDA driver library libcuda could not enumerate a "
                               "device); TensorRT engines must be built on the GPU that will run them (TensorRT-RTX "
                               "engines need none to build: --library tensorrt-rtx)")
        check_device(gpu, opts.hardware_compat)
        ver = self.version()
        return engine_dir_name(gpu.name, gpu.compute_capability, ver), gpu.name, gpu.compute_capability, ver

    def configure(self, trt, config, plan: BuildPlan, graph: str) -> None:
        if not plan.strongly_typed:
            for flag, on in (("FP16", plan.fp16), ("INT8", plan.int8), ("TF32", plan.tf32)):
                if on:
                    config.set_flag(getattr(trt.BuilderFlag, flag))
                elif flag == "TF32" and hasattr(trt.BuilderFlag, "TF32"):
                    config.clear_flag(trt.BuilderFlag.TF32)
            if plan.precision_constraints and plan.fp32_layers.get(graph):
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        if plan.hardware_compatibility:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        if plan.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        cache_path = Path(plan.timing_cache)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    def save_timing_cache(self, config, plan: BuildPlan) -> None:
        cache = config.get_timing_cache()
        if cache is not None:
            data = cache.serialize()
            tmp = Path(plan.timing_cache).with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
            os.replace(tmp, plan.timing_cache)


class _TensorRTRTXAdapter(_Adapter):
    """TensorRT for RTX: ahead-of-time builds on any machine for the compute capabilities asked."""

    name = trt_library.TENSORRT_RTX

    def target(self, opts: "BuildOptions"):
        from flashvl_edge.runtime.backends.trt import gpu_info

        self.module()  # the one-line install hint when TensorRT-RTX is missing
        ver = self.version()
        ccs = rtx_compute_capabilities(opts.compute_capability)
        gpu = gpu_info()
        # no GPU is needed: the engine is specialised on the device when it is first loaded
        gpu_name = f"{gpu.name} (ahead of time)" if gpu else "none (ahead of time)"
        return rtx_engine_dir_name(ccs, ver), gpu_name, ",".join(ccs), ver

    def configure(self, trt, config, plan: BuildPlan, graph: str) -> None:
        config.num_compute_capabilities = len(plan.compute_capabilities)
        for i, cc in enumerate(plan.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), i)

    def save_timing_cache(self, config, plan: BuildPlan) -> None:
        pass  # TensorRT-RTX tunes on the device at load time (its runtime cache), not in the build


ADAPTERS: dict[str, _Adapter] = {a.name: a for a in (_TensorRTAdapter(), _TensorRTRTXAdapter())}


def rtx_engine_dir_name(compute_capabilities: Sequence[str], version: str) -> str:
    """``rtx_sm86-89_rtx1.7.1.116``: TensorRT-RTX engines are named by what they target, not by a GPU."""
    return "rtx_sm" + "-".join(c.replace(".", "") for c in compute_capabilities) + f"_rtx{version}"


def _parse_network(trt, onnx_path: Path, strongly_typed: bool, logger=None):
    """(builder, network, parser) with ``onnx_path`` parsed by library ``trt``'s ONNX parser; parser errors
    raise ExportError naming the node. Weights stored next to the graph are read from its folder (the
    parser maps the weight file: handing it memory-mapped initializers instead measured the same peak
    RSS, docs/jetson.md). The parser owns the weights the network points to: keep it until the network
    is built."""
    logger = logger or _capturing_logger(trt)  # quiet: what the parser says is in the ExportError
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network((1 << int(flag)) if strongly_typed and flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        said = "; ".join(f"{e.node_name() or e.node()} ({e.node_operator()}): {' '.join(str(e.desc()).split())}"
                         for e in errs[:3]) or "no reason given"
        raise ExportError(f"NVIDIA's ONNX parser rejects {Path(onnx_path).name}: {said[:400]}")
    return builder, network, parser


def _write_plan(trt, builder, network, config, engine_path: Path) -> bool:
    """Serialize the engine straight into ``engine_path``; False when the build failed."""
    to_stream = getattr(builder, "build_serialized_network_to_stream", None)
    if to_stream is not None and hasattr(trt, "IStreamWriter"):
        class Writer(trt.IStreamWriter):
            def __init__(self, f) -> None:
                trt.IStreamWriter.__init__(self)
                self.f = f

            def write(self, data) -> int:
                return self.f.write(data)

        with open(engine_path, "wb") as f:
            ok = to_stream(network, config, Writer(f))
        if not ok:
            engine_path.unlink(missing_ok=True)
        return bool(ok)
    data = builder.build_serialized_network(network, config)
    if data is None:
        return False
    with open(engine_path, "wb") as f:
        f.write(memoryview(data))
    return True


def _build_one(plan: BuildPlan, graph: str, onnx_path: Path, engine_path: Path) -> None:
    """Build one engine of ``plan`` with the plan's library: parse, set the I/O types and FP32 pins, add the
    profiles, apply the library's own settings, serialize to ``engine_path``."""
    adapter = ADAPTERS[plan.library]
    trt = adapter.module()
    logger = _capturing_logger(trt)
    pinned = plan.fp32_layers.get(graph, [])
    try:
        builder, network, parser = _parse_network(trt, Path(onnx_path), plan.strongly_typed, logger)
        _shape_network(trt, network, pinned, plan.io_dtypes.get(graph, {}))
        config = builder.create_builder_config()
        for p in plan.profiles[graph]:
            prof = builder.create_optimization_profile()
            for name, (mn, opt, mx) in p["shapes"].items():
                prof.set_shape(name, mn, opt, mx)
            config.add_optimization_profile(prof)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        if plan.builder_optimization_level is not None:
            config.builder_optimization_level = plan.builder_optimization_level
        adapter.configure(trt, config, plan, graph)
        if not _write_plan(trt, builder, network, config, Path(engine_path)):
            raise RuntimeError("the builder returned no engine")
        adapter.save_timing_cache(config, plan)
        return
    except (RuntimeError, MemoryError) as e:
        said = logger.messages()
        oom = isinstance(e, MemoryError) or _is_oom(" ".join([str(e)] + said))
        why = f" ({adapter.label}: {said[-1][:300]})" if said else ""
        detail = "; ".join(said) if said else " ".join(str(e).split())
    if oom:
        raise ExportError(f"building the {graph} engine ran out of memory (workspace "
                          f"{plan.workspace_bytes / 2**30:g} GiB){why}: close other GPU programs, lower "
                          "--max-context/--max-input-len/--max-tiles, or raise --workspace-gb")
    raise ExportError(f"{adapter.label} could not build the {graph} engine: {detail[:400]}")


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
    library: str = trt_library.TENSORRT
    compute_capability: tuple[str, ...] = ()   # TensorRT-RTX targets (default: its portable set)
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BuildOptions":
        values = {f: getattr(args, f) for f in cls.__dataclass_fields__ if hasattr(args, f)}
        values["compute_capability"] = tuple(values.get("compute_capability") or ())
        return cls(**values)

    def plan(self, bundle: Bundle, trt_target: str, cache_name: str) -> BuildPlan:
        limits = default_limits(bundle.manifest, self.max_batch, self.max_input_len, self.max_context, self.max_tiles)
        return plan_build(bundle, self.precision, trt_target, limits, self.opt_level, self.hardware_compat,
                          self.version_compatible, self.workspace_gb, self.timing_cache, cache_name=cache_name,
                          library=self.library, compute_capabilities=self.compute_capability,
                          max_num_batched_tokens=self.max_num_batched_tokens)


def build(bundle_path: str, opts: BuildOptions = BuildOptions()) -> Path:
    from flashvl_edge.runtime.backends.trt import host_platform

    bundle = Bundle.load(bundle_path)
    if opts.library not in ADAPTERS:
        raise ExportError(f"--library must be one of {', '.join(LIBRARIES)}")
    adapter = ADAPTERS[opts.library]
    if opts.library == trt_library.TENSORRT_RTX:  # refused before anything is imported
        _refuse_without_rtx_meaning(bundle.manifest, opts.precision, opts.hardware_compat, opts.version_compatible)
    elif opts.compute_capability:
        raise ExportError("--compute-capability is a TensorRT-RTX option (TensorRT builds for the GPU it runs on); "
                          "add --library tensorrt-rtx")
    name, gpu_name, compute_capability, ver = adapter.target(opts)
    plan = opts.plan(bundle, ver, name)
    limits = plan.limits
    _fail_on_lint(lint_for_plan(bundle, plan))
    if plan.library == trt_library.TENSORRT:
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
            print(f"building {graph} engine ({rel}) with {adapter.label} {ver} ...", flush=True)
            _build_one(plan, graph, bundle.graph_path(graph), tmp / f"{graph}.engine")
            print(f"  {graph}.engine built in {time.perf_counter() - t0:.1f} s", flush=True)
            graphs_entry[graph] = EngineGraph(file=f"{rel_dir}/{graph}.engine", built_from=rel,
                                              sha256=bundle.manifest.files[rel].sha256,
                                              profiles=tuple(p["name"] for p in plan.profiles[graph]))
    engines = dict(bundle.manifest.engines)
    engines[name] = EngineEntry(
        dir=rel_dir, gpu=gpu_name, compute_capability=compute_capability, trt_version=ver,
        precision=plan.precision, strongly_typed=plan.strongly_typed,
        hardware_compatibility=plan.hardware_compatibility, version_compatible=plan.version_compatible,
        limits=limits, profiles=plan.to_json()["profiles"], graphs=graphs_entry,
        builder={**{k: v for k, v in plan.to_json().items() if k in (
            "fp16", "int8", "tf32", "builder_optimization_level", "workspace_bytes", "precision_constraints",
            "library", "max_num_batched_tokens")},
                 "fp32_layers": {g: len(layers) for g, layers in plan.fp32_layers.items()},
                 **({"compute_capabilities": list(plan.compute_capabilities)}
                    if plan.library == trt_library.TENSORRT_RTX else {})},
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
    print(f"{adapter.label} {ver} engines written to {bundle.root / rel_dir}")
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
                        help="fp16; int8 (a calibrated QDQ bundle); best (fp16 + int8 where quantized); fp32 (the "
                             "graph's own types)")
    parser.add_argument("--library", choices=LIBRARIES, default=trt_library.TENSORRT,
                        help="tensorrt (default: TensorRT 8.6/10, built on the GPU that runs it) or tensorrt-rtx "
                             "(TensorRT for RTX: builds ahead of time on any machine, GPU or not)")
    parser.add_argument("--compute-capability", nargs="+", default=None, metavar="CC",
                        help="with --library tensorrt-rtx: the GPUs' compute capabilities to build for ("
                             + ", ".join(trt_library.RTX_COMPUTE_CAPABILITIES) + "; default "
                             + " ".join(trt_library.RTX_DEFAULT_COMPUTE_CAPABILITIES) + ")")
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch (default 1)")
    parser.add_argument("--max-input-len", type=int, default=None,
                        help="longest prefill in tokens (default: max tiles x tokens per tile + 256, capped at the context)")
    parser.add_argument("--max-context", type=int, default=None, help="longest context (default: manifest generation.max_context)")
    parser.add_argument("--max-tiles", type=int, default=None, help="most image tiles per call (default: manifest)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                        help="the serving per-step token budget (as flashvl serve's): the extend profile's largest "
                             f"seq (default {DEFAULT_MAX_NUM_BATCHED_TOKENS})")
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
                        help="print the builder configuration, profiles and lint, and parse the graphs with NVIDIA's "
                             "parser when TensorRT-RTX is installed; builds nothing, does not import TensorRT")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan and lint as JSON")


def real_parse(bundle: Bundle, plan: BuildPlan) -> dict[str, Any] | None:
    """Every graph of the plan parsed by NVIDIA's ONNX parser, when one is installed without loading TensorRT:
    TensorRT-RTX's (the ``tensorrt-rtx`` extra). None when it is not installed. Per graph ``{"ok", "layers",
    "errors"}``; for a ``--library tensorrt`` plan the parse is TensorRT-RTX's parser standing in for
    TensorRT 10's (same parser lineage; TensorRT 8.6 parses less)."""
    if trt_library.library_version(trt_library.TENSORRT_RTX, import_module=False) is None:
        return None
    try:
        trt = trt_library.import_library(trt_library.TENSORRT_RTX)
    except BackendError:
        return None
    out: dict[str, Any] = {"library": trt_library.TENSORRT_RTX, "version": str(trt.__version__), "graphs": {}}
    for g in plan.graphs:
        try:
            builder, network, parser = _parse_network(trt, bundle.graph_path(g), strongly_typed=True)
            out["graphs"][g] = {"ok": True, "layers": int(network.num_layers), "errors": []}
            del parser, network, builder
        except ExportError as e:
            out["graphs"][g] = {"ok": False, "layers": 0, "errors": [str(e)]}
    return out


def run(args: argparse.Namespace) -> int:
    opts = BuildOptions.from_args(args)
    if not args.dry_run:
        build(args.bundle, opts)
        return 0
    from flashvl_edge.runtime.backends.trt import engine_dir_name, gpu_info, trt_version
    from .trt_support import resolve_trt_version

    bundle = Bundle.load(args.bundle)
    rtx = opts.library == trt_library.TENSORRT_RTX
    gpu = gpu_info()
    if rtx:
        ver = trt_library.library_version(opts.library, import_module=False) or "<not installed>"
        target_v = RTX_LINT_TARGET
        plan = opts.plan(bundle, target_v, "unused")
        name = rtx_engine_dir_name(plan.compute_capabilities, ver)
    else:
        target = args.trt_version or trt_version(import_module=False) or "10.3"
        target_v = resolve_trt_version(target)
        check_device(gpu, opts.hardware_compat)
        name = engine_dir_name(gpu.name, gpu.compute_capability, target) if gpu else f"<gpu>_sm<cc>_trt{target}"
        plan = opts.plan(bundle, target_v, name)
    results = lint_for_plan(bundle, plan)
    parsed = real_parse(bundle, plan)
    parse_failed = bool(parsed) and not all(r["ok"] for r in parsed["graphs"].values())
    # a TensorRT 8.6 target parses less than the parser at hand: its failures decide only for TensorRT 10+
    parse_decides = parse_failed and (rtx or parse_version(target_v)[:1] >= (10,))
    n_err = sum(f.severity == "error" for fs in results.values() for f in fs)
    if args.json:
        doc = plan.to_json()
        doc["engine_dir"] = f"engines/{name}/<build-id>"
        doc["lint"] = {g: [vars(f) for f in fs] for g, fs in results.items()}
        doc["parse"] = parsed
        print(json.dumps(doc, indent=2))
        return 1 if n_err or parse_decides else 0
    print(format_plan(plan, f"{bundle.root}/engines/{name}/<build-id>"))
    label = "TensorRT-RTX's parser" if rtx else f"TensorRT {target_v}"
    for g, findings in results.items():
        print(f"lint {g} ({label}): " + ("ok" if not findings else f"{len(findings)} finding(s)"))
        for f in findings:
            print(f"  {f}")
    if parsed is None:
        print("parse        NVIDIA's ONNX parser not installed (pip install 'flashvl-edge[tensorrt-rtx]' runs it here)")
    else:
        for g, r in parsed["graphs"].items():
            what = f"ok, {r['layers']} layers" if r["ok"] else "FAILED: " + "; ".join(r["errors"])
            print(f"parse {g} (NVIDIA's ONNX parser, TensorRT-RTX {parsed['version']}): {what}")
    return 1 if n_err or parse_decides else 0
