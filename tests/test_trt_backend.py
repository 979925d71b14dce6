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

ORIN = GpuInfo("Orin", "8.7", 8 << 30, integrated=True)
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 80 << 30)
RTX3090 = GpuInfo("NVIDIA GeForce RTX 3090", "8.6", 24 << 30)
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
    """Version-compatible engines run on the same or a newer TensorRT (same major, or 8 -> 9/10 and
    10 -> 11), never an older one; hardware-compatible (Ampere+) engines on discrete Ampere+ GPUs only
    (TensorRT does not support them on Jetson)."""
    vc = _entry(ORIN, "10.3.0", version_compatible=True)
    assert engine_mismatch(vc, ORIN, "10.3.0") is None
    assert engine_mismatch(vc, ORIN, "10.7.0") is None
    older = engine_mismatch(vc, ORIN, "10.1.0")
    assert older and "10.3.0 or newer" in older and "10.1.0" in older
    assert "10.3.0" in engine_mismatch(vc, ORIN, "8.6.2")
    assert engine_mismatch(_entry(ORIN, "8.6.2", version_compatible=True), ORIN, "10.3.0") is None
    assert "version-compatible within TensorRT 10.x" in engine_mismatch(vc, ORIN, "12.0.0")
    hc = _entry(H100, "10.3.0", hardware_compatibility="ampere+")
    assert engine_mismatch(hc, RTX3090, "10.3.0") is None
    assert "older than Ampere" in engine_mismatch(hc, TURING, "10.3.0")
    on_jetson = engine_mismatch(hc, ORIN, "10.3.0")
    assert on_jetson and "Jetson" in on_jetson and "--hardware-compat" in on_jetson


def test_engines_do_not_cross_platforms():
    """An engine records the platform that built it; another platform refuses it naming both."""
    arm = _entry(ORIN, "10.3.0", platform="linux-aarch64")
    assert engine_mismatch(arm, ORIN, "10.3.0", host="linux-aarch64") is None
    why = engine_mismatch(arm, ORIN, "10.3.0", host="linux-x86_64")
    assert "linux-aarch64" in why and "linux-x86_64" in why
    portable = _entry(H100, "10.3.0", platform="linux-x86_64", version_compatible=True,
                      hardware_compatibility="ampere+")
    assert "linux-x86_64" in engine_mismatch(portable, RTX3090, "10.3.0", host="linux-aarch64")
    assert trt_backend.host_platform().count("-") >= 1
    # the manifest keeps the platform and the KV dtype
    from flashvl_edge.runtime.contract import EngineEntry as E

    entry = _entry(ORIN, "10.3.0", platform="linux-aarch64", kv_dtype="float16", precision="best")
    assert E.from_json(entry.to_json(), "engines.x") == entry
    assert E.from_json(_entry(ORIN, "10.3.0").to_json(), "engines.x").platform == ""


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


# ---------------------------------------------------------------------------------------------
# The runners against stand-ins for TensorRT and Polygraphy's CUDA helpers (no TensorRT or GPU here).
# The stand-ins implement the calls runtime/backends/trt.py makes, with TensorRT's return conventions
# (set_input_shape / set_optimization_profile_async return False, create_execution_context None), and
# a toy numpy "engine" whose outputs depend on every input, so bindings, profiles and the KV ping-pong
# are checked by value. They are not TensorRT: what only a GPU can confirm is in tests/test_trt_gpu.py.

import sys  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402


class FakeCuda:
    """Stand-in for ``polygraphy.cuda``: device memory is numpy storage behind fake pointers; every
    allocation and free is counted. Reading ``DeviceView.dtype`` prints Polygraphy's deprecation line on
    stdout and returns a NumPy dtype, as Polygraphy 0.49-0.54 do, or (``dtype_returns = "datatype"``) a
    Polygraphy DataType, as past the deprecation's ``remove_in``."""

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}
        self.mallocs = self.frees = self.dtype_reads = 0
        self.dtype_returns = "numpy"
        self._next = 0x1000
        cuda = self

        class DeviceView:
            def __init__(self, ptr, shape, dtype):
                self.ptr, self.shape, self._dtype = ptr, tuple(shape), np.dtype(dtype)

            @property
            def dtype(self):
                from polygraphy.datatype import DataType

                cuda.dtype_reads += 1
                print("[W] 'Using NumPy data types in DeviceView/DeviceArray' is deprecated")
                return DataType.from_dtype(self._dtype) if cuda.dtype_returns == "datatype" else self._dtype

            def copy_to(self, host, stream=None):
                assert host.dtype == self._dtype and host.size == int(np.prod(self.shape))
                host.reshape(-1)[...] = cuda.memory[self.ptr][:host.size]
                return host

        class DeviceArray(DeviceView):
            def __init__(self, shape=(), dtype=np.float32):
                super().__init__(0, shape, dtype)
                self._alloc(int(np.prod(self.shape)))

            def _alloc(self, n):
                cuda.mallocs += 1
                self.ptr = cuda._next
                cuda._next += 0x1000
                cuda.memory[self.ptr] = np.zeros(max(1, n), self._dtype)

            def resize(self, shape):
                if int(np.prod(shape)) > cuda.memory[self.ptr].size:
                    self.free()
                    self._alloc(int(np.prod(shape)))
                self.shape = tuple(shape)
                return self

            def free(self):
                if self.ptr in cuda.memory:
                    cuda.frees += 1
                    del cuda.memory[self.ptr]

            def copy_from(self, host, stream=None):
                host = np.ascontiguousarray(host)
                assert host.dtype == self._dtype, (host.dtype, self._dtype)
                assert host.size <= int(np.prod(self.shape)), "host buffer larger than the device buffer"
                cuda.memory[self.ptr][:host.size] = host.reshape(-1)
                return self

            def view(self, shape=None, dtype=None):
                shape = self.shape if shape is None else tuple(shape)
                assert int(np.prod(shape)) <= int(np.prod(self.shape)), "a view cannot exceed the array"
                return DeviceView(self.ptr, shape, self._dtype)

        class Stream:
            ptr = 7

            def synchronize(self):
                pass

            def free(self):
                pass

        self.DeviceView, self.DeviceArray, self.Stream = DeviceView, DeviceArray, Stream

    def read(self, ptr, shape, dtype):
        data = self.memory[ptr]
        assert data.dtype == np.dtype(dtype)
        return data[:int(np.prod(shape))].reshape(shape).copy()

    def write(self, ptr, array):
        assert self.memory[ptr].size >= array.size, "output larger than its device buffer"
        self.memory[ptr][:array.size] = array.reshape(-1)


FAKE_TRT = types.SimpleNamespace(
    __version__="10.3.0", TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
    nptype=lambda dt: dt, Runtime=lambda logger: types.SimpleNamespace(engine_host_code_allowed=False))


class FakeEngine:
    """A stand-in ``ICudaEngine``: named I/O tensors (shape -1 = dynamic), optimization profiles, and a toy
    model run by its contexts. ``context_fails``: create_execution_context returns None (out of memory)."""

    def __init__(self, cuda, tensors, profiles, model, context_fails=False):
        self.cuda, self.tensors, self.profiles, self.model = cuda, tensors, profiles, model
        self.names = list(tensors)
        self.context_fails = context_fails
        self.contexts = []
        self.device_memory_size = 64 << 20

    num_io_tensors = property(lambda self: len(self.names))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, n):
        return self.tensors[n][0]

    def get_tensor_dtype(self, n):
        return np.dtype(self.tensors[n][1])

    def get_tensor_shape(self, n):
        return self.tensors[n][2]

    def get_tensor_profile_shape(self, n, p):
        return self.profiles[p][n]

    def create_execution_context(self):
        if self.context_fails:
            return None
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
        self.switches, self.executions, self.fail_switch = [], [], False

    def set_optimization_profile_async(self, idx, stream):
        if self.fail_switch:
            return False
        self.profile = idx
        self.switches.append(idx)
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        return self.engine.model.output_shape(name, self.shapes)

    def execute_async_v3(self, stream):
        cuda = self.engine.cuda
        feed = {n: cuda.read(self.addresses[n], self.shapes[n], self.engine.tensors[n][1])
                for n in self.shapes}
        self.executions.append((self.profile, {n: s for n, s in self.shapes.items()}))
        for name, value in self.engine.model.run(feed).items():
            cuda.write(self.addresses[name], np.ascontiguousarray(value, self.engine.tensors[name][1]))
        return True


class ToyDecoder:
    """The LLM graph's interface on one layer: present = past + each new token's embedding (first head_dim
    values) plus its position; logits = per-channel sums of every key in the cache, so they depend on the
    whole sequence, the positions and a correctly passed past."""

    KV, HD, H, V = 2, 4, 6, 5

    def output_shape(self, name, shapes):
        b, seq, _ = shapes["inputs_embeds"]
        total = shapes["past_key_values.0.key"][2] + seq
        return (b, 1, self.V) if name == "logits" else (b, self.KV, total, self.HD)

    def run(self, feed):
        x, mask, pos = feed["inputs_embeds"], feed["attention_mask"], feed["position_ids"]
        past_k, past_v = feed["past_key_values.0.key"], feed["past_key_values.0.value"]
        seq, past = x.shape[1], past_k.shape[2]
        assert mask.shape == (1, past + seq) and (mask == 1).all(), "the mask must be all ones over past + seq"
        assert (pos[0] == np.arange(past, past + seq)).all(), "position ids must continue the cache"
        new = (x[0, :, :self.HD] + pos[0][:, None])[None, None].repeat(self.KV, axis=1)
        k = np.concatenate([past_k, new.astype(past_k.dtype)], axis=2)
        v = np.concatenate([past_v, 2 * new.astype(past_v.dtype)], axis=2)
        logits = np.zeros((1, 1, self.V), np.float32)
        logits[0, 0, :self.HD] = k.astype(np.float64).sum(axis=(0, 1, 2))
        logits[0, 0, self.HD] = v.astype(np.float64).sum() + past + seq
        return {"logits": logits, "present.0.key": k, "present.0.value": v}


def toy_llm_engine(cuda, max_context=64, max_input_len=16, kv_dtype=np.float16, extend=True, **kw):
    t = ToyDecoder
    c, L = max_context, max_input_len
    tensors = {"inputs_embeds": ("input", np.float32, (1, -1, t.H)), "attention_mask": ("input", np.int32, (1, -1)),
               "position_ids": ("input", np.int32, (1, -1)),
               "past_key_values.0.key": ("input", kv_dtype, (1, t.KV, -1, t.HD)),
               "past_key_values.0.value": ("input", kv_dtype, (1, t.KV, -1, t.HD)),
               "logits": ("output", np.float32, (1, 1, t.V)),
               "present.0.key": ("output", kv_dtype, (1, t.KV, -1, t.HD)),
               "present.0.value": ("output", kv_dtype, (1, t.KV, -1, t.HD))}

    def prof(seq, past, total):
        kv = tuple(((1, t.KV, past[i], t.HD)) for i in range(3))
        return {"inputs_embeds": tuple((1, seq[i], t.H) for i in range(3)),
                "attention_mask": tuple((1, total[i]) for i in range(3)),
                "position_ids": tuple((1, seq[i]) for i in range(3)),
                "past_key_values.0.key": kv, "past_key_values.0.value": kv}

    profiles = [prof((1, 8, L), (0, 0, 0), (1, 8, L)), prof((1, 1, 1), (1, 20, c - 1), (2, 21, c))]
    if extend:
        profiles.append(prof((1, 8, L), (0, 20, c - L), (1, 28, c)))
    return FakeEngine(cuda, tensors, profiles, ToyDecoder(), **kw)


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    """Installs the stand-ins: ``tensorrt`` (FAKE_TRT), ``polygraphy.cuda`` and Polygraphy's engine loader;
    returns (cuda, register) where ``register(engine) -> path`` makes a file that loads as ``engine``."""
    import polygraphy
    import polygraphy.backend.trt as pg_trt

    cuda = FakeCuda()
    engines = {}
    monkeypatch.setattr(trt_backend, "require_tensorrt", lambda: FAKE_TRT)
    monkeypatch.setattr(polygraphy, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", cuda)
    monkeypatch.setattr(pg_trt, "engine_from_bytes", lambda data, runtime=None: engines[data])
    monkeypatch.setattr(pg_trt, "get_trt_logger", lambda: None)

    def register(engine):
        path = tmp_path / f"e{len(engines)}.engine"
        data = path.name.encode()
        path.write_bytes(data)
        engines[data] = engine
        return path

    return cuda, register


def _toy_decoder(fake_trt, profiles=("prefill", "decode", "extend"), max_context=64, max_input_len=16, **kw):
    cuda, register = fake_trt
    engine = toy_llm_engine(cuda, max_context, max_input_len, extend="extend" in profiles, **kw)
    dec = trt_backend.TrtDecoder(register(engine), list(profiles), max_context, max_input_len)
    return dec.activate(), engine


def _reference_logits(embeds):
    """The toy model's logits for ``embeds`` [1, n, H] in one pass from an empty cache (numpy only)."""
    t = ToyDecoder
    n = embeds.shape[1]
    new = (embeds[0, :, :t.HD] + np.arange(n)[:, None]).astype(np.float16).astype(np.float64)
    out = np.zeros(t.V)
    out[:t.HD] = new.sum(axis=0) * t.KV
    out[t.HD] = 2 * new.sum() * t.KV + n
    return out


def test_profile_steps_choose_from_the_shapes():
    """Prefill on an empty cache, decode for one token, extend for several on a cache; runs longer
    than a profile's seq go in chunks; without extend (older engines), one token at a time."""
    ranges = {"prefill": (16, 0, 0), "decode": (1, 1, 63), "extend": (16, 0, 48)}
    assert trt_backend.profile_steps(0, 10, ranges) == [("prefill", 10)]
    assert trt_backend.profile_steps(10, 1, ranges) == [("decode", 1)]
    assert trt_backend.profile_steps(10, 5, ranges) == [("extend", 5)]
    assert trt_backend.profile_steps(0, 40, ranges) == [("prefill", 16), ("extend", 16), ("extend", 8)]
    assert trt_backend.profile_steps(46, 4, ranges) == [("extend", 4)]
    assert trt_backend.profile_steps(49, 3, ranges) == [("decode", 1)] * 3  # past beyond extend's range
    old = {"prefill": (16, 0, 0), "decode": (1, 1, 63)}
    assert trt_backend.profile_steps(10, 3, old) == [("decode", 1)] * 3


def test_decoder_extend_prefills_a_later_turn_in_one_call(fake_trt):
    """Stand-in engine. A second turn on a cache runs one execution in the extend profile, and its
    logits equal those of the whole conversation prefilled at once."""
    dec, engine = _toy_decoder(fake_trt)
    x = np.random.default_rng(0).standard_normal((1, 14, ToyDecoder.H)).astype(np.float32)
    cache = dec.new_cache()
    dec.forward(x[:, :8], cache)
    ctx = engine.contexts[0]
    ctx.executions.clear()
    logits = dec.forward(x[:, 8:], cache)
    assert [(p, s["inputs_embeds"][1]) for p, s in ctx.executions] == [(2, 6)]  # profile 2 = extend
    assert cache.length == 14
    np.testing.assert_allclose(logits, _reference_logits(x), rtol=1e-3)
    np.testing.assert_allclose(dec.forward(x, dec.new_cache()), _reference_logits(x), rtol=1e-3)


def test_decoder_without_extend_profile_goes_token_by_token(fake_trt):
    """An engine built before the extend profile: the same turn runs through decode, one token per call."""
    dec, engine = _toy_decoder(fake_trt, profiles=("prefill", "decode"))
    x = np.random.default_rng(1).standard_normal((1, 11, ToyDecoder.H)).astype(np.float32)
    cache = dec.new_cache()
    dec.forward(x[:, :8], cache)
    ctx = engine.contexts[0]
    ctx.executions.clear()
    logits = dec.forward(x[:, 8:], cache)
    assert [p for p, _ in ctx.executions] == [1, 1, 1]
    np.testing.assert_allclose(logits, _reference_logits(x), rtol=1e-3)


def test_decoder_prompt_longer_than_max_input_len_is_chunked(fake_trt):
    """Stand-in engine. A prompt over the engine's max_input_len but within its context prefills
    in chunks (prefill, then extend) instead of failing; past max_context it is refused before any run."""
    dec, engine = _toy_decoder(fake_trt, max_context=64, max_input_len=16)
    x = np.random.default_rng(2).standard_normal((1, 40, ToyDecoder.H)).astype(np.float32)
    logits = dec.forward(x, dec.new_cache())
    ctx = engine.contexts[0]
    assert [(p, s["inputs_embeds"][1]) for p, s in ctx.executions] == [(0, 16), (2, 16), (2, 8)]
    np.testing.assert_allclose(logits, _reference_logits(x), rtol=1e-3)
    ctx.executions.clear()
    too_long = np.zeros((1, 65, ToyDecoder.H), np.float32)
    with pytest.raises(BackendError, match="exceeds the engines' max_context 64"):
        dec.forward(too_long, dec.new_cache())
    assert ctx.executions == []


def test_decoder_allocates_nothing_per_token(fake_trt):
    """Stand-in allocator. After the first step, decoding 30 tokens allocates and frees no device
    memory (the mask grows every step but is bound as a view of one max_context buffer uploaded once)."""
    cuda, _ = fake_trt
    dec, engine = _toy_decoder(fake_trt, profiles=("prefill", "decode"))
    rng = np.random.default_rng(3)
    cache = dec.new_cache()
    dec.forward(rng.standard_normal((1, 5, ToyDecoder.H)).astype(np.float32), cache)
    dec.forward(rng.standard_normal((1, 1, ToyDecoder.H)).astype(np.float32), cache)  # decode buffers exist now
    before = (cuda.mallocs, cuda.frees)
    mask_ptr = engine.contexts[0].addresses["attention_mask"]
    for _ in range(30):
        dec.forward(rng.standard_normal((1, 1, ToyDecoder.H)).astype(np.float32), cache)
    assert (cuda.mallocs, cuda.frees) == before
    assert engine.contexts[0].addresses["attention_mask"] == mask_ptr and cache.length == 36


def test_outputs_are_fetched_without_reading_device_dtypes(fake_trt, capsys):
    """Stand-in DeviceView. The runner allocates host arrays from the dtypes it read from the engine,
    never from ``DeviceView.dtype`` (deprecated in Polygraphy 0.49-0.54 with a stdout line per read, i.e.
    per decoded token; a Polygraphy DataType afterwards, which np.empty rejects)."""
    cuda, _ = fake_trt
    dec, _ = _toy_decoder(fake_trt, profiles=("prefill", "decode"))
    cache = dec.new_cache()
    x = np.ones((1, 3, ToyDecoder.H), np.float32)
    out = dec.forward(x, cache)
    dec.forward(x[:, :1], cache)
    assert out.dtype == np.float32 and cuda.dtype_reads == 0
    assert "deprecated" not in capsys.readouterr().out
    cuda.dtype_returns = "datatype"
    assert dec.forward(x[:, :1], cache).dtype == np.float32


def _toy_vision_engine(cuda, max_tiles=3, **kw):
    tensors = {"pixel_values": ("input", np.float32, (-1, 3, 4, 4)), "image_embeds": ("output", np.float32, (-1, 2, 5))}
    profiles = [{"pixel_values": ((1, 3, 4, 4), (2, 3, 4, 4), (max_tiles, 3, 4, 4))}]

    class Model:
        def output_shape(self, name, shapes):
            return (shapes["pixel_values"][0], 2, 5)

        def run(self, feed):
            x = feed["pixel_values"]
            return {"image_embeds": np.broadcast_to(x.sum(axis=(1, 2, 3))[:, None, None], (x.shape[0], 2, 5))}

    return FakeEngine(cuda, tensors, profiles, Model(), **kw)


def test_shape_outside_the_profile_is_a_clear_error(fake_trt):
    """Stand-in context returning False from set_input_shape. The error names the input, its shape
    and the profile's range, before anything is uploaded or run."""
    cuda, register = fake_trt
    engine = _toy_vision_engine(cuda, max_tiles=3)
    runner = trt_backend.TrtRunner(register(engine), "vision").activate()
    ok = runner.infer({"pixel_values": np.ones((2, 3, 4, 4), np.float32)})["image_embeds"]
    assert ok.shape == (2, 2, 5) and (ok == 48).all()
    with pytest.raises(BackendError) as e:
        runner.infer({"pixel_values": np.ones((4, 3, 4, 4), np.float32)})
    msg = str(e.value)
    assert "'pixel_values'" in msg and "[4, 3, 4, 4]" in msg and "[1, 3, 4, 4] to [3, 3, 4, 4]" in msg
    assert "'vision'" in msg and len(engine.contexts[0].executions) == 1


def test_failed_context_and_profile_switch_are_clear_errors(fake_trt):
    """Stand-ins. create_execution_context returning None is "out of device memory"; a refused
    profile switch names the profile."""
    cuda, register = fake_trt
    runner = trt_backend.TrtRunner(register(_toy_vision_engine(cuda, context_fails=True)), "vision")
    with pytest.raises(BackendError, match="out of device memory.*64 MiB"):
        runner.activate()
    dec, engine = _toy_decoder(fake_trt)
    cache = dec.new_cache()
    dec.forward(np.ones((1, 3, ToyDecoder.H), np.float32), cache)
    engine.contexts[0].fail_switch = True
    with pytest.raises(BackendError, match=r"optimization profile 1 \('decode'\)"):
        dec.forward(np.ones((1, 1, ToyDecoder.H), np.float32), cache)


def test_decoder_refuses_an_entry_without_prefill_and_decode():
    with pytest.raises(BackendError, match="expected prefill and decode"):
        trt_backend.TrtDecoder("x.engine", ["prefill"], 64, 16)
    with pytest.raises(BackendError, match="expected prefill and decode"):
        trt_backend.TrtDecoder("x.engine", ["prefill", "decode", "chunk"], 64, 16)


def test_engine_limits_plan_images_and_refuse_long_chats_up_front(tiny_dynamic_bundle, monkeypatch):
    """Stand-in runners. ONNX Runtime runners carrying the limits an engine set records (what
    open_vision/open_llm attach from the manifest's engine entry). A photo that needs more tiles than the
    engine's 2 gets at most 2 crops + the thumbnail, in one vision run; a chat longer than the engine's
    context is refused before any graph runs."""
    from PIL import Image

    from flashvl_edge.runtime import backends
    from flashvl_edge.runtime.errors import PromptError
    from flashvl_edge.runtime.images import image_to_tokens_plan
    from flashvl_edge.runtime.pipeline import Pipeline

    manifest = Bundle.load(tiny_dynamic_bundle).manifest
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 2000, 3), np.uint8))
    # the bundle alone tiles this photo into more images than the engine takes (num_tiles counts the thumbnail)
    assert image_to_tokens_plan(2000, 800, manifest).num_tiles > manifest.preprocess.vision_batch(2) == 3
    limits = EngineLimits(max_batch=1, max_input_len=200, max_context=256, max_tiles=2)
    calls: list[tuple[str, int]] = []
    real = backends.open_runners

    def open_with_engine_limits(bundle, backend="ort", **options):
        vision, llm = real(bundle, "ort", device="cpu")
        vision.limits = llm.limits = limits
        infer, forward = vision.infer_impl, llm.forward
        vision.infer_impl = lambda feed: calls.append(("vision", len(feed["pixel_values"]))) or infer(feed)
        llm.forward = lambda x, cache: calls.append(("llm", x.shape[1])) or forward(x, cache)
        return vision, llm

    monkeypatch.setattr(backends, "open_runners", open_with_engine_limits)
    with Pipeline.from_bundle(tiny_dynamic_bundle, backend="trt") as pipe:
        pipe.chat("What is this?", photo, max_new_tokens=2, temperature=0.0)
        assert [n for g, n in calls if g == "vision"] == [3]
        assert sum(n for g, n in calls if g == "llm") < limits.max_context
        calls.clear()
        with pytest.raises(PromptError, match="context is 256"):
            pipe.chat("describe " * 300, photo, max_new_tokens=2)
        assert calls == []


def test_parity_feeds_take_polygraphy_datatypes(tiny_static_bundle, recwarn):
    """``verify --backends``: Runner metadata dtypes are read as Polygraphy DataTypes, the only
    kind Polygraphy returns from 0.60 on (NumPy dtypes from ``get_input_metadata()`` are deprecated). A
    stand-in runner (ONNX Runtime, reporting int32 ids as a TensorRT 8.6 engine does) gets its int inputs
    cast, and no deprecation warning is raised."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.datatype import DataType

    from flashvl_edge.export.verify_backends import _feeds, compare_runners

    bundle = Bundle.load(tiny_static_bundle)
    seen = {}

    class Int32Runner(OnnxrtRunner):
        def get_input_metadata(self, use_numpy_dtypes=None):
            meta = super().get_input_metadata(use_numpy_dtypes=False)
            for name in ("attention_mask", "position_ids"):
                meta[name].dtype = DataType.INT32
            assert all(isinstance(m.dtype, type(DataType.INT32)) for m in meta.values())
            return meta

        def infer_impl(self, feed_dict, *args, **kwargs):
            seen.update({k: v.dtype for k, v in feed_dict.items()})
            return super().infer_impl({k: v.astype(np.int64) if v.dtype == np.int32 else v
                                       for k, v in feed_dict.items()}, *args, **kwargs)

    def runner(cls, name):
        return cls(SessionFromOnnx(str(bundle.graph_path("llm")), providers=["cpu"]), name=name)

    ok, max_abs = compare_runners(runner(OnnxrtRunner, "ort"), runner(Int32Runner, "int32"), _feeds(bundle, "llm"),
                                  1e-4, 1e-4)
    assert ok and max_abs["logits"] == 0.0
    assert seen["attention_mask"] == np.int32 and seen["position_ids"] == np.int32
    assert not [w for w in recwarn.list if "get_input_metadata" in str(w.message)]
