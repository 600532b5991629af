"""Fused KIVI group quantization of the KV cache: one kernel reads a block of keys or values once and writes packed
codes + fp16 scale and minimum; one kernel reads them back. The reference is lab 06's kvformat.quantize_groups_torch, and
the output is the same QuantizedGroups object, bit for bit (codes, scales and minima).

Layout (kvcompress's): x (batch, kv_heads, tokens, head_dim). Keys are grouped along tokens per channel, values along
channels per token. Both are "groups of `group_size` consecutive elements along axis n of rows r":
    keys:   r = channel (stride 1),   n = token (stride head_dim)
    values: r = token (stride head_dim), n = channel (stride 1)
so one kernel with strides serves both; the tile is (BLOCK_R rows, one group), and for keys the rows are the
contiguous axis, so loads stay coalesced without transposing the cache first.

PyTorch's reference makes four passes over the block (min, max, scale, round) and materialises the float copy of
the moved dim; the kernel makes one. A fused dequantize-into-attention-scores path (reading codes inside the
attention kernel) is where the next speedup is; it is not here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import validate_device, interpreting
from ..kvformat import DEQUANTIZERS, STORE, QuantizedGroups, validate_group, validate_kv_bits, kind_dim

BLOCK_R = 32  # rows per program (keys: channels; values: tokens)


@triton.jit
def _round_half_even(v):
    """torch.round's rounding (ties to even) from floor, so the interpreter and the GPU agree with the reference."""
    r = tl.floor(v + 0.5)
    tie_to_odd = ((r - v) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) == 1.0)
    return tl.where(tie_to_odd, r - 1.0, r)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scale_ptr, min_ptr, R, H, NG,
                     stride_xb, stride_xh, stride_xr, stride_xn,
                     GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (a, r, g): rows [r*BR, (r+1)*BR) of head a (= batch * H + head), group g along n."""
    pid_a, pid_r, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PER: tl.constexpr = 8 // BITS  # codes per byte
    MAXQ: tl.constexpr = (1 << BITS) - 1
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, GROUP)
    mask_r = offs_r < R
    base = x_ptr + (pid_a // H) * stride_xb + (pid_a % H) * stride_xh
    x = tl.load(base + offs_r[:, None] * stride_xr + (pid_g * GROUP + offs_j)[None, :] * stride_xn,
                mask=mask_r[:, None], other=0.0).to(tl.float32)  # (BR, GROUP)
    mn = tl.min(x, axis=1)
    mx = tl.max(x, axis=1)
    scale = tl.maximum((mx - mn) / MAXQ, 1e-5).to(tl.float16).to(tl.float32)  # stored in fp16: quantize with it
    mn = mn.to(tl.float16).to(tl.float32)
    q = _round_half_even((x - mn[:, None]) / scale[:, None])
    q = tl.minimum(tl.maximum(q, 0.0), MAXQ).to(tl.int32)  # (BR, GROUP)
    # pack: code j of a byte at bits [j*BITS, (j+1)*BITS)
    q = tl.reshape(q, (BLOCK_R, GROUP // PER, PER))
    packed = tl.sum(q << (tl.arange(0, PER) * BITS)[None, None, :], axis=2).to(tl.uint8)  # (BR, GROUP/PER)
    row = pid_a * R + offs_r  # output rows are (a, r) in order; groups of a row follow each other
    offs_c = tl.arange(0, GROUP // PER)
    tl.store(codes_ptr + (row[:, None] * NG + pid_g) * (GROUP // PER) + offs_c[None, :], packed, mask=mask_r[:, None])
    tl.store(scale_ptr + row * NG + pid_g, scale.to(tl.float16), mask=mask_r)
    tl.store(min_ptr + row * NG + pid_g, mn.to(tl.float16), mask=mask_r)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, min_ptr, out_ptr, R, H, NG,
                       stride_ob, stride_oh, stride_or, stride_on,
                       GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """The inverse: codes * scale + minimum, written back into the (batch, heads, tokens, head_dim) layout."""
    pid_a, pid_r, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PER: tl.constexpr = 8 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, GROUP)
    mask_r = offs_r < R
    row = pid_a * R + offs_r
    byte = tl.load(codes_ptr + (row[:, None] * NG + pid_g) * (GROUP // PER) + (offs_j // PER)[None, :],
                   mask=mask_r[:, None], other=0).to(tl.int32)  # (BR, GROUP): each byte read PER times, from cache
    q = ((byte >> ((offs_j % PER) * BITS)[None, :]) & MAXQ).to(tl.float32)
    scale = tl.load(scale_ptr + row * NG + pid_g, mask=mask_r, other=0.0).to(tl.float32)
    mn = tl.load(min_ptr + row * NG + pid_g, mask=mask_r, other=0.0).to(tl.float32)
    x = q * scale[:, None] + mn[:, None]
    base = out_ptr + (pid_a // H) * stride_ob + (pid_a % H) * stride_oh
    tl.store(base + offs_r[:, None] * stride_or + (pid_g * GROUP + offs_j)[None, :] * stride_on,
             x.to(out_ptr.dtype.element_ty), mask=mask_r[:, None])


def _rows_and_strides(shape_or_tensor, dim: int, strides):
    """(R, n, stride_r, stride_n) of the moved view: n is the grouped axis `dim` (-2 keys, -1 values)."""
    t, d = shape_or_tensor[-2], shape_or_tensor[-1]
    if dim == 2:  # keys: rows are channels, groups run along tokens
        return d, t, strides[3], strides[2]
    return t, d, strides[2], strides[3]  # values: rows are tokens, groups run along channels


def quantize_kv(x: torch.Tensor, kind: str, bits: int = 2, group_size: int = 64) -> QuantizedGroups:
    """Keys ("key", per channel) or values ("value", per token) (b, h, t, d) -> kvformat.QuantizedGroups."""
    dim = kind_dim(kind) % 4
    validate_kv_bits(bits)
    if x.dim() != 4:
        raise ValueError(f"expected KV states of shape (batch, kv_heads, tokens, head_dim), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the KV states must be float16, bfloat16 or float32, got {x.dtype}")
    if interpreting() and x.dtype == torch.bfloat16:
        raise TypeError("the Triton interpreter (CPU) has no bfloat16; use float16 or float32 on CPU")
    validate_group(x.shape[dim], group_size, "tokens of the block (keys are grouped along tokens)" if dim == 2
                 else "head_dim (values are grouped along channels)")
    if group_size & (group_size - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two group_size (tiles are powers of two), got "
                         f"{group_size}; use 32 or 64, or the PyTorch path (kvcompress.quantize_groups)")
    validate_device(x, who="quantize_kv")
    b, h = x.shape[:2]
    rows, n, s_r, s_n = _rows_and_strides(x.shape, dim, x.stride())
    ng = n // group_size
    codes = torch.empty(b, h, rows, ng, group_size * bits // 8, device=x.device, dtype=torch.uint8)
    scale = torch.empty(b, h, rows, ng, 1, device=x.device, dtype=STORE)
    minimum = torch.empty_like(scale)
    grid = (b * h, triton.cdiv(rows, BLOCK_R), ng)
    _quantize_kernel[grid](x, codes, scale, minimum, rows, h, ng, x.stride(0), x.stride(1), s_r, s_n,
                           GROUP=group_size, BITS=bits, BLOCK_R=BLOCK_R)
    return QuantizedGroups(codes, scale, minimum, bits, dim, tuple(x.shape))


def dequantize_kv(q: QuantizedGroups, dtype=torch.float32) -> torch.Tensor:
    """QuantizedGroups of keys or values -> (b, h, t, d) in `dtype` (same values as q.dequantize(dtype))."""
    if q.dim not in (2, 3) or len(q.shape) != 4:
        raise ValueError("dequantize_kv takes keys or values quantized by quantize_kv / quantize_keys / quantize_values")
    if interpreting() and dtype == torch.bfloat16:
        raise TypeError("the Triton interpreter (CPU) has no bfloat16; use float16 or float32 on CPU")
    validate_device(q.codes, q.scale, q.minimum, who="dequantize_kv")
    for name in ("codes", "scale", "minimum"):
        if not getattr(q, name).is_contiguous():
            raise ValueError(f"QuantizedGroups.{name} must be contiguous")
    b, h = q.shape[:2]
    out = torch.empty(q.shape, device=q.codes.device, dtype=dtype)
    rows, n, s_r, s_n = _rows_and_strides(q.shape, q.dim, out.stride())
    group = q.codes.shape[-1] * 8 // q.bits
    ng = n // group
    grid = (b * h, triton.cdiv(rows, BLOCK_R), ng)
    _dequantize_kernel[grid](q.codes, q.scale, q.minimum, out, rows, h, ng, out.stride(0), out.stride(1), s_r, s_n,
                             GROUP=group, BITS=q.bits, BLOCK_R=BLOCK_R)
    return out


def _dequantize_triton(q: QuantizedGroups, dtype=torch.float32) -> torch.Tensor:
    return dequantize_kv(q, dtype)  # looked up at call time


DEQUANTIZERS["triton"] = _dequantize_triton  # QuantizedGroups(backend="triton").dequantize() runs the kernel
