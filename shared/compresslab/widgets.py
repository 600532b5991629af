"""Interactive explorers for the labs (ipywidgets). Each also works non-interactively: call draw(...) directly.

    quantization_explorer(layer.weight)     # sliders: bits, group size -> error histogram (lab 01)
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .quant import divisors, fake_quantize


def draw_quantization_error(w: torch.Tensor, bits: int = 4, group_size=64, sym: bool = False, ax=None):
    """Histogram of the round-to-nearest error w_hat - w for one setting, with its RMS in the title."""
    w = w.detach().float()
    err = (fake_quantize(w, bits, group_size, sym) - w).flatten()  # (numel,)
    rms, rel = err.pow(2).mean().sqrt().item(), (err.norm() / w.norm()).item()
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    ax.hist(err.numpy(), bins=120, color="tab:red", alpha=0.8)
    ax.set(xlabel="quantization error (w_hat - w)", ylabel="count", yscale="log",
           title=f"{bits}-bit, group {group_size}, {'sym' if sym else 'asym'}: RMS {rms:.2e}, relative {rel:.1%}")
    return ax


def quantization_explorer(w: torch.Tensor):
    """Sliders for bits (2-8), group size (divisors of in_features, per-channel, per-tensor) and symmetry."""
    import ipywidgets as widgets

    n = w.shape[-1]
    groups = [d for d in divisors(n) if 16 <= d < n] + ["channel", "tensor"]
    controls = dict(
        bits=widgets.IntSlider(value=4, min=2, max=8, description="bits"),
        group_size=widgets.Dropdown(options=groups, value=64 if 64 in groups else groups[0], description="group"),
        sym=widgets.Checkbox(value=False, description="symmetric"),
    )

    def show(bits, group_size, sym):
        draw_quantization_error(w, bits, group_size, sym)
        plt.show()

    out = widgets.interactive_output(show, controls)
    return widgets.VBox([widgets.HBox(list(controls.values())), out])
