"""compresslab: the helper package of The Art of Compressing LLMs.

One file per concern, arrows pointing down:
    runtime (setup, device)  paths  data  models  quant  formats  gptq  checkpoint  pruning  distill  kvcache  eval
    lowrank  deploy  stack  results  checks  widgets  (kernels: the Triton W4A16 and KV-cache kernels)
Notebooks call these; they never paste them.
"""

import os as _os
import sys as _sys

import torch as _torch

# triton.language already imported without the interpreter (compresslab.kernels then refuses, saying why)
_TRITON_PRELOADED = "triton.language" in _sys.modules and _os.environ.get("TRITON_INTERPRET", "0") in ("0", "")
if not _torch.cuda.is_available():
    # Triton reads this when triton.language is first imported (transformers and torch may import it): set it before
    # anything else, so compresslab.kernels run in the interpreter on CPU whatever the import order after this one
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .runtime import Env, require_cuda, setup  # noqa: E402
from .models import load_model  # noqa: E402
from . import checkpoint, checks, data, eval, formats, gptq, kvcache, quant, results, widgets  # noqa: F401,E402

# The entry points and their configs (compresslab.api), resolved on first use: cl.quantize(model, cl.GPTQConfig())
_API = ("quantize", "prune", "RTNConfig", "GPTQConfig", "AWQConfig", "W8A8Config", "MXConfig",
        "MagnitudeConfig", "WandaConfig", "SparseGPTConfig")


def __getattr__(name: str):
    """cl.quantize, cl.GPTQConfig, ... from compresslab.api, and any submodule (cl.stack, cl.awq) on first use."""
    import importlib

    if name in _API:  # lab 03's configs live in their algorithms' files
        home = {"AWQConfig": ".awq", "W8A8Config": ".actquant", "MXConfig": ".actquant"}.get(name, ".api")
        return getattr(importlib.import_module(home, __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__version__ = "0.1.0"
__all__ = ["Env", "setup", "require_cuda", "load_model",
           "checkpoint", "checks", "data", "eval", "formats", "gptq", "kvcache", "quant", "results",
           "widgets", *_API]
