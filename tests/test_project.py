"""The project's promises outside the package: pins agree, every notebook has its Colab cells, README commands."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "labs").glob("[0-9][0-9]_*.ipynb")) + sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "shared" / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[=<>!~]", r)[0].lower(): r for r in reqs}


def _conda_pip_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return {re.split(r"[=<>!~]", r)[0].lower(): r for r in pip if not r.startswith("-e")}


def test_environment_yml_agrees_with_package_pins():
    package, conda = _pyproject_requirements(), _conda_pip_requirements()
    for name, req in package.items():
        assert name in conda, f"{name} is pinned in shared/pyproject.toml but missing from environment.yml"
        if name == "torch":
            assert SpecifierSet(req[len("torch"):]).contains(conda["torch"].split("==")[1])
        else:
            assert conda[name] == req, f"environment.yml has {conda[name]}, shared/pyproject.toml has {req}"
    extra = set(conda) - set(package)
    assert not extra, f"environment.yml pins packages the package does not: {extra}"


def test_torch_pin_is_the_same_everywhere():
    makefile = (ROOT / "Makefile").read_text()
    assert "TORCH_PIN := torch==2.13.0" in makefile
    assert _conda_pip_requirements()["torch"] == "torch==2.13.0"


def test_pins_are_exact_except_torch():
    for name, req in _pyproject_requirements().items():
        if name != "torch":
            assert "==" in req, f"{req}: pin it exactly (fast-moving APIs break labs)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_has_badge_install_cell_and_parameters(path):
    nb = nbformat.read(path, as_version=4)
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    assert f"{path.parent.name}/{path.name}" in nb.cells[0].source  # the badge opens this very notebook
    assert "colab-install" in nb.cells[1].metadata.get("tags", [])
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert {"MODEL", "QUICK"} <= set(papermill.inspect_notebook(str(path)))  # papermill can parse every line


def test_install_cell_is_a_no_op_outside_colab(tmp_path):
    source = nbformat.read(NOTEBOOKS[0], as_version=4).cells[1].source
    # run it in a fresh interpreter where subprocess.run would fail loudly if it were called
    guard = "import subprocess\ndef _boom(*a, **k): raise SystemExit('install attempted')\nsubprocess.run = _boom\n"
    script = tmp_path / "cell.py"
    script.write_text(guard + source)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # and on Colab it does install: pretend google.colab is imported
    script.write_text(guard + "import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')\n" + source)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert "install attempted" in result.stderr


def test_readme_quick_start_and_lab_list():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
    for lab in sorted((ROOT / "labs").glob("[0-9][0-9]_*.ipynb")):
        assert f"labs/{lab.name}" in readme, f"README does not list {lab.name}"


def test_ci_runs_make_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "COMPRESSLAB_DATA_DIR" in ci


def test_every_lab_prints_its_device_check_with_its_own_runtime():
    """The setup cell of each lab is its device check: what hardware, which GPU-only parts run, expected runtime."""
    import re

    from compresslab import runtime

    for source in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py")):
        number = source.name[:2]
        assert re.search(rf'cl\.setup\([^)]*lab="{number}"', source.read_text()), f"{source.name}: setup(lab=...)"
        assert number in runtime.LABS, f"add lab {number}'s measured runtime to compresslab.runtime.LABS"
    env = runtime.setup(quick=True, lab="04")
    text = str(env)
    assert "lab 04 on a 2-core CPU (measured): quick mode" in text
    assert ("skipped here: 2:4 sparse tensor-core speed" in text) == (env.capability is None or env.capability < (8, 0))
    with pytest.raises(ValueError, match="lab must be one of"):
        runtime.setup(lab="99")


TRAINING_CALLS = re.compile(r"\b(?:finetune_masked|distill)\(\s*\w+,\s*(\w+)"  # (model, ids, ...)
                            r"|\btune_scales\(\s*\w+,\s*\w+,\s*\w+,\s*(\w+)")  # (model, report, teacher, ids)


def test_every_fine_tuning_trains_on_unk_free_windows():
    """Issue 24, item 7: lab 04's recovery fine-tune trained on calibration_batches (WikiText-2 valid with ~11.7k
    <unk> markers) while GPTQ scale tuning and KD used the <unk>-free training_windows. Every training call in the
    labs and tools takes windows that were made by training_windows."""
    found = 0
    for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py")) + sorted((ROOT / "tools").glob("lab*.py")):
        text = path.read_text()
        for name in (a or b for a, b in TRAINING_CALLS.findall(text)):
            found += 1
            made = re.findall(rf"^\s*{name}\s*=\s*(.+)$", text, flags=re.M)
            assert made and all("training_windows(" in m for m in made), f"{path.name}: {name} = {made}"
    assert found >= 5


@pytest.mark.parametrize("source", sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py")), ids=lambda p: p.stem)
def test_exercise_minutes_add_up_in_the_lab_and_the_agenda(source):
    """Issue 26: each exercise states its minutes, and they add up to the exercise time the lab's header and the
    agenda give its slot (lab 01's header once said 45 against 35)."""
    text = source.read_text()
    minutes = [int(m) for m in re.findall(r"^# ### Exercise \d+ — .*?\((\d+) min", text, flags=re.M)]
    assert len(minutes) >= 3, "every lab has at least three exercises with their minutes"
    header = re.search(r"\*\*Time:\*\* about \d+ minutes \((\d+) min of exercises", text)
    assert header and int(header[1]) == sum(minutes), (header and header[0], minutes)
    agenda = (ROOT / "slides" / "agenda.md").read_text()
    row = next(line for line in agenda.splitlines() if f"Lab {source.stem[:2]} ·" in line)
    assert f"({sum(minutes)} min of exercises" in row, row
