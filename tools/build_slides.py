"""Build the workshop's reveal.js decks, fully offline, and check them in a real headless Chromium.

Decks, in the order of the day:

* ``slides/opening.md`` and ``slides/closing.md``: the opening and closing talks, hand-edited markdown (slides
  separated by a line ``---``; a line starting with ``Note:`` starts the slide's speaker notes, key ``S``);
* ``slides/NN_name.ipynb``: one deck per lab, generated from the lab's source by ``tools/build_notebooks.py``.

Each becomes ``OUT/<name>.html`` through nbconvert's slides exporter with the template in
``tools/slides_templates/reveal-offline`` (nbconvert's reveal template minus every CDN asset). reveal.js and MathJax
come from the npm packages pinned in ``slides/package.json`` (``npm ci`` in ``slides/``) and are copied to
``OUT/assets``; ``OUT/index.html`` lists the decks beside the agenda and the instructor notes.

``--check`` then opens every page in headless Chromium with the network blocked (anything but file:// fails),
checks that reveal.js initialised with the expected number of slides and a non-blank title slide, and saves a
screenshot of each title slide to ``OUT/screenshots``.

Usage: ``python tools/build_slides.py [--out DIR] [--check]`` (``make slides`` runs both).
"""
from __future__ import annotations

import argparse
import html
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode
from nbformat.v4 import new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
SLIDES = ROOT / "slides"
NODE_MODULES = SLIDES / "node_modules"
TEMPLATES = Path(__file__).resolve().parent / "slides_templates"
TEMPLATE = "reveal-offline"
OPENING, CLOSING = "opening.md", "closing.md"
LAB_GLOB = "[0-9][0-9]_*.ipynb"
PAGES = {"agenda": "agenda.md", "instructor-notes": "instructor-notes.md"}  # rendered to OUT/<key>.html

# What the decks load, relative to OUT/assets, and where it comes from, relative to slides/node_modules.
REVEAL, MATHJAX = "assets/reveal.js", "assets/mathjax/es5/tex-svg-full.js"
ASSETS = {
    "reveal.js/dist/reveal.css": "reveal.js/dist/reveal.css",
    "reveal.js/dist/reveal.js": "reveal.js/dist/reveal.js",
    "reveal.js/dist/theme/white.css": "reveal.js/dist/theme/white.css",  # its fonts are inlined (data: URLs)
    "reveal.js/dist/plugin/notes.js": "reveal.js/dist/plugin/notes.js",
    "reveal.js/LICENSE": "reveal.js/LICENSE",
    "mathjax/es5/tex-svg-full.js": "mathjax/es5/tex-svg-full.js",  # SVG output: no font files to fetch
    "mathjax/LICENSE": "mathjax/LICENSE",
}
SLIDE_TYPES = ("slide", "subslide")  # each starts a reveal.js slide; a fragment does not
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_FLAGS = [  # with a fresh profile (Playwright makes one per launch) and no background traffic
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
]


class SlidesError(Exception):
    """A deck source breaks the rules, or the npm assets are missing; the message says where."""


@dataclass
class Deck:
    name: str  # the HTML file's stem
    title: str  # the title slide's first heading
    source: Path
    slides: int  # number of reveal.js slides (slide + subslide starts)
    html: Path | None = None


# --- Sources --------------------------------------------------------------------------


def _fences(lines: list[str]) -> list[bool]:
    """For each line, whether it lies inside a ``` code fence (fence lines included)."""
    inside, out = False, []
    for line in lines:
        fence = line.lstrip().startswith("```")
        out.append(inside or fence)
        if fence:
            inside = not inside
    return out


def markdown_deck(path: Path) -> NotebookNode:
    """A talk in markdown -> a slides notebook: one markdown cell per slide, plus a notes cell per 'Note:'."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    in_code = _fences(lines)
    chunks: list[tuple[int, list[str], list[bool]]] = [(1, [], [])]
    for number, (line, code) in enumerate(zip(lines, in_code), 1):
        if line.strip() == "---" and not code:
            chunks.append((number + 1, [], []))
        else:
            chunks[-1][1].append(line)
            chunks[-1][2].append(code)
    cells = []
    for start, chunk, code in chunks:
        split = next((i for i, line in enumerate(chunk) if line.startswith("Note:") and not code[i]), len(chunk))
        body = "\n".join(chunk[:split]).strip()
        if not body:
            raise SlidesError(f"{path}:{start}: empty slide (two '---' lines in a row, or one at the end?)")
        cell = new_markdown_cell(body)
        cell.metadata["slideshow"] = {"slide_type": "slide"}
        cells.append(cell)
        notes = "\n".join([chunk[split][len("Note:"):]] + chunk[split + 1 :]).strip() if split < len(chunk) else ""
        if notes:
            note = new_markdown_cell(notes)
            note.metadata["slideshow"] = {"slide_type": "notes"}
            cells.append(note)
    return new_notebook(cells=cells, metadata={"language_info": {"name": "python"}})


def _slide_type(cell: NotebookNode) -> str:
    return cell.metadata.get("slideshow", {}).get("slide_type", "-")


def count_slides(nb: NotebookNode) -> int:
    """reveal.js slides nbconvert makes: one per slide/subslide cell; the first shown cell always starts one."""
    shown = [cell for cell in nb.cells if _slide_type(cell) not in ("skip", "notes")]
    if not shown:
        return 0
    return 1 + sum(_slide_type(cell) in SLIDE_TYPES for cell in shown[1:])


def deck_title(nb: NotebookNode) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown" and _slide_type(cell) not in ("skip", "notes") and cell.source.strip():
            return cell.source.strip().split("\n")[0].lstrip("#").strip()
    return ""


def deck_sources(slides_dir: Path = SLIDES) -> list[tuple[str, Path]]:
    """(name, source) of every deck in the order of the day: opening, the labs, closing."""
    labs = sorted(Path(slides_dir).glob(LAB_GLOB))
    return [("opening", slides_dir / OPENING), *((p.stem, p) for p in labs), ("closing", slides_dir / CLOSING)]


def load_deck(source: Path) -> NotebookNode:
    source = Path(source)
    if source.suffix == ".md":
        return markdown_deck(source)
    return nbformat.read(source, as_version=4)


# --- Build -----------------------------------------------------------------------------


def _exporter():
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    config = Config()
    config.SlidesExporter.extra_template_basedirs = [str(TEMPLATES)]
    config.SlidesExporter.template_name = TEMPLATE
    config.SlidesExporter.reveal_url_prefix = REVEAL  # default: https://unpkg.com/reveal.js@4.0.2
    config.SlidesExporter.reveal_theme = "white"  # default 'simple' @imports two Google fonts
    config.SlidesExporter.reveal_transition = "fade"
    config.SlidesExporter.reveal_number = "c/t"
    config.SlidesExporter.reveal_width = str(VIEWPORT["width"])
    config.SlidesExporter.reveal_height = str(VIEWPORT["height"])
    config.SlidesExporter.mathjax_url = MATHJAX  # default: MathJax 2.7.7 from cdnjs
    config.SlidesExporter.exclude_input_prompt = True
    config.SlidesExporter.exclude_output_prompt = True
    return SlidesExporter(config=config)


def copy_assets(out: Path, node_modules: Path = NODE_MODULES) -> None:
    missing = [src for src in ASSETS.values() if not (node_modules / src).is_file()]
    if missing:
        raise SlidesError(
            f"{node_modules}: missing {', '.join(missing)}; run `npm ci` in slides/ (make slides does)"
        )
    for dest, src in ASSETS.items():
        target, origin = out / "assets" / dest, node_modules / src
        if target.is_file() and target.stat().st_size == origin.stat().st_size and (
            target.stat().st_mtime >= origin.stat().st_mtime
        ):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target)


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
{head}<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; }}
code {{ background: #f4f4f4; padding: 0 .2rem; }} a {{ color: #1565c0; }} a.anchor-link {{ display: none; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
MATHJAX_HEAD = (
    "<script>window.MathJax = {tex: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], processEscapes: true}};</script>\n"
    f'<script defer src="{MATHJAX}"></script>\n'
)


def _markdown_page(source: Path, title: str) -> str:
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    body = markdown2html_mistune(source.read_text(encoding="utf-8"))
    return PAGE.format(title=html.escape(title), head=MATHJAX_HEAD, body=body)


def _index_page(decks: list[Deck], pages: dict[str, str]) -> str:
    def session(name: str) -> str:
        return {"opening": "opening talk", "closing": "closing talk"}.get(name, f"lab {name[:2]}")

    rows = "\n".join(
        f'<tr><td>{session(d.name)}</td><td><a href="{d.name}.html">{html.escape(d.title)}</a></td>'
        f"<td>{d.slides}</td><td><code>{d.source.parent.name}/{d.source.name}</code></td></tr>"
        for d in decks
    )
    links = " · ".join(f'<a href="{name}.html">{html.escape(title)}</a>' for name, title in pages.items())
    body = (
        "<h1>The Art of Compressing LLMs — slides</h1>\n"
        "<p>Open a deck and press <kbd>F</kbd> for full screen, <kbd>S</kbd> for the speaker view, "
        "<kbd>Esc</kbd> for the overview. Everything here works offline.</p>\n"
        f"<p>{links}</p>\n"
        "<table>\n<tr><th>session</th><th>deck</th><th>slides</th><th>source</th></tr>\n"
        f"{rows}\n</table>\n"
    )
    return PAGE.format(title="The Art of Compressing LLMs — slides", head="", body=body)


def build(out: Path, slides_dir: Path = SLIDES, *, node_modules: Path = NODE_MODULES, assets: bool = True) -> list[Deck]:
    """Write every deck, the index and the markdown pages under out; return the decks in order."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if assets:
        copy_assets(out, node_modules)
    exporter = _exporter()
    decks: list[Deck] = []
    for name, source in deck_sources(slides_dir):
        if not source.is_file():
            raise SlidesError(f"{source}: deck source missing")
        nb = load_deck(source)
        title = deck_title(nb)
        if not title:
            raise SlidesError(f"{source}: the first slide has no title line")
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
        target = out / f"{name}.html"
        target.write_text(body, encoding="utf-8")
        decks.append(Deck(name, title, source, count_slides(nb), target))
    pages = {}
    for name, filename in PAGES.items():
        source = slides_dir / filename
        if source.is_file():
            headings = [line for line in source.read_text(encoding="utf-8").split("\n") if line.startswith("# ")]
            title = headings[0][2:].strip() if headings else filename
            (out / f"{name}.html").write_text(_markdown_page(source, title), encoding="utf-8")
            pages[name] = title
    (out / "index.html").write_text(_index_page(decks, pages), encoding="utf-8")
    return decks


# --- Check in a real browser -------------------------------------------------------


def find_chromium() -> str | None:
    """COMPRESSLAB_CHROMIUM if set (None if that is not an executable), else the first Chromium on PATH."""
    if os.environ.get("COMPRESSLAB_CHROMIUM"):
        return shutil.which(os.environ["COMPRESSLAB_CHROMIUM"])
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """Headless Chromium through Playwright, with every non-file:// request blocked and reported.

    ``with Browser() as browser: problems = browser.check(page, slides=..., title=...)``
    """

    LOCAL = ("file:", "data:", "blob:", "about:")

    def __init__(self, executable: str | None = None, timeout_s: float = 15.0):
        self.executable = executable or find_chromium()
        self.timeout_ms = timeout_s * 1000
        self._playwright = self._browser = None

    def __enter__(self) -> "Browser":
        from playwright.sync_api import sync_playwright

        if not self.executable:
            raise SlidesError("no Chromium found (apt-get install chromium, or set COMPRESSLAB_CHROMIUM)")
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=self.executable, headless=True, args=CHROMIUM_FLAGS
            )
        except Exception:
            self._playwright.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._browser is not None:
            self._browser.close()
        self._playwright.stop()

    def check(self, page_path: Path, *, slides: int | None = None, title: str | None = None,
              screenshot: Path | None = None, info: dict | None = None) -> list[str]:
        """Open one page offline; return what is wrong with it (empty: all good).

        Always: no request may leave file://, none may fail, no console error, no script error. For a deck (slides
        given): reveal.js initialised on the first slide, has that many slides, the title slide shows `title`,
        MathJax typeset without errors; then the title slide is saved to `screenshot`. `info`, if given, receives
        what was seen: slides, formulas (typeset by MathJax), title_text.
        """
        problems: list[str] = []
        context = self._browser.new_context(offline=True, viewport=VIEWPORT)
        external: set[str] = set()

        def route(route) -> None:
            url = route.request.url
            if url.startswith(self.LOCAL):
                route.continue_()
                return
            if url not in external:
                external.add(url)
                problems.append(f"blocked request to the network: {url}")
            route.abort("blockedbyclient")

        def failed(request) -> None:
            if request.url not in external:
                problems.append(f"failed request: {request.url} ({request.failure})")

        def console(message) -> None:
            if message.type == "error":
                problems.append(f"console error: {message.text}")

        context.route("**/*", route)
        page = context.new_page()
        page.on("requestfailed", failed)
        page.on("console", console)
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        try:
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load", timeout=self.timeout_ms)
            if slides is not None:
                problems += self._check_deck(page, slides, title, screenshot, {} if info is None else info)
            else:
                page.wait_for_timeout(100)  # let late requests fail, if any
        except Exception as error:  # a timeout or a crash is a failed check, not a crash of the caller
            problems.append(f"could not check the page: {error}")
        finally:
            context.close()
        return problems

    def _check_deck(self, page, slides: int, title: str | None, screenshot: Path | None, info: dict) -> list[str]:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        problems: list[str] = []
        if not page.evaluate("() => !!window.Reveal && typeof Reveal.isReady === 'function'"):
            return ["reveal.js did not load (no window.Reveal after the page's load event)"]
        try:
            page.wait_for_function("() => window.Reveal && Reveal.isReady && Reveal.isReady()", timeout=5000)
        except PlaywrightTimeout:
            return ["reveal.js did not initialise (Reveal.isReady() never became true)"]
        math = page.evaluate(
            "() => window.MathJax && MathJax.startup && MathJax.startup.promise ? MathJax.startup.promise.then(() =>"
            " [document.querySelectorAll('mjx-container').length, document.querySelectorAll('mjx-merror').length])"
            " : null"
        )
        if math is None:
            problems.append("MathJax did not load")
        elif math[1]:
            problems.append(f"MathJax could not typeset {math[1]} formula(s)")
        info["formulas"] = math[0] if math else 0
        page.evaluate("() => document.fonts.ready.then(() => true)")
        state = page.evaluate(
            "() => ({total: Reveal.getTotalSlides(), indices: Reveal.getIndices(),"
            " text: (Reveal.getCurrentSlide() || {innerText: ''}).innerText})"
        )
        if state["total"] != slides:
            problems.append(f"{state['total']} slides, expected {slides}")
        if (state["indices"]["h"], state["indices"]["v"]) != (0, 0):
            problems.append(f"opened on slide {state['indices']}, not the title slide")
        text = " ".join(state["text"].split())
        info.update(slides=state["total"], title_text=text)
        if not text:
            problems.append("the title slide is blank")
        elif title and " ".join(title.split()).casefold() not in text.casefold():  # themes may upper-case headings
            problems.append(f"the title slide does not show {title!r}: {text[:120]!r}")
        if screenshot is not None:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        return problems


def check(out: Path, decks: list[Deck], browser: Browser | None = None) -> dict[str, list[str]]:
    """Every deck and page under out in the browser, screenshots to out/screenshots; problems by file name."""
    results: dict[str, list[str]] = {}
    own = browser is None
    browser = browser or Browser().__enter__()
    try:
        for deck in decks:
            results[deck.html.name] = browser.check(
                deck.html, slides=deck.slides, title=deck.title, screenshot=out / "screenshots" / f"{deck.name}.png"
            )
        for page in ["index", *PAGES]:
            if (out / f"{page}.html").is_file():
                results[f"{page}.html"] = browser.check(out / f"{page}.html")
    finally:
        if own:
            browser.__exit__(None, None, None)
    return results


# --- Command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SLIDES / "html", help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="open every page in headless Chromium, offline, and save title-slide screenshots")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        decks = build(args.out)
    except SlidesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = sum(d.slides for d in decks)
    print(f"built {len(decks)} decks ({total} slides) in {args.out} in {time.perf_counter() - start:.1f} s")
    if not args.check:
        return 0
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("browser check skipped: the Python package playwright is not installed (pip install -e 'shared[test]')")
        return 0
    if not find_chromium():
        print("browser check skipped: no Chromium (apt-get install chromium)")
        return 0
    start = time.perf_counter()
    results = check(args.out, decks)
    bad = {name: problems for name, problems in results.items() if problems}
    for name, problems in bad.items():
        print(f"{name}:", *problems, sep="\n  ")
    print(f"checked {len(results)} pages offline in Chromium in {time.perf_counter() - start:.1f} s: "
          f"{'all good' if not bad else f'{len(bad)} with problems'}; title slides in {args.out / 'screenshots'}")
    print(f"open {(args.out / 'index.html').resolve().as_uri()}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
