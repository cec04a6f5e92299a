"""The data of a sweep group as tensors on the training device, and how a run's data is found.

:func:`resolve` turns the ``data`` argument of :func:`sgdrank.sweep.run` (None, a dataset, a
mapping name -> dataset, or a callable ``cfg -> dataset``) into one dataset object;
:func:`prepare` flattens its inputs to ``(N, d)`` float32 on the device and builds the targets
of the loss (int64 labels; one-hot float targets for ``"mse"``; real targets for regression);
:func:`fingerprint` hashes hand-passed tensors for the cache key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from .runconfig import Config


@dataclass
class GroupData:
    """Training (``x, y, t``) and test (``xt, yt, tt``) tensors of one group, on its device."""
    x: torch.Tensor            # (N, d) float32, on the device
    y: torch.Tensor | None     # (N,) int64 labels, None for regression
    t: torch.Tensor | None     # (N, C) float targets for mse
    xt: torch.Tensor
    yt: torch.Tensor | None
    tt: torch.Tensor | None
    in_shape: tuple
    out_dim: int


def fingerprint(ds) -> str:
    """sha256 (20 hex digits) of a dataset's tensors, cached on the object."""
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


def resolve(cfg: Config, data):
    """The dataset object of run ``cfg`` (see the module docstring for what ``data`` may be)."""
    if data is None:
        from . import data as D  # noqa: N812  (lazy: torchvision is imported only when needed)
        return D.load_dataset(cfg.dataset, n_train=cfg.n_train, n_test=cfg.n_test,
                              seed=cfg.data_seed, classes=cfg.classes,
                              standardize=cfg.standardize)
    if callable(data) and not isinstance(data, Mapping):
        return data(cfg)
    if isinstance(data, Mapping):
        try:
            return data[cfg.dataset]
        except KeyError:
            raise ValueError(f"dataset {cfg.dataset!r} not in the data passed to run(): "
                             f"{sorted(data)}") from None
    if hasattr(data, "x_train"):
        return data
    raise TypeError("data must be None, a dataset object, a mapping name -> dataset, "
                    "or a callable(cfg)")


def prepare(ds, loss: str, device) -> GroupData:
    """``ds`` as device tensors for ``loss`` (inputs flattened; ``in_shape`` kept for CONV/zoo)."""
    def flat(x):
        x = torch.as_tensor(x).to(device=device, dtype=torch.float32)
        return x.reshape(len(x), -1).contiguous()

    x, xt = flat(ds.x_train), flat(ds.x_test)
    y, yt = torch.as_tensor(ds.y_train), torch.as_tensor(ds.y_test)
    in_shape = tuple(getattr(ds, "input_shape", None)
                     or tuple(torch.as_tensor(ds.x_train).shape[1:]))
    if y.is_floating_point():
        if loss != "mse":
            raise ValueError("this dataset has real-valued targets: use loss='mse'")
        t = y.to(device, torch.float32).reshape(len(y), -1)
        tt = yt.to(device, torch.float32).reshape(len(yt), -1)
        return GroupData(x, None, t, xt, None, tt, in_shape, t.shape[1])
    C = int(getattr(ds, "n_classes", None) or int(max(y.max(), yt.max() if len(yt) else 0)) + 1)
    y, yt = y.to(device, torch.long), yt.to(device, torch.long)
    t = F.one_hot(y, C).float() if loss == "mse" else None
    tt = F.one_hot(yt, C).float() if loss == "mse" else None
    return GroupData(x, y, t, xt, yt, tt, in_shape, C)

