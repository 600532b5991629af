"""Number formats drawn as grids: which values can each format represent? (lab 01)

    grid("fp8_e4m3")          # every finite value of float8 e4m3fn, sorted (253 values, max 448)
    grid("nf4")               # the 16 NormalFloat-4 levels in [-1, 1] (bitsandbytes)
    codebook_quantize(w, grid("fp4_e2m1"), group_size=64)    # absmax-scaled round-to-nearest-level
    nvfp4_quantize(w).dequantize()    # E2M1 + an E4M3 scale per 16 + an fp32 scale per tensor (4.5 bits/weight)
    mxfp4_quantize(w).dequantize()    # E2M1 + a power-of-two (E8M0) scale per 32 (OCP MX, 4.25 bits/weight)
    bits_per_element("nvfp4")         # 4.5: element bits + block metadata bits / block size

Integer grids are uniform; floating-point grids and NF4 are dense near zero and sparse far out. Whether that beats
a uniform grid on bell-shaped weights depends on the scaling around it: QLoRA's claim is NF4 against INT4 with the
same absmax scale (symmetric), not against INT4 with a min/max scale and zero point (lab 01, section 6 measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import validate_float, group_view

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


def codebook_quantize(w: torch.Tensor, levels: torch.Tensor, group_size=64,
                      scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Absmax-scale each group (bitsandbytes' "block") to the codebook's range, snap to the nearest level, scale back.

    w (..., in) -> same shape and dtype. The scale maps max|w| of a block to max|levels| (NF4/FP4 style). It is
    kept in float32 (bitsandbytes stores an fp32 absmax), or rounded to `scale_dtype` (e.g. torch.float16) first.
    """
    validate_float(w, "w")
    blocks = group_view(w, group_size).float()  # (n_groups, group_size)
    levels = levels.to(blocks)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / levels.abs().max()  # (n_blocks, 1)
    if scale_dtype is not None:  # the scale a checkpoint would store
        scale = scale.to(scale_dtype).float().clamp(min=1e-12)
    idx = torch.bucketize(blocks / scale, (levels[1:] + levels[:-1]) / 2)  # nearest level by midpoints
    return (levels[idx] * scale).reshape(w.shape).to(w.dtype)


def int_levels(bits: int) -> torch.Tensor:
    """Symmetric integer levels -(2^(b-1)-1) .. 2^(b-1)-1 (absmax style, as codebook_quantize expects)."""
    q = 2 ** (bits - 1) - 1
    return torch.arange(-q, q + 1, dtype=torch.float64)


# ----------------------------------------------------------------------------- bits per weight, metadata counted

# name: (element bits, block size, metadata bits per block, what each block stores besides its elements)
STORAGE = {
    "int4 sym g64": (4, 64, 16, "an fp16 scale"),
    "fp4 e2m1 g64": (4, 64, 16, "an fp16 scale"),
    "nf4 g64": (4, 64, 16, "an fp16 scale"),
    "nf4 g64 (bitsandbytes)": (4, 64, 32, "an fp32 absmax (double quantization: 8 bits, 4.127 bits/weight)"),
    "mxfp4": (4, 32, 8, "an E8M0 (power-of-two) scale"),
    "int4 asym g64, 4-bit zero": (4, 64, 20, "an fp16 scale + a 4-bit zero (GPTQ's packed qzeros)"),
    "int4 asym g64": (4, 64, 24, "an fp16 scale + an 8-bit zero (lab 01's QuantLinear and packed_mb)"),
    "int4 asym g64, fp16 zero": (4, 64, 32, "an fp16 scale + an fp16 zero"),
    "nvfp4": (4, 16, 8, "an E4M3 scale (+ one fp32 scale per tensor: ~0 bits per weight)"),
    "int4 sym g32": (4, 32, 16, "an fp16 scale"),
    "nf4 g32": (4, 32, 16, "an fp16 scale"),
}


def bits_per_element(fmt: str) -> float:
    """Storage bits per weight with the block metadata counted: bits_per_element("nvfp4") -> 4 + 8/16 = 4.5.

    `fmt` is a key of STORAGE (lab 01, section 6). Per-tensor scalars (NVFP4's fp32 scale) are left out.
    """
    if fmt not in STORAGE:
        raise ValueError(f"unknown format {fmt!r}; choose from {list(STORAGE)}")
    element_bits, block_size, metadata_bits, _ = STORAGE[fmt]
    return element_bits + metadata_bits / block_size


# ----------------------------------------------------------------------------- microscaled FP4: NVFP4 and MXFP4

E2M1_MAX = 6.0  # largest E2M1 magnitude (1.5 * 2^2)
E4M3_MAX = 448.0  # largest float8_e4m3fn value (no inf)


@dataclass
class BlockFP4:
    """E2M1 elements in blocks with one scale each: w ≈ elements * block_scales * tensor_scale.

    elements (n_blocks, block) float32, each an E2M1 value in [-6, 6]; block_scales (n_blocks, 1) float32 holding
    exact E4M3 values (NVFP4) or powers of two (MXFP4); tensor_scale: NVFP4's fp32 scale per tensor (1.0 for MXFP4).
    """

    elements: torch.Tensor
    block_scales: torch.Tensor
    tensor_scale: float
    shape: torch.Size

    def dequantize(self) -> torch.Tensor:
        """-> float32 tensor of the original shape."""
        return (self.elements * self.block_scales * self.tensor_scale).reshape(self.shape)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of each x, saturating at ±6 (NaN too); a tie goes to the even code, as hardware does.

    E2M1's magnitudes 0, 0.5, 1, 1.5 | 2, 3 | 4, 6 are evenly spaced within each binade: steps of 0.5 below 2, 1 from
    2 to 4, 2 from 4 to 6. So the nearest value is round(a / step) * step, and round-half-to-even on a / step is
    round-half-to-even on the code, whose parity a / step shares (codes 0-4 are 2a, 4-6 are a + 2, 6-7 are a / 2 + 4).
    Every step is exact in float32 (powers of two). The result equals a search for the nearest of the 8 magnitudes
    with ties to the even code, bit for bit (sign of zero included), at a quarter of its cost: checked over every
    float32 in [1/8, 8) when written; tests/test_formats_mx.py checks each boundary's neighbourhood.
    """
    a = torch.fmin(x.float().abs(), torch.tensor(E2M1_MAX, device=x.device))  # fmin: NaN -> 6, like inf
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, x.float())


def _fp4_blocks(w: torch.Tensor, block: int, fmt: str) -> torch.Tensor:
    """w (..., n) -> (n_blocks, block) float32, refusing what the format cannot hold."""
    validate_float(w, "w")
    n = w.shape[-1] if w.dim() else 0
    if n % block or n == 0:
        raise ValueError(f"{fmt} scales blocks of {block} consecutive values along the last dim, which must be a "
                         f"positive multiple of {block}; got {n}. Pad the last dim with zeros to a multiple of {block} "
                         "(as hardware kernels do), or keep this tensor in a higher precision.")
    if not torch.isfinite(w).all():
        raise ValueError(f"w holds inf or NaN: {fmt} has no encoding for them (check the weights first)")
    return w.detach().float().reshape(-1, block)


def nvfp4_quantize(w: torch.Tensor) -> BlockFP4:
    """NVFP4: E2M1 elements, an E4M3 scale per 16 values, an fp32 scale per tensor (4.5 bits/weight; lab 01).

        w_hat = nvfp4_quantize(w).dequantize()      # w (..., n), n a multiple of 16

    The tensor scale s_t = amax / (448 * 6) maps the largest block scale onto E4M3's largest value, so the block
    scales use E4M3's whole range whatever the weights' magnitude (without it, small weights' scales fall into E4M3's
    coarse subnormals and large ones saturate at 448). Block scale = e4m3(block amax / 6 / s_t), cast with
    torch.float8_e4m3fn after clamping to 448; elements = nearest E2M1 value of w / (block scale * s_t), clamped to
    ±6. A block whose scale rounds to 0 (tiny next to the tensor's largest block) comes back as zeros.
    """
    blocks = _fp4_blocks(w, 16, "NVFP4")  # (n_blocks, 16)
    amax = blocks.abs().max()
    s_t = amax / (E4M3_MAX * E2M1_MAX) if amax > 0 else torch.ones(())  # fp32, one per tensor
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)  # (n_blocks, 1)
    scales = (block_amax / E2M1_MAX / s_t).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()  # exact E4M3 values
    denom = scales * s_t  # (n_blocks, 1)
    x = torch.where(denom > 0, blocks / denom, torch.zeros_like(blocks))  # (n_blocks, 16) in E2M1's range
    return BlockFP4(round_to_e2m1(x), scales, s_t.item(), w.shape)


def mxfp4_quantize(w: torch.Tensor) -> BlockFP4:
    """MXFP4 (OCP Microscaling v1.0): E2M1 elements, an E8M0 power-of-two scale per 32 values (4.25 bits/weight).

        w_hat = mxfp4_quantize(w).dequantize()      # w (..., n), n a multiple of 32 (lab 01)

    The spec's shared scale is X = 2^(floor(log2(block amax)) - 2), 2 being E2M1's largest exponent (6 = 1.5 * 2^2);
    elements = nearest E2M1 value of w / X, clamped to ±6. So a block's largest value lands in [4, 8) * X and one in
    (6, 8) * X is clipped to 6 * X: the price of a scale that is only a power of two. Exponents are clamped to E8M0's
    -127 .. 127; an all-zero block gets an arbitrary scale and zero elements.
    """
    blocks = _fp4_blocks(w, 32, "MXFP4")  # (n_blocks, 32)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)  # (n_blocks, 1)
    _, exponent = torch.frexp(block_amax)  # amax = m * 2^exponent, m in [0.5, 1): floor(log2 amax) = exponent - 1
    shared = (exponent - 1 - 2).clamp(-127, 127)  # (n_blocks, 1) int
    scales = torch.ldexp(torch.ones_like(block_amax), shared)  # 2^shared, exact
    return BlockFP4(round_to_e2m1(blocks / scales), scales, 1.0, w.shape)


# ----------------------------------------------------------------------------- microscaled FP8: MXFP8

STORAGE["mxfp8"] = (8, 32, 8, "an E8M0 (power-of-two) scale")
E4M3_EMAX = 8  # largest exponent of E4M3 (448 = 1.75 * 2^8)


@dataclass
class BlockFP8(BlockFP4):
    """E4M3 elements in blocks with one power-of-two scale each (MXFP8): w ≈ elements * block_scales.

    Same fields as BlockFP4: elements (n_blocks, block) float32, each an exact E4M3 value in [-448, 448];
    block_scales (n_blocks, 1) float32 powers of two; tensor_scale 1.0 (MX has no per-tensor scale); shape.
    """


def mxfp8_quantize(w: torch.Tensor) -> BlockFP8:
    """MXFP8 (OCP Microscaling v1.0): E4M3 elements, an E8M0 power-of-two scale per 32 values (8.25 bits/element).

        w_hat = mxfp8_quantize(w).dequantize()      # w (..., n), n a multiple of 32 (activation-quantization lab)

    As MXFP4 with E4M3 elements: the shared scale is X = 2^(floor(log2(block amax)) - 8), 8 being E4M3's largest
    exponent (448 = 1.75 * 2^8); elements = w / X cast to float8_e4m3fn (round to nearest even) after clamping to
    ±448 (explicitly: whether a cast saturates is the library's choice). A block's largest value lands in
    [256, 512) * X, so one in (448, 512) * X is clipped to 448 * X (kernels that round the scale up instead,
    2^ceil(log2(amax / 448)), never clip but use a coarser grid). Exponents are clamped to E8M0's -127 .. 127; an all-zero block comes back as zeros.
    """
    blocks = _fp4_blocks(w, 32, "MXFP8")  # (n_blocks, 32)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)  # (n_blocks, 1)
    _, exponent = torch.frexp(block_amax)  # floor(log2 amax) = exponent - 1
    shared = (exponent - 1 - E4M3_EMAX).clamp(-127, 127)  # (n_blocks, 1) int
    scales = torch.ldexp(torch.ones_like(block_amax), shared)  # 2^shared, exact
    elements = (blocks / scales).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()  # exact E4M3 values
    return BlockFP8(elements, scales, 1.0, w.shape)
