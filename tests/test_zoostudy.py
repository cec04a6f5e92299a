"""Chapter 6's helpers (sgdrank.zoostudy): layer counts, the per-sample gradient check, the
sweep grid and the init/end rank tables, on the reduced zoo models and a tiny real sweep."""
import json
import math
import re
from pathlib import Path

import pandas as pd
import numpy as np
import pytest
import torch

from sgdrank import cost, decomposition, profiles, sweep, zoo, zoostudy

VGG = "VGG16-BN:width=4"
VIT = "VIT:dim=16,depth=1,heads=2,mlp=32,patch=7"


def test_layer_counts_vgg_28x28():
    m = zoo.build(VGG, (1, 28, 28), seed=0)
    t = zoostudy.layer_counts(m, (1, 28, 28), batch_size=8)
    assert list(t.layer) == [n for n, _ in m.rank_layers()]
    assert list(t.N) == [784] * 2 + [196] * 2 + [49] * 3 + [16] * 3 + [4] * 3
    assert t.shape[0] == 13 and t.loc[0, "shape"] == "4 x 9" and t.loc[0, "min_dim"] == 4
    assert (t.BN == 8 * t.N).all()
    assert (t.per_sample == t[["N", "min_dim"]].min(axis=1)).all()
    assert (t.batch == pd.concat([t.BN, t.min_dim], axis=1).min(axis=1)).all()
    # stage 5: 32 x 288 filter matrices, N = 4: B N = 32 is not below 32 at B = 8; at B = 4
    # (16 < 32) it bites there, and stage 4 (N = 16, B N = 64) still does not
    assert not t.bites.any()
    # with BN following every conv the refined bound B N - 1 = 31 < 32 bites in stage 5 at B = 8
    assert list(t.layer[t.bites_bn]) == ["stage5.conv1", "stage5.conv2", "stage5.conv3"]
    t4 = zoostudy.layer_counts(m, (1, 28, 28), batch_size=4)
    assert list(t4.layer[t4.bites]) == ["stage5.conv1", "stage5.conv2", "stage5.conv3"]
    assert m.training  # the mode is restored
    with pytest.raises(ValueError, match="batch_size"):
        zoostudy.layer_counts(m, (1, 28, 28), batch_size=0)


def test_layer_counts_vit_tokens():
    m = zoo.build(VIT, (1, 28, 28), seed=0)
    t = zoostudy.layer_counts(m, (1, 28, 28), batch_size=4).set_index("layer")
    assert t.loc["patch_embed", "N"] == 16 and t.loc["patch_embed", "shape"] == "16 x 49"
    assert t.loc["block1.attn.q", "N"] == 17 and t.loc["block1.mlp.fc1", "shape"] == "32 x 16"


@pytest.mark.parametrize("spec", [VGG, "RESNET18:width=2", VIT])
def test_gradient_check_within_bound(spec):
    m = zoo.build(spec, (1, 28, 28), seed=0)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = zoostudy.gradient_check(m, x)
    assert len(t) == len(m.rank_layers())
    assert t.within.all()
    assert (t.measured > 0).all()
    assert m.training and next(m.parameters()).dtype == torch.float32


def test_gradient_check_attains_token_bound():
    """A ViT with more token vectors than the matrix side: q of block 1 is full rank (the
    bound is the matrix size); with 2 tokens (patch 14 on 28x28, 4 patches + class = 5 tokens)
    and dim 16 the bound is N = 5 and it is attained by the value matrix."""
    m = zoo.build("VIT:dim=16,depth=2,heads=2,mlp=32,patch=14", (1, 28, 28), seed=0)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    t = zoostudy.gradient_check(m, x).set_index("layer")
    assert t.loc["block1.attn.v", "N"] == 5 and t.loc["block1.attn.v", "bound"] == 5
    assert t.loc["block1.attn.v", "attained"]
    assert t.loc["patch_embed", "N"] == 4 and t.loc["patch_embed", "measured"] <= 4


def test_grid_controls_and_steps():
    base = sweep.Config(n_train=64, n_test=32)
    cfgs = zoostudy.grid(base, models=[VGG, VIT], lams=[0.0, 1e-2], batch_sizes=[4, 8],
                         lrs=[0.1], seeds=[0, 1], steps=32, drop_at=(0.5,), gamma=0.1,
                         control_batch_sizes=[4])
    assert len(cfgs) == 2 * (1 + 2) * 2  # lam = 0 only at B = 4
    assert all(c.lam > 0 or c.batch_size == 4 for c in cfgs)
    for c in cfgs:
        assert c.epochs * sweep.steps_per_epoch(64, c.batch_size) >= 32
    e = zoostudy.grid(base, models=["VIT"], lams=[0.0], batch_sizes=[8], lrs=[0.1], seeds=[0],
                      epochs={"VIT": 3}, milestones=(1, 2), gamma=0.2)
    assert e[0].epochs == 3 and e[0].lr_milestones == (1, 2) and e[0].lr_gamma == 0.2
    with pytest.raises(ValueError, match="exactly one"):
        zoostudy.grid(base, models=[VGG], lams=[0], batch_sizes=[4], lrs=[0.1], seeds=[0])
    with pytest.raises(ValueError, match="no entry"):
        zoostudy.grid(base, models=[VGG], lams=[0], batch_sizes=[4], lrs=[0.1], seeds=[0],
                      epochs={"VIT": 1})


@pytest.fixture(scope="module")
def tiny_sweep():
    torch.set_num_threads(1)
    base = sweep.Config(dataset="fashion-mnist", n_train=32, n_test=16)
    cfgs = zoostudy.grid(base, models=[VIT], lams=[0.0, 5e-2], batch_sizes=[8], lrs=[0.1],
                         seeds=[0, 1], steps=8)
    return cfgs, sweep.run(cfgs, progress=False)


def test_layer_ranks_and_run_table(tiny_sweep):
    cfgs, res = tiny_sweep
    lr = zoostudy.layer_ranks(res, atols=(1e-3, 4e-2))
    n_layers = len(zoo.build(VIT, (1, 28, 28)).rank_layers())
    assert len(lr) == len(cfgs) * n_layers
    for c in ("rank@0.001_init", "rank@0.04_end", "stable_rank_init", "stable_rank_end"):
        assert c in lr.columns and lr[c].notna().all()
    # init is the same network for equal seeds, whatever lambda
    a = lr[(lr.seed == 0) & (lr.lam == 0)].stable_rank_init.to_numpy()
    b = lr[(lr.seed == 0) & (lr.lam > 0)].stable_rank_init.to_numpy()
    assert (a == b).all()
    assert not (lr.stable_rank_init == lr.stable_rank_end).all()  # training changed something
    rt = zoostudy.run_table(res)
    assert len(rt) == len(cfgs) and not rt.diverged.any()
    assert math.isclose(rt.loc[rt.lam > 0, "total_decay"].iloc[0], 2 * 0.1 * 5e-2 * 8)
    assert (rt.loc[rt.lam == 0, "total_decay"] == 0).all()
    assert rt["rank@0.001_init"].between(1, 16).all() and rt.test_acc.between(0, 1).all()
    assert zoostudy.values(rt, "test_acc", lam=5e-2) == list(rt.loc[rt.lam > 0, "test_acc"])
    pl = zoostudy.per_layer_means(lr, "stable_rank_end")
    assert len(pl) == 2 * n_layers and (pl["min"] <= pl["mean"]).all()
    assert zoostudy.short_name("VGG16-BN:WIDTH=4") == "VGG16-BN"


def test_step_schedule_equal_for_both_batch_sizes():
    base = sweep.Config(n_train=2048, n_test=32)
    cfgs = zoostudy.grid(base, models=[VGG], lams=[1e-2], batch_sizes=[8, 16], lrs=[0.1],
                         seeds=[0], steps=1024, drop_at=(0.75,), gamma=0.1)
    for c in cfgs:  # both drop after 768 steps and end at lr 0.01
        spe = sweep.steps_per_epoch(2048, c.batch_size)
        assert c.epochs * spe == 1024 and [m * spe for m in c.lr_milestones] == [768]
        assert math.isclose(c.lr_at(c.epochs), 0.01)
    # the old 80% / 90% drops are rounded to whole epochs differently for B = 8 and 16
    with pytest.raises(ValueError, match="epoch boundaries"):
        zoostudy.grid(base, models=[VGG], lams=[1e-2], batch_sizes=[8, 16], lrs=[0.1],
                      seeds=[0], steps=1024, drop_at=(0.8, 0.9), gamma=0.1)


@pytest.mark.parametrize("spec,bn", [(VGG, True), (VIT, False)])
def test_batch_gradient_check_training_mode(spec, bn):
    m = zoo.build(spec, (1, 28, 28), seed=0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = zoostudy.batch_gradient_check(m, x).set_index("layer")
    assert t.within.all() and (t.bn == bn).all() and (t.BN == 2 * t.N).all()
    if bn:  # VGG stage 5 (N = 4, 32 x 288): the refined bound B N - 1 = 7 is attained
        assert t.loc["stage5.conv3", "bound"] == 7 and t.loc["stage5.conv3", "attained"]
        assert t.tight_fails.any()  # a bound one smaller fails: the check can fail
    assert m.training and next(m.parameters()).dtype == torch.float32
    for k, v in m.state_dict().items():  # BN running statistics restored
        assert torch.equal(v, before[k])


def test_matched_accuracy(tiny_sweep):
    cfgs, res = tiny_sweep
    mt = zoostudy.matched_accuracy(res, 5e-2)
    assert len(mt) == 2 and set(mt.seed) == {0, 1}
    ep = res.epochs
    for r in mt.itertuples():
        pid = [i for i, c in enumerate(cfgs) if c.lam == 0 and c.seed == r.seed][0]
        part = ep[ep.run_id == pid]
        if r.reached:
            assert r.acc0 >= r.target
            earlier = part[part.epoch < r.epoch0]
            assert (earlier.train_acc < r.target).all()  # the first epoch that reaches it
        assert r.step0 == r.epoch0 * sweep.steps_per_epoch(32, 8)
    for c in ("rank@0.001_lam", "rank@0.001_0", "stable_rank_lam", "stable_rank_0"):
        assert mt[c].notna().all()


@pytest.mark.slow  # two spawned worker processes: seconds alone, minutes on a loaded machine
def test_run_parallel_matches_in_process(tmp_path):
    torch.set_num_threads(1)
    base = sweep.Config(dataset="fashion-mnist", n_train=32, n_test=16)
    cfgs = zoostudy.grid(base, models=[VIT], lams=[5e-2], batch_sizes=[4, 8], lrs=[0.1],
                         seeds=[0], steps=8)
    par = zoostudy.run_parallel(cfgs, cache=str(tmp_path / "c"), jobs=2, progress=False)
    seq = sweep.run(cfgs, progress=False)
    assert len(list((tmp_path / "c").glob("*.pt"))) == len(cfgs)
    a = zoostudy.layer_ranks(par)["stable_rank_end"].to_numpy()
    b = zoostudy.layer_ranks(seq)["stable_rank_end"].to_numpy()
    assert a == pytest.approx(b, rel=1e-6)


def test_zero_rows_counts_dead_channels():
    m = zoo.build(VGG, (1, 28, 28), seed=0)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    dead = zoostudy.zero_rows(m, x)
    chk = zoostudy.gradient_check(m, x).set_index("layer")
    assert set(dead) == set(chk.index) and all(v >= 0 for v in dead.values())
    # a dead channel's row is zero, so the rank cannot exceed the number of live channels
    for name, mod in m.rank_layers():
        assert chk.loc[name, "measured"] <= mod.weight.shape[0] - dead[name]
    # negative control: killing one more output channel of the first conv (zero its BN scale
    # and shift) adds a dead row there
    first, mod = m.rank_layers()[0]
    assert dead[first] == 0
    bn = next(b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.weight[0] = 0.0
        bn.bias[0] = -1.0
    assert zoostudy.zero_rows(m, x)[first] == 1


def test_smallest_parts(tiny_sweep):
    cfgs, res = tiny_sweep
    run = next(i for i, c in enumerate(cfgs) if c.lam > 0)
    t = zoostudy.smallest(res, run)
    n_layers = len(zoo.build(VIT, (1, 28, 28)).rank_layers())
    assert len(t) == n_layers and (t.s_W > 0).all()
    # Weyl: s_min(W_T) >= c s_min(W_0) - ||dW||_2 (the bound may be negative)
    assert (t.s_W >= t.weyl - 1e-9).all()
    # and the upper Weyl bound s_min(W_T) <= c s_min(W_0) + ||dW||_2 (= 2 s_cW0 - weyl)
    assert (t.s_W <= 2 * t.s_cW0 - t.weyl + 1e-9).all()
    assert (t.s_W <= 1).all() and (t.s_cW0 > 0).all()
    # against SVDs done here: s_min(W_T) / ||W_T||_F of the stored weights, and c_T s_min(W_0)
    tab = decomposition.table(res)
    rows = tab[tab.run_id == run].set_index("layer")
    for (label, m0), (_, m1), s_w, s_c in zip(
            zoo.build(VIT, (1, 28, 28), seed=cfgs[run].seed).rank_layers(),
            res.model(run).rank_layers(), t.s_W, t.s_cW0):
        sv = np.linalg.svd(m1.weight.detach().double().reshape(len(m1.weight), -1).numpy(),
                           compute_uv=False)
        assert s_w == pytest.approx(sv[-1] / np.linalg.norm(sv), rel=1e-9), label
        sv0 = np.linalg.svd(m0.weight.detach().double().reshape(len(m0.weight), -1).numpy(),
                            compute_uv=False)
        assert s_c == pytest.approx(rows.c[label] * sv0[-1] / np.linalg.norm(sv), rel=1e-6)
    # a table with a wrong ||W_T||_F, s_min(W_0) or budget does not pass into the result
    # unseen: s_cW0 moves with c_T only (it decomposes c_T W_0 itself, so a copy of the table's
    # c W0_smin would fail here), and s_W does not follow the table's norm
    bad = tab[tab.run_id == run].assign(
        c=lambda d: 2 * d.c, W_fro=lambda d: 3 * d.W_fro, W0_smin=lambda d: 5 * d.W0_smin,
        **{k: (lambda d, k=k: d[k] + 1.0) for k in tab.columns if k.startswith("Dstar@")})
    t2 = zoostudy.smallest(res, run, bad)
    assert np.allclose(t2.s_cW0, 2 * t.s_cW0) and np.allclose(t2.s_W, t.s_W)


def test_linear_baseline():
    t = zoostudy.linear_baseline("fashion-mnist", 64, 32, Cs=(0.1, 1.0))
    assert list(t.C) == [0.1, 1.0]
    assert t.test_acc.between(0.2, 1).all() and (t.train_acc >= t.test_acc - 0.5).all()


# --- the chapter's plan (zoostudy.plan) from the chapter's own settings table -------------------
CHAPTER = Path(__file__).resolve().parents[1] / "chapters" / "06_conv_transformers.ipynb"


@pytest.fixture(scope="module")
def chapter():
    """The chapter's settings table (its settings cell run up to ``P = ...``) and the run count
    its committed (book-profile) outputs printed."""
    nb = json.loads(CHAPTER.read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    settings = next(s for s in cells if "TABLE = {" in s)
    ns: dict = {}
    exec(settings[:settings.index("P = profiles.select(")], ns)  # noqa: S102
    train = next(c for c in nb["cells"] if "".join(c["source"]).startswith("PLAN = zs.plan"))
    text = "".join("".join(o.get("text", "")) for o in train["outputs"])
    ran = int(re.search(r"^(\d+) runs \(", text, re.M).group(1))
    return ns["TABLE"], ran


def test_plan_book_is_what_the_chapter_ran(chapter):
    table, ran = chapter
    P = profiles.select(table, "book", dry=False)
    plan = zoostudy.plan(P)
    assert list(plan) == ["grid", "long arm"]
    assert len(plan["grid"]) + len(plan["long arm"]) == ran == 42
    assert len(plan["grid"]) == 3 * 2 * 2 * 3 and len(plan["long arm"]) == 2 * 3
    # the configs the chapter built before plan() existed: the same runs, so the same cache keys
    base = sweep.Config(dataset="fashion-mnist", n_train=2048, n_test=500, lr=0.1)
    old = zoostudy.grid(base, models=list(zoostudy.REDUCED.values()), lams=[0.0, 2e-2],
                        batch_sizes=[8, 16], lrs=[0.1], seeds=[0, 1, 2], steps=1024,
                        drop_at=(0.75,), gamma=0.1)
    assert plan["grid"] == old
    assert plan["long arm"] == zoostudy.grid(
        base, models=[zoostudy.REDUCED["VIT"]], lams=[0.0, 2e-2], batch_sizes=[8], lrs=[0.1],
        seeds=[0, 1, 2], steps=3072, drop_at=(0.75,), gamma=0.1)
    controls = [c for c in plan["grid"] if c.lam == 0]
    assert len(controls) == 18 and {c.batch_size for c in controls} == {8, 16}


def test_plan_gpu_differs_from_paper_only_as_documented(chapter):
    table, _ = chapter
    gpu = profiles.select(table, "gpu", dry=False)
    paper = profiles.select(table, "paper", dry=False)
    differ = {k for k in gpu if gpu[k] != paper[k]}
    # documented in the chapter: a subset of CIFAR-10, the grids' end points, 8 epochs with one
    # drop, one worker, and the recording (every epoch; spectra at every epoch)
    assert differ == {"n_train", "n_test", "lrs", "lams", "batch_sizes", "epochs",
                      "milestones", "record_every", "spectra"}
    assert gpu.lrs == [max(paper.lrs)]
    assert gpu.batch_sizes == [min(paper.batch_sizes), max(paper.batch_sizes)]
    g, p = zoostudy.plan(gpu), zoostudy.plan(paper)
    # the decayed arm keeps the paper's total decay D (at its largest lambda), not its lambda:
    # within 2% at both batch sizes, where the paper's lambda would give a D 50x smaller
    assert gpu.lams[0] == 0.0 and len(gpu.lams) == 2

    total_decay = decomposition.config_decay
    lam_p, lr = max(paper.lams), max(paper.lrs)
    for B in gpu.batch_sizes:
        dg = [total_decay(c) for c in g["grid"] if c.batch_size == B and c.lam > 0]
        dp = [total_decay(c) for c in p["grid"]
              if c.batch_size == B and c.lam == lam_p and c.lr == lr and c.model == "VGG16-BN"]
        assert max(abs(d / dp[0] - 1) for d in dg) < 0.02
        arm = next(c for c in g["grid"] if c.batch_size == B and c.lam > 0)
        assert total_decay(sweep.replace(arm, lam=lam_p)) < dp[0] / 20
    assert len(g["grid"]) == 3 * 2 * 2 * 3 and len(p["grid"]) == 3 * 2 * 3 * 3 * 3
    assert g["long arm"] == p["long arm"] == []
    assert {c.model for c in g["grid"]} == {c.model for c in p["grid"]} == set(paper.models)
    assert {c.seed for c in g["grid"]} == {0, 1, 2}
    assert all(c.dataset == "cifar10" and c.svd_dtype == "float32" for c in g["grid"])
    assert all(c.epochs == 8 and c.lr_milestones == (6,) for c in g["grid"])
    assert all(c.record_every == 5 and c.spectra == "every25" for c in p["grid"])
    # the lambda = 0 control at both batch sizes, three seeds per compared arm
    for B in gpu.batch_sizes:
        for lam in gpu.lams:
            arm = [c for c in g["grid"] if c.batch_size == B and c.lam == lam]
            assert len(arm) == 3 * 3  # models x seeds


def test_plan_gpu_fits_an_hour_on_a_t4(chapter):
    table, _ = chapter
    costs = cost.profile_costs(zoostudy.plan, table, names=("gpu",))
    est, t4 = costs["gpu"]
    assert est.runs == 36 and t4.fits
    assert t4.seconds <= 3600
    assert t4.peak_device_bytes < 0.9 * t4.ref.memory


def test_plan_dry_run_keeps_full_widths(chapter, monkeypatch):
    table, _ = chapter
    monkeypatch.setenv("SGDRANK_DRYRUN", "1")
    for name in ("gpu", "paper"):
        P = profiles.select(table, name)
        g = zoostudy.plan(P)["grid"]
        assert {c.model for c in g} == {"VGG16-BN", "RESNET18", "VIT"}
        assert all(c.n_train == 128 and c.epochs == 1 for c in g)
        assert {c.batch_size for c in g} == set(table[name]["batch_sizes"])
        assert {c.lam for c in g} == set(table[name]["lams"])


def test_matched_accuracy_with_sparse_spectra():
    """With spectra only at the ends (``Config.spectra``), the partner is matched at an epoch
    whose ranks were recorded, never at one without layer rows."""
    torch.set_num_threads(1)
    base = sweep.Config(dataset="fashion-mnist", n_train=32, n_test=16, spectra="ends",
                        svd_dtype="float32")
    cfgs = zoostudy.grid(base, models=[VIT], lams=[0.0, 5e-2], batch_sizes=[8], lrs=[0.1],
                         seeds=[0], steps=12)
    res = sweep.run(cfgs, progress=False)
    assert cfgs[0].epochs == 3 and res.epochs.avg_rank.isna().sum() == 2 * 2  # epochs 1, 2
    mt = zoostudy.matched_accuracy(res, 5e-2)
    assert len(mt) == 1 and mt.epoch0.iloc[0] in (0, 3)
    assert mt["stable_rank_0"].notna().all() and mt["rank@0.001_lam"].notna().all()
    assert zoostudy.run_table(res)["stable_rank_end"].notna().all()
