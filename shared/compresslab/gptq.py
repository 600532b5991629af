"""GPTQ (Frantar et al. 2022), top to bottom, following the reference IST-DASLab/gptq (lab 02).

    H = hessian(calibration inputs)                                   # (in, in) = 2/N sum x x^T
    res = gptq_quantize_weight(W, H, bits=4, group_size=64, act_order=True)
    res.dequantized, res.codes, res.scales, res.zeros, res.g_idx, res.perm, res.damp_used
    qmodel = quantize_model(model, calib, bits=4, group_size=64)      # layer by layer, true-sequential

The idea: quantize W one column at a time; after each column, spread its rounding error over the columns not yet
quantized, weighted by the inverse Hessian of the layer's reconstruction loss ||W X - W_hat X||^2 (the OBS update).
Three tricks make it fast: any column order works nearly as well as the greedy one, so every row shares one order;
updates are applied lazily in blocks of 128 columns; and the row of the shrinking H_F^-1 needed at step i is row i
of the upper Cholesky factor U of H^-1 times sqrt([H_F^-1]_ii) (GPTQ section 3.3), so one factorisation serves all.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .layerwise import SEQUENTIAL, decoder_linears, layer0_inputs, run_layer, step_stats, validate_decoder
from .quant import compute_qparams, gptq_qparams, group_view, search_clip_qparams  # noqa: F401 (gptq_qparams: cl.gptq's)

GPTQ_BITS = (2, 3, 4, 8)

# ----------------------------------------------------------------------------- the Hessian


class Hessian:
    """Running H = 2/N sum_n x_n x_n^T over every calibration token seen by one Linear (float32, (in, in))."""

    def __init__(self, in_features: int, device="cpu"):
        self.H = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if x.shape[-1] != self.H.shape[0]:
            raise ValueError(f"inputs have {x.shape[-1]} features, the Hessian expects {self.H.shape[0]}")
        b = x.shape[0]
        self.H *= self.n / (self.n + b)  # keep a running average ...
        self.n += b
        x = math.sqrt(2 / self.n) * x  # ... of 2 x x^T
        self.H += x.t() @ x


# ----------------------------------------------------------------------------- the GPTQ quantizer (one group)


def column_step(W1: torch.Tensor, Hinv1: torch.Tensor, i: int, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    """The heart of GPTQ: quantize column i of the block W1 (out, B), then push its error onto columns i.. of W1.

    Hinv1 (B, B) is the block of the upper Cholesky factor of H^-1. Updates W1 in place.
    Returns (codes (out,), dequantized q (out,), err (out,) = (w - q) / Hinv1[i, i]).
    """
    codes = torch.clamp(torch.round(W1[:, i] / scale) + zero, 0, maxq)
    q = (codes - zero) * scale
    return codes, q, propagate_error(W1, Hinv1, i, q)


def propagate_error(W1: torch.Tensor, Hinv1: torch.Tensor, i: int, q: torch.Tensor) -> torch.Tensor:
    """The OBS update shared by GPTQ and SparseGPT (lab 04): column i of W1 becomes q (rounded, or pruned to 0);
    its error, scaled by 1 / Hinv1[i, i], is pushed onto columns i.. of W1 in place. Returns err (out,)."""
    err = (W1[:, i] - q) / Hinv1[i, i]
    W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]  # OBS: the remaining columns absorb the error
    return err


def act_order_permutation(H: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """perm: columns by diag(H) descending; g_idx: group of each ORIGINAL column under dynamic groups.

    Column perm[j] is quantized j-th, so it belongs to group j // group_size: g_idx[perm[j]] = j // group_size.
    """
    perm = torch.argsort(torch.diag(H), descending=True)
    return perm, torch.argsort(perm) // group_size


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """||X W^T - X W_hat^T||_F^2 for a Linear's weights (out, in) and inputs X (tokens, in): what GPTQ minimises."""
    return ((X.float() @ (W.float() - W_hat.float()).t()) ** 2).sum()


# ----------------------------------------------------------------------------- one weight matrix


@dataclass
class GPTQResult:
    dequantized: torch.Tensor  # (out, in) float32, the weights the model will use
    codes: torch.Tensor  # (out, in) int codes in [0, 2^bits - 1], original column order
    scales: torch.Tensor  # (out, n_groups)
    zeros: torch.Tensor  # (out, n_groups) integer zero points
    g_idx: torch.Tensor  # (in,) group of each original column
    perm: torch.Tensor | None  # act-order permutation (None without act-order)
    damp_used: float  # the dampening that made H positive definite (fraction of mean diag)
    loss: float  # sum over columns of (w - q)^2 / [H_F^-1]_jj / 2 (= / U_jj^2), GPTQ's own error estimate


def inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int = 10) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in float64; raise damp by 0.01 until it works."""
    mean_diag = torch.mean(torch.diag(H)).item()
    for attempt in range(max_tries):
        d = damp + 0.01 * attempt
        Hd = H.double() + d * mean_diag * torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                return U, d
    raise RuntimeError(f"H is not positive definite even with damp={d:.2f}: too few calibration tokens, "
                       "or a layer whose inputs are all zero. Use more calibration samples.")


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size=64, sym: bool = False,
                         act_order: bool = True, static_groups: bool = False, damp: float = 0.01,
                         lazy_block: int = 128, clip: bool = False) -> GPTQResult:
    """Quantize one Linear weight W (out, in) given its Hessian H (in, in). W and H are not modified."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ supports bits in {GPTQ_BITS} (the packed checkpoint formats), got {bits!r}")
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be (out, in) and H (in, in); got W {tuple(W.shape)} and H {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian has NaN/inf entries: the calibration activations overflowed. "
                         "Run calibration in float32 (load_model(dtype='float32')).")
    out_f, in_f = W.shape
    gs = in_f if group_size in (-1, "channel") else group_size
    group_view(W, gs)  # raises a clear error if gs does not divide in_features
    maxq = 2**bits - 1
    W = W.detach().clone().float()
    H = H.detach().clone().float()

    dead = torch.diag(H) == 0  # inputs that were always zero: nothing to preserve
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups:  # qparams from the original weights, in the original column order
        static = [gptq_qparams(W[:, j : j + gs], bits, sym, clip) for j in range(0, in_f, gs)]

    perm = g_idx_dynamic = None
    if act_order:  # columns with the largest activations first: their error can still be compensated
        perm, g_idx_dynamic = act_order_permutation(H, gs)
        W, H = W[:, perm], H[perm][:, perm]

    if static_groups:  # the group of the column quantized at step col, looked up once (not one .item() per column)
        static_group = ((perm if act_order else torch.arange(in_f, device=W.device)) // gs).tolist()

    Hinv, damp_used = inverse_cholesky(H, damp)  # (in, in) upper, float64
    Hinv = Hinv.float()
    Q = torch.zeros_like(W)  # dequantized, permuted order
    codes = torch.zeros_like(W)
    scales = torch.zeros(out_f, in_f // gs, device=W.device)
    zeros = torch.zeros_like(scales)
    loss = torch.zeros(out_f, device=W.device)
    scale = zero = None

    for i1 in range(0, in_f, lazy_block):
        i2 = min(i1 + lazy_block, in_f)
        W1 = W[:, i1:i2].clone()  # (out, block): updated column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_groups:
                scale, zero = static[static_group[col]]
            elif col % gs == 0:  # dynamic groups: as the reference, from W (updated up to this block)
                scale, zero = gptq_qparams(W[:, col : col + gs], bits, sym, clip)
                scales[:, col // gs], zeros[:, col // gs] = scale[:, 0], zero[:, 0]
            q_code, q, err = column_step(W1, Hinv1, i, scale[:, 0], zero[:, 0], maxq)
            Q[:, col], codes[:, col], Err1[:, i] = q, q_code, err
            loss += err**2 / 2  # = (w - q)^2 / d^2 / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of every later column

    # group of each original column: j // gs, except act-order with dynamic groups, where groups were formed in
    # quantization order (g_idx_dynamic). Static groups were defined on the original order, so j // gs holds.
    g_idx = torch.arange(in_f, device=W.device) // gs
    if static_groups:
        for g, (s, z) in enumerate(static):
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
    if act_order:
        inv = torch.argsort(perm)
        Q, codes = Q[:, inv], codes[:, inv]  # back to the original column order
        g_idx = g_idx if static_groups else g_idx_dynamic
    return GPTQResult(dequantized=Q, codes=codes.to(torch.int16), scales=scales, zeros=zeros, g_idx=g_idx,
                      perm=perm, damp_used=damp_used, loss=loss.sum().item())


# ----------------------------------------------------------------------------- the whole model


@torch.no_grad()
def quantize_model(model, calib: torch.Tensor, bits: int = 4, group_size=64, sym: bool = False,
                   act_order: bool = True, static_groups: bool = False, damp: float = 0.01,
                   lazy_block: int = 128, clip: bool = False, batch_size: int = 8, inplace: bool = False,
                   progress: bool = True):
    """GPTQ every Linear of every decoder layer, layer by layer. Returns (model, report).

    calib: (n_samples, seq_len) token ids. Each layer is calibrated on the outputs of the already-quantized layers
    before it; inside a layer, the SEQUENTIAL groups are quantized in order. report: per-Linear damp and loss, and
    `gptq` results (codes, scales, zeros, g_idx) for export.
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ supports bits in {GPTQ_BITS}, got {bits!r}")
    validate_decoder(model, "quantize_model")
    hidden = model.config.hidden_size
    if calib.numel() < hidden:
        raise ValueError(f"{calib.numel()} calibration tokens cannot estimate a {hidden}x{hidden} Hessian: "
                         f"use at least {hidden} tokens (e.g. 8 samples of 128), 128 x 512 for the best results")
    model = model if inplace else copy.deepcopy(model)
    inputs = layer0_inputs(model, calib, batch_size)
    report = {}
    for li, layer in enumerate(tqdm(model.model.layers, desc=f"GPTQ {bits}-bit", disable=not progress)):
        for names in SEQUENTIAL:
            linears = decoder_linears(layer, names, li, "GPTQ")
            # one Hessian per step, shared by its Linears (they read one tensor; gptq_quantize_weight copies it)
            hessians = step_stats(layer, inputs, linears, lambda m: Hessian(m.in_features, m.weight.device))
            for n, m in linears.items():
                res = gptq_quantize_weight(m.weight.data, hessians[n].H, bits, group_size, sym, act_order,
                                           static_groups, damp, lazy_block, clip)
                m.weight.data = res.dequantized.to(m.weight.dtype)
                report[f"model.layers.{li}.{n}"] = res
        inputs = run_layer(layer, inputs)  # the quantized layer's outputs feed the next layer
    return model, report


def rtn_quantize_model(model, bits: int = 4, group_size=64, sym: bool = False, inplace: bool = False):
    """Round-to-nearest with GPTQ's quantizer, returned like quantize_model: (model, report) — so an RTN model can be
    exported with the same writers (lab 07 serves one when lab 02's GPTQ export is absent).

    It is GPTQ with an identity Hessian: no off-diagonal terms, so no error is propagated and every group's scale
    and zero come from the original weights — exactly RTN. No calibration data."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits must be one of {GPTQ_BITS}, got {bits!r}")
    validate_decoder(model, "rtn_quantize_model")
    model = model if inplace else copy.deepcopy(model)
    report = {}
    for li, layer in enumerate(model.model.layers):
        for n, m in decoder_linears(layer, [n for group in SEQUENTIAL for n in group], li, "RTN").items():
            eye = torch.eye(m.in_features, device=m.weight.device)
            res = gptq_quantize_weight(m.weight.data, eye, bits, group_size, sym, False, False, 0.0, 128, False)
            m.weight.data = res.dequantized.to(m.weight.dtype)
            report[f"model.layers.{li}.{n}"] = res
    return model, report
