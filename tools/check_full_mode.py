"""Dry-run every lab's FULL-mode cells at quick sizes, to check they run before a workshop (or after a change).

`make test` runs the notebooks in quick mode only, and full mode branches in several labs (lab 02's 3-bit table and
tuned variants, lab 04's sweep and recovery, lab 05's fourth student, ...) that take about an hour each on a CPU.
This runs each solution notebook with QUICK=False, COMPRESSLAB_SIZES=quick (quick mode's evaluation and calibration
sizes, see compresslab.runtime.setup) and a few training steps, so every full-mode cell executes in minutes.
Its numbers are not the labs' figures: they go to a throw-away results table.

    python tools/check_full_mode.py                 # every lab, one at a time (~1 h on a 2-core CPU)
    python tools/check_full_mode.py --labs 02 04    # some of them

--measure runs full mode for real instead (full sizes, the notebooks' own loop lengths), keeps each lab's results
table and prints its wall time: the input of the full-mode reference files,

    python tools/check_full_mode.py --measure --labs 03 --keep /tmp/full
    python tools/expected_figures.py full-cpu /tmp/full/03_*/results.jsonl --machine "..."
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import papermill as pm

ROOT = Path(__file__).resolve().parents[1]
# per lab: the parameters that keep full mode's loops short (sizes come from COMPRESSLAB_SIZES=quick)
SHORT = {
    "01": {},
    "02": {"TUNE_STEPS": 3},
    "03": {},
    "04": {"RECOVER_STEPS": 3},
    "05": {"STEPS": 4},
    "06": {"N_WINDOWS": 1, "PREFIX": 192, "SCORED": 64},
    "07": {"NEW_TOKENS": 8, "PPL_TOKENS": 64},
    "08": {"DISTILL_STEPS": 4, "PROBE_N": 16},
}
# Later labs reuse earlier labs' artifacts, as a participant's would: lab 08's GPTQ_DIR is the 4-bit checkpoint that
# lab 02 exported (its EXPORT_DIR). tests/test_notebooks.py uses this too.
USES = {"08": ("02", {"GPTQ_DIR": "EXPORT_DIR"})}


def outputs_text(nb) -> str:
    """Everything a notebook's cells printed (streams and text/plain results), one string."""
    return "\n".join(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells for o in c.get("outputs", []))


def run(lab: str, work: Path, dirs: dict[str, dict[str, str]], threads: int,
        measure: bool = False) -> tuple[float, str]:
    path = next((ROOT / "solutions").glob(f"{lab}_*.ipynb"))
    out_dir = work / path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"QUICK": False} | ({} if measure else SHORT[lab])
    params |= {p: str(out_dir / p.lower()) for p in pm.inspect_notebook(str(path)) if p.endswith("_DIR")}
    if lab in USES and USES[lab][0] in dirs:
        dep, names = USES[lab]
        params |= {p: dirs[dep][q] for p, q in names.items()}
    dirs[lab] = {k: v for k, v in params.items() if k.endswith("_DIR")}
    env = os.environ | {"COMPRESSLAB_SIZES": "quick", "COMPRESSLAB_QUICK": "0",
                        "COMPRESSLAB_RESULTS": str(out_dir / "results.jsonl"),
                        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if measure:
        del env["COMPRESSLAB_SIZES"]
    executed = out_dir / "executed.ipynb"
    start = time.perf_counter()
    # papermill without nbclient's Output-widget stand-in, which now and then waits for ever (tools/papermill_run.py)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "papermill_run.py"), str(path), str(executed), "-y",
                           json.dumps(params),
                           "--cwd", str(ROOT / "solutions"), "--no-progress-bar", "-k", "python3"],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return seconds, f"FAILED (executed copy: {executed})\n{proc.stderr[-3000:]}"
    text = outputs_text(nbformat.read(executed, as_version=4))
    if "mode=FULL" not in text or ("COMPRESSLAB_SIZES=quick" in text) == measure:
        sizes = "full" if measure else "quick"
        return seconds, f"FAILED: the notebook did not run full mode at {sizes} sizes (see its setup cell)"
    if "FAILED" in text or "NOT DONE" in text:
        return seconds, "FAILED: a checker did not pass (solution notebook)"
    return seconds, "ok"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labs", nargs="+", default=sorted(SHORT), choices=sorted(SHORT))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--keep", help="folder for the executed notebooks (default: a temporary folder)")
    p.add_argument("--measure", action="store_true",
                   help="real full mode (full sizes and loops): its results tables are reference figures")
    args = p.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="compresslab-full-mode-"))
    dirs: dict[str, dict[str, str]] = {}
    failed = []
    for lab in sorted(args.labs):
        seconds, verdict = run(lab, work, dirs, args.threads, args.measure)
        sizes = "full sizes" if args.measure else "quick sizes"
        print(f"lab {lab}: full mode at {sizes}, {seconds:.0f} s ({seconds / 60:.1f} min, {args.threads} threads): "
              f"{verdict}", flush=True)
        if verdict != "ok":
            failed.append(lab)
    print(f"executed notebooks: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
