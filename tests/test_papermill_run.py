"""tools/papermill_run.py: papermill without nbclient's Output-widget stand-in (jupyter/nbclient#312)."""

import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

WIDGET_CELL = """\
import ipywidgets as widgets
import matplotlib.pyplot as plt

def show(n):
    plt.plot(range(n))
    plt.show()
    print("drew", n)

out = widgets.interactive_output(show, {"n": widgets.IntSlider(value=3, min=1, max=5)})
out"""


def test_widget_output_is_the_cells_own_and_nothing_waits(tmp_path):
    """An interactive_output cell (what lab 01's quantization explorer is) runs to the end, and what the kernel drew
    into the widget is stored as the cell's output, not in a stand-in widget's state (papermill's own client keeps it
    in the widget, the path that can wait for ever)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("QUICK = None", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(WIDGET_CELL),
                                         nbformat.v4.new_code_cell("print('after', QUICK)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src, out = tmp_path / "widget.ipynb", tmp_path / "executed.ipynb"
    nbformat.write(nb, src)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "papermill_run.py"), str(src), str(out), "-y",
                           '{"QUICK": true}', "--no-progress-bar", "-k", "python3"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    widget = next(c for c in cells if "interactive_output" in c.source)
    kinds = [o.get("output_type") for o in widget.outputs]
    assert any("image/png" in o.get("data", {}) for o in widget.outputs), kinds  # the drawing, as the cell's output
    assert any("drew 3" in o.get("text", "") for o in widget.outputs), kinds
    assert "after True" in "".join(o.get("text", "") for o in cells[-1].outputs)  # parameters injected, then ran on
