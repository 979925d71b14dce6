"""The bundle contract: schema check, integrity (size + sha256, verified cache), path safety, atomic writes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from factories import as_manifest, manifest_json
from flashvl_edge.runtime import bundle as B
from flashvl_edge.runtime.contract import SCHEMA_VERSION
from flashvl_edge.runtime.errors import BundleError, ExportError, IntegrityError

# A finished bundle must hold every file its sections name; these stand in for the real ones.
NAMED = sorted({name for _, name in as_manifest(manifest_json()).named_files()})
EXTRA = {"a.bin": b"alpha" * 100, "sub/b.bin": b"beta"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHVL_CACHE_DIR", str(tmp_path / "cache"))


def make_bundle(root: Path, files: dict[str, bytes] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    named = {name: name.encode() for name in NAMED}
    for name, data in {**named, **(files or EXTRA)}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    B.finalize_manifest(root, as_manifest(manifest_json()))
    return root


def test_round_trip_and_files_recorded(tmp_path):
    root = make_bundle(tmp_path / "b")
    bundle = B.Bundle.load(root)
    assert set(bundle.manifest.files) == {"a.bin", "sub/b.bin", *NAMED}
    assert bundle.manifest.files["sub/b.bin"].size == 4
    assert bundle.manifest.schema_version == SCHEMA_VERSION == 2
    assert json.loads((root / B.MANIFEST).read_text())["schema_version"] == 2


def test_truncated_file_is_refused(tmp_path):
    root = make_bundle(tmp_path / "b")
    with open(root / "a.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(IntegrityError, match="truncated"):
        B.Bundle.load(root)


def test_tampered_file_same_size_is_refused_despite_cache(tmp_path):
    root = make_bundle(tmp_path / "b")
    B.Bundle.load(root)  # populates the verified cache
    st = (root / "a.bin").stat()
    data = bytearray((root / "a.bin").read_bytes())
    data[0] ^= 0xFF
    (root / "a.bin").write_bytes(bytes(data))
    os.utime(root / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime restored
    with pytest.raises(IntegrityError, match="sha256"):
        B.Bundle.load(root)


def test_full_verify_rehashes_even_when_cached(tmp_path, monkeypatch):
    root = make_bundle(tmp_path / "b")
    B.Bundle.load(root)
    calls = []
    real = B.sha256_file
    monkeypatch.setattr(B, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    B.Bundle.load(root)  # cached: no hashing
    assert calls == []
    B.Bundle.load(root, verify="full")
    assert len(calls) == len(EXTRA) + len(NAMED)


def test_missing_file_and_missing_manifest(tmp_path):
    root = make_bundle(tmp_path / "b")
    (root / "sub" / "b.bin").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        B.Bundle.load(root)
    (root / B.MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        B.Bundle.load(root)
    with pytest.raises(BundleError, match="does not exist"):
        B.Bundle.load(tmp_path / "nope")


@pytest.mark.parametrize("version", [0, 1, 3, "2", None])
def test_unknown_schema_version(tmp_path, version):
    root = make_bundle(tmp_path / "b")
    m = json.loads((root / B.MANIFEST).read_text())
    m["schema_version"] = version
    (root / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version") as ei:
        B.Bundle.load(root)
    assert "\n" not in str(ei.value) and "re-export" in str(ei.value)


def test_corrupt_manifest(tmp_path):
    root = make_bundle(tmp_path / "b")
    (root / B.MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        B.Bundle.load(root)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../x", "a\\..\\b", ""])
def test_names_escaping_the_bundle_are_refused(tmp_path, name):
    root = make_bundle(tmp_path / "b")
    m = json.loads((root / B.MANIFEST).read_text())
    m["files"][name] = {"size": 1, "sha256": "0" * 64}
    (root / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError):
        B.Bundle.load(root)


def test_symlink_out_of_the_bundle_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"beta")
    root = make_bundle(tmp_path / "b")
    (root / "sub" / "b.bin").unlink()
    (root / "sub" / "b.bin").symlink_to(secret)
    with pytest.raises(BundleError, match="outside"):
        B.Bundle.load(root)


def test_staging_dir_is_atomic(tmp_path):
    out = make_bundle(tmp_path / "b", {"a.bin": b"old"})
    with pytest.raises(RuntimeError):
        with B.staging_dir(out, force=True) as tmp:
            (tmp / "a.bin").write_bytes(b"new")
            raise RuntimeError("killed mid-export")
    assert B.Bundle.load(out).manifest.files["a.bin"].size == 3  # old bundle intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(B.STAGING_PREFIX)]
    with B.staging_dir(out, force=True) as tmp:
        make_bundle(tmp, {"a.bin": b"newer"})
    assert B.Bundle.load(out).manifest.files["a.bin"].size == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "cache"]


def test_staging_dir_refuses_non_empty_out_without_force(tmp_path):
    out = make_bundle(tmp_path / "b")
    with pytest.raises(ExportError, match="--force"):
        with B.staging_dir(out):
            pass
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ExportError, match="not a flashvl bundle"):
        with B.staging_dir(tmp_path / "photos", force=True):
            pass
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"
    (tmp_path / "empty").mkdir()
    with B.staging_dir(tmp_path / "empty") as tmp:  # an empty directory is fine
        make_bundle(tmp)
    B.Bundle.load(tmp_path / "empty")


def test_staging_dir_checks_free_space(tmp_path):
    with pytest.raises(ExportError, match="disk space"):
        with B.staging_dir(tmp_path / "b", min_free_bytes=1 << 60):
            pass
    assert list(tmp_path.iterdir()) == []


def test_staging_debris_is_not_a_bundle(tmp_path):
    debris = tmp_path / f"{B.STAGING_PREFIX}b-123-abcd"
    make_bundle(debris)
    with pytest.raises(BundleError, match="temporary"):
        B.Bundle.load(debris)


def test_stale_staging_dirs_are_cleaned(tmp_path):
    stale = tmp_path / f"{B.STAGING_PREFIX}x-1-dead"
    stale.mkdir()
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / f"{B.STAGING_PREFIX}x-2-live"
    fresh.mkdir()
    B.clean_stale_staging(tmp_path)
    assert not stale.exists() and fresh.exists()  # a concurrent writer's fresh dir is left alone
