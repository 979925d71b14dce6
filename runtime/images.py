"""Image decoding and preprocessing on the host (numpy + Pillow only), driven by the bundle manifest.

One image, from file to the LLM's image tokens::

    image = load_image("photo.jpg", max_pixels)       # safe decode -> RGB PIL image
    pre = preprocess(image, manifest)                   # -> pixel_values [num_tiles, 3, S, S] float32
    embeds = vision_graph(pre.pixel_values)             # -> [num_tiles, tokens_per_tile, D]
    tokens = pre.select_tokens(embeds)                  # -> [pre.n_image_tokens, D] (ISS stitch or concat)

Decoding rules (documented here because they change pixel values):
- Only the decoders in :data:`ALLOWED_FORMATS` (or a :class:`DecodeLimits`' ``formats``) see the bytes.
- The pixel count is read from the header (``Image.open`` is lazy) and checked against ``max_pixels``
  before any pixel is decoded, and so is the decode's memory (``DecodeLimits.max_bytes``); Pillow's own
  decompression-bomb guard is turned into the same error.
- Transparency (RGBA, LA, PA, palette or grey/RGB with a transparent colour) is composited onto
  white, as transformers' ``convert_to_rgb`` does, so the runtime matches the reference processors.
- 16-bit grey (``I;16*``) is scaled by 255/65535; 32-bit integer grey (``I``) the same when its values
  fit 0..65535 (16-bit PNG/TIFF data), otherwise min-max stretched; float grey (``F``) by 255 when its
  values lie in [0, 1], otherwise min-max stretched. Values are rounded, never clipped.
- EXIF orientation is applied (``ImageOps.exif_transpose``); multi-frame files use their first frame.
- CMYK, YCbCr, 1-bit, palette and grey images go through Pillow's conversion to RGB.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import iss
from .contract import Manifest
from .errors import BundleError, ImageError

# Used when no limit is given (the exporter writes the same default into preprocess.max_image_pixels):
# below Pillow's own bomb warning (~89.5 Mpx) and far above any camera photo.
DEFAULT_MAX_PIXELS = 50_000_000
# A CLIP shortest-edge resize of a very thin image (1 x 10000 -> 448 x 4,480,000) would allocate GBs
# only to throw nearly all of it away in the center crop. Above this many resized pixels only the
# cropped window is resampled (Pillow's ``box``), which can differ from the full resize by 1/255.
_FULL_RESIZE_MAX_PIXELS = 1 << 24

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Only these decoders ever see image bytes (``Image.open(..., formats=...)``): the common camera and
# web formats. Pillow's other plugins (EPS, which runs Ghostscript; PSD, ICO, TGA, DDS, PCX, ...) are
# attack surface no camera frame needs. ``flashvl serve --image-formats`` narrows this further.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass
class DecodeLimits:
    """What decoding one image may cost, beyond the pixel limit (``flashvl serve --max-image-bytes``,
    ``--max-concurrent-decodes``, ``--image-formats``; the server hands one to its pipeline).

    ``max_bytes``: the memory a decode needs, estimated from the header before any pixel is decoded
    (the source pixels at their mode's depth plus the RGB result), so a 95 KB PNG of 1 x 49,000,000
    pixels, under a 50 Mpx limit, is refused at no cost. ``formats``: the decoders allowed.
    ``max_concurrent``: decodes at once through these limits (the others wait, at most ``wait_s``)."""

    max_bytes: int | None = None
    formats: tuple = ALLOWED_FORMATS
    max_concurrent: int | None = None
    wait_s: float = 30.0

    def __post_init__(self) -> None:
        self.slots = threading.BoundedSemaphore(self.max_concurrent) if self.max_concurrent else None


DEFAULT_LIMITS = DecodeLimits()


# bytes per pixel as Pillow holds a decoded image of each mode (multi-band modes take 4)
def _bytes_per_pixel(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_bytes(width: int, height: int, mode: str) -> int:
    """Estimated memory to decode a ``width`` x ``height`` image of ``mode`` and convert it to RGB."""
    return int(width) * int(height) * (_bytes_per_pixel(mode) + 4)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Pillow's decoders raise a variety of exception types on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError,
                  NotImplementedError, Image.DecompressionBombError, UnidentifiedImageError)


# ============================================================================================
# Decoding


def load_image(src: ImageSource, max_pixels: int | None = None, limits: DecodeLimits | None = None) -> Image.Image:
    """Decode ``src`` (path, bytes, file object, PIL image or HxW[xC] array) into an RGB PIL image.

    Raises :class:`ImageError` (one line: what is wrong, which input, what to do) for missing,
    empty, non-image, corrupt or truncated inputs and for images above ``max_pixels``
    (default :data:`DEFAULT_MAX_PIXELS`) or ``limits`` (:class:`DecodeLimits`: decode bytes, formats;
    default: the formats of :data:`ALLOWED_FORMATS`), the latter before the pixels are decoded.
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    limits = DEFAULT_LIMITS if limits is None else limits
    if isinstance(src, np.ndarray):
        return _from_array(src, limit)
    if isinstance(src, Image.Image):
        return _decode(src, "the given PIL image", limit)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("the image data is empty (0 bytes); pass the bytes of an image file")
        return _open_and_decode(io.BytesIO(bytes(src)), "the given image bytes", limit, limits)
    if hasattr(src, "read"):
        return _open_and_decode(src, "the given image stream", limit, limits)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = repr(str(path))
        if not path.exists():
            raise ImageError(f"image file {name} does not exist; check the path")
        if path.is_dir():
            raise ImageError(f"{name} is a directory, not an image file; pass the path of an image")
        try:
            size = path.stat().st_size
            if size == 0:
                raise ImageError(f"image file {name} is empty (0 bytes); pass a valid image file")
            f = open(path, "rb")
        except OSError as e:
            raise ImageError(f"cannot open image file {name}: {e.strerror or e}; check its permissions") from None
        with f:
            return _open_and_decode(f, f"image file {name}", limit, limits)
    raise ImageError(
        f"cannot read an image from a {type(src).__name__}; pass a path, bytes, a PIL image or a numpy array")


def _open_and_decode(fp, name: str, limit: int, limits: DecodeLimits = DEFAULT_LIMITS) -> Image.Image:
    formats = tuple(limits.formats or ALLOWED_FORMATS)
    try:
        with warnings.catch_warnings():
            # Our own limit (checked next, from the header) decides; Pillow's warning adds nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=list(formats))
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large to decode safely ({e}); downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not a readable image (unknown or disallowed format, or corrupt header); "
                         f"pass a {', '.join(formats[:-1])} or {formats[-1]} image" if len(formats) > 1 else
                         f"{name} is not a readable image (unknown or disallowed format, or corrupt header); "
                         f"pass a {formats[0]} image") from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name} is corrupt and cannot be read ({_short(e)}); re-save or replace it") from None
    with im:
        _check_pixels(im.width, im.height, name, limit)
        _check_bytes(im.width, im.height, im.mode, name, limits.max_bytes)
        slots = limits.slots
        if slots is None:
            return _decode(im, name, limit)
        if not slots.acquire(timeout=limits.wait_s):
            raise ImageError(f"{name} could not be decoded: every decode slot stayed busy for {limits.wait_s:g} s "
                             "(--max-concurrent-decodes); retry")
        try:
            return _decode(im, name, limit)
        finally:
            slots.release()


def _check_bytes(width: int, height: int, mode: str, name: str, max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    need = decode_bytes(width, height, mode)
    if need > max_bytes:
        raise ImageError(f"{name} ({width}x{height}, mode {mode}) needs about {need / 2**20:,.0f} MiB to decode, "
                         f"above the limit of {max_bytes / 2**20:,.0f} MiB (--max-image-bytes); downscale it first")


def _decode(im: Image.Image, name: str, limit: int) -> Image.Image:
    """Check the header size, decode fully, orient and convert to RGB (the input is left untouched)."""
    _check_pixels(im.width, im.height, name, limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name} is truncated or corrupt and cannot be decoded ({_short(e)}); "
                         "re-save or replace the file") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make a readable image unreadable
        pass
    try:
        return _to_rgb(im)
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name} has pixel mode {im.mode!r} that cannot be converted to RGB ({_short(e)}); "
                         "re-save it as RGB or greyscale") from None


def _check_pixels(width: int, height: int, name: str, limit: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{name} has an empty size {width}x{height}; pass a non-empty image")
    if width * height > limit:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of {limit:,}; "
            "downscale it first or raise the limit (preprocess.max_image_pixels)")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, following the rules in the module docstring."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(im), mode), "L").convert("RGB")
    if "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None:
        return _composite_on_white(im.convert("RGBA"))
    if mode == "RGB":
        return im.copy()
    return im.convert("RGB")


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer or float greyscale -> uint8 by scaling (never by clipping)."""
    a = a.astype(np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = a * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif hi > lo:  # unknown range: stretch what is there onto 0..255
        scaled = (a - lo) * (255.0 / (hi - lo))
    else:  # a constant image of unknown range: keep its value where it is representable
        scaled = np.clip(a, 0, 255)
    return np.rint(scaled).astype(np.uint8)


def _from_array(a: np.ndarray, limit: int) -> Image.Image:
    name = f"the given {a.dtype} array of shape {tuple(a.shape)}"
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(f"{name} is not an image; pass HxW, HxWx3 (RGB) or HxWx4 (RGBA), channels last")
    _check_pixels(a.shape[1], a.shape[0], name, limit)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.rint(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ImageError(f"{name} has values outside 0..255; pass uint8, uint16, or floats in [0, 1]")
        a = a.astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise ImageError(f"{name} has float values outside [0, 1]; scale it to [0, 1] or pass uint8")
        a = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"{name} has an unsupported dtype; pass uint8, uint16, bool or float pixels")
    a = np.ascontiguousarray(a)
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.shape[-1] == 4:
        return _composite_on_white(Image.fromarray(a, "RGBA"))
    return Image.fromarray(a, "RGB")


# ============================================================================================
# The manifest's preprocessing parameters


@dataclass(frozen=True)
class PreprocessConfig:
    """The parts of the manifest (``preprocess``, ``vision``, ``iss``, ``image``) preprocessing uses."""

    mode: str                     # "clip" | "tiles"
    image_size: int               # S: the vision graph's square input (tile) size in pixels
    tokens_per_tile: int          # T = t*t tokens the vision graph returns per tile
    tokens_per_side: int          # t
    resize_shortest_edge: int | None
    crop_size: tuple[int, int]    # (height, width)
    do_center_crop: bool
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    max_image_pixels: int
    iss_enabled: bool
    overlap_tokens: int
    pixels_per_token: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "PreprocessConfig":
        """The manifest's sections, already validated by :class:`~.contract.Manifest`, flattened."""
        pre, iss = manifest.preprocess, manifest.iss
        return cls(
            mode=pre.mode, image_size=pre.image_size, tokens_per_tile=manifest.image.tokens_per_tile,
            tokens_per_side=manifest.vision.tokens_per_side, resize_shortest_edge=pre.resize_shortest_edge,
            crop_size=(pre.crop_size, pre.crop_size), do_center_crop=pre.do_center_crop,
            rescale_factor=pre.rescale_factor, image_mean=pre.image_mean, image_std=pre.image_std,
            resample=_RESAMPLE[pre.resample], min_tiles=pre.min_tiles, max_tiles=pre.max_tiles,
            use_thumbnail=pre.use_thumbnail, max_image_pixels=pre.max_image_pixels,
            iss_enabled=iss.enabled and pre.mode == "tiles",
            overlap_tokens=iss.overlap_tokens if iss.enabled else 0, pixels_per_token=iss.pixels_per_token)


# ============================================================================================
# Geometry: tile grid and token plan (no pixels needed)


def choose_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid whose aspect ratio is closest to the image's.

    InternVL's ``find_closest_aspect_ratio`` as transformers' GotOcr2 processor implements it: grids
    with min_tiles <= rows*cols <= max_tiles, visited by increasing tile count; on an exact tie of the
    aspect-ratio difference the later (larger) grid wins while the image area exceeds half the grid's
    pixel area, i.e. small images do not get more tiles than they can fill.
    """
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


@dataclass(frozen=True, eq=False)
class TokenPlan:
    """How one image becomes vision-graph tiles and then the LLM's image tokens."""

    mode: str                            # "clip" | "tiles"
    grid: tuple[int, int]                # (rows, cols) of the crop tiles; (1, 1) in clip mode
    thumbnail: bool                      # a global thumbnail tile follows the crop tiles
    tokens_per_tile: int
    n_image_tokens: int
    canvas_size: tuple[int, int] | None  # (width, height) the image is resized to before cutting tiles
    tile_boxes: np.ndarray | None        # [rows*cols, 4] (left, top, right, bottom) on the canvas
    stitch: iss.StitchPlan | None        # the ISS gather, None: tokens are the tiles' tokens concatenated

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1] + (1 if self.thumbnail else 0)

    def select_tokens(self, image_embeds: np.ndarray) -> np.ndarray:
        """Vision outputs ``[num_tiles, tokens_per_tile, D]`` -> the LLM's ``[n_image_tokens, D]``."""
        emb = np.asarray(image_embeds)
        if emb.ndim != 3 or emb.shape[:2] != (self.num_tiles, self.tokens_per_tile):
            raise BundleError(
                f"the vision graph returned image embeddings of shape {tuple(emb.shape)}, but the manifest "
                f"expects [{self.num_tiles}, {self.tokens_per_tile}, D]; the bundle is inconsistent, re-export it")
        if self.stitch is not None:
            return iss.stitch(emb, self.stitch)
        return emb.reshape(-1, emb.shape[2])


def image_to_tokens_plan(width: int, height: int, manifest_or_config: Manifest | PreprocessConfig,
                         max_tiles: int | None = None) -> TokenPlan:
    """The token plan of a ``width x height`` image: lets a caller count image tokens (and check the
    context) before running the vision graph. ``max_tiles`` may lower the bundle's tile budget."""
    cfg = _config(manifest_or_config)
    if cfg.mode == "clip":
        return TokenPlan("clip", (1, 1), False, cfg.tokens_per_tile, cfg.tokens_per_tile, None, None, None)
    hi = cfg.max_tiles
    if max_tiles is not None:
        if not cfg.min_tiles <= max_tiles <= cfg.max_tiles:
            raise ImageError(f"max_tiles {max_tiles} is outside this bundle's range "
                             f"[{cfg.min_tiles}, {cfg.max_tiles}]; pick a value in it")
        hi = max_tiles
    s = cfg.image_size
    rows, cols = choose_grid(width, height, s, cfg.min_tiles, hi)
    thumbnail = cfg.use_thumbnail and rows * cols != 1  # InternVL: no thumbnail of a single tile
    overlap_px = cfg.overlap_tokens * cfg.pixels_per_token
    t = cfg.tokens_per_side
    if cfg.iss_enabled:
        plan = iss.stitch_plan(rows, cols, t, cfg.overlap_tokens, thumbnail)
        n_tokens = plan.n_tokens
    else:
        plan, n_tokens = None, (rows * cols + thumbnail) * cfg.tokens_per_tile
    return TokenPlan("tiles", (rows, cols), thumbnail, cfg.tokens_per_tile, n_tokens,
                     iss.canvas_size(rows, cols, s, overlap_px), iss.tile_boxes(rows, cols, s, overlap_px), plan)


def _config(m: Manifest | PreprocessConfig) -> PreprocessConfig:
    return m if isinstance(m, PreprocessConfig) else PreprocessConfig.from_manifest(m)


# ============================================================================================
# Pixels


@dataclass
class PreprocessedImage:
    """Vision-graph input for one image, plus the plan that turns its outputs into LLM tokens."""

    pixel_values: np.ndarray            # float32 [num_tiles, 3, H, W]
    plan: TokenPlan
    original_size: tuple[int, int]      # (width, height) after EXIF orientation

    @property
    def n_image_tokens(self) -> int:
        return self.plan.n_image_tokens

    @property
    def num_tiles(self) -> int:
        return self.plan.num_tiles

    def select_tokens(self, image_embeds: np.ndarray) -> np.ndarray:
        """The one call the pipeline makes: ``[num_tiles, T, D]`` -> ``[n_image_tokens, D]``."""
        return self.plan.select_tokens(image_embeds)


def preprocess(image: ImageSource, manifest_or_config: Manifest | PreprocessConfig,
               max_tiles: int | None = None) -> PreprocessedImage:
    """Image (anything :func:`load_image` takes) -> :class:`PreprocessedImage`, per the manifest."""
    cfg = _config(manifest_or_config)
    im = load_image(image, cfg.max_image_pixels)
    plan = image_to_tokens_plan(im.width, im.height, cfg, max_tiles)
    if cfg.mode == "clip":
        pixels = _normalize(_clip_resize_crop(im, cfg), cfg)[None]
    else:
        canvas_w, canvas_h = plan.canvas_size
        canvas = _normalize(np.asarray(im.resize((canvas_w, canvas_h), resample=cfg.resample)), cfg)
        tiles = [canvas[:, top:bottom, left:right] for left, top, right, bottom in plan.tile_boxes]
        if plan.thumbnail:
            s = cfg.image_size
            tiles.append(_normalize(np.asarray(im.resize((s, s), resample=cfg.resample)), cfg))
        pixels = np.stack(tiles)
    return PreprocessedImage(np.ascontiguousarray(pixels, dtype=np.float32), plan, (im.width, im.height))


def _normalize(hwc_uint8: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW, with transformers' arithmetic (rescale in float64, then float32)."""
    x = (hwc_uint8.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x.transpose(2, 0, 1)


def clip_resize_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) after the CLIP resize: shortest edge -> ``resize_shortest_edge`` with the long
    edge truncated like transformers' ``get_resize_output_image_size``; without a shortest edge, the
    crop size itself (processors configured with ``size={"height", "width"}``)."""
    s = cfg.resize_shortest_edge
    if s is None:
        return cfg.crop_size[1], cfg.crop_size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(s * long / short)
    return (s, new_long) if width <= height else (new_long, s)


def _clip_resize_crop(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """CLIPImageProcessor's resize + center crop (zero padding where the crop exceeds the image)."""
    rw, rh = clip_resize_size(im.width, im.height, cfg)
    if not cfg.do_center_crop:
        return np.asarray(im.resize((rw, rh), resample=cfg.resample))
    ch, cw = cfg.crop_size
    # transformers' center_crop: output[i, j] = resized[top + i, left + j] where inside, else 0.
    top, left = (rh - ch) // 2, (rw - cw) // 2
    y0, y1 = max(top, 0), min(top + ch, rh)
    x0, x1 = max(left, 0), min(left + cw, rw)
    if rw * rh <= _FULL_RESIZE_MAX_PIXELS:
        window = np.asarray(im.resize((rw, rh), resample=cfg.resample))[y0:y1, x0:x1]
    else:
        sx, sy = im.width / rw, im.height / rh
        box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        window = np.asarray(im.resize((x1 - x0, y1 - y0), resample=cfg.resample, box=box))
    if window.shape[:2] == (ch, cw):
        return window
    out = np.zeros((ch, cw, 3), np.uint8)
    out[y0 - top:y1 - top, x0 - left:x1 - left] = window
    return out
