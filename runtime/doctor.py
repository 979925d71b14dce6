"""``flashvl doctor [BUNDLE]``: what this machine can run, what to install, and (with a bundle) whether it
fits in each Jetson's memory at each precision.

Never imports torch (it ships in the runtime). The memory budget is computed from the bundle's real
bytes: every weight tensor of both graphs (ONNX initializers, read with ``load_external_data=False``, so
GBs are not loaded; without the ``onnx`` package the graph file sizes are used), the KV cache at the
context and in the dtype the engines are built with (the bundle's built engine set when it has one,
else what ``flashvl build`` builds), and an activation estimate. See docs/jetson.md for the table of the
full-size presets and the assumptions.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .contract import PAST_PREFIX, EngineEntry, LLMSpec, Manifest
from .errors import FlashVLError

GiB = 1 << 30
# name, memory in bytes (shared CPU/GPU on Jetson), note
JETSON_DEVICES = [
    ("Orin Nano 8GB", 8 * 10**9, "JetPack 6.x, sm87, 68-102 GB/s"),
    ("Orin NX 16GB", 16 * 10**9, "JetPack 6.x, sm87, 102 GB/s"),
    ("AGX Orin 32GB", 32 * 10**9, "JetPack 6.x, sm87, 205 GB/s"),
    ("AGX Orin 64GB", 64 * 10**9, "JetPack 6.x, sm87, 205 GB/s"),
    ("AGX Thor 128GB", 128 * 10**9, "JetPack 7.x, sm110, 273 GB/s"),
]
# Memory the budget keeps aside: headless L4T + Python + libraries (measured ranges on L4T r36 are
# ~0.8-1.2 GB) and the CUDA context + TensorRT/cuBLAS/cuDNN kernels (~0.6-1.0 GB on Orin).
OS_RESERVE = int(1.2 * GiB)
CUDA_RESERVE = int(1.0 * GiB)
INT4_BLOCK = 128
PRECISIONS = ("fp16", "int8", "int4")
PACKAGES = ("numpy", "pillow", "tokenizers", "onnxruntime", "onnxruntime-gpu", "jinja2", "onnx", "polygraphy",
            "tensorrt", "torch", "transformers")


# --------------------------------------------------------------------------------------------
# The machine


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> list[dict[str, str]]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append({"name": parts[0], "compute_capability": parts[1], "total_mib": parts[2], "free_mib": parts[3]})
    return gpus


def _jetson_model() -> str | None:
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            text = Path(p).read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
            if text:
                return text
        except OSError:
            continue
    try:
        return "L4T " + Path("/etc/nv_tegra_release").read_text().split(",")[0].strip("# ")
    except OSError:
        return None


def meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable", "SwapTotal"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def collect() -> dict[str, Any]:
    from .backends.trt import gpu_info, trt_version
    from .backends.trt_library import TENSORRT_RTX, library_version

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "jetson": _jetson_model(), "memory": meminfo(),
        "packages": {p: _version(p) for p in PACKAGES},
        "tensorrt": trt_version(),
        # TensorRT for RTX (the tensorrt-rtx extra): read from package metadata, no CUDA library is loaded
        "tensorrt_rtx": library_version(TENSORRT_RTX, import_module=False),
    }
    gpus = _nvidia_smi()
    if not gpus:
        g = gpu_info()
        if g is not None:
            gpus = [{"name": g.name, "compute_capability": g.compute_capability,
                     "total_mib": str(g.total_bytes >> 20), "free_mib": None}]
    info["gpus"] = gpus
    providers: list[str] = []
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except Exception:
        pass
    info["ort_providers"] = providers
    info["backends"] = backends_status(info)
    return info


def backends_status(info: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """backend -> (works here, what it needs / how to get it)."""
    providers = info["ort_providers"]
    on_jetson = bool(info.get("jetson"))
    out = {"ort-cpu": (bool(providers), "pip install onnxruntime")}
    cuda_hint = ("pip install onnxruntime-gpu from the Jetson AI Lab index (https://pypi.jetson-ai-lab.io, jp6/cu126)"
                 if on_jetson else "pip install onnxruntime-gpu (matching your CUDA 12 driver)")
    out["ort-cuda"] = ("CUDAExecutionProvider" in providers, cuda_hint)
    have_trt, have_pg, have_gpu = bool(info["tensorrt"]), bool(info["packages"].get("polygraphy")), bool(info["gpus"])
    if have_trt and have_pg and have_gpu:
        hint = "ready: flashvl build BUNDLE --precision fp16"
    elif not have_gpu:
        hint = "needs an NVIDIA GPU (none visible)"
    elif not have_trt:
        hint = ("sudo apt install nvidia-tensorrt (JetPack; gives python3-libnvinfer)" if on_jetson
                else "pip install tensorrt (NVIDIA's index: --extra-index-url https://pypi.nvidia.com)")
    else:
        hint = "pip install 'flashvl-edge[tensorrt]' (Polygraphy and onnx for the engine builder)"
    out["trt"] = (have_trt and have_pg and have_gpu, hint)
    out["trt-rtx"] = rtx_status(info)
    return out


def rtx_status(info: dict[str, Any]) -> tuple[bool, str]:
    """TensorRT-RTX: (runs engines here, what it can do / what it needs). It builds without a GPU."""
    from .backends.trt_library import RTX_COMPUTE_CAPABILITIES

    if not info.get("tensorrt_rtx"):
        return False, "pip install 'flashvl-edge[tensorrt-rtx]' (TensorRT for RTX: builds engines on any machine)"
    ccs = [str(g.get("compute_capability")) for g in info.get("gpus") or []]
    build = "builds engines here (flashvl build BUNDLE --library tensorrt-rtx)"
    if not ccs:
        return False, f"{build}; running them needs an RTX-class GPU (none visible)"
    if not any(cc in RTX_COMPUTE_CAPABILITIES for cc in ccs):
        return False, (f"{build}; this GPU (compute capability {', '.join(ccs)}) is not a TensorRT-RTX target "
                       f"({', '.join(RTX_COMPUTE_CAPABILITIES)})")
    return True, f"{build} and runs them on this GPU (--compute-capability {ccs[0]})"


# --------------------------------------------------------------------------------------------
# Memory budget


@dataclass
class WeightInventory:
    """Parameter counts of one graph: matrices (quantizable: ndim >= 2) and the rest (norms, biases)."""

    matrix_params: int = 0
    other_params: int = 0
    bytes_on_disk: int = 0

    def add(self, numel: int, ndim: int, nbytes: int) -> None:
        if ndim >= 2:
            self.matrix_params += numel
        else:
            self.other_params += numel
        self.bytes_on_disk += nbytes


# weight element types (ONNX TensorProto ids): float, float16, bfloat16, double, int8, uint8, float8e4m3fn,
# int4, uint4. int32/int64 initializers are shapes and indices, not weights.
_WEIGHT_TYPES = frozenset({1, 10, 16, 11, 3, 2, 17, 22, 21})


def graph_inventory(path: Path) -> WeightInventory:
    """Initializers of an ONNX graph, without reading external data; file size if onnx is absent."""
    inv = WeightInventory()
    try:
        import onnx
    except ImportError:
        size = path.stat().st_size
        inv.add(size // 4, 2, size)  # assume fp32 matrices: an approximation, said in the report
        return inv
    from .weights import initializer_nbytes

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_type not in _WEIGHT_TYPES:
            continue
        numel = 1
        for d in t.dims:
            numel *= int(d)
        inv.add(numel, len(t.dims), initializer_nbytes(t))
    return inv


def weight_bytes(inv: WeightInventory, scheme: str) -> int:
    """Bytes of the weights at a precision: fp16 everything; int8 matrices 1 B (+ fp16 per-row scales,
    bounded here by 2 B per 128 weights); int4 matrices 0.5 B + one fp16 scale per 128-weight block."""
    other = inv.other_params * 2
    if scheme == "fp16":
        return inv.matrix_params * 2 + other
    if scheme == "int8":
        return inv.matrix_params + inv.matrix_params * 2 // INT4_BLOCK + other
    if scheme == "int4":
        return inv.matrix_params // 2 + inv.matrix_params * 2 // INT4_BLOCK + other
    raise ValueError(scheme)


_ITEMSIZE = {"float16": 2, "float32": 4}


def kv_cache_bytes(llm: LLMSpec, context: int, copies: int = 2, itemsize: int = 2) -> int:
    """K and V for every layer at ``context`` tokens, ``itemsize`` bytes each (2: the fp16 KV that
    ``flashvl build`` builds); ``copies`` = 2: the TensorRT backend's ping-pong."""
    return 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * context * itemsize * copies


def planned_kv_dtypes(manifest: Manifest) -> dict[str, str]:
    """The KV dtype ``flashvl build`` gives each precision's engines for this bundle: fp16, except where the
    build is strongly typed (INT4) and keeps the graph's type (float32 for an fp32 bundle)."""
    from .backends.trt import engine_kv_dtype

    past = [t for t in manifest.graph("llm").inputs if t.name.startswith(PAST_PREFIX)]
    graph_kv = past[0].dtype if past else "float16"
    return {p: engine_kv_dtype(graph_kv, strongly_typed=(p == "int4")) for p in PRECISIONS}


def budget_engine(manifest: Manifest, gpu=None, trt_ver: str | None = None) -> tuple[str, EngineEntry] | None:
    """The engine set the budget describes: the one that runs on this machine, else the newest built."""
    from .backends.trt import select_engine

    if not manifest.engines:
        return None
    try:
        return select_engine(manifest, gpu, trt_ver)
    except FlashVLError:
        return max(manifest.engines.items(), key=lambda kv: kv[1].built_at)


def activation_bytes(m: Manifest, vision_batch: int, max_input_len: int) -> int:
    """Rough peak activations (fp16) of the larger of the two engines; TensorRT reuses memory across layers,
    so one layer's live tensors count: ~16 hidden-sized tensors per token plus one layer's attention scores.
    ``vision_batch``: images per vision run (crop tiles plus the thumbnail)."""
    v, l = m.vision, m.llm
    patches = (v.image_size // v.patch_size) ** 2
    v_heads = max(1, v.hidden_size // 72)
    vision = vision_batch * (patches * v.hidden_size * 16 + v_heads * patches * patches) * 2
    llm = (max_input_len * l.hidden_size * 16 + l.num_attention_heads * max_input_len ** 2) * 2
    return max(vision, llm) + l.vocab_size * 4


def budget(manifest: Manifest, inventories: dict[str, WeightInventory], context: int | None = None,
           max_tiles: int | None = None, max_input_len: int | None = None,
           kv_dtypes: dict[str, str] | None = None) -> dict[str, dict[str, int]]:
    """Per precision: weights (vision + llm), kv, activations, runtime reserve, total bytes.
    ``max_tiles``: crop tiles (default the bundle's budget); the thumbnail is added as preprocessing adds it.
    ``kv_dtypes``: the KV dtype per precision (default: what ``flashvl build`` builds, :func:`planned_kv_dtypes`)."""
    tiles = manifest.preprocess.vision_batch(max_tiles)
    ctx = context or manifest.max_context
    inp = max_input_len or min(ctx, tiles * manifest.image.tokens_per_tile + 256)
    kv_dtypes = {**planned_kv_dtypes(manifest), **(kv_dtypes or {})}
    out = {}
    for p in PRECISIONS:
        vision_scheme = "fp16" if p == "fp16" else "int8"   # INT4 is for the LLM's weights only
        w = weight_bytes(inventories["vision"], vision_scheme) + weight_bytes(inventories["llm"], p)
        kv = kv_cache_bytes(manifest.llm, ctx, itemsize=_ITEMSIZE[kv_dtypes[p]])
        act = activation_bytes(manifest, tiles, inp)
        out[p] = {"weights": w, "kv_cache": kv, "activations": act, "cuda_reserve": CUDA_RESERVE,
                  "total": w + kv + act + CUDA_RESERVE}
    return out


def engine_row(manifest: Manifest, entry: EngineEntry) -> str:
    """The budget row an engine set is: fp16, or its quantized LLM's scheme (int8 or int4)."""
    quant = manifest.quantization
    if entry.precision == "fp16" or not quant:
        return "fp16"
    return "int4" if quant.llm == "int4" else "int8"


def bundle_budget(bundle, context: int | None = None, engine: tuple[str, EngineEntry] | None = None
                  ) -> tuple[dict[str, dict[str, int]], dict[str, WeightInventory]]:
    """The budget of ``bundle``. With ``engine`` (a built engine set), its limits are the default context,
    tiles and input length, and the KV bytes of its precision's row are its recorded KV dtype."""
    inv = {g: graph_inventory(bundle.graph_path(g)) for g in ("vision", "llm")}
    for g in ("vision", "llm"):
        ext = bundle.graph(g).external_data
        if ext and bundle.path(ext).exists() and inv[g].bytes_on_disk == 0:
            inv[g].bytes_on_disk = bundle.path(ext).stat().st_size
    if engine is None:
        return budget(bundle.manifest, inv, context), inv
    _, entry = engine
    lim = entry.limits
    kv = {engine_row(bundle.manifest, entry): entry.kv_dtype} if entry.kv_dtype else None
    return budget(bundle.manifest, inv, context or lim.max_context, lim.max_tiles, lim.max_input_len, kv), inv


def format_budget(b: dict[str, dict[str, int]], context: int) -> str:
    gib = lambda x: f"{x / GiB:.2f}"  # noqa: E731
    lines = [f"memory budget (GiB) at context {context}; device memory minus {OS_RESERVE / GiB:.1f} GiB for the OS:",
             f"  {'precision':10s} {'weights':>8s} {'kv':>6s} {'activ.':>7s} {'cuda':>5s} {'total':>6s}   " +
             "  ".join(f"{d[0]:>15s}" for d in JETSON_DEVICES)]
    for p, row in b.items():
        fits = []
        for _, mem, _ in JETSON_DEVICES:
            free = mem - OS_RESERVE - row["total"]
            fits.append(f"{'fits' if free >= 0 else 'NO'} ({free / GiB:+.1f})")
        lines.append(f"  {p:10s} {gib(row['weights']):>8s} {gib(row['kv_cache']):>6s} {gib(row['activations']):>7s} "
                     f"{gib(row['cuda_reserve']):>5s} {gib(row['total']):>6s}   " + "  ".join(f"{f:>15s}" for f in fits))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI


def model_line(source) -> str:
    """What the bundle was exported from; a preset names the published checkpoints it copies the shapes of."""
    if not source.preset:
        return source.model
    ref = source.reference
    shapes = f": shapes of {ref['vision']} + {ref['llm']}" if ref.get("vision") and ref.get("llm") else ""
    return f"preset {source.preset} (random weights{', seed ' + str(source.seed) if source.seed is not None else ''}{shapes})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="a bundle: also report its memory budget per Jetson device")
    parser.add_argument("--context", type=int, default=None, help="context length for the KV cache (default: the bundle's)")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    report: dict[str, Any] = {"machine": info}
    if args.bundle:
        from .bundle import Bundle

        from .backends.trt import gpu_info

        bundle = Bundle.load(args.bundle, verify="none")
        engine = budget_engine(bundle.manifest, gpu_info(), info["tensorrt"])
        ctx = args.context or (engine[1].limits.max_context if engine else bundle.manifest.max_context)
        b, inv = bundle_budget(bundle, ctx, engine)
        report["budget"] = {"context": ctx, "per_precision": b,
                            "inventory": {g: vars(i) for g, i in inv.items()},
                            "kv_dtype": {**planned_kv_dtypes(bundle.manifest),
                                         **({engine_row(bundle.manifest, engine[1]): engine[1].kv_dtype}
                                            if engine and engine[1].kv_dtype else {})},
                            "engine": None if engine is None else {
                                "name": engine[0], "precision": engine[1].precision,
                                "kv_dtype": engine[1].kv_dtype or None, "limits": engine[1].limits.to_json()}}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"python       {info['python']} ({info['machine']}; {info['platform']})")
    print(f"jetson       {info['jetson'] or 'no'}")
    mem = info["memory"]
    if mem:
        print(f"memory       {mem.get('MemTotal', 0) / GiB:.1f} GiB total, {mem.get('MemAvailable', 0) / GiB:.1f} GiB available")
    for g in info["gpus"] or [None]:
        if g is None:
            print("gpu          none visible (no nvidia-smi / CUDA driver)")
        else:
            free = f", {int(g['free_mib']) / 1024:.1f} GiB free" if g.get("free_mib") not in (None, "", "[N/A]") and str(g["free_mib"]).isdigit() else ""
            print(f"gpu          {g['name']} (compute capability {g['compute_capability']}){free}")
    print(f"tensorrt     {info['tensorrt'] or 'not installed'}")
    print(f"tensorrt-rtx {info['tensorrt_rtx'] or 'not installed'}")
    print("packages     " + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v))
    print(f"ort          providers: {', '.join(info['ort_providers']) or 'onnxruntime not installed'}")
    print("backends:")
    for name, (ok, hint) in info["backends"].items():
        print(f"  {name:9s} {'yes' if ok else 'no '}  {hint if not ok or name.startswith('trt') else ''}".rstrip())
    if args.bundle:
        inv = report["budget"]["inventory"]
        print(f"bundle       {args.bundle}: vision {inv['vision']['matrix_params'] + inv['vision']['other_params']:,} params, "
              f"llm {inv['llm']['matrix_params'] + inv['llm']['other_params']:,} params")
        print(f"model        {model_line(bundle.manifest.source)}")
        eng = report["budget"]["engine"]
        if eng:
            print(f"engines      {eng['name']} ({eng['precision']}, KV {eng['kv_dtype'] or 'not recorded'}): "
                  "the budget uses its limits")
        print("kv cache     " + ", ".join(f"{p} {d}" for p, d in report["budget"]["kv_dtype"].items())
              + " (what 'flashvl build' builds; INT4 engines keep the graph's type)")
        print(format_budget(report["budget"]["per_precision"], report["budget"]["context"]))
    return 0
