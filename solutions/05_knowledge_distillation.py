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
# # Lab 05 · Knowledge distillation: the temperature-scaled loss, and recovering a pruned student
#
# **The Art of Compressing LLMs** — hands-on lab 5 of 7.
#
# Lab 04 ended with a structurally pruned model: smaller and faster, but clearly worse. Fine-tuning it on text helps;
# training it to imitate the model it came from helps more. That is knowledge distillation (Hinton, Vinyals & Dean,
# 2015): the teacher's full next-token distribution carries far more information per token than the one correct
# label. Today you write the loss, understand its temperature, and measure what it buys on a real pruned student.
#
# **Learning objectives.** By the end you can
# 1. soften a distribution with a temperature and explain "dark knowledge";
# 2. write the distillation loss with its T² factor, and show by measurement why the factor is there;
# 3. contrast forward KL (mode-covering) with reverse KL (mode-seeking);
# 4. combine hard and soft losses with label masking, as real training code does;
# 5. prune a model into a student (drop layers) and recover it: CE fine-tuning vs distillation at equal steps;
# 6. distil hidden states too (Minitron): the student's states, through a learned projection, against the teacher's.
#
# **Time:** about 75 minutes (30 min of exercises, 20 min of training that runs while we discuss). **Hardware:** CPU
# works (quick mode ~3 min); full mode trains five students and wants a GPU (48 min on a 2-core CPU, measured).

# %% [markdown] tags=["instructor"]
# **Instructor notes — lab 05.** Slot: 75 min (10 min dark knowledge, 18 min exercises 1–4, 5 min the student,
# 20 min training + discussion while section 7 runs, 12 min exercise 5, 10 min results and section 8's run).
# Exercises: 3 + 6 + 3 + 6 + 12 = 30 min.
#
# * Common mistakes the checkers catch: multiplying by T instead of dividing; softmax over the batch axis; `exp`
#   overflow at large logits; forgetting T² (or using T); `F.kl_div(..., reduction="mean")`, which also divides by the
#   vocabulary size, or `"batchmean"` on (batch, seq, vocab), which divides by the batch only; the KL arguments swapped
#   (`kl_div` wants the student's *log*-probabilities first); in the combined loss, masking the CE but averaging the
#   KL over every position (padding included), or swapping alpha and 1 − alpha; in the hidden loss, indexing
#   `hidden_states[s]` for layer s (entry 0 is the embeddings), averaging over padding or per sequence, indexing with
#   the int64 attention mask itself (integer indexing, not a selection), projecting the teacher instead of the
#   student, and leaving the teacher's states attached to the graph (the right value, a gradient into the teacher).
# * Discussion prompts: "at T = 1 the teacher gives *Paris* only about half its mass — what does the other half
#   teach?" (section 1's plot); "why would reverse KL suit a small student generating text?" (it does not have the
#   capacity to cover every mode, so it had
#   better not put mass between them); "Minitron used < 3 % of the original training tokens — what makes
#   prune-then-distil so cheap?" (the student starts from the teacher's weights and only has to repair the damage).
# * If time is short: run section 7 in QUICK mode; the table after it (`cl.expected.show`) carries full mode's
#   reference figures beside the room's own.

# %% tags=["parameters"]
MODEL = "smollm2-135m"  # the teacher; offline default. The student is this model with layers removed
STUDENT = None  # None: prune MODEL into the student. Or a model name (on a GPU: smollm2-135m, with MODEL smollm2-360m)
DTYPE = "float32"
QUICK = None  # None: automatic (quick on a CPU, full on a CUDA GPU); True/False forces it (the tests set True)
SEED = 0
STUDENT_LAYERS = 20  # the pruned student keeps this many of the teacher's decoder layers (SmolLM2-135M has 30)
STEPS = None  # optimizer steps per student; None: from the mode (12 quick; full: 48 on CPU, 300 on a GPU)
T = 2.0  # the raised temperature of sections 3-6 (and of the extra full-mode run in section 7)
TRAIN_T = 1.0  # temperature of the KD students of section 7 (1, as in MiniLLM and Minitron; section 7 also tries 2)
ALPHA = 0.5  # weight of the hard-label CE in the KD runs (Hinton's mix; 0 is pure distillation, as Minitron)
HIDDEN_WEIGHT = 5.0  # weight (beta) of section 8's intermediate-state loss, added to KD forward's loss

# %% [markdown]
# ## 0 · Setup

# %%
import copy
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import compresslab as cl
from compresslab import distill

env = cl.setup(quick=QUICK, seed=SEED, lab="05")  # prints the device, mode and this lab's runtime
print(env)
sz = env.sizes
STEPS = STEPS or (12 if env.quick else 48 if env.device == "cpu" else 300)
BATCH, TRAIN_LEN = (2, 128) if env.quick else (4, 256)  # windows per step, tokens per window
print("expected runtime: " + ("~3 min" if env.quick else f"five students x {STEPS} steps of {BATCH}x{TRAIN_LEN} "
      "tokens: about 60 min on a 2-core CPU, a few minutes on a GPU"))

teacher, tok = cl.load_model(MODEL, dtype=DTYPE, device=env.device)
calib = cl.data.calibration_batches(tok, n_samples=sz.calib_samples, seq_len=sz.calib_len, seed=SEED)
train_ids = cl.data.training_windows(tok, n_windows=STEPS * BATCH, seq_len=TRAIN_LEN, seed=SEED)  # (n, len)
print(f"teacher: {MODEL}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters; "
      f"training text: {tuple(train_ids.shape)} token ids of WikiText-2 valid (the test split is only for perplexity)")

# %% [markdown] tags=["slide"]
# ## 1 · Soft targets and dark knowledge
#
# A label says "the next token is *Paris*". The teacher says "*Paris* 85 %, *Lyon* 4 %, *France* 2 %, …": how similar
# the wrong answers are to the right one. Hinton called this **dark knowledge**. Most of it sits in tiny
# probabilities, so we raise the **temperature**: $p_i(T) = \exp(z_i/T) / \sum_j \exp(z_j/T)$. T = 1 is the model's
# own distribution; T > 1 flattens it and lets the small probabilities speak; T → 0 tends to the one-hot argmax.
#
# ### Exercise 1 — the softened softmax (3 min)
# Complete `softmax_T(logits, T)`: the softmax of `logits / T` over the last dimension (the vocabulary), for any
# leading shape. It must not overflow for logits in the thousands.

# %%
def softmax_T(logits: torch.Tensor, T: float) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) at temperature T."""
    ### BEGIN SOLUTION
    return torch.softmax(logits / T, dim=-1)
    ### END SOLUTION


# %%
softmax_T = cl.checks.check_softmax_T(softmax_T)

# %% [markdown]
# A real next-token position: the teacher reads a WikiText-2 test sentence; we look at its distribution for the
# next token at four temperatures.

# %% tags=["slide"]
text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in"
ids = tok(text, return_tensors="pt").input_ids.to(env.device)
with torch.no_grad():
    z = teacher(ids).logits[0, -1].float().cpu()  # (V,) next-token logits
top = z.topk(10).indices
fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=True)
for ax, temp in zip(axes, (1, 2, 4, 8)):
    p = softmax_T(z, temp)
    entropy = -(p * p.clamp_min(1e-30).log()).sum().item()
    ax.bar(range(10), p[top].numpy())
    ax.set_xticks(range(10), [repr(tok.decode(i)) for i in top], rotation=70, fontsize=8)
    ax.set_title(f"T = {temp}: top-10 hold {p[top].sum():.0%}\nentropy {entropy:.2f} nats")
axes[0].set_ylabel("teacher probability")
fig.suptitle(f"…{text[-40:]!r} → next token", y=1.05)
plt.show()

# %% [markdown]
# Read the titles. Even at T = 1 the teacher hedges: on SmolLM2-135M *Paris* gets about half the mass, *the* about a
# fifth, and the top-10 together ~88 % (entropy ~2 nats). Raising T flattens it fast: at T = 2 the top-10 hold ~15 %,
# and by T = 4 the distribution is close to uniform over 49,152 tokens. The ranking among the *wrong* answers (other
# places, prepositions) is what the student can learn from them and not from the label — and an LLM shows much of it
# already at T = 1 (section 7 comes back to this).

# %% [markdown] tags=["slide"]
# ## 2 · The student: the teacher with a third of its layers removed
#
# Prune-then-distil (NVIDIA's Minitron): cut the teacher down, keep its weights, and let distillation repair the
# damage. Which layers? ShortGPT's **Block Influence** measures how much each decoder layer changes its input,
# BI = 1 − cos(h_in, h_out) averaged over calibration tokens; a layer that barely turns the hidden state is cheap to
# drop. `distill.make_student` drops the lowest-BI layers (`mlp_ratio=` would also apply lab 04's structured MLP
# pruning).

# %%
if STUDENT is None:
    student0, info = distill.make_student(teacher, calib, n_layers=STUDENT_LAYERS)
    bi = info["influence"]
    fig, ax = plt.subplots(figsize=(9, 2.8))
    ax.bar(range(len(bi)), bi.numpy(), color=["tab:red" if i in info["dropped"] else "tab:blue" for i in range(len(bi))])
    ax.set(yscale="log", xlabel="decoder layer", ylabel="block influence (log)",
           title=f"red: the {len(info['dropped'])} layers dropped (lowest influence)")
    plt.show()
    print("dropped layers:", info["dropped"])
else:  # a separate, smaller model of the same family: it must share the teacher's tokenizer
    student0, student_tok = cl.load_model(STUDENT, dtype=DTYPE, device=env.device)
    distill.validate_same_tokenizer(tok, student_tok)


def ppl_of(m) -> float:
    return cl.evaluation.perplexity(m, tok, sz.ppl_windows, sz.seq_len, progress=False)


n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student0))
ppl_teacher, ppl_pruned = ppl_of(teacher), ppl_of(student0)
print(f"teacher {n_teacher / 1e6:.1f}M parameters, perplexity {ppl_teacher:.2f}")
print(f"student {n_student / 1e6:.1f}M parameters ({n_student / n_teacher:.0%}), perplexity {ppl_pruned:.2f} before any training")

# %% [markdown] tags=["slide"]
# ## 3 · The distillation loss and its T²
#
# The soft loss compares teacher and student position by position: for each token position, the KL divergence from
# the teacher's softened distribution $p^T$ to the student's $q^T$, averaged over positions:
#
# $$\mathcal{L}_{soft} = T^2 \cdot \frac{1}{N}\sum_{\text{positions}} \mathrm{KL}(p^T \,\|\, q^T), \qquad
#   \mathrm{KL}(p\,\|\,q) = \sum_v p_v (\log p_v - \log q_v).$$
#
# ### Exercise 2 — the soft loss (6 min)
# Complete `soft_loss(student_logits, teacher_logits, T)` for logits of shape (batch, seq, V). Use `log_softmax` for
# the student (never `log(softmax)`). If you use `F.kl_div`, read its documentation on `reduction` carefully.

# %%
def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)). Logits (..., V) -> scalar."""
    ### BEGIN SOLUTION
    log_q = torch.log_softmax(student_logits / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits / T, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...,) one KL per position
    return T**2 * kl.mean()
    ### END SOLUTION


# %%
soft_loss = cl.checks.check_soft_loss(soft_loss)

# %% [markdown]
# **Why T²?** The gradient of the soft loss with respect to a student logit is $(q_i^T - p_i^T)/T$, and for large T
# the difference $q^T - p^T$ itself shrinks like $1/T$ (both distributions approach uniform). So the soft gradient
# falls like $1/T^2$: without the factor, raising T would silently turn distillation off relative to the hard loss.
# Measure it on the real student and teacher: the gradient norm with respect to the student's logits, across T.

# %% tags=["slide"]
x = train_ids[:2].to(env.device)
with torch.no_grad():
    t_logits = teacher(x).logits[:, :-1].float()
    s_logits0 = student0(x).logits[:, :-1].float()
temps = [0.5, 1, 2, 4, 8, 16]
norms = {"without T²": [], "with T²": []}
for temp in temps:
    s = s_logits0.clone().requires_grad_(True)
    (soft_loss(s, t_logits, temp) / temp**2).backward()
    norms["without T²"].append(s.grad.norm().item())
    s.grad = None
    soft_loss(s, t_logits, temp).backward()
    norms["with T²"].append(s.grad.norm().item())
fig, ax = plt.subplots(figsize=(6, 3.4))
for k, v in norms.items():
    ax.plot(temps, v, "o-", label=k)
ax.plot(temps, [norms["without T²"][2] * (2 / t) ** 2 for t in temps], "k:", label="∝ 1/T²")
ax.set(xscale="log", yscale="log", xlabel="temperature T", ylabel="‖∂loss/∂student logits‖",
       title="the soft gradient falls as 1/T²; the T² factor undoes it")
ax.legend()
plt.show()
print("gradient norm ratio T=4 / T=16 without T²: "
      f"{norms['without T²'][3] / norms['without T²'][5]:.1f} (1/T² predicts 16)")

# %% [markdown] tags=["slide"]
# ## 4 · Forward vs reverse KL
#
# KL is not symmetric. **Forward** KL(p‖q) weights by the teacher: wherever the teacher has mass, a student with
# q ≈ 0 pays $\log(p/q) \to \infty$, so the student spreads to **cover every mode**, even putting mass between them.
# **Reverse** KL(q‖p) weights by the student: it pays only where it puts mass, so it **seeks one mode** and ignores
# the rest. MiniLLM (Gu et al., 2024) argues reverse KL suits generation by small students, since sampling from the
# space between modes gives text the teacher would never write. DistiLLM's **skew KL** KL(p ‖ 0.1·p + 0.9·q) is forward KL
# kept finite by mixing a little of the teacher into the student.
#
# ### Exercise 3 — reverse KL (3 min)
# Complete `reverse_kl(student_logits, teacher_logits, T)`: the same reduction as exercise 2 (T² · mean over
# positions), with the divergence KL(q^T ‖ p^T).

# %%
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(student / T) || softmax(teacher / T))."""
    ### BEGIN SOLUTION
    log_q = torch.log_softmax(student_logits / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits / T, dim=-1)
    return T**2 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    ### END SOLUTION


# %%
reverse_kl = cl.checks.check_reverse_kl(reverse_kl)

# %% [markdown]
# The classic picture: a bimodal "teacher" over 200 bins, and a "student" that can only be one Gaussian (two
# parameters, a mean and a log-width). Fit it by gradient descent under each divergence.

# %% tags=["slide"]
grid = torch.linspace(-6, 6, 200)
teacher_toy = torch.logaddexp(-0.5 * ((grid + 2.5) / 0.6) ** 2, -0.5 * ((grid - 2) / 0.8) ** 2 + math.log(0.7))  # logits
fits = {}
for name, loss_fn in (("forward KL", soft_loss), ("reverse KL", reverse_kl)):
    mu, log_sigma = torch.tensor(0.7, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.Adam([mu, log_sigma], lr=0.05)
    for _ in range(600):
        student_toy = -0.5 * ((grid - mu) / log_sigma.exp()) ** 2  # a Gaussian's logits
        loss = loss_fn(student_toy[None], teacher_toy[None], 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fits[name] = softmax_T(student_toy.detach(), 1.0)
fig, ax = plt.subplots(figsize=(7, 3))
ax.fill_between(grid, softmax_T(teacher_toy, 1.0), alpha=0.3, color="gray", label="teacher (bimodal)")
for name, q in fits.items():
    ax.plot(grid, q, lw=2, label=f"student fitted by {name}")
ax.set(xlabel="token (toy vocabulary)", ylabel="probability", title="forward KL covers, reverse KL seeks a mode")
ax.legend()
plt.show()

# %% [markdown] tags=["slide"]
# ## 5 · The combined loss, with masking
#
# Hinton's recipe mixes both signals: $\mathcal{L} = \alpha \cdot \mathrm{CE}(y, q^1) + (1-\alpha) \cdot T^2 \cdot
# \mathrm{KL}(p^T \| q^T)$ (the CE at T = 1). Real batches contain positions that must not count: padding, and in
# instruction tuning the prompt tokens. By convention their label is −100 (what `F.cross_entropy` ignores by
# default), and the *same* positions must be left out of the KL term too — averaged over the counted positions only.
#
# ### Exercise 4 — the combined loss with masking (6 min)
# Complete `kd_loss(student_logits, teacher_logits, labels, T, alpha)`. `labels[b, t]` is the token
# `logits[b, t]` should predict (already shifted), or −100.

# %%
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, T: float,
            alpha: float) -> torch.Tensor:
    """alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T), over labels != -100 only."""
    ### BEGIN SOLUTION
    keep = labels != -100  # (...) the counted positions
    s, t = student_logits[keep], teacher_logits[keep]  # (n, V)
    ce = F.cross_entropy(s, labels[keep])
    return alpha * ce + (1 - alpha) * soft_loss(s, t, T)
    ### END SOLUTION


# %%
kd_loss = cl.checks.check_kd_loss(kd_loss)

# %% [markdown]
# The package's `distill.kd_loss` is the same loss with a `kind=` switch (`"forward"`, `"reverse"`, `"skew"`), checks
# on its inputs (shapes, vocabularies, T, alpha) and float32 arithmetic for half-precision logits. From here on, the
# training loop uses it.
#
# ## 6 · Caching the teacher
#
# Every KD step runs the teacher forward. When several students train on the same windows, it is tempting to run the
# teacher **once** and store its outputs — but the full logits are huge (49,152 floats per token). `distill.cache_teacher`
# keeps the top-k logits per position plus the log-normaliser, so the top-k probabilities are exact and the other
# V − k tokens become a single "rest" bucket. The loss then compares k + 1 buckets: a coarser view whose KL can only
# be *smaller* than the full one. How much is lost? Measure it before trusting it.

# %%
t_full, s_full = t_logits, s_logits0  # section 3's logits of the same two training windows
for temp in (1.0, T):
    full = distill.kd_loss(s_full, t_full, T=temp, alpha=0.0).item()
    for k in (64, 1024):
        c = distill.topk_logits(t_full, k=k, T=temp)
        cached = distill.kd_loss(s_full, c, T=temp, alpha=0.0).item()
        print(f"T = {temp:g}, k = {k:4d}: teacher mass outside the top-k {c.rest_mass().mean():6.1%}; soft loss "
              f"cached {cached:6.3f} = {cached / full:4.0%} of the full {full:.3f}; {k * 6 / 1024:4.1f} KiB per token "
              f"instead of {t_full.shape[-1] * 4 / 1024:.0f}")

# %% [markdown]
# At T = 1 a few dozen tokens hold most of a confident teacher's mass; at higher T the tail that the temperature was
# meant to expose is exactly what the cache throws away. Caching (as in distillation pipelines that precompute teacher
# top-k) is a trade of compute for fidelity: fine at T = 1 with a large k, a poor approximation of the T = 2 loss.
# The training runs below therefore use the live teacher.

# %% [markdown] tags=["slide"]
# ## 7 · Recovering the pruned student: CE vs distillation, same steps, same data
#
# The students start from the same pruned weights and see the same windows in the same order (a seeded sampler), for
# the same number of AdamW steps with the same learning-rate schedule (embeddings frozen):
# * **CE**: plain fine-tuning on the text (alpha = 1, no teacher);
# * **KD forward** and **KD reverse**: alpha = ALPHA of CE plus (1 − ALPHA) of T² · KL at temperature TRAIN_T = 1;
# * full mode adds **KD forward at T = 2** (Hinton's raised temperature), to measure what the temperature does.
#
# Why T = 1 for the main runs? Hinton raised T for classifiers with ten confident classes, where the dark knowledge
# hides in probabilities of 1e-6. An LLM's next-token distribution over 49,152 tokens is already broad at T = 1 (section
# 1), perplexity is measured at T = 1, and a 20-layer student cannot match a 30-layer teacher's whole tail: at T = 2
# the loss spends its effort on that tail. LLM distillation recipes (MiniLLM, Minitron) use T = 1.
#
# Perplexity on WikiText-2 test is measured along the way.

# %%
RUNS = {"CE": dict(alpha=1.0, T=TRAIN_T), "KD forward": dict(alpha=ALPHA, kind="forward", T=TRAIN_T),
        "KD reverse": dict(alpha=ALPHA, kind="reverse", T=TRAIN_T)}
if not env.quick:
    RUNS[f"KD forward, T = {T:g}"] = dict(alpha=ALPHA, kind="forward", T=T)
histories, students = {}, {}
for name, kw in RUNS.items():
    student = copy.deepcopy(student0)  # every run starts from the same pruned weights
    t0 = time.perf_counter()
    histories[name] = distill.distill(
        student, train_ids, teacher=None if kw["alpha"] == 1 else teacher, steps=STEPS, lr=2e-4, batch_size=BATCH,
        warmup=max(1, STEPS // 10), eval_fn=ppl_of, eval_every=max(1, STEPS // 3), seed=SEED, **kw)
    students[name] = student
    print(f"{name:11s} perplexity {ppl_pruned:8.2f} -> {histories[name]['eval'][-1]:8.2f} "
          f"({time.perf_counter() - t0:.0f} s)")

# %% tags=["slide"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
for name, h in histories.items():
    w = max(1, STEPS // 12)  # a running mean over w steps
    ce = torch.tensor(h["ce"])
    smooth = ce.unfold(0, w, 1).mean(1) if len(ce) >= w else ce
    axes[0].plot(range(w, len(ce) + 1), smooth.numpy(), label=name)
    axes[1].plot(h["eval_step"], h["eval"], "o-", label=name)
axes[0].set(xlabel="step", ylabel="training CE (nats/token, running mean)", title="next-token loss on the training text")
axes[1].axhline(ppl_teacher, color="k", ls="--", lw=1, label="teacher")
axes[1].set(xlabel="step", ylabel="WikiText-2 test perplexity (log)", yscale="log", title="held-out perplexity")
for ax in axes:
    ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **How much of the damage did each recover?** On the log scale (nats per token, what the loss measures): the share
# of the gap between the pruned, untrained student and the teacher that training closed,
# $(\log \mathrm{ppl}_{pruned} - \log \mathrm{ppl}) / (\log \mathrm{ppl}_{pruned} - \log \mathrm{ppl}_{teacher})$.
# Mode-seeking shows on the model too: the entropy of each student's next-token distribution on the test text
# (reverse KL should make it more confident than forward KL). Each probe accuracy is printed with its 95 % interval
# (about ±15 points at 30 % with quick mode's 32 questions, ±9 with 100): overlapping intervals, no evidence.

# %%
windows = cl.data.test_windows(tok, 2, sz.seq_len).to(env.device)


@torch.no_grad()
def mean_entropy(m) -> float:
    logp = torch.log_softmax(m(windows).logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean().item()


def record(name, m, ppl, **extra):
    acc = cl.evaluation.arithmetic_probe(m, tok, sz.probe_n, seed=SEED)
    cl.results.record(lab="05", method=name, model=MODEL, **cl.results.describe(m), ppl=round(ppl, 3),
                      probe_acc=acc, quick=env.quick,
                      params_m=round(sum(p.numel() for p in m.parameters()) / 1e6, 1), steps=STEPS,
                      entropy=round(mean_entropy(m), 3), **extra)
    print(f"{name:40s} ppl {ppl:8.2f}  probe {cl.evaluation.accuracy_with_interval(acc, sz.probe_n)}")
    return acc


record("teacher", teacher, ppl_teacher)
STUDENT_NAME = f"pruned {STUDENT_LAYERS} layers" if STUDENT is None else STUDENT  # what the student really is
record(f"{STUDENT_NAME}, untrained", student0, ppl_pruned)
gap = math.log(ppl_pruned) - math.log(ppl_teacher)
for name, m in students.items():
    ppl = histories[name]["eval"][-1]
    recovered = (math.log(ppl_pruned) - math.log(ppl)) / gap
    record(f"student {name}", m, ppl, gap_recovered=round(recovered, 3), T=RUNS[name]["T"], alpha=RUNS[name]["alpha"])
table = cl.results.table(lab="05", model=MODEL, quick=env.quick)
table[["method", "params_m", "ppl", "probe_acc", "entropy", "gap_recovered"]]

# %%
cl.expected.show("05", MODEL, env, ("teacher", "pruned", "student"), exclude=("hidden",))  # every measured mode

# %% [markdown]
# The table puts your students beside the reference of every measured mode (quick: 12 steps of 2 × 128 tokens at
# T = 1, scored on 4 × 256 test windows; full on a CPU: 48 steps of 4 × 256 tokens, lr 2e-4, alpha = 0.5, 16 × 512
# windows, plus forward KD at T = 2 and, in section 8, the hidden-state loss). What holds in both: training wins back
# a large part of what pruning cost (`gap_recovered`, the share of the log-perplexity gap to the teacher closed:
# under half in quick mode's 12 steps, about two thirds in full mode's 48), yet no student gets near the teacher, and
# none answers a single probe question; forward KD at T = 1 ends ahead of CE, by about a tenth in quick mode and by
# about 1.5 % in full mode; reverse KL lands between them in quick mode and behind CE in full mode.
#
# Read these as a tie. Each perplexity is exact for its model (fixed test windows, no sampling), but each student is
# one training run: another `SEED` (other training windows and order, another pruned student) would move every
# number, by an amount not measured here; in lab 02 another calibration draw alone moved 3-bit GPTQ by about 4 %. The
# full-mode students end within 3.5 % of each other, so the runs do not show that any loss beats another at this
# budget — nor that reverse KL's mode-seeking costs perplexity, though that is what it predicts. A small margin is
# also what to expect: CE trains on the evaluation domain (WikiText), while KD pulls the student toward an instruct
# teacher whose own WikiText perplexity is about 37. Compare your own run, rerun with another `SEED` to see how far
# one run moves, and try more steps (on a GPU: `STEPS = 300`), alpha, and T.

# %% [markdown] tags=["slide"]
# ## 8 · Distilling the inside too: an intermediate-state loss (Minitron)
#
# The logit loss tells the student what to output, not how to get there. Minitron (Muralidharan et al., 2024) also
# compares hidden states: for chosen pairs (student layer, teacher layer), the student's state, mapped to the teacher's
# width by a learned linear layer, should point where the teacher's does, token by token. Its total loss is
# $\mathcal{L} = \mathcal{L}_{CE} + \mathcal{L}_{logits} + \beta \cdot \mathcal{L}_{hidden}$ (the paper calls the weight
# α; here ALPHA already weighs the CE). A pruned student brings its pairs along: student layer i *is* the teacher layer
# it was copied from, and the widths match, so the projection starts as the identity (and still learns). A
# SmolLM2-135M student under SmolLM2-360M would need a 576 → 960 projection, learned from scratch.
#
# Which distance? First look at how large the teacher's hidden states are.

# %%
if STUDENT is None:  # student layer i is the teacher layer it was copied from
    kept = [i for i in range(len(teacher.model.layers)) if i not in info["dropped"]]
else:  # another model: spread its layers evenly over the teacher's
    kept = [round((i + 1) * len(teacher.model.layers) / len(student0.model.layers)) - 1
            for i in range(len(student0.model.layers))]
probe = windows[:1]  # one of section 7's test windows: 256 tokens, no padding
with torch.no_grad():
    t_hidden = teacher(probe, output_hidden_states=True).hidden_states  # a tuple of (1, 256, width) tensors
print(f"{len(teacher.model.layers)} decoder layers, {len(t_hidden)} hidden states")
norms = torch.stack([h.float().norm(dim=-1) for h in t_hidden[1:]])  # (layers, batch, seq) one norm per token
for i in range(0, len(norms), 4):
    print(f"after teacher layer {i:2d}: first token's state {norms[i, :, 0].mean():8.0f}, "
          f"the other tokens' (median) {norms[i, :, 1:].median():5.0f}")

# %% [markdown] tags=["subslide"]
# The norm of a token's state grows more than tenfold with depth, and the first token's (an attention sink) reaches
# ~25,000 in the middle layers, around a hundred times the others'. A plain MSE between hidden states would be mostly
# about those few large states. The cosine distance 1 − cos(proj(h_student), h_teacher) of each token ignores the
# length: every token and every layer count alike. NVIDIA's Model Optimizer uses it (`HiddenStateCosineLoss`) when
# Megatron and NeMo run the Minitron recipe.
#
# ### Exercise 5 — the intermediate-state loss (12 min)
# Complete `hidden_loss(student_hidden, teacher_hidden, pairs, proj, mask)`:
# * `student_hidden`, `teacher_hidden`: what `model(ids, output_hidden_states=True).hidden_states` returns, a tuple of
#   (batch, seq, width) tensors. It holds one more entry than the model has layers (the cell above printed both):
#   find out what entry 0 is before you index it.
# * `pairs`: a list of (student layer, teacher layer), decoder-layer indices as in `model.model.layers`.
# * `proj`: the learned map (an `nn.Linear`) from the student's width to the teacher's.
# * `mask` (batch, seq): the `attention_mask`, 1 at real tokens and 0 at padding (int64, as the tokenizer returns it).
#
# Return one scalar: for each pair, the cosine distance between the projected student state and the teacher's state
# at every real token, averaged over the real tokens; then the average over the pairs. Padding must not count, and a
# real token weighs the same whichever sequence it sits in. The student and the projection learn from this loss; the
# teacher is the target and must get no gradient. The checker compares the value and the gradients.

# %%
def hidden_loss(student_hidden, teacher_hidden, pairs, proj, mask) -> torch.Tensor:
    """Mean over the pairs (s, t) of the mean over real tokens of 1 - cos(proj(student state s), teacher state t)."""
    ### BEGIN SOLUTION
    keep = mask.bool()  # (batch, seq) the real tokens; an int mask as an index would pick rows 0 and 1
    losses = []
    for s, t in pairs:
        h_s = proj(student_hidden[s + 1])  # (batch, seq, teacher width): entry 0 is the embeddings
        h_t = teacher_hidden[t + 1].detach()  # the teacher is the target: no gradient into it
        dist = 1 - F.cosine_similarity(h_s, h_t, dim=-1)  # (batch, seq) one distance per token
        losses.append(dist[keep].mean())
    return torch.stack(losses).mean()
    ### END SOLUTION


# %%
hidden_loss = cl.checks.check_hidden_loss(hidden_loss)

# %% [markdown]
# **Where did the pruned student drift, and did logit KD pull it back?** Your `hidden_loss`, one pair at a time,
# through the identity projection: the distance between each student layer and the teacher layer it came from, on
# the test window above (no padding there: the mask is all ones), for the untrained student and section 7's three.
# (With another `STUDENT` model the projection is random until trained, and these distances say little.)

# %% tags=["slide"]
proj0 = distill.make_projection(student0.config.hidden_size, teacher.config.hidden_size,
                                dtype=next(student0.parameters()).dtype, device=env.device)  # the identity if square
mask = torch.ones_like(probe)  # every token of a test window is real


@torch.no_grad()
def layer_distances(m) -> list[float]:
    """1 - cos between each student layer and its teacher layer, averaged over the test window's tokens."""
    s_hidden = m(probe, output_hidden_states=True).hidden_states
    return [hidden_loss(s_hidden, t_hidden, [(i, t)], proj0, mask).item() for i, t in enumerate(kept)]


distances = {name: layer_distances(m) for name, m in {"untrained": student0, **students}.items()}
fig, ax = plt.subplots(figsize=(9, 3.2))
for name, d in distances.items():
    ax.plot(d, "o-", ms=3, label=name)
ax.set(xlabel="student layer (paired with the teacher layer it was copied from)", ylabel="1 − cos, mean over tokens",
       title="how far each student layer's state is from its teacher layer's")
ax.legend(fontsize=8)
plt.show()
half = len(kept) // 2
for name, d in distances.items():
    print(f"{name:11s} mean distance, student layers 0-{half - 1}: {sum(d[:half]) / half:.3f}, "
          f"{half}-{len(d) - 1}: {sum(d[half:]) / (len(d) - half):.3f}")

# %% [markdown]
# The first layers are exact copies (distance 0) until the first dropped layer, and each gap in the kept layers adds
# a step. Section 7's training, with losses on the output alone, pulls the last layers back toward the teacher's
# (they feed the output) and leaves the first ones about where pruning put them.
#
# **Training with it.** `distill.distill(..., hidden_weight=β, pairs=PAIRS)` adds β · `distill.hidden_loss` (the
# reference of your exercise) to section 7's KD forward loss, and trains the projection, starting at the identity,
# with the student. One pair every five student layers (four here), β = `HIDDEN_WEIGHT`. Minitron recommends the
# intermediate loss when the depth is not reduced much and logit-only KD when it is; this student lost a third of
# its layers, so measure before believing either. Quick mode runs two steps (the loss terms, not a trained student);
# full mode trains it for `STEPS` steps and records it next to section 7's students.

# %%
PAIRS = [(i, kept[i]) for i in range(4, len(kept), 5)]  # (student layer, teacher layer): four spread over the depth
print("pairs (student layer, teacher layer):", PAIRS)
student = copy.deepcopy(student0)
proj = distill.make_projection(student.config.hidden_size, teacher.config.hidden_size,
                               dtype=next(student.parameters()).dtype, device=env.device)
hidden_kw = dict(alpha=ALPHA, kind="forward", T=TRAIN_T, hidden_weight=HIDDEN_WEIGHT, pairs=PAIRS, proj=proj,
                 lr=2e-4, batch_size=BATCH, seed=SEED)
t0 = time.perf_counter()
if env.quick:  # the first two steps, of one window each: the size of each term
    h = distill.distill(student, train_ids, teacher=teacher, steps=2, warmup=1, **dict(hidden_kw, batch_size=1))
    for i in range(2):
        print(f"step {i + 1}: loss {h['loss'][i]:.3f} = {ALPHA} x CE {h['ce'][i]:.3f} + {1 - ALPHA} x soft "
              f"{h['soft'][i]:.3f} + {HIDDEN_WEIGHT} x hidden {h['hidden'][i]:.4f}")
else:
    name = "KD forward + hidden"
    h = distill.distill(student, train_ids, teacher=teacher, steps=STEPS, warmup=max(1, STEPS // 10),
                        eval_fn=ppl_of, eval_every=max(1, STEPS // 3), **hidden_kw)
    histories[name], students[name] = h, student
    ppl = h["eval"][-1]
    record(f"student {name}", student, ppl, gap_recovered=round((math.log(ppl_pruned) - math.log(ppl)) / gap, 3),
           T=TRAIN_T, alpha=ALPHA, hidden_weight=HIDDEN_WEIGHT)
    print(f"perplexity after {STEPS} steps: KD forward {histories['KD forward']['eval'][-1]:.2f}, "
          f"KD forward + hidden {ppl:.2f}")
label = "with the hidden loss, " + ("2 steps" if env.quick else f"{STEPS} steps")
distances[label] = layer_distances(student)
shown = ["untrained", label] if env.quick else ["untrained", "KD forward", label]  # quick: 2 steps against 12 misleads
for name in shown:
    at_pairs = ", ".join(f"{distances[name][s]:.4f}" for s, _ in PAIRS)
    print(f"{name:30s} distance at the pairs' student layers: {at_pairs}")
print(f"({time.perf_counter() - t0:.0f} s)")

# %%
cl.expected.show("05", MODEL, env, "KD forward")  # full mode's hidden-loss student beside the logit-only ones

# %% [markdown]
# Full mode trains the hidden-loss student for all `STEPS` and records it (the table; quick mode runs two steps and
# records nothing). On the CPU's full mode it ends within 1 % of logit-only forward KD — as far apart as the
# students of section 7 — while its states at the paired layers end closer to the teacher's than forward KD's do
# (full mode prints both above): the loss does what it says, and perplexity does not notice at this budget. A
# quick-size run of all 12 steps gave the same picture (101.7 with β = 5 against 104.1; 103.4 with β = 1, 102.3 with
# β = 20). Weigh it as section 7's numbers: one run each, no evidence that the hidden loss helps here, nor that it
# hurts (Minitron's advice predicts no gain after removing a third of the layers). Try β, the pairs (every layer, or
# only the ones right after a removed layer) and `STEPS`.

# %% [markdown] tags=["slide"]
# ## 9 · Going further
#
# * **More data, more steps.** Minitron distils for billions of tokens; the recovery curve above is still falling.
# * **A real teacher–student pair.** On a GPU, set `MODEL="smollm2-360m"` and `STUDENT="smollm2-135m"`: same
#   tokenizer, different models. Different tokenizers need sequence-level KD (train on the teacher's generated text)
#   or cross-tokenizer alignment; logit KD refuses them (`distill.validate_same_tokenizer`).
# * **On-policy distillation** (GKD, MiniLLM): score the student's *own* samples with the teacher, which removes the
#   train/generate mismatch of training only on fixed text. TRL's `GKDTrainer` implements it (`beta` 0 = forward,
#   1 = reverse KL).
# * **Structured width pruning** (lab 04's `prune_mlp_neurons`, here `make_student(..., mlp_ratio=0.25)`) combines with
#   depth pruning; Minitron found width pruning followed by distillation better than depth for the same size.
# * **Balancing the losses.** A fixed β means something else at every step as the terms shrink at different rates.
#   Model Optimizer's `LogitsAndIntermediatesLossBalancer` rescales the intermediate loss to the logit loss's size at
#   every step instead.

# %% [markdown]
# ## Reflection
# **Question 1.** Your CE student and KD student saw exactly the same tokens. Where does the KD student's extra
# information come from, and why does it matter more when the student starts from a pruned teacher than from scratch?

# %% [markdown] tags=["solution"]
# From the teacher's full distribution at every position: one CE label carries at most log2(V) bits and says nothing
# about the other tokens, while the teacher's distribution ranks all of them. A pruned teacher's weights already encode
# most of that ranking; distillation tells the student exactly which outputs moved and by how much, so it repairs the
# damage instead of re-learning the text distribution from a handful of labels (which also pulls the student toward
# the quirks of the small training text — the CE student overfits WikiText-valid, the KD student stays near the
# teacher).

# %% [markdown]
# **Question 2.** You double T from 2 to 4 and forget the T² factor. What happens to training with alpha = 0.5, and
# what with alpha = 0?

# %% [markdown] tags=["solution"]
# With alpha = 0.5 the soft gradient falls to about a quarter of its size while the CE gradient is unchanged: the mix
# silently shifts toward plain CE fine-tuning, and the teacher's influence fades (section 3 measured the 1/T² slope).
# With alpha = 0 only the effective learning rate drops by ~4× (AdamW normalises gradient scale, so even that is
# mostly absorbed); the optimum is unchanged. The factor matters for the *balance* between the two losses.

# %% [markdown] tags=["instructor"]
# **Answers to expect and follow-ups.** Q1: steer toward "bits per token of supervision". Q2: the AdamW remark is the
# subtle part; ask what happens with plain SGD (the step really shrinks by T²).

# %% [markdown]
# ## Summary
# * Temperature exposes dark knowledge: the teacher's ranking of wrong answers.
# * The soft loss is T² · KL(teacher_T ‖ student_T) per position, averaged; the T² keeps its gradient scale fixed.
# * Forward KL covers modes, reverse KL seeks one; skew KL interpolates and stays bounded.
# * Mask the same positions in both terms. Prune, keep the weights, distil: the cheapest route to a smaller model.
# * Hidden states can be distilled too (Minitron): the student's state, projected to the teacher's width, against the
#   teacher's, by cosine distance per real token; hidden_states[i + 1] is layer i, and the teacher stays a target.

# %% [markdown]
# ## Your numbers vs expected
# Every figure this run recorded, beside the reference measured in the same mode on a named machine
# (`compresslab/expected`, written by `tools/expected_figures.py` from real runs) and its noise band. ✓: within the
# band. ⚠: outside it — another model, mode or seed, or an edited cell, explains most; if not, look at your
# exercises' outputs. Modes nobody has measured yet (a GPU the project has not run on) say so: your numbers are then
# the reference.

# %%
cl.expected.compare("05", MODEL, env)

# %%
cl.checks.summary()
