"""GPU kernels in Triton, each beside the pure-PyTorch reference it is tested against.

    w4a16.py    fused dequantize + matmul for GPTQ 4-bit weights (lab 02's checkpoint layout); QuantLinear
    kv_quant.py fused KIVI group quantize / dequantize of the KV cache (lab 06's format)
    bench.py    `make bench`: time, bandwidth and speedups on a GPU, a JSON of results and a roofline plot

Without a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, numpy underneath): exact, slow, and
how CI tests them. `import compresslab` sets that variable on a machine without CUDA (compresslab.runtime, the one
place), because Triton decides at `@triton.jit` time whether a function is compiled or interpreted. On a GPU the same
code is compiled.
"""

from __future__ import annotations

import os

import torch

from ..runtime import TRITON_PRELOADED  # recorded before TRITON_INTERPRET was set

if not torch.cuda.is_available():
    if TRITON_PRELOADED:  # its builtins (tl.zeros, tl.sum...) were already bound for compiling: kernels would fail
        raise ImportError("triton.language was imported (e.g. by transformers) before TRITON_INTERPRET was set, so "
                          "Triton cannot interpret kernels on this CPU. Import compresslab before transformers and "
                          "triton, or export TRITON_INTERPRET=1 before starting Python.")

try:
    import triton  # noqa: F401
except ImportError as err:  # the CPU torch wheel does not bring Triton; CUDA builds of torch do
    raise ImportError("compresslab.kernels needs Triton. On a CPU machine: pip install 'compresslab[interpret]' "
                      "(or `make env`); on a GPU, Triton comes with the CUDA build of torch.") from err


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors) instead of being compiled."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def validate_device(*tensors: torch.Tensor, who: str) -> torch.device:
    """All tensors on one device; CPU only under the interpreter, CUDA only compiled."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{who}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{who}: got CPU tensors, but Triton is compiling for the GPU (TRITON_INTERPRET is not "
                           "set). Move the tensors to CUDA with .cuda(), or set TRITON_INTERPRET=1 before importing "
                           "compresslab.kernels to run the kernel in the (slow) interpreter.")
    if device.type == "cuda" and interpreting():
        raise RuntimeError(f"{who}: got CUDA tensors while TRITON_INTERPRET=1; unset it to compile the kernel.")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{who}: Triton kernels run on CUDA GPUs (or the CPU interpreter), got {device}")
    return device


from . import kv_quant, w4a16  # noqa: E402
from .kv_quant import dequantize_kv, quantize_kv  # noqa: E402
from .w4a16 import QuantLinear, w4a16_matmul  # noqa: E402

__all__ = ["interpreting", "validate_device", "w4a16", "kv_quant", "w4a16_matmul", "QuantLinear", "quantize_kv",
           "dequantize_kv"]
