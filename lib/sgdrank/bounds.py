"""GSGP Theorem 3.3 (claim C7): how close SGD with weight decay keeps each weight matrix to a
low-rank matrix, evaluated on both sides.

Unrolling k steps of ``W_{s+1} = (1 - 2 mu lambda) W_s - mu G_s`` (constant mu) gives

    W_t = (1 - 2 mu lambda)^k W_{t-k} - mu sum_{l=1}^{k} (1 - 2 mu lambda)^{l-1} G_{t-l},

and each batch gradient ``G_s`` has rank <= N B (Chapter 1: N patches, B samples), so the sum
``U`` has rank <= N B k. With ``W = U / ||W_t||`` as the competitor,

    min_{rank(V) <= N B k} || W_t / ||W_t|| - V ||  <=  (1 - 2 mu lambda)^k ||W_{t-k}|| / ||W_t||,

in any norm (here Frobenius, the norm the Eckart-Young computation of the left side uses).
With a learning-rate schedule the factor is ``prod_l (1 - 2 mu_{t-l} lambda)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def lowrank_distance(s: Sequence[float], r: int) -> float:
    """Frobenius distance from a matrix with singular values ``s`` to the nearest matrix of rank
    <= r (Eckart-Young): ``sqrt(sum_{i > r} s_i^2)``; 0 once ``r >= len(s)``."""
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    return float(np.sqrt(np.sum(s[int(r):] ** 2))) if r < len(s) else 0.0


def thm33_lhs(s: Sequence[float], r: int) -> float:
    """Left side: ``min_{rank V <= r} || W/||W||_F - V ||_F`` from the singular values of W."""
    s = np.asarray(s, dtype=np.float64)
    fro = float(np.sqrt(np.sum(s**2)))
    return lowrank_distance(s, r) / fro if fro > 0 else 0.0


def thm33_rhs(lr: float | Sequence[float], lam: float, k: int, norm_ratio: float) -> float:
    """Right side: ``prod_{l=1}^{k} (1 - 2 mu_l lambda) * ||W_{t-k}|| / ||W_t||``.

    ``lr`` is one learning rate (constant over the k steps) or the k learning rates used."""
    if np.isscalar(lr):
        factor = (1.0 - 2.0 * float(lr) * lam) ** k
    else:
        lrs = np.asarray(lr, dtype=np.float64)
        if len(lrs) != k:
            raise ValueError(f"need k={k} learning rates, got {len(lrs)}")
        factor = float(np.prod(1.0 - 2.0 * lrs * lam))
    return factor * norm_ratio


def certified_rank(lr: float, lam: float, batch: int, eps: float, patches: int = 1,
                   norm_ratio: float = 1.0) -> float:
    """The rank ``N B k`` that Theorem 3.3 certifies at distance ``eps``: the smallest k with
    ``(1 - 2 mu lambda)^k * norm_ratio <= eps``, times ``N B``. Infinite when lambda = 0 or
    mu lambda = 0 (no decay, no certificate)."""
    decay = 1.0 - 2.0 * lr * lam
    if not 0.0 < decay < 1.0:
        return math.inf if decay >= 1.0 else float(patches * batch)
    k = max(1, math.ceil(math.log(eps / norm_ratio) / math.log(decay))) if norm_ratio > eps else 1
    return float(patches * batch * k)


def unrolled_sgd(w0: np.ndarray, lr: float, lam: float, batch: int, steps: int, *,
                 grad_scale: float = 1.0, seed: int = 0) -> list[np.ndarray]:
    """A minimal model of the mechanism, for illustration:
    ``W_{s+1} = (1 - 2 mu lambda) W_s - mu G_s``
    with ``G_s`` a random matrix of rank exactly ``batch`` (a sum of ``batch`` Gaussian outer
    products scaled by ``grad_scale / batch``). Returns ``[W_0, ..., W_steps]``."""
    rng = np.random.default_rng(seed)
    m, n = w0.shape
    ws = [w0.astype(np.float64)]
    for _ in range(steps):
        g = rng.standard_normal((m, batch)) @ rng.standard_normal((batch, n)) * (grad_scale / batch)
        ws.append((1.0 - 2.0 * lr * lam) * ws[-1] - lr * g)
    return ws


def momentum_matrix(lr: float, lam: float, beta: float) -> np.ndarray:
    """The 2 x 2 map of heavy-ball SGD on the pair ``(W, v)`` (``torch.optim.SGD`` with
    ``momentum=beta``, ``weight_decay=2 lam``): ``v' = beta v + 2 lam W + G``,
    ``W' = W - lr v' = (1 - 2 lr lam) W - lr beta v - lr G``, i.e.
    ``(W', v') = M (W, v) + (-lr, 1) G`` with ``M = [[1 - 2 lr lam, -lr beta], [2 lam, beta]]``."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"need 0 <= beta < 1, got {beta}")
    return np.array([[1.0 - 2.0 * lr * lam, -lr * beta], [2.0 * lam, beta]], dtype=np.float64)


def momentum_factors(lr: float, lam: float, beta: float, k: int) -> tuple[float, float]:
    """``(a_k, b_k)``, the first row of ``M^k`` (:func:`momentum_matrix`): unrolling ``k``
    heavy-ball
    steps gives ``W_t = a_k W_{t-k} + b_k v_{t-k} + (a combination of G_{t-1}, ..., G_{t-k})``.
    The remainder is not a multiple of ``W_{t-k}``: it contains the full-rank buffer ``v_{t-k}``.
    With ``beta = 0``, ``(a_k, b_k) = ((1 - 2 lr lam)^k, 0)``."""
    if k < 0:
        raise ValueError(f"need k >= 0, got {k}")
    mk = np.linalg.matrix_power(momentum_matrix(lr, lam, beta), int(k))
    return float(mk[0, 0]), float(mk[0, 1])


def momentum_rate(lr: float, lam: float, beta: float) -> float:
    """Spectral radius of :func:`momentum_matrix`: the per-step factor by which the weight-decay
    part of heavy-ball SGD shrinks ``(W, v)`` in the long run; ``1 - 2 lr lam / (1 - beta)`` to
    first order in ``lr lam``. The roots solve ``z^2 - (1 + beta - 2 lr lam) z + beta = 0``."""
    return float(np.max(np.abs(np.linalg.eigvals(momentum_matrix(lr, lam, beta)))))
