"""flashvl serve: the OpenAI-compatible HTTP layer, then the real server end to end.

Two halves:

* The HTTP layer (``runtime/server.py``) in this process, on uvicorn in a thread, over a stand-in
  scheduler (the real ``Scheduler`` with ``_loop`` replaced by a word generator) and a stand-in pipeline
  (the real image loader and PromptError, no graphs). Fast and deterministic: every bad request, the
  queue and draining answers, disconnects, the API key, metrics and the access log.
* The real server, ``python -m flashvl_edge.main serve BUNDLE --port 0`` as a subprocess on the tiny
  bundles: the official ``openai`` client for the happy paths, raw HTTP for bad requests (each followed
  by a good one), ``[image, text]`` against ``Pipeline.chat``, the API key from the environment and
  SIGTERM.

Everything listens on 127.0.0.1 only; every wait is bounded in time.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")  # the serve extra (installed by dev)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from flashvl_edge.runtime import cli_serve  # noqa: E402
from flashvl_edge.runtime.errors import PromptError  # noqa: E402
from flashvl_edge.runtime.generate import TextAssembler  # noqa: E402
from flashvl_edge.runtime.images import load_image  # noqa: E402
from flashvl_edge.runtime.scheduler import FinishEvent, Scheduler, TokenEvent, Usage  # noqa: E402
from flashvl_edge.runtime.server import ServeOptions, create_app, parse_chat_request  # noqa: E402

PH = "<image>"


# --------------------------------------------------------------------------------------------
# images and HTTP helpers


def png_bytes(w=48, h=32, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def bomb_png(w=100_000, h=100_000) -> bytes:
    """A valid 1x1 PNG whose header claims w x h pixels (IHDR rewritten, CRC fixed)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, w, h)  # IHDR data starts after signature (8) + length (4) + type (4)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def call(port, method, path, body=None, headers=None, timeout=60.0, chunked=False):
    """(status, headers, parsed JSON or text) over a fresh connection."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)) and not chunked:
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if chunked:
            conn.request(method, path, body=iter(body), headers=headers, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        heads = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        return resp.status, heads, json.loads(raw)
    except ValueError:
        return resp.status, heads, raw.decode("utf-8", "replace")


def chat(port, body, headers=None, timeout=60.0):
    return call(port, "POST", "/v1/chat/completions", body, headers, timeout)


def assert_openai_error(status, body, expected_status):
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"], err


def metrics(port) -> dict:
    """{(name, labels as a sorted tuple): value} of one scrape."""
    status, _, text = call(port, "GET", "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sse_events(raw: str) -> list:
    lines = [line for line in raw.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), raw[:500]
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def wait_until(predicate, timeout_s: float, what: str, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# --------------------------------------------------------------------------------------------
# The stand-ins: a pipeline without graphs, a scheduler whose loop makes up words


WORDS = ["Hello", " there", ",", " this", " is", " a", " made", "-up", " reply", " STOP", " and", " more", "."]


class FakePipeline:
    """What the server needs of a Pipeline: ``prompts.placeholder``, ``generator.max_context`` and
    ``prepare_prompt`` with the real checks that matter here (placeholders = images, the image loader
    with a pixel limit, a context limit; one token per character)."""

    def __init__(self, max_context=4096, max_image_pixels=1_000_000):
        self.prompts = SimpleNamespace(placeholder=PH)
        self.generator = SimpleNamespace(max_context=max_context)
        self.llm = SimpleNamespace(limits=None)
        self.max_image_pixels = max_image_pixels
        self.seen: list[tuple[list[dict], int]] = []

    def prepare_prompt(self, messages, images=()):
        self.seen.append(([dict(m) for m in messages], len(images)))
        if any(m["content"] == "boom" for m in messages):
            raise RuntimeError("a bug in the pipeline")
        found = sum(m["content"].count(PH) for m in messages)
        if found != len(images):
            raise PromptError(f"{found} placeholders for {len(images)} images")
        for im in images:
            load_image(im, self.max_image_pixels)
        n = sum(len(m["content"]) for m in messages)
        if n >= self.generator.max_context:
            raise PromptError(f"the prompt needs {n} tokens but the model's context is {self.generator.max_context}")
        return SimpleNamespace(token_ids=list(range(n)), image_mask=[False] * n, images=[], n_image_tokens=0,
                               n_tiles=0)


class FakeScheduler(Scheduler):
    """The real Scheduler (queue, submit, shutdown, handles), with a loop that emits WORDS: greedy in
    order, sampled from the request's own seeded generator otherwise. ``gate`` cleared: nothing is
    admitted (the queue fills). Records when each handle's cancel() was called."""

    def __init__(self, pipeline, max_batch=2, max_queue=2, step_s=0.002):
        super().__init__(pipeline, max_batch=max_batch, max_queue=max_queue)
        self.rows: list = []
        self.step_s = step_s
        self.gate = threading.Event()
        self.gate.set()
        self.cancel_times: dict[str, float] = {}
        self.retired_cancelled: dict[str, float] = {}

    def _make_core(self, max_num_batched_tokens):
        return None  # no graphs: this loop makes the words up

    def _has_rows(self):
        return bool(self.rows)

    @property
    def running(self):
        return len(self.rows)

    def submit(self, request, loop=None):
        handle = super().submit(request, loop)
        real = handle.cancel

        def cancel():
            self.cancel_times.setdefault(handle.id, time.perf_counter())
            real()

        handle.cancel = cancel
        return handle

    def _loop(self):
        decode = lambda ids: "".join(WORDS[i] for i in ids)  # noqa: E731
        while True:
            with self._wake:
                if self._stop:
                    break
                while self.gate.is_set() and self.waiting and len(self.rows) < self.max_batch:
                    h = self.waiting.popleft()
                    p = h.request.params
                    self.rows.append(SimpleNamespace(handle=h, params=p, n=0, rng=np.random.default_rng(p.seed),
                                                     text=TextAssembler(decode, p.stop),
                                                     prompt=len(h.request.prepared.token_ids)))
            time.sleep(self.step_s)
            for row in list(self.rows):
                if row.handle.cancelled.is_set():
                    self._end(row, "cancelled")
                    self.retired_cancelled[row.handle.id] = time.perf_counter()
                    continue
                p = row.params
                tid = row.n % len(WORDS) if p.temperature == 0 else int(row.rng.integers(len(WORDS)))
                row.n += 1
                piece = row.text.push(tid)
                row.handle._emit(TokenEvent(tid, piece, time.perf_counter()))
                if row.text.stopped:
                    self._end(row, "stop")
                elif row.n >= p.max_new_tokens:
                    self._end(row, "length")
        for row in list(self.rows):
            self._end(row, "cancelled")
        while self.waiting:
            h = self.waiting.popleft()
            h._emit(FinishEvent("cancelled", "", Usage(0, 0), time.perf_counter()))

    def _end(self, row, reason):
        self.rows.remove(row)
        tail = row.text.finish()
        row.handle._emit(FinishEvent(reason, tail, Usage(row.prompt, row.n, 0), time.perf_counter()))


class InProcess:
    """uvicorn in a thread, through the same make_server/bind that ``flashvl serve`` uses."""

    def __init__(self, app, grace_s=2.0):
        self.app = app
        self.sock = cli_serve.bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = cli_serve.make_server(app, grace_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "the in-process server to start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()


def start_fake(tmp_path_factory=None, **options):
    pipe = FakePipeline()
    sched = FakeScheduler(pipe).start()
    opts = dict(model_name="fake-model", max_body_bytes=256 * 1024, max_images=2)
    opts.update(options)
    srv = InProcess(create_app(sched, pipe, ServeOptions(**opts)))
    return SimpleNamespace(port=srv.port, srv=srv, sched=sched, pipe=pipe, state=srv.app.state.flashvl)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png_bytes())
    (root / "secret.png").write_bytes(png_bytes(seed=1))
    (allowed / "link.png").symlink_to(root / "secret.png")
    return SimpleNamespace(allowed=allowed, outside=root / "secret.png")


@pytest.fixture(scope="module")
def fake(media):
    f = start_fake(allowed_local_media_path=str(media.allowed))
    yield f
    f.srv.stop()


def good(port, **extra):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0}
    body.update(extra)
    status, _, out = chat(port, body)
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == "Hello there, this"
    return out


# --------------------------------------------------------------------------------------------
# The HTTP layer over the stand-ins


def test_openai_client_text_stream_and_stop(fake):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{fake.port}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["fake-model"]
    r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "fake-model"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "Hello there, this is"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 5, 7)
    assert r.usage.prompt_tokens_details.cached_tokens == 0

    chunks = list(client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there, this is"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert len({c.id for c in chunks}) == 1

    # a stop string ends the answer before it, with finish_reason stop
    r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=50, temperature=0, stop=[" STOP"])
    assert r.choices[0].message.content == "Hello there, this is a made-up reply"
    assert r.choices[0].finish_reason == "stop"
    # the raw stream: data: lines only, [DONE] last, no usage chunk without include_usage
    status, heads, raw = call(fake.port, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True})
    assert status == 200 and heads["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events[:-1])


def test_seeded_sampling_is_reproducible(fake):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0.8}
    a = [chat(fake.port, dict(body, seed=s))[2]["choices"][0]["message"]["content"] for s in (1, 1, 2)]
    assert a[0] == a[1] and a[0] != a[2]


def test_content_parts_become_the_templates_placeholders(fake):
    img = data_url(png_bytes())
    cases = [
        ([image_part(img), text_part("Describe.")], PH + "\nDescribe."),  # what `flashvl chat --image` renders
        ([image_part(img), image_part(img), text_part("Compare.")], PH + PH + "\nCompare."),
        ([text_part("Look:"), image_part(img)], "Look:\n" + PH),
        ([text_part("a"), text_part("b")], "a\nb"),
    ]
    for parts, expected in cases:
        n = len(fake.pipe.seen)
        status, _, out = chat(fake.port, {"messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": parts}], "max_tokens": 2})
        assert status == 200, out
        messages, n_images = fake.pipe.seen[n]
        assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": expected}]
        assert n_images == expected.count(PH)


def test_parse_defaults_and_disabled_file_urls():
    opts = ServeOptions(model_name="m")
    r = parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, opts, PH)
    assert r.max_tokens is None and r.params.temperature == 1.0 and not r.stream
    r = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                            "max_completion_tokens": 7, "top_k": -1, "stop": "END"}, opts, PH)
    assert r.params.max_new_tokens == 7 and r.params.top_k == 0 and r.params.stop == ("END",)
    from flashvl_edge.runtime.server import ApiError

    with pytest.raises(ApiError, match="file:// URLs are disabled"):
        parse_chat_request({"messages": [{"role": "user", "content": [image_part("file:///etc/passwd")]}]}, opts, PH)


_MSG = [{"role": "user", "content": "Hi"}]

# (id, body or raw bytes, expected status, a word the message must contain, param)
BAD_LAYER = [
    ("malformed json", b'{"messages": [', 400, "JSON", None),
    ("not an object", b"[1, 2]", 400, "object", None),
    ("NaN literal", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "JSON", None),
    ("empty body", b"", 400, "empty", None),
    ("missing messages", {"model": "fake-model"}, 400, "messages", "messages"),
    ("empty messages", {"messages": []}, 400, "messages", "messages"),
    ("message not an object", {"messages": ["hi"]}, 400, "object", "messages[0]"),
    ("unknown model", {"model": "gpt-9", "messages": _MSG}, 404, "gpt-9", "model"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role", "messages[0].role"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, 400, "content", "messages[0].content"),
    ("unknown part type", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "audio",
     "messages[0].content[0].type"),
    ("placeholder typed", {"messages": [{"role": "user", "content": f"what is {PH}?"}]}, 400, PH,
     "messages[0].content"),
    ("placeholder in a part", {"messages": [{"role": "user", "content": [text_part(PH)]}]}, 400, PH,
     "messages[0].content[0].text"),
    ("image in a system message", {"messages": [{"role": "system", "content": [image_part(data_url(png_bytes()))]},
                                                {"role": "user", "content": "x"}]}, 400, "user", None),
    ("bad base64", {"messages": [{"role": "user", "content": [image_part("data:image/png;base64,!!!*")]}]}, 400,
     "base64", "messages[0].content[0].image_url.url"),
    ("truncated base64", {"messages": [{"role": "user", "content": [
        image_part(data_url(png_bytes())[:-3])]}]}, 400, "truncated", None),
    ("truncated image", {"messages": [{"role": "user", "content": [
        image_part(data_url(png_bytes()[:120]))]}]}, 400, "image", None),
    ("not an image", {"messages": [{"role": "user", "content": [
        image_part(data_url(b"hello, this is not an image at all"))]}]}, 400, "image", None),
    ("not an image type", {"messages": [{"role": "user", "content": [
        image_part(data_url(png_bytes(), "text/plain"))]}]}, 400, "text/plain", None),
    ("not base64 data url", {"messages": [{"role": "user", "content": [image_part("data:image/png,abc")]}]}, 400,
     "base64", None),
    ("remote url", {"messages": [{"role": "user", "content": [image_part("https://example.com/a.png")]}]}, 400,
     "data: URL", None),
    ("too many images", {"messages": [{"role": "user", "content": [image_part(data_url(png_bytes()))] * 3}]},
     400, "at most 2", "messages"),
    ("prompt over the context", {"messages": [{"role": "user", "content": "x" * 5000}]}, 400, "context", None),
    ("n > 1", {"messages": _MSG, "n": 2}, 400, "n must be 1", "n"),
    ("negative temperature", {"messages": _MSG, "temperature": -0.5}, 400, "temperature", "temperature"),
    ("text temperature", {"messages": _MSG, "temperature": "hot"}, 400, "temperature", "temperature"),
    ("top_p zero", {"messages": _MSG, "top_p": 0}, 400, "top_p", "top_p"),
    ("negative top_k", {"messages": _MSG, "top_k": -3}, 400, "top_k", "top_k"),
    ("zero repetition_penalty", {"messages": _MSG, "repetition_penalty": 0}, 400, "repetition_penalty",
     "repetition_penalty"),
    ("negative seed", {"messages": _MSG, "seed": -1}, 400, "seed", "seed"),
    ("negative max_tokens", {"messages": _MSG, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("text max_tokens", {"messages": _MSG, "max_tokens": "5"}, 400, "max_tokens", "max_tokens"),
    ("bad stop", {"messages": _MSG, "stop": [1]}, 400, "stop", "stop"),
    ("empty stop", {"messages": _MSG, "stop": [""]}, 400, "stop", "stop"),
    ("stream not a bool", {"messages": _MSG, "stream": "yes"}, 400, "stream", "stream"),
    ("tools", {"messages": _MSG, "tools": [{"type": "function"}]}, 400, "tools", "tools"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "UTF-8", None),
]


@pytest.mark.parametrize("name, body, status, word, param", BAD_LAYER, ids=[c[0] for c in BAD_LAYER])
def test_bad_request_is_an_openai_error_and_the_next_request_works(fake, name, body, status, word, param):
    s, _, out = chat(fake.port, body)
    assert_openai_error(s, out, status)
    assert word in out["error"]["message"], out
    if param is not None:
        assert out["error"]["param"] == param, out
    if status == 404:
        assert out["error"]["code"] == "model_not_found"
    good(fake.port)


def test_a_decompression_bomb_is_refused_before_decoding(fake, pixel_decodes):
    s, _, out = chat(fake.port, {"messages": [{"role": "user", "content": [image_part(data_url(bomb_png()))]}]})
    assert_openai_error(s, out, 400)
    assert "pixels" in out["error"]["message"] or "too large" in out["error"]["message"]
    assert pixel_decodes == []
    good(fake.port)


def test_too_many_images_are_refused_before_any_is_decoded(fake, pixel_decodes):
    n = len(fake.pipe.seen)
    s, _, out = chat(fake.port, {"messages": [{"role": "user", "content": [image_part(data_url(png_bytes()))] * 3}]})
    assert_openai_error(s, out, 400)
    assert pixel_decodes == [] and len(fake.pipe.seen) == n


def test_body_limits_413(fake):
    limit = 256 * 1024
    big = {"messages": [{"role": "user", "content": "x" * (limit + 10)}]}
    s, _, out = chat(fake.port, big)  # refused from Content-Length, before reading
    assert_openai_error(s, out, 413)
    payload = json.dumps(big).encode()
    pieces = [payload[i:i + 16384] for i in range(0, len(payload), 16384)]
    s, heads, out = call(fake.port, "POST", "/v1/chat/completions", pieces, chunked=True)  # no Content-Length
    assert_openai_error(s, out, 413)
    # a huge declared length is refused from the headers alone, without waiting for the body
    sock = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        got = b""
        deadline = time.monotonic() + 10
        while b"request_too_large" not in got and time.monotonic() < deadline:
            part = sock.recv(65536)
            if not part:
                break
            got += part
    finally:
        sock.close()
    assert got.startswith(b"HTTP/1.1 413") and b"request_too_large" in got, got[:300]
    good(fake.port)


def test_local_media_only_below_the_allowed_path(fake, media):
    def ask(url):
        return chat(fake.port, {"messages": [{"role": "user", "content": [image_part(url), text_part("x")]}],
                                "max_tokens": 2})

    s, _, out = ask(f"file://{media.allowed / 'ok.png'}")
    assert s == 200, out
    for url in (f"file://{media.outside}", f"file://{media.allowed}/../{media.outside.name}",
                f"file://{media.allowed / 'link.png'}", "file://relative.png", f"file://other-host{media.outside}"):
        s, _, out = ask(url)
        assert_openai_error(s, out, 400)
        assert str(media.outside) not in out["error"]["message"], out  # nothing about files outside
    s, _, out = ask(f"file://{media.allowed / 'missing.png'}")
    assert_openai_error(s, out, 400)
    s, _, out = ask(f"file://{media.allowed}")  # a directory
    assert_openai_error(s, out, 400)
    good(fake.port)


def test_queue_full_is_429_with_retry_after_and_then_drains(fake):
    fake.sched.gate.clear()  # nothing is admitted: the two queue places fill
    results = []
    body = {"messages": _MSG, "max_tokens": 2, "temperature": 0}
    threads = [threading.Thread(target=lambda: results.append(chat(fake.port, body))) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: fake.sched.queue_depth == 2, 10, "two queued requests")
        s, heads, out = chat(fake.port, body)
        assert_openai_error(s, out, 429)
        assert heads["retry-after"] == "1" and out["error"]["type"] == "rate_limit_error"
        m = metrics(fake.port)
        assert m[("flashvl_queue_depth", ())] == 2
    finally:
        fake.sched.gate.set()
        for t in threads:
            t.join(timeout=10)
    assert [r[0] for r in results] == [200, 200]
    good(fake.port)


def test_draining_is_503_for_chat_and_health(fake):
    assert call(fake.port, "GET", "/health")[0] == 200
    fake.state.drain()
    try:
        s, _, out = chat(fake.port, {"messages": _MSG})
        assert_openai_error(s, out, 503)
        assert call(fake.port, "GET", "/health")[0] == 503
    finally:
        fake.state.draining, fake.state.drain_started = False, None
    good(fake.port)


def _open_stream(port, body):
    """A raw streaming request; returns the socket after the first content chunk arrived."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    got = b""
    deadline = time.monotonic() + 10
    while b'"content":"Hello"' not in got.replace(b" ", b"") and time.monotonic() < deadline:
        got += sock.recv(65536)
    assert b"200 OK" in got.split(b"\r\n")[0], got[:200]
    return sock


def test_a_client_that_disconnects_cancels_its_request(fake):
    before = set(fake.sched.cancel_times)
    sock = _open_stream(fake.port, {"messages": _MSG, "max_tokens": 1_000_000, "stream": True})
    wait_until(lambda: fake.sched.running == 1, 5, "the stream to be running")
    closed = time.perf_counter()
    sock.close()
    rid = wait_until(lambda: set(fake.sched.cancel_times) - before, 5, "the request to be cancelled").pop()
    assert fake.sched.cancel_times[rid] - closed < 1.0
    wait_until(lambda: rid in fake.sched.retired_cancelled, 5, "the slot to be freed")
    assert fake.sched.running == 0

    # a plain (non-streaming) request whose client leaves is cancelled too
    before = set(fake.sched.cancel_times)
    payload = json.dumps({"messages": _MSG, "max_tokens": 1_000_000}).encode()
    sock = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    wait_until(lambda: fake.sched.running == 1, 5, "the request to be running")
    sock.close()
    rid = wait_until(lambda: set(fake.sched.cancel_times) - before, 5, "the request to be cancelled").pop()
    wait_until(lambda: rid in fake.sched.retired_cancelled, 5, "the slot to be freed")
    good(fake.port)


def test_an_unexpected_error_is_a_generic_500_with_a_logged_traceback(fake, caplog):
    with caplog.at_level(logging.ERROR, logger="flashvl_edge.serve"):
        s, _, out = chat(fake.port, {"messages": [{"role": "user", "content": "boom"}]})
    assert_openai_error(s, out, 500)
    assert "a bug in the pipeline" not in out["error"]["message"] and out["error"]["type"] == "server_error"
    assert any(r.exc_info and "a bug in the pipeline" in str(r.exc_info[1]) for r in caplog.records)
    assert call(fake.port, "GET", "/health")[0] == 200
    good(fake.port)


def test_unknown_routes_are_openai_errors(fake):
    s, _, out = call(fake.port, "GET", "/v1/nothing")
    assert_openai_error(s, out, 404)
    s, _, out = call(fake.port, "GET", "/v1/chat/completions")
    assert_openai_error(s, out, 405)
    s, _, out = call(fake.port, "GET", "/v1/models/other")
    assert_openai_error(s, out, 404)
    assert call(fake.port, "GET", "/v1/models/fake-model")[2]["id"] == "fake-model"


def test_metrics_and_the_access_log(fake, caplog):
    # the edge logs and counts a request once its response is sent: wait for those, bounded
    with caplog.at_level(logging.INFO, logger="flashvl_edge.serve.access"):
        out = good(fake.port)
        rid = chat(fake.port, {"messages": _MSG, "n": 3})[1]["x-request-id"]

        def access_lines():
            lines = [r.getMessage() for r in caplog.records if r.name == "flashvl_edge.serve.access"]
            return lines if any(out["id"] in x for x in lines) and any(rid in x for x in lines) else None

        lines = wait_until(access_lines, 5, "the access-log lines")
    mine = [line for line in lines if out["id"] in line]
    assert len(mine) == 1, lines
    assert " 200 " in mine[0] and "prompt_tokens=2" in mine[0] and "completion_tokens=4" in mine[0]
    assert "ttft=" in mine[0] and "duration=" in mine[0] and "ttft=-" not in mine[0]
    assert any(rid in line and " 400 " in line for line in lines)
    m = metrics(fake.port)
    ok = m[("flashvl_http_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))]
    assert ok >= 1 and m[("flashvl_http_requests_total", (("route", "/v1/chat/completions"), ("status", "400")))] >= 1
    assert m[("flashvl_generation_tokens_total", ())] >= 4 and m[("flashvl_prompt_tokens_total", ())] >= 2
    assert ("flashvl_cached_prompt_tokens_total", ()) in m
    assert m[("flashvl_time_to_first_token_seconds_count", ())] >= 1
    assert m[("flashvl_inter_token_latency_seconds_count", ())] >= 3
    assert m[("flashvl_running_requests", ())] == 0 and m[("flashvl_max_batch", ())] == 2


def test_api_key_and_a_second_app_in_the_same_process(media):
    """Its own metrics registry: a second app in this process must not clash with the first."""
    f = start_fake(api_key="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            s, _, out = chat(f.port, {"messages": _MSG}, headers=headers)
            assert_openai_error(s, out, 401)
            s, _, out = call(f.port, "GET", "/v1/models", headers=headers)
            assert_openai_error(s, out, 401)
        assert call(f.port, "GET", "/health")[0] == 200 and call(f.port, "GET", "/metrics")[0] == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{f.port}/v1", api_key="s3cret", max_retries=0, timeout=30)
        r = client.chat.completions.create(model="fake-model", messages=_MSG, max_tokens=2, temperature=0)
        assert r.choices[0].message.content == "Hello there"
        refused = ("flashvl_http_requests_total", (("route", "/v1/chat/completions"), ("status", "401")))
        wait_until(lambda: metrics(f.port).get(refused) == 3, 5, "three refused chat requests counted")
    finally:
        f.srv.stop()


def test_health_is_503_while_the_scheduler_is_not_running():
    pipe = FakePipeline()
    sched = FakeScheduler(pipe)  # never started
    srv = InProcess(create_app(sched, pipe, ServeOptions(model_name="m")))
    try:
        s, _, out = call(srv.port, "GET", "/health")
        assert s == 503 and "scheduler" in out["status"]
        s, _, out = chat(srv.port, {"messages": _MSG})
        assert_openai_error(s, out, 503)  # the scheduler refuses: not accepting
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------
# The real server, end to end (subprocess, tiny bundles, the real scheduler and pipeline)


class Served:
    """``python -m flashvl_edge.main serve BUNDLE --port 0 ...``: the port from its ready line."""

    def __init__(self, bundle, tmp_path, *args, env=None, timeout_s=90):
        self.stderr_path = tmp_path / "serve.stderr"
        self.stderr = open(self.stderr_path, "w")
        cmd = [sys.executable, "-m", "flashvl_edge.main", "serve", str(bundle), "--port", "0", "--host", "127.0.0.1",
               *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=dict(os.environ, **(env or {})))
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout_s
        self.ready_line = None
        while time.monotonic() < deadline and self.ready_line is None:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if "ready on http://" in line:
                self.ready_line = line.strip()
        if self.ready_line is None:
            self.close()
            raise AssertionError(f"the server did not get ready: {self.stderr_path.read_text()[-3000:]}")
        self.port = int(self.ready_line.split("ready on http://127.0.0.1:", 1)[1].split()[0])
        self.stdout_lines = lines
        wait_until(lambda: call(self.port, "GET", "/health", timeout=5)[0] == 200, 30, "GET /health == 200",
                   every_s=0.05)

    def client(self, api_key="unused"):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key, max_retries=0,
                             timeout=60)

    def log(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.stderr.close()


@pytest.fixture(scope="module")
def served(tiny_dynamic_bundle, tmp_path_factory):
    s = Served(tiny_dynamic_bundle, tmp_path_factory.mktemp("serve"), "--max-batch", "4", "--max-images", "2",
               "--max-body-bytes", 2_000_000, "--served-model-name", "tiny")
    yield s
    s.close()


def test_ready_line_and_models(served):
    assert served.ready_line == (f"flashvl serve: ready on http://127.0.0.1:{served.port} (model tiny, max batch 4, "
                                 "67 tokens a step, prefill chunk 64)")
    assert served.stdout_lines.empty()  # exactly one line on stdout
    models = served.client().models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_openai_client_end_to_end(served):
    client = served.client()
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=6,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    img = data_url(png_bytes(96, 64))
    r = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [image_part(img), text_part("Describe the image.")]}])
    assert r.usage.prompt_tokens > 36  # the image's tokens are part of the prompt

    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Count."}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 8
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count."}],
                                           max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert plain.choices[0].message.content == text  # streamed and plain answers agree

    # a stop string taken from the greedy answer cuts it there
    assert len(text) > 2, text
    stop = text[1:3]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count."}],
                                       max_tokens=8, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"

    body = dict(model="tiny", messages=[{"role": "user", "content": "Say something."}], max_tokens=10,
                temperature=0.9, extra_body={"ignore_eos": True, "top_k": 50})
    a = [client.chat.completions.create(seed=s, **body).choices[0].message.content for s in (7, 7)]
    assert a[0] == a[1]


def test_image_then_text_equals_pipeline_chat(served, tiny_dynamic_bundle):
    from flashvl_edge.runtime.pipeline import Pipeline

    image = png_bytes(120, 80, seed=3)
    with Pipeline.from_bundle(tiny_dynamic_bundle, device="cpu") as pipe:
        ref = pipe.chat("What is in the picture?", image=image, max_new_tokens=10, temperature=0)
    assert ref.text and ref.n_image_tokens > 0
    r = served.client().chat.completions.create(model="tiny", max_tokens=10, temperature=0, messages=[
        {"role": "user", "content": [image_part(data_url(image)), text_part("What is in the picture?")]}])
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)


_IMG = data_url(png_bytes())
BAD_E2E = [
    ("malformed json", b'{"model": "tiny", "messages": [{"role": ', 400),
    ("missing messages", {"model": "tiny"}, 400),
    ("empty messages", {"model": "tiny", "messages": []}, 400),
    ("unknown model", {"model": "nope", "messages": _MSG}, 404),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ("bad base64", {"messages": [{"role": "user", "content": [image_part("data:image/png;base64,@@@@")]}]}, 400),
    ("truncated base64", {"messages": [{"role": "user", "content": [image_part(_IMG[:-2])]}]}, 400),
    ("truncated image", {"messages": [{"role": "user", "content": [image_part(data_url(png_bytes()[:100]))]}]}, 400),
    ("not an image", {"messages": [{"role": "user", "content": [image_part(data_url(b"GIF89a but not really"))]}]},
     400),
    ("decompression bomb", {"messages": [{"role": "user", "content": [image_part(data_url(bomb_png()))]}]}, 400),
    ("too many images", {"messages": [{"role": "user", "content": [image_part(_IMG)] * 3}]}, 400),
    ("over the context", {"messages": [{"role": "user", "content": "word " * 3000}]}, 400),
    ("n > 1", {"messages": _MSG, "n": 2}, 400),
    ("negative temperature", {"messages": _MSG, "temperature": -1}, 400),
    ("non-numeric top_p", {"messages": _MSG, "top_p": "high"}, 400),
    ("remote url", {"messages": [{"role": "user", "content": [image_part("http://127.0.0.1:1/x.png")]}]}, 400),
    ("body too large", {"messages": [{"role": "user", "content": "x" * 2_100_000}]}, 413),
]


def test_bad_requests_end_to_end(served):
    ok = {"model": "tiny", "messages": [{"role": "user", "content": [image_part(_IMG), text_part("Hi")]}],
          "max_tokens": 2, "temperature": 0}
    for name, body, status in BAD_E2E:
        s, _, out = chat(served.port, body)
        assert_openai_error(s, out, status)
        s, _, out = chat(served.port, ok)
        assert s == 200, (name, out)
    assert call(served.port, "GET", "/health")[0] == 200
    assert "Traceback" not in served.log()


def test_disconnect_frees_the_slot_end_to_end(served):
    sock = _open_stream_any(served.port, {"model": "tiny", "messages": _MSG, "max_tokens": 1500, "stream": True,
                                          "ignore_eos": True, "temperature": 0})
    sock.close()
    wait_until(lambda: metrics(served.port)[("flashvl_running_requests", ())] == 0, 20,
               "the running batch to empty", every_s=0.05)
    m = metrics(served.port)
    assert m[("flashvl_finished_requests_total", (("finish_reason", "cancelled"),))] >= 1
    assert chat(served.port, {"messages": _MSG, "max_tokens": 2})[0] == 200


def _open_stream_any(port, body):
    """A raw streaming request; returns the socket once the role chunk arrived."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    got = b""
    deadline = time.monotonic() + 30
    while b"chat.completion.chunk" not in got and time.monotonic() < deadline:
        got += sock.recv(65536)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return sock


def test_metrics_and_access_log_end_to_end(served):
    r = served.client().chat.completions.create(model="tiny", messages=_MSG, max_tokens=3, temperature=0)
    m = metrics(served.port)
    assert m[("flashvl_http_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] >= 1
    assert m[("flashvl_generation_tokens_total", ())] >= 3 and m[("flashvl_time_to_first_token_seconds_count", ())] >= 1
    assert m[("flashvl_max_batch", ())] == 4
    line = wait_until(lambda: [x for x in served.log().splitlines() if r.id in x], 5, "the access-log line")
    assert len(line) == 1 and " 200 " in line[0] and "completion_tokens=" in line[0] and "ttft=" in line[0]


def test_api_key_from_the_environment_and_sigterm_drains(tiny_static_bundle, tmp_path):
    s = Served(tiny_static_bundle, tmp_path, "--grace-period", "20", env={"FLASHVL_API_KEY": "k-123"})
    try:
        st, _, out = chat(s.port, {"messages": _MSG, "max_tokens": 2})
        assert_openai_error(st, out, 401)
        st, _, out = chat(s.port, {"messages": _MSG, "max_tokens": 2}, headers={"Authorization": "Bearer nope"})
        assert_openai_error(st, out, 401)
        assert call(s.port, "GET", "/health")[0] == 200 and call(s.port, "GET", "/metrics")[0] == 200
        client = s.client(api_key="k-123")
        model = Path(tiny_static_bundle).name
        assert client.chat.completions.create(model=model, messages=_MSG, max_tokens=2).choices

        # SIGTERM while a stream is in flight: the stream still ends normally, then exit 0
        first, result = threading.Event(), {}

        def stream():
            finish = None
            for c in client.chat.completions.create(model=model, messages=_MSG, max_tokens=1500, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True}):
                first.set()
                if c.choices:
                    finish = c.choices[0].finish_reason or finish
            result["finish"], result["ended"] = finish, time.monotonic()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert first.wait(30)
        s.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:  # a request after the signal is refused: connection refused, or 503 on one still accepted
            late = chat(s.port, {"messages": _MSG, "max_tokens": 2}, headers={"Authorization": "Bearer k-123"},
                        timeout=10)[0]
        except OSError:
            late = None
        assert late in (None, 503), late
        t.join(timeout=30)
        assert result.get("finish") == "length", result
        assert result["ended"] > signalled  # the stream really was in flight when the signal came
        assert s.proc.wait(timeout=30) == 0, s.log()[-2000:]
        assert "Traceback" not in s.log() and "cut at the end of the grace period" not in s.log()
    finally:
        s.close()


def test_repeated_image_and_prefix_are_reused_end_to_end(served):
    """The same photo asked twice: the second answer reports cached prompt tokens, /metrics the hits,
    and the answer equals the one given with nothing cached (a new question, same prefix)."""
    client = served.client()
    img = data_url(png_bytes(90, 70, seed=11))

    def ask(question):
        return client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [image_part(img), text_part(question)]}], extra_body={"ignore_eos": True})
    before = metrics(served.port)
    first, second = ask("What is this?"), ask("What is this?")
    # the first may reuse the system prompt's block from earlier requests; the second reuses the image too
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    assert second.choices[0].message.content == first.choices[0].message.content
    after = metrics(served.port)
    assert after[("flashvl_image_cache_hits", ())] >= before.get(("flashvl_image_cache_hits", ()), 0) + 1
    assert after[("flashvl_prefix_cache_hits", ())] >= before.get(("flashvl_prefix_cache_hits", ()), 0) + 1
    assert after[("flashvl_prefix_cache_bytes", ())] > 0


def test_response_format_json_schema_end_to_end(served):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    client = served.client()
    for seed in (1, 2, 3):
        r = client.chat.completions.create(
            model="tiny", max_tokens=120, temperature=1.0, seed=seed,
            messages=[{"role": "user", "content": "Who are you? Answer in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", max_tokens=120, temperature=0, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "JSON please."}])
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    status, _, body = call(served.port, "POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}})
    assert_openai_error(status, body, 400)
    status, _, body = call(served.port, "POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}})
    assert_openai_error(status, body, 400)
    status, _, body = chat(served.port, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                         "max_tokens": 3})
    assert status == 200, body  # the server stays healthy


def test_continuous_usage_stats_gives_a_chunk_per_token(served):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 7, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    status, _, raw = call(served.port, "POST", "/v1/chat/completions", body)
    assert status == 200
    events = sse_events(raw)
    counts = [e["usage"]["completion_tokens"] for e in events if isinstance(e, dict) and e.get("choices")
              and e.get("usage")]
    assert counts == list(range(1, 8))  # one chunk per token, even when its text is empty
