"""Lab 06 · KV-cache compression (KIVI, GEAR): the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab06.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import kvcompress, kvformat
from . import Case, run_adapted, run_check


def _keys(shape: tuple[int, ...], seed: int, outlier_channel: int | None = None, offset: float = 0.0) -> torch.Tensor:
    """Key-like states (b, h, t, d): Gaussian, one channel 20x larger (the outlier channel), an optional offset."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=g) + offset
    if outlier_channel is not None:
        k[..., outlier_channel] *= 20
    return k


def fake_quantize_keys_per_channel(k: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Reference for exercise 1, in float32: groups of group_size consecutive TOKENS of one channel, asymmetric with
    the group minimum as zero point, codes 0 .. 2^b - 1."""
    b, h, t, d = k.shape
    g = k.float().reshape(b, h, t // group_size, group_size, d)  # (b, h, n_groups, group_size, d)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    q = torch.round((g - mn) / scale).clamp(0, 2**bits - 1)
    return (q * scale + mn).reshape(b, h, t, d)


def check_quantize_keys(fn: Callable) -> Callable:
    """Exercise: fn(k (b, h, t, d), bits, group_size) -> k quantized per channel in groups of tokens, dequantized."""
    cases = [Case("(1, 2, 128, 8), 2 bits, groups of 64 tokens, channel 3 an outlier channel",
                  (_keys((1, 2, 128, 8), 80, outlier_channel=3), 2, 64)),
             Case("(2, 3, 64, 16), 4 bits, groups of 32 tokens", (_keys((2, 3, 64, 16), 81), 4, 32)),
             Case("(1, 1, 96, 12), 2 bits, groups of 32, every value offset by +5 (the minimum is the zero point)",
                  (_keys((1, 1, 96, 12), 82, offset=5.0), 2, 32)),
             Case("(1, 2, 64, 64), 8 bits, one group of 64 tokens", (_keys((1, 2, 64, 64), 83, outlier_channel=0), 8, 64)),
             Case("(1, 1, 32, 4), 2 bits, groups of 8 tokens (a token count that is not a power of 4 times the group)",
                  (_keys((1, 1, 32, 4), 84), 2, 8)),
             Case("(1, 1, 64, 4), 2 bits, g32, channel 1 constant (max = min: the scale must not be 0)",
                  (_keys((1, 1, 64, 4), 79).index_fill_(-1, torch.tensor([1]), 0.5), 2, 32))]
    return run_check("Exercise 1 · quantize_keys_per_channel", fn, fake_quantize_keys_per_channel, cases, atol=1e-4,
                     rtol=1e-5,
                     hint="reshape k (b, h, t, d) to (b, h, t // g, g, d) so a group runs along TOKENS; min and max over "
                          "that g axis (dim 3); scale = (max - min) / (2**bits - 1); q = round((k - min) / scale) "
                          "clamped to [0, 2**bits - 1]; return q * scale + min reshaped to (b, h, t, d).",
                     more="g = k.reshape(b, h, t // group_size, group_size, d); mn, mx = g.amin(3, keepdim=True), "
                          "g.amax(3, keepdim=True); scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8); "
                          "q = torch.round((g - mn) / scale).clamp(0, 2**bits - 1); return (q * scale + mn).reshape(b, "
                          "h, t, d). The minimum itself is the offset (no integer zero point), and the codes are "
                          "dequantized before returning.")


def _attention_inputs(batch: int, heads: int, kv_heads: int, tokens: int, head_dim: int, seed: int,
                      outlier_channel: int | None = None, q_scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """One layer's q (batch, heads, tokens, head_dim) and k, v (batch, kv_heads, tokens, head_dim): Gaussian, values
    offset by +1, an optional key channel 10x larger (the outlier channel), queries times q_scale."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, head_dim, generator=g) * q_scale
    k = torch.randn(batch, kv_heads, tokens, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, tokens, head_dim, generator=g) + 1.0
    if outlier_channel is not None:
        k[..., outlier_channel] *= 10
    return q, k, v


def _as_table(out, *args) -> torch.Tensor:
    """The 2 x 2 table as a float64 tensor: a tensor as it comes, nested lists of numbers (or 0-d tensors) converted."""
    if isinstance(out, torch.Tensor):
        return out.detach().double()
    try:
        return torch.tensor([[float(x) for x in row] for row in out], dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(f"expected a (2, 2) tensor of errors, got {type(out).__name__}") from None


def _layout_cases() -> list[Case]:
    return [Case("q (1, 4, 32, 16), k and v (1, 2, 32, 16): 2 query heads per kv head, 2 bits, groups of 16, key "
                 "channel 3 an outlier channel", (*_attention_inputs(1, 4, 2, 32, 16, 70, outlier_channel=3), 2, 16)),
            Case("q, k, v (1, 2, 48, 16): one query head per kv head, 4 bits, groups of 8 (6 groups along the tokens, "
                 "2 along the channels)", (*_attention_inputs(1, 2, 2, 48, 16, 71), 4, 8)),
            Case("batch 2, q (2, 6, 32, 16), k and v (2, 2, 32, 16): 3 query heads per kv head, as SmolLM2's 9 / 3 "
                 "(query heads 0-2 read kv head 0, 3-5 kv head 1)",
                 (*_attention_inputs(2, 6, 2, 32, 16, 72, outlier_channel=5), 2, 16)),
            Case("q (1, 2, 64, 32) four times larger (a peaked softmax), one kv head, 2 bits, groups of 32",
                 (*_attention_inputs(1, 2, 1, 64, 32, 73, outlier_channel=0, q_scale=4.0), 2, 32))]


def check_layout_errors(fn: Callable) -> Callable:
    """Exercise: fn(q (b, heads, t, d), k, v (b, kv_heads, t, d), bits, group_size) -> (2, 2) relative errors: rows
    keys (of the scores), values (of the output); columns per channel, per token.
    atol 1e-3: fake-quantizing with float32 scales and minima (exercise 1's quantizer) instead of the stored fp16 ones
    moves the errors by less than 3e-4; every wrong answer in tests/test_checks_lab06.py is off by more than 1e-2 on
    some case."""
    return run_adapted("Exercise 2 · layout_errors", fn, kvformat.layout_attention_errors, _as_table, _layout_cases(),
                       atol=1e-3,
                       hint="return torch.tensor([[keys per channel, keys per token], [values per channel, values per "
                            "token]]). Keys row: k quantized (kv.quantize_groups(k, bits, group_size, dim)"
                            ".dequantize(), dim=-2 per channel, dim=-1 per token), v exact, error of the scores "
                            "q @ kᵀ / √d on and below the diagonal. Values row: k exact, v quantized, error of "
                            "softmax(scores with the future at -inf) @ v. Relative: (a - exact).norm() / exact.norm(), "
                            "over the whole tensor.",
                       more="rep = q.shape[1] // k.shape[1]; repeat each kv head for its query heads with "
                            "k.repeat_interleave(rep, dim=1) (not .repeat, which tiles: head h would read kv head "
                            "h % kv_heads); s = q @ K.mT / math.sqrt(d); causal = torch.ones(t, t, dtype=torch.bool)"
                            ".tril(); output = s.masked_fill(~causal, float('-inf')).softmax(-1) @ V; the scores "
                            "compared are s.masked_fill(~causal, 0.0). Quantize only k or only v, never q.")


def _outlier_cases() -> list[Case]:
    g = torch.Generator().manual_seed(85)
    skewed = torch.randn(2, 2, 64, 16, generator=g).exp()  # all positive, long right tail: |x| ranks only the top
    return [Case("(1, 2, 200, 8) keys, 2 % per channel (dim=-2, along tokens)", (_keys((1, 2, 200, 8), 86), 0.02, -2)),
            Case("(1, 2, 16, 64) values, 4 % per token (dim=-1, along channels)", (_keys((1, 2, 16, 64), 87), 0.04, -1)),
            Case("skewed positive values, 10 % along dim=-1: the smallest are outliers too (not only the largest |x|)",
                 (skewed, 0.10, -1)),
            Case("(2, 1, 128, 16), 5 % along tokens, with an outlier channel", (_keys((2, 1, 128, 16), 88, 5), 0.05, -2)),
            Case("ratio 0: no outliers", (_keys((1, 1, 32, 8), 89), 0.0, -1)),
            Case("(1, 1, 192, 8), 2 % along tokens: 1.92 per side rounds to 2 (use kv.outliers_per_side)",
                 (_keys((1, 1, 192, 8), 78), 0.02, -2))]


def check_outlier_mask(fn: Callable) -> Callable:
    """Exercise: fn(x, ratio, dim) -> bool mask of the k largest and k smallest entries of every vector along dim."""
    return run_check("Exercise 3 · outlier_mask", fn, kvcompress.outlier_mask, _outlier_cases(),
                     hint="k = kv.outliers_per_side(x.shape[dim], ratio); mask = zeros_like(x, dtype=bool); "
                          "scatter True at x.topk(k, dim).indices AND at x.topk(k, dim, largest=False).indices. "
                          "Signed largest and smallest, not the largest |x|; ratio is the total (half per side).",
                     more="k = kv.outliers_per_side(x.shape[dim], ratio); mask = torch.zeros_like(x, "
                          "dtype=torch.bool); if k: mask.scatter_(dim, x.topk(k, dim=dim).indices, True) and "
                          "mask.scatter_(dim, x.topk(k, dim=dim, largest=False).indices, True); return mask (bool, the "
                          "shape of x). Count k from x.shape[dim], not the last dim, and let outliers_per_side round "
                          "it (at least one per side).")


def _lowrank_reference(R: torch.Tensor, Q0: torch.Tensor, iters: int) -> torch.Tensor:
    P, Q = kvcompress.power_iteration(R, Q0, iters)
    return P @ Q.mT


def _slow_spectrum(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A residual-like (..., n, d) matrix whose singular values decay slowly, so every iteration changes the answer."""
    g = torch.Generator().manual_seed(seed)
    n, d = shape[-2:]
    U = torch.linalg.qr(torch.randn(*shape[:-2], n, d, generator=g)).Q
    V = torch.linalg.qr(torch.randn(*shape[:-2], d, d, generator=g)).Q
    s = 0.85 ** torch.arange(d, dtype=torch.float32)
    return (U * s) @ V.mT


def check_lowrank(fn: Callable) -> Callable:
    """Exercise: fn(R (..., n, d), Q0 (d, r), iters) -> the rank-r approximation P @ Q^T after `iters` rounds."""
    g = torch.Generator().manual_seed(90)
    cases = [Case("R (40, 12), rank 2, 3 rounds", (_slow_spectrum((40, 12), 91), torch.randn(12, 2, generator=g), 3)),
             Case("R (2, 3, 64, 16) per head, rank 4, 3 rounds (batched: use .mT, not .T)",
                  (_slow_spectrum((2, 3, 64, 16), 92), torch.randn(16, 4, generator=g), 3)),
             Case("R (64, 16), rank 4, 1 round", (_slow_spectrum((64, 16), 93), torch.randn(16, 4, generator=g), 1)),
             Case("R (50, 10), rank 3, 5 rounds", (_slow_spectrum((50, 10), 94), torch.randn(10, 3, generator=g), 5))]
    return run_check("Exercise 4 · lowrank_residual", fn, _lowrank_reference, cases, atol=1e-4, rtol=1e-4,
                     hint="repeat iters times: P = torch.linalg.qr(R @ Q).Q (orthonormal columns), then Q = R.mT @ P; "
                          "return P @ Q.mT. Start from the Q0 given, run exactly `iters` rounds.",
                     more="Q = Q0; for _ in range(iters): P = torch.linalg.qr(R @ Q).Q; Q = R.mT @ P; then return "
                          "P @ Q.mT (a tensor shaped like R, not the factors). .mT swaps only the last two dims; .T on "
                          "the batched (2, 3, 64, 16) R reverses all four. No QR, or unit columns instead of QR, is no "
                          "orthonormal basis.")


def check_gear_nbytes(fn: Callable) -> Callable:
    """Exercise: fn(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes) -> bytes of one head's block."""
    cases = [Case("512 tokens x 64, 2 bits, g64, rank 4, 640 outliers with 2-byte indices", (512, 64, 2, 64, 4, 640, 2)),
             Case("64 x 64, 4 bits, g32, rank 2, 128 outliers with 1-byte indices", (64, 64, 4, 32, 2, 128, 1)),
             Case("no low rank, no outliers (KIVI): codes and scales only", (256, 128, 2, 64, 0, 0, 2)),
             Case("1024 x 128, 8 bits, g128, rank 8, 2560 outliers, 4-byte indices", (1024, 128, 8, 128, 8, 2560, 4))]
    return run_check("Exercise 5 · gear_nbytes", fn, kvcompress.gear_nbytes, cases, atol=0,
                     hint="codes: tokens * head_dim * bits / 8 bytes; per group an fp16 scale AND an fp16 minimum "
                          "(4 bytes x tokens * head_dim / group_size); each outlier: a 2-byte value plus index_bytes; "
                          "low rank: BOTH fp16 factors, P (tokens x rank) and Q (head_dim x rank).",
                     more="return tokens * head_dim * bits // 8 + 2 * 2 * (tokens * head_dim // group_size) + "
                          "n_outliers * (2 + index_bytes) + 2 * rank * (tokens + head_dim): every term in bytes (the "
                          "codes' bits divided by 8 once), groups counted over all tokens x head_dim entries.")
