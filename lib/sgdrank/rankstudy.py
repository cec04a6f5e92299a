"""Chapter 3's analysis of rank sweeps: runs compared at equal SGD steps, the total weight decay
a run has applied, threshold and stable ranks of every recorded epoch in one vectorised pass, and
per-group summaries over seeds.

Conventions (the book's, :mod:`sgdrank.conventions`): the loss is ``L + lam ||theta||^2``, so one
SGD step with learning rate ``mu`` multiplies every weight by ``1 - 2 mu lam``. After ``t`` steps
at a schedule ``mu_1, ..., mu_t`` a component that no gradient touches has been multiplied by
``prod_s (1 - 2 mu_s lam) ~ exp(-D)`` with the *total decay* ``D = sum_s 2 mu_s lam`` (which
:func:`total_decay` computes per epoch). Threshold rank: ``#{i : s_i / ||W||_F > atol}``
(the authors' rule, :func:`sgdrank.metrics.threshold_rank`); stable rank ``||W||_F^2 / ||W||_2^2``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from . import sweep


def at_steps(cfg: sweep.Config, steps: int, drop_at: Sequence[float] = (),
             gamma: float = 0.1) -> sweep.Config:
    """``cfg`` trained for (at least) ``steps`` SGD steps, whatever its batch size: ``epochs`` =
    ``ceil(steps / (n_train // B))``, and learning-rate drops by ``gamma`` after the fractions
    ``drop_at`` of those epochs (``MultiStepLR`` milestones, rounded to whole epochs).

    Equal steps means equally many decay factors ``1 - 2 mu lam``; at equal epochs a run with
    batch ``B`` takes ``n / B`` steps per epoch."""
    if cfg.n_train is None:
        raise ValueError("at_steps needs cfg.n_train (the number of training samples) to count "
                         "steps")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if any(not 0 < f < 1 for f in drop_at):
        raise ValueError(f"drop_at are fractions of the run in (0, 1), got {tuple(drop_at)}")
    spe = sweep.steps_per_epoch(cfg.n_train, cfg.batch_size, cfg.drop_last)
    if spe < 1:
        raise ValueError(f"batch size {cfg.batch_size} exceeds n_train={cfg.n_train}")
    epochs = math.ceil(steps / spe)
    milestones = tuple(sorted({max(1, int(round(f * epochs))) for f in drop_at}))
    return sweep.replace(cfg, epochs=epochs, lr_milestones=milestones, lr_gamma=gamma)


def at_steps_all(cfgs: Sequence[sweep.Config], steps: int, drop_at: Sequence[float] = (),
                 gamma: float = 0.1) -> list[sweep.Config]:
    """:func:`at_steps` of every config in ``cfgs`` (same step count and schedule)."""
    return [at_steps(c, steps, drop_at, gamma) for c in cfgs]


def total_decay(epochs: pd.DataFrame) -> pd.Series:
    """Total decay ``D = sum over the steps so far of 2 mu_s lam`` at every row of a
    :attr:`sweep.Result.epochs` table (0 at epoch 0), from each row's config (``lr``,
    ``lr_milestones``, ``lr_gamma``, ``lam``, ``n_train``, ``batch_size``, ``drop_last``).
    ``exp(-D)`` is what is left of a weight component that no gradient has touched."""
    need = {"run_id", "epoch", "lr", "lam", "lr_milestones", "lr_gamma", "n_train", "batch_size",
            "drop_last"}
    missing = sorted(need - set(epochs.columns))
    if missing:
        raise ValueError(f"total_decay needs the columns of sweep.Result.epochs; missing {missing}")
    out = pd.Series(0.0, index=epochs.index, name="total_decay")
    for _, g in epochs.groupby("run_id", sort=False):
        r = g.iloc[0]
        cfg = sweep.Config(lr=r.lr, lam=r.lam, lr_milestones=tuple(r.lr_milestones),
                           lr_gamma=r.lr_gamma)
        spe = sweep.steps_per_epoch(int(r.n_train), int(r.batch_size), bool(r.drop_last))
        emax = int(g.epoch.max())
        per_epoch = np.array([0.0] + [2.0 * cfg.lr_at(e) * cfg.lam * spe
                                      for e in range(1, emax + 1)])
        cum = np.cumsum(per_epoch)
        out.loc[g.index] = cum[g.epoch.to_numpy(dtype=int)]
    return out


def _sv_matrix(sv: Sequence[np.ndarray]) -> np.ndarray:
    """Singular-value vectors of possibly different lengths as one zero-padded matrix."""
    width = max((len(s) for s in sv), default=0)
    m = np.zeros((len(sv), width))
    for i, s in enumerate(sv):
        m[i, :len(s)] = s
    return m


def layer_ranks(layers: pd.DataFrame, atols: Sequence[float] = (1e-3, 1e-2)) -> pd.DataFrame:
    """The threshold rank at every tolerance in ``atols`` (columns ``rank@<atol>``) of every row
    of a :attr:`sweep.Result.layers` table, computed from its stored singular values in one
    vectorised pass (the same rule as :func:`sgdrank.metrics.threshold_rank`; a zero matrix has
    rank 0). Returns ``layers`` without ``sv`` plus those columns."""
    if "sv" not in layers.columns:
        raise ValueError("layer_ranks needs the 'sv' column of sweep.Result.layers")
    s = _sv_matrix(list(layers["sv"]))
    fro = np.sqrt((s ** 2).sum(axis=1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(fro > 0, s / np.where(fro > 0, fro, 1.0), 0.0)
    out = layers.drop(columns=["sv"]).copy()
    for a in atols:
        out[rank_col(a)] = (rel > a).sum(axis=1).astype(int)
    return out


def rank_col(atol: float) -> str:
    """Column name of the threshold rank at tolerance ``atol``: ``rank@0.001``."""
    return f"rank@{atol:g}"


def run_ranks(res: sweep.Result, atols: Sequence[float] = (1e-3, 1e-2)) -> pd.DataFrame:
    """One row per run x recorded epoch: the epoch table of ``res`` plus ``total_decay`` and the
    layer-averaged threshold ranks at ``atols`` (``rank@<atol>``); ``avg_stable_rank`` is the
    layer-averaged stable rank. Diverged epochs (no layer rows) get NaN ranks."""
    ep = res.epochs.copy()
    ep["total_decay"] = total_decay(ep)
    lr = layer_ranks(res.layers, atols)
    cols = [rank_col(a) for a in atols]
    mean = lr.groupby(["run_id", "epoch"])[cols].mean().reset_index()
    return ep.merge(mean, on=["run_id", "epoch"], how="left")


def at_epoch(table: pd.DataFrame, epoch: int | str = "last") -> pd.DataFrame:
    """The rows of a per-run x epoch table at one epoch per run: a number, ``"last"`` (each run's
    final epoch) or ``"init"`` (epoch 0)."""
    if epoch == "last":
        idx = table.groupby("run_id").epoch.transform("max") == table.epoch
        return table[idx]
    if epoch == "init":
        epoch = 0
    return table[table.epoch == int(epoch)]


def at_step(table: pd.DataFrame, step: int) -> pd.DataFrame:
    """For each run, the row of the last recorded epoch whose ``step`` is at most ``step``
    (metrics are recorded once per epoch, so this is the state after ``<= step`` SGD steps)."""
    sub = table[table.step <= step]
    idx = sub.groupby("run_id").step.idxmax()
    return sub.loc[idx.values]


def summarize(table: pd.DataFrame, by: Sequence[str], cols: Sequence[str],
              sig: int = 3) -> pd.DataFrame:
    """One row per group of ``by``: each column of ``cols`` as ``mean ± sd`` over the group's
    runs (:func:`sgdrank.report.spread`; sample standard deviation), and ``runs``, the count."""
    from . import report

    missing = [c for c in list(by) + list(cols) if c not in table.columns]
    if missing:
        raise ValueError(f"summarize: columns {missing} are not in the table")
    rows = []
    for key, g in table.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for c in cols:
            s = report.spread(g[c])
            row[c] = (report.num(s.mean, sig) if s.n == 1 else
                      f"{report.num(s.mean, sig)} ± {report.num(s.sd, 2)}") if s.n else "n/a"
        row["runs"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def values(table: pd.DataFrame, col: str, **where) -> list[float]:
    """The values of ``col`` in the rows where every ``column == value`` of ``where`` holds
    (floats compared with a relative tolerance of 1e-9)."""
    mask = np.ones(len(table), dtype=bool)
    for k, v in where.items():
        if k not in table.columns:
            raise ValueError(f"values: no column {k!r}")
        colv = table[k].to_numpy()
        if isinstance(v, float):
            mask &= np.isclose(colv.astype(float), v, rtol=1e-9, atol=0.0)
        else:
            mask &= colv == v
    return [float(x) for x in table.loc[mask, col]]


def seeded(table: pd.DataFrame, col: str, **where) -> list[float]:
    """Like :func:`values`, ordered by ``seed``: one value per seed, so that two arms that share
    seeds line up for :func:`sgdrank.report.paired`. Raises if a seed occurs twice."""
    mask = np.ones(len(table), dtype=bool)
    for k, v in where.items():
        colv = table[k].to_numpy()
        mask &= (np.isclose(colv.astype(float), v, rtol=1e-9, atol=0.0) if isinstance(v, float)
                 else colv == v)
    sub = table.loc[mask].sort_values("seed")
    if sub.seed.duplicated().any():
        raise ValueError(f"seeded: several rows per seed for {where}; narrow the selection")
    return [float(x) for x in sub[col]]


def decomposed(res, run_ids: Sequence[int], eps: Sequence[float] = (1e-3, 1e-2)) -> pd.DataFrame:
    """:func:`sgdrank.decomposition.run_parts` of the runs ``run_ids`` (one row per run x
    rank-tracked matrix: ``W_T = c_T W_0 + DeltaW_T``, threshold and stable ranks of ``W``,
    ``W0``, ``dW``, ``D``, the budgets ``Dstar@eps`` and the decay-only ranks ``decay_rank@eps``,
    the number of singular values of ``c_T W_0`` above ``eps ||W_T||_F``) with ``model``,
    ``lam``, ``lr``, ``batch_size`` and ``seed`` of each run. ``eps``: the chapter's two
    tolerances."""
    from . import decomposition

    rows, init_spectra = [], {}   # runs of one initialisation share W_0's spectrum
    for rid in run_ids:
        cfg = res.configs[rid]
        for r in decomposition.run_parts(res, rid, eps, init_spectra):
            rows.append({"model": cfg.model, "lam": cfg.lam, "lr": cfg.lr,
                         "batch_size": cfg.batch_size, "seed": cfg.seed, **r})
    return pd.DataFrame(rows)


def per_run(dec: pd.DataFrame) -> pd.DataFrame:
    """:func:`decomposed`'s table averaged over the matrices of each run (one row per run);
    ``Dstar@...`` columns take the *smallest* budget over the matrices (the first that can
    move)."""
    keys = ["run_id", "model", "lam", "lr", "batch_size", "seed"]
    num = [c for c in dec.columns if c not in keys + ["layer", "index"]
           and pd.api.types.is_numeric_dtype(dec[c])]
    agg = {c: ("min" if c.startswith("Dstar") else "mean") for c in num}
    return dec.groupby(keys, as_index=False).agg(agg)


def relative_layers(layers: pd.DataFrame, arch: str, lam: float, col: str,
                    lam0: float = 0.0, **where) -> np.ndarray:
    """Per seed (rows, by seed) and layer (columns, input to output): the final value of ``col``
    at ``lam`` divided by the same seed's and layer's value at ``lam0`` (each layer against its
    own control). ``layers`` has one row per run x layer (``model``, ``lam``, ``seed``,
    ``index``)."""
    def grid(lv):
        sub = layers[(layers.model == arch) & np.isclose(layers.lam, lv)]
        for k, v in where.items():
            sub = sub[np.isclose(sub[k].astype(float), v)]
        return sub.pivot_table(index="seed", columns="index", values=col)

    a, b = grid(lam), grid(lam0)
    seeds = sorted(set(a.index) & set(b.index))
    return (a.loc[seeds] / b.loc[seeds]).to_numpy(float)


def seed_rhos(table: pd.DataFrame, x: str, y: str, by: str = "seed") -> list[float]:
    """Spearman's rho of ``x`` and ``y`` within each group of ``by`` (a seed: the runs that
    share one initialisation and data order), for the groups with at least 3 runs and
    non-constant values; ordered by the group key. The seeds, not the runs, are then the
    independent units (runs of one seed share their initialisation)."""
    out = []
    for _, g in table.groupby(by, sort=True):
        if len(g) < 3:
            continue
        r = g[x].rank().corr(g[y].rank())
        if np.isfinite(r):
            out.append(float(r))
    return out


def is_close(c) -> bool:
    """Whether a comparison's verdict is near its threshold: :attr:`sgdrank.report.Paired.close`
    for a paired comparison; for an unpaired one (``lo``, ``hi``) the same rule -- the interval
    end nearest 0 lies within a quarter of the interval's half-width of 0."""
    if hasattr(c, "close"):
        return bool(c.close)
    lo, hi = float(getattr(c, "lo", math.nan)), float(getattr(c, "hi", math.nan))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    return min(abs(lo), abs(hi)) < 0.25 * (hi - lo) / 2


def close_names(named: dict) -> list[str]:
    """The names (keys) of the comparisons in ``named`` whose verdict is close
    (:func:`is_close`), in the order given."""
    return [k for k, c in named.items() if c is not None and is_close(c)]


#: the parts of Chapter 3's plan, in the order the chapter trains them
PARTS = ("head", "B", "mu", "res", "gd", "e8")


def sweeps(P) -> dict[str, list[sweep.Config]]:
    """Every sweep of Chapter 3, built from its settings ``P`` (the chapter's profile table):
    ``head`` (the headline: ``lams`` x ``seeds`` at ``b_main``), ``B`` (the other batch sizes at
    ``lam`` 0 and ``lam_B``), ``mu`` (``pair_lrs`` x ``mu_Bs`` at fixed ``mulam``, each with its
    ``lam = 0`` twin), ``res`` (the residual net at 0 and ``res_lam``), ``gd`` (large / full
    batch at ``lam = 0``, ``gd_steps`` steps at constant ``lr_main``, recorded every ``gd_every``
    epochs) and ``e8`` (more seeds of the headline at 0 and ``max(lams)``). Every run takes
    ``steps`` SGD steps (:func:`at_steps`, drops ``gamma`` after the fractions ``drop_at``)
    except ``gd``. Parts may share runs (the chapter selects each part's runs from one sweep);
    :func:`plan` trains each once. ``P.spectra`` and ``P.svd_dtype`` (when set) choose the
    recording (:class:`sgdrank.runconfig.Config`)."""
    rec = {k: P[k] for k in ("spectra", "svd_dtype") if k in P}
    base = sweep.Config(model=P["mlp_bn"], dataset=P["dataset"], n_train=P["n_train"],
                        n_test=P["n_test"], batch_size=P["b_main"], lr=P["lr_main"], lam=0.0,
                        **rec)

    def steps(cfgs, n=P["steps"], drops=P["drop_at"]):
        return at_steps_all(cfgs, n, drops, P["gamma"])

    seeds = P["seeds"]
    mu = [c for lr in P["pair_lrs"] for b in P["mu_Bs"]
          for lam in (round(P["mulam"] / lr, 12), 0.0)
          for c in sweep.grid(sweep.replace(base, lr=lr, batch_size=b, lam=lam), seed=seeds)]
    big = sweep.replace(base, batch_size=min(P["big_B"], P["n_train"]))
    return {
        "head": steps(sweep.grid(base, lam=P["lams"], seed=seeds)),
        "B": steps(sweep.grid(base, batch_size=[b for b in P["batch_sizes"] if b != P["b_main"]],
                              lam=[0.0, P["lam_B"]], seed=seeds)),
        "mu": steps(mu),
        "res": steps(sweep.grid(sweep.replace(base, model=P["res"], lr=P["res_lr"]),
                                lam=[0.0, P["res_lam"]], seed=seeds)),
        "gd": [sweep.replace(c, record_every=P["gd_every"])
               for c in steps(sweep.grid(big, seed=seeds), P["gd_steps"], ())],
        "e8": steps(sweep.grid(base, lam=[0.0, max(P["lams"])], seed=P["e8_seeds"])),
    }


def plan(P) -> dict[str, list[sweep.Config]]:
    """What Chapter 3 trains in profile ``P``: :func:`sweeps` with each run in the first part
    that names it only (so the parts add up to the runs trained, in the chapter's order). The
    input of :func:`sgdrank.cost.show_profiles` and of the chapter's one ``dispatch.run``."""
    seen: set = set()
    out = {}
    for part, cfgs in sweeps(P).items():
        out[part] = [c for c in dict.fromkeys(cfgs) if not (c in seen or seen.add(c))]
    return out


def final_decay(cfg: sweep.Config) -> float:
    """The total decay ``D = sum_t 2 mu_t lam`` a run of ``cfg`` has applied at its end (its
    schedule, ``n_train // B`` steps per epoch): ``exp(-D)`` is what is left of a weight
    component that no gradient touches."""
    spe = sweep.steps_per_epoch(cfg.n_train, cfg.batch_size, cfg.drop_last)
    return sum(2.0 * cfg.lr_at(e) * cfg.lam * spe for e in range(1, cfg.epochs + 1))
