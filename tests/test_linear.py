"""sgdrank.linear: the closed forms of Chapter 2 against plain step-by-step simulation."""

import math

import numpy as np
import pytest

from sgdrank import linear as L


@pytest.fixture(scope="module")
def small():
    p = L.make_problem(8, 5, 3, seed=1)
    W0 = L.random_init(3, 8, 0.3, seed=2)
    return p, W0


def _batches(run, N, epochs):
    """The batches a run uses, as lists of sample indices (what direct_sgd consumes)."""
    b = L._Schedule(run, N).epochs(0, epochs)
    return [[int(i) for i in bb if i >= 0] for ep in b for bb in ep]


SCHEMES = [
    ("reshuffle", 1, False),
    ("cyclic", 2, False),
    ("replacement", 2, False),
    ("gd", None, False),
    ("reshuffle", 3, False),
    ("cyclic", 3, True),
    ("reshuffle", 2, True),
]


@pytest.mark.parametrize("scheme,B,drop_last", SCHEMES)
def test_simulator_equals_plain_sgd(small, scheme, B, drop_last):
    """The batched affine-map simulator reproduces W <- W - eta grad L_b(W), step by step."""
    p, W0 = small
    lrs = L.lr_schedule("inv_sqrt", 0.08, 12)
    run = L.Run(0, W0, 0.02, lrs, scheme=scheme, B=B, seed=7, drop_last=drop_last)
    tr = L.simulate([p], [run], 12, keep_steps=True, progress=False)
    batches = _batches(run, 5, 12)
    S = L.steps_per_epoch(5, B, scheme, drop_last)
    assert len(batches) == 12 * S
    step_lrs = np.repeat(lrs, S)
    ref = L.direct_sgd(p, W0, 0.02, step_lrs, batches)
    got = tr.step_W[:, 0]
    assert got.shape[0] == len(batches)
    np.testing.assert_allclose(got, np.stack(ref[1:]), rtol=0, atol=1e-13)
    np.testing.assert_allclose(tr.W[-1, 0], ref[-1], rtol=0, atol=1e-13)


def test_null_space_closed_form_to_1e12(small):
    """||W_perp|| = ||P_perp W0|| prod (1 - 2 eta_t lam): every scheme, decaying rates, 1e-12."""
    p, W0 = small
    E = 60
    runs = [
        L.Run(0, W0, 0.01, L.lr_schedule("inv_sqrt", 0.1, E), scheme=s, B=B, seed=3, drop_last=dl)
        for s, B, dl in SCHEMES
    ]
    tr = L.simulate([p], runs, E, progress=False)
    meas, theory = tr.null_norm(), tr.null_theory()
    assert theory[-1].max() < theory[0].max()  # it did decay
    assert np.abs(meas / theory - 1).max() < 1e-12
    # gamma is exactly prod over the run's own steps
    for i, r in enumerate(runs):
        S = L.steps_per_epoch(5, r.B, r.scheme, r.drop_last)
        assert tr.steps[-1, i] == E * S
        assert math.isclose(tr.gamma[-1, i], L.null_decay(np.repeat(r.lr, S), r.lam), rel_tol=1e-13)


def test_per_step_decay_is_identical_for_sgd_and_gd(small):
    p, W0 = small
    lr, lam = 0.05, 0.02
    runs = [
        L.Run(0, W0, lam, lr, scheme="gd"),
        L.Run(0, W0, lam, lr, scheme="reshuffle", B=1, seed=1),
    ]
    g = L.simulate([p], runs[:1], 25, keep_steps=True, progress=False)  # 25 GD steps
    s = L.simulate([p], runs[1:], 5, keep_steps=True, progress=False)  # 25 SGD steps
    ng = L.null_norm(g.step_W[:, 0], p.X)
    ns = L.null_norm(s.step_W[:, 0], p.X)
    np.testing.assert_allclose(ns / ng, 1.0, rtol=0, atol=1e-12)
    # ... but per epoch SGD (B = 1) takes N = 5 of them
    assert math.isclose(s.gamma[1, 0], (1 - 2 * lr * lam) ** 5, rel_tol=1e-14)
    assert math.isclose(g.gamma[1, 0], 1 - 2 * lr * lam, rel_tol=1e-14)


def test_batching_equals_one_at_a_time():
    """Runs batched with others (different N, B, schemes, seeds, rates) follow the same
    trajectory."""
    probs = [L.make_problem(7, N, 2, seed=10 + N) for N in (4, 6)]
    runs = []
    for k, (data, scheme, B) in enumerate(
        [
            (0, "gd", None),
            (0, "reshuffle", 1),
            (1, "cyclic", 4),
            (1, "replacement", 2),
            (1, "reshuffle", 5),
            (0, "cyclic", 3),
        ]
    ):
        runs.append(
            L.Run(
                data,
                L.random_init(2, 7, 0.2, seed=k),
                0.01 * (k + 1),
                0.03 + 0.01 * k,
                scheme=scheme,
                B=B,
                seed=100 + k,
            )
        )
    together = L.simulate(probs, runs, 30, progress=False)
    alone = L.run_one_by_one(probs, runs, 30)
    for i, tr in enumerate(alone):
        np.testing.assert_allclose(together.W[:, i], tr.W[:, 0], rtol=0, atol=1e-13)
        np.testing.assert_allclose(together.gamma[:, i], tr.gamma[:, 0], rtol=1e-15)
    # small memory blocks (many sub-blocks, steps cut inside epochs) change nothing either
    chopped = L.simulate(probs, runs, 30, progress=False, max_block=300)
    np.testing.assert_allclose(chopped.W, together.W, rtol=0, atol=1e-13)


def test_seeding():
    p = L.make_problem(6, 6, 1, seed=0)
    W0 = L.random_init(1, 6, 0.1, seed=0)
    a = L.simulate([p], [L.Run(0, W0, 0.01, 0.05, scheme="reshuffle", seed=5)], 20, progress=False)
    b = L.simulate([p], [L.Run(0, W0, 0.01, 0.05, scheme="reshuffle", seed=5)], 20, progress=False)
    c = L.simulate([p], [L.Run(0, W0, 0.01, 0.05, scheme="reshuffle", seed=6)], 20, progress=False)
    assert np.array_equal(a.W, b.W)
    assert not np.allclose(a.W[-1], c.W[-1], atol=1e-12)
    # the cyclic order ignores the seed; the same data seed gives the same problem
    d1 = L.simulate([p], [L.Run(0, W0, 0.01, 0.05, scheme="cyclic", seed=1)], 5, progress=False)
    d2 = L.simulate([p], [L.Run(0, W0, 0.01, 0.05, scheme="cyclic", seed=2)], 5, progress=False)
    assert np.array_equal(d1.W, d2.W)
    assert np.array_equal(L.make_problem(6, 6, 1, seed=0).X, p.X)
    # one permutation per epoch, each a permutation of 0..N-1
    orders = L._Schedule(L.Run(0, W0, 0.01, 0.05, scheme="reshuffle", seed=5), 6).epochs(0, 100)
    assert all(sorted(o.ravel().tolist()) == list(range(6)) for o in orders)
    assert len({tuple(o.ravel()) for o in orders}) > 50


def test_ridge_is_the_minimiser_and_gd_finds_it():
    p = L.make_problem(9, 6, 2, seed=3)
    lam = 0.05
    Wl = L.ridge(p.X, p.Y, lam)
    np.testing.assert_allclose(L.gradient(Wl, p.X, p.Y, lam), 0, atol=1e-12)
    _, perp = L.split(Wl, p.X)
    np.testing.assert_allclose(perp, 0, atol=1e-12)
    lr = 0.5 * L.gd_max_lr(p.X, lam)
    tr = L.simulate(
        [p],
        [L.Run(0, L.random_init(2, 9, 1.0, seed=0), lam, lr, scheme="gd")],
        4000,
        progress=False,
    )
    np.testing.assert_allclose(tr.W[-1, 0], Wl, atol=1e-8)
    assert tr.span_gap()[-1, 0] < 1e-8


def test_zero_init_stays_in_the_data_span():
    p = L.make_problem(9, 4, 3, seed=4)
    tr = L.simulate(
        [p],
        [L.Run(0, np.zeros((3, 9)), 0.01, 0.05, scheme="reshuffle", B=1, seed=0)],
        50,
        progress=False,
    )
    assert np.abs(tr.null_norm()).max() < 1e-14
    assert (tr.svals()[-1, 0] > 1e-8).sum() <= 4  # rank <= N


def test_steps_per_epoch_and_predicted_slope():
    assert L.steps_per_epoch(10, 1) == 10
    assert L.steps_per_epoch(10, 4) == 3
    assert L.steps_per_epoch(10, 4, drop_last=True) == 2
    assert L.steps_per_epoch(10, 10) == 1
    assert L.steps_per_epoch(10, None, "gd") == 1
    assert L.steps_per_epoch(10, 3, "replacement") == 4
    assert math.isclose(L.epoch_log_slope(0.1, 0.01, 6, 1), 6 * math.log(1 - 0.002))
    with pytest.raises(ValueError, match="reshuffle"):
        L.steps_per_epoch(10, 2, "shuffled")


def test_flow_time_ratio():
    assert L.flow_time_ratio(10, 1, 1) == 10
    # ~ 2 N / sqrt(E) for large E
    assert abs(L.flow_time_ratio(10, 1, 50_000) - 20 / math.sqrt(50_000)) < 0.01


def test_make_problem_options():
    p = L.make_problem(6, 8, 2, seed=0, support=[0, 1], whiten=True, zero_rows=[1])
    assert np.all(p.X[2:] == 0)
    np.testing.assert_allclose(p.X[:2] @ p.X[:2].T / 8, np.eye(2), atol=1e-12)
    assert np.all(p.Y[1] == 0)
    Q, Qp = L.span_bases(p.X)
    assert Q.shape == (6, 2) and Qp.shape == (6, 4)
    q = L.make_problem(10, 5, 1, seed=0, relevant=[0, 1], independent_rows=[0])
    assert np.all(q.teacher[:, 2:] == 0)
    with pytest.raises(ValueError, match="whiten"):
        L.make_problem(6, 1, 1, seed=0, support=[0, 1], whiten=True)


def test_gd_and_cyclic_stability_thresholds():
    p = L.make_problem(5, 4, 1, seed=2)
    lam = 0.01
    eta_gd = L.gd_max_lr(p.X, lam)
    factors = 1 - 2 * eta_gd * (L.data_moments(p.X) + lam)
    assert math.isclose(np.abs(factors).max(), 1.0, rel_tol=1e-12)
    eta = L.cyclic_sgd_max_lr(p.X, lam)
    rho = lambda e: np.abs(np.linalg.eigvals(L.epoch_map(p.X, lam, e))).max()
    assert rho(0.999 * eta) < 1 < rho(1.001 * eta)


def test_online_stationary_msd_matches_simulation():
    """The closed-form noise floor of online SGD, against a stream of fresh Gaussian samples."""
    d, n = 4, 40_000
    eta, lam = 0.04, 0.2
    probs = [L.make_problem(d, n, 1, seed=s) for s in range(4)]
    runs = [L.Run(i, np.zeros((1, d)), lam, eta, scheme="cyclic") for i in range(4)]
    refs = np.stack([p.teacher / (1 + lam) for p in probs])
    tr = L.simulate(
        probs, runs, 1, record=[0, 1], window=dict(from_step=2000, reference=refs), progress=False
    )
    theory = np.array([L.online_stationary_msd(eta, lam, d, (p.teacher**2).sum()) for p in probs])
    ratio = tr.window["msd_ref"].mean() / theory.mean()
    assert abs(ratio - 1) < 0.1, ratio
    assert (
        L.online_stationary_msd(eta, 0.0, d, 1.0) == 0.0
    )  # realisable targets, no decay: no noise


def test_limit_cycle_first_order():
    p = L.make_problem(7, 5, 2, seed=8)
    lam, eta = 0.05, 0.004
    tr = L.simulate(
        [p],
        [L.Run(0, np.zeros((2, 7)), lam, eta, scheme="cyclic")],
        3000,
        record=[0, 2999, 3000],
        window=dict(from_step=2990 * 5, reference=np.zeros((1, 2, 7))),
        progress=False,
    )
    assert (
        np.abs(tr.W[-1, 0] - tr.W[-2, 0]).max() < 1e-9
    )  # (nearly) a periodic orbit, epoch to epoch
    c = L.limit_cycle_rms_coef(p.X, p.Y, lam)
    assert abs(math.sqrt(tr.window["msd_mean"][0]) / (eta * c) - 1) < 0.02


def test_fit_log_slope_exact_on_exponentials():
    t = np.arange(50.0)
    s, a, r2 = L.fit_log_slope(t, 3 * np.exp(-0.02 * t))
    assert math.isclose(s, -0.02, rel_tol=1e-12) and math.isclose(a, math.log(3), rel_tol=1e-12)
    assert math.isclose(r2, 1.0, rel_tol=1e-12)


def test_errors_say_what_exists():
    p = L.make_problem(3, 2, 1, seed=0)
    with pytest.raises(ValueError, match="cyclic"):
        L.simulate([p], [L.Run(0, np.zeros((1, 3)), 0.1, 0.1, scheme="sorted")], 1, progress=False)
    with pytest.raises(ValueError, match="share"):
        L.simulate(
            [p, L.make_problem(4, 2, 1, seed=0)],
            [L.Run(0, np.zeros((1, 3)), 0.1, 0.1)],
            1,
            progress=False,
        )
    with pytest.raises(ValueError, match="inv_sqrt"):
        L.lr_schedule("cosine", 0.1, 3)


# ---- conventions, l0 search, other optimisers ------------------------------------------------
def test_torch_mse_settings_reproduce_the_book_step():
    """nn.MSELoss (mean over |b| m entries) + SGD(lr=m eta, weight_decay=2 lam / m) == (ch2.1)."""
    torch = pytest.importorskip("torch")
    p = L.make_problem(7, 4, 3, seed=3)
    W0 = L.random_init(3, 7, 0.2, seed=4)
    eta, lam = 0.04, 0.03
    run = L.Run(0, W0, lam, eta, scheme="cyclic", B=2)
    ref = L.simulate([p], [run], 5, keep_steps=True, progress=False).step_W[:, 0]
    lr_t, wd_t = L.torch_mse_settings(eta, lam, 3)
    W = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = torch.optim.SGD([W], lr=lr_t, weight_decay=wd_t)
    X, Y = torch.tensor(p.X), torch.tensor(p.Y)
    got = []
    for _ in range(5):
        for s in (0, 2):
            opt.zero_grad()
            torch.nn.MSELoss()(W @ X[:, s : s + 2], Y[:, s : s + 2]).backward()
            opt.step()
            got.append(W.detach().numpy().copy())
    np.testing.assert_allclose(np.stack(got), ref, rtol=0, atol=1e-13)
    with pytest.raises(ValueError):
        L.torch_mse_settings(0.1, 0.01, 0)


def test_best_subset_finds_a_sparse_support_with_n_below_d():
    """l0 search recovers a 2-sparse teacher's support from N = 5 < d = 10 dense samples."""
    for seed in range(3):
        p = L.make_problem(10, 5, 2, seed=seed, relevant=[3, 7])
        S, res = L.best_subset(p.X, p.Y, 2)
        assert S == (3, 7) and res < 1e-10
    with pytest.raises(ValueError):
        L.best_subset(p.X, p.Y, 0)


def test_optimizer_run_sgd_equals_plain_sgd(small):
    p, W0 = small
    Ws = L.optimizer_run(p, W0, 0.02, 0.05, "sgd", 3, B=2)
    batches = [[0, 1], [2, 3], [4]] * 3
    ref = L.direct_sgd(p, W0, 0.02, [0.05] * 9, batches)
    np.testing.assert_allclose(Ws, np.stack(ref), rtol=0, atol=1e-13)
    with pytest.raises(ValueError):
        L.optimizer_run(p, W0, 0.02, 0.05, "lbfgs", 1)


@pytest.mark.parametrize("B", [1, None])
def test_momentum_null_space_follows_the_data_free_recursion(B):
    p = L.rotate_problem(L.make_problem(10, 5, 2, seed=200, support=[0, 1]), seed=1)
    W0 = L.random_init(2, 10, 0.1, seed=3)
    Ws = L.optimizer_run(p, W0, 0.01, 0.05, "momentum", 40, B=B, beta=0.9)
    n = L.null_norm(Ws, p.X)
    f = L.momentum_null_factor(0.05, 0.01, 0.9, len(n) - 1)
    assert np.abs(n / (n[0] * f) - 1).max() < 1e-10
    assert f[-1] < (1 - 2 * 0.05 * 0.01) ** (len(n) - 1)  # faster than plain SGD per step


def test_adamw_keeps_the_mechanism_only_for_coordinate_aligned_null_spaces():
    p = L.make_problem(10, 5, 2, seed=200, support=[0, 1], relevant=[0, 1])
    W0 = L.random_init(2, 10, 0.1, seed=3)
    lr, lam, T = 0.01, 0.01, 100
    for prob, exact in ((p, True), (L.rotate_problem(p, seed=1), False)):
        n = L.null_norm(L.optimizer_run(prob, W0, lam, lr, "adamw", T // 5), prob.X)
        dev = np.abs(n / (n[0] * (1 - 2 * lr * lam) ** np.arange(len(n))) - 1).max()
        assert (dev < 1e-12) if exact else (dev > 1e-2)


def test_rotate_problem_rotates_sgd_trajectories(small):
    p, W0 = small
    pr = L.rotate_problem(p, seed=5)
    Q = pr.X @ np.linalg.pinv(p.X)  # recovers the rotation on span(X)
    a = L.optimizer_run(p, W0 @ np.eye(8), 0.02, 0.05, "sgd", 4)
    Qfull, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((8, 8)))
    b = L.optimizer_run(pr, W0 @ Qfull.T, 0.02, 0.05, "sgd", 4)
    np.testing.assert_allclose(b, a @ Qfull.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(Q @ p.X, pr.X, atol=1e-12)


def test_online_msd_equals_the_simulator_window():
    """E3's fast one-pass routine gives simulate's windowed MSD (same steps, same reference)."""
    probs = [L.make_problem(4, 300, 2, seed=s, noise=0.1 * s) for s in range(2)]
    runs = [
        L.Run(k, np.zeros((2, 4)), lam, eta, scheme="cyclic", B=1)
        for k in range(2)
        for eta in (0.01, 0.05)
        for lam in (0.0, 0.1)
    ]
    ref = np.stack([probs[r.data].teacher / (1 + r.lam) for r in runs])
    sim = L.simulate(
        probs, runs, 1, record=[0, 1], progress=False, window=dict(from_step=60, reference=ref)
    ).window["msd_ref"]
    fast = L.online_msd(probs, runs, from_step=60, reference=ref)
    assert np.allclose(fast, sim, rtol=1e-10, atol=1e-30)
    with pytest.raises(ValueError, match="cyclic"):
        L.online_msd(
            probs,
            [L.Run(0, np.zeros((2, 4)), 0.1, 0.01, scheme="gd")],
            from_step=0,
            reference=ref[:1],
        )


def test_simulate_refuses_divergent_rates():
    """Issue 21: a rate that can only diverge raises a clear ValueError instead of returning
    inf/1e228 MSEs; stable rates (and SGD above its own limit under a decaying schedule) run."""
    p = L.make_problem(6, 4, 2, seed=0)
    W0 = L.random_init(2, 6, 0.1, seed=1)
    with pytest.raises(ValueError, match="1 - 2 eta lam"):
        L.simulate([p], [L.Run(0, W0, 100.0, 1.0, scheme="cyclic")], 2, progress=False)
    lim = L.gd_max_lr(p.X, 0.01)
    with pytest.raises(ValueError, match="stability limit"):
        L.simulate([p], [L.Run(0, W0, 0.01, 1.01 * lim, scheme="gd")], 2,
                        progress=False)
    tr = L.simulate([p], [L.Run(0, W0, 0.01, 0.9 * lim, scheme="gd"),
                               L.Run(0, W0, 0.01, 5 * lim, scheme="cyclic")], 2,
                         progress=False)
    assert np.isfinite(tr.W).all()


def test_span_smax_is_the_data_span_part():
    """span_smax measures sigma_max(W Q): blind to the null-space part of W."""
    from sgdrank import linear_study

    p = L.make_problem(6, 3, 2, seed=2)
    Q, Qp = L.span_bases(p.X)
    W0 = L.random_init(2, 6, 0.5, seed=3)
    tr = L.simulate([p], [L.Run(0, W0, 0.01, 0.05, scheme="gd")], 3,
                         record=[0, 3], progress=False)
    s = linear_study.span_smax(tr, 0)
    assert np.allclose(s, np.linalg.norm(tr.W[:, 0] @ Q, ord=2, axis=(1, 2)))
    bumped = tr.W[:, 0] + 10 * (tr.W[:, 0] @ Qp) @ Qp.T  # more null space, same data span
    assert np.allclose(np.linalg.norm(bumped @ Q, ord=2, axis=(1, 2)), s)
    assert not np.allclose(np.linalg.norm(bumped, ord=2, axis=(1, 2)), s)  # control
