"""Security checks: no pickle on user files, remote code only when asked, bundle names cannot
escape the bundle, and the image pixel limit is enforced before decoding (time and memory bound).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flashvl_edge.runtime.errors import CheckpointError, FlashVLError, ImageError

from test_bad_inputs import (
    assert_api_error,
    assert_user_error,
    cli_in_process,
    copy_bundle,
    png_bomb,
    png_header_only,
    rewrite_manifest,
    run_cli,
    subprocess_env,
)

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("cli", "export", "runtime", "calibration", "scripts", "benchmarks")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHVL_CACHE_DIR", str(tmp_path / "flashvl-cache"))


# --------------------------------------------------------------------------------------------
# 1. No unsafe deserialisation anywhere in the source (an AST scan, not a grep: comments and
#    strings do not count, aliases like ``import pickle as p`` do).


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _calls_with_function(tree: ast.AST):
    """(call node, name of the enclosing function or "<module>") for every call in ``tree``."""
    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                yield child, func
            yield from visit(child, inner)
    yield from visit(tree, "<module>")


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every call in ``source`` that can execute code from a file or turn off a safety check.

    Each finding reads ``file:line in function: what``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module path
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node, func in _calls_with_function(tree):
        name = _dotted(node.func)
        if not name:
            continue
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        where = f"{filename}:{node.lineno} in {func}: {full}"
        if full in ("torch.load", "torch.serialization.load"):
            if not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{where} without weights_only=True")
        elif full.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve") \
                and full.rsplit(".", 1)[-1] in ("load", "loads", "Unpickler", "open"):
            found.append(where)
        elif full in ("numpy.load", "np.load") and _is_const(_kw(node, "allow_pickle"), True):
            found.append(f"{where} with allow_pickle=True")
        elif full == "yaml.load" and not (_kw(node, "Loader") is not None
                                          and "Safe" in (_dotted(_kw(node, "Loader")) or "")):
            found.append(f"{where} without a SafeLoader")
        elif full in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append(where)
        elif _is_const(_kw(node, "trust_remote_code"), True):
            found.append(f"{where} with trust_remote_code=True hard-coded")
        elif _is_const(_kw(node, "use_safetensors"), False):
            found.append(f"{where} with use_safetensors=False")
        elif full.startswith("subprocess.") and _is_const(_kw(node, "shell"), True):
            found.append(f"{where} with shell=True")
        elif full in ("os.system", "os.popen"):
            found.append(where)
    return found


# Findings that are reviewed and gated elsewhere: (file, function, what), each with the reason.
ALLOWED = {
    # Reached only from load_checkpoint after it refused a remote-code directory without
    # --trust-remote-code; test_remote_code_is_not_run_without_the_flag proves the gate end to end.
    ("export/families/remote_code.py", "load_remote_code", "trust_remote_code=True"),
}


def _allowed(finding: str) -> bool:
    return any(finding.startswith(f"{f}:") and f" in {fn}: " in finding and what in finding
               for f, fn, what in ALLOWED)


def test_the_scanner_catches_what_it_should():
    """The scan below cannot pass vacuously: each of these must be reported."""
    bad = textwrap.dedent("""
        import torch, pickle as pk, numpy as np, yaml, subprocess, os
        from torch import load as tload
        from transformers import AutoModel
        torch.load(p)
        torch.load(p, weights_only=False)
        tload(p)
        pk.load(f)
        pk.loads(b)
        np.load(p, allow_pickle=True)
        yaml.load(s)
        eval("1")
        AutoModel.from_pretrained(d, trust_remote_code=True)
        AutoModel.from_pretrained(d, use_safetensors=False)
        subprocess.run(c, shell=True)
        os.system(c)
    """)
    assert len(unsafe_calls(bad)) == 12, unsafe_calls(bad)
    good = textwrap.dedent("""
        import torch, numpy as np, yaml
        torch.load(p, weights_only=True)
        np.load(p)
        np.load(p, mmap_mode="r", allow_pickle=False)
        yaml.load(s, Loader=yaml.SafeLoader)
        AutoModel.from_pretrained(d, trust_remote_code=args.trust_remote_code)
        # torch.load(p) in a comment
        s = "pickle.load(f)"
    """)
    assert unsafe_calls(good) == []


def test_no_unsafe_deserialisation_or_code_execution_in_the_source():
    files = [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")]
    assert len(files) >= 10, files  # the scan actually sees the code
    found = []
    for p in files:
        found += unsafe_calls(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))
    assert [f for f in found if not _allowed(f)] == [], "\n".join(found)


# --------------------------------------------------------------------------------------------
# 2. safetensors only: a pickle checkpoint is refused without being opened


class _Payload:
    """Unpickling this creates a file: the proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_only(ckpt: Path, marker: Path) -> None:
    import pickle

    for f in ckpt.glob("*.safetensors*"):
        f.unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"vision_model.x": _Payload(str(marker))}, f)


@pytest.mark.parametrize("layout", ["canonical", "internvl"])
def test_bin_only_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch, capsys, layout):
    import torch
    from factories import make_canonical_checkpoint, make_internvl_checkpoint
    from flashvl_edge.export.families import load_model

    ckpt = tmp_path / "ckpt"
    if layout == "canonical":
        make_canonical_checkpoint(ckpt, preset="tiny-static", seed=1)
    else:
        make_internvl_checkpoint(ckpt, seed=1)
    marker = tmp_path / "pickle-was-executed"
    _pickle_only(ckpt, marker)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append((a, k)) or pytest.fail("torch.load called"))
    with pytest.raises(FlashVLError) as ei:
        load_model(str(ckpt))
    assert_api_error(ei, CheckpointError, "safetensors")
    rc, _, err = cli_in_process(capsys, "export", ckpt, "--out", tmp_path / "out")
    assert_user_error(rc, err, "safetensors")
    assert calls == [] and not marker.exists() and not (tmp_path / "out").exists()
    # the control: this file really does execute code when unpickled
    import pickle

    with open(ckpt / "pytorch_model.bin", "rb") as f:
        pickle.load(f)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# 3. remote code only with --trust-remote-code


REMOTE_CONFIG = '''
import os, pathlib
pathlib.Path(os.environ["FLASHVL_TEST_MARKER"]).write_text("remote configuration code ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "flashvl_dynamic_iss_remote"
'''

REMOTE_MODEL = '''
import os, pathlib
pathlib.Path(os.environ["FLASHVL_TEST_MARKER"]).write_text("remote modeling code ran")
import torch
from transformers import PreTrainedModel
from .configuration_evil import EvilConfig


class EvilModel(PreTrainedModel):
    config_class = EvilConfig

    def __init__(self, config):
        super().__init__(config)
        self.w = torch.nn.Linear(2, 2)
        self.post_init()
'''


def _remote_code_checkpoint(d: Path, bundle: Path) -> Path:
    """A directory whose config asks for its own Python code; importing that code writes a marker file.
    Tokenizer files come from a real bundle so that only the code decides what happens."""
    from safetensors.torch import save_file
    import torch

    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundle / name, d / name)
    (d / "config.json").write_text(json.dumps({
        "model_type": "flashvl_dynamic_iss_remote",
        "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }))
    (d / "configuration_evil.py").write_text(REMOTE_CONFIG)
    (d / "modeling_evil.py").write_text(REMOTE_MODEL)
    save_file({"w.weight": torch.zeros(2, 2), "w.bias": torch.zeros(2)}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    return d


def test_remote_code_is_not_run_without_the_flag(tmp_path, monkeypatch, tiny_static_bundle):
    ckpt = _remote_code_checkpoint(tmp_path / "remote", tiny_static_bundle)
    marker = tmp_path / "remote-code-ran"
    env = subprocess_env(tmp_path)
    env.update(FLASHVL_TEST_MARKER=str(marker), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    r = run_cli("export", ckpt, "--out", tmp_path / "out", tmp=tmp_path, env=env)
    assert_user_error(r.returncode, r.stderr, "--trust-remote-code")
    assert not marker.exists(), "remote code ran without --trust-remote-code"
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "hf").rglob("*evil*")), "remote code was copied into the modules cache"
    # the API refuses the same way (in-process, nothing imported)
    from flashvl_edge.export.families import load_model

    monkeypatch.setenv("FLASHVL_TEST_MARKER", str(marker))
    with pytest.raises(FlashVLError) as ei:
        load_model(str(ckpt))
    assert_api_error(ei, CheckpointError, "trust-remote-code")
    assert not marker.exists()


def test_remote_code_runs_with_the_flag_and_fails_loudly(tmp_path, tiny_static_bundle):
    """The control for the test above: with the flag, the same directory's code does run (so the marker
    mechanism works); the model is not a Flash-VL one, and that is one clear error, not a wrong graph."""
    ckpt = _remote_code_checkpoint(tmp_path / "remote", tiny_static_bundle)
    marker = tmp_path / "remote-code-ran"
    env = subprocess_env(tmp_path)
    env.update(FLASHVL_TEST_MARKER=str(marker), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    r = run_cli("export", ckpt, "--out", tmp_path / "out", "--trust-remote-code", tmp=tmp_path, env=env)
    assert marker.exists(), r.stderr
    assert_user_error(r.returncode, r.stderr, action=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 4. names in the manifest cannot escape the bundle, through the CLI


def _escape_graph(root: Path, outside: Path, absolute: bool) -> None:
    m = json.loads((root / "manifest.json").read_text())
    name = m["graphs"]["vision"]["file"]
    outside.mkdir(exist_ok=True)
    shutil.copy(root / name, outside / "vision.onnx")  # same bytes: the sha256 would match
    new = str(outside / "vision.onnx") if absolute else os.path.relpath(outside / "vision.onnx", root)
    m["graphs"]["vision"]["file"] = new
    m["files"][new] = m["files"].pop(name)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_chat_refuses_graph_names_escaping_the_bundle(capsys, tmp_path, tiny_static_bundle, how):
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    outside = tmp_path / "elsewhere"  # a neutral name, so the words checked below come from the message
    if how == "symlink":
        name = json.loads((root / "manifest.json").read_text())["embeddings"]["file"]
        outside.mkdir()
        shutil.move(root / name, outside / "emb.npy")  # identical bytes, so size and sha256 match
        (root / name).symlink_to(outside / "emb.npy")
        needle = "outside"
    else:
        _escape_graph(root, outside, absolute=(how == "absolute"))
        needle = "vision.onnx"
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi")
    assert_user_error(rc, err, needle, action=False)
    assert "not a relative path inside the bundle" in err or "points outside the bundle" in err, err


@pytest.mark.parametrize("section,key", [("tokenizer", "file"), ("tokenizer", "config_file"), ("embeddings", "file")])
def test_runtime_opens_files_only_through_the_bundle(capsys, tmp_path, tiny_static_bundle, section, key):
    """A manifest entry that points outside, even when it is not in ``files``, must not be opened."""
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    name = m[section][key]
    shutil.copy(root / name, tmp_path / Path(name).name)  # a valid file waits outside
    rewrite_manifest(root, lambda m: m[section].update({key: f"../{Path(name).name}"}))
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi", "--max-new-tokens", "2")
    assert_user_error(rc, err, f"{section}.{key}", Path(name).name, "inside the bundle", action=False)


def test_a_bundle_behind_a_symlinked_directory_still_loads(capsys, tmp_path, tiny_static_bundle):
    """Path safety is about names inside the bundle, not about how the user reaches the bundle."""
    real = copy_bundle(tiny_static_bundle, tmp_path / "real")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    rc, out, err = cli_in_process(capsys, "chat", tmp_path / "link", "--prompt", "hi", "--max-new-tokens", "2",
                                  "--json")
    assert rc == 0, err


# --------------------------------------------------------------------------------------------
# 5. the pixel limit is checked before decoding: bounded time and memory


# Peak memory is VmHWM (this process image's own high-water mark); ru_maxrss would carry the forking
# pytest process's peak across exec.
_MEASURE = r'''
import sys, time
mode, path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
outcome = "ok"
if mode == "flashvl":
    from flashvl_edge.runtime.images import load_image
    from flashvl_edge.runtime.errors import ImageError
    try:
        load_image(path, max_pixels=limit)
    except ImageError as e:
        outcome = "refused"
else:  # the control: what decoding this file costs
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None
    Image.open(path).convert("RGB")
elapsed = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(outcome, elapsed, hwm // 1024)
'''


@pytest.fixture(scope="module")
def bomb_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("bomb") / "bomb.png"
    p.write_bytes(png_bomb(12_000, 12_000))  # 144 Mpx: 144 MB as L, 432 MB as RGB, ~140 kB on disk
    return p


def _measure(mode: str, path: Path, limit: int, tmp: Path) -> tuple[str, float, int]:
    r = subprocess.run([PY, "-c", _MEASURE, mode, str(path), str(limit)], capture_output=True, text=True,
                       timeout=120, env=subprocess_env(tmp))
    assert r.returncode == 0, r.stderr
    outcome, secs, rss_mb = r.stdout.split()
    return outcome, float(secs), int(rss_mb)


def test_pixel_limit_bounds_memory(tmp_path, bomb_file):
    outcome, secs, rss = _measure("flashvl", bomb_file, 10_000_000, tmp_path)
    ctl_outcome, ctl_secs, ctl_rss = _measure("pil-decode", bomb_file, 0, tmp_path)
    assert outcome == "refused"
    # the control shows what decoding costs; refusing must cost a small fraction of it
    assert ctl_rss > 400, f"control decode peaked at only {ctl_rss} MB: the bomb is not a bomb"
    assert rss < ctl_rss - 300, f"refusing peaked at {rss} MB vs {ctl_rss} MB for a full decode"


def test_pipeline_uses_the_manifest_pixel_limit(tmp_path, tiny_static_bundle):
    from flashvl_edge.runtime.pipeline import Pipeline

    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m["preprocess"].update(max_image_pixels=4_000_000))
    # editing the manifest is allowed (it is not in ``files``): the limit is configuration
    pipe = Pipeline.from_bundle(root)
    small = tmp_path / "ok.png"
    small.write_bytes(png_bomb(2000, 2000))  # exactly at the limit: accepted
    assert pipe.chat("hi", image=small, max_new_tokens=1).n_image_tokens > 0
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(2001, 2000))
    with pytest.raises(FlashVLError) as ei:
        pipe.chat("hi", image=big, max_new_tokens=1)
    assert_api_error(ei, ImageError, "pixel")


# --------------------------------------------------------------------------------------------
# ONNX external data: every file a graph makes ONNX Runtime open must be listed and hashed


def _with_external_data(src: Path, dst: Path, location: str | None = None) -> Path:
    """A copy of ``src`` whose llm.onnx keeps its weights in one external file (``llm.onnx.data``),
    re-finalized so the manifest lists it; ``location`` then rewrites the graph's reference."""
    onnx = pytest.importorskip("onnx")
    from flashvl_edge.runtime.bundle import finalize_manifest
    from flashvl_edge.runtime.contract import Manifest

    root = copy_bundle(src, dst)
    model = onnx.load(root / "llm.onnx")
    onnx.save_model(model, root / "llm.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="llm.onnx.data", size_threshold=0)
    if location is not None:
        model = onnx.load(root / "llm.onnx", load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save_model(model, root / "llm.onnx")
    finalize_manifest(root, Manifest.from_json(json.loads((root / "manifest.json").read_text())))
    return root


def test_external_data_listed_and_hashed_loads(tmp_path, tiny_static_bundle):
    from flashvl_edge.runtime.bundle import Bundle, external_data_files

    root = _with_external_data(tiny_static_bundle, tmp_path / "b")
    assert external_data_files(root / "llm.onnx") == {"llm.onnx.data"}
    assert "llm.onnx.data" in Bundle.load(root, verify="full").manifest.files


def test_external_data_the_manifest_does_not_list_is_refused(capsys, tmp_path, tiny_static_bundle):
    root = _with_external_data(tiny_static_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m["files"].pop("llm.onnx.data"))
    rc, _, err = cli_in_process(capsys, "verify", root, "--integrity")
    assert_user_error(rc, err, "llm.onnx.data", "not hashed")
    # guard off: without the check the unlisted file is loaded as it is (and may be swapped at will)
    from flashvl_edge.runtime import bundle as B

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "check_external_data", lambda root, manifest: None)
        B.Bundle.load(root, verify="full")


def test_external_data_outside_the_bundle_is_refused(tmp_path, tiny_static_bundle):
    from flashvl_edge.runtime.bundle import Bundle

    root = _with_external_data(tiny_static_bundle, tmp_path / "b", location="../outside.data")
    with pytest.raises(FlashVLError, match="outside the bundle"):
        Bundle.load(root)


def test_manifests_say_what_is_trusted(tiny_static_bundle):
    from flashvl_edge.runtime.contract import TRUST

    trust = json.loads((Path(tiny_static_bundle) / "manifest.json").read_text()).get("trust")
    assert trust is None or trust == TRUST  # bundles exported before the table have none
    assert "files" in TRUST and "chat_template" in TRUST
