"""Lab 08 · low rank and the capstone: the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab08.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

import numbers
from typing import Callable

import torch

from .. import lowrank
from . import Case, run_check


def _spectrum_matrix(d_out: int, d_in: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    """A (d_out, d_in) matrix with distinct, geometrically decaying singular values: its truncation is unique."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    U = torch.linalg.qr(torch.randn(d_out, k, generator=g)).Q  # (d_out, k)
    V = torch.linalg.qr(torch.randn(d_in, k, generator=g)).Q  # (d_in, k)
    return (U * decay ** torch.arange(k, dtype=torch.float32)) @ V.T


def _factors_product(out, d_out: int, d_in: int, rank: int) -> torch.Tensor:
    """A @ B after checking that fn returned two thin factors (d_out, rank) and (rank, d_in)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"return two factors (A, B), got {type(out).__name__}")
    A, B = out
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
        raise TypeError(f"return torch tensors, got {type(A).__name__} and {type(B).__name__} (torch.from_numpy converts)")
    if tuple(A.shape) != (d_out, rank) or tuple(B.shape) != (rank, d_in):
        raise ValueError(f"A is {tuple(A.shape)} and B {tuple(B.shape)}; expected A ({d_out}, {rank}) and "
                         f"B ({rank}, {d_in}): two thin factors, or nothing is saved")
    return A.double() @ B.double()


def _check_factors(name: str, fn: Callable, reference: Callable, cases: list[Case], hint: str) -> Callable:
    """Check factor pairs by their product (how S is split between A and B is the participant's choice)."""
    def dims(W, rank):
        return W.shape[0], W.shape[1], rank

    def got(*args):
        return _factors_product(fn(*args), *dims(args[0], args[-1]))

    def expected(*args):
        return _factors_product(reference(*args), *dims(args[0], args[-1]))

    expected.__module__, expected.__name__ = reference.__module__, reference.__name__
    chosen = run_check(name, got, expected, cases, hint=hint, atol=1e-4, rtol=1e-4)
    return fn if chosen is got else reference


def _asvd_reference(W: torch.Tensor, scale: torch.Tensor, rank: int):
    return lowrank.svd_factors(W, rank, scale)


_asvd_reference.__module__, _asvd_reference.__name__ = "compresslab.lowrank", "svd_factors(W, rank, scale)"


def check_truncated_svd(fn: Callable) -> Callable:
    """Exercise: fn(W (d_out, d_in), rank) -> (A (d_out, rank), B (rank, d_in)), A @ B the best rank-r approximation."""
    cases = [Case("square 48 x 48, rank 8", (_spectrum_matrix(48, 48, 70), 8)),
             Case("tall 96 x 32 (an up/gate projection's shape), rank 5", (_spectrum_matrix(96, 32, 71), 5)),
             Case("wide 24 x 80 (a down projection's shape), rank 6", (_spectrum_matrix(24, 80, 72), 6)),
             Case("rank 1: only the top singular direction", (_spectrum_matrix(40, 30, 73), 1)),
             Case("full rank min(d_out, d_in): exact reconstruction", (_spectrum_matrix(20, 36, 74), 20))]
    return _check_factors("Exercise 1 · truncated_svd", fn, lowrank.svd_factors, cases,
                          hint="U, S, Vh = torch.linalg.svd(W, full_matrices=False) (S sorted largest first); keep the "
                               "first `rank`: A = U[:, :r] * S[:r].sqrt(), B = S[:r].sqrt()[:, None] * Vh[:r].")


def check_break_even_rank(fn: Callable) -> Callable:
    """Exercise: fn(d_out, d_in) -> the largest rank r with r (d_out + d_in) < d_out d_in."""
    cases = [Case("576 x 576 (SmolLM2 q_proj): 288 * 1152 == 576 * 576 exactly, and equal saves nothing", (576, 576)),
             Case("1536 x 576 (up_proj)", (1536, 576)),
             Case("192 x 576 (k_proj: 3 KV heads of 64)", (192, 576)),
             Case("4096 x 14336 (a Llama-3-8B MLP)", (4096, 14336)),
             Case("4096 x 11008 (a Llama-2-7B MLP): 2985.2 — round up, then step below", (4096, 11008)),
             Case("3 x 6: 2 * 9 == 18 exactly", (3, 6)),
             Case("2 x 3: 1.2 — rank 1 saves one number", (2, 3)),
             Case("1 x 1: no rank saves anything", (1, 1))]

    def as_int(d_out, d_in):
        r = fn(d_out, d_in)
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"return an int (a rank), got {type(r).__name__} {r!r}")
        return r

    as_int.__name__ = getattr(fn, "__name__", "break_even_rank")
    chosen = run_check("Exercise 2 · break_even_rank", as_int, lowrank.break_even_rank, cases, atol=0,
                     hint="A and B store r * (d_out + d_in) numbers, W stores d_out * d_in: you need the largest "
                          "integer r with r * (d_out + d_in) < d_out * d_in (strictly: equal saves nothing).")
    return fn if chosen is as_int else chosen


def _channel_scale(d_in: int, seed: int) -> torch.Tensor:
    """An ASVD-like input-channel scale: mostly ~1, a few outlier channels 5-20x."""
    g = torch.Generator().manual_seed(seed)
    s = 0.5 + torch.rand(d_in, generator=g)
    s[torch.randperm(d_in, generator=g)[:3]] = torch.tensor([5.0, 12.0, 20.0])
    return s


def check_asvd_factors(fn: Callable) -> Callable:
    """Exercise: fn(W (d_out, d_in), scale (d_in,), rank) -> (A, B): truncate W diag(scale), fold 1/scale into B."""
    cases = [Case("tall 64 x 32 with three outlier input channels, rank 6",
                  (_spectrum_matrix(64, 32, 75, 0.9), _channel_scale(32, 76), 6)),
             Case("wide 24 x 48, rank 4 (scale the COLUMNS: one entry per input channel)",
                  (_spectrum_matrix(24, 48, 77, 0.9), _channel_scale(48, 78), 4)),
             Case("square 40 x 40, rank 10 (rows vs columns only differ in value here)",
                  (_spectrum_matrix(40, 40, 79, 0.9), _channel_scale(40, 80), 10)),
             Case("all-ones scale: ASVD equals plain SVD", (_spectrum_matrix(30, 20, 81), torch.ones(20), 3))]
    return _check_factors("Exercise 3 · asvd_factors", fn, _asvd_reference, cases,
                          hint="truncate W * scale (column j times scale[j]) exactly as in exercise 1, then undo the "
                               "scaling on the input side: B = B / scale, so A @ B approximates W itself.")
