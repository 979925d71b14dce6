"""The bundle: an exported directory plus ``manifest.json``, the only contract between the stages.

Export writes it, calibration reads and rewrites it, the engine builder adds engines to it, and the
runtime runs it. Everything the runtime needs is in the manifest; nothing is re-derived from file
or model names. The manifest's typed form and its validation are :mod:`.contract`; this module
loads a bundle (path safety, file sizes and hashes) and writes one.

This module also holds the two write-side helpers every stage shares, so they exist once:
:func:`staging_dir` (write into a temporary sibling, rename at the end) and :func:`finalize_manifest`
(record every file with its size and sha256).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from .contract import FileEntry, GraphSpec, Manifest
from .errors import BundleError, ExportError, IntegrityError

MANIFEST = "manifest.json"
# Staging and trash directories start with this, so no tool mistakes them for a bundle.
STAGING_PREFIX = ".flashvl-tmp-"


# --------------------------------------------------------------------------------------------
# Reading


def safe_member(root: Path, name: str) -> Path:
    """Resolve a file name from a manifest inside ``root``; refuse anything that escapes it."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name:
        raise BundleError(f"manifest names an invalid file {name!r}; re-export the bundle")
    parts = Path(name).parts
    if any(p in ("..", "") for p in parts) or Path(name).is_absolute():
        raise BundleError(f"manifest file name {name!r} escapes the bundle directory; refusing to load it")
    path = root / name
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise BundleError(f"bundle file {name!r} is a link that points outside the bundle; refusing to load it")
    return path


# --------------------------------------------------------------------------------------------
# ONNX external data: every file a graph makes ONNX Runtime open must be a hashed bundle file

# The protobuf fields (onnx.proto) on the way to a TensorProto's external_data, in every place a
# tensor can sit: graph initializers, sparse initializers, node attributes (tensors and subgraphs,
# e.g. an If's branches) and model-local functions.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE, _FUNCTION_NODE = 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _field(buf, pos: int, end: int) -> tuple[int, int, int, int]:
    """The field at ``pos``: (field number, wire type, payload start, where the next field starts)."""
    key, pos = _varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if wire == 0:
        return number, wire, pos, _varint(buf, pos, end)[1]
    if wire in (1, 5):
        return number, wire, pos, pos + (8 if wire == 1 else 4)
    if wire == 2:
        n, pos = _varint(buf, pos, end)
        return number, wire, pos, pos + n
    if wire == 3:  # a (deprecated) group: skipped up to its end marker, as protobuf parsers do
        return number, wire, pos, _skip_group(buf, pos, end, number)
    if wire == 4:
        return number, wire, pos, pos
    raise ValueError(f"unexpected protobuf wire type {wire}")


def _skip_group(buf, pos: int, end: int, number: int) -> int:
    while pos < end:
        n, wire, _, pos = _field(buf, pos, end)
        if wire == 4:
            if n != number:
                raise ValueError("mismatched group end")
            return pos
    raise ValueError("unterminated group")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[start:end];
    other wire types are skipped."""
    pos = start
    while pos < end:
        number, wire, a, pos = _field(buf, pos, end)
        if pos > end or wire == 4:
            raise ValueError("a field runs past its message")
        if wire == 2:
            yield number, a, pos


def _external_locations(buf, start: int, end: int, kind: str, out: set, depth: int = 0) -> None:
    if depth > 64:
        raise ValueError("graphs nested too deeply")
    for number, a, b in _fields(buf, start, end):
        if kind == "model":
            if number == _MODEL_GRAPH:
                _external_locations(buf, a, b, "graph", out, depth + 1)
            elif number == _MODEL_FUNCTIONS:
                _external_locations(buf, a, b, "function", out, depth + 1)
        elif kind == "graph":
            if number == _GRAPH_NODE:
                _external_locations(buf, a, b, "node", out, depth + 1)
            elif number == _GRAPH_INITIALIZER:
                _external_locations(buf, a, b, "tensor", out, depth + 1)
            elif number == _GRAPH_SPARSE_INITIALIZER:
                _external_locations(buf, a, b, "sparse", out, depth + 1)
        elif kind == "function" and number == _FUNCTION_NODE:
            _external_locations(buf, a, b, "node", out, depth + 1)
        elif kind == "node" and number == _NODE_ATTRIBUTE:
            _external_locations(buf, a, b, "attribute", out, depth + 1)
        elif kind == "attribute":
            if number in (_ATTR_T, _ATTR_TENSORS):
                _external_locations(buf, a, b, "tensor", out, depth + 1)
            elif number in (_ATTR_G, _ATTR_GRAPHS):
                _external_locations(buf, a, b, "graph", out, depth + 1)
            elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
                _external_locations(buf, a, b, "sparse", out, depth + 1)
        elif kind == "sparse" and number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _external_locations(buf, a, b, "tensor", out, depth + 1)
        elif kind == "tensor" and number == _TENSOR_EXTERNAL_DATA:
            entry = {k: bytes(buf[x:y]) for k, x, y in _fields(buf, a, b)}
            if entry.get(1) == b"location":
                out.add(entry.get(2, b"").decode("utf-8", "replace"))


def external_data_files(path: str | os.PathLike) -> set[str] | None:
    """The ``location`` of every external-data entry in the ONNX model at ``path``: the files ONNX
    Runtime will open, relative to the model's directory. Read from the protobuf directly (no onnx
    package), skipping tensor payloads, so a graph with its weights inside costs a walk, not a read.
    None for a file that is not a well-formed protobuf (no runtime can load it either)."""
    import mmap

    out: set[str] = set()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                _external_locations(m, 0, size, "model", out)
            except (ValueError, IndexError):
                return None  # not a protobuf ONNX Runtime could parse either: it refuses the file itself
    return out


def check_external_data(root: Path, manifest: Manifest) -> None:
    """Every file a graph references as external data is a bundle file listed (so hashed) in the
    manifest; otherwise BundleError. ONNX Runtime opens these files itself, by the names inside the
    graph: an unlisted one would be loaded unchecked, a '..' one from outside the bundle."""
    for name in sorted(manifest.graphs):
        spec = manifest.graph(name)
        graph_path = safe_member(root, spec.file)
        if not graph_path.is_file():
            continue  # verify_files reports a missing graph
        base = PurePosixPath(spec.file).parent
        for location in sorted(external_data_files(graph_path) or ()):
            rel = PurePosixPath(location)
            if not location or location.startswith(("/", "\\")) or "\\" in location or rel.is_absolute() \
                    or any(part in ("..", "") for part in rel.parts):
                raise BundleError(f"graphs.{name} ({spec.file}) references external data {location!r} outside the "
                                  "bundle; refusing to load it")
            member = (base / rel).as_posix() if str(base) != "." else rel.as_posix()
            if member not in manifest.files:
                raise BundleError(f"graphs.{name} ({spec.file}) references external data file {member!r}, which "
                                  "the manifest's 'files' does not list, so it is not hashed; refusing to load it "
                                  "(re-export the bundle, or add the file with its sha256)")
            safe_member(root, member)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class _VerifiedCache:
    """Remembers files already hashed, keyed by device, inode, size, mtime and ctime.

    ctime cannot be set by user space, so any write to a file invalidates its entry, while the rename
    that publishes a staged bundle keeps it (the key has no path); a hit lets a
    multi-GB bundle load without re-hashing it. Stored in the user's cache dir, never in the bundle
    (bundles may be read-only). Any problem with the cache just means hashing again.
    """

    def __init__(self) -> None:
        base = os.environ.get("FLASHVL_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashvl-edge")
        self.path = Path(base) / "verified-files.json"
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    @staticmethod
    def key(path: Path, st: os.stat_result) -> str:
        return f"{st.st_dev}:{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"

    def get(self, path: Path, st: os.stat_result) -> str | None:
        return self.entries.get(self.key(path, st))

    def put(self, path: Path, st: os.stat_result, digest: str) -> None:
        self.entries[self.key(path, st)] = digest
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            # keep the cache small: only the newest 2000 entries
            items = list(self.entries.items())[-2000:]
            tmp.write_text(json.dumps(dict(items)))
            os.replace(tmp, self.path)
        except OSError:
            pass


@dataclass
class Bundle:
    """A loaded bundle: its directory and its parsed manifest."""

    root: Path
    manifest: Manifest
    _verified: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: str = "cached") -> "Bundle":
        """Load and check a bundle. ``verify``: "cached" (default), "full" (re-hash all), "none"."""
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle {str(root)!r} does not exist; create one with 'flashvl export'")
        if not root.is_dir():
            raise BundleError(f"{str(root)!r} is not a bundle directory")
        if root.name.startswith(STAGING_PREFIX):
            raise BundleError(f"{str(root)!r} is an unfinished temporary directory from an interrupted write, not a bundle")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(
                f"{str(root)!r} has no {MANIFEST}: it is not a flashvl bundle (or its export was interrupted); "
                "pass a bundle directory written by 'flashvl export', or re-export it")
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from None
        manifest = Manifest.from_json(data, where=str(mpath))
        bundle = cls(root=root, manifest=manifest)
        for name in manifest.files:
            safe_member(root, name)
        if verify != "none":
            bundle.verify_files(full=(verify == "full"))
        check_external_data(root, manifest)
        return bundle

    # -- files --------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Absolute path of a bundle file named in the manifest (checked to stay inside)."""
        return safe_member(self.root, name)

    def verify_files(self, names: list[str] | None = None, full: bool = False) -> None:
        """Check each file's size and sha256 against the manifest (hash cache unless ``full``)."""
        files = self.manifest.files
        cache = _VerifiedCache()
        for name in names or list(files):
            entry = files.get(name)
            if entry is None:
                raise BundleError(f"file {name!r} is not listed in the bundle manifest")
            p = self.path(name)
            try:
                st = p.stat()
            except FileNotFoundError:
                raise IntegrityError(f"bundle file {name!r} is missing from {self.root}; re-export the bundle") from None
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"bundle file {name!r} is not a regular file")
            if st.st_size != entry.size:
                raise IntegrityError(
                    f"bundle file {name!r} has {st.st_size} bytes, the manifest says {entry.size}: "
                    "it is truncated or was modified; re-export the bundle")
            digest = None if full else cache.get(p, st)
            if digest is None:
                digest = sha256_file(p)
                cache.put(p, st, digest)
            if digest != entry.sha256:
                raise IntegrityError(
                    f"bundle file {name!r} does not match its sha256 in the manifest: it was modified "
                    "or corrupted; re-export the bundle")
            self._verified.add(name)
        cache.save()

    # -- convenient views ---------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.manifest.family

    @property
    def variant(self) -> str:
        return self.manifest.variant

    def graph(self, name: str) -> GraphSpec:
        return self.manifest.graph(name)

    def graph_path(self, name: str) -> Path:
        return self.path(self.graph(name).file)


# --------------------------------------------------------------------------------------------
# Writing (shared by export, calibrate and build)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def clean_stale_staging(parent: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove staging directories that a killed process left behind (older than ``max_age_s``)."""
    try:
        for p in parent.iterdir():
            if p.name.startswith(STAGING_PREFIX) and p.is_dir():
                try:
                    if time.time() - p.stat().st_mtime > max_age_s:
                        _remove_tree(p)
                except OSError:
                    pass
    except OSError:
        pass


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or file system has no atomic exchange; the caller falls back to
    two renames. With the exchange, a kill at any instant leaves either the old or the new bundle at
    ``b``, never none.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out: Path, parent: Path) -> None:
    """Put the finished ``tmp`` at ``out``, replacing what is there, as atomically as the OS allows."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if exchange_paths(tmp, out):
        _remove_tree(tmp)  # tmp now holds the previous bundle
        return
    # No atomic exchange: two renames. An exception between them puts the previous bundle back
    # (only a SIGKILL in that instant can leave --out empty; the previous bundle is then the trash dir).
    trash = parent / f"{STAGING_PREFIX}{out.name}-old-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(out, trash)
        os.replace(tmp, out)
    except BaseException:
        if not out.exists() and trash.exists():
            os.replace(trash, out)
        raise
    finally:
        if out.exists():
            _remove_tree(trash)


def check_output_dir(out: str | os.PathLike, force: bool, error: type[Exception] = ExportError) -> None:
    """Refuse an ``--out`` that must not be replaced; called early by the CLIs and again when writing.

    --force replaces a previous bundle, never a directory of other files (a typo for `--out ~`, the
    checkpoint being exported, a folder of photos)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise error(f"--out {str(out)!r} exists and is not a directory; choose another --out")
    if any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise error(f"--out {str(out)!r} is not empty and is not a flashvl bundle; "
                        "choose a new or empty directory (--force only replaces a previous bundle)")
        if not force:
            raise error(f"--out {str(out)!r} already holds a bundle; pass --force to replace it")


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike, force: bool = False, min_free_bytes: int = 0) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success it replaces ``out`` by a rename.

    An exception or a kill leaves ``out`` as it was (the previous bundle still loads) and only a
    ``.flashvl-tmp-*`` directory behind, which no loader accepts as a bundle. An existing bundle at
    ``out`` is replaced only with ``force``; a non-empty directory that is not a bundle never is.
    """
    out = Path(out)
    check_output_dir(out, force)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if min_free_bytes:
        free = shutil.disk_usage(parent).free
        if free < min_free_bytes:
            raise ExportError(
                f"not enough disk space in {str(parent)!r}: {free / 2**30:.2f} GiB free, about "
                f"{min_free_bytes / 2**30:.2f} GiB needed")
    clean_stale_staging(parent)
    tmp = parent / f"{STAGING_PREFIX}{out.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, out, parent)
    except BaseException:
        _remove_tree(tmp)
        raise


def finalize_manifest(root: str | os.PathLike, manifest: Manifest, exclude: tuple[str, ...] = ()) -> Manifest:
    """Record every file under ``root`` (size, sha256) in ``manifest`` and write ``manifest.json``.

    Called last, so a bundle without a manifest is by construction an unfinished one; the manifest is
    replaced atomically. Staging debris (``.flashvl-tmp-*``) and the relative paths in ``exclude`` (and
    everything below them) are not recorded. Files the verified cache already knows are not re-hashed.
    The result is checked as a reader will check it (every named file recorded) before it is written.
    """
    root = Path(root)
    cache = _VerifiedCache()
    files: dict[str, FileEntry] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(STAGING_PREFIX) for part in p.relative_to(root).parts) \
                or any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude):
            continue
        if p.is_symlink():
            raise ExportError(f"refusing to record symlink {p} in a bundle")
        if p.is_file() and rel not in (MANIFEST, f".{MANIFEST}.tmp"):
            st = p.stat()
            digest = cache.get(p, st)
            if digest is None:
                digest = sha256_file(p)
                cache.put(p, st, digest)  # known good: the first load needs no re-hash
            files[rel] = FileEntry(st.st_size, digest)
    data = manifest.replace(files=files).to_json()
    manifest = Manifest.from_json(data, where=f"the manifest being written to {root}")
    tmp = root / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    cache.save()
    return manifest


def tool_versions(*names: str) -> dict[str, str]:
    """Versions of the named distributions that are installed (for the manifest's ``tools``)."""
    from importlib import metadata

    out = {}
    for n in ("flashvl-edge",) + names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out
