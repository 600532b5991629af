"""The llm-compressor half of tools/gptq_vs_llmcompressor.py: runs inside the *llm-compressor* venv, never the lab's.

llm-compressor pins a different transformers than the lab, so it lives in its own virtual environment and this file
must not import compresslab. The parent tool writes a job (JSON) and the tensors it refers to, runs

    <llmc-venv>/bin/python tools/_llmc_gptq_driver.py JOB.json RESULT.json

and reads RESULT.json back. Jobs:
    {"task": "probe"}                           versions and thread count of this venv
    {"task": "baseline", ...}                   perplexity of the unquantized model (checks the metric matches ours)
    {"task": "gptq", ...}                       oneshot(GPTQModifier) timed alone, then perplexity
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from importlib import metadata

import torch
import torch.nn.functional as F

PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets", "accelerate")


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- the metric (= cl.evaluation.perplexity)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 2) -> float:
    """exp(mean next-token NLL) over the given (n, seq_len) windows: line for line what compresslab's
    evaluation.perplexity does with the windows it builds itself (same batch size, float32 logits, summed loss)."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]  # (b, seq_len)
        logits = model(ids).logits.float()  # (b, seq_len, vocab)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        nll, count = nll + loss.item(), count + ids[:, 1:].numel()
    return math.exp(nll / count)


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


# ----------------------------------------------------------------------------- llm-compressor's GPTQ


def make_modifier(job: dict):
    """GPTQModifier for bits-bit integer weights in groups of group_size columns (W4A16 / W4A16_ASYM with the lab's
    group size: SmolLM2's 576 columns are not divisible by the presets' 128), lm_head left in full precision."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=job["bits"], type="int", symmetric=job["sym"], strategy="group",
                               group_size=job["group_size"], dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder=job["actorder"],
                        block_size=job["block_size"], dampening_frac=job["damp"])


def group_actorder_problem() -> str | None:
    """Why this llm-compressor cannot run actorder="group" (dynamic groups), or None if it can (or we can't tell).
    0.14 deprecated it: its GPTQ raises ValueError for anything but "weight"/"static" after calibrating a layer."""
    try:
        from compressed_tensors.quantization import ActivationOrdering
        from llmcompressor.modifiers.gptq.helpers import apply_activation_ordering
    except ImportError:
        return None  # older layout: let the real run decide
    try:
        apply_activation_ordering(torch.zeros(1, 2, 2), torch.eye(2)[None].clone(), ActivationOrdering.GROUP)
    except ValueError as err:
        return str(err)
    return None


def max_distinct_per_group(model, group_size: int) -> int:
    """Largest number of distinct weight values in any (row, group) of any decoder Linear: at most 2**bits if
    oneshot really quantized (its fake-quantized weights replace the originals; groups are contiguous in the
    original column order, with or without actorder="weight")."""
    worst = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            w = m.weight.detach().float()
            g = w.view(w.shape[0], -1, group_size).sort(dim=-1).values  # (out, groups, group_size)
            distinct = 1 + (g.diff(dim=-1) != 0).sum(dim=-1)
            worst = max(worst, int(distinct.max()))
    return worst


def run_gptq(job: dict) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot

    if job["actorder"] == "group":
        problem = group_actorder_problem()
        if problem:
            return {"unsupported": f"actorder='group' is not supported by this llm-compressor: {problem}"}
    calib = torch.load(job["calib"])  # (n, seq_len) int64: the lab's calibration_batches, the same ids
    windows = torch.load(job["windows"])
    n, seq_len = calib.shape

    def dataset(ids):
        return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    if job.get("warmup", 0):  # an untimed oneshot on the first windows, on a copy thrown away: as the parent warms ours
        model, tok = load(job["model_dir"])
        warm = calib[: job["warmup"]]
        oneshot(model=model, tokenizer=tok, dataset=dataset(warm), recipe=make_modifier(job),
                num_calibration_samples=warm.shape[0], max_seq_length=seq_len, shuffle_calibration_samples=False,
                batch_size=job["batch_size"])
        del model
    model, tok = load(job["model_dir"])
    ds = dataset(calib)
    modifier = make_modifier(job)

    t0 = time.perf_counter()  # only oneshot is timed: model load, dataset and perplexity are not
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=modifier, num_calibration_samples=n,
            max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=job["batch_size"])
    seconds = time.perf_counter() - t0

    distinct = max_distinct_per_group(model, job["group_size"])
    if distinct > 2 ** job["bits"]:
        raise RuntimeError(f"oneshot returned weights with {distinct} distinct values in a group: not quantized")
    model.eval()
    return {"seconds": seconds, "ppl": perplexity(model, windows, job["ppl_batch_size"]),
            "max_distinct_per_group": distinct}


def main() -> None:
    job_path, result_path = sys.argv[1:3]
    with open(job_path) as f:
        job = json.load(f)
    torch.set_num_threads(job.get("threads", 1))
    if job["task"] == "probe":
        import llmcompressor  # noqa: F401  (fails here, with its own error, if the venv is broken)
        from llmcompressor import oneshot  # noqa: F401
        from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401

        result = {"versions": versions()}
    elif job["task"] == "baseline":
        model, _ = load(job["model_dir"])
        result = {"ppl": perplexity(model, torch.load(job["windows"]), job["ppl_batch_size"])}
    elif job["task"] == "gptq":
        result = run_gptq(job)
    else:
        raise ValueError(f"unknown task {job['task']!r}")
    result["threads"] = torch.get_num_threads()
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
