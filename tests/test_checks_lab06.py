"""The lab 06 (KV cache: KIVI and GEAR) checkers: the solution passes, a skipped exercise is "not done", and wrong
answers fail.

Same structure as tests/test_checks_lab05.py. Every wrong implementation below was run against the checker's cases and
is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded: the checkers only run small fixed tensors (and exercise 5 plain integers).
"""

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checker_testing import (CheckerSuite, assert_failed, summary_lines)

from compresslab import checks
from compresslab import kvcompress as kv
from compresslab import kvformat

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "06_gear_kv_cache.py"

QUANTIZE_KEYS = "Exercise 1 · quantize_keys_per_channel"
LAYOUT_ERRORS = "Exercise 2 · layout_errors"
OUTLIER_MASK = "Exercise 3 · outlier_mask"
LOWRANK = "Exercise 4 · lowrank_residual"
GEAR_NBYTES = "Exercise 5 · gear_nbytes"

# one torch thread for the module (tiny tensors); every test starts and ends with an empty exercise table
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/06_gear_kv_cache.py (### BEGIN / END SOLUTION);
# test_good_copies_match_the_lab_solutions keeps them in sync. good_layout_errors uses kv.quantize_groups and
# good_outlier_mask kv.outliers_per_side as the lab does (the lab imports compresslab.kvcompress as kv, and so does
# this file).


def good_quantize_keys_per_channel(k: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """k (b, h, t, d), t divisible by group_size -> k quantized in groups along tokens, dequantized (b, h, t, d)."""
    b, h, t, d = k.shape
    g = k.reshape(b, h, t // group_size, group_size, d)  # (b, h, n_groups, group_size, d): a group = tokens
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    q = torch.round((g - mn) / scale).clamp(0, 2**bits - 1)
    return (q * scale + mn).reshape(b, h, t, d)


def good_layout_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int,
                       group_size: int) -> torch.Tensor:
    """q (b, heads, t, d), k and v (b, kv_heads, t, d) -> (2, 2) relative errors: row 0 the scores with quantized keys,
    row 1 the attention output with quantized values; column 0 per channel (dim=-2), column 1 per token (dim=-1)."""
    d = q.shape[-1]
    rep = q.shape[1] // k.shape[1]  # query heads per KV head (GQA)
    causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()  # (t, t): token i sees tokens <= i

    def attention(k, v):
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (b, heads, t, d)
        s = q @ k.mT / math.sqrt(d)  # (b, heads, t, t)
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        return s.masked_fill(~causal, 0.0), p @ v  # the scores a token computes, the output (b, heads, t, d)

    def fake(x, dim):  # quantize in groups along dim, then dequantize
        return kv.quantize_groups(x, bits, group_size, dim=dim).dequantize()

    def rel(a, exact):
        return ((a - exact).norm() / exact.norm()).item()

    s, o = attention(k, v)
    keys = [rel(attention(fake(k, dim), v)[0], s) for dim in (-2, -1)]  # per channel, per token
    values = [rel(attention(k, fake(v, dim))[1], o) for dim in (-2, -1)]
    return torch.tensor([keys, values])


def good_outlier_mask(x: torch.Tensor, ratio: float, dim: int) -> torch.Tensor:
    """x (...) -> bool mask (...) of the k largest and k smallest entries of each vector along dim."""
    n = x.shape[dim]  # entries per vector
    k = kv.outliers_per_side(n, ratio)
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k:
        mask.scatter_(dim, x.topk(k, dim=dim).indices, True)
        mask.scatter_(dim, x.topk(k, dim=dim, largest=False).indices, True)
    return mask


def good_lowrank_residual(R: torch.Tensor, Q0: torch.Tensor, iters: int) -> torch.Tensor:
    """R (..., n, d), Q0 (d, r) -> rank-r approximation (..., n, d) after `iters` rounds of power iteration."""
    Q = Q0
    for _ in range(iters):
        P = torch.linalg.qr(R @ Q).Q  # (..., n, r) orthonormal columns
        Q = R.mT @ P  # (..., d, r)
    return P @ Q.mT


def good_gear_nbytes(tokens: int, head_dim: int, bits: int, group_size: int, rank: int, n_outliers: int,
                     index_bytes: int) -> int:
    """Bytes of one head's GEAR block of tokens x head_dim."""
    codes = tokens * head_dim * bits // 8
    scales = 2 * 2 * (tokens * head_dim // group_size)  # fp16 scale + fp16 minimum per group
    sparse = n_outliers * (2 + index_bytes)
    lowrank = 2 * rank * (tokens + head_dim)  # P (tokens x rank) and Q (head_dim x rank)
    return codes + scales + sparse + lowrank


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_quantize_keys: (QUANTIZE_KEYS, good_quantize_keys_per_channel, "quantize_keys_per_channel"),
    checks.check_layout_errors: (LAYOUT_ERRORS, good_layout_errors, "layout_errors"),
    checks.check_outlier_mask: (OUTLIER_MASK, good_outlier_mask, "outlier_mask"),
    checks.check_lowrank: (LOWRANK, good_lowrank_residual, "lowrank_residual"),
    checks.check_gear_nbytes: (GEAR_NBYTES, good_gear_nbytes, "gear_nbytes"),
}
TENSOR_CHECKERS = [checks.check_quantize_keys, checks.check_layout_errors, checks.check_outlier_mask,
                   checks.check_lowrank]  # gear_nbytes: ints


def _token_groups(k, group_size):
    """(b, h, t, d) -> (b, h, t // group_size, group_size, d): a group is group_size consecutive tokens of a channel."""
    b, h, t, d = k.shape
    return k.reshape(b, h, t // group_size, group_size, d)


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def qk_channel_groups(k, bits, group_size):  # groups of group_size CHANNELS of one token (the value layout): with
    b, h, t, d = k.shape  # head_dim 8 < group_size 64 the reshape itself fails
    g = k.reshape(b, h, t, d // group_size, group_size)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    return (torch.round((g - mn) / scale).clamp(0, 2**bits - 1) * scale + mn).reshape(b, h, t, d)


def qk_minmax_over_channels(k, bits, group_size):  # token groups, but min/max over the channels (dim 4): per token
    g = _token_groups(k, group_size)
    mn, mx = g.amin(4, keepdim=True), g.amax(4, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    return (torch.round((g - mn) / scale).clamp(0, 2**bits - 1) * scale + mn).reshape(k.shape)


def qk_symmetric(k, bits, group_size):  # absmax, zero at 0: wastes levels on the offset case, not asymmetric
    g = _token_groups(k, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(3, keepdim=True) / qmax).clamp_min(1e-8)
    return (torch.round(g / scale).clamp(-qmax - 1, qmax) * scale).reshape(k.shape)


def qk_2_pow_bits_levels(k, bits, group_size):  # (max - min) / 2^b: the maximum lands on 2^b and is clamped
    g = _token_groups(k, group_size)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    scale = ((mx - mn) / 2**bits).clamp_min(1e-8)
    return (torch.round((g - mn) / scale).clamp(0, 2**bits - 1) * scale + mn).reshape(k.shape)


def qk_floor(k, bits, group_size):  # truncates instead of rounding to the nearest level
    g = _token_groups(k, group_size)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    return (torch.floor((g - mn) / scale).clamp(0, 2**bits - 1) * scale + mn).reshape(k.shape)


def qk_one_group(k, bits, group_size):  # group_size ignored: one range over all the tokens of a channel
    mn, mx = k.amin(2, keepdim=True), k.amax(2, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    return torch.round((k - mn) / scale).clamp(0, 2**bits - 1) * scale + mn


def qk_integer_zero_point(k, bits, group_size):  # GPTQ-style zero = round(-min / scale): the minimum is not exact
    g = _token_groups(k, group_size)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    zero = torch.round(-mn / scale)
    q = (torch.round(g / scale) + zero).clamp(0, 2**bits - 1)
    return ((q - zero) * scale).reshape(k.shape)


def qk_forgets_minimum(k, bits, group_size):  # dequantizes as q * scale: the zero point is dropped
    g = _token_groups(k, group_size)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    return (torch.round((g - mn) / scale).clamp(0, 2**bits - 1) * scale).reshape(k.shape)


def qk_returns_codes(k, bits, group_size):  # the integer codes, not dequantized
    g = _token_groups(k, group_size)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    return torch.round((g - mn) / scale).clamp(0, 2**bits - 1).reshape(k.shape)


def qk_groups_not_contiguous(k, bits, group_size):  # reshape (b, h, g, t // g, d): groups of STRIDED tokens
    b, h, t, d = k.shape  # (token i goes to group i % (t // g)), not runs of consecutive tokens
    g = k.reshape(b, h, group_size, t // group_size, d)
    mn, mx = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    return (torch.round((g - mn) / scale).clamp(0, 2**bits - 1) * scale + mn).reshape(b, h, t, d)


WRONG_QUANTIZE_KEYS = [
    (qk_channel_groups, "raised RuntimeError"),  # (wrong function, a fragment of the failure message it must produce, or None)
    (qk_minmax_over_channels, "channel 3 an outlier channel"),
    (qk_symmetric, None),
    (qk_2_pow_bits_levels, None),
    (qk_floor, None),
    (qk_one_group, "groups of 64 tokens"),  # right on the one-group case (8 bits, 64 of 64 tokens)
    (qk_integer_zero_point, None),
    (qk_forgets_minimum, None),
    (qk_returns_codes, None),
    (qk_groups_not_contiguous, None),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 2
# Each takes the solution's steps and changes one: the helpers below are those steps, right.


def _fake(x, bits, group_size, dim):  # the package's quantizer, dequantized: dim=-2 per channel, dim=-1 per token
    return kv.quantize_groups(x, bits, group_size, dim=dim).dequantize()


def _rel(a, exact):
    return ((a - exact).norm() / exact.norm()).item()


def _causal(t):  # (t, t): token i sees tokens <= i
    return torch.ones(t, t, dtype=torch.bool).tril()


def _kv_for_heads(x, heads):  # (b, kv_heads, t, d) -> (b, heads, t, d): kv head j for query heads j*r ... j*r + r - 1
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _scores_and_output(q, k, v):  # the solution's attention: masked scores, output
    s = q @ _kv_for_heads(k, q.shape[1]).mT / math.sqrt(q.shape[-1])
    causal = _causal(q.shape[-2])
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    return s.masked_fill(~causal, 0.0), p @ _kv_for_heads(v, q.shape[1])


def _table(q, k, v, bits, group_size, attention=_scores_and_output, err=_rel, dims=(-2, -1)):
    """The solution's table with one step swapped: its attention, its error or its order of layouts."""
    s, o = attention(q, k, v)
    keys = [err(attention(q, _fake(k, bits, group_size, dim), v)[0], s) for dim in dims]
    values = [err(attention(q, k, _fake(v, bits, group_size, dim))[1], o) for dim in dims]
    return torch.tensor([keys, values])


def le_layouts_swapped(q, k, v, bits, group_size):  # "per channel" as groups along the channels (dim=-1): each
    return _table(q, k, v, bits, group_size, dims=(-1, -2))  # column holds the other layout's error


def le_no_sqrt_d(q, k, v, bits, group_size):  # scores q @ k^T without / sqrt(d): the scores' RELATIVE error is the
    def attention(q, k, v):  # same (a common factor cancels), but the softmax is sharper, so the output row moves
        s = q @ _kv_for_heads(k, q.shape[1]).mT
        causal = _causal(q.shape[-2])
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        return s.masked_fill(~causal, 0.0), p @ _kv_for_heads(v, q.shape[1])
    return _table(q, k, v, bits, group_size, attention)


def le_divides_by_d(q, k, v, bits, group_size):  # / d instead of / sqrt(d): a softmax too flat
    def attention(q, k, v):
        s = q @ _kv_for_heads(k, q.shape[1]).mT / q.shape[-1]
        causal = _causal(q.shape[-2])
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        return s.masked_fill(~causal, 0.0), p @ _kv_for_heads(v, q.shape[1])
    return _table(q, k, v, bits, group_size, attention)


def le_no_causal_mask(q, k, v, bits, group_size):  # every token attends to every token, future included
    def attention(q, k, v):
        s = q @ _kv_for_heads(k, q.shape[1]).mT / math.sqrt(q.shape[-1])
        return s, s.softmax(-1) @ _kv_for_heads(v, q.shape[1])
    return _table(q, k, v, bits, group_size, attention)


def le_scores_of_the_future_counted(q, k, v, bits, group_size):  # the softmax is masked, but the scores' error is
    def attention(q, k, v):  # taken over the whole t x t matrix, scores no token computes included
        s = q @ _kv_for_heads(k, q.shape[1]).mT / math.sqrt(q.shape[-1])
        p = s.masked_fill(~_causal(q.shape[-2]), float("-inf")).softmax(-1)
        return s, p @ _kv_for_heads(v, q.shape[1])
    return _table(q, k, v, bits, group_size, attention)


def le_mask_filled_with_zero(q, k, v, bits, group_size):  # masked_fill(..., 0) before the softmax: a future score of
    def attention(q, k, v):  # 0 still gets weight exp(0); only -inf removes it
        s = q @ _kv_for_heads(k, q.shape[1]).mT / math.sqrt(q.shape[-1])
        s = s.masked_fill(~_causal(q.shape[-2]), 0.0)
        return s, s.softmax(-1) @ _kv_for_heads(v, q.shape[1])
    return _table(q, k, v, bits, group_size, attention)


def le_softmax_over_queries(q, k, v, bits, group_size):  # softmax(dim=-2): normalised over the queries, not keys
    def attention(q, k, v):
        s = q @ _kv_for_heads(k, q.shape[1]).mT / math.sqrt(q.shape[-1])
        causal = _causal(q.shape[-2])
        p = s.masked_fill(~causal, float("-inf")).softmax(-2)
        return s.masked_fill(~causal, 0.0), p @ _kv_for_heads(v, q.shape[1])
    return _table(q, k, v, bits, group_size, attention)


def le_kv_heads_tiled(q, k, v, bits, group_size):  # .repeat tiles the kv heads: query head h reads kv head
    def attention(q, k, v):  # h % kv_heads (0, 1, 0, 1, ...), not h // (heads / kv_heads)
        r = q.shape[1] // k.shape[1]
        s = q @ k.repeat(1, r, 1, 1).mT / math.sqrt(q.shape[-1])
        causal = _causal(q.shape[-2])
        return s.masked_fill(~causal, 0.0), s.masked_fill(~causal, float("-inf")).softmax(-1) @ v.repeat(1, r, 1, 1)
    return _table(q, k, v, bits, group_size, attention)


def le_kv_heads_not_repeated(q, k, v, bits, group_size):  # q (b, 4, t, d) @ k^T (b, 2, d, t) does not broadcast
    def attention(q, k, v):
        s = q @ k.mT / math.sqrt(q.shape[-1])
        causal = _causal(q.shape[-2])
        return s.masked_fill(~causal, 0.0), s.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    return _table(q, k, v, bits, group_size, attention)


def le_probabilities_instead_of_output(q, k, v, bits, group_size):  # the values row measured on softmax(S): values
    def attention(q, k, v):  # never change the probabilities, so the row is 0
        s = q @ _kv_for_heads(k, q.shape[1]).mT / math.sqrt(q.shape[-1])
        causal = _causal(q.shape[-2])
        return s.masked_fill(~causal, 0.0), s.masked_fill(~causal, float("-inf")).softmax(-1)
    return _table(q, k, v, bits, group_size, attention)


def le_absolute_error(q, k, v, bits, group_size):  # ||A_hat - A||, not divided by ||A||
    return _table(q, k, v, bits, group_size, err=lambda a, exact: (a - exact).norm().item())


def le_squared_relative_error(q, k, v, bits, group_size):  # ||A_hat - A||^2 / ||A||^2: the relative MSE
    return _table(q, k, v, bits, group_size, err=lambda a, exact: (((a - exact).norm() / exact.norm()) ** 2).item())


def le_mean_of_per_head_errors(q, k, v, bits, group_size):  # one relative error per (batch, head), then their mean:
    def err(a, exact):  # heads with small scores weigh as much as loud ones
        return ((a - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))).mean().item()
    return _table(q, k, v, bits, group_size, err=err)


def le_quantizes_q_too(q, k, v, bits, group_size):  # the queries quantized with the keys: the cache never holds q
    s, o = _scores_and_output(q, k, v)
    keys = [_rel(_scores_and_output(_fake(q, bits, group_size, dim), _fake(k, bits, group_size, dim), v)[0], s)
            for dim in (-2, -1)]
    values = [_rel(_scores_and_output(q, k, _fake(v, bits, group_size, dim))[1], o) for dim in (-2, -1)]
    return torch.tensor([keys, values])


def le_values_row_with_quantized_keys(q, k, v, bits, group_size):  # the values row quantizes k as well (both in
    s, o = _scores_and_output(q, k, v)  # the same layout): it mixes the keys' error into the values'
    keys = [_rel(_scores_and_output(q, _fake(k, bits, group_size, dim), v)[0], s) for dim in (-2, -1)]
    values = [_rel(_scores_and_output(q, _fake(k, bits, group_size, dim), _fake(v, bits, group_size, dim))[1], o)
              for dim in (-2, -1)]
    return torch.tensor([keys, values])


def le_keys_row_on_the_output(q, k, v, bits, group_size):  # the keys judged by the output too, not the scores
    s, o = _scores_and_output(q, k, v)
    keys = [_rel(_scores_and_output(q, _fake(k, bits, group_size, dim), v)[1], o) for dim in (-2, -1)]
    values = [_rel(_scores_and_output(q, k, _fake(v, bits, group_size, dim))[1], o) for dim in (-2, -1)]
    return torch.tensor([keys, values])


WRONG_LAYOUT_ERRORS = [
    (le_layouts_swapped, None),
    (le_no_sqrt_d, None),
    (le_divides_by_d, None),
    (le_no_causal_mask, None),
    (le_scores_of_the_future_counted, None),
    (le_mask_filled_with_zero, None),
    (le_softmax_over_queries, None),
    (le_kv_heads_tiled, "2 query heads per kv head"),
    (le_kv_heads_not_repeated, "raised RuntimeError"),
    (le_probabilities_instead_of_output, None),
    (le_absolute_error, None),
    (le_squared_relative_error, None),
    (le_mean_of_per_head_errors, None),
    (le_quantizes_q_too, None),
    (le_values_row_with_quantized_keys, None),
    (le_keys_row_on_the_output, None),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 3


def _scatter(x, dim, *indices):
    mask = torch.zeros_like(x, dtype=torch.bool)
    for idx in indices:
        mask.scatter_(dim, idx, True)
    return mask


def om_largest_abs(x, ratio, dim):  # the 2k largest |x|: misses the bottom tail of a skewed (all positive) vector
    n = x.shape[dim]  # entries per vector
    k = kv.outliers_per_side(n, ratio)
    return _scatter(x, dim, *([x.abs().topk(2 * k, dim=dim).indices] if k else []))


def om_ratio_per_side(x, ratio, dim):  # ratio on each side: twice the outliers
    k = kv.outliers_per_side(x.shape[dim], 2 * ratio)
    return _scatter(x, dim, *([x.topk(k, dim=dim).indices, x.topk(k, dim=dim, largest=False).indices] if k else []))


def om_last_dim(x, ratio, dim):  # dim ignored: always along the last dim (right for values, wrong for keys)
    k = kv.outliers_per_side(x.shape[-1], ratio)
    return _scatter(x, -1, *([x.topk(k).indices, x.topk(k, largest=False).indices] if k else []))


def om_k_from_last_dim(x, ratio, dim):  # topk along dim, but k counted from the last dim's length
    k = kv.outliers_per_side(x.shape[-1], ratio)
    return _scatter(x, dim, *([x.topk(k, dim=dim).indices, x.topk(k, dim=dim, largest=False).indices] if k else []))


def om_largest_only(x, ratio, dim):  # the k largest, no bottom tail
    n = x.shape[dim]  # entries per vector
    k = kv.outliers_per_side(n, ratio)
    return _scatter(x, dim, *([x.topk(k, dim=dim).indices] if k else []))


def om_int_k(x, ratio, dim):  # k = int(ratio * n / 2): no minimum of 1, so 10 % of 16 entries gives no outlier
    k = int(ratio * x.shape[dim] / 2)
    return _scatter(x, dim, *([x.topk(k, dim=dim).indices, x.topk(k, dim=dim, largest=False).indices] if k else []))


def om_float_mask(x, ratio, dim):  # 1.0 / 0.0 instead of a bool mask
    return good_outlier_mask(x, ratio, dim).float()


def om_quantile(x, ratio, dim):  # thresholds at the ratio/2 quantiles: interpolated, so not exactly k per side
    hi = x.quantile(1 - ratio / 2, dim=dim, keepdim=True)
    lo = x.quantile(ratio / 2, dim=dim, keepdim=True)
    return (x >= hi) | (x <= lo)


def om_floor_min1(x, ratio, dim):  # rounds ratio * n / 2 down (with a minimum of 1): 1.92 -> 1 instead of 2
    k = 0 if ratio == 0 else max(1, int(ratio * x.shape[dim] / 2))
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k:
        mask.scatter_(dim, x.topk(k, dim=dim).indices, True)
        mask.scatter_(dim, x.topk(k, dim=dim, largest=False).indices, True)
    return mask


WRONG_OUTLIER_MASK = [
    (om_largest_abs, None),  # Gaussian vectors already tell; the skewed case is built for it
    (om_ratio_per_side, None),
    (om_last_dim, "dim=-2, along tokens"),
    (om_k_from_last_dim, "dim=-2, along tokens"),
    (om_largest_only, None),
    (om_int_k, "skewed positive values"),  # the only case where int(ratio * n / 2) is 0 (n = 16, 10 %)
    (om_float_mask, "expected a bool mask"),
    (om_quantile, None),
    (om_floor_min1, "1.92 per side rounds to 2"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 4


def lr_one_round_fewer(R, Q0, iters):  # iters - 1 rounds (and none at all for iters = 1: P is never set)
    Q = Q0
    for _ in range(iters - 1):
        P = torch.linalg.qr(R @ Q).Q
        Q = R.mT @ P
    return P @ Q.mT


def lr_one_round_more(R, Q0, iters):
    Q = Q0
    for _ in range(iters + 1):
        P = torch.linalg.qr(R @ Q).Q
        Q = R.mT @ P
    return P @ Q.mT


def lr_no_qr(R, Q0, iters):  # P = R @ Q, not orthonormalised: P @ Q^T is no projection and grows with every round
    Q = Q0
    for _ in range(iters):
        P = R @ Q
        Q = R.mT @ P
    return P @ Q.mT


def lr_first_round_projection(R, Q0, iters):  # P from the first round only, projected: iters is ignored
    P = torch.linalg.qr(R @ Q0).Q
    return P @ P.mT @ R


def lr_Q_from_R_not_RT(R, Q0, iters):  # Q = R @ P: (n, d) @ (n, r) does not multiply
    Q = Q0
    for _ in range(iters):
        P = torch.linalg.qr(R @ Q).Q
        Q = R @ P
    return P @ Q.mT


def lr_dot_T(R, Q0, iters):  # .T reverses ALL the dims of a batched R: right for 2-D, fails on (2, 3, 64, 16)
    Q = Q0
    with warnings.catch_warnings():  # torch warns that .T on a tensor that is not 2-D is deprecated
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(iters):
            P = torch.linalg.qr(R @ Q).Q
            Q = R.T @ P
        return P @ Q.T


def lr_normalised_columns(R, Q0, iters):  # each column divided by its norm instead of QR: not orthogonal, so
    Q = Q0  # P @ P^T is no projection (and the columns all drift to the top singular vector)
    for _ in range(iters):
        Y = R @ Q
        P = Y / Y.norm(dim=-2, keepdim=True)
        Q = R.mT @ P
    return P @ Q.mT


def lr_own_random_start(R, Q0, iters):  # a fresh random start instead of the Q0 given
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(Q0.shape, generator=g)
    for _ in range(iters):
        P = torch.linalg.qr(R @ Q).Q
        Q = R.mT @ P
    return P @ Q.mT


def lr_returns_factors(R, Q0, iters):  # (P, Q), not the approximation P @ Q^T
    return kv.power_iteration(R, Q0, iters)


WRONG_LOWRANK = [
    (lr_one_round_fewer, None),
    (lr_one_round_more, None),
    (lr_no_qr, None),
    (lr_first_round_projection, "rank 2, 3 rounds"),  # right for 1 round
    (lr_Q_from_R_not_RT, "raised RuntimeError"),
    (lr_dot_T, ": Q = R.T @ P)"),  # right on the three 2-D cases: the batched one raises, the line is shown
    (lr_normalised_columns, None),
    (lr_own_random_start, None),
    (lr_returns_factors, "expected a torch.Tensor, got tuple"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 5


def gn_no_minima(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # only the fp16 scales
    return (tokens * head_dim * bits // 8 + 2 * (tokens * head_dim // group_size) + n_outliers * (2 + index_bytes)
            + 2 * rank * (tokens + head_dim))


def gn_codes_one_byte_each(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # codes not packed
    return (tokens * head_dim + 4 * (tokens * head_dim // group_size) + n_outliers * (2 + index_bytes)
            + 2 * rank * (tokens + head_dim))


def gn_no_indices(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # outlier values only
    return (tokens * head_dim * bits // 8 + 4 * (tokens * head_dim // group_size) + 2 * n_outliers
            + 2 * rank * (tokens + head_dim))


def gn_one_factor(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # P only, Q forgotten
    return (tokens * head_dim * bits // 8 + 4 * (tokens * head_dim // group_size) + n_outliers * (2 + index_bytes)
            + 2 * rank * tokens)


def gn_fp32_factors(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # 4 bytes per factor entry
    return (tokens * head_dim * bits // 8 + 4 * (tokens * head_dim // group_size) + n_outliers * (2 + index_bytes)
            + 4 * rank * (tokens + head_dim))


def gn_lowrank_full_size(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # rank * tokens * d
    return (tokens * head_dim * bits // 8 + 4 * (tokens * head_dim // group_size) + n_outliers * (2 + index_bytes)
            + rank * tokens * head_dim)


def gn_groups_per_token_count(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # tokens // g
    return (tokens * head_dim * bits // 8 + 4 * (tokens // group_size) + n_outliers * (2 + index_bytes)  # groups:
            + 2 * rank * (tokens + head_dim))  # the head_dim channels forgotten


def gn_two_byte_indices(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # index_bytes ignored
    return (tokens * head_dim * bits // 8 + 4 * (tokens * head_dim // group_size) + n_outliers * (2 + 2)
            + 2 * rank * (tokens + head_dim))


def gn_in_bits(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # everything in bits, never / 8
    return (tokens * head_dim * bits + 32 * (tokens * head_dim // group_size) + n_outliers * (16 + 8 * index_bytes)
            + 16 * rank * (tokens + head_dim))


WRONG_GEAR_NBYTES = [
    (gn_no_minima, None),
    (gn_codes_one_byte_each, None),
    (gn_no_indices, None),
    (gn_one_factor, None),
    (gn_fp32_factors, None),
    (gn_lowrank_full_size, None),
    (gn_groups_per_token_count, None),
    (gn_two_byte_indices, "1-byte indices"),  # right wherever index_bytes is 2
    (gn_in_bits, None),
]

WRONG = [(checks.check_quantize_keys, QUANTIZE_KEYS, fn, msg) for fn, msg in WRONG_QUANTIZE_KEYS]
WRONG += [(checks.check_layout_errors, LAYOUT_ERRORS, fn, msg) for fn, msg in WRONG_LAYOUT_ERRORS]
WRONG += [(checks.check_outlier_mask, OUTLIER_MASK, fn, msg) for fn, msg in WRONG_OUTLIER_MASK]
WRONG += [(checks.check_lowrank, LOWRANK, fn, msg) for fn, msg in WRONG_LOWRANK]
WRONG += [(checks.check_gear_nbytes, GEAR_NBYTES, fn, msg) for fn, msg in WRONG_GEAR_NBYTES]


# ----------------------------------------------------------------------------- correct alternatives


def alt_quantize_keys_loop(k, bits, group_size):  # one slice of group_size tokens at a time, min/max over tokens
    out = torch.empty_like(k)
    levels = 2**bits - 1
    for start in range(0, k.shape[2], group_size):
        chunk = k[:, :, start : start + group_size, :]
        lo, hi = chunk.min(dim=2, keepdim=True).values, chunk.max(dim=2, keepdim=True).values
        step = torch.clamp((hi - lo) / levels, min=1e-8)
        out[:, :, start : start + group_size, :] = torch.round((chunk - lo) / step).clamp(0, levels) * step + lo
    return out


def alt_quantize_keys_transposed(k, bits, group_size):  # channels first: (b, h, d, n_groups, g), min/max over last
    b, h, t, d = k.shape
    g = k.transpose(-1, -2).reshape(b, h, d, t // group_size, group_size)
    mn, mx = torch.aminmax(g, dim=-1, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    q = ((g - mn) / scale).round().clamp(0, 2**bits - 1)
    return (q * scale + mn).reshape(b, h, d, t).transpose(-1, -2)


def alt_quantize_keys_unflatten_no_clamp(k, bits, group_size):  # unflatten; no clamp of the codes:
    g = k.unflatten(2, (-1, group_size))  # round((x - min) / scale) lies in [0, 2^b - 1] already
    mn = g.amin(dim=3, keepdim=True)
    scale = torch.clamp_min((g.amax(dim=3, keepdim=True) - mn) / (2**bits - 1), 1e-8)
    return (torch.round((g - mn) / scale) * scale + mn).flatten(2, 3)


def alt_quantize_keys_float64(k, bits, group_size):  # the lab's formula in float64, back to float32
    return good_quantize_keys_per_channel(k.double(), bits, group_size).to(k.dtype)


def alt_quantize_keys_normalised(k, bits, group_size):  # (x - min) / (max - min) in [0, 1], times the levels
    g = _token_groups(k, group_size)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    rng, levels = (mx - mn).clamp_min(1e-8), 2**bits - 1
    return (torch.round((g - mn) / rng * levels) / levels * rng + mn).reshape(k.shape)


def alt_layout_errors_einsum(q, k, v, bits, group_size):  # einsum, kv heads by expand + reshape (transformers'
    b, heads, t, d = q.shape  # repeat_kv), the mask as a float bias, each entry computed on its own
    kv_heads = k.shape[1]

    def for_heads(x):  # (b, kv_heads, t, d) -> (b, heads, t, d)
        return x[:, :, None].expand(b, kv_heads, heads // kv_heads, t, d).reshape(b, heads, t, d)

    bias = torch.full((t, t), float("-inf")).triu(1)  # 0 on and below the diagonal, -inf above

    def scores(kk):
        return torch.einsum("bhqd,bhkd->bhqk", q, for_heads(kk)) / d**0.5 + bias

    def output(kk, vv):
        return torch.einsum("bhqk,bhkd->bhqd", scores(kk).softmax(dim=-1), for_heads(vv))

    def visible(s):  # the scores a token computes, the future at 0
        return torch.nan_to_num(s, neginf=0.0)

    def quantized(x, dim):
        return kv.quantize_groups(x, bits, group_size, dim).dequantize(torch.float32)

    table = torch.empty(2, 2)
    for j, dim in enumerate((-2, -1)):
        s, s_hat = visible(scores(k)), visible(scores(quantized(k, dim)))
        o, o_hat = output(k, v), output(k, quantized(v, dim))
        table[0, j] = torch.linalg.norm(s_hat - s) / torch.linalg.norm(s)
        table[1, j] = torch.linalg.norm(o_hat - o) / torch.linalg.norm(o)
    return table


def alt_layout_errors_grouped_queries(q, k, v, bits, group_size):  # no repetition: q viewed as (b, kv_heads, r, t, d)
    b, heads, t, d = q.shape  # so each kv head broadcasts over its r query heads; sdpa for the output;
    qg = q.reshape(b, k.shape[1], heads // k.shape[1], t, d)  # a nested list of floats returned
    mask = torch.ones(t, t, dtype=torch.bool).tril()

    def scores(kk):
        return (qg @ kk[:, :, None].mT / math.sqrt(d)).masked_fill(~mask, 0)

    def output(kk, vv):
        return F.scaled_dot_product_attention(qg, kk[:, :, None], vv[:, :, None], is_causal=True)

    def dist(a, exact):
        return float(torch.dist(a, exact) / exact.norm())

    per_channel, per_token = (lambda x: kv.fake_quantize_kv(x, "key", bits, group_size),
                              lambda x: kv.fake_quantize_kv(x, "value", bits, group_size))
    return [[dist(scores(f(k)), scores(k)) for f in (per_channel, per_token)],
            [dist(output(k, f(v)), output(k, v)) for f in (per_channel, per_token)]]


def alt_layout_errors_per_head_loop(q, k, v, bits, group_size):  # one query head at a time, squared errors summed
    r = q.shape[1] // k.shape[1]  # over heads, the square root at the end: the same Frobenius norm; quantized
    t, d = q.shape[-2:]  # after repeating the kv heads (the groups never cross heads, so nothing changes)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    k_rep, v_rep = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    out = torch.zeros(2, 2, dtype=torch.float64)
    for j, dim in enumerate((-2, -1)):
        k_hat = kv.quantize_groups(k_rep, bits, group_size, dim).dequantize()
        v_hat = kv.quantize_groups(v_rep, bits, group_size, dim).dequantize()
        num, den = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                s = (q[b, h] @ k_rep[b, h].T / math.sqrt(d)).masked_fill(future, 0.0)
                s_hat = (q[b, h] @ k_hat[b, h].T / math.sqrt(d)).masked_fill(future, 0.0)
                p = s.masked_fill(future, -math.inf).softmax(-1)
                o, o_hat = p @ v_rep[b, h], p @ v_hat[b, h]
                num += torch.stack([(s_hat - s).pow(2).sum(), (o_hat - o).pow(2).sum()]).double()
                den += torch.stack([s.pow(2).sum(), o.pow(2).sum()]).double()
        out[:, j] = (num / den).sqrt()
    return out


def alt_layout_errors_visible_entries_only(q, k, v, bits, group_size):  # the scores a token computes picked out by
    t = q.shape[-2]  # boolean indexing (b, heads, t(t+1)/2), not zeroed: the same norms
    visible = torch.ones(t, t, dtype=torch.bool).tril()
    r = q.shape[1] // k.shape[1]

    def scores(kk):
        return (q @ kk.repeat_interleave(r, 1).mT / math.sqrt(q.shape[-1]))[:, :, visible]

    def output(kk, vv):
        s = (q @ kk.repeat_interleave(r, 1).mT / math.sqrt(q.shape[-1])).masked_fill(~visible, -torch.inf)
        return torch.softmax(s, dim=-1) @ vv.repeat_interleave(r, 1)

    def rel(a, exact):
        return torch.linalg.vector_norm(a - exact) / torch.linalg.vector_norm(exact)

    k_hats = [kv.quantize_groups(k, bits, group_size, dim).dequantize() for dim in (-2, -1)]
    v_hats = [kv.quantize_groups(v, bits, group_size, dim).dequantize() for dim in (-2, -1)]
    return torch.stack([torch.stack([rel(scores(k_hat), scores(k)) for k_hat in k_hats]),
                        torch.stack([rel(output(k, v_hat), output(k, v)) for v_hat in v_hats])])


def alt_layout_errors_float64(q, k, v, bits, group_size):  # the attention and the norms in float64
    q, k, v = q.double(), k.double(), v.double()

    def fake(x, dim):
        return kv.quantize_groups(x, bits, group_size, dim).dequantize(torch.float64)

    s, o = _scores_and_output(q, k, v)
    keys = [_rel(_scores_and_output(q, fake(k, dim), v)[0], s) for dim in (-2, -1)]
    values = [_rel(_scores_and_output(q, k, fake(v, dim))[1], o) for dim in (-2, -1)]
    return torch.tensor([keys, values], dtype=torch.float64)


def alt_layout_errors_exercise_1_quantizer(q, k, v, bits, group_size):  # exercise 1's quantizer for keys per
    def fake(x, dim):  # channel (float32 scales, not the stored fp16 ones), the package's for the rest
        if dim == -2:
            return good_quantize_keys_per_channel(x, bits, group_size)
        return kv.fake_quantize_kv(x, "value", bits, group_size)

    s, o = _scores_and_output(q, k, v)
    keys = [_rel(_scores_and_output(q, fake(k, dim), v)[0], s) for dim in (-2, -1)]
    values = [_rel(_scores_and_output(q, k, fake(v, dim))[1], o) for dim in (-2, -1)]
    return torch.tensor([keys, values])


def alt_outlier_mask_argsort(x, ratio, dim):  # argsort once: the first k and the last k positions along dim
    n = x.shape[dim]
    k = kv.outliers_per_side(n, ratio)
    order = x.argsort(dim=dim)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask.scatter_(dim, order.narrow(dim, 0, k), True)  # narrow, not [-k:]: -0 would select everything
    mask.scatter_(dim, order.narrow(dim, n - k, k), True)
    return mask


def alt_outlier_mask_kthvalue(x, ratio, dim):  # thresholds: the k-th smallest and the k-th largest value
    n = x.shape[dim]
    k = kv.outliers_per_side(n, ratio)
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool)
    lo = x.kthvalue(k, dim=dim, keepdim=True).values
    hi = x.kthvalue(n - k + 1, dim=dim, keepdim=True).values
    return (x <= lo) | (x >= hi)


def alt_outlier_mask_sort_last_dim(x, ratio, dim):  # dim moved last, sorted values as thresholds, moved back
    xm = x.movedim(dim, -1)
    k = kv.outliers_per_side(xm.shape[-1], ratio)
    s = xm.sort(dim=-1).values
    mask = (xm <= s[..., k - 1 : k]) | (xm >= s[..., -k:][..., :1]) if k else torch.zeros_like(xm, dtype=torch.bool)
    return mask.movedim(-1, dim)


def alt_outlier_mask_topk_of_negated(x, ratio, dim):  # the smallest as the largest of -x; one scatter of both
    k = kv.outliers_per_side(x.size(dim), ratio)
    idx = torch.cat([x.topk(k, dim).indices, (-x).topk(k, dim).indices], dim=dim)
    return torch.zeros(x.shape, dtype=torch.bool).scatter(dim, idx, torch.ones_like(idx, dtype=torch.bool))


def alt_lowrank_transpose(R, Q0, iters):  # .transpose(-1, -2): the batched transpose spelled out
    Q = Q0
    for _ in range(iters):
        P, _ = torch.linalg.qr(R @ Q, mode="reduced")
        Q = R.transpose(-1, -2) @ P
    return P @ Q.transpose(-1, -2)


def alt_lowrank_projection(R, Q0, iters):  # P @ Q^T = P @ P^T @ R with the LAST round's P
    Q = Q0
    for _ in range(iters):
        P = torch.linalg.qr(torch.matmul(R, Q)).Q
        Q = torch.matmul(R.mT, P)
    return P @ (P.mT @ R)


def alt_lowrank_svd_basis(R, Q0, iters):  # orthonormal basis of R @ Q from its SVD: the same span as QR's
    Q = Q0
    for _ in range(iters):
        P = torch.linalg.svd(R @ Q, full_matrices=False).U
        Q = torch.einsum("...nd,...nr->...dr", R, P)
    return torch.einsum("...nr,...dr->...nd", P, Q)


def alt_lowrank_gram_schmidt(R, Q0, iters):  # modified Gram-Schmidt by hand, column by column, batched
    Q = Q0
    for _ in range(iters):
        Y = R @ Q
        cols = []
        for j in range(Y.shape[-1]):
            v = Y[..., j]
            for u in cols:
                v = v - (u * v).sum(-1, keepdim=True) * u
            cols.append(v / v.norm(dim=-1, keepdim=True))
        P = torch.stack(cols, dim=-1)
        Q = R.mT @ P
    return P @ Q.mT


def alt_gear_nbytes_in_bits(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # bits, then / 8
    groups = tokens * head_dim // group_size
    total_bits = (tokens * head_dim * bits + groups * (16 + 16) + n_outliers * (16 + 8 * index_bytes)
                  + 16 * rank * tokens + 16 * rank * head_dim)
    return total_bits // 8


def alt_gear_nbytes_per_entry(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # a float:
    entries = tokens * head_dim  # bytes per entry times entries (exact: every factor is dyadic on the cases)
    return entries * (bits / 8 + 4 / group_size) + (2 + index_bytes) * n_outliers + 2 * rank * (tokens + head_dim)


def alt_gear_nbytes_parts(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # named parts summed
    parts = {"codes": math.ceil(tokens * head_dim * bits / 8), "scales": 2 * tokens * head_dim // group_size,
             "minima": 2 * tokens * head_dim // group_size, "outlier values": 2 * n_outliers,
             "outlier indices": index_bytes * n_outliers, "P": 2 * tokens * rank, "Q": 2 * head_dim * rank}
    return sum(parts.values())


def alt_gear_nbytes_tensor(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):  # a 0-d tensor
    return torch.tensor(good_gear_nbytes(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes))


CORRECT_ALTERNATIVES = [
    (checks.check_quantize_keys, QUANTIZE_KEYS, alt_quantize_keys_loop),
    (checks.check_quantize_keys, QUANTIZE_KEYS, alt_quantize_keys_transposed),
    (checks.check_quantize_keys, QUANTIZE_KEYS, alt_quantize_keys_unflatten_no_clamp),
    (checks.check_quantize_keys, QUANTIZE_KEYS, alt_quantize_keys_float64),
    (checks.check_quantize_keys, QUANTIZE_KEYS, alt_quantize_keys_normalised),
    (checks.check_layout_errors, LAYOUT_ERRORS, alt_layout_errors_einsum),
    (checks.check_layout_errors, LAYOUT_ERRORS, alt_layout_errors_grouped_queries),
    (checks.check_layout_errors, LAYOUT_ERRORS, alt_layout_errors_per_head_loop),
    (checks.check_layout_errors, LAYOUT_ERRORS, alt_layout_errors_visible_entries_only),
    (checks.check_layout_errors, LAYOUT_ERRORS, alt_layout_errors_float64),
    (checks.check_layout_errors, LAYOUT_ERRORS, alt_layout_errors_exercise_1_quantizer),
    (checks.check_outlier_mask, OUTLIER_MASK, alt_outlier_mask_argsort),
    (checks.check_outlier_mask, OUTLIER_MASK, alt_outlier_mask_kthvalue),
    (checks.check_outlier_mask, OUTLIER_MASK, alt_outlier_mask_sort_last_dim),
    (checks.check_outlier_mask, OUTLIER_MASK, alt_outlier_mask_topk_of_negated),
    (checks.check_lowrank, LOWRANK, alt_lowrank_transpose),
    (checks.check_lowrank, LOWRANK, alt_lowrank_projection),
    (checks.check_lowrank, LOWRANK, alt_lowrank_svd_basis),
    (checks.check_lowrank, LOWRANK, alt_lowrank_gram_schmidt),
    (checks.check_gear_nbytes, GEAR_NBYTES, alt_gear_nbytes_in_bits),
    (checks.check_gear_nbytes, GEAR_NBYTES, alt_gear_nbytes_per_entry),
    (checks.check_gear_nbytes, GEAR_NBYTES, alt_gear_nbytes_parts),
    (checks.check_gear_nbytes, GEAR_NBYTES, alt_gear_nbytes_tensor),
]


# ----------------------------------------------------------------------------- not done


def _fake_quantize_plain(k: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Exercise 1 in plain Python: every channel of every head, group_size consecutive tokens at a time."""
    out = k.tolist()
    levels = 2**bits - 1
    for b, heads in enumerate(out):
        for h, tokens in enumerate(heads):
            for c in range(len(tokens[0])):
                for start in range(0, len(tokens), group_size):
                    group = [tokens[t][c] for t in range(start, start + group_size)]
                    lo, hi = min(group), max(group)
                    scale = (hi - lo) / levels
                    for t in range(start, start + group_size):
                        out[b][h][t][c] = round((tokens[t][c] - lo) / scale) * scale + lo
    return torch.tensor(out)


def _outlier_mask_plain(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exercise 2 along dim=-2 of a (b, n, c) tensor in plain Python: the k smallest and k largest of each column."""
    mask = torch.zeros(x.shape, dtype=torch.bool)
    for b, rows in enumerate(x.tolist()):
        for c in range(len(rows[0])):
            order = sorted(range(len(rows)), key=lambda i: rows[i][c])
            for i in order[:k] + order[-k:]:
                mask[b, i, c] = True
    return mask


def _sample_calls():
    """checker -> (args of one sample call, an independent computation of what the reference must return)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 8, 3, generator=g) * 2 + 1
    x = torch.randn(2, 10, 5, generator=g)
    assert kv.outliers_per_side(10, 0.4) == 2  # 40 % of 10 entries: 2 on each side
    # R = U diag(s) V^T with a start Q0 spanning V's first two columns: after any number of rounds P spans U's first
    # two columns, and P @ Q^T is the best rank-2 approximation U_2 diag(s_2) V_2^T
    U = torch.linalg.qr(torch.randn(6, 4, generator=g)).Q
    V = torch.linalg.qr(torch.randn(4, 4, generator=g)).Q
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    R = (U * s) @ V.T
    Q0 = V[:, :2] @ torch.tensor([[1.0, 0.5], [-0.3, 2.0]])
    best2 = (U[:, :2] * s[:2]) @ V[:, :2].T
    # 128 tokens x 64 channels, 4 bits, groups of 32, rank 2, 10 outliers with 1-byte indices
    nbytes = 128 * 64 * 4 // 8 + (128 * 64 // 32) * (2 + 2) + 10 * (2 + 1) + 2 * (128 * 2 + 64 * 2)
    # exercise 2 on q (1, 4, 8, 4), k and v (1, 2, 8, 4), 2 bits, groups of 4: the table from kvformat.attention_error,
    # written apart from the checker's reference (kvformat.layout_attention_errors)
    qa = torch.randn(1, 4, 8, 4, generator=g)
    ka, va = torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 8, 4, generator=g)
    per = {d: (lambda x, d=d: kv.quantize_groups(x, 2, 4, dim=d).dequantize()) for d in (-2, -1)}
    table = torch.tensor([[kvformat.attention_error(qa, ka, va, per[d](ka), va)["scores"] for d in (-2, -1)],
                          [kvformat.attention_error(qa, ka, va, ka, per[d](va))["output"] for d in (-2, -1)]])
    return {
        checks.check_quantize_keys: ((k, 2, 4), _fake_quantize_plain(k, 2, 4)),
        checks.check_layout_errors: ((qa, ka, va, 2, 4), table),
        checks.check_outlier_mask: ((x, 0.4, -2), _outlier_mask_plain(x, 2)),
        checks.check_lowrank: ((R, Q0, 2), best2),
        checks.check_gear_nbytes: ((128, 64, 4, 32, 2, 10, 1), nbytes),
    }


def test_not_done_references_work_the_way_the_lab_uses_them(capsys):
    """The lab calls the references on real cache shapes: quantize_keys on (1, heads, tokens, head_dim) keys,
    layout_errors on SmolLM2's 9 query heads and 3 kv heads at 2 bits in groups of 64, outlier_mask along the tokens
    (dim=-2) with ratio 0 too, lowrank_residual on (1, heads, tokens, head_dim) residuals with a (head_dim, r) start,
    gear_nbytes with kv.index_bytes."""
    def todo(*args):
        raise NotImplementedError

    quantize, layout, mask, lowrank, nbytes = (c(todo) for c in GOOD)
    capsys.readouterr()
    g = torch.Generator().manual_seed(1)
    K = torch.randn(1, 3, 128, 64, generator=g)
    torch.testing.assert_close(quantize(K, 2, 64), good_quantize_keys_per_channel(K, 2, 64))
    Q, V = torch.randn(1, 9, 128, 64, generator=g), torch.randn(1, 3, 128, 64, generator=g)
    table = layout(Q, K, V, 2, 64)
    assert table.shape == (2, 2) and table.dtype == torch.float32
    torch.testing.assert_close(table, good_layout_errors(Q, K, V, 2, 64))
    for r in (0.0, 0.02, 0.08):
        m = mask(K, r, -2)
        assert m.dtype == torch.bool and torch.equal(m, good_outlier_mask(K, r, -2))
        assert int(m.sum()) == 2 * kv.outliers_per_side(128, r) * 3 * 64
    Q0 = torch.randn(64, 4, generator=g)
    L = lowrank(K, Q0, 3)
    assert L.shape == K.shape and int(torch.linalg.matrix_rank(L[0, 1])) == 4
    torch.testing.assert_close(L, good_lowrank_residual(K, Q0, 3), rtol=1e-4, atol=1e-4)
    assert nbytes(128, 64, 2, 64, 4, 2 * 2 * 64, kv.index_bytes(128)) == good_gear_nbytes(128, 64, 2, 64, 4, 256, 1)


# ----------------------------------------------------------------------------- failed


def test_other_exceptions_in_gear_nbytes_are_failures_not_crashes(capsys):
    """Exercise 4 gets ints (the shared helper's x.amin typo needs a tensor): a TypeError from plain Python."""
    def typo(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):
        return math.prod(tokens, head_dim) * bits // 8  # math.prod takes one iterable

    out = assert_failed(checks.check_gear_nbytes, GEAR_NBYTES, typo, capsys, "raised TypeError")
    assert "math.prod(tokens, head_dim)" in out  # the offending line is shown


def test_returning_none_is_a_failure(capsys):
    def forgot_return(k, bits, group_size):
        good_quantize_keys_per_channel(k, bits, group_size)

    def forgot_return_nbytes(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes):
        good_gear_nbytes(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes)

    assert_failed(checks.check_quantize_keys, QUANTIZE_KEYS, forgot_return, capsys,
                  "expected a torch.Tensor, got NoneType")
    checks.STATUS.clear()
    assert_failed(checks.check_gear_nbytes, GEAR_NBYTES, forgot_return_nbytes, capsys,
                  "expected a number, got NoneType")


def test_the_integer_zero_point_is_really_different():
    """Why qk_integer_zero_point is wrong here: rounding -min / scale to an integer moves every level by up to half a
    step, so the group minimum is no longer reproduced exactly (the checker's 1e-4 would accept float noise only)."""
    k = checks._keys((1, 1, 96, 12), 82, offset=5.0)
    good, gptq = good_quantize_keys_per_channel(k, 2, 32), qk_integer_zero_point(k, 2, 32)
    mins = k.reshape(1, 1, 3, 32, 12).amin(3)
    torch.testing.assert_close(good.reshape(1, 1, 3, 32, 12).amin(3), mins)  # the minimum is a level, exactly
    assert (gptq - good).abs().max() > 0.05


def test_int_k_is_caught_by_the_skewed_case_only():
    """Why om_int_k fails, and where: int(ratio * n / 2) is 0 for 10 % of 16 entries (the skewed case), where
    outliers_per_side keeps at least one per side; on the other cases' sizes the two agree."""
    assert int(0.10 * 16 / 2) == 0 and kv.outliers_per_side(16, 0.10) == 1
    for n, ratio in ((200, 0.02), (64, 0.04), (128, 0.05), (8, 0.0)):  # the other four cases
        assert int(ratio * n / 2) == kv.outliers_per_side(n, ratio)


def test_normalised_columns_are_not_an_orthonormal_basis():
    """Why lr_normalised_columns is wrong: unit columns are not orthogonal, so P @ P^T is no projection and the
    result differs from the power iteration's."""
    R = checks._slow_spectrum((40, 12), 91)
    Q0 = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    Y = R @ Q0
    P = Y / Y.norm(dim=-2, keepdim=True)
    torch.testing.assert_close(P.norm(dim=-2), torch.ones(2))
    assert (P.mT @ P - torch.eye(2)).abs().max() > 0.1
    assert (lr_normalised_columns(R, Q0, 3) - good_lowrank_residual(R, Q0, 3)).abs().max() > 1e-2


def test_dot_T_is_right_for_2d_and_wrong_for_batched():
    """Why lr_dot_T passes three cases: .T is .mT on a 2-D R; only the batched (2, 3, 64, 16) case tells."""
    R = checks._slow_spectrum((40, 12), 91)
    Q0 = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lr_dot_T(R, Q0, 3), good_lowrank_residual(R, Q0, 3))
    with pytest.raises(RuntimeError):
        lr_dot_T(checks._slow_spectrum((2, 3, 64, 16), 92), torch.randn(16, 4), 3)



def _layout_tables(fn):
    """fn's table on each of exercise 2's checker cases, as float64."""
    return [torch.as_tensor(fn(*case.args), dtype=torch.float64) for case in checks._layout_cases()]


def test_the_layout_reference_agrees_with_attention_error():
    """kvformat.layout_attention_errors (the checker's reference) and kvformat.attention_error (the lab's measurement of
    section 2 before this exercise, written separately) give the same table on every case."""
    for case in checks._layout_cases():
        q, k, v, bits, group_size = case.args
        per = {d: kv.quantize_groups(k, bits, group_size, d).dequantize() for d in (-2, -1)}
        per_v = {d: kv.quantize_groups(v, bits, group_size, d).dequantize() for d in (-2, -1)}
        table = torch.tensor([[kvformat.attention_error(q, k, v, per[d], v)["scores"] for d in (-2, -1)],
                              [kvformat.attention_error(q, k, v, k, per_v[d])["output"] for d in (-2, -1)]])
        torch.testing.assert_close(kvformat.layout_attention_errors(q, k, v, bits, group_size), table)


def test_layout_errors_tolerance_separates_right_from_wrong():
    """Why atol 1e-3: exercise 1's float32 quantizer (no fp16 scales and minima) moves the table by at most 3e-4,
    every wrong answer that returns a table is off by at least 1e-2 on some case."""
    ref = _layout_tables(good_layout_errors)
    worst = lambda fn: max((t - r).abs().max().item() for t, r in zip(_layout_tables(fn), ref))  # noqa: E731
    assert 0 < worst(alt_layout_errors_exercise_1_quantizer) < 3e-4
    for fn, _ in WRONG_LAYOUT_ERRORS:
        if fn is not le_kv_heads_not_repeated:  # raises on the GQA cases
            assert worst(fn) > 1e-2, fn.__name__


def test_no_sqrt_d_moves_only_the_output_row():
    """Why le_no_sqrt_d is wrong although its scores row is right: a common factor cancels in a relative error, not
    in the softmax."""
    for got, ref in zip(_layout_tables(le_no_sqrt_d), _layout_tables(good_layout_errors)):
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-6)
        assert (got[1] - ref[1]).abs().max() > 1e-3


def test_tiled_kv_heads_differ_only_with_several_query_heads_per_kv_head():
    """Why le_kv_heads_tiled needs a GQA case with 2 kv heads: with one query head per kv head, or one kv head, .repeat
    and .repeat_interleave give the same heads."""
    tiled, ref = _layout_tables(le_kv_heads_tiled), _layout_tables(good_layout_errors)
    torch.testing.assert_close(tiled[1], ref[1])  # 2 query heads, 2 kv heads: r = 1
    torch.testing.assert_close(tiled[3], ref[3])  # one kv head
    assert (tiled[0] - ref[0]).abs().max() > 1e-2  # 4 query heads on 2 kv heads: head 1 reads kv head 1, not 0

# ----------------------------------------------------------------------------- inputs are cloned per call


def mut_quantize_keys(k, bits, group_size):
    out = good_quantize_keys_per_channel(k, bits, group_size)
    k.zero_()
    return out


def mut_layout_errors(q, k, v, bits, group_size):
    out = good_layout_errors(q, k, v, bits, group_size)
    q.zero_(), k.mul_(-1), v.add_(3)
    return out


def mut_outlier_mask(x, ratio, dim):
    out = good_outlier_mask(x, ratio, dim)
    x.mul_(-1)
    return out


def mut_lowrank(R, Q0, iters):
    out = good_lowrank_residual(R, Q0, iters)
    R.zero_(), Q0.mul_(-3)
    return out


MUTATING = [(checks.check_quantize_keys, QUANTIZE_KEYS, mut_quantize_keys),
            (checks.check_layout_errors, LAYOUT_ERRORS, mut_layout_errors),
            (checks.check_outlier_mask, OUTLIER_MASK, mut_outlier_mask),
            (checks.check_lowrank, LOWRANK, mut_lowrank)]  # gear_nbytes gets ints: nothing to mutate


def test_summary_of_the_lab06_exercises(capsys):
    checks.check_quantize_keys(good_quantize_keys_per_channel)
    checks.check_layout_errors(good_layout_errors)
    checks.check_outlier_mask(om_largest_abs)

    def todo(R, Q0, iters):
        raise NotImplementedError

    checks.check_lowrank(todo)
    checks.check_gear_nbytes(good_gear_nbytes)
    result, lines = summary_lines(capsys)
    assert result == {QUANTIZE_KEYS: "passed", LAYOUT_ERRORS: "passed", OUTLIER_MASK: "failed", LOWRANK: "not done",
                      GEAR_NBYTES: "passed"}
    assert len(lines) == 6 and lines[-1] == "3/5 exercises passed"


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    NAMESPACE = {"kv": kv, "math": math}  # the lab's layout_errors and outlier_mask use them (the lab's imports)
    TENSOR_CHECKERS = TENSOR_CHECKERS
    sample_calls = staticmethod(_sample_calls)
