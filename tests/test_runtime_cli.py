"""``flashvl chat``: --json fields, streaming output, interactive turns from stdin, one-line errors (exit 2)."""

from __future__ import annotations

import io
import json

import pytest
import skimage.data
from PIL import Image

from flashvl_edge.main import main

FIELDS = ("text", "token_ids", "prompt_token_ids", "image_token_id", "n_image_tokens", "vision_s", "ttft_s",
          "decode_tokens_per_s")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "coffee.jpg"
    Image.fromarray(skimage.data.coffee()).save(path, quality=90)
    return str(path)


@pytest.mark.parametrize("which", ["tiny_static_bundle", "tiny_dynamic_bundle"])
def test_chat_json_prints_one_object_with_the_fields(which, request, photo, capsys):
    bundle = str(request.getfixturevalue(which))
    rc = main(["chat", bundle, "--image", photo, "--prompt", "Describe the image.", "--max-new-tokens", "6", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    obj = json.loads(out[0])
    assert all(k in obj for k in FIELDS)
    assert 1 <= len(obj["token_ids"]) <= 6 and obj["n_image_tokens"] > 0
    assert obj["prompt_token_ids"].count(obj["image_token_id"]) == obj["n_image_tokens"]


def test_chat_stream_prints_the_same_text(tiny_static_bundle, photo, capsys):
    args = ["chat", str(tiny_static_bundle), "--image", photo, "--prompt", "Hi", "--max-new-tokens", "8",
            "--temperature", "0.8", "--seed", "4"]
    assert main(args + ["--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert main(args + ["--stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out == text + "\n"
    assert "tokens/s" in captured.err  # metrics go to stderr


def test_interactive_session_from_stdin(tiny_static_bundle, photo, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Describe the image.\n\nAnd the colours?\n/exit\nignored\n"))
    rc = main(["chat", str(tiny_static_bundle), "--image", photo, "--max-new-tokens", "4", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["n_image_tokens"] > 0 and second["n_image_tokens"] == 0
    # the second turn continues the first conversation and prefills only its own tokens
    assert second["prompt_token_ids"][:len(first["prompt_token_ids"])] == first["prompt_token_ids"]
    assert second["prefill_tokens"] < len(second["prompt_token_ids"]) - len(first["prompt_token_ids"]) + 4


@pytest.mark.parametrize("extra, match", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "word " * 2100], "context"),
    (["--image", "/no/such/photo.jpg"], "photo.jpg"),
    (["--stream", "--json"], "--stream"),
])
def test_errors_are_one_line_and_exit_2(extra, match, tiny_static_bundle, capsys):
    args = ["chat", str(tiny_static_bundle), "--prompt", "Hello"] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flashvl: error:") and match in err[0]


def test_not_a_bundle_and_unknown_backend_exit_2(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--prompt", "x"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["chat", str(tmp_path), "--prompt", "x", "--backend", "onnx"])
    assert e.value.code == 2
