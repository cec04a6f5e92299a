"""sgdrank.report: prose numbers, spreads, comparisons, correlations and claim records."""
import json
import math

import numpy as np
import pytest

from sgdrank import report


def test_num_formats_for_text():
    assert report.num(12500) == "12,500"
    assert report.num(12500.0) == "12,500"
    assert report.num(0.0603) == "0.0603"
    assert report.num(3.2e-4) == "3.20e-04"
    assert report.num(90.64) == "90.6"
    assert report.num(2.0) == "2.00"
    assert report.num(0.0) == "0"
    assert report.num(float("nan")) == "nan"
    assert report.num(True) == "True"
    assert report.num(np.int64(7)) == "7"


def test_spread_mean_sd_range_and_nonfinite():
    s = report.spread([1.0, 2.0, 3.0, float("nan")])
    assert (s.mean, s.lo, s.hi, s.n, s.n_bad) == (2.0, 1.0, 3.0, 3, 1)
    assert s.sd == pytest.approx(1.0)
    assert s.text() == "2.00 ± 1.0 (3 seeds, 1 non-finite)"
    assert report.spread([5.0]).text() == "5.00 (1 seed)"
    assert report.spread([float("inf")]).text() == "no finite run"


def test_compare_is_unpaired_and_says_so():
    lower = report.compare([90.6, 90.2, 91.0], [93.1, 93.4, 92.8])
    assert lower.resolved and lower.word == "lower" and lower.diff == pytest.approx(-2.5)
    assert lower.lo < -2.5 < lower.hi < 0
    assert lower.text().startswith("lower by 2.5 (95% interval 1.") and "unpaired" in lower.text()
    assert "±" not in lower.text()
    higher = report.compare([5, 6, 7], [1, 2, 3], words=("smaller", "larger"))
    assert higher.resolved and higher.word == "larger"
    overlap = report.compare([90.6, 90.2, 91.0], [90.1, 91.4, 92.8])
    assert not overlap.resolved and overlap.word == "not resolved at this scale"
    # ranges apart but the Welch interval contains 0: not resolved either
    close = report.compare([0.0, 10.0], [10.5, 20.0])
    assert not close.resolved and close.lo < 0 < close.hi
    single = report.compare([1.0], [5.0, 6.0])
    assert not single.resolved and math.isnan(single.se)


def test_welch_interval_matches_scipy():
    from scipy import stats

    a, b = [1.0, 2.5, 3.1, 2.2], [3.0, 4.4, 5.9]
    c = report.compare(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (c.lo, c.hi) == pytest.approx((ci.low, ci.high))


def test_paired_sees_what_unpaired_hides():
    """A consistent per-seed shift buried in a large seed-to-seed spread: the paired test
    resolves it, the unpaired one cannot -- and a shuffled pairing (a false design) does not."""
    base = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    a, b = base - 1.0 + np.array([0.1, -0.1, 0.05, 0.0, -0.05]), base
    p = report.paired(a, b)
    assert p.resolved and p.word == "lower" and (p.n_lower, p.n) == (5, 5)
    assert p.mean == pytest.approx(-1.0)
    from scipy import stats

    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (p.lo, p.hi) == pytest.approx((ci.low, ci.high))
    assert p.text().startswith("lower by 1.0 (95% interval 0.") and "5 of 5 seeds" in p.text()
    assert p.verdict == "reproduced" and report.direction(p, "higher") == "refuted"
    assert not report.compare(a, b).resolved
    shuffled = report.paired(a, b[[3, 0, 4, 1, 2]])
    assert not shuffled.resolved and shuffled.verdict == "not resolved"
    assert "not resolved" in shuffled.text() and "paired" in shuffled.text()


def test_paired_edge_cases():
    assert not report.paired([1.0], [2.0]).resolved
    assert report.paired([float("nan")] * 3, [1.0, 2.0, 3.0]).n == 0
    # two seeds, both lower, tight: resolved; two seeds of opposite sign: never
    assert report.paired([1.0, 2.0], [2.0, 3.01]).resolved
    assert not report.paired([1.0, 3.0], [2.0, 2.0]).resolved
    same = report.paired([3.0, 4.0, 5.0], [3.0, 4.0, 5.0])
    assert not same.resolved and same.text() == "identical in all 3 seeds (paired)"
    with pytest.raises(ValueError, match="same seed order"):
        report.paired([1.0, 2.0], [1.0])
    # close: the interval's near end within a quarter half-width of 0
    assert report.paired([0.0, 0.0, 0.0], [0.5, 1.0, 1.5]).close
    assert not report.paired([0.0, 0.0, 0.0], [10.0, 10.1, 9.9]).close


def test_checked_needs_a_failing_control():
    assert report.checked(True, False) == "reproduced"
    assert report.checked(True, True) == "vacuous"
    assert report.checked(False, False) == "refuted"


def test_row_verdict_rule():
    s = report.sub
    rep, nr = "reproduced", "not resolved"
    assert report.row_verdict([s("a", rep, "x", central=True), s("b", rep, "y")]) == rep
    assert report.row_verdict([s("a", rep, "x", central=True), s("b", nr, "y")]) == \
        "partly reproduced"
    assert report.row_verdict([s("a", "refuted", "x", central=True), s("b", rep, "y")]) == \
        "refuted"
    # a reproduced side claim never lifts a row whose central claim is not reproduced
    assert report.row_verdict([s("a", nr, "x", central=True), s("b", rep, "y")]) == nr
    assert report.row_verdict([s("a", "vacuous", "x", central=True),
                               s("b", "not reproduced", "y", central=True)]) == "not reproduced"
    assert report.row_verdict([s("a", "inapplicable", "x", central=True)]) == "inapplicable"
    # a refuted side claim does not refute the row
    assert report.row_verdict([s("a", rep, "x", central=True), s("b", "refuted", "y")]) == \
        "partly reproduced"
    with pytest.raises(ValueError, match="central"):
        report.row_verdict([s("a", rep, "x")])
    with pytest.raises(ValueError, match="sub-claim verdict"):
        s("a", "holds", "x")
    assert set(report.SUB_VERDICTS) - {"inapplicable"} <= set(report.VERDICTS)


def test_spearman_and_its_interval():
    x = np.arange(20.0)
    perfect = report.spearman(x, 3 * x + 1)
    assert perfect.rho == pytest.approx(1.0) and perfect.resolved
    assert report.spearman(x, -x).rho == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noise = report.spearman(rng.normal(size=12), rng.normal(size=12))
    assert noise.lo < noise.rho < noise.hi and not noise.resolved
    # ties get average ranks (scipy's convention): rho of (1,1,2) vs (1,2,3) = sqrt(3)/2
    assert report.spearman([1, 1, 2], [1, 2, 3], n_boot=10).rho == pytest.approx(math.sqrt(3) / 2)
    assert report.spearman(x, x, seed=3).lo == report.spearman(x, x, seed=3).lo
    with pytest.raises(ValueError, match=">= 3 values"):
        report.spearman([1, 2], [1, 2])


def test_claim_record_is_displayed_and_machine_readable(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False: shown.append((obj, raw)))
    subs = [report.sub("ratio is 1", "reproduced", "ratio 1.000 (5 seeds)", central=True),
            report.sub("faster per epoch", "not resolved", "difference 0.1")]
    assert report.claim("C8", subs, "ch2-null-space") is None
    (bundle, raw), = shown
    rec = json.loads(bundle[report.CLAIM_MIME])
    assert raw and rec["id"] == "C8" and rec["verdict"] == "partly reproduced"
    assert rec["where"] == "ch2-null-space" and len(rec["subs"]) == 2
    assert rec["subs"][0] == {"text": "ratio is 1", "verdict": "reproduced",
                              "evidence": "ratio 1.000 (5 seeds)", "central": True}
    assert bundle["text/markdown"].startswith("**C8 — partly reproduced.**")
    assert "*not resolved*" in bundle["text/markdown"]
    with pytest.raises(TypeError, match="sub-claims"):
        report.claim("C8", "holds", "ch2-a")
    with pytest.raises(ValueError, match="claim id"):
        report.claim("Claim 8", subs, "ch2-a")
    with pytest.raises(ValueError, match="MyST label"):
        report.claim("C8", subs, "Not A Label")


def test_num_rounding_up_keeps_the_significant_digits():
    assert report.num(0.09999, 2) == "0.10"
    assert report.num(0.0999, 2) == "0.10"
    assert report.num(9.9999, 2) == "10"
    assert report.spread([94.0, 94.1, 93.9]).pm() == "94.0 ± 0.10"


def test_tex_and_pm():
    assert report.tex(1e-4) == "10^{-4}"
    assert report.tex(3.2e-4) == "3.2\\times10^{-4}"
    assert report.tex(3e-3) == "3\\times10^{-3}"
    assert report.tex(0) == "0" and report.tex(0.05) == "0.05" and report.tex(250) == "250"
    assert report.pm([1.0, 2.0, 3.0]) == "2.00 ± 1.0"
    assert report.pm([5.0]) == "5.00"
    assert report.spread([1.0, 2.0]).text(unit="run") == "1.50 ± 0.71 (2 runs)"
