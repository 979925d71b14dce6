#!/usr/bin/env python
"""Load benchmark of ``flashvl serve``: a concurrency sweep against one live server, in one run.

    python benchmarks/serve_load.py BUNDLE [--concurrency 1,2,4,8] [--requests 8] [--new-tokens 64]
                                           [--question-tokens 32] [--out build/serve-load]
                                           [--server-arg=--max-num-batched-tokens --server-arg=N]
                                           [--baseline-src OLD_CHECKOUT] [--variant 'LABEL=ARG ARG']

Starts ``flashvl serve BUNDLE --port 0`` (127.0.0.1 only), then for each concurrency level c sends the
same ``--requests`` requests (the real photo as a data: URL + a ``--question-tokens`` question,
``--new-tokens`` greedy tokens, EOS ignored so every answer has the same length) with at most c in
flight, streaming. Level 1 is the baseline: the same requests answered one at a time.

Per level: aggregate output tokens/s (all tokens / wall time), decode throughput (tokens after each
request's first / the time between its first and last token, summed over the level's busiest window),
TTFT p50/p95, inter-token latency p50/p95 of all streams, and the ITL p95 of running streams split
in two: gaps while another request was joining (between its arrival and its first token: its vision
graph and prefill ran beside or between this stream's steps) and gaps with no arrival; their ratio is
what chunked prefill is for. With ``--baseline-src`` the same levels also run against another
checkout's code (an older commit's worktree), each level on both servers back to back, and the TTFT
and single-stream decode ratios to it are printed. ``--variant 'LABEL=ARGS'`` adds this checkout's server
once more with other ``flashvl serve`` arguments (e.g. ``'no lane=--itl-stretch 0'``), run in the same
rotation.
Peak RSS of the server process (VmHWM) is compared with the bundle's weight files. The CPU model and
a memory-bandwidth probe are printed with the figures: compare same-run ratios, not absolute numbers.
Writes ``OUT/serve_load.json`` and ``OUT/serve_load.png``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[serve-load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start_server(bundle: str, max_batch: int, extra: list[str], src: str | None = None) -> tuple[subprocess.Popen, int]:
    """``flashvl serve`` on 127.0.0.1; ``src``: run the flashvl_edge package found there instead (an older
    checkout laid out by ``--baseline-src``, for an A/B in one run)."""
    import os

    cmd = [sys.executable, "-m", "flashvl_edge.main", "serve", bundle, "--port", "0", "--host", "127.0.0.1",
           "--max-batch", str(max_batch), "--max-queue", "256", *extra]
    env = dict(os.environ, PYTHONPATH=src) if src else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, env=env)
    deadline = time.monotonic() + 600  # a full-size bundle takes a while to load
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with code {proc.returncode} before it was ready")
            continue
        if "ready on http://" in line:
            port = int(line.split("ready on http://", 1)[1].split()[0].rsplit(":", 1)[1].rstrip("/"))
            return proc, port
    proc.kill()
    raise SystemExit("the server did not become ready within 600 s")


def vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def one_request(port: int, body: dict) -> dict:
    """One streamed chat completion over plain http.client: when each content chunk arrived."""
    import http.client

    t0 = time.perf_counter()
    times, usage = [], None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            u = chunk.get("usage")
            if u:
                # continuous_usage_stats: one chunk per token with the running count (a token's text
                # may be empty: the random full-size model's ids mostly lie outside its small tokenizer)
                if chunk.get("choices") and u["completion_tokens"] > len(times):
                    times.append(time.perf_counter())
                usage = u
    finally:
        conn.close()
    return {"start": t0, "end": time.perf_counter(), "token_times": times, "usage": usage}


def run_level(port: int, body: dict, n_requests: int, concurrency: int) -> list[dict]:
    """``n_requests`` requests with at most ``concurrency`` in flight (a thread each)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda _: one_request(port, body), range(n_requests)))


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(results: list[dict]) -> dict:
    t0 = min(r["start"] for r in results)
    t1 = max(r["end"] for r in results)
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    ttft = [r["token_times"][0] - r["start"] for r in results if r["token_times"]]
    itl = [b - a for r in results for a, b in zip(r["token_times"], r["token_times"][1:])]
    # ITL of a stream across the moment another request got its first token (it was admitted
    # between two of this stream's decode steps): the stall continuous batching costs running streams
    firsts = sorted(r["token_times"][0] for r in results if r["token_times"])
    itl_join, itl_quiet = [], []
    for r in results:
        tt = r["token_times"]
        for a, b in zip(tt, tt[1:]):
            joined = any(a < f <= b for f in firsts if f != tt[0])
            # a request is joining from its arrival to its first token: its vision and prefill run
            # beside this stream's steps
            busy = joined or any(o is not r and o["token_times"] and o["start"] < b and o["token_times"][0] > a
                                 for o in results)
            (itl_join if busy else itl_quiet).append(b - a)
    decode_tokens = sum(max(0, len(r["token_times"]) - 1) for r in results)
    decode_window = max((r["token_times"][-1] for r in results if r["token_times"]), default=t1) \
        - min((r["token_times"][0] for r in results if r["token_times"]), default=t0)
    return {
        "requests": len(results), "wall_s": t1 - t0, "completion_tokens": tokens,
        "output_tokens_per_s": tokens / (t1 - t0),
        "decode_tokens_per_s": decode_tokens / decode_window if decode_window > 0 else None,
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
        "itl_p50_s": pct(itl, 50), "itl_p95_s": pct(itl, 95),
        "itl_p95_while_joining_s": pct(itl_join, 95), "itl_samples_while_joining": len(itl_join),
        "itl_p95_no_arrivals_s": pct(itl_quiet, 95), "itl_samples_no_arrivals": len(itl_quiet),
    }


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return
    levels = report["levels"]
    cs = [lv["concurrency"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(cs, [lv["output_tokens_per_s"] for lv in levels], "o-", label="output tok/s (wall)")
    axes[0].plot(cs, [lv["decode_tokens_per_s"] or 0 for lv in levels], "s--", label="decode tok/s")
    axes[0].set_title("aggregate throughput")
    axes[1].plot(cs, [lv["ttft_p50_s"] for lv in levels], "o-", label="p50")
    axes[1].plot(cs, [lv["ttft_p95_s"] for lv in levels], "s--", label="p95")
    axes[1].set_title("time to first token (s)")
    axes[2].plot(cs, [1e3 * lv["itl_p50_s"] for lv in levels], "o-", label="p50")
    axes[2].plot(cs, [1e3 * lv["itl_p95_s"] for lv in levels], "s--", label="p95")
    axes[2].set_title("inter-token latency (ms)")
    for ax in axes:
        ax.set_xlabel("concurrent requests")
        ax.set_xticks(cs)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"flashvl serve, {Path(report['bundle']).name}: {report['machine'].get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def package_layout(checkout: str) -> str:
    """A directory whose ``flashvl_edge`` package is ``checkout``'s code (the layout pyproject.toml maps)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="flashvl-baseline-"))
    pkg = root / "flashvl_edge"
    pkg.mkdir()
    src = Path(checkout).resolve()
    for f in (src / "cli").iterdir():
        (pkg / f.name).symlink_to(f)
    for name in ("export", "runtime", "calibration"):
        (pkg / name).symlink_to(src / name)
    return str(root)


def sweep(args, body: dict, levels: list[int], servers: dict[str, tuple[list[str], str | None]]) -> dict[str, list[dict]]:
    """Every concurrency level against each server (this checkout's code, or a baseline's), the servers'
    runs of one level back to back, so both see the same machine state."""
    procs = {}
    try:
        for name, (server_args, src) in servers.items():
            procs[name] = start_server(args.bundle, args.max_batch, server_args, src)
            run_level(procs[name][1], body, 1, 1)  # warm-up: graphs, page cache
        out: dict[str, list[dict]] = {name: [] for name in servers}
        for c in levels:
            for name, (proc, port) in procs.items():
                log(f"{name}, concurrency {c}: {args.requests} requests")
                results = run_level(port, body, args.requests, c)
                s = {"concurrency": c, **summarize(results), "server_peak_rss_bytes": vm_hwm_bytes(proc.pid)}
                out[name].append(s)
                log(f"  {s['output_tokens_per_s']:.2f} output tok/s, decode {s['decode_tokens_per_s'] or 0:.2f} tok/s, "
                    f"TTFT p50 {s['ttft_p50_s']:.2f} s, ITL p95 {1e3 * s['itl_p95_s']:.1f} ms")
        return out
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=8, help="requests per level (default 8)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default="build/serve-load")
    ap.add_argument("--image", help="image file (default: scikit-image's astronaut)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra flashvl serve argument for this checkout's server (repeatable), e.g. "
                         "--server-arg=--max-num-batched-tokens --server-arg=136")
    ap.add_argument("--baseline-src", metavar="CHECKOUT",
                    help="also run the same sweep against the flashvl_edge code of another checkout (an older "
                         "commit's worktree): same bundle, same run, ratios printed")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="also run this checkout's server with these space-separated serve arguments (repeatable)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the server's image and prefix caches on (default off: every request pays for its "
                         "vision graph and prefill, which is what batching is measured against)")
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from compare import measure_bandwidth
    from tokenizers import Tokenizer

    from flashvl_edge.runtime.bench import default_image, machine_info, make_prompt, weight_file_bytes
    from flashvl_edge.runtime.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    levels = [int(c) for c in args.concurrency.split(",")]
    image = Path(args.image).read_bytes() if args.image else None
    if image is None:
        buf = io.BytesIO()
        default_image()[0].save(buf, format="PNG")
        image = buf.getvalue()
    question = make_prompt(Tokenizer.from_file(str(bundle.path(bundle.manifest.tokenizer.file))),
                           args.question_tokens)
    body = {"model": Path(args.bundle).name, "max_tokens": args.new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
                {"type": "text", "text": question}]}]}
    machine = machine_info()
    bw_before = measure_bandwidth()
    log(f"{machine.get('cpu')}; bandwidth {bw_before['bytes_per_s'] / 1e9:.1f} GB/s; starting the server")
    caches = [] if args.reuse else ["--image-cache-bytes", "0", "--kv-cache-bytes", "0"]
    report = {"bundle": str(Path(args.bundle).resolve()), "machine": machine, "settings": vars(args),
              "bandwidth_before": bw_before, "levels": []}
    servers = {"this checkout": (caches + list(args.server_arg), None)}
    if args.baseline_src:
        servers["baseline"] = (caches, package_layout(args.baseline_src))
    variants = dict(spec.partition("=")[::2] for spec in args.variant)  # label -> serve arguments
    for label, extra in variants.items():
        servers[label] = (caches + extra.split(), None)
    runs = sweep(args, body, levels, servers)
    report["variants"] = {label: runs[label] for label in variants}
    report["levels"] = runs["this checkout"]
    if args.baseline_src:
        report["baseline_levels"] = runs["baseline"]
    report["bandwidth_after"] = measure_bandwidth()
    weights = weight_file_bytes(bundle)
    by_c = {lv["concurrency"]: lv for lv in report["levels"]}
    if 1 in by_c and max(by_c) > 1:
        top = by_c[max(by_c)]
        report["ratios"] = {
            f"output_tokens_per_s_c{max(by_c)}_over_c1": top["output_tokens_per_s"] / by_c[1]["output_tokens_per_s"],
            f"decode_tokens_per_s_c{max(by_c)}_over_c1": (top["decode_tokens_per_s"] or 0) / by_c[1]["decode_tokens_per_s"],
            f"peak_rss_c{max(by_c)}_over_weight_files": top["server_peak_rss_bytes"] / weights,
        }
    for lv in report["levels"]:
        if lv["itl_p95_while_joining_s"] and lv["itl_p95_no_arrivals_s"]:
            report.setdefault("ratios", {})[f"itl_p95_joining_over_no_arrivals_c{lv['concurrency']}"] = \
                lv["itl_p95_while_joining_s"] / lv["itl_p95_no_arrivals_s"]
    base = {lv["concurrency"]: lv for lv in report.get("baseline_levels", [])}
    for lv in report["levels"]:
        old = base.get(lv["concurrency"])
        if old:
            report.setdefault("ratios", {})[f"ttft_p50_over_baseline_c{lv['concurrency']}"] = \
                lv["ttft_p50_s"] / old["ttft_p50_s"]
            if lv["concurrency"] == 1:
                report["ratios"]["decode_tokens_per_s_c1_over_baseline"] = \
                    lv["decode_tokens_per_s"] / old["decode_tokens_per_s"]
    report["weight_file_bytes"] = weights
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "serve_load.png")
    print(f"{machine.get('cpu')}, bandwidth {bw_before['bytes_per_s'] / 1e9:.1f} -> {report['bandwidth_after']['bytes_per_s'] / 1e9:.1f} GB/s")
    print("| server | concurrency | output tok/s | decode tok/s | TTFT p50 / p95 s | ITL p50 / p95 ms | "
          "ITL p95 no arrivals / while joining ms | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    ms = lambda v: "-" if v is None else f"{1e3 * v:.0f}"  # noqa: E731
    for who, rows in (("this", report["levels"]), ("baseline", report.get("baseline_levels", [])),
                      *report["variants"].items()):
        for lv in rows:
            print(f"| {who} | {lv['concurrency']} | {lv['output_tokens_per_s']:.2f} | {lv['decode_tokens_per_s'] or 0:.2f} | "
                  f"{lv['ttft_p50_s']:.2f} / {lv['ttft_p95_s']:.2f} | {1e3 * lv['itl_p50_s']:.1f} / "
                  f"{1e3 * lv['itl_p95_s']:.1f} | {ms(lv['itl_p95_no_arrivals_s'])} / {ms(lv['itl_p95_while_joining_s'])} | "
                  f"{lv['server_peak_rss_bytes'] / 2**30:.2f} |")
    for k, v in (report.get("ratios") or {}).items():
        print(f"{k}: {v:.2f}")
    print(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
