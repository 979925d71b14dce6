"""Quantize the bundle's ONNX graphs into explicit QDQ graphs that ONNX Runtime and TensorRT both run.

Tool choice: ONNX Runtime's own quantization tools (``onnxruntime.quantization``), not NVIDIA ModelOpt.
ModelOpt's ONNX PTQ (``modelopt.onnx.quantization``) imports onnx-graphsurgeon, onnxconverter-common,
onnxslim and cupy, which only its ``[onnx]`` extra brings, and that extra also pins onnx 1.21 and
onnxruntime-gpu 1.24 over the onnx/onnxruntime this project uses (checked with ``pip install --dry-run``
on 2026-11-21). ONNX Runtime's tools are already a runtime dependency, work offline, and write the
same explicit-quantization form TensorRT documents:

* **Vision INT8** (:func:`quantize_vision_int8`): ``quantize_static`` in QDQ format, int8 weights
  per output channel (``DequantizeLinear`` with ``axis`` set) and int8 activations per tensor, both
  symmetric (zero point 0, which TensorRT requires), ranges from entropy (KL) or max calibration on
  the captured tiles. Only MatMul/Gemm/Conv with a constant weight are quantized: the attention
  products (activation x activation) stay in float, they are cheap and the softmax output is badly
  served by one per-tensor int8 scale.
* **LLM INT8, W8A8** (:func:`quantize_llm_int8`): the same recipe on the decoder's weight MatMuls,
  calibrated on prefill inputs (``inputs_embeds`` with image embeddings spliced in, empty KV cache).
* **LLM INT4 weight-only** (:func:`quantize_llm_int4`): ``MatMulNBitsQuantizer`` with
  ``quant_format=QDQ``: each weight becomes an int4 initializer with per-block fp32 scales (block 128
  along K, symmetric) feeding ``DequantizeLinear(axis=0, block_size=128)`` -> ``MatMul`` (opset 21).
  TensorRT parses that as weight-only INT4, and ONNX Runtime's CPU provider fuses the DQ+MatMul pair
  into its ``MatMulNBits`` kernel when the session is created. The scales are **round-to-nearest
  (RTN)**, not AWQ: ONNX Runtime has no AWQ, and its calibration-aware int4 (GPTQ) needs Intel's
  neural-compressor; RTN at block 128 is what ONNX Runtime GenAI's builder ships by default.

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

# Calibration methods offered on the command line -> (ONNX Runtime method, symmetric activations).
# "max" and "minmax" both take the observed range; "max" symmetrizes it to [-absmax, absmax] (the
# form TensorRT accepts), "minmax" keeps [min, max] with a zero point, which only ONNX Runtime runs.
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


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            names.update(node.output)
    return names


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace ``Transpose(constant weight)`` feeding a MatMul/Gemm by a pre-transposed initializer.

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
        if (node.op_type == "Transpose" and node.input[0] in inits
                and len(numpy_helper.to_array(inits[node.input[0]]).shape) == 2):
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


def weight_nodes(model: onnx.ModelProto, op_types: Iterable[str] = WEIGHT_OPS) -> tuple[list[str], list[str]]:
    """Names of the (weight-carrying, activation-only) nodes of the given op types.

    A node carries a weight when its second input is a constant (initializer or Constant node).
    Nodes without a name get one, since the quantizers address nodes by name.
    """
    graph = model.graph
    consts = _constant_names(graph)
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


def _static_int8(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]], method: str,
                 external_data: str | None, op_types: Sequence[str]) -> QuantResult:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if not feeds:
        raise CalibrationError("no calibration inputs were captured; check --images and --prompts")
    model = _load(src)
    folded = fold_weight_transposes(model)
    quantize, keep_float = weight_nodes(model, op_types)
    if not quantize:
        raise CalibrationError(f"{src.name} has no MatMul/Gemm/Conv with constant weights to quantize")
    symmetric = method != "minmax"
    with tempfile.TemporaryDirectory(prefix="flashvl-quant-") as tmp:
        # quantize_static wants a path for models with external data (> 2 GB): write the prepared one.
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save_model(model, str(prepared), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="prepared.onnx.data", size_threshold=1024)
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
                    # Feed the calibrator one sample at a time: ranges/histograms are merged after each,
                    # so only one sample's intermediate tensors are ever held in memory. (Not
                    # CalibMaxIntermediateOutputs: in ORT 1.31 it drops MinMax data without merging it.)
                    "CalibStridedMinMax": 1,
                },
            )
    if external_data:
        # quantize_static names the external file after the model; rewrite with the bundle's name.
        q = _load(dst)
        for p in dst.parent.glob(dst.name + ".data"):
            p.unlink()
        _save(q, dst, external_data)
    _check_io_unchanged(_io_signature(model), dst)
    return QuantResult(
        scheme="int8", method=method, quantized_nodes=quantize, kept_float_nodes=keep_float,
        details={"activations": "int8 per-tensor " + ("symmetric" if symmetric else "asymmetric (ORT only)"),
                 "weights": "int8 per-channel symmetric", "folded_weight_transposes": folded,
                 "tensorrt_compatible": symmetric})


def quantize_vision_int8(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                         method: str = "entropy", external_data: str | None = None) -> QuantResult:
    """INT8 QDQ vision graph (weights per channel, activations per tensor), calibrated on ``feeds``."""
    return _static_int8(src, dst, feeds, method, external_data, WEIGHT_OPS)


def quantize_llm_int8(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                      method: str = "max", external_data: str | None = None) -> QuantResult:
    """W8A8 QDQ decoder graph, calibrated on prefill feeds (empty KV cache)."""
    return _static_int8(src, dst, feeds, method, external_data, ("MatMul", "Gemm"))


def quantize_llm_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK_SIZE,
                      external_data: str | None = None) -> QuantResult:
    """INT4 weight-only decoder graph: blocked ``DequantizeLinear`` (int4, RTN, symmetric) -> MatMul."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    model = _load(src)
    folded = fold_weight_transposes(model)
    quantize, keep_float = weight_nodes(model, ("MatMul",))
    io_before = _io_signature(model)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=None,
        quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),), bits=4)
    # The quantizer logs one line per weight at INFO; keep the console readable.
    # (It also warns that it raises the opset to 21 for int4; that is expected, recorded in details.)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    with _quiet_ort_tools():
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    qmodel = quantizer.model.model
    _save(qmodel, dst, external_data)
    _check_io_unchanged(io_before, dst)
    return QuantResult(
        scheme="int4", method="rtn", quantized_nodes=quantize, kept_float_nodes=keep_float,
        details={"weights": f"int4 symmetric, block {block_size} along K (DequantizeLinear axis 0)",
                 "activations": "float (weight-only)", "folded_weight_transposes": folded,
                 "opset": max(o.version for o in qmodel.opset_import if o.domain in ("", "ai.onnx")),
                 "tensorrt_compatible": True})
