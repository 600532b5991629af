"""W4A16: y = x @ W^T with W stored as GPTQ 4-bit codes, dequantized inside the matmul (never materialised in HBM).

Top to bottom: the layout, the PyTorch reference, packing, the two Triton kernels (a split-K GEMV for decode and a
tiled GEMM for prefill), the checked entry point `w4a16_matmul`, and `QuantLinear`, which puts the kernel inside a
transformers model (quantized in memory, or loaded from lab 02's export).

The layout (GPTQ "v1", what lab 02's checkpoint.save_gptq writes; K = in_features, N = out_features, G = groups):
    qweight (K / 8, N)  int32    8 codes per word along K, code k at bits [4(k % 8), 4(k % 8) + 4)
    qzeros  (G, N / 8)  int32    zero points minus one (v1), 8 per word along N; v2 checkpoints store them as is
    scales  (G, N)      float16
    g_idx   (K,)        int32    group of input column k; act-order with dynamic groups makes it non-monotone
    W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]

Why it is fast: decode (a few rows of x) is memory-bound, so time ~ bytes read. Packed weights are 4 bits + one
fp16 scale and 4-bit zero per group: ~0.28 bytes per weight at g128 instead of 2 bytes in fp16, so the bound is
~3.5x faster than cuBLAS fp16 GEMV. A kernel only gets there by reading the packed words once and dequantizing in
registers — which is what both kernels below do.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import triton
import triton.language as tl

from .. import packing
from ..quant import DEFAULT_GROUP_SIZE
from . import validate_device, interpreting

PACK = 8  # 4-bit codes per int32 word
ACT_DTYPES = (torch.float16, torch.bfloat16)
GEMV_MAX_M = 8  # up to 8 rows (decode batches) take the GEMV kernel, more take the GEMM

# ----------------------------------------------------------------------------- reference (PyTorch)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """The trivial g_idx (no act-order, or act-order with static groups): column k is in group k // group_size."""
    return torch.arange(in_features, device=device, dtype=torch.int32) // group_size


def dequantize_gptq(qweight, qzeros, scales, g_idx=None, group_size=None, zero_offset: int = 1) -> torch.Tensor:
    """The weight (N, K) in float32 from the packed layout (zero_offset=1 for v1 checkpoints, 0 for v2)."""
    codes = packing.unpack(qweight, 4, dim=0)  # (K, N) int32 codes 0..15
    zeros = (packing.unpack(qzeros, 4, dim=1) + zero_offset) & 0xF  # (G, N)
    g = default_g_idx(codes.shape[0], group_size, codes.device) if g_idx is None else g_idx.long()  # (K,)
    w = (codes - zeros[g]).float() * scales[g].float()  # (K, N): each input column gathers its group's row
    return w.t()


def w4a16_matmul_ref(x, qweight, qzeros, scales, g_idx=None, group_size=None, bias=None, zero_offset: int = 1):
    """x (..., K) -> (..., N) in x's dtype, computed in float32 from the dequantized weight."""
    y = x.float() @ dequantize_gptq(qweight, qzeros, scales, g_idx, group_size, zero_offset).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- packing


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor):
    """codes (N, K), zeros and scales (N, G), g_idx (K,) -> (qweight, qzeros, scales, g_idx) in the v1 layout."""
    n, k = codes.shape
    if k % PACK or n % PACK:
        raise ValueError(f"in_features ({k}) and out_features ({n}) must be multiples of {PACK} to pack 4-bit codes")
    qweight = packing.pack(codes.t().to(torch.int64), 4, dim=0, word=torch.int32)  # (K/8, N): the exporter's packer
    stored = (zeros.t().to(torch.int64) - 1) & 0xF  # (G, N) v1: zero - 1, wrapped
    qzeros = packing.pack(stored, 4, dim=1, word=torch.int32)  # (G, N/8)
    return qweight, qzeros, scales.t().contiguous().half(), g_idx.to(torch.int32).contiguous()


def rtn_gptq(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE):
    """Round-to-nearest 4-bit in GPTQ's quantizer (asymmetric, range through 0) -> the packed v1 layout."""
    from ..quant import gptq_qparams, quantize

    n, k = weight.shape
    _check_group_size(k, group_size)
    groups = weight.detach().float().reshape(n * k // group_size, group_size)  # (N * G, g)
    scale, zero = gptq_qparams(groups, 4, sym=False)  # (N * G, 1) each
    codes = quantize(groups, scale, zero, 4, sym=False).reshape(n, k)
    g_idx = default_g_idx(k, group_size, weight.device)
    return pack_gptq(codes, zero.reshape(n, -1), scale.reshape(n, -1), g_idx)


def _check_group_size(k: int, group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % PACK:
        raise ValueError(f"group_size must be a positive multiple of {PACK}, got {group_size!r}")
    if k % group_size:
        ok = [g for g in (32, 64, 128, 256) if k % g == 0]
        raise ValueError(f"group_size={group_size} does not divide in_features={k}; use one of {ok or 'a divisor'}"
                         f" (e.g. 64 for SmolLM2's 576).")


# ----------------------------------------------------------------------------- Triton: shared dequantization


@triton.jit
def _gather_qparams(qz_ptr, s_ptr, g, offs_n, mask, stride_zg, stride_sg, ZERO_OFFSET: tl.constexpr):
    """Scale and zero of every (k, n) of the tile from its group g (BK,): a gather per row."""
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    zw = tl.load(qz_ptr + g[:, None] * stride_zg + (offs_n // 8)[None, :], mask=mask, other=0)
    z = (((zw >> ((offs_n % 8) * 4)[None, :]) & 0xF) + ZERO_OFFSET) & 0xF
    return s, z


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, k0, stride_qk, stride_zg, stride_sg,
                  GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) fp32 weight tile W^T[offs_k, offs_n], read from the packed words."""
    mask = mask_k[:, None] & mask_n[None, :]
    words = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
    q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF  # (BK, BN) codes; the sign bits of >> are masked off
    if HAS_G_IDX:  # act-order with dynamic groups: every K row looks its group up (the g_idx cost)
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        s, z = _gather_qparams(qz_ptr, s_ptr, g, offs_n, mask, stride_zg, stride_sg, ZERO_OFFSET)
    elif GROUP_SIZE % BLOCK_K == 0:  # the K tile lies inside one group: one row of scales and zeros, broadcast
        g0 = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g0 * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        zw = tl.load(qz_ptr + g0 * stride_zg + offs_n // 8, mask=mask_n, other=0)
        z = ((((zw >> ((offs_n % 8) * 4)) & 0xF) + ZERO_OFFSET) & 0xF)[None, :]
    else:  # tiles straddle groups (group_size < BLOCK_K): gather per row
        s, z = _gather_qparams(qz_ptr, s_ptr, offs_k // GROUP_SIZE, offs_n, mask, stride_zg, stride_sg, ZERO_OFFSET)
    return (q - z).to(tl.float32) * s


# ----------------------------------------------------------------------------- Triton: GEMV (decode, M <= 8)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr, M, N, K,
                 stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
                 GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                 ZERO_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """Program (n, s): columns [n*BN, (n+1)*BN) over the K tiles s, s + SPLIT_K, ...; CUDA cores, no tensor cores.

    With one row of x there is nothing to reuse a weight for, so the kernel is a streaming reduction: split-K gives
    enough programs to keep every SM reading (N / BN alone is 32 programs at N = 4096), at the price of an atomic add.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, k0, stride_qk, stride_zg,
                          stride_sg, GROUP_SIZE, HAS_G_IDX, ZERO_OFFSET, BLOCK_K)  # (BK, BN)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)  # (BM, BK)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)  # (BM, BN)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # partial sums of the K slices meet in a zeroed fp32 buffer
        tl.atomic_add(out, acc, mask=mask)


# ----------------------------------------------------------------------------- Triton: GEMM (prefill, M > 8)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr, M, N, K,
                 stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
                 GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                 ZERO_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """Program p: one (BM, BN) output tile, dequantized weight tiles fed to tensor cores (tl.dot), fp32 accumulator."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles walk the same weight columns together, so those stay in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)  # (BM, BK) fp16/bf16
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, k0, stride_qk, stride_zg,
                          stride_sg, GROUP_SIZE, HAS_G_IDX, ZERO_OFFSET, BLOCK_K)  # (BK, BN) fp32
        acc = tl.dot(x, w.to(x.dtype), acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# On a GPU the launch parameters are autotuned per shape (keyed on M, N, K); under the interpreter one small config.
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w)
                 for bn, bk in ((32, 128), (64, 64), (64, 128), (128, 32), (128, 64), (256, 32))
                 for sk in (1, 2, 4, 8) for w in (4,)]
_GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
                 for bm, bn, bk, w, s in ((16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 32, 4, 4),
                                          (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3),
                                          (64, 256, 32, 8, 3))]
INTERPRETER_GEMV = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}
INTERPRETER_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
_tuned: dict = {}


def _launcher(kind: str):
    """The kernel to launch: autotuned on a GPU (built once), the plain kernel in the interpreter."""
    kernel = _gemv_kernel if kind == "gemv" else _gemm_kernel
    if interpreting():
        return kernel
    if kind not in _tuned:
        configs = _GEMV_CONFIGS if kind == "gemv" else _GEMM_CONFIGS
        reset = ["out_ptr"] if kind == "gemv" else None  # split-K accumulates: zero the output between trials
        _tuned[kind] = triton.autotune(configs, key=["M", "N", "K", "HAS_G_IDX", "GROUP_SIZE"], reset_to_zero=reset)(kernel)
    return _tuned[kind]


# ----------------------------------------------------------------------------- the entry point


def validate_packed(qweight, qzeros, scales, g_idx, group_size, in_features: int | None = None) -> tuple[int, int, int]:
    """Validate the packed layout -> (K, N, group_size). Errors name what is wrong and how to fix it."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 words (GPTQ layout: 8 four-bit codes per word), got {t.dtype}. "
                            "Pack codes with compresslab.kernels.w4a16.pack_gptq.")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"qweight, qzeros and scales must be 2-D, got {tuple(qweight.shape)}, {tuple(qzeros.shape)}, "
                         f"{tuple(scales.shape)}")
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    n_groups = scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (n_groups, n // PACK) or n % PACK:
        raise ValueError(f"wrongly packed: qweight {tuple(qweight.shape)} means K={k}, N={n}, so scales must be "
                         f"(G, {n}) and qzeros (G, {n // PACK}), got {tuple(scales.shape)} and {tuple(qzeros.shape)}. "
                         "qweight is packed along in_features as (K/8, N) — the transposed Linear weight.")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"scales must be floating point (float16 in GPTQ checkpoints), got {scales.dtype}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel assumes unit stride along N); call "
                             f".contiguous() once when loading, not per call")
    if in_features is not None and in_features != k:
        raise ValueError(f"activations have {in_features} features but qweight packs K={k} (qweight.shape[0] * 8)")
    if g_idx is None:
        if group_size is None:
            raise ValueError("pass group_size (or g_idx for act-order checkpoints)")
        _check_group_size(k, group_size)
        if n_groups != k // group_size:
            raise ValueError(f"scales has {n_groups} groups but K={k} / group_size={group_size} = {k // group_size}")
    else:
        if g_idx.dtype != torch.int32 or g_idx.shape != (k,) or not g_idx.is_contiguous():
            raise ValueError(f"g_idx must be a contiguous int32 vector of K={k} group indices, got "
                             f"{g_idx.dtype} {tuple(g_idx.shape)}")
        group_size = group_size or k // n_groups
    return k, n, group_size


def w4a16_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx=None, group_size: int | None = None, bias=None,
                 zero_offset: int = 1, path: str = "auto", config: dict | None = None) -> torch.Tensor:
    """x (..., K) fp16/bf16 -> (..., N) = x @ W^T + bias, W dequantized inside the kernel.

    g_idx=None: groups are contiguous runs of `group_size` columns (the fast path). path: "auto" (GEMV for up to 8
    rows, GEMM above), "gemv" or "gemm". config: fixed launch parameters instead of autotuning (tests use it).
    """
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"W4A16 kernels take float16 or bfloat16 activations, got {x.dtype}; cast with .half() "
                        "(or load the model with dtype=torch.float16)")
    if interpreting() and x.dtype == torch.bfloat16:
        raise TypeError("the Triton interpreter (CPU) computes bfloat16 dots wrongly; use float16 on CPU — "
                        "bfloat16 runs compiled on a GPU")
    if zero_offset not in (0, 1):
        raise ValueError("zero_offset is 1 for GPTQ v1 checkpoints (zeros stored minus one) and 0 for v2")
    k, n, group_size = validate_packed(qweight, qzeros, scales, g_idx, group_size, x.shape[-1])
    tensors = [x, qweight, qzeros, scales] + ([g_idx] if g_idx is not None else []) + ([bias] if bias is not None else [])
    validate_device(*tensors, who="w4a16_matmul")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if path == "auto":
        path = "gemv" if m <= GEMV_MAX_M else "gemm"
    if path not in ("gemv", "gemm"):
        raise ValueError(f"path must be 'auto', 'gemv' or 'gemm', got {path!r}")
    if path == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"the GEMV kernel handles up to {GEMV_MAX_M} rows, got {m}: use path='gemm'")
    has_g = g_idx is not None
    g_ptr = g_idx if has_g else scales  # an unused pointer when groups are contiguous
    common = dict(GROUP_SIZE=group_size, HAS_G_IDX=has_g, ZERO_OFFSET=zero_offset)
    strides = (x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0))
    if m == 0:
        return x.new_zeros(*x.shape[:-1], n)
    if path == "gemv":
        block_m = max(1, triton.next_power_of_2(m))
        cfg = config or (INTERPRETER_GEMV if interpreting() else None)
        split = cfg["SPLIT_K"] if cfg else None
        out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if (split is None or split > 1) \
            else torch.empty(m, n, device=x.device, dtype=x.dtype)
        if cfg:
            grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
            _gemv_kernel[grid](x2, qweight, qzeros, scales, g_ptr, out, m, n, k, *strides, out.stride(0),
                               BLOCK_M=block_m, **common, **cfg)
        else:
            _launch_tuned_gemv(x2, qweight, qzeros, scales, g_ptr, out, m, n, k, strides, block_m, common)
        y = out.to(x.dtype)
    else:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        cfg = config or (INTERPRETER_GEMM if interpreting() else None)
        if cfg:
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            _gemm_kernel[grid](x2, qweight, qzeros, scales, g_ptr, out, m, n, k, *strides, out.stride(0),
                               **common, **cfg)
        else:
            _launch_tuned_gemm(x2, qweight, qzeros, scales, g_ptr, out, m, n, k, strides, common)
        y = out
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def _launch_tuned_gemv(x2, qw, qz, s, g, out, m, n, k, strides, block_m, common):
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    _launcher("gemv")[grid](x2, qw, qz, s, g, out, m, n, k, *strides, out.stride(0), BLOCK_M=block_m, **common)


def _launch_tuned_gemm(x2, qw, qz, s, g, out, m, n, k, strides, common):
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launcher("gemm")[grid](x2, qw, qz, s, g, out, m, n, k, *strides, out.stride(0), **common)


# ----------------------------------------------------------------------------- QuantLinear


class QuantLinear(nn.Module):
    """A Linear stored in the GPTQ 4-bit layout whose forward runs the fused Triton kernel.

    (lab 01's compresslab.quant.QuantLinear stores its own layout and dequantizes in PyTorch; this one reads lab 02's
    checkpoints and never materialises the float weight.)
        QuantLinear.from_linear(linear, group_size=64)            # round-to-nearest, in memory
        QuantLinear.from_gptq(linear, gptq_result)                # lab 02's GPTQ result (act-order g_idx kept)
        QuantLinear.from_packed(qweight, qzeros, scales, g_idx, bias)  # from a checkpoint's tensors
    """

    def __init__(self, qweight, qzeros, scales, g_idx, bias=None, zero_offset: int = 1):
        super().__init__()
        k = qweight.shape[0] * PACK
        group_size = k // scales.shape[0]
        g_idx = default_g_idx(k, group_size, qweight.device) if g_idx is None else g_idx.to(torch.int32).contiguous()
        validate_packed(qweight, qzeros, scales, g_idx, None)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]):
            raise ValueError(f"g_idx holds groups outside [0, {scales.shape[0]}): wrongly packed checkpoint")
        self.in_features, self.out_features, self.group_size = k, qweight.shape[1], group_size
        self.zero_offset = zero_offset
        # a trivial g_idx (no act-order, or static groups) takes the contiguous-group fast path
        self.act_order = not torch.equal(g_idx, default_g_idx(k, group_size, g_idx.device))
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_packed(cls, qweight, qzeros, scales, g_idx=None, bias=None, zero_offset: int = 1) -> "QuantLinear":
        return cls(qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx, bias, zero_offset)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> "QuantLinear":
        qweight, qzeros, scales, g_idx = rtn_gptq(linear.weight.detach(), group_size)
        return cls(qweight, qzeros, scales.to(linear.weight.device), g_idx, linear.bias)

    @classmethod
    def from_gptq(cls, linear: nn.Linear, result) -> "QuantLinear":
        """From gptq.gptq_quantize_weight's result (codes, scales, zeros, g_idx in original column order)."""
        packed = pack_gptq(result.codes, result.zeros, result.scales, result.g_idx)
        return cls(*(t.to(linear.weight.device) for t in packed), linear.bias)

    @classmethod
    def from_stored(cls, stored) -> "QuantLinear":
        """From the package's storage module (quant.QuantLinear, what cl.quantize leaves in the model): its 4-bit
        codes, zeros, fp16 scales and g_idx, packed in GPTQ's layout for the kernel. Nothing is re-quantized."""
        if stored.bits != 4:
            raise ValueError(f"the W4A16 kernel runs 4-bit weights; this layer stores {stored.bits}-bit codes")
        g_idx = getattr(stored, "g_idx", None)
        if g_idx is None:
            g_idx = default_g_idx(stored.in_features, stored.group_size, stored.qweight.device)
        packed = pack_gptq(stored.codes(), stored.zeros, stored.scales, g_idx)
        return cls(*packed, stored.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) float32: the reference the kernel is tested against."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, zero_offset=self.zero_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_idx = self.g_idx if self.act_order else None
        return w4a16_matmul(x, self.qweight, self.qzeros, self.scales, g_idx, self.group_size, self.bias,
                            self.zero_offset)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, act_order={self.act_order}"

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.qweight, self.qzeros, self.scales, self.g_idx))


# ----------------------------------------------------------------------------- whole models


DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE, report: dict | None = None) -> nn.Module:
    """Swap every decoder Linear for a QuantLinear, in place. A model that cl.quantize already quantized at 4 bits
    (its decoder Linears are quant.QuantLinear) keeps its codes and scales, packed for the kernel; a float model is
    rounded to nearest at group_size, or takes lab 02's GPTQ `report` ({module name: GPTQResult}, from
    gptq.quantize_model). The model should be float16 (or bfloat16 on a GPU)."""
    from ..quant import QuantLinear as Stored  # the package's storage module (what cl.quantize leaves)

    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, Stored)) and n.rsplit(".", 1)[-1] in DECODER_LINEARS]
    if not names:
        raise ValueError("no decoder Linear layers (q/k/v/o/gate/up/down_proj) found to quantize")
    for name in names:
        linear = model.get_submodule(name)
        if isinstance(linear, Stored):
            _set_module(model, name, QuantLinear.from_stored(linear))
        elif report is not None:
            if name not in report:
                raise KeyError(f"{name} has no GPTQ result in the report; pass the report of this model")
            _set_module(model, name, QuantLinear.from_gptq(linear, report[name]))
        else:
            _set_module(model, name, QuantLinear.from_linear(linear, group_size))
    return model


def load_quantized(path, dtype=torch.float16, device: str | None = None):
    """Load lab 02's GPTQ export with every packed Linear as a QuantLinear (the kernel, not a float copy).

    -> (model, tokenizer). checkpoint.load_gptq is the independent float reader the tests compare against.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} is not a model export (needs config.json and model.safetensors); "
                                "write one with compresslab.checkpoint.save_gptq (lab 02)")
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "gptq" or qcfg.get("bits") != 4:
        raise ValueError(f"{path}: the W4A16 kernel needs a 4-bit GPTQ checkpoint, got quant_method="
                         f"{qcfg.get('quant_method')!r}, bits={qcfg.get('bits')!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    zero_offset = 0 if qcfg.get("checkpoint_format") == "gptq_v2" else 1
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_file(str(path / "model.safetensors"))
    modules = [key[: -len(".qweight")] for key in tensors if key.endswith(".qweight")]
    for name in modules:
        bias = tensors.get(f"{name}.bias")
        layer = QuantLinear.from_packed(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"],
                                        tensors[f"{name}.scales"], tensors[f"{name}.g_idx"],
                                        None if bias is None else bias.to(dtype), zero_offset)
        _set_module(model, name, layer)
    rest = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))
            and k.rsplit(".", 1)[0] not in modules}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in modules
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model.to(device=device, dtype=dtype).eval(), tok


def bytes_moved(m: int, n: int, k: int, group_size: int, act_bytes: int = 2, g_idx: bool = False) -> int:
    """Bytes one call must move at least: packed codes + scales + zeros (+ g_idx) + activations in and out."""
    groups = math.ceil(k / group_size)
    return k * n // 2 + groups * n * 2 + groups * n // 2 + (4 * k if g_idx else 0) + act_bytes * m * (k + n)
