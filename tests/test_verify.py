"""Parity of the ONNX graphs (ONNX Runtime) with the PyTorch model, and ``flashvl verify``.

Every parity check here is also run against a deliberately broken ONNX side (KV cache dropped, image
ignored) and must fail there: a check that cannot fail proves nothing.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from broken import CacheDroppingRunner

from flashvl_edge.export.verify import PROMPT, THRESHOLDS, greedy_agreement, verify_against, vision_features_line
from flashvl_edge.main import main
from flashvl_edge.runtime.bundle import Bundle
from flashvl_edge.runtime.generate import Generator
from flashvl_edge.runtime.pipeline import Pipeline
from flashvl_edge.runtime.samples import test_photo


def checks(report) -> dict[str, object]:
    return {c.name: c for c in report.checks}


def assert_parity(report, steps=32):
    assert report.ok, report.lines()
    assert set(checks(report)) == {"vision", "llm", "greedy", "generate"}
    assert checks(report)["greedy"].detail == f"{steps}/{steps} tokens identical"
    assert "tie" not in checks(report)["generate"].detail
    assert len(report.ref_tokens) == len(report.ort_tokens) == steps
    assert report.ort_tokens == report.ref_tokens  # identical, not merely "agreeing up to a tie"


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_presets_match_pytorch(request, which):
    bundle = request.getfixturevalue(f"tiny_{which}_bundle")
    loaded = request.getfixturevalue(f"tiny_{which}_loaded")
    assert_parity(verify_against(bundle, loaded, greedy_steps=32))


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    from factories import make_internvl_checkpoint

    from flashvl_edge.export.families import load_model
    from flashvl_edge.export.onnx import export_bundle

    ckpt = make_internvl_checkpoint(tmp_path_factory.mktemp("internvl") / "ckpt", seed=1)
    loaded = load_model(str(ckpt))
    bundle = export_bundle(loaded, ckpt.parent / "bundle", progress=False)
    return ckpt, loaded, bundle


def test_internvl_directory_matches_pytorch(internvl):
    ckpt, loaded, bundle = internvl
    m = Bundle.load(bundle).manifest
    assert m.family == "internvl"
    report = verify_against(bundle, loaded, greedy_steps=32)
    assert_parity(report)
    # the InternVL prompt wraps the image tokens in its start/end tokens
    assert m.image.start_token and m.image.end_token


class CacheDroppingGenerator(Generator):
    """Broken on purpose: every decode step runs without the KV cache (as if it were not fed back)."""

    def __post_init__(self):
        super().__post_init__()
        self.llm = CacheDroppingRunner(self.llm)


class ImageIgnoringGenerator(Generator):
    """Broken on purpose: the image embeddings are never spliced in (image tokens keep their embedding)."""

    def embed(self, token_ids, image_embeds=None, image_mask=None):
        return super().embed(token_ids, None, [False] * len(token_ids))


def broken_pipeline(bundle, generator_cls) -> Pipeline:
    """The bundle opened as verify opens it, with its generator swapped for a broken one."""
    pipe = Pipeline.from_bundle(bundle, backend="ort", device="cpu")
    g = pipe.generator
    pipe.generator = generator_cls(**{f.name: getattr(g, f.name) for f in dataclasses.fields(g)})
    return pipe


def test_checks_fail_on_a_dropped_kv_cache(tiny_static_bundle, tiny_static_loaded):
    with broken_pipeline(tiny_static_bundle, CacheDroppingGenerator) as pipe:
        report = verify_against(tiny_static_bundle, tiny_static_loaded, pipeline=pipe)
    c = checks(report)
    assert c["vision"].ok  # untouched part still passes
    assert not c["llm"].ok and not c["greedy"].ok and not c["generate"].ok and not report.ok


def test_checks_fail_when_the_image_is_ignored(tiny_dynamic_bundle, tiny_dynamic_loaded):
    with broken_pipeline(tiny_dynamic_bundle, ImageIgnoringGenerator) as pipe:
        report = verify_against(tiny_dynamic_bundle, tiny_dynamic_loaded, pipeline=pipe)
    c = checks(report)
    assert not c["llm"].ok and not c["greedy"].ok and not report.ok


def test_verify_greedy_is_the_tokens_chat_generates(tiny_dynamic_bundle, tiny_dynamic_loaded):
    """One LLM path: what verify certifies is what ``flashvl chat`` runs, token for token."""
    with Pipeline.from_bundle(tiny_dynamic_bundle, backend="ort", device="cpu") as pipe:
        report = verify_against(tiny_dynamic_bundle, tiny_dynamic_loaded, greedy_steps=16, pipeline=pipe)
        chat = pipe.chat(PROMPT, image=test_photo(), max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert report.ok, report.lines()
    assert report.ort_tokens == chat.token_ids and len(chat.token_ids) == 16


def test_checks_fail_against_another_model(tiny_static_bundle):
    from flashvl_edge.export.families import build_preset

    report = verify_against(tiny_static_bundle, build_preset("tiny-static", seed=1), greedy_steps=8)
    assert not checks(report)["vision"].ok and not checks(report)["llm"].ok


def test_greedy_agreement_rules():
    assert greedy_agreement("g", [1, 2, 3], [1, 2, 3]).ok
    assert not greedy_agreement("g", [1, 2, 4], [1, 2, 3]).ok
    assert not greedy_agreement("g", [1, 2], [1, 2, 3]).ok
    # a divergence is excused only where the reference itself has a numerical tie at that step
    assert greedy_agreement("g", [1, 2, 4], [1, 2, 3], tie_gap=lambda step: step == 2).ok
    assert not greedy_agreement("g", [1, 5, 4], [1, 2, 3], tie_gap=lambda step: step == 2).ok
    assert THRESHOLDS["fp32"] == 1e-4


def test_fp16_bundle_passes_with_the_looser_threshold(tiny_static_fp16_bundle, tiny_static_loaded):
    bundle = tiny_static_fp16_bundle
    report = verify_against(bundle, tiny_static_loaded, greedy_steps=8)
    c = checks(report)
    assert c["vision"].ok and c["llm"].ok, report.lines()
    # fp16 really is fp16: the error is well above fp32 round-off
    assert "fp16" == Bundle.load(bundle).manifest.dtype
    assert float(c["llm"].detail.split("= ")[1].split(" ")[0]) > 1e-5


# --------------------------------------------------------------------------------------------
# The CLI


def test_cli_verify_against_preset(tiny_static_bundle, capsys):
    rc = main(["verify", str(tiny_static_bundle), "--against", "tiny-static", "--integrity", "--steps", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("integrity", "vision", "llm", "greedy", "generate"):
        assert f"PASS  {name}" in out
    assert vision_features_line(Bundle.load(tiny_static_bundle).manifest) in out  # the convention used
    assert "of output scale" in out and "8/8 tokens identical" in out


def test_vision_features_line_names_the_convention(tiny_static_bundle):
    m = Bundle.load(tiny_static_bundle).manifest
    line = lambda layer: vision_features_line(  # noqa: E731
        m.replace(vision=dataclasses.replace(m.vision, vision_feature_layer=layer)))
    assert line(-1).startswith("vision features: last_hidden_state (vision_feature_layer -1")
    assert "final norm included" in line(-1)
    assert line(3) == "vision features: hidden_states[3] (no final norm)"
    assert line(-2) == "vision features: hidden_states[-2] (no final norm)"


def test_cli_verify_wrong_seed_exits_nonzero(tiny_static_bundle, capsys):
    rc = main(["verify", str(tiny_static_bundle), "--against", "tiny-static", "--seed", "1", "--steps", "4"])
    out = capsys.readouterr().out
    assert rc != 0 and "FAIL" in out and "verify: FAILED" in out


def test_cli_verify_integrity_detects_tampering(tiny_static_bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(tiny_static_bundle, copy)
    table = copy / "embed_tokens.npy"
    data = bytearray(table.read_bytes())
    data[-1] ^= 0xFF
    table.write_bytes(bytes(data))
    rc = main(["verify", str(copy), "--integrity"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "embed_tokens.npy" in err


def test_cli_verify_needs_something_to_do(tiny_static_bundle, tmp_path, capsys):
    assert main(["verify", str(tiny_static_bundle)]) == 2
    assert main(["verify", str(tmp_path / "missing"), "--integrity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("flashvl: error:") for line in err)
