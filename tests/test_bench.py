"""``flashvl bench`` on the tiny bundles: the report's fields, its internal consistency, the plot.

No timing thresholds (machines are noisy): the checks are about *what* is measured — the right
number of graph runs, intervals that add up, weight bytes that match the graph's initializers.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from flashvl_edge.main import main
from flashvl_edge.runtime import bench
from flashvl_edge.runtime.bundle import Bundle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_out(tiny_static_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", str(tiny_static_bundle), "--runs", "2", "--warmup", "1", "--new-tokens", "6",
               "--prompt-len", "12", "--out", str(out)])
    assert rc == 0
    return out


def test_bench_writes_json_with_every_field_and_a_png(bench_out):
    report = json.loads((bench_out / "bench.json").read_text())
    for key in ("bundle", "backend", "machine", "settings", "prompt_tokens", "n_image_tokens", "tiles",
                "runs", "summary", "weights", "memory", "plot"):
        assert key in report, key
    assert report["plot"] == "bench.png"
    assert (bench_out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert len(report["runs"]) == 2
    s = report["summary"]
    for key in ("vision_per_tile_s", "ttft_s", "decode_tokens_per_s", "overhead_ms_per_token"):
        assert s[key] is not None and s[key]["min"] <= s[key]["median"] <= s[key]["max"], key
    assert report["memory"]["peak_rss_bytes"] > report["memory"]["weight_file_bytes"] > 0
    assert report["weights"]["bytes_per_token"] > 0


def test_bench_runs_are_consistent(bench_out):
    report = json.loads((bench_out / "bench.json").read_text())
    for run in report["runs"]:
        # EOS ignored: exactly --new-tokens tokens; the first comes from the prefill, the last is not
        # fed back, so there are new_tokens - 2 decode intervals between consecutive decode runs
        assert run["new_tokens"] == 6
        assert len(run["decode_step_ms"]) == len(run["decode_graph_ms"]) == 4
        assert run["tiles"] == 1 and run["n_image_tokens"] == report["n_image_tokens"] > 0
        # a step's wall time contains its graph run; the overhead is exactly their mean difference
        assert all(w >= g > 0 for w, g in zip(run["decode_step_ms"], run["decode_graph_ms"]))
        diff = np.mean(np.subtract(run["decode_step_ms"], run["decode_graph_ms"]))
        assert run["overhead_ms_per_token"] == pytest.approx(diff)
        assert run["decode_tokens_per_s"] == pytest.approx(1e3 / np.mean(run["decode_step_ms"]))
        # the TTFT spans the vision run and the prefill run
        assert run["ttft_s"] >= run["vision_graph_s"] + run["prefill_graph_s"]
    # greedy: the runs decode the same tokens
    assert report["runs"][0]["token_ids"] == report["runs"][1]["token_ids"]


def test_bytes_per_token_matches_the_graph_initializers(tiny_static_bundle):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    b = Bundle.load(tiny_static_bundle)
    model = onnx.load(str(b.graph_path("llm")))
    expected = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    emb = np.load(b.path(b.manifest.embeddings.file), mmap_mode="r")
    w = bench.llm_bytes_per_token(b)
    assert w["llm_initializer_bytes"] == expected
    assert w["bytes_per_token"] == expected + emb.shape[1] * emb.dtype.itemsize
    # the LM head is in the graph: the weights are more than the embedding table's worth of one row
    assert w["llm_initializer_bytes"] >= emb.nbytes


def test_runner_timelines_record_the_real_graph_runs(tiny_static_bundle):
    from flashvl_edge.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(tiny_static_bundle) as pipe:
        img, _ = bench.default_image()
        vision_calls, llm_calls = pipe.vision.start_timeline(), pipe.llm.start_timeline()
        result = pipe.chat("What is this?", image=img, max_new_tokens=5, temperature=0.0, ignore_eos=True)
        assert [c.size for c in vision_calls] == [1]  # one tile
        # one prefill (all prompt tokens) + 4 decode runs of one token each, in order, each a real interval
        assert [c.size for c in llm_calls] == [len(result.prompt_token_ids)] + [1] * 4
        assert all(c.start < c.end for c in llm_calls)
        assert all(a.end <= b.start for a, b in zip(llm_calls, llm_calls[1:]))
        assert pipe.llm.last_inference_time() == pytest.approx(llm_calls[-1].end - llm_calls[-1].start)
        pipe.vision.stop_timeline()
        pipe.llm.stop_timeline()
        again = pipe.chat("What is this?", image=img, max_new_tokens=5, temperature=0.0, ignore_eos=True)
        assert again.token_ids == result.token_ids and len(llm_calls) == 5  # no longer recording


@pytest.mark.parametrize("vector_run", [True, False])
def test_last_inference_time_is_set_by_a_real_ort_run(tiny_static_bundle, vector_run, monkeypatch):
    """Runners time their own backend call (Polygraphy's ``last_inference_time``), on every ORT path."""
    from time import perf_counter

    from flashvl_edge.runtime.backends.ort import OrtDecoder, OrtRunner

    b = Bundle.load(tiny_static_bundle)
    with OrtRunner(b.graph_path("vision"), device="cpu") as vision:
        assert vision.last_inference_time() is None
        size = b.manifest.vision.image_size
        t0 = perf_counter()
        vision.infer({"pixel_values": np.zeros((2, 3, size, size), np.float32)})
        wall = perf_counter() - t0
        assert 0 < vision.last_inference_time() <= wall
    with OrtDecoder(b.graph_path("llm"), device="cpu") as llm:
        monkeypatch.setattr(llm, "use_vector_run", vector_run)
        calls = llm.start_timeline()
        cache = llm.new_cache()
        hidden = b.manifest.llm.hidden_size
        for seq in (7, 1):
            t0 = perf_counter()
            llm.forward(np.zeros((1, seq, hidden), llm.embeds_dtype), cache)
            wall = perf_counter() - t0
            assert 0 < llm.last_inference_time() <= wall
        assert [c.size for c in calls] == [7, 1]


def test_prompt_len_is_honoured(tiny_static_bundle):
    from tokenizers import Tokenizer

    b = Bundle.load(tiny_static_bundle)
    tok = Tokenizer.from_file(str(b.path(b.manifest.tokenizer.file)))
    for n in (1, 7, 40):
        prompt = bench.make_prompt(tok, n)
        assert abs(len(tok.encode(prompt, add_special_tokens=False).ids) - n) <= 1


def test_without_matplotlib_or_skimage_it_still_reports(tiny_static_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "skimage", None)
    img, desc = bench.default_image()
    assert "Pillow" in desc and img.size == (640, 480) and np.asarray(img).std() > 20
    rc = main(["bench", str(tiny_static_bundle), "--runs", "1", "--warmup", "0", "--new-tokens", "3",
               "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["plot"] is None and "matplotlib" in report["plot_note"]
    assert not (tmp_path / "bench.png").exists()
    assert "Pillow" in report["settings"]["image"]
    assert "no plot" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(tiny_static_bundle, tmp_path, capsys):
    assert main(["bench", str(tiny_static_bundle), "--runs", "0", "--out", str(tmp_path)]) == 2
    assert main(["bench", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("flashvl: error:") for line in err)


def test_bench_runs_where_torch_cannot_be_imported(tiny_static_bundle, tmp_path):
    """flashvl bench is part of the runtime: it must work on a device image without torch."""
    import os
    import subprocess
    import textwrap

    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers") or name.startswith(
                        ("flashvl_edge.export", "flashvl_edge.calibration")):
                    raise ImportError(name + " is blocked")
        sys.meta_path.insert(0, _Blocker())
    """))
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr
    p = subprocess.run([sys.executable, "-m", "flashvl_edge.main", "bench", str(tiny_static_bundle), "--runs", "1",
                        "--warmup", "0", "--new-tokens", "3", "--out", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["runs"][0]["new_tokens"] == 3
