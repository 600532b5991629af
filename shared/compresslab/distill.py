"""Knowledge distillation (Hinton et al. 2015) for causal LMs, top to bottom (lab 05).

    loss = kd_loss(student_logits, teacher_logits, labels, T=2.0, alpha=0.5, kind="forward")
         = alpha * CE(labels, student) + (1 - alpha) * T^2 * D(teacher_T || student_T)       (per token, averaged)
    student, info = make_student(teacher, calib, n_layers=20)          # prune the teacher: drop its least useful layers
    cache = cache_teacher(teacher, train_ids, k=64, T=2.0)              # optional: teacher run once, top-k kept
    history = distill(student, train_ids, teacher=teacher, steps=100)   # the small, honest training loop
    loss = hidden_loss(s_out.hidden_states, t_out.hidden_states, pairs, make_projection(576, 576), mask)  # Minitron

The idea: the teacher's whole next-token distribution ("dark knowledge": which wrong answers are nearly right) is a
richer training signal than the one-hot label. Softening both distributions with a temperature T > 1 exposes it
(Hinton's classifiers); an LLM's next-token distribution is already broad at T = 1, and lab 05's students trained
best at T = 1 (T = 2 fell behind plain CE). The soft loss's gradient shrinks as 1/T^2, so it is multiplied by T^2 to
keep its weight against the hard loss when T changes. D is forward KL (mode-covering, Hinton), reverse KL
(mode-seeking, MiniLLM) or skew KL (DistiLLM).
Prune-then-distil (Minitron): the student is the teacher with layers removed, initialised from the teacher's weights.
Minitron also distils hidden states: the student's, through a learned projection, against the teacher's at paired
layers (cosine distance per real token; distill(..., hidden_weight=, pairs=) adds it to the loss).
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .layerwise import layer0_inputs, run_layer, validate_decoder

KINDS = ("forward", "reverse", "skew")

# ----------------------------------------------------------------------------- softened distributions


def validate_temperature(T) -> float:
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not math.isfinite(T) or T <= 0:
        raise ValueError(f"temperature T must be a finite number > 0 (T = 1 is the plain softmax), got {T!r}")
    return float(T)


def softmax_T(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Softmax at temperature T over the last dim: exp(z_i / T) / sum_j exp(z_j / T). T > 1 flattens, T < 1 sharpens."""
    return torch.softmax(logits / validate_temperature(T), dim=-1)


def log_softmax_T(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """log softmax_T, computed stably (log-sum-exp), never log(softmax)."""
    return torch.log_softmax(logits / validate_temperature(T), dim=-1)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str = "forward", skew: float = 0.1) -> torch.Tensor:
    """Divergence of two distributions given as log-probabilities over the last dim -> one value per position.

    forward: KL(p || q) = sum p (log p - log q)    p = teacher: q must cover every mode of p (mode-covering)
    reverse: KL(q || p) = sum q (log q - log p)    q = student: q may drop modes but must not put mass where p has none
    skew:    KL(p || skew * p + (1 - skew) * q)    DistiLLM's skew KL: bounded, since the mixture covers p
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    lo = torch.finfo(log_p.dtype).min / 4  # stands in for log(0) = -inf: finite, so 0 * (log p - log q) = 0
    log_p, log_q = log_p.clamp(min=lo), log_q.clamp(min=lo)
    if kind == "forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if not 0 <= skew < 1:
        raise ValueError(f"skew is the teacher's share of the mixture and must be in [0, 1), got {skew!r}")
    log_mix = torch.logaddexp(log_p + math.log(skew), log_q + math.log1p(-skew)) if skew else log_q
    return (log_p.exp() * (log_p - log_mix)).sum(-1)


# ----------------------------------------------------------------------------- a cached teacher: top-k + the rest


@dataclass
class TopKLogits:
    """The teacher's k largest logits per position, plus what is needed to know the mass of all the others.

    values (..., k) logits minus the position's largest (float16: 0 is exact, the rest within ~0.01), indices (..., k)
    token ids, log_z (...) = logsumexp((z - max z) / T) over the WHOLE vocabulary at temperature T. With log_z the top-k probabilities at T are exact, and the other V - k tokens
    are merged into one "rest" bucket of known mass. The loss then compares teacher and student on k + 1 buckets instead
    of V tokens: a coarser view, so the KL it measures is a lower bound on the full one (data-processing inequality),
    tight when the teacher's tail is small (measure it: `rest_mass`). Valid only at the T it was made with.
    """

    values: torch.Tensor
    indices: torch.Tensor
    log_z: torch.Tensor
    T: float
    vocab_size: int

    def rows(self, idx: torch.Tensor) -> "TopKLogits":
        return TopKLogits(self.values[idx], self.indices[idx], self.log_z[idx], self.T, self.vocab_size)

    def to(self, device) -> "TopKLogits":
        return TopKLogits(self.values.to(device), self.indices.to(device), self.log_z.to(device), self.T,
                          self.vocab_size)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.values.shape[:-1], self.vocab_size)

    def log_probs(self) -> torch.Tensor:
        """(..., k + 1) teacher log-probabilities at T: the k kept tokens, then the rest bucket."""
        scaled = self.values.float() / self.T  # (..., k)
        # float16 rounding can push the kept mass a hair above 1: renormalise so that it stays below
        log_z = torch.maximum(self.log_z.float(), torch.logsumexp(scaled, dim=-1) + 1e-6)
        top = scaled - log_z[..., None]
        rest = torch.log(-torch.expm1(torch.logsumexp(top, dim=-1)))  # log(1 - kept mass)
        return torch.cat([top, rest[..., None]], dim=-1)

    def rest_mass(self) -> torch.Tensor:
        """(...) the teacher's probability (at T) outside its top k: what the cache merges into one bucket."""
        return self.log_probs()[..., -1].exp()


def topk_logits(teacher_logits: torch.Tensor, k: int = 64, T: float = 2.0) -> TopKLogits:
    """Keep the k largest logits of each position (and the log-normaliser at T)."""
    T = validate_temperature(T)
    V = teacher_logits.shape[-1]
    if not 1 <= k < V:
        raise ValueError(f"k must be in [1, vocab size {V}), got {k!r}")
    z = teacher_logits.float()
    if not torch.isfinite(z).all():
        raise ValueError("teacher logits contain NaN or inf")
    values, indices = z.topk(k, dim=-1)  # (..., k), largest first
    z = z - values[..., :1]  # relative to the largest: float16 keeps it exact, and no overflow
    return TopKLogits((values - values[..., :1]).half(), indices.int(), torch.logsumexp(z / T, dim=-1), T, V)


def _coarse_student(student_logits: torch.Tensor, teacher: TopKLogits, T: float) -> torch.Tensor:
    """(..., k + 1) student log-probabilities at T on the teacher's buckets: its k tokens, then the rest."""
    log_q = log_softmax_T(student_logits, T)  # (..., V)
    idx = teacher.indices.long()
    top = log_q.gather(-1, idx)  # (..., k)
    rest = log_q.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (...) every token not in the top k
    return torch.cat([top, rest[..., None]], dim=-1)


# ----------------------------------------------------------------------------- the KD loss


def kd_terms(student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor | None = None, T: float = 2.0,
             kind: str = "forward", skew: float = 0.1, ignore_index: int = -100) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(hard CE or None, T^2 * soft divergence), both averaged over the positions whose label is not ignore_index.
    teacher_logits None (CE only): the soft term is 0."""
    T = validate_temperature(T)
    cached = isinstance(teacher_logits, TopKLogits)
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() < 2:
        raise ValueError("student_logits must be a tensor (..., vocab), e.g. (batch, seq, vocab)")
    if teacher_logits is not None and tuple(teacher_logits.shape) != tuple(student_logits.shape):
        what = "vocabulary" if teacher_logits.shape[-1] != student_logits.shape[-1] else "batch/sequence"
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ in {what}: distillation compares the two "
                         "distributions position by position over one shared vocabulary (same tokenizer, same "
                         "token ids, logits[:, :-1] on both sides)")
    if cached and teacher_logits.T != T:
        raise ValueError(f"the cached teacher was made at T = {teacher_logits.T}; rebuild the cache for T = {T}")
    lead = student_logits.shape[:-1]
    if labels is not None and tuple(labels.shape) != tuple(lead):
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' leading shape {tuple(lead)}: "
                         "labels[b, t] is the token logits[b, t] should predict (shift input_ids by one)")
    mask = torch.ones(lead, dtype=torch.bool, device=student_logits.device) if labels is None else labels != ignore_index
    if not mask.any():
        raise ValueError(f"every label is ignore_index={ignore_index}: nothing to learn from")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32  # never softmax in half
    s = student_logits[mask].to(dtype)  # (n, V): only the counted positions
    ce = F.cross_entropy(s, labels[mask]) if labels is not None else None
    if teacher_logits is None:
        return ce, s.new_zeros(())
    if cached:
        log_p = teacher_logits.log_probs()[mask].to(dtype)  # (n, k + 1)
        log_q = _coarse_student(s, TopKLogits(*(t[mask] for t in (teacher_logits.values, teacher_logits.indices,
                                                                  teacher_logits.log_z)), T, teacher_logits.vocab_size), T)
    else:
        log_p = log_softmax_T(teacher_logits[mask].to(dtype), T).detach()  # the teacher is a constant
        log_q = log_softmax_T(s, T)
    return ce, T**2 * divergence(log_p, log_q, kind, skew).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor | None = None, T: float = 2.0,
            alpha: float = 0.5, kind: str = "forward", skew: float = 0.1, ignore_index: int = -100) -> torch.Tensor:
    """alpha * CE(labels, student) + (1 - alpha) * T^2 * D(teacher_T || student_T), averaged over counted tokens.

    student_logits (..., V); teacher_logits (..., V) or a TopKLogits cache; labels (...) aligned with the logits
    (labels[b, t] is the token logits[b, t] should predict; ignore_index marks padding and prompt tokens, which
    count in neither term). alpha = 1: plain CE (no teacher needed); alpha = 0: pure distillation.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha is the weight of the hard-label loss and must be in [0, 1], got {alpha!r}")
    if alpha > 0 and labels is None:
        raise ValueError(f"alpha = {alpha} weights a hard-label CE term: pass labels, or use alpha = 0")
    if alpha < 1 and teacher_logits is None:
        raise ValueError(f"alpha = {alpha} weights a distillation term: pass teacher_logits, or use alpha = 1")
    ce, soft = kd_terms(student_logits, teacher_logits, labels, T, kind, skew, ignore_index)
    if alpha == 0:
        return soft
    return ce if alpha == 1 else alpha * ce + (1 - alpha) * soft


# ----------------------------------------------------------------------------- intermediate layers (Minitron)


def make_projection(student_width: int, teacher_width: int, dtype=None, device=None) -> nn.Linear:
    """The learned map from the student's hidden width to the teacher's, shared by every layer pair (Minitron's "shared
    linear transformation"), trained along with the student. Equal widths (a depth-pruned student): the identity to
    start with, so the loss starts in the teacher's own coordinates; otherwise nn.Linear's random init. No bias.

        proj = make_projection(576, 960)   # a SmolLM2-135M student under a SmolLM2-360M teacher
    """
    proj = nn.Linear(student_width, teacher_width, bias=False, dtype=dtype, device=device)
    if student_width == teacher_width:
        nn.init.eye_(proj.weight)
    return proj


def hidden_loss(student_hidden, teacher_hidden, pairs, proj: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Minitron's intermediate-state loss: for each (student layer, teacher layer) pair, the cosine distance
    1 - cos(proj(h_student), h_teacher) at every real token, averaged over the real tokens, then over the pairs.

        loss = hidden_loss(s_out.hidden_states, t_out.hidden_states, [(4, 5), (9, 11)], proj, batch.attention_mask)

    student_hidden, teacher_hidden: the hidden states as transformers returns them with output_hidden_states=True,
    (batch, seq, width) each: [0] the embeddings, [i + 1] the output of decoder layer i (the last one after the final
    norm). pairs: [(student layer, teacher layer), ...], decoder-layer indices as in model.model.layers. proj: student
    width -> teacher width (make_projection), applied to the student. mask (batch, seq): nonzero at real tokens, 0 at
    padding (an attention_mask). The teacher's states are targets: no gradient flows into them.

    A cosine, not an MSE: SmolLM2's residual stream grows more than tenfold in norm with depth and its first token's
    state is ~100x the others' (an attention sink), so a plain MSE would be mostly about a few large states; the cosine
    weighs every token and every layer alike (NVIDIA Model Optimizer's HiddenStateCosineLoss, with which Megatron and
    NeMo run the Minitron recipe). Averaging over the pairs keeps the loss's weight meaningful whatever their number.
    """
    pairs = [(int(s), int(t)) for s, t in pairs]
    if not pairs:
        raise ValueError("pairs is empty: give at least one (student layer, teacher layer) pair")
    n_s, n_t = len(student_hidden) - 1, len(teacher_hidden) - 1  # decoder layers: hidden states hold one more
    for s, t in pairs:
        if not (0 <= s < n_s and 0 <= t < n_t):
            raise ValueError(f"pair ({s}, {t}) is out of range: the student has decoder layers 0..{n_s - 1}, the "
                             f"teacher 0..{n_t - 1} (hidden_states[i + 1] is the output of layer i)")
    lead = {tuple(mask.shape), tuple(student_hidden[0].shape[:2]), tuple(teacher_hidden[0].shape[:2])}
    if len(lead) > 1:
        raise ValueError(f"mask {tuple(mask.shape)}, student states {tuple(student_hidden[0].shape)} and teacher "
                         f"states {tuple(teacher_hidden[0].shape)} must share (batch, seq): run both on the same ids")
    keep = mask.bool()  # (batch, seq) the real tokens
    if not keep.any():
        raise ValueError("the mask keeps no token: nothing to compare")
    losses = []
    for s, t in pairs:
        h_s = proj(student_hidden[s + 1])  # (batch, seq, teacher width)
        h_t = teacher_hidden[t + 1].detach()  # (batch, seq, teacher width): a target, not trained
        dtype = torch.float64 if h_s.dtype == torch.float64 else torch.float32  # never a cosine in half precision
        cos = F.cosine_similarity(h_s.to(dtype), h_t.to(dtype), dim=-1)  # (batch, seq)
        losses.append((1 - cos)[keep].mean())  # one distance per real token, averaged
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- the student: the teacher, pruned


def validate_same_tokenizer(teacher_tok, student_tok) -> None:
    """Distillation on logits needs one vocabulary: the same token id must mean the same string on both sides."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:3]
        raise ValueError(f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens; e.g. {diff}): "
                         "logit distillation needs the same tokenizer. Pick a pair from one family (SmolLM2-360M -> "
                         "SmolLM2-135M, Qwen2.5-1.5B -> Qwen2.5-0.5B)")


@torch.no_grad()
def block_influence(model, calib: torch.Tensor, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """(n_layers,) ShortGPT's Block Influence: 1 - mean cosine(hidden in, hidden out) over calibration tokens.
    A layer that barely turns its input (BI near 0) is the cheapest to remove."""
    validate_decoder(model, "block_influence")
    inputs = layer0_inputs(model, calib, batch_size)
    scores = []
    for layer in tqdm(model.model.layers, desc="block influence", disable=not progress, leave=False):
        outputs = run_layer(layer, inputs)
        cos = torch.cat([F.cosine_similarity(h.flatten(0, 1).float(), o.flatten(0, 1).float(), dim=-1)
                         for (h, _), (o, _) in zip(inputs, outputs)])  # (tokens,)
        scores.append(1 - cos.mean().item())
        inputs = outputs
    return torch.tensor(scores)


def drop_layers(model, drop, inplace: bool = False):
    """The model without decoder layers `drop` (indices): attention layer_idx and the config renumbered."""
    validate_decoder(model, "drop_layers")
    n = len(model.model.layers)
    drop = sorted({int(i) for i in drop})
    if any(not 0 <= i < n for i in drop):
        raise ValueError(f"layer indices must be in [0, {n}), got {drop}")
    if len(drop) >= n:
        raise ValueError(f"cannot drop all {n} layers: keep at least one")
    model = model if inplace else copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in drop]
    model.model.layers = nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by it
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
    return model


def make_student(teacher, calib: torch.Tensor, n_layers: int | None = None, mlp_ratio: float = 0.0,
                 batch_size: int = 4, progress: bool = True):
    """Prune the teacher into a student initialised from its weights (Minitron's prune-then-distil):
    drop the len - n_layers layers of lowest Block Influence, then (mlp_ratio > 0) remove that fraction of MLP
    neurons with lab 04's activation-aware prune_mlp_neurons. -> (student, info {'dropped', 'influence'})."""
    from .pruning import prune_mlp_neurons

    validate_decoder(teacher, "make_student")
    n = len(teacher.model.layers)
    n_layers = n if n_layers is None else n_layers
    if not 1 <= n_layers <= n:
        raise ValueError(f"n_layers must be in [1, {n}] (the teacher has {n}), got {n_layers!r}")
    bi = block_influence(teacher, calib, batch_size, progress)
    dropped = sorted(bi.argsort()[: n - n_layers].tolist())
    student = drop_layers(teacher, dropped)
    if mlp_ratio:
        student, _ = prune_mlp_neurons(student, calib, ratio=mlp_ratio, inplace=True, progress=progress)
    return student, {"dropped": dropped, "influence": bi}


# ----------------------------------------------------------------------------- training data and the teacher cache


def _ids_key(ids: torch.Tensor) -> str:
    return f"{tuple(ids.shape)}:" + hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def cache_teacher(teacher, ids: torch.Tensor, k: int = 64, T: float = 2.0, batch_size: int = 4,
                  path: str | Path | None = None, progress: bool = True) -> TopKLogits:
    """Run the teacher once over the training windows ids (n, seq) and keep its top-k logits per position.
    With path: load it from there if it was made from the same ids, k and T; otherwise compute and save."""
    T = validate_temperature(T)
    meta = {"ids": _ids_key(ids), "k": k, "T": T}
    if path is not None and Path(path).exists():
        saved = torch.load(path, weights_only=False)
        if saved["meta"] == meta:
            return saved["cache"]
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    parts = []
    for i in tqdm(range(0, ids.shape[0], batch_size), desc=f"teacher top-{k}", disable=not progress, leave=False):
        logits = teacher(ids[i : i + batch_size].to(device), use_cache=False).logits  # (b, seq, V)
        parts.append(topk_logits(logits, k, T).to("cpu"))
    teacher.train(was_training)
    cache = TopKLogits(torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts]),
                       torch.cat([p.log_z for p in parts]), T, parts[0].vocab_size)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"meta": meta, "cache": cache}, path)
    return cache


# ----------------------------------------------------------------------------- the training loop


def distill(student, ids: torch.Tensor, teacher=None, steps: int = 100, lr: float = 1e-4, batch_size: int = 4,
            grad_accum: int = 1, T: float = 2.0, alpha: float = 0.5, kind: str = "forward", skew: float = 0.1,
            warmup: int = 0, train_embeddings: bool = False, eval_fn=None, eval_every: int = 0, seed: int = 0,
            progress: bool = True, hidden_weight: float = 0.0, pairs=None, proj: nn.Module | None = None) -> dict:
    """Train the student in place on windows ids (n, seq) with kd_loss; returns the history.

    teacher: a model (run in eval mode without gradients at every step), a TopKLogits cache of ids (cache_teacher),
    or None for alpha = 1 (plain CE fine-tuning). Each optimizer step sees batch_size * grad_accum windows, drawn with
    a seeded generator: two runs with the same seed see the same windows in the same order, whatever their loss.
    AdamW, linear warm-up then cosine decay. Embeddings (tied to lm_head in SmolLM2) stay frozen unless
    train_embeddings. eval_fn(student) -> float is called at step 0 and every eval_every steps (and at the end).
    hidden_weight > 0 adds Minitron's intermediate-state loss, hidden_weight * hidden_loss(...) over `pairs` (student
    layer, teacher layer) through `proj` (make_projection when None; its weights train with the student's), which
    needs the teacher as a model.
    history: {'step', 'loss', 'ce', 'soft', 'hidden', 'eval_step', 'eval'}.
    """
    validate_decoder(student, "distill")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha is the weight of the hard-label loss and must be in [0, 1], got {alpha!r}")
    if alpha < 1 and teacher is None:
        raise ValueError(f"alpha = {alpha} needs a teacher (a model or cache_teacher(...)); alpha = 1 is CE only")
    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError("steps, batch_size and grad_accum must be >= 1")
    cached = isinstance(teacher, TopKLogits)
    if isinstance(hidden_weight, bool) or not isinstance(hidden_weight, (int, float)) or not hidden_weight >= 0 \
            or not math.isfinite(hidden_weight):
        raise ValueError(f"hidden_weight weighs the intermediate-state loss: a number >= 0, got {hidden_weight!r}")
    if hidden_weight > 0 and (teacher is None or cached):
        raise ValueError("hidden_weight > 0 compares hidden states: pass the teacher as a model, not None or a cache")
    if hidden_weight > 0 and not pairs:
        raise ValueError("hidden_weight > 0 needs pairs, [(student layer, teacher layer), ...], to compare")
    if cached and tuple(teacher.values.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"the teacher cache covers windows {tuple(teacher.values.shape[:2])}, the training ids are "
                         f"{tuple(ids.shape)}: build it with cache_teacher(teacher, ids)")
    if teacher is not None and not cached:
        if teacher.config.vocab_size != student.config.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.config.vocab_size} != student {student.config.vocab_size}: "
                             "logit distillation needs the same tokenizer")
        teacher.eval()
    device = next(student.parameters()).device
    params = [p for n, p in student.named_parameters()  # what the caller froze stays frozen
              if p.requires_grad and (train_embeddings or ("embed_tokens" not in n and "lm_head" not in n))]
    if not params:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if hidden_weight > 0:
        if proj is None:
            proj = make_projection(student.config.hidden_size, teacher.config.hidden_size, params[0].dtype, device)
        params = params + [p for p in proj.parameters() if p.requires_grad]  # the projection learns with the student
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    g = torch.Generator().manual_seed(seed)
    hist = {"step": [], "loss": [], "ce": [], "soft": [], "hidden": [], "eval_step": [], "eval": []}
    with_hidden = {"output_hidden_states": True} if hidden_weight > 0 else {}

    def evaluate(step):
        if eval_fn is not None:
            student.eval()
            hist["eval_step"].append(step)
            hist["eval"].append(float(eval_fn(student)))
            student.train()

    student.train()
    try:
        evaluate(0)
        for step in (bar := tqdm(range(1, steps + 1), desc=f"distill {kind if alpha < 1 else 'CE'}",
                                 disable=not progress)):
            tot = {"loss": 0.0, "ce": 0.0, "soft": 0.0, "hidden": 0.0}
            for _ in range(grad_accum):
                rows = torch.randint(0, ids.shape[0], (batch_size,), generator=g)
                x = ids[rows].to(device)  # (b, seq)
                out = student(x, use_cache=False, **with_hidden)
                logits = out.logits[:, :-1]  # (b, seq-1, V): position t predicts x[t+1]
                labels = x[:, 1:]
                if teacher is None:
                    t_logits = None
                elif cached:
                    c = teacher.rows(rows).to(device)
                    t_logits = TopKLogits(c.values[:, :-1], c.indices[:, :-1], c.log_z[:, :-1], c.T, c.vocab_size)
                else:
                    with torch.no_grad():
                        t_out = teacher(x, use_cache=False, **with_hidden)
                        t_logits = t_out.logits[:, :-1]
                ce, soft = kd_terms(logits, t_logits, labels, T, kind, skew)
                loss = ce if alpha == 1 else alpha * ce + (1 - alpha) * soft
                hidden = soft.new_zeros(())
                if hidden_weight > 0:  # every token of a training window is real: the mask is all ones
                    hidden = hidden_loss(out.hidden_states, t_out.hidden_states, pairs, proj, torch.ones_like(x))
                    loss = loss + hidden_weight * hidden
                (loss / grad_accum).backward()
                for key, v in (("loss", loss), ("ce", ce), ("soft", soft), ("hidden", hidden)):
                    tot[key] += v.item() / grad_accum
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            hist["step"].append(step)
            for key, v in tot.items():
                hist[key].append(v)
            bar.set_postfix(loss=f"{tot['loss']:.3f}", ce=f"{tot['ce']:.3f}")
            if eval_every and (step % eval_every == 0) and step != steps:
                evaluate(step)
        evaluate(steps)
    finally:
        student.eval()
        for p, req in frozen.items():
            p.requires_grad_(req)
    return hist
