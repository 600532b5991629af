"""compresslab: the helper package of The Art of Compressing LLMs.

One file per concern, arrows pointing down: a module imports only from layers below its own (tests/test_imports.py
holds this table and fails on an upward or sideways import, or a cycle):
    0 bottom   paths  runtime (setup, device, the Triton switch)  packing  kvformat  data
    1 storage  quant  models  checkpoint  evaluation  layerwise (the layer-by-layer calibration harness)
    2 methods  formats  gptq  smoothquant  widgets  deploy  serve  nvmodelopt  kernels (Triton W4A16, KV cache)
    3          pruning  awq  actquant  kvcompress (the KV maths, KIVI and GEAR)  results
    4          distill  lowrank  expected  kvcache (kvcompress inside a transformers Cache)
    5 recipes  api (cl.quantize / cl.prune)  scale_tuning  stack  kernels.bench
    6 labs     checks (the harness, and one module of checkers per lab)
Notebooks call these; they never paste them.
"""

# runtime comes first: importing it sets TRITON_INTERPRET on a machine without CUDA (the package's one switch)
from .runtime import Env, require_cuda, setup
from .models import load_model
# every other module (cl.gptq, cl.checks, cl.kvcache, ...) is imported on first use, by __getattr__ below: importing
# the package costs torch and these two small modules, not transformers and every algorithm

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
           "checkpoint", "checks", "data", "evaluation", "formats", "gptq", "kvcache", "kvcompress", "quant",
           "results", "widgets", *_API]
