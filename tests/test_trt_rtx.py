"""NVIDIA's own ONNX parser and builder (TensorRT for RTX, the ``tensorrt-rtx`` extra) on every tiny bundle.

TensorRT-RTX builds engines ahead of time without a GPU, so ``make test`` runs the real thing: both tiny
presets in fp32 and fp16 and their calibrated INT8-vision / INT4-LLM and INT8 / INT8 bundles parse with
the real parser and build through ``flashvl build --library tensorrt-rtx`` with every manifest profile
(prefill, decode, extend). From the parsed network (no GPU needed) the checks that decide correctness on a
device: RMSNorm statistics and rotary angles stay FP32 in fp16 bundles, the Q/DQ pairs reach the network as
quantize / dequantize layers on exactly the weights the bundle quantized (as its manifest and report say),
and the KV inputs / outputs have the engine entry's ``kv_dtype``. Each check is shown failing on a
deliberately broken bundle. Nothing here runs an engine: building is not running.

Bundles are copied, built and parsed once per session (module-level session fixtures).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from flashvl_edge.main import main
from flashvl_edge.runtime.bundle import Bundle

if platform.machine() not in ("x86_64", "AMD64"):
    pytest.skip("TensorRT-RTX wheels exist for x86-64 only", allow_module_level=True)

import tensorrt_rtx_bindings as trt  # noqa: E402  ([dev] installs the tensorrt-rtx extra: a missing one fails)

from flashvl_edge.export.engines import _parse_network  # noqa: E402
from flashvl_edge.export.trt_support import fp32_layers  # noqa: E402

FAST_CALIB = ["--samples", "4", "--holdout", "1", "--report-tokens", "4", "--quiet"]
# name -> (bundle fixture or recipe, build precision, extra build arguments)
BUNDLES = {
    "static-fp32": ("fp32", ["--max-batch", "8"]),
    "static-fp16": ("fp16", []),
    "dynamic-fp32": ("fp32", []),
    "dynamic-fp16": ("fp16", ["--max-batch", "8"]),
    "static-q-int8-int4": ("int8", []),
    "dynamic-q-int8-int8": ("int8", ["--max-batch", "8"]),
}
KV = ("past_key_values.", "present.")
TRT_DTYPE = {"float16": trt.DataType.HALF, "float32": trt.DataType.FLOAT}


# --------------------------------------------------------------------------------------------
# Session fixtures: six bundles, built once with TensorRT-RTX


@pytest.fixture(scope="session")
def rtx_sources(tmp_path_factory, tiny_static_bundle, tiny_dynamic_bundle, tiny_static_fp16_bundle,
                tiny_dynamic_loaded):
    """The six bundles (copies: building adds engines): the conftest exports, the dynamic preset in fp16,
    and both presets calibrated as tests/test_calibration.py does (INT8 vision + INT4 LLM for the static
    one, INT8 W8A8 for the dynamic-ISS one)."""
    from flashvl_edge.export.onnx import export_bundle

    root = tmp_path_factory.mktemp("rtx")
    out = {}
    for name, src in (("static-fp32", tiny_static_bundle), ("static-fp16", tiny_static_fp16_bundle),
                      ("dynamic-fp32", tiny_dynamic_bundle)):
        out[name] = Path(shutil.copytree(src, root / name))
    out["dynamic-fp16"] = Path(export_bundle(tiny_dynamic_loaded, root / "dynamic-fp16", dtype="fp16", progress=False))
    cache = root / "calib-cache"
    assert main(["calibrate", str(tiny_static_bundle), "--out", str(root / "static-q-int8-int4"), *FAST_CALIB,
                 "--vision", "int8", "--llm", "int4", "--cache-dir", str(cache)]) == 0
    assert main(["calibrate", str(tiny_dynamic_bundle), "--out", str(root / "dynamic-q-int8-int8"), *FAST_CALIB,
                 "--vision", "int8", "--llm", "int8", "--method", "max", "--cache-dir", str(cache)]) == 0
    out["static-q-int8-int4"] = root / "static-q-int8-int4"
    out["dynamic-q-int8-int8"] = root / "dynamic-q-int8-int8"
    return out


@pytest.fixture(scope="session")
def rtx_built(rtx_sources):
    """name -> bundle path, each built by ``flashvl build --library tensorrt-rtx`` (the real CLI)."""
    for name, path in rtx_sources.items():
        precision, extra = BUNDLES[name]
        rc = main(["build", str(path), "--library", "tensorrt-rtx", "--precision", precision,
                   "--compute-capability", "8.6", "8.9", *extra])
        assert rc == 0, name
    return rtx_sources


class Parsed:
    """One graph parsed by TensorRT-RTX's ONNX parser (strongly typed, as the build does)."""

    def __init__(self, onnx_path: Path) -> None:
        self.builder, self.network, self.parser = _parse_network(trt, onnx_path, strongly_typed=True)
        net = self.network
        self.layers = {net.get_layer(i).name: net.get_layer(i) for i in range(net.num_layers)}
        self.producer = {}
        for layer in self.layers.values():
            for j in range(layer.num_outputs):
                self.producer[layer.get_output(j).name] = layer
        self.io = {t.name: t for t in [net.get_input(i) for i in range(net.num_inputs)]
                   + [net.get_output(i) for i in range(net.num_outputs)]}


@pytest.fixture(scope="session")
def parsed(rtx_built):
    """(bundle name, graph) -> Parsed, parsed once per session."""
    cache: dict[tuple[str, str], Parsed] = {}

    def get(name: str, graph: str) -> Parsed:
        if (name, graph) not in cache:
            b = Bundle.load(rtx_built[name], verify="none")
            cache[(name, graph)] = Parsed(b.graph_path(graph))
        return cache[(name, graph)]

    return get


# --------------------------------------------------------------------------------------------
# The checks (functions of a parsed network and the bundle; each returns what is wrong)


def fp32_violations(net: Parsed, model: onnx.ModelProto) -> list[str]:
    """Rotary-angle and RMSNorm-statistics layers (found in the graph as ``flashvl build`` finds them) whose
    output is not FP32 in the parsed network, or that the network does not have."""
    wanted = [f for f in fp32_layers(model) if f.kind in ("rope", "rmsnorm")]
    if not wanted:
        return ["no rotary or RMSNorm pattern found in the graph"]
    bad = []
    for f in wanted:
        layer = net.layers.get(f.node)
        if layer is None:
            bad.append(f"{f.kind} node {f.node} has no layer in the network")
        elif layer.get_output(0).dtype != trt.DataType.FLOAT:
            bad.append(f"{f.kind} layer {f.node} computes in {layer.get_output(0).dtype}")
    return bad


QTYPE = {"int8": (trt.DataType.INT8,), "int4": (trt.DataType.INT4,)}


def qdq_violations(net: Parsed, model: onnx.ModelProto, scheme: str | None, report: dict | None) -> list[str]:
    """The network's dequantized weights against what the bundle says it quantized: every weight the ONNX
    graph dequantizes is a CONSTANT of the manifest's type feeding a DEQUANTIZE layer, nothing else is, the
    count is the calibration report's, and activation Q/DQ pairs become QUANTIZE -> DEQUANTIZE layers. A
    graph the manifest does not quantize has no Q/DQ layer."""
    inits = {t.name for t in model.graph.initializer}
    onnx_weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    onnx_act_q = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    dq_weights, q_layers, bad = {}, 0, []
    for layer in net.layers.values():
        if layer.type == trt.LayerType.QUANTIZE:
            q_layers += 1  # that each feeds a DEQUANTIZE is checked through the DEQUANTIZE inputs below
        elif layer.type == trt.LayerType.DEQUANTIZE:
            src = net.producer.get(layer.get_input(0).name)
            if src is not None and src.type == trt.LayerType.CONSTANT:
                dq_weights[src.name] = layer.get_input(0).dtype
            elif src is None or src.type != trt.LayerType.QUANTIZE:
                bad.append(f"DEQUANTIZE layer {layer.name} is fed by neither a weight nor a QUANTIZE layer")
    if scheme is None:
        if dq_weights or q_layers:
            bad.append(f"the manifest quantizes nothing here, the network has {len(dq_weights)} dequantized weights "
                       f"and {q_layers} QUANTIZE layers")
        return bad
    if set(dq_weights) != onnx_weights:
        bad.append(f"dequantized weights differ: graph only {sorted(onnx_weights - set(dq_weights))[:3]}, network "
                   f"only {sorted(set(dq_weights) - onnx_weights)[:3]}")
    wrong = {w: str(t) for w, t in dq_weights.items() if t not in QTYPE[scheme]}
    if wrong:
        bad.append(f"weights not {scheme} in the network: {sorted(wrong.items())[:3]}")
    count = (report or {}).get("quantized_weights")
    if count is not None and len(dq_weights) != count:
        bad.append(f"the report says {count} weights were quantized, the network dequantizes {len(dq_weights)}")
    if q_layers != onnx_act_q:
        bad.append(f"{onnx_act_q} QuantizeLinear nodes in the graph, {q_layers} QUANTIZE layers in the network")
    return bad


def kv_violations(net: Parsed, kv_dtype: str) -> list[str]:
    want = TRT_DTYPE[kv_dtype]
    kv = {n: t.dtype for n, t in net.io.items() if n.startswith(KV)}
    if not kv:
        return ["the network has no KV inputs or outputs"]
    return [f"{n} is {d}, the manifest says {kv_dtype}" for n, d in sorted(kv.items()) if d != want]


def _model(bundle: Path, graph: str) -> onnx.ModelProto:
    return onnx.load(str(Bundle.load(bundle, verify="none").graph_path(graph)), load_external_data=False)


def _entry(bundle: Path):
    (entry,) = Bundle.load(bundle, verify="none").manifest.engines.values()
    return entry


# --------------------------------------------------------------------------------------------
# Every bundle parses and builds with every profile


@pytest.mark.parametrize("name", list(BUNDLES))
def test_every_bundle_parses_and_builds_with_every_profile(rtx_built, name):
    """The real parser and builder: both engines written, hash-checked into the bundle, and a manifest
    entry naming the library, its version, the compute capabilities and every manifest profile."""
    path = rtx_built[name]
    b = Bundle.load(path, verify="full")  # every engine file is in the manifest with its sha256
    (dir_name, entry), = b.manifest.engines.items()
    assert entry.builder["library"] == "tensorrt-rtx" and entry.trt_version == trt.__version__
    assert entry.builder["compute_capabilities"] == ["8.6", "8.9"] and entry.compute_capability == "8.6,8.9"
    assert dir_name == f"rtx_sm86-89_rtx{trt.__version__}" and entry.strongly_typed
    assert entry.graphs["llm"].profiles == ("prefill", "decode", "extend")
    assert entry.graphs["vision"].profiles == ("vision",)
    for graph in ("vision", "llm"):
        assert (path / entry.graphs[graph].file).stat().st_size > 0
    assert entry.limits.max_batch == (8 if "--max-batch" in BUNDLES[name][1] else 1)
    assert not list(path.glob("engines/*/.flashvl-tmp-*")) and not list(path.glob(".flashvl-tmp-*"))


# --------------------------------------------------------------------------------------------
# fp16 numerics: RMSNorm statistics and rotary angles stay FP32


@pytest.mark.parametrize("name", ["static-fp16", "dynamic-fp16"])
def test_fp16_bundles_keep_norm_statistics_and_rope_in_fp32(rtx_built, parsed, name):
    model = _model(rtx_built[name], "llm")
    assert len([f for f in fp32_layers(model) if f.kind in ("rope", "rmsnorm")]) >= 20
    assert fp32_violations(parsed(name, "llm"), model) == []


def _demote_fp32_islands(model: onnx.ModelProto) -> onnx.ModelProto:
    """The broken export: the casts that lift RMSNorm statistics and rotary angles to FP32 cast to FP16
    instead, and the constants those nodes use become FP16 (a graph that parses, computing them in FP16)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = {f.node for f in fp32_layers(model) if f.kind in ("rope", "rmsnorm")}
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
        for i in node.input:
            t = inits.get(i) or (consts[i].attribute[0].t if i in consts else None)
            if t is not None and t.data_type == TensorProto.FLOAT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    del model.graph.value_info[:]
    return model


def test_fp32_check_fails_on_an_export_that_computes_them_in_fp16(rtx_built, tmp_path):
    model = _model(rtx_built["static-fp16"], "llm")
    broken = tmp_path / "llm.onnx"
    onnx.save(_demote_fp32_islands(model), str(broken))
    bad = fp32_violations(Parsed(broken), model)
    assert any("rmsnorm" in b for b in bad) and any("rope" in b for b in bad), bad


# --------------------------------------------------------------------------------------------
# Q/DQ: quantize / dequantize layers on exactly the quantized weights


@pytest.mark.parametrize("name", ["static-q-int8-int4", "dynamic-q-int8-int8", "static-fp16", "dynamic-fp32"])
def test_qdq_reaches_the_network_on_exactly_the_quantized_weights(rtx_built, parsed, name):
    b = Bundle.load(rtx_built[name], verify="none")
    q = b.manifest.quantization
    report = json.loads((b.root / q.report).read_text()) if q and q.report else {}
    for graph in ("vision", "llm"):
        scheme = getattr(q, graph) if q else None
        assert qdq_violations(parsed(name, graph), _model(b.root, graph), scheme, report.get(graph)) == [], graph
    if q:  # the calibrated bundles really carry Q/DQ on both graphs
        assert sum(layer.type == trt.LayerType.DEQUANTIZE for layer in parsed(name, "llm").layers.values()) > 0


def test_qdq_check_fails_on_broken_bundles(rtx_built, parsed, tmp_path):
    """A manifest that names the wrong scheme, a graph that lost one weight's Q/DQ (the report still counts
    it), and an unquantized manifest over a quantized graph."""
    name = "static-q-int8-int4"
    b = Bundle.load(rtx_built[name], verify="none")
    report = json.loads((b.root / b.manifest.quantization.report).read_text())
    model = _model(b.root, "llm")
    net = parsed(name, "llm")
    assert any("not int8" in x for x in qdq_violations(net, model, "int8", report["llm"]))
    assert any("quantizes nothing" in x for x in qdq_violations(net, model, None, None))
    # drop one weight's DequantizeLinear: the float weight goes straight into its MatMul
    broken = onnx.ModelProto.FromString(model.SerializeToString())
    dq = next(n for n in broken.graph.node if n.op_type == "DequantizeLinear")
    w = next(t for t in broken.graph.initializer if t.name == dq.input[0])
    scale = next(t for t in broken.graph.initializer if t.name == dq.input[1])
    from onnx.reference import ReferenceEvaluator

    value = ReferenceEvaluator(onnx.helper.make_model(
        onnx.helper.make_graph([dq], "g", [], [onnx.helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None)],
                               [w, scale]), opset_imports=broken.opset_import)).run(None, {})[0]
    broken.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), dq.output[0]))
    broken.graph.node.remove(dq)
    path = tmp_path / "llm.onnx"
    onnx.save(broken, str(path))
    bad = qdq_violations(Parsed(path), model, "int4", report["llm"])
    assert any("dequantized weights differ" in x for x in bad) and any("report says" in x for x in bad), bad


# --------------------------------------------------------------------------------------------
# KV dtype


@pytest.mark.parametrize("name", list(BUNDLES))
def test_kv_inputs_and_outputs_have_the_manifest_kv_dtype(rtx_built, parsed, name):
    entry = _entry(rtx_built[name])
    want = "float16" if name.endswith("fp16") else "float32"  # strongly typed: the graph's type
    assert entry.kv_dtype == want
    assert kv_violations(parsed(name, "llm"), entry.kv_dtype) == []


def test_kv_check_fails_when_the_graph_does_not_match_the_manifest(rtx_built, parsed):
    """An fp16 bundle's manifest over the fp32 graph: its KV is float32, the manifest says float16."""
    entry = _entry(rtx_built["static-fp16"])
    bad = kv_violations(parsed("static-fp32", "llm"), entry.kv_dtype)
    assert bad and all("float16" in b for b in bad)


# --------------------------------------------------------------------------------------------
# Options, dry run, runtime refusal


@pytest.mark.parametrize("args, message", [
    (["--hardware-compat", "ampere+"], "no TensorRT-RTX meaning"),
    (["--version-compatible"], "no TensorRT-RTX meaning"),
    (["--precision", "fp16"], "strongly typed only"),       # an fp32 bundle: fp16 needs weak typing
    (["--precision", "fp32", "--compute-capability", "8.7"], "TensorRT-RTX targets"),
])
def test_options_without_a_tensorrt_rtx_meaning_are_refused_in_one_line(tiny_static_bundle, capsys, args, message):
    rc = main(["build", str(tiny_static_bundle), "--library", "tensorrt-rtx", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (Path(tiny_static_bundle) / "engines").exists()


def test_compute_capability_needs_tensorrt_rtx(tiny_static_bundle, capsys):
    rc = main(["build", str(tiny_static_bundle), "--compute-capability", "8.6", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "--library tensorrt-rtx" in err and len(err.strip().splitlines()) == 1


def test_dry_run_parses_with_nvidias_parser(rtx_built, capsys, tmp_path):
    """--dry-run prints the real parse; a graph the parser rejects fails the dry run with the node named."""
    assert main(["build", str(rtx_built["static-fp16"]), "--library", "tensorrt-rtx", "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["library"] == "tensorrt-rtx" and doc["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0", "12.1"]
    assert doc["parse"]["version"] == trt.__version__
    # decode takes seq 1..2 on TensorRT-RTX: a seq = 1 profile doubles the engine's weights (docs/jetson.md)
    decode = doc["profiles"]["llm"][1]
    assert decode["name"] == "decode" and decode["shapes"]["inputs_embeds"]["max"][1] == 2
    assert decode["shapes"]["inputs_embeds"]["min"][1] == decode["shapes"]["inputs_embeds"]["opt"][1] == 1
    assert all(r["ok"] and r["layers"] > 0 for r in doc["parse"]["graphs"].values())
    bad = Path(shutil.copytree(rtx_built["static-fp16"], tmp_path / "b"))
    model = onnx.load(str(bad / "llm.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.op_type = "NoSuchOp"  # an op no parser knows, hash fixed below so the bundle loads
    onnx.save(model, str(bad / "llm.onnx"))
    _rehash(bad)
    assert main(["build", str(bad), "--library", "tensorrt-rtx", "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "parse llm" in out and "FAILED" in out and node.name in out


def _rehash(root: Path) -> None:
    """Re-record the files of a bundle copy whose graph a test changed (its engines dropped)."""
    from flashvl_edge.runtime.bundle import finalize_manifest

    m = Bundle.load(root, verify="none").manifest
    shutil.rmtree(root / "engines", ignore_errors=True)
    finalize_manifest(root, m.replace(engines={}))


def test_max_num_batched_tokens_sets_the_extend_profile(tiny_static_fp16_bundle, capsys):
    assert main(["build", str(tiny_static_fp16_bundle), "--library", "tensorrt-rtx", "--dry-run", "--json",
                 "--max-num-batched-tokens", "96"]) == 0
    doc = json.loads(capsys.readouterr().out)
    pre, dec, ext = doc["profiles"]["llm"]
    assert ext["name"] == "extend" and ext["shapes"]["inputs_embeds"]["max"][1] == 96
    past = next(n for n in ext["shapes"] if n.startswith("past_key_values."))
    assert ext["shapes"][past]["max"][2] == doc["limits"]["max_context"] - 96
    assert doc["max_num_batched_tokens"] == 96


def test_chat_on_tensorrt_rtx_engines_without_a_gpu_says_so_in_one_line(rtx_built, capsys, monkeypatch):
    from flashvl_edge.runtime.backends import trt as trt_backend

    monkeypatch.setattr(trt_backend, "gpu_info", lambda: None)  # whatever this machine has
    rc = main(["chat", str(rtx_built["static-fp16"]), "--backend", "trt", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "TensorRT-RTX" in err and "no NVIDIA GPU is visible" in err


def test_library_choice_from_the_manifest_entry(rtx_built):
    """The runtime's library choice and refusals for a TensorRT-RTX entry: the GPU's compute capability, the
    library version, and a GPU TensorRT-RTX does not target (Jetson Orin)."""
    from flashvl_edge.runtime.backends import trt_library as L
    from flashvl_edge.runtime.backends.trt import GpuInfo
    from flashvl_edge.runtime.errors import EngineMismatchError

    path = rtx_built["static-fp16"]
    m = Bundle.load(path, verify="none").manifest
    entry = _entry(path)
    assert L.entry_library(entry) == "tensorrt-rtx" and L.entry_compute_capabilities(entry) == ("8.6", "8.9")
    assert L.library_for_entry(entry, GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 24 << 30)) is trt
    assert L.rtx_engine_entry(m, GpuInfo("NVIDIA RTX A6000", "8.6", 48 << 30)) == entry
    assert L.library_for_engine(path / entry.graphs["llm"].file) is trt
    with pytest.raises(EngineMismatchError, match="--compute-capability 12.0"):
        L.rtx_engine_entry(m, GpuInfo("NVIDIA GeForce RTX 5090", "12.0", 32 << 30))
    with pytest.raises(EngineMismatchError, match="does not support"):
        L.rtx_engine_entry(m, GpuInfo("Orin", "8.7", 8 << 30, integrated=True))
    older = dataclasses.replace(entry, trt_version="1.0.0.0")
    with pytest.raises(EngineMismatchError, match="rebuild"):
        L.library_for_entry(older, GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 24 << 30))


def test_doctor_reports_tensorrt_rtx(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["machine"]
    assert info["tensorrt_rtx"] == trt.__version__
    ok, hint = info["backends"]["trt-rtx"]
    assert "--library tensorrt-rtx" in hint
    assert main(["doctor"]) == 0
    assert f"tensorrt-rtx {trt.__version__}" in capsys.readouterr().out
