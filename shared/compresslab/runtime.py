"""One setup call at the top of every lab: seeds, device, quick mode, plot style, Triton on CPU.

    import compresslab as cl
    env = cl.setup(quick=QUICK)          # -> Env(device='cpu', tier='cpu', quick=True, ...)
    env.sizes.ppl_windows                # how much work each heavy cell does on this machine

Device-aware defaults live here so that every lab sizes its loops the same way (used by every lab).
"""

from __future__ import annotations

import os
import platform
import logging
import random
from dataclasses import dataclass, field

import sys

import numpy as np
import torch

# ----------------------------------------------------------------------------- Triton on a CPU: the one switch

# Triton decides when triton.language is first imported whether kernels are compiled or interpreted, and transformers
# or torch may import it early; so the package sets TRITON_INTERPRET here, when `import compresslab` first imports
# this module, before anything else. TRITON_PRELOADED records that it came too late (compresslab.kernels then
# refuses, saying why). No other module of the package sets the variable.
TRITON_PRELOADED = "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("0", "")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ----------------------------------------------------------------------------- sizes per tier


@dataclass(frozen=True)
class Sizes:
    """How much work the heavy cells do. Quick mode is for CI and laptops; full mode for GPUs."""

    ppl_windows: int  # WikiText-2 test windows for perplexity
    seq_len: int  # tokens per window
    probe_n: int  # arithmetic-probe questions
    calib_samples: int  # calibration sequences (GPTQ, Wanda, ...)
    calib_len: int  # tokens per calibration sequence
    gsm8k_n: int  # GSM8K questions (GPU only)


# Quick mode is the same everywhere (so CI numbers are reproducible); full mode grows with the device. Quick mode's
# probe is two batches of 16 questions (+-9 points of sampling error): enough to exercise the code, not to rank methods.
# Full-mode perplexity is the same 16 x 512 windows everywhere, so every machine compares with the labs' figures.
QUICK_SIZES = Sizes(ppl_windows=4, seq_len=256, probe_n=32, calib_samples=8, calib_len=256, gsm8k_n=0)
FULL_SIZES = {
    "cpu": Sizes(ppl_windows=16, seq_len=512, probe_n=100, calib_samples=32, calib_len=512, gsm8k_n=0),
    "t4": Sizes(ppl_windows=16, seq_len=512, probe_n=200, calib_samples=128, calib_len=512, gsm8k_n=100),
    "a100+": Sizes(ppl_windows=16, seq_len=512, probe_n=500, calib_samples=128, calib_len=512, gsm8k_n=250),
}


@dataclass(frozen=True)
class LabInfo:
    """What a lab costs and which of its parts need a GPU (printed by setup(lab=...) before the heavy cells)."""

    quick: str  # quick mode end to end on a 2-core CPU without a GPU, as make test runs it (one torch thread, two
    # notebooks at a time; tests/test_notebooks.py prints the wall times): measured; a range where two CPUs differed
    full_cpu: str | None  # full mode on the same CPU (measured), None if not measured
    gpu_parts: tuple[tuple[str, tuple[int, int]], ...] = ()  # (what, minimum compute capability)


LABS = {
    "01": LabInfo("~2.7-3.2 min", "7 min (2 threads)"),
    "02": LabInfo("~5.4 min (2.7 min alone with 2 threads)",
                  "75 min (2 threads; 19 GPTQ passes of ~1.5-5 min, each evaluated in ~2 min, 2 scale-tuning runs of ~8.5 min)",
                  (("timing the Triton W4A16 GEMV against cuBLAS (section 10)", (7, 0)),)),
    "03": LabInfo("~7 min (2.9 min alone with 2 threads)",
                  "29 min (2 threads; Model Optimizer's two AWQ calibrations ~4.5 min each)",
                  (("FP8 / INT4-AWQ checkpoints on TensorRT-LLM, NVFP4 through Model Optimizer", (8, 9)),
                   ("GSM8K for the formats (a >= 0.5B instruct model)", (7, 0)))),
    "04": LabInfo("~2.7 min", "40 min (2 threads; 23 pruning passes and 2 recovery runs of ~8 min)",
                  (("2:4 sparse tensor-core speed", (8, 0)),)),
    "05": LabInfo("~3.0-3.2 min", "48 min (1 thread; five students of 48 steps, 6.5-10.5 min each)"),
    "06": LabInfo("~1-2 min", "5.6 min (2 threads)", (("GSM8K through the compressed cache (a >= 0.5B instruct model)", (7, 0)),)),
    "07": LabInfo("~2.3-3.8 min (~1-3 min of it the vLLM section)",
                  "15.5 min (2 threads; the vLLM sweep, 32 requests at concurrency 1-64, ~4 min per checkpoint)",
                  (("TensorRT-LLM (NGC container)", (8, 0)),
                                       ("lab 02's checkpoint on the Triton W4A16 kernel", (8, 0)))),
    "08": LabInfo("~2.7-2.9 min", "31-33 min (8 recipes: 5 GPTQ-sized passes, 48 KD steps)", (("GSM8K for the capstone's variants (a >= 0.5B instruct model)", (7, 0)),)),
}


@dataclass
class Env:
    device: str  # "cuda" or "cpu"
    tier: str  # "cpu", "t4" (any pre-Ampere GPU) or "a100+" (sm80 and newer)
    quick: bool
    seed: int
    sizes: Sizes
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)
    lab: str | None = None

    def __str__(self) -> str:
        hw = f"{self.gpu_name} (sm{self.capability[0]}{self.capability[1]})" if self.gpu_name else platform.processor() or "CPU"
        mode = "QUICK" if self.quick else "FULL"
        lines = [f"compresslab: device={self.device} [{hw}], tier={self.tier}, mode={mode}, seed={self.seed}",
                 f"  sizes: {self.sizes}"]
        lines += [f"  note: {n}" for n in self.notes]
        info = LABS.get(self.lab)
        if info:
            full = f"full mode {info.full_cpu}" if info.full_cpu else "full mode not timed there"
            lines.append(f"  lab {self.lab} on a 2-core CPU (measured): quick mode {info.quick}, {full}; a GPU is faster")
            for what, need in info.gpu_parts:
                runs = self.capability is not None and self.capability >= need
                lines.append(f"  {'runs here' if runs else 'skipped here'}: {what}"
                             + ("" if runs else f" (needs a GPU with sm{need[0]}{need[1]}+)"))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- device


def device_tier() -> tuple[str, str, str | None, tuple[int, int] | None]:
    """-> (device, tier, gpu_name, capability). Tier 'a100+' means compute capability >= 8.0."""
    if not torch.cuda.is_available():
        return "cpu", "cpu", None, None
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    return "cuda", ("a100+" if cap >= (8, 0) else "t4"), name, cap


def require_cuda(what: str, min_capability: tuple[int, int] = (7, 0)) -> None:
    """Raise a clear error when `what` needs a GPU this machine does not have."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} needs an NVIDIA GPU, and none is visible (torch.cuda.is_available() is False). "
            "Run this cell on a GPU node or on Colab (Runtime > Change runtime type > T4 GPU), "
            "or use device='cpu'."
        )
    cap = torch.cuda.get_device_capability()
    if cap < min_capability:
        raise RuntimeError(
            f"{what} needs compute capability >= {min_capability[0]}.{min_capability[1]}, "
            f"this GPU ({torch.cuda.get_device_name()}) is {cap[0]}.{cap[1]}. Use an A100/H100 (sm80+)."
        )


def resolve_device(device: str | None) -> str:
    """'auto'/None -> cuda if present else cpu; 'cuda' without a GPU -> clear error."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        require_cuda(f"device={device!r}")
    elif device != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return str(device)


# ----------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def setup(quick: bool | None = None, seed: int = 0, threads: int | None = None, lab: str | None = None) -> Env:
    """Seed everything, pick the device, size the work, style the plots. Call once per notebook.

    quick=None: the environment variable COMPRESSLAB_QUICK when it is set (tests set it), else automatic — quick on
    a CPU, full on a CUDA GPU — and the printout says which and why. An explicit True/False always wins.
    COMPRESSLAB_SIZES=quick|cpu|t4|a100+ sizes the work as that tier does, whatever the mode and device: a dry run of
    full mode's cells at quick sizes (tools/check_full_mode.py) takes minutes instead of hours.
    lab="08": printing the Env also says the lab's measured runtime and which of its GPU parts run here.
    """
    if lab is not None and lab not in LABS:
        raise ValueError(f"lab must be one of {sorted(LABS)}, got {lab!r}")
    why = None
    if quick is None and os.environ.get("COMPRESSLAB_QUICK", "").strip():
        quick = os.environ["COMPRESSLAB_QUICK"].strip().lower() in ("1", "true", "yes")
        why = f"COMPRESSLAB_QUICK={os.environ['COMPRESSLAB_QUICK'].strip()}"
    seed_everything(seed)
    # bitsandbytes' int8 path logs on every matmul that it casts fp32 inputs to fp16 (lab 01 says so once)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    device, tier, gpu_name, cap = device_tier()
    notes = []
    if quick is None:  # automatic: a laptop's "Run all" must never start hours of full mode
        quick = device == "cpu"
        why = ("automatic: quick on a CPU (full mode runs the slot's long loops: set QUICK = False to force it)"
               if quick else "automatic: full mode on a CUDA GPU (set QUICK = True for the short version)")
    notes.append(f"mode {'QUICK' if quick else 'FULL'} — " + (why or "set by the notebook's QUICK parameter"))
    if device == "cpu":  # Triton kernels run through the interpreter here (TRITON_INTERPRET, set at import)
        if threads:
            torch.set_num_threads(threads)
        notes.append("no GPU: quantization kernels run in PyTorch / the Triton interpreter; "
                     "bitsandbytes runs its CPU backend")
    elif tier == "t4":
        notes.append("pre-Ampere GPU: TensorRT-LLM and 2:4 sparse kernels are unavailable (need sm80+)")
    sizes = QUICK_SIZES if quick else FULL_SIZES[tier]
    override = os.environ.get("COMPRESSLAB_SIZES", "").strip()
    if override:  # a dry run: this mode's code paths with another tier's sizes (tools/check_full_mode.py)
        table = {"quick": QUICK_SIZES} | FULL_SIZES
        if override not in table:
            raise ValueError(f"COMPRESSLAB_SIZES must be one of {sorted(table)} (or unset), got {override!r}")
        sizes = table[override]
        notes.append(f"COMPRESSLAB_SIZES={override}: {'quick' if quick else 'full'} mode's cells with the "
                     f"{override} sizes (a dry run: its numbers are not this mode's figures)")
    _style_plots()
    return Env(device=device, tier=tier, quick=bool(quick), seed=seed, sizes=sizes,
               gpu_name=gpu_name, capability=cap, notes=notes, lab=lab)


def _style_plots() -> None:
    import matplotlib as mpl

    mpl.rcParams.update({
        "figure.figsize": (7, 3.6), "figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
        "axes.spines.top": False, "axes.spines.right": False, "font.size": 10,
    })
