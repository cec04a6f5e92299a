"""sgdrank.cost: the estimate of a sweep's steps, FLOPs, SVDs, time and memory, against measured
sweeps on this machine's CPU (within a factor of 2), and its refusal when memory cannot fit."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from sgdrank import cost, sweep

pytestmark = pytest.mark.usefixtures("float32_default")


def make_data(n_train=2048, n_test=512, d=64, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = (centers[y] + torch.randn(n_train + n_test, d, generator=g)).view(-1, 1, 8, 8)
    return SimpleNamespace(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
                           y_test=y[n_train:], n_classes=classes, input_shape=(1, 8, 8))


DATA = make_data()


def _measure(cfgs, **kw):
    t = time.perf_counter()
    sweep.run(cfgs, data=DATA, progress=False, device="cpu", **kw)
    return time.perf_counter() - t


@pytest.mark.parametrize("case", ["batched", "loop"])
def test_estimate_within_factor_two_of_measured(case):
    torch.set_num_threads(1)
    if case == "batched":
        base = sweep.Config(model="MLP-BN-4-64", dataset="toy", batch_size=16, epochs=3, lr=0.05)
        cfgs = sweep.grid(base, lam=[1e-4, 1e-3], seed=[0, 1, 2])
    else:
        base = sweep.Config(model="CONV-2-8", dataset="toy", batch_size=32, epochs=2, lr=0.05)
        cfgs = sweep.grid(base, seed=[0, 1])
    est = cost.estimate(cfgs, data=DATA, device="cpu")
    measured = min(_measure(cfgs) for _ in range(2))
    ratio = est.seconds / measured
    assert 0.5 <= ratio <= 2.0, (case, est.seconds, measured, est.table())
    # the counts follow from the configs
    spe = 2048 // base.batch_size
    assert est.steps == len(cfgs) * base.epochs * spe
    assert est.runs == len(cfgs) and est.cached == 0
    n_mats = len(est.groups[0].svds)
    assert est.svds >= len(cfgs) * (base.epochs + 1) * 2 and n_mats >= 2
    assert est.flops > 0 and est.peak_device_bytes > 0 and est.fits


def test_counts_scale_with_epochs_and_the_spectra_schedule():
    base = sweep.Config(model="MLP-BN-3-32", dataset="toy", batch_size=32, epochs=8, lr=0.05)
    one = cost.estimate(base, data=DATA, device="cpu", probe=False)
    two = cost.estimate(sweep.replace(base, epochs=16), data=DATA, device="cpu", probe=False)
    assert two.steps == 2 * one.steps
    assert two.svds == 17 * one.svds // 9
    ends = cost.estimate(sweep.replace(base, spectra="ends"), data=DATA, probe=False)
    assert ends.svds == 2 * one.svds // 9
    prof = cost.model_profile(sweep.Arch("MLP-BN-3-32", (1, 8, 8), 4))
    # forward FLOPs of the matrix products: 2 (64*32 + 32*32 + 32*32 + 32*4) per sample
    assert prof["fwd_flops"] == 2 * (64 * 32 + 2 * 32 * 32 + 32 * 4)
    assert prof["train_flops"] >= 2 * prof["fwd_flops"]
    assert one.seconds != one.seconds  # no probe: no time
    assert one.text().startswith(f"{one.steps:,} SGD steps, ") and "time not probed" in one.text()


def test_cached_runs_cost_nothing(tmp_path):
    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=32, epochs=1, lr=0.05)
    cfgs = sweep.grid(base, seed=[0, 1])
    sweep.run(cfgs[:1], cache=tmp_path, data=DATA, progress=False, device="cpu")
    est = cost.estimate(cfgs, cache=tmp_path, data=DATA, device="cpu")
    assert est.cached == 1 and est.steps == 64 and "1 cached" in est.text()
    sweep.run(cfgs, cache=tmp_path, data=DATA, progress=False, device="cpu")
    done = cost.estimate(cfgs, cache=tmp_path, data=DATA, device="cpu")
    assert done.steps == 0 and done.text() == "all 2 runs are in the cache: nothing to train"


def test_refuses_what_cannot_fit(monkeypatch):
    base = sweep.Config(model="MLP-BN-3-32", dataset="toy", batch_size=32, epochs=1)
    monkeypatch.setattr(cost, "host_memory", lambda: 1e6)
    monkeypatch.setattr(cost, "device_memory", lambda device: ("machine", 1e6))
    with pytest.raises(cost.CostError, match="gpu. profile.*Slurm|gpu. profile.*slurm"):
        cost.estimate(base, data=DATA, device="cpu", probe=False)
    est = cost.estimate(base, data=DATA, device="cpu", probe=False, check=False)
    assert not est.fits


def test_text_and_registered_shapes():
    cfg = sweep.Config(model="MLP-BN-10-100", dataset="cifar10", n_train=None, n_test=None,
                       batch_size=128, epochs=2)
    est = cost.estimate(cfg, device="cpu", probe=False)  # shapes from the registry: no loading
    assert est.steps == 2 * (50000 // 128)
    prof = cost.model_profile(sweep.Arch("MLP-BN-10-100", (3, 32, 32), 10))
    assert prof["params"] > 3072 * 100
    est.seconds = 3.1 * 3600
    assert est.text().startswith("about 3.1 CPU-hours on this machine (1 run to train); peak ")
    assert cost.show(cfg, device="cpu", probe=False) is not None  # the chapter one-liner
    assert cost._duration(30, "GPU") == "30 GPU-seconds"
    assert cost._duration(600, "GPU") == "10 GPU-minutes"
