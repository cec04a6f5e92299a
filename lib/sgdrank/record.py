"""What one recorded epoch of a sweep run is: the rows that both engines write.

The engines (:mod:`sgdrank.engine_batched`, :mod:`sgdrank.engine_loop`) measure K runs at a
recorded epoch -- losses and accuracies, the singular values of every rank-tracked matrix and of
the classifier, the Frobenius norms of the changes of every trainable matrix since the previous
recorded epoch, the smallest BN running variance -- and hand them to :func:`append` as one
:class:`Measurement` (tensors with a leading run dimension K; K = 1 for the loop engine).
Everything derived from those numbers (ranks, stable ranks, norms, averages, the eval blow-up
flag) is computed here, once, for both engines. A new metric is added here.

A run's record (:func:`new`) is a plain dict of lists (it is saved with ``torch.save`` and read
back with ``weights_only=True``): ``record["epochs"][metric]`` has one entry per recorded epoch,
``record["layers"][metric]`` one per recorded epoch x rank-tracked layer.

Epoch metrics (:data:`EPOCH_METRICS`):

- ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``: the **eval-mode** model (BN with its
  running statistics) on the *whole* training / test set -- what the authors' code reports as
  train and test accuracy; ``train_*`` NaN with ``eval_train=False``;
- ``batch_loss``, ``batch_acc``: the mean loss / accuracy of the epoch's mini-batches in
  **training mode**, each measured before its own SGD step (NaN at epoch 0); a diagnostic, not
  the authors' train accuracy;
- ``conv_dist``: GP22's ``d(W_e, W_prev)``, the mean over *all* trainable matrices (classifier
  included) of ``||W_e - W_prev||_F``; ``head_*``: the classifier's norms, rank, stable rank and
  change; ``avg_rank`` / ``avg_stable_rank``: means over the rank-tracked layers;
- ``bn_var_min``: the smallest running variance of any BN unit (NaN without BN). Eval mode divides
  by ``sqrt(running_var + eps)``: a unit whose running variance has decayed towards 0 (weight
  decay shrinks the weights feeding it) amplifies eval-mode inputs by up to ``1/sqrt(eps)``;
- ``eval_blowup``: True when the eval-mode training loss is above its value at initialisation
  *and* more than :data:`EVAL_BLOWUP` times the training-mode batch loss of the same epoch: the
  network trains (batch loss small) while its eval-mode version has broken down. Such epochs
  stay in the tables with their (huge) losses; ``Result.runs`` names the first one;
- ``diverged``: True from the first recorded epoch at which a parameter, a BN statistic, the
  batch loss or the eval-mode training loss is not finite; those rows are NaN (no layer rows).

Layer metrics (:data:`LAYER_METRICS`, one row per rank-tracked matrix ``W``, conv filters as
``c_out x c_in k k``): ``rank`` = threshold rank of ``W/||W||_F`` at ``atol = 1e-3``
(:func:`sgdrank.metrics.threshold_rank`), ``stable_rank`` = ``||W||_F^2/||W||_2^2``, ``fro``,
``spec`` = ``||W||_2``, ``delta_fro`` = ``||W_e - W_prev||_F``, ``sv`` (float64, descending).
``W_prev`` is the previous *recorded* epoch (the previous epoch when ``record_every = 1``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from . import metrics
from .batched import Arch
from .runconfig import Config

FORMAT = 2
EVAL_BLOWUP = 10.0
EPOCH_METRICS = ("epoch", "step", "lr_now", "train_loss", "train_acc", "test_loss", "test_acc",
                 "batch_loss", "batch_acc", "conv_dist", "avg_rank", "avg_stable_rank",
                 "head_fro", "head_spec", "head_rank", "head_stable_rank", "head_delta",
                 "bn_var_min", "eval_blowup", "diverged")
LAYER_METRICS = ("epoch", "layer", "index", "d_out", "d_in", "rank", "stable_rank", "fro", "spec",
                 "delta_fro", "sv")
HEAD = "head.weight"


@dataclass(frozen=True)
class Layer:
    """A rank-tracked matrix: its ``state_dict`` key, its label in the tables (``"W3"``,
    ``"stage1.conv1"``) and its matrix shape ``(d_out, d_in)`` (conv: ``(c_out, c_in k k)``)."""
    name: str
    label: str
    shape: tuple


@dataclass
class Measurement:
    """One recorded epoch of K runs. Tensors are on the CPU with leading dimension K.

    ``sv``: singular values (float64, descending) of every rank-tracked matrix and of
    ``"head.weight"``, ``(K, r)``, or None at an epoch without spectra (``Config.spectra``: no
    layer rows, the rank columns of the epoch row NaN); ``delta``: ``||W_e - W_prev||_F`` of
    every trainable matrix, ``(K,)`` (None at epoch 0); losses / accuracies ``(K,)`` or None
    (not measured, or a regression task's accuracy); ``bn_var_min`` ``(K,)`` or None (no BN)."""
    epoch: int
    step: int
    lr_now: Sequence[float]
    sv: Mapping[str, torch.Tensor] | None
    delta: Mapping[str, torch.Tensor] | None = None
    train_loss: torch.Tensor | None = None
    train_acc: torch.Tensor | None = None
    test_loss: torch.Tensor | None = None
    test_acc: torch.Tensor | None = None
    batch_loss: torch.Tensor | None = None
    batch_acc: torch.Tensor | None = None
    bn_var_min: torch.Tensor | None = None


def new(cfg: Config, key: str, arch: Arch, engine: str, device) -> dict:
    """An empty record of run ``cfg`` (cache key ``key``), trained by ``engine`` on ``device``."""
    return {"format": FORMAT, "key": key, "config": json.dumps(cfg.to_dict(), sort_keys=True),
            "arch": {"in_shape": list(arch.in_shape), "out_dim": arch.out_dim},
            "epochs": {k: [] for k in EPOCH_METRICS}, "layers": {k: [] for k in LAYER_METRICS},
            "state": None, "diverged_epoch": None, "seconds": 0.0, "engine": engine,
            "device": str(device), "torch": str(torch.__version__)}


def singular_values(w: torch.Tensor, dtype: str | torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of a batch of matrices ``(..., m, n)``, descending, returned as float64;
    computed in ``dtype`` (float64: :func:`sgdrank.metrics.batch_singular_values`; float32: the
    same on a float32 copy -- wide matrices as their transposes -- then widened).

    float32 against float64 (:func:`svd_error`; ``benchmarks/gpu_check.sh`` step 4, numbers in
    ``benchmarks/README.md``), measured on this project's CPU (LAPACK) on trained Chapter 3-like
    matrices and on random and rank-8-plus-noise matrices up to 1000 x 1000 and 512 x 4608: the
    largest error of ``s_i / ||W||_F`` was 4.7e-7, about 2,000 times below the rank tolerance
    1e-3 (and 80,000 below 0.04), and no threshold rank changed; a rank can only change when a
    singular value lies within that error of a tolerance. On a GPU (cuSOLVER) it is not measured
    yet: run the check script there before relying on ``svd_dtype="float32"``."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float64:
        return metrics.batch_singular_values(w)
    w = w.detach().to(dtype)
    return torch.linalg.svdvals(w.mT if w.shape[-2] < w.shape[-1] else w).double()


def svd_error(w: torch.Tensor, dtype: str | torch.dtype = torch.float32) -> dict:
    """How far singular values computed in ``dtype`` are from float64 ones, for a batch of
    matrices ``w`` ``(..., m, n)`` on its device, in the units the ranks use (``s_i / ||W||_F``):
    ``max_err`` (the largest ``|s_i - s64_i| / ||W||_F``), ``rank_changes`` (threshold ranks at
    atol 1e-3 and 0.04 that differ) and ``margin`` (the smallest distance of any
    ``s64_i / ||W||_F`` from either tolerance: a rank can only change if it is below
    ``max_err``)."""
    s64 = singular_values(w, torch.float64)
    s32 = singular_values(w, dtype)
    fro = torch.linalg.vector_norm(s64, dim=-1, keepdim=True).clamp_min(1e-300)
    err = float(((s32 - s64).abs() / fro).max())
    changes = sum(int((metrics.threshold_rank(s32, atol=t)
                       != metrics.threshold_rank(s64, atol=t)).sum()) for t in (1e-3, 0.04))
    margin = min(float(((s64 / fro) - t).abs().min()) for t in (1e-3, 0.04))
    return {"max_err": err, "rank_changes": changes, "margin": margin}


def spectra(mats: Mapping[str, torch.Tensor],
            dtype: str | torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Singular values of matrices ``(K, m, n)`` by name, float64, descending, ``(K, min(m, n))``:
    one batched SVD per distinct shape (:func:`singular_values`, computed in ``dtype``)."""
    by_shape: dict[tuple, list[str]] = {}
    for n, w in mats.items():
        by_shape.setdefault(tuple(w.shape[1:]), []).append(n)
    out = {}
    for names in by_shape.values():
        K = mats[names[0]].shape[0]
        s = singular_values(torch.cat([mats[n] for n in names]), dtype)
        for i, n in enumerate(names):
            out[n] = s[i * K:(i + 1) * K]
    return out


def not_finite(params_finite: torch.Tensor, train_loss: torch.Tensor | None,
               batch_loss: torch.Tensor | None) -> list[bool]:
    """Per run: has it diverged? ``params_finite`` ``(K,)`` bool (every parameter and BN statistic
    finite); a NaN/inf eval-mode training loss or batch loss counts too (None: not measured)."""
    ok = params_finite.clone()
    for v in (train_loss, batch_loss):
        if v is not None:
            ok &= torch.isfinite(v)
    return (~ok).cpu().tolist()


def mark_diverged(rec: dict, cfg: Config, epoch: int, steps: int) -> None:
    """Record that run ``cfg`` diverged at (recorded) epoch ``epoch``: NaN rows with
    ``diverged=True`` for it and every later recorded epoch; ``steps`` = SGD steps per epoch."""
    rec["diverged_epoch"] = epoch
    for e in range(epoch, cfg.epochs + 1):
        if not cfg.recorded(e):
            continue
        row = {k: float("nan") for k in EPOCH_METRICS}
        row.update(epoch=e, step=steps * e, lr_now=cfg.lr_at(e) if e else float("nan"),
                   eval_blowup=False, diverged=True)
        for k, v in row.items():
            rec["epochs"][k].append(v)


def _at(v: torch.Tensor | None, j: int) -> float:
    return float("nan") if v is None else float(v[j])


def _blowup(rec: dict, train_loss: float, batch_loss: float) -> bool:
    init = rec["epochs"]["train_loss"][0] if rec["epochs"]["train_loss"] else float("nan")
    return bool(math.isfinite(batch_loss) and train_loss > EVAL_BLOWUP * batch_loss
                and train_loss > init)


def append(recs: Sequence[dict], layers: Sequence[Layer], m: Measurement) -> None:
    """Append epoch ``m.epoch`` of K runs to their records ``recs`` (one per run, in the order of
    ``m``'s leading dimension): one epoch row each and one layer row per entry of ``layers``."""
    if m.sv is None:
        _append_no_spectra(recs, m)
        return
    names = [ly.name for ly in layers] + [HEAD]
    sv = {n: m.sv[n] for n in names}
    rank = {n: metrics.threshold_rank(sv[n]) for n in names}
    stable = {n: metrics.stable_rank(sv[n]) for n in names}
    fro = {n: torch.linalg.vector_norm(sv[n], dim=-1) for n in names}
    first = m.delta is None
    conv_dist = None if first else torch.stack([d.double() for d in m.delta.values()]).mean(0)
    for j, rec in enumerate(recs):
        ranks = [int(rank[ly.name][j]) for ly in layers]
        stabs = [float(stable[ly.name][j]) for ly in layers]
        tl, bl = _at(m.train_loss, j), _at(m.batch_loss, j)
        row = dict(
            epoch=m.epoch, step=m.step, lr_now=float(m.lr_now[j]) if m.epoch else float("nan"),
            train_loss=tl, train_acc=_at(m.train_acc, j), test_loss=_at(m.test_loss, j),
            test_acc=_at(m.test_acc, j), batch_loss=bl, batch_acc=_at(m.batch_acc, j),
            conv_dist=float("nan") if first else float(conv_dist[j]),
            avg_rank=sum(ranks) / len(ranks) if ranks else float("nan"),
            avg_stable_rank=sum(stabs) / len(stabs) if stabs else float("nan"),
            head_fro=float(fro[HEAD][j]), head_spec=float(sv[HEAD][j][0]),
            head_rank=int(rank[HEAD][j]), head_stable_rank=float(stable[HEAD][j]),
            head_delta=float("nan") if first else float(m.delta[HEAD][j]),
            bn_var_min=_at(m.bn_var_min, j), eval_blowup=_blowup(rec, tl, bl), diverged=False)
        for k, v in row.items():
            rec["epochs"][k].append(v)
        L = rec["layers"]
        for i, ly in enumerate(layers):
            s = sv[ly.name][j]
            L["epoch"].append(m.epoch)
            L["layer"].append(ly.label)
            L["index"].append(i)
            L["d_out"].append(int(ly.shape[0]))
            L["d_in"].append(int(ly.shape[1]))
            L["rank"].append(ranks[i])
            L["stable_rank"].append(stabs[i])
            L["fro"].append(float(fro[ly.name][j]))
            L["spec"].append(float(s[0]))
            L["delta_fro"].append(float("nan") if first else float(m.delta[ly.name][j]))
            L["sv"].append(s.clone())


def _append_no_spectra(recs: Sequence[dict], m: Measurement) -> None:
    """An epoch row without singular values (``Config.spectra``): the rank, stable-rank and
    ``head_*`` norm columns NaN, no layer rows; losses, ``conv_dist`` and ``head_delta`` kept."""
    first = m.delta is None
    conv_dist = None if first else torch.stack([d.double() for d in m.delta.values()]).mean(0)
    nan = float("nan")
    for j, rec in enumerate(recs):
        tl, bl = _at(m.train_loss, j), _at(m.batch_loss, j)
        row = dict(
            epoch=m.epoch, step=m.step, lr_now=float(m.lr_now[j]) if m.epoch else nan,
            train_loss=tl, train_acc=_at(m.train_acc, j), test_loss=_at(m.test_loss, j),
            test_acc=_at(m.test_acc, j), batch_loss=bl, batch_acc=_at(m.batch_acc, j),
            conv_dist=nan if first else float(conv_dist[j]), avg_rank=nan, avg_stable_rank=nan,
            head_fro=nan, head_spec=nan, head_rank=nan, head_stable_rank=nan,
            head_delta=nan if first else float(m.delta[HEAD][j]),
            bn_var_min=_at(m.bn_var_min, j), eval_blowup=_blowup(rec, tl, bl), diverged=False)
        for k, v in row.items():
            rec["epochs"][k].append(v)
