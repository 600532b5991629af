"""Number formats drawn as grids: which values can each format represent? (lab 01)

    grid("fp8_e4m3")          # every finite value of float8 e4m3fn, sorted (253 values, max 448)
    grid("nf4")               # the 16 NormalFloat-4 levels in [-1, 1] (bitsandbytes)
    codebook_quantize(w, grid("fp4_e2m1"), block_size=64)    # absmax-scaled round-to-nearest-level

Integer grids are uniform; floating-point grids are dense near zero and sparse far out, which suits
bell-shaped weights (the LLM-FP4 / NF4 argument).
"""

from __future__ import annotations

import torch

from .quant import check_float, group_view

# bitsandbytes' NF4 levels (quantiles of N(0, 1), normalised to [-1, 1], with an exact zero).
NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
# OCP FP4 E2M1 magnitudes (1 sign, 2 exponent, 1 mantissa bit; no inf/NaN). NVFP4 and MXFP4 use this element.
E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

FORMATS = {
    "fp32": "1 sign + 8 exponent + 23 mantissa bits",
    "bf16": "1 + 8 + 7: fp32's range, 3 significant digits",
    "fp16": "1 + 5 + 10: more precision, max 65504",
    "fp8_e4m3": "1 + 4 + 3, max 448 (no inf): weights and activations (Hopper, Ada)",
    "fp8_e5m2": "1 + 5 + 2, max 57344: gradients",
    "int8": "256 uniform levels",
    "int4": "16 uniform levels",
    "nf4": "16 levels at normal quantiles (QLoRA)",
    "fp4_e2m1": "1 + 2 + 1: 15 distinct values (Blackwell NVFP4/MXFP4 element)",
}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def grid(name: str) -> torch.Tensor:
    """Sorted distinct finite values of a format (float64). For int formats, the codes themselves."""
    if name in ("fp8_e4m3", "fp8_e5m2"):
        values = torch.arange(256, dtype=torch.uint8).view(_TORCH_DTYPES[name]).double()  # all 8-bit patterns
    elif name in ("bf16", "fp16"):
        values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(_TORCH_DTYPES[name]).double()
    elif name in ("int8", "int4"):
        bits = int(name[3:])
        values = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float64)
    elif name == "nf4":
        values = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    elif name == "fp4_e2m1":
        mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
        values = torch.cat([-mags, mags])
    else:
        raise ValueError(f"unknown format {name!r}; choose from {sorted(set(FORMATS) - {'fp32'})}")
    return torch.unique(values[torch.isfinite(values)])  # sorted, -0 merged with 0


def codebook_quantize(w: torch.Tensor, levels: torch.Tensor, block_size=64) -> torch.Tensor:
    """Absmax-scale each block to the codebook's range, snap to the nearest level, scale back.

    w (..., in) -> same shape and dtype. The scale maps max|w| of a block to max|levels| (NF4/FP4 style).
    """
    check_float(w, "w")
    blocks = group_view(w, block_size).float()  # (n_blocks, block)
    levels = levels.to(blocks)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / levels.abs().max()  # (n_blocks, 1)
    idx = torch.bucketize(blocks / scale, (levels[1:] + levels[:-1]) / 2)  # nearest level by midpoints
    return (levels[idx] * scale).reshape(w.shape).to(w.dtype)


def int_levels(bits: int) -> torch.Tensor:
    """Symmetric integer levels -(2^(b-1)-1) .. 2^(b-1)-1 (absmax style, as codebook_quantize expects)."""
    q = 2 ** (bits - 1) - 1
    return torch.arange(-q, q + 1, dtype=torch.float64)
