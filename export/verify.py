"""Parity between a bundle's ONNX graphs, run by the runtime as ``flashvl chat`` runs them, and the PyTorch
model they came from.

The ONNX side is a :class:`~flashvl_edge.runtime.pipeline.Pipeline` on ONNX Runtime (CPU): its vision
runner, its prompt rendering and embedding (``Pipeline.prefill_inputs``: chat template, placeholder
expansion, embedding gather from the bundle's table, image splice) and its ``Generator`` (the prefill and
decode step ``generate`` runs). The reference side is torch: the model's embedding module and decoder.
Four checks, each printed as one line:

* vision: a real photo (skimage's astronaut) preprocessed as the runtime does, through the vision runner and
  through ``get_image_features``; max abs error relative to the output's scale (max abs of the reference);
* llm: the chat prompt with the *reference* image embeddings spliced in (each side with its own embedding
  code) through a prefill plus 8 decode steps (``Generator.teacher_forced``), the decode tokens chosen by the
  reference and fed identically to both; max relative logits error over all steps;
* greedy / generate: the runtime alone, from its own vision output: ``Generator.greedy`` for 32 argmax steps
  against transformers' decoder (greedy), and ``Pipeline.complete`` (the ``generate`` loop of chat) stopping
  at the bundle's stop tokens against the model's ``reference_generate`` (transformers ``generate``). A
  divergence at a numerical tie (the reference's own top-2 logits closer than the tolerance) is reported as
  such, not as a failure: no export can be asked to break exact ties identically.

The report also says which vision features the bundle was exported with (``vision_feature_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from flashvl_edge.runtime.bundle import Bundle
from flashvl_edge.runtime.contract import Manifest
from flashvl_edge.runtime.errors import BundleError

if TYPE_CHECKING:
    from flashvl_edge.export.families import LoadedModel
    from flashvl_edge.runtime.pipeline import Pipeline

# Max abs error relative to the reference output's max abs value.
THRESHOLDS = {"fp32": 1e-4, "fp16": 2e-2}
PROMPT = "Describe this image in detail."


# --------------------------------------------------------------------------------------------
# Which vision features the bundle was exported with


def vision_features_line(manifest) -> str:
    """Which output of the vision tower feeds the adapter, from the manifest's ``vision_feature_layer``:
    -1 is transformers' ``last_hidden_state`` (final norm included), any other k is ``hidden_states[k]``."""
    return f"vision features: {manifest.vision.feature_convention}"


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


def torch_embeds(vlm, input_ids, image_embeds: np.ndarray, image_mask) -> np.ndarray:
    """inputs_embeds from the model's own embedding module, image embeddings spliced in, in order, at
    the positions of ``image_mask``."""
    import torch

    ids = np.asarray(input_ids, np.int64)
    mask = np.asarray(image_mask, bool)
    with torch.no_grad():
        embeds = vlm.get_input_embeddings()(torch.from_numpy(np.where(mask, 0, ids))).float().numpy().copy()
    embeds[mask] = image_embeds
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
    notes: list[str] = field(default_factory=list)  # what was checked with what (printed first)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        return list(self.notes) + [c.line() for c in self.checks]


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


def check_exported_from(manifest: Manifest, loaded: "LoadedModel", model_name: str = "this model") -> None:
    """Raise BundleError when the bundle's declared dims are not the model's (it cannot be its export).
    The model side is the sections its family would write (JSON), the bundle side the typed manifest."""
    ours = loaded.manifest_sections
    differences = []
    if ours.get("family") and manifest.family != ours["family"]:
        differences.append(f"family {manifest.family!r} vs {ours['family']!r}")
    for section, keys in IDENTITY_DIMS.items():
        declared, actual = getattr(manifest, section), ours.get(section)
        if not isinstance(actual, dict):
            continue
        for key in keys:
            a, b = getattr(declared, key), actual.get(key)
            if a is not None and b is not None and a != b:
                differences.append(f"{section}.{key} {a!r} vs {b!r}")
    if differences:
        shown = "; ".join(differences[:6]) + (f" (+{len(differences) - 6} more)" if len(differences) > 6 else "")
        raise BundleError(
            f"the bundle was not exported from {model_name} (bundle vs model: {shown}); "
            "pass the model the bundle was exported from to --against"
        )


def verify_against(bundle_path, loaded: "LoadedModel", greedy_steps: int = 32, decode_steps: int = 8,
                   pipeline: "Pipeline | None" = None, image=None,
                   model_name: str = "this model") -> Report:
    """Run all four checks on ``image`` (anything the runtime loads; default the astronaut test photo).
    ``pipeline`` substitutes the runtime side (tests break its runner or generator on purpose); by
    default the bundle is opened as ``flashvl chat`` opens it, on ONNX Runtime (CPU)."""
    from flashvl_edge.runtime.pipeline import Pipeline
    from flashvl_edge.runtime.samples import test_photo

    bundle = Bundle.load(bundle_path)
    manifest = bundle.manifest
    check_exported_from(manifest, loaded, model_name)
    vlm = loaded.model.eval()
    image_token_id = manifest.image.image_token_id
    if getattr(vlm, "image_token_id", image_token_id) != image_token_id:
        raise BundleError(f"the bundle's image token id {image_token_id} differs from the model's "
                          f"{vlm.image_token_id}: this bundle was not exported from this model")
    pipe = pipeline or Pipeline.from_bundle(bundle_path, backend="ort", device="cpu", image_cache_bytes=0,
                                            kv_cache_bytes=0)
    try:
        return _checks(pipe, manifest, vlm, greedy_steps, decode_steps, test_photo() if image is None else image)
    finally:
        if pipeline is None:
            pipe.close()


def _checks(pipe, manifest, vlm, greedy_steps: int, decode_steps: int, image) -> Report:
    import torch

    tol = THRESHOLDS.get(manifest.dtype, THRESHOLDS["fp16"])
    gen = pipe.generator
    report = Report(notes=[vision_features_line(manifest)])

    # vision: the runtime's preprocessing of the photo, through both
    pre = pipe.prepare_image(image).preprocessed
    pixel_values = np.asarray(pre.pixel_values, np.float32)
    with torch.no_grad():
        ref_vision = vlm.get_image_features(torch.from_numpy(pixel_values)).float().numpy()
    vision_dtype = pipe.vision.get_input_metadata()["pixel_values"].dtype
    ort_vision = np.asarray(pipe.vision.infer({"pixel_values": pixel_values.astype(vision_dtype)})["image_embeds"],
                            np.float32)
    if ort_vision.shape != ref_vision.shape:
        report.checks.append(Check("vision", False, f"shape {list(ort_vision.shape)} vs reference {list(ref_vision.shape)}"))
        return report
    err, rel = relative_error(ort_vision, ref_vision)
    report.checks.append(Check("vision", rel <= tol, f"max abs err {err:.3g} = {rel:.3g} of output scale "
                                                     f"(limit {tol:g}); {pixel_values.shape[0]} tile(s)"))

    # llm: the chat prompt with the reference image embeddings, prefill + decode steps, tokens chosen by
    # the reference and fed to both. Each side builds its own inputs_embeds: torch from the model's
    # embedding module, the runtime from the bundle's table, so the table and the splice are checked too.
    inputs = pipe.prefill_inputs(PROMPT, image)  # as chat builds them (its vision output spliced in)
    ids, mask = inputs.token_ids, inputs.image_mask
    ref_image_tokens = np.asarray(pre.select_tokens(ref_vision), np.float32)
    embeds = torch_embeds(vlm, ids, ref_image_tokens, mask)
    decode_tokens, ref_logits = torch_decode(vlm, embeds, decode_steps)
    ort_logits = gen.teacher_forced(gen.llm.new_cache(), ids, ref_image_tokens, mask, decode_tokens)
    err, rel = relative_error(ort_logits, np.stack(ref_logits))
    report.checks.append(Check("llm", rel <= tol, f"max abs err {err:.3g} = {rel:.3g} of logits scale (limit {tol:g}); "
                                                  f"prefill of {len(embeds)} + {decode_steps} decode steps"))

    # The runtime end to end, from its own vision output:
    # greedy: `greedy_steps` argmax steps, no stopping, against transformers' decoder step by step;
    # generate: chat's generate loop stopping at the bundle's stop tokens, against transformers' generate().
    report.ort_tokens, _ = gen.greedy(gen.llm.new_cache(), ids, inputs.image_embeds, mask,
                                      n_tokens=greedy_steps, stop=False)
    report.ref_tokens, _ = torch_decode(vlm, embeds, greedy_steps)

    def tie(ref_tokens: list[int], ort_tokens: list[int]):
        def is_tie(step: int) -> bool:
            logits = torch_decode(vlm, embeds, step, forced=ref_tokens[:step])[1][-1]
            gap = logits[ref_tokens[step]] - logits[ort_tokens[step]]
            return 0 <= gap <= tol * float(np.max(np.abs(logits)))
        return is_tie

    report.checks.append(greedy_agreement("greedy", report.ort_tokens, report.ref_tokens,
                                          tie(report.ref_tokens, report.ort_tokens)))
    ort_gen = pipe.complete(ids, inputs.image_embeds, mask, max_new_tokens=greedy_steps, temperature=0.0).token_ids
    stop_ids = sorted(gen.stop_token_ids)
    with torch.no_grad():
        ref_gen = [int(t) for t in vlm.reference_generate(torch.tensor([ids]), torch.from_numpy(ref_image_tokens),
                                                          greedy_steps, eos_token_ids=stop_ids or None)]
    report.checks.append(greedy_agreement("generate", ort_gen, ref_gen, tie(ref_gen, ort_gen)))
    return report
