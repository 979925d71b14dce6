"""``flashvl chat``: ask a bundle about images, once (``--prompt``) or interactively (stdin lines).

    flashvl chat bundles/fvl --image photo.jpg --prompt "Describe the image."
    flashvl chat bundles/fvl --image photo.jpg --prompt "Describe the image." --json
    flashvl chat bundles/fvl --image a.jpg --image b.jpg --prompt "What differs?"
    flashvl chat bundles/fvl --image photo.jpg          # multi-turn; /image PATH, /reset, /exit
    flashvl chat bundles/fvl --image photo.jpg --prompt "Who is it?" --json-schema person.json

Several ``--image`` flags send several images with the question, in order: one ``<image>``
placeholder each in the prompt where it goes, or none, and then the images come first.

The answer goes to stdout, timings to stderr (so ``> answer.txt`` keeps only the answer); ``--json``
prints one JSON object per answer on stdout instead. Interactive mode reads one question per line and
works the same when stdin is a pipe. ``--json-schema FILE`` makes every answer JSON valid against the
schema in FILE, ``--json-object`` any JSON object (runtime/structured.py; the 'structured' extra).
Never imports torch.
"""

from __future__ import annotations

import json
import sys

from .errors import FlashVLError, PromptError, one_line


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle directory written by 'flashvl export'")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="image file to ask about (repeatable, in order; first turn in interactive mode)")
    p.add_argument("--prompt", help="the question; without it, read questions from stdin (multi-turn)")
    p.add_argument("--system", help="system message (default: the chat template's own)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="at most this many tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the answer contains TEXT (repeatable; TEXT is not printed)")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain every answer to JSON valid against the JSON Schema in FILE")
    p.add_argument("--json-object", action="store_true", help="constrain every answer to a JSON object")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer (text, token ids, timings)")
    p.add_argument("--backend", choices=["ort", "trt"], default="ort",
                   help="ort = ONNX Runtime (default); trt = TensorRT engines from 'flashvl build'")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="ONNX Runtime device (auto: CUDA when onnxruntime-gpu is installed)")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="refuse images with more pixels than this (default: the bundle's limit)")
    p.add_argument("--max-tiles", type=int, default=None, help="lower the tile budget of a dynamic bundle")
    p.add_argument("--max-images", type=int, default=8, help="at most this many images per question (default 8)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill prompts in chunks ending at multiples of N positions (default 64, as 'flashvl "
                        "serve': the same value gives the same answers)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="as 'flashvl serve --batch-invariant': the answer a batch-invariant server gives")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                json_schema=getattr(args, "schema", None), json_object=getattr(args, "json_object", False))


def _load_schema(path: str | None) -> dict | None:
    """The JSON Schema in ``path`` (read once, before the bundle loads), or None."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise PromptError(f"cannot read --json-schema {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise PromptError(f"--json-schema {path} is not JSON ({one_line(str(e))})") from None
    if not isinstance(schema, dict):
        raise PromptError(f"--json-schema {path} must hold a JSON Schema object, not a JSON {type(schema).__name__}")
    return schema


def _metrics_line(r) -> str:
    return (f"[{len(r.token_ids)} tokens, {r.finish_reason} | vision {r.vision_s * 1e3:.1f} ms | "
            f"TTFT {r.ttft_s * 1e3:.1f} ms | decode {r.decode_tokens_per_s:.1f} tokens/s | "
            f"{r.n_image_tokens} image tokens]")


def _answer(turn_stream, args):
    """Run one turn from a ChatStream, printing as asked; returns the ChatResult."""
    if args.stream and not args.json:
        for piece in turn_stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        result = turn_stream.result
    else:
        for _ in turn_stream:
            pass
        result = turn_stream.result
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            print(result.text)
    if not args.json:
        print(_metrics_line(result), file=sys.stderr)
    sys.stdout.flush()
    return result


def _read_line() -> str:
    """One stdin line; bytes that do not decode become surrogate escapes (refused per question by the
    prompt check, one error line) instead of a UnicodeDecodeError that would end the session."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text-only stream (e.g. io.StringIO)
        return sys.stdin.readline()
    return raw.readline().decode(sys.stdin.encoding or "utf-8", "surrogateescape")


def _interactive(pipe, args) -> int:
    tty = sys.stdin.isatty()
    if tty:
        print("flashvl chat: one question per line; /image PATH attaches an image to the next question "
              "(repeat for several; /image alone drops them), /reset starts over, /exit quits", file=sys.stderr)
    session = pipe.session(args.system)
    images = list(args.image or [])
    failed = False
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = _read_line()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session, images = pipe.session(args.system), []
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            images = images + [path] if path else []
            continue
        try:
            _answer(session.stream(line, images=images, **_sampling(args)), args)
            images = []
        except FlashVLError as err:  # one bad question does not end the session
            print(f"flashvl: error: {one_line(str(err))}", file=sys.stderr)
            failed = True
    return 2 if failed else 0


def run(args) -> int:
    from .generate import SamplingParams
    from .pipeline import Pipeline

    if args.stream and args.json:
        raise FlashVLError("--stream and --json cannot be combined: --json prints one object per answer")
    args.schema = _load_schema(args.json_schema)
    params = SamplingParams(**_sampling(args)).validate()  # bad flags and schemas fail before the bundle loads
    options = {"device": args.device} if args.backend == "ort" else {}
    pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, max_image_pixels=args.max_image_pixels,
                                max_tiles=args.max_tiles, max_images=args.max_images,
                                prefill_chunk=args.prefill_chunk, batch_invariant=args.batch_invariant, **options)
    try:
        if params.constrained:
            from .structured import StructuredOutput

            StructuredOutput.for_pipeline(pipe)  # the generator's constraint factory for this bundle
        if args.prompt is None:
            return _interactive(pipe, args)
        _answer(pipe.session(args.system).stream(args.prompt, images=args.image or [], **_sampling(args)), args)
        return 0
    finally:
        pipe.close()
