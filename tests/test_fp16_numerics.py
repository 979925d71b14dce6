"""fp16 export numerics at long positions: fp16 vs fp32 logits of the same tiny model stay within one flat
bound at positions ~100, ~2,000 and ~8,000.

The fp16 export keeps the rotary angles (position x frequency, tens of thousands of radians at long
positions, where fp16's spacing is 4 to 32) and RMSNorm's mean of squares (which overflows fp16 for
activations above ~256) in fp32 through explicit casts. These tests guard those casts. The fp16 graph is
run with ONNX's reference evaluator, which computes every op in the type the graph gives it, as a backend
that honours the graph's types does (a TensorRT engine built strongly typed, or weakly typed with those
layers pinned, see export/engines.py). ONNX Runtime's CPU provider is no test of this: it runs fp16 ops
that have no fp16 kernel (Pow, ReduceMean, Sqrt, Cos, Sin, ...) in fp32, casts or no casts. The fp32 graph,
the reference, runs on ONNX Runtime. No TensorRT here: what a TensorRT engine does with these layers only a
GPU run shows (tests/test_trt_gpu.py).

The model is the tiny-static preset with a 16,384-token position range (the preset itself stops at 2,048),
built in this module. Removing the casts fails these tests: measured by hand (the export's RMSNorm form
and transformers' rotary embedding monkeypatched to compute in the input's dtype), the relative logit
error becomes 0.04 / 0.57 at positions 2,000 / 8,000 (rotary angles in fp16) and 1.0 with large
activations (RMSNorm statistics in fp16), against at most 2e-3 with the casts.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

PRESET = "tiny-long-context"
POSITIONS = (100, 2000, 8000)
PROMPT = 8          # tokens of the prompt, at positions P .. P + 7
BOUND = 1e-2        # max |fp16 - fp32| / max |fp32| over the logits, at every position
# residual-stream activations of this size occur in real Qwen2 checkpoints (a few channels reach the
# hundreds to thousands); squared, they overflow fp16 (max 65504) unless the statistics are fp32
LARGE = 1000.0


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{"fp32": Bundle, "fp16": Bundle} of one random-init model whose max_position_embeddings is 16,384."""
    from flashvl_edge.export.families import build_preset, presets
    from flashvl_edge.export.onnx import export_bundle
    from flashvl_edge.runtime.bundle import Bundle

    spec = copy.deepcopy(presets.PRESETS["tiny-static"])
    spec["text_config"] = {**spec["text_config"], "max_position_embeddings": 16384}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets.PRESETS, PRESET, spec)
        loaded = build_preset(PRESET, seed=0)
    assert loaded.model.text_config.max_position_embeddings >= max(POSITIONS) + PROMPT
    root = tmp_path_factory.mktemp("fp16-numerics")
    return {dtype: Bundle.load(export_bundle(loaded, root / dtype, dtype=dtype, progress=False))
            for dtype in ("fp32", "fp16")}


def _session(bundle):
    """``run(feed) -> {output: array}``: ONNX Runtime for fp32, the reference evaluator for fp16."""
    import onnx

    path = str(bundle.graph_path("llm"))
    if bundle.manifest.dtype == "fp32":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return lambda feed: dict(zip(names, sess.run(None, feed)))
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(path)
    ref = ReferenceEvaluator(model)
    names = [o.name for o in model.graph.output]
    return lambda feed: dict(zip(names, ref.run(None, feed)))


def _prompt(bundle, scale: float = 1.0) -> np.ndarray:
    m = bundle.manifest
    table = np.load(bundle.path(m.embeddings.file))
    ids = np.random.default_rng(0).integers(0, table.shape[0], PROMPT + 1)
    return (table[ids][None].astype(np.float32) * scale).astype(table.dtype)


def _logits_at(bundle, position: int, scale: float = 1.0) -> np.ndarray:
    """Last-position logits of the prompt placed at ``position`` .. ``position + 7`` (empty cache)."""
    m = bundle.manifest
    feed = m.llm_feed(_prompt(bundle, scale)[:, :PROMPT])
    feed["position_ids"] = np.arange(position, position + PROMPT, dtype=np.int64)[None]
    return _session(bundle)(feed)["logits"].astype(np.float64).ravel()


def _far_logits(bundle, position: int) -> np.ndarray:
    """Logits of one token at ``position`` attending to a cache written at positions 0 .. 7."""
    m = bundle.manifest
    run = _session(bundle)
    x = _prompt(bundle)
    past = m.past_from_outputs(run(m.llm_feed(x[:, :PROMPT])))
    feed = {"inputs_embeds": x[:, PROMPT:], "attention_mask": np.ones((1, PROMPT + 1), np.int64),
            "position_ids": np.array([[position]], np.int64), **past}
    return run(feed)["logits"].astype(np.float64).ravel()


def _errors(fp16: dict, fp32: dict) -> dict[int, float]:
    return {p: float(np.abs(fp16[p] - fp32[p]).max() / np.abs(fp32[p]).max()) for p in fp32}


@pytest.mark.parametrize("scale", [1.0, LARGE], ids=["typical", "large-activations"])
def test_fp16_logits_track_fp32_at_long_positions(bundles, scale):
    """Typical activations check the rotary angles; large ones the RMSNorm statistics."""
    fp32 = {p: _logits_at(bundles["fp32"], p, scale) for p in POSITIONS}
    fp16 = {p: _logits_at(bundles["fp16"], p, scale) for p in POSITIONS}
    err = _errors(fp16, fp32)
    assert max(err.values()) < BOUND, err
    assert all(fp16[p].argmax() == fp32[p].argmax() for p in POSITIONS)


def test_fp16_attention_over_long_distances(bundles):
    fp32 = {p: _far_logits(bundles["fp32"], p) for p in POSITIONS}
    fp16 = {p: _far_logits(bundles["fp16"], p) for p in POSITIONS}
    err = _errors(fp16, fp32)
    assert max(err.values()) < BOUND, err
