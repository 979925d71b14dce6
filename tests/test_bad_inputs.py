"""The bad-input corpus: every nasty input a user can hand us, generated here (no binaries).

Each case asserts the exact error class from the API, a one-line message that says what is wrong (and
what to do), and from the CLI exit code 2 with no traceback unless ``--debug``. Inputs that look nasty but
are legitimate (1x1 and 1x10000 images; grayscale, LA, P, CMYK, I;16 images) must WORK, with pixel values
converted correctly. A few cases run ``python -m flashvl_edge.main`` in a real subprocess to prove the exit
code and the absence of a traceback end to end; the rest call ``main([...])`` in-process.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flashvl_edge.main import main
from flashvl_edge.runtime.errors import (
    BackendError,
    BundleError,
    CalibrationError,
    CheckpointError,
    EngineMismatchError,
    ExportError,
    FlashVLError,
    ImageError,
    IntegrityError,
    PromptError,
)

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]

# A "what to do" hint: every user error should tell the user how to get out of it, not only what broke.
ACTION = re.compile(
    r"\b(use|pass|re-?export|re-?run|choose|check|try|set|give|install|remove|convert|must|should|"
    r"expected|supported|allowed|limit|at (?:most|least)|between|need|needs|provide|add|shorten|reduce|"
    r"lower|raise|create|free|delete|re-?build|re-?save|replace|downscale|scale|make|valid|one of)\b",
    re.I,
)


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # The verified-file cache lives outside the bundle; keep the tests' entries out of the user's.
    monkeypatch.setenv("FLASHVL_CACHE_DIR", str(tmp_path / "flashvl-cache"))


def subprocess_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["FLASHVL_CACHE_DIR"] = str(tmp / "flashvl-cache")
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("PYTHONBREAKPOINT", None)
    return env


def run_cli(*argv, tmp: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m flashvl_edge.main ARGV`` in a fresh process."""
    return subprocess.run([PY, "-m", "flashvl_edge.main", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp, env=env or subprocess_env(tmp))


def error_line(stderr: str) -> str:
    """The single ``flashvl: error:`` line of a failed command (and proof that there is no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("flashvl: error:")]
    assert len(lines) == 1, f"expected exactly one error line, got:\n{stderr}"
    return lines[0]


def assert_user_error(rc: int, stderr: str, *needles: str, action: bool = True) -> str:
    """Exit code 2, one error line, no traceback; the line names what is wrong (``needles``)."""
    assert rc == 2, f"exit code {rc}, stderr:\n{stderr}"
    line = error_line(stderr)
    for n in needles:
        assert n.lower() in line.lower(), f"{n!r} not in {line!r}"
    if action:
        assert ACTION.search(line), f"the message does not say what to do: {line!r}"
    return line


def cli_in_process(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_error_class(capsys, cls, *argv) -> None:
    """Where only the CLI reaches a check: ``--debug`` prints the traceback, whose last line names the
    exact exception class (and the one error line still follows it)."""
    rc, _, err = cli_in_process(capsys, *argv, "--debug")
    assert rc == 2, err
    raised = [ln for ln in err.splitlines() if ln.startswith("flashvl_edge.")]
    assert raised and raised[-1].startswith(f"{cls.__module__}.{cls.__name__}:"), err[-1500:]


def assert_api_error(excinfo, cls, *needles: str, action: bool = True) -> str:
    """The exception is exactly ``cls`` (not a parent or a sibling) with a one-line message."""
    err = excinfo.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    assert msg and "\n" not in msg.strip(), f"not one line: {msg!r}"
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
    if action:
        assert ACTION.search(msg), f"the message does not say what to do: {msg!r}"
    return msg


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


# --- image files, crafted byte by byte ------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of zeros: ~100 kB on disk per 10^8 pixels (a decompression bomb)."""
    row = b"\0" * (1 + width)
    c = zlib.compressobj(9)
    data = b"".join(c.compress(row) for _ in range(height)) + c.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions but carries almost no pixel data.

    A loader that decodes before checking the pixel limit fails on it with a 'truncated' error (or hangs
    allocating); one that checks the header first refuses it for its size.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to claim ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def real_jpeg(size=(320, 240)) -> bytes:
    from skimage import data as skdata

    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def real_png(size=(320, 240)) -> bytes:
    from skimage import data as skdata

    buf = io.BytesIO()
    Image.fromarray(skdata.coffee()).resize(size).save(buf, "PNG")
    return buf.getvalue()


def write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


# Unreadable files: (name, bytes, a word the message must contain)
UNREADABLE = {
    "zero_byte.png": lambda: b"",
    "random_bytes.jpg": lambda: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "text_file.png": lambda: b"this is not an image, just some text\n" * 20,
    "json_file.json": lambda: json.dumps({"not": "an image"}).encode(),
    "truncated.jpg": lambda: real_jpeg()[: len(real_jpeg()) // 3],
    "truncated.png": lambda: real_png()[: len(real_png()) // 2],
    "corrupt_png_crc.png": lambda: _corrupt_middle(real_png()),
    "png_signature_only.png": lambda: b"\x89PNG\r\n\x1a\n",
}


def _corrupt_middle(data: bytes) -> bytes:
    b = bytearray(data)
    mid = len(b) // 2
    b[mid: mid + 64] = bytes(64)
    return bytes(b)


# --------------------------------------------------------------------------------------------
# images through the API


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_image_files_raise_image_error(tmp_path, name):
    from flashvl_edge.runtime.images import load_image

    path = write(tmp_path, name, UNREADABLE[name]())
    with pytest.raises(FlashVLError) as ei:
        load_image(path, max_pixels=50_000_000)
    assert_api_error(ei, ImageError, name)  # the message names the file


def _mutations(data: bytes, rng, n: int):
    """``n`` damaged copies of ``data``: flipped, deleted, inserted bytes, truncation."""
    for _ in range(n):
        d = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if not d:
                break
            i, op = rng.randrange(len(d)), rng.random()
            if op < 0.5:
                d[i] = rng.randrange(256)
            elif op < 0.7:
                del d[i:i + rng.randint(1, 64)]
            elif op < 0.85:
                d[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            else:
                del d[i:]
        yield bytes(d)


@pytest.mark.parametrize("fmt", [
    "PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "TGA", "PPM",
    "DDS",
])
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it skips over
def test_damaged_files_of_every_format_raise_only_image_error(fmt):
    """Random damage to valid files: each either decodes to RGB or raises ImageError, nothing else."""
    import random

    from flashvl_edge.runtime.images import load_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, fmt)
    rng = random.Random(fmt)
    for data in _mutations(buf.getvalue(), rng, 300):
        try:
            img = load_image(data, max_pixels=4_000_000)
        except ImageError:
            continue
        assert img.mode == "RGB" and img.width * img.height <= 4_000_000


def test_missing_image_file_raises_image_error(tmp_path):
    from flashvl_edge.runtime.images import load_image

    with pytest.raises(FlashVLError) as ei:
        load_image(tmp_path / "no-such-photo.jpg", max_pixels=50_000_000)
    assert_api_error(ei, ImageError, "no-such-photo.jpg")


def test_directory_as_image_raises_image_error(tmp_path):
    from flashvl_edge.runtime.images import load_image

    with pytest.raises(FlashVLError) as ei:
        load_image(tmp_path, max_pixels=50_000_000)
    assert_api_error(ei, ImageError)


@pytest.mark.parametrize("data,label", [
    (lambda: png_bomb(10_000, 10_000), "real 10^8-pixel PNG bomb"),
    (lambda: png_header_only(30_000, 30_000), "PNG header claiming 9*10^8 pixels"),
    (lambda: jpeg_claiming(40_000, 40_000), "JPEG frame claiming 1.6*10^9 pixels"),
])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, data, label, pixel_decodes):
    from flashvl_edge.runtime.images import load_image

    path = write(tmp_path, "bomb.png", data())
    with pytest.raises(FlashVLError) as ei:
        load_image(path, max_pixels=1_000_000)
    msg = assert_api_error(ei, ImageError)
    # refused for its size (so before decoding), not because decoding went wrong
    assert re.search(r"pixel|too large|limit", msg, re.I), msg
    assert pixel_decodes == [], f"{label}: Pillow started decoding {pixel_decodes} before the refusal"


def test_pixel_limit_is_configurable_and_allows_what_fits(tmp_path):
    from flashvl_edge.runtime.images import load_image

    path = write(tmp_path, "big.png", png_bomb(2000, 1000))  # 2 Mpx of zeros
    with pytest.raises(ImageError):
        load_image(path, max_pixels=1_999_999)
    img = load_image(path, max_pixels=2_000_000)
    assert img.mode == "RGB" and img.size == (2000, 1000)


@pytest.mark.parametrize("size", [(1, 1), (1, 10_000), (10_000, 1), (2, 3)])
def test_degenerate_sizes_work_through_preprocessing(size, tiny_static_bundle, tiny_dynamic_bundle):
    from flashvl_edge.runtime.bundle import Bundle
    from flashvl_edge.runtime.images import load_image, preprocess

    rng = np.random.default_rng(sum(size))
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = load_image(Image.fromarray(arr), max_pixels=50_000_000)
    assert img.size == size and img.mode == "RGB"
    for bundle_dir in (tiny_static_bundle, tiny_dynamic_bundle):
        manifest = Bundle.load(bundle_dir).manifest
        pre = preprocess(img, manifest)
        pv = pre.pixel_values
        s = manifest.preprocess.image_size
        assert pv.dtype == np.float32 and pv.ndim == 4 and pv.shape[1:] == (3, s, s), pv.shape
        assert 1 <= pv.shape[0] <= manifest.preprocess.vision_batch()  # crop tiles plus the thumbnail
        assert np.isfinite(pv).all()


def _mode_images():
    """(mode name, PIL image in that mode, the RGB an opaque pixel of it must become)."""
    out = []
    out.append(("L", Image.new("L", (40, 30), 77), (77, 77, 77)))
    out.append(("LA", Image.new("LA", (40, 30), (150, 255)), (150, 150, 150)))
    p = Image.new("P", (40, 30), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    out.append(("P", p, (255, 0, 0)))
    out.append(("1", Image.new("1", (40, 30), 1), (255, 255, 255)))
    out.append(("RGBA", Image.new("RGBA", (40, 30), (10, 200, 30, 255)), (10, 200, 30)))
    out.append(("CMYK", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), (255, 0, 0)))
    return out


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "in-memory"])
@pytest.mark.parametrize("mode", ["L", "LA", "P", "1", "RGBA", "CMYK"])
def test_image_modes_are_converted_to_rgb(tmp_path, mode, fmt):
    from flashvl_edge.runtime.images import load_image

    _, img, rgb = next(m for m in _mode_images() if m[0] == mode)
    if fmt == "in-memory":
        src = img
    else:
        if fmt == "PNG" and mode == "CMYK":
            fmt = "JPEG"  # PNG has no CMYK; JPEG does (Adobe inverted CMYK, Pillow handles it)
        src = tmp_path / f"img.{fmt.lower()}"
        img.save(src, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    out = load_image(src, max_pixels=50_000_000)
    assert out.mode == "RGB" and out.size == (40, 30)
    got = np.asarray(out)[15, 20].astype(int)
    assert np.abs(got - np.array(rgb)).max() <= 6, (mode, fmt, got, rgb)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """I;16 (16-bit PNG): a naive convert('RGB') clips everything above 255 to white."""
    from flashvl_edge.runtime.images import load_image

    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16)
    arr = np.tile(ramp, (8, 1))
    Image.fromarray(arr).save(tmp_path / "gray16.png")
    src = Image.open(tmp_path / "gray16.png")
    assert src.mode in ("I;16", "I;16B", "I")
    out = np.asarray(load_image(tmp_path / "gray16.png", max_pixels=50_000_000)).astype(int)
    assert out.shape == (8, 256, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    expected = np.round(ramp / 257.0)
    assert np.abs(out[0, :, 0] - expected).max() <= 1, out[0, ::32, 0]


@pytest.mark.parametrize("fmt,make,rgb", [
    ("GIF", lambda: _palette_frames(), (255, 0, 0)),  # animated: the first frame
    ("WEBP", lambda: Image.new("RGB", (20, 10), (10, 20, 30)), (10, 20, 30)),
    ("BMP", lambda: Image.new("RGB", (20, 10), (10, 20, 30)), (10, 20, 30)),
    ("TIFF", lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0)), (255, 0, 0)),
    ("TIFF", lambda: Image.fromarray(np.full((10, 20), 0.5, np.float32)), (128, 128, 128)),  # float grey in [0, 1]
], ids=["animated-gif", "webp", "bmp", "cmyk-tiff", "float-tiff"])
def test_other_formats_work(tmp_path, fmt, make, rgb):
    from flashvl_edge.runtime.images import load_image

    path = tmp_path / f"img.{fmt.lower()}"
    im = make()
    im.save(path, fmt, **({"save_all": True, "append_images": im.info.pop("frames")} if fmt == "GIF" else {}),
            **({"lossless": True} if fmt == "WEBP" else {}))
    out = load_image(path, max_pixels=50_000_000)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert np.abs(np.asarray(out)[5, 10].astype(int) - np.array(rgb)).max() <= 1


def _palette_frames() -> Image.Image:
    frames = []
    for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255)):
        f = Image.new("P", (20, 10), 0)
        f.putpalette(list(colour) + [0] * 765)
        frames.append(f)
    frames[0].info["frames"] = frames[1:]
    return frames[0]


def test_exif_orientation_is_applied(tmp_path):
    from flashvl_edge.runtime.images import load_image

    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rotated.jpg", "JPEG", exif=exif.tobytes())
    assert load_image(tmp_path / "rotated.jpg", max_pixels=50_000_000).size == (20, 40)


@pytest.mark.parametrize("name,data", [
    ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'),
    ("document.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"),
])
def test_formats_that_are_not_images(tmp_path, name, data):
    from flashvl_edge.runtime.images import load_image

    with pytest.raises(FlashVLError) as ei:
        load_image(write(tmp_path, name, data), max_pixels=50_000_000)
    assert_api_error(ei, ImageError, name)


# --------------------------------------------------------------------------------------------
# prompts and sampling through the API (one pipeline for the module)


@pytest.fixture(scope="module")
def static_pipeline(tiny_static_bundle):
    from flashvl_edge.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_static_bundle)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    p.write_bytes(real_jpeg((256, 256)))
    return p


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_prompt_is_refused(static_pipeline, prompt):
    with pytest.raises(FlashVLError) as ei:
        static_pipeline.chat(prompt, max_new_tokens=2)
    assert_api_error(ei, PromptError, "empty")


def test_over_long_prompt_is_refused(static_pipeline):
    max_context = static_pipeline.bundle.manifest.max_context
    prompt = "hello world " * (max_context * 2)
    with pytest.raises(FlashVLError) as ei:
        static_pipeline.chat(prompt, max_new_tokens=2)
    msg = assert_api_error(ei, PromptError)
    assert str(max_context) in msg, msg  # says what the limit is


def test_prompt_that_fits_alone_but_not_with_the_image(static_pipeline, photo_path):
    """The prompt fits the context by itself; with the image tokens it does not: refuse, do not truncate."""
    from tokenizers import Tokenizer

    m = static_pipeline.bundle.manifest
    max_context = m.max_context
    probe = static_pipeline.chat("hi", image=photo_path, max_new_tokens=1)
    n_img = probe.n_image_tokens
    overhead = len(probe.prompt_token_ids) - n_img
    assert n_img >= 8, "the tiny preset should have enough image tokens for this test"
    tok = Tokenizer.from_file(str(static_pipeline.bundle.path(m.tokenizer.file)))
    per_word = len(tok.encode(" hello" * 100, add_special_tokens=False).ids) / 100
    words = int((max_context - overhead - n_img // 2) / per_word)
    prompt = "hello" + " hello" * (words - 1)
    text_only = static_pipeline.chat(prompt, max_new_tokens=1)  # fits without the image
    assert len(text_only.prompt_token_ids) < max_context
    assert len(text_only.prompt_token_ids) + n_img > max_context
    with pytest.raises(FlashVLError) as ei:
        static_pipeline.chat(prompt, image=photo_path, max_new_tokens=1)
    msg = assert_api_error(ei, PromptError)
    assert str(max_context) in msg, msg


BAD_SAMPLING = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
]


@pytest.mark.parametrize("kwargs,name", BAD_SAMPLING, ids=[f"{k}={v}" for (d, _) in BAD_SAMPLING for k, v in d.items()])
def test_invalid_sampling_parameters_raise_prompt_error(static_pipeline, kwargs, name):
    sampling = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(FlashVLError) as ei:
        static_pipeline.chat("Describe the image.", **sampling)
    msg = assert_api_error(ei, PromptError)
    assert name.split("_")[-1] in msg.replace("-", "_"), msg
    # streaming validates too, before the first piece is yielded
    with pytest.raises(PromptError):
        next(iter(static_pipeline.stream("Describe the image.", **sampling)))


def test_unknown_sampling_parameter_name(static_pipeline):
    with pytest.raises(FlashVLError) as ei:
        static_pipeline.chat("Describe the image.", max_tokens=5)
    assert_api_error(ei, PromptError, "max_tokens", "max_new_tokens")


def test_pipeline_survives_bad_inputs(static_pipeline, photo_path, tmp_path):
    """After refusing bad inputs the same pipeline still answers (nothing half-done left in it)."""
    good = static_pipeline.chat("Describe the image.", image=photo_path, max_new_tokens=4)
    bad = write(tmp_path, "bad.jpg", UNREADABLE["truncated.jpg"]())
    with pytest.raises(ImageError):
        static_pipeline.chat("Describe the image.", image=bad, max_new_tokens=4)
    with pytest.raises(PromptError):
        static_pipeline.chat("Describe the image.", image=photo_path, temperature=-1)
    again = static_pipeline.chat("Describe the image.", image=photo_path, max_new_tokens=4)
    assert again.token_ids == good.token_ids


# --------------------------------------------------------------------------------------------
# the CLI: exit code 2, one line, no traceback


def test_cli_subprocess_chat_errors_end_to_end(tmp_path, tiny_static_bundle):
    """Real processes: exit code 2, one line, no traceback; --debug shows the traceback."""
    bad_img = write(tmp_path, "broken.jpg", UNREADABLE["truncated.jpg"]())
    r = run_cli("chat", tmp_path / "no-bundle-here", "--prompt", "hi", tmp=tmp_path)
    assert_user_error(r.returncode, r.stderr, "no-bundle-here", "does not exist")
    r = run_cli("chat", tiny_static_bundle, "--image", bad_img, "--prompt", "hi", tmp=tmp_path)
    assert_user_error(r.returncode, r.stderr, "broken.jpg")
    r = run_cli("chat", tiny_static_bundle, "--prompt", "hi", "--temperature", "-1", tmp=tmp_path)
    assert_user_error(r.returncode, r.stderr, "temperature")
    r = run_cli("chat", tiny_static_bundle, "--image", bad_img, "--prompt", "hi", "--debug", tmp=tmp_path)
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "ImageError" in r.stderr


def test_cli_subprocess_export_errors_end_to_end(tmp_path, tiny_static_bundle):
    r = run_cli("export", "no-such-preset", "--out", tmp_path / "b", tmp=tmp_path)
    assert_user_error(r.returncode, r.stderr, "no-such-preset")
    assert "tiny-static" in r.stderr  # lists the presets that do exist
    assert not (tmp_path / "b").exists()
    out = copy_bundle(tiny_static_bundle, tmp_path / "existing")
    before = (out / "manifest.json").read_bytes()
    r = run_cli("export", "tiny-static", "--out", out, tmp=tmp_path)
    assert_user_error(r.returncode, r.stderr, "--force")
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".flashvl-tmp-")) == []


def test_cli_prompt_with_invalid_utf8_bytes(tmp_path, tiny_static_bundle):
    """Bytes that are not UTF-8 on the command line arrive as surrogate escapes: one clear line."""
    r = subprocess.run([os.fsencode(PY), b"-m", b"flashvl_edge.main", b"chat", os.fsencode(tiny_static_bundle),
                        b"--prompt", b"caf\xe9 \xff\xfe", b"--max-new-tokens", b"2"],
                       capture_output=True, timeout=120, cwd=tmp_path, env=subprocess_env(tmp_path))
    assert_user_error(r.returncode, r.stderr.decode("utf-8", "replace"), "utf-8", action=False)


@pytest.mark.parametrize("flag,value", [
    ("--temperature", "-0.1"), ("--top-p", "0"), ("--top-p", "1.01"), ("--top-k", "-2"),
    ("--max-new-tokens", "0"), ("--max-new-tokens", "-1"),
])
def test_cli_invalid_sampling_flags(capsys, tiny_static_bundle, flag, value):
    rc, _, err = cli_in_process(capsys, "chat", tiny_static_bundle, "--prompt", "hi", flag, value)
    assert_user_error(rc, err, flag.lstrip("-").split("-")[-1])


def test_cli_chat_with_bomb_image(capsys, tmp_path, tiny_static_bundle, pixel_decodes):
    bomb = write(tmp_path, "huge.png", png_header_only(20_000, 20_000))
    rc, _, err = cli_in_process(capsys, "chat", tiny_static_bundle, "--image", bomb, "--prompt", "hi")
    assert_user_error(rc, err, "huge.png")
    assert pixel_decodes == []


def test_cli_chat_with_empty_prompt(capsys, tiny_static_bundle):
    rc, _, err = cli_in_process(capsys, "chat", tiny_static_bundle, "--prompt", "")
    assert_user_error(rc, err, "empty")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "I;16"])
def test_cli_chat_works_on_odd_image_modes(capsys, tmp_path, tiny_dynamic_bundle, mode):
    arr = np.random.default_rng(1).integers(0, 255, (37, 53), dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)
        path = tmp_path / "img.png"
    elif mode == "CMYK":
        img = Image.fromarray(np.stack([arr] * 4, -1), "CMYK")
        path = tmp_path / "img.jpg"
    else:
        img = Image.fromarray(arr).convert(mode)
        path = tmp_path / "img.png"
    img.save(path)
    rc, out, err = cli_in_process(capsys, "chat", tiny_dynamic_bundle, "--image", path, "--prompt",
                                  "What is this?", "--max-new-tokens", "3", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["n_image_tokens"] > 0 and len(result["token_ids"]) <= 3


# --- bundles --------------------------------------------------------------------------------


def _graph_file(root: Path, graph: str) -> str:
    return json.loads((root / "manifest.json").read_text())["graphs"][graph]["file"]


def test_bundle_with_a_missing_file(capsys, tmp_path, tiny_static_bundle):
    from flashvl_edge.runtime.pipeline import Pipeline

    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    emb = json.loads((root / "manifest.json").read_text())["embeddings"]["file"]
    (root / emb).unlink()
    with pytest.raises(FlashVLError) as ei:
        Pipeline.from_bundle(root)
    assert_api_error(ei, IntegrityError, emb, "missing")
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi")
    assert_user_error(rc, err, emb, "missing")


def test_bundle_with_a_truncated_graph(capsys, tmp_path, tiny_static_bundle):
    from flashvl_edge.runtime.pipeline import Pipeline

    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    name = _graph_file(root, "llm")
    size = (root / name).stat().st_size
    with open(root / name, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(FlashVLError) as ei:
        Pipeline.from_bundle(root)
    assert_api_error(ei, IntegrityError, name, "truncated")
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi")
    assert_user_error(rc, err, name)


def test_bundle_with_a_tampered_graph_same_size(capsys, tmp_path, tiny_static_bundle):
    from flashvl_edge.runtime.pipeline import Pipeline

    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    name = _graph_file(root, "vision")
    data = bytearray((root / name).read_bytes())
    st = (root / name).stat()
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the weights
    (root / name).write_bytes(bytes(data))
    os.utime(root / name, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    with pytest.raises(FlashVLError) as ei:
        Pipeline.from_bundle(root)
    assert_api_error(ei, IntegrityError, name, "sha256")
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi")
    assert_user_error(rc, err, name)
    rc, _, err = cli_in_process(capsys, "verify", root, "--integrity")
    assert_user_error(rc, err, name)


@pytest.mark.parametrize("version", [1, 3, 0, "2", None])
def test_manifest_from_an_unknown_schema_version(capsys, tmp_path, tiny_static_bundle, version):
    from flashvl_edge.runtime.pipeline import Pipeline

    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m.update(schema_version=version))
    with pytest.raises(FlashVLError) as ei:
        Pipeline.from_bundle(root)
    assert_api_error(ei, BundleError, "schema version", "re-export")
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi")
    assert_user_error(rc, err, "schema version", "re-export")


def test_manifest_that_is_not_json_or_lacks_sections(capsys, tmp_path, tiny_static_bundle):
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m.pop("graphs"))
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi")
    assert_user_error(rc, err, "graphs")
    (root / "manifest.json").write_bytes(b"\xff\xfe{garbage")
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi")
    assert_user_error(rc, err, "manifest.json")


def test_not_a_bundle(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = cli_in_process(capsys, "chat", tmp_path / "empty", "--prompt", "hi")
    assert_user_error(rc, err, "manifest.json")
    (tmp_path / "file.onnx").write_bytes(b"x")
    rc, _, err = cli_in_process(capsys, "chat", tmp_path / "file.onnx", "--prompt", "hi")
    assert_user_error(rc, err, "file.onnx", action=False)


@pytest.mark.parametrize("files", [
    ["vision.onnx"], {"vision.onnx": "oops"}, {"vision.onnx": {"size": 1}}, {"vision.onnx": {"size": "1", "sha256": 5}},
    "all of them",
], ids=["list", "entry-a-string", "no-sha256", "wrong-types", "a-string"])
def test_hand_edited_manifest_with_a_malformed_files_section(capsys, tmp_path, tiny_static_bundle, files):
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m.update(files=files))
    with pytest.raises(FlashVLError) as ei:
        from flashvl_edge.runtime.bundle import Bundle

        Bundle.load(root)
    assert_api_error(ei, BundleError, "files")
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi")
    assert_user_error(rc, err, "files")


@pytest.mark.parametrize("section", ["graphs", "llm", "image", "preprocess", "tokenizer"])
def test_hand_edited_manifest_with_a_section_of_the_wrong_type(capsys, tmp_path, tiny_static_bundle, section):
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m.update({section: "x"}))
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi", "--max-new-tokens", "2")
    assert_user_error(rc, err, section)


@pytest.mark.parametrize("field,value", [
    ("generation", "x"), ("generation.max_context", "big"), ("iss", "x"), ("embeddings", "x"),
    ("chat_template", 5),
], ids=["generation-a-string", "max_context-a-word", "iss-a-string", "embeddings-a-string", "template-a-number"])
def test_hand_edited_manifest_with_an_optional_section_of_the_wrong_type(capsys, tmp_path, tiny_static_bundle,
                                                                          field, value):
    """``field`` is a section, or ``section.key`` for one value inside an otherwise intact section."""
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")

    def edit(m):
        *path, key = field.split(".")
        target = m
        for part in path:
            target = target[part]
        target[key] = value
    rewrite_manifest(root, edit)
    rc, _, err = cli_in_process(capsys, "chat", root, "--prompt", "hi", "--max-new-tokens", "2")
    assert_user_error(rc, err, field, "re-export")  # names the field and what to do


def test_manifest_with_a_zero_image_std(capsys, tmp_path, tiny_static_bundle, photo_path):
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m["preprocess"].update(image_std=[0.5, 0.0, 0.5]))
    rc, _, err = cli_in_process(capsys, "chat", root, "--image", photo_path, "--prompt", "hi", "--max-new-tokens", "2")
    assert_user_error(rc, err, "image_std", action=False)


def _refinalize(root: Path, edit) -> None:
    """Change files and re-record them, as a careless tool would: sizes and sha256 are consistent."""
    from flashvl_edge.runtime.bundle import finalize_manifest
    from flashvl_edge.runtime.contract import Manifest

    m = json.loads((root / "manifest.json").read_text())
    edit(root, m)
    m.pop("files")
    finalize_manifest(root, Manifest.from_json(m, require_files=False))


@pytest.mark.parametrize("what", [
    "vision graph of another model", "vision graph in the llm slot",
    "embedding table with too few rows", "embedding table of another width",
])
def test_bundle_files_consistent_with_the_manifest_hashes_but_not_with_its_dims(capsys, tmp_path, tiny_static_bundle,
                                                                                 tiny_dynamic_bundle, photo_path, what):
    """Each file matches its sha256, but not the dims the manifest declares: refused with one line,
    at load or at the first chat, never a crash mid-generation."""
    from flashvl_edge.runtime.pipeline import Pipeline

    root = copy_bundle(tiny_static_bundle, tmp_path / "b")

    def edit(r, m):
        vision, llm, emb = m["graphs"]["vision"]["file"], m["graphs"]["llm"]["file"], m["embeddings"]["file"]
        if what == "vision graph of another model":  # the dynamic preset's tiles are another size
            shutil.copy(tiny_dynamic_bundle / vision, r / vision)
        elif what == "vision graph in the llm slot":
            shutil.copy(r / vision, r / llm)
        else:
            t = np.load(r / emb)
            np.save(r / emb, t[:10] if "rows" in what else np.ascontiguousarray(t[:, : t.shape[1] // 2]))
    _refinalize(root, edit)
    try:
        pipe = Pipeline.from_bundle(root)
        with pytest.raises(FlashVLError) as ei:
            pipe.chat("Describe the image.", image=photo_path, max_new_tokens=3)
    except FlashVLError as e:  # refused at load: better
        err = e
    else:
        err = ei.value
    assert isinstance(err, BundleError) or type(err).__name__ == "BackendError", repr(err)
    rc, _, stderr = cli_in_process(capsys, "chat", root, "--image", photo_path, "--prompt", "hi")
    assert_user_error(rc, stderr, action=False)


@pytest.mark.parametrize("template", [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for m in messages %}{{ m.content }",
    "{{ raise_exception('no system role') }}",
], ids=["huge-range", "sandbox-escape", "syntax-error", "raises"])
def test_hostile_chat_template_in_the_manifest(capsys, tmp_path, tiny_static_bundle, template):
    root = copy_bundle(tiny_static_bundle, tmp_path / "b")
    rewrite_manifest(root, lambda m: m.update(chat_template=template))
    rc, out, err = cli_in_process(capsys, "chat", root, "--prompt", "hi", "--max-new-tokens", "2")
    assert_user_error(rc, err, action=False)
    assert "Object" not in out  # the sandbox held: no class list printed


# --- engines --------------------------------------------------------------------------------


def test_engine_from_another_gpu_or_tensorrt_version():
    """The manifest records what each engine was built for; a mismatch is refused naming both sides."""
    from flashvl_edge.runtime.backends.trt import GpuInfo, select_engine

    from factories import as_manifest, manifest_json

    entry = {"dir": "engines/orin_sm87_trt10.3.0/1", "gpu": "Orin", "compute_capability": "8.7",
             "trt_version": "10.3.0", "precision": "fp16",
             "limits": {"max_batch": 1, "max_input_len": 64, "max_context": 128, "max_tiles": 1}, "graphs": {}}
    manifest = as_manifest(manifest_json({"engines": {"engines/orin_sm87_trt10.3.0": entry}}))
    orin = GpuInfo("Orin", "8.7", 8 << 30)
    assert select_engine(manifest, orin, "10.3.0")[0] == "engines/orin_sm87_trt10.3.0"  # the same: accepted
    with pytest.raises(FlashVLError) as ei:
        select_engine(manifest, GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 80 << 30), "10.3.0")
    assert_api_error(ei, EngineMismatchError, "Orin", "H100", "sm87", "sm90")
    with pytest.raises(FlashVLError) as ei:
        select_engine(manifest, orin, "8.6.2")
    assert_api_error(ei, EngineMismatchError, "10.3.0", "8.6.2")
    with pytest.raises(FlashVLError) as ei:
        select_engine(manifest, None, None)
    assert_api_error(ei, EngineMismatchError, "Orin", "no NVIDIA GPU", action=False)


def test_chat_with_trt_backend_without_tensorrt(capsys, tiny_static_bundle):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; this case is about machines without it")
    rc, _, err = cli_in_process(capsys, "chat", tiny_static_bundle, "--backend", "trt", "--prompt", "hi")
    assert_user_error(rc, err, "tensorrt")
    assert_cli_error_class(capsys, BackendError, "chat", tiny_static_bundle, "--backend", "trt", "--prompt", "hi")


# --- checkpoints and export -------------------------------------------------------------------


def _rewrite_safetensors(ckpt: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    files = sorted(ckpt.glob("*.safetensors"))
    assert files, f"no safetensors in {ckpt}"
    for f in files:
        sd = load_file(str(f))
        edit(sd, f)
        save_file(sd, str(f), metadata={"format": "pt"})
        break  # edit the first shard only


@pytest.fixture
def canonical_ckpt(tmp_path):
    from factories import make_canonical_checkpoint

    d = tmp_path / "ckpt"
    make_canonical_checkpoint(d, preset="tiny-static", seed=3)
    return d


def test_checkpoint_with_missing_keys(capsys, tmp_path, canonical_ckpt):
    from flashvl_edge.export.families import load_model

    dropped = []

    def drop(sd, _):
        for k in sorted(sd):
            if k.startswith("mlp1.") or k.endswith("layers.0.self_attn.q_proj.weight"):
                dropped.append(k)
                del sd[k]
    _rewrite_safetensors(canonical_ckpt, drop)
    assert dropped
    with pytest.raises(FlashVLError) as ei:
        load_model(str(canonical_ckpt))
    msg = assert_api_error(ei, CheckpointError, "missing")
    for k in dropped[:2]:
        assert k in msg, f"the error should name the missing key {k}: {msg}"
    rc, _, err = cli_in_process(capsys, "export", canonical_ckpt, "--out", tmp_path / "out")
    assert_user_error(rc, err, "missing")
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_extra_keys(capsys, tmp_path, canonical_ckpt):
    import torch
    from flashvl_edge.export.families import load_model

    def add(sd, _):
        sd["language_model.model.layers.99.mlp.up_proj.weight"] = torch.zeros(2, 2)
        sd["totally.unexpected"] = torch.zeros(1)
    _rewrite_safetensors(canonical_ckpt, add)
    with pytest.raises(FlashVLError) as ei:
        load_model(str(canonical_ckpt))
    msg = assert_api_error(ei, CheckpointError, "unexpected")
    assert "totally.unexpected" in msg
    rc, _, err = cli_in_process(capsys, "export", canonical_ckpt, "--out", tmp_path / "out")
    assert_user_error(rc, err, "unexpected")
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_a_wrongly_shaped_weight(tmp_path, canonical_ckpt):
    import torch
    from flashvl_edge.export.families import load_model

    def reshape(sd, _):
        k = next(k for k in sorted(sd) if k.startswith("mlp1.1.weight"))
        sd[k] = torch.zeros(sd[k].shape[0] + 1, sd[k].shape[1])
    _rewrite_safetensors(canonical_ckpt, reshape)
    with pytest.raises(FlashVLError) as ei:
        load_model(str(canonical_ckpt))
    assert_api_error(ei, CheckpointError, "mlp1.1.weight", "shape")


@pytest.mark.parametrize("model_type", ["llava", "not-a-model", ""])
def test_unsupported_model_type(capsys, tmp_path, canonical_ckpt, model_type):
    from flashvl_edge.export.families import load_model

    cfg = json.loads((canonical_ckpt / "config.json").read_text())
    cfg["model_type"] = model_type
    (canonical_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashVLError) as ei:
        load_model(str(canonical_ckpt))
    assert_api_error(ei, CheckpointError, "model_type")
    rc, _, err = cli_in_process(capsys, "export", canonical_ckpt, "--out", tmp_path / "out")
    assert_user_error(rc, err, "model_type")


def test_checkpoint_dir_without_config_or_weights(capsys, tmp_path, canonical_ckpt):
    from flashvl_edge.export.families import load_model

    (tmp_path / "empty-ckpt").mkdir()
    with pytest.raises(FlashVLError) as ei:
        load_model(str(tmp_path / "empty-ckpt"))
    assert_api_error(ei, CheckpointError, "config.json")
    (canonical_ckpt / "config.json").write_text("{broken json")
    with pytest.raises(FlashVLError) as ei:
        load_model(str(canonical_ckpt))
    assert_api_error(ei, CheckpointError, "config.json")
    rc, _, err = cli_in_process(capsys, "export", canonical_ckpt, "--out", tmp_path / "out")
    assert_user_error(rc, err, "config.json")


@pytest.mark.parametrize("layout", [
    "canonical",
    "internvl",
])
@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_checkpoint_with_unreadable_safetensors(capsys, tmp_path, layout, damage):
    from factories import make_canonical_checkpoint, make_internvl_checkpoint
    from flashvl_edge.export.families import load_model

    ckpt = tmp_path / "ckpt"
    if layout == "canonical":
        make_canonical_checkpoint(ckpt, preset="tiny-static", seed=2)
    else:
        make_internvl_checkpoint(ckpt, seed=2)
    f = sorted(ckpt.glob("*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:1000] if damage == "truncated" else b"")
    with pytest.raises(FlashVLError) as ei:
        load_model(str(ckpt))
    assert_api_error(ei, CheckpointError, f.name, action=False)
    rc, _, err = cli_in_process(capsys, "export", ckpt, "--out", tmp_path / "out")
    assert_user_error(rc, err, f.name, action=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("hidden_size", "abc"), ("num_hidden_layers", -1)])
def test_checkpoint_config_with_invalid_values(capsys, tmp_path, canonical_ckpt, field, value):
    from flashvl_edge.export.families import load_model

    cfg = json.loads((canonical_ckpt / "config.json").read_text())
    cfg["text_config"][field] = value
    (canonical_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashVLError) as ei:
        load_model(str(canonical_ckpt))
    assert_api_error(ei, CheckpointError, field, action=False)


def test_checkpoint_config_too_large_to_build(capsys, tmp_path, canonical_ckpt):
    from flashvl_edge.export.families import load_model

    cfg = json.loads((canonical_ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 10**13  # ~10^15 parameters
    (canonical_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashVLError) as ei:
        load_model(str(canonical_ckpt))
    assert_api_error(ei, CheckpointError, action=False)


def test_checkpoint_with_integer_weights(capsys, tmp_path, canonical_ckpt):
    import torch
    from flashvl_edge.export.families import load_model

    def to_int8(sd, _):
        for k in list(sd):
            if k.endswith("q_proj.weight"):
                sd[k] = sd[k].to(torch.int8)
    _rewrite_safetensors(canonical_ckpt, to_int8)
    with pytest.raises(FlashVLError) as ei:
        load_model(str(canonical_ckpt))
    assert_api_error(ei, CheckpointError, "q_proj.weight", "floating point", action=False)


def test_verify_against_a_different_model(capsys, tiny_static_bundle):
    rc, _, err = cli_in_process(capsys, "verify", tiny_static_bundle, "--against", "tiny-dynamic-iss")
    assert_user_error(rc, err, "not exported from")


def test_unknown_preset_api(tmp_path):
    from flashvl_edge.export.families import load_model

    with pytest.raises(FlashVLError) as ei:
        load_model("flashvl-7b-imaginary")
    assert_api_error(ei, CheckpointError, "flashvl-7b-imaginary")


def test_force_never_replaces_a_directory_that_is_not_a_bundle(capsys, tmp_path):
    """``--force`` replaces a previous bundle; a directory of other files (a typo for ``--out ~``) is kept."""
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.txt").write_text("years of work")
    rc, _, err = cli_in_process(capsys, "export", "tiny-static", "--out", home, "--force", "--quiet")
    assert_user_error(rc, err, "not a flashvl bundle")
    assert (home / "docs" / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".flashvl-tmp-")) == []


def test_force_does_not_replace_the_checkpoint_being_exported(capsys, tmp_path, canonical_ckpt):
    before = sorted(p.name for p in canonical_ckpt.iterdir())
    for out in (canonical_ckpt, tmp_path):  # the checkpoint itself, and the folder that holds it
        rc, _, err = cli_in_process(capsys, "export", canonical_ckpt, "--out", out, "--force", "--quiet")
        assert_user_error(rc, err, "not a flashvl bundle")
        assert sorted(p.name for p in canonical_ckpt.iterdir()) == before


def test_calibrate_force_never_replaces_a_directory_that_is_not_a_bundle(capsys, tmp_path, tiny_static_bundle):
    keep = tmp_path / "photos"
    keep.mkdir()
    (keep / "holiday.jpg").write_bytes(real_jpeg())
    rc, _, err = cli_in_process(capsys, "calibrate", tiny_static_bundle, "--out", keep, "--force", "--samples", "2",
                                "--cache-dir", tmp_path / "cache", "--quiet")
    assert_user_error(rc, err, "not a flashvl bundle")
    assert (keep / "holiday.jpg").exists()


def test_export_out_is_an_existing_file(capsys, tmp_path):
    (tmp_path / "out").write_text("keep me")
    rc, _, err = cli_in_process(capsys, "export", "tiny-static", "--out", tmp_path / "out")
    assert_user_error(rc, err, "out")
    assert_cli_error_class(capsys, ExportError, "export", "tiny-static", "--out", tmp_path / "out", "--force")
    assert (tmp_path / "out").read_text() == "keep me"


def _in_mount_namespace_available() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                       capture_output=True)
    return r.returncode == 0


TMPFS = _in_mount_namespace_available()
DISK_FULL = re.compile(r"space|disk|full|too large", re.I)


def assert_nothing_left(listing: str) -> None:
    assert listing.strip() == "LEFT:", f"half-written output left behind: {listing}"


@pytest.mark.skipif(not TMPFS, reason="cannot mount a small tmpfs here (needs unshare -rm); "
                    "test_disk_full_during_export_file_size_limit covers it")
@pytest.mark.parametrize("limit", [
    pytest.param("size=1m", id="too-small"),
    pytest.param("size=64m,nr_inodes=3", id="inodes-run-out-mid-write"),
])
def test_disk_full_during_export_small_tmpfs(tmp_path, limit):
    """A real ENOSPC. ``too-small``: export's free-space check refuses before writing. ``inodes-run-out``:
    the free-space check passes, then creating the second graph file fails half-way through the export."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o {limit} tmpfs {mnt} || exit 99; "
        f"{PY} -m flashvl_edge.main export tiny-static --out {mnt}/bundle; rc=$?; "
        f"echo LEFT:$(ls -A {mnt}) >&2; exit $rc"
    )
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=subprocess_env(tmp_path))
    assert r.returncode != 99, r.stderr
    stderr = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("LEFT:"))
    line = assert_user_error(r.returncode, stderr, action=False)
    assert_nothing_left([ln for ln in r.stderr.splitlines() if ln.startswith("LEFT:")][-1])
    assert DISK_FULL.search(line), line
    assert ACTION.search(line.replace("needed", "")), f"the message does not say what to do: {line!r}"


@pytest.mark.skipif(TMPFS, reason="covered by the tmpfs test (a real ENOSPC) on this machine")
def test_disk_full_during_export_file_size_limit(tmp_path):
    """Where no tmpfs can be mounted: a write that fails half-way (RLIMIT_FSIZE with SIGXFSZ ignored, so
    write() raises EFBIG like a full disk raises ENOSPC)."""
    import resource
    import signal

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the first graph does not fit

    r = subprocess.run([PY, "-m", "flashvl_edge.main", "export", "tiny-static", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env(tmp_path),
                       preexec_fn=limit_writes)
    line = assert_user_error(r.returncode, r.stderr, action=False)
    assert_nothing_left("LEFT:" + " ".join(p.name for p in tmp_path.iterdir() if p.name != "flashvl-cache"))
    assert DISK_FULL.search(line), line
    assert ACTION.search(line), f"the message does not say what to do: {line!r}"


# --- calibration ----------------------------------------------------------------------------


def test_calibrate_with_an_empty_images_folder(capsys, tmp_path, tiny_static_bundle):
    (tmp_path / "images").mkdir()
    argv = ["calibrate", tiny_static_bundle, "--out", tmp_path / "q", "--images", tmp_path / "images"]
    rc, _, err = cli_in_process(capsys, *argv)
    assert_user_error(rc, err, "images")
    assert_cli_error_class(capsys, CalibrationError, *argv)
    assert not (tmp_path / "q").exists()


def test_calibrate_with_a_folder_of_unreadable_images(capsys, tmp_path, tiny_static_bundle):
    d = tmp_path / "images"
    d.mkdir()
    for name in ("zero_byte.png", "text_file.png", "truncated.jpg"):
        write(d, name, UNREADABLE[name]())
    argv = ["calibrate", tiny_static_bundle, "--out", tmp_path / "q", "--images", d]
    rc, _, err = cli_in_process(capsys, *argv)
    assert_user_error(rc, err)
    assert_cli_error_class(capsys, CalibrationError, *argv)
    assert not (tmp_path / "q").exists()


def test_calibrate_with_a_missing_images_folder(capsys, tmp_path, tiny_static_bundle):
    argv = ["calibrate", tiny_static_bundle, "--out", tmp_path / "q", "--images", tmp_path / "nowhere"]
    rc, _, err = cli_in_process(capsys, *argv)
    assert_user_error(rc, err, "nowhere")
    assert_cli_error_class(capsys, CalibrationError, *argv)
    assert not (tmp_path / "q").exists()
