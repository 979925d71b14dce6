"""``flashvl calibrate BUNDLE --out BUNDLE_Q``: INT8 vision / INT8 or INT4 LLM, with an accuracy report.

Order of work: check everything the user can get wrong (bundle, output, prompts file, images folder,
sample counts) -> capture the calibration inputs through the runtime (or load them from the cache)
-> quantize each graph into a staging directory -> measure the quantized graphs on the held-out
samples -> write the report and the manifest last, then rename the staging directory into place.
Any failure leaves ``--out`` as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashvl_edge.runtime.bundle import check_output_dir
from flashvl_edge.runtime.generate import Generator
from flashvl_edge.runtime.errors import CalibrationError
from flashvl_edge.runtime.weights import graph_initializer_bytes

from . import data, report
from .quantize import AWQ_ALGORITHM, INT4_BLOCK_SIZE, METHODS

INT4_METHODS = ("rtn", "awq")


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
    p.add_argument("--int4-method", choices=INT4_METHODS, default="rtn",
                   help="INT4 weights: rtn = round-to-nearest, no calibration (default); awq = activation-aware "
                        "(NVIDIA ModelOpt's ONNX AWQ on the calibration samples, the 'awq' extra); the report "
                        "then shows RTN beside it")
    p.add_argument("--method", choices=METHODS, default="entropy",
                   help="INT8 activation range: entropy (KL, default), max (symmetric absmax), "
                        "minmax (asymmetric; ONNX Runtime only, TensorRT needs symmetric); "
                        "INT4 takes --int4-method instead")
    p.add_argument("--report-tokens", type=int, default=data.DEFAULT_REPORT_TOKENS,
                   help="teacher-forced positions per held-out sample for the LLM report (default 16)")
    p.add_argument("--cache-dir", help="where captured inputs are cached (default ~/.cache/flashvl-edge/calibration)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@dataclass(frozen=True)
class CalibrationOptions:
    """What ``flashvl calibrate`` was asked (the library entry point takes this, not argparse's namespace)."""

    vision: str = "int8"  # "int8" | "none"
    llm: str = "int4"  # "int8" | "int4" | "none"
    method: str = "entropy"
    int4_method: str = "rtn"  # "rtn" | "awq"
    images: str | None = None
    prompts: str | None = None
    samples: int | None = None
    holdout: int = data.DEFAULT_HOLDOUT
    report_tokens: int = data.DEFAULT_REPORT_TOKENS
    cache_dir: str | None = None
    force: bool = False
    progress: bool = True


def _check_options(bundle_path: str | os.PathLike, out: str | os.PathLike, opts: CalibrationOptions) -> None:
    if opts.vision == "none" and opts.llm == "none":
        raise CalibrationError("--vision none and --llm none leave nothing to quantize; pick int8 or int4")
    if opts.int4_method not in INT4_METHODS:
        raise CalibrationError(f"unknown --int4-method {opts.int4_method!r}; choose one of {', '.join(INT4_METHODS)}")
    if opts.int4_method != "rtn" and opts.llm != "int4":
        raise CalibrationError(f"--int4-method {opts.int4_method} applies to --llm int4 (got --llm {opts.llm})")
    if opts.report_tokens < 1:
        raise CalibrationError(f"--report-tokens must be at least 1, got {opts.report_tokens}")
    src, dst = Path(bundle_path).resolve(), Path(out).resolve()
    if src == dst or src in dst.parents:
        raise CalibrationError("--out must be a new directory outside the input bundle")
    check_output_dir(dst, opts.force, error=CalibrationError)


def _link_or_copy(src: Path, dst: Path, link: bool = True) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)  # same filesystem: no second copy of the embedding table
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def calibrate(bundle_path: str | os.PathLike, out: str | os.PathLike,
              opts: CalibrationOptions = CalibrationOptions()) -> dict[str, Any]:
    """Quantize the FP32 bundle at ``bundle_path`` into a new bundle ``out``; returns the report."""
    import onnxruntime

    from flashvl_edge.runtime.backends.ort import OrtDecoder, OrtRunner
    from flashvl_edge.runtime.bundle import Bundle, finalize_manifest, staging_dir, tool_versions
    from flashvl_edge.runtime.contract import QuantizationSpec

    from .quantize import quantize_llm_int4, quantize_llm_int4_awq, quantize_llm_int8, quantize_vision_int8

    _check_options(bundle_path, out, opts)
    bundle = Bundle.load(bundle_path)
    m = bundle.manifest
    if m.quantization is not None:
        raise CalibrationError(
            f"bundle {str(bundle_path)!r} is already quantized (vision {m.quantization.vision}, llm "
            f"{m.quantization.llm}); calibrate the FP32 bundle it was made from")
    if m.dtype != "fp32":
        raise CalibrationError(f"bundle {str(bundle_path)!r} is {m.dtype}; calibrate an fp32 export "
                               "('flashvl export ... --dtype fp32'), TensorRT picks fp16 for the float parts itself")
    prompts = data.load_prompts(opts.prompts, m.image.placeholder)
    samples = data.select_samples(opts.images, prompts, opts.samples, opts.holdout, m.preprocess.max_image_pixels)
    t0 = time.perf_counter()
    # INT4 round-to-nearest needs no calibration inputs, INT8 (vision or LLM) and AWQ do; the report
    # always needs the held-out references.
    awq = opts.int4_method == "awq"  # only with --llm int4 (_check_options)
    needs_calibration = opts.vision == "int8" or opts.llm == "int8" or awq
    cap = data.capture(bundle_path, samples, opts.report_tokens, opts.cache_dir, progress=opts.progress,
                       held_out_only=not needs_calibration)
    t_capture = time.perf_counter() - t0
    print(f"calibration inputs: {len(cap.calib_pixels)} samples + {len(cap.held_pixels)} held out "
          f"({'loaded from cache' if cap.cache_hit else f'captured in {t_capture:.1f} s'}"
          f"{', ' + str(cap.cache_path) if cap.cache_path else ''})", file=sys.stderr)

    schemes_asked = {"vision": opts.vision, "llm": opts.llm}
    # Files rewritten in the new bundle. Never link these: writing the new graph through a hard link
    # would overwrite the FP bundle's file.
    replaced = {f for name, scheme in schemes_asked.items() if scheme != "none" for f in m.graph(name).files}

    with staging_dir(out, force=opts.force) as tmp:
        # ONNX files are always copied: onnx refuses to load external data from a file with more than
        # one hard link ("potential hardlink attack"), which would break both bundles for onnx tools.
        graph_files = {f for g in m.graphs.values() for f in g.files}
        for name in m.files:
            if name in replaced or name.startswith("engines/") or name == report.REPORT_FILE:
                continue  # engines were built from the FP graphs: they do not belong to this bundle
            _link_or_copy(bundle.path(name), tmp / name, link=name not in graph_files)

        new = m.replace(files={}, engines={})
        rep: dict[str, Any] = {"bundle": str(Path(bundle_path).resolve()), "sizes": {},
                               "calibration_data": {"source": samples.source, "samples": len(cap.calib_pixels),
                                                    "held_out": len(cap.held_pixels), "cache_hit": cap.cache_hit,
                                                    "cache_file": str(cap.cache_path) if cap.cache_path else None},
                               "calibration_samples": cap.names.get("calibration", []),
                               "held_out": cap.names.get("held_out", [])}
        schemes: dict[str, Any] = {}

        if opts.vision != "none":
            g = m.graph("vision")
            dst = tmp / g.file
            print(f"quantizing the vision graph: int8, {opts.method} calibration", file=sys.stderr)
            res = quantize_vision_int8(bundle.path(g.file), dst, [{"pixel_values": p} for p in cap.calib_pixels],
                                       opts.method, g.external_data)
            with OrtRunner(dst, "vision-int8", device="cpu") as runner:
                metrics = report.vision_metrics(lambda px: runner.infer({"pixel_values": px})["image_embeds"],
                                                cap.held_pixels, cap.held_image_embeds)
            rep["vision"] = {"scheme": "int8", "method": res.method, **metrics, **res.details,
                             "quantized_nodes": len(res.quantized_nodes), "float_nodes": len(res.kept_float_nodes)}
            schemes["vision"] = res
            new = new.with_graph("vision", weight_bytes=graph_initializer_bytes(dst))

        if opts.llm != "none":
            g = m.graph("llm")
            dst = tmp / g.file
            t_llm = time.perf_counter()
            how = {"int8": f", {opts.method} calibration",
                   "int4": f" weight-only, block {INT4_BLOCK_SIZE}, "
                           + (f"AWQ ({AWQ_ALGORITHM}, NVIDIA ModelOpt) on {len(cap.calib_embeds)} samples" if awq
                              else "RTN")}[opts.llm]
            print(f"quantizing the LLM graph: {opts.llm}{how}", file=sys.stderr)
            embeds = cap.calib_embeds if opts.llm == "int8" or awq else []
            if awq and embeds:
                # ModelOpt stacks each MatMul's input over the samples, so they must be equally long: cut every
                # prefill to the shortest one's length (the image tokens come first, a few text tokens go)
                shortest = min(e.shape[1] for e in embeds)
                embeds = [e[:, :shortest] for e in embeds]
            feeds = [m.llm_feed(e) for e in embeds]
            if awq:
                res = quantize_llm_int4_awq(bundle.path(g.file), dst, feeds, INT4_BLOCK_SIZE, g.external_data,
                                            progress=opts.progress)
            elif opts.llm == "int4":
                res = quantize_llm_int4(bundle.path(g.file), dst, INT4_BLOCK_SIZE, g.external_data)
            else:
                res = quantize_llm_int8(bundle.path(g.file), dst, feeds, opts.method, g.external_data)
            table = np.load(bundle.path(m.embeddings.file), mmap_mode="r")

            def measure(graph: Path, label: str) -> dict[str, Any]:
                with OrtDecoder(graph, label, device="cpu") as decoder:
                    return report.llm_metrics(Generator(decoder, table, m.image.image_token_id),
                                              cap.held_embeds, cap.held_tokens, cap.held_logits)

            metrics = measure(dst, "llm-" + opts.llm)
            if awq:
                # the round-to-nearest graph on the same held-out samples, for the report only
                with tempfile.TemporaryDirectory(prefix="flashvl-rtn-", dir=tmp.parent) as rtn_dir:
                    rtn = Path(rtn_dir) / g.file
                    quantize_llm_int4(bundle.path(g.file), rtn, INT4_BLOCK_SIZE, g.external_data)
                    rep["llm_compared"] = {"rtn": {"scheme": "int4", "method": "rtn", **measure(rtn, "llm-int4-rtn")}}
            rep["llm"] = {"scheme": opts.llm, "method": res.method, **metrics, **res.details,
                          "quantized_nodes": len(res.quantized_nodes), "float_nodes": len(res.kept_float_nodes)}
            if awq:
                rep["llm"]["quantize_and_report_s"] = round(time.perf_counter() - t_llm, 1)
            schemes["llm"] = res
            new = new.with_graph("llm", weight_bytes=graph_initializer_bytes(dst),
                                 opset=int(res.details.get("opset", g.opset)))

        for name in ("vision", "llm"):
            g = m.graph(name)
            if name in schemes:
                rep["sizes"][name] = {"before": report.graph_bytes(bundle.path(g.file), g.external_data),
                                      "after": report.graph_bytes(tmp / g.file, g.external_data)}

        modelopt_used = any(r.details.get("tool") == "nvidia-modelopt" for r in schemes.values())
        quantization = QuantizationSpec(
            vision="int8" if "vision" in schemes else None,
            llm=opts.llm if "llm" in schemes else None,
            method={k: v.method for k, v in schemes.items()},
            tool="onnxruntime.quantization" + (" + modelopt.onnx.quantization (llm)" if modelopt_used else ""),
            tool_version=onnxruntime.__version__ + (f" + {schemes['llm'].details['tool_version']}"
                                                    if modelopt_used else ""),
            report=report.REPORT_FILE,
            calibrated_from={"path": str(Path(bundle_path).resolve()), "fingerprint": data.bundle_fingerprint(bundle)},
        )
        tools = tool_versions("onnxruntime", "onnx", *(["nvidia-modelopt"] if modelopt_used else []))
        new = new.replace(quantization=quantization, tools={**m.tools, **tools})
        rep["quantization"] = quantization.to_json()
        (tmp / report.REPORT_FILE).write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
        finalize_manifest(tmp, new)
    return rep


def run(args) -> int:
    opts = CalibrationOptions(vision=args.vision, llm=args.llm, method=args.method, int4_method=args.int4_method,
                              images=args.images, prompts=args.prompts, samples=args.samples, holdout=args.holdout,
                              report_tokens=args.report_tokens, cache_dir=args.cache_dir, force=args.force,
                              progress=not args.quiet)
    rep = calibrate(args.bundle, args.out, opts)
    print(report.format_table(rep))
    print(f"quantized bundle written to {args.out}")
    return 0
