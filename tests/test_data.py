"""Tests of sgdrank.data: real Fashion-MNIST from Debian's package, and the online loaders on
small files written here in the real on-disk formats (nothing is downloaded: SGDRANK_OFFLINE=1)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import realformat  # tools/ (conftest puts it on sys.path)
from sgdrank import data

HAS_DEBIAN_FASHION = all(
    (data.DEBIAN_FASHION_MNIST / f"{f}.gz").is_file() for f in data.IDX_FILES
)
needs_fashion = pytest.mark.skipif(
    not HAS_DEBIAN_FASHION, reason="needs Debian's dataset-fashion-mnist (apt-get install it)"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("SGDRANK_OFFLINE", "1")
    monkeypatch.delenv("SGDRANK_FASHION_MNIST_SRC", raising=False)


# ------------------------------------------------------------------------------ file writers
# The writers of the real formats live in tools/realformat.py (shared with tools/dryrun.py).
write_idx, read_idx, write_mnist_like = (realformat.write_idx, realformat.read_idx,
                                         realformat.write_mnist_like)


# ------------------------------------------------------------------------------ fashion-mnist
@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fashion_root")


@pytest.fixture(scope="module")
def fashion(fashion_root):
    # download=False explicitly: module fixtures run before the autouse SGDRANK_OFFLINE fixture.
    return data.load_dataset("fashion-mnist", root=fashion_root, download=False)


@needs_fashion
def test_fashion_full_shapes_labels_standardisation(fashion, fashion_root):
    d = fashion
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.task == "classification" and d.n_classes == 10 and d.input_shape == (1, 28, 28)
    assert d.in_dim == 784
    assert torch.equal(torch.bincount(d.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(d.y_test), torch.full((10,), 1000))
    assert abs(d.x_train.mean().item()) < 1e-4
    assert abs(d.x_train.std(correction=0).item() - 1) < 1e-3
    # Fashion-MNIST's well-known pixel statistics in [0, 1]: mean 0.2860, std 0.3530
    assert d.x_mean.shape == (1,) and abs(d.x_mean.item() - 0.2860) < 1e-3
    assert abs(d.x_std.item() - 0.3530) < 1e-3
    # torchvision's layout was prepared (gunzipped) under the root
    for f in data.IDX_FILES:
        assert (fashion_root / "FashionMNIST" / "raw" / f).is_file()
    assert repr(d) == ("Dataset('fashion-mnist', 10 classes, input (1, 28, 28), train 60000, "
                       "test 10000)")


@needs_fashion
def test_fashion_pixels_round_trip(fashion, fashion_root):
    raw = fashion_root / "FashionMNIST" / "raw"
    images = read_idx(raw / "train-images-idx3-ubyte")
    labels = read_idx(raw / "train-labels-idx1-ubyte")
    d = data.load_dataset("fashion-mnist", root=fashion_root, n_train=50, n_test=20, seed=3,
                          standardize=False)
    idx = d.train_index.numpy()
    assert d.x_mean is None and 0 <= d.x_train.min() and d.x_train.max() <= 1
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(), images[idx].astype(np.float32) / 255)
    np.testing.assert_array_equal(d.y_train.numpy(), labels[idx])
    test_images = read_idx(raw / "t10k-images-idx3-ubyte")
    np.testing.assert_array_equal(d.x_test[:, 0].numpy(),
                                  test_images[d.test_index.numpy()].astype(np.float32) / 255)


@needs_fashion
def test_fashion_subsets_are_seeded(fashion_root):
    def load(**kw):
        return data.load_dataset("fashion-mnist", root=fashion_root, n_test=100, **kw)

    a, b, c = load(n_train=200, seed=1), load(n_train=200, seed=1), load(n_train=200, seed=2)
    big = load(n_train=400, seed=1)
    assert torch.equal(a.train_index, b.train_index) and torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.test_index, b.test_index)
    assert not torch.equal(a.train_index, c.train_index)
    assert not torch.equal(a.test_index, c.test_index)
    assert len(set(a.train_index.tolist())) == 200
    assert torch.equal(a.train_index, a.train_index.sort().values)  # file order
    assert set(a.train_index.tolist()) <= set(big.train_index.tolist())  # nested
    # standardised with the statistics of the subset itself
    assert abs(a.x_train.mean().item()) < 1e-4


@needs_fashion
def test_fashion_classes_filter_relabels(fashion_root):
    labels = read_idx(fashion_root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte")
    d = data.load_dataset("fashion-mnist", root=fashion_root, classes=(9, 0))
    assert d.n_classes == 2 and d.n_train == 12000 and d.n_test == 2000
    orig = labels[d.train_index.numpy()]
    assert set(orig.tolist()) == {0, 9}
    np.testing.assert_array_equal(d.y_train.numpy(), np.where(orig == 9, 0, 1))
    sub = data.load_dataset("fashion-mnist", root=fashion_root, classes=(3, 5), n_train=100, seed=4)
    assert sub.n_train == 100 and set(labels[sub.train_index.numpy()].tolist()) <= {3, 5}
    assert set(sub.y_train.tolist()) == {0, 1}


@needs_fashion
def test_fashion_root_from_env_and_cache(monkeypatch, fashion_root):
    monkeypatch.setenv("SGDRANK_DATA", str(fashion_root))
    a = data.load_dataset("fashion-mnist", n_train=30, n_test=10, standardize=False)
    b = data.load_dataset("fashion-mnist", root=fashion_root, n_train=30, n_test=10,
                          standardize=False)
    assert torch.equal(a.x_train, b.x_train)
    assert ("fashion-mnist", str(fashion_root), "train") in data._CACHE
    a.x_train.zero_()  # returned tensors are copies: the cache is not changed
    assert data.load_dataset("fashion-mnist", n_train=30, standardize=False).x_train.max() > 0


def test_fashion_source_folder_override(tmp_path, monkeypatch):
    src = tmp_path / "src"
    files = write_mnist_like(src, n_train=12, n_test=5, gz_train=True, gz_test=True)
    monkeypatch.setenv("SGDRANK_FASHION_MNIST_SRC", str(src))
    d = data.load_dataset("fashion-mnist", root=tmp_path / "root", standardize=False)
    assert d.n_train == 12 and d.n_test == 5
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(),
                                  files["train"][0].astype(np.float32) / 255)
    np.testing.assert_array_equal(d.y_test.numpy(), files["t10k"][1])


def test_fashion_missing_offline_error(tmp_path, monkeypatch):
    empty_src, empty_root = tmp_path / "src", tmp_path / "root"
    empty_src.mkdir()
    monkeypatch.setenv("SGDRANK_FASHION_MNIST_SRC", str(empty_src))
    with pytest.raises(data.DataNotFoundError) as err:
        data.load_dataset("fashion-mnist", root=empty_root)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "SGDRANK_FASHION_MNIST_SRC" in msg and "SGDRANK_OFFLINE" in msg
    assert str(empty_src) in msg and str(empty_root) in msg
    assert isinstance(err.value, FileNotFoundError)


# ------------------------------------------------------------------------------ online loaders
def test_mnist_from_idx_files(tmp_path):
    # train files gzipped (as downloaded), test files raw (as torchvision leaves them)
    files = write_mnist_like(tmp_path / "MNIST" / "raw", 30, 10, gz_train=True, gz_test=False)
    d = data.load_dataset("mnist", root=tmp_path, standardize=False, download=False)
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)
    images, labels = files["train"]
    assert d.x_train[7, 0, 3, 5].item() == np.float32(images[7, 3, 5]) / np.float32(255)
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(), images.astype(np.float32) / 255)
    np.testing.assert_array_equal(d.y_train.numpy(), labels)
    np.testing.assert_array_equal(d.x_test[:, 0].numpy(), files["t10k"][0].astype(np.float32) / 255)
    s = data.load_dataset("mnist", root=tmp_path, n_train=20)
    assert s.n_train == 20 and abs(s.x_train.mean().item()) < 1e-5


def test_cifar10_from_python_pickles(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # The only thing patched: torchvision checks the real files' md5 sums, which files written
    # here cannot match; replace that integrity check by an existence check.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    batches = realformat.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=4)
    d = data.load_dataset("cifar10", root=tmp_path, standardize=False, download=False)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.input_shape == (3, 32, 32) and d.in_dim == 3072
    # row layout of a batch: 1024 red, 1024 green, 1024 blue values, each row-major 32x32;
    # train image 6 is image 2 of data_batch_2
    row = batches["data_batch_2"]["data"][2]
    c, r, col = 1, 17, 4
    assert (d.x_train[6, c, r, col].item()
            == np.float32(row[c * 1024 + r * 32 + col]) / np.float32(255))
    np.testing.assert_array_equal(d.x_train[6].numpy(),
                                  row.reshape(3, 32, 32).astype(np.float32) / 255)
    labels = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert d.y_train.tolist() == labels
    assert d.y_test.tolist() == batches["test_batch"]["labels"]
    s = data.load_dataset("cifar10", root=tmp_path)
    assert torch.allclose(s.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s.x_train.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4)


def test_california_from_sklearn_cache(tmp_path):
    n = 20
    table = realformat.write_california(tmp_path / "scikit_learn_data", n)

    d = data.load_dataset("california", root=tmp_path, standardize=False, download=False)
    assert d.task == "regression" and d.x_train.shape == (16, 8) and d.x_test.shape == (4, 8)
    i = d.train_index.numpy()
    np.testing.assert_allclose(d.y_train.numpy(), table[i, 0] / 1e5, rtol=1e-6)
    np.testing.assert_allclose(d.x_train[:, 0].numpy(), table[i, 1], rtol=1e-6)  # MedInc
    np.testing.assert_allclose(d.x_train[:, 2].numpy(), table[i, 3] / table[i, 6], rtol=1e-6)
    assert sorted(i.tolist() + d.test_index.tolist()) == list(range(n))
    s = data.load_dataset("california", root=tmp_path, n_train=10, n_test=3, seed=5)
    assert s.n_train == 10 and s.n_test == 3
    assert abs(s.y_train.mean().item()) < 1e-5
    assert abs(s.y_train.std(correction=0).item() - 1) < 1e-4
    np.testing.assert_allclose(s.y_train.numpy() * s.y_std + s.y_mean,
                               table[s.train_index.numpy(), 0] / 1e5, rtol=1e-5)


@pytest.mark.parametrize("name, folder", [
    ("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"), ("california", "scikit_learn_data"),
])
def test_online_missing_offline_error(tmp_path, name, folder):
    with pytest.raises(data.DataNotFoundError) as err:
        data.load_dataset(name, root=tmp_path, download=True)  # SGDRANK_OFFLINE=1 wins
    msg = str(err.value)
    assert repr(name) in msg and str(tmp_path / folder) in msg
    assert "SGDRANK_OFFLINE" in msg and "Colab" in msg


# ------------------------------------------------------------------------------ embedded
def test_digits_split_and_pixels():
    from sklearn.datasets import load_digits

    d = data.load_dataset("digits", standardize=False)
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert sorted(d.train_index.tolist() + d.test_index.tolist()) == list(range(1797))
    x, y = load_digits(return_X_y=True)
    np.testing.assert_allclose(d.x_train.reshape(-1, 64).numpy(), x[d.train_index.numpy()] / 16)
    np.testing.assert_array_equal(d.y_test.numpy(), y[d.test_index.numpy()])
    same, other = data.load_dataset("digits", seed=0), data.load_dataset("digits", seed=1)
    assert torch.equal(same.train_index, d.train_index)
    assert not torch.equal(other.train_index, d.train_index)
    assert abs(same.x_train.mean().item()) < 1e-5
    small = data.load_dataset("digits", n_train=100, n_test=50, classes=(1, 7))
    assert small.n_train == 100 and small.n_test == 50 and set(small.y_train.tolist()) == {0, 1}
    assert set(y[small.train_index.numpy()].tolist()) == {1, 7}


def test_diabetes_targets_standardised():
    from sklearn.datasets import load_diabetes

    d = data.load_dataset("diabetes", seed=2)
    assert d.x_train.shape == (354, 10) and d.x_test.shape == (88, 10) and d.task == "regression"
    assert d.y_train.dtype == torch.float32 and d.y_train.shape == (354,)
    assert abs(d.y_train.mean().item()) < 1e-5
    assert abs(d.y_train.std(correction=0).item() - 1) < 1e-4
    assert torch.allclose(d.x_train.mean(0), torch.zeros(10), atol=1e-5)
    x, y = load_diabetes(return_X_y=True, scaled=False)
    np.testing.assert_allclose(d.y_test.numpy() * d.y_std + d.y_mean, y[d.test_index.numpy()],
                               rtol=1e-5)
    raw = data.load_dataset("diabetes", seed=2, standardize=False, n_train=40)
    assert raw.n_train == 40 and set(raw.train_index.tolist()) <= set(d.train_index.tolist())
    np.testing.assert_allclose(raw.x_train.numpy(), x[raw.train_index.numpy()], rtol=1e-6)


def test_synthetic_regression():
    d = data.load_dataset("synthetic-regression")
    assert d.x_train.shape == (1000, 20) and d.x_test.shape == (1000, 20)
    assert d.y_train.shape == (1000,)
    # noise = 0: y is exactly linear in x, with a unit-norm teacher shared across seeds
    a = data.load_dataset("synthetic-regression", n_train=50, n_test=5, seed=0, standardize=False,
                          options={"d": 5, "noise": 0.0})
    b = data.load_dataset("synthetic-regression", n_train=50, n_test=5, seed=1, standardize=False,
                          options={"d": 5, "noise": 0.0})
    w_a = torch.linalg.lstsq(a.x_train.double(), a.y_train.double()[:, None]).solution[:, 0]
    w_b = torch.linalg.lstsq(b.x_train.double(), b.y_train.double()[:, None]).solution[:, 0]
    assert a.input_shape == (5,) and abs(w_a.norm().item() - 1) < 1e-5
    assert torch.allclose(w_a, w_b, atol=1e-5) and not torch.equal(a.x_train, b.x_train)
    again = data.load_dataset("synthetic-regression", n_train=50, n_test=5, seed=0,
                              standardize=False, options={"d": 5, "noise": 0.0})
    assert torch.equal(again.x_train, a.x_train) and torch.equal(again.y_test, a.y_test)
    # noise = 0.1: residual std of the teacher ~ 0.1
    n = data.load_dataset("synthetic-regression", standardize=False, options={"w_seed": 3})
    w = torch.linalg.lstsq(n.x_train.double(), n.y_train.double()[:, None]).solution[:, 0]
    resid = n.y_train.double() - n.x_train.double() @ w
    assert 0.08 < resid.std().item() < 0.12
    with pytest.raises(ValueError, match="allowed: d, noise, w_seed"):
        data.load_dataset("synthetic-regression", options={"dim": 3})


# ------------------------------------------------------------------------------ registry, errors
def test_registry_and_unknown_name():
    assert data.available() == list(data.DATASETS)
    offline = {n for n, i in data.DATASETS.items() if i.offline}
    assert offline == {"fashion-mnist", "digits", "diabetes", "synthetic-regression"}
    assert set(data.available()) - offline == {"mnist", "cifar10", "california"}
    with pytest.raises(ValueError) as err:
        data.load_dataset("imagenet")
    for name in data.available():
        assert name in str(err.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="classification"):
        data.load_dataset("diabetes", classes=(0, 1))
    with pytest.raises(ValueError, match="out of range"):
        data.load_dataset("digits", classes=(3, 10))
    with pytest.raises(ValueError, match="n_train"):
        data.load_dataset("digits", n_train=5000)
    with pytest.raises(ValueError, match="unknown options"):
        data.load_dataset("digits", options={"d": 3})


def test_avg_pool_pools_and_restandardises():
    d = data.load_dataset("fashion-mnist", n_train=64, n_test=32, seed=0)
    p = data.avg_pool(d, 2)
    assert p.x_train.shape == (64, 1, 14, 14) and p.x_test.shape == (32, 1, 14, 14)
    assert p.input_shape == (1, 14, 14) and p.in_dim == 196
    # each pooled pixel is the mean of its 2x2 block of the (standardised) input, re-standardised
    block = d.x_train[3, 0, 4:6, 10:12].mean()
    assert torch.allclose(p.x_train[3, 0, 2, 5], (block - p.x_mean[0]) / p.x_std[0], atol=1e-5)
    assert abs(p.x_train.mean().item()) < 1e-5
    assert abs(p.x_train.std(correction=0).item() - 1) < 1e-4
    assert torch.equal(p.y_train, d.y_train)
    assert data.avg_pool(d, 1) is d
    with pytest.raises(ValueError, match="positive integer"):
        data.avg_pool(d, 0)
    with pytest.raises(ValueError, match="not images"):
        data.avg_pool(data.load_dataset("diabetes"), 2)
