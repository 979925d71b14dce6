"""``flashvl serve --ray``: several ``flashvl serve`` replicas behind one endpoint, on Ray Serve.

    flashvl serve bundles/fvl --ray --replicas 2                    # a local Ray instance, 2 replicas
    flashvl serve /opt/flashvl/fvl --ray --address auto --host 0.0.0.0 --api-key "$KEY"   # a Ray cluster
    serve run docs/ray-serve.yaml                                   # the same application from a config file

The application (``build_app``) has two deployments:

* ``FlashVLReplica`` (N replicas; 1 CPU each, or 1 GPU with ``--backend trt`` / ``--device cuda``): each runs
  what ``flashvl serve`` runs - ``Pipeline.from_bundle`` over its own copy of the bundle, a ``Scheduler`` and
  runtime/server.py's ``create_app`` with its lifespan - and serves ASGI requests forwarded as
  ``(scope, body)``: the answer's ASGI messages stream back unchanged (status, headers, SSE chunks).
* ``FlashVLIngress`` (the HTTP endpoint behind Ray's proxy): reads the body (bounded as the server bounds
  it), derives the routing key of a chat request (:func:`route_key`: a content hash of the first image and
  the prompt text before it), and forwards the request through a DeploymentHandle whose request router is
  :class:`CacheAffinityRouter`.

``CacheAffinityRouter`` (Ray Serve's request-router API) puts the replicas on a consistent-hash ring: a
request goes to the replica owning its key (so a second question about an image finds the image's embeddings
and prefix KV there), unless that replica already holds ``spill_at`` requests (default: its batch size),
in which case the least loaded replica takes it. ``routing="round-robin"`` is the baseline the tests and
benchmarks/ray_routing.py compare against. Requests to one named replica (``replica=``) are how the
ingress asks every replica for ``/health``, ``/metrics`` and ``drain``.

Faults: a replica that dies (SIGKILL, OOM) is replaced by Ray; a request it held ends with an OpenAI error
object - as an SSE ``data: {"error": ...}`` event when streaming had begun - or, when nothing had been sent
yet, is retried once on another replica. A replica whose scheduler stopped (a model failure) fails Ray's
health check and is replaced. ``flashvl serve --ray`` drains on SIGTERM: no new requests (503), in-flight
ones finish within ``--grace-period``, then the application is deleted.

Ray is imported lazily: ``flashvl serve`` without ``--ray`` never needs the ``cluster`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from .errors import FlashVLError, MissingExtraError

log = logging.getLogger("flashvl_edge.serve")

APP_NAME = "flashvl"
REPLICA = "FlashVLReplica"
INGRESS = "FlashVLIngress"
ROUTER_PATH = "flashvl_edge.runtime.cluster:CacheAffinityRouter"
POLICIES = ("cache", "round-robin")
PREFIX_CHARS = 256  # leading prompt text in the routing key
VIRTUAL_NODES = 64  # ring points per replica
HOLD_S = 5.0  # the router counts a chosen replica's load this long before the request is sent
BROADCAST_TIMEOUT_S = 3.0  # /health, /metrics: a replica that does not answer within this is "unreachable"
REPLICA_HEADER = b"x-flashvl-replica"


def _ray():
    """``ray`` and ``ray.serve``, or one line naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ModuleNotFoundError as e:
        raise MissingExtraError(e.name or "ray", "flashvl serve --ray", extra="cluster") from None
    return ray, serve


# --------------------------------------------------------------------------------------------
# The routing key and the ring (plain Python: the router's logic, testable without Ray)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def route_key(body: Any, prefix_chars: int = PREFIX_CHARS) -> str | None:
    """The cache-affinity key of a chat request body: a hash of the prompt text before the first image
    (its first ``prefix_chars`` characters, roles included) and of the first image's content (its
    base64 payload; a ``file://`` URL by its path). Without an image: the first ``prefix_chars``
    characters of the conversation, so turns of one conversation and requests sharing a long system
    prompt meet on one replica. None for anything that is not a list of messages (the replica answers
    those with a 400 wherever they land)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return None
    text: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        text.append(f"{m.get('role')}\n")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            if part.get("type") == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if isinstance(url, str):
                    payload = url.partition(",")[2] if url[:5].lower() == "data:" else url
                    image = _digest(payload.encode("utf-8", "replace"))
                    lead = "".join(text)[:prefix_chars].encode("utf-8", "replace")
                    return "i:" + _digest(lead + b"\0" + image).hex()
            elif isinstance(part.get("text"), str):
                text.append(part["text"])
        if sum(map(len, text)) >= prefix_chars:
            break
    return "t:" + _digest("".join(text)[:prefix_chars].encode("utf-8", "replace")).hex()


def _point(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing over replica ids (``VIRTUAL_NODES`` points each): adding or losing a replica
    moves only the keys of the points it gains or loses."""

    def __init__(self, ids=(), virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.ids = frozenset(ids)
        pairs = sorted((_point(f"{i}:{v}"), i) for i in self.ids for v in range(virtual_nodes))
        self._points = [p for p, _ in pairs]
        self._owners = [i for _, i in pairs]

    def owner(self, key: str) -> str | None:
        if not self._points:
            return None
        at = bisect.bisect_right(self._points, _point(key))
        return self._owners[at % len(self._points)]


# --------------------------------------------------------------------------------------------
# The request router (Ray Serve's RequestRouter API; the class is made on first use, so importing this
# module needs no Ray)

# what the routers of this process saw, for the ingress in the same process: replica ids per deployment
# and how requests were placed ("affine": the ring's owner; "spilled": another replica because the
# owner held spill_at requests or was full; "round_robin"; "any": no key)
_KNOWN: dict[str, tuple[str, ...]] = {}
ROUTED: dict[str, int] = {"affine": 0, "spilled": 0, "round_robin": 0, "any": 0}


def _shared():
    """This module as imported in the running process. Ray sends a request router by value (with copies
    of the globals it uses), so the router reaches _KNOWN and ROUTED through here."""
    import importlib

    return importlib.import_module(__name__)


def _router_class():
    from ray.serve.request_router import RequestRouter

    class CacheAffinityRouter(RequestRouter):
        """Consistent hashing on :func:`route_key` with spill-over to the least loaded replica."""

        def initialize_state(self, policy: str = "cache", spill_at: int | None = None,
                             virtual_nodes: int = VIRTUAL_NODES, **_) -> None:
            if policy not in POLICIES:
                raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
            self._policy, self._spill_at, self._vnodes = policy, spill_at, virtual_nodes
            self._ring = HashRing((), virtual_nodes)
            self._cursor = 0
            # Loads are this router's own counts, kept from the moment a replica is chosen (choices made at
            # the same instant must see each other; Ray's queue-length cache hears of a request only once
            # it reached its replica, and keeps an entry up to 10 s): requests chosen but not yet sent
            # (forgotten after HOLD_S: one cancelled while it waited is never sent), and requests sent and
            # not completed.
            self._held: dict[str, tuple] = {}  # internal request id -> (replica, monotonic time, decision)
            self._sent: dict[str, str] = {}  # internal request id -> replica
            self._busy: dict[str, int] = {}  # replica -> requests sent and not completed

        def update_replicas(self, replicas) -> None:
            super().update_replicas(replicas)
            ids = sorted(r.replica_id.unique_id for r in replicas)
            _shared()._KNOWN[self._deployment_id.name] = tuple(ids)
            if frozenset(ids) != self._ring.ids:
                self._ring = HashRing(ids, getattr(self, "_vnodes", VIRTUAL_NODES))

        def _load(self, replica) -> int:
            uid = replica.replica_id.unique_id
            return self._busy.get(uid, 0) + sum(1 for r, _, _ in self._held.values() if r == uid)

        def _ranked(self, rid: str, first, rest, decision: str):
            now = time.monotonic()
            for old in [k for k, (_, t, _) in self._held.items() if now - t > HOLD_S]:
                del self._held[old]
            self._held[rid] = (first.replica_id.unique_id, now, decision)
            return [[first], sorted(rest, key=self._load)]  # then the least loaded of the others

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            if not candidate_replicas:
                return []
            if pending_request is None:
                return [candidate_replicas]
            pending_request.routing_context.should_backoff = True
            kwargs = pending_request.kwargs or {}
            rid = pending_request.metadata.internal_request_id
            target = kwargs.get("replica")
            if target:  # a request for one replica (health, metrics, drain)
                return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
            order = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            if self._policy == "round-robin":
                first = order[self._cursor % len(order)]
                self._cursor += 1
                return self._ranked(rid, first, [r for r in order if r is not first], "round_robin")
            key = kwargs.get("route_key")
            owner_id = self._ring.owner(key) if key else None
            owner = next((r for r in order if r.replica_id.unique_id == owner_id), None)
            if owner is None:
                first = min(order, key=self._load)
                return self._ranked(rid, first, [r for r in order if r is not first], "any")
            others = [r for r in order if r is not owner]
            spill_at = self._spill_at or owner.max_ongoing_requests
            if self._load(owner) < spill_at or not others:
                return self._ranked(rid, owner, others, owner_id)
            first = min(others, key=self._load)  # the owner holds spill_at requests: the least loaded
            if self._load(first) >= self._load(owner):
                first = owner  # ... unless nobody has fewer
            return self._ranked(rid, first, [r for r in order if r is not first], owner_id)

        def on_request_routed(self, pending_request, replica_id, result) -> None:
            rid, uid = pending_request.metadata.internal_request_id, replica_id.unique_id
            _, _, placed = self._held.pop(rid, (None, None, None))
            if placed is None:
                return  # a request for one replica: not counted
            self._sent[rid] = uid
            self._busy[uid] = self._busy.get(uid, 0) + 1
            routed = _shared().ROUTED
            if placed in ("round_robin", "any"):
                routed[placed] += 1
            else:
                routed["affine" if placed == uid else "spilled"] += 1

        def on_request_completed(self, replica_id, internal_request_id) -> None:
            uid = self._sent.pop(internal_request_id, None)
            if uid is not None:
                self._busy[uid] = max(0, self._busy.get(uid, 0) - 1)

    CacheAffinityRouter.__module__, CacheAffinityRouter.__qualname__ = __name__, "CacheAffinityRouter"
    return CacheAffinityRouter


def __getattr__(name: str):
    if name == "CacheAffinityRouter":  # what RequestRouterConfig imports (ROUTER_PATH)
        cls = _router_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Options: flashvl serve's own flags, parsed by its own parser


def serve_args(bundle: str, flags=(), **overrides) -> argparse.Namespace:
    """``flashvl serve BUNDLE FLAGS...`` as the namespace ``cli_serve`` would get (defaults included)."""
    from . import cli_serve

    p = argparse.ArgumentParser(prog="flashvl serve", add_help=False)
    cli_serve.add_arguments(p)
    args = p.parse_args([str(bundle), *map(str, flags)])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def _portable(args) -> dict:
    """The flag values a replica needs (plain data; the API key resolved from the environment here)."""
    out = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    out["api_key"] = args.api_key or os.environ.get("FLASHVL_API_KEY") or None
    out["bundle"] = os.path.abspath(args.bundle)
    return out


def _model_name(args) -> str:
    from pathlib import Path

    return args.served_model_name or Path(args.bundle).resolve().name


# --------------------------------------------------------------------------------------------
# A replica: flashvl serve's pipeline, scheduler and app, driven through ASGI


class FlashVLReplica:
    """One ``flashvl serve`` inside a Ray Serve replica (made a deployment by :func:`build_app`).

    The app runs on an event loop of its own, in a thread, as under uvicorn (``run_until_complete``):
    anyio then keeps its worker threads between requests, as in ``flashvl serve``. On Ray's user-code loop
    every request's worker thread would end with the request."""

    async def __init__(self, options: dict) -> None:
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        from . import cli_serve

        args = argparse.Namespace(**options)
        cli_serve._check(args)
        cli_serve._setup_logging()  # the access log and errors on the replica's stderr (Ray's log files)
        self.failed: str | None = None
        self.pipe, self.scheduler, self.app = await asyncio.to_thread(_open_server, args, self._model_failed)
        self.state = self.app.state.flashvl
        self.loop = asyncio.new_event_loop()
        self._stopped = asyncio.Event()
        threading.Thread(target=self._run_loop, name="flashvl-app", daemon=True).start()
        self.lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None, access_log=False))
        await self._on_app_loop(self.lifespan.startup())
        try:
            from ray import serve

            self.id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (a unit test drives the class directly)
            self.id = f"local-{os.getpid()}"
        self._header = (REPLICA_HEADER, self.id.encode())

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self._stopped = asyncio.Event()
            await self._stopped.wait()

        self.loop.run_until_complete(main())

    def _on_app_loop(self, coro):
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def _model_failed(self, message: str) -> None:
        self.failed = f"the model failed ({message})"

    async def asgi(self, scope: dict, body: bytes, route_key: str | None = None):
        """The app's ASGI messages for one request, a list at a time, as they are sent. A caller that
        goes away (the generator is cancelled or closed) is a client disconnect for the app."""
        here = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        gone: list = []  # the app loop's Event, once receive() made it
        first = [True]

        async def receive():  # on the app's loop
            if first[0]:
                first[0] = False
                return {"type": "http.request", "body": body, "more_body": False}
            if not gone:
                gone.append(asyncio.Event())
            await gone[0].wait()
            return {"type": "http.disconnect"}

        async def send(message):  # on the app's loop
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            here.call_soon_threadsafe(out.put_nowait, message)

        task = asyncio.run_coroutine_threadsafe(self.app(scope, receive, send), self.loop)
        task.add_done_callback(lambda _: here.call_soon_threadsafe(out.put_nowait, None))
        try:
            done = False
            while not done:
                batch = [await out.get()]
                while not out.empty():
                    batch.append(out.get_nowait())
                if batch[-1] is None:
                    batch.pop()
                    done = True
                if batch:
                    yield batch
        finally:
            if not task.done():  # the caller left: a disconnect, which cancels the request
                self.loop.call_soon_threadsafe(lambda: gone[0].set() if gone else gone.append(_set_event()))
                await asyncio.wait({asyncio.wrap_future(task)}, timeout=5.0)

    async def asgi_once(self, scope: dict, body: bytes, route_key: str | None = None) -> list:
        """All of a request's ASGI messages in one answer (not streamed: one Ray call, no generator)."""
        return [message async for batch in self.asgi(scope, body) for message in batch]

    def _status(self) -> str:
        if self.failed:
            return self.failed
        if self.state.draining:
            return "draining"
        return "ok" if self.scheduler.ready else "the scheduler is not running"

    async def health(self, replica: str | None = None) -> dict:
        return {"replica": self.id, "status": self._status(), "running": self.scheduler.running,
                "waiting": self.scheduler.queue_depth}

    async def metrics(self, replica: str | None = None) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.state.metrics.registry).decode()

    async def drain(self, replica: str | None = None) -> dict:
        """Stop taking requests (503); wait until in-flight ones finish or the grace period ends."""
        self.state.drain()
        deadline = time.monotonic() + self.state.remaining_grace()
        while (self.scheduler.running or self.scheduler.queue_depth) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await self.health()

    def check_health(self) -> None:
        """Ray's health check: a replica whose model failed or whose scheduler stopped is replaced."""
        status = self._status()
        if status not in ("ok", "draining"):
            raise RuntimeError(status)

    async def __del__(self) -> None:
        self.state.drain()
        await self._on_app_loop(self.lifespan.shutdown())  # create_app's lifespan: the scheduler drains
        self.loop.call_soon_threadsafe(self._stopped.set)
        await asyncio.to_thread(self.pipe.close)


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


def _open_server(args, on_fatal):
    """The pipeline, the started scheduler and the app, as ``flashvl serve`` makes them."""
    from . import server as http
    from .pipeline import Pipeline
    from .scheduler import Scheduler

    device = {"device": args.device} if args.backend == "ort" else {}
    pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, max_image_pixels=args.max_image_pixels,
                                max_tiles=args.max_tiles, max_images=args.max_images,
                                image_cache_bytes=args.image_cache_bytes, kv_cache_bytes=args.kv_cache_bytes,
                                prefill_chunk=args.prefill_chunk, batch_invariant=args.batch_invariant, **device)
    try:
        scheduler = Scheduler(pipe, max_batch=args.max_batch, max_queue=args.max_queue,
                              max_num_batched_tokens=args.max_num_batched_tokens, on_fatal=on_fatal,
                              itl_stretch=args.itl_stretch).start()
        app = http.create_app(scheduler, pipe, http.ServeOptions(
            model_name=_model_name(args), api_key=args.api_key, max_body_bytes=args.max_body_bytes,
            allowed_local_media_path=args.allowed_local_media_path, max_images=args.max_images,
            grace_period_s=args.grace_period, **http.limit_options(args)))
    except BaseException:
        pipe.close()
        raise
    return pipe, scheduler, app


# --------------------------------------------------------------------------------------------
# The ingress: body, routing key, forwarding, faults; /health and /metrics over every replica


_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
               "root_path", "headers", "client", "server")


def _is_replica_failure(err: BaseException) -> bool:
    from ray import exceptions as rex

    return isinstance(err, (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError))


class FlashVLIngress:
    """The endpoint: one ASGI app in front of the replicas (made a deployment by :func:`build_app`)."""

    def __init__(self, replicas, settings: dict) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.replicas = replicas  # a DeploymentHandle to FlashVLReplica
        self.stream = replicas.options(stream=True)
        self.settings = settings
        self.draining = False
        self.in_flight = 0
        keys = settings.get("api_keys") or []
        self.keys = [k.encode() for k in keys]
        r = self.registry = CollectorRegistry()
        r.register(_Routed())
        self.retries = Counter("flashvl_cluster_retries", "requests sent again after their replica failed "
                               "before answering", registry=r)
        self.failures = Counter("flashvl_cluster_replica_failures", "requests whose replica failed", ["phase"],
                                registry=r)
        self.healthy = Gauge("flashvl_cluster_healthy_replicas", "replicas whose /health was ok at the last "
                             "/health or /metrics", registry=r)

    def __serve_build_asgi_app__(self):
        return _IngressApp(self)

    # -- every replica, one request each
    async def broadcast(self, method: str) -> dict[str, Any]:
        """``method`` on every replica the router knows (replica id -> answer, or an exception)."""
        ids = _KNOWN.get(REPLICA)
        if ids is None:  # the router is made on the first request through the handle
            await asyncio.wait_for(self.replicas.health.remote(), BROADCAST_TIMEOUT_S)
            ids = _KNOWN.get(REPLICA, ())

        async def one(rid):
            call = getattr(self.replicas, method).remote(replica=rid)
            try:
                return await asyncio.wait_for(call, BROADCAST_TIMEOUT_S)
            except BaseException as e:  # noqa: BLE001 - reported per replica
                call.cancel()
                return e

        # one after the other: handle calls made while serving one HTTP request share its internal request
        # id, and Ray's router matches a chosen replica to its pending request by that id
        return {rid: await one(rid) for rid in ids}

    async def health(self) -> tuple[int, dict]:
        answers = await self.broadcast("health")
        replicas = {rid: _status_of(a) for rid, a in answers.items()}
        n = sum(s == "ok" for s in replicas.values())
        self.healthy.set(n)
        status = "draining" if self.draining else "ok" if n else "unavailable: no healthy replica"
        return (200 if status == "ok" else 503), {"status": status, "healthy": n,
                                                  "replicas_wanted": self.settings["replicas"], "replicas": replicas}

    async def metrics(self) -> bytes:
        from prometheus_client import generate_latest

        answers = await self.broadcast("metrics")
        self.healthy.set(sum(isinstance(a, str) for a in answers.values()))
        return generate_latest(self.registry) + _merge_metrics(
            {rid: a for rid, a in answers.items() if isinstance(a, str)})

    async def drain(self) -> dict:
        """SIGTERM: new requests get 503; every replica finishes what it has (its grace period)."""
        self.draining = True
        answers = await self.broadcast("drain")
        deadline = time.monotonic() + 5.0
        while self.in_flight and time.monotonic() < deadline:  # the last bytes on their way out
            await asyncio.sleep(0.02)
        return {rid: _status_of(a) for rid, a in answers.items()}

    def authorized(self, scope) -> bool:
        if not self.keys or not scope.get("path", "").startswith("/v1"):
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                ok = False
                for key in self.keys:
                    ok |= hmac.compare_digest(token.strip(), key)
                return ok and scheme.lower() == b"bearer"
        return False


def _status_of(answer) -> str:
    if isinstance(answer, dict):
        return answer["status"]
    what = "no answer" if isinstance(answer, asyncio.TimeoutError) else type(answer).__name__
    return f"unreachable ({what})"


class _Routed:
    """``flashvl_cluster_routed_requests_total{decision}``, read from this process's routers (ROUTED)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("flashvl_cluster_routed_requests", "requests placed by the router: affine "
                                     "(the ring's owner), spilled (another replica: the owner was full), "
                                     "round_robin, any (no routing key)", labels=["decision"])
        for decision, n in ROUTED.items():
            family.add_metric([decision], n)
        yield family


def _merge_metrics(texts: dict[str, str]) -> bytes:
    """Every replica's Prometheus text as one exposition, each sample labelled with its replica."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    for rid, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            into = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            for s in fam.samples:
                into.add_sample(s.name, {"replica": rid, **s.labels}, s.value, s.timestamp, s.exemplar)

    class Merged:
        def collect(self):
            return list(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class _IngressApp:
    """The ingress's ASGI app (pure ASGI: streams and disconnects pass straight through)."""

    def __init__(self, ingress: FlashVLIngress) -> None:
        self.ingress = ingress

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        ing = self.ingress
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if method in ("GET", "HEAD") and path == "/health":
            status, body = await ing.health()
            return await _send(send, status, json.dumps(body).encode(), b"application/json")
        if method in ("GET", "HEAD") and path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            return await _send(send, 200, await ing.metrics(), CONTENT_TYPE_LATEST.encode())
        if ing.draining:
            return await _error(send, 503, "the server is shutting down; retry on another instance",
                                "shutting_down")
        ing.in_flight += 1
        try:
            await self._forward(scope, receive, send)
        finally:
            ing.in_flight -= 1

    async def _read_body(self, scope, receive) -> bytes | None:
        """At most max_body_bytes + 1 bytes (the replica answers 413 past the limit), within the body
        read timeout; None when the client left."""
        limit, buf = self.ingress.settings["max_body_bytes"], bytearray()
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.strip().isdigit() and int(declared) > 2 * limit:
            return b""  # not worth reading: the replica refuses it from the header

        async def read():
            while len(buf) <= limit:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                buf.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            return True

        if not await asyncio.wait_for(read(), self.ingress.settings["body_read_timeout_s"]):
            return None
        return bytes(buf[:limit + 1])

    async def _forward(self, scope, receive, send) -> None:
        ing = self.ingress
        fwd = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
        key, stream = None, False
        if not ing.authorized(scope):
            body = b""  # the replica answers 401 before it would read a body
        else:
            try:
                body = await self._read_body(scope, receive)
            except asyncio.TimeoutError:
                return await _error(send, 408, f"the request body did not arrive within "
                                    f"{ing.settings['body_read_timeout_s']:g} s (--body-read-timeout)",
                                    "request_timeout")
            if body is None:
                return  # the client left
            if method_is_chat(scope):
                try:
                    parsed = json.loads(body)
                except (ValueError, RecursionError):
                    parsed = None  # the replica answers the 400
                key = route_key(parsed)
                stream = isinstance(parsed, dict) and parsed.get("stream") is True
        started = streaming = False
        for attempt in (0, 1):
            # a stream's messages as they come; any other answer in one call, which costs less
            gen = ing.stream.asgi.remote(fwd, body, route_key=key) if stream else \
                ing.replicas.asgi_once.remote(fwd, body, route_key=key)
            try:
                async for batch in (gen if stream else _one(gen)):
                    for message in batch:
                        if message["type"] == "http.response.start":
                            started = True
                            streaming = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                            for k, v in message.get("headers", []))
                        await send(message)
                return
            except asyncio.CancelledError:  # the client left: Ray cancels this request, and so the replica's
                gen.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error object
                if type(e).__name__ == "BackPressureError":
                    return await _error(send, 429, "every replica's queue is full; retry later", "queue_full",
                                        [(b"retry-after", b"1")])
                failed = _is_replica_failure(e)
                ing.failures.labels("mid_stream" if started else "before_response").inc()
                log.warning("flashvl serve --ray: a replica failed while serving a request (%s)",
                            type(e).__name__)
                if not started and failed and attempt == 0:
                    ing.retries.inc()
                    continue  # nothing was sent: once more, on whichever replica the router picks now
                message = ("the replica serving this request failed" + ("" if failed else " (internal error)")
                           + "; retry the request")
                if not started:
                    return await _error(send, 503 if failed else 500, message,
                                        "replica_failed" if failed else "internal_error")
                if streaming:
                    err = {"error": {"message": message, "type": "server_error", "param": None,
                                     "code": "replica_failed"}}
                    await send({"type": "http.response.body", "more_body": True,
                                "body": f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return


async def _one(response):
    yield await response


def method_is_chat(scope) -> bool:
    return scope.get("method") == "POST" and scope.get("path") == "/v1/chat/completions"


async def _send(send, status: int, body: bytes, content_type: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


async def _error(send, status: int, message: str, code: str, headers=()) -> None:
    from .server import ApiError

    body = json.dumps(ApiError(status, message, code=code).body()).encode()
    await _send(send, status, body, b"application/json", headers)


# --------------------------------------------------------------------------------------------
# The application


def _resources(args) -> dict:
    gpu = args.backend == "trt" or args.device == "cuda"
    return {"num_cpus": 0 if gpu else 1, "num_gpus": 1 if gpu else 0}


def build_app(args: argparse.Namespace, replicas: int = 1, routing: str = "cache", spill_at: int | None = None,
              ray_actor_options: dict | None = None):
    """The Ray Serve application: ``replicas`` FlashVLReplica deployments (``args``: flashvl serve's
    flags) behind one FlashVLIngress, routed by ``routing`` ("cache" or "round-robin")."""
    _, serve = _ray()
    from ray.serve.config import RequestRouterConfig

    if routing not in POLICIES:
        raise FlashVLError(f"routing must be one of {', '.join(POLICIES)}, got {routing!r}")
    if replicas < 1:
        raise FlashVLError(f"--replicas must be at least 1, got {replicas}")
    options = _portable(args)
    from .server import ServeOptions

    keys = ServeOptions(model_name="", api_key=options["api_key"]).keys()
    replica = serve.deployment(
        FlashVLReplica, name=REPLICA, num_replicas=replicas,
        # a replica is full when its scheduler would answer 429; past that, requests wait in the router
        max_ongoing_requests=args.max_batch + args.max_queue, max_queued_requests=args.max_queue,
        ray_actor_options=ray_actor_options or _resources(args),
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=args.grace_period + 5.0, graceful_shutdown_wait_loop_s=0.5,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_PATH,
            request_router_kwargs={"policy": routing, "spill_at": spill_at or args.max_batch}),
    )
    _, serve = _ray()
    ingress = serve.deployment(serve.ingress()(FlashVLIngress), name=INGRESS, num_replicas=1,
                               max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    settings = {"replicas": replicas, "max_body_bytes": args.max_body_bytes, "api_keys": keys,
                "body_read_timeout_s": args.body_read_timeout, "routing": routing}
    return ingress.bind(replica.bind(options), settings)


def app_builder(config: dict):
    """``serve run``'s application builder (docs/ray-serve.yaml): ``bundle``, ``replicas``, ``routing``,
    ``spill_at`` and ``flags`` (any flashvl serve flags, as on the command line)."""
    config = dict(config)
    unknown = set(config) - {"bundle", "replicas", "routing", "spill_at", "flags"}
    if "bundle" not in config or unknown:
        raise FlashVLError(f"the application's args need 'bundle' and take replicas, routing, spill_at, flags; "
                           f"got {sorted(config)}")
    args = serve_args(config["bundle"], config.get("flags") or ())
    return build_app(args, replicas=int(config.get("replicas", 1)), routing=config.get("routing", "cache"),
                     spill_at=config.get("spill_at"))


# --------------------------------------------------------------------------------------------
# flashvl serve --ray


def _bounded(func, timeout_s: float) -> bool:
    """``func()`` in a thread, at most ``timeout_s``: True when it returned."""
    done = threading.Event()
    result = [False]

    def call():
        try:
            func()
            result[0] = True
        except Exception as e:  # noqa: BLE001 - reported by the caller's line
            print(f"flashvl serve: {type(e).__name__} while draining", file=sys.stderr, flush=True)
        finally:
            done.set()

    threading.Thread(target=call, daemon=True).start()
    return done.wait(timeout_s) and result[0]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(args) -> int:
    """``flashvl serve BUNDLE --ray``: start (or join) Ray, deploy, print the ready line, drain on SIGTERM."""
    from . import cli_serve

    cli_serve._check(args)
    if args.replicas is not None and args.replicas < 1:
        raise FlashVLError(f"--replicas must be at least 1, got {args.replicas}")
    if not os.path.isfile(os.path.join(args.bundle, "manifest.json")):
        raise FlashVLError(f"{args.bundle!r} is not a bundle (no manifest.json); every Ray node needs the bundle "
                           "at this path")
    ray, serve = _ray()
    port = args.port or _free_port(args.host)
    if args.address:
        ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    else:  # a Ray instance of this machine only, on the loopback address
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=False)
    replicas = args.replicas or max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": port})
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config  # a Serve instance already running keeps its own
        if (http.host, http.port) != (args.host, port):
            print(f"flashvl serve: Ray Serve already runs on this cluster and listens on {http.host}:{http.port}; "
                  f"--host/--port are not applied", file=sys.stderr, flush=True)
            args.host, port = http.host, http.port
        app = build_app(args, replicas=replicas)
        try:
            handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # noqa: BLE001 - a replica that cannot start: one line
            raise FlashVLError(f"the Ray Serve application did not start: {str(e).strip().splitlines()[-1]}") \
                from None
        drain = handle.drain  # made now: making a handle method talks to Ray's GCS, which may be gone later
        print(f"flashvl serve: ready on {cli_serve._url(args.host, port)} (model {_model_name(args)}, "
              f"{replicas} replica{'s' * (replicas != 1)} on Ray, cache-aware routing)", flush=True)
        os.dup2(2, 1)  # the ready line is the one line on stdout; Ray's own messages go to stderr
        while not stop.wait(0.5):
            pass
        print("flashvl serve: draining", file=sys.stderr, flush=True)
        # every step bounded: a signal sent to the whole process group (systemd's default KillMode, a
        # terminal's Ctrl+C) may have stopped the local Ray instance's own processes too
        drained = _bounded(lambda: drain.remote().result(timeout_s=args.grace_period + 15.0),
                           args.grace_period + 20.0)
        shut = drained and _bounded(serve.shutdown, args.grace_period + 20.0)
        if not shut:
            print("flashvl serve: Ray did not answer while draining; stopping anyway", file=sys.stderr, flush=True)
            os._exit(1)  # ray.shutdown() would wait for the same GCS
        return 0
    finally:
        ray.shutdown()
