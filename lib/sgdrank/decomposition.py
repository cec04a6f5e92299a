"""Where a trained matrix comes from: the decayed initialisation and the learned update.

**The decomposition.** Plain SGD with weight decay in the book's convention (loss
``L + lam ||W||_F^2``) steps ``W_{t+1} = (1 - 2 mu_t lam) W_t - mu_t G_t`` with ``G_t`` the
mini-batch gradient of ``L`` at step ``t``. Unrolling ``T`` steps gives, exactly,

    W_T = c_T W_0 + DeltaW_T,   c_T = prod_{t<T} (1 - 2 mu_t lam),
    DeltaW_T = - sum_{t<T} mu_t (prod_{t<s<T} (1 - 2 mu_s lam)) G_t,

the decayed initialisation plus the decayed sum of the gradients. ``D = -ln c_T`` is the *total
decay* (``D ~ 2 lam sum_t mu_t`` when every ``2 mu_t lam`` is small). The learned part
``DeltaW_T`` lies in the span of the gradients; at ``lam = 0`` it is ``W_T - W_0``.

With heavy-ball momentum ``m`` (PyTorch's SGD: ``b_t = m b_{t-1} + G_t + 2 lam W_t``,
``W_{t+1} = W_t - mu_t b_t``, ``b_{-1} = 0``) the map from ``(W_0, G_0, ..., G_{T-1})`` to
``W_T`` is still linear, so the same split holds with ``c_T`` the ``W``-component of the
homogeneous recursion (all ``G_t = 0``) started at ``(W, b) = (1, 0)``: :func:`init_factor`
runs that scalar recursion. ``DeltaW_T = W_T - c_T W_0`` is then exactly the contribution of the
gradients (through the momentum buffer).

**The decay budget.** The threshold rank at tolerance ``eps`` counts the singular values of
``W_T`` above ``eps ||W_T||_F`` (:func:`sgdrank.metrics.threshold_rank`). Let ``s_min(W_0)`` be
the smallest of the ``p = min(m, n)`` singular values of the ``m x n`` matrix ``W_0`` and ``x``
its singular vector *on the smaller side*: the right one (``x`` in ``R^n``) when ``m >= n``, the
left one (``x`` in ``R^m``, acting as ``x^T W``) when ``m < n``. On that side the smallest
singular value is a minimum, ``s_p(W) = min_{|x|=1} |W x|`` (or ``|x^T W|``); on the larger
side it is not (a wide matrix has a null space). If no gradient touched that direction
(``DeltaW_T x = 0``, resp. ``x^T DeltaW_T = 0``) then ``s_p(W_T) <= c_T s_min(W_0)``: decay alone
can bring that direction below the threshold only once ``c_T s_min(W_0) <= eps ||W_T||_F``,
i.e. once

    D >= D* = ln( s_min(W_0) / (eps ||W_T||_F) ).

With ``D < D*`` the decayed initialisation keeps every one of its directions above the
threshold, so a lower threshold rank of ``W_T`` then needs the learned part to *cancel* the
initialisation in some direction; with ``D > D*`` decay alone suffices wherever the gradients
leave a direction alone. ``D* <= 0`` means the initialisation is already below the threshold in
some direction (e.g. a wide random square matrix, whose smallest singular value is near 0).
A uniform shrink changes neither the threshold rank nor the stable rank (both are scale
invariant): a rank moves only as ``DeltaW_T`` grows relative to ``c_T W_0``.

Functions: :func:`decay_factor`, :func:`total_decay`, :func:`step_lrs`, :func:`init_factor`,
:func:`split`, :func:`budget`, :func:`parts` (one matrix), :func:`run_parts` and :func:`table`
(every rank-tracked matrix of a sweep :class:`~sgdrank.results.Result`, for both engines: the
initialisation is rebuilt from the run's seed, exactly as both engines build it), and
:func:`show` (a summary for the book's synthesis page).
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from . import metrics

SYNTHESIS_MIME = "application/vnd.sgdrank.mechanism+json"
EPS = (1e-3, 0.04)
SHOW_KEYS = ("arm", "lam", "D", "Dstar", "fit", "rank_W", "rank_W0", "rank_dW", "srank_W",
             "srank_W0", "srank_dW")


def decay_factor(lrs: Iterable[float], lam: float) -> float:
    """``c_T = prod_t (1 - 2 lr_t lam)`` over the learning rates of every SGD step (plain SGD)."""
    lr = np.asarray(list(lrs), dtype=float)
    return float(np.prod(1.0 - 2.0 * lr * lam))


def total_decay(lrs: Iterable[float], lam: float) -> float:
    """``D = -ln c_T`` (:func:`decay_factor`); ``inf`` when some factor is ``<= 0`` (a step with
    ``2 lr lam >= 1`` overshoots)."""
    lr = np.asarray(list(lrs), dtype=float)
    f = 1.0 - 2.0 * lr * lam
    if (f <= 0).any():
        return math.inf
    return float(-np.log(f).sum())


def step_lrs(cfg, steps_per_epoch: int, epochs: int | None = None) -> np.ndarray:
    """The learning rate of every SGD step of run ``cfg`` (:class:`sgdrank.runconfig.Config`):
    ``cfg.lr_at(e)`` for each of the ``steps_per_epoch`` steps of epochs ``1..epochs``."""
    E = cfg.epochs if epochs is None else epochs
    return np.repeat([cfg.lr_at(e) for e in range(1, E + 1)], steps_per_epoch).astype(float)


def config_decay(cfg) -> float:
    """``D = -ln c_T`` of a whole run of ``cfg`` (plain SGD, its schedule, ``n_train // B``
    steps per epoch): :func:`total_decay` of :func:`step_lrs`. For a planned run, before it
    trains (a profile's settings)."""
    from .runconfig import steps_per_epoch

    spe = steps_per_epoch(cfg.n_train, cfg.batch_size, cfg.drop_last)
    return total_decay(step_lrs(cfg, spe), cfg.lam)


def init_factor(lrs: Iterable[float], lam: float, momentum: float = 0.0) -> float:
    """``c_T``: the coefficient of ``W_0`` in ``W_T`` (see the module docstring). Plain SGD:
    :func:`decay_factor`. Momentum ``m``: the homogeneous recursion ``b = m b + 2 lam W``,
    ``W = W - lr b`` from ``(W, b) = (1, 0)``, in float64."""
    if momentum == 0.0:
        return decay_factor(lrs, lam)
    w, b = 1.0, 0.0
    for lr in lrs:
        b = momentum * b + 2.0 * lam * w
        w = w - lr * b
    return float(w)


def _mat(w: torch.Tensor) -> torch.Tensor:
    return metrics.as_matrix(w.detach()).double()


def split(W_T: torch.Tensor, W_0: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c W_0, DeltaW = W_T - c W_0)`` as float64 matrices (conv filters as
    ``c_out x c_in k k``, :func:`sgdrank.metrics.as_matrix`)."""
    w0 = _mat(W_0)
    cw0 = c * w0
    return cw0, _mat(W_T) - cw0


def budget(W_0: torch.Tensor, fro_T: float, eps: float = 1e-3) -> float:
    """The decay budget ``D* = ln(s_min(W_0) / (eps ||W_T||_F))`` (module docstring), with
    ``s_min`` the smallest of the ``min(m, n)`` singular values of ``W_0`` as a matrix. ``-inf``
    when ``s_min(W_0) = 0``."""
    s = metrics.singular_values(W_0)
    smin = float(s[-1])
    if smin <= 0:
        return -math.inf
    return math.log(smin / (eps * float(fro_T)))


def known_spectrum(s: torch.Tensor, w: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """``s`` (singular values computed elsewhere, e.g. by the recorder:
    :meth:`sgdrank.results.Result.final_spectra`) as float64, after checking that they can be
    those of the matrix ``w`` (conv filters as :func:`sgdrank.metrics.as_matrix`): ``min(m, n)``
    values, non-negative and descending, with ``||s||_2 = ||w||_F`` within ``rtol`` (a float32
    SVD errs by about 6e-7 of ``||w||_F``). Raises ``ValueError`` otherwise. What it cannot
    catch: another matrix of the same shape and nearly the same norm (the end of a few steps at
    ``lambda = 0`` against epoch 0: 1e-6 apart; another seed: 1e-5; every unit-norm ``V_k`` of
    Chapter 4's JANUS network). So the callers take the values of the same run, by layer
    label and epoch (:meth:`sgdrank.results.Result.spectra_at`), and tests compare them with a
    fresh SVD."""
    m = metrics.as_matrix(w.detach())
    s = torch.as_tensor(s).double().reshape(-1)
    fro, norm = float(torch.linalg.vector_norm(m.double())), float(torch.linalg.vector_norm(s))
    if (s.numel() != min(m.shape) or bool((s < 0).any()) or bool((s[1:] > s[:-1]).any())
            or not abs(norm - fro) <= rtol * max(fro, 1e-300)):
        raise ValueError(f"the singular values given ({s.numel()} values, 2-norm {norm:.6g}) "
                         f"are not those of this {tuple(m.shape)} matrix (Frobenius norm "
                         f"{fro:.6g}; min(m, n) values, >= 0, descending): pass the spectrum of "
                         f"these weights, or None to compute it")
    return s


def _ranks(s: torch.Tensor, eps: Sequence[float]) -> dict:
    out = {}
    for e in eps:
        out[f"rank@{e:g}"] = int(metrics.threshold_rank(s, atol=e))
    out["srank"] = float(metrics.stable_rank(s))
    out["fro"] = float(torch.linalg.vector_norm(s))
    return out


def parts(W_T: torch.Tensor, W_0: torch.Tensor, c: float,
          eps: Sequence[float] = EPS, s0: torch.Tensor | None = None,
          dtype: str = "float64", s: torch.Tensor | None = None) -> dict:
    """Ranks of the three matrices of the decomposition of one trained matrix.

    Keys: ``{part}_rank@{eps}`` (threshold rank of the part over its *own* Frobenius norm, for
    each ``eps``), ``{part}_srank`` (stable rank), ``{part}_fro`` for ``part`` in ``W`` (= W_T),
    ``W0`` (the initialisation; ``c W_0`` has the same ranks, its norm is ``c`` times), ``dW``
    (the learned part); ``c``; ``Dstar@{eps}`` (:func:`budget` with ``||W_T||_F``); ``dW_share``
    = ``||DeltaW||_F / ||W_T||_F``; ``decay_rank@{eps}``: how many singular values of the decayed
    initialisation ``c W_0`` stay above ``eps ||W_T||_F`` -- the threshold rank that decay alone
    would leave at the trained matrix's scale if no gradient had touched ``W_0``'s directions
    (0 means the whole threshold rank of ``W_T`` is carried by the learned part; compare it with
    ``W_rank@{eps}``, rather than comparing ``D`` with the smallest ``D*``, which says only
    whether *one* direction could fall); ``{part}_smin``: the smallest of the ``min(m, n)``
    singular values, and ``dW_smax = ||DeltaW||_2``; ``d_out``, ``d_in``. ``s0``: the singular
    values of ``W_0`` if already known (runs that share an initialisation share them; checked
    by :func:`known_spectrum`). ``s``: the singular values of ``W_T`` if already known (the run's
    record at its last epoch, :meth:`sgdrank.results.Result.final_spectra`; checked by
    :func:`known_spectrum`): then only ``DeltaW`` is decomposed here. ``dtype``: the SVDs'
    precision (:func:`sgdrank.record.singular_values`: the matrices are split in float64, then
    decomposed in ``dtype``; a run's ``svd_dtype``, so that ``W_rank`` is the rank its own
    record reads)."""
    from .record import singular_values

    cw0, dw = split(W_T, W_0, c)
    w = _mat(W_T)
    out = {"d_out": int(w.shape[0]), "d_in": int(w.shape[1]), "c": float(c)}
    s0 = singular_values(_mat(W_0), dtype) if s0 is None else known_spectrum(s0, W_0)
    s_w = singular_values(w, dtype) if s is None else known_spectrum(s, w)
    for name, sv in (("W", s_w), ("W0", s0), ("dW", singular_values(dw, dtype))):
        for k, v in _ranks(sv, eps).items():
            out[f"{name}_{k}"] = v
        out[f"{name}_smin"] = float(sv[-1])
        if name == "dW":
            out["dW_smax"] = float(sv[0])
    s0_min = float(s0[-1])
    for e in eps:
        out[f"Dstar@{e:g}"] = (math.log(s0_min / (e * out["W_fro"])) if s0_min > 0
                               else -math.inf)
        out[f"decay_rank@{e:g}"] = int((c * s0 > e * out["W_fro"]).sum())
    out["dW_share"] = out["dW_fro"] / out["W_fro"] if out["W_fro"] > 0 else math.nan
    return out


def _steps_per_epoch(rec: dict) -> int:
    ep, st = rec["epochs"]["epoch"], rec["epochs"]["step"]
    for e, s in zip(reversed(ep), reversed(st)):
        if e and s == s:
            return int(round(s / e))
    raise ValueError("the run recorded no epoch after the first: cannot tell its steps per epoch")


def run_parts(res, run, eps: Sequence[float] = EPS, init_spectra: dict | None = None
              ) -> list[dict]:
    """:func:`parts` of every rank-tracked matrix of run ``run`` of a sweep ``res``
    (:class:`sgdrank.results.Result`): ``W_T`` from the stored final weights, ``W_0`` rebuilt
    from the run's seed (``Arch.build(seed)``, as both engines build it), ``c_T`` from the run's
    schedule (:func:`step_lrs`, :func:`init_factor`, momentum included), ``D = -ln c_T``; the
    SVDs in the run's ``svd_dtype``, those of ``W_T`` and ``W_0`` read from the run's record
    (:meth:`~sgdrank.results.Result.spectra_at` its last epoch and epoch 0) where it holds them,
    so that only ``DeltaW`` is decomposed here. Each dict also has ``run_id``, ``layer``,
    ``index`` and ``D``. A diverged run gives ``[]``.
    ``init_spectra``: a dict shared between calls that keeps the singular values of each
    rebuilt ``W_0`` (by architecture, seed and layer), so that runs of one initialisation
    decompose it once."""
    from .batched import Arch
    from .record import singular_values

    i = res._index(run)
    cfg, rec = res.configs[i], res.records[i]
    if rec["state"] is None:
        return []
    arch = Arch(cfg.model, tuple(rec["arch"]["in_shape"]), rec["arch"]["out_dim"], cfg.bias,
                cfg.detach_var, cfg.activation)
    init, final = arch.build(seed=cfg.seed).float(), res.model(i)
    lrs = step_lrs(cfg, _steps_per_epoch(rec))
    c = init_factor(lrs, cfg.lam, cfg.momentum)
    D = -math.log(c) if c > 0 else math.inf
    known = {} if init_spectra is None else init_spectra
    s_T, s_0 = res.final_spectra(i) or {}, res.spectra_at(i, 0) or {}
    rows = []
    for idx, ((label, m0), (_, m1)) in enumerate(zip(init.rank_layers(), final.rank_layers())):
        key = (arch, cfg.seed, idx, cfg.svd_dtype)
        if key not in known:
            known[key] = (known_spectrum(s_0[label], m0.weight) if label in s_0
                          else singular_values(_mat(m0.weight), cfg.svd_dtype))
        rows.append({"run_id": i, "layer": label, "index": idx, "D": D,
                     **parts(m1.weight, m0.weight, c, eps, s0=known[key],
                             dtype=cfg.svd_dtype, s=s_T.get(label))})
    return rows


def table(res, eps: Sequence[float] = EPS):
    """:func:`run_parts` of every run of ``res`` as one ``pandas.DataFrame``, with the run's
    config columns (``lam``, ``batch_size``, ``lr``, ``seed``, ...) joined on ``run_id``."""
    import pandas as pd

    init_spectra: dict = {}
    rows = [r for i in range(len(res)) for r in run_parts(res, i, eps, init_spectra)]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    cfg = res.runs.drop(columns=[c for c in ("cached", "seconds", "engine") if c in res.runs])
    return df.merge(cfg, on="run_id", how="left")


def show(experiment: str, rows: Sequence[Mapping], where: str) -> None:
    """Show the decomposition summary of one experiment and store it for the book's closing
    synthesis page (``tools/synthesis.py`` collects these records from the chapters).

    ``rows``: one dict per arm with the keys :data:`SHOW_KEYS`: ``arm`` (a label), ``lam``,
    ``D`` (total decay), ``Dstar`` (the smallest decay budget over the matrices summarised, at
    ``eps = 1e-3``), ``fit`` (a short text: "train acc 0.99"), the threshold ranks at 1e-3
    ``rank_W``, ``rank_W0``, ``rank_dW`` and stable ranks ``srank_W``, ``srank_W0``,
    ``srank_dW`` (means over seeds, and over the layers the chapter names in ``experiment``).
    ``where``: the MyST label of the section that computes them. Returns nothing."""
    import pandas as pd
    from IPython.display import display

    if not rows:
        raise ValueError("show needs at least one row")
    clean = []
    for r in rows:
        missing = [k for k in SHOW_KEYS if k not in r]
        if missing:
            raise ValueError(f"row {r.get('arm', '?')!r} lacks {missing}; keys: {SHOW_KEYS}")
        clean.append({k: (r[k] if isinstance(r[k], str) else float(r[k])) for k in SHOW_KEYS})
    rec = {"experiment": experiment, "where": where, "rows": clean}
    df = pd.DataFrame(clean).set_index("arm").T  # one column per arm: narrow on the page
    text = df.to_string(float_format=lambda v: f"{v:.3g}")
    display({"text/plain": text, SYNTHESIS_MIME: json.dumps(rec)}, raw=True)
