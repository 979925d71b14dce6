"""ISS geometry and stitching: properties on random grids (hypothesis), the documented example, and
pixel-level agreement between what a kept token sees in its tile and what its canvas position covers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from factories import as_manifest, tiles_manifest
from flashvl_edge.runtime import images, iss

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@st.composite
def geometries(draw, max_side=4, max_t=10):
    t = draw(st.integers(1, max_t))
    return (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)), t,
            draw(st.integers(0, t - 1)), draw(st.booleans()))


def reference_owner(rows, cols, t, o):
    """The owner rule written out with plain loops (the spec in docs/iss.md), for comparison."""
    h, w = iss.canvas_token_shape(rows, cols, t, o)
    owner = np.full((h, w), -1)
    for y in range(h):
        for x in range(w):
            best = None
            for k in range(rows * cols):
                r, c = divmod(k, cols)
                ly, lx = y - r * (t - o), x - c * (t - o)
                if not (0 <= ly < t and 0 <= lx < t):
                    continue
                dy, dx = min(ly, t - 1 - ly), min(lx, t - 1 - lx)
                key = (min(dy, dx), dy + dx)  # farther from the border, then larger sum; first index wins ties
                if best is None or key > best[0]:
                    best = (key, k)
            owner[y, x] = best[1]
    return owner


def tagged_embeddings(num_tiles, t):
    """Synthetic vision outputs whose token vector says where it came from: (tile, row, col)."""
    k, ly, lx = np.meshgrid(np.arange(num_tiles), np.arange(t), np.arange(t), indexing="ij")
    return np.stack([k, ly, lx], axis=-1).reshape(num_tiles, t * t, 3).astype(np.float32)


def stitch_violations(index, rows, cols, t, o, thumbnail):
    """Every way a gather index can break the ISS contract; empty when it is right."""
    problems = []
    h, w = iss.canvas_token_shape(rows, cols, t, o)
    n_grid = rows * cols
    if len(index) != h * w + (t * t if thumbnail else 0):
        return [f"token count {len(index)} != formula"]
    if len(np.unique(index)) != len(index):
        problems.append("a tile token is used twice")
    out = iss.stitch(tagged_embeddings(n_grid + thumbnail, t),
                     iss.StitchPlan(rows, cols, t, o, thumbnail, np.asarray(index)))
    canvas = out[: h * w].reshape(h, w, 3).astype(int)
    for y in range(h):
        for x in range(w):
            k, ly, lx = canvas[y, x]
            r, c = divmod(k, cols)
            if k >= n_grid or (ly, lx) != (y - r * (t - o), x - c * (t - o)):
                problems.append(f"canvas ({y},{x}) holds tile {k} token ({ly},{lx}), not the one at that position")
                continue
            d = min(ly, t - 1 - ly, lx, t - 1 - lx)
            for k2 in range(n_grid):
                r2, c2 = divmod(k2, cols)
                ly2, lx2 = y - r2 * (t - o), x - c2 * (t - o)
                if 0 <= ly2 < t and 0 <= lx2 < t and min(ly2, t - 1 - ly2, lx2, t - 1 - lx2) > d:
                    problems.append(f"canvas ({y},{x}) kept tile {k} but tile {k2} is farther from its border")
    if thumbnail:
        thumb = out[h * w:].astype(int)
        if not (np.all(thumb[:, 0] == n_grid) and np.array_equal(thumb[:, 1] * t + thumb[:, 2], np.arange(t * t))):
            problems.append("thumbnail tokens are not the last tile's, in order, after the canvas")
    return problems


@settings(max_examples=150, deadline=None)
@given(geometries())
def test_stitch_properties(geom):
    rows, cols, t, o, thumb = geom
    plan = iss.stitch_plan(rows, cols, t, o, thumb)
    # token count = (cols*t - (cols-1)*o) x (rows*t - (rows-1)*o) (+ t*t thumbnail)
    expected = (cols * t - (cols - 1) * o) * (rows * t - (rows - 1) * o) + (t * t if thumb else 0)
    assert plan.n_tokens == expected == iss.stitched_token_count(rows, cols, t, o, thumb)
    assert plan.num_tiles == rows * cols + thumb
    # every canvas token comes from exactly one tile, is a genuine token of that tile at the right
    # position, and that tile is (one of) the farthest from its border there
    assert stitch_violations(plan.index, rows, cols, t, o, thumb) == []
    np.testing.assert_array_equal(iss.owner_map(rows, cols, t, o), reference_owner(rows, cols, t, o))


def test_checker_catches_broken_stitches():
    """The property checker must reject plausible wrong gathers, or the property test proves nothing."""
    rows, cols, t, o = 2, 3, 6, 2
    good = iss.stitch_plan(rows, cols, t, o, True).index
    assert stitch_violations(good, rows, cols, t, o, True) == []
    h, w = iss.canvas_token_shape(rows, cols, t, o)
    # (a) overlap never dropped: plain concatenation of all tiles
    assert stitch_violations(np.arange((rows * cols + 1) * t * t), rows, cols, t, o, True)
    # (b) right count, but the lowest-index tile always wins an overlap (not the farthest from its border)
    ys, xs = np.divmod(np.arange(h * w), w)
    first = [min(k for k in range(rows * cols) if 0 <= y - (k // cols) * (t - o) < t and 0 <= x - (k % cols) * (t - o) < t)
             for y, x in zip(ys, xs)]
    first = np.array(first)
    bad = first * t * t + (ys - first // cols * (t - o)) * t + (xs - first % cols * (t - o))
    bad = np.concatenate([bad, rows * cols * t * t + np.arange(t * t)])
    assert any("farther" in p for p in stitch_violations(bad, rows, cols, t, o, True))
    # (c) right owner, wrong position inside the tile (off by one column)
    shifted = good.copy()
    shifted[: h * w] = np.where(good[: h * w] % t < t - 1, good[: h * w] + 1, good[: h * w])
    assert stitch_violations(shifted, rows, cols, t, o, True)
    # (d) thumbnail in front of the canvas
    swapped = np.concatenate([good[h * w:], good[: h * w]])
    assert stitch_violations(swapped, rows, cols, t, o, True)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 8), st.booleans())
def test_zero_overlap_is_plain_dynamic_cropping(rows, cols, t, thumb):
    """o = 0: the stitch keeps every tile token once, and re-cutting the stitched canvas into t x t
    blocks gives back each plain-cropping tile's token grid, token for token (only the order in which
    the LLM reads them is the canvas raster order)."""
    plan = iss.stitch_plan(rows, cols, t, 0, thumb)
    n = rows * cols + thumb
    emb = np.random.default_rng(0).standard_normal((n, t * t, 5)).astype(np.float32)
    out = iss.stitch(emb, plan)
    assert out.shape == (n * t * t, 5)
    assert sorted(plan.index.tolist()) == list(range(n * t * t))
    canvas = out[: rows * cols * t * t].reshape(rows, t, cols, t, 5)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        np.testing.assert_array_equal(canvas[r, :, c, :].reshape(t * t, 5), emb[k])
    if thumb:
        np.testing.assert_array_equal(out[rows * cols * t * t:], emb[-1])


def test_documented_example():
    """The 2x2 example in docs/iss.md: t = 4, o = 2 -> a 6x6 canvas, each overlap split in the middle."""
    assert iss.owner_map(2, 2, 4, 2).tolist() == [
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [2, 2, 2, 3, 3, 3],
        [2, 2, 2, 3, 3, 3],
        [2, 2, 2, 3, 3, 3],
    ]
    # Flash-VL geometry: 448 px tiles, 14 px patches, 2x2 shuffle -> t = 16, o = 2 (56 px, 12.5%)
    assert iss.canvas_token_shape(2, 3, 16, 2) == (30, 44)
    assert iss.canvas_size(2, 3, 448, 56) == (1232, 840)
    assert iss.stitched_token_count(2, 3, 16, 2, True) == 30 * 44 + 256


def test_plan_is_cached_and_read_only():
    a = iss.stitch_plan(3, 2, 16, 2, True)
    assert iss.stitch_plan(3, 2, 16, 2, True) is a
    with pytest.raises(ValueError):
        a.index[0] = 0
    emb = np.random.default_rng(1).standard_normal((7, 256, 8)).astype(np.float32)
    np.testing.assert_array_equal(iss.stitch(emb, a), emb.reshape(-1, 8)[a.index])


def test_invalid_geometry_and_shapes():
    with pytest.raises(ValueError, match="overlap"):
        iss.stitch_plan(2, 2, 4, 4, False)
    with pytest.raises(ValueError, match="overlap"):
        iss.stitch_plan(2, 2, 4, -1, False)
    with pytest.raises(ValueError, match="grid"):
        iss.canvas_token_shape(0, 2, 4, 1)
    plan = iss.stitch_plan(1, 2, 4, 1, False)
    with pytest.raises(ValueError, match="do not fit"):
        iss.stitch(np.zeros((3, 16, 2), np.float32), plan)


# --------------------------------------------------------------------------------------------
# Pixel level: a kept token's pixels in its tile are the canvas pixels its canvas position covers


def patchify(img_chw: np.ndarray, p: int) -> np.ndarray:
    """[C, H, W] -> [(H/p)*(W/p), C*p*p]: the pixels each token covers, tokens in raster order."""
    c, h, w = img_chw.shape
    return img_chw.reshape(c, h // p, p, w // p, p).transpose(1, 3, 0, 2, 4).reshape((h // p) * (w // p), c * p * p)


@settings(max_examples=60, deadline=None)
@given(geometries(max_side=3, max_t=6), st.integers(1, 4))
def test_tile_boxes_and_stitch_agree_on_pixels(geom, p):
    rows, cols, t, o, _ = geom
    s = t * p
    w, h = iss.canvas_size(rows, cols, s, o * p)
    canvas = np.random.default_rng(rows * 100 + cols * 10 + t).integers(0, 255, (3, h, w)).astype(np.float32)
    boxes = iss.tile_boxes(rows, cols, s, o * p)
    assert boxes[:, 2].max() == w and boxes[:, 3].max() == h and boxes.min() == 0
    tiles = np.stack([canvas[:, top:bottom, left:right] for left, top, right, bottom in boxes])
    # "vision graph" = the pixels each token sees
    embeds = np.stack([patchify(tile, p) for tile in tiles])
    stitched = iss.stitch(embeds, iss.stitch_plan(rows, cols, t, o, False))
    np.testing.assert_array_equal(stitched, patchify(canvas, p))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 6), st.integers(0, 3), st.booleans())
def test_preprocess_iss_tiles_agree_with_canvas(width, height, max_tiles, o, thumb):
    """Through preprocess(): tiles cut with overlap hold exactly the canvas pixels, so the stitched
    per-token pixels equal the independently resized and normalized canvas."""
    t, p = 6, 4
    manifest = as_manifest(tiles_manifest(image_size=t * p, pixels_per_token=p, overlap=o, max_tiles=max_tiles,
                                          thumbnail=thumb))
    rng = np.random.default_rng(width * 1000 + height)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    pre = images.preprocess(img, manifest)
    rows, cols = pre.plan.grid
    cw, ch = pre.plan.canvas_size
    assert (cw, ch) == (cols * t * p - (cols - 1) * o * p, rows * t * p - (rows - 1) * o * p)
    canvas = np.asarray(img.resize((cw, ch), Image.Resampling.BICUBIC)).astype(np.float64) / 255
    canvas = ((canvas.astype(np.float32) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1)
    embeds = np.stack([patchify(tile, p) for tile in pre.pixel_values])
    tokens = pre.select_tokens(embeds)
    assert tokens.shape == (pre.n_image_tokens, 3 * p * p)
    n_canvas = (ch // p) * (cw // p)
    np.testing.assert_allclose(tokens[:n_canvas], patchify(canvas, p), atol=1e-6)
    if pre.plan.thumbnail:
        assert rows * cols > 1 and pre.num_tiles == rows * cols + 1
        np.testing.assert_array_equal(tokens[n_canvas:], patchify(pre.pixel_values[-1], p))
    else:
        assert n_canvas == pre.n_image_tokens


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (1, 1), (1, 10000), (10000, 1)])
def test_iss_zero_overlap_pixels_equal_plain_tiles(size):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    plain = images.preprocess(img, as_manifest(tiles_manifest(overlap=0, iss=False)))
    zero = images.preprocess(img, as_manifest(tiles_manifest(overlap=0)))
    assert plain.plan.grid == zero.plan.grid and plain.n_image_tokens == zero.n_image_tokens
    np.testing.assert_array_equal(plain.pixel_values, zero.pixel_values)
    emb = rng.standard_normal((plain.num_tiles, 36, 4)).astype(np.float32)
    # same tokens, each exactly once; plain keeps tile order, ISS the canvas raster order
    a, b = plain.select_tokens(emb), zero.select_tokens(emb)
    np.testing.assert_array_equal(np.sort(a, axis=0), np.sort(b, axis=0))
    np.testing.assert_array_equal(a, emb.reshape(-1, 4))
