"""Activation quantization, top to bottom: FP8/INT8 W8A8 and the microscaling formats (activation lab).

    x_hat = quantize_activation(x, "fp8", "token")              # dynamic: one scale per token (row), same shape
    x_hat = quantize_activation(x, "int8", "tensor", amax=3.2)  # static: a calibrated scalar, beyond it saturates
    codes, scale = quantize_weight(w, "fp8", "channel")          # float8_e4m3fn (out, in), float32 (out, 1)
    layer = ActQuantLinear.from_linear(linear, weight_fmt="int8", act_fmt="int8", act_granularity="token")
    apply(model, W8A8Config(fmt="fp8"))                          # every decoder Linear -> ActQuantLinear, in place
    apply(model, W8A8Config(fmt="int8", activations="tensor", smooth_alpha=0.5), calib)   # SmoothQuant + static
    apply(model, MXConfig(fmt="nvfp4"))                          # W4A4: weights and inputs in NVFP4
    apply(model, MXConfig(fmt="mxfp4", rotate=True))             # the same behind a random rotation (QuaRot's idea)

A W8A8 Linear multiplies 8-bit inputs by 8-bit weights (FP8 on Hopper/Ada, INT8 everywhere) and rescales the
accumulator by input scale x weight scale. Everything here is fake quantization (quantize then dequantize in the
input's dtype), which gives the same numbers as the integer/FP8 matmul up to the accumulation order.

Conventions (symmetric, no zero point):
  INT8: scale = amax / 127, x_hat = clamp(round(x / scale), -127, 127) * scale
  FP8:  scale = amax / 448, x_hat = e4m3(x / scale) * scale, e4m3 = saturating cast to float8_e4m3fn
Granularity of an activation x (..., in):
  "token"  dynamic, amax per row over the last dim (computed at run time: one scale per token);
  "tensor" static when amax is given (a scalar calibrated on sample data; values beyond it saturate),
           dynamic over the whole tensor when amax is None;
  "block"  the microscaling formats (nvfp4: 16 values per E4M3 scale, mxfp4/mxfp8: 32 per power-of-two scale),
           always dynamic, blocks along the last dim.
Weights (out, in): "channel" (one scale per output row) or "tensor".

Rotation (QuaRot / SpinQuant's idea, online form): for an orthogonal R (in, in), x W^T = (x R)(W R)^T exactly, and
x R spreads each loud channel over all the others. A rotated Linear quantizes W R once and x R at run time. QuaRot
folds most rotations into the neighbouring weights and norms and keeps a fast Hadamard transform online only where
it cannot (before down_proj); here every Linear rotates online with a seeded random orthogonal matrix (one per
input width): the same numbers as folding, a (tokens, in) x (in, in) product more per Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import formats
from .quant import _decoder_linears, validate_float
from .smoothquant import channel_amax, input_stats  # noqa: F401 (re-exported for the lab's outlier plots)
from .smoothquant import validate_calibration, collect_input_stats, smooth_model

INT8_MAX = 127  # symmetric: -127 .. 127 (-128 unused, so the grid is symmetric around 0)
FP8_MAX = formats.E4M3_MAX  # 448, the largest float8_e4m3fn value
EIGHT_BIT = ("fp8", "int8")
MICROSCALING = {"nvfp4": formats.nvfp4_quantize, "mxfp4": formats.mxfp4_quantize, "mxfp8": formats.mxfp8_quantize}
ACT_FORMATS = EIGHT_BIT + tuple(MICROSCALING)
BLOCK = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32}  # values per block scale, along the last dim

# ----------------------------------------------------------------------------- argument checks


def validate_fmt(fmt, allowed=ACT_FORMATS, what: str = "fmt") -> str:
    if fmt not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {fmt!r}")
    return fmt


def validate_granularity(fmt: str, granularity, amax) -> None:
    if fmt in MICROSCALING:
        if granularity != "block":
            raise ValueError(f"{fmt} scales blocks of {BLOCK[fmt]} values along the last dim (always dynamic): "
                             f"use granularity='block', got {granularity!r}")
        if amax is not None:
            raise ValueError(f"{fmt} computes its block scales at run time: pass amax=None (static amax is for "
                             "fp8/int8 with granularity='tensor')")
        return
    if granularity not in ("token", "tensor"):
        hint = " ('block' is for the microscaling formats nvfp4/mxfp4/mxfp8)" if granularity == "block" else ""
        raise ValueError(f"{fmt} activations take granularity 'token' (dynamic) or 'tensor' (static with a "
                         f"calibrated amax, else dynamic), got {granularity!r}{hint}")
    if amax is not None and granularity != "tensor":
        raise ValueError("a static amax is one scalar for the whole tensor: use granularity='tensor' with it, "
                         "or amax=None for dynamic per-token scales")


# ----------------------------------------------------------------------------- 8-bit grids


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round x to the nearest float8_e4m3fn value, saturating at ±448; returns x's dtype.

    E4M3 has no infinity: a cast that does not saturate turns an out-of-range value into NaN. torch 2.13's cast
    saturates, but that is the library's choice, so clamp first and the result does not depend on it.
    """
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def _scaled_8bit(x: torch.Tensor, amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """Fake-quantize float32 x against amax (broadcastable to x): scale = amax / qmax; amax 0 gives zeros."""
    scale = amax / (INT8_MAX if fmt == "int8" else FP8_MAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: no 0 / 0
    if fmt == "int8":
        q = torch.clamp(torch.round(x / safe), -INT8_MAX, INT8_MAX)
    else:
        q = fp8_e4m3(x / safe)
    return q * scale  # scale 0 (a static amax of 0) -> 0: everything saturates at amax


# ----------------------------------------------------------------------------- activations


def quantize_activation(x: torch.Tensor, fmt: str = "fp8", granularity: str = "token", amax=None) -> torch.Tensor:
    """Fake-quantize activations x (..., in) -> same shape and dtype (computed in float32).

        quantize_activation(x, "int8", "token")              # dynamic per token
        quantize_activation(x, "fp8", "tensor", amax=12.5)   # static per tensor (calibrate_input_amax)
        quantize_activation(x, "nvfp4", "block")             # microscaling: in must be a multiple of 16 (32 for MX)

    NVFP4's second-level fp32 scale is computed per call, over the whole tensor x (formats.nvfp4_quantize): a
    deployment calibrates that global scale once per tensor (static); per call is the dynamic version of the same
    two-level scheme, and it makes a token's result depend on the batch it is in only through that one scalar.
    """
    validate_float(x, "x")
    validate_fmt(fmt)
    validate_granularity(fmt, granularity, amax)
    if fmt in MICROSCALING:
        n = x.shape[-1] if x.dim() else 0
        if n % BLOCK[fmt] or n == 0:
            raise ValueError(f"{fmt} needs the last dim to be a positive multiple of {BLOCK[fmt]}, got {n}: pad the "
                             "features with zeros, or keep this layer in 8 bits")
        return MICROSCALING[fmt](x).dequantize().to(x.dtype)  # blocks along the last dim, (..., n) kept
    xf = x.float()
    if amax is not None:  # static: one calibrated scalar
        amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        if amax.numel() != 1 or not torch.isfinite(amax) or amax < 0:
            raise ValueError(f"amax must be one finite non-negative number (a calibrated max |x|), got {amax}")
        amax = amax.reshape(())
    elif granularity == "token":
        amax = xf.abs().amax(dim=-1, keepdim=True)  # (..., 1): one scale per row
    else:
        amax = xf.abs().amax()  # dynamic per tensor
    return _scaled_8bit(xf, amax, fmt).to(x.dtype)


# ----------------------------------------------------------------------------- 8-bit weights (real storage)


def quantize_weight(w: torch.Tensor, fmt: str = "fp8",
                    granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (codes, scale): codes (out, in) torch.float8_e4m3fn or torch.int8; scale float32, (out, 1) for
    "channel" or a 0-dim tensor for "tensor". w ≈ codes * scale (dequantize_weight)."""
    validate_float(w, "w")
    validate_fmt(fmt, EIGHT_BIT, "weight fmt")
    if w.dim() != 2:
        raise ValueError(f"w must be a Linear weight (out, in), got shape {tuple(w.shape)}")
    if granularity not in ("channel", "tensor"):
        raise ValueError(f"weight granularity must be 'channel' (a scale per output row) or 'tensor', "
                         f"got {granularity!r}")
    wf = w.detach().float()
    amax = wf.abs().amax(dim=-1, keepdim=True) if granularity == "channel" else wf.abs().amax()  # (out, 1) or ()
    qmax = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))  # an all-zero row keeps scale 1, codes 0
    if fmt == "int8":
        codes = torch.clamp(torch.round(wf / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        codes = (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # saturating cast
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """codes (out, in) int8/float8 * scale ((out, 1) or scalar) -> (out, in) in dtype."""
    return (codes.float() * scale.float()).to(dtype)


# ----------------------------------------------------------------------------- a W8A8 Linear


class ActQuantLinear(nn.Module):
    """A Linear whose inputs are quantized on the fly and whose buffers are the weight's storage format.

    Buffers: weight (out, in) codes (float8_e4m3fn or int8) for weight_fmt "fp8"/"int8"; for "nvfp4"/"mxfp4"/"mxfp8"
    the emulation stores the dequantized (fake-quantized) float weight; for None the original float weight.
    weight_scale float32 (out, 1) or () (None unless weight_fmt is fp8/int8); input_amax () static activation amax
    (None: dynamic); pre_quant_scale (in,) multiplied into x before quantization (None unless set). bias: Parameter.
    The storage buffers keep their dtypes under model.to(dtype) (only the float weight and bias follow the model).
    forward: x (* pre_quant_scale) -> quantize_activation(act_fmt, act_granularity, input_amax) -> F.linear(., W, b).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_fmt, weight_granularity,
                 act_fmt, act_granularity):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_fmt, self.weight_granularity = weight_fmt, weight_granularity
        self.act_fmt, self.act_granularity = act_fmt, act_granularity
        self.register_buffer("weight", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("input_amax", None)
        self.register_buffer("pre_quant_scale", None)
        self.register_buffer("rotation", None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, weight_fmt: str | None = "fp8", weight_granularity: str = "channel",
                    act_fmt: str | None = "fp8", act_granularity: str = "token", input_amax=None,
                    pre_quant_scale: torch.Tensor | None = None,
                    rotation: torch.Tensor | None = None) -> "ActQuantLinear":
        """Quantize linear's weight and wrap it. act_fmt=None keeps the inputs in float (weight-only).

        input_amax: calibrated max |x| for static "tensor" activations (of x * pre_quant_scale when that is set).
        pre_quant_scale p (in,): forward multiplies x by p, and the weight's columns are divided by p before
        quantizing, so the layer equals `linear` in full precision (AWQ / SmoothQuant where folding is impossible).
        rotation R (in, in) orthogonal (random_rotation): forward quantizes x R (after pre_quant_scale) and the weight
        is W R, quantized; equal to `linear` in full precision.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if weight_fmt is not None:
            validate_fmt(weight_fmt, ACT_FORMATS, "weight_fmt")
        if weight_fmt in MICROSCALING:
            weight_granularity = "block"
        elif weight_fmt is not None and weight_granularity not in ("channel", "tensor"):
            raise ValueError(f"weight_granularity must be 'channel' or 'tensor', got {weight_granularity!r}")
        if act_fmt is not None:
            validate_fmt(act_fmt, ACT_FORMATS, "act_fmt")
            validate_granularity(act_fmt, act_granularity, input_amax)
        elif input_amax is not None:
            raise ValueError("input_amax is a static activation scale: it needs act_fmt='fp8' or 'int8'")
        w = linear.weight.detach()  # (out, in)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_fmt, weight_granularity,
                act_fmt, act_granularity if act_fmt is not None else None)
        if pre_quant_scale is not None:
            p = torch.as_tensor(pre_quant_scale).detach().float().to(w.device)
            if p.shape != (linear.in_features,) or not (p > 0).all():
                raise ValueError(f"pre_quant_scale must be ({linear.in_features},) positive values, got "
                                 f"{tuple(p.shape)}")
            m.pre_quant_scale = p
            w = (w.float() / p[None, :]).to(w.dtype)  # (out, in): the columns undo the input's multiplication
        if rotation is not None:
            r = torch.as_tensor(rotation).detach().float().to(w.device)
            n = linear.in_features
            if r.shape != (n, n) or not _orthogonal(r):
                raise ValueError(f"rotation must be an orthogonal ({n}, {n}) matrix (R^T R = I), got "
                                 f"{tuple(r.shape)}: use actquant.random_rotation({n}, seed)")
            m.rotation = r
            w = (w.float() @ r).to(w.dtype)  # (out, in) @ (in, in): W R, what meets x R
        if weight_fmt in EIGHT_BIT:
            m.weight, m.weight_scale = quantize_weight(w, weight_fmt, weight_granularity)
        elif weight_fmt in MICROSCALING:
            m.weight = MICROSCALING[weight_fmt](w).dequantize().to(w.dtype)  # emulation: dequantized values
        else:
            m.weight = w.clone()
        if input_amax is not None:
            m.input_amax = torch.as_tensor(input_amax, dtype=torch.float32, device=w.device).reshape(())
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16) casts every floating buffer, float8 codes and float32 scales included: keep the
        storage format (codes, scales, amax, pre_quant_scale) and let only the device change."""
        keep = ["weight_scale", "input_amax", "pre_quant_scale", "rotation"] + (["weight"] if self.weight_scale is not None else [])
        before = {n: self._buffers[n] for n in keep if self._buffers[n] is not None}
        super()._apply(fn, recurse)
        for n, b in before.items():
            if self._buffers[n].dtype != b.dtype:
                self._buffers[n] = b.to(self._buffers[n].device)
        return self

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """(out, in) in dtype: codes * scale for fp8/int8, the stored float weight otherwise."""
        if self.weight_scale is None:
            return self.weight.to(dtype)
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)  # (..., in) * (in,)
        if self.rotation is not None:
            x = x @ self.rotation.to(x.dtype)  # (..., in) @ (in, in)
        if self.act_fmt is not None:
            x = quantize_activation(x, self.act_fmt, self.act_granularity, self.input_amax)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        act = "float" if self.act_fmt is None else f"{self.act_fmt} {self.act_granularity}"
        if self.input_amax is not None:
            act += f" static amax={self.input_amax.item():.4g}"
        return (f"in={self.in_features}, out={self.out_features}, weight={self.weight_fmt} {self.weight_granularity}, "
                f"act={act}, bias={self.bias is not None}, pre_quant_scale={self.pre_quant_scale is not None}, "
                f"rotation={self.rotation is not None}")


# ----------------------------------------------------------------------------- static calibration


def calibrate_input_amax(model: nn.Module, calibration: torch.Tensor, linears: dict[str, nn.Module],
                         batch_size: int = 8, progress: bool = True) -> dict[str, float]:
    """{name: max |x| over every calibration token} at the input of each given Linear: the static per-tensor amax.

        amax = calibrate_input_amax(model, calib, {"model.layers.0.mlp.down_proj": layer.mlp.down_proj})

    Whole-model forwards (use_cache=False) over calibration (n_samples, seq_len) with forward hooks.
    """
    stats = collect_input_stats(model, calibration, linears, batch_size, tokens=False, progress=progress,
                                desc="calibrate amax")
    return {n: s.tensor_amax for n, s in stats.items()}


# ----------------------------------------------------------------------------- configs and the entry point


@dataclass(frozen=True, kw_only=True)
class W8A8Config:
    """8-bit weights and activations: apply(model, W8A8Config(fmt="int8", activations="tensor"), calib).

    fmt: "fp8" (E4M3) or "int8"; weights: "channel" | "tensor"; activations: "token" (dynamic) | "tensor" (static,
    calibrated: apply needs calibration); smooth_alpha: SmoothQuant's alpha in [0, 1], None for no smoothing;
    skip: name patterns left in full precision (lm_head).
    """

    fmt: str = "fp8"
    weights: str = "channel"
    activations: str = "token"
    smooth_alpha: float | None = None
    skip: tuple = ("lm_head",)

    def __post_init__(self):
        if self.fmt not in EIGHT_BIT:
            hint = " (use MXConfig for the microscaling formats)" if self.fmt in MICROSCALING else ""
            raise ValueError(f"W8A8Config.fmt must be 'fp8' or 'int8', got {self.fmt!r}{hint}")
        if self.weights not in ("channel", "tensor"):
            raise ValueError(f"W8A8Config.weights must be 'channel' (a scale per output row) or 'tensor', "
                             f"got {self.weights!r}")
        if self.activations not in ("token", "tensor"):
            raise ValueError(f"W8A8Config.activations must be 'token' (dynamic per token) or 'tensor' (static, "
                             f"calibrated), got {self.activations!r}")
        if self.smooth_alpha is not None and (isinstance(self.smooth_alpha, bool) or not isinstance(
                self.smooth_alpha, (int, float)) or not 0 <= self.smooth_alpha <= 1):
            raise ValueError(f"W8A8Config.smooth_alpha must be None (no SmoothQuant) or a number in [0, 1] "
                             f"(0.5 is the paper's default), got {self.smooth_alpha!r}")
        _check_skip(self.skip, "W8A8Config")


@dataclass(frozen=True, kw_only=True)
class MXConfig:
    """Microscaling formats: weights, and if activations=True the inputs too, in fmt, blocks along in_features.

    fmt: "nvfp4" (W4A4, E4M3 scale per 16 + a per-tensor fp32 scale), "mxfp4" (W4A4, power-of-two scale per 32) or
    "mxfp8" (W8A8, power-of-two scale per 32). activations=False is weight-only (W4A16 / W8A16).
    rotate=True puts every Linear behind a random orthogonal rotation (module docstring), seeded by seed.
    """

    fmt: str = "nvfp4"
    activations: bool = True
    rotate: bool = False
    seed: int = 0
    skip: tuple = ("lm_head",)

    def __post_init__(self):
        if self.fmt not in MICROSCALING:
            hint = " (use W8A8Config for per-channel/per-token fp8 and int8)" if self.fmt in EIGHT_BIT else ""
            raise ValueError(f"MXConfig.fmt must be one of {list(MICROSCALING)}, got {self.fmt!r}{hint}")
        if not isinstance(self.activations, bool):
            raise ValueError(f"MXConfig.activations must be True or False, got {self.activations!r}")
        if not isinstance(self.rotate, bool):
            raise ValueError(f"MXConfig.rotate must be True or False, got {self.rotate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"MXConfig.seed must be an int (it seeds the rotations), got {self.seed!r}")
        _check_skip(self.skip, "MXConfig")


def _orthogonal(r: torch.Tensor, probes: int = 8) -> bool:
    """R^T R = I, checked on a few fixed random vectors: O(n^2) per check instead of the O(n^3) product (a model's
    210 Linears share a few rotations, and a full R^T R per Linear cost more than the quantization)."""
    v = torch.randn(r.shape[1], probes, generator=torch.Generator().manual_seed(0)).to(r)  # (n, probes)
    return torch.allclose(r.t() @ (r @ v), v, atol=1e-4 * v.abs().max().item() * r.shape[0] ** 0.5)


def random_rotation(n: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """(n, n) random orthogonal matrix, Haar-distributed: Q of the QR of a Gaussian matrix with R's diagonal made
    positive. QuaRot uses a randomised Hadamard matrix instead (the same flattening, applied in O(n log n) by a fast
    transform; it exists for n = 2^k and a few other sizes, 576 = 9 x 64 needs a 12- or 20-point factor)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (the input width), got {n!r}")
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).float().to(device)  # (n, n), columns orthonormal


def _check_skip(skip, who: str) -> None:
    if not isinstance(skip, tuple) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"{who}.skip must be a tuple of name patterns, e.g. ('lm_head',) (mind the comma), "
                         f"got {skip!r}")


def weight_bits(config) -> float:
    """Storage bits per weight element: 8 for W8A8 (a per-row/per-tensor scale is ~0 bits per weight), the block
    scales counted for the microscaling formats (formats.bits_per_element: nvfp4 4.5, mxfp4 4.25, mxfp8 8.25)."""
    if isinstance(config, W8A8Config):
        return 8.0
    if isinstance(config, MXConfig):
        return formats.bits_per_element(config.fmt)
    raise TypeError(f"config must be a W8A8Config or an MXConfig, got {type(config).__name__}")


def activation_bits(config) -> float:
    """Bits per activation element as weight_bits counts them; 16 when activations are not quantized (W4A16)."""
    if isinstance(config, MXConfig) and not config.activations:
        return 16.0
    return weight_bits(config)


def apply(model: nn.Module, config, calibration: torch.Tensor | None = None, *, batch_size: int = 8,
          progress: bool = True) -> nn.Module:
    """Quantize model IN PLACE: every Linear not matching config.skip becomes an ActQuantLinear. Returns model.

        apply(model, W8A8Config(fmt="fp8"))                                               # dynamic per token
        apply(model, W8A8Config(fmt="int8", activations="tensor", smooth_alpha=0.5), calib)

    Order: SmoothQuant (if smooth_alpha; folds scales into norms and weights), then static calibration of each
    Linear's input amax on the smoothed full-precision model (if activations="tensor"), then the swap.
    Sets model.config.quantization_config to a dict describing the scheme.
    """
    if not isinstance(config, (W8A8Config, MXConfig)):
        raise TypeError(f"config must be a W8A8Config or an MXConfig, got {type(config).__name__}")
    if any(isinstance(m, ActQuantLinear) for m in model.modules()):
        raise ValueError("this model already holds ActQuantLinear layers: reload it (or deepcopy the original) "
                         "before applying another scheme")
    targets = list(_decoder_linears(model, config.skip))  # (parent, attr, name, Linear)
    if not targets:
        raise ValueError(f"no nn.Linear to quantize (skip={config.skip!r})")
    if isinstance(config, W8A8Config):
        static = config.activations == "tensor"
        if calibration is None and (static or config.smooth_alpha is not None):
            need = "static per-tensor activation scales" if static else "SmoothQuant's channel statistics"
            raise ValueError(f"{need} need calibration data: apply(model, config, "
                             "cl.data.calibration_batches(tok, n_samples=8, seq_len=512)), or use "
                             "activations='token' without smooth_alpha (dynamic, no calibration)")
        if config.smooth_alpha is not None:
            smooth_model(model, calibration, config.smooth_alpha, batch_size=batch_size, progress=progress)
        amax = {}
        if static:
            amax = calibrate_input_amax(model, validate_calibration(calibration), {n: m for _, _, n, m in targets},
                                        batch_size, progress)
        for parent, attr, name, linear in targets:
            setattr(parent, attr, ActQuantLinear.from_linear(
                linear, weight_fmt=config.fmt, weight_granularity=config.weights, act_fmt=config.fmt,
                act_granularity=config.activations, input_amax=amax.get(name)))
        description = {"format": config.fmt, "weights": config.weights, "activations": config.activations,
                       "smooth_alpha": config.smooth_alpha}
    else:
        bad = [n for _, _, n, m in targets if m.in_features % BLOCK[config.fmt]]
        if bad:  # before any swap: the model is changed in place
            raise ValueError(f"{config.fmt} needs in_features to be a multiple of {BLOCK[config.fmt]}; {bad[:3]} are "
                             f"not: add their names to MXConfig(skip=...) to keep them in full precision")
        rotations = {}  # one per input width, as one R serves every Linear reading the same stream in QuaRot
        for parent, attr, _, linear in targets:
            r = None
            if config.rotate:
                n = linear.in_features
                if n not in rotations:  # one QR per width (setdefault would compute it for every Linear)
                    rotations[n] = random_rotation(n, config.seed, device=linear.weight.device)
                r = rotations[n]
            setattr(parent, attr, ActQuantLinear.from_linear(
                linear, weight_fmt=config.fmt, act_fmt=config.fmt if config.activations else None,
                act_granularity="block", rotation=r))
        description = {"format": config.fmt, "weights": "block",
                       "activations": "block" if config.activations else None, "rotate": config.rotate}
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = {"quant_method": "compresslab", **description, "skip": list(config.skip),
                                            "weight_bits": weight_bits(config),
                                            "activation_bits": activation_bits(config)}
    return model
