#!/usr/bin/env python
"""Where should a joining request's vision graph run: beside the decode steps, or inside them?

    python benchmarks/encoder_overlap.py BUNDLE [--rows 8] [--steps 24] [--prompt-tokens 300] [--chunk 64]

Decodes ``--rows`` text requests together through the step core (the server's path) and times each
decode step in three settings, in one run:

- **quiet**: nothing else runs (the decode step as it is);
- **encoder thread**: the vision graph encodes an image over and over on another thread, as the
  server's encoder thread does while a request joins (its session's threads do not spin);
- **inline**: one vision run (one image's tiles) is added to each step, the cost a step pays when
  images are encoded inside the step loop instead (for the static model one image is one 512 px tile,
  so it cannot be cut finer);
- **beside a prefill chunk**: a ``--chunk``-token LLM run (a joining prompt's chunk on a fresh cache)
  repeats on another thread, as on the step core's prefill lane; the chunk's own time alone and beside
  the steps is printed too (what each decode step beside it costs the joining request).

Prints step p50/p95 for each and the ratios to quiet, with the CPU model and a bandwidth probe.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk run beside the steps (default 64)")
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from compare import measure_bandwidth

    from flashvl_edge.runtime.bench import default_image, machine_info
    from flashvl_edge.runtime.core import Sequence, StepCore
    from flashvl_edge.runtime.generate import SamplingParams
    from flashvl_edge.runtime.pipeline import Pipeline

    machine = machine_info()
    bw = measure_bandwidth()
    pipe = Pipeline.from_bundle(args.bundle, image_cache_bytes=0, kv_cache_bytes=0)
    gen = pipe.generator
    image = default_image()[0]
    rng = np.random.default_rng(0)
    # no prefill lane here: every step below is a plain decode step, timed as such
    core = StepCore(gen, max_num_seqs=args.rows, max_num_batched_tokens=args.rows * (gen.prefill_chunk + 1),
                    itl_stretch=0)
    budget = 3 * args.steps + 8
    for _ in range(args.rows):
        ids = [int(t) for t in rng.integers(10, min(5000, gen.embed_table.shape[0]), args.prompt_tokens)]
        core.add(Sequence(SamplingParams(max_new_tokens=budget, ignore_eos=True), prompt_ids=ids,
                          cache=pipe.llm.new_cache()))
    while any(not s.prefill_done for s in core.prefilling) or core.waiting:
        core.step()
    assert len(core.running) == args.rows

    def encode() -> float:
        prep = pipe.prepare_image(image, use_cache=False)
        t = time.perf_counter()
        pipe.encode_images([prep])
        return time.perf_counter() - t

    encode()  # warm-up
    vision_alone = [encode() for _ in range(2)]

    def timed_steps(n: int, inline: bool = False) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            if inline:
                encode()
            core.step()
            out.append(time.perf_counter() - t)
        return out

    def steps_beside(job) -> tuple[list[float], list[float]]:
        """Decode steps timed while ``job`` (returning its own seconds) repeats on another thread."""
        stop, jobs = threading.Event(), []

        def repeat() -> None:
            while not stop.is_set():
                jobs.append(job())
        thread = threading.Thread(target=repeat, daemon=True)
        thread.start()
        time.sleep(0.1)
        steps = timed_steps(args.steps)
        stop.set()
        thread.join()
        return steps, jobs

    quiet = timed_steps(args.steps)
    beside, beside_vision = steps_beside(encode)
    inline = timed_steps(max(4, args.steps // 4), inline=True)

    chunk_x = np.asarray(gen.embed_table[rng.integers(10, min(5000, gen.embed_table.shape[0]), args.chunk)],
                         dtype=pipe.llm.embeds_dtype)

    def run_chunk() -> float:
        cache = pipe.llm.new_cache()
        t = time.perf_counter()
        pipe.llm.forward_rows([cache], [chunk_x])
        return time.perf_counter() - t
    run_chunk()  # warm-up
    chunk_alone = [run_chunk() for _ in range(3)]
    beside_chunk, beside_chunks = steps_beside(run_chunk)

    def p(xs, q):
        return 1e3 * float(np.percentile(xs, q))
    print(f"{machine.get('cpu')}, {machine.get('logical_cpus', '')} CPUs; bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s; "
          f"{Path(args.bundle).name}, {args.rows} rows of {args.prompt_tokens} tokens")
    print(f"vision run alone: {1e3 * min(vision_alone):.0f} ms; beside the decode steps: "
          f"{1e3 * float(np.median(beside_vision)):.0f} ms (median of {len(beside_vision)})")
    print("| decode step | p50 ms | p95 ms | p95 / quiet p95 |")
    print("|---|---|---|---|")
    for name, xs in (("quiet", quiet), ("encoder thread busy", beside), ("one vision run inline", inline),
                     (f"beside a {args.chunk}-token prefill chunk", beside_chunk)):
        print(f"| {name} | {p(xs, 50):.0f} | {p(xs, 95):.0f} | {p(xs, 95) / p(quiet, 95):.2f} |")
    print(f"{args.chunk}-token prefill chunk alone: {1e3 * min(chunk_alone):.0f} ms; beside decode steps back to back: "
          f"{1e3 * float(np.median(beside_chunks)):.0f} ms (median of {len(beside_chunks)})")
    pipe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
