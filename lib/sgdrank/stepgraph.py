"""How the batched engine launches its SGD steps: one by one (``eager``), through fixed buffers
(``static``), or as a replayed CUDA graph (``graph``).

**Why.** One step of :class:`sgdrank.batched.BatchedNet` is about 180 kernels whatever the
number ``K`` of runs (:data:`sgdrank.cost.KERNELS_BATCHED`). Launched one by one from Python,
each costs the host a few microseconds, so on a GPU a step of the book's small networks is bound
by the launches, not by the arithmetic. A CUDA graph records the kernels of one step once and
replays them with a single launch (``torch.cuda.CUDAGraph``).

**What a replay sees.** A graph replays its kernels on the *addresses* it captured. Everything a
step reads must therefore sit in a buffer that is written in place before each replay, and
everything it returns must be added into fixed buffers:

- the step's batch indices: ``idx``, a ``(K B,)`` long buffer, copied (device to device) from
  the epoch's order before each step; the inputs, targets and labels are gathered from the
  group's data *inside* the step, so they need no buffer of their own;
- the learning rates, weight decays and momenta: :meth:`BatchedNet.set_hyper` writes them in
  place when their layout is unchanged (a new layout makes a new coefficient dict, and the
  graph is captured again);
- the weights, batch-norm statistics and momentum buffers: updated in place by the step;
- the sums of the batch losses and of the correct predictions: ``bsum``, ``bcor``.

A graph is captured for one net (the runs alive) and one coefficient dict, at the full batch
size; a run dropped for divergence, a resumed checkpoint or a new coefficient layout captures
again, and a last, smaller batch of an epoch (``drop_last=False``) runs eagerly on the same
buffers. Before the capture, ``WARMUP`` real steps of the epoch run eagerly on a side stream
(CUDA's rule for capturing work that allocates); they are steps of the run, not extra ones.

**Modes** (:func:`mode`, from ``$SGDRANK_CUDA_GRAPHS``): ``eager`` (default: every step launched
from Python, the engine's path since the start), ``static`` (the graph's protocol -- fixed
buffers, in-place copies -- without a graph, on any device: the CPU test that the protocol gives
exactly the eager numbers), ``graph`` (CUDA only). Both fixed-buffer modes check at the first
full step of every epoch that no tensor a step reads or writes (data, index and sum buffers,
flat weights and gradients and their per-matrix views, momentum buffers and views, coefficients,
batch-norm statistics, the forward plan, cached constants) has been replaced since it was first
seen (``data_ptr``), so a rebinding that a replay would not see fails loudly on the CPU too
(``set_hyper``, the only code that rebinds between steps, runs between epochs). A graph is
captured on a stream of the net's own device (``cuda:1`` in a local job on a multi-GPU
machine), and an empty capture raises. The three do the same
arithmetic in the same order; on the CPU ``static`` is tested bit for bit against ``eager``.
``graph`` is **prepared, not measured**: no GPU has run it yet; ``benchmarks/gpu_check.sh`` times
it against ``eager`` and compares their weights (``benchmarks/README.md``), and runs with graphs
requested are cached apart (:func:`requested`).
"""
from __future__ import annotations

import os
import warnings

import torch

#: eager steps (on a side stream) before a graph is captured
WARMUP = 3
MODES = ("eager", "static", "graph")
ENV = "SGDRANK_CUDA_GRAPHS"


def _name(environ=None) -> str:
    """``$SGDRANK_CUDA_GRAPHS`` as a mode name (unset and ``0``: ``eager``; ``1``: ``graph``),
    not yet validated."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV, "").strip().lower()
    return {"": "eager", "0": "eager", "1": "graph"}.get(raw, raw)


def mode(device, environ=None) -> str:
    """The step mode for ``device`` from ``$SGDRANK_CUDA_GRAPHS``: unset, ``0`` or ``eager``:
    ``eager``; ``1`` or ``graph``: ``graph`` (a CUDA device only); ``static``: ``static``."""
    name = _name(environ)
    if name not in MODES:
        raise ValueError(f"{ENV}={name!r}: use 0 (eager, the default), 1 (CUDA graphs) or "
                         f"'static' (the graphs' fixed buffers without a graph, any device)")
    if name == "graph" and torch.device(device).type != "cuda":
        raise ValueError(f"{ENV}=1 asks for CUDA graphs, but the runs train on "
                         f"{torch.device(device)}: unset {ENV} (or set it to 'static' to test "
                         f"the graphs' buffers on this device)")
    return name


def requested(environ=None) -> bool:
    """True when ``$SGDRANK_CUDA_GRAPHS`` asks for CUDA graphs (``1`` or ``graph``): the cache
    keeps such runs apart (:func:`sgdrank.cache.run_key`)."""
    return _name(environ) == "graph"


class Steps:
    """The SGD steps of one epoch of a batched group: :meth:`begin` (zero the sums), :meth:`step`
    per batch, :meth:`sums` at the end.

    ``net``: the :class:`~sgdrank.batched.BatchedNet` (coefficients already set for the epoch);
    ``x`` ``(N, d)``, ``t`` ``(N, C)`` or None, ``y`` ``(N,)`` or None: the group's training
    data on the net's device; ``loss``: ``"ce"`` or ``"mse"``; ``kind``: one of :data:`MODES`.
    """

    def __init__(self, net, x, t, y, loss: str, kind: str = "eager"):
        if kind not in MODES:
            raise ValueError(f"unknown step mode {kind!r}: one of {MODES}")
        self.net, self.x, self.t, self.y, self.loss, self.kind = net, x, t, y, loss, kind
        self.coef = net._coef
        dev = net.device
        self.bsum = torch.zeros(net.K, dtype=torch.float32, device=dev)
        self.bcor = torch.zeros(net.K, dtype=torch.float32, device=dev) if y is not None else None
        self.idx = None  # (K B,) long: the static batch indices (static and graph)
        self.graph = None
        self.warm = 0
        self.addresses: dict[str, int] = {}  # data_ptr of each tensor when first seen
        self.checked = False  # the addresses were checked in this epoch
        self.side = None  # the CUDA side stream of the warm-up and the capture

    def serves(self, net, x) -> bool:
        """True while this object's buffers (and graph) belong to ``net``, its current
        coefficients and the training inputs ``x``: the engine builds a new one otherwise."""
        return self.net is net and self.coef is net._coef and self.x is x

    def _addresses(self) -> dict[str, int]:
        """``data_ptr`` of every tensor a step reads or writes, by name: the data, the index and
        sum buffers, the flat weights, gradients, momentum and BN statistics, their per-matrix
        views (``P``, ``G``, the momentum views the update reads), every coefficient tensor, the
        cached constants (``_neg_ones``) and every tensor of the net's forward plan."""
        net = self.net
        named = {"x": self.x, "t": self.t, "y": self.y, "idx": self.idx, "bsum": self.bsum,
                 "bcor": self.bcor, "mat": net.mat, "gmat": net.gmat, "vec": net.vec,
                 "gvec": net.gvec, "mom_mat": net.mom_mat, "mom_vec": net.mom_vec}
        named.update({f"coefficient {k}": v for k, v in (net._coef or {}).items()})
        named.update({f"statistic {k}": v for k, v in net.S.items()})
        named.update({f"weight {k}": v for k, v in net.P.items()})
        named.update({f"gradient {k}": v for k, v in net.G.items()})
        named.update({f"momentum {k}": v
                      for k, v in (getattr(net, "_mom_views", None) or {}).items()})
        named.update({f"constant {k}": v for k, v in net._neg_ones.items()})
        for i, u in enumerate([*net._plan, net._head]):
            named.update({f"unit {i} {k}": v for k, v in u.items()})
        return {k: v.data_ptr() for k, v in named.items() if isinstance(v, torch.Tensor)}

    def _check_addresses(self) -> None:
        """The fixed-buffer modes' guard: a replay reads the tensors of its capture, so every
        tensor must still be where it was when first seen (``static`` checks exactly what a
        graph would need; a tensor made later, as a cached constant, is recorded then). Raises
        ``RuntimeError`` naming a tensor that was replaced."""
        now = self._addresses()
        moved = [k for k, v in self.addresses.items() if now.get(k) != v]
        for k, v in now.items():
            self.addresses.setdefault(k, v)
        if moved:
            raise RuntimeError(f"{self.kind} steps: {', '.join(moved[:4])} replaced since the "
                               f"first step (write it in place, or build a new Steps): a "
                               f"captured CUDA graph would not see the new tensor")

    def begin(self) -> None:
        """Zero the sums of the batch losses and correct predictions (in place); the next full
        fixed-buffer step checks the addresses."""
        self.checked = False
        self.bsum.zero_()
        if self.bcor is not None:
            self.bcor.zero_()

    def sums(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies of ``(sum over batches of B x batch loss, number correct)``, each ``(K,)``."""
        return self.bsum.clone(), (self.bcor.clone() if self.bcor is not None else None)

    def _run(self, flat: torch.Tensor, b: int) -> None:
        """One SGD step of every run on the batches ``flat`` ``(K b,)``, the sums added in."""
        K = self.net.K
        xb = self.x.index_select(0, flat).view(K, b, -1)
        yb = self.y.index_select(0, flat).view(K, b) if self.y is not None else None
        tb = self.t.index_select(0, flat).view(K, b, -1) if self.t is not None else None
        lval, corr = self.net.train_step(xb, tb, yb, self.loss, update=True)
        self.bsum.add_(lval, alpha=b)
        if corr is not None:
            self.bcor.add_(corr)

    def step(self, idx: torch.Tensor, full: bool = True) -> None:
        """One SGD step on the index batch ``idx`` ``(K, b)`` (on the net's device). ``full``:
        the epoch's full batch size (a graph is captured and replayed for these only)."""
        b = idx.shape[1]
        if self.kind == "eager" or not full:
            self._run(idx.reshape(-1), b)
            return
        if self.idx is None:
            self.idx = torch.empty(idx.numel(), dtype=torch.long, device=idx.device)
        self.idx.copy_(idx.reshape(-1))
        if not self.checked:  # once per epoch: set_hyper, between epochs, is what rebinds
            self._check_addresses()
            self.checked = True
        if self.kind == "static":
            self._run(self.idx, b)
            return
        with torch.cuda.device(self.net.device):  # the net's device, not the current one
            if self.graph is not None:
                self.graph.replay()
                self.net.train_steps += 1  # the Python counter of train_step, not in the graph
            elif self.warm < WARMUP:
                self._warm_step(b)
            else:
                self._capture(b)

    def _side(self):
        """The side stream (on the net's device) of the warm-up steps and the capture."""
        if self.side is None:
            self.side = torch.cuda.Stream(device=self.net.device)
        return self.side

    def _warm_step(self, b: int) -> None:
        side = self._side()
        side.wait_stream(torch.cuda.current_stream(self.net.device))
        with torch.cuda.stream(side):
            self._run(self.idx, b)
        torch.cuda.current_stream(self.net.device).wait_stream(side)
        self.warm += 1

    def _capture(self, b: int) -> None:
        """Capture one step on the side stream (capturing runs nothing), then replay it: this
        call's step. A capture that recorded no kernel (work sent to another device or stream;
        PyTorch only warns) raises ``RuntimeError``."""
        torch.cuda.synchronize(self.net.device)
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with torch.cuda.graph(graph, stream=self._side()):
                self._run(self.idx, b)  # (counts this step in net.train_steps: the replay)
        for w in seen:
            if "empty" in str(w.message).lower():
                raise RuntimeError(f"the CUDA graph of a step on {self.net.device} captured "
                                   f"nothing ({w.message}): unset {ENV} and report it")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.graph = graph
        graph.replay()
