"""Chapter 4: the C6 bound (GP22 Thm 1) and the batch-gradient machinery of sgdrank.noise."""
import math

import pytest
import torch
import torch.nn.functional as F

from sgdrank import gradients, metrics, models, noise


def _mlp(seed=0, d_in=6, width=7, depth=2, k=3, bias=True):
    torch.manual_seed(seed)
    return models.MLP(d_in, k, depth, width, bias=bias).double()


def _data(n=12, d=6, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(0, k, (n,), generator=g))


# --- left side -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 8), (9, 4), (6, 6)])
def test_tail_distance_is_the_truncated_svd_error(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in range(0, min(shape) + 2):
        approx = noise.best_rank_approx(w, r)
        assert torch.linalg.matrix_rank(approx) <= r
        fro = float(torch.linalg.matrix_norm(w - approx))
        spec = float(torch.linalg.matrix_norm(w - approx, ord=2))
        assert noise.tail_distance(w, r) == pytest.approx(fro, rel=1e-10, abs=1e-12)
        assert noise.tail_distance(w, r, ord="2") == pytest.approx(spec, rel=1e-10, abs=1e-12)
        assert noise.tail_distance(w, r) == pytest.approx(float(s[r:].pow(2).sum().sqrt()),
                                                          abs=1e-12)
        # Eckart-Young: no random rank-r matrix does better
        for _ in range(5):
            v = (torch.randn(shape[0], r, generator=g, dtype=torch.float64)
                 @ torch.randn(r, shape[1], generator=g, dtype=torch.float64))
            assert float(torch.linalg.matrix_norm(w - v)) >= fro - 1e-12


# --- factors and batch gradients -------------------------------------------------------------
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_factor_gradients_match_autograd(loss):
    model = _mlp()
    x, y = _data()
    lam = 0.03
    facs = noise.gradient_factors(model, x, y, loss)
    assert set(facs) == {"W1", "W2", "head"}
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        idx = torch.randperm(x.shape[0], generator=g)[:4]
        ref = noise.autograd_batch_gradient(model, x[idx], y[idx], lam, loss)
        for name, f in facs.items():
            got = noise.batch_gradient(f, idx, lam)
            torch.testing.assert_close(got, ref[name].double(), rtol=1e-10, atol=1e-12)


def test_mse_matches_torch_mse_on_one_hot():
    out = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    ref = F.mse_loss(out, F.one_hot(y, 4).double())
    assert float(noise.per_sample_loss(out, y, "mse").mean()) == pytest.approx(float(ref),
                                                                               rel=1e-12)


def test_gram_norms_match_explicit_norms():
    model = _mlp(seed=2)
    x, y = _data(n=15, seed=4)
    lam = 0.07
    facs = noise.gradient_factors(model, x, y, "ce")
    batches = noise.random_batches(15, 5, 30, torch.Generator().manual_seed(0))
    assert batches.shape == (30, 5)
    assert all(len(set(b.tolist())) == 5 for b in batches)
    for f in facs.values():
        bn = noise.BatchNorms(f, lam)
        got = bn.norms(batches)
        ref = torch.stack([torch.linalg.matrix_norm(noise.batch_gradient(f, b, lam))
                           for b in batches])
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_theorem1_holds_for_every_batch_and_u_has_rank_at_most_b():
    model = _mlp(seed=5, width=9)
    x, y = _data(n=9, seed=6)
    lam = 0.05
    facs = noise.gradient_factors(model, x, y, "mse")
    for B in (1, 2, 3):
        for f in facs.values():
            lhs = noise.tail_distance(f.W, B)
            for idx in noise.all_batches(9, B):
                grad = noise.batch_gradient(f, idx, lam)
                u = f.W - grad / (2 * lam)  # = -(1/(2 lam B)) D_S^T H_S
                assert torch.linalg.matrix_rank(u) <= B
                assert lhs <= float(torch.linalg.matrix_norm(grad)) / (2 * lam) + 1e-12


def test_local_search_improves_and_stays_above_the_true_min():
    model = _mlp(seed=7)
    x, y = _data(n=11, seed=8)
    lam = 0.02
    f = noise.gradient_factors(model, x, y, "ce")["W2"]
    bn = noise.BatchNorms(f, lam)
    exact = float(bn.norms(noise.all_batches(11, 3)).min())
    start = torch.tensor([0, 1, 2])
    batch, val = bn.local_search(start, max_iter=50)
    assert batch.numel() == 3 and len(set(batch.tolist())) == 3
    assert val <= float(bn.norms(start[None])[0]) + 1e-12
    assert val >= exact - 1e-12
    assert val == pytest.approx(float(bn.norms(batch[None])[0]), rel=1e-12)


def test_c6_table_on_a_small_trained_net():
    torch.manual_seed(0)
    model = models.MLP(10, 3, 2, 16).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    lam = 0.01
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=2 * lam)
    for step in range(300):
        idx = torch.randint(0, 64, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    facs = noise.gradient_factors(model, x, y, "ce", layers=["W1", "W2"])
    rows = noise.c6_table(facs, lam, [1, 2, 4, 8], n_batches=100, search_iters=30)
    assert len(rows) == 8
    for r in rows:
        assert r["holds"]
        assert r["rhs_search"] <= r["rhs_min"] + 1e-12
        assert r["lhs"] <= r["fro"] + 1e-12
    with pytest.raises(ValueError):
        noise.c6_table(facs, 0.0, [1])
    # W's singular values given (as a run's record holds them): the same rows; those of another
    # layer, or of W perturbed by 0.1%, are refused
    sv = {k: metrics.singular_values(f.W) for k, f in facs.items()}
    kw = dict(n_batches=100, search_iters=30)
    assert noise.c6_table(facs, lam, [1, 2, 4, 8], spectra=sv, **kw) == rows
    for bad in ({"W1": sv["W1"], "W2": 1.001 * sv["W2"]}, {"W1": sv["W2"], "W2": sv["W2"]}):
        with pytest.raises(ValueError, match="not those of"):
            noise.c6_table(facs, lam, [1], spectra=bad, **kw)


def test_factors_refuse_batch_coupled_models():
    model = models.MLP(6, 3, 2, 5, bn=True).double().train()
    x, y = _data()
    with pytest.raises(ValueError, match="couples samples"):
        noise.gradient_factors(model, x, y)


# --- Props 1-2 on tiny networks --------------------------------------------------------------
def _tiny(seed, width=6):
    torch.manual_seed(seed)
    return models.MLP(3, 1, 2, width, bias=False).double()


def test_gd_fixed_point_with_weight_decay_is_not_an_sgd_fixed_point():
    # (seed, sizes) chosen so that the minimiser is not on a ReLU kink, where the gradient would
    # not exist; many tiny regularised ReLU nets end on one (a unit exactly at 0 for some sample).
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, generator=g, dtype=torch.float64)
    model = _tiny(5, width=8)
    lam = 0.05
    full = noise.fit_full_batch(model, x, y, lam, "mse")
    assert full < 1e-7
    assert float(gradients.pattern_margin(model, x).min()) > 1e-5
    per = noise.per_sample_regularised_gradients(model, x, y, lam, "mse")
    worst = max(float(torch.linalg.matrix_norm(p["W1"])) for p in per)
    assert worst > 1e-2  # the single-sample gradients disagree: SGD keeps moving
    # and the average of the per-sample gradients is the (vanishing) full gradient
    mean = sum(p["W1"] for p in per) / len(per)
    assert float(torch.linalg.matrix_norm(mean)) < 1e-6


def test_interpolation_without_weight_decay_is_an_sgd_fixed_point():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(4, generator=g, dtype=torch.float64)
    model = _tiny(1)
    noise.fit_full_batch(model, x, y, 0.0, "mse", max_iter=5000)
    per = noise.per_sample_regularised_gradients(model, x, y, 0.0, "mse")
    assert max(float(torch.linalg.matrix_norm(p[n])) for p in per for n in p) < 1e-6


def test_settle_table_reads_trend_floor_tau_and_collapse():
    import pandas as pd

    rows = []
    for lam, seed in [(0.0, 0), (0.01, 0), (0.01, 1)]:
        for e in range(0, 101):
            if lam == 0:
                d = 1.0 / (1 + e)            # still falling: the tail is ~1/2 of the middle
            else:
                d = 0.02 + 0.001 * seed      # flat from the start
            rows.append(dict(dataset="toy", loss="ce", lam=lam, seed=seed, epoch=e, step=4 * e,
                             lr=0.1, conv_dist=d if e else float("nan"), train_acc=1.0,
                             train_loss=0.1, avg_rank=10.0 - (e > 0), avg_stable_rank=3.0,
                             head_fro=1.0 if lam == 0 else 0.5 ** e))
    t = noise.settle_table(pd.DataFrame(rows)).set_index(["lam", "seed"])
    falling, flat = t.loc[(0.0, 0)], t.loc[(0.01, 1)]
    mid = 1.0 / (1 + 50)
    assert falling.trend == pytest.approx((1.0 / (1 + 95.5)) / mid, rel=0.02)
    assert falling.trend < 0.6 and flat.trend == pytest.approx(1.0)
    assert flat.floor == pytest.approx(0.021)
    assert math.isinf(falling.tau_epochs)
    assert flat.tau_epochs == pytest.approx(1 / (2 * 0.1 * 0.01) / 4)
    assert not falling.collapsed and flat.collapsed
    assert falling["rank"] == 9.0 and falling["rank0"] == 10.0
    with pytest.raises(ValueError):
        noise.settle_table(pd.DataFrame(rows), tail=1.5)


def test_settle_table_finds_a_loss_spike_and_regime_reads_the_seeds():
    import pandas as pd

    rows = []
    for seed in (0, 1):
        for e in range(0, 51):
            loss = 1.0 / (1 + e)
            if seed == 1 and e == 40:
                loss = 2.0  # a spike: from its running minimum 1/40 to 2 (80x)
            rows.append(dict(dataset="toy", loss="ce", lam=0.01, seed=seed, epoch=e, step=e,
                             lr=0.1, conv_dist=0.02 if e else float("nan"), train_acc=1.0,
                             train_loss=loss, avg_rank=3.0, avg_stable_rank=2.0, head_fro=1.0))
    t = noise.settle_table(pd.DataFrame(rows)).set_index("seed")
    assert t.loc[1].spike == pytest.approx(2.0 * 40) and t.loc[1].spike_epoch == 40
    assert t.loc[1].spike_from == pytest.approx(1 / 40) and t.loc[1].spike_to == 2.0
    assert t.loc[0].spike <= 1.0  # a falling loss never exceeds its running minimum
    q = t.reset_index()
    assert noise.regime(q) == "levelled off"
    assert noise.regime(q.assign(trend=[0.5, 0.7])) == "still falling"
    assert noise.regime(q.assign(trend=[0.5, 1.0])) == "differs between seeds"
    assert noise.regime(q.assign(trend=[1.3, 2.0])) == "still rising"
    assert noise.regime(q.assign(collapsed=True)) == "collapses (W → 0)"


# --- Chapter 4's plan: what it trains, one source for the chapter and its cost estimate ------
def _chapter_table():
    """The settings table of chapters/04_sgd_noise.ipynb (its ``TABLE = {...}`` assignment)."""
    import ast
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "chapters" / "04_sgd_noise.ipynb"
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and "TABLE = {" in src:
            tree = ast.parse(src)
            node = next(n for n in tree.body if isinstance(n, ast.Assign)
                        and getattr(n.targets[0], "id", None) == "TABLE")
            ns: dict = {}
            exec(compile(ast.Module([node], []), str(path), "exec"), ns)
            return ns["TABLE"], nb
    raise AssertionError("no settings table in Chapter 4")


def test_plan_counts_in_the_book_profile_are_what_the_chapter_ran():
    import re

    from sgdrank import profiles

    table, nb = _chapter_table()
    P = profiles.select(table, "book", dry=False)
    plan = noise.plan(P)
    assert set(plan) == {"E5", "C6 batch sizes", "E6"}
    outs = "\n".join(o.get("text", "") if isinstance(o.get("text", ""), str) else
                     "".join(o["text"]) for c in nb["cells"] if c["cell_type"] == "code"
                     for o in c.get("outputs", []))
    e5_runs, b_runs = [int(v) for v in re.findall(r"<sweep.Result: (\d+) runs", outs)][:2]
    e6_calls = int(re.search(r"E6: (\d+) calls", outs).group(1))
    assert len(plan["E5"]) == e5_runs == 24
    # the B-sweep's B = 128 runs are E5 runs (the cache serves them): only the others are new
    assert len(noise.b_configs(P)) == b_runs == 9 and len(plan["C6 batch sizes"]) == 6
    assert sum(w.calls for w in plan["E6"]) == e6_calls == 15
    assert sum(w.runs for w in plan["E6"]) == 3 * (2 * 6 + 3 * 2)  # networks: calls x lambdas


def test_book_configs_are_the_committed_ones_and_gpu_paper_record_sparse_float32():
    from sgdrank import profiles, sweep

    table, _ = _chapter_table()
    P = profiles.select(table, "book", dry=False)
    # the configs as the chapter built them before the plan (cache keys of the committed runs)
    old = []
    for loss in ("ce", "mse"):
        base = sweep.Config(model=P.e5_model, dataset="fashion-mnist", n_train=512, n_test=500,
                            batch_size=128, lr=P.e5_lr[loss], lam=0.0, epochs=1000, loss=loss,
                            momentum=0.0, seed=0)
        old += sweep.grid(base, lam=P.e5_lams, seed=P.e5_seeds)
    assert noise.e5_configs(P) == old
    for B in (8, 32, 128):
        c = [c for c in noise.b_configs(P) if c.batch_size == B][0]
        assert c.epochs == round(1000 * (512 // 128) / (512 // B)) and c.spectra == "all"
    for name in ("gpu", "paper"):
        S = profiles.select(table, name, dry=False)
        cfgs = noise.e5_configs(S) + noise.b_configs(S)
        assert {(c.spectra[:3], c.svd_dtype) for c in cfgs} == {("log", "float32")}
        assert S.e5_model == "MLP-5-2000" and S.e6_arch == "paper"
        assert 0 in S.e5_lams and 0 in S.e6_lams and 0 in S.e6_gd_lams  # the controls stay


def test_gpu_profile_fits_an_hour_on_a_t4_by_the_model():
    from sgdrank import cost

    table, _ = _chapter_table()
    costs = cost.profile_costs(noise.plan, table)
    gpu = costs["gpu"][1]
    assert gpu.seconds <= 3600 and gpu.fits, gpu.text()
    assert costs["paper"][1].seconds > 20 * gpu.seconds


def test_e6_calls_make_gd_take_as_many_steps_as_sgd():
    from types import SimpleNamespace

    P = SimpleNamespace(e6_dataset="cifar10", e6_classes=(1, 2), e6_n_train=None,
                        e6_n_test=None, e6_seeds=[0, 1], e6_lr=0.03, e6_ctrl_lr=0.01,
                        e6_lams=[0, 1e-3, 1e-2], e6_gd_lams=[0, 1e-2], e6_gd_loss="square",
                        e6_epochs=5, e6_record=2, e6_eval_every=1)
    assert noise.e6_sizes(P) == (10000, 2000)
    calls = noise.e6_calls(P)
    assert len(calls) == 10 and [c["seed"] for c in calls] == [0] * 5 + [1] * 5
    for c in calls:
        steps = c["epochs"] * (10000 // c["batch_size"])
        assert steps == 5 * (10000 // 128)
        assert len(c["lams"]) == (3 if c["mode"] == "SGD" else 2)


def test_left_spectrum_decomposes_a_small_tail_in_float64():
    """A float32 spectrum serves the C6 left side only where every tail of the B* grid is at
    least F32_TAIL_FLOOR ||W||_F; below, W is decomposed in float64. The negative control: the
    float32 values, taken as they are, miss a tail of 1e-6 ||W||_F by far more than float64."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    for delta, small in ((1e-6, True), (0.3, False)):
        sig = torch.cat([torch.linspace(10, 5, 4, dtype=torch.float64),
                         torch.full((196,), delta * 14.0 / 196 ** 0.5, dtype=torch.float64)])
        W = u[:, :200] @ torch.diag(sig) @ v.T
        s64 = metrics.batch_singular_values(W)
        s32 = torch.linalg.svdvals(W.float()).double()
        got = noise.left_spectrum(W, s32, "float32", [1, 4, 16])
        exact = noise.tail_distances(s64, [4])
        if small:
            assert torch.equal(got, s64)  # decomposed again, in float64
            err32 = float((noise.tail_distances(s32, [4]) - exact).abs() / exact)
            err = float((noise.tail_distances(got, [4]) - exact).abs() / exact)
            assert err32 > 1e-2 and err < 1e-9
            assert torch.equal(noise.left_spectrum(W, s32, "float64", [4]), s32)  # as told
        else:
            assert torch.equal(got, s32)  # a large tail: the float32 values serve
    with pytest.raises(ValueError, match="spectra_dtype"):
        noise.left_spectrum(W, s32, "float16", [4])


def test_e6_calls_need_every_gd_lambda_in_the_sgd_grid():
    """Chapter 4 pairs each GD run with the SGD run at its lambda: a GD lambda without one (the
    paper profile's 1e-4 under a dry run's shortened SGD grid) is refused before training."""
    from types import SimpleNamespace

    P = SimpleNamespace(e6_lams=[0, 1e-2], e6_gd_lams=[0, 1e-4, 1e-2], e6_n_train=16,
                        e6_n_test=8, e6_dataset="cifar10", e6_classes=(1, 2), e6_seeds=[0],
                        e6_lr=0.03, e6_ctrl_lr=0.01, e6_gd_loss="square", e6_epochs=2,
                        e6_record=2, e6_eval_every=1)
    with pytest.raises(ValueError, match="1e-04|0.0001"):
        noise.e6_calls(P)
    P.e6_gd_lams = [0, 1e-2]
    calls = noise.e6_calls(P)
    assert [c["mode"] for c in calls] == ["SGD", "SGD", "GD", "SGD low-lr", "GD low-lr"]
    assert all(set(c["lams"]) <= set(P.e6_lams) for c in calls)
