"""The batched engine: K runs of one fully connected architecture trained in lock-step as one
:class:`sgdrank.batched.BatchedNet` (hand-batched forward and backward, one GEMM per layer for
all runs). Each run keeps its own init, batch order, learning rate, weight decay, momentum and
schedule (:mod:`sgdrank.runconfig`); what is recorded is :mod:`sgdrank.record`'s, shared with the
loop engine.

The host synchronises once per recorded epoch (the measurement), never per step. A run that
diverges is recorded as such and removed from the batch; the others go on. A group checkpoints
every ``checkpoint_every`` seconds (at epoch boundaries) and resumes from its checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import conventions, record, stepgraph
from .batched import Arch, BatchedNet
from .cache import atomic_save, group_id
from .inputs import GroupData
from .runconfig import Config, batch_order, on_device


class _Group:
    """The state of one batched group in training: the net of the runs still alive, their
    positions ``alive`` in ``cfgs``, the weight matrices at the previous recorded epoch."""

    def __init__(self, cfgs: list[Config], keys: list[str], d: GroupData, device):
        c0 = cfgs[0]
        self.cfgs, self.d, self.device, self.c0 = cfgs, d, device, c0
        self.arch = Arch(c0.model, d.in_shape, d.out_dim, c0.bias, c0.detach_var, c0.activation)
        self.net = BatchedNet(self.arch, len(cfgs), device)
        for k, cfg in enumerate(cfgs):
            self.net.load_module(k, self.arch.build(seed=cfg.seed))
        self.recs = [record.new(cfg, key, self.arch, "batched", device)
                     for cfg, key in zip(cfgs, keys)]
        self.layers = [record.Layer(n, self.net.layer_labels[n], tuple(self.net.shapes[n]))
                       for n in self.net.tracked]
        self.alive = list(range(len(cfgs)))
        self.prev = self.net.mat.clone()
        self._runner: stepgraph.Steps | None = None  # the step launcher (train_epoch)
        self.id = group_id(keys)
        N, B = d.x.shape[0], c0.batch_size
        self.n_full = N // B
        self.rem = 0 if c0.drop_last else N - self.n_full * B
        self.steps = self.n_full + (self.rem > 0)
        if self.steps == 0:
            raise ValueError(f"n_train={N} < batch_size={B} with drop_last=True: no step per epoch")

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path, epoch: int) -> None:
        atomic_save({"group": self.id, "epoch": epoch, "alive": self.alive, "net": self.net.state(),
                     "prev": self.prev.cpu(), "recs": self.recs}, path)

    def resume(self, path: Path | None) -> int:
        """Load the checkpoint at ``path`` if it is this group's; the last epoch it holds
        (0: none)."""
        if path is None or not path.exists():
            return 0
        st = torch.load(path, weights_only=True)
        if st.get("group") != self.id:
            return 0
        self.alive = list(st["alive"])
        self.net = BatchedNet(self.arch, len(self.alive), self.device)
        self.net.load_state(st["net"])
        self.prev = st["prev"].to(self.device)
        self.recs = st["recs"]
        return int(st["epoch"])

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> tuple[list[float], torch.Tensor, torch.Tensor | None]:
        """The SGD steps of epoch ``epoch`` for every run alive; returns the learning rates used
        and the sums of the batch losses (weighted by batch size) and of correct predictions."""
        net, B, N = self.net, self.c0.batch_size, self.d.x.shape[0]
        cfgs = [self.cfgs[r] for r in self.alive]
        lr_now = [c.lr_at(epoch) for c in cfgs]
        net.set_hyper(lr_now, [conventions.torch_weight_decay(c.lam) for c in cfgs],
                      [c.momentum for c in cfgs], decay_vectors=self.c0.decay == "all")
        K = net.K
        perm = on_device(torch.stack([batch_order(c.seed, epoch, N) for c in cfgs]), self.device)
        order = perm[:, :self.n_full * B].reshape(K, self.n_full, B).transpose(0, 1).contiguous()
        runner = self._steps()
        runner.begin()
        with torch.inference_mode():  # no autograd bookkeeping: the backward pass is by hand
            for s in range(self.n_full):
                runner.step(order[s])
            if self.rem:
                runner.step(perm[:, self.n_full * B:].contiguous(), full=False)
        bsum, bcor = runner.sums()
        return lr_now, bsum, bcor

    def _steps(self) -> stepgraph.Steps:
        """The step launcher of the net alive and its coefficients (:mod:`sgdrank.stepgraph`:
        eager, or a CUDA graph's fixed buffers), kept from epoch to epoch while they last."""
        d, st = self.d, self._runner
        if st is None or not st.serves(self.net, d.x):
            st = self._runner = stepgraph.Steps(self.net, d.x, d.t, d.y, self.c0.loss,
                                                stepgraph.mode(self.device))
        return st

    # ------------------------------------------------------------------ one measurement
    def _evaluate(self, x, t, y) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if x.shape[0] == 0:
            return None, None
        loss, correct = self.net.evaluate(x, t, y, self.c0.loss)
        n = x.shape[0]
        return loss / n, (correct / n if correct is not None else None)

    def _drop(self, bad: list[int]) -> list[int]:
        keep = [j for j in range(self.net.K) if j not in bad]
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=self.device)
        self.prev = self.net.take_mat(self.prev, keep_t)
        self.net = self.net.select(keep)
        self.alive = [self.alive[j] for j in keep]
        return keep

    def _spectra(self, mats: dict, first: bool) -> dict[str, torch.Tensor]:
        """:func:`record.spectra` of the runs alive (on the host). At epoch 0 the runs of one
        seed hold the same matrices (``Arch.build(seed)``: the lambdas, batch orders and learning
        rates of a group differ, the initialisation does not), so each initialisation is
        decomposed once and its spectrum given to every run of that seed; checked first with
        ``torch.equal`` against the seed's first run, matrix by matrix (every run is decomposed
        if any pair differs). On the CPU (LAPACK: one call per matrix) the records are those of
        decomposing every run, bit for bit (tested); a GPU's batched SVD may differ in the last
        bits with the size of the batch."""
        dt = self.c0.svd_dtype
        seeds = [self.cfgs[r].seed for r in self.alive]
        first_of = [seeds.index(s) for s in seeds]  # the first run alive with the same seed
        if first and len(set(seeds)) < len(seeds) and all(
                torch.equal(v[j], v[f]) for v in mats.values()
                for j, f in enumerate(first_of) if f != j):
            uniq = list(dict.fromkeys(first_of))
            rep = torch.as_tensor(uniq, device=self.device)
            inv = torch.as_tensor([uniq.index(f) for f in first_of])
            one = {n: v.index_select(0, rep) for n, v in mats.items()}
            return {n: s.cpu().index_select(0, inv) for n, s in record.spectra(one, dt).items()}
        return {n: s.cpu() for n, s in record.spectra(mats, dt).items()}

    def measure(self, epoch: int, lr_now: list[float], bsum=None, bcor=None) -> None:
        """Record epoch ``epoch`` for every run alive; runs that diverged are recorded as such
        and dropped from the batch."""
        c0, d = self.c0, self.d
        tl, tc = self._evaluate(d.x, d.t, d.y) if c0.eval_train else (None, None)
        vl, vc = self._evaluate(d.xt, d.tt, d.yt)
        nseen = d.x.shape[0] if self.rem else self.n_full * c0.batch_size
        bl = None if bsum is None else bsum.double() / nseen
        bc = None if bcor is None else bcor.double() / nseen
        bad = [j for j, b in enumerate(record.not_finite(self.net.finite(), tl, bl)) if b]
        for j in bad:
            r = self.alive[j]
            record.mark_diverged(self.recs[r], self.cfgs[r], epoch, self.steps)
        if bad:
            keep = self._drop(bad)
            keep_t = torch.as_tensor(keep, dtype=torch.long, device=self.device)
            tl, tc, vl, vc, bl, bc = (None if v is None else v.index_select(0, keep_t)
                                      for v in (tl, tc, vl, vc, bl, bc))
            lr_now = [lr_now[j] for j in keep]
        if not self.alive:
            return
        net = self.net
        mats = {n: net.P[n] for n in net.tracked + [record.HEAD]}
        first = epoch == 0
        prevv = net.view_mat(self.prev)
        delta = None if first else {
            n: torch.linalg.matrix_norm((net.P[n] - prevv[n]).double()).cpu()
            for n in net.matrix_names}
        var = [v.reshape(net.K, -1) for n, v in net.S.items() if n.endswith("running_var")]
        bn_min = torch.cat(var, 1).min(1).values.cpu() if var else None
        cpu = lambda v: None if v is None else v.detach().cpu()  # noqa: E731
        m = record.Measurement(
            epoch=epoch, step=self.steps * epoch, lr_now=lr_now,
            sv=self._spectra(mats, first) if c0.spectra_at(epoch) else None, delta=delta,
            train_loss=cpu(tl), train_acc=cpu(tc), test_loss=cpu(vl), test_acc=cpu(vc),
            batch_loss=cpu(bl), batch_acc=cpu(bc), bn_var_min=bn_min)
        record.append([self.recs[r] for r in self.alive], self.layers, m)
        self.prev = net.mat.clone()


def train(cfgs: list[Config], keys: list[str], d: GroupData, device, bar, ckpt: Path | None,
          checkpoint_every: float, on_epoch) -> list[dict]:
    """Train the runs ``cfgs`` (one group: equal :meth:`Config.group_key`) as one batched
    computation; return their records (:mod:`sgdrank.record`), final weights in ``"state"``.

    ``bar``: a progress counter in run-epochs (or None); ``ckpt``: the checkpoint file (or None);
    ``on_epoch(epoch, configs alive)`` is called after every trained epoch."""
    K, E = len(cfgs), cfgs[0].epochs
    g = _Group(cfgs, keys, d, device)
    t0 = time.perf_counter()
    start = g.resume(ckpt) + 1
    if start > 1 and bar is not None:
        bar.update(K * start)
    if start == 1:
        g.measure(0, [float("nan")] * K)
        if bar is not None:
            bar.update(K)
    last_ckpt = time.perf_counter()
    for epoch in range(start, E + 1):
        if g.alive:
            lr_now, bsum, bcor = g.train_epoch(epoch)
            if cfgs[0].recorded(epoch):
                g.measure(epoch, lr_now, bsum, bcor)
        if bar is not None:
            bar.update(K)
        if ckpt is not None and epoch < E and time.perf_counter() - last_ckpt >= checkpoint_every:
            g.save(ckpt, epoch)
            last_ckpt = time.perf_counter()
        if on_epoch is not None and g.alive:
            on_epoch(epoch, [cfgs[r] for r in g.alive])
    for j, r in enumerate(g.alive):
        g.recs[r]["state"] = g.net.state_dict(j)
    secs = (time.perf_counter() - t0) / K
    for rec in g.recs:
        rec["seconds"] += secs
    return g.recs
