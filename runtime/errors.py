"""The one family of user-facing errors, and the CLI wrapper that turns them into one line + exit 2.

Anything a user can fix (a bad path, a corrupt image, a bundle from another version, a wrong
sampling parameter) raises a subclass of :class:`FlashVLError` with a one-line message that says
what is wrong and what to do. Everything else is a bug and shows a traceback.
"""

from __future__ import annotations

import errno
import sys
import traceback
from typing import Callable


class FlashVLError(Exception):
    """Base of all user-facing errors. ``str(err)`` is a single line for the console."""

    exit_code = 2


class BundleError(FlashVLError):
    """A bundle directory is missing, incomplete, tampered with, or from an unknown schema."""


class IntegrityError(BundleError):
    """A bundle file's size or sha256 does not match the manifest."""


class CheckpointError(FlashVLError):
    """A checkpoint directory or preset cannot be loaded (missing files, bad keys, unknown type)."""


class ExportError(FlashVLError):
    """Export cannot proceed (existing output, no disk space, unsupported model)."""


class ImageError(FlashVLError):
    """An image cannot be read or is outside the limits (corrupt, truncated, too large)."""


class PromptError(FlashVLError):
    """A prompt is empty, too long for the context, or the sampling parameters are invalid."""


class BackendError(FlashVLError):
    """A backend is unavailable on this machine (no TensorRT, no GPU) or refuses an engine."""


class EngineMismatchError(BackendError):
    """An engine was built for another GPU or TensorRT version."""


class CalibrationError(FlashVLError):
    """Calibration data is missing or unusable, or the bundle is already quantized."""


# The optional packages each extra of pyproject.toml installs, by import name, lightest extra first
# (the first extra that carries a module is the one named when no command prefers another). A missing
# one of these is a missing extra, reported in one line; a missing base dependency (numpy, pillow,
# tokenizers, onnxruntime, jinja2, tqdm) is a broken installation and keeps its traceback.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "calibration": ("onnx", "skimage"),
    "tensorrt": ("polygraphy", "onnx"),
    # flashvl build --library tensorrt-rtx: NVIDIA TensorRT for RTX's wheels (bindings + libraries)
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx_libs", "polygraphy", "onnx"),
    "bench": ("matplotlib", "psutil", "skimage", "onnx"),
    "export": ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors", "skimage"),
    "compare": ("onnxruntime_genai",),
    # json_schema / json_object decoding (runtime/structured.py)
    "structured": ("llguidance",),
    # flashvl serve (starlette and pydantic come with fastapi; openai is the client the tests and docs use)
    "serve": ("fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client", "openai", "llguidance"),
    # flashvl serve --ray (runtime/cluster.py)
    "cluster": ("ray",),
    # flashvl calibrate --int4-method awq: NVIDIA ModelOpt and what its ONNX quantizer imports. Last, so
    # that a module another extra also carries (torch, onnx, polygraphy) is named with that extra.
    "awq": ("modelopt", "onnx_graphsurgeon", "ml_dtypes", "onnxconverter_common", "onnxslim", "lief",
            "cppimport", "torch", "onnxscript", "polygraphy", "onnx", "skimage"),
}
# TensorRT itself is in no extra: JetPack installs it on a Jetson, NVIDIA's index elsewhere.
TENSORRT_HINT = ("TensorRT comes with JetPack on a Jetson (sudo apt install nvidia-tensorrt); elsewhere "
                 "pip install tensorrt (NVIDIA's index, https://pypi.nvidia.com)")


def extra_for(module: str | None, prefer: str | None = None) -> str | None:
    """The extra that installs ``module`` (any submodule counts as its package): ``prefer`` when it
    carries the module, else the lightest extra that does; None for a module no extra installs."""
    top = (module or "").split(".")[0]
    if prefer and top in EXTRA_MODULES.get(prefer, ()):
        return prefer
    return next((extra for extra, mods in EXTRA_MODULES.items() if top in mods), None)


def missing_extra_line(module: str, extra: str | None, who: str = "flashvl") -> str:
    """``flashvl export: needs the 'export' extra: pip install 'flashvl-edge[export]' (missing module: torch)``."""
    if module.split(".")[0] == "tensorrt":
        return f"{who}: needs TensorRT (missing module: tensorrt): {TENSORRT_HINT}"
    return f"{who}: needs the {extra!r} extra: pip install 'flashvl-edge[{extra}]' (missing module: {module})"


class MissingExtraError(FlashVLError, ModuleNotFoundError):
    """An optional package is not installed. A FlashVLError (one line, exit 2) and also the
    ModuleNotFoundError a plain import would raise, so ``except ImportError`` fallbacks still apply."""

    def __init__(self, module: str, what: str, extra: str | None = None) -> None:
        self.extra = extra or extra_for(module)
        super().__init__(missing_extra_line(module, self.extra, what), name=module)

    def __str__(self) -> str:
        return str(self.msg)


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def report_missing_module(err: ModuleNotFoundError, command: str | None = None, extra: str | None = None,
                          debug: bool = False) -> int:
    """One line naming the extra to install for a missing optional package, exit code 2; a module
    that no extra installs (a base dependency, one of ours) is a bug and is re-raised."""
    module = err.name or ""
    # a MissingExtraError knows its extra even for a module no extra lists (a dependency of one that does)
    chosen = extra_for(module, extra) or getattr(err, "extra", None)
    if module.split(".")[0] != "tensorrt" and chosen is None:
        raise err
    if debug:
        traceback.print_exception(err)
    who = f"flashvl {command}" if command else "flashvl"
    print(missing_extra_line(module, chosen, who), file=sys.stderr)
    return 2


def run_cli(func: Callable[[object], int | None], args, extra: str | None = None) -> int:
    """Run a subcommand; user errors print one line to stderr and return their exit code.

    ``extra`` is the subcommand's extra (cli/main.py): a missing optional package it carries is
    reported as that extra, one it does not as the extra that installs it."""
    debug = getattr(args, "debug", False)
    try:
        rc = func(args)
        return 0 if rc is None else int(rc)
    except ModuleNotFoundError as err:  # before FlashVLError: MissingExtraError is both
        return report_missing_module(err, getattr(args, "command", None), extra, debug)
    except FlashVLError as err:
        if debug:
            traceback.print_exc()
        print(f"flashvl: error: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("flashvl: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("flashvl: error: out of memory; try a smaller input or --max-tiles", file=sys.stderr)
        return 2
    except OSError as err:
        # Disk full, permission denied, missing file: the user can act on these.
        if debug:
            traceback.print_exc()
        print(f"flashvl: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


_OS_HINTS = {
    errno.ENOSPC: "no space left on device; free some space or choose another --out",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another --out",
    errno.EFBIG: "file too large for this file system or the process's file size limit; raise the limit "
                 "(ulimit -f) or choose another --out",
    errno.EACCES: "permission denied; check the path's permissions or choose another path",
    errno.EROFS: "read-only file system; choose a writable path",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: what failed, where, and what to do."""
    what = _OS_HINTS.get(err.errno, err.strerror or str(err))
    where = f" (writing {err.filename})" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and err.filename \
        else (f": {err.filename}" if err.filename else "")
    return one_line(what + where)
