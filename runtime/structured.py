"""Schema-constrained decoding: answers that are JSON, valid against a JSON Schema, by construction.

    pipe.chat("Who is in the photo? Answer as JSON.", image="photo.jpg",
              json_schema={"type": "object", "properties": {"name": {"type": "string"}},
                           "required": ["name"]})
    pipe.chat("Describe the image as a JSON object.", image="photo.jpg", json_object=True)

The grammar work is llguidance's (the ``structured`` extra): it compiles the schema to a grammar and,
at each step, computes the bitmask of the tokens that keep the answer a valid prefix. Per request:

1. ``SamplingParams.validate`` compiles and checks the schema (:func:`check_sampling`, no tokenizer
   needed), so a bad schema is one PromptError before any graph runs. The compile runs in a child
   process with a time and memory budget (:class:`GrammarLimits`, runtime/isolate.py) and llguidance's
   own parser limits; results are cached, failures too. The check also asks a matcher for its first
   mask, which is where a schema with no valid answer (a ``$ref`` that only loops) fails;
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

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
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


@dataclass
class GrammarLimits:
    """How much one schema may cost to compile (``flashvl serve --max-schema-bytes``,
    ``--schema-compile-timeout``, ``--schema-compile-memory``).

    llguidance's own limits (``LLParserLimits``: lexer fuel, lexer states, grammar size) bound most of
    the work, but not all of it: its regex analysis of an ``allOf`` of ``pattern`` s grows
    exponentially in native code, fuel or not (14 patterns: 10 s and 0.7 GB). So the compile and its
    check run in a child process (runtime/isolate.py) that is killed past ``timeout_s`` and cannot
    grow past ``memory_bytes``. ``isolate=False`` compiles in this process, for tools without
    untrusted schemas; llguidance's limits apply either way."""

    max_schema_bytes: int = 64 * 1024
    timeout_s: float = 5.0
    memory_bytes: int = 256 * 1024 * 1024
    isolate: bool = True
    workers: int = 2
    # llguidance's parser limits, lower than its defaults: a small model's answers need little
    max_grammar_size: int = 200_000
    max_lexer_states: int = 50_000
    initial_lexer_fuel: int = 1_000_000
    step_lexer_fuel: int = 200_000
    step_max_items: int = 50_000


LIMITS = GrammarLimits()
_CACHE_SIZE = 256
_cache: "OrderedDict[str, tuple[str | None, str | None]]" = OrderedDict()  # schema text -> (grammar, error)
_cache_lock = threading.Lock()
_pool = None
_pool_lock = threading.Lock()


def configure(limits: GrammarLimits) -> None:
    """Set the compile limits for this process (the server does, from its options); clears the cache,
    whose failures were judged under the old limits."""
    global LIMITS, _pool
    with _pool_lock:
        old, _pool = _pool, None
        LIMITS = limits
    with _cache_lock:
        _cache.clear()
    if old is not None:
        old.close()


def parser_limits(limits: GrammarLimits | None = None):
    """llguidance's ``LLParserLimits`` for ``limits`` (default: the configured ones)."""
    lim = limits or LIMITS
    return _llguidance().LLParserLimits(
        max_grammar_size=lim.max_grammar_size, max_lexer_states=lim.max_lexer_states,
        initial_lexer_fuel=lim.initial_lexer_fuel, step_lexer_fuel=lim.step_lexer_fuel,
        step_max_items=lim.step_max_items, verbose_errors=False)


def _limits_dict(lim: GrammarLimits) -> dict:
    return {k: getattr(lim, k) for k in ("max_grammar_size", "max_lexer_states", "initial_lexer_fuel",
                                          "step_lexer_fuel", "step_max_items")}


def _grammar(schema_text: str) -> str:
    """The llguidance grammar of a schema; PromptError for an invalid, unsupported or too costly one.
    Cached, failures included: a server sees the same few schemas over and over (validate() and
    constraint() both ask), and a schema that blew its budget once is refused at once the next time."""
    with _cache_lock:
        hit = _cache.get(schema_text)
        if hit is not None:
            _cache.move_to_end(schema_text)
    if hit is None:
        hit = _compile(schema_text)
        with _cache_lock:
            _cache[schema_text] = hit
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    grammar, error = hit
    if error is not None:
        raise PromptError(error)
    return grammar


def _compile(schema_text: str) -> tuple[str | None, str | None]:
    lim = LIMITS
    if len(schema_text.encode()) > lim.max_schema_bytes:
        return None, (f"json_schema is {len(schema_text.encode()):,} bytes as JSON, above the limit of "
                      f"{lim.max_schema_bytes:,} (--max-schema-bytes); send a smaller schema")
    if not lim.isolate:
        _llguidance()
        try:
            return _compile_in_worker(schema_text, _limits_dict(lim)), None
        except PromptError as e:
            return None, str(e)
    _llguidance()  # a missing extra is reported here, in one line, not by the child
    from .isolate import WorkerError, WorkerPool

    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool("json_schema compiler", size=lim.workers, memory_bytes=lim.memory_bytes,
                               preload=("flashvl_edge.runtime.structured", "llguidance.numpy"))
        pool = _pool
    try:
        return pool.call("flashvl_edge.runtime.structured:_compile_in_worker", schema_text, _limits_dict(lim),
                         timeout_s=lim.timeout_s), None
    except WorkerError as e:
        if e.kind == "PromptError":
            return None, e.message
        if e.kind == "busy":
            raise PromptError(f"the json_schema compiler is busy; retry ({e.message})") from None
        what = {"timeout": f"took longer than {lim.timeout_s:g} s to compile (--schema-compile-timeout)",
                "memory": f"needed more than {lim.memory_bytes // (1024 * 1024)} MiB to compile "
                          "(--schema-compile-memory)"}.get(e.kind, f"could not be compiled ({e.message})")
        return None, f"json_schema {what}; simplify the schema (fewer or simpler patterns, less nesting)"


# a byte-level tokenizer with one end token: enough for the compile check to build a matcher and
# ask for its first mask, which is where a schema with no valid answer (a $ref that only loops) fails
_PROBE_TOKENIZER = None


def _probe_tokenizer():
    global _PROBE_TOKENIZER
    if _PROBE_TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
        vocab["<|end|>"] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<|end|>"])
        _PROBE_TOKENIZER = _llguidance().LLTokenizer(tok.to_str(), n_vocab=len(vocab), eos_token=[vocab["<|end|>"]])
    return _PROBE_TOKENIZER


def _compile_in_worker(schema_text: str, limits: dict) -> str:
    """The compile and its checks (run in the isolated child): the grammar, or PromptError."""
    llg = _llguidance()
    lim = llg.LLParserLimits(verbose_errors=False, **limits)
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema_text,
                                                         defaults={"whitespace_pattern": JSON_WHITESPACE})
    except (TypeError, ValueError, RecursionError) as e:
        raise PromptError(f"json_schema must be a JSON Schema object ({one_line(str(e))[:300]})") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, limits=lim)
    if is_error:
        why = one_line(messages[0])[:300] if messages else "rejected by the schema compiler"
        raise PromptError(f"invalid or unsupported json_schema: {why}; check the schema and use only "
                          "the JSON Schema keywords llguidance supports")
    matcher = llg.LLMatcher(_probe_tokenizer(), grammar, log_level=0, limits=lim)
    if not matcher.is_error():
        mask = llg.numpy.allocate_token_bitmask(1, _probe_tokenizer().vocab_size)
        llg.numpy.fill_next_token_bitmask(matcher, mask)
    if matcher.is_error():
        why = one_line(matcher.get_error()).split(" <state>")[0][:200]
        raise PromptError(f"json_schema has no valid answer ({why}): a $ref that only refers back to itself "
                          "or contradictory constraints; check the schema")
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
            raise PromptError(f"the JSON answer cannot go on: {one_line(self.matcher.get_error())[:200]}")
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
            raise PromptError(f"the JSON matcher refused token {token} it allowed: "
                              f"{one_line(self.matcher.get_error())[:200]}")


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
        matcher = _llguidance().LLMatcher(self.tokenizer, grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise PromptError(f"invalid or unsupported json_schema: {one_line(matcher.get_error())}; "
                              "check the schema")
        return Constraint(matcher, self.vocab_size, self.end_ids)
