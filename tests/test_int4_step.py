"""benchmarks/int4_step.py --accuracy on the tiny bundle: the calibration report's LLM metrics at each
MatMulNBits accuracy level. The session without a level key (the bundle's own report) is ONNX Runtime's
level 4, so the level-4 figures must be the report's; level 0 must be another kernel."""

from __future__ import annotations

import argparse
import json

from scripts import load_benchmark


def _load():
    return load_benchmark("int4_step")


def test_accuracy_levels_against_the_report(tiny_static_bundle, tmp_path):
    from flashvl_edge.main import main

    cache, q = tmp_path / "cache", tmp_path / "tiny-q"
    assert main(["calibrate", str(tiny_static_bundle), "--out", str(q), "--vision", "none", "--llm", "int4",
                 "--samples", "2", "--holdout", "1", "--report-tokens", "4", "--quiet",
                 "--cache-dir", str(cache)]) == 0
    mod = _load()
    args = argparse.Namespace(int4=str(q), fp32=str(tiny_static_bundle), levels="4,0", threads=1, samples=2,
                              holdout=1, report_tokens=4, cache_dir=str(cache))
    r = mod.accuracy(args)
    assert r["references"]["cache_hit"]  # the calibration run's references, not a new capture
    report = json.loads((q / "calibration_report.json").read_text())["llm"]
    l4, l0 = r["levels"]["level 4"], r["levels"]["level 0"]
    assert l4["session_config"] == {mod.LEVEL_KEY: "4"} and l0["session_config"] == {mod.LEVEL_KEY: "0"}
    for key in ("positions", "top1_agreement", "kl_mean", "kl_max", "logit_rel_rms_error", "greedy_agreement"):
        assert l4[key] == report[key], key
    between = r["between_levels"]["level 0 vs level 4"]
    assert between["positions"] == 4 and between["max_abs_diff"] > 0
    mod.print_accuracy(r)
