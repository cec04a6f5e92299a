#!/usr/bin/env bash
# The GPU check of issue 20: under 10 minutes on one GPU, and runnable on the CPU with smaller
# sizes (the same steps, so the script itself is tested where no GPU is).
#
#   benchmarks/gpu_check.sh              # cuda if available, else cpu
#   SGDRANK_DEVICE=cpu benchmarks/gpu_check.sh
#   OUT=benchmarks/gpu_check_h100.md benchmarks/gpu_check.sh
#
# Steps (each prints a Markdown section; everything is also written to $OUT):
#   1. the sweep benchmark (benchmarks/bench_sweep.py) against the one-at-a-time loop, K = 6, 24,
#      the engine's steps launched one by one and (on a GPU) replayed as CUDA graphs
#      (sgdrank.stepgraph), with the largest weight difference between the two; on the CPU the
#      graphs' fixed buffers without a graph ("static")
#      (needs Fashion-MNIST: $SGDRANK_DATA or Debian's dataset-fashion-mnist; skipped otherwise)
#   2. the cost estimate (sgdrank.cost, with its timed probe) of a representative configuration
#      of chapters 3, 4, 6 at the papers' scale; then every training chapter's own cost block
#      (tools/chapter_cost.py) in the gpu profile: the chapter's groups probed on this GPU
#   3. a few hundred steps of a Chapter 3-like sweep, timed, next to the estimate made for it
#   4. the float32-vs-float64 singular-value error (sgdrank.record.svd_error) on trained
#      matrices and on random matrices of the papers' shapes, against the rank tolerances
# No number here is an estimate of a GPU timing: every time printed was measured by this run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export SGDRANK_OFFLINE=${SGDRANK_OFFLINE:-1} PYTHONHASHSEED=0
DEVICE=${SGDRANK_DEVICE:-$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
export SGDRANK_DEVICE=$DEVICE
OUT=${OUT:-$(mktemp -d)/gpu_check.md}
T0=$(date +%s)
echo "# gpu_check on $DEVICE ($(date -u '+%Y-%m-%d %H:%M UTC'))" | tee "$OUT"

echo -e "\n## 1. sweep engine vs one-at-a-time loop (K = 6, 24)\n" | tee -a "$OUT"
if $PY -c "from sgdrank import data; data.load_dataset('fashion-mnist', n_train=10, n_test=10)" \
        >/dev/null 2>&1; then
    if [ "$DEVICE" = cpu ]; then
        BENCH=(--batch 128 --K 6 24 --epochs 1 --repeats 1 --n-train 1000 --n-test 500
               --baselines torch --modes eager static)
    else
        BENCH=(--batch 16 128 --K 6 24 --epochs 1 --repeats 2 --modes eager graph)
    fi
    $PY benchmarks/bench_sweep.py --device "$DEVICE" "${BENCH[@]}" 2>&1 | tee -a "$OUT"
else
    echo "skipped: Fashion-MNIST not found (set SGDRANK_DATA, see data/README.md)" | tee -a "$OUT"
fi

$PY - "$DEVICE" <<'EOF' 2>&1 | tee -a "$OUT"
import sys
import time

import torch

from sgdrank import cost, record, sweep

device = torch.device(sys.argv[1])
gpu = device.type == "cuda"
torch.manual_seed(0)
if not gpu:
    torch.set_num_threads(1)


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


# ------------------------------------------------------------------ 2. representative configs
print("\n## 2a. cost estimates of representative configs (timed probe on this device)\n")
zoo = ["VGG16-BN", "RESNET18", "VIT"] if gpu else ["VGG16-BN:width=4", "RESNET18:width=4",
                                                    "VIT:dim=32,depth=2,heads=4,mlp=64,patch=4"]
reps = {
    "3 (MLP-BN-10-100, CIFAR-10, B=32, 499 epochs)": sweep.Config(
        model="MLP-BN-10-100", dataset="cifar10", n_train=50000, n_test=10000, batch_size=32,
        epochs=499, lr=0.1, lam=5e-4),
    "3 (same, spectra='log16', float32 SVDs)": sweep.Config(
        model="MLP-BN-10-100", dataset="cifar10", n_train=50000, n_test=10000, batch_size=32,
        epochs=499, lr=0.1, lam=5e-4, spectra="log16", svd_dtype="float32"),
    "4 (E5: MLP-5-2000, CIFAR-10, B=128, 2000 epochs)": sweep.Config(
        model="MLP-5-2000", dataset="cifar10", n_train=None, n_test=None, batch_size=128,
        epochs=2000, lr=0.1, lam=1e-4),
    "4 (E5, spectra='log16', float32 SVDs)": sweep.Config(
        model="MLP-5-2000", dataset="cifar10", n_train=None, n_test=None, batch_size=128,
        epochs=2000, lr=0.1, lam=1e-4, spectra="log16", svd_dtype="float32"),
}
for m, ep in zip(zoo, (500, 500, 200)):
    reps[f"6 ({m}, CIFAR-10, B=128, {ep} epochs)"] = sweep.Config(
        model=m, dataset="cifar10", n_train=50000, n_test=10000, batch_size=128, epochs=ep,
        lr=0.05, lam=5e-4, spectra="ends")
row("chapter (config)", "estimate", "probe s", "peak device GB")
row("---", "---", "---:", "---:")
for name, cfg in reps.items():
    est = cost.estimate(cfg, device=device, probe_steps=3 if gpu else 1, check=False)
    row(name, est.text(), f"{est.probe_seconds:.1f}", f"{est.peak_device_bytes / 1e9:.2f}")

# ------------------------------------------------------------------ 3. a Chapter 3-like sweep
print("\n## 3. a Chapter 3-like sweep: estimate vs measured\n")
try:
    from sgdrank import data as D
    n = 5000 if gpu else 1024
    ds = D.load_dataset("fashion-mnist", n_train=n, n_test=1000, seed=0)
    src = "Fashion-MNIST"
except Exception:  # no data on this machine: synthetic inputs of the same shape
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(0)
    n = 5000 if gpu else 1024
    y = torch.randint(0, 10, (n + 1000,), generator=g)
    x = torch.randn(n + 1000, 1, 28, 28, generator=g) + 0.3 * y.view(-1, 1, 1, 1)
    ds = SimpleNamespace(x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:],
                         n_classes=10, input_shape=(1, 28, 28))
    src = "synthetic 28x28 data (Fashion-MNIST not found)"
B = 16
epochs = 1 if gpu else 2
base = sweep.Config(model="MLP-BN-10-100", dataset="fashion-mnist", n_train=n, n_test=1000,
                    batch_size=B, epochs=epochs, lr=0.1, lam=5e-4)
cfgs = sweep.grid(base, lr=[0.05, 0.1, 0.2], lam=[1e-4, 5e-4])
est = cost.estimate(cfgs, device=device, data=ds)
t = time.perf_counter()
res = sweep.run(cfgs, data=ds, progress=False, device=device)
took = time.perf_counter() - t
print(f"{len(cfgs)} runs x {epochs * (n // B)} steps of MLP-BN-10-100 at B={B} on {src}: "
      f"estimate {est.seconds:.2f} s, measured {took:.2f} s (ratio {est.seconds / took:.2f}); "
      f"final test accuracy {res.runs.final_test_acc.mean():.3f}")

# ------------------------------------------------------------------ 4. float32 SVD error
print("\n## 4. float32 vs float64 singular values (units of ||W||_F)\n")
row("matrices", "shape", "max error", "rank changes (atol 1e-3, 0.04)", "margin to a tolerance")
row("---", "---", "---:", "---:", "---:")
mats = {}
for i in range(len(cfgs)):
    for k, v in res.state_dict(i).items():
        if k.endswith("weight") and v.ndim == 2:
            mats.setdefault(f"trained (Ch3-like) {tuple(v.shape)}", []).append(v)
for name, vs in mats.items():
    w = torch.stack(vs).to(device)
    e = record.svd_error(w)
    row(name, f"{len(vs)} x {tuple(w.shape[1:])}", f"{e['max_err']:.1e}", e["rank_changes"],
        f"{e['margin']:.1e}")
shapes = [(100, 3072), (512, 4608), (2000, 2000)] if gpu else [(100, 3072), (512, 4608),
                                                               (1000, 1000)]
for m, k in shapes:
    g = torch.Generator().manual_seed(m)
    w = torch.randn(2, m, k, generator=g)
    low = torch.randn(2, m, 8, generator=g) @ torch.randn(2, 8, k, generator=g)
    for name, x in (("random Gaussian", w), ("rank 8 + 1e-3 noise", low + 1e-3 * w)):
        e = record.svd_error(x.to(device))
        row(name, f"2 x ({m}, {k})", f"{e['max_err']:.1e}", e["rank_changes"],
            f"{e['margin']:.1e}")
EOF
echo -e "\n## 2b. every training chapter's cost block in the gpu profile (tools/chapter_cost.py)\n" \
    | tee -a "$OUT"
# on a GPU: the probe times each chapter's own groups there; on the CPU: the book profile
CP=$([ "$DEVICE" = cpu ] && echo book || echo gpu)
$PY tools/chapter_cost.py chapters/0[3-6]_*.ipynb --profile "$CP" 2>&1 | tee -a "$OUT"

echo -e "\ntotal wall time $(( $(date +%s) - T0 )) s; report: $OUT" | tee -a "$OUT"
