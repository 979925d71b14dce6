"""Small real tokenizers for the presets (and test checkpoints), and the ChatML chat template.

A preset has random weights, but its bundle must still be complete and usable end to end, so it
ships a real `tokenizers` byte-level BPE tokenizer. It is trained deterministically on the short
English text below (same merges on every run), with the ChatML special tokens and the image
token(s) added as special tokens, so prompts tokenize the way they would with Qwen2's tokenizer:
`<|im_start|>`, `<|im_end|>` and `<image>` are single ids, ordinary text is byte-level BPE.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# One ChatML template for export and runtime; it lives in the runtime, which must not import export/.
from flashvl_edge.runtime.prompt import CHATML_TEMPLATE  # noqa: F401  (re-exported)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
FLASHVL_IMAGE_TOKENS = ("<image>",)
# InternVL: the user writes <image>; the runtime expands it to <img> + <IMG_CONTEXT> x N + </img>.
INTERNVL_IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<image>")

# Training text: plain English about pictures, so the merges cover words a test prompt uses.
TRAINING_TEXT = """
Describe this image in detail. What is in the picture? The photo shows a person standing in front of
a window, a cup of coffee on a wooden table, a cat sitting on a chair, and a page of printed text.
The astronaut wears a white suit with the flag on the shoulder. The cat has orange and black fur and
green eyes. The coffee cup is red and white, on a saucer, with a spoon next to it. The page has
several lines of black letters on a white background. Read the text and answer the question.
How many objects are there? What color is the sky? Where is the light coming from? Is it day or night?
A small boat floats on a calm lake near the mountains. Two children play with a ball in the park.
The red car is parked next to the blue house, and a tall tree grows beside the road.
The quick brown fox jumps over the lazy dog. A vision language model reads the image and writes an answer.
Please summarize the document, list the main points, and explain the chart. The numbers are 0 1 2 3 4 5
6 7 8 9 10 100 1000. Yes, no, maybe. Thank you! Hello, how are you today? I am fine, thanks.
system user assistant: You are a helpful assistant. The user asks, the assistant answers.
The model looks at each tile of the image, joins the features, and answers in a few short sentences.
"""

TINY_VOCAB_SIZE = 512


def train_bpe_tokenizer(added_tokens: tuple[str, ...], vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE tokenizer trained on TRAINING_TEXT; `added_tokens` get the first ids.

    The trainer is deterministic for a fixed corpus and settings, so every call returns the same
    vocabulary and merges (a test checks it).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(added_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    lines = [line for line in TRAINING_TEXT.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


@functools.lru_cache(maxsize=None)
def preset_tokenizer_json(family: str = "flashvl") -> str:
    """The serialized tokenizer.json for a model family ("flashvl" or "internvl")."""
    image_tokens = FLASHVL_IMAGE_TOKENS if family == "flashvl" else INTERNVL_IMAGE_TOKENS
    return train_bpe_tokenizer(CHATML_SPECIAL_TOKENS + image_tokens).to_str(pretty=False)


def load_tokenizer_json(text: str) -> Tokenizer:
    return Tokenizer.from_str(text)


def make_tokenizer_config(family: str = "flashvl", model_max_length: int = 32768) -> dict:
    """tokenizer_config.json content: chat template, special tokens, and what transformers needs to load it."""
    image_tokens = FLASHVL_IMAGE_TOKENS if family == "flashvl" else INTERNVL_IMAGE_TOKENS
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML_TEMPLATE,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [IM_START, IM_END, *image_tokens],
    }
    if family == "internvl":
        # Names transformers' InternVLProcessor reads from the tokenizer.
        config.update({"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"})
    return config


def materialize_tokenizer_file(tokenizer_json: str) -> Path:
    """Write a generated tokenizer.json to a content-addressed file in the temp dir and return its path.

    LoadedModel carries a path (checkpoints already have a file); generated tokenizers are written
    once per content, atomically, so concurrent processes never see a partial file.
    """
    digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "flashvl-edge-tokenizers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tokenizer-{digest}.json"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tokenizer_json)
        os.replace(tmp, path)
    return path


def write_tokenizer_files(out_dir: Path, tokenizer_file: Path, tokenizer_config: dict) -> None:
    """Copy tokenizer.json and write tokenizer_config.json into a checkpoint or bundle directory."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(Path(tokenizer_file).read_text(encoding="utf-8"), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a single (special) token; raises KeyError if the tokenizer lacks it."""
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise KeyError(token)
    return tid
