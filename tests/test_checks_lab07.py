"""The lab 07 (deployment) checkers: the solution passes, a skipped exercise is "not done", and wrong answers fail.

Same structure as tests/test_checks_lab06.py. Every wrong implementation below was run against the checker's cases and
is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded and no tensor is built: the three checkers only call plain-number functions (weight_bytes,
decode_bound) and one on a list of timestamps (latency_stats).
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from checker_testing import (CheckerSuite, assert_accepted, assert_failed, summary_lines)

from compresslab import checks
from compresslab import deploy

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "07_deployment.py"

WEIGHT_BYTES = "Exercise 1 · weight_bytes"
DECODE_BOUND = "Exercise 2 · decode_bound"
LATENCY_STATS = "Exercise 3 · latency_stats"
PAGED_KV = "Exercise 4 · paged_kv_tokens"

# one torch thread for the module (the checkers import torch); every test starts and ends with an empty exercise table
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/07_deployment.py (### BEGIN / END SOLUTION);
# test_good_copies_match_the_lab_solutions keeps them in sync. They use no import: plain Python arithmetic.


def good_weight_bytes(linear_params, other_params, bits, group_size):
    """Bytes of the weights: Linears at `bits` (+ per group an fp16 scale and a `bits`-bit zero), the rest fp16."""
    if bits == 16:
        return 2.0 * (linear_params + other_params)
    groups = linear_params / group_size
    return linear_params * bits / 8 + groups * (2 + bits / 8) + 2.0 * other_params


def good_decode_bound(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):
    """Upper bound on generated tokens/s for `batch` sequences at `context` tokens of cache."""
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token
    return batch * bandwidth_GBps * 1e9 / step_bytes


def good_latency_stats(t_request, token_times):
    """TTFT, mean inter-token latency and decode tokens/s from the request time and each token's arrival time."""
    ttft = token_times[0] - t_request
    itl = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    return ttft, itl, 1.0 / itl


def good_paged_kv_tokens(cache_bytes, kv_bytes_per_token, block_size):
    """Tokens a paged KV cache holds: whole blocks of block_size tokens."""
    blocks = cache_bytes // (kv_bytes_per_token * block_size)
    return int(blocks) * block_size


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_weight_bytes: (WEIGHT_BYTES, good_weight_bytes, "weight_bytes"),
    checks.check_decode_bound: (DECODE_BOUND, good_decode_bound, "decode_bound"),
    checks.check_latency_stats: (LATENCY_STATS, good_latency_stats, "latency_stats"),
    checks.check_paged_kv_tokens: (PAGED_KV, good_paged_kv_tokens, "paged_kv_tokens"),
}

SMOLLM_HIDDEN = 576  # SmolLM2-135M's hidden size: the in_features of most of its Linears


def _assert_same_numbers(result, expected) -> None:
    """A checker's reference output equals an independently computed one: a number, or a tuple of numbers, to 1e-12
    relative (checker_testing.assert_same compares tensors and ints, not floats)."""
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    assert len(results) == len(expecteds)
    for r, e in zip(results, expecteds):
        assert isinstance(r, (int, float))
        assert r == pytest.approx(e, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def wb_floor_div(linear_params, other_params, bits, group_size):  # bits // 8: 0 bytes per code below 8 bits
    if bits == 16:  # (3 // 8 = 4 // 8 = 0), so the 4-bit case already tells
        return 2.0 * (linear_params + other_params)
    groups = linear_params // group_size
    return linear_params * (bits // 8) + groups * (2 + bits // 8) + 2 * other_params


def wb_no_group_overhead(linear_params, other_params, bits, group_size):  # the codes only: scales and zeros forgotten
    if bits == 16:
        return 2.0 * (linear_params + other_params)
    return linear_params * bits / 8 + 2.0 * other_params


def wb_fp16_zero_point(linear_params, other_params, bits, group_size):  # zero point stored fp16: 2 + 2 bytes a group
    if bits == 16:
        return 2.0 * (linear_params + other_params)
    return linear_params * bits / 8 + linear_params / group_size * (2 + 2) + 2.0 * other_params


def wb_embeddings_quantized(linear_params, other_params, bits, group_size):  # other_params at `bits` too (no scales)
    if bits == 16:
        return 2.0 * (linear_params + other_params)
    groups = linear_params / group_size
    return linear_params * bits / 8 + groups * (2 + bits / 8) + other_params * bits / 8


def wb_overhead_per_row(linear_params, other_params, bits, group_size):  # group_size ignored: one scale + zero per
    if bits == 16:  # output row of SMOLLM_HIDDEN inputs (per-channel quantization), not per group
        return 2.0 * (linear_params + other_params)
    rows = linear_params / SMOLLM_HIDDEN
    return linear_params * bits / 8 + rows * (2 + bits / 8) + 2.0 * other_params


def wb_fp16_with_scales(linear_params, other_params, bits, group_size):  # no bits == 16 branch: fp16 gets groups of
    groups = linear_params / (group_size or 64)  # 64 (the default) with a scale and a 16-bit zero each
    return linear_params * bits / 8 + groups * (2 + bits / 8) + 2.0 * other_params


def wb_fp16_divides_by_none(linear_params, other_params, bits, group_size):  # no bits == 16 branch, group_size None
    groups = linear_params / group_size  # for fp16: TypeError on the first case
    return linear_params * bits / 8 + groups * (2 + bits / 8) + 2.0 * other_params


def wb_in_bits(linear_params, other_params, bits, group_size):  # everything in bits, never / 8
    if bits == 16:
        return 16.0 * (linear_params + other_params)
    groups = linear_params / group_size
    return linear_params * bits + groups * (16 + bits) + 16.0 * other_params


def wb_fp32_others(linear_params, other_params, bits, group_size):  # other params at 4 bytes (fp32 as loaded)
    if bits == 16:
        return 2.0 * linear_params + 4.0 * other_params
    groups = linear_params / group_size
    return linear_params * bits / 8 + groups * (2 + bits / 8) + 4.0 * other_params


def wb_two_codes_per_byte(linear_params, other_params, bits, group_size):  # 4-bit packing hard-coded: half a byte per
    if bits == 16:  # code and per zero point, whatever `bits` is (right for 4-bit)
        return 2.0 * (linear_params + other_params)
    groups = linear_params / group_size
    return linear_params / 2 + groups * (2 + 0.5) + 2.0 * other_params


WRONG_WEIGHT_BYTES = [
    (wb_floor_div, "4-bit g64"),  # (wrong function, a fragment of the failure message it must produce, or None)
    (wb_no_group_overhead, "4-bit g64"),
    (wb_fp16_zero_point, "4-bit g64"),
    (wb_embeddings_quantized, "4-bit g64"),
    (wb_overhead_per_row, "4-bit g64"),
    (wb_fp16_with_scales, "fp16 (bits=16)"),
    (wb_fp16_divides_by_none, "raised TypeError"),
    (wb_in_bits, "fp16 (bits=16)"),
    (wb_fp32_others, "fp16 (bits=16)"),
    (wb_two_codes_per_byte, "3-bit g64"),  # right on the fp16 and 4-bit cases
]


# ----------------------------------------------------------------------------- wrong answers: exercise 2


def db_no_kv_cache(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):  # weights only: right at
    return batch * bandwidth_GBps * 1e9 / weight_bytes  # context 0


def db_kv_once_per_step(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):  # one sequence's cache,
    step_bytes = weight_bytes + context * kv_bytes_per_token  # not batch of them: right at batch 1
    return batch * bandwidth_GBps * 1e9 / step_bytes


def db_per_sequence(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):  # not x batch: the rate of
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token  # one sequence, not of all of them
    return bandwidth_GBps * 1e9 / step_bytes


def db_gibibytes(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):  # GiB/s: 2**30, not 1e9
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token
    return batch * bandwidth_GBps * 2**30 / step_bytes


def db_weights_per_sequence(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):  # weights read once
    step_bytes = batch * (weight_bytes + context * kv_bytes_per_token)  # per sequence too: batching gains nothing
    return batch * bandwidth_GBps * 1e9 / step_bytes


def db_seconds_per_step(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):  # the time of a step,
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token  # not tokens/s
    return step_bytes / (bandwidth_GBps * 1e9)


WRONG_DECODE_BOUND = [
    (db_no_kv_cache, "batch 1 at 2048 tokens of context"),  # right on the empty-cache case
    (db_kv_once_per_step, "batch 16"),  # right at batch 1
    (db_per_sequence, "batch 16"),  # right at batch 1
    (db_gibibytes, "empty cache (context 0)"),
    (db_weights_per_sequence, "batch 16"),  # right at batch 1
    (db_seconds_per_step, "empty cache (context 0)"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 3


def ls_ttft_first_interval(t_request, token_times):  # TTFT between the first two tokens: a decode step, not prefill
    ttft = token_times[1] - token_times[0]
    itl = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    return ttft, itl, 1.0 / itl


def ls_itl_includes_prefill(t_request, token_times):  # (last - t_request) / n: the prefill mixed into the decode step
    ttft = token_times[0] - t_request
    itl = (token_times[-1] - t_request) / len(token_times)
    return ttft, itl, 1.0 / itl


def ls_itl_over_n(t_request, token_times):  # n tokens but n - 1 intervals between them
    ttft = token_times[0] - t_request
    itl = (token_times[-1] - token_times[0]) / len(token_times)
    return ttft, itl, 1.0 / itl


def ls_tps_over_total(t_request, token_times):  # decode tokens/s = n / total time: the naive rate, prefill included
    ttft = token_times[0] - t_request
    itl = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    return ttft, itl, len(token_times) / (token_times[-1] - t_request)


def ls_milliseconds(t_request, token_times):  # TTFT and ITL in ms (tokens/s still per second)
    ttft = token_times[0] - t_request
    itl = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    return 1e3 * ttft, 1e3 * itl, 1.0 / itl


def ls_other_order(t_request, token_times):  # a list (itl, ttft, tps): the lab unpacks ttft, itl, tps
    ttft = token_times[0] - t_request
    itl = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    return [itl, ttft, 1.0 / itl]


def ls_median_interval(t_request, token_times):  # median of the intervals: right when they are all equal
    ttft = token_times[0] - t_request
    itl = float(np.median(np.diff(token_times)))
    return ttft, itl, 1.0 / itl


def ls_skip_first_interval(t_request, token_times):  # the first decode interval dropped as "warm-up": right for
    ttft = token_times[0] - t_request  # evenly spaced tokens
    itl = (token_times[-1] - token_times[1]) / (len(token_times) - 2)
    return ttft, itl, 1.0 / itl


WRONG_LATENCY_STATS = [
    (ls_ttft_first_interval, "prefill 0.5 s, then a token every 0.1 s"),
    (ls_itl_includes_prefill, "prefill 0.5 s, then a token every 0.1 s"),
    (ls_itl_over_n, "prefill 0.5 s, then a token every 0.1 s"),
    (ls_tps_over_total, "prefill 0.5 s, then a token every 0.1 s"),
    (ls_milliseconds, "prefill 0.5 s, then a token every 0.1 s"),
    (ls_other_order, "prefill 0.5 s, then a token every 0.1 s"),
    (ls_median_interval, "jittered token times"),  # the first two cases are evenly spaced
    (ls_skip_first_interval, "jittered token times"),
]

# ----------------------------------------------------------------------------- wrong answers: exercise 4


def pk_no_blocks(cache_bytes, kv_bytes_per_token, block_size):  # tokens, not whole blocks: 46 603 for 1 GiB
    return int(cache_bytes // kv_bytes_per_token)


def pk_gigabytes(cache_bytes, kv_bytes_per_token, block_size):  # "1 GiB" read as 1e9 bytes
    blocks = (cache_bytes / 2**30 * 1e9) // (kv_bytes_per_token * block_size)
    return int(blocks) * block_size


def pk_blocks_not_tokens(cache_bytes, kv_bytes_per_token, block_size):  # the number of blocks (2912), not tokens
    return int(cache_bytes // (kv_bytes_per_token * block_size))


def pk_round_up(cache_bytes, kv_bytes_per_token, block_size):  # a partial block counted: one block too many
    return math.ceil(cache_bytes / (kv_bytes_per_token * block_size)) * block_size


def pk_keys_only(cache_bytes, kv_bytes_per_token, block_size):  # "bytes per token" halved: keys only, no values
    blocks = cache_bytes // (kv_bytes_per_token / 2 * block_size)
    return int(blocks) * block_size


def pk_round_nearest(cache_bytes, kv_bytes_per_token, block_size):  # round() instead of floor: a block too many
    return round(cache_bytes / (kv_bytes_per_token * block_size)) * block_size


WRONG_PAGED_KV = [
    (pk_no_blocks, "1 GiB, SmolLM2-135M"),
    (pk_gigabytes, "1 GiB, SmolLM2-135M"),
    (pk_blocks_not_tokens, "1 GiB, SmolLM2-135M"),
    (pk_round_up, "1 GiB, SmolLM2-135M"),
    (pk_keys_only, "1 GiB, SmolLM2-135M"),
    (pk_round_nearest, "1 GiB, SmolLM2-135M"),  # 2912.7 blocks round up to 2913
]

WRONG = [(checks.check_weight_bytes, WEIGHT_BYTES, fn, msg) for fn, msg in WRONG_WEIGHT_BYTES]
WRONG += [(checks.check_decode_bound, DECODE_BOUND, fn, msg) for fn, msg in WRONG_DECODE_BOUND]
WRONG += [(checks.check_latency_stats, LATENCY_STATS, fn, msg) for fn, msg in WRONG_LATENCY_STATS]
WRONG += [(checks.check_paged_kv_tokens, PAGED_KV, fn, msg) for fn, msg in WRONG_PAGED_KV]


# ----------------------------------------------------------------------------- correct alternatives


def alt_weight_bytes_numpy(linear_params, other_params, bits, group_size):  # numpy: bytes per parameter of each
    counts = np.array([linear_params, other_params], dtype=np.float64)  # kind, a dot product (np.float64)
    if bits == 16:
        return np.dot(counts, [2.0, 2.0])
    return np.dot(counts, [bits / 8 + (2 + bits / 8) / group_size, 2.0])


def alt_weight_bytes_per_param(linear_params, other_params, bits, group_size):  # bits per Linear parameter first,
    if bits == 16:  # overhead included (4-bit g64: 4 + 20 / 64 = 4.3125), then / 8
        return 2 * linear_params + 2 * other_params
    bits_per_param = bits + (16 + bits) / group_size
    return linear_params * bits_per_param / 8 + 2 * other_params


def alt_weight_bytes_parts(linear_params, other_params, bits, group_size):  # named parts summed
    if bits == 16:
        return 2 * (linear_params + other_params)
    n_groups = linear_params / group_size
    parts = {"codes": linear_params * bits / 8, "scales": 2 * n_groups, "zeros": n_groups * bits / 8,
             "embeddings + norms": 2 * other_params}
    return sum(parts.values())


def alt_weight_bytes_int(linear_params, other_params, bits, group_size):  # integer bytes: every case's counts are
    if bits == 16:  # whole numbers of bytes (and whole groups), so // is exact here
        return 2 * (linear_params + other_params)
    groups = linear_params // group_size
    return (linear_params * bits + groups * (16 + bits)) // 8 + 2 * other_params


def alt_decode_bound_tokens_over_seconds(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):
    bytes_per_step = weight_bytes + context * kv_bytes_per_token * batch  # tokens per step / seconds per step
    seconds_per_step = bytes_per_step / (bandwidth_GBps * 1e9)
    return batch / seconds_per_step


def alt_decode_bound_bytes_per_token(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):  # each
    per_token = weight_bytes / batch + context * kv_bytes_per_token  # token's share of the step's bytes
    return bandwidth_GBps * 1e9 / per_token


def alt_decode_bound_numpy(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):  # np.float64
    bandwidth = np.float64(bandwidth_GBps) * 10**9
    return batch * bandwidth / np.sum([weight_bytes, batch * context * kv_bytes_per_token])


def alt_latency_stats_diff_mean(t_request, token_times):  # mean of the intervals = (last - first) / (n - 1)
    times = np.asarray(token_times)
    itl = np.diff(times).mean()
    return times[0] - t_request, itl, 1 / itl  # numpy floats


def alt_latency_stats_list(t_request, token_times):  # a list, and decode tokens/s as intervals / decode span
    first, last, n = token_times[0], token_times[-1], len(token_times)
    return [first - t_request, (last - first) / (n - 1), (n - 1) / (last - first)]


def alt_latency_stats_numpy_floats(t_request, token_times):  # np.float64 throughout
    times = np.array(token_times, dtype=np.float64)
    ttft = times[0] - np.float64(t_request)
    itl = (times[-1] - times[0]) / (times.size - 1)
    return ttft, itl, np.reciprocal(itl)


def alt_latency_stats_loop(t_request, token_times):  # the decode span summed interval by interval
    span = 0.0
    for earlier, later in zip(token_times, token_times[1:]):
        span += later - earlier
    itl = span / (len(token_times) - 1)
    return token_times[0] - t_request, itl, 1 / itl


def alt_paged_kv_modulo(cache_bytes, kv_bytes_per_token, block_size):  # the bytes left over a whole block dropped
    block_bytes = kv_bytes_per_token * block_size
    return int((cache_bytes - cache_bytes % block_bytes) / block_bytes) * block_size


def alt_paged_kv_floor(cache_bytes, kv_bytes_per_token, block_size):  # math.floor of the exact ratio
    return math.floor(cache_bytes / kv_bytes_per_token / block_size) * block_size


def alt_paged_kv_loop(cache_bytes, kv_bytes_per_token, block_size):  # allocate block after block until full
    per_block, blocks = kv_bytes_per_token * block_size, 0
    blocks = int(cache_bytes // per_block)  # (a literal loop would take 2912 steps; the same count)
    return np.int64(blocks * block_size)  # a numpy integer is still a number


CORRECT_ALTERNATIVES = [
    (checks.check_paged_kv_tokens, PAGED_KV, alt_paged_kv_modulo),
    (checks.check_paged_kv_tokens, PAGED_KV, alt_paged_kv_floor),
    (checks.check_paged_kv_tokens, PAGED_KV, alt_paged_kv_loop),
    (checks.check_weight_bytes, WEIGHT_BYTES, alt_weight_bytes_numpy),
    (checks.check_weight_bytes, WEIGHT_BYTES, alt_weight_bytes_per_param),
    (checks.check_weight_bytes, WEIGHT_BYTES, alt_weight_bytes_parts),
    (checks.check_weight_bytes, WEIGHT_BYTES, alt_weight_bytes_int),
    (checks.check_decode_bound, DECODE_BOUND, alt_decode_bound_tokens_over_seconds),
    (checks.check_decode_bound, DECODE_BOUND, alt_decode_bound_bytes_per_token),
    (checks.check_decode_bound, DECODE_BOUND, alt_decode_bound_numpy),
    (checks.check_latency_stats, LATENCY_STATS, alt_latency_stats_diff_mean),
    (checks.check_latency_stats, LATENCY_STATS, alt_latency_stats_list),
    (checks.check_latency_stats, LATENCY_STATS, alt_latency_stats_numpy_floats),
    (checks.check_latency_stats, LATENCY_STATS, alt_latency_stats_loop),
]


# ----------------------------------------------------------------------------- not done


def _sample_calls():
    """checker -> (args of one sample call, an independent computation of what the reference must return)."""
    # 6400 Linear parameters at 4 bits in groups of 64, 1000 others: 3200 bytes of codes, 100 groups of a 2-byte
    # scale and a half-byte zero, 2 bytes for each other parameter
    nbytes = 6400 * 4 / 8 + 100 * (2 + 0.5) + 1000 * 2
    assert nbytes == 5450
    # 1 MB of weights, 1000 bytes of KV per token, 500 tokens of context, 4 sequences, 300 GB/s: a step reads
    # 1e6 + 4 * 500 * 1000 = 3e6 bytes in 1e-5 s and makes 4 tokens
    tokens_per_s = 4 / (3e6 / 300e9)
    assert tokens_per_s == pytest.approx(400_000)
    # requested at t = 1 s, four tokens: 0.4 s to the first, then 0.4 s for the 3 decode steps
    times = [1.4, 1.5, 1.7, 1.8]
    latency = (0.4, 0.4 / 3, 3 / 0.4)
    return {
        checks.check_weight_bytes: ((6400, 1000, 4, 64), nbytes),
        checks.check_decode_bound: ((1e6, 1000, 500, 4, 300.0), tokens_per_s),
        checks.check_latency_stats: ((1.0, times), latency),
        # 1000 bytes per token, blocks of 16 (16 000 bytes each): 100 000 bytes hold 6 whole blocks = 96 tokens
        checks.check_paged_kv_tokens: ((100_000, 1000, 16), 96),
    }


def test_not_done_references_work_the_way_the_lab_uses_them(capsys):
    """The lab calls weight_bytes with group 64 at 16, 8 and 4 bits (16 is plain fp16, the group ignored),
    decode_bound with the datasheet bandwidths (ints) and int batches, latency_stats on the streamer's list of
    time.perf_counter() stamps."""
    def todo(*args):
        raise NotImplementedError

    weight_bytes, decode_bound, latency_stats, paged_kv_tokens = (c(todo) for c in GOOD)
    assert paged_kv_tokens(2**30, 23040, 16) == 46592  # vLLM's log for 1 GiB of SmolLM2-135M bf16 cache
    capsys.readouterr()
    linear, other = checks.SMOLLM_LINEAR, checks.SMOLLM_OTHER
    assert weight_bytes(linear, other, 16, 64) == 2 * (linear + other)
    assert weight_bytes(linear, other, 8, 64) == linear + linear / 64 * 3 + 2 * other
    wb4 = weight_bytes(linear, other, 4, 64)
    assert wb4 == good_weight_bytes(linear, other, 4, 64) < weight_bytes(linear, other, 8, 64)
    h100 = deploy.GPUS["H100-SXM"]["bandwidth_GBps"]
    rates = [decode_bound(wb4, 23040, 4096, int(b), h100) for b in np.array([1, 4, 16])]
    assert rates == sorted(rates) and rates[0] == pytest.approx(h100 * 1e9 / (wb4 + 4096 * 23040))
    ttft, itl, tps = latency_stats(5.0, [5.3, 5.35, 5.4, 5.45, 5.5])
    assert (ttft, itl, tps) == pytest.approx((0.3, 0.05, 20.0))


# ----------------------------------------------------------------------------- failed


def _typo_weight_bytes(linear_params, other_params, bits, group_size):
    return math.prod(linear_params, bits) / 8 + 2 * other_params  # math.prod takes one iterable


def _typo_decode_bound(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):
    return batch * bandwidth_GBps * 1e9 / math.fsum(weight_bytes, batch * context * kv_bytes_per_token)


def _typo_latency_stats(t_request, token_times):
    itl = token_times.diff().mean()  # a list, not a tensor: AttributeError
    return token_times[0] - t_request, itl, 1 / itl


OTHER_EXCEPTIONS = [
    (checks.check_weight_bytes, _typo_weight_bytes, "raised TypeError", "math.prod(linear_params, bits)"),
    (checks.check_decode_bound, _typo_decode_bound, "raised TypeError", "math.fsum(weight_bytes,"),
    (checks.check_latency_stats, _typo_latency_stats, "raised AttributeError", "token_times.diff().mean()"),
]


def test_returning_none_is_a_failure(capsys):
    def forgot_return(linear_params, other_params, bits, group_size):
        good_weight_bytes(linear_params, other_params, bits, group_size)

    def forgot_return_latency(t_request, token_times):
        good_latency_stats(t_request, token_times)

    assert_failed(checks.check_weight_bytes, WEIGHT_BYTES, forgot_return, capsys, "expected a number, got NoneType")
    checks.STATUS.clear()
    assert_failed(checks.check_latency_stats, LATENCY_STATS, forgot_return_latency, capsys,
                  "expected a tuple of 3 numbers, got NoneType")


def test_two_codes_per_byte_is_right_at_4_bits_only():
    """Why wb_two_codes_per_byte passes the fp16 and 4-bit cases: bits / 8 = 0.5 exactly there; the 3-bit case tells."""
    linear, other = checks.SMOLLM_LINEAR, checks.SMOLLM_OTHER
    for bits, group_size in ((16, None), (4, 64)):
        assert wb_two_codes_per_byte(linear, other, bits, group_size) == good_weight_bytes(linear, other, bits,
                                                                                           group_size)
    assert wb_two_codes_per_byte(linear, other, 3, 64) - good_weight_bytes(linear, other, 3, 64) > 1e6


def test_batch_mistakes_need_a_batch_above_one():
    """Why three decode_bound mistakes pass the batch-1 cases: with batch 1, `x batch` and `batch x KV` change
    nothing; only the batch-16 case (and the batch-64 one after it) tells."""
    w4 = deploy.weight_bytes_at(checks.SMOLLM_LINEAR, checks.SMOLLM_OTHER, 4, 64)
    for wrong in (db_kv_once_per_step, db_per_sequence, db_weights_per_sequence):
        assert wrong(w4, 23040, 2048, 1, 3350.0) == good_decode_bound(w4, 23040, 2048, 1, 3350.0)
        assert not wrong(w4, 23040, 2048, 16, 2039.0) == pytest.approx(good_decode_bound(w4, 23040, 2048, 16, 2039.0),
                                                                       rel=1e-3)


def test_evenly_spaced_tokens_hide_the_interval_statistic():
    """Why ls_median_interval and ls_skip_first_interval pass the first two cases: the median interval and the
    intervals after the first equal the mean interval when tokens are evenly spaced; jittered times tell."""
    even = [0.02, 0.27, 0.52, 0.77, 1.02]
    jittered = [3.9, 4.0, 4.25, 4.3, 4.6, 4.62]
    for wrong in (ls_median_interval, ls_skip_first_interval):
        assert wrong(0.0, even) == pytest.approx(good_latency_stats(0.0, even))
        assert abs(wrong(3.0, jittered)[1] - good_latency_stats(3.0, jittered)[1]) > 0.01


# ----------------------------------------------------------------------------- inputs are not shared between calls


def mut_latency_stats(t_request, token_times):  # right, then empties the list it was given (a list is not cloned)
    out = good_latency_stats(t_request, token_times)
    token_times.clear()
    return out


def test_summary_of_the_lab06_exercises(capsys):
    checks.check_weight_bytes(good_weight_bytes)
    checks.check_decode_bound(db_no_kv_cache)

    def todo(t_request, token_times):
        raise NotImplementedError

    checks.check_latency_stats(todo)
    result, lines = summary_lines(capsys)
    assert result == {WEIGHT_BYTES: "passed", DECODE_BOUND: "failed", LATENCY_STATS: "not done"}
    assert len(lines) == 4 and lines[-1] == "1/3 exercises passed"


# ----------------------------------------------------------------------------- numbers in numpy / torch clothing


def wb_numpy_int(linear_params, other_params, bits, group_size):  # np.int64 for fp16: still a number
    p = np.array([linear_params, other_params])
    if bits == 16:
        return 2 * p.sum()
    return p[0] * bits / 8 + p[0] / group_size * (2 + bits / 8) + 2 * p[1]


def ls_as_array(t_request, token_times):  # one array of the three numbers unpacks like the tuple
    t = np.asarray(token_times)
    return np.array([t[0] - t_request, (t[-1] - t[0]) / (len(t) - 1), (len(t) - 1) / (t[-1] - t[0])])


def ls_as_tensor(t_request, token_times):
    return torch.tensor(ls_as_array(t_request, token_times), dtype=torch.float64)


@pytest.mark.parametrize("checker, name, fn", [(checks.check_weight_bytes, WEIGHT_BYTES, wb_numpy_int),
                                               (checks.check_latency_stats, LATENCY_STATS, ls_as_array),
                                               (checks.check_latency_stats, LATENCY_STATS, ls_as_tensor)],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_numpy_and_torch_numbers_are_accepted(checker, name, fn, capsys):
    assert_accepted(checker, name, fn, capsys)


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG = __file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG
    # the reference runs before the participant's function on each case, and each checker call builds its cases
    # afresh: emptying the token_times list after computing cannot corrupt a comparison or a later call
    MUTATING = [(checks.check_latency_stats, LATENCY_STATS, mut_latency_stats)]
    sample_calls = staticmethod(_sample_calls)

    def assert_sample(self, checker, got):
        args, expected = _sample_calls()[checker]
        _assert_same_numbers(got(*args), expected)

    @pytest.mark.parametrize("checker, fn, message, line", OTHER_EXCEPTIONS, ids=lambda v: getattr(v, "__name__", ""))
    def test_other_exceptions_are_failures_not_crashes(self, checker, fn, message, line, capsys):
        """Plain numbers and a list (the shared helper's x.amin typo needs a tensor): errors from plain Python,
        named, with the offending line shown."""
        out = assert_failed(checker, GOOD[checker][0], fn, capsys, message)
        assert line in out
