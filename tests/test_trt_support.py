"""The CPU-side TensorRT checks: the ONNX-op lint (export/trt_support.py) on real exported graphs and on
small hand-built graphs, each of which carries exactly one defect the lint must name."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashvl_edge.export import trt_support
from flashvl_edge.export.trt_support import errors, lint, op_status, resolve_trt_version
from flashvl_edge.runtime.bundle import Bundle


def _save(tmp_path, nodes, inputs, outputs, inits=(), opset=18, name="g.onnx", extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _codes(findings, severity="error"):
    return sorted({f.code for f in findings if f.severity == severity})


def _relu_graph(tmp_path, **kw):
    return _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["n", 4])], [_vi("y", ["n", 4])], **kw)


def _qdq_matmul(tmp_path, *, per_channel=True, dangling_q=False, zero_point=0, scale_axis=1):
    """x -> Q -> DQ -> MatMul(., DQ(W int8)) -> y; knobs break one QDQ rule at a time."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 127, size=(8, 6), dtype=np.int8)
    n_scales = w.shape[scale_axis] if per_channel else None
    w_scale = np.full((n_scales,), 0.01, np.float32) if per_channel else np.array(0.01, np.float32)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(zero_point, np.int8), "x_zp")]
    w_dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_dq",
                            **({"axis": scale_axis} if per_channel else {}))
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="x_dq"),
             w_dq, helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    if dangling_q:
        nodes.append(helper.make_node("QuantizeLinear", ["y", "x_scale", "x_zp"], ["unused"], name="dangling"))
    return _save(tmp_path, nodes, [_vi("x", ["n", 8])], [_vi("y", ["n", 6])], inits, opset=13)


# ---------------------------------------------------------------------------------------------
# the table


def test_support_table_is_data_with_its_source():
    table = json.loads(trt_support.DATA_FILE.read_text())
    assert "onnx-tensorrt" in table["source"]["document"]
    assert table["versions"]["8.6"]["opset_max"] == 17
    assert (table["versions"]["10.0"]["opset_min"], table["versions"]["10.0"]["opset_max"]) == (9, 20)
    assert resolve_trt_version("10") == "10.3" and resolve_trt_version("8") == "8.6"
    assert op_status("MatMul", "8.6")[0] == "ok"
    assert op_status("LayerNormalization", "8.6")[0] == "ok"          # added in 8.6
    assert op_status("RMSNormalization", "10.3") == ("newer", "10.15")  # added in 10.15
    assert op_status("MatMulInteger", "10.3")[0] == "unsupported"


def test_jetpack_aliases_follow_the_release_notes():
    """JetPack 7.0 / 7.1 (Jetson Linux r38.2 / r38.4, Thor) ship TensorRT 10.13, JetPack 6.1 / 6.2 10.3,
    JetPack 6.0 8.6; each alias cites where that comes from."""
    table = trt_support.support_table()
    assert resolve_trt_version("jetpack7") == resolve_trt_version("jetpack7.1") == "10.13"
    assert resolve_trt_version("jetpack6") == resolve_trt_version("jetpack6.2") == "10.3"
    assert resolve_trt_version("jetpack6.0") == "8.6"
    for alias in ("jetpack7", "jetpack6", "jetpack6.0"):
        assert "JetPack" in table["alias_sources"][alias] and "https://" in table["alias_sources"][alias]
    assert trt_support._version_entry("10.13")["opset_max"] == 20  # the newest documented range at or below it


def _rms_norm_graph(tmp_path, fp16=False, name="rms.onnx"):
    """x -> [Cast to float] -> x / sqrt(mean(x^2) + eps) -> * w, and position_ids -> Cast -> * inv_freq ->
    Concat -> Cos/Sin: the exporter's RMSNorm and rotary forms (an fp16 graph casts around them)."""
    ft = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.ones(4, np.float16 if fp16 else np.float32), "w"),
             numpy_helper.from_array(np.ones((1, 1, 2), np.float32), "inv_freq")]
    nodes = []
    x = "x"
    if fp16:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="up"))
        x = "x32"
    nodes += [helper.make_node("Pow", [x, "two"], ["sq"], name="pow"),
              helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean"),
              helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
              helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
              helper.make_node("Div", [x, "rms"], ["normed"], name="div")]
    if fp16:
        nodes.append(helper.make_node("Cast", ["normed"], ["normed16"], to=TensorProto.FLOAT16, name="down"))
    nodes += [helper.make_node("Mul", ["w", "normed16" if fp16 else "normed"], ["y"], name="scale"),
              helper.make_node("Unsqueeze", ["position_ids", "axes"], ["pos3"], name="pos_unsqueeze"),
              helper.make_node("Cast", ["pos3"], ["posf"], to=TensorProto.FLOAT, name="pos_cast"),
              helper.make_node("Mul", ["posf", "inv_freq"], ["freqs"], name="freqs"),
              helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1, name="emb"),
              helper.make_node("Cos", ["emb"], ["cos"], name="cos"),
              helper.make_node("Sin", ["emb"], ["sin"], name="sin")]
    return _save(tmp_path, nodes, [_vi("x", [1, 3, 4], ft), _vi("position_ids", [1, 3], TensorProto.INT64)],
                 [_vi("y", [1, 3, 4], ft), _vi("cos", [1, 3, 4]), _vi("sin", [1, 3, 4])], inits, name=name)


@pytest.mark.parametrize("fp16", [False, True])
def test_fp32_layers_are_the_rope_and_rmsnorm_statistics(tmp_path, fp16):
    """The layers a weakly typed fp16 build pins: the RMSNorm chain (with its up-cast in an fp16 graph), the
    float part of the rotary angles; not the weight multiply, the down-cast, or index ops."""
    found = trt_support.fp32_layers_of(_rms_norm_graph(tmp_path, fp16))
    by_kind = {k: [f.node for f in found if f.kind == k] for k in ("rmsnorm", "rope")}
    assert by_kind["rmsnorm"] == (["up"] if fp16 else []) + ["pow", "mean", "add_eps", "sqrt", "div"]
    assert by_kind["rope"] == ["pos_cast", "freqs", "emb", "cos", "sin"]
    assert {f.tensor for f in found if f.node == "div"} == {"normed"}


def test_fp32_layers_need_the_whole_rmsnorm_pattern(tmp_path):
    """A ReduceMean that is not a mean of squares closed by a division (or multiply) by x is left alone."""
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], name="plain_mean"),
             helper.make_node("Relu", ["m"], ["y"], name="relu")]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    path = _save(tmp_path, nodes, [_vi("x", [2, 4])], [_vi("y", [2, 1])], [axes])
    assert trt_support.fp32_layers_of(path) == []


# ---------------------------------------------------------------------------------------------
# graphs with one defect each


def test_clean_graph_has_no_findings(tmp_path):
    assert lint(_relu_graph(tmp_path), "10") == []


def test_contrib_op_is_an_error(tmp_path):
    node = helper.make_node("MatMulNBits", ["x", "b"], ["y"], domain="com.microsoft", name="mm4")
    path = _save(tmp_path, [node], [_vi("x", [1, 4]), _vi("b", [4, 4])], [_vi("y", [1, 4])],
                 extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    found = errors(lint(path, "10"))
    assert [f.code for f in found] == ["domain"] and "com.microsoft" in found[0].message and found[0].node == "mm4"


def test_unsupported_and_too_new_ops(tmp_path):
    nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["c"], name="mmi"),
             helper.make_node("Unique", ["x"], ["u"], name="uniq")]
    path = _save(tmp_path, nodes, [_vi("a", [2, 2], TensorProto.INT8), _vi("b", [2, 2], TensorProto.INT8),
                                   _vi("x", [4])], [_vi("c", [2, 2], TensorProto.INT32), _vi("u", [None])])
    found = errors(lint(path, "10"))
    assert {f.node for f in found if f.code == "unsupported-op"} == {"mmi", "uniq"}
    # an op TensorRT parses only from a later release than the target
    rms = helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="rms")
    path = _save(tmp_path, [rms], [_vi("x", [2, 4]), _vi("s", [4])], [_vi("y", [2, 4])], opset=23, name="rms.onnx")
    assert "op-needs-newer-trt" in _codes(lint(path, "10.3"))
    assert "op-needs-newer-trt" not in _codes(lint(path, "10.15"))


def test_opset_out_of_range(tmp_path):
    # outside the documented range: a warning (nodes are then checked one by one)
    # (10.x documents 9..20; NVIDIA's parser imports older opsets too: a warning, see the parser tests below)
    assert _codes(lint(_relu_graph(tmp_path, opset=8, name="b.onnx"), "10"), "warning") == ["opset"]
    found = lint(_relu_graph(tmp_path, opset=18), "8.6")                                 # 8.6: up to 17
    assert errors(found) == [] and _codes(found, "warning") == ["opset"]
    assert lint(_relu_graph(tmp_path, opset=17, name="a.onnx"), "8.6") == []
    assert _codes(lint(_relu_graph(tmp_path, opset=21, name="c.onnx"), "10"), "warning") == ["opset"]


def test_opset18_reduce_axes_input_fails_on_trt86(tmp_path):
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm")
    path = _save(tmp_path, [node], [_vi("x", [2, 4])], [_vi("y", [2, 1])], [axes], opset=18)
    assert errors(lint(path, "10")) == []
    assert [(f.code, f.node) for f in errors(lint(path, "8.6"))] == [("restriction", "rm")]


def test_restriction_non_constant_axes(tmp_path):
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm")
    path = _save(tmp_path, [node], [_vi("x", [2, 4]), _vi("axes", [1], TensorProto.INT64)], [_vi("y", [2, 1])])
    assert _codes(lint(path, "10")) == ["restriction"]


def test_qdq_well_formed_passes(tmp_path):
    assert errors(lint(_qdq_matmul(tmp_path), "10")) == []
    assert errors(lint(_qdq_matmul(tmp_path), "8.6")) == []


def test_qdq_dangling_quantize(tmp_path):
    """NVIDIA's parser and builder accept it (see the parser tests below): a warning naming the node."""
    found = lint(_qdq_matmul(tmp_path, dangling_q=True), "10")
    assert errors(found) == []
    assert {(f.code, f.node) for f in found if f.severity == "warning"} == {("qdq-dangling", "dangling")}


def test_qdq_per_tensor_weight_is_a_warning(tmp_path):
    """TensorRT's parser and builder accept one scale for a whole weight matrix (less accurate, not an
    error), so the lint warns and the build goes on."""
    found = lint(_qdq_matmul(tmp_path, per_channel=False), "10")
    assert errors(found) == []
    assert [(f.code, f.node) for f in found if f.severity == "warning"] == [("qdq-per-tensor-weight", "w_dq")]


def test_qdq_weight_on_the_wrong_axis_warns(tmp_path):
    found = lint(_qdq_matmul(tmp_path, scale_axis=0), "10")
    assert _codes(found, "warning") == ["qdq-weight-axis"] and errors(found) == []


def test_qdq_nonzero_zero_point(tmp_path):
    found = errors(lint(_qdq_matmul(tmp_path, zero_point=3), "10"))
    assert {f.code for f in found} == {"qdq-zero-point"} and {f.node for f in found} == {"x_q", "x_dq"}


def test_int4_block_quantization_needs_trt10(tmp_path):
    w = numpy_helper.from_array(np.zeros((4, 8), np.int8), "w4")
    w.data_type = TensorProto.INT4  # re-typed: only dims and type matter to the lint
    w.ClearField("raw_data")
    w.raw_data = bytes(16)
    inits = [w, numpy_helper.from_array(np.ones((1, 8), np.float32), "s")]
    dq = helper.make_node("DequantizeLinear", ["w4", "s"], ["w"], axis=0, block_size=4, name="dq4")
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    path = _save(tmp_path, [dq, mm], [_vi("x", [1, 4])], [_vi("y", [1, 8])], inits, opset=21)
    assert "qdq-needs-trt10" in _codes(lint(path, "8.6"))
    assert "qdq-needs-trt10" not in _codes(lint(path, "10.15"))


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(trt_support.LintError, match="not a readable ONNX model"):
        lint(bad)


def test_external_data_is_not_read(tmp_path):
    """A graph whose weights live in external data lints without them (the data file may even be absent)."""
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", ["n", 64])],
                 [_vi("y", ["n", 64])], [w])
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    assert lint(path, "10") == []


# ---------------------------------------------------------------------------------------------
# the real exported graphs


@pytest.mark.parametrize("which", ["tiny_static_bundle", "tiny_dynamic_bundle"])
def test_exported_bundles_lint_clean_for_trt10(which, request):
    from flashvl_edge.export.engines import default_limits, graph_profiles

    bundle = Bundle.load(request.getfixturevalue(which))
    profiles = graph_profiles(bundle.manifest, default_limits(bundle.manifest))
    results = trt_support.lint_bundle(bundle, "10", profiles)
    assert set(results) == {"vision", "llm"}
    assert {g: errors(f) for g, f in results.items()} == {"vision": [], "llm": []}


def test_dynamic_axis_fixed_in_graph_is_caught(tiny_static_bundle):
    """The same graph checked against a manifest entry that claims a dim the graph fixes."""
    bundle = Bundle.load(tiny_static_bundle)
    spec = bundle.graph("llm")
    # the graph's kv_heads dim is static; a manifest that says it is dynamic must be flagged
    inputs = list(spec.inputs)
    inputs[3] = dataclasses.replace(inputs[3], shape=(inputs[3].shape[0], "kv_heads", *inputs[3].shape[2:]))
    entry = dataclasses.replace(spec, io=dataclasses.replace(spec.io, inputs=tuple(inputs)))
    found = errors(lint(bundle.graph_path("llm"), "10", entry))
    assert found and {f.code for f in found} == {"dynamic-axis"}


# ---------------------------------------------------------------------------------------------
# every TensorRT 10 rule against NVIDIA's own parser and builder (TensorRT-RTX's; the tensorrt-rtx extra)
#
# One graph per rule, made to trigger it. A lint error must be a graph NVIDIA's parser or builder rejects,
# and a graph they accept must get no error (a warning at most). What this settled: the CumSum-axis rule
# went (both accept a run-time axis), Resize "cubic" is allowed, Squeeze/Unsqueeze need constant axes on
# every release (was: before 10.7 only), an opset below the documented range and the Q/DQ placement rules
# are warnings (both accept them). Rules about older releases only (8.6's opset 17, functions before 9,
# INT4 before 10, Slice axes before 10.3, INT64 before 9, ops newer than the target) are checked against
# the release notes above, as no parser of those releases runs here.


def _real_verdict(path, profile=None) -> str:
    """"ok", or why NVIDIA's parser (then builder) rejects the graph; shape inputs get a one-value profile."""
    if _rtx_required():
        import tensorrt_rtx_bindings as trt
    else:
        trt = pytest.importorskip("tensorrt_rtx_bindings")
    from flashvl_edge.export.engines import _capturing_logger, _parse_network
    from flashvl_edge.runtime.errors import ExportError

    logger = _capturing_logger(trt)
    try:
        builder, network, parser = _parse_network(trt, path, True, logger)
    except ExportError as e:
        return f"parse: {e}"
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.is_shape_tensor:
            n = max(1, t.shape[0]) if len(t.shape) else 1
            prof.set_shape_input(t.name, [1] * n, [1] * n, [1] * n)
            dynamic = True
        elif profile and t.name in profile:
            prof.set_shape(t.name, *profile[t.name])
            dynamic = True
        elif any(d < 0 for d in t.shape):  # a dynamic dim: one size, 2
            shape = tuple(2 if d < 0 else d for d in t.shape)
            prof.set_shape(t.name, shape, shape, shape)
            dynamic = True
    if dynamic:
        config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    verdict = "ok" if plan is not None else "build: " + "; ".join(logger.messages())
    del plan, config, parser, network, builder
    return verdict


def _rtx_required() -> bool:
    import platform

    return platform.machine() in ("x86_64", "AMD64")  # [dev] installs TensorRT-RTX there: it must be present


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _rule_graphs(tmp_path):
    """rule -> (graph path, lint findings' codes expected as errors; [] = the graph must lint clean of errors)."""
    T = TensorProto
    s, z, w = _c("s", np.float32(0.1)), _c("z", np.int8(0)), _c("W", np.ones((4, 4), np.int8))
    x = [_vi("x", [2, 4])]
    y = [_vi("y", [2, 4])]

    def dq_matmul(name, dq, inits, ins=x):
        return _save(tmp_path, [dq, helper.make_node("MatMul", ["x", "Wd"], ["y"])], ins, y, inits, name=name)

    dq = helper.make_node("DequantizeLinear", ["W", "s", "z"], ["Wd"], name="dq")
    return {
        "clean": (_relu_graph(tmp_path, name="clean.onnx"), []),
        "opset-below-documented": (_relu_graph(tmp_path, opset=7, name="opset7.onnx"), []),
        "opset-above-documented": (_relu_graph(tmp_path, opset=24, name="opset24.onnx"), []),
        "domain": (_save(tmp_path, [helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")], x, y,
                         extra_opsets=[helper.make_opsetid("com.microsoft", 1)], name="domain.onnx"), ["domain"]),
        "unsupported-op": (_save(tmp_path, [helper.make_node("Det", ["x"], ["y"])], [_vi("x", [2, 3, 3])],
                                 [_vi("y", [2])], name="det.onnx"), ["unsupported-op"]),
        "reduce-axes-constant": (_save(tmp_path, [helper.make_node("ReduceMean", ["x", "ax"], ["y"])],
                                       [_vi("x", [2, 4]), _vi("ax", [1], T.INT64)], [_vi("y", None)],
                                       name="reduce.onnx"), ["restriction"]),
        "unsqueeze-axes-constant": (_save(tmp_path, [helper.make_node("Unsqueeze", ["x", "ax"], ["y"])],
                                          [_vi("x", [2, 4]), _vi("ax", [1], T.INT64)], [_vi("y", None)],
                                          name="unsqueeze.onnx"), ["restriction"]),
        "slice-axes-runtime-on-10.3+": (_save(tmp_path, [helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"])],
                                              [_vi("x", [2, 4]), _vi("ax", [1], T.INT64)], [_vi("y", None)],
                                              [_c("st", np.array([0])), _c("en", np.array([1]))], name="slice.onnx"), []),
        "cumsum-axis-runtime (rule went)": (_save(tmp_path, [helper.make_node("CumSum", ["x", "ax"], ["y"])],
                                                  [_vi("x", [2, 4]), _vi("ax", [], T.INT64)], y, name="cumsum.onnx"), []),
        "layernorm-one-output": (_save(tmp_path, [helper.make_node("LayerNormalization", ["x", "g"], ["y", "m", "r"])],
                                       x, [*y, _vi("m", None), _vi("r", None)], [_c("g", np.ones(4, np.float32))],
                                       name="ln.onnx"), ["restriction"]),
        "resize-cubic (allowed now)": (_save(tmp_path, [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic")],
                                             [_vi("x", [1, 1, 4, 4])], [_vi("y", None)],
                                             [_c("sc", np.array([1, 1, 2, 2], np.float32))], name="cubic.onnx"), []),
        "resize-antialias": (_save(tmp_path, [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear",
                                                               antialias=1)], [_vi("x", [1, 1, 4, 4])], [_vi("y", None)],
                                   [_c("sc", np.array([1, 1, .5, .5], np.float32))], name="aa.onnx"), ["restriction"]),
        "scatternd-reduction": (_save(tmp_path, [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="add")],
                                      [_vi("x", [4, 4]), _vi("u", [2, 4])], [_vi("y", [4, 4])],
                                      [_c("i", np.array([[0], [2]]))], name="snd.onnx"), ["restriction"]),
        "qdq-well-formed-weight": (dq_matmul("qok.onnx", dq, [w, s, z]), []),
        "qdq-zero-point-nonzero": (dq_matmul("qzp.onnx", dq, [w, s, _c("z", np.int8(3))]), ["qdq-zero-point"]),
        "qdq-zero-point-uint8": (dq_matmul("qu8.onnx", dq, [_c("W", np.ones((4, 4), np.uint8)), s, _c("z", np.uint8(0))]),
                                 ["qdq-zero-point"]),
        "qdq-zero-point-runtime": (dq_matmul("qzr.onnx", helper.make_node("DequantizeLinear", ["W", "s", "zr"], ["Wd"]),
                                             [w, s], ins=[*x, _vi("zr", [], T.INT8)]), ["qdq-zero-point"]),
        "qdq-type": (dq_matmul("qi16.onnx", dq, [_c("W", np.ones((4, 4), np.int16)), s, _c("z", np.int16(0))]),
                     ["qdq-type"]),
        "qdq-dangling-q-feeds-cast": (_save(tmp_path, [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                                                       helper.make_node("Cast", ["q"], ["y"], to=T.FLOAT)], x, y, [s, z],
                                            name="qcast.onnx"), []),
        "qdq-dangling-q-unused": (_save(tmp_path, [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                                                   helper.make_node("Relu", ["x"], ["y"])], x, y, [s, z],
                                        name="qunused.onnx"), []),
        "qdq-dangling-dq-of-an-input": (_save(tmp_path, [helper.make_node("DequantizeLinear", ["xi", "s", "z"], ["y"])],
                                              [_vi("xi", [2, 4], T.INT8)], y, [s, z], name="dqin.onnx"), []),
        "qdq-dangling-dq-unused": (_save(tmp_path, [dq, helper.make_node("Relu", ["x"], ["y"])], x, y, [w, s, z],
                                         name="dqunused.onnx"), []),
        "qdq-weight-axis (warning)": (dq_matmul("qaxis.onnx", helper.make_node("DequantizeLinear", ["W", "s4", "z4"],
                                                                               ["Wd"], axis=0),
                                                [w, _c("s4", np.full(4, .1, np.float32)), _c("z4", np.zeros(4, np.int8))]),
                                      []),
    }


RULES = ["clean", "opset-below-documented", "opset-above-documented", "domain", "unsupported-op",
         "reduce-axes-constant", "unsqueeze-axes-constant", "slice-axes-runtime-on-10.3+",
         "cumsum-axis-runtime (rule went)", "layernorm-one-output", "resize-cubic (allowed now)", "resize-antialias",
         "scatternd-reduction", "qdq-well-formed-weight", "qdq-zero-point-nonzero", "qdq-zero-point-uint8",
         "qdq-zero-point-runtime", "qdq-type", "qdq-dangling-q-feeds-cast", "qdq-dangling-q-unused",
         "qdq-dangling-dq-of-an-input", "qdq-dangling-dq-unused", "qdq-weight-axis (warning)"]


@pytest.mark.parametrize("rule", RULES)
def test_lint_agrees_with_nvidias_parser_and_builder(tmp_path, rule):
    path, want = _rule_graphs(tmp_path)[rule]
    found = lint(path, "10.15")
    assert _codes(found) == want, [str(f) for f in found]
    verdict = _real_verdict(path)
    assert (verdict != "ok") == bool(want), f"lint {want or 'no error'}, NVIDIA's parser/builder: {verdict}"


def test_profile_rule_agrees_with_the_builder(tmp_path):
    """A profile that varies a dimension the graph fixes: the lint's "profile" error, and the builder refuses."""
    path = _relu_graph(tmp_path, name="fixed.onnx")
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # x: [2, 4], fixed
    onnx.save(model, str(path))
    profile = {"x": ((1, 4), (2, 4), (4, 4))}
    found = lint(path, "10.15", profiles=[{"name": "p", "shapes": profile}])
    assert _codes(found) == ["profile"]
    assert _real_verdict(path, profile).startswith("build:")
    ok = {"x": ((2, 4), (2, 4), (2, 4))}
    assert _codes(lint(path, "10.15", profiles=[{"name": "p", "shapes": ok}])) == [] and _real_verdict(path, ok) == "ok"
