"""Lab 04 · pruning (Wanda, N:M, SparseGPT): the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab04.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import pruning
from . import Case, _hinv_upper, run_check


def _act_norm_step(sq, n, x):
    a = pruning.ActNorm(sq.shape[0])
    a.sq, a.n = sq.clone(), n
    a.add_batch(x)
    return a.sq, a.n


def check_accumulate_act_norm(fn: Callable) -> Callable:
    """Exercise: fn(sq, n, x) -> (sq_new, n_new): running mean over tokens of x_j^2 per input channel; x (..., in)."""
    g = torch.Generator().manual_seed(21)
    cases = [
        Case("first batch (2, 16, 32) from sq = 0, n = 0 (n counts tokens, not sequences)",
             (torch.zeros(32), 0, torch.randn(2, 16, 32, generator=g))),
        Case("a later batch: the old mean must be re-weighted by n / (n + b)",
             (torch.rand(24, generator=g) * 3, 40, torch.randn(1, 8, 24, generator=g) * 2)),
        Case("2-D input (tokens, in) with 10 tokens and one loud channel",
             (torch.rand(16, generator=g), 6, torch.randn(10, 16, generator=g) * torch.linspace(0.1, 20, 16))),
    ]
    return run_check("Exercise 1 · accumulate_act_norm", fn, _act_norm_step, cases, rtol=1e-5,
                     hint="a running MEAN over tokens of x ** 2 (squares, not absolute values; a mean, not a sum): "
                          "flatten x to (tokens, in) first, so that n counts tokens, not sequences, and re-weight the "
                          "old mean by n / (n + b) when b new tokens arrive. Return (sq, n) with n advanced.",
                     more="x = x.reshape(-1, x.shape[-1]).float(); b = x.shape[0]; "
                          "sq = sq * (n / (n + b)) + (x ** 2).sum(0) / (n + b); return sq, n + b.")


def _row_scores(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and activation norms where the act norms change the ranking: a few loud input channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    act = torch.rand(cols, generator=g) + 0.1
    act[torch.randperm(cols, generator=g)[: max(1, cols // 8)]] *= 30  # outlier features
    W[: rows // 2] *= 4  # rows of very different scale: a per-layer threshold would empty the quiet rows
    return W, act


def _wanda_row_mask(W, act_norm, sparsity):
    return pruning.wanda_mask(W, act_norm, sparsity)


def check_wanda_mask(fn: Callable) -> Callable:
    """Exercise: fn(W, act_norm, sparsity) -> bool keep-mask (out, in): per row, prune int(sparsity * in) lowest
    |W_ij| * act_norm_j."""
    cases = []
    for rows, cols, s, seed in ((8, 16, 0.5, 1), (6, 20, 0.3, 2), (4, 10, 0.25, 3), (4, 32, 0.75, 5),
                                (5, 10, 0.0, 4)):
        W, act = _row_scores(rows, cols, seed)
        k = f" (int({s} * {cols}) = {int(s * cols)} per row)" if s * cols != int(s * cols) else ""
        cases.append(Case(f"W ({rows}, {cols}), sparsity {s}{k}", (W, act, s)))
    return run_check("Exercise 2 · wanda_mask", fn, _wanda_row_mask, cases, atol=0,
                     hint="score |W_ij| * act_norm_j; in EVERY ROW (not one threshold for the whole layer) prune the "
                          "int(sparsity * in_features) lowest scores (int, not ceil); return a bool tensor of W's "
                          "shape, True where a weight is KEPT.",
                     more="score = W.abs() * act_norm[None, :]; k = int(sparsity * W.shape[1]); "
                          "keep = torch.ones_like(W, dtype=torch.bool); "
                          "keep.scatter_(1, score.argsort(dim=1)[:, :k], False); return keep.")


def check_nm_mask(fn: Callable) -> Callable:
    """Exercise: fn(score, n, m) -> bool keep-mask: in each run of m consecutive columns of a row keep the n largest."""
    g = torch.Generator().manual_seed(22)
    cases = [Case(f"score ({r}, {c}), {n}:{m}", (torch.randn(r, c, generator=g).abs(), n, m))  # no ties
             for r, c, n, m in ((4, 16, 2, 4), (3, 24, 4, 8), (8, 8, 2, 4), (2, 12, 1, 4))]
    return run_check("Exercise 3 · nm_mask", fn, pruning.nm_mask, cases, atol=0,
                     hint="a group is m CONSECUTIVE columns of one row (never down a column, never m columns spaced "
                          "apart); keep the n LARGEST scores of each group; return a bool keep-mask of score's shape.",
                     more="groups = score.reshape(out, in // m, m); keep = torch.zeros_like(groups, dtype=torch.bool); "
                          "keep.scatter_(-1, groups.topk(n, dim=-1).indices, True); return keep.reshape(out, in).")


def _sparsegpt_cases() -> list[Case]:
    """Rows of two scales (a per-row choice differs from the block's) and a factor U whose diagonal spans ~15x (the
    score w^2 / U_ii^2 ranks differently from |w|, w^2 U_ii^2 or w^2 / U_ii); several blocks, so the lazy update
    and the error-updated weights of later blocks matter."""
    g = torch.Generator().manual_seed(24)
    cases = []
    for rows, cols, sparsity, n, m, block, what in (
            (8, 48, 0.5, None, None, 16, "50 %, three blocks of 16: each block chooses its mask at its start"),
            (6, 40, 0.3, None, None, 16, "30 %, blocks of 16: the last block is 8 wide (int(0.3 * 6 * 8) = 14 "
                                         "pruned there)"),
            (8, 32, None, 2, 4, 16, "2:4, two blocks of 16: each group of 4 columns chosen on reaching it"),
            (6, 48, None, 4, 8, 24, "4:8, two blocks of 24")):
        W = torch.randn(rows, cols, generator=g)
        W[: rows // 2] *= 3  # loud rows
        cases.append(Case(f"W ({rows}, {cols}), {what}", (W, _hinv_upper(cols, 40 + len(cases)), sparsity, n, m,
                                                           block)))
    return cases


def check_sparsegpt_layer(fn: Callable) -> Callable:
    """Exercise: fn(W, U, sparsity, n, m, block_size) -> pruned and compensated W (out, in); U (in, in) the upper
    Cholesky factor of H^-1; unstructured (sparsity, n = m = None) or N:M (sparsity None)."""
    return run_check("Exercise 4 · sparsegpt_layer", fn, pruning.sparsegpt_blocks, _sparsegpt_cases(), atol=1e-4,
                     hint="per block of block_size columns (the last may be narrower): the score is W1 ** 2 / "
                          "diag(U1) ** 2 of the block's weights AS THEY ARE NOW (earlier blocks have moved them); "
                          "unstructured: one choice at the block start, the int(sparsity * W1.numel()) lowest scores "
                          "of the whole block, all rows together; N:M: the mask of columns i..i+m is chosen when the "
                          "loop reaches column i. Every column: q = W1[:, i] * keep, the OBS update inside the block, "
                          "the errors kept; after the block, the lazy update of the later columns.",
                     more="W = W.clone(); for i1 in range(0, in, block_size): i2 = min(i1 + block_size, in); "
                          "W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]; d2 = torch.diag(U1) ** 2; "
                          "Err1 = torch.zeros_like(W1); keep1 = torch.ones_like(W1, dtype=torch.bool); "
                          "unstructured: keep1.view(-1)[(W1 ** 2 / d2).flatten().argsort(stable=True)"
                          "[:int(sparsity * W1.numel())]] = False; "
                          "for i in range(i2 - i1): (N:M, if i % m == 0: keep1[:, i:i+m] = nm_mask(W1[:, i:i+m] ** 2 "
                          "/ d2[i:i+m], n, m)); q = W1[:, i] * keep1[:, i]; Err1[:, i] = "
                          "cl.gptq.propagate_error(W1, U1, i, q); then W[:, i1:i2] = W1; "
                          "W[:, i2:] -= Err1 @ U[i1:i2, i2:] (Err1 holds the errors divided by U_ii, not the weight "
                          "changes).")
