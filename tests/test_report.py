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


def test_compare_resolves_only_beyond_the_spread():
    lower = report.compare([90.6, 90.2, 91.0], [93.1, 93.4, 92.8])
    assert lower.resolved and lower.word == "lower" and lower.diff == pytest.approx(-2.5)
    assert lower.text().startswith("lower by 2.5")
    higher = report.compare([5, 6, 7], [1, 2, 3], words=("smaller", "larger"))
    assert higher.resolved and higher.word == "larger"
    overlap = report.compare([90.6, 90.2, 91.0], [90.1, 91.4, 92.8])
    assert not overlap.resolved and overlap.word == "not resolved at this scale"
    # ranges apart but the difference is within 2 standard errors: not resolved either
    close = report.compare([0.0, 10.0], [10.5, 20.0])
    assert not close.resolved
    single = report.compare([1.0], [5.0, 6.0])
    assert not single.resolved and math.isnan(single.se)


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
    assert report.claim("C8", "holds", "ratio 1.000 (5 seeds)", "ch2-null-space") is None
    (bundle, raw), = shown
    assert raw and json.loads(bundle[report.CLAIM_MIME]) == {
        "id": "C8", "verdict": "holds", "evidence": "ratio 1.000 (5 seeds)", "where": "ch2-null-space"}
    assert bundle["text/markdown"].startswith("**C8 — holds.**")
    with pytest.raises(ValueError, match="verdict"):
        report.claim("C8", "true-ish", "x", "ch2-a")
    with pytest.raises(ValueError, match="claim id"):
        report.claim("Claim 8", "holds", "x", "ch2-a")
    with pytest.raises(ValueError, match="MyST label"):
        report.claim("C8", "holds", "x", "Not A Label")


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
