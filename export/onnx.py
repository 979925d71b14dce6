"""The two ONNX graphs and the bundle writer.

One image, from pixels to tokens, crosses two graphs:

* ``vision.onnx``: ``pixel_values`` [num_tiles, 3, H, W] -> ``image_embeds`` [num_tiles, tokens_per_tile, D]
  (vision tower + pixel shuffle + adapter, i.e. the model's own ``get_image_features``);
* ``llm.onnx``: the Qwen2 decoder with its KV cache as plain inputs/outputs, ``inputs_embeds`` in and the
  logits of the LAST position only out (a long prefill never materialises seq x vocab logits). One graph
  serves prefill (past = 0) and decode. Attention and RMSNorm are exported in a graph-friendly form
  (:func:`decoder_export_forms`: grouped-query attention without repeated K/V, RMSNorm as a division that
  ONNX Runtime fuses): same math, fewer nodes, and a quarter less time per int4 decode step on CPU.

The token embedding table is saved next to them (``embed_tokens.npy``): the runtime gathers token
embeddings itself and splices the image embeddings in at the image-token positions.

Graph I/O is declared once, as data (:func:`vision_io`, :func:`llm_io`): the same specs drive
``torch.onnx.export`` (names, dynamic dims), are checked against the exported graph, and are written into
the manifest's ``graphs`` section, where the runtime and the engine builder read them.
"""

from __future__ import annotations

import contextlib
import copy
import io as io_module
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from flashvl_edge.runtime.bundle import finalize_manifest, staging_dir, tool_versions
from flashvl_edge.runtime.contract import SCHEMA_VERSION, GraphIO, Manifest, llm_io, vision_io
from flashvl_edge.runtime.errors import ExportError

if TYPE_CHECKING:  # the model side imports transformers; only its type is needed here
    from flashvl_edge.export.families import LoadedModel

OPSET = 18  # plain ONNX ops only (opset 18 has no fused Attention op); TensorRT 10 parses it
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
VISION_FILE = "vision.onnx"
LLM_FILE = "llm.onnx"
EMBED_FILE = "embed_tokens.npy"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Above this many bytes of weights a graph is saved with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Example sizes for tracing: all different and > 1, so torch.export specialises no dynamic dim.
EXAMPLE_SIZES = {"num_tiles": 2, "batch": 2, "seq": 3, "past": 5, "total": 8}


# --------------------------------------------------------------------------------------------
# Graph I/O, declared once


# TensorSpec, GraphIO and the two graphs' interfaces live in the runtime's contract, which both
# sides read: the exporter declares exactly what the runtime will check.


# --------------------------------------------------------------------------------------------
# The wrappers torch.onnx.export traces


class VisionGraph(torch.nn.Module):
    """pixel_values -> image_embeds through the model's own ``get_image_features`` (same ordering)."""

    def __init__(self, vlm: torch.nn.Module):
        super().__init__()
        self.vlm = vlm

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vlm.get_image_features(pixel_values)


# The decoder's attention and RMSNorm, written for the graph rather than for PyTorch: same math as
# transformers' eager code (verify checks ~1e-6 against the unmodified model), fewer and cheaper nodes.
# Only while exporting (``decoder_export_forms``); the PyTorch model itself is never changed.
EXPORT_ATTENTION = "flashvl_export_gqa"


def grouped_query_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention for grouped-query heads without materializing repeated K/V.

    transformers' eager/sdpa paths ``repeat_kv`` the cache to all query heads (an Expand + copy of
    the whole past per layer and step: 12 x 28 x past x head_dim floats for Qwen2-1.5B) and the sdpa
    decomposition adds NaN guards (IsNaN + Where over the scores). Here the query heads of one KV
    head are folded into the rows instead: q [b, kv, group*seq, d] @ k^T [b, kv, d, past] is one
    batched MatMul over the cache as it is, and the additive mask is broadcast over the group.
    Head h uses KV head h // group, exactly as ``repeat_kv``.
    """
    b, heads, seq, d = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q = query.reshape(b, kv_heads, group * seq, d)
    scores = torch.matmul(q, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :total]
        if mask.dtype == torch.bool:  # sdpa-style mask: True = attend
            mask = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, torch.finfo(scores.dtype).min)
        scores = scores.reshape(b, kv_heads, group, seq, total) + mask[:, :, None]  # same mask for the group
        scores = scores.reshape(b, kv_heads, group * seq, total)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.matmul(probs, value).reshape(b, heads, seq, d)
    return out.transpose(1, 2).contiguous(), None


def _rms_norm_forward(self, hidden_states):
    # x / sqrt(mean(x^2) + eps) rather than x * rsqrt(...): the Div form is the pattern ONNX Runtime
    # fuses into one SimplifiedLayerNormalization kernel (rsqrt exports as Sqrt + Reciprocal + Mul,
    # six separate passes over the hidden state). TensorRT parses either as plain ops.
    dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(dtype)


def _fused_linear(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """One weight/bias for several Linears on the same input (concatenated output features)."""
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(lin.out_features, dtype=weight.dtype)
         for b, lin in zip(biases, linears)])
    return weight, bias, [lin.out_features for lin in linears]


def _qwen2_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                             **kwargs):
    # transformers 5.23's Qwen2Attention.forward, with q/k/v as one MatMul
    import sys

    apply_rotary_pos_emb = sys.modules[type(self).__module__].apply_rotary_pos_emb
    b, seq = hidden_states.shape[:2]
    q, k, v = torch.nn.functional.linear(hidden_states, self.qkv_weight, self.qkv_bias).split(self.qkv_sizes, dim=-1)
    q, k, v = (t.view(b, seq, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    out, _ = grouped_query_attention(self, q, k, v, attention_mask, scaling=self.scaling)
    return self.o_proj(out.reshape(b, seq, -1).contiguous()), None


def _qwen2_mlp_forward(self, x):
    # down(act(gate(x)) * up(x)) with gate and up as one MatMul
    gate, up = torch.nn.functional.linear(x, self.gate_up_weight, self.gate_up_bias).split(self.gate_up_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


@contextlib.contextmanager
def decoder_export_forms(text_model: torch.nn.Module, text_config):
    """Export the decoder with :func:`grouped_query_attention`, the Div-form RMSNorm, and (Qwen2
    layers) q/k/v and gate/up each as one MatMul.

    Why the fused projections: a decode step is ~200 matrix-vector products, each a separate kernel
    launch with its own thread-pool round trip, and the k/v ones are small (1536 x 256). One q/k/v
    MatMul and one gate/up MatMul per layer are 84 launches fewer per token for Qwen2-1.5B, on
    weights concatenated along the output features: int8 per-channel and int4 per-block (blocks run
    along the input dimension) quantize them exactly as they would the separate matrices. The
    model keeps its values and parameter names; its q/k/v and gate/up weights are left as views into
    the concatenations, which take their place in memory.
    """
    import types

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(EXPORT_ATTENTION, grouped_query_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EXPORT_ATTENTION, eager_mask)  # additive float mask
    patched: list[tuple[torch.nn.Module, str | None]] = []

    def fuse(m, prefix, *linears):
        # non-persistent buffers: the graph's initializers get names like layers.3.self_attn.qkv_weight
        weight, bias, sizes = _fused_linear(*linears)
        # The Linears' own tensors become views of the concatenation (same values, the old storage is
        # freed), so the export does not hold two copies (11.8 GB peak for the 2B model otherwise).
        start = 0
        for lin, n in zip(linears, sizes):
            lin.weight.data = weight[start:start + n]
            if lin.bias is not None:
                lin.bias.data = bias[start:start + n]
            start += n
        m.register_buffer(prefix + "_weight", weight, persistent=False)
        m.register_buffer(prefix + "_bias", bias, persistent=False)
        setattr(m, prefix + "_sizes", sizes)
        patched.append((m, prefix))

    for m in text_model.modules():
        kind = type(m).__name__
        if kind.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight"):
            m.forward = types.MethodType(_rms_norm_forward, m)
            patched.append((m, None))
        elif kind == "Qwen2Attention":
            fuse(m, "qkv", m.q_proj, m.k_proj, m.v_proj)
            m.forward = types.MethodType(_qwen2_attention_forward, m)
        elif kind == "Qwen2MLP":
            fuse(m, "gate_up", m.gate_proj, m.up_proj)
            m.forward = types.MethodType(_qwen2_mlp_forward, m)
    before = text_config._attn_implementation
    text_config._attn_implementation = EXPORT_ATTENTION
    try:
        yield
    finally:
        text_config._attn_implementation = before
        for m, prefix in patched:
            if "forward" in vars(m):
                del m.forward
            if prefix:
                del m._buffers[prefix + "_weight"], m._buffers[prefix + "_bias"]
                delattr(m, prefix + "_sizes")


class LLMGraph(torch.nn.Module):
    """The decoder with the KV cache as flat tensors; logits for the last position only.

    torch.export cannot take a ``DynamicCache`` as an input, so the wrapper takes the past as a flat
    tuple (key, value per layer) and rebuilds the cache inside.
    """

    def __init__(self, text_model: torch.nn.Module, lm_head: torch.nn.Module, text_config):
        super().__init__()
        self.text_model = text_model
        self.lm_head = lm_head
        self.text_config = text_config
        self.num_layers = text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.lm_head(out.last_hidden_state[:, -1:, :])
        present = []
        for layer in out.past_key_values.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (logits, *present)


# --------------------------------------------------------------------------------------------
# Model facts


def llm_dims(text_config) -> dict[str, int]:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return {
        "num_layers": int(text_config.num_hidden_layers),
        "hidden": int(text_config.hidden_size),
        "kv_heads": int(getattr(text_config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "vocab": int(text_config.vocab_size),
    }


def vision_image_size(loaded: "LoadedModel") -> int:
    sections = loaded.manifest_sections
    size = (sections.get("vision") or {}).get("image_size") or (sections.get("preprocess") or {}).get("image_size")
    if not size:
        raise ExportError("the model's manifest sections name no vision image_size; cannot export the vision graph")
    return int(size)


def _param_bytes(params, dtype: torch.dtype) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * (torch.finfo(dtype).bits // 8 if p.is_floating_point() else p.element_size())
    return total


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` with floating parameters in ``dtype``, built tensor by tensor.

    ``deepcopy(module).half()`` would first duplicate the fp32 weights (8 GB for the 2B model); the
    memo maps every floating tensor straight to its converted copy instead. Tied weights stay tied.
    """
    memo: dict[int, Any] = {}
    # The rotary frequencies stay fp32: rounded to fp16, a position's angle is off by position x that
    # rounding, so attention over long distances drifts (0.3 relative logit error at 8,000 tokens).
    keep = {id(b) for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] == "inv_freq"}
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in memo or id(t) in keep or not t.is_floating_point():
            continue
        new = t.detach().to(dtype)
        memo[id(t)] = torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new
    return copy.deepcopy(module, memo)


# --------------------------------------------------------------------------------------------
# Export of one graph


def _torch_dims(io: GraphIO, module: torch.nn.Module) -> tuple[Any, ...]:
    """``dynamic_shapes`` for torch.export from the specs: one shared ``Dim`` per dim name.

    Inputs that land in a ``*args`` of ``module.forward`` (the flat KV cache) are grouped into one
    tuple, the structure torch.export expects.
    """
    import inspect

    from torch.export import Dim

    dims: dict[str, Any] = {}
    spec = []
    for t in io.inputs:
        axes = {}
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                if d not in dims:
                    dims[d] = Dim(d, min=0 if d in ("past",) else 1)
                axes[axis] = dims[d]
        spec.append(axes or None)
    params = list(inspect.signature(module.forward).parameters.values())
    n_named = next((i for i, p in enumerate(params) if p.kind is p.VAR_POSITIONAL), len(params))
    if n_named < len(spec):
        spec = spec[:n_named] + [tuple(spec[n_named:])]
    return tuple(spec)


def example_inputs(io: GraphIO, sizes: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
    """Tensors matching the specs (random floats, ones for masks, aranges for positions)."""
    sizes = {**EXAMPLE_SIZES, **(sizes or {})}
    g = torch.Generator().manual_seed(0)
    out = []
    for t in io.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "attention_mask":
            out.append(torch.ones(shape, dtype=torch.int64))
        elif t.name == "position_ids":
            past = sizes["total"] - shape[1]
            out.append(torch.arange(past, past + shape[1], dtype=torch.int64).expand(shape).clone())
        else:
            out.append(torch.randn(shape, generator=g).to(getattr(torch, t.dtype)))
    return tuple(out)


def _conform(ir_model, io: GraphIO, what: str) -> None:
    """Check the exported graph against the specs and give every dynamic dim its spec name.

    The exporter names derived dims after their expression (``past + seq``); the contract calls that
    one ``total``. A mismatch anywhere else means the export is wrong, so it is an error, not a warning.
    """
    import onnx_ir as ir

    for values, specs in ((ir_model.graph.inputs, io.inputs), (ir_model.graph.outputs, io.outputs)):
        if [v.name for v in values] != [s.name for s in specs]:
            raise ExportError(f"{what} graph I/O {[v.name for v in values]} differs from the declared "
                              f"{[s.name for s in specs]}; this model cannot be exported as-is")
        for v, s in zip(values, specs):
            dtype = np.dtype(v.dtype.numpy()).name
            if dtype != s.dtype or v.shape is None or len(v.shape) != len(s.shape):
                raise ExportError(f"{what} graph {s.name!r} is {dtype}{list(v.shape or [])}, expected "
                                  f"{s.dtype}{list(s.shape)}; this model cannot be exported as-is")
            dims = []
            for got, want in zip(v.shape, s.shape):
                if isinstance(want, int):
                    if got != want:
                        raise ExportError(f"{what} graph {s.name!r} has shape {list(v.shape)}, expected "
                                          f"{list(s.shape)}; this model cannot be exported as-is")
                    dims.append(want)
                else:
                    if isinstance(got, int):
                        raise ExportError(f"{what} graph {s.name!r}: dim {want!r} was fixed to {got} by the "
                                          "exporter; it must stay dynamic")
                    dims.append(ir.SymbolicDim(want))
            v.shape = ir.Shape(dims)


def export_graph(module: torch.nn.Module, io: GraphIO, path: Path, what: str,
                 expected_weight_bytes: int, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Trace ``module`` with torch.onnx (dynamo), check it against ``io``, save, run onnx.checker."""
    import logging

    import onnx

    # "torchvision is not installed" and similar notes from the exporter's op registry are noise here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    external = expected_weight_bytes >= EXTERNAL_DATA_THRESHOLD
    args = example_inputs(io, sizes)
    # The exporter reports each of its stages on stdout and warns about transformers internals; the
    # export's own progress bar and step timings are what the user needs to see.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io_module.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, input_names=io.input_names(),
            output_names=io.output_names(), dynamic_shapes=_torch_dims(io, module), optimize=True, verbose=False)
    _conform(program.model, io, what)
    contrib = sorted({n.op_type for n in program.model.graph.all_nodes() if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise ExportError(f"{what} graph uses non-standard ops {contrib}; TensorRT could not parse it")
    # Constant folding can bake copies of weights into the graph (e.g. a transposed lm_head); catch it.
    init_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                     if v.const_value is not None)
    if init_bytes > 1.05 * expected_weight_bytes + (4 << 20):
        raise ExportError(f"{what} graph holds {init_bytes / 2**20:.1f} MiB of constants for "
                          f"{expected_weight_bytes / 2**20:.1f} MiB of weights: the exporter duplicated weights")
    program.save(path, external_data=external)
    del program
    onnx.checker.check_model(str(path))  # path form: works with external data > 2 GiB
    data_file = path.name + ".data"
    return {
        "file": path.name,
        "external_data": data_file if external and (path.parent / data_file).exists() else None,
        "opset": OPSET,
        **io.to_json(),
        "weight_bytes": init_bytes,
    }


# --------------------------------------------------------------------------------------------
# The bundle


def _estimate_bytes(loaded: "LoadedModel", dtype: torch.dtype) -> int:
    """Disk needed: every weight once in the graphs, the embedding table again, 10% slack."""
    total = _param_bytes(loaded.model.parameters(), dtype)
    embed = loaded.model.get_input_embeddings().weight
    return int(1.1 * (total + embed.numel() * torch.finfo(dtype).bits // 8)) + (16 << 20)


class _Steps:
    """tqdm over the export steps, with each step's time printed as it ends."""

    def __init__(self, names: Sequence[str], enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), desc="export", unit="step", disable=not enabled, file=sys.stderr)
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.bar.set_postfix_str(name)
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = dt = time.perf_counter() - t0
        if self.enabled:
            self.bar.write(f"  {name}: {dt:.1f} s", file=sys.stderr)
        self.bar.update(1)
        return result

    def close(self) -> None:
        self.bar.close()


def export_bundle(loaded: "LoadedModel", out, dtype: str = "fp32", max_tiles: int | None = None,
                  force: bool = False, progress: bool = True) -> Path:
    """Export ``loaded`` into a bundle directory ``out`` (written to a staging dir, renamed at the end)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    tdtype = DTYPES[dtype]
    np_dtype = np.dtype("float16" if dtype == "fp16" else "float32").name
    sections = copy.deepcopy(loaded.manifest_sections)
    preprocess = sections.setdefault("preprocess", {})
    if max_tiles is not None:
        if preprocess.get("mode") != "tiles":
            raise ExportError(f"--max-tiles applies to tiled models; this {sections.get('variant')} model takes "
                              "one image at a fixed size: drop --max-tiles")
        min_tiles = int(preprocess.get("min_tiles") or 1)
        if int(max_tiles) < max(1, min_tiles):
            raise ExportError(f"--max-tiles {max_tiles} is below the model's min_tiles {min_tiles}; use a larger value")
        preprocess["max_tiles"] = int(max_tiles)

    vlm = loaded.model.eval()
    dims = llm_dims(vlm.text_config)
    image_size = vision_image_size(loaded)
    with torch.no_grad():
        probe = vlm.get_image_features(torch.zeros(1, 3, image_size, image_size))
    tokens_per_tile = int(probe.shape[1])
    if probe.shape[2] != dims["hidden"]:
        raise ExportError(f"vision features have width {probe.shape[2]}, the LLM expects {dims['hidden']}")
    declared = (sections.get("vision") or {}).get("tokens_per_tile")
    if declared is not None and int(declared) != tokens_per_tile:
        raise ExportError(f"the model produces {tokens_per_tile} tokens per tile but its config says {declared}")

    v_io = vision_io(image_size, tokens_per_tile, dims["hidden"], np_dtype)
    l_io = llm_io(dims["num_layers"], dims["hidden"], dims["kv_heads"], dims["head_dim"], dims["vocab"], np_dtype)
    embed = vlm.get_input_embeddings().weight
    text_model, lm_head = vlm.text_model, vlm.lm_head
    llm_params = [p for n, p in text_model.named_parameters() if p is not embed] + list(lm_head.parameters())
    llm_bytes = _param_bytes(llm_params, tdtype)
    llm_param_ids = {id(p) for p in llm_params} | {id(embed)}
    vision_bytes = _param_bytes([p for p in vlm.parameters() if id(p) not in llm_param_ids], tdtype)

    steps = _Steps(["vision graph", "llm graph", "embeddings", "tokenizer", "manifest"], progress)
    try:
        with staging_dir(out, force=force, min_free_bytes=_estimate_bytes(loaded, tdtype)) as tmp:
            def do_vision():
                module = VisionGraph(vlm if tdtype == torch.float32 else _cast_copy(vlm, tdtype)).eval()
                return export_graph(module, v_io, tmp / VISION_FILE, "vision", vision_bytes)

            def do_llm():
                module = LLMGraph(text_model, lm_head, vlm.text_config)
                if tdtype != torch.float32:
                    module = _cast_copy(module, tdtype)
                with decoder_export_forms(module.text_model, module.text_config):
                    info = export_graph(module.eval(), l_io, tmp / LLM_FILE, "llm", llm_bytes)
                return {**info, "num_layers": dims["num_layers"]}

            def do_embeddings():
                table = embed.detach().to(tdtype).numpy()
                np.save(tmp / EMBED_FILE, table)
                return {"file": EMBED_FILE, "dtype": table.dtype.name, "shape": list(table.shape)}

            def do_tokenizer():
                import json

                shutil.copyfile(loaded.tokenizer_file, tmp / TOKENIZER_FILE)
                (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(loaded.tokenizer_config, indent=2, ensure_ascii=False),
                                                         encoding="utf-8")
                return {"file": TOKENIZER_FILE, "config_file": TOKENIZER_CONFIG_FILE}

            graphs = {"vision": steps.run("vision graph", do_vision), "llm": steps.run("llm graph", do_llm)}
            embeddings = steps.run("embeddings", do_embeddings)
            tokenizer = steps.run("tokenizer", do_tokenizer)
            vision_section = sections.setdefault("vision", {})
            vision_section.setdefault("tokens_per_tile", tokens_per_tile)
            sections.setdefault("image", {}).setdefault("tokens_per_tile", tokens_per_tile)
            manifest = Manifest.from_json({
                "schema_version": SCHEMA_VERSION,
                **sections,
                "dtype": dtype,
                "quantization": None,
                "graphs": graphs,
                "embeddings": embeddings,
                "tokenizer": tokenizer,
                "tools": tool_versions("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers"),
                "engines": {},
                "files": {},
            }, where="the exported manifest", require_files=False)
            steps.run("manifest", lambda: finalize_manifest(tmp, manifest))
    finally:
        steps.close()
    if progress:
        total = sum(steps.timings.values())
        print(f"exported {out} ({dtype}) in {total:.1f} s", file=sys.stderr)
    return Path(out)
