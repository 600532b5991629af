"""Exercise checkers: run a participant's function on fixed cases, say PASSED / FAILED / NOT DONE, and hand
back the function the rest of the lab should use (theirs if it passed, the reference otherwise).

    compute_qparams = checks.check_qparams(my_qparams)    # prints the verdict, returns a working function
    checks.summary()                                      # table of every exercise checked so far

Each case is chosen to catch one plausible mistake, and its label says which (tests/test_checks.py holds the
wrong implementations each checker must reject). Checkers live here, never in the notebooks.
"""

from __future__ import annotations

import numbers
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import actquant, awq, deploy, distill, formats, gptq, kvcache, lowrank, pruning, quant, smoothquant

STATUS: dict[str, str] = {}  # exercise name -> "passed" | "failed" | "not done"


@dataclass
class Case:
    label: str  # what this case tests, shown when it fails
    args: tuple


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, list):  # a list of weights (lab 03's smooth): the participant may update them in place
        return [_clone(v) for v in x]
    return tuple(_clone(v) for v in x) if isinstance(x, tuple) else x


def _compare(got, expected, atol: float, rtol: float = 0.0) -> tuple[str | None, float]:
    """(None, largest error) if got matches expected, else (a one-line reason, error)."""
    if isinstance(expected, tuple):
        numbers = all(isinstance(e, (int, float)) for e in expected)
        if numbers and isinstance(got, (np.ndarray, torch.Tensor)) and got.ndim == 1:
            got = tuple(got.tolist())  # an array of the numbers unpacks like a tuple
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            what = "numbers" if numbers else "tensors"
            return f"expected a tuple of {len(expected)} {what}, got {type(got).__name__}", float("inf")
        worst = 0.0
        for i, (g, e) in enumerate(zip(got, expected)):
            reason, err = _compare(g, e, atol, rtol)
            if reason:
                return f"output[{i}]: {reason}", err
            worst = max(worst, err)
        return None, worst
    if isinstance(expected, (int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        elif isinstance(got, (np.ndarray, np.generic)) and np.size(got) == 1:  # np.int64 is not an int
            got = got.item()
        if not isinstance(got, (int, float)):
            return f"expected a number, got {type(got).__name__}", float("inf")
        err = abs(got - expected)
        return (None if err <= atol + rtol * abs(expected) else f"{got!r}, expected {expected!r}"), err
    if not isinstance(got, torch.Tensor):
        return f"expected a torch.Tensor, got {type(got).__name__}", float("inf")
    if tuple(got.shape) != tuple(expected.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}", float("inf")
    if expected.dtype == torch.bool and got.dtype != torch.bool:
        return f"dtype {got.dtype}, expected a bool mask (torch.bool)", float("inf")
    if expected.dtype == torch.uint8 and got.dtype != torch.uint8:
        return f"dtype {got.dtype}, expected torch.uint8", float("inf")
    if not expected.is_floating_point() and got.is_floating_point():
        return f"dtype {got.dtype}, expected integers ({expected.dtype})", float("inf")
    got, expected = got.double(), expected.double()
    if not torch.isfinite(got).all():
        return "output contains NaN or inf", float("inf")
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    tol = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    return (None if err <= tol else f"largest |error| = {err:.3g} (tolerance {tol:.2g})"), err


def run_check(name: str, fn: Callable, reference: Callable, cases: list[Case], hint: str,
              atol: float = 1e-5, rtol: float = 0.0) -> Callable:
    """Check fn against reference on every case; print the verdict; return fn if it passed, else reference."""
    ref_name = f"{reference.__module__}.{reference.__name__}"
    worst = 0.0
    try:
        for case in cases:
            expected = reference(*_clone(case.args))
            got = fn(*_clone(case.args))
            reason, err = _compare(got, expected, atol, rtol)
            if not reason and getattr(expected, "requires_grad", False) and not getattr(got, "requires_grad", False):
                reason = ("the result carries no gradient: the loss must stay connected to the student's logits "
                          "(no torch.no_grad(), .detach() or .item() on the way)")
            if reason:
                return _fail(name, ref_name, f'case "{case.label}": {reason}', hint, reference)
            worst = max(worst, err)
    except NotImplementedError:
        STATUS[name] = "not done"
        print(f"⏳ {name}: NOT DONE yet. Using the reference ({ref_name}) so the lab continues; "
              "come back, fill in the function, and re-run its cell and this one.")
        return reference
    except Exception as err:  # a crash in the participant's code is a failure, not a dead end
        where = traceback.extract_tb(err.__traceback__)[-1]
        return _fail(name, ref_name, f"raised {type(err).__name__}: {err} (line {where.lineno}: {where.line})",
                     hint, reference)
    STATUS[name] = "passed"
    print(f"✅ {name}: PASSED all {len(cases)} cases (largest |error| {worst:.1e}). "
          "The lab uses your function from here on.")
    return fn


def _fail(name: str, ref_name: str, reason: str, hint: str, reference: Callable) -> Callable:
    STATUS[name] = "failed"
    bar = "!" * 78
    print(f"{bar}\n❌ {name}: FAILED\n   {reason}\n   hint: {hint}\n"
          f"   -> using the reference ({ref_name}) instead, so the rest of the lab still runs.\n{bar}")
    return reference


def run_adapted(name: str, fn: Callable, reference: Callable, adapt: Callable, cases: list[Case], hint: str,
                atol: float = 1e-5, rtol: float = 0.0) -> Callable:
    """run_check on adapt(fn(*args), *args) against adapt(reference(*args), *args), for results run_check cannot
    compare as they come (a list inside a tuple, a dtype to keep); adapt raises, with a message, on a wrong form.
    Returns fn itself if it passed, else the reference."""
    def got(*args):
        return adapt(fn(*args), *args)

    def expected(*args):
        return adapt(reference(*args), *args)

    got.__name__ = getattr(fn, "__name__", "fn")
    expected.__module__, expected.__name__ = reference.__module__, reference.__name__
    chosen = run_check(name, got, expected, cases, hint, atol, rtol)
    return fn if chosen is got else reference


def summary() -> dict[str, str]:
    """Print and return the status of every exercise checked in this kernel."""
    marks = {"passed": "✅", "failed": "❌", "not done": "⏳"}
    for name, status in STATUS.items():
        print(f"{marks[status]} {status:9s} {name}")
    done = sum(s == "passed" for s in STATUS.values())
    print(f"{done}/{len(STATUS)} exercises passed")
    return dict(STATUS)


# ----------------------------------------------------------------------------- lab 01 cases


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05  # (rows, cols), LLM-weight-like scale


def _lab01_tensors() -> dict[str, torch.Tensor]:
    w = _weights(6, 64, 1)
    return {
        "mixed-sign groups": w,
        "all-positive groups (the range must include 0)": w.abs() + 0.01,
        "all-negative groups (the range must include 0)": -w.abs() - 0.01,
        "a constant all-zero group (the scale must not be 0)": torch.cat([w[:3], torch.zeros(1, 64)]),
        "a wide, non-square matrix (reduce over the last dim)": _weights(3, 128, 2),
        "an outlier of 2.0 in one group": torch.cat([w[:2], torch.tensor([[2.0] + [0.01] * 63])]),
    }


def check_qparams(fn: Callable) -> Callable:
    """Exercise: fn(x, bits) -> (scale, zero), asymmetric, one pair per row of x (n_groups, group_len)."""
    cases = [Case(f"{label}, {bits}-bit", (x, bits)) for label, x in _lab01_tensors().items() for bits in (8, 4, 3)]
    return run_check("Exercise 1 · compute_qparams", fn, _qparams_asym, cases,
                     hint="scale = (xmax - xmin) / (2**bits - 1) with xmin = min(x.min, 0), xmax = max(x.max, 0) "
                          "per row (dim=-1, keepdim=True); zero = round(-xmin / scale); clamp the scale to >= 1e-8.")


def _qparams_asym(x, bits):
    return quant.compute_qparams(x, bits, sym=False)


def _quant_dequant(x, scale, zero, bits):
    return quant.dequantize(quant.quantize(x, scale, zero, bits, sym=False), scale, zero)


def check_quant_dequant(fn: Callable) -> Callable:
    """Exercise: fn(x, scale, zero, bits) -> x_hat, asymmetric round-to-nearest with clamping to [0, 2^b-1]."""
    cases = []
    for label, x in _lab01_tensors().items():
        for bits in (8, 4, 2):
            scale, zero = _qparams_asym(x, bits)
            cases.append(Case(f"{label}, {bits}-bit", (x, scale, zero, bits)))
    # qparams from a narrower range than x: values outside must saturate at the ends of the code range
    x = _weights(4, 64, 3)
    scale, zero = _qparams_asym(x * 0.5, 4)
    cases.append(Case("x outside the calibrated range (codes must be clamped to [0, 2**bits - 1])",
                      (x, scale, zero, 4)))
    return run_check("Exercise 2 · quantize_dequantize", fn, _quant_dequant, cases,
                     hint="q = clamp(round(x / scale) + zero, 0, 2**bits - 1); x_hat = (q - zero) * scale.")


def _fake_quant_groups(w, bits, group_size):
    return quant.fake_quantize(w, bits, group_size, sym=False)


def check_fake_quantize_groups(fn: Callable) -> Callable:
    """Exercise: fn(w, bits, group_size) -> w_hat, same shape as w (out, in), groups along in_features."""
    w = _weights(8, 256, 4)
    w[3, 17] = 1.5  # one outlier: it should only hurt its own group
    cases = [Case(f"(8, 256) weight, {bits}-bit, group {gs}", (w, bits, gs)) for bits in (4, 3) for gs in (32, 64, 128)]
    cases.append(Case("(4, 576) weight like SmolLM2's, group 64", (_weights(4, 576, 5), 4, 64)))
    cases.append(Case("group_size == in_features (per-channel)", (_weights(5, 64, 6), 4, 64)))
    return run_check("Exercise 3 · fake_quantize_groups", fn, _fake_quant_groups, cases,
                     hint="reshape w (out, in) to (-1, group_size) so each row is one group of consecutive input "
                          "columns, quantize-dequantize the rows, then reshape back to w.shape.", atol=1e-5)


def check_pack_int4(fn: Callable) -> Callable:
    """Exercise: fn(q) -> packed uint8, q (..., n) codes in [0, 15]; element 2k low nibble, 2k+1 high nibble."""
    g = torch.Generator().manual_seed(7)
    cases = [
        Case("codes 0..15 in order", (torch.arange(16, dtype=torch.uint8).reshape(1, 16),)),
        Case("random (4, 32) codes", (torch.randint(0, 16, (4, 32), generator=g, dtype=torch.uint8),)),
        Case("all 15s (no overflow past 255)", (torch.full((2, 8), 15, dtype=torch.uint8),)),
        Case("a 1-D vector", (torch.randint(0, 16, (10,), generator=g, dtype=torch.uint8),)),
        Case("int64 input codes (cast to uint8)", (torch.randint(0, 16, (3, 6), generator=g),)),
    ]
    return run_check("Exercise 4 · pack_int4", fn, quant.pack_int4, cases, atol=0,
                     hint="view the last dim as pairs (..., n/2, 2); byte = low | (high << 4), "
                          "with low = element 2k and high = element 2k+1; return uint8.")


# ----------------------------------------------------------------------------- lab 02 cases (GPTQ)


def _spd(n: int, seed: int, dead: int | None = None) -> torch.Tensor:
    """A Hessian-like symmetric positive definite (n, n) matrix: 2/N X^T X of random inputs with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    col_scale = torch.linspace(0.2, 3.0, n)[torch.randperm(n, generator=g)]  # distinct, in no particular order
    x = torch.randn(4 * n, n, generator=g) * col_scale  # (tokens, n)
    if dead is not None:
        x[:, dead] = 0
    return 2 / x.shape[0] * x.t() @ x


def _hessian_step(H, n, x):
    h = gptq.Hessian(H.shape[0])
    h.H, h.n = H.clone(), n
    h.add_batch(x)
    return h.H, h.n


def check_accumulate_hessian(fn: Callable) -> Callable:
    """Exercise: fn(H, n, x) -> (H_new, n_new): running average of 2 x x^T over tokens; x (..., in)."""
    g = torch.Generator().manual_seed(11)
    cases = [
        Case("first batch (2, 16, 32) from H = 0, n = 0", (torch.zeros(32, 32), 0, torch.randn(2, 16, 32, generator=g))),
        Case("a later batch: the old average must be re-weighted by n / (n + b)",
             (_spd(32, 1), 64, torch.randn(1, 8, 32, generator=g))),
        Case("2-D input (tokens, in) with 10 tokens", (_spd(24, 2), 30, torch.randn(10, 24, generator=g))),
    ]
    return run_check("Exercise 1 · accumulate_hessian", fn, _hessian_step, cases, rtol=1e-5,
                     hint="x = x.reshape(-1, in); b = rows; H *= n / (n + b); n += b; "
                          "x = sqrt(2 / n) * x; H += x.T @ x; return H, n.")


def _column_step(W1, Hinv1, i, scale, zero, maxq):
    W1 = W1.clone()
    _, q, err = gptq.column_step(W1, Hinv1, i, scale, zero, maxq)
    return W1, q, err


def _hinv_upper(n: int, seed: int) -> torch.Tensor:
    H = _spd(n, seed) + 0.01 * torch.eye(n)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def check_column_step(fn: Callable) -> Callable:
    """Exercise: fn(W1, Hinv1, i, scale, zero, maxq) -> (W1 updated, q, err) for one GPTQ column."""
    g = torch.Generator().manual_seed(12)
    cases = []
    for i, bits in ((0, 4), (5, 4), (15, 3), (9, 2)):
        W1 = torch.randn(8, 16, generator=g) * 0.1
        scale, zero = gptq.gptq_qparams(W1[:, :16], bits, sym=False)  # (8, 1) each
        cases.append(Case(f"column {i} of a (8, 16) block, {bits}-bit",
                          (W1, _hinv_upper(16, i), i, scale[:, 0], zero[:, 0], 2**bits - 1)))
    # qparams from a narrower range: after error feedback, weights can leave their group's grid and must clamp
    W1 = torch.randn(8, 16, generator=g) * 0.1
    scale, zero = gptq.gptq_qparams(W1 * 0.5, 3, sym=False)
    cases.append(Case("weights outside the grid (codes must be clamped to [0, maxq])",
                      (W1, _hinv_upper(16, 7), 3, scale[:, 0], zero[:, 0], 7)))
    return run_check("Exercise 2 · gptq_column_step", fn, _column_step, cases, atol=1e-5,
                     hint="w = W1[:, i]; d = Hinv1[i, i]; q = (clamp(round(w / scale) + zero, 0, maxq) - zero) * scale; "
                          "err = (w - q) / d; W1[:, i:] -= outer(err, Hinv1[i, i:]) (only columns i and later).")


def check_act_order(fn: Callable) -> Callable:
    """Exercise: fn(H, group_size) -> (perm, g_idx) for act-order with dynamic groups."""
    cases = [Case(f"({n}, {n}) Hessian, group {gs}", (_spd(n, seed), gs))
             for n, gs, seed in ((16, 4, 3), (32, 8, 4), (24, 24, 5), (64, 16, 6))]
    return run_check("Exercise 4 · act_order", fn, gptq.act_order_permutation, cases, atol=0,
                     hint="perm = argsort(diag(H), descending=True); column perm[j] is quantized j-th, so "
                          "g_idx[perm[j]] = j // group_size (equivalently g_idx = argsort(perm) // group_size).")


def check_reconstruction_error(fn: Callable) -> Callable:
    """Exercise: fn(W, W_hat, X) -> scalar ||X W^T - X W_hat^T||_F^2; W (out, in), X (tokens, in)."""
    g = torch.Generator().manual_seed(13)
    cases = []
    for out_f, in_f, tokens in ((6, 16, 20), (16, 8, 5), (12, 12, 30)):
        W = torch.randn(out_f, in_f, generator=g)
        X = torch.randn(tokens, in_f, generator=g) * torch.linspace(0.1, 4.0, in_f)  # uneven input scales
        cases.append(Case(f"W ({out_f}, {in_f}), X ({tokens}, {in_f})", (W, quant.fake_quantize(W, 3, in_f), X)))
    return run_check("Exercise 3 · reconstruction_error", fn, gptq.reconstruction_error, cases, rtol=1e-5,
                     hint="the error lives in the layer's OUTPUTS: ((X @ W.T - X @ W_hat.T) ** 2).sum(), "
                          "a scalar; not the weight difference alone.")


# ----------------------------------------------------------------------------- lab 03 cases (activation quantization)


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
                       hint="in float32: scale = x.abs().amax(dim=-1, keepdim=True) / 448 (one per token; 448 is "
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
                       hint="w_amax = max |W_ij| over the rows (dim=0) of EVERY weight (stack them, then max): one "
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
                       hint="for i in range(grid): s = X.abs().mean(dim=0) ** (i / grid) (mean |x| over tokens, not "
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
                     hint="s_t = w.abs().max() / (448 * 6) (the whole tensor); blocks = w.reshape(-1, 16); scale = "
                          "(blocks.abs().amax(-1, keepdim=True) / 6 / s_t).clamp(max=448).to(torch.float8_e4m3fn)"
                          ".float(); elements = formats.round_to_e2m1(blocks / (scale * s_t)) (0 where the scale is "
                          "0); return (elements * scale * s_t).reshape(w.shape).")


# ----------------------------------------------------------------------------- lab 04 cases (pruning)


def _act_norm_step(sq, n, x):
    a = pruning.ActNorm(sq.shape[0])
    a.sq, a.n = sq.clone(), n
    a.add_batch(x)
    return a.sq, a.n


def check_accumulate_act_norm(fn: Callable) -> Callable:
    """Exercise: fn(sq, n, x) -> (sq_new, n_new): running mean over tokens of x_j^2 per input channel; x (..., in)."""
    g = torch.Generator().manual_seed(21)
    cases = [
        Case("first batch (2, 16, 32) from sq = 0, n = 0 (n counts tokens, not sequences)",
             (torch.zeros(32), 0, torch.randn(2, 16, 32, generator=g))),
        Case("a later batch: the old mean must be re-weighted by n / (n + b)",
             (torch.rand(24, generator=g) * 3, 40, torch.randn(1, 8, 24, generator=g) * 2)),
        Case("2-D input (tokens, in) with 10 tokens and one loud channel",
             (torch.rand(16, generator=g), 6, torch.randn(10, 16, generator=g) * torch.linspace(0.1, 20, 16))),
    ]
    return run_check("Exercise 1 · accumulate_act_norm", fn, _act_norm_step, cases, rtol=1e-5,
                     hint="x = x.reshape(-1, in); b = rows (tokens); sq = sq * n / (n + b) + (x ** 2).sum(0) / (n + b); "
                          "n += b; return sq, n. Squares, not absolute values; a mean, not a sum.")


def _row_scores(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and activation norms where the act norms change the ranking: a few loud input channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    act = torch.rand(cols, generator=g) + 0.1
    act[torch.randperm(cols, generator=g)[: max(1, cols // 8)]] *= 30  # outlier features
    W[: rows // 2] *= 4  # rows of very different scale: a per-layer threshold would empty the quiet rows
    return W, act


def _wanda_row_mask(W, act_norm, sparsity):
    return pruning.wanda_mask(W, act_norm, sparsity)


def check_wanda_mask(fn: Callable) -> Callable:
    """Exercise: fn(W, act_norm, sparsity) -> bool keep-mask (out, in): per row, prune int(sparsity * in) lowest
    |W_ij| * act_norm_j."""
    cases = []
    for rows, cols, s, seed in ((8, 16, 0.5, 1), (6, 20, 0.3, 2), (4, 10, 0.25, 3), (4, 32, 0.75, 5),
                                (5, 10, 0.0, 4)):
        W, act = _row_scores(rows, cols, seed)
        k = f" (int({s} * {cols}) = {int(s * cols)} per row)" if s * cols != int(s * cols) else ""
        cases.append(Case(f"W ({rows}, {cols}), sparsity {s}{k}", (W, act, s)))
    return run_check("Exercise 2 · wanda_mask", fn, _wanda_row_mask, cases, atol=0,
                     hint="score = W.abs() * act_norm[None, :]; k = int(sparsity * in_features); in EVERY ROW set the "
                          "k lowest scores to False (score.argsort(dim=1)[:, :k]); return a bool tensor, True = keep.")


def check_nm_mask(fn: Callable) -> Callable:
    """Exercise: fn(score, n, m) -> bool keep-mask: in each run of m consecutive columns of a row keep the n largest."""
    g = torch.Generator().manual_seed(22)
    cases = [Case(f"score ({r}, {c}), {n}:{m}", (torch.randn(r, c, generator=g).abs(), n, m))  # no ties
             for r, c, n, m in ((4, 16, 2, 4), (3, 24, 4, 8), (8, 8, 2, 4), (2, 12, 1, 4))]
    return run_check("Exercise 3 · nm_mask", fn, pruning.nm_mask, cases, atol=0,
                     hint="view the score as (out, in // m, m); topk(n, dim=-1) gives the kept positions in each group; "
                          "scatter True there, reshape back to (out, in). Groups run along a row, never down a column.")


def _sparsegpt_step(W1, Hinv1, i, keep):
    W1 = W1.clone()
    q = W1[:, i] * keep
    err = gptq.propagate_error(W1, Hinv1, i, q)
    return W1, q, err


def check_sparsegpt_step(fn: Callable) -> Callable:
    """Exercise: fn(W1, Hinv1, i, keep) -> (W1 updated, q, err): prune column i of a block where keep (out,) is
    False and push the error onto columns i.. with the OBS update."""
    g = torch.Generator().manual_seed(23)
    cases = []
    for i, n in ((0, 16), (5, 16), (15, 16), (3, 8)):
        W1 = torch.randn(6, n, generator=g)
        keep = torch.rand(6, generator=g) > 0.5
        keep[0], keep[1] = True, False  # at least one kept and one pruned row
        cases.append(Case(f"column {i} of a (6, {n}) block, rows {keep.logical_not().nonzero().flatten().tolist()} "
                          "pruned", (W1, _hinv_upper(n, 30 + i), i, keep)))
    return run_check("Exercise 4 · sparsegpt_step", fn, _sparsegpt_step, cases, atol=1e-5,
                     hint="q = W1[:, i] * keep (a pruned weight rounds to 0, a kept one to itself); "
                          "err = (W1[:, i] - q) / Hinv1[i, i]; W1[:, i:] -= outer(err, Hinv1[i, i:]); return W1, q, err.")


# ----------------------------------------------------------------------------- lab 05 cases (distillation)


def _logit_pair(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits of one shape that disagree, so every divergence and direction differs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


def check_softmax_T(fn: Callable) -> Callable:
    """Exercise: fn(logits, T) -> softmax of logits / T over the last dimension."""
    g = torch.Generator().manual_seed(40)
    z = torch.randn(3, 7, generator=g) * 2
    cases = [Case("T = 1 (the plain softmax)", (z, 1.0)),
             Case("T = 2 (divide the logits by T: flatter)", (z, 2.0)),
             Case("T = 0.5 (sharper)", (z, 0.5)),
             Case("T = 4 given as an int", (z, 4)),
             Case("(2, 3, 5) logits: softmax over the LAST dim (the vocabulary)", (torch.randn(2, 3, 5, generator=g), 2.0)),
             Case("logits near 1000, T = 1 (exp overflows unless you subtract the max or use torch.softmax)",
                  (z * 10 + 1000, 1.0)),
             Case("logits near 1000, T = 0.5 (overflow once divided by T)", (z * 10 + 1000, 0.5))]
    return run_check("Exercise 1 · softmax_T", fn, distill.softmax_T, cases, atol=1e-4,
                     hint="torch.softmax(logits / T, dim=-1): divide (not multiply) by T, normalise over the vocabulary "
                          "axis, and let torch subtract the max so large logits do not overflow.")


def _soft_forward(student_logits, teacher_logits, T):
    return distill.kd_loss(student_logits, teacher_logits, None, T, alpha=0.0, kind="forward")


def _soft_reverse(student_logits, teacher_logits, T):
    return distill.kd_loss(student_logits, teacher_logits, None, T, alpha=0.0, kind="reverse")


def _kd_cases(seed: int) -> list[Case]:
    cases = []
    for shape, T in (((2, 3, 9), 1.0), ((2, 3, 9), 2.0), ((1, 4, 6), 4.0), ((3, 1, 11), 2.0), ((5, 9), 2.0)):
        s, t = _logit_pair(shape, seed + len(cases))
        label = f"logits {shape}, T = {T}" + (" (2-D: positions x vocabulary, as the lab calls it later)"
                                              if len(shape) == 2 else "")
        cases.append(Case(label, (s.requires_grad_(True), t, T)))  # the loss must keep the student's gradient
    return cases


def check_soft_loss(fn: Callable) -> Callable:
    """Exercise: fn(student_logits, teacher_logits, T) -> T^2 * mean over positions of KL(p_teacher,T || q_student,T)."""
    return run_check("Exercise 2 · soft_loss", fn, _soft_forward, _kd_cases(41), atol=1e-5, rtol=1e-5,
                     hint="p = softmax(teacher / T), log_q = log_softmax(student / T) over the vocabulary; KL = "
                          "sum_v p (log p - log_q) for each position; average over positions (every leading dim: batch AND sequence, "
                          "not over the vocabulary) and multiply by T**2.")


def check_reverse_kl(fn: Callable) -> Callable:
    """Exercise: fn(student_logits, teacher_logits, T) -> T^2 * mean over positions of KL(q_student,T || p_teacher,T)."""
    return run_check("Exercise 3 · reverse_kl", fn, _soft_reverse, _kd_cases(51), atol=1e-5, rtol=1e-5,
                     hint="the same as exercise 2 with the roles swapped: weight by the STUDENT's probabilities, "
                          "sum_v q (log q - log p); still per position, averaged, times T**2.")


def check_kd_loss(fn: Callable) -> Callable:
    """Exercise: fn(student_logits, teacher_logits, labels, T, alpha) -> alpha * CE + (1 - alpha) * T^2 * forward KL,
    both averaged over the positions whose label is not -100."""
    cases = []
    for shape, T, alpha, n_ignored in (((2, 5, 8), 2.0, 0.5, 3), ((2, 5, 8), 1.0, 0.3, 4), ((1, 6, 7), 4.0, 0.0, 2),
                                       ((1, 6, 7), 2.0, 1.0, 2), ((3, 2, 10), 2.0, 0.7, 0)):
        s, t = _logit_pair(shape, 60 + len(cases))
        g = torch.Generator().manual_seed(70 + len(cases))
        labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
        labels.view(-1)[torch.randperm(labels.numel(), generator=g)[:n_ignored]] = -100
        cases.append(Case(f"logits {shape}, T = {T}, alpha = {alpha}, {n_ignored} labels are -100",
                          (s.requires_grad_(True), t, labels, T, alpha)))
    return run_check("Exercise 4 · kd_loss", fn, distill.kd_loss, cases, atol=1e-5, rtol=1e-5,
                     hint="mask = labels != -100; keep only those positions (logits[mask] is (n, V)) for BOTH terms; "
                          "CE = cross_entropy(student[mask], labels[mask]); soft = T**2 * mean KL(teacher_T || "
                          "student_T) over the same positions; return alpha * CE + (1 - alpha) * soft.")


# ----------------------------------------------------------------------------- lab 06 cases (KV cache)


def _keys(shape: tuple[int, ...], seed: int, outlier_channel: int | None = None, offset: float = 0.0) -> torch.Tensor:
    """Key-like states (b, h, t, d): Gaussian, one channel 20x larger (the outlier channel), an optional offset."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=g) + offset
    if outlier_channel is not None:
        k[..., outlier_channel] *= 20
    return k


def fake_quantize_keys_per_channel(k: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Reference for exercise 1, in float32: groups of group_size consecutive TOKENS of one channel, asymmetric with
    the group minimum as zero point, codes 0 .. 2^b - 1."""
    b, h, t, d = k.shape
    g = k.float().reshape(b, h, t // group_size, group_size, d)  # (b, h, n_groups, group_size, d)
    mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).clamp_min(1e-8)
    q = torch.round((g - mn) / scale).clamp(0, 2**bits - 1)
    return (q * scale + mn).reshape(b, h, t, d)


def check_quantize_keys(fn: Callable) -> Callable:
    """Exercise: fn(k (b, h, t, d), bits, group_size) -> k quantized per channel in groups of tokens, dequantized."""
    cases = [Case("(1, 2, 128, 8), 2 bits, groups of 64 tokens, channel 3 an outlier channel",
                  (_keys((1, 2, 128, 8), 80, outlier_channel=3), 2, 64)),
             Case("(2, 3, 64, 16), 4 bits, groups of 32 tokens", (_keys((2, 3, 64, 16), 81), 4, 32)),
             Case("(1, 1, 96, 12), 2 bits, groups of 32, every value offset by +5 (the minimum is the zero point)",
                  (_keys((1, 1, 96, 12), 82, offset=5.0), 2, 32)),
             Case("(1, 2, 64, 64), 8 bits, one group of 64 tokens", (_keys((1, 2, 64, 64), 83, outlier_channel=0), 8, 64)),
             Case("(1, 1, 32, 4), 2 bits, groups of 8 tokens (a token count that is not a power of 4 times the group)",
                  (_keys((1, 1, 32, 4), 84), 2, 8)),
             Case("(1, 1, 64, 4), 2 bits, g32, channel 1 constant (max = min: the scale must not be 0)",
                  (_keys((1, 1, 64, 4), 79).index_fill_(-1, torch.tensor([1]), 0.5), 2, 32))]
    return run_check("Exercise 1 · quantize_keys_per_channel", fn, fake_quantize_keys_per_channel, cases, atol=1e-4,
                     rtol=1e-5,
                     hint="reshape k (b, h, t, d) to (b, h, t // g, g, d) so a group runs along TOKENS; min and max over "
                          "that g axis (dim 3); scale = (max - min) / (2**bits - 1); q = round((k - min) / scale) "
                          "clamped to [0, 2**bits - 1]; return q * scale + min reshaped to (b, h, t, d).")


def _outlier_cases() -> list[Case]:
    g = torch.Generator().manual_seed(85)
    skewed = torch.randn(2, 2, 64, 16, generator=g).exp()  # all positive, long right tail: |x| ranks only the top
    return [Case("(1, 2, 200, 8) keys, 2 % per channel (dim=-2, along tokens)", (_keys((1, 2, 200, 8), 86), 0.02, -2)),
            Case("(1, 2, 16, 64) values, 4 % per token (dim=-1, along channels)", (_keys((1, 2, 16, 64), 87), 0.04, -1)),
            Case("skewed positive values, 10 % along dim=-1: the smallest are outliers too (not only the largest |x|)",
                 (skewed, 0.10, -1)),
            Case("(2, 1, 128, 16), 5 % along tokens, with an outlier channel", (_keys((2, 1, 128, 16), 88, 5), 0.05, -2)),
            Case("ratio 0: no outliers", (_keys((1, 1, 32, 8), 89), 0.0, -1)),
            Case("(1, 1, 192, 8), 2 % along tokens: 1.92 per side rounds to 2 (use kvcache.outliers_per_side)",
                 (_keys((1, 1, 192, 8), 78), 0.02, -2))]


def check_outlier_mask(fn: Callable) -> Callable:
    """Exercise: fn(x, ratio, dim) -> bool mask of the k largest and k smallest entries of every vector along dim."""
    return run_check("Exercise 2 · outlier_mask", fn, kvcache.outlier_mask, _outlier_cases(),
                     hint="k = kvcache.outliers_per_side(x.shape[dim], ratio); mask = zeros_like(x, dtype=bool); "
                          "scatter True at x.topk(k, dim).indices AND at x.topk(k, dim, largest=False).indices. "
                          "Signed largest and smallest, not the largest |x|; ratio is the total (half per side).")


def _lowrank_reference(R: torch.Tensor, Q0: torch.Tensor, iters: int) -> torch.Tensor:
    P, Q = kvcache.power_iteration(R, Q0, iters)
    return P @ Q.mT


def _slow_spectrum(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A residual-like (..., n, d) matrix whose singular values decay slowly, so every iteration changes the answer."""
    g = torch.Generator().manual_seed(seed)
    n, d = shape[-2:]
    U = torch.linalg.qr(torch.randn(*shape[:-2], n, d, generator=g)).Q
    V = torch.linalg.qr(torch.randn(*shape[:-2], d, d, generator=g)).Q
    s = 0.85 ** torch.arange(d, dtype=torch.float32)
    return (U * s) @ V.mT


def check_lowrank(fn: Callable) -> Callable:
    """Exercise: fn(R (..., n, d), Q0 (d, r), iters) -> the rank-r approximation P @ Q^T after `iters` rounds."""
    g = torch.Generator().manual_seed(90)
    cases = [Case("R (40, 12), rank 2, 3 rounds", (_slow_spectrum((40, 12), 91), torch.randn(12, 2, generator=g), 3)),
             Case("R (2, 3, 64, 16) per head, rank 4, 3 rounds (batched: use .mT, not .T)",
                  (_slow_spectrum((2, 3, 64, 16), 92), torch.randn(16, 4, generator=g), 3)),
             Case("R (64, 16), rank 4, 1 round", (_slow_spectrum((64, 16), 93), torch.randn(16, 4, generator=g), 1)),
             Case("R (50, 10), rank 3, 5 rounds", (_slow_spectrum((50, 10), 94), torch.randn(10, 3, generator=g), 5))]
    return run_check("Exercise 3 · lowrank_residual", fn, _lowrank_reference, cases, atol=1e-4, rtol=1e-4,
                     hint="repeat iters times: P = torch.linalg.qr(R @ Q).Q (orthonormal columns), then Q = R.mT @ P; "
                          "return P @ Q.mT. Start from the Q0 given, run exactly `iters` rounds.")


def check_gear_nbytes(fn: Callable) -> Callable:
    """Exercise: fn(tokens, head_dim, bits, group_size, rank, n_outliers, index_bytes) -> bytes of one head's block."""
    cases = [Case("512 tokens x 64, 2 bits, g64, rank 4, 640 outliers with 2-byte indices", (512, 64, 2, 64, 4, 640, 2)),
             Case("64 x 64, 4 bits, g32, rank 2, 128 outliers with 1-byte indices", (64, 64, 4, 32, 2, 128, 1)),
             Case("no low rank, no outliers (KIVI): codes and scales only", (256, 128, 2, 64, 0, 0, 2)),
             Case("1024 x 128, 8 bits, g128, rank 8, 2560 outliers, 4-byte indices", (1024, 128, 8, 128, 8, 2560, 4))]
    return run_check("Exercise 4 · gear_nbytes", fn, kvcache.gear_nbytes, cases, atol=0,
                     hint="codes: tokens * head_dim * bits / 8 bytes; per group an fp16 scale AND an fp16 minimum "
                          "(4 bytes x tokens * head_dim / group_size); each outlier: a 2-byte value plus index_bytes; "
                          "low rank: BOTH fp16 factors, P (tokens x rank) and Q (head_dim x rank).")


# ----------------------------------------------------------------------------- lab 02 (optional): a Triton GEMV


def _gemv_case(n: int, k: int, group_size: int, seed: int, nonneg_group: bool = False) -> tuple:
    """(x (K,) fp16, qweight, qzeros, scales, group_size) of a random W in the GPTQ v1 layout."""
    from .kernels import w4a16

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.5, 2.0, n)[:, None]  # columns differ in scale
    w += torch.randn(n, 1, generator=g)  # and in offset: zero points vary from column to column
    if nonneg_group:  # a group whose minimum is >= 0 has zero point 0, stored (v1: minus one) as 15
        w[:, :group_size] = w[:, :group_size].abs() + 0.1
    x = torch.randn(k, generator=g).half()
    return (x, *w4a16.rtn_gptq(w, group_size)[:3], group_size)


def _gemv_reference(x, qweight, qzeros, scales, group_size):
    from .kernels import w4a16

    return w4a16.w4a16_matmul_ref(x[None], qweight, qzeros, scales, None, group_size)[0]


def _not_done_through_triton(fn: Callable) -> Callable:
    """Triton wraps an exception raised inside a kernel (interpreter) or refuses to compile `raise` (GPU):
    an unfinished kernel still counts as NOT DONE, not FAILED."""
    def call(*args):
        try:
            return fn(*args)
        except NotImplementedError:
            raise
        except Exception as err:
            if isinstance(err.__cause__, NotImplementedError) or "NotImplementedError" in str(err):
                raise NotImplementedError from err
            raise
    return call


def check_dequant_gemv(fn: Callable) -> Callable:
    """Exercise (lab 02, optional): fn(x (K,) fp16, qweight, qzeros, scales, group_size) -> W x (N,) in fp16."""
    cases = [Case("one group, one block of 32 outputs", _gemv_case(32, 32, 32, 1)),
             Case("K = 128: codes in all eight nibbles of each word, four groups (scale of group k // group_size)",
                  _gemv_case(32, 128, 32, 2)),
             Case("a group with zero point 0, stored as 15 (v1 keeps zero - 1; add 1 back modulo 16)",
                  _gemv_case(64, 64, 32, 3, nonneg_group=True)),
             Case("N = 72 is not a multiple of the block: mask the last columns", _gemv_case(72, 64, 64, 4)),
             Case("group_size 64 over K = 192", _gemv_case(40, 192, 64, 5))]
    wrapped = _not_done_through_triton(fn)
    got = run_check("Optional · dequant_gemv (Triton)", wrapped, _gemv_reference, cases,
                     atol=2e-2, rtol=2e-3,
                     hint="row k of qweight's word k // 8 holds code k at bits 4 * (k % 8); the group of row k is "
                          "k // GROUP_SIZE; the zero of column n sits in qzeros[g, n // 8] at bits 4 * (n % 8), plus "
                          "one, & 0xF; w = (q - z) * scale; accumulate sum_k x[k] * w[k, n] in float32.")
    return fn if got is wrapped else got  # the lab keeps the participant's own function when it passed


# ----------------------------------------------------------------------------- lab 07 (deployment)

SMOLLM_LINEAR, SMOLLM_OTHER = 106_168_320, 28_346_688  # SmolLM2-135M: decoder Linears / embeddings + norms


def check_weight_bytes(fn: Callable) -> Callable:
    """Exercise: fn(linear_params, other_params, bits, group_size) -> bytes of the weights one decode step reads."""
    cases = [Case("fp16 (bits=16): 2 bytes per parameter, no scales", (SMOLLM_LINEAR, SMOLLM_OTHER, 16, None)),
             Case("4-bit g64: codes + per group an fp16 scale and a 4-bit zero; embeddings stay fp16",
                  (SMOLLM_LINEAR, SMOLLM_OTHER, 4, 64)),
             Case("3-bit g64: bits / 8 is not a whole number of bytes", (SMOLLM_LINEAR, SMOLLM_OTHER, 3, 64)),
             Case("2-bit g32: smaller groups cost more scales", (SMOLLM_LINEAR, SMOLLM_OTHER, 2, 32)),
             Case("8-bit g128, a 1B-class model", (1_000_000_000, 260_000_000, 8, 128))]
    return run_check("Exercise 1 · weight_bytes", fn, deploy.weight_bytes_at, cases, atol=0.5, rtol=1e-9,
                     hint="Linears: linear_params * bits / 8 (use /, not //), plus linear_params / group_size groups "
                          "of (2 bytes fp16 scale + bits / 8 for the zero point); other_params stay 2 bytes each; "
                          "bits == 16 is plain fp16 with no scales.")


def check_decode_bound(fn: Callable) -> Callable:
    """Exercise: fn(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_GBps) -> tokens/s upper bound."""
    w16 = deploy.weight_bytes_at(SMOLLM_LINEAR, SMOLLM_OTHER, 16)
    w4 = deploy.weight_bytes_at(SMOLLM_LINEAR, SMOLLM_OTHER, 4, 64)
    cases = [Case("empty cache (context 0), batch 1, H100: weights only", (w16, 23040, 0, 1, 3350.0)),
             Case("batch 1 at 2048 tokens of context: the KV cache is read too", (w4, 23040, 2048, 1, 3350.0)),
             Case("batch 16: weights read once for all sequences, KV once per sequence", (w4, 23040, 2048, 16, 2039.0)),
             Case("T4 at 8k context, batch 64: the KV cache dominates", (w16, 23040, 8192, 64, 320.0)),
             Case("bandwidth in GB/s means 1e9 bytes per second", (1e9, 0.0, 0, 1, 1.0))]
    return run_check("Exercise 2 · decode_bound", fn, deploy.decode_bound, cases, atol=0, rtol=1e-9,
                     hint="bytes per step = weight_bytes + batch * context * kv_bytes_per_token; a step produces "
                          "`batch` tokens; tokens/s = batch * bandwidth_GBps * 1e9 / bytes per step.")


def check_paged_kv_tokens(fn: Callable) -> Callable:
    """Exercise: fn(cache_bytes, kv_bytes_per_token, block_size) -> tokens a paged KV cache holds."""
    cases = [Case("1 GiB, SmolLM2-135M in bf16 (23 040 bytes per token), blocks of 16", (2**30, 23040, 16)),
             Case("4 GiB, an 8B model with 8 KV heads (131 072 bytes per token), blocks of 16", (4 * 2**30, 131072, 16)),
             Case("a cache that ends in the middle of a block: only whole blocks count", (10 * 23040 * 16 + 5, 23040, 16)),
             Case("blocks of 32", (2**30, 23040, 32)),
             Case("less than one block", (23040 * 15, 23040, 16))]
    return run_check("Exercise 4 · paged_kv_tokens", fn, deploy.paged_kv_tokens, cases, atol=0,
                     hint="whole blocks only: blocks = cache_bytes // (kv_bytes_per_token * block_size), then tokens = "
                          "blocks * block_size. cache_bytes is in bytes (1 GiB = 2**30, not 1e9).")


def check_latency_stats(fn: Callable) -> Callable:
    """Exercise: fn(t_request, token_times) -> (ttft_s, inter_token_s, decode_tokens_per_s)."""
    cases = [Case("prefill 0.5 s, then a token every 0.1 s", (10.0, [10.5 + 0.1 * i for i in range(8)])),
             Case("fast prefill, slow decode (the first token is not a decode step)",
                  (0.0, [0.02, 0.27, 0.52, 0.77, 1.02])),
             Case("jittered token times: average over the whole decode span", (3.0, [3.9, 4.0, 4.25, 4.3, 4.6, 4.62])),
             Case("two tokens: one decode interval", (100.0, [100.25, 100.3]))]
    return run_check("Exercise 3 · latency_stats", fn, deploy.latency_stats, cases, atol=1e-9, rtol=1e-9,
                    hint="TTFT = token_times[0] - t_request (prefill + first token); inter-token latency = "
                         "(last - first) / (n - 1) over the n - 1 decode steps; decode tokens/s = 1 / that. Seconds.")


# ----------------------------------------------------------------------------- lab 08 cases


def _spectrum_matrix(d_out: int, d_in: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    """A (d_out, d_in) matrix with distinct, geometrically decaying singular values: its truncation is unique."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    U = torch.linalg.qr(torch.randn(d_out, k, generator=g)).Q  # (d_out, k)
    V = torch.linalg.qr(torch.randn(d_in, k, generator=g)).Q  # (d_in, k)
    return (U * decay ** torch.arange(k, dtype=torch.float32)) @ V.T


def _factors_product(out, d_out: int, d_in: int, rank: int) -> torch.Tensor:
    """A @ B after checking that fn returned two thin factors (d_out, rank) and (rank, d_in)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"return two factors (A, B), got {type(out).__name__}")
    A, B = out
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
        raise TypeError(f"return torch tensors, got {type(A).__name__} and {type(B).__name__} (torch.from_numpy converts)")
    if tuple(A.shape) != (d_out, rank) or tuple(B.shape) != (rank, d_in):
        raise ValueError(f"A is {tuple(A.shape)} and B {tuple(B.shape)}; expected A ({d_out}, {rank}) and "
                         f"B ({rank}, {d_in}): two thin factors, or nothing is saved")
    return A.double() @ B.double()


def _check_factors(name: str, fn: Callable, reference: Callable, cases: list[Case], hint: str) -> Callable:
    """Check factor pairs by their product (how S is split between A and B is the participant's choice)."""
    def dims(W, rank):
        return W.shape[0], W.shape[1], rank

    def got(*args):
        return _factors_product(fn(*args), *dims(args[0], args[-1]))

    def expected(*args):
        return _factors_product(reference(*args), *dims(args[0], args[-1]))

    expected.__module__, expected.__name__ = reference.__module__, reference.__name__
    chosen = run_check(name, got, expected, cases, hint=hint, atol=1e-4, rtol=1e-4)
    return fn if chosen is got else reference


def _asvd_reference(W: torch.Tensor, scale: torch.Tensor, rank: int):
    return lowrank.svd_factors(W, rank, scale)


_asvd_reference.__module__, _asvd_reference.__name__ = "compresslab.lowrank", "svd_factors(W, rank, scale)"


def check_truncated_svd(fn: Callable) -> Callable:
    """Exercise: fn(W (d_out, d_in), rank) -> (A (d_out, rank), B (rank, d_in)), A @ B the best rank-r approximation."""
    cases = [Case("square 48 x 48, rank 8", (_spectrum_matrix(48, 48, 70), 8)),
             Case("tall 96 x 32 (an up/gate projection's shape), rank 5", (_spectrum_matrix(96, 32, 71), 5)),
             Case("wide 24 x 80 (a down projection's shape), rank 6", (_spectrum_matrix(24, 80, 72), 6)),
             Case("rank 1: only the top singular direction", (_spectrum_matrix(40, 30, 73), 1)),
             Case("full rank min(d_out, d_in): exact reconstruction", (_spectrum_matrix(20, 36, 74), 20))]
    return _check_factors("Exercise 1 · truncated_svd", fn, lowrank.svd_factors, cases,
                          hint="U, S, Vh = torch.linalg.svd(W, full_matrices=False) (S sorted largest first); keep the "
                               "first `rank`: A = U[:, :r] * S[:r].sqrt(), B = S[:r].sqrt()[:, None] * Vh[:r].")


def check_break_even_rank(fn: Callable) -> Callable:
    """Exercise: fn(d_out, d_in) -> the largest rank r with r (d_out + d_in) < d_out d_in."""
    cases = [Case("576 x 576 (SmolLM2 q_proj): 288 * 1152 == 576 * 576 exactly, and equal saves nothing", (576, 576)),
             Case("1536 x 576 (up_proj)", (1536, 576)),
             Case("192 x 576 (k_proj: 3 KV heads of 64)", (192, 576)),
             Case("4096 x 14336 (a Llama-3-8B MLP)", (4096, 14336)),
             Case("4096 x 11008 (a Llama-2-7B MLP): 2985.2 — round up, then step below", (4096, 11008)),
             Case("3 x 6: 2 * 9 == 18 exactly", (3, 6)),
             Case("2 x 3: 1.2 — rank 1 saves one number", (2, 3)),
             Case("1 x 1: no rank saves anything", (1, 1))]

    def as_int(d_out, d_in):
        r = fn(d_out, d_in)
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"return an int (a rank), got {type(r).__name__} {r!r}")
        return r

    as_int.__name__ = getattr(fn, "__name__", "break_even_rank")
    chosen = run_check("Exercise 2 · break_even_rank", as_int, lowrank.break_even_rank, cases, atol=0,
                     hint="A and B store r * (d_out + d_in) numbers, W stores d_out * d_in: you need the largest "
                          "integer r with r * (d_out + d_in) < d_out * d_in (strictly: equal saves nothing).")
    return fn if chosen is as_int else chosen


def _channel_scale(d_in: int, seed: int) -> torch.Tensor:
    """An ASVD-like input-channel scale: mostly ~1, a few outlier channels 5-20x."""
    g = torch.Generator().manual_seed(seed)
    s = 0.5 + torch.rand(d_in, generator=g)
    s[torch.randperm(d_in, generator=g)[:3]] = torch.tensor([5.0, 12.0, 20.0])
    return s


def check_asvd_factors(fn: Callable) -> Callable:
    """Exercise: fn(W (d_out, d_in), scale (d_in,), rank) -> (A, B): truncate W diag(scale), fold 1/scale into B."""
    cases = [Case("tall 64 x 32 with three outlier input channels, rank 6",
                  (_spectrum_matrix(64, 32, 75, 0.9), _channel_scale(32, 76), 6)),
             Case("wide 24 x 48, rank 4 (scale the COLUMNS: one entry per input channel)",
                  (_spectrum_matrix(24, 48, 77, 0.9), _channel_scale(48, 78), 4)),
             Case("square 40 x 40, rank 10 (rows vs columns only differ in value here)",
                  (_spectrum_matrix(40, 40, 79, 0.9), _channel_scale(40, 80), 10)),
             Case("all-ones scale: ASVD equals plain SVD", (_spectrum_matrix(30, 20, 81), torch.ones(20), 3))]
    return _check_factors("Exercise 3 · asvd_factors", fn, _asvd_reference, cases,
                          hint="truncate W * scale (column j times scale[j]) exactly as in exercise 1, then undo the "
                               "scaling on the input side: B = B / scale, so A @ B approximates W itself.")


__all__ = ["run_check", "summary", "check_qparams", "check_quant_dequant",
                      "check_fake_quantize_groups", "check_pack_int4", "check_accumulate_hessian", "check_column_step",
           "check_act_order", "check_reconstruction_error", "check_fp8_per_token", "check_smoothing",
           "check_awq_search", "check_nvfp4", "check_accumulate_act_norm", "check_wanda_mask",
           "check_nm_mask", "check_sparsegpt_step", "check_softmax_T", "check_soft_loss", "check_reverse_kl",
           "check_kd_loss", "check_quantize_keys", "check_outlier_mask", "check_lowrank", "check_gear_nbytes",
           "check_dequant_gemv", "check_weight_bytes", "check_decode_bound", "check_latency_stats",
           "check_truncated_svd", "check_break_even_rank", "check_asvd_factors",
           "STATUS", "Case"]
