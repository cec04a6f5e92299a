"""The book's one plot style and a few figure helpers."""
from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import seaborn as sns

PALETTE = "colorblind"


def use_style() -> None:
    """Apply the book's style: seaborn whitegrid, colour-blind palette, readable sizes."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


def subplots(nrows: int = 1, ncols: int = 1, *, width: float = 4.2, height: float = 3.4, **kw):
    """``plt.subplots`` with panel size in inches and constrained layout."""
    kw.setdefault("constrained_layout", True)
    kw.setdefault("squeeze", False)
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), **kw)


def colors(n: int):
    """``n`` colours of the book's palette."""
    return sns.color_palette(PALETTE, n)


def lines_by(ax, df, x: str, y: str, hue: str, *, label: str = "{}", band: bool = True,
             palette=None, **kw):
    """One line per value of ``hue``: the mean of ``y`` over the remaining rows (e.g. seeds) at
    each ``x``, with a min-max band when there are several. ``label`` formats the hue value."""
    values = sorted(df[hue].unique(), key=lambda v: (v is None, v))
    cols = palette or colors(len(values))
    for v, c in zip(values, cols):
        g = df[df[hue] == v].groupby(x)[y]
        mean, lo, hi = g.mean(), g.min(), g.max()
        ax.plot(mean.index, mean.values, color=c, label=label.format(v), **kw)
        if band and (g.size() > 1).any():
            ax.fill_between(mean.index, lo.values, hi.values, color=c, alpha=0.18, lw=0)
    return ax
