"""``flashvl export MODEL --out DIR``: a preset or checkpoint directory -> a bundle (see export/onnx.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="preset name (flashvl-2b-static, flashvl-2b-dynamic-iss, tiny-static, tiny-dynamic-iss) "
                             "or a checkpoint directory (canonical Flash-VL or InternVL layout)")
    parser.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="float type of the graphs (default fp32)")
    parser.add_argument("--max-tiles", type=int, default=None, metavar="N",
                        help="override the preprocessing's maximum number of image tiles")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed for presets (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint's own Python code (remote-code checkpoints only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or step timings")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flashvl_edge.runtime.bundle import MANIFEST, check_output_dir
    from flashvl_edge.runtime.errors import ExportError

    out = Path(args.out)
    # Refuse before the (possibly minutes-long) model load; export_bundle checks again when it writes.
    check_output_dir(out, args.force)
    if args.max_tiles is not None and args.max_tiles < 1:
        raise ExportError(f"--max-tiles must be at least 1, got {args.max_tiles}")

    from flashvl_edge.export.families import load_model
    from flashvl_edge.export.onnx import export_bundle

    loaded = load_model(args.model, seed=args.seed, trust_remote_code=args.trust_remote_code)
    path = export_bundle(loaded, out, dtype=args.dtype, max_tiles=args.max_tiles, force=args.force,
                         progress=not args.quiet)
    print(f"bundle written to {path} ({path / MANIFEST})")
    return 0
