"""Continuous batching: one scheduler thread owns the graphs and decodes every running request at once.

The loop, one iteration per step:

1. admit: while the batch has room, take the oldest waiting request; run its vision graph (all tiles
   of all its images) and its prefill *alone* (batch 1, exactly the ``flashvl chat`` path), sample its
   first token, and merge its KV cache into the running batch (left padded);
2. decode: one LLM graph run for the whole batch — every row's last token, an ``attention_mask``
   with zeros over each row's padding and per-row ``position_ids`` — then each row samples with its
   own parameters and random generator;
3. retire: rows that stopped (eos, stop string, ``max_tokens``), were cancelled (client gone) or hit
   the context leave the batch at once; the common left padding is trimmed.

Greedy answers are token for token those of a request run alone: the prefill is the same run, and a
padded row of the batched decode attends to exactly its own positions (masked positions get zero
weight). ``tests/test_scheduler.py`` checks it against ``Pipeline.chat`` with several requests of
different images and lengths, and fails on a scheduler that mixes rows or drops the cache.

Requests come from any thread (the server's event loop); their events go back through the loop the
request was submitted from (``call_soon_threadsafe``), so an ``async for`` over a handle never blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

import numpy as np

from .errors import FlashVLError, PromptError
from .generate import SamplingParams, TextAssembler, sample

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


@dataclass
class _Row:
    """One running request: its place in the batch and its decoding state."""

    handle: RequestHandle
    params: SamplingParams
    rng: np.random.Generator
    text: TextAssembler
    seen: list[int]  # prompt + generated ids (repetition penalty)
    prompt_tokens: int
    last_token: int
    generated: int = 0
    budget: int = 0  # tokens this request may generate in all (max_tokens and the context)
    stop_ids: frozenset = field(default_factory=frozenset)
    done: bool = False
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    cache: object = None  # its own KV cache between prefill and joining the batch
    constraint: object = None  # runtime/structured.py Constraint of a json_schema / json_object request


class Scheduler:
    """Owns the pipeline's graphs; runs admitted requests in one batch (see the module docstring)."""

    def __init__(self, pipeline: "Pipeline", max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise PromptError("max_batch and max_queue must be at least 1")
        self.pipe = pipeline
        engine_batch = pipeline.llm.limits.max_batch if pipeline.llm.limits is not None else None
        self.max_batch = min(max_batch, engine_batch) if engine_batch else max_batch
        self.max_queue = max_queue
        self.waiting: deque[RequestHandle] = deque()
        self.rows: list[_Row] = []
        self.batch = None  # the backend's batched KV cache, rows in self.rows order
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self._ids = itertools.count(1)
        self.steps = 0  # batched decode runs so far (tests and metrics)

    # -- control ------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._accepting, self._stop = True, False
        self._thread = threading.Thread(target=self._loop, name="flashvl-scheduler", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue ``request``; QueueFullError when ``max_queue`` are waiting, ShuttingDownError when draining."""
        return self.submit_all([request], loop)[0]

    def submit_all(self, requests: list[GenerationRequest],
                   loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:
        """Queue ``requests`` in one step: the loop takes them at the same step boundary (as many as the
        batch has room for), so they are admitted together and decode as one batch from the first step.
        All or none: QueueFullError when they do not all fit in ``max_queue``."""
        loop = loop or asyncio.get_running_loop()
        handles = []
        for request in requests:
            if not request.request_id:
                request.request_id = f"req-{next(self._ids)}"
            handles.append(RequestHandle(request, loop))
        with self._wake:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down; retry on another instance")
            if len(self.waiting) + len(handles) > self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests are already waiting (--max-queue "
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
        while time.monotonic() < deadline and (self.waiting or self.rows):
            time.sleep(0.02)
        with self._wake:
            self._stop = True
            for h in list(self.waiting) + [r.handle for r in self.rows]:
                h.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, grace_s))

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stop and not self.waiting and not self.rows:
                        self._wake.wait(timeout=0.5)
                    if self._stop:
                        break
                    room = self.max_batch - len(self.rows)
                    admit = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                for handle in admit:
                    self._admit(handle)
                self._retire()
                if self.rows:
                    self._decode_step()
                    self._retire()
        except Exception as e:  # a backend failure mid-batch: every open request gets the error
            msg = f"the model failed while decoding ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            for row in self.rows:
                self._finish(row.handle, "error", row.text.finish(), row.prompt_tokens, row.generated, msg)
            self.rows, self.batch = [], None
            with self._wake:
                self._accepting = False
            raise
        finally:
            for row in self.rows:
                self._finish(row.handle, "cancelled", row.text.finish(), row.prompt_tokens, row.generated,
                             cached=row.cached_tokens)
            while self.waiting:
                h = self.waiting.popleft()
                self._finish(h, "cancelled", "", len(h.request.prepared.token_ids), 0)
            self.rows, self.batch = [], None

    def _finish(self, handle: RequestHandle, reason: str, text: str, prompt_tokens: int, generated: int,
                error: str | None = None, cached: int = 0) -> None:
        handle._emit(FinishEvent(reason, text, Usage(prompt_tokens, generated, cached), time.perf_counter(), error))

    def _admit(self, handle: RequestHandle) -> None:
        """Vision + prefill alone, the first token, then the request joins the batch."""
        pipe, gen = self.pipe, self.pipe.generator
        prepared, params = handle.request.prepared, handle.request.params
        ids = list(prepared.token_ids)
        if handle.cancelled.is_set():
            self._finish(handle, "cancelled", "", len(ids), 0)
            return
        try:
            constraint = None
            if params.constrained:  # built before the graphs run: a schema error costs no prefill
                from .structured import StructuredOutput

                constraint = StructuredOutput.for_pipeline(pipe).constraint(params)
            cache, logits, cached = pipe.prefill_prompt(prepared)
        except FlashVLError as e:  # this request's own problem: the others carry on
            self._finish(handle, "error", "", len(ids), 0, str(e))
            return
        row = _Row(handle=handle, params=params, rng=np.random.default_rng(params.seed),
                   text=TextAssembler(pipe.prompts.decode, params.stop), seen=ids, prompt_tokens=len(ids),
                   last_token=-1, budget=min(params.max_new_tokens, gen.max_context - len(ids)),
                   stop_ids=frozenset() if params.ignore_eos else gen.stop_token_ids, constraint=constraint)
        row.cache, row.cached_tokens = cache, cached
        if not self._take(row, self._sample(row, logits)):
            if self.batch is None:
                self.batch = pipe.llm.new_batch()
            pipe.llm.batch_add(self.batch, cache)
            self.rows.append(row)
        row.cache = None

    @staticmethod
    def _sample(row: _Row, logits: np.ndarray) -> int:
        """The row's next token: its own parameters and generator, within its JSON structure if any."""
        if row.constraint is not None:
            logits = row.constraint.apply(logits)
        return sample(logits, row.seen, row.params, row.rng)

    def _take(self, row: _Row, token: int) -> bool:
        """Record a sampled token; True when the request is finished (it then gets its FinishEvent)."""
        now = time.perf_counter()
        row.generated += 1
        row.last_token = token
        if row.constraint is not None:
            row.constraint.advance(token)
        if token in row.stop_ids:
            reason = "stop"
        else:
            row.seen.append(token)
            piece = row.text.push(token)
            row.handle._emit(TokenEvent(token, piece, now))
            # a finished structure ends the row as a stop token does (it is one, unless eos is ignored)
            if row.text.stopped or (row.constraint is not None and row.constraint.done):
                reason = "stop"
            elif row.generated >= row.budget:
                reason = "length"
            else:
                return False
        row.done = True
        self._finish(row.handle, reason, row.text.finish(), row.prompt_tokens, row.generated,
                     cached=row.cached_tokens)
        return True

    def _decode_step(self) -> None:
        gen = self.pipe.generator
        tokens = np.asarray([row.last_token for row in self.rows], np.int64)
        x = np.asarray(gen.embed_table[tokens], dtype=self.pipe.llm.embeds_dtype)[:, None, :]
        logits = self.pipe.llm.forward_batch(x, self.batch)
        self.steps += 1
        for i, row in enumerate(self.rows):
            self._take(row, self._sample(row, logits[i]))

    def _retire(self) -> None:
        """Finished and cancelled rows leave the batch now."""
        keep = []
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            if row.handle.cancelled.is_set():
                self._finish(row.handle, "cancelled", row.text.finish(), row.prompt_tokens, row.generated,
                             cached=row.cached_tokens)
                continue
            keep.append(i)
        if len(keep) != len(self.rows):
            self.pipe.llm.batch_keep(self.batch, keep)
            self.rows = [self.rows[i] for i in keep]
