"""The two ONNX graphs and the bundle writer.

Graph I/O is checked on the ONNX files themselves (not only on the manifest), parity is checked against
transformers in PyTorch, and the bad-input paths leave nothing half-written behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from flashvl_edge.export import onnx as fx
from flashvl_edge.export.verify import relative_error, torch_decode
from flashvl_edge.main import main
from flashvl_edge.runtime.bundle import STAGING_PREFIX, Bundle, sha256_file
from flashvl_edge.runtime.errors import ExportError

ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    model = onnx.load(str(path), load_external_data=False)

    def describe(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": ONNX_TYPES[t.elem_type],
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}

    return [describe(v) for v in model.graph.input], [describe(v) for v in model.graph.output]


def staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)]


@pytest.fixture(params=["static", "dynamic"])
def bundle_and_model(request):
    return (request.getfixturevalue(f"tiny_{request.param}_bundle"), request.getfixturevalue(f"tiny_{request.param}_loaded"))


# --------------------------------------------------------------------------------------------
# Graph I/O as specified


def test_graph_io_names_shapes_dtypes(bundle_and_model):
    bundle_path, loaded = bundle_and_model
    bundle = Bundle.load(bundle_path)
    m = bundle.manifest
    cfg = loaded.model.text_config
    n_layers, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    D, V, size = cfg.hidden_size, cfg.vocab_size, m.vision.image_size
    T = m.vision.tokens_per_tile
    assert T == m.image.tokens_per_tile and T > 0

    v_in, v_out = graph_io(bundle.graph_path("vision"))
    assert v_in == [{"name": "pixel_values", "dtype": "float32", "shape": ["num_tiles", 3, size, size]}]
    assert v_out == [{"name": "image_embeds", "dtype": "float32", "shape": ["num_tiles", T, D]}]

    l_in, l_out = graph_io(bundle.graph_path("llm"))
    expected_in = [
        {"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "seq", D]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
    ] + [{"name": f"past_key_values.{i}.{k}", "dtype": "float32", "shape": ["batch", kv, "past", hd]}
         for i in range(n_layers) for k in ("key", "value")]
    expected_out = [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, V]}] + [
        {"name": f"present.{i}.{k}", "dtype": "float32", "shape": ["batch", kv, "total", hd]}
        for i in range(n_layers) for k in ("key", "value")]
    assert l_in == expected_in
    assert l_out == expected_out
    # The manifest carries exactly what the graphs declare: consumers read it instead of re-deriving.
    io = {g: m.graph(g).io.to_json() for g in ("vision", "llm")}
    assert (io["vision"]["inputs"], io["vision"]["outputs"]) == (v_in, v_out)
    assert (io["llm"]["inputs"], io["llm"]["outputs"]) == (l_in, l_out)
    assert m.llm.num_layers == n_layers and m.graph("llm").external_data is None
    assert m.embeddings.to_json() == {"file": "embed_tokens.npy", "dtype": "float32", "shape": [V, D]}
    table = np.load(bundle.path("embed_tokens.npy"), mmap_mode="r")
    assert np.array_equal(table, loaded.model.get_input_embeddings().weight.detach().numpy())
    assert m.dtype == "fp32" and m.quantization is None
    assert {"tokenizer.json", "tokenizer_config.json", "vision.onnx", "llm.onnx", "embed_tokens.npy"} <= set(m.files)
    assert "torch" in m.tools and "onnx" in m.tools


def test_graphs_are_plain_onnx_without_duplicated_weights(tiny_static_bundle, tiny_static_loaded):
    bundle = Bundle.load(tiny_static_bundle)
    vlm = tiny_static_loaded.model
    embed = vlm.get_input_embeddings().weight
    llm_weights = {id(p): p.numel() * 4 for p in list(vlm.text_model.parameters()) + list(vlm.lm_head.parameters())
                   if p is not embed}
    llm_weights[id(vlm.lm_head.weight)] = vlm.lm_head.weight.numel() * 4
    for name in ("vision", "llm"):
        path = bundle.graph_path(name)
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "contrib ops would not parse in TensorRT"
        assert model.opset_import[0].version == fx.OPSET
    llm = onnx.load(str(bundle.graph_path("llm")))
    init_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in llm.graph.initializer)
    # every LLM weight once (the tied lm_head included), nothing folded into a second copy
    assert init_bytes <= 1.05 * sum(llm_weights.values()) + (1 << 20)
    assert init_bytes >= 0.95 * sum(llm_weights.values())


def test_decoder_export_forms_are_the_same_math_and_leave_the_model_as_it_was(tiny_static_loaded):
    """Inside ``decoder_export_forms`` the decoder (fused q/k/v and gate/up, grouped-query attention
    without repeat_kv, Div-form RMSNorm) gives transformers' logits, causal prefill over a past and
    decode alike; afterwards the model has no extra buffers, methods or attention setting."""
    vlm = tiny_static_loaded.model
    graph = fx.LLMGraph(vlm.text_model, vlm.lm_head, vlm.text_config).eval()
    cfg = vlm.text_config
    g = torch.Generator().manual_seed(0)
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    past = [torch.randn(1, kv, 4, hd, generator=g) for _ in range(2 * cfg.num_hidden_layers)]
    embeds = torch.randn(1, 5, cfg.hidden_size, generator=g)
    args = (embeds, torch.ones(1, 9, dtype=torch.int64), torch.arange(4, 9)[None], *past)
    state = {k: v.clone() for k, v in vlm.state_dict().items()}
    impl = cfg._attn_implementation
    with torch.no_grad():
        ref = graph(*args)
        with fx.decoder_export_forms(graph.text_model, cfg):
            assert cfg._attn_implementation == fx.EXPORT_ATTENTION
            got = graph(*args)
            step = graph(embeds[:, :1], torch.ones(1, 5, dtype=torch.int64), torch.tensor([[4]]), *past)
        ref_step = graph(embeds[:, :1], torch.ones(1, 5, dtype=torch.int64), torch.tensor([[4]]), *past)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[0], ref_step[0], rtol=1e-5, atol=1e-5)
    assert cfg._attn_implementation == impl
    assert vlm.state_dict().keys() == state.keys()
    assert all(torch.equal(vlm.state_dict()[k], v) for k, v in state.items())
    assert not [m for m in vlm.modules() if "forward" in vars(m) or "qkv_sizes" in vars(m)]


# --------------------------------------------------------------------------------------------
# Parity against PyTorch (logits, past = 0, batch 2)


def test_prefill_with_empty_past_and_batch_two(tiny_static_bundle, tiny_static_loaded):
    """The graph itself, fed a batch of two through a plain runner and the contract's feed builders."""
    from flashvl_edge.runtime.backends.ort import OrtRunner

    bundle = Bundle.load(tiny_static_bundle)
    m = bundle.manifest
    table = np.load(bundle.path(m.embeddings.file))
    vlm = tiny_static_loaded.model
    V = vlm.text_config.vocab_size
    ids = np.random.default_rng(0).integers(0, V, size=(2, 7))
    embeds = table[ids]
    with OrtRunner(bundle.graph_path("llm"), "llm", device="cpu") as llm:
        out = llm.infer(m.llm_feed(embeds, None))
        assert out["logits"].shape == (2, 1, V)  # last position only, never [batch, seq, vocab]
        assert out["present.0.key"].shape[2] == 7
        logits = out["logits"][:, -1]
        next_tokens = logits.argmax(-1)
        step = llm.infer(m.llm_feed(table[next_tokens][:, None], m.past_from_outputs(out), past_len=7))
    step_logits = step["logits"][:, -1]
    assert step_logits.shape == (2, V)
    for row in range(2):  # each batch row equals its own unbatched torch run, prefill and decode
        _, ref = torch_decode(vlm, embeds[row], 1, forced=[int(next_tokens[row])])
        assert relative_error(logits[row], ref[0])[1] < 1e-4
        assert relative_error(step_logits[row], ref[1])[1] < 1e-4
    # the two rows are different inputs: a graph that mixed them up would not pass the loop above
    assert relative_error(logits[0], logits[1])[1] > 1e-2


def test_vision_graph_takes_any_number_of_tiles(tiny_dynamic_bundle, tiny_dynamic_loaded):
    from flashvl_edge.runtime.backends.ort import OrtRunner

    bundle = Bundle.load(tiny_dynamic_bundle)
    size, tokens = bundle.manifest.vision.image_size, bundle.manifest.vision.tokens_per_tile
    with OrtRunner(bundle.graph_path("vision"), "vision", device="cpu") as vision:
        for n in (1, 3):
            pv = np.random.default_rng(n).standard_normal((n, 3, size, size)).astype(np.float32)
            with torch.no_grad():
                ref = tiny_dynamic_loaded.model.get_image_features(torch.from_numpy(pv)).numpy()
            got = vision.infer({"pixel_values": pv})["image_embeds"]
            assert got.shape == ref.shape == (n, tokens, ref.shape[-1])
            assert relative_error(got, ref)[1] < 1e-4


# --------------------------------------------------------------------------------------------
# fp16, --max-tiles


def test_fp16_export_records_float16_io(tiny_static_fp16_bundle, tiny_static_loaded):
    m = Bundle.load(tiny_static_fp16_bundle).manifest
    assert m.dtype == "fp16" and m.embeddings.dtype == "float16"
    for name in ("vision", "llm"):
        ins, outs = graph_io(tiny_static_fp16_bundle / m.graph(name).file)
        io = m.graph(name).io.to_json()
        assert (ins, outs) == (io["inputs"], io["outputs"])
        floats = [t["dtype"] for t in ins + outs if t["name"] not in ("attention_mask", "position_ids")]
        assert set(floats) == {"float16"}
    # the fp16 copy is made for the export only: the caller's model stays fp32
    assert next(tiny_static_loaded.model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Bad input and atomicity


def test_existing_out_without_force_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["export", "tiny-static", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not staging_left(tmp_path)


def test_unknown_preset_is_one_line_and_writes_nothing(tmp_path, capsys):
    rc = main(["export", "no-such-preset", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no-such-preset" in err
    assert not (tmp_path / "out").exists() and not staging_left(tmp_path)


def test_bad_max_tiles_and_dtype_are_user_errors(tmp_path, tiny_static_loaded):
    with pytest.raises(ExportError, match="max-tiles"):
        fx.export_bundle(tiny_static_loaded, tmp_path / "a", max_tiles=0, progress=False)
    with pytest.raises(ExportError, match="dtype"):
        fx.export_bundle(tiny_static_loaded, tmp_path / "b", dtype="int3", progress=False)
    assert not list(tmp_path.iterdir())


def test_interrupted_export_keeps_the_previous_bundle(tmp_path, monkeypatch, tiny_static_bundle, tiny_static_loaded):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_static_bundle, out)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    real_save = np.save

    def failing_save(*args, **kwargs):  # the graphs are written by now; the embeddings step dies
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError):
        fx.export_bundle(tiny_static_loaded, out, force=True, progress=False)
    monkeypatch.setattr(np, "save", real_save)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    Bundle.load(out, verify="full")
    assert not staging_left(tmp_path)


def test_disk_space_precheck(tmp_path, monkeypatch, tiny_static_loaded):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    with pytest.raises(ExportError, match="disk space"):
        fx.export_bundle(tiny_static_loaded, tmp_path / "out", progress=False)
    assert not list(tmp_path.iterdir())


def test_cli_export_writes_a_loadable_bundle(tmp_path, capsys, tiny_static_bundle):
    out = tmp_path / "b"
    # a single-image (static) model has no tile budget to set: refused before anything is written
    assert main(["export", "tiny-static", "--out", str(out), "--max-tiles", "2"]) == 2
    assert "--max-tiles" in capsys.readouterr().err and not out.exists()
    assert main(["export", "tiny-static", "--out", str(out), "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert "vision graph:" in captured.err and "llm graph:" in captured.err  # step timings
    m = Bundle.load(out, verify="full").manifest
    assert m.source.seed == 3 and m.preprocess.max_tiles == 1
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    # --seed reaches the model: seed 3 is not the session's seed-0 model
    seed0 = Bundle.load(tiny_static_bundle).manifest
    assert m.files["embed_tokens.npy"].sha256 != seed0.files["embed_tokens.npy"].sha256
