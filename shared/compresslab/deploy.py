"""Deployment (lab 07): what bounds decode speed, how to measure latency honestly, and two real runtimes.

    weight_bytes_at(linear_params, other_params, bits=4, group_size=64)     # what one decode step must read
    decode_bound(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps)   # -> tokens/s upper bound
    latency_stats(t_request, token_times)                                  # -> TTFT, inter-token latency, tok/s
    time_decode(prefill, step, n_tokens, warmup=1, runs=5, sync=...)       # -> median TTFT, ITL, tok/s, measured
    timed_generate(model, tok, prompt, new_tokens)                         # PyTorch, with per-token timestamps
    build_onnx(out_dir, precision="int4"); OnnxLM(out_dir).timed_generate(...)   # ONNX Runtime (GenAI), CPU
    trtllm_status()  -> (ok, why)                                          # TensorRT-LLM: sm80+ GPU + tensorrt_llm

Decode is memory-bound: each new token reads every weight once (and the whole KV cache of its sequence), while doing
only ~2 FLOPs per weight. So tokens/s <= batch x bandwidth / bytes per step, whatever the FLOPS. A 4-bit model is
faster only if a kernel reads the 4-bit words directly (MatMulNBits in ONNX Runtime, W4A16 GEMMs in TensorRT-LLM);
dequantizing to fp16 first reads more bytes than the fp16 model did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

# ----------------------------------------------------------------------------- the roofline

# Peak memory bandwidth (GB/s, vendor datasheets) and compute capability. Measured copy bandwidth is typically
# 80-90 % of these; the lab measures this machine's instead of trusting a table.
GPUS = {
    "T4": {"bandwidth_GBps": 320, "sm": (7, 5), "memory_GB": 16},
    "A100-80GB-SXM": {"bandwidth_GBps": 2039, "sm": (8, 0), "memory_GB": 80},
    "H100-SXM": {"bandwidth_GBps": 3350, "sm": (9, 0), "memory_GB": 80},
    "H200": {"bandwidth_GBps": 4800, "sm": (9, 0), "memory_GB": 141},
}
# What each generation's tensor cores accelerate for LLM weights (the formats with real kernels in TensorRT-LLM).
FORMATS_BY_GENERATION = {
    "Turing (sm75, T4)": "FP16, INT8 — TensorRT-LLM no longer supports it (dropped after 0.14)",
    "Ampere (sm80/86, A100)": "FP16/BF16, INT8 (W8A8 SmoothQuant), W4A16 (AWQ / GPTQ), 2:4 sparsity",
    "Ada / Hopper (sm89/90, L40S, H100)": "+ FP8 (W8A8 and FP8 KV cache)",
    "Blackwell (sm100+, B200)": "+ NVFP4 / MXFP4 (4-bit floats with block scales)",
}


def validate_weight_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8, 16):
        raise ValueError(f"weight bits must be one of 2, 3, 4, 8, 16 (16 = unquantized fp16), got {bits!r}")
    return bits


def linear_and_other_params(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> tuple[int, int]:
    """(parameters in the decoder's Linear layers, all other parameters) — tied tensors counted once.

    The Linears are what weight-only quantization shrinks; embeddings, the LM head and norms usually stay 16-bit. A
    Linear that cl.quantize already swapped for its storage (quant.QuantLinear: codes in buffers, no weight
    parameter) counts as the in x out parameters it stands for."""
    seen, linear, other = set(), 0, 0
    linear_weights = {id(m.weight) for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and not any(s in n for s in skip)}
    linear += sum(m.in_features * m.out_features for n, m in model.named_modules()
                  if hasattr(m, "dequantized_weight") and not any(s in n for s in skip))
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if id(p) in linear_weights:
            linear += p.numel()
        else:
            other += p.numel()
    return linear, other


def weight_bytes_at(linear_params: int, other_params: int, bits: int = 4, group_size: int | None = 64) -> float:
    """Bytes of the weights with the Linears at `bits` (groups of `group_size` with an fp16 scale and a `bits`-bit
    zero point each) and everything else in fp16. bits=16 means no quantization (no scales)."""
    validate_weight_bits(bits)
    if bits == 16:
        return 2.0 * (linear_params + other_params)
    groups = linear_params / group_size if group_size else 0
    return linear_params * bits / 8 + groups * (2 + bits / 8) + 2.0 * other_params


def deployed_weight_bytes(model: nn.Module, bits: int = 16, nm: tuple[int, int] | None = None,
                          extra_params: int = 0, group_size: int = 64) -> float:
    """Deployable weight bytes: decoder Linears at `bits` with fp16 scales and `bits`-bit zeros per group
    (weight_bytes_at); N:M keeps n of every m values plus 2 bits of position metadata per kept value (the sparse
    tensor core format); `extra_params` fp16 (e.g. low-rank factors); everything else (embeddings, norms) fp16."""
    validate_weight_bits(bits)
    if nm is not None and not (len(nm) == 2 and 0 < nm[0] < nm[1]):
        raise ValueError(f"nm must be (n, m) with 0 < n < m, e.g. (2, 4); got {nm!r}")
    linear, other = linear_and_other_params(model)
    if nm is None:
        return weight_bytes_at(linear, other, bits, group_size) + 2.0 * extra_params
    n, m = nm
    kept = linear * n / m
    value_bits = 16 if bits == 16 else bits
    scales = 0 if bits == 16 else linear / group_size * (2 + bits / 8)
    return kept * value_bits / 8 + kept * 2 / 8 + scales + 2.0 * other + 2.0 * extra_params


def decode_bound(weight_bytes: float, kv_bytes_per_token: float, context: int, batch: int,
                 bandwidth_GBps: float) -> float:
    """Upper bound on generated tokens/s (all sequences together) for one decode step at this context.

    One step reads every weight once for the whole batch, and each sequence's KV cache (context tokens)."""
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token
    return batch * bandwidth_GBps * 1e9 / step_bytes


def paged_kv_tokens(cache_bytes: float, kv_bytes_per_token: float, block_size: int = 16) -> int:
    """Tokens a paged KV cache of cache_bytes holds (lab 07, section 8): whole blocks of block_size tokens, each
    block_size * kv_bytes_per_token bytes; a request of n tokens occupies ceil(n / block_size) blocks.

        paged_kv_tokens(1 * 2**30, 23040)   # 46592: vLLM's "KV cache size: 46,592 tokens" for 1 GiB, SmolLM2 bf16"""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int (vLLM's default is 16), got {block_size!r}")
    if kv_bytes_per_token <= 0 or cache_bytes < 0:
        raise ValueError(f"need kv_bytes_per_token > 0 and cache_bytes >= 0, got {kv_bytes_per_token}, {cache_bytes}")
    return int(cache_bytes // (kv_bytes_per_token * block_size)) * block_size


def measure_bandwidth_GBps(nbytes: int = 256 * 2**20, repeats: int = 5, device: str = "cpu") -> float:
    """Copy bandwidth of this machine: (bytes read + bytes written) / time, best of `repeats`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


# ----------------------------------------------------------------------------- measuring latency


def latency_stats(t_request: float, token_times) -> tuple[float, float, float]:
    """(time to first token, mean inter-token latency, decode tokens/s) from when the request was sent and the time
    each generated token became available. TTFT = prefill + the first token; the decode rate excludes it."""
    times = np.asarray(token_times, dtype=np.float64)
    if times.size < 2:
        raise ValueError("need at least two generated tokens to separate prefill from decode")
    ttft = times[0] - t_request
    itl = (times[-1] - times[0]) / (times.size - 1)
    return float(ttft), float(itl), float(1.0 / itl)


def _no_sync() -> None:
    """A CPU computes synchronously: nothing to wait for."""


def time_decode(prefill, step, n_tokens: int, *, warmup: int = 1, runs: int = 5, clock=time.perf_counter,
                sync=_no_sync) -> tuple[float, float, float]:
    """(median TTFT, median inter-token latency, decode tokens/s) of a generation of n_tokens tokens, in seconds.

    prefill() starts a new generation (the prompt in, the first token out); step() makes the next token. A run is
    prefill() then n_tokens - 1 step()s. `warmup` whole runs go untimed first (compilation, autotuning, caches),
    then `runs` timed ones. On a GPU, calls only queue kernels: sync() (torch.cuda.synchronize) waits for them, so
    it comes before every clock() read. A run's TTFT is start -> first token, its inter-token latency the decode
    span over its n_tokens - 1 intervals; each is the median over the runs (an outlier run moves a mean, not the
    median), and the decode rate is 1 / the median ITL. Lab 07, section 3:

        ttft, itl, tps = time_decode(prefill, step, 16, warmup=1, runs=5, sync=torch.cuda.synchronize)"""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens must be an int >= 2 (the first token is the prefill's), got {n_tokens!r}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for _ in range(warmup):  # untimed, exactly like a timed run
        prefill()
        for _ in range(n_tokens - 1):
            step()
    ttfts, itls = [], []
    for _ in range(runs):
        sync()  # nothing of the warm-up or the last run still queued
        t0 = clock()
        prefill()
        sync()
        times = [clock()]  # when each token is ready on the host, as a streaming server sends it
        for _ in range(n_tokens - 1):
            step()
            sync()
            times.append(clock())
        ttft, itl, _ = latency_stats(t0, times)
        ttfts.append(ttft)
        itls.append(itl)
    itl = float(np.median(itls))
    return float(np.median(ttfts)), itl, 1.0 / itl


class TokenClock:
    """A transformers streamer that stamps the time each new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


@dataclass
class Timed:
    """A timed generation: the tokens and the latency figures (medians over `runs` timed runs, after the same
    number of untimed warm-up runs for every path; ttft_runs / itl_runs keep each run's value for the spread)."""

    tokens: list[int]
    ttft_s: float
    itl_s: float
    tokens_per_s: float
    total_s: float
    runs: int = 1
    ttft_runs: list[float] = field(default_factory=list)
    itl_runs: list[float] = field(default_factory=list)

    @property
    def itl_spread(self) -> str:
        """min–max of the runs' inter-token latency, in ms (the noise to state beside a comparison)."""
        runs = self.itl_runs or [self.itl_s]
        return f"{min(runs) * 1e3:.1f}–{max(runs) * 1e3:.1f} ms"


TIMING_REPEATS, TIMING_WARMUP = 5, 1  # every path in lab 07 (and the capstone) is timed the same way


def median_timed(run, repeats: int = TIMING_REPEATS, warmup: int = TIMING_WARMUP) -> Timed:
    """Call run() -> Timed `warmup` times untimed, then `repeats` times; the median TTFT, ITL and total over the
    timed runs (the decode rate is 1 / median ITL). Greedy runs must produce the same tokens every time."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1 (the issue's standard is 5), got {repeats!r}")
    for _ in range(warmup):
        run()
    done = [run() for _ in range(repeats)]
    if any(t.tokens != done[0].tokens for t in done):
        raise RuntimeError("greedy runs produced different tokens: timing compares different work")
    med = lambda xs: float(np.median(xs))  # noqa: E731
    ttft, itl = [t.ttft_s for t in done], [t.itl_s for t in done]
    return Timed(done[0].tokens, med(ttft), med(itl), 1.0 / med(itl), med([t.total_s for t in done]), repeats,
                 ttft, itl)


@torch.no_grad()
def timed_generate(model, tokenizer, prompt: str, new_tokens: int = 32, repeats: int = TIMING_REPEATS,
                   warmup: int = TIMING_WARMUP) -> Timed:
    """Greedy generation of exactly `new_tokens` tokens with a timestamp per token (batch 1, PyTorch): the median
    of `repeats` timed runs after `warmup` untimed ones."""
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)

    def run() -> Timed:
        clock = TokenClock()
        _sync()
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, pad_token_id=tokenizer.pad_token_id)
        _sync()
        total = time.perf_counter() - t0
        ttft, itl, tps = latency_stats(t0, clock.times)
        return Timed(out[0, enc.input_ids.shape[1]:].tolist(), ttft, itl, tps, total)

    return median_timed(run, repeats, warmup)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dynamic_int8(model: nn.Module, lm_head: bool = True) -> nn.Module:
    """PyTorch's CPU baseline: Linear weights int8 (one scale per tensor), activations quantized per batch at run
    time. lm_head=True quantizes the LM head too (quantize_dynamic's default: every nn.Linear, so a tied head gets
    its own int8 copy while the embedding table stays fp32); False keeps it in the model's dtype."""
    from torch.ao.quantization import quantize_dynamic

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        if lm_head:
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        quantize_dynamic(inner, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return model


def decode_read_bytes(model: nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads, at the dtype each tensor is stored in.

    Every Linear in full (PyTorch dynamic-int8 Linears at their int8 codes plus bias), every norm weight and buffer,
    and one row of each embedding table per token — unless the table is tied to a Linear (the LM head), which then
    reads it in full. lab 07's roofline divides bandwidth by this, not by the bytes the model occupies in RAM."""
    seen, alive, total = set(), [], 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            alive.append(t)  # a dynamic Linear's weight() is a new tensor: keep it, or its address is reused
            total += t.numel() * t.element_size()

    modules = list(model.modules())
    for m in modules:  # Linears first: a tied embedding table is then already counted in full
        if isinstance(m, nn.Linear):
            add(m.weight), add(m.bias)
        elif hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):  # torch.ao dynamic Linear
            add(m.weight()), add(m.bias())
    for m in modules:
        if isinstance(m, nn.Embedding):
            if m.weight.data_ptr() not in seen:
                seen.add(m.weight.data_ptr())
                total += m.weight.shape[1] * m.weight.element_size()  # one row per generated token
        elif not isinstance(m, nn.Linear):
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                add(t)
    return total


def token_agreement(reference: list[int], other: list[int]) -> tuple[float, int]:
    """(fraction of positions with the same greedy token, first position where they differ; len if none)."""
    n = min(len(reference), len(other))
    same = [a == b for a, b in zip(reference[:n], other[:n])]
    first = same.index(False) if False in same else n
    return sum(same) / max(n, 1), first


# ----------------------------------------------------------------------------- ONNX Runtime (GenAI), any CPU


def onnx_status() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError as err:
        return False, (f"ONNX Runtime GenAI is not installed ({err.name}): pip install 'compresslab[deploy]' "
                       "(onnxruntime, onnxruntime-genai, onnx-ir)")
    return True, "onnxruntime-genai available"


def build_onnx(out_dir, precision: str = "int4", model_dir=None, execution_provider: str = "cpu",
               block_size: int = 32, accuracy_level: int = 4, log=None) -> Path:
    """Export the model with onnxruntime-genai's model builder -> out_dir (model.onnx + genai_config.json).

    precision "int4": every MatMul (and the LM head) becomes MatMulNBits, 4-bit RTN in blocks of `block_size`
    along K with fp32 scales; "fp32" keeps the weights. accuracy_level 4 (the CPU default) lets MatMulNBits quantize
    activations to int8 on the fly and use integer dot products (so on CPU it is really W4A8); 1 keeps them fp32.
    Reuses out_dir if it already holds a complete export."""
    if precision not in ("int4", "fp32", "fp16"):
        raise ValueError(f"precision must be 'int4', 'fp32' or 'fp16', got {precision!r}")
    ok, why = onnx_status()
    if not ok:
        raise RuntimeError(why)
    out_dir = Path(out_dir)
    if (out_dir / "genai_config.json").exists() and (out_dir / "model.onnx").exists():
        return out_dir
    stage = hf_folder(out_dir.with_name(out_dir.name + ".src"), model_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(stage), "-o", str(tmp),
           "-p", precision, "-e", execution_provider, "-c", str(stage / "cache")]
    if precision == "int4":
        cmd += ["--extra_options", f"block_size={block_size}", f"accuracy_level={accuracy_level}"]
    log = Path(log) if log else out_dir.with_name(out_dir.name + ".log")
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode != 0 or not (tmp / "genai_config.json").exists():
        raise RuntimeError(f"the ONNX model builder failed (exit {r.returncode}); its log: {log}")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def hf_folder(dest, model_dir=None) -> Path:
    """A Hugging Face folder of the model that exporters accept: links to its files, and a config.json with
    `architectures` (the offline model's GGUF conversion does not write it; builders dispatch on it)."""
    from .models import default_model_dir

    src = Path(model_dir) if model_dir else default_model_dir()
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} is not a Hugging Face model folder (no config.json)")
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    if not config.get("architectures"):
        known = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        if config.get("model_type") not in known:
            raise ValueError(f"unknown architecture for model_type {config.get('model_type')!r}")
        config["architectures"] = [known[config["model_type"]]]
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest


def onnx_bytes(path) -> int:
    """Bytes of the exported weights and graph on disk."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data"))


class OnnxLM:
    """A model exported by build_onnx, run by ONNX Runtime GenAI on the CPU."""

    def __init__(self, path):
        import onnxruntime_genai as og

        path = Path(path)
        if not (path / "genai_config.json").exists():
            raise FileNotFoundError(f"{path} is not an ONNX Runtime GenAI model folder (no genai_config.json); "
                                    "export one with compresslab.deploy.build_onnx")
        self.og = og
        self.model = og.Model(str(path))
        self.tokenizer = og.Tokenizer(self.model)

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def timed_generate(self, prompt_ids: list[int], new_tokens: int = 32, repeats: int = TIMING_REPEATS,
                       warmup: int = TIMING_WARMUP) -> Timed:
        """Greedy, exactly `new_tokens` tokens (the prompt is tokenized by the PyTorch tokenizer: same ids); the
        median of `repeats` timed runs after `warmup` untimed ones, as timed_generate does for PyTorch."""

        def run() -> Timed:
            g = self._generator(len(prompt_ids) + new_tokens)
            times = []
            t0 = time.perf_counter()
            g.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
            while not g.is_done():
                g.generate_next_token()
                times.append(time.perf_counter())
            total = time.perf_counter() - t0
            tokens = [int(t) for t in g.get_sequence(0)[len(prompt_ids):]]
            ttft, itl, tps = latency_stats(t0, times)
            return Timed(tokens, ttft, itl, tps, total)

        return median_timed(run, repeats, warmup)

    def nll(self, ids: list[int]) -> tuple[float, int]:
        """Sum of -log p(token | prefix) over ids[1:], teacher-forced one token at a time through the KV cache."""
        g = self._generator(len(ids) + 1)
        total = 0.0
        for i in range(len(ids) - 1):
            g.append_tokens(np.asarray(ids[i:i + 1], dtype=np.int32))
            logits = np.asarray(g.get_output("logits"), dtype=np.float64).reshape(-1)
            m = logits.max()
            total += m + np.log(np.exp(logits - m).sum()) - logits[ids[i + 1]]
        return total, len(ids) - 1


def onnx_perplexity(lm: OnnxLM, windows: torch.Tensor) -> float:
    """exp(mean NLL) over windows (n, seq_len) of token ids, each scored from its first token."""
    nll, count = 0.0, 0
    for w in windows.tolist():
        s, c = lm.nll(w)
        nll, count = nll + s, count + c
    return float(np.exp(nll / count))


# ----------------------------------------------------------------------------- TensorRT-LLM (sm80+ GPU)


def fp8_support(capability: tuple[int, int]) -> dict[str, bool]:
    """What FP8 buys on a GPU of this compute capability in TensorRT-LLM: an FP8 *KV cache* is a storage format
    (attention dequantizes it), supported from Ampere (sm80) on; FP8 *GEMMs* (W8A8 weights and activations) need
    FP8 tensor cores, Ada/Hopper (sm89/sm90) and newer. An A100 therefore keeps the FP8 KV cache."""
    cap = tuple(capability)
    if len(cap) != 2 or not all(isinstance(c, int) for c in cap):
        raise ValueError(f"capability must be (major, minor), e.g. torch.cuda.get_device_capability(); got {capability!r}")
    return {"kv_cache": cap >= (8, 0), "gemm": cap >= (8, 9)}


def trtllm_status() -> tuple[bool, str]:
    """Whether the TensorRT-LLM path can run here, and if not exactly why and how to get it."""
    if not torch.cuda.is_available():
        return False, ("no CUDA GPU: TensorRT-LLM runs on NVIDIA GPUs (sm80+: A100, L40S, H100, B200). On a GPU "
                       "node, use the NGC container nvcr.io/nvidia/tensorrt-llm/release (see README).")
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        return False, (f"{torch.cuda.get_device_name()} is sm{cap[0]}{cap[1]}: TensorRT-LLM 1.x needs sm80 or newer "
                       "(Turing/T4 support ended after 0.14). Use an A100/H100 (or run the ONNX Runtime path).")
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        return False, ("tensorrt_llm is not importable: run this lab inside the NGC container "
                       "nvcr.io/nvidia/tensorrt-llm/release:<version> (or pip install tensorrt-llm on a "
                       "matching CUDA stack); the cell then runs for real.")
    return True, f"TensorRT-LLM {tensorrt_llm.__version__} on {torch.cuda.get_device_name()}"


def trtllm_benchmark(model_dir, prompts: list[str], batch_sizes=(1, 8, 64), max_tokens: int = 64,
                     fp8_kv: bool | None = None) -> list[dict]:
    """Throughput and TTFT of TensorRT-LLM's LLM API over batches of concurrent requests (greedy, fixed length).

    Written against TensorRT-LLM 1.x (PyTorch backend): LLM, SamplingParams(return_perf_metrics=True) and
    KvCacheConfig(dtype="fp8") on every sm80+ GPU (see fp8_support). Not executed in this repository's CI (no GPU); the lab calls it only when
    trtllm_status() says it can run."""
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    if fp8_kv is None:
        fp8_kv = fp8_support(torch.cuda.get_device_capability())["kv_cache"]
    kv = KvCacheConfig(free_gpu_memory_fraction=0.3, enable_block_reuse=False, dtype="fp8" if fp8_kv else "auto")
    llm = LLM(model=str(model_dir), dtype="bfloat16", kv_cache_config=kv, max_batch_size=max(batch_sizes))
    sp = SamplingParams(max_tokens=max_tokens, top_k=1, ignore_eos=True, return_perf_metrics=True)
    rows = []
    try:
        llm.generate(prompts[:1], sp)  # warm-up
        for b in batch_sizes:
            batch = (prompts * b)[:b]
            t0 = time.perf_counter()
            outs = llm.generate(batch, sp)
            wall = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            ttfts = []
            for o in outs:
                tm = o.outputs[0].request_perf_metrics.timing_metrics
                ttfts.append((tm.first_token_time - tm.arrival_time).total_seconds())
            rows.append({"batch": b, "tokens_per_s": tokens / wall, "per_user_tokens_per_s": tokens / wall / b,
                         "mean_ttft_ms": 1e3 * sum(ttfts) / len(ttfts), "kv_cache": "fp8" if fp8_kv else "auto"})
    finally:
        llm.shutdown()
    return rows


def trtllm_serve_once(model_dir, prompt: str, max_tokens: int = 32, port: int = 8123, timeout_s: int = 900) -> dict:
    """Start `trtllm-serve` (OpenAI-compatible), wait for /health, send one /v1/completions request, stop it."""
    import urllib.error
    import urllib.request

    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(["trtllm-serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--backend", "pytorch", "--kv_cache_free_gpu_memory_fraction", "0.3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"trtllm-serve exited with code {proc.returncode} before becoming healthy")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() > deadline:
                raise TimeoutError(f"trtllm-serve was not healthy after {timeout_s} s")
            time.sleep(1)
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            served = json.loads(r.read())["data"][0]["id"]
        body = json.dumps({"model": served, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        return {"text": reply["choices"][0]["text"], "seconds": time.perf_counter() - t0, "model": served}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
