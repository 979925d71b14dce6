"""``flashvl serve``: an OpenAI-compatible HTTP server for a bundle (Chat Completions, streaming).

    flashvl serve bundles/fvl                                  # http://127.0.0.1:8000/v1
    flashvl serve bundles/fvl --host 0.0.0.0 --api-key "$KEY"  # reachable from the network: set a key
    flashvl serve bundles/fvl --port 0                         # a free port, named in the ready line

One line on stdout when ready: ``flashvl serve: ready on http://HOST:PORT (model NAME, max batch B)``;
the access log and errors go to stderr. SIGTERM (or Ctrl+C) drains: no new requests, in-flight ones
finish within ``--grace-period``, then exit 0. The HTTP layer is ``runtime/server.py``, the batching
``runtime/scheduler.py``; docs/serving.md has the API subset, limits and deployment.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path

from .errors import FlashVLError

MiB = 1024 * 1024


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle directory written by 'flashvl export'")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the bundle directory's name)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $FLASHVL_API_KEY; unset: no key); "
                        "repeat it or separate keys with commas for several, each its own cache tenant")
    p.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=8,
                   help="requests admitted at once, prefilling or decoding (vLLM's --max-num-seqs; default 8)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens one step may run: every decoding request's next token, then prefill chunks "
                        "with what is left (default: the prefill chunk + max batch - 1; docs/serving.md)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prompts are prefilled in chunks ending at multiples of N positions (default 64; the "
                        "same in 'flashvl chat', which gives the same answers); with --itl-stretch 0 a running "
                        "stream waits up to one chunk while a request joins")
    p.add_argument("--itl-stretch", type=float, default=None, metavar="X",
                   help="while a request's prompt is prefilled beside them, running streams decode one step about "
                        "every X quiet decode-step times (default 4; lower: smoother streams, a later first token "
                        "for the joining request; 0: chunks run between decode steps; docs/serving.md)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="every LLM run takes at least two rows, so an INT8/INT4 bundle gives each request the "
                        "answer it gets alone whatever else runs (a lone stream decodes slower; docs/serving.md)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot before new ones get 429 (default 64)")
    p.add_argument("--backend", choices=["ort", "trt"], default="ort",
                   help="ort = ONNX Runtime (default); trt = TensorRT engines from 'flashvl build'")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="ONNX Runtime device (auto: CUDA when onnxruntime-gpu is installed)")
    p.add_argument("--max-tiles", type=int, default=None, help="lower the tile budget per image (dynamic bundles)")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="refuse images with more pixels than this, before decoding (default: the bundle's limit)")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--max-body-bytes", type=int, default=20 * MiB,
                   help="largest request body, images included (default 20 MiB); larger gets 413")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow file:// image URLs below DIR (default: file:// URLs are refused)")
    p.add_argument("--image-cache-bytes", type=int, default=256 * MiB,
                   help="image embeddings kept for reuse, keyed by the decoded pixels (default 256 MiB; 0 = off)")
    p.add_argument("--kv-cache-bytes", type=int, default=256 * MiB,
                   help="prompt-prefix KV kept for reuse across requests (default 256 MiB; 0 = off)")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, let in-flight requests finish for up to S seconds (default 30)")
    # -- several replicas behind one endpoint, on Ray Serve (runtime/cluster.py, docs/scaling.md) -----
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: --replicas copies of this server behind one endpoint, each request "
                        "routed to the replica that holds its image's cache (needs the 'cluster' extra)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="with --ray: replicas to run, each with its own pipeline over the bundle (default: one per "
                        "Ray node)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --ray: the Ray cluster to join ('auto', HEAD_IP:6379); default: a local Ray instance "
                        "on 127.0.0.1")
    # -- what one request may cost (docs/security.md: each limit, its default and why) --------------
    g = p.add_argument_group("limits on hostile input (docs/security.md)")
    g.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="Host header names to answer, comma-separated ('*': any; default: localhost names when "
                        "listening on a loopback address, any name otherwise)")
    g.add_argument("--max-prompt-chars", type=int, default=256 * 1024, metavar="N",
                   help="characters of message text per request, checked before tokenizing (default 262144)")
    g.add_argument("--body-read-timeout", type=float, default=30.0, metavar="S",
                   help="the whole request body must arrive within S seconds, else 408 (default 30)")
    g.add_argument("--header-read-timeout", type=float, default=10.0, metavar="S",
                   help="a connection's request headers must arrive within S seconds, else it is closed (default 10)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                   help="close an idle keep-alive connection after S seconds (default 5)")
    g.add_argument("--max-header-bytes", type=int, default=64 * 1024, metavar="N",
                   help="request line and headers, in bytes (default 65536)")
    g.add_argument("--max-schema-bytes", type=int, default=64 * 1024, metavar="N",
                   help="a response_format json_schema, as JSON (default 65536)")
    g.add_argument("--schema-compile-timeout", type=float, default=5.0, metavar="S",
                   help="compiling one json_schema (in a child process) may take S seconds (default 5)")
    g.add_argument("--schema-compile-memory", type=int, default=256 * MiB, metavar="BYTES",
                   help="memory the schema compiler process may grow by (default 256 MiB)")
    g.add_argument("--max-template-chars", type=int, default=None, metavar="N",
                   help="the rendered chat template, in characters (default: --max-prompt-chars + 65536)")
    g.add_argument("--template-timeout", type=float, default=2.0, metavar="S",
                   help="rendering the bundle's chat template (in a child process) may take S seconds (default 2)")
    g.add_argument("--template-memory", type=int, default=128 * MiB, metavar="BYTES",
                   help="memory the template renderer process may grow by (default 128 MiB)")
    g.add_argument("--max-image-bytes", type=int, default=128 * MiB, metavar="BYTES",
                   help="memory one image's decode may need, estimated from its header before decoding "
                        "(default 128 MiB: a 16-megapixel photo)")
    g.add_argument("--max-concurrent-decodes", type=int, default=2, metavar="N",
                   help="images decoded at once; others wait (default 2)")
    g.add_argument("--image-formats", default="PNG,JPEG,WEBP,GIF,BMP", metavar="LIST",
                   help="image formats accepted, comma-separated, from PNG,JPEG,WEBP,GIF,BMP,TIFF "
                        "(default PNG,JPEG,WEBP,GIF,BMP)")


def _check(args) -> None:
    """Bad flags fail in one line before the bundle loads."""
    for name in ("max_batch", "max_queue", "max_images", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise FlashVLError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("image_cache_bytes", "kv_cache_bytes"):
        if getattr(args, name) < 0:
            raise FlashVLError(f"--{name.replace('_', '-')} must be a number of bytes >= 0 (0 disables it), "
                               f"got {getattr(args, name)}")
    for name in ("max_tiles", "max_image_pixels", "max_num_batched_tokens", "prefill_chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise FlashVLError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.itl_stretch is not None and not (math.isfinite(args.itl_stretch) and args.itl_stretch >= 0):
        raise FlashVLError(f"--itl-stretch must be a number >= 0 (0: no prefill beside decode), got {args.itl_stretch}")
    if not 0 <= args.port <= 65535:
        raise FlashVLError(f"--port must be 0..65535, got {args.port}")
    if not math.isfinite(args.grace_period) or args.grace_period < 0:
        raise FlashVLError(f"--grace-period must be a number of seconds >= 0, got {args.grace_period}")
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        raise FlashVLError(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a directory")
    from .server import check_limit_args

    check_limit_args(args)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: a free one), or one FlashVLError line."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise FlashVLError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise FlashVLError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
    return sock


def make_server(app, grace_period_s: float, on_ready=None):
    """A uvicorn server for ``app`` (h11, asyncio, our own access log) whose SIGTERM/SIGINT first
    marks the app as draining, then lets uvicorn stop: listeners close, in-flight requests get
    ``grace_period_s``, the lifespan shutdown drains the scheduler. ``on_ready(server)`` runs once
    the socket listens."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit and on_ready is not None:
                on_ready(self)

        def handle_exit(self, sig, frame) -> None:
            app.state.flashvl.drain()
            super().handle_exit(sig, frame)

    from .server import http_protocol

    opts = app.state.flashvl.options  # header timeout, keep-alive and header size (docs/security.md)
    config = uvicorn.Config(app, http=http_protocol(opts.header_read_timeout_s), loop="asyncio", ws="none",
                            lifespan="on", log_config=None, log_level="warning", access_log=False,
                            server_header=False, timeout_graceful_shutdown=grace_period_s,
                            timeout_keep_alive=opts.keep_alive_timeout_s,
                            h11_max_incomplete_event_size=opts.max_header_bytes)
    return Server(config)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name, level in (("flashvl_edge.serve", logging.INFO), ("uvicorn", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(args) -> int:
    if getattr(args, "ray", False):  # replicas on Ray Serve behind one endpoint
        from .cluster import run as run_cluster

        return run_cluster(args)
    _check(args)
    # the serve extra, before the bundle loads: a missing one is reported in one line
    from . import server as http
    from .pipeline import Pipeline
    from .scheduler import Scheduler

    api_key = args.api_key or os.environ.get("FLASHVL_API_KEY") or None
    name = args.served_model_name or Path(args.bundle).resolve().name
    sock = bind(args.host, args.port)
    try:
        options = {"device": args.device} if args.backend == "ort" else {}
        pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, max_image_pixels=args.max_image_pixels,
                                    max_tiles=args.max_tiles, max_images=args.max_images,
                                    image_cache_bytes=args.image_cache_bytes, kv_cache_bytes=args.kv_cache_bytes,
                                    prefill_chunk=args.prefill_chunk, batch_invariant=args.batch_invariant, **options)
    except BaseException:
        sock.close()
        raise
    try:
        stopping: list = []  # the uvicorn server, once made: a failed model stops it

        def model_failed(message: str) -> None:
            failed.append(f"the model failed, the server stops ({message})")
            for server in stopping:
                server.should_exit = True

        failed: list[str] = []
        scheduler = Scheduler(pipe, max_batch=args.max_batch, max_queue=args.max_queue,
                              max_num_batched_tokens=args.max_num_batched_tokens, on_fatal=model_failed,
                              itl_stretch=args.itl_stretch).start()
        app = http.create_app(scheduler, pipe, http.ServeOptions(
            model_name=name, api_key=api_key, max_body_bytes=args.max_body_bytes,
            allowed_local_media_path=args.allowed_local_media_path, max_images=args.max_images,
            grace_period_s=args.grace_period, **http.limit_options(args)))
        _setup_logging()

        def ready(server) -> None:
            if not scheduler.ready:  # its thread died while the server started: say so, do not serve
                failed.append("the scheduler stopped before the server was ready (see the error above)")
                server.should_exit = True
                return
            port = sock.getsockname()[1]
            print(f"flashvl serve: ready on {_url(args.host, port)} (model {name}, max batch {scheduler.max_batch}, "
                  f"{scheduler.max_num_batched_tokens} tokens a step, prefill chunk {pipe.generator.prefill_chunk})",
                  flush=True)

        server = make_server(app, args.grace_period, on_ready=ready)
        stopping.append(server)
        # uvicorn re-raises the signal that stopped it once it is done; a no-op handler turns that
        # into a normal return, so a drained server exits 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
        if failed:
            raise FlashVLError(failed[0])
        return 0
    finally:
        sock.close()
        pipe.close()
