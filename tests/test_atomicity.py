"""Atomic writes under kill -9: export and calibrate write into a ``.flashvl-tmp-*`` sibling and
rename it into place at the end, so a SIGKILL at any moment leaves the previous bundle loadable and only
debris that no loader accepts as a bundle (and that a later run cleans).

``flashvl build`` cannot be killed mid-write here: without TensorRT it stops before writing anything
(tested below: the bundle is byte-for-byte unchanged and no staging directory is left). Its mid-build kill
test needs a machine with TensorRT (``test_engines*`` / ``pytest -m trt``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factories import manifest_json
from flashvl_edge.runtime import bundle as B
from flashvl_edge.runtime.errors import BundleError

from test_bad_inputs import assert_user_error, cli_in_process, copy_bundle, subprocess_env

PY = sys.executable


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHVL_CACHE_DIR", str(tmp_path / "flashvl-cache"))


def staging_dirs(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(B.STAGING_PREFIX))


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` with its size and sha256 (the manifest included)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, B.sha256_file(p))
            for p in sorted(root.rglob("*")) if p.is_file()}


def kill_when(argv: list[str], parent: Path, ready, tmp: Path, timeout: float = 240,
              sig: int = signal.SIGKILL) -> tuple[list[str], str]:
    """Start ``flashvl ARGV``; send ``sig`` (SIGKILL) as soon as ``ready(staging_dir)`` holds for a staging
    dir under ``parent``. Returns the names that were in the staging dir then, and the process's stderr."""
    return kill_when_script(["-m", "flashvl_edge.main", *map(str, argv)], parent, ready, tmp, timeout, sig)


def kill_when_script(py_args: list[str], parent: Path | list[Path], ready, tmp: Path,
                     timeout: float = 240, sig: int = signal.SIGKILL) -> tuple[list[str], str]:
    parents = parent if isinstance(parent, list) else [parent]
    log = tmp / "stderr.log"
    with open(log, "w") as err:
        # SIGINT back to its default in the child: a test run started as a background job (CI wrappers,
        # nohup ... &) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        proc = subprocess.Popen([PY, *py_args], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp,
                                env=subprocess_env(tmp),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] | None = None  # the staging dir's contents at the kill
    deadline = time.monotonic() + timeout
    try:
        while seen is None:
            if time.monotonic() > deadline:
                pytest.fail("no staging directory appeared in time")
            if proc.poll() is not None:
                pytest.fail(f"the command ended (rc {proc.returncode}) before it could be killed mid-write:\n"
                            f"{log.read_text()[-3000:]}")
            for d in [d for par in parents for d in (staging_dirs(par) if par.is_dir() else [])]:
                try:
                    names = sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))
                except OSError:
                    continue
                if ready(names):
                    proc.send_signal(sig)
                    seen = names
                    break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and seen is None:
            proc.kill()
        proc.wait(60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text()[-2000:])
    return seen, log.read_text()


def tree_digest_without_debris(root: Path) -> dict[str, tuple[int, str]]:
    return {k: v for k, v in tree_digest(root).items() if B.STAGING_PREFIX not in k}


def assert_debris_is_not_a_bundle(capsys, debris: list[Path]) -> None:
    assert debris, "a SIGKILL mid-write leaves its staging directory (this test expects to see it)"
    for d in debris:
        with pytest.raises(BundleError, match="temporary"):
            B.Bundle.load(d)
        rc, _, err = cli_in_process(capsys, "chat", d, "--prompt", "hi")
        assert_user_error(rc, err, "temporary", action=False)


def age(paths: list[Path], seconds: float) -> None:
    old = time.time() - seconds
    for p in paths:
        os.utime(p, (old, old))


# --------------------------------------------------------------------------------------------
# export


def test_sigkill_mid_export_keeps_the_previous_bundle(capsys, tmp_path, tiny_static_bundle):
    out = copy_bundle(tiny_static_bundle, tmp_path / "bundle")
    before = tree_digest(out)
    # kill once the new export has written its first graph: half a bundle exists in the staging dir
    seen, _ = kill_when(["export", "tiny-static", "--seed", "7", "--out", out, "--force"], tmp_path,
                        lambda names: any(n.endswith(".onnx") for n in names), tmp_path)
    assert any(n.endswith(".onnx") for n in seen) and "manifest.json" not in seen
    # the previous bundle is untouched and passes a full re-hash
    B.Bundle.load(out, verify="full")
    assert tree_digest(out) == before
    rc, outp, err = cli_in_process(capsys, "chat", out, "--prompt", "hi", "--max-new-tokens", "2", "--json")
    assert rc == 0, err
    # what the kill left behind is refused as a bundle
    debris = staging_dirs(tmp_path)
    assert_debris_is_not_a_bundle(capsys, debris)
    # ... and a later export cleans it once it is stale (a fresh one may belong to a running writer)
    age(debris, 2 * 24 * 3600)
    rc, _, err = cli_in_process(capsys, "export", "tiny-static", "--seed", "7", "--out", out, "--force", "--quiet")
    assert rc == 0, err
    assert staging_dirs(tmp_path) == []
    after = B.Bundle.load(out, verify="full")
    assert after.manifest.source.seed == 7
    assert tree_digest(out) != before  # the new export did replace the old bundle


# --------------------------------------------------------------------------------------------
# the commit itself: a kill between the renames that publish the new bundle


def write_bundle(root, manifest_path, payload):
    """A small complete bundle: the manifest at ``manifest_path``, placeholders for the files its sections
    name, and ``payload.bin``. Also run inside the child process below (its source is copied there)."""
    import json
    from flashvl_edge.runtime import bundle as B
    from flashvl_edge.runtime.contract import Manifest

    m = Manifest.from_json(json.loads(open(manifest_path).read()), require_files=False)
    for _, name in m.named_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    (root / "payload.bin").write_bytes(payload)
    B.finalize_manifest(root, m)


def _tagged_manifest(work: Path, tag: str) -> Path:
    """A valid manifest that says which write it came from (source.model "old" or "new")."""
    path = work / f"{tag}.manifest.json"
    path.write_text(json.dumps(manifest_json({"source": {"model": tag}})))
    return path


_COMMIT = inspect.getsource(write_bundle) + r'''
import os, signal, sys
from pathlib import Path
from flashvl_edge.runtime import bundle as B

out, kill_at, action, swap, new_manifest = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
calls = 0
real_replace, real_rename = os.replace, os.rename

def hooked(real):
    def f(a, b, *args, **kw):
        global calls
        calls += 1
        r = real(a, b, *args, **kw)
        if calls == kill_at:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt
        return r
    return f

os.replace, os.rename = hooked(real_replace), hooked(real_rename)
if hasattr(B, "exchange_paths"):  # the atomic swap counts as a rename too (a kill right after it)
    B.exchange_paths = (lambda a, b: False) if swap == "fallback" else hooked(B.exchange_paths)
try:
    with B.staging_dir(out, force=True) as tmp:
        write_bundle(tmp, new_manifest, b"new" * 100)
except KeyboardInterrupt:
    print("interrupted", calls)
    sys.exit(3)
print("done", calls)
'''


def _old_bundle(root: Path, work: Path) -> None:
    root.mkdir()
    write_bundle(root, _tagged_manifest(work, "old"), b"old" * 50)


@pytest.mark.parametrize("action,swap", [("kill", "atomic"), ("interrupt", "atomic"), ("interrupt", "fallback")])
def test_kill_at_every_rename_of_the_commit(tmp_path, action, swap):
    """Kill (or interrupt) right after each rename the write makes: ``out`` is always a complete bundle,
    the old one or the new one, never missing. A two-step swap (out -> trash, tmp -> out) fails this.

    ``fallback``: where no atomic exchange exists (not Linux), an exception between the two renames
    must put the old bundle back (a SIGKILL there cannot be survived without an atomic exchange)."""
    n = 0
    while True:
        n += 1
        assert n < 50
        work = tmp_path / f"{action}-{swap}-{n}"
        work.mkdir()
        out = work / "bundle"
        _old_bundle(out, work)
        r = subprocess.run([PY, "-c", _COMMIT, str(out), str(n), action, swap, str(_tagged_manifest(work, "new"))],
                           capture_output=True, text=True, timeout=60, env=subprocess_env(work))
        finished = r.stdout.startswith("done")
        if not finished:
            assert r.returncode == (-signal.SIGKILL if action == "kill" else 3), r.stderr
        assert out.is_dir(), f"after a {action} at rename #{n} the bundle directory is gone: {os.listdir(work)}"
        tag = B.Bundle.load(out, verify="full").manifest.source.model
        if finished:
            assert tag == "new"
            break
        assert tag in ("old", "new")
        for d in staging_dirs(work):
            with pytest.raises(BundleError, match="temporary"):
                B.Bundle.load(d)
    assert n > 1  # at least one kill point was exercised


# --------------------------------------------------------------------------------------------
# calibrate and build


def test_sigkill_mid_calibrate_keeps_the_previous_output(capsys, tmp_path, tiny_static_bundle):
    previous = copy_bundle(tiny_static_bundle, tmp_path / "quantized")  # whatever a user had at --out
    before = tree_digest(previous)
    argv = ["calibrate", tiny_static_bundle, "--out", previous, "--force", "--samples", "2", "--holdout", "1",
            "--cache-dir", tmp_path / "calibration-cache"]
    # kill once the quantized bundle is half written (its first quantized graph is in the staging dir)
    seen, _ = kill_when(argv, tmp_path, lambda names: any(n.endswith(".onnx") for n in names), tmp_path)
    assert "manifest.json" not in seen
    B.Bundle.load(previous, verify="full")
    assert tree_digest(previous) == before
    debris = staging_dirs(tmp_path)
    assert_debris_is_not_a_bundle(capsys, debris)


# TensorRT cannot be installed here, so the engine builder itself is replaced by a stand-in that writes
# placeholder engine bytes slowly. Everything around it is the real ``flashvl build``: planning, staging,
# publishing the engine directory and recording it in the manifest. That file handling is what is tested.
_BUILD_STANDIN = r'''
import sys, time, types
import flashvl_edge.runtime.backends.trt as T
import flashvl_edge.export.engines as E

bundle, delay, cache, kill_at = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if kill_at:  # SIGKILL right after the kill_at-th rename (atomic exchanges included)
    import os, signal
    from flashvl_edge.runtime import bundle as B
    calls = 0
    def hooked(real):
        def f(*a, **k):
            global calls
            calls += 1
            r = real(*a, **k)
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return r
        return f
    os.replace, os.rename = hooked(os.replace), hooked(os.rename)
    if hasattr(B, "exchange_paths"):
        B.exchange_paths = hooked(B.exchange_paths)
T.require_tensorrt = lambda: types.SimpleNamespace(__version__="10.3.0")
T.gpu_info = lambda: T.GpuInfo("Stand-in GPU", "8.7", 8 << 30)

def stand_in_build_one(plan, graph, onnx_path, engine_path):
    with open(engine_path, "wb") as f:
        f.write(str(time.time_ns()).encode())  # every build's engines differ
        for i in range(10):
            f.write(bytes([i]) * 4096)
            f.flush()
            time.sleep(delay)

E._build_one = stand_in_build_one
from flashvl_edge.main import main
sys.exit(main(["build", bundle, "--precision", "fp16", "--timing-cache", cache]))
'''


def _standin_build(root: Path, tmp: Path, delay: float = 0.0, kill_at: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", _BUILD_STANDIN, str(root), str(delay), str(tmp / "timing.cache"), str(kill_at)],
                          capture_output=True, text=True, timeout=120, cwd=tmp, env=subprocess_env(tmp))


def test_rebuild_and_sigkill_mid_build_with_a_stand_in_builder(capsys, tmp_path, tiny_static_bundle):
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    first = _standin_build(root, tmp_path)
    assert first.returncode == 0, first.stderr
    engines = B.Bundle.load(root, verify="full").manifest.engines
    assert len(engines) == 1
    (entry,) = engines.values()
    assert (root / entry.dir / "vision.engine").is_file()
    # a second build on the same GPU replaces its engines
    again = _standin_build(root, tmp_path)
    assert again.returncode == 0, again.stderr
    before = tree_digest(root)
    # a third one is killed while it writes the new engines: the bundle keeps the second build's engines
    argv_script = ["-c", _BUILD_STANDIN, str(root), "0.2", str(tmp_path / "timing.cache"), "0"]
    # (the build may stage the whole bundle, or an engine directory under engines/ or engines/<gpu>/)
    places = [root.parent, root / "engines", *sorted(d for d in (root / "engines").iterdir() if d.is_dir())]
    seen, _ = kill_when_script(argv_script, places, lambda names: any(n.endswith(".engine") for n in names), tmp_path)
    B.Bundle.load(root, verify="full")
    assert tree_digest_without_debris(root) == before
    debris = [d for par in places for d in staging_dirs(par)]
    assert_debris_is_not_a_bundle(capsys, debris)
    # ... and the debris is neither recorded by the next build nor breaks it
    age(debris, 2 * 24 * 3600)
    last = _standin_build(root, tmp_path)
    assert last.returncode == 0, last.stderr
    m = B.Bundle.load(root, verify="full").manifest
    assert not [n for n in m.files if B.STAGING_PREFIX in n]


def test_rebuild_killed_at_every_rename_keeps_a_loadable_bundle(tmp_path, tiny_static_bundle):
    """A rebuild replaces engines that the manifest records with their sha256: killed right after any
    rename it makes (the engine directory's, the manifest's), the bundle must still pass a full
    integrity check, with the previous engines or the new ones."""
    base = copy_bundle(tiny_static_bundle, tmp_path / "base")
    first = _standin_build(base, tmp_path)
    assert first.returncode == 0, first.stderr
    old = tree_digest(base)
    n = 0
    while True:
        n += 1
        assert n < 30
        work = tmp_path / f"kill-{n}"
        work.mkdir()
        root = copy_bundle(base, work / "b")
        r = _standin_build(root, work, kill_at=n)
        finished = r.returncode == 0
        if not finished:
            assert r.returncode == -signal.SIGKILL, r.stderr
        assert root.is_dir(), f"killed after rename #{n}: the bundle directory is gone: {os.listdir(work)}"
        B.Bundle.load(root, verify="full")  # old or new engines, but always consistent with the manifest
        if finished:
            assert tree_digest_without_debris(root) != old  # the rebuild did write new engines
            break
    assert n > 1


def test_ctrl_c_mid_calibrate_cleans_up(tmp_path, tiny_static_bundle):
    """SIGINT (Ctrl-C) is not a kill: the process removes its own staging directory and says so."""
    previous = copy_bundle(tiny_static_bundle, tmp_path / "quantized")
    before = tree_digest(previous)
    argv = ["calibrate", tiny_static_bundle, "--out", previous, "--force", "--samples", "2", "--holdout", "1",
            "--cache-dir", tmp_path / "calibration-cache"]
    _, stderr = kill_when(argv, tmp_path, lambda names: any(n.endswith(".onnx") for n in names), tmp_path,
                          sig=signal.SIGINT)
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert tree_digest(previous) == before
    assert staging_dirs(tmp_path) == []


def test_build_without_tensorrt_writes_nothing(capsys, tmp_path, tiny_static_bundle):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: this case is about machines without it")
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    before = tree_digest(root)
    rc, _, err = cli_in_process(capsys, "build", root, "--precision", "fp16")
    assert_user_error(rc, err, "tensorrt")
    assert tree_digest(root) == before and not (root / "engines").exists()
    assert staging_dirs(tmp_path) == [] and staging_dirs(root) == []
    rc, out, err = cli_in_process(capsys, "build", root, "--precision", "fp16", "--dry-run")
    assert rc == 0, err
    assert tree_digest(root) == before and staging_dirs(root) == []
