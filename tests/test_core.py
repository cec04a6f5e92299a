"""Profiles, conventions, models and metrics: the foundation every chapter stands on."""
import math
import os

import pytest
import torch

from sgdrank import conventions, metrics, models, profiles, runtime

TABLE = {p: {"epochs": i + 1, "width": 10 * (i + 1)} for i, p in enumerate(profiles.PROFILES)}


@pytest.fixture(autouse=True)
def _no_dry_run(monkeypatch):
    monkeypatch.delenv("SGDRANK_DRYRUN", raising=False)


def test_profile_resolution(monkeypatch):
    monkeypatch.delenv("SGDRANK_PROFILE", raising=False)
    assert profiles.resolve() == "book"
    monkeypatch.setenv("SGDRANK_PROFILE", "smoke")
    assert profiles.resolve() == "smoke"
    assert profiles.resolve("paper") == "paper"  # explicit parameter wins over the environment
    s = profiles.select(TABLE)
    assert (s.profile, s.epochs, s["width"]) == ("smoke", 1, 10)
    assert "profile <b>smoke</b>" in s._repr_html_() and "epochs" in repr(s)


def test_profile_errors(monkeypatch):
    monkeypatch.setenv("SGDRANK_PROFILE", "fast")
    with pytest.raises(ValueError, match="unknown profile 'fast'.*smoke, book, gpu, paper"):
        profiles.resolve()
    with pytest.raises(ValueError, match="differ"):
        profiles.select({**TABLE, "paper": {"epochs": 3}}, "book")
    with pytest.raises(ValueError, match="lacks"):
        profiles.select({"book": {}}, "book")
    with pytest.raises(AttributeError, match="no setting 'lr'"):
        profiles.select(TABLE, "book").lr
    with pytest.raises(ValueError, match="unknown entries.*'fast'"):
        profiles.select({**TABLE, "fast": {}}, "book")


def test_a_profile_may_name_another():
    table = {**TABLE, "gpu": "paper"}
    s = profiles.select(table, "gpu")
    assert dict(s) == TABLE["paper"] and s.profile == "gpu" and s.same_as == "paper"
    assert "gpu (= paper)" in repr(s) and "gpu (= paper)" in s._repr_html_()
    assert profiles.select(table, "paper").same_as is None
    with pytest.raises(ValueError, match="names 'fast', which is not a profile"):
        profiles.select({**TABLE, "gpu": "fast"}, "book")
    with pytest.raises(ValueError, match="names 'gpu', which is not a profile"):
        profiles.select({**TABLE, "gpu": "paper", "book": "gpu"}, "book")  # no chains


def test_dry_run_overrides_paper_only(monkeypatch):
    table = {**TABLE, "dry": {"epochs": 1}}
    # without SGDRANK_DRYRUN the "dry" entry changes nothing, in any profile
    for name in profiles.PROFILES:
        s = profiles.select(table, name)
        assert dict(s) == TABLE[name] and not s.dry and s.dry_overrides is None
        assert "dry" not in repr(s) and "dry" not in s._repr_html_()
    monkeypatch.setenv("SGDRANK_DRYRUN", "0")
    assert profiles.select(table, "paper").epochs == TABLE["paper"]["epochs"]
    monkeypatch.setenv("SGDRANK_DRYRUN", "1")
    s = profiles.select(table, "paper")
    assert s.profile == "paper" and s.dry and s.dry_overrides == ("epochs",)
    assert s.epochs == 1 and s.width == TABLE["paper"]["width"]  # only the override changes
    assert list(s) == list(TABLE["paper"])  # same keys, same order
    assert repr(s).startswith("profile: paper (dry run)") and "overrides: epochs" in repr(s)
    html = s._repr_html_()
    assert "paper (dry run)" in html and "overridden: epochs" in html
    assert TABLE["paper"]["epochs"] == 4  # the table itself is not modified
    g = profiles.select(table, "gpu")  # the gpu profile is shortened alike
    assert g.dry and g.epochs == 1 and g.width == TABLE["gpu"]["width"]
    full = profiles.select(table, "paper", dry=False)  # the real run's settings, for its cost
    assert not full.dry and dict(full) == TABLE["paper"]


def test_dry_run_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"overrides \['depth'\] name no setting"):
        profiles.select({**TABLE, "dry": {"depth": 2}}, "book")  # checked in every profile
    with pytest.raises(ValueError, match="dict of overrides"):
        profiles.select({**TABLE, "dry": [("epochs", 1)]}, "paper")
    monkeypatch.setenv("SGDRANK_DRYRUN", "1")
    for name in ("smoke", "book"):
        with pytest.raises(ValueError, match="dry run of the gpu or paper profile.*PROFILE=paper"):
            profiles.select({**TABLE, "dry": {"epochs": 1}}, name)
    with pytest.raises(ValueError, match="no 'dry' entry"):
        profiles.select(TABLE, "paper")
    monkeypatch.setenv("SGDRANK_DRYRUN", "yes")
    with pytest.raises(ValueError, match="SGDRANK_DRYRUN='yes'"):
        profiles.select({**TABLE, "dry": {}}, "paper")
    assert profiles.dry_run({"SGDRANK_DRYRUN": "1"}) and not profiles.dry_run({})


def test_weight_decay_convention_matches_torch():
    lam, lr = 5e-4, 0.1
    assert conventions.torch_weight_decay(lam) == 2 * lam
    assert conventions.paper_lambda(conventions.torch_weight_decay(lam)) == lam
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    w0 = w.detach().clone()
    opt = torch.optim.SGD([w], lr=lr, weight_decay=conventions.torch_weight_decay(lam))
    w.grad = torch.zeros_like(w)  # no data gradient: only the decay acts
    opt.step()
    assert torch.allclose(w.detach(), conventions.decay_factor(lr, lam) * w0, rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        conventions.torch_weight_decay(-1.0)


@pytest.mark.parametrize("spec,n_layers", [("MLP-3-16", 3), ("MLP-BN-10-100", 10),
                                          ("RES-BN-2-8", 5), ("RES-2-8", 5), ("CONV-2-4", 2)])
def test_build_model_shapes_and_rank_layers(spec, n_layers):
    m = models.build_model(spec, 784, 10, seed=0)
    assert m(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    mats = metrics.rank_matrices(m)
    assert len(mats) == n_layers
    assert all(w.ndim == 2 for w in mats.values())
    # the classifier is excluded from rank tracking but included in the trainable matrices
    assert len(metrics.trainable_matrices(m)) == n_layers + 1


def test_build_model_is_seeded_and_rejects_unknown():
    a = models.build_model("MLP-2-8", 6, 2, seed=3)
    b = models.build_model("MLP-2-8", 6, 2, seed=3)
    c = models.build_model("MLP-2-8", 6, 2, seed=4)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)
    with pytest.raises(ValueError, match="unknown model 'VGG-11'.*MLP-BN-L-H.*RESNET18"):
        models.build_model("VGG-11", 784, 10)
    assert type(models.build_model("resnet-18", (3, 32, 32), 10, seed=0)).__name__ == "ResNet18"
    with pytest.raises(ValueError, match="activation"):
        models.MLP(4, 2, 1, 3, activation="swish")


def test_bias_flag():
    m = models.build_model("MLP-BN-2-8", 6, 2, bias=False)
    assert all(l.bias is None for l in m.layers) and m.head.bias is None


def test_batchnorm_matches_torch_and_detaches_variance():
    torch.manual_seed(0)
    z = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    ours = models.BatchNorm(5).double()
    ref = torch.nn.BatchNorm1d(5).double()
    assert torch.allclose(ours(z), ref(z), atol=1e-12)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-12)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-12)
    ours.eval()
    ref.eval()
    assert torch.allclose(ours(z), ref(z), atol=1e-12)
    # detached variance: the gradient equals the full-BN gradient with 1/std held constant
    det = models.BatchNorm(5, detach_var=True).double()
    c = torch.randn(16, 5, dtype=torch.float64)
    (g_det,) = torch.autograd.grad((det(z) * c).sum(), z)
    inv_std = (z.var(0, unbiased=False) + det.eps).rsqrt().detach()
    (g_manual,) = torch.autograd.grad((((z - z.mean(0)) * inv_std) * c).sum(), z)
    assert torch.allclose(g_det, g_manual, atol=1e-12)
    ours.train()
    (g_full,) = torch.autograd.grad((ours(z) * c).sum(), z)
    assert not torch.allclose(g_det, g_full, atol=1e-6)


def test_conv_output_size_and_patches():
    assert models.conv_output_hw((7, 7), 3, 2, 1) == (4, 4)
    net = models.ConvNet((3, 5, 5), 2, [(12, 3, 2, 0), (12, 2, 1, 0)])
    assert net.patches() == [4, 1]
    with pytest.raises(ValueError, match="shrinks"):
        models.ConvNet((1, 3, 3), 2, [(4, 5, 1, 0)])


def test_threshold_and_stable_rank():
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    s_true = torch.tensor([3.0, 2.0, 1.0, 1e-4, 0.0], dtype=torch.float64)
    w = u[:, :5] @ torch.diag(s_true) @ v.T
    s = metrics.singular_values(w)
    assert torch.allclose(s, s_true, atol=1e-12)
    fro = math.sqrt(9 + 4 + 1 + 1e-8)
    assert int(metrics.threshold_rank(s, atol=1e-3)) == 3          # 1e-4 / fro < 1e-3
    assert int(metrics.threshold_rank(s, atol=1e-5)) == 4          # 1e-4 / fro > 1e-5
    assert int(metrics.threshold_rank(s, atol=None, rtol=0.4)) == 2  # s_i > 1.2
    assert float(metrics.stable_rank(s)) == pytest.approx((9 + 4 + 1 + 1e-8) / 9)
    assert fro == pytest.approx(float(torch.linalg.vector_norm(s)))
    assert int(metrics.threshold_rank(torch.zeros(3))) == 0
    assert float(metrics.stable_rank(torch.zeros(3))) == 0.0
    with pytest.raises(ValueError, match="exactly one"):
        metrics.threshold_rank(s, atol=1e-3, rtol=1e-3)


def test_batch_singular_values_wide_and_tall_agree_with_the_truth():
    g = torch.Generator().manual_seed(0)
    s_true = torch.logspace(0, -10, 20, dtype=torch.float64)        # spread over 10 decades
    u, _ = torch.linalg.qr(torch.randn(3, 20, 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 90, 20, generator=g, dtype=torch.float64))
    wide = u @ torch.diag(s_true) @ v.mT                             # (3, 20, 90)
    for w in (wide, wide.mT):                                        # the wide path transposes
        s = metrics.batch_singular_values(w)
        assert s.shape == (3, 20)
        assert torch.allclose(s, s_true.expand(3, 20), rtol=1e-9, atol=1e-15)
    assert torch.equal(metrics.singular_values(wide[0]), metrics.batch_singular_values(wide[:1])[0])


def test_singular_values_of_conv_filters_use_cout_by_cin_k_k():
    conv = torch.nn.Conv2d(3, 8, 5)
    s = metrics.singular_values(conv.weight)
    assert s.shape == (8,)
    assert torch.allclose(s, torch.linalg.svdvals(conv.weight.detach().reshape(8, 75).double()))


def test_convergence_distance_uses_clones():
    m = models.build_model("MLP-2-4", 3, 2, seed=0)
    before = metrics.snapshot(m)
    with torch.no_grad():
        m.head.weight.add_(1.0)  # 2 x 4 matrix of ones added to the classifier only
    after = metrics.snapshot(m)
    d = metrics.convergence_distance(before, after)
    assert d == pytest.approx(math.sqrt(8) / 3)  # ||ones(2,4)||_F averaged over 3 matrices
    assert metrics.convergence_distance(after, after) == 0.0
    with pytest.raises(ValueError):
        metrics.convergence_distance(before, {})


def test_layer_table_and_average_rank():
    m = models.build_model("MLP-3-8", 20, 2, seed=0)
    rows = metrics.layer_table(m)
    assert [r["layer"] for r in rows] == ["W1", "W2", "W3"]
    assert metrics.average_rank(m) == pytest.approx(sum(r["rank"] for r in rows) / 3)
    assert all(1 <= r["stable_rank"] <= r["rank"] for r in rows)


def test_seeding_and_device(monkeypatch):
    runtime.seed_everything(7)
    a = torch.randn(3)
    runtime.seed_everything(7)
    assert torch.equal(a, torch.randn(3))
    assert runtime.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            runtime.pick_device("cuda")
    monkeypatch.setenv("SGDRANK_OFFLINE", "1")
    assert runtime.offline()


def test_profile_device_is_explicit(monkeypatch):
    monkeypatch.delenv("SGDRANK_DEVICE", raising=False)
    assert runtime.profile_device("book").type == "cpu"
    assert runtime.profile_device("smoke").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'gpu' profile trains on a CUDA GPU.*T4 GPU"):
            runtime.profile_device("gpu")
    assert runtime.profile_device("paper", {"SGDRANK_DEVICE": "cpu"}).type == "cpu"
    monkeypatch.setenv("SGDRANK_DEVICE", "cpu")
    assert runtime.use_profile_device("gpu").type == "cpu"


def test_results_go_to_drive_on_colab_only(monkeypatch, tmp_path):
    monkeypatch.delenv("SGDRANK_RESULTS", raising=False)
    mounted = []
    monkeypatch.setattr(runtime, "on_colab", lambda: False)
    assert runtime.keep_results_on_drive("gpu", mounted.append) is None and not mounted
    monkeypatch.setattr(runtime, "on_colab", lambda: True)
    assert runtime.keep_results_on_drive("book", mounted.append) is None and not mounted
    monkeypatch.setattr(runtime, "DRIVE_RESULTS", str(tmp_path / "drive"))
    assert runtime.keep_results_on_drive("gpu", mounted.append) == tmp_path / "drive"
    assert mounted == ["/content/drive"] and (tmp_path / "drive").is_dir()
    assert os.environ["SGDRANK_RESULTS"] == str(tmp_path / "drive")
    assert runtime.keep_results_on_drive("paper", mounted.append) is None  # already set
