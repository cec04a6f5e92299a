"""SGD noise and the low-rank bound of GP22 (Chapter 4): claims C5 (Props 1-2) and C6 (Thm 1).

Notation. ``W`` is one weight matrix ``(d_out, d_in)`` of a network that multiplies each sample's
layer input ``h_i`` once, ``z_i = W h_i``. For a per-sample loss ``ell_i`` write
``delta_i = d ell_i / d z_i`` (a ``d_out`` vector). By the chain rule (Chapter 1),
``d ell_i / dW = delta_i h_i^T`` (rank one), so the gradient of the regularised batch loss
``L^lambda_S = (1/B) sum_{i in S} ell_i + lambda ||W||_F^2`` is

    grad_W L^lambda_S = (1/B) D_S^T H_S + 2 lambda W,

with ``D_S`` (``B x d_out``) and ``H_S`` (``B x d_in``) the rows ``delta_i``, ``h_i`` of the batch.
The matrix ``U_S = -(1/(2 lambda B)) D_S^T H_S`` has rank ``<= B`` and ``W - U_S = grad_W L^lambda_S
/ (2 lambda)``, hence GP22's Theorem 1 (C6), for every batch ``S`` of size ``B*`` and any norm:

    min_{rank V <= B*} ||W - V||  <=  ||grad_W L^lambda_S|| / (2 lambda).

The left side is the *tail* of the singular values ``s_1 >= s_2 >= ...`` of ``W``
(Eckart-Young-Mirsky): ``sqrt(sum_{i > B*} s_i^2)`` in the Frobenius norm, ``s_{B*+1}`` in the
spectral norm.

Evaluating the right side's minimum over all ``C(N, B*)`` batches is impossible for real data sets.
Every batch gives a valid bound, so the minimum over *sampled* batches is an upper estimate of the
true minimum; the check "tail <= sampled min / (2 lambda)" can therefore not fail if the theorem
and the code are right -- what the numbers tell is how tight the bound is, and a sampled minimum
overstates that gap. :func:`local_search` lowers the estimate further by swapping samples.

The right side is computed without forming any batch gradient: with the Gram matrix
``K = (D D^T) o (H H^T)`` (``o``: elementwise product) and ``c_i = delta_i^T W h_i``,

    ||grad_W L^lambda_S||_F^2 = (1/B^2) sum_{a, b in S} K_ab + (4 lambda / B) sum_{a in S} c_a
                                + 4 lambda^2 ||W||_F^2,

so one pass over the data gives the norms of any number of batches. This needs a network whose
samples do not interact (no batch normalisation in training mode): with BN the gradient of a
batch still has rank ``<= B`` and Theorem 1 still holds, but ``delta_i`` depends on the batch, so
each batch must be run through the network (:func:`autograd_batch_gradient` does that).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gradients
from .decomposition import known_spectrum
from .metrics import as_matrix, batch_singular_values, singular_values

LOSSES = ("ce", "mse")


# --------------------------------------------------------------------------------------------
# Left side: distance to the nearest matrix of rank <= r
# --------------------------------------------------------------------------------------------
def tail_distances(s: torch.Tensor, ranks: Iterable[int], ord: str = "fro") -> torch.Tensor:
    """``min_{rank V <= r} ||W - V||`` for each ``r`` in ``ranks``, from the singular values ``s``
    (descending) of ``W``: ``sqrt(sum_{i > r} s_i^2)`` (``ord="fro"``) or ``s_{r+1}`` (``ord="2"``),
    0 when ``r >= len(s)``."""
    s = s.double()
    out = []
    for r in ranks:
        if r < 0:
            raise ValueError(f"rank must be >= 0, got {r}")
        tail = s[r:]
        if ord == "fro":
            out.append(tail.pow(2).sum().sqrt() if tail.numel() else torch.zeros((), dtype=s.dtype))
        elif ord == "2":
            out.append(tail[0] if tail.numel() else torch.zeros((), dtype=s.dtype))
        else:
            raise ValueError(f"ord must be 'fro' or '2', got {ord!r}")
    return torch.stack(out)


def tail_distance(w: torch.Tensor, r: int, ord: str = "fro") -> float:
    """``min_{rank V <= r} ||W - V||`` (Frobenius or spectral) by the SVD of ``W``."""
    s = singular_values(w)
    return float(tail_distances(s, [r], ord)[0])


def best_rank_approx(w: torch.Tensor, r: int) -> torch.Tensor:
    """The truncated SVD ``sum_{i <= r} s_i u_i v_i^T`` of ``W`` (float64): a minimiser of
    ``||W - V||`` over ``rank V <= r`` in every unitarily invariant norm."""
    u, s, vh = torch.linalg.svd(as_matrix(w).detach().double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


# --------------------------------------------------------------------------------------------
# Per-sample losses and the factors of every batch gradient
# --------------------------------------------------------------------------------------------
def per_sample_loss(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``ell_i`` for outputs ``out`` ``(n, k)`` and integer labels ``y`` ``(n,)``:
    ``"ce"`` -- cross-entropy of the softmax; ``"mse"`` -- squared error to the one-hot target,
    averaged over the ``k`` outputs (what ``nn.MSELoss`` on one-hot targets averages per sample);
    for ``k = 1`` and float targets, ``(out - y)^2``."""
    if loss == "ce":
        return F.cross_entropy(out, y, reduction="none")
    if loss == "mse":
        if out.shape[1] == 1 and y.is_floating_point():
            return (out[:, 0] - y) ** 2
        target = F.one_hot(y, out.shape[1]).to(out.dtype)
        return ((out - target) ** 2).mean(1)
    raise ValueError(f"unknown loss {loss!r}: choose one of {LOSSES}")


@dataclass
class Factors:
    """One linear layer's per-sample gradient factors: ``W`` ``(d_out, d_in)``, ``D`` ``(n, d_out)``
    (``delta_i = d ell_i / d z_i``) and ``H`` ``(n, d_in)`` (layer inputs ``h_i``), float64. The
    gradient of ``ell_i`` w.r.t. ``W`` is ``outer(D[i], H[i])``."""

    name: str
    W: torch.Tensor
    D: torch.Tensor
    H: torch.Tensor

    @property
    def n(self) -> int:
        return self.D.shape[0]

    def gram(self) -> torch.Tensor:
        """``K = (D D^T) o (H H^T)``: ``K_ab = <outer(d_a, h_a), outer(d_b, h_b)>_F``."""
        return (self.D @ self.D.T) * (self.H @ self.H.T)

    def linear_term(self) -> torch.Tensor:
        """``c_a = <outer(d_a, h_a), W>_F = d_a^T W h_a``."""
        return ((self.D @ self.W) * self.H).sum(1)


def gradient_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     loss: str | Callable = "ce",
                     layers: Sequence[str] | None = None) -> dict[str, Factors]:
    """:class:`Factors` of every linear layer of ``model`` (as named by
    :func:`sgdrank.gradients.weight_modules`: hidden layers and ``head``), from one forward and one
    backward pass over ``(x, y)``. ``loss``: a name of :func:`per_sample_loss` or a callable
    ``(out, y) -> (n,)`` per-sample losses. Raises for convolutions (their per-sample gradient
    is a sum over patches) and for models that couple the samples of a batch (BN in training
    mode)."""
    if gradients.couples_batch(model):
        raise ValueError("the model couples samples (batch norm in training mode): per-sample "
                         "factors are not defined; use autograd_batch_gradient per batch, or "
                         "model.eval()")
    mods = gradients.weight_modules(model)
    if layers is not None:
        mods = {k: mods[k] for k in layers}
    for name, m in mods.items():
        if not isinstance(m, nn.Linear):
            raise TypeError(f"layer {name!r} is a {type(m).__name__}; gradient_factors handles "
                            "nn.Linear only")
    ins, outs = {}, {}

    def hook(name):
        def fn(mod, inputs, output):
            ins[name] = inputs[0].detach()
            outs[name] = output
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    ell = loss(out, y) if callable(loss) else per_sample_loss(out, y, loss)
    names = list(mods)
    deltas = torch.autograd.grad(ell.sum(), [outs[n] for n in names])
    return {
        n: Factors(n, mods[n].weight.detach().double(),
                   d.detach().double().reshape(-1, d.shape[-1]),
                   ins[n].double().reshape(-1, ins[n].shape[-1]))
        for n, d in zip(names, deltas)
    }


def batch_gradient(f: Factors, idx: torch.Tensor, lam: float) -> torch.Tensor:
    """``grad_W L^lambda_S = (1/B) D_S^T H_S + 2 lambda W`` for the batch ``idx`` (float64)."""
    idx = torch.as_tensor(idx)
    return f.D[idx].T @ f.H[idx] / idx.numel() + 2.0 * lam * f.W


def autograd_batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float,
                            loss: str | Callable = "ce") -> dict[str, torch.Tensor]:
    """``grad_W L^lambda_S`` of every weight matrix by autograd on the batch ``(x, y)`` itself
    (works for batch-coupled models too): the mean loss over the batch plus ``2 lambda W``."""
    mods = gradients.weight_modules(model)
    out = model(x)
    ell = loss(out, y) if callable(loss) else per_sample_loss(out, y, loss)
    grads = torch.autograd.grad(ell.mean(), [m.weight for m in mods.values()])
    return {n: as_matrix(g + 2.0 * lam * m.weight).detach()
            for (n, m), g in zip(mods.items(), grads)}


# --------------------------------------------------------------------------------------------
# Right side: batch-gradient norms for many batches
# --------------------------------------------------------------------------------------------
class BatchNorms:
    """``||grad_W L^lambda_S||_F`` for any batches ``S`` of one layer, from its :class:`Factors`
    (Gram-matrix identity of the module docstring; ``n x n`` memory)."""

    def __init__(self, f: Factors, lam: float):
        self.f, self.lam = f, float(lam)
        self.K = f.gram()
        self.c = f.linear_term()
        self.w2 = float(f.W.pow(2).sum())

    def sq(self, batches: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Squared norms for ``batches`` ``(M, B)`` of sample indices -> ``(M,)``."""
        batches = torch.as_tensor(batches).long()
        if batches.ndim == 1:
            batches = batches[None]
        B = batches.shape[1]
        out = []
        for i in range(0, batches.shape[0], chunk):
            b = batches[i:i + chunk]
            quad = self.K[b[:, :, None], b[:, None, :]].sum((1, 2)) / B**2
            lin = self.c[b].sum(1) * (4.0 * self.lam / B)
            out.append(quad + lin + 4.0 * self.lam**2 * self.w2)
        return torch.cat(out).clamp_min(0.0)

    def norms(self, batches: torch.Tensor) -> torch.Tensor:
        return self.sq(batches).sqrt()

    def local_search(self, batch: torch.Tensor, max_iter: int = 200,
                     tol: float = 1e-12) -> tuple[torch.Tensor, float]:
        """Best-improvement swap search from ``batch`` (1-D indices): exchange one member ``a`` for
        one non-member ``b`` while that lowers the norm. Returns the batch and its norm. Each
        accepted swap lowers the norm, so the result is still an upper estimate of the true min."""
        n, K, c, lam = self.K.shape[0], self.K, self.c, self.lam
        inside = torch.zeros(n, dtype=torch.bool)
        inside[torch.as_tensor(batch).long()] = True
        B = int(inside.sum())
        Ks = K[:, inside].sum(1)
        diag = K.diagonal()
        for _ in range(max_iter):
            a_idx = inside.nonzero()[:, 0]
            b_idx = (~inside).nonzero()[:, 0]
            if b_idx.numel() == 0:
                break
            quad = (2 * (Ks[b_idx][None, :] - Ks[a_idx][:, None]) + diag[a_idx][:, None]
                    + diag[b_idx][None, :] - 2 * K[a_idx][:, b_idx]) / B**2
            delta = quad + (4.0 * lam / B) * (c[b_idx][None, :] - c[a_idx][:, None])
            k = int(delta.argmin())
            if float(delta.flatten()[k]) >= -tol:
                break
            a, b = int(a_idx[k // b_idx.numel()]), int(b_idx[k % b_idx.numel()])
            inside[a], inside[b] = False, True
            Ks = Ks - K[:, a] + K[:, b]
        best = inside.nonzero()[:, 0]
        return best, float(self.norms(best[None])[0])


def random_batches(n: int, batch_size: int, count: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` batches of ``batch_size`` distinct indices from ``range(n)`` (each drawn uniformly,
    independently of the others): ``(count, batch_size)``."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n}, got {batch_size}")
    keys = torch.rand(count, n, generator=generator)
    return keys.topk(batch_size, dim=1).indices


def all_batches(n: int, batch_size: int) -> torch.Tensor:
    """Every subset of ``range(n)`` of size ``batch_size``, ``(C(n, B), B)`` -- for tiny ``n``
    only."""
    if math.comb(n, batch_size) > 2_000_000:
        raise ValueError(f"C({n}, {batch_size}) = {math.comb(n, batch_size)} batches is too many "
                         "to enumerate")
    return torch.tensor(list(itertools.combinations(range(n), batch_size)),
                        dtype=torch.long).reshape(-1, batch_size)


#: a float32 spectrum serves the left side of the bound only where every tail distance of the
#: B* grid is at least this share of ||W||_F (:func:`left_spectrum`)
F32_TAIL_FLOOR = 1e-3


def left_spectrum(W: torch.Tensor, s: torch.Tensor | None, dtype: str,
                  batch_sizes: Sequence[int]) -> torch.Tensor:
    """The singular values from which :func:`c6_table` takes the left side of the bound: ``s``
    (checked by :func:`sgdrank.decomposition.known_spectrum`) if given and computed in float64;
    if computed in ``"float32"``, ``s`` only while every tail distance ``sqrt(sum_{i > B*}
    s_i^2)`` with ``B* < min(m, n)`` is at least :data:`F32_TAIL_FLOOR` ``||W||_F``, else a
    float64 SVD of ``W``. Why: float32 singular values err by about 6e-7 ``||W||_F`` each
    (2000 x 2000), which a rank at tolerance 1e-3 never notices but a small tail does: on a
    2000 x 2000 matrix of rank 8 plus a tail of ``delta ||W||_F`` the float32 left side at
    ``B* = 8`` errs by 1e-6 of itself at ``delta = 1e-2``, 4e-5 at 1e-4, 3e-3 at 1e-5 and 48% at
    1e-6. ``s = None``: a float64 SVD."""
    if s is None:
        return batch_singular_values(W)
    s = known_spectrum(s, W)
    if dtype == "float64":
        return s
    if dtype != "float32":
        raise ValueError(f"spectra_dtype must be 'float64' or 'float32', got {dtype!r}")
    grid = [b for b in batch_sizes if b < s.numel()]
    if grid and float(tail_distances(s, grid).min()) < F32_TAIL_FLOOR * float(s.norm()):
        return batch_singular_values(W)
    return s


def c6_table(factors: dict[str, Factors], lam: float, batch_sizes: Sequence[int], *,
             n_batches: int = 200,
             search_iters: int = 0, exhaustive: bool = False, seed: int = 0,
             spectra: dict[str, torch.Tensor] | None = None,
             spectra_dtype: str = "float64") -> list[dict]:
    """Both sides of GP22 Theorem 1 (Frobenius norm) for each layer and each ``B*`` in
    ``batch_sizes``.

    Rows: ``layer``, ``B``, ``lhs`` (distance of ``W`` to rank ``<= B``), ``rhs_min`` (min over the
    sampled batches -- or over all batches with ``exhaustive=True`` -- of ``||grad_W L^lambda_S||_F
    / (2 lambda)``), ``rhs_search`` (after :meth:`BatchNorms.local_search` from the best sampled
    batch; equal to ``rhs_min`` when ``search_iters = 0``), ``rhs_median`` (a typical batch),
    ``fro`` (``||W||_F``: the bound is vacuous when the right side exceeds it, since ``V = 0`` has
    rank 0), ``ratio`` (``rhs_search / lhs``), ``holds``, ``n_batches`` (how many batches were
    evaluated). ``spectra``: the singular values of each layer's ``W`` by name, if already known
    (the run's record at its last epoch, :meth:`sgdrank.results.Result.final_spectra`), computed
    in ``spectra_dtype`` (the run's ``svd_dtype``): used by :func:`left_spectrum`, which
    decomposes ``W`` in float64 where float32 values would not resolve a small tail."""
    if lam <= 0:
        raise ValueError("Theorem 1 needs lambda > 0 (its right side is divided by 2 lambda)")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for name, f in factors.items():
        bn = BatchNorms(f, lam)
        s = left_spectrum(f.W, None if spectra is None else spectra[name], spectra_dtype,
                          batch_sizes)
        lhs = tail_distances(s, batch_sizes)
        for B, left in zip(batch_sizes, lhs.tolist()):
            batches = all_batches(f.n, B) if exhaustive else random_batches(f.n, B, n_batches, g)
            nrm = bn.norms(batches)
            k = int(nrm.argmin())
            best = float(nrm[k])
            search = bn.local_search(batches[k], search_iters)[1] if search_iters else best
            search = min(search, best)
            rhs = search / (2 * lam)
            rows.append(dict(layer=name, B=B, lhs=left, rhs_min=best / (2 * lam), rhs_search=rhs,
                             rhs_median=float(nrm.median()) / (2 * lam), fro=float(s.norm()),
                             ratio=rhs / left if left > 0 else float("inf"),
                             holds=bool(left <= rhs * (1 + 1e-9) + 1e-12),
                             n_batches=int(batches.shape[0])))
    return rows


# --------------------------------------------------------------------------------------------
# Props 1-2: common stationary points of all batches, on tiny networks
# --------------------------------------------------------------------------------------------
def regularised_loss(model: nn.Module, x, y, lam: float,
                     loss: str | Callable = "mse") -> torch.Tensor:
    """``(1/n) sum_i ell_i + lambda sum_W ||W||_F^2`` over every weight matrix (biases not
    decayed)."""
    out = model(x)
    ell = loss(out, y) if callable(loss) else per_sample_loss(out, y, loss)
    reg = sum(m.weight.pow(2).sum() for m in gradients.weight_modules(model).values())
    return ell.mean() + lam * reg


def fit_full_batch(model: nn.Module, x, y, lam: float, loss: str | Callable = "mse", *,
                   max_iter: int = 2000, tol: float = 1e-12) -> float:
    """Minimise :func:`regularised_loss` on the whole set with L-BFGS (strong-Wolfe line search):
    deterministic full-batch training to a stationary point of the *full* objective, i.e. a fixed
    point of gradient descent. Returns the final full-gradient norm (all parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        val = regularised_loss(model, x, y, lam, loss)
        val.backward()
        return val

    opt.step(closure)
    grads = torch.autograd.grad(regularised_loss(model, x, y, lam, loss), params)
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def per_sample_regularised_gradients(model: nn.Module, x, y, lam: float,
                                     loss: str | Callable = "mse"
                                     ) -> list[dict[str, torch.Tensor]]:
    """For each sample ``i``: ``grad_W (ell_i + lambda ||W||^2)`` of every weight matrix -- the SGD
    direction with batch size 1. A point is a convergence point of SGD with any ``B < n`` iff all of
    these vanish (GP22 eq. 8-9)."""
    return [autograd_batch_gradient(model, x[i:i + 1], y[i:i + 1], lam, loss)
            for i in range(x.shape[0])]


# --------------------------------------------------------------------------------------------
# E5: does d(W_{t+1}, W_t) settle? One row per run of a sweep
# --------------------------------------------------------------------------------------------
def settle_table(epochs, keys: Sequence[str] = ("dataset", "loss", "lam", "seed"),
                 tail: float = 0.1, middle: tuple[float, float] = (0.45, 0.55),
                 collapse: float = 1e-2):
    """Per run of a :class:`sgdrank.sweep.Result` ``epochs`` table (one row per run x epoch with
    ``conv_dist``, ``train_acc``, ``train_loss``, ``avg_rank``, ``avg_stable_rank``, ``head_fro``,
    ``lr``, ``step``): how GP22's distance ``d(W_{t+1}, W_t)`` (``conv_dist``) ends.

    Columns: ``keys``; ``floor`` -- median of ``d`` over the last ``tail`` fraction of epochs;
    ``trend`` -- ``floor`` over the median in the ``middle`` window of the run (< 1: still
    falling, ~ 1: levelled off, > 1: rising); ``tau_epochs`` -- ``1/(2 lr lam)`` steps in epochs
    (inf for lam = 0), the time weight decay needs to act; ``epochs``; ``collapsed`` -- the
    classifier's ``||W||_F`` fell below ``collapse`` times its initial value (the trivial
    convergence point ``W -> 0``); final ``train_acc``, ``train_loss``; ``rank``/``stable_rank``
    (average over hidden matrices) at the end and ``rank0``/``stable_rank0`` at initialisation;
    ``spike`` -- the largest ratio of the training loss to its running minimum over the earlier
    epochs (a loss spike: e.g. 200 when the loss jumps from 5e-3 to 1), at epoch ``spike_epoch``,
    from ``spike_from`` to ``spike_to``."""
    import numpy as np
    import pandas as pd

    if not 0 < tail < 1 or not 0 <= middle[0] < middle[1] <= 1:
        raise ValueError(f"need 0 < tail < 1 and 0 <= middle[0] < middle[1] <= 1, got {tail}, "
                         f"{middle}")
    rows = []
    for key, run in epochs.groupby(list(keys)):
        run = run.sort_values("epoch")
        last = int(run.epoch.max())
        if last < 2:
            raise ValueError(f"run {key} has {last} epochs; settle_table needs at least 2")
        live = run[run.epoch > 0]
        d_tail = live[live.epoch > (1 - tail) * last].conv_dist
        d_mid = live[(live.epoch > middle[0] * last) & (live.epoch <= middle[1] * last)].conv_dist
        if d_mid.empty:
            d_mid = live.conv_dist.iloc[len(live) // 2:len(live) // 2 + 1]
        first, end = run.iloc[0], run.iloc[-1]
        floor, mid = float(d_tail.median()), float(d_mid.median())
        loss = live.train_loss.to_numpy(float)
        prior = np.minimum.accumulate(np.concatenate([[np.inf], loss[:-1]]))
        ratio = np.where(np.isfinite(prior) & (prior > 0), loss / prior, 1.0)
        k = int(np.nanargmax(ratio)) if len(ratio) else 0
        spike = {"spike": float(ratio[k]) if len(ratio) else 1.0,
                 "spike_epoch": int(live.epoch.iloc[k]) if len(ratio) else 0,
                 "spike_from": float(prior[k]) if len(ratio) else math.nan,
                 "spike_to": float(loss[k]) if len(ratio) else math.nan}
        steps_per_epoch = float(end.step) / last
        lam, lr = float(end.lam), float(end.lr)
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                     "floor": floor, "trend": floor / mid if mid > 0 else math.nan,
                     "tau_epochs": 1 / (2 * lr * lam) / steps_per_epoch if lam > 0 else math.inf,
                     "epochs": last, "collapsed": bool(end.head_fro < collapse * first.head_fro),
                     "train_acc": float(end.train_acc), "train_loss": float(end.train_loss),
                     "rank": float(end.avg_rank), "stable_rank": float(end.avg_stable_rank),
                     "rank0": float(first.avg_rank), "stable_rank0": float(first.avg_stable_rank),
                     **spike})
    return pd.DataFrame(rows)


def regime(q) -> str:
    """How ``d`` ends in the runs ``q`` (rows of :func:`settle_table`) of one setting, decided
    from all seeds: ``collapses (W → 0)`` if every run collapsed; else from the trends' range over
    seeds: all below 0.8 ``still falling``, all above 1.25 ``still rising``, all within 0.8-1.25
    ``levelled off``, otherwise ``differs between seeds``."""
    if q.collapsed.all():
        return "collapses (W → 0)"
    lo, hi = float(q.trend.min()), float(q.trend.max())
    if hi < 0.8:
        return "still falling"
    if lo > 1.25:
        return "still rising"
    if lo >= 0.8 and hi <= 1.25:
        return "levelled off"
    return "differs between seeds"


# --------------------------------------------------------------------------------------------
# What Chapter 4 trains: one source for its training cells and its cost estimate
# --------------------------------------------------------------------------------------------
def _full_size(dataset: str, classes=None, test: bool = False) -> int:
    """Training (or test) images of a registered dataset, of ``classes`` only when given (the
    registered datasets are balanced over 10 classes)."""
    from .cost import FULL_SIZES

    n = FULL_SIZES[dataset][1 if test else 0]
    return n * len(classes) // 10 if classes else n


def e5_sizes(P) -> dict[str, int]:
    """Training images of each E5 dataset in profile ``P`` (``e5_n_train``, else all)."""
    return {name: P.e5_n_train or _full_size(name) for name in P.e5_datasets}


def e5_configs(P) -> list:
    """E5's sweep (GP22 Fig. 1): per dataset, both losses, every ``lambda`` and seed; MLP, B = 128,
    constant learning rate, no momentum; spectra on ``P.e5_spectra`` in ``P.e5_svd_dtype``."""
    from . import sweep

    cfgs = []
    for name in P.e5_datasets:
        for loss in ("ce", "mse"):
            base = sweep.Config(model=P.e5_model, dataset=name, n_train=P.e5_n_train,
                                n_test=P.e5_n_test, batch_size=128, lr=P.e5_lr[loss], lam=0.0,
                                epochs=P.e5_epochs, loss=loss, momentum=0.0, seed=0,
                                spectra=P.e5_spectra, svd_dtype=P.e5_svd_dtype)
            cfgs += sweep.grid(base, lam=P.e5_lams, seed=P.e5_seeds)
    return cfgs


def b_configs(P, sizes: dict[str, int] | None = None) -> list:
    """C6 at the training batch size: E5's cross-entropy MLP at ``lambda = c6_train_lam`` for each
    ``B`` of ``c6_train_batch_sizes`` and seed, for as many *steps* as E5 (``sizes``: training
    images per dataset, default :func:`e5_sizes`). ``B = 128`` is an E5 run when
    ``c6_train_lam`` is one of E5's lambdas."""
    from . import sweep

    sizes = e5_sizes(P) if sizes is None else sizes
    cfgs = []
    for name in P.e5_datasets:
        steps = P.e5_epochs * (sizes[name] // 128)
        for B in P.c6_train_batch_sizes:
            base = sweep.Config(model=P.e5_model, dataset=name, n_train=P.e5_n_train,
                                n_test=P.e5_n_test, batch_size=B, lr=P.e5_lr["ce"],
                                lam=P.c6_train_lam,
                                epochs=max(1, round(steps / (sizes[name] // B))), loss="ce",
                                momentum=0.0, seed=0, spectra=P.e5_spectra,
                                svd_dtype=P.e5_svd_dtype)
            cfgs += sweep.grid(base, seed=P.e5_seeds)
    return cfgs


def e6_sizes(P) -> tuple[int, int]:
    """``(n_train, n_test)`` of E6's two-class data in profile ``P``."""
    return (P.e6_n_train or _full_size(P.e6_dataset, P.e6_classes),
            P.e6_n_test or _full_size(P.e6_dataset, P.e6_classes, test=True))


def e6_calls(P, n_train: int | None = None) -> list[dict]:
    """E6's :func:`sgdrank.weightnorm.train` calls, in the chapter's order: per seed, JANUS's SGD
    runs (square and logistic loss, all ``e6_lams``), GD (``B = N``) at the same learning rate
    and a control pair (SGD and GD at ``e6_ctrl_lr``) on ``e6_gd_lams``. GD makes one step per
    epoch, so it runs ``N // B`` times the epochs (and records) of SGD: equal step counts.
    ``e6_gd_lams`` must be a subset of ``e6_lams`` (raises otherwise).
    Each dict has the keyword arguments of ``train`` (``lams``, ``loss``, ``batch_size``,
    ``lr``, ``epochs``, ``record_last``, ``eval_every``, ``seed``) and ``mode``."""
    extra = sorted(set(P.e6_gd_lams) - set(P.e6_lams))
    if extra:  # the chapter pairs every GD run with the SGD run at its lambda
        raise ValueError(f"e6_gd_lams {list(P.e6_gd_lams)} has {extra}, not in e6_lams "
                         f"{list(P.e6_lams)}: every GD lambda needs its SGD run")
    n = e6_sizes(P)[0] if n_train is None else int(n_train)
    B = min(128, n)
    spe = n // B
    out = []
    for seed in P.e6_seeds:
        for loss, mode, lr in [("square", "SGD", P.e6_lr), ("logistic", "SGD", P.e6_lr),
                               (P.e6_gd_loss, "GD", P.e6_lr),
                               (P.e6_gd_loss, "SGD low-lr", P.e6_ctrl_lr),
                               (P.e6_gd_loss, "GD low-lr", P.e6_ctrl_lr)]:
            gd = mode.startswith("GD")
            k = spe if gd else 1
            out.append(dict(mode=mode, loss=loss, lams=list(P.e6_lams if mode == "SGD"
                                                            else P.e6_gd_lams),
                            batch_size=n if gd else B, lr=lr, epochs=P.e6_epochs * k,
                            record_last=P.e6_record * k, eval_every=P.e6_eval_every * k,
                            seed=seed))
    return out


def plan(P) -> dict[str, list]:
    """Every training of Chapter 4 in profile ``P``: ``{"E5": [Config], "C6 batch sizes":
    [Config] (those not already in E5), "E6": [cost.Work]}`` -- E6's weight-normalised
    networks as :func:`sgdrank.weightnorm.work` (one per kind of call, with its
    :func:`sgdrank.weightnorm.run_rows` analysis: ``2 N/B`` probe steps and
    ``e6_sharp_iters`` power iterations). The input of :func:`sgdrank.cost.show_profiles`."""
    from . import weightnorm

    e5 = e5_configs(P)
    seen = set(e5)
    cb = [c for c in dict.fromkeys(b_configs(P)) if c not in seen]
    arch = weightnorm.BOOK_ARCH if P.e6_arch == "book" else weightnorm.PAPER_ARCH
    n, n_test = e6_sizes(P)
    spe = n // min(128, n)
    kinds: dict = {}
    for c in e6_calls(P, n):
        kinds.setdefault((c["mode"], c["loss"]), []).append(c)
    e6 = [weightnorm.work(arch, n_train=n, n_test=n_test, k=len(cs[0]["lams"]), calls=len(cs),
                          batch_size=cs[0]["batch_size"], epochs=cs[0]["epochs"],
                          eval_every=cs[0]["eval_every"], record_last=cs[0]["record_last"],
                          probe=2 * spe, sharp_iters=P.e6_sharp_iters,
                          label=f"E6 {loss} {mode}")
          for (mode, loss), cs in kinds.items()]
    return {"E5": e5, "C6 batch sizes": cb, "E6": e6}
