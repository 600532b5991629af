"""One entry point per family: quantize(model, config) and prune(model, config) (torchao's quantize_ and
ModelOpt's mtq.quantize are the models).

    import compresslab as cl
    cl.quantize(model, cl.GPTQConfig(bits=4, group_size=64, act_order=True), calibration=calib)
    model.save_pretrained("gptq-w4g64")        # a real checkpoint: compressed-tensors (vLLM) or GPTQ v2 (GPTQModel)
    cl.quantize(model, cl.W8A8Config(fmt="fp8"), calibration=calib)      # lab 03: FP8 W8A8, per-token activations
    cl.prune(model, cl.SparseGPTConfig(pattern="2:4"), calibration=calib)

Both work in place and return the model. Configs are frozen dataclasses with keyword-only fields; each algorithm
stays in its own file (quant, gptq, awq, actquant, pruning) and this module only dispatches. After RTNConfig or
GPTQConfig the quantized state lives in the model: every decoder Linear is a quant.QuantLinear whose buffers are the
storage (packed codes, fp16 scales, zeros, g_idx for act-order), model.config.quantization_config describes it, and
model.save_pretrained(path) writes a checkpoint that third-party loaders read (tests/test_api.py loads it back with
transformers + compressed-tensors).
"""

from __future__ import annotations

import types
from dataclasses import asdict, dataclass

import torch.nn as nn

from . import checkpoint, gptq, pruning, quant
from .quant import DEFAULT_GROUP_SIZE  # 64: one default everywhere (the kernels' too)


@dataclass(frozen=True, kw_only=True)
class RTNConfig:
    """Round-to-nearest weight-only quantization (lab 01): no calibration."""

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    sym: bool = False

    def __post_init__(self):
        quant.validate_bits(self.bits)
        _check_group_size(self.group_size)


@dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """GPTQ (lab 02). lazy_block: columns per lazy batch update (the paper's B = 128); act_order: columns by
    decreasing Hessian diagonal (GPTQModel's desc_act); static_groups: group parameters from the original weights."""

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    sym: bool = False
    act_order: bool = True
    static_groups: bool = False
    damp: float = 0.01
    clip: bool = False
    lazy_block: int = 128

    def __post_init__(self):
        if self.bits not in gptq.GPTQ_BITS:
            raise ValueError(f"GPTQConfig: bits must be one of {gptq.GPTQ_BITS}, got {self.bits!r}")
        _check_group_size(self.group_size)
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTQConfig: damp is a fraction of the mean Hessian diagonal in [0, 1), got {self.damp}")
        if self.sym and self.clip:
            raise ValueError("GPTQConfig: clip=True searches an asymmetric range; use sym=False with it")


@dataclass(frozen=True, kw_only=True)
class _PruneConfig:
    sparsity: float | None = None
    pattern: str | None = None  # "2:4", "4:8": n of every m consecutive weights kept

    def __post_init__(self):
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError(f"{type(self).__name__}: give sparsity=0.5 (unstructured) or pattern='2:4' (N:M), "
                             "exactly one of them")
        if self.sparsity is not None:
            pruning.validate_sparsity(self.sparsity)
        else:
            pruning.parse_pattern(self.pattern)  # a clear error now, not at prune time


@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(_PruneConfig):
    """Smallest |w| first, one threshold per Linear (lab 04); no calibration."""


@dataclass(frozen=True, kw_only=True)
class WandaConfig(_PruneConfig):
    """|w| * ||x_j||, compared per output row (lab 04)."""


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(_PruneConfig):
    """OBS pruning with the inverse Hessian, mask chosen per block (lab 04). bits: also quantize the surviving
    weights to this many bits in the same pass (SparseGPT's joint mode: 2:4 + 4-bit is Sparse-Marlin's format),
    with GPTQ's grid in groups of group_size; None keeps them in full precision."""

    bits: int | None = None
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        super().__post_init__()
        if self.bits is not None and self.bits not in gptq.GPTQ_BITS:
            raise ValueError(f"SparseGPTConfig: bits must be None or one of {gptq.GPTQ_BITS}, got {self.bits!r}")
        _check_group_size(self.group_size)


def _check_group_size(group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int (columns per scale), got {group_size!r}")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize/prune take the model (an nn.Module), got {type(model).__name__}")
    if any(isinstance(m, quant.QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized (it holds QuantLinear modules): load a fresh copy")


def _needs(calibration, what: str):
    if calibration is None:
        raise ValueError(f"{what} needs calibration data: pass calibration=cl.data.calibration_batches(tok, 32, 512)")
    return calibration


def _store(model, report: dict, config, method: str) -> None:
    """Swap every quantized Linear for a QuantLinear holding the report's codes; describe it in the config."""
    for name, res in report.items():
        parent, _, attr = name.rpartition(".")
        lin = model.get_submodule(name)
        qlin = quant.QuantLinear.from_codes(res.codes, res.scales, res.zeros, bits=config.bits,
                                            group_size=config.group_size, sym=config.sym, g_idx=res.g_idx,
                                            bias=lin.bias)
        qlin.damp_used = getattr(res, "damp_used", 0.0)
        setattr(model.get_submodule(parent), attr, qlin.to(lin.weight.device))
    model.config.quantization_config = {"quant_method": "compresslab", "method": method, **asdict(config)}
    model.config.quantization_config.setdefault("act_order", False)
    # model.save_pretrained(path) writes the real checkpoint (transformers' own would write the buffers as they are)
    model.save_pretrained = types.MethodType(checkpoint.save_quantized, model)


def quantize(model, config, calibration=None, *, batch_size: int = 8, progress: bool = True):
    """Quantize `model` in place as `config` says; returns the model. calibration: (n, seq_len) token ids
    (cl.data.calibration_batches), needed by every config but RTNConfig and activation configs with dynamic scales."""
    _check_model(model)
    if isinstance(config, RTNConfig):
        _, report = gptq.rtn_quantize_model(model, config.bits, config.group_size, config.sym, inplace=True)
        _store(model, report, config, "rtn")
    elif isinstance(config, GPTQConfig):
        _, report = gptq.quantize_model(model, _needs(calibration, "GPTQ"), config.bits, config.group_size,
                                        config.sym, config.act_order, config.static_groups, config.damp,
                                        config.lazy_block, config.clip, batch_size, inplace=True, progress=progress)
        _store(model, report, config, "gptq")
    elif type(config).__name__ == "AWQConfig":  # lab 03's configs live in their algorithms' files
        from . import awq

        awq.apply(model, config, _needs(calibration, "AWQ"), batch_size=batch_size, progress=progress)
    elif type(config).__name__ in ("W8A8Config", "MXConfig"):
        from . import actquant

        actquant.apply(model, config, calibration, batch_size=batch_size, progress=progress)
    else:
        raise TypeError(f"unknown config {type(config).__name__}; use RTNConfig, GPTQConfig, AWQConfig, W8A8Config "
                        "or MXConfig")
    return model


def prune(model, config, calibration=None, *, batch_size: int = 8, progress: bool = True):
    """Prune `model` in place (MagnitudeConfig, WandaConfig, SparseGPTConfig); returns the model."""
    _check_model(model)
    methods = {MagnitudeConfig: "magnitude", WandaConfig: "wanda", SparseGPTConfig: "sparsegpt"}
    if type(config) not in methods:
        raise TypeError(f"unknown config {type(config).__name__}; use MagnitudeConfig, WandaConfig or SparseGPTConfig")
    method = methods[type(config)]
    if method != "magnitude":
        _needs(calibration, method)
    joint = {"bits": config.bits, "group_size": config.group_size} if method == "sparsegpt" and config.bits else {}
    pruning.prune_model(model, calibration, method, config.sparsity, pattern=config.pattern, batch_size=batch_size,
                        inplace=True, progress=progress, **joint)
    return model
