"""``flashvl verify BUNDLE``: integrity (--integrity), parity against PyTorch (--against), or backends."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    parser.add_argument("--against", metavar="MODEL",
                        help="preset name or checkpoint directory the bundle was exported from: "
                             "run both graphs in ONNX Runtime and the PyTorch model on the same inputs")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed for a preset --against (default 0)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own Python code")
    parser.add_argument("--integrity", action="store_true", help="re-hash every bundle file against the manifest")
    parser.add_argument("--backends", metavar="LIST", help="compare backends on the bundle, e.g. ort,trt")
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens compared with --against (default 32)")


def run(args: argparse.Namespace) -> int:
    from flashvl_edge.runtime.bundle import Bundle
    from flashvl_edge.runtime.errors import FlashVLError

    if not (args.against or args.integrity or args.backends):
        raise FlashVLError("nothing to verify: pass --against MODEL, --integrity and/or --backends ort,trt")
    if args.steps < 1:
        raise FlashVLError(f"--steps must be at least 1, got {args.steps}")
    ok = True
    if args.integrity:
        bundle = Bundle.load(args.bundle, verify="full")  # raises IntegrityError on any mismatch
        print(f"PASS  integrity {len(bundle.manifest.files)} files match their sha256")
    else:
        Bundle.load(args.bundle)  # a clear error for a missing or unfinished bundle before loading torch
    if args.against:
        from flashvl_edge.export.families import load_model
        from flashvl_edge.export.verify import verify_against

        loaded = load_model(args.against, seed=args.seed, trust_remote_code=args.trust_remote_code)
        report = verify_against(args.bundle, loaded, greedy_steps=args.steps, model_name=repr(str(args.against)))
        for line in report.lines():
            print(line)
        ok = ok and report.ok
    if args.backends:
        from flashvl_edge.export import verify_backends  # imports TensorRT tooling: only when asked for

        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        rc = verify_backends.run(args.bundle, backends)
        ok = ok and not rc
    print("verify: OK" if ok else "verify: FAILED")
    return 0 if ok else 1
