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
    llm = m.llm
    ctx = m.max_context
    assert fp16["kv_cache"] == 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * ctx * 2 * 2
    assert fp16["total"] == fp16["weights"] + fp16["kv_cache"] + fp16["activations"] + fp16["cuda_reserve"]


def test_budget_table_marks_what_does_not_fit():
    row = {"weights": 7 << 30, "kv_cache": 0, "activations": 0, "cuda_reserve": 1 << 30, "total": 8 << 30}
    text = doctor.format_budget({"fp16": row}, 4096)
    cells = text.splitlines()[2].split()
    assert cells[cells.index("8.00") + 1] == "NO"  # 8 GiB does not fit an 8 GB Orin Nano ...
    assert cells[cells.index("8.00") + 3] == "fits"  # ... and fits a 16 GB Orin NX


def test_budget_max_tiles_counts_crop_tiles(tiny_dynamic_bundle):
    """``max_tiles`` means crop tiles, as in the manifest: the vision batch adds the thumbnail."""
    bundle = Bundle.load(tiny_dynamic_bundle)
    m = bundle.manifest
    pre = m.preprocess
    assert pre.use_thumbnail and pre.max_tiles > 1
    default, inv = doctor.bundle_budget(bundle)
    assert doctor.budget(m, inv, max_tiles=pre.max_tiles) == default  # the default is the manifest's budget
    inp = min(m.max_context, pre.vision_batch() * m.image.tokens_per_tile + 256)
    assert default["fp16"]["activations"] == doctor.activation_bytes(m, pre.max_tiles + 1, inp)


def test_doctor_names_the_checkpoints_a_preset_stands_for():
    from flashvl_edge.export.families import preset_reference
    from flashvl_edge.runtime.contract import SourceSpec

    static = SourceSpec("flashvl-2b-static", "flashvl-2b-static", 0, preset_reference("flashvl-2b-static"))
    line = doctor.model_line(static)
    assert "Qwen/Qwen2-1.5B-Instruct" in line and "siglip2-so400m-patch16-512" in line and "random weights" in line
    dynamic = preset_reference("flashvl-2b-dynamic-iss")
    assert dynamic == {"llm": "Qwen/Qwen2-1.5B-Instruct", "vision": "apple/aimv2-huge-patch14-448"}
    assert doctor.model_line(SourceSpec("/ckpt/FlashVL-2B", None, None)) == "/ckpt/FlashVL-2B"
