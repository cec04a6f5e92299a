"""Gradients with respect to weight matrices, their exact ranks, and the bounds on those ranks
(Chapter 1: claims C1-C4).

The one fact behind every bound: if a weight matrix ``W`` enters a computation only through the
products ``z_i = W h_i`` (i = 1..M) with vectors ``h_i`` that do not depend on ``W``, then for any
differentiable scalar ``F``

    dF/dW = sum_i (dF/dz_i) h_i^T ,      so   rank(dF/dW) <= min(M, d_out, d_in).

``M`` is what :func:`applications` counts with forward hooks: for a linear layer, the number of
vectors it multiplies (1 per sample, T per sample for a layer applied to T tokens, twice that for
a weight used twice); for a convolution, the number of patches ``N = h_out * w_out`` per call.
A per-sample quantity uses one sample's count, unless the network couples the samples of a batch
(batch normalisation in training mode), in which case every sample's output depends on every
``z_i`` of the batch.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

import torch
import torch.nn as nn

from .metrics import (
    as_matrix,
    numerical_rank,  # noqa: F401  (re-exported: gradients.numerical_rank)
    rank_matrices,
    singular_values,
    stable_rank,
    threshold_rank,
)
from .models import TinyAttention


def weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every weight matrix of ``model`` by name: the rank-tracked layers and the classifier."""
    mods = dict(model.rank_layers()) if hasattr(model, "rank_layers") else {}
    if not mods:
        mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if hasattr(model, "head") and model.head not in mods.values():
        mods["head"] = model.head
    return mods


def applications(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """``M`` per sample for each weight matrix: how many vectors it multiplies in one forward
    pass of one sample (summed over calls, so a tied weight counts each use). ``x`` is a batch;
    counts are divided by its size."""
    mods = weight_modules(model)
    counts = {name: 0 for name in mods}
    batch = x.shape[0]

    def hook(name):
        def fn(mod, inputs, output):
            if isinstance(mod, nn.Conv2d):
                counts[name] += output.shape[-1] * output.shape[-2] * output.shape[0] // batch
            else:
                counts[name] += inputs[0].numel() // inputs[0].shape[-1] // batch

        return fn

    _forward_with_hooks(model, x, {m: hook(n) for n, m in mods.items()})
    return counts


def _forward_with_hooks(model: nn.Module, x: torch.Tensor, hooks: dict) -> None:
    """One no-grad forward pass of ``x`` with ``hooks`` ({module: forward hook}) attached."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


def couples_batch(model: nn.Module) -> bool:
    """True if a training-mode forward pass mixes samples (batch normalisation in train mode)."""
    from .models import BatchNorm

    return any(
        isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm)) and m.training
        for m in model.modules()
    )


def _counts(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """Per sample: vectors each weight matrix multiplies (as :func:`applications`) and how many
    calls (uses) of the matrix that takes."""
    mods = weight_modules(model)
    vecs = {name: 0 for name in mods}
    calls = {name: 0 for name in mods}
    batch = x.shape[0]

    def hook(name):
        def fn(mod, inputs, output):
            calls[name] += 1
            if isinstance(mod, nn.Conv2d):
                vecs[name] += output.shape[-1] * output.shape[-2] * output.shape[0] // batch
            else:
                vecs[name] += inputs[0].numel() // inputs[0].shape[-1] // batch

        return fn

    _forward_with_hooks(model, x, {m: hook(n) for n, m in mods.items()})
    return vecs, calls


def reachable_positions(model: nn.Module) -> dict[str, int]:
    """For a :class:`sgdrank.models.ConvNet`: per conv layer, the number of its output positions
    that some output of ``f`` depends on through the layers above it (the head reads every
    position of the last conv; a strided or padded conv above reads only the positions its
    windows cover). An output position that nothing reads has output gradient ``delta_q = 0``, so
    its patch does not count in the bound of GSGP Lemma 3.1. Other models: ``{}``."""
    from .models import ConvNet

    if not isinstance(model, ConvNet):
        return {}
    hw = [tuple(model.in_shape[1:])]
    for conv in model.convs:
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        hw.append(tuple((n - k + 2 * p) // s + 1 for n in hw[-1]))
    mask = torch.ones(1, 1, *hw[-1], dtype=torch.float64)
    out: dict[str, int] = {}
    for i in range(len(model.convs) - 1, -1, -1):
        out[f"conv{i + 1}"] = int((mask > 0).sum())
        if i == 0:
            break
        conv = model.convs[i]
        inp = torch.zeros(1, 1, *hw[i], dtype=torch.float64, requires_grad=True)
        ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64)
        y = nn.functional.conv2d(inp, ones, stride=conv.stride, padding=conv.padding)
        (grad,) = torch.autograd.grad((y * mask).sum(), inp)
        mask = (grad > 0).double()
    return dict(reversed(list(out.items())))


def _softmax_projections(model: nn.Module) -> set[int]:
    """ids of the matrices of softmax attention in ``model`` whose gradient loses one dimension:
    the scores ``q_t . k_u`` enter a softmax over ``u``, whose Jacobian annihilates the all-ones
    vector, so the key deltas sum to zero over tokens (every head; ``T - 1``). The query deltas
    of one head lie in the span of that head's key differences; with several heads these spans
    differ and add up, so a multi-head query matrix keeps ``T`` and only a one-head one loses a
    dimension."""
    from .models import TinyAttention
    from .zoo import Attention

    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, (TinyAttention, TokenAttention)):  # one head
            out |= {id(m.Wq), id(m.Wk)}
        elif isinstance(m, Attention):
            out |= {id(m.k)} | ({id(m.q)} if m.heads == 1 else set())
    return out


def _bn_structure(model: nn.Module) -> dict[str, tuple[object, list]] | None:
    """For MLP / ResMLP: per weight name, (the training-mode BN applied directly to its output
    or None, the training-mode BNs further downstream). None for other models."""
    from .models import MLP, BatchNorm, ResMLP

    def live(n):
        ok = isinstance(n, (BatchNorm, nn.modules.batchnorm._BatchNorm)) and n.training
        return n if ok else None

    if isinstance(model, MLP):
        norms = [live(n) for n in model.norms]
        out = {
            f"W{i + 1}": (norms[i], [n for n in norms[i + 1 :] if n is not None])
            for i in range(len(norms))
        }
    elif isinstance(model, ResMLP):
        seq = []  # (name, BN directly after) in forward order
        for i, b in enumerate(model.blocks):
            seq += [(f"block{i + 1}.W1", live(b.n1)), (f"block{i + 1}.W2", live(b.n2))]
        allbn = [n for _, n in seq if n is not None]
        out = {"stem": (None, allbn)}
        for j, (name, after) in enumerate(seq):
            out[name] = (after, [n for _, n in seq[j + 1 :] if n is not None])
    else:
        return None
    out["head"] = (None, [])
    return out


def rank_bounds(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_sum: bool = False,
    sharp: bool = True,
    output_rank: int | None = None,
) -> dict[str, int]:
    """The bound on the rank of each weight matrix's gradient, for one sample's output
    (``batch_sum=False``) or for a weighted sum over the batch ``x`` (``batch_sum=True``).

    ``sharp=False``: the chain-rule lemma as is, ``min(M', d_out, d_in)`` with ``M`` the
    per-sample count of :func:`applications` and ``M' = B M`` for a batch sum or when the model
    couples samples (BN in training mode).

    ``sharp=True`` (default) adds the refinements of Chapter 1, each a proved identity:

    - coupling is per matrix: only a matrix with a training-mode BN at or after its output
      (MLP, ResMLP) sees the whole batch; a matrix with none (the classifier) keeps count 1 per
      sample;
    - a matrix whose output goes straight into training-mode BN: ``B - 1`` (the batch mean is
      subtracted; the centred inputs ``h_i - mean(h)`` sum to zero); with detached variance and
      no BN further downstream, one sample's gradient is rank one and the batch sum ``B - 1``;
    - the key matrix of softmax attention: ``T - 1`` per call (softmax is invariant to adding a
      constant to a row of scores); the query matrix too for one head, but not for several
      heads, whose per-head query spans add up to ``T``;
    - a conv layer of a ConvNet: only the output positions that reach ``f``
      (:func:`reachable_positions`) count.

    ``output_rank`` caps the classifier (``head``): the dimension of the span of the output
    gradients ``dl/df(x_j)``. 1 for a fixed projection ``c . f`` (every sample's output gradient
    is parallel to ``c``), ``k`` for square loss, ``k - 1`` for softmax cross-entropy (each
    logit gradient sums to zero). None: no cap beyond the count.
    """
    per_sample, calls = _counts(model, x)
    batch = x.shape[0]
    mods = weight_modules(model)
    couples = couples_batch(model)
    if not sharp:
        factor = batch if (batch_sum or couples) else 1
        return {n: min(per_sample[n] * factor, *as_matrix(m.weight).shape) for n, m in mods.items()}
    reach = reachable_positions(model)
    qk = _softmax_projections(model)
    bn = _bn_structure(model) if couples else None
    out = {}
    for name, mod in mods.items():
        d_out, d_in = as_matrix(mod.weight).shape
        m = reach.get(name, per_sample[name])
        if id(mod) in qk:
            m = per_sample[name] - calls[name]
        if couples and bn is None:  # an unknown batch-coupled model: no refinement
            count = batch * m
        elif couples and (bn[name][0] is not None or bn[name][1]):
            after, downstream = bn[name]
            if after is not None and not downstream and getattr(after, "detach_var", False):
                count = batch - 1 if batch_sum else m
            elif after is not None:
                count = batch - 1
            else:
                count = batch * m
        else:
            count = batch * m if batch_sum else m
        bound = min(count, d_out, d_in)
        if name == "head" and output_rank is not None:
            bound = min(bound, output_rank)
        if output_rank == 0:  # dl/df = 0 (cross-entropy with one class): every gradient is 0
            bound = 0
        out[name] = max(bound, 0)
    return out


def output_rank(loss: str, k: int) -> int:
    """The dimension of the span of the output gradients ``dl/df`` for ``loss``: ``"projection"``
    (a fixed ``c . f``) 1, ``"mse"`` ``k``, ``"ce"`` (softmax cross-entropy) ``k - 1``."""
    ranks = {"projection": 1, "mse": k, "ce": max(k - 1, 0)}
    if loss not in ranks:
        raise ValueError(f"unknown loss {loss!r}: use one of {sorted(ranks)}")
    return ranks[loss]


def _grads(scalar: torch.Tensor, mods: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    params = [m.weight for m in mods.values()]
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return {
        n: as_matrix(g if g is not None else torch.zeros_like(p)).detach()
        for n, g, p in zip(mods, grads, params)
    }


def per_sample_gradients(
    model: nn.Module, x: torch.Tensor, direction: torch.Tensor | None = None
) -> list[dict[str, torch.Tensor]]:
    """``d (c . f(x_j; X)) / dW`` for every sample ``j`` of the batch ``X = x`` and every weight
    matrix (conv filters reshaped). ``c`` (``direction``, shape ``(k,)``) projects a vector
    output to a scalar; default: a fixed random unit vector. One forward pass of the whole batch,
    so batch-coupled models (BN in train mode) are differentiated as they train."""
    mods = weight_modules(model)
    out = model(x)
    c = direction if direction is not None else _unit(out.shape[1], out.dtype)
    proj = out @ c
    return [_grads(proj[j], mods) for j in range(x.shape[0])]


def loss_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
) -> dict[str, torch.Tensor]:
    """``dL/dW`` of the (mean) loss over the batch ``(x, y)`` for every weight matrix."""
    mods = weight_modules(model)
    return _grads(loss(model(x), y), mods)


def jacobian_matrices(model: nn.Module, x1: torch.Tensor) -> dict[str, torch.Tensor]:
    """For ONE sample (``x1`` of shape ``(1, ...)``): the Jacobian of the k outputs w.r.t. each
    weight matrix, as a ``(k, d_out, d_in)`` tensor."""
    mods = weight_modules(model)
    out = model(x1)[0]
    rows = [_grads(out[i], mods) for i in range(out.shape[0])]
    return {n: torch.stack([r[n] for r in rows]) for n in mods}


RANK_RTOL = 1e-10
"""Relative tolerance of the gradient ranks of Chapter 1: a singular value counts when it exceeds
``RANK_RTOL * s_1``. LAPACK's default ``max(m, n) * eps`` (~1e-15) is too tight for gradients that
autograd forms as sums that cancel exactly in exact arithmetic (after batch normalisation
``sum_i delta_i = 0`` holds only to rounding, leaving a remnant of a few ``eps * s_1``);
:func:`rank_and_gap` reports how far the counted and the discarded values are from it."""


def rank_and_gap(g: torch.Tensor, rtol: float = RANK_RTOL) -> tuple[int, float, float]:
    """``(rank, smallest counted s_i / s_1, largest discarded s_i / s_1)`` of one gradient
    matrix (float64 singular values); a zero matrix is ``(0, nan, 0.0)``, a full-rank one has
    discarded ``0.0``."""
    s = singular_values(g)
    if s.numel() == 0 or s[0] <= 0:
        return 0, float("nan"), 0.0
    rel = s / s[0]
    r = int((rel > rtol).sum())
    kept = float(rel[r - 1])
    dropped = float(rel[r]) if r < rel.numel() else 0.0
    return r, kept, dropped


def live_size(g: torch.Tensor) -> tuple[int, int]:
    """``(nonzero rows, nonzero columns)`` of one gradient matrix ``Delta H^T`` (exact zeros).

    A ReLU unit above the matrix that is off for every sample zeroes a row of ``Delta``, hence
    a row of the gradient; an input coordinate that is zero for every sample (a unit below
    that is off for the whole batch) zeroes a row of ``H``, hence a column. So
    ``rank <= min(nonzero rows, nonzero columns)``: the bound that dead units leave."""
    g = as_matrix(g.detach())
    return int((g != 0).any(1).sum()), int((g != 0).any(0).sum())


def ranks(grads: Mapping[str, torch.Tensor], rtol: float = RANK_RTOL) -> dict[str, int]:
    """Rank of each gradient matrix: singular values above ``rtol * s_1`` (float64)."""
    return {n: rank_and_gap(g, rtol)[0] for n, g in grads.items()}


def max_ranks(
    grad_list: list[Mapping[str, torch.Tensor]], rtol: float = RANK_RTOL
) -> dict[str, int]:
    """Layer-wise maximum rank over a list of gradient dicts."""
    out: dict[str, int] = {}
    for g in grad_list:
        for n, r in ranks(g, rtol).items():
            out[n] = max(out.get(n, 0), r)
    return out


def relative_spectrum(g: torch.Tensor) -> torch.Tensor:
    """Singular values of a gradient matrix divided by the largest (float64, descending)."""
    s = singular_values(g)
    return s / s[0] if s[0] > 0 else s


def _unit(k: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(12345)
    c = torch.randn(k, generator=g, dtype=torch.float64).to(dtype)
    return c / c.norm()


# --- C4: the activation pattern is locally constant -----------------------------------------


def preactivations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of every ReLU-like activation of an MLP / ResMLP (hooks on BN or Linear outputs
    that feed the activation), as a list of ``(B, width)`` tensors."""
    from .models import MLP, ResMLP

    found: list[torch.Tensor] = []
    if isinstance(model, MLP):
        mods = list(model.norms)
        mods = [
            n if not isinstance(n, nn.Identity) else l for n, l in zip(model.norms, model.layers)
        ]
    elif isinstance(model, ResMLP):
        mods = []
        for b in model.blocks:
            mods += [
                b.n1 if not isinstance(b.n1, nn.Identity) else b.W1,
                b.n2 if not isinstance(b.n2, nn.Identity) else b.W2,
            ]
    else:
        raise TypeError(f"preactivations: MLP or ResMLP expected, got {type(model).__name__}")
    _forward_with_hooks(model, x, {m: (lambda mod, i, o: found.append(o.detach())) for m in mods})
    return found


def activation_pattern(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ReLU pattern ``1[u > 0]`` of every pre-activation, concatenated: ``(B, total units)``
    bool."""
    return torch.cat([u > 0 for u in preactivations(model, x)], dim=1)


def pattern_margin(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per sample, the smallest ``|u|`` over all pre-activations: how far the pattern is from
    changing (``(B,)``)."""
    return torch.cat([u.abs() for u in preactivations(model, x)], dim=1).min(dim=1).values


# --- verification harness ---------------------------------------------------------------------


def weighted_batch_gradient(
    model: nn.Module, x: torch.Tensor, beta: torch.Tensor, direction: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """GP22 Lemma 2's quantity: ``d/dW sum_j beta_j c . f(x_j; X)`` for the batch ``X = x``
    with one fixed projection ``c``. A loss gradient has this form only for ``k = 1`` output:
    a real loss gives each sample its own output gradient ``dl/df(x_j)``, not a multiple of
    ``c`` (see :func:`batch_loss_gradient`)."""
    mods = weight_modules(model)
    out = model(x)
    c = direction if direction is not None else _unit(out.shape[1], out.dtype)
    return _grads((out @ c) @ beta, mods)


def batch_factors(model: nn.Module, x: torch.Tensor, beta: torch.Tensor) -> dict[str, dict]:
    """The factors of :func:`weighted_batch_gradient` ``= Delta H^T`` for every fully-connected
    weight matrix (``nn.Linear``, applied once per sample): ``H`` holds the inputs ``h_j`` and
    ``Delta`` the ``delta_j = beta_j d(c . f(x_j))/dz_j``. Per layer: ``zero rows Delta`` (output
    units with ``delta = 0`` for every sample: a ReLU off for the whole batch),
    ``zero rows H`` (input coordinates that are 0 for every sample), ``rank Delta``,
    ``rank H`` and ``rank`` (of the gradient); ``rank <= min(rank Delta, rank H)``."""
    mods = {n: m for n, m in weight_modules(model).items() if isinstance(m, nn.Linear)}
    seen: dict[str, list] = {}

    def hook(name):
        def fn(mod, inp, out):
            if name not in seen:  # a matrix applied once: one call per forward
                out.retain_grad()
                seen[name] = [inp[0].detach(), out]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    c = _unit(out.shape[1], out.dtype)
    grads = _grads((out @ c) @ beta, mods)
    res = {}
    for n, (h, z) in seen.items():
        d = z.grad.detach()  # (B, d_out): row j is delta_j
        res[n] = {"zero rows Delta": int((d == 0).all(0).sum()),
                  "zero rows H": int((h == 0).all(0).sum()),
                  "rank Delta": rank_and_gap(d)[0], "rank H": rank_and_gap(h)[0],
                  "rank": rank_and_gap(grads[n])[0]}
    return res


def _loss_terms(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample losses ``l(f(x_j), y_j)``: ``"mse"`` ``||f - y||^2`` (``y``: ``(B, k)``),
    ``"ce"`` softmax cross-entropy (``y``: ``(B,)`` class indices)."""
    if loss == "mse":
        return ((out - y) ** 2).sum(1)
    if loss == "ce":
        return nn.functional.cross_entropy(out, y, reduction="none")
    raise ValueError(f"unknown loss {loss!r}: use 'mse' or 'ce'")


def random_targets(g: torch.Generator, batch: int, k: int, loss: str) -> torch.Tensor:
    """Random targets for :func:`batch_loss_gradient`: standard normal ``(B, k)`` for ``"mse"``,
    uniform random labels in ``0..k-1`` for ``"ce"``."""
    if loss == "mse":
        return torch.randn(batch, k, generator=g, dtype=torch.float64)
    if loss == "ce":
        return torch.randint(0, k, (batch,), generator=g)
    raise ValueError(f"unknown loss {loss!r}: use 'mse' or 'ce'")


def batch_loss_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str
) -> dict[str, torch.Tensor]:
    """``d/dW (1/B) sum_j l(f(x_j; X), y_j)`` for a real loss (``"mse"`` or ``"ce"``)."""
    mods = weight_modules(model)
    return _grads(_loss_terms(model(x), y, loss).mean(), mods)


def per_sample_loss_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str
) -> list[dict[str, torch.Tensor]]:
    """``d l(f(x_j; X), y_j) / dW`` for every sample ``j``, from one forward pass of the batch."""
    mods = weight_modules(model)
    terms = _loss_terms(model(x), y, loss)
    return [_grads(terms[j], mods) for j in range(x.shape[0])]


def check_ranks(
    model: nn.Module,
    draw: Callable[[torch.Generator, int], torch.Tensor],
    *,
    batch: int,
    trials: int,
    seed: int = 0,
    loss: str = "projection",
) -> list[dict]:
    """Measure the largest gradient rank of every weight matrix over ``trials`` random batches
    ``x = draw(generator, batch)``, for one sample's gradient and for the batch gradient, and
    put it next to the bounds: the sharp bound of :func:`rank_bounds` (``bound``) and the plain
    chain-rule bound ``min(M', d_out, d_in)`` (``lemma``).

    ``loss="projection"``: one sample's ``c . f(x_j; X)`` and the weighted sum
    ``sum_j beta_j c . f(x_j; X)`` with random ``beta`` (GP22 Lemma 2's quantity);
    ``loss="mse"`` / ``"ce"``: one sample's loss and the batch-mean loss, on random targets
    (:func:`random_targets`). One row per matrix, with ``M`` (vectors it multiplies per
    sample) and, over all gradients measured, the smallest counted and the largest discarded
    singular value relative to the largest (``kept min``, ``dropped max``; see
    :func:`rank_and_gap`), and the *live* bound: the sharp bound capped by the nonzero rows and
    columns of the gradient (:func:`live_size`; dead ReLU units), largest over the trials
    (``live (1 sample)``, ``live (B=...)``)."""
    g = torch.Generator().manual_seed(seed)
    per, tot, gaps, live = {}, {}, {}, {"1": {}, "B": {}}
    x = draw(g, batch)
    k = model(x).shape[1]
    cap = output_rank(loss, k)
    bound_sample = rank_bounds(model, x, output_rank=cap)
    bound_batch = rank_bounds(model, x, batch_sum=True, output_rank=cap)
    lemma_sample = rank_bounds(model, x, sharp=False)
    lemma_batch = rank_bounds(model, x, batch_sum=True, sharp=False)
    m_per_sample = applications(model, x)
    for _ in range(trials):
        x = draw(g, batch)
        if loss == "projection":
            beta = torch.randn(batch, generator=g, dtype=torch.float64).to(x.dtype)
            one, whole = per_sample_gradients(model, x), weighted_batch_gradient(model, x, beta)
        else:
            y = random_targets(g, batch, k, loss)
            one = per_sample_loss_gradients(model, x, y, loss)
            whole = batch_loss_gradient(model, x, y, loss)
        for grads, store in [(gr, per) for gr in one] + [(whole, tot)]:
            key, bnd = ("1", bound_sample) if store is per else ("B", bound_batch)
            for n, gmat in grads.items():
                r, kept, dropped = rank_and_gap(gmat)
                store[n] = max(store.get(n, 0), r)
                lv = min(bnd[n], *live_size(gmat))
                live[key][n] = max(live[key].get(n, 0), lv)
                lo, hi = gaps.get(n, (math.inf, 0.0))
                gaps[n] = (min(lo, kept) if kept == kept else lo, max(hi, dropped))
    rows = []
    for n, mod in weight_modules(model).items():
        d_out, d_in = as_matrix(mod.weight).shape
        rows.append(
            {
                "layer": n,
                "kind": "conv" if isinstance(mod, nn.Conv2d) else "linear",
                "coupled": couples_batch(model),
                "shape": f"{d_out}x{d_in}",
                "M": m_per_sample[n],
                "lemma (1 sample)": lemma_sample[n],
                "bound (1 sample)": bound_sample[n],
                "rank (1 sample)": per[n],
                f"lemma (B={batch})": lemma_batch[n],
                f"bound (B={batch})": bound_batch[n],
                f"rank (B={batch})": tot[n],
                "live (1 sample)": live["1"][n],
                f"live (B={batch})": live["B"][n],
                "kept min": gaps[n][0],
                "dropped max": gaps[n][1],
            }
        )
    return rows


LOSSES = ("projection", "mse", "ce")
_SHORT = {"projection": "c.f", "mse": "MSE", "ce": "CE"}


def check_losses(
    model: nn.Module,
    draw: Callable[[torch.Generator, int], torch.Tensor],
    *,
    batch: int,
    trials: int,
    seed: int = 0,
    losses=LOSSES,
) -> list[dict]:
    """:func:`check_ranks` for each quantity in ``losses``, in long format: one row per (matrix,
    loss) with keys ``layer, kind`` (``"linear"``/``"conv"``), ``coupled`` (BN in training mode),
    ``shape, M, loss, lemma 1, bound 1, rank 1, lemma B, bound B,
    rank B, live 1, live B`` (``1``: one sample's gradient, ``B``: the batch gradient;
    ``lemma``: the plain chain-rule bound, ``bound``: the sharp one of :func:`rank_bounds`,
    ``live``: the sharp bound capped by the gradient's nonzero rows and columns)."""
    rows = []
    for loss in losses:
        for r in check_ranks(model, draw, batch=batch, trials=trials, seed=seed, loss=loss):
            rows.append(
                {
                    "layer": r["layer"],
                    "kind": r["kind"],
                    "coupled": r["coupled"],
                    "shape": r["shape"],
                    "M": r["M"],
                    "loss": loss,
                    "lemma 1": r["lemma (1 sample)"],
                    "bound 1": r["bound (1 sample)"],
                    "rank 1": r["rank (1 sample)"],
                    "lemma B": r[f"lemma (B={batch})"],
                    "bound B": r[f"bound (B={batch})"],
                    "rank B": r[f"rank (B={batch})"],
                    "live 1": r["live (1 sample)"],
                    "live B": r[f"live (B={batch})"],
                    "kept min": r["kept min"],
                    "dropped max": r["dropped max"],
                }
            )
    return rows


def wide_table(long):
    """The long rows of :func:`check_losses` (a list or DataFrame with an ``architecture``
    column) as one row per matrix: ``M``, the per-sample lemma and sharp bound, the measured
    per-sample rank for each loss, then per loss the batch gradient's sharp bound and rank."""
    import pandas as pd

    df = pd.DataFrame(long)
    key = ["architecture", "layer", "shape", "M"]
    order = list(dict.fromkeys(df["loss"]))
    first = df[df["loss"] == order[0]].set_index(key)
    out = pd.DataFrame(index=first.index)
    out["lemma 1"], out["bound 1"] = first["lemma 1"], first["bound 1"]
    for loss in order:
        sub = df[df["loss"] == loss].set_index(key)
        out[f"rank 1 {_SHORT.get(loss, loss)}"] = sub["rank 1"]
    out["lemma B"] = first["lemma B"]
    for loss in order:
        sub = df[df["loss"] == loss].set_index(key)
        out[f"bound B {_SHORT.get(loss, loss)}"] = sub["bound B"]
        out[f"rank B {_SHORT.get(loss, loss)}"] = sub["rank B"]
    return out.reset_index()


def catalogue_text(long) -> str:
    """The long rows of :func:`check_losses` (with an ``architecture`` column) as plain text,
    one block per architecture: per matrix ``M``, then for one sample (``1:``) the lemma's bound,
    the sharp bound and the measured rank per loss, then for the batch (``B:``) the lemma's bound
    and ``sharp bound/rank`` per loss. At most 80 characters wide."""
    wide = wide_table(long)
    losses = [c[len("rank 1 ") :] for c in wide.columns if c.startswith("rank 1 ")]
    head = (
        f"{'layer':>9} {'shape':>6} {'M':>3} | 1: lem bnd"
        + "".join(f"{l:>4}" for l in losses)
        + " | B: lem"
        + "".join(f"{l:>6}" for l in losses)
    )
    lines = []
    for arch, block in wide.groupby("architecture", sort=False):
        lines.append(arch)
        lines.append(head)
        for _, r in block.iterrows():
            one = "".join(f"{int(r[f'rank 1 {l}']):>4}" for l in losses)
            bat = "".join(
                f"{int(r[f'bound B {l}'])}/{int(r[f'rank B {l}'])}".rjust(6) for l in losses
            )
            lines.append(
                f"{r['layer']:>9} {r['shape']:>6} {int(r['M']):>3} | "
                f"{int(r['lemma 1']):>6}{int(r['bound 1']):>4}{one} | "
                f"{int(r['lemma B']):>6}{bat}"
            )
    return "\n".join(lines)


def batch_sampler(x: torch.Tensor) -> Callable[[torch.Generator, int], torch.Tensor]:
    """``draw(generator, batch)`` for :func:`check_ranks` that picks ``batch`` distinct rows of
    a fixed data set ``x`` (e.g. the training set of a trained model)."""

    def draw(gen: torch.Generator, batch: int) -> torch.Tensor:
        return x[torch.randperm(x.shape[0], generator=gen)[:batch]]

    return draw


class TokenAttention(TinyAttention):
    """One self-attention layer over ``T`` tokens of dimension ``d`` with a *per-token* ReLU
    before the pooling: ``f(X) = head(mean_t relu(o_t))``, ``o_t = sum_s softmax_s(q_t . k_s /
    sqrt(d)) v_s``. Unlike :class:`sgdrank.models.TinyAttention` (same parameters; mean pooling
    straight into a linear head, which sends one and the same ``delta`` to every value vector),
    each token's value gets its own ``delta``, so ``W_v`` reaches its bound ``T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.tokens, self.dim)
        scores = self.Wq(x) @ self.Wk(x).transpose(1, 2) / self.dim**0.5
        o = torch.softmax(scores, dim=-1) @ self.Wv(x)
        return self.head(torch.relu(o).mean(1))

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        return [("Wq", self.Wq), ("Wk", self.Wk), ("Wv", self.Wv)]


class MultiHeadAttention(nn.Module):
    """:class:`TokenAttention` with ``heads`` heads (the transformer's
    :class:`sgdrank.zoo.Attention`, whose ``q``, ``k``, ``v`` are ``d x d`` and split into
    ``heads`` row blocks): ``f(X) = head(mean_t relu(o_t))``. Each head's query deltas lie in the
    span of its own key differences (``T - 1`` dimensions), but the spans of different heads
    add up, so ``W_q``'s per-sample gradient reaches ``T``; the key deltas of every head sum to
    zero over tokens, so ``W_k`` keeps ``T - 1``."""

    def __init__(self, tokens: int, dim: int, out: int, heads: int = 4):
        super().__init__()
        from .zoo import Attention

        self.tokens, self.dim = tokens, dim
        self.attn = Attention(dim, heads)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.attn(x.reshape(x.shape[0], self.tokens, self.dim))
        return self.head(torch.relu(o).mean(1))

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        return [("Wq", self.attn.q), ("Wk", self.attn.k), ("Wv", self.attn.v)]


def train_briefly(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    *,
    steps: int,
    batch: int,
    lr: float,
    lam: float,
    seed: int = 0,
) -> list[float]:
    """Plain mini-batch SGD with weight decay on ``(x, y)``: each step draws ``batch`` samples
    without replacement (seeded) and moves every parameter by ``-lr * grad`` of
    ``mean_j l(f(x_j), y_j) + lam * sum ||W||_F^2`` over the weight matrices of
    :func:`weight_modules` (the book's convention: the step multiplies ``W`` by
    ``1 - 2 lr lam``). Returns the batch loss of every step. The model is left in its mode."""
    g = torch.Generator().manual_seed(seed)
    mats = {id(m.weight) for m in weight_modules(model).values()}
    params = [p for p in model.parameters() if p.requires_grad]
    hist = []
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=g)[:batch]
        data = _loss_terms(model(x[idx]), y[idx], loss).mean()
        reg = sum(p.pow(2).sum() for p in params if id(p) in mats)
        grads = torch.autograd.grad(data + lam * reg, params)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p.sub_(lr * gr)
        hist.append(float(data.detach()))
    return hist


def random_architecture(
    g: torch.Generator,
) -> tuple[str, nn.Module, Callable[[torch.Generator, int], torch.Tensor]]:
    """Draw a random small architecture (float64) and an input sampler for it.

    Families: MLP (random depth 1-4 and per-layer widths 2-12), ResMLP, either with or without
    BN (detached variance or not), ReLU or GELU, bias on or off; and ConvNets with 1-3 layers of
    random channels, kernel 1-4, stride 1-2, padding 0-2 on inputs of 1-3 channels and side 5-9.
    Returns a short description, the model (in train mode) and ``draw(generator, batch)``."""
    from .models import ConvNet, MLP, ResMLP

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    kind = ["mlp", "res", "conv"][ri(0, 2)]
    bias = bool(ri(0, 1))
    act = ["relu", "gelu"][ri(0, 1)] if kind != "conv" else "relu"
    seed = ri(0, 2**31 - 1)
    torch.manual_seed(seed)
    if kind == "conv":
        c, side = ri(1, 3), ri(5, 9)
        layers, hw = [], (side, side)
        for _ in range(ri(1, 3)):
            k, s, p = ri(1, 4), ri(1, 2), ri(0, 2)
            p = min(p, k - 1)
            new = ((hw[0] - k + 2 * p) // s + 1, (hw[1] - k + 2 * p) // s + 1)
            if min(new) < 1:
                break
            cout = ri(2, 24)
            layers.append((cout, k, s, p))
            hw = new
        if not layers:
            layers = [(ri(2, 24), 1, 1, 0)]
        model = ConvNet((c, side, side), ri(1, 4), layers, bias=bias)
        desc = f"conv {c}x{side}x{side} " + " ".join(
            f"[c{a} k{b} s{d} p{e}]" for a, b, d, e in layers
        )
        dim = c * side * side
    else:
        depth, d_in, k = ri(1, 4), ri(2, 12), ri(1, 4)
        bn = bool(ri(0, 1))
        detach = bool(ri(0, 1)) if bn else False
        if kind == "mlp":
            widths = [ri(2, 12) for _ in range(depth)]
            model = MLP(d_in, k, depth, widths, bn=bn, bias=bias, detach_var=detach, activation=act)
            desc = f"MLP{'-BN' if bn else ''} {d_in}-{'-'.join(map(str, widths))}-{k}"
        else:
            width = ri(2, 12)
            model = ResMLP(
                d_in, k, depth, width, bn=bn, bias=bias, detach_var=detach, activation=act
            )
            desc = f"RES{'-BN' if bn else ''}-{depth}-{width} in {d_in} out {k}"
        if bn:
            desc += " detached-var" if detach else " full BN"
        desc += f" {act}"
        dim = d_in
    desc += "" if bias else " no-bias"
    model = model.double().train()

    def draw(gen: torch.Generator, batch: int) -> torch.Tensor:
        return torch.randn(batch, dim, generator=gen, dtype=torch.float64)

    return desc, model, draw


def linearity_residual(
    model: nn.Module, x: torch.Tensor, layer: nn.Module, ts, seed: int = 0
) -> list[float]:
    """``|f(W + t E) - f(W) - t <grad_W f, E>|`` for a random direction ``E`` (``||E||_F =
    ||W||_F``)
    of ``layer.weight``, one sample ``x`` (``(1, ...)``), scalar output summed. Zero to rounding
    while the activation pattern stays fixed (ReLU: f is linear in each layer there); of order
    ``t^2`` for a smooth activation."""
    g = torch.Generator().manual_seed(seed)
    w = layer.weight
    e = torch.randn(w.shape, generator=g, dtype=w.dtype)
    e = e * (w.detach().norm() / e.norm())
    f0 = model(x).sum()
    (grad,) = torch.autograd.grad(f0, w)
    lin = float((grad * e).sum())
    out = []
    w0 = w.detach().clone()
    with torch.no_grad():
        for t in ts:
            w.copy_(w0 + t * e)
            out.append(abs(float(model(x).sum()) - float(f0) - t * lin))
        w.copy_(w0)
    return out


def pattern_flips(
    deltas,
    draws: int,
    *,
    in_dim: int = 10,
    width: int = 32,
    depth: int = 3,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Per draw and ``delta``: does the ReLU activation pattern of a random (network, input)
    draw change when every hidden weight matrix is perturbed by a random ``E_l`` with
    ``||E_l||_F = delta ||W_l||_F``? A ``(draws, len(deltas))`` boolean array; each draw uses
    one network, input and direction for every ``delta``."""
    from .models import MLP

    g = torch.Generator().manual_seed(seed)
    flips = np.zeros((draws, len(deltas)), dtype=bool)
    it = range(draws)
    if progress:
        from .progress import progress as bar

        it = bar(it, desc="pattern draws")
    for i in it:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        model = MLP(in_dim, 1, depth, width).double()
        x = torch.randn(1, in_dim, generator=g, dtype=torch.float64)
        p0 = activation_pattern(model, x)
        w0 = [l.weight.detach().clone() for l in model.layers]
        es = [torch.randn(w.shape, generator=g, dtype=w.dtype) for w in w0]
        es = [e * (w.norm() / e.norm()) for e, w in zip(es, w0)]
        with torch.no_grad():
            for k, delta in enumerate(deltas):
                for l, w, e in zip(model.layers, w0, es):
                    l.weight.copy_(w + delta * e)
                flips[i, k] = not torch.equal(activation_pattern(model, x), p0)
    return flips


def pattern_flip_rate(
    deltas,
    draws: int,
    *,
    in_dim: int = 10,
    width: int = 32,
    depth: int = 3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Fraction of the :func:`pattern_flips` draws whose pattern changes, per ``delta``.

    WD2L Lemma 2.1 says the pattern is locally constant off a null set, so the fraction should
    vanish as ``delta -> 0`` (linearly: the pre-activations have a bounded density near 0)."""
    flips = pattern_flips(
        deltas, draws, in_dim=in_dim, width=width, depth=depth, seed=seed, progress=progress
    )
    return [float(f) for f in flips.mean(0)]


def flip_slope(
    deltas,
    flips: np.ndarray,
    *,
    min_count: int = 10,
    max_delta: float = 1e-2,
    boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Log-log slope of P(pattern flips) over ``delta`` with a 95% bootstrap interval.

    The fit uses the ``delta <= max_delta`` where at least ``min_count`` draws flipped (fixed on
    the full sample); the bootstrap resamples whole draws (each draw is shared by every
    ``delta``). Returns ``slope``, ``lo``, ``hi``, ``n_deltas``, ``window`` (the deltas used)."""
    deltas = np.asarray(deltas, float)
    flips = np.asarray(flips, bool)
    use = (flips.sum(0) >= min_count) & (deltas <= max_delta)
    out = {
        "slope": float("nan"),
        "lo": float("nan"),
        "hi": float("nan"),
        "n_deltas": int(use.sum()),
        "window": deltas[use],
    }
    if use.sum() < 2:
        return out
    lx = np.log10(deltas[use])

    def fit(rows):
        p = rows[:, use].mean(0)
        return np.polyfit(lx, np.log10(np.maximum(p, 0.5 / len(rows))), 1)[0]

    rng = np.random.default_rng(seed)
    n = len(flips)
    bs = [fit(flips[rng.integers(0, n, n)]) for _ in range(boot)]
    out.update(
        slope=float(fit(flips)), lo=float(np.percentile(bs, 2.5)), hi=float(np.percentile(bs, 97.5))
    )
    return out


def trained_checks(
    build: Callable[[], nn.Module],
    dim: int,
    *,
    seed: int,
    steps: int,
    n: int = 48,
    k: int = 3,
    batch: int = 6,
    lr: float = 0.1,
    lam: float = 1e-3,
    trials: int = 5,
    check: bool = True,
) -> tuple[list[dict], list[dict], dict]:
    """The rank checks of :func:`check_losses` at initialisation and after training.

    ``build()`` makes the model (seeded here with ``seed``, float64); it is trained with
    :func:`train_briefly` (cross-entropy, ``steps`` steps of batch ``batch``) on ``n`` standard
    normal inputs of size ``dim`` with uniformly random labels in ``0..k-1`` (data seed
    ``100 + seed``), and checked on batches of that training set. Returns the check rows (with
    ``when`` = ``"init"`` / ``"trained"``), one row per rank-tracked weight matrix with its
    threshold rank (``||W||_F``-relative ``atol = 1e-3``) and stable rank at init and trained,
    and the mean batch loss of the first and last 20 steps. Each weight row also carries the
    decomposition ``W_T = c W_0 + DeltaW`` (:mod:`sgdrank.decomposition`): ``lam``, ``c``,
    ``D`` (= ``-ln c``), ``Dstar`` (the decay budget at ``eps = 1e-3``), ``dW stable`` and
    ``dW share`` (``||DeltaW||_F / ||W_T||_F``). ``check=False`` skips the gradient checks
    (the first list is then empty): training and the weight rows only."""
    from .decomposition import decay_factor, parts
    torch.manual_seed(seed)
    model = build().double()
    g = torch.Generator().manual_seed(100 + seed)
    x, y = (
        torch.randn(n, dim, generator=g, dtype=torch.float64),
        torch.randint(0, k, (n,), generator=g),
    )

    def weight_ranks():
        out = {}
        for name, w in rank_matrices(model).items():
            s = singular_values(w)
            out[name] = (int(threshold_rank(s)), float(stable_rank(s)))
        return out

    checks, before, hist = [], weight_ranks(), []
    w0 = {name: w.clone() for name, w in rank_matrices(model).items()}
    for when in ("init", "trained"):
        if when == "trained":
            hist = train_briefly(
                model, x, y, "ce", steps=steps, batch=batch, lr=lr, lam=lam, seed=seed
            )
        if not check:
            continue
        for r in check_losses(model, batch_sampler(x), batch=batch, trials=trials, seed=seed):
            checks.append({"seed": seed, "when": when, **r})
    after = weight_ranks()
    c = decay_factor([lr] * steps, lam)
    dec = {name: parts(w, w0[name], c, eps=(1e-3,)) for name, w in rank_matrices(model).items()}
    weights = [
        {
            "layer": name,
            "seed": seed,
            "rank init": r0,
            "rank trained": after[name][0],
            "stable init": s0,
            "stable trained": after[name][1],
            "lam": lam,
            "c": c,
            "D": -math.log(c),
            "Dstar": dec[name]["Dstar@0.001"],
            "dW stable": dec[name]["dW_srank"],
            "dW share": dec[name]["dW_share"],
        }
        for name, (r0, s0) in before.items()
    ]
    m = min(20, len(hist))
    loss = {"seed": seed, "first": sum(hist[:m]) / max(m, 1), "last": sum(hist[-m:]) / max(m, 1)}
    return checks, weights, loss
