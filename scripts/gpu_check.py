"""``make gpu-check``: the ONNX Runtime CUDA numbers of the static presets, in one command.

For a machine with an NVIDIA GPU. Steps:

1. GPU present? ``nvidia-smi`` must list a GPU, else exit 2 with one line (before any venv is made).
2. A separate venv (``--venv``, default build/gpu-venv): torch==2.13.0 first (the export runs on the CPU;
   an unpinned torch pulls gigabytes of CUDA wheels), the project with its export and bench extras, then
   ``onnxruntime-gpu`` pinned to ORT_GPU_VERSION in place of the CPU ``onnxruntime`` (both ship the same
   ``onnxruntime`` package directory, so only one may be installed). The script then re-runs itself in
   that venv with ``--skip-venv``. Only the package index is used.
3. In that venv: CUDAExecutionProvider available? Else exit 2 with one line.
4. Export tiny-static and flashvl-2b-static at fp16 (the bundle measured on the GPU) and fp32 (the CPU
   reference), the exports in parallel.
5. Parity, per preset, through the runtime's own runners and Generator: the fp16 bundle on ``--device``
   against the fp32 bundle on the CPU: vision output relative error (same preprocessed photo), prefill
   logits relative error, teacher-forced top-1 agreement along the reference's greedy tokens, and greedy
   tokens agreement (a divergence passes only at a near tie, as ``flashvl verify --backends`` judges it).
6. Bench of the fp16 bundle on ``--device``: what ``flashvl bench`` measures (runtime/bench.py's
   ``measure_chat``), with the ONNX Runtime device chosen here since bench has no device option.
7. One JSON (``--out``/gpu_check.json) and a table on stdout. Exit 0 when every parity check passed, 1
   otherwise.

``--device cpu --skip-venv --tiny-only`` is the CPU dry run the tests use: every step but the CUDA
calls, on the tiny preset. Its JSON says ``"dry_run": true``; its numbers are not GPU results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# stdlib only at the top: the first run is by a bare python3, before the venv with numpy exists
ROOT = Path(__file__).resolve().parent.parent

# onnxruntime-gpu trails the CPU wheel on the index: the project resolves onnxruntime 1.32.0, the newest
# onnxruntime-gpu there is 1.31.1. The venv pins both to the same release so that the export-side
# ONNX Runtime and the measured one agree.
ORT_GPU_VERSION = "1.31.1"
TORCH_VERSION = "2.13.0"
PRESETS = ("tiny-static", "flashvl-2b-static")
# fp16 on the GPU vs fp32 on the CPU: relative L2 error limits and the greedy near-tie margin.
LIMITS = {"vision_rel_err": 2e-2, "logits_rel_err": 5e-2, "tie_margin": 0.05}
NO_GPU_EXIT = 2


def log(msg: str) -> None:
    print(f"gpu-check: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Is there a GPU?


def nvidia_smi() -> dict | None:
    """The first GPU nvidia-smi lists (name, driver, memory), or None without nvidia-smi or a GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or not lines:
        return None
    parts = [p.strip() for p in lines[0].split(",")]
    parts += [""] * (3 - len(parts))
    return {"name": parts[0], "driver": parts[1], "memory": parts[2], "count": len(lines)}


def ort_providers() -> list[str]:
    import onnxruntime

    if hasattr(onnxruntime, "preload_dlls"):
        # onnxruntime-gpu finds the CUDA/cuDNN libraries of pip's nvidia-* wheels only once preloaded
        try:
            onnxruntime.preload_dlls()
        except Exception:
            pass
    return list(onnxruntime.get_available_providers())


def no_gpu(reason: str) -> int:
    print(f"gpu-check: no NVIDIA GPU usable here ({reason}); nothing was measured", flush=True)
    return NO_GPU_EXIT


# --------------------------------------------------------------------------------------------
# The venv


def pip_steps(venv_python: str) -> list[list[str]]:
    pip = [venv_python, "-m", "pip", "install", "-q"]
    return [
        pip + [f"torch=={TORCH_VERSION}"],
        pip + ["-e", f"{ROOT}[export,bench]", f"onnxruntime=={ORT_GPU_VERSION}"],
        [venv_python, "-m", "pip", "uninstall", "-q", "-y", "onnxruntime"],
        # the [cuda,cudnn] extras bring the CUDA 12 runtime and cuDNN as pip wheels
        pip + [f"onnxruntime-gpu[cuda,cudnn]=={ORT_GPU_VERSION}"],
    ]


def venv_key() -> str:
    """What the venv was built from: a changed pyproject.toml or pin rebuilds it."""
    import hashlib

    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()
                          + f"{TORCH_VERSION} {ORT_GPU_VERSION}".encode()).hexdigest()


def make_venv(venv: Path) -> str | None:
    """The venv's python, installed as pip_steps says; None (after one line) when a step failed."""
    python = venv / "bin" / "python"
    stamp = venv / ".gpu-check-installed"
    key = venv_key()
    if stamp.exists() and stamp.read_text().strip() == key:
        return str(python)
    if not python.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for cmd in pip_steps(str(python)):
        log(" ".join(cmd[1:]))
        if subprocess.run(cmd).returncode != 0:
            print(f"gpu-check: '{' '.join(cmd[1:])}' failed (is the package index reachable? an environment "
                  f"with onnxruntime-gpu can be used as it is with --skip-venv)", flush=True)
            return None
    stamp.write_text(key + "\n")
    return str(python)


# --------------------------------------------------------------------------------------------
# Exports


def export_all(presets: list[str], bundles: Path, reuse: bool) -> dict:
    """Every (preset, dtype) bundle, exported in parallel subprocesses through ``flashvl export``."""
    jobs = [(p, d) for p in presets for d in ("fp16", "fp32")]
    # the cores shared among the full-size exports; the tiny ones take seconds beside them
    heavy = [j for j in jobs if not j[0].startswith("tiny")]
    threads = str(max(1, (os.cpu_count() or 1) // (len(heavy) or len(jobs))))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    running, times = [], {}
    for preset, dtype in jobs:
        out = bundles / f"{preset}-{dtype}"
        if reuse and (out / "manifest.json").exists():
            times[(preset, dtype)] = 0.0
            continue
        cmd = [sys.executable, "-m", "flashvl_edge.main", "export", preset, "--out", str(out), "--dtype", dtype,
               "--force", "--quiet"]
        log(f"export {preset} {dtype}")
        running.append(((preset, dtype), time.perf_counter(),
                        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    failed = []
    for key, t0, proc in running:
        _, err = proc.communicate()
        times[key] = time.perf_counter() - t0
        if proc.returncode != 0:
            failed.append(f"{key[0]} {key[1]}: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    if failed:
        raise RuntimeError("export failed: " + "; ".join(failed))
    return {p: {d: {"bundle": str(bundles / f"{p}-{d}"), "export_s": times[(p, d)]} for d in ("fp16", "fp32")}
            for p in presets}


# --------------------------------------------------------------------------------------------
# Parity


def rel_err(candidate, reference) -> float:
    import numpy as np

    a, b = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def session_providers(pipe) -> dict[str, list[str]]:
    """The providers each graph's ONNX Runtime session actually got, in priority order."""
    return {name: list(runner.session.get_providers()) for name, runner in (("vision", pipe.vision), ("llm", pipe.llm))}


def parity(fp16_bundle: str, fp32_bundle: str, device: str) -> dict:
    """fp16 on ``device`` vs fp32 on the CPU, through Pipeline, its runners and its Generator."""
    import numpy as np

    from flashvl_edge.export import verify_backends as vb
    from flashvl_edge.runtime import images
    from flashvl_edge.runtime.pipeline import Pipeline

    opts = dict(image_cache_bytes=0, kv_cache_bytes=0)
    with Pipeline.from_bundle(fp32_bundle, device="cpu", **opts) as ref, \
            Pipeline.from_bundle(fp16_bundle, device=device, **opts) as cand:
        pixels = images.preprocess(vb._test_image(), ref.bundle.manifest).pixel_values
        v_ref = ref._run_vision(pixels.astype(ref._vision_dtype()))
        v_cand = cand._run_vision(pixels.astype(cand._vision_dtype()))

        ref_tokens = vb.greedy_tokens(ref)
        cand_tokens = vb.greedy_tokens(cand)
        # both teacher-forced along the reference's tokens: row i = the logits choosing token i
        rows = {}
        for name, pipe in (("ref", ref), ("cand", cand)):
            inputs = pipe.prefill_inputs(vb.E2E_PROMPT, vb._test_image())
            gen = pipe.generator
            rows[name] = gen.teacher_forced(gen.llm.new_cache(), inputs.token_ids, inputs.image_embeds,
                                            inputs.image_mask, ref_tokens[:-1])
        div = next((i for i, (a, b) in enumerate(zip(ref_tokens, cand_tokens)) if a != b), None)
        same = div is None and len(ref_tokens) == len(cand_tokens)
        margin = None if same else vb.margin_at(ref, ref_tokens, div if div is not None else len(cand_tokens))
        providers = {"reference": session_providers(ref), "candidate": session_providers(cand)}

    per_pos = [rel_err(c, r) for c, r in zip(rows["cand"], rows["ref"])]
    res = {
        "providers": providers,
        "vision_rel_err": rel_err(v_cand, v_ref),
        "prefill_logits_rel_err": per_pos[0],
        "max_logits_rel_err": max(per_pos),
        "teacher_forced_top1_agreement": float(np.mean(np.argmax(rows["cand"], -1) == np.argmax(rows["ref"], -1))),
        "greedy_tokens": len(ref_tokens),
        "greedy_identical": same,
        "greedy_first_divergence": div,
        "greedy_agreement": (div if div is not None else min(len(ref_tokens), len(cand_tokens))) / len(ref_tokens),
        "reference_margin_at_divergence": margin,
    }
    # ONNX Runtime falls back to the CPU when the CUDA EP cannot start (a missing CUDA/cuDNN library):
    # a parity or speed number from such a session would not be a GPU number
    want = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    res["checks"] = {
        "candidate_on_device": all(ps[0] == want for ps in providers["candidate"].values()),
        "vision": res["vision_rel_err"] <= LIMITS["vision_rel_err"],
        "prefill_logits": res["prefill_logits_rel_err"] <= LIMITS["logits_rel_err"],
        "greedy": same or (margin is not None and margin < LIMITS["tie_margin"]),
    }
    res["passed"] = all(res["checks"].values())
    return res


# --------------------------------------------------------------------------------------------
# Bench


def bench(bundle_path: str, device: str, runs: int, warmup: int, new_tokens: int, prompt_len: int) -> dict:
    """``flashvl bench``'s measurement (runtime/bench.py) with the ONNX Runtime device set."""
    from tokenizers import Tokenizer

    from flashvl_edge.runtime import bench as b
    from flashvl_edge.runtime.bundle import Bundle
    from flashvl_edge.runtime.pipeline import Pipeline

    bundle = Bundle.load(bundle_path)
    image, image_desc = b.default_image()
    tokenizer = Tokenizer.from_file(str(bundle.path(bundle.manifest.tokenizer.file)))
    prompt = b.make_prompt(tokenizer, prompt_len)
    t0 = time.perf_counter()
    with Pipeline.from_bundle(bundle_path, device=device, image_cache_bytes=0, kv_cache_bytes=0) as pipe:
        load_s = time.perf_counter() - t0
        used = pipe.llm.device
        providers = session_providers(pipe)
        for _ in range(warmup):
            b.measure_chat(pipe, prompt, image, new_tokens)
        measured = [b.measure_chat(pipe, prompt, image, new_tokens) for _ in range(runs)]
    wbytes = b.weight_file_bytes(bundle)
    rss = b.peak_rss_bytes()
    return {
        "bundle": bundle_path, "bundle_name": Path(bundle_path).name, "backend": f"ort/{used}",
        "device": used, "session_providers": providers, "dtype": bundle.manifest.dtype,
        "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
                     "image": image_desc},
        "load_s": load_s, "prompt_tokens": measured[0]["prompt_tokens"],
        "n_image_tokens": measured[0]["n_image_tokens"], "tiles": measured[0]["tiles"],
        "runs": measured, "summary": b.summarize(measured), "weights": b.llm_bytes_per_token(bundle),
        "memory": {"peak_rss_bytes": rss, "weight_file_bytes": wbytes,
                   "peak_rss_over_weight_files": rss / wbytes if wbytes else None},
    }


# --------------------------------------------------------------------------------------------
# Output


def _med(report: dict, key: str):
    return (report["summary"].get(key) or {}).get("median")


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(result: dict) -> str:
    head = ("gpu-check (CPU DRY RUN: not a GPU result)" if result["dry_run"]
            else f"gpu-check on {(result['gpu'] or {}).get('name', '?')}")
    lines = [f"{head}: fp16 on {result['device']} vs fp32 on cpu, onnxruntime {result['onnxruntime']['version']}",
             f"{'preset':20s} {'vision rel':>10s} {'prefill rel':>11s} {'top-1 tf':>8s} {'greedy':>7s} "
             f"{'parity':>6s} {'vision/tile ms':>14s} {'TTFT ms':>9s} {'decode tok/s':>12s}"]
    for name, p in result["presets"].items():
        par, br = p["parity"], p["bench"]
        lines.append(
            f"{name:20s} {par['vision_rel_err']:>10.2e} {par['prefill_logits_rel_err']:>11.2e} "
            f"{par['teacher_forced_top1_agreement']:>8.2f} {par['greedy_agreement']:>7.2f} "
            f"{'PASS' if par['passed'] else 'FAIL':>6s} {_f(_scale(_med(br, 'vision_per_tile_s')), '.2f'):>14s} "
            f"{_f(_scale(_med(br, 'ttft_s')), '.1f'):>9s} {_f(_med(br, 'decode_tokens_per_s'), '.1f'):>12s}")
    lines.append(f"{'all parity checks':20s} {'PASS' if result['passed'] else 'FAIL'}")
    return "\n".join(lines)


def _scale(v):
    return None if v is None else 1e3 * v


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="device of the fp16 bundle (cpu: the CPU dry run the tests use, not a GPU result)")
    p.add_argument("--skip-venv", action="store_true", help="run in this interpreter, no separate venv")
    p.add_argument("--tiny-only", action="store_true", help="only the tiny-static preset")
    p.add_argument("--venv", default=str(ROOT / "build" / "gpu-venv"))
    p.add_argument("--out", default=str(ROOT / "build" / "gpu-check"), help="bundles and gpu_check.json go here")
    p.add_argument("--reuse-bundles", action="store_true", help="keep bundles already exported under --out")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    gpu = nvidia_smi()
    if args.device == "cuda" and gpu is None:
        return no_gpu("nvidia-smi is missing or lists no GPU")
    if not args.skip_venv:
        python = make_venv(Path(args.venv))
        if python is None:
            return 1
        return subprocess.run([python, str(Path(__file__).resolve()), "--skip-venv", *argv]).returncode

    import onnxruntime

    providers = ort_providers()
    if args.device == "cuda" and "CUDAExecutionProvider" not in providers:
        return no_gpu(f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider, only "
                      f"{', '.join(providers) or 'none'}")
    from flashvl_edge.runtime import bench as b

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presets = ["tiny-static"] if args.tiny_only else list(PRESETS)
    t0 = time.perf_counter()
    try:
        bundles = export_all(presets, out / "bundles", args.reuse_bundles)
    except RuntimeError as e:
        print(f"gpu-check: {e}", flush=True)
        return 1
    result = {
        "dry_run": args.device != "cuda",
        "note": ("CPU dry run: the fp16 bundle ran on the CPU, not on a GPU; not a GPU result"
                 if args.device != "cuda" else "fp16 bundle on the ONNX Runtime CUDA EP vs fp32 on the CPU EP"),
        "device": args.device,
        "command": [Path(sys.argv[0]).name, *argv],
        "gpu": gpu,
        "machine": b.machine_info(),
        "onnxruntime": {"version": onnxruntime.__version__, "providers": providers},
        "limits": LIMITS,
        "settings": {"runs": args.runs, "warmup": args.warmup, "new_tokens": args.new_tokens,
                     "prompt_len": args.prompt_len, "presets": presets},
        "presets": {},
    }
    for preset in presets:
        fp16, fp32 = bundles[preset]["fp16"]["bundle"], bundles[preset]["fp32"]["bundle"]
        log(f"parity {preset}")
        par = parity(fp16, fp32, args.device)
        log(f"bench {preset} fp16 on {args.device}")
        rep = bench(fp16, args.device, args.runs, args.warmup, args.new_tokens, args.prompt_len)
        result["presets"][preset] = {"bundles": bundles[preset], "parity": par, "bench": rep}
    result["passed"] = all(p["parity"]["passed"] for p in result["presets"].values())
    result["wall_s"] = time.perf_counter() - t0
    path = out / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for preset in presets:
        print(b.format_table(result["presets"][preset]["bench"]))
    print(format_table(result))
    print(f"wrote {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
