#!/usr/bin/env python
"""A bundle whose decoder computes the same function as the input's, with activation outliers.

Trained LLMs have a few input channels of large magnitude in front of their weight MatMuls; random
weights do not, and that is what AWQ exists for. For each weight MatMul fed by a norm (a ``Mul`` by a
weight vector), a few channels of that vector are multiplied by ``--factor`` and the matching weight
rows divided by it: the float model is unchanged (up to rounding), the MatMul inputs get outlier
channels, and the weight rows they meet are small. Round-to-nearest loses those rows (each block's
scale is set by the other rows); AWQ's activation-aware scales keep them. So AWQ against RTN on this
bundle shows whether the activation-aware part works; on the plain random bundle a small difference
either way is all one can expect.

Usage (see docs/calibration.md):
  python benchmarks/awq_outliers.py BUNDLE OUT [--channels 4] [--factor 30]
  flashvl calibrate OUT --out OUT_Q --vision none --llm int4 --int4-method awq
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from flashvl_edge.runtime.bundle import Bundle, finalize_manifest


def with_activation_outliers(src: Path, dst: Path, channels: int = 4, factor: float = 30.0, seed: int = 0) -> int:
    """Write the outlier variant of bundle ``src`` to ``dst``; returns how many MatMuls were changed."""
    shutil.copytree(src, dst)
    b = Bundle.load(dst)
    g = b.manifest.graph("llm")
    path = b.graph_path("llm")
    model = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rng = np.random.default_rng(seed)
    changed = 0
    for i, mm in enumerate([n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]):
        norm = producers.get(mm.input[0])
        if norm is None or norm.op_type != "Mul":
            continue
        vec = next((k for k, name in enumerate(norm.input) if name in inits and len(inits[name].dims) == 1), None)
        if vec is None:
            continue
        gamma = numpy_helper.to_array(inits[norm.input[vec]]).copy()
        w = numpy_helper.to_array(inits[mm.input[1]]).copy()
        picked = rng.choice(gamma.size, channels, replace=False)
        gamma[picked] *= factor
        w[picked] /= factor
        # identical norm weights may be one initializer shared by several layers: give this Mul its own
        name = f"{norm.input[vec]}__outliers{i}"
        model.graph.initializer.append(numpy_helper.from_array(gamma, name))
        norm.input[vec] = name
        inits[mm.input[1]].CopyFrom(numpy_helper.from_array(w, mm.input[1]))
        changed += 1
    if not changed:
        raise SystemExit(f"{src}: no weight MatMul fed by a norm Mul; nothing to change")
    used = {i for n in model.graph.node for i in n.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:  # the shared originals
        model.graph.initializer.remove(init)
    for f in g.files:
        (dst / f).unlink()  # copies, but never write through a link into the source bundle
    if g.external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=g.external_data, size_threshold=1024)
    else:
        onnx.save(model, str(path))
    finalize_manifest(dst, b.manifest)
    return changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("out")
    p.add_argument("--channels", type=int, default=4, help="outlier channels per norm (default 4)")
    p.add_argument("--factor", type=float, default=30.0, help="their magnitude factor (default 30)")
    a = p.parse_args()
    n = with_activation_outliers(Path(a.bundle), Path(a.out), a.channels, a.factor)
    print(f"{a.out}: {n} MatMuls see {a.channels} outlier channels x{a.factor:g}")


if __name__ == "__main__":
    main()
