"""The KV cache's storage format, the bottom layer that the compression (kvcompress), its Triton kernels
(kernels.kv_quant) and the checkers share: KIVI group quantization, packed codes, the checks of its arguments, and what each grouping
layout costs one layer's attention. Imports nothing of compresslab's. (lab 06)

    q = quantize_groups_torch(k, bits=2, group_size=64, dim=-2)    # keys per channel: groups of 64 tokens
    q.codes, q.scale, q.minimum; q.dequantize(); q.nbytes()         # packed 8 // bits per byte; fp16 scale and min
    layout_attention_errors(q, k, v, bits=2, group_size=64)        # (2, 2): keys/values x per channel/per token
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

KV_BITS = (2, 4, 8)
STORE = torch.float16  # every stored float (scales, minima, outlier values, low-rank factors, the fp buffer)
DEQUANTIZERS: dict[str, Callable] = {}  # backend name -> fn(QuantizedGroups, dtype): kernels register themselves


def validate_kv_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in KV_BITS:
        raise ValueError(f"KV-cache bits must be one of {KV_BITS} (packed 8 // bits codes per byte), got {bits!r}. "
                         "16 bits is the uncompressed cache: use method='fp16'.")
    return bits


def validate_group(n: int, group_size, what: str) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 4:
        raise ValueError(f"group_size must be a positive multiple of 4 (codes are packed per byte), got {group_size!r}")
    if n % group_size:
        ok = [d for d in range(4, n + 1, 4) if n % d == 0]
        raise ValueError(f"group_size={group_size} does not divide the {what} ({n}). Use one of {ok}.")
    return group_size


def kind_dim(kind: str) -> int:
    if kind not in ("key", "value"):
        raise ValueError(f"kind must be 'key' (quantized per channel) or 'value' (per token), got {kind!r}")
    return -2 if kind == "key" else -1


# ----------------------------------------------------------------------------- packed group quantization (KIVI)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) uint8 codes < 2^bits -> (..., n * bits / 8) bytes, code j of a byte in bits [j*b, (j+1)*b)."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int32)  # (..., n/per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: (..., m) bytes -> (..., m * 8 / bits) uint8 codes."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., m, per)
    return c.reshape(*packed.shape[:-1], -1).to(torch.uint8)


@dataclass
class QuantizedGroups:
    """x quantized in groups of `group_size` along `dim`; tensors laid out with that dim moved last."""

    codes: torch.Tensor  # (..., n_groups, group_size * bits / 8) uint8, packed
    scale: torch.Tensor  # (..., n_groups, 1) fp16
    minimum: torch.Tensor  # (..., n_groups, 1) fp16
    bits: int
    dim: int
    shape: tuple[int, ...]
    backend: str = "torch"  # "triton": dequantize with the fused kernel (compresslab.kernels.kv_quant)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.backend != "torch":  # a kernel registered itself for this backend (compresslab.kernels.kv_quant)
            if self.backend not in DEQUANTIZERS:
                raise ValueError(f"no dequantizer registered for backend {self.backend!r}: import "
                                 "compresslab.kernels.kv_quant (backend 'triton')")
            return DEQUANTIZERS[self.backend](self, dtype)
        q = unpack_codes(self.codes, self.bits).float()  # (..., n_groups, group_size)
        x = (q * self.scale.float() + self.minimum.float()).to(dtype)  # fp32 math, one rounding (as the kernel)
        moved = list(self.shape)
        moved.append(moved.pop(self.dim))
        return x.reshape(moved).movedim(-1, self.dim)

    def nbytes(self) -> dict[str, int]:
        return {"codes": tensor_nbytes(self.codes),
                "scales+minima": tensor_nbytes(self.scale) + tensor_nbytes(self.minimum)}


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores: numel x element size."""
    return t.numel() * t.element_size()


def quantize_groups_torch(x: torch.Tensor, bits: int, group_size: int, dim: int) -> QuantizedGroups:
    """Asymmetric b-bit quantization of x in groups of `group_size` consecutive elements along `dim`, in PyTorch:
    the reference of the fused kernel (compresslab.kernels.kv_quant). kvcompress.quantize_groups picks the backend."""
    validate_kv_bits(bits)
    if not x.is_floating_point():
        raise TypeError(f"the KV states must be floating point, got {x.dtype}")
    dim = dim % x.dim()
    validate_group(x.shape[dim], group_size, "tokens of the block (keys are grouped along tokens)" if dim == x.dim() - 2
                 else f"size of dim {dim}")
    g = x.float().movedim(dim, -1)
    g = g.reshape(*g.shape[:-1], -1, group_size)  # (..., n_groups, group_size)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    maxq = 2**bits - 1
    scale = ((mx - mn) / maxq).clamp_min(1e-5).to(STORE)  # stored in fp16: quantize with the stored values
    minimum = mn.to(STORE)
    codes = torch.round((g - minimum.float()) / scale.float()).clamp(0, maxq).to(torch.uint8)
    return QuantizedGroups(pack_codes(codes, bits), scale, minimum, bits, dim, tuple(x.shape))


# ----------------------------------------------------------------------------- what a layout costs attention


def attention_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor,
                    v_hat: torch.Tensor) -> dict[str, float]:
    """Relative error a quantized cache causes where it matters: in the scores QKᵀ and in the attention output
    softmax(QKᵀ/√d + causal mask)V, against the exact cache. q (b, heads, t, d); k, v, k_hat, v_hat (b, kv_heads,
    t, d) — kv heads are repeated for grouped-query attention, as the model does."""
    if k_hat.shape != k.shape or v_hat.shape != v.shape or k.shape != v.shape:
        raise ValueError(f"k, v, k_hat and v_hat must share one shape; got {k.shape}, {v.shape}, {k_hat.shape}, "
                         f"{v_hat.shape}")
    rep = q.shape[1] // k.shape[1]
    if rep * k.shape[1] != q.shape[1] or q.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)}: heads must be a multiple of kv heads "
                         "and tokens/head_dim equal")
    expand = lambda x: x.float().repeat_interleave(rep, dim=1)  # noqa: E731  (b, heads, t, d)
    t, d = q.shape[-2], q.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()

    def scores_and_out(kk, vv):
        s = q.float() @ expand(kk).mT / math.sqrt(d)  # (b, heads, t, t)
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        return s.masked_fill(~causal, 0.0), p @ expand(vv)  # scores below the diagonal, output (b, heads, t, d)

    s, o = scores_and_out(k, v)
    s_hat, o_hat = scores_and_out(k_hat, v_hat)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"scores": rel(s_hat, s), "output": rel(o_hat, o)}


def layout_attention_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int,
                            group_size: int) -> torch.Tensor:
    """What each quantization layout of the cache costs one layer's attention, as a (2, 2) float32 tensor:

        [[scores error, keys per channel,    scores error, keys per token  ],
         [output error, values per channel,  output error, values per token]]

    Per channel: groups of `group_size` consecutive tokens of one channel (dim=-2); per token: groups of `group_size`
    consecutive channels of one token (dim=-1); either fake-quantized with quantize_groups_torch. Quantized keys are
    judged by the scores S = QKᵀ/√d on and below the diagonal (the ones a token computes), with exact values;
    quantized values by the output softmax(S + causal mask)V, with exact keys (attention_error, above). Each error is relative over the whole
    tensor, ‖Â − A‖_F / ‖A‖_F. q (b, heads, t, d); k, v (b, kv_heads, t, d), kv head j shared by query heads
    j·r … j·r + r − 1, r = heads / kv_heads (grouped-query attention, as transformers' repeat_kv). The reference of
    lab 06's exercise 2.

        layout_attention_errors(q, k, v, bits=2, group_size=64)[0, 0]    # 2-bit keys per channel: scores error
    """

    def fake(x: torch.Tensor, dim: int) -> torch.Tensor:
        return quantize_groups_torch(x, bits, group_size, dim).dequantize(torch.float32)

    k, v = k.float(), v.float()
    errors = [[attention_error(q, k, v, fake(k, dim), v)["scores"] for dim in (-2, -1)],  # keys: channel, token
              [attention_error(q, k, v, k, fake(v, dim))["output"] for dim in (-2, -1)]]  # values: channel, token
    return torch.tensor(errors)
