"""The built web book, as a reader's browser shows it, offline: math typeset by the local
MathJax with no raw TeX left, every lemma box, every figure, no error or stderr output.
Needs `jupyter-book build .` first (tools/test.sh runs it)."""
import re
import shutil
import subprocess
import tempfile

import pytest
from bs4 import BeautifulSoup

import booktools

pytestmark = pytest.mark.slow
HTML = booktools.ROOT / "_build" / "html"
CHAPTERS = booktools.chapter_paths()
RAW_TEX = re.compile(r"(\$\$|\\\(|\\\[|\\begin\{|\\frac|\\mathbb|\\operatorname|\\lVert)")


def chromium_dom(page) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: run tools/setup.sh (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile_dir:
        r = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile_dir}", "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=180,
        )
    assert r.returncode == 0 and "<html" in r.stdout, f"chromium failed on {page}: {r.stderr[-2000:]}"
    return r.stdout


def visible_text(soup) -> str:
    soup = BeautifulSoup(str(soup), "html.parser")
    for tag in soup(["script", "style", "pre", "code", "mjx-container", "noscript"]):
        tag.decompose()
    return soup.get_text(" ")


@pytest.fixture(scope="module")
def built():
    if not (HTML / "index.html").exists():
        pytest.fail("the book is not built: run `make html` (jupyter-book build . -W -n)")
    return HTML


def test_mathjax_is_local_and_outside_static(built):
    assert (built / "mathjax" / "tex-chtml.js").exists()
    assert not list((built / "_static").rglob("tex-chtml.js")), "MathJax must not sit under _static"
    page = (built / "intro.html").read_text()
    assert "mathjax/tex-chtml.js" in page and "cdn.jsdelivr" not in page


def test_intro_page_typesets_math(built):
    soup = BeautifulSoup(chromium_dom(built / "intro.html"), "html.parser")
    assert len(soup.find_all("mjx-container")) >= 5
    assert not soup.find_all("mjx-merror")
    assert not RAW_TEX.search(visible_text(soup))


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_page(built, nb_path):
    page = built / "chapters" / f"{nb_path.stem}.html"
    assert page.exists(), f"{page} was not built"
    nb = booktools.load(nb_path)
    md = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    n_prf = len(re.findall(r"```\{prf:", md))
    n_png = sum(1 for c in booktools.code_cells(nb) for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    soup = BeautifulSoup(chromium_dom(page), "html.parser")
    main = soup.find("main") or soup
    # math typeset, none left raw, no MathJax errors
    assert len(main.find_all("mjx-container")) >= md.count("$$") // 2 + 1
    assert not main.find_all("mjx-merror"), [e.get_text() for e in main.find_all("mjx-merror")][:3]
    raw = RAW_TEX.findall(visible_text(main))
    assert not raw, f"raw TeX left on the page: {raw[:5]}"
    # every sphinx-proof box rendered
    boxes = [d for d in main.find_all("div") if "proof" in (d.get("class") or []) and "admonition" in (d.get("class") or [])]
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
    assert not main.select(".output.error, .output.traceback, .output.stderr"), "error or stderr output on the page"
    # the Colab launch button points at this chapter in the one repository
    assert f"colab.research.google.com/github/sgdrank/sgdrank/blob/main/chapters/{nb_path.name}" in str(soup)


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
        cells = [td.get_text(" ", strip=True) for td in r.find_all("td")]
        assert len(cells) == 5 and all(cells), f"row {c.id} has an empty cell: {cells}"
        assert cells[2] in {"holds", "holds with caveat", "fails", "not resolved", "not yet tested"}
        link = r.find_all("td")[4].find("a")
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
