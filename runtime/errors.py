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
