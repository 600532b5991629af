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
# # Lab 08 · Low-rank factorization, and the stacked-compression capstone
#
# **The Art of Compressing LLMs** — hands-on lab 8 of 7.
#
# The first half adds the last tool of the day: **low rank**. A weight matrix $W$ ($d_{out} \times d_{in}$) becomes two
# thin ones, $W \approx AB$ with $A$: $d_{out} \times r$ and $B$: $r \times d_{in}$. You will see when that saves memory
# (and when it cannot), when it saves time, why looking at the *activations* (ASVD) beats plain SVD, and how a small
# low-rank term repairs quantization error — the idea GEAR used on the KV cache in lab 06.
#
# The second half **stacks** what the day built on one model and measures every recipe on one table: a student
# distilled at T = 1, the KD lab's winner (lab 05), GPTQ (lab 02), 2:4 sparsity (lab 04), a low-rank fix (this lab), a
# compressed KV cache (lab 06's winner, 4-bit KIVI), against the decode roofline (lab 07). You finish with a
# quality-vs-size Pareto front and a "which recipe for which constraint" card built from *your* measurements.
#
# **Learning objectives.** By the end you can
# 1. truncate a matrix with the SVD and say what rank breaks even on parameters and on time;
# 2. explain why activation-aware SVD (ASVD) keeps a model working where plain SVD does not;
# 3. use a low-rank term to compensate quantization error, and count its bytes;
# 4. stack compression steps in an order that composes, and measure weight bytes, KV bytes, perplexity, arithmetic
#    accuracy and speed for each recipe;
# 5. pick a recipe for a memory-, latency- or reasoning-bound deployment from measurements, not folklore.
#
# **Time:** about 60 minutes (21 min of exercises: 5 + 3 + 3 + 10). **Hardware:** CPU for everything (quick mode
# ~3 min on a 2-core CPU; full mode runs five GPTQ-sized passes and a short distillation, 31 min there, measured).

# %% [markdown] tags=["instructor"]
# **Instructor notes — lab 08.** Slot: 60 min (5 min spectra, 10 min exercises 1–2 and the speed plot, 10 min ASVD
# with exercise 3, 5 min low-rank compensation, 20 min the capstone table, exercise 4, the Pareto plot and the recipe
# card, 10 min the arithmetic question and wrap-up). Exercise minutes: 1 · truncated SVD (5), 2 · break-even rank (3),
# 3 · ASVD (3), 4 · choose a recipe under a byte budget (10, the core exercise, written while the capstone measures).
#
# * Start the capstone at minute 0 in full mode (it takes the longest): section 6 needs only the parameters cell. Run
#   the parameters cell and section 6 in a second copy of the notebook (its own kernel), which loads the model, the
#   calibration data and the activation statistics itself and reuses lab 02's export from `GPTQ_DIR`; teach sections
#   1–5 in the first copy while it measures. Run top to bottom, the same cell reuses the first half's statistics:
#   both ways record the same figures.
# * Common mistakes the checkers catch: keeping the *smallest* singular values (`S` ascending is numpy's `eigh`, not
#   `svd`); dropping `S` altogether; returning a dense `U S Vᵀ` with an identity factor (right product, no saving);
#   `floor(d_out·d_in/(d_out+d_in))`, which at 576×576 gives 288 — exactly the dense size, no saving; in ASVD,
#   forgetting to undo the scale, scaling rows instead of columns, or multiplying instead of dividing; in
#   `choose_recipe`, leaving out the KV cache or one of its factors (context, batch), multiplying the weights by the
#   batch too, `<` where the budget allows equality, returning the smallest recipe instead of the best that fits, and
#   `min([])` raising when nothing fits.
# * Discussion prompts: "a 4096×4096 layer at rank 1024 stores half the numbers — is it twice as fast at batch 1?"
#   (two launches and two reads of x; at batch 1 it is memory-bound on A and B, so yes-ish on a GPU, rarely on a CPU
#   at these sizes); "why is the MLP harder to factorize than k/v projections?"; "the probe fell from 29 % to 13 %
#   at 4 bits (full mode on the CPU, p < 0.001 paired) while perplexity rose 18 % — what does that say about
#   perplexity as a proxy, and what would you check before generalising?" (error bars; 2-digit addition is not
#   GSM8K; this model's weights were already dequantized from a 4-bit GGUF; a 1B+ model may differ).
# * If the room has GPUs, set `MODEL = "qwen2.5-0.5b"` for the capstone: the GSM8K row then runs.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # offline default; any Llama-family hub model on a GPU (e.g. "qwen2.5-0.5b")
DTYPE = "float32"
QUICK = None  # None: automatic (quick on a CPU, full on a CUDA GPU); True/False forces it (the tests set True)
SEED = 0
LOWRANK_RUNS = None  # (which Linears, share of their parameters kept) to factorize; None: k/v at 0.8 quick, 3 runs full
COMP_RANK = 32  # rank of the low-rank fix on quantization error
STUDENT_LAYERS = 20  # the capstone student keeps this many of the teacher's layers (lab 05)
DISTILL_STEPS = None  # KD steps for the student; None: 8 quick, 48 full
CONTEXT = 4096  # the context length at which the table states KV-cache bytes and the roofline bound
GPU_BANDWIDTH_GBPS = 3350.0  # H100 SXM HBM3, for the roofline column (lab 07 measures your own)
PROBE_N = None  # arithmetic-probe questions per variant; None: 16 quick, the device's full size otherwise
GPTQ_DIR = "gptq-export"  # lab 02's 4-bit checkpoint: the capstone reuses it when present

# %% [markdown]
# ## 0 · Setup

# %%
import copy
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import compresslab as cl
from compresslab import deploy, kvcache, kvcompress, lowrank, stack

env = cl.setup(quick=QUICK, seed=SEED, lab="08")  # prints the device, mode and this lab's runtime
print(env)
sz = env.sizes
LOWRANK_RUNS = LOWRANK_RUNS or ([("k/v", 0.8)] if env.quick else [("k/v", 0.8), ("attention", 0.9), ("all", 0.95)])
DISTILL_STEPS = DISTILL_STEPS or (8 if env.quick else 48)
PROBE_N = PROBE_N or (16 if env.quick else sz.probe_n)
model, tok = cl.load_model(MODEL, dtype=DTYPE, device=env.device)
calib = cl.data.calibration_batches(tok, n_samples=sz.calib_samples, seq_len=sz.calib_len, seed=SEED)  # (n, len)
print(f"calibration: {tuple(calib.shape)} token ids of WikiText-2 valid")


def ppl_of(m):
    return cl.evaluation.perplexity(m, tok, n_windows=sz.ppl_windows, seq_len=sz.seq_len, progress=False)


dense_ppl = ppl_of(model)
print(f"dense perplexity: {dense_ppl:.2f}")

# %% [markdown] tags=["slide"]
# ## 1 · Are LLM weights low-rank?
#
# The SVD writes $W = U \Sigma V^\top$ with singular values $\sigma_1 \ge \sigma_2 \ge \dots$. Keeping the $r$ largest
# gives the best rank-$r$ approximation (Eckart–Young), with squared error $\sum_{i>r}\sigma_i^2$. So the question is
# how fast the spectrum falls. Here are the real spectra of one layer's projections, with the energy
# $\sum_{i\le r}\sigma_i^2 / \sum_i \sigma_i^2$ kept at each rank:

# %%
LAYER = len(model.model.layers) // 2
layer = model.model.layers[LAYER]
names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
for name in names:
    W = layer.get_submodule(name).weight.detach().float().cpu()
    S = torch.linalg.svdvals(W)
    energy = (S**2).cumsum(0) / (S**2).sum()
    r90 = lowrank.rank_for_energy(S, 0.9)
    ax1.plot(S / S[0], label=f"{name.split('.')[-1]} {tuple(W.shape)}")
    ax2.plot(np.arange(1, len(S) + 1) / len(S), energy, label=f"{name.split('.')[-1]}: 90 % at r={r90}/{len(S)}")
ax1.set(yscale="log", xlabel="index i", ylabel="σ_i / σ_1", title=f"singular values, layer {LAYER}")
ax2.set(xlabel="rank / full rank", ylabel="energy kept", title="energy kept vs rank")
ax1.legend(fontsize=7)
ax2.legend(fontsize=7)
plt.show()

# %% [markdown]
# The spectra fall slowly: to keep 90 % of the energy, most projections need well over half their full rank. Trained
# LLM weights are *not* low-rank (unlike the *updates* fine-tuning makes to them, which LoRA exploits — GaLore
# exploits low-rank *gradients* — or the KV cache's quantization residual in lab 06). Keep that in mind for what
# follows.
#
# ### Exercise 1 — the truncated SVD (5 min)
# Write `truncated_svd(W, rank)` returning $A$ ($d_{out}\times r$) and $B$ ($r\times d_{in}$) with $AB$ the best
# rank-$r$ approximation. Split $\Sigma$ as you like (e.g. $\sqrt{\Sigma}$ into each factor).

# %%
def truncated_svd(W, rank):
    """W (d_out, d_in) -> A (d_out, rank), B (rank, d_in) with A @ B the best rank-`rank` approximation of W."""
    ### BEGIN SOLUTION
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in); S descending
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]
    ### END SOLUTION


truncated_svd = cl.checks.check_truncated_svd(truncated_svd)

# %% [markdown] tags=["slide"]
# ## 2 · The honest accounting: parameters and time
#
# $A$ and $B$ store $r(d_{out}+d_{in})$ numbers instead of $d_{out}d_{in}$. So a rank saves parameters only while
# $r < d_{out}d_{in}/(d_{out}+d_{in})$ — for a square $d\times d$ matrix that is $d/2$, *half* the full rank.
#
# ### Exercise 2 — the break-even rank (3 min)
# Write `break_even_rank(d_out, d_in)`: the largest integer rank that stores strictly fewer numbers than the dense
# matrix.

# %%
def break_even_rank(d_out, d_in):
    """The largest rank r with r * (d_out + d_in) < d_out * d_in."""
    ### BEGIN SOLUTION
    return math.ceil(d_out * d_in / (d_out + d_in)) - 1
    ### END SOLUTION


break_even_rank = cl.checks.check_break_even_rank(break_even_rank)

# %%
print(f"{'Linear':18s} {'shape':>12s} {'full rank':>9s} {'break-even':>10s} {'90% energy':>10s}")
for name in names:
    W = layer.get_submodule(name).weight.detach().float().cpu()
    r90 = lowrank.rank_for_energy(torch.linalg.svdvals(W), 0.9)
    be = break_even_rank(*W.shape)
    print(f"{name:18s} {str(tuple(W.shape)):>12s} {min(W.shape):9d} {be:10d} {r90:10d}"
          + ("   <- 90 % energy costs MORE than dense" if r90 > be else ""))

# %% [markdown]
# Time is a separate question: $y = (xB^\top)A^\top$ is two matmuls, each launched and each reading $x$ or the
# intermediate. Measured on this machine for `up_proj`'s shape, at decode (1 token) and prefill (512 tokens):

# %%
W = layer.mlp.up_proj.weight.detach()  # (1536, 576) on the lab's device
d_out, d_in = W.shape
ranks = [32, 64, 128, 256, break_even_rank(d_out, d_in)]
timings = {}
for tokens in (1, 512):
    x = torch.randn(tokens, d_in, device=W.device, dtype=W.dtype)
    dense_t = cl.evaluation.median_seconds(lambda: x @ W.T, repeats=30)
    lowr_t = []
    for r in ranks:
        A, B = (f.to(W.device, W.dtype).contiguous() for f in lowrank.svd_factors(W, r))
        lowr_t.append(cl.evaluation.median_seconds(lambda: (x @ B.T) @ A.T, repeats=30))
    timings[tokens] = (dense_t, lowr_t)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for ax, (tokens, (dense_t, lowr_t)) in zip(axes, timings.items()):
    ax.plot(ranks, [t * 1e6 for t in lowr_t], "o-", label="A·(B·x): two thin matmuls")
    ax.axhline(dense_t * 1e6, color="k", ls="--", label="dense W·x")
    ax.axvline(break_even_rank(d_out, d_in), color="gray", ls=":", label="parameter break-even")
    ax.set(xlabel="rank r", ylabel="µs per call", title=f"{tokens} token(s), {d_out}x{d_in}, {env.device}")
    ax.legend(fontsize=7)
plt.show()

# %% [markdown] tags=["slide"]
# ## 3 · Activation-aware SVD (ASVD)
#
# Plain SVD minimises $\|W - AB\|_F$, treating every input channel alike. But the model computes $XW^\top$, and
# lab 04 showed a few input channels carry activations 10–100× larger than the rest: an error on those columns is
# amplified. ASVD (Yuan et al., 2023) scales column $j$ by $s_j = \|X_j\|^{\alpha}$ ($\alpha = 0.5$), truncates
# $W\,\mathrm{diag}(s)$, and folds $\mathrm{diag}(s)^{-1}$ back into $B$:
# $$W\,\mathrm{diag}(s) \approx A B' \quad\Rightarrow\quad W \approx A\,(B'\,\mathrm{diag}(s)^{-1}).$$
#
# ### Exercise 3 — activation-aware factors (3 min)
# Write `asvd_factors(W, scale, rank)` (scale: one positive number per input channel). Reuse your `truncated_svd`.

# %%
def asvd_factors(W, scale, rank):
    """Truncate W diag(scale) to `rank`, then undo the scaling in B: A @ B approximates W itself."""
    ### BEGIN SOLUTION
    A, B = truncated_svd(W * scale, rank)
    return A, B / scale
    ### END SOLUTION


asvd_factors = cl.checks.check_asvd_factors(asvd_factors)

# %% [markdown]
# On real activations: the input of `up_proj` in layer LAYER over the calibration tokens. Plain SVD wins on the weight
# error it optimises; ASVD wins on the error that matters, the layer's *output*:

# %%
norms = lowrank.activation_norms(model, calib, progress=True)  # {'model.layers.i.name': (in,)}
captured = []
hook = layer.mlp.up_proj.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
with torch.no_grad():
    model(calib[:2].to(env.device))
hook.remove()
X = captured[0].reshape(-1, d_in).float().cpu()  # (tokens, 576)
Wc = W.float().cpu().clone()  # a copy: on a CPU fp32 run .float().cpu() is the model's own tensor
s = lowrank.activation_scale(norms[f"model.layers.{LAYER}.mlp.up_proj"]).cpu()
rows = []
for r in (32, 64, 128, 256):
    for label, (A, B) in (("SVD", truncated_svd(Wc, r)), ("ASVD", asvd_factors(Wc, s, r))):
        rows.append((r, label, lowrank.relative_error(Wc, A @ B), lowrank.relative_error(Wc, A @ B, X)))
fig, ax = plt.subplots()
for label, style in (("SVD", "o-"), ("ASVD", "s-")):
    part = [r for r in rows if r[1] == label]
    ax.plot([r[0] for r in part], [r[3] for r in part], style, label=f"{label}: output error ‖X(W−AB)ᵀ‖/‖XWᵀ‖")
    ax.plot([r[0] for r in part], [r[2] for r in part], style, alpha=0.4, label=f"{label}: weight error ‖W−AB‖/‖W‖")
ax.set(xlabel="rank", ylabel="relative error", title=f"layer {LAYER} up_proj on real activations")
ax.legend(fontsize=7)
plt.show()

# %% [markdown] tags=["slide"]
# ## 4 · Factorizing the model
#
# Now replace Linears of every decoder layer by their factors, each keeping the same share of its parameters, with
# plain SVD and with ASVD — starting gently: only the key and value projections (the lowest-rank ones in section 2's
# table) at 80 %. No fine-tuning afterwards, and none in ASVD either: it is training-free. What we leave out is its
# other ingredient, a sensitivity-based search that gives each layer its own rank (sensitive layers keep more) where
# we cut every Linear by one uniform ratio; SVD-LLM also updates the factors after truncation. We measure the raw
# effect.

# %%
LINEAR_SETS = {"k/v": ("self_attn.k_proj", "self_attn.v_proj"),
               "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
               "all": lowrank.DECODER_LINEARS}
for which, ratio in LOWRANK_RUNS:
    for label, act in (("SVD", None), ("ASVD", norms)):
        lr_model, ranks_used = lowrank.lowrank_model(model, ratio, act_norms=act, names=LINEAR_SETS[which],
                                                     progress=False)
        p = ppl_of(lr_model)
        mb = stack.recipe_weight_bytes(lr_model, 16) / 1e6  # every parameter stored in fp16
        cl.results.record(lab="08", method=f"{label} low-rank {which} {ratio:.0%}", model=MODEL, bits=16,
                          group_size=None, weight_mb=round(mb, 1), ppl=round(p, 3), quick=env.quick)
        print(f"{label:4s} {which:9s} Linears keeping {ratio:.0%}: perplexity {p:12.2f} (dense {dense_ppl:.2f}), "
              f"{mb:.0f} MB in fp16, k_proj rank {ranks_used[f'model.layers.{LAYER}.self_attn.k_proj']}")
        del lr_model

# %% [markdown]
# Plain SVD breaks the model even when only k and v lose a fifth of their parameters; ASVD keeps it alive but far
# from usable. The reason is section 3's plot at scale: the directions plain SVD drops carry the few input channels
# with huge activations, and 30 layers compound the error. With spectra this flat, low rank is a poor *replacement*
# for a weight on a small model. It is a good *correction*, though — of a residual that is small and structured,
# such as the error quantization leaves behind.

# %% [markdown] tags=["slide"]
# ## 5 · Low rank as error compensation
#
# Quantize $W$ to $Q(W)$, then store a rank-$r$ approximation of the residual $W - Q(W)$ in fp16 beside the codes:
# $W \approx Q(W) + AB$ (lab 06's GEAR did the same for the KV cache). Here $AB$ is section 3's recipe applied to the
# residual: the rank-$r$ SVD of $(W - Q(W))\,\mathrm{diag}(s)$ with $\mathrm{diag}(s)^{-1}$ folded back — an
# activation-scaled low-rank fix, LQER/ASVD-style (LQER: Zhang et al., 2024). EoRA (Liu et al., 2024) weights the
# residual by the full activation statistics instead: it projects it onto the eigenspace of $X^\top X$, not a diagonal
# scale. Cost: $2r(d_{out}+d_{in})$ bytes per Linear — at $r = 32$ on this model, 9.8 M parameters: 19.5 MB, about
# 7 % of the fp16 model, but a sixth of a 4-bit one. It goes into the capstone below as
# `GPTQ 4-bit + rank-COMP_RANK fix` (and, in full mode, on 3 bits). Whether it earns its bytes is the Pareto plot's
# question.

# %% [markdown] tags=["slide"]
# ## 6 · The capstone: stack the day's methods, measure every recipe
#
# A recipe is an ordered list of steps (`compresslab.stack`). The order is not cosmetic: distillation must see the
# dense teacher, pruning must precede quantization (SparseGPT prunes and quantizes in one pass, so the quantizer never
# refills the zeros), the low-rank fix follows the quantizer, and the KV cache is a run-time choice. `stack.plan`
# refuses what does not compose.

# %% [markdown]
# **The capstone can start here.** The next cell needs nothing above it but the parameters cell: it sets up as
# section 0 does, loads the model and the calibration data itself, and computes section 3's activation statistics
# unless this kernel has them already; the GPTQ 4-bit recipes load lab 02's export from `GPTQ_DIR` when it is there
# and quantize here otherwise. An instructor can start the slot with this section (in full mode, in a second copy of
# the notebook, while the first half is taught). Run top to bottom or started here, it records the same figures.

# %%
import matplotlib.pyplot as plt
import pandas as pd

import compresslab as cl
from compresslab import deploy, kvcache, kvcompress, lowrank, stack

env = cl.setup(quick=QUICK, seed=SEED, lab="08")  # section 0's seed, device and sizes
sz = env.sizes
DISTILL_STEPS = DISTILL_STEPS or (8 if env.quick else 48)
PROBE_N = PROBE_N or (16 if env.quick else sz.probe_n)
model, tok = cl.load_model(MODEL, dtype=DTYPE, device=env.device)  # a fresh teacher, whatever the first half did
calib = cl.data.calibration_batches(tok, n_samples=sz.calib_samples, seq_len=sz.calib_len, seed=SEED)  # (n, len)
if "norms" not in globals():  # started here: section 3's activation statistics, which the low-rank fix scales by
    norms = lowrank.activation_norms(model, calib, progress=True)  # {'model.layers.i.name': (in,)}
print(f"capstone: {MODEL} on {env.device}, {'quick' if env.quick else 'full'} mode, calibration {tuple(calib.shape)}; "
      f"GPTQ 4-bit from {GPTQ_DIR!r} if it holds lab 02's export")

# %%
for bad in ([("gptq", 4), ("prune", "2:4")], [("gptq", 4), ("student", STUDENT_LAYERS)]):
    try:
        stack.plan(bad)
    except ValueError as err:
        print(f"{bad}:\n  refused: {err}")

# %%
# The KV lab's verdict: on 64-wide heads 4-bit KIVI (or an FP8 cache) wins — 18.72 at 0.281x of fp16 in full mode,
# against GEAR K4/V2's 19.31 at 0.330x; GEAR's low-rank and outlier parts pay off only at 2 bits.
kivi4 = kvcompress.KVConfig(method="kivi", bits=4)
RECIPES = {
    "dense": [],
    "GPTQ 4-bit": [("gptq", 4)],
    "GPTQ 4-bit + KIVI-4 KV": [("gptq", 4), ("kv", kivi4)],
    f"GPTQ 4-bit + rank-{COMP_RANK} fix": [("gptq", 4), ("lowrank", COMP_RANK)],
    f"student {STUDENT_LAYERS}L + KD + GPTQ 4-bit": [("student", STUDENT_LAYERS), ("distill", DISTILL_STEPS),
                                                    ("gptq", 4)],
}
if not env.quick:  # three more whole-model passes
    RECIPES |= {"GPTQ 3-bit": [("gptq", 3)],
                f"GPTQ 3-bit + rank-{COMP_RANK} fix": [("gptq", 3), ("lowrank", COMP_RANK)],
                "2:4 + 4-bit (SparseGPT)": [("prune", "2:4"), ("gptq", 4)]}
train_ids = cl.data.training_windows(tok, n_windows=2 * DISTILL_STEPS, seq_len=sz.calib_len, seed=SEED)
prompt = "The history of data compression"
new_tokens = 8 if env.quick else 32
memo, rows, answers = {}, [], {}
for name, steps in RECIPES.items():
    built = stack.build(name, steps, model, calib, train_ids=train_ids, memo=memo, gptq_dir=GPTQ_DIR,
                        act_norms=norms, progress=False)  # the setup cell's activation statistics, not computed again
    m = built.model
    kv = kvcache.kv_perplexity(m, tok, built.kv, n_windows=2 if env.quick else 4, prefix=192 if env.quick else 512,
                               scored=64 if env.quick else 256, progress=False)
    factory = lambda m=m, c=built.kv: kvcache.make_cache(m, c)  # noqa: E731  (fp16 cache without a "kv" step)
    # align=64: the last 64k tokens of each 6-shot prompt, so the question itself is compressed (see lab 06 §7)
    acc, details = cl.evaluation.arithmetic_probe(m, tok, n=PROBE_N, shots=6, align=64, progress=False,
                                                  cache_factory=factory, return_details=True)
    answers[name] = [d["correct"] for d in details]  # per question: section 8 compares models pairwise
    weight_b = built.weight_bytes()
    kv_b = kvcompress.kv_bytes_per_token(m.config) * CONTEXT * kv["ratio"]  # fp16 cache x the measured ratio
    timed = deploy.timed_generate(m, tok, prompt, new_tokens)
    bound = deploy.decode_bound(weight_b, kv_b / CONTEXT, CONTEXT, 1, GPU_BANDWIDTH_GBPS)
    rows.append(dict(method=name, weight_mb=weight_b / 1e6, kv_mb=kv_b / 1e6, ppl=kv["ppl"], probe_acc=acc,
                     tok_s=timed.tokens_per_s, bound_tok_s=bound, layers=m.config.num_hidden_layers,
                     source=built.info.get("gptq", built.info.get("reused", "built")),
                     weight_bytes=weight_b, kv_bytes_per_token=kv_b / CONTEXT))  # one token of one sequence
    cl.results.record(lab="08", method=name, model=MODEL, bits=built.bits, group_size=stack.GROUP_SIZE,
                      weight_mb=round(weight_b / 1e6, 1), ppl=round(kv["ppl"], 3), probe_acc=acc,
                      tokens_per_s=timed.tokens_per_s, kv_mb=round(kv_b / 1e6, 2), quick=env.quick)
    print(f"{name:34s} weights {weight_b / 1e6:6.1f} MB  KV@{CONTEXT} {kv_b / 1e6:5.1f} MB  ppl {kv['ppl']:8.2f}  "
          f"probe {acc:.0%}  {timed.tokens_per_s:5.1f} tok/s here  ({rows[-1]['source']})")
del memo, built, m

# %% [markdown]
# Perplexity here goes *through* each variant's KV cache (prefill, then chunks of 16 tokens scored against it, as in
# lab 06), so the KIVI row pays for its cache and every other row runs with the fp16 cache a deployment stores.
# Weight bytes are what a deployment stores (lab 07's formula: 4-bit codes, fp16 scales and zeros per group of 64,
# fp16 embeddings; 2:4 keeps half the values plus 2 bits of position each;
# the low-rank fix in fp16). "tok/s here" is PyTorch on this machine, where fake-quantized weights run at fp32
# speed: only the student's fewer layers show up. The bound column is the batch-1 roofline on an H100 at CONTEXT
# tokens — what a 4-bit kernel could reach. `kv_bytes_per_token` is what one token of one sequence stores in the
# recipe's cache (`kv_mb` is that times CONTEXT): 2 (K and V) × 30 layers × 3 KV heads × 64 × 2 bytes = 23 040 in
# fp16 on this model, two thirds of it for the 20-layer student, about a quarter with KIVI-4.

# %%
table = pd.DataFrame(rows).set_index("method")
table.drop(columns="weight_bytes").round({"weight_mb": 1, "kv_mb": 1, "ppl": 2, "probe_acc": 2, "tok_s": 1,
                                          "bound_tok_s": 0, "kv_bytes_per_token": 0})

# %% [markdown] tags=["slide"]
# ## 7 · The Pareto front, a byte budget, and the recipe card
#
# A variant is on the front if no other is both smaller (weights + KV at CONTEXT) and better (perplexity).

# %%
total = table["weight_mb"] + table["kv_mb"]
order = total.sort_values().index
front, best = [], float("inf")
for name in order:
    if table.loc[name, "ppl"] < best:
        front.append(name)
        best = table.loc[name, "ppl"]
fig, ax = plt.subplots(figsize=(8, 4))
ax.scatter(total, table["ppl"], s=40)
for name in table.index:
    ax.annotate(name, (total[name], table.loc[name, "ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
ax.plot(total[front], table.loc[front, "ppl"], "r--", label="Pareto front")
ax.set(xlabel=f"weights + KV cache at {CONTEXT} tokens (MB)", ylabel="perplexity through the cache",
       yscale="log", title=f"{MODEL}: quality vs size, every recipe measured here")
ax.legend()
plt.show()
print("on the front:", ", ".join(front))

# %% [markdown] tags=["subslide"]
# ### Exercise 4 — choose a recipe under a byte budget (10 min, the core exercise)
# A deployment asks a sharper question than the plot: *this* much memory, *this* context, *this* many sequences at
# once — which of the recipes you measured is best? Write `choose_recipe(rows, budget_bytes, *, context, batch)` for
# the capstone's `rows` (a list of dicts, one per recipe; the keys you need are `weight_bytes`, `kv_bytes_per_token`
# and `ppl`):
#
# * a deployment holds the weights once, and one KV cache of `context` tokens for each of its `batch` sequences;
# * a recipe fits when those bytes are at most `budget_bytes` (exactly the budget fits);
# * return the fitting row with the lowest perplexity (on a perplexity tie, the one that needs fewer bytes), or `None`
#   when nothing fits.

# %%
def choose_recipe(rows, budget_bytes, *, context=CONTEXT, batch=1):
    """The row of `rows` with the lowest perplexity among those whose weights + KV cache (context tokens x batch
    sequences) fit in budget_bytes; fewer bytes on a perplexity tie; None when none fits."""
    ### BEGIN SOLUTION
    def total(r):  # the weights once, one cache per sequence
        return r["weight_bytes"] + r["kv_bytes_per_token"] * context * batch

    fits = [r for r in rows if total(r) <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], total(r)), default=None)  # best perplexity, then fewer bytes
    ### END SOLUTION


choose_recipe = cl.checks.check_choose_recipe(choose_recipe)

# %% [markdown]
# Your function on your own measurements, for deployments this 135M model could meet: a box with 512 MB or 256 MB
# for the model and one chat, the same 512 MB serving eight chats at once, and a 128 MB corner. The same budget picks
# a different recipe once the cache is paid per sequence.

# %%
BUDGETS = [("512 MB, one chat of 4k tokens", 512e6, 4096, 1), ("256 MB, one chat of 4k tokens", 256e6, 4096, 1),
           ("512 MB, 8 chats of 4k tokens", 512e6, 4096, 8), ("128 MB, one chat of 4k tokens", 128e6, 4096, 1)]
best_overall = min(rows, key=lambda r: r["ppl"])["method"]
for label, budget, context, batch in BUDGETS:
    need = {r["method"]: stack.deployment_bytes(r, context, batch) / 1e6 for r in rows}  # MB at this context, batch
    pick = choose_recipe(rows, budget, context=context, batch=batch)
    if pick is None:
        smallest = min(need, key=need.get)
        print(f"{label:31s} -> nothing fits: the smallest, {smallest}, needs {need[smallest]:.0f} MB")
        continue
    name = pick if isinstance(pick, str) else pick["method"]
    ppl = next(r["ppl"] for r in rows if r["method"] == name)
    n_fit = sum(mb <= budget / 1e6 for mb in need.values())
    why = "" if name == best_overall else f"; {best_overall} would need {need[best_overall]:.0f} MB"
    print(f"{label:31s} -> {name} ({need[name]:.0f} MB, perplexity {ppl:.2f}: the best of {n_fit} that fit{why})")

# %% [markdown]
# The recipe card condenses the table into one pick per kind of constraint.

# %%
card = stack.recipe_card(rows)
for c in card:
    print(f"{c['constraint']:42s} -> {c['recipe']:34s} ({c['why']})")

# %% [markdown] tags=["slide"]
# ## 8 · Does low-bit quantization hurt arithmetic more than perplexity suggests?
#
# A claim you will meet: GPTQ-style quantization keeps perplexity but breaks multi-step numerical reasoning (GSM8K).
# Test its small version here: for each variant, the relative perplexity increase against the change in exact-match
# accuracy on the arithmetic probe. Every model answers the *same* questions, so the fair test of a difference is
# paired: only the questions one model gets right and the other wrong count (an exact McNemar test,
# `cl.evaluation.paired_test`); each accuracy also gets its 95 % Wilson interval (`cl.evaluation.wilson_interval`). With n = 16
# (quick) an accuracy of 50 % means 28 %–72 %: most gaps you see are inside the noise, and the text says so.

# %%
base = table.loc["dense"]
fig, ax = plt.subplots()
for name in table.index.drop("dense"):
    r = table.loc[name]
    lo, hi = cl.evaluation.wilson_interval(sum(answers[name]), PROBE_N)  # the variant's 95 % interval, shifted by dense
    ax.errorbar(r["ppl"] / base["ppl"] - 1, r["probe_acc"] - base["probe_acc"],
                yerr=[[r["probe_acc"] - lo], [hi - r["probe_acc"]]], fmt="o", capsize=3)
    ax.annotate(name, (r["ppl"] / base["ppl"] - 1, r["probe_acc"] - base["probe_acc"]), fontsize=7,
                xytext=(4, 3), textcoords="offset points")
ax.axhline(0, color="k", lw=0.8)
ax.set(xscale="symlog", xlabel="relative perplexity increase vs dense", ylabel="probe accuracy change",
       title=f"arithmetic probe (n={PROBE_N}) vs perplexity")
plt.show()
lo, hi = cl.evaluation.wilson_interval(sum(answers["dense"]), PROBE_N)
print(f"dense: probe {base['probe_acc']:.0%} (95 % interval {lo:.0%}–{hi:.0%}, n={PROBE_N})")
for name in table.index.drop("dense"):
    r, test = table.loc[name], cl.evaluation.paired_test(answers["dense"], answers[name])
    lo, hi = cl.evaluation.wilson_interval(sum(answers[name]), PROBE_N)
    verdict = "a real difference" if test["p"] < 0.05 else "not distinguishable from dense at this n"
    print(f"{name:34s} perplexity {r['ppl'] / base['ppl'] - 1:+7.0%}  probe {r['probe_acc']:4.0%} ({lo:.0%}–{hi:.0%})"
          f"  right only dense {test['a_only']:2d}, only this {test['b_only']:2d}: p = {test['p']:.3f}, {verdict}")
if sz.gsm8k_n and env.device == "cuda":
    print("GSM8K (a >= 0.5B instruct model on a GPU):")
    for name in [n for n in ("dense", "GPTQ 4-bit", "GPTQ 3-bit") if n in RECIPES]:
        built = stack.build(name, RECIPES[name], model, calib, gptq_dir=GPTQ_DIR, progress=False)
        print(f"  {name}: {cl.evaluation.gsm8k_accuracy(built.model, tok, n=sz.gsm8k_n):.1%}")
else:
    print("GSM8K skipped: it needs a >= 0.5B instruct model on a GPU (set MODEL, full mode)")

# %%
cl.expected.show("08", MODEL, env, ("dense", "GPTQ", "student", "2:4"), metric=("ppl", "probe_acc"))  # every mode

# %% [markdown]
# What holds in every measured mode (the table; quick mode's 16 questions give intervals about 45 points wide, full
# mode's 100 about 15 to 20): 4-bit GPTQ costs under a fifth in perplexity and much of the dense model's probe
# accuracy (in full mode on the CPU 29 % → 13 %, a paired p < 0.001); KIVI-4 on top changes neither much; the rank-32
# fix lowers perplexity (in full mode it removes about 40 % of 4-bit's increase); 3 bits, 2:4 + 4-bit and the
# short-trained student lose the probe (almost) entirely. Whether the fix wins back the probe, quick mode cannot say:
# two CPUs running this same code measured it at 3 and at 6 of 16 questions (the dense model's 6), because a rounding
# flip early in GPTQ's column loop changes which weights land where; full mode's 100 questions put it within the
# noise of plain 4-bit's. A gap of a few points between two compressed variants is inside one run's noise: rerun with
# more questions before you build a slide on it. Perplexity ranks the recipes; it does not tell you how much
# arithmetic is left.

# %% [markdown]
# ## Reflection
# **Question 1.** Section 4 cut a fifth of the key/value projections' parameters and perplexity exploded, while
# section 6's rank-32 fix *lowered* the perplexity of a quantized model. Why does the same tool fail in one role and
# work in the other — and was the fix worth its bytes on the Pareto plot?

# %% [markdown] tags=["solution"]
# Replacing W needs the spectrum of W to fall fast, and trained weights have flat spectra (section 1): cutting 20 % of
# the parameters throws away a lot of energy. The quantization residual W − Q(W) is small, and its activation-weighted
# error concentrates in a few directions (the outlier channels), so a small rank captures a useful share of exactly
# the error that hurts the output. Low rank is good at residuals (GEAR's KV residual, LoRA's updates, EoRA), poor at
# weights themselves. Worth its bytes is a separate question: on a 135M model the fix's fp16 factors cost about as
# much as one more bit per weight, so compare it on the Pareto plot with simply quantizing to more bits.

# %% [markdown]
# **Question 2.** Read your recipe card. You deploy on (a) a phone with 1 GB for the model and its cache, (b) a GPU
# serving batch-1 chat, (c) a spreadsheet assistant that must add numbers correctly. Which recipe for each, and which
# number in the table would make you change your mind?

# %% [markdown] tags=["solution"]
# (a) The smallest weights + KV within the quality budget — typically the 4-bit model with a compressed KV cache, or
# the student at 4 bits if its perplexity is acceptable; the KV column decides at long contexts. (b) The highest bound
# tokens/s, i.e. the fewest bytes per step: 4-bit weights first (the student also removes layers, so it is faster per
# token even in PyTorch). (c) The variant with the best probe accuracy: on this model 4-bit GPTQ loses much of the
# probe (section 8's table; full mode's 100 questions: 29 % → 13 %), and the rank-32 fix, which wins back part of the
# perplexity, did not win back the probe in full mode (11 %; quick mode's 16 questions cannot tell); so the honest
# answer is the dense model or 8-bit weights. Change your mind if the error bars overlap (run more questions) or a
# GSM8K run on a bigger model disagrees.

# %% [markdown] tags=["instructor"]
# **Answers to expect.** Q1: the word "spectrum" or "energy" — if people say "the residual is smaller", ask why a
# smaller matrix should be lower rank. Q2: push for the number that decides (KV MB at the stated context for the
# phone; bound tok/s for the GPU; probe accuracy with its error bar for the assistant).

# %% [markdown]
# ## Summary
# * Rank r saves parameters only while r < d_out·d_in/(d_out+d_in) (half the rank of a square matrix), and time only
#   when two thin matmuls beat one.
# * LLM weights have flat spectra: plain SVD is a poor replacement; ASVD (scale input channels by activation size)
#   is much better, and low rank shines as a *correction* of quantization error.
# * Stack in an order that composes: student → distil → prune + quantize (jointly) → low-rank fix → KV cache.
# * Choose recipes by the constraint, from measured weight bytes, KV bytes, perplexity through the cache, probe
#   accuracy and the decode roofline. Under a memory budget: the best perplexity among the recipes whose weights plus
#   KV cache (per token × context × batch) fit.

# %% [markdown]
# ## Your numbers vs expected
# Every figure this run recorded, beside the reference measured in the same mode on a named machine
# (`compresslab/expected`, written by `tools/expected_figures.py` from real runs) and its noise band. ✓: within the
# band. ⚠: outside it — another model, mode or seed, or an edited cell, explains most; if not, look at your
# exercises' outputs. Modes nobody has measured yet (a GPU the project has not run on) say so: your numbers are then
# the reference.

# %%
cl.expected.compare("08", MODEL, env)

# %%
cl.checks.summary()
