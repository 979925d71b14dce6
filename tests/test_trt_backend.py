"""The TensorRT backend's CPU-checkable parts: engine-set selection and refusal (pure functions), and the
clear BackendError when tensorrt is missing (runtime backend and ``flashvl verify --backends``)."""

from __future__ import annotations

import importlib.util

import pytest

from factories import as_manifest
from flashvl_edge.main import main
from flashvl_edge.runtime.backends import trt as trt_backend
from flashvl_edge.runtime.backends.trt import GpuInfo, engine_dir_name, engine_mismatch, select_engine
from flashvl_edge.runtime.bundle import Bundle
from flashvl_edge.runtime.contract import EngineEntry, EngineLimits
from flashvl_edge.runtime.errors import BackendError, EngineMismatchError

ORIN = GpuInfo("Orin", "8.7", 8 << 30)
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 80 << 30)
TURING = GpuInfo("Tesla T4", "7.5", 16 << 30)
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _entry(gpu: GpuInfo, trt: str, **kw) -> EngineEntry:
    return EngineEntry(**{"dir": "engines/x/1", "gpu": gpu.name, "compute_capability": gpu.compute_capability,
                          "trt_version": trt, "precision": "fp16", "strongly_typed": False,
                          "hardware_compatibility": None, "version_compatible": False,
                          "limits": EngineLimits(1, 64, 128, 1), "graphs": {}, **kw})


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
    manifest = as_manifest({}).replace(engines={"nvidia-h100_sm90_trt10.3.0": _entry(H100, "10.3.0"),
                                                "orin_sm87_trt10.3.0": _entry(ORIN, "10.3.0")})
    assert select_engine(manifest, ORIN, "10.3.0")[0] == "orin_sm87_trt10.3.0"
    with pytest.raises(EngineMismatchError) as e:
        select_engine(manifest, TURING, "10.3.0")
    assert "Tesla T4" in str(e.value) and "H100" in str(e.value) and "Orin" in str(e.value)
    with pytest.raises(BackendError, match="no TensorRT engines"):
        select_engine(as_manifest({}), ORIN, "10.3.0")


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


def test_end_to_end_helpers_run_through_the_pipeline(tiny_static_bundle):
    """The greedy and near-tie helpers of ``flashvl verify --backends`` (ONNX Runtime here): the margin is
    taken on the same LLM path as chat, so at every step it is that step's top-1 minus top-2 logit."""
    import numpy as np

    from flashvl_edge.export.verify_backends import E2E_PROMPT, _test_image, greedy_tokens, margin_at
    from flashvl_edge.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(tiny_static_bundle, backend="ort", device="cpu") as pipe:
        tokens = greedy_tokens(pipe)
        inputs = pipe.prefill_inputs(E2E_PROMPT, _test_image())
        gen = pipe.generator
        same, logits = gen.greedy(gen.llm.new_cache(), inputs.token_ids, inputs.image_embeds, inputs.image_mask,
                                  n_tokens=len(tokens), stop=False)
        assert same == tokens
        for step in (0, 5, len(tokens) - 1):
            top2 = np.sort(logits[step].astype(np.float64))[-2:]
            assert margin_at(pipe, tokens, step) == pytest.approx(top2[1] - top2[0], abs=1e-4)
