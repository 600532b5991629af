"""Lab 02 · GPTQ (and its optional Triton GEMV): the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab02.py and test_checks_lab02_gemv.py hold the wrong
implementations each checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import gptq, quant
from . import Case, run_check


def _spd(n: int, seed: int, dead: int | None = None) -> torch.Tensor:
    """A Hessian-like symmetric positive definite (n, n) matrix: 2/N X^T X of random inputs with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    col_scale = torch.linspace(0.2, 3.0, n)[torch.randperm(n, generator=g)]  # distinct, in no particular order
    x = torch.randn(4 * n, n, generator=g) * col_scale  # (tokens, n)
    if dead is not None:
        x[:, dead] = 0
    return 2 / x.shape[0] * x.t() @ x


def _hessian_step(H, n, x):
    h = gptq.Hessian(H.shape[0])
    h.H, h.n = H.clone(), n
    h.add_batch(x)
    return h.H, h.n


def check_accumulate_hessian(fn: Callable) -> Callable:
    """Exercise: fn(H, n, x) -> (H_new, n_new): running average of 2 x x^T over tokens; x (..., in)."""
    g = torch.Generator().manual_seed(11)
    cases = [
        Case("first batch (2, 16, 32) from H = 0, n = 0", (torch.zeros(32, 32), 0, torch.randn(2, 16, 32, generator=g))),
        Case("a later batch: the old average must be re-weighted by n / (n + b)",
             (_spd(32, 1), 64, torch.randn(1, 8, 32, generator=g))),
        Case("2-D input (tokens, in) with 10 tokens", (_spd(24, 2), 30, torch.randn(10, 24, generator=g))),
    ]
    return run_check("Exercise 1 · accumulate_hessian", fn, _hessian_step, cases, rtol=1e-5,
                     hint="x = x.reshape(-1, in); b = rows; H *= n / (n + b); n += b; "
                          "x = sqrt(2 / n) * x; H += x.T @ x; return H, n.")


def _column_step(W1, Hinv1, i, scale, zero, maxq):
    W1 = W1.clone()
    _, q, err = gptq.column_step(W1, Hinv1, i, scale, zero, maxq)
    return W1, q, err


def _hinv_upper(n: int, seed: int) -> torch.Tensor:
    H = _spd(n, seed) + 0.01 * torch.eye(n)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def check_column_step(fn: Callable) -> Callable:
    """Exercise: fn(W1, Hinv1, i, scale, zero, maxq) -> (W1 updated, q, err) for one GPTQ column."""
    g = torch.Generator().manual_seed(12)
    cases = []
    for i, bits in ((0, 4), (5, 4), (15, 3), (9, 2)):
        W1 = torch.randn(8, 16, generator=g) * 0.1
        scale, zero = gptq.gptq_qparams(W1[:, :16], bits, sym=False)  # (8, 1) each
        cases.append(Case(f"column {i} of a (8, 16) block, {bits}-bit",
                          (W1, _hinv_upper(16, i), i, scale[:, 0], zero[:, 0], 2**bits - 1)))
    # qparams from a narrower range: after error feedback, weights can leave their group's grid and must clamp
    W1 = torch.randn(8, 16, generator=g) * 0.1
    scale, zero = gptq.gptq_qparams(W1 * 0.5, 3, sym=False)
    cases.append(Case("weights outside the grid (codes must be clamped to [0, maxq])",
                      (W1, _hinv_upper(16, 7), 3, scale[:, 0], zero[:, 0], 7)))
    return run_check("Exercise 2 · gptq_column_step", fn, _column_step, cases, atol=1e-5,
                     hint="w = W1[:, i]; d = Hinv1[i, i]; q = (clamp(round(w / scale) + zero, 0, maxq) - zero) * scale; "
                          "err = (w - q) / d; W1[:, i:] -= outer(err, Hinv1[i, i:]) (only columns i and later).")


def check_act_order(fn: Callable) -> Callable:
    """Exercise: fn(H, group_size) -> (perm, g_idx) for act-order with dynamic groups."""
    cases = [Case(f"({n}, {n}) Hessian, group {gs}", (_spd(n, seed), gs))
             for n, gs, seed in ((16, 4, 3), (32, 8, 4), (24, 24, 5), (64, 16, 6))]
    return run_check("Exercise 4 · act_order", fn, gptq.act_order_permutation, cases, atol=0,
                     hint="perm = argsort(diag(H), descending=True); column perm[j] is quantized j-th, so "
                          "g_idx[perm[j]] = j // group_size (equivalently g_idx = argsort(perm) // group_size).")


def check_reconstruction_error(fn: Callable) -> Callable:
    """Exercise: fn(W, W_hat, X) -> scalar ||X W^T - X W_hat^T||_F^2; W (out, in), X (tokens, in)."""
    g = torch.Generator().manual_seed(13)
    cases = []
    for out_f, in_f, tokens in ((6, 16, 20), (16, 8, 5), (12, 12, 30)):
        W = torch.randn(out_f, in_f, generator=g)
        X = torch.randn(tokens, in_f, generator=g) * torch.linspace(0.1, 4.0, in_f)  # uneven input scales
        cases.append(Case(f"W ({out_f}, {in_f}), X ({tokens}, {in_f})", (W, quant.fake_quantize(W, 3, in_f), X)))
    return run_check("Exercise 3 · reconstruction_error", fn, gptq.reconstruction_error, cases, rtol=1e-5,
                     hint="the error lives in the layer's OUTPUTS: ((X @ W.T - X @ W_hat.T) ** 2).sum(), "
                          "a scalar; not the weight difference alone.")


# --- optional: a Triton GEMV

def _gemv_case(n: int, k: int, group_size: int, seed: int, nonneg_group: bool = False) -> tuple:
    """(x (K,) fp16, qweight, qzeros, scales, group_size) of a random W in the GPTQ v1 layout."""
    from ..kernels import w4a16

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.5, 2.0, n)[:, None]  # columns differ in scale
    w += torch.randn(n, 1, generator=g)  # and in offset: zero points vary from column to column
    if nonneg_group:  # a group whose minimum is >= 0 has zero point 0, stored (v1: minus one) as 15
        w[:, :group_size] = w[:, :group_size].abs() + 0.1
    x = torch.randn(k, generator=g).half()
    return (x, *w4a16.rtn_gptq(w, group_size)[:3], group_size)


def _gemv_reference(x, qweight, qzeros, scales, group_size):
    from ..kernels import w4a16

    return w4a16.w4a16_matmul_ref(x[None], qweight, qzeros, scales, None, group_size)[0]


def _not_done_through_triton(fn: Callable) -> Callable:
    """Triton wraps an exception raised inside a kernel (interpreter) or refuses to compile `raise` (GPU):
    an unfinished kernel still counts as NOT DONE, not FAILED."""
    def call(*args):
        try:
            return fn(*args)
        except NotImplementedError:
            raise
        except Exception as err:
            if isinstance(err.__cause__, NotImplementedError) or "NotImplementedError" in str(err):
                raise NotImplementedError from err
            raise
    return call


def check_dequant_gemv(fn: Callable) -> Callable:
    """Exercise (lab 02, optional): fn(x (K,) fp16, qweight, qzeros, scales, group_size) -> W x (N,) in fp16."""
    cases = [Case("one group, one block of 32 outputs", _gemv_case(32, 32, 32, 1)),
             Case("K = 128: codes in all eight nibbles of each word, four groups (scale of group k // group_size)",
                  _gemv_case(32, 128, 32, 2)),
             Case("a group with zero point 0, stored as 15 (v1 keeps zero - 1; add 1 back modulo 16)",
                  _gemv_case(64, 64, 32, 3, nonneg_group=True)),
             Case("N = 72 is not a multiple of the block: mask the last columns", _gemv_case(72, 64, 64, 4)),
             Case("group_size 64 over K = 192", _gemv_case(40, 192, 64, 5))]
    wrapped = _not_done_through_triton(fn)
    got = run_check("Optional · dequant_gemv (Triton)", wrapped, _gemv_reference, cases,
                     atol=2e-2, rtol=2e-3,
                     hint="row k of qweight's word k // 8 holds code k at bits 4 * (k % 8); the group of row k is "
                          "k // GROUP_SIZE; the zero of column n sits in qzeros[g, n // 8] at bits 4 * (n % 8), plus "
                          "one, & 0xF; w = (q - z) * scale; accumulate sum_k x[k] * w[k, n] in float32.")
    return fn if got is wrapped else got  # the lab keeps the participant's own function when it passed
