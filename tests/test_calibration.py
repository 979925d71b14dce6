"""`flashvl calibrate`: quantized tiny bundles, their report, QDQ structure, cache reuse, bad input.

Both tiny presets are calibrated once per module (vision int8 + LLM int4 for the static one, vision
int8 + LLM int8 W8A8 for the dynamic-ISS one) through the real CLI entry point, on the built-in
offline data. The report's metrics are also shown to fail on deliberately broken graphs, so a
passing threshold means something.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from flashvl_edge.calibration import data, report
from flashvl_edge.main import main
from flashvl_edge.runtime.bundle import STAGING_PREFIX, Bundle

FAST = ["--samples", "6", "--holdout", "2", "--report-tokens", "8", "--quiet"]


def calibrate(bundle, out, *extra, cache=None) -> int:
    argv = ["calibrate", str(bundle), "--out", str(out), *FAST, *extra]
    if cache is not None:
        argv += ["--cache-dir", str(cache)]
    return main(argv)


@pytest.fixture(scope="module")
def calib_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("calib-cache")


@pytest.fixture(scope="module")
def static_q(tiny_static_bundle, tmp_path_factory, calib_cache):
    out = tmp_path_factory.mktemp("q") / "tiny-static-q"
    assert calibrate(tiny_static_bundle, out, "--vision", "int8", "--llm", "int4", cache=calib_cache) == 0
    return out


@pytest.fixture(scope="module")
def dynamic_q(tiny_dynamic_bundle, tmp_path_factory, calib_cache):
    out = tmp_path_factory.mktemp("q") / "tiny-dynamic-q"
    assert calibrate(tiny_dynamic_bundle, out, "--vision", "int8", "--llm", "int8", "--method", "max",
                     cache=calib_cache) == 0
    return out


def load_report(bundle: Path) -> dict:
    return json.loads((bundle / report.REPORT_FILE).read_text())


# -- the quantized bundles ---------------------------------------------------------------------

@pytest.mark.parametrize("which", ["static_q", "dynamic_q"])
def test_report_meets_thresholds(which, request):
    rep = load_report(request.getfixturevalue(which))
    v, l = rep["vision"], rep["llm"]
    assert v["cosine_mean"] >= 0.98 and v["cosine_min"] >= 0.9, v
    assert v["max_abs_error"] < 0.5 * v["fp_max_abs"], v
    assert l["positions"] == 2 * 8
    if l["scheme"] == "int8":
        assert l["top1_agreement"] >= 0.6 and l["kl_mean"] < 0.1, l
    else:
        # int4 RTN on this tiny random model is inherently lossy (64-wide weight columns, weight std
        # 0.24, peaky logits: 0.4-0.6 nats measured even at block 16); a sanity bound only, the
        # exactness of the int4 graph is checked in test_int4_graph_is_rtn_of_the_fp_weights.
        assert l["kl_mean"] < 1.0 and l["top1_agreement"] > 0.1, l
    assert rep["sizes"]["vision"]["after"] < rep["sizes"]["vision"]["before"]
    assert rep["sizes"]["llm"]["after"] < 0.7 * rep["sizes"]["llm"]["before"]
    assert len(rep["calibration_samples"]) == 6 and len(rep["held_out"]) == 2
    assert not set(rep["calibration_samples"]) & set(rep["held_out"])


def test_manifest_records_quantization(static_q, dynamic_q, tiny_static_bundle):
    for out, llm in ((static_q, "int4"), (dynamic_q, "int8")):
        b = Bundle.load(out, verify="full")  # every file hashed and listed, report included
        q = b.manifest.quantization
        assert q.vision == "int8" and q.llm == llm and q.report == report.REPORT_FILE
        assert q.tool == "onnxruntime.quantization" and q.tool_version == ort.__version__
        assert report.REPORT_FILE in b.manifest.files
    fp = Bundle.load(tiny_static_bundle, verify="full").manifest  # the source bundle is untouched
    q = Bundle.load(static_q).manifest
    # untouched files are the same bytes; the graphs are new
    for name in ("embed_tokens.npy", "tokenizer.json"):
        assert q.files[name] == fp.files[name]
    for g in ("vision", "llm"):
        assert q.files[q.graph(g).file].sha256 != fp.files[fp.graph(g).file].sha256
        assert q.graph(g).weight_bytes < fp.graph(g).weight_bytes


@pytest.mark.parametrize("which,fp", [("static_q", "tiny_static_bundle"), ("dynamic_q", "tiny_dynamic_bundle")])
def test_graph_io_unchanged(which, fp, request):
    qb, fb = Bundle.load(request.getfixturevalue(which)), Bundle.load(request.getfixturevalue(fp))
    for g in ("vision", "llm"):
        assert qb.manifest.graph(g).io == fb.manifest.graph(g).io
        sq = ort.InferenceSession(str(qb.graph_path(g)), providers=["CPUExecutionProvider"])
        sf = ort.InferenceSession(str(fb.graph_path(g)), providers=["CPUExecutionProvider"])
        sig = lambda args: [(a.name, a.type, a.shape) for a in args]  # noqa: E731
        assert sig(sq.get_inputs()) == sig(sf.get_inputs())
        assert sig(sq.get_outputs()) == sig(sf.get_outputs())


@pytest.mark.parametrize("which,fp", [("static_q", "tiny_static_bundle"), ("dynamic_q", "tiny_dynamic_bundle")])
def test_quantized_bundle_chats_through_runtime(which, fp, request):
    from flashvl_edge.runtime.pipeline import Pipeline
    import skimage.data

    image = skimage.data.chelsea()
    with Pipeline.from_bundle(request.getfixturevalue(which)) as qp, \
            Pipeline.from_bundle(request.getfixturevalue(fp)) as fpp:
        q = qp.chat("What is in the picture?", image=image, max_new_tokens=6, ignore_eos=True)
        f = fpp.chat("What is in the picture?", image=image, max_new_tokens=6, ignore_eos=True)
    assert len(q.token_ids) == 6
    assert q.n_image_tokens == f.n_image_tokens > 0
    assert q.prompt_token_ids == f.prompt_token_ids


def _inits(model):
    return {i.name: i for i in model.graph.initializer}


def _weight_dqs(model):
    """DequantizeLinear nodes whose input is a constant (the quantized weights)."""
    inits = _inits(model)
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def _attr(node, name, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


@pytest.mark.parametrize("which", ["static_q", "dynamic_q"])
def test_every_qdq_scale_is_positive(which, request):
    """TensorRT's ONNX parser rejects a Q/DQ node with any scale <= 0 ("Scale coefficients must all
    be positive"), e.g. from an all-zero weight column or activation."""
    b = Bundle.load(request.getfixturevalue(which))
    for g in ("vision", "llm"):
        model = onnx.load(str(b.graph_path(g)))
        inits = _inits(model)
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq
        for n in qdq:
            assert (numpy_helper.to_array(inits[n.input[1]]) > 0).all(), (g, n.name)
            if n.input[0] in inits:  # TensorRT dequantizes int8 and int4 only (no int32 bias DQ)
                assert inits[n.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4), n.name


@pytest.mark.parametrize("which", ["static_q", "dynamic_q"])
def test_quantized_graphs_pass_the_tensorrt_10_lint(which, request):
    """The engine builder's CPU-side lint (TensorRT 10 ONNX parser support, QDQ placement) has no errors."""
    from flashvl_edge.export.trt_support import lint_bundle

    findings = lint_bundle(Bundle.load(request.getfixturevalue(which)), "10")
    errors = [str(f) for fs in findings.values() for f in fs if f.severity == "error"]
    assert not errors, errors


@pytest.mark.parametrize("which,graph", [("static_q", "vision"), ("dynamic_q", "vision"), ("dynamic_q", "llm")])
def test_int8_qdq_is_symmetric_per_channel(which, graph, request):
    b = Bundle.load(request.getfixturevalue(which))
    model = onnx.load(str(b.graph_path(graph)))
    inits = _inits(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    dqs = _weight_dqs(model)
    assert dqs, "no quantized weights"
    per_channel = 0
    for dq in dqs:
        w = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]])
        assert w.dtype == np.int8
        if scale.ndim == 1 and scale.size > 1:  # per channel: one scale per output channel, axis set
            axis = _attr(dq, "axis", 1)
            assert scale.size == w.shape[axis]
            per_channel += 1
        if len(dq.input) > 2:
            assert not numpy_helper.to_array(inits[dq.input[2]]).any(), "weights must be symmetric"
    assert per_channel == len(dqs)
    # every weight MatMul reads a DQ'd weight and a Q->DQ activation with zero point 0 (TensorRT's form)
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in producers
                      and producers[n.input[1]] in dqs]
    assert weight_matmuls
    for mm in weight_matmuls:
        act_dq = producers[mm.input[0]]
        assert act_dq.op_type == "DequantizeLinear"
        assert numpy_helper.to_array(inits[act_dq.input[1]]).size == 1  # per-tensor activation scale
        assert not numpy_helper.to_array(inits[act_dq.input[2]]).any()


@pytest.mark.parametrize("which,graph", [("static_q", "vision"), ("dynamic_q", "vision"), ("dynamic_q", "llm")])
def test_int8_matmuls_fuse_to_integer_kernels(which, graph, request, tmp_path):
    """Every quantized MatMul runs as an integer kernel in ONNX Runtime (none left in float with its
    weight dequantized each run), and the q.k^T products of the vision graph are among them. Fails
    when Q/DQ pairs share scale initializers: ORT then merges them and skips the fusion."""
    b = Bundle.load(request.getfixturevalue(which))
    model = onnx.load(str(b.graph_path(graph)))
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized = [n for n in model.graph.node if n.op_type == "MatMul"
                 and all(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input[:2])]
    inits = _inits(model)
    scores = [n for n in quantized if not any(i in inits for i in producers[n.input[1]].input[:1])]
    assert (len(scores) > 0) == (graph == "vision")  # q.k^T only in the vision graph
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(b.graph_path(graph)), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    ops = [n.op_type for n in opt.graph.node]
    integer = ops.count("MatMulIntegerToFloat") + ops.count("QLinearMatMul")
    assert integer == len(quantized), (integer, len(quantized))
    opt_producers = {o: n for n in opt.graph.node for o in n.output}
    float_dq = [n.name for n in opt.graph.node if n.op_type in ("MatMul", "FusedMatMul")
                and any(i in opt_producers and opt_producers[i].op_type == "DequantizeLinear" for i in n.input)]
    assert not float_dq


def test_int4_blocked_dq_fuses_to_matmulnbits(static_q, tmp_path):
    b = Bundle.load(static_q)
    model = onnx.load(str(b.graph_path("llm")))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = _inits(model)
    dqs = _weight_dqs(model)
    assert dqs
    for dq in dqs:
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
        assert _attr(dq, "block_size") == 128 and _attr(dq, "axis") == 0
    # ONNX Runtime's CPU provider folds each DQ+MatMul pair into its MatMulNBits kernel
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(b.graph_path("llm")), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulNBits") == len(dqs)
    assert "DequantizeLinear" not in ops


def test_int4_graph_is_rtn_of_the_fp_weights(static_q, tiny_static_bundle):
    """Each int4 weight dequantizes to within one step of the FP weight, and the int4 graph computes
    exactly what the FP graph computes with those dequantized weights (so axis/blocks are right)."""
    qm = onnx.load(str(Bundle.load(static_q).graph_path("llm")))
    fm = onnx.load(str(Bundle.load(tiny_static_bundle).graph_path("llm")))
    q_inits, f_inits = _inits(qm), _inits(fm)
    producers = {o: n for n in qm.graph.node for o in n.output}
    q_mm = [n for n in qm.graph.node if n.op_type == "MatMul" and n.input[1] in producers
            and producers[n.input[1]].op_type == "DequantizeLinear"]
    f_mm = [n for n in fm.graph.node if n.op_type == "MatMul" and n.input[1] in f_inits]
    assert len(q_mm) == len(f_mm) > 0  # every weight MatMul quantized, in the same order
    for qn, fn in zip(q_mm, f_mm):
        dq = producers[qn.input[1]]
        w4 = numpy_helper.to_array(q_inits[dq.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(q_inits[dq.input[1]])
        w = numpy_helper.to_array(f_inits[fn.input[1]])
        assert w4.shape == w.shape and w4.min() >= -7 and w4.max() <= 7  # symmetric, absmax / 7
        per_elem = np.repeat(scale, 128, axis=0)[: w.shape[0]]
        deq = w4 * per_elem
        assert np.all(scale > 0)  # TensorRT's parser refuses non-positive Q/DQ scales
        assert np.all(np.abs(deq - w) <= per_elem * 0.5001 + 1e-12)  # round to nearest: within half a step
        f_inits[fn.input[1]].CopyFrom(numpy_helper.from_array(deq.astype(np.float32), fn.input[1]))
    rng = np.random.default_rng(1)
    manifest = Bundle.load(tiny_static_bundle).manifest
    feed = manifest.llm_feed(rng.standard_normal((1, 9, manifest.llm.hidden_size)).astype(np.float32))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(fm.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    got = ort.InferenceSession(qm.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_graphs_with_external_data(tiny_static_bundle, tmp_path, calib_cache):
    """Full-size graphs keep their weights in an external data file: the quantized bundle must name its
    own, and writing it must not touch the FP bundle's (untouched files are hard links)."""
    from flashvl_edge.runtime.bundle import finalize_manifest
    from flashvl_edge.runtime.contract import Manifest
    from flashvl_edge.runtime.pipeline import Pipeline

    src = tmp_path / "fp"
    shutil.copytree(tiny_static_bundle, src)
    manifest = json.loads((src / "manifest.json").read_text())
    for g in ("vision", "llm"):
        path = src / manifest["graphs"][g]["file"]
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        manifest["graphs"][g]["external_data"] = path.name + ".data"
    fp_files = finalize_manifest(src, Manifest.from_json(manifest, require_files=False)).files
    out = tmp_path / "q"
    assert calibrate(src, out, "--vision", "none", "--llm", "int4", cache=calib_cache) == 0
    Bundle.load(src, verify="full")
    q = Bundle.load(out, verify="full").manifest
    ext = q.graph("llm").external_data
    assert ext in q.files and (out / ext).stat().st_size > 0
    assert q.files[ext].sha256 != fp_files[ext].sha256
    # the unquantized vision graph is the same bytes, but a copy: onnx refuses to load external data
    # from a file with several hard links, so linking it would break both bundles for onnx tools
    vext = q.graph("vision").external_data
    assert q.files[vext] == fp_files[vext]
    for bundle in (src, out):
        for g in ("vision", "llm"):
            for name in q.graph(g).files:
                assert (bundle / name).stat().st_nlink == 1, name
            onnx.load(str(bundle / q.graph(g).file))  # external data loads
    # other files may be hard links (no second copy of a 1 GB embedding table), same bytes either way
    assert (out / "embed_tokens.npy").read_bytes() == (src / "embed_tokens.npy").read_bytes()
    with Pipeline.from_bundle(out) as pipe:
        assert len(pipe.chat("Hi there", max_new_tokens=3, ignore_eos=True).token_ids) == 3


# -- the metrics catch broken graphs -----------------------------------------------------------

def test_vision_metric_fails_when_image_is_ignored(tiny_static_bundle):
    from flashvl_edge.runtime.backends.ort import OrtRunner
    from flashvl_edge.runtime.images import preprocess

    b = Bundle.load(tiny_static_bundle)
    samples = data.select_samples(None, data.load_prompts(None), 2, 2)
    pixels = [preprocess(s.image, b.manifest).pixel_values for s in samples.held_out]
    with OrtRunner(b.graph_path("vision"), device="cpu") as r:
        run = lambda px: r.infer({"pixel_values": px})["image_embeds"]  # noqa: E731
        refs = [run(px) for px in pixels]
        assert report.vision_metrics(run, pixels, refs)["cosine_min"] > 0.9999
        # a graph that ignores its image (always answers for the first one) must fail the threshold
        broken = report.vision_metrics(lambda px: run(pixels[0]), pixels, refs)
    assert broken["cosine_mean"] < 0.98


def test_llm_metric_fails_when_kv_cache_is_dropped(tiny_static_bundle):
    from flashvl_edge.runtime.backends.ort import OrtDecoder

    from flashvl_edge.runtime.generate import Generator

    b = Bundle.load(tiny_static_bundle)
    table = np.load(b.path(b.manifest.embeddings.file))
    rng = np.random.default_rng(0)
    prefills = [table[rng.integers(10, 500, size=n)][None] for n in (12, 20)]
    with OrtDecoder(b.graph_path("llm"), device="cpu") as dec:
        gen = Generator(dec, table, image_token_id=-1)
        refs = [data.greedy_reference(gen, p, 8) for p in prefills]
        toks, logits = [r[0] for r in refs], [r[1] for r in refs]
        assert all(t.shape == (8,) and lg.shape == (8, table.shape[0]) for t, lg in zip(toks, logits))
        good = report.llm_metrics(gen, prefills, toks, logits)
        assert good["top1_agreement"] == 1.0 and good["kl_mean"] < 1e-6 and good["positions"] == 16

        from broken import CacheDroppingRunner  # forgets the past at every decode step

        broken = report.llm_metrics(Generator(CacheDroppingRunner(dec), table, image_token_id=-1), prefills, toks,
                                    logits)
    assert broken["kl_mean"] > 100 * max(good["kl_mean"], 1e-6) and broken["kl_mean"] > 1e-3


# -- data and cache ------------------------------------------------------------------------------

def test_builtin_data_is_deterministic_and_split():
    prompts = data.load_prompts(None)
    assert len(prompts) >= 20
    a = data.select_samples(None, prompts, None)
    b = data.select_samples(None, prompts, None)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.calibration) == data.DEFAULT_SAMPLES and len(a.held_out) == data.DEFAULT_HOLDOUT
    held = [s.name for s in a.held_out]
    assert not set(held) & {s.name for s in a.calibration}
    photos = {f"builtin:{n}" for n, _ in data.BUILTIN_IMAGES[:15]}
    assert set(held) & photos and set(held) - photos  # the report sees photos and rendered images
    assert all(s.image.mode == "RGB" for s in a.calibration + a.held_out)


def test_cache_reuse_and_user_data(tiny_static_bundle, tmp_path):
    import skimage.data
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("astronaut", "coffee", "rocket", "camera", "page"):
        Image.fromarray(getattr(skimage.data, name)()).save(images / f"{name}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\nWhat is this?\n\n<image> Describe it.\n")
    cache = tmp_path / "cache"
    args = ("--images", str(images), "--prompts", str(prompts), "--samples", "3", "--holdout", "2",
            "--llm", "int4", "--vision", "none")
    before = data.capture_count
    assert calibrate(tiny_static_bundle, tmp_path / "q1", *args, cache=cache) == 0
    assert data.capture_count == before + 1
    (cache_file,) = cache.glob("*.npz")
    stamp = cache_file.stat().st_mtime_ns
    r1 = load_report(tmp_path / "q1")
    assert r1["calibration_data"]["cache_hit"] is False and r1["calibration_data"]["source"] == str(images)
    assert "vision" not in r1 and Bundle.load(tmp_path / "q1").manifest.quantization.vision is None
    # INT4 is round-to-nearest: only the held-out references were captured, no calibration samples
    assert (r1["calibration_data"]["samples"], r1["calibration_data"]["held_out"]) == (0, 2)

    assert calibrate(tiny_static_bundle, tmp_path / "q2", *args, cache=cache) == 0
    assert data.capture_count == before + 1, "second run recaptured instead of using the cache"
    assert cache_file.stat().st_mtime_ns == stamp
    r2 = load_report(tmp_path / "q2")
    assert r2["calibration_data"]["cache_hit"] is True
    assert r2["llm"] == r1["llm"]  # same inputs, same quantized graph, same numbers

    # different data -> different key -> captured again
    prompts.write_text("Something else entirely?\n")
    assert calibrate(tiny_static_bundle, tmp_path / "q3", *args, cache=cache) == 0
    assert data.capture_count == before + 2 and len(list(cache.glob("*.npz"))) == 2

    # INT8 vision needs the calibration split: a held-out-only cache entry does not serve it
    int8_args = args[:-4] + ("--llm", "none", "--vision", "int8")
    assert calibrate(tiny_static_bundle, tmp_path / "q4", *int8_args, cache=cache) == 0
    assert data.capture_count == before + 3
    assert load_report(tmp_path / "q4")["calibration_data"]["samples"] == 3


# -- bad input -------------------------------------------------------------------------------------

def _setup_bad(kind: str, tmp_path: Path, static_q: Path):
    """(extra CLI args, bundle override) for one kind of bad input."""
    if kind == "empty-images":
        (tmp_path / "empty").mkdir()
        return ["--images", str(tmp_path / "empty")], None
    if kind == "unreadable-images":
        d = tmp_path / "broken"
        d.mkdir()
        (d / "a.jpg").write_bytes(b"not a jpeg at all")
        (d / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        return ["--images", str(d)], None
    if kind == "too-few-samples":
        import skimage.data
        from PIL import Image

        d = tmp_path / "few"
        d.mkdir()
        for n in ("coffee", "chelsea", "rocket"):
            Image.fromarray(getattr(skimage.data, n)()).save(d / f"{n}.jpg")
        return ["--images", str(d), "--samples", "5"], None
    if kind == "too-many-builtin":
        return ["--samples", "500"], None
    if kind == "already-quantized":
        return [], static_q
    if kind == "missing-prompts":
        return ["--prompts", str(tmp_path / "nope.txt")], None
    if kind == "empty-prompts":
        (tmp_path / "p.txt").write_text("# only a comment\n\n   \n")
        return ["--prompts", str(tmp_path / "p.txt")], None
    if kind == "binary-prompts":
        (tmp_path / "p.bin").write_bytes(b"\xff\xfe\x00\x81binary")
        return ["--prompts", str(tmp_path / "p.bin")], None
    if kind == "two-placeholders":
        (tmp_path / "p2.txt").write_text("<image> and <image>?\n")
        return ["--prompts", str(tmp_path / "p2.txt")], None
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty-images", "unreadable-images", "too-few-samples", "too-many-builtin",
                                  "already-quantized", "missing-prompts", "empty-prompts", "binary-prompts",
                                  "two-placeholders"])
def test_bad_input_exits_2_and_writes_nothing(kind, tiny_static_bundle, static_q, tmp_path, capsys):
    extra, bundle = _setup_bad(kind, tmp_path, static_q)
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "q"
    argv = ["calibrate", str(bundle or tiny_static_bundle), "--out", str(out), "--quiet",
            "--cache-dir", str(tmp_path / "cache"), *extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("flashvl: error: ") and len(err[-1]) < 400, err
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_existing_output_needs_force(tiny_static_bundle, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["calibrate", str(tiny_static_bundle), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
