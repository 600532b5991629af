"""AWQ, Activation-aware Weight Quantization (Lin et al. 2023), top to bottom, after mit-han-lab/llm-awq (lab 03).

    s, errors = awq_scale_search([q, k, v], x, bits=4, group_size=64, sym=True)   # s (in,); errors[i]: alpha = i/grid
    w_hat, clip = awq_clip_search(w, x, bits=4, group_size=64, sym=False)         # (out, in), (out, n_groups)
    model = apply(model, AWQConfig(bits=4, group_size=64), calib)                 # in place, layer by layer
    searches = search_layer(layer, inputs, config)      # one layer's alpha curves (inputs: layerwise.layer0_inputs)
    records = quantize_layer(layer, searches, config)   # fold the scales, clip, round: scales/zeros per Linear

The idea: a few input channels carry much larger activations than the rest (mean |x_j| spans orders of magnitude), so
the weight columns that meet them matter most. Keeping them in fp16 would need a mixed-precision format; AWQ instead
multiplies column j of W by s_j > 1 before round-to-nearest and divides x_j by s_j, which leaves x W^T unchanged:
    y = x W^T = (x / s) (W s)^T  ~  (x / s) Q(W s)^T
A scaled-up column is rounded with (almost) the same group step, so its error relative to its size shrinks by s_j.
Scale every column up and the group's max grows with it: nothing is gained. AWQ searches one exponent per group of
Linears sharing an input, s = mean|x|^alpha with alpha in {0, 1/grid, ..., (grid-1)/grid}, and keeps the alpha
with the smallest output error on the calibration tokens. alpha = 0 is plain RTN, so AWQ never does worse there.
The division by s is free: it is folded into the op in front (a norm's weight, or the output rows of a Linear):
    q/k/v_proj <- input_layernorm         gate/up_proj <- post_attention_layernorm         down_proj <- up_proj
    o_proj <- v_proj only when v_proj's outputs are o_proj's inputs (multi-head attention). Under grouped-query
    attention (SmolLM2: v_proj has 192 outputs, o_proj 576 inputs) each v row feeds several heads' worth of o_proj
    columns and one s cannot be folded; the reference then skips the scale, and so do we: o_proj gets plain RTN
    (RTN of a clipped range with clip=True).
Optional clipping (the reference's auto_clip): per group, shrink the range to shrink * max|w| for shrink in
{1, 1 - 1/grid, ..., 1 - max_shrink}, keeping the shrink with the least error on the group's share of the output.

Cost: every error here is ||x D^T||^2 for a weight difference D (out, in), and that is tr(D G D^T) with G = x^T x
(in, in), the (unnormalised) Hessian of lab 02. G and mean |x| are accumulated once per Linear group while the layer
runs, so the search never touches the tokens again: each candidate alpha costs one (out, in) x (in, in) product,
whatever the number of calibration tokens (no subsampling needed), and clipping uses only G's diagonal blocks.

Differences from the reference, on purpose:
* the error is measured on the outputs of the Linears being scaled (concatenated), not on the output of the whole
  attention or MLP block that llm-awq re-runs for every alpha; that makes the closed form above possible;
* every calibration token counts (llm-awq subsamples 512 tokens for the clip search);
* as in gptq.quantize_model, each layer is calibrated on the outputs of the already-quantized layers before it
  (llm-awq and AutoAWQ pass full-precision outputs on);
* the quantizer is lab 01's (quant.compute_qparams: the asymmetric range always contains 0), so RTN here is exactly
  quant.fake_quantize; AutoAWQ's duo_scaling (s = mean|x|^alpha / mean|w|^(1 - alpha)) is not used.
Weights are fake-quantized (weight.data = dequantized values, float), as gptq.quantize_model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .layerwise import SEQUENTIAL, collect_stats, decoder_linears, layer0_inputs, run_layer, validate_decoder
from .quant import compute_qparams, dequantize, group_view, linear_in_features, quantize

# the op each SEQUENTIAL group's scale is folded into (its inputs are that op's outputs divided by s)
PREV_OPS = ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
# q and k meet inside softmax(q k^T): a per-Linear error does not see that, so (as the reference) they are not clipped
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")
MIN_SCALE = 1e-4  # the reference's floor on mean|x|^alpha: a channel that is always 0 must not give s = 0

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True)
class AWQConfig:
    """AWQ settings. AWQConfig(bits=4, group_size=64) is W4A16 g64; SmolLM2-135M needs g64 (576 = 9 x 64).

    sym: signed codes, no zero point (False: unsigned codes with a zero point, AWQ's usual "zero_point=True").
    clip: also search a clipped range per group (auto_clip). grid: alphas and shrink steps per unit.
    skip: name patterns of Linears to leave in full precision (matched against "model.layers.3.mlp.down_proj").
    """

    bits: int = 4
    group_size: int = 64
    sym: bool = True
    clip: bool = False
    grid: int = 20
    skip: tuple = ("lm_head",)

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r} (AWQ's W4A16 is bits=4)")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive int that divides every in_features, got "
                             f"{self.group_size!r} (64 for SmolLM2-135M, whose hidden size 576 = 9 x 64)")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid is the number of alphas tried (alpha = 0, 1/grid, ...) and must be an int >= 1, "
                             f"got {self.grid!r} (the reference uses 20)")
        for name in ("sym", "clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.skip, tuple) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"skip must be a tuple of name patterns, e.g. ('lm_head',), got {self.skip!r}")

    def quantization_config(self) -> dict:
        """What apply() writes to model.config.quantization_config (AutoAWQ's field names where they exist)."""
        # quant_method "compresslab", not "awq": transformers would route a reload through its AWQ loader
        return {"quant_method": "compresslab", "method": "awq", "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "zero_point": not self.sym, "clip": self.clip, "grid": self.grid,
                "modules_to_not_convert": list(self.skip), "fake_quantized": True}


# ----------------------------------------------------------------------------- activation statistics


class ActStats:
    """Running statistics of the inputs x of one Linear (or one group sharing an input), over every token seen:
    mean |x_j| per input channel (AWQ's saliency, (in,)) and G = x^T x ((in, in), float64), the error's quadratic form.
    Anything with add_batch(x) works with layerwise.collect_stats."""

    def __init__(self, in_features: int, device="cpu"):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.G = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if x.shape[-1] != self.G.shape[0]:
            raise ValueError(f"inputs have {x.shape[-1]} features, these statistics expect {self.G.shape[0]}")
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        self.G += (x.t() @ x).double()
        self.n += x.shape[0]

    @classmethod
    def of(cls, x: torch.Tensor) -> "ActStats":
        """Statistics of a tensor of tokens x (..., in)."""
        stats = cls(x.shape[-1], x.device)
        stats.add_batch(x)
        return stats

    def mean_abs(self) -> torch.Tensor:
        """(in,) float32 mean |x_j| over the tokens."""
        if self.n == 0:
            raise ValueError("no tokens were recorded: pass calibration inputs before searching scales")
        return (self.abs_sum / self.n).float()


def output_error(D: torch.Tensor, G: torch.Tensor) -> float:
    """||x D^T||_F^2 = tr(D G D^T) for a weight difference D (out, in) and G = x^T x (in, in)."""
    return ((D @ G) * D).sum(dtype=torch.float64).item()


def group_blocks(G: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks of G (in, in), one per quantization group -> (n_groups, g, g)."""
    n = G.shape[0] // group_size
    blocks = G.reshape(n, group_size, n, group_size).diagonal(dim1=0, dim2=2)  # (g, g, n_groups)
    return blocks.permute(2, 0, 1)


# ----------------------------------------------------------------------------- round-to-nearest, optionally clipped


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, clip: torch.Tensor | None = None):
    """Round-to-nearest of w (out, in) per group of group_size inputs, each group first clamped to [-clip, clip]
    if clip (out, n_groups) is given. -> (w_hat (out, in) float32, scales (out, n_groups), zeros (out, n_groups)).
    Without clip this is quant.fake_quantize(w, bits, group_size, sym), the RTN baseline of the lab."""
    groups = group_view(w.float(), group_size)  # (out * n_groups, g)
    if clip is not None:
        c = clip.reshape(-1, 1).float()  # (out * n_groups, 1)
        groups = torch.maximum(torch.minimum(groups, c), -c)
    scale, zero = compute_qparams(groups, bits, sym)  # (out * n_groups, 1) each
    w_hat = dequantize(quantize(groups, scale, zero, bits, sym), scale, zero)
    return w_hat.reshape(w.shape), scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1)


# ----------------------------------------------------------------------------- the scale search


def alphas(grid: int) -> list[float]:
    """The exponents tried: 0, 1/grid, ..., (grid - 1)/grid (the reference's n_grid = 20)."""
    return [i / grid for i in range(grid)]


def scale_for(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha (in,), normalised by sqrt(max(s) * min(s)) so that the scales straddle 1, as llm-awq does."""
    s = mean_abs.pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def search_scale(weights: list[torch.Tensor], stats: ActStats, *, bits: int, group_size: int, sym: bool,
                 grid: int = 20) -> tuple[torch.Tensor, list[float]]:
    """AWQ's grid search for Linear weights [(out_i, in), ...] sharing inputs described by stats.

    For each alpha: E(alpha) = sum_i ||x W_i^T - (x / s) Q(W_i s)^T||^2 = tr(D G D^T), D = W - Q(W s) / s, W the
    weights stacked (sum out_i, in) (a group's rows quantize independently, so stacking changes nothing).
    Returns (best s (in,) float32, [E(alpha) for alpha in alphas(grid)]).
    """
    W = torch.cat([w.detach().float() for w in weights])  # (sum out_i, in)
    G = stats.G.float().to(W.device)  # (in, in)
    mean_abs = stats.mean_abs().to(W.device)  # (in,)
    errors, best, best_s = [], float("inf"), None
    for alpha in alphas(grid):
        s = scale_for(mean_abs, alpha)  # (in,)
        w_hat, _, _ = rtn(W * s, bits, group_size, sym)  # scale the columns up, then round
        err = output_error(W - w_hat / s, G)  # the inputs are divided by s: column j of Q(W s) acts as Q(W s)_j / s_j
        errors.append(err)
        if err < best:
            best, best_s = err, s
    if best_s is None:
        raise ValueError("every alpha gave a non-finite error: the calibration activations overflowed. "
                         "Run calibration in float32 (load_model(dtype='float32')).")
    return best_s, errors


def awq_scale_search(linears: list[nn.Linear], x: torch.Tensor, *, bits: int, group_size: int, sym: bool,
                     grid: int = 20) -> tuple[torch.Tensor, list[float]]:
    """AWQ's scale search on explicit tokens: linears share the input x (n_tokens, in) (e.g. [q_proj, k_proj, v_proj]).

    Returns (s (in,), errors) with errors[i] the output error at alpha = i / grid; errors[0] is plain RTN, and the s
    returned has the least error, so AWQ is never worse than RTN on these tokens. Lab 03 plots errors against alphas().
    """
    if not linears or not all(isinstance(m, nn.Linear) for m in linears):
        raise TypeError("linears must be a non-empty list of nn.Linear sharing the input x, "
                        "e.g. [q_proj, k_proj, v_proj]")
    if x.dim() < 2 or x.shape[-1] != linears[0].in_features or x.numel() == 0:
        raise ValueError(f"x must be tokens (n_tokens, in={linears[0].in_features}), got shape {tuple(x.shape)}")
    return search_scale([m.weight for m in linears], ActStats.of(x), bits=bits, group_size=group_size, sym=sym,
                        grid=grid)


# ----------------------------------------------------------------------------- the clip search


def search_clip(w: torch.Tensor, G: torch.Tensor, *, bits: int, group_size: int, sym: bool, grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """auto_clip for a weight w (out, in) whose inputs have G = x^T x (in, in).

    Each group's share of the output, x_g w_g^T, is judged on its own: error (out, n_groups) = d_g G_gg d_g^T with
    d_g = w_g - Q(clamp(w_g, +-c)). Tries c = shrink * max|w_g| for shrink = 1, 1 - 1/grid, ..., 1 - max_shrink.
    Returns (clip (out, n_groups), error (out, n_groups)) of the best shrink per group.
    """
    if not 0 <= max_shrink < 1:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink!r} (0.5: ranges down to half of max|w|)")
    w = w.detach().float()
    out_f, in_f = w.shape
    group_view(w, group_size)  # raises a clear error if group_size does not divide in_f
    blocks = group_blocks(G.float().to(w.device), group_size)  # (n_groups, g, g)
    wg = w.reshape(out_f, -1, group_size)  # (out, n_groups, g)
    absmax = wg.abs().amax(dim=-1)  # (out, n_groups)
    best_err = torch.full_like(absmax, float("inf"))
    best_clip = absmax.clone()
    for i in range(round(max_shrink * grid) + 1):
        clip = absmax * (1 - i / grid)  # (out, n_groups)
        w_hat, _, _ = rtn(w, bits, group_size, sym, clip)
        d = (wg - w_hat.reshape(wg.shape)).transpose(0, 1)  # (n_groups, out, g)
        err = ((d @ blocks) * d).sum(dim=-1).t()  # (out, n_groups): d_g G_gg d_g^T per row and group
        better = err < best_err
        best_err, best_clip = torch.where(better, err, best_err), torch.where(better, clip, best_clip)
    return best_clip, best_err


def awq_clip_search(w: torch.Tensor, x: torch.Tensor, *, bits: int, group_size: int, sym: bool, grid: int = 20,
                    max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """auto_clip on explicit tokens x (n_tokens, in) for a weight w (out, in).

    Returns (w_hat (out, in), clip (out, n_groups)): the weight quantized with each group clamped to [-clip, clip]
    first, and the clip values. Per group, its output error is never above plain RTN's (shrink = 1 is among those
    tried). Works for sym and asym (the asymmetric range is then taken from the clamped group).
    """
    if x.dim() < 2 or x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x must be tokens (n_tokens, in={w.shape[-1]}), got shape {tuple(x.shape)}")
    clip, _ = search_clip(w, ActStats.of(x).G, bits=bits, group_size=group_size, sym=sym, grid=grid,
                          max_shrink=max_shrink)
    w_hat, _, _ = rtn(w, bits, group_size, sym, clip)
    return w_hat.to(w.dtype), clip


# ----------------------------------------------------------------------------- folding the scale into the op in front


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """prev's outputs /= s, the linears' input columns *= s: the layer computes the same function (exact up to float
    rounding). prev is a norm with an elementwise weight (and bias) of shape (in,), or a Linear with `in` outputs."""
    s = s.float()
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)  # (in, prev_in): output rows
    else:
        prev.weight.data = (prev.weight.float() / s).to(prev.weight.dtype)  # (in,)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)
    for m in linears:
        m.weight.data = (m.weight.float() * s).to(m.weight.dtype)  # (out, in): column j times s_j


def foldable(layer, prev: str, names: list[str]) -> bool:
    """Can the scale of the inputs of `names` be folded into `prev`? No for o_proj under grouped-query attention."""
    op = layer.get_submodule(prev)
    n_out = op.out_features if isinstance(op, nn.Linear) else op.weight.shape[0]
    return all(layer.get_submodule(n).in_features == n_out for n in names)


# ----------------------------------------------------------------------------- one decoder layer


@dataclass
class ScaleSearch:
    """One SEQUENTIAL group of a layer: the Linears sharing an input and the op the scale folds into."""

    prev: str  # "input_layernorm", "self_attn.v_proj", "post_attention_layernorm" or "mlp.up_proj"
    names: list[str]  # the Linears, e.g. ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    stats: ActStats  # mean |x| and G = x^T x of their inputs, before scaling
    scales: torch.Tensor | None  # (in,) the best s; None: not scaled (o_proj under GQA, or every Linear skipped)
    errors: list[float] | None  # output error per alpha in alphas(grid); errors[0] is RTN
    alpha: float | None  # the alpha chosen


def _skipped(name: str, skip: tuple) -> bool:
    return any(p in name for p in skip)


def validate_llama_layer(layer, li: int = 0) -> None:
    """AWQ folds scales into Llama-style layers; raise TypeError naming what is missing otherwise."""
    parts = ["input_layernorm", "post_attention_layernorm", *[n for names in SEQUENTIAL for n in names]]
    missing = []
    for p in parts:
        try:
            layer.get_submodule(p)
        except AttributeError:
            missing.append(p)
    if missing:
        raise TypeError(f"AWQ here folds its scales into Llama-style decoder layers (Llama, Qwen2, Mistral, SmolLM2: "
                        f"input_layernorm, self_attn.q/k/v/o_proj, post_attention_layernorm, mlp.gate/up/down_proj); "
                        f"layer {li} ({type(layer).__name__}) has no {missing}")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        w = getattr(layer.get_submodule(norm), "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1:
            raise TypeError(f"layer {li}.{norm} must have an elementwise weight (hidden,) to fold scales into")


@torch.no_grad()
def search_layer(layer, inputs, config: AWQConfig | None = None, *, layer_index: int = 0) -> list[ScaleSearch]:
    """Run one decoder layer (full precision, nothing modified) on its calibration inputs and search a scale for each
    SEQUENTIAL group. inputs: layerwise.layer0_inputs(model, calib, 8) for layer 0, then run_layer's outputs.

    Lab 03 plots searches[i].errors against alphas(config.grid) for one layer.
    """
    config = config or AWQConfig()
    validate_llama_layer(layer, layer_index)
    firsts = {names[0]: decoder_linears(layer, names, layer_index, "AWQ")[names[0]] for names in SEQUENTIAL}
    stats = collect_stats(layer, inputs, firsts, lambda m: ActStats(m.in_features, m.weight.device))
    searches = []
    for prev, names in zip(PREV_OPS, SEQUENTIAL):
        st = stats[names[0]]
        if st.n == 0:
            raise RuntimeError(f"layer {layer_index}.{names[0]} received no calibration tokens: the calibration "
                               "does not reach this layer. Pass (n_samples, seq_len) token ids, e.g. "
                               "cl.data.calibration_batches(tok, 32, 512)")
        linears = decoder_linears(layer, names, layer_index, "AWQ")
        weights = [m.weight for n, m in linears.items() if not _skipped(f"model.layers.{layer_index}.{n}", config.skip)]
        s = errors = alpha = None
        if weights and foldable(layer, prev, names):
            s, errors = search_scale(weights, st, bits=config.bits, group_size=config.group_size, sym=config.sym,
                                     grid=config.grid)
            alpha = alphas(config.grid)[min(range(len(errors)), key=errors.__getitem__)]
        searches.append(ScaleSearch(prev=prev, names=list(names), stats=st, scales=s, errors=errors, alpha=alpha))
    return searches


@torch.no_grad()
def quantize_layer(layer, searches: list[ScaleSearch], config: AWQConfig | None = None, *,
                   layer_index: int = 0) -> dict[str, dict]:
    """Fold each search's scale into the layer, clip (config.clip), then fake-quantize every Linear not skipped.
    Modifies layer in place. Returns {name: {"scales", "zeros" (out, n_groups), "clip" (out, n_groups) or None}}."""
    config = config or AWQConfig()
    records = {}
    for search in searches:  # first fold every scale: clipping and rounding see the weights the model will run
        if search.scales is not None:
            linears = decoder_linears(layer, search.names, layer_index, "AWQ")
            fold_scale(layer.get_submodule(search.prev), list(linears.values()), search.scales)
    for search in searches:
        s = search.scales
        G = search.stats.G if s is None else search.stats.G / (s[:, None] * s[None, :]).double()  # inputs x / s
        for n, m in decoder_linears(layer, search.names, layer_index, "AWQ").items():
            if _skipped(f"model.layers.{layer_index}.{n}", config.skip):
                continue
            clip = None
            if config.clip and n not in NO_CLIP:
                clip, _ = search_clip(m.weight, G, bits=config.bits, group_size=config.group_size, sym=config.sym,
                                      grid=config.grid)
            w_hat, scales, zeros = rtn(m.weight, config.bits, config.group_size, config.sym, clip)
            m.weight.data = w_hat.to(m.weight.dtype)
            records[n] = {"scales": scales, "zeros": zeros, "clip": clip}
    return records


# ----------------------------------------------------------------------------- the whole model


def _check_calibration(calibration, group_size: int) -> torch.Tensor:
    if calibration is None:
        raise ValueError("AWQ needs calibration token ids to measure activations: pass "
                         "calibration=cl.data.calibration_batches(tok, n_samples=32, seq_len=512) (the reference "
                         "uses 128 x 512). For round-to-nearest without data use quant.fake_quantize_model.")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        raise ValueError(f"calibration must be token ids of shape (n_samples, seq_len), e.g. from "
                         f"cl.data.calibration_batches; got {type(calibration).__name__} "
                         f"{tuple(getattr(calibration, 'shape', ()))}")
    if calibration.numel() < group_size:
        raise ValueError(f"{calibration.numel()} calibration tokens cannot calibrate groups of {group_size} inputs: "
                         f"use at least {group_size} tokens (e.g. 8 samples of 512; the reference uses 128 x 512)")
    return calibration


@torch.no_grad()
def apply(model, config: AWQConfig | None = None, calibration: torch.Tensor | None = None, *, batch_size: int = 8,
          progress: bool = True):
    """AWQ every decoder layer of model IN PLACE, layer by layer; returns model.

    calibration: (n_samples, seq_len) token ids. For each layer: search the scales on the full-precision layer
    (search_layer), fold them, clip and fake-quantize (quantize_layer), then run the quantized layer to make the
    next layer's inputs. Sets model.config.quantization_config (quant_method "awq"). Lab 03 compares the result
    with RTN (quant.fake_quantize_model) and GPTQ (gptq.quantize_model) at W4A16 g64.
    """
    config = AWQConfig() if config is None else config
    if not isinstance(config, AWQConfig):
        raise TypeError(f"config must be an AWQConfig, e.g. AWQConfig(bits=4, group_size=64); "
                        f"got {type(config).__name__}")
    calibration = _check_calibration(calibration, config.group_size)
    validate_decoder(model, "awq.apply")
    for li, layer in enumerate(model.model.layers):
        validate_llama_layer(layer, li)
    bad = sorted(n for n in linear_in_features(model, config.skip) if n % config.group_size)
    if bad:
        raise ValueError(f"group_size={config.group_size} does not divide in_features {bad}: use a divisor of "
                         f"all of them (SmolLM2-135M: 64, as 576 = 9 x 64)")
    inputs = layer0_inputs(model, calibration, batch_size)
    for li, layer in enumerate(tqdm(model.model.layers, desc=f"AWQ {config.bits}-bit", disable=not progress)):
        searches = search_layer(layer, inputs, config, layer_index=li)
        quantize_layer(layer, searches, config, layer_index=li)
        inputs = run_layer(layer, inputs)  # the quantized layer's outputs feed the next layer
    model.config.quantization_config = config.quantization_config()
    return model
