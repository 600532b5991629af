"""After GPTQ: tune the fp16 group scales and the RMSNorm weights end to end, integer codes fixed (lab 02, section 6).

    cl.quantize(qm, cl.GPTQConfig(bits=3, clip=True), calibration=calib)     # QuantLinear modules hold the state
    hist = tune_scales(qm, teacher=model, ids=train_windows, steps=60)          # their fp16 scales tuned in place
    qm.save_pretrained("tuned")                                                 # same format, same bits

    qm, report = gptq.quantize_model(model, calib, bits=3, group_size=64)      # or the lab's (model, report) pair:
    tune_scales(qm, report, model, train_windows)                              # qm and report updated in place

GPTQ fixes each layer against its own inputs, one layer at a time; nothing looks at the model's output. Two things a
GPTQ checkpoint stores in floating point anyway can still move without costing a single bit:
* the per-group **scales** (out, n_groups): W_hat[:, j] = (codes[:, j] - zeros[:, g_idx[j]]) * scales[:, g_idx[j]],
  with codes and zero points integers that stay exactly as GPTQ chose them (EfficientQAT's E2E-QP, PEQA);
* the **RMSNorm weights** in front of every attention and MLP block (Norm-Tweaking, Li et al. 2023).
Both are trained by distillation from the full-precision model: the loss is KL(teacher || quantized student) per
token at T = 1 (lab 05's kd_loss with alpha = 0), so the target is "behave like the FP model", not "fit the text".
Each scale is trained as a gain on GPTQ's value (scale = s0 * gain, gain starting at 1), so one learning rate suits
scales of every size. At the end the scales are rounded to fp16, as the checkpoint stores them, and written back
into the model: the QuantLinear's scales buffer (what save_pretrained writes), or, for the (model, report) pair of
gptq.quantize_model, the weights and the report the exporter reads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distill import distill
from .gptq import GPTQResult
from .quant import QuantLinear


class TunableQuantLinear(nn.Module):
    """A GPTQ-quantized Linear whose weight is rebuilt from fixed integer codes and trainable group-scale gains."""

    def __init__(self, linear: nn.Module, res: GPTQResult | None = None):
        super().__init__()
        if isinstance(linear, QuantLinear):  # the state lives in the module (cl.quantize)
            codes, zeros, scales = linear.codes(), linear.zeros, linear.scales  # (out, in), (out, G), (out, G)
            g_idx = getattr(linear, "g_idx", None)
            if g_idx is None:
                g_idx = torch.arange(linear.in_features, device=codes.device) // linear.group_size
            weight = linear.dequantized_weight()
        else:  # a plain Linear and its entry of gptq.quantize_model's report
            codes, zeros, scales, g_idx, weight = res.codes, res.zeros, res.scales, res.g_idx, linear.weight.float()
        out_f, in_f = weight.shape
        if tuple(codes.shape) != (out_f, in_f):
            raise ValueError(f"GPTQ codes {tuple(codes.shape)} do not match the Linear's weight {(out_f, in_f)}")
        dev = weight.device
        g_idx = g_idx.to(device=dev, dtype=torch.long)  # (in,) group of each column
        codes, zeros = codes.to(dev).long(), zeros.to(dev).long()  # (out, in), (out, G)
        self.register_buffer("q", (codes - zeros[:, g_idx]).to(torch.int16))  # (out, in) in [-maxq, maxq], fixed
        self.register_buffer("scales0", scales.to(device=dev, dtype=torch.float32))  # (out, G) GPTQ's scales
        self.register_buffer("g_idx", g_idx)
        self.gain = nn.Parameter(torch.ones_like(self.scales0))  # (out, G): scale = scales0 * gain
        self.bias = linear.bias
        drift = (self.weight() - weight).abs().max().item()
        if drift > 1e-4 * max(1.0, weight.abs().max().item()):
            raise ValueError(f"the GPTQ report does not describe this Linear's weights (largest difference {drift:.3g}):"
                             " pass the report returned together with this model by gptq.quantize_model")

    def scales(self) -> torch.Tensor:
        return self.scales0 * self.gain  # (out, G)

    def weight(self) -> torch.Tensor:
        return self.q.float() * self.scales()[:, self.g_idx]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)


def _norms(model) -> list[nn.Parameter]:
    """Every RMSNorm weight of the decoder (2 per layer) and the final norm."""
    return [p for n, p in model.model.named_parameters() if n.endswith("norm.weight")]


def tune_scales(qmodel, report: dict | None = None, teacher=None, ids: torch.Tensor | None = None, steps: int = 60,
                lr: float = 1e-3, batch_size: int = 4, norms: bool = True, seed: int = 0, eval_fn=None,
                eval_every: int = 0, progress: bool = True) -> dict:
    """Tune the group scales (and RMSNorm weights) of a GPTQ-quantized model by KD from `teacher`, in place.

    qmodel quantized by cl.quantize (report None): its QuantLinear modules' fp16 scales are tuned, codes, zeros and
    g_idx untouched, and save_pretrained writes the tuned model. Or qmodel, report as gptq.quantize_model returned
    them (report[name] = GPTQResult per quantized Linear): report[name].scales and .dequantized and the model's
    weights are updated. teacher: the full-precision model (same tokenizer). ids: (n, seq) training windows.
    Returns lab 05's training history (loss per step, optional evals).
    """
    if teacher is None or ids is None:
        raise ValueError("tune_scales needs teacher= (the full-precision model) and ids= (training windows)")
    if teacher is qmodel:
        raise ValueError("the teacher must be the full-precision model, not the quantized one")
    if report is None:
        originals = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
        if not originals:
            raise ValueError("qmodel holds no QuantLinear: quantize it with cl.quantize(model, cl.GPTQConfig(...)), "
                             "or pass the report that gptq.quantize_model returned with it")
    else:
        if not report or not all(isinstance(r, GPTQResult) for r in report.values()):
            raise ValueError("report must be the dict of GPTQResult that gptq.quantize_model returned with the model")
        missing = [n for n in report if not isinstance(qmodel.get_submodule(n), nn.Linear)]
        if missing:
            raise ValueError(f"{missing[0]} is not an nn.Linear: tune_scales expects the model as quantize_model "
                             "returned it (and runs once per model)")
        originals = {name: qmodel.get_submodule(name) for name in report}
    tunables = {name: TunableQuantLinear(m, None if report is None else report[name])  # all checked first
                for name, m in originals.items()}
    was_grad = {p: p.requires_grad for p in qmodel.parameters()}
    for p in qmodel.parameters():
        p.requires_grad_(False)
    for p in _norms(qmodel) if norms else []:
        p.requires_grad_(True)
    for name, tq in tunables.items():  # swap each quantized Linear for its tunable twin
        parent, child = name.rsplit(".", 1)
        setattr(qmodel.get_submodule(parent), child, tq)
    try:
        hist = distill(qmodel, ids, teacher=teacher, steps=steps, lr=lr, batch_size=batch_size, T=1.0, alpha=0.0,
                       kind="forward", seed=seed, eval_fn=eval_fn, eval_every=eval_every, progress=progress)
    finally:
        with torch.no_grad():  # back to the quantized modules with the tuned scales, stored as fp16
            for name, orig in originals.items():
                parent, child = name.rsplit(".", 1)
                tq = qmodel.get_submodule(name)
                s = tq.scales().half().float()  # (out, G) as the checkpoint stores them
                if isinstance(orig, QuantLinear):
                    orig.scales.copy_(s.half())
                else:
                    w = tq.q.float() * s[:, tq.g_idx]  # (out, in)
                    orig.weight.copy_(w.to(orig.weight.dtype))
                    res = report[name]
                    res.scales = s.to(res.scales.device, res.scales.dtype)
                    res.dequantized = w.to(res.dequantized.device, res.dequantized.dtype)
                setattr(qmodel.get_submodule(parent), child, orig)
        for p, g in was_grad.items():
            p.requires_grad_(g)
    qmodel.eval()
    return hist
