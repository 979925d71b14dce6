"""The step core: every token the project generates is decoded here, one step at a time.

The shape is vLLM v1's: per-request state (:class:`Sequence`, with the one stop rule in
:meth:`Sequence.take`), a planner (:meth:`StepCore.schedule`) that turns a per-step token budget into a
plan of data (:class:`StepPlan`: decode rows, prefill chunks as token ranges, requests admitted), and
one executor (:meth:`StepCore.step`) that runs the plan on the LLM runner. ``flashvl chat``,
``Pipeline.chat`` / ``stream`` / ``ChatSession``, verify, calibration and bench are one-row clients
(:meth:`StepCore.run`); ``flashvl serve``'s scheduler thread feeds it many rows.

A step, in order:

1. **decode first**: every running row gets its next token in one LLM run (a left-padded batch whose
   cache persists between steps; a runner without batching runs the rows one at a time);
2. **prefill with what is left**: the budget minus the decode rows is spent on prefill chunks of admitted
   requests, oldest first, all of them in one LLM run (``forward_rows``: left padding, per-row
   positions). A request whose images are still being encoded (an encoder worker, off the step path)
   is skipped until they are ready. A request that finishes its prompt samples its first token and
   joins the running rows;
3. **retire**: finished and cancelled rows leave.

**Prefill beside the decode steps.** On a runner that takes concurrent runs (ONNX Runtime), a step
with both decode rows and prefill chunks starts the chunks' run on a prefill lane (a second thread)
and decodes meanwhile; the following steps keep decoding while the chunk runs, one step at most every
``itl_stretch`` quiet decode-step times (the same pace while a joining request's images are encoded
beside them), and the chunk's rows join once it lands. A running stream
then waits a few decode steps for its next token while a request joins, not a whole chunk, and the
chunk needs no smaller size (a small chunk re-reads every weight per call). The pace is the trade:
decode steps run beside the chunk take cores from it, so a lower stretch gives smoother streams and
a later first token to the joining request (docs/serving.md, "Scheduling under load").

Why two LLM runs and not one: the graph attends over a rectangular [rows, columns] cache, so a decode
row placed in the same run as a 64-token chunk would compute 64 padded positions. Two runs per step
keep every row's work to its own tokens.

**The same answer whatever the load.** Chunk boundaries are a property of the request: a chunk ends at
the next multiple of ``prefill_chunk`` in absolute positions, never where another row's budget left
off, so a prompt is cut the same way alone, in a busy server, or after a prefix-cache hit. A row's
tokens depend only on its own inputs: padding is masked, positions are per row
(``backends.base.step_inputs``), and each row samples with its own generator.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence as Seq

import numpy as np

from .backends.base import KVCache
from .errors import FlashVLError, PromptError
from .generate import SamplingParams, TextAssembler, sample

# Measured on the 2-core CPU with the full-size INT8/INT4 bundle (docs/serving.md, "Choosing the
# token budget"): a chunk of 64 tokens keeps a running stream's inter-token latency within a few decode
# steps while a long image prompt joins, and costs the prefill little next to whole-prompt runs.
DEFAULT_PREFILL_CHUNK = 64
DEFAULT_MAX_NUM_SEQS = 8
# one chunk beside a decode token of every other admitted request: a chunk always fits
DEFAULT_MAX_NUM_BATCHED_TOKENS = DEFAULT_PREFILL_CHUNK + DEFAULT_MAX_NUM_SEQS - 1
# While a prefill chunk runs beside them, running rows decode at most once every this many quiet
# decode-step times. Measured (docs/performance.md): a decode step beside a 64-token INT4 chunk takes
# ~2.5x its quiet time, and each one costs the chunk about one quiet step of compute; 4 keeps the
# streams within 5x of their no-arrival ITL while the chunk keeps most of the cores.
DEFAULT_ITL_STRETCH = 4.0


class ModelError(FlashVLError):
    """The LLM itself failed in a step: every open request ends with an error."""


class Sequence:
    """One request's decoding state, from its first prefill chunk to its finish reason.

    The new tokens to prefill are ``prompt_ids`` (with ``image_embeds`` at the ``image_mask``
    positions) or, already embedded, ``prompt_embeds`` [n, hidden]; they go on top of ``cache``
    (which may hold earlier turns or a reused prefix). ``ready`` is False while the request's images
    are being encoded elsewhere (``pending``: a Future of the image embeddings)."""

    def __init__(self, params: SamplingParams, *, prompt_ids: Seq[int] = (), image_mask: Seq[bool] | None = None,
                 image_embeds: np.ndarray | None = None, prompt_embeds: np.ndarray | None = None,
                 cache: KVCache | None = None, seen: Seq[int] = (), decode: Callable | None = None,
                 keep_logits: bool = False, forced: Seq[int] = (), tag=None) -> None:
        self.params = params
        self.tag = tag  # the owner's handle (the server's request)
        self.rng = np.random.default_rng(params.seed)
        self.text = TextAssembler(decode, params.stop) if decode is not None else None
        self.constraint = None
        self.forced = [int(t) for t in forced]  # teacher forcing: these tokens, whatever the logits say
        self.logits: list[np.ndarray] | None = [] if keep_logits else None
        self.generated: list[int] = []
        self.last_token = -1
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.exception: BaseException | None = None  # what ended it with an error (one-row clients re-raise it)
        self.cancelled = False
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.pending: Future | None = None
        self.keep_cache = False  # the owner wants the KV back in ``cache`` at the end (a chat session)
        self.on_prefilled: Callable[[], None] | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.prefill_start: float | None = None
        self.prompt_ids: list[int] = []
        self.seen: list[int] = list(seen)
        self.cache = cache
        self.attach(prompt_ids, image_mask, image_embeds, prompt_embeds, cache)

    def attach(self, prompt_ids: Seq[int] = (), image_mask: Seq[bool] | None = None,
               image_embeds: np.ndarray | None = None, prompt_embeds: np.ndarray | None = None,
               cache: KVCache | None = None) -> None:
        """Set what to prefill (on admission, once the reusable prefix is known)."""
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.prompt_embeds = prompt_embeds
        self.n_new = len(self.prompt_ids) if prompt_embeds is None else int(prompt_embeds.shape[0])
        mask = np.zeros(self.n_new, bool) if image_mask is None else np.asarray(image_mask, bool)
        if image_mask is None and image_embeds is not None:
            raise PromptError("image embeddings need the image positions (image_mask)")
        self.image_mask = mask
        self._image_before = np.concatenate([[0], np.cumsum(mask)]).astype(np.int64)
        self.image_embeds = image_embeds
        self.seen += self.prompt_ids
        self.cache = cache
        self.start = cache.length if cache is not None else 0  # absolute position of the first new token
        self.prefilled = 0
        self.ready = True

    # -- prefill ---------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Absolute position of the next token to run (= tokens in the cache)."""
        return self.start + self.prefilled

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= self.n_new

    def next_chunk(self, size: int) -> tuple[int, int]:
        """The next prefill chunk as a range of new-token indices: it ends at the next multiple of
        ``size`` in absolute positions (or the prompt's end), whatever else runs."""
        end = min(self.start + self.n_new, (self.position // size + 1) * size)
        return self.prefilled, end - self.start

    def chunk_embeds(self, generator, a: int, b: int) -> np.ndarray:
        """[b - a, hidden]: new tokens a..b embedded, image embeddings at their positions."""
        if self.prompt_embeds is not None:
            return np.asarray(self.prompt_embeds[a:b], dtype=generator.llm.embeds_dtype)
        i0, i1 = int(self._image_before[a]), int(self._image_before[b])
        images = self.image_embeds[i0:i1] if i1 > i0 else None
        return generator.embed(self.prompt_ids[a:b], images, self.image_mask[a:b])[0]

    # -- decode: the one stop rule -----------------------------------------------------------
    def start_decoding(self, budget: int, stop_ids: frozenset) -> None:
        self.budget = budget
        self.stop_ids = frozenset() if self.params.ignore_eos else stop_ids

    def choose(self, logits: np.ndarray) -> int:
        """The next token from last-position ``logits``: within the JSON structure if any, then the
        request's own sampling parameters and generator (or the forced token)."""
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        if self.logits is not None:
            self.logits.append(np.asarray(logits, np.float32))
        if len(self.generated) < len(self.forced):
            return self.forced[len(self.generated)]
        return sample(logits, self.seen, self.params, self.rng)

    def take(self, token: int) -> str | None:
        """Record a chosen token. Returns the text it completes ("" while held back), or None for a
        stop token, which is not text. Sets ``finish_reason`` when the request is done: a stop token
        (unless eos is ignored), a stop string, a finished JSON structure, or its token budget."""
        now = time.perf_counter()
        self.first_token_time = self.first_token_time or now
        self.last_token_time = now
        self.generated.append(token)
        self.last_token = token
        if self.constraint is not None:
            self.constraint.advance(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return None
        self.seen.append(token)
        piece = self.text.push(token) if self.text is not None else ""
        if (self.text is not None and self.text.stopped) or (self.constraint is not None and self.constraint.done):
            self.finish_reason = "stop"
        elif len(self.generated) >= self.budget:
            self.finish_reason = "length"
        return piece

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error

    def tail(self) -> str:
        """Text held back until the end (a possible stop string, an incomplete character)."""
        return self.text.finish() if self.text is not None else ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Emitted:
    """What one step did for a row: a token (``token`` None when the row only finished)."""

    seq: Sequence
    token: int | None
    text: str  # new text: the token's printable piece, or the tail at the finish
    finished: bool


@dataclass
class StepPlan:
    """One step as data: rows to decode, prefill chunks (row, first, end new-token index), rows admitted."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)
    admit: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(b - a for _, a, b in self.prefill)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


class StepCore:
    """Plans and runs steps over one generator's LLM (see the module docstring).

    ``max_num_seqs``: rows admitted at once (prefilling or decoding); ``max_num_batched_tokens``: the
    per-step token budget (a decode row costs one token); ``prefill_chunk``: the chunk size, at most the
    budget minus the other rows' decode tokens, so one chunk always fits. ``admit``: the owner's
    admission work for a waiting row (prefix reuse, starting its image encoding); it may raise
    FlashVLError, which ends that row only. ``batch_invariant``: every LLM run has an even number of
    sequences (see ``__init__``). A row whose ``keep_cache`` is set gets its KV back in its own ``cache`` when it
    finishes (a chat session's next turn builds on it). ``itl_stretch``: the decode pace while a chunk runs
    on the prefill lane (see the module docstring); 0 runs chunks between decode steps instead."""

    def __init__(self, generator, max_num_seqs: int = 1, max_num_batched_tokens: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, admit: Callable[[Sequence], None] | None = None,
                 batch_invariant: bool = False, itl_stretch: float = DEFAULT_ITL_STRETCH) -> None:
        if max_num_seqs < 1 or prefill_chunk < 1:
            raise PromptError("max_num_seqs and prefill_chunk must be at least 1")
        if not itl_stretch >= 0:  # also refuses NaN
            raise PromptError(f"itl_stretch must be 0 (no prefill lane) or positive, got {itl_stretch}")
        budget = max_num_batched_tokens if max_num_batched_tokens is not None else prefill_chunk + max_num_seqs - 1
        if prefill_chunk > budget - (max_num_seqs - 1):
            raise PromptError(f"max_num_batched_tokens {budget} leaves no room for a {prefill_chunk}-token prefill "
                              f"chunk next to {max_num_seqs - 1} decoding rows; use at least "
                              f"{prefill_chunk + max_num_seqs - 1}, or a smaller chunk")
        self.gen = generator
        self.llm = generator.llm
        self.max_num_seqs = max_num_seqs
        self.budget = budget
        self.chunk = prefill_chunk
        self.admit_hook = admit
        # Batch-invariant mode: every LLM run has an even number of sequences (so an even number of
        # token rows too, and of lm_head rows). ONNX Runtime's INT4 MatMulNBits computes rows in pairs
        # and an odd last row with another kernel (measured: tests/test_step_core.py, docs/serving.md),
        # so with no odd row left over a row's result is the same whatever else runs. A padding row
        # makes the count even, at the cost of its compute.
        self.batch_invariant = bool(batch_invariant) and bool(self.llm.supports_batching) \
            and bool(self.llm.supports_cache_arrays)
        # one row at a time needs no batch: the row keeps its own cache (the chat path); a runner
        # without batched decode is never asked for one
        self.batched = bool(self.llm.supports_batching) and (max_num_seqs > 1 or self.batch_invariant)
        self.pad = False  # the batch's last row is padding (batch-invariant mode, an odd number running)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.batch = None
        self.steps = 0  # steps that ran the LLM
        self.decode_steps = 0  # of those, steps with decode rows
        # the prefill lane: one chunk run at a time beside the decode steps (runners that take concurrent runs)
        self.itl_stretch = float(itl_stretch)
        self.use_lane = self.itl_stretch > 0 and self.batched and bool(getattr(self.llm, "supports_concurrent_runs", False))
        self._lane: ThreadPoolExecutor | None = None
        self.inflight: tuple[Future, list[tuple[Sequence, int, int]]] | None = None
        self._quiet_decode_s: dict[int, float] = {}  # rows -> a decode step with nothing beside it (moving average)
        self._beside_decode_s: float | None = None  # the last decode step beside a chunk
        self._last_decode = 0.0  # perf_counter when the last decode step started

    # -- rows ------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.inflight)

    def pending_futures(self) -> list[Future]:
        """Image encodings the planner is waiting for (the owner may wait on them when idle)."""
        return [s.pending for s in self.prefilling if s.pending is not None]

    def prepare(self, seq: Sequence) -> None:
        """Budget, stop ids and JSON constraint of a row about to prefill (errors end that row)."""
        gen = self.gen
        gen.check_context(seq.start, seq.n_new)
        seq.start_decoding(min(seq.params.max_new_tokens, gen.max_context - seq.start - seq.n_new),
                           gen.stop_token_ids)
        seq.constraint = gen.constraint(seq.params)

    # -- planning -------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Decode every running row, admit waiting rows while there is room, then spend the rest of
        the budget on prefill chunks, oldest request first (a chunk that does not fit waits whole)."""
        plan = StepPlan(decode=[s for s in self.running if not s.finished])
        while self.waiting and len(self.prefilling) + len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            plan.admit.append(seq)
            self.prefilling.append(seq)
        plan.prefill = self._plan_prefill(len(plan.decode), exclude=plan.admit)
        return plan

    def _plan_prefill(self, decode_rows: int, exclude=()) -> list[tuple[Sequence, int, int]]:
        """Prefill chunks for what the decode rows leave of the budget (rows being admitted in this
        plan are planned once their admission has said what they prefill)."""
        if self.inflight is not None:
            return []  # one chunk run at a time: the next waits for the lane
        chunks, left = [], self.budget - decode_rows
        for seq in self.prefilling:
            if seq.finished or not seq.ready or any(seq is x for x in exclude):
                continue
            a, b = seq.next_chunk(self.chunk)
            if b - a > left:
                break
            chunks.append((seq, a, b))
            left -= b - a
        return chunks

    # -- running a step -------------------------------------------------------------------------
    def step(self) -> list[Emitted]:
        """Plan and run one step; returns what each row did. An exception from the LLM itself is a
        :class:`ModelError` (the owner ends every row); anything a single row brings ends that row."""
        out: list[Emitted] = []
        self._drop_cancelled(out)
        self._resolve_images(out)  # images encoded since the last step: their rows can prefill now
        self._land(out)  # a chunk that finished on the lane: its rows may decode from this step on
        plan = self.schedule()
        for seq in plan.admit:
            self._guard(seq, out, self._admit, seq)
        self._resolve_images(out)
        if plan.admit or any(s.finished for s in self.prefilling):
            self._retire(out)  # rows whose admission failed leave; the admitted ones may prefill now
            plan.prefill = self._plan_prefill(len(plan.decode))
        if plan.decode or plan.prefill:
            self.steps += 1
        if plan.prefill and plan.decode and self.use_lane:
            self._launch(plan.prefill, out)  # beside the decode below and the steps after it
            plan.prefill = []
        if plan.decode:
            if self._joining() and self._pace(len(plan.decode), out):
                plan.decode = [s for s in self.running if not s.finished]  # the landed chunk's rows are in the batch
            self.decode_steps += 1
            beside = self._joining()
            start = self._last_decode = time.perf_counter()
            self._decode(plan.decode, out)
            took = time.perf_counter() - start
            if beside:
                self._beside_decode_s = took
            else:
                q = self._quiet_decode_s.get(len(plan.decode))
                self._quiet_decode_s[len(plan.decode)] = took if q is None else 0.8 * q + 0.2 * took
        elif self.inflight is not None:
            self._land(out, wait=True)  # nothing to decode meanwhile
        if plan.prefill:
            self._prefill(plan.prefill, out)
        self._retire(out)
        return out

    def run(self, seq: Sequence) -> Iterator[Emitted]:
        """A one-row client: add ``seq`` and step until it finishes, yielding what it did (its last
        item has ``finished`` set); a row that ends with an error raises what ended it."""
        self.add(seq)
        try:
            while True:
                for e in self.step():
                    if e.seq is seq:
                        if e.finished and seq.finish_reason == "error":  # a one-row client gets the exception
                            raise seq.exception or PromptError(seq.error or "the request failed")
                        yield e
                        if e.finished:
                            return
                if seq.pending is not None and not self.running:
                    seq.pending.exception()  # nothing else to do: wait for its images
                elif not self.has_work:
                    raise PromptError("the request left the step core without finishing")
        finally:
            if not seq.finished:  # abandoned by the consumer
                seq.cancelled = True
                self._drop_cancelled([])

    def _admit(self, seq: Sequence) -> None:
        if self.admit_hook is not None:
            self.admit_hook(seq)
        self.prepare(seq)
        seq.prefill_start = time.perf_counter()

    def _resolve_images(self, out: list[Emitted]) -> None:
        for seq in self.prefilling:
            if seq.pending is not None and seq.pending.done() and not seq.finished:
                future, seq.pending = seq.pending, None
                self._guard(seq, out, self._take_images, seq, future)

    @staticmethod
    def _take_images(seq: Sequence, future: Future) -> None:
        seq.image_embeds = future.result()
        seq.ready = True

    def _guard(self, seq: Sequence, out: list[Emitted], fn, *args) -> bool:
        """Run one row's own work; any exception ends that row with an error, never the step."""
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - a request's failure is that request's
            msg = str(e) if isinstance(e, FlashVLError) else f"the request failed ({_one_line(e)})"
            seq.finish("error", msg)
            seq.exception = e
            return False

    def _sample(self, seq: Sequence, logits: np.ndarray, out: list[Emitted]) -> None:
        holder: list = []
        if self._guard(seq, out, lambda: holder.append(seq.take(seq.choose(logits)))):
            if holder[0] is not None:  # a stop token is no text: the row's finish says it
                out.append(Emitted(seq, seq.last_token, holder[0], False))

    def _model(self, fn, *args):
        try:
            return fn(*args)
        except FlashVLError:
            raise
        except Exception as e:  # the graph itself failed: no row can go on
            raise ModelError(f"the model failed in a step ({_one_line(e)})") from e

    def _decode(self, rows: list[Sequence], out: list[Emitted]) -> None:
        table, dtype = self.gen.embed_table, self.llm.embeds_dtype
        if self.batched:
            if self.batch_invariant and len(rows) % 2 == 1 and not self.pad:
                self._model(self._add_pad_row)
            tokens = [s.last_token for s in rows] + [0] * self.pad  # the padding row reads token 0
            x = np.asarray(table[np.asarray(tokens, np.int64)], dtype=dtype)[:, None, :]
            logits = self._model(self.llm.forward_batch, x, self.batch)[:len(rows)]
        else:
            inputs = [np.asarray(table[s.last_token:s.last_token + 1], dtype=dtype) for s in rows]
            logits = self._model(self.llm.forward_rows, [s.cache for s in rows], inputs)
        for seq, row in zip(rows, logits):
            self._sample(seq, row, out)

    def _add_pad_row(self) -> None:
        """A padding row of one zero position (what it attends to never reaches a real row)."""
        shapes = [a.shape for a in self.llm.cache_arrays(self.llm.new_cache())]
        zeros = [np.zeros(s[:2] + (1,) + s[3:], np.float32) for s in shapes]
        self.llm.batch_add(self.batch, self.llm.cache_from_arrays(zeros, 1))
        self.pad = True

    def _drop_pad_row(self) -> None:
        if self.pad:
            self._model(self.llm.batch_keep, self.batch, list(range(len(self.running))))
            self.pad = False

    def _chunk_inputs(self, chunks: list[tuple[Sequence, int, int]], out: list[Emitted]):
        """The chunks whose embedding worked (a row whose own inputs fail ends alone), their caches and inputs."""
        inputs, kept = [], []
        for seq, a, b in chunks:
            if self._guard(seq, out, lambda s=seq, a=a, b=b: inputs.append(s.chunk_embeds(self.gen, a, b))):
                kept.append((seq, a, b))
        caches = [s.cache for s, _, _ in kept]
        if kept and self.batch_invariant and len(kept) % 2 == 1:  # the lm_head's rows are the sequences
            caches, inputs = caches + [self.llm.new_cache()], inputs + [np.zeros_like(inputs[0][:1])]
        return kept, caches, inputs

    def _prefill(self, chunks: list[tuple[Sequence, int, int]], out: list[Emitted]) -> None:
        chunks, caches, inputs = self._chunk_inputs(chunks, out)
        if chunks:
            self._prefilled(chunks, self._model(self.llm.forward_rows, caches, inputs), out)

    # -- the prefill lane -------------------------------------------------------------------------
    def _launch(self, chunks: list[tuple[Sequence, int, int]], out: list[Emitted]) -> None:
        chunks, caches, inputs = self._chunk_inputs(chunks, out)
        if not chunks:
            return
        if self._lane is None:
            self._lane = ThreadPoolExecutor(1, thread_name_prefix="flashvl-prefill")
        self.inflight = (self._lane.submit(self._model, self.llm.forward_rows, caches, inputs), chunks)

    def _land(self, out: list[Emitted], wait: bool = False) -> bool:
        """Take the lane's chunk run if it has finished (or wait for it); True if one landed. Its rows
        that were cancelled meanwhile are already gone; the model's failure is the step's."""
        if self.inflight is None or not (wait or self.inflight[0].done()):
            return False
        future, chunks = self.inflight
        self.inflight = None
        logits = future.result()  # a ModelError from the run ends every row (the owner's fail_all)
        live = [(c, row) for c, row in zip(chunks, logits) if not c[0].finished]
        if live:
            self._prefilled([c for c, _ in live], [row for _, row in live], out)
        return True

    def _joining(self) -> bool:
        """A joining request's work runs beside the decode steps: a chunk on the lane, or images being
        encoded (the owner's encoder thread)."""
        return self.use_lane and (self.inflight is not None or any(not f.done() for f in self.pending_futures()))

    def _pace(self, rows: int, out: list[Emitted]) -> bool:
        """While a request joins, hold the next decode step of ``rows`` rows until ``itl_stretch`` quiet
        steps have passed since the last one, or until the lane's chunk lands (then True: its rows join
        and the step decodes at once); an image encoded meanwhile also ends the wait.

        The quiet step is the one measured for this many rows with nothing beside it; until there is one,
        half the last step beside the chunk (two runs sharing the cores take about twice as long each:
        measured 2.4-2.6x p50 on the 2-core CPU)."""
        quiet = self._quiet_decode_s.get(rows)
        if quiet is None and self._beside_decode_s is not None:
            quiet = self._beside_decode_s / 2
        if quiet is None:
            return self._land(out)  # nothing measured yet: decode now
        left = self._last_decode + self.itl_stretch * quiet - time.perf_counter()
        if left > 0:
            lane = [self.inflight[0]] if self.inflight is not None else []
            wait_futures(lane + self.pending_futures(), timeout=left, return_when="FIRST_COMPLETED")
        return self._land(out)

    def close(self) -> None:
        """Let a chunk in flight finish and stop the prefill lane's thread."""
        if self._lane is not None:
            self._lane.shutdown(wait=True)
            self._lane = None

    def _prefilled(self, chunks: list[tuple[Sequence, int, int]], logits, out: list[Emitted]) -> None:
        """After a chunk run: rows whose prompt is done sample their first token and join the running rows."""
        for (seq, _, b), row in zip(chunks, logits):
            seq.prefilled = b
            if not seq.prefill_done:
                continue
            if seq.on_prefilled is not None:
                self._guard(seq, out, seq.on_prefilled)
            self._sample(seq, row, out)
            if seq.finished:
                continue  # leaves in _retire, with its finish
            self.prefilling.remove(seq)
            if self.batched:
                if self.batch is None:
                    self.batch = self.llm.new_batch()
                self._drop_pad_row()  # the new row is the last one; two real rows need no padding
                self._model(self.llm.batch_add, self.batch, seq.cache)
                if not seq.keep_cache:
                    seq.cache = None  # its KV is the batch's row now
            self.running.append(seq)

    def _drop_cancelled(self, out: list[Emitted]) -> None:
        for seq in list(self.waiting) + self.prefilling + self.running:
            if seq.cancelled:
                seq.finish("cancelled")
        self._retire(out)

    def _retire(self, out: list[Emitted]) -> None:
        """Finished rows leave now, each with its last event (held-back text, the finish)."""
        done = [s for s in list(self.waiting) + self.prefilling + self.running if s.finished]
        if not done:
            return
        keep = [i for i, s in enumerate(self.running) if not s.finished]
        if self.batched and self.batch is not None and len(keep) != len(self.running):
            for i, seq in enumerate(self.running):
                if seq.finished and seq.keep_cache and seq.cache is not None:
                    self._model(self.llm.batch_take, self.batch, i, seq.cache)
            self._model(self.llm.batch_keep, self.batch, keep)  # drops the padding row too
            self.pad = False
        self.running = [self.running[i] for i in keep]
        self.prefilling = [s for s in self.prefilling if not s.finished]
        self.waiting = deque(s for s in self.waiting if not s.finished)
        for seq in done:
            text = ""
            if seq.finish_reason in ("stop", "length", "cancelled"):
                text = self._tail(seq)
            out.append(Emitted(seq, None, text, True))

    @staticmethod
    def _tail(seq: Sequence) -> str:
        try:
            return seq.tail()
        except Exception:  # noqa: BLE001 - the text of a finished row is best effort
            return ""

    def fail_all(self, message: str) -> list[Emitted]:
        """End every row with ``message`` (the model failed); the core is empty afterwards."""
        out = []
        for seq in list(self.waiting) + self.prefilling + self.running:
            seq.finish("error", message)
            out.append(Emitted(seq, None, "", True))
        self.waiting, self.prefilling, self.running, self.batch = deque(), [], [], None
        self.inflight = None  # a chunk still on the lane lands nowhere
        return out
