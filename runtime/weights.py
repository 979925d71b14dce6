"""Bytes of an ONNX graph's weights (its initializers) as stored, for the reports of doctor, bench and calibrate.

The one place that counts them, so every report agrees: a tensor in external data counts its recorded
``length``, one stored inline its raw bytes, and one in the typed fields (``float_data``...) its element
count times its type's size, with INT4/UINT4 packed two per byte. Nothing is read from external data files.

``onnx`` is optional for the runtime, so it is imported only inside the functions: whoever calls them has
an ONNX model open already, or gets a ModuleNotFoundError to handle (``flashvl`` turns it into one line
naming the extra to install).
"""

from __future__ import annotations

import math
import os


def initializer_nbytes(tensor) -> int:
    """Stored bytes of one ONNX ``TensorProto`` (see the module docstring)."""
    from onnx import TensorProto, helper

    if tensor.data_location == TensorProto.EXTERNAL:
        length = next((e.value for e in tensor.external_data if e.key == "length"), None)
        if length is not None:
            return int(length)
    if tensor.raw_data:
        return len(tensor.raw_data)
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    numel = math.prod(int(d) for d in tensor.dims)
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (numel + 1) // 2
    return numel * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def graph_initializer_bytes(path: str | os.PathLike) -> int:
    """Stored bytes of every initializer of the graph file at ``path`` (external data included, not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(initializer_nbytes(t) for t in model.graph.initializer)
