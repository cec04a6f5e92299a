"""Prose from computed values: every number and every number-dependent word in a chapter's text
is produced by the cell that computed it, so a re-run on another machine yields a chapter that
agrees with itself.

- :func:`num` formats one number for prose (significant digits, thousands separators);
  :func:`tex` the same for inline math (``3.2\\times10^{-4}``).
- :class:`Spread` / :func:`spread`: mean, sample standard deviation, range and count over seeds.
- :func:`paired`: arms that share seeds (hence data draw and initialisation): the per-seed
  differences, their mean, a 95% t-interval and the sign count ("lower in 5 of 5 seeds").
  Use it wherever the two arms were run on the same seeds.
- :func:`compare`: two *independent* groups of runs (Welch interval, and the groups' ranges must
  not overlap). Use it only for unpaired designs; say so at the call site.
- :func:`checked`: the verdict of a numerical check next to its negative control (a false version
  of the statement that the same test must reject).
- :func:`sub` / :func:`row_verdict` / :func:`claim`: a claims-page row is a list of sub-claims,
  each with its own verdict; the row's verdict follows from them by :data:`ROW_RULE`.

**One meaning of ±.** ``a ± b`` in this book is always *mean ± sample standard deviation of runs
(seeds)*. A difference is never written with ±: it is written ``difference 35 (95% interval 31 to
39)``.
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
#: Verdicts of one sub-claim. ``reproduced``: a test that could fail (its negative control fails)
#: passed, or a comparison is resolved in the claimed direction. ``not reproduced``: the claimed
#: effect or property is absent at this scale (e.g. an effect resolved smaller than claimed, a
#: property that fails in some runs) without contradicting the claim outright. ``refuted``: a
#: counterexample, or a comparison resolved in the opposite direction. ``not resolved``: the
#: interval of the deciding difference contains 0 (this is *not* "no effect"). ``vacuous``: the
#: check or bound cannot fail here (its negative control passes too, or the bound exceeds the
#: trivial one). ``inapplicable``: the statement's premise does not hold for the runs measured.
SUB_VERDICTS = ("reproduced", "not reproduced", "refuted", "not resolved", "vacuous",
                "inapplicable")
#: Verdicts of a claims-page row (see :data:`ROW_RULE`).
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "refuted", "not resolved",
            "vacuous", "inapplicable", "not yet tested")
#: How a row's verdict follows from its sub-claims (shown on the claims page).
ROW_RULE = (
    "A row's verdict follows from its sub-claims; at least one is *central* (the paper's own "
    "measure or statement). (1) If a central sub-claim is refuted, the row is **refuted**. "
    "(2) If every sub-claim is reproduced, the row is **reproduced**. (3) If at least one central "
    "sub-claim is reproduced, the row is **partly reproduced**. (4) Otherwise the row takes the "
    "verdict of its central sub-claims, the first of not reproduced, not resolved, vacuous, "
    "inapplicable that one of them has: reproduced side claims never lift a row whose central "
    "claim is not reproduced.")
_ID = re.compile(r"^[CE]\d{1,2}[a-z]?$")
LEVEL = 0.95


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


def _tq(dof: float, level: float = LEVEL) -> float:
    """Two-sided Student-t quantile ``t_{(1+level)/2, dof}``."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def _magnitude(d: float, lo: float, hi: float) -> tuple[float, float]:
    """The interval ``(lo, hi)`` of a difference ``d`` restated for its size ``|d|`` ("lower by 35
    (95% interval 31 to 39)" rather than "-39 to -31")."""
    return (-hi, -lo) if d < 0 else (lo, hi)


def _interval(lo: float, hi: float, sig: int) -> str:
    return f"{int(round(LEVEL * 100))}% interval {num(lo, sig)} to {num(hi, sig)}"


@dataclass(frozen=True)
class Comparison:
    """Two *independent* groups: ``diff = mean(a) - mean(b)``, ``se`` its Welch standard error,
    ``(lo, hi)`` the Welch 95% t-interval of ``diff``. ``resolved`` when the interval excludes 0
    *and* the two groups' ranges do not overlap. ``word`` is ``lower``/``higher`` (or the words
    given) when resolved, else ``"not resolved at this scale"``. For arms that share seeds use
    :func:`paired`, which has more power."""

    a: Spread
    b: Spread
    diff: float
    se: float
    resolved: bool
    word: str
    lo: float = math.nan
    hi: float = math.nan

    @property
    def ratio(self) -> float:
        """``mean(a) / mean(b)``."""
        return self.a.mean / self.b.mean if self.b.mean else math.nan

    def text(self, sig: int = 2) -> str:
        """``lower by 8.4 (95% interval 7.4 to 9.4, unpaired)`` or ``not resolved at this scale
        (difference 0.3, 95% interval -0.5 to 1.1, unpaired)``."""
        if self.resolved:
            lo, hi = _magnitude(self.diff, self.lo, self.hi)
            return f"{self.word} by {num(abs(self.diff), sig)} ({_interval(lo, hi, sig)}, unpaired)"
        iv = _interval(self.lo, self.hi, sig)
        return f"{self.word} (difference {num(self.diff, sig)}, {iv}, unpaired)"

    @property
    def verdict(self) -> str:
        """Sub-claim verdict for the claim "a is lower than b" (see :func:`direction`)."""
        return direction(self, "lower")


def compare(a: Iterable[float], b: Iterable[float], *, k: float = 2.0,
            words: Sequence[str] = ("lower", "higher")) -> Comparison:
    """Compare two *independent* groups of runs (see :class:`Comparison`); ``k`` is kept for
    compatibility and unused (the 95% interval decides). A group of one run has no spread, so a
    comparison with fewer than two finite runs on either side is never resolved."""
    del k
    sa, sb = spread(a), spread(b)
    if sa.n < 2 or sb.n < 2:
        diff = sa.mean - sb.mean if sa.n and sb.n else math.nan
        return Comparison(sa, sb, diff, math.nan, False, "not resolved at this scale")
    diff = sa.mean - sb.mean
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:
        lo = hi = diff
    else:
        dof = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
        h = _tq(dof) * se
        lo, hi = diff - h, diff + h
    apart = sa.hi < sb.lo or sb.hi < sa.lo
    resolved = bool(apart and (lo > 0 or hi < 0))
    word = (words[0] if diff < 0 else words[1]) if resolved else "not resolved at this scale"
    return Comparison(sa, sb, diff, se, resolved, word, lo, hi)


@dataclass(frozen=True)
class Paired:
    """Arms ``a`` and ``b`` run on the same seeds: ``d_i = a_i - b_i`` over the ``n`` seeds where
    both are finite. ``mean`` and ``se = sd(d)/sqrt(n)``; ``(lo, hi)`` the 95% t-interval of the
    mean difference (``n - 1`` degrees of freedom); ``n_lower``/``n_higher`` count the seeds with
    ``a < b`` / ``a > b``. ``resolved`` when the interval excludes 0 (never with ``n < 2``; with
    ``n = 2`` only if every difference has one sign and the interval excludes 0). ``close``
    flags a verdict near its threshold: the interval's end nearest 0 lies within a quarter of
    the half-width of 0, so another machine's rounding or one more seed could flip it."""

    diffs: tuple
    mean: float
    se: float
    lo: float
    hi: float
    n: int
    n_lower: int
    n_higher: int
    resolved: bool
    word: str

    @property
    def close(self) -> bool:
        if self.n < 2 or not math.isfinite(self.lo):
            return False
        half = (self.hi - self.lo) / 2
        return min(abs(self.lo), abs(self.hi)) < 0.25 * half

    def signs(self, words: Sequence[str] = ("lower", "higher")) -> str:
        """``lower in 5 of 5 seeds`` (the majority sign)."""
        k, w = ((self.n_lower, words[0]) if self.n_lower >= self.n_higher
                else (self.n_higher, words[1]))
        return f"{w} in {k} of {self.n} seed{'s' if self.n != 1 else ''}"

    def text(self, sig: int = 2, words: Sequence[str] = ("lower", "higher")) -> str:
        """``lower by 35 (95% interval 31 to 39; lower in 5 of 5 seeds, paired)`` -- a resolved
        difference with the interval of its size -- or
        ``not resolved at this scale (difference -0.18, 95% interval -0.4 to 0.05; lower in 2 of
        3 seeds, paired)``."""
        if self.n == 0:
            return "not resolved at this scale (no seed with both arms finite)"
        if self.n == 1:
            return (f"not resolved at this scale (one seed: difference {num(self.mean, sig)}, "
                    "paired)")
        if self.n_lower == self.n_higher == 0:
            return f"identical in all {self.n} seeds (paired)"
        if self.resolved:
            lo, hi = _magnitude(self.mean, self.lo, self.hi)
            tail = f"{_interval(lo, hi, sig)}; {self.signs(words)}, paired"
            return f"{self.word} by {num(abs(self.mean), sig)} ({tail})"
        tail = f"{_interval(self.lo, self.hi, sig)}; {self.signs(words)}, paired"
        return f"{self.word} (difference {num(self.mean, sig)}, {tail})"

    @property
    def verdict(self) -> str:
        """Sub-claim verdict for the claim "a is lower than b" (see :func:`direction`)."""
        return direction(self, "lower")


def paired(a: Iterable[float], b: Iterable[float], *,
           words: Sequence[str] = ("lower", "higher")) -> Paired:
    """Paired comparison of two arms that share seeds: ``a[i]`` and ``b[i]`` come from the same
    seed (same data draw and initialisation). See :class:`Paired`."""
    a, b = np.asarray(list(a), float), np.asarray(list(b), float)
    if a.shape != b.shape:
        raise ValueError(f"paired needs one value per seed in each arm, got {a.size} and {b.size} "
                         "values: pass the arms in the same seed order (or use compare for "
                         "independent groups)")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    n = int(d.size)
    nl, nh = int((d < 0).sum()), int((d > 0).sum())
    if n == 0:
        return Paired((), math.nan, math.nan, math.nan, math.nan, 0, 0, 0, False,
                      "not resolved at this scale")
    mean = float(d.mean())
    if n == 1:
        return Paired(tuple(d.tolist()), mean, math.nan, math.nan, math.nan, 1, nl, nh, False,
                      "not resolved at this scale")
    se = float(d.std(ddof=1) / math.sqrt(n))
    h = _tq(n - 1) * se
    lo, hi = mean - h, mean + h
    resolved = bool(lo > 0 or hi < 0)
    if n == 2:
        resolved = resolved and (nl == 2 or nh == 2)
    word = (words[0] if mean < 0 else words[1]) if resolved else "not resolved at this scale"
    return Paired(tuple(d.tolist()), mean, se, lo, hi, n, nl, nh, resolved, word)


def direction(c, expect: str) -> str:
    """Sub-claim verdict of a :class:`Paired` or :class:`Comparison` ``c`` (``a - b``) for the
    claim that ``a`` is ``expect`` (``"lower"`` or ``"higher"``) than ``b``: ``reproduced`` when
    resolved that way, ``refuted`` when resolved the other way, else ``not resolved``."""
    if expect not in ("lower", "higher"):
        raise ValueError(f"expect must be 'lower' or 'higher', got {expect!r}")
    if not c.resolved:
        return "not resolved"
    d = c.mean if isinstance(c, Paired) else c.diff
    return "reproduced" if (d < 0) == (expect == "lower") else "refuted"


def checked(holds: bool, control_holds: bool) -> str:
    """Verdict of a numerical check next to its negative control. ``holds``: the test passed on
    the statement; ``control_holds``: the *same* test passed on a false version of it (a wrong
    constant or rank, a perturbed input). A check whose control also passes cannot fail, so it
    is ``vacuous``; a failed check is ``refuted``."""
    if not holds:
        return "refuted"
    return "vacuous" if control_holds else "reproduced"


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
        return (f"Spearman ρ = {self.rho:.2f} (95% bootstrap interval {self.lo:.2f} to "
                f"{self.hi:.2f}, {self.n} runs)")


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
        raise ValueError("spearman needs two equally long sequences of >= 3 values, got "
                         f"{x.size}, {y.size}")
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


@dataclass(frozen=True)
class Sub:
    """One sub-claim of a claims-page row: ``text`` (the statement, one phrase), its ``verdict``
    (one of :data:`SUB_VERDICTS`), ``evidence`` (the deciding numbers, computed) and whether it
    is ``central`` (the paper's own measure or statement)."""

    text: str
    verdict: str
    evidence: str
    central: bool = False

    def as_dict(self) -> dict:
        return {"text": self.text.strip(), "verdict": self.verdict,
                "evidence": self.evidence.strip(), "central": bool(self.central)}


def sub(text: str, verdict: str, evidence: str, *, central: bool = False) -> Sub:
    """A :class:`Sub`, with the verdict checked against :data:`SUB_VERDICTS`."""
    if verdict not in SUB_VERDICTS:
        raise ValueError(f"sub-claim verdict {verdict!r} is not one of {SUB_VERDICTS}")
    if not text.strip() or not evidence.strip():
        raise ValueError("a sub-claim needs a statement and its evidence")
    return Sub(text, verdict, evidence, central)


_FALLBACK = ("not reproduced", "not resolved", "vacuous", "inapplicable")


def row_verdict(subs: Sequence[Sub]) -> str:
    """The row's verdict from its sub-claims by :data:`ROW_RULE`."""
    subs = list(subs)
    central = [s for s in subs if s.central]
    if not central:
        raise ValueError("a claims-page row needs at least one central sub-claim (central=True): "
                         "the paper's own measure or statement")
    cv = {s.verdict for s in central}
    if "refuted" in cv:
        return "refuted"
    if all(s.verdict == "reproduced" for s in subs):
        return "reproduced"
    if "reproduced" in cv:
        return "partly reproduced"
    return next(v for v in _FALLBACK if v in cv)


def claim(cid: str, subs: Sequence[Sub], where: str) -> None:
    """Record the verdict on claim or experiment ``cid`` (``"C8"``, ``"E4"``) for the claims
    page, and show it: the row verdict (by :func:`row_verdict`) and one line per sub-claim.

    ``subs`` are the row's :class:`Sub` claims (at least one central); ``where`` is the MyST label
    of the chapter section that computes them. Returns nothing (so a cell ending in a call
    shows only the record); :func:`row_verdict` gives the verdict to code that needs it.
    """
    if not _ID.match(cid):
        raise ValueError(f"claim id {cid!r} is not of the form C<n> or E<n> "
                         "(see ../shared/papers/README.md)")
    if isinstance(subs, (str, Sub)):
        raise TypeError("claim(cid, subs, where) takes a list of report.sub(...) sub-claims; "
                        "the row verdict is derived from them (report.ROW_RULE)")
    subs = list(subs)
    if not re.match(r"^[a-z0-9][a-z0-9-]*$", where):
        raise ValueError(f"where={where!r} must be a MyST label (lower-case letters, digits, '-')")
    verdict = row_verdict(subs)
    rec = {"id": cid, "verdict": verdict, "subs": [s.as_dict() for s in subs], "where": where}
    from IPython.display import display

    lines = [f"**{cid} — {verdict}.**", ""]
    lines += [f"- {'(central) ' if s.central else ''}{s.text.strip()}: *{s.verdict}*. "
              f"{s.evidence.strip()}" for s in subs]
    display({"text/markdown": "\n".join(lines), CLAIM_MIME: json.dumps(rec)}, raw=True)
