"""sgdrank.decomposition: W_T = c_T W_0 + DeltaW_T exactly, the decay budget D* against a direct
simulation, and the per-run tables of both sweep engines (the initialisation rebuilt from the
seed is the one the engines trained from)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sgdrank import conventions, decomposition, metrics, sweep

from test_sweep import DATA


def _train_linear(lrs, lam, momentum=0.0, seed=0):
    """A 6x5 linear least-squares layer trained by torch.optim.SGD (float64) with the book's
    decay convention; returns W_0, W_T and the mini-batch gradients G_t of the loss alone."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g,
                                                                              dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=g, dtype=torch.float64))
    w0 = w.detach().clone()
    opt = torch.optim.SGD([w], lr=lrs[0], momentum=momentum,
                          weight_decay=conventions.torch_weight_decay(lam))
    grads = []
    for t, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        i = torch.arange(8 * t, 8 * t + 8) % 40
        loss = ((x[i] @ w.T - y[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        grads.append(w.grad.detach().clone())
        opt.step()
    return w0, w.detach().clone(), grads


def test_unrolled_sgd_is_decayed_init_plus_decayed_gradients():
    lrs = [0.1] * 10 + [0.05] * 10 + [0.01] * 5
    lam = 0.3
    w0, wT, grads = _train_linear(lrs, lam)
    c = decomposition.decay_factor(lrs, lam)
    dw = torch.zeros_like(w0)
    for t, (lr, gt) in enumerate(zip(lrs, grads)):
        dw -= lr * decomposition.decay_factor(lrs[t + 1:], lam) * gt
    assert torch.allclose(wT, c * w0 + dw, rtol=0, atol=1e-12)
    cw0, dW = decomposition.split(wT, w0, c)
    assert torch.allclose(dW, dw, atol=1e-12) and torch.allclose(cw0, c * w0)
    # negative control: the PyTorch-convention factor (1 - mu lam) misses by far more
    wrong = decomposition.decay_factor(lrs, lam / 2)
    assert not torch.allclose(wT, wrong * w0 + dw, atol=1e-3)
    assert decomposition.total_decay(lrs, lam) == pytest.approx(-math.log(c))
    assert decomposition.total_decay([1.0], 0.6) == math.inf


def test_momentum_split_is_the_gradient_contribution():
    """With momentum, W_T - c_T W_0 equals the same recursion run from W_0 = 0 on the recorded
    gradients: exactly the part of W_T that the gradients made."""
    lrs, lam, m = [0.05] * 20, 0.2, 0.9
    w0, wT, grads = _train_linear(lrs, lam, momentum=m)
    c = decomposition.init_factor(lrs, lam, m)
    w, b = torch.zeros_like(w0), torch.zeros_like(w0)
    for lr, gt in zip(lrs, grads):
        b = m * b + gt + 2 * lam * w
        w = w - lr * b
    assert torch.allclose(wT - c * w0, w, atol=1e-12)
    assert not math.isclose(c, decomposition.decay_factor(lrs, lam), rel_tol=1e-3)
    assert decomposition.init_factor(lrs, lam, 0.0) == decomposition.decay_factor(lrs, lam)


def test_budget_matches_a_direct_simulation():
    """W_T(D) = e^{-D} W_0 + M, with M leaving W_0's weakest direction alone: the 1e-3 threshold
    rank drops exactly when D crosses D* computed from ||W_T(D)||_F."""
    s0 = torch.tensor([3.0, 2.0, 1.0, 0.05], dtype=torch.float64)
    w0 = torch.diag(s0)
    M = torch.zeros(4, 4, dtype=torch.float64)
    M[:3, :3] = torch.tensor([[5.0, 1, 0], [0, 4, 1], [1, 0, 3]])
    eps = 1e-3

    def rank_at(D):
        wT = math.exp(-D) * w0 + M
        return int(metrics.threshold_rank(metrics.singular_values(wT), atol=eps)), wT

    _, w_guess = rank_at(4.0)
    Dstar = decomposition.budget(w0, float(torch.linalg.matrix_norm(w_guess)), eps)
    for _ in range(20):  # ||W_T||_F depends (weakly) on D: iterate to the fixed point
        _, wT = rank_at(Dstar)
        Dstar = decomposition.budget(w0, float(torch.linalg.matrix_norm(wT)), eps)
    assert rank_at(Dstar - 0.01)[0] == 4 and rank_at(Dstar + 0.01)[0] == 3
    # negative control: a budget with the wrong tolerance (eps / 10) misplaces the crossing
    wrong = decomposition.budget(w0, float(torch.linalg.matrix_norm(wT)), eps / 10)
    assert rank_at(wrong - 0.01)[0] == 3
    assert decomposition.budget(torch.zeros(3, 3), 1.0) == -math.inf


def test_budget_of_a_wide_matrix_uses_its_left_side():
    """Wide W_0 (3 x 5): the weak direction is the left singular vector; a learned part whose
    column space avoids it leaves s_3(W_T) = e^{-D} s_min(W_0), and the rank drops at D*."""
    w0 = torch.zeros(3, 5, dtype=torch.float64)
    w0[0, 0], w0[1, 1], w0[2, 2] = 2.0, 1.0, 0.02
    M = torch.zeros(3, 5, dtype=torch.float64)
    M[:2, :] = torch.tensor([[3.0, 1, 0, 2, 1], [0, 2, 0, 0, 3]])  # row 2 (the weak side) empty
    eps = 1e-3
    fro = lambda D: float(torch.linalg.matrix_norm(math.exp(-D) * w0 + M))
    rank = lambda D: int(metrics.threshold_rank(
        metrics.singular_values(math.exp(-D) * w0 + M), atol=eps))
    Dstar = 0.0
    for _ in range(20):
        Dstar = decomposition.budget(w0, fro(Dstar), eps)
    assert rank(Dstar - 0.01) == 3 and rank(Dstar + 0.01) == 2


def test_parts_keys_and_scale_invariance():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    u = torch.randn(8, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 5, generator=g, dtype=torch.float64)
    wT = 0.01 * w0 + u @ v  # a rank-one learned part over a decayed initialisation
    p = decomposition.parts(wT, w0, 0.01)
    assert p["dW_rank@0.001"] == 1 and p["dW_srank"] == pytest.approx(1.0)
    assert p["W0_rank@0.001"] == 5 and p["W0_srank"] > 1.5
    assert p["c"] == 0.01 and (p["d_out"], p["d_in"]) == (8, 5)
    assert p["Dstar@0.001"] == pytest.approx(decomposition.budget(w0, p["W_fro"], 1e-3))
    s0 = np.linalg.svd(w0.numpy(), compute_uv=False)
    assert p["decay_rank@0.001"] == int((0.01 * s0 > 1e-3 * p["W_fro"]).sum())
    assert decomposition.parts(wT, w0, 1e-9)["decay_rank@0.001"] == 0
    conv = decomposition.parts(torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3), 0.5)
    assert (conv["d_out"], conv["d_in"]) == (4, 27)


@pytest.mark.parametrize("engine", ["batched", "loop"])
def test_sweep_tables_rebuild_the_engines_initialisation(engine):
    cfgs = sweep.grid(sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=3,
                                   lr=0.1, lr_milestones=(2,), lr_gamma=0.5), lam=[0.0, 0.05])
    res = sweep.run(cfgs, data=DATA, progress=False, device="cpu", engine=engine)
    tab = decomposition.table(res)
    assert len(tab) == 2 * 3 and set(tab.lam) == {0.0, 0.05}
    # the rebuilt W_0 is the engine's: its singular values are the ones recorded at epoch 0
    lay = res.layers
    for _, row in tab.iterrows():
        rec = lay[(lay.run_id == row.run_id) & (lay.epoch == 0) & (lay.layer == row.layer)]
        s0 = np.asarray(rec.sv.iloc[0])
        assert row.W0_fro == pytest.approx(float(np.linalg.norm(s0)), rel=1e-6)
    steps = 96 // 16
    lrs = [0.1] * (2 * steps) + [0.05] * steps
    for lam, sub in tab.groupby("lam"):
        assert np.allclose(sub.c, decomposition.decay_factor(lrs, lam))
        assert np.allclose(sub.D, -math.log(decomposition.decay_factor(lrs, lam)))
    assert np.allclose(tab[tab.lam == 0].c, 1.0)
    # the two runs share a seed: W_0 is decomposed once per layer, and the rows are the same as
    # when every run decomposes it afresh
    shared: dict = {}
    rows = [r for i in range(len(res)) for r in decomposition.run_parts(res, i,
                                                                         init_spectra=shared)]
    assert len(shared) == 3
    fresh = [r for i in range(len(res)) for r in decomposition.run_parts(res, i)]
    assert rows == fresh


def test_show_validates_and_stores_a_record(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False: shown.append(obj))
    row = dict(arm="lam=0.01", lam=0.01, D=3.2, Dstar=4.1, fit="train acc 0.99", rank_W=60,
               rank_W0=64, rank_dW=40, srank_W=5.0, srank_W0=20.0, srank_dW=3.0)
    assert decomposition.show("E7 MLP", [row], "ch3-sec") is None
    import json

    rec = json.loads(shown[0][decomposition.SYNTHESIS_MIME])
    assert rec["experiment"] == "E7 MLP" and rec["rows"][0]["rank_dW"] == 40.0
    with pytest.raises(ValueError, match="lacks"):
        decomposition.show("x", [{"arm": "a"}], "ch3-sec")


def test_decomposition_takes_the_runs_svd_precision():
    """A float32-recording run is decomposed in float32 (its ``W_rank`` is the rank its record
    reads); the float64 run of the same training in float64. The smallest singular values and
    ``||DeltaW||_2`` are those of the parts' own spectra."""
    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=2, lr=0.1,
                        lam=0.05)
    cfgs = [base, sweep.replace(base, svd_dtype="float32")]
    res = sweep.run(cfgs, data=DATA, progress=False, device="cpu", engine="batched")
    t64, t32 = (pd.DataFrame(decomposition.run_parts(res, i)) for i in (0, 1))
    sd0, sd1 = res.state_dict(0), res.state_dict(1)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)  # the same weights ...
    assert not np.array_equal(t64.W_smin, t32.W_smin)  # ... decomposed in two precisions
    assert np.allclose(t64.W_smin, t32.W_smin, rtol=1e-4)
    for col in ("W_rank@0.001", "dW_rank@0.001", "W0_rank@0.001"):
        assert (t64[col] == t32[col]).all(), col
    s_T = metrics.singular_values(res.model(0).rank_layers()[0][1].weight)  # W_T, first matrix
    assert t64.W_smin.iloc[0] == pytest.approx(float(s_T[-1]), rel=1e-12)
    p = decomposition.parts(torch.randn(6, 4, dtype=torch.float64),
                            torch.randn(6, 4, dtype=torch.float64), 0.3)
    assert p["dW_smax"] >= p["dW_smin"] > 0


@pytest.mark.parametrize("engine", ["batched", "loop"])
def test_recorded_final_spectra_replace_an_svd_of_w_t(engine, monkeypatch):
    """``Result.final_spectra`` holds the singular values of the weights ``Result.model`` returns
    (epoch 0's do not match them), and ``run_parts`` reads them and epoch 0's instead of
    decomposing W_T and W_0 again: only DeltaW is decomposed, and the rows are the same."""
    from sgdrank import record

    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=3, lr=0.1,
                        spectra="ends")
    res = sweep.run(sweep.grid(base, lam=[0.0, 0.05]), data=DATA, progress=False,
                    device="cpu", engine=engine)
    for i in range(len(res)):
        sv, mats = res.final_spectra(i), dict(res.model(i).rank_layers())
        assert list(sv) == list(mats)
        for label, m in mats.items():
            torch.testing.assert_close(sv[label], metrics.singular_values(m.weight),
                                       rtol=1e-10, atol=1e-12)
            s_init = res.layers[(res.layers.run_id == i) & (res.layers.epoch == 0)
                                & (res.layers.layer == label)].sv.iloc[0]
            with pytest.raises(ValueError, match="not those of"):  # control: epoch 0's values
                decomposition.known_spectrum(s_init, m.weight)
    calls = []
    real = record.singular_values
    monkeypatch.setattr(record, "singular_values", lambda *a, **k: calls.append(1) or real(*a, **k))
    known = [r for i in range(len(res)) for r in decomposition.run_parts(res, i)]
    n_known = len(calls)
    assert n_known == len(known)  # one SVD per matrix: DeltaW's
    monkeypatch.setattr(type(res), "spectra_at", lambda self, run, epoch: None)
    monkeypatch.setattr(type(res), "final_spectra", lambda self, run: None)
    fresh = [r for i in range(len(res)) for r in decomposition.run_parts(res, i)]
    # afresh (each call with its own init_spectra): W_T, W_0 and DeltaW of every matrix
    assert len(calls) - n_known == 3 * len(known)
    assert pd.DataFrame(known).columns.tolist() == pd.DataFrame(fresh).columns.tolist()
    for a, b in zip(known, fresh):
        for k, v in a.items():
            assert v == b[k] if isinstance(v, (int, str)) else v == pytest.approx(b[k], rel=1e-9)


def test_final_spectra_of_a_run_without_final_weights_is_none():
    base = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=16, epochs=2, lr=0.1)
    res = sweep.run([base], data=DATA, progress=False, device="cpu", engine="batched")
    assert res.final_spectra(0) is not None
    res.records[0] = {**res.records[0], "state": None}  # as a diverged run stores it
    assert res.final_spectra(0) is None and decomposition.run_parts(res, 0) == []


def test_known_spectrum_refuses_another_matrix():
    g = torch.Generator().manual_seed(0)
    w, other = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    s = metrics.singular_values(w)
    assert torch.equal(decomposition.known_spectrum(s.float(), w), s.float().double())
    zero = torch.zeros(1, dtype=s.dtype)
    for bad in (metrics.singular_values(other), s[:-1], 1.001 * s,
                torch.cat([s, zero]),  # one value too many, the same norm
                s.flip(0), -s):  # ascending, negative
        with pytest.raises(ValueError, match="not those of"):
            decomposition.known_spectrum(bad, w)
    conv = torch.randn(4, 3, 3, 3, generator=g)  # a filter bank, read as a 4 x 27 matrix
    decomposition.known_spectrum(metrics.singular_values(conv), conv)
    p = decomposition.parts(w, other, 0.5, s=s)
    assert p == decomposition.parts(w, other, 0.5)
    with pytest.raises(ValueError, match="not those of"):
        decomposition.parts(w, other, 0.5, s=metrics.singular_values(other))
    with pytest.raises(ValueError, match="not those of"):  # W_0's too
        decomposition.parts(w, other, 0.5, s0=s)
