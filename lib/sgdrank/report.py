"""Prose from computed values: every number and every number-dependent word in a chapter's text
is produced by the cell that computed it, so a re-run on another machine yields a chapter that
agrees with itself.

- :func:`num` formats one number for prose (significant digits, thousands separators);
  :func:`tex` the same for inline math (``3.2\\times10^{-4}``).
- :class:`Spread` / :func:`spread`: mean, sample standard deviation, range and count over seeds.
- :func:`compare`: the difference of two groups' means and whether it is *resolved*, i.e. larger
  than the seed spread; the word that describes it ("lower", "higher") or
  "not resolved at this scale".
- :func:`spearman`: a rank correlation with a seeded bootstrap interval.
- :func:`md`: show a paragraph of Markdown (MyST: math, roles) as the cell's output; the book
  renders it as text (``nb_render_markdown_format: myst``), Colab as Markdown.
- :func:`claim`: record one verdict of the claims page (a visible line plus a machine-readable
  JSON record that ``tools/claims.py`` collects from the executed notebooks).

Nothing here depends on the CPU beyond the values passed in: rounding happens at the end.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

CLAIM_MIME = "application/vnd.sgdrank.claim+json"
VERDICTS = ("holds", "holds with caveat", "fails", "not resolved", "not yet tested")
_ID = re.compile(r"^[CE]\d{1,2}[a-z]?$")


def num(x: float, sig: int = 3, *, sci_below: float = 1e-3, sci_above: float = 1e6) -> str:
    """``x`` with ``sig`` significant digits for running text: ``12,500``, ``0.0603``, ``3.2e-04``.

    Integers (and floats that are integers of magnitude < 1e6) print exactly with thousands
    separators; magnitudes below ``sci_below`` or above ``sci_above`` print in scientific
    notation; NaN prints ``nan`` and infinities ``inf``.
    """
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    a = abs(x)
    if a != 0 and (a < sci_below or a >= sci_above):
        return f"{x:.{max(sig - 1, 0)}e}"
    if a >= 10 ** (sig - 1) and x == round(x):
        return f"{int(round(x)):,}"
    if a == 0:
        return "0"
    decimals = max(sig - 1 - int(math.floor(math.log10(a))), 0)
    s = f"{x:,.{decimals}f}"
    if decimals and abs(float(s.replace(",", ""))) >= 10 ** (sig - decimals):  # 0.09999 -> 0.100
        s = f"{x:,.{decimals - 1}f}"
    return s


def tex(x: float, sig: int = 2) -> str:
    """``x`` for inline math, trailing zeros dropped: ``3.2\\times10^{-4}``, ``3\\times10^{-3}``,
    an exact power as ``10^{-4}``, numbers between 0.01 and 1000 as in :func:`num` (``0.05``)."""
    x = float(x)
    strip = lambda t: t.rstrip("0").rstrip(".") if "." in t else t  # noqa: E731
    if x == 0 or not math.isfinite(x) or 1e-2 <= abs(x) < 1e3:
        return strip(num(x, sig))
    m, e = f"{x:.{max(sig - 1, 0)}e}".split("e")
    m, e = strip(m), int(e)
    if m in ("1", "-1"):
        return f"{'-' if m == '-1' else ''}10^{{{e}}}"
    return f"{m}\\times10^{{{e}}}"


def pm(values: Iterable[float], sig: int = 3) -> str:
    """``mean ± sd`` of ``values`` without the count (:meth:`Spread.pm`), for tables and
    parenthetical numbers."""
    return spread(values).pm(sig)


@dataclass(frozen=True)
class Spread:
    """Summary of one quantity over ``n`` runs (seeds): mean, sample standard deviation
    (``ddof=1``; 0 for a single run), minimum and maximum. Non-finite values are counted in
    ``n_bad`` and left out of the statistics."""

    mean: float
    sd: float
    lo: float
    hi: float
    n: int
    n_bad: int = 0

    def pm(self, sig: int = 3) -> str:
        """``90.6 ± 0.40``: mean and standard deviation, no count (a single run: its value)."""
        if self.n == 0:
            return "nan"
        return num(self.mean, sig) if self.n == 1 else f"{num(self.mean, sig)} ± {num(self.sd, 2)}"

    def text(self, sig: int = 3, unit: str = "seed") -> str:
        """``90.6 ± 0.4 (3 seeds)``; one run prints without the ``±``; ``unit`` names what
        was counted (``"seed"``, ``"run"``)."""
        if self.n == 0:
            return "no finite run"
        body = self.pm(sig)
        runs = f"1 {unit}" if self.n == 1 else f"{self.n} {unit}s"
        bad = f", {self.n_bad} non-finite" if self.n_bad else ""
        return f"{body} ({runs}{bad})"

    def __str__(self) -> str:
        return self.text()


def spread(values: Iterable[float]) -> Spread:
    """:class:`Spread` of ``values`` (e.g. one metric over seeds)."""
    v = np.asarray(list(values), dtype=float)
    ok = v[np.isfinite(v)]
    n_bad = int(v.size - ok.size)
    if ok.size == 0:
        return Spread(math.nan, math.nan, math.nan, math.nan, 0, n_bad)
    sd = float(ok.std(ddof=1)) if ok.size > 1 else 0.0
    return Spread(float(ok.mean()), sd, float(ok.min()), float(ok.max()), int(ok.size), n_bad)


@dataclass(frozen=True)
class Comparison:
    """Group ``a`` against group ``b``: ``diff = mean(a) - mean(b)``, ``se`` the standard error
    of that difference (Welch), ``resolved`` when the two groups' ranges do not overlap *and*
    ``|diff| > k * se``. ``word`` is ``less``/``more`` (or the words given) when resolved, else
    ``"not resolved at this scale"``."""

    a: Spread
    b: Spread
    diff: float
    se: float
    resolved: bool
    word: str

    @property
    def ratio(self) -> float:
        """``mean(a) / mean(b)``."""
        return self.a.mean / self.b.mean if self.b.mean else math.nan

    def text(self, sig: int = 2) -> str:
        """``lower by 8.4 ± 0.5`` or ``not resolved at this scale (difference 0.3 ± 0.4)``."""
        d = f"{num(abs(self.diff), sig)} ± {num(self.se, 1)}"
        return f"{self.word} by {d}" if self.resolved else f"{self.word} (difference {num(self.diff, sig)} ± {num(self.se, 1)})"


def compare(a: Iterable[float], b: Iterable[float], *, k: float = 2.0,
            words: Sequence[str] = ("lower", "higher")) -> Comparison:
    """Compare two groups of runs (see :class:`Comparison`). A group of one run has no spread,
    so a comparison with fewer than two finite runs on either side is never resolved."""
    sa, sb = spread(a), spread(b)
    if sa.n < 2 or sb.n < 2:
        diff = sa.mean - sb.mean if sa.n and sb.n else math.nan
        return Comparison(sa, sb, diff, math.nan, False, "not resolved at this scale")
    diff = sa.mean - sb.mean
    se = math.sqrt(sa.sd ** 2 / sa.n + sb.sd ** 2 / sb.n)
    apart = sa.hi < sb.lo or sb.hi < sa.lo
    resolved = bool(apart and abs(diff) > k * se)
    word = (words[0] if diff < 0 else words[1]) if resolved else "not resolved at this scale"
    return Comparison(sa, sb, diff, se, resolved, word)


@dataclass(frozen=True)
class Correlation:
    """Spearman's rank correlation ``rho`` of ``n`` pairs with a bootstrap ``(lo, hi)`` interval;
    ``resolved`` when the interval excludes 0."""

    rho: float
    lo: float
    hi: float
    n: int

    @property
    def resolved(self) -> bool:
        return bool(self.lo > 0 or self.hi < 0)

    def text(self) -> str:
        return f"Spearman ρ = {self.rho:.2f} (95% bootstrap interval {self.lo:.2f} to {self.hi:.2f}, {self.n} runs)"


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # average ranks of ties
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


def spearman(x: Iterable[float], y: Iterable[float], *, n_boot: int = 2000, seed: int = 0,
             level: float = 0.95) -> Correlation:
    """Spearman's rho of the pairs ``(x_i, y_i)`` and a percentile bootstrap interval over
    ``n_boot`` resamples of the pairs (seeded, so the interval is reproducible)."""
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    if x.shape != y.shape or x.size < 3:
        raise ValueError(f"spearman needs two equally long sequences of >= 3 values, got {x.size}, {y.size}")
    rho = _pearson(_ranks(x), _ranks(y))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, x.size, x.size)
        r = _pearson(_ranks(x[i]), _ranks(y[i]))
        if not math.isnan(r):
            boots.append(r)
    a = (1 - level) / 2
    lo, hi = (np.quantile(boots, [a, 1 - a]) if boots else (math.nan, math.nan))
    return Correlation(rho, float(lo), float(hi), int(x.size))


def md(text: str) -> None:
    """Show ``text`` (MyST Markdown: ``$math$``, ``{ref}`` roles) as this cell's output. Use it
    for prose that contains computed numbers; tag the cell ``remove-input``."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def claim(cid: str, verdict: str, evidence: str, where: str) -> None:
    """Record the verdict on claim or experiment ``cid`` (``"C8"``, ``"E4"``) for the claims
    page, and show it as one line.

    ``verdict`` is one of :data:`VERDICTS`; ``evidence`` is one sentence of Markdown with the
    one or two numbers that decide it (computed, not typed); ``where`` is the MyST label of
    the chapter section that computes them. Returns nothing (so a cell ending in a call shows
    only the verdict line).
    """
    if not _ID.match(cid):
        raise ValueError(f"claim id {cid!r} is not of the form C<n> or E<n> (see ../shared/papers/README.md)")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
    if not re.match(r"^[a-z0-9][a-z0-9-]*$", where):
        raise ValueError(f"where={where!r} must be a MyST label (lower-case letters, digits, '-')")
    rec = {"id": cid, "verdict": verdict, "evidence": evidence.strip(), "where": where}
    from IPython.display import display

    line = f"**{cid} — {verdict}.** {rec['evidence']}"
    display({"text/markdown": line, CLAIM_MIME: json.dumps(rec)}, raw=True)
