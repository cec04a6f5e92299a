"""What a sweep will cost before its first step: SGD steps, FLOPs, recording work, time and
peak memory on the current device, and a clear refusal when it cannot fit.

>>> from sgdrank import cost
>>> est = cost.estimate(configs, cache="ch03")   # configs: a list of sweep.Config
>>> print(est.text())
about 3.1 CPU-hours on this machine (42 runs to train); peak 2.1 GB of 24 GB
>>> cost.show(configs, cache="ch03")             # one line under a chapter's settings table

How the estimate is made (:func:`estimate`):

- **Steps** from the configs: ``epochs x steps_per_epoch(n_train, B)`` per run; runs already in
  the cache (``cache=``) cost nothing.
- **FLOPs** of one SGD step per sample (forward + backward) counted on the model itself with
  ``torch.utils.flop_counter`` (matrix products and convolutions), and of an evaluation pass
  (forward only) at every recorded epoch over the training (``eval_train``) and test sets.
- **Recording**: one SVD per rank-tracked matrix and per run at every epoch with spectra
  (:meth:`sgdrank.runconfig.Config.spectra_at`), by shape and dtype.
- **Time**: a short timed *probe* on the current device -- a few SGD steps of the group itself
  (same engine, same K, same batch size, synthetic inputs of the right shape), one evaluation
  chunk and the group's SVDs -- scaled to the whole sweep. Distinct groups are probed in order of
  their share of the FLOPs while the probe budget (``probe_seconds``) lasts; a group not probed
  is timed at the FLOP rate of the probed group nearest to it in FLOPs per step.
- **Memory**: device -- the data tensors, K copies of parameters, gradients and momentum, the
  activations of one batch of K runs (the outputs of every module, twice: forward and
  backward), an evaluation chunk and the SVD workspace; host -- the process now, the dataset,
  and the final weights and spectra of every run (a :class:`sgdrank.sweep.Result` keeps them).
  On the CPU the two are one pool (the machine's RAM).

The probe's own time is in ``Estimate.probe_seconds``. On the CPU the estimate is tested
against measured sweeps (``tests/test_cost.py``: within a factor of 2); on real Fashion-MNIST
sweeps here (one thread, 2026-12-06) it was within 10% in time and in peak memory
(``benchmarks/README.md``). Loading a dataset for the first time is not included. It is an estimate:
load from other processes, thermal limits and, on a GPU, kernel-launch overhead at small sizes
move the real time; the probe measures that overhead at the group's own size.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from . import cache as _cache
from . import engine_loop, inputs
from .batched import Arch, supported
from .runconfig import Config, steps_per_epoch
from .sweep import resolve_device, split_group

#: full training / test sizes of the registered datasets (``n_train=None``)
FULL_SIZES = {"fashion-mnist": (60000, 10000), "mnist": (60000, 10000),
              "cifar10": (50000, 10000), "digits": (1437, 360), "diabetes": (353, 89),
              "synthetic-regression": (1000, 1000), "california": (16512, 4128)}
#: share of a device's (or the machine's) memory a sweep may plan to use
MEMORY_SHARE = 0.9
GB = 1e9


class CostError(RuntimeError):
    """A sweep that cannot fit this device's or this machine's memory (the message says what to
    do instead)."""


@dataclass
class GroupCost:
    """The cost of one chunk of runs trained together (one engine call)."""
    model: str
    batch_size: int
    k: int                 # runs trained together (1 for the loop engine: runs one at a time)
    runs: int              # runs in this chunk (k, or the number of loop runs)
    engine: str
    steps: int             # SGD steps of one run
    flops: float           # training + evaluation FLOPs of all runs
    svds: dict             # (m, n, dtype) -> number of SVDs
    device_bytes: float
    seconds: float = float("nan")
    probed: bool = False
    step_seconds: float = float("nan")     # one step of the k runs (measured or scaled)
    eval_seconds: float = float("nan")     # one evaluation (train + test sets) of the k runs
    svd_seconds: float = float("nan")      # one epoch's SVDs of the k runs
    setup_seconds: float = 0.0             # building the k networks (per chunk / per loop run)
    eval_flops: float = 0.0                # the evaluation part of ``flops``
    kernels: int = 0                       # kernels launched per step (reference model)
    fp64_flops: float = 0.0                # float64 matrix products (analysis), not in ``flops``


@dataclass
class Estimate:
    """A sweep's estimated cost on ``device`` (see the module docstring)."""
    device: str
    device_name: str
    runs: int
    cached: int
    steps: int                  # SGD steps summed over the runs to train
    flops: float                # training + evaluation FLOPs
    svds: int                   # singular value decompositions
    seconds: float
    peak_device_bytes: float
    device_total_bytes: float
    peak_host_bytes: float
    host_total_bytes: float
    probe_seconds: float
    groups: list = field(default_factory=list)
    #: :func:`show_profiles` keeps its table here: ``{profile: (Estimate, RefCost)}``
    profiles: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return (self.peak_device_bytes <= MEMORY_SHARE * self.device_total_bytes
                and self.peak_host_bytes <= MEMORY_SHARE * self.host_total_bytes)

    def text(self) -> str:
        """One line: ``about 3.1 CPU-hours on this machine (42 runs to train); peak 2.1 GB of
        24 GB``."""
        if self.runs == self.cached:
            return f"all {self.runs} runs are in the cache: nothing to train"
        todo = self.runs - self.cached
        kind = "GPU" if self.device.startswith("cuda") else self.device.split(":")[0].upper()
        where = "this machine" if kind == "CPU" else f"this {self.device_name}"
        cached = f", {self.cached} cached" if self.cached else ""
        mem = f"peak {_gb(self.peak_device_bytes)} of {_gb(self.device_total_bytes)}"
        if kind != "CPU":
            mem += (f" on the device, {_gb(self.peak_host_bytes)} of "
                    f"{_gb(self.host_total_bytes)} on the host")
        runs = "1 run" if todo == 1 else f"{todo} runs"
        if math.isnan(self.seconds):  # probe=False
            return (f"{self.steps:,} SGD steps, {self.flops:.2g} FLOPs and {self.svds:,} SVDs "
                    f"({runs} to train{cached}; time not probed); {mem}")
        return (f"about {_duration(self.seconds, kind)} on {where} ({runs} to train"
                f"{cached}); {mem}")

    def __str__(self) -> str:
        return self.text()

    def _repr_markdown_(self) -> str:
        return f"*Estimated cost:* {self.text()}."

    def on(self, ref: "Reference | None" = None) -> "RefCost":
        """This work on a reference GPU by the spec-sheet model (:func:`on_reference`)."""
        return on_reference(self, ref or COLAB_T4)

    def table(self):
        """One row per probed or scaled group (pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in g.__dict__.items() if k != "svds"}
                             for g in self.groups])


def _gb(b: float) -> str:
    v = b / GB
    return f"{v:.2g} GB" if v < 10 else f"{v:.0f} GB"


def _duration(s: float, kind: str) -> str:
    if s < 90:
        return f"{max(1, round(s))} {kind}-seconds"
    if s < 5400:
        return f"{s / 60:.0f} {kind}-minutes"
    h = s / 3600
    return f"{h:.1f} {kind}-hours" if h < 100 else f"{h:,.0f} {kind}-hours"


# --------------------------------------------------------------------------- shapes and FLOPs
def _shapes(cfg: Config, data: Any) -> tuple[tuple, int, int, int]:
    """``(in_shape, out_dim, n_train, n_test)`` of ``cfg``'s data, without loading it when the
    dataset is registered (shapes from :data:`sgdrank.data.DATASETS`)."""
    if data is not None:
        ds = inputs.resolve(cfg, data)
        x, xt = torch.as_tensor(ds.x_train), torch.as_tensor(ds.x_test)
        y = torch.as_tensor(ds.y_train)
        shape = tuple(getattr(ds, "input_shape", None) or tuple(x.shape[1:]))
        if y.is_floating_point():
            out = 1 if y.ndim == 1 else int(y.shape[1])
        else:
            out = int(getattr(ds, "n_classes", None) or int(y.max()) + 1)
        return shape, out, int(x.shape[0]), int(xt.shape[0])
    from . import data as D  # noqa: N812

    if cfg.dataset not in D.DATASETS:
        raise ValueError(f"dataset {cfg.dataset!r} is not registered in sgdrank.data: pass the "
                         f"data the sweep will use (estimate(..., data=...))")
    info = D.DATASETS[cfg.dataset]
    full = FULL_SIZES.get(cfg.dataset, (cfg.n_train or 0, cfg.n_test or 0))
    n_tr = full[0] if cfg.n_train is None else int(cfg.n_train)
    n_te = full[1] if cfg.n_test is None else int(cfg.n_test)
    out = len(cfg.classes) if cfg.classes else (info.n_classes or 1)
    return tuple(info.input_shape), int(out), n_tr, n_te


_FLOPS: dict = {}


def model_profile(arch: Arch) -> dict:
    """Per sample: training FLOPs (forward + backward), forward FLOPs, activation floats (the
    outputs of every leaf module); per run: parameters, rank-tracked matrix shapes. Cached."""
    key = arch
    if key in _FLOPS:
        return _FLOPS[key]
    from torch.utils.flop_counter import FlopCounterMode

    net = arch.build(seed=0).float()
    image = arch.parse()[0] in ("CONV", "ZOO")
    x = torch.randn(2, *arch.in_shape) if image else torch.randn(2, arch.in_dim)
    acts = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            acts[0] += out.numel()

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with FlopCounterMode(display=False) as fc:
        out = net(x)
    fwd = fc.get_total_flops() / 2
    for h in handles:
        h.remove()
    with FlopCounterMode(display=False) as fc:
        net(x).sum().backward()
    train = fc.get_total_flops() / 2
    from . import metrics

    mats = [tuple(metrics.as_matrix(m.weight).shape) for _, m in net.rank_layers()]
    head = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    mats.append(tuple(metrics.as_matrix(head.weight).shape))
    prof = {"train_flops": max(train, 3 * fwd), "fwd_flops": fwd, "acts": acts[0] / 2,
            "params": sum(p.numel() for p in net.parameters()), "matrices": mats,
            "out_numel": out.numel() / 2}
    _FLOPS[key] = prof
    return prof


def _svd_flops(m: int, n: int) -> float:
    a, b = max(m, n), min(m, n)
    return 4.0 * a * b * b + 8.0 * b ** 3  # singular values only (Golub-Van Loan, rough)


# --------------------------------------------------------------------------- the plan
def _plan(cfgs: list[Config], data, engine: str, max_k: int | None, device: torch.device):
    """The chunks the sweep would train, as (configs, arch, sizes, use_loop)."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(c.group_key(), []).append(i)
    plan = []
    for idxs in groups.values():
        c0 = cfgs[idxs[0]]
        in_shape, out, n_tr, n_te = _shapes(c0, data)
        arch = Arch(c0.model, in_shape, out, c0.bias, c0.detach_var, c0.activation)
        use_loop = engine == "loop" or (engine == "auto" and not supported(arch))
        if use_loop:
            plan.append(([cfgs[i] for i in idxs], arch, (n_tr, n_te), True))
            continue
        if max_k is None:
            per_run = model_profile(arch)["params"]
            budget = 2**28 if device.type == "cuda" else 2**26
            kmax = max(1, budget // per_run)
        else:
            kmax = max(1, int(max_k))
        for ch in split_group(idxs, kmax):
            plan.append(([cfgs[i] for i in ch], arch, (n_tr, n_te), False))
    return plan


def _spectra_epochs(c: Config) -> int:
    return sum(1 for e in range(c.epochs + 1) if c.spectra_at(e))


def _group_cost(cfgs, arch, sizes, use_loop) -> GroupCost:
    c0 = cfgs[0]
    n_tr, n_te = sizes
    prof = model_profile(arch)
    steps = c0.epochs * steps_per_epoch(n_tr, c0.batch_size, c0.drop_last)
    n_rec = sum(1 for e in range(c0.epochs + 1) if c0.recorded(e))
    n_eval = (n_tr if c0.eval_train else 0) + n_te
    n_spec = _spectra_epochs(c0)
    R = len(cfgs)
    eval_flops = R * n_rec * n_eval * prof["fwd_flops"]
    flops = R * steps * c0.batch_size * prof["train_flops"] + eval_flops
    svds: dict = {}
    for m, n in prof["matrices"]:
        k = (m, n, c0.svd_dtype)
        svds[k] = svds.get(k, 0) + R * n_spec
    K = 1 if use_loop else R
    P = prof["params"]
    mom = any(c.momentum for c in cfgs)
    din = math.prod(arch.in_shape)
    data_b = 4.0 * (n_tr + n_te) * (din + (arch.out_dim if c0.loss == "mse" else 0)) + 8 * (
        n_tr + n_te)
    params_b = 4.0 * K * P * (3 + mom)              # weights, gradients, previous record, mom
    acts_b = 4.0 * K * c0.batch_size * prof["acts"] * 2
    if use_loop:  # one chunk of EVAL_CHUNK samples through the model, no graph kept
        eval_b = 4.0 * min(n_tr + n_te, engine_loop.EVAL_CHUNK) * prof["acts"]
    else:  # BatchedNet.evaluate: chunks of ~2^23 floats per layer output, a few alive at once
        eval_b = 4.0 * 2**23 * 4
    svd_b = max((8.0 * K * m * n * 3 for m, n in prof["matrices"]), default=0.0)
    kernels = KERNELS_LOOP_PER_MATRIX * len(prof["matrices"]) if use_loop else KERNELS_BATCHED
    return GroupCost(c0.model, c0.batch_size, K, R, "loop" if use_loop else "batched", steps,
                     flops, svds, data_b + params_b + max(acts_b, eval_b, svd_b),
                     eval_flops=eval_flops, kernels=kernels)


# --------------------------------------------------------------------------- the probe
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic(arch: Arch, n: int, n_test: int, loss: str, device) -> inputs.GroupData:
    g = torch.Generator().manual_seed(0)
    d = math.prod(arch.in_shape)
    x = torch.randn(n, d, generator=g).to(device)
    xt = torch.randn(n_test, d, generator=g).to(device)
    C = arch.out_dim
    y = torch.randint(0, C, (n,), generator=g).to(device)
    yt = torch.randint(0, C, (n_test,), generator=g).to(device)
    t = tt = None
    if loss == "mse":
        t = torch.nn.functional.one_hot(y, C).float()
        tt = torch.nn.functional.one_hot(yt, C).float()
    return inputs.GroupData(x, y, t, xt, yt, tt, tuple(arch.in_shape), C)


_SVD_T: dict = {}


def _time_svds(gc: GroupCost, device) -> float:
    """Seconds of one epoch's SVDs of this group (K matrices per shape and dtype), measured
    once per shape on ``device`` (wide matrices as their transposes, as the recorder does)."""
    mult: dict = {}
    for (m, n, dt) in gc.svds:
        key = (max(m, n), min(m, n), dt)
        mult[key] = mult.get(key, 0) + 1
    return sum(_svd_seconds(m, n, dt, device, gc.k) * times for (m, n, dt), times in mult.items())


def _probe(cfgs, arch, sizes, use_loop, gc: GroupCost, device, steps: int) -> None:
    """Time ``steps`` SGD steps (after one warm-up step), one evaluation chunk and one epoch's
    SVDs of this group on ``device``; fill ``gc.step_seconds``, ``record_seconds``, ``seconds``."""
    c0 = cfgs[0]
    B = c0.batch_size
    n_tr, n_te = sizes
    n_eval = (n_tr if c0.eval_train else 0) + n_te
    probe_eval = min(n_eval, 1024 if use_loop else 2048)
    d = _synthetic(arch, B * (steps + 1), probe_eval, c0.loss, device)
    if use_loop:
        cfg = c0
        t = time.perf_counter()
        model = arch.build(seed=cfg.seed).to(device=device, dtype=torch.float32)
        gc.setup_seconds = time.perf_counter() - t
        opt = engine_loop._optimizer(model, cfg)
        engine_loop.train_epoch(model, opt, cfg, _synthetic(arch, B, 0, c0.loss, device), 1,
                                device)  # warm-up: one step
        step_s = math.inf
        for rep in (2, 3):  # the faster of two repetitions (less noise from other processes)
            _sync(device)
            t = time.perf_counter()
            engine_loop.train_epoch(model, opt, cfg, d, rep, device)
            _sync(device)
            step_s = min(step_s, (time.perf_counter() - t) / (steps + 1))
        t = time.perf_counter()
        engine_loop.evaluate(model, cfg, d.xt, d.yt, d.tt)
        _sync(device)
        eval_s = (time.perf_counter() - t) * n_eval / probe_eval
    else:
        from . import engine_batched

        t = time.perf_counter()
        g = engine_batched._Group(cfgs, [str(i) for i in range(len(cfgs))], d, device)
        gc.setup_seconds = time.perf_counter() - t
        warm = _synthetic(arch, B, 0, c0.loss, device)
        g.d = warm
        g.n_full, g.steps = 1, 1
        g.train_epoch(1)
        g.d = d
        g.n_full = g.steps = steps + 1
        step_s = math.inf
        for rep in (2, 3):  # the faster of two repetitions (less noise from other processes)
            _sync(device)
            t = time.perf_counter()
            g.train_epoch(rep)
            _sync(device)
            step_s = min(step_s, (time.perf_counter() - t) / (steps + 1))
        t = time.perf_counter()
        g._evaluate(d.xt, d.tt, d.yt)
        _sync(device)
        eval_s = (time.perf_counter() - t) * n_eval / probe_eval
    svd_s = _time_svds(gc, device)
    _fill(gc, step_s, eval_s, svd_s, c0)
    gc.probed = True


def _fill(gc: GroupCost, step_s: float, eval_s: float, svd_s: float, c0: Config) -> None:
    n_rec = sum(1 for e in range(c0.epochs + 1) if c0.recorded(e))
    n_spec = _spectra_epochs(c0)
    reps = gc.runs if gc.engine == "loop" else 1
    gc.step_seconds, gc.eval_seconds, gc.svd_seconds = step_s, eval_s, svd_s
    gc.seconds = reps * (gc.setup_seconds + gc.steps * step_s + n_rec * eval_s + n_spec * svd_s)


# --------------------------------------------------------------------------- memory totals
def device_memory(device: torch.device) -> tuple[str, float]:
    """``(name, total bytes)`` of ``device`` (the machine's RAM for the CPU)."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return p.name, float(p.total_memory)
    return "machine", host_memory()


def host_memory() -> float:
    """Total RAM of this machine (bytes); a cgroup limit counts when lower."""
    total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = open(p).read().strip()
            if v.isdigit() and 0 < int(v) < total:
                total = float(v)
        except OSError:
            pass
    return total


def _rss() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0.5 * GB


# --------------------------------------------------------------------------- the estimate
def estimate(configs: "Config | Work | Iterable[Config | Work]", cache=None, *, device=None,
             data: Any = None, engine: str = "auto", max_k: int | None = None,
             probe: bool = True, probe_seconds: float = 10.0, probe_steps: int = 8,
             check: bool = True) -> Estimate:
    """Estimate the cost of ``sweep.run(configs, cache, device=device, data=data, engine=...,
    max_k=...)`` (see the module docstring). Runs already in ``cache`` are not counted.

    ``configs`` may be a chapter's plan, ``{part: [Config | Work, ...]}``, and may hold
    :class:`Work` items (training outside ``sweep.run``, e.g. Chapter
    5's two-layer networks): they are estimated by :func:`estimate_work` and added.
    ``probe=False`` skips the timed probe (``seconds`` is then NaN: FLOPs and memory only).
    ``check``: raise :class:`CostError` when the peak memory exceeds
    :data:`MEMORY_SHARE` of the device's or of the machine's memory."""
    if isinstance(configs, Mapping):  # a chapter's plan: {part: [Config | Work, ...]}
        configs = [c for part in configs.values() for c in part]
    items = [configs] if isinstance(configs, (Config, Work)) else list(configs)
    works = [w for w in items if isinstance(w, Work)]
    cfgs = [c for c in items if not isinstance(c, Work)]
    if works:
        parts = [estimate_work(works, device=device, probe=probe, check=False)]
        if cfgs:
            parts.insert(0, estimate(cfgs, cache, device=device, data=data, engine=engine,
                                     max_k=max_k, probe=probe, probe_seconds=probe_seconds,
                                     probe_steps=probe_steps, check=False))
        est = combine(parts)
        if check and not est.fits:
            raise CostError(_refusal(est))
        return est
    device = resolve_device(device)
    folder = _cache.folder(cache)
    todo, cached, seen = [], 0, set()
    for c in cfgs:
        fp = inputs.fingerprint(inputs.resolve(c, data)) if data is not None else None
        k = _cache.run_key(c, fp)
        if folder is not None and _cache.load_record(folder / f"{k}.pt") is not None:
            cached += 1
        elif k not in seen:
            seen.add(k)
            todo.append(c)
    name, dev_total = device_memory(device)
    host_total = host_memory()
    plan = _plan(todo, data, engine, max_k, device)
    gcs = [_group_cost(*p) for p in plan]
    t0 = time.perf_counter()
    if probe and gcs:
        order = sorted(range(len(gcs)), key=lambda i: -gcs[i].flops)
        done_sig: dict = {}
        for i in order:
            p, gc = plan[i], gcs[i]
            sig = (gc.model, gc.batch_size, gc.k, gc.engine, p[1].in_shape, gc.steps > 0)
            if sig in done_sig:
                src = gcs[done_sig[sig]]
                gc.setup_seconds = src.setup_seconds
                _fill(gc, src.step_seconds, src.eval_seconds, src.svd_seconds, p[0][0])
                continue
            if done_sig and time.perf_counter() - t0 > probe_seconds:
                continue
            _probe(*p, gc, device, probe_steps)
            done_sig[sig] = i
        probed = [g for g in gcs if g.probed]
        for i, gc in enumerate(gcs):
            if not math.isnan(gc.seconds):
                continue
            ref = min(probed, key=lambda g: abs(math.log(_step_flops(g) / _step_flops(gc))))
            scale = _step_flops(gc) / _step_flops(ref)
            gc.setup_seconds = ref.setup_seconds
            _fill(gc, ref.step_seconds * scale, ref.eval_seconds * scale,
                  _time_svds(gc, device), plan[i][0][0])
    probe_s = time.perf_counter() - t0
    peak_dev = max((g.device_bytes for g in gcs), default=0.0)
    states = 0.0
    for (cs, arch, _s, _l) in plan:
        prof = model_profile(arch)
        nspec = _spectra_epochs(cs[0])
        svs = sum(min(m, n) for m, n in prof["matrices"]) * 8.0 * nspec
        states += len(cs) * (4.0 * prof["params"] + svs)
    data_host = max((g.device_bytes for g in gcs), default=0.0) if device.type == "cpu" else 0.0
    peak_host = _rss() + states + (data_host if device.type == "cpu" else max(
        (4.0 * sum(p[2]) * math.prod(p[1].in_shape) for p in plan), default=0.0))
    if device.type == "cpu":
        peak_dev = peak_host
    est = Estimate(str(device), name, len(cfgs), cached,
                   sum(g.steps * g.runs for g in gcs), sum(g.flops for g in gcs),
                   sum(sum(g.svds.values()) for g in gcs),
                   sum(g.seconds for g in gcs) if probe else float("nan"),
                   peak_dev, dev_total, peak_host, host_total, probe_s, gcs)
    if check and not est.fits:
        raise CostError(_refusal(est))
    return est


# --------------------------------------------------------------------------- other engines
@dataclass
class Work:
    """Training that does not go through ``sweep.run`` (Chapter 4's weight-normalised network,
    Chapter 5's two-layer networks), described by its owner module for :func:`estimate`.

    ``runs`` runs in all, trained ``k`` at a time (one *call*: ``ceil(runs / k)`` calls), each
    call ``steps`` SGD steps of ``step_flops`` FLOPs (forward + backward of the ``k`` runs),
    ``eval_flops`` FLOPs of evaluation and ``svds`` (``{(m, n, dtype): count}``) per call.
    ``device_bytes``: peak device memory of one call; ``host_bytes``: what a call leaves on the
    host (results). ``probe(n)``: runs ``n`` steps of one call on the device it is given and
    returns the seconds per step (None: no probe, time unknown). ``kernels``: kernels launched
    per step (the reference model's launch floor). ``fp64_flops``: float64 matrix-product FLOPs
    per call (an analysis in double precision), timed at the float64 rate (on a reference GPU
    its float64 peak; on this device half the probed float32 rate)."""
    label: str
    runs: int
    k: int
    steps: int
    step_flops: float
    batch_size: int = 0
    eval_flops: float = 0.0
    svds: dict = field(default_factory=dict)
    device_bytes: float = 0.0
    host_bytes: float = 0.0
    probe: Any = None
    kernels: int = 30
    fp64_flops: float = 0.0

    @property
    def calls(self) -> int:
        return -(-int(self.runs) // max(1, int(self.k)))


def _svd_seconds(m: int, n: int, dt: str, device, batch: int = 1) -> float:
    """Measured seconds of ``batch`` singular-value decompositions of ``m x n`` (cached)."""
    m, n = max(m, n), min(m, n)
    key = (str(device), batch, m, n, dt)
    if key not in _SVD_T:
        w = torch.randn(batch, m, n, device=device, dtype=getattr(torch, dt))
        torch.linalg.svdvals(w)
        _sync(device)
        t = time.perf_counter()
        torch.linalg.svdvals(w)
        _sync(device)
        _SVD_T[key] = time.perf_counter() - t
    return _SVD_T[key]


def estimate_work(works: "Work | Iterable[Work]", *, device=None, probe: bool = True,
                  probe_steps: int = 4, check: bool = True) -> Estimate:
    """The :class:`Estimate` of ``works``: FLOPs and memory from the descriptions, time from
    each work's own probe (``probe_steps`` steps on ``device``) scaled to all its steps;
    evaluation time at the probed FLOP rate; SVDs timed by shape on ``device``."""
    ws = [works] if isinstance(works, Work) else list(works)
    device = resolve_device(device)
    name, dev_total = device_memory(device)
    t0 = time.perf_counter()
    gcs = []
    for w in ws:
        calls = w.calls
        svds = {key: calls * int(v) for key, v in w.svds.items()}
        gc = GroupCost(w.label, w.batch_size, w.k, w.runs, "custom", w.steps,
                       calls * (w.steps * w.step_flops + w.eval_flops), svds, w.device_bytes,
                       eval_flops=calls * w.eval_flops, kernels=w.kernels,
                       fp64_flops=calls * w.fp64_flops)
        if probe and w.probe is not None and w.steps > 0:
            step_s = float(w.probe(probe_steps))
            rate = w.step_flops / max(step_s, 1e-12)
            gc.step_seconds, gc.eval_seconds = step_s, w.eval_flops / rate
            gc.svd_seconds = sum(c * _svd_seconds(m, n, dt, device)
                                 for (m, n, dt), c in w.svds.items())
            gc.seconds = calls * (w.steps * step_s + gc.eval_seconds + gc.svd_seconds
                                  + 2 * w.fp64_flops / rate)
            gc.probed = True
        elif probe and w.steps == 0:
            gc.seconds = 0.0
        gcs.append(gc)
    states = sum(w.calls * w.host_bytes for w in ws)
    peak_dev = max((g.device_bytes for g in gcs), default=0.0)
    peak_host = _rss() + states + (peak_dev if device.type == "cpu" else 0.0)
    if device.type == "cpu":
        peak_dev = peak_host
    seconds = sum(g.seconds for g in gcs) if probe else float("nan")
    est = Estimate(str(device), name, sum(w.runs for w in ws), 0,
                   sum(w.steps * w.calls for w in ws), sum(g.flops for g in gcs),
                   sum(sum(g.svds.values()) for g in gcs), seconds, peak_dev, dev_total,
                   peak_host, host_memory(), time.perf_counter() - t0, gcs)
    if check and not est.fits:
        raise CostError(_refusal(est))
    return est


def combine(parts: "Iterable[Estimate]") -> Estimate:
    """Several estimates on one device, run one after another: counts, FLOPs and times add;
    the peaks are the largest (each part frees its device memory; hosts keep results, counted
    in each part's own host peak)."""
    ps = list(parts)
    if not ps:
        raise ValueError("combine() needs at least one estimate")
    if len({p.device for p in ps}) > 1:
        raise ValueError(f"estimates on different devices: {sorted({p.device for p in ps})}")
    a = ps[0]
    return Estimate(a.device, a.device_name, sum(p.runs for p in ps), sum(p.cached for p in ps),
                    sum(p.steps for p in ps), sum(p.flops for p in ps),
                    sum(p.svds for p in ps), sum(p.seconds for p in ps),
                    max(p.peak_device_bytes for p in ps), a.device_total_bytes,
                    max(p.peak_host_bytes for p in ps), a.host_total_bytes,
                    sum(p.probe_seconds for p in ps), [g for p in ps for g in p.groups])


# --------------------------------------------------------------------------- a reference GPU
#: kernels launched per SGD step by the batched engine whatever K is (eager PyTorch; counted in
#: issue 20's audit) and by the loop engine per rank-tracked matrix (forward, backward, optimiser)
KERNELS_BATCHED = 180
KERNELS_LOOP_PER_MATRIX = 25


@dataclass(frozen=True)
class Reference:
    """A GPU described by its spec sheet, for the time a profile would take on it *by a model*,
    never a measurement: training and evaluation FLOPs at ``efficiency`` of the float32 peak,
    but no step faster than its kernel launches (``kernels x launch_seconds``); each SVD at
    ``svd_efficiency`` of the peak of its dtype, and no faster than ``svd_floor`` seconds.
    The constants are assumptions (stated in the chapter under the estimate): no GPU was
    available to calibrate them (``benchmarks/gpu_check.sh`` measures the real numbers)."""
    name: str
    fp32_flops: float
    fp64_flops: float
    memory: float           # device memory (bytes)
    host_memory: float      # the host's RAM (bytes)
    efficiency: float = 0.35
    svd_efficiency: float = 0.01
    svd_floor: float = 2e-3
    launch_seconds: float = 8e-6


#: Google Colab's free GPU: NVIDIA Tesla T4 (8.1 TFLOPS float32, 0.25 float64, 15 GB) on a host
#: with 12.7 GB of RAM
COLAB_T4 = Reference("Colab T4", 8.1e12, 0.25e12, 15.0 * GB, 12.7 * GB)
#: the same T4 with every assumption made worse (20% of peak, launches twice as slow, SVDs at
#: half the rate): the upper end of the range the chapters show next to the model's estimate
PESSIMISTIC_T4 = Reference("Colab T4", 8.1e12, 0.25e12, 15.0 * GB, 12.7 * GB, efficiency=0.20,
                           svd_efficiency=0.005, launch_seconds=16e-6)


def assumptions(ref: Reference = COLAB_T4, worse: Reference = PESSIMISTIC_T4) -> str:
    """Every constant of the spec-sheet model, for the footnote under a cost table."""
    return (f"FLOPs at {ref.efficiency:.0%} of its {ref.fp32_flops / 1e12:.1f} TFLOPS "
            f"(float64: {ref.fp64_flops / 1e12:.2f}); no step faster than its kernel launches, "
            f"{KERNELS_BATCHED} per step of the batched engine and {KERNELS_LOOP_PER_MATRIX} per "
            f"matrix of the loop engine, at {ref.launch_seconds * 1e6:.0f} µs each; SVDs at "
            f"{ref.svd_efficiency:.0%} of peak, at least {ref.svd_floor * 1e3:.0f} ms each. "
            f"Pessimistic: {worse.efficiency:.0%} of peak, "
            f"{worse.launch_seconds * 1e6:.0f} µs per launch, SVDs at "
            f"{worse.svd_efficiency:.1%} of peak")


@dataclass
class RefCost:
    """:func:`on_reference`'s answer: modelled seconds and memory on ``ref``."""
    ref: Reference
    seconds: float
    train_seconds: float
    svd_seconds: float
    peak_device_bytes: float
    peak_host_bytes: float

    @property
    def fits(self) -> bool:
        return (self.peak_device_bytes <= MEMORY_SHARE * self.ref.memory
                and self.peak_host_bytes <= MEMORY_SHARE * self.ref.host_memory)

    def text(self) -> str:
        """``about 52 GPU-minutes on a Colab T4 (spec-sheet model); peak 3.1 GB of 15 GB``"""
        fit = "" if self.fits else " -- does not fit"
        return (f"about {_duration(self.seconds, 'GPU')} on a {self.ref.name} (spec-sheet "
                f"model); peak {_gb(self.peak_device_bytes)} of {_gb(self.ref.memory)}{fit}")


def on_reference(est: Estimate, ref: Reference = COLAB_T4) -> RefCost:
    """The modelled time and memory of ``est``'s work on ``ref`` (see :class:`Reference`).

    Per group: ``calls x steps x max(step FLOPs / (efficiency x peak), kernels x launch)``
    for training (a call: one chunk of ``k`` batched runs, or one loop run), evaluation FLOPs at
    the same rate, and every SVD at ``max(svd_flops / (svd_efficiency x dtype peak), floor)``.
    Memory: the largest group's device bytes; the host peak of ``est`` less the device work it
    counted on a CPU."""
    train = svd = 0.0
    for g in est.groups:
        calls = g.runs if g.engine == "loop" else -(-g.runs // max(1, g.k))
        step_flops = (g.flops - g.eval_flops) / max(1, calls * g.steps)
        rate = ref.efficiency * ref.fp32_flops
        per_step = max(step_flops / rate, g.kernels * ref.launch_seconds)
        train += calls * g.steps * per_step + g.eval_flops / rate
        for (m, n, dt), count in g.svds.items():
            peak = ref.fp64_flops if dt == "float64" else ref.fp32_flops
            svd += count * max(_svd_flops(m, n) / (ref.svd_efficiency * peak), ref.svd_floor)
        train += g.fp64_flops / (ref.efficiency * ref.fp64_flops)
    dev = max((g.device_bytes for g in est.groups), default=0.0)
    host = est.peak_host_bytes - (dev if est.device == "cpu" else 0.0)
    return RefCost(ref, train + svd, train, svd, dev, max(host, 0.0))


def _step_flops(g: GroupCost) -> float:
    return max(1.0, g.flops / max(1, g.steps * g.runs)) * (g.k if g.engine == "batched" else 1)


def _refusal(est: Estimate) -> str:
    where = ("the device" if est.peak_device_bytes > MEMORY_SHARE * est.device_total_bytes
             else "this machine's memory")
    return (f"this sweep does not fit {where}: {est.text()}. Use the chapter's `gpu` profile "
            f"(smaller models or fewer runs per group: max_k), a GPU with more memory, or the "
            f"cluster path (SGDRANK_EXECUTOR=slurm, README.md 'Sweeps on a Slurm cluster').")


def show(configs, cache=None, **kw) -> Estimate:
    """Display :func:`estimate`'s one line (Markdown in a notebook) and return the estimate; the
    one-line call under a chapter's settings table. Raises :class:`CostError` when the sweep
    cannot fit."""
    est = estimate(configs, cache, **kw)
    try:
        from IPython.display import Markdown, display

        display(Markdown(est._repr_markdown_()))
    except ImportError:  # pragma: no cover
        print(est.text())
    return est


# --------------------------------------------------------------------------- under the settings
#: MIME type of the record :func:`show_profiles` stores in a chapter's outputs (tests read it)
COST_MIME = "application/vnd.sgdrank.cost+json"
#: the profiles whose cost on the reference GPU is shown under every training chapter's settings
SHOWN = ("gpu", "paper")


def profile_costs(plan, table, names=SHOWN, ref: Reference = COLAB_T4) -> dict:
    """``{profile: (Estimate, RefCost)}``: each profile's full settings (never the dry-run
    overrides, :func:`sgdrank.profiles.select` with ``dry=False``) turned into work by the
    chapter's ``plan(settings) -> [Config | Work, ...]``, counted without a probe (shapes from
    the registered datasets), and timed on ``ref`` by the spec-sheet model."""
    from . import profiles

    out = {}
    for name in names:
        est = estimate(plan(profiles.select(table, name, dry=False)), None, device="cpu",
                       probe=False, check=False)
        out[name] = (est, on_reference(est, ref))
    return out


def _minutes_range(lo: float, hi: float) -> str:
    """``39-70 GPU-minutes`` (both ends in the unit of the larger)."""
    if hi < 5400:
        return f"{lo / 60:.0f}–{hi / 60:.0f} GPU-minutes"
    return f"{lo / 3600:,.1f}–{hi / 3600:,.1f} GPU-hours"


def show_profiles(plan, table, P, cache=None, *, data: Any = None, device=None,
                  names=SHOWN, ref: Reference = COLAB_T4) -> Estimate:
    """The cost block under a training chapter's settings table, before its first step.

    1. *This run*: :func:`estimate` of ``plan(P)`` on ``device`` with its timed probe (runs in
       ``cache`` cost nothing), refused with :class:`CostError` when it cannot fit. In a dry
       run (``P.dry``) the probe is skipped: the dry run's own work is seconds.
    2. A table of the ``names`` profiles (default ``gpu`` and ``paper``) at their full
       settings: runs, SGD steps, FLOPs, SVDs, and time and peak memory on ``ref`` (a Colab
       T4) by the spec-sheet model of :class:`Reference` -- a model, not a measurement.

    Stores a :data:`COST_MIME` record (per profile: seconds, peak bytes, fits) for the tests.
    Returns this run's estimate, with the table's ``{profile: (Estimate, RefCost)}`` in its
    ``profiles`` (for the chapter's prose: nothing is estimated twice)."""
    import json

    this = estimate(plan(P), cache, device=device, data=data, probe=not P.dry,
                    check=not P.dry)
    rows, rec = [], {"this": {"profile": P.label, "device": this.device,
                              "seconds": this.seconds, "fits": this.fits}}
    this.profiles = profile_costs(plan, table, names, ref)
    for name, (est, rc) in this.profiles.items():
        worse = on_reference(est, PESSIMISTIC_T4).seconds
        rows.append(f"| `{name}` | {est.runs:,} | {est.steps:,} | {est.flops:.1e} | "
                    f"{est.svds:,} | {_minutes_range(rc.seconds, worse)} | "
                    f"{_gb(rc.peak_device_bytes)} of {_gb(ref.memory)}"
                    f"{'' if rc.fits else ' (does not fit)'} |")
        rec[name] = {"runs": est.runs, "steps": est.steps, "flops": est.flops,
                     "svds": est.svds, "seconds": rc.seconds, "seconds_pessimistic": worse,
                     "train_seconds": rc.train_seconds,
                     "svd_seconds": rc.svd_seconds, "peak_device_bytes": rc.peak_device_bytes,
                     "peak_host_bytes": rc.peak_host_bytes, "fits": rc.fits}
    head = ("*This run* (" + P.label + "): " + (this.text() if not P.dry else
            f"{this.steps:,} SGD steps, {this.flops:.1e} FLOPs, {this.svds:,} SVDs (dry run: "
            f"not timed)") + ".")
    md = "\n".join([
        head, "",
        f"| profile | runs | SGD steps | FLOPs | SVDs | {ref.name}, by model | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"*{ref.name} by a spec-sheet model, not a measurement* (the model's estimate, then "
        f"the pessimistic one; `sgdrank.cost.Reference`): {assumptions(ref)}. No GPU has "
        f"measured these yet: `benchmarks/gpu_check.sh`, `benchmarks/README.md`."])
    try:
        from IPython.display import display

        import textwrap

        plain = "\n".join(textwrap.wrap(head + " " + "; ".join(
            f"{n}: {_duration(r['seconds'], 'GPU')} on a {ref.name} by model"
            for n, r in rec.items() if n != "this"), 77))
        display({"text/markdown": md, "text/plain": plain, COST_MIME: json.dumps(rec)},
                raw=True)
    except ImportError:  # pragma: no cover
        print(md)
    return this
