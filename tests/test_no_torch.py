"""The runtime runs where torch and transformers cannot be imported (a Jetson image without them).

Each check runs in a fresh interpreter whose ``sitecustomize`` installs a ``sys.meta_path`` finder
that makes ``import torch`` / ``import transformers`` (and the export/calibration packages, which
need them) raise ImportError. The first check proves the blocker works; the others chat for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import skimage.data
from PIL import Image

BLOCKED = ("torch", "transformers", "flashvl_edge.export", "flashvl_edge.calibration")

SITECUSTOMIZE = textwrap.dedent(f"""
    import sys

    BLOCKED = {BLOCKED!r}

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, _Blocker())
""")


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("no-torch")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    photo = d / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    env = dict(os.environ, PYTHONPATH=str(d) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env, str(photo)


def _run(env, args, stdin=None):
    return subprocess.run([sys.executable, *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_blocker_really_blocks(no_torch_env):
    env, _ = no_torch_env
    p = _run(env, ["-c", "import torch"])
    assert p.returncode != 0 and "blocked" in p.stderr
    p = _run(env, ["-c", "import transformers"])
    assert p.returncode != 0 and "blocked" in p.stderr


def test_python_api_chats_without_torch(no_torch_env, tiny_dynamic_bundle):
    env, photo = no_torch_env
    code = textwrap.dedent(f"""
        import json, sys
        import flashvl_edge.runtime as rt
        pipe = rt.Pipeline.from_bundle({str(tiny_dynamic_bundle)!r})
        chat = pipe.session()
        a = chat.ask("Describe the image.", image={photo!r}, max_new_tokens=5)
        b = chat.ask("And then?", max_new_tokens=5)
        pieces = list(pipe.stream("Hi", max_new_tokens=4))
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
               or m.startswith(("flashvl_edge.export", "flashvl_edge.calibration"))]
        print(json.dumps({{"a": a.to_dict(), "b": b.to_dict(), "pieces": pieces, "bad": bad}}))
    """)
    p = _run(env, ["-c", code])
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["bad"] == []
    assert out["a"]["n_image_tokens"] > 0 and len(out["a"]["token_ids"]) >= 1
    assert out["b"]["prompt_token_ids"][:len(out["a"]["prompt_token_ids"])] == out["a"]["prompt_token_ids"]


def test_cli_chats_without_torch(no_torch_env, tiny_static_bundle):
    env, photo = no_torch_env
    base = ["-m", "flashvl_edge.main", "chat", str(tiny_static_bundle), "--image", photo, "--max-new-tokens", "4"]
    p = _run(env, base + ["--prompt", "Describe the image.", "--json"])
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert obj["n_image_tokens"] == 16 and len(obj["token_ids"]) >= 1
    # interactive mode with stdin a pipe: one JSON object per question
    p = _run(env, base + ["--json"], stdin="Describe the image.\nWhat else?\n")
    assert p.returncode == 0, p.stderr
    assert len([json.loads(line) for line in p.stdout.splitlines()]) == 2
    # user errors are still one line and exit 2
    p = _run(env, base + ["--prompt", "x", "--top-k", "-2"])
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "top_k" in p.stderr


def test_the_server_imports_without_torch(no_torch_env, tiny_static_bundle):
    """The HTTP server (FastAPI, uvicorn, prometheus-client) on top of the runtime: no torch either."""
    pytest.importorskip("fastapi")
    env, _ = no_torch_env
    code = textwrap.dedent(f"""
        import json, sys
        from flashvl_edge.runtime import cli_serve, server
        from flashvl_edge.runtime.pipeline import Pipeline
        from flashvl_edge.runtime.scheduler import Scheduler
        pipe = Pipeline.from_bundle({str(tiny_static_bundle)!r}, device="cpu")
        app = server.create_app(Scheduler(pipe), pipe, server.ServeOptions(model_name="tiny"))
        cli_serve.make_server(app, 1.0)
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
               or m.startswith(("flashvl_edge.export", "flashvl_edge.calibration"))]
        print(json.dumps({{"bad": bad, "routes": sorted(r.path for r in app.routes)}}))
    """)
    p = _run(env, ["-c", code])
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["bad"] == []
    assert "/v1/chat/completions" in out["routes"] and "/health" in out["routes"]
