"""Lab 08 · low rank and the capstone: the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab08.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping
from typing import Callable

import torch

from .. import lowrank, stack
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


def _check_factors(name: str, fn: Callable, reference: Callable, cases: list[Case], hint: str, more: str) -> Callable:
    """Check factor pairs by their product (how S is split between A and B is the participant's choice)."""
    def dims(W, rank):
        return W.shape[0], W.shape[1], rank

    def got(*args):
        return _factors_product(fn(*args), *dims(args[0], args[-1]))

    def expected(*args):
        return _factors_product(reference(*args), *dims(args[0], args[-1]))

    expected.__module__, expected.__name__ = reference.__module__, reference.__name__
    chosen = run_check(name, got, expected, cases, hint=hint, atol=1e-4, rtol=1e-4, more=more)
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
                          hint="A @ B must be U_r S_r Vh_r: the `rank` LARGEST singular values with their vectors "
                               "(torch.linalg.svd sorts S largest first; eigh sorts ascending), S counted once (not "
                               "dropped, not in both factors), A (d_out, rank) and B (rank, d_in).",
                          more="U, S, Vh = torch.linalg.svd(W, full_matrices=False); root = S[:rank].sqrt(); return "
                               "U[:, :rank] * root, root[:, None] * Vh[:rank]  (or U[:, :rank] * S[:rank] and "
                               "Vh[:rank]: how S is split does not matter).")


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
                          "integer r with r * (d_out + d_in) < d_out * d_in (strictly: equal saves nothing).",
                     more="the bound t = d_out * d_in / (d_out + d_in) itself is excluded, so the answer is ceil(t) - "
                          "1 (at an exact division that is t - 1, elsewhere floor(t)); in integers only: "
                          "(d_out * d_in - 1) // (d_out + d_in). Return an int.")
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
                          hint="ASVD truncates W diag(scale) (column j times scale[j]: one scale per INPUT channel), "
                               "then undoes that scaling on the input side, so that A @ B approximates W itself, not "
                               "W diag(scale).",
                          more="A, B = truncated_svd(W * scale, rank); return A, B / scale  (scale (d_in,) broadcasts "
                               "over the columns of W and of B).")


# ----------------------------------------------------------------------------- exercise 4: choose a recipe


def _recipe_row(method: str, weight_bytes: float, kv_bytes_per_token: float, ppl: float, probe_acc: float) -> dict:
    """A capstone row as the lab builds it: the byte columns the exercise reads, the MB columns the table shows."""
    return dict(method=method, weight_mb=weight_bytes / 1e6, kv_mb=kv_bytes_per_token * 4096 / 1e6, ppl=ppl,
                probe_acc=probe_acc, weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes_per_token)


# SmolLM2-135M's capstone in full mode (README): weights as deployed, KV per token of one sequence (fp16: 30 layers x
# 3 KV heads x 64 x K and V x 2 bytes = 23 040; KIVI-4 keeps 0.281 of it; the 20-layer student 20/30)
RECIPE_ROWS = [_recipe_row("dense", 269_030_016, 23040, 16.76, 0.29),
               _recipe_row("GPTQ 4-bit", 113_924_736, 23040, 19.15, 0.06),
               _recipe_row("GPTQ 4-bit + KIVI-4 KV", 113_924_736, 6480, 19.35, 0.05),
               _recipe_row("GPTQ 4-bit + rank-32 fix", 133_462_656, 23040, 17.72, 0.20),
               _recipe_row("GPTQ 3-bit", 100_446_336, 23040, 36.74, 0.0),
               _recipe_row("student 20L + KD + GPTQ 4-bit", 94_824_576, 15360, 54.31, 0.01)]
# a perplexity tie, as in a table rounded to two decimals: an 8-bit cache that costs nothing measurable, listed after
# the fp16-cache row it ties with
TIED_ROWS = [RECIPE_ROWS[0], RECIPE_ROWS[1], _recipe_row("GPTQ 4-bit + KIVI-8 KV", 113_924_736, 12240, 19.15, 0.06),
             RECIPE_ROWS[5]]


class _Choice(int):
    """The index of the row a choose_recipe call picked (-1: None), shown as the recipe and what it needs."""

    def __new__(cls, index: int, text: str):
        choice = super().__new__(cls, index)
        choice.text = text
        return choice

    def __repr__(self) -> str:
        return self.text


def _recipe_choice(out, rows: list[dict], context: int, batch: int) -> _Choice:
    """What choose_recipe returned (a row, a copy of one, or None; its method name is accepted too, the lab prints
    either) as a _Choice; raises on any other form, with the contract."""
    if out is None:
        return _Choice(-1, "None (nothing fits)")
    if isinstance(out, str):
        method = out
    elif isinstance(out, Mapping) or hasattr(out, "keys"):  # a dict, a copy of one, or a pandas row of them
        if "method" not in out.keys():
            raise ValueError(f"the returned row has no 'method' (keys: {list(out.keys())}): return one of `rows`")
        method = out["method"]
    else:
        index = " (an index? return rows[i])" if isinstance(out, int) and not isinstance(out, bool) else ""
        raise TypeError(f"return the chosen row (one of `rows`, a dict), or None when nothing fits; got "
                        f"{type(out).__name__} {out!r}{index}")
    index = next((i for i, r in enumerate(rows) if r["method"] == method), None)
    if index is None:
        raise ValueError(f"returned {method!r}, which is none of the rows' methods")
    r = rows[index]
    return _Choice(index, f"{method!r} (needs {stack.deployment_bytes(r, context, batch) / 1e6:.1f} MB, perplexity "
                          f"{r['ppl']:.2f})")


def check_choose_recipe(fn: Callable) -> Callable:
    """Exercise: fn(rows, budget_bytes, *, context, batch) -> the row with the best perplexity among those whose
    weight_bytes + kv_bytes_per_token * context * batch <= budget_bytes (fewer bytes on a tie), or None."""
    rows = RECIPE_ROWS
    cases = [Case("512 MB, one chat of 4096 tokens: dense (269 MB + 94 MB of fp16 cache) fits and is the best",
                  (rows, 512e6, 4096, 1)),
             Case("300 MB, one chat of 4096 tokens: dense's weights fit (269 MB), not with their cache (363 MB)",
                  (rows, 300e6, 4096, 1)),
             Case("512 MB, 4 chats of 4096 tokens: one cache per sequence, the weights once", (rows, 512e6, 4096, 4)),
             Case("768 MB, one document of 32 768 tokens: the cache grows with the context", (rows, 768e6, 32768, 1)),
             Case("exactly what GPTQ 4-bit + KIVI-4 needs for 16 chats of 4096 tokens: <= fits",
                  (rows, 113_924_736 + 6480 * 4096 * 16, 4096, 16)),
             Case("128 MB, one chat of 4096 tokens: nothing fits", (rows, 128e6, 4096, 1)),
             Case("a perplexity tie (GPTQ 4-bit with an fp16 or an 8-bit cache): fewer bytes wins",
                  (TIED_ROWS, 256e6, 4096, 1))]

    def got(rows, budget_bytes, context, batch):  # a copy of the rows: a participant may sort or annotate them
        out = fn(copy.deepcopy(rows), budget_bytes, context=context, batch=batch)
        return _recipe_choice(out, rows, context, batch)

    def expected(rows, budget_bytes, context, batch):
        return _recipe_choice(stack.choose_recipe(copy.deepcopy(rows), budget_bytes, context=context, batch=batch),
                              rows, context, batch)

    got.__name__ = getattr(fn, "__name__", "choose_recipe")
    expected.__module__, expected.__name__ = stack.choose_recipe.__module__, stack.choose_recipe.__name__
    chosen = run_check("Exercise 4 · choose_recipe", got, expected, cases, atol=0,
                       hint="a deployment holds the weights once and one KV cache per sequence: bytes = "
                            "weight_bytes + kv_bytes_per_token * context * batch (bytes, like budget_bytes). Keep the "
                            "rows with bytes <= budget_bytes; return the one with the LOWEST perplexity (fewer bytes "
                            "on a tie), or None when none fits.",
                       more="def total(r): return r['weight_bytes'] + r['kv_bytes_per_token'] * context * batch; "
                            "fits = [r for r in rows if total(r) <= budget_bytes]; return min(fits, key=lambda r: "
                            "(r['ppl'], total(r)), default=None)  (min of an empty list raises without default=).")
    return fn if chosen is got else stack.choose_recipe
