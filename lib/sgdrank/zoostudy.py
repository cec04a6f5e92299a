"""Chapter 6's analysis of the zoo models (VGG16-BN, RESNET18, VIT of :mod:`sgdrank.zoo`), at
reduced width (book) or full width (gpu, paper): the per-layer counts of Chapter 1's bound, a
per-sample gradient rank check, the sweep grid and the chapter's plan (:func:`plan`: every
training of a profile), and per-layer / per-run rank tables at initialisation and at the end of
training.

Conventions: a conv filter ``(c_out, c_in, k, k)`` is the ``c_out x c_in k^2`` matrix
(:func:`sgdrank.metrics.as_matrix`); ``N`` is the number of vectors a matrix multiplies in one
sample's forward pass (:func:`sgdrank.gradients.applications`: output positions = patches of a
conv, tokens of a ViT Linear). One sample's gradient (BN in eval mode: no coupling) has rank
``<= min(N, d_out, d_in)`` (Chapter 1, GSGP Lemma 3.1); one batch gradient is a sum of outer
products over all ``B N`` patch or token vectors of the batch, with or without BN, so its rank is
``<= min(B N, d_out, d_in)``, and ``<= B N - 1`` where a BN in training mode follows the matrix
(it removes the batch mean, so the ``B N`` output gradients sum to zero). Threshold rank:
``#{i : s_i / ||W||_F > atol}``; stable rank ``||W||_F^2 / ||W||_2^2``.
The weight decay convention is the book's (loss ``L + lam ||theta||^2``).
"""
from __future__ import annotations

import math
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
#: the book's reduced widths of the zoo models (used where a profile sets ``reduced``)
REDUCED = {"VGG16-BN": "VGG16-BN:width=4", "RESNET18": "RESNET18:width=4",
           "VIT": "VIT:dim=32,depth=2,heads=4,mlp=64,patch=7"}
#: the recording settings a profile may set (:class:`sgdrank.runconfig.Config` fields);
#: a profile without them records as the defaults do (every epoch, every spectrum, float64)
RECORDING = ("eval_train", "record_every", "spectra", "svd_dtype")


def layer_counts(model: nn.Module, in_shape: Sequence[int], batch_size: int) -> pd.DataFrame:
    """One row per rank-tracked matrix of ``model`` (forward order): ``layer``, ``shape``
    (``"d_out x d_in"``), ``N`` (vectors it multiplies per sample: patches or tokens),
    ``min_dim`` = ``min(d_out, d_in)`` (for a conv ``min(c_out, c_in k^2)``), ``per_sample``
    = ``min(N, min_dim)`` (the bound on one sample's gradient, BN in eval mode), ``BN`` = ``B N``
    and ``batch`` = ``min(B N, min_dim)`` (the bound on one batch gradient, BN in training mode
    couples the samples), and ``bites``: True where ``B N < min_dim``, i.e. where one step's
    update is rank-deficient; ``bites_bn``: the same with Chapter 1's refinement ``B N - 1``
    where a BatchNorm follows the matrix (:func:`batch_gradient_check`). ``in_shape`` is
    ``(c, h, w)``; the count uses one forward pass of a
    zero batch of two images (the counts do not depend on the values)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = torch.zeros(2, *[int(n) for n in in_shape], dtype=next(model.parameters()).dtype)
    was = model.training
    model.eval()
    try:
        app = G.applications(model, x)
        follows = _bn_follows(model, x)
    finally:
        model.train(was)
    rows = []
    for name, mod in model.rank_layers():
        d_out, d_in = as_matrix(mod.weight).shape
        n = int(app[name])
        m = min(d_out, d_in)
        bn = batch_size * n - int(follows[name])
        rows.append(dict(layer=name, shape=f"{d_out} x {d_in}", N=n, min_dim=m,
                         per_sample=min(n, m), BN=batch_size * n, batch=min(batch_size * n, m),
                         bites=batch_size * n < m, bites_bn=bn < m))
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


def _bn_follows(model: nn.Module, x: torch.Tensor) -> dict[str, bool]:
    """For every rank-tracked matrix: True when its output is the input of a BatchNorm (the
    tensor itself, as in conv -> BN -> ReLU)."""
    outs, follows, hooks = {}, {}, []
    for name, mod in model.rank_layers():
        hooks.append(mod.register_forward_hook(
            lambda m, i, o, n=name: outs.__setitem__(id(o), n)))
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, i: follows.__setitem__(outs.get(id(i[0])), True)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: bool(follows.get(n, False)) for n, _ in model.rank_layers()}


def batch_gradient_check(model: nn.Module, x: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """The rank of one mini-batch gradient, measured in training mode (BatchNorm uses the batch
    statistics and couples the samples), float64: ``d (sum_j c . f(x_j)) / dW`` for a fixed
    random unit ``c``. Bound: ``min(B N, d_out, d_in)`` (every one of the ``B N`` patch or
    token vectors of the batch contributes one outer product, with or without BN), refined to
    ``B N - 1`` where a BatchNorm follows the matrix (BN removes the batch mean of its input, so
    the ``B N`` output gradients sum to zero over the batch and positions, Chapter 1). One row
    per layer: ``N``, ``BN`` = ``B N``, ``bn`` (a BatchNorm follows), ``bound``, ``measured``,
    ``within``, ``attained`` and ``tight_fails`` (a bound one smaller would be violated). The
    model is left in its mode and dtype; its BN running statistics are restored."""
    was, dtype = model.training, next(model.parameters()).dtype
    state = {k: v.clone() for k, v in model.state_dict().items()}
    m = model.double().train()
    try:
        x = x.to(torch.float64)
        B = x.shape[0]
        app = G.applications(m, x)
        follows = _bn_follows(m, x)
        k = m(x[:1]).shape[1]
        c = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        m.zero_grad()
        (m(x) @ (c / c.norm())).sum().backward()
        rows = []
        for name, mod in m.rank_layers():
            g = as_matrix(mod.weight.grad.detach())
            s = torch.linalg.svdvals(g)
            r = int((s > G.RANK_RTOL * s[0]).sum()) if s[0] > 0 else 0
            n = int(app[name])
            bound = min(B * n - int(follows[name]), *g.shape)
            rows.append(dict(layer=name, N=n, BN=B * n, bn=follows[name], bound=bound,
                             measured=r, within=r <= bound, attained=r == bound,
                             tight_fails=r > bound - 1))
        m.zero_grad()
    finally:
        model.to(dtype).train(was)
        model.load_state_dict(state)
    return pd.DataFrame(rows)


def grid(base: sweep.Config, *, models: Sequence[str], lams: Sequence[float],
         batch_sizes: Sequence[int], lrs: Sequence[float], seeds: Sequence[int],
         steps: int | None = None, drop_at: Sequence[float] = (), gamma: float = 0.1,
         epochs: Mapping[str, int] | None = None, milestones: Sequence[int] = (),
         control_batch_sizes: Sequence[int] | None = None) -> list[sweep.Config]:
    """The configs of the sweep: every model x lr x B x lam x seed, except that ``lam = 0``
    runs (the controls) are made only for the batch sizes in ``control_batch_sizes`` (None:
    all). Length: ``steps`` SGD steps for every B (:func:`sgdrank.rankstudy.at_steps`, drops
    by ``gamma`` after the fractions ``drop_at``, which must fall on epoch boundaries for every
    B so that all batch sizes get the same schedule in steps: :func:`check_step_schedule`), or,
    when ``steps`` is None, ``epochs[model]``
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
                            check_step_schedule(cfg, steps, drop_at)
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


# --- the schedule by steps, matched accuracy, two worker processes ------------------------------
# (the decomposition W_T = c_T W_0 + DeltaW and the budget D*: sgdrank.decomposition)

def check_step_schedule(cfg: sweep.Config, steps: int, drop_at: Sequence[float]) -> None:
    """Raise ``ValueError`` unless ``cfg`` (made by :func:`sgdrank.rankstudy.at_steps`) takes
    exactly ``steps`` SGD steps and drops its learning rate exactly after ``round(f * steps)``
    steps for every ``f`` in ``drop_at``: milestones are whole epochs, so a drop that falls
    inside an epoch would be rounded differently for different batch sizes and the runs would
    end at different learning rates."""
    spe = sweep.steps_per_epoch(cfg.n_train, cfg.batch_size, cfg.drop_last)
    want = sorted({int(round(f * steps)) for f in drop_at})
    got = sorted(m * spe for m in cfg.lr_milestones)
    if cfg.epochs * spe != steps or got != want:
        raise ValueError(
            f"B={cfg.batch_size}: {spe} steps per epoch; {steps} steps with drops after "
            f"{want} steps do not fall on epoch boundaries (got {cfg.epochs * spe} steps, drops "
            f"after {got}): choose steps and drop_at that are multiples of {spe} steps")


def matched_accuracy(res: sweep.Result, lam: float, atols: Sequence[float] = (1e-3, 4e-2)
                     ) -> pd.DataFrame:
    """The matched-accuracy comparison: for every run with weight decay ``lam`` and its
    ``lam = 0`` partner (same model, lr, batch size and seed), the first recorded epoch at which
    the partner's train accuracy (eval mode) reaches the decayed run's final one (among the
    epochs with spectra, ``Config.spectra``, where its ranks are known). One row per
    pair: the setting, ``seed``, ``target`` (the decayed run's final train accuracy),
    ``epoch0`` / ``step0`` / ``acc0`` (the partner at that epoch; its last epoch and
    ``reached = False`` if it never gets there) and, for both runs, the layer-averaged
    threshold ranks and stable rank (``<metric>_lam`` at the decayed run's end, ``<metric>_0``
    at the partner's matched epoch)."""
    lay = rankstudy.layer_ranks(res.layers, atols)
    cols = [rankstudy.rank_col(a) for a in atols] + ["stable_rank"]
    avg = lay.groupby(["run_id", "epoch"])[cols].mean()
    spectra_epochs = lay.groupby("run_id").epoch.agg(set).to_dict()
    ep = res.epochs
    cf = res.runs.reset_index(drop=True)
    rows = []
    for rid in range(len(cf)):
        r = cf.loc[rid]
        if not math.isclose(float(r["lam"]), lam, rel_tol=1e-9):
            continue
        same = ((cf.model == r.model) & np.isclose(cf.lr, r.lr) & (cf.batch_size == r.batch_size)
                & (cf.seed == r.seed) & (cf.lam == 0) & (cf.epochs == r.epochs))
        if not same.any():
            continue
        pid = int(np.flatnonzero(same.to_numpy())[0])
        mine = ep[ep.run_id == rid].sort_values("epoch")
        part = ep[ep.run_id == pid].sort_values("epoch")
        part = part[part.epoch.isin(spectra_epochs.get(pid, ()))]  # epochs with ranks
        target = float(mine.train_acc.iloc[-1])
        hit = part[part.train_acc >= target]
        reached = not hit.empty
        at = hit.iloc[0] if reached else part.iloc[-1]
        spe = sweep.steps_per_epoch(res.configs[pid].n_train, int(r.batch_size),
                                    res.configs[pid].drop_last)
        row = {k: r[k] for k in list(SETTING) + ["seed"]}
        row.update(target=target, reached=reached, epoch0=int(at.epoch),
                   step0=int(at.epoch) * spe, acc0=float(at.train_acc),
                   test_lam=float(mine.test_acc.iloc[-1]), test0=float(at.test_acc))
        for c in cols:
            row[f"{c}_lam"] = float(avg.loc[(rid, int(mine.epoch.iloc[-1])), c])
            row[f"{c}_0"] = float(avg.loc[(pid, int(at.epoch)), c])
        rows.append(row)
    return pd.DataFrame(rows)


def _train_group(cfgs: list, cache: str, code_hash: str) -> int:
    from . import cache as _cache

    torch.set_num_threads(1)
    _cache._CODE_HASH = code_hash  # the parent's cache keys, even if a source file changed since
    sweep.run([sweep.Config(**c) for c in cfgs], cache=cache, progress=False)
    return len(cfgs)


def _cost(group: Sequence[sweep.Config]) -> float:
    w = {"VGG16-BN": 1.0, "RESNET18": 1.6, "VIT": 0.25}.get(short_name(group[0].model), 1.0)
    steps = max(c.epochs * sweep.steps_per_epoch(c.n_train, c.batch_size, c.drop_last)
                for c in group)
    return w * steps * (1 + 0.2 * (len(group) - 1))


def run_parallel(cfgs: Sequence[sweep.Config], cache: str, jobs: int = 2,
                 progress: bool = True) -> sweep.Result:
    """``sweep.run(cfgs, cache)`` with the sweep's groups spread over ``jobs`` worker
    processes (one thread each; longest groups first, each to the least loaded worker), then
    the result read from the cache. ``jobs = 1`` or a fully cached sweep: in-process.
    Measured on the book's 2-core CPU (shared with other jobs): two ViT groups of 6 runs x 2,048
    steps took 80 s with ``jobs = 2`` against 123 s in-process; two groups of 512 steps 43-46 s
    against 31-39 s (starting the workers costs about 10 s). More torch threads instead of
    processes was slower: a ResNet group took 201 s with 2 threads against 28 s with 1."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from . import cache as _cache
    from .dispatch import groups
    from .progress import progress as bar

    folder = _cache.folder(cache)
    todo = [g for g in groups(cfgs)
            if folder is None or not all((folder / f"{sweep.run_key(c)}.pt").exists() for c in g)]
    if jobs > 1 and len(todo) > 1 and folder is not None:
        todo.sort(key=_cost, reverse=True)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futs = [pool.submit(_train_group, [c.to_dict() for c in g], cache,
                                _cache.code_hash()) for g in todo]
            done = as_completed(futs)
            for f in (bar(done, desc="sweep groups", total=len(futs)) if progress else done):
                f.result()
    return sweep.run(list(cfgs), cache=cache, progress=progress)


def zero_rows(model: nn.Module, x: torch.Tensor, seed: int = 0) -> dict[str, int]:
    """Per rank-tracked matrix, the number of rows (output channels) of the per-sample gradient
    (eval mode, float64, as :func:`gradient_check`) that are exactly zero for *every* sample of
    ``x``: dead channels, whose output gradients a ReLU or max-pool zeroes at every position."""
    was, dtype = model.training, next(model.parameters()).dtype
    m = model.double().eval()
    try:
        x = x.to(torch.float64)
        k = m(x[:1]).shape[1]
        c = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        grads = G.per_sample_gradients(m, x, direction=c / c.norm())
        out = {}
        for name, _ in m.rank_layers():
            rows = torch.stack([as_matrix(g[name]).abs().sum(1) for g in grads]).sum(0)
            out[name] = int((rows == 0).sum())
    finally:
        model.to(dtype).train(was)
    return out


def smallest(res: sweep.Result, run: int, parts: pd.DataFrame | None = None) -> pd.DataFrame:
    """For every rank-tracked matrix of run ``run``: the smallest singular value of ``W_T``, of
    the decayed initialisation ``c_T W_0`` and of the learned part ``DeltaW_T`` (the split of
    :mod:`sgdrank.decomposition`), each over ``||W_T||_F`` (so comparable with a threshold
    ``eps``), and ``weyl`` = ``(c_T s_min(W_0) - ||DeltaW_T||_2) / ||W_T||_F``, Weyl's lower
    bound on ``s_min(W_T)`` (informative only where positive).

    ``parts``: the run's rows of :func:`sgdrank.decomposition.table` if already computed (else
    :func:`~sgdrank.decomposition.run_parts`), which give ``s_min(W_T)``, ``s_min(DeltaW_T)``,
    ``||DeltaW_T||_2`` and ``c_T``. Computed here, independently of the decomposition: the
    singular values of ``c_T W_0`` (in the run's ``svd_dtype``) and ``||W_T||_F`` (from the
    stored weights, no SVD), which the chapter checks against the decomposition's budget."""
    from . import decomposition as dec
    from .batched import Arch
    from .metrics import as_matrix
    from .record import singular_values

    rows = ({r["layer"]: r for r in dec.run_parts(res, run)} if parts is None
            else {r["layer"]: r for r in parts.to_dict("records")})
    i = res._index(run)
    cfg, rec = res.configs[i], res.records[i]
    arch = Arch(cfg.model, tuple(rec["arch"]["in_shape"]), rec["arch"]["out_dim"], cfg.bias,
                cfg.detach_var, cfg.activation)
    out = []
    for (label, m0), (_, m1) in zip(arch.build(seed=cfg.seed).float().rank_layers(),
                                    res.model(i).rank_layers()):
        r = rows[label]
        fro = float(torch.linalg.matrix_norm(as_matrix(m1.weight.detach()).double()))
        cw0 = r["c"] * as_matrix(m0.weight.detach()).double()
        s_c = float(singular_values(cw0, cfg.svd_dtype)[-1])
        out.append(dict(run_id=i, layer=label, s_W=r["W_smin"] / fro, s_cW0=s_c / fro,
                        s_dW=r["dW_smin"] / fro, weyl=(s_c - r["dW_smax"]) / fro))
    return pd.DataFrame(out)


def linear_baseline(dataset: str, n_train: int, n_test: int, data_seed: int = 0,
                    Cs: Sequence[float] = (0.01, 0.1, 1.0)) -> pd.DataFrame:
    """Multinomial logistic regression (scikit-learn, L2 penalty ``1/C``) on the flattened,
    standardised inputs of the same train/test subsets the sweep trains on
    (:func:`sgdrank.data.load_dataset` with ``seed = data_seed``). One row per ``C``:
    ``train_acc``, ``test_acc``."""
    from sklearn.linear_model import LogisticRegression

    from . import data

    ds = data.load_dataset(dataset, n_train=n_train, n_test=n_test, seed=data_seed)
    xtr, xte = ds.x_train.reshape(len(ds.x_train), -1).numpy(), ds.x_test.reshape(
        len(ds.x_test), -1).numpy()
    ytr, yte = ds.y_train.numpy(), ds.y_test.numpy()
    rows = []
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=500).fit(xtr, ytr)
        rows.append(dict(C=C, train_acc=float(clf.score(xtr, ytr)),
                         test_acc=float(clf.score(xte, yte))))
    return pd.DataFrame(rows)


# --- the chapter's plan: every training of Chapter 6 from its settings ------------------------

def model_specs(P: Mapping) -> list[str]:
    """The model specs of profile ``P``: ``P["models"]`` at the book's reduced widths
    (:data:`REDUCED`) where ``P["reduced"]``, else at full width."""
    return [REDUCED[m] if P["reduced"] else m for m in P["models"]]


def plan(P: Mapping) -> dict[str, list[sweep.Config]]:
    """Every training of Chapter 6 in profile ``P`` (the chapter's settings), in the order the
    chapter trains them:

    - ``"grid"``: :func:`grid` over ``models`` x ``lrs`` x ``batch_sizes`` x ``lams`` x
      ``seeds``, with the ``lam = 0`` controls at the batch sizes ``control_batch_sizes`` (None:
      all); ``steps`` SGD steps with drops ``drop_at`` (equal steps for every B), or, when
      ``steps`` is None, ``epochs[model]`` epochs with ``milestones`` (the papers' protocol);
    - ``"long arm"``: the model ``long_model`` at the smallest B and the largest lr, ``lam`` in
      ``{0, max(lams)}``, ``long_steps`` steps (empty when ``long_model`` is None).

    Data: ``dataset``, ``n_train``, ``n_test``. Recording: the keys of :data:`RECORDING` that
    ``P`` sets (absent keys: the :class:`sgdrank.runconfig.Config` defaults, so the book's runs
    and cache keys are those it always had). The input of :func:`sgdrank.cost.show_profiles`
    and of the chapter's training cell."""
    rec = {k: P[k] for k in RECORDING if k in P}
    base = sweep.Config(dataset=P["dataset"], n_train=P["n_train"], n_test=P["n_test"],
                        lr=P["lrs"][0], **rec)
    cfgs = grid(base, models=model_specs(P), lams=P["lams"], batch_sizes=P["batch_sizes"],
                lrs=P["lrs"], seeds=P["seeds"], steps=P["steps"], drop_at=P["drop_at"],
                gamma=P["gamma"], epochs=P["epochs"], milestones=P["milestones"],
                control_batch_sizes=P["control_batch_sizes"])
    long_cfgs = []
    if P["long_model"]:
        spec = REDUCED[P["long_model"]] if P["reduced"] else P["long_model"]
        long_cfgs = grid(base, models=[spec], lams=[0.0, max(P["lams"])],
                         batch_sizes=[min(P["batch_sizes"])], lrs=[max(P["lrs"])],
                         seeds=P["seeds"], steps=P["long_steps"], drop_at=P["long_drop_at"],
                         gamma=P["gamma"])
    return {"grid": cfgs, "long arm": long_cfgs}
