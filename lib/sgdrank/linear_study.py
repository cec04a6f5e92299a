"""The experiments of Chapter 2 (JANUS E1-E4 and Figs. A.1-A.7) as functions: which runs, on
which data, and the fits the chapter reads. The simulator and the closed forms are in
:mod:`sgdrank.linear`; this module only assembles them, so the chapter's cells stay short."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from . import linear


def equal_rate(X: np.ndarray) -> float:
    """The book's "equal" constant rate for GD and SGD alike: ``0.5 / max_i ||x_i||^2`` (half of
    single-sample SGD's stability limit)."""
    return 0.5 / (np.linalg.norm(X, axis=0) ** 2).max()


def e1_runs(probs: Sequence[linear.Problem], inits, epochs: int, lam: float = 0.01,
            **labels) -> list[linear.Run]:
    """GD and cyclic SGD (B = 1) at both rate rules ("equal": :func:`equal_rate` for both;
    "paper": GD at ``linear.janus_gd_lr``, SGD from there decaying as ``1/sqrt(epoch + 1)``), for
    every data set and every ``(name, scale)`` initialisation in ``inits`` (``W0`` seeded by
    ``100 + data set``, shape ``m x d`` of the data)."""
    out = []
    for s, p in enumerate(probs):
        m, d, _ = p.shape
        eta_eq, eta_0 = equal_rate(p.X), linear.janus_gd_lr(p.X, lam)
        for init, scale in inits:
            W0 = linear.random_init(m, d, scale, seed=100 + s)
            for rule in ("equal", "paper"):
                sgd_lr = eta_eq if rule == "equal" else linear.lr_schedule("inv_sqrt", eta_0,
                                                                           epochs)
                gd_lr = eta_eq if rule == "equal" else eta_0
                lab = dict(init=init, rule=rule, seed=s, **labels)
                out.append(linear.Run(s, W0, lam, gd_lr, scheme="gd",
                                      labels=dict(method="GD", **lab)))
                out.append(linear.Run(s, W0, lam, sgd_lr, scheme="cyclic", B=1,
                                      labels=dict(method="SGD", **lab)))
    return out


E2_READINGS = (("inputs on 2 coordinates", [0, 1]), ("dense inputs", None))


def e2_sparse(seeds: int, lam: float, epochs: int = 200) -> dict[str, linear.Trace]:
    """Fig. A.3 in both readings (``d = 10``, ``N = 5``, ``m = 2``, target on coordinates 0, 1;
    inputs on those two coordinates, or dense): GD and cyclic SGD (B = 1) at both rate rules from
    ``W0`` with scale 0.1, every epoch recorded. Data seeded ``200 + s``, ``W0`` ``300 + s``."""
    out = {}
    for reading, support in E2_READINGS:
        probs = [linear.make_problem(10, 5, 2, seed=200 + s, support=support, relevant=[0, 1])
                 for s in range(seeds)]
        runs = []
        for s, p in enumerate(probs):
            eta_eq, eta_0 = equal_rate(p.X), linear.janus_gd_lr(p.X, lam)
            W0 = linear.random_init(2, 10, 0.1, seed=300 + s)
            for rule in ("equal", "paper"):
                sgd_lr = eta_eq if rule == "equal" else linear.lr_schedule("inv_sqrt", eta_0,
                                                                           epochs)
                runs.append(linear.Run(s, W0, lam, eta_eq if rule == "equal" else eta_0,
                                       scheme="gd", labels=dict(method="GD", rule=rule)))
                runs.append(linear.Run(s, W0, lam, sgd_lr, scheme="cyclic", B=1,
                                       labels=dict(method="SGD", rule=rule)))
        out[reading] = linear.simulate(probs, runs, epochs, record=np.arange(epochs + 1),
                                       progress=False)
    return out


A6_SHAPES = (("as captioned: N = 10, d = 2", (2, 10)), ("swapped: d = 10, N = 2", (10, 2)))
A6_READINGS = (("(a) y_2 = noise", dict(independent_rows=[1])),
               ("(b) y_2 = 0", dict(zero_rows=[1])))


def a6_runs(seeds: int, lam: float, epochs: int = 150) -> dict[tuple[str, str], linear.Trace]:
    """Fig. A.6 as captioned and with ``N``, ``d`` swapped, both readings of "one component does
    not depend on the data": cyclic SGD (B = 1) and GD at the equal rate from ``W0`` with scale
    0.1, every epoch recorded (data seeded ``600 + s``, ``W0`` ``700 + s``)."""
    out = {}
    for shape, (d6, N6) in A6_SHAPES:
        for reading, kw in A6_READINGS:
            probs = [linear.make_problem(d6, N6, 2, seed=600 + s, **kw) for s in range(seeds)]
            runs = []
            for s, p in enumerate(probs):
                eta6, W0 = equal_rate(p.X), linear.random_init(2, d6, 0.1, seed=700 + s)
                runs += [linear.Run(s, W0, lam, eta6, scheme="cyclic", B=1,
                                    labels=dict(method="SGD")),
                         linear.Run(s, W0, lam, eta6, scheme="gd", labels=dict(method="GD"))]
            out[shape, reading] = linear.simulate(probs, runs, epochs,
                                                  record=np.arange(epochs + 1), progress=False)
    return out


def e3_online(etas, lams, noisy, *, d: int, stream: int, seeds: int, sigma: float,
              burn_in: float = 0.2) -> pd.DataFrame:
    """E3 on a stream (:prf:ref:`ch2-prop-online`): one pass of SGD (B = 1, constant rate, zero
    init) over ``seeds`` noiseless streams (seeded ``500 + s``) for every ``(eta, lam)`` of the
    grid, and ``seeds`` noisy streams (``sigma``, seeded ``800 + s``) for the pairs in ``noisy``.
    One row per run: ``eta``, ``lam``, ``noise``, ``stream`` (the seed index), ``teacher_fro2``
    (``||W_*||_F^2``), ``measured`` (mean
    ``||W_t - W_lam||_F^2`` after the first ``burn_in`` of the stream), ``theory``
    (``linear.online_stationary_msd``) and ``rel_err``."""
    probs = [linear.make_problem(d, stream, 1, seed=500 + s) for s in range(seeds)]
    probs += [linear.make_problem(d, stream, 1, seed=800 + s, noise=sigma) for s in range(seeds)]
    runs, refs, rows = [], [], []
    for k, p in enumerate(probs):
        sig = p.info["noise"]
        grid = [(e, lam) for e in etas for lam in lams] if sig == 0 else noisy
        for eta, lam in grid:
            runs.append(linear.Run(k, np.zeros((1, d)), lam, eta, scheme="cyclic", B=1))
            refs.append(p.teacher / (1 + lam))
            tf2 = float((p.teacher ** 2).sum())
            rows.append(dict(eta=eta, lam=lam, noise=sig, stream=k % seeds, teacher_fro2=tf2,
                             theory=linear.online_stationary_msd(eta, lam, d, tf2, sig)))
    out = pd.DataFrame(rows)
    out["measured"] = linear.online_msd(probs, runs, from_step=int(stream * burn_in),
                                        reference=np.stack(refs))
    out["rel_err"] = out.measured / out.theory - 1
    return out


def e3_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Per ``(noise, eta, lam)`` cell: mean measured and theoretical MSD, the mean relative error,
    its standard error over streams (``se``, the cells share the streams) and ``z = rel_err/se``,
    and the root-mean-square deviations."""
    g = runs.groupby(["noise", "eta", "lam"])
    df = g[["measured", "theory", "rel_err"]].mean().reset_index()
    df["se"] = g.rel_err.sem().to_numpy() if runs.stream.nunique() > 1 else np.nan
    df["z"] = df.rel_err / df.se
    df["rms_measured"], df["rms_theory"] = np.sqrt(df.measured), np.sqrt(df.theory)
    return df


def e3_per_stream(runs: pd.DataFrame, theory_col: str = "theory") -> np.ndarray:
    """One number per noiseless stream: the relative error ``measured / theory - 1`` averaged
    over the stream's cells with ``lam > 0``. The cells of one stream share its samples, so the
    streams, not the cells, are the independent replicates of a joint test."""
    on = runs[(runs.noise == 0) & (runs.lam > 0)]
    rel = on.measured / on[theory_col] - 1
    return rel.groupby(on.stream).mean().to_numpy()


def small_eta_msd(eta: float, lam: float, d: int, teacher_fro2: float, noise: float = 0.0,
                  m: int = 1) -> float:
    """The first-order (small ``eta``) version of ``linear.online_stationary_msd``: the bracket's
    ``eta (d + 2 + 2 lam + lam^2)`` dropped. A false statement at finite ``eta``, used as the
    negative control of E3's check."""
    G = 4 * lam**2 * (d + 1) * teacher_fro2 / (1 + lam) ** 2 + 4 * noise**2 * d * m
    return eta * G / (4 * (1 + lam))


@dataclass
class SlopeStudy:
    """E4: the runs of the slope table and their fits (see :func:`e4_slopes`)."""

    Ns: list
    probs: list
    runs: list
    trace: linear.Trace
    fits: list
    table: pd.DataFrame
    W0: np.ndarray


def e4_slopes(grid, *, eta: float, lam: float, d: int, m: int, tau_a: float = 10.0,
              tau_b: float = 30.0) -> SlopeStudy:
    """One GD run per ``N`` and one SGD run per ``(N, B, scheme, drop_last)`` of ``grid``, on
    whitened data on two coordinates with ``y_2 = 0`` (seeded ``40 + N``), from ``W0`` with scale
    0.01 (seed 4), at the constant rate ``eta``. Each run's slope of ``log sigma_min`` per epoch
    is fitted over the gradient-flow window ``tau_a <= tau <= tau_b``; the table lists per SGD run
    the predicted ratio ``S`` (steps per epoch), the measured SGD/GD slope ratio, the paper's
    ``N/B`` and the relative error."""
    Ns = sorted({g[0] for g in grid})
    probs = [linear.make_problem(d, N, m, seed=40 + N, support=[0, 1], relevant=[0, 1],
                                 whiten=True, zero_rows=[1]) for N in Ns]
    W0 = linear.random_init(m, d, 0.01, seed=4)
    runs = [linear.Run(Ns.index(N), W0, lam, eta, scheme="gd",
                       labels=dict(N=N, B=N, scheme="GD")) for N in Ns]
    runs += [linear.Run(Ns.index(N), W0, lam, eta, scheme=s, B=B, drop_last=dl, seed=7,
                        labels=dict(N=N, B=B, scheme=s + (", drop last" if dl else "")))
             for N, B, s, dl in grid]
    E = int(math.ceil(tau_b / eta))
    tr = linear.simulate(probs, runs, E, record=np.arange(E + 1), progress=False)
    smin = tr.svals()[..., -1]
    fits = [linear.fit_log_slope(tr.epochs, smin[:, i],
                                 (tr.tau[:, i] >= tau_a) & (tr.tau[:, i] <= tau_b))
            for i in range(len(runs))]
    gd = {r.labels["N"]: fits[i][0] for i, r in enumerate(runs) if r.scheme == "gd"}
    rows = []
    for i, r in enumerate(runs):
        if r.scheme == "gd":
            continue
        S = linear.steps_per_epoch(r.labels["N"], r.B, r.scheme, r.drop_last)
        rows.append(dict(N=r.labels["N"], B=r.B, scheme=r.labels["scheme"], predicted=S,
                         measured=fits[i][0] / gd[r.labels["N"]],
                         naive_N_over_B=r.labels["N"] / r.B))
    table = pd.DataFrame(rows)
    table["rel_error"] = table.measured / table.predicted - 1
    return SlopeStudy(Ns, probs, runs, tr, fits, table, W0)


def back_computed_rates(paper_slopes: dict, lam: float, base: float = math.e) -> dict:
    """The constant rate each run of Fig. A.7 would have used if its reported slope (per epoch,
    of ``log_base sigma_min``) is the theorem's ``S log(1 - 2 eta lam)``: ``paper_slopes`` maps a
    method to ``(slope, S)``; ``base`` is ``math.e`` (natural log) or ``10``."""
    return {k: (1 - base ** (s / S)) / (2 * lam) for k, (s, S) in paper_slopes.items()}


def conv_rate(ep: np.ndarray, s: np.ndarray) -> float:
    """Slope per epoch of ``log|s_t - s_final|`` over the epochs where the relative distance is
    between 1e-11 and 1e-3 (nan with fewer than 3 such epochs)."""
    dev = np.abs(s - s[-1]) / abs(s[-1])
    keep = (dev > 1e-11) & (dev < 1e-3) & (ep < ep[-1])
    return linear.fit_log_slope(ep[keep], dev[keep])[0] if keep.sum() >= 3 else float("nan")


def span_smax(tr: linear.Trace, i: int) -> np.ndarray:
    """``sigma_max(W_t Q)`` at every recorded epoch of run ``i``: the largest singular value of
    the data-span part of ``W`` (``Q`` an orthonormal basis of ``span(X)``), free of the
    null-space part that ``sigma_max(W)`` couples in at order ``gamma^2``."""
    Q = linear.span_bases(tr.problems[tr.runs[i].data].X)[0]
    return np.linalg.norm(tr.W[:, i] @ Q, ord=2, axis=(1, 2))


def a7_fits(problems, spec, *, W0: np.ndarray, lam: float, epochs: int,
            fit_from: int) -> tuple[linear.Trace, pd.DataFrame]:
    """Fig. A.7's runs: ``spec`` lists ``(name, data index, lr, scheme)`` (B = 1). Fits the slope
    of ``log sigma_min`` per epoch over ``epochs >= fit_from`` (one window for all runs, as the
    paper), with the closed-form slope of the null-space factor (``predicted``) and the rate per
    epoch at which the data-span part ``sigma_max(W Q)`` approaches its own final value
    (``smax_rate``, :func:`span_smax`, :func:`conv_rate`). Returns the trace and the fits."""
    runs = [linear.Run(k, W0, lam, lr, scheme=sc, B=1, labels=dict(name=name))
            for name, k, lr, sc in spec]
    tr = linear.simulate(problems, runs, epochs, record=np.arange(epochs + 1), progress=False)
    sv = tr.svals()
    win = tr.epochs >= fit_from
    fits = {}
    for i, r in enumerate(runs):
        s, a, r2 = linear.fit_log_slope(tr.epochs, sv[:, i, -1], win)
        pred = linear.fit_log_slope(tr.epochs, tr.gamma[:, i], win)[0]
        fits[r.labels["name"]] = dict(slope=s, intercept=a, R2=r2, predicted=pred,
                                      smax_rate=conv_rate(tr.epochs, span_smax(tr, i)))
    return tr, pd.DataFrame(fits).T


def e1_decomposition(tr: linear.Trace, arms: dict, lam: float) -> list[dict]:
    """Rows for :func:`sgdrank.decomposition.show`: for each arm (``name -> run indices``, one per
    seed) the split ``W_T = c_T W_0 + DeltaW_T`` at the last recorded epoch, with ``c_T =
    gamma_T`` (the simulator's exact product of the per-step factors ``1 - 2 eta_t lam``), the
    total decay ``D = -ln c_T``, the budget ``D*`` at ``eps = 1e-3`` and the threshold ranks
    (1e-3) and stable ranks of ``W_T``, ``W_0`` and ``DeltaW_T``; means over the seeds. ``fit``
    is the training MSE. ``lam`` is the arm's weight decay (a dict ``name -> lam`` or a float)."""
    import torch

    from . import decomposition

    mse = tr.mse()[-1]
    rows = []
    for name, idx in arms.items():
        ps = [decomposition.parts(torch.as_tensor(tr.W[-1, i]), torch.as_tensor(tr.runs[i].W0),
                                  float(tr.gamma[-1, i])) for i in idx]
        mean = lambda k: float(np.mean([p[k] for p in ps]))  # noqa: E731
        D = float(np.mean([-math.log(tr.gamma[-1, i]) for i in idx]))
        rows.append(dict(arm=name, lam=lam[name] if isinstance(lam, dict) else lam, D=D,
                         Dstar=mean("Dstar@0.001"), fit=f"MSE {np.mean(mse[idx]):.3g}",
                         rank_W=mean("W_rank@0.001"), rank_W0=mean("W0_rank@0.001"),
                         rank_dW=mean("dW_rank@0.001"), srank_W=mean("W_srank"),
                         srank_W0=mean("W0_srank"), srank_dW=mean("dW_srank")))
    return rows
