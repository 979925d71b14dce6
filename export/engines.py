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
- llm, two profiles on one engine: **prefill** (``seq`` 1..max_input_len, ``past`` 0, ``total`` = seq) and
  **decode** (``seq`` 1, ``past`` 1..max_context-1, ``total`` = past+1 up to max_context).
  ``past`` = 0 is expressed as min = opt = max = 0: TensorRT accepts zero-length dimensions in profiles
  and empty input tensors (the runtime still binds a valid 1-element address for them). We keep past at
  exactly 0 in the prefill profile rather than a 0..C range so that the prefill kernels are tuned for an
  empty cache and the decode kernels for seq = 1; a later turn of a session (past > 0, seq > 1) runs
  through the decode profile token by token (runtime/backends/trt.py).

Precision: fp16 builds an FP16 engine from the FP32/FP16 graph. A quantized (QDQ) bundle builds as
explicit quantization: strongly typed on TensorRT >= 10 when the graph is already fp16 (the types in the
graph are the engine's types), otherwise weakly typed with INT8 + FP16 enabled so the Q/DQ nodes decide
what runs in INT8 and the rest runs in FP16. ``int8`` on an unquantized bundle is refused (TensorRT's
implicit calibration is deprecated): run ``flashvl calibrate`` first.

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

from flashvl_edge.runtime.backends.trt import parse_version
from flashvl_edge.runtime.bundle import Bundle, finalize_manifest, staging_dir
from flashvl_edge.runtime.contract import EngineEntry, EngineGraph, EngineLimits, Manifest, TensorSpec
from flashvl_edge.runtime.errors import BackendError, BundleError, ExportError

PRECISIONS = ("fp16", "int8", "best")
DEFAULT_WORKSPACE_GB = 4.0
# the profiles' "opt" point: a typical 4:3 photo (tiled by the runtime's own grid choice) plus a short question
TYPICAL_IMAGE_SIZE = (1024, 768)
TYPICAL_TEXT_TOKENS = 64


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
    return {
        "vision": {"num_tiles": (1, opt_tiles, vision_batch)},
        "prefill": {"batch": batch, "seq": (1, opt_seq, limits.max_input_len), "past": (0, 0, 0),
                    "total": (1, opt_seq, limits.max_input_len)},
        "decode": {"batch": batch, "seq": (1, 1, 1), "past": (1, opt_past, c - 1), "total": (2, opt_past + 1, c)},
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
    """``{"vision": [profile], "llm": [prefill, decode]}``; each profile ``{"name", "shapes": {input: (min, opt, max)}}``."""
    ranges = _dim_ranges(limits, manifest)
    out = {"vision": [_profile("vision", manifest.graph("vision").inputs, ranges["vision"])]}
    out["llm"] = [_profile(role, manifest.graph("llm").inputs, ranges[role]) for role in ("prefill", "decode")]
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
    strongly = quantized and trt10 and (m.dtype == "fp16" or int4)
    notes = []
    if strongly and m.dtype != "fp16":
        notes.append("strongly typed on an fp32 graph: layers without Q/DQ run in FP32; export with --dtype fp16 "
                     "before calibrating for faster engines")
    return BuildPlan(
        bundle=str(bundle.root), precision=precision, trt_target=trt_target, quantized=quantized,
        strongly_typed=strongly, fp16=not strongly, int8=quantized and not strongly,
        tf32=not strongly, builder_optimization_level=opt_level, hardware_compatibility=hardware_compat,
        version_compatible=version_compatible, workspace_bytes=int(workspace_gb * (1 << 30)),
        timing_cache=str(timing_cache or default_timing_cache(cache_name)), limits=limits,
        profiles=graph_profiles(m, limits), graphs={g: e.file for g, e in m.graphs.items()}, notes=notes)


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
    ] + [f"  note                {n}" for n in plan.notes]
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


_OOM_HINTS = ("out of memory", "outofmemory", "insufficient memory", "workspace", "cudaerrormemoryallocation",
              "failed to allocate", "could not find any implementation")


def _build_one(plan: BuildPlan, graph: str, onnx_path: Path, engine_path: Path) -> None:
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine
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
    try:
        network = network_from_onnx_path(str(onnx_path), strongly_typed=plan.strongly_typed or None)
        engine = engine_from_network(network, config=CreateConfig(**kwargs), save_timing_cache=plan.timing_cache)
        save_engine(engine, path=str(engine_path))
    except PolygraphyException as e:
        text = str(e).lower()
        if any(h in text for h in _OOM_HINTS):
            raise ExportError(f"building the {graph} engine ran out of memory (workspace "
                              f"{plan.workspace_bytes / 2**30:g} GiB): close other GPU programs, lower --max-context/"
                              "--max-input-len/--max-tiles, or raise --workspace-gb") from None
        raise ExportError(f"TensorRT could not build the {graph} engine: {' '.join(str(e).split())[:400]}") from None


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
    from flashvl_edge.runtime.backends.trt import engine_dir_name, gpu_info, require_tensorrt, trt_version

    bundle = Bundle.load(bundle_path)
    require_tensorrt()  # the one-line install hint when TensorRT is missing
    gpu = gpu_info()
    if gpu is None:
        raise BackendError("no NVIDIA GPU is visible (the CUDA driver library libcuda could not enumerate a device); "
                           "TensorRT engines must be built on the GPU that will run them")
    ver = trt_version()
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
        builder={k: v for k, v in plan.to_json().items() if k in (
            "fp16", "int8", "tf32", "builder_optimization_level", "workspace_bytes")},
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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

