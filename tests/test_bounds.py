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
    assert bounds.thm33_rhs([0.1] * 5, 0.01, 5, 2.0) == pytest.approx(bounds.thm33_rhs(0.1, 0.01, 5, 2.0))
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
