"""What a CPU can check about TensorRT: lint an ONNX graph against TensorRT's ONNX parser.

The table of supported operators lives in ``export/data/trt_onnx_ops.json`` (with its source: onnx-tensorrt's
``docs/operators.md`` and changelog). :func:`lint` reports, for a target TensorRT version:

- opset out of the documented range (a warning: NVIDIA's parser imports node by node, older opsets too),
  non-default domains (``com.microsoft`` contrib ops never parse), ONNX local functions before TensorRT 9;
- operators the parser does not support, or only from a newer release, and the per-op restrictions that
  bite exported transformers (constant ``axes`` for Reduce/Squeeze/Unsqueeze, and for Slice before 10.3;
  LayerNormalization with more than one output; Resize antialiasing or a mode other than
  nearest/linear/cubic; ScatterND reductions);
- QDQ: zero points 0 and constant (TensorRT only does symmetric quantization), quantized types TensorRT
  has, INT4 / block quantization only from TensorRT 10; placement (a QuantizeLinear that feeds anything but
  a DequantizeLinear, dangling Q or DQ) and weights of Conv/MatMul/Gemm quantized per tensor or off the
  output-channel axis are warnings (TensorRT builds them; they point at a quantizer bug or cost accuracy);
- graph inputs against the manifest's declared shapes and the engine builder's optimization profiles
  (a dimension the profile varies must be dynamic in the graph, static dims must agree);
- INT64 inputs (TensorRT 8.6 casts them to INT32, so the runtime must bind int32 buffers).

:func:`fp32_layers` finds the nodes a weakly typed fp16 build must keep in fp32 (rotary angles,
normalization statistics); ``flashvl build`` pins them.

Every rule that applies to a TensorRT 10 target is checked against NVIDIA's own parser and builder
(TensorRT-RTX's, which installs everywhere) on a graph made to trigger it (tests/test_trt_support.py):
an error here is a graph they reject, a warning one they build. Rules about older targets (8.6: opset 17,
no functions, INT8-only Q/DQ, INT64 cast) stay as documented, as no parser of those releases runs here.
``flashvl build --dry-run`` also runs the real parse when TensorRT-RTX is installed.

Models are opened with ``load_external_data=False``: a full-size graph lints without reading its weights
(only zero-point tensors are read, and only when they were stored externally).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import onnx
from onnx import TensorProto, numpy_helper

from flashvl_edge.runtime.backends.trt import parse_version
from flashvl_edge.runtime.contract import GraphSpec
from flashvl_edge.runtime.errors import FlashVLError

DATA_FILE = Path(__file__).parent / "data" / "trt_onnx_ops.json"

ERROR, WARNING, INFO = "error", "warning", "info"
# ops whose second input is a quantized weight we expect to be per-channel, and that weight's
# output-channel axis (MatMul: B is [K, N] -> axis 1; Conv: W is [O, I, ...] -> axis 0; Gemm: depends on transB)
_WEIGHT_OPS = {"MatMul", "Conv", "Gemm", "ConvTranspose"}
_REDUCE_OPS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare"}
_INT8_TYPES = {TensorProto.INT8, TensorProto.UINT8}
_TRT10_QTYPES = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT8E4M3FN}


class LintError(FlashVLError):
    """A graph cannot be linted (unreadable file, unknown TensorRT version)."""


@dataclass(frozen=True)
class Finding:
    severity: str           # error | warning | info
    code: str               # short stable id, e.g. "unsupported-op", "qdq-dangling"
    message: str
    node: str | None = None

    def __str__(self) -> str:
        where = f" [{self.node}]" if self.node else ""
        return f"{self.severity}: {self.code}{where}: {self.message}"


# --------------------------------------------------------------------------------------------
# The support table


@lru_cache(maxsize=1)
def support_table() -> dict[str, Any]:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def _vkey(version: str) -> tuple[int, ...]:
    """``parse_version`` for a target a user typed: a LintError (one line) when it is not a version."""
    try:
        return parse_version(version, strict=True)
    except ValueError:
        raise LintError(f"TensorRT version {version!r} is not a version number like 10.3 or 8.6") from None


def resolve_trt_version(trt: str) -> str:
    """``"10"`` -> ``"10.3"`` (what JetPack 6.1/6.2 ship), ``"8"`` -> ``"8.6"``, ``"jetpack7"`` -> ``"10.13"``
    (the table's ``alias_sources`` cite the release notes); full versions pass through."""
    table = support_table()
    v = table["aliases"].get(str(trt).lower(), str(trt))
    if _vkey(v) < (8, 6):
        raise LintError(f"TensorRT {v} is older than the oldest supported target (8.6, JetPack 6.0)")
    return ".".join(str(p) for p in _vkey(v)[:2])


def _version_entry(version: str) -> dict[str, Any]:
    """The opset range documented for the newest table release <= ``version``."""
    entries = support_table()["versions"]
    best = max((k for k in entries if _vkey(k) <= _vkey(version)), key=_vkey)
    return entries[best]


def op_status(op_type: str, version: str) -> tuple[str, str | None]:
    """("ok"|"newer"|"unsupported"|"unknown", detail) for an ONNX default-domain op at a TRT version."""
    table = support_table()
    entry = table["ops"].get(op_type)
    if entry is None:
        return ("unsupported" if op_type in table["unsupported_ops"] else "unknown"), None
    if _vkey(entry["min_trt"]) > _vkey(version):
        return "newer", entry["min_trt"]
    return "ok", entry.get("restriction")


# --------------------------------------------------------------------------------------------
# Graph helpers


class _Graph:
    """Name lookups over one (sub)graph: producers, consumers, constants (initializer or Constant node)."""

    def __init__(self, graph: onnx.GraphProto, outer: "_Graph | None" = None) -> None:
        self.graph = graph
        self.outer = outer
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def initializer(self, name: str) -> TensorProto | None:
        t = self.inits.get(name)
        if t is None:
            p = self.producer.get(name)
            if p is not None and p.op_type == "Constant":
                for a in p.attribute:
                    if a.name == "value":
                        return a.t
            if p is None and self.outer is not None:
                return self.outer.initializer(name)
        return t

    def is_constant(self, name: str) -> bool:
        return self.initializer(name) is not None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def _tensor_values(t: TensorProto, base_dir: Path):
    """Values of a (small) tensor; reads its external data only if it has some."""
    if t.data_location == TensorProto.EXTERNAL:
        from onnx.external_data_helper import load_external_data_for_tensor

        t2 = TensorProto()
        t2.CopyFrom(t)
        load_external_data_for_tensor(t2, str(base_dir))
        return numpy_helper.to_array(t2)
    return numpy_helper.to_array(t)


# --------------------------------------------------------------------------------------------
# Checks


def _model_opset(model: onnx.ModelProto) -> int | None:
    return next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), None)


def _check_opset(model: onnx.ModelProto, version: str, out: list[Finding]) -> None:
    """Outside the documented range is a warning: the parser imports node by node (TensorRT 10.x parses
    opset-21 block-quantized DequantizeLinear although its table says "up to 20", and NVIDIA's parser
    imports opset 7 graphs although the table starts at 9), and the op signatures that changed are checked
    per node (e.g. Reduce* axes as an input, opset 18)."""
    entry = _version_entry(version)
    opset = _model_opset(model)
    if opset is None:
        out.append(Finding(ERROR, "opset", "the model imports no default ONNX opset"))
        return
    lo, hi = entry["opset_min"], entry["opset_max"]
    if lo is not None and opset < lo:
        out.append(Finding(WARNING, "opset", f"opset {opset} is older than TensorRT {version} documents "
                                             f"(opset {lo}..{hi}); re-export with a newer opset"))
    elif opset > hi:
        out.append(Finding(WARNING, "opset", f"opset {opset} is newer than TensorRT {version} documents (up to "
                                             f"opset {hi}); nodes whose signature changed since are checked one by one"))


def _check_nodes(g: _Graph, model: onnx.ModelProto, version: str, base_dir: Path, out: list[Finding],
                 function_domains: set[str]) -> None:
    v = _vkey(version)
    opset = _model_opset(model) or 0
    max_opset = _version_entry(version)["opset_max"]
    for node in g.graph.node:
        label = _node_label(node)
        domain = node.domain or ""
        if domain in function_domains:
            if v < (9, 0):
                out.append(Finding(ERROR, "function", f"{domain}::{node.op_type} is an ONNX local function; "
                                                      f"TensorRT {version} cannot import functions (9.0+); inline them", label))
            continue
        if domain not in ("", "ai.onnx"):
            hint = " (an ONNX Runtime contrib op)" if domain == "com.microsoft" else ""
            out.append(Finding(ERROR, "domain", f"{domain}::{node.op_type}{hint} is not a standard ONNX op; "
                                                f"TensorRT's ONNX parser cannot import it", label))
            continue
        status, detail = op_status(node.op_type, version)
        if status in ("unsupported", "unknown"):
            out.append(Finding(ERROR, "unsupported-op", f"{node.op_type} is not supported by TensorRT's ONNX parser", label))
        elif status == "newer":
            out.append(Finding(ERROR, "op-needs-newer-trt", f"{node.op_type} is only parsed from TensorRT {detail} "
                                                            f"(target {version})", label))
        else:
            _check_restrictions(g, node, label, version, out)
            # opset 18 moved Reduce* axes (ReduceSum: opset 13) from an attribute to an input
            if (node.op_type in _REDUCE_OPS - {"ReduceSum"} and opset >= 18 and max_opset < 18
                    and len(node.input) > 1 and node.input[1]):
                out.append(Finding(ERROR, "restriction", f"{node.op_type} takes axes as an input (opset 18); TensorRT "
                                   f"{version} parses opset <= {max_opset}, where axes is an attribute", label))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq_node(g, node, label, version, base_dir, out)
        for a in node.attribute:  # If / Loop / Scan bodies
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                _check_nodes(_Graph(sub, g), model, version, base_dir, out, function_domains)


def _check_restrictions(g: _Graph, node: onnx.NodeProto, label: str, version: str, out: list[Finding]) -> None:
    v = _vkey(version)
    op = node.op_type

    def need_const(idx: int, what: str) -> None:
        if len(node.input) > idx and node.input[idx] and not g.is_constant(node.input[idx]):
            out.append(Finding(ERROR, "restriction", f"{op}: {what} must be a constant for TensorRT {version}", label))

    if op in _REDUCE_OPS:
        need_const(1, "axes")
    elif op == "Slice" and v < (10, 3):
        need_const(3, "axes")
    elif op in ("Squeeze", "Unsqueeze"):
        need_const(1, "axes")
    elif op == "LayerNormalization" and any(o for o in node.output[1:]):
        out.append(Finding(ERROR, "restriction", "LayerNormalization: only the first output (Y) is supported", label))
    elif op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("nearest", "linear", "cubic"):
            out.append(Finding(ERROR, "restriction", f"Resize mode {mode!r} is not supported (nearest, linear, "
                                                     "cubic)", label))
        if _attr(node, "antialias", 0):
            out.append(Finding(ERROR, "restriction", "Resize with antialias is not supported", label))
    elif op == "ScatterND":
        red = _attr(node, "reduction", b"none")
        if (red.decode() if isinstance(red, bytes) else red) != "none":
            out.append(Finding(ERROR, "restriction", "ScatterND reduction other than 'none' is not supported", label))


def _check_qdq_node(g: _Graph, node: onnx.NodeProto, label: str, version: str, base_dir: Path,
                    out: list[Finding]) -> None:
    v = _vkey(version)
    # zero point must be 0 (TensorRT quantization is symmetric)
    if len(node.input) > 2 and node.input[2]:
        zp = g.initializer(node.input[2])
        if zp is None:
            out.append(Finding(ERROR, "qdq-zero-point", f"{node.op_type}: zero point is computed at run time; "
                                                        "TensorRT needs a constant zero point of 0", label))
        else:
            qtype = zp.data_type
            if qtype not in _INT8_TYPES | _TRT10_QTYPES:
                out.append(Finding(ERROR, "qdq-type", f"{node.op_type}: quantized type "
                                   f"{TensorProto.DataType.Name(qtype)} is not supported by TensorRT", label))
            elif qtype in _TRT10_QTYPES and v < (10, 0):
                out.append(Finding(ERROR, "qdq-needs-trt10", f"{node.op_type}: {TensorProto.DataType.Name(qtype)} "
                                   f"quantization needs TensorRT 10 (target {version})", label))
            if qtype == TensorProto.UINT8:
                out.append(Finding(ERROR, "qdq-zero-point", f"{node.op_type}: uint8 (asymmetric) quantization; "
                                   "TensorRT needs symmetric int8 with zero point 0 - re-quantize symmetric", label))
            elif any(float(x) != 0 for x in _tensor_values(zp, base_dir).reshape(-1)):
                out.append(Finding(ERROR, "qdq-zero-point", f"{node.op_type}: zero point is not 0; TensorRT only "
                                   "supports symmetric quantization", label))
    elif node.op_type == "DequantizeLinear":
        x = g.initializer(node.input[0])
        if x is not None and x.data_type in _TRT10_QTYPES and v < (10, 0):
            out.append(Finding(ERROR, "qdq-needs-trt10", f"DequantizeLinear of {TensorProto.DataType.Name(x.data_type)} "
                               f"weights needs TensorRT 10 (target {version})", label))
    if _attr(node, "block_size", 0) and v < (10, 0) and not any(
            f.code == "qdq-needs-trt10" and f.node == label for f in out):
        out.append(Finding(ERROR, "qdq-needs-trt10", f"{node.op_type}: block quantization (block_size) needs "
                                                     f"TensorRT 10 (target {version})", label))

    # placement: Q -> DQ pairs, nothing dangling. NVIDIA's parser and builder accept each of these (a Q
    # whose int8 output is used as is, an unused Q or DQ, a DQ of an int8 graph input): warnings, as they
    # almost always mean the quantizer placed nodes wrongly, not that the build fails
    outs = [o for o in node.output if o]
    consumers = [c for o in outs for c in g.consumers.get(o, [])]
    if node.op_type == "QuantizeLinear":
        if not consumers and not any(o in g.outputs for o in outs):
            out.append(Finding(WARNING, "qdq-dangling", "QuantizeLinear output is never used", label))
        bad = [c.op_type for c in consumers if c.op_type != "DequantizeLinear"]
        if bad or any(o in g.outputs for o in outs):
            out.append(Finding(WARNING, "qdq-dangling", "QuantizeLinear should feed only DequantizeLinear nodes "
                               f"(feeds {', '.join(sorted(set(bad))) or 'a graph output'})", label))
    else:
        src = node.input[0]
        src_const = g.is_constant(src)
        prod = g.producer.get(src)
        if not src_const and (prod is None or prod.op_type != "QuantizeLinear"):
            out.append(Finding(WARNING, "qdq-dangling", "DequantizeLinear input comes from neither a "
                               "QuantizeLinear nor a quantized constant weight", label))
        if not consumers and not any(o in g.outputs for o in outs):
            out.append(Finding(WARNING, "qdq-dangling", "DequantizeLinear output is never used", label))
        if src_const:
            _check_weight_dq(g, node, label, consumers, out)


def _weight_axis(consumer: onnx.NodeProto, input_index: int) -> int | None:
    if consumer.op_type in ("Conv",):
        return 0 if input_index == 1 else None
    if consumer.op_type == "ConvTranspose":
        return 1 if input_index == 1 else None
    if consumer.op_type == "MatMul":
        return 1 if input_index == 1 else None
    if consumer.op_type == "Gemm":
        if input_index == 1:
            return 0 if _attr(consumer, "transB", 0) else 1
    return None


def _check_weight_dq(g: _Graph, node: onnx.NodeProto, label: str, consumers: list[onnx.NodeProto],
                     out: list[Finding]) -> None:
    """A DequantizeLinear of a constant: if it feeds a Conv/MatMul/Gemm weight, it must be per-channel."""
    weight = g.initializer(node.input[0])
    scale = g.initializer(node.input[1]) if len(node.input) > 1 else None
    for c in consumers:
        if c.op_type not in _WEIGHT_OPS:
            continue
        idx = list(c.input).index(node.output[0])
        want = _weight_axis(c, idx)
        if want is None:
            continue
        if _attr(node, "block_size", 0):
            continue  # block (INT4) quantization: one scale per block along the input channels
        scale_rank = len(scale.dims) if scale is not None else 0
        scale_len = int(scale.dims[0]) if scale is not None and scale_rank == 1 else 1
        if scale_rank == 0 or scale_len == 1:
            # TensorRT's parser and builder accept a per-tensor weight scale (one scale for the whole
            # matrix); it costs accuracy, it does not fail the build
            out.append(Finding(WARNING, "qdq-per-tensor-weight", f"{c.op_type} weight {node.input[0]!r} is quantized "
                               "per tensor (one scale): TensorRT builds it, but per output channel is more accurate",
                               label))
            continue
        axis = _attr(node, "axis", 1)
        rank = len(weight.dims)
        axis = axis + rank if axis < 0 else axis
        if axis != want or (rank > want and int(weight.dims[want]) != scale_len):
            out.append(Finding(WARNING, "qdq-weight-axis", f"{c.op_type} weight {node.input[0]!r} is quantized on "
                               f"axis {axis} with {scale_len} scales; the output-channel axis is {want}", label))


# --------------------------------------------------------------------------------------------
# Inputs vs manifest and profiles


def _onnx_input_dims(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    dims: dict[str, list[int | str | None]] = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = vi.type.tensor_type.shape
        dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]
    return dims


def _check_inputs(model: onnx.ModelProto, graph_entry: GraphSpec | None,
                  profiles: list[dict[str, Any]] | None, version: str, out: list[Finding]) -> None:
    onnx_dims = _onnx_input_dims(model)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    if graph_entry is not None:
        declared = {i.name: i for i in graph_entry.inputs}
        for name in sorted(set(declared) - set(onnx_dims)):
            out.append(Finding(ERROR, "manifest-inputs", f"manifest declares input {name!r}, the graph has none"))
        for name in sorted(set(onnx_dims) - set(declared)):
            out.append(Finding(ERROR, "manifest-inputs", f"graph input {name!r} is not declared in the manifest"))
        for name, decl in declared.items():
            got = onnx_dims.get(name)
            if got is None:
                continue
            want = decl.shape
            if len(want) != len(got):
                out.append(Finding(ERROR, "dynamic-axis", f"{name}: rank {len(got)} in the graph, {len(want)} in the manifest"))
                continue
            for ax, (w, g_) in enumerate(zip(want, got)):
                if isinstance(w, str) and isinstance(g_, int) and g_ > 0:
                    out.append(Finding(ERROR, "dynamic-axis", f"{name} axis {ax}: the manifest declares dynamic "
                                       f"{w!r}, the graph fixes it to {g_}; re-export with dynamic axes"))
                elif isinstance(w, int) and isinstance(g_, int) and g_ > 0 and w != g_:
                    out.append(Finding(ERROR, "dynamic-axis", f"{name} axis {ax}: {g_} in the graph, {w} in the manifest"))
    for prof in profiles or []:
        for name, (mn, opt, mx) in prof["shapes"].items():
            got = onnx_dims.get(name)
            if got is None:
                out.append(Finding(ERROR, "profile", f"profile {prof['name']!r} sets input {name!r} the graph does not have"))
                continue
            if len(got) != len(mn):
                out.append(Finding(ERROR, "profile", f"profile {prof['name']!r}: {name} has rank {len(got)}, profile {len(mn)}"))
                continue
            for ax, g_ in enumerate(got):
                if isinstance(g_, int) and g_ > 0 and not (mn[ax] == opt[ax] == mx[ax] == g_):
                    out.append(Finding(ERROR, "profile", f"profile {prof['name']!r}: {name} axis {ax} is fixed to {g_} in "
                                       f"the graph but the profile asks {mn[ax]}..{mx[ax]}"))
    int64 = sorted(n for n in onnx_dims if elem.get(n) == TensorProto.INT64)
    if int64 and _vkey(version) < (9, 0):
        out.append(Finding(INFO, "int64", f"inputs {', '.join(int64)} are int64: TensorRT {version} casts INT64 to "
                                          "INT32, so the runtime binds int32 buffers for them"))


# --------------------------------------------------------------------------------------------
# Layers that must stay fp32 in a weakly typed fp16 build


@dataclass(frozen=True)
class Fp32Layer:
    """One node whose result must be computed in fp32: ``kind`` is "rope" (rotary angles and their
    cos/sin: position x frequency reaches tens of thousands, where fp16 has a spacing of 8 to 32),
    "rmsnorm" (the mean of squares, which overflows fp16 for activations above ~256) or "layernorm"."""

    kind: str
    node: str     # the ONNX node name (TensorRT names the node's layer after it)
    tensor: str   # its output (TensorRT keeps ONNX tensor names on the layer outputs)


_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    try:  # the graph's structure only (weights are not loaded), so this is cheap even for full-size graphs
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:
        pass
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for n in graph.node:  # a Cast's output type is its "to" attribute, known without inference
        if n.op_type == "Cast" and n.output:
            types.setdefault(n.output[0], _attr(n, "to", 0))
    return types


def fp32_layers(model: onnx.ModelProto) -> list[Fp32Layer]:
    """The nodes of ``model`` that compute rotary position angles or normalization statistics.

    Found by pattern, as the exporter writes them: RMSNorm as ``x / sqrt(mean(x^2) + eps)`` (or with
    Reciprocal/Mul), with the cast that feeds it when the graph is fp16; ``LayerNormalization`` nodes; and
    every float node from the position ids up to the ``Cos``/``Sin`` of the rotary embedding. A weakly
    typed fp16 TensorRT build may run these in fp16; ``flashvl build`` pins them to fp32."""
    g = _Graph(model.graph)
    types = _elem_types(model)
    seen: set[str] = set()
    out: list[Fp32Layer] = []

    def add(kind: str, node: onnx.NodeProto) -> None:
        label = _node_label(node)
        if node.output and label not in seen:
            seen.add(label)
            out.append(Fp32Layer(kind, node.name or label, node.output[0]))

    def is_float(node: onnx.NodeProto) -> bool:
        return bool(node.output) and all(types.get(o) == TensorProto.FLOAT for o in node.output if o)

    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            add("layernorm", node)
        elif node.op_type == "ReduceMean":
            sq = g.producer.get(node.input[0])
            if sq is None or sq.op_type not in ("Pow", "Mul"):
                continue
            base = sq.input[0]
            if sq.op_type == "Mul" and sq.input[1] != base:
                continue
            chain, cur, closed = [sq, node], node, False
            while True:
                nxt = g.consumers.get(cur.output[0], [])
                if len(nxt) != 1:
                    break
                cur = nxt[0]
                chain.append(cur)
                if cur.op_type in ("Div", "Mul") and base in cur.input:
                    closed = True
                    break
                if cur.op_type not in ("Add", "Sqrt", "Reciprocal"):
                    break
            if not closed:
                continue
            up = g.producer.get(base)
            if up is not None and up.op_type == "Cast" and _attr(up, "to", 0) == TensorProto.FLOAT:
                chain.insert(0, up)
            for n in chain:
                add("rmsnorm", n)
    rope: set[str] = set()
    todo = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    while todo:
        node = todo.pop()
        if node.op_type == "Constant" or not is_float(node) or _node_label(node) in rope:
            continue
        rope.add(_node_label(node))
        todo += [g.producer[i] for i in node.input if i and i in g.producer]
    for node in model.graph.node:  # graph order
        if _node_label(node) in rope:
            add("rope", node)
    return out


def fp32_layers_of(onnx_path: str | Path) -> list[Fp32Layer]:
    """:func:`fp32_layers` of an ONNX file (its weights are not read)."""
    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise LintError(f"ONNX file {str(path)!r} does not exist") from None
    except Exception as e:
        raise LintError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    return fp32_layers(model)


# --------------------------------------------------------------------------------------------
# Entry points


def lint(onnx_path: str | Path, trt: str = "10", graph_entry: GraphSpec | None = None,
         profiles: list[dict[str, Any]] | None = None) -> list[Finding]:
    """Findings for one ONNX graph against TensorRT ``trt`` ("10" = 10.3, "8.6", or a full version).

    ``graph_entry``: the manifest's ``graphs.<name>`` (declared inputs); ``profiles``: the engine builder's
    profiles for that graph (``engines.graph_profiles``), each ``{"name", "shapes": {input: (min, opt, max)}}``.
    """
    version = resolve_trt_version(trt)
    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise LintError(f"ONNX file {str(path)!r} does not exist") from None
    except Exception as e:  # protobuf decode errors have no common public base class
        raise LintError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    out: list[Finding] = []
    _check_opset(model, version, out)
    function_domains = {f.domain for f in model.functions}
    _check_nodes(_Graph(model.graph), model, version, path.parent, out, function_domains)
    for f in model.functions:
        fg = onnx.helper.make_graph(list(f.node), f.name, [], [])
        _check_nodes(_Graph(fg), model, version, path.parent, out, function_domains)
    _check_inputs(model, graph_entry, profiles, version, out)
    return out


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


def lint_bundle(bundle, trt: str = "10", profiles: dict[str, list[dict[str, Any]]] | None = None
                ) -> dict[str, list[Finding]]:
    """Lint every graph of a loaded :class:`~flashvl_edge.runtime.bundle.Bundle`: ``{graph name: findings}``."""
    result = {}
    for name, entry in bundle.manifest.graphs.items():
        result[name] = lint(bundle.graph_path(name), trt, entry, (profiles or {}).get(name))
    return result
