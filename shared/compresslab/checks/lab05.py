"""Lab 05 · knowledge distillation: the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab05.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import distill
from . import Case, run_adapted, run_check


def _logit_pair(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits of one shape that disagree, so every divergence and direction differs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


def check_softmax_T(fn: Callable) -> Callable:
    """Exercise: fn(logits, T) -> softmax of logits / T over the last dimension."""
    g = torch.Generator().manual_seed(40)
    z = torch.randn(3, 7, generator=g) * 2
    cases = [Case("T = 1 (the plain softmax)", (z, 1.0)),
             Case("T = 2 (divide the logits by T: flatter)", (z, 2.0)),
             Case("T = 0.5 (sharper)", (z, 0.5)),
             Case("T = 4 given as an int", (z, 4)),
             Case("(2, 3, 5) logits: softmax over the LAST dim (the vocabulary)", (torch.randn(2, 3, 5, generator=g), 2.0)),
             Case("logits near 1000, T = 1 (exp overflows unless you subtract the max or use torch.softmax)",
                  (z * 10 + 1000, 1.0)),
             Case("logits near 1000, T = 0.5 (overflow once divided by T)", (z * 10 + 1000, 0.5))]
    return run_check("Exercise 1 · softmax_T", fn, distill.softmax_T, cases, atol=1e-4,
                     hint="torch.softmax(logits / T, dim=-1): divide (not multiply) by T, normalise over the vocabulary "
                          "axis, and let torch subtract the max so large logits do not overflow.",
                     more="z = logits / T, then return torch.softmax(z, dim=-1). By hand: e = torch.exp(z - "
                          "z.amax(dim=-1, keepdim=True)); e / e.sum(dim=-1, keepdim=True), the max taken AFTER "
                          "dividing by T, per row (keepdim), and the sum per row too.")


def _soft_forward(student_logits, teacher_logits, T):
    return distill.kd_loss(student_logits, teacher_logits, None, T, alpha=0.0, kind="forward")


def _soft_reverse(student_logits, teacher_logits, T):
    return distill.kd_loss(student_logits, teacher_logits, None, T, alpha=0.0, kind="reverse")


def _kd_cases(seed: int) -> list[Case]:
    cases = []
    for shape, T in (((2, 3, 9), 1.0), ((2, 3, 9), 2.0), ((1, 4, 6), 4.0), ((3, 1, 11), 2.0), ((5, 9), 2.0)):
        s, t = _logit_pair(shape, seed + len(cases))
        label = f"logits {shape}, T = {T}" + (" (2-D: positions x vocabulary, as the lab calls it later)"
                                              if len(shape) == 2 else "")
        cases.append(Case(label, (s.requires_grad_(True), t, T)))  # the loss must keep the student's gradient
    return cases


def check_soft_loss(fn: Callable) -> Callable:
    """Exercise: fn(student_logits, teacher_logits, T) -> T^2 * mean over positions of KL(p_teacher,T || q_student,T)."""
    return run_check("Exercise 2 · soft_loss", fn, _soft_forward, _kd_cases(41), atol=1e-5, rtol=1e-5,
                     hint="p = softmax(teacher / T), log_q = log_softmax(student / T) over the vocabulary; KL = "
                          "sum_v p (log p - log_q) for each position; average over positions (every leading dim: batch AND sequence, "
                          "not over the vocabulary) and multiply by T**2.",
                     more="log_q = torch.log_softmax(student_logits / T, dim=-1); log_p = "
                          "torch.log_softmax(teacher_logits / T, dim=-1); kl = (log_p.exp() * (log_p - log_q)).sum(-1) "
                          "has one value per position; return T**2 * kl.mean(). F.kl_div(log_q, p, "
                          "reduction='batchmean') divides by the FIRST dim only: flatten the positions first, or avoid "
                          "it.")


def check_reverse_kl(fn: Callable) -> Callable:
    """Exercise: fn(student_logits, teacher_logits, T) -> T^2 * mean over positions of KL(q_student,T || p_teacher,T)."""
    return run_check("Exercise 3 · reverse_kl", fn, _soft_reverse, _kd_cases(51), atol=1e-5, rtol=1e-5,
                     hint="the same as exercise 2 with the roles swapped: weight by the STUDENT's probabilities, "
                          "sum_v q (log q - log p); still per position, averaged, times T**2.",
                     more="with exercise 2's log_q and log_p: return T**2 * (log_q.exp() * (log_q - "
                          "log_p)).sum(-1).mean(). Or call soft_loss(teacher_logits, student_logits, T): exercise 2 "
                          "with the arguments exchanged.")


def check_kd_loss(fn: Callable) -> Callable:
    """Exercise: fn(student_logits, teacher_logits, labels, T, alpha) -> alpha * CE + (1 - alpha) * T^2 * forward KL,
    both averaged over the positions whose label is not -100."""
    cases = []
    for shape, T, alpha, n_ignored in (((2, 5, 8), 2.0, 0.5, 3), ((2, 5, 8), 1.0, 0.3, 4), ((1, 6, 7), 4.0, 0.0, 2),
                                       ((1, 6, 7), 2.0, 1.0, 2), ((3, 2, 10), 2.0, 0.7, 0)):
        s, t = _logit_pair(shape, 60 + len(cases))
        g = torch.Generator().manual_seed(70 + len(cases))
        labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
        labels.view(-1)[torch.randperm(labels.numel(), generator=g)[:n_ignored]] = -100
        cases.append(Case(f"logits {shape}, T = {T}, alpha = {alpha}, {n_ignored} labels are -100",
                          (s.requires_grad_(True), t, labels, T, alpha)))
    return run_check("Exercise 4 · kd_loss", fn, distill.kd_loss, cases, atol=1e-5, rtol=1e-5,
                     hint="mask = labels != -100; keep only those positions (logits[mask] is (n, V)) for BOTH terms; "
                          "CE = cross_entropy(student[mask], labels[mask]); soft = T**2 * mean KL(teacher_T || "
                          "student_T) over the same positions; return alpha * CE + (1 - alpha) * soft.",
                     more="keep = labels != -100; s, t = student_logits[keep], teacher_logits[keep] (both (n, V)); "
                          "ce = F.cross_entropy(s, labels[keep]); return alpha * ce + (1 - alpha) * "
                          "soft_loss(s, t, T): exercise 2 on the kept rows is the masked mean, and the CE stays at "
                          "T = 1.")


def _hidden_states(g: torch.Generator, n_layers: int, batch: int, seq: int, width: int) -> tuple[torch.Tensor, ...]:
    """A fake output_hidden_states tuple: n_layers + 1 random (batch, seq, width) states."""
    return tuple(torch.randn(batch, seq, width, generator=g) for _ in range(n_layers + 1))


def _hidden_case(seed: int, student_layers: int, teacher_layers: int, widths: tuple[int, int], pairs, lengths,
                 seq: int, left_padded: bool = False, teacher_graph: bool = False) -> tuple:
    """(student_hidden, teacher_hidden, pairs, proj, mask): the student's states need a gradient, the projection is
    a random (never the identity) student width -> teacher width map, and mask is an int64 attention_mask with
    lengths[b] real tokens in sequence b (at the end when left_padded)."""
    g = torch.Generator().manual_seed(seed)
    d_s, d_t = widths
    student = tuple(h.requires_grad_(True) for h in _hidden_states(g, student_layers, len(lengths), seq, d_s))
    teacher = _hidden_states(g, teacher_layers, len(lengths), seq, d_t)
    if teacher_graph:  # as if the teacher had run without torch.no_grad()
        teacher = tuple(h.requires_grad_(True) for h in teacher)
    proj = torch.nn.Linear(d_s, d_t, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(d_t, d_s, generator=g) / d_s**0.5)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        (mask[b, seq - n:] if left_padded else mask[b, :n]).fill_(1)  # the real tokens
    return student, teacher, list(pairs), proj, mask


def _hidden_loss_and_grads(out, student_hidden, teacher_hidden, pairs, proj, mask) -> tuple[torch.Tensor, ...]:
    """(loss, d loss / d student states, d loss / d projection): a loss must reach the student and the projection,
    and not the teacher."""
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise TypeError(f"return the loss as one scalar tensor, got {type(out).__name__}"
                        + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""))
    if not out.requires_grad:
        raise ValueError("the loss carries no gradient: it must stay connected to the student's hidden states and the "
                         "projection (no torch.no_grad(), .detach() or .item() on their way)")
    teacher = [h for h in teacher_hidden if h.requires_grad]
    weights = list(proj.parameters())
    grads = torch.autograd.grad(out, [*student_hidden, *weights, *teacher], allow_unused=True)
    g_student, g_weights, g_teacher = (grads[: len(student_hidden)], grads[len(student_hidden):][: len(weights)],
                                       grads[len(student_hidden) + len(weights):])
    if any(g is not None and g.abs().sum() > 0 for g in g_teacher):
        raise ValueError("the gradient flows into the teacher's hidden states: they are the targets, not trained; "
                         "detach them (teacher_hidden[...].detach())")
    if all(g is None or not g.abs().sum() > 0 for g in g_student):
        raise ValueError("no gradient reaches the student's hidden states: the student would learn nothing from this "
                         "loss (is the student's state detached, or the teacher's projected instead?)")
    if any(g is None for g in g_weights):
        raise ValueError("no gradient reaches the projection's weights: proj is learned, apply it to the student's "
                         "states as a module (proj(h), not under torch.no_grad() or through .data / .detach())")
    g_student = torch.stack([torch.zeros_like(h) if g is None else g for h, g in zip(student_hidden, g_student)])
    return (out.detach().reshape(()), g_student, *g_weights)


def check_hidden_loss(fn: Callable) -> Callable:
    """Exercise: fn(student_hidden, teacher_hidden, pairs, proj, mask) -> the mean over (student layer, teacher layer)
    pairs of the mean over real tokens of 1 - cos(proj(student_hidden[s + 1]), teacher_hidden[t + 1]); checked on its
    value and on its gradients (student states and projection: the same; the teacher's: none)."""
    cases = [
        Case("widths 6 -> 6, one pair (1, 2), no padding (hidden_states[0] is the embeddings: layer i is [i + 1])",
             _hidden_case(80, 3, 4, (6, 6), [(1, 2)], (5, 5), seq=5)),
        Case("two pairs (0, 1) and (2, 4), the second sequence padded after 2 tokens (mask 0: not counted)",
             _hidden_case(81, 3, 5, (6, 6), [(0, 1), (2, 4)], (5, 2), seq=5)),
        Case("student width 4, teacher width 8: the projection maps the STUDENT's states to the teacher's width",
             _hidden_case(82, 2, 3, (4, 8), [(0, 1), (1, 2)], (4, 4), seq=4)),
        Case("batch 3, left padding, 6 / 1 / 3 real tokens, three pairs: every real token weighs the same",
             _hidden_case(83, 4, 6, (5, 7), [(1, 2), (2, 3), (3, 5)], (6, 1, 3), seq=6, left_padded=True)),
        Case("teacher states that still carry a graph (a teacher run without torch.no_grad): no gradient into them",
             _hidden_case(84, 2, 4, (6, 6), [(0, 1), (1, 3)], (4, 3), seq=4, teacher_graph=True)),
    ]
    return run_adapted(
        "Exercise 5 · hidden_loss", fn, distill.hidden_loss, _hidden_loss_and_grads, cases, atol=1e-5, rtol=1e-5,
        hint="for each pair (s, t): the student's state after decoder layer s is student_hidden[s + 1] (entry 0 is the "
             "embeddings), likewise the teacher's; project the STUDENT's state with proj, detach the teacher's; "
             "1 - cosine over the width (dim=-1) is one distance per token; average it over the tokens whose mask is "
             "1 (all sequences together, padding left out), then average (not sum) over the pairs.",
        more="keep = mask.bool() (an int mask used as an index picks rows 0 and 1 instead); for s, t in pairs: "
             "d = 1 - F.cosine_similarity(proj(student_hidden[s + 1]), teacher_hidden[t + 1].detach(), dim=-1), "
             "shape (batch, seq); losses.append(d[keep].mean()); finally return torch.stack(losses).mean().")
