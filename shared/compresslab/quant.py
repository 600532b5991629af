"""Quantization primitives, top to bottom (lab 01 teaches them; GPTQ, the KV cache and the kernels reuse them).

    scale, zero = compute_qparams(w.view(-1, 64), bits=4)        # per group of 64: (n_groups, 1) each
    w_hat = fake_quantize(w, bits=4, group_size=64)               # quantize + dequantize, same shape as w
    qmodel = quantize_model(model, bits=4, group_size=64)         # Linear -> QuantLinear (packed storage)

Conventions (the same as GPTQ's reference quantizer):
  asymmetric: codes 0 .. 2^b-1, range [min(x, 0), max(x, 0)], scale = range / (2^b - 1), zero = round(-xmin / scale)
  symmetric:  codes -2^(b-1) .. 2^(b-1)-1, scale = absmax / (2^(b-1) - 1), zero = 0
  x_hat = (q - zero) * scale
Granularity is the group along the last dim (in_features of a Linear weight (out, in)):
  group_size=g (int, divides in_features) | "channel" (= -1, one group per output row) | "tensor".
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import packing

# one default group size everywhere (cl.quantize's configs, the W4A16 kernel): SmolLM2-135M's hidden size 576 is not
# divisible by 128, the group most 7B checkpoints use
DEFAULT_GROUP_SIZE = 64

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
EPS = 1e-8  # smallest scale: an all-zero group must not divide by zero

# ----------------------------------------------------------------------------- argument checks


def validate_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}. (16 bits is a dtype cast: "
                         "use model.to(torch.bfloat16); 1-bit needs a binarization method, not RTN.)")
    return bits


def validate_float(x: torch.Tensor, what: str = "tensor") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point (float32/bfloat16/float16), got {x.dtype}. "
                        "Dequantize integer codes first, or call .float().")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def group_view(w: torch.Tensor, group_size) -> torch.Tensor:
    """Reshape w (..., in_features) so each row is one quantization group -> (n_groups, group_len)."""
    if group_size == "tensor":
        return w.reshape(1, -1)
    if group_size in ("channel", -1):
        return w.reshape(-1, w.shape[-1])
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, -1/'channel' or 'tensor', got {group_size!r}")
    n = w.shape[-1]
    if n % group_size:
        ok = [d for d in divisors(n) if 16 <= d <= 256] or divisors(n)
        raise ValueError(f"group_size={group_size} does not divide in_features={n}. Use a divisor of {n}, "
                         f"e.g. one of {ok} (SmolLM2-135M: hidden 576 = 9 x 64, so 64 is the default there).")
    return w.reshape(-1, group_size)


def linear_in_features(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> set[int]:
    """The distinct in_features of the Linear layers a quantizer would touch."""
    return {m.in_features for _, _, _, m in _decoder_linears(model, skip)}


def group_size_fits(model: nn.Module, group_size) -> bool:
    """True if group_size divides the in_features of every quantized Linear (or is 'channel'/'tensor'/-1)."""
    if group_size in ("channel", "tensor", -1):
        return True
    return all(n % group_size == 0 for n in linear_in_features(model))


# ----------------------------------------------------------------------------- scale and zero point


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    """Integer code range: asym [0, 2^b - 1], sym [-2^(b-1), 2^(b-1) - 1]."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def compute_qparams(x: torch.Tensor, bits: int = 4, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of x (n_groups, group_len) -> ((n_groups, 1), (n_groups, 1)), float32."""
    validate_bits(bits)
    validate_float(x, "x")
    x = x.float()
    if sym:
        absmax = x.abs().amax(dim=-1, keepdim=True)  # (n_groups, 1)
        scale = (absmax / (2 ** (bits - 1) - 1)).clamp(min=EPS)
        return scale, torch.zeros_like(scale)
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)  # range always contains 0, so 0 is exact
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((xmax - xmin) / (2**bits - 1)).clamp(min=EPS)  # (n_groups, 1)
    zero = torch.round(-xmin / scale)  # an integer code in [0, 2^b - 1]
    return scale, zero


def search_clip_qparams(x: torch.Tensor, bits: int = 4, grid: int = 100, maxshrink: float = 0.8,
                        norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric qparams per row with the range shrunk to minimise sum |x_hat - x|^norm (GPTQ's `mse` option).

    Tries ranges p * [xmin, xmax] for p = 1, 0.99, ..., 1 - maxshrink: clipping a few large values buys a finer
    step for all the others. Returns ((n_groups, 1), (n_groups, 1)) like compute_qparams.
    """
    validate_float(x, "x")
    x = x.float()
    maxq = 2**bits - 1
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)  # (n_groups, 1)
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    best = torch.full_like(xmin, float("inf"))
    scale, zero = compute_qparams(x, bits, sym=False)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s = ((p * xmax - p * xmin) / maxq).clamp(min=EPS)
        z = torch.round(-p * xmin / s)
        err = ((torch.clamp(torch.round(x / s) + z, 0, maxq) - z) * s - x).abs().pow(norm).sum(dim=-1, keepdim=True)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


# ----------------------------------------------------------------------------- quantize / dequantize


def gptq_qparams(w: torch.Tensor, bits: int, sym: bool, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference GPTQ quantizer: per row of w (out, g), range forced to include 0, unsigned codes 0..2^b-1.

    asym: scale = (xmax - xmin) / maxq, zero = round(-xmin / scale);  sym: range [-absmax, absmax], zero = (maxq+1)/2.
    clip=True (asym only) shrinks the range to minimise the group's error (the reference quantizer's `mse` option).
    Scales are rounded to float16, the precision a checkpoint stores, so the exported model equals the in-memory one.
    It lives here, beside lab 01's quantizer it extends, so that the kernels' and checkpoints' code needs no GPTQ.
    Note its symmetric convention (unsigned codes around zero = 2^(b-1), GPTQ's and the checkpoints') differs from
    compute_qparams' (signed codes, zero 0, scale absmax / (2^(b-1) - 1), lab 01's).
    """
    maxq = 2**bits - 1
    if sym and clip:
        raise ValueError("clip=True searches an asymmetric range; use sym=False with it")
    if sym:
        absmax = w.float().abs().amax(dim=-1, keepdim=True)  # (out, 1)
        scale, zero = (2 * absmax / maxq).clamp(min=1e-8), torch.full_like(absmax, (maxq + 1) / 2)
    else:
        # lab 01's asymmetric quantizer is exactly GPTQ's; the clip search shrinks its range
        scale, zero = search_clip_qparams(w, bits) if clip else compute_qparams(w, bits, sym=False)
    return scale.clamp(min=2**-24).half().float(), zero  # checkpoints store fp16 scales: quantize against them


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4, sym: bool = False) -> torch.Tensor:
    """Integer codes, round-to-nearest then clamp to the code range. Same shape as x, dtype int16."""
    qmin, qmax = qrange(bits, sym)
    q = torch.clamp(torch.round(x.float() / scale) + zero, qmin, qmax)
    return q.to(torch.int16)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x_hat = (q - zero) * scale, float32."""
    return (q.float() - zero) * scale


def fake_quantize(w: torch.Tensor, bits: int = 4, group_size=64, sym: bool = False, clip: bool = False) -> torch.Tensor:
    """Quantize and dequantize w group by group along its last dim; returns w's shape and dtype.

    clip=True searches each group's range for the lowest error (asymmetric only; see search_clip_qparams).
    """
    validate_bits(bits)
    validate_float(w, "w")
    if clip and sym:
        raise ValueError("clip=True searches an asymmetric range; use sym=False with it")
    groups = group_view(w, group_size)  # (n_groups, group_len)
    scale, zero = search_clip_qparams(groups, bits) if clip else compute_qparams(groups, bits, sym)
    w_hat = dequantize(quantize(groups, scale, zero, bits, sym), scale, zero)
    return w_hat.reshape(w.shape).to(w.dtype)


# ----------------------------------------------------------------------------- bit packing


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (..., n) with 8 // bits codes per byte, lowest bits first -> (..., n * bits / 8) uint8.

    bits must divide 8 (2, 4, 8). Code i of a byte sits at bit offset i * bits (int4: element 2k in the low nibble).
    The package's one packer (compresslab.packing) does the work.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_bits packs 2-, 4- or 8-bit codes; got bits={bits} (3-bit codes are stored one per byte)")
    return packing.pack(q, bits)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_bits: (..., m) uint8 -> (..., m * 8 / bits) uint8 codes."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    return packing.unpack(packed, bits)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: element 2k in the low nibble, 2k+1 in the high nibble. (..., n) -> (..., n/2)."""
    return pack_bits(q, 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., m) uint8 -> (..., 2m) codes in [0, 15]."""
    return unpack_bits(packed, 4)


# ----------------------------------------------------------------------------- a quantized Linear


class QuantLinear(nn.Module):
    """A Linear whose buffers are the storage format: packed codes, float16 scales, uint8 zeros.

    qweight (out, in * bits / 8) uint8 for bits in {2, 4, 8}, (out, in) uint8 otherwise;
    scales, zeros (out, in / group_size). forward() dequantizes and calls F.linear (the reference path;
    the Triton W4A16 kernel replaces it on GPU).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool, bias: bool):
        super().__init__()
        if group_size == "tensor":
            raise ValueError("QuantLinear stores one scale per group of each row: use an int group_size or "
                             "'channel'. group_size='tensor' is for fake_quantize only.")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sym = bits, sym
        self.group_size = in_features if group_size in ("channel", -1) else group_size
        per_byte = 8 // bits if bits in (2, 4, 8) else 1
        n_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // per_byte, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size=64, sym: bool = False) -> "QuantLinear":
        w = linear.weight.detach()  # (out, in)
        validate_bits(bits)
        groups = group_view(w, group_size)  # (out * n_groups, g)
        scale, zero = compute_qparams(groups, bits, sym)
        scale = scale.half().float().clamp(min=6e-8)  # what we store is float16: quantize against it
        q = quantize(groups, scale, zero, bits, sym)  # (out * n_groups, g)
        if sym:  # store unsigned codes; the offset becomes the zero point
            q, zero = q + 2 ** (bits - 1), zero + 2 ** (bits - 1)
        m = cls(w.shape[1], w.shape[0], bits, group_size, sym, linear.bias is not None).to(w.device)
        codes = q.reshape(w.shape).to(torch.uint8)  # (out, in)
        m.qweight.copy_(pack_bits(codes, bits) if bits in (2, 4, 8) else codes)
        m.scales.copy_(scale.reshape(w.shape[0], -1).half())
        m.zeros.copy_(zero.reshape(w.shape[0], -1).to(torch.uint8))
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())  # keeps the layer's dtype
        return m

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int, group_size: int,
                   sym: bool, g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> "QuantLinear":
        """A QuantLinear holding codes that an algorithm already chose (GPTQ, AWQ): codes (out, in) in
        [0, 2^bits - 1], scales and zeros (out, n_groups) (scales fp16-exact: they are stored as float16),
        g_idx (in,) the group of each column when it is not column // group_size (GPTQ's act-order, dynamic groups)."""
        validate_bits(bits)
        out_f, in_f = codes.shape
        if codes.min() < 0 or codes.max() > 2**bits - 1:
            raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit storage")
        m = cls(in_f, out_f, bits, group_size, sym, bias is not None).to(codes.device)
        if scales.shape != m.scales.shape or zeros.shape != m.zeros.shape:
            raise ValueError(f"scales/zeros must be {tuple(m.scales.shape)} for a ({out_f}, {in_f}) weight at "
                             f"group_size={group_size}; got {tuple(scales.shape)} / {tuple(zeros.shape)}")
        codes = codes.to(torch.uint8)
        m.qweight.copy_(pack_bits(codes, bits) if bits in (2, 4, 8) else codes)
        m.scales.copy_(scales.half())
        m.zeros.copy_(zeros.to(torch.uint8))
        if g_idx is not None and not torch.equal(g_idx.cpu().long(), torch.arange(in_f) // m.group_size):
            m.register_buffer("g_idx", g_idx.to(torch.int32).clone())  # only when it is not the trivial order
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone())
        return m

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes, unpacked."""
        return unpack_bits(self.qweight, self.bits) if self.bits in (2, 4, 8) else self.qweight

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        codes = self.codes()  # (out, in)
        g_idx = getattr(self, "g_idx", None)
        if g_idx is not None:  # act-order groups: column j belongs to group g_idx[j]
            g = g_idx.long()
            w = (codes.float() - self.zeros.float()[:, g]) * self.scales.float()[:, g]
            return w.to(dtype)
        codes = codes.reshape(self.out_features, -1, self.group_size)  # (out, n_groups, g)
        w = (codes.float() - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, sym={self.sym}"


# ----------------------------------------------------------------------------- whole models


def _decoder_linears(model: nn.Module, skip: tuple[str, ...]):
    """(parent, attr, name, Linear) for every nn.Linear except those whose name contains a skip pattern."""
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, nn.Linear) and not any(s in full for s in skip):
                yield module, attr, full, child


def fake_quantize_model(model: nn.Module, bits: int = 4, group_size=64, sym: bool = False, clip: bool = False,
                        skip: tuple[str, ...] = ("lm_head",), inplace: bool = False) -> nn.Module:
    """Round-to-nearest fake quantization of every Linear weight (embeddings and lm_head stay full precision).

    Returns a copy unless inplace=True. Weights keep their dtype; only their values move onto the grid.
    """
    validate_bits(bits)
    model = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for _, _, _, linear in _decoder_linears(model, skip):
            linear.weight.copy_(fake_quantize(linear.weight, bits, group_size, sym, clip))
    return model


def quantize_model(model: nn.Module, bits: int = 4, group_size=64, sym: bool = False,
                   skip: tuple[str, ...] = ("lm_head",), inplace: bool = False) -> nn.Module:
    """Swap every Linear (but lm_head) for a QuantLinear holding packed codes: real memory saved."""
    validate_bits(bits)
    model = model if inplace else copy.deepcopy(model)
    for parent, attr, _, linear in _decoder_linears(model, skip):
        setattr(parent, attr, QuantLinear.from_linear(linear, bits, group_size, sym))
    return model
