"""The Python API: load a bundle once, chat many times.

    from flashvl_edge.runtime import Pipeline
    pipe = Pipeline.from_bundle("bundles/fvl")
    print(pipe.chat("Describe the image.", image="photo.jpg").text)
    for piece in pipe.stream("And the colours?", image="photo.jpg"):
        print(piece, end="", flush=True)
    chat = pipe.session()                  # multi-turn: earlier turns stay in the KV cache
    chat.ask("What is in the picture?", image="photo.jpg")
    chat.ask("What colour is it?")         # prefills only this turn's tokens; no second vision run

One turn, in order: check the sampling parameters -> decode and preprocess the image
(``images.preprocess``: tiles, and how many image tokens they become) -> render the chat template and
expand the placeholder -> check the context length -> only then run the vision graph -> prefill and
decode (``generate.Generator``) -> text (``generate.TextAssembler``). Every user-fixable problem raises
a :class:`~flashvl_edge.runtime.errors.FlashVLError` before anything expensive runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .bundle import Bundle
from .contract import Manifest
from .errors import BundleError, ImageError, PromptError
from .generate import Generator, SamplingParams, TextAssembler
from .prompt import PromptBuilder, check_text


@dataclass
class ChatResult:
    """One reply and how it was made. Times are seconds; ``ttft_s`` runs from the call to the first
    generated token (image preprocessing, vision graph and prefill included)."""

    text: str
    token_ids: list[int]  # generated ids (a final stop/eos token included, as transformers returns it)
    prompt_token_ids: list[int]  # the whole conversation so far, image tokens expanded
    image_token_id: int
    n_image_tokens: int  # image tokens added by this turn
    vision_s: float  # image decode + preprocess + vision graph + ISS stitch
    ttft_s: float
    decode_tokens_per_s: float  # tokens after the first / time they took (0.0 when fewer than 2)
    prefill_tokens: int = 0  # tokens actually run in this turn's prefill (the rest were in the KV cache)
    prefill_s: float = 0.0
    n_tiles: int = 0
    finish_reason: str = "length"  # "stop" (eos / stop token / stop string) or "length"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrefillInputs:
    pixel_values: np.ndarray | None  # [num_tiles, 3, H, W] fed to the vision graph
    token_ids: list[int]  # the prompt, image placeholders expanded
    image_mask: list[bool]  # which positions of token_ids hold image embeddings
    image_embeds: np.ndarray | None  # [n_image_tokens, hidden], stitched
    inputs_embeds: np.ndarray  # [1, len(token_ids), hidden]


@dataclass
class _EncodedImage:
    n_tokens: int
    n_tiles: int
    embeds: np.ndarray | None = None  # [n_tokens, hidden] once the vision graph has run
    preprocessed: Any = None


class Pipeline:
    """A bundle loaded for chat: tokenizer, embedding table, vision and LLM runners (created once)."""

    def __init__(self, bundle: Bundle, vision, llm, prompts: PromptBuilder, embed_table: np.ndarray,
                 max_image_pixels: int | None = None, max_tiles: int | None = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.vision = vision
        self.llm = llm
        self.prompts = prompts
        self.preprocess_config = _preprocess_config(self.manifest, max_image_pixels)
        # An engine built for fewer tiles or a shorter context than the bundle allows lowers the
        # budget here, so a large photo gets fewer tiles and a long chat a clear refusal up front
        # instead of a shape error inside TensorRT.
        engine_tiles = vision.limits.max_tiles if vision.limits is not None else None
        if engine_tiles is not None and (max_tiles is None or max_tiles > engine_tiles):
            max_tiles = min(engine_tiles, self.preprocess_config.max_tiles)
        self.max_tiles = max_tiles
        gen = self.manifest.generation
        stop_ids = set(gen.eos_token_ids)
        for text in list(gen.stop_tokens) + ["<|im_end|>"]:
            tid = prompts.token_id(text)
            if tid is not None:
                stop_ids.add(tid)
        max_context = gen.max_context if llm.limits is None else min(gen.max_context, llm.limits.max_context)
        self.generator = Generator(llm, embed_table, prompts.image_token_id, frozenset(stop_ids), max_context)

    @classmethod
    def from_bundle(cls, path, backend: str = "ort", max_image_pixels: int | None = None,
                    max_tiles: int | None = None, verify: str = "cached", **backend_options) -> "Pipeline":
        """Load ``path`` (integrity-checked), open both graphs on ``backend`` ("ort" or "trt").

        ``max_image_pixels`` overrides the bundle's decode limit; ``max_tiles`` lowers its tile budget
        (dynamic bundles); ``backend_options`` go to the backend (ort: ``device``, ``threads``)."""
        from .backends import open_runners

        bundle = Bundle.load(path, verify=verify)
        prompts = PromptBuilder.from_bundle(bundle)
        emb = bundle.manifest.embeddings
        try:
            # rows are read only when gathered; a plain ndarray view of the map, since slicing an
            # np.memmap builds a memmap object per decoded token (~20 us of Python each)
            table = np.asarray(np.load(bundle.path(emb.file), mmap_mode="r"))
            _warm_page_cache(bundle.path(emb.file))
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read the embedding table ({e}); re-export the bundle") from None
        check_embedding_table(bundle.manifest, table)
        vision, llm = open_runners(bundle, backend, **backend_options)
        try:
            # Files can match their sha256 and still not belong together (copied from another bundle,
            # re-recorded by hand): refuse here, not with a shape error in the middle of a chat.
            check_graph_interface(bundle.manifest, "vision", vision)
            check_graph_interface(bundle.manifest, "llm", llm)
            check_table_fits_llm(bundle.manifest, table, llm)
        except BundleError:
            for runner in (vision, llm):
                runner.deactivate()
            raise
        return cls(bundle, vision, llm, prompts, table, max_image_pixels, max_tiles)

    # -- one-shot API ----------------------------------------------------------------------------
    def session(self, system: str | None = None) -> "ChatSession":
        return ChatSession(self, system)

    def chat(self, prompt: str, image=None, **sampling) -> ChatResult:
        """One question (optionally about one image) in a fresh conversation."""
        return self.session(sampling.pop("system", None)).ask(prompt, image, **sampling)

    def stream(self, prompt: str, image=None, **sampling) -> "ChatStream":
        """Like :meth:`chat`, yielding text pieces as they are decoded; ``.result`` at the end."""
        return self.session(sampling.pop("system", None)).stream(prompt, image, **sampling)

    def complete(self, prompt_token_ids: Sequence[int], image_embeds: np.ndarray | None = None,
                 image_mask: Sequence[bool] | None = None, **sampling) -> ChatResult:
        """Generate from raw token ids (no chat template): ``image_embeds`` [n, hidden] fill the
        positions in ``image_mask`` (default: every image-token id). For parity checks, calibration
        and benchmarks."""
        params = SamplingParams.from_kwargs(**sampling)
        ids = [int(i) for i in prompt_token_ids]
        if not ids:
            raise PromptError("prompt_token_ids is empty")
        cache = self.llm.new_cache()
        turn = _Turn(self, params, t0=time.perf_counter())
        turn.run(cache, ids, ids, image_embeds, n_image_tokens=len(image_embeds) if image_embeds is not None else 0,
                 image_mask=image_mask)
        return turn.result

    def prefill_inputs(self, prompt: str, image=None) -> "PrefillInputs":
        """What the LLM's first forward sees for a one-turn chat: the same steps as ``chat``, no
        generation. For calibration capture, verification and debugging."""
        enc = self.prepare_image(image) if image is not None else None
        used = [enc] if enc is not None else []
        text = self.prompts.render([self.prompts.user_message(prompt, len(used))], add_generation_prompt=True)
        ids, mask = self.prompts.encode_with_images(text, [im.n_tokens for im in used])
        self.generator.check_context(0, len(ids))
        pixels = enc.preprocessed.pixel_values if enc is not None else None
        image_embeds = self.encode_image(enc) if enc is not None else None
        return PrefillInputs(pixel_values=pixels, token_ids=ids, image_mask=mask, image_embeds=image_embeds,
                             inputs_embeds=self.generator.embed(ids, image_embeds, image_mask=mask))

    # -- images ------------------------------------------------------------------------------
    def prepare_image(self, image) -> _EncodedImage:
        """Decode and preprocess (cheap, host side): how many tokens the image will take."""
        from . import images

        pre = images.preprocess(images.load_image(image, self.preprocess_config.max_image_pixels),
                                self.preprocess_config, max_tiles=self.max_tiles)
        return _EncodedImage(int(pre.n_image_tokens), int(pre.pixel_values.shape[0]), preprocessed=pre)

    def encode_image(self, enc: _EncodedImage) -> np.ndarray:
        """Run the vision graph on the tiles and stitch them: [n_image_tokens, hidden]."""
        pre = enc.preprocessed
        out = self.vision.infer({"pixel_values": pre.pixel_values.astype(self._vision_dtype(), copy=False)})
        embeds = np.asarray(pre.select_tokens(out["image_embeds"]))
        if embeds.shape[0] != enc.n_tokens:
            raise BundleError(f"the vision graph gave {embeds.shape[0]} image tokens, preprocessing "
                              f"expected {enc.n_tokens}; the bundle's manifest and graph disagree")
        enc.embeds, enc.preprocessed = embeds, None
        return embeds

    def _vision_dtype(self):
        meta = self.vision.get_input_metadata().get("pixel_values")
        return meta.dtype if meta is not None else np.float32

    def close(self) -> None:
        for r in (self.vision, self.llm):
            r.deactivate()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_REEXPORT = "the bundle's files do not belong together: re-export the bundle"


def _static(dim) -> int | None:
    """A fixed dimension (int >= 0), or None for a symbolic/dynamic one ("seq", None, -1 in TensorRT)."""
    return int(dim) if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 0 else None


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_graph_interface(manifest: Manifest, graph: str, runner) -> None:
    """The graph the backend opened has the inputs/outputs the manifest declares (names, ranks and
    every fixed dimension); raises one BundleError listing the differences."""
    spec = manifest.graph(graph)
    where = f"the {graph} graph {spec.file}"
    problems = []
    for kind, actual, declared in (("input", runner.get_input_metadata(), spec.inputs),
                                   ("output", runner.get_output_metadata(), spec.outputs)):
        for t in declared:
            name, want = t.name, t.shape
            if name not in actual:
                problems.append(f"no {kind} {name!r}")
                continue
            got = tuple(actual[name].shape)
            if len(got) != len(want) or any(
                    _static(a) is not None and _static(b) is not None and _static(a) != _static(b)
                    for a, b in zip(got, want)):
                problems.append(f"{kind} {name} {_shape_str(got)} (manifest: {_shape_str(want)})")
    if problems:
        shown = "; ".join(problems[:4]) + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
        raise BundleError(f"{where} does not match manifest.json: {shown}; {_REEXPORT}")


def check_embedding_table(manifest: Manifest, table: np.ndarray) -> None:
    """The table file has the shape the manifest declares ([vocab_size, hidden_size]: the contract
    checked that the declaration agrees with the LLM section)."""
    name = manifest.embeddings.file
    if table.ndim != 2 or tuple(table.shape) != tuple(manifest.embeddings.shape):
        raise BundleError(f"the embedding table {name} has shape {_shape_str(table.shape)}, manifest.json "
                          f"declares {_shape_str(manifest.embeddings.shape)}; {_REEXPORT}")


def check_table_fits_llm(manifest: Manifest, table: np.ndarray, llm) -> None:
    """Every id the LLM can produce has a row, and rows are as wide as the LLM's inputs_embeds."""
    name = manifest.embeddings.file
    inputs, outputs = llm.get_input_metadata(), llm.get_output_metadata()
    width = _static(inputs["inputs_embeds"].shape[-1]) if "inputs_embeds" in inputs else None
    if width is not None and table.shape[1] != width:
        raise BundleError(f"the embedding table {name} has rows of width {table.shape[1]}, the LLM graph takes "
                          f"inputs_embeds of width {width}; {_REEXPORT}")
    vocab = _static(outputs["logits"].shape[-1]) if "logits" in outputs else None
    if vocab is not None and table.shape[0] < vocab:
        raise BundleError(f"the embedding table {name} has {table.shape[0]} rows, the LLM graph produces "
                          f"{vocab} logits (token ids up to {vocab - 1}); {_REEXPORT}")


def _warm_page_cache(path) -> None:
    """Read the embedding table file once, sequentially, in a background thread.

    The table is memory-mapped so that it costs no RSS; but then, on a cold page cache, gathering
    each new token's row is a random disk read (about 5 ms per decoded token measured on the
    full-size bundle, more than all other host work per token). One sequential pass (about 1 s for
    the 0.9 GB table) puts the file in the page cache while the graphs load; the pages are mapped into
    the process only when gathered, so RSS does not grow by the table's size.
    """
    import threading

    def read_through() -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(8 << 20)
                while f.readinto(buf):
                    pass
        except OSError:
            pass  # only a warm-up: gathers still work from disk

    threading.Thread(target=read_through, name="flashvl-embed-warmup", daemon=True).start()


def _preprocess_config(manifest: Manifest, max_image_pixels: int | None):
    import dataclasses

    from .images import PreprocessConfig

    cfg = PreprocessConfig.from_manifest(manifest)
    if max_image_pixels is not None:
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ImageError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
        cfg = dataclasses.replace(cfg, max_image_pixels=max_image_pixels)
    return cfg


class _Turn:
    """Prefill + decode for one turn, with its timings; fills ``self.result``."""

    def __init__(self, pipe: Pipeline, params: SamplingParams, t0: float) -> None:
        self.pipe, self.params, self.t0 = pipe, params, t0
        self.vision_s = 0.0
        self.n_tiles = 0
        self.result: ChatResult | None = None
        self.generated: list[int] = []

    def stream(self, cache, new_ids: list[int], all_ids: list[int], image_embeds, n_image_tokens: int,
               seen_ids: Sequence[int] = (), image_mask: Sequence[bool] | None = None) -> Iterator[str]:
        gen = self.pipe.generator
        text = TextAssembler(self.pipe.prompts.decode, self.params.stop)
        stop_ids = frozenset() if self.params.ignore_eos else gen.stop_token_ids
        prefill_start = time.perf_counter()
        t_first = t_last = None
        finish = "length"
        tokens = gen.generate(cache, new_ids, image_embeds, self.params, seen_ids=seen_ids, image_mask=image_mask)
        try:
            for token in tokens:
                t_last = time.perf_counter()
                if t_first is None:
                    t_first = t_last
                self.generated.append(token)
                if token in stop_ids:
                    finish = "stop"
                    break
                piece = text.push(token)
                if text.stopped:
                    finish = "stop"
                if piece:
                    yield piece
                if text.stopped:
                    break
            tail = text.finish()
            if tail:
                yield tail
        finally:
            tokens.close()
        n = len(self.generated)
        self.result = ChatResult(
            text=text.text,
            token_ids=list(self.generated),
            prompt_token_ids=list(all_ids),
            image_token_id=gen.image_token_id,
            n_image_tokens=n_image_tokens,
            vision_s=self.vision_s,
            ttft_s=(t_first - self.t0) if t_first else 0.0,
            decode_tokens_per_s=((n - 1) / (t_last - t_first)) if n > 1 and t_last > t_first else 0.0,
            prefill_tokens=len(new_ids),
            prefill_s=(t_first - prefill_start) if t_first else 0.0,
            n_tiles=self.n_tiles,
            finish_reason=finish,
        )

    def run(self, *args, **kwargs) -> None:
        for _ in self.stream(*args, **kwargs):
            pass


class ChatStream:
    """Iterate for text pieces; ``result`` (a :class:`ChatResult`) is set once iteration ends."""

    def __init__(self, pieces: Iterator[str], turn_holder: list) -> None:
        self._pieces = pieces
        self._holder = turn_holder

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    @property
    def result(self) -> ChatResult:
        turn = self._holder[0] if self._holder else None
        if turn is None or turn.result is None:
            raise RuntimeError("the stream has not finished; iterate over it first")
        return turn.result


class ChatSession:
    """A multi-turn conversation whose earlier turns stay in the LLM's KV cache.

    A follow-up renders the conversation with the chat template and feeds the LLM only the text the
    template appends after the previous reply (end of the assistant turn, the new user turn, the
    generation prompt). Earlier images are not re-encoded. If the template is not append-only (it
    rewrites earlier turns), the session re-prefills the whole conversation from its stored image
    embeddings instead: slower, still exact.

    The conversation as the model saw it is ``token_ids`` (what is in the cache) plus the last
    sampled token, which is fed at the start of the next turn.
    """

    def __init__(self, pipe: Pipeline, system: str | None = None) -> None:
        self.pipe = pipe
        if system is not None and not isinstance(system, str):
            raise PromptError(f"the system message must be text, got {type(system).__name__}")
        self.messages: list[dict] = [{"role": "system", "content": check_text(system, "system message")}] \
            if system else []
        self.cache = pipe.llm.new_cache()
        self.token_ids: list[int] = []  # ids in the KV cache, in order
        self.image_mask: list[bool] = []  # which of them are image positions
        self.pending: list[int] = []  # sampled last turn, not yet fed to the model
        self.images: list[_EncodedImage] = []
        self.rendered = ""  # the template text the cache corresponds to (prompt + reply so far)

    def ask(self, prompt: str, image=None, **sampling) -> ChatResult:
        stream = self.stream(prompt, image, **sampling)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str, image=None, **sampling) -> ChatStream:
        holder: list = []
        return ChatStream(self._turn(prompt, image, sampling, holder), holder)

    def _turn(self, prompt: str, image, sampling: dict, holder: list) -> Iterator[str]:
        pipe = self.pipe
        t0 = time.perf_counter()
        params = SamplingParams.from_kwargs(**sampling)
        turn = _Turn(pipe, params, t0)
        holder.append(turn)

        new_images: list[_EncodedImage] = []
        if image is not None:
            t = time.perf_counter()
            new_images.append(pipe.prepare_image(image))
            turn.vision_s += time.perf_counter() - t
        user = pipe.prompts.user_message(prompt, len(new_images))
        messages = self.messages + [user]
        full_text = pipe.prompts.render(messages, add_generation_prompt=True)

        # What to prefill: only the appended text when the cache holds a prefix of the conversation.
        reuse = bool(self.token_ids or self.pending) and full_text.startswith(self.rendered)
        if reuse:
            ids, mask = pipe.prompts.encode_with_images(full_text[len(self.rendered):],
                                                        [im.n_tokens for im in new_images])
            new_ids, new_mask = self.pending + ids, [False] * len(self.pending) + mask
            history, history_mask = list(self.token_ids), list(self.image_mask)
            cache = self.cache
        else:
            new_ids, new_mask = pipe.prompts.encode_with_images(
                full_text, [im.n_tokens for im in self.images + new_images])
            history, history_mask = [], []
            cache = pipe.llm.new_cache()
        pipe.generator.check_context(len(history), len(new_ids))  # before the vision graph runs

        if new_images:
            t = time.perf_counter()
            for im in new_images:
                pipe.encode_image(im)
            turn.vision_s += time.perf_counter() - t
        turn.n_tiles = sum(im.n_tiles for im in new_images)
        used = new_images if reuse else self.images + new_images
        embeds = np.concatenate([im.embeds for im in used]) if used else None

        try:
            yield from turn.stream(cache, new_ids, history + new_ids, embeds,
                                   n_image_tokens=sum(im.n_tokens for im in new_images),
                                   seen_ids=history, image_mask=new_mask)
        finally:
            if turn.result is None and cache is self.cache and cache.length != len(history):
                # abandoned or failed mid-turn after the cache grew: forget the cache, keep the
                # conversation, so the next turn re-prefills it (exact, just slower)
                self.cache, self.token_ids, self.image_mask, self.pending = pipe.llm.new_cache(), [], [], []

        # The turn is complete: remember what the cache now holds.
        res = turn.result
        generated = res.token_ids
        self.cache = cache
        self.token_ids = history + new_ids + generated[:-1]
        self.image_mask = history_mask + new_mask + [False] * len(generated[:-1])
        self.pending = generated[-1:]
        stopped_on_token = bool(generated) and generated[-1] in pipe.generator.stop_token_ids \
            and not params.ignore_eos
        self.images += new_images
        # The template text for the cached conversation: the reply as the template will render it.
        # After a stop token the template's own end-of-turn text re-encodes it (pending is dropped).
        reply = {"role": "assistant", "content": res.text}
        self.messages = messages + [reply]
        with_reply = pipe.prompts.render(self.messages, add_generation_prompt=False)
        prefix = full_text + res.text
        if stopped_on_token and with_reply.startswith(prefix):
            self.pending = []
            self.rendered = prefix
        else:
            # stopped by length or a stop string: the cache + pending hold tokens beyond what the
            # template knows, so the next turn must re-prefill from the rendered conversation
            self.rendered = prefix if res.finish_reason == "length" and with_reply.startswith(prefix) \
                else "\0never-a-prefix"
