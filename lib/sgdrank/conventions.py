"""The book's one weight-decay convention, and conversions to PyTorch's.

The papers (and this book) write the regularised objective as

    L^lambda(W) = L(W) + lambda * ||W||_F^2 ,

so one SGD step with learning rate mu is

    W <- W - mu * (grad L(W) + 2 * lambda * W) = (1 - 2 mu lambda) W - mu grad L(W).

PyTorch's ``torch.optim.SGD(weight_decay=wd)`` adds ``wd * W`` to the gradient, i.e. it
multiplies W by ``(1 - lr * wd)``. Hence ``wd = 2 * lambda``. The authors' public code passed
the papers' lambda straight into ``weight_decay`` (so their runs used half the stated decay);
every function in :mod:`sgdrank` takes the papers' ``lam`` and converts here.
"""
from __future__ import annotations


def torch_weight_decay(lam: float) -> float:
    """PyTorch ``weight_decay`` equivalent to the papers' ``lambda`` (``wd = 2 lambda``)."""
    if lam < 0:
        raise ValueError(f"weight decay lambda must be >= 0, got {lam}")
    return 2.0 * lam


def paper_lambda(weight_decay: float) -> float:
    """The papers' ``lambda`` equivalent to PyTorch's ``weight_decay`` (``lambda = wd / 2``)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return weight_decay / 2.0


def decay_factor(lr: float, lam: float) -> float:
    """Per-step multiplicative shrink of W from weight decay alone: ``1 - 2 mu lambda``."""
    return 1.0 - 2.0 * lr * lam
