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

from typing import Callable, Mapping

import torch
import torch.nn as nn

from .metrics import as_matrix, numerical_rank, singular_values


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
        isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm)) and m.training for m in model.modules()
    )


def rank_bounds(model: nn.Module, x: torch.Tensor, *, batch_sum: bool = False) -> dict[str, int]:
    """The chain-rule bound ``min(M, d_out, d_in)`` for each weight matrix, where ``M`` is the
    per-sample count of :func:`applications`, times the batch size when the quantity is a
    batch sum (``batch_sum=True``) or when the model couples samples (BN in training mode)."""
    per_sample = applications(model, x)
    factor = x.shape[0] if (batch_sum or couples_batch(model)) else 1
    out = {}
    for name, mod in weight_modules(model).items():
        d_out, d_in = as_matrix(mod.weight).shape
        out[name] = min(per_sample[name] * factor, d_out, d_in)
    return out


def _grads(scalar: torch.Tensor, mods: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    params = [m.weight for m in mods.values()]
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return {
        n: as_matrix(g if g is not None else torch.zeros_like(p)).detach()
        for n, g, p in zip(mods, grads, params)
    }


def per_sample_gradients(model: nn.Module, x: torch.Tensor, direction: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """``d (c . f(x_j; X)) / dW`` for every sample ``j`` of the batch ``X = x`` and every weight
    matrix (conv filters reshaped). ``c`` (``direction``, shape ``(k,)``) projects a vector
    output to a scalar; default: a fixed random unit vector. One forward pass of the whole batch,
    so batch-coupled models (BN in train mode) are differentiated as they train."""
    mods = weight_modules(model)
    out = model(x)
    c = direction if direction is not None else _unit(out.shape[1], out.dtype)
    proj = out @ c
    return [_grads(proj[j], mods) for j in range(x.shape[0])]


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy) -> dict[str, torch.Tensor]:
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


def ranks(grads: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Exact (float64, LAPACK-tolerance) rank of each gradient matrix."""
    return {n: numerical_rank(g) for n, g in grads.items()}


def max_ranks(grad_list: list[Mapping[str, torch.Tensor]]) -> dict[str, int]:
    """Layer-wise maximum rank over a list of gradient dicts."""
    out: dict[str, int] = {}
    for g in grad_list:
        for n, r in ranks(g).items():
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
        mods = [n if not isinstance(n, nn.Identity) else l for n, l in zip(model.norms, model.layers)]
    elif isinstance(model, ResMLP):
        mods = []
        for b in model.blocks:
            mods += [b.n1 if not isinstance(b.n1, nn.Identity) else b.W1,
                     b.n2 if not isinstance(b.n2, nn.Identity) else b.W2]
    else:
        raise TypeError(f"preactivations: MLP or ResMLP expected, got {type(model).__name__}")
    _forward_with_hooks(model, x, {m: (lambda mod, i, o: found.append(o.detach())) for m in mods})
    return found


def activation_pattern(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ReLU pattern ``1[u > 0]`` of every pre-activation, concatenated: ``(B, total units)`` bool."""
    return torch.cat([u > 0 for u in preactivations(model, x)], dim=1)


def pattern_margin(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per sample, the smallest ``|u|`` over all pre-activations: how far the pattern is from
    changing (``(B,)``)."""
    return torch.cat([u.abs() for u in preactivations(model, x)], dim=1).min(dim=1).values


# --- verification harness ---------------------------------------------------------------------

def weighted_batch_gradient(model: nn.Module, x: torch.Tensor, beta: torch.Tensor,
                            direction: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """GP22 Lemma 2's quantity: ``d/dW sum_j beta_j c . f(x_j; X)`` for the batch ``X = x``
    (any loss gradient over the batch is of this form, with ``beta_j c = dl/df(x_j) / B``)."""
    mods = weight_modules(model)
    out = model(x)
    c = direction if direction is not None else _unit(out.shape[1], out.dtype)
    return _grads((out @ c) @ beta, mods)


def check_ranks(model: nn.Module, draw: Callable[[torch.Generator, int], torch.Tensor], *,
                batch: int, trials: int, seed: int = 0) -> list[dict]:
    """Measure the largest gradient rank of every weight matrix over ``trials`` random batches
    ``x = draw(generator, batch)``, for the per-sample gradient of ``c . f(x_j; X)`` and for the
    weighted batch sum with random ``beta``; return one row per matrix with ``M`` (vectors it
    multiplies per sample) and, for both quantities, the chain-rule bound next to the measured
    maximum rank."""
    g = torch.Generator().manual_seed(seed)
    per, tot = {}, {}
    x = draw(g, batch)
    bound_sample = rank_bounds(model, x)
    bound_batch = rank_bounds(model, x, batch_sum=True)
    m_per_sample = applications(model, x)
    for _ in range(trials):
        x = draw(g, batch)
        beta = torch.randn(batch, generator=g, dtype=torch.float64).to(x.dtype)
        for n, r in max_ranks(per_sample_gradients(model, x)).items():
            per[n] = max(per.get(n, 0), r)
        for n, r in ranks(weighted_batch_gradient(model, x, beta)).items():
            tot[n] = max(tot.get(n, 0), r)
    rows = []
    for n, mod in weight_modules(model).items():
        d_out, d_in = as_matrix(mod.weight).shape
        rows.append({"layer": n, "shape": f"{d_out}x{d_in}", "M": m_per_sample[n],
                     "bound (1 sample)": bound_sample[n], "rank (1 sample)": per[n],
                     f"bound (B={batch})": bound_batch[n], f"rank (B={batch})": tot[n]})
    return rows


def random_architecture(g: torch.Generator) -> tuple[str, nn.Module, Callable[[torch.Generator, int], torch.Tensor]]:
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
        layers, hw, cin = [], (side, side), c
        for _ in range(ri(1, 3)):
            k, s, p = ri(1, 4), ri(1, 2), ri(0, 2)
            p = min(p, k - 1)
            new = ((hw[0] - k + 2 * p) // s + 1, (hw[1] - k + 2 * p) // s + 1)
            if min(new) < 1:
                break
            cout = ri(2, 24)
            layers.append((cout, k, s, p))
            hw, cin = new, cout
        if not layers:
            layers = [(ri(2, 24), 1, 1, 0)]
        model = ConvNet((c, side, side), ri(1, 4), layers, bias=bias)
        desc = f"conv {c}x{side}x{side} " + " ".join(f"[c{a} k{b} s{d} p{e}]" for a, b, d, e in layers)
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
            model = ResMLP(d_in, k, depth, width, bn=bn, bias=bias, detach_var=detach, activation=act)
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


def linearity_residual(model: nn.Module, x: torch.Tensor, layer: nn.Module, ts, seed: int = 0) -> list[float]:
    """``|f(W + t E) - f(W) - t <grad_W f, E>|`` for a random direction ``E`` (``||E||_F = ||W||_F``)
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


def pattern_flip_rate(deltas, draws: int, *, in_dim: int = 10, width: int = 32, depth: int = 3,
                      seed: int = 0, progress: bool = False) -> list[float]:
    """Fraction of random (network, input) draws whose ReLU activation pattern changes when every
    hidden weight matrix is perturbed by a random ``E_l`` with ``||E_l||_F = delta ||W_l||_F``.

    WD2L Lemma 2.1 says the pattern is locally constant off a null set, so the fraction should
    vanish as ``delta -> 0`` (linearly: the pre-activations have a bounded density near 0)."""
    from .models import MLP

    g = torch.Generator().manual_seed(seed)
    flips = [0] * len(deltas)
    it = range(draws)
    if progress:
        from .progress import progress as bar
        it = bar(it, desc="pattern draws")
    for _ in it:
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
                flips[k] += int(not torch.equal(activation_pattern(model, x), p0))
    return [f / draws for f in flips]
