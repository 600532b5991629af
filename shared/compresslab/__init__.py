"""compresslab: the helper package of The Art of Compressing LLMs.

One file per concern, arrows pointing down:
    runtime (setup, device)  paths  data  models  quant  formats  gptq  checkpoint  pruning  distill  kvcache  eval
    results  checks  widgets
Notebooks call these; they never paste them.
"""

from .runtime import Env, require_cuda, setup
from .models import load_model
from . import checkpoint, checks, data, eval, formats, gptq, kvcache, quant, results, widgets  # noqa: F401

__version__ = "0.1.0"
__all__ = ["Env", "setup", "require_cuda", "load_model",
           "checkpoint", "checks", "data", "eval", "formats", "gptq", "kvcache", "quant", "results",
           "widgets"]
