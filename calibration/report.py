"""The accuracy report: quantized graphs against the FP32 references on held-out samples.

* Vision: cosine similarity between quantized and FP image embeddings per token (mean and min over
  all held-out tokens) and the largest absolute difference.
* LLM: teacher forcing on the FP model's own greedy continuation: both graphs read the same prefill
  (prompt with FP image embeddings spliced in) and then the same continuation tokens, so every
  position compares the two next-token distributions under an identical prefix. Reported: top-1
  agreement (same argmax), KL(FP || quantized) in nats (mean and max over positions) and the logits'
  relative RMS error; then free-running greedy decoding from the same prefill: the fraction of tokens
  equal to the FP model's and the mean identical prefix. For ``--int4-method awq`` the round-to-nearest
  INT4 graph is measured the same way on the same samples and reported beside it.
* Sizes: bytes of each graph (with its external data) before and after.

The report is written as ``calibration_report.json`` in the quantized bundle and printed as a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .quantize import METHODS

if TYPE_CHECKING:
    from flashvl_edge.runtime.generate import Generator

REPORT_FILE = "calibration_report.json"


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two [..., D] arrays (flattened to [N, D])."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(denom, 1e-30)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row, in nats, from logits [N, vocab]."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def vision_metrics(run_quantized: Callable[[np.ndarray], np.ndarray], pixels: Sequence[np.ndarray],
                   fp_embeds: Sequence[np.ndarray]) -> dict[str, Any]:
    cos, max_abs, ref_max = [], 0.0, 0.0
    for px, ref in zip(pixels, fp_embeds):
        q = np.asarray(run_quantized(px), np.float32)
        cos.append(cosine_rows(q, ref))
        max_abs = max(max_abs, float(np.abs(q - ref).max()))
        ref_max = max(ref_max, float(np.abs(ref).max()))
    c = np.concatenate(cos)
    return {"samples": len(pixels), "tokens": int(c.size), "cosine_mean": float(c.mean()),
            "cosine_min": float(c.min()), "max_abs_error": max_abs, "fp_max_abs": ref_max}


def llm_metrics(gen: "Generator", prefills: Sequence[np.ndarray], tokens: Sequence[np.ndarray],
                fp_logits: Sequence[np.ndarray]) -> dict[str, Any]:
    """The quantized LLM against the FP references ``tokens`` / ``fp_logits`` (the FP greedy continuation
    of each prefill and the logits that chose it).

    Teacher-forced: the quantized graph follows the FP continuation, so every position compares the two
    next-token distributions under an identical prefix (top-1 agreement, KL, logit error). Free-running:
    the quantized graph decodes greedily on its own from the same prefill, and the report counts the
    tokens equal to the FP model's at the same position and the length of the identical prefix.
    ``gen`` is the runtime ``Generator`` over the quantized decoder and the bundle's embedding table, so
    the quantized graph is fed exactly as ``flashvl chat`` feeds it."""
    agree, kls, err2, ref2, same, prefix = [], [], 0.0, 0.0, [], []
    for prefill, toks, ref in zip(prefills, tokens, fp_logits):
        # row i follows toks[:i]; the last FP token is never fed (nothing compares what follows it)
        q = gen.teacher_forced(gen.llm.new_cache(), inputs_embeds=prefill,
                               forced_tokens=[int(t) for t in toks[:-1]])
        agree.append(q.argmax(-1) == ref.argmax(-1))
        kls.append(kl_divergence(ref, q))
        err2 += float(((q.astype(np.float64) - ref) ** 2).sum())
        ref2 += float((ref.astype(np.float64) ** 2).sum())
        free, _ = gen.greedy(gen.llm.new_cache(), inputs_embeds=prefill, n_tokens=len(toks), stop=False)
        match = np.asarray(free[:len(toks)]) == np.asarray(toks[:len(free)])
        same.append(match)
        prefix.append(int(np.argmin(match)) if not match.all() else len(match))
    a, k, g = np.concatenate(agree), np.concatenate(kls), np.concatenate(same)
    return {"samples": len(prefills), "positions": int(a.size), "top1_agreement": float(a.mean()),
            "kl_mean": float(k.mean()), "kl_max": float(k.max()),
            "logit_rel_rms_error": (err2 / max(ref2, 1e-30)) ** 0.5,
            "greedy_agreement": float(g.mean()), "greedy_identical_prefix_mean": float(np.mean(prefix)),
            "greedy_tokens": int(g.size)}


def graph_bytes(model_path: Path, external_data: str | None) -> int:
    size = model_path.stat().st_size
    if external_data:
        ext = model_path.parent / external_data
        if ext.exists():
            size += ext.stat().st_size
    return size


def _llm_rows(label: str, l: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("llm", label, "next-token top-1 agreement", f"{l['top1_agreement'] * 100:.1f}% of {l['positions']}"),
            ("", "", "KL(FP || Q) mean / max [nats]", f"{l['kl_mean']:.4g} / {l['kl_max']:.4g}"),
            ("", "", "logit error (relative RMS)", f"{l['logit_rel_rms_error']:.4g}"),
            ("", "", "greedy agreement / identical prefix",
             f"{l['greedy_agreement'] * 100:.1f}% of {l['greedy_tokens']} / {l['greedy_identical_prefix_mean']:.1f} tokens")]


def format_table(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for the console."""
    rows = [("graph", "scheme", "metric", "value")]
    v = report.get("vision")
    if v:
        rows += [("vision", v["scheme"], "embedding cosine mean / min", f"{v['cosine_mean']:.5f} / {v['cosine_min']:.5f}"),
                 ("", "", "max abs error (FP max |x|)", f"{v['max_abs_error']:.4g} ({v['fp_max_abs']:.4g})")]
    l = report.get("llm")
    if l:
        # the method is named where it is not the scheme's usual one (AWQ; RTN and the INT8 ranges go unnamed)
        rows += _llm_rows(l["scheme"] + ("" if l.get("method") in (None, "rtn", *METHODS) else f" {l['method']}"), l)
    for method, other in report.get("llm_compared", {}).items():
        rows += _llm_rows(f"int4 {method} (not kept)", other)
    for name, s in report.get("sizes", {}).items():
        rows.append((name, "", "size before -> after", f"{s['before'] / 2**20:.2f} MiB -> {s['after'] / 2**20:.2f} MiB "
                                                      f"({s['after'] / max(s['before'], 1):.2f}x)"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    held = report.get("held_out", [])
    lines.append(f"held-out samples: {len(held)} ({', '.join(held)})")
    return "\n".join(lines)
