"""Engine size and build memory of full-size bundles built with TensorRT-RTX, per LLM profile set.

    python benchmarks/trt_rtx_build.py BUNDLE [BUNDLE ...] [--precision fp16|int8] [--variants all]
        [--compute-capability 8.6] [--out build/trt-rtx-bench] [--json results.json]

Not a test: a full-size build takes minutes and up to tens of GB of memory (run it under
``flock /work/heavy.lock`` on a shared machine). Every engine is built by ``flashvl build``'s own
``_build_one`` from ``flashvl build``'s own plan (``BuildOptions.plan``), each in a fresh child process
whose peak RSS (``ru_maxrss``) is the build's; only the LLM's profile list differs between variants:

- ``3-profiles``: prefill, decode (seq = 1), extend (TensorRT's default plan);
- ``prefill+decode``: no extend profile (the runtime then runs tokens on a cache one at a time);
- ``decode``: the decode profile alone (the size floor: one profile);
- ``prefill+extend``: two profiles, both with ``seq`` ranges (no seq = 1 profile);
- ``3-profiles-decode-seq2``: the three with decode's ``seq`` 1..2 instead of exactly 1 (what
  ``flashvl build --library tensorrt-rtx`` ships: ``RTX_DECODE_MAX_SEQ``);
- ``merged``: one profile covering prefill, decode and extend (``seq`` 1..max_input_len, ``past``
  0..max_context-1, ``total`` 1..max_context; opt = decode's point). TensorRT-RTX builds it (its max point
  is not a shape the graph takes, which the builder accepts); the runtime's decoder does not run a
  single-profile engine yet, so this row measures the option;
- ``3-profiles-weightless``: the three built with ``STRIP_PLAN`` + ``REFIT_IDENTICAL`` (a weightless engine
  refit from the bundle's ONNX weights when loaded; the runtime does not do that). TensorRT-RTX 1.7 does not
  build it without a GPU (a Myelin CUDA check fails), so this row is for a machine with one.

Engine size is compared with the graph's ONNX weight bytes (``runtime/weights.py``, initializers only).
Building is not running: nothing here loads or executes an engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "3-profiles": ("prefill", "decode", "extend"),
    "prefill+decode": ("prefill", "decode"),
    "decode": ("decode",),
    "merged": ("merged",),
    "prefill+extend": ("prefill", "extend"),
    "3-profiles-decode-seq2": ("prefill", "decode2", "extend"),
    "3-profiles-weightless": ("prefill", "decode", "extend"),
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def decode_profile(decode: dict, max_seq: int) -> dict:
    """The decode profile with seq 1..max_seq (same past and total ranges)."""
    shapes = {}
    for name, (mn, opt, mx) in decode["shapes"].items():
        if name in ("inputs_embeds", "position_ids"):
            mx = list(mx)
            mx[1] = max_seq
            mx = tuple(mx)
        shapes[name] = (mn, opt, mx)
    return {"name": "decode", "shapes": shapes}


def merged_profile(by_name: dict, limits) -> dict:
    """One LLM profile spanning the three: min = prefill's (seq 1, past 0), opt = decode's, max = seq
    max_input_len, past max_context - 1, total max_context."""
    pre, dec = by_name["prefill"], by_name["decode"]
    shapes = {}
    for name, (_, _, mx) in by_name["extend"]["shapes"].items():
        mx = list(mx)
        if name.startswith("past_key_values."):
            mx[2] = limits.max_context - 1
        elif name in ("inputs_embeds", "position_ids"):
            mx[1] = limits.max_input_len
        elif name == "attention_mask":
            mx[1] = limits.max_context
        shapes[name] = (pre["shapes"][name][0], dec["shapes"][name][1], tuple(mx))
    return {"name": "merged", "shapes": shapes}


class _MemorySampler:
    """Peak anonymous and file-backed resident memory of this process, sampled every 50 ms from
    /proc/self/status (``ru_maxrss`` counts both: the weight file's mapped pages are clean page cache the
    kernel can drop, the anonymous pages are what the build really needs)."""

    def __init__(self) -> None:
        import threading

        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        try:
            fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        except OSError:
            return
        self.anon = max(self.anon, int(fields.get("RssAnon", "0 kB").split()[0]) * 1024)
        self.file = max(self.file, int(fields.get("RssFile", "0 kB").split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._read()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


def _child(bundle: str, graph: str, variant: str, precision: str, ccs: list[str], out: str) -> dict:
    """Runs in a fresh process: one engine, timed, with its own peak RSS."""
    from flashvl_edge.export import engines as E
    from flashvl_edge.runtime.bundle import Bundle

    b = Bundle.load(bundle, verify="none")
    opts = E.BuildOptions(precision=precision, library="tensorrt-rtx", compute_capability=tuple(ccs))
    plan = opts.plan(b, E.RTX_LINT_TARGET, "bench")
    if graph == "llm":
        by_name = {p["name"]: p for p in plan.profiles["llm"]}
        by_name["decode"] = decode_profile(by_name["decode"], 1)   # whatever the plan's default is
        by_name["decode2"] = decode_profile(by_name["decode"], 2)
        by_name["merged"] = merged_profile(by_name, plan.limits)
        plan.profiles["llm"] = [by_name[n] for n in VARIANTS[variant]]
    if variant.endswith("-weightless"):
        adapter = E.ADAPTERS["tensorrt-rtx"]
        configure = adapter.configure

        def weightless(trt, config, plan, graph):
            configure(trt, config, plan, graph)
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)

        adapter.configure = weightless
    engine = Path(out) / f"{Path(bundle).name}-{graph}-{variant}.engine"
    engine.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _MemorySampler() as mem:
        E._build_one(plan, graph, b.graph_path(graph), engine)
    seconds = time.perf_counter() - t0
    size = engine.stat().st_size
    engine.unlink()  # keep the disk: only the numbers are kept
    return {"seconds": round(seconds, 1), "engine_bytes": size,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_anon_bytes": mem.anon, "peak_file_bytes": mem.file}


def run_one(bundle: str, graph: str, variant: str, precision: str, ccs: list[str], out: str) -> dict:
    from flashvl_edge.runtime.bundle import Bundle
    from flashvl_edge.runtime.weights import graph_initializer_bytes

    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import trt_rtx_build as T; "
            f"print('RESULT ' + json.dumps(T._child({bundle!r}, {graph!r}, {variant!r}, {precision!r}, {ccs!r}, {out!r})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    b = Bundle.load(bundle, verify="none")
    weights = graph_initializer_bytes(b.graph_path(graph))
    row = {"bundle": Path(bundle).name, "graph": graph, "variant": variant if graph == "llm" else "vision",
           "profiles": len(VARIANTS[variant]) if graph == "llm" else 1, "weights_bytes": weights}
    if line is None:
        row["error"] = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]
        return row
    row.update(json.loads(line[len("RESULT "):]))
    row["engine_over_weights"] = round(row["engine_bytes"] / weights, 2)
    row["rss_over_weights"] = round(row["peak_rss_bytes"] / weights, 2)
    if row.get("peak_anon_bytes"):
        row["anon_over_weights"] = round(row["peak_anon_bytes"] / weights, 2)
    return row


def fmt(rows: list[dict]) -> str:
    g = 1e9
    lines = ["| bundle | engine | LLM profiles | build s | peak RSS GB (anonymous) | engine GB | ONNX weights GB "
             "| engine / weights | RSS (anonymous) / weights |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['bundle']} | {r['graph']} | {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        anon = r.get("peak_anon_bytes")
        lines.append(f"| {r['bundle']} | {r['graph']} | {r['variant']} | {r['seconds']} "
                     f"| {r['peak_rss_bytes'] / g:.2f}" + (f" ({anon / g:.2f})" if anon else "")
                     + f" | {r['engine_bytes'] / g:.2f} | {r['weights_bytes'] / g:.2f} | {r['engine_over_weights']:.2f}x "
                     f"| {r['rss_over_weights']:.2f}x" + (f" ({r['anon_over_weights']:.2f}x)" if anon else "") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--precision", default=None, help="default: int8 for a quantized bundle, else fp16")
    ap.add_argument("--variants", default="all", help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--compute-capability", nargs="+", default=["8.6"])
    ap.add_argument("--no-vision", action="store_true")
    ap.add_argument("--out", default="build/trt-rtx-bench", help="scratch folder for the engines (deleted per row)")
    ap.add_argument("--json", default=None, help="append the rows to this JSON file")
    args = ap.parse_args(argv)
    from flashvl_edge.runtime.backends.trt_library import TENSORRT_RTX, library_version
    from flashvl_edge.runtime.bundle import Bundle

    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    print(f"CPU: {cpu_model()}; TensorRT-RTX {library_version(TENSORRT_RTX)}; compute capability "
          f"{' '.join(args.compute_capability)}; {platform.platform()}", flush=True)
    rows = []
    for bundle in args.bundles:
        m = Bundle.load(bundle, verify="none").manifest
        quantized = bool(m.quantization and (m.quantization.vision or m.quantization.llm))
        precision = args.precision or ("int8" if quantized else "fp16")
        jobs = ([] if args.no_vision else [("vision", "3-profiles")]) + [("llm", v) for v in variants]
        for graph, variant in jobs:
            row = run_one(bundle, graph, variant, precision, args.compute_capability, args.out)
            row["precision"] = precision
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(fmt(rows))
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else {"cpu": cpu_model(), "rows": []}
        old["rows"] += rows
        path.write_text(json.dumps(old, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
