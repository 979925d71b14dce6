"""Prompts: tokenizer, chat template, and the image placeholder expanded to image-token ids.

The bundle carries everything: ``tokenizer.json`` (loaded with ``tokenizers``, no transformers),
``tokenizer_config.json`` (special-token texts the template may use), the chat template (Jinja, rendered
in a sandbox like transformers does; ChatML when the bundle has none) and the ``image`` section
(placeholder text, image token and id, optional start/end tokens around the image).

The placeholder is expanded *after* tokenization, at the id level: the rendered text is split at each
placeholder, the pieces are tokenized, and ``start + [image_token_id] * n + end`` is inserted between
them. So the count of image positions is exact whatever the tokenizer would make of the image token's
text, and the LLM sees one image-token id at every position where an image embedding goes.
"""

from __future__ import annotations

import json
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
    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` as is (special-token texts inside it become their ids)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens. Ids the tokenizer does not know (a full-size
        random model's vocab can be larger than its tokenizer) decode to nothing."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    # -- chat ----------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **{k: v for k, v in self.special_tokens.items() if v is not None})
        except PromptError:  # the template's own raise_exception(): already a user-facing message
            raise
        except TemplateError as e:
            raise PromptError(f"the chat template failed to render these messages ({' '.join(str(e).split())})") from None
        except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, RecursionError) as e:
            # Errors the template's own code raises inside the sandbox, e.g. OverflowError for a range
            # past the sandbox's MAX_RANGE, TypeError for 'a' + 1: the bundle's template is at fault.
            raise BundleError(f"the bundle's chat template failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}; "
                              "fix chat_template in manifest.json or re-export the bundle") from None

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
        pieces = text.split(self.placeholder)
        if len(pieces) - 1 != len(n_image_tokens):
            raise PromptError(f"the conversation has {len(pieces) - 1} image placeholder(s) for "
                              f"{len(n_image_tokens)} image(s); a message or reply contains the text "
                              f"{self.placeholder!r}")
        ids = self.encode_plain(pieces[0])
        mask = [False] * len(ids)
        for n, piece in zip(n_image_tokens, pieces[1:]):
            tail = self.encode_plain(piece)
            ids += self.start_ids + [self.image_token_id] * n + self.end_ids + tail
            mask += [False] * len(self.start_ids) + [True] * n + [False] * (len(self.end_ids) + len(tail))
        return ids, mask
