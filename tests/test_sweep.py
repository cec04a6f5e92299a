"""The sweep engine (sgdrank.sweep / sgdrank.batched) against plain one-at-a-time training.

The reference here is deliberately independent of the engine: ``models.build_model`` +
``torch.optim.SGD(weight_decay=2 lam)`` + ``sgdrank.metrics``, fed the same batch order
(``sweep.batches``), on small synthetic data so the whole file runs in seconds.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sgdrank import batched, conventions, metrics, models, sweep

N_TRAIN, N_TEST, N_CLASSES = 96, 40, 3


def make_data(seed=0, n_train=N_TRAIN, n_test=N_TEST):
    """A small 3-class image problem, shaped like the data module's output: (n, 1, 4, 5)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(N_CLASSES, 20, generator=g, dtype=torch.float32)
    y = torch.randint(0, N_CLASSES, (n_train + n_test,), generator=g)
    x = centers[y] + 0.8 * torch.randn(n_train + n_test, 20, generator=g, dtype=torch.float32)
    x = x.view(-1, 1, 4, 5)
    return SimpleNamespace(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
                           y_test=y[n_train:], n_classes=N_CLASSES, input_shape=(1, 4, 5))


DATA = make_data()


pytestmark = pytest.mark.usefixtures("float32_default")  # float32 reference modules


def plain_train(cfg: sweep.Config, ds=DATA):
    """One configuration the textbook way; returns final state_dict and per-epoch records."""
    model = models.build_model(cfg.model, 20, N_CLASSES, bias=cfg.bias, detach_var=cfg.detach_var,
                               seed=cfg.seed)
    wd = conventions.torch_weight_decay(cfg.lam)
    if cfg.decay == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": wd}]
    else:
        groups = [{"params": [p for p in model.parameters() if p.ndim == 2], "weight_decay": wd},
                  {"params": [p for p in model.parameters() if p.ndim != 2], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    x, y = ds.x_train.flatten(1), ds.y_train
    xt, yt = ds.x_test.flatten(1), ds.y_test

    def loss_fn(out, target):
        if cfg.loss == "ce":
            return F.cross_entropy(out, target)
        return F.mse_loss(out, F.one_hot(target, N_CLASSES).float())

    def evaluate(xx, yy):
        model.eval()
        with torch.no_grad():
            out = model(xx)
            l, a = float(loss_fn(out, yy)), float((out.argmax(1) == yy).float().mean())
        model.train()
        return l, a

    records = []
    prev = metrics.snapshot(model)
    for epoch in range(cfg.epochs + 1):
        row = {"epoch": epoch}
        if epoch:
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(epoch)
            tot, n = 0.0, 0
            for idx in sweep.batches(cfg.seed, epoch, len(x), cfg.batch_size, cfg.drop_last):
                loss = loss_fn(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
                n += len(idx)
            row["batch_loss"] = tot / n
        row["train_loss"], row["train_acc"] = evaluate(x, y)
        row["test_loss"], row["test_acc"] = evaluate(xt, yt)
        snap = metrics.snapshot(model)
        if epoch:
            row["conv_dist"] = metrics.convergence_distance(prev, snap)
        prev = snap
        row["layers"] = metrics.layer_table(model)
        records.append(row)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, records


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_matches_plain(res: sweep.Result, i: int, tol=1e-5):
    cfg = res.configs[i]
    state, records = plain_train(cfg)
    mine = res.state_dict(i)
    assert set(mine) == set(state)
    for k in state:
        assert rel(mine[k], state[k]) < tol, (k, rel(mine[k], state[k]))
    ep = res.epochs[res.epochs.run_id == i].set_index("epoch")
    ly = res.layers[res.layers.run_id == i]
    for r in records:
        e = r["epoch"]
        for col in ("train_loss", "test_loss", "train_acc", "test_acc", "batch_loss", "conv_dist"):
            if col in r:
                assert math.isclose(ep.loc[e, col], r[col], rel_tol=tol, abs_tol=1e-7), (
                    e, col, ep.loc[e, col], r[col])
        rows = ly[ly.epoch == e].sort_values("index")
        assert list(rows.layer) == [t["layer"] for t in r["layers"]]
        for (_, a), b in zip(rows.iterrows(), r["layers"]):
            assert a["rank"] == b["rank"]
            for col in ("fro", "spec", "stable_rank"):
                assert math.isclose(a[col], b[col], rel_tol=tol), (e, a["layer"], col)
            assert np.allclose(a["sv"], b["sv"], rtol=0, atol=tol * b["fro"])
        assert ep.loc[e, "avg_rank"] == sum(t["rank"] for t in r["layers"]) / len(r["layers"])


# ---------------------------------------------------------------------------------- equality
FAMILIES = [
    ("MLP-3-8", False, "ce"),
    ("MLP-BN-3-8", False, "ce"),
    ("MLP-BN-3-8", True, "mse"),
    ("RES-BN-2-8", False, "ce"),
    ("RES-BN-2-8", True, "ce"),
    ("RES-2-8", False, "mse"),
]


@pytest.mark.parametrize("model,detach_var,loss", FAMILIES)
def test_batched_equals_one_at_a_time(model, detach_var, loss):
    base = sweep.Config(model=model, dataset="toy", batch_size=16, epochs=3, loss=loss,
                        detach_var=detach_var)
    cfgs = [sweep.replace(base, lr=0.05, lam=1e-3, seed=0),
            sweep.replace(base, lr=0.1, lam=1e-2, seed=1),
            sweep.replace(base, lr=0.2, lam=0.0, seed=2)]
    res = sweep.run(cfgs, data=DATA, progress=False, device="cpu", engine="batched")
    assert all(r["engine"] == "batched" for r in res.records)
    for i in range(len(cfgs)):
        assert_matches_plain(res, i)


def test_options_match_one_at_a_time():
    """Momentum, matrices-only decay, the last partial batch, a schedule, no biases."""
    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=20, epochs=3, drop_last=False,
                        lr_milestones=(1, 2), lr_gamma=0.5, bias=False, decay="matrices")
    cfgs = [sweep.replace(base, lr=0.05, lam=1e-2, momentum=0.9, seed=3),
            sweep.replace(base, lr=0.1, lam=1e-3, seed=4)]
    res = sweep.run(cfgs, data=DATA, progress=False, device="cpu", engine="batched")
    for i in range(len(cfgs)):
        assert_matches_plain(res, i)
    ep = res.epochs[res.epochs.run_id == 0]
    assert list(ep.lr_now.iloc[1:]) == [0.05, 0.025, 0.0125]
    assert list(ep.step) == [0, 5, 10, 15]  # ceil(96 / 20)


def test_loop_engine_equals_batched_and_runs_conv():
    cfgs = sweep.grid(sweep.Config(model="RES-BN-2-8", dataset="toy", batch_size=16, epochs=2),
                      lr=[0.05, 0.1])
    a = sweep.run(cfgs, data=DATA, progress=False, device="cpu", engine="batched")
    b = sweep.run(cfgs, data=DATA, progress=False, device="cpu", engine="loop")
    cols = ["train_loss", "test_loss", "batch_loss", "conv_dist", "avg_rank", "head_fro"]
    assert np.allclose(a.epochs[cols], b.epochs[cols], rtol=1e-5, atol=1e-8, equal_nan=True)
    conv = sweep.run(sweep.Config(model="CONV-2-3", dataset="toy", batch_size=16, epochs=1),
                     data=DATA, progress=False, device="cpu")
    assert conv.records[0]["engine"] == "loop"
    assert list(conv.layers.d_in) == [9, 27, 9, 27]  # conv filters as c_out x c_in*k*k
    assert isinstance(conv.model(0), models.ConvNet)


# ---------------------------------------------------------------------------------- batch-mates
def test_runs_differ_and_do_not_depend_on_batch_mates():
    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=2, lr=0.1,
                        lam=1e-3)
    a, b, c = base, sweep.replace(base, lr=0.05), sweep.replace(base, seed=7)
    d = sweep.replace(base, lam=1e-1)
    together = sweep.run([a, b, c, d], data=DATA, progress=False, device="cpu")
    alone = sweep.run([a], data=DATA, progress=False, device="cpu")
    reordered = sweep.run([d, c, a], data=DATA, progress=False, device="cpu")
    sa = together.state_dict(0)
    for other in (alone.state_dict(0), reordered.state_dict(2)):
        for k in sa:
            assert rel(sa[k], other[k]) < 1e-6
    # lr, lam and seed each change the result
    for j in (1, 2, 3):
        sj = together.state_dict(j)
        assert rel(sj["layers.1.weight"], sa["layers.1.weight"]) > 1e-3
    # and the recorded numbers too
    final = together.epochs[together.epochs.epoch == 2].set_index("run_id")
    assert final.train_loss.nunique() == 4


def test_diverged_run_is_recorded_and_batch_mates_finish():
    base = sweep.Config(model="MLP-3-8", dataset="toy", batch_size=16, epochs=3, lr=0.05, lam=1e-3)
    cfgs = [base, sweep.replace(base, lr=1e6), sweep.replace(base, seed=1)]
    res = sweep.run(cfgs, data=DATA, progress=False, device="cpu")
    ep = res.epochs
    bad = ep[ep.run_id == 1]
    assert bad.diverged.iloc[1:].all() and not bad.diverged.iloc[0]
    assert bad.iloc[1:][["train_loss", "test_loss", "avg_rank", "conv_dist"]].isna().all().all()
    assert len(bad) == 4 and res.records[1]["diverged_epoch"] == 1
    assert not ep[ep.run_id != 1].diverged.any()
    assert ep[ep.run_id != 1].train_loss.notna().all()
    assert set(res.layers.run_id[res.layers.epoch > 0]) == {0, 2}
    with pytest.raises(ValueError, match="diverged"):
        res.model(1)
    alone = sweep.run([cfgs[2]], data=DATA, progress=False, device="cpu")
    assert rel(res.state_dict(2)["head.weight"], alone.state_dict(0)["head.weight"]) < 1e-6
    assert_matches_plain(res, 0)


# ---------------------------------------------------------------------------------- cache
def test_cache_reuses_reruns_and_resumes(tmp_path):
    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=4, lr=0.1)
    cfgs = sweep.grid(base, lam=[1e-3, 1e-2])
    trained = []
    first = sweep.run(cfgs, cache=tmp_path, data=DATA, progress=False, device="cpu",
                      on_epoch=lambda e, cs: trained.append(e))
    assert first.n_trained == 2 and trained == [1, 2, 3, 4]
    assert len(list(tmp_path.glob("*.pt"))) == 2
    trained.clear()
    again = sweep.run(cfgs, cache=tmp_path, data=DATA, progress=False, device="cpu",
                      on_epoch=lambda e, cs: trained.append(e))
    assert again.n_loaded == 2 and trained == []
    assert again.epochs.equals(first.epochs)
    assert sweep.load(cfgs, tmp_path, data=DATA).n_loaded == 2
    # a changed config is trained, the unchanged one loaded
    changed = sweep.run([cfgs[0], sweep.replace(cfgs[1], lr=0.2)], cache=tmp_path, data=DATA,
                        progress=False, device="cpu",
                        on_epoch=lambda e, cs: trained.append((e, len(cs))))
    assert changed.cached == [True, False] and trained == [(e, 1) for e in range(1, 5)]
    # different data, different key
    other = sweep.run(cfgs[:1], cache=tmp_path, data=make_data(seed=1), progress=False,
                      device="cpu")
    assert other.n_trained == 1

    # an interrupted sweep resumes from its last checkpoint
    fresh = tmp_path / "resume"
    cfgs2 = sweep.grid(base, lam=[1e-4, 1e-3], seed=[5])

    def crash(epoch, cs):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfgs2, cache=fresh, data=DATA, progress=False, device="cpu", checkpoint_every=0,
                  on_epoch=crash)
    assert len(list(fresh.glob("_partial_*.pt"))) == 1
    trained.clear()
    resumed = sweep.run(cfgs2, cache=fresh, data=DATA, progress=False, device="cpu",
                        on_epoch=lambda e, cs: trained.append(e))
    assert trained == [3, 4]
    assert not list(fresh.glob("_partial_*.pt"))
    straight = sweep.run(cfgs2, data=DATA, progress=False, device="cpu")
    cols = ["epoch", "train_loss", "test_loss", "batch_loss", "conv_dist", "avg_rank"]
    assert np.allclose(resumed.epochs[cols], straight.epochs[cols], equal_nan=True, rtol=1e-6)


# ---------------------------------------------------------------------------------- conventions
def test_weight_decay_convention_per_step_shrink():
    lr, lam = 0.1, 0.05
    p = torch.randn(3, 50)
    g = torch.zeros(3, 50)
    expect = p * conventions.decay_factor(lr, lam)
    wd = torch.full((3, 1), conventions.torch_weight_decay(lam))
    q = p.clone()
    batched.sgd_update(q, g.clone(), torch.full((3, 1), lr), wd)
    assert torch.allclose(q, expect, rtol=1e-6, atol=0)
    assert torch.allclose(q / p, torch.full_like(p, 1 - 2 * lr * lam), rtol=1e-6)

    # the fused in-backward update of the engine: with a zero backward signal, exactly the shrink
    net = batched.BatchedNet(batched.Arch("MLP-2-4", (6,), 3), K=2)
    for k in range(2):
        net.load_module(k, models.build_model("MLP-2-4", 6, 3, seed=k))
    before = {n: v.clone() for n, v in net.P.items()}
    net.set_hyper([lr, 2 * lr], [conventions.torch_weight_decay(lam)] * 2)
    W = net.P["layers.1.weight"]
    net._fused_update(net._plan[1]["W"], torch.zeros(2, 4, 5), torch.randn(2, 4, 5))
    for k, mu in enumerate([lr, 2 * lr]):
        assert torch.allclose(W[k], before["layers.1.weight"][k] * (1 - 2 * mu * lam), rtol=1e-6)
    # with data (lr -> 0 limit aside), the engine's step equals torch.optim.SGD(weight_decay=2 lam)
    x = torch.randn(2, 8, 6)
    y = torch.randint(0, 3, (2, 8))
    ref = models.build_model("MLP-2-4", 6, 3, seed=0)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, weight_decay=conventions.torch_weight_decay(lam))
    F.cross_entropy(ref(x[0]), y[0]).backward()
    opt.step()
    for fused in (True, False):
        net.load_module(0, models.build_model("MLP-2-4", 6, 3, seed=0))
        net.load_module(1, models.build_model("MLP-2-4", 6, 3, seed=1))
        net.set_hyper([lr, lr], [conventions.torch_weight_decay(lam)] * 2)
        if fused:
            net.train_step(x, None, y, "ce", update=True)
        else:
            net.train_step(x, None, y, "ce")
            net.sgd_step()
        for n, p_ in ref.named_parameters():
            assert rel(net.P[n][0], p_.detach()) < 1e-6, (fused, n)


# ---------------------------------------------------------------------------------- API
def test_grid_config_and_tables():
    base = sweep.Config(model="mlp-bn-3-8", dataset="toy", batch_size=16, epochs=1)
    assert base.model == "MLP-BN-3-8"
    g = sweep.grid(base, lr=[0.1, 0.2], seed=[0, 1, 2])
    assert len(g) == 6 and [c.seed for c in g[:3]] == [0, 1, 2] and g[3].lr == 0.2
    with pytest.raises(ValueError, match="unknown Config field"):
        sweep.grid(base, learning_rate=[0.1])
    with pytest.raises(ValueError, match="unknown loss"):
        sweep.Config(loss="hinge")
    with pytest.raises(ValueError, match="unknown model"):
        sweep.Config(model="VGG-16")
    with pytest.raises(ValueError, match="lambda"):
        sweep.Config(lam=-1)
    assert sweep.Config(lr=0.1, lr_milestones=[60, 100, 200]).lr_at(61) == pytest.approx(0.02)
    res = sweep.run(g[:2], data=DATA, progress=False, device="cpu")
    ep, ly = res.epochs, res.layers
    for col in ("run_id", "key", "lr", "lam", "seed", "batch_size", "epoch", "train_loss",
                "train_acc", "test_loss", "test_acc", "batch_loss", "conv_dist", "avg_rank",
                "avg_stable_rank", "diverged", "head_fro"):
        assert col in ep.columns, col
    assert len(ep) == 2 * 2 and len(ly) == 2 * 2 * 3
    assert ep.batch_loss.iloc[0] != ep.batch_loss.iloc[0]  # NaN at epoch 0
    assert isinstance(ly.sv.iloc[0], np.ndarray) and ly.sv.iloc[0].dtype == np.float64
    assert (res.ranks(atol=1e-3) == ly["rank"]).all()
    assert (res.ranks(rtol=0.5) <= ly["rank"]).all()
    # the final weights as a regular module reproduce the recorded test loss
    m = res.model(1)
    assert isinstance(m, models.MLP) and not m.training
    with torch.no_grad():
        tl = float(F.cross_entropy(m(DATA.x_test.flatten(1)), DATA.y_test))
    assert tl == pytest.approx(ep[(ep.run_id == 1) & (ep.epoch == 1)].test_loss.iloc[0], rel=1e-5)
    assert res.runs.shape[0] == 2
    # eval_train=False skips the whole-training-set evaluation
    quiet = sweep.run(sweep.replace(g[0], eval_train=False), data=DATA, progress=False,
                      device="cpu")
    assert quiet.epochs.train_loss.isna().all() and quiet.epochs.test_loss.notna().all()


# ---------------------------------------------------------------------------------- the recorder
def test_record_every_records_fewer_epochs_of_the_same_run():
    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=7, lr=0.1,
                        lam=1e-2)
    every = sweep.run(base, data=DATA, progress=False, device="cpu")
    sparse_cfg = sweep.replace(base, record_every=3)
    assert sweep.recorded_epochs(sparse_cfg) == [0, 3, 6, 7]
    for engine in ("batched", "loop"):
        sparse = sweep.run(sparse_cfg, data=DATA, progress=False, device="cpu", engine=engine)
        ep, full = sparse.epochs.set_index("epoch"), every.epochs.set_index("epoch")
        assert list(ep.index) == [0, 3, 6, 7]
        for col in ("train_loss", "test_acc", "batch_loss", "avg_rank", "head_fro", "step"):
            assert np.allclose(ep[col], full.loc[[0, 3, 6, 7], col], rtol=1e-5, equal_nan=True), col
        # the change is measured since the previous *recorded* epoch
        ly, lf = sparse.layers, every.layers
        w3 = ly[(ly.epoch == 3) & (ly["index"] == 0)].delta_fro.iloc[0]
        assert w3 > lf[(lf.epoch == 1) & (lf["index"] == 0)].delta_fro.iloc[0]
        for k, v in every.state_dict(0).items():
            assert rel(sparse.state_dict(0)[k], v) < 1e-5, (engine, k)
    with pytest.raises(ValueError, match="record_every"):
        sweep.Config(record_every=0)


def test_bn_running_variance_is_recorded_by_both_engines():
    cfg = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=2, lr=0.1, lam=1e-3)
    a = sweep.run(cfg, data=DATA, progress=False, device="cpu", engine="batched")
    b = sweep.run(cfg, data=DATA, progress=False, device="cpu", engine="loop")
    assert a.epochs.bn_var_min.iloc[0] == 1.0  # running variances start at 1
    assert np.allclose(a.epochs.bn_var_min, b.epochs.bn_var_min, rtol=1e-5)
    m = a.model(0)
    smallest = min(float(buf.min()) for n, buf in m.named_buffers() if n.endswith("running_var"))
    assert a.runs.final_bn_var_min.iloc[0] == pytest.approx(smallest, rel=1e-6)
    plain = sweep.run(sweep.replace(cfg, model="MLP-3-8"), data=DATA, progress=False, device="cpu")
    assert plain.epochs.bn_var_min.isna().all()


def test_eval_blowup_is_flagged_only_when_eval_breaks_while_training_does_not():
    from sgdrank import record

    layer = record.Layer("layers.0.weight", "W1", (2, 3))
    sv = {"layers.0.weight": torch.tensor([[2.0, 1.0]], dtype=torch.float64),
          "head.weight": torch.tensor([[1.0, 0.5]], dtype=torch.float64)}
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    delta = {"layers.0.weight": one(0.1), "head.weight": one(0.2)}
    rec = record.new(sweep.Config(), "k", batched.Arch("MLP-3-8", (3,), 2), "batched", "cpu")
    record.append([rec], [layer], record.Measurement(0, 0, [float("nan")], sv, train_loss=one(2.3)))
    cases = [(1, 0.5, 0.4, False),     # eval and batch loss alike
             (2, 0.3, 0.01, False),    # 30x the batch loss but below the loss at init
             (3, 50.0, 0.02, True),    # the eval-mode model broke down
             (4, 50.0, 20.0, False)]   # both bad: training diverges, not an eval blow-up
    for epoch, tl, bl, _ in cases:
        m = record.Measurement(epoch, 10 * epoch, [0.1], sv, delta, train_loss=one(tl),
                               batch_loss=one(bl), bn_var_min=one(1e-11))
        record.append([rec], [layer], m)
    assert rec["epochs"]["eval_blowup"] == [False] + [c[3] for c in cases]
    assert rec["epochs"]["bn_var_min"][1:] == [1e-11] * 4
    assert rec["epochs"]["conv_dist"][1] == pytest.approx(0.15)  # mean over all matrices
    assert rec["layers"]["rank"][0] == 2 and rec["epochs"]["head_stable_rank"][0] == 1.25
    res = sweep.Result([sweep.Config()], [rec], [False])
    assert res.runs.eval_blowup_epoch.iloc[0] == 3
    assert res.epochs.eval_blowup.dtype == bool and "1 with an eval-mode blow-up" in repr(res)


# ---------------------------------------------------------------------------------- GPU path
def _image_data(seed=0, n_train=64, n_test=32):
    """8x8 single-channel images (for CONV and a small ViT)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n_train + n_test,), generator=g)
    x = torch.randn(n_train + n_test, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1) * 0.5
    return SimpleNamespace(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
                           y_test=y[n_train:], n_classes=N_CLASSES, input_shape=(1, 8, 8))


VIT_SMALL = "VIT:dim=8,depth=1,heads=2,mlp=16,patch=4"


@pytest.mark.parametrize("model", ["CONV-2-4", VIT_SMALL])
def test_loop_engine_resumes_bit_for_bit_and_seeds_dropout(tmp_path, model):
    imgs = _image_data()
    base = sweep.Config(model=model, dataset="img", batch_size=16, epochs=4, lr=0.05,
                        lam=1e-3, momentum=0.9)
    cfgs = sweep.grid(base, seed=[3])

    def crash(epoch, cs):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfgs, cache=tmp_path, data=imgs, progress=False, device="cpu",
                  checkpoint_every=0, on_epoch=crash, engine="loop")
    assert len(list(tmp_path.glob("_partial_*.pt"))) == 1
    trained = []
    torch.manual_seed(123)  # the global generator's state must not matter (dropout is seeded)
    resumed = sweep.run(cfgs, cache=tmp_path, data=imgs, progress=False, device="cpu",
                        engine="loop", on_epoch=lambda e, cs: trained.append(e))
    assert trained == [3, 4] and not list(tmp_path.glob("_partial_*.pt"))
    torch.manual_seed(456)
    straight = sweep.run(cfgs, data=imgs, progress=False, device="cpu", engine="loop")
    cols = ["epoch", "train_loss", "test_loss", "batch_loss", "conv_dist", "avg_rank"]
    assert resumed.epochs[cols].equals(straight.epochs[cols])
    for k, v in straight.state_dict(0).items():
        assert torch.equal(resumed.state_dict(0)[k], v), k


def test_sparse_spectra_and_float32_svds_keep_the_rest():
    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=9, lr=0.1,
                        lam=1e-2)
    full = sweep.run(base, data=DATA, progress=False, device="cpu")
    sparse_cfg = sweep.replace(base, spectra="log3")
    kept = [e for e in range(10) if sparse_cfg.spectra_at(e)]
    assert kept == [0, 1, 3, 9]
    for engine in ("batched", "loop"):
        sp = sweep.run(sparse_cfg, data=DATA, progress=False, device="cpu", engine=engine)
        ep, fe = sp.epochs.set_index("epoch"), full.epochs.set_index("epoch")
        assert list(ep.index) == list(range(10))  # losses at every recorded epoch
        for col in ("train_loss", "test_loss", "conv_dist"):
            assert np.allclose(ep[col], fe[col], rtol=1e-5, equal_nan=True), (engine, col)
        assert sorted(set(sp.layers.epoch)) == kept
        assert ep.avg_rank.isna().tolist() == [e not in kept for e in range(10)]
        assert np.allclose(ep.loc[kept, "avg_rank"], fe.loc[kept, "avg_rank"])
    f32 = sweep.run(sweep.replace(base, svd_dtype="float32"), data=DATA, progress=False,
                    device="cpu")
    a, b = f32.layers, full.layers
    assert (a["rank"].to_numpy() == b["rank"].to_numpy()).all()
    err = max(float(np.abs(x - y).max() / fro) for x, y, fro in zip(a.sv, b.sv, b.fro))
    assert 0 < err < 1e-5
    with pytest.raises(ValueError, match="spectra schedule"):
        sweep.Config(spectra="sometimes")
    with pytest.raises(ValueError, match="svd_dtype"):
        sweep.Config(svd_dtype="float16")


def test_groups_split_balanced_and_devices_explicit(monkeypatch):
    assert [len(c) for c in sweep.split_group(list(range(15)), 12)] == [8, 7]
    assert [len(c) for c in sweep.split_group(list(range(24)), 12)] == [12, 12]
    assert [len(c) for c in sweep.split_group(list(range(5)), 1)] == [1] * 5
    assert sum(sweep.split_group(list(range(15)), 12), []) == list(range(15))
    monkeypatch.delenv("SGDRANK_DEVICE", raising=False)
    assert sweep.resolve_device(None) == torch.device("cpu")  # never a silent move to a GPU
    monkeypatch.setenv("SGDRANK_DEVICE", "cpu")
    assert sweep.resolve_device(None).type == "cpu"
    with pytest.raises(ValueError, match="no float64"):
        sweep.resolve_device(torch.device("mps"))
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with sweep.precision(True, "cpu"):  # a no-op on the CPU
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_set_hyper_updates_its_tensors_in_place():
    arch = batched.Arch("MLP-BN-3-8", (20,), 3)
    net = batched.BatchedNet(arch, 2)
    net.set_hyper([0.1, 0.2], [1e-3, 1e-2], [0.0, 0.0])
    before = {k: v for k, v in net._coef.items() if v is not None}
    net.set_hyper([0.05, 0.02], [1e-3, 1e-2], [0.0, 0.0])
    for k, v in before.items():
        assert net._coef[k] is v, k  # the same tensor (a captured CUDA graph sees the new values)
    assert net._coef["lr"].view(-1).tolist() == pytest.approx([0.05, 0.02])


def test_memo_keeps_a_call_and_recomputes_when_an_argument_changes(tmp_path):
    from sgdrank import cache

    calls = []

    def train(x, *, lr):
        calls.append(lr)
        return {"w": x * lr, "lr": lr}

    x = torch.arange(6.0)
    a = cache.memo(tmp_path, train, x, lr=0.1)
    b = cache.memo(tmp_path, train, x.clone(), lr=0.1)  # the same values: loaded
    assert calls == [0.1] and torch.equal(a["w"], b["w"])
    cache.memo(tmp_path, train, x, lr=0.2)  # another argument: computed
    x2 = x.clone()
    x2[0] = 1e-9
    cache.memo(tmp_path, train, x2, lr=0.1)  # another tensor value: computed
    cache.memo(tmp_path, train, x.double(), lr=0.1)  # another dtype: computed
    assert calls == [0.1, 0.2, 0.1, 0.1]
    assert cache.memo(None, train, x, lr=0.1)["lr"] == 0.1 and len(calls) == 5  # no cache
    for f in tmp_path.glob("memo_train_*.pt"):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="recomputing"):
        cache.memo(tmp_path, train, x, lr=0.1)
