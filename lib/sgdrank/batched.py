"""K networks of one architecture as one computation: hand-batched weights, forward and backward.

:class:`BatchedNet` holds K copies ("runs") of one of the book's fully connected models
(``MLP-L-H``, ``MLP-BN-L-H``, ``RES-L-H``, ``RES-BN-L-H``; see :mod:`sgdrank.models` for the exact
forward) and trains them in lock-step: each run sees its own mini-batch, so a step is one batched
matrix product per layer, and the gradients come from a hand-written backward pass (no autograd
graph), so the number of tensor operations per step does not depend on K.

Layouts. Activations are kept *feature-major*, ``(K, H, B)`` (run, unit, sample): a linear layer
is ``Z = W H + b`` (``bmm`` of ``(K, d_out, d_in)`` by ``(K, d_in, B)``), and batch
normalisation of all runs is one ``native_batch_norm`` on ``(1, K*H, B)`` (``K*H`` channels).
The weight matrices of all runs live in one flat tensor ``mat`` of contiguous ``(K, d_out, d_in)``
blocks, one per matrix (contiguous, so the in-place batched update ``W <- s W + A B^T`` runs as
one strided-batch GEMM instead of a loop over runs), the vectors (biases, BN ``gamma``/``beta``)
in one flat tensor ``vec`` of contiguous ``(K, len)`` blocks; gradients and momentum buffers
share these layouts, and the SGD step uses per-run coefficients (learning rate, weight decay,
momentum). ``P[name]`` / ``G[name]`` are
views by ``state_dict`` name; BN running statistics are ``(K, H)`` tensors ``S[name]``.

Conventions (identical to :mod:`sgdrank.models` + ``torch.optim.SGD``):

- linear layer ``z = h W^T + b``; ``W`` is ``(d_out, d_in)``;
- BN in training mode: ``y = gamma * (z - mean_B z) / sqrt(var_B z + eps) + beta`` (biased batch
  variance; ``detach_var`` treats ``1/sqrt(var_B + eps)`` as a constant in the backward pass);
  running statistics ``r <- (1 - 0.1) r + 0.1 * stat`` with the unbiased batch variance; eval mode
  uses the running statistics;
- losses, per run: ``"ce"`` = mean over the batch of cross-entropy; ``"mse"`` = mean over batch
  and output coordinates of ``(f(x) - t)^2`` with ``t`` the one-hot label (or the real target);
- SGD step (PyTorch's order of operations, ``torch.optim.SGD`` with ``weight_decay = 2 lam`` on
  the decayed elements): ``d = g + 2 lam p``; with momentum ``m``: ``v <- m v + d`` (``v_0 = 0``),
  ``p <- p - lr v``; without: ``p <- p - lr d = (1 - 2 lr lam) p - lr g``.

Nothing here synchronises with the host: losses and accuracies are accumulated on the device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import models

SUPPORTED = ("MLP-L-H", "MLP-BN-L-H", "RES-L-H", "RES-BN-L-H")
_SPEC = re.compile(r"^(MLP|RES|CONV)(-BN)?-(\d+)-(\d+)$")
_ACTS = ("relu", "identity", "tanh")
BN_EPS = 1e-5
DTYPE = torch.float32  # training precision, whatever torch.get_default_dtype() says
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class Arch:
    """What fixes the computation: the model name and the options of :func:`models.build_model`."""
    model: str
    in_shape: tuple
    out_dim: int
    bias: bool = True
    detach_var: bool = False
    activation: str = "relu"

    def parse(self) -> tuple[str, bool, int, int]:
        """``(family, bn, depth, width)``; the zoo's VGG16-BN / RESNET18 / VIT parse as
        ``("ZOO", True, 0, 0)`` (trained one at a time by the loop engine)."""
        m = _SPEC.match(self.model.strip().upper())
        if not m:
            from . import zoo

            if zoo.is_zoo(self.model):
                zoo.parse_spec(self.model)  # raises for unknown options
                return "ZOO", True, 0, 0
            raise ValueError(f"unknown model {self.model!r}: use one of "
                             f"{', '.join(models.FAMILIES)} "
                             f"or {', '.join(zoo.ZOO)}")
        return m.group(1), bool(m.group(2)), int(m.group(3)), int(m.group(4))

    @property
    def in_dim(self) -> int:
        return _prod(self.in_shape)

    def build(self, seed: int | None = None) -> nn.Module:
        """The reference ``nn.Module`` (PyTorch's default init, seeded by ``seed``)."""
        shape = self.in_shape if self.parse()[0] in ("CONV", "ZOO") else self.in_dim
        return models.build_model(self.model, shape, self.out_dim, bias=self.bias,
                                  detach_var=self.detach_var, activation=self.activation, seed=seed)


def supported(arch: Arch) -> bool:
    """True when :class:`BatchedNet` can train ``arch`` (MLP / RES families, relu/identity/tanh)."""
    return arch.parse()[0] in ("MLP", "RES") and arch.activation in _ACTS


# --------------------------------------------------------------------------------------------
# BatchedNet is assembled from four parts, each doing one thing:
#   _Storage    where the numbers live: flat parameter / gradient blocks, views, checkpoints
#   _Optimiser  the per-run SGD step (coefficients, momentum buffers, the fused update)
#   _Training   one training step: forward with saved activations, loss gradient, backward
#   _Evaluation eval-mode logits and loss with BN folded into the linear layers
# and two plain helpers: _Activation (forward/backward of the nonlinearity) and forward_plan
# (the units of the forward pass, as views into the storage).
# --------------------------------------------------------------------------------------------


class _Activation:
    """The nonlinearity of the hidden units: in-place forward, backward from the output."""

    def __init__(self, name: str):
        self.name = name

    def fwd_(self, a):
        """The activation, in place on ``a``."""
        if self.name == "relu":
            return torch.relu_(a)
        if self.name == "tanh":
            return torch.tanh_(a)
        return a

    def bwd(self, dh, h):
        """Gradient w.r.t. the pre-activation, from the gradient ``dh`` w.r.t. the output ``h``."""
        if self.name == "relu":
            return torch.ops.aten.threshold_backward(dh, h, 0)
        if self.name == "tanh":
            return torch.ops.aten.tanh_backward(dh, h)
        return dh


def _unit_spec(family: str, bn: bool, depth: int) -> list[tuple]:
    """``(linear, norm or None, activation?, residual tag)`` per unit of the forward pass:
    ``"open"`` saves the stream before the unit, ``"close"`` adds it after."""
    if family == "MLP":
        return [(f"layers.{i}", f"norms.{i}" if bn else None, True, None) for i in range(depth)]
    spec = [("stem", None, False, None)]
    for i in range(depth):
        spec.append((f"blocks.{i}.W1", f"blocks.{i}.n1" if bn else None, True, "open"))
        spec.append((f"blocks.{i}.W2", f"blocks.{i}.n2" if bn else None, True, "close"))
    return spec


def forward_plan(family: str, bn: bool, depth: int, P: dict, G: dict, S: dict,
                 shapes: dict) -> tuple[list[dict], dict]:
    """The forward as a list of units (linear (+ BN) (+ activation), with residual tags), each a
    dict of views into the storage ``P`` / ``G`` / ``S``, and the head (``W``, ``b`` and their
    gradients)."""
    plan = []
    for lin, norm, act, res in _unit_spec(family, bn, depth):
        # a bias that feeds a batch norm has gradient exactly 0 (BN removes the batch mean):
        # it is not computed (autograd would return rounding noise), the bias only decays
        u = {"W": P[f"{lin}.weight"], "WT": P[f"{lin}.weight"].transpose(1, 2),
             "gW": G[f"{lin}.weight"],
             "b": P.get(f"{lin}.bias"), "gb": None if norm is not None else G.get(f"{lin}.bias"),
             "act": act, "res": res, "bn": norm is not None, "H": shapes[f"{lin}.weight"][0]}
        if norm is not None:
            u.update(gamma=P[f"{norm}.weight"].view(-1), beta=P[f"{norm}.bias"].view(-1),
                     ggamma=G[f"{norm}.weight"].view(-1), gbeta=G[f"{norm}.bias"].view(-1),
                     rm=S[f"{norm}.running_mean"].view(-1), rv=S[f"{norm}.running_var"].view(-1),
                     b_flat=None if u["b"] is None else u["b"].view(-1))
        plan.append(u)
    head = {"W": P["head.weight"], "WT": P["head.weight"].transpose(1, 2),
            "gW": G["head.weight"], "b": P.get("head.bias"), "gb": G.get("head.bias")}
    return plan, head


def _linear(u, hT):
    """``Z = W H + b`` per run: ``hT`` ``(K, d_in, n)`` -> ``(K, d_out, n)``."""
    if u["b"] is None:
        return torch.bmm(u["W"], hT)
    return torch.baddbmm(u["b"].unsqueeze(2), u["W"], hT)


class _Storage:
    """Where the numbers of K runs live: the weight matrices in one flat tensor ``mat`` of
    contiguous ``(K, d_out, d_in)`` blocks, the vectors in ``vec`` of ``(K, len)`` blocks, their
    gradients ``gmat`` / ``gvec`` alike, BN running statistics ``S[name]`` ``(K, H)``; views
    ``P[name]`` / ``G[name]`` by ``state_dict`` name. Checkpoints and per-run import / export."""

    def _init_storage(self, ref: nn.Module):
        K, dev = self.K, self.device
        self.shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
        self.matrix_names = [n for n, s in self.shapes.items() if len(s) == 2]
        self.vector_names = [n for n, s in self.shapes.items() if len(s) != 2]
        self.buffer_shapes = {n: tuple(b.shape) for n, b in ref.named_buffers()}
        #: name -> (offset, length) of its ``(K, *shape)`` block in ``mat`` / ``vec``
        self.mat_offsets = _block_offsets(self.shapes, self.matrix_names, K)
        self.vec_offsets = _block_offsets(self.shapes, self.vector_names, K)
        self.n_matrix = sum(_prod(self.shapes[n]) for n in self.matrix_names)
        self.n_vector = sum(_prod(self.shapes[n]) for n in self.vector_names)
        self.mat = torch.zeros(K * self.n_matrix, dtype=DTYPE, device=dev)
        self.gmat = torch.zeros_like(self.mat)
        self.vec = torch.zeros(K * self.n_vector, dtype=DTYPE, device=dev)
        self.gvec = torch.zeros_like(self.vec)
        self.S = {n: torch.zeros((K, *s), dtype=DTYPE, device=dev)
                  for n, s in self.buffer_shapes.items()}
        self.P = {**self.view_mat(self.mat), **self._view_vec(self.vec)}
        self.G = {**self.view_mat(self.gmat), **self._view_vec(self.gvec)}
        #: run index of every element of ``vec`` (per-run coefficients of the vector step)
        if self.vector_names:
            self._vec_run = torch.cat([
                torch.arange(K, device=dev).repeat_interleave(_prod(self.shapes[n]))
                for n in self.vector_names])
        else:
            self._vec_run = torch.zeros(0, dtype=torch.long, device=dev)

    def view_mat(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: (K, d_out, d_in)}`` views of a flat tensor laid out like ``mat``."""
        return _views(m, self.mat_offsets, self.shapes)

    def _view_vec(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return _views(v, self.vec_offsets, self.shapes)

    def take_mat(self, m: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The runs ``keep`` (a long tensor of positions) of a flat tensor laid out like ``mat``,
        in the layout of a net of ``len(keep)`` runs."""
        return _take(m, self.mat_offsets, self.shapes, keep)

    def _take_vec(self, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return _take(v, self.vec_offsets, self.shapes, keep)

    def finite(self) -> torch.Tensor:
        """``(K,)`` bool: every parameter and BN statistic of the run is finite (device tensor)."""
        ok = torch.ones(self.K, dtype=torch.bool, device=self.device)
        for n in self.matrix_names + self.vector_names:
            ok &= torch.isfinite(self.P[n].reshape(self.K, -1)).all(1)
        for v in self.S.values():
            ok &= torch.isfinite(v.reshape(self.K, -1)).all(1)
        return ok

    def state(self) -> dict[str, torch.Tensor]:
        """Everything that evolves in training (for checkpoints), as CPU tensors."""
        out = {"mat": self.mat, "vec": self.vec, **{f"S.{n}": v for n, v in self.S.items()}}
        if self.mom_mat is not None:
            out.update(mom_mat=self.mom_mat, mom_vec=self.mom_vec)
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def load_state(self, st: dict[str, torch.Tensor]):
        self.mat.copy_(st["mat"])
        self.vec.copy_(st["vec"])
        for n in self.S:
            self.S[n].copy_(st[f"S.{n}"])
        if "mom_mat" in st:
            self._set_momentum(st["mom_mat"].to(self.device).clone(),
                               st["mom_vec"].to(self.device).clone())

    def load_module(self, k: int, module: nn.Module):
        """Copy the parameters and buffers of ``module`` (reference layout) into run ``k``."""
        with torch.no_grad():
            for n, p in module.named_parameters():
                self.P[n][k].copy_(p.detach())
            for n, b in module.named_buffers():
                self.S[n][k].copy_(b.detach())

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Run ``k`` as a ``state_dict`` of the reference module (CPU clones)."""
        out = {n: v[k].detach().cpu().clone() for n, v in self.P.items()}
        out.update({n: v[k].detach().cpu().clone() for n, v in self.S.items()})
        return out

    def module(self, k: int) -> nn.Module:
        """Run ``k`` as the reference ``nn.Module`` (eval mode, CPU)."""
        m = self.arch.build().to(DTYPE)
        m.load_state_dict(self.state_dict(k))
        return m.eval()


class _Optimiser:
    """The SGD step of every run with its own coefficients (learning rate, PyTorch weight decay
    ``2 lam``, momentum), in ``torch.optim.SGD``'s order of operations."""

    mom_mat = mom_vec = None
    _coef = None

    def set_hyper(self, lr: Sequence[float], wd: Sequence[float],
                  momentum: Sequence[float] | None = None, decay_vectors: bool = True):
        """Per-run learning rate, PyTorch weight decay (``2 lam``) and momentum for the next
        steps (call once per epoch; ``decay_vectors=False`` decays the matrices only)."""
        dev, K = self.device, self.K
        lr_t = torch.as_tensor(list(lr), dtype=torch.float32).to(dev).view(K, 1)
        wd_t = torch.as_tensor(list(wd), dtype=torch.float32).to(dev).view(K, 1)
        lr_v = lr_t.view(-1)[self._vec_run]
        wd_v = wd_t.view(-1)[self._vec_run] if decay_vectors else torch.zeros_like(lr_v)
        c = {"lr": lr_t, "wd": wd_t, "lr_v": lr_v, "wd_v": wd_v, "shrink_v": 1.0 - lr_v * wd_v,
             "m": None, "m_v": None,
             # (K, 1, 1) factors of the fused matrix update W <- (1 - lr wd) W - lr dZ H^T
             "neg_lr_t": -lr_t.view(K, 1, 1), "shrink_t": (1.0 - lr_t * wd_t).view(K, 1, 1)}
        if momentum is not None and any(float(m) != 0 for m in momentum):
            m_t = torch.as_tensor(list(momentum), dtype=torch.float32).to(dev).view(K, 1)
            c.update(m=m_t, m_v=m_t.view(-1)[self._vec_run])
            if self.mom_mat is None:
                self._set_momentum(torch.zeros_like(self.mat), torch.zeros_like(self.vec))
        old = self._coef
        if old is not None and all((v is None) == (old.get(k) is None)
                                   and (v is None or v.shape == old[k].shape)
                                   for k, v in c.items()):
            for k, v in c.items():  # in place: a captured CUDA graph keeps seeing these tensors
                if v is not None:
                    old[k].copy_(v)
            return
        self._coef = c

    def _set_momentum(self, mom_mat: torch.Tensor, mom_vec: torch.Tensor):
        """Install momentum buffers (flat, laid out like ``mat`` / ``vec``) and their views."""
        self.mom_mat, self.mom_vec = mom_mat, mom_vec
        self._mom_views = self.view_mat(mom_mat)

    def sgd_step(self, matrices: bool = True):
        """One SGD step of every run from the gradients of the last :meth:`train_step`, with
        the coefficients of :meth:`set_hyper` (:func:`sgd_update` on both storages)."""
        c = self._coef
        if matrices:  # per matrix: (K, 1, 1) coefficients against the (K, d_out, d_in) block
            K = self.K
            lr, wd = c["lr"].view(K, 1, 1), c["wd"].view(K, 1, 1)
            m = None if c["m"] is None else c["m"].view(K, 1, 1)
            for n in self.matrix_names:
                buf = None if m is None else self._mom_views[n]
                sgd_update(self.P[n], self.G[n], lr, wd, m, buf)
        # vectors: the same step, written so that ``gvec`` is left untouched (the entries of the
        # biases that feed a batch norm stay exactly 0, see train_step)
        if c["m_v"] is None:
            self.vec.mul_(c["shrink_v"]).addcmul_(self.gvec, c["lr_v"], value=-1.0)
        else:
            self.mom_vec.mul_(c["m_v"]).add_(self.gvec).addcmul_(self.vec, c["wd_v"])
            self.vec.addcmul_(self.mom_vec, c["lr_v"], value=-1.0)

    def _fused_update(self, W: torch.Tensor, dz: torch.Tensor, inT: torch.Tensor):
        """Gradient and SGD step of one weight matrix at once (momentum 0), for all runs:
        ``W_k <- (1 - lr_k wd_k) W_k + (-lr_k dZ_k) H_k^T``; ``W`` ``(K, out, in)`` (contiguous),
        ``dz`` ``(K, out, B)``, ``inT`` ``(K, in, B)``. The gradient is never stored: one in-place
        scale and one in-place ``baddbmm_`` (the learning rate folded into the small ``dZ``)."""
        c = self._coef
        W.mul_(c["shrink_t"]).baddbmm_(dz * c["neg_lr_t"], inT.transpose(1, 2))


class _Training:
    """One training step of every run: the forward pass saving what the backward needs, the
    loss and its gradient w.r.t. the logits, and the hand-written backward pass."""

    def train_step(self, x: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor | None,
                   loss: str, update: bool = False):
        """Forward and backward on one batch per run; updates the BN running statistics.

        ``update=False``: writes the gradients ``G`` (call :meth:`sgd_step` to apply them).
        ``update=True``: also takes the SGD step with the coefficients of :meth:`set_hyper`; with
        momentum 0 for every run the weight matrices are updated inside the backward pass, right
        after their last use (:meth:`_fused_update`; ``G`` then holds no matrix gradients).
        ``x``: ``(K, B, d)`` inputs; ``t``: ``(K, B, C)`` float targets for ``"mse"`` (one-hot or
        real), unused for ``"ce"``; ``y``: ``(K, B)`` labels (``None`` for regression).
        Returns ``(loss (K,), correct (K,) or None)``, device tensors (no host sync)."""
        # the fused in-backward update: measured on a CPU only (see benchmarks/README.md)
        fused = (update and self._coef is not None and self._coef["m"] is None
                 and self.device.type == "cpu")
        saved, hT = self._forward_train(x)
        logits = _linear(self._head, hT)  # (K, C, B)
        lval, dlog, correct = self._loss_grad(logits, t, y, loss)
        self._backward(dlog, hT, saved, fused)
        if update:
            self.sgd_step(matrices=not fused)
        self.train_steps += 1
        return lval, correct

    def _forward_train(self, x: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
        """Training-mode forward through the hidden units: per unit the saved tensors of the
        backward (``in``, ``out``, BN statistics), and the last hidden ``(K, H, B)``."""
        saved = []
        hT = x.transpose(1, 2)  # (K, d, B) view
        stream = None
        for u in self._plan:
            if u["res"] == "open":
                stream = hT
            c = {"in": hT}
            if u["bn"]:
                a = self._bn_forward(u, hT, c)
            else:
                a = _linear(u, hT)  # (K, H, B)
            out = self._activation.fwd_(a) if u["act"] else a  # in place: ``a`` is fresh
            c["out"] = out
            saved.append(c)
            hT = stream + out if u["res"] == "close" else out
        return saved, hT

    def _bn_forward(self, u: dict, hT: torch.Tensor, c: dict) -> torch.Tensor:
        """``BN(W h)`` of one unit in training mode for all runs (one ``native_batch_norm`` on
        ``K*H`` channels), updating its running statistics; saves ``z3``, ``smean``, ``sinv``
        into ``c``."""
        K, B = hT.shape[0], hT.shape[2]
        # the bias is not added: BN removes it exactly (z + b - mean(z + b) = z - mean z);
        # it enters only the running mean, below
        z = torch.bmm(u["W"], hT)  # (K, H, B)
        H = u["H"]
        z3 = z.view(1, K * H, B)
        rv_old = u["rv"].clone() if B == 1 else None
        a3, smean, sinv = torch.native_batch_norm(z3, u["gamma"], u["beta"], u["rm"], u["rv"],
                                                  True, BN_MOMENTUM, BN_EPS)
        if u["b"] is not None:  # r <- (1 - m) r + m mean(z + b) = [...mean z] + m b
            u["rm"].add_(u["b_flat"], alpha=BN_MOMENTUM)
        if B == 1:  # models.BatchNorm's unbiased variance of one sample is 0, not 0/0
            u["rv"].copy_(rv_old.mul_(1 - BN_MOMENTUM))
        c.update(z3=z3, smean=smean, sinv=sinv)
        return a3.view(K, H, B)

    def _loss_grad(self, logits, t, y, loss: str):
        """Per-run loss (mean over the batch), its gradient w.r.t. the logits ``(K, C, B)``, and
        the number correct (``None`` without labels)."""
        inv_b = 1.0 / logits.shape[2]
        if loss == "ce":
            logp = torch.log_softmax(logits, 1)
            idx = y.unsqueeze(1)  # (K, 1, B)
            lval = logp.gather(1, idx).sum((1, 2)).mul_(-inv_b)
            dlog = logp.exp_()
            neg = self._neg_ones.get(idx.shape)
            if neg is None:
                neg = self._neg_ones[idx.shape] = torch.full(idx.shape, -1.0, dtype=dlog.dtype,
                                                             device=dlog.device)
            dlog.scatter_add_(1, idx, neg)
            dlog.mul_(inv_b)
        elif loss == "mse":
            C = logits.shape[1]
            diff = logits - t.transpose(1, 2)
            lval = (diff * diff).sum((1, 2)).mul_(inv_b / C)
            dlog = diff.mul_(2.0 * inv_b / C)
        else:
            raise ValueError(f"unknown loss {loss!r}: use 'ce' or 'mse'")
        correct = None
        if y is not None:  # max(1).indices == argmax(1) (first maximum), 4x faster for C << B
            correct = (logits.max(1).indices == y).sum(1)
        return lval, dlog, correct

    def _backward(self, dlog: torch.Tensor, hT: torch.Tensor, saved: list[dict], fused: bool):
        """Backward from the logits' gradient through the head and every unit: writes ``G``, or
        (``fused``) updates each weight matrix right after its last use."""
        plan, hd = self._plan, self._head
        if hd["gb"] is not None:
            torch.sum(dlog, 2, out=hd["gb"])
        dh = torch.bmm(hd["WT"], dlog)  # (K, H, B)
        if fused:
            self._fused_update(hd["W"], dlog, hT)
        else:
            torch.bmm(dlog, hT.transpose(1, 2), out=hd["gW"])
        dstream = None
        for i in range(len(plan) - 1, -1, -1):
            u, c = plan[i], saved[i]
            if u["res"] == "close":
                dstream = dh
            da = self._activation.bwd(dh, c["out"]) if u["act"] else dh
            dz = self._bn_backward(u, c, da) if u["bn"] else da
            if u["gb"] is not None:
                torch.sum(dz, 2, out=u["gb"])
            if i > 0:
                dh = torch.bmm(u["WT"], dz)
                if u["res"] == "open":
                    dh = dh.add_(dstream)
            if fused:
                self._fused_update(u["W"], dz, c["in"])
            else:
                torch.bmm(dz, c["in"].transpose(1, 2), out=u["gW"])

    def _bn_backward(self, u: dict, c: dict, da: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. ``z = W h`` through one unit's BN (writes ``gamma``'s and ``beta``'s
        gradients); with ``detach_var`` the variance is a constant of the backward pass."""
        K, H, B = da.shape
        da3 = da.reshape(1, K * H, B)
        dz3, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            da3, c["z3"], u["gamma"], None, None, c["smean"], c["sinv"], True, BN_EPS,
            [True, True, True])
        u["ggamma"].copy_(dgamma)  # (the .out overload is slower than these two copies)
        u["gbeta"].copy_(dbeta)
        if self.arch.detach_var:
            # stop-grad through 1/sqrt(var): remove the term -gamma*inv*y*mean(da*y)
            sm, si = c["smean"].view(1, -1, 1), c["sinv"].view(1, -1, 1)
            yn = (c["z3"] - sm).mul_(si)
            coef = (c["sinv"] * u["gamma"] * u["ggamma"]).view(1, -1, 1)
            dz3 = dz3.addcmul_(yn, coef, value=1.0 / B)
        return dz3.view(K, H, B)


class _Evaluation:
    """Eval-mode logits and losses of every run on shared inputs, with each BN folded into its
    linear layer (running statistics)."""

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor | None, loss: str,
                 chunk: int | None = None):
        """Eval-mode loss (summed over samples) and number correct per run on inputs ``x``
        ``(n, d)`` shared by all runs. ``t``: ``(n, C)`` targets; ``y``: ``(n,)`` labels or None.
        Returns ``(loss_sum (K,), correct (K,) or None)`` (float64, on the device)."""
        n = x.shape[0]
        K = self.K
        loss_sum = torch.zeros(K, dtype=torch.float64, device=self.device)
        correct = (torch.zeros(K, dtype=torch.float64, device=self.device)
                   if y is not None else None)
        if n == 0:
            return loss_sum, correct
        if chunk is None:
            chunk = max(64, min(n, 2**23 // max(1, K * max(self.width, x.shape[1]))))
        folded = self._eval_affine()
        for s in range(0, n, chunk):
            logits = self.forward_eval(x[s:s + chunk], folded)  # (K, C, m)
            m = logits.shape[2]
            if loss == "ce":
                yb = y[s:s + chunk]
                l = F.cross_entropy(logits, yb.expand(K, m), reduction="none")
                loss_sum += l.double().sum(1)
            else:
                tb = t[s:s + chunk].t()
                loss_sum += ((logits - tb) ** 2).mean(1).double().sum(1)
            if y is not None:
                correct += (logits.max(1).indices == y[s:s + chunk]).double().sum(1)
        return loss_sum, correct

    def _eval_affine(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per unit, the eval-mode layer ``z -> BN(W h + b)`` as one affine map ``W' h + b'``:
        with ``scale = gamma / sqrt(r_var + eps)``, ``W' = diag(scale) W`` and
        ``b' = scale (b - r_mean) + beta`` (no BN: ``W, b`` as they are). ``W'`` ``(K, H, d_in)``,
        ``b'`` ``(K, H, 1)`` or None."""
        out = []
        for u in self._plan:
            W, b = u["W"], None if u["b"] is None else u["b"].unsqueeze(2)
            if u["bn"]:
                K, H = W.shape[0], W.shape[1]
                scale = (torch.rsqrt(u["rv"] + BN_EPS) * u["gamma"]).view(K, H, 1)
                mean = u["rm"].view(K, H, 1)
                shift = u["beta"].view(K, H, 1) - mean * scale
                W = W * scale
                b = shift if b is None else torch.addcmul(shift, b, scale)
            out.append((W, b))
        return out

    @torch.no_grad()
    def forward_eval(self, x: torch.Tensor, folded=None) -> torch.Tensor:
        """Eval-mode logits ``(K, C, n)`` of all runs on shared inputs ``x`` ``(n, d)``
        (``folded``: :meth:`_eval_affine`, recomputed when not given)."""
        K, n = self.K, x.shape[0]
        folded = self._eval_affine() if folded is None else folded
        hT, stream = None, None
        for j, (u, (W, b)) in enumerate(zip(self._plan, folded)):
            if u["res"] == "open":
                stream = hT
            if j == 0:  # inputs shared by the runs: one (K*H, d) @ (d, n) product
                Wc = W.reshape(-1, x.shape[1])
                z = (torch.mm(Wc, x.t()) if b is None
                     else torch.addmm(b.reshape(-1, 1), Wc, x.t()))
                z = z.view(K, -1, n)
            else:
                z = torch.bmm(W, hT) if b is None else torch.baddbmm(b, W, hT)
            out = self._activation.fwd_(z) if u["act"] else z
            hT = stream + out if u["res"] == "close" else out
        return _linear(self._head, hT)


class BatchedNet(_Storage, _Optimiser, _Training, _Evaluation):
    """K runs of one architecture (see the module docstring for the layouts).

    ``P[name]`` / ``G[name]``: ``(K, *shape)`` views of parameter ``name`` (a ``state_dict`` key of
    the reference module) and of its gradient; ``S[name]``: BN running statistics ``(K, H)``.
    Assembled from :class:`_Storage` (where the numbers live), :class:`_Optimiser` (the SGD
    step), :class:`_Training` (forward and backward of one step) and :class:`_Evaluation`.
    """

    def __init__(self, arch: Arch, K: int, device: torch.device | str = "cpu"):
        if not supported(arch):
            raise NotImplementedError(
                f"the batched engine trains {', '.join(SUPPORTED)} with activation in {_ACTS}; "
                f"got {arch.model!r} / {arch.activation!r} (use engine='loop')")
        self.arch, self.K, self.device = arch, int(K), torch.device(device)
        self.family, self.bn, self.depth, self.width = arch.parse()
        ref = arch.build()
        self._init_storage(ref)
        path = {id(m): n for n, m in ref.named_modules()}
        #: ``state_dict`` names of the rank-tracked matrices, in forward order, and their labels
        self.tracked = [f"{path[id(m)]}.weight" for _, m in ref.rank_layers()]
        self.layer_labels = {f"{path[id(m)]}.weight": n for n, m in ref.rank_layers()}
        self.layer_labels["head.weight"] = "head"
        self.mom_mat = self.mom_vec = None
        self._coef = None
        self._neg_ones: dict = {}
        self._activation = _Activation(arch.activation)
        self._plan, self._head = forward_plan(self.family, self.bn, self.depth, self.P, self.G,
                                              self.S, self.shapes)
        self.train_steps = 0

    def select(self, keep: Sequence[int]) -> "BatchedNet":
        """A new net holding only the runs ``keep`` (same order): parameters, statistics and
        momentum buffers copied."""
        keep_t = torch.as_tensor(list(keep), dtype=torch.long, device=self.device)
        new = BatchedNet(self.arch, len(keep), self.device)
        new.mat.copy_(self.take_mat(self.mat, keep_t))
        new.vec.copy_(self._take_vec(self.vec, keep_t))
        for n in self.S:
            new.S[n].copy_(self.S[n].index_select(0, keep_t))
        if self.mom_mat is not None:
            new._set_momentum(self.take_mat(self.mom_mat, keep_t),
                              self._take_vec(self.mom_vec, keep_t))
        return new


def sgd_update(params: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor | None,
               momentum: torch.Tensor | None = None, buf: torch.Tensor | None = None) -> None:
    """One SGD step, in place, in ``torch.optim.SGD``'s order of operations:
    ``d = g + wd * p``; with momentum ``v <- m v + d`` (``v`` starts at 0, so ``v_1 = d``),
    ``p <- p - lr v``; without: ``p <- p - lr d``.

    ``lr``, ``wd``, ``momentum`` broadcast against ``params`` (``(K, 1)`` per run, or one value
    per element); ``wd = 2 * lam`` (:func:`sgdrank.conventions.torch_weight_decay`) or None for
    no decay. With ``g = 0`` and no momentum the step is ``p <- (1 - 2 lr lam) p`` up to
    rounding. ``grads`` is overwritten with ``d``."""
    if wd is not None:
        grads.addcmul_(params, wd)
    if momentum is None:
        params.addcmul_(grads, lr, value=-1.0)
    else:
        buf.mul_(momentum).add_(grads)
        params.addcmul_(buf, lr, value=-1.0)


def _block_offsets(shapes: dict, names: Sequence[str], K: int) -> dict[str, tuple[int, int]]:
    """``{name: (offset, K * numel)}``: consecutive ``(K, *shape)`` blocks in one flat tensor."""
    out, off = {}, 0
    for n in names:
        out[n] = (off, K * _prod(shapes[n]))
        off += K * _prod(shapes[n])
    return out


def _views(flat: torch.Tensor, offsets: dict, shapes: dict) -> dict[str, torch.Tensor]:
    """``{name: (K, *shape)}`` views of the blocks of ``flat`` (``K`` from the flat length)."""
    out = {}
    for n, (o, k) in offsets.items():
        numel = _prod(shapes[n])
        out[n] = flat[o:o + k].view(k // numel, *shapes[n])
    return out


def _take(flat: torch.Tensor, offsets: dict, shapes: dict, keep: torch.Tensor) -> torch.Tensor:
    """The runs ``keep`` of every block of ``flat``, as a flat tensor of ``len(keep)``-run
    blocks."""
    views = _views(flat, offsets, shapes)
    if not views:
        return flat.new_zeros(0)
    return torch.cat([v.index_select(0, keep).reshape(-1) for v in views.values()])


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
