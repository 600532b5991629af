"""Pruning (lab 04): magnitude, Wanda, SparseGPT, N:M semi-structured, and structured MLP-neuron pruning.

    keep = magnitude_mask(W, 0.5)                       # (out, in) bool, True where a weight is KEPT
    keep = wanda_mask(W, act_norm, 0.5)                 # |W_ij| * ||X_j||_2, lowest 50 % of each row pruned
    keep = wanda_mask(W, act_norm, n=2, m=4)            # 2:4: keep the 2 best of every 4 consecutive inputs
    W_sparse = sparsegpt_prune(W, H, 0.5)               # mask + OBS error feedback, lab 02's Hessian machinery
    W_sparse = sparsegpt_blocks(W, U, 0.5)              # the same, given U: the Cholesky factor of H^-1
    pruned, report = prune_model(model, calib, "wanda", 0.5)          # layer by layer; report = sparsity reached
    pruned, report = prune_model(model, calib, "sparsegpt", pattern="2:4")   # N:M as engines name it (cl.prune's)
    smaller, report = prune_mlp_neurons(model, calib, ratio=0.25)     # a genuinely smaller dense model

Masks are boolean and True where the weight survives, so pruning is W * keep. Every method prunes the Linears inside
the decoder layers; embeddings and lm_head are kept dense (the reference repositories do the same).

Which weights matter? Magnitude says |W|. Wanda (Sun et al. 2023) says |W_ij| * ||X_j||: a small weight on an input
channel with huge activations (LLMs have a few such outlier channels) matters more than a large weight on a quiet
one, and the comparison is made within each output row. SparseGPT (Frantar & Alistarh 2023) goes one step further:
pruning is GPTQ with "round to zero", so the same inverse-Hessian update lets the surviving weights compensate.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .gptq import Hessian, gptq_qparams, inverse_cholesky, propagate_error
from .layerwise import (SEQUENTIAL, collect_stats, decoder_linears, layer0_inputs, run_layer, step_stats,
                        validate_decoder)

METHODS = ("magnitude", "wanda", "sparsegpt")

# ----------------------------------------------------------------------------- argument checks


def validate_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity is the fraction of weights removed and must be in [0, 1), got {sparsity!r} "
                         "(0.5 = half the weights; for 2:4 sparsity pass pattern='2:4' instead)")
    return float(sparsity)


def validate_nm(n: int, m: int, in_features: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity keeps N of every M weights and needs 0 < N < M, got {n}:{m} "
                         "(the GPU format is 2:4)")
    if in_features % m:
        raise ValueError(f"M={m} must divide in_features={in_features}: N:M groups run along the input columns")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): the model-level N:M pattern (prune_model, cl.prune's configs, lab 08's recipes), written as
    engines and papers name it; the per-matrix functions below take the two integers n, m."""
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except (ValueError, AttributeError):
        raise ValueError(f"pattern must look like '2:4' (keep n of every m), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M sparsity keeps N of every M weights and needs 0 < N < M")
    return n, m


def _check_score(W: torch.Tensor) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a Linear weight of shape (out, in), got shape {tuple(W.shape)}")


def _nm_or_sparsity(sparsity, n, m, in_features):
    """N:M if n and m are given (then sparsity must be None or 1 - n/m), else an unstructured sparsity. Returns
    (sparsity, (n, m) or None)."""
    if (n is None) != (m is None):
        raise ValueError("pass both n and m for N:M sparsity (e.g. n=2, m=4), or neither")
    if n is None:
        if sparsity is None:
            raise ValueError("pass a sparsity in [0, 1) or n and m")
        return validate_sparsity(sparsity), None
    validate_nm(n, m, in_features)
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
        raise ValueError(f"{n}:{m} sparsity removes {1 - n / m:.0%} of the weights; sparsity={sparsity} contradicts it")
    return 1 - n / m, (n, m)


# ----------------------------------------------------------------------------- masks


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inside each run of m consecutive input columns of every row, keep the n largest scores.

    Implemented as "prune the m - n smallest", as the Wanda reference does: the two differ only on ties, and ties are
    common here (this model's weights came from Q4_1: at most 16 distinct values per block of 32). The choice is not
    innocent: magnitude 2:4 on SmolLM2 measures 1828 this way and ~2500 with topk(n) of the largest.
    """
    _check_score(score)
    out_f, in_f = score.shape
    validate_nm(n, m, in_f)
    groups = score.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(m - n, dim=-1, largest=False).indices, False)
    return keep.reshape(out_f, in_f)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(sparsity * in) lowest scores of every row (Wanda's comparison group: one output)."""
    _check_score(score)
    k = int(score.shape[1] * validate_sparsity(sparsity))
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], False)
    return keep


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(sparsity * numel) lowest scores of the whole matrix (one threshold per layer)."""
    _check_score(score)
    k = int(score.numel() * validate_sparsity(sparsity))
    flat = score.flatten()
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    t = flat.kthvalue(k).values  # the k-th smallest score: O(numel), no full sort
    pruned = flat < t
    ties = (flat == t).nonzero().flatten()[: k - int(pruned.sum())]  # ties at t: the first ones, as a stable sort
    pruned[ties] = True
    return ~pruned.reshape(score.shape)


def magnitude_mask(W: torch.Tensor, sparsity: float | None = None, n: int | None = None,
                   m: int | None = None) -> torch.Tensor:
    """Magnitude baseline: score |W|, one threshold per layer (or N:M along each row)."""
    _check_score(W)
    sparsity, nm = _nm_or_sparsity(sparsity, n, m, W.shape[1])
    return nm_mask(W.abs(), *nm) if nm else layer_mask(W.abs(), sparsity)


def wanda_mask(W: torch.Tensor, act_norm: torch.Tensor, sparsity: float | None = None, n: int | None = None,
               m: int | None = None) -> torch.Tensor:
    """Wanda: score |W_ij| * act_norm_j with act_norm (in,) = ||X_j||_2 over the calibration tokens; per row."""
    _check_score(W)
    if act_norm.shape != (W.shape[1],):
        raise ValueError(f"act_norm must have one entry per input column ({W.shape[1]},), "
                         f"got {tuple(act_norm.shape)}")
    sparsity, nm = _nm_or_sparsity(sparsity, n, m, W.shape[1])
    score = W.abs().float() * act_norm.float()[None, :]  # (out, in)
    return nm_mask(score, *nm) if nm else row_mask(score, sparsity)


def apply_mask(W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W with the pruned weights set to zero (a new tensor)."""
    if keep.shape != W.shape or keep.dtype != torch.bool:
        raise ValueError(f"the mask must be a bool tensor of the weight's shape {tuple(W.shape)}, "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    return W * keep


def sparsity_of(W: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return (W == 0).float().mean().item()


def is_nm_sparse(W: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every run of m consecutive inputs of every row has at most n nonzeros."""
    validate_nm(n, m, W.shape[1])
    return bool(((W != 0).reshape(W.shape[0], -1, m).sum(-1) <= n).all())


class ActNorm:
    """Running mean over calibration tokens of x_j^2 for every input channel j; norm() = sqrt of it, which is
    ||X_j||_2 / sqrt(tokens): the same ranking as Wanda's ||X_j||_2 (a constant factor per layer)."""

    def __init__(self, in_features: int, device="cpu"):
        self.sq = torch.zeros(in_features, device=device)  # (in,)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        b = x.shape[0]
        self.sq = self.sq * (self.n / (self.n + b)) + (x**2).sum(0) / (self.n + b)
        self.n += b

    def norm(self) -> torch.Tensor:
        return self.sq.sqrt()


# ----------------------------------------------------------------------------- SparseGPT: one weight matrix


def _sparsegpt_args(in_f, sparsity, n, m, block_size, bits, group_size):
    """The checks sparsegpt_prune and sparsegpt_blocks share. Returns (sparsity, (n, m) or None)."""
    sparsity, nm = _nm_or_sparsity(sparsity, n, m, in_f)
    if nm and block_size % nm[1]:
        raise ValueError(f"block_size={block_size} must be a multiple of M={nm[1]}")
    if bits is not None and in_f % group_size:
        raise ValueError(f"group_size={group_size} must divide in_features={in_f}")
    return sparsity, nm


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None, n: int | None = None,
                    m: int | None = None, block_size: int = 128, damp: float = 0.01, bits: int | None = None,
                    group_size: int = 64) -> torch.Tensor:
    """SparseGPT on one weight W (out, in) with Hessian H (in, in): returns the pruned (and compensated) weights.

    Same machinery as GPTQ: the upper Cholesky factor of H^-1, columns left to right, lazy block updates. The mask
    is chosen per block of block_size columns by w^2 / [U]_ii^2 (U the Cholesky factor: the OBS saliency), or per
    m columns for N:M; a pruned weight is "rounded" to 0 and propagate_error spreads its error over later columns.
    bits: also quantize the survivors (joint sparse + quantized, as the reference), groups of group_size.
    Here H is damped and inverted (dead input columns are zeroed first); sparsegpt_blocks does the pruning.
    """
    _check_score(W)
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be (in, in) = {(W.shape[1],) * 2}, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian has NaN/inf entries: calibrate in float32 (load_model(dtype='float32'))")
    _sparsegpt_args(W.shape[1], sparsity, n, m, block_size, bits, group_size)
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_cholesky(H, damp)[0].float()  # (in, in) upper
    return sparsegpt_blocks(W, Hinv, sparsity, n, m, block_size, bits, group_size)


@torch.no_grad()
def sparsegpt_blocks(W: torch.Tensor, Hinv: torch.Tensor, sparsity: float | None = None, n: int | None = None,
                     m: int | None = None, block_size: int = 128, bits: int | None = None,
                     group_size: int = 64) -> torch.Tensor:
    """SparseGPT's loop, given Hinv (in, in): the upper Cholesky factor U of the damped H^-1. Returns a new W.

        W_sparse = sparsegpt_blocks(W, U, 0.5)          # or n=2, m=4; lab 04's Exercise 4 writes this loop

    Unstructured: at the start of every block the int(sparsity * out * B) lowest saliencies w^2 / U_ii^2 of the
    whole (out, B) block, weights as the earlier blocks left them, are pruned. N:M: the mask of each run of m
    columns is chosen on reaching it, from the updated weights. Then column by column the OBS update, and after the
    block the lazy update of every later column.
    """
    _check_score(W)
    out_f, in_f = W.shape
    if Hinv.shape != (in_f, in_f):
        raise ValueError(f"Hinv must be (in, in) = {(in_f, in_f)}, got {tuple(Hinv.shape)}")
    sparsity, nm = _sparsegpt_args(in_f, sparsity, n, m, block_size, bits, group_size)
    W = W.detach().clone().float()
    Hinv = Hinv.detach().float()
    scale = zero = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (out, B), (B, B)
        Err1 = torch.zeros_like(W1)
        saliency = W1**2 / torch.diag(Hinv1)[None, :] ** 2  # (out, B): the loss of pruning each weight now
        keep1 = layer_mask(saliency, sparsity) if not nm else torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm and i % nm[1] == 0:  # N:M: choose among the next m columns, with their updated weights
                s = W1[:, i : i + nm[1]] ** 2 / torch.diag(Hinv1)[None, i : i + nm[1]] ** 2
                keep1[:, i : i + nm[1]] = nm_mask(s, *nm)
            q = W1[:, i] * keep1[:, i]
            if bits is not None:
                if (i1 + i) % group_size == 0:
                    scale, zero = gptq_qparams(W[:, i1 + i : i1 + i + group_size], bits, sym=False)
                    scale, zero = scale[:, 0], zero[:, 0]
                codes = torch.clamp(torch.round(q / scale) + zero, 0, 2**bits - 1)
                q = (codes - zero) * scale * keep1[:, i]  # a pruned weight stays exactly 0
            Err1[:, i] = propagate_error(W1, Hinv1, i, q)
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of every later column
    return W


# ----------------------------------------------------------------------------- the whole model, layer by layer


@torch.no_grad()
def prune_model(model, calib: torch.Tensor | None, method: str = "wanda", sparsity: float | None = None, *,
                pattern: str | None = None, batch_size: int = 8, sequential: bool = True, inplace: bool = False,
                progress: bool = True, **sparsegpt_options):
    """Prune every Linear of every decoder layer. Returns (model, report {linear name: sparsity reached}).
    sparsity=0.5 (unstructured) or pattern="2:4" (keep 2 of every 4 consecutive weights of a row); cl.prune is the
    entry point that calls this.

    magnitude needs no calibration (calib may be None). wanda and sparsegpt run layer by layer: each layer sees the
    outputs of the already-pruned layers before it, and with sequential=True (the default) the SEQUENTIAL groups
    inside a layer are pruned in order too (o_proj sees the pruned q/k/v, ...); sequential=False collects every
    Linear's statistics from one pass of the layer, as the Wanda reference does.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    validate_decoder(model, "prune_model")
    if {"n", "m"} & set(sparsegpt_options):
        raise TypeError("prune_model takes the model-level pattern='2:4', not n=, m= (the per-matrix functions' "
                        "arguments)")
    n, m = parse_pattern(pattern) if pattern is not None else (None, None)
    sparsity, nm = _nm_or_sparsity(sparsity, n, m, model.config.hidden_size)  # per-Linear checks follow
    if sparsegpt_options and method != "sparsegpt":
        raise TypeError(f"{sorted(sparsegpt_options)} are SparseGPT options; method={method!r} takes none")
    model = model if inplace else copy.deepcopy(model)
    report = {}
    desc = f"{method} " + (pattern if nm else f"{sparsity:.0%}")
    if method == "magnitude":
        for li, layer in enumerate(tqdm(model.model.layers, desc=desc, disable=not progress)):
            for name, lin in decoder_linears(layer, sum(SEQUENTIAL, []), li, "pruning").items():
                lin.weight.data = apply_mask(lin.weight.data, magnitude_mask(lin.weight.data, sparsity, n, m))
                report[f"model.layers.{li}.{name}"] = sparsity_of(lin.weight.data)
        return model, report
    if calib is None:
        raise ValueError(f"{method} needs calibration data: pass calib = calibration_batches(tok, ...)")
    inputs = layer0_inputs(model, calib, batch_size)
    steps = SEQUENTIAL if sequential else [sum(SEQUENTIAL, [])]
    Stat = ActNorm if method == "wanda" else Hessian  # what each Linear's calibration inputs are reduced to
    for li, layer in enumerate(tqdm(model.model.layers, desc=desc, disable=not progress)):
        for names in steps:
            linears = decoder_linears(layer, names, li, "pruning")
            stats = step_stats(layer, inputs, linears, lambda lin: Stat(lin.in_features, lin.weight.device))
            for name, lin in linears.items():
                W = lin.weight.data
                if method == "wanda":
                    W = apply_mask(W, wanda_mask(W, stats[name].norm(), sparsity, n, m))
                else:
                    W = sparsegpt_prune(W, stats[name].H, sparsity, n, m, **sparsegpt_options).to(W.dtype)
                lin.weight.data = W
                report[f"model.layers.{li}.{name}"] = sparsity_of(W)
        inputs = run_layer(layer, inputs)  # the pruned layer's outputs feed the next layer
    return model, report


def decoder_sparsity(model) -> dict[str, float]:
    """{decoder Linear name: share of zero weights}: what prune_model's report says, read from the model itself."""
    return {name: sparsity_of(m.weight.data) for name, m in model.named_modules()
            if name.startswith("model.layers.") and isinstance(m, nn.Linear)}


def mask_of(model) -> dict[str, torch.Tensor]:
    """{parameter name: keep-mask} of every decoder Linear weight: hold it fixed while fine-tuning a pruned model."""
    return {name: p.data != 0 for name, p in model.named_parameters()
            if name.startswith("model.layers.") and name.endswith("proj.weight")}


def finetune_masked(model, ids: torch.Tensor, steps: int = 200, lr: float = 5e-5, batch_size: int = 4,
                    seed: int = 0, progress: bool = True) -> list[float]:
    """Recovery: a short fine-tune of the decoder Linears (next-token loss) with the sparsity mask held fixed.

    ids: (n, seq_len) training windows, sampled with replacement (seeded). AdamW updates every decoder Linear weight;
    after each step the pruned weights are set back to exactly 0, so the pattern (2:4 included) survives. Embeddings,
    norms and lm_head stay frozen. Trains in place; returns the loss of every step.
    """
    masks = mask_of(model)
    params = dict(model.named_parameters())
    was_grad = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in masks)
    opt = torch.optim.AdamW([params[n] for n in masks], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    try:
        for _ in (bar := tqdm(range(steps), desc="masked fine-tune", disable=not progress)):
            batch = ids[torch.randint(0, ids.shape[0], (batch_size,), generator=g)].to(device)  # (b, seq_len)
            loss = model(batch, labels=batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n, keep in masks.items():
                    params[n].mul_(keep)  # pruned weights back to exactly 0
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for n, p in params.items():
            p.requires_grad_(was_grad[n])
    return losses


# ----------------------------------------------------------------------------- structured: whole MLP neurons


@torch.no_grad()
def prune_mlp_neurons(model, calib: torch.Tensor, ratio: float = 0.25, batch_size: int = 8, multiple_of: int = 8,
                      inplace: bool = False, progress: bool = True):
    """Remove the same fraction of intermediate MLP neurons from every layer: a smaller DENSE model.

    Neuron j of a SwiGLU MLP is row j of gate_proj and up_proj and column j of down_proj. Its score is Wanda's,
    summed over the neuron: ||a_j||_2 * ||down_proj[:, j]||_2, with a_j = silu(gate_j) * up_j its activation over
    the calibration tokens (the input of down_proj). Layer by layer, inputs recomputed from the pruned layers.
    Returns (model, report {layer: kept neuron indices}); config.intermediate_size is updated.
    """
    validate_decoder(model, "prune_mlp_neurons")
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio is the fraction of MLP neurons removed and must be in [0, 1), got {ratio!r}")
    inter = model.config.intermediate_size
    keep_n = min(inter, max(multiple_of, int(round(inter * (1 - ratio) / multiple_of)) * multiple_of))
    model = model if inplace else copy.deepcopy(model)
    inputs = layer0_inputs(model, calib, batch_size)
    report = {}
    for li, layer in enumerate(tqdm(model.model.layers, desc=f"structured {ratio:.0%}", disable=not progress)):
        mlp = layer.mlp
        lins = decoder_linears(layer, ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], li, "structured pruning")
        act = collect_stats(layer, inputs, {"down": lins["mlp.down_proj"]},
                            lambda lin: ActNorm(lin.in_features, lin.weight.device))["down"]
        score = act.norm() * mlp.down_proj.weight.float().norm(dim=0)  # (inter,)
        keep = score.topk(keep_n).indices.sort().values  # kept neurons, in their original order
        mlp.gate_proj = _slice_linear(mlp.gate_proj, keep, dim=0)
        mlp.up_proj = _slice_linear(mlp.up_proj, keep, dim=0)
        mlp.down_proj = _slice_linear(mlp.down_proj, keep, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_n
        report[li] = keep
        inputs = run_layer(layer, inputs)
    model.config.intermediate_size = keep_n
    return model, report


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new, smaller nn.Linear holding rows (dim=0) or columns (dim=1) idx of lin."""
    W = lin.weight.data.index_select(dim, idx)
    new = nn.Linear(W.shape[1], W.shape[0], bias=lin.bias is not None, device=W.device, dtype=W.dtype)
    new.weight.data.copy_(W)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data if dim == 1 else lin.bias.data[idx])
    return new


def count_parameters(model) -> int:
    """Parameters actually stored (a tied lm_head counted once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- what the hardware does: 2:4 on GPU


def semi_structured_supported(device=None, dtype=torch.float16) -> tuple[bool, str]:
    """(ok, reason): can torch's 2:4 sparse kernels (cuSPARSELt / CUTLASS) run here?"""
    if not torch.cuda.is_available():
        return False, ("no CUDA GPU: 2:4 sparse tensor cores exist only on NVIDIA Ampere (sm80) and newer. On CPU a "
                       "2:4-pruned model is still a dense model with zeros: same memory and speed.")
    device = torch.device(device or "cuda")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, (f"{torch.cuda.get_device_name(device)} is sm{major}{minor}: 2:4 sparse tensor cores need "
                       "sm80+ (A100, L4, H100). A T4 (sm75) has none.")
    if dtype not in (torch.float16, torch.bfloat16, torch.int8):
        return False, f"2:4 kernels take float16, bfloat16 or int8 weights, not {dtype}: convert with model.half()"
    return True, f"{torch.cuda.get_device_name(device)} (sm{major}{minor}) supports 2:4 in {dtype}"


def to_semi_structured(model) -> int:
    """Swap every 2:4-sparse decoder Linear weight for torch's compressed SparseSemiStructuredTensor (in place).
    Needs a CUDA sm80+ GPU and a float16/bfloat16 model. Returns the number of Linears converted."""
    from torch.sparse import to_sparse_semi_structured

    dtype = next(model.parameters()).dtype
    ok, reason = semi_structured_supported(next(model.parameters()).device, dtype)
    if not ok:
        raise RuntimeError(f"2:4 semi-structured kernels unavailable: {reason}")
    converted = 0
    for name, lin in model.named_modules():
        if isinstance(lin, nn.Linear) and name.startswith("model.layers."):
            W = lin.weight.data
            if not is_nm_sparse(W, 2, 4):
                raise ValueError(f"{name} is not 2:4 sparse: prune with n=2, m=4 first")
            if min(W.shape) < 64 or W.shape[0] % 64 or W.shape[1] % 64:
                raise ValueError(f"{name} {tuple(W.shape)}: the 2:4 kernels need both dimensions multiples of 64")
            lin.weight = nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)
            converted += 1
    return converted


def semi_structured_bytes(W: torch.Tensor) -> int:
    """Storage of a 2:4 weight in the compressed format: half the values, plus 2 bits of metadata per kept value
    (which 2 of 4 positions) -> 9/16 of dense in 16-bit. Valid on any device: it is arithmetic."""
    kept = W.numel() // 2
    return kept * W.element_size() + kept * 2 // 8
