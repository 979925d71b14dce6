"""The typed bundle contract: one parse validates everything, JSON round-trips, old schemas are refused."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from factories import as_manifest, manifest_json
from flashvl_edge.runtime import contract as C
from flashvl_edge.runtime.bundle import Bundle
from flashvl_edge.runtime.errors import BundleError


def test_exported_manifest_round_trips(tiny_static_bundle):
    data = json.loads((tiny_static_bundle / "manifest.json").read_text())
    m = C.Manifest.from_json(data)
    assert m.to_json() == data
    assert m.schema_version == C.SCHEMA_VERSION == 2
    # typed attributes, not dict keys
    assert isinstance(m.llm, C.LLMSpec) and isinstance(m.graph("llm"), C.GraphSpec)
    assert m.max_context == m.generation.max_context
    assert [t.name for t in m.graph("llm").past_inputs] == C.past_names(m.llm.num_layers)


def test_empty_past_and_feed_follow_the_declared_inputs():
    m = as_manifest({})
    past = m.empty_past(batch=3)
    assert list(past) == C.past_names(m.llm.num_layers)
    assert all(a.shape == (3, m.llm.num_kv_heads, 0, m.llm.head_dim) and a.dtype == np.float32 for a in past.values())
    feed = m.llm_feed(np.zeros((1, 5, m.llm.hidden_size), np.float32))
    assert set(feed) == set(m.graph("llm").io.input_names())
    assert feed["position_ids"].tolist() == [[0, 1, 2, 3, 4]] and feed["attention_mask"].shape == (1, 5)


def test_tile_rule_counts_the_thumbnail_once():
    tiles = as_manifest({"preprocess": {"mode": "tiles", "max_tiles": 4, "use_thumbnail": True,
                                        "do_center_crop": False}})
    assert tiles.preprocess.vision_batch() == 5          # 4 crop tiles + the thumbnail
    assert tiles.preprocess.vision_batch(1) == 1          # one tile: no thumbnail
    assert as_manifest({}).preprocess.vision_batch() == 1  # clip: one image


@pytest.mark.parametrize("version", [1, 3, None, "2"])
def test_other_schema_versions_are_refused_with_one_line(version):
    data = manifest_json()
    data["schema_version"] = version
    with pytest.raises(BundleError) as ei:
        C.Manifest.from_json(data)
    msg = str(ei.value)
    assert "\n" not in msg and "schema version" in msg and "re-export" in msg


def test_a_version_1_bundle_is_refused_by_the_cli(tmp_path, tiny_static_bundle):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_static_bundle, old)
    data = json.loads((old / "manifest.json").read_text())
    data["schema_version"] = 1
    (old / "manifest.json").write_text(json.dumps(data))
    p = subprocess.run([sys.executable, "-m", "flashvl_edge.main", "chat", str(old), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "schema version 1" in lines[0] and "re-export" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("mutate,words", [
    (lambda m: m["llm"].update(num_layers="2"), ["llm.num_layers", "integer"]),
    (lambda m: m["llm"].update(num_kv_heads=3), ["num_kv_heads", "divide"]),
    (lambda m: m["vision"].update(tokens_per_side=5), ["tokens_per_tile", "squared"]),
    (lambda m: m["image"].update(tokens_per_tile=9), ["image.tokens_per_tile", "vision.tokens_per_tile"]),
    (lambda m: m["image"].update(image_token_id=99999), ["image_token_id", "vocabulary"]),
    (lambda m: m["generation"].update(max_context=1 << 20), ["max_context", "max_position_embeddings"]),
    (lambda m: m["generation"].update(eos_token_ids=[-1]), ["eos_token_ids"]),
    (lambda m: m["preprocess"].update(image_std=[0.5, 0.0, 0.5]), ["image_std", "> 0"]),
    (lambda m: m["preprocess"].update(min_tiles=3), ["min_tiles", "max_tiles"]),
    (lambda m: m["preprocess"].update(resample="cubic-ish"), ["resample"]),
    (lambda m: m.update(dtype="bf16"), ["dtype"]),
    (lambda m: m["embeddings"].update(shape=[10, 64]), ["embeddings.shape"]),
    (lambda m: m["graphs"]["llm"].update(file="../elsewhere.onnx"), ["graphs.llm.file", "inside the bundle"]),
    (lambda m: m["graphs"]["llm"]["inputs"].pop(), ["graphs.llm.inputs"]),
    (lambda m: m["graphs"]["vision"]["outputs"][0].update(shape=["num_tiles", 15, 64]), ["graphs.vision.outputs"]),
    (lambda m: m.pop("chat_template"), ["chat_template"]),
    (lambda m: m.pop("iss"), ["iss"]),
    (lambda m: m["files"].update({"x": {"size": 1, "sha256": "00"}}), ["sha256"]),
])
def test_each_broken_field_is_named_in_one_line(mutate, words):
    data = copy.deepcopy(manifest_json())
    mutate(data)
    with pytest.raises(BundleError) as ei:
        C.Manifest.from_json(data, require_files=False)
    msg = str(ei.value)
    assert "\n" not in msg and "re-export" in msg or "refusing" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_named_file_must_be_recorded(tiny_static_bundle):
    data = json.loads((tiny_static_bundle / "manifest.json").read_text())
    del data["files"]["llm.onnx"]
    with pytest.raises(BundleError, match="graphs.llm.*'llm.onnx'.*files"):
        C.Manifest.from_json(data)


def test_bundle_load_gives_the_typed_manifest(tiny_dynamic_bundle):
    b = Bundle.load(tiny_dynamic_bundle)
    assert isinstance(b.manifest, C.Manifest)
    assert b.manifest.iss.enabled and b.manifest.preprocess.mode == "tiles"
    assert b.graph_path("vision").name == b.manifest.graph("vision").file
