#!/usr/bin/env bash
# Create .venv-gptq (beside the lab's .venv): GPTQModel + optimum, the third-party loaders of lab 02's GPTQ exports
# (tests/test_checkpoint_engines.py -k "gptqmodel or transformers_gptq"). GPTQModel 7.3.6 cannot live in the lab venv:
# it pins numpy==2.2.6 (the labs pin 2.4.6) and pulls torchao, maturin, pypcre and more. Idempotent: a stamp file
# records what was installed; it is redone only when this script changes.
#   tools/gptq_env.sh            (or: make check-gptq, which calls it)
# Environment: PYTHON (default python3.11), GPTQ_VENV (default .venv-gptq).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${GPTQ_VENV:-.venv-gptq}"
STAMP="$VENV/.installed"
PY="$VENV/bin/python"
# exact pins: GPTQModel and optimum, then the lab venv's versions (shared/pyproject.toml) of what compresslab and the
# tests import; numpy is GPTQModel's own pin; requests is imported by GPTQModel 7.3.6 but not declared by it
REQS=(
  gptqmodel==7.3.6 optimum==2.3.0 torchao==0.18.0 numpy==2.2.6 requests==2.34.2
  transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0 accelerate==1.15.0
  compressed-tensors==0.20.1 loguru==0.7.3 gguf==0.19.0 sentencepiece==0.2.3
  tqdm==4.70.1 platformdirs==4.14.5 psutil==7.2.2 matplotlib==3.11.2 pytest==9.2.0
)

want="$(cat "$0" | sha256sum | cut -c1-16)"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "$VENV is up to date ($(basename "$STAMP") $want)"
  exit 0
fi

test -x "$PY" || "$PYTHON" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"  # keeps git status clean whatever the repo's .gitignore says (Python >= 3.13 does this)
"$PY" -m pip install -q --upgrade pip
# 1. torch first, pinned (the local CPU wheel; anything else would be a multi-GB CUDA build), then held by a constraint
echo "torch==2.13.0" > "$VENV/constraints.txt"
"$PY" -m pip install -q -c "$VENV/constraints.txt" torch==2.13.0
# 2. GPTQModel, optimum, and what compresslab's modules and the tests import
"$PY" -m pip install -q -c "$VENV/constraints.txt" "${REQS[@]}"
# 3. compresslab itself, editable and without its dependencies (its numpy pin would replace GPTQModel's)
"$PY" -m pip install -q --no-deps -e shared
# 4. torchvision: PyPI has only CUDA builds, which fail to import beside the CPU torch ("operator torchvision::nms
#    does not exist"); none is needed for text models, so none is kept
if "$PY" -m pip show -q torchvision >/dev/null 2>&1; then
  "$PY" -m pip uninstall -q -y torchvision
fi
# 5. GPTQModel 7.3.6 imports every model definition at `import gptqmodel`, and InternVL's imports torchvision at the
#    top of its file (for its image preprocessing only). Guard those two imports: `import gptqmodel` then works, and
#    only InternVL's image preprocessing (never used here) would need torchvision.
"$PY" - <<'PYEOF'
import importlib.util
import pathlib

# find_spec locates the package without running its __init__ (which is what fails)
f = pathlib.Path(importlib.util.find_spec("gptqmodel").origin).parent / "models/definitions/internvl_chat.py"
src = f.read_text()
old = ("import torchvision.transforms as T\n"
       "from PIL import Image\n"
       "from torchvision.transforms.functional import InterpolationMode\n")
new = ("from PIL import Image\n"
       "try:  # patched by compresslab's tools/gptq_env.sh: no torchvision beside the CPU torch\n"
       "    import torchvision.transforms as T\n"
       "    from torchvision.transforms.functional import InterpolationMode\n"
       "except ImportError:\n"
       "    T = InterpolationMode = None  # InternVL's image preprocessing needs torchvision\n")
if new not in src:
    if old not in src:
        raise SystemExit(f"{f}: the torchvision imports are not where GPTQModel 7.3.6 has them; check the pin")
    f.write_text(src.replace(old, new))
    print(f"patched {f}: its torchvision imports guarded")
PYEOF
# 6. check: torch is still the CPU build, GPTQModel imports, and transformers sees its GPTQ integration
"$PY" - <<'PYEOF'
import importlib.metadata as md
import importlib.util

import torch

assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, \
    f"expected torch 2.13.0+cpu, got {torch.__version__} (cuda {torch.version.cuda})"
assert importlib.util.find_spec("torchvision") is None, "a torchvision is installed: it fails beside the CPU torch"
from gptqmodel import BACKEND, GPTQModel  # noqa: F401
from transformers.utils import is_gptqmodel_available, is_optimum_available

import compresslab.checkpoint  # noqa: F401  (editable: the repo's shared/compresslab)

assert is_gptqmodel_available() and is_optimum_available(), "transformers does not see GPTQModel + optimum"
print(f"gptq env ok: gptqmodel {md.version('gptqmodel')}, optimum {md.version('optimum')}, torch {torch.__version__}, "
      f"transformers {md.version('transformers')}, numpy {md.version('numpy')}")
PYEOF
echo "$want" > "$STAMP"
