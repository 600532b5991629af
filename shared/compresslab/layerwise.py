"""The layer-by-layer calibration harness shared by GPTQ, AWQ, pruning and distillation (labs 02-05, 08).

    inputs = layer0_inputs(model, calib, batch_size=8)   # [(hidden (b, seq, hidden), kwargs)] per micro-batch
    for li, layer in enumerate(model.model.layers):
        for names in SEQUENTIAL:                          # true-sequential: q/k/v -> o -> gate/up -> down
            stats = collect_stats(layer, inputs, decoder_linears(layer, names, li, "GPTQ"), make_stat)
            ...                                           # quantize / prune those Linears from their statistics
        inputs = run_layer(layer, inputs)                # this (compressed) layer's outputs feed the next one

Only one decoder layer's activations are held at a time, so calibrating a model needs the memory of one layer, not of
the whole model. collect_stats stops each forward as soon as the Linears it watches have seen their inputs: a step
that needs q/k/v runs the layer up to v_proj only, so the four true-sequential steps cost about 1.8 layer forwards
instead of 4, with the same statistics to the bit (tests/test_layerwise.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# true-sequential order inside a decoder block: each step sees the outputs of the already-compressed steps. The
# Linears of one step read one and the same tensor (tests/test_layerwise.py), so one statistic can serve them all.
SEQUENTIAL = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed from it has been seen."""


def validate_decoder(model, who: str) -> None:
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise TypeError(f"{who} expects a decoder-only causal LM with model.model.layers "
                        f"(Llama, Qwen2, SmolLM2, Mistral); got {type(model).__name__}")


def decoder_linears(layer, names: list[str], li: int, who: str) -> dict[str, nn.Linear]:
    """The named submodules of decoder layer li, checked to be nn.Linear."""
    linears = {n: layer.get_submodule(n) for n in names}
    for n, m in linears.items():
        if not isinstance(m, nn.Linear):
            raise TypeError(f"layer {li}.{n} is a {type(m).__name__}; {who} here handles nn.Linear only")
    return linears


@torch.no_grad()
def layer0_inputs(model, calib: torch.Tensor, batch_size: int):
    """Run the model up to decoder layer 0 -> list of (hidden (b, seq, hidden), kwargs) per micro-batch."""
    layer0 = model.model.layers[0]
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(calib[i : i + batch_size].to(next(model.parameters()).device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return [(h, {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}) for h, kw in captured]


@torch.no_grad()
def collect_stats(layer, inputs, linears: dict, make_stat) -> dict:
    """Run the layer on its calibration inputs; every Linear's input batches go to its own make_stat(linear)
    (anything with add_batch(x): a Hessian in lab 02, activation norms in lab 04). Returns {name: stat}.

    Each forward stops once every watched Linear has received its input (a pre-hook sees the input before the
    Linear computes), so the rest of the layer is never run: the statistics are those of a full forward."""
    stats = {n: make_stat(m) for n, m in linears.items()}
    seen = set()

    def watch(name):
        def hook(module, args):
            stats[name].add_batch(args[0])
            seen.add(name)
            if len(seen) == len(linears):  # everything this step needs: skip the rest of the layer
                raise _StopForward

        return hook

    hooks = [m.register_forward_pre_hook(watch(n)) for n, m in linears.items()]
    try:
        for h, kw in inputs:
            seen.clear()
            try:
                layer(h, **kw)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return stats


def step_stats(layer, inputs, linears: dict, make_stat) -> dict:
    """collect_stats with one statistic per SEQUENTIAL step, shared by that step's Linears (they read one tensor):
    q/k/v get the same object, so it is accumulated once, not three times. Returns {name: stat} for every Linear."""
    firsts = {}  # the first watched Linear of each step: the one whose input is recorded
    for names in SEQUENTIAL:
        present = [n for n in names if n in linears]
        if present:
            firsts[present[0]] = present
    stats = collect_stats(layer, inputs, {f: linears[f] for f in firsts}, make_stat)
    return {n: stats[f] for f, present in firsts.items() for n in present}


@torch.no_grad()
def run_layer(layer, inputs):
    """The layer's outputs on every micro-batch, in the same [(hidden, kwargs)] form as its inputs."""
    outs = []
    for h, kw in inputs:
        out = layer(h, **kw)
        outs.append((out[0] if isinstance(out, tuple) else out, kw))
    return outs
