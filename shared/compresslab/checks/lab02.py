"""Lab 02 · GPTQ (and its optional Triton GEMV): the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab02.py and test_checks_lab02_gemv.py hold the wrong
implementations each checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import gptq, quant
from . import Case, _spd, _hinv_upper, run_check


def _hessian_step(H, n, x):
    h = gptq.Hessian(H.shape[0])
    h.H, h.n = H.clone(), n
    h.add_batch(x)
    return h.H, h.n


def _running_hessian(step: Callable) -> Callable:
    """(in_features, batches) -> (H / mean(diag H), n) after feeding the batches one by one through step(H, n, x),
    from H = 0, n = 0: H up to a positive scale (GPTQ does not see the scale: its dampening is relative to mean
    diag H), the token count exactly."""
    def run(in_features: int, batches: list):
        H, n = torch.zeros(in_features, in_features), 0
        for x in batches:
            out = step(H, n, x)
            if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[0], torch.Tensor):
                raise ValueError(f"expected (H, n), a tensor and a token count; got {type(out).__name__}")
            H, n = out
        if H.dim() != 2:
            raise ValueError(f"H has shape {tuple(H.shape)}; expected ({in_features}, {in_features})")
        mean_diag = H.diagonal().mean().item()
        if not mean_diag > 0:
            raise ValueError(f"mean(diag H) = {mean_diag:.3g}: a Hessian's diagonal holds sums of squares, "
                             "so it must be positive")
        return H / mean_diag, n

    run.__module__, run.__name__ = getattr(step, "__module__", None), getattr(step, "__name__", "fn")
    return run


def check_accumulate_hessian(fn: Callable) -> Callable:
    """Exercise: fn(H, n, x) -> (H_new, n_new): running average of 2 x x^T over tokens; x (..., in).

    Each case feeds a few batches through fn from H = 0, n = 0 and compares the final H up to a positive scale (a
    running sum, or x x^T without the 2, quantizes the same under GPTQ) and n exactly."""
    g = torch.Generator().manual_seed(11)
    cases = [
        Case("one batch (2, 16, 32) from H = 0, n = 0: n counts tokens", (32, [torch.randn(2, 16, 32, generator=g)])),
        Case("three batches of 24, 8 and 40 tokens: the old average must be re-weighted by n / (n + b)",
             (24, [torch.randn(1, 24, 24, generator=g), torch.randn(2, 4, 24, generator=g) * 3,
                   torch.randn(4, 10, 24, generator=g)])),
        Case("2-D batches (tokens, in) of 10 and 30 tokens", (16, [torch.randn(10, 16, generator=g),
                                                                    torch.randn(30, 16, generator=g) * 0.5])),
    ]
    mine = _running_hessian(fn)
    chosen = run_check("Exercise 1 · accumulate_hessian", mine, _running_hessian(_hessian_step), cases, rtol=1e-5,
                       hint="H is a running AVERAGE over every token seen: flatten x to (tokens, in) first, count "
                            "tokens in n, and give the old H the weight of its n tokens against the new batch's b. "
                            "(A running sum, or x x^T without the 2, also passes: GPTQ does not see a positive scale.)",
                       more="x = x.reshape(-1, x.shape[-1]); b = x.shape[0]; H = H * n / (n + b); n = n + b; "
                            "return H + 2 / n * x.T @ x, n.")
    if chosen is not mine:
        return _hessian_step
    x = cases[0].args[1][0]
    got = fn(torch.zeros(32, 32), 0, x.clone())[0].diagonal().mean().item()
    ratio = got / _hessian_step(torch.zeros(32, 32), 0, x)[0].diagonal().mean().item()
    if abs(ratio - 1) > 1e-4:
        print(f"   note: your H is {ratio:.4g} x the lab's 2/n sum x x^T, so the diag(H) values printed below differ "
              "by that factor; GPTQ quantizes the same (its dampening is relative to mean diag H).")
    return fn


def _column_step(W1, Hinv1, i, scale, zero, maxq):
    W1 = W1.clone()
    _, q, err = gptq.column_step(W1, Hinv1, i, scale, zero, maxq)
    return W1, q, err


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
                     hint="round column i on the given grid (codes clamped to [0, maxq]) and return its DEQUANTIZED "
                          "value q; divide the rounding error w - q once by the pivot Hinv1[i, i]; spread it over "
                          "columns i and later along ROW i of the upper factor (Hinv1 is not symmetric).",
                     more="w = W1[:, i]; d = Hinv1[i, i]; q = (clamp(round(w / scale) + zero, 0, maxq) - zero) "
                          "* scale; err = (w - q) / d; W1[:, i:] -= outer(err, Hinv1[i, i:]) (only columns i and "
                          "later).")


def check_act_order(fn: Callable) -> Callable:
    """Exercise: fn(H, group_size) -> (perm, g_idx) for act-order with dynamic groups."""
    cases = [Case(f"({n}, {n}) Hessian, group {gs}", (_spd(n, seed), gs))
             for n, gs, seed in ((16, 4, 3), (32, 8, 4), (24, 24, 5), (64, 16, 6))]
    return run_check("Exercise 4 · act_order", fn, gptq.act_order_permutation, cases, atol=0,
                     hint="perm holds column INDICES, largest diag(H) first; g_idx is indexed by the ORIGINAL "
                          "column: column perm[j] is quantized j-th, so it belongs to group j // group_size.",
                     more="perm = argsort(diag(H), descending=True); g_idx[perm[j]] = j // group_size, i.e. "
                          "g_idx = argsort(perm) // group_size (the argsort of a permutation is its inverse).")


def _calibrated_layer(out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small layer as GPTQ sees it: W (out, in) with rows of different scales, and H = 2/N X^T X from inputs
    whose channels are correlated (four shared directions), uneven in scale, with two outlier channels."""
    g = torch.Generator().manual_seed(seed)
    tokens = 8 * in_f
    col_scale = torch.linspace(0.2, 3.0, in_f)[torch.randperm(in_f, generator=g)]
    col_scale[torch.randperm(in_f, generator=g)[:2]] *= 8  # outlier channels: act-order moves them first
    shared = torch.randn(tokens, 4, generator=g) @ torch.randn(4, in_f, generator=g)  # (tokens, in) correlated part
    x = (torch.randn(tokens, in_f, generator=g) + shared) * col_scale  # (tokens, in)
    W = torch.randn(out_f, in_f, generator=g) * torch.linspace(0.04, 0.1, out_f)[:, None]  # (out, in)
    return W, 2 / tokens * x.t() @ x


def _gptq_layer(W, H, bits, group_size, lazy_block, act_order):
    return gptq.gptq_quantize_weight(W, H, bits, group_size, sym=False, act_order=act_order,
                                     lazy_block=lazy_block).dequantized


def check_gptq(fn: Callable) -> Callable:
    """Exercise: fn(W, H, bits, group_size, lazy_block, act_order) -> dequantized W (out, in), original column order.

    GPTQ with dynamic asymmetric groups, lazy block updates and act-order, against the package's gptq_quantize_weight
    (damp 0.01). lazy_block divides group_size in every case, so each group starts a block (see the lab's text).
    Tolerance 1e-3, a fifth of the smallest grid step in the cases: every code must be the package's, while a
    group's fp16 scale may round to its neighbour (arithmetic that differs in its last bits moves q by < 5e-4)."""
    cases = []
    for label, (out_f, in_f), bits, gs, bs, ao in (
            ("no act-order, 48 columns in blocks = groups of 16: new qparams at each group start, from the "
             "error-updated weights", (16, 48), 4, 16, 16, False),
            ("no act-order, blocks of 8 inside groups of 16: the lazy update carries each block's errors to the "
             "later blocks, and a group's qparams cover all 16 of its columns", (16, 48), 4, 16, 8, False),
            ("act-order, blocks = groups of 16: W's columns and H's rows and columns permuted, the result put back "
             "in the original column order", (16, 48), 4, 16, 16, True),
            ("act-order, 3-bit, groups of 32 in blocks of 8", (12, 64), 3, 32, 8, True),
            ("act-order, one group per row (group_size = in_features = 40), blocks of 16: the last block has 8 "
             "columns", (16, 40), 4, 40, 16, True)):
        W, H = _calibrated_layer(out_f, in_f, seed=len(cases) + 1)
        cases.append(Case(f"{label}; W ({out_f}, {in_f})", (W, H, bits, gs, bs, ao)))
    return run_check("Exercise 5 · my_gptq", fn, _gptq_layer, cases, atol=1e-3,
                     hint="the failing case names the ingredient it adds. Act-order permutes W's columns AND H's rows "
                          "and columns before the Cholesky, and the end puts the columns back (the inverse "
                          "permutation); a group's qparams come from all its columns of the error-updated W when "
                          "the group starts; after each block, every later column absorbs the block's ERRORS "
                          "(err, not q) through the rows of U that belong to the block.",
                     more="if act_order: perm = argsort(diag(H), descending=True); W, H = W[:, perm], "
                          "H[perm][:, perm]. U = inverse_cholesky(H, 0.01)[0].float(). For i1 in range(0, n, "
                          "lazy_block): i2 = min(i1 + lazy_block, n); W1 = W[:, i1:i2].clone(); per column i: if "
                          "(i1 + i) % group_size == 0: scale, zero = gptq_qparams(W[:, i1 + i : i1 + i + group_size], "
                          "bits, sym=False); W1, Q[:, i1 + i], Err1[:, i] = gptq_column_step(W1, U[i1:i2, i1:i2], i, "
                          "scale[:, 0], zero[:, 0], 2**bits - 1); after the block: W[:, i2:] -= Err1 @ U[i1:i2, i2:]. "
                          "Finally Q[:, argsort(perm)].")


def check_reconstruction_error(fn: Callable) -> Callable:
    """Exercise: fn(W, W_hat, X) -> scalar ||X W^T - X W_hat^T||_F^2; W (out, in), X (tokens, in)."""
    g = torch.Generator().manual_seed(13)
    cases = []
    for out_f, in_f, tokens in ((6, 16, 20), (16, 8, 5), (12, 12, 30)):
        W = torch.randn(out_f, in_f, generator=g)
        X = torch.randn(tokens, in_f, generator=g) * torch.linspace(0.1, 4.0, in_f)  # uneven input scales
        cases.append(Case(f"W ({out_f}, {in_f}), X ({tokens}, {in_f})", (W, quant.fake_quantize(W, 3, in_f), X)))
    return run_check("Exercise 3 · reconstruction_error", fn, gptq.reconstruction_error, cases, rtol=1e-5,
                     hint="the error lives in the layer's OUTPUTS (tokens, out), not in the weights: the squared "
                          "Frobenius norm of their difference, summed (no mean, no square root, no 1/2).",
                     more="((X @ W.T - X @ W_hat.T) ** 2).sum(), or with the difference first: "
                          "((X @ (W - W_hat).T) ** 2).sum(); a scalar tensor.")


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
                     hint="each case label names the layout detail it tests: eight 4-bit codes per int32 word along "
                          "K, one scale and zero per group of GROUP_SIZE rows of K, v1 zeros stored minus one, and a "
                          "mask on the columns past N.",
                     more="row k of qweight's word k // 8 holds code k at bits 4 * (k % 8); the group of row k is "
                          "k // GROUP_SIZE; the zero of column n sits in qzeros[g, n // 8] at bits 4 * (n % 8), plus "
                          "one, & 0xF; w = (q - z) * scale; accumulate sum_k x[k] * w[k, n] in float32.")
    return fn if got is wrapped else got  # the lab keeps the participant's own function when it passed
