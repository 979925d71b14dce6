"""Unit tests of the runtime's text side: streaming detokenizer, stop strings, sampling, prompt building."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from factories import as_manifest
from flashvl_edge.runtime import PromptError
from flashvl_edge.runtime.bundle import Bundle
from flashvl_edge.runtime.generate import SamplingParams, StreamingDetokenizer, TextAssembler, sample
from flashvl_edge.runtime.prompt import CHATML_TEMPLATE, PromptBuilder


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE that knows no merges for non-ASCII text: 'é' is 2 tokens, an emoji 4."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_end|>"])
    tok.train_from_iterator(["hello world, the cat sat on the mat"] * 10, trainer)
    return tok


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", ["é", "café 😀 ok", "日本語のテキスト", "a🎉b🎉", "hello world é"])
def test_detokenizer_never_emits_half_a_character(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text).ids
    naive = [byte_tokenizer.decode([i]) for i in ids]
    if any(ord(c) > 127 for c in text):
        assert any("\ufffd" in p for p in naive)  # the case is real: single tokens are partial bytes
    detok = StreamingDetokenizer(_decode(byte_tokenizer))
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == byte_tokenizer.decode(ids)


def test_detokenizer_flushes_an_incomplete_character_like_a_full_decode(byte_tokenizer):
    ids = byte_tokenizer.encode("ok 😀").ids[:-2]  # cut the emoji's bytes short
    detok = StreamingDetokenizer(_decode(byte_tokenizer))
    streamed = "".join(detok.push(i) for i in ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == byte_tokenizer.decode(ids)


def test_text_assembler_stop_strings_are_never_streamed(byte_tokenizer):
    ids = byte_tokenizer.encode("the cat sat on the mat").ids
    asm = TextAssembler(_decode(byte_tokenizer), stop=["on the", "xyz"])
    out = ""
    for i in ids:
        out += asm.push(i)
        assert "the cat sat ".startswith(out)  # never a character of the stop string
        if asm.stopped:
            break
    out += asm.finish()
    assert out == asm.text == "the cat sat "
    # no stop string: everything comes out, held-back text included
    asm = TextAssembler(_decode(byte_tokenizer), stop=["mats"])
    out = "".join(asm.push(i) for i in ids) + asm.finish()
    assert out == "the cat sat on the mat" and not asm.stopped


def test_greedy_and_repetition_penalty():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, np.array([], np.int64), SamplingParams(), rng) == 1
    # penalty 2: 3.0 -> 1.5 < 2.0, so token 2 wins; negative logits are multiplied (pushed down)
    p = SamplingParams(repetition_penalty=2.0)
    assert sample(logits, np.array([1]), p, rng) == 2
    assert sample(np.array([-1.0, -1.5]), np.array([0]), p, rng) == 1


def test_sampling_follows_the_softmax_and_filters():
    logits = np.log(np.array([1, 2, 3, 0.001, 0.001], np.float64)).astype(np.float32)
    rng = np.random.default_rng(0)
    draws = np.array([sample(logits, np.array([], np.int64), SamplingParams(temperature=1.0), rng)
                      for _ in range(6000)])
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq[:3], [1 / 6, 2 / 6, 3 / 6], atol=0.03)
    top2 = {sample(logits, np.array([], np.int64), SamplingParams(temperature=1.0, top_k=2), rng)
            for _ in range(300)}
    assert top2 == {1, 2}
    # top_p 0.45 keeps only the most likely token (its mass is just under 0.5)
    assert {sample(logits, np.array([], np.int64), SamplingParams(temperature=1.0, top_p=0.45), rng)
            for _ in range(100)} == {2}
    # top_p 0.6 keeps two
    assert {sample(logits, np.array([], np.int64), SamplingParams(temperature=1.0, top_p=0.6), rng)
            for _ in range(300)} == {1, 2}


@pytest.fixture(scope="module")
def prompts(tiny_static_bundle):
    return PromptBuilder.from_bundle(Bundle.load(tiny_static_bundle))


def test_placeholder_expands_to_the_exact_image_tokens(prompts):
    text = prompts.render([prompts.user_message("What is it?", 1)])
    assert text.count(prompts.placeholder) == 1
    ids, mask = prompts.encode_with_images(text, [7])
    assert ids.count(prompts.image_token_id) == 7 == sum(mask)
    first = mask.index(True)
    assert all(mask[first:first + 7]) and ids[first:first + 7] == [prompts.image_token_id] * 7
    # the text around the image is the template's, tokenized
    before = text.split(prompts.placeholder)[0]
    assert ids[:first] == prompts.encode_plain(before)
    with pytest.raises(PromptError):
        prompts.encode_with_images(text, [])


def test_start_and_end_tokens_wrap_the_image(prompts, tiny_static_bundle):
    b = Bundle.load(tiny_static_bundle)
    image = dataclasses.replace(b.manifest.image, start_token="<|im_start|>", end_token="<|im_end|>")
    pb = PromptBuilder(prompts.tokenizer, {}, None, image)
    ids, mask = pb.encode_with_images("a<image>b", [3])
    s, e = pb.token_id("<|im_start|>"), pb.token_id("<|im_end|>")
    i = ids.index(s)
    assert ids[i:i + 5] == [s] + [pb.image_token_id] * 3 + [e] and mask[i:i + 5] == [False, True, True, True, False]


def test_chatml_fallback_and_text_only(prompts):
    pb = PromptBuilder(prompts.tokenizer, {}, None, as_manifest({}).image)
    assert pb.template_source == CHATML_TEMPLATE
    text = pb.render([pb.user_message("hi", 0)])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = pb.encode_with_images(text, [])
    assert not any(mask) and pb.decode(ids) == "system\nYou are a helpful assistant.\nuser\nhi\nassistant\n"


# Qwen2-Instruct's chat_template (tokenizer_config.json), the reference the fallback must render exactly
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
     {"role": "assistant", "content": "A cat.\n"}, {"role": "user", "content": "And then?"}],
])
def test_chatml_fallback_renders_what_qwen2s_template_renders(messages):
    # compiled in the runtime's sandbox, which has transformers' Jinja settings (trim_blocks, lstrip_blocks)
    from flashvl_edge.runtime.prompt import _compile_template

    ours, qwen2 = _compile_template(CHATML_TEMPLATE), _compile_template(QWEN2_CHAT_TEMPLATE)
    for gen in (True, False):
        assert (ours.render(messages=messages, add_generation_prompt=gen)
                == qwen2.render(messages=messages, add_generation_prompt=gen))


def test_user_message_rules(prompts):
    assert prompts.user_message("Describe.", 1)["content"] == prompts.placeholder + "\nDescribe."
    assert prompts.user_message(f"Look {prompts.placeholder} here", 1)["content"] == f"Look {prompts.placeholder} here"
    with pytest.raises(PromptError):
        prompts.user_message("", 0)
    with pytest.raises(PromptError):
        prompts.user_message(f"{prompts.placeholder}", 0)


def test_ids_beyond_the_tokenizer_decode_to_nothing(prompts):
    # full-size random models have vocab 151936, more ids than their tokenizer knows
    hello = prompts.encode_plain("hello")
    assert prompts.decode(hello + [151935, 10**6]) == prompts.decode(hello)
    det = StreamingDetokenizer(prompts.decode)
    assert det.push(151935) == "" and det.flush() == ""


def test_sampling_params_validation():
    assert SamplingParams(stop="x").validate().stop == ("x",)
    for bad in (dict(top_p=float("nan")), dict(temperature=float("inf")), dict(seed=1.5), dict(stop=[3])):
        with pytest.raises(PromptError):
            SamplingParams(**bad).validate()
    json.dumps(SamplingParams().__dict__)  # plain data
