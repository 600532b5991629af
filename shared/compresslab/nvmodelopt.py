"""NVIDIA Model Optimizer (nvidia-modelopt) from the lab: quantize, inspect, export, read back (activation lab).

    ok, why = available()                                        # (True, "nvidia-modelopt 0.47.0") or why not
    model = quantize(model, "int4_awq", calib)                   # IN PLACE: mtq.quantize + a forward loop over calib
    print(summary(model))                                        # enabled quantizers per kind, one example each
    fq = fake_quantized_weights(model)                           # {Linear name: weight as the fake quant sees it}
    path = export(model, "out/smollm2-int4-awq")                 # export_hf_checkpoint on a copy of the model
    back = read_export(path)                                     # safetensors + json only: {"quant_config", "weights"}

Model Optimizer (`import modelopt.torch.quantization as mtq`) inserts a TensorQuantizer before every Linear's input
and weight (fake quantization, like actquant.ActQuantLinear), calibrates their ranges with `forward_loop`, and
`modelopt.torch.export.export_hf_checkpoint` writes the packed checkpoint that TensorRT-LLM reads on a GPU (all four
CPU formats below; vLLM's quantization="modelopt" reads the FP8 and NVFP4 ones). transformers cannot read it: it warns
"Unknown quantization type, got modelopt ... we will skip the quantization", then the INT4 exports fail on shapes and
the FP8 and INT8 ones LOAD, codes cast to float and every scale dropped (a broken model, no error). read_export() is
this package's independent reader, which rebuilds every quantized Linear's weight from the files alone.

CONFIGS names ModelOpt's presets. All but nvfp4 calibrate and export on a CPU (pinned: nvidia-modelopt 0.47.0,
checked with torch 2.13 and transformers 5.23, which ModelOpt warns it has not tested; that warning is silenced):
    "fp8"       FP8_DEFAULT_CFG       W8A8 float8 e4m3, one static scale per weight tensor and per input tensor
    "int8_sq"   INT8_SMOOTHQUANT_CFG  W8A8 int8: SmoothQuant (alpha 1), per-channel weights, static per-tensor inputs
    "int4_awq"  INT4_AWQ_CFG          W4A16: AWQ-lite, symmetric int4 in blocks of block_size along in_features
    "w4a8_awq"  W4A8_AWQ_BETA_CFG     W4A8: the int4 AWQ weights then one FP8 scale per tensor, FP8 inputs
    "nvfp4"     NVFP4_DEFAULT_CFG     W4A4 NVFP4: needs a CUDA GPU (formats.nvfp4_quantize emulates it on CPU)

What export writes (export_dir/model.safetensors + hf_quant_config.json + config.json), per quantized Linear <m>
(SmolLM2-135M, a (576, 576) q_proj, block 64):
    fp8       <m>.weight (576, 576) float8_e4m3fn | <m>.weight_scale () fp32 | <m>.input_scale () fp32
              weight = float(<m>.weight) * weight_scale                       quant_algo "FP8"
    int8_sq   <m>.weight (576, 576) int8 | <m>.weight_scale (576,) fp32 per output row | <m>.input_scale () |
              <m>.pre_quant_scale (576,): the engine multiplies the input by it (SmoothQuant's 1/s)
              weight = <m>.weight * weight_scale[:, None]                    quant_algo "W8A8_SQ_PER_CHANNEL"
    int4_awq  <m>.weight (288, 576) uint8: two int4 codes per byte, packed along OUT features: byte [r, c] holds
              row 2r in its low nibble and row 2r+1 in its high nibble, two's complement in [-8, 7] |
              <m>.weight_scale (576, 9) fp32, one per row and block | <m>.pre_quant_scale (in,) on o_proj and
              down_proj only (see below)
              weight = code * weight_scale[:, col // 64]                      quant_algo "W4A16_AWQ", group_size 64,
                                                                               has_zero_point false
    w4a8_awq  as int4_awq, plus <m>.weight_scale_2 () fp32 and <m>.input_scale () fp32:
              weight = e4m3(code * weight_scale / weight_scale_2) * weight_scale_2   quant_algo "W4A8_AWQ"
Unquantized tensors (embeddings, norms) are stored as they are; SmolLM2's lm_head is tied to the embeddings and not
stored (exclude_modules lists it).

The pre_quant_scale. AWQ and SmoothQuant multiply each Linear's input by a per-channel pre_quant_scale p and keep the
weight as W / p (ModelOpt rescales module.weight in place at the end of calibration), so y = (x * p) @ Q(W / p)^T.
Both the fake quant (module.weight_quantizer(module.weight)) and the exported codes live in that smoothed space:
compare them directly, with no division or multiplication. The original-space weight a plain Linear would need is
Q(W / p) * p (columns times p). Export then goes one step further for Linears that share an input (q/k/v, gate/up):
  - it replaces their separate p by the group's mean and re-quantizes each weight for it, so the projections
    can run as one GEMM (int8_sq, int4_awq, w4a8_awq; fp8 has no p and only unifies the input scales);
  - for the AWQ formats it folds that shared p into the preceding RMSNorm weight and stores no pre_quant_scale for
    them (o_proj and down_proj keep theirs).
So for q/k/v and gate/up the exported codes are NOT the codes the calibrated model computed with:
fake_quantized_weights(model, as_exported=True) runs ModelOpt's own pre-export step on a copy and returns the weights
the export writes. Even then the two round separately (the export divides by the scale, the fake quant multiplies by
its inverse; FP8: x * (448 / amax)): the last fp32 bit differs and flips round-half ties, which bf16 weights and a
bf16 amax make common. Measured on SmolLM2-135M (106M quantized weights): 2e-4 of them (FP8), 4e-7 (int8_sq),
6e-8 (int4_awq), 5e-6 (w4a8_awq) are one grid step apart, all others identical up to fp32 rounding.

ModelOpt's export consumes the model it is given (each quantized weight becomes its packed codes, AWQ scales move into
the norms): a second export of the same model fails ("Input shape has changed ... Block-quantization requires a fixed
input shape"). export() therefore exports a deep copy (copy_model=False: the model itself, once, e.g. when a copy
does not fit in memory).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import warnings
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import staged
from .quant import divisors, linear_in_features

MODELOPT_VERSION = "0.47.0"  # the pinned version (shared/pyproject.toml): the config names and export layout below
INSTALL = f"pip install nvidia-modelopt=={MODELOPT_VERSION}"
CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "int4_awq": "INT4_AWQ_CFG",
           "w4a8_awq": "W4A8_AWQ_BETA_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
MODELOPT_BLOCK = 128  # ModelOpt's INT4 block (values per scale along in_features)
READABLE = ("FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ")  # the quant_algo values read_export rebuilds

# ----------------------------------------------------------------------------- the library, imported lazily


def available() -> tuple[bool, str]:
    """(True, "nvidia-modelopt <version>") when Model Optimizer is installed, else (False, how to install it).
    Warns when the installed version is not the pinned MODELOPT_VERSION. Does not import it (that takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("modelopt") is None:
        return False, f"NVIDIA Model Optimizer is not installed: {INSTALL} (the rest of the lab does not need it)"
    try:
        installed = version("nvidia-modelopt")
    except PackageNotFoundError:
        installed = "unknown"
    if installed != MODELOPT_VERSION:
        msg = (f"nvidia-modelopt {installed} is installed; compresslab.nvmodelopt is tested with {MODELOPT_VERSION} "
               f"(config names and the export layout change between versions): {INSTALL}")
        warnings.warn(msg, stacklevel=2)
        return True, msg
    return True, f"nvidia-modelopt {installed}"


def _mtq():
    """modelopt.torch.quantization, or an ImportError that says how to install it."""
    try:
        with warnings.catch_warnings():  # "transformers 5.23.0 is not tested with current version of modelopt"
            warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ImportError(f"NVIDIA Model Optimizer is needed here and could not be imported ({e}): {INSTALL}") from e
    return mtq


def _quantizer_types():
    """(TensorQuantizer, SequentialQuantizer) classes: W4A8's weight quantizer is a Sequential of two."""
    _mtq()
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    return TensorQuantizer, SequentialQuantizer


# ----------------------------------------------------------------------------- configs


def _check_name(name) -> str:
    if name not in CONFIGS:
        raise ValueError(f"unknown Model Optimizer config {name!r}; choose from {list(CONFIGS)}")
    return name


def _block_settings(cfg: dict) -> list[dict]:
    """Every quantizer attribute dict of a config that has block_sizes (a 'cfg' may be a list: W4A8)."""
    found = []
    for entry in cfg["quant_cfg"]:  # 0.47: an ordered list of {"quantizer_name", "cfg", "enable"}
        attrs = entry.get("cfg") if isinstance(entry, dict) else None
        for a in attrs if isinstance(attrs, list) else [attrs]:
            if isinstance(a, dict) and a.get("block_sizes"):
                found.append(a)
    return found


def config(name: str, *, block_size: int = 64) -> dict:
    """A deep copy of ModelOpt's preset `name` (a CONFIGS key) with every block size of 128 set to block_size.

        cfg = config("int4_awq")             # INT4_AWQ_CFG with blocks of 64: {"quant_cfg": [...], "algorithm": ...}

    Why: the INT4 presets quantize blocks of 128 input features, and SmolLM2-135M's Linears have in_features 576
    (hidden) and 1536 (MLP): 576 % 128 = 64, so the last block of every row would be ragged, and the export refuses
    it. 64 divides both (576 = 9 x 64). Other block sizes (NVFP4's 16) are left as they are; fp8 and int8_sq have
    none. quantize() checks that block_size divides the model's in_features.
    """
    _check_name(name)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    cfg = copy.deepcopy(getattr(_mtq(), CONFIGS[name]))  # the presets are module-level dicts: never edit them
    for attrs in _block_settings(cfg):
        sizes = attrs["block_sizes"]
        for axis, size in sizes.items():
            if isinstance(axis, int) and size == MODELOPT_BLOCK:
                sizes[axis] = block_size
    return cfg


def _config_block(cfg: dict) -> int | None:
    """The block size along in_features (axis -1) of a config's weight quantizer, or None."""
    sizes = [a["block_sizes"].get(-1) for a in _block_settings(cfg)]
    return next((s for s in sizes if isinstance(s, int)), None)


# ----------------------------------------------------------------------------- quantize


def _check_calibration(calibration) -> torch.Tensor:
    if calibration is None:
        raise ValueError("Model Optimizer calibrates on sample text: pass calibration token ids, e.g. "
                         "cl.data.calibration_batches(tok, n_samples=32, seq_len=512)")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0 \
            or calibration.is_floating_point():
        got = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be (n_samples, seq_len) token ids, got {got}: use "
                         "cl.data.calibration_batches(tok, n_samples=32, seq_len=512)")
    return calibration


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds ModelOpt quantizers (it went through mtq.quantize)."""
    if importlib.util.find_spec("modelopt") is None:
        return False
    TensorQuantizer, _ = _quantizer_types()
    return any(isinstance(m, TensorQuantizer) for m in model.modules())


def _forward_loop(calibration: torch.Tensor, batch_size: int, progress: bool):
    """The forward_loop(model) mtq.quantize calls (AWQ-lite calls it twice: statistics, then the scale search)."""
    def forward_loop(model):
        device = next(model.parameters()).device
        with torch.no_grad():
            for i in tqdm(range(0, len(calibration), batch_size), desc="calibrate", disable=not progress,
                          leave=False):
                model(calibration[i : i + batch_size].to(device), use_cache=False)  # (b, seq_len) ids
    return forward_loop


def quantize(model: nn.Module, name: str, calibration: torch.Tensor, *, batch_size: int = 8, block_size: int = 64,
             progress: bool = True) -> nn.Module:
    """Quantize `model` IN PLACE with ModelOpt's preset `name` (see CONFIGS), calibrated on `calibration`
    (n_samples, seq_len) token ids. Returns the model (its Linears are now ModelOpt QuantLinears).

        q = quantize(copy.deepcopy(model), "fp8", cl.data.calibration_batches(tok, 32, 512))

    block_size: the INT4 block of int4_awq / w4a8_awq (see config()); it must divide every quantized Linear's
    in_features. The lm_head stays in full precision (every preset disables it). Quantize a fresh model: ModelOpt
    would re-calibrate existing quantizers on top of the old ones (AWQ would smooth twice).
    """
    _check_name(name)
    _check_calibration(calibration)
    if name == "nvfp4" and not (torch.cuda.is_available() and next(model.parameters()).is_cuda):
        where = "the model is on the CPU" if torch.cuda.is_available() else "torch.cuda.is_available() is False"
        raise RuntimeError(
            f"NVFP4 through Model Optimizer needs the model on a CUDA GPU ({where}): its dynamic block quantizer "
            "refuses CPU tensors ('amax must be a CUDA tensor for dynamic block quantization'). On a CPU, "
            "compresslab.formats.nvfp4_quantize emulates NVFP4 (E2M1 values, an E4M3 scale per 16, an fp32 scale "
            "per tensor), and actquant.apply(model, MXConfig(fmt='nvfp4')) runs W4A4 NVFP4 on the whole model.")
    mtq = _mtq()
    cfg = config(name, block_size=block_size)
    block = _config_block(cfg) if name != "nvfp4" else None  # NVFP4's 16 is checked by ModelOpt itself
    if block is not None:
        bad = sorted(n for n in linear_in_features(model) if n % block)
        if bad:
            ok = sorted(set.intersection(*(set(divisors(n)) for n in linear_in_features(model))) - {1})
            raise ValueError(f"block_size={block} does not divide in_features {bad} of this model's Linears: INT4 "
                             f"blocks must tile each row. Pass block_size= one of {[d for d in ok if d >= 16] or ok} "
                             "(SmolLM2-135M: 576 = 9 x 64, so 64 is the default; ModelOpt's own 128 does not fit).")
    if is_quantized(model):
        raise ValueError("this model already holds Model Optimizer quantizers: quantize a fresh copy of the "
                         "full-precision model (copy.deepcopy(model) before the first quantize)")
    return mtq.quantize(model, cfg, _forward_loop(calibration, batch_size, progress))


# ----------------------------------------------------------------------------- inspect


def _quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    TensorQuantizer, _ = _quantizer_types()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def summary(model: nn.Module, *, full: bool = False) -> str:
    """The model's ModelOpt quantizers: per kind (weight_quantizer, input_quantizer, ...) how many are enabled, and
    the first enabled one as an example. full=True: mtq.print_quant_summary's text (one line per quantizer).

        print(summary(q))     # 756 TensorQuantizers, 210 enabled / weight_quantizer 210 of 211 enabled ...
    """
    if full:
        out = StringIO()
        with redirect_stdout(out):
            _mtq().print_quant_summary(model)
        return out.getvalue()
    quantizers = _quantizers(model)
    if not quantizers:
        return "no Model Optimizer quantizers: call nvmodelopt.quantize(model, name, calibration) first"
    kinds: dict[str, list] = {}
    for name, q in quantizers:
        kind = re.sub(r"\.\d+$", "", name).rsplit(".", 1)[-1]  # W4A8: "...weight_quantizer.0" -> weight_quantizer
        kinds.setdefault(kind, []).append((name, q))
    enabled = sum(q.is_enabled for _, q in quantizers)
    lines = [f"{len(quantizers)} TensorQuantizers, {enabled} enabled"]
    for kind, items in kinds.items():
        on = [(n, q) for n, q in items if q.is_enabled]
        example = f"   e.g. {on[0][0]}: {on[0][1]}" if on else ""
        lines.append(f"  {kind:18s} {len(on):4d} of {len(items):4d} enabled{example}")
    return "\n".join(lines)


def _enabled(quantizer) -> bool:
    _, SequentialQuantizer = _quantizer_types()
    if isinstance(quantizer, SequentialQuantizer):
        return any(q.is_enabled for q in quantizer)
    return bool(getattr(quantizer, "is_enabled", False))


def _as_exported(model: nn.Module) -> nn.Module:
    """A copy of the model after ModelOpt's pre-export step (shared pre_quant_scale for Linears with one input,
    re-quantized weights, AWQ scales folded into the norms): the state export_hf_checkpoint packs. Uses a private
    ModelOpt function of the pinned version."""
    _mtq()
    try:
        from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    except ImportError as e:
        raise ImportError(f"as_exported=True uses ModelOpt {MODELOPT_VERSION}'s pre-export step "
                          f"(requantize_resmooth_fused_llm_layers), which this version lacks: {INSTALL}") from e
    clone = copy.deepcopy(model)
    with torch.no_grad(), redirect_stdout(StringIO()):
        requantize_resmooth_fused_llm_layers(clone)
    return clone


@torch.no_grad()
def fake_quantized_weights(model: nn.Module, *, as_exported: bool = False) -> dict[str, torch.Tensor]:
    """{Linear name: float32 weight (out, in)} as ModelOpt's fake quant sees it: module.weight_quantizer(module.weight)
    for every Linear whose weight quantizer is enabled.

        fq = fake_quantized_weights(q)["model.layers.0.self_attn.q_proj"]        # (576, 576)

    For AWQ and SmoothQuant the weight is in the smoothed space (W / pre_quant_scale), like the exported codes; see
    the module docstring. as_exported=True: the weights export() writes (ModelOpt's pre-export re-smoothing of
    q/k/v and gate/up applied to a copy first); read_export(path)["weights"] matches these up to round-half ties.
    """
    if not is_quantized(model):
        raise ValueError("no Model Optimizer quantizers in this model: call nvmodelopt.quantize(model, name, "
                         "calibration) first")
    source = _as_exported(model) if as_exported else model
    return {name: m.weight_quantizer(m.weight).float().clone() for name, m in source.named_modules()
            if isinstance(m, nn.Linear) and _enabled(getattr(m, "weight_quantizer", None))}


# ----------------------------------------------------------------------------- export


def export(model: nn.Module, path, *, tokenizer=None, copy_model: bool = True) -> Path:
    """Write the quantized model with modelopt.torch.export.export_hf_checkpoint into `path` -> path.

        path = export(q, "out/smollm2-int4-awq")    # model.safetensors, hf_quant_config.json, config.json

    The files go to <path>.tmp first, renamed onto path when complete. ModelOpt's export consumes the model it is
    given (weights become packed codes); copy_model=True (the default) exports a deep copy, so `model` stays usable
    and can be exported again. copy_model=False exports the model itself: once, and the model is spent after it.
    The checkpoint is TensorRT-LLM's input (vLLM's quantization="modelopt" for FP8), on a GPU; transformers cannot
    load it. tokenizer: saved beside it (engines need one).
    """
    if not is_quantized(model):
        raise ValueError("no Model Optimizer quantizers in this model: call nvmodelopt.quantize(model, name, "
                         "calibration) before export")
    _mtq()
    from modelopt.torch.export import export_hf_checkpoint

    if not getattr(model.config, "architectures", None):  # engines pick the model class from it
        model.config.architectures = [type(model).__name__]
    with staged(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():  # ModelOpt's own torch.tensor(tensor) in its FP8 path
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            export_hf_checkpoint(copy.deepcopy(model) if copy_model else model, export_dir=tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


# ----------------------------------------------------------------------------- reader (no ModelOpt: files only)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, one file or shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
    return tensors


def unpack_modelopt_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's INT4 weight (out / 2, in) uint8 -> signed codes (out, in) int8 in [-8, 7].

    Byte [r, c] holds output rows 2r (low nibble) and 2r + 1 (high nibble) of column c, two's complement."""
    b = packed.to(torch.int16)  # (out/2, in)
    nibbles = torch.stack([b & 0xF, (b >> 4) & 0xF], dim=1)  # (out/2, 2, in): low nibble first
    codes = nibbles.reshape(-1, packed.shape[-1])  # (out, in)
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


def _dequantize(algo: str, tensors: dict, m: str, group_size: int | None) -> torch.Tensor:
    """One quantized Linear's float32 weight (out, in) from <m>.weight and its scales."""
    w, scale = tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"].float()
    if algo == "FP8":  # float8_e4m3fn codes, one scale per tensor (or per row)
        return w.float() * (scale if scale.dim() == 0 else scale.view(-1, 1))
    if algo == "W8A8_SQ_PER_CHANNEL":  # int8 codes, one scale per output row
        return w.float() * scale.view(-1, 1)
    codes = unpack_modelopt_int4(w).float()  # (out, in)
    per_group = codes.shape[1] // scale.shape[1]  # scale (out, in / group)
    if group_size is not None and per_group != group_size:
        raise ValueError(f"{m}: weight_scale {tuple(scale.shape)} means groups of {per_group}, "
                         f"hf_quant_config.json says group_size {group_size}")
    weight = codes * scale.repeat_interleave(per_group, dim=1)  # (out, in): each column its group's scale
    if algo == "W4A8_AWQ":  # the second stage: FP8 with one scale per tensor, as the W4A8 kernel multiplies
        s2 = tensors[f"{m}.weight_scale_2"].float()
        weight = (weight / s2).to(torch.float8_e4m3fn).float() * s2
    return weight


def read_export(path) -> dict:
    """Read a ModelOpt HF export with safetensors and json alone (no ModelOpt import) ->
    {"quant_config": hf_quant_config.json, "config": config.json, "weights": {Linear: float32 (out, in)},
     "pre_quant_scale": {Linear: (in,)}, "input_scale": {Linear: () float32}}.

        back = read_export("out/smollm2-int4-awq"); back["weights"]["model.layers.0.mlp.down_proj"]  # (576, 1536)

    "weights" holds each quantized Linear as stored: codes times scales, in the smoothed space where a
    pre_quant_scale applies (the engine multiplies the input by it; for AWQ's q/k/v and gate/up it is folded into
    the RMSNorm weight instead). Compare with fake_quantized_weights(model, as_exported=True). Reads quant_algo
    FP8, W8A8_SQ_PER_CHANNEL, W4A16_AWQ, W4A8_AWQ.
    """
    path = Path(path)
    qfile = path / "hf_quant_config.json"
    if not qfile.exists():
        raise FileNotFoundError(f"{qfile} not found: is {path} a Model Optimizer export (nvmodelopt.export)?")
    quant_config = json.loads(qfile.read_text())
    algo = quant_config.get("quantization", {}).get("quant_algo")
    if algo not in READABLE:
        raise ValueError(f"{path}: quant_algo {algo!r} is not one read_export rebuilds; it reads {list(READABLE)}")
    group_size = quant_config["quantization"].get("group_size")
    tensors = _load_tensors(path)
    linears = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    config_file = path / "config.json"
    return {
        "quant_config": quant_config,
        "config": json.loads(config_file.read_text()) if config_file.exists() else None,
        "weights": {m: _dequantize(algo, tensors, m, group_size) for m in linears},
        "pre_quant_scale": {m: tensors[f"{m}.pre_quant_scale"].float() for m in linears
                            if f"{m}.pre_quant_scale" in tensors},
        "input_scale": {m: tensors[f"{m}.input_scale"].float() for m in linears if f"{m}.input_scale" in tensors},
    }
