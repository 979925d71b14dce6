"""The Python API: load a bundle once, chat many times.

    from flashvl_edge.runtime import Pipeline
    pipe = Pipeline.from_bundle("bundles/fvl")
    print(pipe.chat("Describe the image.", image="photo.jpg").text)
    print(pipe.chat("What differs?", images=["a.jpg", "b.jpg"]).text)   # one placeholder per image
    for piece in pipe.stream("And the colours?", image="photo.jpg"):
        print(piece, end="", flush=True)
    chat = pipe.session()                  # multi-turn: earlier turns stay in the KV cache
    chat.ask("What is in the picture?", image="photo.jpg")
    chat.ask("What colour is it?")         # prefills only this turn's tokens; no second vision run

One turn, in order: check the sampling parameters and the number of images -> decode and preprocess
the images (``images.preprocess`` per image: its own tile grid, and how many image tokens it becomes)
-> render the chat template and expand one placeholder per image -> check the context length -> only
then run the vision graph, every new tile of every image in as few runs as the graph allows
(:meth:`Pipeline.encode_images`) -> prefill and decode (``generate.Generator``) -> text
(``generate.TextAssembler``). Every user-fixable problem raises a
:class:`~flashvl_edge.runtime.errors.FlashVLError` before anything expensive runs.

A server that already has the whole conversation uses the same steps in two calls:
:meth:`Pipeline.prepare_prompt` (host work and every check) then :meth:`Pipeline.encode_prompt_images`
(the vision graph), and feeds the result to the generator.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .backends.base import KVCache
from .bundle import Bundle
from .cache import (DEFAULT_IMAGE_CACHE_BYTES, DEFAULT_KV_CACHE_BYTES, ImageEmbeddingCache, PrefixKVCache, block_keys,
                    image_key, join_blocks)
from .contract import Manifest
from .errors import BundleError, ImageError, PromptError
from .generate import Generator, SamplingParams
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
    cached_tokens: int = 0  # of those in the KV cache, how many came from the prefix cache (other requests)
    prefill_s: float = 0.0
    n_tiles: int = 0
    finish_reason: str = "length"  # "stop" (eos / stop token / stop string) or "length"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrefillInputs:
    pixel_values: np.ndarray | None  # [num_tiles, 3, H, W]: every image's tiles, in prompt order
    token_ids: list[int]  # the prompt, image placeholders expanded
    image_mask: list[bool]  # which positions of token_ids hold image embeddings
    image_embeds: np.ndarray | None  # [n_image_tokens, hidden], stitched
    inputs_embeds: np.ndarray  # [1, len(token_ids), hidden]


@dataclass
class _EncodedImage:
    n_tokens: int
    n_tiles: int
    embeds: np.ndarray | None = None  # [n_tokens, hidden] once the vision graph has run
    preprocessed: Any = None  # images.PreprocessedImage until then (dropped after, to free the pixels)
    key: bytes = b""  # content address: decoded pixels + everything that changes the embeddings


@dataclass
class PreparedPrompt:
    """A request after the cheap host work and every check (:meth:`Pipeline.prepare_prompt`): ready
    for the vision graph (:meth:`Pipeline.encode_prompt_images`) and then the LLM's prefill."""

    token_ids: list[int]  # the prompt, each placeholder expanded to its image's positions
    image_mask: list[bool]  # which positions of token_ids take image embeddings
    images: list[_EncodedImage]  # one per placeholder, in prompt order
    n_image_tokens: int  # image positions in token_ids (sum of the images' tokens)
    n_tiles: int  # vision-graph tiles of those images
    # the request's cache salt (vLLM's ``cache_salt``): prompts with different salts never share
    # prefix KV or image embeddings (runtime/cache.py ``salted``); b"" shares with every unsalted one
    cache_salt: bytes = b""


DEFAULT_MAX_IMAGES = 8
_ROLES = ("system", "user", "assistant")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ImageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _image_sources(image, images) -> list:
    """The images of one request from the ``image=`` (one) and ``images=`` (a list) keywords."""
    if images is None:
        return [] if image is None else [image]
    if image is not None:
        raise PromptError("pass either image= (one image) or images= (a list of images), not both")
    if not isinstance(images, (list, tuple)):
        raise PromptError(f"images must be a list of images, got a {type(images).__name__}; "
                          "for one image pass image= or images=[image]")
    return list(images)


class Pipeline:
    """A bundle loaded for chat: tokenizer, embedding table, vision and LLM runners (created once)."""

    def __init__(self, bundle: Bundle, vision, llm, prompts: PromptBuilder, embed_table: np.ndarray,
                 max_image_pixels: int | None = None, max_tiles: int | None = None,
                 max_images: int = DEFAULT_MAX_IMAGES, max_vision_batch: int | None = None,
                 image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
                 prefill_chunk: int | None = None, batch_invariant: bool = False) -> None:
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
        self.max_images = _positive_int(max_images, "max_images")
        # Tiles per vision-graph run. An engine takes at most the tiles it was built for (its
        # max_tiles counts crop tiles; the thumbnail comes on top); ONNX Runtime takes any batch, so
        # every tile of a request goes in one run unless the caller bounds it (memory).
        pre = self.manifest.preprocess
        if vision.limits is not None:
            per_run = pre.vision_batch(vision.limits.max_tiles)
        else:
            per_run = pre.vision_batch() * self.max_images
        if max_vision_batch is not None:
            per_run = min(per_run, _positive_int(max_vision_batch, "max_vision_batch"))
        self.max_vision_batch = per_run
        gen = self.manifest.generation
        stop_ids = set(gen.eos_token_ids)
        for text in list(gen.stop_tokens) + ["<|im_end|>"]:
            tid = prompts.token_id(text)
            if tid is not None:
                stop_ids.add(tid)
        max_context = gen.max_context if llm.limits is None else min(gen.max_context, llm.limits.max_context)
        if prefill_chunk is not None:
            _positive_int(prefill_chunk, "prefill_chunk")
        self.generator = Generator(llm, embed_table, prompts.image_token_id, frozenset(stop_ids), max_context,
                                   prefill_chunk=prefill_chunk, batch_invariant=bool(batch_invariant))
        # structured output (json_schema / json_object); cheap: llguidance loads on first constrained use
        from .structured import StructuredOutput

        self.generator.structured = StructuredOutput.from_bundle(bundle, self.generator.stop_token_ids)
        # Reuse across requests (runtime/cache.py). The salts hold everything besides the content
        # that changes what is cached: the graphs' file hashes, the preprocessing, the tile budget.
        files = self.manifest.files
        vision_file, llm_file = self.manifest.graph("vision").file, self.manifest.graph("llm").file
        self._image_salt = hashlib.sha256(repr((files[vision_file].sha256 if vision_file in files else vision_file,
                                                self.preprocess_config, self.max_tiles)).encode()).digest()
        self._prefix_salt = hashlib.sha256(repr((files[llm_file].sha256 if llm_file in files else llm_file,
                                                 self._image_salt)).encode()).digest()
        self.image_cache = ImageEmbeddingCache(image_cache_bytes)
        self.prefix_cache = PrefixKVCache(kv_cache_bytes if llm.supports_cache_arrays else 0)

    @classmethod
    def from_bundle(cls, path, backend: str = "ort", max_image_pixels: int | None = None,
                    max_tiles: int | None = None, verify: str = "cached", max_images: int = DEFAULT_MAX_IMAGES,
                    max_vision_batch: int | None = None, image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES,
                    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, prefill_chunk: int | None = None,
                    batch_invariant: bool = False, **backend_options) -> "Pipeline":
        """Load ``path`` (integrity-checked), open both graphs on ``backend`` ("ort" or "trt").

        ``max_image_pixels`` overrides the bundle's decode limit; ``max_tiles`` lowers its tile budget
        per image (dynamic bundles); ``max_images`` caps the images of one request (default 8);
        ``max_vision_batch`` caps the tiles of one vision-graph run (default: an engine's limit, or
        every tile of a request at once on ONNX Runtime); ``image_cache_bytes`` / ``kv_cache_bytes``
        bound the image-embedding and prompt-prefix KV caches (0 disables one; runtime/cache.py);
        ``prefill_chunk``: prompts are prefilled in chunks ending at multiples of this many positions
        (runtime/core.py; the server uses the same, so answers agree); ``batch_invariant``: no LLM run has
        fewer than two rows, so quantized graphs give a row the same result alone and in a batch;
        ``backend_options`` go to the backend (ort: ``device``, ``threads``)."""
        from .backends import open_runners

        _positive_int(max_images, "max_images")  # a bad option fails before the graphs load
        if max_vision_batch is not None:
            _positive_int(max_vision_batch, "max_vision_batch")
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
        try:
            return cls(bundle, vision, llm, prompts, table, max_image_pixels, max_tiles, max_images,
                       max_vision_batch, image_cache_bytes, kv_cache_bytes, prefill_chunk, batch_invariant)
        except Exception:
            for runner in (vision, llm):
                runner.deactivate()
            raise

    # -- one-shot API ----------------------------------------------------------------------------
    def session(self, system: str | None = None) -> "ChatSession":
        return ChatSession(self, system)

    def chat(self, prompt: str, image=None, *, images: Sequence | None = None, **sampling) -> ChatResult:
        """One question in a fresh conversation, about no image, one (``image=``) or several
        (``images=[...]``, one placeholder each: see :meth:`ChatSession.ask`)."""
        return self.session(sampling.pop("system", None)).ask(prompt, image, images=images, **sampling)

    def stream(self, prompt: str, image=None, *, images: Sequence | None = None, **sampling) -> "ChatStream":
        """Like :meth:`chat`, yielding text pieces as they are decoded; ``.result`` at the end."""
        return self.session(sampling.pop("system", None)).stream(prompt, image, images=images, **sampling)

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

    def prefill_inputs(self, prompt: str, image=None, *, images: Sequence | None = None) -> "PrefillInputs":
        """What the LLM's first forward sees for a one-turn chat: the same steps as ``chat``, no
        generation. For calibration capture, verification and debugging."""
        sources = _image_sources(image, images)
        self.check_image_count(len(sources))
        # the pixels are part of the answer here, so a cached image is decoded and preprocessed again
        prepared = self.prepare_prompt([self.prompts.user_message(prompt, len(sources))], sources, use_cache=False)
        tiles = [im.preprocessed.pixel_values for im in prepared.images]
        pixels = (tiles[0] if len(tiles) == 1 else np.concatenate(tiles)) if tiles else None
        image_embeds = self.encode_prompt_images(prepared)
        return PrefillInputs(pixel_values=pixels, token_ids=prepared.token_ids, image_mask=prepared.image_mask,
                             image_embeds=image_embeds,
                             inputs_embeds=self.generator.embed(prepared.token_ids, image_embeds,
                                                                image_mask=prepared.image_mask))

    # -- a whole conversation at once (the server) ---------------------------------------------
    def prepare_prompt(self, messages: Sequence[Mapping[str, str]], images: Sequence = (), *,
                       add_generation_prompt: bool = True, use_cache: bool = True,
                       cache_salt: bytes = b"") -> PreparedPrompt:
        """Everything before the vision graph for a conversation given whole, with every check.

        ``messages``: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]`` (other keys
        are ignored), where the user contents already hold one ``self.prompts.placeholder`` per image,
        at the image's place in the text. An OpenAI-style content list ``[image, text]`` reduces to
        ``placeholder + "\\n" + text``, which is exactly what ``chat(text, image=...)`` renders.
        ``images``: the images in placeholder order (anything ``images.load_image`` takes).

        Checks the number of images (``max_images``) and placeholders before decoding anything, then
        decodes and preprocesses the images (host work, each its own tile grid), renders the chat
        template, expands the placeholders and checks the context; raises PromptError / ImageError
        before any graph runs. :meth:`encode_prompt_images` then runs the vision graph.

        ``cache_salt``: requests with different salts never share prefix KV or image embeddings
        (vLLM's ``cache_salt``; the server's per-API-key default). Message contents are tokenized
        as plain text: a user's ``<|im_end|>`` never becomes the control token (runtime/prompt.py)."""
        images = _image_sources(None, images)
        self.check_image_count(len(images))
        if isinstance(cache_salt, str):
            cache_salt = cache_salt.encode("utf-8")
        if not isinstance(cache_salt, (bytes, bytearray)):
            raise PromptError(f"cache_salt must be bytes or text, got a {type(cache_salt).__name__}")
        clean = self._check_messages(messages, len(images))
        text = self.prompts.render(clean, add_generation_prompt=add_generation_prompt)
        encoded = []
        for i, image in enumerate(images):
            try:
                encoded.append(self.prepare_image(image, use_cache, cache_salt=bytes(cache_salt)))
            except ImageError as e:
                if len(images) == 1:
                    raise
                raise ImageError(f"image {i + 1} of {len(images)}: {e}") from None
        prepared = self._expand(text, encoded)
        prepared.cache_salt = bytes(cache_salt)
        return prepared

    def encode_prompt_images(self, prepared: PreparedPrompt) -> np.ndarray | None:
        """Run the vision graph on the prompt's images not encoded yet (:meth:`encode_images`) and
        return every image's embeddings concatenated in prompt order, [n_image_tokens, hidden];
        None for a prompt without images."""
        if not prepared.images:
            return None
        self.encode_images(prepared.images)
        embeds = [im.embeds for im in prepared.images]
        return embeds[0] if len(embeds) == 1 else np.concatenate(embeds)

    # -- prefill with prefix reuse --------------------------------------------------------------
    def prefix_keys(self, token_ids: Sequence[int], image_mask: Sequence[bool],
                    images: Sequence[_EncodedImage], cache_salt: bytes = b"") -> list[bytes]:
        """The prompt's block keys (runtime/cache.py): image positions are tagged with their image's
        content address and index, so two images behind the same token ids never share KV; the
        chain starts from the bundle's salt mixed with ``cache_salt``, so two salts never share a block."""
        if not self.prefix_cache.enabled:
            return []
        from .cache import salted

        tags: list[bytes | None] = [None] * len(token_ids)
        positions = [i for i, m in enumerate(image_mask) if m]
        k = 0
        for im in images:
            for j in range(im.n_tokens):
                tags[positions[k]] = im.key + j.to_bytes(4, "little")
                k += 1
        return block_keys(token_ids, tags, salted(self._prefix_salt, cache_salt), self.prefix_cache.block)

    def reuse_prefix(self, prepared: PreparedPrompt) -> tuple[KVCache, int, list[bytes]]:
        """A cache holding the longest cached prefix of the prompt (at least one token is left to
        prefill, whose logits start the answer), its length, and the prompt's block keys."""
        keys = self.prefix_keys(prepared.token_ids, prepared.image_mask, prepared.images, prepared.cache_salt)
        blocks = self.prefix_cache.longest(keys, (len(prepared.token_ids) - 1) // self.prefix_cache.block) \
            if keys else []
        if not blocks:
            return self.llm.new_cache(), 0, keys
        hit = len(blocks) * self.prefix_cache.block
        return self.llm.cache_from_arrays(join_blocks(blocks), hit), hit, keys

    def embeds_after(self, prepared: PreparedPrompt, cached: int) -> np.ndarray | None:
        """Embeddings of the image positions after the first ``cached`` prompt positions, running the
        vision graph only for images that have positions there."""
        before = sum(prepared.image_mask[:cached])
        needed, start, offset = [], 0, 0
        for im in prepared.images:  # images in prompt order; positions offset .. offset + n_tokens
            if offset + im.n_tokens > before:
                start = offset if not needed else start
                needed.append(im)
            offset += im.n_tokens
        if not needed:
            return None
        self.encode_images(needed)
        embeds = np.concatenate([im.embeds for im in needed]) if len(needed) > 1 else needed[0].embeds
        return embeds[before - start:]

    def remember_prefix(self, keys: list[bytes], cache: KVCache, cached: int) -> None:
        """Store the prompt's full blocks beyond the ``cached`` ones from ``cache`` (which holds the
        prompt as its first positions)."""
        first = cached // self.prefix_cache.block
        if keys and first < len(keys):
            self.prefix_cache.store(keys, self.llm.cache_arrays(cache), first_block=first)

    def check_image_count(self, n_images: int) -> None:
        """PromptError when one request brings more images than ``max_images``."""
        if n_images > self.max_images:
            raise PromptError(f"{n_images} images were given but a request takes at most {self.max_images}; "
                              f"send {n_images - self.max_images} fewer, or load the pipeline with a larger "
                              "max_images (flashvl chat --max-images)")

    def _check_messages(self, messages, n_images: int) -> list[dict]:
        """The messages as the template gets them (role and content only), or one PromptError."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        placeholder = self.prompts.placeholder
        clean, found = [], 0
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, Mapping) else None
            content = m.get("content") if isinstance(m, Mapping) else None
            if role not in _ROLES or not isinstance(content, str):
                raise PromptError(f"message {i} must be a dict with role 'system', 'user' or 'assistant' "
                                  "and text content")
            check_text(content, f"{role} message")
            if role != "user" and placeholder in content:
                raise PromptError(f"the {role} message {i} contains the image placeholder {placeholder!r}; "
                                  "only user messages can hold images")
            found += content.count(placeholder)
            clean.append({"role": role, "content": content})
        if found != n_images:
            raise PromptError(f"the user messages contain {found} {placeholder!r} placeholder(s) but {n_images} "
                              "image(s) were given; put one placeholder per image where it goes in the text")
        return clean

    def _expand(self, text: str, images: list[_EncodedImage], cached: int = 0,
                prefix_ids: Sequence[int] = ()) -> PreparedPrompt:
        """Rendered ``text`` -> ids with each placeholder expanded to its image's positions, after
        ``prefix_ids`` (tokens to feed before it), checked to fit on top of ``cached`` tokens."""
        ids, mask = self.prompts.encode_with_images(text, [im.n_tokens for im in images])
        if prefix_ids:
            ids, mask = list(prefix_ids) + ids, [False] * len(prefix_ids) + mask
        self.generator.check_context(cached, len(ids))
        return PreparedPrompt(ids, mask, list(images), sum(im.n_tokens for im in images),
                              sum(im.n_tiles for im in images))

    # -- images ------------------------------------------------------------------------------
    def prepare_image(self, image, use_cache: bool = True, cache_salt: bytes = b"") -> _EncodedImage:
        """Decode and preprocess (cheap, host side): how many tokens the image will take. An image
        whose embeddings are cached (same pixels, same bundle and preprocessing, same ``cache_salt``)
        skips preprocessing and, later, the vision graph. Decoding is bounded by the pixel limit and
        ``self.decode_limits`` when set (``images.DecodeLimits``: bytes, formats, concurrent decodes;
        the server sets them)."""
        from . import images
        from .cache import salted

        decoded = images.load_image(image, self.preprocess_config.max_image_pixels,
                                    getattr(self, "decode_limits", None))
        # the content address costs a pass over the pixels: only when a cache will use it
        reuse = self.image_cache.enabled or self.prefix_cache.enabled
        key = image_key(np.asarray(decoded), salted(self._image_salt, cache_salt)) if reuse else b""
        hit = self.image_cache.get_image(key) if use_cache and reuse else None
        if hit is not None:
            return _EncodedImage(hit.n_tokens, hit.n_tiles, embeds=hit.embeds, key=key)
        pre = images.preprocess(decoded, self.preprocess_config, max_tiles=self.max_tiles)
        return _EncodedImage(int(pre.n_image_tokens), int(pre.pixel_values.shape[0]), preprocessed=pre, key=key)

    def prepare_images(self, images: Sequence, use_cache: bool = True) -> list[_EncodedImage]:
        """:meth:`prepare_image` for each of one request's images (at most ``max_images``); an image
        that cannot be read is named by its place in the list."""
        self.check_image_count(len(images))
        if len(images) == 1:
            return [self.prepare_image(images[0], use_cache)]
        out = []
        for i, image in enumerate(images):
            try:
                out.append(self.prepare_image(image, use_cache))
            except ImageError as e:
                raise ImageError(f"image {i + 1} of {len(images)}: {e}") from None
        return out

    def encode_image(self, enc: _EncodedImage) -> np.ndarray:
        """Run the vision graph on one image's tiles and stitch them: [n_image_tokens, hidden]."""
        self.encode_images([enc])
        return enc.embeds

    def encode_images(self, encs: Sequence[_EncodedImage]) -> None:
        """Run the vision graph on every tile of the images not encoded yet, in runs of at most
        ``max_vision_batch`` tiles (one run when they fit), then give each image its own tokens
        (``select_tokens``: its ISS stitch) in ``enc.embeds``. Tiles are encoded independently, so
        how they are grouped into runs does not change the result."""
        todo = [e for e in encs if e.embeds is None]
        if not todo:
            return
        dtype = self._vision_dtype()
        outputs = [self._run_vision(chunk.astype(dtype, copy=False))
                   for chunk in _chunks([e.preprocessed.pixel_values for e in todo], self.max_vision_batch)]
        out = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        start = 0
        for e in todo:
            embeds = np.asarray(e.preprocessed.select_tokens(out[start:start + e.n_tiles]))
            start += e.n_tiles
            if embeds.shape[0] != e.n_tokens:
                raise BundleError(f"the vision graph gave {embeds.shape[0]} image tokens, preprocessing "
                                  f"expected {e.n_tokens}; the bundle's manifest and graph disagree")
            e.embeds, e.preprocessed = embeds, None
            self.image_cache.put_image(e.key, embeds, e.n_tiles)

    def _run_vision(self, pixel_values: np.ndarray) -> np.ndarray:
        out = np.asarray(self.vision.infer({"pixel_values": pixel_values})["image_embeds"])
        if out.ndim != 3 or out.shape[0] != pixel_values.shape[0]:
            raise BundleError(f"the vision graph returned image embeddings of shape {tuple(out.shape)} for "
                              f"{pixel_values.shape[0]} tiles; the bundle is inconsistent, re-export it")
        return out

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


def _chunks(arrays: list[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The rows of ``arrays`` (concatenated along axis 0) in pieces of at most ``size`` rows, copying
    only where a piece spans several arrays (no copy of the whole when one array fits a run)."""
    parts: list[np.ndarray] = []
    n = 0
    for a in arrays:
        while len(a):
            take = min(size - n, len(a))
            parts.append(a[:take])
            a, n = a[take:], n + take
            if n == size:
                yield parts[0] if len(parts) == 1 else np.concatenate(parts)
                parts, n = [], 0
    if parts:
        yield parts[0] if len(parts) == 1 else np.concatenate(parts)


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
        """Prefill ``new_ids`` on ``cache`` and decode through the step core (one row), yielding text."""
        from .core import Sequence as Row

        gen = self.pipe.generator
        seq = Row(self.params, prompt_ids=new_ids, image_mask=gen.image_positions(new_ids, image_embeds, image_mask),
                  image_embeds=image_embeds, cache=cache, seen=seen_ids, decode=self.pipe.prompts.decode)
        seq.keep_cache = True  # a session's next turn builds on it
        for e in gen.core().run(seq):
            if e.text:
                yield e.text
        self.generated = list(seq.generated)
        n = len(self.generated)
        t_first, t_last = seq.first_token_time, seq.last_token_time
        self.result = ChatResult(
            text=seq.text.text,
            token_ids=list(self.generated),
            prompt_token_ids=list(all_ids),
            image_token_id=gen.image_token_id,
            n_image_tokens=n_image_tokens,
            vision_s=self.vision_s,
            ttft_s=(t_first - self.t0) if t_first else 0.0,
            decode_tokens_per_s=((n - 1) / (t_last - t_first)) if n > 1 and t_last > t_first else 0.0,
            prefill_tokens=len(new_ids),
            prefill_s=(t_first - seq.prefill_start) if t_first and seq.prefill_start else 0.0,
            n_tiles=self.n_tiles,
            finish_reason=seq.finish_reason,
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

    def ask(self, prompt: str, image=None, *, images: Sequence | None = None, **sampling) -> ChatResult:
        """One turn. ``image=`` attaches one image, ``images=[...]`` several (at most the pipeline's
        ``max_images``); the prompt holds one placeholder per image where each goes, or none, and
        then the images go first, in order. Earlier turns' images stay in the conversation."""
        stream = self.stream(prompt, image, images=images, **sampling)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str, image=None, *, images: Sequence | None = None, **sampling) -> ChatStream:
        """Like :meth:`ask`, yielding text pieces as they are decoded; ``.result`` at the end."""
        holder: list = []
        return ChatStream(self._turn(prompt, image, images, sampling, holder), holder)

    def _turn(self, prompt: str, image, images, sampling: dict, holder: list) -> Iterator[str]:
        pipe = self.pipe
        t0 = time.perf_counter()
        params = SamplingParams.from_kwargs(**sampling)
        turn = _Turn(pipe, params, t0)
        holder.append(turn)

        sources = _image_sources(image, images)
        pipe.check_image_count(len(sources))
        user = pipe.prompts.user_message(prompt, len(sources))  # placeholder errors before any decode
        new_images: list[_EncodedImage] = []
        if sources:
            t = time.perf_counter()
            new_images = pipe.prepare_images(sources)
            turn.vision_s += time.perf_counter() - t
        messages = self.messages + [user]
        full_text = pipe.prompts.render(messages, add_generation_prompt=True)

        # What to prefill: only the appended text when the cache holds a prefix of the conversation;
        # else the whole conversation, earlier images from their stored embeddings. Either way the
        # context is checked here, before the vision graph runs.
        reuse = bool(self.token_ids or self.pending) and full_text.startswith(self.rendered)
        if reuse:
            prepared = pipe._expand(full_text[len(self.rendered):], new_images, cached=len(self.token_ids),
                                    prefix_ids=self.pending)
            history, history_mask = list(self.token_ids), list(self.image_mask)
            cache, cached, keys = self.cache, 0, []
        else:
            prepared = pipe._expand(full_text, self.images + new_images)
            history, history_mask = [], []
            # another request may have left this prompt's prefix in the prefix cache
            cache, cached, keys = pipe.reuse_prefix(prepared)
        new_ids, new_mask = prepared.token_ids, prepared.image_mask

        t = time.perf_counter()
        embeds = pipe.embeds_after(prepared, cached)  # runs the graph for new, not cached images only
        if new_images:
            turn.vision_s += time.perf_counter() - t
        turn.n_tiles = sum(im.n_tiles for im in new_images)

        try:
            yield from turn.stream(cache, new_ids[cached:], history + new_ids, embeds,
                                   n_image_tokens=sum(im.n_tokens for im in new_images),
                                   seen_ids=history + new_ids[:cached], image_mask=new_mask[cached:])
        finally:
            if turn.result is None and cache is self.cache and cache.length != len(history):
                # abandoned or failed mid-turn after the cache grew: forget the cache, keep the
                # conversation, so the next turn re-prefills it (exact, just slower)
                self.cache, self.token_ids, self.image_mask, self.pending = pipe.llm.new_cache(), [], [], []

        # The turn is complete: remember what the cache now holds.
        res = turn.result
        res.cached_tokens = cached
        pipe.remember_prefix(keys, cache, cached)  # the prompt is the cache's first positions
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
