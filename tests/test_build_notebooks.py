"""Tests for tools/build_notebooks.py, on synthetic sources and on the real repo."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_notebooks", REPO_ROOT / "tools" / "build_notebooks.py")
bn = importlib.util.module_from_spec(_spec)
sys.modules["build_notebooks"] = bn
_spec.loader.exec_module(bn)

SOURCE = '''\
# %% [markdown] tags=["slide"]
# # Quantization

# %% tags=["parameters"]
bits = 8

# %% tags=["fragment"]
import math

# %%
def quantize(x, scale):
    ### BEGIN SOLUTION
    q = round(x / scale)
    return max(-128, min(127, q))
    ### END SOLUTION


# %%
### BEGIN SOLUTION
answer_top_level = 42
### END SOLUTION

# %% [markdown] tags=["solution", "subslide"]
# Rounding to nearest minimises the expected error.

# %% [markdown] tags=["instructor"]
# Instructor note: spend 10 minutes here.
'''


def write_source(tmp_path: Path, text: str = SOURCE, name: str = "01_demo.py") -> Path:
    path = tmp_path / "solutions" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def sources(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells]


@pytest.fixture
def built(tmp_path: Path) -> dict[str, nbformat.NotebookNode]:
    return bn.build(write_source(tmp_path))


# --- Lab notebook -------------------------------------------------------------


def test_regions_replaced_with_indented_stub(built):
    lab = "\n".join(sources(built["lab"]))
    assert "def quantize(x, scale):\n    # YOUR CODE HERE\n    raise NotImplementedError()" in lab
    assert "# YOUR CODE HERE\nraise NotImplementedError()" in lab  # top-level region
    for secret in ("round(x / scale)", "max(-128", "answer_top_level", "SOLUTION"):
        assert secret not in lab


def test_markdown_solution_cell_replaced(built):
    answers = [c for c in built["lab"].cells if c.source == bn.ANSWER_PROMPT]
    assert len(answers) == 1
    assert answers[0].cell_type == "markdown"
    assert answers[0].metadata["tags"] == ["subslide"]
    assert "Rounding to nearest" not in "\n".join(sources(built["lab"]))


def test_instructor_cells_only_in_solution(built):
    note = "Instructor note: spend 10 minutes here."
    assert note in sources(built["solution"])
    assert not any(note in s for s in sources(built["lab"]))
    assert not any(note in s for s in sources(built["slides"]))


def test_solution_notebook_keeps_everything(built):
    solution = "\n".join(sources(built["solution"]))
    assert "### BEGIN SOLUTION\n    q = round(x / scale)" in solution
    assert "Rounding to nearest minimises the expected error." in solution


def test_parameters_tag_survives(built):
    for kind in ("solution", "lab"):
        cell = next(c for c in built[kind].cells if c.source == "bits = 8")
        assert cell.metadata == {"tags": ["parameters"]}


# --- Slides notebook ----------------------------------------------------------


def test_slides_contain_only_tagged_cells(built):
    slides = built["slides"].cells
    assert [c.source for c in slides[1:]] == ["# Quantization", "import math"]
    assert [c.metadata["slideshow"] for c in slides[1:]] == [
        {"slide_type": "slide"},
        {"slide_type": "fragment"},
    ]


def test_slides_without_slide_cells_have_banner_only(tmp_path):
    slides = bn.build(write_source(tmp_path, "# %%\nx = 1\n"))["slides"]
    assert len(slides.cells) == 1
    assert slides.cells[0].metadata["tags"] == ["banner"]


# --- Common properties ----------------------------------------------------------


def test_banner(built):
    first = "<!-- generated from solutions/01_demo.py by tools/build_notebooks.py: edit the source, then run make notebooks -->"
    for kind, folder in bn.FOLDERS.items():
        banner = built[kind].cells[0]
        assert banner.cell_type == "markdown"
        assert banner.metadata["tags"] == ["banner"]
        lines = banner.source.split("\n")
        assert lines[0] == first
        if kind == "slides":
            assert len(lines) == 1
            assert banner.metadata["slideshow"] == {"slide_type": "skip"}  # no blank first slide
        else:
            assert "slideshow" not in banner.metadata
            assert lines[1].endswith(f"/github/{bn.REPO}/blob/main/{folder}/01_demo.ipynb)")
            assert "Open In Colab" in lines[1]


def test_no_outputs_and_clean_metadata(built):
    for nb in built.values():
        assert nb.nbformat == 4 and nb.nbformat_minor == 5
        assert set(nb.metadata) == {"kernelspec", "language_info"}
        for index, cell in enumerate(nb.cells):
            assert cell.id == f"c{index:03d}"
            assert set(cell.metadata) <= {"tags", "slideshow"}
            assert cell.metadata.get("tags", ["x"]) != []
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None
        nbformat.validate(nb)


def test_deterministic(tmp_path):
    source = write_source(tmp_path)
    first, second = bn.build(source), bn.build(source)
    for kind in bn.FOLDERS:
        assert bn.render(first[kind]) == bn.render(second[kind])
        assert bn.render(first[kind]).endswith("}\n")


def test_solution_regions(tmp_path):
    regions = bn.solution_regions(write_source(tmp_path))
    assert regions == [
        "    q = round(x / scale)\n    return max(-128, min(127, q))",
        "answer_top_level = 42",
        "Rounding to nearest minimises the expected error.",
    ]


# --- Command line ---------------------------------------------------------------


def test_build_then_check(tmp_path, capsys):
    write_source(tmp_path)
    assert bn.main(["--root", str(tmp_path), "--check"]) == 1  # nothing generated yet
    assert "missing" in capsys.readouterr().out

    assert bn.main(["--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("wrote ") == 4  # three notebooks and the instructor notes
    assert "spend 10 minutes here" in (tmp_path / bn.NOTES).read_text()
    lab = tmp_path / "labs" / "01_demo.ipynb"
    assert json.loads(lab.read_text())["cells"][0]["metadata"]["tags"] == ["banner"]

    assert bn.main(["--root", str(tmp_path)]) == 0  # unchanged: nothing rewritten
    assert capsys.readouterr().out == ""

    assert bn.main(["--root", str(tmp_path), "--check"]) == 0
    assert "notebooks up to date (1 sources)" in capsys.readouterr().out

    lab.write_text(lab.read_text().replace("YOUR CODE HERE", "edited by hand"))
    assert bn.main(["--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "labs/01_demo.ipynb" in out and "make notebooks" in out
    assert "edited by hand" in lab.read_text()  # --check writes nothing

    notes = tmp_path / bn.NOTES
    notes.write_text(notes.read_text() + "edited by hand\n")
    assert bn.main(["--root", str(tmp_path), "--check"]) == 1
    assert "slides/instructor-notes.md (differs)" in capsys.readouterr().out


def test_explicit_sources_leave_the_notes_alone(tmp_path, capsys):
    source = write_source(tmp_path)
    assert bn.main(["--root", str(tmp_path), str(source)]) == 0
    assert capsys.readouterr().out.count("wrote ") == 3
    assert not (tmp_path / bn.NOTES).exists()  # the notes cover every lab: only a full build writes them


# --- Instructor notes ---------------------------------------------------------------


def test_instructor_notes_one_section_per_lab_in_order(tmp_path):
    first = write_source(tmp_path, SOURCE.replace("# # Quantization", "# # Lab 01 · Demo\n#\n# **Time:** about 5"
                                                   " minutes (2 min of exercises). **Hardware:** any CPU."))
    second = write_source(tmp_path, '# %% [markdown]\n# # Lab 02 · No notes\n', name="02_other.py")
    notes = bn.instructor_notes([first, second])
    assert notes.startswith("<!-- generated from the cells tagged `instructor`")
    sections = notes.split("\n## ")[1:]
    assert [section.split("\n")[0] for section in sections] == ["Lab 01 · Demo", "Lab 02 · No notes"]
    assert "Source: `solutions/01_demo.py` · time: about 5 minutes (2 min of exercises)." in sections[0]
    assert "Instructor note: spend 10 minutes here." in sections[0]
    for not_a_note in ("Rounding to nearest", "bits = 8", "Hardware"):
        assert not_a_note not in notes
    assert "no instructor notes in this lab yet" in sections[1]


# --- Validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("# %%\nx = 1\n\n# %%\ndef f():\n    ### BEGIN SOLUTION\n    return 1\n", 6, "without"),
        ("# %%\nx = 1\n### END SOLUTION\n", 3, "without a matching"),
        ("# %%\n### BEGIN SOLUTION\na = 1\n### BEGIN SOLUTION\n### END SOLUTION\n", 4, "inside the region"),
        ("# %%\nx = 1\n\n# %% [markdown]\n# Text\n# ### BEGIN SOLUTION\n", 6, "markdown cell"),
        ('# %%\nx = 1\n\n# %% tags=["solution"]\ny = 2\n', 4, "code cell"),
        ('# %% [markdown] tags=["instructor", "slide"]\n# Note\n', 1, "instructor"),
        # a region cannot span two cells: BEGIN is unclosed in its own cell
        ("# %%\n### BEGIN SOLUTION\na = 1\n\n# %%\n### END SOLUTION\n", 2, "without"),
    ],
    ids=["unclosed", "stray-end", "nested", "markdown", "solution-tag-on-code", "instructor-slide", "cross-cell"],
)
def test_validation_errors(tmp_path, text, line, words):
    source = write_source(tmp_path, text)
    with pytest.raises(bn.BuildError) as error:
        bn.build(source)
    assert f"{source}:{line}:" in str(error.value)
    assert words in str(error.value)


def test_line_numbers_with_header_and_preamble(tmp_path):
    text = "# ---\n# jupyter:\n#   jupytext:\n#     formats: py:percent\n# ---\n\nimport os\n\n# %%\nx = 1\n### END SOLUTION\n"
    source = write_source(tmp_path, text)
    with pytest.raises(bn.BuildError, match=rf"{source}:11:"):
        bn.build(source)


def test_unreadable_header_is_a_build_error(tmp_path):
    source = write_source(tmp_path, "# ---\n# jupyter:\n#   kernelspec:\n#     name: python3\n# ---\n\n# %%\nx = 1\n")
    with pytest.raises(bn.BuildError, match=rf"{source}:1:"):
        bn.build(source)


def test_cli_reports_build_error(tmp_path, capsys):
    write_source(tmp_path, "# %%\n### END SOLUTION\n")
    assert bn.main(["--root", str(tmp_path)]) == 2
    assert "01_demo.py:2:" in capsys.readouterr().err


# --- The real repository ------------------------------------------------------------


def test_repo_notebooks_in_sync_and_labs_leak_nothing():
    real_sources = sorted((REPO_ROOT / "solutions").glob(bn.SOURCE_GLOB))
    if not real_sources:
        pytest.skip("no solutions/NN_*.py sources yet")
    notes = REPO_ROOT / bn.NOTES
    assert notes.exists(), f"{notes} missing: run make notebooks"
    assert notes.read_text(encoding="utf-8") == bn.instructor_notes(real_sources), f"{notes} is stale: run make notebooks"
    for source in real_sources:
        built = bn.build(source)
        for kind, path in bn.outputs_for(source, REPO_ROOT).items():
            assert path.exists(), f"{path} missing: run make notebooks"
            assert path.read_text(encoding="utf-8") == bn.render(built[kind]), f"{path} is stale: run make notebooks"
        lab_text = "\n".join(cell.source for cell in built["lab"].cells)
        for region in bn.solution_regions(source):
            for line in region.splitlines():
                line = line.strip()
                if len(line) >= 8:
                    assert line not in lab_text, f"{source.name}: solution line leaks into lab: {line!r}"
