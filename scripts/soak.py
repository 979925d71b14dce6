#!/usr/bin/env python3
"""Soak test: many chat turns in one process; memory and file descriptors must not leak.

    python scripts/soak.py                       # exports tiny-static to a temp dir first (needs torch)
    python scripts/soak.py --bundle build/demo/tiny-static --turns 500

The turns cycle through the ways a long-running edge process is used: one-shot chats about an image
(paths, PIL images, arrays, bytes; odd sizes and pixel modes), text-only chats, streamed replies,
multi-turn sessions that keep the KV cache, varied sampling settings, and now and then a bad input that
must be refused with a FlashVLError (the error path must not leak either).

Measured after a warm-up of ``--warmup`` turns (allocator arenas and ONNX Runtime's caches are filled by
then) and at the end: resident memory (VmRSS, after ``gc.collect()``) must grow by less than
``--max-rss-growth`` (5%), and the number of open file descriptors must not grow. A fixed greedy probe is
asked at the warm-up point and at the end: the same answer both times (no state leaks between turns).
Prints a table and a summary; exits 1 when a limit is broken.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _malloc_trim():
    """glibc's malloc_trim(0), or None where there is no glibc."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def snapshot(trim: bool) -> tuple[int, int]:
    """(RSS, open fds) after ``gc.collect()`` and, with ``trim``, glibc's ``malloc_trim(0)``.

    A leak (memory still referenced) shows either way. Without the trim RSS also follows the allocator's
    high-water mark: a refused 100k-token prompt leaves tens of MiB of *free* heap pages resident, which
    is not a leak; trimming hands those back first so the number counts memory in use.
    """
    gc.collect()
    if trim and MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    return rss_bytes(), open_fds()


def export_tiny(preset: str, where: Path) -> Path:
    out = where / preset
    cmd = [sys.executable, "-m", "flashvl_edge.main", "export", preset, "--out", str(out), "--quiet"]
    print(f"exporting {preset} -> {out}", file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def make_images(where: Path) -> list:
    """Image inputs of every kind the API accepts; real photos when scikit-image is installed."""
    try:
        from skimage import data as skdata

        photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.text(), skdata.page()]
    except ImportError:
        yy, xx = np.mgrid[0:480, 0:640]
        photos = [np.stack([(xx * k) % 256, (yy * k) % 256, ((xx + yy) * k) % 256], -1).astype(np.uint8)
                  for k in (1, 2, 3)]
    items: list = []
    for i, arr in enumerate(photos):
        p = where / f"photo{i}.jpg"
        Image.fromarray(arr).convert("RGB").save(p, quality=90)
        items.append(str(p))
    items.append(Image.fromarray(photos[0]))  # a PIL image
    items.append(photos[1])  # a numpy array
    items.append((where / "photo0.jpg").read_bytes())  # raw bytes
    gray = Image.fromarray(np.asarray(Image.fromarray(photos[2]).convert("L")))
    for mode, name in (("L", "gray.png"), ("P", "palette.png"), ("LA", "gray_alpha.png")):
        p = where / name
        gray.convert(mode).save(p)
        items.append(str(p))
    Image.fromarray(np.stack([np.asarray(gray)] * 4, -1), "CMYK").save(where / "cmyk.jpg")
    items.append(str(where / "cmyk.jpg"))
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(where / "gray16.png")
    items.append(str(where / "gray16.png"))
    for size in ((1, 1), (1, 300), (900, 2)):
        p = where / f"thin_{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (120, 30, 200)).save(p)
        items.append(str(p))
    return items


def bad_inputs(where: Path) -> list[tuple[str, dict]]:
    """(kind, chat kwargs) that must raise a FlashVLError."""
    trunc = where / "truncated.jpg"
    trunc.write_bytes((where / "photo0.jpg").read_bytes()[:2000])
    (where / "empty.png").write_bytes(b"")
    return [
        ("truncated image", {"prompt": "What is this?", "image": str(trunc)}),
        ("empty image file", {"prompt": "What is this?", "image": str(where / "empty.png")}),
        ("empty prompt", {"prompt": ""}),
        ("negative temperature", {"prompt": "hi", "temperature": -1.0}),
        ("over-long prompt", {"prompt": "hello " * 100_000}),
    ]


PROMPTS = ["Describe the image.", "What is in the picture?", "List three colours you see.",
           "Is there any text? Read it.", "Write one sentence about it."]
FOLLOW_UPS = ["And what else?", "Say it in fewer words.", "What colour dominates?"]


def sampling_for(i: int, max_new: int) -> dict:
    options = [
        {},  # greedy
        {"temperature": 0.8, "top_k": 20, "seed": i},
        {"temperature": 1.0, "top_p": 0.9, "seed": i},
        {"temperature": 0.7, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1, "seed": i},
    ]
    return {"max_new_tokens": max_new, **options[i % len(options)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="bundle directory (default: export --preset to a temp dir)")
    ap.add_argument("--preset", default="tiny-static", help="preset to export when no --bundle (default tiny-static)")
    ap.add_argument("--turns", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--max-rss-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (0.05 = 5%%)")
    ap.add_argument("--no-trim", action="store_true",
                    help="measure raw RSS (allocator high-water included) instead of RSS after malloc_trim(0)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    if args.warmup >= args.turns:
        ap.error("--warmup must be smaller than --turns")

    from flashvl_edge.runtime import Pipeline
    from flashvl_edge.runtime.errors import FlashVLError

    tmp = tempfile.TemporaryDirectory(prefix="flashvl-soak-")
    work = Path(tmp.name)
    bundle = Path(args.bundle) if args.bundle else export_tiny(args.preset, work)
    images = make_images(work)
    bad = bad_inputs(work)
    pipe = Pipeline.from_bundle(bundle)
    probe_image = images[0]

    def probe() -> list[int]:
        return pipe.chat("Describe the image.", image=probe_image, max_new_tokens=args.max_new_tokens).token_ids

    counts = {"image": 0, "text": 0, "stream": 0, "session": 0, "refused": 0}
    trim = not args.no_trim
    trace: list[tuple[int, int, int, float]] = []  # turn, RSS, fds, seconds
    baseline = probe_at_warmup = None
    turn = 0
    t_start = time.perf_counter()
    trace.append((0, *snapshot(trim), 0.0))

    def after_turn(kind: str) -> None:
        nonlocal turn, baseline, probe_at_warmup
        turn += 1
        counts[kind] += 1
        if turn == args.warmup:
            probe_at_warmup = probe()
            baseline = snapshot(trim)
        if turn % 50 == 0 or turn == args.turns:
            trace.append((turn, *snapshot(trim), time.perf_counter() - t_start))

    # One step of the schedule per i (a 10-step cycle): 0-1 image chat, 2 text-only chat, 3 streamed
    # image chat, 4 streamed text chat, 5 a three-turn session, 6 a two-turn streamed session,
    # 7 and 9 a bad input (so the warm-up meets every bad input at least twice), 8 image chat.
    i = n_bad = 0
    while turn < args.turns:
        image = images[i % len(images)]
        prompt = PROMPTS[i % len(PROMPTS)]
        sampling = sampling_for(i, args.max_new_tokens)
        step = i % 10
        if step in (0, 1, 8):
            r = pipe.chat(prompt, image=image, **sampling)
            assert r.n_image_tokens > 0
            after_turn("image")
        elif step == 2:
            pipe.chat(prompt, **sampling)
            after_turn("text")
        elif step in (3, 4):
            stream = pipe.stream(prompt, image=image if step == 3 else None, **sampling)
            text = "".join(stream)
            assert text == stream.result.text
            after_turn("stream")
        elif step in (5, 6):
            session = pipe.session()
            session.ask(prompt, image=image, **sampling)
            after_turn("session")
            for q in FOLLOW_UPS[: (2 if step == 5 else 1)]:
                if turn >= args.turns:
                    break
                if step == 6:
                    "".join(session.stream(q, **sampling))
                else:
                    session.ask(q, **sampling)
                after_turn("session")
        else:  # a bad input: refused with a typed error, and the pipeline carries on
            what, kwargs = bad[n_bad % len(bad)]
            n_bad += 1
            try:
                pipe.chat(**kwargs, max_new_tokens=2)
            except FlashVLError:
                counts["refused"] += 1
            else:
                print(f"soak: {what} was not refused", file=sys.stderr)
                return 1
        i += 1

    probe_at_end = probe()
    end = snapshot(trim)
    elapsed = time.perf_counter() - t_start
    rss_base, fd_base = baseline
    growth = (end[0] - rss_base) / rss_base
    ok_rss = growth < args.max_rss_growth
    ok_fd = end[1] <= fd_base
    ok_probe = probe_at_end == probe_at_warmup

    mib = 2 ** 20
    measured = "RSS after malloc_trim(0)" if trim and MALLOC_TRIM is not None else "raw RSS"
    print(f"{'turn':>6} {'RSS MiB':>9} {'fds':>5} {'elapsed s':>10}   ({measured})")
    for t, rss, fds, s in trace:
        print(f"{t:>6} {rss / mib:>9.1f} {fds:>5} {s:>10.1f}")
    summary = {
        "bundle": str(bundle),
        "turns": turn,
        "kinds": counts,
        "elapsed_s": round(elapsed, 1),
        "turns_per_s": round(turn / elapsed, 2),
        "measured": measured,
        "rss_start_mib": round(trace[0][1] / mib, 1),
        "rss_after_warmup_mib": round(rss_base / mib, 1),
        "rss_end_mib": round(end[0] / mib, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "rss_limit_pct": 100 * args.max_rss_growth,
        "fds_after_warmup": fd_base,
        "fds_end": end[1],
        "same_greedy_probe": ok_probe,
        "ok": ok_rss and ok_fd and ok_probe,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\n{turn} turns ({', '.join(f'{k} {v}' for k, v in counts.items())}) in {elapsed:.0f} s")
        print(f"{measured} after {args.warmup} turns {summary['rss_after_warmup_mib']} MiB, at the end "
              f"{summary['rss_end_mib']} MiB: {summary['rss_growth_pct']:+.2f}% "
              f"(limit {summary['rss_limit_pct']:.0f}%) {'OK' if ok_rss else 'FAILED'}")
        print(f"open fds after warm-up {fd_base}, at the end {end[1]} {'OK' if ok_fd else 'FAILED (leak)'}")
        print(f"greedy probe identical at warm-up and end: {'OK' if ok_probe else 'FAILED'}")
    pipe.close()
    tmp.cleanup()
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
