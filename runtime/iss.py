"""Implicit Semantic Stitching (ISS): overlapping tile geometry and the precomputed token gather.

A dynamic-ISS image is resized to a canvas that ``rows x cols`` square tiles of ``S`` pixels cover with
an overlap of ``o`` tokens (``o * p`` pixels, ``p`` pixels per LLM token). Each tile is encoded whole by
the vision graph into a ``t x t`` token grid (``t = S / p``, raster order). On the host the tile grids
are stitched into one canvas token grid of ``(rows*t - (rows-1)*o) x (cols*t - (cols-1)*o)`` tokens:
each canvas position keeps the token of the tile in which it lies farthest from the tile's border, the
duplicates are dropped, and the canvas goes to the LLM in raster order, the global thumbnail's tokens
(if any) after it. docs/iss.md explains the reading of the paper and the owner rule.

Stitching is one numpy fancy-index gather over the flattened ``[num_tiles * t*t, D]`` embeddings with
an index array computed once per ``(rows, cols, t, o, thumbnail)``: no Python loop runs per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def _check(rows: int, cols: int, t: int, o: int) -> None:
    if rows < 1 or cols < 1:
        raise ValueError(f"tile grid must have at least one row and column, got {rows}x{cols}")
    if t < 1:
        raise ValueError(f"tokens per tile side must be >= 1, got {t}")
    if not 0 <= o < t:
        raise ValueError(f"overlap must satisfy 0 <= overlap < tokens per side ({t}), got {o}")


def canvas_size(rows: int, cols: int, tile_px: int, overlap_px: int) -> tuple[int, int]:
    """(width, height) in pixels of the canvas that the overlapping tiles cover exactly."""
    _check(rows, cols, tile_px, overlap_px)
    return cols * tile_px - (cols - 1) * overlap_px, rows * tile_px - (rows - 1) * overlap_px


def tile_boxes(rows: int, cols: int, tile_px: int, overlap_px: int) -> np.ndarray:
    """``[rows*cols, 4]`` int array of ``(left, top, right, bottom)`` pixel boxes, raster order.

    Tiles start every ``tile_px - overlap_px`` pixels, so neighbours share ``overlap_px`` pixels.
    """
    _check(rows, cols, tile_px, overlap_px)
    stride = tile_px - overlap_px
    r, c = np.divmod(np.arange(rows * cols), cols)
    left, top = c * stride, r * stride
    return np.stack([left, top, left + tile_px, top + tile_px], axis=1).astype(np.int64)


def canvas_token_shape(rows: int, cols: int, t: int, o: int) -> tuple[int, int]:
    """(height, width) of the stitched canvas in tokens."""
    _check(rows, cols, t, o)
    return rows * t - (rows - 1) * o, cols * t - (cols - 1) * o


def stitched_token_count(rows: int, cols: int, t: int, o: int, thumbnail: bool) -> int:
    """Number of image tokens the LLM receives: the canvas grid plus ``t*t`` for the thumbnail."""
    h, w = canvas_token_shape(rows, cols, t, o)
    return h * w + (t * t if thumbnail else 0)


def _axis_distances(n_tiles: int, t: int, o: int, length: int) -> np.ndarray:
    """``[n_tiles, length]``: distance of each canvas position to the nearer border of each tile along
    one axis (0 on the tile's first and last token), or -1 where the tile does not cover it."""
    local = np.arange(length)[None, :] - (np.arange(n_tiles) * (t - o))[:, None]
    covered = (local >= 0) & (local < t)
    return np.where(covered, np.minimum(local, t - 1 - local), -1)


def owner_map(rows: int, cols: int, t: int, o: int) -> np.ndarray:
    """``[H, W]`` canvas token grid -> index (raster order) of the tile whose token is kept there.

    Owner rule: the tile in which the position lies farthest from the tile's border, the distance being
    the minimum over the tile's 4 sides in tokens. Ties go first to the larger sum of the vertical and
    horizontal distances (so along the canvas's outer edge, where the minimum is 0 in every tile, the seam
    still falls in the middle of the overlap), then to the lowest tile index. The result splits every
    overlap band in the middle: the upper/left tile keeps the first ceil(o/2) shared rows/columns.
    """
    h, w = canvas_token_shape(rows, cols, t, o)
    dy = _axis_distances(rows, t, o, h)  # [rows, H]
    dx = _axis_distances(cols, t, o, w)  # [cols, W]
    dy4, dx4 = dy[:, None, :, None], dx[None, :, None, :]  # [rows, cols, H, W] by broadcasting
    covered = (dy4 >= 0) & (dx4 >= 0)
    # Lexicographic key (min distance, sum of distances); sum <= t - 1 < 2t, so one integer holds both.
    key = np.where(covered, np.minimum(dy4, dx4) * (2 * t) + dy4 + dx4, -1)
    # argmax returns the first maximum: the lowest raster tile index wins remaining ties.
    return key.reshape(rows * cols, h, w).argmax(axis=0)


@dataclass(frozen=True, eq=False)
class StitchPlan:
    """The gather that turns ``[num_tiles, t*t, D]`` vision outputs into the LLM's image tokens."""

    rows: int
    cols: int
    tokens_per_side: int
    overlap_tokens: int
    thumbnail: bool
    index: np.ndarray  # int64 [n_tokens] into the flattened [num_tiles * t*t] token axis (read-only)

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols + (1 if self.thumbnail else 0)

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side ** 2

    @property
    def n_tokens(self) -> int:
        return int(self.index.shape[0])


@lru_cache(maxsize=64)
def stitch_plan(rows: int, cols: int, t: int, o: int, thumbnail: bool) -> StitchPlan:
    """Build (once per geometry, cached) the gather index of an ISS stitch."""
    h, w = canvas_token_shape(rows, cols, t, o)
    owner = owner_map(rows, cols, t, o)
    tile_r, tile_c = np.divmod(owner, cols)
    local_y = np.arange(h)[:, None] - tile_r * (t - o)
    local_x = np.arange(w)[None, :] - tile_c * (t - o)
    index = (owner * (t * t) + local_y * t + local_x).reshape(-1)
    if thumbnail:  # the global thumbnail is the last tile; its tokens follow the canvas unchanged
        index = np.concatenate([index, rows * cols * t * t + np.arange(t * t)])
    index = index.astype(np.int64)
    index.flags.writeable = False
    return StitchPlan(rows, cols, t, o, bool(thumbnail), index)


def stitch(image_embeds: np.ndarray, plan: StitchPlan) -> np.ndarray:
    """``[num_tiles, t*t, D]`` -> ``[plan.n_tokens, D]`` by one fancy-index gather."""
    n, tpt = plan.num_tiles, plan.tokens_per_tile
    if image_embeds.ndim != 3 or image_embeds.shape[:2] != (n, tpt):
        raise ValueError(
            f"image embeddings of shape {tuple(image_embeds.shape)} do not fit the tile plan "
            f"({n} tiles x {tpt} tokens x D)")
    return image_embeds.reshape(n * tpt, image_embeds.shape[2])[plan.index]
