"""The weight-normalised deep ReLU network of JANUS (Xu, Galanti, Rangamani, Rosasco, Poggio)
and its mini-batch SGD dynamics, batched over independent copies (e.g. one per ``lambda``).

The model (JANUS App. C, Fig. A.8b). For a binary problem with labels ``y_n = +-1``

    f(x) = rho * f_V(x),    f_V(x) = V_L sigma(V_{L-1} ... sigma(V_1 x) ...),    ||V_k||_F = 1,

where ``sigma`` is the ReLU, there are no biases, convolutional ``V_k`` are filter tensors
``(c_out, c_in, k, k)`` whose Frobenius norm is that of the filters (not of the Toeplitz
operator), and ``rho > 0`` is one global scalar. The *margin* of sample ``n`` is
``fbar_n = y_n f_V(x_n)`` (of the normalised network) and ``u_n = rho * fbar_n`` is the margin of
``f``. The regularised batch loss is

    L_S(rho, V) = (1/B) sum_{n in S} ell(u_n) + lambda * rho^2

with ``ell(u) = (1 - u)^2`` (square loss; equal to ``(f(x_n) - y_n)^2`` because ``y_n^2 = 1``),
``exp(-u)`` (exponential) or ``log(1 + exp(-u))`` (logistic = binary cross-entropy). Weight decay
acts on ``rho`` only: ``||V_k||_F = 1`` is fixed, so ``lambda ||W||^2`` of the unnormalised
network becomes ``lambda rho^2`` (JANUS eq. 12).

The dynamics implemented here (JANUS eq. 17, with its signs corrected -- see below). We write
``rho = rho0 * r`` with a constant ``rho0`` and train ``r`` (weight decay ``lambda r^2``). With
``g_n = -ell'(u_n)`` (``= 2 (1 - u_n)`` for the square loss), one step on a batch ``S`` is

    r   <- r + eta * [ rho0 (1/B) sum_n g_n fbar_n - 2 lambda r ]
    V_k <- normalise( V_k + eta_k * rho * (1/B) sum_n g_n (d fbar_n / d V_k - fbar_n V_k) ),

i.e. a Riemannian gradient step on the unit sphere of each ``V_k``: the Euclidean gradient is
projected on the tangent space (``G - <G, V> V``; by 1-homogeneity of ReLU nets
``<d fbar_n / d V_k, V_k> = fbar_n``, which turns the projection into the ``- fbar_n V_k`` term of
JANUS eq. 15) and the result is renormalised (a retraction, which differs from the
Lagrange-multiplier flow of JANUS eq. 13-15 by O(eta^2)). No momentum, constant learning rate.
With ``rho0 = 1`` and ``eta_k = eta`` this is JANUS eq. 17 (signs corrected) verbatim.

Where this departs from JANUS:

- JANUS eq. 1 and 17 print ``rho <- rho - eta (2/B) sum (1 - rho fbar) fbar - 2 eta lambda rho`` and
  ``V_k <- V_k - ... (1 - rho fbar)(-V_k fbar + d fbar / d V_k)``: both data terms have the wrong
  sign (they would *ascend* the loss), and eq. 1 also drops ``eta``. Their gradient-flow
  eq. 15 has the right signs, which is what we implement.
- Per-layer learning rates ``eta_k = eta / (v_scale^2 n_k)`` (:func:`layer_lrs`): their experiments
  used PyTorch's weight normalisation ``V_k = v_k / ||v_k||`` with the gain frozen and SGD on
  ``v_k``, which moves ``V_k`` like the step above with ``eta / ||v_k||^2``, and ``||v_k|| ~ 0.1
  sqrt(n_k)`` at their "initialization scale 0.1". One ``eta`` for all layers kills the network in
  our runs (``||d fbar / d V_k||`` grows like ``sqrt(n_k)``). They also used momentum 0.9, cosine
  annealing and 2000 epochs; we keep ``||V_k||_F = 1`` exactly.
- ``rho = rho0 r``: with ``||x_n|| <= 1`` and unit-norm layers ``f_V`` is tiny (~1e-5), so a plain
  step on ``rho ~ 1e5`` would never move it. ``rho0 = rho0_scale / RMS_n f_V(x_n)`` at
  initialisation (``f`` starts at RMS ``rho0_scale``), ``r`` starts at 1. This mirrors their
  implementation, where the frozen weight-normalisation gains multiply to a constant and the
  learnable global scalar plays the role of ``r``; the papers do not say how they initialise it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from . import metrics

LOSSES = ("square", "exp", "logistic")


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """A bias-free ReLU net: ``convs`` = ``[(c_out, kernel, stride, padding), ...]`` on inputs of
    shape ``in_shape = (c, h, w)``, then fully connected hidden layers of widths ``hidden``, then
    one linear output. Every layer is one normalised ``V_k``."""

    in_shape: tuple[int, int, int]
    convs: tuple[tuple[int, int, int, int], ...]
    hidden: tuple[int, ...]

    def conv_shapes(self) -> list[tuple[int, int]]:
        """Spatial size after each convolution."""
        h, w = self.in_shape[1:]
        out = []
        for _, k, s, p in self.convs:
            h, w = (h - k + 2 * p) // s + 1, (w - k + 2 * p) // s + 1
            if min(h, w) < 1:
                raise ValueError(f"convolutions {self.convs} shrink a {self.in_shape} input to "
                                 "nothing")
            out.append((h, w))
        return out

    def flat_dim(self) -> int:
        if not self.convs:
            return math.prod(self.in_shape)
        h, w = self.conv_shapes()[-1]
        return self.convs[-1][0] * h * w

    def shapes(self) -> list[tuple[int, ...]]:
        """Shape of every ``V_k`` (conv filters ``(c_out, c_in, k, k)``, linear
        ``(d_out, d_in)``)."""
        out, c = [], self.in_shape[0]
        for c_out, k, _, _ in self.convs:
            out.append((c_out, c, k, k))
            c = c_out
        dims = [self.flat_dim(), *self.hidden, 1]
        out += [(b, a) for a, b in zip(dims[:-1], dims[1:])]
        return out

    def names(self) -> list[str]:
        return [f"conv{i + 1}" for i in range(len(self.convs))] + [
            f"fc{i + 1}" for i in range(len(self.hidden) + 1)
        ]

    def patches(self) -> list[int]:
        """Per layer, how many vectors ``V_k`` multiplies per sample (output positions for a conv,
        1 for a linear layer): the rank bound of one sample's gradient (Chapter 1)."""
        return [h * w for h, w in self.conv_shapes()] + [1] * (len(self.hidden) + 1)

    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes()) + 1  # + rho


#: JANUS's network as their App. D.5 describes it for CIFAR-10 (3x32x32): four 3x3 convolutions
#: with 32, 64, 128, 128 channels, no padding, then 3200 -> 1024 -> output. Their text says
#: "stride 2" for all four, which would leave 128x1x1 = 128 features, not the 3200 = 128x5x5
#: they state (and their parameter count 3,519,335 = 3,519,328 weights + 6 frozen WN gains + rho
#: confirms 3200 x 1024); strides (2, 1, 1, 2) give 5x5. They use 2 outputs; we use one
#: (for two classes, softmax CE on 2 outputs is the logistic loss of their difference).
PAPER_ARCH = Arch((3, 32, 32), ((32, 3, 2, 0), (64, 3, 1, 0), (128, 3, 1, 0), (128, 3, 2, 0)),
                  (1024,))

#: The book's CPU-sized version, for Fashion-MNIST downsampled to 1x14x14: the same 4 conv + 2 FC
#: layout with 8-16 channels, stride 2, padding 1: 14 -> 7 -> 4 -> 2 -> 1, then 16 -> 32 -> 1.
BOOK_ARCH = Arch((1, 14, 14), ((8, 3, 2, 1), (16, 3, 2, 1), (16, 3, 2, 1), (16, 3, 2, 1)), (32,))


# --------------------------------------------------------------------------------------------
# Parameters and forward pass (K independent networks at once)
# --------------------------------------------------------------------------------------------
def _unit(t: torch.Tensor) -> torch.Tensor:
    """Normalise each of the K leading slices of ``t`` to Frobenius norm 1."""
    n = t.flatten(1).norm(dim=1).clamp_min(torch.finfo(t.dtype).tiny)
    return t / n.view(-1, *([1] * (t.ndim - 1)))


def init_weights(arch: Arch, k: int = 1, *, seed: int = 0,
                 dtype=torch.float32) -> list[torch.Tensor]:
    """``k`` identical copies of a random normalised network: each ``V_j`` Gaussian, then scaled to
    ``||V_j||_F = 1``. Shapes ``(k, *arch.shapes()[j])``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in arch.shapes():
        v = torch.randn(1, *shape, generator=g, dtype=torch.float64)
        out.append(_unit(v).to(dtype).repeat(k, *([1] * len(shape))).contiguous())
    return out


def f_normalised(V: Sequence[torch.Tensor], arch: Arch, x: torch.Tensor) -> torch.Tensor:
    """Outputs ``f_V(x)`` of the K networks, shape ``(n, K)``, for inputs ``x`` of shape
    ``(n, c, h, w)``.

    The K convolutional stacks run as one grouped convolution (groups = K); the linear layers as
    one batched matrix product."""
    K, n = V[0].shape[0], x.shape[0]
    nconv = len(arch.convs)
    h = x.reshape(n, *arch.in_shape)
    for i, (v, (c_out, k, s, p)) in enumerate(zip(V[:nconv], arch.convs)):
        w = v.reshape(K * c_out, v.shape[2], k, k)
        h = F.relu(F.conv2d(h, w, stride=s, padding=p, groups=1 if i == 0 else K))
    h = h.reshape(n, K, -1) if nconv else h.reshape(n, 1, -1).expand(n, K, -1)
    lin = V[nconv:]
    for j, w in enumerate(lin):
        h = torch.einsum("nki,koi->nko", h, w)
        if j < len(lin) - 1:
            h = F.relu(h)
    return h[..., 0]


def margin_loss(u: torch.Tensor, loss: str) -> torch.Tensor:
    """``ell(u)`` elementwise for the margins ``u = y rho f_V(x)``."""
    if loss == "square":
        return (1.0 - u) ** 2
    if loss == "exp":
        return torch.exp(-u)
    if loss == "logistic":
        return F.softplus(-u)
    raise ValueError(f"unknown loss {loss!r}: choose one of {LOSSES}")


def riemannian(grad: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Project Euclidean gradients on the tangent space of the unit spheres: ``G - <G, V> V`` for
    each of the K slices (``V`` has unit Frobenius norm)."""
    inner = (grad.flatten(1) * v.flatten(1)).sum(1)
    return grad - inner.view(-1, *([1] * (v.ndim - 1))) * v


def batch_gradients(V, r, arch: Arch, x, y, lam, loss: str, rho0: float = 1.0):
    """Gradients of ``L_S = mean_S ell(rho fbar_n) + lam r^2`` with ``rho = rho0 * r`` on the batch
    ``(x, y)`` (labels +-1) for the K networks.

    Returns ``(grad_V, grad_r, fbar)``: Riemannian gradients ``grad_{V_k} L_S`` (list of
    ``(K, *shape)``), ``dL_S/dr`` ``(K,)`` including ``2 lam r``, and the margins ``fbar``
    ``(n, K)``. ``lam`` is a ``(K,)`` tensor or a float. With ``rho0 = 1``, ``r`` is ``rho``."""
    Vs = [v.detach().requires_grad_(True) for v in V]
    rr = r.detach().requires_grad_(True)
    fbar = f_normalised(Vs, arch, x) * y.view(-1, 1)
    data = margin_loss(rho0 * rr * fbar, loss).mean(0)  # (K,)
    grads = torch.autograd.grad(data.sum(), Vs + [rr])
    lam_t = torch.as_tensor(lam, dtype=r.dtype)
    g_r = grads[-1] + 2.0 * lam_t * r
    g_V = [riemannian(g, v) for g, v in zip(grads[:-1], V)]
    return g_V, g_r.detach(), fbar.detach()


def layer_lrs(arch: Arch, lr: float, v_scale: float | None = 0.1) -> list[float]:
    """Learning rate of each ``V_k``: ``lr / (v_scale^2 n_k)`` with ``n_k`` the number of entries of
    ``V_k`` -- the effective learning rate of the direction ``V_k = v_k / ||v_k||`` under weight
    normalisation (SGD on ``v_k``) when ``||v_k|| = v_scale sqrt(n_k)``, i.e. entries of size
    ``v_scale`` (JANUS: "initialization scale 0.1"). ``v_scale=None``: ``lr`` for every layer
    (JANUS eq. 17 read literally)."""
    if v_scale is None:
        return [lr] * len(arch.shapes())
    return [lr / (v_scale**2 * math.prod(s)) for s in arch.shapes()]


def sgd_step(V, rho, g_V, g_rho, lr: float, lr_V: Sequence[float] | None = None):
    """One step: ``rho - lr grad_rho`` and the retraction ``normalise(V_k - lr_k grad_{V_k})``
    (``lr_V``: per-layer rates, default ``lr`` for all)."""
    lr_V = [lr] * len(V) if lr_V is None else lr_V
    V = [_unit(v - a * g) for v, g, a in zip(V, g_V, lr_V)]
    return V, rho - lr * g_rho


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
@dataclass
class WNResult:
    """What :func:`train` records for K networks (one per ``lams[j]``).

    - ``history``: per recorded epoch (``epoch`` holds which; entry 0 = initialisation) tensors of
      shape ``(K,)``: ``loss`` (data loss on the training set, without ``lambda r^2``), ``acc``
      (train accuracy), ``test_acc``, ``rho`` (``= rho0 r``), ``margin_mean`` / ``margin_std`` (mean
      and std over samples of ``fbar``), ``step_norm`` (mean over the epoch's batches of the
      Riemannian batch gradient norm, all layers together in quadrature).
    - ``margins``: ``(R, K, N)`` margins ``fbar_n`` at the end of each of the last ``R`` epochs.
    - ``grad_batch``: ``(L, K)`` per layer, mean over the last epoch's batches of ``||grad_{V_k}
      L_S||_F`` (JANUS's ``||dV_k/dt||``: the SGD update of ``V_k`` per unit learning rate).
    - ``grad_full``: ``(L, K)`` the same for the whole training set at the end (the GD gradient).
    - ``V``, ``r``, ``rho0``: final parameters (``rho = rho0 * r``).
    - ``decay_eff``: ``(L, K)`` per layer, ``D_eff = sum_t ln ||V_k + eta_k step_t||_F`` over all
      steps: the renormalisation divides by that norm every step, so ``V_T = exp(-D_eff) V_0 +
      DeltaV_T`` exactly (the only shrinkage of the initial weights; weight decay acts on ``r``).
    """

    arch: Arch
    lams: list[float]
    loss: str
    batch_size: int
    lr: float
    epochs: int
    history: dict[str, torch.Tensor]
    margins: torch.Tensor
    grad_batch: torch.Tensor
    grad_full: torch.Tensor
    V: list[torch.Tensor]
    r: torch.Tensor
    rho0: float
    seconds: float = 0.0
    decay_eff: torch.Tensor | None = None

    @property
    def rho(self) -> torch.Tensor:
        return self.rho0 * self.r

    def layer_table(self, atol: float = metrics.DEFAULT_ATOL) -> list[dict]:
        """One row per layer and network: threshold rank (``s_i > atol``, since ``||V_k||_F = 1``),
        stable rank, and the singular values of ``V_k`` (conv filters as ``c_out x c_in k k``)."""
        rows = []
        for name, v in zip(self.arch.names(), self.V):
            s = metrics.batch_singular_values(v.reshape(v.shape[0], v.shape[1], -1))  # (K, r)
            for j, lam in enumerate(self.lams):
                rows.append(dict(layer=name, lam=lam, shape=tuple(metrics.as_matrix(v[j]).shape),
                                 rank=int(metrics.threshold_rank(s[j], atol=atol)),
                                 stable_rank=float(metrics.stable_rank(s[j])), sv=s[j].numpy()))
        return rows


@torch.no_grad()
def evaluate(V, rho, arch: Arch, x, y, loss: str, chunk: int = 4096):
    """Margins ``fbar`` ``(n, K)``, mean data loss ``(K,)`` and accuracy ``(K,)`` on ``(x, y)``
    (+-1)."""
    fbar = torch.cat([f_normalised(V, arch, x[i:i + chunk])
                      for i in range(0, x.shape[0], chunk)]) * y.view(-1, 1)
    return fbar, margin_loss(rho * fbar, loss).mean(0), (fbar > 0).to(fbar.dtype).mean(0)


def full_gradient_norms(V, r, arch, x, y, lam, loss, rho0: float = 1.0,
                        chunk: int = 4096) -> torch.Tensor:
    """``||grad_{V_k} L_S||_F`` on the whole set ``(x, y)`` (labels +-1), accumulated in chunks:
    ``(L, K)``."""
    n = x.shape[0]
    acc = None
    for i in range(0, n, chunk):
        g_V, _, _ = batch_gradients(V, r, arch, x[i:i + chunk], y[i:i + chunk], lam, loss, rho0)
        w = (min(n, i + chunk) - i) / n
        acc = [g * w for g in g_V] if acc is None else [a + g * w for a, g in zip(acc, g_V)]
    return torch.stack([a.flatten(1).norm(dim=1) for a in acc])


def signs(y: torch.Tensor) -> torch.Tensor:
    """Labels 0/1 (or +-1) as float +-1."""
    y = torch.as_tensor(y)
    return torch.where(y > 0, 1.0, -1.0)


def train(x: torch.Tensor, y: torch.Tensor, *, arch: Arch, lams: Sequence[float],
          loss: str = "square",
          batch_size: int = 128, lr: float = 0.03, epochs: int = 100, seed: int = 0,
          v_scale: float | None = 0.1, rho0_scale: float = 0.1, record_last: int = 10,
          eval_every: int = 1, x_test=None, y_test=None, dtype=torch.float32,
          device: str | torch.device | None = None, progress: bool | str = False,
          cache=None) -> WNResult:
    """Train ``len(lams)`` copies of the weight-normalised net on ``(x, y)`` (labels 0/1 or +-1),
    copy ``j`` with weight decay ``lams[j]`` (on ``r``), by the dynamics of the module docstring.

    All copies share the initialisation and the sequence of batches (epoch-wise random
    permutations from ``seed``; ``batch_size >= n`` is full-batch GD), so that they differ in
    ``lambda`` only. The last incomplete batch of an epoch is dropped. ``rho0`` is
    ``rho0_scale / RMS_n f_V(x_n)`` at initialisation; ``r`` starts at 1. Per-layer learning rates:
    :func:`layer_lrs` (``v_scale``). Metrics are recorded every ``eval_every`` epochs and at the
    last ``record_last`` epochs (whose margins are kept). ``device``: default
    :func:`sgdrank.runtime.pick_device`; results come back on the CPU. ``cache``: a results
    folder (``"ch04"``) that keeps the result of this exact call (:func:`sgdrank.cache.memo`,
    keyed by every argument but ``progress``, tensors by value, and this module's source), so
    that a run lost with its runtime is not repeated."""
    import time

    if cache is not None:
        from . import cache as _cache

        call = {k: v for k, v in locals().items()
                if k not in ("cache", "x", "y", "time", "_cache")}
        return _cache.memo(cache, train, x, y, files=("weightnorm.py",), ignore=("progress",),
                           **call)

    from . import runtime
    from .progress import progress as _progress

    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {LOSSES}")
    t0 = time.time()
    K = len(lams)
    dev = runtime.pick_device(device) if not isinstance(device, torch.device) else device
    x = x.to(dev, dtype).reshape(x.shape[0], *arch.in_shape)
    yy = signs(y).to(dev, dtype)
    xt = None if x_test is None else x_test.to(dev, dtype).reshape(-1, *arch.in_shape)
    yt = None if y_test is None else signs(y_test).to(dev, dtype)
    n = x.shape[0]
    B = min(batch_size, n)
    lam = torch.tensor([float(v) for v in lams], dtype=dtype, device=dev)
    V = [v.to(dev) for v in init_weights(arch, K, seed=seed, dtype=dtype)]
    with torch.no_grad():
        f0 = f_normalised([v[:1] for v in V], arch, x)[:, 0]
    rho0 = rho0_scale / float(f0.pow(2).mean().sqrt())
    r = torch.ones(K, dtype=dtype, device=dev)
    lr_V = layer_lrs(arch, lr, v_scale)
    gen = torch.Generator().manual_seed(seed + 1)
    keys = ("epoch", "loss", "acc", "test_acc", "rho", "margin_mean", "margin_std", "step_norm")
    hist = {k: [] for k in keys}
    margins = []

    def record(ep, step_norm):
        fbar, l, a = evaluate(V, rho0 * r, arch, x, yy, loss)
        hist["epoch"].append(torch.full((K,), float(ep)))
        hist["loss"].append(l.cpu())
        hist["acc"].append(a.cpu())
        hist["rho"].append(rho0 * r.cpu())
        hist["margin_mean"].append(fbar.mean(0).cpu())
        hist["margin_std"].append(fbar.std(0).cpu())
        hist["step_norm"].append(step_norm.cpu())
        if xt is not None:
            hist["test_acc"].append(evaluate(V, rho0 * r, arch, xt, yt, loss)[2].cpu())
        else:
            hist["test_acc"].append(torch.full((K,), float("nan")))
        return fbar

    record(0, torch.full((K,), float("nan")))
    steps = n // B
    bar = range(1, epochs + 1)
    if progress:
        bar = _progress(bar, desc=progress if isinstance(progress, str) else "train", leave=False)
    grad_batch = torch.zeros(len(V), K)
    decay_eff = torch.zeros(len(V), K, dtype=torch.float64, device=dev)
    for ep in bar:
        perm = torch.randperm(n, generator=gen).to(dev)
        norms = torch.zeros(len(V), K, device=dev)
        for s in range(steps):
            idx = perm[s * B:(s + 1) * B]
            g_V, g_r, _ = batch_gradients(V, r, arch, x[idx], yy[idx], lam, loss, rho0)
            norms += torch.stack([g.flatten(1).norm(dim=1) for g in g_V])
            decay_eff += torch.stack([(v - a * g).flatten(1).norm(dim=1).double().log()
                                      for v, g, a in zip(V, g_V, lr_V)])
            V, r = sgd_step(V, r, g_V, g_r, lr, lr_V)
        grad_batch = norms / steps
        if ep % eval_every == 0 or ep > epochs - record_last or ep == epochs:
            fbar = record(ep, grad_batch.pow(2).sum(0).sqrt())
            if ep > epochs - record_last:
                margins.append(fbar.T.cpu())
        if not torch.isfinite(r).all():
            raise FloatingPointError(f"rho diverged at epoch {ep}; lower the learning rate")
    grad_full = full_gradient_norms(V, r, arch, x, yy, lam, loss, rho0)
    return WNResult(arch=arch, lams=[float(v) for v in lams], loss=loss, batch_size=B, lr=lr,
                    epochs=epochs, history={k: torch.stack(v) for k, v in hist.items()},
                    margins=torch.stack(margins) if margins else torch.empty(0, K, n),
                    grad_batch=grad_batch.cpu(), grad_full=grad_full.cpu(),
                    V=[v.detach().cpu() for v in V],
                    r=r.detach().cpu(), rho0=rho0, seconds=time.time() - t0,
                    decay_eff=decay_eff.cpu())


def margin_fluctuation(margins: torch.Tensor, lag: int = 1) -> torch.Tensor:
    """SGD noise seen in the margins, the margin analogue of GP22's ``d(W_{t+1}, W_t)``: the RMS
    over samples and recorded epochs of the change ``fbar_n(t+lag) - fbar_n(t)`` between records
    ``lag`` epochs apart, divided by the mean ``|fbar_n|`` (margins of different ``lambda`` differ
    in scale). A smooth drift (GD far from its fixed point) gives small changes, noise large ones.
    ``lag`` compares runs at equal numbers of *steps*: GD makes one step per epoch, SGD with ``N/B``
    steps per epoch is compared with GD at ``lag = N/B``. ``margins``: ``(R, K, N)`` -> ``(K,)``."""
    lag = int(lag)
    if lag < 1:
        raise ValueError(f"lag must be >= 1, got {lag}")
    if margins.shape[0] < lag + 1:
        raise ValueError(f"need margins from at least {lag + 1} epochs for lag {lag}, got "
                         f"{margins.shape[0]}")
    step = margins[lag:] - margins[:-lag]
    return step.pow(2).mean((0, 2)).sqrt() / margins.abs().mean((0, 2))


def layer_ranks(V: Sequence[torch.Tensor], arch: Arch, atol: float = metrics.DEFAULT_ATOL) -> dict:
    """Threshold rank (``s_i > atol`` of the unit-norm ``V_k``) and stable rank of every layer of
    the K networks ``V`` (e.g. :func:`init_weights` for the values at initialisation, or
    ``WNResult.V``): ``{"rank": (L, K) long, "stable_rank": (L, K) float64}``, layers in
    ``arch.names()`` order, conv filters as ``c_out x c_in k k``; and ``"sv"``: the singular
    values themselves, a list of ``(K, min(m, n))`` float64 tensors, one per layer."""
    rk, st, sv = [], [], []
    for v in V:
        s = metrics.batch_singular_values(v.reshape(v.shape[0], v.shape[1], -1))
        rk.append(torch.as_tensor(metrics.threshold_rank(s, atol=atol)).long().reshape(-1))
        st.append(torch.as_tensor(metrics.stable_rank(s), dtype=torch.float64).reshape(-1))
        sv.append(s)
    return {"rank": torch.stack(rk), "stable_rank": torch.stack(st), "sv": sv}


# --------------------------------------------------------------------------------------------
# Per-step probes: margin changes step by step and the sharpness (edge of stability)
# --------------------------------------------------------------------------------------------
def probe_steps(res: WNResult, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                batch_size: int | None = None, lr: float | None = None, seed: int = 0,
                v_scale: float | None = 0.1, device=None) -> torch.Tensor:
    """Continue the K trained networks of ``res`` for ``steps`` more steps (batch size
    ``res.batch_size`` unless given, learning rate ``res.lr`` unless given, fresh random batches
    from ``seed``) and return their margins after every step, ``(steps + 1, K, N)`` (entry 0: the
    trained state). With these, :func:`margin_fluctuation` at ``lag=1`` is the change per *step*,
    for GD and SGD alike; at ``lag=2`` it shows a period-2 oscillation (small at lag 2, large at lag
    1). ``device``: where to compute (default: where ``res`` is, the CPU); margins come back on
    the CPU."""
    dtype, dev = res.V[0].dtype, _device(device, res)
    x = x.to(dev, dtype).reshape(x.shape[0], *res.arch.in_shape)
    yy = signs(y).to(dev, dtype)
    n = x.shape[0]
    B = min(batch_size or res.batch_size, n)
    lr = res.lr if lr is None else lr
    lam = torch.tensor(res.lams, dtype=dtype, device=dev)
    V, r = [v.to(dev).clone() for v in res.V], res.r.to(dev).clone()
    lr_V = layer_lrs(res.arch, lr, v_scale)
    gen = torch.Generator().manual_seed(seed)
    out = [evaluate(V, res.rho0 * r, res.arch, x, yy, res.loss)[0].T]
    # the orders are drawn on the CPU (the same on every device) and moved once per epoch
    perm, pos = torch.randperm(n, generator=gen).to(dev), 0
    for _ in range(steps):
        if pos + B > n:
            perm, pos = torch.randperm(n, generator=gen).to(dev), 0
        idx = perm[pos:pos + B]
        pos += B
        g_V, g_r, _ = batch_gradients(V, r, res.arch, x[idx], yy[idx], lam, res.loss, res.rho0)
        V, r = sgd_step(V, r, g_V, g_r, lr, lr_V)
        out.append(evaluate(V, res.rho0 * r, res.arch, x, yy, res.loss)[0].T)
    return torch.stack(out).cpu()


def _device(device, res: WNResult) -> torch.device:
    """``device`` if given, else the device of ``res``'s weights."""
    return res.V[0].device if device is None else torch.device(device)


def sharpness(res: WNResult, x: torch.Tensor, y: torch.Tensor, *, lr: float | None = None,
              iters: int = 30, seed: int = 0, v_scale: float | None = 0.1,
              device=None) -> torch.Tensor:
    """``lr * lambda_max`` for each of the K trained networks: the top eigenvalue of the Hessian
    of the full-set objective ``L(r, v) = mean_n ell(rho0 r fbar_n(v / ||v||)) + lambda r^2``,
    preconditioned by the step sizes, ``D^{1/2} H D^{1/2}`` with ``D = diag(lr, lr_k)``
    (:func:`layer_lrs`). A gradient step with these rates is linearly stable when this number is
    below 2; gradient descent at the *edge of stability* (Cohen et al. 2021) hovers at 2 and
    oscillates with period 2 along the top eigenvector. Power iteration with Hessian-vector products
    (``iters`` steps; a second, shifted pass when the largest-magnitude eigenvalue is negative).
    Cost: ``iters`` (up to ``2 iters``) Hessian-vector products over the whole of ``x``, each
    about two forward-and-backward passes of the K networks. ``device``: where to compute
    (default: where ``res`` is); returns ``(K,)`` on the CPU."""
    dtype, dev = res.V[0].dtype, _device(device, res)
    x = x.to(dev, dtype).reshape(x.shape[0], *res.arch.in_shape)
    yy = signs(y).to(dev, dtype)
    lam = torch.tensor(res.lams, dtype=dtype, device=dev)
    lr = res.lr if lr is None else lr
    K = len(res.lams)
    scales = [math.sqrt(lr)] + [math.sqrt(a) for a in layer_lrs(res.arch, lr, v_scale)]
    params = [res.r.to(dev).clone().requires_grad_(True)] + [
        v.to(dev).clone().requires_grad_(True) for v in res.V]

    def objective(ps):
        fbar = f_normalised([_unit(v) for v in ps[1:]], res.arch, x) * yy.view(-1, 1)
        data = margin_loss(res.rho0 * ps[0] * fbar, res.loss).mean(0)
        return (data + lam * ps[0] ** 2).sum()  # the K copies are independent: blocks of H

    grads = torch.autograd.grad(objective(params), params, create_graph=True)

    def hvp(u):  # D^{1/2} H D^{1/2} u, all K copies at once
        dot = sum((g * (a * w)).sum() for g, a, w in zip(grads, scales, u))
        hu = torch.autograd.grad(dot, params, retain_graph=True)
        return [a * h.detach() for a, h in zip(scales, hu)]

    def per_copy(u, w):  # <u, w> per copy: (K,)
        return sum((a.reshape(K, -1) * b.reshape(K, -1)).sum(1) for a, b in zip(u, w))

    def power(shift):
        g = torch.Generator().manual_seed(seed)
        u = [torch.randn(p.shape, generator=g, dtype=dtype).to(dev) for p in params]
        ev = torch.zeros(K, dtype=dtype, device=dev)
        for _ in range(iters):
            nrm = per_copy(u, u).sqrt()
            u = [w / nrm.view(-1, *[1] * (w.ndim - 1)) for w in u]
            hu = [h - shift.view(-1, *[1] * (h.ndim - 1)) * w for h, w in zip(hvp(u), u)]
            ev = per_copy(u, hu)
            u = hu
        return ev + shift

    ev = power(torch.zeros(K, dtype=dtype, device=dev))
    if (ev < 0).any():  # the largest |eigenvalue| is negative: shift it to the bottom
        ev = torch.where(ev < 0, power(torch.where(ev < 0, ev, torch.zeros_like(ev))), ev)
    return ev.detach().cpu()


def run_rows(res: WNResult, x: torch.Tensor, y: torch.Tensor, *, init_seed: int,
             probe: int = 8, lag: int = 1, sharp_iters: int = 30, device=None,
             **keys) -> tuple[list[dict], list[dict]]:
    """The rows that Chapter 4 tabulates for one :func:`train` call (``keys``, e.g. loss, mode,
    seed, are copied into every row): per network (one per ``lambda``) the final training loss and
    accuracy, ``rho``, the mean and sd of the margins, the margin change ``fluct`` between records
    ``lag`` epochs apart, the margin changes per step (``step1``) and per two steps (``step2``) over
    ``probe`` further steps (:func:`probe_steps`), ``lr * lambda_max`` (:func:`sharpness`), the
    batch and full gradient norms, and the ranks at the end and at initialisation (``init_seed``,
    the seed of :func:`init_weights`); and per layer the update norm per unit learning rate
    (``v_batch``) and the actual update ``eta_k * v_batch`` (``upd``, :func:`layer_lrs`), the
    ranks, and the decomposition ``V_T = exp(-D_eff) V_0 + DeltaV`` (``D_eff``, the budget
    ``Dstar`` at ``1e-3`` and the ranks of ``DeltaV``: :func:`sgdrank.decomposition.parts`).
    ``top_smallest`` / ``top_smallest_upd``: the top layer has the smallest ``v_batch`` /
    ``upd``. ``sharp_iters``: power iterations of :func:`sharpness` -- with ``probe`` the cost
    of this function, which can exceed the training's: each iteration is a Hessian-vector
    product over all of ``x`` for the K networks, so a run shortened to a few steps must
    shorten these too (Chapter 4's dry run spent hours here). ``device``: where
    the probes and the sharpness run (default: the CPU, where ``res`` is)."""
    from . import decomposition
    names = res.arch.names()
    fl = margin_fluctuation(res.margins, lag=lag)
    m = probe_steps(res, x, y, steps=probe, seed=10_000 + init_seed, device=device)
    s1, s2 = margin_fluctuation(m, 1), margin_fluctuation(m, 2)
    sharp = sharpness(res, x, y, seed=init_seed, iters=sharp_iters, device=device)
    rk = layer_ranks(res.V, res.arch)
    V0 = init_weights(res.arch, 1, seed=init_seed, dtype=torch.float64)
    rk0 = layer_ranks(V0, res.arch)
    lr_V = torch.tensor(layer_lrs(res.arch, res.lr))
    h = res.history
    rows, layer_rows = [], []
    for j, lam in enumerate(res.lams):
        fb = res.margins[-1, j]
        gb = res.grad_batch[:, j]
        up = lr_V * gb
        rows.append({**keys, "lam": lam, "train_loss": float(h["loss"][-1, j]),
                     "train_acc": float(h["acc"][-1, j]), "test_acc": float(h["test_acc"][-1, j]),
                     "rho": float(h["rho"][-1, j]), "margin_mean": float(fb.mean()),
                     "margin_sd": float(fb.std()), "fluct": float(fl[j]),
                     "step1": float(s1[j]), "step2": float(s2[j]), "sharp": float(sharp[j]),
                     "v_batch": float(gb.mean()), "v_full": float(res.grad_full[:, j].mean()),
                     "top_smallest": int(gb.argmin()) == len(names) - 1,
                     "upd": float(up.mean()),
                     "top_smallest_upd": int(up.argmin()) == len(names) - 1,
                     "rank": int(rk["rank"][:, j].sum()), "rank0": int(rk0["rank"].sum()),
                     "stable": float(rk["stable_rank"][:, j].mean()),
                     "stable0": float(rk0["stable_rank"].mean())})
        for li, name in enumerate(names):
            dec = {}
            if res.decay_eff is not None:
                d_eff = float(res.decay_eff[li, j])
                p = decomposition.parts(res.V[li][j].double(), V0[li][0], math.exp(-d_eff),
                                        s=rk["sv"][li][j], s0=rk0["sv"][li][0])
                dec = {"D_eff": d_eff, "Dstar": p["Dstar@0.001"], "rank_dW": p["dW_rank@0.001"],
                       "srank_dW": p["dW_srank"], "decay_rank": p["decay_rank@0.001"]}
            layer_rows.append({**keys, "lam": lam, "layer": name, "v_batch": float(gb[li]),
                               "upd": float(up[li]), **dec,
                               "stable": float(rk["stable_rank"][li, j]),
                               "stable0": float(rk0["stable_rank"][li, 0]),
                               "rank": int(rk["rank"][li, j]), "rank0": int(rk0["rank"][li, 0])})
    return rows, layer_rows


# --------------------------------------------------------------------------------------------
# Cost: a train call (and its run_rows analysis) described for sgdrank.cost
# --------------------------------------------------------------------------------------------
_FLOPS: dict = {}


def flops_per_sample(arch: Arch) -> tuple[float, float]:
    """``(train, forward)`` FLOPs per sample of one network (one of the K copies): a
    :func:`batch_gradients` call (forward and backward) and a forward pass, counted by
    ``torch.utils.flop_counter`` on two samples (matrix products and convolutions; the
    elementwise projection and normalisation are not counted). Cached per architecture."""
    if arch not in _FLOPS:
        from torch.utils.flop_counter import FlopCounterMode

        V = init_weights(arch, 1, seed=0)
        x = torch.randn(2, *arch.in_shape)
        y = torch.ones(2)
        with FlopCounterMode(display=False) as fc:
            batch_gradients(V, torch.ones(1), arch, x, y, 0.0, "square")
        train = fc.get_total_flops() / 2
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            f_normalised(V, arch, x)
        _FLOPS[arch] = (float(train), float(fc.get_total_flops() / 2))
    return _FLOPS[arch]


def activations_per_sample(arch: Arch) -> int:
    """Floats of the layer outputs of one sample through one network (before and after each
    ReLU): what a forward pass keeps for the backward pass."""
    convs = sum(c_out * h * w for (c_out, *_), (h, w) in zip(arch.convs, arch.conv_shapes()))
    return 2 * (convs + sum(arch.hidden)) + 1


def work(arch: Arch, *, n_train: int, n_test: int, k: int, calls: int, batch_size: int,
         epochs: int, eval_every: int = 1, record_last: int = 10, probe: int = 0,
         sharp_iters: int = 0, label: str = "weightnorm.train", dtype=torch.float32,
         device=None):
    """:class:`sgdrank.cost.Work` for ``calls`` calls of :func:`train` with ``k = len(lams)``
    networks each, on ``n_train`` training and ``n_test`` test images, and (``probe``,
    ``sharp_iters`` > 0) each followed by :func:`run_rows` with those settings.

    Per call: ``epochs * (n_train // B)`` steps of ``B * k`` samples forward and backward
    (:func:`flops_per_sample`); evaluation: the records of :func:`train` (every
    ``eval_every`` epochs, the last ``record_last`` and the start: a forward pass over the
    training and test sets), its final full-set gradient, and run_rows' work -- ``probe`` further
    steps each with a forward pass over the training set, and ``sharp_iters`` power iterations
    (one Hessian-vector product over the training set, about two forward-and-backward passes,
    twice when the top eigenvalue is negative: counted once). No SVD runs on the device (the
    ranks are taken on the host). Device memory: data, ``k`` copies of the weights (weights,
    gradients, the next weights and the autograd copies: 4), and the largest of the training
    batch's activations (twice: forward and backward), an evaluation chunk of 4096 samples and
    the sharpness graph over the training set (activations four times: double backward).
    Host: margins of the last ``record_last`` epochs and the final weights. ``probe(n)`` times
    ``n`` steps of one call on ``device`` (default ``$SGDRANK_DEVICE``, else the CPU) with
    synthetic inputs of the right shape."""
    from . import cost, sweep

    n_train, n_test, k = int(n_train), int(n_test), int(k)
    B = min(int(batch_size), n_train)
    steps = int(epochs) * (n_train // B)
    train_f, fwd_f = flops_per_sample(arch)
    records = 1 + sum(1 for ep in range(1, int(epochs) + 1)
                      if ep % eval_every == 0 or ep > epochs - record_last or ep == epochs)
    evals = k * (records * (n_train + n_test) * fwd_f + n_train * train_f)
    evals += k * (probe * (B * train_f + n_train * fwd_f) + n_train * fwd_f)
    if sharp_iters:
        evals += k * n_train * train_f * (1 + 2 * sharp_iters)
    P = arch.n_params()
    acts = 4.0 * activations_per_sample(arch) * k
    data_b = 4.0 * (n_train + n_test) * (math.prod(arch.in_shape) + 1)
    peak = max(2 * B * acts, min(4096, n_train + n_test) * acts,
               4 * n_train * acts if sharp_iters else 0.0)
    device_bytes = data_b + 4.0 * 4 * k * P + peak
    host_bytes = 4.0 * k * (record_last * n_train + 2 * P)

    def timed(n: int) -> float:
        import time

        dev = sweep.resolve_device(device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, *arch.in_shape, generator=g, dtype=dtype).to(dev)
        y = torch.where(torch.rand(B, generator=g) > 0.5, 1.0, -1.0).to(dev, dtype)
        V = [v.to(dev) for v in init_weights(arch, k, seed=0, dtype=dtype)]
        r = torch.ones(k, dtype=dtype, device=dev)
        lam = torch.full((k,), 1e-3, dtype=dtype, device=dev)
        lr_V = layer_lrs(arch, 1e-6)

        def step(V, r):
            g_V, g_r, _ = batch_gradients(V, r, arch, x, y, lam, "square")
            return sgd_step(V, r, g_V, g_r, 1e-6, lr_V)

        V, r = step(V, r)  # warm-up
        best = math.inf
        for _ in range(2):  # the faster of two repetitions
            cost._sync(dev)
            t = time.perf_counter()
            for _ in range(max(1, n)):
                V, r = step(V, r)
            cost._sync(dev)
            best = min(best, (time.perf_counter() - t) / max(1, n))
        return best

    return cost.Work(label, runs=int(calls) * k, k=k, steps=steps,
                     step_flops=B * k * train_f, batch_size=B, eval_flops=evals, svds={},
                     device_bytes=device_bytes, host_bytes=host_bytes, probe=timed,
                     kernels=12 * len(arch.shapes()))
