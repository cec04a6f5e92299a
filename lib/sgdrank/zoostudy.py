"""Chapter 6's analysis of the zoo models (VGG16-BN, RESNET18, VIT of :mod:`sgdrank.zoo`) at
reduced width: the per-layer counts of Chapter 1's bound, a per-sample gradient rank check, the
sweep grid, and per-layer / per-run rank tables at initialisation and at the end of training.

Conventions: a conv filter ``(c_out, c_in, k, k)`` is the ``c_out x c_in k^2`` matrix
(:func:`sgdrank.metrics.as_matrix`); ``N`` is the number of vectors a matrix multiplies in one
sample's forward pass (:func:`sgdrank.gradients.applications`: output positions = patches of a
conv, tokens of a ViT Linear). One sample's gradient (BN in eval mode: no coupling) has rank
``<= min(N, d_out, d_in)`` (Chapter 1, GSGP Lemma 3.1); with BN in training mode every sample's
output depends on the whole batch, so one batch gradient is only bounded by ``min(B N, d_out,
d_in)``. Threshold rank: ``#{i : s_i / ||W||_F > atol}``; stable rank ``||W||_F^2 / ||W||_2^2``.
The weight decay convention is the book's (loss ``L + lam ||theta||^2``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from . import gradients as G
from . import rankstudy, sweep
from .metrics import as_matrix

#: the per-run columns of the configs that identify a setting of the sweep
SETTING = ("model", "lr", "lam", "batch_size")


def layer_counts(model: nn.Module, in_shape: Sequence[int], batch_size: int) -> pd.DataFrame:
    """One row per rank-tracked matrix of ``model`` (forward order): ``layer``, ``shape``
    (``"d_out x d_in"``), ``N`` (vectors it multiplies per sample: patches or tokens),
    ``min_dim`` = ``min(d_out, d_in)`` (for a conv ``min(c_out, c_in k^2)``), ``per_sample``
    = ``min(N, min_dim)`` (the bound on one sample's gradient, BN in eval mode), ``BN`` = ``B N``
    and ``batch`` = ``min(B N, min_dim)`` (the bound on one batch gradient, BN in training mode
    couples the samples), and ``bites``: True where ``B N < min_dim``, i.e. where one step's
    update is rank-deficient. ``in_shape`` is ``(c, h, w)``; the count uses one forward pass of a
    zero batch of two images (the counts do not depend on the values)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = torch.zeros(2, *[int(n) for n in in_shape], dtype=next(model.parameters()).dtype)
    was = model.training
    model.eval()
    try:
        app = G.applications(model, x)
    finally:
        model.train(was)
    rows = []
    for name, mod in model.rank_layers():
        d_out, d_in = as_matrix(mod.weight).shape
        n = int(app[name])
        m = min(d_out, d_in)
        rows.append(dict(layer=name, shape=f"{d_out} x {d_in}", N=n, min_dim=m,
                         per_sample=min(n, m), BN=batch_size * n, batch=min(batch_size * n, m),
                         bites=batch_size * n < m))
    return pd.DataFrame(rows)


def gradient_check(model: nn.Module, x: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """The per-sample gradient rank of every rank-tracked matrix, measured: the model in eval
    mode (BN affine: samples not coupled) and float64, ``d (c . f(x_j)) / dW`` for each sample of
    ``x`` with a fixed random unit ``c`` (seeded by ``seed``), ranks at Chapter 1's relative
    tolerance (:data:`sgdrank.gradients.RANK_RTOL`). One row per layer: ``N``, ``bound`` =
    ``min(N, d_out, d_in)``, ``measured`` (the largest rank over the samples), ``within``
    (measured <= bound) and ``attained`` (measured == bound). The model is left in its mode and
    dtype."""
    was, dtype = model.training, next(model.parameters()).dtype
    m = model.double().eval()
    try:
        x = x.to(torch.float64)
        app = G.applications(m, x)
        k = m(x[:1]).shape[1]
        c = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        grads = G.per_sample_gradients(m, x, direction=c / c.norm())
        measured = G.max_ranks(grads)
        rows = []
        for name, mod in m.rank_layers():
            d_out, d_in = as_matrix(mod.weight).shape
            bound = min(int(app[name]), d_out, d_in)
            r = int(measured[name])
            rows.append(dict(layer=name, N=int(app[name]), bound=bound, measured=r,
                             within=r <= bound, attained=r == bound))
    finally:
        model.to(dtype).train(was)
    return pd.DataFrame(rows)


def grid(base: sweep.Config, *, models: Sequence[str], lams: Sequence[float],
         batch_sizes: Sequence[int], lrs: Sequence[float], seeds: Sequence[int],
         steps: int | None = None, drop_at: Sequence[float] = (), gamma: float = 0.1,
         epochs: Mapping[str, int] | None = None, milestones: Sequence[int] = (),
         control_batch_sizes: Sequence[int] | None = None) -> list[sweep.Config]:
    """The configs of the sweep: every model x lr x B x lam x seed, except that ``lam = 0``
    runs (the controls) are made only for the batch sizes in ``control_batch_sizes`` (None:
    all). Length: ``steps`` SGD steps for every B (:func:`sgdrank.rankstudy.at_steps`, drops
    by ``gamma`` after the fractions ``drop_at``), or, when ``steps`` is None, ``epochs[model]``
    epochs with ``milestones`` (the papers' protocol: equal epochs)."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps (equal steps) and epochs (per model)")
    out = []
    for m in models:
        for lr in lrs:
            for B in batch_sizes:
                for lam in lams:
                    controls = control_batch_sizes
                    if lam == 0 and controls is not None and B not in controls:
                        continue
                    for s in seeds:
                        cfg = sweep.replace(base, model=m, lr=lr, lam=lam, batch_size=B, seed=s)
                        if steps is not None:
                            cfg = rankstudy.at_steps(cfg, steps, drop_at, gamma)
                        else:
                            if m not in epochs:
                                raise ValueError(f"epochs has no entry for model {m!r}")
                            cfg = sweep.replace(cfg, epochs=int(epochs[m]),
                                                lr_milestones=tuple(milestones), lr_gamma=gamma)
                        out.append(cfg)
    return out


def layer_ranks(res: sweep.Result, atols: Sequence[float] = (1e-3, 4e-2)) -> pd.DataFrame:
    """One row per run x rank-tracked layer: the setting (:data:`SETTING`, ``seed``,
    ``run_id``), ``layer``, ``index`` and, for ``when`` in ``init`` (epoch 0) and ``end`` (the
    run's last recorded epoch), the threshold ranks ``rank@<atol>`` and ``stable_rank``, as
    columns ``<metric>_init`` / ``<metric>_end``. Diverged runs (no layer rows at the end) get
    NaN end values."""
    lay = rankstudy.layer_ranks(res.layers, atols)
    cols = [rankstudy.rank_col(a) for a in atols] + ["stable_rank"]
    keys = list(SETTING) + ["seed", "run_id", "layer", "index"]
    if lay.empty:
        return pd.DataFrame(columns=keys + [f"{c}_{w}" for w in ("init", "end") for c in cols])
    init = lay[lay.epoch == 0]
    last_epoch = res.epochs.groupby("run_id").epoch.max()
    end = lay[lay.epoch.to_numpy() == last_epoch.reindex(lay.run_id).to_numpy()]
    out = init[keys + cols].rename(columns={c: f"{c}_init" for c in cols})
    out = out.merge(end[["run_id", "layer"] + cols].rename(columns={c: f"{c}_end" for c in cols}),
                    on=["run_id", "layer"], how="left")
    return out.sort_values(["run_id", "index"]).reset_index(drop=True)


def run_table(res: sweep.Result, atols: Sequence[float] = (1e-3, 4e-2)) -> pd.DataFrame:
    """One row per run: the setting, ``seed``, ``steps`` and ``total_decay`` at the end, the
    layer-averaged threshold ranks and stable rank at init and at the end (columns as in
    :func:`layer_ranks`), ``train_acc`` / ``test_acc`` at the end (eval mode, whole sets) and
    ``diverged``."""
    lr_ = layer_ranks(res, atols)
    metric_cols = [c for c in lr_.columns if c.endswith("_init") or c.endswith("_end")]
    avg = lr_.groupby("run_id")[metric_cols].mean()
    ep = res.epochs.copy()
    if ep.empty:
        return pd.DataFrame()
    ep["total_decay"] = rankstudy.total_decay(ep)
    last = rankstudy.at_epoch(ep, "last").set_index("run_id")
    runs = res.runs.copy()
    runs["run_id"] = range(len(runs))
    runs = runs.set_index("run_id")
    out = pd.DataFrame({k: runs[k] for k in list(SETTING) + ["seed"]})
    out["steps"] = last["step"]
    out["total_decay"] = last["total_decay"]
    out = out.join(avg)
    out["train_acc"] = last["train_acc"]
    out["test_acc"] = last["test_acc"]
    out["diverged"] = runs["diverged_epoch"].notna()
    return out.reset_index()


def short_name(spec: str) -> str:
    """``"VGG16-BN:WIDTH=4"`` -> ``"VGG16-BN"`` (the model part of a zoo spec)."""
    return str(spec).split(":", 1)[0]


def per_layer_means(table: pd.DataFrame, col: str, by: Sequence[str] = SETTING) -> pd.DataFrame:
    """Mean, min and max of ``col`` over seeds, per ``by`` x layer (rows of
    :func:`layer_ranks`), with the layer ``index`` kept for plotting."""
    g = table.groupby(list(by) + ["index", "layer"], sort=True)[col]
    return g.agg(["mean", "min", "max"]).reset_index()


def values(table: pd.DataFrame, col: str, **where) -> list[float]:
    """Finite values of ``col`` where ``column == value`` for every item of ``where`` (floats
    compared with a relative tolerance of 1e-9; see :func:`sgdrank.rankstudy.values`)."""
    vals = rankstudy.values(table, col, **where)
    return [v for v in vals if np.isfinite(v)]
