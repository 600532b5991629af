"""GPTQ checkpoints on disk: the GPTQ "v1"/"v2" layouts (quant_method: gptq) and compressed-tensors (lab 02).

    save_gptq(qmodel, report, "out/smollm2-gptq-4bit", bits=4, group_size=64, sym=False, act_order=True)
    model, tok = load_gptq("out/smollm2-gptq-4bit")        # an independent reader: dequantizes to float
    save_gptq(..., checkpoint_format="gptq_v2")            # zero points without the v1 offset (GPTQModel's own)
    save_compressed_tensors(qmodel, report, "out/smollm2-w4a16", bits=4, group_size=64, sym=False,
                            act_order=True, static_groups=True)   # what llm-compressor writes and vLLM serves

The GPTQ layout is what transformers' GPTQ integration (through GPTQModel + optimum, not in the lab venv) and vLLM
read. tests/test_gptq.py loads it with this package's readers (load_gptq here, kernels.w4a16.load_quantized);
tests/test_checkpoint_engines.py loads the v1/v2 files with GPTQModel and transformers where gptqmodel is installed,
and the compressed-tensors export with transformers + compressed-tensors (asymmetric: dequantize=True) always.
Lab 02's export (asymmetric, desc_act, in_features 576) is the least portable variant: GPTQModel refuses an
asymmetric v1 checkpoint it did not produce (v2 it loads), vLLM's Marlin kernels want sym=True and in_features
divisible by 128, compressed-tensors has no form for desc_act's dynamic groups, and TensorRT-LLM does not read
quant_method "gptq".

Per quantized Linear `<name>`, model.safetensors holds (AutoGPTQ / GPTQModel "v1" layout, int32 words):
    <name>.qweight  (in * bits / 32, out)  int32   codes packed along in_features, lowest bits first
    <name>.qzeros   (n_groups, out * bits / 32) int32   zero points MINUS ONE (the v1 off-by-one), packed along out
    <name>.scales   (n_groups, out)         float16
    <name>.g_idx    (in,)                   int32   group of each input column (act-order makes it non-monotone)
and config.json gains quantization_config = {quant_method: "gptq", bits, group_size, desc_act, sym,
checkpoint_format: "gptq", ...}. A v1 zero of 0 is stored as -1, which wraps to 2^bits - 1 in its field: a reader
must add 1 back *modulo 2^bits* (read a v2 checkpoint as v1, or forget the wrap, and every weight is shifted).
checkpoint_format="gptq_v2" stores the zero points as they are (GPTQModel's internal layout, which it loads for
sym=False without the "produced by gptqmodel >= 0.9.0" check it applies to asymmetric v1 files); the config then says
checkpoint_format (and format) "gptq_v2" and carries meta.quantizer = ["compresslab:<version>"], as GPTQModel writes.

compressed-tensors "pack-quantized" (quant_method: compressed-tensors, what llm-compressor writes for W4A16 and vLLM's
CompressedTensorsWNA16 serves), per quantized Linear `<name>`:
    <name>.weight_packed      (out, ceil(in * bits / 32))  int32   unsigned codes packed densely along in_features,
                                                          element i at bit i*bits of the row (a 3-bit code may
                                                          straddle two words), lowest bits first
    <name>.weight_scale       (out, n_groups)   float: the model's dtype (or save_compressed_tensors(dtype=))
    <name>.weight_zero_point  (ceil(out * bits / 32), n_groups) int32   asymmetric only: zero points packed the same
                                                          way along OUT features (no offset)
    <name>.weight_shape       (2,) int64   [out, in]
compressed-tensors thinks in signed codes q - 2^(bits-1) (and zero points z - 2^(bits-1)); pack_to_int32 adds
2^(bits-1) back before packing, so the packed fields are exactly GPTQ's unsigned codes and zero points. A symmetric
scheme stores no zero point (it is 2^(bits-1) unsigned, 0 signed). The groups must be contiguous (column j in group
j // group_size): compressed-tensors >= 0.19 removed actorder "group" (dynamic act-order groups with weight_g_idx),
so act-order is written only with static groups, as actorder "weight" (what llm-compressor's GPTQ now does).

The writer and the reader share no code on purpose: the round-trip test then checks the format, not one helper twice.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import packing

PACKABLE_BITS = (2, 4, 8)  # bit widths that tile a 32-bit word (3-bit GPTQ packing straddles words)


# ----------------------------------------------------------------------------- writer


@contextmanager
def staged(path):
    """with staged(path) as tmp: fill the empty folder <path>.tmp; on success it replaces path in one step, on an
    error it is removed and path is left as it was (no half-written checkpoint)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 (zero - 1 stored) and v2 (zero stored as is)


def _quantizer_tag() -> str:
    """GPTQModel's meta.quantizer entry, "tool:version" (its loader splits on ':')."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"compresslab:{version('compresslab')}"
    except PackageNotFoundError:
        return "compresslab:0.1.0"


def _architectures(model) -> list[str]:
    """config.architectures, which engines (vLLM, GPTQModel) read to pick the model class."""
    return list(getattr(model.config, "architectures", None) or [type(model).__name__])


def _dense_state(model) -> dict:
    """model.state_dict() with each quantized module (anything with dequantized_weight(), e.g. quant.QuantLinear)
    seen as a Linear: `<module>.weight` (dequantized) and `<module>.bias`, its storage buffers left out. The
    writers take their codes from a report, never from these weights."""
    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "dequantized_weight")}
    state = {}
    for name, p in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized:
            if name.endswith(".bias"):
                state[name] = p
            elif f"{module}.weight" not in state:
                state[f"{module}.weight"] = quantized[module].dequantized_weight()
        else:
            state[name] = p
    return state


def report_of(model) -> dict:
    """{module name: GPTQResult-like record} read from the model's quant.QuantLinear modules: the quantized state
    lives in the model (compresslab.quantize puts it there), and this is what the writers below take."""
    from types import SimpleNamespace

    report = {}
    for name, m in model.named_modules():
        if hasattr(m, "dequantized_weight") and hasattr(m, "codes"):
            g_idx = getattr(m, "g_idx", None)
            g_idx = torch.arange(m.in_features, device=m.scales.device) // m.group_size if g_idx is None else g_idx
            report[name] = SimpleNamespace(codes=m.codes().to(torch.int16), scales=m.scales.float(),
                                           zeros=m.zeros.float(), g_idx=g_idx.long(),
                                           damp_used=getattr(m, "damp_used", 0.0))
    return report


def save_quantized(model, path, *, format: str = "auto", tokenizer=None) -> Path:
    """Write a model quantized by compresslab.quantize (its state in quant.QuantLinear modules, its options in
    model.config.quantization_config) as a real checkpoint; compresslab.quantize makes model.save_pretrained(path)
    call this. format: "compressed-tensors" (pack-quantized, what vLLM serves), "gptq" (gptq_v2, what GPTQModel
    loads) or "auto": compressed-tensors unless act-order with dynamic groups needs GPTQ's g_idx."""
    qc = getattr(model.config, "quantization_config", None)
    report = report_of(model)
    if not report or not isinstance(qc, dict) or qc.get("quant_method") != "compresslab":
        raise ValueError("this model holds no compresslab-quantized Linear: quantize it first with "
                         "compresslab.quantize(model, RTNConfig(...) or GPTQConfig(...))")
    dynamic = any(not torch.equal(r.g_idx.cpu(), torch.arange(r.g_idx.numel()) // qc["group_size"])
                  for r in report.values())
    if format not in ("auto", "compressed-tensors", "gptq"):
        raise ValueError(f"format must be 'auto', 'compressed-tensors' or 'gptq', got {format!r}")
    if format == "auto":
        format = "gptq" if dynamic else "compressed-tensors"
    if format == "gptq":
        return save_gptq(model, report, path, qc["bits"], qc["group_size"], qc["sym"], qc["act_order"],
                         static_groups=not dynamic, tokenizer=tokenizer, checkpoint_format="gptq_v2")
    return save_compressed_tensors(model, report, path, qc["bits"], qc["group_size"], qc["sym"], qc["act_order"],
                                   static_groups=not dynamic, tokenizer=tokenizer)


def save_gptq(model, report: dict, path, bits: int, group_size: int, sym: bool, act_order: bool,
              static_groups: bool = False, tokenizer=None, checkpoint_format: str = "gptq") -> Path:
    """Write `model` (already GPTQ-quantized; `report` from gptq.quantize_model) as a GPTQ checkpoint. act_order is
    written as the format's `desc_act` (GPTQModel's name for it); it must agree with the report's g_idx.

    checkpoint_format: "gptq" (v1: zero points stored minus one, what AutoGPTQ wrote and most engines read) or
    "gptq_v2" (zero points as they are: GPTQModel loads an asymmetric v2 file, it refuses an asymmetric v1 file that
    it did not produce)."""
    from safetensors.torch import save_file

    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if bits not in PACKABLE_BITS:
        raise ValueError(f"export packs {PACKABLE_BITS}-bit codes into int32 words; {bits}-bit needs the "
                         "straddling 3-bit layout, which this exporter does not write. Quantize with bits=4.")
    permuted = [n for n, r in report.items()
                if not torch.equal(r.g_idx.cpu().long(), torch.arange(r.g_idx.numel()) // group_size)]
    if permuted and not act_order:  # the config's desc_act would contradict the g_idx written beside it
        raise ValueError(f"{permuted[0]}'s g_idx is in act-order (dynamic groups): pass act_order=True, or better "
                         "model.save_pretrained(path, format='gptq') after cl.quantize, which knows it")
    with staged(path) as tmp:
        tensors = {}
        for name, p in _dense_state(model).items():
            module = name.rsplit(".", 1)[0]
            if module in report and name.endswith(".weight"):
                res = report[module]
                out_f, in_f = res.codes.shape
                if in_f % (32 // bits) or out_f % (32 // bits):
                    raise ValueError(f"{module}: in/out features ({in_f}, {out_f}) must be multiples of {32 // bits}")
                tensors[f"{module}.qweight"] = packing.pack(res.codes.t(), bits, dim=0, word=torch.int32)  # (in*bits/32, out)
                offset = 1 if checkpoint_format == "gptq" else 0
                stored_zeros = (res.zeros.t().to(torch.int64) - offset) & (2**bits - 1)  # v1: zero - 1, wrapped
                tensors[f"{module}.qzeros"] = packing.pack(stored_zeros, bits, dim=1, word=torch.int32)
                tensors[f"{module}.scales"] = res.scales.t().contiguous().half()  # (n_groups, out)
                tensors[f"{module}.g_idx"] = res.g_idx.to(torch.int32)
            elif not (name == "lm_head.weight" and model.config.tie_word_embeddings):  # a tied head is stored once
                tensors[name] = p.detach().contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["architectures"] = _architectures(model)
        damp = min(r.damp_used for r in report.values())
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
            "static_groups": static_groups, "true_sequential": True, "checkpoint_format": checkpoint_format,
            "damp_percent": damp,
            "modules_in_block_to_quantize": None,
        }
        if checkpoint_format == "gptq_v2":  # GPTQModel's fields: it reads `format` first, `checkpoint_format` as legacy
            config["quantization_config"].update({
                "format": "gptq_v2", "pack_dtype": "int32",
                "meta": {"quantizer": [_quantizer_tag()], "damp_percent": damp, "static_groups": static_groups,
                         "true_sequential": True},
            })
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


# ----------------------------------------------------------------------------- compressed-tensors writer

CT_FORMAT = "pack-quantized"
CT_VERSION = "0.20.1"  # the compressed-tensors release this layout was checked against (shared/pyproject.toml)


def _pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (rows, cols) ints in [0, 2^bits) -> (rows, ceil(cols * bits / 32)) int32: compressed-tensors' dense
    packing along cols. Element i of a row occupies bits [i*bits, (i+1)*bits) of the row's bit stream, word k holding
    bits [32k, 32k+32), lowest first; a code that crosses a word boundary is split over two words (3-bit)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"compressed-tensors packs 1..8-bit codes, got {bits}")
    rows, cols = codes.shape
    n_words = (cols * bits + 31) // 32
    c = codes.to(torch.int64)
    start = torch.arange(cols, dtype=torch.int64, device=codes.device) * bits
    word, off = start // 32, start % 32
    words = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=codes.device)  # one spare word for spills
    words.scatter_add_(1, word.expand(rows, -1), (c << off) & 0xFFFFFFFF)  # the bits that fit in word `word`
    spill = off + bits > 32
    if spill.any():
        words.scatter_add_(1, (word[spill] + 1).expand(rows, -1), c[:, spill] >> (32 - off[spill]))
    words = words[:, :n_words]
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # reinterpret as signed int32


def _ct_weight_args(bits: int, group_size, sym: bool, act_order: bool) -> dict:
    """The `weights` QuantizationArgs of the scheme, as compressed-tensors serialises it (None fields omitted)."""
    args = {"dynamic": False, "num_bits": bits, "symmetric": sym, "type": "int"}
    if group_size in (-1, "channel"):
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=group_size)
    if act_order:
        args["actorder"] = "weight"  # static groups: the order changed calibration, not the stored layout
    return dict(sorted(args.items()))


def compressed_tensors_config(bits: int, group_size, sym: bool, act_order: bool, ignore: list[str],
                              version: str = CT_VERSION) -> dict:
    """config.json's quantization_config for a W{bits}A16 pack-quantized checkpoint, in the shape
    compressed-tensors' ModelCompressor.update_config writes: QuantizationConfig.model_dump() plus quant_method,
    version, and the (empty) sparsity_config and transform_config."""
    return {
        "config_groups": {"group_0": {
            "format": CT_FORMAT, "input_activations": None, "output_activations": None, "targets": ["Linear"],
            "weights": _ct_weight_args(bits, group_size, sym, act_order)}},
        "format": CT_FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }


def save_compressed_tensors(model, report: dict, path, bits: int, group_size, sym: bool, act_order: bool,
                            static_groups: bool, tokenizer=None, dtype=None) -> Path:
    """Write `model` (GPTQ-quantized; `report` from gptq.quantize_model) as a compressed-tensors pack-quantized
    checkpoint, the layout llm-compressor writes for W4A16 / W4A16_ASYM and vLLM serves. The packed codes, scales
    and zero points are the report's: nothing is re-quantized. Dynamic act-order groups (act_order=True,
    static_groups=False) have no compressed-tensors form since actorder "group" was removed: it raises.
    dtype: the float dtype of the scales and unquantized tensors (default: the model's own). llm-compressor keeps
    the model's dtype (bfloat16 for SmolLM2); GPTQ scales are fp16-exact, so float32/float16 store them exactly and
    bfloat16 rounds them (vLLM downcasts a float32 checkpoint to bfloat16 or float16 when it serves it anyway)."""
    from safetensors.torch import save_file

    if bits not in range(1, 9):
        raise ValueError(f"compressed-tensors packs 1..8-bit integer codes, got bits={bits}")
    if act_order and not static_groups:
        raise ValueError("act_order=True with dynamic groups (static_groups=False) puts non-contiguous columns in a "
                         "group (g_idx); compressed-tensors removed that form (actorder 'group', weight_g_idx) in "
                         "0.19. Quantize with static_groups=True (actorder 'weight'), or export with save_gptq.")
    maxq = 2**bits - 1
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ignore = [n for n in linears if n not in report]  # llm-compressor: every Linear the scheme did not quantize
    with staged(path) as tmp:
        tensors = {}
        for name, p in _dense_state(model).items():
            module = name.rsplit(".", 1)[0]
            if module in report and name.endswith(".weight"):
                res = report[module]
                out_f, in_f = res.codes.shape
                gs = in_f if group_size in (-1, "channel") else group_size
                if in_f % gs or res.scales.shape != (out_f, in_f // gs) or res.zeros.shape != res.scales.shape:
                    raise ValueError(f"{module}: the report's scales {tuple(res.scales.shape)} do not match "
                                     f"group_size={group_size} for a ({out_f}, {in_f}) weight")
                if not torch.equal(res.g_idx.cpu().long(), torch.arange(in_f) // gs):
                    raise ValueError(f"{module}: g_idx is not column // group_size (dynamic act-order groups); "
                                     "compressed-tensors cannot store it. Quantize with static_groups=True.")
                codes, zeros = res.codes.to(torch.int64), res.zeros.to(torch.int64)
                if codes.min() < 0 or codes.max() > maxq or zeros.min() < 0 or zeros.max() > maxq:
                    raise ValueError(f"{module}: codes / zero points outside [0, {maxq}]: not a {bits}-bit report")
                if sym and not (zeros == 2 ** (bits - 1)).all():
                    raise ValueError(f"{module}: sym=True needs every zero point at 2^(bits-1) = {2 ** (bits - 1)} "
                                     "(signed zero point 0); this report is asymmetric: pass sym=False")
                tensors[f"{module}.weight_packed"] = _pack_dense(codes, bits)  # (out, ceil(in*bits/32))
                tensors[f"{module}.weight_scale"] = res.scales.to(dtype or p.dtype).contiguous()  # (out, groups)
                if not sym:  # packed along OUT features: pack the transpose, transpose back
                    tensors[f"{module}.weight_zero_point"] = _pack_dense(zeros.t(), bits).t().contiguous()
                tensors[f"{module}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
            elif not (name == "lm_head.weight" and model.config.tie_word_embeddings):  # a tied head is stored
                p = p.detach()  # once, as model.embed_tokens.weight (llm-compressor's save_pretrained does the same)
                tensors[name] = (p.to(dtype) if dtype is not None and p.is_floating_point() else p).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["architectures"] = _architectures(model)
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        config["quantization_config"] = compressed_tensors_config(bits, group_size, sym, act_order, ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


# ----------------------------------------------------------------------------- reader (independent of the writer)


def _unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> uint codes, each word expanded into 32/bits codes along `axis`, lowest bits first."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    per_word = 32 // bits
    parts = [(u >> (bits * k)) & (2**bits - 1) for k in range(per_word)]
    stacked = np.stack(parts, axis=axis + 1)  # (..., words, per_word, ...)
    shape = list(words.shape)
    shape[axis] *= per_word
    return stacked.reshape(shape)


def read_gptq_layer(tensors: dict, module: str, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Dequantize one Linear from its qweight / qzeros / scales / g_idx -> float32 weight (out, in)."""
    codes = _unpack_words(tensors[f"{module}.qweight"].numpy(), bits, axis=0)  # (in, out)
    zeros = _unpack_words(tensors[f"{module}.qzeros"].numpy(), bits, axis=1)  # (n_groups, out)
    if checkpoint_format == "gptq":  # v1 stores zero - 1
        zeros = (zeros + 1) % (2**bits)
    scales = tensors[f"{module}.scales"].float().numpy()  # (n_groups, out)
    g_idx = tensors[f"{module}.g_idx"].numpy().astype(np.int64)  # (in,)
    w = (codes - zeros[g_idx]) * scales[g_idx]  # (in, out): each column gathers its group's scale and zero
    return torch.from_numpy(w.T.astype(np.float32)).contiguous()


def load_gptq(path, dtype=torch.float32, device="cpu"):
    """Load a GPTQ checkpoint by dequantizing every packed Linear into a plain float model -> (model, tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qcfg = config.quantization_config
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    if qcfg.get("quant_method") != "gptq":
        raise ValueError(f"{path} is not a GPTQ checkpoint (quant_method={qcfg.get('quant_method')!r})")
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()  # v1 when unstated
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{path}: checkpoint_format {fmt!r} is neither 'gptq' (v1) nor 'gptq_v2'")
    del config.quantization_config
    tensors = load_file(str(path / "model.safetensors"))
    state = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            module = key[: -len(".qweight")]
            state[f"{module}.weight"] = read_gptq_layer(tensors, module, qcfg["bits"], fmt)
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = value
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model.to(dtype=dtype, device=device).eval(), tok
