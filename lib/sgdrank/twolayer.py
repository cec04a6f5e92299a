"""Two-layer ReLU networks with a bias, trained batched over (lambda, seed) runs (Chapter 5, WD2L).

The model (WD2L eq. 4, as reconstructed in Chapter 5)::

    f(x) = u sigma(V x + b),   u in R^{k x m},  V in R^{m x n},  b in R^m,   sigma = ReLU,

no output bias, no 1/sqrt(m) factor. Initialisation: Kaiming normal in fan-in mode,
``V_ij ~ N(0, 2/n)``, ``u_ij ~ N(0, 2/m)``, ``b = 0``.

Objective of a batch ``S`` of size ``B`` (the book's weight-decay convention,
``L + lambda ||.||^2``)::

    L^lambda_S = (1/B) sum_{i in S} ||f(x_i) - y_i||_2^2  +  lambda (||V||_F^2 + ||u||_F^2),

the squared error summed over the ``k`` outputs (for one-hot targets too) and averaged over the
batch; the bias ``b`` is not decayed (so a constant predictor costs nothing; see Chapter 5).
One SGD step with learning rate ``mu`` multiplies ``V`` and ``u`` by ``1 - 2 mu lambda`` and
subtracts ``mu`` times the data gradient; ``b`` only gets the data gradient. This equals
``torch.optim.SGD`` with ``weight_decay = 2 lambda`` on ``u`` and ``V`` (tested).

Batched layout. ``K`` runs (one per ``(lambda, seed)`` configuration) are one computation: ``V``
is ``(K, m, n)``, ``u`` is ``(K, k, m)``, ``b`` is ``(K, m)``, every run draws its own mini-batch
(``(K, B, n)``), and the backward pass is written out (no autograd graph)::

    P = X_S V^T + b            (K, B, m)     R = sigma(P) u^T - Y_S       (K, B, k)
    dU = (2/B) R^T sigma(P)    (K, k, m)     A = (2/B) (R u) * 1[P > 0]   (K, B, m)
    dV = A^T X_S               (K, m, n)     db = sum_i A_i                (K, m)

which is exactly what one backward pass of the loss summed over the runs gives each run
(tested against autograd and a one-at-a-time ``nn.Module`` + ``torch.optim.SGD``). Learning
rates and weight decays are per-run tensors; the schedule multiplies the learning rate by
``gamma`` every ``every`` epochs (WD2L: 0.95 every 200).

Per-sample structure (WD2L Lemma 2.2, Chapter 1's rank-one lemma): the gradient of sample ``i``'s
squared error with respect to ``V`` is the rank-one matrix ``M_i = a_i x_i^T`` with
``a_i = 2 D(x_i) u^T (f(x_i) - y_i)``, ``D(x) = diag(1[V x + b > 0])``. With the sample's full
gradient ``g_i = M_i + 2 lambda V``, a batch gradient is ``G_S = (1/B) sum_{i in S} g_i`` and

    ||G_S||_F^2 = (1/B^2) sum_{i,j in S} <a_i,a_j><x_i,x_j> + (4 lambda/B) sum_{i in S} a_i^T V x_i
                  + 4 lambda^2 ||V||_F^2,

which :func:`batch_grad_norms` evaluates for thousands of batches from one ``N x N`` Gram matrix.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import cache as _cache
from . import metrics
from .progress import progress

ORDER_OFFSET = (
    1_000_003  # batch-order generator of seed s: torch.Generator().manual_seed(s + ORDER_OFFSET)
)
#: Memory budget of one chunk, in tensor elements (2^27: 0.5 GB of float32, 1 GB of float64).
#: Every full-set forward pass is cut into (runs x samples) chunks whose largest intermediate,
#: the ``(K_c, N_c, m)`` pre-activations, holds at most this many elements; every batch of SVDs
#: into chunks of runs whose float64 copies hold at most this many floats (two per float64
#: element); the per-sample factors of :func:`grad_stats` into chunks of hidden units. At the
#: paper's E12 scale (MNIST, width 32768, K = 18) the unchunked forward would build an
#: 18 x 9000 x 32768 float32 tensor (21 GB). A problem that fits one chunk (the book profile)
#: runs the unchunked arithmetic exactly. Override per call (``chunk=``), here, or with
#: ``$SGDRANK_CHUNK`` (the dry run sets a small one, so that its small problems run the chunk
#: loops the paper's sizes need).
CHUNK = int(os.environ.get("SGDRANK_CHUNK") or 2**27)


def chunk_sizes(K: int, N: int, per: int, budget: int | None = None) -> tuple[int, int]:
    """``(K_c, N_c)``: runs and samples per chunk such that ``K_c * N_c * per <= budget`` (or
    ``K_c = N_c = 1``): all ``N`` samples of as many runs as fit, else fewer samples per run."""
    budget = CHUNK if budget is None else int(budget)
    per = max(1, int(per))
    kc = min(K, max(1, budget // (per * max(1, N))))
    nc = min(N, max(1, budget // (per * kc)))
    return kc, nc


# --------------------------------------------------------------------------------------------
# Parameters, forward, one-hot targets
# --------------------------------------------------------------------------------------------
@dataclass
class Params:
    """Weights of ``K`` two-layer networks: ``u (K, k, m)``, ``V (K, m, n)``, ``b (K, m)``.
    :func:`init_params` stores ``V`` as the transpose of a contiguous ``(K, n, m)`` tensor
    (faster batched products; any layout works)."""

    u: torch.Tensor
    V: torch.Tensor
    b: torch.Tensor

    @property
    def K(self) -> int:
        return int(self.V.shape[0])

    def run(self, i: int) -> "Params":
        """Run ``i`` alone, as a batch of one (views)."""
        return Params(self.u[i : i + 1], self.V[i : i + 1], self.b[i : i + 1])

    def clone(self) -> "Params":
        return Params(self.u.clone(), self.V.clone(), self.b.clone())


def init_params(seeds: Sequence[int], n: int, m: int, k: int = 1, dtype=torch.float32) -> Params:
    """Kaiming-normal (fan-in) initialisation of one network per seed: ``V ~ N(0, 2/n)``,
    ``u ~ N(0, 2/m)``, ``b = 0``. Run ``i`` uses ``torch.Generator().manual_seed(seeds[i])``
    (V drawn first, then u), so runs with the same seed start identically."""
    if n < 1 or m < 1 or k < 1:
        raise ValueError(f"n, m, k must be positive, got n={n}, m={m}, k={k}")
    K = len(seeds)
    if K == 0:
        raise ValueError("no runs: seeds is empty")
    # one run's float64 draw at a time, straight into the (K, n, m) block: the host never holds
    # K float64 copies (at width 32768 and K = 18 they were 3.7 GB, twice)
    Vt = torch.empty(K, n, m, dtype=dtype)
    us = []
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        Vt[i] = (torch.randn(m, n, generator=g, dtype=torch.float64) * math.sqrt(2.0 / n)).T
        us.append(torch.randn(k, m, generator=g, dtype=torch.float64) * math.sqrt(2.0 / m))
    V = Vt.mT  # (K, m, n) stored as (K, n, m)
    return Params(torch.stack(us).to(dtype), V, torch.zeros(K, m, dtype=dtype))


def forward(p: Params, x: torch.Tensor) -> torch.Tensor:
    """Outputs ``(K, N, k)`` for inputs ``x`` of shape ``(N, n)`` (shared by all runs) or
    ``(K, N, n)`` (one batch per run)."""
    pre = _pre(p, x)
    return torch.bmm(pre.clamp_min_(0), p.u.mT)


def predict(p: Params, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """:func:`forward` for inputs ``(N, n)`` shared by all runs, in chunks of runs and samples
    whose pre-activations hold at most ``chunk`` (default :data:`CHUNK`) elements: the same
    ``(K, N, k)`` outputs (bit for bit when one chunk holds everything) without the
    ``(K, N, m)`` tensor."""
    K, N, m = p.K, x.shape[0], p.V.shape[1]
    kc, nc = chunk_sizes(K, N, m, chunk)
    if kc == K and nc == N:
        return forward(p, x)
    out = torch.empty(K, N, p.u.shape[1], dtype=p.V.dtype, device=p.V.device)
    for a in range(0, K, kc):
        q = Params(p.u[a : a + kc], p.V[a : a + kc], p.b[a : a + kc])
        for s in range(0, N, nc):
            out[a : a + kc, s : s + nc] = forward(q, x[s : s + nc])
    return out


def _pre(p: Params, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        x = x.expand(p.K, *x.shape)
    return torch.baddbmm(p.b.unsqueeze(1), x, p.V.mT)


def one_hot(y: torch.Tensor, n_classes: int, dtype=torch.float32) -> torch.Tensor:
    """Integer labels ``(N,)`` -> one-hot targets ``(N, n_classes)`` (square loss on classes)."""
    return torch.nn.functional.one_hot(y.long(), n_classes).to(dtype)


def as_targets(y: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Regression targets ``(N,)`` -> ``(N, 1)``; ``(N, k)`` unchanged."""
    return (y.unsqueeze(1) if y.ndim == 1 else y).to(dtype)


def loss_grads(p: Params, xb: torch.Tensor, yb: torch.Tensor):
    """Per-run batch loss ``(1/B) sum_i ||f(x_i) - y_i||^2`` (shape ``(K,)``) and its gradients
    ``(dU, dV, db)`` (data term only), from the written-out backward of the module docstring.
    ``xb``: ``(K, B, n)``, ``yb``: ``(K, B, k)``. ``dV`` has the memory layout of ``p.V``
    (``(K, m, n)`` as the transpose of a contiguous ``(K, n, m)`` block: the fast GEMMs here)."""
    B = xb.shape[1]
    pre = torch.baddbmm(p.b.unsqueeze(1), xb, p.V.mT)
    h = pre.clamp_min(0)
    r = torch.bmm(h, p.u.mT).sub_(yb)  # (K, B, k)
    loss = r.square().sum((1, 2)) / B
    r.mul_(2.0 / B)
    dU = torch.bmm(r.mT, h)
    A = torch.ops.aten.threshold_backward(torch.bmm(r, p.u), pre, 0)  # (R u) * 1[P > 0]
    dV = torch.bmm(xb.mT, A).mT
    return loss, (dU, dV, A.sum(1))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _update(p: Params, dU, dV, db, shrink, mu3, mu2) -> None:
    """One SGD step with weight decay on ``u`` and ``V`` (in place)."""
    p.V.mul_(shrink).sub_(dV.mul_(mu3))
    p.u.mul_(shrink).sub_(dU.mul_(mu3))
    p.b.sub_(db.mul_(mu2))


def order_generator(seed: int) -> torch.Generator:
    """The generator of run ``seed``'s batch order: each epoch is ``torch.randperm(N, generator=g)``
    cut into ``N // B`` batches of ``B`` (the last ``N mod B`` samples of the permutation are
    left out of that epoch)."""
    return torch.Generator().manual_seed(int(seed) + ORDER_OFFSET)


def lr_at(lr: float, epoch: int, gamma: float, every: int) -> float:
    """Learning rate in epoch ``epoch`` (0-based): ``lr * gamma ** (epoch // every)``."""
    return lr * gamma ** (epoch // every)


@dataclass
class Result:
    """What :func:`train` returns. ``history`` maps names to arrays of shape ``(R,)`` (``epoch``,
    ``step``) or ``(R, K)`` (one column per run): ``train_loss``, ``test_loss`` (mean over samples
    of ``||f(x) - y||^2``), ``stable_rank``, ``fro`` (``||V||_F``), ``spec`` (``||V||_2``) and, for
    classification, ``train_acc`` / ``test_acc``. ``sv``: final singular values of each ``V``
    ``(K, min(m, n))``; ``last_epoch_grad``: ``||grad_V L^lambda_S||_F`` of every batch of the
    last epoch, at the parameters where SGD evaluated it ``(K, N // B)``; ``last_epoch_batches``:
    those batches ``(K, N // B, B)``."""

    params: Params
    lams: np.ndarray
    seeds: np.ndarray
    lr: float
    batch_size: int
    epochs: int
    history: dict
    sv: np.ndarray
    last_epoch_grad: np.ndarray
    last_epoch_batches: torch.Tensor
    seconds: float
    steps_per_epoch: int
    config: dict = field(default_factory=dict)

    def final(self, key: str) -> np.ndarray:
        """Last recorded value of ``history[key]`` per run, ``(K,)``."""
        return self.history[key][-1]

    def tidy(self) -> list[dict]:
        """The history as one row per (record, run): ``epoch``, ``step``, ``lam``, ``seed``, ``B``
        and every recorded metric (for ``pandas.DataFrame``)."""
        keys = [k for k in self.history if k not in ("epoch", "step")]
        rows = []
        for t in range(len(self.history["step"])):
            for i in range(len(self.lams)):
                rows.append(
                    dict(
                        epoch=float(self.history["epoch"][t]),
                        step=int(self.history["step"][t]),
                        lam=float(self.lams[i]),
                        seed=int(self.seeds[i]),
                        B=self.batch_size,
                        **{k: float(self.history[k][t, i]) for k in keys},
                    )
                )
        return rows

    def at_step(self, step: int) -> dict:
        """The recorded metrics after step ``step`` (must have been recorded), ``{key: (K,)}``."""
        hit = np.nonzero(self.history["step"] == step)[0]
        if hit.size == 0:
            raise ValueError(
                f"step {step} was not recorded (recorded: {self.history['step'].tolist()[:8]}...)"
            )
        return {k: v[hit[0]] for k, v in self.history.items()}

    def table(self) -> list[dict]:
        """One row per run: lambda, seed and the final value of every recorded metric."""
        keys = [k for k in self.history if k not in ("epoch", "step")]
        return [
            dict(
                lam=float(self.lams[i]),
                seed=int(self.seeds[i]),
                B=self.batch_size,
                **{k: float(self.history[k][-1, i]) for k in keys},
            )
            for i in range(len(self.lams))
        ]


def grid(lams: Sequence[float], seeds: Sequence[int]) -> tuple[list[float], list[int]]:
    """All ``(lambda, seed)`` pairs, lambda-major:
    ``([l0, l0, .., l1, ..], [s0, s1, .., s0, ..])``."""
    pairs = list(itertools.product(lams, seeds))
    return [float(a) for a, _ in pairs], [int(s) for _, s in pairs]


def _evaluate(p: Params, x, y, classification: bool, chunk: int | None = None):
    out = predict(p, x, chunk)  # (K, N, k), computed in chunks of at most `chunk` elements
    loss = (out - y).square().sum(-1).mean(-1)
    acc = (out.argmax(-1) == y.argmax(-1)).double().mean(-1) if classification else None
    return loss, acc


def spectra(V: torch.Tensor, dtype: str = "float64", chunk: int | None = None) -> torch.Tensor:
    """Singular values of every run's ``V`` (``(K, m, n)`` -> ``(K, min(m, n))``, float64,
    descending), computed in ``dtype`` (``"float64"``: :func:`sgdrank.metrics.
    batch_singular_values`; ``"float32"``: single precision, whose error against float64 is far
    below the rank tolerances, tested) a chunk of runs at a time, so that the copies hold at
    most ``chunk`` (default :data:`CHUNK`) floats (a float64 element counts two). A run with a
    non-finite entry gets NaN (a diverged run records NaN, not an exception)."""
    if dtype not in ("float64", "float32"):
        raise ValueError(f"svd dtype must be 'float64' or 'float32', got {dtype!r}")
    K, m, n = V.shape
    per = m * n * (2 if dtype == "float64" else 1)
    kc = max(1, (CHUNK if chunk is None else int(chunk)) // per)
    out = []
    for a in range(0, K, kc):
        v = V[a : a + kc]
        ok = torch.isfinite(v).all((1, 2))
        w = torch.where(ok.view(-1, 1, 1), v, 0)
        if dtype == "float64":
            s = metrics.batch_singular_values(w)
        else:
            s = torch.linalg.svdvals((w.mT if m < n else w).float()).double()
        s[~ok] = math.nan
        out.append(s)
    return torch.cat(out)


def train(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    width: int,
    lams: Sequence[float],
    seeds: Sequence[int],
    lr: float | Sequence[float],
    batch_size: int,
    epochs: int,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    classification: bool = False,
    lr_gamma: float = 0.95,
    lr_every: int = 200,
    record_every: int = 10,
    record_steps: Sequence[int] = (),
    dtype=torch.float32,
    desc: str = "two-layer runs",
    init: Params | None = None,
    device: str | torch.device | None = None,
    quiet: bool = False,
    svd_dtype: str = "float64",
    chunk: int | None = None,
    cache=None,
) -> Result:
    """Train ``K = len(lams)`` two-layer ReLU networks of width ``width`` with mini-batch SGD
    (reshuffled every epoch, per-run batch orders from :func:`order_generator`) and weight
    decay ``lams[i]`` on ``u`` and ``V`` (book convention, see the module docstring).

    ``x``: ``(N, n)``; ``y``: ``(N, k)`` targets (use :func:`as_targets` / :func:`one_hot`).
    ``lr``: one learning rate or one per run; multiplied by ``lr_gamma`` every ``lr_every``
    epochs. Metrics are recorded after epochs ``0, record_every, 2 record_every, ..`` (epoch 0:
    at initialisation), after the last epoch, and after the steps listed in ``record_steps``.
    ``classification``: also record accuracies (argmax of ``f`` against argmax of ``y``).
    ``device``: where to train (default: ``x``'s device); the batch orders are drawn on the CPU,
    so a run's batches do not depend on the device. ``quiet``: no progress bar or summary line
    (for checked notebook cells, whose output must not contain a timing). ``svd_dtype``: the
    precision of the recorded and final spectra (:func:`spectra`). ``chunk``: memory budget of
    the evaluations and SVDs in elements (default :data:`CHUNK`; :func:`chunk_sizes`).
    ``cache``: a results folder (``"ch05"``, :func:`sgdrank.cache.folder`) that keeps the
    result of this exact call (:func:`sgdrank.cache.memo`: keyed by every argument, tensors by
    value, and this module's source), so that a run lost with its runtime is not repeated; the
    progress text (``desc``, ``quiet``) is not part of the key.
    """
    if cache is not None:
        call = {k: v for k, v in locals().items() if k not in ("cache", "x", "y")}
        return _cache.memo(cache, train, x, y, files=("twolayer.py",), ignore=("desc", "quiet"),
                           **call)
    lams = [float(v) for v in lams]
    seeds = [int(s) for s in seeds]
    K = len(lams)
    if K == 0 or len(seeds) != K:
        raise ValueError(
            f"need one seed per lambda, got {len(lams)} lambdas and {len(seeds)} seeds"
        )
    if any(v < 0 for v in lams):
        raise ValueError(f"weight decay must be >= 0, got {lams}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x must be (N, n) and y (N, k) with the same N, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    N, n = x.shape
    k = y.shape[1]
    if not 1 <= batch_size <= N:
        raise ValueError(f"batch_size must be in 1..{N}, got {batch_size}")
    if epochs < 0 or record_every < 1:
        raise ValueError(f"epochs must be >= 0 and record_every >= 1, got {epochs}, {record_every}")
    lr_runs = torch.as_tensor(
        [float(lr)] * K if np.ndim(lr) == 0 else [float(v) for v in lr], dtype=dtype
    )
    if lr_runs.shape != (K,) or (lr_runs <= 0).any():
        raise ValueError(f"lr must be positive, one value or one per run (K = {K}), got {lr}")
    dev = torch.device(device) if device is not None else x.device
    x, y = x.to(dev, dtype), y.to(dev, dtype)
    has_test = x_test is not None and y_test is not None
    if has_test:
        x_test, y_test = x_test.to(dev, dtype), y_test.to(dev, dtype)

    p = init.clone() if init is not None else init_params(seeds, n, width, k, dtype)
    p = Params(p.u.to(dev), p.V.to(dev), p.b.to(dev))
    if p.V.shape != (K, width, n) or p.u.shape != (K, k, width):
        raise ValueError("init does not match (K, width, n, k)")
    lam_t = torch.as_tensor(lams, dtype=dtype, device=dev)
    lr_runs = lr_runs.to(dev)
    gens = [order_generator(s) for s in seeds]
    S = N // batch_size
    rec_steps = set(int(s) for s in record_steps)
    hist: dict[str, list] = {
        key: [] for key in ("epoch", "step", "train_loss", "stable_rank", "fro", "spec")
    }
    if has_test:
        hist["test_loss"] = []
    if classification:
        hist["train_acc"] = []
        if has_test:
            hist["test_acc"] = []

    last_s: list = [None, None]  # (step, spectra) of the latest record

    def record(epoch: float, step: int):
        with torch.no_grad():
            ok = torch.isfinite(p.u).all((1, 2))
            s = spectra(p.V, svd_dtype, chunk)  # NaN where V is not finite
            last_s[:] = step, s.clone()  # the final spectra, if nothing moves after it
            s[~ok] = math.nan  # a diverged run records nan, not an exception
            ok = ok & torch.isfinite(s).all(1)
            hist["epoch"].append(epoch)
            hist["step"].append(step)
            loss, acc = _evaluate(p, x, y, classification, chunk)
            hist["train_loss"].append(loss.double().cpu().numpy())
            sr = metrics.stable_rank(s)
            sr[~ok] = math.nan
            hist["stable_rank"].append(sr.cpu().numpy())
            hist["fro"].append(torch.linalg.vector_norm(s, dim=-1).cpu().numpy())
            hist["spec"].append(s[:, 0].cpu().numpy())
            if classification:
                hist["train_acc"].append(acc.cpu().numpy())
            if has_test:
                tl, ta = _evaluate(p, x_test, y_test, classification, chunk)
                hist["test_loss"].append(tl.double().cpu().numpy())
                if classification:
                    hist["test_acc"].append(ta.cpu().numpy())

    t0 = time.perf_counter()
    record(0, 0)
    step = 0
    last_grad = torch.zeros(K, S, dtype=torch.float64, device=dev)
    last_batches = torch.zeros(K, S, batch_size, dtype=torch.long, device=dev)
    for epoch in range(epochs) if quiet else progress(range(epochs), desc=desc):
        mu = lr_runs * (lr_gamma ** (epoch // lr_every))
        shrink = (1 - 2 * mu * lam_t).view(K, 1, 1)
        mu3 = mu.view(K, 1, 1)
        perm = torch.stack([torch.randperm(N, generator=g) for g in gens])[:, : S * batch_size].to(
            dev
        )
        batches = perm.view(K, S, batch_size)
        last = epoch == epochs - 1
        for j in range(S):
            idx = batches[:, j]
            xb, yb = x[idx], y[idx]
            _, (dU, dV, db) = loss_grads(p, xb, yb)
            if last:
                last_grad[:, j] = torch.linalg.matrix_norm(
                    dV + 2 * lam_t.view(K, 1, 1) * p.V
                ).double()
            _update(p, dU, dV, db, shrink, mu3, mu.view(K, 1))
            step += 1
            if step in rec_steps:
                record(epoch + (j + 1) / S, step)
        if last:
            last_batches = batches.clone()
        if (epoch + 1) % record_every == 0 or last:
            if not hist["step"] or hist["step"][-1] != step:
                record(epoch + 1, step)
    seconds = time.perf_counter() - t0
    history = {key: np.asarray(v) for key, v in hist.items()}
    order = np.argsort(history["step"], kind="stable")
    history = {key: v[order] for key, v in history.items()}
    # the final spectra: those of the last record when it was taken after the last step (it
    # always is, unless epochs = 0 and record_steps asked for more), else computed here
    sv = (last_s[1] if last_s[0] == step else spectra(p.V, svd_dtype, chunk)).cpu().numpy()
    return Result(
        p,
        np.asarray(lams),
        np.asarray(seeds),
        float(lr_runs[0]),
        batch_size,
        epochs,
        history,
        sv,
        last_grad.cpu().numpy(),
        last_batches,
        seconds,
        S,
        dict(
            width=width,
            lr_gamma=lr_gamma,
            lr_every=lr_every,
            n=n,
            k=k,
            N=N,
            lrs=lr_runs.cpu().tolist(),
            custom_init=init is not None,
            svd_dtype=svd_dtype,
        ),
    )



# --------------------------------------------------------------------------------------------
# Per-sample and batch gradients at one parameter point (Theorems 2.4 / 2.6)
# --------------------------------------------------------------------------------------------
def per_sample_factors(p: Params, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``a_j = 2 D(x_j) u^T (f(x_j) - y_j)`` for every sample ``j`` of run ``i`` (``(N, m)``,
    float64), so that ``M_j = a_j x_j^T`` is the gradient of ``||f(x_j) - y_j||^2`` w.r.t. ``V``."""
    u, V, b = (t[i].double() for t in (p.u, p.V, p.b))
    x, y = x.double().to(V.device), y.double().to(V.device)
    return _factors(u, V, b, x, _residuals(u, V, b, x, y))


def _residuals(u, V, b, x, y, chunk: int | None = None) -> torch.Tensor:
    """``f(x_j) - y_j`` of one run (float64 ``u, V, b``), ``(N, k)``, in chunks of samples whose
    ``(N_c, m)`` pre-activations hold at most ``chunk`` float64 elements."""
    N, m = x.shape[0], V.shape[0]
    _, nc = chunk_sizes(1, N, 2 * m, chunk)
    if nc >= N:
        pre = x @ V.T + b
        return pre.clamp_min(0) @ u.T - y  # (N, k)
    out = [(x[s : s + nc] @ V.T + b).clamp_min(0) @ u.T - y[s : s + nc] for s in range(0, N, nc)]
    return torch.cat(out)


def _factors(u, V, b, x, r) -> torch.Tensor:
    """``a_j`` restricted to the hidden units of ``u (k, m_c)``, ``V (m_c, n)``, ``b (m_c,)``,
    from the residuals ``r`` ``(N, k)``: ``(N, m_c)``."""
    pre = x @ V.T + b
    return 2 * (r @ u) * (pre > 0)


@dataclass
class GradStats:
    """Gradients of one run at one parameter point: ``per_sample`` = ``||g_j||_F`` for every
    sample (``g_j = M_j + 2 lambda V``), ``full`` = ``||(1/N) sum_j g_j||_F``, ``reg`` =
    ``2 lambda ||V||_F`` (the norm of the weight-decay term alone), ``fro`` = ``||V||_F``,
    ``sv`` the singular values of ``V`` (float64)."""

    per_sample: np.ndarray
    full: float
    reg: float
    fro: float
    sv: np.ndarray
    gram: torch.Tensor
    c: torch.Tensor
    lam: float

    def batch_norms(self, batches: torch.Tensor, chunk: int = 256) -> np.ndarray:
        """``||G_S||_F`` for each row ``S`` of ``batches`` (``(nb, B)`` sample indices)."""
        return batch_grad_norms(self, batches, chunk)

    def eps_upper(self, B: int) -> float:
        """A certified upper bound on ``max over all batches of size B of ||G_S||_F``: by the
        triangle inequality ``||G_S|| <= (1/B) sum_{j in S} ||g_j||``, at most the mean of the
        ``B`` largest per-sample norms."""
        top = np.sort(self.per_sample)[::-1][:B]
        return float(top.mean())


def grad_stats(
    p: Params, i: int, lam: float, x: torch.Tensor, y: torch.Tensor, chunk: int | None = None,
    sv: np.ndarray | None = None,
) -> GradStats:
    """:class:`GradStats` of run ``i`` (weight decay ``lam``) on the data ``(x, y)``; the
    per-sample factors are formed a chunk of hidden units at a time (``chunk``: elements,
    default :data:`CHUNK`), so memory is ``O(N^2 + chunk)``, not ``O(N m)``. ``sv``: the
    float64 singular values of run ``i``'s ``V`` if already known (:func:`train`'s final
    spectra in float64 are the same computation)."""
    u, V, b = (t[i].double() for t in (p.u, p.V, p.b))
    xd, yd = x.double().to(V.device), y.double().to(V.device)
    N, m = xd.shape[0], V.shape[0]
    r = _residuals(u, V, b, xd, yd, chunk)
    # hidden units in chunks: a_j restricted to a chunk is (N, m_c), at most `chunk` floats
    # (float64: two each); <a_i, a_j> and a_j^T V add over the chunks (one chunk: exactly the
    # unchunked products)
    mc = max(1, (CHUNK if chunk is None else int(chunk)) // (2 * max(1, N)))
    aa = aV = None
    for s in range(0, m, mc):
        a = _factors(u[:, s : s + mc], V[s : s + mc], b[s : s + mc], xd, r)
        if aa is None:
            aa, aV = a @ a.T, a @ V[s : s + mc]
        else:
            aa += a @ a.T
            aV += a @ V[s : s + mc]
    gram = aa * (xd @ xd.T)  # <M_i, M_j>
    c = (aV * xd).sum(1)  # <V, M_j> = a_j^T V x_j
    fro2 = float(V.square().sum())
    ps = (gram.diagonal() + 4 * lam * c + 4 * lam**2 * fro2).clamp_min(0).sqrt()
    full = math.sqrt(
        max(float(gram.sum()) / N**2 + 4 * lam * float(c.sum()) / N + 4 * lam**2 * fro2, 0.0)
    )
    sv = metrics.batch_singular_values(V).cpu().numpy() if sv is None else np.asarray(sv)
    return GradStats(
        ps.cpu().numpy(), full, 2 * lam * math.sqrt(fro2), math.sqrt(fro2), sv, gram, c, float(lam)
    )


def batch_grad_norms(st: GradStats, batches: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """``||G_S||_F`` from the Gram identity of the module docstring, for batches ``(nb, B)``."""
    batches = torch.as_tensor(batches, dtype=torch.long).to(st.gram.device)
    if batches.ndim != 2:
        raise ValueError(f"batches must be (n_batches, B), got shape {tuple(batches.shape)}")
    B = batches.shape[1]
    fro2 = st.fro**2
    out = []
    for s in range(0, batches.shape[0], chunk):
        bb = batches[s : s + chunk]
        quad = st.gram[bb.unsqueeze(2), bb.unsqueeze(1)].sum((1, 2)) / B**2
        lin = st.c[bb].sum(1) * (4 * st.lam / B)
        out.append((quad + lin + 4 * st.lam**2 * fro2).clamp_min(0).sqrt())
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def random_batches(N: int, B: int, n_batches: int, seed: int) -> torch.Tensor:
    """``n_batches`` batches of ``B`` distinct samples, each uniform over the ``(N choose B)``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(N, generator=g)[:B] for _ in range(n_batches)])


def all_batches(N: int, B: int, limit: int = 200_000) -> torch.Tensor:
    """Every batch of size ``B`` from ``N`` samples, ``(N choose B, B)`` (refuses more than
    ``limit``)."""
    count = math.comb(N, B)
    if count > limit:
        raise ValueError(f"(N choose B) = {count:,} batches is more than limit={limit:,}")
    return torch.tensor(list(itertools.combinations(range(N), B)), dtype=torch.long).view(count, B)


# --------------------------------------------------------------------------------------------
# Distances to low rank and the bounds of Chapter 5
# --------------------------------------------------------------------------------------------
def dist_to_rank(sv, r: int) -> np.ndarray:
    """``min_{rank R <= r} ||V - R||_F = sqrt(sum_{i > r} s_i^2)`` (Eckart-Young) from singular
    values ``sv`` ``(..., p)``, descending."""
    sv = np.asarray(sv, dtype=float)
    return np.sqrt(np.square(sv[..., r:]).sum(-1))


def uniform_bound(eps: float, lam: float, B: int) -> float:
    """Chapter 5's form of WD2L Thm 2.6 with one ``lambda`` for every sample: if every batch
    gradient of size ``B`` has ``||G_S||_F <= eps``, then ``V`` is within
    ``(2B - 1) eps / (2 lambda)`` of a rank-one matrix."""
    if lam <= 0:
        return math.inf
    return (2 * B - 1) * eps / (2 * lam)


def truncate(p: Params, i: int, r: int, svd=None) -> Params:
    """Run ``i`` with ``V`` replaced by its best rank-``r`` approximation (a batch of one);
    ``svd``: ``torch.linalg.svd(p.V[i].double(), full_matrices=False)`` if already computed, or
    the top right singular vectors alone (a tensor ``(>= r, n)``, :func:`top_right`): then
    ``V_r = V Vh_r^T Vh_r``, the same matrix without the ``m x n`` factor ``U``."""
    V = p.V[i].double()
    if isinstance(svd, torch.Tensor):
        Vh = svd[:r].to(V.device)
        Vr = (V @ Vh.T) @ Vh
    else:
        U, s, Vh = svd if svd is not None else torch.linalg.svd(V, full_matrices=False)
        Vr = (U[:, :r] * s[:r]) @ Vh[:r]
    return Params(p.u[i : i + 1].double(), Vr.unsqueeze(0), p.b[i : i + 1].double())


def top_right(V: torch.Tensor, r: int) -> torch.Tensor:
    """The top ``r`` right singular vectors of ``V`` (``(r, n)``, float64), as the leading
    eigenvectors of ``V^T V``: an ``n x n`` problem, where the SVD of a tall ``m x n`` matrix
    with its ``U`` (for the truncation of :func:`truncate`) is 3.5 times the time of its
    singular values at ``32768 x 784``. They agree with the SVD's to ~1e-13 wherever the rank-r
    truncation is well defined (a gap after ``s_r``; tested)."""
    V = V.double()
    _, vec = torch.linalg.eigh(V.T @ V)
    return vec[:, -r:].flip(-1).T


def lipschitz_gap(p: Params, i: int, r: int, x: torch.Tensor) -> tuple[float, float]:
    """``(max_x |f_V(x) - f_{V_r}(x)|, ||u||_2 ||V - V_r||_2 max_x ||x||)`` over the rows of ``x``
    for run ``i`` and its rank-``r`` truncation: the measured change of the function and its
    Lipschitz bound (ReLU is 1-Lipschitz), largest over outputs (max norm over k)."""
    one = Params(p.u[i : i + 1].double(), p.V[i : i + 1].double(), p.b[i : i + 1].double())
    tr = truncate(p, i, r)
    xd = x.double().to(one.V.device)
    diff = (predict(one, xd) - predict(tr, xd))[0]
    meas = float(torch.linalg.vector_norm(diff, dim=-1).max())
    s = metrics.batch_singular_values(one.V[0])
    tail = float(s[r]) if r < s.numel() else 0.0
    bound = (
        float(torch.linalg.matrix_norm(one.u[0], ord=2))
        * tail
        * float(torch.linalg.vector_norm(xd, dim=1).max())
    )
    return meas, bound


# --------------------------------------------------------------------------------------------
# Generalization bound of WD2L Thm 3.11 (orders of magnitude, constants set to 1)
# --------------------------------------------------------------------------------------------
def n_params(n: int, m: int, k: int = 1, rank: int | None = None) -> int:
    """Parameters of the class the pseudo-dimension bound counts: full first layer
    ``m n + m + k m`` (V, b, u); rank ``r``: ``V = A C`` with ``C`` ``r x n`` and ``A`` ``m x r``,
    ``r n + m r + m + k m`` (WD2L eq. 12: a linear map to ``R^r`` followed by a two-layer net)."""
    if rank is None:
        return m * n + m + k * m
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return rank * n + m * rank + m + k * m


def pdim_order(W: int, L: int) -> float:
    """``L W log2(W)``: the order of Bartlett et al. (2019)'s pseudo-dimension bound for a
    piecewise-linear network with ``W`` parameters in ``L`` layers, constant set to 1 (base-2
    logarithm, as in their theorem; :func:`gen_bound_order` uses the natural ``ln N``)."""
    return float(L * W * math.log2(W))


def gen_bound_order(pdim: float, N: int) -> float:
    """``sqrt(Pdim ln(N) / N)`` (natural logarithm): the order of the uniform bound
    (Anthony-Bartlett Thm 17.1 + 18.4) on ``|test loss - train loss|`` for losses scaled to
    ``[0, 1]``, constant set to 1. At or above 1 it is vacuous."""
    return math.sqrt(pdim * math.log(N) / N)


def n_needed(pdim: float, eps: float = 0.1) -> float:
    """Smallest ``N`` with ``gen_bound_order(pdim, N) <= eps`` (``N = pdim log(N) / eps^2``
    solved by fixed-point iteration)."""
    N = max(pdim / eps**2, 3.0)
    for _ in range(100):
        N = pdim * math.log(N) / eps**2
    return N


# --------------------------------------------------------------------------------------------
# One table per sweep: ranks, errors, gradients and bounds of every run
# --------------------------------------------------------------------------------------------
def constant_loss(y_train: torch.Tensor, y_eval: torch.Tensor | None = None) -> float:
    """Loss of the best constant predictor fitted on the training targets (their mean),
    ``mean_i ||y_i - ybar||^2`` on ``y_eval`` (default: the training targets)."""
    y_eval = y_train if y_eval is None else y_eval
    return float((y_eval.double() - y_train.double().mean(0)).square().sum(1).mean())


def _float64_record(res: Result) -> bool:
    """True when ``res`` recorded its spectra (``res.sv``) in float64: only then do the float64
    analyses (:func:`analyze`, :func:`decompose`) reuse them instead of decomposing ``V``."""
    return res.config.get("svd_dtype", "float64") == "float64"


def analyze(
    res: Result,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_random: int = 1000,
    seed: int = 0,
    collapse: float = 0.95,
    keep_norms: bool = False,
) -> list[dict]:
    """One row per run of ``res`` at its final parameters, on the training data ``(x, y)``:

    - ``sr``/``sr0``: stable rank of ``V`` now / at initialisation; ``rank``/``rank0``: threshold
      rank (``atol = 1e-3`` on ``V / ||V||_F``) now / at initialisation; ``fro``/``fro0``:
      ``||V||_F``; ``d1``, ``d2``:
      distance to the nearest matrix of rank 1 / 2; ``collapsed``: train loss at least
      ``collapse`` times the constant predictor's (then ``V`` carries no fitted signal);
    - ``eps_sgd``: largest ``||grad_V L^lambda_S||_F`` SGD met in its last epoch;
      ``eps_last``: the same batches at the final point; ``eps_rand``: largest over ``n_random``
      random batches at the final point; ``eps_up``: certified upper bound over all batches;
      ``g_min``, ``g_med``: smallest / median per-sample ``||g_i||``; ``full``: full-batch
      gradient; ``reg`` = ``2 lambda ||V||_F``;
    - bounds on ``d1``: ``b_sample = g_min / (2 lambda)`` (GP22 Thm 1 at ``B* = 1``, always
      valid), ``b_rand``/``b_up`` = ``(2B - 1) eps / (2 lambda)`` with ``eps_rand``/``eps_up``.
    With ``keep_norms`` the rows also hold the arrays ``norms_rand`` and ``norms_last``."""
    B = res.batch_size
    N = x.shape[0]
    rb = random_batches(N, B, n_random, seed)
    base = constant_loss(y)
    s0 = res.history["stable_rank"][0]
    f0 = res.history["fro"][0]
    rank0 = np.asarray([init_spectrum(res, int(sd))[1] for sd in res.seeds])
    rows = []
    for i, (lam, sd) in enumerate(zip(res.lams, res.seeds)):
        row = dict(
            lam=float(lam),
            seed=int(sd),
            B=B,
            sr=float(res.final("stable_rank")[i]),
            sr0=float(s0[i]),
            fro=float(res.final("fro")[i]),
            fro0=float(f0[i]),
            rank0=int(rank0[i]),
        )
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            if key in res.history:
                row[key] = float(res.final(key)[i])
        if "test_loss" in row:
            row["gap"] = row["test_loss"] - row["train_loss"]
        row["collapsed"] = bool(
            not np.isfinite(row["train_loss"]) or row["train_loss"] >= collapse * base
        )
        if not np.all(np.isfinite(res.sv[i])):
            rows.append(row)
            continue
        known = res.sv[i] if _float64_record(res) else None
        st = grad_stats(res.params, i, float(lam), x, y, sv=known)
        nr = st.batch_norms(rb)
        nl = st.batch_norms(res.last_epoch_batches[i])
        row.update(
            rank=int(metrics.threshold_rank(torch.as_tensor(st.sv))),
            d1=float(dist_to_rank(st.sv, 1)),
            d2=float(dist_to_rank(st.sv, 2)),
            eps_sgd=float(res.last_epoch_grad[i].max()),
            eps_last=float(nl.max()),
            eps_rand=float(nr.max()),
            eps_up=st.eps_upper(B),
            g_min=float(st.per_sample.min()),
            g_med=float(np.median(st.per_sample)),
            full=st.full,
            reg=st.reg,
        )
        row.update(
            b_sample=row["g_min"] / (2 * lam) if lam > 0 else math.inf,
            b_rand=uniform_bound(row["eps_rand"], float(lam), B),
            b_up=uniform_bound(row["eps_up"], float(lam), B),
        )
        if keep_norms:
            row.update(norms_rand=nr, norms_last=nl)
        rows.append(row)
    return rows


def exact_bounds(
    p: Params, i: int, x: torch.Tensor, y: torch.Tensor, lam_i: Sequence[float], B: int
) -> dict:
    """Theorems 2.4 / 2.6 on a problem small enough to enumerate every batch (float64).

    Run ``i`` of ``p``, per-sample weight decays ``lam_i`` (WD2L's
    ``lambda_i = lambda phi(x_i, y_i)``; all equal for ordinary weight decay),
    ``g_j = M_j + 2 lam_j V`` and ``G_S = (1/B) sum_{j in S} g_j``.
    Returns ``eps`` (max over all ``(N choose B)`` batches of ``||G_S||_F``), the per-sample norms
    ``g`` and the distances ``d1``, ``d2`` of ``V`` to rank 1 / 2, with the bounds

    - ``paper``: WD2L Thm 2.6 (rank 2), ``B eps / max_{j,l} |lam_j - lam_l|`` (inf if all equal);
    - ``sample``: ``min_j ||g_j|| / (2 lam_j)`` on ``d1`` (GP22 Thm 1 with ``B* = 1``);
    - ``book``: ``(2B - 1) eps / (2 max_j lam_j)`` on ``d1``, from ``||g_j|| <= (2B - 1) eps``.
    """
    lam = torch.as_tensor(lam_i, dtype=torch.float64, device=p.V.device)
    xd, yd = x.double().to(p.V.device), y.double().to(p.V.device)
    N = xd.shape[0]
    if lam.shape != (N,) or (lam <= 0).any():
        raise ValueError(f"need one positive weight decay per sample ({N}), got {list(lam_i)}")
    V = p.V[i].double()
    a = per_sample_factors(p, i, xd, yd)
    g = a.unsqueeze(2) * xd.unsqueeze(1) + 2 * lam.view(N, 1, 1) * V  # (N, m, n)
    batches = all_batches(N, B).to(V.device)
    eps = float(torch.linalg.matrix_norm(g[batches].mean(1)).max())
    gn = torch.linalg.matrix_norm(g)
    sv = metrics.batch_singular_values(V).cpu().numpy()
    spread = float(lam.max() - lam.min())
    return dict(
        eps=eps,
        g=gn.cpu().numpy(),
        d1=float(dist_to_rank(sv, 1)),
        d2=float(dist_to_rank(sv, 2)),
        fro=float(V.norm()),
        n_batches=int(batches.shape[0]),
        paper=B * eps / spread if spread > 0 else math.inf,
        sample=float((gn / (2 * lam)).min()),
        book=(2 * B - 1) * eps / (2 * float(lam.max())),
        g_le=bool((gn <= (2 * B - 1) * eps * (1 + 1e-12)).all()),
    )


# --------------------------------------------------------------------------------------------
# Data and the batch-size sweep of Chapter 5
# --------------------------------------------------------------------------------------------
def load_xy(name: str, n_train: int | None = None, n_test: int | None = None, seed: int = 0):
    """``(ds, x, y, x_test, y_test)`` for :func:`train`: :func:`sgdrank.data.load_dataset` (inputs
    and regression targets standardised with the training statistics), inputs flattened to
    ``(N, n)``, targets ``(N, 1)`` (regression) or one-hot ``(N, n_classes)`` (classification)."""
    from . import data

    ds = data.load_dataset(name, n_train=n_train, n_test=n_test, seed=seed)
    x, xt = ds.x_train.flatten(1), ds.x_test.flatten(1)
    if ds.task == "regression":
        return ds, x, as_targets(ds.y_train), xt, as_targets(ds.y_test)
    k = ds.n_classes
    return ds, x, one_hot(ds.y_train, k), xt, one_hot(ds.y_test, k)


def batch_sweep(
    x,
    y,
    x_test,
    y_test,
    *,
    batch_sizes: Sequence[int],
    lam: float,
    seeds: Sequence[int],
    width: int,
    lr: float,
    epochs: int,
    steps: int,
    classification: bool = False,
    desc: str = "B sweep",
    device: str | torch.device | None = None,
    svd_dtype: str = "float64",
    cache=None,
) -> list[dict]:
    """Stable rank, ``||V||_F``, errors (and accuracies) against the batch size at a fixed
    number of epochs and at a fixed number of SGD steps, with a constant learning rate (so that
    the schedule does not differ between batch sizes). Batch size ``B`` runs for
    ``max(epochs, ceil(steps / (N // B)))`` epochs; one row per (B, seed, ``when``) with
    ``when`` in ``("epochs", "steps")``."""
    N = x.shape[0]
    rows = []
    for B in batch_sizes:
        S = N // B
        ep = max(epochs, -(-steps // S))
        res = train(
            x,
            y,
            width=width,
            lams=[lam] * len(seeds),
            seeds=seeds,
            lr=lr,
            batch_size=B,
            epochs=ep,
            x_test=x_test,
            y_test=y_test,
            classification=classification,
            lr_gamma=1.0,
            record_every=epochs,
            record_steps=[steps],
            desc=f"{desc}, B = {B}",
            device=device,
            svd_dtype=svd_dtype,
            cache=cache,
        )
        h = res.history
        at_ep = int(np.nonzero(np.isclose(h["epoch"], epochs))[0][0])
        at_st = int(np.nonzero(h["step"] == steps)[0][0])
        for when, t in (("epochs", at_ep), ("steps", at_st)):
            for i, sd in enumerate(seeds):
                row = dict(
                    B=B, seed=int(sd), when=when, epoch=float(h["epoch"][t]), step=int(h["step"][t])
                )
                for key in h:
                    if key not in ("epoch", "step"):
                        row[key] = float(h[key][t, i])
                if "test_loss" in row:
                    row["gap"] = row["test_loss"] - row["train_loss"]
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Decomposition V_T = c V_0 + DeltaV, linear baseline, truncation, sub-claim rules (Chapter 5)
# --------------------------------------------------------------------------------------------
def step_lrs(res: Result, i: int = 0) -> np.ndarray:
    """The learning rate of every SGD step of run ``i`` of ``res`` (``epochs * steps_per_epoch``
    values): ``lr * gamma ** (epoch // every)`` for each of the epoch's steps."""
    cfg = res.config
    lr = float(cfg.get("lrs", [res.lr] * len(res.lams))[i])
    ep = np.arange(res.epochs)
    per_epoch = lr * cfg["lr_gamma"] ** (ep // cfg["lr_every"])
    return np.repeat(per_epoch, res.steps_per_epoch)


_INIT_SV: dict = {}


def init_spectrum(res: Result, seed: int) -> tuple[torch.Tensor, int]:
    """``(s, rank)``: singular values (float64) and threshold rank of ``V_0`` of a run of
    ``res`` with seed ``seed``, redrawn by :func:`init_params` (one run at a time, never a
    float64 copy of every run) and decomposed once per initialisation (cached)."""
    cfg = res.config
    key = (int(seed), cfg["n"], cfg["width"], cfg["k"])
    if key not in _INIT_SV:
        V0 = init_params([int(seed)], cfg["n"], cfg["width"], cfg["k"], torch.float64).V
        s = metrics.batch_singular_values(V0)
        if any(k[1:] != key[1:] for k in _INIT_SV):
            _INIT_SV.clear()  # keep the entries of one shape only (one per seed)
        _INIT_SV[key] = (s[0], int(metrics.threshold_rank(s)[0]))
    return _INIT_SV[key]


def decompose(res: Result) -> list[dict]:
    """For every run of ``res``: ``c`` (from its learning-rate schedule), ``D = -ln c``, ``lr_sum``
    and the parts of ``V_T = c V_0 + DeltaV`` by :func:`sgdrank.decomposition.parts`, as flat keys
    ``rank_X`` (threshold rank at ``1e-3`` of the part's own norm), ``srank_X``, ``fro_X`` for
    ``X`` in ``W`` (``V_T``), ``W0`` (``V_0``; ``c V_0`` has its ranks), ``dW``, plus ``fro_cW0``
    and ``Dstar`` (the decay budget at ``1e-3``). ``V_0`` is redrawn from the seed. Every SVD is
    float64 (as in :func:`analyze`): ``V_T``'s are the run's own final ones (``res.sv``) when it
    recorded in float64, else computed here."""
    from . import decomposition

    cfg = res.config
    if cfg.get("custom_init"):
        raise ValueError("decompose needs runs started from init_params(seeds) (init=None)")
    f64 = _float64_record(res)
    rows = []
    for i, lam in enumerate(res.lams):
        lrs = step_lrs(res, i)
        c = decomposition.decay_factor(lrs, float(lam))
        row = dict(c=c, D=decomposition.total_decay(lrs, float(lam)), lr_sum=float(lrs.sum()))
        VT = res.params.V[i].double().cpu()
        if torch.isfinite(VT).all() and c > 0:
            sd = int(res.seeds[i])
            V0 = init_params([sd], cfg["n"], cfg["width"], cfg["k"], torch.float64).V[0]
            q = decomposition.parts(VT, V0, c, eps=(1e-3,), s0=init_spectrum(res, sd)[0],
                                    s=res.sv[i] if f64 else None)
            for x in ("W", "W0", "dW"):
                row.update(
                    {
                        f"rank_{x}": q[f"{x}_rank@0.001"],
                        f"srank_{x}": q[f"{x}_srank"],
                        f"fro_{x}": q[f"{x}_fro"],
                    }
                )
            row.update(fro_cW0=c * q["W0_fro"], Dstar=q["Dstar@0.001"])
        rows.append(row)
    return rows


def linear_baseline(x, y, x_test, y_test, classification: bool = False) -> dict:
    """Ordinary least squares with an intercept fitted on ``(x, y)``: the square loss (summed over
    outputs, averaged over samples) on train and test, and for classification the accuracies.
    A two-layer ReLU net with a rank-one ``V`` represents this fit exactly
    (``sigma(t + T) - sigma(-t + T) = 2t`` for ``|t| < T``: two units, one direction)."""
    xd, yd = x.double(), y.double()
    X = torch.cat([xd, torch.ones(len(xd), 1, dtype=torch.float64)], 1)
    W = torch.linalg.lstsq(X, yd, driver="gelsd").solution
    out = {}
    for tag, xx, yy in (("train", xd, yd), ("test", x_test.double(), y_test.double())):
        pred = torch.cat([xx, torch.ones(len(xx), 1, dtype=torch.float64)], 1) @ W
        out[f"{tag}_loss"] = float((pred - yy).square().sum(1).mean())
        if classification:
            out[f"{tag}_acc"] = float((pred.argmax(1) == yy.argmax(1)).double().mean())
    return out


def truncated_errors(
    p: Params, i: int, r: int, x, y, classification: bool = False, svd=None
) -> dict:
    """Loss (and accuracy) of run ``i`` on ``(x, y)`` with ``V`` replaced by its best rank-``r``
    approximation, and ``f_change``: the root-mean-square change of ``f`` over the samples
    (``svd``: as in :func:`truncate`)."""
    tr = truncate(p, i, r, svd)
    one = Params(p.u[i : i + 1].double(), p.V[i : i + 1].double(), p.b[i : i + 1].double())
    xd = x.double().to(tr.V.device)
    yd = y.double().to(tr.V.device)
    ft, f = predict(tr, xd)[0], predict(one, xd)[0]
    out = dict(
        loss=float((ft - yd).square().sum(1).mean()),
        f_change=float((ft - f).square().sum(1).mean().sqrt()),
    )
    if classification:
        out["acc"] = float((ft.argmax(1) == yd.argmax(1)).double().mean())
    return out


def weak_dependence(pr, ref: float, tol: float = 0.25) -> str:
    """Sub-claim verdict for "``a`` and ``b`` differ little" from a paired comparison ``pr``
    (``report.paired(a, b)``): ``reproduced`` when the whole 95% interval of the difference lies
    within ``tol * |ref|`` of 0 (an equivalence test), ``refuted`` when the difference is
    resolved and its mean exceeds ``tol * |ref|``, else ``not resolved``."""
    band = tol * abs(ref)
    if pr.n >= 2 and math.isfinite(pr.lo) and -band < pr.lo and pr.hi < band:
        return "reproduced"
    if pr.resolved and abs(pr.mean) > band:
        return "refuted"
    return "not resolved"


def near_stationary_point(
    delta: float,
    *,
    n: int = 3,
    m: int = 12,
    N: int = 8,
    lam: float = 0.05,
    rho: float = -0.5,
    seed: int = 0,
    profile: Sequence[float] | None = None,
):
    """A network and data where the hypothesis of Theorem 2.6 holds with a small ``eps`` and
    ``V != 0`` (so that its bound is informative), for the exact check of Chapter 5.

    Per-sample weight decays ``lam_i = lam * phi_i`` with the profile ``phi`` (``profile``; all
    ones by default: ordinary weight decay). At ``delta = 0``: collinear inputs ``x_i = t_i w``
    (``t_i = 1 + i/4``), ``V = v w^T`` with ``v = -(rho/lam) D u`` on the units ``D`` where
    ``rho u_j < 0`` (the others get ``v_j = 0`` and bias ``-1``, so they stay off), and targets
    chosen so that the residuals are ``r_i = rho phi_i / t_i``, i.e. ``a_i = -2 lam_i v / t_i``:
    then every ``g_i = 2 r_i t_i D u w^T + 2 lam_i V = 0``. ``delta > 0`` perturbs the inputs and
    ``V`` by ``delta`` times Gaussian noise (targets kept), so every ``g_i`` is ``O(delta)``
    while ``||V||_F`` stays ``O(1)``. Returns ``(params, x, y, lam)`` in float64 (one run);
    the per-sample decays are ``lam * phi_i``."""
    phi = torch.ones(N, dtype=torch.float64) if profile is None else torch.as_tensor(
        [float(v) for v in profile], dtype=torch.float64)
    if phi.shape != (N,) or (phi <= 0).any():
        raise ValueError(f"profile needs {N} positive values, got {profile}")
    g = torch.Generator().manual_seed(int(seed))
    dt = torch.float64
    w = torch.randn(n, generator=g, dtype=dt)
    w = w / w.norm()
    u = torch.randn(1, m, generator=g, dtype=dt)
    act = (rho * u[0]) < 0
    v = torch.where(act, -(rho / lam) * u[0], torch.zeros((), dtype=dt))
    b = torch.where(act, torch.zeros((), dtype=dt), -torch.ones((), dtype=dt))
    V = torch.outer(v, w)
    t = 1 + torch.arange(N, dtype=dt) / 4
    x = t.unsqueeze(1) * w
    p = Params(u.unsqueeze(0), V.unsqueeze(0), b.unsqueeze(0))
    y = forward(p, x)[0] - (rho * phi / t).unsqueeze(1)
    x = x + delta * torch.randn(N, n, generator=g, dtype=dt)
    V = V + delta * torch.randn(m, n, generator=g, dtype=dt)
    return Params(u.unsqueeze(0), V.unsqueeze(0), b.unsqueeze(0)), x, y, lam


def swap_ratio(g: torch.Tensor, B: int) -> float:
    """``max_i ||g_i|| / max_S ||(1/B) sum_{i in S} g_i||`` over all batches ``S`` of size ``B``
    of the vectors (or matrices) ``g`` (``(N, ...)``): the swap lemma says it is at most
    ``2B - 1``."""
    g = g.double().flatten(1)
    eps = float(g[all_batches(g.shape[0], B)].mean(1).norm(dim=-1).max())
    return float(g.norm(dim=-1).max()) / eps


def extremal_vectors(B: int, N: int, d: int = 2) -> torch.Tensor:
    """``N`` vectors on which the swap lemma is an equality: ``g_0 = (2B - 1) e``, every other
    ``g_l = -e`` (``|e| = 1``). A batch with ``g_0`` has mean ``(2B-1 - (B-1)) e / B = e``, a
    batch without it ``-e``: ``eps = 1`` and ``||g_0|| = (2B - 1) eps``."""
    if not 1 <= B < N:
        raise ValueError(f"need 1 <= B < N, got B={B}, N={N}")
    g = torch.zeros(N, d, dtype=torch.float64)
    g[0, 0] = 2 * B - 1
    g[1:, 0] = -1.0
    return g


def lam_table(
    res: Result,
    x,
    y,
    x_test,
    y_test,
    *,
    n_random: int = 1000,
    classification: bool = False,
    lin: dict | None = None,
) -> list[dict]:
    """One row per run: :func:`analyze` (with the batch-gradient norms), :func:`decompose`, the
    test loss (and accuracy) after truncating ``V`` to rank 1 and 2 (``test_loss_r1``, ...,
    ``f_change_r1``: RMS change of ``f`` on the test inputs) and, given the linear baseline
    ``lin`` (:func:`linear_baseline`), ``underfit``: train loss above the linear model's (a
    rank-one ``V`` can represent the linear fit, so such a run underfits its own class) and
    ``train_over_lin``, the ratio of the two train losses."""
    rows = analyze(res, x, y, n_random=n_random, keep_norms=True)
    for i, (row, dec) in enumerate(zip(rows, decompose(res))):
        row.update(dec)
        if "train_acc" in row and "test_acc" in row:
            row["acc_gap"] = row["train_acc"] - row["test_acc"]
        if np.all(np.isfinite(res.sv[i])):
            svd = top_right(res.params.V[i], 2)  # V_r = V Vh_r^T Vh_r: no m x n factor U
            for r in (1, 2):
                t = truncated_errors(res.params, i, r, x_test, y_test, classification, svd)
                row.update({f"test_loss_r{r}": t["loss"], f"f_change_r{r}": t["f_change"]})
                if classification:
                    row[f"test_acc_r{r}"] = t["acc"]
        if lin is not None:
            row["underfit"] = bool(not row["train_loss"] <= lin["train_loss"])
            row["train_over_lin"] = row["train_loss"] / lin["train_loss"]
    return rows


def arm(runs, lam, key):
    """Values of ``key`` at ``lam``, in seed order (so that arms pair by seed)."""
    return runs[runs.lam == lam].sort_values("seed")[key].to_numpy(float)


_arm = arm  # the earlier private name


def low_rank(pr, a, b, factor: float = 0.5) -> str:
    """Verdict for "``a`` is low rank against ``b``", i.e. ``mean(a) <= factor * mean(b)``, from
    the paired comparison ``pr = report.paired(a, b)``: ``reproduced`` when resolved lower and
    the mean is that low; ``not reproduced`` when the 95% interval excludes a drop that large;
    ``refuted`` when resolved higher; else ``not resolved``."""
    need = -(1 - factor) * float(np.mean(b))
    if pr.verdict == "refuted":
        return "refuted"
    if pr.verdict == "reproduced" and np.mean(a) <= factor * np.mean(b):
        return "reproduced"
    if pr.n >= 2 and math.isfinite(pr.lo) and pr.lo > need:
        return "not reproduced"
    return "not resolved"


def lam_summary(runs, gap_key: str = "gap", fit_margin: float = 0.1) -> dict:
    """The numbers and paired comparisons behind Chapter 5's verdicts on one lambda sweep
    (``runs``: the :func:`lam_table` rows as a DataFrame; arms pair by seed).

    Lambdas: ``lo`` (the smallest, 0), ``ok`` (no run collapsed), ``fit`` (no run underfits the
    linear baseline), ``hi`` (the largest fitting lambda; ``lo`` if none larger), ``top`` (the
    largest non-collapsed), ``best`` (lowest mean test loss among ``ok``), ``small_gap``
    (smallest mean ``gap_key`` among ``fit``: gaps are compared at equal fit), ``nxt`` (the
    smallest underfitting lambda above ``hi``, or None). Paired comparisons (``a - b``):
    ``rank`` stable rank at ``hi`` vs ``lo``; ``rank_nxt`` at ``nxt`` vs ``lo``; ``rank_best``
    at ``best`` vs its initialisation; ``free`` stable rank of ``V`` at ``lo`` vs ``V_0``;
    ``dW_free`` stable rank of DeltaV at ``lo`` vs that of ``V_0``; ``dW_fit`` stable rank of
    DeltaV at ``hi`` vs ``lo``; ``gap`` ``gap_key`` at ``hi`` vs ``lo``; ``gap_top`` at ``top``
    vs ``lo`` (underfitting when ``top`` is not in ``fit``); ``test_gap`` test loss at
    ``small_gap`` vs ``best``. Verdicts: ``rank_v`` (:func:`low_rank` of ``rank``), ``free_v``
    (the claim "without decay V is not low rank", from ``free``), and ``close``: the central
    verdict flips if the fit rule is loosened by ``fit_margin`` (``nxt`` trains within that
    fraction of the linear model's train loss and its rank verdict differs); ``nxt_ratio`` is
    that train-loss ratio (needs the ``train_over_lin`` column of :func:`lam_table`)."""
    from . import report

    lams = sorted(runs.lam.unique())
    ok = [v for v in lams if not runs[runs.lam == v].collapsed.any()] or lams
    fit = [v for v in ok if not runs[runs.lam == v].underfit.any()] or ok[:1]
    lo, hi, top = lams[0], fit[-1], ok[-1]
    mean = {v: arm(runs, v, "test_loss").mean() for v in ok}
    gmean = {v: arm(runs, v, gap_key).mean() for v in fit}
    best, small_gap = min(mean, key=mean.get), min(gmean, key=gmean.get)
    above = [v for v in ok if v > hi and v not in fit]
    nxt = above[0] if above else None
    P = report.paired
    rank = P(arm(runs, hi, "sr"), arm(runs, lo, "sr"))
    rank_v = low_rank(rank, arm(runs, hi, "sr"), arm(runs, lo, "sr")) if hi != lo else (
        "not resolved")
    free = P(arm(runs, lo, "sr"), arm(runs, lo, "sr0"))
    fv = low_rank(free, arm(runs, lo, "sr"), arm(runs, lo, "sr0"))
    free_v = {"reproduced": "refuted", "not reproduced": "reproduced",
              "refuted": "reproduced"}.get(fv, "not resolved")
    out = dict(lams=lams, ok=ok, fit=fit, lo=lo, hi=hi, top=top, best=best,
               small_gap=small_gap, nxt=nxt, coll=[v for v in lams if v not in ok],
               under=[v for v in ok if v not in fit], rank=rank, rank_v=rank_v, free=free,
               free_v=free_v,
               rank_best=P(arm(runs, best, "sr"), arm(runs, best, "sr0")),
               dW_free=P(arm(runs, lo, "srank_dW"), arm(runs, lo, "srank_W0")),
               dW_fit=P(arm(runs, hi, "srank_dW"), arm(runs, lo, "srank_dW")),
               gap=P(arm(runs, hi, gap_key), arm(runs, lo, gap_key)),
               gap_top=P(arm(runs, top, gap_key), arm(runs, lo, gap_key)),
               test_gap=P(arm(runs, small_gap, "test_loss"), arm(runs, best, "test_loss")),
               rho=report.spearman(runs[runs.lam.isin(ok)].lam, runs[runs.lam.isin(ok)].sr),
               rank_nxt=None, rank_nxt_v=None, nxt_ratio=math.nan, close=False)
    if nxt is not None:
        a, b = arm(runs, nxt, "sr"), arm(runs, lo, "sr")
        out.update(rank_nxt=P(a, b), rank_nxt_v=low_rank(P(a, b), a, b))
        if "train_over_lin" in runs:
            out["nxt_ratio"] = float(arm(runs, nxt, "train_over_lin").max())
            out["close"] = bool(out["nxt_ratio"] <= 1 + fit_margin
                                and out["rank_nxt_v"] != rank_v)
    return out


def batch_pairs(bs, key: str = "stable_rank") -> dict:
    """Paired comparisons (by seed) of ``key`` at the smallest against the largest batch size of
    a :func:`batch_sweep` table, at fixed epochs and at fixed steps, with the reference value
    (mean at the largest ``B``) for :func:`weak_dependence`."""
    from . import report

    Bs = sorted(bs.B.unique())
    out = {}
    for when in ("epochs", "steps"):
        b = bs[bs.when == when]
        a = b[b.B == Bs[0]].sort_values("seed")[key].to_numpy(float)
        c = b[b.B == Bs[-1]].sort_values("seed")[key].to_numpy(float)
        out[when] = report.paired(a, c)
        out[f"{when}_ref"] = float(c.mean())
    out["Bs"] = Bs
    return out


def split_sweep(
    name: str,
    splits: Sequence[int],
    lams: Sequence[float],
    seeds: Sequence[int],
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    desc: str = "splits",
    **train_kw,
) -> list[dict]:
    """Final train/test loss (and accuracy) and the final ``stable_rank``, ``fro``, ``spec`` of
    ``V`` of networks trained at ``lams`` x ``seeds`` on each
    data split ``splits`` (the seed of :func:`load_xy`'s train/test split), with the linear
    baseline of the same split: one row per (split, lambda, seed), keys ``split``, ``lam``,
    ``seed``, ``train_loss``, ``test_loss`` (``train_acc``, ``test_acc``), ``stable_rank``,
    ``lin_train_loss``,
    ``lin_test_loss`` (``lin_test_acc``). ``train_kw`` go to :func:`train`."""
    rows = []
    for sp in splits:
        ds, x, y, xt, yt = load_xy(name, n_train, n_test, seed=sp)
        cls = ds.task == "classification"
        lin = linear_baseline(x, y, xt, yt, cls)
        ls, ss = grid(lams, seeds)
        res = train(
            x,
            y,
            lams=ls,
            seeds=ss,
            x_test=xt,
            y_test=yt,
            classification=cls,
            desc=f"{desc}, split {sp}",
            **train_kw,
        )
        for row in res.table():
            row.update(split=int(sp), **{f"lin_{k}": v for k, v in lin.items()})
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Cost of a training before its first step (sgdrank.cost.Work), and Chapter 5's plan
# --------------------------------------------------------------------------------------------
#: train / test sizes when ``n_train`` (``n_test``) is None: the datasets' seeded 80/20 splits
#: (``sgdrank.data``), or their own train / test sets
SIZES = {"diabetes": (354, 88), "digits": (1438, 359), "california": (16512, 4128),
         "mnist": (60000, 10000), "fashion-mnist": (60000, 10000),
         "synthetic-regression": (1000, 1000)}
#: kernels one SGD step of :func:`train` launches (gathers, 5 products, the ReLU pattern, the
#: loss and 8 in-place updates), whatever ``K`` is: the reference model's launch floor
KERNELS = 25


def shapes(name: str, n_train: int | None = None, n_test: int | None = None):
    """``(N, N_test, n, k)`` of dataset ``name`` as :func:`load_xy` would give it, without
    loading it (``k``: outputs, the number of classes or 1)."""
    from . import data

    info = data.DATASETS[name]
    full = SIZES.get(name, (n_train or 0, n_test or 0))
    N = full[0] if n_train is None else int(n_train)
    Nt = full[1] if n_test is None else int(n_test)
    return N, Nt, math.prod(info.input_shape), int(info.n_classes or 1)


def work(label: str, *, N: int, n: int, k: int, width: int, runs: int, batch_size: int,
         epochs: int, n_test: int = 0, record_every: int = 10, record_steps: Sequence[int] = (),
         svd_dtype: str = "float64", analysis: bool = False, seeds: int = 1,
         n_random: int = 1000, chunk: int | None = None, device=None, **_ignored):
    """A :class:`sgdrank.cost.Work` describing ``train(x (N, n), y (N, k), width=width,
    lams=[...] * runs, batch_size=..., epochs=..., record_every=..., record_steps=...)`` (all
    ``runs`` trained together, one call), and, with ``analysis``, the :func:`lam_table` of its
    result (``seeds`` distinct initialisations, ``n_random`` random batches).

    - step FLOPs: the five batched products of :func:`loss_grads` per run (``4 B n m + 6 B m
      k``) and the update (``4 m n``), times ``runs``;
    - evaluation FLOPs: a forward pass over the ``N + n_test`` samples (``2 m (n + k)`` each)
      at every record (epoch 0, every ``record_every``, the last, ``record_steps``);
    - SVDs: one ``m x n`` per run and record in ``svd_dtype`` (the final spectra are the last
      record's); the analysis adds float64 SVDs: per run two in :func:`decompose`, one in
      :func:`grad_stats` unless the records are float64; one per initialisation;
    - ``fp64_flops`` (analysis): the Gram matrix of :func:`grad_stats` (``2 N^2 m`` and
      ``6 N n m`` per run) and the truncation's ``V^T V`` and eigenvectors, in float64;
    - device bytes: data, weights, their gradients and, in the last epoch, the two
      temporaries of the full-gradient norm ``||dV + 2 lambda V||`` (four ``(K, m, n)``
      blocks), plus the largest chunk: a batch's activations, an
      evaluation chunk (:func:`chunk_sizes`), an SVD chunk (:func:`spectra`) or the analysis
      (one run in float64, the ``N x N`` Gram and a chunk of factors);
    - host bytes: what the :class:`Result` keeps (spectra, history, last epoch's norms);
    - probe: ``n`` timed SGD steps of ``runs`` networks of this size on ``device`` (default:
      ``$SGDRANK_DEVICE``, else the CPU)."""
    from . import cost

    budget = CHUNK if chunk is None else int(chunk)
    m, K, B = int(width), int(runs), int(batch_size)
    S = N // B
    recs = {0, epochs} | {e for e in range(record_every, epochs + 1, record_every)}
    rec_steps = {e * S for e in recs} | {int(s) for s in record_steps if s <= epochs * S}
    n_rec = len(rec_steps)
    step_flops = K * (4.0 * B * n * m + 6.0 * B * m * k + 4.0 * m * n)
    eval_flops = n_rec * K * (N + n_test) * 2.0 * m * (n + k)
    svds = {(m, n, svd_dtype): K * n_rec}  # the final spectra are the last record's
    fp64 = 0.0
    if analysis:  # grad_stats (unless the final spectra are float64), decompose's W and
        # DeltaV, V_0 once per seed; the truncation's V^T V and its eigenvectors (top_right)
        per_run = 2 + (svd_dtype != "float64")
        svds[(m, n, "float64")] = svds.get((m, n, "float64"), 0) + per_run * K + int(seeds)
        fp64 = K * (2.0 * N * N * m + 6.0 * N * n * m + 2.0 * N * N * n + 2.0 * m * n * n
                    + 10.0 * n**3)
        eval_flops += K * n_random * B * B  # batch norms from the Gram matrix
    el = 4
    mn = m * n + m * k + m
    data_b = el * (N + n_test) * (n + k)
    params_b = el * K * mn * 4
    batch_b = el * K * B * (n + 3 * m)
    kc, nc = chunk_sizes(K, max(N, n_test), m, budget)
    eval_b = el * kc * nc * m * 2
    per = m * n * (2 if svd_dtype == "float64" else 1)
    svd_b = min(K, max(1, budget // per)) * m * n * (el + 2 * 8)  # where-copy, float64, LAPACK
    ana_b = (3 * 8 * m * n + 3 * 8 * N * N + 3 * 8 * min(budget // 2, N * m)) if analysis else 0
    dev_b = data_b + params_b + max(batch_b, eval_b, svd_b, ana_b)
    host_b = 8.0 * K * (min(m, n) + n_rec * 8 + S * (1 + B))

    def probe(steps: int) -> float:
        return _probe_steps(K, N, n, k, m, B, steps, device)

    return cost.Work(label, K, K, epochs * S, step_flops, B, eval_flops, svds, float(dev_b),
                     float(host_b), probe, KERNELS, fp64_flops=fp64)


def _probe_steps(K, N, n, k, m, B, steps, device=None) -> float:
    """Seconds per SGD step of ``K`` networks ``n -> m -> k`` at batch size ``B`` on ``device``
    (random data and weights of the right shapes; the faster of two repetitions after a
    warm-up step)."""
    dev = torch.device(device) if device is not None else torch.device(
        __import__("os").environ.get("SGDRANK_DEVICE") or "cpu")
    g = torch.Generator().manual_seed(0)
    Np = min(N, B * (steps + 1))
    x = torch.randn(Np, n, generator=g).to(dev)
    y = torch.randn(Np, k, generator=g).to(dev)
    p = Params(torch.randn(K, k, m, generator=g).to(dev) / math.sqrt(m),
               (torch.randn(K, n, m, generator=g) / math.sqrt(n)).to(dev).mT,
               torch.zeros(K, m, device=dev))
    mu = torch.full((K,), 1e-6, device=dev)
    shrink, mu3 = (1 - 2 * mu * 0.1).view(K, 1, 1), mu.view(K, 1, 1)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(n_steps):
        for _ in range(n_steps):
            idx = torch.randint(0, Np, (K, B), generator=g).to(dev)
            _, (dU, dV, db) = loss_grads(p, x[idx], y[idx])
            _update(p, dU, dV, db, shrink, mu3, mu.view(K, 1))

    run(1)
    best = math.inf
    for _ in range(2):
        sync()
        t = time.perf_counter()
        run(steps)
        sync()
        best = min(best, (time.perf_counter() - t) / max(1, steps))
    return best


def sweep_kw(P, tag: str) -> dict:
    """The :func:`train` settings of sweep ``tag`` (``"e11"``, ``"e12"``) from Chapter 5's
    settings ``P``: the one source of the chapter's training cells and of :func:`plan`."""
    return dict(width=P[f"{tag}_width"], lr=P[f"{tag}_lr"], batch_size=P[f"{tag}_B"],
                epochs=P[f"{tag}_epochs"], lr_every=P[f"{tag}_lr_every"],
                record_every=P[f"{tag}_record"], svd_dtype=P.get(f"{tag}_svd", "float64"))


def batch_epochs(N: int, B: int, epochs: int, steps: int) -> int:
    """Epochs of batch size ``B`` in :func:`batch_sweep`: ``max(epochs, ceil(steps / (N//B)))``."""
    return max(epochs, -(-steps // (N // B)))


def plan(P) -> dict:
    """Every training of Chapter 5 at settings ``P``, as :class:`sgdrank.cost.Work`: per
    sweep ``tag`` in E11, E12 the lambda x seed sweep with its analysis (one call), the batch
    sweep (one call per batch size, the seeds together) and the extra data splits (one call per
    split: lambda = 0 and the best lambda, the seeds together)."""
    out = {}
    seeds = len(P.seeds)
    for tag in ("e11", "e12"):
        N, Nt, n, k = shapes(P[f"{tag}_data"], P[f"{tag}_n_train"], P[f"{tag}_n_test"])
        kw = sweep_kw(P, tag)
        base = dict(N=N, n=n, k=k, n_test=Nt, width=kw["width"], svd_dtype=kw["svd_dtype"])
        T = tag.upper()
        out[f"{T} lambda sweep"] = [work(
            f"{T} lambda sweep", runs=len(P[f"{tag}_lams"]) * seeds, batch_size=kw["batch_size"],
            epochs=kw["epochs"], record_every=kw["record_every"], analysis=True, seeds=seeds,
            n_random=P.n_random, **base)]
        bs = []
        for B in P[f"{tag}_Bs"]:
            ep, st = P[f"{tag}_B_epochs"], P[f"{tag}_B_steps"]
            bs.append(work(f"{T} batch sweep, B = {B}", runs=seeds, batch_size=B,
                           epochs=batch_epochs(N, B, ep, st), record_every=ep,
                           record_steps=[st], **base))
        out[f"{T} batch sweep"] = bs
        out[f"{T} splits"] = [work(
            f"{T} split {sp}", runs=2 * seeds, batch_size=kw["batch_size"], epochs=kw["epochs"],
            record_every=kw["record_every"], **base) for sp in P.splits[1:]]
    return out
