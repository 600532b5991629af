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

from compresslab import checks, gptq, pruning

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "04_wanda_pruning.py"

ACT_NORM = "Exercise 1 · accumulate_act_norm"
WANDA = "Exercise 2 · wanda_mask"
NM = "Exercise 3 · nm_mask"
SPARSEGPT = "Exercise 4 · sparsegpt_step"

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


def good_sparsegpt_step(W1: torch.Tensor, Hinv1: torch.Tensor, i: int, keep: torch.Tensor):
    """Prune column i of W1 (out, B) where keep (out,) is False; OBS update of columns i.. -> (W1, q, err)."""
    q = W1[:, i] * keep
    err = (W1[:, i] - q) / Hinv1[i, i]
    W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
    return W1, q, err


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_accumulate_act_norm: (ACT_NORM, good_accumulate_act_norm, "accumulate_act_norm"),
    checks.check_wanda_mask: (WANDA, good_wanda_mask, "wanda_mask"),
    checks.check_nm_mask: (NM, good_nm_mask, "nm_mask"),
    checks.check_sparsegpt_step: (SPARSEGPT, good_sparsegpt_step, "sparsegpt_step"),
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


def sg_no_division(W1, Hinv1, i, keep):  # err = w - q, not divided by Hinv1[i, i]
    q = W1[:, i] * keep
    err = W1[:, i] - q
    W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
    return W1, q, err


def sg_divides_twice(W1, Hinv1, i, keep):  # the update divides err by d again
    d = Hinv1[i, i]
    q = W1[:, i] * keep
    err = (W1[:, i] - q) / d
    W1[:, i:] -= torch.outer(err / d, Hinv1[i, i:])
    return W1, q, err


def sg_updates_all_columns(W1, Hinv1, i, keep):  # W1 -= ... with the row slice i:: (out, B) vs (out, B - i)
    q = W1[:, i] * keep
    err = (W1[:, i] - q) / Hinv1[i, i]
    W1 -= torch.outer(err, Hinv1[i, i:])
    return W1, q, err


def sg_updates_all_columns_with_the_column(W1, Hinv1, i, keep):  # W1 -= outer(err, Hinv1[:, i]): earlier columns move
    q = W1[:, i] * keep
    err = (W1[:, i] - q) / Hinv1[i, i]
    W1 -= torch.outer(err, Hinv1[:, i])
    return W1, q, err


def sg_reads_the_column(W1, Hinv1, i, keep):  # Hinv1[i:, i]: the factor is upper-triangular, not symmetric
    q = W1[:, i] * keep
    err = (W1[:, i] - q) / Hinv1[i, i]
    W1[:, i:] -= torch.outer(err, Hinv1[i:, i])
    return W1, q, err


def sg_prunes_the_kept(W1, Hinv1, i, keep):  # q = W1[:, i] * ~keep: zeroes the rows that should survive
    q = W1[:, i] * ~keep
    err = (W1[:, i] - q) / Hinv1[i, i]
    W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
    return W1, q, err


def sg_no_update(W1, Hinv1, i, keep):  # plain magnitude-style pruning of the column: W1 is not touched
    q = W1[:, i] * keep
    return W1, q, (W1[:, i] - q) / Hinv1[i, i]


def sg_error_sign(W1, Hinv1, i, keep):  # err = (q - w) / d: pushes the error the wrong way
    q = W1[:, i] * keep
    err = (q - W1[:, i]) / Hinv1[i, i]
    W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
    return W1, q, err


def sg_skips_column_i(W1, Hinv1, i, keep):  # W1[:, i+1:] only: column i keeps w instead of q
    q = W1[:, i] * keep
    err = (W1[:, i] - q) / Hinv1[i, i]
    W1[:, i + 1 :] -= torch.outer(err, Hinv1[i, i + 1 :])
    return W1, q, err


def sg_err_after_the_update(W1, Hinv1, i, keep):  # w is a view of W1: after the update it holds q, so err == 0
    w, d = W1[:, i], Hinv1[i, i]
    q = w * keep
    W1[:, i:] -= torch.outer((w - q) / d, Hinv1[i, i:])
    return W1, q, (w - q) / d


WRONG_SPARSEGPT = [
    (sg_no_division, None),
    (sg_divides_twice, None),
    (sg_updates_all_columns, "raised RuntimeError"),  # right for i = 0 only
    (sg_updates_all_columns_with_the_column, None),
    (sg_reads_the_column, None),
    (sg_prunes_the_kept, None),
    (sg_no_update, "output[0]"),
    (sg_error_sign, None),
    (sg_skips_column_i, "output[0]"),
    (sg_err_after_the_update, "output[2]"),
]

WRONG = [(checks.check_accumulate_act_norm, ACT_NORM, fn, msg) for fn, msg in WRONG_ACT_NORM]
WRONG += [(checks.check_wanda_mask, WANDA, fn, msg) for fn, msg in WRONG_WANDA]
WRONG += [(checks.check_nm_mask, NM, fn, msg) for fn, msg in WRONG_NM]
WRONG += [(checks.check_sparsegpt_step, SPARSEGPT, fn, msg) for fn, msg in WRONG_SPARSEGPT]


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


def alt_sparsegpt_clone_matmul(W1, Hinv1, i, keep):  # a new W1 via (out, 1) @ (1, B - i); q via torch.where
    W1 = W1.clone()
    w = W1[:, i].clone()
    q = torch.where(keep, w, torch.zeros_like(w))
    err = (w - q) / Hinv1[i, i]
    W1[:, i:] = W1[:, i:] - err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
    return W1, q, err


def alt_sparsegpt_whole_row(W1, Hinv1, i, keep):
    """W1 -= outer(err, Hinv1[i]) over ALL columns is right: Hinv1 is upper-triangular, so Hinv1[i, :i] == 0."""
    q = W1[:, i] * keep
    err = (W1[:, i] - q) / Hinv1[i, i]
    W1 -= torch.outer(err, Hinv1[i])
    return W1, q, err


def alt_sparsegpt_propagate_error(W1, Hinv1, i, keep):  # the package's shared OBS update, as the lab suggests
    q = W1[:, i] * keep.float()
    err = gptq.propagate_error(W1, Hinv1, i, q)
    return W1, q, err


CORRECT_ALTERNATIVES = [
    (checks.check_accumulate_act_norm, ACT_NORM, alt_act_norm_weighted_sum),
    (checks.check_accumulate_act_norm, ACT_NORM, alt_act_norm_lerp),
    (checks.check_wanda_mask, WANDA, alt_wanda_topk),
    (checks.check_wanda_mask, WANDA, alt_wanda_sort_threshold),
    (checks.check_wanda_mask, WANDA, alt_wanda_rank),
    (checks.check_nm_mask, NM, alt_nm_loop),
    (checks.check_nm_mask, NM, alt_nm_unfold_rank),
    (checks.check_nm_mask, NM, alt_nm_threshold),
    (checks.check_sparsegpt_step, SPARSEGPT, alt_sparsegpt_clone_matmul),
    (checks.check_sparsegpt_step, SPARSEGPT, alt_sparsegpt_whole_row),
    (checks.check_sparsegpt_step, SPARSEGPT, alt_sparsegpt_propagate_error),
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
    W1 = torch.randn(6, 16, generator=g)
    U = checks._hinv_upper(16, 2)
    keep = torch.tensor([True, False, True, True, False, False])
    w = W1[:, 3]
    q = torch.where(keep, w, torch.zeros(()))
    err = (w - q) / U[3, 3]
    W_upd = W1.clone()
    W_upd[:, 3:] -= err[:, None] * U[3, 3:][None, :]
    return {
        checks.check_accumulate_act_norm: ((torch.zeros(16), 0, x), ((xf**2).mean(0), 15)),
        checks.check_wanda_mask: ((W, act, 0.5), keep_w),
        checks.check_nm_mask: ((score, 2, 4), keep_nm),
        checks.check_sparsegpt_step: ((W1, U, 3, keep), (W_upd, q, err)),
    }


def test_not_done_sparsegpt_reference_leaves_the_callers_block_alone(capsys):
    """The reference handed back for exercise 4 returns the updated block; the caller's block is not touched."""
    def todo(*args):
        raise NotImplementedError

    ref = checks.check_sparsegpt_step(todo)
    capsys.readouterr()
    (W1, U, i, keep), (W_upd, _, _) = _sample_calls()[checks.check_sparsegpt_step]
    before = W1.clone()
    W_new, q, _ = ref(W1, U, i, keep)
    torch.testing.assert_close(W_new, W_upd)
    assert torch.equal(W_new[:, i], q)  # column i becomes q: the pruned rows are exactly 0
    assert torch.equal(W_new[~keep, i], torch.zeros(int((~keep).sum())))
    assert torch.equal(W1, before)


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


def mut_sparsegpt(W1, Hinv1, i, keep):  # the lab's solution updates W1 in place: this is expected
    out = good_sparsegpt_step(W1, Hinv1, i, keep)
    Hinv1.mul_(2), keep.zero_()
    return out


MUTATING = [(checks.check_accumulate_act_norm, ACT_NORM, mut_act_norm), (checks.check_wanda_mask, WANDA, mut_wanda),
            (checks.check_nm_mask, NM, mut_nm), (checks.check_sparsegpt_step, SPARSEGPT, mut_sparsegpt)]


def test_summary_of_the_lab03_exercises(capsys):
    checks.check_accumulate_act_norm(good_accumulate_act_norm)
    checks.check_wanda_mask(wm_layer_threshold)
    checks.check_nm_mask(good_nm_mask)

    def todo(W1, Hinv1, i, keep):
        raise NotImplementedError

    checks.check_sparsegpt_step(todo)
    result, lines = summary_lines(capsys)
    assert result == {ACT_NORM: "passed", WANDA: "failed", NM: "passed", SPARSEGPT: "not done"}
    assert len(lines) == 5 and lines[-1] == "2/4 exercises passed"


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    sample_calls = staticmethod(_sample_calls)
