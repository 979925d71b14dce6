"""Continuous batching for the server: one scheduler thread owns the graphs and runs the step core.

The scheduler is the step core's (``runtime/core.py``) many-row client: requests submitted from the
event loop wait in a queue; each step the core admits as many as ``max_batch`` allows, decodes every
running row, and spends the rest of the per-step token budget (``max_num_batched_tokens``) on
fixed-size prefill chunks of admitted requests, several requests' chunks in one LLM run. Admission
(:meth:`Scheduler._admit`) reuses the longest cached prompt prefix and hands the request's images to
an encoder thread, so the vision graph runs beside the decode steps instead of between them; the
core prefills a request once its image embeddings are ready. With ONNX Runtime the chunks run on the
core's prefill lane, beside the decode steps of the running rows (paced by ``itl_stretch``).

Greedy answers are token for token those of a request run alone (``Pipeline.chat`` goes through the
same core with the same chunk size): ``tests/test_scheduler.py`` checks it with requests joining
mid-stream and fails on broken variants (padding attended, positions shared, rows mixed, cache
dropped, a chunk's positions off by one).

Failures: whatever one request brings (its sampling values, its schema, its images) ends that request
with an error event; the others carry on. A failure of the model itself ends every open request with an
error, stops the scheduler and calls ``on_fatal`` (``flashvl serve`` then exits non-zero so a
supervisor restarts it; ``/health`` answers 503 meanwhile).

Requests come from any thread (the server's event loop); their events go back through the loop the
request was submitted from (``call_soon_threadsafe``), so an ``async for`` over a handle never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

from .core import DEFAULT_ITL_STRETCH, Emitted, Sequence, StepCore
from .errors import FlashVLError, PromptError
from .generate import SamplingParams

if TYPE_CHECKING:
    from .pipeline import Pipeline, PreparedPrompt


class QueueFullError(FlashVLError):
    """The waiting queue is at ``max_queue``: the server answers 429 with Retry-After."""


class ShuttingDownError(FlashVLError):
    """The scheduler is draining or stopped: the server answers 503."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class TokenEvent:
    """One generated token; ``text`` is the new text it completes (often "" mid-character or
    while a possible stop string is held back)."""

    token_id: int
    text: str
    time: float  # perf_counter when it was sampled


@dataclass
class FinishEvent:
    """The last event of a request."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    text: str  # text released at the end (held-back characters), possibly ""
    usage: Usage
    time: float
    error: str | None = None  # with finish_reason "error": one line saying what went wrong


@dataclass
class GenerationRequest:
    prepared: "PreparedPrompt"  # from Pipeline.prepare_prompt: token ids, image mask, images to encode
    params: SamplingParams
    request_id: str = ""


class RequestHandle:
    """What ``Scheduler.submit`` returns: iterate (``async for``) for events; ``cancel()`` to stop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.id = request.request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None
        self.finished: FinishEvent | None = None

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (a disconnected client, a shutdown)."""
        self.cancelled.set()

    def _emit(self, event) -> None:  # called from the scheduler thread
        if isinstance(event, TokenEvent) and self.first_token_time is None:
            self.first_token_time = event.time
        if isinstance(event, FinishEvent):
            self.finished = event
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return


class Scheduler:
    """Owns the pipeline's graphs; runs admitted requests through one step core (see the module docstring).

    ``max_batch``: requests admitted at once (vLLM's ``max_num_seqs``); ``max_num_batched_tokens``: the
    per-step token budget; the prefill chunk is the pipeline's (``Pipeline.prefill_chunk``), so an answer
    is the one ``flashvl chat`` gives. ``itl_stretch``: how far running streams slow down while a chunk runs
    beside them (``StepCore``; 0: chunks run between decode steps; None: the core's default)."""

    def __init__(self, pipeline: "Pipeline", max_batch: int = 8, max_queue: int = 64,
                 max_num_batched_tokens: int | None = None,
                 on_fatal: Callable[[str], None] | None = None, itl_stretch: float | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise PromptError("max_batch and max_queue must be at least 1")
        self.itl_stretch = DEFAULT_ITL_STRETCH if itl_stretch is None else itl_stretch
        self.pipe = pipeline
        engine_batch = pipeline.llm.limits.max_batch if pipeline.llm.limits is not None else None
        self.max_batch = min(max_batch, engine_batch) if engine_batch else max_batch
        self.max_queue = max_queue
        self.on_fatal = on_fatal
        self.failed: str | None = None  # why the model failed, once it has
        self.waiting: deque[RequestHandle] = deque()  # submitted, not yet handed to the core
        self.core = self._make_core(max_num_batched_tokens)
        self.encoder: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self._ids = itertools.count(1)

    def _make_core(self, max_num_batched_tokens: int | None) -> StepCore | None:
        budget = max_num_batched_tokens
        chunk = self.pipe.generator.prefill_chunk
        if budget is None:  # one chunk beside a decode token of every other admitted request
            budget = chunk + self.max_batch - 1
        return StepCore(self.pipe.generator, max_num_seqs=self.max_batch, max_num_batched_tokens=budget,
                        prefill_chunk=chunk, admit=self._admit, batch_invariant=self.pipe.generator.batch_invariant,
                        itl_stretch=self.itl_stretch)

    @property
    def steps(self) -> int:
        """Steps that ran the LLM so far (tests and metrics)."""
        return self.core.steps if self.core is not None else 0

    @property
    def max_num_batched_tokens(self) -> int | None:
        return self.core.budget if self.core is not None else None

    # -- control ------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._accepting, self._stop = True, False
        # one encoder thread: images are encoded in arrival order, beside the decode steps
        self.encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flashvl-encoder")
        self._thread = threading.Thread(target=self._loop, name="flashvl-scheduler", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting) + (len(self.core.waiting) if self.core is not None else 0)

    @property
    def running(self) -> int:
        return len(self.core.running) + len(self.core.prefilling) if self.core is not None else 0

    def _has_rows(self) -> bool:
        return self.core is not None and self.core.has_work

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue ``request``; QueueFullError when ``max_queue`` are waiting, ShuttingDownError when draining."""
        return self.submit_all([request], loop)[0]

    def submit_all(self, requests: list[GenerationRequest],
                   loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:
        """Queue ``requests`` in one step: the loop takes them at the same step boundary (as many as the
        batch has room for), so they are admitted together. All or none: QueueFullError when they do
        not all fit in ``max_queue``."""
        loop = loop or asyncio.get_running_loop()
        handles = []
        for request in requests:
            if not request.request_id:
                request.request_id = f"req-{next(self._ids)}"
            handles.append(RequestHandle(request, loop))
        with self._wake:
            if not self._accepting:
                if self.failed:
                    raise ShuttingDownError(f"the model failed ({self.failed}); the server is restarting")
                raise ShuttingDownError("the server is shutting down; retry on another instance")
            if self.queue_depth + len(handles) > self.max_queue:
                raise QueueFullError(f"{self.queue_depth} requests are already waiting (--max-queue "
                                     f"{self.max_queue}); retry shortly")
            self.waiting.extend(handles)
            self._wake.notify()
        return handles

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting; let running and queued requests finish for up to ``grace_s``; cut the rest."""
        with self._wake:
            self._accepting = False
            self._wake.notify()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.waiting or self._has_rows()) \
                and self._thread is not None and self._thread.is_alive():
            time.sleep(0.02)
        with self._wake:
            self._stop = True
            for h in list(self.waiting):
                h.cancel()
            if self.core is not None:
                for seq in list(self.core.waiting) + self.core.prefilling + self.core.running:
                    seq.tag.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, grace_s))
        if self.core is not None:
            self.core.close()
        if self.encoder is not None:
            self.encoder.shutdown(wait=False, cancel_futures=True)

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        core = self.core
        try:
            while True:
                with self._wake:
                    while not self._stop and not self.waiting and not self._can_step():
                        self._wake.wait(timeout=0.5)
                    if self._stop:
                        break
                    while self.waiting:
                        handle = self.waiting.popleft()
                        core.add(Sequence(handle.request.params, decode=self.pipe.prompts.decode, tag=handle))
                for seq in list(core.waiting) + core.prefilling + core.running:
                    if seq.tag.cancelled.is_set():
                        seq.cancelled = True
                self._deliver(core.step())
        except Exception as e:  # the model failed: every open request gets the error
            logging.getLogger("flashvl.serve").error("the model failed", exc_info=e)
            msg = str(e) if isinstance(e, FlashVLError) else f"the model failed ({type(e).__name__}: {e})"
            with self._wake:
                self._accepting = False
                self.failed = " ".join(msg.split())[:300]
                stranded = list(self.waiting)
                self.waiting.clear()
            self._deliver(core.fail_all(self.failed))
            for h in stranded:
                self._finish(h, "error", "", len(h.request.prepared.token_ids), 0, self.failed)
            if self.on_fatal is not None:
                self.on_fatal(self.failed)
        finally:
            for seq in list(core.waiting) + core.prefilling + core.running:
                seq.cancelled = True
            if core.has_work:
                core._drop_cancelled(out := [])
                self._deliver(out)
            while self.waiting:
                h = self.waiting.popleft()
                self._finish(h, "cancelled", "", len(h.request.prepared.token_ids), 0)

    def _can_step(self) -> bool:
        """The core has something to run now: not only requests waiting for their images (an encoded
        image and a new request both wake the loop)."""
        core = self.core
        if not core.has_work:
            return False
        pending = core.pending_futures()
        return len(pending) < len(core.prefilling) or bool(core.running or core.waiting or core.inflight) \
            or any(f.done() for f in pending)

    def _image_done(self, _future) -> None:  # called from the encoder thread
        with self._wake:
            self._wake.notify()

    def _finish(self, handle: RequestHandle, reason: str, text: str, prompt_tokens: int, generated: int,
                error: str | None = None, cached: int = 0) -> None:
        handle._emit(FinishEvent(reason, text, Usage(prompt_tokens, generated, cached), time.perf_counter(), error))

    def _deliver(self, emitted: list[Emitted]) -> None:
        now = time.perf_counter()
        for e in emitted:
            handle = e.seq.tag
            if not e.finished:
                handle._emit(TokenEvent(e.token, e.text, now))
                continue
            self._finish(handle, e.seq.finish_reason or "cancelled", e.text, len(handle.request.prepared.token_ids),
                         len(e.seq.generated), e.seq.error, e.seq.cached_tokens)

    def _admit(self, seq: Sequence) -> None:
        """Host work as a request enters the core: the longest cached prefix of its prompt, then its
        images (those after the prefix) go to the encoder thread; the core prefills once they are in."""
        pipe, prepared = self.pipe, seq.tag.request.prepared
        cache, cached, keys = pipe.reuse_prefix(prepared)
        seq.seen = list(prepared.token_ids[:cached])  # attach adds the ids it prefills
        seq.attach(prepared.token_ids[cached:], prepared.image_mask[cached:], None, None, cache)
        seq.cached_tokens = cached
        if any(prepared.image_mask[cached:]):
            seq.ready = False
            seq.pending = self.encoder.submit(pipe.embeds_after, prepared, cached)
            seq.pending.add_done_callback(self._image_done)
        seq.on_prefilled = lambda: pipe.remember_prefix(keys, seq.cache, cached)
