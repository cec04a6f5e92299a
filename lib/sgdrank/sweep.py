"""Sweeps: train many configurations of one architecture as one batched computation, record
ranks and losses per epoch in tidy tables, cache every run on disk.

>>> from sgdrank import sweep
>>> base = sweep.Config(model="MLP-BN-10-100", dataset="fashion-mnist", n_train=5000, n_test=2000,
...                     batch_size=16, lr=0.1, lam=5e-4, epochs=30)
>>> res = sweep.run(sweep.grid(base, lr=[0.05, 0.1], lam=[1e-4, 5e-4], seed=[0, 1]), cache="ch03")
>>> res.epochs      # one row per run x epoch
>>> res.layers      # one row per run x epoch x rank-tracked layer (singular values included)
>>> res.model(0)    # final weights of run 0 as an nn.Module (eval mode)

What one run is (every choice below is the same in the batched engine and the one-at-a-time
``engine="loop"``, and is tested to agree with ``nn.Module`` + ``torch.optim.SGD``):

- **Init**: :func:`sgdrank.models.build_model` with ``seed=cfg.seed`` (PyTorch's default init).
- **Batch order**: in epoch ``e`` (1-based) the run visits the training set in the order
  :func:`batch_order` ``(cfg.seed, e, n)``, a permutation drawn from its own generator (sampling
  without replacement), cut into consecutive batches of ``batch_size``. With ``drop_last=True``
  (default) the last ``n mod B`` samples of each epoch's permutation are skipped, so every step
  uses exactly ``B`` samples (the papers' rank bounds count ``B``); a different set is skipped
  each epoch. ``drop_last=False`` adds a last, smaller batch.
- **Loss**: ``"ce"``: cross-entropy, batch mean; ``"mse"``: ``mean over batch and outputs of
  (f(x) - t)^2`` with ``t`` the one-hot label (``F.mse_loss(f(x), one_hot(y))``), or the real
  target for regression datasets.
- **Weight decay** (the papers' ``lam``, :mod:`sgdrank.conventions`): the step is
  ``W <- (1 - 2 lr lam) W - lr grad`` (``torch.optim.SGD`` with ``weight_decay = 2 lam``). With
  ``decay="all"`` (default) *every* trainable parameter is decayed -- weight matrices, classifier,
  biases, BN ``gamma``/``beta`` -- as in the authors' code and the papers' ``lam ||theta||^2``;
  ``decay="matrices"`` decays only the weight matrices (hidden layers and classifier).
- **Momentum** ``m`` as in ``torch.optim.SGD`` (``v <- m v + g + 2 lam W``, ``W <- W - lr v``);
  the authors' code used 0, the default here.
- **Schedule**: during epoch ``e`` the learning rate is
  ``lr * lr_gamma ** #{m in lr_milestones : m < e}`` (``MultiStepLR`` stepped once per epoch).
- **BN** in training mode uses batch statistics (optionally ``detach_var``); evaluation uses the
  running statistics (eval mode), like ``model.eval()``. The gradient of a bias that feeds a BN
  is exactly 0 (BN removes the batch mean); the batched engine uses that 0 (autograd returns
  rounding noise), so such a bias only decays.
- **Precision**: float32 training (whatever ``torch.get_default_dtype()`` is), float64 metrics.
  The batched engine equals the one-at-a-time loop to ~1e-6 relative over tens of steps; over
  longer runs the trajectories of deep BN nets separate (two PyTorch BN implementations, or a
  1e-7 perturbation of the init, do the same: the training map amplifies float32 rounding), so
  compare long runs statistically (across seeds), not weight by weight.

What is recorded (epoch 0 = at initialisation, then after each epoch):

- train and test loss / accuracy of the eval-mode model on the *whole* training and test sets
  (``train_loss``, ``train_acc`` -- NaN with ``eval_train=False`` --, ``test_loss``,
  ``test_acc``); the mean loss / accuracy of the epoch's mini-batches in training mode, as the
  authors' code reports "train accuracy" (``batch_loss``, ``batch_acc``; NaN at epoch 0);
- per rank-tracked layer (hidden matrices; :meth:`models.MLP.rank_layers`; classifier excluded):
  singular values ``sv`` (float64, descending), ``rank`` = threshold rank of ``W/||W||_F`` at
  ``atol=1e-3`` (:func:`sgdrank.metrics.threshold_rank`; any other threshold later with
  :meth:`Result.ranks`), ``stable_rank``, ``fro`` = ``||W||_F``, ``spec`` = ``||W||_2``,
  ``delta_fro`` = ``||W_e - W_{e-1}||_F``;
- ``conv_dist``: GP22's ``d(W_e, W_{e-1})`` = mean over *all* trainable matrices (classifier
  included) of ``||W_e - W_{e-1}||_F`` (epoch-to-epoch, on copies); the classifier's own
  numbers are the ``head_*`` columns of the epoch table;
- ``diverged``: True from the first epoch at which a parameter, a BN statistic or a loss is not
  finite; such epochs have NaN metrics (and no layer rows) and the run stops training, while the
  runs sharing its batch go on.

Caching: each run is one file ``<results_dir(cache)>/<key>.pt``, ``key`` = sha256 of the config
and of the source of the engine (this file, ``batched.py``, ``models.py``, ``metrics.py``,
``conventions.py``, ``data.py``). A re-run loads finished runs; a group that was interrupted
resumes from its last checkpoint (``checkpoint_every`` seconds; epoch granularity).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import conventions, metrics, runtime
from .batched import Arch, BatchedNet, supported

FORMAT = 1
LOSSES = ("ce", "mse")
DECAYS = ("all", "matrices")


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """One training run. ``lam`` is the papers' lambda (loss ``L + lam ||theta||^2``).

    Data: ``dataset``, ``n_train``/``n_test`` (None: all), ``data_seed`` (which subset),
    ``classes``, ``standardize`` -- passed to :func:`sgdrank.data.load_dataset`.
    Model: ``model`` (e.g. ``"MLP-BN-10-100"``), ``bias``, ``detach_var``, ``activation``.
    Training: ``batch_size``, ``lr``, ``lam``, ``epochs``, ``loss`` (``"ce"``/``"mse"``),
    ``seed`` (init and batch order), ``momentum``, ``lr_milestones``/``lr_gamma``, ``decay``
    (``"all"``/``"matrices"``), ``drop_last``.
    Recording: ``eval_train`` -- evaluate the whole training set after every epoch (default);
    False leaves ``train_loss``/``train_acc`` NaN (``batch_loss``/``batch_acc``, the running
    means over the epoch's mini-batches, are always recorded) and saves that cost.
    """
    model: str = "MLP-BN-10-100"
    dataset: str = "fashion-mnist"
    n_train: int | None = 5000
    n_test: int | None = 2000
    batch_size: int = 128
    lr: float = 0.1
    lam: float = 5e-4
    epochs: int = 30
    loss: str = "ce"
    seed: int = 0
    momentum: float = 0.0
    lr_milestones: tuple = ()
    lr_gamma: float = 0.2
    bias: bool = True
    detach_var: bool = False
    activation: str = "relu"
    decay: str = "all"
    drop_last: bool = True
    data_seed: int = 0
    classes: tuple | None = None
    standardize: bool = True
    eval_train: bool = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("model", str(self.model).strip().upper())
        set_("lr_milestones", tuple(int(m) for m in self.lr_milestones))
        if self.classes is not None:
            set_("classes", tuple(int(c) for c in self.classes))
        for k in ("lr", "lam", "momentum", "lr_gamma"):
            set_(k, float(getattr(self, k)))
        for k in ("batch_size", "epochs", "seed", "data_seed"):
            set_(k, int(getattr(self, k)))
        Arch(self.model, (1,), 1).parse()  # raises for an unknown model name
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: use one of {LOSSES}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}: use one of {DECAYS}")
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError(f"need batch_size >= 1 and epochs >= 0, got {self.batch_size}, {self.epochs}")
        if self.lr < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr >= 0 and 0 <= momentum < 1, got {self.lr}, {self.momentum}")
        conventions.torch_weight_decay(self.lam)  # raises for lam < 0

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during epoch ``epoch`` (1-based): ``lr * gamma^#{m < epoch}``."""
        return self.lr * self.lr_gamma ** sum(1 for m in self.lr_milestones if m < epoch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})

    def group_key(self) -> tuple:
        """Runs with equal group keys are trained as one batched computation."""
        return tuple(getattr(self, f) for f in GROUP_FIELDS)


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
#: the fields that select the data (arguments of sgdrank.data.load_dataset)
DATA_FIELDS = ("dataset", "n_train", "n_test", "data_seed", "classes", "standardize")
#: what a batch of runs must share (the rest -- lr, lam, seed, momentum, schedule -- is per run)
GROUP_FIELDS = ("model", "dataset", "n_train", "n_test", "data_seed", "classes", "standardize",
                "bias", "detach_var", "activation", "batch_size", "epochs", "loss", "decay", "drop_last",
                "eval_train")


def replace(cfg: Config, **changes) -> Config:
    """A copy of ``cfg`` with some fields changed (``dataclasses.replace``, validated)."""
    unknown = sorted(set(changes) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown Config field(s) {unknown}; fields are {', '.join(CONFIG_FIELDS)}")
    return dataclasses.replace(cfg, **changes)


def grid(base: Config, **axes: Sequence) -> list[Config]:
    """All combinations of ``axes`` (Config field -> values) applied to ``base``; the last axis
    varies fastest. ``grid(cfg, lr=[0.05, 0.1], seed=[0, 1])`` -> 4 configs."""
    unknown = sorted(set(axes) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown Config field(s) {unknown}; fields are {', '.join(CONFIG_FIELDS)}")
    names = list(axes)
    values = [list(v) if isinstance(v, (list, tuple, range, np.ndarray)) else [v] for v in axes.values()]
    return [dataclasses.replace(base, **dict(zip(names, combo))) for combo in itertools.product(*values)]


# --------------------------------------------------------------------------- batch order, keys
def _derive(*parts) -> int:
    h = hashlib.sha256(":".join(str(p) for p in ("sgdrank",) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def batch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of ``range(n)`` a run with ``seed`` visits in epoch ``epoch`` (CPU, int64).

    Drawn from a ``torch.Generator`` seeded by a hash of ``(seed, epoch)``, so each epoch's
    order depends on nothing else (not on the batch-mates, not on a resumed state)."""
    g = torch.Generator()
    g.manual_seed(_derive("order", int(seed), int(epoch)))
    return torch.randperm(int(n), generator=g)


def batches(seed: int, epoch: int, n: int, batch_size: int, drop_last: bool = True) -> list[torch.Tensor]:
    """The index batches of epoch ``epoch``: :func:`batch_order` cut into pieces of
    ``batch_size`` (the last partial piece dropped when ``drop_last``)."""
    perm = batch_order(seed, epoch, n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [perm[s:min(s + batch_size, stop)] for s in range(0, stop, batch_size)]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


ENGINE_FILES = ("sweep.py", "batched.py", "models.py", "metrics.py", "conventions.py", "data.py")
_CODE_HASH: str | None = None


def code_hash() -> str:
    """sha256 of the source files that determine a run's result (:data:`ENGINE_FILES`)."""
    global _CODE_HASH
    if _CODE_HASH is None:
        h = hashlib.sha256()
        here = Path(__file__).resolve().parent
        for name in ENGINE_FILES:
            p = here / name
            h.update(name.encode())
            h.update(p.read_bytes() if p.exists() else b"<missing>")
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH


def run_key(cfg: Config, data_fingerprint: str | None = None) -> str:
    """Cache key of a run: sha256 of the config (JSON), :func:`code_hash` and, for data passed
    in by hand, a fingerprint of the tensors. 20 hex digits."""
    payload = json.dumps(cfg.to_dict(), sort_keys=True) + "|" + code_hash() + "|" + (data_fingerprint or "")
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- data
@dataclass
class _Data:
    x: torch.Tensor            # (N, d) float32, on the device
    y: torch.Tensor | None     # (N,) int64 labels, None for regression
    t: torch.Tensor | None     # (N, C) float targets for mse
    xt: torch.Tensor
    yt: torch.Tensor | None
    tt: torch.Tensor | None
    in_shape: tuple
    out_dim: int


def _fingerprint(ds) -> str:
    cached = getattr(ds, "_sgdrank_fingerprint", None)
    if cached is not None:
        return cached
    fp = _fingerprint_tensors(ds)
    try:
        setattr(ds, "_sgdrank_fingerprint", fp)
    except (AttributeError, TypeError):
        pass
    return fp


def _fingerprint_tensors(ds) -> str:
    h = hashlib.sha256()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        t = getattr(ds, name, None)
        if t is not None:
            t = torch.as_tensor(t).detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:20]


def _resolve_dataset(cfg: Config, data):
    if data is None:
        from . import data as D  # noqa: N812  (imported lazily: written by another module)
        return D.load_dataset(cfg.dataset, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.data_seed,
                              classes=cfg.classes, standardize=cfg.standardize)
    if callable(data) and not isinstance(data, Mapping):
        return data(cfg)
    if isinstance(data, Mapping):
        try:
            return data[cfg.dataset]
        except KeyError:
            raise ValueError(f"dataset {cfg.dataset!r} not in the data passed to run(): {sorted(data)}") from None
    if hasattr(data, "x_train"):
        return data
    raise TypeError("data must be None, a dataset object, a mapping name -> dataset, or a callable(cfg)")


def _prepare(ds, loss: str, device) -> _Data:
    def flat(x):
        return torch.as_tensor(x).to(device=device, dtype=torch.float32).reshape(len(x), -1).contiguous()

    x, xt = flat(ds.x_train), flat(ds.x_test)
    y, yt = torch.as_tensor(ds.y_train), torch.as_tensor(ds.y_test)
    in_shape = tuple(getattr(ds, "input_shape", None) or tuple(torch.as_tensor(ds.x_train).shape[1:]))
    if y.is_floating_point():
        if loss != "mse":
            raise ValueError("this dataset has real-valued targets: use loss='mse'")
        t, tt = y.to(device, torch.float32).reshape(len(y), -1), yt.to(device, torch.float32).reshape(len(yt), -1)
        return _Data(x, None, t, xt, None, tt, in_shape, t.shape[1])
    C = int(getattr(ds, "n_classes", None) or int(max(y.max(), yt.max() if len(yt) else 0)) + 1)
    y, yt = y.to(device, torch.long), yt.to(device, torch.long)
    t = F.one_hot(y, C).float() if loss == "mse" else None
    tt = F.one_hot(yt, C).float() if loss == "mse" else None
    return _Data(x, y, t, xt, yt, tt, in_shape, C)


# --------------------------------------------------------------------------- records
EPOCH_METRICS = ("epoch", "step", "lr_now", "train_loss", "train_acc", "test_loss", "test_acc",
                 "batch_loss", "batch_acc", "conv_dist", "avg_rank", "avg_stable_rank",
                 "head_fro", "head_spec", "head_rank", "head_stable_rank", "head_delta", "diverged")
LAYER_METRICS = ("epoch", "layer", "index", "d_out", "d_in", "rank", "stable_rank", "fro", "spec",
                 "delta_fro", "sv")


def _new_record(cfg: Config, key: str, arch: Arch, engine: str, device) -> dict:
    return {"format": FORMAT, "key": key, "config": json.dumps(cfg.to_dict(), sort_keys=True),
            "arch": {"in_shape": list(arch.in_shape), "out_dim": arch.out_dim},
            "epochs": {k: [] for k in EPOCH_METRICS}, "layers": {k: [] for k in LAYER_METRICS},
            "state": None, "diverged_epoch": None, "seconds": 0.0, "engine": engine,
            "device": str(device), "torch": str(torch.__version__)}


def _nan_epoch(rec: dict, epoch: int, step: int, lr_now: float):
    row = {k: float("nan") for k in EPOCH_METRICS}
    row.update(epoch=epoch, step=step, lr_now=lr_now, diverged=True)
    for k, v in row.items():
        rec["epochs"][k].append(v)


# --------------------------------------------------------------------------- batched engine
def _train_batched(cfgs: list[Config], keys: list[str], d: _Data, device, bar, ckpt: Path | None,
                   checkpoint_every: float, on_epoch) -> list[dict]:
    c0 = cfgs[0]
    K, E, B = len(cfgs), c0.epochs, c0.batch_size
    arch = Arch(c0.model, d.in_shape, d.out_dim, c0.bias, c0.detach_var, c0.activation)
    net = BatchedNet(arch, K, device)
    for k, cfg in enumerate(cfgs):
        net.load_module(k, arch.build(seed=cfg.seed))
    recs = [_new_record(cfg, key, arch, "batched", device) for cfg, key in zip(cfgs, keys)]
    N = d.x.shape[0]
    n_full = N // B
    rem = 0 if c0.drop_last else N - n_full * B
    steps = n_full + (rem > 0)
    if steps == 0:
        raise ValueError(f"n_train={N} < batch_size={B} with drop_last=True: no step per epoch")
    alive = list(range(K))          # position in net -> index into cfgs
    prev = net.mat.clone()          # weight matrices at the end of the previous epoch
    start = 1
    t0 = time.perf_counter()
    group_id = hashlib.sha256("".join(keys).encode()).hexdigest()[:20]

    if ckpt is not None and ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        if st.get("group") == group_id:
            alive = list(st["alive"])
            net = BatchedNet(arch, len(alive), device)
            net.load_state(st["net"])
            prev = st["prev"].to(device)
            recs = st["recs"]
            start = st["epoch"] + 1
            if bar is not None:
                bar.update(K * st["epoch"] + K)

    def measure(epoch: int, lr_now: list, bsum=None, bcor=None, nseen: int = 0):
        """Record epoch ``epoch`` for every run in ``net``; drop the runs that diverged."""
        nonlocal net, alive, prev
        Kc = net.K
        nan = torch.full((Kc,), float("nan"), dtype=torch.float64, device=device)
        if c0.eval_train:
            tl, tc = net.evaluate(d.x, d.t, d.y, c0.loss)
            tl, tc = tl / N, (tc / N if tc is not None else None)
        else:
            tl, tc = nan, None
        nt = d.xt.shape[0]
        vl, vc = net.evaluate(d.xt, d.tt, d.yt, c0.loss)
        vl, vc = (vl / nt, vc / nt if vc is not None else None) if nt else (nan, None)
        fin = net.finite()
        if c0.eval_train:
            fin &= torch.isfinite(tl)
        if bsum is not None:
            fin &= torch.isfinite(bsum)
        fin = fin.cpu().tolist()
        bad = [j for j in range(Kc) if not fin[j]]
        for j in bad:
            r = alive[j]
            recs[r]["diverged_epoch"] = epoch
            for e in range(epoch, E + 1):
                _nan_epoch(recs[r], e, steps * e, cfgs[r].lr_at(e) if e else float("nan"))
        if bad:
            keep = [j for j in range(Kc) if fin[j]]
            keep_t = torch.as_tensor(keep, dtype=torch.long, device=device)
            prev = net.take_mat(prev, keep_t)
            tl, tc, vl, vc = (None if v is None else v.index_select(0, keep_t) for v in (tl, tc, vl, vc))
            if bsum is not None:
                bsum = bsum.index_select(0, keep_t)
                bcor = None if bcor is None else bcor.index_select(0, keep_t)
            lr_now = [lr_now[j] for j in keep]
            net = net.select(keep)
            alive = [alive[j] for j in keep]
        if not alive:
            return
        Kc = net.K
        # singular values of the matrices of all runs, batched per shape, in float64
        names = net.tracked + ["head.weight"]
        by_shape: dict[tuple, list[str]] = {}
        for n in names:
            by_shape.setdefault(tuple(net.shapes[n]), []).append(n)
        sv = {}
        for group in by_shape.values():
            s = metrics.batch_singular_values(torch.cat([net.P[n] for n in group]))
            for i, n in enumerate(group):
                sv[n] = s[i * Kc:(i + 1) * Kc]
        prevv = net.view_mat(prev)
        delta = {n: torch.linalg.matrix_norm((net.P[n] - prevv[n]).double()) for n in net.matrix_names}
        out = {
            "train_loss": tl, "train_acc": tc, "test_loss": vl, "test_acc": vc,
            "conv_dist": torch.stack([delta[n] for n in net.matrix_names]).mean(0),
            "sv": sv,
            "rank": {n: metrics.threshold_rank(sv[n]) for n in names},
            "stable": {n: metrics.stable_rank(sv[n]) for n in names},
            "fro": {n: torch.linalg.vector_norm(sv[n], dim=-1) for n in names},
            "delta": delta,
        }
        if bsum is not None:
            out["batch_loss"] = bsum / nseen
            out["batch_acc"] = bcor / nseen if bcor is not None else None
        out = _to_cpu(out)
        for j, r in enumerate(alive):
            rec = recs[r]
            ranks = [int(out["rank"][n][j]) for n in net.tracked]
            stab = [float(out["stable"][n][j]) for n in net.tracked]
            row = dict(
                epoch=epoch, step=steps * epoch, lr_now=lr_now[j] if epoch else float("nan"),
                train_loss=_f(out["train_loss"], j), train_acc=_f(out["train_acc"], j),
                test_loss=_f(out["test_loss"], j), test_acc=_f(out["test_acc"], j),
                batch_loss=_f(out.get("batch_loss"), j), batch_acc=_f(out.get("batch_acc"), j),
                conv_dist=float(out["conv_dist"][j]) if epoch else float("nan"),
                avg_rank=sum(ranks) / len(ranks), avg_stable_rank=sum(stab) / len(stab),
                head_fro=float(out["fro"]["head.weight"][j]), head_spec=float(out["sv"]["head.weight"][j][0]),
                head_rank=int(out["rank"]["head.weight"][j]), head_stable_rank=float(out["stable"]["head.weight"][j]),
                head_delta=float(out["delta"]["head.weight"][j]) if epoch else float("nan"), diverged=False)
            for k, v in row.items():
                rec["epochs"][k].append(v)
            L = rec["layers"]
            for i, n in enumerate(net.tracked):
                s = out["sv"][n][j]
                L["epoch"].append(epoch)
                L["layer"].append(net.layer_labels[n])
                L["index"].append(i)
                L["d_out"].append(net.shapes[n][0])
                L["d_in"].append(net.shapes[n][1])
                L["rank"].append(ranks[i])
                L["stable_rank"].append(stab[i])
                L["fro"].append(float(out["fro"][n][j]))
                L["spec"].append(float(s[0]))
                L["delta_fro"].append(float(out["delta"][n][j]) if epoch else float("nan"))
                L["sv"].append(s.clone())

    if start == 1:
        measure(0, [float("nan")] * K)
        if bar is not None:
            bar.update(K)
    last_ckpt = time.perf_counter()
    for epoch in range(start, E + 1):
        if not alive:
            if bar is not None:
                bar.update(K)
            continue
        Kc = net.K
        lr_now = [cfgs[r].lr_at(epoch) for r in alive]
        net.set_hyper(lr_now, [conventions.torch_weight_decay(cfgs[r].lam) for r in alive],
                      [cfgs[r].momentum for r in alive], decay_vectors=c0.decay == "all")
        perm = torch.stack([batch_order(cfgs[r].seed, epoch, N) for r in alive]).to(device)
        order = perm[:, :n_full * B].reshape(Kc, n_full, B).transpose(0, 1).contiguous()
        bsum = torch.zeros(Kc, dtype=torch.float32, device=device)
        bcor = torch.zeros(Kc, dtype=torch.float32, device=device) if d.y is not None else None
        pieces = [order[s] for s in range(n_full)]
        if rem:
            pieces.append(perm[:, n_full * B:].contiguous())
        with torch.inference_mode():  # no autograd bookkeeping: the backward pass is by hand
            _train_epoch(net, d, pieces, c0.loss, bsum, bcor)
        measure(epoch, lr_now, bsum, bcor, N if rem else n_full * B)
        prev = net.mat.clone()
        if bar is not None:
            bar.update(K)
        if ckpt is not None and epoch < E and time.perf_counter() - last_ckpt >= checkpoint_every:
            _atomic_save({"group": group_id, "epoch": epoch, "alive": alive, "net": net.state(),
                          "prev": prev.cpu(), "recs": recs}, ckpt)
            last_ckpt = time.perf_counter()
        if on_epoch is not None:
            on_epoch(epoch, [cfgs[r] for r in alive])
    for j, r in enumerate(alive):
        recs[r]["state"] = net.state_dict(j)
    secs = (time.perf_counter() - t0) / K
    for rec in recs:
        rec["seconds"] += secs
    return recs


def _train_epoch(net: BatchedNet, d: _Data, pieces: list[torch.Tensor], loss: str, bsum, bcor):
    """The SGD steps of one epoch: ``pieces`` are ``(K, b)`` index batches, one row per run."""
    K = net.K
    for idx in pieces:
        b = idx.shape[1]
        flat = idx.reshape(-1)
        xb = d.x.index_select(0, flat).view(K, b, -1)
        yb = d.y.index_select(0, flat).view(K, b) if d.y is not None else None
        tb = d.t.index_select(0, flat).view(K, b, -1) if d.t is not None else None
        lval, corr = net.train_step(xb, tb, yb, loss, update=True)
        bsum.add_(lval, alpha=b)
        if corr is not None:
            bcor.add_(corr)


def _f(v, j) -> float:
    return float("nan") if v is None else float(v[j])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- one-at-a-time engine
def _train_loop(cfg: Config, key: str, d: _Data, device, bar, on_epoch) -> dict:
    """Reference engine: one ``nn.Module`` and ``torch.optim.SGD``, same batch order and
    conventions as the batched engine. Used for CONV models and as ``engine="loop"``."""
    arch = Arch(cfg.model, d.in_shape, d.out_dim, cfg.bias, cfg.detach_var, cfg.activation)
    model = arch.build(seed=cfg.seed).to(device=device, dtype=torch.float32)
    rec = _new_record(cfg, key, arch, "loop", device)
    t0 = time.perf_counter()
    wd = conventions.torch_weight_decay(cfg.lam)
    if cfg.decay == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": wd}]
    else:
        mats = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": mats, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    N, E = d.x.shape[0], cfg.epochs
    steps = steps_per_epoch(N, cfg.batch_size, cfg.drop_last)
    if steps == 0:
        raise ValueError(f"n_train={N} < batch_size={cfg.batch_size} with drop_last=True: no step per epoch")

    def loss_fn(out, y, t):
        return F.cross_entropy(out, y) if cfg.loss == "ce" else F.mse_loss(out, t)

    @torch.no_grad()
    def evaluate(x, y, t):
        model.eval()
        if x.shape[0] == 0:
            return float("nan"), float("nan")
        tot, cor = 0.0, 0.0
        for s in range(0, x.shape[0], 1024):
            out = model(x[s:s + 1024])
            if cfg.loss == "ce":
                tot += float(F.cross_entropy(out, y[s:s + 1024], reduction="sum"))
            else:
                tot += float(((out - t[s:s + 1024]) ** 2).mean(-1).sum())
            if y is not None:
                cor += float((out.argmax(-1) == y[s:s + 1024]).sum())
        model.train()
        return tot / x.shape[0], (cor / x.shape[0] if y is not None else float("nan"))

    prev = metrics.snapshot(model)
    path = {id(m): n for n, m in model.named_modules()}
    layers = [(label, f"{path[id(m)]}.weight") for label, m in model.rank_layers()]
    for epoch in range(0, E + 1):
        bl = bc = float("nan")
        lr_now = float("nan")
        if epoch:
            lr_now = cfg.lr_at(epoch)
            for g in opt.param_groups:
                g["lr"] = lr_now
            model.train()
            bsum = torch.zeros((), dtype=torch.float32, device=device)
            bcor = torch.zeros((), dtype=torch.float32, device=device)
            for idx in batches(cfg.seed, epoch, N, cfg.batch_size, cfg.drop_last):
                idx = idx.to(device)
                xb = d.x.index_select(0, idx)
                yb = d.y.index_select(0, idx) if d.y is not None else None
                tb = d.t.index_select(0, idx) if d.t is not None else None
                out = model(xb)
                loss = loss_fn(out, yb, tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bsum += loss.detach() * len(idx)
                if yb is not None:
                    bcor += (out.argmax(-1) == yb).sum()
            nseen = steps * cfg.batch_size if cfg.drop_last else N
            bl, bc = float(bsum) / nseen, (float(bcor) / nseen if d.y is not None else float("nan"))
        tl, ta = evaluate(d.x, d.y, d.t) if cfg.eval_train else (float("nan"), float("nan"))
        finite = all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
        if not (finite and (math.isfinite(tl) or not cfg.eval_train) and (epoch == 0 or math.isfinite(bl))):
            rec["diverged_epoch"] = epoch
            for e in range(epoch, E + 1):
                _nan_epoch(rec, e, steps * e, cfg.lr_at(e) if e else float("nan"))
            if bar is not None:
                bar.update(E + 1 - epoch)
            break
        vl, va = evaluate(d.xt, d.yt, d.tt)
        snap = metrics.snapshot(model)
        cd = metrics.convergence_distance(prev, snap) if epoch else float("nan")
        rows = metrics.layer_table(model)
        hs = metrics.singular_values(model.head.weight)
        head_delta = float(torch.linalg.matrix_norm((snap["head.weight"] - prev["head.weight"]).double()))
        for i, ((name, key_w), r) in enumerate(zip(layers, rows)):
            L = rec["layers"]
            L["epoch"].append(epoch)
            L["layer"].append(name)
            L["index"].append(i)
            L["d_out"].append(r["shape"][0])
            L["d_in"].append(r["shape"][1])
            for k in ("rank", "stable_rank", "fro", "spec"):
                L[k].append(r[k])
            dl = float(torch.linalg.matrix_norm((snap[key_w] - prev[key_w]).double())) if epoch else float("nan")
            L["delta_fro"].append(dl)
            L["sv"].append(torch.as_tensor(r["sv"]).clone())
        row = dict(epoch=epoch, step=steps * epoch, lr_now=lr_now, train_loss=tl, train_acc=ta,
                   test_loss=vl, test_acc=va, batch_loss=bl, batch_acc=bc, conv_dist=cd,
                   avg_rank=sum(r["rank"] for r in rows) / len(rows),
                   avg_stable_rank=sum(r["stable_rank"] for r in rows) / len(rows),
                   head_fro=float(torch.linalg.vector_norm(hs)), head_spec=float(hs[0]),
                   head_rank=int(metrics.threshold_rank(hs)), head_stable_rank=float(metrics.stable_rank(hs)),
                   head_delta=head_delta if epoch else float("nan"), diverged=False)
        for k, v in row.items():
            rec["epochs"][k].append(v)
        prev = snap
        if bar is not None:
            bar.update(1)
        if on_epoch is not None and epoch:
            on_epoch(epoch, [cfg])
    if rec["diverged_epoch"] is None:
        rec["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    rec["seconds"] = time.perf_counter() - t0
    return rec


# --------------------------------------------------------------------------- results
class Result:
    """The records of a sweep, in the order of the configs given to :func:`run`.

    - ``epochs``: one row per run x epoch: ``run_id``, ``key``, every :class:`Config` field,
      then ``epoch`` (0 = init), ``step``, ``lr_now``, ``train_loss``, ``train_acc``,
      ``test_loss``, ``test_acc``, ``batch_loss``, ``batch_acc``, ``conv_dist``, ``avg_rank``
      (mean threshold rank of the rank-tracked layers, atol 1e-3), ``avg_stable_rank``,
      ``head_fro``, ``head_spec``, ``head_rank``, ``head_stable_rank``, ``head_delta``, ``diverged``.
    - ``layers``: one row per run x epoch x rank-tracked layer (no rows for diverged epochs):
      ``run_id``, ``key``, the config, ``epoch``, ``layer`` (e.g. ``"W3"``, ``"block2.W1"``),
      ``index`` (0-based position), ``d_out``, ``d_in``, ``rank`` (atol 1e-3), ``stable_rank``,
      ``fro``, ``spec``, ``delta_fro``, ``sv`` (``np.ndarray`` float64, descending).
    - ``runs``: one row per run: config, ``diverged_epoch`` (NaN if none), final metrics,
      ``cached`` (loaded from disk), ``seconds`` (its share of its group's wall time).
    """

    def __init__(self, configs: list[Config], records: list[dict], cached: list[bool]):
        self.configs = list(configs)
        self.records = list(records)
        self.cached = list(cached)
        self._epochs = self._layers = None

    def __len__(self):
        return len(self.configs)

    def __repr__(self):
        return (f"<sweep.Result: {len(self)} runs ({sum(self.cached)} from cache), "
                f"{sum(r['diverged_epoch'] is not None for r in self.records)} diverged>")

    @property
    def n_loaded(self) -> int:
        return sum(self.cached)

    @property
    def n_trained(self) -> int:
        return len(self) - sum(self.cached)

    def _config_cols(self, i: int) -> dict:
        return {"run_id": i, "key": self.records[i]["key"], **self.configs[i].to_dict()}

    def _tidy(self, frame: Callable[[dict], pd.DataFrame]) -> pd.DataFrame:
        """One table of all runs: ``frame(record)`` per run, its config columns in front."""
        frames = []
        for i, rec in enumerate(self.records):
            df = frame(rec)
            for k, v in reversed(list(self._config_cols(i).items())):
                df.insert(0, k, [v] * len(df))
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def epochs(self) -> pd.DataFrame:
        if self._epochs is None:
            out = self._tidy(lambda rec: pd.DataFrame(rec["epochs"], columns=list(EPOCH_METRICS)))
            if len(out):
                out["diverged"] = out["diverged"].astype(bool)
                out["head_rank"] = out["head_rank"].astype(float)
            self._epochs = out
        return self._epochs

    @property
    def layers(self) -> pd.DataFrame:
        if self._layers is None:
            def layer_frame(rec):
                L = dict(rec["layers"])
                L["sv"] = [np.asarray(torch.as_tensor(s).double().numpy()) for s in L["sv"]]
                return pd.DataFrame(L, columns=list(LAYER_METRICS))

            out = self._tidy(layer_frame)
            if len(out):
                out["rank"] = out["rank"].astype(int)
            self._layers = out
        return self._layers

    @property
    def runs(self) -> pd.DataFrame:
        rows = []
        for i, rec in enumerate(self.records):
            last = {k: v[-1] for k, v in rec["epochs"].items() if v}
            de = rec["diverged_epoch"]
            rows.append({**self._config_cols(i), "diverged_epoch": float("nan") if de is None else de,
                         "final_train_loss": last.get("train_loss"), "final_train_acc": last.get("train_acc"),
                         "final_test_loss": last.get("test_loss"), "final_test_acc": last.get("test_acc"),
                         "final_avg_rank": last.get("avg_rank"), "cached": self.cached[i],
                         "seconds": rec["seconds"], "engine": rec["engine"]})
        return pd.DataFrame(rows)

    def ranks(self, atol: float | None = None, rtol: float | None = None) -> pd.Series:
        """Threshold rank of every row of :attr:`layers` recomputed from its singular values:
        ``atol`` relative to ``||W||_F`` (the authors' rule) or ``rtol`` relative to ``s_1``
        (:func:`sgdrank.metrics.threshold_rank`). Aligned with ``res.layers.index``."""
        if atol is None and rtol is None:
            atol = metrics.DEFAULT_ATOL
        vals = [int(metrics.threshold_rank(torch.from_numpy(s), atol=atol, rtol=rtol)) for s in self.layers["sv"]]
        return pd.Series(vals, index=self.layers.index, name="rank", dtype=int)

    def _index(self, run) -> int:
        if isinstance(run, Config):
            return self.configs.index(run)
        return int(run)

    def state_dict(self, run) -> dict[str, torch.Tensor]:
        """Final ``state_dict`` of run ``run`` (``run_id`` or its Config). Raises if it diverged."""
        i = self._index(run)
        rec = self.records[i]
        if rec["state"] is None:
            raise ValueError(f"run {i} diverged at epoch {rec['diverged_epoch']}: it has no final weights")
        return {k: v.clone() for k, v in rec["state"].items()}

    def model(self, run) -> nn.Module:
        """Final weights of run ``run`` (``run_id`` or its Config) as the ``nn.Module`` of
        :func:`sgdrank.models.build_model`, in eval mode, on the CPU."""
        i = self._index(run)
        cfg, rec = self.configs[i], self.records[i]
        arch = Arch(cfg.model, tuple(rec["arch"]["in_shape"]), rec["arch"]["out_dim"], cfg.bias,
                    cfg.detach_var, cfg.activation)
        m = arch.build().float()
        m.load_state_dict(self.state_dict(i))
        return m.eval()


# --------------------------------------------------------------------------- run
def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cache_dir(cache) -> Path | None:
    if cache is None or cache is False:
        return None
    if isinstance(cache, Path) or (isinstance(cache, str) and (os.sep in cache or cache.startswith("."))):
        p = Path(cache)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return runtime.results_dir(str(cache))


def _load_record(path: Path) -> dict | None:
    try:
        rec = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated or foreign file: recompute
        warnings.warn(f"cannot read cached run {path} ({type(err).__name__}); recomputing it")
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None


def run(configs: Config | Iterable[Config], cache: str | Path | None = None, *, progress: bool = True,
        device: str | torch.device | None = None, data: Any = None, engine: str = "auto",
        max_k: int | None = None, checkpoint_every: float = 60.0,
        on_epoch: Callable[[int, list], None] | None = None) -> Result:
    """Train ``configs`` (or load them from the cache) and return their :class:`Result`.

    Runs that share :data:`GROUP_FIELDS` are trained together as one batched computation
    (at most ``max_k`` at a time; default: as many as fit ~2^26 parameters per buffer on a
    CPU, 2^28 on a GPU). Each keeps its own init seed, batch order, lr, lam, momentum, schedule;
    its result does not depend on its batch-mates.

    - ``cache``: a chapter name (files under :func:`sgdrank.runtime.results_dir`), a path, or
      None (no cache). One file per run, named by :func:`run_key`.
    - ``device``: default :func:`sgdrank.runtime.pick_device`. Data stays on the device; the
      host synchronises once per epoch (metrics), never per step.
    - ``data``: None (``sgdrank.data.load_dataset`` from the config), one dataset object, a
      mapping ``dataset name -> dataset`` or a callable ``cfg -> dataset`` (objects with
      ``x_train, y_train, x_test, y_test`` and ``n_classes``); the cache key then includes a
      fingerprint of the tensors.
    - ``engine``: ``"batched"``, ``"loop"`` (one ``nn.Module`` at a time; any model, CONV
      included) or ``"auto"`` (batched where supported, loop for CONV).
    - ``checkpoint_every``: seconds between checkpoints of a group in training (resume after an
      interruption); 0 = every epoch.
    - ``on_epoch(epoch, configs)``: called after each trained epoch.
    """
    cfgs = [configs] if isinstance(configs, Config) else list(configs)
    if not all(isinstance(c, Config) for c in cfgs):
        raise TypeError("run() takes a Config or a list of Configs (see sweep.grid)")
    if engine not in ("auto", "batched", "loop"):
        raise ValueError(f"unknown engine {engine!r}: use 'auto', 'batched' or 'loop'")
    device = runtime.pick_device(device) if not isinstance(device, torch.device) else device
    folder = _cache_dir(cache)

    # keys (custom data: include a fingerprint of the tensors)
    datasets: dict[int, Any] = {}
    fps: dict[int, str] = {}
    keys = []
    for c in cfgs:
        fp = None
        if data is not None:
            ds = _resolve_dataset(c, data)
            if id(ds) not in fps:
                datasets[id(ds)] = ds
                fps[id(ds)] = _fingerprint(ds)
            fp = fps[id(ds)]
        keys.append(run_key(c, fp))

    records: list[dict | None] = [None] * len(cfgs)
    cached = [False] * len(cfgs)
    if folder is not None:
        for i, k in enumerate(keys):
            p = folder / f"{k}.pt"
            if p.exists():
                rec = _load_record(p)
                if rec is not None:
                    records[i], cached[i] = rec, True
    # duplicates of one config are trained once
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if records[i] is None and k not in todo:
            todo[k] = i

    groups: dict[tuple, list[int]] = {}
    for k, i in todo.items():
        groups.setdefault(cfgs[i].group_key(), []).append(i)
    total = sum(cfgs[i].epochs + 1 for i in range(len(cfgs)))
    done = sum(cfgs[i].epochs + 1 for i in range(len(cfgs)) if records[i] is not None)
    bar = None
    if progress and todo:
        from .progress import counter
        bar = counter(total=total, initial=done, desc="sweep", unit="run-epoch")
    prepared: tuple | None = None  # (data key, dataset object kept alive, _Data): one at a time
    try:
        for gi, (gkey, idxs) in enumerate(groups.items()):
            c0 = cfgs[idxs[0]]
            dkey = (tuple(getattr(c0, f) for f in DATA_FIELDS), c0.loss)
            if prepared is None or prepared[0] != dkey or (data is not None and prepared[1] is not _resolve_dataset(c0, data)):
                ds = _resolve_dataset(c0, data)
                prepared = (dkey, ds, _prepare(ds, c0.loss, device))
            d = prepared[2]
            arch = Arch(c0.model, d.in_shape, d.out_dim, c0.bias, c0.detach_var, c0.activation)
            use_loop = engine == "loop" or (engine == "auto" and not supported(arch))
            if bar is not None:
                bar.set_description(f"sweep {c0.model} B={c0.batch_size} [{gi + 1}/{len(groups)}]")
            if use_loop:
                for i in idxs:
                    rec = _train_loop(cfgs[i], keys[i], d, device, bar, on_epoch)
                    records[i] = rec
                    if folder is not None:
                        _atomic_save(rec, folder / f"{keys[i]}.pt")
                continue
            if max_k is None:
                per_run = sum(p.numel() for p in arch.build().parameters())
                budget = 2**28 if device.type == "cuda" else 2**26
                kmax = max(1, budget // per_run)
            else:
                kmax = max(1, int(max_k))
            for s in range(0, len(idxs), kmax):
                chunk = idxs[s:s + kmax]
                ck = None
                if folder is not None:
                    gid = hashlib.sha256("".join(keys[i] for i in chunk).encode()).hexdigest()[:20]
                    ck = folder / f"_partial_{gid}.pt"
                recs = _train_batched([cfgs[i] for i in chunk], [keys[i] for i in chunk], d, device, bar,
                                      ck, checkpoint_every, on_epoch)
                for i, rec in zip(chunk, recs):
                    records[i] = rec
                    if folder is not None:
                        _atomic_save(rec, folder / f"{keys[i]}.pt")
                if ck is not None and ck.exists():
                    ck.unlink()
    finally:
        if bar is not None:
            bar.close()
    for i, k in enumerate(keys):  # duplicates
        if records[i] is None:
            records[i] = records[todo[k]]
    return Result(cfgs, records, cached)


def load(configs: Config | Iterable[Config], cache: str | Path, data: Any = None) -> Result:
    """The cached results of ``configs``; raises (naming the missing runs) if any is not cached."""
    cfgs = [configs] if isinstance(configs, Config) else list(configs)
    folder = _cache_dir(cache)
    recs, missing = [], []
    for i, c in enumerate(cfgs):
        fp = _fingerprint(_resolve_dataset(c, data)) if data is not None else None
        rec = _load_record(folder / f"{run_key(c, fp)}.pt")
        if rec is None:
            missing.append(i)
        recs.append(rec)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(cfgs)} runs are not in the cache {str(folder)!r} "
                                f"(e.g. run {missing[0]}: {cfgs[missing[0]]}); compute them with sweep.run")
    return Result(cfgs, recs, [True] * len(cfgs))
