"""GPU-side TensorRT tests (``pytest -m trt`` / ``make test-gpu``): build real engines for the tiny bundles
and compare them with ONNX Runtime per graph and end to end. Skipped, with the reason, where TensorRT or an
NVIDIA GPU is missing; they never pretend."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.trt


def _skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (JetPack on Jetson; 'pip install tensorrt' on x86)"
    from flashvl_edge.runtime.backends.trt import gpu_info

    if gpu_info() is None:
        return "no NVIDIA GPU visible to the CUDA driver"
    return None


@pytest.fixture(scope="module")
def built_static(tmp_path_factory, request):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from flashvl_edge.main import main

    tiny_static_bundle = request.getfixturevalue("tiny_static_bundle")  # only exported when it will be used
    bundle = tmp_path_factory.mktemp("trt") / "tiny-static"
    shutil.copytree(tiny_static_bundle, bundle)
    assert main(["build", str(bundle), "--precision", "fp16", "--max-context", "256", "--opt-level", "1"]) == 0
    return bundle


def test_build_records_engines_in_manifest(built_static):
    from flashvl_edge.runtime.backends.trt import gpu_info, trt_version
    from flashvl_edge.runtime.bundle import Bundle

    b = Bundle.load(built_static, verify="full")
    (name, entry), = b.manifest.engines.items()
    assert entry.trt_version == trt_version() and entry.compute_capability == gpu_info().compute_capability
    assert entry.graphs["llm"].profiles == ("prefill", "decode")
    for g in ("vision", "llm"):
        assert entry.graphs[g].sha256 == b.manifest.files[b.graph(g).file].sha256
        assert b.path(entry.graphs[g].file).stat().st_size > 0
    assert not any(p.name.startswith(".flashvl-tmp-") for p in (built_static / "engines").iterdir())


def test_verify_ort_vs_trt_passes(built_static, capsys):
    from flashvl_edge.export import verify_backends

    assert verify_backends.run(str(built_static), ["ort", "trt"]) == 0
    out = capsys.readouterr().out
    assert "vision PASS" in out and "llm    PASS" in out and "greedy PASS" in out


def test_trt_decoder_kv_cache_matters(built_static):
    """Decode through the TensorRT KV cache equals a full re-prefill; a dropped cache does not."""
    from flashvl_edge.runtime.backends import open_runners
    from flashvl_edge.runtime.bundle import Bundle

    b = Bundle.load(built_static)
    table = np.load(b.path(b.manifest.embeddings.file), mmap_mode="r")
    vision, llm = open_runners(b, "trt")
    try:
        ids = np.arange(5, 15)
        x = np.asarray(table[ids], llm.embeds_dtype)[None]
        cache = llm.new_cache()
        llm.forward(x[:, :-1], cache)
        step = llm.forward(x[:, -1:], cache)
        full = llm.forward(x, llm.new_cache())
        dropped = llm.forward(x[:, -1:], llm.new_cache())
        assert np.allclose(step, full, atol=5e-2)
        assert not np.allclose(dropped, full, atol=5e-2)
    finally:
        vision.deactivate(), llm.deactivate()


def test_engine_from_other_trt_version_is_refused(built_static, tmp_path):
    from flashvl_edge.runtime.backends import open_runners
    from flashvl_edge.runtime.bundle import Bundle, finalize_manifest
    from flashvl_edge.runtime.errors import EngineMismatchError

    copy = tmp_path / "b"
    shutil.copytree(built_static, copy)
    m = json.loads((copy / "manifest.json").read_text())
    for e in m["engines"].values():
        e["trt_version"] = "7.0.0"
    finalize_manifest(copy, m)
    with pytest.raises(EngineMismatchError, match="7.0.0"):
        open_runners(Bundle.load(copy), "trt")
