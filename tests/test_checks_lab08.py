"""The lab 08 (low rank and the capstone) checkers: the solution passes, a skipped exercise is "not done", and wrong
answers fail.

Same structure as tests/test_checks_lab07.py. Every wrong implementation below was run against the checker's cases and
is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded: the checkers only factorize small fixed matrices (at most 96 x 80), count integers and pick rows
of a fixed table. Exercises 1 and 3 are checked by the product A @ B (how S is split between the factors is the
participant's choice) after the shapes of the two thin factors; exercise 4 by which recipe was chosen (the row, a copy
of it or its method name); _case_verdicts below runs a checker one case at a time, to show which cases catch which
mistake. The last test checks that the capstone section needs nothing from the first half but the parameters.
"""

import ast
import builtins
import fractions
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from checker_testing import (CheckerSuite, assert_failed, summary_lines)

from compresslab import checks
from compresslab import lowrank, stack

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "08_lowrank_capstone.py"

TRUNCATED_SVD = "Exercise 1 · truncated_svd"
BREAK_EVEN = "Exercise 2 · break_even_rank"
ASVD = "Exercise 3 · asvd_factors"
CHOOSE = "Exercise 4 · choose_recipe"
CONTEXT = 4096  # the lab's parameter: the default context of its choose_recipe

# one torch thread for the module (tiny matrices); every test starts and ends with an empty exercise table
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/08_lowrank_capstone.py (### BEGIN / END SOLUTION);
# test_good_copies_match_the_lab_solutions keeps them in sync. good_asvd_factors calls good_truncated_svd where the lab
# calls its truncated_svd (the good_ prefix is dropped when comparing); good_break_even_rank uses math, as the lab does.


def good_truncated_svd(W, rank):
    """W (d_out, d_in) -> A (d_out, rank), B (rank, d_in) with A @ B the best rank-`rank` approximation of W."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in); S descending
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def good_break_even_rank(d_out, d_in):
    """The largest rank r with r * (d_out + d_in) < d_out * d_in."""
    return math.ceil(d_out * d_in / (d_out + d_in)) - 1


def good_asvd_factors(W, scale, rank):
    """Truncate W diag(scale) to `rank`, then undo the scaling in B: A @ B approximates W itself."""
    A, B = good_truncated_svd(W * scale, rank)
    return A, B / scale


def good_choose_recipe(rows, budget_bytes, *, context=CONTEXT, batch=1):
    """The row of `rows` with the lowest perplexity among those whose weights + KV cache (context tokens x batch
    sequences) fit in budget_bytes; fewer bytes on a perplexity tie; None when none fits."""
    def total(r):  # the weights once, one cache per sequence
        return r["weight_bytes"] + r["kv_bytes_per_token"] * context * batch

    fits = [r for r in rows if total(r) <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], total(r)), default=None)  # best perplexity, then fewer bytes


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_truncated_svd: (TRUNCATED_SVD, good_truncated_svd, "truncated_svd"),
    checks.check_break_even_rank: (BREAK_EVEN, good_break_even_rank, "break_even_rank"),
    checks.check_asvd_factors: (ASVD, good_asvd_factors, "asvd_factors"),
    checks.check_choose_recipe: (CHOOSE, good_choose_recipe, "choose_recipe"),
}
FACTOR_CHECKERS = [checks.check_truncated_svd, checks.check_asvd_factors]  # break_even_rank gets ints


def _svd(W):
    """The thin SVD (float32, as the lab's solution computes it): U (d_out, k), S (k,) descending, Vh (k, d_in)."""
    return torch.linalg.svd(W.float(), full_matrices=False)


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def ts_smallest(W, rank):  # the LAST `rank` singular triplets: the smallest; right only at full rank
    U, S, Vh = _svd(W)
    return U[:, -rank:] * S[-rank:], Vh[-rank:]


def ts_no_singular_values(W, rank):  # S dropped: A = U_r, B = Vh_r (right only where the kept S are all 1)
    U, S, Vh = _svd(W)
    return U[:, :rank], Vh[:rank]


def ts_s_twice(W, rank):  # S in both factors: A @ B = U S^2 Vh
    U, S, Vh = _svd(W)
    return U[:, :rank] * S[:rank], S[:rank, None] * Vh[:rank]


def ts_dense_factors(W, rank):  # the truncation itself and an identity: the product is right, but nothing is saved
    U, S, Vh = _svd(W)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank], torch.eye(W.shape[1])


def ts_rank_plus_one(W, rank):  # slices :rank + 1 (one triplet too many)
    U, S, Vh = _svd(W)
    return U[:, : rank + 1] * S[: rank + 1], Vh[: rank + 1]


def ts_vh_as_v(W, rank):  # Vh read as V (numpy/torch.svd confusion): B = Vh[:, :r].T, columns instead of rows
    U, S, Vh = _svd(W)
    return U[:, :rank] * S[:rank], Vh[:, :rank].T


def ts_svd_of_transpose(W, rank):  # factors of W.T, not swapped back: A (d_in, r), B (r, d_out), A @ B ~ W.T
    U, S, Vh = _svd(W.T)
    return U[:, :rank] * S[:rank], Vh[:rank]


def ts_b_transposed(W, rank):  # B returned as (d_in, rank), the way nn.Linear would NOT store it
    U, S, Vh = _svd(W)
    return U[:, :rank] * S[:rank], Vh[:rank].T


def ts_eigh_unsorted(W, rank):  # V from eigh(W^T W): eigenvalues come ASCENDING, so V[:, :r] are the smallest
    _, V = torch.linalg.eigh(W.T @ W)  # (d_in, d_in)
    Vr = V[:, :rank]
    return W @ Vr, Vr.T


def ts_single_matrix(W, rank):  # the rank-r approximation itself, not its two factors
    U, S, Vh = _svd(W)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def ts_numpy_factors(W, rank):  # numpy's SVD, factors never converted back to torch
    U, S, Vh = np.linalg.svd(W.numpy(), full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


WRONG_TRUNCATED_SVD = [  # (wrong function, a fragment of the failure message it must produce, or None)
    (ts_smallest, "square 48 x 48, rank 8"),
    (ts_no_singular_values, "square 48 x 48, rank 8"),
    (ts_s_twice, "square 48 x 48, rank 8"),
    (ts_dense_factors, "two thin factors"),
    (ts_rank_plus_one, "A is (48, 9) and B (9, 48); expected A (48, 8) and B (8, 48)"),
    (ts_vh_as_v, "largest |error|"),  # right shapes on the square case, wrong values
    (ts_svd_of_transpose, "largest |error|"),  # ditto: W.T's truncation
    (ts_b_transposed, "A is (48, 8) and B (48, 8)"),
    (ts_eigh_unsorted, "largest |error|"),
    (ts_single_matrix, "return two factors (A, B), got Tensor"),
    (ts_numpy_factors, "return torch tensors, got ndarray"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 2


def be_floor(d_out, d_in):  # floor(d_out d_in / (d_out + d_in)): at an exact division that rank saves nothing
    return math.floor(d_out * d_in / (d_out + d_in))


def be_threshold_float(d_out, d_in):  # the break-even point itself, a float: not the largest integer rank below it
    return d_out * d_in / (d_out + d_in)


def be_half_min(d_out, d_in):  # "half the full rank": true for square matrices only, and even there one too many
    return min(d_out, d_in) // 2


def be_loop_le(d_out, d_in):  # counts up while r (d_out + d_in) <= d_out d_in: the equal case counted as saving
    r = 0
    while (r + 1) * (d_out + d_in) <= d_out * d_in:
        r += 1
    return r


def be_floor_minus_one(d_out, d_in):  # // then - 1: right at exact divisions only, one too few elsewhere
    return d_out * d_in // (d_out + d_in) - 1


def be_at_least_one(d_out, d_in):  # never below rank 1: but for 1 x 1 rank 1 stores 2 numbers instead of 1
    return max(1, math.ceil(d_out * d_in / (d_out + d_in)) - 1)


WRONG_BREAK_EVEN = [
    (be_floor, "576 x 576 (SmolLM2 q_proj)"),
    (be_threshold_float, "return an int (a rank), got float 288.0"),
    (be_half_min, "288, expected 287"),
    (be_loop_le, "576 x 576 (SmolLM2 q_proj)"),
    (be_floor_minus_one, "1536 x 576 (up_proj)"),  # the first case that is no exact division
    (be_at_least_one, "1 x 1: no rank saves anything"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 3


def asvd_no_unscaling(W, scale, rank):  # truncates W diag(s) and stops: A @ B approximates W diag(s), not W
    return good_truncated_svd(W * scale, rank)


def asvd_scales_rows(W, scale, rank):  # diag(s) W: scales the OUTPUT rows (and unscales them in A)
    A, B = good_truncated_svd(scale[:, None] * W, rank)
    return A / scale[:, None], B


def asvd_times_scale(W, scale, rank):  # multiplies B by the scale instead of dividing
    A, B = good_truncated_svd(W * scale, rank)
    return A, B * scale


def asvd_divides_A(W, scale, rank):  # folds 1/s into A's rows: only broadcasts on a square W, silently wrong there
    A, B = good_truncated_svd(W * scale, rank)
    return A / scale[:, None], B


def asvd_plain_svd(W, scale, rank):  # the scale ignored: plain SVD
    return good_truncated_svd(W, rank)


def asvd_scale_squared(W, scale, rank):  # alpha applied again on top of the ASVD scale: s^2 (consistently)
    A, B = good_truncated_svd(W * scale**2, rank)
    return A, B / scale**2


def asvd_sqrt_scale(W, scale, rank):  # sqrt(s) (consistently): the scale is already ||X_j||^alpha
    A, B = good_truncated_svd(W * scale.sqrt(), rank)
    return A, B / scale.sqrt()


def asvd_unscale_only(W, scale, rank):  # plain SVD of W, then B / s: "undoes" a scaling that was never applied
    A, B = good_truncated_svd(W, rank)
    return A, B / scale


WRONG_ASVD = [
    (asvd_no_unscaling, "tall 64 x 32 with three outlier input channels"),
    (asvd_scales_rows, "raised RuntimeError"),  # a tall W: 32 scales do not broadcast over 64 rows
    (asvd_times_scale, "tall 64 x 32 with three outlier input channels"),
    (asvd_divides_A, "raised RuntimeError"),
    (asvd_plain_svd, "tall 64 x 32 with three outlier input channels"),
    (asvd_scale_squared, "tall 64 x 32 with three outlier input channels"),
    (asvd_sqrt_scale, "tall 64 x 32 with three outlier input channels"),
    (asvd_unscale_only, "tall 64 x 32 with three outlier input channels"),
]



# ----------------------------------------------------------------------------- wrong answers: exercise 4


def _bytes(r, context, batch):
    """What a deployment of row r holds (the lab's formula, written out independently of compresslab.stack)."""
    return r["weight_bytes"] + r["kv_bytes_per_token"] * context * batch


def cr_weights_only(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the KV cache left out: "a model is its weights"
    fits = [r for r in rows if r["weight_bytes"] <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], r["weight_bytes"]), default=None)


def cr_one_cache(rows, budget_bytes, *, context=CONTEXT, batch=1):  # one cache whatever the batch
    fits = [r for r in rows if _bytes(r, context, 1) <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], _bytes(r, context, 1)), default=None)


def cr_table_kv(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the table's kv_mb (the cache at 4096 tokens) per
    def total(r):  # sequence: the context argument never used
        return r["weight_bytes"] + r["kv_mb"] * 1e6 * batch

    fits = [r for r in rows if total(r) <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], total(r)), default=None)


def cr_batch_times_all(rows, budget_bytes, *, context=CONTEXT, batch=1):  # (weights + cache) x batch: the weights
    def total(r):  # counted once per sequence, as if each chat had its own copy of the model
        return (r["weight_bytes"] + r["kv_bytes_per_token"] * context) * batch

    fits = [r for r in rows if total(r) <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], total(r)), default=None)


def cr_mb_against_bytes(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the total in MB, the budget in bytes:
    def total_mb(r):  # every recipe "fits"
        return r["weight_mb"] + r["kv_bytes_per_token"] * context * batch / 1e6

    fits = [r for r in rows if total_mb(r) <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], total_mb(r)), default=None)


def cr_strict(rows, budget_bytes, *, context=CONTEXT, batch=1):  # < : a recipe needing exactly the budget is left out
    fits = [r for r in rows if _bytes(r, context, batch) < budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], _bytes(r, context, batch)), default=None)


def cr_smallest(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the smallest recipe that fits, not the best one
    fits = [r for r in rows if _bytes(r, context, batch) <= budget_bytes]
    return min(fits, key=lambda r: _bytes(r, context, batch), default=None)


def cr_worst(rows, budget_bytes, *, context=CONTEXT, batch=1):  # max(): the HIGHEST perplexity that fits
    fits = [r for r in rows if _bytes(r, context, batch) <= budget_bytes]
    return max(fits, key=lambda r: r["ppl"], default=None)


def cr_first_fit(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the first row that fits: the table's order is
    return next((r for r in rows if _bytes(r, context, batch) <= budget_bytes), None)  # no ranking


def cr_min_of_nothing(rows, budget_bytes, *, context=CONTEXT, batch=1):  # min() without default: raises on an empty
    fits = [r for r in rows if _bytes(r, context, batch) <= budget_bytes]  # list when nothing fits
    return min(fits, key=lambda r: (r["ppl"], _bytes(r, context, batch)))


def cr_smallest_if_nothing_fits(rows, budget_bytes, *, context=CONTEXT, batch=1):  # "something beats nothing": the
    fits = [r for r in rows if _bytes(r, context, batch) <= budget_bytes]  # smallest recipe, over the budget
    if not fits:
        return min(rows, key=lambda r: _bytes(r, context, batch))
    return min(fits, key=lambda r: (r["ppl"], _bytes(r, context, batch)))


def cr_no_tie_break(rows, budget_bytes, *, context=CONTEXT, batch=1):  # perplexity alone: of two tied rows the first,
    fits = [r for r in rows if _bytes(r, context, batch) <= budget_bytes]  # whatever their bytes
    return min(fits, key=lambda r: r["ppl"], default=None)


def cr_tie_break_bigger(rows, budget_bytes, *, context=CONTEXT, batch=1):  # on a tie the BIGGER recipe ("more bytes,
    fits = [r for r in rows if _bytes(r, context, batch) <= budget_bytes]  # more quality")
    return min(fits, key=lambda r: (r["ppl"], -_bytes(r, context, batch)), default=None)


def cr_index(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the row's position, not the row
    best = good_choose_recipe(rows, budget_bytes, context=context, batch=batch)
    return None if best is None else rows.index(best)


WRONG_CHOOSE = [
    (cr_weights_only, "300 MB, one chat of 4096 tokens"),
    (cr_one_cache, "512 MB, 4 chats of 4096 tokens"),
    (cr_table_kv, "768 MB, one document of 32 768 tokens"),
    (cr_batch_times_all, "512 MB, 4 chats of 4096 tokens"),
    (cr_mb_against_bytes, "300 MB, one chat of 4096 tokens"),
    (cr_strict, "exactly what GPTQ 4-bit + KIVI-4 needs for 16 chats of 4096 tokens: <= fits\": None (nothing fits)"),
    (cr_smallest, "'GPTQ 4-bit + KIVI-4 KV' (needs 140.5 MB, perplexity 19.35), expected 'dense'"),
    (cr_worst, "'student 20L + KD + GPTQ 4-bit' (needs 157.7 MB, perplexity 54.31), expected 'dense'"),
    (cr_first_fit, "300 MB, one chat of 4096 tokens"),
    (cr_min_of_nothing, "raised ValueError: min() arg is an empty sequence"),
    (cr_smallest_if_nothing_fits, "128 MB, one chat of 4096 tokens: nothing fits"),
    (cr_no_tie_break, "'GPTQ 4-bit' (needs 208.3 MB, perplexity 19.15), expected 'GPTQ 4-bit + KIVI-8 KV'"),
    (cr_tie_break_bigger, "a perplexity tie"),
    (cr_index, "got int 0 (an index? return rows[i])"),
]

WRONG = [(checks.check_truncated_svd, TRUNCATED_SVD, fn, msg) for fn, msg in WRONG_TRUNCATED_SVD]
WRONG += [(checks.check_break_even_rank, BREAK_EVEN, fn, msg) for fn, msg in WRONG_BREAK_EVEN]
WRONG += [(checks.check_asvd_factors, ASVD, fn, msg) for fn, msg in WRONG_ASVD]
WRONG += [(checks.check_choose_recipe, CHOOSE, fn, msg) for fn, msg in WRONG_CHOOSE]


# ----------------------------------------------------------------------------- correct alternatives


def alt_truncated_svd_S_in_A(W, rank):  # (U_r S_r, Vh_r)
    U, S, Vh = _svd(W)
    return U[:, :rank] * S[:rank], Vh[:rank]


def alt_truncated_svd_S_in_B(W, rank):  # (U_r, S_r Vh_r)
    U, S, Vh = _svd(W)
    return U[:, :rank], S[:rank, None] * Vh[:rank]


def alt_truncated_svd_diag(W, rank):  # torch.diag and matrix products
    U, S, Vh = _svd(W)
    return U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank]


def alt_truncated_svd_float64(W, rank):  # computed and returned in float64
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


def alt_truncated_svd_float64_to_float32(W, rank):  # computed in float64, returned in W's dtype
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).to(W.dtype), (root[:, None] * Vh[:rank]).to(W.dtype)


def alt_truncated_svd_numpy(W, rank):  # numpy's SVD, converted back to torch
    U, S, Vh = np.linalg.svd(W.numpy(), full_matrices=False)
    return torch.from_numpy(U[:, :rank] * S[:rank]), torch.from_numpy(Vh[:rank].copy())


def alt_truncated_svd_full_matrices(W, rank):  # full_matrices=True (the default): the first r columns are the same
    U, S, Vh = torch.linalg.svd(W)
    return U[:, :rank] * S[:rank], Vh[:rank]


def alt_truncated_svd_of_transpose(W, rank):  # SVD of W.T, swapped back: W = (V' S) U'^T
    U, S, Vh = torch.linalg.svd(W.T, full_matrices=False)
    return Vh[:rank].T * S[:rank], U[:, :rank].T


def alt_truncated_svd_eigh_sorted(W, rank):  # eigh of W^T W in float64, eigenvalues sorted DESCENDING: V_r spans
    evals, V = torch.linalg.eigh(W.double().T @ W.double())  # the top right singular vectors; A = W V_r
    Vr = V[:, evals.argsort(descending=True)[:rank]]
    return W.double() @ Vr, Vr.T


def alt_break_even_loop(d_out, d_in):  # counts up while the next rank still stores strictly fewer numbers
    r = 0
    while (r + 1) * (d_out + d_in) < d_out * d_in:
        r += 1
    return r


def alt_break_even_minus_one_floor(d_out, d_in):  # integers only: r (d_out + d_in) <= d_out d_in - 1
    return (d_out * d_in - 1) // (d_out + d_in)


def alt_break_even_divmod(d_out, d_in):  # the quotient, one less at an exact division
    q, rem = divmod(d_out * d_in, d_out + d_in)
    return q - 1 if rem == 0 else q


def alt_break_even_fraction(d_out, d_in):  # exact rational arithmetic
    return math.ceil(fractions.Fraction(d_out * d_in, d_out + d_in)) - 1


def alt_break_even_numpy_int(d_out, d_in):  # np.int64 (an integer the lab can format with :d and slice with)
    params = np.int64(d_out) * d_in
    return (params - 1) // (d_out + d_in)


def alt_asvd_diag(W, scale, rank):  # torch.diag(scale) matrix products
    A, B = good_truncated_svd(W @ torch.diag(scale), rank)
    return A, B @ torch.diag(1 / scale)


def alt_asvd_own_svd(W, scale, rank):  # an SVD of its own, S kept in A
    U, S, Vh = torch.linalg.svd(W * scale[None, :], full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank] / scale[None, :]


def alt_asvd_reciprocal(W, scale, rank):  # multiplies B by the reciprocal
    A, B = good_truncated_svd(W * scale, rank)
    return A, B * scale.reciprocal()


def alt_asvd_float64(W, scale, rank):  # float64 throughout, float32 out
    U, S, Vh = torch.linalg.svd(W.double() * scale.double(), full_matrices=False)
    A, B = U[:, :rank], S[:rank, None] * Vh[:rank] / scale.double()
    return A.float(), B.float()


def alt_asvd_in_place(W, scale, rank):  # scales its W in place (the checker passes clones)
    A, B = good_truncated_svd(W.mul_(scale), rank)
    return A, B.div_(scale)


def alt_choose_sorted(rows, budget_bytes, *, context=CONTEXT, batch=1):  # sort by (perplexity, bytes), take the first
    fits = sorted((r for r in rows if _bytes(r, context, batch) <= budget_bytes),
                  key=lambda r: (r["ppl"], _bytes(r, context, batch)))
    return fits[0] if fits else None


def alt_choose_loop(rows, budget_bytes, *, context=CONTEXT, batch=1):  # one pass, keeping the best so far
    best = None
    for r in rows:
        need = r["weight_bytes"] + r["kv_bytes_per_token"] * context * batch
        if need > budget_bytes:
            continue
        if best is None or r["ppl"] < best[0]["ppl"] or (r["ppl"] == best[0]["ppl"] and need < best[1]):
            best = (r, need)
    return None if best is None else best[0]


def alt_choose_name(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the recipe's name (the lab prints either)
    best = good_choose_recipe(rows, budget_bytes, context=context, batch=batch)
    return None if best is None else best["method"]


def alt_choose_annotated_copy(rows, budget_bytes, *, context=CONTEXT, batch=1):  # a copy of the row, with its bytes
    fits = [dict(r, deployment_bytes=_bytes(r, context, batch)) for r in rows]
    fits = [r for r in fits if r["deployment_bytes"] <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], r["deployment_bytes"]), default=None)


def alt_choose_pandas(rows, budget_bytes, *, context=CONTEXT, batch=1):  # a DataFrame: the chosen row is a Series
    df = pd.DataFrame(rows)
    df["need"] = df["weight_bytes"] + df["kv_bytes_per_token"] * context * batch
    fits = df[df["need"] <= budget_bytes].sort_values(["ppl", "need"], kind="stable")
    return None if fits.empty else fits.iloc[0]


def alt_choose_in_mb(rows, budget_bytes, *, context=CONTEXT, batch=1):  # megabytes on both sides of the comparison
    fits = [r for r in rows if _bytes(r, context, batch) / 1e6 <= budget_bytes / 1e6]
    return min(fits, key=lambda r: (r["ppl"], _bytes(r, context, batch)), default=None)


def alt_choose_weight_mb(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the table's weight_mb back in bytes
    def total(r):  # (exact on these rows, even at the boundary case)
        return r["weight_mb"] * 1e6 + r["kv_bytes_per_token"] * context * batch

    fits = [r for r in rows if total(r) <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], total(r)), default=None)


def alt_choose_positional(rows, budget_bytes, context=CONTEXT, batch=1):  # no `*`: context and batch positional too
    return good_choose_recipe(rows, budget_bytes, context=context, batch=batch)


def alt_choose_two_steps(rows, budget_bytes, *, context=CONTEXT, batch=1):  # the best perplexity first, then the
    fits = [r for r in rows if _bytes(r, context, batch) <= budget_bytes]  # smallest of the rows that have it
    if not fits:
        return None
    best = min(r["ppl"] for r in fits)
    return min((r for r in fits if r["ppl"] == best), key=lambda r: _bytes(r, context, batch))


CORRECT_ALTERNATIVES = [
    (checks.check_choose_recipe, CHOOSE, alt_choose_sorted),
    (checks.check_choose_recipe, CHOOSE, alt_choose_loop),
    (checks.check_choose_recipe, CHOOSE, alt_choose_name),
    (checks.check_choose_recipe, CHOOSE, alt_choose_annotated_copy),
    (checks.check_choose_recipe, CHOOSE, alt_choose_pandas),
    (checks.check_choose_recipe, CHOOSE, alt_choose_in_mb),
    (checks.check_choose_recipe, CHOOSE, alt_choose_weight_mb),
    (checks.check_choose_recipe, CHOOSE, alt_choose_positional),
    (checks.check_choose_recipe, CHOOSE, alt_choose_two_steps),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_S_in_A),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_S_in_B),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_diag),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_float64),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_float64_to_float32),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_numpy),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_full_matrices),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_of_transpose),
    (checks.check_truncated_svd, TRUNCATED_SVD, alt_truncated_svd_eigh_sorted),
    (checks.check_break_even_rank, BREAK_EVEN, alt_break_even_loop),
    (checks.check_break_even_rank, BREAK_EVEN, alt_break_even_minus_one_floor),
    (checks.check_break_even_rank, BREAK_EVEN, alt_break_even_divmod),
    (checks.check_break_even_rank, BREAK_EVEN, alt_break_even_fraction),
    (checks.check_break_even_rank, BREAK_EVEN, alt_break_even_numpy_int),
    (checks.check_asvd_factors, ASVD, alt_asvd_diag),
    (checks.check_asvd_factors, ASVD, alt_asvd_own_svd),
    (checks.check_asvd_factors, ASVD, alt_asvd_reciprocal),
    (checks.check_asvd_factors, ASVD, alt_asvd_float64),
    (checks.check_asvd_factors, ASVD, alt_asvd_in_place),
]


# ----------------------------------------------------------------------------- not done


def _orthonormal(rows, cols, seed):
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).Q


def _assert_factors(got, product, rank) -> None:
    """got is a pair of thin factors (d_out, rank), (rank, d_in) whose product is `product` (to 1e-5)."""
    A, B = got
    d_out, d_in = product.shape
    assert tuple(A.shape) == (d_out, rank) and tuple(B.shape) == (rank, d_in)
    torch.testing.assert_close(A.double() @ B.double(), product.double(), rtol=1e-5, atol=1e-5)


def _sample_calls():
    """checker -> (args of one sample call, an independent computation of what the reference must return: the
    product A @ B and the rank for the factor checkers, the rank itself for break_even_rank)."""
    # W = U diag(4, 2, 1, 0.5) V^T (12 x 8): its best rank 2 keeps the first two singular triplets
    U, V, s = _orthonormal(12, 4, 0), _orthonormal(8, 4, 1), torch.tensor([4.0, 2.0, 1.0, 0.5])
    W = (U * s) @ V.T
    best2 = (U[:, :2] * s[:2]) @ V[:, :2].T
    # ASVD: W diag(c) = M with M's SVD known, so truncate M and fold 1/c back into the columns
    c = torch.linspace(0.5, 4.0, 8)
    # 576 x 576: 288 * 1152 == 576 * 576 exactly, so 287
    # recipes at 10 tokens x 4 sequences: a needs 100 + 40 = 140 > 100; b 50 + 40 = 90; c 20 + 10 = 30; b is better
    rows = [dict(method="a", weight_bytes=100, kv_bytes_per_token=1, ppl=10.0),
            dict(method="b", weight_bytes=50, kv_bytes_per_token=1, ppl=12.0),
            dict(method="c", weight_bytes=20, kv_bytes_per_token=0.25, ppl=15.0)]
    return {
        checks.check_truncated_svd: ((W, 2), (best2, 2)),
        checks.check_break_even_rank: ((576, 576), 287),
        checks.check_asvd_factors: ((W / c, c, 2), (best2 / c, 2)),
        checks.check_choose_recipe: ((rows, 100, 10, 4), rows[1]),
    }


def _assert_sample(checker, fn) -> None:
    args, expected = _sample_calls()[checker]
    if checker is checks.check_break_even_rank:
        got = fn(*args)
        assert got == expected and isinstance(got, int)
    elif checker is checks.check_choose_recipe:
        rows, budget, context, batch = args
        assert fn(rows, budget, context=context, batch=batch) is expected  # the row itself, as the lab prints it
    else:
        _assert_factors(fn(*args), *expected)


def test_not_done_references_work_the_way_the_lab_uses_them(capsys):
    """The lab calls truncated_svd and asvd_factors on a float32 CPU weight (d_out > d_in, up_proj's orientation) at
    several ranks with ASVD's mean-1 activation scale, and break_even_rank(*W.shape) whose int it formats with :10d
    and hands to lowrank.svd_factors as a rank."""
    def todo(*args):
        raise NotImplementedError

    truncated_svd, break_even_rank, asvd_factors = (c(todo) for c in list(GOOD)[:3])
    capsys.readouterr()
    g = torch.Generator().manual_seed(2)
    W = torch.randn(96, 40, generator=g) * 0.05
    s = lowrank.activation_scale(torch.rand(40, generator=g) * 30 + 1)
    for r in (4, 16):
        A, B = truncated_svd(W, r)
        assert A.dtype == B.dtype == torch.float32 and A.shape == (96, r) and B.shape == (r, 40)
        torch.testing.assert_close(A @ B, torch.matmul(*good_truncated_svd(W, r)), rtol=1e-4, atol=1e-5)
        A, B = asvd_factors(W, s, r)
        torch.testing.assert_close(A @ B, torch.matmul(*good_asvd_factors(W, s, r)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.matmul(*asvd_factors(W, torch.ones(40), 4)), torch.matmul(*truncated_svd(W, 4)))
    be = break_even_rank(*W.shape)
    assert be == 96 * 40 // 136 and isinstance(be, int) and f"{be:10d}".strip() == str(be)
    assert lowrank.svd_factors(W, be)[0].shape == (96, be)


def test_not_done_choose_recipe_works_the_way_the_lab_uses_it(capsys):
    """The lab calls choose_recipe(rows, budget, context=..., batch=...) on its measured rows (floats of bytes, the
    KV per token a float) for four budgets, and prints the method of the row it returns, or a message for None."""
    def todo(*args, **kwargs):
        raise NotImplementedError

    choose_recipe = checks.check_choose_recipe(todo)
    capsys.readouterr()
    rows = [dict(r, weight_bytes=float(r["weight_bytes"]), kv_bytes_per_token=r["kv_bytes_per_token"] * 1.0003)
            for r in checks.RECIPE_ROWS[:4] + checks.RECIPE_ROWS[5:]]  # quick mode's recipes: no 3-bit row
    picks = [choose_recipe(rows, budget, context=context, batch=batch)
             for budget, context, batch in ((512e6, 4096, 1), (256e6, 4096, 1), (512e6, 4096, 8), (128e6, 4096, 1))]
    assert [p and p["method"] for p in picks] == ["dense", "GPTQ 4-bit + rank-32 fix", "GPTQ 4-bit + KIVI-4 KV", None]
    assert all(p is None or any(p is r for r in rows) for p in picks)  # rows of the table, not copies


# ----------------------------------------------------------------------------- failed


def test_other_exceptions_in_break_even_rank_are_failures_not_crashes(capsys):
    """Exercise 2 gets ints (the shared helper's x.amin typo needs a tensor): a TypeError from plain Python."""
    def typo(d_out, d_in):
        return math.ceil(math.prod(d_out, d_in) / (d_out + d_in)) - 1  # math.prod takes one iterable

    out = assert_failed(checks.check_break_even_rank, BREAK_EVEN, typo, capsys, "raised TypeError")
    assert "math.prod(d_out, d_in)" in out  # the offending line is shown


def test_returning_none_is_a_failure(capsys):
    def forgot_return(W, rank):
        good_truncated_svd(W, rank)

    def forgot_return_rank(d_out, d_in):
        good_break_even_rank(d_out, d_in)

    assert_failed(checks.check_truncated_svd, TRUNCATED_SVD, forgot_return, capsys,
                  "return two factors (A, B), got NoneType")
    checks.STATUS.clear()
    assert_failed(checks.check_break_even_rank, BREAK_EVEN, forgot_return_rank, capsys,
                  "return an int (a rank), got NoneType")


# ----------------------------------------------------------------------------- which case catches which mistake


def _case_verdicts(checker, fn, monkeypatch, capsys) -> dict[str, bool]:
    """Run the checker on fn one case at a time: {case label: passed}. The checker's own cases, comparison and
    tolerances: run_check is intercepted once to learn them, then the real one runs each case alone."""
    real = checks.run_check
    seen = []

    def spy(name, fn, reference, cases, **kw):
        seen.append((name, fn, reference, cases, kw))
        return fn

    monkeypatch.setattr(checks.lab08, "run_check", spy)  # the name lab 08's checkers call
    checker(fn)
    monkeypatch.setattr(checks.lab08, "run_check", real)
    (name, got, expected, cases, kw), = seen
    verdicts = {}
    for case in cases:
        verdicts[case.label] = real(name, got, expected, [case], **kw) is got
    checks.STATUS.clear()
    capsys.readouterr()
    return verdicts


def _passed_on(verdicts) -> list[str]:
    return [label for label, ok in verdicts.items() if ok]


def test_every_case_passes_the_solutions_alone(monkeypatch, capsys):
    for checker, (_, good, _) in GOOD.items():
        verdicts = _case_verdicts(checker, good, monkeypatch, capsys)
        assert len(verdicts) >= 4 and all(verdicts.values()), verdicts


def test_rank_one_hides_mistakes_with_S():
    """Why ts_no_singular_values and ts_s_twice pass the rank-1 case: the cases' singular values are decay^i, so the
    top one is 1 and S^0 = S = S^2 there; every other case tells. ts_smallest and ts_rank_plus_one are right at full
    rank only (all the triplets are kept; slicing :rank + 1 stops at min(d_out, d_in))."""
    W = checks._spectrum_matrix(40, 30, 73)
    assert torch.linalg.svdvals(W)[0].item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fn, passes_only", [(ts_no_singular_values, "rank 1: only the top singular direction"),
                                             (ts_s_twice, "rank 1: only the top singular direction"),
                                             (ts_smallest, "full rank min(d_out, d_in): exact reconstruction"),
                                             (ts_rank_plus_one, "full rank min(d_out, d_in): exact reconstruction")],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_truncation_mistakes_pass_one_case_only(fn, passes_only, monkeypatch, capsys):
    assert _passed_on(_case_verdicts(checks.check_truncated_svd, fn, monkeypatch, capsys)) == [passes_only]


@pytest.mark.parametrize("fn", [ts_vh_as_v, ts_svd_of_transpose, ts_b_transposed, ts_eigh_unsorted, ts_dense_factors],
                         ids=lambda f: f.__name__)
def test_transpose_and_shape_mistakes_fail_every_case(fn, monkeypatch, capsys):
    """Wrong transposes fail the non-square cases on the factors' shapes and the square one on their values; the
    factors of W^T (ts_svd_of_transpose) have the right shapes only on the square case, and W^T != W there."""
    verdicts = _case_verdicts(checks.check_truncated_svd, fn, monkeypatch, capsys)
    assert not any(verdicts.values()), verdicts


def test_the_transposed_factorization_is_really_wrong_on_the_square_case():
    W = checks._spectrum_matrix(48, 48, 70)
    A, B = ts_svd_of_transpose(W, 8)
    assert A.shape == (48, 8) and B.shape == (8, 48)
    assert (A @ B - torch.matmul(*good_truncated_svd(W, 8))).abs().max() > 1e-2


def test_break_even_mistakes_and_the_cases_that_catch_them(monkeypatch, capsys):
    """floor (and <=) is wrong exactly at the exact divisions (576 x 576, 192 x 576, 3 x 6), where that rank saves
    nothing; floor - 1 exactly elsewhere; "at least 1" only at 1 x 1; min // 2 passes 3 x 6, 2 x 3 and 1 x 1 by luck."""
    exact = [label for label in _case_verdicts(checks.check_break_even_rank, good_break_even_rank, monkeypatch, capsys)
             if label.startswith(("576 x 576", "192 x 576", "3 x 6"))]
    assert len(exact) == 3
    for fn in (be_floor, be_loop_le):
        verdicts = _case_verdicts(checks.check_break_even_rank, fn, monkeypatch, capsys)
        assert [label for label, ok in verdicts.items() if not ok] == exact
    verdicts = _case_verdicts(checks.check_break_even_rank, be_floor_minus_one, monkeypatch, capsys)
    assert set(_passed_on(verdicts)) == set(exact)
    verdicts = _case_verdicts(checks.check_break_even_rank, be_at_least_one, monkeypatch, capsys)
    assert [label for label, ok in verdicts.items() if not ok] == ["1 x 1: no rank saves anything"]
    verdicts = _case_verdicts(checks.check_break_even_rank, be_half_min, monkeypatch, capsys)
    assert [label.split(":")[0] for label in _passed_on(verdicts)] == ["3 x 6", "2 x 3", "1 x 1"]


def test_exact_divisions_save_nothing_at_the_floor():
    for d_out, d_in in ((576, 576), (192, 576), (3, 6)):
        r = d_out * d_in // (d_out + d_in)
        assert r * (d_out + d_in) == d_out * d_in  # equal: the factors store exactly as many numbers
        assert good_break_even_rank(d_out, d_in) == r - 1


@pytest.mark.parametrize("fn", [asvd_scales_rows, asvd_divides_A], ids=lambda f: f.__name__)
def test_row_mistakes_fail_the_square_case_too(fn, monkeypatch, capsys):
    """Scaling rows instead of columns (or folding 1/s into A's rows) raises on every non-square W; on the square
    case it broadcasts silently, and the values tell."""
    verdicts = _case_verdicts(checks.check_asvd_factors, fn, monkeypatch, capsys)
    assert not any(verdicts.values()), verdicts
    square = next(label for label in verdicts if label.startswith("square 40 x 40"))
    W, scale = checks._spectrum_matrix(40, 40, 79, 0.9), checks._channel_scale(40, 80)
    A, B = fn(W, scale, 10)  # no error on the square case ...
    assert A.shape == (40, 10) and B.shape == (10, 40)
    assert (A @ B - torch.matmul(*good_asvd_factors(W, scale, 10))).abs().max() > 1e-2, square  # ... wrong values


@pytest.mark.parametrize("fn", [asvd_no_unscaling, asvd_times_scale, asvd_plain_svd, asvd_scale_squared,
                                asvd_sqrt_scale, asvd_unscale_only], ids=lambda f: f.__name__)
def test_scale_mistakes_pass_the_all_ones_case_only(fn, monkeypatch, capsys):
    """With an all-ones scale every one of these is plain SVD (the right answer there); the three cases with outlier
    channels tell."""
    verdicts = _case_verdicts(checks.check_asvd_factors, fn, monkeypatch, capsys)
    assert _passed_on(verdicts) == ["all-ones scale: ASVD equals plain SVD"]


def _failed_on(checker, fn, monkeypatch, capsys) -> list[str]:
    """The labels (up to their first colon) of the cases fn fails, in the checker's order."""
    verdicts = _case_verdicts(checker, fn, monkeypatch, capsys)
    return [label.split(":")[0] for label, ok in verdicts.items() if not ok]


TIE = "a perplexity tie (GPTQ 4-bit with an fp16 or an 8-bit cache)"


@pytest.mark.parametrize("fn, only", [(cr_table_kv, "768 MB, one document of 32 768 tokens"),
                                      (cr_strict, "exactly what GPTQ 4-bit + KIVI-4 needs for 16 chats of 4096 tokens"),
                                      (cr_min_of_nothing, "128 MB, one chat of 4096 tokens"),
                                      (cr_smallest_if_nothing_fits, "128 MB, one chat of 4096 tokens"),
                                      (cr_no_tie_break, TIE), (cr_tie_break_bigger, TIE)],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_choose_recipe_mistakes_only_one_case_catches(fn, only, monkeypatch, capsys):
    """Why the checker has a long context, an exact boundary, a budget nothing fits and a tie: each is the only case
    that tells these mistakes from the answer (the KV at the table's 4096 tokens is right at 4096 tokens)."""
    assert _failed_on(checks.check_choose_recipe, fn, monkeypatch, capsys) == [only]


@pytest.mark.parametrize("fn", [cr_one_cache, cr_batch_times_all], ids=lambda f: f.__name__)
def test_batch_mistakes_fail_the_cases_with_several_sequences(fn, monkeypatch, capsys):
    """One cache for all the sequences, or the weights once per sequence: right at batch 1, wrong at 4 and 16."""
    assert _failed_on(checks.check_choose_recipe, fn, monkeypatch, capsys) == [
        "512 MB, 4 chats of 4096 tokens", "exactly what GPTQ 4-bit + KIVI-4 needs for 16 chats of 4096 tokens"]


@pytest.mark.parametrize("fn", [cr_weights_only, cr_mb_against_bytes], ids=lambda f: f.__name__)
def test_budget_mistakes_pass_only_where_the_best_recipe_fits_anyway(fn, monkeypatch, capsys):
    """Without the cache (or with megabytes against bytes) dense "fits" every budget but 128 MB's: only the first case,
    where dense really fits, passes."""
    failed = _failed_on(checks.check_choose_recipe, fn, monkeypatch, capsys)
    assert len(failed) == 6 and "512 MB, one chat of 4096 tokens" not in failed


def test_the_choose_recipe_cases_are_what_their_labels_say():
    """The boundary case's budget is exactly one recipe's bytes (and nothing else fits), the tie is exact, and the
    rows are SmolLM2-135M's: fp16 KV = K and V x 30 layers x 3 KV heads x 64 x 2 bytes; the 20-layer student's 20/30."""
    rows = {r["method"]: r for r in checks.RECIPE_ROWS}
    assert rows["dense"]["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2 == 23040
    assert rows["student 20L + KD + GPTQ 4-bit"]["kv_bytes_per_token"] == 23040 * 20 // 30
    budget = 113_924_736 + 6480 * 4096 * 16
    assert stack.deployment_bytes(rows["GPTQ 4-bit + KIVI-4 KV"], 4096, 16) == budget
    assert [r["method"] for r in checks.RECIPE_ROWS if stack.deployment_bytes(r, 4096, 16) <= budget] == [
        "GPTQ 4-bit + KIVI-4 KV"]
    a, b = checks.TIED_ROWS[1], checks.TIED_ROWS[2]
    assert a["ppl"] == b["ppl"] and _bytes(a, 4096, 1) > _bytes(b, 4096, 1) <= 256e6
    for r in checks.RECIPE_ROWS + checks.TIED_ROWS:
        assert r["weight_mb"] == r["weight_bytes"] / 1e6 and r["kv_mb"] == r["kv_bytes_per_token"] * 4096 / 1e6


def test_the_reference_agrees_with_the_formula_written_out(monkeypatch, capsys):
    """On every case of the checker, stack.choose_recipe returns the row this file's own formula picks."""
    seen = []
    monkeypatch.setattr(checks.lab08, "run_check", lambda name, fn, reference, cases, **kw: seen.append(cases) or fn)
    checks.check_choose_recipe(good_choose_recipe)
    for rows, budget, context, batch in (case.args for case in seen[0]):
        fits = [r for r in rows if _bytes(r, context, batch) <= budget]
        best = min(fits, key=lambda r: (r["ppl"], _bytes(r, context, batch))) if fits else None
        assert stack.choose_recipe(rows, budget, context=context, batch=batch) is best


# ----------------------------------------------------------------------------- checker weaknesses


@pytest.mark.parametrize("as_number", [float, torch.tensor], ids=["float", "tensor"])
def test_a_rank_that_is_no_int_is_rejected(as_number, capsys):
    def fn(d_out, d_in):
        return as_number(math.ceil(d_out * d_in / (d_out + d_in)) - 1)

    assert_failed(checks.check_break_even_rank, BREAK_EVEN, fn, capsys)


@pytest.mark.parametrize("as_number", [float, torch.tensor], ids=["float", "tensor"])
def test_a_rank_that_is_no_int_breaks_the_lab(as_number):
    """Why the checker rejects them: the lab's own uses of break_even_rank's result fail on it."""
    be = as_number(287)
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    if as_number is float:
        with pytest.raises(ValueError):
            f"{be:10d}"
    with pytest.raises(ValueError, match="rank must be an integer"):
        lowrank.svd_factors(W, be)


def be_round_half_up(d_out, d_in):  # rounds the break-even point to the nearest integer, minus 1: right wherever
    return int(d_out * d_in / (d_out + d_in) + 0.5) - 1  # the fraction is 0 or >= 0.5, one too few below 0.5


def be_round_at_least_zero(d_out, d_in):  # round() (half to even: 0.5 -> 0), kept >= 0 for 1 x 1
    return max(0, round(d_out * d_in / (d_out + d_in)) - 1)


@pytest.mark.parametrize("fn", [be_round_half_up, be_round_at_least_zero], ids=lambda f: f.__name__)
def test_rounding_to_nearest_is_rejected(fn, capsys):
    assert_failed(checks.check_break_even_rank, BREAK_EVEN, fn, capsys)


def test_rounding_to_nearest_is_really_wrong():
    """Why the checker has the 4096 x 11008 and 2 x 3 cases: 4096 x 11008 (Llama-2-7B's MLP) breaks even at 2985.22,
    so rank 2985 still saves; rounding gives 2984. At x.91 (1536 x 576), x.78 (4096 x 14336) and 0.5 (1 x 1)
    rounding to the nearest integer and rounding up agree."""
    assert good_break_even_rank(4096, 11008) == 2985 and 2985 * (4096 + 11008) < 4096 * 11008
    for fn in (be_round_half_up, be_round_at_least_zero):
        assert fn(4096, 11008) == 2984 and fn(2, 3) == 0 != good_break_even_rank(2, 3)
        for d_out, d_in in ((576, 576), (1536, 576), (192, 576), (4096, 14336), (3, 6), (1, 1)):  # the six cases
            assert fn(d_out, d_in) == good_break_even_rank(d_out, d_in)


# ----------------------------------------------------------------------------- inputs are cloned per call


def mut_truncated_svd(W, rank):
    out = good_truncated_svd(W, rank)
    W.zero_()
    return out


def mut_asvd_factors(W, scale, rank):
    out = good_asvd_factors(W, scale, rank)
    W.zero_(), scale.mul_(-3)
    return out


def mut_choose_recipe(rows, budget_bytes, *, context=CONTEXT, batch=1):
    out = good_choose_recipe(rows, budget_bytes, context=context, batch=batch)
    rows.sort(key=lambda r: -r["ppl"])
    for r in rows:
        r["weight_bytes"], r["ppl"] = 0, 0.0
    return out


def alt_choose_annotates_rows(rows, budget_bytes, *, context=CONTEXT, batch=1):  # writes each row's bytes INTO it
    for r in rows:
        r["total"] = _bytes(r, context, batch)
    fits = [r for r in rows if r["total"] <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], r["total"]), default=None)


MUTATING = [(checks.check_truncated_svd, TRUNCATED_SVD, mut_truncated_svd),
            (checks.check_asvd_factors, ASVD, mut_asvd_factors),
            (checks.check_asvd_factors, ASVD, alt_asvd_in_place),  # break_even_rank gets ints: nothing to mutate
            (checks.check_choose_recipe, CHOOSE, mut_choose_recipe),  # the checker passes copies of the rows
            (checks.check_choose_recipe, CHOOSE, alt_choose_annotates_rows)]


def test_summary_of_the_lab08_exercises(capsys):
    checks.check_truncated_svd(good_truncated_svd)
    checks.check_break_even_rank(be_floor)

    def todo(W, scale, rank):
        raise NotImplementedError

    checks.check_asvd_factors(todo)
    checks.check_choose_recipe(good_choose_recipe)
    result, lines = summary_lines(capsys)
    assert result == {TRUNCATED_SVD: "passed", BREAK_EVEN: "failed", ASVD: "not done", CHOOSE: "passed"}
    assert len(lines) == 5 and lines[-1] == "2/4 exercises passed"


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    NAMESPACE = {"math": math, "CONTEXT": CONTEXT}  # break_even_rank uses math, choose_recipe's default CONTEXT
    TENSOR_CHECKERS = FACTOR_CHECKERS
    sample_calls = staticmethod(_sample_calls)

    def assert_sample(self, checker, got):
        _assert_sample(checker, got)

    def test_not_implemented_is_not_done(self, checker, capsys):
        """The suite's test, with a stub that also takes keywords where the lab's function does: the lab (and so the
        checker) calls choose_recipe(rows, budget, context=..., batch=...)."""
        if checker is not checks.check_choose_recipe:
            return super().test_not_implemented_is_not_done(checker, capsys)

        def todo(rows, budget_bytes, *, context=CONTEXT, batch=1):
            raise NotImplementedError("fill me in")

        got = checker(todo)
        assert got is not todo and checks.STATUS == {CHOOSE: "not done"}
        out = capsys.readouterr().out
        assert "NOT DONE" in out and "FAILED" not in out
        self.assert_sample(checker, got)


# ----------------------------------------------------------------------------- the capstone starts on its own


def _bound_and_used(code: str) -> tuple[set[str], set[str]]:
    """Names a cell binds anywhere (assignments, loop targets, imports, defs, arguments) and names it reads."""
    bound, used = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return bound, used


def test_the_capstone_needs_only_the_parameters_cell():
    """Issue: the capstone can start at minute 0 of its slot. Every name that section 6 and the cells after it read
    is bound in those cells, in the parameters cell, or a builtin: nothing comes from sections 0-5 (today's model,
    calibration batches and activation statistics are loaded or computed again in section 6's first cell)."""
    import jupytext

    cells = jupytext.read(LAB).cells
    start = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## 6 · The capstone" in c.source)
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    bound, used = _bound_and_used(params.source)
    for cell in cells[start:]:
        if cell.cell_type == "code":
            b, u = _bound_and_used(cell.source)
            bound |= b
            used |= u
    assert {"model", "tok", "calib", "norms", "env", "sz", "cl", "stack"} <= bound  # loaded here, not inherited
    assert used - bound - set(dir(builtins)) == set()  # what would come from the first half
