"""``flashvl bench``: how fast a bundle runs here, measured through the real pipeline.

What is measured, and how:
- The pipeline's own ``chat`` is run (warm-up runs first, then ``--runs`` measured ones), greedy and
  with EOS ignored so every run decodes exactly ``--new-tokens`` tokens.
- The graph runs are timed by the runners themselves (``runtime/backends/base.py``): every backend call
  (the ONNX Runtime session's ``run`` / ``run_with_ortvaluevector`` / ``run_with_iobinding``, the
  TensorRT execution up to its synchronize) is noted with its start, end and size while the runner's
  timeline is on. Nothing is patched and the decode loop is the one ``flashvl chat`` runs.
- From those intervals: vision latency (the vision graph's run, divided by the tiles it was given),
  prefill (the first LLM run), decode tokens/s (one over the mean interval between the starts of
  consecutive decode runs: the whole per-token cost, graph and host), and the **runtime overhead per
  token** = that interval minus the time inside the graph run (embedding gather, sampling,
  detokenizing, IO binding, Python).
- TTFT (image + prompt, from the call to the first token) is the pipeline's own ``ttft_s``.
- Peak RSS is the process's high-water mark (``getrusage``), compared with the bytes of the bundle's
  weight files.
- Weight bytes read per decoded token = every initializer of the LLM graph (external data included;
  the last-token-only LM head is one of them) + one row of the embedding table: a decode step reads
  each weight once, so ``memory bandwidth / this`` bounds tokens/s on a memory-bound machine.

Writes ``bench.json`` and ``bench.png`` (matplotlib, imported only here and optional) into ``--out``
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import FlashVLError, PromptError

FILLER = ("Describe this picture in detail: the people and objects in it, their colors, what they are "
          "doing, the background, the light, and any text that can be read. ")


# --------------------------------------------------------------------------------------------
# Inputs


def default_image():
    """A real photo (scikit-image's astronaut) when scikit-image is there, else a drawn scene."""
    from PIL import Image, ImageDraw

    from .samples import test_photo

    try:
        return test_photo("astronaut"), "skimage.data.astronaut() 512x512"
    except ImportError:
        pass
    # Not a photo, but with the structure vision models care about: gradients, edges, shapes, text.
    w, h = 640, 480
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 60, 260, 260), fill=(220, 40, 40), outline=(0, 0, 0), width=4)
    draw.rectangle((330, 120, 580, 400), fill=(30, 90, 200), outline=(255, 255, 255), width=6)
    draw.polygon([(120, 430), (300, 290), (420, 460)], fill=(250, 210, 30))
    draw.text((340, 40), "flashvl bench", fill=(255, 255, 255))
    return img, "Pillow-drawn scene 640x480 (scikit-image not installed)"


def make_prompt(tokenizer, n_tokens: int) -> str:
    """A user prompt of about ``n_tokens`` text tokens (exactly, when the tokenizer round-trips)."""
    if n_tokens < 1:
        raise PromptError(f"--prompt-len must be >= 1, got {n_tokens}")
    text = FILLER * (n_tokens // 8 + 2)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    prompt = tokenizer.decode(ids[:n_tokens])
    return prompt if prompt.strip() else FILLER


# --------------------------------------------------------------------------------------------
# Weights and memory


def _weight_files(bundle) -> list[str]:
    """Bundle files the ONNX Runtime path loads: graphs, their external data, the embedding table."""
    m = bundle.manifest
    names = [f for graph in m.graphs.values() for f in graph.files] + [m.embeddings.file]
    return list(dict.fromkeys(names))


def weight_file_bytes(bundle) -> int:
    return sum(bundle.path(n).stat().st_size for n in _weight_files(bundle))


def llm_bytes_per_token(bundle) -> dict:
    """Weight bytes one decode step reads: the LLM graph's initializers + one embedding row."""
    emb = bundle.manifest.embeddings
    row = int(emb.shape[-1]) * np.dtype(emb.dtype).itemsize
    graph = bundle.graph("llm")
    try:
        from .weights import graph_initializer_bytes  # exact per-initializer sizes when onnx is there

        init = graph_initializer_bytes(bundle.graph_path("llm"))
        method = "sum of the LLM graph's initializers (onnx)"
    except ImportError:
        # without onnx: the files, which are the initializers plus a small graph description
        init = bundle.graph_path("llm").stat().st_size
        if graph.external_data:
            init += bundle.path(graph.external_data).stat().st_size
        method = "LLM graph file + external data sizes (onnx not installed)"
    return {"llm_initializer_bytes": int(init), "embedding_row_bytes": row,
            "bytes_per_token": int(init + row), "method": method}


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "logical_cpus": os.cpu_count(), "numpy": np.__version__}
    try:
        from .backends.ort import physical_cores

        info["physical_cores"] = physical_cores()
    except Exception:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------------------------
# One measured run


def measure_chat(pipeline, prompt: str, image, new_tokens: int) -> dict:
    """Run ``pipeline.chat`` once (greedy, exactly ``new_tokens`` tokens) and derive its timings from
    the runners' own timelines of their graph runs."""
    vision_calls = pipeline.vision.start_timeline()
    llm_calls = pipeline.llm.start_timeline()
    try:
        t0 = time.perf_counter()
        result = pipeline.chat(prompt, image=image, max_new_tokens=new_tokens, temperature=0.0,
                               ignore_eos=True)
        total_s = time.perf_counter() - t0
    finally:
        pipeline.vision.stop_timeline()
        pipeline.llm.stop_timeline()

    v_s, v_e, v_n = [c.start for c in vision_calls], [c.end for c in vision_calls], [c.size for c in vision_calls]
    l_s, l_e = [c.start for c in llm_calls], [c.end for c in llm_calls]
    if not l_s:
        raise FlashVLError("the LLM graph did not run; nothing to measure")
    tiles = sum(v_n)
    vision_graph_s = sum(e - s for s, e in zip(v_s, v_e))
    prefill_s = l_e[0] - l_s[0]
    # decode steps: every LLM run after the prefill. Interval between consecutive starts = one token.
    d_s, d_e = l_s[1:], l_e[1:]
    step_wall = [b - a for a, b in zip(d_s, d_s[1:])]
    step_graph = [e - s for s, e in zip(d_s, d_e)][:len(step_wall)]
    overhead = [w - g for w, g in zip(step_wall, step_graph)]
    n_generated = len(result.token_ids)
    run = {
        "new_tokens": n_generated,
        "prompt_tokens": len(result.prompt_token_ids),
        "n_image_tokens": int(result.n_image_tokens),
        "tiles": int(tiles),
        "vision_graph_s": vision_graph_s,
        "vision_per_tile_s": vision_graph_s / tiles if tiles else None,
        "vision_s": float(result.vision_s) if result.vision_s is not None else None,
        "prefill_graph_s": prefill_s,
        "ttft_s": float(result.ttft_s),
        "decode_tokens_per_s": (1.0 / statistics.fmean(step_wall)) if step_wall else None,
        "pipeline_decode_tokens_per_s": (float(result.decode_tokens_per_s)
                                         if result.decode_tokens_per_s else None),
        "decode_step_ms": [1e3 * w for w in step_wall],
        "decode_graph_ms": [1e3 * g for g in step_graph],
        "overhead_ms_per_token": 1e3 * statistics.fmean(overhead) if overhead else None,
        "total_s": total_s,
        "token_ids": [int(t) for t in result.token_ids],
    }
    return run


def summarize(runs: list[dict]) -> dict:
    keys = ("vision_graph_s", "vision_per_tile_s", "vision_s", "prefill_graph_s", "ttft_s",
            "decode_tokens_per_s", "pipeline_decode_tokens_per_s", "overhead_ms_per_token", "total_s")
    out = {}
    for k in keys:
        values = [r[k] for r in runs if r.get(k) is not None]
        out[k] = {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
    return out


# --------------------------------------------------------------------------------------------
# Output


def write_plot(report: dict, path: Path) -> str | None:
    """bench.png: per-token decode time (wall vs graph) per run, and the per-run summary bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no plot (pip install 'flashvl-edge[bench]')"
    runs = report["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(runs):
        steps = np.arange(2, 2 + len(r["decode_step_ms"]))
        ax1.plot(steps, r["decode_step_ms"], label=f"run {i + 1}: step wall", alpha=0.8)
        ax1.plot(steps, r["decode_graph_ms"], linestyle="--", alpha=0.6, label=f"run {i + 1}: inside graph")
    ax1.set_xlabel("generated token")
    ax1.set_ylabel("ms")
    ax1.set_title("decode step time")
    ax1.legend(fontsize=7)
    labels = ["vision / tile (ms)", "prefill (ms)", "TTFT (ms)", "decode (tok/s)", "overhead (ms/tok)"]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        vals = [1e3 * (r["vision_per_tile_s"] or 0), 1e3 * r["prefill_graph_s"], 1e3 * r["ttft_s"],
                r["decode_tokens_per_s"] or 0, r["overhead_ms_per_token"] or 0]
        ax2.bar(x + i * width, vals, width, label=f"run {i + 1}")
    ax2.set_xticks(x + width * (len(runs) - 1) / 2, labels, rotation=20, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_title(f"{report['bundle_name']} ({report['backend']})")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _fmt(v, scale=1.0, digits=1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def format_table(report: dict) -> str:
    s = report["summary"]
    med = lambda k: (s.get(k) or {}).get("median")  # noqa: E731
    lo = lambda k: (s.get(k) or {}).get("min")  # noqa: E731
    hi = lambda k: (s.get(k) or {}).get("max")  # noqa: E731
    rows = [
        ("vision per tile", "ms", "vision_per_tile_s", 1e3, 1),
        ("vision (pipeline, incl. preprocessing)", "ms", "vision_s", 1e3, 1),
        ("prefill (graph)", "ms", "prefill_graph_s", 1e3, 1),
        ("TTFT (image + prompt)", "ms", "ttft_s", 1e3, 1),
        ("decode", "tok/s", "decode_tokens_per_s", 1.0, 2),
        ("runtime overhead per token", "ms", "overhead_ms_per_token", 1.0, 3),
    ]
    lines = [f"flashvl bench: {report['bundle']} ({report['backend']}, {report['settings']['runs']} runs, "
             f"{report['prompt_tokens']} prompt tokens incl. {report['n_image_tokens']} image tokens, "
             f"{report['settings']['new_tokens']} new tokens)",
             f"{'metric':40s} {'unit':6s} {'median':>10s} {'min':>10s} {'max':>10s}"]
    for label, unit, key, scale, digits in rows:
        lines.append(f"{label:40s} {unit:6s} {_fmt(med(key), scale, digits):>10s} "
                     f"{_fmt(lo(key), scale, digits):>10s} {_fmt(hi(key), scale, digits):>10s}")
    mem, w = report["memory"], report["weights"]
    lines.append(f"{'peak RSS':40s} {'MiB':6s} {mem['peak_rss_bytes'] / 2**20:>10.1f}   "
                 f"({mem['peak_rss_over_weight_files']:.2f}x the {mem['weight_file_bytes'] / 2**20:.1f} MiB of weight files)")
    lines.append(f"{'weight bytes read per decoded token':40s} {'MiB':6s} {w['bytes_per_token'] / 2**20:>10.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The subcommand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (from 'flashvl export' or 'flashvl calibrate')")
    parser.add_argument("--image", help="image file (default: a real photo, scikit-image's astronaut)")
    parser.add_argument("--prompt-len", type=int, default=32, help="text tokens in the user prompt (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to decode per run (default 32)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up runs first (default 1)")
    parser.add_argument("--out", default="flashvl-bench", help="directory for bench.json and bench.png")
    parser.add_argument("--backend", default="ort", help="runtime backend (default ort)")


def benchmark(bundle_path: str, image=None, prompt_len: int = 32, new_tokens: int = 32, runs: int = 3,
              warmup: int = 1, backend: str = "ort", log: Callable[[str], None] = lambda s: None) -> dict:
    """Load a bundle, run it ``warmup + runs`` times, and return the report (see bench.json)."""
    from .bundle import Bundle
    from .pipeline import Pipeline

    for name, value, least in (("--runs", runs, 1), ("--warmup", warmup, 0), ("--new-tokens", new_tokens, 2)):
        if not isinstance(value, int) or value < least:
            raise PromptError(f"{name} must be an integer >= {least}, got {value!r}")
    bundle = Bundle.load(bundle_path)
    if image is None:
        image, image_desc = default_image()
    else:
        image_desc = str(image)
    t0 = time.perf_counter()
    # caches off: every run measures the vision graph and the whole prefill
    pipeline = Pipeline.from_bundle(bundle_path, backend=backend, image_cache_bytes=0, kv_cache_bytes=0)
    load_s = time.perf_counter() - t0
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle.path(bundle.manifest.tokenizer.file)))
    prompt = make_prompt(tokenizer, prompt_len)
    try:
        for i in range(warmup):
            log(f"warm-up {i + 1}/{warmup}")
            measure_chat(pipeline, prompt, image, new_tokens)
        measured = []
        for i in range(runs):
            log(f"run {i + 1}/{runs}")
            measured.append(measure_chat(pipeline, prompt, image, new_tokens))
    finally:
        pipeline.close()
    weights = llm_bytes_per_token(bundle)
    wbytes = weight_file_bytes(bundle)
    rss = peak_rss_bytes()
    return {
        "bundle": str(bundle_path),
        "bundle_name": Path(bundle_path).name,
        "backend": backend,
        "family": bundle.family,
        "variant": bundle.variant,
        "dtype": bundle.manifest.dtype,
        "quantization": None if bundle.manifest.quantization is None else bundle.manifest.quantization.to_json(),
        "machine": machine_info(),
        "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
                     "image": image_desc},
        "load_s": load_s,
        "prompt_tokens": measured[0]["prompt_tokens"],
        "n_image_tokens": measured[0]["n_image_tokens"],
        "tiles": measured[0]["tiles"],
        "runs": measured,
        "summary": summarize(measured),
        "weights": weights,
        "memory": {"peak_rss_bytes": rss, "weight_file_bytes": wbytes,
                   "peak_rss_over_weight_files": rss / wbytes if wbytes else None},
    }


def run(args) -> int:
    report = benchmark(args.bundle, image=args.image, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       runs=args.runs, warmup=args.warmup, backend=args.backend,
                       log=lambda s: print(f"flashvl bench: {s}", file=sys.stderr, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    note = write_plot(report, out / "bench.png")
    report["plot"] = None if note else "bench.png"
    report["plot_note"] = note
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_table(report))
    if note:
        print(f"note: {note}")
    print(f"wrote {out / 'bench.json'}" + ("" if note else f" and {out / 'bench.png'}"))
    return 0
