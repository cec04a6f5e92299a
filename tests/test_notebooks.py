"""Committed chapters are clean, fresh, top-to-bottom runs of the book profile, and the
mechanisms that check them really catch a stale notebook or a changed checked output."""
import copy
import json
import re
import subprocess
import sys

import pytest

import booktools

CHAPTERS = booktools.chapter_paths()


def test_there_are_chapters_and_all_are_in_the_toc():
    assert CHAPTERS, "no chapters/NN_*.ipynb found"
    toc = (booktools.ROOT / "_toc.yml").read_text()
    for p in CHAPTERS:
        assert f"chapters/{p.stem}" in toc, f"{p.name} is not in _toc.yml"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_is_fresh_book_run(path):
    bad = booktools.problems(booktools.load(path), "book")
    assert not bad, (f"{path.name}: " + "; ".join(bad)
                     + f" -> run: make chapter NB=chapters/{path.name}")


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_layout(path):
    nb = booktools.load(path)
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# ")
    code = booktools.code_cells(nb)
    assert booktools.REPO_URL in "".join(code[0]["source"]), \
        "first code cell must be the Colab install cell"
    assert "parameters" in code[1]["metadata"].get("tags", []), \
        "second code cell must be tagged 'parameters'"
    assert "profile = None" in "".join(code[1]["source"])
    settings = next((i for i in (2, 3) if "profiles.select(" in "".join(code[i]["source"])), None)
    assert settings is not None, ("the third code cell (or the fourth, after an imports cell) "
                                  "must show the profile table: profiles.select(...)")
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "What this shows" in text, "a chapter closes with a 'What this shows' section"
    assert "NBVAL_CHECK_OUTPUT" in "".join("".join(c["source"]) for c in code), \
        "no nbval-checked cell"


def test_one_repository_url_everywhere():
    cfg = (booktools.ROOT / "_config.yml").read_text()
    assert f"url: {booktools.REPO_URL}" in cfg
    for p in CHAPTERS:
        src = "".join(booktools.code_cells(booktools.load(p))[0]["source"])
        assert f"{booktools.REPO_URL}.git" in src, p.name


def _stale_copy(nb):
    """A copy of ``nb`` that passes the freshness check (stamped now, numbered top to bottom,
    no error or stderr output), whatever state the committed chapter is in."""
    nb = copy.deepcopy(nb)
    n = 0
    for c in booktools.code_cells(nb):
        c["outputs"] = [o for o in c.get("outputs", []) if o.get("output_type") != "error"
                        and o.get("name") != "stderr"]
        if "".join(c["source"]).strip():
            n += 1
            c["execution_count"] = n
    nb["metadata"].get("papermill", {}).pop("exception", None)
    nb["metadata"][booktools.META_KEY] = booktools.stamp(nb, "book")
    assert booktools.problems(nb, "book") == []
    return nb


def test_freshness_check_catches_changes():
    nb = _stale_copy(booktools.load(CHAPTERS[0]))
    edited = copy.deepcopy(nb)
    last = booktools.code_cells(edited)[-1]
    last["source"] = "".join(last["source"]) + "\n# edited"
    assert any("code cells changed" in p for p in booktools.problems(edited, "book"))
    lib_changed = copy.deepcopy(nb)
    lib_changed["metadata"][booktools.META_KEY]["lib_sha256"] = "0" * 64
    assert any("library changed" in p for p in booktools.problems(lib_changed, "book"))
    smoke = copy.deepcopy(nb)
    smoke["metadata"][booktools.META_KEY]["profile"] = "smoke"
    assert any("profile 'smoke'" in p for p in booktools.problems(smoke, "book"))
    reordered = copy.deepcopy(nb)
    cells = booktools.code_cells(reordered)
    cells[0]["execution_count"], cells[1]["execution_count"] = 2, 1
    assert any("top-to-bottom" in p for p in booktools.problems(reordered, "book"))
    errored = copy.deepcopy(nb)
    booktools.code_cells(errored)[-1]["outputs"] = [
        {"output_type": "error", "ename": "ValueError", "evalue": "x", "traceback": []}]
    assert any("error output" in p for p in booktools.problems(errored, "book"))
    noisy = copy.deepcopy(nb)
    booktools.code_cells(noisy)[-1]["outputs"] = [{"output_type": "stream", "name": "stderr",
                                                   "text": "train:  10%|#         | 1/10\r"}]
    assert any("wrote to stderr" in p and "train:  10%" in p
               for p in booktools.problems(noisy, "book"))


def test_lib_dependencies_follow_imports():
    nb = {"cells": [{"cell_type": "code", "metadata": {},
                     "source": "from sgdrank import gradients, plotting\n"}]}
    deps = booktools.lib_dependencies(nb)
    # gradients imports metrics (and models lazily); __init__ always counts
    assert {"__init__.py", "gradients.py", "metrics.py", "models.py", "plotting.py"} <= set(deps)
    assert "linear.py" not in deps


def test_nbval_fails_on_a_changed_checked_output(tmp_path):
    """A deliberately wrong committed output in a '# NBVAL_CHECK_OUTPUT' cell makes nbval fail,
    and the right one passes: the smoke run really compares checked cells."""
    def notebook(text):
        return {
            "cells": [{"cell_type": "code", "execution_count": 1, "metadata": {}, "id": "c1",
                       "source": "# NBVAL_CHECK_OUTPUT\nprint(6 * 7)",
                       "outputs": [{"output_type": "stream", "name": "stdout", "text": text}]}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5,
        }
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    good.write_text(json.dumps(notebook("42\n")))
    bad.write_text(json.dumps(notebook("43\n")))
    run = lambda p: subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p",
                                    "no:cacheprovider", str(p)],
                                   capture_output=True, text=True, cwd=tmp_path)
    assert run(good).returncode == 0
    r = run(bad)
    assert r.returncode == 1 and "43" in r.stdout


def test_no_machine_paths_in_committed_notebooks():
    for p in CHAPTERS:
        nb = booktools.load(p)
        pm = nb["metadata"].get("papermill", {})
        for key in ("input_path", "output_path"):
            assert not str(pm.get(key, "")).startswith("/"), \
                f"{p.name}: papermill {key} is absolute"
        assert not booktools.absolute_paths(nb), f"{p.name} records {booktools.absolute_paths(nb)}"


def test_papermill_paths_are_made_relative():
    root = str(booktools.ROOT)
    nb = {"metadata": {"papermill": {"input_path": f"{root}/chapters/x.ipynb",
                                     "output_path": "/elsewhere/y.ipynb"}}, "cells": []}
    assert booktools.absolute_paths(nb) == [root]
    booktools.relative_papermill_paths(nb)
    assert nb["metadata"]["papermill"] == {"input_path": "chapters/x.ipynb",
                                           "output_path": "y.ipynb"}
    assert not booktools.absolute_paths(nb)


# A number that another CPU may round differently: an exponent of -7 or below, or 6+ decimals.
# Thresholds written as "< 1e-12" are the claim itself and are allowed.
_ROUNDING_LEVEL = re.compile(r"\d\.?\d*e-(?:0?[7-9]|[1-9]\d)\b|\d+\.\d{6,}")
_THRESHOLD = re.compile(r"[<>]=?\s*[0-9.]+e-\d+")


def rounding_level_numbers(text: str) -> list[str]:
    return _ROUNDING_LEVEL.findall(_THRESHOLD.sub("", text))


def test_rounding_level_detector():
    assert rounding_level_numbers("max |r - 1| = 7e-16 < 1e-12: True") == ["7e-16"]
    assert rounding_level_numbers("closed form 0.8181144125") == ["0.8181144125"]
    assert rounding_level_numbers("rank 3, error < 1e-12: True, ratio 1.000") == []


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_checked_outputs_print_no_rounding_level_numbers(path):
    """A '# NBVAL_CHECK_OUTPUT' cell prints booleans, integers and coarsely rounded values only
    (the second numeric configuration of tools/test.sh catches the rest at run time)."""
    bad = []
    for i, c in enumerate(booktools.code_cells(booktools.load(path))):
        if "NBVAL_CHECK_OUTPUT" not in "".join(c["source"]):
            continue
        out = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                      for o in c.get("outputs", []))
        hits = rounding_level_numbers(out)
        if hits:
            bad.append(f"checked code cell {i} prints {hits[:3]}")
    assert not bad, f"{path.name}: " + "; ".join(bad)


# ----------------------------------------------------------------- reader-facing layout (issue 21)
#: The longest code cell a reader sees on the page (hide-input / remove-input cells excepted).
MAX_VISIBLE_LINES = 25
#: The widest line of plain-text output (stream or text/plain without a richer rendering) that
#: fits the text column at 1280 px without a sideways scroll bar: the column is 688 px and an
#: output line of n characters is 8.4 n + 34 px wide (measured in Chromium: 80 characters are
#: 706 px, 83 are 732 px), so 77 characters. tests/test_book.py measures the built page itself.
MAX_OUTPUT_CHARS = 77
_HIDDEN = {"hide-input", "remove-input", "hide-cell", "remove-cell"}


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def visible_code_cells(nb) -> list[tuple[int, dict]]:
    """``(index among the chapter's code cells, cell)`` for the code cells whose source the
    built page shows (not tagged hide-input, remove-input, hide-cell or remove-cell)."""
    return [(i, c) for i, c in enumerate(booktools.code_cells(nb)) if not _tags(c) & _HIDDEN]


def long_visible_cells(nb, limit: int = MAX_VISIBLE_LINES) -> list[str]:
    """One line per visible code cell longer than ``limit`` lines (trailing blank lines not
    counted), naming its index, its length and its first line."""
    out = []
    for i, c in visible_code_cells(nb):
        lines = "".join(c["source"]).rstrip().splitlines()
        if len(lines) > limit:
            out.append(f"code cell {i} shows {len(lines)} lines (> {limit}): {lines[0][:60]!r}")
    return out


def wide_text_outputs(nb, limit: int = MAX_OUTPUT_CHARS) -> list[str]:
    """One line per code cell whose plain-text output (a stream, or text/plain with no HTML,
    Markdown or image rendering next to it) has a line wider than ``limit`` characters; the
    cell's index, its widest line's width and the line's start. Removed cells excepted."""
    out = []
    for i, c in enumerate(booktools.code_cells(nb)):
        if "remove-cell" in _tags(c) or "remove-output" in _tags(c):
            continue
        texts = []
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                texts.append("".join(o.get("text", "")))
            data = o.get("data", {})
            if "text/plain" in data and not {"text/html", "text/markdown", "image/png",
                                             "image/svg+xml"} & set(data):
                texts.append("".join(data["text/plain"]))
        lines = [ln for t in texts for ln in t.replace("\r", "\n").splitlines()]
        widest = max(lines, key=len, default="")
        if len(widest) > limit:
            out.append(f"code cell {i} prints a {len(widest)}-character line (> {limit}): "
                       f"{widest[:60]!r}")
    return out


def test_layout_detectors():
    """The layout checks below catch what they claim (a negative control for each)."""
    def nb(cells):
        return {"cells": [{"cell_type": "code", "metadata": {"tags": t}, "source": s,
                           "outputs": o} for s, t, o in cells]}
    long_src = "\n".join(f"x{i} = {i}" for i in range(30))
    assert long_visible_cells(nb([(long_src, [], [])])) == [
        "code cell 0 shows 30 lines (> 25): 'x0 = 0'"]
    assert long_visible_cells(nb([(long_src, ["hide-input"], [])])) == []
    assert long_visible_cells(nb([("a = 1\n" * 25 + "\n\n", [], [])])) == []
    wide = [{"output_type": "stream", "name": "stdout", "text": "x" * 120 + "\n"}]
    assert wide_text_outputs(nb([("print()", ["hide-input"], wide)]))[0].startswith(
        "code cell 0 prints a 120-character line")
    html = [{"output_type": "execute_result", "data": {"text/plain": "y" * 200,
                                                       "text/html": "<table/>"}}]
    assert wide_text_outputs(nb([("df", [], html)])) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_no_long_visible_code_cell(path):
    """No code cell the page shows is longer than 25 lines: mechanics belong in the library,
    figure-only cells are tagged hide-input (issue 21)."""
    bad = long_visible_cells(booktools.load(path))
    assert not bad, f"{path.name}: " + "; ".join(bad)


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_settings_and_imports_cells_are_hidden(path):
    """The settings cell (the one calling profiles.select) and any imports-only cell are tagged
    hide-input, and the settings cell shows its profile table: the page shows the table, the
    code is one click away."""
    bad = []
    for i, c in enumerate(booktools.code_cells(booktools.load(path))):
        src = "".join(c["source"])
        body = [ln.strip() for ln in src.splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
        imports_only = bool(body) and all(ln.startswith(("import ", "from ")) for ln in body)
        settings = "profiles.select(" in src
        if (settings or imports_only) and not _tags(c) & {"hide-input", "remove-input"}:
            what = "settings cell (profiles.select)" if settings else "imports-only cell"
            bad.append(f"code cell {i}, the {what}, is not tagged hide-input")
        shown = [o for o in c.get("outputs", [])
                 if o.get("output_type") in ("execute_result", "display_data")]
        if settings and not shown:
            bad.append(f"code cell {i}, the settings cell, shows no profile table (end it with "
                       "`P = profiles.select(...); P`)")
    assert not bad, f"{path.name}: " + "; ".join(bad)


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_no_wide_text_output(path):
    """No plain-text output line wider than 77 characters (it would scroll sideways in the text
    column at 1280 px): split or transpose tables, or show them with report.md (issue 21)."""
    bad = wide_text_outputs(booktools.load(path))
    assert not bad, f"{path.name}: " + "; ".join(bad)


def control_characters(nb) -> list[str]:
    """Cells whose source holds a control character other than newline and tab: the mark of a
    LaTeX command eaten by a Python string escape (``"\\varepsilon"`` written as ``"\varepsilon"``
    leaves a vertical tab; ``"\\rVert"`` a carriage return), which MathJax then fails on."""
    out = []
    for i, c in enumerate(nb["cells"]):
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        bad = sorted({hex(ord(ch)) for ch in src if ord(ch) < 32 and ch not in "\n\t"})
        if bad:
            out.append(f"cell {i} ({c['cell_type']}) holds control characters {bad}")
    return out


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_no_control_characters_in_sources(path):
    bad = control_characters(booktools.load(path))
    assert not bad, f"{path.name}: " + "; ".join(bad)
    broken = {"cells": [{"cell_type": "markdown", "source": "below $\varepsilon$"}]}
    assert control_characters(broken), "the detector misses a vertical tab"


#: chapters that train more than minutes' worth at the paper scale: they show the cost block
TRAINING = ("03_", "04_", "05_", "06_")
COST_MIME = "application/vnd.sgdrank.cost+json"
T4_BUDGET_S = 3600  # issue 20: the gpu profile takes about an hour or less on a Colab T4


def cost_record(nb: dict) -> dict | None:
    recs = booktools.mime_records(nb, COST_MIME)
    return recs[0] if recs else None


@pytest.mark.parametrize("path", [p for p in CHAPTERS if p.name.startswith(TRAINING)],
                         ids=lambda p: p.name)
def test_training_chapter_shows_its_cost_and_a_gpu_profile_that_fits_a_t4(path):
    nb = booktools.load(path)
    code = booktools.code_cells(nb)
    where = next((i for i, c in enumerate(code)
                  if "cost.show_profiles(" in "".join(c["source"])), None)
    assert where is not None and where <= 4, \
        "the cost block (cost.show_profiles) must come right after the settings cell"
    rec = cost_record(nb)
    assert rec is not None, "the cost block stored no record: re-execute the chapter"
    gpu, paper = rec["gpu"], rec["paper"]
    assert gpu["fits"], f"the gpu profile does not fit a Colab T4: {gpu}"
    assert 0 < gpu["seconds"] <= T4_BUDGET_S, \
        f"the gpu profile takes {gpu['seconds'] / 60:.0f} T4-minutes by model (budget 60)"
    # the gpu profile is a reduction of the paper scale, not another experiment
    assert gpu["flops"] <= paper["flops"] and gpu["runs"] <= paper["runs"]
    assert rec["this"]["profile"] == "book" and rec["this"]["fits"]


def test_cost_record_detector():
    fake = {"cells": [{"cell_type": "code", "metadata": {}, "source": "",
                       "outputs": [{"output_type": "display_data",
                                    "data": {COST_MIME: json.dumps({"gpu": {"seconds": 1}})}}]}]}
    assert cost_record(fake) == {"gpu": {"seconds": 1}}
    fake["cells"][0]["outputs"] = []
    assert cost_record(fake) is None
