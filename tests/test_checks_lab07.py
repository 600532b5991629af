"""The lab 07 (deployment) checkers: the solution passes, a skipped exercise is "not done", and wrong answers fail.

Same structure as tests/test_checks_lab06.py. Every wrong implementation below was run against the checker's cases and
is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded: three checkers call plain-number functions (weight_bytes, decode_bound, paged_kv_tokens), and
exercise 3's timing code (time_decode) runs on simulated GPUs (checks.lab07.FakeDecode) with a simulated clock.
"""

import math
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from checker_testing import (CheckerSuite, assert_accepted, assert_failed, summary_lines)

from compresslab import checks
from compresslab import deploy
from compresslab.checks.lab07 import FakeDecode

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "07_deployment.py"

WEIGHT_BYTES = "Exercise 1 · weight_bytes"
DECODE_BOUND = "Exercise 2 · decode_bound"
TIME_DECODE = "Exercise 3 · time_decode"
PAGED_KV = "Exercise 4 · paged_kv_tokens"

# one torch thread for the module (the checkers import torch); every test starts and ends with an empty exercise table
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/07_deployment.py (### BEGIN / END SOLUTION);
# test_good_copies_match_the_lab_solutions keeps them in sync. Plain Python arithmetic; time_decode uses np (and
# time.perf_counter as its default clock), both imported by the lab's setup cell.


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


def good_time_decode(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    """Median TTFT, median inter-token latency and decode tokens/s over `runs` timed generations of n_tokens."""
    for _ in range(warmup):  # untimed, exactly like a timed run: compilation, autotuning, caches
        prefill()
        for _ in range(n_tokens - 1):
            step()
    ttfts, itls = [], []
    for _ in range(runs):
        sync()  # nothing still queued from before
        t0 = clock()
        prefill()
        sync()  # the clock sees the GPU's work only once it is done
        times = [clock()]  # when each token is ready, as a streaming server sends it
        for _ in range(n_tokens - 1):
            step()
            sync()
            times.append(clock())
        ttfts.append(times[0] - t0)
        itls.append((times[-1] - times[0]) / (n_tokens - 1))  # n tokens, n - 1 intervals
    itl = float(np.median(itls))  # the median: one slow run does not move it
    return float(np.median(ttfts)), itl, 1.0 / itl


def good_paged_kv_tokens(cache_bytes, kv_bytes_per_token, block_size):
    """Tokens a paged KV cache holds: whole blocks of block_size tokens."""
    blocks = cache_bytes // (kv_bytes_per_token * block_size)
    return int(blocks) * block_size


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_weight_bytes: (WEIGHT_BYTES, good_weight_bytes, "weight_bytes"),
    checks.check_decode_bound: (DECODE_BOUND, good_decode_bound, "decode_bound"),
    checks.check_time_decode: (TIME_DECODE, good_time_decode, "time_decode"),
    checks.check_paged_kv_tokens: (PAGED_KV, good_paged_kv_tokens, "paged_kv_tokens"),
}

SMOLLM_HIDDEN = 576  # SmolLM2-135M's hidden size: the in_features of most of its Linears


def _assert_same_numbers(result, expected, rel=1e-12) -> None:
    """A checker's reference output equals an independently computed one: a number, or a tuple of numbers, to 1e-12
    relative unless told (checker_testing.assert_same compares tensors and ints, not floats)."""
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    assert len(results) == len(expecteds)
    for r, e in zip(results, expecteds):
        assert isinstance(r, (int, float))
        assert r == pytest.approx(e, rel=rel, abs=1e-15)


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
# Each runs on checks.lab07.FakeDecode's simulated GPU: calls queue work that the clock sees only after sync(), the
# first runs are slow, runs differ by a few % and have hiccups. Two helpers keep each mistake to the lines it changes.


def _warm_up(prefill, step, n_tokens, warmup):  # the solution's warm-up: whole runs, untimed
    for _ in range(warmup):
        prefill()
        for _ in range(n_tokens - 1):
            step()


def _timed_run(prefill, step, n_tokens, clock, sync):  # the solution's timed run -> (ttft, itl)
    sync()
    t0 = clock()
    prefill()
    sync()
    t_first = clock()
    for _ in range(n_tokens - 1):
        step()
        sync()
    return t_first - t0, (clock() - t_first) / (n_tokens - 1)


def _medians(results):  # [(ttft, itl), ...] -> (median ttft, median itl, 1 / median itl)
    ttft, itl = (float(np.median(r)) for r in zip(*results))
    return ttft, itl, 1.0 / itl


def td_no_sync(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)  # sync never called: the clock times the launches, not the kernels
    return _medians([_timed_run(prefill, step, n_tokens, clock, lambda: None) for _ in range(runs)])


def td_clock_before_sync(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    ttfts, itls = [], []
    for _ in range(runs):
        t0 = clock()
        prefill()
        times = [clock()]  # read, then wait: the stamp is taken while the kernels are still queued
        sync()
        for _ in range(n_tokens - 1):
            step()
            times.append(clock())
            sync()
        ttfts.append(times[0] - t0)
        itls.append((times[-1] - times[0]) / (n_tokens - 1))
    itl = float(np.median(itls))
    return float(np.median(ttfts)), itl, 1.0 / itl


def td_no_warmup(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    return _medians([_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)])  # cold runs timed


def td_warmup_prefill_only(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    for _ in range(warmup):  # the decode step never warms up: its first calls land in the timed runs
        prefill()
    return _medians([_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)])


def td_warmup_in_median(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    results = [_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(warmup + runs)]  # the warm-up runs
    return _medians(results)  # timed and counted too


def td_mean(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    results = [_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)]
    ttft, itl = (statistics.mean(r) for r in zip(*results))  # one hiccup moves the mean
    return ttft, itl, 1.0 / itl


def td_min(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    results = [_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)]
    ttft, itl = (min(r) for r in zip(*results))  # best of the runs: the luckiest one, not the typical one
    return ttft, itl, 1.0 / itl


def td_one_run(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    ttft, itl = _timed_run(prefill, step, n_tokens, clock, sync)  # `runs` ignored: one run, whatever it met
    return ttft, itl, 1.0 / itl


def td_total_over_tokens(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    ttfts, itls = [], []
    for _ in range(runs):
        sync()
        t0 = clock()
        prefill()
        sync()
        ttfts.append(clock() - t0)
        for _ in range(n_tokens - 1):
            step()
        sync()
        itls.append((clock() - t0) / n_tokens)  # the whole generation / its tokens: the prefill counted as decode
    itl = float(np.median(itls))
    return float(np.median(ttfts)), itl, 1.0 / itl


def td_over_n(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    ttfts, itls = [], []
    for _ in range(runs):
        sync()
        t0 = clock()
        prefill()
        sync()
        t_first = clock()
        for _ in range(n_tokens - 1):
            step()
        sync()
        ttfts.append(t_first - t0)
        itls.append((clock() - t_first) / n_tokens)  # n_tokens - 1 intervals divided by n_tokens
    itl = float(np.median(itls))
    return float(np.median(ttfts)), itl, 1.0 / itl


def td_rate_over_total(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    results, totals = [], []
    for _ in range(runs):
        t0 = clock()
        results.append(_timed_run(prefill, step, n_tokens, clock, sync))
        totals.append(clock() - t0)
    ttft, itl, _ = _medians(results)
    return ttft, itl, n_tokens / float(np.median(totals))  # tokens / total time: the naive rate, prefill included


def td_no_sync_after_warmup(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter,
                            sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    ttfts, itls = [], []
    for _ in range(runs):
        t0 = clock()  # no sync() first: the warm-up's kernels are still queued and land in the first TTFT
        prefill()
        sync()
        times = [clock()]
        for _ in range(n_tokens - 1):
            step()
            sync()
            times.append(clock())
        ttfts.append(times[0] - t0)
        itls.append((times[-1] - times[0]) / (n_tokens - 1))
    itl = float(np.median(itls))
    return float(np.median(ttfts)), itl, 1.0 / itl


def td_n_steps(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    for _ in range(warmup):
        prefill()
        for _ in range(n_tokens):  # n_tokens steps after the prefill: n_tokens + 1 tokens (the simulated
            step()  # generation refuses, as a KV cache sized for the prompt + n_tokens would)
    return _medians([_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)])


GPU_CASE = "a GPU: prefill 40 ms, decode steps 8 ms"
SLOW_START = "slow start: each function's calls of the first 3 runs are slow"
NOISE = "noise and hiccups"
WRONG_TIME_DECODE = [
    (td_no_sync, GPU_CASE),
    (td_clock_before_sync, GPU_CASE),
    (td_total_over_tokens, GPU_CASE),
    (td_over_n, GPU_CASE),
    (td_rate_over_total, GPU_CASE),
    (td_n_steps, "step() called more than n_tokens - 1 = 7 times after one prefill()"),
    (td_no_warmup, SLOW_START),  # the GPU case's one cold run of three: the median hides it
    (td_warmup_prefill_only, SLOW_START),
    (td_warmup_in_median, SLOW_START),
    (td_mean, SLOW_START),  # its hiccup; the noise case would catch it too
    (td_min, NOISE),  # no noise before: every normal run took the same time
    (td_one_run, NOISE),  # its first timed run has the step hiccup
    (td_no_sync_after_warmup, "two tokens, one timed run, straight after the warm-up"),  # with several runs the
]  # median hides the first one's extra

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
WRONG += [(checks.check_time_decode, TIME_DECODE, fn, msg) for fn, msg in WRONG_TIME_DECODE]
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


def alt_statistics_median(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)  # statistics.median: the same middle run (runs is odd in every case)
    ttfts, itls = zip(*[_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)])
    itl = statistics.median(itls)
    return statistics.median(ttfts), itl, 1 / itl


def alt_torch_median(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)  # torch.median: 0-d tensors, and the lower middle (the middle here)
    results = torch.tensor([_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)],
                           dtype=torch.float64)  # (runs, 2)
    ttft, itl = results.median(dim=0).values  # (2,)
    return ttft, itl, 1 / itl


def alt_extra_syncs(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    for _ in range(warmup):  # sync() after every call and twice where once would do: waiting more costs nothing here
        prefill()
        sync()
        for _ in range(n_tokens - 1):
            step()
            sync()
    ttfts, itls = [], []
    for _ in range(runs):
        sync()
        sync()
        t0 = clock()
        sync()
        prefill()
        sync()
        sync()
        times = [clock()]
        for _ in range(n_tokens - 1):
            sync()
            step()
            sync()
            times.append(clock())
        ttfts.append(times[0] - t0)
        itls.append((times[-1] - times[0]) / (n_tokens - 1))
    itl = statistics.median(itls)
    return statistics.median(ttfts), itl, 1 / itl


def alt_whole_loop(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)
    ttfts, itls = [], []
    for _ in range(runs):
        sync()
        t0 = clock()
        prefill()
        sync()
        t_first = clock()
        for _ in range(n_tokens - 1):  # the decode loop timed as a whole: the steps queue back to back, one sync
            step()  # at the end (within the checker's 1e-3: the simulated launches take 1 us)
        sync()
        ttfts.append(t_first - t0)
        itls.append((clock() - t_first) / (n_tokens - 1))
    itl = statistics.median(itls)
    return statistics.median(ttfts), itl, 1 / itl


def alt_median_of_rates(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup)  # tokens/s as the median of each run's rate: 1 / the median ITL when
    ttfts, itls = zip(*[_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)])  # runs is odd
    middle = runs // 2
    return sorted(ttfts)[middle], sorted(itls)[middle], sorted(1 / i for i in itls)[middle]


def alt_extra_warmup(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    _warm_up(prefill, step, n_tokens, warmup + 1)  # one warm-up run more than asked, "to be safe"
    return _medians([_timed_run(prefill, step, n_tokens, clock, sync) for _ in range(runs)])


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
    (checks.check_time_decode, TIME_DECODE, alt_statistics_median),
    (checks.check_time_decode, TIME_DECODE, alt_torch_median),
    (checks.check_time_decode, TIME_DECODE, alt_extra_syncs),
    (checks.check_time_decode, TIME_DECODE, alt_whole_loop),
    (checks.check_time_decode, TIME_DECODE, alt_median_of_rates),
    (checks.check_time_decode, TIME_DECODE, alt_extra_warmup),
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
    # a simulated GPU (its launches take no host time): prefill 50 ms, decode steps 10 ms, so TTFT 0.05 s, ITL 0.01 s,
    # 100 tokens/s; the first run (the warm-up) is slow and not counted
    gpu = FakeDecode(n_tokens=4, warmup=1, runs=3, prefill_s=0.05, step_s=0.01, launch_s=0.0)
    return {
        checks.check_weight_bytes: ((6400, 1000, 4, 64), nbytes),
        checks.check_decode_bound: ((1e6, 1000, 500, 4, 300.0), tokens_per_s),
        checks.check_time_decode: ((gpu,), (0.05, 0.01, 100.0)),
        # 1000 bytes per token, blocks of 16 (16 000 bytes each): 100 000 bytes hold 6 whole blocks = 96 tokens
        checks.check_paged_kv_tokens: ((100_000, 1000, 16), 96),
    }


def _sample(checker, fn, args):
    """Call what a checker handed back on its sample arguments (time_decode runs on the sample's simulated GPU)."""
    return args[0].run(fn) if checker is checks.check_time_decode else fn(*args)


def test_not_done_references_work_the_way_the_lab_uses_them(capsys):
    """The lab calls weight_bytes with group 64 at 16, 8 and 4 bits (16 is plain fp16, the group ignored),
    decode_bound with the datasheet bandwidths (ints) and int batches, time_decode on the model's own prefill and
    step closures with the default clock (time.perf_counter) and, on a CPU, a sync that does nothing."""
    def todo(*args, **kwargs):
        raise NotImplementedError

    weight_bytes, decode_bound, time_decode, paged_kv_tokens = (c(todo) for c in GOOD)
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
    calls = []
    ttft, itl, tps = time_decode(lambda: calls.append("prefill") or time.sleep(0.02),
                                 lambda: calls.append("step") or time.sleep(0.005), 4, warmup=1, runs=3,
                                 sync=lambda: None)
    assert calls == (["prefill"] + ["step"] * 3) * 4  # one warm-up run and three timed ones, 4 tokens each
    assert 0.02 <= ttft < 0.5 and 0.005 <= itl < 0.1 and tps == pytest.approx(1 / itl)
    assert ttft > itl  # the prefill is not a decode step


# ----------------------------------------------------------------------------- failed


def _typo_weight_bytes(linear_params, other_params, bits, group_size):
    return math.prod(linear_params, bits) / 8 + 2 * other_params  # math.prod takes one iterable


def _typo_decode_bound(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps):
    return batch * bandwidth_GBps * 1e9 / math.fsum(weight_bytes, batch * context * kv_bytes_per_token)


def _typo_time_decode(prefill, step, n_tokens, *, warmup=1, runs=5, clock=time.perf_counter, sync=lambda: None):
    ttfts = []
    for _ in range(runs):
        t0 = clock  # the function, not its value: TypeError at the subtraction
        prefill()
        sync()
        ttfts.append(clock() - t0)
    return statistics.median(ttfts), 0.0, 0.0


OTHER_EXCEPTIONS = [
    (checks.check_weight_bytes, _typo_weight_bytes, "raised TypeError", "math.prod(linear_params, bits)"),
    (checks.check_decode_bound, _typo_decode_bound, "raised TypeError", "math.fsum(weight_bytes,"),
    (checks.check_time_decode, _typo_time_decode, "raised TypeError", "ttfts.append(clock() - t0)"),
]


def test_returning_none_is_a_failure(capsys):
    def forgot_return(linear_params, other_params, bits, group_size):
        good_weight_bytes(linear_params, other_params, bits, group_size)

    def forgot_return_timing(prefill, step, n_tokens, **kwargs):
        good_time_decode(prefill, step, n_tokens, **kwargs)

    assert_failed(checks.check_weight_bytes, WEIGHT_BYTES, forgot_return, capsys, "expected a number, got NoneType")
    checks.STATUS.clear()
    assert_failed(checks.check_time_decode, TIME_DECODE, forgot_return_timing, capsys,
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


def test_the_simulated_gpu_shows_queued_work_only_after_sync():
    """FakeDecode: a call moves the clock by its launch time; sync() waits for the queue; the first runs are cold."""
    from compresslab.checks.lab07 import _FakeGPU

    gpu = _FakeGPU(FakeDecode(n_tokens=3, warmup=1, runs=1, prefill_s=0.05, step_s=0.01, launch_s=1e-6))
    t0 = gpu.clock()
    gpu.prefill()
    assert gpu.clock() - t0 == pytest.approx(1e-6)  # launched, not done
    gpu.step()
    gpu.step()
    assert gpu.clock() - t0 == pytest.approx(3e-6)
    gpu.sync()  # the cold first run: compilation on top of the work, steps queued behind the prefill
    assert gpu.clock() - t0 == pytest.approx(1e-6 + 0.05 + 1.5 + 2 * (0.01 + 0.2))
    with pytest.raises(RuntimeError, match="n_tokens - 1 = 2 times"):
        gpu.step()
    t1 = gpu.clock()
    gpu.prefill()
    gpu.sync()
    assert gpu.clock() - t1 == pytest.approx(1e-6 + 0.05)  # warm now
    with pytest.raises(RuntimeError, match="before any prefill"):
        _FakeGPU(FakeDecode(n_tokens=3, warmup=1, runs=1, prefill_s=0.05, step_s=0.01)).step()


def test_the_median_hides_a_single_cold_run():
    """Why td_no_warmup passes the GPU case (warmup=1, runs=3) and the slow-start case needs 3 cold runs of 5: the
    median of three runs ignores one cold run; three cold runs of five are the median's majority."""
    gpu_case = FakeDecode(n_tokens=8, warmup=1, runs=3, prefill_s=0.040, step_s=0.008)
    assert gpu_case.run(td_no_warmup) == pytest.approx(gpu_case.run(deploy.time_decode), rel=1e-9)
    slow_start = FakeDecode(n_tokens=5, warmup=3, runs=5, prefill_s=0.025, step_s=0.005, cold_runs=3)
    assert slow_start.run(td_no_warmup)[1] > 10 * slow_start.run(deploy.time_decode)[1]


def test_one_sync_for_the_whole_decode_loop_is_within_the_tolerance():
    """alt_whole_loop lets the steps queue back to back: each launch (1 us) overlaps the previous step's work, so its
    ITL is a little below the per-token sync's — far inside the checker's rtol 1e-3, far outside a real mistake's."""
    spec = FakeDecode(n_tokens=8, warmup=1, runs=3, prefill_s=0.040, step_s=0.008)
    ref, loop = spec.run(deploy.time_decode), spec.run(alt_whole_loop)
    assert 0 < ref[1] - loop[1] < 1e-3 * ref[1]
    assert loop[1] == pytest.approx(0.008 + 1e-6 / 7)  # one launch, then 7 steps back to back


def test_noise_in_every_window_of_runs_keeps_the_median():
    """The noise case's five noise values repeat every five generations: any five consecutive timed runs see all of
    them, so one more warm-up run (alt_extra_warmup) times the same median run."""
    noisy = FakeDecode(n_tokens=6, warmup=1, runs=5, prefill_s=0.030, step_s=0.010,
                       noise=(0.0, 0.02, -0.01, 0.03, -0.02))
    ttft, itl, _ = noisy.run(deploy.time_decode)
    assert ttft == pytest.approx(0.030 + 1e-6) and itl == pytest.approx(0.010 + 1e-6)
    assert noisy.run(alt_extra_warmup) == pytest.approx((ttft, itl, 1 / itl), rel=1e-9)
    assert noisy.run(td_min)[1] == pytest.approx(0.010 * 0.98 + 1e-6)


# ----------------------------------------------------------------------------- inputs are not shared between calls


def mut_time_decode(prefill, step, n_tokens, **kwargs):  # right, then starts another generation on the GPU it was
    out = good_time_decode(prefill, step, n_tokens, **kwargs)  # given (each check builds its simulated GPUs afresh)
    prefill()
    step()
    return out


def test_summary_of_the_lab07_exercises(capsys):
    checks.check_weight_bytes(good_weight_bytes)
    checks.check_decode_bound(db_no_kv_cache)

    def todo(prefill, step, n_tokens, **kwargs):
        raise NotImplementedError

    checks.check_time_decode(todo)
    result, lines = summary_lines(capsys)
    assert result == {WEIGHT_BYTES: "passed", DECODE_BOUND: "failed", TIME_DECODE: "not done"}
    assert len(lines) == 4 and lines[-1] == "1/3 exercises passed"


# ----------------------------------------------------------------------------- numbers in numpy / torch clothing


def wb_numpy_int(linear_params, other_params, bits, group_size):  # np.int64 for fp16: still a number
    p = np.array([linear_params, other_params])
    if bits == 16:
        return 2 * p.sum()
    return p[0] * bits / 8 + p[0] / group_size * (2 + bits / 8) + 2 * p[1]


def td_as_array(prefill, step, n_tokens, **kwargs):  # one array of the three numbers unpacks like the tuple
    return np.array(good_time_decode(prefill, step, n_tokens, **kwargs))


def td_as_tensor(prefill, step, n_tokens, **kwargs):
    return torch.tensor(good_time_decode(prefill, step, n_tokens, **kwargs), dtype=torch.float64)


@pytest.mark.parametrize("checker, name, fn", [(checks.check_weight_bytes, WEIGHT_BYTES, wb_numpy_int),
                                               (checks.check_time_decode, TIME_DECODE, td_as_array),
                                               (checks.check_time_decode, TIME_DECODE, td_as_tensor)],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_numpy_and_torch_numbers_are_accepted(checker, name, fn, capsys):
    assert_accepted(checker, name, fn, capsys)


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG = __file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG
    # the reference and the participant's function each get a fresh simulated GPU on every case: a generation left
    # running afterwards cannot corrupt a comparison or a later call
    MUTATING = [(checks.check_time_decode, TIME_DECODE, mut_time_decode)]
    NAMESPACE = {"np": np, "time": time}  # the lab's imports time_decode uses
    sample_calls = staticmethod(_sample_calls)

    def assert_sample(self, checker, got):
        args, expected = _sample_calls()[checker]
        # the simulated clock starts at 1000 s: differences of it are exact to ~1e-13 s, 1e-11 of a 10 ms step
        _assert_same_numbers(_sample(checker, got, args), expected,
                             rel=1e-9 if checker is checks.check_time_decode else 1e-12)

    def test_not_implemented_is_not_done(self, checker, capsys):
        """The suite's test (checker_testing.assert_not_done), with a stub that also takes time_decode's keyword-only
        arguments (warmup=, runs=, clock=, sync=), as the lab's stub does: "not done", and the reference works."""
        def todo(*args, **kwargs):
            raise NotImplementedError("fill me in")

        got = checker(todo)
        assert got is not todo
        assert checks.STATUS == {GOOD[checker][0]: "not done"}
        out = capsys.readouterr().out
        assert "NOT DONE" in out and "FAILED" not in out
        self.assert_sample(checker, got)

    @pytest.mark.parametrize("checker, fn, message, line", OTHER_EXCEPTIONS, ids=lambda v: getattr(v, "__name__", ""))
    def test_other_exceptions_are_failures_not_crashes(self, checker, fn, message, line, capsys):
        """Plain numbers and callables (the shared helper's x.amin typo needs a tensor): errors from plain Python,
        named, with the offending line shown."""
        out = assert_failed(checker, GOOD[checker][0], fn, capsys, message)
        assert line in out


def test_the_reference_refuses_counts_it_cannot_time():
    """deploy.time_decode: two tokens at least (the first is the prefill's), one timed run at least, no negative
    warm-up."""
    noop = lambda: None  # noqa: E731
    for kwargs, message in (({"n_tokens": 1}, "n_tokens must be an int >= 2"),
                            ({"n_tokens": 4, "runs": 0}, "runs must be an int >= 1"),
                            ({"n_tokens": 4, "warmup": -1}, "warmup must be an int >= 0")):
        with pytest.raises(ValueError, match=message):
            deploy.time_decode(noop, noop, **kwargs)
