"""The built web book, as a reader's browser shows it, offline: math typeset by the local
MathJax with no raw TeX left, every lemma box, every figure, no error or stderr output; the
reader-facing layout at 1280 px (prose before code, no visible code cell over 25 lines, nothing
that scrolls sideways); and one edition number everywhere (library, CITATION.cff, changelog,
intro, every page's footer). The browser tests (marked slow) need `jupyter-book build .` first
(tools/test.sh runs it); the edition test does not."""
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from bs4 import BeautifulSoup

import booktools
import release
import sgdrank
from sgdrank import edition, report

slow = pytest.mark.slow
#: The built book (``$SGDRANK_BOOK_HTML`` overrides, e.g. a build made with --path-output).
HTML = Path(os.environ.get("SGDRANK_BOOK_HTML") or booktools.ROOT / "_build" / "html")
CHAPTERS = booktools.chapter_paths()
RAW_TEX = re.compile(r"(\$\$|\\\(|\\\[|\\begin\{|\\frac|\\mathbb|\\operatorname|\\lVert)")
#: The reader's window (issue 21): a laptop-sized browser.
WIDTH = 1280
#: The longest code cell a reader may see on a page (hide-input cells excepted).
MAX_VISIBLE_LINES = 25


def chromium_dom(page, width: int = WIDTH) -> str:
    """The page's DOM after scripts ran (MathJax typeset), in headless Chromium at ``width``."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: run tools/setup.sh (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile_dir:
        r = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--window-size={width},1000",
             f"--user-data-dir={profile_dir}", "--virtual-time-budget=15000", "--dump-dom",
             page.as_uri()],
            capture_output=True, text=True, timeout=180,
        )
    assert r.returncode == 0 and "<html" in r.stdout, \
        f"chromium failed on {page}: {r.stderr[-2000:]}"
    return r.stdout


def visible_text(soup) -> str:
    soup = BeautifulSoup(str(soup), "html.parser")
    for tag in soup(["script", "style", "pre", "code", "mjx-container", "noscript"]):
        tag.decompose()
    return soup.get_text(" ")


# Measured in the page itself once MathJax has typeset it: per cell on the page, whether its
# input is visible (not folded into hide-input's <details>) and how many lines it shows; every
# output block or table that scrolls sideways (overflow-x auto/scroll, scrollWidth > clientWidth);
# and whether prose comes before the first cell. Written as JSON into <div id="sgdrank-layout">.
LAYOUT_JS = r"""
(function () {
  function first(s) { return (s || "").trim().split("\n")[0].slice(0, 70); }
  function measure() {
    var root = document.querySelector("main article") || document.querySelector("main")
      || document.body;
    var cells = Array.prototype.slice.call(root.querySelectorAll("div.cell"));
    var out = {width: window.innerWidth, cells: [], wide: [], prose_words: 0, first: ""};
    cells.forEach(function (c, i) {
      var inp = c.querySelector(".cell_input");
      var pre = inp ? inp.querySelector("pre") : null;
      var src = pre ? pre.textContent.replace(/\s+$/, "") : "";
      out.cells.push({i: i, hidden: !inp || !!inp.closest("details"),
                      lines: src ? src.split("\n").length : 0, first: first(src)});
    });
    root.querySelectorAll("*").forEach(function (el) {
      if (el.closest(".cell_input") || el.closest("mjx-container")) return;
      var inOutput = !!el.closest(".cell_output");
      if (!inOutput && el.tagName !== "TABLE" && !el.querySelector("table")) return;
      var ox = getComputedStyle(el).overflowX;
      if (ox !== "auto" && ox !== "scroll") return;
      if (el.scrollWidth <= el.clientWidth + 1 || el.clientWidth === 0) return;
      var cell = el.closest("div.cell");
      out.wide.push({cell: cell ? cells.indexOf(cell) : -1, tag: el.tagName.toLowerCase(),
                     cls: String(el.className).slice(0, 60), scroll: el.scrollWidth,
                     client: el.clientWidth,
                     text: first((el.querySelector("table") || el).innerText)});
    });
    var firstCell = cells.length ? cells[0] : null;
    root.querySelectorAll("p").forEach(function (p) {
      if (p.closest("div.cell") || p.closest("nav")) return;
      if (firstCell && (p.compareDocumentPosition(firstCell) & Node.DOCUMENT_POSITION_PRECEDING))
        return;
      var words = p.textContent.trim().split(/\s+/).filter(Boolean).length;
      if (!out.first) out.first = first(p.textContent);
      out.prose_words += words;
    });
    var div = document.createElement("div");
    div.id = "sgdrank-layout";
    div.hidden = true;
    div.textContent = JSON.stringify(out);
    document.body.appendChild(div);
  }
  window.addEventListener("load", function () {
    var mj = window.MathJax && window.MathJax.startup && window.MathJax.startup.promise;
    (mj || Promise.resolve()).then(function () { setTimeout(measure, 300); });
  });
})();
"""


def page_layout(page) -> dict:
    """:data:`LAYOUT_JS`'s measurements of a built page at :data:`WIDTH` px (a copy of the page
    with the script added, next to it so that its relative links resolve)."""
    html = page.read_text(encoding="utf-8")
    probe = page.with_name(f".layout-probe-{page.name}")
    probe.write_text(html.replace("</body>", f"<script>{LAYOUT_JS}</script></body>", 1),
                     encoding="utf-8")
    try:
        soup = BeautifulSoup(chromium_dom(probe), "html.parser")
    finally:
        probe.unlink()
    found = soup.find(id="sgdrank-layout")
    assert found is not None, f"the layout probe did not run on {page.name}"
    return json.loads(found.get_text())


def page_cell_names(nb: dict) -> dict[int, str]:
    """``{index of a cell on the page: "code cell k"}``, ``k`` counted as in
    tests/test_notebooks.py (the chapter's code cells from 0, papermill's injected cell not
    counted); remove-cell cells are not on the page."""
    names, k = {}, 0
    for c in (c for c in nb["cells"] if c["cell_type"] == "code"):
        tags = c.get("metadata", {}).get("tags", [])
        if "remove-cell" not in tags:
            names[len(names)] = ("papermill's injected cell" if "injected-parameters" in tags
                                 else f"code cell {k}")
        if "injected-parameters" not in tags:
            k += 1
    return names


def layout_problems(lay: dict, max_lines: int = MAX_VISIBLE_LINES,
                    names: dict[int, str] | None = None) -> list[str]:
    """What a reader at 1280 px would trip over, one line per offending cell or block."""
    names = names if names and len(names) == len(lay["cells"]) else {}
    out = []
    if lay["prose_words"] < 15:
        out.append(f"the page opens with code: {lay['prose_words']} words of prose before its "
                   f"first cell (first paragraph: {lay['first']!r})")
    for c in lay["cells"]:
        if not c["hidden"] and c["lines"] > max_lines:
            name = names.get(c["i"], f"cell {c['i']} on the page")
            out.append(f"{name} shows {c['lines']} lines of code "
                       f"(> {max_lines}; tag it hide-input or move the mechanics into the "
                       f"library): {c['first']!r}")
    for w in lay["wide"]:
        where = (names.get(w["cell"], f"cell {w['cell']} on the page") if w["cell"] >= 0
                 else "the prose")
        src = next((c["first"] for c in lay["cells"] if c["i"] == w["cell"]), "")
        out.append(f"{where} (code {src!r}) has a {w['tag']}.{w['cls'].split(' ')[0]} that "
                   f"scrolls sideways: {w['scroll']} px wide in a {w['client']} px column "
                   f"(starts {w['text']!r})")
    return out


def test_layout_problems_are_reported():
    """The layout verdict fails on each thing it claims to catch (negative controls)."""
    ok = {"width": 1280, "prose_words": 40, "first": "Text", "wide": [],
          "cells": [{"i": 0, "hidden": True, "lines": 60, "first": "import x"},
                    {"i": 1, "hidden": False, "lines": 25, "first": "f(x)"}]}
    assert layout_problems(ok) == []
    code_first = dict(ok, prose_words=0)
    assert "opens with code" in layout_problems(code_first)[0]
    long_cell = dict(ok, cells=[dict(ok["cells"][1], lines=26)])
    assert "shows 26 lines" in layout_problems(long_cell)[0]
    wide = dict(ok, wide=[{"cell": 1, "tag": "pre", "cls": "", "scroll": 1200, "client": 800,
                           "text": "net lr lam"}])
    assert "scrolls sideways: 1200 px wide in a 800 px column" in layout_problems(wide)[0]


# ----------------------------------------------------------------- one edition number
def test_one_edition_number_everywhere():
    """sgdrank.__version__ is the edition: CITATION.cff, the changelog's first entry, the intro's
    "How to cite", the package metadata and the footer extension agree with it."""
    v = sgdrank.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", v), v
    root = booktools.ROOT
    cff = yaml.safe_load((root / "CITATION.cff").read_text())
    assert str(cff["version"]) == v, f"CITATION.cff version {cff['version']} != {v}"
    assert cff["cff-version"] == "1.2.0" and cff["title"] and cff["authors"]
    bib = (root / "references.bib").read_text()
    titles = [r["title"] for r in cff["references"]]
    assert len(titles) == 4, "CITATION.cff lists the four papers as references"
    for t in titles:
        assert re.sub(r"[{}]", "", t) in re.sub(r"[{}]", "", bib), f"{t!r} not in references.bib"
    changes = (root / "CHANGELOG.md").read_text()
    first = re.search(r"^## (\S+)", changes, re.M)
    assert first and first.group(1) == v, f"CHANGELOG.md's first entry is {first and first[1]}"
    intro = (root / "intro.md").read_text()
    assert "## How to cite" in intro
    assert f"edition **{v}**" in intro and f"version = {{{v}}}" in intro, \
        f"intro.md's 'How to cite' does not give edition {v}"
    proj = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    if "version" in proj.get("dynamic", []):
        dyn = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
        assert dyn["dynamic"]["version"] == {"attr": "sgdrank.__version__"}
    else:
        assert proj["version"] == v, f"pyproject.toml's version {proj['version']} != {v}"
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    assert "sgdrank.edition" in cfg["sphinx"]["extra_extensions"], \
        "_config.yml must load sgdrank.edition (the edition number in every page's footer)"
    assert f'class="sgdrank-version">{v}<' in edition.footer_html()
    assert release.version() == v and release.cff_version() == v


def test_intro_explains_every_verdict_word_and_plus_minus():
    """The intro's legend names every verdict word the claims page can show, and says what ±
    means (issue 21: a first-time reader's path)."""
    intro = (booktools.ROOT / "intro.md").read_text()
    legend = " ".join(intro[intro.index("(reading-verdicts)="):intro.index("## How to cite")]
                      .split())
    for word in set(report.SUB_VERDICTS) | set(report.VERDICTS):
        assert f"*{word}*" in legend, f"the intro's legend does not explain {word!r}"
    assert "sample standard deviation" in legend and "95%" in legend and "paired" in legend
    assert "Start here" in intro


def test_release_archive(tmp_path):
    """tools/release.py packs the built pages and the notebooks under sgdrank-<version>/ with a
    manifest, and refuses a build whose pages show another edition."""
    import tarfile

    html = tmp_path / "html"
    html.mkdir()
    v = sgdrank.__version__
    (html / "intro.html").write_text(f"<html><body>{edition.footer_html()}</body></html>")
    (html / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=intro.html" />')
    nb = tmp_path / "01_x.ipynb"
    nb.write_text("{}")
    target = release.build(tmp_path / "out", html, [nb], v, [booktools.ROOT / "CITATION.cff"])
    assert target.name == f"sgdrank-{v}.tar.gz"
    names = tarfile.open(target).getnames()
    assert {f"sgdrank-{v}/html/intro.html", f"sgdrank-{v}/notebooks/01_x.ipynb",
            f"sgdrank-{v}/CITATION.cff", f"sgdrank-{v}/MANIFEST.txt"} <= set(names)
    assert release.shown_versions(html) == {"intro.html": {v}}
    (html / "intro.html").write_text(f"<html>{edition.footer_html('9.9.9')}</html>")
    assert any("shows edition ['9.9.9']" in p for p in release.problems(html, [], v))


# ----------------------------------------------------------------- the built pages
@pytest.fixture(scope="module")
def built():
    if not (HTML / "index.html").exists():
        pytest.fail("the book is not built: run `make html` (jupyter-book build . -W -n)")
    return HTML


@slow
def test_mathjax_is_local_and_outside_static(built):
    assert (built / "mathjax" / "tex-chtml.js").exists()
    assert not list((built / "_static").rglob("tex-chtml.js")), "MathJax must not sit under _static"
    page = (built / "intro.html").read_text()
    assert "mathjax/tex-chtml.js" in page and "cdn.jsdelivr" not in page


@slow
def test_intro_page_typesets_math(built):
    soup = BeautifulSoup(chromium_dom(built / "intro.html"), "html.parser")
    assert len(soup.find_all("mjx-container")) >= 5
    assert not soup.find_all("mjx-merror")
    assert not RAW_TEX.search(visible_text(soup))


@slow
def test_every_page_shows_the_edition(built):
    """The footer of every built page shows sgdrank.__version__ (one source)."""
    shown = release.shown_versions(built)
    assert "intro.html" in shown and len(shown) >= len(CHAPTERS) + 2
    bad = {page: sorted(v) for page, v in shown.items() if v != {sgdrank.__version__}}
    assert not bad, f"pages that do not show edition {sgdrank.__version__}: {bad}"


@slow
@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_page(built, nb_path):
    page = built / "chapters" / f"{nb_path.stem}.html"
    assert page.exists(), f"{page} was not built"
    nb = booktools.load(nb_path)
    md = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    n_prf = len(re.findall(r"```\{prf:", md))
    n_png = sum(1 for c in booktools.code_cells(nb) for o in c.get("outputs", [])
                if "image/png" in o.get("data", {}))
    soup = BeautifulSoup(chromium_dom(page), "html.parser")
    main = soup.find("main") or soup
    # math typeset, none left raw, no MathJax errors
    assert len(main.find_all("mjx-container")) >= md.count("$$") // 2 + 1
    assert not main.find_all("mjx-merror"), \
        [e.get_text() for e in main.find_all("mjx-merror")][:3]
    raw = RAW_TEX.findall(visible_text(main))
    assert not raw, f"raw TeX left on the page: {raw[:5]}"
    # every sphinx-proof box rendered
    boxes = [d for d in main.find_all("div")
             if "proof" in (d.get("class") or []) and "admonition" in (d.get("class") or [])]
    assert len(boxes) == n_prf, f"{len(boxes)} proof boxes rendered, {n_prf} in the notebook"
    # every figure present as an image file that exists
    imgs = [i for i in main.find_all("img") if i.get("src", "").endswith(".png")]
    assert len(imgs) >= n_png, f"{len(imgs)} images on the page, {n_png} figures in the notebook"
    for img in imgs:
        f = (page.parent / img["src"]).resolve()
        assert f.exists() and f.stat().st_size > 1000, f"missing figure {img['src']}"
    # no error output, no stderr
    text = main.get_text(" ")
    assert "Traceback" not in text
    assert not main.select(".output.error, .output.traceback, .output.stderr"), \
        "error or stderr output on the page"
    # the Colab launch button points at this chapter in the one repository
    colab = f"colab.research.google.com/github/sgdrank/sgdrank/blob/main/chapters/{nb_path.name}"
    assert colab in str(soup)


@slow
@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_page_layout_at_1280px(built, nb_path):
    """Issue 21, as a new reader sees the page at 1280 px: it opens with prose before any code;
    no visible code cell is longer than 25 lines; no output block or table scrolls sideways.
    Every offending cell is listed (the text column is 688 px: 77 characters of output text;
    "code cell k" counts the chapter's code cells from 0 as tests/test_notebooks.py does, with
    the first line of its code)."""
    page = built / "chapters" / f"{nb_path.stem}.html"
    assert page.exists(), f"{page} was not built"
    lay = page_layout(page)
    assert lay["width"] == WIDTH, f"the browser window is {lay['width']} px, not {WIDTH}"
    assert lay["cells"], f"no code cells found on {page.name}: has the page structure changed?"
    bad = layout_problems(lay, names=page_cell_names(booktools.load(nb_path)))
    assert not bad, f"{nb_path.name} at {WIDTH} px:\n  - " + "\n  - ".join(bad)


@slow
def test_claims_page_rows_filled_and_links_resolve(built):
    """The claims page opens in the browser with one filled row per claim, and every link goes
    to an existing section of a built chapter."""
    import claims

    page = built / "claims.html"
    assert page.exists(), "claims.html was not built"
    soup = BeautifulSoup(chromium_dom(page), "html.parser")
    main = soup.find("main") or soup
    rows = main.select("table tbody tr")
    assert [r.find("td").get_text(" ", strip=True) for r in rows] == [c.id for c in claims.REGISTRY]
    for r, c in zip(rows, claims.REGISTRY):
        cells = [td.get_text(" ", strip=True) for td in r.find_all("td", recursive=False)]
        assert len(cells) == 5 and all(cells), f"row {c.id} has an empty cell: {cells}"
        assert cells[2] in report.VERDICTS, f"row {c.id}: verdict {cells[2]!r}"
        link = r.find_all("td", recursive=False)[4].find("a")
        if c.chapter is None or not (booktools.CHAPTERS / f"{c.chapter}.ipynb").exists():
            assert link is None and cells[2] == "not yet tested" and cells[4] == "(no section)"
            continue
        assert link is not None, f"row {c.id} has no link"
        href = link["href"]
        target, _, anchor = href.partition("#")
        assert target == f"chapters/{c.chapter}.html", f"{c.id} links to {href}"
        html = (built / target).read_text()
        assert anchor and f'id="{anchor}"' in html, f"{c.id}: anchor {anchor!r} not in {target}"
    assert not main.find_all("mjx-merror")
