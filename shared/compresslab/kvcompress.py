"""KV-cache compression, the maths: memory arithmetic, KIVI quantization, GEAR (quantization + low-rank + sparse),
and KVConfig, which says how a cache compresses. Plain torch, no transformers: the cache that stores this form inside
transformers' generate is compresslab.kvcache. (lab 06)

    kv_bytes_per_token(model.config)                           # layers x 2 x kv_heads x head_dim x 2 bytes (fp16)
    q = quantize_keys(k, bits=2, group_size=64)                # keys per channel: groups of 64 tokens
    g = gear_compress(k, "key", bits=2, rank=4, outlier_ratio=0.02)
    k_hat = g.reconstruct(); g.nbytes()                        # every part counted: codes, scales, outliers, factors
    KVConfig("gear").compress(k, "key", first=True)            # what the cache does to each full block

Shapes follow transformers' attention: keys and values are (batch, kv_heads, tokens, head_dim).

Conventions (KIVI, Liu et al. 2024; GEAR, Kang et al. 2024):
  * asymmetric quantization with the group minimum as the zero point: x_hat = code * scale + min, codes 0 .. 2^b - 1,
    scale and min stored in fp16; codes packed 8 // b per byte (the storage format: kvformat).
  * keys are quantized **per channel** (a group is `group_size` consecutive tokens of one channel: key outliers live in
    fixed channels), values **per token** (a group is `group_size` consecutive channels of one token).
  * GEAR: S = the largest and smallest `outlier_ratio / 2` of each vector (a channel's tokens for keys, a token's
    channels for values) kept exactly in fp16 with their positions; D = quantization of the rest (outliers clamped to
    the largest inlier so they do not stretch the range); L = a rank-r approximation of X - D, per head, by power
    iteration. X_hat = D + L, then S written over its positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kvformat import (STORE, QuantizedGroups, kind_dim, quantize_groups_torch, tensor_nbytes, validate_group,
                       validate_kv_bits)

METHODS = ("fp16", "kivi", "gear_l", "gear")

# ----------------------------------------------------------------------------- memory arithmetic


def attention_dims(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config (a transformers config, or anything with its attribute names:
    num_hidden_layers, num_attention_heads, hidden_size, optionally num_key_value_heads and head_dim)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def kv_bytes_per_token(config, bytes_per_element: float = 2) -> float:
    """Bytes one token adds to the cache: layers x 2 (K and V) x kv_heads x head_dim x bytes_per_element."""
    layers, kv_heads, head_dim = attention_dims(config)
    return layers * 2 * kv_heads * head_dim * bytes_per_element


def kv_cache_bytes(config, batch_size: int, context: int, bytes_per_element: float = 2) -> float:
    """Bytes of the whole cache for `batch_size` sequences of `context` tokens."""
    return batch_size * context * kv_bytes_per_token(config, bytes_per_element)


def plot_memory_vs_context(config, weight_bytes: int, contexts=None, batch_sizes=(1, 8, 64), bits: float = 16,
                           ax=None):
    """Weights (a flat line) against the KV cache as the context grows, for a few batch sizes."""
    import matplotlib.pyplot as plt

    contexts = contexts or [2**i for i in range(7, 16)]
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    ax.axhline(weight_bytes / 2**30, color="k", lw=2, label="weights (fp16)")
    for b in batch_sizes:
        ax.plot(contexts, [kv_cache_bytes(config, b, c, bits / 8) / 2**30 for c in contexts], marker="o", ms=3,
                label=f"KV cache, batch {b}")
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="GiB",
           title=f"KV cache ({kv_bytes_per_token(config, bits / 8) / 1024:.1f} KiB per token) vs weights")
    ax.legend(fontsize=8)
    return ax


# ----------------------------------------------------------------------------- argument checks


def validate_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"outlier_ratio must be a fraction in [0, 1), e.g. 0.02 for 2 %, got {ratio!r}")
    return float(ratio)


# ----------------------------------------------------------------------------- group quantization (KIVI)


def quantize_groups(x: torch.Tensor, bits: int, group_size: int, dim: int, backend: str = "torch") -> QuantizedGroups:
    """Asymmetric b-bit quantization of x in groups of `group_size` consecutive elements along `dim` (the storage
    format and its PyTorch reference live in kvformat).

    backend="triton" runs the fused kernel (compresslab.kernels.kv_quant; keys or values of 4-D states only) and
    returns the same codes, scales and minima; kvformat.quantize_groups_torch is its reference.
    """
    if backend == "triton":
        if x.dim() != 4 or dim % 4 not in (2, 3):
            raise ValueError("the Triton KV kernel quantizes (batch, heads, tokens, head_dim) states along tokens "
                             "(dim=-2, keys) or channels (dim=-1, values); use backend='torch' otherwise")
        from .kernels.kv_quant import quantize_kv
        q = quantize_kv(x, "key" if dim % 4 == 2 else "value", bits, group_size)
        q.backend = "triton"
        return q
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    return quantize_groups_torch(x, bits, group_size, dim)


def quantize_keys(k: torch.Tensor, bits: int = 2, group_size: int = 64) -> QuantizedGroups:
    """Keys (b, h, t, d) per channel: each group is `group_size` consecutive tokens of one channel."""
    return quantize_groups(k, bits, group_size, dim=-2)


def quantize_values(v: torch.Tensor, bits: int = 2, group_size: int = 64) -> QuantizedGroups:
    """Values (b, h, t, d) per token: each group is `group_size` consecutive channels of one token."""
    return quantize_groups(v, bits, group_size, dim=-1)


def fake_quantize_kv(x: torch.Tensor, kind: str, bits: int = 2, group_size: int = 64) -> torch.Tensor:
    """Quantize then dequantize keys ("key": per channel) or values ("value": per token); same shape and dtype."""
    q = quantize_groups(x, bits, group_size, dim=kind_dim(kind))
    return q.dequantize(torch.float32).to(x.dtype)



# ----------------------------------------------------------------------------- S: outliers


def outliers_per_side(n: int, ratio: float) -> int:
    """How many of the largest (and as many of the smallest) of n elements are outliers at `ratio` in total."""
    return 0 if ratio == 0 else max(1, int(ratio * n / 2 + 0.5))


def outlier_share(n: int, ratio: float) -> float:
    """The share of n entries kept as outliers at `ratio`: 2 * outliers_per_side / n. At least one per side, so
    ratio 0.02 of a 64-entry vector keeps 1 + 1 = 3.125 %, not 2 % (and 1.95 % of a 512-token key block)."""
    return 2 * outliers_per_side(n, ratio) / n


def outlier_mask(x: torch.Tensor, ratio: float, dim: int) -> torch.Tensor:
    """Bool mask of the k largest and k smallest entries of every vector along `dim`, k = outliers_per_side."""
    validate_ratio(ratio)
    k = outliers_per_side(x.shape[dim], ratio)
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k:
        mask.scatter_(dim, x.topk(k, dim=dim).indices, True)
        mask.scatter_(dim, x.topk(k, dim=dim, largest=False).indices, True)
    return mask


@dataclass
class Outliers:
    """The sparse part: 2k exact values per vector along `dim`, with their positions (dim moved last)."""

    values: torch.Tensor  # (..., 2k) fp16
    index: torch.Tensor  # (..., 2k) uint8 / int16 / int32: the smallest type that holds a position
    dim: int

    def write_into(self, x: torch.Tensor) -> torch.Tensor:
        """x with the outlier positions overwritten by their exact values."""
        x = x.movedim(self.dim, -1).clone()
        x.scatter_(-1, self.index.long(), self.values.to(x.dtype))
        return x.movedim(-1, self.dim)

    def nbytes(self) -> dict[str, int]:
        return {"outlier values": tensor_nbytes(self.values), "outlier indices": tensor_nbytes(self.index)}


def _index_dtype(n: int) -> torch.dtype:
    return torch.uint8 if n <= 256 else torch.int16 if n <= 2**15 else torch.int32


def index_bytes(n: int) -> int:
    """Bytes of one stored outlier position in a vector of n entries (the smallest integer type that holds it)."""
    return torch.empty(0, dtype=_index_dtype(n)).element_size()


def split_outliers(x: torch.Tensor, ratio: float, dim: int) -> tuple[Outliers, torch.Tensor]:
    """(S, x clamped to its inlier range along dim). The clamp keeps outliers from stretching the quantizer's range."""
    k = outliers_per_side(x.shape[dim], validate_ratio(ratio))
    xm = x.movedim(dim, -1)  # (..., n)
    top, bottom = xm.topk(k + 1, dim=-1), xm.topk(k + 1, dim=-1, largest=False)
    index = torch.cat([top.indices[..., :k], bottom.indices[..., :k]], -1)  # (..., 2k)
    values = torch.cat([top.values[..., :k], bottom.values[..., :k]], -1)
    clamped = torch.minimum(torch.maximum(xm, bottom.values[..., k:]), top.values[..., k:])  # largest/smallest inlier
    S = Outliers(values.to(STORE), index.to(_index_dtype(x.shape[dim])), dim % x.dim())
    return S, clamped.movedim(-1, dim)


# ----------------------------------------------------------------------------- L: low rank by power iteration


def power_iteration(R: torch.Tensor, Q: torch.Tensor, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Subspace iteration: `iters` rounds of P = orth(R Q), Q = R^T P from the start Q (d, r) or (..., d, r).
    R (..., n, d) ~ P @ Q^T with P (..., n, r) orthonormal, Q (..., d, r); the product is the projection of R onto
    the span of P, so it does not depend on how the QR picks its signs."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1 (rounds of power iteration; GEAR uses 3), got {iters!r}")
    for _ in range(iters):
        P = torch.linalg.qr(R @ Q).Q  # (..., n, r) orthonormal columns
        Q = R.mT @ P  # (..., d, r)
    return P, Q


def lowrank_power_iteration(R: torch.Tensor, rank: int, iters: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """R (..., n, d) ~ P @ Q^T, rank r, from a seeded Gaussian start (GEAR: 3 rounds of power iteration)."""
    n, d = R.shape[-2:]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(n, d):
        raise ValueError(f"rank must be an int in [1, min(tokens, head_dim)] = [1, {min(n, d)}] for a {n} x {d} "
                         f"matrix, got {rank!r}. Use rank=0 in KVConfig to turn the low-rank part off.")
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q0 = torch.randn(d, rank, generator=g).to(R.device, R.dtype)  # (d, r), broadcast over the leading dims
    return power_iteration(R, Q0, iters)


# ----------------------------------------------------------------------------- GEAR = D + L + S


@dataclass
class GearCompressed:
    """One block of keys or values (b, h, t, d) in compressed form: D (+ L) (+ S)."""

    D: QuantizedGroups
    S: Outliers | None
    L: tuple[torch.Tensor, torch.Tensor] | None  # (P (b, h, t, r), Q (b, h, d, r)) in fp16

    def reconstruct(self, dtype=torch.float32) -> torch.Tensor:
        x = self.D.dequantize(dtype)
        if self.L is not None:
            P, Q = self.L
            x = x + P.to(dtype) @ Q.to(dtype).mT
        return self.S.write_into(x) if self.S is not None else x

    def nbytes(self) -> dict[str, int]:
        parts = self.D.nbytes()
        if self.S is not None:
            parts.update(self.S.nbytes())
        if self.L is not None:
            parts["low-rank factors"] = tensor_nbytes(self.L[0]) + tensor_nbytes(self.L[1])
        return parts


def gear_compress(x: torch.Tensor, kind: str, bits: int = 2, group_size: int = 64, rank: int = 4,
                  outlier_ratio: float = 0.02, iters: int = 3, seed: int = 0, backend: str = "torch") -> GearCompressed:
    """Compress keys or values x (b, h, t, d). rank=0 and outlier_ratio=0 give plain KIVI; outlier_ratio=0 is GEAR-L."""
    if x.dim() != 4:
        raise ValueError(f"expected KV states of shape (batch, kv_heads, tokens, head_dim), got {tuple(x.shape)}")
    dim = kind_dim(kind)
    S, inliers = (None, x) if validate_ratio(outlier_ratio) == 0 else split_outliers(x, outlier_ratio, dim)
    D = quantize_groups(inliers, bits, group_size, dim, backend)
    L = None
    if rank:
        R = x.float() - D.dequantize(torch.float32)  # (b, h, t, d) the quantization error, per head
        if S is not None:
            R = _zero_at(R, S)  # S is exact at its positions: nothing left to fit there
        P, Q = lowrank_power_iteration(R, rank, iters, seed)
        L = (P.to(STORE), Q.to(STORE))
    return GearCompressed(D, S, L)


def _zero_at(R: torch.Tensor, S: Outliers) -> torch.Tensor:
    Rm = R.movedim(S.dim, -1).clone()
    Rm.scatter_(-1, S.index.long(), 0.0)
    return Rm.movedim(-1, S.dim)


def gear_nbytes(tokens: int, head_dim: int, bits: int, group_size: int, rank: int, n_outliers: int,
                index_bytes: int = 2) -> int:
    """Bytes of one head's compressed block (tokens x head_dim), every part counted (the lab's exercise 4):
    packed codes + an fp16 scale and fp16 minimum per group + n_outliers fp16 values and their positions
    (index_bytes each) + both fp16 low-rank factors, P (tokens x rank) and Q (head_dim x rank)."""
    codes = tokens * head_dim * bits // 8
    scales = 2 * 2 * (tokens * head_dim // group_size)
    sparse = n_outliers * (2 + index_bytes)
    lowrank = 2 * rank * (tokens + head_dim)
    return codes + scales + sparse + lowrank


# ----------------------------------------------------------------------------- KVConfig: how a cache compresses


@dataclass(frozen=True)
class KVConfig:
    """How a cache compresses. method: fp16 (no compression) | kivi (D) | gear_l (D + L) | gear (D + L + S)."""

    method: str = "gear"
    bits: int = 2
    group_size: int = 64
    rank: int = 4  # low-rank of the first (prefill) block; GEAR uses 4
    rank_decode: int = 2  # low-rank of each later 64-token block; GEAR uses 2
    outlier_ratio: float = 0.02
    residual_length: int = 64  # fp16 streaming buffer; compressed as a block when it fills
    iters: int = 3
    key_bits: int | None = None  # keys at other bits than values (None: `bits` for both)
    backend: str = "auto"  # quantize with "torch" or the fused "triton" kernel; "auto": triton for CUDA states

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        validate_kv_bits(self.bits)
        if self.key_bits is not None:
            validate_kv_bits(self.key_bits)
        validate_ratio(self.outlier_ratio)
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")
        validate_group(self.residual_length, self.group_size, "residual_length (keys are grouped along tokens, so the "
                     "fp16 buffer must hold whole groups)")
        for name, low in (("rank", 0), ("rank_decode", 0), ("iters", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")

    @property
    def label(self) -> str:
        if self.method == "fp16":
            return "fp16"
        bits = f"K{self.key_bits}V{self.bits}" if self.key_bits not in (None, self.bits) else f"{self.bits}b"
        label = f"{self.method} {bits} g{self.group_size}"
        if self.method in ("gear_l", "gear"):
            label += f" r{self.rank}/{self.rank_decode}"
        if self.method == "gear":
            label += f" s{self.outlier_ratio:.0%}"
        return label

    def compress(self, x: torch.Tensor, kind: str, first: bool) -> GearCompressed:
        """One full block of keys or values (b, h, t, d) in this config's form: the first (prefill) block at `rank`,
        every later one at `rank_decode`; the low-rank part only for gear_l and gear, the outliers only for gear."""
        rank = (self.rank if first else self.rank_decode) if self.method in ("gear_l", "gear") else 0
        ratio = self.outlier_ratio if self.method == "gear" else 0.0
        bits = self.key_bits if kind == "key" and self.key_bits is not None else self.bits
        backend = self.backend
        if backend == "auto":
            pow2 = self.group_size & (self.group_size - 1) == 0  # the kernel's tiles are powers of two
            backend = "triton" if x.is_cuda and pow2 and _triton_importable() else "torch"
        return gear_compress(x, kind, bits, self.group_size, min(rank, *x.shape[-2:]), ratio, self.iters,
                             backend=backend)


def _triton_importable() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None

