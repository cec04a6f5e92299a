"""Sweeps: train many configurations of one architecture as one batched computation, record
ranks and losses per epoch in tidy tables, cache every run on disk.

>>> from sgdrank import sweep
>>> base = sweep.Config(model="MLP-BN-10-100", dataset="fashion-mnist", n_train=5000, n_test=2000,
...                     batch_size=16, lr=0.1, lam=5e-4, epochs=30)
>>> res = sweep.run(sweep.grid(base, lr=[0.05, 0.1], lam=[1e-4, 5e-4], seed=[0, 1]), cache="ch03")
>>> res.epochs      # one row per run x epoch
>>> res.layers      # one row per run x epoch x rank-tracked layer (singular values included)
>>> res.model(0)    # final weights of run 0 as an nn.Module (eval mode)

What one run is (every choice below is the same in the batched engine and the one-at-a-time
``engine="loop"``, and is tested to agree with ``nn.Module`` + ``torch.optim.SGD``):

- **Init**: :func:`sgdrank.models.build_model` with ``seed=cfg.seed`` (PyTorch's default init).
- **Batch order**: in epoch ``e`` (1-based) the run visits the training set in the order
  :func:`batch_order` ``(cfg.seed, e, n)``, a permutation drawn from its own generator (sampling
  without replacement), cut into consecutive batches of ``batch_size``. With ``drop_last=True``
  (default) the last ``n mod B`` samples of each epoch's permutation are skipped, so every step
  uses exactly ``B`` samples (the papers' rank bounds count ``B``); a different set is skipped
  each epoch. ``drop_last=False`` adds a last, smaller batch.
- **Loss**: ``"ce"``: cross-entropy, batch mean; ``"mse"``: ``mean over batch and outputs of
  (f(x) - t)^2`` with ``t`` the one-hot label (``F.mse_loss(f(x), one_hot(y))``), or the real
  target for regression datasets.
- **Weight decay** (the papers' ``lam``, :mod:`sgdrank.conventions`): the step is
  ``W <- (1 - 2 lr lam) W - lr grad`` (``torch.optim.SGD`` with ``weight_decay = 2 lam``). With
  ``decay="all"`` (default) *every* trainable parameter is decayed -- weight matrices, classifier,
  biases, BN ``gamma``/``beta`` -- as in the authors' code and the papers' ``lam ||theta||^2``;
  ``decay="matrices"`` decays only the weight matrices (hidden layers and classifier).
- **Momentum** ``m`` as in ``torch.optim.SGD`` (``v <- m v + g + 2 lam W``, ``W <- W - lr v``);
  the authors' code used 0, the default here.
- **Schedule**: during epoch ``e`` the learning rate is
  ``lr * lr_gamma ** #{m in lr_milestones : m < e}`` (``MultiStepLR`` stepped once per epoch).
- **BN** in training mode uses batch statistics (optionally ``detach_var``); evaluation uses the
  running statistics (eval mode), like ``model.eval()``. The gradient of a bias that feeds a BN
  is exactly 0 (BN removes the batch mean); the batched engine uses that 0 (autograd returns
  rounding noise), so such a bias only decays.
- **Precision**: float32 training (whatever ``torch.get_default_dtype()`` is), float64 metrics.
  The two engines compute the same steps with float32 operations in different orders, so they
  agree to rounding after a step and then drift apart as fast as the training map amplifies
  rounding. Measured on 512 Fashion-MNIST images (``lam = 1e-3``): ``MLP-3-32``, ``B = 64``,
  ``lr = 0.05`` -- the singular values agree to ~1e-6 relative for ~50 steps, then a ReLU that
  switches in one engine and not the other opens a 5e-5 gap, 2e-3 after 320 steps (final
  weights 1.5% apart); ``MLP-BN-10-100``, ``B = 8``, ``lr = 0.1`` -- 3e-2 after one epoch (64
  steps), weights 90% apart after 256 steps (as two PyTorch BN implementations, or a 1e-7
  perturbation of the init, would be). The tests check agreement to 1e-5 over ~20 steps of
  small nets; beyond that the agreement is statistical: compare distributions over seeds, not
  weights.

What is recorded (:mod:`sgdrank.record`, one code path for both engines): at epoch 0 (init),
then at every ``record_every``-th epoch and the last, the eval-mode losses and accuracies on
the whole training and test sets (``train_*``, ``test_*``: what the authors' code reports as
train and test accuracy), the training-mode means over the epoch's mini-batches
(``batch_loss``, ``batch_acc``: a diagnostic, *not* the authors' train accuracy), per
rank-tracked layer its singular values, threshold rank (atol 1e-3), stable rank, norms and change,
the classifier's (``head_*``), GP22's convergence distance, the smallest BN running variance and
two flags: ``diverged`` (something not finite: the run stops, its batch-mates go on) and
``eval_blowup`` (the eval-mode model broke down while the training-mode one trains: BN running
variances near 0 seen at ``B = 8``, ``lr = 0.1``, ``lam = 0.01``). See :mod:`sgdrank.record`.

The parts: :mod:`sgdrank.runconfig` (what a run is: config, schedule, batch order),
:mod:`sgdrank.inputs` (its data as device tensors), :mod:`sgdrank.engine_batched` and
:mod:`sgdrank.engine_loop` (the two engines), :mod:`sgdrank.record` (what an epoch's record is),
:mod:`sgdrank.cache` (keys and files), :mod:`sgdrank.results` (the tables),
:mod:`sgdrank.dispatch` (groups as submitit jobs on a cluster or local processes); this module
groups the runs and calls the engines.

Caching: each run is one file ``<results_dir(cache)>/<key>.pt``, ``key`` = sha256 of the config
and of the source of every file that determines its numbers
(:data:`sgdrank.cache.ENGINE_FILES`). A re-run loads finished runs; a group that was interrupted
resumes from its last checkpoint (``checkpoint_every`` seconds; epoch granularity).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from . import cache as _cache
from . import engine_batched, engine_loop, inputs, runtime
from .batched import Arch, supported
from .cache import ENGINE_FILES, code_hash, run_key
from .record import EPOCH_METRICS, EVAL_BLOWUP, FORMAT, LAYER_METRICS
from .results import Result
from .runconfig import (CONFIG_FIELDS, DATA_FIELDS, DECAYS, GROUP_FIELDS, LOSSES, Config,
                        batch_order, batches, grid, recorded_epochs, replace, steps_per_epoch)

__all__ = ["Config", "Result", "run", "load", "grid", "replace", "batch_order", "batches",
           "steps_per_epoch", "recorded_epochs", "run_key", "code_hash", "CONFIG_FIELDS",
           "DATA_FIELDS", "GROUP_FIELDS", "EPOCH_METRICS", "LAYER_METRICS", "ENGINE_FILES",
           "EVAL_BLOWUP", "FORMAT", "LOSSES", "DECAYS", "supported"]


def run(configs: Config | Iterable[Config], cache: str | Path | None = None, *,
        progress: bool = True,
        device: str | torch.device | None = None, data: Any = None, engine: str = "auto",
        max_k: int | None = None, checkpoint_every: float = 60.0,
        on_epoch: Callable[[int, list], None] | None = None) -> Result:
    """Train ``configs`` (or load them from the cache) and return their :class:`Result`.

    Runs that share :data:`GROUP_FIELDS` are trained together as one batched computation
    (at most ``max_k`` at a time; default: as many as fit ~2^26 parameters per buffer on a
    CPU, 2^28 on a GPU). Each keeps its own init seed, batch order, lr, lam, momentum, schedule;
    its result does not depend on its batch-mates.

    - ``cache``: a chapter name (files under :func:`sgdrank.runtime.results_dir`), a path, or
      None (no cache). One file per run, named by :func:`run_key`.
    - ``device``: :func:`resolve_device` (default: ``$SGDRANK_DEVICE``, else the CPU). Data
      stays on the device; the host synchronises once per epoch (metrics), never per step.
    - ``data``: None (``sgdrank.data.load_dataset`` from the config), one dataset object, a
      mapping ``dataset name -> dataset`` or a callable ``cfg -> dataset`` (objects with
      ``x_train, y_train, x_test, y_test`` and ``n_classes``); the cache key then includes a
      fingerprint of the tensors.
    - ``engine``: ``"batched"``, ``"loop"`` (one ``nn.Module`` at a time; any model, CONV and the
      zoo included) or ``"auto"`` (batched where supported, loop otherwise).
    - ``checkpoint_every``: seconds between checkpoints of a group in training (resume after an
      interruption); 0 = every epoch.
    - ``on_epoch(epoch, configs)``: called after each trained epoch.
    """
    cfgs = [configs] if isinstance(configs, Config) else list(configs)
    if not all(isinstance(c, Config) for c in cfgs):
        raise TypeError("run() takes a Config or a list of Configs (see sweep.grid)")
    if engine not in ("auto", "batched", "loop"):
        raise ValueError(f"unknown engine {engine!r}: use 'auto', 'batched' or 'loop'")
    device = resolve_device(device)
    folder = _cache.folder(cache)

    # keys (custom data: include a fingerprint of the tensors)
    datasets: dict[int, Any] = {}
    fps: dict[int, str] = {}
    keys = []
    for c in cfgs:
        fp = None
        if data is not None:
            ds = inputs.resolve(c, data)
            if id(ds) not in fps:
                datasets[id(ds)] = ds
                fps[id(ds)] = inputs.fingerprint(ds)
            fp = fps[id(ds)]
        keys.append(run_key(c, fp))

    records: list[dict | None] = [None] * len(cfgs)
    cached = [False] * len(cfgs)
    if folder is not None:
        for i, k in enumerate(keys):
            p = folder / f"{k}.pt"
            rec = _cache.load_record(p)
            if rec is not None:
                records[i], cached[i] = rec, True
    # duplicates of one config are trained once
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if records[i] is None and k not in todo:
            todo[k] = i

    groups: dict[tuple, list[int]] = {}
    for k, i in todo.items():
        groups.setdefault(cfgs[i].group_key(), []).append(i)
    total = sum(cfgs[i].epochs + 1 for i in range(len(cfgs)))
    done = sum(cfgs[i].epochs + 1 for i in range(len(cfgs)) if records[i] is not None)
    bar = None
    if progress and todo:
        from .progress import counter
        bar = counter(total=total, initial=done, desc="sweep", unit="run-epoch")
    prepared: tuple | None = None  # (data key, dataset object kept alive, _Data): one at a time
    try:
        for gi, (gkey, idxs) in enumerate(groups.items()):
            c0 = cfgs[idxs[0]]
            dkey = (tuple(getattr(c0, f) for f in DATA_FIELDS), c0.loss)
            if (prepared is None or prepared[0] != dkey
                    or (data is not None and prepared[1] is not inputs.resolve(c0, data))):
                ds = inputs.resolve(c0, data)
                prepared = (dkey, ds, inputs.prepare(ds, c0.loss, device))
            d = prepared[2]
            arch = Arch(c0.model, d.in_shape, d.out_dim, c0.bias, c0.detach_var, c0.activation)
            use_loop = engine == "loop" or (engine == "auto" and not supported(arch))
            if bar is not None:
                bar.set_description(f"sweep {c0.model} B={c0.batch_size} on {device} "
                                    f"[{gi + 1}/{len(groups)}]")
            if use_loop:
                for i in idxs:
                    ck = None if folder is None else _cache.checkpoint_path(folder, [keys[i]])
                    with precision(c0.tf32, device):
                        rec = engine_loop.train(cfgs[i], keys[i], d, device, bar, on_epoch, ck,
                                                checkpoint_every)
                    records[i] = rec
                    if folder is not None:
                        _cache.atomic_save(rec, folder / f"{keys[i]}.pt")
                    if ck is not None and ck.exists():
                        ck.unlink()
                continue
            if max_k is None:
                per_run = sum(p.numel() for p in arch.build().parameters())
                budget = 2**28 if device.type == "cuda" else 2**26
                kmax = max(1, budget // per_run)
            else:
                kmax = max(1, int(max_k))
            for chunk in split_group(idxs, kmax):
                ck = (None if folder is None
                      else _cache.checkpoint_path(folder, [keys[i] for i in chunk]))
                with precision(c0.tf32, device):
                    recs = engine_batched.train([cfgs[i] for i in chunk], [keys[i] for i in chunk],
                                                d, device, bar, ck, checkpoint_every, on_epoch)
                for i, rec in zip(chunk, recs):
                    records[i] = rec
                    if folder is not None:
                        _cache.atomic_save(rec, folder / f"{keys[i]}.pt")
                if ck is not None and ck.exists():
                    ck.unlink()
    finally:
        if bar is not None:
            bar.close()
    for i, k in enumerate(keys):  # duplicates
        if records[i] is None:
            records[i] = records[todo[k]]
    return Result(cfgs, records, cached)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a sweep trains on, an explicit setting: ``device`` if given, else
    ``$SGDRANK_DEVICE``, else the CPU -- never a silent move to a GPU (the book's committed
    numbers are CPU numbers); ``"auto"`` picks cuda, then mps, then cpu
    (:func:`sgdrank.runtime.pick_device`). Raises where the device is missing, and for MPS,
    which has no float64 (the engines measure losses and singular values in float64)."""
    if not isinstance(device, torch.device):
        name = device or os.environ.get("SGDRANK_DEVICE") or "cpu"
        device = runtime.pick_device(None if name == "auto" else name)
    if device.type == "mps":
        raise ValueError("device 'mps' (Apple GPU) has no float64, which the sweep engines use "
                         "for losses and singular values: run sweeps with device='cpu' (or on "
                         "a CUDA GPU)")
    return device


def split_group(idxs: list, kmax: int) -> list[list]:
    """``idxs`` cut into as few chunks of at most ``kmax`` as possible, of balanced sizes
    (15 runs at ``kmax = 12``: 8 + 7, not 12 + 3 -- every chunk takes all the steps, so the
    time is that of the number of chunks, and equal chunks use the device alike)."""
    kmax = max(1, int(kmax))
    n = len(idxs)
    parts = -(-n // kmax)
    out, s = [], 0
    for p in range(parts):
        size = n // parts + (p < n % parts)
        out.append(list(idxs[s:s + size]))
        s += size
    return out


@contextlib.contextmanager
def precision(tf32: bool, device) -> Iterator[None]:
    """Inside: CUDA matrix products and cuDNN convolutions in full float32 (``tf32=False``) or
    TF32 (``True``), cuDNN deterministic and not benchmarking (a resumed run repeats its
    arithmetic); the previous settings are restored after. Nothing is touched on the CPU
    (``Config.tf32`` is in the cache key either way)."""
    if torch.device(device).type != "cuda":
        yield
        return
    cu, cd = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cu.allow_tf32, cd.allow_tf32, cd.deterministic, cd.benchmark)
    try:
        cu.allow_tf32 = cd.allow_tf32 = bool(tf32)
        cd.deterministic, cd.benchmark = True, False
        yield
    finally:
        cu.allow_tf32, cd.allow_tf32, cd.deterministic, cd.benchmark = saved


def load(configs: Config | Iterable[Config], cache: str | Path, data: Any = None) -> Result:
    """The cached results of ``configs``; raises (naming the missing runs) if any is not cached."""
    cfgs = [configs] if isinstance(configs, Config) else list(configs)
    folder = _cache.folder(cache)
    recs, missing = [], []
    for i, c in enumerate(cfgs):
        fp = inputs.fingerprint(inputs.resolve(c, data)) if data is not None else None
        rec = _cache.load_record(folder / f"{run_key(c, fp)}.pt")
        if rec is None:
            missing.append(i)
        recs.append(rec)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(cfgs)} runs are not in the cache "
                                f"{str(folder)!r} "
                                f"(e.g. run {missing[0]}: {cfgs[missing[0]]}); "
                                "compute them with sweep.run")
    return Result(cfgs, recs, [True] * len(cfgs))
