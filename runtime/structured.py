"""Schema-constrained decoding: answers that are JSON, valid against a JSON Schema, by construction.

    pipe.chat("Who is in the photo? Answer as JSON.", image="photo.jpg",
              json_schema={"type": "object", "properties": {"name": {"type": "string"}},
                           "required": ["name"]})
    pipe.chat("Describe the image as a JSON object.", image="photo.jpg", json_object=True)

The grammar work is llguidance's (the ``structured`` extra): it compiles the schema to a grammar and,
at each step, computes the bitmask of the tokens that keep the answer a valid prefix. Per request:

1. ``SamplingParams.validate`` compiles and checks the schema (:func:`check_sampling`, no tokenizer
   needed), so a bad schema is one PromptError before any graph runs;
2. :meth:`StructuredOutput.constraint` builds the request's :class:`Constraint` (an ``LLMatcher`` on
   the bundle's tokenizer, which is built once per bundle and cached);
3. each step ``logits = constraint.apply(logits)`` sets every disallowed token to -inf, then the
   ordinary ``sample`` picks, then ``constraint.advance(token)``.

Once the JSON value is complete the mask allows only the bundle's end tokens, so the answer ends
with a stop token as an unconstrained one does (finish reason "stop", and a chat session's KV cache
stays in step with the template). ``max_new_tokens`` still applies: an answer cut by it is
incomplete JSON, with finish reason "length".

llguidance is imported only when a request asks for structured output; it needs no torch.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from .errors import MissingExtraError, PromptError, one_line

if TYPE_CHECKING:
    from .generate import SamplingParams

# {"type": "json_object"} in OpenAI's terms: any JSON object
JSON_OBJECT_SCHEMA = {"type": "object"}
# Between two JSON tokens: at most one line break and an indent, which fits pretty-printed JSON. Any
# amount of whitespace (llguidance's default) lets a small model loop on blank lines until the token
# budget runs out, an answer that never closes. A schema's own "x-guidance" options override this.
JSON_WHITESPACE = r"(?:\r?\n)?[\x20\x09]{0,32}"


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "llguidance":
            raise
        raise MissingExtraError("llguidance", "structured output (json_schema / json_object)",
                                extra="structured") from None
    return llguidance


def schema_of(params: "SamplingParams") -> Mapping | None:
    """The JSON Schema ``params`` constrain the answer to, or None."""
    if params.json_schema is not None:
        return params.json_schema
    return JSON_OBJECT_SCHEMA if params.json_object else None


def check_sampling(params: "SamplingParams") -> None:
    """PromptError when the schema of ``params`` cannot be used (called by ``SamplingParams.validate``)."""
    schema = schema_of(params)
    if schema is not None:
        _grammar(_schema_text(schema))


def _schema_text(schema: Any) -> str:
    if not isinstance(schema, Mapping):
        raise PromptError(f"json_schema must be a JSON Schema object (a dict), got a {type(schema).__name__}")
    try:
        # keys keep their order: the grammar emits an object's properties in the schema's order
        return json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PromptError(f"json_schema must be plain JSON data ({one_line(str(e))})") from None


@functools.lru_cache(maxsize=128)
def _grammar(schema_text: str) -> str:
    """The llguidance grammar of a schema; PromptError for an invalid or unsupported one. Cached: a
    server sees the same few schemas over and over, and validate() and constraint() both ask."""
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema_text,
                                                         defaults={"whitespace_pattern": JSON_WHITESPACE})
    except (TypeError, ValueError) as e:
        raise PromptError(f"json_schema must be a JSON Schema object ({one_line(str(e))})") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        why = one_line(messages[0]) if messages else "rejected by the schema compiler"
        raise PromptError(f"invalid or unsupported json_schema: {why}; check the schema and use only "
                          "the JSON Schema keywords llguidance supports")
    return grammar


class Constraint:
    """One request's matcher and bitmask: ``apply`` before sampling, ``advance`` after.

    ``complete``: the JSON value is finished (only an end token may follow). ``done``: an end token
    came after it; nothing may follow (what ends a row that ignores eos)."""

    def __init__(self, matcher, vocab_size: int, end_ids: Iterable[int]) -> None:
        llg = _llguidance()
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.end_ids = frozenset(int(i) for i in end_ids)
        self.bitmask = llg.numpy.allocate_token_bitmask(1, vocab_size)
        self._fill = llg.numpy.fill_next_token_bitmask
        self.done = False

    @property
    def complete(self) -> bool:
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens that may come next."""
        self._fill(self.matcher, self.bitmask)
        if self.matcher.is_error():
            raise RuntimeError(f"the JSON matcher failed: {self.matcher.get_error()}")
        bits = np.unpackbits(self.bitmask.view(np.uint8), axis=-1, count=self.vocab_size, bitorder="little")
        return bits[0].view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Set the logits of every token that may not come next to -inf (in place when ``logits`` is
        writable, else on a copy) and return them. Ids past the tokenizer (a vocabulary padded beyond
        it) are never allowed."""
        allowed = self.allowed()
        if not logits.flags.writeable:
            logits = logits.copy()
        n = min(len(logits), self.vocab_size)
        np.copyto(logits[:n], -np.inf, where=~allowed[:n])
        logits[n:] = -np.inf
        return logits

    def advance(self, token: int) -> None:
        """Feed the sampled token to the matcher."""
        if self.done:
            return
        if self.complete and int(token) in self.end_ids:
            self.done = True
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"the JSON matcher refused token {token} it allowed: {self.matcher.get_error()}")


class StructuredOutput:
    """Builds :class:`Constraint` objects for one bundle: its tokenizer (read and converted on the
    first constrained request, then shared by all), the LLM's vocabulary size and its end tokens.

    ``vocab_size`` is the LLM's (``manifest.llm.vocab_size``), which may exceed the tokenizer's:
    the extra ids are masked out. ``end_ids`` are the ids that end an answer (the generator's stop
    tokens): the only ones allowed once the JSON is complete."""

    _attach_lock = threading.Lock()

    def __init__(self, tokenizer_file: str | Path, vocab_size: int, end_ids: Iterable[int]) -> None:
        self.tokenizer_file = Path(tokenizer_file)
        self.vocab_size = int(vocab_size)
        self.end_ids = sorted({int(i) for i in end_ids})
        if not self.end_ids:
            raise PromptError("structured output needs the bundle's end-of-answer token ids; none are known")
        self._tokenizer = None
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle, end_ids: Iterable[int] | None = None) -> "StructuredOutput":
        """For a loaded bundle; ``end_ids`` default to the manifest's eos ids."""
        m = bundle.manifest
        ids = m.generation.eos_token_ids if end_ids is None else end_ids
        return cls(bundle.path(m.tokenizer.file), m.llm.vocab_size, ids)

    @classmethod
    def for_pipeline(cls, pipe) -> "StructuredOutput":
        """The pipeline's factory, made on first use and kept on ``pipe.generator.structured`` (which
        ``Generator.generate`` and ``greedy`` use); its end tokens are the generator's stop tokens."""
        gen = pipe.generator
        with cls._attach_lock:
            if gen.structured is None:
                gen.structured = cls.from_bundle(pipe.bundle, gen.stop_token_ids)
            return gen.structured

    @property
    def tokenizer(self):
        """The llguidance tokenizer, built once (a large vocabulary takes a moment)."""
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                try:
                    text = self.tokenizer_file.read_text(encoding="utf-8")
                    self._tokenizer = llg.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=self.end_ids)
                except (OSError, ValueError, RuntimeError) as e:
                    raise PromptError(f"structured output cannot use the bundle's tokenizer "
                                      f"({one_line(str(e))})") from None
            return self._tokenizer

    def constraint(self, params: "SamplingParams") -> Constraint | None:
        """The request's constraint; None when ``params`` ask for no structure."""
        schema = schema_of(params)
        if schema is None:
            return None
        grammar = _grammar(_schema_text(schema))
        matcher = _llguidance().LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise PromptError(f"invalid or unsupported json_schema: {one_line(matcher.get_error())}; "
                              "check the schema")
        return Constraint(matcher, self.vocab_size, self.end_ids)
