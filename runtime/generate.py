"""Embedding, sampling and text: what the step core (``runtime/core.py``) uses to decode.

1. ``Generator.embed``: token embeddings are gathered from the bundle's memory-mapped
   ``embed_tokens.npy`` (only the rows used are read) and the image embeddings are written over the
   image-token positions, in order.
2. ``Generator.run`` / ``greedy`` / ``teacher_forced``: one-row clients of the step core, which runs
   the prefill in chunks and decodes (the one decode loop of the project); ``greedy`` and
   ``teacher_forced`` also return the logits, for ``flashvl verify``, calibration reports and
   benchmarks: one LLM path for every tool.
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
from typing import Any, Callable, Sequence

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

    with np.errstate(over="ignore"):  # inf here is caught below, as non-finite probabilities
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
    # prefill chunk size of every request (runtime/core.py): a property of the request, so an answer
    # is the same alone, in a batch, and in the server; None: the core's default
    prefill_chunk: int | None = None
    # every LLM run has at least two rows (runtime/core.py): exact answers on quantized graphs whatever
    # the load, at the cost of a two-row step for a lone row
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.prefill_chunk is None:
            from .core import DEFAULT_PREFILL_CHUNK

            self.prefill_chunk = DEFAULT_PREFILL_CHUNK

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

    # -- one-row clients of the step core (runtime/core.py): verify, calibration and bench ---------
    def core(self):
        """A step core for one row at a time over this generator (the chat path's chunking)."""
        from .core import StepCore

        return StepCore(self, prefill_chunk=self.prefill_chunk, batch_invariant=self.batch_invariant)

    def image_positions(self, token_ids: Sequence[int], image_embeds: np.ndarray | None,
                        image_mask: Sequence[bool] | None) -> list[bool] | None:
        """``image_mask`` as :meth:`embed` reads it: given, else every image-token id when there are
        image embeddings, else none."""
        if image_mask is not None or image_embeds is None:
            return None if image_mask is None else list(image_mask)
        return [int(t) == self.image_token_id for t in token_ids]

    def run(self, cache: KVCache, params: SamplingParams, ids: Sequence[int] = (),
            image_embeds: np.ndarray | None = None, image_mask: Sequence[bool] | None = None,
            inputs_embeds: np.ndarray | None = None, keep_logits: bool = False, forced: Sequence[int] = ()):
        """Prefill the new tokens on top of ``cache`` and decode through the step core; returns the
        finished :class:`~flashvl_edge.runtime.core.Sequence` (``generated``, ``logits``). The last
        generated token is not fed to the model, so ``cache`` ends ``len(new) + generated - 1`` longer."""
        from .core import Sequence as Row

        n_new = len(ids) if inputs_embeds is None else inputs_embeds.shape[1]
        if n_new == 0:
            raise PromptError("nothing to prefill: give token ids or inputs_embeds")
        seq = Row(params, prompt_ids=ids, image_mask=self.image_positions(ids, image_embeds, image_mask),
                  image_embeds=image_embeds, prompt_embeds=None if inputs_embeds is None else inputs_embeds[0],
                  cache=cache, keep_logits=keep_logits, forced=forced)
        seq.keep_cache = True
        for _ in self.core().run(seq):
            pass
        return seq

    def greedy(self, cache: KVCache, ids: Sequence[int] = (), image_embeds: np.ndarray | None = None,
               image_mask: Sequence[bool] | None = None, n_tokens: int = 32, stop: bool = True,
               inputs_embeds: np.ndarray | None = None, json_schema: dict | None = None,
               json_object: bool = False) -> tuple[list[int], np.ndarray]:
        """Greedy decoding, also returning the logits that chose each token.

        ``stop``: end at the first stop token (included); else exactly ``n_tokens`` (context
        permitting), or until a constrained answer (``json_schema`` / ``json_object``, as in
        :class:`SamplingParams`) has ended. Returns (tokens, logits [len(tokens), vocab] float32);
        constrained, the logits are the masked ones (-inf where the structure allowed no token)."""
        params = SamplingParams(max_new_tokens=n_tokens, ignore_eos=not stop, json_schema=json_schema,
                                json_object=json_object).validate()
        seq = self.run(cache, params, ids, image_embeds, image_mask, inputs_embeds, keep_logits=True)
        return list(seq.generated), np.stack(seq.logits)

    def teacher_forced(self, cache: KVCache, ids: Sequence[int] = (), image_embeds: np.ndarray | None = None,
                       image_mask: Sequence[bool] | None = None, forced_tokens: Sequence[int] = (),
                       inputs_embeds: np.ndarray | None = None) -> np.ndarray:
        """Prefill, then feed ``forced_tokens`` one decode step each, whatever the model would pick.

        Returns the logits after the prefill and after each forced token: [len(forced_tokens) + 1, vocab]
        (row i predicts the token after ``forced_tokens[:i]``). For parity and accuracy reports."""
        n_new = len(ids) if inputs_embeds is None else inputs_embeds.shape[1]
        self.check_context(cache.length, n_new + len(forced_tokens))
        params = SamplingParams(max_new_tokens=len(forced_tokens) + 1, ignore_eos=True).validate()
        seq = self.run(cache, params, ids, image_embeds, image_mask, inputs_embeds, keep_logits=True,
                       forced=forced_tokens)
        return np.stack(seq.logits)


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
