"""GSGP Theorem 3.3 helpers: Eckart-Young distances and the bound holding on unrolled SGD."""
import math

import numpy as np
import pytest

from sgdrank import bounds


def test_lowrank_distance_is_eckart_young():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 6))
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    for r in range(7):
        best = (u[:, :r] * s[:r]) @ vt[:r]
        assert bounds.lowrank_distance(s, r) == pytest.approx(np.linalg.norm(a - best), abs=1e-12)
    assert bounds.thm33_lhs(s, 0) == pytest.approx(1.0)
    assert bounds.thm33_lhs(s, 6) == 0.0


def test_rhs_constant_and_scheduled_learning_rates_agree():
    assert bounds.thm33_rhs(0.1, 0.01, 5, 2.0) == pytest.approx(2.0 * (1 - 0.002) ** 5)
    assert bounds.thm33_rhs([0.1] * 5, 0.01, 5, 2.0) == pytest.approx(
        bounds.thm33_rhs(0.1, 0.01, 5, 2.0))
    with pytest.raises(ValueError):
        bounds.thm33_rhs([0.1] * 4, 0.01, 5, 1.0)


def test_theorem_holds_on_unrolled_sgd_and_bites_for_strong_decay():
    """The inequality holds at every (t, k); with 2 mu lambda = 0.1 and B = 2 on a 60 x 60 matrix it
    certifies a rank far below 60."""
    w0 = np.random.default_rng(1).standard_normal((60, 60))
    lr, lam, b = 0.5, 0.1, 2
    ws = bounds.unrolled_sgd(w0, lr, lam, b, 80, grad_scale=3.0, seed=2)
    for t in (40, 80):
        for k in (1, 5, 10, 20):
            s = np.linalg.svd(ws[t], compute_uv=False)
            lhs = bounds.thm33_lhs(s, b * k)
            rhs = bounds.thm33_rhs(lr, lam, k, np.linalg.norm(ws[t - k]) / np.linalg.norm(ws[t]))
            assert lhs <= rhs + 1e-12
    s = np.linalg.svd(ws[80], compute_uv=False)
    assert bounds.thm33_lhs(s, 2 * 20) < 0.2  # within 0.2 of rank 40 after 80 steps


def test_certified_rank():
    # (1 - 2*0.1*5e-4)^k <= 0.1  <=>  k >= ln(10) / 1e-4 ~ 23,025 steps; times B = 16
    r = bounds.certified_rank(0.1, 5e-4, 16, 0.1)
    assert r == 16 * math.ceil(math.log(0.1) / math.log(1 - 1e-4))
    assert bounds.certified_rank(0.1, 0.0, 16, 0.1) == math.inf


def test_momentum_unrolling_matches_torch_sgd():
    """A parameter with zero loss gradient under torch.optim.SGD(momentum, weight_decay=2 lam)
    is a_k W_0 after k steps; with gradients,
    W_t = a_k W_{t-k} + b_k v_{t-k} + sum_l c_l G_{t-l}."""
    import torch

    lr, lam, beta = 0.1, 0.05, 0.9
    w = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(0)))
    w0 = w.detach().clone()
    opt = torch.optim.SGD([w], lr=lr, momentum=beta, weight_decay=2 * lam)
    for k in range(1, 31):
        w.grad = torch.zeros_like(w)
        opt.step()
        a, b = bounds.momentum_factors(lr, lam, beta, k)
        assert torch.allclose(w.detach(), a * w0, rtol=1e-12, atol=1e-14)
    # with gradients: the unrolled identity, from an arbitrary state (W, v)
    rng = np.random.default_rng(1)
    W, v = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    Wk, vk, Gs = W.copy(), v.copy(), []
    for _ in range(7):
        G = rng.standard_normal((6, 3))
        Gs.append(G)
        vk = beta * vk + 2 * lam * Wk + G
        Wk = Wk - lr * vk
    a, b = bounds.momentum_factors(lr, lam, beta, 7)
    M = bounds.momentum_matrix(lr, lam, beta)
    rest = sum((np.linalg.matrix_power(M, l - 1) @ np.array([-lr, 1.0]))[0] * Gs[-l]
               for l in range(1, 8))
    assert np.allclose(Wk, a * W + b * v + rest, rtol=1e-12, atol=1e-12)
    assert bounds.momentum_factors(lr, lam, 0.0, 7) == pytest.approx(((1 - 2 * lr * lam) ** 7, 0.0))


def test_momentum_rate_first_order():
    for beta in (0.0, 0.5, 0.9):
        r = bounds.momentum_rate(0.1, 1e-4, beta)
        assert r == pytest.approx(1 - 2 * 0.1 * 1e-4 / (1 - beta), abs=1e-6)
    assert bounds.momentum_rate(0.1, 1e-4, 0.0) == pytest.approx(1 - 2e-5, abs=1e-15)
    with pytest.raises(ValueError):
        bounds.momentum_matrix(0.1, 1e-3, 1.0)
