"""The lab 05 (knowledge distillation) checkers: the solution passes, a skipped exercise is "not done", and wrong
answers fail.

Same structure as tests/test_checks_lab04.py. Every wrong implementation below was run against the checker's cases and
is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded: the checkers only run small fixed tensors.
"""

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checker_testing import (CheckerSuite, assert_failed, summary_lines)

from compresslab import checks

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "05_knowledge_distillation.py"

SOFTMAX_T = "Exercise 1 · softmax_T"
SOFT_LOSS = "Exercise 2 · soft_loss"
REVERSE_KL = "Exercise 3 · reverse_kl"
KD_LOSS = "Exercise 4 · kd_loss"
HIDDEN_LOSS = "Exercise 5 · hidden_loss"

# one torch thread for the module (tiny tensors); every test starts and ends with an empty exercise table
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/05_knowledge_distillation.py (### BEGIN / END SOLUTION);
# test_good_copies_match_the_lab_solutions keeps them in sync. good_kd_loss calls good_soft_loss where the lab calls
# soft_loss: the comparison renames good_<name> to <name>.


def good_softmax_T(logits: torch.Tensor, T: float) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) at temperature T."""
    return torch.softmax(logits / T, dim=-1)


def good_soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)). Logits (..., V) -> scalar."""
    log_q = torch.log_softmax(student_logits / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits / T, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...,) one KL per position
    return T**2 * kl.mean()


def good_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(student / T) || softmax(teacher / T))."""
    log_q = torch.log_softmax(student_logits / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits / T, dim=-1)
    return T**2 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def good_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, T: float,
                 alpha: float) -> torch.Tensor:
    """alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T), over labels != -100 only."""
    keep = labels != -100  # (...) the counted positions
    s, t = student_logits[keep], teacher_logits[keep]  # (n, V)
    ce = F.cross_entropy(s, labels[keep])
    return alpha * ce + (1 - alpha) * good_soft_loss(s, t, T)


def good_hidden_loss(student_hidden, teacher_hidden, pairs, proj, mask) -> torch.Tensor:
    """Mean over the pairs (s, t) of the mean over real tokens of 1 - cos(proj(student state s), teacher state t)."""
    keep = mask.bool()  # (batch, seq) the real tokens; an int mask as an index would pick rows 0 and 1
    losses = []
    for s, t in pairs:
        h_s = proj(student_hidden[s + 1])  # (batch, seq, teacher width): entry 0 is the embeddings
        h_t = teacher_hidden[t + 1].detach()  # the teacher is the target: no gradient into it
        dist = 1 - F.cosine_similarity(h_s, h_t, dim=-1)  # (batch, seq) one distance per token
        losses.append(dist[keep].mean())
    return torch.stack(losses).mean()


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_softmax_T: (SOFTMAX_T, good_softmax_T, "softmax_T"),
    checks.check_soft_loss: (SOFT_LOSS, good_soft_loss, "soft_loss"),
    checks.check_reverse_kl: (REVERSE_KL, good_reverse_kl, "reverse_kl"),
    checks.check_kd_loss: (KD_LOSS, good_kd_loss, "kd_loss"),
    checks.check_hidden_loss: (HIDDEN_LOSS, good_hidden_loss, "hidden_loss"),
}


def _log_probs(student_logits, teacher_logits, T):
    """(log_q, log_p): the student's and the teacher's log-probabilities at T, stably."""
    return torch.log_softmax(student_logits / T, dim=-1), torch.log_softmax(teacher_logits / T, dim=-1)


def _forward_kl(log_p, log_q):  # (...,) KL(p || q) per position
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def st_no_temperature(logits, T):  # the plain softmax: T is ignored
    return torch.softmax(logits, dim=-1)


def st_multiplies(logits, T):  # logits * T: T > 1 sharpens instead of flattening
    return torch.softmax(logits * T, dim=-1)


def st_T_squared(logits, T):  # logits / T**2 (the T^2 of the loss, misplaced)
    return torch.softmax(logits / T**2, dim=-1)


def st_dim0(logits, T):  # normalised over the rows (positions), not over the vocabulary
    return torch.softmax(logits / T, dim=0)


def st_dim1(logits, T):  # dim=1 is the vocabulary only for 2-D logits: (batch, seq, V) is normalised over seq
    return torch.softmax(logits / T, dim=1)


def st_naive_exp(logits, T):  # exp(z / T) / sum: exp(1000) is inf in float32, inf / inf is NaN
    e = torch.exp(logits / T)
    return e / e.sum(-1, keepdim=True)


def st_log_softmax(logits, T):  # log-probabilities, not probabilities
    return torch.log_softmax(logits / T, dim=-1)


def st_softmax_then_divide(logits, T):  # softmax(z) / T: the temperature applied after normalising
    return torch.softmax(logits, dim=-1) / T


def st_one_sum_for_all(logits, T):  # e.sum() without dim: one normaliser for the whole tensor, rows do not sum to 1
    z = logits / T
    e = torch.exp(z - z.amax(-1, keepdim=True))
    return e / e.sum()


def st_max_before_dividing(logits, T):  # the max is subtracted from z, not z / T: overflows again once T < 1
    e = torch.exp(logits / T - logits.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def sl_flattens_3d_only(student_logits, teacher_logits, T):  # assumes (B, S, V): breaks on the lab's (n, V) calls
    B, S, V = student_logits.shape
    return good_soft_loss(student_logits.view(B * S, V), teacher_logits.view(B * S, V), T)


def sl_no_grad(student_logits, teacher_logits, T):  # the right number, but nothing to backpropagate
    with torch.no_grad():
        return good_soft_loss(student_logits, teacher_logits, T)


def rk_detached_student(student_logits, teacher_logits, T):
    return good_reverse_kl(student_logits.detach(), teacher_logits, T)


WRONG_SOFTMAX_T = [
    (st_max_before_dividing, "T = 0.5 (overflow once divided by T)"),  # (wrong function, a fragment of the failure message it must produce, or None)
    (st_no_temperature, "T = 2 (divide the logits by T: flatter)"),
    (st_multiplies, "T = 2"),
    (st_T_squared, "T = 2"),
    (st_dim0, "T = 1 (the plain softmax)"),
    (st_dim1, "(2, 3, 5) logits: softmax over the LAST dim"),  # right for 2-D logits
    (st_naive_exp, "NaN or inf"),
    (st_log_softmax, None),
    (st_softmax_then_divide, "T = 2"),
    (st_one_sum_for_all, None),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 2


def sl_no_T_squared(student_logits, teacher_logits, T):  # the KL at T without the T^2 factor
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return _forward_kl(log_p, log_q).mean()


def sl_times_T(student_logits, teacher_logits, T):  # T * KL: the gradient still shrinks as 1/T
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T * _forward_kl(log_p, log_q).mean()


def sl_divides_by_T_squared(student_logits, teacher_logits, T):  # KL / T^2: undoes the wrong way
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return _forward_kl(log_p, log_q).mean() / T**2


def sl_reverse(student_logits, teacher_logits, T):  # KL(q || p): weighted by the student
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * _forward_kl(log_q, log_p).mean()


def sl_sum_over_positions(student_logits, teacher_logits, T):  # summed over positions: grows with batch and length
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * _forward_kl(log_p, log_q).sum()


def sl_mean_over_everything(student_logits, teacher_logits, T):  # mean of the (…, V) terms: also divides by V
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * (log_p.exp() * (log_p - log_q)).mean()


def sl_kl_div_mean(student_logits, teacher_logits, T):  # F.kl_div's reduction="mean" averages over V too
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    with warnings.catch_warnings():  # torch warns about exactly this mistake
        warnings.simplefilter("ignore", UserWarning)
        return T**2 * F.kl_div(log_q, log_p.exp(), reduction="mean")


def sl_kl_div_batchmean_3d(student_logits, teacher_logits, T):  # "batchmean" on (batch, seq, V) divides by batch only
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * F.kl_div(log_q, log_p.exp(), reduction="batchmean")


def sl_kl_div_swapped(student_logits, teacher_logits, T):  # teacher log-probs as kl_div's input: KL(q || p)
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    V = log_q.shape[-1]
    return T**2 * F.kl_div(log_p.reshape(-1, V), log_q.exp().reshape(-1, V), reduction="batchmean")


def sl_kl_div_without_log_target(student_logits, teacher_logits, T):  # log_p as target, but log_target=False
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    V = log_q.shape[-1]
    return T**2 * F.kl_div(log_q.reshape(-1, V), log_p.reshape(-1, V), reduction="batchmean")


def sl_student_only_tempered(student_logits, teacher_logits, T):  # the teacher stays at T = 1
    log_q = torch.log_softmax(student_logits / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    return T**2 * _forward_kl(log_p, log_q).mean()


def sl_cross_entropy(student_logits, teacher_logits, T):  # H(p, q) = KL + H(p): the teacher's entropy is left in
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * -(log_p.exp() * log_q).sum(-1).mean()


def sl_item(student_logits, teacher_logits, T):  # .item(): a Python float, nothing to backpropagate through
    return good_soft_loss(student_logits, teacher_logits, T).item()


WRONG_SOFT_LOSS = [
    (sl_flattens_3d_only, "not enough values to unpack"),
    (sl_no_grad, "no gradient"),
    (sl_no_T_squared, "T = 2.0"),  # T = 1 (the first case) cannot tell
    (sl_times_T, "T = 2.0"),
    (sl_divides_by_T_squared, "T = 2.0"),
    (sl_reverse, None),
    (sl_sum_over_positions, None),
    (sl_mean_over_everything, None),
    (sl_kl_div_mean, None),
    (sl_kl_div_batchmean_3d, "(2, 3, 9)"),  # right where seq = 1: the (3, 1, 11) case alone would not tell
    (sl_kl_div_swapped, None),
    (sl_kl_div_without_log_target, None),
    (sl_student_only_tempered, "T = 2.0"),
    (sl_cross_entropy, None),
    (sl_item, "expected a torch.Tensor, got float"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 3


def rk_forward(student_logits, teacher_logits, T):  # KL(p || q): exercise 2 again
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * _forward_kl(log_p, log_q).mean()


def rk_no_T_squared(student_logits, teacher_logits, T):
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return _forward_kl(log_q, log_p).mean()


def rk_sum_over_positions(student_logits, teacher_logits, T):
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * _forward_kl(log_q, log_p).sum()


def rk_teacher_weights(student_logits, teacher_logits, T):  # sum p (log q - log p): the order swapped, weights not
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)  # = -KL(p || q), negative
    return T**2 * (log_p.exp() * (log_q - log_p)).sum(-1).mean()


def rk_kl_div_student_input(student_logits, teacher_logits, T):  # F.kl_div(log_q, p) is KL(p || q), the forward one
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    V = log_q.shape[-1]
    return T**2 * F.kl_div(log_q.reshape(-1, V), log_p.exp().reshape(-1, V), reduction="batchmean")


def rk_kl_div_batchmean_3d(student_logits, teacher_logits, T):  # the right direction, divided by the batch size only
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def rk_student_only_tempered(student_logits, teacher_logits, T):
    log_q = torch.log_softmax(student_logits / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    return T**2 * _forward_kl(log_q, log_p).mean()


def rk_negative_entropy_missing(student_logits, teacher_logits, T):  # -sum q log p: the student's entropy left in
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * -(log_q.exp() * log_p).sum(-1).mean()


WRONG_REVERSE_KL = [
    (rk_detached_student, "no gradient"),
    (rk_forward, None),
    (rk_no_T_squared, "T = 2.0"),
    (rk_sum_over_positions, None),
    (rk_teacher_weights, None),
    (rk_kl_div_student_input, None),
    (rk_kl_div_batchmean_3d, "(2, 3, 9)"),
    (rk_student_only_tempered, "T = 2.0"),
    (rk_negative_entropy_missing, None),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 4


def kd_kl_over_all_positions(student_logits, teacher_logits, labels, T, alpha):  # only the CE term is masked
    keep = labels != -100
    ce = F.cross_entropy(student_logits[keep], labels[keep])
    return alpha * ce + (1 - alpha) * good_soft_loss(student_logits, teacher_logits, T)


def kd_ignore_index_only(student_logits, teacher_logits, labels, T, alpha):  # CE's ignore_index, no mask for the KL
    V = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    return alpha * ce + (1 - alpha) * good_soft_loss(student_logits, teacher_logits, T)


def kd_alpha_swapped(student_logits, teacher_logits, labels, T, alpha):  # alpha weights the soft term
    keep = labels != -100
    s, t = student_logits[keep], teacher_logits[keep]
    return (1 - alpha) * F.cross_entropy(s, labels[keep]) + alpha * good_soft_loss(s, t, T)


def kd_no_one_minus_alpha(student_logits, teacher_logits, labels, T, alpha):  # the soft term is not weighted
    keep = labels != -100
    s, t = student_logits[keep], teacher_logits[keep]
    return alpha * F.cross_entropy(s, labels[keep]) + good_soft_loss(s, t, T)


def kd_soft_without_T_squared(student_logits, teacher_logits, labels, T, alpha):
    keep = labels != -100
    s, t = student_logits[keep], teacher_logits[keep]
    return alpha * F.cross_entropy(s, labels[keep]) + (1 - alpha) * good_soft_loss(s, t, T) / T**2


def kd_ce_at_T(student_logits, teacher_logits, labels, T, alpha):  # the hard loss on the softened student
    keep = labels != -100
    s, t = student_logits[keep], teacher_logits[keep]
    return alpha * F.cross_entropy(s / T, labels[keep]) + (1 - alpha) * good_soft_loss(s, t, T)


def kd_kl_over_total_count(student_logits, teacher_logits, labels, T, alpha):  # masked sum / ALL positions
    keep = labels != -100
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    soft = T**2 * (_forward_kl(log_p, log_q) * keep).sum() / keep.numel()
    return alpha * F.cross_entropy(student_logits[keep], labels[keep]) + (1 - alpha) * soft


def kd_zeroed_logits(student_logits, teacher_logits, labels, T, alpha):  # ignored positions zeroed, not dropped:
    keep = labels != -100  # their KL is 0, but they still count in the mean
    V = student_logits.shape[-1]
    s, t = student_logits * keep[..., None], teacher_logits * keep[..., None]
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1))
    return alpha * ce + (1 - alpha) * good_soft_loss(s, t, T)


def kd_per_sequence_mean(student_logits, teacher_logits, labels, T, alpha):  # KL averaged per sequence, then over
    keep = labels != -100  # sequences: a sequence with few counted tokens weighs as much as a full one
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    kl = _forward_kl(log_p, log_q) * keep  # (batch, seq)
    soft = T**2 * (kl.sum(-1) / keep.sum(-1)).mean()
    return alpha * F.cross_entropy(student_logits[keep], labels[keep]) + (1 - alpha) * soft


def kd_reverse(student_logits, teacher_logits, labels, T, alpha):  # KL(q || p) in the soft term
    keep = labels != -100
    s, t = student_logits[keep], teacher_logits[keep]
    return alpha * F.cross_entropy(s, labels[keep]) + (1 - alpha) * good_reverse_kl(s, t, T)


def kd_positive_labels(student_logits, teacher_logits, labels, T, alpha):  # labels > 0 also drops token id 0
    keep = labels > 0
    s, t = student_logits[keep], teacher_logits[keep]
    return alpha * F.cross_entropy(s, labels[keep]) + (1 - alpha) * good_soft_loss(s, t, T)


WRONG_KD_LOSS = [
    (kd_kl_over_all_positions, "3 labels are -100"),
    (kd_ignore_index_only, "3 labels are -100"),
    (kd_alpha_swapped, "alpha = 0.3"),  # alpha = 0.5 (the first case) cannot tell
    (kd_no_one_minus_alpha, None),
    (kd_soft_without_T_squared, "T = 2.0"),
    (kd_ce_at_T, "T = 2.0, alpha = 0.5"),
    (kd_kl_over_total_count, "3 labels are -100"),
    (kd_zeroed_logits, "3 labels are -100"),
    (kd_per_sequence_mean, "3 labels are -100"),
    (kd_reverse, None),
    (kd_positive_labels, None),
]



# ----------------------------------------------------------------------------- wrong answers: exercise 5


def _distances(student_hidden, teacher_hidden, pairs, proj):  # (pairs, batch, seq) 1 - cos, the right way
    return torch.stack([1 - F.cosine_similarity(proj(student_hidden[s + 1]), teacher_hidden[t + 1].detach(), dim=-1)
                        for s, t in pairs])


def hl_no_embedding_offset(student_hidden, teacher_hidden, pairs, proj, mask):  # hidden_states[s] is the INPUT of
    keep = mask.bool()  # layer s (entry 0 is the embeddings): every pair compares the layer before
    return torch.stack([(1 - F.cosine_similarity(proj(student_hidden[s]), teacher_hidden[t].detach(), dim=-1))[keep]
                        .mean() for s, t in pairs]).mean()


def hl_teacher_offset_only(student_hidden, teacher_hidden, pairs, proj, mask):  # the +1 on one side only
    keep = mask.bool()
    return torch.stack([(1 - F.cosine_similarity(proj(student_hidden[s + 1]), teacher_hidden[t].detach(), dim=-1))
                        [keep].mean() for s, t in pairs]).mean()


def hl_mask_ignored(student_hidden, teacher_hidden, pairs, proj, mask):  # padding tokens counted
    return _distances(student_hidden, teacher_hidden, pairs, proj).mean()


def hl_masked_sum_over_all(student_hidden, teacher_hidden, pairs, proj, mask):  # padding zeroed, but still in the count
    return (_distances(student_hidden, teacher_hidden, pairs, proj) * mask).mean()


def hl_per_sequence_mean(student_hidden, teacher_hidden, pairs, proj, mask):  # a 1-token sequence weighs as much as
    d = _distances(student_hidden, teacher_hidden, pairs, proj) * mask  # a full one
    return (d.sum(-1) / mask.sum(-1)).mean()


def hl_int_mask_index(student_hidden, teacher_hidden, pairs, proj, mask):  # d[mask] with the int64 attention_mask:
    d = _distances(student_hidden, teacher_hidden, pairs, proj)  # integer indexing, rows 0 and 1, not a selection
    return torch.stack([dist[mask].mean() for dist in d]).mean()


def hl_sum_over_pairs(student_hidden, teacher_hidden, pairs, proj, mask):  # grows with the number of pairs
    return _distances(student_hidden, teacher_hidden, pairs, proj)[:, mask.bool()].mean(-1).sum()


def hl_sum_over_tokens(student_hidden, teacher_hidden, pairs, proj, mask):  # grows with batch and length
    return _distances(student_hidden, teacher_hidden, pairs, proj)[:, mask.bool()].sum(-1).mean()


def hl_teacher_not_detached(student_hidden, teacher_hidden, pairs, proj, mask):  # the right value, but a gradient
    keep = mask.bool()  # into the teacher
    return torch.stack([(1 - F.cosine_similarity(proj(student_hidden[s + 1]), teacher_hidden[t + 1], dim=-1))[keep]
                        .mean() for s, t in pairs]).mean()


def hl_projects_teacher(student_hidden, teacher_hidden, pairs, proj, mask):  # proj on the wrong side: only works (and
    keep = mask.bool()  # wrongly) when the widths match
    return torch.stack([(1 - F.cosine_similarity(student_hidden[s + 1], proj(teacher_hidden[t + 1].detach()), dim=-1))
                        [keep].mean() for s, t in pairs]).mean()


def hl_no_projection(student_hidden, teacher_hidden, pairs, proj, mask):  # "the widths match, skip it"
    keep = mask.bool()
    return torch.stack([(1 - F.cosine_similarity(student_hidden[s + 1], teacher_hidden[t + 1].detach(), dim=-1))[keep]
                        .mean() for s, t in pairs]).mean()


def hl_frozen_projection(student_hidden, teacher_hidden, pairs, proj, mask):  # proj.weight.detach(): the right value,
    keep = mask.bool()  # but the projection never learns
    return torch.stack([(1 - F.cosine_similarity(F.linear(student_hidden[s + 1], proj.weight.detach()),
                                                 teacher_hidden[t + 1].detach(), dim=-1))[keep].mean()
                        for s, t in pairs]).mean()


def hl_student_detached(student_hidden, teacher_hidden, pairs, proj, mask):  # only the projection would learn
    keep = mask.bool()
    return torch.stack([(1 - F.cosine_similarity(proj(student_hidden[s + 1].detach()), teacher_hidden[t + 1].detach(),
                                                 dim=-1))[keep].mean() for s, t in pairs]).mean()


def hl_similarity_not_distance(student_hidden, teacher_hidden, pairs, proj, mask):  # cos itself: minimising it pushes
    keep = mask.bool()  # the student AWAY from the teacher
    return torch.stack([F.cosine_similarity(proj(student_hidden[s + 1]), teacher_hidden[t + 1].detach(), dim=-1)[keep]
                        .mean() for s, t in pairs]).mean()


def hl_mse(student_hidden, teacher_hidden, pairs, proj, mask):  # a plain MSE: not the loss the exercise asks for
    keep = mask.bool()
    return torch.stack([F.mse_loss(proj(student_hidden[s + 1])[keep], teacher_hidden[t + 1].detach()[keep])
                        for s, t in pairs]).mean()


def hl_pairs_read_backwards(student_hidden, teacher_hidden, pairs, proj, mask):  # (teacher, student) order
    keep = mask.bool()
    return torch.stack([(1 - F.cosine_similarity(proj(student_hidden[s + 1]), teacher_hidden[t + 1].detach(), dim=-1))
                        [keep].mean() for t, s in pairs]).mean()


WRONG_HIDDEN_LOSS = [
    (hl_no_embedding_offset, "one pair (1, 2)"),
    (hl_teacher_offset_only, "one pair (1, 2)"),
    (hl_mask_ignored, "padded after 2 tokens"),
    (hl_masked_sum_over_all, "padded after 2 tokens"),
    (hl_per_sequence_mean, "padded after 2 tokens"),
    (hl_int_mask_index, "one pair (1, 2)"),  # a mask of ones as an index repeats row 1
    (hl_sum_over_pairs, "two pairs"),  # one pair (the first case) cannot tell
    (hl_sum_over_tokens, "one pair (1, 2)"),
    (hl_teacher_not_detached, "gradient flows into the teacher"),  # the same value: only the gradient tells
    (hl_projects_teacher, "one pair (1, 2)"),
    (hl_no_projection, "no gradient reaches the projection"),
    (hl_frozen_projection, "no gradient reaches the projection"),
    (hl_student_detached, "no gradient reaches the student"),
    (hl_similarity_not_distance, "one pair (1, 2)"),
    (hl_mse, "one pair (1, 2)"),
    (hl_pairs_read_backwards, "one pair (1, 2)"),
]

WRONG = [(checks.check_softmax_T, SOFTMAX_T, fn, msg) for fn, msg in WRONG_SOFTMAX_T]
WRONG += [(checks.check_soft_loss, SOFT_LOSS, fn, msg) for fn, msg in WRONG_SOFT_LOSS]
WRONG += [(checks.check_reverse_kl, REVERSE_KL, fn, msg) for fn, msg in WRONG_REVERSE_KL]
WRONG += [(checks.check_kd_loss, KD_LOSS, fn, msg) for fn, msg in WRONG_KD_LOSS]
WRONG += [(checks.check_hidden_loss, HIDDEN_LOSS, fn, msg) for fn, msg in WRONG_HIDDEN_LOSS]


# ----------------------------------------------------------------------------- correct alternatives


def alt_softmax_exp_minus_max(logits, T):  # exp(z/T - max) normalised: the max subtracted per row, after dividing
    z = logits / T
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def alt_softmax_exp_log_softmax(logits, T):  # exp of the stable log-softmax
    return torch.log_softmax(logits.div(T), dim=logits.dim() - 1).exp()


def alt_softmax_logsumexp(logits, T):  # exp(z/T - logsumexp(z/T)), shifted by the max first
    z = logits / float(T)
    z = z - z.amax(dim=-1, keepdim=True)
    return torch.exp(z - torch.logsumexp(z, dim=-1, keepdim=True))


def alt_softmax_logsumexp_unshifted(logits, T):
    """Without the shift, z - logsumexp(z) near 1000 rounds to float32's spacing there (6e-5): off by ~3e-5. Correct
    and stable; the checker's tolerance (1e-4) accepts it."""
    z = logits / float(T)
    return torch.exp(z - torch.logsumexp(z, dim=-1, keepdim=True))


def alt_soft_loss_kl_div_log_target(student_logits, teacher_logits, T):  # batchmean over the FLATTENED positions
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return F.kl_div(log_q.flatten(0, -2), log_p.flatten(0, -2), log_target=True, reduction="batchmean") * T**2


def alt_soft_loss_kl_div_sum(student_logits, teacher_logits, T):  # reduction="sum" / the number of positions
    log_q = F.log_softmax(student_logits / T, dim=-1)
    p = F.softmax(teacher_logits / T, dim=-1)
    n = student_logits.numel() // student_logits.shape[-1]
    return T * T * F.kl_div(log_q, p, reduction="sum") / n


def alt_soft_loss_ce_minus_entropy(student_logits, teacher_logits, T):  # KL = H(p, q) - H(p)
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    p = log_p.exp()
    return T**2 * ((-(p * log_q).sum(-1)) - (-(p * log_p).sum(-1))).mean()


def alt_soft_loss_distributions(student_logits, teacher_logits, T):  # torch.distributions' Categorical KL
    from torch.distributions import Categorical, kl_divergence

    p, q = Categorical(logits=teacher_logits / T), Categorical(logits=student_logits / T)
    return T**2 * kl_divergence(p, q).mean()


def alt_reverse_kl_kl_div(student_logits, teacher_logits, T):  # kl_div(input=log p, target=log q): KL(q || p)
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    return T**2 * F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1).mean()


def alt_reverse_kl_swap_soft_loss(student_logits, teacher_logits, T):  # exercise 2 with the roles exchanged
    return good_soft_loss(teacher_logits, student_logits, T)


def alt_reverse_kl_flattened(student_logits, teacher_logits, T):
    V = student_logits.shape[-1]
    q = torch.softmax(student_logits.reshape(-1, V) / T, dim=-1)
    log_q, log_p = _log_probs(student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), T)
    return (q * (log_q - log_p)).sum() / q.shape[0] * T**2


def alt_kd_ignore_index_masked_mean(student_logits, teacher_logits, labels, T, alpha):
    """CE with F.cross_entropy's ignore_index on the flattened logits, plus the KL averaged over the kept positions."""
    V = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    keep = (labels != -100).float()
    log_q, log_p = _log_probs(student_logits, teacher_logits, T)
    soft = T**2 * (_forward_kl(log_p, log_q) * keep).sum() / keep.sum()
    return alpha * ce + (1 - alpha) * soft


def alt_kd_flatten_then_index(student_logits, teacher_logits, labels, T, alpha):  # flatten first, select kept rows
    V = student_logits.shape[-1]
    s, t, y = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), labels.reshape(-1)
    idx = (y != -100).nonzero().squeeze(1)
    s, t, y = s[idx], t[idx], y[idx]
    return alpha * F.cross_entropy(s, y) + (1 - alpha) * alt_soft_loss_kl_div_log_target(s, t, T)


def alt_kd_per_token_nll(student_logits, teacher_logits, labels, T, alpha):  # CE as the mean NLL of the gathered labels
    keep = labels.ne(-100)
    s, t, y = student_logits[keep], teacher_logits[keep], labels[keep]
    nll = -torch.log_softmax(s, dim=-1).gather(-1, y[:, None]).squeeze(1)
    return alpha * nll.mean() + (1 - alpha) * T**2 * _forward_kl(*reversed(_log_probs(s, t, T))).mean()


def alt_hidden_loss_mask_multiply(student_hidden, teacher_hidden, pairs, proj, mask):  # masked sum / real tokens
    d = _distances(student_hidden, teacher_hidden, pairs, proj) * mask  # (pairs, batch, seq), padding zeroed
    return (d.sum((1, 2)) / mask.sum()).mean()


def alt_hidden_loss_masked_select(student_hidden, teacher_hidden, pairs, proj, mask):
    d = _distances(student_hidden, teacher_hidden, pairs, proj)
    return torch.stack([dist.masked_select(mask == 1).mean() for dist in d]).mean()


def alt_hidden_loss_one_mean(student_hidden, teacher_hidden, pairs, proj, mask):
    """One mean over every (pair, real token) distance: every pair has the same real tokens, so this is the mean of
    the per-pair means."""
    return _distances(student_hidden, teacher_hidden, pairs, proj)[:, mask.bool()].mean()


def alt_hidden_loss_cosine_embedding(student_hidden, teacher_hidden, pairs, proj, mask):
    """Model Optimizer's HiddenStateCosineLoss: F.cosine_embedding_loss with target 1 is 1 - cos per row."""
    keep = mask.bool().flatten()
    losses = []
    for s, t in pairs:
        h_s = proj(student_hidden[s + 1]).flatten(0, 1)  # (batch * seq, teacher width)
        h_t = teacher_hidden[t + 1].detach().flatten(0, 1)
        per_token = F.cosine_embedding_loss(h_s, h_t, h_t.new_ones(h_t.shape[0]), reduction="none")
        losses.append(per_token[keep].mean())
    return sum(losses) / len(losses)


def alt_hidden_loss_normalised_dot(student_hidden, teacher_hidden, pairs, proj, mask):  # unit vectors, then a dot
    total = 0.0
    for s, t in pairs:
        a = F.normalize(student_hidden[s + 1] @ proj.weight.T, dim=-1)
        with torch.no_grad():  # the target, normalised without a graph
            b = F.normalize(teacher_hidden[t + 1], dim=-1)
        total = total + ((1 - (a * b).sum(-1)) * mask).sum() / mask.sum()
    return total / len(pairs)


def alt_hidden_loss_float64(student_hidden, teacher_hidden, pairs, proj, mask):  # in double precision
    keep = mask.bool()
    losses = [(1 - F.cosine_similarity(proj(student_hidden[s + 1]).double(), teacher_hidden[t + 1].detach().double(),
                                       dim=-1))[keep].mean() for s, t in pairs]
    return torch.stack(losses).mean()


CORRECT_ALTERNATIVES = [
    (checks.check_softmax_T, SOFTMAX_T, alt_softmax_exp_minus_max),
    (checks.check_softmax_T, SOFTMAX_T, alt_softmax_exp_log_softmax),
    (checks.check_softmax_T, SOFTMAX_T, alt_softmax_logsumexp),
    (checks.check_softmax_T, SOFTMAX_T, alt_softmax_logsumexp_unshifted),
    (checks.check_soft_loss, SOFT_LOSS, alt_soft_loss_kl_div_log_target),
    (checks.check_soft_loss, SOFT_LOSS, alt_soft_loss_kl_div_sum),
    (checks.check_soft_loss, SOFT_LOSS, alt_soft_loss_ce_minus_entropy),
    (checks.check_soft_loss, SOFT_LOSS, alt_soft_loss_distributions),
    (checks.check_reverse_kl, REVERSE_KL, alt_reverse_kl_kl_div),
    (checks.check_reverse_kl, REVERSE_KL, alt_reverse_kl_swap_soft_loss),
    (checks.check_reverse_kl, REVERSE_KL, alt_reverse_kl_flattened),
    (checks.check_kd_loss, KD_LOSS, alt_kd_ignore_index_masked_mean),
    (checks.check_kd_loss, KD_LOSS, alt_kd_flatten_then_index),
    (checks.check_kd_loss, KD_LOSS, alt_kd_per_token_nll),
    (checks.check_hidden_loss, HIDDEN_LOSS, alt_hidden_loss_mask_multiply),
    (checks.check_hidden_loss, HIDDEN_LOSS, alt_hidden_loss_masked_select),
    (checks.check_hidden_loss, HIDDEN_LOSS, alt_hidden_loss_one_mean),
    (checks.check_hidden_loss, HIDDEN_LOSS, alt_hidden_loss_cosine_embedding),
    (checks.check_hidden_loss, HIDDEN_LOSS, alt_hidden_loss_normalised_dot),
    (checks.check_hidden_loss, HIDDEN_LOSS, alt_hidden_loss_float64),
]


# ----------------------------------------------------------------------------- not done


def _softmax_rows(z: list[float], T: float) -> list[float]:
    m = max(z)
    e = [math.exp((v - m) / T) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def _cosine_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _hidden_sample(g: torch.Generator) -> tuple[tuple, float]:
    """A 2-layer student (width 2) under a 3-layer teacher (width 3), two pairs, the last token padding: the args and
    the loss computed in plain Python."""
    student = tuple(torch.randn(1, 3, 2, generator=g) for _ in range(3))  # embeddings + 2 layers
    teacher = tuple(torch.randn(1, 3, 3, generator=g) for _ in range(4))  # embeddings + 3 layers
    proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(3, 2, generator=g))
    pairs, mask = [(0, 1), (1, 2)], torch.tensor([[1, 1, 0]])
    W = proj.weight.tolist()
    per_pair = []
    for s, t in pairs:
        hs, ht = student[s + 1][0].tolist(), teacher[t + 1][0].tolist()  # (3 tokens, width) each
        projected = [[sum(W[i][j] * h[j] for j in range(2)) for i in range(3)] for h in hs]
        per_pair.append(sum(_cosine_distance(projected[k], ht[k]) for k in (0, 1)) / 2)  # tokens 0 and 1 are real
    return (student, teacher, pairs, proj, mask), sum(per_pair) / len(per_pair)


def _sample_calls():
    """checker -> (args of one sample call, an independent computation, in plain Python, of what the reference must
    return)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, generator=g) * 3
    probs = torch.tensor([[_softmax_rows(row, 2.0) for row in seq] for seq in z.tolist()])
    s, t = torch.randn(2, 3, 6, generator=g) * 2, torch.randn(2, 3, 6, generator=g) * 2
    rows = [(sr, tr) for sb, tb in zip(s.tolist(), t.tolist()) for sr, tr in zip(sb, tb)]  # 6 positions
    fwd = 4 * sum(_kl(_softmax_rows(tr, 2.0), _softmax_rows(sr, 2.0)) for sr, tr in rows) / len(rows)
    rev = 4 * sum(_kl(_softmax_rows(sr, 2.0), _softmax_rows(tr, 2.0)) for sr, tr in rows) / len(rows)
    labels = torch.tensor([[1, -100, 4], [-100, 0, 5]])
    kept = [(sr, tr, y) for (sr, tr), y in zip(rows, labels.flatten().tolist()) if y != -100]
    ce = sum(-math.log(_softmax_rows(sr, 1.0)[y]) for sr, _, y in kept) / len(kept)
    soft = 4 * sum(_kl(_softmax_rows(tr, 2.0), _softmax_rows(sr, 2.0)) for sr, tr, _ in kept) / len(kept)
    hidden_args, hidden = _hidden_sample(g)
    return {
        checks.check_softmax_T: ((z, 2.0), probs),
        checks.check_soft_loss: ((s, t, 2.0), torch.tensor(fwd)),
        checks.check_reverse_kl: ((s, t, 2.0), torch.tensor(rev)),
        checks.check_kd_loss: ((s, t, labels, 2.0, 0.25), torch.tensor(0.25 * ce + 0.75 * soft)),
        checks.check_hidden_loss: (hidden_args, torch.tensor(hidden)),
    }


def test_not_done_references_work_the_way_the_lab_uses_them(capsys):
    """The lab calls softmax_T on one (V,) position with an int T, soft_loss and reverse_kl on 2-D logits (the toy fit's
    (1, 200), kd_loss's (n, V)) and backpropagates through them: the references handed back must allow all of it."""
    def todo(*args):
        raise NotImplementedError

    softmax_T, soft_loss, reverse_kl = (c(todo) for c in (checks.check_softmax_T, checks.check_soft_loss,
                                                          checks.check_reverse_kl))
    capsys.readouterr()
    z = torch.randn(7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(softmax_T(z, 4), torch.softmax(z / 4, dim=-1))
    (s, t, T), _ = _sample_calls()[checks.check_soft_loss]
    for ref, good in ((soft_loss, good_soft_loss), (reverse_kl, good_reverse_kl)):
        flat = s.reshape(-1, s.shape[-1]).clone().requires_grad_(True)
        loss = ref(flat, t.reshape(-1, t.shape[-1]), T)
        torch.testing.assert_close(loss, good(s, t, T))  # (n, V) gives the same mean as (batch, seq, V)
        loss.backward()
        assert flat.grad is not None and flat.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- failed


def test_returning_none_is_a_failure(capsys):
    def forgot_return(student_logits, teacher_logits, T):
        good_soft_loss(student_logits, teacher_logits, T)

    assert_failed(checks.check_soft_loss, SOFT_LOSS, forgot_return, capsys, "expected a torch.Tensor, got NoneType")


def test_naive_softmax_overflows_near_1000():
    """Why st_naive_exp is wrong: exp(1000) is inf in float32, and inf / inf is NaN; the stable softmax is fine."""
    z = torch.tensor([[1000.0, 999.0, 990.0]])
    assert torch.isnan(st_naive_exp(z, 1.0)).any()
    torch.testing.assert_close(good_softmax_T(z, 1.0), good_softmax_T(z - 1000, 1.0))


def test_batchmean_divides_3d_logits_by_the_batch_only():
    """Why sl_kl_div_batchmean_3d is wrong: on (batch, seq, V) it is seq times the per-position mean."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    torch.testing.assert_close(sl_kl_div_batchmean_3d(s, t, 2.0), 3 * good_soft_loss(s, t, 2.0))
    torch.testing.assert_close(alt_soft_loss_kl_div_log_target(s, t, 2.0), good_soft_loss(s, t, 2.0))


def test_a_swapped_alpha_needs_alpha_other_than_one_half():
    """kd_alpha_swapped agrees with the solution at alpha = 0.5 (the first case): only the alpha = 0.3 case tells."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    labels = torch.randint(0, 8, (2, 5), generator=g)
    labels[0, 1] = -100
    torch.testing.assert_close(kd_alpha_swapped(s, t, labels, 2.0, 0.5), good_kd_loss(s, t, labels, 2.0, 0.5))
    assert not torch.allclose(kd_alpha_swapped(s, t, labels, 2.0, 0.3), good_kd_loss(s, t, labels, 2.0, 0.3))


def test_a_teacher_left_attached_gives_the_right_value():
    """Why hl_teacher_not_detached needs the gradient check: its loss is the solution's to the last bit."""
    (student, teacher, pairs, proj, mask), _ = _sample_calls()[checks.check_hidden_loss]
    teacher = tuple(h.clone().requires_grad_(True) for h in teacher)
    wrong = hl_teacher_not_detached(student, teacher, pairs, proj, mask)
    assert torch.equal(wrong, good_hidden_loss(student, teacher, pairs, proj, mask))
    wrong.backward()
    assert teacher[2].grad is not None and teacher[2].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the models the lab runs it on


def _tiny_llama(layers: int, seed: int = 0):
    """A random Llama small enough to train in a second (vocabulary 64, width 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_hidden_states_hold_the_embeddings_then_one_state_per_layer():
    """The contract the exercise teaches (and the checker's first case tests): transformers' hidden_states[0] is the
    embedding output, [i + 1] the output of decoder layer i, and the last entry has gone through the final norm."""
    model = _tiny_llama(3)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple)
                                                                                 else out))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    assert len(hidden) == len(model.model.layers) + 1
    torch.testing.assert_close(hidden[0], model.model.embed_tokens(ids))
    for i in range(len(model.model.layers) - 1):
        torch.testing.assert_close(hidden[i + 1], outputs[i])
    torch.testing.assert_close(hidden[-1], model.model.norm(outputs[len(model.model.layers) - 1]))


def test_the_reference_works_the_way_the_lab_uses_it(capsys):
    """The lab calls hidden_loss on a pruned student's real hidden states with an all-ones int mask, one pair at a
    time and several at once, through an identity projection: a layer that was only copied scores 0, one after a
    dropped layer does not, and the gradient reaches the student's weights and the projection."""
    from compresslab import distill

    def todo(*args):
        raise NotImplementedError

    hidden_loss = checks.check_hidden_loss(todo)
    capsys.readouterr()
    teacher = _tiny_llama(3)
    student = distill.drop_layers(teacher, [1])  # student layer 0 is teacher layer 0, student 1 is teacher 2
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    proj = distill.make_projection(32, 32)
    torch.testing.assert_close(proj.weight, torch.eye(32))
    with torch.no_grad():
        t_hidden = teacher(ids, output_hidden_states=True).hidden_states
    s_hidden = student(ids, output_hidden_states=True).hidden_states
    mask = torch.ones_like(ids)
    assert hidden_loss(s_hidden, t_hidden, [(0, 0)], proj, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_loss(s_hidden, t_hidden, [(1, 2)], proj, mask).item() > 1e-4
    loss = hidden_loss(s_hidden, t_hidden, [(0, 0), (1, 2)], proj, mask)
    loss.backward()
    assert proj.weight.grad.abs().sum() > 0
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_distill_with_the_hidden_loss_trains_the_student_and_the_projection():
    """distill(..., hidden_weight=, pairs=), the lab's section 8 run: the hidden term is logged and falls, the
    projection learns, and hidden_weight = 0 (every other run of the lab) logs a zero hidden term."""
    from compresslab import distill

    teacher = _tiny_llama(3)
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(2))
    student = distill.drop_layers(teacher, [1])
    proj = distill.make_projection(32, 32)
    hist = distill.distill(student, ids, teacher=teacher, steps=12, lr=3e-3, batch_size=4, alpha=0.5, T=1.0,
                           hidden_weight=10.0, pairs=[(1, 2)], proj=proj, progress=False)
    assert len(hist["hidden"]) == 12 and hist["hidden"][0] > 0
    assert sum(hist["hidden"][-3:]) < sum(hist["hidden"][:3])
    assert not torch.allclose(proj.weight, torch.eye(32))
    for kw in ({}, {"hidden_weight": 0.0}):
        hist = distill.distill(distill.drop_layers(teacher, [1]), ids, teacher=teacher, steps=2, batch_size=2,
                               alpha=0.5, progress=False, **kw)
        assert hist["hidden"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="needs pairs"):
        distill.distill(student, ids, teacher=teacher, steps=1, hidden_weight=1.0, progress=False)
    with pytest.raises(ValueError, match="teacher as a model"):
        distill.distill(student, ids, teacher=None, steps=1, alpha=1.0, hidden_weight=1.0, pairs=[(0, 0)],
                        progress=False)


@pytest.mark.parametrize("checker", list(GOOD), ids=lambda c: c.__name__)
def test_a_second_failure_shows_the_stronger_hint(checker, capsys, monkeypatch):
    """The first failure of an exercise shows its hint and says more will come; the second adds the stronger hint."""
    name = GOOD[checker][0]
    monkeypatch.setitem(checks.FAILURES, name, 0)  # earlier tests failed these exercises too
    wrong = next(fn for c, _, fn, _ in WRONG if c is checker)
    first = assert_failed(checker, name, wrong, capsys)
    assert "a second failure shows a stronger hint" in first and "stronger hint (attempt" not in first
    assert "stronger hint (attempt 2)" in assert_failed(checker, name, wrong, capsys)


# ----------------------------------------------------------------------------- inputs are cloned per call


def mut_softmax_T(logits, T):
    out = good_softmax_T(logits, T)
    logits.zero_()
    return out


def mut_soft_loss(student_logits, teacher_logits, T):
    out = good_soft_loss(student_logits, teacher_logits, T)
    student_logits.zero_(), teacher_logits.mul_(-1)
    return out


def mut_reverse_kl(student_logits, teacher_logits, T):
    out = good_reverse_kl(student_logits, teacher_logits, T)
    student_logits.mul_(-1), teacher_logits.zero_()
    return out


def mut_kd_loss(student_logits, teacher_logits, labels, T, alpha):
    out = good_kd_loss(student_logits, teacher_logits, labels, T, alpha)
    student_logits.zero_(), teacher_logits.zero_(), labels.fill_(-100)
    return out


def mut_hidden_loss(student_hidden, teacher_hidden, pairs, proj, mask):  # the mask and the pair list: the states
    out = good_hidden_loss(student_hidden, teacher_hidden, pairs, proj, mask)  # are still needed for the backward
    mask.zero_(), pairs.clear()
    return out


MUTATING = [(checks.check_softmax_T, SOFTMAX_T, mut_softmax_T), (checks.check_soft_loss, SOFT_LOSS, mut_soft_loss),
            (checks.check_reverse_kl, REVERSE_KL, mut_reverse_kl), (checks.check_kd_loss, KD_LOSS, mut_kd_loss),
            (checks.check_hidden_loss, HIDDEN_LOSS, mut_hidden_loss)]


def test_summary_of_the_lab04_exercises(capsys):
    checks.check_softmax_T(good_softmax_T)
    checks.check_soft_loss(sl_kl_div_batchmean_3d)

    def todo(student_logits, teacher_logits, T):
        raise NotImplementedError

    checks.check_reverse_kl(todo)
    checks.check_kd_loss(good_kd_loss)
    result, lines = summary_lines(capsys)
    assert result == {SOFTMAX_T: "passed", SOFT_LOSS: "failed", REVERSE_KL: "not done", KD_LOSS: "passed"}
    assert len(lines) == 5 and lines[-1] == "2/4 exercises passed"


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    NAMESPACE = {"F": F}  # the lab imports torch.nn.functional as F
    # hidden_loss takes tuples of states: the numpy-style typo of the shared test raises AttributeError, not TypeError
    TENSOR_CHECKERS = [c for c in GOOD if c is not checks.check_hidden_loss]
    sample_calls = staticmethod(_sample_calls)
