"""GPTQ checkpoints on disk, in the "v1" layout (quant_method: gptq) (lab 02).

    save_gptq(qmodel, report, "out/smollm2-gptq-4bit", bits=4, group_size=64, sym=False, desc_act=True)
    model, tok = load_gptq("out/smollm2-gptq-4bit")        # an independent reader: dequantizes to float

This is the layout transformers' GPTQ integration (through GPTQModel + optimum, not installed here) and vLLM read.
The tests load it only with this package's readers (load_gptq here, kernels.w4a16.load_quantized), never with an
engine. Lab 02's export (asymmetric, desc_act, in_features 576) is the least portable variant: GPTQModel refuses
an asymmetric v1 checkpoint it did not produce, vLLM's Marlin kernels want sym=True and in_features divisible by
128, and TensorRT-LLM does not read quant_method "gptq".

Per quantized Linear `<name>`, model.safetensors holds (AutoGPTQ / GPTQModel "v1" layout, int32 words):
    <name>.qweight  (in * bits / 32, out)  int32   codes packed along in_features, lowest bits first
    <name>.qzeros   (n_groups, out * bits / 32) int32   zero points MINUS ONE (the v1 off-by-one), packed along out
    <name>.scales   (n_groups, out)         float16
    <name>.g_idx    (in,)                   int32   group of each input column (act-order makes it non-monotone)
and config.json gains quantization_config = {quant_method: "gptq", bits, group_size, desc_act, sym,
checkpoint_format: "gptq", ...}. A v1 zero of 0 is stored as -1, which wraps to 2^bits - 1 in its field: a reader
must add 1 back *modulo 2^bits* (read a v2 checkpoint as v1, or forget the wrap, and every weight is shifted).

The writer and the reader share no code on purpose: the round-trip test then checks the format, not one helper twice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

PACKABLE_BITS = (2, 4, 8)  # bit widths that tile a 32-bit word (3-bit GPTQ packing straddles words)


# ----------------------------------------------------------------------------- writer


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (rows, cols) ints in [0, 2^bits) -> (rows * bits / 32, cols) int32, packing consecutive rows."""
    per_word = 32 // bits
    rows, cols = codes.shape
    c = codes.to(torch.int64).reshape(rows // per_word, per_word, cols)  # (words, per_word, cols)
    shifts = (torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits).view(1, -1, 1)
    words = (c << shifts).sum(dim=1)  # (words, cols) in [0, 2^32)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # reinterpret as signed int32


def save_gptq(model, report: dict, path, bits: int, group_size: int, sym: bool, desc_act: bool,
              static_groups: bool = False, tokenizer=None) -> Path:
    """Write `model` (already GPTQ-quantized; `report` from gptq.quantize_model) as a v1 GPTQ checkpoint."""
    from safetensors.torch import save_file

    if bits not in PACKABLE_BITS:
        raise ValueError(f"export packs {PACKABLE_BITS}-bit codes into int32 words; {bits}-bit needs the "
                         "straddling 3-bit layout, which this exporter does not write. Quantize with bits=4.")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for name, p in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in report and name.endswith(".weight"):
            res = report[module]
            out_f, in_f = res.codes.shape
            if in_f % (32 // bits) or out_f % (32 // bits):
                raise ValueError(f"{module}: in/out features ({in_f}, {out_f}) must be multiples of {32 // bits}")
            tensors[f"{module}.qweight"] = _pack_rows(res.codes.t().contiguous(), bits)  # (in*bits/32, out)
            stored_zeros = (res.zeros.t().to(torch.int64) - 1) & (2**bits - 1)  # v1: zero - 1, wrapped
            tensors[f"{module}.qzeros"] = _pack_rows(stored_zeros.t().contiguous(), bits).t().contiguous()
            tensors[f"{module}.scales"] = res.scales.t().contiguous().half()  # (n_groups, out)
            tensors[f"{module}.g_idx"] = res.g_idx.to(torch.int32)
        elif not (name == "lm_head.weight" and model.config.tie_word_embeddings):  # a tied head is stored once
            tensors[name] = p.detach().contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "static_groups": static_groups, "true_sequential": True, "checkpoint_format": "gptq",
        "damp_percent": min(r.damp_used for r in report.values()),
        "modules_in_block_to_quantize": None,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


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
    del config.quantization_config
    tensors = load_file(str(path / "model.safetensors"))
    state = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            module = key[: -len(".qweight")]
            state[f"{module}.weight"] = read_gptq_layer(tensors, module, qcfg["bits"], qcfg["checkpoint_format"])
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
