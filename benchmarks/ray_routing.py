#!/usr/bin/env python
"""``flashvl serve --ray`` against plain ``flashvl serve``, in one run: routing overhead, memory, cache hits.

    python benchmarks/ray_routing.py BUNDLE [--replicas 2] [--requests 200] [--images 16] [--questions 3]
                                            [--out build/ray-routing]

On this machine only (127.0.0.1): starts ``flashvl serve BUNDLE --port 0`` (the direct server) and a local
Ray instance with the Ray Serve application of runtime/cluster.py (``--replicas`` replicas of the same
bundle, 1 CPU each), then measures

1. **routing overhead**: the same short request (text only, 1 greedy token, its prefix cached after the
   first) ``--requests`` times, alternating direct / Ray so both see the same machine state; latency p50
   and p95 of each and the difference (what the proxy -> ingress -> replica hops and the router add),
   for the whole answer and for the first streamed chunk;
   and, beside it, what Ray Serve alone costs (an app that answers at once: proxy -> ingress, and proxy
   -> ingress -> a second deployment);
2. **memory**: resident memory of the direct server and of each Ray replica (the same pipeline and
   scheduler, inside a Ray worker), and of Ray's own processes (GCS, raylet, controller, proxy,
   ingress, idle workers), which a fleet pays once per node or once per cluster;
3. **cache hits**: ``--images`` images x ``--questions`` questions each, shuffled (seeded), one at a time,
   routed cache-aware and then round-robin (the application redeployed, another ``cache_salt`` so the
   caches start empty): the share of later questions whose cached prompt tokens reach past the shared
   system prompt (the image's embeddings and KV were on the replica that answered), and their latency.

Prints the CPU model with the figures (compare same-run ratios, not absolute numbers) and writes
``OUT/ray_routing.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_load import pct, start_server  # noqa: E402


def log(msg: str) -> None:
    print(f"[ray-routing {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def post(port: int, body: dict, stream: bool = False) -> tuple[float, float, dict]:
    """(seconds to the first content chunk or the answer, seconds to the end, the final JSON/usage)."""
    import http.client

    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"port {port}: HTTP {resp.status}: {resp.read()[:300]!r}")
        if not stream:
            out = json.loads(resp.read())
            t = time.perf_counter() - t0
            return t, t, out
        first, last = None, {}
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content") is not None:
                    first = time.perf_counter() - t0
                last = chunk
        return first or 0.0, time.perf_counter() - t0, last
    finally:
        conn.close()


def png_url(seed: int, w: int = 320, h: int = 240) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rss(pid: int) -> int:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def overhead(direct: int, ray_port: int, n: int) -> dict:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    for port in (direct, ray_port):  # warm: the prefix cached, connections and code paths hot
        for _ in range(5):
            post(port, body)
            post(port, body, stream=True)
    runs = {"direct": [], "ray": [], "direct_first": [], "ray_first": []}
    for i in range(n):
        pair = [("direct", direct), ("ray", ray_port)]
        if i % 2:
            pair.reverse()
        for name, port in pair:
            runs[name].append(post(port, body)[1])
            runs[f"{name}_first"].append(post(port, body, stream=True)[0])
    out = {}
    for kind in ("", "_first"):
        d, r = runs["direct" + kind], runs["ray" + kind]
        out["answer" if not kind else "first_chunk"] = {
            "direct_p50_ms": pct(d, 50) * 1e3, "direct_p95_ms": pct(d, 95) * 1e3,
            "ray_p50_ms": pct(r, 50) * 1e3, "ray_p95_ms": pct(r, 95) * 1e3,
            "overhead_p50_ms": (pct(r, 50) - pct(d, 50)) * 1e3, "overhead_p95_ms": (pct(r, 95) - pct(d, 95)) * 1e3}
    return out


def floor(ray_port: int, n: int) -> dict:
    """What Ray Serve itself costs here: an app whose ASGI ingress answers at once (proxy -> ingress), and
    one that asks a second deployment first (proxy -> ingress -> replica): the hops any Ray Serve HTTP
    endpoint pays, without flashvl's work."""
    import http.client

    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    class Echo:
        async def once(self, body):
            return body

    class Answer:
        def __init__(self, handle):
            self.handle = handle

        async def __call__(self, scope, receive, send):
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                return await send({"type": "lifespan.shutdown.complete"})
            body = (await receive()).get("body", b"")
            if scope["path"].endswith("/hop"):
                body = await self.handle.once.remote(body)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress()
    class Ingress:
        def __init__(self, handle):
            self.handle = handle

        def __serve_build_asgi_app__(self):
            return Answer(self.handle)

    serve.run(Ingress.bind(Echo.bind()), name="floor", route_prefix="/floor")

    def times(path: str) -> list[float]:
        out = []
        for _ in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", ray_port, timeout=60)
            t0 = time.perf_counter()
            conn.request("POST", path, body=b'{"messages": []}')
            conn.getresponse().read()
            out.append(time.perf_counter() - t0)
            conn.close()
        return out

    times("/floor/hop")  # warm
    one, two = times("/floor"), times("/floor/hop")
    serve.delete("floor")
    return {"ingress_p50_ms": pct(one, 50) * 1e3, "ingress_p95_ms": pct(one, 95) * 1e3,
            "ingress_replica_p50_ms": pct(two, 50) * 1e3, "ingress_replica_p95_ms": pct(two, 95) * 1e3}


def hit_run(port: int, n_images: int, n_questions: int, salt: str, seed: int) -> dict:
    questions = ["What is this?", "And the colours?", "Anything unusual?", "Describe the background.",
                 "How many objects?"][:n_questions]
    images = [png_url(1000 + i) for i in range(n_images)]
    order = [(i, q) for i in range(n_images) for q in questions]
    random.Random(seed).shuffle(order)
    seen, firsts, later = set(), [], []
    for i, q in order:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i]}},
                                                          {"type": "text", "text": q}]}],
                "max_tokens": 1, "temperature": 0, "cache_salt": salt}
        t, _, out = post(port, body)
        cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
        (later if i in seen else firsts).append((cached, t))
        seen.add(i)
    floor = max(c for c, _ in firsts)  # what a new image gets: the shared system prompt's blocks
    hits = [t for c, t in later if c > floor]
    misses = [t for c, t in later if c <= floor]
    return {"later_questions": len(later), "hits": len(hits), "hit_ratio": len(hits) / len(later),
            "hit_latency_p50_ms": pct(hits, 50) * 1e3 if hits else None,
            "miss_latency_p50_ms": pct(misses, 50) * 1e3 if misses else None,
            "first_latency_p50_ms": pct([t for _, t in firsts], 50) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200, help="overhead: requests to each endpoint")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="build/ray-routing")
    args = ap.parse_args()

    import ray
    from ray import serve

    from flashvl_edge.runtime import cluster
    from flashvl_edge.runtime.bench import machine_info

    info = machine_info()
    log(f"CPU: {info.get('cpu')} ({info.get('logical_cpus')} logical CPUs)")
    proc, direct = start_server(args.bundle, 8, [])
    report: dict = {"machine": info, "replicas": args.replicas}
    try:
        ray.init(address="local", num_cpus=args.replicas, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level=logging.WARNING)
        ray_port = cluster._free_port("127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
        sargs = cluster.serve_args(args.bundle)

        def deploy(routing: str) -> None:
            serve.run(cluster.build_app(sargs, replicas=args.replicas, routing=routing), name=cluster.APP_NAME,
                      route_prefix="/")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    import urllib.request

                    with urllib.request.urlopen(f"http://127.0.0.1:{ray_port}/health", timeout=10) as r:
                        if json.loads(r.read())["healthy"] == args.replicas:
                            return
                except OSError:
                    pass
                time.sleep(0.2)
            raise SystemExit("the Ray application did not get healthy within 120 s")

        deploy("cache")
        log(f"overhead: {args.requests} requests to each endpoint")
        report["overhead"] = overhead(direct, ray_port, args.requests)
        log(f"Ray Serve's own hops: {args.requests} requests each")
        report["ray_floor"] = floor(ray_port, args.requests)

        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()["applications"][cluster.APP_NAME]["deployments"]
        replica_pids = [r["pid"] for r in details[cluster.REPLICA]["replicas"]]
        import psutil

        me = psutil.Process()
        ray_pids = {p.pid for p in me.children(recursive=True)} - set(replica_pids) - {proc.pid}
        report["memory_mib"] = {"direct_server": rss(proc.pid) / 2**20,
                                "replicas": [rss(p) / 2**20 for p in replica_pids],
                                "ray_processes": sum(rss(p) for p in ray_pids) / 2**20}

        report["hits"] = {}
        for routing in ("cache", "round-robin"):
            if routing != "cache":
                deploy(routing)
            log(f"cache hits, {routing}: {args.images} images x {args.questions} questions")
            report["hits"][routing] = hit_run(ray_port, args.images, args.questions, f"bench-{routing}", args.seed)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_routing.json").write_text(json.dumps(report, indent=2))
    o, m, h = report["overhead"], report["memory_mib"], report["hits"]
    print(f"CPU: {info.get('cpu')}; {args.replicas} replicas of {Path(args.bundle).name}, 1 CPU each")
    print(f"{'latency, ms':<28}{'direct p50':>11}{'p95':>8}{'ray p50':>9}{'p95':>8}{'overhead p50':>14}{'p95':>8}")
    for name in ("answer", "first_chunk"):
        x = o[name]
        print(f"{name.replace('_', ' '):<28}{x['direct_p50_ms']:>11.1f}{x['direct_p95_ms']:>8.1f}{x['ray_p50_ms']:>9.1f}"
              f"{x['ray_p95_ms']:>8.1f}{x['overhead_p50_ms']:>14.1f}{x['overhead_p95_ms']:>8.1f}")
    f = report["ray_floor"]
    print(f"Ray Serve alone (an app that does nothing): proxy -> ingress p50 {f['ingress_p50_ms']:.1f} ms, "
          f"p95 {f['ingress_p95_ms']:.1f}; proxy -> ingress -> replica p50 {f['ingress_replica_p50_ms']:.1f} ms, "
          f"p95 {f['ingress_replica_p95_ms']:.1f}")
    print(f"memory (RSS, MiB): direct server {m['direct_server']:.0f}; replicas "
          f"{', '.join(f'{v:.0f}' for v in m['replicas'])}; Ray's own processes {m['ray_processes']:.0f}")
    for routing, x in h.items():
        hit_ms = "-" if x["hit_latency_p50_ms"] is None else f"{x['hit_latency_p50_ms']:.1f}"
        miss_ms = "-" if x["miss_latency_p50_ms"] is None else f"{x['miss_latency_p50_ms']:.1f}"
        print(f"{routing:<12} later questions with their image cached: {x['hits']}/{x['later_questions']} "
              f"({100 * x['hit_ratio']:.0f}%); latency p50 hit {hit_ms} ms, miss {miss_ms} ms, "
              f"first question {x['first_latency_p50_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
