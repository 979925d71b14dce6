#!/usr/bin/env python
"""One decode step of a bundle's LLM graph at 1, 2, 4 and 8 rows: INT4 at two MatMulNBits accuracy levels
against fp32, where its kernel time goes, and whether a row's logits depend on the batch it runs in.

    python benchmarks/int4_step.py --int4 BUNDLE_Q [--fp32 BUNDLE] [--levels 4,0] [--rows 1,2,4,8] \\
                                   [--past 300] [--steps 10] [--reps 3] [--threads 2] [--out build/int4-step]
    python benchmarks/int4_step.py --accuracy --int4 BUNDLE_Q --fp32 BUNDLE [--levels 4,0] [--threads 2]

What it runs: the bundle's ``llm.onnx`` in ONNX Runtime (CPU, ``runtime/backends/ort.py``'s session
options: ``--threads`` intra-op threads, ORT_ENABLE_ALL), one token per row on a past of ``--past``
positions. ONNX Runtime fuses the INT4 bundle's DequantizeLinear + MatMul into ``MatMulNBits`` at load;
``session.qdq_matmulnbits_accuracy_level`` sets the fused node's ``accuracy_level`` (4: int8 activations,
MLAS ``SQNBIT_CompInt8``; 0: fp32 activations, ``SQNBIT_CompFp32``). Every row has its own inputs: the
embedding rows of random token ids (the bundle's ``embed_tokens.npy``), a random-normal KV cache of
``--past`` positions, an all-ones mask and position ``--past``. The KV cache is fed as OrtValues
(``run_with_ort_values``) and every output (logits and the ``present.*`` tensors: past + new, the
graph's Concat) is fetched, as the runtime does; the same past is fed at every step, so every timed
step is the same step.

Measured, per variant (``int4-L4``, ``int4-L0``, ``fp32``):

- **step ms** at each row count: the median (``--stat min``: the minimum) of ``--steps`` steps after 2
  warm-up steps, then the median over repetitions; rows/s ratio
  8 vs 1 (= 8 x ms(1) / ms(8)); the cost of a lone row padded to two (the row + a copy of it) against
  the row alone. Repetitions are interleaved (every variant, every row count, the starting variant
  rotated), ratios taken per repetition and the median reported.
- **profile** of the 8-row step (``enable_profiling``; ``--profile-steps`` steps after 5 warm-up
  steps): each node's kernel time summed by kind: ``MatMulNBits``, weight ``MatMul`` (a 2-D or prepacked B),
  attention ``MatMul`` / ``FusedMatMul`` (both inputs >= 3-D), KV ``Concat`` (output [rows, kv_heads, past + 1,
  head_dim]), other Concat, and every other op type by name.
- **batch invariance**: each of 8 rows alone (M = 1), in batches of 2, 3, 4 and 8, padded to 2 (the
  row + a copy), and a batch of 3 padded to 4: max |logit difference| against the row alone and against
  the row in the batch of 8, and whether it is bitwise equal.

The CPU model and a memory-bandwidth probe (``compare.py``'s: a 1 GiB float32 matrix-vector product,
numpy, best of 5) are printed with the figures, before, between repetitions and after. Writes
``OUT/int4_step.json``. Peak memory with the full-size fp32 bundle: ~9 GB (run it under the heavy lock).

``--accuracy`` runs none of the above: it measures the INT4 LLM at each accuracy level with the
calibration report's LLM metrics (``calibration/report.py`` ``llm_metrics``: teacher-forced top-1
agreement, KL(FP || Q) mean / max, logit relative RMS error, free-running greedy agreement and identical
prefix) on the report's held-out samples, against the fp32 bundle's references (``calibration/data.py``
``capture``: the same samples, prompts and cache key as ``flashvl calibrate`` with its defaults, so the
calibration run's cache is reused and the fp32 graphs only run when it is missing). The INT4 graph runs
in the runtime's ``OrtDecoder`` (``device="cpu"``, ``--threads``) whose session options get the level key
added, through the runtime's ``Generator`` as the report feeds it; the level each session got is read
back from its options. The bundle's own ``calibration_report.json`` (made with no level key, i.e. ONNX
Runtime's default) is printed beside it. Writes ``OUT/int4_accuracy.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import BandwidthProbe  # benchmarks/ is not a package

LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"


def log(msg: str) -> None:
    print(f"[int4-step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Variant:
    """One LLM graph in one session: a bundle and, for a quantized bundle, the MatMulNBits accuracy level."""

    def __init__(self, name: str, bundle: Path, level: int | None):
        self.name, self.bundle, self.level = name, bundle, level

    def open(self, threads: int, profile_prefix: str | None):
        import onnxruntime as ort
        from flashvl_edge.runtime.backends.ort import session_options
        from flashvl_edge.runtime.bundle import Bundle

        so = session_options(threads)
        if self.level is not None:
            so.add_session_config_entry(LEVEL_KEY, str(self.level))
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        b = Bundle.load(self.bundle, verify="none")
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(b.graph_path("llm")), so, providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - t0
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.hidden = inputs["inputs_embeds"].shape[2]
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = shape[1], shape[3]
        self.embed_path = b.root / "embed_tokens.npy"
        return self


class Rows:
    """Inputs of up to ``n`` independent rows at past length ``past``, and OrtValue feeds of any subset."""

    def __init__(self, v: Variant, n: int, past: int, seed: int):
        rng = np.random.default_rng(seed)
        table = np.load(v.embed_path, mmap_mode="r")
        ids = rng.integers(0, table.shape[0], size=n)
        self.embeds = np.ascontiguousarray(np.asarray(table[ids], dtype=np.float32)[:, None, :])
        self.kv = [rng.standard_normal((n, v.kv_heads, past, v.head_dim), dtype=np.float32)
                   for _ in v.past_names]
        self.past = past

    def feeds(self, v: Variant, idx: list[int]) -> tuple[dict, list]:
        import onnxruntime as ort

        rows = len(idx)
        arrays = {"inputs_embeds": np.ascontiguousarray(self.embeds[idx]),
                  "attention_mask": np.ones((rows, self.past + 1), np.int64),
                  "position_ids": np.full((rows, 1), self.past, np.int64)}
        for name, kv in zip(v.past_names, self.kv):
            arrays[name] = np.ascontiguousarray(kv[idx])
        # the OrtValues point into the numpy buffers: the arrays are returned so the caller keeps them alive
        return {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}, list(arrays.values())


def run(v: Variant, feeds: dict):
    return v.session.run_with_ort_values(v.output_names, feeds)


def time_step(v: Variant, feeds: dict, steps: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        run(v, feeds)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run(v, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times}


def logits(v: Variant, rows: Rows, idx: list[int]) -> np.ndarray:
    feeds, _keep = rows.feeds(v, idx)
    out = run(v, feeds)
    return out[0].numpy()[:, -1].astype(np.float32, copy=True)


# --------------------------------------------------------------------------------------------
# profile


def classify(ev: dict, past: int) -> str:
    op = ev["args"].get("op_name", "?")
    shapes = []
    for entry in ev["args"].get("input_type_shape", []):
        shapes.extend(entry.values())
    if op in ("MatMul", "FusedMatMul"):
        # a weight MatMul has a 2-D initializer as B, which ORT prepacks and then leaves out of the event's
        # input shapes; attention's MatMuls have two >= 3-D activations
        if len(shapes) < 2 or any(len(s) == 2 for s in shapes):
            return f"{op} (weights, fp32)"
        return f"{op} (attention)"
    if op == "Concat":
        outs = [dims for entry in ev["args"].get("output_type_shape", []) for _, dims in entry.items()]
        if outs and len(outs[0]) == 4 and outs[0][2] == past + 1:
            return "Concat (KV: past + new)"
        return "Concat (other)"
    return op


def profile_breakdown(path: str, past: int, last_runs: int) -> dict:
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[-last_runs:]
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    by_kind: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in windows):
            continue
        kind = classify(e, past)
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"]
    total = sum(by_kind.values())
    run_us = sum(r["dur"] for r in runs)
    return {"runs": len(runs), "kernel_ms_per_step": total / 1e3 / max(1, len(runs)),
            "run_ms_per_step": run_us / 1e3 / max(1, len(runs)),
            "by_kind_ms_per_step": {k: d / 1e3 / max(1, len(runs))
                                    for k, d in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "by_kind_fraction": {k: d / total for k, d in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


# --------------------------------------------------------------------------------------------
# batch invariance


def invariance(v: Variant, rows: Rows, n: int) -> dict:
    alone = [logits(v, rows, [r])[0] for r in range(n)]
    full = logits(v, rows, list(range(n)))

    def cmp(got: np.ndarray, ref: np.ndarray) -> dict:
        return {"max_abs_diff": float(np.max(np.abs(got - ref))), "bitwise": bool(np.array_equal(got, ref))}

    out: dict = {"rows": n}
    # every row of each batch against the row alone and against the row in the full batch
    for size in (2, 3, 4):
        if size > n:
            continue
        got = logits(v, rows, list(range(size)))
        out[f"batch{size}"] = {r: {"vs_alone": cmp(got[r], alone[r]), "vs_batch_full": cmp(got[r], full[r])}
                               for r in range(size)}
    out["batch_full"] = {r: {"vs_alone": cmp(full[r], alone[r])} for r in range(n)}
    # a lone row padded to two rows (the row + a copy of it): against the full batch
    out["pad2"] = {}
    for r in range(n):
        got = logits(v, rows, [r, r])
        out["pad2"][r] = {"vs_alone": cmp(got[0], alone[r]), "vs_batch_full": cmp(got[0], full[r])}
    if n >= 3:  # a batch of 3 padded to 4 (its last row copied): row 2 against the full batch
        got = logits(v, rows, [0, 1, 2, 2])
        out["batch3_pad4"] = {r: {"vs_alone": cmp(got[r], alone[r]), "vs_batch_full": cmp(got[r], full[r])}
                              for r in range(3)}
    return out


def summarize_invariance(inv: dict) -> dict:
    """The table's rows: worst max |diff| over the rows each comparison covers, and all-bitwise."""

    def worst(entries: list[dict]) -> dict:
        return {"max_abs_diff": max(e["max_abs_diff"] for e in entries),
                "bitwise": all(e["bitwise"] for e in entries)}

    s = {}
    if "batch2" in inv:
        s["alone vs batch 2 (rows 0-1)"] = worst([inv["batch2"][r]["vs_alone"] for r in (0, 1)])
    s["alone vs batch 8 (all rows)"] = worst([inv["batch_full"][r]["vs_alone"] for r in inv["batch_full"]])
    if "batch2" in inv:
        s["batch 2 vs batch 8 (rows 0-1)"] = worst([inv["batch2"][r]["vs_batch_full"] for r in (0, 1)])
    if "batch4" in inv:
        s["batch 4 vs batch 8 (rows 0-3)"] = worst([inv["batch4"][r]["vs_batch_full"] for r in range(4)])
    if "batch3" in inv:
        s["batch 3 rows 0-1 vs batch 8"] = worst([inv["batch3"][r]["vs_batch_full"] for r in (0, 1)])
        s["batch 3 row 2 (odd last) vs alone"] = inv["batch3"][2]["vs_alone"]
        s["batch 3 row 2 (odd last) vs batch 8"] = inv["batch3"][2]["vs_batch_full"]
    s["padded to 2 vs batch 8 (all rows)"] = worst([inv["pad2"][r]["vs_batch_full"] for r in inv["pad2"]])
    if "batch3_pad4" in inv:
        s["batch 3 padded to 4 vs batch 8"] = worst([inv["batch3_pad4"][r]["vs_batch_full"] for r in range(3)])
    return s


# --------------------------------------------------------------------------------------------
# MatMulNBits alone: which rows of an M-row product match the same row computed alone


def op_check(threads: int, levels: list[int], k: int = 1536, n: int = 8960, block: int = 128,
             steps: int = 20, seed: int = 0) -> dict:
    """One MatMulNBits node (com.microsoft, 4 bits, symmetric, ``block`` along K; the bundle's gate/up
    projection shape by default) at each accuracy level: rows of M = 2, 3, 4, 8 against the same rows
    computed alone (M = 1), bitwise; and the node's time at M = 1, 2, 8 (median of ``steps``)."""
    import onnxruntime as ort
    from flashvl_edge.runtime.backends.ort import session_options
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    qb = rng.integers(0, 256, size=(n, k // block, block // 2), dtype=np.uint8)
    scales = (rng.random(n * (k // block), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    a = rng.standard_normal((8, k), dtype=np.float32)
    out: dict = {"K": k, "N": n, "block_size": block}
    for level in levels:
        node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=block, accuracy_level=level)
        graph = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                                  [numpy_helper.from_array(qb, "B"), numpy_helper.from_array(scales, "scales")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        sess = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                    providers=["CPUExecutionProvider"])
        def y(rows: list[int], sess=sess) -> np.ndarray:
            return sess.run(None, {"A": np.ascontiguousarray(a[rows])})[0]

        alone = np.concatenate([y([r]) for r in range(8)])
        res: dict = {}
        for m in (2, 3, 4, 8):
            got = y(list(range(m)))
            res[f"M={m}"] = {f"row {r}": {"bitwise_vs_alone": bool(np.array_equal(got[r], alone[r])),
                                          "max_abs_diff_vs_alone": float(np.max(np.abs(got[r] - alone[r])))}
                             for r in range(m)}
        times = {}
        for m in (1, 2, 8):
            feed = {"A": np.ascontiguousarray(a[:m])}
            for _ in range(3):
                sess.run(None, feed)
            ts = []
            for _ in range(steps):
                t0 = time.perf_counter()
                sess.run(None, feed)
                ts.append((time.perf_counter() - t0) * 1e3)
            times[f"M={m}"] = statistics.median(ts)
        res["op_ms"] = times
        out[f"level {level}"] = res
    return out


def print_op_check(oc: dict) -> None:
    print(f"\nMatMulNBits alone (K={oc['K']}, N={oc['N']}, block {oc['block_size']}): rows equal to the same row "
          "computed alone (M=1)?\n")
    levels = [k for k in oc if k.startswith("level")]
    print("| rows M | " + " | ".join(levels) + " |")
    print("|---|" + "---|" * len(levels))
    for m in (2, 3, 4, 8):
        cols = []
        for lv in levels:
            rows = oc[lv][f"M={m}"]
            eq = [r.split()[1] for r, e in rows.items() if e["bitwise_vs_alone"]]
            worst = max(e["max_abs_diff_vs_alone"] for e in rows.values())
            cols.append(f"bitwise: rows {','.join(eq) or 'none'}; max diff {worst:.1e}")
        print(f"| {m} | " + " | ".join(cols) + " |")
    print("| op ms M=1 / 2 / 8 | " + " | ".join(
        " / ".join(f"{oc[lv]['op_ms'][f'M={m}']:.3f}" for m in (1, 2, 8)) for lv in levels) + " |")


# --------------------------------------------------------------------------------------------
# accuracy: the calibration report's LLM metrics at each MatMulNBits accuracy level


@contextlib.contextmanager
def level_in_session_options(level: int):
    """While open, the runtime's ``session_options`` (as ``OrtRunner`` builds every session with) also
    sets the MatMulNBits accuracy level; everything else stays the runtime's."""
    from flashvl_edge.runtime.backends import ort as backend

    base = backend.session_options

    def with_level(*args, **kwargs):
        so = base(*args, **kwargs)
        so.add_session_config_entry(LEVEL_KEY, str(level))
        return so

    backend.session_options = with_level
    try:
        yield
    finally:
        backend.session_options = base


ACCURACY_ROWS = [("top1_agreement", "next-token top-1 agreement (teacher-forced)", "{:.4f}"),
                 ("kl_mean", "KL(FP || Q) mean [nats]", "{:.5f}"),
                 ("kl_max", "KL(FP || Q) max [nats]", "{:.5f}"),
                 ("logit_rel_rms_error", "logit error (relative RMS)", "{:.5f}"),
                 ("greedy_agreement", "greedy agreement (free-running)", "{:.4f}"),
                 ("greedy_identical_prefix_mean", "greedy identical prefix, mean [tokens]", "{:.2f}")]


def accuracy(args) -> dict:
    from flashvl_edge.calibration import data
    from flashvl_edge.calibration import report as calib_report
    from flashvl_edge.runtime.backends.ort import OrtDecoder
    from flashvl_edge.runtime.bench import machine_info
    from flashvl_edge.runtime.bundle import Bundle
    from flashvl_edge.runtime.generate import Generator

    machine = machine_info()
    log(f"machine: {machine.get('cpu')} ({machine.get('logical_cpus')} CPUs, {machine.get('physical_cores')} "
        f"physical cores), onnxruntime {machine.get('onnxruntime')}, {args.threads} threads")
    fp, q = Bundle.load(args.fp32, verify="none"), Bundle.load(args.int4, verify="none")
    qs = q.manifest.quantization
    if qs is None or qs.llm != "int4":
        raise SystemExit(f"{args.int4} is not an INT4-LLM bundle (flashvl calibrate --llm int4)")
    m = fp.manifest
    args.holdout = args.holdout or data.DEFAULT_HOLDOUT
    args.report_tokens = args.report_tokens or data.DEFAULT_REPORT_TOKENS
    # the held-out samples and references exactly as flashvl calibrate (default samples) takes them: the
    # same selection, and the same capture split, so the calibration run's cache file is the one found
    prompts = data.load_prompts(None, m.image.placeholder)
    samples = data.select_samples(None, prompts, args.samples, args.holdout, m.preprocess.max_image_pixels)
    needs_calibration = qs.vision == "int8" or qs.llm == "int8" or qs.method.get("llm", "rtn") != "rtn"
    t0 = time.perf_counter()
    cap = data.capture(args.fp32, samples, args.report_tokens, args.cache_dir, progress=False,
                       held_out_only=not needs_calibration)
    log(f"fp32 references: {len(cap.held_embeds)} held-out samples "
        f"({'loaded from cache' if cap.cache_hit else f'captured in {time.perf_counter() - t0:.1f} s'}"
        f"{', ' + str(cap.cache_path) if cap.cache_path else ''})")
    table = np.load(fp.path(m.embeddings.file), mmap_mode="r")
    out: dict = {"machine": machine, "command": " ".join([Path(sys.executable).name] + sys.argv),
                 "settings": vars(args), "held_out": cap.names.get("held_out", []),
                 "prefill_tokens": [int(e.shape[1]) for e in cap.held_embeds],
                 "references": {"bundle": str(Path(args.fp32).resolve()), "cache_hit": cap.cache_hit,
                                "cache_file": str(cap.cache_path) if cap.cache_path else None},
                 "levels": {}}
    forced: dict[int, np.ndarray] = {}
    for level in (int(lv) for lv in args.levels.split(",")):
        dec = OrtDecoder(q.graph_path("llm"), f"llm-int4-L{level}", device="cpu", threads=args.threads)
        t0 = time.perf_counter()
        with level_in_session_options(level):
            dec.activate()
        load_s = time.perf_counter() - t0
        with dec:
            got = dec.session.get_session_options().get_session_config_entry(LEVEL_KEY)
            if got != str(level):
                raise SystemExit(f"the session has {LEVEL_KEY} = {got!r}, not {level}")
            t0 = time.perf_counter()
            metrics = calib_report.llm_metrics(Generator(dec, table, m.image.image_token_id),
                                               cap.held_embeds, cap.held_tokens, cap.held_logits)
            run_s = time.perf_counter() - t0
            # the teacher-forced logits once more (the call llm_metrics makes), to compare the levels directly
            gen = Generator(dec, table, m.image.image_token_id)
            forced[level] = np.concatenate([
                gen.teacher_forced(dec.new_cache(), inputs_embeds=e, forced_tokens=[int(t) for t in toks[:-1]])
                for e, toks in zip(cap.held_embeds, cap.held_tokens)])
        out["levels"][f"level {level}"] = {**metrics, "session_config": {LEVEL_KEY: got},
                                           "load_s": load_s, "report_s": run_s}
        log(f"level {level}: loaded in {load_s:.1f} s, measured in {run_s:.1f} s: "
            + ", ".join(f"{k} {metrics[k]:.4g}" for k, _, _ in ACCURACY_ROWS))
    levels = list(forced)
    out["between_levels"] = {}
    for i, a in enumerate(levels):
        for b in levels[i + 1:]:
            pa, pb = forced[a], forced[b]
            kl = calib_report.kl_divergence(pa, pb)
            out["between_levels"][f"level {b} vs level {a}"] = {
                "positions": int(pa.shape[0]), "top1_agreement": float(np.mean(pa.argmax(-1) == pb.argmax(-1))),
                "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                "logit_rel_rms_error": float(np.sqrt(((pb.astype(np.float64) - pa) ** 2).sum()
                                                     / max(float((pa.astype(np.float64) ** 2).sum()), 1e-30))),
                "max_abs_diff": float(np.max(np.abs(pb - pa)))}
    stored = q.root / calib_report.REPORT_FILE
    if stored.is_file():
        rep = json.loads(stored.read_text())
        if "llm" in rep:
            out["calibration_report"] = {"held_out": rep.get("held_out"), **rep["llm"]}
    return out


def print_accuracy(r: dict) -> None:
    m = r["machine"]
    print(f"Machine: {m.get('cpu')} ({m.get('logical_cpus')} CPUs, {m.get('physical_cores')} physical cores), "
          f"onnxruntime {m.get('onnxruntime')}, {r['settings']['threads']} threads")
    first = next(iter(r["levels"].values()))
    print(f"held-out samples: {', '.join(r['held_out'])} (prefill {'/'.join(map(str, r['prefill_tokens']))} "
          f"tokens; {first['positions']} teacher-forced positions, {first['greedy_tokens']} free-running tokens); "
          f"references: the fp32 bundle{' (cache)' if r['references']['cache_hit'] else ''}\n")
    cols = [(f"int4 {k}", v) for k, v in r["levels"].items()]
    if "calibration_report" in r:
        cols.append(("bundle's calibration_report.json (no level key)", r["calibration_report"]))
    print("| metric vs fp32 | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for key, label, fmt in ACCURACY_ROWS:
        print(f"| {label} | " + " | ".join(fmt.format(v[key]) if key in v else "-" for _, v in cols) + " |")
    print("| time to measure (s) | " + " | ".join(f"{v['report_s']:.1f}" if "report_s" in v else "-"
                                                  for _, v in cols) + " |")
    for name, d in r.get("between_levels", {}).items():
        print(f"\n{name} (teacher-forced logits at the same {d['positions']} positions, the first level as "
              f"reference): top-1 agreement {d['top1_agreement']:.4f}, KL mean / max {d['kl_mean']:.3g} / "
              f"{d['kl_max']:.3g} nats, logit relative RMS {d['logit_rel_rms_error']:.3g}, "
              f"max |diff| {d['max_abs_diff']:.3g}")


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--int4", required=True, help="the INT4 bundle (flashvl calibrate --llm int4)")
    ap.add_argument("--fp32", help="the fp32 bundle it was calibrated from (optional)")
    ap.add_argument("--levels", default="4,0", help="MatMulNBits accuracy levels to run (default 4,0)")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--past", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per cell")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="per-cell statistic of the steps for the table and every ratio (min: the least disturbed "
                         "step, for a machine shared with other work)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-invariance", action="store_true")
    ap.add_argument("--skip-op-check", action="store_true", help="skip the one-node MatMulNBits check")
    ap.add_argument("--accuracy", action="store_true",
                    help="instead of timing: the calibration report's LLM metrics at each level against --fp32")
    ap.add_argument("--samples", type=int,
                    help="--accuracy: the bundle's calibrate --samples, if it was given (picks the held-out set)")
    ap.add_argument("--holdout", type=int, help="--accuracy: held-out samples (default: flashvl calibrate's)")
    ap.add_argument("--cache-dir", help="--accuracy: calibrate's --cache-dir, if it was given")
    ap.add_argument("--report-tokens", type=int,
                    help="--accuracy: positions per held-out sample (default: flashvl calibrate's)")
    ap.add_argument("--out", default="build/int4-step")
    args = ap.parse_args()

    if args.accuracy:
        if not args.fp32:
            ap.error("--accuracy needs --fp32 (the references come from the fp32 bundle)")
        acc = accuracy(args)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "int4_accuracy.json"
        path.write_text(json.dumps(acc, indent=2, default=str) + "\n")
        print_accuracy(acc)
        print(f"wrote {path}")
        return

    import onnxruntime as ort
    from flashvl_edge.runtime.bench import machine_info

    rows_list = [int(r) for r in args.rows.split(",")]
    stat = f"{args.stat}_ms"
    nmax = max(rows_list)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    log(f"machine: {machine.get('cpu')} ({machine.get('logical_cpus')} CPUs, {machine.get('physical_cores')} "
        f"physical cores), onnxruntime {ort.__version__}, {args.threads} threads")
    probe = BandwidthProbe()
    bw = [probe()]
    log(f"bandwidth {bw[0]['bytes_per_s'] / 1e9:.1f} GB/s (numpy float32 matvec over 1 GiB, best of 5)")

    variants = [Variant(f"int4-L{lv}", Path(args.int4), int(lv)) for lv in args.levels.split(",")]
    if args.fp32:
        variants.append(Variant("fp32", Path(args.fp32), None))
    prof_dir = Path(tempfile.mkdtemp(prefix="int4-step-prof-", dir=out_dir))
    report: dict = {"machine": machine, "command": " ".join([Path(sys.executable).name] + sys.argv),
                    "settings": vars(args), "variants": {}}
    data = {}
    for v in variants:
        v.open(args.threads, str(prof_dir / v.name))
        data[v.name] = Rows(v, nmax, args.past, args.seed)
        log(f"{v.name}: loaded in {v.load_s:.1f} s (hidden {v.hidden}, {len(v.past_names) // 2} layers, "
            f"kv_heads {v.kv_heads}, head_dim {v.head_dim})")
        # profile first: the session's profiler stops for good at end_profiling, so the timed runs below
        # are not profiled
        feeds, _keep = data[v.name].feeds(v, list(range(nmax)))
        for _ in range(5 + args.profile_steps):  # 5 warm-up steps, then the profiled ones
            run(v, feeds)
        prof_file = v.session.end_profiling()
        report["variants"][v.name] = {"level": v.level, "bundle": str(v.bundle), "load_s": v.load_s,
                                      "profile": profile_breakdown(prof_file, args.past, args.profile_steps)}
        os.remove(prof_file)
    os.rmdir(prof_dir)

    # timing: repetitions interleaved, starting variant rotated
    cells = [str(r) for r in rows_list] + ["pad2"]
    timings: dict = {v.name: {c: [] for c in cells} for v in variants}
    for rep in range(args.reps):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for v in order:
            for c in cells:
                idx = [0, 0] if c == "pad2" else list(range(int(c)))
                feeds, _keep = data[v.name].feeds(v, idx)
                timings[v.name][c].append(time_step(v, feeds, args.steps))
        bw.append(probe())
        log(f"repetition {rep + 1}/{args.reps} done; bandwidth {bw[-1]['bytes_per_s'] / 1e9:.1f} GB/s; "
            + ", ".join(f"{v.name} " + "/".join(f"{timings[v.name][c][-1][stat]:.1f}" for c in cells)
                        for v in variants) + f" ms ({'/'.join(cells)})")

    def per_rep_median(t: dict, num: str, den: str, scale: float = 1.0) -> float:
        """Median over repetitions of scale x ms(den) / ms(num) (a rows/s ratio) or ms(num) / ms(den)."""
        return statistics.median(scale * t[den][i][stat] / t[num][i][stat] for i in range(args.reps))

    for v in variants:
        t = timings[v.name]
        med = {c: statistics.median(x[stat] for x in t[c]) for c in cells}
        summary = {"step_ms": med,
                   "rows_per_s": {c: int(c) * 1e3 / m for c, m in med.items() if c != "pad2"},
                   "pad2_over_1": per_rep_median(t, "1", "pad2")}  # ms(pad2) / ms(1)
        for c in cells:
            if c not in ("1", "pad2"):
                summary[f"rows_per_s_{c}_over_1"] = per_rep_median(t, c, "1", int(c))
        summary["per_rep_step_ms"] = {c: [x[stat] for x in t[c]] for c in cells}
        report["variants"][v.name].update(summary)
        report["variants"][v.name]["timings"] = t

    # cross-variant ratios per repetition (same run)
    names = [v.name for v in variants]
    cross = {}
    for a in names:
        for b in names:
            if a < b or a == b:
                continue
            cross[f"{a} / {b} step ms at 1 row"] = statistics.median(
                timings[a]["1"][i][stat] / timings[b]["1"][i][stat] for i in range(args.reps))
    if "int4-L0" in names and "int4-L4" in names:
        cross["int4-L0 pad2 / int4-L4 1 row"] = statistics.median(
            timings["int4-L0"]["pad2"][i][stat] / timings["int4-L4"]["1"][i][stat]
            for i in range(args.reps))
        cross["int4-L4 pad2 / int4-L4 1 row"] = report["variants"]["int4-L4"]["pad2_over_1"]
    report["cross"] = cross

    if not args.skip_invariance:
        for v in variants:
            inv = invariance(v, data[v.name], nmax)
            report["variants"][v.name]["invariance"] = inv
            report["variants"][v.name]["invariance_summary"] = summarize_invariance(inv)
            log(f"{v.name}: invariance checked")

    if not args.skip_op_check:
        report["op_check"] = op_check(args.threads, [int(lv) for lv in args.levels.split(",")])
        log("MatMulNBits one-node check done")

    del probe
    bw.append(BandwidthProbe()())
    report["bandwidth"] = {"runs": bw, "bytes_per_s": [b["bytes_per_s"] for b in bw]}
    path = out_dir / "int4_step.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report, rows_list)
    print(f"wrote {path}")


def print_report(r: dict, rows_list: list[int]) -> None:
    m = r["machine"]
    probes = " / ".join(f"{b / 1e9:.1f}" for b in r["bandwidth"]["bytes_per_s"])
    s = r["settings"]
    print(f"Machine: {m.get('cpu')} ({m.get('logical_cpus')} CPUs, {m.get('physical_cores')} physical cores), "
          f"onnxruntime {m.get('onnxruntime')}, {s['threads']} threads; bandwidth probes (GB/s, numpy float32 "
          f"matvec over 1 GiB, best of 5; start / after each repetition / end): {probes}")
    print(f"past {s['past']}, {s['reps']} repetitions x {s['steps']} steps per cell ({s['stat']} of the steps; "
          "median over repetitions), interleaved\n")
    cells = [str(c) for c in rows_list]
    print("| variant | " + " | ".join(f"step ms, {c} row{'s' if c != '1' else ''}" for c in cells)
          + " | rows/s 8 vs 1 | lone row padded to 2 / alone |")
    print("|---|" + "---|" * (len(cells) + 2))
    for name, v in r["variants"].items():
        last = cells[-1]
        print(f"| {name} | " + " | ".join(f"{v['step_ms'][c]:.2f}" for c in cells)
              + f" | {v.get(f'rows_per_s_{last}_over_1', float('nan')):.2f}x | {v['pad2_over_1']:.2f}x |")
    print()
    for k, val in r.get("cross", {}).items():
        print(f"  {k}: {val:.3f}")
    print()
    # every kind that takes >= 0.5% of some variant's kernel time, largest first; the rest summed
    share: dict[str, float] = {}
    for v in r["variants"].values():
        for k, f in v["profile"]["by_kind_fraction"].items():
            share[k] = max(share.get(k, 0.0), f)
    kinds = [k for k in sorted(share, key=lambda k: -share[k]) if share[k] >= 0.005]
    names = list(r["variants"])
    print(f"Profile of the {rows_list[-1]}-row step (kernel time per step, ms and share):\n")
    print("| op kind | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in kinds:
        cols = []
        for n in names:
            p = r["variants"][n]["profile"]
            if k in p["by_kind_ms_per_step"]:
                cols.append(f"{p['by_kind_ms_per_step'][k]:.2f} ({100 * p['by_kind_fraction'][k]:.0f}%)")
            else:
                cols.append("-")
        print(f"| {k} | " + " | ".join(cols) + " |")
    rest = []
    for n in names:
        p = r["variants"][n]["profile"]
        ms = sum(v for k, v in p["by_kind_ms_per_step"].items() if k not in kinds)
        rest.append(f"{ms:.2f} ({100 * ms / max(p['kernel_ms_per_step'], 1e-9):.0f}%)")
    print("| everything else | " + " | ".join(rest) + " |")
    print("| all kernels / whole run | " + " | ".join(
        f"{r['variants'][n]['profile']['kernel_ms_per_step']:.2f} / {r['variants'][n]['profile']['run_ms_per_step']:.2f}"
        for n in names) + " |")
    print()
    if any("invariance_summary" in v for v in r["variants"].values()):
        print("Batch invariance (logits of the last position; max |diff|, bitwise equal?):\n")
        comps = list(next(v for v in r["variants"].values() if "invariance_summary" in v)["invariance_summary"])
        print("| comparison | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for c in comps:
            cols = []
            for n in names:
                e = r["variants"][n].get("invariance_summary", {}).get(c)
                cols.append("-" if e is None else ("bitwise equal" if e["bitwise"] else f"{e['max_abs_diff']:.2e}"))
            print(f"| {c} | " + " | ".join(cols) + " |")
    if "op_check" in r:
        print_op_check(r["op_check"])


if __name__ == "__main__":
    main()
