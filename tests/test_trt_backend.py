"""The TensorRT backend's CPU-checkable parts: engine-set selection and refusal (pure functions), and the
clear BackendError when tensorrt is missing (runtime backend and ``flashvl verify --backends``)."""

from __future__ import annotations

import importlib.util

import pytest

from flashvl_edge.main import main
from flashvl_edge.runtime.backends import trt as trt_backend
from flashvl_edge.runtime.backends.trt import GpuInfo, engine_dir_name, engine_mismatch, select_engine
from flashvl_edge.runtime.bundle import Bundle
from flashvl_edge.runtime.errors import BackendError, EngineMismatchError

ORIN = GpuInfo("Orin", "8.7", 8 << 30)
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 80 << 30)
TURING = GpuInfo("Tesla T4", "7.5", 16 << 30)
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _entry(gpu: GpuInfo, trt: str, **kw):
    return {"gpu": gpu.name, "compute_capability": gpu.compute_capability, "trt_version": trt, **kw}


def test_engine_dir_name():
    assert engine_dir_name("Orin", "8.7", "10.3.0") == "orin_sm87_trt10.3.0"
    assert engine_dir_name("NVIDIA H100 80GB HBM3", "9.0", "10.3.0") == "nvidia-h100-80gb-hbm3_sm90_trt10.3.0"


def test_matching_engine_is_accepted():
    assert engine_mismatch(_entry(ORIN, "10.3.0"), ORIN, "10.3.0") is None


def test_other_trt_version_is_refused_naming_both():
    why = engine_mismatch(_entry(ORIN, "10.3.0"), ORIN, "8.6.2")
    assert "10.3.0" in why and "8.6.2" in why and "flashvl build" in why


def test_other_gpu_is_refused_naming_both():
    why = engine_mismatch(_entry(H100, "10.3.0"), ORIN, "10.3.0")
    assert "H100" in why and "sm90" in why and "Orin" in why and "sm87" in why


def test_no_gpu_or_no_trt_is_refused():
    assert "no NVIDIA GPU" in engine_mismatch(_entry(ORIN, "10.3.0"), None, "10.3.0")
    assert "not installed" in engine_mismatch(_entry(ORIN, "10.3.0"), ORIN, None)


def test_compatibility_flags_widen_what_matches():
    vc = _entry(ORIN, "10.3.0", version_compatible=True)
    assert engine_mismatch(vc, ORIN, "10.7.0") is None
    assert "10.3.0" in engine_mismatch(vc, ORIN, "8.6.2")
    hc = _entry(H100, "10.3.0", hardware_compatibility="ampere+")
    assert engine_mismatch(hc, ORIN, "10.3.0") is None
    assert "older than Ampere" in engine_mismatch(hc, TURING, "10.3.0")


def test_select_engine_picks_the_matching_set_or_refuses():
    manifest = {"engines": {"nvidia-h100_sm90_trt10.3.0": _entry(H100, "10.3.0"),
                            "orin_sm87_trt10.3.0": _entry(ORIN, "10.3.0")}}
    assert select_engine(manifest, ORIN, "10.3.0")[0] == "orin_sm87_trt10.3.0"
    with pytest.raises(EngineMismatchError) as e:
        select_engine(manifest, TURING, "10.3.0")
    assert "Tesla T4" in str(e.value) and "H100" in str(e.value) and "Orin" in str(e.value)
    with pytest.raises(BackendError, match="no TensorRT engines"):
        select_engine({"engines": {}}, ORIN, "10.3.0")


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed")
def test_trt_backend_without_tensorrt_is_a_backend_error(tiny_static_bundle):
    from flashvl_edge.runtime.backends import open_runners

    with pytest.raises(BackendError, match="TensorRT is not installed"):
        open_runners(Bundle.load(tiny_static_bundle), "trt")
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        trt_backend.require_tensorrt()


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed")
def test_verify_backends_without_tensorrt_is_one_line_exit_2(tiny_static_bundle, capsys):
    assert main(["verify", str(tiny_static_bundle), "--backends", "ort,trt"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and err.count("\n") == 1


def test_parity_plumbing_passes_equal_and_fails_different_graphs(tiny_static_bundle, tiny_dynamic_bundle):
    """The Polygraphy comparator path of ``flashvl verify --backends`` (run here with ONNX Runtime on both
    sides): the same graph passes, another model's LLM graph with the same I/O fails."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from flashvl_edge.export.verify_backends import _feeds, compare_runners

    static, dynamic = Bundle.load(tiny_static_bundle), Bundle.load(tiny_dynamic_bundle)

    def runner(b, name):
        return OnnxrtRunner(SessionFromOnnx(str(b.graph_path("llm")), providers=["cpu"]), name=name)

    feed = _feeds(static, "llm")
    ok, max_abs = compare_runners(runner(static, "a"), runner(static, "b"), feed, 1e-4, 1e-4)
    assert ok and max_abs["logits"] == 0.0
    ok, max_abs = compare_runners(runner(static, "a"), runner(dynamic, "other"), feed, 1e-2, 1e-2)
    assert not ok and max_abs["logits"] > 0.1
