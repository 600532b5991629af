"""Lab 07 · deployment: the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab07.py holds the wrong implementations each
checker must reject and the harmless variants it must accept. Exercise 3 (timing code) runs on simulated GPUs
(FakeDecode): a clock that sees queued work only after sync(), slow first runs, noise and hiccups, all deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import deploy
from . import Case, run_check


SMOLLM_LINEAR, SMOLLM_OTHER = 106_168_320, 28_346_688  # SmolLM2-135M: decoder Linears / embeddings + norms


def check_weight_bytes(fn: Callable) -> Callable:
    """Exercise: fn(linear_params, other_params, bits, group_size) -> bytes of the weights one decode step reads."""
    cases = [Case("fp16 (bits=16): 2 bytes per parameter, no scales", (SMOLLM_LINEAR, SMOLLM_OTHER, 16, None)),
             Case("4-bit g64: codes + per group an fp16 scale and a 4-bit zero; embeddings stay fp16",
                  (SMOLLM_LINEAR, SMOLLM_OTHER, 4, 64)),
             Case("3-bit g64: bits / 8 is not a whole number of bytes", (SMOLLM_LINEAR, SMOLLM_OTHER, 3, 64)),
             Case("2-bit g32: smaller groups cost more scales", (SMOLLM_LINEAR, SMOLLM_OTHER, 2, 32)),
             Case("8-bit g128, a 1B-class model", (1_000_000_000, 260_000_000, 8, 128))]
    return run_check("Exercise 1 · weight_bytes", fn, deploy.weight_bytes_at, cases, atol=0.5, rtol=1e-9,
                     hint="Linears: linear_params * bits / 8 (use /, not //), plus linear_params / group_size groups "
                          "of (2 bytes fp16 scale + bits / 8 for the zero point); other_params stay 2 bytes each; "
                          "bits == 16 is plain fp16 with no scales.",
                     more="worked for 4-bit g64 on SmolLM2-135M: codes 106 168 320 * 4 / 8 = 53 084 160 bytes; "
                          "106 168 320 / 64 = 1 658 880 groups * (2 + 0.5) bytes = 4 147 200; others 28 346 688 * 2 = "
                          "56 693 376; total 113 924 736. At 3 bits a code is 3 / 8 = 0.375 bytes, not 0.")


def check_decode_bound(fn: Callable) -> Callable:
    """Exercise: fn(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps) -> tokens/s upper bound."""
    w16 = deploy.weight_bytes_at(SMOLLM_LINEAR, SMOLLM_OTHER, 16)
    w4 = deploy.weight_bytes_at(SMOLLM_LINEAR, SMOLLM_OTHER, 4, 64)
    cases = [Case("empty cache (context 0), batch 1, H100: weights only", (w16, 23040, 0, 1, 3350.0)),
             Case("batch 1 at 2048 tokens of context: the KV cache is read too", (w4, 23040, 2048, 1, 3350.0)),
             Case("batch 16: weights read once for all sequences, KV once per sequence", (w4, 23040, 2048, 16, 2039.0)),
             Case("T4 at 8k context, batch 64: the KV cache dominates", (w16, 23040, 8192, 64, 320.0)),
             Case("bandwidth in GB/s means 1e9 bytes per second", (1e9, 0.0, 0, 1, 1.0))]
    return run_check("Exercise 2 · decode_bound", fn, deploy.decode_bound, cases, atol=0, rtol=1e-9,
                     hint="bytes per step = weight_bytes + batch * context * kv_bytes_per_token; a step produces "
                          "`batch` tokens; tokens/s = batch * bandwidth_GBps * 1e9 / bytes per step.",
                     more="worked for the batch-16 case: 113 924 736 bytes of 4-bit weights (read once) + 16 * 2048 "
                          "* 23 040 bytes of KV (each sequence its own) = 868 899 456 bytes per step; 16 tokens per "
                          "step at 2039e9 bytes/s -> 16 * 2039e9 / 868 899 456 = 37 546 tokens/s.")


# ----------------------------------------------------------------------------- exercise 3: a simulated GPU


@dataclass(frozen=True)
class FakeDecode:
    """A generation on a simulated GPU, for checking timing code on a CPU with a simulated clock (seconds).

    Like CUDA, prefill() and step() only *queue* their work: the host clock moves by launch_s per call, the device
    works through the queue on its own, and the clock sees the work done only after sync() waits for it. The first
    `cold_runs` runs' calls are slower by cold_prefill_s / cold_step_s (compilation, autotuning, caches): each
    function's first cold_runs calls (prefill) or cold_runs * (n_tokens - 1) calls (step). `noise` scales each
    generation's work a little; with as many values as timed runs, any `runs` consecutive generations see all of them,
    so one more or one less warm-up run changes no median. Hiccups add seconds to one generation's prefill or step,
    counting generations over all of them, warm-up ones included (1-based)."""

    n_tokens: int
    warmup: int
    runs: int
    prefill_s: float  # device time of the prefill: the prompt in, the first token out
    step_s: float  # device time of one decode step
    launch_s: float = 1e-6  # host time to queue one call's kernels: all a clock read without sync() sees
    cold_runs: int = 1
    cold_prefill_s: float = 1.5
    cold_step_s: float = 0.2
    noise: tuple = ()  # run-to-run noise: generation g's work x (1 + noise[(g - 1) % len(noise)])
    prefill_hiccups: tuple = ()  # ((generation, extra seconds), ...)
    step_hiccups: tuple = ()  # ((generation, step 1 .. n_tokens - 1, extra seconds), ...)

    def run(self, fn: Callable):
        """fn(prefill, step, n_tokens, warmup=, runs=, clock=, sync=) on a fresh simulated GPU."""
        gpu = _FakeGPU(self)
        return fn(gpu.prefill, gpu.step, self.n_tokens, warmup=self.warmup, runs=self.runs, clock=gpu.clock,
                  sync=gpu.sync)


class _FakeGPU:
    def __init__(self, spec: FakeDecode):
        self.spec = spec
        self.host = 1000.0  # what clock() reads (perf_counter's zero is arbitrary too)
        self.device_done = self.host  # when the device finishes the work queued so far
        self.prefills = self.steps = 0  # calls so far
        self.steps_left = None  # decode steps the current generation may still make

    def clock(self) -> float:
        return self.host

    def sync(self) -> None:
        self.host = max(self.host, self.device_done)

    def _queue(self, seconds: float) -> None:
        noise = self.spec.noise[(self.prefills - 1) % len(self.spec.noise)] if self.spec.noise else 0.0
        self.host += self.spec.launch_s
        self.device_done = max(self.device_done, self.host) + seconds * (1 + noise)

    def prefill(self) -> None:
        s = self.spec
        self.prefills += 1
        self.steps_left = s.n_tokens - 1
        extra = s.cold_prefill_s if self.prefills <= s.cold_runs else 0.0
        extra += sum(x for gen, x in s.prefill_hiccups if gen == self.prefills)
        self._queue(s.prefill_s + extra)

    def step(self) -> None:
        s = self.spec
        if self.steps_left is None:
            raise RuntimeError("step() before any prefill(): a generation starts with prefill()")
        if self.steps_left == 0:
            raise RuntimeError(f"step() called more than n_tokens - 1 = {s.n_tokens - 1} times after one prefill(): "
                               f"a run of n_tokens = {s.n_tokens} tokens is prefill() (the first token) and "
                               "n_tokens - 1 step()s")
        self.steps_left -= 1
        self.steps += 1
        index = s.n_tokens - 1 - self.steps_left  # 1 .. n_tokens - 1 within this generation
        extra = s.cold_step_s if self.steps <= s.cold_runs * (s.n_tokens - 1) else 0.0
        extra += sum(x for gen, i, x in s.step_hiccups if gen == self.prefills and i == index)
        self._queue(s.step_s + extra)


def check_time_decode(fn: Callable) -> Callable:
    """Exercise: fn(prefill, step, n_tokens, *, warmup, runs, clock, sync) -> (median TTFT, median inter-token
    latency, decode tokens/s), run on simulated GPUs (FakeDecode) against deploy.time_decode."""
    cases = [Case("a GPU: prefill 40 ms, decode steps 8 ms; calls only queue work, the clock sees it after sync()",
                  (FakeDecode(n_tokens=8, warmup=1, runs=3, prefill_s=0.040, step_s=0.008),)),
             Case("slow start: each function's calls of the first 3 runs are slow (compilation, autotuning), "
                  "warmup=3; a hiccup in one timed run",
                  (FakeDecode(n_tokens=5, warmup=3, runs=5, prefill_s=0.025, step_s=0.005, cold_runs=3,
                              step_hiccups=((6, 2, 0.2),)),)),
             Case("noise and hiccups: runs differ by a few %, one timed run's prefill takes 0.5 s longer, "
                  "another's 3rd step 0.3 s longer (runs=5)",
                  (FakeDecode(n_tokens=6, warmup=1, runs=5, prefill_s=0.030, step_s=0.010,
                              noise=(0.0, 0.02, -0.01, 0.03, -0.02), prefill_hiccups=((4, 0.5),),
                              step_hiccups=((2, 3, 0.3),)),)),
             Case("two tokens, one timed run, straight after the warm-up (is its work still queued when the clock "
                  "starts?)",
                  (FakeDecode(n_tokens=2, warmup=1, runs=1, prefill_s=0.060, step_s=0.012),))]

    def got(spec):
        return spec.run(fn)

    def expected(spec):
        return spec.run(deploy.time_decode)

    got.__name__ = getattr(fn, "__name__", "fn")
    expected.__module__, expected.__name__ = deploy.time_decode.__module__, deploy.time_decode.__name__
    chosen = run_check(
        "Exercise 3 · time_decode", got, expected, cases, atol=0, rtol=1e-3,
        hint="prefill() and step() only queue work: the clock shows it after sync(), so sync() before every "
             "clock() read. Untimed warm-up first (`warmup` whole runs: prefill + the steps); TTFT = start -> first "
             "token (the prefill only); ITL = the decode span over its n_tokens - 1 intervals; the median of each "
             "over the `runs` runs, not the mean; tokens/s = 1 / ITL. The case label names the trap.",
        more="for each of `warmup` runs: prefill(), then n_tokens - 1 step()s. Then for each of `runs` runs: "
             "sync(); t0 = clock(); prefill(); sync(); t1 = clock(); n_tokens - 1 times step(); sync(); "
             "t2 = clock(); keep t1 - t0 and (t2 - t1) / (n_tokens - 1). Return (median of the first, median of the "
             "second m, 1 / m), e.g. statistics.median.")
    return fn if chosen is got else deploy.time_decode


def check_paged_kv_tokens(fn: Callable) -> Callable:
    """Exercise: fn(cache_bytes, kv_bytes_per_token, block_size) -> tokens a paged KV cache holds."""
    cases = [Case("1 GiB, SmolLM2-135M in bf16 (23 040 bytes per token), blocks of 16", (2**30, 23040, 16)),
             Case("4 GiB, an 8B model with 8 KV heads (131 072 bytes per token), blocks of 16", (4 * 2**30, 131072, 16)),
             Case("a cache that ends in the middle of a block: only whole blocks count", (10 * 23040 * 16 + 5, 23040, 16)),
             Case("blocks of 32", (2**30, 23040, 32)),
             Case("less than one block", (23040 * 15, 23040, 16))]
    return run_check("Exercise 4 · paged_kv_tokens", fn, deploy.paged_kv_tokens, cases, atol=0,
                     hint="whole blocks only: blocks = cache_bytes // (kv_bytes_per_token * block_size), then tokens = "
                          "blocks * block_size. cache_bytes is in bytes (1 GiB = 2**30, not 1e9).",
                     more="worked: a block of 16 tokens is 16 * 23 040 = 368 640 bytes; 2**30 = 1 073 741 824 bytes "
                          "hold 2912.7 of them, of which 2912 whole ones (floor, never round up) = 46 592 tokens.")
