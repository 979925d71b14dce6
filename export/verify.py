"""Parity between a bundle's ONNX graphs (run in ONNX Runtime) and the PyTorch model it came from.

Four checks, each printed as one line:

* vision: a real photo (skimage's astronaut) preprocessed as the runtime does, through ``vision.onnx`` and
  through ``get_image_features``; max abs error relative to the output's scale (max abs of the reference);
* llm: the same ``inputs_embeds`` (text + the reference image embeddings) through a prefill plus 8 decode
  steps in both, the decode tokens fed identically to both; max relative logits error over all steps;
* greedy / generate: the ONNX graphs alone in a manual decode loop (embedding gather, image splice, KV cache
  fed back), starting from the ONNX vision output: 32 argmax steps against transformers' decoder (greedy),
  and a generation that stops at the bundle's eos tokens against the model's ``reference_generate``
  (transformers ``generate``, generate). A divergence at a numerical tie (the reference's own top-2 logits closer than the
  tolerance) is reported as such, not as a failure: no export can be asked to break exact ties identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from flashvl_edge.runtime.bundle import Bundle, empty_past
from flashvl_edge.runtime.errors import BundleError

if TYPE_CHECKING:
    from flashvl_edge.export.model import LoadedModel

# Max abs error relative to the reference output's max abs value.
THRESHOLDS = {"fp32": 1e-4, "fp16": 2e-2}
PROMPT = "Describe this image in detail."


# --------------------------------------------------------------------------------------------
# The ONNX side


class OrtGraphs:
    """The bundle's two graphs in ONNX Runtime (CPU), plus the embedding table, as the runtime uses them."""

    def __init__(self, bundle: Bundle):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.vision_session = ort.InferenceSession(str(bundle.graph_path("vision")), opts, providers=["CPUExecutionProvider"])
        self.llm_session = ort.InferenceSession(str(bundle.graph_path("llm")), opts, providers=["CPUExecutionProvider"])
        self.embed_tokens = np.load(bundle.path(self.manifest["embeddings"]["file"]), mmap_mode="r")
        llm = self.manifest["graphs"]["llm"]
        self.float_dtype = np.dtype(llm["inputs"][0]["dtype"])
        self.past_inputs = [t for t in llm["inputs"] if t["name"].startswith("past_key_values.")]
        self.output_names = [t["name"] for t in llm["outputs"]]

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        name = self.manifest["graphs"]["vision"]["inputs"][0]["name"]
        return self.vision_session.run(None, {name: pixel_values.astype(self.float_dtype)})[0]

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        return empty_past(self.manifest, batch)

    def llm(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.llm_session.run(None, feed)))

    def step(self, inputs_embeds: np.ndarray, past: dict[str, np.ndarray], past_len: int):
        """One forward (prefill when ``past_len`` is 0): returns last-position logits and the new past."""
        batch, seq = inputs_embeds.shape[:2]
        feed = {
            "inputs_embeds": inputs_embeds.astype(self.float_dtype),
            "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
            "position_ids": np.tile(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, 1)),
            **past,
        }
        out = self.llm(feed)
        new_past = {t["name"]: out[t["name"].replace("past_key_values.", "present.", 1)] for t in self.past_inputs}
        return out["logits"][:, -1, :].astype(np.float32), new_past

    def embed(self, input_ids: np.ndarray, image_embeds: np.ndarray | None, image_token_id: int) -> np.ndarray:
        """Token embeddings gathered from the table, image embeddings spliced in at the image tokens."""
        embeds = np.asarray(self.embed_tokens[input_ids], dtype=np.float32)
        if image_embeds is not None:
            positions = np.flatnonzero(input_ids == image_token_id)
            if len(positions) != len(image_embeds):
                raise ValueError(f"{len(positions)} image tokens for {len(image_embeds)} image embeddings")
            embeds[positions] = image_embeds
        return embeds

    def greedy(self, input_ids: np.ndarray, image_embeds: np.ndarray | None, image_token_id: int,
               max_new_tokens: int, eos_token_ids: tuple[int, ...] = ()) -> list[int]:
        """The manual decode loop: prefill (past = 0), then one token at a time through the KV cache."""
        embeds = self.embed(input_ids, image_embeds, image_token_id)[None]
        logits, past = self.step(embeds, self.empty_past(), 0)
        length = embeds.shape[1]
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[0]))
            tokens.append(token)
            if token in eos_token_ids:
                break
            logits, past = self.step(self.embed(np.array([token]), None, image_token_id)[None], past, length)
            length += 1
        return tokens


# --------------------------------------------------------------------------------------------
# Inputs: a real photo and a prompt with its image tokens


def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def preprocess_photo(manifest: dict[str, Any], image: np.ndarray):
    """pixel_values [tiles,3,H,W] and a function mapping vision output to the image-token embeddings.

    Uses the runtime's preprocessing (the exact path a bundle runs in production) when it is present;
    otherwise a single-tile CLIP-style resize + normalise from the manifest's preprocess section.
    """
    try:
        from flashvl_edge.runtime import images
    except ImportError:
        images = None
    if images is not None and hasattr(images, "preprocess"):
        pre = images.preprocess(image, manifest)
        return np.asarray(pre.pixel_values, dtype=np.float32), pre.select_tokens
    from PIL import Image

    pp = manifest["preprocess"]
    size = int(pp.get("image_size") or manifest["vision"]["image_size"])
    resample = getattr(Image.Resampling, str(pp.get("resample") or "bicubic").upper(), Image.Resampling.BICUBIC)
    arr = np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), resample), dtype=np.float32)
    arr = arr * float(pp.get("rescale_factor") or 1 / 255)
    arr = (arr - np.asarray(pp.get("image_mean") or [0.5] * 3, np.float32)) / np.asarray(pp.get("image_std") or [0.5] * 3, np.float32)
    return arr.transpose(2, 0, 1)[None].copy(), lambda e: np.asarray(e).reshape(-1, np.asarray(e).shape[-1])


def prompt_ids(bundle: Bundle, n_image_tokens: int) -> np.ndarray:
    """Text tokens around ``n_image_tokens`` image tokens (plus the family's start/end tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle.path(bundle.manifest["tokenizer"]["file"])))
    image = bundle.manifest["image"]
    image_id = int(image["image_token_id"])
    ids = []
    if image.get("start_token"):
        ids.append(tok.token_to_id(image["start_token"]))
    ids += [image_id] * n_image_tokens
    if image.get("end_token"):
        ids.append(tok.token_to_id(image["end_token"]))
    ids += tok.encode(PROMPT, add_special_tokens=False).ids
    return np.asarray([i for i in ids if i is not None], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The torch side


def torch_decode(vlm, inputs_embeds: np.ndarray, steps: int, forced: list[int] | None = None):
    """Reference decode through transformers' Qwen2 with a ``DynamicCache``.

    Prefills ``inputs_embeds``, then takes ``steps`` greedy steps (or feeds ``forced`` tokens instead).
    Returns (tokens, last-position logits of the prefill and of every step).
    """
    import torch
    from transformers.cache_utils import DynamicCache

    tokens: list[int] = []
    logits: list[np.ndarray] = []
    with torch.no_grad():
        cache = DynamicCache(config=vlm.text_config)
        x = torch.from_numpy(np.ascontiguousarray(inputs_embeds, dtype=np.float32))[None]
        length = 0
        for step in range(steps + 1):
            seq = x.shape[1]
            out = vlm.text_model(inputs_embeds=x, attention_mask=torch.ones(1, length + seq, dtype=torch.long),
                                 position_ids=torch.arange(length, length + seq)[None], past_key_values=cache,
                                 use_cache=True)
            cache = out.past_key_values
            logits.append(vlm.lm_head(out.last_hidden_state[:, -1]).float().numpy()[0])
            length += seq
            if step == steps:
                break
            token = forced[step] if forced is not None else int(np.argmax(logits[-1]))
            tokens.append(token)
            x = vlm.get_input_embeddings()(torch.tensor([[token]]))
    return tokens, logits


def torch_embeds(vlm, input_ids: np.ndarray, image_embeds: np.ndarray, image_token_id: int) -> np.ndarray:
    """inputs_embeds from the model's own embedding module, image embeddings spliced in, in order."""
    import torch

    with torch.no_grad():
        embeds = vlm.get_input_embeddings()(torch.from_numpy(input_ids)).float().numpy().copy()
    embeds[input_ids == image_token_id] = image_embeds
    return embeds


def relative_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs error, that divided by the reference's max abs value)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err, err / max(scale, 1e-12)


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name:<8} {self.detail}"


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    ort_tokens: list[int] = field(default_factory=list)
    ref_tokens: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]


def greedy_agreement(name: str, ort_tokens: list[int], ref_tokens: list[int], tie_gap=None) -> Check:
    """Compare token lists; ``tie_gap(step)`` says whether the reference has a numerical tie at a step."""
    n = min(len(ort_tokens), len(ref_tokens))
    first = next((i for i in range(n) if ort_tokens[i] != ref_tokens[i]), None)
    if first is None and len(ort_tokens) == len(ref_tokens):
        return Check(name, True, f"{n}/{len(ref_tokens)} tokens identical")
    if first is None:
        return Check(name, False, f"{len(ort_tokens)} tokens from ONNX vs {len(ref_tokens)} from the reference")
    if tie_gap is not None and tie_gap(first):
        return Check(name, True, f"{first}/{len(ref_tokens)} tokens identical, then a numerical tie "
                                 f"(reference top-2 logits within tolerance) at step {first}")
    return Check(name, False, f"tokens differ from step {first} of {len(ref_tokens)}: "
                              f"ONNX {ort_tokens[first]} vs reference {ref_tokens[first]}")


# The dims that decide whether a bundle's graphs can even be run against a model (section -> keys).
# Different weights with the same dims are for the parity checks to catch; different dims are refused
# up front, before torch runs the model on inputs shaped for the bundle.
IDENTITY_DIMS = {
    "vision": ("model_type", "image_size", "patch_size", "hidden_size", "num_layers", "tokens_per_tile"),
    "llm": ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size"),
    "image": ("image_token_id",),
}


def check_exported_from(manifest: dict[str, Any], loaded: "LoadedModel", model_name: str = "this model") -> None:
    """Raise BundleError when the bundle's declared dims are not the model's (it cannot be its export)."""
    ours = loaded.manifest_sections
    differences = []
    if manifest.get("family") and ours.get("family") and manifest["family"] != ours["family"]:
        differences.append(f"family {manifest['family']!r} vs {ours['family']!r}")
    for section, keys in IDENTITY_DIMS.items():
        declared, actual = manifest.get(section), ours.get(section)
        if not isinstance(declared, dict) or not isinstance(actual, dict):
            continue
        for key in keys:
            a, b = declared.get(key), actual.get(key)
            if a is not None and b is not None and a != b:
                differences.append(f"{section}.{key} {a!r} vs {b!r}")
    if differences:
        shown = "; ".join(differences[:6]) + (f" (+{len(differences) - 6} more)" if len(differences) > 6 else "")
        raise BundleError(
            f"the bundle was not exported from {model_name} (bundle vs model: {shown}); "
            "pass the model the bundle was exported from to --against"
        )


def verify_against(bundle_path, loaded: "LoadedModel", greedy_steps: int = 32, decode_steps: int = 8,
                   graphs: OrtGraphs | None = None, image: np.ndarray | None = None,
                   model_name: str = "this model") -> Report:
    """Run all three checks; ``graphs`` lets a caller substitute the ONNX side (tests break it on purpose)."""
    import torch

    bundle = Bundle.load(bundle_path)
    manifest = bundle.manifest
    check_exported_from(manifest, loaded, model_name)
    dtype = manifest.get("dtype", "fp32")
    tol = THRESHOLDS.get(dtype, THRESHOLDS["fp16"])
    graphs = graphs or OrtGraphs(bundle)
    vlm = loaded.model.eval()
    image_token_id = int(manifest["image"]["image_token_id"])
    if getattr(vlm, "image_token_id", image_token_id) != image_token_id:
        raise BundleError(f"the bundle's image token id {image_token_id} differs from the model's "
                          f"{vlm.image_token_id}: this bundle was not exported from this model")
    report = Report()

    # vision
    pixel_values, select_tokens = preprocess_photo(manifest, photo() if image is None else image)
    with torch.no_grad():
        ref_vision = vlm.get_image_features(torch.from_numpy(pixel_values)).float().numpy()
    ort_vision = graphs.vision(pixel_values).astype(np.float32)
    if ort_vision.shape != ref_vision.shape:
        report.checks.append(Check("vision", False, f"shape {list(ort_vision.shape)} vs reference {list(ref_vision.shape)}"))
        return report
    err, rel = relative_error(ort_vision, ref_vision)
    report.checks.append(Check("vision", rel <= tol, f"max abs err {err:.3g} = {rel:.3g} of output scale "
                                                     f"(limit {tol:g}); {pixel_values.shape[0]} tile(s)"))

    # llm: same inputs_embeds, prefill + decode steps, tokens chosen by the reference, fed to both
    ref_image_tokens = np.asarray(select_tokens(ref_vision), np.float32)
    input_ids = prompt_ids(bundle, len(ref_image_tokens))
    # Each side builds its own inputs_embeds: torch from the model's embedding module, ONNX from the
    # bundle's embedding table, so the table and the splice are checked too.
    embeds = torch_embeds(vlm, input_ids, ref_image_tokens, image_token_id)
    ort_embeds = graphs.embed(input_ids, ref_image_tokens, image_token_id)
    decode_tokens, ref_logits = torch_decode(vlm, embeds, decode_steps)
    ort_logits = []
    logits, past = graphs.step(ort_embeds[None], graphs.empty_past(), 0)
    ort_logits.append(logits[0])
    length = len(embeds)
    for token in decode_tokens:
        logits, past = graphs.step(graphs.embed(np.array([token]), None, image_token_id)[None], past, length)
        ort_logits.append(logits[0])
        length += 1
    err, rel = relative_error(np.stack(ort_logits), np.stack(ref_logits))
    report.checks.append(Check("llm", rel <= tol, f"max abs err {err:.3g} = {rel:.3g} of logits scale (limit {tol:g}); "
                                                  f"prefill of {len(embeds)} + {decode_steps} decode steps"))

    # The ONNX graphs end to end (their own vision output, embedding gather, splice, KV cache fed back):
    # greedy: `greedy_steps` argmax steps, no stopping, against transformers' decoder step by step;
    # generate: stopping at the bundle's eos tokens, against transformers' generate().
    eos = [int(t) for t in (manifest.get("generation") or {}).get("eos_token_ids") or ()]
    ort_image_tokens = np.asarray(select_tokens(ort_vision), np.float32)
    report.ort_tokens = graphs.greedy(input_ids, ort_image_tokens, image_token_id, greedy_steps)
    report.ref_tokens, _ = torch_decode(vlm, embeds, greedy_steps)

    def tie(ref_tokens: list[int], ort_tokens: list[int]):
        def is_tie(step: int) -> bool:
            logits = torch_decode(vlm, embeds, step, forced=ref_tokens[:step])[1][-1]
            gap = logits[ref_tokens[step]] - logits[ort_tokens[step]]
            return 0 <= gap <= tol * float(np.max(np.abs(logits)))
        return is_tie

    report.checks.append(greedy_agreement("greedy", report.ort_tokens, report.ref_tokens,
                                          tie(report.ref_tokens, report.ort_tokens)))
    ort_gen = graphs.greedy(input_ids, ort_image_tokens, image_token_id, greedy_steps, tuple(eos))
    with torch.no_grad():
        ref_gen = [int(t) for t in vlm.reference_generate(torch.from_numpy(input_ids)[None],
                                                          torch.from_numpy(ref_image_tokens), greedy_steps,
                                                          eos_token_ids=eos or None)]
    report.checks.append(greedy_agreement("generate", ort_gen, ref_gen, tie(ref_gen, ort_gen)))
    return report
