"""``flashvl doctor [BUNDLE]``: runs without torch, reports backends, and budgets memory from real bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flashvl_edge.runtime import doctor
from flashvl_edge.runtime.bundle import Bundle


def _doctor_json(tmp_path, *args) -> dict:
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text("raise RuntimeError('doctor imported torch')\n")
    p = subprocess.run([sys.executable, "-m", "flashvl_edge.main", "doctor", *args, "--json"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(poison)))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_doctor_machine_report(tmp_path):
    report = _doctor_json(tmp_path)["machine"]
    assert report["python"] == sys.version.split()[0]
    assert report["packages"]["onnxruntime"]
    ort_cpu, trt = report["backends"]["ort-cpu"], report["backends"]["trt"]
    assert ort_cpu[0] is True
    if not report["tensorrt"] or not report["gpus"]:
        assert trt[0] is False and trt[1]  # says what is missing


def test_doctor_budget_from_bundle_bytes(tmp_path, tiny_dynamic_bundle):
    report = _doctor_json(tmp_path, str(tiny_dynamic_bundle))["budget"]
    m = Bundle.load(tiny_dynamic_bundle).manifest
    inv = report["inventory"]
    # the inventory is the graphs' real initializers: fp32 bundle -> 4 bytes per parameter
    for g in ("vision", "llm"):
        assert inv[g]["bytes_on_disk"] == 4 * (inv[g]["matrix_params"] + inv[g]["other_params"])
        assert inv[g]["matrix_params"] > inv[g]["other_params"] > 0
    fp16, int8, int4 = (report["per_precision"][p] for p in ("fp16", "int8", "int4"))
    params = sum(inv[g]["matrix_params"] + inv[g]["other_params"] for g in ("vision", "llm"))
    assert fp16["weights"] == 2 * params
    assert fp16["weights"] > int8["weights"] > int4["weights"]
    llm = m["llm"]
    ctx = m["generation"]["max_context"]
    assert fp16["kv_cache"] == 2 * llm["num_layers"] * llm["num_kv_heads"] * llm["head_dim"] * ctx * 2 * 2
    assert fp16["total"] == fp16["weights"] + fp16["kv_cache"] + fp16["activations"] + fp16["cuda_reserve"]


def test_budget_table_marks_what_does_not_fit():
    row = {"weights": 7 << 30, "kv_cache": 0, "activations": 0, "cuda_reserve": 1 << 30, "total": 8 << 30}
    text = doctor.format_budget({"fp16": row}, 4096)
    cells = text.splitlines()[2].split()
    assert cells[cells.index("8.00") + 1] == "NO"  # 8 GiB does not fit an 8 GB Orin Nano ...
    assert cells[cells.index("8.00") + 3] == "fits"  # ... and fits a 16 GB Orin NX
