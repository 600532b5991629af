"""The lab 04 (pruning) checkers: the solution passes, a skipped exercise is "not done", and wrong answers fail.

Same structure as tests/test_checks_lab02.py. Every wrong implementation below was run against the checker's cases and
is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded: the checkers only run small fixed tensors.
"""

import math
from pathlib import Path

import pytest
import torch
from checker_testing import (CheckerSuite, assert_failed, summary_lines)

import compresslab as cl
from compresslab import checks, gptq, pruning

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "04_wanda_pruning.py"

ACT_NORM = "Exercise 1 · accumulate_act_norm"
WANDA = "Exercise 2 · wanda_mask"
NM = "Exercise 3 · nm_mask"
SPARSEGPT = "Exercise 4 · sparsegpt_layer"

# one torch thread for the module (tiny matrices); every test starts and ends with an empty exercise table
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/04_wanda_pruning.py (### BEGIN / END SOLUTION); test_good_copies_match_the_lab_solutions
# keeps them in sync.


def good_accumulate_act_norm(sq: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean over tokens of x_j^2. sq (in,), n tokens so far, x (..., in) -> (sq_new, n_new)."""
    x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
    b = x.shape[0]
    sq = sq * (n / (n + b)) + (x**2).sum(0) / (n + b)
    return sq, n + b


def good_wanda_mask(W: torch.Tensor, act_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """W (out, in), act_norm (in,) -> bool keep-mask (out, in): per row, prune the lowest int(sparsity * in) scores."""
    score = W.abs() * act_norm[None, :]  # (out, in)
    k = int(sparsity * W.shape[1])
    keep = torch.ones_like(W, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1)[:, :k], False)  # the k lowest of each row
    return keep


def good_nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score (out, in) -> bool keep-mask: the n largest of every m consecutive inputs of each row."""
    out_f, in_f = score.shape
    groups = score.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def good_sparsegpt_layer(W: torch.Tensor, U: torch.Tensor, sparsity: float | None, n: int | None, m: int | None,
                         block_size: int) -> torch.Tensor:
    """W (out, in), U (in, in) upper Cholesky factor of H^-1 -> pruned and compensated W (out, in), a new tensor."""
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
                keep1[:, i : i + m] = good_nm_mask(W1[:, i : i + m] ** 2 / d2[i : i + m], n, m)
            q = W1[:, i] * keep1[:, i]  # a pruned weight "rounds" to 0
            Err1[:, i] = cl.gptq.propagate_error(W1, U1, i, q)  # OBS update of the block's columns i..
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update: (out, B) @ (B, in - i2)
    return W


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_accumulate_act_norm: (ACT_NORM, good_accumulate_act_norm, "accumulate_act_norm"),
    checks.check_wanda_mask: (WANDA, good_wanda_mask, "wanda_mask"),
    checks.check_nm_mask: (NM, good_nm_mask, "nm_mask"),
    checks.check_sparsegpt_layer: (SPARSEGPT, good_sparsegpt_layer, "sparsegpt_layer"),
}


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def an_sum(sq, n, x):  # a running sum of x^2, never divided by the token count
    x = x.reshape(-1, x.shape[-1]).float()
    return sq + (x**2).sum(0), n + x.shape[0]


def an_not_reweighted(sq, n, x):  # the old mean is added as is: forgets to re-weight it by n / (n + b)
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    return sq + (x**2).sum(0) / (n + b), n + b


def an_abs(sq, n, x):  # the running mean of |x_j|, not of x_j^2
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    return sq * (n / (n + b)) + x.abs().sum(0) / (n + b), n + b


def an_counts_sequences(sq, n, x):  # b = x.shape[0] BEFORE the reshape: the number of sequences, not of tokens
    b = x.shape[0]
    x = x.reshape(-1, x.shape[-1]).float()
    return sq * (n / (n + b)) + (x**2).sum(0) / (n + b), n + b


def an_counts_sequences_mean(sq, n, x):  # the batch's per-token mean is right, but it weighs (and counts) sequences
    b = x.shape[0]
    batch_mean = (x.reshape(-1, x.shape[-1]).float() ** 2).mean(0)
    return sq * (n / (n + b)) + batch_mean * (b / (n + b)), n + b


def an_returns_old_n(sq, n, x):  # the right mean, but the token count is not advanced
    sq_new, _ = good_accumulate_act_norm(sq, n, x)
    return sq_new, n


def an_returns_the_norm(sq, n, x):  # sqrt of the running mean (ActNorm.norm()), not the mean of squares itself
    sq_new, n_new = good_accumulate_act_norm(sq, n, x)
    return sq_new.sqrt(), n_new


def an_no_reshape(sq, n, x):  # (x ** 2).sum(0) of a (batch, seq, in) input is (seq, in): the shape is wrong
    b = x.shape[0]
    return sq * (n / (n + b)) + (x**2).sum(0) / (n + b), n + b


WRONG_ACT_NORM = [  # (wrong function, a fragment of the failure message it must produce, or None)
    (an_sum, None),
    (an_not_reweighted, "a later batch"),
    (an_abs, None),
    (an_counts_sequences, None),
    (an_counts_sequences_mean, "output[1]"),
    (an_returns_old_n, "output[1]"),
    (an_returns_the_norm, None),
    (an_no_reshape, "shape"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 2


def _prune_lowest_per_row(score, k):
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1)[:, :k], False)
    return keep


def wm_layer_threshold(W, act_norm, sparsity):  # one threshold for the whole layer: quiet rows lose everything
    return pruning.layer_mask(W.abs() * act_norm[None, :], sparsity)


def wm_magnitude_only(W, act_norm, sparsity):  # |W| per row: the activation norms are ignored
    return _prune_lowest_per_row(W.abs(), int(sparsity * W.shape[1]))


def wm_act_norm_squared(W, act_norm, sparsity):  # |W| * act_norm^2 (the mean of squares, not its sqrt)
    return _prune_lowest_per_row(W.abs() * act_norm[None, :] ** 2, int(sparsity * W.shape[1]))


def wm_no_abs(W, act_norm, sparsity):  # W * act_norm: every negative weight looks unimportant
    return _prune_lowest_per_row(W * act_norm[None, :], int(sparsity * W.shape[1]))


def wm_prunes_largest(W, act_norm, sparsity):  # argsort descending: the most important weights are removed
    score = W.abs() * act_norm[None, :]
    keep = torch.ones_like(W, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1, descending=True)[:, : int(sparsity * W.shape[1])], False)
    return keep


def wm_per_column(W, act_norm, sparsity):  # the comparison group is an input column (dim=0), not an output row
    score = W.abs() * act_norm[None, :]
    keep = torch.ones_like(W, dtype=torch.bool)
    keep.scatter_(0, score.argsort(dim=0)[: int(sparsity * W.shape[0])], False)
    return keep


def wm_float_mask(W, act_norm, sparsity):  # a float 0/1 mask: W * mask works, but the mask must be bool
    return good_wanda_mask(W, act_norm, sparsity).float()


def wm_int_mask(W, act_norm, sparsity):  # a 0/1 integer mask: W * mask works, pruning.apply_mask refuses it
    return good_wanda_mask(W, act_norm, sparsity).long()


def wm_pruned_mask(W, act_norm, sparsity):  # True where a weight is PRUNED: the opposite convention
    return ~good_wanda_mask(W, act_norm, sparsity)


def wm_ceil_k(W, act_norm, sparsity):  # k = ceil(sparsity * in): one weight too many wherever it is not an integer
    return _prune_lowest_per_row(W.abs() * act_norm[None, :], math.ceil(sparsity * W.shape[1]))


WRONG_WANDA = [
    (wm_layer_threshold, None),
    (wm_magnitude_only, None),
    (wm_act_norm_squared, None),
    (wm_no_abs, None),
    (wm_prunes_largest, None),
    (wm_per_column, None),
    (wm_float_mask, "expected a bool mask"),
    (wm_int_mask, "expected a bool mask"),
    (wm_pruned_mask, None),
    (wm_ceil_k, None),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 3


def _keep_topk(groups, n, dim=-1, largest=True):
    keep = torch.zeros_like(groups, dtype=torch.bool)
    return keep.scatter_(dim, groups.topk(n, dim=dim, largest=largest).indices, True)


def nm_down_columns(score, n, m):  # groups of m consecutive OUTPUTS: runs down a column, not along a row
    out_f, in_f = score.shape
    return _keep_topk(score.t().reshape(in_f, out_f // m, m), n).reshape(in_f, out_f).t()


def nm_strided_groups(score, n, m):  # reshape(out, m, in // m): each group is m columns in // m apart
    out_f, in_f = score.shape
    return _keep_topk(score.reshape(out_f, m, in_f // m), n, dim=1).reshape(out_f, in_f)


def nm_smallest(score, n, m):  # topk(largest=False): keeps the n least important of each group
    out_f, in_f = score.shape
    return _keep_topk(score.reshape(out_f, in_f // m, m), n, largest=False).reshape(out_f, in_f)


def nm_row_topk(score, n, m):  # the top n/m of each whole row: the right sparsity, but not N:M
    keep = torch.zeros_like(score, dtype=torch.bool)
    return keep.scatter_(1, score.topk(score.shape[1] * n // m, dim=1).indices, True)


def nm_keeps_m_minus_n(score, n, m):  # keeps m - n (the number to prune) instead of n: the same for 2:4 and 4:8
    out_f, in_f = score.shape
    return _keep_topk(score.reshape(out_f, in_f // m, m), m - n).reshape(out_f, in_f)


def nm_float_mask(score, n, m):
    return good_nm_mask(score, n, m).float()


WRONG_NM = [
    (nm_down_columns, None),
    (nm_strided_groups, None),
    (nm_smallest, None),
    (nm_row_topk, None),
    (nm_keeps_m_minus_n, "1:4"),  # only the 1:4 case tells m - n from n
    (nm_float_mask, "expected a bool mask"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 4
# The cases (checks.lab04._sparsegpt_cases): 1 "three blocks of 16" (50 %), 2 "the last block is 8 wide" (30 %),
# 3 "2:4, two blocks of 16", 4 "4:8, two blocks of 24". The fragment in WRONG_SPARSEGPT names the first case that
# catches each mistake.


def _saliency(W1, d):
    return W1**2 / d**2  # (out, B) with d = diag(U1) (B,)


def _lowest_of_block(score, k):
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.view(-1)[score.flatten().argsort()[:k]] = False
    return keep


def _sparsegpt(W, U, sparsity, n, m, block_size, score=_saliency, block_mask=None, nm=None, nm_at_start=False,
               from_original=False, obs=True, lazy=True):
    """The solution's loop with one piece swapped out (each wrong answer below names the piece):
    score(W1, d) -> (out, B); block_mask(score, sparsity) -> the unstructured keep-mask of a block (default: the
    int(sparsity * numel) lowest of the whole block); nm(score, n, m) -> an N:M keep-mask; nm_at_start: all of a
    block's N:M groups chosen at the block start; from_original: blocks scored on the weights before any update;
    obs: the OBS update inside the block; lazy: the lazy update of the later columns."""
    W, W_orig = W.clone(), W.clone()
    nm = nm or pruning.nm_mask
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # (out, B), (B, B)
        d = torch.diag(U1)
        src = W_orig[:, i1:i2] if from_original else W1
        Err1 = torch.zeros_like(W1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if n is None:
            s = score(src, d)
            keep1 = block_mask(s, sparsity) if block_mask else _lowest_of_block(s, int(sparsity * s.numel()))
        elif nm_at_start:
            keep1 = nm(score(src, d), n, m)
        for i in range(i2 - i1):
            if n is not None and not nm_at_start and i % m == 0:
                keep1[:, i : i + m] = nm(score(W1[:, i : i + m], d[i : i + m]), n, m)
            q = W1[:, i] * keep1[:, i]
            if obs:
                Err1[:, i] = gptq.propagate_error(W1, U1, i, q)
            W1[:, i] = q
        W[:, i1:i2] = W1
        if lazy:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


def sg_magnitude_score(W, U, sparsity, n, m, block_size):  # |w| alone: magnitude pruning inside the loop
    return _sparsegpt(W, U, sparsity, n, m, block_size, score=lambda W1, d: W1.abs())


def sg_score_times_u(W, U, sparsity, n, m, block_size):  # w^2 * U_ii^2: multiplies by the factor instead of dividing
    return _sparsegpt(W, U, sparsity, n, m, block_size, score=lambda W1, d: W1**2 * d**2)


def sg_score_u_not_squared(W, U, sparsity, n, m, block_size):  # w^2 / U_ii: the diagonal of U is not [H^-1]_ii
    return _sparsegpt(W, U, sparsity, n, m, block_size, score=lambda W1, d: W1**2 / d)


def sg_per_row_in_block(W, U, sparsity, n, m, block_size):  # Wanda's habit: int(sparsity * B) lowest of each ROW
    return _sparsegpt(W, U, sparsity, n, m, block_size, block_mask=pruning.row_mask)


def sg_prunes_largest(W, U, sparsity, n, m, block_size):  # argsort(descending=True): the most salient are removed
    return _sparsegpt(W, U, sparsity, n, m, block_size,
                      block_mask=lambda s, p: _lowest_of_block(-s, int(p * s.numel())))


def sg_one_more_per_block(W, U, sparsity, n, m, block_size):  # the reference repository's `score <= sorted[k]`
    return _sparsegpt(W, U, sparsity, n, m, block_size,
                      block_mask=lambda s, p: _lowest_of_block(s, int(p * s.numel()) + 1))


def sg_full_block_count(W, U, sparsity, n, m, block_size):  # int(sparsity * out * block_size) in the last, narrower one
    return _sparsegpt(W, U, sparsity, n, m, block_size,
                      block_mask=lambda s, p: _lowest_of_block(s, int(p * s.shape[0] * block_size)))


def sg_scores_original_weights(W, U, sparsity, n, m, block_size):  # each block scored on W as it came in
    return _sparsegpt(W, U, sparsity, n, m, block_size, from_original=True)


def sg_mask_once_per_row(W, U, sparsity, n, m, block_size):  # one mask for the whole matrix, chosen before the loop
    keep = pruning.row_mask(W**2 / torch.diag(U) ** 2, sparsity) if n is None else pruning.nm_mask(
        W**2 / torch.diag(U) ** 2, n, m)
    W = W.clone()
    for i in range(W.shape[1]):  # then GPTQ's loop, right in itself
        q = W[:, i] * keep[:, i]
        gptq.propagate_error(W, U, i, q)
        W[:, i] = q
    return W


def sg_no_obs_update(W, U, sparsity, n, m, block_size):  # the mask alone: pruned weights zeroed, nothing compensates
    return _sparsegpt(W, U, sparsity, n, m, block_size, obs=False, lazy=False)


def sg_no_lazy_update(W, U, sparsity, n, m, block_size):  # later blocks never see the errors of earlier ones
    return _sparsegpt(W, U, sparsity, n, m, block_size, lazy=False)


def sg_lazy_update_with_weight_changes(W, U, sparsity, n, m, block_size):
    """The lazy update fed the block's weight changes (W1 before - after) instead of its errors (w - q) / U_ii."""
    W = W.clone()
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        before = W1.clone()
        d = torch.diag(U1)
        keep1 = _lowest_of_block(_saliency(W1, d), int(sparsity * W1.numel())) if n is None else (
            torch.ones_like(W1, dtype=torch.bool))
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                keep1[:, i : i + m] = pruning.nm_mask(_saliency(W1[:, i : i + m], d[i : i + m]), n, m)
            q = W1[:, i] * keep1[:, i]
            gptq.propagate_error(W1, U1, i, q)
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= (before - W1) @ U[i1:i2, i2:]
    return W


def sg_nm_at_block_start(W, U, sparsity, n, m, block_size):  # every N:M group of a block chosen before its loop
    return _sparsegpt(W, U, sparsity, n, m, block_size, nm_at_start=True)


def sg_nm_down_columns(W, U, sparsity, n, m, block_size):  # groups of m consecutive ROWS of the m columns
    return _sparsegpt(W, U, sparsity, n, m, block_size,
                      nm=lambda s, n, m: pruning.nm_mask(s.t().contiguous(), n, m).t())


FIRST, LAST_NARROW, TWO_FOUR = "three blocks of 16", "the last block is 8 wide", "2:4, two blocks of 16"
WRONG_SPARSEGPT = [
    (sg_magnitude_score, FIRST),
    (sg_score_times_u, FIRST),
    (sg_score_u_not_squared, FIRST),
    (sg_per_row_in_block, FIRST),
    (sg_prunes_largest, FIRST),
    (sg_one_more_per_block, FIRST),
    (sg_full_block_count, LAST_NARROW),  # every other block is full
    (sg_scores_original_weights, FIRST),  # the first block is right: later ones were moved by the earlier errors
    (sg_mask_once_per_row, FIRST),
    (sg_no_obs_update, FIRST),
    (sg_no_lazy_update, FIRST),
    (sg_lazy_update_with_weight_changes, FIRST),
    (sg_nm_at_block_start, TWO_FOUR),  # unstructured cases are right
    (sg_nm_down_columns, TWO_FOUR),
]

WRONG = [(checks.check_accumulate_act_norm, ACT_NORM, fn, msg) for fn, msg in WRONG_ACT_NORM]
WRONG += [(checks.check_wanda_mask, WANDA, fn, msg) for fn, msg in WRONG_WANDA]
WRONG += [(checks.check_nm_mask, NM, fn, msg) for fn, msg in WRONG_NM]
WRONG += [(checks.check_sparsegpt_layer, SPARSEGPT, fn, msg) for fn, msg in WRONG_SPARSEGPT]


# ----------------------------------------------------------------------------- correct alternatives


def alt_act_norm_weighted_sum(sq, n, x):  # (n sq + sum x^2) / (n + b), flatten, no float() call
    x = x.flatten(0, -2) if x.dim() > 2 else x
    b = len(x)
    return (n * sq + x.pow(2).sum(0)) / (n + b), n + b


def alt_act_norm_lerp(sq, n, x):  # move the old mean towards the batch mean by b / (n + b)
    x = x.reshape(-1, x.shape[-1])
    b = x.shape[0]
    return torch.lerp(sq, (x * x).mean(0), b / (n + b)), n + b


def alt_wanda_topk(W, act_norm, sparsity):  # keep the in - k largest of each row
    score = W.abs() * act_norm
    k = int(sparsity * W.shape[1])
    keep = torch.zeros(W.shape, dtype=torch.bool)
    keep.scatter_(1, score.topk(W.shape[1] - k, dim=1).indices, True)
    return keep


def alt_wanda_sort_threshold(W, act_norm, sparsity):  # torch.sort, then compare with each row's k-th lowest score
    score = W.abs() * act_norm.unsqueeze(0)
    k = int(sparsity * W.shape[1])
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    thresh = torch.sort(score, dim=1).values[:, k - 1 : k]  # (out, 1)
    return score > thresh


def alt_wanda_rank(W, act_norm, sparsity):  # each weight's rank in its row; the k lowest ranks are pruned
    rank = (W.abs() * act_norm).argsort(dim=1).argsort(dim=1)
    return rank >= int(sparsity * W.shape[1])


def alt_nm_loop(score, n, m):  # one group at a time
    keep = torch.zeros(score.shape, dtype=torch.bool)
    for r in range(score.shape[0]):
        for c in range(0, score.shape[1], m):
            best = torch.argsort(score[r, c : c + m], descending=True)[:n]
            keep[r, c + best] = True
    return keep


def alt_nm_unfold_rank(score, n, m):  # rank inside each group via a double argsort; the top n ranks survive
    groups = score.unflatten(1, (-1, m))  # (out, in/m, m)
    rank = groups.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (rank < n).flatten(1)


def alt_nm_threshold(score, n, m):  # >= the n-th largest value of each group
    groups = score.view(score.shape[0], -1, m)
    nth = groups.topk(n, dim=-1).values[..., -1:]
    return (groups >= nth).view_as(score)


def alt_sparsegpt_without_lazy_updates(W, U, sparsity, n, m, block_size):
    """No blocks of errors: after each column the error goes straight onto every later column of W (the paper's
    algorithm before its lazy batching); the block mask by kthvalue, N:M by topk of the n largest."""
    W = W.clone()
    d2 = torch.diag(U) ** 2  # (in,)
    keep = torch.ones_like(W, dtype=torch.bool)
    for c in range(W.shape[1]):
        if n is None and c % block_size == 0:
            s = W[:, c : c + block_size] ** 2 / d2[c : c + block_size]
            keep[:, c : c + block_size] = s > s.flatten().kthvalue(int(sparsity * s.numel())).values
        if n is not None and c % m == 0:
            s = W[:, c : c + m] ** 2 / d2[c : c + m]
            keep[:, c : c + m] = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(n, dim=1).indices, True)
        q = W[:, c] * keep[:, c]
        W[:, c:] -= torch.outer((W[:, c] - q) / U[c, c], U[c, c:])
    return W


def alt_sparsegpt_float64(W, U, sparsity, n, m, block_size):  # the same loop in double precision
    return good_sparsegpt_layer(W.double(), U.double(), sparsity, n, m, block_size).float()


def alt_sparsegpt_own_update(W, U, sparsity, n, m, block_size):
    """The OBS update written out, column i left as the update leaves it (q up to rounding, not set to q); the
    block mask keeps the numel - k largest (topk); the package's nm_mask; (w / U_ii)^2 as the score."""
    W = W.clone()
    for i1 in range(0, W.shape[1], block_size):
        W1, U1 = W[:, i1 : i1 + block_size].clone(), U[i1 : i1 + block_size, i1 : i1 + block_size]
        d = U1.diagonal()
        Err1 = torch.empty_like(W1)
        if n is None:
            s = ((W1 / d) ** 2).flatten()
            keep1 = torch.zeros_like(s, dtype=torch.bool)
            keep1[s.topk(s.numel() - int(sparsity * s.numel())).indices] = True
            keep1 = keep1.view_as(W1)
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(W1.shape[1]):
            if n is not None and i % m == 0:
                keep1[:, i : i + m] = pruning.nm_mask((W1[:, i : i + m] / d[i : i + m]) ** 2, n, m)
            Err1[:, i] = (W1[:, i] - torch.where(keep1[:, i], W1[:, i], 0.0)) / d[i]
            W1[:, i:] -= Err1[:, i : i + 1] * U1[i : i + 1, i:]
        W[:, i1 : i1 + block_size] = W1
        W[:, i1 + block_size :] -= Err1 @ U[i1 : i1 + block_size, i1 + block_size :]
    return W


def alt_sparsegpt_package_masks(W, U, sparsity, n, m, block_size):  # pruning.layer_mask for the block's choice
    W = W.clone()
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        s = W1**2 / torch.diag(U1) ** 2
        keep1 = pruning.layer_mask(s, sparsity) if n is None else torch.ones_like(W1, dtype=torch.bool)
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                keep1[:, i : i + m] = pruning.nm_mask(W1[:, i : i + m] ** 2 / torch.diag(U1)[i : i + m] ** 2, n, m)
            Err1[:, i] = gptq.propagate_error(W1, U1, i, W1[:, i] * keep1[:, i])
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


CORRECT_ALTERNATIVES = [
    (checks.check_accumulate_act_norm, ACT_NORM, alt_act_norm_weighted_sum),
    (checks.check_accumulate_act_norm, ACT_NORM, alt_act_norm_lerp),
    (checks.check_wanda_mask, WANDA, alt_wanda_topk),
    (checks.check_wanda_mask, WANDA, alt_wanda_sort_threshold),
    (checks.check_wanda_mask, WANDA, alt_wanda_rank),
    (checks.check_nm_mask, NM, alt_nm_loop),
    (checks.check_nm_mask, NM, alt_nm_unfold_rank),
    (checks.check_nm_mask, NM, alt_nm_threshold),
    (checks.check_sparsegpt_layer, SPARSEGPT, alt_sparsegpt_without_lazy_updates),
    (checks.check_sparsegpt_layer, SPARSEGPT, alt_sparsegpt_float64),
    (checks.check_sparsegpt_layer, SPARSEGPT, alt_sparsegpt_own_update),
    (checks.check_sparsegpt_layer, SPARSEGPT, alt_sparsegpt_package_masks),
]


# ----------------------------------------------------------------------------- not done


def _sample_calls():
    """checker -> (args of one sample call, an independent computation of what the reference must return)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    xf = x.reshape(-1, 16)
    W = torch.randn(6, 16, generator=g)
    act = torch.rand(16, generator=g) + 0.1
    keep_w = torch.ones(6, 16, dtype=torch.bool)
    for r in range(6):  # the 8 lowest |W| * act of each row, one row at a time
        keep_w[r, sorted(range(16), key=lambda j: (W[r, j].abs() * act[j]).item())[:8]] = False
    score = torch.rand(4, 16, generator=g)
    keep_nm = torch.zeros(4, 16, dtype=torch.bool)
    for r in range(4):
        for c in range(0, 16, 4):
            group = score[r, c : c + 4].tolist()
            for j in sorted(range(4), key=lambda j: -group[j])[:2]:
                keep_nm[r, c + j] = True
    W1 = torch.randn(4, 16, generator=g)
    U = checks._hinv_upper(16, 2)
    expected = W1.clone()  # 50 %, blocks of 8, written without blocks of errors: each error goes on at once
    for c in range(16):
        if c % 8 == 0:  # the block's 32 saliencies, as the weights are now: the 16 lowest are pruned
            s = [(expected[r, j] ** 2 / U[j, j] ** 2).item() for r in range(4) for j in range(c, c + 8)]
            pruned = set(sorted(range(32), key=lambda t: s[t])[:16])
        q = torch.tensor([0.0 if r * 8 + c % 8 in pruned else expected[r, c].item() for r in range(4)])
        expected[:, c:] -= ((expected[:, c] - q) / U[c, c])[:, None] * U[c, c:][None, :]
        expected[:, c] = q
    return {
        checks.check_accumulate_act_norm: ((torch.zeros(16), 0, x), ((xf**2).mean(0), 15)),
        checks.check_wanda_mask: ((W, act, 0.5), keep_w),
        checks.check_nm_mask: ((score, 2, 4), keep_nm),
        checks.check_sparsegpt_layer: ((W1, U, 0.5, None, None, 8), expected),
    }


def test_not_done_sparsegpt_reference_is_the_package_loop(capsys):
    """The reference handed back for exercise 4 is the loop of pruning.sparsegpt_prune, bit for bit (the lab's
    comparison on the real layer relies on it), leaves the caller's W alone, and prunes exactly int(sparsity * out * B)
    weights in every block, the narrower last one included."""
    def todo(*args):
        raise NotImplementedError

    ref = checks.check_sparsegpt_layer(todo)
    capsys.readouterr()
    g = torch.Generator().manual_seed(5)
    W = torch.randn(12, 40, generator=g)
    H = checks._spd(40, 6)
    U = gptq.inverse_cholesky(H, 0.01)[0].float()
    before = W.clone()
    out = ref(W, U, 0.3, None, None, 16)
    assert torch.equal(W, before)
    assert torch.equal(out, pruning.sparsegpt_prune(W, H, 0.3, block_size=16))
    assert [int((out[:, i : i + 16] == 0).sum()) for i in (0, 16, 32)] == [57, 57, 28]  # int(0.3 * 12 * 16), ... * 8
    assert torch.equal(ref(W, U, None, 2, 4, 16), pruning.sparsegpt_prune(W, H, n=2, m=4, block_size=16))


def test_the_block_mask_is_not_per_row(capsys):
    """Why sg_per_row_in_block is wrong: the reference compares the whole block, so in the first case the loud rows
    keep more than half of their weights and the quiet ones fewer."""
    W, U, sparsity, n, m, block = checks.lab04._sparsegpt_cases()[0].args
    out = pruning.sparsegpt_blocks(W, U, sparsity, n, m, block)
    pruned_per_row = (out[:, :16] == 0).sum(1)  # the first block: (8,) rows, the first 4 loud
    assert int(pruned_per_row.sum()) == 64
    assert pruned_per_row[:4].float().mean() < 8 < pruned_per_row[4:].float().mean()


# ----------------------------------------------------------------------------- failed


def test_returning_none_is_a_failure(capsys):
    def forgot_return(W, act_norm, sparsity):
        good_wanda_mask(W, act_norm, sparsity)

    assert_failed(checks.check_wanda_mask, WANDA, forgot_return, capsys, "expected a torch.Tensor, got NoneType")


def test_ceil_k_is_really_wrong():
    """Why wm_ceil_k is wrong: where sparsity * in is not an integer, ceil prunes one weight more per row."""
    g = torch.Generator().manual_seed(0)
    W, act = torch.randn(4, 10, generator=g), torch.rand(10, generator=g) + 0.1
    assert int(0.25 * 10) == 2 and math.ceil(0.25 * 10) == 3
    assert int((~wm_ceil_k(W, act, 0.25)).sum()) == 4 * 3
    assert int((~good_wanda_mask(W, act, 0.25)).sum()) == 4 * 2


def test_layer_threshold_empties_quiet_rows():
    """The case the per-row checker is built on: one threshold per layer prunes the quiet rows far beyond sparsity."""
    W, act = checks._row_scores(8, 16, 1)
    pruned = ~wm_layer_threshold(W, act, 0.5)
    quiet, loud = pruned[4:].float().mean(), pruned[:4].float().mean()
    assert quiet > 0.5 > loud


# ----------------------------------------------------------------------------- inputs are cloned per call


def mut_act_norm(sq, n, x):
    out = good_accumulate_act_norm(sq, n, x)
    sq.mul_(0), x.mul_(0)
    return out


def mut_wanda(W, act_norm, sparsity):
    out = good_wanda_mask(W, act_norm, sparsity)
    W.zero_(), act_norm.zero_()
    return out


def mut_nm(score, n, m):
    out = good_nm_mask(score, n, m)
    score.zero_()
    return out


def mut_sparsegpt(W, U, sparsity, n, m, block_size):
    out = good_sparsegpt_layer(W, U, sparsity, n, m, block_size)
    W.zero_(), U.mul_(2)
    return out


MUTATING = [(checks.check_accumulate_act_norm, ACT_NORM, mut_act_norm), (checks.check_wanda_mask, WANDA, mut_wanda),
            (checks.check_nm_mask, NM, mut_nm), (checks.check_sparsegpt_layer, SPARSEGPT, mut_sparsegpt)]


def test_summary_of_the_lab04_exercises(capsys):
    checks.check_accumulate_act_norm(good_accumulate_act_norm)
    checks.check_wanda_mask(wm_layer_threshold)
    checks.check_nm_mask(good_nm_mask)

    def todo(W, U, sparsity, n, m, block_size):
        raise NotImplementedError

    checks.check_sparsegpt_layer(todo)
    result, lines = summary_lines(capsys)
    assert result == {ACT_NORM: "passed", WANDA: "failed", NM: "passed", SPARSEGPT: "not done"}
    assert len(lines) == 5 and lines[-1] == "2/4 exercises passed"


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    NAMESPACE = {"cl": cl}  # the SparseGPT solution calls cl.gptq.propagate_error (and the lab's own nm_mask)
    sample_calls = staticmethod(_sample_calls)
