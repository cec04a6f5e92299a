"""Figure helpers of Chapter 2 (linear regression): panels that the chapter draws more than
once or that would otherwise fill its cells with matplotlib. Everything takes arrays from
:class:`sgdrank.linear.Trace` and draws onto given axes; axes are labelled with units."""

from __future__ import annotations

import numpy as np

from . import plotting


def sv_panel(ax, epochs, sv, idx_sgd: int, idx_gd: int, title: str, floor: float = 1e-12) -> None:
    """All singular values of ``W`` against epochs (log-log) for one SGD run (solid) and one GD
    run (dashed); the smallest one drawn thicker. ``sv`` is ``(T, R, k)``."""
    ep = epochs[1:]
    c = plotting.colors(2)
    k_min = sv.shape[-1] - 1
    for idx, col, ls, name in ((idx_sgd, c[0], "-", "SGD"), (idx_gd, c[1], "--", "GD")):
        for k in range(sv.shape[-1]):
            ax.plot(
                ep,
                sv[1:, idx, k],
                ls=ls,
                color=col,
                lw=2.2 if k == k_min else 0.8,
                alpha=1 if k == k_min else 0.6,
                label=name if k == k_min else None,
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="epoch (log scale)",
        ylabel="singular value of $W$ (log scale)",
        title=title,
    )
    ax.set_ylim(floor, 10)
    ax.legend(loc="lower left")


RUN_KINDS = (("SGD", "equal"), ("GD", "equal"), ("SGD", "paper"), ("GD", "paper"))


def null_space_panels(ax_epoch, ax_tau, tr, rel, lam: float) -> None:
    """Left: geometric mean over seeds of ``||W_perp|| / ||W0_perp||`` against epochs, with the
    closed form ``gamma_t`` (black dashes, on top). Right: every random-init run against
    gradient-flow time ``tau``, with ``exp(-2 lam tau)``."""
    c = plotting.colors(4)
    rand = tr.select(init="random")
    for k, (meth, rule) in enumerate(RUN_KINDS):
        idx = tr.select(method=meth, rule=rule, init="random")
        name = f"{meth}, rates: {rule}"
        gm = np.exp(np.log(rel[1:, idx]).mean(axis=1))
        ax_epoch.plot(tr.epochs[1:], gm, color=c[k], lw=3.0, alpha=0.55, label=name)
        ax_epoch.plot(
            tr.epochs[1:],
            np.exp(np.log(tr.gamma[1:, idx]).mean(axis=1)),
            "--",
            color="k",
            lw=1.0,
            label="closed form $\\gamma_t$" if k == 0 else None,
        )
        for j, i in enumerate(idx):
            ax_tau.plot(
                tr.tau[:, i],
                rel[:, i],
                color=c[k],
                lw=0.8,
                alpha=0.7,
                label=name if j == 0 else None,
            )
    tt = np.linspace(0, tr.tau[:, rand].max(), 200)
    ax_tau.plot(tt, np.exp(-2 * lam * tt), "--", color="k", lw=1.2, label=r"$e^{-2\lambda\tau}$")
    ylab = r"$\|W_\perp\| / \|W_{0,\perp}\|$ (log scale)"
    ax_epoch.set(
        xscale="log",
        yscale="log",
        ylim=(1e-16, 2),
        xlabel="epoch (log scale)",
        ylabel=ylab,
        title="against epochs (geometric mean over seeds)",
    )
    ax_tau.set(
        yscale="log",
        ylim=(1e-16, 2),
        xlabel=r"gradient-flow time $\tau=\sum_t \eta_t$",
        ylabel=ylab,
        title="against gradient-flow time (every run)",
    )
    ax_epoch.legend(loc="lower left")
    ax_tau.legend(loc="lower left")


def decomposition_lines(ax, epochs, span_part, null_part, name: str, color) -> None:
    """Data-span (solid) and null-space (dashed) parts of ``W_random - W_zero``."""
    ax.plot(epochs[1:], span_part[1:], color=color, label=f"{name}: data-span part")
    ax.plot(epochs[1:], null_part[1:], "--", color=color, label=f"{name}: null-space part")


def by_method(ax, x, values: dict, *, ls=None, **kw) -> None:
    """One line per key of ``values`` (``{label: y}``), colours in order."""
    c = plotting.colors(len(values))
    for k, (label, y) in enumerate(values.items()):
        ax.plot(x, y, color=c[k], ls=(ls or ["-", "--", "-", "--"])[k % 4], label=label, **kw)


def e3_panels(axes, tr_show, p_show, show, df_online, cyc_df, etas, c_etas, c_lams, d) -> None:
    """Chapter 2's E3 figure: (a) one stream's deviation ``||W_t - W_lam||`` step by step, with
    the stationary RMS of the online proposition; (b) online RMS against lambda, one line per eta;
    (c) the cyclic limit cycle's RMS spread against eta, one line per lambda."""
    import math

    from . import linear

    ax = axes[0]
    c3 = plotting.colors(len(show))
    steps = np.arange(1, tr_show.step_W.shape[0] + 1)
    for k, (e, l) in enumerate(show):
        dev = np.linalg.norm(tr_show.step_W[:, k] - p_show.teacher / (1 + l), axis=(1, 2))
        ax.plot(steps, dev, lw=0.6, color=c3[k], label=f"eta = {e}, lambda = {l}")
        if l > 0:
            rms = math.sqrt(linear.online_stationary_msd(e, l, d, (p_show.teacher**2).sum()))
            ax.axhline(rms, color="k", ls=":", lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        ylim=(1e-8, 3),
        xlabel="step = sample of the stream (log scale)",
        ylabel=r"$\|W_t - W_\lambda\|_F$ (log scale)",
        title="(a) one stream; dotted: theory",
    )
    ax.legend(loc="lower left")
    ax = axes[1]
    c4 = plotting.colors(len(etas))
    for k, eta in enumerate(etas):
        sub = df_online[(df_online.eta == eta) & (df_online.lam > 0)]
        ax.plot(sub.lam, sub.rms_theory, color=c4[k], lw=1)
        ax.plot(sub.lam, sub.rms_measured, "o", color=c4[k], label=f"eta = {eta}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=r"$\lambda$ (log scale)",
        ylabel=r"RMS of $\|W_t - W_\lambda\|_F$ (log scale)",
        title="(b) online: o measured, lines theory",
    )
    ax.legend(loc="upper left")
    ax = axes[2]
    c4 = plotting.colors(len(c_lams))
    for k, l in enumerate(c_lams):
        sub = cyc_df[cyc_df.lam == l]
        ax.plot(sub.eta, sub.first_order, color=c4[k], lw=1)
        ax.plot(sub.eta, sub.rms, "s", color=c4[k], label=f"lambda = {l}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=r"$\eta$ (log scale)",
        ylabel="RMS spread within the cycle (log scale)",
        title=r"(c) cyclic: squares measured, lines $\eta\,c(\lambda)$",
    )
    ax.set_xticks(c_etas, [str(e) for e in c_etas], minor=False)
    ax.minorticks_off()
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
