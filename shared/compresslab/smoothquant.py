"""SmoothQuant (Xiao et al. 2023), top to bottom, following the reference mit-han-lab/smoothquant (activation lab).

    stats = input_stats(model, calib)                    # {linear: {"channel_amax", "token_amax", "tensor_amax"}}
    s = smooth_scales(act_amax, weight_amax, alpha=0.5)   # (in,) = act_amax^alpha / weight_amax^(1 - alpha)
    fold_smoothing(layer.input_layernorm, [q, k, v], s)   # norm.weight /= s, each weight's columns *= s: exact
    scales = smooth_model(model, calib, alpha=0.5)        # every decoder layer, in place -> {linear: s}
    max_logit_change(model, smoothed, ids)                # ~1e-5: smoothing changes no output

The idea: activations are hard to quantize because a few input channels carry values 10-100x larger than the rest
(the same channels in every token), while weights are easy. A Linear computes y = x W^T = (x / s)(W * s)^T for any
per-channel s (in,), so dividing channel j of the input by s_j and multiplying column j of the weight by s_j changes
nothing in full precision but moves quantization difficulty from the activations to the weights. alpha sets how
much: s = max|x_j|^alpha / max|W_:,j|^(1 - alpha); alpha = 0.5 splits it evenly. The division costs nothing at
inference when it is folded into the operation that produces x: the RMSNorm before q/k/v and gate/up (its weight
/= s), and up_proj's output rows before down_proj (down's input is silu(gate) * up, linear in up's output).

o_proj is not smoothed (neither does the reference): its input is the attention output, produced by v_proj through
softmax-weighted sums over heads. Folding 1/s into v_proj's rows would need one s per v_proj output, but with GQA
(SmolLM2: 3 kv heads of 64) v_proj's 192 outputs feed o_proj's 576 inputs through head repetition, so the 3 query
heads sharing a kv head would have to share their scales. Where folding is impossible, a runtime multiply works:
compresslab.actquant.ActQuantLinear's `pre_quant_scale`.

The activation statistics live here (one whole-model pass with forward hooks); compresslab.actquant imports them
for its static calibration and outlier plots, so the import arrow points from actquant down to smoothquant.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .quant import _decoder_linears

MIN_SCALE = 1e-5  # the reference's clamp: no channel is divided by (almost) zero

# ----------------------------------------------------------------------------- activation statistics


class InputStats:
    """Running statistics of one Linear's inputs (anything with add_batch(x), as gptq.Hessian):

    channel_amax (in,) max |x_j| over all tokens; token_amax (n_tokens,) max_j |x_j| of each token (kept only when
    tokens=True); tensor_amax: the largest of all, a float.
    """

    def __init__(self, in_features: int, tokens: bool = True, device="cpu"):
        self.channel_amax = torch.zeros(in_features, device=device)
        self.tokens = tokens
        self._token_amax: list[torch.Tensor] = []

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).abs().float()  # (tokens, in)
        if x.shape[-1] != self.channel_amax.numel():
            raise ValueError(f"inputs have {x.shape[-1]} features, expected {self.channel_amax.numel()}")
        self.channel_amax = torch.maximum(self.channel_amax, x.amax(dim=0))
        if self.tokens:
            self._token_amax.append(x.amax(dim=-1).cpu())  # (tokens,)

    @property
    def token_amax(self) -> torch.Tensor:
        return torch.cat(self._token_amax) if self._token_amax else torch.zeros(0)

    @property
    def tensor_amax(self) -> float:
        return self.channel_amax.max().item()

    def as_dict(self) -> dict:
        out = {"channel_amax": self.channel_amax.cpu(), "tensor_amax": self.tensor_amax}
        return out | ({"token_amax": self.token_amax} if self.tokens else {})


def validate_calibration(calibration) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0 \
            or calibration.is_floating_point():
        got = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be (n_samples, seq_len) token ids, got {got}: use "
                         "cl.data.calibration_batches(tok, n_samples=8, seq_len=512)")
    return calibration


@torch.no_grad()
def collect_input_stats(model: nn.Module, calibration: torch.Tensor, modules: dict[str, nn.Module],
                        batch_size: int = 8, tokens: bool = True, progress: bool = True,
                        desc: str = "activation stats") -> dict[str, InputStats]:
    """Whole-model forwards over calibration (n_samples, seq_len) with a forward hook on each module:
    every input batch goes to that module's InputStats. Returns {name: InputStats}."""
    validate_calibration(calibration)
    if not modules:
        raise ValueError("no modules to observe: pass a non-empty {name: nn.Linear} dict")
    device = next(model.parameters()).device
    stats = {n: InputStats(m.in_features, tokens, device) for n, m in modules.items()}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: stats[n].add_batch(inp[0]))
             for n, m in modules.items()]
    try:
        for i in tqdm(range(0, calibration.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            model(calibration[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return stats


def linear_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Names of every nn.Linear in the model except those matching a skip pattern (the decoder's 7 per layer)."""
    return [name for _, _, name, _ in _decoder_linears(model, skip)]


def input_stats(model: nn.Module, calibration: torch.Tensor, names: list[str] | None = None, batch_size: int = 8,
                progress: bool = True) -> dict[str, dict]:
    """Per-Linear input statistics for outlier plots (activation lab):

        stats = input_stats(model, calib, ["model.layers.3.mlp.down_proj"])
        stats[name]["channel_amax"]   # (in,) max |x_j| per input channel: the outlier channels stand out
        stats[name]["token_amax"]     # (n_samples * seq_len,) max |x| of each token
        stats[name]["tensor_amax"]    # float: what a per-tensor static scale is calibrated on

    names: Linear names (default: every decoder Linear, lm_head excluded).
    """
    names = linear_names(model) if names is None else list(names)
    modules = {}
    for n in names:
        try:
            modules[n] = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"no module named {n!r} in the model: names look like "
                             "'model.layers.0.self_attn.q_proj' (see linear_names(model))") from None
    stats = collect_input_stats(model, calibration, modules, batch_size, tokens=True, progress=progress)
    return {n: s.as_dict() for n, s in stats.items()}


def channel_amax(model: nn.Module, calibration: torch.Tensor, names: list[str] | None = None,
                 batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """{linear name: (in,) max |x_j| over all calibration tokens}: the reference's act_scales (get_act_scales)."""
    names = linear_names(model) if names is None else list(names)
    modules = {n: model.get_submodule(n) for n in names}
    stats = collect_input_stats(model, calibration, modules, batch_size, tokens=False, progress=progress)
    return {n: s.channel_amax for n, s in stats.items()}


# ----------------------------------------------------------------------------- the smoothing factors


def smooth_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s (in,) = act_amax^alpha / weight_amax^(1 - alpha), each clamped to >= 1e-5 as in the reference.

    act_amax (in,): max |x_j| over calibration tokens; weight_amax (in,): max |W_ij| over the rows of every Linear
    that reads x (their columns j). alpha = 1 flattens the activations (x_j / s_j has max 1 for every channel),
    alpha = 0 flattens the weights (every column of W * s has max 1).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1] (the share of difficulty moved to the weights; 0.5 is "
                         f"the paper's default, up to 0.75-0.85 for models with large outliers), got {alpha!r}")
    if act_amax.dim() != 1 or act_amax.shape != weight_amax.shape:
        raise ValueError(f"act_amax and weight_amax must both be (in,) vectors, got {tuple(act_amax.shape)} and "
                         f"{tuple(weight_amax.shape)}: reduce the weights over their rows, W.abs().amax(dim=0)")
    a = act_amax.float().clamp(min=MIN_SCALE)
    w = weight_amax.float().to(a.device).clamp(min=MIN_SCALE)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=MIN_SCALE)


def weight_amax(linears: list[nn.Linear]) -> torch.Tensor:
    """(in,) max |W_ij| over the rows of all the given Linears (they share one input)."""
    return torch.stack([m.weight.detach().abs().amax(dim=0).float() for m in linears]).amax(dim=0)


# ----------------------------------------------------------------------------- folding (exact transforms)


def _check_linears(linears, n: int, who: str) -> None:
    for m in linears:
        if not isinstance(m, nn.Linear):
            raise TypeError(f"{who} folds into nn.Linear weights, got {type(m).__name__}: smooth the model before "
                            "quantizing it (actquant.apply does it in that order)")
        if m.in_features != n:
            raise ValueError(f"{who}: a Linear with in_features={m.in_features} cannot take scales of size {n}")


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """norm.weight /= s (and its bias, if any); every Linear's weight columns *= s. In place, exact in full precision:
    the norm's output channel j is divided by s_j, the Linears multiply it back."""
    if s.dim() != 1 or getattr(norm, "weight", None) is None or norm.weight.shape != s.shape:
        got = None if getattr(norm, "weight", None) is None else tuple(norm.weight.shape)
        raise ValueError(f"s must be (hidden,) like the norm's weight; got s {tuple(s.shape)}, norm.weight {got}")
    _check_linears(linears, s.numel(), "fold_smoothing")
    norm.weight.div_(s.to(norm.weight))
    if getattr(norm, "bias", None) is not None:  # LayerNorm: y = x_hat * w + b, so b is divided too
        norm.bias.div_(s.to(norm.bias))
    for m in linears:
        m.weight.mul_(s.to(m.weight)[None, :])  # (out, in) * (1, in): column j times s_j


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, next_: nn.Linear, s: torch.Tensor) -> None:
    """prev's output rows (and bias) /= s, next_'s weight columns *= s. In place. Exact when next_ reads prev's output
    through an elementwise product that is linear in it: Llama's down_proj(silu(gate(x)) * up(x)) for up -> down."""
    _check_linears([prev], prev.in_features, "fold_into_linear")
    if s.dim() != 1 or prev.out_features != s.numel():
        raise ValueError(f"s must be (prev.out_features,) = ({prev.out_features},), got {tuple(s.shape)}")
    _check_linears([next_], s.numel(), "fold_into_linear")
    prev.weight.div_(s.to(prev.weight)[:, None])  # (out, in) / (out, 1): row j divided by s_j
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias))
    next_.weight.mul_(s.to(next_.weight)[None, :])


# ----------------------------------------------------------------------------- the whole model

ATTN_IN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
MLP_IN = ["mlp.gate_proj", "mlp.up_proj"]


def validate_llama_layers(model: nn.Module) -> None:
    """Raise a TypeError unless every decoder layer has Llama's layout (norms, q/k/v/o, gate/up/down Linears)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"smooth_model expects a decoder-only causal LM with model.model.layers (Llama, Qwen2, "
                        f"SmolLM2, Mistral); got {type(model).__name__}")
    if getattr(model.config, "model_type", "") in ("gemma", "gemma2", "gemma3", "gemma3_text"):
        raise TypeError("Gemma's RMSNorm multiplies by (1 + weight): dividing its weight by s is not exact; "
                        "smooth_model handles Llama-style norms only")
    for li, layer in enumerate(layers):
        for n in ["input_layernorm", "post_attention_layernorm"] + ATTN_IN + MLP_IN + ["mlp.down_proj"]:
            try:
                m = layer.get_submodule(n)
            except AttributeError:
                raise TypeError(f"layer {li} has no {n}: smooth_model handles Llama-style decoder layers "
                                f"(input_layernorm, self_attn.q/k/v_proj, post_attention_layernorm, "
                                f"mlp.gate/up/down_proj), got {type(layer).__name__}") from None
            if n.endswith("_proj") and not isinstance(m, nn.Linear):
                raise TypeError(f"layer {li}.{n} is a {type(m).__name__}, not an nn.Linear: smooth the model "
                                "before quantizing it (reload it, then actquant.apply(..., smooth_alpha=...))")


@torch.no_grad()
def smooth_model(model: nn.Module, calibration: torch.Tensor, alpha: float = 0.5, *, batch_size: int = 8,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """SmoothQuant every decoder layer in place; returns {linear name: s (in,)} for every smoothed Linear.

        scales = smooth_model(model, cl.data.calibration_batches(tok, 8, 512), alpha=0.5)

    One calibration pass collects max |x_j| at the inputs of q_proj (shared by k, v), gate_proj (shared by up) and
    down_proj; then per layer: 1/s into input_layernorm and s into q/k/v; 1/s into up_proj's rows and s into
    down_proj; 1/s into post_attention_layernorm and s into gate/up (whose weight amax is read after up_proj's rows
    were rescaled, so s balances the weights that will be quantized). Every fold is exact, so no layer's input
    statistics change as other layers are smoothed, and one pass serves all. o_proj is left alone (module docstring).
    """
    smooth_scales(torch.ones(1), torch.ones(1), alpha)  # check alpha before the calibration pass
    validate_llama_layers(model)
    layers = model.model.layers
    observe = {}
    for li, layer in enumerate(layers):
        for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            observe[f"model.layers.{li}.{n}"] = layer.get_submodule(n)
    stats = collect_input_stats(model, calibration, observe, batch_size, tokens=False, progress=progress,
                                desc=f"SmoothQuant stats (alpha={alpha})")
    scales = {}
    for li, layer in enumerate(layers):
        p = f"model.layers.{li}."
        attn = [layer.get_submodule(n) for n in ATTN_IN]
        s = smooth_scales(stats[p + "self_attn.q_proj"].channel_amax, weight_amax(attn), alpha)
        fold_smoothing(layer.input_layernorm, attn, s)
        scales |= {p + n: s for n in ATTN_IN}
        down = layer.mlp.down_proj  # first: it rescales up_proj's rows, which gate/up's weight_amax must see
        s = smooth_scales(stats[p + "mlp.down_proj"].channel_amax, weight_amax([down]), alpha)
        fold_into_linear(layer.mlp.up_proj, down, s)
        scales[p + "mlp.down_proj"] = s
        mlp = [layer.get_submodule(n) for n in MLP_IN]
        s = smooth_scales(stats[p + "mlp.gate_proj"].channel_amax, weight_amax(mlp), alpha)
        fold_smoothing(layer.post_attention_layernorm, mlp, s)
        scales |= {p + n: s for n in MLP_IN}
    return scales


@torch.no_grad()
def max_logit_change(model_a: nn.Module, model_b: nn.Module, ids: torch.Tensor) -> float:
    """max |logits_a - logits_b| over ids (batch, seq): ~1e-5 at float32 for an exact transform like smoothing."""
    device = next(model_a.parameters()).device
    a = model_a(ids.to(device), use_cache=False).logits.float()  # (batch, seq, vocab)
    b = model_b(ids.to(device), use_cache=False).logits.float()
    return (a - b).abs().max().item()
