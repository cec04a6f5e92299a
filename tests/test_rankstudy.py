"""Chapter 3's analysis helpers (sgdrank.rankstudy) against direct computations."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from sgdrank import cost, profiles, rankstudy as rs, sweep


def make_data(seed=0, n_train=64, n_test=32, classes=3, dim=12):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = centers[y] + 0.8 * torch.randn(n_train + n_test, dim, generator=g)
    return SimpleNamespace(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
                           y_test=y[n_train:],
                           n_classes=classes, input_shape=(dim,))


DATA = make_data()


pytestmark = pytest.mark.usefixtures("float32_default")


def base(**kw):
    args = dict(model="MLP-BN-3-16", dataset="synthetic", n_train=64, n_test=32, batch_size=8,
                lr=0.1, lam=0.0, epochs=1)
    return sweep.Config(**{**args, **kw})


def test_at_steps_counts_steps_and_places_the_drop():
    for B in (4, 8, 16, 32):
        c = rs.at_steps(base(batch_size=B), 100, drop_at=(0.5,), gamma=0.2)
        spe = 64 // B
        assert c.epochs == math.ceil(100 / spe) and c.epochs * spe >= 100 > (c.epochs - 1) * spe
        assert c.lr_milestones == (round(0.5 * c.epochs),) and c.lr_gamma == 0.2
    with pytest.raises(ValueError):
        rs.at_steps(base(), 0)
    with pytest.raises(ValueError):
        rs.at_steps(base(), 10, drop_at=(1.5,))
    with pytest.raises(ValueError):
        rs.at_steps(base(batch_size=128), 10)


@pytest.fixture(scope="module")
def result():
    torch.set_default_dtype(torch.float32)
    cfgs = [rs.at_steps(c, 24, drop_at=(0.5,), gamma=0.1)
            for c in sweep.grid(base(), batch_size=[8, 16], lam=[0.0, 0.05], seed=[0, 1])]
    return sweep.run(cfgs, cache=None, data=DATA, progress=False)


def test_total_decay_is_the_sum_of_step_factors(result):
    ep = result.epochs
    d = rs.total_decay(ep)
    for rid, cfg in enumerate(result.configs):
        spe = 64 // cfg.batch_size
        rows = ep[ep.run_id == rid]
        for idx, e in zip(rows.index, rows.epoch):
            expect = sum(2 * cfg.lr_at(k) * cfg.lam * spe for k in range(1, int(e) + 1))
            assert d.loc[idx] == pytest.approx(expect, rel=1e-12, abs=1e-15)
    assert (d[ep.lam == 0] == 0).all()
    assert (d[ep.lam > 0].groupby(ep.run_id).diff().dropna() > 0).all()
    with pytest.raises(ValueError):
        rs.total_decay(ep.drop(columns=["lam"]))


def test_layer_ranks_agree_with_metrics(result):
    lay = result.layers
    lr = rs.layer_ranks(lay, atols=(1e-3, 5e-2))
    assert "sv" not in lr.columns
    assert (lr["rank@0.001"].to_numpy() == result.ranks(atol=1e-3).to_numpy()).all()
    assert (lr["rank@0.05"].to_numpy() == result.ranks(atol=5e-2).to_numpy()).all()
    assert (lr["rank@0.001"].to_numpy() == lay["rank"].to_numpy()).all()
    # a zero matrix and matrices of different sizes
    odd = pd.DataFrame({"sv": [np.zeros(3), np.array([2.0, 1.0, 1e-4]), np.array([1.0, 0.5])]})
    assert list(rs.layer_ranks(odd, atols=(1e-3,))["rank@0.001"]) == [0, 2, 2]


def test_run_ranks_and_selection(result):
    rr = rs.run_ranks(result, atols=(1e-3,))
    assert len(rr) == len(result.epochs)
    lay = result.layers
    for (rid, e), g in lay.groupby(["run_id", "epoch"]):
        row = rr[(rr.run_id == rid) & (rr.epoch == e)].iloc[0]
        assert row["rank@0.001"] == pytest.approx(g["rank"].mean())
    last = rs.at_epoch(rr, "last")
    assert len(last) == len(result) and (last.epoch == last.epochs).all()
    assert (rs.at_epoch(rr, "init").epoch == 0).all()
    s = rs.at_step(rr, 12)
    assert len(s) == len(result) and (s.step <= 12).all()
    spe = 64 // s.batch_size
    assert ((12 - s.step) < spe).all()   # the last recorded epoch at or before step 12


def test_summarize_and_values():
    t = pd.DataFrame({"g": [1, 1, 1, 2], "lam": [0.1, 0.1, 0.1, 0.3], "x": [1.0, 2.0, 3.0, 5.0]})
    s = rs.summarize(t, ["g"], ["x"])
    assert list(s.runs) == [3, 1] and s.x.iloc[0] == "2.00 ± 1.0" and s.x.iloc[1] == "5.00"
    assert rs.values(t, "x", g=1) == [1.0, 2.0, 3.0]
    assert rs.values(t, "x", lam=0.1 + 1e-12) == [1.0, 2.0, 3.0]
    assert rs.values(t, "x", g=3) == []
    with pytest.raises(ValueError):
        rs.summarize(t, ["nope"], ["x"])
    with pytest.raises(ValueError):
        rs.values(t, "x", nope=1)


def test_seeded_orders_by_seed_and_refuses_duplicates():
    t = pd.DataFrame({"seed": [2, 0, 1, 0], "lam": [0.1, 0.1, 0.1, 0.2], "x": [3.0, 1.0, 2.0, 9.0]})
    assert rs.seeded(t, "x", lam=0.1) == [1.0, 2.0, 3.0]
    assert rs.seeded(t, "x", lam=0.3) == []
    with pytest.raises(ValueError):
        rs.seeded(t, "x")                      # seed 0 twice


def test_decomposed_rebuilds_the_init_and_splits_exactly(result):
    dec = rs.decomposed(result, range(len(result)))
    n_layers = result.layers.layer.nunique()
    assert len(dec) == len(result) * n_layers
    lay = result.layers
    for rid, cfg in enumerate(result.configs):
        rows = dec[dec.run_id == rid]
        c = float(np.prod([1 - 2 * cfg.lr_at(e) * cfg.lam
                           for e in range(1, cfg.epochs + 1) for _ in range(64 // cfg.batch_size)]))
        assert rows.c.to_numpy() == pytest.approx(c, rel=1e-12)
        assert (rows.D.to_numpy() == pytest.approx(-math.log(c), abs=1e-12))
        # the rebuilt W_0 is the engine's initialisation: same spectrum as the recorded epoch 0
        init = lay[(lay.run_id == rid) & (lay.epoch == 0)]
        for (_, r), (_, s) in zip(rows.sort_values("index").iterrows(), init.iterrows()):
            assert r["W0_fro"] == pytest.approx(float(np.linalg.norm(s.sv)), rel=1e-5)
    # lambda = 0: c = 1 and nothing decays
    assert (dec[dec.lam == 0].c == 1.0).all() and (dec[dec.lam == 0].D.abs() == 0).all()
    pr = rs.per_run(dec)
    assert len(pr) == len(result)
    assert (pr["Dstar@0.001"].to_numpy()
            == dec.groupby("run_id")["Dstar@0.001"].min().to_numpy()).all()
    assert pr.W_srank.to_numpy() == pytest.approx(dec.groupby("run_id").W_srank.mean().to_numpy())
    # the chapter's two tolerances, and the decay-only rank: at lambda = 0 (c = 1) it counts the
    # singular values of W_0 above eps ||W_T||_F; it never exceeds W_0's own size
    assert {"W_rank@0.01", "decay_rank@0.001", "decay_rank@0.01"} <= set(dec.columns)
    assert "W_rank@0.04" not in dec.columns
    assert (dec["decay_rank@0.001"] >= dec["decay_rank@0.01"]).all()


def test_relative_layers_divides_each_layer_by_its_own_control():
    rows = []
    for seed in (0, 1):
        for lam, scale in ((0.0, 1.0), (0.1, 0.5)):
            for k, v in enumerate([100.0, 40.0, 60.0]):
                rows.append(dict(model="M", lam=lam, seed=seed, index=k, r=scale * v * (1 + seed)))
    t = pd.DataFrame(rows)
    rel = rs.relative_layers(t, "M", 0.1, "r")
    assert rel.shape == (2, 3) and np.allclose(rel, 0.5)


def test_at_steps_all_applies_at_steps_to_each_config():
    base = sweep.Config(model="MLP-2-8", n_train=64, batch_size=16, lr=0.1)
    cfgs = [base, sweep.replace(base, batch_size=32)]
    out = rs.at_steps_all(cfgs, 40, (0.5,), 0.1)
    assert out == [rs.at_steps(c, 40, (0.5,), 0.1) for c in cfgs]
    assert [c.epochs for c in out] == [10, 20]


def test_seed_rhos_is_spearman_within_each_seed():
    t = pd.DataFrame({"seed": [0] * 4 + [1] * 4 + [2] * 2,
                      "x": [1, 2, 3, 4, 1, 2, 3, 4, 1, 2],
                      "y": [1, 2, 3, 4, 4, 3, 2, 1, 5, 6]})
    # seed 0: monotone up (+1), seed 1: monotone down (-1), seed 2: too few runs (skipped)
    assert rs.seed_rhos(t, "x", "y") == pytest.approx([1.0, -1.0])
    # a constant column has no rank correlation: skipped, not NaN
    t2 = t.assign(y=1.0)
    assert rs.seed_rhos(t2, "x", "y") == []


def test_is_close_flags_intervals_that_end_near_zero():
    from sgdrank import report
    assert rs.is_close(report.paired([1.0, 1.1, 0.9], [0.0, 0.0, 0.0])) is False
    near = report.paired([0.05, 1.0, 0.6], [0.0, 0.0, 0.0])
    assert rs.is_close(near) == near.close
    # an unpaired comparison: the same rule on its (lo, hi)
    assert rs.is_close(SimpleNamespace(lo=-0.01, hi=1.0)) is True
    assert rs.is_close(SimpleNamespace(lo=0.5, hi=1.0)) is False
    assert rs.is_close(SimpleNamespace(lo=math.nan, hi=1.0)) is False
    named = {"a": SimpleNamespace(lo=-0.01, hi=1.0), "b": SimpleNamespace(lo=0.5, hi=1.0),
             "c": None}
    assert rs.close_names(named) == ["a"]


# --------------------------------------------------------------------------- the chapter's plan
CHAPTER = Path(__file__).resolve().parents[1] / "chapters" / "03_rank_sweeps.ipynb"


def chapter_table() -> dict:
    """The chapter's own settings table: the assignments of ``PAPER`` and ``TABLE`` in its
    settings cell, executed alone (no imports, no plotting)."""
    nb = json.loads(CHAPTER.read_text())
    src = next("".join(c["source"]) for c in nb["cells"]
               if c["cell_type"] == "code" and "TABLE = {" in "".join(c["source"]))
    keep = [n for n in ast.parse(src).body if isinstance(n, ast.Assign)
            and {getattr(t, "id", None) for t in n.targets} & {"PAPER", "TABLE"}]
    ns: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(CHAPTER), "exec"), ns)
    return ns["TABLE"]


def settings(name, dry=False):
    return profiles.select(chapter_table(), name, dry=dry)


def test_plan_of_the_book_profile_is_what_the_chapter_ran():
    P = settings("book")
    parts, plan = rs.sweeps(P), rs.plan(P)
    assert tuple(parts) == tuple(plan) == rs.PARTS
    assert {k: len(v) for k, v in parts.items()} == dict(head=9, B=12, mu=24, res=6, gd=3, e8=6)
    assert {k: len(v) for k, v in plan.items()} == dict(head=9, B=12, mu=15, res=6, gd=3, e8=6)
    flat = [c for v in plan.values() for c in v]
    assert flat == list(dict.fromkeys(c for v in parts.values() for c in v))  # each run once
    nb = json.loads(CHAPTER.read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []))
    assert f"<sweep.Result: {len(flat)} runs" in text     # the committed book outputs
    # the book keeps its recording: every epoch, float64 (the committed numbers)
    assert all(c.svd_dtype == "float64" and c.spectra == "all" for c in flat)
    assert {c.batch_size for c in plan["gd"]} == {P.n_train}   # full batch
    assert all(c.lam == 0 and c.lr_milestones == () for c in plan["gd"])


def test_every_part_of_the_plan_follows_the_settings():
    P = settings("smoke")
    parts = rs.sweeps(P)
    spe = lambda c: sweep.steps_per_epoch(c.n_train, c.batch_size)  # noqa: E731
    for part in ("head", "B", "mu", "res", "e8"):
        for c in parts[part]:
            assert c.epochs * spe(c) >= P.steps > (c.epochs - 1) * spe(c)
            assert c.lr_gamma == P.gamma and len(c.lr_milestones) == len(P.drop_at)
    assert {(c.lr, c.lam) for c in parts["mu"]} == {
        (lr, lam) for lr in P.pair_lrs for lam in (round(P.mulam / lr, 12), 0.0)}
    assert {c.model for c in parts["res"]} == {P.res}
    assert {c.seed for c in parts["e8"]} == set(P.e8_seeds)
    assert {c.batch_size for c in parts["B"]} == set(P.batch_sizes) - {P.b_main}


def test_gpu_profile_is_the_paper_with_its_first_phase_and_shorter_later_phases():
    gpu, paper = rs.sweeps(settings("gpu")), rs.sweeps(settings("paper"))
    assert {k: len(v) for k, v in gpu.items()} == {k: len(v) for k, v in paper.items()}
    for part in rs.PARTS:
        for g, p in zip(gpu[part], paper[part]):
            # only the length and the milestones differ ...
            assert sweep.replace(g, epochs=p.epochs, lr_milestones=p.lr_milestones) == p
            assert g.dataset == "cifar10" and g.n_train == 50000 and g.svd_dtype == "float32"
            if part == "gd":
                assert g == p
                continue
            # ... the first phase at the initial learning rate is the paper's, then 2 drops
            assert g.lr_milestones[0] == p.lr_milestones[0] and len(g.lr_milestones) == 2
            assert g.epochs < p.epochs / 4
    # the total decay at the end: most of the paper's
    top = gpu["head"][-1], paper["head"][-1]
    assert top[0].lam == top[1].lam == 5e-4
    assert 0.8 * rs.final_decay(top[1]) < rs.final_decay(top[0]) < rs.final_decay(top[1])


def test_gpu_profile_fits_an_hour_on_a_colab_t4_by_the_model():
    est = cost.estimate(rs.plan(settings("gpu")), None, device="cpu", probe=False, check=False)
    t4 = est.on()
    assert t4.seconds <= 3600 and t4.fits
    assert est.runs == sum(len(v) for v in rs.plan(settings("paper")).values())


def test_dry_run_settings_keep_the_models_and_grids():
    full = settings("gpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGDRANK_DRYRUN", "1")
        dry = profiles.select(chapter_table(), "gpu")
    assert dry.dry and set(dry.dry_overrides) <= {"n_train", "n_test", "steps", "gd_steps",
                                                  "seeds", "e8_seeds"}
    for k in ("mlp_bn", "res", "lams", "batch_sizes", "pair_lrs", "mu_Bs", "drop_at"):
        assert dry[k] == full[k]
    cfgs = [c for v in rs.plan(dry).values() for c in v]
    assert max(c.epochs for c in cfgs) <= 2


def test_final_decay_sums_the_step_factors():
    c = rs.at_steps(base(lam=0.01), 40, drop_at=(0.5,), gamma=0.1)   # 8 steps per epoch
    e1 = c.lr_milestones[0]
    want = 2 * 0.01 * 8 * (0.1 * e1 + 0.01 * (c.epochs - e1))
    assert rs.final_decay(c) == pytest.approx(want, rel=1e-12)
    assert rs.final_decay(base(lam=0.0, epochs=3)) == 0.0
