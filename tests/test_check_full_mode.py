"""tools/check_full_mode.py (make check-full) stays in step with the notebooks: every lab is covered, and every
parameter it passes to shorten a lab's full mode is one of that notebook's parameters (papermill would otherwise
inject it silently and the full-mode loop would run at its real length)."""

import importlib.util
from pathlib import Path

import papermill as pm

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_full_mode", ROOT / "tools" / "check_full_mode.py")
check_full_mode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_full_mode)


def test_every_lab_is_dry_run():
    labs = {p.stem[:2] for p in (ROOT / "solutions").glob("[0-9][0-9]_*.py")}
    assert set(check_full_mode.SHORT) == labs


def test_shortening_parameters_are_the_notebooks_own():
    for lab, params in check_full_mode.SHORT.items():
        path = next((ROOT / "solutions").glob(f"{lab}_*.ipynb"))
        names = set(pm.inspect_notebook(str(path)))
        assert "QUICK" in names
        assert set(params) <= names, f"{path.name} has no parameter {sorted(set(params) - names)}"
    for lab, (dep, names) in check_full_mode.USES.items():
        assert set(names) <= set(pm.inspect_notebook(str(next((ROOT / "solutions").glob(f"{lab}_*.ipynb")))))
        assert set(names.values()) <= set(pm.inspect_notebook(str(next((ROOT / "solutions").glob(f"{dep}_*.ipynb")))))


def test_papermill_reads_every_parameter_of_every_notebook():
    """papermill skips (with only a log line) a parameter whose comment it cannot parse, e.g. one with an = sign or
    quotes; then `papermill --help-notebook` and Jupyter's parameter lists miss it. Every assignment in each
    parameters cell must be one papermill reads."""
    import ast

    import nbformat

    for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        assert assigned == set(pm.inspect_notebook(str(path))), path.name
