"""scripts/gpu_check.py (``make gpu-check``) without a GPU: its CPU dry run and its no-GPU exits.

The dry run (``--device cpu --skip-venv --tiny-only``) runs every step of the GPU check on the tiny
preset — both exports, the fp16-vs-fp32 parity through the runtime's runners and Generator, the bench
measurement, the JSON and the table — with the fp16 bundle on the CPU instead of the CUDA EP. Its
numbers are not GPU results; only the CUDA calls themselves are left for a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--skip-venv", "--tiny-only",
                           "--out", str(out), "--runs", "2", "--warmup", "1", "--new-tokens", "6",
                           "--prompt-len", "12"], capture_output=True, text=True, timeout=300)
    return proc, out


def test_cpu_dry_run_writes_the_json(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    for key in ("dry_run", "note", "device", "gpu", "machine", "onnxruntime", "limits", "settings", "presets",
                "passed", "wall_s"):
        assert key in r, key
    # labelled as what it is: the CPU stood in for the GPU
    assert r["dry_run"] is True and r["device"] == "cpu" and "not a GPU result" in r["note"]
    assert list(r["presets"]) == ["tiny-static"] and r["passed"] is True
    p = r["presets"]["tiny-static"]

    from flashvl_edge.runtime.bundle import Bundle

    for dtype in ("fp16", "fp32"):
        assert Bundle.load(p["bundles"][dtype]["bundle"]).manifest.dtype == dtype
        assert p["bundles"][dtype]["export_s"] > 0

    par = p["parity"]
    cpu_only = {"vision": ["CPUExecutionProvider"], "llm": ["CPUExecutionProvider"]}
    assert par["providers"] == {"reference": cpu_only, "candidate": cpu_only}
    for key in ("vision_rel_err", "prefill_logits_rel_err", "max_logits_rel_err"):
        # fp16 rounding is visible but small: a zero would mean the same bundle was compared with itself
        assert 0 < par[key] <= r["limits"]["logits_rel_err"], key
    assert par["max_logits_rel_err"] >= par["prefill_logits_rel_err"]
    assert 0.0 <= par["teacher_forced_top1_agreement"] <= 1.0
    assert par["greedy_tokens"] == 16 and 0.0 <= par["greedy_agreement"] <= 1.0
    assert par["checks"] == {"candidate_on_device": True, "vision": True, "prefill_logits": True,
                             "greedy": True} and par["passed"]

    b = p["bench"]
    assert b["device"] == "cpu" and b["session_providers"] == cpu_only
    assert b["dtype"] == "fp16" and len(b["runs"]) == 2
    assert all(run["new_tokens"] == 6 and run["tiles"] == 1 for run in b["runs"])
    for key in ("vision_per_tile_s", "ttft_s", "decode_tokens_per_s"):
        s = b["summary"][key]
        assert s is not None and 0 < s["min"] <= s["median"] <= s["max"], key


def test_cpu_dry_run_prints_the_table(dry_run):
    proc, out = dry_run
    lines = proc.stdout.splitlines()
    assert any("CPU DRY RUN: not a GPU result" in ln for ln in lines)
    header = next(ln for ln in lines if ln.startswith("preset "))
    for col in ("vision rel", "prefill rel", "greedy", "parity", "vision/tile ms", "TTFT ms", "decode tok/s"):
        assert col in header, col
    row = next(ln for ln in lines if ln.startswith("tiny-static "))
    assert "PASS" in row and len(row.split()) == 9
    assert "flashvl bench:" in proc.stdout  # bench's own table for the bundle, too
    assert lines[-1] == f"wrote {out / 'gpu_check.json'}"


def test_no_nvidia_smi_exits_2_with_one_line_before_any_venv(tmp_path):
    venv = tmp_path / "venv"
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--venv", str(venv), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, env={"PATH": str(empty)})
    assert proc.returncode == 2
    assert proc.stdout.splitlines() == [
        "gpu-check: no NVIDIA GPU usable here (nvidia-smi is missing or lists no GPU); nothing was measured"]
    assert proc.stderr == ""
    assert not venv.exists() and not (tmp_path / "out").exists()


def test_providers_without_cuda_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    # a GPU as far as nvidia-smi can tell, but an ONNX Runtime whose providers lack CUDA
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 570.00, 143771 MiB'\n")
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{Path(sys.executable).parent}")
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert gpu_check.nvidia_smi() == {"name": "NVIDIA H200", "driver": "570.00", "memory": "143771 MiB", "count": 1}
    rc = gpu_check.main(["--skip-venv", "--tiny-only", "--out", str(tmp_path / "out")])
    assert rc == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no NVIDIA GPU usable here (onnxruntime ")
    assert "no CUDAExecutionProvider, only CPUExecutionProvider" in lines[0]
    assert not (tmp_path / "out").exists()


def test_venv_pins_torch_first_then_onnxruntime_gpu_in_place_of_onnxruntime():
    steps = gpu_check.pip_steps("/venv/bin/python")
    flat = [" ".join(s[1:]) for s in steps]
    assert flat[0] == f"-m pip install -q torch=={gpu_check.TORCH_VERSION}"
    assert f"onnxruntime=={gpu_check.ORT_GPU_VERSION}" in steps[1] and "[export,bench]" in steps[1][-2]
    assert flat[2] == "-m pip uninstall -q -y onnxruntime"
    assert steps[3][-1] == f"onnxruntime-gpu[cuda,cudnn]=={gpu_check.ORT_GPU_VERSION}"
    # the CPU onnxruntime the project resolves and the GPU pin stay one minor release apart at most
    import onnxruntime

    have = tuple(int(x) for x in onnxruntime.__version__.split(".")[:2])
    pin = tuple(int(x) for x in gpu_check.ORT_GPU_VERSION.split(".")[:2])
    assert have[0] == pin[0] and 0 <= have[1] - pin[1] <= 1


def test_table_of_a_gpu_result_with_a_failed_parity():
    par = {"vision_rel_err": 1e-3, "prefill_logits_rel_err": 0.2, "teacher_forced_top1_agreement": 0.5,
           "greedy_agreement": 0.25, "passed": False}
    summary = {"vision_per_tile_s": {"median": 0.004}, "ttft_s": {"median": 0.05}, "decode_tokens_per_s": None}
    result = {"dry_run": False, "gpu": {"name": "NVIDIA H200"}, "device": "cuda",
              "onnxruntime": {"version": gpu_check.ORT_GPU_VERSION}, "passed": False,
              "presets": {"flashvl-2b-static": {"parity": par, "bench": {"summary": summary}}}}
    table = gpu_check.format_table(result)
    assert table.splitlines()[0].startswith("gpu-check on NVIDIA H200: fp16 on cuda vs fp32 on cpu")
    assert "DRY RUN" not in table
    row = next(ln for ln in table.splitlines() if ln.startswith("flashvl-2b-static"))
    assert row.split()[5:] == ["FAIL", "4.00", "50.0", "-"]
    assert table.splitlines()[-1].split()[-1] == "FAIL"


def test_with_a_gpu_it_reruns_itself_in_the_venv(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "nvidia_smi", lambda: {"name": "NVIDIA H200"})
    monkeypatch.setattr(gpu_check, "make_venv", lambda venv: "/gpu-venv/bin/python")
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 7))
    assert gpu_check.main(["--runs", "5"]) == 7  # the venv run's exit status is the check's
    assert calls == [["/gpu-venv/bin/python", str(SCRIPT), "--skip-venv", "--runs", "5"]]
    monkeypatch.setattr(gpu_check, "make_venv", lambda venv: None)  # a pip step failed (it said so)
    assert gpu_check.main([]) == 1 and len(calls) == 1


def test_an_installed_venv_is_reused_until_pyproject_or_the_pins_change(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".gpu-check-installed").write_text(gpu_check.venv_key() + "\n")

    def no_subprocess(*a, **kw):
        raise AssertionError("an up-to-date venv ran a command")

    monkeypatch.setattr(gpu_check.subprocess, "run", no_subprocess)
    assert gpu_check.make_venv(venv) == str(venv / "bin" / "python")
    monkeypatch.setattr(gpu_check, "ORT_GPU_VERSION", "0.0.0")
    with pytest.raises(AssertionError, match="ran a command"):
        gpu_check.make_venv(venv)
