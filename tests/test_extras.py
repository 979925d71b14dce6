"""Every subcommand on the runtime-only install (``pip install flashvl-edge``, no extras).

Each command runs in a fresh interpreter whose ``sitecustomize`` installs a ``sys.meta_path`` finder that
makes every optional package unimportable the way a missing one is: ``ModuleNotFoundError`` with the
package as ``name``. The commands that need an extra must say which one in one line (exit code 2, no
traceback); the runtime's commands must work. The extras' module lists are checked against pyproject.toml.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flashvl_edge.main import SUBCOMMAND_EXTRAS, SUBCOMMANDS
from flashvl_edge.runtime import errors

ROOT = Path(__file__).resolve().parents[1]
# every package an extra installs (runtime/errors.py EXTRA_MODULES), and TensorRT, which none does
BLOCKED = tuple(sorted({m for mods in errors.EXTRA_MODULES.values() for m in mods} | {"tensorrt"}))

SITECUSTOMIZE = textwrap.dedent(f"""
    import os, sys

    BLOCKED = {BLOCKED!r}
    LOG = os.environ.get("FLASHVL_TEST_BLOCK_LOG")

    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                if LOG:
                    with open(LOG, "a") as f:
                        f.write(name + "\\n")
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
""")


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory):
    """run(*argv) -> (CompletedProcess, blocked imports attempted), in a runtime-only interpreter."""
    d = tmp_path_factory.mktemp("runtime-only")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    base_env = dict(os.environ, PYTHONPATH=str(d) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    counter = iter(range(10**6))

    def run(*argv, code: str | None = None):
        log = d / f"blocked-{next(counter)}.log"
        env = dict(base_env, FLASHVL_TEST_BLOCK_LOG=str(log))
        cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "flashvl_edge.main", *map(str, argv)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=d)
        tried = set(log.read_text().split()) if log.exists() else set()
        return p, tried

    return run


def test_the_blocker_raises_what_a_missing_package_raises(runtime_only):
    p, tried = runtime_only(code=textwrap.dedent("""
        for name in ("torch", "onnx.numpy_helper", "polygraphy.backend.trt", "skimage.data"):
            try:
                __import__(name)
            except ModuleNotFoundError as e:
                print(e.name)
        import numpy, PIL, tokenizers, onnxruntime, jinja2, tqdm  # the runtime's own dependencies still import
    """))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["torch", "onnx", "polygraphy", "skimage"]
    assert tried == {"torch", "onnx", "polygraphy", "skimage"}


def _one_line(extra: str, module: str, command: str) -> str:
    return f"flashvl {command}: needs the '{extra}' extra: pip install 'flashvl-edge[{extra}]' (missing module: {module})"


@pytest.mark.parametrize("argv, extra, module", [
    (["export", "tiny-static", "--out", "{tmp}/out"], "export", "torch"),
    (["verify", "{bundle}", "--against", "tiny-static"], "export", "torch"),
    (["calibrate", "{bundle}", "--out", "{tmp}/q", "--llm", "int8"], "calibration", "onnx"),
    (["build", "{bundle}", "--dry-run"], "tensorrt", "onnx"),
    (["serve", "{bundle}", "--port", "0"], "serve", "fastapi"),
], ids=["export", "verify --against", "calibrate", "build --dry-run", "serve"])
def test_commands_needing_an_extra_name_it_in_one_line(runtime_only, tiny_static_bundle, tmp_path, argv, extra, module):
    argv = [a.format(tmp=tmp_path, bundle=tiny_static_bundle) for a in argv]
    p, _ = runtime_only(*argv)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip() == _one_line(extra, module, argv[0])
    assert SUBCOMMAND_EXTRAS[argv[0]] == extra
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()


def test_debug_shows_the_traceback_and_the_same_line(runtime_only, tiny_static_bundle):
    p, _ = runtime_only("build", tiny_static_bundle, "--dry-run", "--debug")
    assert p.returncode == 2
    assert "Traceback" in p.stderr and "ModuleNotFoundError" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == _one_line("tensorrt", "onnx", "build")


def test_runtime_commands_work_without_any_extra(runtime_only, tiny_static_bundle, photo_file, tmp_path):
    b = tiny_static_bundle
    p, tried = runtime_only("chat", b, "--image", photo_file, "--prompt", "Describe the image.",
                            "--max-new-tokens", "3", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n_image_tokens"] == 16
    assert tried == set()

    p, tried = runtime_only("verify", b, "--integrity")
    assert p.returncode == 0, p.stderr
    assert "PASS  integrity" in p.stdout and "verify: OK" in p.stdout
    assert tried == set()

    p, tried = runtime_only("bench", b, "--runs", "1", "--warmup", "0", "--new-tokens", "2", "--prompt-len", "4",
                            "--out", tmp_path / "bench")
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert "scikit-image not installed" in report["settings"]["image"]   # the drawn fallback image
    assert "onnx not installed" in report["weights"]["method"] and report["plot"] is None
    assert not tried & {"torch", "transformers"}

    p, tried = runtime_only("doctor", b, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["machine"]["tensorrt"] is None and info["budget"]["per_precision"]["fp16"]["total"] > 0
    assert not tried & {"torch", "transformers"}


@pytest.mark.parametrize("argv", [["verify", "{bundle}", "--backends", "ort,trt"], ["build", "{bundle}"]],
                         ids=["verify --backends", "build"])
def test_tensorrt_commands_say_what_to_install_without_torch(runtime_only, tiny_static_bundle, argv):
    p, tried = runtime_only(*[a.format(bundle=tiny_static_bundle) for a in argv])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "TensorRT" in p.stderr, p.stderr
    assert not tried & {"torch", "transformers"}


# --------------------------------------------------------------------------------------------
# The declarations agree with pyproject.toml, and the error path in-process


# distribution -> import name, for the requirements of the extras
IMPORT_NAMES = {"scikit-image": "skimage", "onnxruntime-genai": "onnxruntime_genai", "nvidia-modelopt": "modelopt",
                "tensorrt-rtx-cu12-bindings": "tensorrt_rtx_bindings", "tensorrt-rtx-cu12-libs": "tensorrt_rtx_libs"}
# modules an extra gets through one of its requirements
TRANSITIVE = {"onnx_ir": "onnxscript", "starlette": "fastapi", "pydantic": "fastapi"}


def _extras() -> dict[str, set[str]]:
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def expand(name: str) -> set[str]:
        out = set()
        for req in declared[name]:
            dist, _, nested = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", req).groups()
            if dist == "flashvl-edge":
                out |= {m for extra in nested.split(",") for m in expand(extra.strip())}
            else:
                out.add(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
        return out

    return {name: expand(name) for name in declared}


def test_each_extra_carries_the_modules_the_error_path_names_it_for():
    extras = _extras()
    for extra, modules in errors.EXTRA_MODULES.items():
        assert extra in extras, extra
        for m in modules:
            assert m in extras[extra] or TRANSITIVE.get(m) in extras[extra], f"[{extra}] does not install {m}"
    # and every optional package an extra installs is known to the error path (tools like pytest aside)
    known = {m for mods in errors.EXTRA_MODULES.values() for m in mods}
    assert extras["dev"] - {"pytest", "hypothesis", "jsonschema"} <= known  # test tools
    assert set(SUBCOMMAND_EXTRAS) == set(SUBCOMMANDS)
    assert {e for e in SUBCOMMAND_EXTRAS.values() if e} <= set(errors.EXTRA_MODULES)


def test_a_missing_base_dependency_is_a_bug_with_a_traceback():
    with pytest.raises(ModuleNotFoundError):
        errors.report_missing_module(ModuleNotFoundError("No module named 'numpy'", name="numpy"), "chat")
    with pytest.raises(ModuleNotFoundError):
        errors.report_missing_module(ModuleNotFoundError("no name"), "chat")


def test_the_preferred_extra_wins_only_when_it_carries_the_module(capsys):
    def line(module, command, extra):
        rc = errors.report_missing_module(ModuleNotFoundError(name=module), command, extra)
        return rc, capsys.readouterr().err.strip()

    assert line("onnx.numpy_helper", "build", "tensorrt") == (2, _one_line("tensorrt", "onnx.numpy_helper", "build"))
    assert line("polygraphy", "verify", "export") == (2, _one_line("tensorrt", "polygraphy", "verify"))
    rc, err = line("tensorrt", "build", "tensorrt")
    assert rc == 2 and "needs TensorRT" in err and "JetPack" in err


def test_the_test_photo_without_scikit_image(monkeypatch):
    from flashvl_edge.runtime.samples import test_photo

    img = test_photo()
    assert img.mode == "RGB" and img.size == (512, 512)
    assert test_photo("camera").mode == "RGB"  # grayscale becomes RGB
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "skimage.data", raising=False)
    with pytest.raises(ImportError) as ei:  # what fallbacks catch
        test_photo()
    assert isinstance(ei.value, errors.FlashVLError) and ei.value.name == "skimage"
    assert str(ei.value) == ("the test photo 'astronaut': needs the 'calibration' extra: "
                             "pip install 'flashvl-edge[calibration]' (missing module: skimage)")
