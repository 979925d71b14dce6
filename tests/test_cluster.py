"""flashvl serve --ray: replicas of flashvl serve on Ray Serve behind one endpoint (runtime/cluster.py).

One local Ray instance for the module (``num_cpus=2``, no dashboard, everything on 127.0.0.1) with two
replicas of the tiny-static bundle (1 CPU each) behind the ingress, called with the official ``openai``
client: answers equal ``Pipeline.chat``'s; cache-aware routing sends second questions about an image to
the replica that holds it (and round-robin, on the same traffic, does not); a replica killed with SIGKILL
mid-stream ends its own streams with an error while the others complete, and Ray brings the application
back to two healthy replicas; /health and /metrics cover every replica. The last test runs the command
itself (``flashvl serve --ray``) and drains it with SIGTERM. Every wait polls with a bound.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")  # the cluster extra (installed by dev)
from ray import serve  # noqa: E402

from flashvl_edge.runtime import cluster  # noqa: E402
from test_serve import wait_until  # noqa: E402

MODEL = "tiny"


def png(seed: int, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_message(image: bytes, question: str) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def health(port: int) -> dict:
    status, body = get(port, "/health")
    return json.loads(body) if body else {"status": f"no answer ({status})", "healthy": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(args, routing: str) -> None:
    serve.run(cluster.build_app(args, replicas=2, routing=routing), name=cluster.APP_NAME, route_prefix="/")


class Cluster:
    def __init__(self, bundle):
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=128 * 1024 * 1024, log_to_driver=False, logging_level=logging.WARNING)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.args = cluster.serve_args(bundle, ["--served-model-name", MODEL, "--max-batch", "4", "--grace-period", "5"])
        deploy(self.args, "cache")
        self.wait_healthy(2, 60)
        self.open = True

    def wait_healthy(self, n: int, timeout_s: float) -> dict:
        return wait_until(lambda: (h := health(self.port)).get("healthy") == n and h, timeout_s,
                          f"{n} healthy replicas through /health", every_s=0.2)

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                             timeout=60)

    def close(self) -> None:
        if self.open:
            self.open = False
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_app(tiny_static_bundle):
    c = Cluster(tiny_static_bundle)
    yield c
    c.close()


# --------------------------------------------------------------------------------------------
# The routing key and the ring, without Ray


def test_route_key_is_the_first_image_and_the_text_before_it():
    a, b = png(1), png(2)
    key = cluster.route_key({"messages": image_message(a, "What is this?")})
    assert key == cluster.route_key({"messages": image_message(a, "And the colours?")})  # the question differs
    assert key != cluster.route_key({"messages": image_message(b, "What is this?")})  # another image
    system = [{"role": "system", "content": "You are terse."}]
    assert key != cluster.route_key({"messages": system + image_message(a, "What is this?")})  # another prefix
    # text only: the conversation's leading characters, so later turns meet the earlier ones
    first = [{"role": "user", "content": "Tell me about lighthouses. " * 20}]
    later = first + [{"role": "assistant", "content": "They guide ships."}, {"role": "user", "content": "More."}]
    assert cluster.route_key({"messages": first}) == cluster.route_key({"messages": later})
    assert cluster.route_key({"messages": "not a list"}) is None and cluster.route_key([1]) is None


def test_the_ring_moves_only_the_keys_of_a_replica_that_comes_or_goes():
    keys = [f"k{i}" for i in range(2000)]
    two, three = cluster.HashRing(["a", "b"]), cluster.HashRing(["a", "b", "c"])
    before = {k: two.owner(k) for k in keys}
    after = {k: three.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "c" for k in moved)  # only to the new replica
    assert 0.2 < len(moved) / len(keys) < 0.45  # about a third
    share = sum(v == "a" for v in before.values()) / len(keys)
    assert 0.35 < share < 0.65


# --------------------------------------------------------------------------------------------
# Through the Ray endpoint


def test_answers_equal_flashvl_chat(ray_app, tiny_static_bundle):
    from flashvl_edge.runtime.pipeline import Pipeline

    image = png(7)
    with Pipeline.from_bundle(tiny_static_bundle, device="cpu") as pipe:
        ref = pipe.chat("What is in the picture?", image=image, max_new_tokens=10, temperature=0)
        ref_text = pipe.chat("Say something.", max_new_tokens=8, temperature=0)
    client = ray_app.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0,
                                       messages=image_message(image, "What is in the picture?"))
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Say something."}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref_text.text
    # errors are the replica's own OpenAI error objects, passed through
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_a_full_replica_spills_to_the_least_loaded(ray_app):
    """Six long requests about one image at once: the ring's owner takes its batch (4, spill_at), the
    rest go to the other replica."""
    client = ray_app.client()
    messages = image_message(png(300), "Describe it.")
    out: queue.Queue = queue.Queue()

    def ask():
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=400, temperature=0, messages=messages, extra_body={"ignore_eos": True})
        out.put((raw.headers["x-flashvl-replica"], raw.parse().usage.completion_tokens))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    answers = [out.get_nowait() for _ in range(out.qsize())]
    assert len(answers) == 6 and all(n == 400 for _, n in answers), answers
    by_replica = {r: sum(x == r for x, _ in answers) for r, _ in answers}
    assert len(by_replica) == 2 and max(by_replica.values()) >= 4, by_replica


def test_health_and_metrics_cover_every_replica(ray_app):
    from prometheus_client.parser import text_string_to_metric_families

    h = health(ray_app.port)
    assert h["status"] == "ok" and h["healthy"] == 2 and set(h["replicas"].values()) == {"ok"}, h
    status, text = get(ray_app.port, "/metrics")
    assert status == 200
    samples = [s for fam in text_string_to_metric_families(text.decode()) for s in fam.samples]
    served = {s.labels["replica"] for s in samples if s.name == "flashvl_http_requests_total"}
    assert served == set(h["replicas"]), (served, h)
    routed = {s.labels["decision"]: s.value for s in samples if s.name == "flashvl_cluster_routed_requests_total"}
    assert routed["affine"] > 0 and routed["spilled"] > 0, routed


def _second_questions(client, images, salt: str, seed: int) -> tuple[list[int], int, list[str]]:
    """4 images x 2 questions in a shuffled order: the cached tokens of each second question, the most any
    first question got (the shared system prompt's block: no image of theirs was cached), and which
    replica answered each request."""
    order = [(i, q) for i in range(len(images)) for q in ("What is this?", "And the colours?")]
    random.Random(seed).shuffle(order)
    seen, seconds, firsts, replicas = set(), [], [0], []
    for i, question in order:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=2, temperature=0, messages=image_message(images[i], question),
            extra_body={"cache_salt": salt})
        cached = raw.parse().usage.prompt_tokens_details.cached_tokens
        replicas.append(raw.headers["x-flashvl-replica"])
        (seconds if i in seen else firsts).append(cached)
        seen.add(i)
    return seconds, max(firsts), replicas


def test_cache_aware_routing_finds_the_cache_and_round_robin_does_not(ray_app):
    images = [png(100 + i) for i in range(4)]
    client = ray_app.client()
    seconds, floor, replicas = _second_questions(client, images, "cache-aware", seed=1)
    assert sum(c > 0 for c in seconds) / len(seconds) >= 0.9, (seconds, replicas)
    hits = sum(c > floor for c in seconds)  # the image's KV too, not only the system prompt's block
    assert hits / len(seconds) >= 0.9, (seconds, floor, replicas)
    # the same traffic on fresh caches (another cache_salt shares nothing), routed round-robin
    # (the later tests do not depend on the routing policy, so round-robin stays deployed)
    deploy(ray_app.args, "round-robin")
    ray_app.wait_healthy(2, 60)
    rr_seconds, rr_floor, rr_replicas = _second_questions(client, images, "round-robin", seed=1)
    rr_hits = sum(c > rr_floor for c in rr_seconds)
    print(f"\nsecond questions whose image was cached: cache-aware {hits}/4 (cached tokens {seconds}), "
          f"round-robin {rr_hits}/4 (cached tokens {rr_seconds})")
    assert rr_hits < hits and len(set(rr_replicas)) == 2, (rr_seconds, rr_floor, rr_replicas)


def _serve_details() -> dict:
    from ray.serve.context import _get_global_client

    deployment = _get_global_client().get_serve_details()["applications"][cluster.APP_NAME]["deployments"]
    return {r["replica_id"]: r for r in deployment[cluster.REPLICA]["replicas"]}


def test_a_killed_replica_costs_only_its_own_streams_and_is_replaced(ray_app):
    client = ray_app.client()
    streams, by_replica = [], {}
    for i in range(12):  # distinct prompts until both replicas hold at least two streams
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Story number {i}: once upon a time"}])
        rid = raw.headers["x-flashvl-replica"]
        stream = raw.parse()
        next(iter(stream))  # the first chunk: the stream is running
        streams.append((rid, stream))
        by_replica[rid] = by_replica.get(rid, 0) + 1
        if len(by_replica) == 2 and min(by_replica.values()) >= 2:
            break
    assert len(by_replica) == 2, by_replica
    victim = streams[0][0]
    pid = _serve_details()[victim]["pid"]
    os.kill(pid, signal.SIGKILL)
    ended = {}
    for k, (rid, stream) in enumerate(streams):
        try:
            chunks = list(stream)
            ended[k] = (rid, chunks[-1].choices[0].finish_reason if chunks and chunks[-1].choices else None)
        except openai.APIError as e:
            ended[k] = (rid, f"error: {e.message}")
    for rid, how in ended.values():
        if rid == victim:
            assert how.startswith("error: the replica serving this request failed"), ended
        else:
            assert how == "length", ended  # the other replica's streams complete
    h = ray_app.wait_healthy(2, 90)  # Ray replaces the dead replica
    assert victim not in h["replicas"], h
    r = client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_flashvl_serve_ray_drains_on_sigterm(ray_app, tiny_static_bundle, tmp_path):
    """The command itself, on its own local Ray instance (the module's is stopped first): ready line,
    a stream in flight when SIGTERM arrives completes, new requests are refused, exit code 0."""
    ray_app.close()
    port = free_port()
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flashvl_edge.main", "serve", str(tiny_static_bundle), "--ray",
                             "--replicas", "1", "--port", str(port), "--grace-period", "20"],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        ready = lines.get(timeout=120)
        assert ready.strip() == (f"flashvl serve: ready on http://127.0.0.1:{port} (model tiny-static, 1 replica on "
                                 "Ray, cache-aware routing)"), ready
        wait_until(lambda: health(port).get("healthy") == 1, 60, "the replica is healthy", every_s=0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="tiny-static", max_tokens=1000, stream=True,
                                                messages=[{"role": "user", "content": "A long story"}],
                                                extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: health(port).get("status") != "ok", 20, "/health stops saying ok", every_s=0.05)
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"  # the in-flight stream finished
        assert proc.wait(timeout=60) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert get(port, "/health")[0] == 0  # nothing listens any more
        extra = [lines.get_nowait() for _ in range(lines.qsize())]
        assert not extra, extra  # one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        err.close()
