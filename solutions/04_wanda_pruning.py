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
# # Lab 04 · Pruning: magnitude, Wanda, SparseGPT, N:M, and what the hardware does with it
#
# **The Art of Compressing LLMs** — hands-on lab 4 of 7.
#
# Labs 01–03 kept every weight and stored it with fewer bits. Pruning removes weights. The questions are the same —
# *which* weights matter, and how to compensate for the ones we take away — and so, you will see, is much of the
# machinery: SparseGPT is lab 02's GPTQ with "round to zero". The other question is new: a matrix full of zeros is
# not automatically smaller or faster. You will measure when it is.
#
# **Learning objectives.** By the end you can
# 1. explain why |weight| alone is a poor importance score in LLMs, and compute Wanda's |W|·‖X‖ score;
# 2. build per-row unstructured masks and N:M (2:4, 4:8) semi-structured masks;
# 3. implement SparseGPT on a layer: choose each block's mask by the OBS saliency from the weights as the earlier
#    blocks left them, prune and compensate with GPTQ's update;
# 4. prune a whole model layer by layer and compare methods over sparsity on perplexity and arithmetic;
# 5. say what actually gets faster: unstructured (only in sparse runtimes, never in PyTorch's dense kernels), 2:4
#    (sparse tensor cores, sm80+), structured (anything).
#
# **Time:** about 75 minutes (35 min of exercises). **Hardware:** CPU is fine in quick mode; the 2:4 speed section
# needs an Ampere-or-newer NVIDIA GPU and explains itself elsewhere.

# %% [markdown] tags=["instructor"]
# **Instructor notes — lab 04.** Slot: 75 min (10 min on outlier features and the Wanda score, 35 min exercises,
# 20 min whole-model sweep and structured pruning while it runs, 10 min hardware discussion).
#
# * Common mistakes the checkers catch: summing instead of averaging the squared activations, counting sequences
#   instead of tokens, using |x| instead of x²; one threshold for the whole layer instead of per row (a row with small
#   weights gets wiped out), forgetting the activation factor, pruning the *largest* scores, `ceil` instead of `int`
#   for the per-row count; N:M groups taken down a column instead of along a row; in SparseGPT, scoring by |w| or
#   w²·U_ii² instead of w²/U_ii², one mask per row (Wanda's habit) or for the whole matrix at once instead of per
#   block, scoring a block on the original weights instead of the updated ones, choosing all of a block's N:M groups
#   at its start, and forgetting the lazy update of the later columns (or feeding it the weight changes instead of
#   the errors divided by U_ii).
# * Discussion prompts: "why is the Wanda comparison made per output row?" (each output is a weighted sum: within a row
#   the scores are comparable, across rows they are not); "2:4 is 50 % sparse but Wanda 2:4 is 3× worse than Wanda 50 %
#   unstructured here — why accept it?" (section 7); "structured pruning hurts most per removed weight, yet it is the
#   only one that is faster in PyTorch on a CPU — when would you pick it?" (a CPU sparse engine such as DeepSparse
#   would also speed up unstructured zeros).
# * If time is short, run section 5 in QUICK mode and read full mode's sweep from the table after it.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # offline default; on a GPU with hub access try "qwen2.5-0.5b"
DTYPE = "float32"
QUICK = None  # None: automatic (quick on a CPU, full on a CUDA GPU); True/False forces it (the tests set True)
SEED = 0
CALIB_SAMPLES = None  # None: from the device tier (32 on CPU, 128 on GPU, 8 in quick mode)
RECOVER_STEPS = 100  # section 8 (full mode): masked fine-tuning steps of 4 x 256 tokens after SparseGPT

# %% [markdown]
# ## 0 · Setup

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch

import compresslab as cl
from compresslab import pruning

env = cl.setup(quick=QUICK, seed=SEED, lab="04")  # prints the device, mode and this lab's runtime
print(env)
sz = env.sizes
n_calib = CALIB_SAMPLES or sz.calib_samples
print("expected runtime: " + ("~3 min" if env.quick else "full mode prunes the model 23 times (two followed by 100 "
      "recovery steps, ~8 min each): 40 min on a 2-core CPU with 2 threads, a Wanda pass and its evaluation ~1.6 "
      "min, SparseGPT ~2 min (use a GPU)"))

model, tok = cl.load_model(MODEL, dtype=DTYPE, device=env.device)
calib = cl.data.calibration_batches(tok, n_samples=n_calib, seq_len=sz.calib_len, seed=SEED)  # (n, len) token ids
print(f"calibration: {tuple(calib.shape)} tokens of WikiText-2 valid")

# %% [markdown] tags=["slide"]
# ## 1 · Which weights matter? Weights × activations
#
# Magnitude pruning removes the smallest |W_ij|. That ignores what the weight multiplies: output
# $y_i = \sum_j W_{ij} x_j$, so removing $W_{ij}$ changes $y_i$ by $W_{ij} x_j$. LLMs have a handful of **outlier
# input features** whose activations are tens of times larger than the rest (Dettmers et al., LLM.int8, lab 01): a
# small weight on such a channel matters more than a large weight on a quiet one.
#
# Wanda (Sun et al., 2023) scores each weight by $|W_{ij}| \cdot \lVert X_j \rVert_2$, the norm of input channel $j$
# over all calibration tokens, and needs nothing else: no gradients, no weight update, one forward pass.
#
# ### Exercise 1 — accumulate the activation norms (4 min)
# Calibration data arrives in batches. Complete `accumulate_act_norm(sq, n, x)`: given the running mean `sq` (in,) of
# $x_j^2$ over the `n` tokens seen so far and a new batch `x` of shape `(..., in_features)`, return the updated
# `(sq, n)`. (Its square root ranks channels exactly as $\lVert X_j \rVert_2$ does: they differ by $\sqrt{n}$.)

# %%
def accumulate_act_norm(sq: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean over tokens of x_j^2. sq (in,), n tokens so far, x (..., in) -> (sq_new, n_new)."""
    ### BEGIN SOLUTION
    x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
    b = x.shape[0]
    sq = sq * (n / (n + b)) + (x**2).sum(0) / (n + b)
    return sq, n + b
    ### END SOLUTION


# %%
accumulate_act_norm = cl.checks.check_accumulate_act_norm(accumulate_act_norm)

# %% [markdown]
# Collect the real activation norms at the input of one layer's `q_proj` (the output of the attention RMSNorm) with a
# forward hook, and look at them sorted.

# %%
LAYER = 6
lin = model.model.layers[LAYER].self_attn.q_proj
sq, n_tok, X_rows = torch.zeros(lin.in_features), 0, []


def grab(module, inputs, output):
    global sq, n_tok
    sq, n_tok = accumulate_act_norm(sq, n_tok, inputs[0].detach())
    X_rows.append(inputs[0].detach().reshape(-1, lin.in_features)[::4])  # a token sample, for section 2


handle = lin.register_forward_hook(grab)
with torch.no_grad():
    for i in range(0, calib.shape[0], 4):
        model(calib[i : i + 4].to(env.device), use_cache=False)
handle.remove()
act_norm = sq.sqrt()  # (in,)
X = torch.cat(X_rows).float()  # (tokens, in)
print(f"{n_tok} tokens; channel norms: median {act_norm.median():.2f}, max {act_norm.max():.2f} "
      f"({act_norm.max() / act_norm.median():.0f}x the median); top channels {act_norm.topk(4).indices.tolist()}")

# %% tags=["slide"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(act_norm.sort(descending=True).values.numpy())
axes[0].set(yscale="log", xlabel="input channel (sorted)", ylabel="RMS activation",
            title=f"layer {LAYER} q_proj inputs: a few outlier channels")
W = lin.weight.detach().float()  # (out, in)
axes[1].scatter(W.abs().mean(0).numpy(), act_norm.numpy(), s=4)
axes[1].set(xscale="log", yscale="log", xlabel="mean |W| of the column", ylabel="RMS activation",
            title="weight size and activation size are unrelated")
plt.tight_layout()
plt.show()

# %% [markdown] tags=["slide"]
# ## 2 · The Wanda mask: compare within each output row
#
# Which weights compete with which? Wanda compares the weights **of one output row**: $y_i$ is a sum over the row, so
# within a row the scores are on a common scale. One threshold for the whole layer (the magnitude baseline's
# convention) lets rows with small weights be wiped out entirely.
#
# ### Exercise 2 — the per-row Wanda mask (6 min)
# Complete `wanda_mask(W, act_norm, sparsity)`: score $|W_{ij}|\cdot$`act_norm[j]`, and in **every row** mark the
# `int(sparsity * in_features)` lowest scores as pruned. Return a `bool` tensor of W's shape, **True where a weight is
# kept** (so pruning is `W * mask`).

# %%
def wanda_mask(W: torch.Tensor, act_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """W (out, in), act_norm (in,) -> bool keep-mask (out, in): per row, prune the lowest int(sparsity * in) scores."""
    ### BEGIN SOLUTION
    score = W.abs() * act_norm[None, :]  # (out, in)
    k = int(sparsity * W.shape[1])
    keep = torch.ones_like(W, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1)[:, :k], False)  # the k lowest of each row
    return keep
    ### END SOLUTION


# %%
wanda_mask = cl.checks.check_wanda_mask(wanda_mask)

# %% [markdown]
# Now the payoff on the real layer: prune `q_proj` to 50 % with three masks and measure what matters, the error of the
# layer's **outputs** on real inputs, $\lVert XW^\top - X\hat W^\top\rVert^2$ (lab 02's `reconstruction_error`).

# %%
def output_error(W_hat):
    return (cl.gptq.reconstruction_error(W, W_hat, X) / cl.gptq.reconstruction_error(W, torch.zeros_like(W), X)).item()


masks = {"magnitude, one threshold per layer": pruning.magnitude_mask(W, 0.5),
         "magnitude, per row": pruning.row_mask(W.abs(), 0.5),
         "Wanda (|W|·‖X‖, per row)": wanda_mask(W, act_norm, 0.5)}
for name, keep in masks.items():
    print(f"{name:36s} relative output error {output_error(W * keep):.4f}")

# %% [markdown] tags=["slide"]
# ## 3 · N:M semi-structured sparsity
#
# Unstructured zeros can sit anywhere, which no dense matrix unit can exploit. **N:M** sparsity keeps N weights in
# every group of M consecutive inputs of a row. NVIDIA's sparse tensor cores (Ampere and newer) execute **2:4**
# natively: the matrix is stored as its 2 kept values per group plus 2-bit indices, and the math skips the zeros.
# 4:8 is the same sparsity with more freedom (better accuracy) but no hardware support.
#
# ### Exercise 3 — the N:M mask (5 min)
# Complete `nm_mask(score, n, m)`: inside each run of `m` consecutive columns of every row, keep the `n` largest
# scores. Return a bool keep-mask of score's shape. (`in_features` is divisible by `m`.)

# %%
def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score (out, in) -> bool keep-mask: the n largest of every m consecutive inputs of each row."""
    ### BEGIN SOLUTION
    out_f, in_f = score.shape
    groups = score.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)
    ### END SOLUTION


# %%
nm_mask = cl.checks.check_nm_mask(nm_mask)

# %% [markdown]
# A detail that matters on this model: the package implements the same mask as "prune the m − n smallest", as the
# Wanda reference does. The two differ only on ties, and ties are everywhere here (the weights came from Q4_1: at most
# 16 distinct values per 32). Magnitude 2:4 measures ~1830 one way and ~2500 the other: tie-breaking alone.

# %%
score = W.abs() * act_norm[None, :]
for n, m in ((2, 4), (4, 8)):
    keep = nm_mask(score, n, m)
    print(f"Wanda {n}:{m}: sparsity {1 - keep.float().mean():.2f}, every group holds {n}: "
          f"{pruning.is_nm_sparse(W * keep, n, m)}, relative output error {output_error(W * keep):.4f}")
fig, ax = plt.subplots(figsize=(8, 1.8))
ax.imshow(nm_mask(score, 2, 4)[:8, :32].numpy(), cmap="Greys", aspect="auto")
ax.set(title="2:4 keep-mask, first 8 rows × 32 inputs (black = kept)", xticks=range(0, 32, 4), yticks=[])
plt.show()

# %% [markdown] tags=["slide"]
# ## 4 · SparseGPT: pruning is GPTQ with "round to zero"
#
# Wanda removes weights and leaves the rest alone. But lab 02 showed that when one weight changes, the weights not
# yet processed can **compensate** through the inverse Hessian $H^{-1}$, $H = \tfrac2N XX^\top$. SparseGPT (Frantar
# & Alistarh, 2023) runs GPTQ's loop: columns left to right, the upper Cholesky factor $U$ of $H^{-1}$, lazy block
# updates, and a "quantizer" that sends a pruned weight to 0 and leaves a kept one as it is.
#
# What is new is **which** weights to prune, and **when** to decide. Pruning $w_{ri}$ while the columns after $i$
# are still free to compensate costs $w_{ri}^2 / U_{ii}^2$ (the OBS saliency; Wanda's score squared when $H$ is
# diagonal). That cost moves while the loop runs, because every compensation changes the weights not yet processed.
# So SparseGPT decides late, but not one column at a time (a single column cannot spread the pruning over the
# inputs): at the **start of each block** of 128 columns it prunes the `sparsity` fraction of lowest saliencies of
# the **whole block**, all rows together, scored on the weights as the earlier blocks left them — the paper's
# *adaptive mask selection*. (A saliency is a share of the layer's squared output error, so scores of different rows
# are comparable, and the reference implementation compares them across the block.) For N:M the choice among each
# run of M columns is made when the loop reaches it.
#
# ### Exercise 4 — SparseGPT, block by block (20 min)
# Complete `sparsegpt_layer(W, U, sparsity, n, m, block_size)`: `W` (out, in), `U` (in, in) the upper Cholesky factor
# of the damped $H^{-1}$ (what `cl.gptq.inverse_cholesky` returns). Unstructured when `n` is None; N:M (keep `n` of
# every `m` consecutive columns) when `sparsity` is None. Return the pruned, compensated weights as a new tensor.
# For each block of `block_size` columns (the last one may be narrower):
# 1. work on a copy `W1` (out, B) of the block and keep each column's error in `Err1` (out, B);
# 2. unstructured: choose the block's mask now — prune the `int(sparsity * W1.numel())` lowest $w^2 / U_{ii}^2$ of
#    the whole block;
# 3. column by column: for N:M, on reaching each run of `m` columns choose its mask from their current weights (your
#    `nm_mask`); then prune column $i$ to $q$ and compensate. The column update is lab 02's:
#    `cl.gptq.propagate_error(W1, U1, i, q)` updates the block's columns $i$.. in place and returns the error
#    $(w - q) / U_{ii}$;
# 4. after the block, the later columns `W[:, i2:]` take all of the block's errors at once, through the block's rows
#    of $U$ (the lazy update).

# %%
def sparsegpt_layer(W: torch.Tensor, U: torch.Tensor, sparsity: float | None, n: int | None, m: int | None,
                    block_size: int) -> torch.Tensor:
    """W (out, in), U (in, in) upper Cholesky factor of H^-1 -> pruned and compensated W (out, in), a new tensor."""
    ### BEGIN SOLUTION
    W = W.clone()
    in_f = W.shape[1]
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # (out, B), (B, B)
        d2 = torch.diag(U1) ** 2  # (B,)
        Err1 = torch.zeros_like(W1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if n is None:  # one choice for the whole block, scored on its weights as the earlier blocks left them
            score = (W1**2 / d2).flatten()  # (out * B,) OBS saliency
            keep1.view(-1)[score.argsort(stable=True)[: int(sparsity * score.numel())]] = False
        for i in range(i2 - i1):
            if n is not None and i % m == 0:  # N:M: the next m columns, as they are now
                keep1[:, i : i + m] = nm_mask(W1[:, i : i + m] ** 2 / d2[i : i + m], n, m)
            q = W1[:, i] * keep1[:, i]  # a pruned weight "rounds" to 0
            Err1[:, i] = cl.gptq.propagate_error(W1, U1, i, q)  # OBS update of the block's columns i..
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update: (out, B) @ (B, in - i2)
    return W
    ### END SOLUTION


# %%
sparsegpt_layer = cl.checks.check_sparsegpt_layer(sparsegpt_layer)

# %% [markdown]
# Your loop on the real layer, against the package's `sparsegpt_prune` (which damps and inverts $H$, then runs the
# loop of `pruning.sparsegpt_blocks`). Both get the Hessian of the first half of the calibration windows; the other
# half is kept for the comparison with Wanda below. The output error is measured on the fitting tokens, the objective
# both minimise. A max |difference| of rounding size means the same masks; a larger one means some weight was kept
# by one and pruned by the other. On this model suspect ties first: the weights came from Q4_1, so in the first block
# equal weights of one column have equal scores, and the package breaks such ties as a stable sort does.

# %%
half = len(X_rows) // 2
X_fit, X_held = torch.cat(X_rows[:half]).float(), torch.cat(X_rows[half:]).float()  # (tokens, in): other windows
H = cl.gptq.Hessian(lin.in_features)
H.add_batch(X_fit)
U = cl.gptq.inverse_cholesky(H.H, 0.01)[0].float()  # (in, in) upper, damped as sparsegpt_prune damps it


def error_on(W_hat, X_eval):
    zero = cl.gptq.reconstruction_error(W, torch.zeros_like(W), X_eval)
    return (cl.gptq.reconstruction_error(W, W_hat, X_eval) / zero).item()


for label, args in (("50 %", (0.5, None, None)), ("2:4", (None, 2, 4))):  # (sparsity, n, m)
    t0 = time.perf_counter()
    mine = sparsegpt_layer(W, U, *args, 128)
    secs = time.perf_counter() - t0
    ref = pruning.sparsegpt_prune(W, H.H, *args)
    print(f"{label:5s} yours: sparsity {pruning.sparsity_of(mine):.2f}, relative output error "
          f"{error_on(mine, X_fit):.4f} ({1000 * secs:.0f} ms) | package: {error_on(ref, X_fit):.4f} | "
          f"max |difference| {(mine - ref).abs().max():.1e}")

# %% [markdown]
# A fair comparison with Wanda on our layer gives both methods the **same** tokens to fit on — the first half of the
# calibration windows: Wanda's norms and SparseGPT's Hessian — and scores both on the **other** half, windows neither
# has seen. SparseGPT *solves* for the weights on its tokens, so its error on those tokens flatters it (most with few
# tokens for 576 inputs, as in quick mode); the held-out column is the one to compare.

# %%
norm_fit = X_fit.norm(dim=0)  # (in,) Wanda's norms from the same tokens as SparseGPT's Hessian
print(f"fitted on {X_fit.shape[0]} tokens, scored on {X_held.shape[0]} tokens of other windows")
for label, kw in (("50 %", dict(sparsity=0.5)), ("2:4", dict(n=2, m=4))):
    sgpt = pruning.sparsegpt_prune(W, H.H, **kw)
    wanda = W * pruning.wanda_mask(W, norm_fit, **kw)
    print(f"{label:5s} relative output error, fit tokens: Wanda {error_on(wanda, X_fit):.4f} | SparseGPT "
          f"{error_on(sgpt, X_fit):.4f};  held-out: Wanda {error_on(wanda, X_held):.4f} | SparseGPT "
          f"{error_on(sgpt, X_held):.4f}  (sparsity {pruning.sparsity_of(sgpt):.2f})")

# %% [markdown] tags=["slide"]
# ## 5 · The whole model, layer by layer
#
# `cl.prune(model, config, calibration=calib)` prunes every Linear inside the decoder layers, in place (embeddings and
# `lm_head` stay dense); the config says how: `cl.MagnitudeConfig`, `cl.WandaConfig` or `cl.SparseGPTConfig`, each
# with `sparsity=0.5` or `pattern="2:4"` (N:M as engines name it). Wanda and
# SparseGPT run layer by layer: each layer's statistics come from the outputs of the **already-pruned** layers before
# it, as lab 02's GPTQ. We sweep sparsity for magnitude and Wanda, add 2:4 and 4:8, and SparseGPT at 50 % and 2:4.

# %% [markdown]
# How to read the numbers: perplexity on the fixed test windows is deterministic, and magnitude pruning uses no data,
# so its numbers carry no noise. Wanda and SparseGPT depend on a random draw of calibration windows; their spread
# over draws is not measured here (for GPTQ at 3 bits, lab 02 measured about 4 %), so treat gaps of a few percent
# between calibrated methods as unresolved. Each probe accuracy is printed with its 95 % interval (about ±15 points
# at 30 % with quick mode's 32 questions, ±9 with 100): overlapping intervals, no evidence of a difference.

# %%
def evaluate(m, method: str, sparsity: float, seconds: float | None = None, bits: int | None = None,
             nm: tuple[int, int] | None = None, **extra) -> dict:
    """Perplexity + arithmetic probe, recorded in the shared results table. sparsity: the share of zeros among the
    remaining weights; bits/nm: how the row is deployed (None: as stored, zeros included)."""
    ppl = cl.evaluation.perplexity(m, tok, sz.ppl_windows, sz.seq_len)
    acc = cl.evaluation.arithmetic_probe(m, tok, sz.probe_n, seed=SEED)
    stored = cl.results.describe(m, bits, 64, nm)  # bits, group, deployable weight MB of *this* model
    row = cl.results.record(lab="04", method=method, model=MODEL, **stored, ppl=round(ppl, 3),
                            probe_acc=acc, quick=env.quick, sparsity=sparsity,
                            prune_seconds=seconds and round(seconds, 1), **extra)
    print(f"{method:24s} sparsity {sparsity:4.0%}  ppl {ppl:9.2f}  "
          f"probe {cl.evaluation.accuracy_with_interval(acc, sz.probe_n):13s}  {stored['weight_mb']:6.1f} MB"
          + (f"  ({seconds:.0f} s)" if seconds else ""))
    return row


CONFIGS = {"magnitude": cl.MagnitudeConfig, "wanda": cl.WandaConfig, "sparsegpt": cl.SparseGPTConfig}


def prune(config):
    """Prune a copy of the model (cl.prune works in place); returns (model, sparsity reached, seconds)."""
    pm = copy.deepcopy(model)
    t0 = time.perf_counter()
    cl.prune(pm, config, calibration=calib)
    secs = time.perf_counter() - t0
    reached = pruning.decoder_sparsity(pm)  # {Linear: share of zeros}: more where the model already held zeros
    return pm, sum(reached.values()) / len(reached), secs


SWEEP = (0.5,) if env.quick else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
PATTERNS = ("2:4",) if env.quick else ("2:4", "4:8")
rows = [evaluate(model, "dense", 0.0)]
for method in ("magnitude", "wanda"):
    for s in SWEEP:
        pm, reached, secs = prune(CONFIGS[method](sparsity=s))
        rows.append(evaluate(pm, f"{method} {s:.0%}", reached, secs))
    for pattern in PATTERNS:
        pm, reached, secs = prune(CONFIGS[method](pattern=pattern))
        rows.append(evaluate(pm, f"{method} {pattern}", reached, secs))
        if (method, pattern) == ("wanda", "2:4"):
            wanda24 = pm  # section 7 runs it on sparse tensor cores, when there are some
for config in ([cl.SparseGPTConfig(pattern="2:4")] if env.quick
               else [cl.SparseGPTConfig(sparsity=0.5), cl.SparseGPTConfig(pattern="2:4")]):
    pm, reached, secs = prune(config)
    rows.append(evaluate(pm, f"sparsegpt {config.pattern or '50%'}", reached, secs))
del pm

# %% tags=["slide"]
fig, ax = plt.subplots(figsize=(8, 3.8))
for method, style in (("magnitude", "o-"), ("wanda", "s-")):
    pts = [r for r in rows if r["method"].startswith(method) and "%" in r["method"]]
    ax.plot([r["sparsity"] for r in pts], [r["ppl"] for r in pts], style, label=f"{method} (unstructured)")
    for r in rows:
        if r["method"].startswith(method) and ":" in r["method"]:
            ax.scatter([r["sparsity"]], [r["ppl"]], marker="^" if "2:4" in r["method"] else "v", s=60,
                       label=r["method"])
for r in rows:
    if r["method"].startswith("sparsegpt"):
        ax.scatter([r["sparsity"]], [r["ppl"]], marker="*", s=120, label=r["method"])
ax.axhline(rows[0]["ppl"], color="k", ls="--", lw=1, label="dense")
ax.set(xlabel="sparsity of the decoder Linears", ylabel="perplexity (log)", yscale="log",
       title="Which weights matter: magnitude vs Wanda vs SparseGPT")
ax.legend(fontsize=7, ncol=2)
plt.show()
cl.results.table(lab="04", model=MODEL, quick=env.quick)

# %%
cl.expected.show("04", MODEL, env, ("dense", "magnitude", "wanda", "sparsegpt"),
                 exclude=("recovery", "4-bit"))  # yours beside every measured mode (section 8's rows come later)

# %% [markdown]
# The table puts your run beside the reference of every measured mode (quick: 4 × 256 test windows and 8
# calibration windows, 50 % and 2:4 only; full on the CPU: 16 × 512 and 32, the whole sweep and 4:8). What holds in
# both: at 50 % and at 2:4, Wanda's perplexity is 5 to 7 times lower than magnitude's; SparseGPT's weight update
# lowers Wanda's 2:4 perplexity by a quarter (quick) to a half (full); and every pruned model stays far from dense,
# which is why pruned models are retrained (section 8). The calibrated rows move by a few percent from one CPU to
# another (the table says which; magnitude uses no data and does not move).
#
# For comparison, an independent implementation in full mode (16 × 512 test windows, 32 calibration windows): dense
# 36.63; at 50 % magnitude 487.6, Wanda 80.2; at 2:4 magnitude 1828, Wanda 233.8. For LLaMA-2-7B the Wanda paper
# reports 14.89 (magnitude) and 6.42 (Wanda) at 50 % against 5.12 dense: on a 135M model every weight carries more,
# and pruning hurts far more than on a 7B one.
#
# Full mode sweeps the sparsity from 10 % to 70 % (the full-cpu column; quick mode runs 50 % only). Wanda wins clearly
# from 30 % on (by about a quarter at 30 %, twice at 40 %, some fifty times at 70 %), and 4:8 (a wider window to
# choose from) costs far less than 2:4 for both. At 10 % and 20 % the gaps are 2–3 %, about what another calibration
# draw moved lab 02's GPTQ (unmeasured for Wanda): they do not say which method is better there. At 10 % magnitude (no
# calibration, so no such spread) even beats *dense*: removing the smallest tenth of every Linear of this
# Q4_1-derived model lowers perplexity slightly, while Wanda's activation weighting spares some of those tiny weights
# and prunes larger ones instead. An effect that small says little about which weights matter; from 30 % on, it is
# the activations that decide.

# %% [markdown] tags=["slide"]
# ## 6 · Structured pruning: a genuinely smaller model
#
# Unstructured and N:M zeros leave every matrix its shape. **Structured** pruning removes whole units — here MLP
# neurons: neuron $j$ is row $j$ of `gate_proj` and `up_proj` and column $j$ of `down_proj`. Its score is Wanda's
# summed over the neuron, $\lVert a_j\rVert_2 \cdot \lVert W^{down}_{:,j}\rVert_2$ with $a_j$ its activation. The
# result is a smaller dense model: fewer parameters, less memory, and faster on *any* hardware. The price: a neuron is
# a coarse unit, so quality drops faster per removed weight. (Lab 05 distils such a student back.)

# %%
RATIOS = (0.25,) if env.quick else (0.1, 0.25, 0.4, 0.5)
dense_ms = 1000 * cl.evaluation.prefill_seconds(model, tok, sz.seq_len, 1)
struct_rows = []
for r in RATIOS:
    t0 = time.perf_counter()
    sm, _ = pruning.prune_mlp_neurons(model, calib, ratio=r)
    secs = time.perf_counter() - t0
    ms = 1000 * cl.evaluation.prefill_seconds(sm, tok, sz.seq_len, 1)
    share = 1 - pruning.count_parameters(sm) / pruning.count_parameters(model)
    # a smaller dense model: no zeros (sparsity 0); the parameters it lost go in their own column
    struct_rows.append(evaluate(sm, f"structured MLP {r:.0%}", 0.0, secs, params_removed=round(share, 4),
                                prefill_ms=round(ms, 1), intermediate_size=sm.config.intermediate_size))
    print(f"   {pruning.count_parameters(sm) / 1e6:.1f}M parameters (dense {pruning.count_parameters(model) / 1e6:.1f}M), "
          f"prefill 1×{sz.seq_len} {ms:.0f} ms vs dense {dense_ms:.0f} ms ({dense_ms / ms:.2f}x)")
    del sm

# %% [markdown] tags=["slide"]
# ## 7 · What the hardware does with zeros
#
# | pattern | stored as | faster on | memory |
# |---|---|---|---|
# | unstructured 50 % | dense with zeros here (sparse formats: see below) | sparse runtimes only, not PyTorch | same |
# | 2:4 | kept values + 2-bit indices | sparse tensor cores, NVIDIA sm80+ (A100, L4, H100) | 9/16 of fp16 |
# | structured | a smaller dense matrix | everything | proportionally less |
#
# Unstructured zeros pay off only in runtimes built to skip them: CPU sparse engines (Neural Magic's DeepSparse) and
# GPU kernels that store the weights compressed and beat cuBLAS on decode's skinny matmuls — Flash-LLM (Xia et al.
# 2023, arXiv:2309.10285; 1.4–2.1× at 70–90 % sparsity), SpInfer (Fan et al., EuroSys 2025; bitmap-indexed, ahead
# from lower sparsity). PyTorch's dense kernels, which this lab runs, gain nothing from them.
#
# PyTorch exposes 2:4 through `torch.sparse.to_sparse_semi_structured` (cuSPARSELt / CUTLASS, fp16/bf16/int8).
# On a GPU that has them, this cell converts the Wanda 2:4 model and measures one matmul and a whole prefill;
# elsewhere it says why not, and does the memory accounting, which is arithmetic.

# %%
decoder = {n: mod for n, mod in wanda24.named_modules() if n.startswith("model.layers.") and isinstance(mod, torch.nn.Linear)}
dense_fp16 = sum(mod.weight.numel() * 2 for mod in decoder.values())
sparse_fp16 = sum(pruning.semi_structured_bytes(mod.weight.half()) for mod in decoder.values())
print(f"decoder Linears in fp16: dense {dense_fp16 / 1e6:.1f} MB, 2:4 compressed {sparse_fp16 / 1e6:.1f} MB "
      f"({sparse_fp16 / dense_fp16:.4f} = 9/16)")
ok, why = pruning.semi_structured_supported(env.device, torch.float16)
print(why)
if ok:
    W24 = wanda24.model.layers[0].mlp.up_proj.weight.detach().half()  # (1536, 576), 2:4
    x = torch.randn(4096, W24.shape[1], dtype=torch.float16, device=W24.device)
    t_dense = cl.evaluation.matmul_seconds(W24, x)
    t_sparse = cl.evaluation.matmul_seconds(torch.sparse.to_sparse_semi_structured(W24), x)
    print(f"up_proj matmul, 4096 tokens: dense {t_dense * 1e6:.0f} us, 2:4 {t_sparse * 1e6:.0f} us "
          f"({t_dense / t_sparse:.2f}x)")
    m16 = wanda24.half()
    ms_dense = 1000 * cl.evaluation.prefill_seconds(m16, tok, sz.seq_len, 8)
    try:
        print(f"converted {pruning.to_semi_structured(m16)} Linears to the compressed 2:4 format")
        ms_sparse = 1000 * cl.evaluation.prefill_seconds(m16, tok, sz.seq_len, 8)
        print(f"prefill 8×{sz.seq_len} in fp16: dense {ms_dense:.1f} ms, 2:4 {ms_sparse:.1f} ms ({ms_dense / ms_sparse:.2f}x;"
              " the 135M model's matrices are small, so expect less than the matmul gain)")
    except (RuntimeError, NotImplementedError) as err:  # kernel coverage differs between torch/CUDA versions
        print(f"!!! end-to-end 2:4 prefill failed on this torch/GPU combination: {err}")

# %% [markdown] tags=["slide"]
# ## 8 · Going further
#
# * **Wanda++** (Yang et al., 2025, arXiv:2503.04992) works one decoder block at a time and changes both the score and
#   the weights. Its *regional gradient score* (RGS) adds to Wanda's |W|·‖X‖ the gradient magnitude of the block
#   output's norm with respect to each weight (one backward pass through that block, not the whole model). *Regional
#   optimisation* (RO) then takes a few optimiser steps to pull the pruned block's output toward the dense block's,
#   and the block is re-scored and re-pruned, alternating a few rounds. So its final mask is neither Wanda's nor fixed
#   during the optimisation; the paper reports up to 32 % lower perplexity than Wanda.
# * **Recovery**: after pruning, fine-tune the kept weights for a few hundred steps with the mask held fixed, or
#   distil from the dense model (lab 05): prune-then-distil is how NVIDIA's Minitron models are made. Full mode runs
#   `pruning.finetune_masked` for RECOVER_STEPS steps of 4 × 256 tokens of WikiText-2 valid after SparseGPT at 50 %
#   and at 2:4 (the zeros are put back after every step, so the 2:4 pattern survives).
# * **Pruning + quantization**: they are one reconstruction problem, so one pass can do both. `sparsegpt_prune(...,
#   n=2, m=4, bits=4)` prunes 2:4 and quantizes the survivors to 4-bit with lab 02's grid in the same loop: 2:4 fp16
#   stores 9 bits per weight, 2:4 with 4-bit values about 3 — the format of Sparse-Marlin (Frantar et al. 2024,
#   arXiv:2408.11743), vLLM's GPU kernel for 2:4-sparse 4-bit GPTQ weights. Full mode measures it here.

# %%
if env.quick:
    print("quick mode: skipped (run with QUICK = False)")
else:
    pm, reached, secs = prune(cl.SparseGPTConfig(pattern="2:4", bits=4, group_size=64))
    rows.append(evaluate(pm, "sparsegpt 2:4 + 4-bit", reached, secs, bits=4, nm=(2, 4)))  # as Sparse-Marlin stores it
    train = cl.data.training_windows(tok, n_windows=256, seq_len=256, seed=SEED + 1)  # (256, 256) <unk>-free valid
    for config, label in ((cl.SparseGPTConfig(sparsity=0.5), "50%"), (cl.SparseGPTConfig(pattern="2:4"), "2:4")):
        pm, reached, secs = prune(config)
        t0 = time.perf_counter()
        pruning.finetune_masked(pm, train, steps=RECOVER_STEPS, lr=1e-4, batch_size=4)
        masks = pruning.mask_of(pm)  # the zeros after training: the mask held
        after = 1 - sum(keep.float().mean().item() for keep in masks.values()) / len(masks)
        rows.append(evaluate(pm, f"sparsegpt {label} + {RECOVER_STEPS} recovery steps", after,
                             secs + time.perf_counter() - t0))
    del pm

# %%
cl.expected.show("04", MODEL, env, ("recovery", "4-bit", "sparsegpt 50%", "sparsegpt 2:4"))  # full mode's rows

# %% [markdown]
# Full mode on the CPU (the full-cpu column; quick mode skips this section, ~8 min per recovery run on 2 cores): 100
# masked fine-tuning steps on `<unk>`-free WikiText-2 valid take SparseGPT to about two thirds of its perplexity at
# 50 % and about half at 2:4, sparsity unchanged (0.50), closing about two thirds and half of the log-perplexity gap
# to dense: the lowest perplexities in this lab, still well above dense (a quarter higher at 50 %, nearly twice at 2:4).
# Sparse-Marlin's format (2:4 with 4-bit values, about 3 bits per weight stored) costs SparseGPT 2:4 about a third
# more perplexity than its fp32 values.
# The fine-tuning text is WikiText-2 valid, the same domain as the evaluation; distilling from the dense model
# (lab 05) is the recipe that does not depend on that.

# %% [markdown]
# ## Reflection
# **Question 1.** At 50 % sparsity, Wanda's per-row mask beats magnitude's per-layer mask by a factor of several in
# perplexity on this model. Name the two differences between them, and say which one you expect to matter more for a
# layer whose input has a few outlier channels.

# %% [markdown] tags=["solution"]
# (1) The score: Wanda multiplies |W| by the input-channel norm, so weights on outlier channels survive even when small;
# (2) the comparison group: per output row instead of per layer, so no row is emptied. For a layer fed by outlier
# channels the score matters more: magnitude removes small weights on the loud channels, whose products $W_{ij}x_j$
# are among the largest in the layer. Section 2 separates the two effects on a real layer (magnitude per row vs
# Wanda per row); the Wanda paper's ablation finds the same, and that the per-row group matters for LLMs specifically.

# %% [markdown]
# **Question 2.** Your deployment target is an H100 serving batch-1 chat. Which pattern would you ship — 50 %
# unstructured, 2:4, or 25 % structured MLP pruning — and what would you measure before deciding?

# %% [markdown] tags=["solution"]
# Unstructured 50 % gives the best quality, but mainstream GPU stacks run it as a dense matrix with zeros: no speed or
# memory. Sparse kernels (Flash-LLM, SpInfer) do gain on decode, most at high sparsity — ship it for speed only if
# your engine has one. 2:4 uses sparse tensor cores, but batch-1 decoding is memory-bound: the gain comes from
# reading 9/16 of the weight bytes, not from the math, and cuSPARSELt's advantage is largest for big prefill matmuls;
# at this quality cost (2:4 ≈ 3× unstructured's perplexity here) recovery training is a must. Structured pruning
# gives a smaller dense model that is faster everywhere and composes with int4 quantization, at a larger quality cost
# that distillation (lab 05) recovers. Measure end-to-end tokens/s at the real batch size and sequence lengths,
# quality after recovery, and whether the serving engine has a 2:4 kernel for the chosen dtype at all.

# %% [markdown] tags=["instructor"]
# **Answers to expect and follow-ups.** Q1: if people say "the activations", ask them to read section 2's middle line
# (magnitude per row). Q2: push for "measure end to end at the deployment batch size"; the 2:4 matmul speedup does not
# carry over one-to-one to a whole model.

# %% [markdown]
# ## Summary
# * Importance = weight × activation: Wanda's |W|·‖X‖, compared within each output row, beats |W| by far.
# * N:M keeps N of every M inputs; 2:4 is what sparse tensor cores run, at a clear quality cost on a small model.
# * SparseGPT = GPTQ with "round to zero": the same Hessian, Cholesky factor and OBS update compensate the pruning;
#   its mask is chosen late, per block, by w²/U_ii² on the weights the compensation has already moved.
# * Zeros pay only where something skips them: unstructured in sparse runtimes (DeepSparse on CPU, Flash-LLM or
#   SpInfer-style GPU kernels), 2:4 on sm80+ sparse tensor cores, structured everywhere.

# %% [markdown]
# ## Your numbers vs expected
# Every figure this run recorded, beside the reference measured in the same mode on a named machine
# (`compresslab/expected`, written by `tools/expected_figures.py` from real runs) and its noise band. ✓: within the
# band. ⚠: outside it — another model, mode or seed, or an edited cell, explains most; if not, look at your
# exercises' outputs. Modes nobody has measured yet (a GPU the project has not run on) say so: your numbers are then
# the reference.

# %%
cl.expected.compare("04", MODEL, env)

# %%
cl.checks.summary()
