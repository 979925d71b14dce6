#!/usr/bin/env python
"""Side by side on this CPU, in one run, interleaved: what a user would pick instead of flashvl-edge.

Contenders (same preset, same seed, same image, same prompt token ids):
  torch        PyTorch eager: transformers' Qwen2 with a DynamicCache (+ the vision tower / adapter for
               TTFT), ``torch.set_num_threads(<physical cores>)``, last-token logits only, greedy.
  ours-fp32    our runtime (``Pipeline.chat``) on the fp32 bundle from ``flashvl export``.
  ours-q       our runtime on ``flashvl calibrate --vision int8 --llm int4`` of that bundle.
  ortgenai     ONNX Runtime GenAI's model builder int4 CPU decoder (``-p int4 -e cpu``), built offline from
               the same Qwen2 weights saved as a Hugging Face directory; text only (decode speed is what
               is compared, the image-token ids are just ids to it).
  llamacpp-q4_0, llamacpp-q4_k_m
               llama.cpp (llama-cpp-python, built from source for this CPU, 2 threads): the same Qwen2
               directory converted by llama.cpp's own convert_hf_to_gguf.py (f32 GGUF), quantized to Q4_0
               and Q4_K_M by llama.cpp's quantizer; text only, the same prompt token ids, greedy.
And the memory-bandwidth limit: weight bytes read per decoded token / bandwidth measured here (a large
float32 matrix-vector product, best of 5: numpy's, a probe any peer could run, for the targets; and the same
product through ONNX Runtime, which reads faster here, for a stricter fraction reported next to it).

Batched (``--batch 8``, the default; ``--batch 0`` leaves it out, ``--batched-only`` runs it alone): the same
text-only prompt ids, one row per sequence (each row its own prompt, all of one length), decoded at once,
greedy, the same new tokens per row; aggregate decode tokens/s = rows x decode steps / decode time:
  ours-q       the continuous-batching scheduler ``flashvl serve`` runs, on the INT4 bundle, every row
               submitted at once (rows prefilled one by one: the runtime has no batched prefill).
  ortgenai     its Generator with ``batch_size`` = rows, the [rows, length] ids appended at once.
  llamacpp-q4_0, llamacpp-q4_k_m
               ``llama-batched-bench`` (built by ``prepare`` from the same llama.cpp source, same ggml flags)
               on the same GGUFs, without ``-pps`` (no shared prompt); its S_TG and S_PP.

Each repetition runs every contender once (round robin, starting contender rotated per repetition), so
machine noise hits all of them alike; ratios are computed per repetition and the median reported.

Usage (see docs/performance.md):
  python benchmarks/compare.py prepare --work build/compare            # export, calibrate, HF dir, builder
  python benchmarks/compare.py run --work build/compare --reps 3       # the measurement -> compare.json
  python benchmarks/compare.py run --work build/compare --batched-only # batched alone -> compare-batched.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PY = sys.executable
FLASHVL = [PY, "-m", "flashvl_edge.main"]


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(map(str, cmd)))
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, **kw)
    log(f"  done in {time.perf_counter() - t0:.0f} s")


# --------------------------------------------------------------------------------------------
# prepare: every artifact is built once and cached in the work dir


def paths(work: Path) -> dict[str, Path]:
    return {"fp32": work / "bundle-fp32", "q": work / "bundle-int8v-int4llm", "hf": work / "hf-qwen2",
            "genai": work / "ortgenai-int4", "image": work / "image.png",
            # llama.cpp: the HF dir with a full-size vocabulary (for its converter), its f32 GGUF, the quants
            "hf_fullvocab": work / "hf-qwen2-fullvocab", "gguf_f32": work / "llamacpp-f32.gguf",
            "gguf_q4_0": work / "llamacpp-q4_0.gguf", "gguf_q4_k_m": work / "llamacpp-q4_k_m.gguf",
            # llama.cpp's batched benchmark, built from the same vendored source (CMake build dir)
            "llamacpp_build": work / "llamacpp-build",
            "batched_bench": work / "llamacpp-build" / "bin" / "llama-batched-bench"}


LLAMACPP_QUANTS = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}

# The ggml CPU flags llama-cpp-python was built with here (docs/performance.md "llama.cpp beside us"), so the
# batched benchmark runs the same kernels as the single-stream contenders: GGML_NATIVE would pick the AMX
# kernels, which crash on this VM (SIGSEGV in ggml_backend_amx_mul_mat).
LLAMACPP_GGML_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
                       "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
                       "-DGGML_F16C=ON", "-DGGML_AVX=ON", "-DGGML_OPENMP=ON"]


def llama_cpp_source(work: Path, explicit: str | None) -> Path:
    """The llama.cpp source that the installed llama-cpp-python vendors (its convert_hf_to_gguf.py and the
    reference vocabularies in models/): ``--llama-cpp-src``, else the sdist of the installed version
    fetched once with pip into the work dir."""
    if explicit:
        return Path(explicit)
    import importlib.metadata
    import tarfile

    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("llama-cpp-python is not installed: build it as docs/performance.md "
                         "'llama.cpp beside us' says, or pass --skip-llamacpp") from None
    src = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").exists():
        dl = work / "sdist"
        sh([PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}",
            "-d", dl])
        with tarfile.open(dl / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    return src


def write_fullvocab_hf(hf: Path, out: Path, vocab_gguf: Path) -> None:
    """A copy of the HF Qwen2 directory (weights linked, not copied) whose tokenizer has the config's
    vocabulary size. The bundle's tokenizer has 512 entries while the config (and the embedding table) says
    151,936, which llama.cpp's converter rejects; llama.cpp's own Qwen2 reference vocabulary
    (models/ggml-vocab-qwen2.gguf: 151,936 tokens, its merges) is written out as a tokenizer.json with
    Qwen2's pre-tokenizer, so the converter recognises it as "qwen2". Speed does not depend on the
    vocabulary: the contenders get token ids, and the weights are the same."""
    import gguf

    reader = gguf.GGUFReader(str(vocab_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    config = json.loads((hf / "config.json").read_text())
    if len(tokens) != config["vocab_size"]:
        raise SystemExit(f"{vocab_gguf}: {len(tokens)} tokens, the config says {config['vocab_size']}")
    normal = int(gguf.TokenType.NORMAL)
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == normal}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty != normal]
    qwen2_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": {"type": "NFC"},
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": qwen2_split}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                     "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": merges}}
    tmp = out.with_name(out.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in hf.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            os.symlink(f.resolve(), tmp / f.name)
    (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    eos = next(t for t in tokens if t == "<|im_end|>") if "<|im_end|>" in tokens else tokens[-1]
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<|endoftext|>",
         "bos_token": None, "unk_token": None, "model_max_length": 32768,
         "clean_up_tokenization_spaces": False}, indent=1))
    os.replace(tmp, out)


def llamacpp_quantize(src: Path, dst: Path, quant: str, threads: int) -> None:
    """llama.cpp's quantizer through the binding (``llama_model_quantize``; no CLI tools needed)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMACPP_QUANTS[quant])
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} ({quant}) failed: {rc}")
    os.replace(tmp, dst)


def save_hf_qwen2(preset: str, seed: int, out: Path) -> None:
    """The preset's language model as a Hugging Face Qwen2 directory (for the ORT GenAI builder)."""
    import shutil

    from flashvl_edge.export.families import build_preset

    loaded = build_preset(preset, seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.language_model.save_pretrained(tmp)
    shutil.copy(loaded.tokenizer_file, tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps(loaded.tokenizer_config, indent=1))
    os.replace(tmp, out)


def prepare(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    p = paths(work)
    if not (p["fp32"] / "manifest.json").exists():
        sh(FLASHVL + ["export", args.preset, "--seed", str(args.seed), "--out", p["fp32"], "--force", "--quiet"])
    if not (p["q"] / "manifest.json").exists():
        sh(FLASHVL + ["calibrate", p["fp32"], "--out", p["q"], "--vision", "int8", "--llm", "int4",
                      "--samples", str(args.calib_samples), "--holdout", "1", "--force", "--quiet"])
    if not (p["hf"] / "config.json").exists():
        # a subprocess, so the torch model's memory is returned before the builder loads it again
        sh([PY, __file__, "_save-hf", "--preset", args.preset, "--seed", str(args.seed), "--out", p["hf"]])
    if not (p["genai"] / "genai_config.json").exists():
        sh([PY, "-m", "onnxruntime_genai.models.builder", "-i", p["hf"], "-o", p["genai"], "-p", "int4",
            "-e", "cpu", "-c", work / "builder-cache"])
    if not args.skip_llamacpp:
        prepare_llamacpp(args, work, p)
    if not p["image"].exists():
        from flashvl_edge.runtime.bench import default_image

        default_image()[0].save(p["image"])
    log(f"prepared in {work}")


def build_batched_bench(src: Path, build: Path, exe: Path) -> None:
    """``llama-batched-bench`` (that target only) from the llama.cpp source tree, Release, with the ggml
    flags of the llama-cpp-python build; static, so the binary needs nothing from the venv. Networking
    (OpenSSL) is off: the benchmark reads a local GGUF."""
    import shutil

    if shutil.which("cmake") is None:
        raise SystemExit("cmake is not installed; it builds llama-batched-bench (or pass --skip-llamacpp)")
    sh(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON", *LLAMACPP_GGML_FLAGS])
    sh(["cmake", "--build", build, "--target", "llama-batched-bench", "--parallel", str(os.cpu_count() or 1)])
    if not exe.exists():
        raise SystemExit(f"the llama.cpp build finished but {exe} is missing")


def prepare_llamacpp(args, work: Path, p: dict[str, Path]) -> None:
    """HF dir -> llama.cpp's convert_hf_to_gguf.py (f32) -> llama.cpp's quantizer (Q4_0, Q4_K_M); and
    llama.cpp's ``llama-batched-bench`` built from the same source."""
    from flashvl_edge.runtime.backends.ort import physical_cores

    if all(p[f"gguf_{q}"].exists() for q in LLAMACPP_QUANTS) and p["batched_bench"].exists():
        return
    src = llama_cpp_source(work, args.llama_cpp_src)
    if not p["batched_bench"].exists():
        build_batched_bench(src, p["llamacpp_build"], p["batched_bench"])
    if all(p[f"gguf_{q}"].exists() for q in LLAMACPP_QUANTS):
        return
    if not p["gguf_f32"].exists():
        if not (p["hf_fullvocab"] / "tokenizer.json").exists():
            write_fullvocab_hf(p["hf"], p["hf_fullvocab"], src / "models" / "ggml-vocab-qwen2.gguf")
        tmp = p["gguf_f32"].with_name(p["gguf_f32"].name + ".tmp")
        # the converter imports its own tree's gguf-py (the default, without NO_LOCAL_GGUF): the pinned gguf
        # package (0.19.0, what this script reads GGUFs with) lacks architectures this converter names
        # (AttributeError: DFLASH), though both say 0.19.0
        sh([PY, src / "convert_hf_to_gguf.py", p["hf_fullvocab"], "--outfile", tmp, "--outtype", "f32"])
        os.replace(tmp, p["gguf_f32"])
    for q in LLAMACPP_QUANTS:
        if not p[f"gguf_{q}"].exists():
            # a subprocess: the quantizer's memory is returned, and a crash names its step
            sh([PY, __file__, "_quantize", "--src", p["gguf_f32"], "--dst", p[f"gguf_{q}"], "--quant", q,
                "--threads", str(physical_cores())])


# --------------------------------------------------------------------------------------------
# bandwidth


class BandwidthProbe:
    """Bytes/s of a float32 matrix-vector product over a matrix much larger than the caches (numpy,
    best of ``repeats``). The matrix is kept, so the probe can run between the contenders' measurements:
    this VM's bandwidth drifts by up to a third within minutes (31 -> 39 GB/s in one run), and a limit
    taken at the start or end of a run does not describe a decode measured in the middle of it."""

    def __init__(self, gib: float = 1.0):
        cols = 16384
        self.a = np.empty((int(gib * 2**30 / 4 / cols), cols), np.float32)
        self.a.fill(1.0)  # written, so every page is really mapped (no shared zero page)
        self.x = np.ones(cols, np.float32)

    def __call__(self, repeats: int = 5) -> dict:
        return _timed_read(lambda: self.a @ self.x, self.a.nbytes, repeats)


def _timed_read(read, nbytes: int, repeats: int) -> dict:
    """Best of ``repeats`` calls of ``read``, which reads ``nbytes`` once."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"bytes": nbytes, "best_s": best, "bytes_per_s": nbytes / best, "times_s": times}


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """One stand-alone probe (:class:`BandwidthProbe`), its matrix freed afterwards."""
    return BandwidthProbe(gib)(repeats)


def measure_bandwidth_ort(gib: float = 1.0, repeats: int = 5, threads: int | None = None) -> dict:
    """The same matrix-vector product through ONNX Runtime's MatMul (MLAS, intra-op threads = cores).

    Reported next to the numpy probe as a cross-check (it read 34.4 against numpy's 31.4 GB/s at
    the start of one run); the targets use numpy's, the stricter limit.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from flashvl_edge.runtime.backends.ort import session_options

    cols = 16384
    rows = int(gib * 2**30 / 4 / cols)
    w = np.random.default_rng(0).standard_normal((cols, rows), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "bandwidth",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
                              [numpy_helper.from_array(w, "w")])
    nbytes = w.nbytes
    del w
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    del model, graph
    x = np.ones((1, cols), np.float32)
    session.run(None, {"x": x})
    return {**_timed_read(lambda: session.run(None, {"x": x}), nbytes, repeats),
            "probe": "onnxruntime MatMul [1, 16384] x [16384, 16384] float32"}


def genai_bytes_per_token(model_dir: Path) -> dict:
    """The ORT GenAI decoder's initializers, the embedding table counted as one row (it is gathered)."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    from flashvl_edge.runtime.weights import initializer_nbytes

    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    total, row = 0, 0
    for t in model.graph.initializer:
        size = initializer_nbytes(t)
        if t.name in gathered and len(t.dims) == 2 and t.dims[0] > 10000:
            row = size // t.dims[0]
            continue
        total += size
    return {"llm_initializer_bytes": total, "embedding_row_bytes": row, "bytes_per_token": total + row}


def gguf_bytes_per_token(path: Path) -> dict:
    """The GGUF's tensor bytes: every tensor is read per decoded token (the embedding table is tied to
    the LM head, so it is streamed whole by the head's matmul)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return {"gguf_tensor_bytes": total, "bytes_per_token": total, "bytes_by_type": types}


# --------------------------------------------------------------------------------------------
# contenders


class Ours:
    def __init__(self, name: str, bundle: Path):
        from flashvl_edge.runtime import bench
        from flashvl_edge.runtime.bundle import Bundle
        from flashvl_edge.runtime.pipeline import Pipeline

        self.name = name
        t0 = time.perf_counter()
        self.pipe = Pipeline.from_bundle(bundle, image_cache_bytes=0, kv_cache_bytes=0)  # measure every run
        self.load_s = time.perf_counter() - t0
        self.weights = bench.llm_bytes_per_token(Bundle.load(bundle))
        self.bench = bench

    def measure(self, prompt, image, new_tokens, prompt_ids=None) -> dict:
        # graph time from the runners' own timelines (what ``flashvl bench`` reports)
        return self.bench.measure_chat(self.pipe, prompt, image, new_tokens)

    def vision_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.pipe.vision.infer({"pixel_values": pixel_values})["image_embeds"]


class TorchEager:
    name = "torch"

    def __init__(self, preset: str, seed: int, threads: int, pipe):
        import torch

        from flashvl_edge.export.families import build_preset

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model = build_preset(preset, seed=seed).model.eval()
        self.load_s = time.perf_counter() - t0
        self.torch = torch
        self.pipe = pipe  # our preprocessing, so both see the same pixels

    def measure(self, prompt, image, new_tokens, prompt_ids) -> dict:
        torch = self.torch
        from transformers import DynamicCache

        lm = self.model.language_model
        ids = torch.tensor([prompt_ids])
        is_img = ids == self.model.image_token_id
        t0 = time.perf_counter()
        with torch.inference_mode():
            pre = self.pipe.prepare_image(image).preprocessed
            feats = self.model.get_image_features(torch.from_numpy(pre.pixel_values))
            feats = torch.from_numpy(np.asarray(pre.select_tokens(feats.numpy())))
            t_vision = time.perf_counter()
            embeds = lm.get_input_embeddings()(torch.where(is_img, 0, ids))
            embeds[is_img] = feats.to(embeds.dtype)
            cache = DynamicCache()
            out = lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[0, -1].argmax()
            tokens = [int(token)]
            t_first = time.perf_counter()
            steps = []
            for _ in range(new_tokens - 1):
                s = time.perf_counter()
                out = lm(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True,
                         logits_to_keep=1)
                token = out.logits[0, -1].argmax()
                tokens.append(int(token))
                steps.append(time.perf_counter() - s)
        return {"vision_graph_s": t_vision - t0, "ttft_s": t_first - t0, "prefill_graph_s": t_first - t_vision,
                "decode_tokens_per_s": len(steps) / sum(steps), "token_ids": tokens, "tiles": pre.num_tiles}


class OrtGenAI:
    name = "ortgenai"

    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        t0 = time.perf_counter()
        self.model = load_genai(model_dir, threads)
        self.load_s = time.perf_counter() - t0
        self.weights = genai_bytes_per_token(model_dir)

    def measure(self, prompt, image, new_tokens, prompt_ids) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        n = len(prompt_ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=n, min_length=n)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))  # prefill
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        t_first = time.perf_counter()
        stamps = [t_first]
        while not gen.is_done() and len(tokens) < new_tokens:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        steps = np.diff(stamps)
        return {"ttft_s": t_first - t0, "prefill_graph_s": t_first - t0,
                "decode_tokens_per_s": len(steps) / float(np.sum(steps)), "token_ids": tokens}


class LlamaCpp:
    """llama.cpp through llama-cpp-python: prefill the prompt ids in one batch, then greedy decode one token
    per ``llama_decode`` (argmax of the last logits; no stop on end-of-generation tokens, so every
    contender decodes ``new_tokens``)."""

    def __init__(self, name: str, path: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.name = name
        self.llama_cpp = llama_cpp
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.load_s = time.perf_counter() - t0
        self.n_vocab = self.llm.n_vocab()
        self.weights = gguf_bytes_per_token(path)
        self.threads = threads

    def _argmax(self) -> int:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def measure(self, prompt, image, new_tokens, prompt_ids) -> dict:
        llm = self.llm
        llm.reset()  # n_tokens = 0: eval() then drops the whole KV cache before the prefill
        t0 = time.perf_counter()
        llm.eval(list(prompt_ids))  # prefill (one batch: n_batch 512 >= the ~300 prompt tokens)
        tokens = [self._argmax()]
        t_first = time.perf_counter()
        stamps = [t_first]
        while len(tokens) < new_tokens:
            llm.eval([tokens[-1]])
            tokens.append(self._argmax())
            stamps.append(time.perf_counter())
        steps = np.diff(stamps)
        return {"ttft_s": t_first - t0, "prefill_graph_s": t_first - t0,
                "decode_tokens_per_s": len(steps) / float(np.sum(steps)), "token_ids": tokens,
                "threads": self.threads}


# --------------------------------------------------------------------------------------------
# batched: several text-only sequences decoded at once


def batch_prompt_rows(base: list[int], rows: int, pad_id: int | None = None) -> list[list[int]]:
    """``rows`` different prompts of one length: ``base`` with everything after its first token rotated
    left by the row's index. One length, because llama-batched-bench takes a single prompt length and
    so no contender pads; the same ids, so every row is valid for every contender's vocabulary. ORT GenAI
    masks ``pad_id`` as padding, so a prompt holding it is refused."""
    base = [int(t) for t in base]
    if rows < 1 or len(base) < rows + 1:
        raise SystemExit(f"a batch of {rows} rows needs a prompt of more than {rows} tokens, got {len(base)}")
    if pad_id is not None and pad_id in base:
        raise SystemExit(f"the prompt holds token {pad_id}, ORT GenAI's pad token; choose another --batch-prompt-len")
    head, tail = base[:1], base[1:]
    out = [head + tail[i:] + tail[:i] for i in range(rows)]
    if len({tuple(r) for r in out}) != rows:
        raise SystemExit("the batch prompt repeats itself, so its rotations are not all different; "
                         "choose another --batch-prompt-len")
    return out


_BENCH_COLUMNS = {"PP": "pp", "TG": "tg", "B": "rows", "N_KV": "n_kv", "T_PP s": "prefill_s",
                  "S_PP t/s": "prefill_tokens_per_s", "T_TG s": "decode_s", "S_TG t/s": "decode_tokens_per_s",
                  "T s": "total_s", "S t/s": "total_tokens_per_s"}


def parse_batched_bench(text: str) -> dict:
    """llama-batched-bench's Markdown output: its settings line (``n_kv_max = ..., n_threads = ...``) and
    one dict per table row, keyed as ``_BENCH_COLUMNS`` names them (S_TG = B*TG / T_TG: the aggregate
    decode tokens/s of B sequences; S_PP = B*PP / T_PP without ``-pps``)."""
    import re

    settings, header, rows = {}, None, []
    for line in text.splitlines():
        line = line.strip()
        if "n_kv_max =" in line:
            settings = {k: int(v) for k, v in re.findall(r"(\w+) = (-?\d+)", line)}
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            if "S_TG t/s" in cells:
                header = cells
            continue
        if all(set(c) <= set("-:") for c in cells):
            continue
        if len(cells) != len(header):
            raise ValueError(f"llama-batched-bench row {line!r} does not match its header {header}")
        row = {}
        for name, cell in zip(header, cells):
            key = _BENCH_COLUMNS.get(name)
            if key:
                row[key] = int(cell) if key in ("pp", "tg", "rows", "n_kv") else float(cell)
        rows.append(row)
    if header is None or not rows:
        raise ValueError("no llama-batched-bench table in its output")
    return {"settings": settings, "rows": rows}


class OursBatched:
    """Our batched decode as ``flashvl serve`` runs it: the continuous-batching scheduler
    (runtime/scheduler.py), every row submitted at once (``Scheduler.submit_all``), greedy, EOS ignored.
    The rows prefill together (the step core's batched chunks, a budget that takes a chunk of every row
    per step) and join one batch; then one LLM run per step decodes a token for every row, and each row
    samples and detokenizes its token as a server request does."""

    def __init__(self, name: str, bundle: Path):
        from flashvl_edge.runtime.pipeline import Pipeline

        self.name = name
        t0 = time.perf_counter()
        self.pipe = Pipeline.from_bundle(bundle, image_cache_bytes=0, kv_cache_bytes=0)  # every row prefilled
        self.load_s = time.perf_counter() - t0

    def measure(self, prompts: list[list[int]], new_tokens: int) -> dict:
        import asyncio

        from flashvl_edge.runtime.generate import SamplingParams
        from flashvl_edge.runtime.pipeline import PreparedPrompt
        from flashvl_edge.runtime.scheduler import GenerationRequest, Scheduler, TokenEvent

        n, length = len(prompts), len(prompts[0])
        requests = [GenerationRequest(PreparedPrompt(token_ids=list(ids), image_mask=[False] * len(ids), images=[],
                                                     n_image_tokens=0, n_tiles=0),
                                      SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))
                    for ids in prompts]

        async def drive():
            # a budget that takes a chunk of every row each step: the rows prefill together (batched
            # chunks) and all start decoding at the same step
            chunk = self.pipe.generator.prefill_chunk
            sched = Scheduler(self.pipe, max_batch=n, max_queue=n, max_num_batched_tokens=n * chunk + n).start()
            try:
                t0 = time.perf_counter()
                handles = sched.submit_all(requests)

                async def tokens(handle):
                    return [(ev.token_id, ev.time) async for ev in handle if isinstance(ev, TokenEvent)]
                got = await asyncio.gather(*[tokens(h) for h in handles])
                return t0, got, [h.finished for h in handles], sched.steps
            finally:
                sched.shutdown(5)

        calls = self.pipe.llm.start_timeline()
        try:
            t0, got, finished, steps = asyncio.run(drive())
        finally:
            self.pipe.llm.stop_timeline()
        for fin in finished:
            if fin is None or fin.finish_reason != "length":
                raise SystemExit(f"a batched request ended with {fin and fin.finish_reason}: {fin and fin.error}")
        # the rows prefill together in batched chunks, then every step decodes all n of them
        decode_calls = calls[len(calls) - (new_tokens - 1):]
        prefill_calls = calls[:len(calls) - len(decode_calls)]
        steps = len(decode_calls)
        if any(c.size != n for c in decode_calls) or sum(c.size for c in prefill_calls) != n * length:
            raise SystemExit(f"the scheduler did not decode the {n} rows as one batch "
                             f"({steps} steps, call sizes {[c.size for c in decode_calls]})")
        first_step = decode_calls[0].start
        decode_s = max(ts[-1][1] for ts in got) - first_step  # the last step's sampling included
        decode_graph_s = sum(c.end - c.start for c in decode_calls)
        prefill_s = first_step - t0  # the n rows' batched prefill chunks, their first tokens, the KV merges
        return {"rows": n, "prompt_tokens": length, "decode_steps": steps,
                "prefill_s": prefill_s, "prefill_tokens_per_s": n * length / prefill_s,
                "prefill_graph_s": sum(c.end - c.start for c in prefill_calls),
                "decode_s": decode_s, "decode_tokens_per_s": n * steps / decode_s,
                "decode_graph_tokens_per_s": n * steps / decode_graph_s,
                "step_ms": 1e3 * decode_s / steps,
                "overhead_ms_per_step": 1e3 * (decode_s - decode_graph_s) / steps,
                "token_ids": [[t for t, _ in ts] for ts in got]}


def load_genai(model_dir: Path, threads: int):
    """ORT GenAI's model with its decoder session's intra-op threads set (ORT's default counts cores
    itself; the contenders all get the same number)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


class OrtGenAIBatched(OrtGenAI):
    """ORT GenAI's Generator over a batch: ``batch_size`` = rows, the [rows, length] prompt ids appended at
    once (one batched prefill), then one ``generate_next_token`` per step for all rows, greedy, no early
    stop (min_length = max_length)."""

    def __init__(self, model_dir: Path, threads: int):
        super().__init__(model_dir, threads)
        self.pad_token_id = json.loads((model_dir / "genai_config.json").read_text())["model"].get("pad_token_id")
        self.threads = threads

    def measure(self, prompts: list[list[int]], new_tokens: int) -> dict:
        og = self.og
        n, length = len(prompts), len(prompts[0])
        params = og.GeneratorParams(self.model)
        total = length + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=n)
        gen = og.Generator(self.model, params)
        ids = np.asarray(prompts, dtype=np.int32)
        t0 = time.perf_counter()
        gen.append_tokens(ids)  # prefill of every row in one run
        gen.generate_next_token()
        tokens = [np.array(gen.get_next_tokens())]
        stamps = [time.perf_counter()]
        while not gen.is_done() and len(tokens) < new_tokens:
            gen.generate_next_token()
            tokens.append(np.array(gen.get_next_tokens()))
            stamps.append(time.perf_counter())
        steps = len(stamps) - 1
        if steps != new_tokens - 1:
            raise SystemExit(f"ORT GenAI stopped after {steps + 1} of {new_tokens} tokens")
        decode_s = stamps[-1] - stamps[0]
        prefill_s = stamps[0] - t0
        return {"rows": n, "prompt_tokens": length, "decode_steps": steps, "threads": self.threads,
                "prefill_s": prefill_s, "prefill_tokens_per_s": n * length / prefill_s,
                "decode_s": decode_s, "decode_tokens_per_s": n * steps / decode_s,
                "step_ms": 1e3 * decode_s / steps,
                "token_ids": np.stack(tokens, axis=1).astype(int).tolist()}


class LlamaBatchedBench:
    """llama.cpp's own batched benchmark (``llama-batched-bench``) on a GGUF, one process per measurement.

    Without ``-pps``: every row has its own prompt (N_KV = B * (PP + TG)), as our rows do; with it llama.cpp
    would prefill one shared prompt and copy its KV, which no contender here is given. ``-npp`` = our prompt
    length, ``-ntg`` = our decode steps (new tokens - 1: the first token comes from the prefill), ``-npl
    1,B``: B rows and one row for reference. The tool feeds random token ids and reads no logits (no
    sampling): speed does not depend on the ids, and its step is the bare ``llama_decode``."""

    def __init__(self, name: str, exe: Path, gguf: Path, threads: int, flash_attn: str):
        self.name, self.exe, self.gguf = name, exe, gguf
        self.threads, self.flash_attn = threads, flash_attn
        self.load_s = None  # each measurement loads the GGUF in its own process, outside its timings

    def command(self, prompt_len: int, new_tokens: int, rows: int) -> list[str]:
        tg = new_tokens - 1
        # every row's prompt and new tokens, per row a multiple of 256 cells: llama.cpp splits the context
        # evenly between the sequences (rounding down), and skips a B whose rows do not fit, silently
        ctx = rows * (-(-(prompt_len + tg) // 256) * 256)
        return [str(self.exe), "-m", str(self.gguf), "-t", str(self.threads), "-tb", str(self.threads),
                "-c", str(ctx), "-b", "2048", "-ub", "512", "-fa", self.flash_attn,
                "-npp", str(prompt_len), "-ntg", str(tg), "-npl", ",".join(sorted({"1", str(rows)}, key=int))]

    def measure(self, prompts: list[list[int]], new_tokens: int) -> dict:
        n, length = len(prompts), len(prompts[0])
        cmd = self.command(length, new_tokens, n)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"llama-batched-bench failed ({proc.returncode}): {tail}")
        parsed = parse_batched_bench(proc.stdout + "\n" + proc.stderr)
        by_rows = {r["rows"]: r for r in parsed["rows"]}
        if n not in by_rows:
            raise SystemExit(f"llama-batched-bench printed no row for B={n}: {' '.join(cmd)}")
        r = by_rows[n]
        return {"rows": n, "prompt_tokens": length, "decode_steps": r["tg"], "threads": self.threads,
                "prefill_s": r["prefill_s"], "prefill_tokens_per_s": r["prefill_tokens_per_s"],
                "decode_s": r["decode_s"], "decode_tokens_per_s": r["decode_tokens_per_s"],
                "step_ms": 1e3 * r["decode_s"] / r["tg"],
                "one_row_decode_tokens_per_s": by_rows[1]["decode_tokens_per_s"] if 1 in by_rows else None,
                "bench_settings": parsed["settings"], "bench_rows": parsed["rows"], "command": " ".join(cmd)}


BATCHED_RATIOS = ("ortgenai", "llamacpp-q4_0", "llamacpp-q4_k_m")


def run_batched(args, report: dict, p: dict[str, Path]) -> None:
    """Every batched contender once per repetition, round robin (the start rotated per repetition), on the
    same rows; ratios ours / theirs per repetition, the median reported."""
    from flashvl_edge.runtime.backends.ort import physical_cores
    from flashvl_edge.runtime.bench import make_prompt

    if args.new_tokens < 2:
        raise SystemExit("the batched comparison needs --new-tokens >= 2 (one decode step at least)")
    threads = physical_cores()
    contenders = {"ours-q": OursBatched("ours-q", p["q"]), "ortgenai": OrtGenAIBatched(p["genai"], threads)}
    if not args.skip_llamacpp:
        for q in LLAMACPP_QUANTS:
            contenders[f"llamacpp-{q}"] = LlamaBatchedBench(f"llamacpp-{q}", p["batched_bench"], p[f"gguf_{q}"],
                                                            args.llamacpp_threads, args.llamacpp_flash_attn)
    pipe = contenders["ours-q"].pipe
    text = make_prompt(pipe.prompts.tokenizer, args.batch_prompt_len)
    base = pipe.prepare_prompt([pipe.prompts.user_message(text, 0)], []).token_ids
    prompts = batch_prompt_rows(base, args.batch, contenders["ortgenai"].pad_token_id)
    log(f"batched: {args.batch} rows of {len(base)} prompt tokens, {args.new_tokens} new tokens each")

    names = list(contenders)
    results: dict[str, list[dict]] = {k: [] for k in names}
    for rep in range(args.warmup + args.reps):
        for name in rotated(names, rep):
            t0 = time.perf_counter()
            r = contenders[name].measure(prompts, args.new_tokens)
            log(f"batched rep {rep} {name}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode "
                f"{r['decode_tokens_per_s']:.2f} tok/s aggregate ({time.perf_counter() - t0:.0f} s)")
            if rep >= args.warmup:
                r["rep"] = rep - args.warmup
                results[name].append(r)
        gc.collect()
    load_s = {k: c.load_s for k, c in contenders.items()}
    contenders.clear()
    gc.collect()

    summary = {name: {k: med([r.get(k) for r in rs]) for k in
                      ("prefill_s", "prefill_tokens_per_s", "decode_tokens_per_s", "step_ms",
                       "decode_graph_tokens_per_s", "overhead_ms_per_step", "one_row_decode_tokens_per_s")}
               for name, rs in results.items()}
    ratios, ratios_per_rep, targets = {}, {}, {}
    for theirs in BATCHED_RATIOS:
        if theirs not in results:
            continue
        tag = theirs.replace("-", "_")
        for what in ("decode", "prefill"):
            key = f"batched_{what}_int4_vs_{tag}"
            ratios_per_rep[key] = per_rep_ratios(results, "ours-q", theirs, f"{what}_tokens_per_s")
            ratios[key] = med(ratios_per_rep[key])
        key = f"batched_decode_int4_vs_{tag}"
        targets[key] = {"target": ">= 1.0", "value": ratios[key],
                        "met": None if ratios[key] is None else ratios[key] >= 1.0}
    report["batched"] = {"rows": args.batch, "prompt_tokens": len(base), "new_tokens": args.new_tokens,
                         "decode_steps": args.new_tokens - 1, "threads": threads,
                         "llamacpp_threads": None if args.skip_llamacpp else args.llamacpp_threads,
                         "llamacpp_flash_attn": None if args.skip_llamacpp else args.llamacpp_flash_attn,
                         "shared_prompt": False, "prompt_token_ids": prompts, "load_s": load_s,
                         "results": results, "summary": summary, "ratios": ratios,
                         "ratios_per_rep": ratios_per_rep, "targets": targets}

    print(f"batched: {args.batch} rows x {len(base)} prompt tokens (each its own), {args.new_tokens} new tokens "
          f"per row ({args.new_tokens - 1} batched steps), greedy; {args.reps} repetitions after {args.warmup} warm-up")
    print(f"{'contender':16s} {'prefill s':>10s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'step ms':>9s} "
          f"{'graph tok/s':>12s} {'overhead ms':>12s} {'1-row tok/s':>12s}")
    for name, s in summary.items():
        print(f"{name:16s} {fmt(s['prefill_s']):>10s} {fmt(s['prefill_tokens_per_s'], 1):>14s} "
              f"{fmt(s['decode_tokens_per_s']):>13s} {fmt(s['step_ms'], 1):>9s} {fmt(s['decode_graph_tokens_per_s']):>12s} "
              f"{fmt(s['overhead_ms_per_step'], 2):>12s} {fmt(s['one_row_decode_tokens_per_s']):>12s}")
    print("batched ratios ours / theirs (median over repetitions; per repetition) and targets:")
    for key, value in ratios.items():
        t = targets.get(key)
        reps = " / ".join(f"{v:.3f}" for v in ratios_per_rep[key])
        mark = "(no target)" if t is None else (f"target {t['target']} "
                                                f"{'' if t['met'] is None else ('met' if t['met'] else 'MISSED')}")
        print(f"  {key:38s} {fmt(value, 3):>8s}  [{reps}]  {mark}")


# --------------------------------------------------------------------------------------------
# run


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    per = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    glob = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
    return {"per_token_mean": float(per.mean()), "per_token_min": float(per.min()), "global": glob}


def chat_peak_rss(bundle: Path, image: Path, new_tokens: int) -> dict:
    """Peak RSS of a separate ``flashvl chat`` process on ``bundle`` (os.wait4's rusage of that child)."""
    cmd = FLASHVL + ["chat", str(bundle), "--image", str(image), "--prompt", "Describe the image.",
                     "--max-new-tokens", str(new_tokens)]
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")[-500:]
    if proc.returncode != 0:
        raise SystemExit(f"flashvl chat failed ({proc.returncode}): {err}")
    from flashvl_edge.runtime import bench
    from flashvl_edge.runtime.bundle import Bundle

    weights = bench.weight_file_bytes(Bundle.load(bundle))
    rss = usage.ru_maxrss * 1024
    return {"command": " ".join(cmd), "peak_rss_bytes": rss, "weight_file_bytes": weights,
            "ratio": rss / weights}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits: int = 2) -> str:
    """A number for the tables, "-" for one not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def rotated(names: list[str], rep: int) -> list[str]:
    """The round-robin order of repetition ``rep``: the starting contender moves by one each time, so
    machine noise hits every contender alike."""
    return names[rep % len(names):] + names[:rep % len(names)]


def per_rep_ratios(results: dict[str, list[dict]], a: str, b: str, key: str) -> list[float]:
    """``a``'s ``key`` over ``b``'s, repetition by repetition (where both were measured)."""
    return [ra[key] / rb[key] for ra, rb in zip(results.get(a, []), results.get(b, [])) if ra.get(key) and rb.get(key)]


def report_path(args) -> Path:
    """``--out``, else WORK/compare.json; WORK/compare-batched.json for ``--batched-only``, so that a batched
    run alone does not replace the full report."""
    if args.out:
        return Path(args.out)
    return Path(args.work) / ("compare-batched.json" if args.batched_only else "compare.json")


def run(args) -> None:
    from flashvl_edge.runtime.backends.ort import physical_cores
    from flashvl_edge.runtime.bench import machine_info

    work = Path(args.work)
    p = paths(work)
    if args.batched_only and args.batch < 1:
        raise SystemExit("--batched-only needs --batch >= 1")
    needed = ["q", "genai"] + ([] if args.batched_only else ["fp32", "image"])
    for key in needed:
        if not p[key].exists():
            raise SystemExit(f"{p[key]} is missing; run 'python benchmarks/compare.py prepare --work {work}' first")
    if args.batch and not args.skip_llamacpp:
        for key in ("batched_bench", *(f"gguf_{q}" for q in LLAMACPP_QUANTS)):
            if not p[key].exists():
                raise SystemExit(f"{p[key]} is missing; run 'python benchmarks/compare.py prepare --work {work}' "
                                 "(or pass --skip-llamacpp)")
    report: dict = {"preset": args.preset, "seed": args.seed, "machine": machine_info(),
                    "settings": {"reps": args.reps, "warmup": args.warmup, "new_tokens": args.new_tokens,
                                 "prompt_len": args.prompt_len, "threads": physical_cores(),
                                 "batch": args.batch, "batch_prompt_len": args.batch_prompt_len,
                                 "batched_only": args.batched_only},
                    "command": " ".join([Path(sys.executable).name] + sys.argv)}
    if not args.batched_only:
        run_single(args, report, p)
    if args.batch:
        run_batched(args, report, p)
    out = report_path(args)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def run_single(args, report: dict, p: dict[str, Path]) -> None:
    """One sequence at a time: every contender, vision included where it has one, and the bandwidth limit."""
    from flashvl_edge.runtime.backends.ort import physical_cores
    from flashvl_edge.runtime.bench import make_prompt

    if not args.skip_chat_rss:
        # first, alone, so its peak RSS is its own: no double copies of the weights
        report["chat_peak_rss_int4"] = chat_peak_rss(p["q"], p["image"], 8)
        log(f"flashvl chat peak RSS {report['chat_peak_rss_int4']['ratio']:.2f}x the weight files")
    bw = [measure_bandwidth()]
    bw_ort = [measure_bandwidth_ort()]
    log(f"bandwidth {bw[0]['bytes_per_s'] / 1e9:.1f} GB/s (numpy), {bw_ort[0]['bytes_per_s'] / 1e9:.1f} GB/s (ORT)")

    from PIL import Image

    image = Image.open(p["image"]).convert("RGB")
    contenders = {}
    contenders["ours-fp32"] = Ours("ours-fp32", p["fp32"])
    contenders["ours-q"] = Ours("ours-q", p["q"])
    contenders["ortgenai"] = OrtGenAI(p["genai"], physical_cores())
    if not args.skip_llamacpp:
        for q in LLAMACPP_QUANTS:
            if not p[f"gguf_{q}"].exists():
                raise SystemExit(f"{p[f'gguf_{q}']} is missing; run prepare (or pass --skip-llamacpp)")
            # 2 threads = the physical cores here (issue 13); n_ctx: the prompt plus the new tokens fit
            contenders[f"llamacpp-{q}"] = LlamaCpp(f"llamacpp-{q}", p[f"gguf_{q}"], args.llamacpp_threads,
                                                   n_ctx=2048)
    if not args.skip_torch:
        contenders["torch"] = TorchEager(args.preset, args.seed, physical_cores(), contenders["ours-fp32"].pipe)
    report["load_s"] = {k: c.load_s for k, c in contenders.items()}
    prompt = make_prompt(contenders["ours-fp32"].pipe.prompts.tokenizer, args.prompt_len)
    first = contenders["ours-fp32"].pipe.chat(prompt, image=image, max_new_tokens=1)
    prompt_ids = first.prompt_token_ids
    report["prompt_tokens"] = len(prompt_ids)

    # vision INT8 accuracy: the same tiles through both vision graphs
    pv = contenders["ours-fp32"].pipe.prepare_image(image).preprocessed.pixel_values
    report["vision_int8_cosine"] = cosine_stats(contenders["ours-fp32"].vision_embeds(pv),
                                                contenders["ours-q"].vision_embeds(pv))

    names = list(contenders)
    results: dict[str, list[dict]] = {k: [] for k in names}
    # The bandwidth probe also runs between measurements: each decode is compared with the better of
    # the probes just before and just after it (the same 1 GiB matrix, best of 5 each).
    probe = BandwidthProbe(args.probe_gib)
    last_probe = probe()
    for rep in range(args.warmup + args.reps):
        for name in rotated(names, rep):
            t0 = time.perf_counter()
            r = contenders[name].measure(prompt, image, args.new_tokens, prompt_ids)
            r.pop("decode_step_ms", None), r.pop("decode_graph_ms", None)
            after = probe()
            r["local_bandwidth_bytes_per_s"] = max(last_probe["bytes_per_s"], after["bytes_per_s"])
            last_probe = after
            log(f"rep {rep} {name}: ttft {r['ttft_s']:.2f} s, decode {r['decode_tokens_per_s']:.2f} tok/s "
                f"({time.perf_counter() - t0:.0f} s; local bandwidth "
                f"{r['local_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
            if rep >= args.warmup:
                r["rep"] = rep - args.warmup
                results[name].append(r)
        gc.collect()
    weights = {k: getattr(c, "weights", None) for k, c in contenders.items()}
    contenders.clear()  # free the models (and the probe's matrix) before the last bandwidth measurements
    del probe
    gc.collect()
    bw.append(measure_bandwidth())
    bw_ort.append(measure_bandwidth_ort())
    bandwidth = max(b["bytes_per_s"] for b in bw)
    report["bandwidth"] = {"bytes_per_s": bandwidth, "runs": bw, "ort_runs": bw_ort,
                           "probe_gib": args.probe_gib}
    report["results"] = results

    def ratio(a, b, key, invert=False):  # median of the per-repetition ratios; invert: b's over a's
        return med(per_rep_ratios(results, b, a, key) if invert else per_rep_ratios(results, a, b, key))

    if "torch" in results:
        weights["torch"] = weights["ours-fp32"]  # the same fp32 weights
    for name in names:
        w = weights.get(name)
        for r in results[name]:
            if w and r.get("decode_tokens_per_s"):
                # what this decode streamed, and its fraction of the bandwidth measured around it
                r["streamed_bytes_per_s"] = r["decode_tokens_per_s"] * w["bytes_per_token"]
                r["fraction_of_limit"] = r["streamed_bytes_per_s"] / r["local_bandwidth_bytes_per_s"]
    for name in names:
        for r in results[name]:
            if r.get("prefill_graph_s"):
                r["prefill_tokens_per_s"] = report["prompt_tokens"] / r["prefill_graph_s"]
    summary: dict = {}
    for name in names:
        rs = results[name]
        summary[name] = {k: med([r.get(k) for r in rs]) for k in
                         ("vision_graph_s", "ttft_s", "prefill_graph_s", "prefill_tokens_per_s",
                          "decode_tokens_per_s",
                          "overhead_ms_per_token", "local_bandwidth_bytes_per_s", "streamed_bytes_per_s",
                          "fraction_of_limit")}
        w = weights.get(name)
        if w:
            summary[name]["bytes_per_token"] = w["bytes_per_token"]
            local = summary[name]["local_bandwidth_bytes_per_s"]
            summary[name]["bandwidth_limit_tokens_per_s"] = local / w["bytes_per_token"]
    # agreement of greedy tokens (same weights, same inputs): a sanity check that we compare like with like
    agree = {}
    ref = results["ours-fp32"][0]["token_ids"]
    for name in names:
        other = results[name][0]["token_ids"]
        agree[name] = next((i for i, (x, y) in enumerate(zip(ref, other)) if x != y), min(len(ref), len(other)))
    report["greedy_prefix_agreement_with_ours_fp32"] = agree
    ratios = {
        "decode_fp32_vs_torch": ratio("ours-fp32", "torch", "decode_tokens_per_s"),
        "decode_fp32_fraction_of_limit": summary["ours-fp32"]["fraction_of_limit"],
        "decode_int4_vs_ortgenai": ratio("ours-q", "ortgenai", "decode_tokens_per_s"),
        "decode_int4_fraction_of_limit": summary["ours-q"]["fraction_of_limit"],
        "vision_int8_speedup_vs_fp32": ratio("ours-q", "ours-fp32", "vision_graph_s", invert=True),
        "vision_int8_cosine_per_token_mean": report["vision_int8_cosine"]["per_token_mean"],
        "overhead_ms_per_token_fp32": summary["ours-fp32"]["overhead_ms_per_token"],
        "overhead_ms_per_token_q": summary["ours-q"]["overhead_ms_per_token"],
        "ttft_fp32_over_torch": ratio("ours-fp32", "torch", "ttft_s"),
        "ttft_q_over_torch": ratio("ours-q", "torch", "ttft_s"),
        "decode_ortgenai_vs_torch": ratio("ortgenai", "torch", "decode_tokens_per_s"),
        "decode_int4_vs_llamacpp_q4_0": ratio("ours-q", "llamacpp-q4_0", "decode_tokens_per_s"),
        "decode_int4_vs_llamacpp_q4_k_m": ratio("ours-q", "llamacpp-q4_k_m", "decode_tokens_per_s"),
        "prefill_int4_vs_llamacpp_q4_0": ratio("ours-q", "llamacpp-q4_0", "prefill_tokens_per_s"),
        "prefill_int4_vs_llamacpp_q4_k_m": ratio("ours-q", "llamacpp-q4_k_m", "prefill_tokens_per_s"),
    }
    targets = {
        "decode_fp32_vs_torch": (">=", 1.3), "decode_fp32_fraction_of_limit": (">=", 0.90),
        "decode_int4_vs_ortgenai": (">=", 1.0), "decode_int4_fraction_of_limit": (">=", 0.75),
        "vision_int8_speedup_vs_fp32": (">=", 2.0), "vision_int8_cosine_per_token_mean": (">=", 0.99),
        "overhead_ms_per_token_fp32": ("<=", 0.5), "overhead_ms_per_token_q": ("<=", 0.5),
        "ttft_fp32_over_torch": ("<=", 0.5), "ttft_q_over_torch": ("<=", 0.5),
        "decode_int4_vs_llamacpp_q4_0": (">=", 1.0), "decode_int4_vs_llamacpp_q4_k_m": (">=", 1.0),
        "prefill_int4_vs_llamacpp_q4_0": (">=", 1.0),
    }
    report["summary"] = summary
    report["ratios"] = ratios
    report["targets"] = {k: {"target": f"{op} {v}", "value": ratios[k],
                             "met": None if ratios[k] is None else (ratios[k] >= v if op == ">=" else ratios[k] <= v)}
                         for k, (op, v) in targets.items()}

    print(f"bandwidth (numpy float32 matvec, best of 5) before / after the run: "
          f"{bw[0]['bytes_per_s'] / 1e9:.1f} / {bw[1]['bytes_per_s'] / 1e9:.1f} GB/s; ONNX Runtime MatMul: "
          f"{bw_ort[0]['bytes_per_s'] / 1e9:.1f} / {bw_ort[1]['bytes_per_s'] / 1e9:.1f} GB/s; limits below use "
          f"the probes around each measurement ({args.probe_gib:g} GiB)")
    print(f"{'contender':16s} {'vision s':>9s} {'TTFT s':>8s} {'prefill tok/s':>14s} {'decode tok/s':>13s} "
          f"{'bytes/token':>12s} {'limit tok/s':>12s} "
          f"{'of limit':>9s} {'streamed GB/s':>14s} {'local GB/s':>11s} {'overhead ms':>12s}")
    for name in names:
        s = summary[name]
        streamed = s.get("streamed_bytes_per_s")
        bpt = s.get("bytes_per_token")
        print(f"{name:16s} {fmt(s['vision_graph_s']):>9s} {fmt(s['ttft_s']):>8s} {fmt(s['prefill_tokens_per_s'], 1):>14s} "
              f"{fmt(s['decode_tokens_per_s']):>13s} {('-' if bpt is None else f'{bpt / 2**30:.3f} GiB'):>12s} "
              f"{fmt(s.get('bandwidth_limit_tokens_per_s')):>12s} {fmt(s.get('fraction_of_limit')):>9s} "
              f"{fmt(streamed and streamed / 1e9, 1):>14s} "
              f"{fmt(s.get('local_bandwidth_bytes_per_s') and s['local_bandwidth_bytes_per_s'] / 1e9, 1):>11s} "
              f"{fmt(s['overhead_ms_per_token'], 3):>12s}")
    print("ratios (median over repetitions) and targets:")
    for k, t in report["targets"].items():
        v = t["value"]
        print(f"  {k:38s} {('-' if v is None else f'{v:.3f}'):>8s}  target {t['target']:8s} "
              f"{'' if t['met'] is None else ('met' if t['met'] else 'MISSED')}")
    print(f"  {'decode_ortgenai_vs_torch':38s} {ratios['decode_ortgenai_vs_torch'] or 0:>8.3f}  (no target)")
    if ratios["prefill_int4_vs_llamacpp_q4_k_m"] is not None:
        print(f"  {'prefill_int4_vs_llamacpp_q4_k_m':38s} {ratios['prefill_int4_vs_llamacpp_q4_k_m']:>8.3f}  (no target)")
    if "chat_peak_rss_int4" in report:
        c = report["chat_peak_rss_int4"]
        print(f"flashvl chat peak RSS on the int4 bundle: {c['peak_rss_bytes'] / 2**20:.0f} MiB = {c['ratio']:.2f}x "
              f"its {c['weight_file_bytes'] / 2**20:.0f} MiB of weight files (target <= 1.3x)")
    print(f"greedy tokens equal to ours-fp32 for the first N: {agree}")


def markdown(args) -> None:
    """compare.json as the Markdown tables docs/performance.md shows."""
    r = json.loads(report_path(args).read_text())
    if "summary" in r:
        markdown_single(r)
    if "batched" in r:
        if "summary" in r:
            print()
        markdown_batched(r)


def markdown_batched(r: dict) -> None:
    b = r["batched"]
    m = r["machine"]
    fa = f", llama.cpp flash attention {b['llamacpp_flash_attn']}" if b.get("llamacpp_flash_attn") else ""
    print(f"Batched, text only: {b['rows']} rows of {b['prompt_tokens']} prompt tokens, each row its own prompt "
          f"(not shared: llama-batched-bench without -pps), {b['new_tokens']} new tokens per row, greedy "
          f"({b['decode_steps']} batched decode steps); {b['threads']} threads{fa}; "
          f"{m.get('cpu')}, onnxruntime {m.get('onnxruntime')}; "
          f"{r['settings']['reps']} repetitions after {r['settings']['warmup']} warm-up.\n")
    print("| contender | prefill s | prefill tok/s | decode tok/s (all rows) | step ms | graph-only decode tok/s "
          "| overhead ms/step | 1-row decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in b["summary"].items():
        print(f"| {name} | {fmt(s.get('prefill_s'))} | {fmt(s.get('prefill_tokens_per_s'), 1)} | "
              f"{fmt(s.get('decode_tokens_per_s'))} | {fmt(s.get('step_ms'), 1)} | "
              f"{fmt(s.get('decode_graph_tokens_per_s'))} | {fmt(s.get('overhead_ms_per_step'))} | "
              f"{fmt(s.get('one_row_decode_tokens_per_s'))} |")
    print("\n| ours / theirs | value (median) | per repetition | target | met |")
    print("|---|---|---|---|---|")
    for k, v in b["ratios"].items():
        t = b["targets"].get(k)
        reps = " / ".join(f"{x:.3f}" for x in b["ratios_per_rep"][k])
        met = "-" if t is None or t["met"] is None else ("yes" if t["met"] else "**no**")
        print(f"| {k} | {fmt(v, 3)} | {reps} | {'-' if t is None else t['target']} | {met} |")


def markdown_single(r: dict) -> None:
    m = r["machine"]
    probes = " / ".join(f"{b['bytes_per_s'] / 1e9:.1f}" for b in r["bandwidth"]["runs"])
    print(f"Machine: {m.get('cpu')} ({m.get('logical_cpus')} CPUs, {r['settings']['threads']} physical cores), "
          f"onnxruntime {m.get('onnxruntime')}; bandwidth before / after the run "
          f"{probes} GB/s; "
          f"{r['prompt_tokens']} prompt tokens, {r['settings']['new_tokens']} new tokens, "
          f"{r['settings']['reps']} repetitions after {r['settings']['warmup']} warm-up.\n")
    print("| contender | vision s | TTFT s | prefill tok/s | decode tok/s | bytes/token | local bandwidth GB/s | limit tok/s | of limit "
          "| streamed GB/s | overhead ms/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in r["summary"].items():
        bpt, streamed = s.get("bytes_per_token"), s.get("streamed_bytes_per_s")
        print(f"| {name} | {fmt(s.get('vision_graph_s'))} | {fmt(s.get('ttft_s'))} | {fmt(s.get('prefill_tokens_per_s'), 1)} | "
              f"{fmt(s.get('decode_tokens_per_s'))} | "
              f"{'-' if bpt is None else f'{bpt / 2**30:.3f} GiB'} | "
              f"{fmt(s.get('local_bandwidth_bytes_per_s') and s['local_bandwidth_bytes_per_s'] / 1e9, 1)} | "
              f"{fmt(s.get('bandwidth_limit_tokens_per_s'))} | "
              f"{fmt(s.get('fraction_of_limit'))} | {fmt(streamed and streamed / 1e9, 1)} | "
              f"{fmt(s.get('overhead_ms_per_token'), 3)} |")
    print("\n| target | value | target | met |")
    print("|---|---|---|---|")
    for k, t in r["targets"].items():
        print(f"| {k} | {fmt(t['value'], 3)} | {t['target']} | {'-' if t['met'] is None else ('yes' if t['met'] else '**no**')} |")
    if "chat_peak_rss_int4" in r:
        c = r["chat_peak_rss_int4"]
        print(f"\n`flashvl chat` on the int4 bundle: peak RSS {c['peak_rss_bytes'] / 2**20:.0f} MiB = "
              f"{c['ratio']:.2f}x its {c['weight_file_bytes'] / 2**20:.0f} MiB of weight files (target <= 1.3x).")
    print(f"\nGreedy tokens identical to ours-fp32 for the first N tokens: {r['greedy_prefix_agreement_with_ours_fp32']}; "
          f"vision int8 vs fp32 cosine: {r['vision_int8_cosine']}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "run", "all", "markdown"):
        s = sub.add_parser(name)
        s.add_argument("--work", default="build/compare", help="work dir (artifacts cached there)")
        s.add_argument("--preset", default="flashvl-2b-static")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--calib-samples", type=int, default=4)
        s.add_argument("--reps", type=int, default=3)
        s.add_argument("--warmup", type=int, default=1)
        s.add_argument("--new-tokens", type=int, default=32)
        s.add_argument("--prompt-len", type=int, default=32)
        s.add_argument("--out", default=None, help="report path (default WORK/compare.json)")
        s.add_argument("--skip-torch", action="store_true")
        s.add_argument("--skip-chat-rss", action="store_true")
        s.add_argument("--skip-llamacpp", action="store_true", help="no llama.cpp contenders (nor their GGUFs)")
        s.add_argument("--llama-cpp-src", default=None,
                       help="llama.cpp source tree (convert_hf_to_gguf.py, models/); default: the sdist of the "
                            "installed llama-cpp-python, fetched once into the work dir")
        s.add_argument("--llamacpp-threads", type=int, default=2)
        s.add_argument("--batch", type=int, default=8,
                       help="rows of the batched comparison (text only, decoded at once); 0 leaves it out")
        s.add_argument("--batched-only", action="store_true",
                       help="only the batched comparison (default report WORK/compare-batched.json)")
        s.add_argument("--batch-prompt-len", type=int, default=256,
                       help="text tokens of each batched row's user message (the chat template adds its own)")
        s.add_argument("--llamacpp-flash-attn", choices=("auto", "on", "off"), default="auto",
                       help="llama-batched-bench -fa (default: llama.cpp's own default, auto)")
        s.add_argument("--probe-gib", type=float, default=1.0,
                       help="size of the bandwidth probe's matrix, kept for the whole run (default 1 GiB)")
    s = sub.add_parser("_save-hf")
    s.add_argument("--preset", required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("_quantize")
    s.add_argument("--src", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--quant", required=True, choices=list(LLAMACPP_QUANTS))
    s.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "_quantize":
        llamacpp_quantize(Path(args.src), Path(args.dst), args.quant, args.threads)
        return
    if args.cmd == "_save-hf":
        save_hf_qwen2(args.preset, args.seed, Path(args.out))
        return
    if args.cmd == "markdown":
        markdown(args)
        return
    if args.cmd in ("prepare", "all"):
        prepare(args)
    if args.cmd in ("run", "all"):
        run(args)


if __name__ == "__main__":
    main()
