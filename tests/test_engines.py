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
    pre, dec = plan["profiles"]["llm"]
    assert [pre["name"], dec["name"]] == ["prefill", "decode"]
    past = next(n for n in pre["shapes"] if n.startswith("past_key_values."))
    assert pre["shapes"][past]["min"][2] == pre["shapes"][past]["max"][2] == 0
    assert pre["shapes"]["inputs_embeds"]["max"][1] == lim["max_input_len"]
    assert pre["shapes"]["attention_mask"]["max"] == pre["shapes"]["position_ids"]["max"]  # total == seq
    assert dec["shapes"]["inputs_embeds"]["min"][1] == dec["shapes"]["inputs_embeds"]["max"][1] == 1
    for k in ("min", "opt", "max"):  # decode: total = past + 1
        assert dec["shapes"]["attention_mask"][k][1] == dec["shapes"][past][k][2] + 1
    assert dec["shapes"]["attention_mask"]["max"][1] == lim["max_context"]
    assert dec["shapes"][past]["min"][2] == 1


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
    assert "--builder-optimization-level 5" in out and "--hardware-compatibility-level ampere_plus" in out
    assert "--version-compatible" in out and "workspace:2147483648" in out and "/tmp/x.cache" in out
    # the numbers in the text are the profile's: 3 crop tiles + the thumbnail = 4 images max, past 511 max in decode
    assert f"max [{pre.vision_batch(3)},3," in out and pre.vision_batch(3) == 4 and ",511," in out


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
