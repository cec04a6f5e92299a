"""The architectures of the papers, working and small enough to train on a CPU.

Naming follows GSGP/GP22:

- ``MLP-L-H``:    L hidden layers ``x -> relu(W_l x + b_l)`` of width H, then a linear classifier.
- ``MLP-BN-L-H``: the same with batch normalisation before each ReLU: ``relu(bn(W_l x))``.
- ``RES-BN-L-H``: a linear stem to width H, then L residual blocks
  ``z -> z + relu(bn2(W2 relu(bn1(W1 z))))``, then a linear classifier (``RES-L-H``: no BN).
- ``CONV-L-C``:   L 3x3 convolutions with C channels (stride 1, padding 1) and ReLU, then a
  linear classifier; :class:`ConvNet` takes arbitrary (channels, kernel, stride, padding).

Every model lists the matrices whose rank the book tracks in :meth:`rank_layers` (all hidden
linear / conv layers; the final classifier is excluded, as in the papers' code) and the
classifier in ``model.head``.

Batch normalisation is :class:`BatchNorm`, which can *detach the variance* as GP22 defines it:
in training mode ``bn(z) = gamma * A (z - mean_batch(z)) + beta`` with
``A = diag(1/sqrt(var_batch(z) + eps))`` treated as a constant by backpropagation (stop-grad),
while the mean is differentiated through.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "identity": lambda z: z}


def _activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}: choose one of "
                         f"{sorted(ACTIVATIONS)}") from None


class BatchNorm(nn.Module):
    """Batch normalisation over dim 0 of a ``(B, H)`` tensor, optionally with detached variance.

    Training mode: ``y = gamma * (z - mu_B) / sqrt(var_B + eps) + beta`` with the biased batch
    variance ``var_B``; with ``detach_var=True`` the factor ``1/sqrt(var_B + eps)`` is a
    constant for autograd (GP22, eq. 5). Running statistics are updated as in PyTorch
    (``momentum`` 0.1, unbiased running variance) and used in eval mode.
    """

    def __init__(self, num_features: int, *, detach_var: bool = False, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True):
        super().__init__()
        self.num_features, self.detach_var = num_features, detach_var
        self.eps, self.momentum = eps, momentum
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = z.mean(0)
            var = z.var(0, unbiased=False)
            with torch.no_grad():
                n = z.shape[0]
                unbiased = var * (n / max(n - 1, 1))
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
            inv_std = torch.rsqrt(var + self.eps)
            if self.detach_var:
                inv_std = inv_std.detach()
            y = (z - mean) * inv_std
        else:
            y = (z - self.running_mean) * torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, detach_var={self.detach_var}"


class MLP(nn.Module):
    """``MLP-L-H`` / ``MLP-BN-L-H``: ``depth`` hidden layers of width ``width`` (an int, or one
    width per layer), then a linear ``head``."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, width: int | Sequence[int], *,
                 bn: bool = False, bias: bool = True, detach_var: bool = False,
                 activation: str = "relu"):
        super().__init__()
        widths = [width] * depth if isinstance(width, int) else list(width)
        if depth < 1 or len(widths) != depth or min(widths) < 1:
            raise ValueError(f"MLP needs depth >= 1 and positive widths, got depth={depth}, "
                             f"width={width}")
        self.act = _activation(activation)
        dims = [in_dim] + widths
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(
            BatchNorm(w, detach_var=detach_var) if bn else nn.Identity() for w in widths
        )
        self.head = nn.Linear(widths[-1], out_dim, bias=bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for lin, norm in zip(self.layers, self.norms):
            x = self.act(norm(lin(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"W{i + 1}", lin) for i, lin in enumerate(self.layers)]


class ResMLP(nn.Module):
    """``RES-BN-L-H`` (``bn=True``) / ``RES-L-H``: stem ``Linear(in, H)``, ``depth`` blocks
    ``z + act(n2(W2 act(n1(W1 z))))``, then ``head``. (The authors' published version of this
    model did not run; this one follows the papers' formula.)"""

    def __init__(self, in_dim: int, out_dim: int, depth: int, width: int, *, bn: bool = True,
                 bias: bool = True, detach_var: bool = False, activation: str = "relu"):
        super().__init__()
        self.act = _activation(activation)
        self.stem = nn.Linear(in_dim, width, bias=bias)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.W1 = nn.Linear(width, width, bias=bias)
            blk.W2 = nn.Linear(width, width, bias=bias)
            blk.n1 = BatchNorm(width, detach_var=detach_var) if bn else nn.Identity()
            blk.n2 = BatchNorm(width, detach_var=detach_var) if bn else nn.Identity()
            self.blocks.append(blk)
        self.head = nn.Linear(width, out_dim, bias=bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        z = self.stem(x.flatten(1))
        for b in self.blocks:
            z = z + self.act(b.n2(b.W2(self.act(b.n1(b.W1(z))))))
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        out = [("stem", self.stem)]
        for i, b in enumerate(self.blocks):
            out += [(f"block{i + 1}.W1", b.W1), (f"block{i + 1}.W2", b.W2)]
        return out


def conv_output_hw(hw: tuple[int, int], kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """Spatial output size of a convolution: ``floor((h - k + 2p) / s) + 1`` per axis."""
    return tuple((n - kernel + 2 * padding) // stride + 1 for n in hw)  # type: ignore[return-value]


class ConvNet(nn.Module):
    """A small ReLU conv net: convolutions ``(c_out, kernel, stride, padding)``, each followed by
    ReLU, then flatten and a linear ``head``. ``patches()`` gives each conv layer's number of
    input patches N (= output height x output width), the bound of GSGP Lemma 3.1."""

    def __init__(self, in_shape: Sequence[int], out_dim: int,
                 convs: Sequence[tuple[int, int, int, int]], *, bias: bool = True,
                 activation: str = "relu"):
        super().__init__()
        c, h, w = in_shape
        self.in_shape = (c, h, w)
        self.act = _activation(activation)
        self.convs = nn.ModuleList()
        self._patches = []
        hw = (h, w)
        for c_out, k, s, p in convs:
            self.convs.append(nn.Conv2d(c, c_out, k, stride=s, padding=p, bias=bias))
            hw = conv_output_hw(hw, k, s, p)
            if min(hw) < 1:
                raise ValueError(f"conv stack {list(convs)} shrinks a {in_shape} input to nothing")
            self._patches.append(hw[0] * hw[1])
            c = c_out
        self.head = nn.Linear(c * hw[0] * hw[1], out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        for conv in self.convs:
            x = self.act(conv(x))
        return self.head(x.flatten(1))

    def patches(self) -> list[int]:
        return list(self._patches)

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"conv{i + 1}", conv) for i, conv in enumerate(self.convs)]


class TiedMLP(nn.Module):
    """A weight used twice: ``f(x) = head(act(W act(W U x)))`` with one square ``W`` (d x d).

    A counterexample for the rank-one lemma: ``W`` multiplies two vectors per sample, so the
    per-sample gradient has rank <= 2."""

    def __init__(self, in_dim: int, out_dim: int, width: int, *, bias: bool = False,
                 activation: str = "relu"):
        super().__init__()
        self.act = _activation(activation)
        self.inp = nn.Linear(in_dim, width, bias=bias)
        self.W = nn.Linear(width, width, bias=bias)
        self.head = nn.Linear(width, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.act(self.inp(x.flatten(1)))
        return self.head(self.act(self.W(self.act(self.W(z)))))

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        return [("inp", self.inp), ("W (tied)", self.W)]


class TinyAttention(nn.Module):
    """One self-attention layer over ``T`` tokens of dimension ``d``, mean-pooled, then a head:
    ``f(X) = head(mean_t softmax(Q K^T / sqrt(d)) V)`` with ``Q = X Wq^T``, ``K = X Wk^T``,
    ``V = X Wv^T``. Each of Wq, Wk, Wv multiplies T token vectors per sample: per-sample
    gradient rank <= T, and the softmax makes f non-piecewise-linear in Wq, Wk."""

    def __init__(self, tokens: int, dim: int, out_dim: int, *, bias: bool = False):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.Wq = nn.Linear(dim, dim, bias=bias)
        self.Wk = nn.Linear(dim, dim, bias=bias)
        self.Wv = nn.Linear(dim, dim, bias=bias)
        self.head = nn.Linear(dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.tokens, self.dim)
        att = torch.softmax(self.Wq(x) @ self.Wk(x).transpose(1, 2) / math.sqrt(self.dim), dim=-1)
        return self.head((att @ self.Wv(x)).mean(1))

    def rank_layers(self) -> list[tuple[str, nn.Module]]:
        return [("Wq", self.Wq), ("Wk", self.Wk), ("Wv", self.Wv)]


FAMILIES = ("MLP-L-H", "MLP-BN-L-H", "RES-L-H", "RES-BN-L-H", "CONV-L-C")
_SPEC = re.compile(r"^(MLP|RES|CONV)(-BN)?-(\d+)-(\d+)$")


def build_model(spec: str, in_shape: int | Sequence[int], out_dim: int, *, bias: bool = True,
                detach_var: bool = False, activation: str = "relu",
                seed: int | None = None) -> nn.Module:
    """Build a model from its name, e.g. ``build_model("MLP-BN-10-100", 784, 10)``.

    ``in_shape`` is the flattened input size for MLP/RES, or ``(c, h, w)`` for ``CONV``
    (an int ``d`` is read as a square single-channel image when it is a perfect square).
    ``seed`` seeds the initialisation (PyTorch's default init) without touching global RNG state.
    The GSGP architectures of :mod:`sgdrank.zoo` (``VGG16-BN``, ``RESNET18``, ``VIT``) are built
    by name too, for image inputs ``(c, h, w)``.
    """
    m = _SPEC.match(spec.strip().upper())
    if not m:
        from . import zoo

        if zoo.is_zoo(spec):
            return zoo.build(spec, _image_shape(in_shape), out_dim, seed=seed)
        raise ValueError(f"unknown model {spec!r}: use one of {', '.join(FAMILIES)} "
                         "(e.g. 'MLP-BN-10-100') "
                         f"or, for CIFAR-sized images, one of {', '.join(zoo.ZOO)}")
    family, bn, depth, width = m.group(1), bool(m.group(2)), int(m.group(3)), int(m.group(4))
    if family == "CONV" and bn:
        raise ValueError("CONV-BN is not a model of this book; use CONV-L-C")
    fork = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        if family == "MLP":
            return MLP(_flat(in_shape), out_dim, depth, width, bn=bn, bias=bias,
                       detach_var=detach_var, activation=activation)
        if family == "RES":
            return ResMLP(_flat(in_shape), out_dim, depth, width, bn=bn, bias=bias,
                          detach_var=detach_var, activation=activation)
        shape = _image_shape(in_shape)
        return ConvNet(shape, out_dim, [(width, 3, 1, 1)] * depth, bias=bias, activation=activation)


def _flat(in_shape) -> int:
    return int(in_shape) if isinstance(in_shape, int) else int(math.prod(in_shape))


def _image_shape(in_shape) -> tuple[int, int, int]:
    if isinstance(in_shape, int):
        side = math.isqrt(in_shape)
        if side * side != in_shape:
            raise ValueError(f"cannot read input size {in_shape} as a square image; pass (c, h, w)")
        return (1, side, side)
    if len(in_shape) == 2:
        return (1, *in_shape)
    return tuple(in_shape)  # type: ignore[return-value]
