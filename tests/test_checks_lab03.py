"""The lab 03 (activation quantization) checkers: the solution passes, a skipped exercise is "not done", and
plausible wrong answers fail.

Same structure as tests/test_checks_lab02.py. Every wrong implementation below was run against the checker's cases
and is really wrong there (the checker must reject it); every correct alternative is really right (it must pass).
No model is loaded: the checkers only run small fixed tensors.
"""

from pathlib import Path

import pytest
import torch
from checker_testing import (CheckerSuite, assert_accepted, assert_failed, assert_same, summary_lines)

import compresslab as cl
from compresslab import awq, checks, formats, quant

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "solutions" / "03_activation_quantization.py"

FP8 = "Exercise 1 · fp8_per_token"
SMOOTH = "Exercise 2 · smooth"
AWQ = "Exercise 3 · awq_search"
NVFP4 = "Exercise 4 · nvfp4"

GROUP_SIZE = 64  # the lab's parameter: awq_search's default group_size and rtn's

# one torch thread for the module (tiny matrices); every test starts and ends with an empty exercise table
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_status")


# ----------------------------------------------------------------------------- the lab's solutions (copied)
# Bodies copied from solutions/03_activation_quantization.py (### BEGIN / END SOLUTION); rtn is the lab's helper that
# awq_search calls. test_good_copies_match_the_lab_solutions keeps them in sync.


def good_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 E4M3 fake quantization: x (..., in) -> same shape and dtype."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 448  # (..., 1): one scale per token
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero token: any scale gives zeros
    q = (xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn)  # saturate explicitly, whatever the cast does
    return (q.float() * scale).to(x.dtype)


def good_smooth(norm_weight: torch.Tensor, weights: list[torch.Tensor], act_amax: torch.Tensor, alpha: float = 0.5):
    """SmoothQuant for the Linears reading one norm -> (s (in,), norm_weight / s, [W * s for each W (out_i, in)])."""
    w_amax = torch.stack([W.abs().amax(dim=0) for W in weights]).amax(dim=0)  # (in,): over every row of every W
    s = (act_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    return s, norm_weight / s, [W * s for W in weights]  # the norm emits x / s, each W meets it with W * s


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Symmetric round-to-nearest fake quantization (lab 01), groups along in_features."""
    return cl.quant.fake_quantize(w, bits, group_size, sym=True)


def good_awq_search(W: torch.Tensor, X: torch.Tensor, bits: int = 4, group_size: int = GROUP_SIZE, grid: int = 20):
    """AWQ's grid search for one Linear -> (s (in,), [output error at alpha = i / grid for i in range(grid)])."""
    W, X = W.float(), X.float()
    mean_abs = X.abs().mean(dim=0)  # (in,): how loud each input channel is on average
    Y = X @ W.t()  # (tokens, out): the layer's exact outputs
    errors, best, best_s = [], float("inf"), None
    for i in range(grid):
        s = mean_abs.pow(i / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # straddle 1
        Y_hat = (X / s) @ rtn(W * s, bits, group_size).t()  # inputs divided, columns scaled up then rounded
        err = ((Y - Y_hat) ** 2).sum().item()
        errors.append(err)
        if err < best:
            best, best_s = err, s
    return best_s, errors


def good_nvfp4(w: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization: E2M1 elements, an E4M3 scale per 16 values, an fp32 scale per tensor."""
    blocks = w.float().reshape(-1, 16)  # (n_blocks, 16) along the last dim
    s_t = blocks.abs().max() / (448 * 6)
    s_t = s_t if s_t > 0 else torch.ones(())
    scales = (blocks.abs().amax(dim=-1, keepdim=True) / 6 / s_t).clamp(max=448).to(torch.float8_e4m3fn).float()
    denom = scales * s_t  # (n_blocks, 1)
    x = torch.where(denom > 0, blocks / denom, torch.zeros_like(blocks))
    return (formats.round_to_e2m1(x) * denom).reshape(w.shape)


GOOD = {  # checker -> (exercise name, the lab's solution, lab function name)
    checks.check_fp8_per_token: (FP8, good_fp8_per_token, "fp8_per_token"),
    checks.check_smoothing: (SMOOTH, good_smooth, "smooth"),
    checks.check_awq_search: (AWQ, good_awq_search, "awq_search"),
    checks.check_nvfp4: (NVFP4, good_nvfp4, "nvfp4"),
}
NAMESPACE = {"cl": cl, "formats": formats, "rtn": rtn, "GROUP_SIZE": GROUP_SIZE}  # what the lab's solutions use


# ----------------------------------------------------------------------------- wrong answers: exercise 1


def _fp8(xf, scale):
    return (xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def fp_per_tensor(x):  # one scale for the whole tensor
    xf = x.float()
    scale = xf.abs().amax() / 448
    return _fp8(xf, scale).to(x.dtype)


def fp_per_channel(x):  # the max over tokens (dim -2): one scale per channel
    xf = x.float()
    scale = xf.abs().amax(dim=-2, keepdim=True) / 448
    return _fp8(xf, torch.where(scale > 0, scale, torch.ones_like(scale))).to(x.dtype)


def fp_divides_by_127(x):  # INT8's qmax: the values use only part of E4M3's range (its steps fall elsewhere)
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127
    return _fp8(xf, torch.where(scale > 0, scale, torch.ones_like(scale))).to(x.dtype)


def fp_integer_rounding(x):  # torch.round: an integer grid up to 448, not E4M3's floating-point one
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 448
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(xf / scale).clamp(-448, 448) * scale).to(x.dtype)


def fp_zero_token_nan(x):  # no guard: an all-zero token divides 0 by 0
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 448
    return _fp8(xf, scale).to(x.dtype)


def fp_returns_float32(x):  # forgets to cast back to x's dtype
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 448
    return _fp8(xf, torch.where(scale > 0, scale, torch.ones_like(scale)))


def fp_returns_codes(x):  # the E4M3 codes x / scale, never scaled back
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 448
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float().to(x.dtype)


WRONG_FP8 = [  # (wrong function, a fragment of the failure message it must produce, or None)
    (fp_per_tensor, None),
    (fp_per_channel, None),
    (fp_divides_by_127, None),
    (fp_integer_rounding, None),
    (fp_zero_token_nan, "NaN"),
    (fp_returns_float32, "cast the result back with .to(x.dtype)"),
    (fp_returns_codes, None),
]


def fp_no_clamp(x):  # the lab's solution without the clamp before the cast
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 448
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


# ----------------------------------------------------------------------------- wrong answers: exercise 2


def _w_amax(weights):
    return torch.stack([W.abs().amax(dim=0) for W in weights]).amax(dim=0)


def _s(act_amax, w_amax, alpha):
    return (act_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def sm_alpha_swapped(norm_weight, weights, act_amax, alpha):  # 1 - alpha on the activations, alpha on the weights
    s = _s(act_amax, _w_amax(weights), 1 - alpha)  # act^(1 - alpha) / w^alpha
    return s, norm_weight / s, [W * s for W in weights]


def sm_w_amax_over_columns(norm_weight, weights, act_amax, alpha):  # amax(dim=1): one value per OUTPUT row
    w_amax = torch.stack([W.abs().amax(dim=1) for W in weights]).amax(dim=0)
    s = _s(act_amax, w_amax, alpha)
    return s, norm_weight / s, [W * s for W in weights]


def sm_norm_times_s(norm_weight, weights, act_amax, alpha):  # the norm multiplied by s: the inputs grow instead
    s = _s(act_amax, _w_amax(weights), alpha)
    return s, norm_weight * s, [W * s for W in weights]


def sm_weights_divided(norm_weight, weights, act_amax, alpha):  # W / s: both sides divide, the layer changes
    s = _s(act_amax, _w_amax(weights), alpha)
    return s, norm_weight / s, [W / s for W in weights]


def sm_first_weight_only(norm_weight, weights, act_amax, alpha):  # the max over q_proj only, not k and v
    s = _s(act_amax, weights[0].abs().amax(dim=0), alpha)
    return s, norm_weight / s, [W * s for W in weights]


def sm_no_clamp(norm_weight, weights, act_amax, alpha):  # a dead channel gives s = 0, an unread one s = inf
    s = act_amax.pow(alpha) / _w_amax(weights).pow(1 - alpha)
    return s, norm_weight / s, [W * s for W in weights]


def sm_mean_weights(norm_weight, weights, act_amax, alpha):  # mean |W_ij| instead of the max
    w_mean = torch.cat(weights).abs().mean(dim=0)
    s = _s(act_amax, w_mean, alpha)
    return s, norm_weight / s, [W * s for W in weights]


def sm_one_new_weight(norm_weight, weights, act_amax, alpha):  # the weights stacked into one tensor, not a list
    s = _s(act_amax, _w_amax(weights), alpha)
    return s, norm_weight / s, torch.cat(weights) * s


WRONG_SMOOTH = [
    (sm_alpha_swapped, "alpha 0.8"),
    (sm_w_amax_over_columns, "raised RuntimeError"),
    (sm_norm_times_s, "output[1]"),
    (sm_weights_divided, "output[2]"),
    (sm_first_weight_only, None),
    (sm_no_clamp, "NaN or inf"),
    (sm_mean_weights, None),
    (sm_one_new_weight, "new_weights a list of tensors"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 3


def _search(W, X, bits, group_size, grid, saliency, exponent=lambda i, grid: i / grid, normalise=True, clamp=True,
            error="outputs", divide_x=True, pick=min):
    """The lab's search with one thing changed at a time (the wrong answers below)."""
    W, X = W.float(), X.float()
    Y = X @ W.t()
    errors, scales = [], []
    for i in range(grid):
        s = saliency.pow(exponent(i, grid))
        s = s.clamp(min=1e-4) if clamp else s
        s = s / (s.max() * s.min()).sqrt() if normalise else s
        Wq = rtn(W * s, bits, group_size)
        if error == "weights":
            err = ((W - Wq / s) ** 2).sum().item()
        else:
            err = ((Y - ((X / s) if divide_x else X) @ Wq.t()) ** 2).sum().item()
        errors.append(err)
        scales.append(s)
    return scales[errors.index(pick(errors))], errors


def aw_mean_abs_w(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # saliency from the weights, not the inputs
    return _search(W, X, bits, group_size, grid, W.float().abs().mean(dim=0))


def aw_no_division_of_x(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # X @ Q(W s)^T: a different layer
    return _search(W, X, bits, group_size, grid, X.float().abs().mean(dim=0), divide_x=False)


def aw_weight_error(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # ||W - Q(W s) / s||^2: blind to the inputs
    return _search(W, X, bits, group_size, grid, X.float().abs().mean(dim=0), error="weights")


def aw_not_normalised(W, X, bits=4, group_size=GROUP_SIZE, grid=20):
    """No s / sqrt(max * min): symmetric rounding is scale-invariant per group, so the errors are the same (to float
    rounding) but the s returned differs by a constant factor."""
    return _search(W, X, bits, group_size, grid, X.float().abs().mean(dim=0), normalise=False)


def aw_alpha_off_by_one(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # alpha = (i + 1) / grid: 1/grid .. 1
    return _search(W, X, bits, group_size, grid, X.float().abs().mean(dim=0), exponent=lambda i, g: (i + 1) / g)


def aw_returns_worst(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # max instead of min
    return _search(W, X, bits, group_size, grid, X.float().abs().mean(dim=0), pick=max)


def aw_no_clamp(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # a dead channel: s = 0, then 0 / 0
    return _search(W, X, bits, group_size, grid, X.float().abs().mean(dim=0), clamp=False)


def aw_ignores_bits_and_group(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # rtn(W * s): the defaults, 4-bit g64
    return _search(W, X, 4, GROUP_SIZE, grid, X.float().abs().mean(dim=0))


def aw_mean_squared_error(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # .mean(): not the summed error asked for
    s, errors = _search(W, X, bits, group_size, grid, X.float().abs().mean(dim=0))
    return s, [e / (X.shape[0] * W.shape[0]) for e in errors]


def aw_errors_as_tensor(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # the lab's next cell calls errs.index(...)
    s, errors = _search(W, X, bits, group_size, grid, X.float().abs().mean(dim=0))
    return s, torch.tensor(errors)


WRONG_AWQ = [
    (aw_mean_abs_w, None),
    (aw_no_division_of_x, None),
    (aw_weight_error, None),
    (aw_not_normalised, "output[0]"),
    (aw_alpha_off_by_one, None),
    (aw_returns_worst, "output[0]"),
    (aw_no_clamp, "always 0"),
    (aw_ignores_bits_and_group, None),
    (aw_mean_squared_error, "output[1]"),
    (aw_errors_as_tensor, "errors must be a list of floats"),
]


# ----------------------------------------------------------------------------- wrong answers: exercise 4


def _nv(w, block=16, tensor_scale=True, e4m3=True, divisor=6.0, rounding=formats.round_to_e2m1,
        per_row=False):
    """The lab's NVFP4 with one thing changed at a time (the wrong answers below)."""
    blocks = w.float().reshape(-1, block)
    if not tensor_scale:
        s_t = torch.ones(())
    elif per_row:
        rows = w.float().reshape(-1, w.shape[-1]).abs().amax(dim=-1, keepdim=True) / (448 * 6)  # (rows, 1)
        s_t = rows.repeat_interleave(w.shape[-1] // block, dim=0)  # (n_blocks, 1)
    else:
        s_t = blocks.abs().max() / (448 * 6)
    scales = blocks.abs().amax(dim=-1, keepdim=True) / divisor / s_t
    if e4m3:
        scales = scales.clamp(max=448).to(torch.float8_e4m3fn).float()
    denom = scales * s_t
    x = torch.where(denom > 0, blocks / denom, torch.zeros_like(blocks))
    return (rounding(x) * denom).reshape(w.shape)


def _e2m1_ties_down(x):  # nearest value by argmin: a tie goes to the smaller magnitude, not the even code
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    idx = (x.abs().clamp(max=6)[..., None] - mags).abs().argmin(dim=-1)
    return torch.copysign(mags[idx], x)


def nv_no_tensor_scale(w):  # block scales e4m3(amax / 6) directly: small weights' scales underflow
    return _nv(w, tensor_scale=False)


def nv_blocks_of_32(w):  # MXFP4's block size
    return _nv(w, block=32)


def nv_fp32_block_scales(w):  # the block scale is never rounded to E4M3
    return _nv(w, e4m3=False)


def nv_amax_over_4(w):  # /4 instead of E2M1's largest value 6: the largest elements saturate
    return _nv(w, divisor=4.0)


def nv_ties_down(w):  # its own nearest-value rounding, ties to the smaller magnitude
    return _nv(w, rounding=_e2m1_ties_down)


def nv_tensor_scale_per_row(w):  # one "tensor" scale per row
    return _nv(w, per_row=True)


WRONG_NVFP4 = [
    (nv_no_tensor_scale, None),
    (nv_blocks_of_32, None),
    (nv_fp32_block_scales, None),
    (nv_amax_over_4, None),
    (nv_ties_down, "E2M1 midpoints"),
    (nv_tensor_scale_per_row, None),
]


def nv_no_clamp(w):  # the lab's solution without .clamp(max=448) before the E4M3 cast
    blocks = w.float().reshape(-1, 16)
    s_t = blocks.abs().max() / (448 * 6)
    s_t = s_t if s_t > 0 else torch.ones(())
    scales = (blocks.abs().amax(dim=-1, keepdim=True) / 6 / s_t).to(torch.float8_e4m3fn).float()
    denom = scales * s_t
    x = torch.where(denom > 0, blocks / denom, torch.zeros_like(blocks))
    return (formats.round_to_e2m1(x) * denom).reshape(w.shape)


WRONG = [(checks.check_fp8_per_token, FP8, fn, msg) for fn, msg in WRONG_FP8]
WRONG += [(checks.check_smoothing, SMOOTH, fn, msg) for fn, msg in WRONG_SMOOTH]
WRONG += [(checks.check_awq_search, AWQ, fn, msg) for fn, msg in WRONG_AWQ]
WRONG += [(checks.check_nvfp4, NVFP4, fn, msg) for fn, msg in WRONG_NVFP4]


# ----------------------------------------------------------------------------- correct alternatives


def alt_fp8_reciprocal(x):  # multiply by 448 / amax, rows flattened, finfo for E4M3's max
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    xf = x.float().reshape(-1, x.shape[-1])  # (tokens, in)
    amax = xf.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, fp8_max / amax, torch.ones_like(amax))
    q = (xf * inv).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn).float()
    return (q / inv).reshape(x.shape).to(x.dtype)


def alt_fp8_package_grid(x):  # the package's saturating E4M3 rounding, a tiny floor instead of the where
    from compresslab import actquant

    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 448).clamp(min=torch.finfo(torch.float32).tiny)
    return (actquant.fp8_e4m3(xf / scale) * scale).to(x.dtype)


def alt_smooth_float64(norm_weight, weights, act_amax, alpha=0.5):  # in float64, rows concatenated
    w_amax = torch.cat(weights).double().abs().amax(dim=0)
    a = act_amax.double().clamp(min=1e-5)
    s = (a**alpha * w_amax.clamp(min=1e-5) ** (alpha - 1)).clamp(min=1e-5)
    return s.float(), (norm_weight.double() / s).float(), [(W.double() * s).float() for W in weights]


def alt_smooth_in_place(norm_weight, weights, act_amax, alpha=0.5):  # folds in place, as compresslab.smoothquant does
    w_amax = torch.zeros_like(act_amax)
    for W in weights:
        w_amax = torch.maximum(w_amax, W.abs().amax(dim=0))
    s = torch.exp(alpha * act_amax.clamp(min=1e-5).log() - (1 - alpha) * w_amax.clamp(min=1e-5).log()).clamp(min=1e-5)
    norm_weight.div_(s)
    for W in weights:
        W.mul_(s)
    return s, norm_weight, weights


def alt_awq_closed_form(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # tr(D G D^T), G = X^T X, as the package does
    W, X = W.float(), X.float()
    G = X.t() @ X  # (in, in)
    mean_abs = X.abs().mean(dim=0)
    candidates = []
    for alpha in [i / grid for i in range(grid)]:
        s = torch.clamp(mean_abs**alpha, min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        D = W - rtn(W * s, bits, group_size) / s  # (out, in): the weight the divided inputs effectively meet
        candidates.append((torch.trace(D @ G @ D.t()).item(), s))
    errors = [e for e, _ in candidates]
    return min(candidates, key=lambda c: c[0])[1], errors


def alt_awq_batched(W, X, bits=4, group_size=GROUP_SIZE, grid=20):  # every alpha at once: (grid, in) scales
    W, X = W.float(), X.float()
    a = torch.arange(grid, dtype=torch.float32)[:, None] / grid  # (grid, 1)
    S = X.abs().mean(dim=0).pow(a).clamp(min=1e-4)  # (grid, in)
    S = S / (S.amax(dim=1, keepdim=True) * S.amin(dim=1, keepdim=True)).sqrt()
    Wq = quant.fake_quantize(W[None] * S[:, None, :], bits, group_size, sym=True)  # (grid, out, in)
    Y_hat = torch.einsum("ti,gi,goi->gto", X, 1 / S, Wq)  # (grid, tokens, out)
    errors = ((Y_hat - X @ W.t()) ** 2).sum(dim=(1, 2))  # (grid,)
    return S[errors.argmin()], [e.item() for e in errors]


def alt_nvfp4_from_package_pieces(w):  # the package's constants, an exact E4M3 table lookup, BlockFP4 to dequantize
    blocks = w.float().reshape(-1, 16)
    amax = blocks.abs().max()
    s_t = amax / (formats.E4M3_MAX * formats.E2M1_MAX) if amax > 0 else torch.ones(())
    table = formats.grid("fp8_e4m3")  # every finite E4M3 value, sorted
    want = (blocks.abs().amax(dim=-1, keepdim=True) / formats.E2M1_MAX / s_t).clamp(max=formats.E4M3_MAX)
    scales = want.to(torch.float8_e4m3fn).float()
    assert torch.isin(scales, table).all()
    denom = scales * s_t
    elements = formats.round_to_e2m1(torch.where(denom > 0, blocks / denom, torch.zeros_like(blocks)))
    return formats.BlockFP4(elements, scales, s_t.item(), w.shape).dequantize()


def alt_nvfp4_two_divisions(w):  # w / s_t, then / block scale; a zero block handled by nan_to_num
    flat = w.float().reshape(*w.shape[:-1], -1, 16)  # (..., n_blocks, 16)
    amax = flat.abs().max()
    s_t = torch.where(amax > 0, amax / 2688, torch.ones(()))
    bscale = (flat.abs().amax(dim=-1, keepdim=True) / 6 / s_t).clamp(max=448).to(torch.float8_e4m3fn).float()
    e = formats.round_to_e2m1(torch.nan_to_num(flat / s_t / bscale, nan=0.0))
    return (e * (bscale * s_t)).reshape(w.shape)


CORRECT_ALTERNATIVES = [
    (checks.check_fp8_per_token, FP8, alt_fp8_reciprocal),
    (checks.check_fp8_per_token, FP8, alt_fp8_package_grid),
    (checks.check_smoothing, SMOOTH, alt_smooth_float64),
    (checks.check_smoothing, SMOOTH, alt_smooth_in_place),
    (checks.check_awq_search, AWQ, alt_awq_closed_form),
    (checks.check_awq_search, AWQ, alt_awq_batched),
    (checks.check_nvfp4, NVFP4, alt_nvfp4_from_package_pieces),
    (checks.check_nvfp4, NVFP4, alt_nvfp4_two_divisions),
]


# ----------------------------------------------------------------------------- not done


def _flat(out):
    """(s, norm, [W_i]) -> (s, norm, W_1, ...); (s, [errors]) -> (s, tensor of errors): what assert_same compares."""
    if isinstance(out, tuple) and isinstance(out[-1], list):
        last = out[-1]
        return (*out[:-1], *last) if isinstance(last[0], torch.Tensor) else (*out[:-1], torch.tensor(last))
    return out


def _sample_calls():
    """checker -> (args of one sample call, an independent computation of what the reference must return)."""
    g = torch.Generator().manual_seed(0)
    # exercise 1: E4M3 rounding by hand, from the sorted table of its values (no ties in random data)
    x = torch.randn(3, 4, 32, generator=g) * torch.linspace(0.1, 10, 32)
    x[1, 2] = 0
    table = formats.grid("fp8_e4m3").double()
    amax = x.double().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    y = x.double() / scale
    x_hat = (table[(y[..., None] - table).abs().argmin(dim=-1)] * scale).float()
    # exercise 2: float64, from the definition
    norm = torch.rand(24, generator=g) + 0.5
    weights = [torch.randn(o, 24, generator=g) for o in (8, 4)]
    act = torch.rand(24, generator=g) * 10
    w_amax = torch.cat(weights).abs().amax(dim=0).double()
    s = (act.double() ** 0.7 / w_amax**0.3).float()
    # exercise 3: the direct search on the outputs
    W, X = checks._awq_layer(16, 64, 96, 9)
    mean_abs = X.abs().mean(dim=0)
    errors, scales = [], []
    for i in range(10):
        s_a = mean_abs.pow(i / 10).clamp(min=1e-4)
        s_a = s_a / (s_a.max() * s_a.min()).sqrt()
        scales.append(s_a)
        errors.append(((X @ W.t() - (X / s_a) @ quant.fake_quantize(W * s_a, 4, 32, sym=True).t()) ** 2).sum().item())
    # exercise 4: by hand, the E2M1 tie rule left out (random data has no ties)
    w = torch.randn(4, 32, generator=g)
    w[2, :16] = 0
    s_t = w.abs().max() / 2688
    blocks = w.reshape(-1, 16)
    bs = (blocks.abs().amax(dim=1, keepdim=True) / 6 / s_t).to(torch.float8_e4m3fn).float() * s_t
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    y = torch.where(bs > 0, blocks / bs, torch.zeros_like(blocks))
    w_hat = (torch.copysign(mags[(y.abs()[..., None] - mags).abs().argmin(-1)], y) * bs).reshape(w.shape)
    return {
        checks.check_fp8_per_token: ((x,), x_hat),
        checks.check_smoothing: ((norm, weights, act, 0.7), (s, norm / s, *[W * s for W in weights])),
        checks.check_awq_search: ((W, X, 4, 32, 10), (scales[errors.index(min(errors))], torch.tensor(errors))),
        checks.check_nvfp4: ((w,), w_hat),
    }


def test_not_done_references_return_what_the_lab_uses(capsys):
    """The references handed back take the lab's arguments and return the lab's types: smooth a list of weights,
    awq_search a list of floats (the lab calls errs.index), fp8_per_token x's dtype, nvfp4 float32."""
    def todo(*args):
        raise NotImplementedError

    calls = _sample_calls()
    ref = checks.check_smoothing(todo)
    _, _, new_ws = ref(*calls[checks.check_smoothing][0])
    assert isinstance(new_ws, list) and len(new_ws) == 2
    ref = checks.check_awq_search(todo)
    _, errs = ref(*calls[checks.check_awq_search][0])
    assert isinstance(errs, list) and all(isinstance(e, float) for e in errs) and errs.index(min(errs)) >= 0
    W, X = calls[checks.check_awq_search][0][:2]
    assert len(checks.check_awq_search(todo)(W, X, grid=5)[1]) == 5  # the lab's defaults: bits 4, group 64
    ref = checks.check_fp8_per_token(todo)
    assert ref(torch.randn(2, 16).bfloat16()).dtype == torch.bfloat16
    assert checks.check_nvfp4(todo)(torch.randn(2, 16).half()).dtype == torch.float32
    capsys.readouterr()


# ----------------------------------------------------------------------------- what the cases can and cannot catch


def test_fp8_clamp_is_redundant_with_per_token_scales(capsys):
    """The lab's notes list "no clamp before the FP8 cast" as a mistake; with dynamic per-token scales it changes
    nothing: |x / scale| <= 448 up to float rounding, which the cast rounds back to 448. So the checker accepts it (a
    static, calibrated scale is where the clamp matters)."""
    assert_accepted(checks.check_fp8_per_token, FP8, fp_no_clamp, capsys)
    x = torch.randn(64, 256) * torch.logspace(-30, 30, 64)[:, None]  # every magnitude float32 has
    scale = x.abs().amax(dim=-1, keepdim=True) / 448
    assert (x / scale).abs().max() <= 448 * (1 + 2**-20)
    assert torch.isfinite((x / scale).to(torch.float8_e4m3fn).float()).all()


def test_nvfp4_clamp_is_redundant_with_a_per_call_tensor_scale(capsys):
    """Likewise NVFP4: with s_t = amax / (448 * 6) the largest block scale is 448 up to float rounding."""
    assert_accepted(checks.check_nvfp4, NVFP4, nv_no_clamp, capsys)
    w = torch.randn(64, 256) * torch.logspace(-30, 30, 64)[:, None]
    s_t = w.abs().max() / (448 * 6)
    assert (w.reshape(-1, 16).abs().amax(dim=-1) / 6 / s_t).max() <= 448 * (1 + 2**-20)


def test_nvfp4_zero_block_guard_is_redundant_with_round_to_e2m1(capsys):
    """Without the where(denom > 0, ...) a block of zeros gives 0 / 0 = NaN, but formats.round_to_e2m1 maps NaN to
    +-6 (bucketize puts it past the last boundary) and 6 * denom = 0: the zeros come back anyway. The zero-block case
    still catches a NaN from any other route (a hand-written rounding, a division after the rounding)."""
    def no_guard(w):
        blocks = w.float().reshape(-1, 16)
        s_t = blocks.abs().max() / (448 * 6)
        denom = (blocks.abs().amax(dim=-1, keepdim=True) / 6 / s_t).clamp(max=448).to(torch.float8_e4m3fn).float() * s_t
        return (formats.round_to_e2m1(blocks / denom) * denom).reshape(w.shape)

    assert_accepted(checks.check_nvfp4, NVFP4, no_guard, capsys)
    assert formats.round_to_e2m1(torch.tensor([float("nan")])).abs().item() == 6.0
    capsys.readouterr(), checks.STATUS.clear()

    def hand_rounding_no_guard(w):  # torch.round on the doubled value where E2M1's step is 0.5 (|x| < 2)
        blocks = w.float().reshape(-1, 16)
        s_t = blocks.abs().max() / (448 * 6)
        denom = (blocks.abs().amax(dim=-1, keepdim=True) / 6 / s_t).clamp(max=448).to(torch.float8_e4m3fn).float() * s_t
        x = blocks / denom
        small = torch.round(x * 2) / 2
        return (torch.where(x.abs() >= 2, formats.round_to_e2m1(x), small) * denom).reshape(w.shape)  # NaN: small

    assert_failed(checks.check_nvfp4, NVFP4, hand_rounding_no_guard, capsys, "NaN")


def test_awq_cases_have_one_clear_best_alpha():
    """The reference's closed form and a direct search agree to ~1e-6 relative; each case's best alpha beats the
    runner-up by far more, so both pick the same s, and that alpha is not 0 (AWQ does something)."""
    for case in checks._awq_cases():
        _, errors = checks._awq_reference(*case.args)
        first, second = sorted(errors)[:2]
        assert (second - first) / first > 1e-3, case.label
        assert errors.index(first) > 0, case.label


def test_the_labs_rtn_is_the_references_quantizer():
    """The lab's rtn (quant.fake_quantize, sym=True) is exactly awq.rtn(..., sym=True), which the reference uses."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 96, generator=g) * torch.rand(96, generator=g) * 3
    for bits, gs in ((4, 32), (3, 32), (4, 96), (8, 48)):
        assert torch.equal(rtn(w, bits, gs), awq.rtn(w, bits, gs, True)[0])


def test_awq_reference_draws_no_random_numbers():
    """The reference wraps W in an nn.Linear without initialising it: the lab's random state is left alone."""
    state = torch.random.get_rng_state()
    checks._awq_reference(*checks._awq_cases()[2].args)
    assert torch.equal(state, torch.random.get_rng_state())


def test_not_normalising_changes_only_s():
    """Why aw_not_normalised fails on output[0] only: symmetric RTN per group is scale-invariant, so the errors
    match."""
    W, X, bits, gs, grid = checks._awq_cases()[0].args
    s_ref, e_ref = good_awq_search(W, X, bits, gs, grid)
    s_raw, e_raw = aw_not_normalised(W, X, bits, gs, grid)
    torch.testing.assert_close(torch.tensor(e_raw), torch.tensor(e_ref), rtol=1e-4, atol=0)
    assert not torch.allclose(s_raw, s_ref)
    torch.testing.assert_close(s_raw / s_raw[0], s_ref / s_ref[0])  # the same direction, another length


# ----------------------------------------------------------------------------- failed


def test_returning_none_is_a_failure(capsys):
    def forgot_return(w):
        formats.nvfp4_quantize(w).dequantize()

    assert_failed(checks.check_nvfp4, NVFP4, forgot_return, capsys, "expected a torch.Tensor, got NoneType")


def test_smooth_returning_two_values_is_a_failure(capsys):
    def no_scales(norm_weight, weights, act_amax, alpha):
        s = _s(act_amax, _w_amax(weights), alpha)
        return norm_weight / s, [W * s for W in weights]

    assert_failed(checks.check_smoothing, SMOOTH, no_scales, capsys, "return (s, new_norm_weight, new_weights)")


# ----------------------------------------------------------------------------- inputs are cloned per call


def mut_fp8(x):
    out = good_fp8_per_token(x)
    x.zero_()
    return out


def mut_smooth(norm_weight, weights, act_amax, alpha=0.5):
    out = good_smooth(norm_weight, weights, act_amax, alpha)
    norm_weight.zero_(), act_amax.zero_()
    for W in weights:
        W.mul_(2)
    return out


def mut_awq(W, X, bits=4, group_size=GROUP_SIZE, grid=20):
    out = good_awq_search(W, X, bits, group_size, grid)
    W.zero_(), X.mul_(3)
    return out


def mut_nvfp4(w):
    out = good_nvfp4(w)
    w.mul_(-1)
    return out


MUTATING = [(checks.check_fp8_per_token, FP8, mut_fp8), (checks.check_smoothing, SMOOTH, mut_smooth),
            (checks.check_awq_search, AWQ, mut_awq), (checks.check_nvfp4, NVFP4, mut_nvfp4)]


def test_summary_of_the_lab03_exercises(capsys):
    checks.check_fp8_per_token(good_fp8_per_token)
    checks.check_smoothing(sm_norm_times_s)
    checks.check_awq_search(good_awq_search)

    def todo(w):
        raise NotImplementedError

    checks.check_nvfp4(todo)
    result, lines = summary_lines(capsys)
    assert result == {FP8: "passed", SMOOTH: "failed", AWQ: "passed", NVFP4: "not done"}
    assert len(lines) == 5 and lines[-1] == "2/4 exercises passed"


# ----------------------------------------------------------------------------- the tests every lab's checkers get


class TestEveryChecker(CheckerSuite):
    """tests/checker_testing.py's suite on this lab's checkers."""

    TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG,
                                                                   MUTATING)
    NAMESPACE = NAMESPACE
    sample_calls = staticmethod(_sample_calls)

    def assert_sample(self, checker, got) -> None:
        """As the suite's, with smooth's list of weights and awq_search's list of errors unpacked for assert_same."""
        args, expected = self.sample_calls()[checker]
        assert_same(_flat(got(*args)), expected)
