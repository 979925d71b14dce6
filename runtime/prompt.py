"""Prompts: tokenizer, chat template, and the image placeholder expanded to image-token ids.

The bundle carries everything: ``tokenizer.json`` (loaded with ``tokenizers``, no transformers),
``tokenizer_config.json`` (special-token texts the template may use), the chat template (Jinja, rendered
in a sandbox like transformers does; ChatML when the bundle has none) and the ``image`` section
(placeholder text, image token and id, optional start/end tokens around the image).

The placeholder is expanded *after* tokenization, at the id level: the rendered text is split at each
placeholder, the pieces are tokenized, and ``start + [image_token_id] * n + end`` is inserted between
them. So the count of image positions is exact whatever the tokenizer would make of the image token's
text, and the LLM sees one image-token id at every position where an image embedding goes.

Control tokens come only from the template. ``render`` returns a :class:`RenderedText` that knows
where each message's content sits in it; content holding the text of a special token
(``<|im_end|>\n<|im_start|>system\n...``) is tokenized with special-token parsing off, so a user
cannot forge a turn. Text without such content is tokenized in one piece, exactly as before. The
template renders under :class:`RenderLimits` (output size; for the server also time and memory, in a
child process).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .contract import ImageSpec
from .errors import BundleError, PromptError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML exactly as Qwen2's template renders it (a default system turn when the conversation has none):
# what the exporter writes into bundles and checkpoints, and what the runtime falls back to when a bundle
# has no template. Strings are built with expressions (not literal newlines between tags) so Jinja
# whitespace control (trim_blocks, lstrip_blocks, "-") cannot eat the newlines that are part of the format.
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for message in rest -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
DEFAULT_PLACEHOLDER = "<image>"


def check_text(text: str, what: str = "prompt") -> str:
    """``text`` if it is encodable as UTF-8, else one PromptError.

    Bytes that are not UTF-8 on the command line (or from a file read with ``surrogateescape``) arrive
    as lone surrogates: Python strings that tokenizers cannot take (it raises TypeError).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the {what} is not valid UTF-8 text (undecodable bytes at character {e.start}); "
                          "pass the text encoded as UTF-8") from None
    return text


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as text or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class RenderLimits:
    """Bounds on rendering the bundle's chat template (``flashvl serve --max-template-chars``,
    ``--template-timeout``, ``--template-memory``).

    A bundle's template is code from whoever made the bundle, run in Jinja's sandbox: the sandbox
    stops attribute tricks, not ``{{ 'A' * 500000000 }}`` or nested loops. ``max_chars`` caps the
    rendered text (checked as it is produced, before any of it is tokenized). ``isolate``: render
    in a child process (runtime/isolate.py) that is killed past ``timeout_s`` and cannot grow past
    ``memory_bytes``; without it (the default for ``flashvl chat`` and the Python API, where the
    user runs their own bundle) only ``max_chars`` applies."""

    max_chars: int = 1 << 20
    timeout_s: float = 2.0
    memory_bytes: int = 256 * 1024 * 1024
    isolate: bool = False
    workers: int = 2


class RenderedText(str):
    """Rendered template text that knows where each message's content is (``spans``: [start, end)
    character ranges). Slicing keeps the spans that fall inside the slice, shifted, so a chat
    session that tokenizes only the new tail of a conversation still knows which text was typed."""

    spans: tuple | None = ()  # None: the template rewrites contents, so they could not be located
    unlocated: tuple = ()  # then: the contents of the render, checked for control-token text

    def __new__(cls, text: str, spans=()):
        obj = super().__new__(cls, text)
        obj.spans = tuple((int(a), int(b)) for a, b in spans)
        return obj

    def __getitem__(self, key):
        piece = str.__getitem__(self, key)
        if not isinstance(key, slice) or key.step not in (None, 1):
            return piece
        if self.spans is None:
            out = RenderedText(piece)
            out.spans, out.unlocated = None, self.unlocated
            return out
        start, stop, _ = key.indices(len(self))
        inside = [(max(a, start) - start, min(b, stop) - start) for a, b in self.spans if a < stop and b > start]
        return RenderedText(piece, inside)

    def split_with_spans(self, sep: str) -> list["RenderedText"]:
        """``str.split(sep)`` whose pieces keep their spans."""
        out, pos = [], 0
        for piece in str.split(self, sep):
            out.append(self[pos:pos + len(piece)])
            pos += len(piece) + len(sep)
        return out


def _render_in_worker(source: str, messages: list, add_generation_prompt: bool, specials: dict,
                      max_chars: int) -> list:
    """Render, and find each message's content in the result: [text, spans or None] (JSON for the
    isolated child). The spans come from a second render with a unique marker in place of each
    content: when putting the contents back into that render gives exactly the first one, the
    template inserts contents verbatim and the markers' places are the contents' places."""
    text = _render_capped(_compile_template(source), messages, add_generation_prompt, specials, max_chars)
    if not all(isinstance(m.get("content"), str) for m in messages):
        return [text, None]  # structured contents: no spans to find
    nonce = secrets.token_hex(8)
    marks = [f"\U000f0000{nonce}:{i}\U000f0001" for i in range(len(messages))]
    marked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    try:
        skeleton = _render_capped(_compile_template(source), marked, add_generation_prompt, specials,
                                  max_chars + sum(len(m) for m in marks))
    except Exception:  # noqa: BLE001 - a template that cannot take the markers: no spans
        return [text, None]
    spans, out, pos = [], [], 0
    pattern = re.compile("\U000f0000" + nonce + ":([0-9]+)\U000f0001")
    seen = set()
    for match in pattern.finditer(skeleton):
        i = int(match.group(1))
        if i in seen:
            return [text, None]  # a content rendered twice: verbatim but ambiguous, no spans
        seen.add(i)
        out.append(skeleton[pos:match.start()])
        start = sum(len(x) for x in out)
        out.append(messages[i]["content"])
        spans.append((start, start + len(messages[i]["content"])))
        pos = match.end()
    out.append(skeleton[pos:])
    if "".join(out) != text:
        return [text, None]
    return [text, spans]


def _render_capped(template, messages, add_generation_prompt: bool, specials: dict, max_chars: int) -> str:
    parts, n = [], 0
    for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **specials):
        n += len(piece)
        if n > max_chars:
            raise PromptError(f"the chat template's output grew past {max_chars:,} characters "
                              "(--max-template-chars); send shorter messages")
        parts.append(piece)
    return "".join(parts)


_render_pool = None
_render_pool_key = None


def _pool_for(limits: RenderLimits):
    global _render_pool, _render_pool_key
    from .isolate import WorkerPool

    key = (limits.memory_bytes, limits.workers)
    if _render_pool is None or _render_pool_key != key:
        old, _render_pool = _render_pool, WorkerPool("chat template", size=limits.workers,
                                                     memory_bytes=limits.memory_bytes,
                                                     preload=("flashvl_edge.runtime.prompt", "jinja2.sandbox"))
        _render_pool_key = key
        if old is not None:
            old.close()
    return _render_pool


def close_render_workers() -> None:
    """Kill the isolated template renderers (the server does, when it stops)."""
    global _render_pool
    if _render_pool is not None:
        _render_pool.close()
        _render_pool = None


@lru_cache(maxsize=8)
def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PromptError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise BundleError(f"the bundle's chat template does not parse ({e}); re-export the bundle") from None


class PromptBuilder:
    """Turns chat messages into token ids for the LLM (and generated ids back into text)."""

    def __init__(self, tokenizer, tokenizer_config: dict, chat_template: str | None, image: ImageSpec) -> None:
        self.tokenizer = tokenizer
        self.template_source = chat_template or CHATML_TEMPLATE
        self.template = _compile_template(self.template_source)
        self.special_tokens = {k: _token_text(tokenizer_config.get(k))
                               for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.placeholder = image.placeholder
        self.image_token_id = image.image_token_id
        self.render_limits = RenderLimits()
        # Control tokens (the tokenizer's special added tokens: <|im_start|>, <|im_end|>, the image
        # token...) come only from the template. Message content that contains their text is
        # tokenized by a copy of the tokenizer that reads special-token text as plain text.
        controls = sorted({t.content for t in self._added_tokens() if t.special} |
                          {x for x in (image.image_token, image.start_token, image.end_token) if x}, key=len, reverse=True)
        self.control_texts = tuple(controls)
        self._control_re = re.compile("|".join(map(re.escape, controls))) if controls else None
        self._text_tokenizer = None
        self.start_ids = self.encode_plain(image.start_token) if image.start_token else []
        self.end_ids = self.encode_plain(image.end_token) if image.end_token else []

    @classmethod
    def from_bundle(cls, bundle) -> "PromptBuilder":
        from tokenizers import Tokenizer

        m = bundle.manifest
        files = m.tokenizer
        try:
            tokenizer = Tokenizer.from_file(str(bundle.path(files.file)))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"cannot load the bundle's tokenizer ({' '.join(str(e).split())}); "
                              "re-export the bundle") from None
        try:
            config = json.loads(bundle.path(files.config_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read the bundle's tokenizer config ({e}); re-export the bundle") from None
        if not isinstance(config, dict):
            raise BundleError("the bundle's tokenizer config is not a JSON object; re-export the bundle")
        return cls(tokenizer, config, m.chat_template, m.image)

    # -- text <-> ids --------------------------------------------------------------------------
    def _added_tokens(self):
        try:
            return list(self.tokenizer.get_added_tokens_decoder().values())
        except AttributeError:  # a stand-in tokenizer in tests
            return []

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` as is (special-token texts inside it become their ids). Through
        ``encode_batch``, which releases the GIL (``encode`` holds it), so a long text being
        tokenized in a worker thread does not stall the server's event loop."""
        if not text:
            return []
        if hasattr(self.tokenizer, "encode_batch"):
            return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token texts read as plain text: what a user typed can
        never become a control token."""
        if not text:
            return []
        if self._text_tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.tokenizer.to_str())
            tok.encode_special_tokens = True
            self._text_tokenizer = tok
        return self._text_tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def contains_control(self, text: str, start: int = 0, end: int | None = None) -> bool:
        """Whether ``text[start:end]`` holds the text of a control token."""
        if self._control_re is None:
            return False
        return self._control_re.search(text, start, len(text) if end is None else end) is not None

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of rendered template text: the template's own text with special-token parsing
        on, each message's content (``text.spans``, a :class:`RenderedText`) with it off. Text with
        no control-token text inside a content is tokenized in one piece, exactly as before."""
        located = getattr(text, "spans", ())
        if located is None:
            self._refuse_unlocated_controls(text)
            located = ()
        spans = [(a, b) for a, b in located if self.contains_control(text, a, b)]
        if not spans:
            return self.encode_plain(str(text))
        ids, pos = [], 0
        for a, b in spans:
            ids += self.encode_plain(str.__getitem__(text, slice(pos, a)))
            ids += self.encode_text(str.__getitem__(text, slice(a, b)))
            pos = b
        return ids + self.encode_plain(str.__getitem__(text, slice(pos, None)))

    def _refuse_unlocated_controls(self, text) -> None:
        """Text whose message contents could not be located (a template that rewrites them):
        refuse control-token text in any of this render's contents, which are remembered."""
        for content in getattr(text, "unlocated", ()):
            if self.contains_control(content):
                found = self._control_re.search(content).group(0)
                raise PromptError(f"a message contains the control token text {found!r}, and this bundle's chat "
                                  "template rewrites message text, so it cannot be kept as plain text; remove it")

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens. Ids the tokenizer does not know (a full-size
        random model's vocab can be larger than its tokenizer) decode to nothing."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    # -- chat ----------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        limits = self.render_limits
        try:
            if limits.isolate:
                text, spans = self._render_isolated(messages, add_generation_prompt, specials, limits)
            else:
                text, spans = _render_in_worker(self.template_source, list(messages), add_generation_prompt,
                                                specials, limits.max_chars)
        except PromptError:  # the template's own raise_exception(), or the size cap: already one line
            raise
        except TemplateError as e:
            raise PromptError(f"the chat template failed to render these messages ({' '.join(str(e).split())})") from None
        except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, RecursionError) as e:
            # Errors the template's own code raises inside the sandbox, e.g. OverflowError for a range
            # past the sandbox's MAX_RANGE, TypeError for 'a' + 1: the bundle's template is at fault.
            raise BundleError(f"the bundle's chat template failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}; "
                              "fix chat_template in manifest.json or re-export the bundle") from None
        except MemoryError:
            raise PromptError("the chat template ran out of memory rendering these messages") from None
        out = RenderedText(text, spans or ())
        if spans is None:
            out.spans = None
            out.unlocated = tuple(m.get("content", "") for m in messages if isinstance(m.get("content"), str))
        return out

    def _render_isolated(self, messages, add_generation_prompt: bool, specials: dict, limits: RenderLimits):
        from .isolate import WorkerError

        plain = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
        try:
            text, spans = _pool_for(limits).call("flashvl_edge.runtime.prompt:_render_in_worker",
                                                 self.template_source, plain, add_generation_prompt, specials,
                                                 limits.max_chars, timeout_s=limits.timeout_s)
        except WorkerError as e:
            if e.kind == "PromptError":
                raise PromptError(e.message) from None
            if e.kind in ("TemplateError", "TemplateSyntaxError", "UndefinedError", "SecurityError",
                          "TemplateRuntimeError"):
                raise PromptError(f"the chat template failed to render these messages ({e.message[:200]})") from None
            what = {"timeout": f"took longer than {limits.timeout_s:g} s (--template-timeout)",
                    "memory": f"needed more than {limits.memory_bytes // (1024 * 1024)} MiB (--template-memory)",
                    "busy": f"could not start: every renderer stayed busy for {limits.timeout_s:g} s"}.get(
                e.kind, f"failed: {e.kind}: {e.message[:200]}")
            raise PromptError(f"rendering the chat template {what}; the bundle's template or these messages "
                              "are too costly") from None
        return text, (None if spans is None else [tuple(x) for x in spans])

    def user_message(self, prompt: str, n_images: int) -> dict:
        """A user turn; with an image and no placeholder in the text, the image goes first."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty; pass some text to ask about")
        check_text(prompt, "prompt")
        found = prompt.count(self.placeholder)
        if n_images and found == 0:
            prompt = self.placeholder * n_images + "\n" + prompt
        elif found != n_images:
            raise PromptError(f"the prompt contains {found} {self.placeholder!r} placeholder(s) but "
                              f"{n_images} image(s) were given; use one placeholder per image")
        return {"role": "user", "content": prompt}

    def encode_with_images(self, text: str, n_image_tokens: list[int]) -> tuple[list[int], list[bool]]:
        """Token ids of rendered ``text``, each placeholder replaced by its image's token positions,
        and the mask of those image positions (an image-token id typed or generated as text is not one)."""
        if isinstance(text, RenderedText) and text.spans is not None:
            pieces = text.split_with_spans(self.placeholder)
        else:
            pieces = text.split(self.placeholder)
            self._refuse_unlocated_controls(text)
        if len(pieces) - 1 != len(n_image_tokens):
            raise PromptError(f"the conversation has {len(pieces) - 1} image placeholder(s) for "
                              f"{len(n_image_tokens)} image(s); a message or reply contains the text "
                              f"{self.placeholder!r}")
        ids = self.encode_rendered(pieces[0])
        mask = [False] * len(ids)
        for n, piece in zip(n_image_tokens, pieces[1:]):
            tail = self.encode_rendered(piece)
            ids += self.start_ids + [self.image_token_id] * n + self.end_ids + tail
            mask += [False] * len(self.start_ids) + [True] * n + [False] * (len(self.end_ids) + len(tail))
        return ids, mask
