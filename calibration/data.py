"""Calibration data: which (image, prompt) samples, and the graph inputs captured from them.

Samples come from the user's ``--images`` folder and ``--prompts`` file, or from a built-in offline
set: real photos shipped with scikit-image plus charts, tables and documents rendered with Pillow
(deterministic), and the prompts in ``data/prompts.txt``. Sample *i* pairs image *i* with prompt
*i mod len(prompts)*. A fixed, evenly spread subset is held out for the accuracy report and never
used to calibrate.

Inputs are captured by running the FP bundle through the runtime itself (``runtime.Pipeline``: the
same image decoding, tiling, chat template, placeholder expansion and embedding splice as
``flashvl chat``), so the quantizers see exactly what the graphs see in use:

* vision: the preprocessed tiles (``pixel_values`` [num_tiles, 3, H, W]) of each image;
* LLM: the prefill ``inputs_embeds`` [1, seq, hidden] (image embeddings spliced in), with an all-ones
  ``attention_mask``, ``position_ids`` 0..seq-1 and an empty KV cache.

For the held-out samples the FP references are captured too (image embeddings; a greedy continuation
and the FP logits along it), so a report only has to run the quantized graphs. Everything is saved
to one ``.npz`` keyed by the bundle's graph hashes and a fingerprint of the data; a second run with
the same bundle and data loads it instead of running the FP graphs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flashvl_edge.runtime.errors import CalibrationError, FlashVLError

# Bump when what is captured or how changes: old cache files are then simply not found.
CAPTURE_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_SAMPLES = 16
DEFAULT_HOLDOUT = 4
DEFAULT_REPORT_TOKENS = 16
# How often the FP graphs were actually run to capture data in this process (tests read it).
capture_count = 0


# ============================================================================================
# Samples


@dataclass
class Sample:
    name: str                 # file name, or "builtin:<name>"
    image: Image.Image        # decoded RGB
    prompt: str

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(f"{self.image.width}x{self.image.height}".encode())
        h.update(self.image.tobytes())
        h.update(self.prompt.encode())
        return h.hexdigest()


def load_prompts(path: str | os.PathLike | None, placeholder: str = "<image>") -> list[str]:
    """Prompts from ``path`` (or the built-in list): one per line, ``#`` comments and blanks skipped.

    The built-in file writes the image placeholder as ``<image>``; it is rewritten to the bundle's own
    placeholder. A line with more than one placeholder is refused (each sample has one image).
    """
    if path is None:
        text = resources.files("flashvl_edge.calibration").joinpath("data/prompts.txt").read_text("utf-8")
        where = "the built-in prompts"
    else:
        p = Path(path)
        where = f"--prompts file {str(p)!r}"
        if not p.is_file():
            raise CalibrationError(f"{where} does not exist or is not a file; pass a text file with one prompt per line")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CalibrationError(f"{where} is not UTF-8 text; pass a text file with one prompt per line") from None
        except OSError as e:
            raise CalibrationError(f"cannot read {where}: {e.strerror or e}") from None
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if placeholder != "<image>":
            line = line.replace("<image>", placeholder)
        if line.count(placeholder) > 1:
            raise CalibrationError(f"{where}, line {lineno}: more than one {placeholder!r}; each calibration "
                                   "sample has one image, use at most one placeholder per prompt")
        if "\x00" in line:
            raise CalibrationError(f"{where}, line {lineno}: contains a NUL byte; is this a text file?")
        prompts.append(line)
    if not prompts:
        raise CalibrationError(f"{where} has no prompts (only blank or # lines); add one prompt per line")
    return prompts


def _photo(name: str) -> Callable[[], Image.Image]:
    def make() -> Image.Image:
        from flashvl_edge.runtime.samples import test_photo

        return test_photo(name)
    return make


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # older Pillow / no FreeType: the fixed bitmap font


def _bar_chart() -> Image.Image:
    im = Image.new("RGB", (800, 560), "white")
    d = ImageDraw.Draw(im)
    values = [23, 41, 35, 58, 49, 66, 30]
    labels = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3"]
    d.text((250, 20), "Visitors per day (thousands)", fill="black", font=_font(28))
    d.line((80, 480, 760, 480), fill="black", width=3)
    d.line((80, 480, 80, 80), fill="black", width=3)
    for tick in range(0, 71, 10):
        y = 480 - tick * 5.5
        d.line((72, y, 80, y), fill="black", width=2)
        d.text((30, y - 10), str(tick), fill="black", font=_font(18))
    for i, (v, lab, c) in enumerate(zip(values, labels, colors)):
        x0 = 110 + i * 92
        d.rectangle((x0, 480 - v * 5.5, x0 + 60, 480), fill=c, outline="black")
        d.text((x0 + 12, 490), lab, fill="black", font=_font(20))
        d.text((x0 + 15, 480 - v * 5.5 - 26), str(v), fill="black", font=_font(20))
    return im


def _line_chart() -> Image.Image:
    im = Image.new("RGB", (900, 500), "#f7f7f7")
    d = ImageDraw.Draw(im)
    d.text((300, 15), "Temperature in 2024 (deg C)", fill="#222", font=_font(26))
    months = "JFMAMJJASOND"
    series = {"Oslo": [-4, -3, 1, 6, 11, 15, 18, 17, 12, 7, 1, -3],
              "Rome": [8, 9, 12, 15, 19, 24, 27, 27, 23, 18, 13, 9]}
    for gy in range(-10, 31, 10):
        y = 430 - (gy + 10) * 9
        d.line((70, y, 870, y), fill="#cccccc", width=1)
        d.text((20, y - 10), str(gy), fill="#222", font=_font(18))
    for (name, ys), color in zip(series.items(), ["#1f77b4", "#d62728"]):
        pts = [(100 + i * 68, 430 - (v + 10) * 9) for i, v in enumerate(ys)]
        d.line(pts, fill=color, width=4)
        for x, y in pts:
            d.ellipse((x - 5, y - 5, x + 5, y + 5), fill=color)
        d.text((pts[-1][0] - 40, pts[-1][1] - 30), name, fill=color, font=_font(20))
    for i, m in enumerate(months):
        d.text((95 + i * 68, 445), m, fill="#222", font=_font(20))
    return im


def _pie_chart() -> Image.Image:
    im = Image.new("RGB", (640, 480), "white")
    d = ImageDraw.Draw(im)
    shares = [("Solar", 34, "#f2c14e"), ("Wind", 27, "#5fad56"), ("Hydro", 21, "#4d9de0"), ("Gas", 18, "#e15554")]
    start = -90.0
    for name, pct, color in shares:
        end = start + pct * 3.6
        d.pieslice((40, 60, 400, 420), start, end, fill=color, outline="white", width=3)
        start = end
    d.text((40, 15), "Electricity mix", fill="black", font=_font(28))
    for i, (name, pct, color) in enumerate(shares):
        d.rectangle((440, 140 + i * 50, 470, 170 + i * 50), fill=color)
        d.text((485, 142 + i * 50), f"{name} {pct}%", fill="black", font=_font(22))
    return im


def _table() -> Image.Image:
    rows = [("Item", "Qty", "Price", "Total"), ("Apples", "4", "0.50", "2.00"), ("Bread", "1", "2.30", "2.30"),
            ("Milk", "2", "1.10", "2.20"), ("Coffee", "1", "6.90", "6.90"), ("Eggs", "12", "0.25", "3.00")]
    im = Image.new("RGB", (720, 420), "white")
    d = ImageDraw.Draw(im)
    for r, row in enumerate(rows):
        y = 30 + r * 62
        if r == 0:
            d.rectangle((30, y, 690, y + 62), fill="#dde6f0")
        for c, cell in enumerate(row):
            d.text((50 + c * 165, y + 18), cell, fill="black", font=_font(24))
        d.line((30, y, 690, y), fill="black", width=2)
    d.line((30, 30 + len(rows) * 62, 690, 30 + len(rows) * 62), fill="black", width=2)
    for c in range(5):
        d.line((30 + c * 165, 30, 30 + c * 165, 30 + len(rows) * 62), fill="black", width=2)
    return im


_DOC = ("Quarterly report. Revenue grew by 12 percent compared with the same quarter last year, "
        "driven by strong sales of edge devices in Europe and Asia. Operating costs stayed flat. "
        "The board approved a new research program on low-power vision models. Next steps: "
        "finish the migration of the data center, hire twenty engineers, and publish the annual "
        "sustainability report before the end of March.")


def _document() -> Image.Image:
    im = Image.new("RGB", (620, 880), "#fffdf5")
    d = ImageDraw.Draw(im)
    d.text((40, 40), "ACME Corporation", fill="#0b3d91", font=_font(36))
    d.line((40, 90, 580, 90), fill="#0b3d91", width=3)
    words, line, y = _DOC.split(), "", 120
    for w in words:
        if d.textlength(line + " " + w, font=_font(22)) > 540:
            d.text((40, y), line.strip(), fill="black", font=_font(22))
            line, y = "", y + 34
        line += " " + w
    d.text((40, y), line.strip(), fill="black", font=_font(22))
    d.rectangle((40, y + 60, 580, y + 300), outline="#888", width=2)
    d.text((60, y + 170), "Figure 1: sales by region", fill="#555", font=_font(20))
    return im


def _receipt() -> Image.Image:
    im = Image.new("RGB", (360, 720), "white")
    d = ImageDraw.Draw(im)
    lines = ["CORNER CAFE", "12 Harbour Street", "", "Cappuccino      3.40", "Croissant       2.10",
             "Orange juice    2.80", "Bagel           2.60", "", "TOTAL          10.90", "CARD        ****4821",
             "", "Thank you!"]
    for i, text in enumerate(lines):
        d.text((30, 30 + i * 52), text, fill="black", font=_font(24))
    return im


def _sign() -> Image.Image:
    im = Image.new("RGB", (700, 300), "#b22222")
    d = ImageDraw.Draw(im)
    d.rectangle((15, 15, 685, 285), outline="white", width=8)
    d.text((120, 90), "STOP", fill="white", font=_font(110))
    return im


# (name, factory): photos first, then rendered images. Order matters: held-out samples are picked
# evenly across it, so both kinds are always in the report.
BUILTIN_IMAGES: list[tuple[str, Callable[[], Image.Image]]] = [
    *[(n, _photo(n)) for n in ("astronaut", "coffee", "chelsea", "rocket", "text", "page", "camera", "coins",
                                "hubble_deep_field", "immunohistochemistry", "logo", "retina", "colorwheel",
                                "clock", "moon")],
    ("bar_chart", _bar_chart), ("line_chart", _line_chart), ("pie_chart", _pie_chart), ("table", _table),
    ("document", _document), ("receipt", _receipt), ("sign", _sign),
]


def _user_images(folder: str | os.PathLike, needed: int | None, max_pixels: int | None):
    """Decode images from ``folder`` in name order until ``needed`` (or all) are read."""
    from flashvl_edge.runtime.images import load_image

    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"--images {str(root)!r} is not a directory; pass a folder of calibration images")
    try:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    except OSError as e:
        raise CalibrationError(f"cannot list --images {str(root)!r}: {e.strerror or e}") from None
    if not files:
        raise CalibrationError(f"--images {str(root)!r} contains no images ({', '.join(IMAGE_SUFFIXES)}); "
                               "add some or leave --images out to use the built-in set")
    images, skipped = [], []
    for p in files:
        if needed is not None and len(images) >= needed:
            break
        try:
            images.append((p.name, load_image(p, max_pixels)))
        except FlashVLError as e:
            skipped.append(f"{p.name}: {e}")
    for s in skipped:
        print(f"flashvl calibrate: skipping unreadable image {s}", file=sys.stderr)
    if not images:
        raise CalibrationError(f"none of the {len(files)} image files in --images {str(root)!r} could be read "
                               f"(first problem: {skipped[0]}); check the files")
    return images


@dataclass
class SampleSet:
    calibration: list[Sample]
    held_out: list[Sample]
    source: str                        # "builtin" or the images folder

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for group in (self.calibration, self.held_out):
            h.update(b"|")
            for s in group:
                h.update(s.fingerprint().encode())
        return h.hexdigest()


def select_samples(images_dir: str | os.PathLike | None, prompts: list[str], samples: int | None,
                   holdout: int = DEFAULT_HOLDOUT, max_pixels: int | None = None) -> SampleSet:
    """Pick ``samples`` calibration samples and ``holdout`` held-out ones (evenly spread) from the pool."""
    if samples is not None and samples < 1:
        raise CalibrationError(f"--samples must be at least 1, got {samples}")
    if holdout < 1:
        raise CalibrationError(f"--holdout must be at least 1 (the report needs held-out samples), got {holdout}")
    wanted = None if samples is None else samples + holdout
    if images_dir is None:
        pool_size = len(BUILTIN_IMAGES)
        source = "builtin"
        if wanted is not None and wanted > pool_size:
            raise CalibrationError(
                f"--samples {samples} plus {holdout} held out needs {wanted} images but the built-in set has "
                f"{pool_size}; lower --samples or pass --images with more images")
        pool = [(f"builtin:{n}", f) for n, f in BUILTIN_IMAGES]
    else:
        source = str(images_dir)
        loaded = _user_images(images_dir, wanted if wanted is not None else DEFAULT_SAMPLES + holdout, max_pixels)
        if wanted is not None and len(loaded) < wanted:
            raise CalibrationError(
                f"--images {source!r} has {len(loaded)} readable images but --samples {samples} plus {holdout} "
                f"held out for the report needs {wanted}; add images or lower --samples")
        if len(loaded) <= holdout:
            raise CalibrationError(
                f"--images {source!r} has {len(loaded)} readable images; at least {holdout + 1} are needed "
                f"({holdout} held out for the report); add images")
        pool = [(n, (lambda im=im: im)) for n, im in loaded]
    n_cal = samples if samples is not None else min(DEFAULT_SAMPLES, len(pool) - holdout)
    if n_cal < 1:
        raise CalibrationError(f"--holdout {holdout} leaves no calibration samples out of {len(pool)} images; "
                               "lower --holdout or add images")
    pool = pool[: n_cal + holdout]
    held_idx = set(np.linspace(0, len(pool) - 1, holdout).round().astype(int).tolist())
    cal, held = [], []
    for i, (name, make) in enumerate(pool):
        target = held if i in held_idx else cal
        target.append(Sample(name, make(), prompts[i % len(prompts)]))
    return SampleSet(cal, held, source)


# ============================================================================================
# Capture (through the runtime) and the on-disk cache


@dataclass
class Captured:
    """Graph inputs and FP references, as loaded from or written to the cache."""

    calib_pixels: list[np.ndarray]          # per sample [num_tiles, 3, H, W]
    calib_embeds: list[np.ndarray]          # per sample prefill inputs_embeds [1, seq, hidden]
    held_pixels: list[np.ndarray]
    held_image_embeds: list[np.ndarray]     # FP vision output [num_tiles, T, D]
    held_embeds: list[np.ndarray]           # FP prefill inputs_embeds
    held_tokens: list[np.ndarray]           # FP greedy continuation ids [K]
    held_logits: list[np.ndarray]           # FP logits along it [K, vocab]
    names: dict[str, list[str]] = field(default_factory=dict)
    cache_path: Path | None = None
    cache_hit: bool = False


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    base = os.environ.get("FLASHVL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashvl-edge")
    return Path(base) / "calibration"


def bundle_fingerprint(bundle) -> str:
    """Hash of what capture depends on: graph/embedding/tokenizer file hashes and the input sections."""
    m = bundle.manifest
    h = hashlib.sha256()
    for name in sorted(m.files):
        if name.startswith("engines/"):
            continue
        h.update(f"{name}={m.files[name].sha256};".encode())
    sections = m.to_json()  # hashed as written, so the key is stable across reader changes
    for key in ("image", "preprocess", "iss", "chat_template", "generation", "embeddings"):
        h.update(json.dumps(sections[key], sort_keys=True).encode())
    return h.hexdigest()


def _cache_key(bundle, samples: SampleSet, report_tokens: int, held_out_only: bool = False) -> str:
    h = hashlib.sha256()
    h.update(f"v{CAPTURE_VERSION}|{bundle_fingerprint(bundle)}|{samples.fingerprint()}|{report_tokens}".encode())
    if held_out_only:
        h.update(b"|held-out-only")
    return h.hexdigest()[:32]


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a partial file never sits under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _captured(arrays, path: Path | None, hit: bool) -> Captured:
    meta = json.loads(bytes(np.asarray(arrays["meta"])).decode())
    nc, nh = meta["n_calib"], meta["n_held"]

    def group(prefix: str, n: int) -> list[np.ndarray]:
        return [np.asarray(arrays[f"{prefix}_{i}"]) for i in range(n)]

    return Captured(group("calib_pixels", nc), group("calib_embeds", nc), group("held_pixels", nh),
                    group("held_image_embeds", nh), group("held_embeds", nh), group("held_tokens", nh),
                    group("held_logits", nh), names=meta["names"], cache_path=path, cache_hit=hit)


def _load_npz(path: Path) -> Captured | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return _captured(z, path, hit=True)
    except (OSError, ValueError, KeyError, EOFError):
        return None  # missing or damaged: capture again


def greedy_reference(generator, prefill_embeds: np.ndarray, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuation of ``n_tokens`` (no stopping) from a prefill, and the logits that chose each
    token, through the runtime's ``Generator`` (the decode loop ``flashvl chat`` runs)."""
    tokens, logits = generator.greedy(generator.llm.new_cache(), inputs_embeds=prefill_embeds,
                                      n_tokens=n_tokens, stop=False)
    return np.asarray(tokens, np.int64), logits


def capture(bundle_path: str | os.PathLike, samples: SampleSet, report_tokens: int = DEFAULT_REPORT_TOKENS,
            cache: str | os.PathLike | None = None, progress: bool = True, held_out_only: bool = False) -> Captured:
    """Inputs for both graphs (calibration split) and FP references (held-out split), cached on disk.

    ``held_out_only``: capture just the held-out split, for quantizers that need no calibration data
    (INT4 round-to-nearest): at full size that saves minutes of vision and prefill runs."""
    from flashvl_edge.runtime.bundle import Bundle
    from flashvl_edge.runtime.pipeline import Pipeline

    bundle = Bundle.load(bundle_path, verify="cached")
    path = cache_dir(cache) / f"{_cache_key(bundle, samples, report_tokens, held_out_only)}.npz"
    if path.is_file():
        got = _load_npz(path)
        if got is not None:
            return got

    global capture_count
    capture_count += 1
    pipe = Pipeline.from_bundle(bundle_path, backend="ort", device="cpu", image_cache_bytes=0, kv_cache_bytes=0)
    try:
        from tqdm import tqdm

        arrays: dict[str, np.ndarray] = {}
        all_samples = ([] if held_out_only else [("calib", s) for s in samples.calibration]) \
            + [("held", s) for s in samples.held_out]
        counters = {"calib": 0, "held": 0}
        for split, s in tqdm(all_samples, desc="capturing calibration inputs", unit="sample",
                             disable=not progress, file=sys.stderr):
            i = counters[split]
            counters[split] += 1
            try:
                inputs = pipe.prefill_inputs(s.prompt, s.image)
                pixels, embeds = inputs.pixel_values, inputs.inputs_embeds
            except FlashVLError as e:
                raise CalibrationError(f"calibration sample {s.name!r} cannot be used: {e}") from None
            arrays[f"{split}_pixels_{i}"] = pixels
            arrays[f"{split}_embeds_{i}"] = embeds
            if split == "held":
                out = pipe.vision.infer({"pixel_values": pixels})
                arrays[f"held_image_embeds_{i}"] = np.asarray(out["image_embeds"], np.float32)
                toks, logits = greedy_reference(pipe.generator, embeds, report_tokens)
                arrays[f"held_tokens_{i}"] = toks
                arrays[f"held_logits_{i}"] = logits
        meta = {"n_calib": counters["calib"], "n_held": counters["held"],
                "names": {"calibration": [] if held_out_only else [s.name for s in samples.calibration],
                          "held_out": [s.name for s in samples.held_out]}}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    finally:
        pipe.close()
    try:
        _save_npz(path, arrays)
    except OSError as e:  # an unwritable cache only costs the next run a recapture
        print(f"flashvl calibrate: cannot write the calibration cache {path}: {e.strerror or e}", file=sys.stderr)
        path = None
    return _captured(arrays, path, hit=False)
