"""The one-at-a-time engine: one ``nn.Module`` and ``torch.optim.SGD``, the reference for the
batched engine and the engine of every model it does not batch (``CONV-L-C``, the zoo's VGG,
ResNet and ViT). Same batch order, schedule and weight-decay convention
(:mod:`sgdrank.runconfig`, :mod:`sgdrank.conventions`); what is recorded is
:mod:`sgdrank.record`'s, shared with the batched engine.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import conventions, metrics, record
from .batched import Arch
from .inputs import GroupData
from .cache import atomic_save
from .runconfig import Config, _derive, batch_order, on_device, steps_per_epoch

EVAL_CHUNK = 1024


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    """``torch.optim.SGD`` with ``weight_decay = 2 lam`` on every parameter (``decay="all"``) or
    on the weight matrices only (``"matrices"``)."""
    wd = conventions.torch_weight_decay(cfg.lam)
    if cfg.decay == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": wd}]
    else:
        mats = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": mats, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _loss(cfg: Config, out, y, t, reduction: str = "mean"):
    if cfg.loss == "ce":
        return F.cross_entropy(out, y, reduction=reduction)
    per = ((out - t) ** 2).mean(-1)
    return per.mean() if reduction == "mean" else per.sum()


@torch.no_grad()
def evaluate(
    model: nn.Module, cfg: Config, x, y, t
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Eval-mode mean loss and accuracy of ``model`` on ``(x, y, t)``, as ``(1,)`` float64 tensors
    (None for an empty set; accuracy None for regression). Leaves the model in training mode."""
    if x.shape[0] == 0:
        return None, None
    model.eval()
    tot = torch.zeros((), dtype=torch.float64, device=x.device)
    cor = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], EVAL_CHUNK):
        sl = slice(s, s + EVAL_CHUNK)
        out = model(x[sl])
        tot += _loss(cfg, out, None if y is None else y[sl], None if t is None else t[sl],
                     "sum").double()
        if y is not None:
            cor += (out.argmax(-1) == y[sl]).sum()
    model.train()
    n = x.shape[0]
    return (tot / n).reshape(1).cpu(), (None if y is None else (cor / n).reshape(1).cpu())


def _params_finite(model: nn.Module) -> torch.Tensor:
    return torch.tensor([all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())])


def _bn_var_min(model: nn.Module) -> torch.Tensor | None:
    var = [b.detach().reshape(-1) for n, b in model.named_buffers() if n.endswith("running_var")]
    return torch.cat(var).min().reshape(1).cpu() if var else None


def train_epoch(model: nn.Module, opt: torch.optim.SGD, cfg: Config, d: GroupData, epoch: int,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """The SGD steps of epoch ``epoch`` (1-based) of run ``cfg``: the epoch's batch order is moved
    to the device once (:func:`sgdrank.runconfig.on_device`) and cut there, so the host never
    waits inside the epoch. Returns the sums (on the device) of the batch losses weighted by
    batch size and of correct predictions."""
    lr_now = cfg.lr_at(epoch)
    for g in opt.param_groups:
        g["lr"] = lr_now
    model.train()
    N, B = d.x.shape[0], cfg.batch_size
    perm = on_device(batch_order(cfg.seed, epoch, N), device)
    stop = (N // B) * B if cfg.drop_last else N
    bsum = torch.zeros((), dtype=torch.float32, device=device)
    bcor = torch.zeros((), dtype=torch.float32, device=device)
    for s in range(0, stop, B):
        idx = perm[s:min(s + B, stop)]
        xb = d.x.index_select(0, idx)
        yb = d.y.index_select(0, idx) if d.y is not None else None
        tb = d.t.index_select(0, idx) if d.t is not None else None
        out = model(xb)
        loss = _loss(cfg, out, yb, tb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bsum += loss.detach() * len(idx)
        if yb is not None:
            bcor += (out.argmax(-1) == yb).sum()
    return bsum, bcor


def _rng_devices(device) -> list[int]:
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else []


def _rng_state(device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    for i in _rng_devices(device):
        st["cuda"] = torch.cuda.get_rng_state(i)
    return st


def _set_rng_state(st: dict, device) -> None:
    torch.set_rng_state(st["cpu"])
    for i in _rng_devices(device):
        if "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"], i)


def _save(path: Path, key: str, epoch: int, model, opt, prev, rec, device) -> None:
    atomic_save({"run": key, "epoch": epoch,
                 "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                 "opt": opt.state_dict(), "prev": {k: v.cpu() for k, v in prev.items()},
                 "rec": rec, "rng": _rng_state(device)}, path)


def train(cfg: Config, key: str, d: GroupData, device, bar, on_epoch, ckpt: Path | None = None,
          checkpoint_every: float = 60.0) -> dict:
    """Train run ``cfg``; return its record (:mod:`sgdrank.record`), final weights in ``"state"``.
    ``bar``: a progress counter in run-epochs (or None); ``on_epoch(epoch, [cfg])`` after each
    trained (and recorded) epoch.

    Every random source is seeded per run: the init by ``cfg.seed`` (:func:`models.build_model`),
    the batch order by its own generator, and the global generators (dropout in the ViT) by a
    hash of ``cfg.seed`` inside :func:`torch.random.fork_rng` (the caller's state is restored).
    ``ckpt``: the run's checkpoint file (or None): written every ``checkpoint_every`` seconds
    (0: every epoch) at an epoch boundary -- weights, optimiser state, the previous snapshot,
    the record so far and the generator states -- and resumed from when it exists, so an
    interrupted run continues with the same numbers as an uninterrupted one (on the CPU: bit
    for bit)."""
    arch = Arch(cfg.model, d.in_shape, d.out_dim, cfg.bias, cfg.detach_var, cfg.activation)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(_derive("global", int(cfg.seed)))
        return _train(cfg, key, d, torch.device(device), bar, on_epoch, arch, ckpt,
                      checkpoint_every)


def _train(cfg, key, d, device, bar, on_epoch, arch, ckpt, checkpoint_every) -> dict:
    model = arch.build(seed=cfg.seed).to(device=device, dtype=torch.float32)
    rec = record.new(cfg, key, arch, "loop", device)
    t0 = time.perf_counter()
    opt = _optimizer(model, cfg)
    N, E = d.x.shape[0], cfg.epochs
    steps = steps_per_epoch(N, cfg.batch_size, cfg.drop_last)
    if steps == 0:
        raise ValueError(f"n_train={N} < batch_size={cfg.batch_size} with drop_last=True: "
                         "no step per epoch")
    path = {id(m): n for n, m in model.named_modules()}
    layers = [record.Layer(f"{path[id(m)]}.weight", label, tuple(metrics.as_matrix(m.weight).shape))
              for label, m in model.rank_layers()]
    prev = metrics.snapshot(model)
    start = 0
    if ckpt is not None and ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        if st.get("run") == key:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            prev = {k: v.to(device) for k, v in st["prev"].items()}
            rec = st["rec"]
            _set_rng_state(st["rng"], device)
            start = int(st["epoch"]) + 1
            if bar is not None:
                bar.update(start)
    last_ckpt = time.perf_counter()
    for epoch in range(start, E + 1):
        bl = bc = None
        if epoch:
            bsum, bcor = train_epoch(model, opt, cfg, d, epoch, device)
            nseen = steps * cfg.batch_size if cfg.drop_last else N
            bl = (bsum.double() / nseen).reshape(1).cpu()
            bc = (bcor.double() / nseen).reshape(1).cpu() if d.y is not None else None
        if bar is not None:
            bar.update(1)
        if cfg.recorded(epoch):
            tl, ta = evaluate(model, cfg, d.x, d.y, d.t) if cfg.eval_train else (None, None)
            if record.not_finite(_params_finite(model), tl, bl)[0]:
                record.mark_diverged(rec, cfg, epoch, steps)
                if bar is not None:
                    bar.update(E - epoch)
                break
            vl, va = evaluate(model, cfg, d.xt, d.yt, d.tt)
            snap = metrics.snapshot(model)
            delta = None if epoch == 0 else {
                n: torch.linalg.matrix_norm((snap[n] - prev[n]).double()).reshape(1)
                for n in snap}
            sv = None
            if cfg.spectra_at(epoch):
                mats = {ly.name: snap[ly.name][None] for ly in layers}
                mats[record.HEAD] = snap[record.HEAD][None]
                sv = {n: s.cpu() for n, s in record.spectra(mats, cfg.svd_dtype).items()}
            m = record.Measurement(
                epoch=epoch, step=steps * epoch, lr_now=[cfg.lr_at(epoch)], sv=sv,
                delta=None if delta is None else {n: v.cpu() for n, v in delta.items()},
                train_loss=tl, train_acc=ta, test_loss=vl, test_acc=va, batch_loss=bl,
                batch_acc=bc, bn_var_min=_bn_var_min(model))
            record.append([rec], layers, m)
            prev = snap
        if (ckpt is not None and epoch < E
                and time.perf_counter() - last_ckpt >= checkpoint_every):
            rec["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            _save(ckpt, key, epoch, model, opt, prev, rec, device)
            last_ckpt = time.perf_counter()
        if on_epoch is not None and epoch:
            on_epoch(epoch, [cfg])
    if rec["diverged_epoch"] is None:
        rec["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    rec["seconds"] += time.perf_counter() - t0
    return rec
