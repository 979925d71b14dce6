"""``flashvl build`` on CPU: profiles from the manifest, --dry-run, the no-TensorRT exit, ``make engines``.

The real build + ORT/TRT comparison is in tests/test_trt_gpu.py (marker ``trt``)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashvl_edge.export.engines import default_limits, graph_profiles
from flashvl_edge.main import main
from flashvl_edge.runtime.bundle import Bundle
from flashvl_edge.runtime.contract import GraphIO, Manifest, QuantizationSpec
from flashvl_edge.runtime.errors import BundleError

REPO = Path(__file__).resolve().parents[1]
NO_TRT_LINE = "TensorRT is not installed"


def _have_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _dry_run_json(bundle, *extra) -> tuple[int, dict]:
    """Run ``flashvl build --dry-run --json`` in a subprocess whose ``tensorrt`` explodes on import."""
    poison = Path(bundle).parent / "poisoned-tensorrt"
    (poison / "tensorrt").mkdir(parents=True, exist_ok=True)
    (poison / "tensorrt" / "__init__.py").write_text("raise RuntimeError('--dry-run imported tensorrt')\n")
    env = dict(os.environ, PYTHONPATH=str(poison))
    p = subprocess.run([sys.executable, "-m", "flashvl_edge.main", "build", str(bundle), "--dry-run", "--json", *extra],
                       capture_output=True, text=True, env=env, timeout=120)
    assert "imported tensorrt" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


def _check_profiles_against_manifest(manifest, plan):
    """Every profile covers exactly the declared inputs; fixed dims equal the manifest; named dims vary
    as the contract says (past = 0 in prefill, seq = 1 in decode, total = past + seq). ``max_tiles`` counts
    crop tiles; the vision profile's num_tiles reaches the vision batch (the thumbnail included)."""
    lim = plan["limits"]
    for graph, profiles in plan["profiles"].items():
        declared = {t.name: t.shape for t in manifest.graph(graph).inputs}
        for prof in profiles:
            assert set(prof["shapes"]) == set(declared), (graph, prof["name"])
            for name, s in prof["shapes"].items():
                for ax, d in enumerate(declared[name]):
                    lo, opt, hi = s["min"][ax], s["opt"][ax], s["max"][ax]
                    assert lo <= opt <= hi, (name, ax)
                    if isinstance(d, int):
                        assert lo == opt == hi == d, (name, ax)
                    elif d == "num_tiles":
                        assert (lo, hi) == (1, manifest.preprocess.vision_batch(lim["max_tiles"]))
                    elif d == "batch":
                        assert (lo, hi) == (1, lim["max_batch"])
    pre, dec, ext = plan["profiles"]["llm"]
    assert [pre["name"], dec["name"], ext["name"]] == ["prefill", "decode", "extend"]  # index 0 stays prefill
    past = next(n for n in pre["shapes"] if n.startswith("past_key_values."))
    assert pre["shapes"][past]["min"][2] == pre["shapes"][past]["max"][2] == 0
    assert pre["shapes"]["inputs_embeds"]["max"][1] == lim["max_input_len"]
    assert pre["shapes"]["attention_mask"]["max"] == pre["shapes"]["position_ids"]["max"]  # total == seq
    assert dec["shapes"]["inputs_embeds"]["min"][1] == dec["shapes"]["inputs_embeds"]["max"][1] == 1
    assert dec["shapes"]["attention_mask"]["max"][1] == lim["max_context"]
    assert dec["shapes"][past]["min"][2] == 1
    # extend: seq 1..E on a cache from 0 up to max_context - E; every point a shape the graph can take
    from flashvl_edge.runtime.core import DEFAULT_MAX_NUM_BATCHED_TOKENS  # the serving step's budget

    ext_seq = min(lim["max_input_len"], DEFAULT_MAX_NUM_BATCHED_TOKENS, lim["max_context"] // 2)
    assert ext["shapes"]["inputs_embeds"]["max"][1] == ext_seq
    assert ext["shapes"][past]["min"][2] == 0 and ext["shapes"][past]["max"][2] == lim["max_context"] - ext_seq
    assert ext["shapes"]["attention_mask"]["max"][1] == lim["max_context"]
    for prof in (pre, dec, ext):
        for k in ("min", "opt", "max"):  # total = past + seq
            assert (prof["shapes"]["attention_mask"][k][1]
                    == prof["shapes"][past][k][2] + prof["shapes"]["inputs_embeds"][k][1]), (prof["name"], k)


@pytest.mark.parametrize("which", ["tiny_static_bundle", "tiny_dynamic_bundle"])
def test_dry_run_profiles_match_manifest(which, request):
    bundle = request.getfixturevalue(which)
    manifest = Bundle.load(bundle).manifest
    rc, plan = _dry_run_json(bundle)
    assert rc == 0, plan["lint"]
    _check_profiles_against_manifest(manifest, plan)
    pre = manifest.preprocess
    assert plan["limits"]["max_tiles"] == pre.max_tiles  # crop tiles, as the manifest counts them
    (vision,) = plan["profiles"]["vision"]
    assert vision["shapes"]["pixel_values"]["max"][0] == pre.vision_batch() == \
        pre.max_tiles + (1 if pre.use_thumbnail and pre.max_tiles > 1 else 0)
    assert plan["limits"]["max_context"] == manifest.max_context
    assert plan["precision"] == "fp16" and plan["fp16"] and not plan["int8"] and not plan["strongly_typed"]
    assert plan["lint"] == {"vision": [], "llm": []}
    assert plan["engine_dir"].startswith("engines/") and "_trt10.3" in plan["engine_dir"]


def test_dry_run_options_and_text(tiny_dynamic_bundle, capsys):
    pre = Bundle.load(tiny_dynamic_bundle).manifest.preprocess
    assert pre.max_tiles > 3 and pre.use_thumbnail  # so --max-tiles 3 lowers the budget and adds a thumbnail
    rc = main(["build", str(tiny_dynamic_bundle), "--dry-run", "--max-tiles", "3", "--max-context", "512",
               "--max-input-len", "200", "--opt-level", "5", "--hardware-compat", "ampere+", "--version-compatible",
               "--workspace-gb", "2", "--timing-cache", "/tmp/x.cache"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "context<=512" in out and "tiles<=3" in out and "input_len<=200" in out
    assert "profile llm[0] prefill:" in out and "profile llm[1] decode:" in out and "profile vision[0] vision:" in out
    assert "profile llm[2] extend:" in out and "llm profile choice" in out
    assert "KV cache            float16 (set on the past/present I/O tensors)" in out
    assert "layers pinned to FP32 (precision constraints obey)" in out and "rope" in out and "rmsnorm" in out
    assert "--tensor-datatypes past_key_values.0.key:float16" in out and "--layer-precisions" in out
    assert "--builder-optimization-level 5" in out and "--hardware-compatibility-level ampere_plus" in out
    assert "--version-compatible" in out and "workspace:2147483648" in out and "/tmp/x.cache" in out
    # the numbers in the text are the profile's: 3 crop tiles + the thumbnail = 4 images max, past 511 max in
    # decode, 512 - E in extend (E: the serving step's token budget, at most the input length)
    from flashvl_edge.runtime.core import DEFAULT_MAX_NUM_BATCHED_TOKENS

    extend_past = 512 - min(200, DEFAULT_MAX_NUM_BATCHED_TOKENS)
    assert f"max [{pre.vision_batch(3)},3," in out and pre.vision_batch(3) == 4 and ",511," in out
    assert f",{extend_past}," in out


def test_dry_run_for_trt86_reports_opset18_nodes(tiny_static_bundle):
    """The exporter writes opset 18: TensorRT 8.6 (JetPack 6.0) cannot read its Reduce* nodes."""
    rc, plan = _dry_run_json(tiny_static_bundle, "--trt-version", "8.6")
    assert rc == 1
    llm = plan["lint"]["llm"]
    assert {f["code"] for f in llm if f["severity"] == "warning"} == {"opset"}
    assert any(f["code"] == "restriction" and "ReduceMean" in f["message"] for f in llm if f["severity"] == "error")


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "needs a calibrated (QDQ) bundle"),
    (["--max-input-len", "4000", "--max-context", "1000"], "--max-input-len 4000 must be between"),
    (["--max-context", "99999999"], "exceeds the model's max_position_embeddings"),
    (["--max-tiles", "2"], "exceeds the bundle's tile budget (1)"),  # crop tiles, as preprocessing makes them
])
def test_bad_build_options_exit_2(tiny_static_bundle, capsys, args, message):
    assert main(["build", str(tiny_static_bundle), "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(_have_tensorrt(), reason="tensorrt is installed: the no-TensorRT message cannot be shown")
def test_build_without_tensorrt_is_one_line_exit_2(tiny_static_bundle, capsys):
    before = sorted(p.name for p in Path(tiny_static_bundle).iterdir())
    assert main(["build", str(tiny_static_bundle), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert NO_TRT_LINE in err and "JetPack" in err and "pip install tensorrt" in err and err.count("\n") == 1
    assert sorted(p.name for p in Path(tiny_static_bundle).iterdir()) == before  # nothing written


def test_profile_refuses_unknown_dim(tiny_static_bundle):
    # a manifest naming a dim the contract does not define is refused when it is read ...
    data = json.loads((Path(tiny_static_bundle) / "manifest.json").read_text())
    data["graphs"]["llm"]["inputs"][0]["shape"][1] = "sequence"
    with pytest.raises(BundleError, match="graphs.llm.inputs.*'sequence'") as ei:
        Manifest.from_json(data)
    assert "\n" not in str(ei.value) and "re-export" in str(ei.value)
    # ... and the profile builder, handed such an interface anyway, refuses it too rather than guessing a range
    manifest = Bundle.load(tiny_static_bundle).manifest
    llm = manifest.graph("llm")
    first = dataclasses.replace(llm.inputs[0], shape=(llm.inputs[0].shape[0], "sequence", *llm.inputs[0].shape[2:]))
    odd = manifest.with_graph("llm", io=GraphIO((first, *llm.inputs[1:]), llm.outputs))
    with pytest.raises(BundleError, match="'sequence'"):
        graph_profiles(odd, default_limits(manifest))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.skipif(_have_tensorrt(), reason="tensorrt is installed: make engines would really build")
def test_make_engines_stops_at_the_trt_stage(tmp_path):
    # a stand-in virtualenv dir so the Makefile's setup stamp is satisfied without pip (PY = this python)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".flashvl-edge-installed").touch()
    out = tmp_path / "out"
    cmd = ["make", "-C", str(REPO), "engines", "MODEL=tiny-static", "PRECISION=fp16", f"OUT={out}"]
    env = dict(os.environ, VIRTUAL_ENV=str(venv))
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode != 0
    assert NO_TRT_LINE in first.stderr and "flashvl_edge.main export" in first.stdout and "flashvl_edge.main build" in first.stdout
    assert (out / "fp" / "manifest.json").is_file()              # the ONNX stage is done
    assert not (out / "fp" / "engines").exists() and not (out / "engines.stamp").exists()
    # re-running redoes only what is missing: no second export, straight to the build step
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode != 0 and NO_TRT_LINE in second.stderr
    assert "flashvl_edge.main export" not in second.stdout and "flashvl_edge.main build" in second.stdout


def test_plan_for_quantized_bundles(tiny_static_bundle):
    """QDQ bundles: explicit quantization; INT4 strongly typed on TensorRT 10 and refused on 8.6."""
    from flashvl_edge.export.engines import plan_build
    from flashvl_edge.runtime.errors import ExportError

    base = Bundle.load(tiny_static_bundle)
    limits = default_limits(base.manifest)

    def plan(vision, llm, precision="int8", trt="10.3", dtype="fp32"):
        quant = QuantizationSpec(vision=vision, llm=llm, method={"vision": "entropy", "llm": "entropy"},
                                 tool="test", tool_version="0", report="quantization_report.json",
                                 calibrated_from={})
        m = base.manifest.replace(quantization=quant, dtype=dtype)
        return plan_build(Bundle(base.root, m), precision, trt, limits)

    w8a8 = plan("int8", "int8")
    assert (w8a8.quantized, w8a8.strongly_typed, w8a8.int8, w8a8.fp16) == (True, False, True, True)
    assert plan("int8", "int8", dtype="fp16").strongly_typed
    assert plan("int8", "int8", trt="8.6").strongly_typed is False
    w4 = plan("int8", "int4", precision="best")
    assert w4.strongly_typed and not w4.int8 and w4.notes
    with pytest.raises(ExportError, match="needs TensorRT 10"):
        plan("int8", "int4", trt="8.6")
    with pytest.raises(ExportError, match="quantized"):
        plan("int8", "int8", precision="fp16")


# ---------------------------------------------------------------------------------------------
# fp16 precision, KV I/O, and the real build's TensorRT calls against stand-ins


def test_plan_keeps_fp32_layers_and_fp16_kv(tiny_static_bundle, tiny_static_fp16_bundle):
    """fp16 numerics and KV precision, on the exported graphs: an fp32 bundle builds weakly typed with its rotary
    and RMSNorm layers pinned to FP32 (precision constraints "obey") and fp16 KV I/O; an fp16 bundle builds
    strongly typed on TensorRT 10 (its casts obeyed, KV already fp16), and pinned on 8.6 (no strong typing)."""
    from flashvl_edge.export.engines import plan_build

    fp32 = Bundle.load(tiny_static_bundle)
    plan = plan_build(fp32, "fp16", "10.3", default_limits(fp32.manifest))
    assert not plan.strongly_typed and plan.fp16 and plan.precision_constraints == "obey"
    kinds = {g: {layer["kind"] for layer in layers} for g, layers in plan.fp32_layers.items()}
    assert kinds == {"llm": {"rope", "rmsnorm"}, "vision": {"layernorm"}}
    llm = plan.fp32_layers["llm"]
    n_norms = 2 * fp32.manifest.llm.num_layers + 1
    assert sum(layer["kind"] == "rmsnorm" for layer in llm) == 5 * n_norms  # pow, mean, add, sqrt, div
    assert {"Cos", "Sin"} <= {layer["node"].split("_")[1].capitalize() for layer in llm if layer["kind"] == "rope"}
    kv = [t.name for t in fp32.manifest.graph("llm").inputs if t.name.startswith("past_key_values.")]
    assert plan.kv_dtype == "float16" and fp32.manifest.graph("llm").inputs[-1].dtype == "float32"
    assert set(plan.io_dtypes["llm"]) == set(kv) | {k.replace("past_key_values.", "present.") for k in kv}
    assert set(plan.io_dtypes["llm"].values()) == {"float16"} and "vision" not in plan.io_dtypes

    fp16 = Bundle.load(tiny_static_fp16_bundle)
    strong = plan_build(fp16, "fp16", "10.3", default_limits(fp16.manifest))
    assert strong.strongly_typed and not strong.fp16 and strong.fp32_layers == {} and strong.io_dtypes == {}
    assert strong.kv_dtype == "float16"
    weak = plan_build(fp16, "fp16", "8.6", default_limits(fp16.manifest))
    assert not weak.strongly_typed and weak.io_dtypes == {}
    # the fp16 graph's own up-cast into each RMSNorm is pinned too
    assert sum(layer["kind"] == "rmsnorm" for layer in weak.fp32_layers["llm"]) == 6 * n_norms


class _Tensor:
    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class _Layer:
    def __init__(self, name, outputs):
        self.name, self._outputs, self.precision, self.output_types = name, outputs, None, {}

    num_outputs = property(lambda self: len(self._outputs))

    def get_output(self, j):
        return self._outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class _Network:
    """A stand-in ``INetworkDefinition``: I/O tensors and layers by name."""

    def __init__(self, inputs, outputs, layers):
        self.inputs, self.outputs, self.layers = inputs, outputs, layers

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def get_layer(self, i):
        return self.layers[i]


class _Config:
    """A stand-in ``IBuilderConfig``: records flags, profiles, pools and the timing cache."""

    def __init__(self):
        self.flags, self.profiles, self.pools, self.hardware_compatibility_level = set(), [], {}, None
        self.builder_optimization_level = None

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def create_timing_cache(self, data):
        return ("cache", data)

    def set_timing_cache(self, cache, ignore_mismatch=False):
        self.timing_cache = cache

    def get_timing_cache(self):
        return None


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, mn, opt, mx):
        self.shapes[name] = (mn, opt, mx)


@pytest.fixture
def fake_builder(monkeypatch):
    """A stand-in ``tensorrt`` module (no TensorRT here): the parsed network is made from the plan's graph
    interface; ``state["build"](builder, network)`` decides what ``build_serialized_network`` returns (bytes,
    or None for a failed build, after logging like TensorRT does). Nothing is ever deserialized."""
    import types

    from flashvl_edge.runtime.backends import trt as trt_backend

    class ILogger:
        Severity = types.SimpleNamespace(ERROR="ERROR", INTERNAL_ERROR="INTERNAL_ERROR", WARNING="WARNING")

        def __init__(self):
            pass

    state = {"configs": [], "networks": [], "build": lambda builder, network: b"serialized-plan"}

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            self.strongly = bool(flags)
            return _Network([], [], [])

        def create_builder_config(self):
            state["configs"].append(_Config())
            return state["configs"][-1]

        def create_optimization_profile(self):
            return _Profile()

        def build_serialized_network(self, network, config):
            return state["build"](self, network)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            graph = "llm" if path.endswith("llm.onnx") else "vision"
            m = state["manifest"].graph(graph)
            dtype = lambda t: "HALF" if t.dtype == "float16" else ("INT64" if t.dtype == "int64" else "FLOAT")  # noqa: E731
            pinned = getattr(state["plan"], "fp32_layers", {}).get(graph, [])
            layers = [_Layer(p["node"], [_Tensor(p["tensor"], "FLOAT")]) for p in pinned]
            layers.append(_Layer("node_MatMul_other", [_Tensor("other_out", "FLOAT")]))
            if pinned:  # an index computation with a pinned output name stays as it is
                layers.append(_Layer("node_shape", [_Tensor(pinned[0]["tensor"], "INT64")]))
            net = self.network
            net.inputs = [_Tensor(t.name, dtype(t)) for t in m.inputs]
            net.outputs = [_Tensor(t.name, dtype(t)) for t in m.outputs]
            net.layers = layers
            state["networks"].append((graph, net))
            return True

    trt = types.SimpleNamespace(
        float16="HALF", float32="FLOAT", int64="INT64", ILogger=ILogger, Logger=ILogger, Builder=Builder,
        OnnxParser=OnnxParser, NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=0),
        BuilderFlag=types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32",
                                          OBEY_PRECISION_CONSTRAINTS="OBEY", VERSION_COMPATIBLE="VC"),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        HardwareCompatibilityLevel=types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"))
    monkeypatch.setattr(trt_backend, "require_tensorrt", lambda: trt)
    return trt, state


def _plan_for(bundle_dir, state, trt_version="10.3"):
    from flashvl_edge.export.engines import plan_build

    bundle = Bundle.load(bundle_dir)
    plan = plan_build(bundle, "fp16", trt_version, default_limits(bundle.manifest), timing_cache="/tmp/unused.cache")
    state.update(plan=plan, manifest=bundle.manifest)
    return bundle, plan


def test_build_sets_kv_io_pins_fp32_and_writes_the_serialized_plan(tiny_static_bundle, fake_builder, tmp_path):
    """fp16 KV I/O, the serialized plan and the fp16 pins, against a stand-in TensorRT: the KV I/O tensors
    become fp16, the pinned layers run FP32 (floating outputs only) under "obey", every manifest profile is
    added, and the bytes the builder returns are written as they are."""
    from flashvl_edge.export.engines import _build_one

    trt, state = fake_builder
    bundle, plan = _plan_for(tiny_static_bundle, state)
    out = tmp_path / "llm.engine"
    _build_one(plan, "llm", bundle.graph_path("llm"), out)
    assert out.read_bytes() == b"serialized-plan"
    graph, net = state["networks"][-1]
    cfg = state["configs"][-1]
    assert {"FP16", "TF32", "OBEY"} <= cfg.flags and "INT8" not in cfg.flags
    assert [set(p.shapes) for p in cfg.profiles] == [set(p["shapes"]) for p in plan.profiles["llm"]]
    assert cfg.pools == {"WORKSPACE": plan.workspace_bytes}
    kv = {t.name: t.dtype for t in net.inputs + net.outputs if t.name.startswith(("past_key_values.", "present."))}
    assert kv and set(kv.values()) == {"HALF"}
    assert {t.name: t.dtype for t in net.inputs}["inputs_embeds"] == "FLOAT"  # only the KV changes
    pinned = [layer for layer in net.layers if layer.precision == "FLOAT"]
    assert len(pinned) == len(plan.fp32_layers["llm"]) and all(layer.output_types == {0: "FLOAT"} for layer in pinned)
    assert {layer.name for layer in net.layers if layer.precision is None} == {"node_MatMul_other", "node_shape"}


def test_build_out_of_memory_is_reported_from_tensorrts_own_messages(tiny_static_bundle, fake_builder, tmp_path):
    """A failed build returns no plan; what TensorRT logged says why, so an allocation failure gets the
    out-of-memory hint and any other failure names the node (stand-in builder)."""
    from flashvl_edge.export.engines import _build_one
    from flashvl_edge.runtime.errors import ExportError

    trt, state = fake_builder
    bundle, plan = _plan_for(tiny_static_bundle, state)

    def oom(builder, network):
        builder.logger.log(trt.ILogger.Severity.ERROR, "Requested amount of GPU memory (8589934592 bytes) could not "
                           "be allocated. There may not be enough free memory for allocation to succeed.")
        return None

    state["build"] = oom
    with pytest.raises(ExportError) as e:
        _build_one(plan, "llm", bundle.graph_path("llm"), tmp_path / "llm.engine")
    msg = str(e.value)
    assert "ran out of memory" in msg and "8589934592 bytes" in msg and "--workspace-gb" in msg
    assert not (tmp_path / "llm.engine").exists()

    def other(builder, network):
        builder.logger.log(trt.ILogger.Severity.INTERNAL_ERROR, "Could not find any implementation for node "
                           "/MatMul_7 [ElementWise]")
        return None

    state["build"] = other
    with pytest.raises(ExportError) as e:
        _build_one(plan, "llm", bundle.graph_path("llm"), tmp_path / "llm.engine")
    assert "could not build the llm engine" in str(e.value) and "/MatMul_7" in str(e.value)
    assert "ran out of memory" not in str(e.value)


def test_strongly_typed_build_of_an_fp16_bundle(tiny_static_fp16_bundle, fake_builder, tmp_path):
    """fp16 numerics: the fp16 bundle's network is parsed strongly typed, without precision flags, pins or
    I/O type changes (stand-ins)."""
    from flashvl_edge.export.engines import _build_one

    _, state = fake_builder
    bundle, plan = _plan_for(tiny_static_fp16_bundle, state)
    _build_one(plan, "llm", bundle.graph_path("llm"), tmp_path / "llm.engine")
    graph, net = state["networks"][-1]
    cfg = state["configs"][-1]
    assert not ({"FP16", "INT8", "TF32", "OBEY"} & cfg.flags)
    assert all(layer.precision is None for layer in net.layers)


def test_hardware_compat_is_refused_on_jetson():
    """TensorRT does not support hardware-compatible engines on Jetson's integrated GPUs."""
    from flashvl_edge.export.engines import check_device
    from flashvl_edge.runtime.backends.trt import GpuInfo
    from flashvl_edge.runtime.errors import ExportError

    with pytest.raises(ExportError, match="Jetson"):
        check_device(GpuInfo("Orin", "8.7", 8 << 30, integrated=True), "ampere+")
    check_device(GpuInfo("NVIDIA H100", "9.0", 80 << 30), "ampere+")
    check_device(GpuInfo("Orin", "8.7", 8 << 30, integrated=True), None)
