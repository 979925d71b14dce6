"""The one family of user-facing errors, and the CLI wrapper that turns them into one line + exit 2.

Anything a user can fix (a bad path, a corrupt image, a bundle from another version, a wrong
sampling parameter) raises a subclass of :class:`FlashVLError` with a one-line message that says
what is wrong and what to do. Everything else is a bug and shows a traceback.
"""

from __future__ import annotations

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


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def run_cli(func: Callable[[object], int | None], args) -> int:
    """Run a subcommand; user errors print one line to stderr and return their exit code."""
    debug = getattr(args, "debug", False)
    try:
        rc = func(args)
        return 0 if rc is None else int(rc)
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
        what = f"{err.strerror or err}" + (f": {err.filename}" if getattr(err, "filename", None) else "")
        print(f"flashvl: error: {one_line(what)}", file=sys.stderr)
        return 2
