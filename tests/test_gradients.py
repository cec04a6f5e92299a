"""Chapter 1's claims as unit tests: exact gradient ranks against their bounds."""
import pytest
import torch

from sgdrank import gradients as G
from sgdrank import models



@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Exact ranks need float64; restore the default so other test modules keep float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


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


def test_random_architectures_never_violate_the_bound():
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        desc, m, draw = G.random_architecture(gen)
        for row in G.check_ranks(m, draw, batch=4, trials=2):
            assert row["rank (1 sample)"] <= row["bound (1 sample)"], (desc, row)
            assert row["rank (B=4)"] <= row["bound (B=4)"], (desc, row)
            assert row["bound (1 sample)"] <= row["bound (B=4)"], (desc, row)


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
