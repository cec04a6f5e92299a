"""The "Claims at a glance" page (``claims.md``), generated from the executed chapters.

    python tools/claims.py           # write claims.md from the committed chapter outputs
    python tools/claims.py --check   # exit 1 if claims.md differs from what the chapters say

Every claim (C1-C11) and experiment (E1-E12) of ``../shared/papers/README.md`` has one row. The
verdict, the deciding numbers and the link come from the record that the chapter's run stored
with :func:`sgdrank.report.claim` (an output of MIME type ``CLAIM_MIME``); nothing on the page is
typed here except the one-line statement of each claim. A claim whose chapter exists but holds no
record is an error (so are a record for a claim the registry gives to another chapter, two records
for one claim, and a link to a label the chapter does not define); a claim whose chapter does not
exist yet gets a row that says so.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import booktools  # noqa: E402

from sgdrank.report import (  # noqa: E402
    CLAIM_MIME, ROW_RULE, SUB_VERDICTS, VERDICTS, row_verdict, sub)

PAGE = booktools.ROOT / "claims.md"
NO_CHAPTER = "not yet tested"


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    statement: str
    chapter: str | None  # notebook stem that tests it; None: no chapter yet


REGISTRY = [
    Claim("C1", "GSGP L3.2, GP22 L1", r"the gradient of a scalar ReLU net w.r.t. a "
          r"fully-connected matrix has rank $\le 1$", "01_rank_one_gradients"),
    Claim("C2", "GSGP L3.1", r"a conv filter matrix's gradient has rank $\le N$, the number of "
          r"patches", "01_rank_one_gradients"),
    Claim("C3", "GP22 L2", r"with BN (variance detached) a batch gradient has rank $\le B$",
          "01_rank_one_gradients"),
    Claim("C4", "WD2L L2.1", "the ReLU activation pattern is locally constant almost everywhere",
          "01_rank_one_gradients"),
    Claim("C5", "GP22 Prop 1-2", r"with $\lambda > 0$, SGD cannot converge (zero gradient on "
          r"every batch) unless $f = 0$ or the inputs are collinear", "04_sgd_noise"),
    Claim("C6", "GP22 Thm 1", r"the distance to rank $\le B^*$ is at most $1/2\lambda$ times "
          r"the smallest batch gradient", "04_sgd_noise"),
    Claim("C7", "GSGP Thm 3.3", r"unrolled SGD: $W_t/\lVert W_t\rVert$ is "
          r"$(1-2\mu\lambda)^k$-close to rank $\le NBk$", "03_rank_sweeps"),
    Claim("C8", "JANUS Thm 1", r"linear regression: the null-space component decays by "
          r"$1-2\eta\lambda$ per step, SGD and GD alike", "02_linear_regression"),
    Claim("C9", "JANUS Lemma 1", r"weight-normalised nets at an SGD equilibrium have rank "
          r"$\le 2$", "04_sgd_noise"),
    Claim("C10", "WD2L Thm 2.4/2.6", r"two-layer ReLU net: zero (small) batch gradients imply "
          r"rank $\le 2$ (near rank 2)", "05_two_layer"),
    Claim("C11", "WD2L Thm 3.11", "the low-rank bias improves the generalization bound",
          "05_two_layer"),
    Claim("E1", "JANUS Fig A.1-A.2", r"linear regression $d=11$, $N=10$: SGD vs GD, init 0 vs "
          r"random", "02_linear_regression"),
    Claim("E2", "JANUS Fig A.3, A.4, A.6", "sparse features, online one-pass, a target component "
          "independent of the data", "02_linear_regression"),
    Claim("E3", "JANUS Fig A.5", "online, constant learning rate: noise that does not decrease",
          "02_linear_regression"),
    Claim("E4", "JANUS Fig A.7", r"slope ratio of $\log\sigma_{\min}$, SGD/GD $\approx N$",
          "02_linear_regression"),
    Claim("E5", "GP22 Fig 1", "MLP on images: SGD with weight decay does not converge",
          "04_sgd_noise"),
    Claim("E6", "JANUS Figs 1-5", "weight-normalised conv net: margins, GD vs SGD, update norms, "
          r"ranks vs $\lambda$", "04_sgd_noise"),
    Claim("E7", "GSGP Figs 3, 7, 10-12; GP22 Figs 2, 3, 5", r"rank falls with smaller $B$, "
          r"larger $\mu$ and $\lambda$; none with $\lambda = 0$", "03_rank_sweeps"),
    Claim("E8", "GP22 Figs 6-7", "per-layer ranks: MLP bottleneck, residual balance",
          "03_rank_sweeps"),
    Claim("E9", "GSGP Figs 1, 2, 4, 13-17", r"ResNet-18, VGG-16-BN, ViT on CIFAR-10: rank vs "
          r"$\mu$, $\lambda$, $B$", "06_conv_transformers"),
    Claim("E10", "GSGP Figs 5-6", "among nets that fit, lower rank goes with higher test accuracy",
          "03_rank_sweeps"),
    Claim("E11", "WD2L Figs 1-3, 8", r"two-layer regression: stable rank vs $\lambda$, gap, "
          r"batch-gradient norms", "05_two_layer"),
    Claim("E12", "WD2L Figs 4-7, 9", "two-layer classification: the same plus accuracies",
          "05_two_layer"),
]


class ClaimsError(RuntimeError):
    pass


def records(nb: dict) -> list[dict]:
    """The claim records stored in a notebook's outputs, in order."""
    return booktools.mime_records(nb, CLAIM_MIME)


def labels(nb: dict) -> set[str]:
    """MyST targets ``(label)=`` defined in a notebook's Markdown cells."""
    found = set()
    for c in nb["cells"]:
        if c["cell_type"] == "markdown":
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            found |= set(re.findall(r"^\(([A-Za-z0-9_-]+)\)=\s*$", src, flags=re.M))
    return found


def collect(chapters: list[Path] | None = None) -> dict[str, dict]:
    """``{claim id: record}`` for every claim whose chapter exists, checked against the registry
    (raises :class:`ClaimsError` listing every problem)."""
    paths = {p.stem: p for p in (chapters if chapters is not None else booktools.chapter_paths())}
    owner = {c.id: c.chapter for c in REGISTRY}
    got: dict[str, dict] = {}
    problems = []
    for stem, path in paths.items():
        nb = booktools.load(path)
        defined = labels(nb)
        for rec in records(nb):
            cid = rec.get("id")
            if cid not in owner:
                problems.append(f"{path.name}: record for unknown claim {cid!r}")
            elif owner[cid] != stem:
                problems.append(f"{path.name}: records {cid}, which the registry gives to "
                                f"{owner[cid] or 'no chapter'} (tools/claims.py REGISTRY)")
            elif cid in got:
                problems.append(f"{path.name}: two records for {cid}")
            elif not rec.get("subs"):
                problems.append(f"{path.name}: the record for {cid} has no sub-claims (written by "
                                "an old report.claim): re-execute the chapter with "
                                "report.claim(cid, [report.sub(...), ...], where)")
            elif rec.get("verdict") != _rederive(rec):
                problems.append(f"{path.name}: {cid}'s verdict {rec.get('verdict')!r} is not what "
                                f"the rule gives its sub-claims ({_rederive(rec)!r})")
            elif rec.get("where") not in defined:
                problems.append(f"{path.name}: {cid} links to label {rec.get('where')!r}, which "
                                f"no Markdown cell of the chapter defines")
            else:
                got[cid] = {**rec, "chapter": stem}
    for c in REGISTRY:
        if c.chapter in paths and c.id not in got:
            problems.append(f"{c.chapter}.ipynb exists but stores no record for {c.id}: add "
                            f"report.claim({c.id!r}, ...) to its closing section and re-execute it")
    if problems:
        raise ClaimsError("claims page: " + "; ".join(problems))
    return got


def _rederive(rec: dict) -> str:
    """The row verdict that :data:`ROW_RULE` gives the record's sub-claims."""
    try:
        return row_verdict([sub(s["text"], s["verdict"], s["evidence"], central=s["central"])
                            for s in rec["subs"]])
    except (KeyError, TypeError, ValueError) as e:
        return f"invalid sub-claims: {e}"


def _cell(text: str) -> str:
    return text.replace("\n", " ").strip()


def _subs_cell(rec: dict) -> list[str]:
    """The sub-claims as a bullet list inside one list-table cell (central ones marked)."""
    out = []
    for s in rec["subs"]:
        mark = "**central** " if s["central"] else ""
        out.append(f"    - {mark}{_cell(s['text'])}: *{s['verdict']}*. {_cell(s['evidence'])}")
    return out


SUB_MEANING = {
    "reproduced": "a test that could fail (its negative control fails) passed, or the deciding "
                  "comparison is resolved in the claimed direction",
    "not reproduced": "the claimed effect or property is absent at this scale, without a "
                      "resolved contradiction",
    "refuted": "a counterexample, or the deciding comparison is resolved in the opposite "
               "direction",
    "not resolved": "the 95% interval of the deciding difference contains 0; this is not "
                    "\"no effect\"",
    "vacuous": "the check or bound cannot fail here (its negative control passes too, or the "
               "bound exceeds the trivial one)",
    "inapplicable": "the statement's premise does not hold for the runs measured",
}


def legend() -> list[str]:
    """The legend of verdict words and the row rule, as MyST lines."""
    lines = ["**How to read a row.** Each row lists its sub-claims, each with its own verdict "
             "and the numbers that decide it; *central* marks the paper's own measure or "
             "statement. Sub-claim verdicts:", ""]
    lines += [f"- *{v}*: {SUB_MEANING[v]};" for v in SUB_VERDICTS]
    lines[-1] = lines[-1][:-1] + "."
    lines += ["", ROW_RULE, "",
              "Numbers: `a ± b` is the mean ± sample standard deviation of runs (seeds); a "
              "difference is given with its 95% interval, *paired* where the two arms share "
              "seeds (same data draw and initialisation) and *unpaired* otherwise.", ""]
    return lines


def render(got: dict[str, dict]) -> str:
    """The page's MyST source."""
    counts: dict[str, int] = {}
    for c in REGISTRY:
        v = got[c.id]["verdict"] if c.id in got else NO_CHAPTER
        counts[v] = counts.get(v, 0) + 1
    order = list(VERDICTS)
    tally = ", ".join(f"{counts[v]} {v}" for v in order if counts.get(v))
    lines = [
        "(claims-at-a-glance)=",
        "# Claims at a glance",
        "",
        "One row per claim (C1-C11) and experiment (E1-E12) of the four papers, with the book's",
        "verdict, the numbers that decide it and a link to the section that computes them. The",
        "rows are not typed: `tools/claims.py` collects them from the records that the chapters",
        "store when they run (`sgdrank.report.claim`), so they are the verdicts of the committed",
        "outputs (the `book` profile). A verdict is decided by the chapter's code from its",
        "numbers and their seed spread. Rows without a chapter say so.",
        "",
        *legend(),
        f"**Tally:** {tally}.",
        "",
        "```{list-table}",
        ":header-rows: 1",
        ":widths: 5 22 12 53 8",
        "",
        "* - id",
        "  - claim (paper)",
        "  - verdict",
        "  - sub-claims, their verdicts and deciding numbers",
        "  - where",
    ]
    for c in REGISTRY:
        rec = got.get(c.id)
        lines += [f"* - **{c.id}**", f"  - {_cell(c.statement)} ({c.paper})"]
        if rec:
            lines += [f"  - **{rec['verdict']}**", "  - "]
            lines[-1] = "  - " + _subs_cell(rec)[0].lstrip()
            lines += _subs_cell(rec)[1:]
            lines += [f"  - {{ref}}`Ch. {int(rec['chapter'][:2])} <{rec['where']}>`"]
        else:
            why = ("no chapter yet" if c.chapter is None
                   else f"chapter `{c.chapter}` not written yet")
            lines += [f"  - **{NO_CHAPTER}**", f"  - {why}", "  - (no section)"]
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="compare with claims.md instead of writing")
    args = ap.parse_args()
    try:
        text = render(collect())
    except ClaimsError as e:
        print(e, file=sys.stderr)
        return 1
    return booktools.write_or_check(PAGE, text, args.check, "python tools/claims.py (make claims)")


if __name__ == "__main__":
    raise SystemExit(main())
