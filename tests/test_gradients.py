"""Chapter 1's claims as unit tests: exact gradient ranks against their bounds."""
import math

import pytest
import torch

from sgdrank import gradients as G
from sgdrank import models



@pytest.fixture(autouse=True)
def _float64_and_seed(float64_default):
    """Exact ranks need float64 (restored afterwards, see conftest)."""
    torch.manual_seed(0)


def test_fc_per_sample_gradient_is_rank_one_for_any_activation():
    for act in ("relu", "gelu", "tanh"):
        m = models.MLP(10, 3, 3, [8, 7, 6], activation=act)
        x = torch.randn(6, 10)
        assert set(G.max_ranks(G.per_sample_gradients(m, x)).values()) == {1}
        assert set(G.rank_bounds(m, x).values()) == {1}


def test_per_sample_gradient_equals_outer_product():
    m = models.MLP(5, 1, 2, 4)
    x = torch.randn(1, 5)
    (g,) = [d["W2"] for d in G.per_sample_gradients(m, x, torch.ones(1))]
    h = torch.relu(m.layers[0](x))[0]                      # input of W2
    z2 = m.layers[1](torch.relu(m.layers[0](x)))[0]        # pre-activation of layer 2
    delta = (m.head.weight[0] * (z2 > 0))                  # d f / d z2
    assert torch.allclose(g, torch.outer(delta, h), atol=1e-12)


def test_batch_sum_rank_is_batch_size():
    m = models.MLP(12, 2, 2, 10)
    x = torch.randn(5, 12)
    r = G.ranks(G.weighted_batch_gradient(m, x, torch.randn(5)))
    # the head of a scalar (projected) output is c (sum_j beta_j h_j)^T: rank one
    assert r["W1"] == 5 and r["W2"] == 5 and r["head"] == 1


def test_conv_gradient_rank_is_number_of_patches():
    net = models.ConvNet((3, 5, 5), 2, [(12, 3, 2, 0), (12, 2, 1, 0)]).double()
    x = torch.randn(4, 75)
    assert G.applications(net, x) == {"conv1": 4, "conv2": 1, "head": 1}
    assert G.max_ranks(G.per_sample_gradients(net, x)) == {"conv1": 4, "conv2": 1, "head": 1}


def test_batchnorm_couples_samples_with_rank_batch_minus_one():
    x = torch.randn(6, 10)
    full = models.MLP(10, 3, 2, 8, bn=True).train()
    det = models.MLP(10, 3, 2, 8, bn=True, detach_var=True).train()
    assert G.couples_batch(full)
    assert G.max_ranks(G.per_sample_gradients(full, x)) == {"W1": 5, "W2": 5, "head": 1}
    # detached variance: the last BN layer's own normalisation is affine in (W h_j - mean)
    assert G.max_ranks(G.per_sample_gradients(det, x)) == {"W1": 5, "W2": 1, "head": 1}
    for m in (full, det):  # the batch-sum bound of GP22 Lemma 2 holds with or without detaching
        r = G.ranks(G.weighted_batch_gradient(m, x, torch.randn(6)))
        assert r["W1"] <= 5 and r["W2"] <= 5
    full.eval()
    assert not G.couples_batch(full)
    assert set(G.max_ranks(G.per_sample_gradients(full, x)).values()) == {1}


def test_weight_sharing_breaks_rank_one():
    tied = models.TiedMLP(6, 2, 8)
    x = torch.randn(3, 6)
    assert G.applications(tied, x)["W (tied)"] == 2
    assert G.max_ranks(G.per_sample_gradients(tied, x))["W (tied)"] == 2
    att = models.TinyAttention(5, 8, 2)
    xa = torch.randn(3, 40)
    assert G.applications(att, xa)["Wq"] == 5
    r = G.max_ranks(G.per_sample_gradients(att, xa))
    assert r["Wq"] == 4 and r["Wk"] == 4 and r["Wv"] == 1  # softmax rows sum to one; mean pooling


def test_vector_output_jacobian_and_loss_gradient():
    m = models.MLP(10, 3, 2, 8)
    x = torch.randn(1, 10)
    J = G.jacobian_matrices(m, x)["W2"]                    # (k, d_out, d_in)
    assert G.numerical_rank(J.reshape(-1, J.shape[-1])) == 1          # shared right factor h
    assert G.numerical_rank(J.permute(1, 0, 2).reshape(J.shape[1], -1)) <= 3
    g = G.loss_gradient(m, x, torch.tensor([1]))
    assert set(G.ranks(g).values()) == {1}


def test_random_architectures_never_violate_the_sharp_bound():
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        desc, m, draw = G.random_architecture(gen)
        for row in G.check_losses(m, draw, batch=4, trials=2):
            assert row["rank 1"] <= row["bound 1"] <= row["lemma 1"], (desc, row)
            assert row["rank B"] <= row["bound B"] <= row["lemma B"], (desc, row)
            assert row["lemma 1"] <= row["lemma B"], (desc, row)
            assert row["dropped max"] < 1e-4 * G.RANK_RTOL, (desc, row)


def test_reachable_patches_sharpen_the_conv_bound():
    net = models.ConvNet((3, 8, 8), 2, [(14, 3, 2, 0), (22, 2, 2, 1), (9, 1, 2, 0)])
    assert net.patches() == [9, 4, 1]
    assert G.reachable_positions(net) == {"conv1": 1, "conv2": 1, "conv3": 1}
    x = torch.randn(4, 192)
    assert G.rank_bounds(net, x, sharp=False)["conv1"] == 9
    assert G.rank_bounds(net, x)["conv1"] == 1
    assert G.max_ranks(G.per_sample_gradients(net, x))["conv1"] == 1
    # a layer whose every output is read keeps N
    full = models.ConvNet((3, 5, 5), 2, [(12, 3, 2, 0), (12, 2, 1, 0)])
    assert G.reachable_positions(full) == {"conv1": 4, "conv2": 1}
    assert G.reachable_positions(models.MLP(3, 1, 1, 2)) == {}


def test_sharp_batchnorm_bounds_are_attained():
    x = torch.randn(6, 10)
    full = models.MLP(10, 3, 2, 8, bn=True).train()
    det = models.MLP(10, 3, 2, 8, bn=True, detach_var=True).train()
    assert G.rank_bounds(full, x, sharp=False) == {"W1": 6, "W2": 6, "head": 3}
    assert G.rank_bounds(full, x) == {"W1": 5, "W2": 5, "head": 1}
    assert G.rank_bounds(det, x) == {"W1": 5, "W2": 1, "head": 1}
    assert G.rank_bounds(det, x, batch_sum=True, output_rank=1) == {"W1": 5, "W2": 5, "head": 1}
    assert G.max_ranks(G.per_sample_gradients(det, x)) == G.rank_bounds(det, x)
    res = models.ResMLP(10, 3, 2, 8, bn=True, detach_var=True).train()
    b = G.rank_bounds(res, x)
    assert b["stem"] == 6 and b["block1.W1"] == 5 and b["block2.W2"] == 1 and b["head"] == 1
    assert G.max_ranks(G.per_sample_gradients(res, x)) == b


def test_loss_gradients_of_the_classifier_have_rank_min_B_k_or_k_minus_1():
    m = models.MLP(10, 4, 2, 12, activation="gelu")
    x = torch.randn(7, 10)
    g = torch.Generator().manual_seed(1)
    mse = G.batch_loss_gradient(m, x, G.random_targets(g, 7, 4, "mse"), "mse")
    ce = G.batch_loss_gradient(m, x, G.random_targets(g, 7, 4, "ce"), "ce")
    assert G.ranks(mse)["head"] == 4 and G.ranks(ce)["head"] == 3
    assert G.ranks(mse)["W1"] == 7 and G.ranks(ce)["W2"] == 7
    assert G.rank_bounds(m, x, batch_sum=True, output_rank=G.output_rank("ce", 4))["head"] == 3
    for grads in G.per_sample_loss_gradients(m, x, G.random_targets(g, 7, 4, "ce"), "ce"):
        assert set(G.ranks(grads).values()) == {1}
    one = models.MLP(5, 1, 1, 4)   # cross-entropy with one class is constant: zero gradient
    rows = G.check_losses(one, lambda gen, b: torch.randn(b, 5, generator=gen), batch=3,
                          trials=1, losses=("ce",))
    assert all(r["bound B"] == 0 == r["rank B"] for r in rows)
    with pytest.raises(ValueError, match="unknown loss"):
        G.output_rank("hinge", 3)
    with pytest.raises(ValueError, match="unknown loss"):
        G.batch_loss_gradient(m, x, x, "l1")


def test_attention_queries_and_keys_lose_one_dimension():
    att = models.TinyAttention(6, 8, 2, bias=True)
    x = torch.randn(3, 48)
    assert G.rank_bounds(att, x, sharp=False)["Wq"] == 6
    assert G.rank_bounds(att, x)["Wq"] == 5 and G.rank_bounds(att, x)["Wk"] == 5
    r = G.max_ranks(G.per_sample_gradients(att, x))
    assert r["Wq"] == 5 and r["Wk"] == 5
    (gb,) = torch.autograd.grad(att(x[:1]).sum(), att.Wk.bias)   # sum_u delta^k_u = 0
    assert gb.abs().max() < 1e-12
    tok = G.TokenAttention(5, 8, 3)
    xs = torch.randn(40, 40)
    y = G.random_targets(torch.Generator().manual_seed(0), 40, 3, "mse")
    rv = G.max_ranks(G.per_sample_loss_gradients(tok, xs, y, "mse"))
    assert rv["Wv"] == 5 and rv["Wq"] == 4 and G.rank_bounds(tok, xs)["Wv"] == 5


def test_tied_gradient_is_the_sum_over_untied_copies():
    tied = models.TiedMLP(6, 2, 5)
    x = torch.randn(1, 6)
    (g_tied,) = torch.autograd.grad(tied(x).sum(), tied.W.weight)
    w1 = tied.W.weight.detach().clone().requires_grad_(True)
    w2 = tied.W.weight.detach().clone().requires_grad_(True)
    h1 = torch.relu(tied.inp(x))
    out = tied.head(torch.relu(torch.relu(h1 @ w1.T) @ w2.T)).sum()
    g1, g2 = torch.autograd.grad(out, [w1, w2])
    assert torch.allclose(g_tied, g1 + g2, atol=1e-12)
    assert G.numerical_rank(g1) <= 1 and G.numerical_rank(g2) <= 1


def test_rank_and_gap_and_tolerance():
    u, v = torch.randn(6, 2), torch.randn(2, 4)
    m = u @ v + 1e-14 * torch.randn(6, 4)
    r, kept, dropped = G.rank_and_gap(m)
    assert r == 2 and kept > 1e-6 and 0 < dropped < 1e-12
    assert G.rank_and_gap(torch.zeros(3, 3)) == (0, pytest.approx(float("nan"), nan_ok=True), 0.0)
    assert G.ranks({"a": m}, rtol=1e-16)["a"] == 4


def test_train_briefly_is_sgd_with_the_books_weight_decay():
    m = models.MLP(4, 2, 1, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    nn_loss = torch.nn.functional.cross_entropy(m(x), y)
    grads = dict(zip(before, torch.autograd.grad(nn_loss, list(m.parameters()))))
    G.train_briefly(m, x, y, "ce", steps=1, batch=5, lr=0.1, lam=0.3)
    for n, p in m.named_parameters():
        decay = 2 * 0.3 * before[n] if n.endswith("weight") else 0
        assert torch.allclose(p, before[n] - 0.1 * (grads[n] + decay), atol=1e-12), n
    hist = G.train_briefly(m, x, y, "ce", steps=200, batch=5, lr=0.5, lam=0.0)
    assert hist[-1] < 0.5 * hist[0] and float(nn_loss.detach()) > 0


def test_pattern_is_locally_constant_and_f_is_linear_in_each_layer():
    m = models.MLP(8, 1, 3, 16)
    x = torch.randn(1, 8)
    p0 = G.activation_pattern(m, x)
    delta = torch.randn_like(m.layers[1].weight)
    (grad,) = torch.autograd.grad(m(x).sum(), m.layers[1].weight)
    f0 = m(x).item()
    with torch.no_grad():
        m.layers[1].weight.add_(1e-7 * delta)
    assert torch.equal(G.activation_pattern(m, x), p0)
    assert m(x).item() - f0 == pytest.approx(1e-7 * (grad * delta).sum().item(), rel=1e-6)
    assert float(G.pattern_margin(m, x)) > 0


def test_trained_checks_train_and_stay_within_the_bounds():
    checks, weights, loss = G.trained_checks(lambda: models.MLP(6, 3, 2, 5), 6, seed=1,
                                             steps=150, n=24, batch=6, trials=2)
    assert loss["last"] < loss["first"]
    assert {r["when"] for r in checks} == {"init", "trained"}
    assert all(r["rank 1"] <= r["bound 1"] and r["rank B"] <= r["bound B"] for r in checks)
    assert [w["layer"] for w in weights] == ["W1", "W2"]
    assert all(w["stable init"] != w["stable trained"] for w in weights)


def test_catalogue_text_shows_bound_and_rank_per_loss():
    m = models.MLP(10, 3, 2, 8, bn=True).train()
    rows = [{"architecture": "bn", **r} for r in
            G.check_losses(m, lambda gen, b: torch.randn(b, 10, generator=gen), batch=6, trials=1)]
    lines = G.catalogue_text(rows).splitlines()
    assert lines[0] == "bn" and "c.f" in lines[1] and "CE" in lines[1]
    head = lines[-1].split()
    assert head[0] == "head" and head[-3:] == ["1/1", "3/3", "2/2"]
    assert max(len(l) for l in lines) <= 80



def test_multi_head_queries_reach_T_keys_keep_T_minus_1():
    """Per-head query spans add up: with several heads W_q's per-sample gradient reaches T
    (the one-head bound T - 1 is false there, the negative control); W_k keeps T - 1."""
    T, d = 5, 8
    x = torch.randn(3, T * d)
    multi, one = G.MultiHeadAttention(T, d, 2, heads=4), G.MultiHeadAttention(T, d, 2, heads=1)
    bm, b1 = G.rank_bounds(multi, x), G.rank_bounds(one, x)
    assert bm["Wq"] == T and bm["Wk"] == T - 1 and b1["Wq"] == T - 1 and b1["Wk"] == T - 1
    rm = G.max_ranks(G.per_sample_gradients(multi, x))
    r1 = G.max_ranks(G.per_sample_gradients(one, x))
    assert rm["Wq"] == T > T - 1 and rm["Wk"] == T - 1   # T - 1 would fail for multi-head W_q
    assert r1["Wq"] == T - 1 and r1["Wk"] == T - 1


def test_flip_slope_recovers_a_linear_law_and_its_interval_excludes_zero():
    """C4's evidence: the slope of P(flip) over delta with a bootstrap interval over draws."""
    import numpy as np
    rng = np.random.default_rng(0)
    deltas = np.logspace(-4, -1, 7)
    u = rng.random(4000)[:, None]
    flips = u < 20 * deltas[None, :]          # P = 20 delta: slope 1, nested as in the chapter
    fs = G.flip_slope(deltas, flips, max_delta=0.05)
    assert fs["lo"] <= 1 <= fs["hi"] and fs["lo"] > 0.5 and fs["n_deltas"] >= 3
    flat = rng.random((4000, 7)) < 0.3        # no dependence on delta: slope 0
    fz = G.flip_slope(deltas, flat, max_delta=0.05)
    assert fz["lo"] <= 0 <= fz["hi"]


def test_live_bound_counts_dead_units_and_caps_the_rank():
    """A ReLU unit off for the whole batch zeroes a row of Delta (a row of the gradient); the
    live bound min(nonzero rows, nonzero columns) is between the rank and the sharp bound."""
    torch.manual_seed(0)
    m = models.MLP(6, 1, 2, 5).double()
    with torch.no_grad():
        m.layers[0].weight[0].zero_()
        m.layers[0].bias[0] = -1.0                       # unit 0 of layer 1: off for every x
    x = torch.randn(6, 6)
    g = G.weighted_batch_gradient(m, x, torch.randn(6))
    assert G.live_size(g["W1"])[0] <= 4                  # a zero row of Delta
    assert G.live_size(g["W2"])[1] <= 4                  # a zero row of H (the dead input)
    rows = G.check_losses(m, lambda gen, b: torch.randn(b, 6, generator=gen), batch=6, trials=2)
    assert all(r["rank B"] <= r["live B"] <= r["bound B"] for r in rows)
    assert all(r["rank 1"] <= r["live 1"] <= r["bound 1"] for r in rows)
    assert any(r["live B"] < r["bound B"] for r in rows)  # negative control: dead units bite


def test_batch_factors_multiply_to_the_gradient():
    m = models.MLP(10, 3, 3, [8, 7, 6]).double()
    x, beta = torch.randn(6, 10), torch.randn(6)
    fac = G.batch_factors(m, x, beta)
    grads = G.weighted_batch_gradient(m, x, beta)
    for n, f in fac.items():
        assert f["rank"] == G.ranks({n: grads[n]})[n]
        assert f["rank"] <= min(f["rank Delta"], f["rank H"])
        assert f["rank Delta"] <= int(grads[n].shape[0]) - f["zero rows Delta"]
        assert f["rank H"] <= int(grads[n].shape[1]) - f["zero rows H"]


def test_trained_checks_decomposition_and_lambda_zero_arm():
    _, w_dec, _ = G.trained_checks(lambda: models.MLP(6, 3, 2, 5), 6, seed=1, steps=50, n=24,
                                   check=False)
    checks, w0, _ = G.trained_checks(lambda: models.MLP(6, 3, 2, 5), 6, seed=1, steps=50, n=24,
                                     lam=0.0, check=False)
    assert checks == []
    assert w0[0]["c"] == 1.0 and w0[0]["D"] == 0.0
    assert w_dec[0]["c"] == pytest.approx((1 - 2 * 0.1 * 1e-3) ** 50)
    assert w_dec[0]["D"] == pytest.approx(-50 * math.log(1 - 2e-4))
    assert all(w["Dstar"] > w["D"] for w in w_dec)       # 50 steps cannot spend the budget
    assert all(w["stable init"] == w0[i]["stable init"] for i, w in enumerate(w_dec))
