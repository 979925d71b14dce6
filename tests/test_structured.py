"""Schema-constrained decoding (runtime/structured.py): every answer is valid JSON, by construction.

The tiny bundles' weights are random, so an unconstrained answer is noise: it (almost) never parses.
The same seeds under a schema must all parse and validate, which shows the mask does the work. The
scheduler must give a constrained request the answer ``Pipeline.chat`` gives it alone.
"""

from __future__ import annotations

import asyncio
import json
import sys

import jsonschema
import numpy as np
import pytest

from events import collect
from flashvl_edge.main import main
from flashvl_edge.runtime.errors import MissingExtraError, PromptError
from flashvl_edge.runtime.generate import SamplingParams
from flashvl_edge.runtime.pipeline import Pipeline
from flashvl_edge.runtime.samples import test_photo as photo
from flashvl_edge.runtime.scheduler import GenerationRequest, Scheduler
from flashvl_edge.runtime.structured import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
SEEDS = range(12)
# enough for the schema to complete: a random model pads with the whitespace JSON allows
MAX_NEW = 256
QUESTION = "Who is this? Answer with a name and an age."


def _open(bundle):
    pipe = Pipeline.from_bundle(bundle, device="cpu")
    StructuredOutput.for_pipeline(pipe)  # the bundle's constraint factory, on pipe.generator.structured
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny_static_bundle, tiny_dynamic_bundle):
    made = {"static": _open(tiny_static_bundle), "dynamic": _open(tiny_dynamic_bundle)}
    yield made
    for p in made.values():
        p.close()


@pytest.fixture(scope="module")
def pipe(pipes):
    return pipes["dynamic"]


def _valid(text: str, schema=SCHEMA) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_constrained_answers_validate_where_unconstrained_ones_do_not_parse(pipes, which):
    pipe = pipes[which]
    stops = pipe.generator.stop_token_ids
    constrained, free = [], []
    for seed in SEEDS:
        r = pipe.chat(QUESTION, max_new_tokens=MAX_NEW, temperature=1.0, seed=seed, json_schema=SCHEMA)
        assert _valid(r.text), (seed, r.text, r.finish_reason)
        # a complete structure ends the answer with a stop token, as a model that learned JSON would
        assert r.finish_reason == "stop" and r.token_ids[-1] in stops, (seed, r.text)
        constrained.append(r.text)
        free.append(pipe.chat(QUESTION, max_new_tokens=MAX_NEW, temperature=1.0, seed=seed).text)
    parsed = 0
    for text in free:
        try:
            json.loads(text)
            parsed += 1
        except ValueError:
            pass
    assert parsed <= 1, free
    assert len(set(constrained)) == len(constrained)  # sampled, not one forced answer
    # properties come in the schema's order
    assert all(t.index('"name"') < t.index('"age"') for t in constrained)


def test_json_object_mode_gives_a_json_object(pipes):
    # any object: a random model's keys and strings may run past the budget ("length"), but every
    # answer that ends is an object, and most do
    ended = 0
    for which in ("static", "dynamic"):
        for seed in range(6):
            r = pipes[which].chat(QUESTION, max_new_tokens=MAX_NEW, temperature=1.0, seed=seed, json_object=True)
            assert r.text.lstrip().startswith("{"), r.text
            if r.finish_reason == "stop":
                assert isinstance(json.loads(r.text), dict), r.text
                ended += 1
    assert ended >= 6


def test_greedy_constrained_matches_generate_and_the_session_goes_on(pipe):
    r = pipe.chat(QUESTION, max_new_tokens=MAX_NEW, json_schema=SCHEMA)
    assert _valid(r.text) and r.finish_reason == "stop"
    cache = pipe.llm.new_cache()
    tokens, logits = pipe.generator.greedy(cache, r.prompt_token_ids, n_tokens=MAX_NEW, json_schema=SCHEMA)
    assert tokens == r.token_ids
    assert np.isneginf(logits).any(axis=1).all()  # each row is the masked logits that chose the token
    # the next turn of a session continues from a constrained one (its cache is in step)
    chat = pipe.session()
    first = chat.ask(QUESTION, max_new_tokens=MAX_NEW, json_schema=SCHEMA)
    second = chat.ask("And now in plain words?", max_new_tokens=6)
    assert first.text == r.text
    assert second.prompt_token_ids[:len(first.prompt_token_ids)] == first.prompt_token_ids


def test_ignore_eos_still_ends_after_the_structure(pipe):
    r = pipe.chat(QUESTION, max_new_tokens=MAX_NEW, temperature=1.0, seed=3, json_schema=SCHEMA, ignore_eos=True)
    assert _valid(r.text) and len(r.token_ids) < MAX_NEW
    assert r.token_ids[-1] in pipe.generator.stop_token_ids


BAD = [
    ({"json_schema": {"type": "nope"}}, "invalid or unsupported json_schema"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "unsatisfiable"),
    ({"json_schema": {"type": "string", "pattern": "(("}}, "regex"),  # the compiler's message is multi-line
    ({"json_schema": {"$ref": "#/$defs/missing"}}, "json_schema"),
    ({"json_schema": ["not", "a", "schema"]}, "must be a JSON Schema object"),
    ({"json_schema": {"enum": [{1, 2}]}}, "plain JSON"),
    ({"json_schema": SCHEMA, "json_object": True}, "not both"),
    ({"json_object": "yes"}, "json_object"),
]


@pytest.mark.parametrize("kwargs,needle", BAD, ids=[n for _, n in BAD])
def test_a_bad_schema_is_one_prompt_error_line_before_any_graph(pipe, monkeypatch, kwargs, needle):
    def no_graph(*a, **k):
        raise AssertionError("a graph ran for a request that should have been refused")

    monkeypatch.setattr(pipe.vision, "infer", no_graph)
    monkeypatch.setattr(pipe.llm, "forward", no_graph)
    for call in (lambda: pipe.chat(QUESTION, image=photo("coffee"), max_new_tokens=8, **kwargs),
                 lambda: next(iter(pipe.stream(QUESTION, image=photo("coffee"), **kwargs))),
                 lambda: SamplingParams.from_kwargs(**kwargs)):  # what the server builds a request from
        with pytest.raises(PromptError) as ei:
            call()
        msg = str(ei.value)
        assert needle.lower() in msg.lower() and "\n" not in msg, msg
    with pytest.raises(PromptError, match="unknown sampling parameter"):
        SamplingParams.from_kwargs(json_scheme=SCHEMA)


def test_unconstrained_decoding_never_looks_at_the_structure(pipe, monkeypatch):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"unconstrained decoding used the structured-output factory ({name})")

    monkeypatch.setattr(pipe.generator, "structured", Untouchable())
    r = pipe.chat(QUESTION, max_new_tokens=8, temperature=1.0, seed=0)
    tokens, _ = pipe.generator.greedy(pipe.llm.new_cache(), r.prompt_token_ids, n_tokens=4)
    assert r.token_ids and tokens


def test_ids_beyond_the_tokenizer_are_never_allowed(pipes):
    """A full-size random bundle's vocabulary (151,936) is larger than its tokenizer: the extra ids
    must be masked, even where they carry the largest logits."""
    pipe = pipes["static"]
    n_tok = pipe.prompts.tokenizer.get_vocab_size()
    padded = StructuredOutput(pipe.bundle.path(pipe.manifest.tokenizer.file), 151_936, [0, 2])
    c = padded.constraint(SamplingParams(json_object=True).validate())
    allowed = c.allowed()
    assert allowed.shape == (151_936,) and allowed[:n_tok].any() and not allowed[n_tok:].any()
    logits = np.zeros(151_936 + 7, np.float32)
    logits[n_tok:] = 100.0  # the padding ids would win
    out = c.apply(logits)
    assert out is logits and allowed[int(np.argmax(out))]
    assert np.isneginf(out[n_tok:]).all()
    frozen = np.zeros(151_936, np.float32)
    frozen.flags.writeable = False  # a backend's read-only output is masked on a copy
    assert allowed[int(np.argmax(c.apply(frozen)))]


def test_missing_llguidance_names_the_extra(monkeypatch, tmp_path, tiny_static_bundle, capsys):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # what an absent package raises on import
    schema = {"type": "object", "properties": {"only_here": {"type": "boolean"}}}  # not in the grammar cache
    with pytest.raises(MissingExtraError, match=r"flashvl-edge\[structured\]"):
        SamplingParams(json_schema=schema).validate()
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    assert main(["chat", str(tiny_static_bundle), "--prompt", "x", "--json-schema", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("flashvl chat: needs the 'structured' extra: pip install 'flashvl-edge[structured]' "
                   "(missing module: llguidance)")


# --------------------------------------------------------------------------------------------
# flashvl chat --json-schema / --json-object


def test_cli_json_schema_end_to_end(tiny_static_bundle, tmp_path, capsys):
    path = tmp_path / "person.json"
    path.write_text(json.dumps(SCHEMA))
    base = ["chat", str(tiny_static_bundle), "--prompt", QUESTION, "--max-new-tokens", str(MAX_NEW),
            "--temperature", "1", "--seed", "5"]
    assert main(base + ["--json-schema", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert _valid(out["text"]) and out["finish_reason"] == "stop"
    for seed in range(6):  # the first seed whose object ends within the budget (any object may run on)
        assert main(base[:-1] + [str(seed), "--json-object", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        if out["finish_reason"] == "stop":
            assert isinstance(json.loads(out["text"]), dict), out["text"]
            break
    else:
        pytest.fail("no --json-object answer ended within the budget")


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read --json-schema"),
    ("{not json", "is not JSON"),
    ("[1, 2]", "must hold a JSON Schema object"),
    ('{"type": "nope"}', "invalid or unsupported json_schema"),
], ids=["missing file", "not JSON", "not an object", "invalid schema"])
def test_cli_bad_schema_file_is_one_line_exit_2(tmp_path, capsys, content, needle):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    # checked before the bundle loads: the bundle path does not even exist
    rc = main(["chat", str(tmp_path / "no-bundle"), "--prompt", "x", "--json-schema", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_cli_json_schema_and_json_object_together_exit_2(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMA))
    rc = main(["chat", str(tmp_path), "--prompt", "x", "--json-schema", str(path), "--json-object"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not both" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------
# continuous batching


def test_scheduler_constrained_rows_equal_pipeline_chat(pipe):
    """Constrained and unconstrained rows in one batch: each gets exactly its answer alone."""
    coffee = photo("coffee")
    cases = [  # (question, images, sampling)
        (QUESTION, [], dict(json_schema=SCHEMA)),
        ("Describe the photo.", [coffee], dict(json_schema=SCHEMA)),
        ("Hi", [], dict()),  # unconstrained, in the same batch
        ("As an object?", [coffee], dict(json_object=True)),
        (QUESTION, [], dict(json_schema=SCHEMA, temperature=1.0, seed=4)),
    ]
    refs = []
    for q, images, sampling in cases:
        r = pipe.chat(q, images=images, max_new_tokens=MAX_NEW if sampling else 12, **sampling)
        refs.append(([t for t in r.token_ids if t not in pipe.generator.stop_token_ids], r))

    async def run():
        sched = Scheduler(pipe, max_batch=8).start()
        try:
            handles = []
            for q, images, sampling in cases:
                prepared = pipe.prepare_prompt([pipe.prompts.user_message(q, len(images))], images)
                params = SamplingParams(max_new_tokens=MAX_NEW if sampling else 12, **sampling).validate()
                handles.append(sched.submit(GenerationRequest(prepared, params)))
            return await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 120)
        finally:
            sched.shutdown(grace_s=5)

    out = asyncio.run(run())
    for (q, _, sampling), (tokens, text, finish), (ref_tokens, ref) in zip(cases, out, refs):
        assert tokens == ref_tokens, q
        assert text == ref.text and finish.finish_reason == ref.finish_reason, (text, ref.text)
        if "json_schema" in sampling:
            assert finish.finish_reason == "stop" and _valid(text), text
        elif sampling:  # any object: its keys may run past the budget
            assert text.lstrip().startswith("{")
            assert finish.finish_reason == "length" or isinstance(json.loads(text), dict)
