"""The claims page is generated from the chapters' stored records, covers every claim of the
papers' README, and the generator refuses a chapter that lost a record."""
import json
import re

import pytest

import booktools
import claims
import redecide
import synthesis

PAPERS_README = booktools.ROOT.parent / "shared" / "papers" / "README.md"


def test_registry_is_the_papers_list():
    text = PAPERS_README.read_text(encoding="utf-8")
    ids = re.findall(r"^- ([CE]\d+) \(", text, flags=re.M)
    assert ids, f"no claim ids found in {PAPERS_README}"
    assert [c.id for c in claims.REGISTRY] == ids
    for c in claims.REGISTRY:
        assert c.chapter is None or re.match(r"^\d\d_\w+$", c.chapter), c


def test_committed_page_is_what_the_chapters_say():
    """Fails when a chapter lost a record, links to a missing label, or claims.md is stale."""
    text = claims.render(claims.collect())
    committed = claims.PAGE.read_text(encoding="utf-8")
    assert committed == text, "claims.md is stale: run `python tools/claims.py` (make claims)"
    rows = re.findall(r"^\* - \*\*([CE]\d+)\*\*$", text, flags=re.M)
    assert rows == [c.id for c in claims.REGISTRY]


def test_page_is_in_the_toc_right_after_the_introduction():
    toc = (booktools.ROOT / "_toc.yml").read_text()
    assert re.search(r"root: intro\n(.*\n)*?\s+- file: claims\n", toc)
    first_file = re.findall(r"- file: (\S+)", toc)[0]
    assert first_file == "claims"


def _chapter(tmp_path, stem, recs, labels=("ch9-sec",)):
    cells = [{"cell_type": "markdown", "metadata": {}, "source": f"({lab})=\n## A section\n"}
             for lab in labels]
    outputs = [{"output_type": "display_data", "metadata": {},
                "data": {"text/markdown": "x", claims.CLAIM_MIME: json.dumps(r)}} for r in recs]
    cells.append({"cell_type": "code", "metadata": {}, "source": "report.claim(...)",
                  "execution_count": 1, "outputs": outputs})
    p = tmp_path / f"{stem}.ipynb"
    p.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return p


def test_generator_rejects_missing_wrong_and_duplicate_records(tmp_path, monkeypatch):
    subs = [{"text": "it holds", "verdict": "reproduced", "evidence": "n = 3", "central": True},
            {"text": "side", "verdict": "not resolved", "evidence": "interval -1 to 2",
             "central": False}]
    rec = lambda cid, where="ch9-sec": {"id": cid, "verdict": "partly reproduced", "subs": subs,
                                        "where": where}
    reg = [claims.Claim("C1", "P", "s", "09_x"), claims.Claim("C2", "P", "s", "09_x"),
           claims.Claim("E9", "P", "s", None)]
    monkeypatch.setattr(claims, "REGISTRY", reg)
    good = _chapter(tmp_path, "09_x", [rec("C1"), rec("C2")])
    got = claims.collect([good])
    assert set(got) == {"C1", "C2"}
    page = claims.render(got)
    assert "{ref}`Ch. 9 <ch9-sec>`" in page and "**not yet tested**" in page
    assert "no chapter yet" in page
    assert "  - - **central** it holds: *reproduced*. n = 3\n    - side: *not resolved*" in page
    assert "2 partly reproduced, 1 not yet tested" in page and "*vacuous*:" in page
    wrong = _chapter(tmp_path, "09_x", [rec("C1"), {**rec("C2"), "verdict": "reproduced"}])
    with pytest.raises(claims.ClaimsError, match="not what the rule gives"):
        claims.collect([wrong])
    old = _chapter(tmp_path, "09_x", [rec("C1"), {"id": "C2", "verdict": "holds",
                                                  "evidence": "x", "where": "ch9-sec"}])
    with pytest.raises(claims.ClaimsError, match="no sub-claims"):
        claims.collect([old])
    missing = _chapter(tmp_path, "09_x", [rec("C1")])
    with pytest.raises(claims.ClaimsError, match="stores no record for C2"):
        claims.collect([missing])
    twice = _chapter(tmp_path, "09_x", [rec("C1"), rec("C1"), rec("C2")])
    with pytest.raises(claims.ClaimsError, match="two records for C1"):
        claims.collect([twice])
    badlink = _chapter(tmp_path, "09_x", [rec("C1"), rec("C2", where="ch9-nowhere")])
    with pytest.raises(claims.ClaimsError, match="ch9-nowhere"):
        claims.collect([badlink])
    foreign = _chapter(tmp_path, "09_x", [rec("C1"), rec("C2"), rec("E9")])
    with pytest.raises(claims.ClaimsError, match="gives to no chapter"):
        claims.collect([foreign])


def test_synthesis_page_is_fresh_and_reads_by_its_rule(tmp_path):
    committed = synthesis.PAGE.read_text(encoding="utf-8")
    assert committed == synthesis.render(synthesis.collect()), \
        "synthesis.md is stale: run `python tools/synthesis.py` (make claims)"
    row = dict(fit="acc 0.99", rank_W=10, rank_W0=20, rank_dW=8, srank_W0=9.0)
    rows = [dict(row, arm="lam=0", lam=0.0, D=0.0, Dstar=4.0, srank_W=5.0, srank_dW=4.0),
            dict(row, arm="lam=0.01", lam=0.01, D=5.0, Dstar=4.0, srank_W=2.0, srank_dW=2.0),
            dict(row, arm="lam=0.001", lam=0.001, D=1.0, Dstar=4.0, srank_W=4.0, srank_dW=3.9)]
    text = synthesis._reading(rows)
    assert "*lam=0.01*: $D \\ge D^*$: decay alone can" in text and "lower stable rank" in text
    assert "*lam=0.001*: $D < D^*$: decay alone cannot" in text
    assert "no learned part of lower" in text
    rec = {"experiment": "E0 toy", "where": "ch9-sec", "rows": rows}
    page = synthesis.render([("09_x", rec)])
    assert "## E0 toy" in page and "{ref}`this section <ch9-sec>`" in page
    assert page.count("| lam=") == 6  # two narrow tables


def test_redecide_reports_every_flip(tmp_path):
    sub = lambda v, c=False: {"text": "t", "verdict": v, "evidence": "e", "central": c}
    a = {"id": "C1", "verdict": "reproduced", "subs": [sub("reproduced", True)], "where": "x"}
    b = {"id": "C2", "verdict": "partly reproduced", "where": "x",
         "subs": [sub("reproduced", True), sub("not resolved")]}
    old = redecide.verdicts(json.loads(_chapter(tmp_path, "09_x", [a, b]).read_text()))
    assert old == {"C1": ("reproduced", ("reproduced",)),
                   "C2": ("partly reproduced", ("reproduced", "not resolved"))}
    assert redecide.differences(old, old) == []
    flipped = dict(old, C2=("partly reproduced", ("reproduced", "reproduced")))
    (line,) = redecide.differences(old, flipped)
    assert line.startswith("C2: committed")
    assert redecide.differences(old, {"C1": old["C1"]}) == ["C2: committed " + str(old["C2"])
                                                              + " -> re-run None"]
