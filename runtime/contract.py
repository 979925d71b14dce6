"""The bundle contract: ``manifest.json`` as typed, frozen sections, validated once.

Every stage passes a bundle to the next through its manifest and nothing else. Export builds a
:class:`Manifest` and writes it with :meth:`Manifest.to_json`; every reader gets one from
:meth:`Manifest.from_json`, which checks all of it at load (types, ranges, cross-section consistency,
that every named file stays inside the bundle and is listed in ``files``), so the code that uses a
field never re-checks or re-derives it. The graph interfaces (:class:`TensorSpec`, :class:`GraphIO`),
the KV-cache names, the feeds built from the declared inputs, the tile/thumbnail rule and the
context default live here too, because the exporter and the runtime must agree on them exactly.

The schema is documented field by field in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, Mapping

from .errors import BundleError

SCHEMA_VERSION = 2
REEXPORT = "re-export the bundle"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
GRAPH_NAMES = ("vision", "llm")
FLOAT_DTYPES = ("fp32", "fp16")
PREPROCESS_MODES = ("clip", "tiles")
RESAMPLE_NAMES = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")
DIM_NAMES = ("num_tiles", "batch", "seq", "past", "total")


# What a reader may rely on in each part of a manifest, written into every manifest as "trust" (for
# the person who receives a bundle; the loader never reads it back: a manifest cannot raise its own
# trust). The manifest itself is not signed: whoever hands over a bundle controls all of it, so
# compare manifest.json's sha256 with its publisher's; the files are then bound to it by their hashes.
# docs/security.md ("Untrusted bundles") says the same.
TRUST = {
    "files": "hashed: size and sha256 of every file, checked on load (flashvl verify --integrity re-hashes "
             "all); every file a graph references as ONNX external data must be listed here, or loading refuses",
    "graphs, embeddings, tokenizer, engines": "validated: names stay inside the bundle, interfaces and shapes "
                                              "match the vision/llm sections; the graph files are parsed and run "
                                              "by ONNX Runtime / TensorRT (trust their source as you would code)",
    "chat_template": "code: Jinja run in a sandbox; flashvl serve bounds its output size, time and memory",
    "vision, llm, image, preprocess, iss, generation": "validated: types, ranges and cross-section rules",
    "source, tools, quantization, trust": "informational: shown, never acted on",
}


# --------------------------------------------------------------------------------------------
# Reading helpers: each names the field it rejects, so a broken manifest costs one clear line.


class _Reader:
    """Typed access to one JSON object of the manifest, with the section path in every error."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise BundleError(f"manifest {where or 'root'} must be a JSON object; {REEXPORT}")
        self.data = data
        self.where = where

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, why: str) -> BundleError:
        return BundleError(f"manifest {self._name(key)} {why}; {REEXPORT}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def section(self, key: str) -> "_Reader":
        if key not in self.data:
            raise self.fail(key, "is missing")
        return _Reader(self.data[key], self._name(key))

    def int(self, key: str, lo: int | None = None, optional: bool = False) -> int | None:
        v = self.data.get(key)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"is {v!r}, expected an integer")
        if lo is not None and v < lo:
            raise self.fail(key, f"is {v}, expected at least {lo}")
        return v

    def float(self, key: str, positive: bool = False, optional: bool = False) -> float | None:
        v = self.data.get(key)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(key, f"is {v!r}, expected a finite number")
        if positive and v <= 0:
            raise self.fail(key, f"is {v!r}, expected a number > 0")
        return float(v)

    def str(self, key: str, optional: bool = False, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.data.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str) or not v:
            raise self.fail(key, f"is {v!r}, expected a non-empty string")
        if choices is not None and v not in choices:
            raise self.fail(key, f"is {v!r}, expected one of {', '.join(choices)}")
        return v

    def bool(self, key: str) -> bool:
        v = self.data.get(key)
        if not isinstance(v, bool):
            raise self.fail(key, f"is {v!r}, expected true or false")
        return v

    def file(self, key: str, optional: bool = False) -> str | None:
        v = self.str(key, optional=optional)
        if v is not None:
            check_member_name(v, self._name(key))
        return v

    def list(self, key: str, item: Callable[[Any], bool], what: str, length: int | None = None) -> tuple:
        v = self.data.get(key)
        if not isinstance(v, list) or (length is not None and len(v) != length) or not all(item(x) for x in v):
            n = f"{length} " if length is not None else ""
            raise self.fail(key, f"is {v!r}, expected a list of {n}{what}")
        return tuple(v)

    def dict(self, key: str, optional: bool = True) -> dict[str, Any]:
        v = self.data.get(key)
        if v is None and optional:
            return {}
        if not isinstance(v, dict):
            raise self.fail(key, "must be a JSON object")
        return dict(v)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_member_name(name: str, what: str = "file name") -> str:
    """A manifest file name is a relative posix path that stays inside the bundle (no ``..``)."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name \
            or any(p in ("..", "", ".") for p in name.split("/")) or ":" in PurePosixPath(name).parts[0]:
        raise BundleError(f"manifest {what} {name!r} is not a relative path inside the bundle; "
                          "refusing to load it")
    return name


# --------------------------------------------------------------------------------------------
# Graph interfaces


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` holds ints (fixed) and dim names (dynamic)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "TensorSpec":
        r = _Reader(data, where)
        name = r.str("name")
        dtype = r.str("dtype", choices=("float32", "float16", "int64", "int32", "bool"))
        shape = r.list("shape", lambda d: (_is_int(d) and d >= 1) or d in DIM_NAMES,
                       f"positive ints or dim names ({', '.join(DIM_NAMES)})")
        return cls(name, dtype, tuple(shape))

    def concrete(self, **sizes: int) -> tuple[int, ...]:
        """The shape with each named dim replaced from ``sizes``."""
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.shape)


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise BundleError(f"the graph declares no input {name!r}; {REEXPORT}")

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise BundleError(f"the graph declares no output {name!r}; {REEXPORT}")

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}


def past_names(num_layers: int) -> list[str]:
    return [f"{PAST_PREFIX}{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"{PRESENT_PREFIX}{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def vision_io(image_size: int, tokens_per_tile: int, hidden: int, float_dtype: str = "float32") -> GraphIO:
    """pixel_values [num_tiles, 3, S, S] -> image_embeds [num_tiles, tokens_per_tile, D_llm]."""
    return GraphIO(
        inputs=(TensorSpec("pixel_values", float_dtype, ("num_tiles", 3, image_size, image_size)),),
        outputs=(TensorSpec("image_embeds", float_dtype, ("num_tiles", tokens_per_tile, hidden)),),
    )


def llm_io(num_layers: int, hidden: int, kv_heads: int, head_dim: int, vocab: int,
           float_dtype: str = "float32") -> GraphIO:
    """The decoder with KV cache: embeddings in (the runtime gathers them), last-position logits out."""
    kv_past = ("batch", kv_heads, "past", head_dim)
    kv_total = ("batch", kv_heads, "total", head_dim)
    return GraphIO(
        inputs=(
            TensorSpec("inputs_embeds", float_dtype, ("batch", "seq", hidden)),
            TensorSpec("attention_mask", "int64", ("batch", "total")),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
            *(TensorSpec(n, float_dtype, kv_past) for n in past_names(num_layers)),
        ),
        outputs=(
            TensorSpec("logits", float_dtype, ("batch", 1, vocab)),
            *(TensorSpec(n, float_dtype, kv_total) for n in present_names(num_layers)),
        ),
    )


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle: its files and its declared interface."""

    file: str
    external_data: str | None
    opset: int
    weight_bytes: int  # informational: initializer bytes
    io: GraphIO

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.io.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.io.outputs

    def input(self, name: str) -> TensorSpec:
        return self.io.input(name)

    def output(self, name: str) -> TensorSpec:
        return self.io.output(name)

    @property
    def past_inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.io.inputs if t.name.startswith(PAST_PREFIX))

    @property
    def present_outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.io.outputs if t.name.startswith(PRESENT_PREFIX))

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file,) + ((self.external_data,) if self.external_data else ())

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "external_data": self.external_data, "opset": self.opset,
                "weight_bytes": self.weight_bytes, **self.io.to_json()}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "GraphSpec":
        r = _Reader(data, where)
        io = GraphIO(tuple(TensorSpec.from_json(t, f"{where}.inputs[{i}]")
                           for i, t in enumerate(r.list("inputs", lambda x: isinstance(x, dict), "tensor specs"))),
                     tuple(TensorSpec.from_json(t, f"{where}.outputs[{i}]")
                           for i, t in enumerate(r.list("outputs", lambda x: isinstance(x, dict), "tensor specs"))))
        for kind, specs in (("input", io.inputs), ("output", io.outputs)):
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise r.fail(f"{kind}s", "names a tensor twice")
        return cls(r.file("file"), r.file("external_data", optional=True), r.int("opset", lo=1),
                   r.int("weight_bytes", lo=0), io)


# --------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class SourceSpec:
    model: str  # preset name or absolute checkpoint path
    preset: str | None
    seed: int | None
    # for a preset: the published checkpoints whose shapes it copies ({"vision": ..., "llm": ...})
    reference: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "preset": self.preset, "seed": self.seed, "reference": dict(self.reference)}

    @classmethod
    def from_json(cls, data: Any, where: str = "source") -> "SourceSpec":
        r = _Reader(data, where)
        reference = r.dict("reference")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in reference.items()):
            raise r.fail("reference", "must map names to model ids (strings)")
        return cls(r.str("model"), r.str("preset", optional=True), r.int("seed", optional=True), reference)


@dataclass(frozen=True)
class VisionSpec:
    model_type: str
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    downsample_ratio: float
    # -1: the tower's last_hidden_state (its final norm included); any other k: hidden_states[k]
    vision_feature_layer: int
    tokens_per_tile: int
    tokens_per_side: int

    @property
    def feature_convention(self) -> str:
        """How the adapter's input was taken from the tower, in words (``flashvl verify`` prints it)."""
        if self.vision_feature_layer == -1:
            return "last_hidden_state (vision_feature_layer -1: every layer, final norm included)"
        return f"hidden_states[{self.vision_feature_layer}] (no final norm)"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "vision") -> "VisionSpec":
        r = _Reader(data, where)
        spec = cls(r.str("model_type"), r.int("image_size", 1), r.int("patch_size", 1), r.int("hidden_size", 0),
                   r.int("num_layers", 0), r.float("downsample_ratio", positive=True), r.int("vision_feature_layer"),
                   r.int("tokens_per_tile", 1), r.int("tokens_per_side", 1))
        if spec.tokens_per_side ** 2 != spec.tokens_per_tile:
            raise r.fail("tokens_per_tile", f"({spec.tokens_per_tile}) is not tokens_per_side "
                                            f"({spec.tokens_per_side}) squared")
        return spec


@dataclass(frozen=True)
class LLMSpec:
    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "llm") -> "LLMSpec":
        r = _Reader(data, where)
        spec = cls(r.str("model_type"), r.int("hidden_size", 1), r.int("num_layers", 1),
                   r.int("num_attention_heads", 1), r.int("num_kv_heads", 1), r.int("head_dim", 1),
                   r.int("vocab_size", 1), r.int("max_position_embeddings", 2),
                   r.float("rope_theta", positive=True, optional=True))
        if spec.num_attention_heads % spec.num_kv_heads:
            raise r.fail("num_kv_heads", f"({spec.num_kv_heads}) does not divide num_attention_heads "
                                         f"({spec.num_attention_heads})")
        return spec


@dataclass(frozen=True)
class ImageSpec:
    placeholder: str  # what a user prompt writes where an image goes
    image_token: str
    image_token_id: int  # the id at every image-embedding position
    start_token: str | None  # text wrapped around the image tokens (InternVL: <img> ... </img>)
    end_token: str | None
    tokens_per_tile: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "image") -> "ImageSpec":
        r = _Reader(data, where)
        return cls(r.str("placeholder"), r.str("image_token"), r.int("image_token_id", 0),
                   r.str("start_token", optional=True), r.str("end_token", optional=True),
                   r.int("tokens_per_tile", 1))


@dataclass(frozen=True)
class PreprocessSpec:
    mode: str  # "clip" (one resized/cropped image) | "tiles" (a grid of tiles, maybe a thumbnail)
    image_size: int
    resize_shortest_edge: int | None  # None: resize straight to crop_size
    crop_size: int
    do_center_crop: bool
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: str
    max_tiles: int  # crop tiles of the grid; the thumbnail, when used, comes on top
    min_tiles: int
    use_thumbnail: bool
    max_image_pixels: int

    def vision_batch(self, tiles: int | None = None) -> int:
        """Images the vision graph sees for a grid of ``tiles`` crop tiles (default: the budget):
        a whole-image thumbnail is added whenever the grid has more than one tile."""
        n = self.max_tiles if tiles is None else int(tiles)
        return n + (1 if self.use_thumbnail and n > 1 else 0)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_json(cls, data: Any, where: str = "preprocess") -> "PreprocessSpec":
        r = _Reader(data, where)
        spec = cls(
            mode=r.str("mode", choices=PREPROCESS_MODES), image_size=r.int("image_size", 1),
            resize_shortest_edge=r.int("resize_shortest_edge", 1, optional=True), crop_size=r.int("crop_size", 1),
            do_center_crop=r.bool("do_center_crop"), rescale_factor=r.float("rescale_factor", positive=True),
            image_mean=r.list("image_mean", _is_num, "finite numbers", 3),
            image_std=r.list("image_std", lambda x: _is_num(x) and x > 0, "numbers > 0 (they divide the pixels)", 3),
            resample=r.str("resample", choices=RESAMPLE_NAMES), max_tiles=r.int("max_tiles", 1),
            min_tiles=r.int("min_tiles", 1), use_thumbnail=r.bool("use_thumbnail"),
            max_image_pixels=r.int("max_image_pixels", 1))
        if spec.min_tiles > spec.max_tiles:
            raise r.fail("min_tiles", f"({spec.min_tiles}) is above max_tiles ({spec.max_tiles})")
        if spec.mode == "clip" and spec.max_tiles != 1:
            raise r.fail("max_tiles", f"is {spec.max_tiles} but mode 'clip' takes one image")
        return dataclasses.replace(spec, image_mean=tuple(float(v) for v in spec.image_mean),
                                   image_std=tuple(float(v) for v in spec.image_std))


@dataclass(frozen=True)
class ISSSpec:
    enabled: bool
    overlap_tokens: int  # tokens of each tile edge that the neighbouring tile also covers
    pixels_per_token: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "iss") -> "ISSSpec":
        r = _Reader(data, where)
        return cls(r.bool("enabled"), r.int("overlap_tokens", 0), r.int("pixels_per_token", 1))


@dataclass(frozen=True)
class GenerationSpec:
    eos_token_ids: tuple[int, ...]
    stop_tokens: tuple[str, ...]
    max_context: int  # prompt + generated tokens; defaults to the LLM's max_position_embeddings

    def to_json(self) -> dict[str, Any]:
        return {"eos_token_ids": list(self.eos_token_ids), "stop_tokens": list(self.stop_tokens),
                "max_context": self.max_context}

    @classmethod
    def from_json(cls, data: Any, where: str = "generation") -> "GenerationSpec":
        r = _Reader(data, where)
        return cls(r.list("eos_token_ids", lambda x: _is_int(x) and x >= 0, "token ids"),
                   r.list("stop_tokens", lambda x: isinstance(x, str) and x, "token texts"),
                   r.int("max_context", 2))


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    config_file: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "tokenizer") -> "TokenizerSpec":
        r = _Reader(data, where)
        return cls(r.file("file"), r.file("config_file"))


@dataclass(frozen=True)
class EmbeddingsSpec:
    file: str  # a .npy table [vocab, hidden]; the runtime gathers rows itself (memory-mapped)
    dtype: str
    shape: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Any, where: str = "embeddings") -> "EmbeddingsSpec":
        r = _Reader(data, where)
        return cls(r.file("file"), r.str("dtype", choices=("float32", "float16")),
                   r.list("shape", lambda x: _is_int(x) and x >= 1, "positive ints", 2))


@dataclass(frozen=True)
class QuantizationSpec:
    vision: str | None  # "int8" | None
    llm: str | None  # "int8" | "int4" | None
    method: dict[str, str]
    tool: str
    tool_version: str
    report: str
    calibrated_from: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "quantization") -> "QuantizationSpec":
        r = _Reader(data, where)
        return cls(r.str("vision", optional=True, choices=("int8",)),
                   r.str("llm", optional=True, choices=("int8", "int4")), r.dict("method"), r.str("tool"),
                   r.str("tool_version"), r.file("report"), r.dict("calibrated_from"))


@dataclass(frozen=True)
class EngineLimits:
    """What an engine set was built for; the runtime refuses (or plans around) anything larger."""

    max_batch: int
    max_input_len: int
    max_context: int
    max_tiles: int  # crop tiles, as preprocess.max_tiles; the vision profile adds the thumbnail

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "EngineLimits":
        r = _Reader(data, where)
        return cls(r.int("max_batch", 1), r.int("max_input_len", 1), r.int("max_context", 2), r.int("max_tiles", 1))


@dataclass(frozen=True)
class EngineGraph:
    file: str
    built_from: str
    sha256: str
    profiles: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "built_from": self.built_from, "sha256": self.sha256,
                "profiles": list(self.profiles)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "EngineGraph":
        r = _Reader(data, where)
        return cls(r.file("file"), r.file("built_from"), r.str("sha256"),
                   r.list("profiles", lambda x: isinstance(x, str) and x, "profile names"))


@dataclass(frozen=True)
class EngineEntry:
    """One TensorRT engine set, built by ``flashvl build`` for one GPU and TensorRT version."""

    dir: str
    gpu: str
    compute_capability: str
    trt_version: str
    precision: str
    strongly_typed: bool
    hardware_compatibility: str | None
    version_compatible: bool
    limits: EngineLimits
    graphs: dict[str, EngineGraph]
    profiles: dict[str, Any] = field(default_factory=dict)  # the optimization profiles' shapes, as built
    builder: dict[str, Any] = field(default_factory=dict)
    built_at: str = ""
    # "linux-aarch64", "linux-x86_64": plans do not cross platforms; "" where the builder did not record it
    platform: str = ""
    # the dtype of the engine's past/present KV tensors ("float16"); "" where the builder did not record it
    kv_dtype: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"dir": self.dir, "gpu": self.gpu, "compute_capability": self.compute_capability,
                "trt_version": self.trt_version, "precision": self.precision, "strongly_typed": self.strongly_typed,
                "hardware_compatibility": self.hardware_compatibility, "version_compatible": self.version_compatible,
                "limits": self.limits.to_json(), "profiles": self.profiles,
                "graphs": {k: g.to_json() for k, g in self.graphs.items()}, "builder": self.builder,
                "built_at": self.built_at, "platform": self.platform or None, "kv_dtype": self.kv_dtype or None}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "EngineEntry":
        r = _Reader(data, where)
        graphs = r.section("graphs")
        return cls(
            dir=r.file("dir"), gpu=r.str("gpu"), compute_capability=str(r.raw("compute_capability") or ""),
            trt_version=r.str("trt_version"), precision=r.str("precision", choices=("fp16", "int8", "best", "fp32")),
            strongly_typed=bool(r.raw("strongly_typed", False)),
            hardware_compatibility=r.str("hardware_compatibility", optional=True),
            version_compatible=bool(r.raw("version_compatible", False)),
            limits=EngineLimits.from_json(r.raw("limits"), f"{where}.limits"),
            graphs={k: EngineGraph.from_json(v, f"{where}.graphs.{k}") for k, v in graphs.data.items()},
            profiles=r.dict("profiles"), builder=r.dict("builder"), built_at=str(r.raw("built_at") or ""),
            platform=r.str("platform", optional=True) or "",
            kv_dtype=r.str("kv_dtype", optional=True, choices=("float16", "float32")) or "")


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "FileEntry":
        r = _Reader(data, where)
        digest = r.str("sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise r.fail("sha256", "is not 64 lowercase hex digits")
        return cls(r.int("size", 0), digest)


# --------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class Manifest:
    family: str
    variant: str
    source: SourceSpec
    dtype: str  # graph float type: "fp32" | "fp16"
    vision: VisionSpec
    llm: LLMSpec
    image: ImageSpec
    preprocess: PreprocessSpec
    iss: ISSSpec
    chat_template: str
    generation: GenerationSpec
    tokenizer: TokenizerSpec
    embeddings: EmbeddingsSpec
    graphs: dict[str, GraphSpec]
    quantization: QuantizationSpec | None = None
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)  # every file: filled by finalize_manifest
    schema_version: int = SCHEMA_VERSION

    # -- views the stages share ---------------------------------------------------------------
    def graph(self, name: str) -> GraphSpec:
        try:
            return self.graphs[name]
        except KeyError:
            raise BundleError(f"bundle has no {name!r} graph; {REEXPORT}") from None

    @property
    def max_context(self) -> int:
        return self.generation.max_context

    @property
    def n_image_tokens_max(self) -> int:
        """Image tokens of the largest image this bundle takes (every tile of the budget, thumbnail too)."""
        return self.preprocess.vision_batch() * self.image.tokens_per_tile

    def empty_past(self, batch: int = 1) -> dict[str, Any]:
        """The LLM graph's ``past_key_values.*`` inputs for a prefill (past length 0), as numpy zeros,
        from the declared inputs, so every tool that feeds the graph builds the feed it declares."""
        import numpy as np

        return {t.name: np.zeros(t.concrete(batch=batch, past=0), dtype=np.dtype(t.dtype))
                for t in self.graph("llm").past_inputs}

    def llm_feed(self, inputs_embeds: Any, past: Mapping[str, Any] | None = None, past_len: int = 0) -> dict[str, Any]:
        """A full LLM-graph feed for ``inputs_embeds`` [batch, seq, hidden] on top of ``past``
        (``past_len`` positions; None: an empty cache): all-ones mask and consecutive positions."""
        import numpy as np

        batch, seq = int(inputs_embeds.shape[0]), int(inputs_embeds.shape[1])
        feed = {"inputs_embeds": inputs_embeds,
                "attention_mask": np.ones((batch, past_len + seq), np.int64),
                "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64),
                                                (batch, seq)).copy()}
        feed.update(self.empty_past(batch) if past is None else past)
        return feed

    def past_from_outputs(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """The next step's ``past_key_values.*`` feeds from one run's ``present.*`` outputs."""
        return {t.name: outputs[PRESENT_PREFIX + t.name[len(PAST_PREFIX):]] for t in self.graph("llm").past_inputs}

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def with_graph(self, name: str, **changes: Any) -> "Manifest":
        """A copy with one graph entry changed (calibration rewrites files, opset, weight bytes)."""
        return self.replace(graphs={**self.graphs, name: dataclasses.replace(self.graph(name), **changes)})

    def named_files(self) -> list[tuple[str, str]]:
        """(what, file name) of every file the sections name; each must be listed in ``files``."""
        named = [(f"graphs.{g}", f) for g, spec in self.graphs.items() for f in spec.files]
        named += [("embeddings.file", self.embeddings.file), ("tokenizer.file", self.tokenizer.file),
                  ("tokenizer.config_file", self.tokenizer.config_file)]
        if self.quantization is not None:
            named.append(("quantization.report", self.quantization.report))
        for name, e in self.engines.items():
            named += [(f"engines.{name}.graphs.{g}", eg.file) for g, eg in e.graphs.items()]
        return named

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "family": self.family, "variant": self.variant,
            "source": self.source.to_json(), "dtype": self.dtype, "vision": self.vision.to_json(),
            "llm": self.llm.to_json(), "image": self.image.to_json(), "preprocess": self.preprocess.to_json(),
            "iss": self.iss.to_json(), "chat_template": self.chat_template,
            "generation": self.generation.to_json(), "tokenizer": self.tokenizer.to_json(),
            "embeddings": self.embeddings.to_json(),
            "graphs": {k: g.to_json() for k, g in self.graphs.items()},
            "quantization": None if self.quantization is None else self.quantization.to_json(),
            "engines": {k: e.to_json() for k, e in self.engines.items()},
            "tools": dict(self.tools), "files": {k: f.to_json() for k, f in self.files.items()},
            "trust": dict(TRUST),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest.json", require_files: bool = True) -> "Manifest":
        """Parse and validate a whole manifest; any problem is one :class:`BundleError` line.

        ``require_files``: the bundle is finished, so every file a section names must be in ``files``
        (False while a stage builds a manifest before hashing its files)."""
        if not isinstance(data, dict):
            raise BundleError(f"{where} is not a JSON object; {REEXPORT}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: bundle schema version {version!r} is not supported by this flashvl-edge (it reads "
                f"version {SCHEMA_VERSION}); re-export the bundle with 'flashvl export'")
        try:
            return cls._parse(data, require_files)
        except BundleError as e:
            raise BundleError(f"{where}: {e}") from None

    @classmethod
    def _parse(cls, data: dict[str, Any], require_files: bool) -> "Manifest":
        r = _Reader(data, "")
        graphs_r = r.section("graphs")
        graphs = {name: GraphSpec.from_json(graphs_r.raw(name), f"graphs.{name}") for name in GRAPH_NAMES}
        files = {name: FileEntry.from_json(e, f"files[{name!r}]") for name, e in r.dict("files").items()}
        for name in files:
            check_member_name(name, "files entry")
        quant = r.raw("quantization")
        chat_template = r.raw("chat_template")
        if not isinstance(chat_template, str) or not chat_template:
            raise r.fail("chat_template", "must be a non-empty string (a Jinja chat template)")
        tools = r.dict("tools")
        m = cls(
            family=r.str("family"), variant=r.str("variant"), source=SourceSpec.from_json(r.raw("source")),
            dtype=r.str("dtype", choices=FLOAT_DTYPES), vision=VisionSpec.from_json(r.raw("vision")),
            llm=LLMSpec.from_json(r.raw("llm")), image=ImageSpec.from_json(r.raw("image")),
            preprocess=PreprocessSpec.from_json(r.raw("preprocess")), iss=ISSSpec.from_json(r.raw("iss")),
            chat_template=chat_template, generation=GenerationSpec.from_json(r.raw("generation")),
            tokenizer=TokenizerSpec.from_json(r.raw("tokenizer")),
            embeddings=EmbeddingsSpec.from_json(r.raw("embeddings")), graphs=graphs,
            quantization=None if quant is None else QuantizationSpec.from_json(quant),
            engines={k: EngineEntry.from_json(v, f"engines.{k}") for k, v in r.dict("engines").items()},
            tools={str(k): str(v) for k, v in tools.items()}, files=files)
        m.check(require_files)
        return m

    def check(self, require_files: bool = True) -> None:
        """The rules that span sections (each field's own type and range were checked on parse)."""
        v, llm, img, pre, iss = self.vision, self.llm, self.image, self.preprocess, self.iss

        def bad(what: str, why: str) -> BundleError:
            return BundleError(f"manifest {what} {why}; {REEXPORT}")

        if img.tokens_per_tile != v.tokens_per_tile:
            raise bad("image.tokens_per_tile", f"({img.tokens_per_tile}) differs from vision.tokens_per_tile "
                                               f"({v.tokens_per_tile})")
        if img.image_token_id >= llm.vocab_size:
            raise bad("image.image_token_id", f"({img.image_token_id}) is outside the vocabulary ({llm.vocab_size})")
        if any(i >= llm.vocab_size for i in self.generation.eos_token_ids):
            raise bad("generation.eos_token_ids", f"{list(self.generation.eos_token_ids)} are not all inside the "
                                                  f"vocabulary ({llm.vocab_size})")
        if self.generation.max_context > llm.max_position_embeddings:
            raise bad("generation.max_context", f"({self.generation.max_context}) exceeds llm.max_position_embeddings "
                                                f"({llm.max_position_embeddings})")
        if iss.enabled:
            if pre.mode != "tiles":
                raise bad("iss.enabled", "is true but preprocess.mode is not 'tiles'")
            if iss.pixels_per_token * v.tokens_per_side != pre.image_size:
                raise bad("iss.pixels_per_token", f"({iss.pixels_per_token}) x vision.tokens_per_side "
                                                  f"({v.tokens_per_side}) is not the tile size {pre.image_size}")
            if not iss.overlap_tokens < v.tokens_per_side:
                raise bad("iss.overlap_tokens", f"({iss.overlap_tokens}) must be below tokens_per_side "
                                                f"({v.tokens_per_side})")
        if tuple(self.embeddings.shape) != (llm.vocab_size, llm.hidden_size):
            raise bad("embeddings.shape", f"{list(self.embeddings.shape)} is not [vocab_size, hidden_size] = "
                                          f"[{llm.vocab_size}, {llm.hidden_size}]")
        self._check_graphs(bad)
        if require_files:
            for what, name in self.named_files():
                if name not in self.files:
                    raise bad(what, f"names {name!r}, which the 'files' section does not list")

    def _check_graphs(self, bad: Callable[[str, str], BundleError]) -> None:
        float_dtype = "float16" if self.dtype == "fp16" else "float32"
        expected = {
            "vision": vision_io(self.preprocess.image_size, self.vision.tokens_per_tile, self.llm.hidden_size,
                                float_dtype),
            "llm": llm_io(self.llm.num_layers, self.llm.hidden_size, self.llm.num_kv_heads, self.llm.head_dim,
                          self.llm.vocab_size, float_dtype),
        }
        for name, io in expected.items():
            got = self.graph(name).io
            # names and shapes are the contract; a quantized graph may keep float I/O of either width
            for kind, want, have in (("inputs", io.inputs, got.inputs), ("outputs", io.outputs, got.outputs)):
                if [(t.name, t.shape) for t in want] != [(t.name, t.shape) for t in have]:
                    shown = [f"{t.name}{list(t.shape)}" for t in have][:4]
                    raise bad(f"graphs.{name}.{kind}", f"({', '.join(shown)}{', ...' if len(have) > 4 else ''}) "
                                                       "do not match the vision/llm sections")


__all__ = [
    "SCHEMA_VERSION", "PAST_PREFIX", "PRESENT_PREFIX", "TensorSpec", "GraphIO", "GraphSpec", "past_names",
    "present_names", "vision_io", "llm_io", "SourceSpec", "VisionSpec", "LLMSpec", "ImageSpec", "PreprocessSpec",
    "ISSSpec", "GenerationSpec", "TokenizerSpec", "EmbeddingsSpec", "QuantizationSpec", "EngineLimits",
    "EngineGraph", "EngineEntry", "FileEntry", "Manifest", "check_member_name", "TRUST",
]

