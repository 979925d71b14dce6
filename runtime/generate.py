"""The decode loop, readable top to bottom: embed -> prefill -> (sample, decode one token)*.

1. ``Generator.embed``: token embeddings are gathered from the bundle's memory-mapped
   ``embed_tokens.npy`` (only the rows used are read) and the image embeddings are written over the
   image-token positions, in order.
2. ``Generator.generate``: ``prefill`` (one ``forward`` over all new tokens) fills the KV cache and gives
   the first token's logits; then ``step`` feeds each sampled token back alone (decode), the cache
   growing by one. ``greedy`` and ``teacher_forced`` run the same ``prefill`` / ``step`` and also return
   the logits, for ``flashvl verify``, calibration reports and benchmarks: one LLM path for every tool.
3. ``sample``: repetition penalty, then greedy (temperature 0) or temperature / top-k / top-p sampling
   with a seeded numpy Generator (same order as transformers' logits processors and warpers). A
   request with ``json_schema`` / ``json_object`` first masks the logits to the tokens that keep its
   answer valid JSON (``runtime/structured.py``); an unconstrained one never touches that code.
4. ``TextAssembler``: generated ids -> text pieces as they become printable (``StreamingDetokenizer``
   never emits half a UTF-8 character) and cut at the first user stop string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .backends.base import DecoderRunner, KVCache
from .errors import PromptError


# --------------------------------------------------------------------------------------------
# Sampling parameters


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # Structured output (runtime/structured.py, the 'structured' extra): the answer is JSON valid
    # against ``json_schema``, or any JSON object with ``json_object``; at most one of the two.
    json_schema: dict | None = None
    json_object: bool = False

    @property
    def constrained(self) -> bool:
        """Whether decoding is constrained to a JSON structure."""
        return self.json_schema is not None or bool(self.json_object)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        """Checked parameters from keyword arguments; an unknown name (a typo) is a PromptError."""
        import dataclasses

        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise PromptError(f"unknown sampling parameter(s) {', '.join(unknown)}; use {', '.join(names)}")
        return cls(**kwargs).validate()

    def validate(self) -> "SamplingParams":
        def bad(msg: str):
            raise PromptError(msg)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_real(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) \
                or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}")
        if not (0.01 <= self.repetition_penalty <= 100.0):
            # a penalty of 1e-300 divides a positive logit into inf, and the probabilities into NaN
            # (outside 0.01..100 it only pushes logits toward overflow; HF suggests 1.0-1.3)
            bad(f"repetition_penalty must be between 0.01 and 100 (1 = off), got {self.repetition_penalty!r}")
        if 0 < self.temperature < 1e-5:
            # as vLLM: a temperature this small is greedy (1/5e-324 is inf, and the probabilities NaN)
            self.temperature = 0.0
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if not isinstance(self.json_object, (bool, np.bool_)):
            bad(f"json_object must be True or False, got {self.json_object!r}")
        if self.json_schema is not None and self.json_object:
            bad("pass json_schema (JSON valid against a schema) or json_object (any JSON object), not both")
        if self.constrained:
            from .structured import check_sampling

            check_sampling(self)  # an invalid or unsupported schema fails here, before any graph runs
        return self


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and not math.isnan(x)


# --------------------------------------------------------------------------------------------
# Sampling


def sample(logits: np.ndarray, seen_ids: Sequence[int], params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token id from last-position ``logits`` [vocab]."""
    if params.temperature == 0.0 and params.repetition_penalty == 1.0:
        # plain greedy: no float64 copy of the vocabulary-sized row (0.2 ms a token at 152k vocab);
        # argmax of float32 equals argmax of its exact float64 cast
        return int(np.argmax(logits))
    logits = logits.astype(np.float64, copy=True)
    if params.repetition_penalty != 1.0 and len(seen_ids):
        # transformers' RepetitionPenaltyLogitsProcessor: shrink the logit of every token already seen
        ids = np.asarray(seen_ids, dtype=np.int64)  # only here: greedy decoding never pays for it
        seen = np.unique(ids[(ids >= 0) & (ids < logits.shape[0])])
        s = logits[seen]
        logits[seen] = np.where(s > 0, s / params.repetition_penalty, s * params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))  # first maximum, as torch.argmax

    logits /= params.temperature
    candidates = np.arange(logits.shape[0])
    if params.top_k and params.top_k < logits.shape[0]:
        candidates = np.argpartition(-logits, params.top_k - 1)[: params.top_k]
    order = candidates[np.argsort(-logits[candidates], kind="stable")]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
    if not np.isfinite(probs).all():
        # non-finite logits (a masked-out row, an overflow): numpy's choice() would raise ValueError
        raise PromptError("the sampling probabilities are not finite numbers for these logits and sampling "
                          "values; use a temperature >= 1e-5 and a repetition_penalty near 1")
    if params.top_p < 1.0:
        # smallest prefix (by probability) whose mass reaches top_p; always at least one token
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class Generator:
    """Prefill and decode over one LLM runner, with the embedding table on the host."""

    llm: DecoderRunner
    embed_table: np.ndarray  # [vocab, hidden], memory-mapped
    image_token_id: int
    stop_token_ids: frozenset = field(default_factory=frozenset)
    max_context: int = 32768
    # builds each constrained request's Constraint (runtime/structured.py StructuredOutput.for_pipeline
    # attaches it); None until then, and unconstrained decoding never looks at it
    structured: Any = field(default=None, repr=False)

    def embed(self, token_ids: Sequence[int], image_embeds: np.ndarray | None = None,
              image_mask: Sequence[bool] | None = None) -> np.ndarray:
        """[1, seq, hidden] embeddings of ``token_ids`` with ``image_embeds`` written, in order, at the
        image positions: ``image_mask`` where given (the prompt builder knows which positions came from
        a placeholder), else every ``image_token_id`` when there are image embeddings, else none. A
        generated image-token id is an ordinary token, embedded from the table as transformers does."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if image_mask is not None:
            is_image = np.asarray(image_mask, dtype=bool)
        elif image_embeds is not None:
            is_image = ids == self.image_token_id
        else:
            is_image = np.zeros(len(ids), dtype=bool)
        n_image = int(is_image.sum())
        n_given = 0 if image_embeds is None else len(image_embeds)
        if n_image != n_given:
            raise PromptError(f"{n_image} image-token positions but {n_given} image embeddings; "
                              "the prompt and the images do not match")
        # the image token's own row is never used, and may lie outside the table (negative ids)
        x = np.asarray(self.embed_table[np.where(is_image | (ids < 0), 0, ids)], dtype=self.llm.embeds_dtype)
        if n_image:
            x[is_image] = image_embeds.astype(x.dtype, copy=False)
        return x[None]

    def check_context(self, cache_length: int, n_new: int) -> None:
        if cache_length + n_new >= self.max_context:
            raise PromptError(
                f"the prompt needs {cache_length + n_new} tokens (image tokens included) but the model's "
                f"context is {self.max_context}; shorten the prompt, use a smaller image or fewer tiles, "
                "or start a new session")

    def constraint(self, params: SamplingParams):
        """The request's JSON constraint (runtime/structured.py ``Constraint``), None when unconstrained."""
        if not params.constrained:
            return None
        if self.structured is None:
            raise PromptError("structured output (json_schema / json_object) needs the bundle's tokenizer: "
                              "attach it with StructuredOutput.for_pipeline(pipeline)")
        return self.structured.constraint(params)

    # -- the LLM path: chat, verification, calibration and benchmarks all run these -------------
    def prefill(self, cache: KVCache, ids: Sequence[int] = (), image_embeds: np.ndarray | None = None,
                image_mask: Sequence[bool] | None = None, inputs_embeds: np.ndarray | None = None) -> np.ndarray:
        """Run new prompt tokens on top of ``cache``; returns the last position's logits [vocab].

        The tokens are ``ids`` with ``image_embeds`` spliced in (as :meth:`embed`), or ``inputs_embeds``
        [1, seq, hidden] when the prompt is already embedded (``Pipeline.prefill_inputs``, a capture)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(ids, image_embeds, image_mask)
        return self.llm.forward(inputs_embeds, cache)

    def step(self, cache: KVCache, token: int) -> np.ndarray:
        """Decode one token: feed it, cache grows by one, returns the next logits [vocab]."""
        # its table row as [1, 1, hidden]; the general embed() is for prompts
        row = np.asarray(self.embed_table[token:token + 1], dtype=self.llm.embeds_dtype)
        return self.llm.forward(row[None], cache)

    def generate(self, cache: KVCache, new_ids: Sequence[int], image_embeds: np.ndarray | None,
                 params: SamplingParams, seen_ids: Sequence[int] = (),
                 image_mask: Sequence[bool] | None = None) -> Iterator[int]:
        """Prefill ``new_ids`` on top of ``cache``, then yield up to ``max_new_tokens`` sampled ids.

        The last id yielded is *not* fed to the model (nothing needs its logits), so after the loop
        ``cache.length == old length + len(new_ids) + (tokens yielded - 1)``.

        With ``params.json_schema`` / ``json_object`` each step samples only among the tokens that keep
        the answer valid JSON (``Constraint.apply``); once the JSON is complete only a stop token can
        follow, so the answer ends with one as usual.
        """
        self.check_context(cache.length, len(new_ids))
        constraint = self.constraint(params)  # before the prefill: a request's own error costs no graph run
        rng = np.random.default_rng(params.seed)
        stop_ids = frozenset() if params.ignore_eos else self.stop_token_ids
        seen = list(seen_ids) + list(new_ids)
        budget = min(params.max_new_tokens, self.max_context - cache.length - len(new_ids))

        step = self.step
        logits = self.prefill(cache, new_ids, image_embeds, image_mask)
        if constraint is None:
            for i in range(budget):
                token = sample(logits, seen, params, rng)
                yield token
                if token in stop_ids or i == budget - 1:
                    return
                seen.append(token)
                logits = step(cache, token)
            return
        # a separate loop, so that unconstrained decoding does no per-token work for the constraint
        for i in range(budget):
            token = sample(constraint.apply(logits), seen, params, rng)
            constraint.advance(token)
            yield token
            if token in stop_ids or i == budget - 1 or constraint.done:
                return
            seen.append(token)
            logits = step(cache, token)

    def greedy(self, cache: KVCache, ids: Sequence[int] = (), image_embeds: np.ndarray | None = None,
               image_mask: Sequence[bool] | None = None, n_tokens: int = 32, stop: bool = True,
               inputs_embeds: np.ndarray | None = None, json_schema: dict | None = None,
               json_object: bool = False) -> tuple[list[int], np.ndarray]:
        """:meth:`generate` at temperature 0, also returning the logits that chose each token.

        ``stop``: end at the first stop token (included, as generate yields it); else exactly
        ``n_tokens`` (context permitting), or until a constrained answer (``json_schema`` /
        ``json_object``, as in :class:`SamplingParams`) has ended. Returns (tokens, logits
        [len(tokens), vocab] float32); constrained, the logits are the masked ones (-inf where the
        structure allowed no token)."""
        params = SamplingParams(max_new_tokens=n_tokens, ignore_eos=not stop, json_schema=json_schema,
                                json_object=json_object).validate()
        n_new = len(ids) if inputs_embeds is None else inputs_embeds.shape[1]
        self.check_context(cache.length, n_new)
        constraint = self.constraint(params)
        stop_ids = self.stop_token_ids if stop else frozenset()
        budget = min(n_tokens, self.max_context - cache.length - n_new)
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        logits = self.prefill(cache, ids, image_embeds, image_mask, inputs_embeds)
        if constraint is None:
            for i in range(budget):
                token = sample(logits, (), params, None)  # greedy: no rng, no repetition penalty
                tokens.append(token)
                rows.append(np.asarray(logits, np.float32))
                if token in stop_ids or i == budget - 1:
                    break
                logits = self.step(cache, token)
            return tokens, np.stack(rows)
        for i in range(budget):  # as above, sampling only among the tokens the structure allows
            logits = constraint.apply(logits)
            token = sample(logits, (), params, None)
            constraint.advance(token)
            tokens.append(token)
            rows.append(np.asarray(logits, np.float32))
            if token in stop_ids or i == budget - 1 or constraint.done:
                break
            logits = self.step(cache, token)
        return tokens, np.stack(rows)

    def teacher_forced(self, cache: KVCache, ids: Sequence[int] = (), image_embeds: np.ndarray | None = None,
                       image_mask: Sequence[bool] | None = None, forced_tokens: Sequence[int] = (),
                       inputs_embeds: np.ndarray | None = None) -> np.ndarray:
        """Prefill, then feed ``forced_tokens`` one decode step each, whatever the model would pick.

        Returns the logits after the prefill and after each forced token: [len(forced_tokens) + 1, vocab]
        (row i predicts the token after ``forced_tokens[:i]``). For parity and accuracy reports."""
        n_new = len(ids) if inputs_embeds is None else inputs_embeds.shape[1]
        self.check_context(cache.length, n_new + len(forced_tokens))
        rows = [np.asarray(self.prefill(cache, ids, image_embeds, image_mask, inputs_embeds), np.float32)]
        for token in forced_tokens:
            rows.append(np.asarray(self.step(cache, int(token)), np.float32))
        return np.stack(rows)


# --------------------------------------------------------------------------------------------
# Text


class StreamingDetokenizer:
    """Incremental decode of generated ids (the prefix/read-offset scheme of HF text-generation-inference).

    Each push decodes a short window ``ids[prefix:]`` and emits what it adds over ``ids[prefix:read]``,
    and only once it does not end in U+FFFD: a character whose UTF-8 bytes are split across tokens
    is held back until its last byte arrives. Decoding a window (rather than one token) keeps
    tokenizers that strip or merge at piece boundaries correct.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character decodes to U+FFFD)."""
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class TextAssembler:
    """Generated ids -> the reply text, streamed in printable pieces, cut at the first stop string.

    Text that could be the start of a stop string is held back until it is known not to be one, so
    a streaming client never prints part of a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.detok = StreamingDetokenizer(decode)
        self.stop = tuple(stop)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        return self._add(self.detok.push(token_id), final=False)

    def finish(self) -> str:
        return self._add(self.detok.flush(), final=True) if not self.stopped else ""

    def _add(self, delta: str, final: bool) -> str:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        hold = 0 if (final or self.stopped) else self._partial_stop_suffix()
        piece = self.text[self.emitted:len(self.text) - hold]
        self.emitted += len(piece)
        return piece

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
