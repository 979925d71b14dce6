"""benchmarks/compare.py's batched comparison, the parts that run without the artifacts: the parser of
llama-batched-bench's table, the batch rows every contender gets, the llama.cpp command line and the
batched Markdown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from scripts import load_benchmark


def _load():
    return load_benchmark("compare")


compare = _load()

# llama-batched-bench's stdout on this VM (Q4_0 GGUF, -t 2 -tb 2 -npp 16 -ntg 4 -npl 1,8), with two of its
# stderr lines around it: the runner parses stdout and stderr together
REAL_OUTPUT = """\
0.00.402.422 W load: control-looking token: 128247 '</s>' was not control-type; this is probably a bug in the model. its type will be overridden

llama_batched_bench: n_kv_max = 2048, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    16 |      4 |    1 |     20 |    0.350 |    45.67 |    0.147 |    27.17 |    0.498 |    40.20 |
|    16 |      4 |    8 |    160 |    1.470 |    87.07 |    0.771 |    41.48 |    2.242 |    71.38 |

0.03.551.088 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 2048
"""


def test_parses_the_real_batched_bench_table():
    out = compare.parse_batched_bench(REAL_OUTPUT)
    assert out["settings"]["n_threads"] == 2 and out["settings"]["n_threads_batch"] == 2
    assert out["settings"]["is_pp_shared"] == 0 and out["settings"]["flash_attn"] == -1
    one, eight = out["rows"]
    assert one == {"pp": 16, "tg": 4, "rows": 1, "n_kv": 20, "prefill_s": 0.350, "prefill_tokens_per_s": 45.67,
                   "decode_s": 0.147, "decode_tokens_per_s": 27.17, "total_s": 0.498, "total_tokens_per_s": 40.20}
    assert eight["rows"] == 8 and eight["decode_tokens_per_s"] == 41.48 and eight["prefill_tokens_per_s"] == 87.07
    # S_TG is the aggregate over the rows: B * TG / T_TG, to the table's rounding
    assert eight["decode_tokens_per_s"] == pytest.approx(8 * 4 / 0.771, rel=1e-3)


def test_output_without_a_table_or_with_a_broken_row_is_refused():
    with pytest.raises(ValueError, match="no llama-batched-bench table"):
        compare.parse_batched_bench("error: unable to load model\n")
    header = REAL_OUTPUT.splitlines()[4:6]
    with pytest.raises(ValueError, match="does not match its header"):
        compare.parse_batched_bench("\n".join(header + ["|    16 |      4 |    8 |"]))


def test_batch_rows_differ_and_share_one_length():
    base = [1, 460, 459, 424, 202, 60, 285, 309, 260, 2, 202, 1, 365]
    rows = compare.batch_prompt_rows(base, 8, pad_id=0)
    assert len(rows) == 8 and {len(r) for r in rows} == {len(base)}
    assert len({tuple(r) for r in rows}) == 8 and rows[0] == base
    assert all(r[0] == base[0] and sorted(r) == sorted(base) for r in rows)


def test_batch_rows_refuse_what_a_contender_could_not_take():
    with pytest.raises(SystemExit, match="pad token"):
        compare.batch_prompt_rows([1, 5, 0, 7, 9], 2, pad_id=0)
    with pytest.raises(SystemExit, match="more than 8 tokens"):
        compare.batch_prompt_rows([1, 2, 3], 8)
    with pytest.raises(SystemExit, match="repeats itself"):
        compare.batch_prompt_rows([1] + [5, 6] * 4, 4)


def test_llama_command_matches_our_rows_and_steps():
    bench = compare.LlamaBatchedBench("llamacpp-q4_0", Path("bin/llama-batched-bench"), Path("m.gguf"), 2, "auto")
    cmd = bench.command(prompt_len=283, new_tokens=32, rows=8)
    opt = {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("-")}
    assert opt["-npp"] == "283" and opt["-ntg"] == "31" and opt["-npl"] == "1,8"  # decode steps = new - 1
    assert opt["-t"] == opt["-tb"] == "2" and opt["-fa"] == "auto"
    assert int(opt["-c"]) >= 8 * (283 + 31)
    assert "-pps" not in cmd  # every row its own prompt, as ours


def test_batched_only_report_has_its_own_default_path():
    ns = argparse.Namespace(out=None, work="w", batched_only=True)
    assert compare.report_path(ns) == Path("w/compare-batched.json")
    assert compare.report_path(argparse.Namespace(out=None, work="w", batched_only=False)) == Path("w/compare.json")


def test_markdown_of_a_batched_only_report(tmp_path, capsys):
    row = {"prefill_s": 10.0, "prefill_tokens_per_s": 200.0, "decode_tokens_per_s": 70.0, "step_ms": 114.3}
    report = {"machine": {"cpu": "AMD EPYC", "onnxruntime": "1.32.0"},
              "settings": {"reps": 2, "warmup": 1},
              "batched": {"rows": 8, "prompt_tokens": 283, "new_tokens": 32, "decode_steps": 31, "threads": 2,
                          "llamacpp_flash_attn": "auto",
                          "summary": {"ours-q": row, "llamacpp-q4_0": {**row, "decode_tokens_per_s": 50.0}},
                          "ratios": {"batched_decode_int4_vs_llamacpp_q4_0": 1.4,
                                     "batched_prefill_int4_vs_llamacpp_q4_0": 1.0},
                          "ratios_per_rep": {"batched_decode_int4_vs_llamacpp_q4_0": [1.3, 1.5],
                                             "batched_prefill_int4_vs_llamacpp_q4_0": [1.0, 1.0]},
                          "targets": {"batched_decode_int4_vs_llamacpp_q4_0": {"target": ">= 1.0", "value": 1.4,
                                                                              "met": True}}}}
    path = tmp_path / "compare-batched.json"
    path.write_text(json.dumps(report))
    compare.markdown(argparse.Namespace(out=str(path), work=str(tmp_path), batched_only=True))
    out = capsys.readouterr().out
    assert "8 rows of 283 prompt tokens" in out and "without -pps" in out
    assert "| ours-q | 10.00 | 200.0 | 70.00 | 114.3 |" in out
    assert "| batched_decode_int4_vs_llamacpp_q4_0 | 1.400 | 1.300 / 1.500 | >= 1.0 | yes |" in out
