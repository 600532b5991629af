"""Lab 07 · deployment: the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab07.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

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
                          "bits == 16 is plain fp16 with no scales.")


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
                          "`batch` tokens; tokens/s = batch * bandwidth_GBps * 1e9 / bytes per step.")


def check_paged_kv_tokens(fn: Callable) -> Callable:
    """Exercise: fn(cache_bytes, kv_bytes_per_token, block_size) -> tokens a paged KV cache holds."""
    cases = [Case("1 GiB, SmolLM2-135M in bf16 (23 040 bytes per token), blocks of 16", (2**30, 23040, 16)),
             Case("4 GiB, an 8B model with 8 KV heads (131 072 bytes per token), blocks of 16", (4 * 2**30, 131072, 16)),
             Case("a cache that ends in the middle of a block: only whole blocks count", (10 * 23040 * 16 + 5, 23040, 16)),
             Case("blocks of 32", (2**30, 23040, 32)),
             Case("less than one block", (23040 * 15, 23040, 16))]
    return run_check("Exercise 4 · paged_kv_tokens", fn, deploy.paged_kv_tokens, cases, atol=0,
                     hint="whole blocks only: blocks = cache_bytes // (kv_bytes_per_token * block_size), then tokens = "
                          "blocks * block_size. cache_bytes is in bytes (1 GiB = 2**30, not 1e9).")


def check_latency_stats(fn: Callable) -> Callable:
    """Exercise: fn(t_request, token_times) -> (ttft_s, inter_token_s, decode_tokens_per_s)."""
    cases = [Case("prefill 0.5 s, then a token every 0.1 s", (10.0, [10.5 + 0.1 * i for i in range(8)])),
             Case("fast prefill, slow decode (the first token is not a decode step)",
                  (0.0, [0.02, 0.27, 0.52, 0.77, 1.02])),
             Case("jittered token times: average over the whole decode span", (3.0, [3.9, 4.0, 4.25, 4.3, 4.6, 4.62])),
             Case("two tokens: one decode interval", (100.0, [100.25, 100.3]))]
    return run_check("Exercise 3 · latency_stats", fn, deploy.latency_stats, cases, atol=1e-9, rtol=1e-9,
                    hint="TTFT = token_times[0] - t_request (prefill + first token); inter-token latency = "
                         "(last - first) / (n - 1) over the n - 1 decode steps; decode tokens/s = 1 / that. Seconds.")
