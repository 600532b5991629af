"""Lab 05 · knowledge distillation: the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab05.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import distill
from . import Case, run_check


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
                          "axis, and let torch subtract the max so large logits do not overflow.")


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
                          "not over the vocabulary) and multiply by T**2.")


def check_reverse_kl(fn: Callable) -> Callable:
    """Exercise: fn(student_logits, teacher_logits, T) -> T^2 * mean over positions of KL(q_student,T || p_teacher,T)."""
    return run_check("Exercise 3 · reverse_kl", fn, _soft_reverse, _kd_cases(51), atol=1e-5, rtol=1e-5,
                     hint="the same as exercise 2 with the roles swapped: weight by the STUDENT's probabilities, "
                          "sum_v q (log q - log p); still per position, averaged, times T**2.")


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
                          "student_T) over the same positions; return alpha * CE + (1 - alpha) * soft.")
