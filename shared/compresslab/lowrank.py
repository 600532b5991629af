"""Low-rank factorization of Linear layers (lab 08), top to bottom.

    W (d_out, d_in)  ~=  A (d_out, r) @ B (r, d_in)          y = x W^T  ->  y = (x B^T) A^T: two thin matmuls

1. Truncated SVD: W = U S V^T; keeping the r largest singular values is the best rank-r approximation in the
   Frobenius norm (Eckart-Young). A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T.
2. The honest accounting: A and B hold r (d_out + d_in) numbers against d_out d_in, so rank r saves parameters only
   while r < d_out d_in / (d_out + d_in) (288 for a 576 x 576 projection), and time only if the two thin matmuls
   beat one dense one.
3. Activation-aware SVD (ASVD, Yuan et al. 2023): what matters is the output error ||X W^T - X (AB)^T||, and
   input channels with large activations amplify weight error. Scale W's columns by s_j = ||X_j||^alpha, truncate
   W diag(s), then fold 1/s back into B: B = B' diag(1/s).
4. Low-rank error compensation: quantize W, then add a rank-r correction of the residual W - Q(W) (what GEAR does
   for the KV cache in lab 06). With act_norms it is activation-scaled, LQER/ASVD-style: the SVD of
   (W - Q(W)) diag(s) with the same diagonal scale as 3. EoRA proper projects the residual onto the eigenspace of
   X^T X instead (a full, not diagonal, activation metric); that is not implemented here. The correction is stored
   in 16 bits next to the 4-bit codes: it costs 2 r (d_out + d_in) bytes per Linear.

Public API: validate_rank, break_even_rank, lowrank_params, rank_for_ratio, rank_for_energy, svd_factors,
activation_scale, activation_norms, LowRankLinear, lowrank_model, compensate_model, relative_error.
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .layerwise import validate_decoder
from .pruning import ActNorm

DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ----------------------------------------------------------------------------- accounting


def validate_rank(rank, d_out: int, d_in: int) -> int:
    """A usable rank for a (d_out, d_in) matrix, or a clear error."""
    top = min(d_out, d_in)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"rank must be an integer, got {type(rank).__name__} {rank!r}")
    if not 1 <= rank <= top:
        raise ValueError(f"rank must be in [1, min(d_out, d_in)] = [1, {top}] for a {d_out} x {d_in} matrix, "
                         f"got {rank!r} (a rank above {top} cannot exist; rank 0 deletes the layer)")
    return int(rank)


def break_even_rank(d_out: int, d_in: int) -> int:
    """The largest rank that still stores fewer numbers than the dense matrix: r (d_out + d_in) < d_out d_in."""
    return math.ceil(d_out * d_in / (d_out + d_in)) - 1


def lowrank_params(d_out: int, d_in: int, rank: int) -> int:
    return rank * (d_out + d_in)


def rank_for_ratio(d_out: int, d_in: int, ratio: float) -> int:
    """The largest rank whose factors hold at most `ratio` of the dense matrix's parameters (at least 1)."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio is the share of the dense parameters the factors may keep, in (0, 1); got {ratio!r}"
                         " (at ratio >= 1 factorizing saves nothing: keep the dense layer)")
    return max(1, int(ratio * d_out * d_in // (d_out + d_in)))


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep `energy` of sum(S^2) (the squared Frobenius norm)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    total = (S.double() ** 2).sum()
    if total == 0:
        raise ValueError("all singular values are 0 (an all-zero matrix): no rank keeps a share of nothing")
    kept = (S.double() ** 2).cumsum(0) / total  # (k,)
    return int((kept < energy - 1e-12).sum().item()) + 1


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor | None = None) -> float:
    """||W - W_hat||_F / ||W||_F, or with inputs X (tokens, d_in) the output error ||X (W - W_hat)^T|| / ||X W^T||."""
    W, W_hat = W.double(), W_hat.double()
    if X is None:
        return ((W - W_hat).norm() / W.norm()).item()
    X = X.reshape(-1, X.shape[-1]).double()
    return ((X @ (W - W_hat).T).norm() / (X @ W.T).norm()).item()


# ----------------------------------------------------------------------------- the factorization


def activation_scale(act_norm: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """ASVD's per-input-channel scale s_j = ||X_j||^alpha, normalised to mean 1 (d_in,)."""
    s = act_norm.float().clamp_min(1e-6) ** alpha  # (d_in,)
    return s / s.mean()


@torch.no_grad()
def svd_factors(W: torch.Tensor, rank: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> A (d_out, r), B (r, d_in) with A @ B the best rank-r approximation of W (scale=None), or of W diag(s)
    with diag(1/s) folded back into B (ASVD: the error is weighted by how large each input channel's activations are).
    """
    if W.ndim != 2:
        raise ValueError(f"W must be a matrix (d_out, d_in), got shape {tuple(W.shape)}")
    d_out, d_in = W.shape
    validate_rank(rank, d_out, d_in)
    Wf = W.detach().float()
    if scale is not None:
        if scale.shape != (d_in,):
            raise ValueError(f"scale must have one entry per input channel ({d_in},), got {tuple(scale.shape)}")
        Wf = Wf * scale.float()  # (d_out, d_in): column j scaled by s_j
    U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    root = S[:rank].sqrt()  # (r,)
    A = U[:, :rank] * root  # (d_out, r)
    B = root[:, None] * Vh[:rank]  # (r, d_in)
    if scale is not None:
        B = B / scale.float()  # undo the column scaling: A B diag(s) ~= W diag(s)  ->  A (B / s) ~= W
    return A.to(W.dtype), B.to(W.dtype)


class LowRankLinear(nn.Module):
    """y = A (B x) + bias: a Linear replaced by two thin ones (B: d_in -> r, then A: r -> d_out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        validate_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, lin: nn.Linear, rank: int, scale: torch.Tensor | None = None) -> "LowRankLinear":
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"LowRankLinear.from_linear needs an nn.Linear, got {type(lin).__name__} (factorize "
                            "before quantizing: a quantized or already factorized layer has no dense W to split)")
        W = lin.weight.data
        new = cls(lin.in_features, lin.out_features, rank, lin.bias is not None, W.device, W.dtype)
        A, B = svd_factors(W, rank, scale)
        new.A.weight.data.copy_(A)
        new.B.weight.data.copy_(B)
        if lin.bias is not None:
            new.A.bias.data.copy_(lin.bias.data)
        return new

    @property
    def weight(self) -> torch.Tensor:  # the dense equivalent, for analysis only
        return self.A.weight @ self.B.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# ----------------------------------------------------------------------------- the whole model


@torch.no_grad()
def activation_norms(model, calib: torch.Tensor, batch_size: int = 4, names=DECODER_LINEARS,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """||X_j|| / sqrt(tokens) per input channel of every decoder Linear, from one pass of the model over calib
    (n, seq) token ids. Keys: 'model.layers.{i}.{name}'."""
    validate_decoder(model, "activation_norms")
    stats, hooks = {}, []
    for li, layer in enumerate(model.model.layers):
        for name in names:
            lin = layer.get_submodule(name)
            key = f"model.layers.{li}.{name}"
            stats[key] = ActNorm(lin.in_features, lin.weight.device)
            hooks.append(lin.register_forward_hook(lambda m, inp, out, k=key: stats[k].add_batch(inp[0])))
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, calib.shape[0], batch_size), desc="activation statistics", disable=not progress):
            model(calib[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: s.norm() for k, s in stats.items()}


def _targets(model, names, who: str):
    validate_decoder(model, who)
    for li, layer in enumerate(model.model.layers):
        for name in names:
            parent_name, _, child = name.rpartition(".")
            yield f"model.layers.{li}.{name}", layer.get_submodule(parent_name), child


@torch.no_grad()
def lowrank_model(model, ratio: float, act_norms: dict | None = None, alpha: float = 0.5, names=DECODER_LINEARS,
                  inplace: bool = False, progress: bool = True):
    """Replace every decoder Linear by a LowRankLinear keeping `ratio` of its parameters (plain SVD, or ASVD when
    act_norms from activation_norms() are given). -> (model, report {name: rank})."""
    for name in names:
        if name not in DECODER_LINEARS:
            raise ValueError(f"unknown Linear {name!r}; choose from {DECODER_LINEARS}")
    model = model if inplace else copy.deepcopy(model)
    report = {}
    targets = list(_targets(model, names, "lowrank_model"))
    for key, parent, child in tqdm(targets, desc=f"{'ASVD' if act_norms else 'SVD'} {ratio:.0%}",
                                   disable=not progress):
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{key} is a {type(lin).__name__}: factorize a dense model (before quantization, "
                            "and only once)")
        rank = rank_for_ratio(lin.out_features, lin.in_features, ratio)
        scale = activation_scale(act_norms[key], alpha) if act_norms is not None else None
        setattr(parent, child, LowRankLinear.from_linear(lin, rank, scale))
        report[key] = rank
    return model, report


@torch.no_grad()
def compensate_model(quantized, reference, rank: int, act_norms: dict | None = None, alpha: float = 0.5,
                     names=DECODER_LINEARS, progress: bool = True) -> dict[str, int]:
    """Low-rank error compensation, in place: W_q += A B with A B the rank-r approximation of W - W_q, per decoder
    Linear of `quantized` (a fake-quantized copy of `reference`). With act_norms it is activation-scaled,
    LQER/ASVD-style (the diagonal scale of activation_scale), not EoRA's eigenspace projection.

    Adding A B into W_q is the same function as running the rank-r branch beside the 4-bit kernel; the bytes are
    counted as that branch in fp16. -> {name: parameters added}."""
    ref = dict(_named(reference, names))
    targets = list(_targets(quantized, names, "compensate_model"))
    for key, parent, child in targets:  # every check before the first change: never leave the model half done
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear) or not isinstance(ref.get(key), nn.Linear):
            raise TypeError(f"{key}: compensation needs dense (fake-quantized) nn.Linear layers in both models; "
                            "compensate after quantizing, before factorizing or converting to kernels")
        if ref[key].weight.shape != lin.weight.shape:
            raise ValueError(f"{key}: reference {tuple(ref[key].weight.shape)} vs quantized "
                             f"{tuple(lin.weight.shape)} — compensate against the model that was quantized")
        validate_rank(rank, *lin.weight.shape)
    added = {}
    for key, parent, child in tqdm(targets,
                                   desc=f"rank-{rank} compensation", disable=not progress):
        lin = getattr(parent, child)
        W, Wq = ref[key].weight.data, lin.weight.data
        scale = activation_scale(act_norms[key], alpha) if act_norms is not None else None
        A, B = svd_factors(W.float() - Wq.float(), rank, scale)
        lin.weight.data = (Wq.float() + A.float() @ B.float()).to(Wq.dtype)
        added[key] = lowrank_params(*W.shape, rank)
    return added


def _named(model, names):
    for key, parent, child in _targets(model, names, "compensate_model"):
        yield key, getattr(parent, child)
