"""Session fixtures everyone's tests share: the tiny presets (seed 0) and their exported bundles.

Each bundle is exported once per test session (a few seconds each) into a session temp dir. Tests must
not modify them: copy a bundle first (``shutil.copytree``) when a test needs to change files.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_verified_cache(tmp_path_factory):
    """Keep the bundle hash cache out of the user's ~/.cache for the whole session."""
    old = os.environ.get("FLASHVL_CACHE_DIR")
    os.environ["FLASHVL_CACHE_DIR"] = str(tmp_path_factory.mktemp("flashvl-cache"))
    yield
    if old is None:
        os.environ.pop("FLASHVL_CACHE_DIR", None)
    else:
        os.environ["FLASHVL_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_static_loaded():
    from flashvl_edge.export.families import build_preset

    return build_preset("tiny-static", seed=0)


@pytest.fixture(scope="session")
def tiny_dynamic_loaded():
    from flashvl_edge.export.families import build_preset

    return build_preset("tiny-dynamic-iss", seed=0)


@pytest.fixture(scope="session")
def tiny_static_bundle(tmp_path_factory, tiny_static_loaded):
    from flashvl_edge.export.onnx import export_bundle

    return export_bundle(tiny_static_loaded, tmp_path_factory.mktemp("bundles") / "tiny-static", progress=False)


@pytest.fixture(scope="session")
def tiny_dynamic_bundle(tmp_path_factory, tiny_dynamic_loaded):
    from flashvl_edge.export.onnx import export_bundle

    return export_bundle(tiny_dynamic_loaded, tmp_path_factory.mktemp("bundles") / "tiny-dynamic-iss", progress=False)


@pytest.fixture(scope="session")
def tiny_static_fp16_bundle(tmp_path_factory, tiny_static_loaded):
    from flashvl_edge.export.onnx import export_bundle

    return export_bundle(tiny_static_loaded, tmp_path_factory.mktemp("bundles") / "tiny-static-fp16", dtype="fp16",
                         progress=False)


@pytest.fixture(scope="session")
def photo_file(tmp_path_factory):
    """The real test photo (scikit-image's astronaut, 512x512 RGB) as a PNG file, made once per session."""
    from flashvl_edge.runtime.samples import test_photo

    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    test_photo("astronaut").save(path)
    return path


@pytest.fixture
def pixel_decodes(monkeypatch):
    """Every pixel decode Pillow starts (``ImageFile.load``), as the image sizes decoded.

    "Refused before decoding" is then a fact a test can assert (the list stays empty), instead of a
    wall-clock threshold that a loaded machine could break."""
    from PIL import ImageFile

    calls = []
    real = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


@pytest.fixture(scope="module")
def pipes(tiny_static_bundle, tiny_dynamic_bundle):
    """Both tiny bundles loaded without reuse across requests: tests that count what each turn runs
    (vision graph calls, prefill lengths) need every request to do its own work (tests/test_cache.py
    covers reuse)."""
    from flashvl_edge.runtime.pipeline import Pipeline

    off = dict(image_cache_bytes=0, kv_cache_bytes=0)
    loaded = {"static": Pipeline.from_bundle(tiny_static_bundle, **off),
              "dynamic": Pipeline.from_bundle(tiny_dynamic_bundle, **off)}
    yield loaded
    for p in loaded.values():
        p.close()
