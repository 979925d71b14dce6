"""``flashvl calibrate BUNDLE --out BUNDLE_Q``: INT8 vision / INT8 or INT4 LLM, with an accuracy report.

Order of work: check everything the user can get wrong (bundle, output, prompts file, images folder,
sample counts) -> capture the calibration inputs through the runtime (or load them from the cache)
-> quantize each graph into a staging directory -> measure the quantized graphs on the held-out
samples -> write the report and the manifest last, then rename the staging directory into place.
Any failure leaves ``--out`` as it was.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flashvl_edge.runtime.bundle import check_output_dir, empty_past
from flashvl_edge.runtime.errors import CalibrationError

from . import data, report
from .quantize import INT4_BLOCK_SIZE, METHODS


def add_arguments(p) -> None:
    p.add_argument("bundle", help="the FP32 bundle to quantize (from 'flashvl export')")
    p.add_argument("--out", required=True, help="directory for the quantized bundle")
    p.add_argument("--images", help="folder of calibration images (default: the built-in offline set)")
    p.add_argument("--prompts", help="text file, one prompt per line (default: the built-in prompts)")
    p.add_argument("--vision", choices=("int8", "none"), default="int8", help="vision graph scheme (default int8)")
    p.add_argument("--llm", choices=("int8", "int4", "none"), default="int4",
                   help="LLM scheme: int8 = W8A8, int4 = weight-only block 128 (default int4)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"calibration samples (default: up to {data.DEFAULT_SAMPLES}; more than available is an error)")
    p.add_argument("--holdout", type=int, default=data.DEFAULT_HOLDOUT,
                   help=f"samples held out for the accuracy report (default {data.DEFAULT_HOLDOUT})")
    p.add_argument("--method", choices=METHODS, default="entropy",
                   help="INT8 activation range: entropy (KL, default), max (symmetric absmax), "
                        "minmax (asymmetric; ONNX Runtime only, TensorRT needs symmetric); "
                        "int4 is round-to-nearest and needs no calibration")
    p.add_argument("--report-tokens", type=int, default=data.DEFAULT_REPORT_TOKENS,
                   help="teacher-forced positions per held-out sample for the LLM report (default 16)")
    p.add_argument("--cache-dir", help="where captured inputs are cached (default ~/.cache/flashvl-edge/calibration)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_args(args) -> None:
    if args.vision == "none" and args.llm == "none":
        raise CalibrationError("--vision none and --llm none leave nothing to quantize; pick int8 or int4")
    if args.report_tokens < 1:
        raise CalibrationError(f"--report-tokens must be at least 1, got {args.report_tokens}")
    src, out = Path(args.bundle).resolve(), Path(args.out).resolve()
    if src == out or src in out.parents:
        raise CalibrationError("--out must be a new directory outside the input bundle")
    check_output_dir(out, args.force, error=CalibrationError)


def _prefill_feed(embeds: np.ndarray, manifest: dict) -> dict[str, np.ndarray]:
    """The LLM graph's full input for one prefill with an empty KV cache."""
    seq = embeds.shape[1]
    return {"inputs_embeds": embeds, "attention_mask": np.ones((1, seq), np.int64),
            "position_ids": np.arange(seq, dtype=np.int64)[None], **empty_past(manifest)}


def _link_or_copy(src: Path, dst: Path, link: bool = True) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)  # same filesystem: no second copy of the embedding table
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def initializer_bytes(model_path: Path) -> int:
    """Bytes of a graph's weights as stored (int4 packed two per byte), external data included."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            total += numpy_helper.to_array(t).nbytes
    return total


def calibrate(args) -> dict[str, Any]:
    """Do the work of ``flashvl calibrate``; returns the report."""
    import onnxruntime

    from flashvl_edge.runtime.backends.ort import OrtDecoder, OrtRunner
    from flashvl_edge.runtime.bundle import Bundle, finalize_manifest, staging_dir, tool_versions

    from .quantize import quantize_llm_int4, quantize_llm_int8, quantize_vision_int8

    _check_args(args)
    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    q = m.get("quantization")
    if q:
        raise CalibrationError(
            f"bundle {args.bundle!r} is already quantized (vision {q.get('vision')}, llm {q.get('llm')}); "
            "calibrate the FP32 bundle it was made from")
    if m.get("dtype", "fp32") != "fp32":
        raise CalibrationError(f"bundle {args.bundle!r} is {m.get('dtype')}; calibrate an fp32 export "
                               "('flashvl export ... --dtype fp32'), TensorRT picks fp16 for the float parts itself")
    prompts = data.load_prompts(args.prompts, m["image"].get("placeholder") or "<image>")
    samples = data.select_samples(args.images, prompts, args.samples, args.holdout,
                                  m["preprocess"].get("max_image_pixels"))
    t0 = time.perf_counter()
    # INT4 is round-to-nearest: only INT8 (vision or LLM) needs calibration inputs; the report always
    # needs the held-out references.
    needs_calibration = args.vision == "int8" or args.llm == "int8"
    cap = data.capture(args.bundle, samples, args.report_tokens, args.cache_dir, progress=not args.quiet,
                       held_out_only=not needs_calibration)
    t_capture = time.perf_counter() - t0
    print(f"calibration inputs: {len(cap.calib_pixels)} samples + {len(cap.held_pixels)} held out "
          f"({'loaded from cache' if cap.cache_hit else f'captured in {t_capture:.1f} s'}"
          f"{', ' + str(cap.cache_path) if cap.cache_path else ''})", file=sys.stderr)

    graphs = m["graphs"]
    # Files rewritten in the new bundle. Never link these: writing the new graph through a hard link
    # would overwrite the FP bundle's file.
    replaced = set()
    for name, scheme in (("vision", args.vision), ("llm", args.llm)):
        if scheme != "none":
            replaced.add(graphs[name]["file"])
            if graphs[name].get("external_data"):
                replaced.add(graphs[name]["external_data"])

    with staging_dir(args.out, force=args.force) as tmp:
        # ONNX files are always copied: onnx refuses to load external data from a file with more than
        # one hard link ("potential hardlink attack"), which would break both bundles for onnx tools.
        graph_files = {g.get(k) for g in graphs.values() for k in ("file", "external_data")} - {None}
        for name in m["files"]:
            if name in replaced or name.startswith("engines/") or name == report.REPORT_FILE:
                continue  # engines were built from the FP graphs: they do not belong to this bundle
            _link_or_copy(bundle.path(name), tmp / name, link=name not in graph_files)

        new = copy.deepcopy(m)
        new.pop("files", None)
        new.pop("engines", None)
        rep: dict[str, Any] = {"bundle": str(Path(args.bundle).resolve()), "sizes": {},
                               "calibration_data": {"source": samples.source, "samples": len(cap.calib_pixels),
                                                    "held_out": len(cap.held_pixels), "cache_hit": cap.cache_hit,
                                                    "cache_file": str(cap.cache_path) if cap.cache_path else None},
                               "calibration_samples": cap.names.get("calibration", []),
                               "held_out": cap.names.get("held_out", [])}
        schemes: dict[str, Any] = {}

        if args.vision != "none":
            g = graphs["vision"]
            dst = tmp / g["file"]
            print(f"quantizing the vision graph: int8, {args.method} calibration", file=sys.stderr)
            res = quantize_vision_int8(bundle.path(g["file"]), dst, [{"pixel_values": p} for p in cap.calib_pixels],
                                       args.method, g.get("external_data"))
            with OrtRunner(dst, "vision-int8", device="cpu") as runner:
                metrics = report.vision_metrics(lambda px: runner.infer({"pixel_values": px})["image_embeds"],
                                                cap.held_pixels, cap.held_image_embeds)
            rep["vision"] = {"scheme": "int8", "method": res.method, **metrics, **res.details,
                             "quantized_nodes": len(res.quantized_nodes), "float_nodes": len(res.kept_float_nodes)}
            schemes["vision"] = res
            new["graphs"]["vision"]["weight_bytes"] = initializer_bytes(dst)

        if args.llm != "none":
            g = graphs["llm"]
            dst = tmp / g["file"]
            print(f"quantizing the LLM graph: {args.llm}" + (f", {args.method} calibration" if args.llm == "int8"
                                                              else f" weight-only, block {INT4_BLOCK_SIZE}, RTN"),
                  file=sys.stderr)
            if args.llm == "int4":
                res = quantize_llm_int4(bundle.path(g["file"]), dst, INT4_BLOCK_SIZE, g.get("external_data"))
            else:
                feeds = [_prefill_feed(e, m) for e in cap.calib_embeds]
                res = quantize_llm_int8(bundle.path(g["file"]), dst, feeds, args.method, g.get("external_data"))
            table = np.load(bundle.path(m["embeddings"]["file"]), mmap_mode="r")

            with OrtDecoder(dst, "llm-" + args.llm, device="cpu") as decoder:
                def embed(ids: list[int]) -> np.ndarray:
                    return np.asarray(table[np.asarray(ids)], decoder.embeds_dtype)[None]
                metrics = report.llm_metrics(decoder, embed, cap.held_embeds, cap.held_tokens, cap.held_logits)
            rep["llm"] = {"scheme": args.llm, "method": res.method, **metrics, **res.details,
                          "quantized_nodes": len(res.quantized_nodes), "float_nodes": len(res.kept_float_nodes)}
            schemes["llm"] = res
            new["graphs"]["llm"]["weight_bytes"] = initializer_bytes(dst)
            if "opset" in res.details:
                new["graphs"]["llm"]["opset"] = res.details["opset"]

        for name in ("vision", "llm"):
            g = graphs[name]
            if name in schemes:
                rep["sizes"][name] = {"before": report.graph_bytes(bundle.path(g["file"]), g.get("external_data")),
                                      "after": report.graph_bytes(tmp / g["file"], g.get("external_data"))}

        new["quantization"] = {
            "vision": "int8" if "vision" in schemes else None,
            "llm": args.llm if "llm" in schemes else None,
            "method": {k: v.method for k, v in schemes.items()},
            "tool": "onnxruntime.quantization",
            "tool_version": onnxruntime.__version__,
            "report": report.REPORT_FILE,
            "calibrated_from": {"path": str(Path(args.bundle).resolve()), "fingerprint": data.bundle_fingerprint(bundle)},
        }
        new["tools"] = {**m.get("tools", {}), **tool_versions("onnxruntime", "onnx")}
        rep["quantization"] = new["quantization"]
        (tmp / report.REPORT_FILE).write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
        finalize_manifest(tmp, new)
    return rep


def run(args) -> int:
    rep = calibrate(args)
    print(report.format_table(rep))
    print(f"quantized bundle written to {args.out}")
    return 0
