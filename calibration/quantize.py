"""Quantize the bundle's ONNX graphs into explicit QDQ graphs that ONNX Runtime and TensorRT both run.

Tool choice: ONNX Runtime's own quantization tools (``onnxruntime.quantization``) for INT8 and the
round-to-nearest INT4 rewrite below; NVIDIA ModelOpt's ONNX PTQ for AWQ INT4 only (the ``awq`` extra: its
base package plus the modules its ONNX path imports, not its ``[onnx]`` extra, which pins onnxruntime-gpu
and an older onnx over the ones this project uses; without cupy it runs its numpy path). ONNX Runtime's
tools are already a runtime dependency, work offline, and write the same explicit-quantization form
TensorRT documents:

* **Vision INT8** (:func:`quantize_vision_int8`): ``quantize_static`` in QDQ format, int8 weights
  per output channel (``DequantizeLinear`` with ``axis`` set) and int8 activations per tensor, both
  symmetric (zero point 0, which TensorRT requires), ranges from entropy (KL) or max calibration on
  the captured tiles. Quantized: every MatMul/Gemm/Conv with a constant weight, and the attention
  score product q.k^T (both inputs are ordinary activations; its float output goes to the softmax).
  The attention x V product stays float: its input is the softmax output, mostly values near 1/1024
  that one per-tensor int8 scale (1/127) would round to zero. Q/DQ sit on inputs only, the
  placement TensorRT documents. Measured on the full-size SigLIP tower (2 cores): 5.3 s fp32, 2.3 s
  weights only, 2.1 s with q.k^T; embedding cosine vs fp32 0.9994 either way.
* **LLM INT8, W8A8** (:func:`quantize_llm_int8`): the same recipe on the decoder's weight MatMuls,
  calibrated on prefill inputs (``inputs_embeds`` with image embeddings spliced in, empty KV cache).
* **LLM INT4 weight-only** (:func:`quantize_llm_int4`): every weight MatMul reads an int4
  initializer through ``DequantizeLinear(axis=0, block_size=128)`` (opset 21): symmetric
  **round-to-nearest (RTN)** with one fp32 scale per block of 128 along K, ``scale = absmax / 7``.
  TensorRT parses that as weight-only INT4, and ONNX Runtime's CPU provider fuses each DQ+MatMul
  pair into its ``MatMulNBits`` kernel when the session is created. The rewrite is done
  here rather than with ``MatMulNBitsQuantizer(quant_format=QDQ)`` because that tool (ORT 1.31)
  writes *signed* scales (``scale = signed absmax / -8``, so about half are negative) and zero
  scales for all-zero blocks, and TensorRT's ONNX parser requires every Q/DQ scale to be positive.
* **LLM INT4 with AWQ** (:func:`quantize_llm_int4_awq`): the same int4 form, the scales and a per-input-
  channel activation scale chosen by ModelOpt's AWQ on the calibration prefills (ONNX Runtime has no
  AWQ; its calibration-aware int4, GPTQ, needs Intel's neural-compressor).

Every function keeps the graph's inputs and outputs exactly as they were (names, types, shapes), so
the runtime and the engine builder need no special case for a quantized bundle.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from flashvl_edge.runtime.errors import CalibrationError

# INT8 activation-range methods offered on the command line. "entropy" is ONNX Runtime's KL-divergence
# calibrator (TensorRT's classic choice). "max" and "minmax" both take the observed range (ORT's
# MinMax calibrator); "max" symmetrizes it to [-absmax, absmax], the form TensorRT accepts, "minmax"
# keeps [min, max] with a zero point, which only ONNX Runtime runs.
METHODS = ("entropy", "max", "minmax")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
INT4_BLOCK_SIZE = 128


@dataclass
class QuantResult:
    """What a quantization step did, for the manifest and the report."""

    scheme: str                      # "int8" | "int4"
    method: str                      # "entropy" | "max" | "minmax" | "rtn"
    quantized_nodes: list[str] = field(default_factory=list)
    kept_float_nodes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_ort_tools():
    """ORT's quantizers print progress to stdout and advice to the root logger; keep the CLI's output
    to our own lines (errors still propagate as exceptions)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader over a list of input feeds (one ``session.run`` each)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._it: Iterator | None = None
        self.start, self.end = 0, len(self.feeds)

    def get_next(self):
        if self._it is None:
            self._it = iter(self.feeds[self.start:self.end])
        return next(self._it, None)

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def rewind(self) -> None:
        self._it = None

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self._it = start_index, end_index, None


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace every ``Transpose`` of a 2-D initializer by a pre-transposed initializer.

    Some exporters keep ``nn.Linear`` as ``MatMul(x, Transpose(W))``; the quantizers only recognize a
    weight when the MatMul reads an initializer directly. Returns how many were folded.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    folded = 0
    keep = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            w = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None) or [1, 0]
            new = numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), node.output[0])
            graph.initializer.append(new)
            inits[new.name] = new
            if consumers.get(node.input[0], 0) == 1:
                graph.initializer.remove(inits.pop(node.input[0]))
            folded += 1
            continue
        keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def _consumers(graph: onnx.GraphProto) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    return consumers


def unshare_activation_qparams(model: onnx.ModelProto) -> int:
    """Give every activation ``QuantizeLinear`` (and the ``DequantizeLinear`` it feeds) its own copy of
    the scale and zero-point initializers. Returns how many Q nodes got copies.

    Why: ``quantize_static(DedicatedQDQPair=True)`` writes one Q/DQ pair per consumer (e.g. a
    LayerNorm output read by the q, k and v projections), but the pairs share the scale/zero-point
    initializers, so ONNX Runtime's common-subexpression elimination merges them back into one DQ with
    three consumers, and its QDQ fusion then leaves all three MatMuls in float with their int8 weights
    dequantized on every run (81 of 164 MatMuls of the SigLIP tower; 3.6 s instead of 2.3 s per tile
    here). Distinct initializer names make the pairs distinct expressions. The copies are scalars.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            for name in node.input[1:3]:
                users[name] = users.get(name, 0) + 1
    consumers = _consumers(graph)
    changed = 0
    for index, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        if not all(users.get(n, 0) > 1 and n in inits for n in node.input[1:3]):
            continue
        renamed = {}
        for name in node.input[1:3]:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}__q{index}"
            graph.initializer.append(copy)
            renamed[name] = copy.name
        for dq in consumers.get(node.output[0], []):
            if dq.op_type == "DequantizeLinear":
                for k in (1, 2):
                    if k < len(dq.input) and dq.input[k] in renamed:
                        dq.input[k] = renamed[dq.input[k]]
        for k in (1, 2):
            node.input[k] = renamed[node.input[k]]
        changed += 1
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    stale = [init for init in graph.initializer if init.name not in used]
    for init in stale:
        graph.initializer.remove(init)
    return changed


def weight_nodes(model: onnx.ModelProto, op_types: Iterable[str] = WEIGHT_OPS) -> tuple[list[str], list[str]]:
    """Names of the (weight-carrying, activation-only) nodes of the given op types.

    A node carries a weight when its second input is an initializer. Nodes without a name get one,
    since the quantizers address nodes by name.
    """
    graph = model.graph
    consts = {init.name for init in graph.initializer}
    op_types = set(op_types)
    with_weight, without = [], []
    for i, node in enumerate(graph.node):
        if node.op_type not in op_types:
            continue
        if not node.name:
            node.name = f"{node.op_type}_{i}"
        if len(node.input) > 1 and node.input[1] in consts:
            with_weight.append(node.name)
        else:
            without.append(node.name)
    return with_weight, without


def _io_signature(model: onnx.ModelProto) -> list[tuple]:
    def sig(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
            out.append((v.name, t.elem_type, dims))
        return out
    return [tuple(sig(model.graph.input)), tuple(sig(model.graph.output))]


def _save(model: onnx.ModelProto, dst: Path, external_data: str | None) -> None:
    """Save ``model`` to ``dst``; with ``external_data`` all tensors go to that sibling file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for p in (dst, dst.parent / external_data if external_data else None):
        if p is not None and p.exists():
            p.unlink()  # never write through a hard link into another bundle's file
    if external_data:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


def _load(src: Path) -> onnx.ModelProto:
    return onnx.load(str(src), load_external_data=True)


def _check_io_unchanged(signature_before: list[tuple], dst: Path) -> None:
    after = onnx.load(str(dst), load_external_data=False)
    if signature_before != _io_signature(after):
        raise RuntimeError(f"quantization changed the graph inputs/outputs of {dst.name}; this is a bug")


def attention_score_nodes(model: onnx.ModelProto, candidates: Iterable[str]) -> list[str]:
    """The activation x activation MatMuls among ``candidates`` whose output goes into a Softmax
    (directly, or through one scale/mask Mul/Div/Add): the q.k^T products of attention."""
    graph = model.graph
    consumers = _consumers(graph)

    def feeds_softmax(tensor: str, hops: int) -> bool:
        for c in consumers.get(tensor, []):
            if c.op_type == "Softmax":
                return True
            if hops and c.op_type in ("Mul", "Div", "Add") and feeds_softmax(c.output[0], hops - 1):
                return True
        return False

    wanted = set(candidates)
    return [n.name for n in graph.node if n.name in wanted and n.op_type == "MatMul" and feeds_softmax(n.output[0], 1)]


def _static_int8(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]], method: str,
                 external_data: str | None, op_types: Sequence[str],
                 attention_scores: bool = False) -> QuantResult:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if not feeds:
        raise CalibrationError("no calibration inputs were captured; check --images and --prompts")
    model = _load(src)
    dst.unlink(missing_ok=True)  # never write through a hard link into another bundle's file
    folded = fold_weight_transposes(model)
    quantize, keep_float = weight_nodes(model, op_types)
    if not quantize:
        raise CalibrationError(f"{src.name} has no MatMul/Gemm/Conv with constant weights to quantize")
    scores = attention_score_nodes(model, keep_float) if attention_scores else []
    quantize, keep_float = quantize + scores, [n for n in keep_float if n not in scores]
    symmetric = method != "minmax"
    with tempfile.TemporaryDirectory(prefix="flashvl-quant-") as tmp:
        # quantize_static wants a path for models with external data (> 2 GB): write the prepared one.
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save_model(model, str(prepared), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="prepared.onnx.data", size_threshold=1024)
        io_before = _io_signature(model)
        del model  # quantize_static loads its own copies; do not hold a third one of a multi-GB graph
        with _quiet_ort_tools():
            quantize_static(
                str(prepared), str(dst), _FeedReader(feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types),
                nodes_to_quantize=quantize,
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.MinMax,
                use_external_data_format=bool(external_data),
                extra_options={
                    "ActivationSymmetric": symmetric,
                    "WeightSymmetric": True,
                    # biases stay float: an int32 DequantizeLinear is not something TensorRT parses
                    "QuantizeBias": False,
                    # One Q/DQ pair per consumer: ONNX Runtime fuses DQ -> MatMul into an integer
                    # kernel only when the DQ feeds that MatMul alone (a LayerNorm output shared by
                    # the q/k/v projections otherwise leaves all three in float, weights dequantized
                    # on every run). TensorRT treats duplicated pairs the same as one.
                    "DedicatedQDQPair": True,
                    # Q/DQ on the inputs of weighted ops only, the placement TensorRT documents: the
                    # output stays float into the bias Add (ONNX Runtime: MatMulIntegerToFloat), one
                    # rounding fewer than an int8 output that is dequantized right away.
                    "OpTypesToExcludeOutputQuantization": list(op_types),
                    # Feed the calibrator one sample at a time: ranges/histograms are merged after each,
                    # so only one sample's intermediate tensors are ever held in memory. (Not
                    # CalibMaxIntermediateOutputs: in ORT 1.31 it drops MinMax data without merging it.)
                    "CalibStridedMinMax": 1,
                },
            )
    # Reload to unshare the activation scales, and (external data) because quantize_static names the
    # external file after the model: rewrite it with the bundle's name.
    q = _load(dst)
    unshared = unshare_activation_qparams(q)
    for p in dst.parent.glob(dst.name + ".data"):
        p.unlink()
    _save(q, dst, external_data)
    del q
    _check_io_unchanged(io_before, dst)
    return QuantResult(
        scheme="int8", method=method, quantized_nodes=quantize, kept_float_nodes=keep_float,
        details={"activations": "int8 per-tensor " + ("symmetric" if symmetric else "asymmetric (ORT only)"),
                 "weights": "int8 per-channel symmetric", "folded_weight_transposes": folded,
                 "unshared_activation_qparams": unshared, "attention_score_matmuls": len(scores),
                 "tensorrt_compatible": symmetric})


def quantize_vision_int8(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                         method: str = "entropy", external_data: str | None = None) -> QuantResult:
    """INT8 QDQ vision graph (weights per channel, activations per tensor, attention q.k^T inputs
    per tensor), calibrated on ``feeds``."""
    return _static_int8(src, dst, feeds, method, external_data, WEIGHT_OPS, attention_scores=True)


def quantize_llm_int8(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                      method: str = "max", external_data: str | None = None) -> QuantResult:
    """W8A8 QDQ decoder graph, calibrated on prefill feeds (empty KV cache)."""
    return _static_int8(src, dst, feeds, method, external_data, ("MatMul", "Gemm"))


def rtn_int4(w: np.ndarray, block_size: int = INT4_BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest int4 of a MatMul weight ``w`` [K, N] in blocks of ``block_size`` along K.

    Returns (q int8 values in [-8, 7] of shape [K, N], scales float32 [ceil(K / block), N]) with
    ``w ~= q * scale`` (scale repeated over each block). ``scale = absmax / 7``, so the largest weight
    of a block maps to +-7 and nothing is clipped; every scale is > 0 (an all-zero block gets 1.0),
    because TensorRT's ONNX parser refuses non-positive Q/DQ scales.
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    padded = padded.reshape(blocks, block_size, n)
    amax = np.abs(padded).max(axis=1)
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(padded / scale[:, None, :]), -8, 7).astype(np.int8)
    return q.reshape(blocks * block_size, n)[:k], scale


def _int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer, packed two values per byte (first value in the low nibble) as raw data."""
    flat = q.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    u = flat.view(np.uint8) & 0x0F
    packed = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(q.shape), packed.tobytes(), raw=True)


def _require_int4_opset(model: onnx.ModelProto) -> None:
    """int4 tensors and blocked DequantizeLinear need opset 21 / IR version 10. The ops these graphs use
    mean the same at 18 and 21 (the parity test runs both); TensorRT 10 parses opset 21."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21
    model.ir_version = max(model.ir_version, 10)


def quantize_llm_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK_SIZE,
                      external_data: str | None = None) -> QuantResult:
    """INT4 weight-only decoder graph: ``DequantizeLinear`` (int4, blocked, RTN, symmetric) -> MatMul."""
    model = _load(src)
    io_before = _io_signature(model)
    folded = fold_weight_transposes(model)
    quantize, keep_float = weight_nodes(model, ("MatMul",))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    wanted = set(quantize)
    dq_of: dict[str, str] = {}          # weight initializer -> its DequantizeLinear output
    nodes = []
    for node in graph.node:
        w_name = node.input[1] if node.name in wanted else None
        if w_name is not None and w_name in inits and numpy_helper.to_array(inits[w_name]).ndim == 2:
            if w_name not in dq_of:
                w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
                q, scale = rtn_int4(w, block_size)
                graph.initializer.append(_int4_tensor(f"{w_name}_int4", q))
                graph.initializer.append(numpy_helper.from_array(scale, f"{w_name}_int4_scale"))
                dq_of[w_name] = f"{w_name}_int4_dq"
                nodes.append(onnx.helper.make_node(
                    "DequantizeLinear", [f"{w_name}_int4", f"{w_name}_int4_scale"], [dq_of[w_name]],
                    name=f"{node.name}_weight_dq", axis=0, block_size=block_size))
            node.input[1] = dq_of[w_name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {i for n in graph.node for i in n.input}
    for w_name in dq_of:  # the float weights go, unless something else still reads them
        if w_name not in still_read:
            graph.initializer.remove(inits[w_name])
    _require_int4_opset(model)
    _save(model, dst, external_data)
    _check_io_unchanged(io_before, dst)
    return QuantResult(
        scheme="int4", method="rtn", quantized_nodes=list(quantize), kept_float_nodes=keep_float,
        details={"weights": f"int4 symmetric (scale = block absmax / 7), block {block_size} along K "
                            "(DequantizeLinear axis 0)",
                 "activations": "float (weight-only)", "folded_weight_transposes": folded,
                 "quantized_weights": len(dq_of), "opset": 21, "tensorrt_compatible": True})


# ModelOpt's INT4 calibration behind ``--int4-method awq``. "awq_lite" is AWQ proper: per input channel of
# each weight MatMul it searches the activation-aware scale s = mean|x|^alpha / mean|w|^(1-alpha) that
# minimises the MatMul's output error on the calibration activations, folds 1/s into the activation (a Mul
# before the MatMul) and quantizes W * s; "awq_full" adds AWQ's clip search (per block, a smaller absmax).
AWQ_ALGORITHM = "awq_lite"


def quantize_llm_int4_awq(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                          block_size: int = INT4_BLOCK_SIZE, external_data: str | None = None,
                          algorithm: str = AWQ_ALGORITHM, progress: bool = True) -> QuantResult:
    """INT4 weight-only decoder graph calibrated with AWQ by NVIDIA ModelOpt's ONNX PTQ on the CPU.

    The result has the same form as :func:`quantize_llm_int4` (symmetric int4 blocks of ``block_size``
    along K through ``DequantizeLinear(axis=0)``, fp32 scales, opset 21), so TensorRT parses it as
    weight-only INT4 and ONNX Runtime fuses each DQ+MatMul into MatMulNBits; AWQ adds one activation
    ``Mul`` (the per-channel pre-quantization scale) in front of each quantized MatMul. ``feeds`` are
    prefill inputs (empty KV cache), all of one length; ModelOpt runs them through ONNX Runtime's CPU
    provider.

    Memory: ModelOpt's ``quantize()`` entry point holds the graph with its weights three times (its
    own copy, the graph extended with the MatMul inputs as outputs, the serialization copy of that)
    beside the ONNX Runtime session: ~25 GB for the 1.5B decoder, more than a 24 GB machine has. Its
    INT4 stage is called here instead, on a graph whose weights stay in their external file: the
    graph protos are then a few MB, and only ONNX Runtime (the calibration session) and the weight
    currently searched are in memory. The preparation ``quantize()`` would do (opset 21, node names)
    is done here, as for round-to-nearest.
    """
    from flashvl_edge.runtime.doctor import meminfo
    from flashvl_edge.runtime.errors import MissingExtraError
    from flashvl_edge.runtime.weights import initializer_nbytes

    try:
        import modelopt
        from modelopt.onnx.quantization import int4 as modelopt_int4
    except ModuleNotFoundError as err:
        raise MissingExtraError(err.name or "modelopt", "flashvl calibrate --int4-method awq", "awq") from None
    if not feeds:
        raise CalibrationError("no calibration inputs were captured; check --images and --prompts")
    model = _load(src)
    io_before = _io_signature(model)
    folded = fold_weight_transposes(model)
    quantize, keep_float = weight_nodes(model, ("MatMul",))  # also names every MatMul, as ModelOpt wants
    muls_before = sum(1 for n in model.graph.node if n.op_type == "Mul")
    # ModelOpt either reruns the graph once per weight and sample (for that MatMul's input only) or,
    # on its "high system RAM" path, once per sample, keeping every quantized MatMul's input for all
    # samples. At full size the first is ~200 prefills per sample; take the second whenever those
    # activations fit beside the calibration session's weights.
    inits = {init.name: init for init in model.graph.initializer}
    wanted = set(quantize)
    k_total = sum(inits[n.input[1]].dims[0] for n in model.graph.node if n.name in wanted)
    tokens = sum(int(np.prod(f["inputs_embeds"].shape[:2])) for f in feeds)
    activation_bytes = 4 * tokens * k_total
    weight_bytes = sum(initializer_nbytes(t) for t in model.graph.initializer)
    one_pass = activation_bytes + weight_bytes < 0.8 * meminfo().get("MemAvailable", 0)
    _require_int4_opset(model)
    with tempfile.TemporaryDirectory(prefix="flashvl-awq-") as tmp:
        prepared = Path(tmp) / "llm.onnx"
        onnx.save_model(model, str(prepared), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="llm.onnx.data", size_threshold=1024)
        del model, inits
        lean = onnx.load(str(prepared), load_external_data=False)  # weights stay in llm.onnx.data
        # ModelOpt writes its extended graph to a tempfile.mkstemp() file and reads the weights relative
        # to that file's folder: make that folder the one holding llm.onnx.data, so the extended graph
        # refers to the same weight file instead of a copy.
        hide = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        saved_tempdir = tempfile.tempdir
        tempfile.tempdir = tmp
        try:
            with hide, _quiet_ort_tools():
                q = modelopt_int4.quantize(
                    lean, calibration_method=algorithm, calibration_data_reader=_FeedReader(feeds),
                    calibration_eps=["cpu"], use_external_data_format=True, block_size=block_size,
                    use_zero_point=False,   # symmetric, as TensorRT's weight-only INT4 takes it
                    nodes_to_exclude=[],    # every weight MatMul, lm_head included, as round-to-nearest
                    log_level="ERROR", enable_fast_path_using_high_sysram=one_pass,
                    # Fusing the scale into the preceding RMSNorm weight calls cupy's .get() on a numpy
                    # array in 0.47 without cupy: keep it as its own Mul (one elementwise op per MatMul).
                    awqlite_fuse_nodes=False)
        finally:
            tempfile.tempdir = saved_tempdir
        onnx.external_data_helper.load_external_data_for_model(q, tmp)  # the float tensors still external
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    inits = {init.name: init for init in q.graph.initializer}
    for dq in dqs:  # TensorRT's parser refuses non-positive Q/DQ scales; ModelOpt clips them above 0
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if not (scale > 0).all():
            raise CalibrationError(f"ModelOpt wrote a non-positive INT4 scale ({dq.input[1]}); use --int4-method rtn")
    pre_scales = sum(1 for n in q.graph.node if n.op_type == "Mul") - muls_before
    _save(q, dst, external_data)
    del q
    _check_io_unchanged(io_before, dst)
    return QuantResult(
        scheme="int4", method=algorithm, quantized_nodes=list(quantize), kept_float_nodes=keep_float,
        details={"weights": f"int4 symmetric, block {block_size} along K (DequantizeLinear axis 0), "
                            f"ModelOpt {algorithm} calibrated on {len(feeds)} prefill samples",
                 "activations": "float (weight-only)" + (f"; {pre_scales} AWQ pre-quantization scale Mul nodes"
                                                          if pre_scales else ""),
                 "folded_weight_transposes": folded, "quantized_weights": len(dqs), "opset": 21,
                 "calibration_tokens": tokens, "activation_capture": "one pass per sample" if one_pass
                 else "one pass per weight and sample",
                 "tool": "nvidia-modelopt", "tool_version": modelopt.__version__, "tensorrt_compatible": True})
