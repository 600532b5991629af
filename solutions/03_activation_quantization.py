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
# # Lab 03 · Activation quantization: FP8, SmoothQuant, AWQ and NVFP4, with NVIDIA Model Optimizer
#
# **The Art of Compressing LLMs** — hands-on lab 3 of 8.
#
# Labs 01–02 shrank the *weights* and multiplied in 16 bits: that speeds up batch-1 decode, which only reads weights.
# The hardware this workshop is about goes further: Hopper and Ada tensor cores multiply **FP8** inputs at twice the
# BF16 rate, Ampere's at twice for **INT8**, Blackwell's at four times for **NVFP4**. To use them the *activations*
# must be quantized too — and activations, unlike weights, are only known at run time and have outliers. This lab goes
# from "which matrix products are compute-bound" to a deployable FP8 / INT4-AWQ checkpoint written by NVIDIA's own
# library.
#
# **Learning objectives.** By the end you can
# 1. say from arithmetic intensity when W8A8 / W4A4 pay off and when weight-only W4A16 is the better buy;
# 2. find the outlier channels and "massive" tokens in a real model's activations, and choose static per-tensor or
#    dynamic per-token scales;
# 3. implement SmoothQuant's migration and fold it exactly into RMSNorm; implement AWQ's scale search;
# 4. emulate NVFP4 / MXFP4 exactly and count their bits with the scales;
# 5. run NVIDIA Model Optimizer's FP8, INT8-SmoothQuant and INT4-AWQ on the same model, compare with your own, and
#    export a checkpoint for TensorRT-LLM whose tensors you read back yourself.
#
# **Time:** about 75 minutes (40 min of exercises: 8 + 10 + 15 + 7).
# **Hardware:** CPU is fine (every format is emulated exactly: "fake quantization"); the speed claims need a GPU.

# %% [markdown] tags=["instructor"]
# **Instructor notes — lab 03.** Slot: 75 min (10 min roofline and outliers at the screen, 40 min exercises, 15 min
# whole-model results and Model Optimizer, 10 min discussion). Exercise minutes: 1 · per-token FP8 (8), 2 · SmoothQuant
# scales and folding (10), 3 · AWQ's scale search (15, the core one), 4 · NVFP4's two-level scales (7).
#
# * Common mistakes the checkers catch: one scale for the whole tensor instead of per token, dividing by 127 for
#   FP8, returning float32 for a bf16 input (a missing clamp before the cast is harmless with per-token scales and
#   torch 2.13's saturating cast, so no checker can see it: point it out, it matters with static scales); SmoothQuant with α and 1−α
#   swapped, the weight max taken over the wrong dimension, multiplying the norm by s instead of dividing; AWQ
#   without the division of x by s (the error is then the error of a different layer), the scale search on mean
#   |w| instead of mean |x|, errors measured on the weights; NVFP4 without the tensor scale (E4M3 scales underflow).
# * Discussion prompts: "static per-tensor INT8 loses badly here and per-token does not: what does a kernel pay for
#   per-token scales?" (one extra row-wise max and a per-row rescale of the accumulator: cheap, fused in practice);
#   "why does AWQ not need activation quantization at all?"; "NVFP4 at 4.5 bits against INT4 g64 at 4.25: which
#   would you deploy on a B200, and on an H100?"; "the paper's α = 0.5 recovers two thirds of static INT8's loss
#   here, 0.8 nearly all of it: what about this model's activations makes it want more?" (the down_proj inputs'
#   channel max is ~34× the median, the plot of section 2).
# * If the room is slow: do exercises 1 and 3, run the rest as a demo; the Model Optimizer section runs on its own.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # offline default; on a GPU with hub access try "qwen2.5-0.5b"
DTYPE = "float32"
QUICK = None  # None: automatic (quick on a CPU, full on a CUDA GPU); True/False forces it (the tests set True)
SEED = 0
GROUP_SIZE = 64  # 64 divides 576 and 1536; 128 (AWQ's and Model Optimizer's default) does not divide 576
CALIB_SAMPLES = None  # None: from the device tier (32 on CPU, 128 on GPU, 8 in quick mode)
ALPHA = 0.5  # SmoothQuant's migration strength (the paper's default)
MODELOPT_DIR = "modelopt-int4-awq"  # where Model Optimizer's INT4-AWQ checkpoint is exported (TensorRT-LLM's input)

# %% [markdown]
# ## 0 · Setup

# %%
import copy
import math
import time

import matplotlib.pyplot as plt
import torch

import compresslab as cl
from compresslab import actquant, awq, formats, nvmodelopt, smoothquant

env = cl.setup(quick=QUICK, seed=SEED, lab="03")  # prints the device, mode and this lab's runtime
print(env)
sz = env.sizes
n_calib = CALIB_SAMPLES or sz.calib_samples

model, tok = cl.load_model(MODEL, dtype=DTYPE, device=env.device)
model.eval()
calib = cl.data.calibration_batches(tok, n_samples=n_calib, seq_len=sz.calib_len, seed=SEED)  # (n, len) token ids
print(f"calibration: {tuple(calib.shape)} tokens of WikiText-2 valid")
LINEAR, OTHER = cl.deploy.linear_and_other_params(model)  # decoder Linear weights / everything else (stored fp16)


def ppl(m) -> float:
    return cl.evaluation.perplexity(m, tok, n_windows=sz.ppl_windows, seq_len=sz.seq_len)


def weight_mb(bits_per_weight: float) -> float:
    """Deployed weight MB: decoder Linears at bits_per_weight (their scales counted), everything else fp16."""
    return round((LINEAR * bits_per_weight / 8 + OTHER * 2) / 1e6, 1)


@torch.no_grad()
def capture_inputs(name: str, ids: torch.Tensor) -> torch.Tensor:
    """The inputs one Linear of the model sees on ids -> (tokens, in_features)."""
    xs = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1])))
    try:
        model(ids.to(env.device))
    finally:
        hook.remove()
    return torch.cat(xs).float()


ROWS = {}  # method -> (weight bits per element, activation bits, ppl)


def record(method: str, m, w_bits: float, a_bits: float, group_size=None) -> float:
    t0 = time.perf_counter()
    p = ppl(m)
    ROWS[method] = (w_bits, a_bits, p)
    cl.results.record(lab="03", method=method, model=MODEL, bits=w_bits, group_size=group_size,
                      weight_mb=weight_mb(w_bits), ppl=round(p, 3), act_bits=a_bits, quick=env.quick)
    print(f"{method:34s} W{w_bits:g}A{a_bits:g}  {weight_mb(w_bits):6.1f} MB  ppl {p:8.2f}  "
          f"({time.perf_counter() - t0:.0f} s)")
    return p


fp_ppl = record("fp32", model, 32, 32)

# %% [markdown] tags=["slide"]
# ## 1 · Why activations: which products are compute-bound?
#
# A Linear layer on $M$ tokens multiplies $X$ $(M \times K)$ by $W^\top$ $(K \times N)$: $2MNK$ FLOPs while reading
# $NK$ weights and $MK$ inputs. Its **arithmetic intensity** (FLOPs per byte) grows with $M$. Below the GPU's *ridge
# point* (peak FLOPs / bandwidth) it is memory-bound and only fewer bytes help; above it, only faster arithmetic
# helps. Batch-1 decode has $M = 1$; prefill of a 2k prompt has $M = 2048$; a server decoding 64 requests at once has
# $M = 64$. H100 SXM (NVIDIA datasheet, dense): 989 TFLOPS BF16, 1979 FP8 and INT8, 3.35 TB/s HBM3. W4A16 reads
# 4-bit weights but multiplies in BF16 (it dequantizes in registers); W8A8 halves both.

# %%
PEAK = {"bf16": 989e12, "fp8": 1979e12}  # H100 SXM dense tensor-core FLOP/s
BW = 3.35e12  # bytes/s
K = N = 4096  # a Llama-8B-sized projection
SCHEMES = {"W16A16 (bf16)": (2, 2, "bf16"), "W4A16 (AWQ/GPTQ)": (0.5 + 2 / 64, 2, "bf16"),
           "W8A8 (FP8)": (1, 1, "fp8")}


def gemm_seconds(M, w_bytes, a_bytes, peak):
    flops = 2 * M * N * K
    moved = N * K * w_bytes + M * K * a_bytes + M * N * 2  # weights, inputs, bf16 outputs
    return max(flops / PEAK[peak], moved / BW), flops / moved


Ms = [1, 4, 16, 64, 256, 1024, 4096]
fig, ax = plt.subplots(figsize=(6.5, 3.5))
for name, (wb, ab, peak) in SCHEMES.items():
    speedup = [gemm_seconds(M, 2, 2, "bf16")[0] / gemm_seconds(M, wb, ab, peak)[0] for M in Ms]
    ax.plot(Ms, speedup, marker="o", label=name)
ax.set(xscale="log", xlabel="tokens per matmul M (batch x new tokens)", ylabel="speed-up over BF16 (roofline)",
       title=f"A {K}x{N} projection on an H100 (roofline model)")
ax.axhline(1, color="gray", lw=0.5)
ax.legend()
plt.show()
for M in (1, 64, 2048):
    t, ai = gemm_seconds(M, 2, 2, "bf16")
    print(f"M = {M:5d}: intensity {ai:7.1f} FLOP/B (ridge: {PEAK['bf16'] / BW:.0f} BF16, {PEAK['fp8'] / BW:.0f} FP8)"
          f" -> {'compute' if ai > PEAK['bf16'] / BW else 'memory'}-bound in BF16")

# %% [markdown]
# At batch 1 the 4-bit weights win (4x fewer bytes), FP8 gives 2x. Past the ridge (a few hundred tokens: prefill,
# or a busy server) W4A16 has nothing left to save — it still multiplies in BF16 — while W8A8 keeps its 2x from the
# faster tensor cores. This is why FP8 W8A8 is TensorRT-LLM's default on Hopper, and why Model Optimizer's own H200
# benchmark finds INT4-AWQ 1.33x faster than BF16 at batch 1 but 0.83x at batch 64 (`../shared/REFERENCES.md`).

# %% [markdown] tags=["slide"]
# ## 2 · The real model's activations
#
# Weights are bell-shaped. Activations are not: a few **channels** are large on every token (they come from the
# RMSNorm's weights and the residual stream), and a few **tokens** — often the first one — carry huge values on the
# residual stream ("massive activations"). Let's look at the inputs of three Linears of one layer.

# %%
LAYER = 10
names = [f"model.layers.{LAYER}.self_attn.q_proj", f"model.layers.{LAYER}.mlp.up_proj",
         f"model.layers.{LAYER}.mlp.down_proj"]
stats = smoothquant.input_stats(model, calib[:2], names=names, progress=False)
fig, axes = plt.subplots(1, 3, figsize=(13, 3))
for ax, n in zip(axes, names):
    ca = stats[n]["channel_amax"]
    ax.bar(range(ca.numel()), ca.cpu(), width=1.0)
    ax.set(title=f"{n.split('.', 3)[-1]} input", xlabel="input channel", ylabel="max |x| over tokens")
plt.tight_layout()
plt.show()
for n in names:
    ca, ta = stats[n]["channel_amax"], stats[n]["token_amax"]
    print(f"{n.split('.', 3)[-1]:17s} channels: max {ca.max():7.2f}, median {ca.median():5.2f} "
          f"(x{ca.max() / ca.median():5.1f}) | tokens: max {ta.max():7.2f}, median {ta.median():5.2f}")

# %% [markdown]
# A per-tensor scale is set by the loudest channel (or token), so every quiet one gets a handful of levels. A
# per-token scale adapts to each token (computed at run time: **dynamic**); a per-channel scale on the input side
# cannot be pulled out of the matmul (it would have to multiply inside the sum over $K$) — which is exactly what
# SmoothQuant and AWQ get around by moving it into the weights.

# %% [markdown] tags=["slide"]
# ## 3 · Quantizing activations: INT8 and FP8, static and dynamic
#
# Symmetric, no zero point. INT8: $s = \max|x| / 127$, $\hat x = \text{clamp}(\text{round}(x/s), -127, 127)\, s$.
# FP8 E4M3 (largest value 448): $s = \max|x| / 448$, $\hat x = \text{e4m3}(x / s)\, s$ — the cast rounds to the
# nearest E4M3 value, which has 3 mantissa bits everywhere in its range (a relative step, unlike INT8's fixed one).
# **Static per-tensor**: $\max|x|$ is calibrated once on sample data (values beyond it saturate). **Dynamic per
# token**: one $\max$ per row of $X$, at run time.
#
# ### Exercise 1 — dynamic per-token FP8 (8 min)
# Complete `fp8_per_token(x)` for `x` of shape `(..., in)`: one scale per token (row) from its largest magnitude,
# `x / scale` rounded to E4M3 with `torch.float8_e4m3fn`, scaled back; return the same shape and dtype. Two traps:
# an all-zero token must come back as zeros, not NaN; and saturate explicitly (clamp to ±448 before the cast). With
# per-token scales nothing exceeds 448, but the same code with a static scale meets values beyond it, and whether a
# cast saturates is the library's choice (E4M3 has no infinity: a non-saturating cast gives NaN; torch 2.13's
# saturates).

# %%
def fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 E4M3 fake quantization: x (..., in) -> same shape and dtype."""
    ### BEGIN SOLUTION
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 448  # (..., 1): one scale per token
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero token: any scale gives zeros
    q = (xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn)  # saturate explicitly, whatever the cast does
    return (q.float() * scale).to(x.dtype)
    ### END SOLUTION


# %%
fp8_per_token = cl.checks.check_fp8_per_token(fp8_per_token)

# %% [markdown]
# Now the whole model: every decoder Linear becomes W8A8 (`actquant.ActQuantLinear`: 8-bit weight codes with one scale
# per output channel, inputs quantized as it is told). `cl.quantize(model, config)` is the package's one entry point
# (lab 02's GPTQ runs through it too); the configs are dataclasses.

# %%
x = model.model.layers[LAYER].mlp.down_proj.weight[:4, :].detach()
print("your quantizer vs the package:", (fp8_per_token(x) - actquant.quantize_activation(x, "fp8", "token")).abs().max().item())

W8A8 = {"fp8 W8A8 per-token": cl.W8A8Config(fmt="fp8"),
        "fp8 W8A8 per-tensor static": cl.W8A8Config(fmt="fp8", activations="tensor"),
        "int8 W8A8 per-token": cl.W8A8Config(fmt="int8"),
        "int8 W8A8 per-tensor static": cl.W8A8Config(fmt="int8", activations="tensor")}
for name, cfg in W8A8.items():
    q = cl.quantize(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    record(name, q, 8, 8)
    del q

# %% [markdown]
# FP8's relative grid shrugs off the outliers that a fixed INT8 step cannot; INT8 needs per-token scales, or the
# outliers moved out of the activations. Per-token costs a kernel one row-wise max and one per-row rescale of the
# accumulator — cheap, and fused into the preceding op in TensorRT-LLM and vLLM.

# %% [markdown] tags=["slide"]
# ## 4 · SmoothQuant: move the outliers into the weights
#
# For a Linear reading $X$, $XW^\top = (X\,\mathrm{diag}(s)^{-1})(W\mathrm{diag}(s))^\top$ for any $s > 0$. Choose
# $s_j = \max|X_j|^{\alpha} / \max_i|W_{ij}|^{1-\alpha}$: $\alpha = 1$ flattens the activations completely (and puts
# all the range into the weights), $\alpha = 0$ flattens the weights. The division by $s$ is free when $X$ comes out
# of an RMSNorm: divide the norm's weight by $s$. Several Linears read the same norm (q, k, v; gate, up): one $s$ for
# all of them, with $\max|W_{\cdot j}|$ over all their rows.
#
# ### Exercise 2 — SmoothQuant scales, folded into the norm (10 min)
# Complete `smooth(norm_weight, weights, act_amax, alpha)`: `weights` is the list of `(out_i, in)` weights reading the
# norm, `act_amax` the `(in,)` calibrated $\max|X_j|$. Return `(s, new_norm_weight, new_weights)` — the scales, the
# norm's weight divided by them, and each weight with its columns multiplied by them. (Clamp $s$ to at least 1e-5, as
# the reference does, so a dead channel cannot divide by zero.)

# %%
def smooth(norm_weight: torch.Tensor, weights: list[torch.Tensor], act_amax: torch.Tensor, alpha: float = 0.5):
    """SmoothQuant for the Linears reading one norm -> (s (in,), norm_weight / s, [W * s for each W (out_i, in)])."""
    ### BEGIN SOLUTION
    w_amax = torch.stack([W.abs().amax(dim=0) for W in weights]).amax(dim=0)  # (in,): over every row of every W
    s = (act_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    return s, norm_weight / s, [W * s for W in weights]  # the norm emits x / s, each W meets it with W * s
    ### END SOLUTION


# %%
smooth = cl.checks.check_smoothing(smooth)

# %% [markdown]
# Before quantizing anything, check that the transform is exact: smoothing one layer with *your* function must leave
# the model's logits unchanged (up to float32 rounding).

# %%
layer = copy.deepcopy(model)
attn_in = f"model.layers.{LAYER}.self_attn.q_proj"
amax = smoothquant.channel_amax(layer, calib[:2], names=[attn_in], progress=False)[attn_in]
blk = layer.model.layers[LAYER]
projs = [blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj]
s, new_norm, new_ws = smooth(blk.input_layernorm.weight.data, [p.weight.data for p in projs], amax, ALPHA)
with torch.no_grad():
    blk.input_layernorm.weight.copy_(new_norm)
    for p, w in zip(projs, new_ws):
        p.weight.copy_(w)
change = smoothquant.max_logit_change(model, layer, calib[:1, :64])
print(f"largest |logit change| after smoothing layer {LAYER}: {change:.2e} (exact up to float32 rounding)")
print(f"input range of q_proj: channel max / median {amax.max() / amax.median():.1f} before, "
      f"{(amax / s).max() / (amax / s).median():.1f} after")
del layer

# %%
# quick mode: the paper's default and the best of full mode's sweep; 1.0 is Model Optimizer's default (section 7)
alphas = [0.5, 0.8] if env.quick else [0.3, 0.5, 0.65, 0.8, 1.0]
for a in alphas:
    q = cl.quantize(copy.deepcopy(model), cl.W8A8Config(fmt="int8", activations="tensor", smooth_alpha=a),
                    calibration=calib, progress=False)
    record(f"int8 W8A8 static + SmoothQuant a={a}", q, 8, 8)
    del q
gap = math.log(ROWS["int8 W8A8 per-tensor static"][2]) - math.log(fp_ppl)
best = min(ROWS[f"int8 W8A8 static + SmoothQuant a={a}"][2] for a in alphas)
print(f"SmoothQuant recovers {1 - (math.log(best) - math.log(fp_ppl)) / gap:.0%} of static INT8's gap "
      "(in log-perplexity)")

# %%
cl.expected.show("03", MODEL, env, "SmoothQuant")  # your alphas beside every measured mode's (full: 0.3 to 1.0)

# %% [markdown]
# **Which α?** The paper's 0.5 leaves this model's loudest channels too loud (the down_proj inputs above): in the
# table, 0.8 recovers far more of static INT8's gap than 0.5, and full mode's sweep shows the turn — 1.0 flattens
# the activations completely but starts to hurt the weights, so it lands behind 0.8. Models with large outliers want
# a larger α (the paper goes up to 0.85). Model Optimizer's SmoothQuant uses α = 1; section 7 compares the two there.

# %% [markdown] tags=["slide"]
# ## 5 · AWQ: protect the channels that matter, weights only
#
# AWQ (Lin et al. 2024) is **weight-only** 4-bit (W4A16), but it uses the activations to decide how: the weight
# columns that meet large inputs matter most. It scales column $j$ of $W$ up by $s_j$ before rounding and divides
# $x_j$ by $s_j$ (folded into the op in front, as in SmoothQuant): the product is unchanged, and the scaled column's
# rounding error *relative to its size* shrinks. Scale everything up and the group's range grows with it — so AWQ
# searches one exponent per layer, $s = \overline{|x|}^{\,\alpha}$ for $\alpha \in \{0, \tfrac1{20}, \dots,
# \tfrac{19}{20}\}$, normalised so the scales straddle 1 ($s / \sqrt{\max s \cdot \min s}$), keeping the $\alpha$ with
# the least **output** error $\lVert XW^\top - (X/s)\,Q(W s)^\top \rVert^2$. $\alpha = 0$ is plain round-to-nearest,
# so AWQ can only do better on the calibration tokens.
#
# ### Exercise 3 — AWQ's scale search on a real layer (15 min, the core exercise)
# Complete `awq_search(W, X, bits, group_size, grid)`: `W` `(out, in)`, calibration inputs `X` `(tokens, in)`.
# Use `rtn(w)` below (symmetric round-to-nearest at `bits`, `group_size`) as the quantizer. Return `(s, errors)`: the
# best `(in,)` scales and the list of `grid` output errors (floats), one per $\alpha = i / \text{grid}$.

# %%
def rtn(w: torch.Tensor, bits: int = 4, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Symmetric round-to-nearest fake quantization (lab 01), groups along in_features."""
    return cl.quant.fake_quantize(w, bits, group_size, sym=True)


def awq_search(W: torch.Tensor, X: torch.Tensor, bits: int = 4, group_size: int = GROUP_SIZE, grid: int = 20):
    """AWQ's grid search for one Linear -> (s (in,), [output error at alpha = i / grid for i in range(grid)])."""
    ### BEGIN SOLUTION
    W, X = W.float(), X.float()
    mean_abs = X.abs().mean(dim=0)  # (in,): how loud each input channel is on average
    Y = X @ W.t()  # (tokens, out): the layer's exact outputs
    errors, best, best_s = [], float("inf"), None
    for i in range(grid):
        s = mean_abs.pow(i / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # straddle 1
        Y_hat = (X / s) @ rtn(W * s, bits, group_size).t()  # inputs divided, columns scaled up then rounded
        err = ((Y - Y_hat) ** 2).sum().item()
        errors.append(err)
        if err < best:
            best, best_s = err, s
    return best_s, errors
    ### END SOLUTION


# %%
awq_search = cl.checks.check_awq_search(awq_search)

# %% [markdown]
# Your search on one real layer: the inputs of layer 10's `up_proj` and `gate_proj` (they read the same norm) on the
# calibration tokens.

# %%
X = capture_inputs(f"model.layers.{LAYER}.mlp.up_proj", calib[:2])  # (tokens, 576)
W = model.model.layers[LAYER].mlp.up_proj.weight.detach()
s_best, errs = awq_search(W, X)
fig, ax = plt.subplots(figsize=(5.5, 3))
ax.plot([i / len(errs) for i in range(len(errs))], errs, marker="o")
ax.set(xlabel="alpha", ylabel="output error ||XW^T - (X/s)Q(Ws)^T||^2", title=f"AWQ search, layer {LAYER} up_proj")
plt.show()
print(f"alpha = 0 (RTN) error {errs[0]:.1f}; best alpha {errs.index(min(errs)) / len(errs):.2f} error "
      f"{min(errs):.1f} ({1 - min(errs) / errs[0]:.0%} lower)")

# %% [markdown]
# The whole model, layer by layer (`cl.quantize(model, cl.AWQConfig(...))`; each layer calibrated on the outputs of
# the already-quantized ones, as lab 02's GPTQ). Beside it, RTN at the same grid. Symmetric AWQ is what Model
# Optimizer's INT4-AWQ does; asymmetric with AWQ's clip search is what AutoAWQ and llm-compressor write. Quick mode
# runs the symmetric one (section 7 holds it against Model Optimizer's); full mode adds asymmetric + clip, a second
# whole-model search (in a quick run of make test on a 2-core CPU it took 107 s, the symmetric one 88 s).

# %%
rtn_sym = cl.quant.fake_quantize_model(model, 4, GROUP_SIZE, sym=True)
record("rtn w4 g64 sym", rtn_sym, formats.bits_per_element("int4 sym g64"), 16, GROUP_SIZE)
del rtn_sym
rtn_asym = cl.quant.fake_quantize_model(model, 4, GROUP_SIZE, sym=False)
record("rtn w4 g64 asym", rtn_asym, formats.bits_per_element("int4 asym g64, 4-bit zero"), 16, GROUP_SIZE)
del rtn_asym
AWQS = {"awq w4 g64 sym": cl.AWQConfig(group_size=GROUP_SIZE, sym=True)}
if not env.quick:  # another whole-model search, with the clip search on top
    AWQS["awq w4 g64 asym + clip"] = cl.AWQConfig(group_size=GROUP_SIZE, sym=False, clip=True)
for name, cfg in AWQS.items():
    t0 = time.perf_counter()
    q = cl.quantize(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    print(f"{name}: quantized in {time.perf_counter() - t0:.0f} s")
    record(name, q, formats.bits_per_element("int4 sym g64" if cfg.sym else "int4 asym g64, 4-bit zero"), 16,
           GROUP_SIZE)
    if cfg.sym:
        awq_model = q  # kept for the probe at the end
    else:
        del q

# %% [markdown] tags=["slide"]
# ## 6 · Microscaling: NVFP4 and MXFP4
#
# Blackwell's FP4 formats store E2M1 elements (values $\pm\{0, 0.5, 1, 1.5, 2, 3, 4, 6\}$) with a scale per small
# block: **MXFP4** (OCP) a power-of-two (E8M0) scale per 32 values; **NVFP4** an E4M3 scale per 16 values plus one
# FP32 scale per tensor. The tensor scale $s_t = \max|w| / (448 \cdot 6)$ lets the E4M3 block scales use their whole
# range whatever the tensor's magnitude. Both are tiny blocks: they need no zero point, and they quantize the
# *activations* too (W4A4), dynamically, block by block.
#
# ### Exercise 4 — NVFP4's two-level scales (7 min)
# Complete `nvfp4(w)` for `w` `(..., n)`, `n` a multiple of 16: the tensor scale $s_t$ as above; per block of 16
# consecutive values a scale $\text{e4m3}(\max|w_b| / 6 / s_t)$ (clamp to 448 before the cast); elements
# `formats.round_to_e2m1(w / (block_scale * s_t))`; return the dequantized tensor (same shape, float32). A block whose
# scale rounds to 0 comes back as zeros.

# %%
def nvfp4(w: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization: E2M1 elements, an E4M3 scale per 16 values, an fp32 scale per tensor."""
    ### BEGIN SOLUTION
    blocks = w.float().reshape(-1, 16)  # (n_blocks, 16) along the last dim
    s_t = blocks.abs().max() / (448 * 6)
    s_t = s_t if s_t > 0 else torch.ones(())
    scales = (blocks.abs().amax(dim=-1, keepdim=True) / 6 / s_t).clamp(max=448).to(torch.float8_e4m3fn).float()
    denom = scales * s_t  # (n_blocks, 1)
    x = torch.where(denom > 0, blocks / denom, torch.zeros_like(blocks))
    return (formats.round_to_e2m1(x) * denom).reshape(w.shape)
    ### END SOLUTION


# %%
nvfp4 = cl.checks.check_nvfp4(nvfp4)

# %%
w = model.model.layers[LAYER].mlp.up_proj.weight.detach()
for name, w_hat in {"int4 sym g64": rtn(w), "nvfp4 (yours)": nvfp4(w),
                    "mxfp4": formats.mxfp4_quantize(w).dequantize()}.items():
    key = "nvfp4" if name.startswith("nvfp4") else name
    print(f"{name:14s} {formats.bits_per_element(key):5.3f} bits/weight  relative error "
          f"{((w_hat - w).norm() / w.norm()).item():.4f}")

MX = {"nvfp4 W4A16": cl.MXConfig(fmt="nvfp4", activations=False), "nvfp4 W4A4": cl.MXConfig(fmt="nvfp4"),
      "mxfp4 W4A4": cl.MXConfig(fmt="mxfp4"), "mxfp8 W8A8": cl.MXConfig(fmt="mxfp8")}
if env.quick:
    MX.pop("mxfp8 W8A8")
for name, cfg in MX.items():
    q = cl.quantize(copy.deepcopy(model), cfg)
    record(name, q, actquant.weight_bits(cfg), actquant.activation_bits(cfg))
    del q

# %% [markdown]
# ### Going further: the outliers into the exponent (LLM-FP4's pre-shifted bias)
# Per-tensor FP4 activations are what a W4A4 kernel wants (one scale, no per-token reduction), but one loud channel
# sets that scale for all. LLM-FP4 (Liu et al., 2023) gives each input channel $j$ a **power-of-two** factor
# $2^{b_j}$ and moves it into the weights: $x_j w_{ij} = (x_j / 2^{b_j})(w_{ij} \cdot 2^{b_j})$. Multiplying by a power of
# two only changes a floating-point number's exponent, so the weight side is exact — in fp32 here, and in an FP
# weight format it is a shift of the exponent bias, which is where the name comes from. Below: $b_j$ brings every
# channel's max within a factor $\sqrt2$ of the median channel's, on the real inputs of one `down_proj`
# (weights kept at full precision, to see the activation side alone).

# %%
X = capture_inputs(f"model.layers.{LAYER}.mlp.down_proj", calib[:2])  # (tokens, 1536)
Wd = model.model.layers[LAYER].mlp.down_proj.weight.detach().float()  # (576, 1536)
Y = X @ Wd.t()
amax = X.abs().amax(dim=0).clamp(min=1e-8)  # (1536,) per input channel
b = torch.round(torch.log2(amax / amax.median()))  # (1536,) integer exponents
X_shift, W_shift = X / 2**b, Wd * 2**b  # (tokens, 1536), (576, 1536)
fp4 = lambda t, s: formats.round_to_e2m1(t / s) * s  # noqa: E731  E2M1 with the scale s (per tensor or per row)
err = lambda Yq: ((Yq - Y).norm() / Y.norm()).item()  # noqa: E731
print(f"the shift is exact: max |X W^T - X' W'^T| = {(X_shift @ W_shift.t() - Y).abs().max().item():.1e}; "
      f"exponents b in [{int(b.min())}, {int(b.max())}], channel max / median before {(amax.max() / amax.median()).item():.0f}x, "
      f"after {(X_shift.abs().amax(0).max() / X_shift.abs().amax(0).median()).item():.1f}x")
per_tensor = lambda t: fp4(t, t.abs().max() / formats.E2M1_MAX)  # noqa: E731
per_token = lambda t: fp4(t, t.abs().amax(dim=-1, keepdim=True) / formats.E2M1_MAX)  # noqa: E731
print(f"FP4 activations, output error: per-tensor {err(per_tensor(X) @ Wd.t()):.3f} | per-tensor after the shift "
      f"{err(per_tensor(X_shift) @ W_shift.t()):.3f} | per-token {err(per_token(X) @ Wd.t()):.3f} | "
      f"per-token after the shift {err(per_token(X_shift) @ W_shift.t()):.3f} | NVFP4 blocks "
      f"{err(actquant.quantize_activation(X, 'nvfp4', 'block') @ Wd.t()):.3f}")

# %% [markdown]
# On this layer the shift turns per-tensor FP4 from useless into better than per-token scales without it (quick mode
# on a CPU: 0.70 → 0.18, against 0.25 per token), at no run-time cost: it lives in the weights. It does not touch the
# other axis — a massive-activation token still sets the one scale — and NVFP4's blocks of 16, each with its own
# scale, stay far ahead: they adapt along both axes, in hardware.

# %% [markdown]
# ### Going further: a rotation flattens the outliers (QuaRot / SpinQuant)
# An orthogonal $R$ changes nothing in exact arithmetic: $XW^\top = (XR)(WR)^\top$. A random rotation mixes every
# channel into every other (QuaRot uses a randomised Hadamard matrix, the fast kind; a random orthogonal one shows the
# same effect), so one loud channel becomes many moderate ones: the kurtosis (a measure of
# tailedness; 3 for a Gaussian) collapses, and 4-bit activations survive. Shown here on one layer; QuaRot folds the
# rotations into the weights of the whole model.

# %%
X = capture_inputs(f"model.layers.{LAYER}.mlp.down_proj", calib[:2])  # (tokens, 1536)
Wd = model.model.layers[LAYER].mlp.down_proj.weight.detach()  # (576, 1536)
H = actquant.random_rotation(Wd.shape[1], SEED)  # (1536, 1536) random orthogonal (QR of a Gaussian matrix)
kurt = lambda t: (((t - t.mean()) / t.std()) ** 4).mean().item()  # noqa: E731
Y = X @ Wd.t()
int4_token = lambda t: cl.quant.fake_quantize(t, 4, t.shape[-1], sym=True)  # noqa: E731  one scale per row
for label, Xr, Wr in (("as is", X, Wd), ("rotated", X @ H, Wd @ H)):
    Y_int = int4_token(Xr) @ cl.quant.fake_quantize(Wr, 4, GROUP_SIZE, sym=True).t()
    Y_nv = actquant.quantize_activation(Xr, "nvfp4", "block") @ formats.nvfp4_quantize(Wr).dequantize().t()
    print(f"{label:8s} input kurtosis {kurt(Xr):7.1f} | W4A4 output error: INT4 per-token "
          f"{((Y_int - Y).norm() / Y.norm()).item():.4f}, NVFP4 {((Y_nv - Y).norm() / Y.norm()).item():.4f}")

# %% [markdown]
# With one scale per token, the rotation is what makes 4-bit activations possible: the loud channels no longer set
# every token's step. NVFP4 already isolates them in blocks of 16 values with their own scale, and here the rotation
# does not help it — it spreads each outlier over every block. Rotations and microscaling are two answers to the
# same problem; which one (or both) pays depends on the format's block size.
#
# One layer is not the model. `cl.MXConfig(rotate=True)` puts every Linear behind a random rotation (one per input
# width, applied online: $x R$ is quantized at run time, $W R$ once), the whole-model version of the cell above:

# %%
for name, cfg in {"nvfp4 W4A4 + rotation": cl.MXConfig(fmt="nvfp4", rotate=True, seed=SEED),
                  "mxfp4 W4A4 + rotation": cl.MXConfig(fmt="mxfp4", rotate=True, seed=SEED)}.items():
    q = cl.quantize(copy.deepcopy(model), cfg)
    record(name, q, actquant.weight_bits(cfg), actquant.activation_bits(cfg))
    del q
cl.expected.show("03", MODEL, env, "W4A4")  # with and without the rotation, every measured mode

# %% [markdown]
# The whole model says what the one layer said. MXFP4's blocks of 32 share a power-of-two scale, so one loud channel
# flattens its 31 neighbours: the rotation spreads it out and MXFP4 W4A4 improves a lot (it stays far behind NVFP4).
# NVFP4's blocks of 16 with a fine E4M3 scale each already hold the outliers in blocks of their own, and the rotation
# makes it *worse*: every block now carries a share of every outlier. Rotation papers quantize activations with one
# scale per token (INT4), where it is essential; with microscaling formats, test it before you assume it helps.

# %% [markdown] tags=["slide"]
# ## 7 · The library counterpart: NVIDIA Model Optimizer
#
# Model Optimizer (`nvidia-modelopt`) is what NVIDIA's deployment stack expects: `mtq.quantize(model, config,
# forward_loop)` inserts quantizers (fake quantization, as ours), calibrates them, and `export_hf_checkpoint` writes
# the checkpoint TensorRT-LLM's `LLM(...)` loads. Its INT4-AWQ uses 128-wide blocks: 576 is not divisible by 128, so
# `compresslab.nvmodelopt` sets 64. Same model, same calibration windows as above.

# %%
ok, why = nvmodelopt.available()
print(why)
MO = {}
if ok:
    for name in (["fp8", "int4_awq"] if env.quick else ["fp8", "int8_sq", "int4_awq", "w4a8_awq"]):
        t0 = time.perf_counter()
        # quick mode: Model Optimizer's AWQ search on 2 of the windows (it runs many forward passes per layer)
        data = calib[:2] if env.quick and "awq" in name else calib
        q = nvmodelopt.quantize(copy.deepcopy(model), name, data, block_size=GROUP_SIZE, progress=False)
        print(f"Model Optimizer {name}: calibrated in {time.perf_counter() - t0:.0f} s")
        w_bits, a_bits = {"fp8": (8, 8), "int8_sq": (8, 8), "int4_awq": (formats.bits_per_element("int4 sym g64"), 16),
                          "w4a8_awq": (formats.bits_per_element("int4 sym g64"), 8)}[name]
        MO[name] = record(f"modelopt {name}", q, w_bits, a_bits, GROUP_SIZE if "awq" in name else None)
        if name == "int4_awq":
            print(nvmodelopt.summary(q)[:800])
            path = nvmodelopt.export(q, MODELOPT_DIR, tokenizer=tok)  # engines need the tokenizer
            back = nvmodelopt.read_export(path)  # safetensors + json only: no Model Optimizer involved
            # the export re-quantizes q/k/v (and gate/up) for one shared pre_quant_scale: compare with the weights
            # as exported (ModelOpt's own pre-export step on a copy)
            fq = nvmodelopt.fake_quantized_weights(q, as_exported=True)
            same = sum(((back["weights"][k] - fq[k]).abs() <= 1e-6 * fq[k].abs().max()).sum().item() for k in fq)
            total = sum(v.numel() for v in fq.values())
            print(f"exported to {path}: {back['quant_config']['quantization']['quant_algo']}; read back independently, "
                  f"{same / total:.4%} of {total:,} weights equal the fake-quantized ones (to float32 rounding) over "
                  f"{len(fq)} Linears; the rest sit one grid step apart (rounding ties: the export divides by the "
                  "scale, the fake quantizer multiplies by its inverse)")
        del q
    try:
        nvmodelopt.quantize(copy.deepcopy(model), "nvfp4", calib[:1], progress=False)
    except RuntimeError as e:
        print("NVFP4 through Model Optimizer:", e)
else:
    print("skipping the Model Optimizer section (the rest of the lab does not need it)")

# %%
# Model Optimizer's SmoothQuant uses alpha = 1 (its default): compare it with this lab's alpha = 1 row
pairs = [("fp8", "fp8 W8A8 per-tensor static"), ("int8_sq", "int8 W8A8 static + SmoothQuant a=1.0"),
         ("int4_awq", "awq w4 g64 sym")]
for mo, ours in pairs:
    if mo in MO and ours in ROWS:
        print(f"{mo:9s} Model Optimizer {MO[mo]:7.2f} | this lab's {ours} {ROWS[ours][2]:7.2f} "
              f"({(ROWS[ours][2] / MO[mo] - 1):+.1%})")

# %% [markdown]
# Where they differ, the recipes differ: Model Optimizer's FP8 is per-tensor static for both weights and activations
# (ours above uses per-channel weights); its SmoothQuant gives every Linear its own s with α = 1 (o_proj too, as a
# run-time `pre_quant_scale`), where ours folds one s per norm and leaves o_proj alone — at α = 1, s = max|X_j| does
# not depend on the weights, so the Linears that share an input get the same s either way; its AWQ ("awq_lite")
# searches α on whole blocks' outputs with 64-wide blocks symmetric, ours on each Linear group's outputs. Which engine reads which output: the Model Optimizer export above is
# TensorRT-LLM's input (FP8 needs sm89+, INT4-AWQ sm80+); `transformers` does not load it. Lab 02's compressed-tensors
# export is what vLLM serves (lab 07).

# %% [markdown] tags=["slide"]
# ## 8 · Quality against bits, and a stress test

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for method, (wb, ab, p) in ROWS.items():
    if wb < 32:
        ax.scatter(wb + ab / 100, p, s=30)
        ax.annotate(f"{method} (A{ab:g})", (wb, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
ax.axhline(fp_ppl, color="gray", ls="--", lw=0.8, label=f"fp32 {fp_ppl:.2f}")
ax.set(xlabel="weight bits per element (scales counted)", ylabel="perplexity", yscale="log",
       title="Quality vs bits (activation bits in brackets)")
ax.legend()
plt.show()

# %%
probe = {"fp32": model, "awq w4 g64 sym": awq_model}
probe["fp8 W8A8 per-token"] = cl.quantize(copy.deepcopy(model), cl.W8A8Config(fmt="fp8"))
if not env.quick:  # quick mode's 32 questions cannot rank more formats anyway (+-17 points)
    probe["nvfp4 W4A4"] = cl.quantize(copy.deepcopy(model), cl.MXConfig(fmt="nvfp4"))
for name, m in probe.items():
    acc = cl.evaluation.arithmetic_probe(m, tok, n=sz.probe_n, progress=False)
    print(f"{name:22s} arithmetic probe {cl.evaluation.accuracy_with_interval(acc, sz.probe_n)}")

# %% [markdown]
# The probe is a CPU-sized stress test. On a GPU with a ≥ 0.5B instruct model (`MODEL = "qwen2.5-0.5b"`, full mode),
# the next cell runs GSM8K (zero-shot, chain of thought, exact match on the final number) for the same formats — the
# benchmark where the seed report saw 4-bit models fail; a 135M model scores near zero on it before any quantization.

# %%
if sz.gsm8k_n and MODEL != "smollm2-135m":
    for name, m in probe.items():
        acc = cl.evaluation.gsm8k_accuracy(m, tok, n=sz.gsm8k_n, progress=False)
        print(f"{name:22s} GSM8K {cl.evaluation.accuracy_with_interval(acc, sz.gsm8k_n)}")
else:
    print("GSM8K skipped: it needs a >= 0.5B instruct model on a GPU (MODEL = 'qwen2.5-0.5b', full mode); "
          "the arithmetic probe above is the CPU stand-in.")

# %%
cl.results.table(lab="03", model=MODEL, quick=env.quick)

# %% [markdown]
# ## Reflection
# **Question 1.** You serve this model on an H100 to many concurrent users (large batches). FP8 W8A8 or INT4-AWQ
# W4A16? And on a single-user laptop GPU?

# %% [markdown] tags=["solution"]
# Many users: FP8 W8A8. Large batches put the projections past the ridge point, where W4A16 saves nothing (it still
# multiplies in BF16 after dequantizing) while FP8 doubles the tensor-core rate; FP8's quality loss here is small.
# Single user (batch 1): decode is memory-bound, so bytes decide: INT4-AWQ reads ~3.7x fewer weight bytes than BF16
# and ~1.9x fewer than FP8. Model Optimizer's own benchmark shows exactly this crossover (INT4-AWQ 1.33x at batch 1,
# 0.83x at batch 64).

# %% [markdown]
# **Question 2.** Static per-tensor INT8 lost far more than per-token INT8 here. Why does TensorRT-LLM's INT8 path
# still prefer static scales with SmoothQuant?

# %% [markdown] tags=["solution"]
# Static scales are fixed at export: the kernel needs no run-time reduction over each token and can fuse the
# quantization of its input into the previous op's epilogue with a constant. SmoothQuant makes static scales
# viable by flattening the channel outliers that set the per-tensor max. Per-token scales are accurate but need a
# max over each row before the GEMM (a small extra pass, or a fused one).

# %% [markdown] tags=["instructor"]
# **Answers to expect and follow-ups.** Q1: push people to name the regime (M tokens per matmul) before the format.
# Q2: ask where the per-token max is computed in a fused kernel (the previous RMSNorm's epilogue).

# %% [markdown]
# ## Summary
# * W8A8 pays off where matmuls are compute-bound (prefill, big batches); W4A16 where they are memory-bound (batch-1
#   decode). W4A4 (NVFP4 on Blackwell) aims at both.
# * Activations have outlier channels and massive tokens: per-tensor INT8 suffers, FP8's relative grid and per-token
#   scales cope; SmoothQuant moves the range into the weights, exactly, through the norm — with an α chosen per model
#   (this one's loud down_proj inputs want ~0.8, not the paper's 0.5; Model Optimizer defaults to 1).
# * AWQ scales salient input channels up before rounding (searched on the output error), weight-only.
# * NVFP4 = E2M1 + E4M3 per 16 + FP32 per tensor (4.5 bits); MXFP4 = E2M1 + E8M0 per 32 (4.25).
# * Model Optimizer does the same in NVIDIA's stack and exports what TensorRT-LLM loads.

# %% [markdown]
# ## Your numbers vs expected
# Every figure this run recorded, beside the reference measured in the same mode on a named machine
# (`compresslab/expected`, written by `tools/expected_figures.py` from real runs) and its noise band. ✓: within the
# band. ⚠: outside it — another model, mode or seed, or an edited cell, explains most; if not, look at your
# exercises' outputs. Modes nobody has measured yet (a GPU the project has not run on) say so: your numbers are then
# the reference.

# %%
cl.expected.compare("03", MODEL, env)

# %%
cl.checks.summary()
