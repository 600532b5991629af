"""Lab 04 · pruning (Wanda, N:M, SparseGPT): the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab04.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import gptq, pruning
from . import Case, run_check
from .lab02 import _hinv_upper


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
                     hint="x = x.reshape(-1, in); b = rows (tokens); sq = sq * n / (n + b) + (x ** 2).sum(0) / (n + b); "
                          "n += b; return sq, n. Squares, not absolute values; a mean, not a sum.")


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
                     hint="score = W.abs() * act_norm[None, :]; k = int(sparsity * in_features); in EVERY ROW set the "
                          "k lowest scores to False (score.argsort(dim=1)[:, :k]); return a bool tensor, True = keep.")


def check_nm_mask(fn: Callable) -> Callable:
    """Exercise: fn(score, n, m) -> bool keep-mask: in each run of m consecutive columns of a row keep the n largest."""
    g = torch.Generator().manual_seed(22)
    cases = [Case(f"score ({r}, {c}), {n}:{m}", (torch.randn(r, c, generator=g).abs(), n, m))  # no ties
             for r, c, n, m in ((4, 16, 2, 4), (3, 24, 4, 8), (8, 8, 2, 4), (2, 12, 1, 4))]
    return run_check("Exercise 3 · nm_mask", fn, pruning.nm_mask, cases, atol=0,
                     hint="view the score as (out, in // m, m); topk(n, dim=-1) gives the kept positions in each group; "
                          "scatter True there, reshape back to (out, in). Groups run along a row, never down a column.")


def _sparsegpt_step(W1, Hinv1, i, keep):
    W1 = W1.clone()
    q = W1[:, i] * keep
    err = gptq.propagate_error(W1, Hinv1, i, q)
    return W1, q, err


def check_sparsegpt_step(fn: Callable) -> Callable:
    """Exercise: fn(W1, Hinv1, i, keep) -> (W1 updated, q, err): prune column i of a block where keep (out,) is
    False and push the error onto columns i.. with the OBS update."""
    g = torch.Generator().manual_seed(23)
    cases = []
    for i, n in ((0, 16), (5, 16), (15, 16), (3, 8)):
        W1 = torch.randn(6, n, generator=g)
        keep = torch.rand(6, generator=g) > 0.5
        keep[0], keep[1] = True, False  # at least one kept and one pruned row
        cases.append(Case(f"column {i} of a (6, {n}) block, rows {keep.logical_not().nonzero().flatten().tolist()} "
                          "pruned", (W1, _hinv_upper(n, 30 + i), i, keep)))
    return run_check("Exercise 4 · sparsegpt_step", fn, _sparsegpt_step, cases, atol=1e-5,
                     hint="q = W1[:, i] * keep (a pruned weight rounds to 0, a kept one to itself); "
                          "err = (W1[:, i] - q) / Hinv1[i, i]; W1[:, i:] -= outer(err, Hinv1[i, i:]); return W1, q, err.")
