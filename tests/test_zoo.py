"""The zoo (GSGP sec. 4.1 architectures): shapes, sizes, rank-tracked layers, seeding, and
Chapter 1's per-sample gradient rank bound on a real ResNet-18 and ViT."""
import pytest
import torch
import torch.nn as nn

from sgdrank import gradients as G
from sgdrank import metrics, zoo


def _param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _images(b: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64).to(dtype)


@pytest.fixture(scope="module")
def built():
    return {name: zoo.build(name, seed=0) for name in zoo.ZOO}


@pytest.mark.parametrize("name", zoo.ZOO)
def test_forward_shape(built, name):
    m = built[name]
    x = _images(2, dtype=next(m.parameters()).dtype)
    m.train()
    assert m(x).shape == (2, 10)
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (2, 10)
    m.train()


def test_parameter_counts(built):
    # VGG-16 convs + BN + one Linear(512, 10): the authors' model; CIFAR ResNet-18
    # (kuangliu/authors)
    assert _param_count(built["VGG16-BN"]) == 14_728_266
    assert _param_count(built["RESNET18"]) == 11_173_962
    d, mlp, t = 256, 512, 65
    block = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d
    vit = (48 * d + d) + d + t * d + 6 * block + 2 * d + (d * 10 + 10)
    assert _param_count(built["VIT"]) == vit == 3_195_146
    assert 14.6e6 < _param_count(built["VGG16-BN"]) < 14.8e6
    assert 11.1e6 < _param_count(built["RESNET18"]) < 11.3e6


@pytest.mark.parametrize("name, count, kinds", [
    ("VGG16-BN", 13, {nn.Conv2d}),
    ("RESNET18", 20, {nn.Conv2d}),
    ("VIT", 37, {nn.Conv2d, nn.Linear}),
])
def test_rank_layers(built, name, count, kinds):
    m = built[name]
    layers = m.rank_layers()
    assert len(layers) == count
    assert {type(mod) for _, mod in layers} == kinds
    # names are module paths, unique, and the classifier is excluded
    paths = dict(m.named_modules())
    assert all(paths[n] is mod for n, mod in layers)
    assert len({n for n, _ in layers}) == count
    assert all(mod is not m.head for _, mod in layers)
    assert isinstance(m.head, nn.Linear) and m.head.out_features == 10
    # every Conv2d / Linear of the model is either rank-tracked or the classifier
    everything = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert len(everything) == count + 1
    assert list(metrics.rank_matrices(m)) == [n for n, _ in layers]


def test_rank_layer_names_and_matrix_shapes(built):
    vgg = dict(metrics.rank_matrices(built["VGG16-BN"]))
    assert list(vgg)[:3] == ["stage1.conv1", "stage1.conv2", "stage2.conv1"]
    assert vgg["stage1.conv1"].shape == (64, 27) and vgg["stage5.conv3"].shape == (512, 4608)

    res = built["RESNET18"]
    names = [n for n, _ in res.rank_layers()]
    assert names[:3] == ["stem", "stage1.block1.conv1", "stage1.block1.conv2"]
    shortcuts = [f"stage{s}.block1.shortcut" for s in (2, 3, 4)]
    assert [n for n in names if n.endswith("shortcut")] == shortcuts
    assert names.index("stage2.block1.shortcut") == names.index("stage2.block1.conv2") + 1
    assert len(res.rank_layers(shortcuts=False)) == 17  # the authors' set
    mats = metrics.rank_matrices(res)
    assert mats["stage4.block1.shortcut"].shape == (512, 256)
    assert mats["stage3.block2.conv1"].shape == (256, 2304)

    vit = built["VIT"]
    names = [n for n, _ in vit.rank_layers()]
    assert names[:7] == ["patch_embed", "block1.attn.q", "block1.attn.k", "block1.attn.v",
                         "block1.attn.out", "block1.mlp.fc1", "block1.mlp.fc2"]
    assert metrics.rank_matrices(vit)["patch_embed"].shape == (256, 48)
    assert vit.tokens == 65


def test_vit_options():
    m = zoo.build("vit", embed_dim=64, mlp_dim=128, depth=2, seed=0)
    assert len(m.rank_layers()) == 1 + 2 * 6
    assert m(_images(1, dtype=next(m.parameters()).dtype)).shape == (1, 10)
    with pytest.raises(ValueError, match="divisible"):
        zoo.build("VIT", embed_dim=60)


def test_seeded_and_global_rng_untouched():
    before = torch.random.get_rng_state()
    a = zoo.build("ResNet-18", seed=3).state_dict()
    b = zoo.build("resnet18", seed=3).state_dict()
    c = zoo.build("RESNET18", seed=4).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem.weight"], c["stem.weight"])
    v1, v2 = zoo.build("VIT", seed=1).state_dict(), zoo.build("vit", seed=1).state_dict()
    assert all(torch.equal(v1[k], v2[k]) for k in v1)
    g1, g2 = zoo.build("vgg16_bn", seed=2), zoo.build("VGG16-BN", seed=2)
    assert torch.equal(g1.stage5.conv3.weight, g2.stage5.conv3.weight)


def test_unknown_names():
    with pytest.raises(ValueError, match="VGG16-BN, RESNET18, VIT"):
        zoo.build("RESNET50")
    with pytest.raises(ValueError, match="too small"):
        zoo.build("VGG16-BN", in_shape=(1, 16, 16))  # the fifth pool would see 1x1
    with pytest.raises(ValueError, match="channels, height, width"):
        zoo.build("RESNET18", in_shape=784)
    assert zoo.ZOO == ("VGG16-BN", "RESNET18", "VIT")


def test_resnet18_per_sample_gradient_rank_is_at_most_output_positions():
    """Chapter 1 on a real ResNet-18 (eval mode: BN is affine, samples are not coupled): the
    per-sample gradient w.r.t. a conv filter matrix has rank <= N = output positions. Stage 4
    runs at 4x4, so N = 16 for its 3x3 convs (512 x 2304 / 512 x 4608) and 1x1 shortcut
    (512 x 256), far below the matrix sizes; the bound is attained."""
    m = zoo.build("RESNET18", seed=0).double().eval()
    x = _images(1, torch.float64, seed=1)
    app = G.applications(m, x)
    bounds = G.rank_bounds(m, x)
    (grads,) = G.per_sample_gradients(m, x)
    stage4 = [n for n, _ in m.rank_layers() if n.startswith("stage4")]
    assert len(stage4) == 5
    for n in stage4:
        assert app[n] == 16 and bounds[n] == 16
        assert G.numerical_rank(grads[n]) == 16
    for n in ("stage3.block1.conv2", "stage3.block1.shortcut"):  # 8x8 -> N = 64 < 256
        assert app[n] == 64 and G.numerical_rank(grads[n]) <= 64
    assert app["stem"] == 1024 and app["head"] == 1
    assert G.numerical_rank(grads["head"]) == 1


def test_vit_per_sample_gradient_rank_is_at_most_tokens():
    """Each of Q, K, V, out, fc1, fc2 multiplies T = 65 tokens per sample: rank <= 65, attained
    by Q in the first block. Sharper, exact: key gradients sum to zero over tokens (softmax
    shift invariance) so W_k has rank <= 64; in the last block only the class token is read,
    so Q's gradient is rank one there."""
    m = zoo.build("VIT", seed=0).double().eval()
    x = _images(2, torch.float64, seed=2)
    app = G.applications(m, x)
    grads = G.per_sample_gradients(m, x)
    assert app["patch_embed"] == 64
    assert all(app[f"block{i}.attn.{p}"] == 65 for i in (1, 6) for p in ("q", "k", "v", "out"))
    for g in grads:
        assert G.numerical_rank(g["block1.attn.q"]) == 65
        assert G.numerical_rank(g["block1.attn.k"]) <= 64
        assert G.numerical_rank(g["block1.mlp.fc1"]) <= 65
        assert G.numerical_rank(g["block6.attn.q"]) == 1
        assert G.numerical_rank(g["block6.attn.k"]) <= 8
        assert G.numerical_rank(g["patch_embed"]) <= 48


# --------------------------------------------------------------- reduced models (Chapter 6)

SPECS = ["VGG16-BN:width=8", "RESNET18:width=8", "VIT:dim=32,depth=2,heads=4,mlp=64,patch=7"]


def test_parse_spec():
    assert zoo.parse_spec("VGG16-BN") == ("VGG16-BN", {})
    assert zoo.parse_spec("vgg16_bn:WIDTH=8") == ("VGG16-BN", {"width": 8})
    assert zoo.parse_spec("ResNet-18: width = 4") == ("RESNET18", {"width": 4})
    assert zoo.parse_spec("VIT:DIM=32,DEPTH=2,HEADS=4,MLP=64,PATCH=7,DROPOUT=0") == (
        "VIT", {"embed_dim": 32, "depth": 2, "heads": 4, "mlp_dim": 64, "patch": 7, "dropout": 0.0})
    assert zoo.is_zoo("VIT:dim=32") and zoo.is_zoo("resnet18") and not zoo.is_zoo("MLP-BN-3-32")
    assert not zoo.is_zoo(None) and not zoo.is_zoo("RESNET50:width=8")


@pytest.mark.parametrize("spec, match", [
    ("VGG16-BN:depth=3", r"valid options: width=<int>"),
    ("VIT:width=8", r"valid options: dim=<int>, depth=<int>, heads=<int>, mlp=<int>, patch=<int>"),
    ("RESNET18:width", r"unknown option 'width'"),
    ("RESNET18:width=eight", r"not a int"),
    ("RESNET18:width=4,width=8", r"given twice"),
    ("RESNET18:width=0", r"width must be >= 1"),
    ("RESNET50:width=8", r"VGG16-BN, RESNET18, VIT"),
])
def test_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        zoo.build(spec, (1, 28, 28))


def test_spec_and_keyword_conflict():
    with pytest.raises(ValueError, match="both in the spec"):
        zoo.build("VIT:dim=32", embed_dim=64)


def test_reduced_widths():
    vgg = zoo.build("VGG16-BN:width=8", (1, 28, 28), seed=0)
    assert [m.weight.shape[0] for _, m in vgg.rank_layers()] == [8, 8, 16, 16, 32, 32, 32,
                                                                 64, 64, 64, 64, 64, 64]
    assert vgg.head.in_features == 64
    res = zoo.build("RESNET18:width=8", (1, 28, 28), seed=0)
    assert res.stem.weight.shape[0] == 8 and res.head.in_features == 64
    assert [getattr(res, f"stage{s}").block1.conv1.weight.shape[0] for s in (1, 2, 3, 4)] == [
        8, 16, 32, 64]
    vit = zoo.build("VIT:dim=32,depth=2,heads=4,mlp=64,patch=7", (1, 28, 28), seed=0)
    assert vit.tokens == 17 and vit.depth == 2 and vit.block1.attn.heads == 4
    assert metrics.rank_matrices(vit)["patch_embed"].shape == (32, 49)
    assert metrics.rank_matrices(vit)["block2.mlp.fc1"].shape == (64, 32)
    # the spec string and the keyword arguments build the same seeded model
    a = zoo.build("RESNET18:width=8", (1, 28, 28), seed=5).state_dict()
    b = zoo.build("resnet18", (1, 28, 28), seed=5, width=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec", SPECS)
def test_forward_28x28_and_rank_layer_names(spec):
    m = zoo.build(spec, (1, 28, 28), seed=0)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert m(x).shape == (3, 10)
    assert m(x.flatten(1)).shape == (3, 10)  # the sweep passes flattened images
    full = zoo.build(spec.split(":")[0], (1, 28, 28), seed=0)
    assert [n for n, _ in m.rank_layers()][:1] == [n for n, _ in full.rank_layers()][:1]
    if not spec.startswith("VIT"):  # same layers as the full model, only narrower
        assert [n for n, _ in m.rank_layers()] == [n for n, _ in full.rank_layers()]
    paths = dict(m.named_modules())
    assert all(paths[n] is mod for n, mod in m.rank_layers())


def test_vgg_ceil_pools_are_bit_identical_on_32x32(built):
    """ceil_mode=True changes nothing on even sizes: the paper's model on CIFAR-sized inputs is
    the one it was before the pools went to ceil mode."""
    m = built["VGG16-BN"].eval()
    x = _images(2)
    with torch.no_grad():
        y_ceil = m(x)
        pools = [mod for mod in m.modules() if isinstance(mod, nn.MaxPool2d)]
        assert len(pools) == 5 and all(p.ceil_mode for p in pools)
        for p in pools:
            p.ceil_mode = False
        try:
            y_floor = m(x)
        finally:
            for p in pools:
                p.ceil_mode = True
    m.train()
    assert torch.equal(y_ceil, y_floor)


def test_patches_per_layer_on_28x28():
    """Chapter 1's count N (patches per conv, tokens per ViT matrix) on Fashion-MNIST shapes."""
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    vgg = zoo.build("VGG16-BN:width=8", (1, 28, 28), seed=0).eval()
    app = G.applications(vgg, x)
    assert [app[f"stage{s}.conv1"] for s in range(1, 6)] == [784, 196, 49, 16, 4]
    res = zoo.build("RESNET18:width=8", (1, 28, 28), seed=0).eval()
    app = G.applications(res, x)
    assert app["stem"] == 784 and app["stage2.block1.shortcut"] == 196
    assert app["stage3.block2.conv2"] == 49 and app["stage4.block1.conv1"] == 16
    vit = zoo.build("VIT:dim=32,depth=2,heads=4,mlp=64,patch=7", (1, 28, 28), seed=0).eval()
    app = G.applications(vit, x)
    assert app["patch_embed"] == 16 and app["block2.mlp.fc2"] == 17


def test_build_model_and_sweep_accept_options():
    from sgdrank import batched, models, sweep

    cfg = sweep.Config(model="vgg16-bn:width=4")
    assert cfg.model == "VGG16-BN:WIDTH=4"
    m = models.build_model(cfg.model, (1, 28, 28), 10, seed=0)
    assert m.stage1.conv1.weight.shape[0] == 4
    assert batched.Arch(cfg.model, (1, 28, 28), 10).parse()[0] == "ZOO"
    with pytest.raises(ValueError, match="valid options"):
        sweep.Config(model="VGG16-BN:widht=4")
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("VGG19", (1, 28, 28), 10)
