"""Write each lab's reference figures for one mode (compresslab/expected/NN_name.<mode>.json) from measured runs.

The input is the results rows (COMPRESSLAB_RESULTS files) of solution runs in that mode; the rows of every lab found
are written, one file per lab. The quick-CPU files come from the test suite's own solution runs:

    pytest tests/test_notebooks.py -k test_solution_passes        # quick mode, papermill, this machine
    python tools/expected_figures.py quick-cpu /tmp/pytest-of-$USER/pytest-current/*-solution0/results.jsonl \\
        --machine "2-core x86-64 CPU sandbox, torch 2.13.0+cpu"

Another CPU's float kernels move the calibrated methods (GPTQ, SparseGPT, static activation scales) by several %:
run the same tests on a second CPU and add its run to the files, each row then holding both CPUs' figures:

    python tools/expected_figures.py quick-cpu <that machine's results.jsonl files> --also \\
        --machine "2-core x86-64 CPU sandbox (Intel Xeon, AVX-512), torch 2.13.0+cpu"

When the code stops measuring a row in a mode (a variant moved to full mode), remove it without losing the other
CPUs' figures of the rows that stay: run the new code on one of the file's machines and pass --retire; the run must
reproduce that machine's figures of every row it still measures (otherwise the code changed them: write a fresh file):

    python tools/expected_figures.py quick-cpu <results.jsonl of the new runs> --retire \\
        --machine "<the machine's name exactly as the file has it>"

A GPU file needs a run on that GPU (`QUICK = False` on the device, mode e.g. full-nvidia-h100-80gb-hbm3, the name
compresslab.expected.mode_of gives). Never edit the files by hand: rerun the runs and this tool.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "shared"))

from compresslab import expected, runtime  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", help="quick-cpu, full-cpu, or <quick|full>-<gpu> as compresslab.expected.mode_of names it")
    parser.add_argument("results", nargs="+", type=Path, help="results.jsonl files of solution runs in that mode")
    parser.add_argument("--machine", required=True, help="the machine the runs were measured on, in words")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--also", action="store_true",
                        help="add the run to the existing files as another machine's (a row's band becomes the range)")
    parser.add_argument("--retire", action="store_true",
                        help="the code no longer measures some rows in this mode: remove them from the files, keeping "
                             "every machine's figures of the rest (the run, on one of the files' machines, must "
                             "reproduce that machine's figures of every row it measures)")
    args = parser.parse_args(argv)
    if args.also and args.retire:
        parser.error("--also and --retire do not go together: retire the rows first, then add another machine's run")
    quick = args.mode.startswith("quick-")
    if not (quick or args.mode.startswith("full-")):
        parser.error(f"mode must start with quick- or full-, got {args.mode!r}")
    stems = {p.stem[:2]: p.stem for p in (ROOT / "solutions").glob("[0-9][0-9]_*.py")}
    by_lab: dict[str, list[dict]] = {}
    for f in args.results:
        for line in f.read_text().splitlines():
            row = json.loads(line)
            if row.get("quick") == quick and row.get("model") == args.model:
                by_lab.setdefault(row["lab"], []).append(row)
    if not by_lab:
        parser.error(f"no {args.mode} rows of {args.model} in {len(args.results)} file(s)")
    today = datetime.date.today().isoformat()
    command = " ".join(["python tools/expected_figures.py", args.mode, "<results of the solution runs>"])
    tier = "cpu" if args.mode.endswith("-cpu") else "a100+"  # the probe's size in this mode (compresslab.runtime)
    probe_n = (runtime.QUICK_SIZES if quick else runtime.FULL_SIZES[tier]).probe_n
    bands = {"probe_acc": ("abs", round(2 / probe_n + 1e-3, 4))}  # two answers of the probe
    for lab, rows in sorted(by_lab.items()):
        if args.retire:
            out, gone = expected.retire_rows(lab, args.mode, rows, model=args.model, machine=args.machine)
            print(f"{out}: removed {', '.join(f'{k[0]!r} ({k[1]}-bit)' for k in gone)}; "
                  f"{len(rows)} rows reproduced on {args.machine}")
            continue
        if args.also:
            out = expected.add_machine(lab, args.mode, rows, model=args.model, machine=args.machine, measured=today)
            print(f"{out}: {len(rows)} rows of {args.machine} added")
            continue
        out = expected.write(stems[lab], args.mode, rows, model=args.model, machine=args.machine, measured=today,
                             command=command, bands=bands)
        print(f"{out}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
