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


def test_budget_counts_the_kv_dtype_that_is_built(tiny_dynamic_bundle):
    """The KV budget is the dtype the engines have. flashvl build gives fp16 KV to fp16 and int8
    engines whatever the bundle's dtype; INT4 engines are strongly typed and keep the graph's (fp32 here).
    A built engine set's recorded KV dtype and limits replace the plan for its row."""
    from flashvl_edge.runtime.contract import EngineEntry, EngineLimits

    bundle = Bundle.load(tiny_dynamic_bundle)
    m = bundle.manifest
    llm = m.llm
    per_token = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * 2  # K+V, ping-pong copies
    assert doctor.planned_kv_dtypes(m) == {"fp16": "float16", "int8": "float16", "int4": "float32"}
    plan, _ = doctor.bundle_budget(bundle)
    assert plan["fp16"]["kv_cache"] == per_token * m.max_context * 2
    assert plan["int4"]["kv_cache"] == per_token * m.max_context * 4

    def built(kv_dtype):
        entry = EngineEntry(dir="engines/x/1", gpu="Orin", compute_capability="8.7", trt_version="10.3.0",
                            precision="fp16", strongly_typed=False, hardware_compatibility=None,
                            version_compatible=False, limits=EngineLimits(1, 100, 512, 2), graphs={},
                            kv_dtype=kv_dtype)
        return doctor.bundle_budget(bundle, engine=("orin_sm87_trt10.3.0", entry))[0]["fp16"]

    assert built("float16")["kv_cache"] == per_token * 512 * 2   # its context, not the manifest's
    assert built("float32")["kv_cache"] == per_token * 512 * 4   # an engine whose KV I/O stayed fp32
    assert built("float16")["activations"] == doctor.activation_bytes(m, m.preprocess.vision_batch(2), 100)


def test_budget_engine_prefers_the_set_that_runs_here():
    from factories import as_manifest
    from flashvl_edge.runtime.backends.trt import GpuInfo
    from flashvl_edge.runtime.contract import EngineEntry, EngineLimits

    def entry(gpu, cc, built_at):
        return EngineEntry(dir="engines/x/1", gpu=gpu, compute_capability=cc, trt_version="10.3.0", precision="fp16",
                           strongly_typed=False, hardware_compatibility=None, version_compatible=False,
                           limits=EngineLimits(1, 64, 128, 1), graphs={}, built_at=built_at)

    m = as_manifest({}).replace(engines={"a": entry("Orin", "8.7", "2025-01-01"),
                                         "b": entry("H100", "9.0", "2026-01-01")})
    assert doctor.budget_engine(m, GpuInfo("Orin", "8.7", 8 << 30, True), "10.3.0")[0] == "a"
    assert doctor.budget_engine(m, None, None)[0] == "b"  # nothing runs here: the newest
    assert doctor.budget_engine(as_manifest({}), None, None) is None


def test_jetson_dockerfile_takes_onnxruntime_gpu_from_the_l4t_index_only():
    """The ONNX Runtime GPU wheel's index is chosen per L4T tag (JetPack 6.0 / r36.3 is CUDA 12.2,
    6.1-6.2 / r36.4 CUDA 12.6) and that one package is installed with --index-url (no other index is
    consulted) and --no-deps; an unknown tag stops the build."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docker" / "Dockerfile.jetson").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    run = " ".join(code.replace("\\\n", " ").split())
    assert re.search(r"r36\.3\*\) index=https://pypi\.jetson-ai-lab\.io/jp6/cu122 ;;", run)
    assert re.search(r"r36\.4\*\) index=https://pypi\.jetson-ai-lab\.io/jp6/cu126 ;;", run)
    assert re.search(r'\*\) echo "no onnxruntime-gpu index known for L4T \$\{L4T_TAG\}.*exit 1', run)
    steps = re.split(r" (?=(?:RUN|WORKDIR|COPY|ENV|ARG|FROM|ENTRYPOINT|CMD) )", run)  # one instruction each
    installs = [i.strip() for step in steps for i in re.findall(r"pip install ([^;&]*)", step)]
    ort = [i for i in installs if "onnxruntime-gpu" in i]
    assert ort == ['--no-deps --index-url "$index" onnxruntime-gpu']
    assert "--extra-index-url" not in text
    assert not any("onnxruntime" in i for i in installs if i not in ort)  # no other line pulls an ORT wheel
    assert '"polygraphy>=0.53,<0.54"' in run  # as pyproject's tensorrt extra
    assert "CUDAExecutionProvider" in run and "! python3 -m pip show onnxruntime" in run
