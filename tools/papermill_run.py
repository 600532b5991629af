"""papermill's command line, less nbclient's stand-in for the ipywidgets Output widget.

    python tools/papermill_run.py IN.ipynb OUT.ipynb -y '{"QUICK": true}' --cwd solutions -k python3

nbclient (which papermill drives) plays the front end of an Output widget: each output the kernel sends into one, it
sends back to the kernel as a widget update on the shell channel, while the same client is waiting on that channel
for the cell's reply. Now and then the reply's wake-up is lost and the client waits for ever (jupyter/nbclient#312,
open). Here lab 01's solution stopped in its `quantization_explorer` cell for the rest of a 90-minute CI run, and
papermill runs of a small notebook with that cell hung once in 126. A participant's JupyterLab is a real front end,
and nbval (the lab runs of tests/test_notebooks.py) has no stand-in, so neither waits. Without the stand-in, what the
kernel draws inside the widget (the explorer's first histogram) is stored as the cell's own output.
tests/test_notebooks.py and tools/check_full_mode.py run their papermill runs through this file.
"""

from nbclient.client import NotebookClient
from papermill.cli import papermill


def _no_widget_stand_in(self, msg):
    return None  # no object handles the widget's messages: nothing is sent to the kernel during a cell


NotebookClient.on_comm_open_jupyter_widget = _no_widget_stand_in

if __name__ == "__main__":
    papermill()
