"""KV-cache compression, top to bottom: memory arithmetic, KIVI quantization, GEAR (quantization + low-rank + sparse),
and a transformers cache that really stores the compressed form.

    kv_bytes_per_token(model.config)                           # layers x 2 x kv_heads x head_dim x 2 bytes (fp16)
    q = quantize_keys(k, bits=2, group_size=64)                # keys per channel: groups of 64 tokens
    g = gear_compress(k, "key", bits=2, rank=4, outlier_ratio=0.02)
    k_hat = g.reconstruct(); g.nbytes()                        # every part counted: codes, scales, outliers, factors
    cache = make_cache(model, KVConfig("gear"))                # a transformers Cache; model.generate(past_key_values=cache)
    kv_perplexity(model, tok, KVConfig("kivi", bits=2))        # prefill a prefix, score the rest against the cache

Shapes follow transformers' attention: keys and values are (batch, kv_heads, tokens, head_dim).

Conventions (KIVI, Liu et al. 2024; GEAR, Kang et al. 2024):
  * asymmetric quantization with the group minimum as the zero point: x_hat = code * scale + min, codes 0 .. 2^b - 1,
    scale and min stored in fp16; codes packed 8 // b per byte.
  * keys are quantized **per channel** (a group is `group_size` consecutive tokens of one channel: key outliers live in
    fixed channels), values **per token** (a group is `group_size` consecutive channels of one token).
  * GEAR: S = the largest and smallest `outlier_ratio / 2` of each vector (a channel's tokens for keys, a token's
    channels for values) kept exactly in fp16 with their positions; D = quantization of the rest (outliers clamped to
    the largest inlier so they do not stretch the range); L = a rank-r approximation of X - D, per head, by power
    iteration. X_hat = D + L, then S written over its positions.
  * the cache keeps the newest tokens in fp16 (a streaming buffer of `residual_length` tokens) and compresses them as
    one block whenever the buffer fills; the tokens of the current forward pass always attend in full precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .kvformat import (KV_BITS, STORE, QuantizedGroups, validate_group, validate_kv_bits, kind_dim,  # noqa: F401
                       attention_error, pack_codes, quantize_groups_torch, tensor_nbytes, unpack_codes)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoder-only, full attention, RoPE'd K/V per head
METHODS = ("fp16", "kivi", "gear_l", "gear")

# ----------------------------------------------------------------------------- memory arithmetic


def _attention_dims(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def kv_bytes_per_token(config, bytes_per_element: float = 2) -> float:
    """Bytes one token adds to the cache: layers x 2 (K and V) x kv_heads x head_dim x bytes_per_element."""
    layers, kv_heads, head_dim = _attention_dims(config)
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


# ----------------------------------------------------------------------------- what a layout costs attention


@torch.no_grad()
def layer_qkv(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values one attention layer sees for ids (1, t), after RoPE, as its attention computes:
    q (1, heads, t, d), k and v (1, kv_heads, t, d), float32. (lab 06: judge a cache layout by the attention.)"""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    validate_model_supported(model)
    attn = model.model.layers[layer].self_attn
    seen = {}
    hook = attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", o.detach()))
    try:
        cache = model(ids, use_cache=True).past_key_values
    finally:
        hook.remove()
    b, t, _ = seen["q"].shape
    q = seen["q"].view(b, t, -1, attn.head_dim).transpose(1, 2)  # (b, heads, t, d), before RoPE
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q per head before RoPE
        q = attn.q_norm(q)
    positions = torch.arange(t, device=ids.device)[None]  # (1, t)
    cos, sin = model.model.rotary_emb(q, positions)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k, v = cache.layers[layer].keys, cache.layers[layer].values  # (b, kv_heads, t, d), RoPE already applied
    return q.float(), k.float(), v.float()


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


# ----------------------------------------------------------------------------- the cache


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


class CompressedLayer(DynamicLayer):
    """One decoder layer's cache: compressed blocks of past tokens + an fp16 buffer of the newest ones.

    `update` returns the reconstructed past, the buffer and the new states (these in full precision), like
    transformers' own QuantizedLayer; unlike it, a block is compressed once and never re-quantized."""

    is_croppable = False  # generate() checks this before cropping (assisted decoding, deferred stop checks)

    def __init__(self, config: KVConfig):
        super().__init__()
        self.config = config
        self.cumulative_length = 0
        self.key_blocks: list[GearCompressed] = []
        self.value_blocks: list[GearCompressed] = []

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if self.config.method != "fp16":  # the fp16 cache groups nothing
            validate_group(d, self.config.group_size, "head_dim (values are grouped along channels)")
        self.keys = key_states.new_zeros((b, h, 0, d), dtype=STORE)  # the fp16 streaming buffer
        self.values = value_states.new_zeros((b, h, 0, d), dtype=STORE)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        dt = key_states.dtype
        past_k = [blk.reconstruct(dt) for blk in self.key_blocks] + [self.keys.to(dt)]
        past_v = [blk.reconstruct(dt) for blk in self.value_blocks] + [self.values.to(dt)]
        keys_out, values_out = torch.cat(past_k + [key_states], -2), torch.cat(past_v + [value_states], -2)

        self.keys = torch.cat([self.keys, key_states.to(STORE)], -2)
        self.values = torch.cat([self.values, value_states.to(STORE)], -2)
        R = self.config.residual_length
        n = (self.keys.shape[-2] // R) * R
        if self.config.method != "fp16" and n:
            first = not self.key_blocks
            self.key_blocks.append(self.config.compress(self.keys[..., :n, :].float(), "key", first))
            self.value_blocks.append(self.config.compress(self.values[..., :n, :].float(), "value", first))
            self.keys, self.values = self.keys[..., n:, :].clone(), self.values[..., n:, :].clone()
        return keys_out, values_out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def nbytes(self) -> dict[str, int]:
        parts = {"fp16 buffer": tensor_nbytes(self.keys) + tensor_nbytes(self.values)} if self.is_initialized else {}
        for blk in self.key_blocks + self.value_blocks:
            for name, b in blk.nbytes().items():
                parts[name] = parts.get(name, 0) + b
        return parts

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.key_blocks, self.value_blocks = [], []

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("the compressed KV cache supports greedy and sampled generation only: beam search, "
                                  "cropping and batch reordering would need every block re-laid out. Use num_beams=1.")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


def validate_model_supported(model) -> None:
    """The compressed cache assumes a decoder-only model with full attention in every layer and per-head K/V."""
    config = model.config.get_text_config(decoder=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the compressed KV cache supports {SUPPORTED_MODEL_TYPES} models (decoder-only, full "
                         f"attention); got model_type={config.model_type!r}. Load one of the lab's models "
                         "(compresslab.load_model), or use transformers' own DynamicCache for this one.")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None and getattr(config, "use_sliding_window", False):
        layer_types = ["sliding_attention"]
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        raise ValueError(f"the compressed KV cache needs full attention in every layer; this model has "
                         f"{sorted(set(layer_types))} (sliding-window layers keep a rolling cache).")


def make_cache(model, config: KVConfig | None = None) -> Cache:
    """A fresh cache for one generate() / forward: DynamicCache for config None, else a Cache of CompressedLayer."""
    if config is None:
        return DynamicCache(config=model.config)
    validate_model_supported(model)
    n_layers, _, head_dim = _attention_dims(model.config)
    if config.method != "fp16":  # the fp16 cache groups nothing
        validate_group(head_dim, config.group_size, "head_dim (values are grouped along channels)")
    return Cache(layers=[CompressedLayer(config) for _ in range(n_layers)])


def cache_nbytes(cache: Cache) -> dict[str, int]:
    """Measured bytes of every stored tensor of a cache, by part (a DynamicCache counts as one 'dense' part)."""
    parts: dict[str, int] = {}
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            items = layer.nbytes().items()
        elif getattr(layer, "_quantized_keys", None) is not None:  # transformers' QuantizedLayer
            items = [("quantized (backend)", _deep_nbytes(layer._quantized_keys) + _deep_nbytes(layer._quantized_values)),
                     ("fp buffer", _deep_nbytes(layer.keys) + _deep_nbytes(layer.values))]
        else:
            items = [("dense", _deep_nbytes(layer.keys) + _deep_nbytes(layer.values))]
        for name, b in items:
            parts[name] = parts.get(name, 0) + b
    return parts


def _deep_nbytes(obj) -> int:
    """Bytes of a tensor, a tensor subclass made of inner tensors (optimum-quanto), or a tuple/dict of them."""
    if obj is None:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(_deep_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_deep_nbytes(o) for o in obj.values())
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_deep_nbytes(getattr(obj, n)) for n in names)
        return tensor_nbytes(obj)
    return 0


def builtin_quantized_cache(model, bits: int = 4, group_size: int = 64, residual_length: int = 64,
                            axis_key: int = 0) -> Cache:
    """transformers' own QuantizedCache on the optimum-quanto backend (runs on CPU), for comparison.

    axis_key: transformers' default 0 gives keys a scale per token (groups along channels), the layout KIVI shows
    to be wrong for keys; -1 gives a scale per channel (groups along tokens), KIVI's. Either way the prompt is
    quantized at prefill with no fp16 residual (our cache keeps the newest partial block in fp16)."""
    from transformers.cache_utils import QuantizedCache

    if axis_key not in (0, -1):
        raise ValueError(f"axis_key must be 0 (transformers' default: per-token key scales) or -1 (per-channel, "
                         f"KIVI's layout); got {axis_key!r}")
    try:
        return QuantizedCache("quanto", model.config, nbits=bits, q_group_size=group_size,
                              residual_length=residual_length, axis_key=axis_key)
    except ImportError as err:
        raise ImportError(f"transformers' quantized cache needs optimum-quanto: pip install optimum-quanto ({err})")


# ----------------------------------------------------------------------------- evaluation through the cache


@torch.no_grad()
def kv_perplexity(model, tokenizer, config: KVConfig | None | str = None, n_windows: int = 4, prefix: int = 512,
                  scored: int = 512, chunk: int = 16, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity that goes through the compressed cache: prefill `prefix` tokens of each WikiText-2 test window,
    then feed the next `scored` tokens `chunk` at a time (teacher forcing) and score each chunk's next-token
    predictions. Every scored token attends to the compressed past. Returns ppl and the measured cache bytes.

    config None: DynamicCache (the reference); "builtin-4"/"builtin-2": transformers' quanto QuantizedCache."""
    from .data import test_windows

    windows = test_windows(tokenizer, n_windows, prefix + scored + 1)  # (n, prefix + scored + 1)
    device = next(model.parameters()).device
    nll, count, parts, stored_tokens = 0.0, 0, {}, 0
    steps = [(i, s) for i in range(0, n_windows, batch_size) for s in range(prefix, prefix + scored, chunk)]
    bar = tqdm(total=len(steps), desc=f"kv perplexity ({cache_label(config)})", disable=not progress, leave=False)
    for i in range(0, n_windows, batch_size):
        ids = windows[i : i + batch_size].to(device)  # (b, prefix + scored + 1)
        cache = new_cache(model, config)
        model(ids[:, :prefix], past_key_values=cache, use_cache=True)
        for s in range(prefix, prefix + scored, chunk):
            e = min(s + chunk, prefix + scored)
            logits = model(ids[:, s:e], past_key_values=cache, use_cache=True).logits.float()  # (b, e - s, V)
            nll += F.cross_entropy(logits.flatten(0, 1), ids[:, s + 1 : e + 1].flatten(), reduction="sum").item()
            count += ids[:, s + 1 : e + 1].numel()
            bar.update()
        for name, b in cache_nbytes(cache).items():
            parts[name] = parts.get(name, 0) + b
        stored_tokens += ids.shape[0] * cache.get_seq_length()
    bar.close()
    fp16 = stored_tokens * kv_bytes_per_token(model.config, 2)
    total = sum(parts.values())
    return {"method": cache_label(config), "ppl": math.exp(nll / count), "kv_bytes": total, "fp16_bytes": fp16,
            "ratio": total / fp16, "parts": parts, "context": prefix + scored, "prefix": prefix, "chunk": chunk}


def cache_label(config) -> str:
    return "fp (DynamicCache)" if config is None else config if isinstance(config, str) else config.label


def new_cache(model, config):
    """A fresh cache for a KVConfig, None (DynamicCache) or 'builtin-<bits>' (transformers' quanto cache, its
    default per-token key scales) / 'builtin-<bits>-channel' (axis_key=-1: per-channel key scales, KIVI's layout)."""
    if isinstance(config, str):
        parts = config.split("-")
        if parts[0] != "builtin" or len(parts) not in (2, 3) or not parts[1].isdigit() or parts[2:] not in ([],
                                                                                                          ["channel"]):
            raise ValueError(f"config must be a KVConfig, None, 'builtin-<bits>' or 'builtin-<bits>-channel', "
                             f"got {config!r}")
        return builtin_quantized_cache(model, bits=int(parts[1]), axis_key=-1 if parts[2:] else 0)
    return make_cache(model, config)


@torch.no_grad()
def generate_with(model, tokenizer, prompt: str, config: KVConfig | None | str = None, max_new_tokens: int = 40) -> str:
    """Greedy completion of one prompt through a fresh (compressed) cache."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, past_key_values=new_cache(model, config),
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
