"""Image decoding (modes, bad files, pixel limit) and preprocessing parity with transformers' PIL
image processors on real photos. The runtime never imports transformers; these dev tests do."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from factories import as_manifest, tiles_manifest
from flashvl_edge.runtime import images
from flashvl_edge.runtime.errors import BundleError, FlashVLError, ImageError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def photos():
    """Real photos, square and not, colour and greyscale, plus non-square crops of them."""
    return {
        "astronaut": data.astronaut(),                 # 512x512 RGB
        "coffee": data.coffee(),                       # 600x400 RGB
        "chelsea": data.chelsea(),                     # 451x300 RGB
        "text": data.text(),                           # 448x172 grey
        "page": data.page(),                           # 191x384 grey
        "astronaut_tall": data.astronaut()[:, 100:283],
        "coffee_wide": data.coffee()[150:230],
    }


def clip_manifest(shortest=64, crop=64, image_size=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                  center_crop=True, tokens=16):
    side = int(round(tokens ** 0.5))
    return {
        "vision": {"image_size": image_size or crop, "tokens_per_tile": tokens, "tokens_per_side": side},
        "image": {"tokens_per_tile": tokens},
        "preprocess": {"mode": "clip", "image_size": image_size or crop, "resize_shortest_edge": shortest,
                       "crop_size": crop, "do_center_crop": center_crop, "rescale_factor": 1 / 255,
                       "image_mean": list(mean), "image_std": list(std), "resample": "bicubic",
                       "max_tiles": 1, "min_tiles": 1, "use_thumbnail": False, "max_image_pixels": 50_000_000},
        "iss": {"enabled": False, "overlap_tokens": 0, "pixels_per_token": 16},
    }


# ============================================================================================
# Parity with transformers


@pytest.mark.parametrize("shortest,crop,mean,std", [
    (64, 64, (0.5,) * 3, (0.5,) * 3),     # tiny-static
    (224, 224, CLIP_MEAN, CLIP_STD),      # CLIP ViT-L/14
    (256, 224, CLIP_MEAN, CLIP_STD),      # a real center crop
    (48, 64, (0.5,) * 3, (0.5,) * 3),     # crop larger than the resize: zero padding
])
def test_clip_parity_with_transformers(shortest, crop, mean, std):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop},
                                image_mean=list(mean), image_std=list(std))
    manifest = clip_manifest(shortest, crop, mean=mean, std=std)
    for name, arr in photos().items():
        img = Image.fromarray(arr)
        expected = ref(img, return_tensors="np")["pixel_values"]
        got = images.preprocess(img, as_manifest(manifest))
        assert got.pixel_values.dtype == np.float32 and got.pixel_values.shape == (1, 3, crop, crop), name
        assert np.abs(got.pixel_values - expected).max() <= 1e-5, name
        assert got.n_image_tokens == 16 and got.num_tiles == 1


def test_clip_parity_fixed_size_processor():
    """Processors configured with size={"height", "width"} (SigLIP style) resize straight to the size."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False,
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    manifest = clip_manifest(shortest=None, crop=64)
    for name, arr in photos().items():
        img = Image.fromarray(arr)
        expected = ref(img, return_tensors="np")["pixel_values"]
        assert np.abs(images.preprocess(img, as_manifest(manifest)).pixel_values - expected).max() <= 1e-5, name


def test_clip_parity_detects_a_broken_resize(monkeypatch):
    """The parity tolerance is tight enough to see a different resize filter or size rounding."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    img = Image.fromarray(photos()["chelsea"])  # 451x300: long edge 96.2 -> transformers truncates to 96
    expected = ref(img, return_tensors="np")["pixel_values"]
    assert np.abs(images.preprocess(img, as_manifest(clip_manifest())).pixel_values - expected).max() <= 1e-5
    bilinear = clip_manifest()
    bilinear["preprocess"]["resample"] = "bilinear"
    assert np.abs(images.preprocess(img, as_manifest(bilinear)).pixel_values - expected).max() > 1e-2
    # rounding the long edge up instead of truncating it
    monkeypatch.setattr(images, "clip_resize_size", lambda w, h, cfg: (97, 64))
    assert np.abs(images.preprocess(img, as_manifest(clip_manifest())).pixel_values - expected).max() > 1e-2


@pytest.mark.parametrize("max_tiles", [1, 4, 6, 12])
def test_tiles_parity_with_transformers_gotocr2(max_tiles):
    """Without ISS, tiles mode is InternVL dynamic cropping: transformers' GotOcr2 crop_to_patches."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ref = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                   max_patches=max_tiles, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    manifest = tiles_manifest(image_size=56, iss=False, max_tiles=max_tiles)
    for name, arr in photos().items():
        img = Image.fromarray(arr)
        out = ref(img, return_tensors="np")
        got = images.preprocess(img, as_manifest(manifest))
        assert got.pixel_values.shape == out["pixel_values"].shape, name
        assert got.num_tiles == out["num_patches"][0]
        assert np.abs(got.pixel_values - out["pixel_values"]).max() <= 1e-5, name
        assert got.n_image_tokens == got.num_tiles * 16


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 12), st.sampled_from([56, 448]))
def test_grid_choice_matches_transformers(width, height, max_tiles, tile):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), 1, max_tiles)
    assert images.choose_grid(width, height, tile, 1, max_tiles) == (rows, cols)


# ============================================================================================
# Tiles mode with ISS


def test_iss_tiles_shapes_and_tokens():
    manifest = tiles_manifest()  # tiny-dynamic-iss: 84 px tiles, 14 px per token, t = 6, o = 2
    # 600x400 (3:2): grids 1x1, 1x2 and 2x2 are equally far from 1.5; the image fills 2x2, so 2x2 wins
    img = Image.fromarray(data.coffee())
    pre = images.preprocess(img, as_manifest(manifest))
    rows, cols = pre.plan.grid
    assert (rows, cols) == images.choose_grid(600, 400, 84, 1, 4) == (2, 2)
    assert images.choose_grid(60, 40, 84, 1, 4) == (1, 1)  # too small to fill more tiles
    assert pre.pixel_values.shape == (rows * cols + 1, 3, 84, 84) and pre.pixel_values.dtype == np.float32
    assert pre.plan.canvas_size == (cols * 84 - (cols - 1) * 28, rows * 84 - (rows - 1) * 28)
    assert pre.n_image_tokens == (cols * 6 - (cols - 1) * 2) * (rows * 6 - (rows - 1) * 2) + 36
    emb = np.random.default_rng(0).standard_normal((pre.num_tiles, 36, 8)).astype(np.float32)
    assert pre.select_tokens(emb).shape == (pre.n_image_tokens, 8)
    # the plan can be had without pixels (to count tokens before running the vision graph)
    plan = images.image_to_tokens_plan(600, 400, as_manifest(manifest))
    assert plan.n_image_tokens == pre.n_image_tokens and plan.grid == pre.plan.grid


def test_full_size_flashvl_geometry():
    manifest = tiles_manifest(image_size=448, pixels_per_token=28, overlap=2, max_tiles=4)
    plan = images.image_to_tokens_plan(1920, 1080, as_manifest(manifest))  # 16:9 -> closest grid 1 row x 2 cols
    assert plan.grid == (1, 2) and plan.thumbnail
    assert plan.canvas_size == (2 * 448 - 56, 448)
    assert plan.n_image_tokens == (2 * 16 - 2) * 16 + 256
    single = images.image_to_tokens_plan(500, 500, as_manifest(manifest))
    assert single.grid == (1, 1) and not single.thumbnail and single.n_image_tokens == 256


def test_select_tokens_rejects_wrong_shapes():
    pre = images.preprocess(Image.fromarray(data.astronaut()), as_manifest(tiles_manifest()))
    with pytest.raises(BundleError, match="vision graph"):
        pre.select_tokens(np.zeros((pre.num_tiles + 1, 36, 4), np.float32))
    with pytest.raises(BundleError, match="vision graph"):
        pre.select_tokens(np.zeros((pre.num_tiles, 35, 4), np.float32))


def test_max_tiles_override():
    manifest = tiles_manifest(max_tiles=6)
    img = Image.fromarray(data.coffee())
    assert images.preprocess(img, as_manifest(manifest), max_tiles=1).pixel_values.shape == (1, 3, 84, 84)
    with pytest.raises(ImageError, match="max_tiles"):
        images.preprocess(img, as_manifest(manifest), max_tiles=7)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.pop("preprocess"), "preprocess"),
    (lambda m: m["preprocess"].update(mode="crop"), "mode"),
    (lambda m: m["iss"].update(pixels_per_token=13), "pixels_per_token"),
    (lambda m: m["iss"].update(overlap_tokens=6), "overlap_tokens"),
    (lambda m: m["preprocess"].update(image_mean=[0.5, 0.5]), "image_mean"),
    (lambda m: m["preprocess"].update(resample="cubic-ish"), "resample"),
    (lambda m: m["preprocess"].update(max_tiles=0), "max_tiles"),
])
def test_bad_manifest_sections(mutate, match):
    manifest = tiles_manifest()
    mutate(manifest)
    with pytest.raises(BundleError, match=match):
        images.preprocess(Image.new("RGB", (10, 10)), as_manifest(manifest))


# ============================================================================================
# Extreme sizes


@pytest.mark.parametrize("size", [(1, 1), (1, 10000), (10000, 1), (2, 3)])
@pytest.mark.parametrize("manifest", [clip_manifest(), tiles_manifest()], ids=["clip", "tiles-iss"])
def test_tiny_and_thin_images(size, manifest):
    img = Image.new("RGB", size, (200, 30, 90))
    pre = images.preprocess(img, as_manifest(manifest))
    s = manifest["preprocess"]["image_size"]
    assert pre.pixel_values.shape[1:] == (3, s, s) and np.isfinite(pre.pixel_values).all()
    # a flat colour stays that colour everywhere (no zero-size resize, no padding leaking in)
    expected = (np.float32([200, 30, 90]) / 255 - np.float32(manifest["preprocess"]["image_mean"])) \
        / np.float32(manifest["preprocess"]["image_std"])
    np.testing.assert_allclose(pre.pixel_values.mean(axis=(2, 3)), np.broadcast_to(expected, (pre.num_tiles, 3)), atol=1e-5)


def test_thin_image_window_resize_matches_full_resize(monkeypatch):
    """Very thin images resize only the center-crop window; it must match the full resize closely."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (3, 4000, 3), dtype=np.uint8))
    manifest = clip_manifest()
    full = images.preprocess(img, as_manifest(manifest)).pixel_values
    monkeypatch.setattr(images, "_FULL_RESIZE_MAX_PIXELS", 1000)
    window = images.preprocess(img, as_manifest(manifest)).pixel_values
    assert np.abs(full - window).max() <= 2 / 255 / 0.5 + 1e-6  # at most 1 uint8 step, rarely
    assert np.mean(np.abs(full - window) > 1e-6) < 0.01


# ============================================================================================
# Modes


def roundtrip(img: Image.Image, fmt: str, **save) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return images.load_image(buf.getvalue())


def px(img: Image.Image, x=0, y=0):
    return img.getpixel((x, y))


def test_mode_grey_and_bilevel():
    assert px(roundtrip(Image.new("L", (3, 2), 77), "PNG")) == (77, 77, 77)
    bits = Image.new("1", (4, 4), 0)
    bits.putpixel((1, 1), 1)
    out = roundtrip(bits, "PNG")
    assert out.mode == "RGB" and px(out) == (0, 0, 0) and px(out, 1, 1) == (255, 255, 255)


def test_mode_alpha_composited_on_white():
    la = Image.new("LA", (2, 2), (0, 0))        # fully transparent black -> white
    assert px(roundtrip(la, "PNG")) == (255, 255, 255)
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))  # half red over white
    r, g, b = px(roundtrip(rgba, "PNG"))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    opaque = Image.new("RGBA", (2, 2), (10, 20, 30, 255))
    assert px(images.load_image(opaque)) == (10, 20, 30)
    arr = np.zeros((2, 2, 4), np.uint8)  # RGBA array, transparent
    assert px(images.load_image(arr)) == (255, 255, 255)


def test_mode_palette_with_and_without_transparency():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    out = roundtrip(p, "PNG")
    assert px(out, 1, 1) == (10, 200, 30) and px(out) == (0, 0, 0)
    out = roundtrip(p, "PNG", transparency=0)  # index 0 transparent -> white
    assert px(out) == (255, 255, 255) and px(out, 1, 1) == (10, 200, 30)
    gif = roundtrip(p, "GIF", transparency=0)
    assert px(gif) == (255, 255, 255) and px(gif, 1, 1) == (10, 200, 30)


def test_mode_cmyk_and_ycbcr():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red
    assert px(roundtrip(cmyk, "TIFF")) == (255, 0, 0)
    assert px(images.load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 255)))) == (0, 0, 0)
    jpeg_cmyk = roundtrip(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100)
    r, g, b = px(jpeg_cmyk, 8, 8)
    assert r > 240 and g < 15 and b < 15
    ycc = Image.new("RGB", (2, 2), (0, 128, 255)).convert("YCbCr")
    r, g, b = px(images.load_image(ycc))
    assert abs(r - 0) <= 2 and abs(g - 128) <= 2 and abs(b - 255) <= 2


def test_mode_16bit_and_float_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], np.uint16)
    for fmt in ("PNG", "TIFF"):
        out = roundtrip(Image.fromarray(a), fmt)   # mode I;16
        assert [px(out, x)[0] for x in range(3)] == [0, 128, 255], fmt
    i32 = Image.fromarray(a.astype(np.int32), "I")  # 16-bit data held in mode I
    assert [px(images.load_image(i32), x)[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], np.int32), "I")  # unknown range: stretched
    assert [px(images.load_image(wide), x)[0] for x in range(3)] == [0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert [px(images.load_image(f), x)[0] for x in range(3)] == [0, 128, 255]
    fwide = Image.fromarray(np.array([[0.0, 1000.0, 4000.0]], np.float32), "F")
    assert [px(images.load_image(fwide), x)[0] for x in range(3)] == [0, 64, 255]
    assert px(images.load_image(np.array([[65535]], np.uint16))) == (255, 255, 255)
    assert px(images.load_image(np.array([[0.5]], np.float32))) == (128, 128, 128)
    assert px(images.load_image(np.array([[True]]))) == (255, 255, 255)


def test_exif_orientation_applied():
    base = Image.new("RGB", (40, 20), (0, 0, 255))
    base.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buf = io.BytesIO()
    base.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = images.load_image(buf.getvalue())
    assert out.size == (20, 40)
    top, bottom = px(out, 10, 5), px(out, 10, 35)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red went to the top
    assert images.load_image(out).size == (20, 40)  # applying it again is a no-op
    assert images.preprocess(buf.getvalue(), as_manifest(clip_manifest())).original_size == (20, 40)


def test_inputs_of_every_kind(tmp_path):
    arr = data.chelsea()
    path = tmp_path / "cat.png"
    Image.fromarray(arr).save(path)
    expected = np.asarray(Image.fromarray(arr))
    with open(path, "rb") as stream, Image.open(path) as lazy:
        for src in (path, str(path), path.read_bytes(), stream, lazy, arr):
            out = images.load_image(src)
            assert out.mode == "RGB" and out.size == (451, 300)
            np.testing.assert_array_equal(np.asarray(out), expected)


# ============================================================================================
# Bad inputs -> ImageError with one line naming the input and saying what to do


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims width x height (CRC fixed), data for 1x1 only."""
    b = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    return bytes(b)


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def assert_one_line_error(err: FlashVLError, *words: str):
    msg = str(err)
    assert "\n" not in msg and len(msg) < 400, msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


def write(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return p


@pytest.mark.parametrize("make,words", [
    (lambda d: write(d, "garbage.jpg", os.urandom(2048)), ["garbage.jpg", "not a readable image"]),
    (lambda d: write(d, "png_garbage.png", b"\x89PNG\r\n\x1a\n" + os.urandom(500)), ["png_garbage.png", "corrupt"]),
    (lambda d: write(d, "cut.jpg", jpeg_bytes()[:3000]), ["cut.jpg", "truncated"]),
    (lambda d: write(d, "cut.png", png_bytes(Image.fromarray(data.coffee()))[:20000]), ["cut.png", "truncated"]),
    (lambda d: write(d, "cut_header.png", png_bytes(Image.new("RGB", (8, 8)))[:30]), ["cut_header.png"]),
    (lambda d: write(d, "empty.png", b""), ["empty.png", "empty"]),
    (lambda d: write(d, "notes.txt", b"this is not an image\n" * 20), ["notes.txt", "not a readable image"]),
    (lambda d: d, ["directory"]),
    (lambda d: d / "missing.png", ["missing.png", "does not exist"]),
])
def test_bad_files(tmp_path, make, words):
    src = make(tmp_path)
    with pytest.raises(ImageError) as ei:
        images.load_image(src)
    assert_one_line_error(ei.value, *words)
    with pytest.raises(ImageError):  # preprocess decodes through the same path
        images.preprocess(src, as_manifest(clip_manifest()))


def test_corrupt_bytes_in_memory():
    with pytest.raises(ImageError, match="empty"):
        images.load_image(b"")
    with pytest.raises(ImageError, match="truncated"):
        images.load_image(jpeg_bytes()[:5000])


def test_pixel_decodes_fixture_sees_a_real_decode(tmp_path, pixel_decodes):
    # the bomb tests below assert this list stays empty: here it must not
    path = tmp_path / "ok.png"
    Image.new("RGB", (8, 5), (1, 2, 3)).save(path)
    images.load_image(path)
    assert pixel_decodes and pixel_decodes[0] == (8, 5)


@pytest.mark.parametrize("size,limit", [((20000, 20000), None), ((12000, 12000), None), ((9000, 9000), 1_000_000)])
def test_decompression_bomb_refused_before_decoding(tmp_path, size, limit, pixel_decodes):
    path = write(tmp_path, "bomb.png", png_with_header_size(*size))
    assert path.stat().st_size < 100
    with pytest.raises(ImageError) as ei:
        images.load_image(path, max_pixels=limit)
    assert pixel_decodes == []
    # refused for its size, not because its (1x1) data failed to decode: the pixels were never read
    assert_one_line_error(ei.value, "bomb.png", "pixels" if limit or size[0] < 15000 else "too large")
    assert "truncat" not in str(ei.value)


def test_pixel_limit_from_manifest():
    manifest = clip_manifest()
    manifest["preprocess"]["max_image_pixels"] = 100
    with pytest.raises(ImageError, match="limit"):
        images.preprocess(Image.new("RGB", (11, 10)), as_manifest(manifest))
    assert images.preprocess(Image.new("RGB", (10, 10)), as_manifest(manifest)).pixel_values.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("arr,words", [
    (np.zeros((4, 4, 2), np.uint8), ["HxW"]),
    (np.zeros((4,), np.uint8), ["HxW"]),
    (np.zeros((0, 4, 3), np.uint8), ["empty"]),
    (np.full((2, 2), 300, np.int32), ["0..255"]),
    (np.full((2, 2), 1.5, np.float32), ["[0, 1]"]),
    (np.full((2, 2), np.nan, np.float32), ["[0, 1]"]),
    (np.zeros((2, 2), np.complex64), ["dtype"]),
])
def test_bad_arrays(arr, words):
    with pytest.raises(ImageError) as ei:
        images.load_image(arr)
    assert_one_line_error(ei.value, *words)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        images.load_image(42)


def test_no_file_descriptor_leak(tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    good = tmp_path / "ok.png"
    Image.fromarray(data.chelsea()).save(good)
    bad = write(tmp_path, "cut.png", png_bytes(Image.fromarray(data.coffee()))[:20000])
    gif = tmp_path / "anim.gif"
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        images.load_image(good)
        images.load_image(gif)
        with pytest.raises(ImageError):
            images.load_image(bad)
    assert len(os.listdir("/proc/self/fd")) <= before


# ============================================================================================
# With the exporter's own manifest sections and model (the presets)


@pytest.fixture(scope="module")
def tiny_presets():
    model = pytest.importorskip("flashvl_edge.export.families")
    return {name: model.build_preset(name) for name in ("tiny-static", "tiny-dynamic-iss")}


@pytest.mark.parametrize("name", ["tiny-static", "tiny-dynamic-iss"])
def test_preset_manifest_drives_preprocessing(tiny_presets, name):
    import torch

    loaded = tiny_presets[name]
    manifest = loaded.manifest_sections
    pre = images.preprocess(data.coffee(), as_manifest(manifest))
    with torch.no_grad():
        embeds = loaded.model.get_image_features(torch.from_numpy(pre.pixel_values)).numpy()
    tokens = pre.select_tokens(embeds)
    assert tokens.shape == (pre.n_image_tokens, manifest["llm"]["hidden_size"])
    if name == "tiny-dynamic-iss":
        rows, cols = pre.plan.grid
        t, o = manifest["vision"]["tokens_per_side"], manifest["iss"]["overlap_tokens"]
        assert o > 0 and pre.plan.thumbnail
        assert pre.n_image_tokens == (cols * t - (cols - 1) * o) * (rows * t - (rows - 1) * o) + t * t
        assert pre.n_image_tokens < pre.num_tiles * t * t  # the overlap duplicates were dropped
    else:
        np.testing.assert_array_equal(tokens, embeds[0])
