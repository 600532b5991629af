"""Lab 03 · activation quantization, SmoothQuant, AWQ, NVFP4: the exercise checkers.

Each case catches one plausible mistake; tests/test_checks_lab03.py holds the wrong implementations each
checker must reject and the harmless variants it must accept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import actquant, awq, formats, smoothquant
from . import Case, run_check, run_adapted


def _activations(shape: tuple[int, ...], seed: int, loud: tuple[int, ...] = (), massive: int | None = None,
                 dtype=torch.float32) -> torch.Tensor:
    """Activation-like (..., in): Gaussian, the `loud` channels 20x larger on every token, an optional massive
    token (a row of the flattened tokens 1000x the others)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., list(loud)] *= 20
    if massive is not None:
        x.view(-1, shape[-1])[massive] *= 1000
    return x.to(dtype)


def _fp8_per_token_reference(x: torch.Tensor) -> torch.Tensor:
    return actquant.quantize_activation(x, "fp8", "token")


_fp8_per_token_reference.__module__ = "compresslab.actquant"
_fp8_per_token_reference.__name__ = 'quantize_activation(x, "fp8", "token")'


def check_fp8_per_token(fn: Callable) -> Callable:
    """Exercise: fn(x (..., in)) -> x fake-quantized to FP8 E4M3 with one dynamic scale per token; x's shape and dtype.

    A missing clamp before the cast cannot be caught here: with a per-token amax the largest |x / scale| is 448 (up to
    float rounding, which the cast rounds back to 448), and this torch's cast saturates anyway. It matters for static
    (calibrated) scales, which the exercise does not use.
    """
    zero_token = _activations((6, 32), 105)
    zero_token[2] = 0
    cases = [Case("(8, 64) tokens with two loud channels", (_activations((8, 64), 100, loud=(5, 40)),)),
             Case("(2, 5, 48) (batch, seq, in): one scale per token, the max over the LAST dim",
                  (_activations((2, 5, 48), 101, loud=(0,)),)),
             Case("a massive token 1000x the others (one scale per tensor flushes the quiet tokens)",
                  (_activations((6, 32), 102, massive=1),)),
             Case("bfloat16 input: compute in float32, return bfloat16",
                  (_activations((4, 64), 103, loud=(7,), dtype=torch.bfloat16),)),
             Case("float16 input: return float16", (_activations((3, 2, 32), 104, dtype=torch.float16),)),
             Case("an all-zero token (scale 0: it must come back as zeros, not NaN)", (zero_token,))]

    def same_dtype(out, x):
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != x.dtype:
            raise TypeError(f"returned {out.dtype} for a {x.dtype} input: cast the result back with .to(x.dtype)")
        return out

    return run_adapted("Exercise 1 · fp8_per_token", fn, _fp8_per_token_reference, same_dtype, cases,
                       atol=1e-5, rtol=1e-5,
                       hint="one scale per token (a row of the last dim) that maps the row's largest magnitude onto "
                            "E4M3's largest value; the float8 cast does the rounding; return x's dtype.",
                       more="in float32: scale = x.abs().amax(dim=-1, keepdim=True) / 448 (one per token; 448 is "
                            "E4M3's largest value, not 127), 1 where it is 0; q = (x / scale).clamp(-448, 448)"
                            ".to(torch.float8_e4m3fn) (the cast rounds; no torch.round); return (q.float() * scale)"
                            ".to(x.dtype).")


def _smooth_reference(norm_weight: torch.Tensor, weights: list[torch.Tensor], act_amax: torch.Tensor,
                      alpha: float = 0.5):
    w_amax = torch.stack([W.abs().amax(dim=0).float() for W in weights]).amax(dim=0)  # smoothquant.weight_amax
    s = smoothquant.smooth_scales(act_amax, w_amax, alpha)  # (in,)
    return s, norm_weight / s, [W * s for W in weights]  # fold_smoothing: the norm divides, the columns multiply


_smooth_reference.__module__, _smooth_reference.__name__ = "compresslab.smoothquant", "smooth_scales + fold_smoothing"


def _smoothing_tensors(out_features: tuple[int, ...], d_in: int, seed: int) -> tuple:
    """(norm_weight (in,), [W_i (out_i, in)], act_amax (in,)): a norm read by several Linears, a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    norm = 0.5 + torch.rand(d_in, generator=g)
    weights = [torch.randn(o, d_in, generator=g) * 0.05 for o in out_features]
    act = 0.5 + torch.rand(d_in, generator=g) * 2
    act[torch.randperm(d_in, generator=g)[:3]] *= 25  # outlier channels
    return norm, weights, act


def check_smoothing(fn: Callable) -> Callable:
    """Exercise: fn(norm_weight (in,), [W_i (out_i, in)], act_amax (in,), alpha) -> (s (in,), norm_weight / s,
    [W_i * s]): SmoothQuant's scales for the Linears reading one norm, folded into the norm and the weights."""
    qkv = _smoothing_tensors((64, 16, 16), 32, 110)
    gate_up = _smoothing_tensors((48, 48), 24, 111)
    gate_up[1][1][:, ::2] *= 3  # up_proj holds the largest |W_ij| of every other column: reduce over EVERY weight
    dead = _smoothing_tensors((20, 20), 16, 113)
    dead[2][3] = 0  # a channel that never fires
    dead[1][0][:, 9], dead[1][1][:, 9] = 0, 0  # and an input that no weight reads
    cases = [Case("q, k, v weights (64, 32), (16, 32), (16, 32) reading one norm, alpha 0.5", (*qkv, 0.5)),
             Case("alpha 0.8 (alpha is the activations' exponent, 1 - alpha the weights')", (*qkv, 0.8)),
             Case("gate and up (48, 24) each, alpha 0.3: the weight max runs over the rows of BOTH weights",
                  (*gate_up, 0.3)),
             Case("one wide weight (24, 40), alpha 0.6: max over its rows (dim 0), one value per input channel",
                  (*_smoothing_tensors((24,), 40, 112), 0.6)),
             Case("a dead channel (act_amax 0) and an all-zero weight column, alpha 0.5: clamp both to 1e-5",
                  (*dead, 0.5))]

    def flat(out, norm_weight, weights, act_amax, alpha):
        if not isinstance(out, (tuple, list)) or len(out) != 3 or not isinstance(out[2], (tuple, list)):
            raise ValueError(f"return (s, new_norm_weight, new_weights) with new_weights a list of tensors, got "
                             f"{type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
        if len(out[2]) != len(weights):
            raise ValueError(f"new_weights has {len(out[2])} tensors for {len(weights)} weights: one each")
        return (out[0], out[1], *out[2])  # (s, norm, W_1, W_2, ...)

    return run_adapted("Exercise 2 · smooth", fn, _smooth_reference, flat, cases, atol=1e-5, rtol=1e-5,
                       hint="s has one value per INPUT channel, from the activation's max and the max over all the "
                            "weights that read the norm's output; the norm divides by s, the weight columns multiply.",
                       more="w_amax = max |W_ij| over the rows (dim=0) of EVERY weight (stack them, then max): one "
                            "value per input channel; s = act_amax.clamp(min=1e-5) ** alpha / w_amax.clamp(min=1e-5) "
                            "** (1 - alpha), clamped to >= 1e-5; return s, norm_weight / s, [W * s for W in weights] "
                            "(the norm divides, the weight columns multiply).")


def _awq_reference(W: torch.Tensor, X: torch.Tensor, bits: int = 4, group_size: int = 64, grid: int = 20):
    linear = torch.nn.utils.skip_init(torch.nn.Linear, W.shape[1], W.shape[0], bias=False)  # no init: no RNG draw
    linear.weight.data = W.detach().float()
    return awq.awq_scale_search([linear], X, bits=bits, group_size=group_size, sym=True, grid=grid)


_awq_reference.__module__ = "compresslab.awq"
_awq_reference.__name__ = "awq_scale_search([linear], X, bits=bits, group_size=group_size, sym=True, grid=grid)"


def _awq_layer(out_f: int, in_f: int, tokens: int, seed: int, dead: int | None = None) -> tuple:
    """(W (out, in), X (tokens, in)): weights with uneven columns and inputs with a few loud channels, so the best
    alpha is clearly above 0 (and clearly one alpha: no near-ties between candidates)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05 * (0.5 + torch.rand(in_f, generator=g))
    X = torch.randn(tokens, in_f, generator=g) * (0.5 + torch.rand(in_f, generator=g))
    X[:, torch.randperm(in_f, generator=g)[: max(2, in_f // 32)]] *= 15  # salient channels
    if dead is not None:
        X[:, dead] = 0
    return W, X


def _awq_cases() -> list[Case]:
    """The layers exercise 3 is checked on (tests/test_checks_lab03.py checks each has one clear best alpha)."""
    return [Case("W (32, 128), X (256, 128) with 4 loud channels, 4 bits, group 64, grid 20",
                 (*_awq_layer(32, 128, 256, 120), 4, 64, 20)),
            Case("group 32, grid 10 (alpha = i / grid for i in range(grid): 0, 0.1, ..., 0.9)",
                 (*_awq_layer(24, 96, 192, 121), 4, 32, 10)),
            Case("3 bits, group 32, grid 20 (pass bits and group_size on to rtn)",
                 (*_awq_layer(16, 64, 128, 122), 3, 32, 20)),
            Case("an input channel that is always 0 (mean |x| = 0: clamp s to >= 1e-4 before normalising)",
                 (*_awq_layer(32, 128, 256, 123, dead=17), 4, 64, 20))]


def check_awq_search(fn: Callable) -> Callable:
    """Exercise: fn(W (out, in), X (tokens, in), bits, group_size, grid) -> (s (in,), [grid output errors]) of AWQ's
    scale search with symmetric round-to-nearest (the lab's rtn)."""
    cases = _awq_cases()

    def pair(out, *args):
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(f"return (s, errors), got {type(out).__name__}")
        s, errors = out
        if not isinstance(errors, (tuple, list)):
            raise TypeError(f"errors must be a list of floats (errors.append(err.item())), got {type(errors).__name__}")
        return s, tuple(errors)

    # errors: the reference sums tr(D G D^T) (G = X^T X), the exercise the squared outputs: equal to float32 rounding
    return run_adapted("Exercise 3 · awq_search", fn, _awq_reference, pair, cases, atol=1e-6, rtol=1e-5,
                       hint="a grid of exponents alpha = i / grid over the mean |x| per input channel; judge each "
                            "candidate s by the error of the layer's OUTPUTS with W * s quantized and X / s as input, "
                            "and return the best s with every grid error.",
                       more="for i in range(grid): s = X.abs().mean(dim=0) ** (i / grid) (mean |x| over tokens, not "
                            "|w|), clamped to >= 1e-4, then s / sqrt(s.max() * s.min()); error = ((X @ W.T - (X / s) @ "
                            "rtn(W * s, bits, group_size).T) ** 2).sum() on the layer's OUTPUTS; return the s of the "
                            "smallest error and the list of all grid errors as floats.")


def _nvfp4_reference(w: torch.Tensor) -> torch.Tensor:
    return formats.nvfp4_quantize(w).dequantize()


_nvfp4_reference.__module__, _nvfp4_reference.__name__ = "compresslab.formats", "nvfp4_quantize(w).dequantize()"


def _e2m1_ties() -> torch.Tensor:
    """(2, 16) weights whose elements land exactly on E2M1 midpoints (s_t = 1, block scale 448: exact divisions)."""
    x = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.0])
    return torch.stack([x, x.flip(0)]) * 448  # amax 2688 = 448 * 6


def check_nvfp4(fn: Callable) -> Callable:
    """Exercise: fn(w (..., n)) -> NVFP4 fake-quantized w (float32, same shape): E2M1 elements, an E4M3 scale per 16
    values, an fp32 scale per tensor.

    A missing clamp to 448 before the E4M3 cast cannot be caught: with s_t = amax / (448 * 6) the largest block scale
    is 448 up to float rounding (cast back to 448), and this torch's cast saturates anyway.
    """
    g = torch.Generator().manual_seed(130)
    outlier = torch.randn(4, 48, generator=g) * 0.05
    outlier[1, 20] = 30.0  # the tensor scale follows the outlier; the other blocks get small E4M3 scales
    zero_block = torch.randn(3, 32, generator=g) * 0.05
    zero_block[1, 16:] = 0
    rows = torch.randn(3, 64, generator=g) * torch.tensor([[0.01], [1.0], [20.0]])
    cases = [Case("(8, 64) weights", (torch.randn(8, 64, generator=g) * 0.05,)),
             Case("one outlier of 30 in a (4, 48) matrix (the tensor scale is set by it)", (outlier,)),
             Case("tiny weights (~1e-3): without the tensor scale the E4M3 block scales underflow to 0",
                  (torch.randn(6, 32, generator=g) * 1e-3,)),
             Case("a block of 16 zeros (scale 0: zeros, not NaN)", (zero_block,)),
             Case("(2, 3, 32): blocks of 16 along the last dim, one tensor scale for the whole tensor",
                  (torch.randn(2, 3, 32, generator=g),)),
             Case("rows 0.01x, 1x and 20x: ONE tensor scale (max over the whole tensor), blocks of 16", (rows,)),
             Case("elements exactly on E2M1 midpoints (0.25, 0.75, ..., 5): ties round to the even code",
                  (_e2m1_ties(),))]
    return run_check("Exercise 4 · nvfp4", fn, _nvfp4_reference, cases, atol=0, rtol=1e-5,
                     hint="two levels: one fp32 scale for the whole tensor, then per block of 16 consecutive values "
                          "an E4M3-rounded scale relative to it; the elements round to E2M1.",
                     more="s_t = w.abs().max() / (448 * 6) (the whole tensor); blocks = w.reshape(-1, 16); scale = "
                          "(blocks.abs().amax(-1, keepdim=True) / 6 / s_t).clamp(max=448).to(torch.float8_e4m3fn)"
                          ".float(); elements = formats.round_to_e2m1(blocks / (scale * s_t)) (0 where the scale is "
                          "0); return (elements * scale * s_t).reshape(w.shape).")
