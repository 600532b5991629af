"""The lab 02 (GPTQ) checkers: the solution passes, a skipped exercise is "not done", and plausible wrong answers fail.

Same structure as tests/test_checks.py. Every wrong implementation below was run against the checker's cases and
is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded: the checkers only run small fixed tensors.
"""

from pathlib import Path

import pytest
import torch
from checker_testing import (CheckerSuite, assert_failed, summary_lines)

import compresslab as cl
from compresslab import checks, gptq, quant

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "02_gptq.py"

HESSIAN = "Exercise 1 · accumulate_hessian"
COLUMN = "Exercise 2 · gptq_column_step"
ACT_ORDER = "Exercise 4 · act_order"
RECON = "Exercise 3 · reconstruction_error"
GPTQ = "Exercise 5 · my_gptq"

# one torch thread for the module (tiny matrices); every test starts and ends with an empty exercise table
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/02_gptq.py (### BEGIN / END SOLUTION); test_good_copies_match_the_lab_solutions keeps
# them in sync.


def good_accumulate_hessian(H: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2/n sum x x^T. H (in, in), n tokens so far, x (..., in) -> (H_new, n_new)."""
    x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
    b = x.shape[0]
    H = H * (n / (n + b))  # re-weight the old average
    n = n + b
    x = (2 / n) ** 0.5 * x
    return H + x.t() @ x, n


def good_gptq_column_step(W1, Hinv1, i: int, scale, zero, maxq: int):
    """One GPTQ step on column i of W1 (out, B) -> (W1 updated, q (out,), err (out,))."""
    w, d = W1[:, i], Hinv1[i, i]
    q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
    err = (w - q) / d
    W1[:, i:] -= torch.outer(err, Hinv1[i, i:])  # the later columns absorb this column's error
    return W1, q, err


def good_act_order(H: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (perm (in,), g_idx (in,)) for act-order with dynamic groups."""
    order = torch.argsort(torch.diag(H), descending=True)
    groups = torch.empty_like(order)
    groups[order] = torch.arange(order.numel()) // group_size  # position in quantization order -> group
    return order, groups


def good_reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """||X W^T - X W_hat^T||_F^2, a scalar."""
    diff = X.float() @ (W.float() - W_hat.float()).t()  # (tokens, out): the change in the layer's outputs
    return (diff**2).sum()


def good_my_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, lazy_block: int,
                 act_order: bool) -> torch.Tensor:
    """GPTQ of W (out, in) with Hessian H (in, in) -> dequantized weights (out, in), in W's column order."""
    W, maxq = W.clone().float(), 2**bits - 1
    if act_order:  # the most active input channels first; H follows the columns
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = cl.gptq.inverse_cholesky(H, 0.01)[0].float()  # (in, in) upper factor of the dampened H^-1
    Q = torch.zeros_like(W)  # dequantized, in quantization order
    for i1 in range(0, W.shape[1], lazy_block):
        i2 = min(i1 + lazy_block, W.shape[1])
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])  # (out, B) each
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:  # a group starts: qparams from the error-updated weights
                scale, zero = cl.gptq.gptq_qparams(W[:, i1 + i : i1 + i + group_size], bits, sym=False)
            W1, Q[:, i1 + i], Err1[:, i] = good_gptq_column_step(W1, U[i1:i2, i1:i2], i, scale[:, 0], zero[:, 0],
                                                                 maxq)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy: the later columns absorb the whole block's errors at once
    return Q[:, torch.argsort(perm)] if act_order else Q


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_accumulate_hessian: (HESSIAN, good_accumulate_hessian, "accumulate_hessian"),
    checks.check_column_step: (COLUMN, good_gptq_column_step, "gptq_column_step"),
    checks.check_act_order: (ACT_ORDER, good_act_order, "act_order"),
    checks.check_reconstruction_error: (RECON, good_reconstruction_error, "reconstruction_error"),
    checks.check_gptq: (GPTQ, good_my_gptq, "my_gptq"),
}


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def ah_averages_this_batch_only(H, n, x):  # 2/b x^T x added to the old average: forgets to re-weight by n
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    return H + 2 / b * x.t() @ x, n + b


def ah_no_reshape(H, n, x):  # treats x as (tokens, in): (batch, seq, in) input crashes in x.t()
    b = x.shape[0]
    H = H * (n / (n + b))
    n = n + b
    x = (2 / n) ** 0.5 * x
    return H + x.t() @ x, n


def ah_returns_old_n(H, n, x):  # the right H, but the token count is not advanced
    H_new, _ = good_accumulate_hessian(H, n, x)
    return H_new, n


def ah_x_xT_orientation(H, n, x):  # x @ x.T: a (tokens, tokens) Gram matrix instead of (in, in)
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    H = H * (n / (n + b))
    n = n + b
    x = (2 / n) ** 0.5 * x
    return H + x @ x.t(), n


def ah_reweights_by_n_over_b(H, n, x):  # n / b instead of n / (n + b)
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    H = H * (n / b)
    n = n + b
    x = (2 / n) ** 0.5 * x
    return H + x.t() @ x, n


def ah_counts_sequences(H, n, x):  # n counts x.shape[0], the sequences of a (batch, seq, in) input, not tokens
    x2 = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    H = H * (n / (n + b))
    n = n + b
    return H + 2 / n * x2.t() @ x2, n


def ah_sum_returns_old_n(H, n, x):  # a running sum (fine for GPTQ), but the token count is not advanced
    x = x.reshape(-1, x.shape[-1]).float()
    return H + 2 * x.t() @ x, n


def ah_negated(H, n, x):  # -2/n sum x x^T: a scale, but not a positive one
    H_new, n_new = good_accumulate_hessian(-H, n, x)
    return -H_new, n_new


WRONG_HESSIAN = [  # (wrong function, a fragment of the failure message it must produce, or None)
    (ah_averages_this_batch_only, "three batches"),
    (ah_no_reshape, "raised RuntimeError"),
    (ah_returns_old_n, "output[1]"),
    (ah_x_xT_orientation, None),
    (ah_reweights_by_n_over_b, "three batches"),
    (ah_counts_sequences, "one batch (2, 16, 32)"),
    (ah_sum_returns_old_n, "output[1]"),
    (ah_negated, "must be positive"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 2


def _qdq(w, scale, zero, maxq):
    return (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale


def cs_no_division(W1, Hinv1, i, scale, zero, maxq):  # err = w - q, not divided by Hinv1[i, i]
    w = W1[:, i]
    q = _qdq(w, scale, zero, maxq)
    err = w - q
    W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
    return W1, q, err


def cs_divides_twice(W1, Hinv1, i, scale, zero, maxq):  # the update divides err by d again
    w, d = W1[:, i], Hinv1[i, i]
    q = _qdq(w, scale, zero, maxq)
    err = (w - q) / d
    W1[:, i:] -= torch.outer(err / d, Hinv1[i, i:])
    return W1, q, err


def cs_reads_the_column(W1, Hinv1, i, scale, zero, maxq):  # Hinv1[i:, i]: the factor is upper, not symmetric
    w, d = W1[:, i], Hinv1[i, i]
    q = _qdq(w, scale, zero, maxq)
    err = (w - q) / d
    W1[:, i:] -= torch.outer(err, Hinv1[i:, i])
    return W1, q, err


def cs_updates_all_columns_with_the_column(W1, Hinv1, i, scale, zero, maxq):  # earlier columns move too
    w, d = W1[:, i], Hinv1[i, i]
    q = _qdq(w, scale, zero, maxq)
    err = (w - q) / d
    W1 -= torch.outer(err, Hinv1[:, i])
    return W1, q, err


def cs_no_update(W1, Hinv1, i, scale, zero, maxq):  # plain RTN of the column: W1 is not touched
    w, d = W1[:, i], Hinv1[i, i]
    q = _qdq(w, scale, zero, maxq)
    return W1, q, (w - q) / d


def cs_error_sign(W1, Hinv1, i, scale, zero, maxq):  # err = (q - w) / d: pushes the error the wrong way
    w, d = W1[:, i], Hinv1[i, i]
    q = _qdq(w, scale, zero, maxq)
    err = (q - w) / d
    W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
    return W1, q, err


def cs_returns_codes(W1, Hinv1, i, scale, zero, maxq):  # q is the integer code, not the dequantized value
    w, d = W1[:, i], Hinv1[i, i]
    codes = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    err = (w - (codes - zero) * scale) / d
    W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
    return W1, codes, err


def cs_skips_column_i(W1, Hinv1, i, scale, zero, maxq):  # W1[:, i+1:] only: column i keeps w instead of q
    w, d = W1[:, i], Hinv1[i, i]
    q = _qdq(w, scale, zero, maxq)
    err = (w - q) / d
    W1[:, i + 1 :] -= torch.outer(err, Hinv1[i, i + 1 :])
    return W1, q, err


WRONG_COLUMN = [
    (cs_no_division, None),
    (cs_divides_twice, None),
    (cs_reads_the_column, None),
    (cs_updates_all_columns_with_the_column, None),
    (cs_no_update, None),
    (cs_error_sign, None),
    (cs_returns_codes, "output[1]"),
    (cs_skips_column_i, "output[0]"),
]


def cs_no_clamp(W1, Hinv1, i, scale, zero, maxq):  # codes outside [0, maxq] are kept
    w, d = W1[:, i], Hinv1[i, i]
    q = (torch.round(w / scale) + zero - zero) * scale
    err = (w - q) / d
    W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
    return W1, q, err


# ----------------------------------------------------------------------------- wrong answers: exercise 3


def ao_ascending(H, group_size):  # smallest activations first
    perm = torch.argsort(torch.diag(H))
    return perm, torch.argsort(perm) // group_size


def ao_g_idx_from_perm(H, group_size):  # perm // group_size: the group of the j-th QUANTIZED column's index
    perm = torch.argsort(torch.diag(H), descending=True)
    return perm, perm // group_size


def ao_static_g_idx(H, group_size):  # contiguous groups: right for static groups, not for dynamic ones
    perm = torch.argsort(torch.diag(H), descending=True)
    return perm, torch.arange(H.shape[0]) // group_size


def ao_row_sums(H, group_size):  # sorts by H.sum(1), not by the diagonal
    perm = torch.argsort(H.sum(dim=1), descending=True)
    return perm, torch.argsort(perm) // group_size


def ao_sorted_values(H, group_size):  # torch.sort(...).values: the diagonal entries, not the column indices
    values, perm = torch.sort(torch.diag(H), descending=True)
    return values, torch.argsort(perm) // group_size


def ao_groups_in_quantization_order(H, group_size):  # (arange // gs)[perm]: the permutation applied the wrong way
    perm = torch.argsort(torch.diag(H), descending=True)
    return perm, (torch.arange(H.shape[0]) // group_size)[perm]


WRONG_ACT_ORDER = [
    (ao_ascending, "output[0]"),
    (ao_g_idx_from_perm, "output[1]"),
    (ao_static_g_idx, "output[1]"),
    (ao_row_sums, "output[0]"),
    (ao_sorted_values, "expected integers"),
    (ao_groups_in_quantization_order, "output[1]"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 4


def re_weight_error(W, W_hat, X):  # ||W - W_hat||^2: ignores the inputs
    return ((W - W_hat) ** 2).sum()


def re_not_squared(W, W_hat, X):  # the Frobenius norm, not its square
    return torch.linalg.norm(X @ W.t() - X @ W_hat.t())


def re_mean(W, W_hat, X):  # mean over (tokens, out) instead of the sum
    return ((X @ W.t() - X @ W_hat.t()) ** 2).mean()


def re_no_transpose(W, W_hat, X):  # X @ W: (tokens, in) @ (out, in) does not multiply
    return ((X @ W - X @ W_hat) ** 2).sum()


def re_relative(W, W_hat, X):  # divided by ||X W^T||^2
    return ((X @ W.t() - X @ W_hat.t()) ** 2).sum() / ((X @ W.t()) ** 2).sum()


def re_half(W, W_hat, X):  # GPTQ's 1/2 e^T H e convention with H = X^T X: half the asked quantity
    return 0.5 * ((X @ (W - W_hat).t()) ** 2).sum()


def re_abs_sum(W, W_hat, X):  # L1 instead of squared error
    return (X @ W.t() - X @ W_hat.t()).abs().sum()


WRONG_RECON = [
    (re_weight_error, None),
    (re_not_squared, None),
    (re_mean, None),
    (re_no_transpose, "raised RuntimeError"),
    (re_relative, None),
    (re_half, None),
    (re_abs_sum, None),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 5


def _gptq_loop(W, H, bits, group_size, lazy_block, act_order, bug=None):
    """The exercise's loop written once, with one mistake switched on by `bug` (None: the correct loop)."""
    W, maxq = W.clone().float(), 2**bits - 1
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=bug != "ascending")
        W = W[:, perm]
        H = H if bug == "H not permuted" else H[perm][:, perm]
    if bug == "cholesky of H":
        U = torch.linalg.cholesky(H.double() + 0.01 * H.diag().mean() * torch.eye(H.shape[0]), upper=True).float()
    else:
        U = gptq.inverse_cholesky(H, 0.01)[0].float()
    n = W.shape[1]
    if bug == "static":
        static = [gptq.gptq_qparams(W[:, j : j + group_size], bits, sym=False) for j in range(0, n, group_size)]
    Q = torch.zeros_like(W)
    for i1 in range(0, n, lazy_block):
        i2 = min(i1 + lazy_block, n)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                if bug == "static":
                    scale, zero = static[col // group_size]
                elif bug == "qparams from the block":
                    scale, zero = gptq.gptq_qparams(W1[:, i : i + group_size], bits, sym=False)
                else:
                    scale, zero = gptq.gptq_qparams(W[:, col : col + group_size], bits, sym=False)
            W1, Q[:, col], Err1[:, i] = good_gptq_column_step(W1, U[i1:i2, i1:i2], i, scale[:, 0], zero[:, 0], maxq)
        if bug == "lazy update with q":
            W[:, i2:] -= Q[:, i1:i2] @ U[i1:i2, i2:]
        elif bug == "lazy update with w - q":
            W[:, i2:] -= (W[:, i1:i2] - Q[:, i1:i2]) @ U[i1:i2, i2:]
        elif bug != "no lazy update":
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if act_order and bug == "undone with perm":
        return Q[:, perm]
    if act_order and bug != "not undone":
        return Q[:, torch.argsort(perm)]
    return Q


def gq_no_lazy_update(*args):  # only the in-block updates: the later blocks never hear of this block's errors
    return _gptq_loop(*args, bug="no lazy update")


def gq_lazy_update_with_q(*args):  # the block's quantized values pushed onto the later columns, not its errors
    return _gptq_loop(*args, bug="lazy update with q")


def gq_lazy_update_with_w_minus_q(*args):  # the raw rounding errors, not divided by the pivots U[i, i]
    return _gptq_loop(*args, bug="lazy update with w - q")


def gq_static_qparams(*args):  # every group's qparams from the weights before any error feedback
    return _gptq_loop(*args, bug="static")


def gq_qparams_from_the_block(*args):  # W1[:, i : i + group_size]: a group that spans blocks sees only its first one
    return _gptq_loop(*args, bug="qparams from the block")


def gq_permutation_not_undone(*args):  # the columns come back in quantization order
    return _gptq_loop(*args, bug="not undone")


def gq_undone_with_perm(*args):  # Q[:, perm]: the permutation applied twice instead of inverted
    return _gptq_loop(*args, bug="undone with perm")


def gq_H_not_permuted(*args):  # W's columns reordered, H left in the original order: U belongs to other columns
    return _gptq_loop(*args, bug="H not permuted")


def gq_cholesky_of_H(*args):  # the upper Cholesky factor of H itself, not of its inverse
    return _gptq_loop(*args, bug="cholesky of H")


def gq_ascending(*args):  # act-order by diag(H) ascending: the least active channels first
    return _gptq_loop(*args, bug="ascending")


WRONG_GPTQ = [  # each with the case that catches it first
    (gq_no_lazy_update, "48 columns in blocks = groups of 16"),
    (gq_lazy_update_with_q, "48 columns in blocks = groups of 16"),
    (gq_lazy_update_with_w_minus_q, "48 columns in blocks = groups of 16"),
    (gq_static_qparams, "48 columns in blocks = groups of 16"),
    (gq_qparams_from_the_block, "blocks of 8 inside groups of 16"),
    (gq_permutation_not_undone, "act-order, blocks = groups of 16"),
    (gq_undone_with_perm, "act-order, blocks = groups of 16"),
    (gq_H_not_permuted, "act-order, blocks = groups of 16"),
    (gq_cholesky_of_H, "48 columns in blocks = groups of 16"),
    (gq_ascending, "act-order, blocks = groups of 16"),
]

WRONG = [(checks.check_accumulate_hessian, HESSIAN, fn, msg) for fn, msg in WRONG_HESSIAN]
WRONG += [(checks.check_column_step, COLUMN, fn, msg) for fn, msg in WRONG_COLUMN]
WRONG += [(checks.check_act_order, ACT_ORDER, fn, msg) for fn, msg in WRONG_ACT_ORDER]
WRONG += [(checks.check_reconstruction_error, RECON, fn, msg) for fn, msg in WRONG_RECON]
WRONG += [(checks.check_gptq, GPTQ, fn, msg) for fn, msg in WRONG_GPTQ]


# ----------------------------------------------------------------------------- correct alternatives


def alt_hessian_weighted_sum(H, n, x):  # (n H + 2 X^T X) / (n + b), einsum, no float() call
    x = x.reshape(-1, x.shape[-1])
    b = x.shape[0]
    return (n * H + 2 * torch.einsum("ti,tj->ij", x, x)) / (n + b), n + b


def alt_hessian_flatten(H, n, x):
    x = x.flatten(0, -2) if x.dim() > 2 else x
    b = len(x)
    n_new = n + b
    return H * n / n_new + 2 / n_new * (x.T @ x), n_new


def alt_hessian_running_sum(H, n, x):  # sum of 2 x x^T, n counted: a positive multiple of the average
    x = x.reshape(-1, x.shape[-1]).float()
    return H + 2 * x.t() @ x, n + x.shape[0]


def alt_hessian_no_factor_2(H, n, x):  # the average of x x^T: half the lab's H, the same GPTQ
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    H = H * (n / (n + b))
    n = n + b
    return H + x.t() @ x / n, n


def alt_column_matmul_copy(W1, Hinv1, i, scale, zero, maxq):  # a new W1 via matmul of (out, 1) @ (1, B - i)
    W1 = W1.clone()
    w = W1[:, i].clone()
    q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
    err = (w - q) / Hinv1[i, i]
    W1[:, i:] = W1[:, i:] - err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
    return W1, q, err


def alt_column_whole_row(W1, Hinv1, i, scale, zero, maxq):
    """W1 -= outer(err, Hinv1[i]) over ALL columns is right: Hinv1 is upper-triangular, so Hinv1[i, :i] == 0."""
    w = W1[:, i]
    q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
    err = (w - q) / Hinv1[i, i]
    W1 -= torch.outer(err, Hinv1[i])
    return W1, q, err


def alt_act_order_sort(H, group_size):
    _, perm = torch.sort(H.diagonal(), descending=True)
    return perm, perm.argsort() // group_size


def alt_act_order_negated(H, group_size):
    perm = torch.argsort(-torch.diag(H))
    g_idx = torch.zeros_like(perm)
    g_idx[perm] = torch.arange(len(perm)) // group_size
    return perm, g_idx


def alt_recon_trace(W, W_hat, X):  # tr(E X^T X E^T): the e^T H e form
    E = W - W_hat
    return torch.trace(E @ (X.t() @ X) @ E.t())


def alt_recon_norm_squared(W, W_hat, X):
    return torch.linalg.matrix_norm(X @ W.T - X @ W_hat.T) ** 2


def alt_gptq_no_blocks(W, H, bits, group_size, lazy_block, act_order):
    """Every column's update reaches all later columns at once (GPTQ without lazy batching): lazy_block unused."""
    W, maxq = W.clone().float(), 2**bits - 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    W, H = W[:, perm], H[perm][:, perm]
    U = gptq.inverse_cholesky(H, 0.01)[0].float()
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % group_size == 0:
            scale, zero = gptq.gptq_qparams(W[:, j : j + group_size], bits, sym=False)
        W, Q[:, j], _ = good_gptq_column_step(W, U, j, scale[:, 0], zero[:, 0], maxq)
    return Q[:, torch.argsort(perm)]


def alt_gptq_view_rank1_scatter(W, H, bits, group_size, lazy_block, act_order):
    """The block as a view of W (its updates land in W at once), the lazy update as rank-1 updates, the package's
    column step, the float32 dampening of the old ready-made loop, and the permutation undone by scattering."""
    W = W.clone()
    perm = torch.argsort(-H.diagonal()) if act_order else None
    if act_order:
        W, H = W[:, perm], H[:, perm][perm]
    H = H + 0.01 * H.diag().mean() * torch.eye(H.shape[0])
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True).float()
    cols = []
    for i1 in range(0, W.shape[1], lazy_block):
        W1 = W[:, i1 : i1 + lazy_block]  # a view
        errs = []
        for i in range(W1.shape[1]):
            if (i1 + i) % group_size == 0:
                scale, zero = gptq.gptq_qparams(W[:, i1 + i : i1 + i + group_size], bits, sym=False)
            _, q, err = gptq.column_step(W1, U[i1 : i1 + lazy_block, i1 : i1 + lazy_block], i, scale[:, 0],
                                         zero[:, 0], 2**bits - 1)
            cols.append(q)
            errs.append(err)
        for i, err in enumerate(errs):
            W[:, i1 + W1.shape[1] :] -= torch.outer(err, U[i1 + i, i1 + W1.shape[1] :])
    Q = torch.stack(cols, dim=1)
    if act_order:
        out = torch.empty_like(Q)
        out[:, perm] = Q
        return out
    return Q


def alt_gptq_float32_cholesky_scaled_H(W, H, bits, group_size, lazy_block, act_order):
    """H summed over 1000 tokens instead of averaged (the scale GPTQ does not see), factorised in float32."""
    H = 1000 * H
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0])
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = _gptq_blocks(W.clone(), U, bits, group_size, lazy_block)
    return Q[:, torch.argsort(perm)] if act_order else Q


def _gptq_blocks(W, U, bits, group_size, lazy_block):
    Q = torch.zeros_like(W)
    for i1 in range(0, W.shape[1], lazy_block):
        i2 = min(i1 + lazy_block, W.shape[1])
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                scale, zero = gptq.gptq_qparams(W[:, i1 + i : i1 + i + group_size], bits, sym=False)
            W1, Q[:, i1 + i], Err1[:, i] = good_gptq_column_step(W1, U[i1:i2, i1:i2], i, scale[:, 0], zero[:, 0],
                                                                 2**bits - 1)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q


CORRECT_ALTERNATIVES = [
    (checks.check_accumulate_hessian, HESSIAN, alt_hessian_weighted_sum),
    (checks.check_accumulate_hessian, HESSIAN, alt_hessian_flatten),
    (checks.check_accumulate_hessian, HESSIAN, alt_hessian_running_sum),
    (checks.check_accumulate_hessian, HESSIAN, alt_hessian_no_factor_2),
    (checks.check_column_step, COLUMN, alt_column_matmul_copy),
    (checks.check_column_step, COLUMN, alt_column_whole_row),
    (checks.check_act_order, ACT_ORDER, alt_act_order_sort),
    (checks.check_act_order, ACT_ORDER, alt_act_order_negated),
    (checks.check_reconstruction_error, RECON, alt_recon_trace),
    (checks.check_reconstruction_error, RECON, alt_recon_norm_squared),
    (checks.check_gptq, GPTQ, alt_gptq_no_blocks),
    (checks.check_gptq, GPTQ, alt_gptq_view_rank1_scatter),
    (checks.check_gptq, GPTQ, alt_gptq_float32_cholesky_scaled_H),
]


# ----------------------------------------------------------------------------- not done


def _sample_calls():
    """checker -> (args of one sample call, an independent computation of what the reference must return)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    xf = x.reshape(-1, 16)
    H = checks._spd(16, 9)
    W1 = torch.randn(6, 16, generator=g) * 0.1
    U = checks._hinv_upper(16, 2)
    scale, zero = gptq.gptq_qparams(W1, 4, sym=False)
    W_upd = W1.clone()
    _, q, err = gptq.column_step(W_upd, U, 3, scale[:, 0], zero[:, 0], 15)
    perm = torch.argsort(torch.diag(H), descending=True)
    g_idx = torch.empty_like(perm)
    g_idx[perm] = torch.arange(16) // 4
    W = torch.randn(5, 16, generator=g)
    W_hat = quant.fake_quantize(W, 3, 16)
    W_layer, H_layer = checks._calibrated_layer(6, 24, seed=8)
    return {
        checks.check_accumulate_hessian: ((torch.zeros(16, 16), 0, x), (2 / 15 * xf.t() @ xf, 15)),
        checks.check_column_step: ((W1, U, 3, scale[:, 0], zero[:, 0], 15), (W_upd, q, err)),
        checks.check_act_order: ((H, 4), (perm, g_idx)),
        checks.check_reconstruction_error: ((W, W_hat, xf), ((xf @ (W - W_hat).t()) ** 2).sum()),
        checks.check_gptq: ((W_layer, H_layer, 4, 8, 4, True), _gptq_loop(W_layer, H_layer, 4, 8, 4, True)),
    }


def test_not_done_column_step_reference_leaves_the_callers_block_alone(capsys):
    """The reference handed back for exercise 2 returns the updated block; the lab rebinds W to it."""
    def todo(*args):
        raise NotImplementedError

    ref = checks.check_column_step(todo)
    capsys.readouterr()
    (W1, U, i, scale, zero, maxq), (W_upd, _, _) = _sample_calls()[checks.check_column_step]
    before = W1.clone()
    W_new, _, _ = ref(W1, U, i, scale, zero, maxq)
    torch.testing.assert_close(W_new, W_upd)
    assert torch.equal(W_new[:, i], ref(W1, U, i, scale, zero, maxq)[1])  # column i becomes q
    assert torch.equal(W1, before)


# ----------------------------------------------------------------------------- failed


def test_returning_none_is_a_failure(capsys):
    def forgot_return(W, W_hat, X):
        ((X @ (W - W_hat).t()) ** 2).sum()

    assert_failed(checks.check_reconstruction_error, RECON, forgot_return, capsys,
                   "expected a torch.Tensor, got NoneType")


def test_column_step_without_clamp_is_rejected(capsys):
    assert_failed(checks.check_column_step, COLUMN, cs_no_clamp, capsys)


def test_the_missing_clamp_matters_in_gptq():
    """Why the gap above is a real one: GPTQ's updates push codes outside [0, maxq] on ordinary data."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 128, generator=g) * 0.05
    X = torch.randn(512, 128, generator=g)
    X = (X + X @ torch.randn(128, 128, generator=g) * 0.5) * torch.linspace(0.2, 4.0, 128)
    H = 2 / X.shape[0] * X.t() @ X
    Hinv, _ = gptq.inverse_cholesky(H, 0.01)
    Hinv = Hinv.float()
    W1 = W[:, :64].clone()
    scale, zero = gptq.gptq_qparams(W1, 3, sym=False)
    outside = 0
    for i in range(64):  # one group of 64 columns, 3-bit, qparams fixed at the group's start
        w = W1[:, i]
        raw = torch.round(w / scale[:, 0]) + zero[:, 0]
        outside += int(((raw < 0) | (raw > 7)).sum())
        good_gptq_column_step(W1, Hinv[:64, :64], i, scale[:, 0], zero[:, 0], 7)
    assert outside > 0


def test_a_running_sum_or_no_factor_2_passes_with_a_note(capsys):
    """H up to a positive scale passes exercise 1, and the checker says by what factor the participant's H differs."""
    for fn, factor in ((alt_hessian_running_sum, "32 x"), (alt_hessian_no_factor_2, "0.5 x")):
        assert checks.check_accumulate_hessian(fn) is fn
        out = capsys.readouterr().out
        assert "PASSED" in out and f"your H is {factor} the lab's" in out, out
    checks.check_accumulate_hessian(good_accumulate_hessian)
    assert "note" not in capsys.readouterr().out


def test_gptq_does_not_see_a_positive_scale_of_H():
    """Why exercise 1 accepts a sum: the dampening is relative to mean diag H, so c * H gives the same weights."""
    W, H = checks._calibrated_layer(16, 48, seed=3)
    ref = gptq.gptq_quantize_weight(W, H, 4, 16, act_order=True).dequantized
    for c in (0.5, 384.0, 1000.0):
        torch.testing.assert_close(gptq.gptq_quantize_weight(W, c * H, 4, 16, act_order=True).dequantized, ref,
                                   atol=1e-3, rtol=0)


def test_the_second_failure_adds_the_stronger_hint(capsys):
    checks.FAILURES.pop(GPTQ, None)
    first = assert_failed(checks.check_gptq, GPTQ, gq_no_lazy_update, capsys)
    assert "a second failure shows a stronger hint" in first and "stronger hint (attempt" not in first
    second = assert_failed(checks.check_gptq, GPTQ, gq_static_qparams, capsys)
    assert "stronger hint (attempt 2)" in second and "W[:, i2:] -= Err1 @ U[i1:i2, i2:]" in second
    checks.FAILURES.pop(GPTQ, None)


@pytest.mark.parametrize("checker", [checks.check_accumulate_hessian, checks.check_column_step,
                                     checks.check_act_order, checks.check_reconstruction_error, checks.check_gptq])
def test_every_checker_has_a_stronger_hint(checker, capsys):
    wrong = next(fn for c, _, fn, _ in WRONG if c is checker)
    name = GOOD[checker][0]
    checks.FAILURES.pop(name, None)
    checker(wrong)
    assert "stronger hint (attempt 2)" not in capsys.readouterr().out
    checker(wrong)
    assert "stronger hint (attempt 2)" in capsys.readouterr().out
    checks.FAILURES.pop(name, None)


# ----------------------------------------------------------------------------- inputs are cloned per call


def mut_hessian(H, n, x):
    H_new, n_new = good_accumulate_hessian(H, n, x)
    H.mul_(0), x.mul_(0)
    return H_new, n_new


def mut_column_step(W1, Hinv1, i, scale, zero, maxq):  # the lab's solution updates W1 in place: this is expected
    out = good_gptq_column_step(W1, Hinv1, i, scale, zero, maxq)
    Hinv1.mul_(2), scale.mul_(0)
    return out


def mut_act_order(H, group_size):
    out = good_act_order(H, group_size)
    H.zero_()
    return out


def mut_recon(W, W_hat, X):
    out = good_reconstruction_error(W, W_hat, X)
    W.zero_(), X.zero_()
    return out


def mut_gptq(W, H, bits, group_size, lazy_block, act_order):
    out = good_my_gptq(W, H, bits, group_size, lazy_block, act_order)
    W.zero_(), H.mul_(2)
    return out


MUTATING = [(checks.check_accumulate_hessian, HESSIAN, mut_hessian),
            (checks.check_column_step, COLUMN, mut_column_step),
            (checks.check_act_order, ACT_ORDER, mut_act_order), (checks.check_reconstruction_error, RECON, mut_recon),
            (checks.check_gptq, GPTQ, mut_gptq)]


def test_summary_of_the_lab02_exercises(capsys):
    checks.check_accumulate_hessian(good_accumulate_hessian)
    checks.check_column_step(cs_divides_twice)
    checks.check_reconstruction_error(good_reconstruction_error)

    def todo(H, group_size):
        raise NotImplementedError

    checks.check_act_order(todo)
    checks.check_gptq(good_my_gptq)
    result, lines = summary_lines(capsys)
    assert result == {HESSIAN: "passed", COLUMN: "failed", RECON: "passed", ACT_ORDER: "not done", GPTQ: "passed"}
    assert len(lines) == 6 and lines[-1] == "3/5 exercises passed"


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    ORDER = [checks.check_accumulate_hessian, checks.check_column_step, checks.check_reconstruction_error,
             checks.check_act_order, checks.check_gptq]  # the lab's order (GOOD lists act-order before exercise 3)
    NAMESPACE = {"cl": cl}  # my_gptq calls cl.gptq and the lab's own gptq_column_step (compiled before it)
    sample_calls = staticmethod(_sample_calls)
