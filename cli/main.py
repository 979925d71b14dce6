"""The ``flashvl`` command: one dispatcher, each subcommand's module imported lazily.

Lazy imports are the point: ``flashvl chat`` on a Jetson must never import torch, which only the
export side needs. Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flashvl_edge import __version__

# subcommand -> (module, one-line help). The module is imported only when that subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("flashvl_edge.export.cli_export", "export a checkpoint or preset to a bundle (ONNX graphs + manifest)"),
    "verify": ("flashvl_edge.export.cli_verify", "check a bundle: integrity, and parity against PyTorch or between backends"),
    "chat": ("flashvl_edge.runtime.cli_chat", "chat with a bundle about an image"),
    "calibrate": ("flashvl_edge.calibration.cli", "quantize a bundle (INT8 vision, INT8/INT4 LLM) with an accuracy report"),
    "build": ("flashvl_edge.export.engines", "build TensorRT engines for a bundle (Polygraphy)"),
    "bench": ("flashvl_edge.runtime.bench", "benchmark a bundle: vision latency, TTFT, decode tokens/s, memory"),
    "doctor": ("flashvl_edge.runtime.doctor", "report what this machine can run and what to install"),
    "serve": ("flashvl_edge.runtime.cli_serve", "serve a bundle over an OpenAI-compatible HTTP API (chat completions)"),
}

# subcommand -> the pyproject.toml extra that gives it everything beyond the runtime's dependencies
# (None: the runtime is enough). A missing optional package is reported as this extra when the extra
# carries it, else as the extra that does (runtime/errors.py EXTRA_MODULES): one line, exit code 2.
# verify needs 'export' for --against only; bench runs without its extra (no plot, a drawn image).
SUBCOMMAND_EXTRAS: dict[str, str | None] = {
    "export": "export",
    "verify": "export",
    "chat": None,
    "calibrate": "calibration",
    "build": "tensorrt",
    "bench": "bench",
    "doctor": None,
    "serve": "serve",
}


def _peek_subcommand(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="flashvl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"flashvl-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _peek_subcommand(argv)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        if name == chosen:  # only the chosen subcommand's module is imported
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err:  # a module-level import of a missing extra
                from flashvl_edge.runtime.errors import report_missing_module

                return report_missing_module(err, name, SUBCOMMAND_EXTRAS.get(name), debug="--debug" in argv)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from flashvl_edge.runtime.errors import run_cli

    return run_cli(args._module.run, args, extra=SUBCOMMAND_EXTRAS.get(args.command))


if __name__ == "__main__":
    sys.exit(main())
