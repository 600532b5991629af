"""Lab 01 · quantization fundamentals: the exercise checkers.

Each case catches one plausible mistake; tests/test_checks.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import quant
from . import Case, run_check


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05  # (rows, cols), LLM-weight-like scale


def _lab01_tensors() -> dict[str, torch.Tensor]:
    w = _weights(6, 64, 1)
    return {
        "mixed-sign groups": w,
        "all-positive groups (the range must include 0)": w.abs() + 0.01,
        "all-negative groups (the range must include 0)": -w.abs() - 0.01,
        "a constant all-zero group (the scale must not be 0)": torch.cat([w[:3], torch.zeros(1, 64)]),
        "a wide, non-square matrix (reduce over the last dim)": _weights(3, 128, 2),
        "an outlier of 2.0 in one group": torch.cat([w[:2], torch.tensor([[2.0] + [0.01] * 63])]),
    }


def check_qparams(fn: Callable) -> Callable:
    """Exercise: fn(x, bits) -> (scale, zero), asymmetric, one pair per row of x (n_groups, group_len)."""
    cases = [Case(f"{label}, {bits}-bit", (x, bits)) for label, x in _lab01_tensors().items() for bits in (8, 4, 3)]
    return run_check("Exercise 1 · compute_qparams", fn, _qparams_asym, cases,
                     hint="one (scale, zero) per ROW of x, each of shape (n_groups, 1); the range must include 0 "
                          "so that 0 is exact, and the zero point is an integer code.",
                     more="scale = (xmax - xmin) / (2**bits - 1) with xmin = min(x.min, 0), xmax = max(x.max, 0) "
                          "per row (dim=-1, keepdim=True); zero = round(-xmin / scale); clamp the scale to >= 1e-8.")


def _qparams_asym(x, bits):
    return quant.compute_qparams(x, bits, sym=False)


def _quant_dequant(x, scale, zero, bits):
    return quant.dequantize(quant.quantize(x, scale, zero, bits, sym=False), scale, zero)


def check_quant_dequant(fn: Callable) -> Callable:
    """Exercise: fn(x, scale, zero, bits) -> x_hat, asymmetric round-to-nearest with clamping to [0, 2^b-1]."""
    cases = []
    for label, x in _lab01_tensors().items():
        for bits in (8, 4, 2):
            scale, zero = _qparams_asym(x, bits)
            cases.append(Case(f"{label}, {bits}-bit", (x, scale, zero, bits)))
    # qparams from a narrower range than x: values outside must saturate at the ends of the code range
    x = _weights(4, 64, 3)
    scale, zero = _qparams_asym(x * 0.5, 4)
    cases.append(Case("x outside the calibrated range (codes must be clamped to [0, 2**bits - 1])",
                      (x, scale, zero, 4)))
    return run_check("Exercise 2 · quantize_dequantize", fn, _quant_dequant, cases,
                     hint="round to the nearest code, keep the codes inside the range an unsigned bits-bit integer "
                          "can hold, then map the codes back to real values.",
                     more="q = clamp(round(x / scale) + zero, 0, 2**bits - 1); x_hat = (q - zero) * scale.")


def _fake_quant_groups(w, bits, group_size):
    return quant.fake_quantize(w, bits, group_size, sym=False)


def check_fake_quantize_groups(fn: Callable) -> Callable:
    """Exercise: fn(w, bits, group_size) -> w_hat, same shape as w (out, in), groups along in_features."""
    w = _weights(8, 256, 4)
    w[3, 17] = 1.5  # one outlier: it should only hurt its own group
    cases = [Case(f"(8, 256) weight, {bits}-bit, group {gs}", (w, bits, gs)) for bits in (4, 3) for gs in (32, 64, 128)]
    cases.append(Case("(4, 576) weight like SmolLM2's, group 64", (_weights(4, 576, 5), 4, 64)))
    cases.append(Case("group_size == in_features (per-channel)", (_weights(5, 64, 6), 4, 64)))
    return run_check("Exercise 3 · fake_quantize_groups", fn, _fake_quant_groups, cases,
                     hint="a group is group_size CONSECUTIVE input columns of one output row; reuse exercises 1 and "
                          "2 on the groups, and return the same shape as w.",
                     more="reshape w (out, in) to (-1, group_size) so each row is one group of consecutive input "
                          "columns, quantize-dequantize the rows, then reshape back to w.shape.", atol=1e-5)


def check_pack_int4(fn: Callable) -> Callable:
    """Exercise: fn(q) -> packed uint8, q (..., n) codes in [0, 15]; element 2k low nibble, 2k+1 high nibble."""
    g = torch.Generator().manual_seed(7)
    cases = [
        Case("codes 0..15 in order", (torch.arange(16, dtype=torch.uint8).reshape(1, 16),)),
        Case("random (4, 32) codes", (torch.randint(0, 16, (4, 32), generator=g, dtype=torch.uint8),)),
        Case("all 15s (no overflow past 255)", (torch.full((2, 8), 15, dtype=torch.uint8),)),
        Case("a 1-D vector", (torch.randint(0, 16, (10,), generator=g, dtype=torch.uint8),)),
        Case("int64 input codes (cast to uint8)", (torch.randint(0, 16, (3, 6), generator=g),)),
    ]
    return run_check("Exercise 4 · pack_int4", fn, quant.pack_int4, cases, atol=0,
                     hint="two neighbours along the last dim share one byte, the even one in the low 4 bits; the "
                          "result is uint8 with half as many elements in the last dim.",
                     more="view the last dim as pairs (..., n/2, 2); byte = low | (high << 4), "
                          "with low = element 2k and high = element 2k+1; return uint8.")
