"""The slide decks (tools/build_slides.py, make slides): built, then opened offline in a real headless Chromium.

The browser tests need Chromium (Debian: apt-get install chromium), the Python package playwright (the `test`
extra) and the npm assets (`npm ci` in slides/). Without them they skip, unless COMPRESSLAB_REQUIRE_BROWSER=1
(CI sets it), which turns the skip into a failure.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import jupytext
import pytest
from nbformat.v4 import new_markdown_cell, new_notebook

REPO_ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_slides", REPO_ROOT / "tools" / "build_slides.py")
bs = importlib.util.module_from_spec(_spec)
sys.modules["build_slides"] = bs
_spec.loader.exec_module(bs)

REQUIRE_BROWSER = os.environ.get("COMPRESSLAB_REQUIRE_BROWSER") == "1"
HAVE_ASSETS = all((bs.NODE_MODULES / src).is_file() for src in bs.ASSETS.values())


def unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (and COMPRESSLAB_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


# --- What each deck must show, read from its source (not from the build) ------------------


def lab_expectation(source: Path) -> tuple[int, str]:
    """Slides of a lab: its cells tagged slide/subslide (a fragment adds none) that reach the slides notebook."""
    count, title = 0, None
    for cell in jupytext.read(source).cells:
        tags = cell.metadata.get("tags", [])
        slide_tags = [tag for tag in tags if tag in ("slide", "subslide", "fragment")]
        if not slide_tags or "solution" in tags or "### BEGIN SOLUTION" in cell.source:
            continue  # answers and exercise cells never reach the slides
        title = title or cell.source.strip().splitlines()[0].lstrip("#").strip()
        count += slide_tags[0] in ("slide", "subslide")
    return count, title


def talk_expectation(source: Path) -> tuple[int, str]:
    """Slides of a talk: one more than its '---' separator lines; its title: the first '# ' heading."""
    lines = source.read_text(encoding="utf-8").splitlines()
    title = next(line[2:].strip() for line in lines if line.startswith("# "))
    return 1 + sum(line.strip() == "---" for line in lines), title


EXPECTED = {
    "opening": talk_expectation(REPO_ROOT / "slides" / "opening.md"),
    **{p.stem: lab_expectation(p) for p in sorted((REPO_ROOT / "solutions").glob("[0-9][0-9]_*.py"))},
    "closing": talk_expectation(REPO_ROOT / "slides" / "closing.md"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, dict[str, bs.Deck]]:
    """Every deck built into a temporary folder (with the npm assets when they are installed)."""
    out = tmp_path_factory.mktemp("slides-html")
    decks = bs.build(out, assets=HAVE_ASSETS)
    return out, {deck.name: deck for deck in decks}


@pytest.fixture(scope="module")
def browser(site):
    if not HAVE_ASSETS:
        unavailable("slides/node_modules is missing: run `npm ci` in slides/ (make slides does)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        unavailable("the Python package playwright is not installed (pip install -e 'shared[test]')")
    if not bs.find_chromium():
        unavailable("no Chromium found (apt-get install chromium, or set COMPRESSLAB_CHROMIUM)")
    with bs.Browser() as chromium:
        yield chromium


# --- The sources and the build (no browser) ---------------------------------------------------


def test_markdown_deck(tmp_path):
    source = tmp_path / "talk.md"
    source.write_text(
        "# Title\n\nIntro\n\nNote:\nsay hello\n---\n## Two\n\n```yaml\n---\nNote: code\nnot a separator\n```\n---\n## Three\n"
    )
    nb = bs.markdown_deck(source)
    assert [(c.metadata["slideshow"]["slide_type"], c.source.split("\n")[0]) for c in nb.cells] == [
        ("slide", "# Title"), ("notes", "say hello"), ("slide", "## Two"), ("slide", "## Three"),
    ]
    assert "---\nNote: code\nnot a separator" in nb.cells[2].source
    assert bs.count_slides(nb) == 3 and bs.deck_title(nb) == "Title"

    source.write_text("# Title\n---\n---\n## Three\n")
    with pytest.raises(bs.SlidesError, match=r"talk.md:3: empty slide"):
        bs.markdown_deck(source)


def test_every_deck_built_in_order_with_local_assets_only(site):
    out, decks = site
    assert list(decks) == list(EXPECTED), "one deck per lab between the opening and the closing talk"
    for name, (count, title) in EXPECTED.items():
        assert (decks[name].slides, decks[name].title) == (count, title), name
        text = decks[name].html.read_text(encoding="utf-8")
        loaded = re.findall(r'<(?:script|link)\b[^>]*?\b(?:src|href)="([^"]*)"', text)
        assert loaded, name
        for url in loaded:
            assert not re.match(r"^(https?:)?//", url), f"{name}.html loads {url} from the network"
            if HAVE_ASSETS:
                assert (out / url).is_file(), f"{name}.html loads {url}, which the build did not copy"
    index = (out / "index.html").read_text(encoding="utf-8")
    for name in EXPECTED:
        assert f'href="{name}.html"' in index
    assert 'href="agenda.html"' in index and 'href="instructor-notes.html"' in index


# --- In the browser ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_deck_opens_offline(site, browser, name):
    out, decks = site
    count, title = EXPECTED[name]
    screenshot = out / "screenshots" / f"{name}.png"
    info: dict = {}
    assert browser.check(decks[name].html, slides=count, title=title, screenshot=screenshot, info=info) == []
    assert info["slides"] == count
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    if name == "opening":
        assert info["formulas"] >= 3, "the opening deck's formulas were not typeset"


@pytest.mark.parametrize("page", ["index", "agenda", "instructor-notes"])
def test_page_opens_offline(site, browser, page):
    out, _ = site
    assert browser.check(out / f"{page}.html") == []


# --- The checker must fail on broken decks ------------------------------------------------------


def _variant(site, name: str, edit) -> Path:
    out, decks = site
    text = decks["opening"].html.read_text(encoding="utf-8")
    changed = edit(text)
    assert changed != text
    path = out / f"{name}.html"
    path.write_text(changed, encoding="utf-8")
    return path


def test_checker_catches_a_missing_asset(site, browser):
    broken = _variant(site, "broken-reveal", lambda t: t.replace("dist/reveal.js", "dist/missing-reveal.js"))
    problems = browser.check(broken, slides=EXPECTED["opening"][0], title=EXPECTED["opening"][1])
    assert any("failed request" in p and "missing-reveal.js" in p for p in problems), problems
    assert any("reveal.js did not load" in p for p in problems), problems


def test_checker_catches_a_network_asset(site, browser):
    cdn = '<script src="https://cdn.jsdelivr.net/npm/reveal.js@5.2.1/dist/reveal.js"></script>\n</head>'
    online = _variant(site, "cdn", lambda t: t.replace("</head>", cdn, 1))
    problems = browser.check(online, slides=EXPECTED["opening"][0], title=EXPECTED["opening"][1])
    assert any("blocked request to the network: https://cdn.jsdelivr.net/" in p for p in problems), problems


def test_checker_catches_wrong_count_and_title(site, browser):
    _, decks = site
    count, _ = EXPECTED["opening"]
    problems = browser.check(decks["opening"].html, slides=count + 1, title="A title that is not there")
    assert f"{count} slides, expected {count + 1}" in problems
    assert any("does not show 'A title that is not there'" in p for p in problems), problems


def test_checker_catches_a_blank_title_slide(site, browser):
    """A banner cell without slideshow metadata becomes a blank first slide (why the generator skips it)."""
    out, _ = site
    banner = new_markdown_cell("<!-- generated from solutions/99_demo.py -->")
    title = new_markdown_cell("# Lab 99 · Demo")
    title.metadata["slideshow"] = {"slide_type": "slide"}
    body, _ = bs._exporter().from_notebook_node(new_notebook(cells=[banner, title]))
    path = out / "blank-title.html"
    path.write_text(body, encoding="utf-8")
    assert browser.check(path, slides=2, title=None) == ["the title slide is blank"]
