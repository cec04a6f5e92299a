"""What one sweep run is: its configuration (:class:`Config`), the learning-rate schedule
(:meth:`Config.lr_at`), the batch order of every epoch (:func:`batch_order`) and which epochs are
recorded (:func:`recorded_epochs`). Nothing here touches a network; the engines
(:mod:`sgdrank.engine_batched`, :mod:`sgdrank.engine_loop`) read these and nothing else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from . import conventions
from .batched import Arch

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
    Recording: ``eval_train`` -- evaluate the whole training set at every recorded epoch
    (default); False leaves ``train_loss``/``train_acc`` NaN (``batch_loss``/``batch_acc``, the
    running means over the epoch's mini-batches, are always recorded) and saves that cost.
    ``record_every`` -- record epochs ``0, k, 2k, ...`` and the last one (:func:`recorded_epochs`;
    default 1: every epoch). Recording (evaluation, singular values) is what costs time in short
    epochs; training is the same whatever ``k`` is.
    ``spectra`` -- at which recorded epochs the singular values (and so the layer rows, ranks,
    stable ranks and the ``head_*``/``avg_*`` columns) are computed (:meth:`spectra_at`):
    ``"all"`` (default: every recorded epoch), ``"ends"`` (initialisation and last epoch),
    ``"log<n>"`` (about ``n`` log-spaced epochs plus 0 and the last, e.g. ``"log8"``) or
    ``"every<k>"`` (epochs ``0, k, 2k, ...`` and the last). Losses, accuracies and ``conv_dist``
    are recorded at every recorded epoch whatever ``spectra`` is. ``svd_dtype`` --
    ``"float64"`` (default) or ``"float32"``: the precision of those SVDs (values are stored as
    float64 either way; the float32 error is measured in ``benchmarks/README.md``, far below the
    rank tolerances). ``tf32`` -- allow TF32 in CUDA matrix products and cuDNN convolutions
    (default False: full float32, the same arithmetic on every GPU model; a no-op on the CPU).
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
    record_every: int = 1
    spectra: str = "all"
    svd_dtype: str = "float64"
    tf32: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("model", str(self.model).strip().upper())
        set_("lr_milestones", tuple(int(m) for m in self.lr_milestones))
        if self.classes is not None:
            set_("classes", tuple(int(c) for c in self.classes))
        for k in ("lr", "lam", "momentum", "lr_gamma"):
            set_(k, float(getattr(self, k)))
        for k in ("batch_size", "epochs", "seed", "data_seed", "record_every"):
            set_(k, int(getattr(self, k)))
        Arch(self.model, (1,), 1).parse()  # raises for an unknown model name
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: use one of {LOSSES}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}: use one of {DECAYS}")
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError(f"need batch_size >= 1 and epochs >= 0, "
                             f"got {self.batch_size}, {self.epochs}")
        if self.record_every < 1:
            raise ValueError(f"need record_every >= 1 (record every k-th epoch), "
                             f"got {self.record_every}")
        if self.lr < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr >= 0 and 0 <= momentum < 1, got {self.lr}, {self.momentum}")
        conventions.torch_weight_decay(self.lam)  # raises for lam < 0
        set_("spectra", str(self.spectra).strip().lower())
        _spectra_rule(self.spectra)  # raises for an unknown schedule
        if self.svd_dtype not in SVD_DTYPES:
            raise ValueError(f"unknown svd_dtype {self.svd_dtype!r}: use one of {SVD_DTYPES}")
        set_("tf32", bool(self.tf32))

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during epoch ``epoch`` (1-based): ``lr * gamma^#{m < epoch}``."""
        return self.lr * self.lr_gamma ** sum(1 for m in self.lr_milestones if m < epoch)

    def recorded(self, epoch: int) -> bool:
        """True when epoch ``epoch`` (0 = init) is recorded: a multiple of ``record_every``, or
        the last epoch."""
        return epoch % self.record_every == 0 or epoch == self.epochs

    def spectra_at(self, epoch: int) -> bool:
        """True when recorded epoch ``epoch`` also records singular values (``spectra``); always
        True at 0 and at the last epoch."""
        if not self.recorded(epoch):
            return False
        kind, n = _spectra_rule(self.spectra)
        if kind == "all" or epoch in (0, self.epochs):
            return True
        if kind == "ends":
            return False
        if kind == "every":
            return epoch % n == 0
        return epoch in _log_epochs(self, n)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v)
                      for k, v in d.items() if k in names})

    def group_key(self) -> tuple:
        """Runs with equal group keys are trained as one batched computation."""
        return tuple(getattr(self, f) for f in GROUP_FIELDS)


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
#: the fields that select the data (arguments of sgdrank.data.load_dataset)
DATA_FIELDS = ("dataset", "n_train", "n_test", "data_seed", "classes", "standardize")
#: what a batch of runs must share (the rest -- lr, lam, seed, momentum, schedule -- is per run)
GROUP_FIELDS = ("model", "dataset", "n_train", "n_test", "data_seed", "classes", "standardize",
                "bias", "detach_var", "activation", "batch_size", "epochs", "loss", "decay",
                "drop_last", "eval_train", "record_every", "spectra", "svd_dtype", "tf32")
SVD_DTYPES = ("float64", "float32")


def _spectra_rule(spec: str) -> tuple[str, int]:
    """``("all"|"ends", 0)``, ``("log", n)`` or ``("every", k)`` from a ``spectra`` string."""
    if spec in ("all", "ends"):
        return spec, 0
    for kind in ("log", "every"):
        if spec.startswith(kind) and spec[len(kind):].isdigit() and int(spec[len(kind):]) >= 1:
            return kind, int(spec[len(kind):])
    raise ValueError(f"unknown spectra schedule {spec!r}: use 'all', 'ends', 'log<n>' "
                     f"(e.g. 'log8') or 'every<k>' (e.g. 'every10')")


def _log_epochs(cfg: Config, n: int) -> frozenset:
    """About ``n`` log-spaced epochs in ``1..epochs``, each moved up to the next recorded one."""
    E = cfg.epochs
    out = set()
    for i in range(n):
        e = max(1, min(E, round(E ** (i / max(1, n - 1))))) if n > 1 else E
        while not cfg.recorded(e):
            e += 1
        out.add(e)
    return frozenset(out)


def replace(cfg: Config, **changes) -> Config:
    """A copy of ``cfg`` with some fields changed (``dataclasses.replace``, validated)."""
    unknown = sorted(set(changes) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown Config field(s) {unknown}; "
                         f"fields are {', '.join(CONFIG_FIELDS)}")
    return dataclasses.replace(cfg, **changes)


def grid(base: Config, **axes: Sequence) -> list[Config]:
    """All combinations of ``axes`` (Config field -> values) applied to ``base``; the last axis
    varies fastest. ``grid(cfg, lr=[0.05, 0.1], seed=[0, 1])`` -> 4 configs."""
    unknown = sorted(set(axes) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown Config field(s) {unknown}; "
                         f"fields are {', '.join(CONFIG_FIELDS)}")
    names = list(axes)
    values = [list(v) if isinstance(v, (list, tuple, range, np.ndarray)) else [v]
              for v in axes.values()]
    return [dataclasses.replace(base, **dict(zip(names, combo)))
            for combo in itertools.product(*values)]


# --------------------------------------------------------------------------- batch order
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


def batches(seed: int, epoch: int, n: int, batch_size: int,
            drop_last: bool = True) -> list[torch.Tensor]:
    """The index batches of epoch ``epoch``: :func:`batch_order` cut into pieces of
    ``batch_size`` (the last partial piece dropped when ``drop_last``)."""
    perm = batch_order(seed, epoch, n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [perm[s:min(s + batch_size, stop)] for s in range(0, stop, batch_size)]


def on_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (a batch order) moved to ``device`` in one copy: pinned and asynchronous on CUDA,
    so the host does not wait for it (the engines move an epoch's order once, never per step)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """SGD steps in one epoch over ``n`` samples: ``n // B`` (``drop_last``), else
    ``ceil(n / B)``."""
    return n // batch_size if drop_last else -(-n // batch_size)


def recorded_epochs(cfg: Config) -> list[int]:
    """The epochs a run records, ascending: ``0, k, 2k, ...`` (``k = record_every``) and
    ``cfg.epochs``."""
    return [e for e in range(cfg.epochs + 1) if cfg.recorded(e)]

