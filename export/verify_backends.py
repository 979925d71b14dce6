"""``flashvl verify BUNDLE --backends ort,trt``: ONNX Runtime vs TensorRT parity, per graph and end to end.

Per graph: Polygraphy's ``Comparator`` runs the same feeds through ONNX Runtime (CPU, the reference) and
the TensorRT engine and compares every output with the tolerances of the engine's precision. The LLM is
compared at the prefill profile (profile 0, past = 0) on real token embeddings; the decode profile is
exercised by the end-to-end check.

End to end: the same chat turn (a real photo, a fixed question) is run greedily through both backends'
:class:`~flashvl_edge.runtime.pipeline.Pipeline`. The generated tokens must be identical, except that a
divergence is accepted at a *near tie*: a step where ONNX Runtime's own top-2 logit margin is below the
precision's margin tolerance (fp16/int8 rounding may legitimately flip such a step; anything else is a bug).

Without ``tensorrt`` (or without engines for this GPU) this stops first with a one-line BackendError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flashvl_edge.runtime.bundle import Bundle
from flashvl_edge.runtime.errors import BackendError

# (rtol, atol) per graph output class, and the top-2 logit margin under which a greedy flip is a near tie
TOLERANCES: dict[str, dict[str, Any]] = {
    "fp16": {"vision": (2e-2, 2e-2), "llm": (2e-2, 5e-2), "tie_margin": 0.05},
    "int8": {"vision": (5e-2, 1e-1), "llm": (5e-2, 2e-1), "tie_margin": 0.2},
    "best": {"vision": (5e-2, 1e-1), "llm": (5e-2, 2e-1), "tie_margin": 0.2},
}
E2E_PROMPT = "Describe this picture in one sentence."
E2E_TOKENS = 16


@dataclass
class GraphParity:
    graph: str
    passed: bool
    max_abs: dict[str, float]


def _feeds(bundle: Bundle, graph: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic, realistic inputs: a preprocessed photo for vision, real token embeddings for the LLM."""
    from flashvl_edge.runtime import images

    m = bundle.manifest
    rng = np.random.default_rng(seed)
    dtypes = {i.name: np.dtype(i.dtype) for i in m.graph(graph).inputs}
    if graph == "vision":
        pre = images.preprocess(_test_image(), m)
        return {"pixel_values": pre.pixel_values.astype(dtypes["pixel_values"])}
    table = np.load(bundle.path(m.embeddings.file), mmap_mode="r")
    ids = rng.integers(0, table.shape[0], size=12)
    return m.llm_feed(np.asarray(table[ids], dtypes["inputs_embeds"])[None])


def _test_image():
    """A real, deterministic photo-like image without extra dependencies (scikit-image if present)."""
    from flashvl_edge.runtime.samples import test_photo

    try:
        return test_photo("astronaut")
    except ImportError:
        y, x = np.mgrid[0:384, 0:512]
        return np.stack([(x % 256), (y % 256), ((x + y) // 3 % 256)], -1).astype(np.uint8)


def compare_runners(reference, candidate, ref_feed: dict[str, np.ndarray], rtol: float, atol: float,
                    verbose: bool = False) -> tuple[bool, dict[str, float]]:
    """Run two Polygraphy runners on one feed and compare with Polygraphy's comparator.

    The candidate gets the feed cast to its own input dtypes (TensorRT 8.6 binds int64 inputs as int32).
    Returns (all outputs within rtol/atol, max |difference| per output).
    """
    from polygraphy.comparator import Comparator, CompareFunc, IterationResult, RunResults
    from polygraphy.datatype import DataType
    from polygraphy.logger import G_LOGGER

    results = RunResults()
    with G_LOGGER.verbosity(G_LOGGER.INFO if verbose else G_LOGGER.ERROR + 1):  # Polygraphy is chatty
        for runner in (reference, candidate):
            with runner:
                # Polygraphy DataTypes (NumPy dtypes from this call are deprecated, and go in 0.60), as NumPy
                meta = {k: DataType.to_dtype(DataType.from_dtype(m.dtype), "numpy") if m.dtype is not None else None
                        for k, m in runner.get_input_metadata(use_numpy_dtypes=False).items()}
                feed = {k: (v.astype(meta[k]) if meta.get(k) is not None and v.dtype.kind == "i"
                            and np.dtype(meta[k]) != v.dtype else v)
                        for k, v in ref_feed.items()}
                outputs = runner.infer(feed)
                results.append((runner.name, [IterationResult(outputs, runner_name=runner.name)]))
        acc = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(rtol=rtol, atol=atol))
    ref_out, cand_out = results[0][1][0], results[1][1][0]
    max_abs = {n: float(np.max(np.abs(np.asarray(ref_out[n], np.float32) - np.asarray(cand_out[n], np.float32)),
                                initial=0.0))
               for n in ref_out.keys() if n in cand_out.keys()}
    return bool(acc), max_abs


def compare_graph(bundle: Bundle, graph: str, engine_file: str, precision: str,
                  version_compatible: bool = False) -> GraphParity:
    """ONNX Runtime (CPU) vs the TensorRT engine for one graph, through Polygraphy's runners.
    The LLM engine runs at profile 0 (prefill, past = 0), Polygraphy's default."""
    import tensorrt as trt
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner, get_trt_logger

    def runtime():
        rt = trt.Runtime(get_trt_logger())
        rt.engine_host_code_allowed = bool(version_compatible)  # version-compatible plans embed a lean runtime
        return rt

    rtol, atol = TOLERANCES[precision][graph]
    ok, max_abs = compare_runners(
        OnnxrtRunner(SessionFromOnnx(str(bundle.graph_path(graph)), providers=["cpu"]), name="ort"),
        TrtRunner(EngineFromBytes(BytesFromPath(str(bundle.path(engine_file))), runtime=runtime), name="trt"),
        _feeds(bundle, graph), rtol, atol)
    return GraphParity(graph, ok, max_abs)


def greedy_tokens(pipe) -> list[int]:
    """The end-to-end turn through one backend's Pipeline: chat's own greedy generation."""
    res = pipe.chat(E2E_PROMPT, _test_image(), max_new_tokens=E2E_TOKENS, temperature=0.0, ignore_eos=True)
    return res.token_ids


def margin_at(pipe, tokens: list[int], step: int) -> float:
    """The backend's top-1 minus top-2 logit at generation step ``step`` of the same turn, teacher-forced
    along ``tokens`` through its Generator (the prompt built as chat builds it)."""
    inputs = pipe.prefill_inputs(E2E_PROMPT, _test_image())
    gen = pipe.generator
    logits = gen.teacher_forced(gen.llm.new_cache(), inputs.token_ids, inputs.image_embeds, inputs.image_mask,
                                tokens[:step])[-1]
    top2 = np.sort(np.asarray(logits, np.float64))[-2:]
    return float(top2[1] - top2[0])


def run(bundle_path: str, backends: list[str]) -> int:
    backends = [b.strip() for b in backends if b.strip()]
    if sorted(set(backends)) != ["ort", "trt"]:
        raise BackendError(f"--backends compares ort with trt (got {','.join(backends) or 'nothing'}); use --backends ort,trt")
    from flashvl_edge.runtime.backends.trt import gpu_info, require_tensorrt, select_engine, trt_version

    require_tensorrt()
    bundle = Bundle.load(bundle_path)
    name, entry = select_engine(bundle.manifest, gpu_info(), trt_version())
    precision = entry.precision
    ok = True
    print(f"verify {bundle_path}: ONNX Runtime (CPU) vs TensorRT engines {name} ({precision})")
    for graph, g in entry.graphs.items():
        res = compare_graph(bundle, graph, g.file, precision, entry.version_compatible)
        ok &= res.passed
        worst = ", ".join(f"{k} max|d|={v:.3g}" for k, v in res.max_abs.items() if not k.startswith("present."))
        print(f"  {graph:6s} {'PASS' if res.passed else 'FAIL'} (rtol/atol {TOLERANCES[precision][graph]}): {worst}")
    from flashvl_edge.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(bundle_path, backend="trt", image_cache_bytes=0, kv_cache_bytes=0) as trt_pipe:
        trt_tokens = greedy_tokens(trt_pipe)
    with Pipeline.from_bundle(bundle_path, backend="ort", image_cache_bytes=0, kv_cache_bytes=0) as ort_pipe:
        ort_tokens = greedy_tokens(ort_pipe)
        div = next((i for i, (a, b) in enumerate(zip(ort_tokens, trt_tokens)) if a != b), None)
        step = div if div is not None else min(len(ort_tokens), len(trt_tokens))
        same = div is None and len(ort_tokens) == len(trt_tokens)
        margin = None if same else margin_at(ort_pipe, ort_tokens, step)
    if same:
        print(f"  greedy PASS: {len(ort_tokens)} identical tokens")
    else:
        tie = margin < TOLERANCES[precision]["tie_margin"]
        ok &= tie
        print(f"  greedy {'PASS' if tie else 'FAIL'}: tokens diverge at step {step}; ONNX Runtime's top-2 margin "
              f"there is {margin:.4f} ({'a near tie' if tie else 'not a tie'}, tie margin {TOLERANCES[precision]['tie_margin']})")
    return 0 if ok else 1
