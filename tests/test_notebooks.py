"""Run every lab and solution notebook end to end in quick mode on CPU (papermill), and read the checkers' verdicts.

* a solution notebook passes every exercise checker;
* a lab notebook (unsolved) runs green and reports every exercise as NOT DONE;
* both record the same metrics in the results table (the lab falls back to the reference implementations, and
  runs are seeded), which is also the determinism check: two CPU runs, the same numbers.
"""

import json
import re
from pathlib import Path

import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py"))
RUNS: dict[tuple[str, str], dict] = {}  # (stem, kind) -> {"text": outputs, "rows": results rows}


def _exercises(source: Path) -> list[str]:
    """Names of the checkers a lab calls, in order (cl.checks.check_xxx)."""
    return re.findall(r"cl\.checks\.(check_\w+)\(", source.read_text())


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _run(source: Path, kind: str, tmp_path_factory, monkeypatch) -> dict:
    key = (source.stem, kind)
    if key not in RUNS:
        folder = {"solution": "solutions", "lab": "labs"}[kind]
        out_dir = tmp_path_factory.mktemp(f"{source.stem}-{kind}")
        monkeypatch.setenv("COMPRESSLAB_RESULTS", str(out_dir / "results.jsonl"))
        path = ROOT / folder / f"{source.stem}.ipynb"
        # every *_DIR parameter (where a lab writes artifacts) points into the temporary folder, not the repo
        params = {"QUICK": True} | {p: str(out_dir / p.lower()) for p in pm.inspect_notebook(str(path))
                                     if p.endswith("_DIR")}
        nb = pm.execute_notebook(str(path), str(out_dir / "executed.ipynb"), parameters=params,
                                 cwd=str(ROOT / folder), progress_bar=False, kernel_name="python3")
        rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
        RUNS[key] = {"text": _outputs_text(nbformat.from_dict(nb)), "rows": rows}
    return RUNS[key]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_solution_passes_every_checker(source, tmp_path_factory, monkeypatch):
    text = _run(source, "solution", tmp_path_factory, monkeypatch)["text"]
    n = len(_exercises(source))
    assert n >= 3
    assert text.count(": PASSED") == n, text[-3000:]
    assert "FAILED" not in text and "NOT DONE" not in text
    assert f"{n}/{n} exercises passed" in text


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_lab_runs_green_with_every_exercise_not_done(source, tmp_path_factory, monkeypatch):
    text = _run(source, "lab", tmp_path_factory, monkeypatch)["text"]
    n = len(_exercises(source))
    assert text.count(": NOT DONE") == n, text[-3000:]
    assert "PASSED" not in text and "FAILED" not in text
    assert f"0/{n} exercises passed" in text


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_lab_and_solution_measure_the_same_numbers(source, tmp_path_factory, monkeypatch):
    solution = _run(source, "solution", tmp_path_factory, monkeypatch)["rows"]
    lab = _run(source, "lab", tmp_path_factory, monkeypatch)["rows"]
    assert solution, "the notebook recorded no results"
    metrics = ("method", "bits", "group_size", "ppl", "probe_acc", "weight_mb")
    assert [[r[k] for k in metrics] for r in lab] == [[r[k] for k in metrics] for r in solution]
