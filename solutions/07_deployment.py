# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] tags=["slide"]
# # Lab 07 · Deployment: turning compression into tokens per second
#
# **The Art of Compressing LLMs** — hands-on lab 7 of 7.
#
# Labs 01–06 made the model and its cache smaller. Smaller is not faster by itself: a 4-bit model is only faster if
# something reads the 4-bit words directly. Today you work out what bounds generation speed (the **roofline**),
# measure latency the way serving systems report it, and run the model in two real runtimes — **ONNX Runtime** with
# 4-bit `MatMulNBits` kernels (any CPU, tested here) and **TensorRT-LLM** (NVIDIA sm80+ GPUs) — against that bound.
#
# **Learning objectives.** By the end you can
# 1. explain why prefill is compute-bound and decode memory-bound, and measure both;
# 2. compute the bytes one decode step reads (weights at any bit width, plus the KV cache) and the tokens/s bound on
#    any GPU or CPU;
# 3. measure time-to-first-token and inter-token latency correctly;
# 4. export, quantize and run the model in ONNX Runtime and compare it with PyTorch at equal prompts;
# 5. say which formats each GPU generation accelerates, and why batching trades latency for throughput.
#
# **Time:** about 60 minutes (20 min of exercises). **Hardware:** CPU for everything but section 7 (quick mode ~2 min
# on a 2-core CPU; full mode 15.5 min there, ~4 min per checkpoint of it vLLM's sweep); TensorRT-LLM needs an sm80+
# GPU inside NVIDIA's container.

# %% [markdown] tags=["instructor"]
# **Instructor notes — lab 07.** Slot: 60 min, 20 of them exercises (1: 4 min, 2: 3 min, 3: 10 min, 4: 3 min) —
# 8 min prefill vs decode, 12 min the roofline with exercises 1–2, 15 min latency with exercise 3 (the core
# exercise), 13 min the runtimes and the roofline plot, 12 min vLLM with exercise 4, GPU formats and discussion.
#
# * Common mistakes the checkers catch: `bits // 8` (3-bit becomes 0 bytes), forgetting the per-group scales, or
#   quantizing the embeddings too; forgetting the KV cache, or reading it once per step instead of once per
#   sequence; GiB instead of GB; in `time_decode` (checked on a simulated GPU): no `sync()` before a clock read (or
#   the read before the sync, or none between the warm-up and the first timed run), no warm-up or one of the
#   prefill only, the mean, the minimum or a single run instead of the median, dividing the whole generation time by
#   the number of tokens (prefill counted as decode) or the decode span by n instead of n − 1 intervals.
# * Discussion prompts: "why does batch 64 give only ~9x the throughput of batch 1 on section 2's H100 plot (4-bit,
#   context 512), and no faster tokens for each user?" (each sequence adds its own KV cache to every step's bytes);
#   "the int4 ONNX model is 6x smaller but only N x faster here — where does the rest go?" (dequantization work,
#   activations quantized to int8 on the fly, non-matmul ops, Python overhead per token; a 135M model is
#   latency-bound, not bandwidth-bound, at batch 1); "what would you deploy on a T4?" (no TensorRT-LLM, no FP8: ONNX
#   Runtime or vLLM with AWQ/GPTQ W4A16 kernels).
# * On a GPU node with the NGC TensorRT-LLM container, run section 7 live; otherwise show its printed explanation.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # offline default (ONNX export works for Llama-family models)
DTYPE = "float32"
QUICK = None  # None: automatic (quick on a CPU, full on a CUDA GPU); True/False forces it (the tests set True)
SEED = 0
PROMPT = "The history of the transistor"
NEW_TOKENS = None  # tokens generated per timed run; None: 16 quick, 64 full
PPL_TOKENS = None  # tokens of WikiText-2 scored through each runtime; None: 64 quick, 256 full
ONNX_DIR = "onnx-export"  # where the ONNX Runtime exports are written (re-used when present)
GPTQ_DIR = "gptq-export"  # lab 02's checkpoint; on a GPU section 7 runs it through the Triton W4A16 kernel
MODELOPT_DIR = "modelopt-int4-awq"  # lab 03's Model Optimizer export (INT4-AWQ, g64): section 7 serves it on a GPU
W4A16_DIR = "w4a16-ct"  # lab 02's compressed-tensors export (full mode); section 8 writes an RTN one if it is absent
SERVE_GPU_VENV = None  # on a GPU: a venv with vLLM's CUDA build (`pip install vllm`); section 8 then sweeps it too
SERVE = None  # section 8 (vLLM): None runs it where `make serve-env` installed vLLM's CPU build, True/False forces

# %% [markdown]
# ## 0 · Setup

# %%
import copy
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import compresslab as cl
from compresslab import deploy, serve

env = cl.setup(quick=QUICK, seed=SEED, lab="07")  # prints the device, mode and this lab's runtime
print(env)
NEW_TOKENS = NEW_TOKENS or (16 if env.quick else 64)
PPL_TOKENS = PPL_TOKENS or (64 if env.quick else 256)
model, tok = cl.load_model(MODEL, dtype=DTYPE, device=env.device)
cfg = model.config
linear_params, other_params = deploy.linear_and_other_params(model)
kv_per_token = cl.kvcompress.kv_bytes_per_token(cfg)  # fp16 cache
print(f"{MODEL}: {linear_params / 1e6:.1f} M parameters in decoder Linears, {other_params / 1e6:.1f} M elsewhere "
      f"(embeddings, tied LM head, norms); KV cache {kv_per_token / 1024:.1f} KiB per token in fp16")

# %% [markdown] tags=["slide"]
# ## 1 · Prefill is compute-bound, decode is memory-bound
#
# **Prefill** pushes the whole prompt through the model in one pass: each weight is read once and used for every
# prompt token — many FLOPs per byte, so the arithmetic units are the limit. **Decode** makes one token per step:
# each step reads every weight (and the sequence's whole KV cache) to do ~2 FLOPs per weight. Its speed is set by
# memory bandwidth. Measured on this machine:

# %%
with torch.no_grad():
    ids = cl.data.test_windows(tok, 1, 256).to(env.device)  # (1, 256)
    t_prefill = cl.evaluation.median_seconds(lambda: model(ids), repeats=3)
    out = model(ids[:, :255], use_cache=True)
    # a step extends the cache it is given: each timed call gets a fresh copy, made outside the timed region
    t_step = cl.evaluation.median_seconds(lambda cache: model(ids[:, 255:], past_key_values=cache), repeats=5,
                                          setup=lambda: copy.deepcopy(out.past_key_values))
print(f"prefill of 256 tokens: {t_prefill * 1e3:.0f} ms = {t_prefill / 256 * 1e3:.2f} ms per token")
print(f"one decode step:       {t_step * 1e3:.0f} ms per token — {t_step / (t_prefill / 256):.0f}x more per token, "
      "for the same weights")

# %% [markdown] tags=["slide"]
# ## 2 · The roofline for decode
#
# One decode step for a batch of $b$ sequences at context $c$ reads
# $$\text{bytes/step} = W_{\text{bytes}}(\text{bits}) + b \cdot c \cdot \text{KV bytes/token}$$
# and produces $b$ tokens, so **tokens/s ≤ b · bandwidth / bytes/step**. Weight-only quantization shrinks only
# the decoder Linears; a $g$-sized group adds an fp16 scale and a `bits`-bit zero point. Embeddings, the (tied)
# LM head and norms stay fp16 — on a 135M model with a 49k vocabulary that is a fifth of the parameters. Keeping the
# head fp16 is this section's assumption, not every runtime's: ONNX Runtime's int4 export (section 5) quantizes the
# LM head too, so section 6's bound counts the LM head as the export stores it.
#
# ### Exercise 1 — the bytes of the weights (4 min)
# Complete `weight_bytes(linear_params, other_params, bits, group_size)`: the bytes one decode step reads for the
# weights, as above. `bits == 16` is the unquantized fp16 model (no groups, no scales).

# %%
def weight_bytes(linear_params, other_params, bits, group_size):
    """Bytes of the weights: Linears at `bits` (+ per group an fp16 scale and a `bits`-bit zero), the rest fp16."""
    ### BEGIN SOLUTION
    if bits == 16:
        return 2.0 * (linear_params + other_params)
    groups = linear_params / group_size
    return linear_params * bits / 8 + groups * (2 + bits / 8) + 2.0 * other_params
    ### END SOLUTION


weight_bytes = cl.checks.check_weight_bytes(weight_bytes)

# %% [markdown]
# ### Exercise 2 — the decode bound (3 min)
# Complete `decode_bound(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps)`: the tokens/s bound above,
# for all `batch` sequences together (bandwidth in GB/s = $10^9$ bytes/s).

# %%
def decode_bound(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):
    """Upper bound on generated tokens/s for `batch` sequences at `context` tokens of cache."""
    ### BEGIN SOLUTION
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token
    return batch * bandwidth_GBps * 1e9 / step_bytes
    ### END SOLUTION


decode_bound = cl.checks.check_decode_bound(decode_bound)

# %% [markdown]
# The bound for this model at 16, 8 and 4 bits (group 64) on a T4, an A100, an H100 — and on this machine, whose
# copy bandwidth we measure rather than look up. Batch 1, 1024 tokens of context.

# %%
cpu_bw = deploy.measure_bandwidth_GBps()
machines = {name: spec["bandwidth_GBps"] for name, spec in deploy.GPUS.items() if name != "H200"}
machines["this CPU (measured copy)"] = cpu_bw
rows = []
for bits in (16, 8, 4):
    wb = weight_bytes(linear_params, other_params, bits, 64)
    rows.append([f"{bits}-bit", f"{wb / 1e6:.0f} MB"] + [f"{decode_bound(wb, kv_per_token, 1024, 1, bw):,.0f}"
                                                        for bw in machines.values()])
print(f"{'':8s}{'weights':>10s}" + "".join(f"{m:>28s}" for m in machines))
for r in rows:
    print(f"{r[0]:8s}{r[1]:>10s}" + "".join(f"{v:>28s}" for v in r[2:]))
print("tokens/s upper bounds, batch 1; each GPU at its datasheet bandwidth")

# %% [markdown]
# **Batching** shares one read of the weights among all sequences, so throughput grows almost linearly with the batch —
# until each sequence's KV cache dominates the bytes. On this small model that comes early: at 512 tokens the batch's
# cache outweighs the 4-bit weights (114 MB) from about 10 sequences on, so batch 64 gives ~9× batch 1's bound on the
# H100, not 64×. Every user still waits one step per token, and a step reads
# more, so per-user speed falls. Serving engines (TensorRT-LLM, vLLM) keep the batch full with *in-flight*
# (continuous) batching — new requests join between steps — and a *paged* KV cache that allocates blocks on demand.

# %%
wb4 = weight_bytes(linear_params, other_params, 4, 64)
batches = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
for context in (512, 4096, 32768):
    tput = [decode_bound(wb4, kv_per_token, context, int(b), deploy.GPUS["H100-SXM"]["bandwidth_GBps"]) for b in batches]
    ax[0].plot(batches, tput, "o-", label=f"context {context}")
    ax[1].plot(batches, np.array(tput) / batches, "o-", label=f"context {context}")
ax[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s (all users)", title="H100 bound: throughput")
ax[1].set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s per user", title="...and per-user speed")
ax[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Which formats have real kernels where (TensorRT-LLM's support matrix): a format without a kernel on your GPU is
# only a storage format — the weights get dequantized to fp16 and the model is *not* faster.

# %%
for generation, formats in deploy.FORMATS_BY_GENERATION.items():
    print(f"{generation:38s} {formats}")

# %% [markdown] tags=["slide"]
# ## 3 · Measuring latency correctly
#
# Serving systems report two numbers: **time to first token** (TTFT: queueing + prefill + the first token; what a
# user feels before anything appears) and **inter-token latency** (ITL: the decode step; what sets reading speed).
# Dividing total time by tokens mixes them. Three more traps make a timing loop lie, on a GPU most of all:
#
# * **Asynchrony.** On CUDA a PyTorch call only *queues* its kernels and returns; a clock read after it measures how
#   fast Python launches work, not the work. `torch.cuda.synchronize()` waits until the queue is empty: call it
#   before every clock read.
# * **Warm-up.** The first calls compile and autotune kernels, allocate memory and fill caches: run untimed first.
# * **Noise.** Another process, a clock change, the garbage collector: some runs are slow for reasons of their own.
#   Report the median of several runs — one hiccup moves a mean, not a median.

# %% [markdown] tags=["subslide"]
# ### Exercise 3 — time a generation: warm-up, sync, TTFT and ITL, the median (10 min)
# Complete `time_decode(prefill, step, n_tokens, *, warmup, runs, clock, sync)`. `prefill()` starts a new generation
# (the prompt in, the first token out) and `step()` makes the next token: a run is `prefill()` then `n_tokens - 1`
# `step()`s. Do `warmup` whole runs untimed, then `runs` timed ones, reading the time with `clock()` and calling
# `sync()` before every read. Per run, TTFT is start → first token and ITL the decode span divided by its
# `n_tokens - 1` intervals. Return `(median TTFT, median ITL, 1 / median ITL)` in seconds and tokens/s.
#
# The checker cannot use a GPU: it hands your function a *simulated* one, whose clock sees queued work only after
# `sync()`, whose first runs are slow, and whose runs have noise and hiccups — so on this CPU it tells a right timing
# loop from a nearly right one. Its case labels name the trap that caught you.

# %%
def time_decode(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    """Median TTFT, median inter-token latency and decode tokens/s over `runs` timed generations of n_tokens."""
    ### BEGIN SOLUTION
    for _ in range(warmup):  # untimed, exactly like a timed run: compilation, autotuning, caches
        prefill()  # warm-up: the prompt
        for _ in range(n_tokens - 1):
            step()  # warm-up: the decode steps
    ttfts, itls = [], []
    for _ in range(runs):
        sync()  # nothing still queued from before
        t0 = clock()
        prefill()  # the prompt in, the first token out
        sync()  # the clock sees the GPU's work only once it is done
        times = [clock()]  # when each token is ready, as a streaming server sends it
        for _ in range(n_tokens - 1):
            step()
            sync()
            times.append(clock())
        ttfts.append(times[0] - t0)
        itls.append((times[-1] - times[0]) / (n_tokens - 1))  # n tokens, n - 1 intervals
    itl = float(np.median(itls))  # the median: one slow run does not move it
    return float(np.median(ttfts)), itl, 1.0 / itl
    ### END SOLUTION


time_decode = cl.checks.check_time_decode(time_decode)

# %% [markdown]
# Your function on the real model. `prefill` runs the prompt and keeps its KV cache, `step` feeds the greedy token
# back: the forward passes `model.generate` makes, without its per-token bookkeeping. On CUDA `sync` is
# `torch.cuda.synchronize`; on a CPU every call has finished when it returns, so there is nothing to wait for. Then
# the measured ITL against section 2's bound for this model: the bytes one step reads (the fp32 weights as stored
# and the cache at the generation's average context) at this machine's bandwidth, through your `decode_bound`.

# %%
prompt_tokens = tok(PROMPT, return_tensors="pt").input_ids.to(env.device)  # (1, prompt length)
state = {}


@torch.no_grad()
def prefill():
    out = model(prompt_tokens, use_cache=True)  # a new KV cache for every generation
    state["cache"], state["next"] = out.past_key_values, out.logits[:, -1:].argmax(-1)  # next: (1, 1)


@torch.no_grad()
def step():
    out = model(state["next"], past_key_values=state["cache"], use_cache=True)  # extends the cache by one token
    state["next"] = out.logits[:, -1:].argmax(-1)


sync = torch.cuda.synchronize if env.device == "cuda" else (lambda: None)
ttft, itl, tps = time_decode(prefill, step, NEW_TOKENS, warmup=1, runs=3 if env.quick else 5, sync=sync)
bandwidth = cpu_bw if env.device == "cpu" else deploy.measure_bandwidth_GBps(device="cuda", nbytes=2**30)
step_bytes = deploy.decode_read_bytes(model)  # the weights one step reads, at the dtype they are stored in
kv_bytes = kv_per_token / 2 * model.dtype.itemsize  # lab 06's fp16 bytes per token, at the model's dtype
tps_bound = decode_bound(step_bytes, kv_bytes, prompt_tokens.shape[1] + NEW_TOKENS // 2, 1, bandwidth)
print(f"time_decode: TTFT {ttft * 1e3:.0f} ms, ITL {itl * 1e3:.1f} ms = {tps:.1f} tokens/s")
print(f"roofline: {step_bytes / 1e6:.0f} MB per step at {bandwidth:.0f} GB/s -> at most {tps_bound:.0f} tokens/s "
      f"({1e3 / tps_bound:.1f} ms per token); this decode reaches {tps / tps_bound:.0%} of its bound")
timed = {}
timed["PyTorch fp32"] = deploy.timed_generate(model, tok, PROMPT, NEW_TOKENS)
t = timed["PyTorch fp32"]
print(f"model.generate, as sections 4-6 time every runtime: TTFT {t.ttft_s * 1e3:.0f} ms, ITL {t.itl_s * 1e3:.1f} ms "
      f"(runs: {t.itl_spread}); the naive tokens / total time = {NEW_TOKENS / t.total_s:.1f} tokens/s")

# %% [markdown]
# **What this number means.** On this CPU the step takes several times its bound: PyTorch works through 30 layers
# of small matrix-vector products and a dozen other ops each, one after the other, with Python and dispatch overhead
# between them, so the weights do not stream at copy speed. Your `sync` did nothing here: leaving it out would have
# changed nothing. On a GPU both flip. The bound falls under a tenth of a millisecond per token (section 2's table:
# ~11 000 tokens/s for the fp16 model on an H100), while eager PyTorch still launches hundreds of small kernels per
# step, each costing microseconds of CPU time: a 135M model at batch 1 is launch-bound there, at a small fraction of
# its bound (CUDA graphs, `torch.compile` and the engines of sections 7–8 attack exactly that). And without `sync` a
# GPU clock reads how fast Python queued the kernels, not how long they ran: on a long prompt or a bigger model,
# TTFT and ITL come out several times too small.

# %% [markdown] tags=["slide"]
# ## 4 · Two PyTorch baselines on the CPU
#
# fp32 as loaded, and PyTorch's *dynamic* int8 quantization (`torch.ao.quantization.quantize_dynamic`): Linear weights
# stored int8 per tensor, activations quantized per batch at run time. Same prompt, greedy, exactly the same number of
# tokens; `token agreement` is the share of positions where the greedy token equals fp32's.

# %%
models = {"PyTorch fp32": model}
if env.device == "cpu":
    models["PyTorch dynamic int8"] = deploy.dynamic_int8(copy.deepcopy(model))
    timed["PyTorch dynamic int8"] = deploy.timed_generate(models["PyTorch dynamic int8"], tok, PROMPT, NEW_TOKENS)
windows = cl.data.test_windows(tok, 1, PPL_TOKENS)  # the same WikiText-2 tokens for every runtime
ppl = {name: cl.evaluation.perplexity(m, tok, n_windows=1, seq_len=PPL_TOKENS, batch_size=1, progress=False)
       for name, m in models.items()}
read_bytes = {name: deploy.decode_read_bytes(m) for name, m in models.items()}  # what one decode step reads
for name, t in timed.items():
    agree, first = deploy.token_agreement(timed["PyTorch fp32"].tokens, t.tokens)
    print(f"{name:22s} TTFT {t.ttft_s * 1e3:6.0f} ms  ITL {t.itl_s * 1e3:6.1f} ms (runs: {t.itl_spread})  "
          f"{t.tokens_per_s:6.1f} tok/s  ppl {ppl[name]:.2f}  agreement {agree:.0%} (first difference at {first})")
if env.device == "cpu":  # quantize_dynamic takes every nn.Linear: the tied LM head gets an int8 copy of its own
    head_fp32 = deploy.dynamic_int8(copy.deepcopy(model), lm_head=False)
    p_head = cl.evaluation.perplexity(head_fp32, tok, n_windows=1, seq_len=PPL_TOKENS, batch_size=1, progress=False)
    print(f"dynamic int8 reads {read_bytes['PyTorch dynamic int8'] / 1e6:.0f} MB per step (LM head int8 included); "
          f"with the LM head kept fp32 it reads {deploy.decode_read_bytes(head_fp32) / 1e6:.0f} MB at ppl "
          f"{p_head:.2f}: the int8 head's share of the increase over fp32 is "
          f"{(ppl['PyTorch dynamic int8'] - p_head) / (ppl['PyTorch dynamic int8'] - ppl['PyTorch fp32']):.0%}")
    del head_fp32

# %% [markdown]
# `deploy.decode_read_bytes` counts what one decode step reads at the dtype each tensor is stored in: the int8
# Linears (the LM head included: `quantize_dynamic` converts every `nn.Linear`, so the tied head gets its own int8
# copy), the fp32 norms, and one row of the fp32 embedding table. In RAM the model also keeps that whole fp32 table,
# so "bytes in memory" and "bytes per step" differ; the roofline needs the second. Most of the perplexity jump comes
# from the *decoder* Linears at one scale per tensor (compare lab 01's per-channel and per-group results), not from
# the head.

# %% [markdown] tags=["slide"]
# ## 5 · ONNX Runtime: a 4-bit model with a 4-bit kernel
#
# [ONNX Runtime GenAI](https://onnxruntime.ai/docs/genai/)'s model builder turns the Hugging Face checkpoint into an
# ONNX graph with fused attention and a KV cache. With `precision="int4"` every MatMul becomes **`MatMulNBits`**:
# 4-bit symmetric RTN weights in blocks of 32 along K with an fp32 scale, read directly by the kernel. On the CPU its
# default `accuracy_level=4` also quantizes activations to int8 on the fly to use integer dot products — so this is
# really W4A8. We export fp32 and int4 (a few seconds each; reused when `ONNX_DIR` already holds them).
#
# Two closeness checks against PyTorch fp32: **perplexity** on the same WikiText-2 tokens, teacher-forced one token at
# a time through the runtime's own KV cache (the fp32 export must match PyTorch to the printed digits — a check of
# the export), and greedy **token agreement**. Agreement is harsh: at the first near-tie the two sequences diverge and
# never re-align, so a 4-bit model can score 0 % while its perplexity barely moves. Judge by perplexity.

# %%
onnx_ok, why = deploy.onnx_status()
print(why)
onnx = {}
if onnx_ok:
    for precision in ("fp32", "int4"):
        path = deploy.build_onnx(Path(ONNX_DIR) / f"{MODEL}-{precision}", precision)
        lm = deploy.OnnxLM(path)
        prompt_ids = tok(PROMPT).input_ids
        name = f"ONNX Runtime {precision}"
        timed[name] = lm.timed_generate(prompt_ids, NEW_TOKENS)
        ppl[name] = deploy.onnx_perplexity(lm, windows)
        read_bytes[name] = deploy.onnx_bytes(path)
        onnx[name] = lm
        agree, first = deploy.token_agreement(timed["PyTorch fp32"].tokens, timed[name].tokens)
        print(f"{name:22s} {read_bytes[name] / 1e6:5.0f} MB on disk  TTFT {timed[name].ttft_s * 1e3:5.0f} ms  "
              f"ITL {timed[name].itl_s * 1e3:5.1f} ms (runs: {timed[name].itl_spread})  "
              f"{timed[name].tokens_per_s:6.1f} tok/s  ppl {ppl[name]:.2f}  "
              f"agreement {agree:.0%} (first difference at {first})")

# %% [markdown] tags=["slide"]
# ## 6 · Measured against the roofline
#
# Each path's bound uses the bytes *it* reads per step (its weights as stored — the bound counts the LM head as the
# export stores it, int4 in the int4 export — plus the fp32 KV cache at the average context of the run) and this
# machine's measured copy bandwidth. The gap between bar and bound is everything that is
# not streaming weights: kernel launches, non-matmul ops, dequantization, Python. Each bar is the median of five runs
# after one untimed warm-up, the same for every path; the spread of the runs is printed above — read a gap between
# two bars as real only where it is larger than that spread.

# %%
context = len(tok(PROMPT).input_ids) + NEW_TOKENS // 2
names = list(timed)
measured = [timed[n].tokens_per_s for n in names]
bounds = [decode_bound(read_bytes[n], 2 * kv_per_token, context, 1, cpu_bw) if env.device == "cpu" else float("nan")
          for n in names]
fig, ax = plt.subplots(figsize=(8, 3.6))
x = np.arange(len(names))
ax.bar(x - 0.2, measured, 0.4, label="measured decode tokens/s")
ax.bar(x + 0.2, bounds, 0.4, label="roofline bound (this CPU)", alpha=0.5)
for i, (m, b) in enumerate(zip(measured, bounds)):
    ax.annotate(f"{m / b:.0%} of bound", (i - 0.2, m), ha="center", va="bottom", fontsize=8)
ax.set(xticks=x, xticklabels=names, yscale="log", ylabel="tokens/s (batch 1)", title=f"{MODEL} on {env.device.upper()}")
ax.legend(fontsize=8)
plt.xticks(rotation=10)
plt.show()
for n, m, b in zip(names, measured, bounds):
    cl.results.record(lab="07", method=n, model=MODEL, bits={"fp32": 32, "int8": 8, "int4": 4}[n.split()[-1]],
                      weight_mb=round(read_bytes[n] / 1e6, 1), ppl=round(ppl[n], 3), tokens_per_s=m,
                      roofline_tokens_per_s=b, ttft_ms=timed[n].ttft_s * 1e3, quick=env.quick)
if "ONNX Runtime int4" in timed:
    speedup = timed["ONNX Runtime int4"].tokens_per_s / timed["PyTorch fp32"].tokens_per_s
    print(f"ONNX Runtime int4 decodes {speedup:.1f}x faster than PyTorch fp32 on this machine, at "
          f"{measured[names.index('ONNX Runtime int4')] / bounds[names.index('ONNX Runtime int4')]:.0%} of its bound")
cl.results.table(lab="07", model=MODEL, quick=env.quick)

# %% [markdown] tags=["slide"]
# ## 7 · On an NVIDIA GPU: TensorRT-LLM, and lab 02's checkpoint on a W4A16 kernel
#
# **TensorRT-LLM** (1.x; its default backend is PyTorch-based) serves Hugging Face checkpoints with in-flight
# batching, a paged KV cache and an FP8 KV cache (`KvCacheConfig(dtype="fp8")`: a storage format, so on every sm80+
# GPU, A100 included; FP8 *GEMMs* need Ada/Hopper and newer — `deploy.fp8_support`). It needs an sm80+
# GPU (no T4) and is easiest inside NVIDIA's container `nvcr.io/nvidia/tensorrt-llm/release`. What it does *not*
# load in 1.x is lab 02's checkpoint: its PyTorch backend reads FP8/NVFP4 (ModelOpt) checkpoints but not
# `quant_method: gptq`, and act-order (`desc_act`) GPTQ is unsupported in every path. Its 4-bit route is AWQ through
# NVIDIA ModelOpt — with group size 64 on this model, since 128 does not divide 576: lab 03 exports exactly that
# (`MODELOPT_DIR`), and the cell below serves it when it finds it (not run in this project's CI: no GPU there; the
# export's tensors are checked on a CPU by an independent reader in lab 03's tests). Lab 02's GPTQ checkpoint runs
# instead on the package's own Triton **W4A16** kernel (`compresslab.kernels`, honouring act-order `g_idx`).

# %%
ok, why = deploy.trtllm_status()
print(("TensorRT-LLM: " if ok else "TensorRT-LLM skipped: ") + why)
if torch.cuda.is_available():
    fp8 = deploy.fp8_support(torch.cuda.get_device_capability())
    print(f"FP8 KV cache: {'yes' if fp8['kv_cache'] else 'no (needs sm80+)'}; "
          f"FP8 GEMMs (W8A8): {'yes' if fp8['gemm'] else 'no (need sm89+: Ada, Hopper, Blackwell)'}")
if ok:
    trt_dir = deploy.hf_folder(Path(ONNX_DIR) / f"{MODEL}-hf")
    for row in deploy.trtllm_benchmark(trt_dir, [PROMPT] * 64, batch_sizes=(1, 8, 64), max_tokens=NEW_TOKENS):
        print(row)
    print(deploy.trtllm_serve_once(trt_dir, PROMPT, max_tokens=NEW_TOKENS))
    if Path(MODELOPT_DIR, "hf_quant_config.json").exists():  # lab 03's export: what TensorRT-LLM is built to load
        for row in deploy.trtllm_benchmark(MODELOPT_DIR, [PROMPT] * 64, batch_sizes=(1, 8, 64),
                                           max_tokens=NEW_TOKENS):
            print("lab 03's Model Optimizer INT4-AWQ export:", row)
    else:
        print(f"no Model Optimizer export in {MODELOPT_DIR}: run lab 03's section 7 to serve it here")
if env.device == "cuda":
    from compresslab.kernels import w4a16

    if Path(GPTQ_DIR, "config.json").exists():
        qmodel, _ = w4a16.load_quantized(GPTQ_DIR, dtype=torch.float16)
        source = f"lab 02's checkpoint ({GPTQ_DIR})"
    else:
        qmodel = w4a16.quantize_model(copy.deepcopy(model).half(), group_size=64)
        source = "RTN g64 in memory (run lab 02 first for its GPTQ checkpoint)"
    gpu_bw = deploy.measure_bandwidth_GBps(device="cuda", nbytes=2**30)
    for name, m in {"fp16": copy.deepcopy(model).half(), "W4A16 Triton": qmodel}.items():
        t = deploy.timed_generate(m, tok, PROMPT, NEW_TOKENS)
        bound = decode_bound(cl.evaluation.stored_bytes(m), kv_per_token, context, 1, gpu_bw)
        print(f"{name:14s} {t.tokens_per_s:7.1f} tok/s (bound {bound:,.0f} at {gpu_bw:.0f} GB/s) — {source}")
else:
    print("no GPU: the W4A16 kernel runs here only in Triton's interpreter (lab 02, section 10); `make bench` on a GPU")

# %% [markdown] tags=["slide"]
# ## 8 · A real serving engine: vLLM, many users at once
#
# Sections 3–6 served one request at a time. A production server does not: **vLLM** (and TensorRT-LLM, SGLang) runs
# *continuous batching* — every engine step decodes one token for each running request and admits new ones as soon
# as others finish — over a *paged* KV cache: the cache is a pool of fixed blocks (16 tokens here), handed to requests
# as they grow, so no memory is reserved for tokens a request never reaches. *Prefix caching* keeps the blocks of a
# prompt prefix another request already computed (a shared system prompt, few-shot examples) and skips their prefill.
#
# What operators read is not one tokens/s figure but the curve **throughput vs latency** as concurrency grows, with
# percentiles: **TTFT** (time to first token: queueing + prefill), **ITL** (the gaps between streamed tokens) and
# **TPOT** (time per output token after the first), each at p50 and p99. `compresslab.serve` starts vLLM's
# OpenAI-compatible server on 127.0.0.1 (its CPU build, installed by `make serve-env` in its own `.venv-serve`),
# streams requests at a fixed maximum concurrency and measures all of them — the definitions of vLLM's own
# `vllm bench serve`, which gives the same figures on the same server.

# %%
serve_ok, serve_why = serve.status()
if SERVE is None:
    SERVE = serve_ok and env.device == "cpu"  # on a GPU, vLLM's CUDA build is yours to install (see below)
print(("vLLM: " if SERVE else "section 8 skipped: ") + serve_why)
SWEEP = dict(n=8, input_len=64, output_len=16, concurrencies=(1, 4)) if env.quick else \
    dict(n=32, input_len=128, output_len=64, concurrencies=(1, 4, 16, 64))
served = {}  # served name -> sweep rows
served_weights = {"bf16": {"bits": 16, "group_size": None,  # what the engine holds: every parameter at 2 bytes
                           "weight_mb": round(2 * sum(p.numel() for p in model.parameters()) / 1e6, 1)}}
if SERVE:
    bf16_dir = cl.models.default_model_dir() if MODEL == cl.models.DEFAULT_MODEL else None
    if bf16_dir is None:
        raise ValueError("section 8 serves the offline checkpoint folder; for a hub MODEL pass its local folder")
    prompts = serve.random_prompts(SWEEP["n"], SWEEP["input_len"], seed=SEED)
    with serve.server(bf16_dir, dtype="bfloat16", max_model_len=512, kv_cache_gib=1) as srv:
        print(f"bf16 server healthy after {srv.start_s:.0f} s; {srv.kv_cache_info()}")
        kv_log = srv.kv_cache_info()
        served["bf16"] = srv.sweep(prompts, SWEEP["output_len"], SWEEP["concurrencies"], time_limit_s=300)
        print(serve.format_table(served["bf16"]))
        # prefix caching: one long shared prefix (a system prompt, few-shot examples), short distinct questions
        prefix = serve.random_prompts(1, 384, seed=SEED + 1)[0]
        suffixes = serve.random_prompts(4 if env.quick else 8, 16, seed=SEED + 2)
        prefix_on = srv.shared_prefix_ttft(prefix, suffixes)
    print(f"prefix caching on: the first request (cold) TTFT {prefix_on['cold_ms']:.0f} ms, the next ones (warm: "
          f"their 384-token prefix is cached) {prefix_on['warm_ms']:.0f} ms — {prefix_on['ratio']:.1f}x")
    if not env.quick:  # the same workload with prefix caching off: every request computes the prefix again
        with serve.server(bf16_dir, dtype="bfloat16", max_model_len=512, kv_cache_gib=1, prefix_caching=False) as srv:
            prefix_off = srv.shared_prefix_ttft(prefix, suffixes)
        print(f"prefix caching off: cold {prefix_off['cold_ms']:.0f} ms, later requests {prefix_off['warm_ms']:.0f} ms")

# %% [markdown]
# **The same model at 4 bits.** Lab 02 (full mode) exports its GPTQ model in the compressed-tensors format vLLM reads
# (W4A16: 4-bit weights in groups of 64, activations bf16); without that export this cell writes an RTN model in the
# same format, so the engine path is the same. vLLM picks a mixed-precision kernel for it on the CPU
# (`CPUWNA16LinearKernel`: it dequantizes the 4-bit weights inside each matmul). Is it faster?

# %%
if SERVE:
    ct_dir = Path(W4A16_DIR)
    if (ct_dir / "config.json").exists():
        w4_source = f"lab 02's GPTQ export ({ct_dir})"
    else:
        ct_dir = ct_dir.with_name(ct_dir.name + "-rtn")
        q_rtn = cl.quantize(copy.deepcopy(model), cl.RTNConfig(bits=4, group_size=64))  # codes in the model
        q_rtn.save_pretrained(ct_dir, format="compressed-tensors", tokenizer=tok)  # pack-quantized, as vLLM reads
        w4_source = f"RTN W4A16 g64 written here ({ct_dir}; run lab 02 in full mode for its GPTQ export)"
        del q_rtn
    served_weights["W4A16"] = cl.results.describe(model, 4, 64)
    with serve.server(ct_dir, dtype="bfloat16", max_model_len=512, kv_cache_gib=1) as srv:
        kernel = next((ln.split("Using ")[-1] for ln in srv.log().splitlines() if "LinearKernel" in ln), "?")
        print(f"W4A16 server healthy after {srv.start_s:.0f} s — {w4_source}; kernel: {kernel}")
        check_prompt = "The capital of France is"
        engine_ids = srv.complete(check_prompt, max_tokens=6)["token_ids"]
        served["W4A16"] = srv.sweep(prompts, SWEEP["output_len"], SWEEP["concurrencies"], time_limit_s=300)
        print(serve.format_table(served["W4A16"]))
    # a second, independent reader of the same folder: transformers + compressed-tensors, greedy, fp32
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ct_model = AutoModelForCausalLM.from_pretrained(ct_dir,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = tok(check_prompt, return_tensors="pt").input_ids
    hf_ids = ct_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    print(f"greedy continuation of {check_prompt!r}: vLLM {tok.decode(engine_ids)!r}, transformers "
          f"{tok.decode(hf_ids)!r} -> the same W4A16 checkpoint: {engine_ids == hf_ids.tolist()}")
    del ct_model
    for a, b in zip(served["bf16"], served["W4A16"]):
        print(f"concurrency {a['concurrency']:3d}: W4A16 / bf16 output tokens/s "
              f"{b['output_tok_s'] / a['output_tok_s']:.2f}, TTFT p50 {b['ttft_ms_p50'] / a['ttft_ms_p50']:.2f}x, "
              f"ITL p50 {b['itl_ms_p50'] / a['itl_ms_p50']:.2f}x")

# %% [markdown]
# Read the ratios above. On this project's 2-core CPU they have landed on both sides of 1: one full-mode run had
# W4A16 at 0.63-0.73x bf16's throughput with a slower prefill, a later one (2026-12-06) at 1.1-1.85x with a faster
# prefill. A 135M model at these batch sizes is bound by compute and overheads on a CPU, not by reading 270 MB of
# bf16 weights, and the CPU's W4A16 kernel trades the bytes it saves for dequantization inside every matmul: which
# side wins turns on the machine and its load, and one run on a shared CPU settles nothing. Weight-only 4-bit pays
# reliably where decode is memory-bound: a GPU, a bigger model, small batches (Marlin-class kernels there reach
# ~3-4x over fp16 at batch 1). It still cuts the weights' memory ~2.4x, which on a GPU becomes KV-cache room for
# more concurrent requests.

# %% [markdown]
# How many tokens does that paged cache hold? Each token stores, in every layer, a key and a value vector per KV
# head at 2 bytes (bf16): lab 06's formula, `cl.kvcompress.kv_bytes_per_token(cfg)` = 23 040 bytes for this model.
# vLLM allocates whole blocks of `block_size` tokens from the space it is given (`VLLM_CPU_KVCACHE_SPACE`, here
# 1 GiB), and a request of n tokens occupies ⌈n / block_size⌉ of them.
#
# ### Exercise 4 — the engine's KV capacity, from the lab's own formula (3 min)
# Complete `paged_kv_tokens(cache_bytes, kv_bytes_per_token, block_size)`: how many tokens fit in `cache_bytes` when
# only whole blocks count. Then the cell compares it with what the engine printed at start-up, and computes the
# concurrency at which the cache runs out for requests of the sweep's length.

# %%
def paged_kv_tokens(cache_bytes, kv_bytes_per_token, block_size):
    """Tokens a paged KV cache holds: whole blocks of block_size tokens."""
    ### BEGIN SOLUTION
    blocks = cache_bytes // (kv_bytes_per_token * block_size)
    return int(blocks) * block_size
    ### END SOLUTION


# %%
paged_kv_tokens = cl.checks.check_paged_kv_tokens(paged_kv_tokens)
capacity = paged_kv_tokens(1 * 2**30, kv_per_token, 16)  # 1 GiB, bf16 cache, blocks of 16
per_request = SWEEP["input_len"] + SWEEP["output_len"]
print(f"formula: {capacity:,} tokens in 1 GiB -> the cache runs out at {capacity // per_request} concurrent requests "
      f"of {per_request} tokens (and at {capacity // 512} of the server's max_model_len, 512)")
if SERVE:
    print(f"engine:  {kv_log['tokens']:,} tokens, max concurrency at {kv_log['max_model_len']} tokens: "
          f"{kv_log['max_concurrency']}x -> {'the same' if kv_log['tokens'] == capacity else 'DIFFERENT: why?'}")

# %% [markdown]
# Read the sweep as an operator would: concurrency buys throughput (output tokens/s) and costs latency — TTFT grows
# fastest (requests queue for prefill), ITL more slowly (each engine step decodes more sequences). On this 2-core
# CPU vLLM binds its engine to one core and leaves the other to the HTTP server; a GPU moves the whole curve, not its
# shape. Beyond the concurrency your formula gave, requests would wait for KV blocks (or be preempted).

# %%
if served:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, rows in served.items():
        tput = [r["output_tok_s"] for r in rows]
        for ax, key in ((axes[0], "tpot_ms"), (axes[1], "ttft_ms")):
            ax.plot(tput, [r[f"{key}_p50"] for r in rows], marker="o", label=f"{name} p50")
            ax.plot(tput, [r[f"{key}_p99"] for r in rows], marker="x", ls="--", label=f"{name} p99")
            for r in rows:
                ax.annotate(f"c={r['concurrency']}", (r["output_tok_s"], r[f"{key}_p50"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="output tokens/s (all users)", ylabel="TPOT (ms)", title="throughput vs time per output token")
    axes[1].set(xlabel="output tokens/s (all users)", ylabel="TTFT (ms)", yscale="log",
                title="throughput vs time to first token")
    for ax in axes:
        ax.legend(fontsize=7)
    plt.tight_layout()
    plt.show()
    for name, rows in served.items():
        for r in rows:
            cl.results.record(lab="07", method=f"vLLM {name}, concurrency {r['concurrency']}", model=MODEL,
                              **served_weights[name], tokens_per_s=round(r["output_tok_s"], 1),
                              ttft_ms_p50=round(r["ttft_ms_p50"], 1),
                              ttft_ms_p99=round(r["ttft_ms_p99"], 1), itl_ms_p50=round(r["itl_ms_p50"], 1),
                              tpot_ms_p50=round(r["tpot_ms_p50"], 1), quick=env.quick)

# %% [markdown]
# **On a GPU** the same client measures vLLM's CUDA build (install it in its own environment, `pip install vllm`, and
# set `SERVE_GPU_VENV` to that venv): the bf16 model with a bf16 and with an FP8 KV cache (`--kv-cache-dtype fp8`,
# every sm80+ GPU: a storage format), and the W4A16 folder on vLLM's GPU kernels. TensorRT-LLM's `trtllm-serve` is
# OpenAI-compatible too, so `serve.benchmark(url, model, prompts, ...)` measures it unchanged (section 7 starts it);
# its FP8 checkpoint comes from NVIDIA Model Optimizer. None of these runs is in this repository's figures (no GPU on
# the machines they come from): the cell below prints why it skips.

# %%
if env.device == "cuda" and SERVE_GPU_VENV:
    gpu_prompts = serve.random_prompts(32, 128, seed=SEED)
    for label, folder, extra in (("bf16", cl.models.default_model_dir(), ()),
                                 ("bf16, FP8 KV cache", cl.models.default_model_dir(), ("--kv-cache-dtype", "fp8")),
                                 ("W4A16", Path(W4A16_DIR), ())):
        if not (Path(folder) / "config.json").exists():
            print(f"{label}: skipped, no checkpoint at {folder} (run lab 02 in full mode)")
            continue
        with serve.server(folder, venv=SERVE_GPU_VENV, device="cuda", dtype="bfloat16", max_model_len=2048,
                          enforce_eager=False, extra_args=extra) as srv:
            print(f"vLLM CUDA, {label}: healthy after {srv.start_s:.0f} s; {srv.kv_cache_info()}")
            print(serve.format_table(srv.sweep(gpu_prompts, 64, (1, 4, 16, 64), time_limit_s=300)))
else:
    print("GPU serving skipped: " + ("no CUDA GPU here" if env.device != "cuda" else
                                     "set SERVE_GPU_VENV to a venv with vLLM's CUDA build (pip install vllm)"))

# %% [markdown]
# ## Reflection
# **Question 1.** The int4 ONNX model reads about 6x fewer bytes than the fp32 PyTorch model. Is its measured speedup
# larger or smaller than 6x here, and what does the roofline plot say about why?

# %% [markdown] tags=["solution"]
# Compare the bars: neither path reaches its bound, and the smaller the model, the further off it is. A 135M model at
# batch 1 spends a large share of each step on things that are not weight reads — ~400 small kernel launches,
# attention and norms, sampling, the per-token Python loop — so cutting bytes 6x buys less than 6x. The speedup comes
# partly from the bytes and partly from the better runtime (fused attention, no Python per layer): the ONNX fp32 row
# separates the two. On a 7B model the weight bytes dominate and 4-bit gets much closer to its bound.

# %% [markdown]
# **Question 2.** You must serve 200 concurrent chat users with a 1B model on one GPU. Which matters more: batch-1
# latency or the bound at batch 64 — and which compression from labs 01–06 helps which?

# %% [markdown] tags=["solution"]
# Throughput at a large batch, subject to an ITL target per user. At batch 64 and long contexts the KV cache dominates
# the bytes (section 2's plot), so KV compression (lab 06: KIVI/GEAR, FP8 KV) raises the bound most, and frees memory
# for a bigger batch; weight quantization (labs 01–03) matters most at small batches where weights dominate.
# Pruning to 2:4 (lab 04) helps the compute-bound prefill. In-flight batching keeps the batch full.

# %% [markdown] tags=["instructor"]
# **Answers to expect.** Q1: people often expect the full 6x; push them to read "% of bound". Q2: good answers mention
# the KV cache growing with context x batch and that latency per user *rises* with batch.

# %% [markdown]
# ## Summary
# * Decode reads every weight and the KV cache per step: tokens/s ≤ batch × bandwidth / bytes per step.
# * Weight bytes at b bits = Linears × b/8 + group scales/zeros + fp16 embeddings; the KV cache grows with batch × context.
# * Report TTFT and inter-token latency separately; never total time / tokens.
# * A 4-bit model is faster only with a 4-bit kernel: MatMulNBits (ONNX Runtime), W4A16 GEMMs (TensorRT-LLM AWQ,
#   the package's Triton kernel); FP8 on Ada/Hopper, NVFP4 on Blackwell.

# %% [markdown]
# ## Your numbers vs expected
# Every figure this run recorded, beside the reference measured in the same mode on a named machine
# (`compresslab/expected`, written by `tools/expected_figures.py` from real runs) and its noise band. ✓: within the
# band. ⚠: outside it — another model, mode or seed, or an edited cell, explains most; if not, look at your
# exercises' outputs. Modes nobody has measured yet (a GPU the project has not run on) say so: your numbers are then
# the reference.

# %%
cl.expected.compare("07", MODEL, env)

# %%
cl.checks.summary()
