#!/usr/bin/env bash
# Create .venv-llmc (beside the lab's .venv): llm-compressor, for the side-by-side GPTQ timing
# (tools/gptq_vs_llmcompressor.py, make gptq-vs-llmc). It pins transformers 5.15-5.17, below the labs' version, so it
# gets its own venv. Idempotent: a stamp records what was installed; redone only when this script changes.
#   tools/llmc_env.sh            (or: make gptq-vs-llmc, which calls it)
# Environment: PYTHON (default python3.11), LLMC_VENV (default .venv-llmc).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${LLMC_VENV:-.venv-llmc}"
STAMP="$VENV/.installed"
PY="$VENV/bin/python"
LLMC_PIN="llmcompressor==0.14.0.1"

want="$(cat "$0" | sha256sum | cut -c1-16)"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "$VENV is up to date ($(basename "$STAMP") $want)"
  exit 0
fi

test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# torch first, pinned (the local CPU wheel; anything else would be a multi-GB CUDA build), then held by a constraint
echo "torch==2.13.0" > "$VENV/constraints.txt"
"$PY" -m pip install -q -c "$VENV/constraints.txt" torch==2.13.0
"$PY" -m pip install -q -c "$VENV/constraints.txt" "$LLMC_PIN"
if "$PY" -m pip show -q torchvision >/dev/null 2>&1 && ! "$PY" -c "import torchvision" 2>/dev/null; then
  "$PY" -m pip uninstall -q -y torchvision  # a CUDA build beside the CPU torch: breaks imports, not needed
fi
"$PY" - <<'PYEOF'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, torch.__version__
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
print(f"llm-compressor env ok: llmcompressor {md.version('llmcompressor')}, torch {torch.__version__}, "
      f"transformers {md.version('transformers')}")
PYEOF
echo "$want" > "$STAMP"
