"""GPU-side TensorRT tests (``pytest -m trt`` / ``make test-gpu``): build real engines for the tiny bundles
and compare them with ONNX Runtime per graph and end to end, and check on the real stack what the CPU tests
check against stand-ins (tests/test_trt_backend.py, tests/test_engines.py): return codes as errors, engine
limits up front, the extend profile, fp16 KV, no device allocation per token. Skipped, with the reason,
where TensorRT or an NVIDIA GPU is missing (``make test-gpu`` sets FLASHVL_REQUIRE_TRT=1, which turns that
skip into a failure); they never pretend."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.trt
MAX_CONTEXT, MAX_INPUT_LEN = 256, 128


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
        if os.environ.get("FLASHVL_REQUIRE_TRT") == "1":
            pytest.fail(f"make test-gpu needs TensorRT and a GPU: {reason}")
        pytest.skip(reason)
    from flashvl_edge.main import main

    tiny_static_bundle = request.getfixturevalue("tiny_static_bundle")  # only exported when it will be used
    bundle = tmp_path_factory.mktemp("trt") / "tiny-static"
    shutil.copytree(tiny_static_bundle, bundle)
    # max_input_len < max_context, so the extend profile covers past 0..128
    assert main(["build", str(bundle), "--precision", "fp16", "--max-context", str(MAX_CONTEXT),
                 "--max-input-len", str(MAX_INPUT_LEN), "--opt-level", "1"]) == 0
    return bundle


@pytest.fixture
def runners(built_static):
    from flashvl_edge.runtime.backends import open_runners
    from flashvl_edge.runtime.bundle import Bundle

    b = Bundle.load(built_static)
    vision, llm = open_runners(b, "trt")
    yield b, vision, llm
    vision.deactivate(), llm.deactivate()


def _embeds(b, llm, ids):
    table = np.load(b.path(b.manifest.embeddings.file), mmap_mode="r")
    return np.asarray(table[np.asarray(ids)], llm.embeds_dtype)[None]


def test_build_records_engines_in_manifest(built_static):
    from flashvl_edge.runtime.backends.trt import gpu_info, host_platform, trt_version
    from flashvl_edge.runtime.bundle import Bundle

    b = Bundle.load(built_static, verify="full")
    (name, entry), = b.manifest.engines.items()
    assert entry.trt_version == trt_version() and entry.compute_capability == gpu_info().compute_capability
    assert entry.graphs["llm"].profiles == ("prefill", "decode", "extend")
    assert entry.platform == host_platform() and entry.kv_dtype == "float16"
    assert entry.builder["precision_constraints"] == "obey" and entry.builder["fp32_layers"]["llm"] > 0
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


def _engines_recorded_as(built, tmp_path, **fields):
    """A copy of the built bundle whose engine entries claim ``fields`` (another TensorRT, platform...)."""
    from flashvl_edge.runtime.bundle import Bundle, finalize_manifest
    from flashvl_edge.runtime.contract import Manifest

    copy = tmp_path / "b"
    shutil.copytree(built, copy)
    m = json.loads((copy / "manifest.json").read_text())
    for e in m["engines"].values():
        e.update(fields)
    finalize_manifest(copy, Manifest.from_json(m, require_files=False))
    return Bundle.load(copy)


def test_engine_from_other_trt_version_is_refused(built_static, tmp_path):
    from flashvl_edge.runtime.backends import open_runners
    from flashvl_edge.runtime.errors import EngineMismatchError

    with pytest.raises(EngineMismatchError, match="7.0.0"):
        open_runners(_engines_recorded_as(built_static, tmp_path, trt_version="7.0.0"), "trt")


def test_engine_from_another_platform_is_refused(built_static, tmp_path):
    """The recorded platform is checked at load."""
    from flashvl_edge.runtime.backends import open_runners
    from flashvl_edge.runtime.errors import EngineMismatchError

    with pytest.raises(EngineMismatchError, match="windows-x86_64"):
        open_runners(_engines_recorded_as(built_static, tmp_path, platform="windows-x86_64"), "trt")


def test_status_codes_become_clear_errors(runners):
    """A shape outside the profile is refused by TensorRT's set_input_shape, reported naming the
    input, the shape and the profile's range; the runner stays usable."""
    from flashvl_edge.runtime.errors import BackendError

    b, vision, llm = runners
    meta = vision.get_input_metadata()["pixel_values"]
    _, _, hi = vision.profile_range("pixel_values", 0)
    too_many = np.zeros((hi[0] + 1, *hi[1:]), meta.dtype)
    with pytest.raises(BackendError) as e:
        vision.infer({"pixel_values": too_many})
    msg = str(e.value)
    assert "'pixel_values'" in msg and str(list(too_many.shape)) in msg and str(list(hi)) in msg
    ok = vision.infer({"pixel_values": np.zeros((1, *hi[1:]), meta.dtype)})
    assert np.isfinite(ok["image_embeds"]).all()


def test_engine_limits_reach_the_pipeline(built_static):
    """The pipeline's context is the engine's; a longer chat is refused before any engine call."""
    from flashvl_edge.runtime.errors import PromptError
    from flashvl_edge.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(built_static, backend="trt") as pipe:
        assert pipe.llm.limits.max_context == MAX_CONTEXT and pipe.generator.max_context <= MAX_CONTEXT
        calls = pipe.llm.start_timeline(), pipe.vision.start_timeline()
        with pytest.raises(PromptError, match=f"context is {pipe.generator.max_context}"):
            pipe.chat("describe " * MAX_CONTEXT, max_new_tokens=2)
        assert calls == ([], [])


def test_extend_profile_matches_a_full_prefill(runners):
    """A later turn (4 tokens on a 6-token cache) is one engine call in the extend profile; a prompt
    longer than max_input_len runs in chunks; both agree with one full prefill / ONNX Runtime."""
    import onnxruntime as ort

    from flashvl_edge.export.verify_backends import TOLERANCES

    b, _, llm = runners
    rtol, atol = TOLERANCES["fp16"]["llm"]
    x = _embeds(b, llm, np.arange(5, 15))
    cache = llm.new_cache()
    llm.forward(x[:, :6], cache)
    calls = llm.start_timeline()
    later = llm.forward(x[:, 6:], cache)
    llm.stop_timeline()
    assert [c.size for c in calls] == [4] and llm._profile == llm.profile_index["extend"]
    np.testing.assert_allclose(later, llm.forward(x, llm.new_cache()), rtol=rtol, atol=atol)

    n = MAX_INPUT_LEN + 40
    long = _embeds(b, llm, np.arange(n) % 100 + 5)
    calls = llm.start_timeline()
    chunked = llm.forward(long, llm.new_cache())
    llm.stop_timeline()
    assert [c.size for c in calls] == [MAX_INPUT_LEN, 40]
    sess = ort.InferenceSession(str(b.graph_path("llm")), providers=["CPUExecutionProvider"])
    feed = b.manifest.llm_feed(long.astype(np.float32))
    ref = sess.run(["logits"], feed)[0][0, -1]
    np.testing.assert_allclose(chunked, ref, rtol=rtol, atol=atol)


def test_kv_cache_is_fp16_as_budgeted(runners):
    """The engine's KV inputs/outputs are fp16 although the bundle is fp32, and doctor budgets
    exactly those bytes for the built engine set."""
    from flashvl_edge.runtime import doctor
    from flashvl_edge.runtime.backends.trt import gpu_info, trt_version

    b, _, llm = runners
    assert b.manifest.dtype == "fp32"
    for past in llm.past_names:
        assert llm.dtypes[past] == np.float16 and llm.dtypes[llm.present_of[past]] == np.float16
    engine = doctor.budget_engine(b.manifest, gpu_info(), trt_version())
    budget, _ = doctor.bundle_budget(b, engine=engine)
    m = b.manifest.llm
    assert budget["fp16"]["kv_cache"] == 2 * m.num_layers * m.num_kv_heads * m.head_dim * MAX_CONTEXT * 2 * 2
    cache = llm.new_cache()
    llm.forward(_embeds(b, llm, [5, 6, 7]), cache)
    assert all(buf.allocated_nbytes == m.num_kv_heads * MAX_CONTEXT * m.head_dim * 2 for buf in cache.buffers.values())


def test_decode_allocates_no_device_memory_per_token(runners, monkeypatch):
    """After the first decode step, 20 more tokens make no cudaMalloc or cudaFree."""
    from polygraphy import cuda

    b, _, llm = runners
    cache = llm.new_cache()
    llm.forward(_embeds(b, llm, np.arange(5, 12)), cache)
    llm.forward(_embeds(b, llm, [12]), cache)
    calls = []
    w = cuda.wrapper()
    malloc, free = w.malloc, w.free
    monkeypatch.setattr(w, "malloc", lambda n: calls.append(("malloc", n)) or malloc(n))
    monkeypatch.setattr(w, "free", lambda ptr: calls.append(("free", ptr)) or free(ptr))
    for t in range(20):
        llm.forward(_embeds(b, llm, [13 + t]), cache)
    assert calls == [] and cache.length == 28


@pytest.fixture(scope="module")
def built_batched(built_static, tmp_path_factory):
    """The same bundle with engines built for 4 rows: the step core decodes its running rows together."""
    from flashvl_edge.main import main

    bundle = tmp_path_factory.mktemp("trt-batch") / "tiny-static"
    shutil.copytree(built_static, bundle)
    assert main(["build", str(bundle), "--precision", "fp16", "--max-context", str(MAX_CONTEXT),
                 "--max-input-len", str(MAX_INPUT_LEN), "--max-batch", "4", "--opt-level", "1"]) == 0
    return bundle


def test_serve_batches_on_tensorrt_and_answers_as_alone(built_batched):
    """flashvl serve --backend trt decodes its requests in one engine run per step (forward_batch with
    per-row masks and positions) and every greedy answer equals the request alone; dropping the rows'
    masks (padding attended) must break it."""
    import asyncio

    from events import collect

    from flashvl_edge.runtime.backends import trt as trt_backend
    from flashvl_edge.runtime.generate import SamplingParams
    from flashvl_edge.runtime.pipeline import Pipeline
    from flashvl_edge.runtime.samples import test_photo
    from flashvl_edge.runtime.scheduler import GenerationRequest, Scheduler

    questions = [("Hi", 0), ("Describe the image in detail.", 1), ("What is this?", 1), ("a b c d e f g", 0)]
    with Pipeline.from_bundle(built_batched, backend="trt") as pipe:
        assert pipe.llm.supports_batching
        photo = test_photo("astronaut")
        alone = [pipe.chat(q, images=[photo] * n, max_new_tokens=8, ignore_eos=True).token_ids for q, n in questions]
        rows = []
        real = trt_backend.TrtDecoder.forward_batch

        def spy(self, x, batch):
            rows.append(x.shape[0])
            return real(self, x, batch)

        async def served():
            sched = Scheduler(pipe, max_batch=4).start()
            try:
                hs = [sched.submit(GenerationRequest(pipe.prepare_prompt([pipe.prompts.user_message(q, n)], [photo] * n),
                                                     SamplingParams(max_new_tokens=8, ignore_eos=True)))
                      for q, n in questions]
                return [toks for toks, _, _ in await asyncio.wait_for(asyncio.gather(*[collect(h) for h in hs]), 300)]
            finally:
                sched.shutdown(10)
        mp = pytest.MonkeyPatch()
        mp.setattr(trt_backend.TrtDecoder, "forward_batch", spy)
        try:
            assert asyncio.run(served()) == alone
            assert max(rows) > 1
            mp.setattr(trt_backend.TrtBatchKVCache, "attention_mask",
                       lambda self, new=1: np.ones((self.rows, self.total + new), np.int64))
            assert asyncio.run(served()) != alone
        finally:
            mp.undo()
