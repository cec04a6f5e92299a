"""Benchmark: the sgdrank sweep engine against a plain PyTorch loop in the style of the authors'
public code, on the same sweep, in one process, with interleaved repeats.

Sweep: MLP-BN-10-100 on a Fashion-MNIST subset (``--n-train`` / ``--n-test``), cross-entropy,
momentum 0, batch size B in ``--batch``, K configurations = 6 (lr, lam) pairs
(lr in {0.05, 0.1, 0.2} x lam in {1e-4, 5e-4}) x K/6 seeds. Each run trains ``--epochs`` epochs
and, at init and after every epoch, records train/test loss and accuracy (eval mode, whole
sets), the singular values / ranks of every hidden matrix and the convergence distance.

- **baseline**: one configuration at a time; ``DataLoader(TensorDataset(x, y), shuffle=True,
  drop_last=True)`` over per-sample tensors, ``nn.Module`` (``sgdrank.models.build_model`` with
  ``torch.nn.BatchNorm1d``, as the authors used), ``torch.optim.SGD(weight_decay=2*lam)``,
  ``MultiStepLR([60, 100, 200], 0.2)``, running loss/accuracy with ``.item()`` per step, eval
  through DataLoaders, SVD of every hidden matrix on the CPU (``torch.linalg.svdvals``, float64)
  at every evaluation. Its time for K configurations is K x the median time of one
  configuration (``--baseline-runs`` configurations are timed per repeat).
- **engine**: ``sgdrank.sweep.run(configs, cache=None)``: the K configurations as one batched
  computation (whole call timed: init, training, evaluation, SVDs, result tables), in each of
  the step modes ``--modes`` (:mod:`sgdrank.stepgraph`: ``eager``, the default; ``graph``,
  CUDA graphs, on a CUDA device only; ``static``, the graphs' buffers without a graph). With
  more than one mode the final weights of each mode are compared with ``eager``'s.

Model-steps = configurations x SGD steps. Repeats are interleaved (baseline and engine
alternate inside each repeat), medians are reported. Run from the repository root:

    .venv/bin/python benchmarks/bench_sweep.py            # ~2 minutes on a 2-core CPU
    .venv/bin/python benchmarks/bench_sweep.py --quick    # a smoke run, < 1 minute
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from sgdrank import conventions, data, metrics, models, stepgraph, sweep  # noqa: E402

LRS = (0.05, 0.1, 0.2)
LAMS = (1e-4, 5e-4)
MODEL = "MLP-BN-10-100"


def configs(K: int, B: int, args) -> list[sweep.Config]:
    base = sweep.Config(model=MODEL, dataset="fashion-mnist", n_train=args.n_train,
                        n_test=args.n_test, batch_size=B, epochs=args.epochs, loss="ce",
                        momentum=0.0,
                        lr_milestones=(60, 100, 200), lr_gamma=0.2, eval_train=args.eval_train)
    return sweep.grid(base, seed=list(range(K // 6)), lr=list(LRS), lam=list(LAMS))


# ----------------------------------------------------------------------------- baseline
def authors_style_model(cfg: sweep.Config, in_dim: int, n_classes: int,
                        bn: str = "torch") -> nn.Module:
    """``build_model``; with ``bn="torch"`` every BN replaced by ``nn.BatchNorm1d`` (the authors'
    choice; same parameters and conventions, faster), ``bn="library"`` keeps
    :class:`sgdrank.models.BatchNorm` (the module the book's chapters use)."""
    m = models.build_model(cfg.model, in_dim, n_classes, seed=cfg.seed)
    if bn == "library":
        return m
    for i, bn in enumerate(m.norms):
        if isinstance(bn, models.BatchNorm):
            new = nn.BatchNorm1d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
            new.load_state_dict({"weight": bn.weight.data, "bias": bn.bias.data,
                                 "running_mean": bn.running_mean,
                                 "running_var": bn.running_var}, strict=False)
            m.norms[i] = new
    return m


def baseline_run(cfg: sweep.Config, ds, bn: str = "torch", device="cpu") -> dict:
    """One configuration, the way the authors' public training script does it: running train
    loss/accuracy during the epoch, then test (and, with ``eval_train``, train) evaluation, ranks
    from the SVD of every hidden matrix, convergence distance."""
    x_train, y_train = ds.x_train.flatten(1), ds.y_train
    x_test, y_test = ds.x_test.flatten(1), ds.y_test
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                               batch_size=cfg.batch_size, shuffle=True,
                                               drop_last=True, generator=g)
    eval_train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                             batch_size=1000)
    eval_test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test),
                                            batch_size=1000)
    model = authors_style_model(cfg, x_train.shape[1], ds.n_classes, bn).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=conventions.torch_weight_decay(cfg.lam))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones),
                                                 gamma=cfg.lr_gamma)
    history = []

    def evaluate(loader):
        model.eval()
        loss, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss += F.cross_entropy(out, y, reduction="sum").item()
                correct += out.argmax(1).eq(y).sum().item()
                n += len(y)
        return loss / n, correct / n

    def record(epoch, prev, running):
        tl, ta = evaluate(eval_train) if cfg.eval_train else (float("nan"), float("nan"))
        vl, va = evaluate(eval_test)
        ranks = []
        for _, lin in model.rank_layers():                       # SVD on the CPU, every layer
            s = torch.linalg.svdvals(lin.weight.detach().cpu().double())
            ranks.append(int(metrics.threshold_rank(s)))
        snap = metrics.snapshot(model)
        cd = metrics.convergence_distance(prev, snap) if prev is not None else float("nan")
        history.append(dict(epoch=epoch, train_loss=tl, train_acc=ta, test_loss=vl, test_acc=va,
                            avg_rank=sum(ranks) / len(ranks), conv_dist=cd, **running))
        return snap

    prev = record(0, None, {})
    steps = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        run_loss, run_correct, seen = 0.0, 0, 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)  # per step, as the authors' loop does
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run_loss += loss.item() * len(y)
            run_correct += out.argmax(1).eq(y).sum().item()
            seen += len(y)
            steps += 1
        sched.step()
        prev = record(epoch, prev, dict(batch_loss=run_loss / seen, batch_acc=run_correct / seen))
    return dict(steps=steps, history=history)


# ----------------------------------------------------------------------------- main
BASELINES = {"torch": "authors' loop, nn.BatchNorm1d",
             "library": "same loop, sgdrank.models.BatchNorm"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--K", type=int, nargs="+", default=[6, 12, 24], help="multiples of 6")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--baselines", nargs="+", default=["torch", "library"], choices=list(BASELINES))
    ap.add_argument("--baseline-runs", type=int, default=1,
                    help="configurations timed per repeat, B and baseline "
                         "(a different one each repeat)")
    ap.add_argument("--eval-train", action="store_true",
                    help="also evaluate the whole training set every epoch (both sides); "
                         "default: the authors' protocol, running train metrics + test-set "
                         "evaluation")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both "
                         "(default 1: the 2 cores are shared with other jobs)")
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="torch threads for the engine only (default: --threads); e.g. --threads 1 "
                         "--engine-threads 2 gives each side its best setting on a 2-core CPU")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda: both sides train there")
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=list(stepgraph.MODES),
                    help="the engine's step modes to time (graph: CUDA graphs, cuda only)")
    ap.add_argument("--quick", action="store_true", help="1 epoch, 1 repeat, n_train 1000, K 6")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats, args.n_train, args.n_test, args.K = 1, 1, 1000, 500, [6]
    if any(k % 6 for k in args.K):
        ap.error("K must be a multiple of 6 (6 (lr, lam) pairs x seeds)")
    eng_threads = args.threads if args.engine_threads is None else args.engine_threads
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ds = data.load_dataset("fashion-mnist", n_train=args.n_train, n_test=args.n_test, seed=0)
    load0 = os.getloadavg()
    loads = []
    t_start = time.perf_counter()
    # seconds per configuration
    base_t = {(bl, B): [] for bl in args.baselines for B in args.batch}
    eng_t = {(B, K, md): [] for B in args.batch for K in args.K for md in args.modes}
    weights = {}  # (B, K, mode) -> final state of run 0 (the modes must agree)
    sanity = {}
    for rep in range(args.repeats):
        for B in args.batch:
            cf = configs(max(args.K), B, args)
            jobs = [("base", bl) for bl in args.baselines] + [
                ("eng", (K, md)) for K in args.K for md in args.modes]
            if rep % 2:
                jobs = jobs[::-1]
            for kind, what in jobs:
                torch.set_num_threads(args.threads if kind == "base" else eng_threads)
                if kind == "base":
                    ts = []
                    for j in range(args.baseline_runs):
                        cfg = cf[(rep * args.baseline_runs + j) % 6]
                        t0 = time.perf_counter()
                        out = baseline_run(cfg, ds, what, device)
                        ts.append(time.perf_counter() - t0)
                        sanity[(f"baseline ({what})", B)] = out["history"][-1]
                    base_t[(what, B)].append(statistics.mean(ts))
                    took = base_t[(what, B)][-1]
                else:
                    K, md = what
                    os.environ[stepgraph.ENV] = md  # the engine reads its step mode here
                    try:
                        t0 = time.perf_counter()
                        res = sweep.run(cf[:K], cache=None, progress=False, device=device,
                                        data={"fashion-mnist": ds}, engine="batched")
                        took = time.perf_counter() - t0
                    finally:
                        os.environ.pop(stepgraph.ENV, None)
                    eng_t[(B, K, md)].append(took)
                    weights[(B, K, md)] = res.state_dict(0)
                    last = res.epochs[res.epochs.epoch == args.epochs].iloc[0]
                    sanity[("engine", B)] = {k: float(last[k]) for k in
                                             ("train_acc", "batch_acc", "test_acc", "avg_rank")}
                loads.append(os.getloadavg()[0])
                print(f"  repeat {rep + 1}/{args.repeats} B={B} {kind} "
                      f"{what if kind == 'base' else f'K={what[0]} {what[1]}'}: {took:.2f} s   "
                      f"load {loads[-1]:.2f}", flush=True)
    total = time.perf_counter() - t_start
    load1 = os.getloadavg()

    rows = []
    for B in args.batch:
        steps = args.epochs * (args.n_train // B)
        for K, md in [(K, md) for K in args.K for md in args.modes]:
            te = statistics.median(eng_t[(B, K, md)])
            row = dict(B=B, K=K, mode=md, eng_sps=K * steps / te, eng_s=te)
            for bl in args.baselines:
                tb = statistics.median(base_t[(bl, B)])
                paired = [K * b / e for b, e in zip(base_t[(bl, B)], eng_t[(B, K, md)])]
                row[bl] = dict(sps=steps / tb, ratio=K * tb / te, s=K * tb, lo=min(paired),
                               hi=max(paired))
            rows.append(row)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cmd = " ".join([".venv/bin/python benchmarks/bench_sweep.py"]
                   + list(argv if argv is not None else sys.argv[1:]))
    lines = [
        f"- date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; "
        f"python {platform.python_version()}; {os.cpu_count()} CPU cores ({cpu}), "
        "shared with other jobs; "
        f"device {_device_name(device)}; torch threads: {args.threads} (baselines), "
        f"{eng_threads} (engine)",
        f"- load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in load0)}; at end: "
        f"{', '.join(f'{v:.2f}' for v in load1)}; 1-min load over the measurements: median "
        f"{statistics.median(loads):.2f}, range {min(loads):.2f}-{max(loads):.2f}",
        f"- sweep: {MODEL}, Fashion-MNIST n_train={args.n_train}, n_test={args.n_test}, "
        f"{args.epochs} epochs + evaluation at init; per epoch: "
        f"{'train and test' if args.eval_train else 'test'} evaluation, "
        "SVD of every hidden matrix, convergence distance; "
        f"{args.repeats} interleaved repeats, medians",
        f"- command: `{cmd}`; total wall time {total / 60:.1f} min",
        "",
        "| B | K | steps | engine model-steps/s | " + " | ".join(
            f"baseline {bl}: model-steps/s | speed-up vs {bl} (range over repeats)"
            for bl in args.baselines) + " |",
        "|---:|---:|---|---:|" + "---:|---:|" * len(args.baselines),
    ]
    for r in rows:
        lines.append(f"| {r['B']} | {r['K']} | {r['mode']} | {r['eng_sps']:.0f} | " + " | ".join(
            f"{r[bl]['sps']:.0f} | **{r[bl]['ratio']:.1f}x** ({r[bl]['lo']:.1f}-{r[bl]['hi']:.1f})"
            for bl in args.baselines) + " |")
    lines.append("")
    lines.append("Baselines: "
                 + "; ".join(f"`{bl}` = {BASELINES[bl]}" for bl in args.baselines) + ".")
    lines.append("")
    for (B, K, md), st in weights.items():
        if md != "eager" and (B, K, "eager") in weights:
            ref = weights[(B, K, "eager")]
            diff = max(float((st[k].float() - ref[k].float()).abs().max()) for k in ref)
            lines.append(f"- {md} against eager (B={B}, K={K}, run 0): largest difference of "
                         f"a final weight {diff:.1e} (0: bit for bit)")
    lines.append("")
    for (kind, B), v in sorted(sanity.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tr = v.get("train_acc")
        tr = v.get("batch_acc") if tr is None or tr != tr else tr
        lines.append(f"- sanity (last repeat, B={B}, {kind}): train acc {tr:.3f}, "
                     f"test acc {v['test_acc']:.3f}, average rank {v['avg_rank']:.1f}")
    report = "\n".join(lines)
    print()
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
    return rows


def _device_name(device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu (no GPU used)"


if __name__ == "__main__":
    main()
