"""The lab 02 (GPTQ) checkers: the solution passes, a skipped exercise is "not done", and plausible wrong answers fail.

Same structure as tests/test_checks.py. Every wrong implementation below was run against the checker's cases and
is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded: the checkers only run small fixed tensors.
"""

from pathlib import Path

import pytest
import torch
from checker_testing import (CheckerSuite, assert_failed, summary_lines)

from compresslab import checks, gptq, quant

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "02_gptq.py"

HESSIAN = "Exercise 1 · accumulate_hessian"
COLUMN = "Exercise 2 · gptq_column_step"
ACT_ORDER = "Exercise 4 · act_order"
RECON = "Exercise 3 · reconstruction_error"

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


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_accumulate_hessian: (HESSIAN, good_accumulate_hessian, "accumulate_hessian"),
    checks.check_column_step: (COLUMN, good_gptq_column_step, "gptq_column_step"),
    checks.check_act_order: (ACT_ORDER, good_act_order, "act_order"),
    checks.check_reconstruction_error: (RECON, good_reconstruction_error, "reconstruction_error"),
}


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def ah_plain_sum(H, n, x):  # a running sum of 2 x x^T, never divided by the token count
    x = x.reshape(-1, x.shape[-1]).float()
    return H + 2 * x.t() @ x, n + x.shape[0]


def ah_averages_this_batch_only(H, n, x):  # 2/b x^T x added to the old average: forgets to re-weight by n
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    return H + 2 / b * x.t() @ x, n + b


def ah_no_factor_2(H, n, x):  # the average of x x^T, not of 2 x x^T
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    H = H * (n / (n + b))
    n = n + b
    return H + x.t() @ x / n, n


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


WRONG_HESSIAN = [  # (wrong function, a fragment of the failure message it must produce, or None)
    (ah_plain_sum, None),
    (ah_averages_this_batch_only, "a later batch"),
    (ah_no_factor_2, None),
    (ah_no_reshape, "raised RuntimeError"),
    (ah_returns_old_n, "output[1]"),
    (ah_x_xT_orientation, None),
    (ah_reweights_by_n_over_b, "a later batch"),
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

WRONG = [(checks.check_accumulate_hessian, HESSIAN, fn, msg) for fn, msg in WRONG_HESSIAN]
WRONG += [(checks.check_column_step, COLUMN, fn, msg) for fn, msg in WRONG_COLUMN]
WRONG += [(checks.check_act_order, ACT_ORDER, fn, msg) for fn, msg in WRONG_ACT_ORDER]
WRONG += [(checks.check_reconstruction_error, RECON, fn, msg) for fn, msg in WRONG_RECON]


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


CORRECT_ALTERNATIVES = [
    (checks.check_accumulate_hessian, HESSIAN, alt_hessian_weighted_sum),
    (checks.check_accumulate_hessian, HESSIAN, alt_hessian_flatten),
    (checks.check_column_step, COLUMN, alt_column_matmul_copy),
    (checks.check_column_step, COLUMN, alt_column_whole_row),
    (checks.check_act_order, ACT_ORDER, alt_act_order_sort),
    (checks.check_act_order, ACT_ORDER, alt_act_order_negated),
    (checks.check_reconstruction_error, RECON, alt_recon_trace),
    (checks.check_reconstruction_error, RECON, alt_recon_norm_squared),
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
    return {
        checks.check_accumulate_hessian: ((torch.zeros(16, 16), 0, x), (2 / 15 * xf.t() @ xf, 15)),
        checks.check_column_step: ((W1, U, 3, scale[:, 0], zero[:, 0], 15), (W_upd, q, err)),
        checks.check_act_order: ((H, 4), (perm, g_idx)),
        checks.check_reconstruction_error: ((W, W_hat, xf), ((xf @ (W - W_hat).t()) ** 2).sum()),
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


MUTATING = [(checks.check_accumulate_hessian, HESSIAN, mut_hessian),
            (checks.check_column_step, COLUMN, mut_column_step),
            (checks.check_act_order, ACT_ORDER, mut_act_order), (checks.check_reconstruction_error, RECON, mut_recon)]


def test_summary_of_the_lab02_exercises(capsys):
    checks.check_accumulate_hessian(good_accumulate_hessian)
    checks.check_column_step(cs_divides_twice)
    checks.check_reconstruction_error(good_reconstruction_error)

    def todo(H, group_size):
        raise NotImplementedError

    checks.check_act_order(todo)
    result, lines = summary_lines(capsys)
    assert result == {HESSIAN: "passed", COLUMN: "failed", RECON: "passed", ACT_ORDER: "not done"}
    assert len(lines) == 5 and lines[-1] == "2/4 exercises passed"


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    ORDER = [checks.check_accumulate_hessian, checks.check_column_step, checks.check_reconstruction_error,
             checks.check_act_order]  # the lab checks exercise 4 (reconstruction error) before 3 (act-order)
    sample_calls = staticmethod(_sample_calls)
