"""Overparameterised linear regression with weight decay: closed forms and a batched SGD/GD
simulator (Chapter 2, JANUS Theorem 1).

Conventions (the book's; see CONTRIBUTING.md and :mod:`sgdrank.conventions`)
-----------------------------------------------------------------------------
- Data ``X`` of shape ``(d, N)`` (column ``x_i`` is sample ``i``), targets ``Y`` of shape
  ``(m, N)``, weights ``W`` of shape ``(m, d)``; the model is ``x -> W x``.
- Loss ``L(W) = (1/N) sum_i ||W x_i - y_i||^2 + lam ||W||_F^2`` (mean over samples, no 1/2).
  A batch ``b`` (a multiset of sample indices) has ``L_b(W) = (1/|b|) sum_{i in b} ||W x_i - y_i||^2
  + lam ||W||_F^2``.
- One step with learning rate ``eta`` on batch ``b``::

      W <- W - eta grad L_b(W) = (1 - 2 eta lam) W - (2 eta / |b|) sum_{i in b} (W x_i - y_i) x_i^T.

  GD is the batch ``b = {1..N}``. The data term's gradient ``(W x_i - y_i) x_i^T`` has its rows in
  ``span(X)``, so the component of ``W`` in the null space of the data is multiplied by exactly
  ``1 - 2 eta lam`` per step (:func:`null_decay`), whatever the batch.
- ``MSE`` is the data term ``(1/N) sum_i ||W x_i - y_i||^2`` (squared Euclidean norm over the ``m``
  outputs, mean over samples).
- The ridge solution ``W_lam = Y X^T (X X^T + N lam I)^{-1} = Y (X^T X + N lam I)^{-1} X^T`` is the
  unique minimiser of ``L``; its rows lie in ``span(X)``.

The simulator (:func:`simulate`) advances ``R`` runs at once -- methods x inits x seeds x settings
--
as one ``(R, m, d)`` array in float64. Each step is the affine map ``W <- W M_t + C_t`` with
``M_t = (1 - 2 eta lam) I - (2 eta/|b|) X_b X_b^T`` and ``C_t = (2 eta/|b|) Y_b X_b^T``; the maps of
a block of steps are built with vectorised array operations and the loop over steps is one
batched matrix product per step. NumPy is used (not torch): for these tiny matrices the loop is
dominated by per-call overhead, which is several times lower in NumPy. Batch orders come from one
``numpy.random.Generator`` per run (``default_rng(run.seed)``), drawn in fixed blocks of epochs, so
a run's trajectory does not depend on which other runs it is batched with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import conventions

SCHEMES = ("gd", "cyclic", "reshuffle", "replacement")
_SCHEDULE_BLOCK = (
    64  # epochs of batch orders drawn per call to a run's generator (fixed: reproducibility)
)


# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------
def mse(W: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``(1/N) sum_i ||W x_i - y_i||^2`` for ``W`` of shape ``(..., m, d)``; returns shape
    ``(...)``."""
    R = np.matmul(W, X) - Y
    return (R**2).sum(axis=(-2, -1)) / X.shape[1]


def loss(W: np.ndarray, X: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    """The book's regularised loss ``mse + lam ||W||_F^2`` (batched over leading dims of ``W``)."""
    return mse(W, X, Y) + lam * (W**2).sum(axis=(-2, -1))


def gradient(
    W: np.ndarray, X: np.ndarray, Y: np.ndarray, lam: float, batch: Sequence[int] | None = None
) -> np.ndarray:
    """``grad L_b(W) = (2/|b|) sum_{i in b} (W x_i - y_i) x_i^T + 2 lam W`` (``batch=None``: all
    samples)."""
    if batch is not None:
        idx = np.asarray(batch)
        X, Y = X[:, idx], Y[:, idx]
    return 2.0 / X.shape[1] * (W @ X - Y) @ X.T + 2.0 * lam * W


def ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    """The minimiser ``W_lam = Y (X^T X + N lam I)^{-1} X^T`` of the book's loss (``lam > 0``)."""
    N = X.shape[1]
    if lam <= 0:
        return Y @ np.linalg.pinv(X)  # minimum-norm interpolant, the lam -> 0 limit
    return np.linalg.solve(X.T @ X + N * lam * np.eye(N), Y.T).T @ X.T


def span_bases(X: np.ndarray, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases ``(Q, Q_perp)`` of ``span(X)`` (``d x r``) and of its orthogonal
    complement,
    the null space of ``X^T`` (``d x (d - r)``); ``r`` counts singular values above ``rtol *
    s_1``."""
    U, s, _ = np.linalg.svd(X, full_matrices=True)
    r = int((s > rtol * s[0]).sum()) if s.size and s[0] > 0 else 0
    return U[:, :r], U[:, r:]


def split(W: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W_par, W_perp) = (W Pi, W (I - Pi))`` with ``Pi`` the orthogonal projector onto
    ``span(X)``."""
    Q, Qp = span_bases(X)
    return W @ Q @ Q.T, W @ Qp @ Qp.T


def null_norm(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``||W (I - Pi)||_F = ||W Q_perp||_F`` (batched over leading dims of ``W``)."""
    _, Qp = span_bases(X)
    return np.sqrt(((W @ Qp) ** 2).sum(axis=(-2, -1)))


def null_decay(lrs: Sequence[float] | np.ndarray, lam: float) -> float:
    """``prod_t (1 - 2 eta_t lam)``: the exact factor by which ``||W_perp||`` shrinks over steps
    with learning rates ``lrs`` (one entry per step, whatever the batch)."""
    f = 1.0
    for eta in np.asarray(lrs, dtype=float).ravel():
        f *= conventions.decay_factor(float(eta), lam)
    return f


def steps_per_epoch(
    N: int, B: int | None, scheme: str = "reshuffle", drop_last: bool = False
) -> int:
    """Steps in one epoch: 1 for GD (``scheme="gd"`` or ``B >= N``), otherwise ``ceil(N/B)``
    (the last batch has ``N mod B`` samples) or ``floor(N/B)`` with ``drop_last``. For sampling
    with replacement an "epoch" is, by the same convention, ``ceil(N/B)`` (or ``floor``) batches."""
    _check_scheme(scheme)
    if scheme == "gd" or B is None or B >= N:
        return 1
    return N // B if drop_last else -(-N // B)


def epoch_log_slope(
    lr: float, lam: float, N: int, B: int | None, scheme: str = "reshuffle", drop_last: bool = False
) -> float:
    """Predicted slope of ``log ||W_perp||`` per epoch at constant ``lr``: ``S log(1 - 2 lr
    lam)``."""
    return steps_per_epoch(N, B, scheme, drop_last) * math.log(conventions.decay_factor(lr, lam))


def data_moments(X: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of ``X X^T / N``, the data part of the Hessian of ``L`` divided by
    2."""
    return np.sort(np.linalg.eigvalsh(X @ X.T / X.shape[1]))[::-1]


def hessian_max(X: np.ndarray, lam: float) -> float:
    """Largest eigenvalue of the Hessian of ``L`` (acting on each row of ``W``): ``2 (mu_max +
    lam)``."""
    return 2.0 * (data_moments(X)[0] + lam)


def janus_gd_lr(X: np.ndarray, lam: float, c: float = 0.5) -> float:
    """JANUS sec. 3.3 "eta = 0.5 max(svd)", read as ``c / lambda_max(Hessian of L)`` (a quarter of
    GD's stability limit). The paper does not say which matrix's singular value it means."""
    return c / hessian_max(X, lam)


def gd_max_lr(X: np.ndarray, lam: float) -> float:
    """GD is stable iff ``eta < 1 / (mu_max + lam)`` (every factor ``1 - 2 eta (mu + lam)`` in (-1,
    1))."""
    return 1.0 / (data_moments(X)[0] + lam)


def epoch_map(
    X: np.ndarray, lam: float, lr: float, B: int = 1, order: Sequence[int] | None = None
) -> np.ndarray:
    """The linear part ``M_1 M_2 ... M_S`` of one cyclic epoch (``W <- W M + C``), ``d x d``."""
    d, N = X.shape
    order = np.arange(N) if order is None else np.asarray(order)
    M = np.eye(d)
    for s in range(0, N, B):
        xb = X[:, order[s : s + B]]
        M = M @ ((1 - 2 * lr * lam) * np.eye(d) - 2 * lr / xb.shape[1] * xb @ xb.T)
    return M


def cyclic_sgd_max_lr(
    X: np.ndarray, lam: float, B: int = 1, order: Sequence[int] | None = None, tol: float = 1e-6
) -> float:
    """Largest ``eta`` below which cyclic SGD is stable: spectral radius of :func:`epoch_map` < 1
    (found by a scan from small ``eta`` up, then bisection)."""
    rho = lambda eta: np.abs(np.linalg.eigvals(epoch_map(X, lam, eta, B, order))).max()
    hi = gd_max_lr(X, lam)
    lo = 0.0
    eta = hi / 1024
    while eta < 64 * hi:  # scan geometrically for the first unstable value
        if rho(eta) >= 1.0:
            break
        lo, eta = eta, eta * 1.25
    hi = eta
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rho(mid) < 1.0 else (lo, mid)
    return lo


def lr_schedule(kind: str, lr0: float, epochs: int) -> np.ndarray:
    """Per-epoch learning rates: ``"constant"`` or ``"inv_sqrt"`` (``lr0 / sqrt(e + 1)``, epoch
    ``e = 0, 1, ...``; JANUS sec. 3.3's SGD schedule "decays as 1/sqrt(t), t in epochs")."""
    e = np.arange(epochs, dtype=float)
    if kind == "constant":
        return np.full(epochs, float(lr0))
    if kind == "inv_sqrt":
        return lr0 / np.sqrt(e + 1.0)
    raise ValueError(f"unknown learning-rate schedule {kind!r}: use 'constant' or 'inv_sqrt'")


def flow_time_ratio(N: int, B: int, epochs: int) -> float:
    """``tau_SGD / tau_GD`` after ``epochs`` epochs, ``tau = sum_t eta_t``, when GD runs at
    ``eta_0``
    and SGD (``ceil(N/B)`` steps per epoch) at ``eta_0 / sqrt(e + 1)``: ``S * sum_{e<E}
    (e+1)^{-1/2} / E``.
    To first order in ``eta lam`` this is also the ratio of ``log ||W_perp||`` after ``epochs``."""
    S = steps_per_epoch(N, B)
    return S * float(np.sum(1.0 / np.sqrt(np.arange(1, epochs + 1)))) / epochs


def online_stationary_msd(
    lr: float, lam: float, d: int, teacher_fro2: float, noise: float = 0.0, m: int = 1
) -> float:
    """Stationary ``E ||W_t - W_lam||_F^2`` of online SGD (``B = 1``, a fresh sample each step) with
    ``x ~ N(0, I_d)``, ``y = W_* x + noise * eps`` (``eps ~ N(0, I_m)``), ``||W_*||_F^2 =
    teacher_fro2``.

    Here ``W_lam = W_* / (1 + lam)`` minimises the population loss ``E||W x - y||^2 + lam ||W||^2``,
    and the per-sample gradient at ``W_lam`` has zero mean and trace-covariance
    ``G = 4 lam^2 (d + 1) teacher_fro2 / (1 + lam)^2 + 4 noise^2 d m``. The second moment of the
    linear recursion closes on its trace (Gaussian fourth moments
    ``E[x x^T S x x^T] = tr(S) I + 2 S``), which gives exactly
    ``eta G / (4 [(1 + lam) - eta (d + 2 + 2 lam + lam^2)])`` (stable iff the bracket is > 0).
    """
    G = 4 * lam**2 * (d + 1) * teacher_fro2 / (1 + lam) ** 2 + 4 * noise**2 * d * m
    den = 4 * ((1 + lam) - lr * (d + 2 + 2 * lam + lam**2))
    if den <= 0:
        return math.inf
    return lr * G / den


def limit_cycle_rms_coef(
    X: np.ndarray, Y: np.ndarray, lam: float, B: int = 1, order: Sequence[int] | None = None
) -> float:
    """First-order size of cyclic SGD's limit cycle: ``sqrt(mean_k ||W_k - mean W||_F^2) = eta * c
    + O(eta^2)``.

    With ``g_j`` the batch gradients at the ridge solution (they sum to zero),
    ``W_k = W_lam + eta (D - S_k) + O(eta^2)`` with ``S_k = sum_{j<k} g_j``, so
    ``c = sqrt(mean_k ||S_k - mean_k S_k||_F^2)``. Returns ``c``.
    """
    d, N = X.shape
    order = np.arange(N) if order is None else np.asarray(order)
    Wl = ridge(X, Y, lam)
    gs = [gradient(Wl, X, Y, lam, order[s : s + B]) for s in range(0, N, B)]
    S = np.cumsum([np.zeros_like(Wl)] + gs[:-1], axis=0)
    S = S - S.mean(axis=0)
    return float(np.sqrt((S**2).sum(axis=(1, 2)).mean()))


def fit_log_slope(
    t: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Least-squares fit ``log v ~ a + s t`` over ``mask``; returns ``(s, a, R^2)``."""
    t = np.asarray(t, dtype=float)
    y = np.log(np.asarray(v, dtype=float))
    if mask is not None:
        t, y = t[mask], y[mask]
    if t.size < 2:
        raise ValueError("need at least two points in the fit window")
    A = np.stack([np.ones_like(t), t], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    res = y - A @ coef
    ss = ((y - y.mean()) ** 2).sum()
    return float(coef[1]), float(coef[0]), float(1 - (res**2).sum() / ss) if ss > 0 else 1.0


# --------------------------------------------------------------------------------------------
# Synthetic problems
# --------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """A regression data set: ``X`` ``(d, N)``, ``Y`` ``(m, N)`` and the teacher ``W_*`` (``Y = W_*
    X``
    plus noise and replaced rows, see :func:`make_problem`)."""

    X: np.ndarray
    Y: np.ndarray
    teacher: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(m, d, N)``."""
        return self.Y.shape[0], self.X.shape[0], self.X.shape[1]

    def ridge(self, lam: float) -> np.ndarray:
        return ridge(self.X, self.Y, lam)


def make_problem(
    d: int,
    N: int,
    m: int,
    *,
    seed: int,
    support: Sequence[int] | None = None,
    relevant: Sequence[int] | None = None,
    noise: float = 0.0,
    whiten: bool = False,
    zero_rows: Sequence[int] = (),
    independent_rows: Sequence[int] = (),
) -> Problem:
    """A synthetic problem, ``x_i ~ N(0, I)`` on the coordinates ``support`` (all if ``None``; the
    other coordinates of every ``x_i`` are exactly 0: "sparse features"), teacher ``W_*`` with
    ``N(0, 1/|relevant|)`` entries on the columns ``relevant`` (all if ``None``) and 0 elsewhere,
    ``y_i = W_* x_i + noise * eps_i``.

    ``whiten=True`` rescales the supported block so that ``X X^T / N`` is the identity on it
    (needs ``N >= |support|``). Target rows in ``zero_rows`` are set to 0; rows in
    ``independent_rows`` are replaced by ``N(0, 1)`` draws independent of ``X``.
    """
    rng = np.random.default_rng(seed)
    sup = np.arange(d) if support is None else np.asarray(support)
    rel = np.arange(d) if relevant is None else np.asarray(relevant)
    X = np.zeros((d, N))
    X[sup] = rng.standard_normal((len(sup), N))
    if whiten:
        if N < len(sup):
            raise ValueError(f"whiten needs N >= |support| ({N} < {len(sup)})")
        C = X[sup] @ X[sup].T / N
        evals, evecs = np.linalg.eigh(C)
        X[sup] = evecs @ np.diag(evals**-0.5) @ evecs.T @ X[sup]
    T = np.zeros((m, d))
    T[:, rel] = rng.standard_normal((m, len(rel))) / math.sqrt(len(rel))
    Y = T @ X + noise * rng.standard_normal((m, N))
    for r in zero_rows:
        Y[r] = 0.0
    for r in independent_rows:
        Y[r] = rng.standard_normal(N)
    info = dict(
        d=d,
        N=N,
        m=m,
        seed=seed,
        support=sup.tolist(),
        relevant=rel.tolist(),
        noise=noise,
        whiten=whiten,
        zero_rows=list(zero_rows),
        independent_rows=list(independent_rows),
    )
    return Problem(X, Y, T, info)


def random_init(m: int, d: int, scale: float, seed: int) -> np.ndarray:
    """``W_0`` with i.i.d. ``N(0, scale^2)`` entries (``scale = 0``: the zero matrix)."""
    return scale * np.random.default_rng(seed).standard_normal((m, d))


# --------------------------------------------------------------------------------------------
# The batched simulator
# --------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run: which data set, from which ``W0``, how batches are drawn, at which rates.

    ``scheme``: ``"gd"`` (one full batch per epoch), ``"cyclic"`` (the fixed ``order`` -- default
    ``0..N-1`` -- cut into consecutive batches, every epoch: JANUS's deterministic SGD),
    ``"reshuffle"`` (a fresh random permutation per epoch: without replacement) or
    ``"replacement"`` (every batch ``B`` i.i.d. uniform indices). ``lr``: a float, or one learning
    rate per epoch (array or callable ``epoch -> lr``). ``labels`` are free-form metadata.
    """

    data: int
    W0: np.ndarray
    lam: float
    lr: float | Sequence[float] | Callable[[int], float]
    scheme: str = "reshuffle"
    B: int | None = 1
    seed: int = 0
    drop_last: bool = False
    order: Sequence[int] | None = None
    labels: dict = field(default_factory=dict)


def check_stable(problems: Sequence[Problem], runs: Sequence[Run], epochs: int) -> None:
    """Refuse runs that can only diverge, before simulating them: a ``ValueError`` when some
    rate makes the decay factor ``1 - 2 eta lam`` larger than 1 in absolute value (every step
    then amplifies ``W``), or when a GD run's rate reaches GD's stability limit
    ``1 / (mu_max + lam)`` (:func:`gd_max_lr`). SGD above its own (smaller) limit is allowed:
    a decaying schedule can bring it back below (the paper's schedule does)."""
    limits: dict = {}
    for k, r in enumerate(runs):
        lr = _lr_array(r, epochs)
        eta = float(np.max(np.abs(lr))) if lr.size else 0.0
        if abs(1 - 2 * eta * r.lam) > 1 + 1e-12:
            raise ValueError(
                f"run {k}: eta = {eta:.4g}, lam = {r.lam:.4g} give a decay factor "
                f"1 - 2 eta lam = {1 - 2 * eta * r.lam:.4g} of absolute value > 1, so every "
                f"step amplifies W; choose eta * lam <= 1 (eta <= {1 / r.lam:.4g})")
        if r.scheme == "gd":
            if (r.data, r.lam) not in limits:
                limits[r.data, r.lam] = gd_max_lr(problems[r.data].X, r.lam)
            lim = limits[r.data, r.lam]
            if eta >= lim * (1 - 1e-12):
                raise ValueError(
                    f"run {k}: GD at eta = {eta:.4g} is at or above its stability limit "
                    f"1 / (mu_max + lam) = {lim:.4g} on this data set and diverges; choose "
                    f"eta < {lim:.4g} (e.g. linear.janus_gd_lr(X, lam), a quarter of it)")


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown batch scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")


def _lr_array(run: Run, epochs: int) -> np.ndarray:
    if callable(run.lr):
        return np.array([float(run.lr(e)) for e in range(epochs)])
    arr = np.asarray(run.lr, dtype=float)
    if arr.ndim == 0:
        return np.full(epochs, float(arr))
    if arr.shape != (epochs,):
        raise ValueError(f"a per-epoch lr array needs length {epochs}, got shape {arr.shape}")
    return arr


class _Schedule:
    """Draws one run's batches, ``_SCHEDULE_BLOCK`` epochs at a time, from its own generator."""

    def __init__(self, run: Run, N: int):
        _check_scheme(run.scheme)
        self.run, self.N = run, N
        self.gd = run.scheme == "gd" or run.B is None or run.B >= N
        self.B = N if self.gd else int(run.B)
        self.S = steps_per_epoch(N, self.B, "gd" if self.gd else run.scheme, run.drop_last)
        self.rng = np.random.default_rng(run.seed)
        self.order = np.arange(N) if run.order is None else np.asarray(run.order)
        if sorted(self.order.tolist()) != list(range(N)):
            raise ValueError("a cyclic order must be a permutation of 0..N-1")
        self._buf = None
        self._buf_start = 0

    def _block(self, n: int) -> np.ndarray:
        """Index array ``(n, S, B)`` for ``n`` epochs; ``-1`` pads a short last batch."""
        N, B, S = self.N, self.B, self.S
        if self.gd:
            return np.broadcast_to(np.arange(N), (n, 1, N)).copy()
        if self.run.scheme == "replacement":
            return self.rng.integers(0, N, size=(n, S, B))
        if self.run.scheme == "cyclic":
            perms = np.broadcast_to(self.order, (n, N))
        else:  # reshuffle
            perms = np.argsort(self.rng.random((n, N)), axis=1)
        pad = S * B - N
        if pad > 0:
            perms = np.concatenate([perms, np.full((n, pad), -1)], axis=1)
        return perms[:, : S * B].reshape(n, S, B)

    def epochs(self, start: int, n: int) -> np.ndarray:
        """Batches for epochs ``start .. start+n-1`` (must be requested in increasing order)."""
        out = []
        e = start
        while e < start + n:
            if self._buf is None or e >= self._buf_start + len(self._buf):
                self._buf_start = (e // _SCHEDULE_BLOCK) * _SCHEDULE_BLOCK
                self._buf = self._block(_SCHEDULE_BLOCK)
            k = e - self._buf_start
            take = min(len(self._buf) - k, start + n - e)
            out.append(self._buf[k : k + take])
            e += take
        return np.concatenate(out, axis=0)


@dataclass
class Trace:
    """What :func:`simulate` returns. Arrays are indexed ``[record, run, ...]``.

    - ``epochs``: the recorded epochs (``0`` = initialisation; ``e`` = after ``e`` epochs);
    - ``W``: ``(T, R, m, d)`` weights at those epochs;
    - ``gamma``: ``(T, R)`` the closed-form null-space factor ``prod_t (1 - 2 eta_t lam)``;
    - ``tau``: ``(T, R)`` gradient-flow time ``sum_t eta_t``; ``steps``: ``(T, R)`` steps taken;
    - ``window``: per-run step statistics (see :func:`simulate`), or ``None``;
    - ``step_W``: ``(steps, R, m, d)`` every iterate when ``keep_steps=True`` (else ``None``), with
      ``step_active`` ``(steps, R)`` marking real (not padding) steps.
    """

    epochs: np.ndarray
    W: np.ndarray
    gamma: np.ndarray
    tau: np.ndarray
    steps: np.ndarray
    runs: list
    problems: list
    window: dict | None = None
    step_W: np.ndarray | None = None
    step_active: np.ndarray | None = None
    seconds: float = 0.0

    # per-run data, computed once per problem (or per problem and lam) ----------------------
    def _by_problem(self, fn):
        cache: dict = {}
        out = []
        for r in self.runs:
            if r.data not in cache:
                cache[r.data] = fn(self.problems[r.data])
            out.append(cache[r.data])
        return out

    def _by_problem_and_lam(self, fn):
        cache: dict = {}
        out = []
        for r in self.runs:
            key = (r.data, float(r.lam))
            if key not in cache:
                cache[key] = fn(self.problems[r.data], r.lam)
            out.append(cache[key])
        return out

    def null_norm(self) -> np.ndarray:
        """Measured ``||W_perp||_F``, ``(T, R)``."""
        Qps = self._by_problem(lambda p: span_bases(p.X)[1])
        return np.stack(
            [np.sqrt(((self.W[:, i] @ Q) ** 2).sum(axis=(-2, -1))) for i, Q in enumerate(Qps)],
            axis=1,
        )

    def null_theory(self) -> np.ndarray:
        """Closed form ``||W0_perp||_F * gamma``, ``(T, R)``."""
        n0 = np.array([null_norm(r.W0, self.problems[r.data].X) for r in self.runs])
        return n0[None, :] * self.gamma

    def svals(self) -> np.ndarray:
        """Singular values of ``W``, descending, ``(T, R, min(m, d))``."""
        return np.linalg.svd(self.W, compute_uv=False)

    def mse(self) -> np.ndarray:
        """``(1/N) sum_i ||W x_i - y_i||^2``, ``(T, R)``."""
        return np.stack(
            [
                mse(self.W[:, i], self.problems[r.data].X, self.problems[r.data].Y)
                for i, r in enumerate(self.runs)
            ],
            axis=1,
        )

    def ridge(self) -> np.ndarray:
        """Each run's ridge solution, ``(R, m, d)``."""
        return np.stack(self._by_problem_and_lam(lambda p, lam: ridge(p.X, p.Y, lam)))

    def span_gap(self) -> np.ndarray:
        """``||W Pi - W_lam||_F``: distance of the data-span part to the ridge solution, ``(T,
        R)``."""
        Qs = self._by_problem(lambda p: span_bases(p.X)[0])
        Wl = self.ridge()
        return np.stack(
            [
                np.sqrt(((self.W[:, i] @ Q @ Q.T - Wl[i]) ** 2).sum(axis=(-2, -1)))
                for i, Q in enumerate(Qs)
            ],
            axis=1,
        )

    def labels(self, key: str) -> list:
        return [r.labels.get(key) for r in self.runs]

    def select(self, **labels) -> np.ndarray:
        """Indices of the runs whose ``labels`` match all of ``labels``."""
        return np.array(
            [
                i
                for i, r in enumerate(self.runs)
                if all(r.labels.get(k) == v for k, v in labels.items())
            ],
            dtype=int,
        )


def default_record(epochs: int, n: int = 400) -> np.ndarray:
    """Epochs to record: all of them if ``epochs <= n``, else ~``n`` epochs on a mixed linear/log
    grid."""
    if epochs <= n:
        return np.arange(epochs + 1)
    lin = np.linspace(0, epochs, n // 2).round()
    log = np.geomspace(1, epochs, n // 2).round()
    return np.unique(np.concatenate([[0], lin, log]).astype(int))


class _Stack:
    """The runs of one :func:`simulate` call, in internal order: samples of all problems stacked
    (row ``Nmax`` of each problem is an all-zero padding sample), the batch schedules, and the
    runs sorted so that runs with equal (steps per epoch, batch size) are contiguous groups."""

    def __init__(self, problems: Sequence[Problem], runs: list, epochs: int):
        shapes = {(p.Y.shape[0], p.X.shape[0]) for p in problems}
        if len(shapes) != 1:
            raise ValueError(
                f"all problems batched together must share (m, d); got {sorted(shapes)}"
            )
        ((self.m, self.d),) = shapes
        m, d = self.m, self.d
        R = len(runs)
        Ns = [p.X.shape[1] for p in problems]
        self.Nmax = Nmax = max(Ns)
        Xs = np.zeros((len(problems), Nmax + 1, d))
        Ys = np.zeros((len(problems), Nmax + 1, m))
        for k, p in enumerate(problems):
            Xs[k, : p.X.shape[1]] = p.X.T
            Ys[k, : p.X.shape[1]] = p.Y.T
        self.Xflat, self.Yflat = Xs.reshape(-1, d), Ys.reshape(-1, m)
        scheds = [_Schedule(r, Ns[r.data]) for r in runs]
        self.perm = perm = sorted(range(R), key=lambda r: (scheds[r].S, scheds[r].B))
        self.inv = np.argsort(perm)
        self.sch = [scheds[r] for r in perm]
        self.di = np.array([runs[r].data for r in perm])
        self.S = np.array([s.S for s in self.sch])
        self.Smax = int(self.S.max())
        self.groups = []  # (r0, r1, S_g, B_g)
        for r, sc in enumerate(self.sch):
            if self.groups and self.groups[-1][2:] == (sc.S, sc.B):
                self.groups[-1][1] = r + 1
            else:
                self.groups.append([r, r + 1, sc.S, sc.B])
        self.lrs = np.stack([_lr_array(runs[r], epochs) for r in perm], axis=1)  # (E, R)
        self.lam = np.array([float(runs[r].lam) for r in perm])
        self.W0 = np.stack([np.asarray(runs[r].W0, dtype=float).reshape(m, d) for r in perm])


class _Block:
    """Batch orders, rates and closed-form bookkeeping for the epochs ``e0 .. e0+ne-1``."""

    def __init__(self, st: _Stack, e0: int, ne: int, gamma, tau, nsteps, win, rec_set):
        Smax, R = st.Smax, len(st.S)
        self.T = T = ne * Smax
        self.active = np.broadcast_to(
            (np.arange(Smax)[:, None] < st.S[None, :])[None], (ne, Smax, R)
        ).reshape(T, R)
        self.lr_ep = st.lrs[e0 : e0 + ne]  # (ne, R)
        lr_step = np.where(self.active, np.repeat(self.lr_ep, Smax, axis=0), 0.0)  # (T, R)
        fac_step = 1.0 - 2.0 * lr_step * st.lam[None, :]
        self.gidx = []  # per group: (ne, S_g, G, B_g) rows of Xflat, and weights 1/|b|
        for r0, r1, Sg, Bg in st.groups:
            b = np.stack([st.sch[r].epochs(e0, ne) for r in range(r0, r1)], axis=2)
            real = b >= 0
            w = real / np.maximum(real.sum(axis=3, keepdims=True), 1)
            rows = np.where(real, b, st.Nmax) + (st.di[r0:r1] * (st.Nmax + 1))[None, None, :, None]
            self.gidx.append((rows, w))
        self.g = gamma[None, :] * np.cumprod(fac_step, axis=0)
        self.t = tau[None, :] + np.cumsum(lr_step, axis=0)
        self.n = nsteps[None, :] + np.cumsum(self.active, axis=0)
        if win is not None:
            self.on = self.active & (self.n >= win["from_step"])
            self.on_any = self.on.any(axis=1)
        self.ends = {t for t in range(Smax - 1, T, Smax) if e0 + (t + 1) // Smax in rec_set}


def _step_maps(st: _Stack, blk: _Block, s0: int, s1: int, M: np.ndarray, C: np.ndarray) -> None:
    """Fill ``M[j]``, ``C[j]`` (``j = 0..s1-s0-1``) with the affine maps ``W <- W M + C`` of the
    block's steps ``s0 .. s1-1``; idle steps keep the identity map."""
    m, d, Smax, lam = st.m, st.d, st.Smax, st.lam
    n = s1 - s0
    M[...] = np.eye(d)
    C[...] = 0.0
    for (r0, r1, Sg, Bg), (rows, w) in zip(st.groups, blk.gidx):
        if n % Smax == 0 and s0 % Smax == 0:  # whole epochs ea..ea+nE-1 of the block
            ea, nE = s0 // Smax, n // Smax
            Mv = M.reshape(nE, Smax, -1, d, d)[:, :Sg, r0:r1]
            Cv = C.reshape(nE, Smax, -1, m, d)[:, :Sg, r0:r1]
            rr, ww = rows[ea : ea + nE], w[ea : ea + nE]
            lr_g = blk.lr_ep[ea : ea + nE, None, r0:r1]  # (nE, 1, G)
        else:  # steps s0..s1-1 of the block's only epoch
            k1 = min(s1, Sg)
            if k1 <= s0:
                continue
            Mv, Cv = M[None, : k1 - s0, r0:r1], C[None, : k1 - s0, r0:r1]
            rr, ww = rows[:, s0:k1], w[:, s0:k1]
            lr_g = blk.lr_ep[:, None, r0:r1]
        Xb = np.take(st.Xflat, rr, axis=0)  # (nE, S, G, B, d)
        Yb = np.take(st.Yflat, rr, axis=0)  # (nE, S, G, B, m)
        Xw = Xb * ww[..., None]
        coef = (2.0 * lr_g)[..., None, None]
        np.matmul(Xw.swapaxes(-1, -2), Xb, out=Mv)  # X_b diag(w) X_b^T
        Mv *= -coef
        np.einsum("...ii->...i", Mv)[...] += 1.0 - coef[..., 0] * lam[r0:r1][None, None, :, None]
        np.matmul(Yb.swapaxes(-1, -2), Xw, out=Cv)
        Cv *= coef


def _new_window(window: dict | None, st: _Stack) -> dict | None:
    if window is None:
        return None
    R, m, d = len(st.S), st.m, st.d
    ref = np.asarray(window["reference"], dtype=float).reshape(R, m, d)[st.perm]
    return dict(
        from_step=int(window.get("from_step", 0)),
        reference=ref,
        n=np.zeros(R),
        sq_ref=np.zeros(R),
        sum=np.zeros((R, m, d)),
        sum_sq=np.zeros((R, m, d)),
    )


def _accumulate(win: dict, on: np.ndarray, W: np.ndarray) -> None:
    """Add the iterate ``W`` of the runs where ``on`` to the window statistics."""
    onf = on.astype(float)[:, None, None]
    win["n"] += on
    win["sq_ref"] += on * ((W - win["reference"]) ** 2).sum(axis=(1, 2))
    win["sum"] += onf * W
    win["sum_sq"] += onf * W**2


def _finish_window(win: dict | None, inv: np.ndarray) -> dict | None:
    if win is None:
        return None
    cnt = np.maximum(win["n"], 1)
    mean = win["sum"] / cnt[:, None, None]
    return dict(
        n=win["n"][inv],
        msd_ref=(win["sq_ref"] / cnt)[inv],
        msd_mean=(win["sum_sq"] / cnt[:, None, None] - mean**2).sum(axis=(1, 2))[inv],
        mean=mean[inv],
        from_step=win["from_step"],
    )


def _work_units(st: _Stack, epochs: int, max_block: int) -> tuple[int, list]:
    """Blocks of whole epochs (batch orders drawn per block) cut into sub-blocks of steps whose
    ``(steps, R, d, d)`` maps fit in ``max_block`` numbers. A sub-block is either whole epochs or
    a piece of a single epoch (when one epoch alone is too long). Returns the sub-block length
    in steps and the ``(first epoch, epochs, first step)`` units."""
    Smax = st.Smax
    per_step = len(st.S) * (st.d * st.d + st.m * st.d)
    step_block = max(1, max_block // per_step)
    if step_block >= Smax:
        step_block -= step_block % Smax
        ep_block = max(1, min(epochs, 8 * step_block // Smax))
    else:
        ep_block = 1
    work = [
        (e0, min(ep_block, epochs - e0), s0)
        for e0 in range(0, epochs, ep_block)
        for s0 in range(0, min(ep_block, epochs - e0) * Smax, step_block)
    ]
    return step_block, work


def simulate(
    problems: Sequence[Problem],
    runs: Sequence[Run],
    epochs: int,
    *,
    record: Sequence[int] | None = None,
    window: dict | None = None,
    keep_steps: bool = False,
    progress: bool = True,
    desc: str = "runs",
    max_block: int = 1_000_000,
) -> Trace:
    """Train every run in ``runs`` for ``epochs`` epochs, all at once.

    All problems must share ``m`` and ``d``; ``N`` may differ (samples are padded with zero columns,
    which contribute nothing). A run with fewer steps per epoch than the longest one idles (identity
    map) on the remaining steps, so that epochs stay aligned and are recorded together.

    ``record``: epochs at which ``W`` is stored (default :func:`default_record`).
    ``window``: ``{"from_step": k, "reference": (R, m, d) array}`` accumulates, over each run's own
    steps from its ``k``-th on (counting after the update), the count ``n``, ``sum ||W_t -
    ref||_F^2``
    (``sq_ref``; ``msd_ref`` is its mean) and ``msd_mean``, the mean of ``||W_t - mean_t
    W_t||_F^2``.
    ``keep_steps``: also return every iterate (small problems only).
    ``progress``: show a progress bar (:mod:`sgdrank.progress`).

    The parts: :class:`_Stack` (data and runs in internal order), :func:`_work_units` (blocks of
    steps), :class:`_Block` (batch orders and closed forms of a block of epochs),
    :func:`_step_maps` (the affine maps of the steps), the loop below (one batched matrix product
    per step), and the window statistics (:func:`_accumulate`).
    """
    import time

    from .progress import progress as _progress

    t0 = time.time()
    runs = list(runs)
    if not runs:
        raise ValueError("no runs to simulate")
    check_stable(problems, runs, epochs)
    st = _Stack(problems, runs, epochs)
    R, m, d = len(runs), st.m, st.d
    W = st.W0.copy()
    rec = np.asarray(
        default_record(epochs) if record is None else sorted(set(int(e) for e in record)), dtype=int
    )
    if rec.size and (rec.min() < 0 or rec.max() > epochs):
        raise ValueError(f"record epochs must lie in 0..{epochs}")
    rec_set = set(rec.tolist())
    snaps, g_rec, t_rec, s_rec = [], [], [], []
    gamma, tau, nsteps = np.ones(R), np.zeros(R), np.zeros(R, dtype=np.int64)

    def snapshot(g, ta, n):
        snaps.append(W.copy())
        g_rec.append(g.copy())
        t_rec.append(ta.copy())
        s_rec.append(n.copy())

    if 0 in rec_set:
        snapshot(gamma, tau, nsteps)
    win = _new_window(window, st)
    kept, kept_active = ([], []) if keep_steps else (None, None)
    step_block, work = _work_units(st, epochs, max_block)
    buf = min(step_block, epochs * st.Smax)
    M_buf, C_buf = np.empty((buf, R, d, d)), np.empty((buf, R, m, d))
    W_next = np.empty_like(W)
    for e0, ne, s0 in _progress(work, desc=desc) if progress else work:
        if s0 == 0:  # a new block of epochs
            blk = _Block(st, e0, ne, gamma, tau, nsteps, win, rec_set)
        s1 = min(blk.T, s0 + step_block)
        M, C = M_buf[: s1 - s0], C_buf[: s1 - s0]
        _step_maps(st, blk, s0, s1, M, C)
        for j in range(s1 - s0):
            np.matmul(W, M[j], out=W_next)
            W, W_next = W_next, W
            W += C[j]
            t = s0 + j
            if win is not None and blk.on_any[t]:
                _accumulate(win, blk.on[t], W)
            if keep_steps:
                kept.append(W.copy())
                kept_active.append(blk.active[t].copy())
            if t in blk.ends:
                snapshot(blk.g[t], blk.t[t], blk.n[t])
        if s1 == blk.T:  # the block of epochs is done
            gamma, tau, nsteps = blk.g[-1].copy(), blk.t[-1].copy(), blk.n[-1].copy()
    inv = st.inv
    return Trace(
        epochs=rec,
        W=np.stack(snaps)[:, inv],
        gamma=np.stack(g_rec)[:, inv],
        tau=np.stack(t_rec)[:, inv],
        steps=np.stack(s_rec)[:, inv],
        runs=runs,
        problems=list(problems),
        window=_finish_window(win, inv),
        step_W=np.stack(kept)[:, inv] if keep_steps else None,
        step_active=np.stack(kept_active)[:, inv] if keep_steps else None,
        seconds=time.time() - t0,
    )


def online_msd(
    problems: Sequence[Problem], runs: Sequence[Run], *, from_step: int, reference: np.ndarray
) -> np.ndarray:
    """One pass of SGD with ``B = 1`` in the data's order (``scheme="cyclic"``, constant rate) over
    each run's stream, for many runs at once; returns per run the mean of ``||W_t - ref||_F^2``
    over the iterates after steps ``from_step, from_step + 1, ..`` (``msd_ref`` of
    :func:`simulate` with the same ``window``, which it equals to rounding). Written for E3's
    long streams: one vectorised rank-one update per step instead of :func:`simulate`'s
    ``(R, d, d)`` maps, which for ``B = 1`` is several times faster."""
    runs = list(runs)
    for r in runs:
        if r.scheme != "cyclic" or r.B != 1 or r.order is not None:
            raise ValueError("online_msd runs one pass with scheme='cyclic', B=1, default order")
    Ns = {problems[r.data].X.shape[1] for r in runs}
    if len(Ns) != 1:
        raise ValueError(f"online_msd needs streams of one length, got {sorted(Ns)}")
    (N,) = Ns
    di = np.array([r.data for r in runs])
    X = np.stack([p.X.T for p in problems])  # (P, N, d)
    Y = np.stack([p.Y.T for p in problems])  # (P, N, m)
    lr = np.array([_lr_array(r, 1)[0] for r in runs])
    fac = (1.0 - 2.0 * lr * np.array([float(r.lam) for r in runs]))[:, None, None]
    two_lr = (2.0 * lr)[:, None]
    W = np.stack([np.asarray(r.W0, dtype=float) for r in runs])  # (R, m, d)
    ref = np.asarray(reference, dtype=float).reshape(W.shape)
    sq = np.zeros(len(runs))
    for t in range(N):
        x, y = X[di, t], Y[di, t]  # (R, d), (R, m)
        resid = np.einsum("rmd,rd->rm", W, x) - y
        W *= fac
        W -= (two_lr * resid)[:, :, None] * x[:, None, :]
        if t + 1 >= from_step:
            sq += ((W - ref) ** 2).sum(axis=(1, 2))
    return sq / max(N - max(from_step, 1) + 1, 1)


def run_one_by_one(
    problems: Sequence[Problem], runs: Sequence[Run], epochs: int, **kw
) -> list[Trace]:
    """Each run simulated alone (for tests: batching must not change any trajectory)."""
    return [simulate(problems, [r], epochs, progress=False, **kw) for r in runs]


def direct_sgd(
    problem: Problem,
    W0: np.ndarray,
    lam: float,
    lrs_per_step: Sequence[float],
    batches: Sequence[Sequence[int]],
) -> list[np.ndarray]:
    """Reference implementation, one plain step at a time: ``W <- W - eta grad L_b(W)`` for the
    given batches; returns every iterate (``W0`` first). Used by the tests."""
    W = np.array(W0, dtype=float)
    out = [W.copy()]
    for eta, b in zip(lrs_per_step, batches):
        W = W - eta * gradient(W, problem.X, problem.Y, lam, b)
        out.append(W.copy())
    return out


# --------------------------------------------------------------------------------------------
# Other conventions, other estimators, other optimisers
# --------------------------------------------------------------------------------------------
def torch_mse_settings(lr: float, lam: float, m: int) -> tuple[float, float]:
    """PyTorch settings that give the book's step (ch2.1) with ``nn.MSELoss()`` (mean over the
    ``|b| * m`` entries of the batch) and ``torch.optim.SGD(lr=..., weight_decay=...)``:
    ``(lr_torch, weight_decay) = (m * lr, 2 lam / m)``. (``conventions.torch_weight_decay``'s
    ``2 lam`` is for a loss that already sums over the outputs.)"""
    if m < 1 or lr <= 0 or lam < 0:
        raise ValueError(f"need m >= 1, lr > 0, lam >= 0 (got m={m}, lr={lr}, lam={lam})")
    return m * lr, 2.0 * lam / m


def best_subset(X: np.ndarray, Y: np.ndarray, k: int) -> tuple[tuple[int, ...], float]:
    """l0 search: the ``k`` coordinates whose least-squares fit of ``Y`` (``m x N``) from those
    rows of ``X`` (``d x N``) has the smallest residual; returns ``(support, residual_fro)``.
    Exhaustive over all ``C(d, k)`` subsets (small ``d`` only)."""
    from itertools import combinations

    d = X.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"need 1 <= k <= d = {d}, got k = {k}")
    if math.comb(d, k) > 200_000:
        raise ValueError(f"C({d}, {k}) subsets is too many for an exhaustive search")
    best, best_res = None, math.inf
    for S in combinations(range(d), k):
        A = X[list(S)]  # k x N
        coef, *_ = np.linalg.lstsq(A.T, Y.T, rcond=None)
        res = float(np.linalg.norm(coef.T @ A - Y))
        if res < best_res - 1e-12 * max(1.0, best_res if math.isfinite(best_res) else 1.0):
            best, best_res = S, res
    return best, best_res


def momentum_null_factor(lr: float, lam: float, beta: float, steps: int) -> np.ndarray:
    """Heavy-ball SGD (PyTorch form ``v <- beta v + g``, ``W <- W - lr v``, ``v_0 = 0``) on the
    book's loss: the null-space part obeys the data-free recursion
    ``P_{t+1} = (1 - 2 lr lam + beta) P_t - beta P_{t-1}``, ``P_1 = (1 - 2 lr lam) P_0``.
    Returns ``P_t / P_0`` for ``t = 0..steps``. Its slow root is ``~ 1 - 2 lr lam / (1 - beta)``."""
    if not 0 <= beta < 1:
        raise ValueError(f"momentum beta must lie in [0, 1), got {beta}")
    out = np.empty(steps + 1)
    out[0] = 1.0
    if steps:
        out[1] = 1.0 - 2 * lr * lam
    for t in range(1, steps):
        out[t + 1] = (1 - 2 * lr * lam + beta) * out[t] - beta * out[t - 1]
    return out


OPTIMIZERS = ("sgd", "momentum", "adamw", "adam_l2")


def optimizer_run(
    problem: Problem,
    W0: np.ndarray,
    lam: float,
    lr: float,
    kind: str,
    epochs: int,
    *,
    B: int | None = 1,
    beta: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> np.ndarray:
    """Train on the book's loss with one of :data:`OPTIMIZERS`, batches in the fixed order
    (``B=None``: GD); returns every iterate, shape ``(steps + 1, m, d)``.

    - ``"sgd"``: step (ch2.1). ``"momentum"``: heavy ball, ``v <- beta v + grad L_b``,
      ``W <- W - lr v`` (PyTorch's ``SGD(momentum=beta)``).
    - ``"adamw"``: decoupled decay, ``W <- (1 - 2 lr lam) W - lr mhat / (sqrt(vhat) + eps)`` with
      Adam's moments of the *data* gradient (PyTorch's ``AdamW(weight_decay=2 lam)``).
    - ``"adam_l2"``: Adam on the full gradient ``grad L_b`` including ``2 lam W``
      (PyTorch's ``Adam(weight_decay=2 lam)``).
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimiser {kind!r}: choose one of {', '.join(OPTIMIZERS)}")
    X, Y = problem.X, problem.Y
    N = X.shape[1]
    Bv = N if B is None or B >= N else int(B)
    batches = [np.arange(s, min(s + Bv, N)) for s in range(0, N, Bv)]
    W = np.array(W0, dtype=float)
    out = [W.copy()]
    mom, v2 = np.zeros_like(W), np.zeros_like(W)
    b1, b2 = betas
    t = 0
    for _ in range(epochs):
        for b in batches:
            t += 1
            g_data = 2.0 / len(b) * (W @ X[:, b] - Y[:, b]) @ X[:, b].T
            if kind == "sgd":
                W = W - lr * (g_data + 2 * lam * W)
            elif kind == "momentum":
                mom = beta * mom + g_data + 2 * lam * W
                W = W - lr * mom
            else:
                g = g_data if kind == "adamw" else g_data + 2 * lam * W
                mom = b1 * mom + (1 - b1) * g
                v2 = b2 * v2 + (1 - b2) * g * g
                upd = (mom / (1 - b1**t)) / (np.sqrt(v2 / (1 - b2**t)) + eps)
                W = (1 - 2 * lr * lam) * W - lr * upd if kind == "adamw" else W - lr * upd
            out.append(W.copy())
    return np.stack(out)


def rotate_problem(problem: Problem, seed: int) -> Problem:
    """The same problem in rotated input coordinates: ``X -> Q X``, ``W_* -> W_* Q^T`` with a
    random orthogonal ``Q`` (``Y`` unchanged). Rotation-equivariant methods (GD/SGD on ridge)
    give rotated trajectories; coordinate-wise ones (Adam) do not."""
    d = problem.X.shape[0]
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    info = dict(problem.info, rotated=seed)
    return Problem(Q @ problem.X, problem.Y.copy(), problem.teacher @ Q.T, info)
