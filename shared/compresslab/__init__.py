"""compresslab: the helper package of The Art of Compressing LLMs.

One file per concern, arrows pointing down:
    runtime (setup, device)  paths  data  models  quant  eval  results  formats  checks  widgets
Notebooks call these; they never paste them.
"""

from .runtime import Env, require_cuda, setup
from .models import load_model
from . import checks, data, eval, formats, quant, results, widgets  # noqa: F401  (cl.eval.perplexity, ...)

__version__ = "0.1.0"
__all__ = ["Env", "setup", "require_cuda", "load_model",
           "checks", "data", "eval", "formats", "quant", "results", "widgets"]
