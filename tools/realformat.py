"""Small files in the real on-disk formats of the online datasets, written from a seed.

Used by ``tests/test_data.py`` (the loaders read these formats correctly) and by
``tools/dryrun.py`` (the paper profiles run on them). Each writer produces exactly what
``sgdrank.data`` reads (see its ``_raw_*`` loaders and ``data/README.md``):

- MNIST: the four idx files ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
  (optionally gzipped, as downloaded);
- CIFAR-10: the python pickles ``<root>/cifar-10-batches-py/data_batch_1..5, test_batch,
  batches.meta`` (rows of 3072 uint8: 1024 red, 1024 green, 1024 blue, each row-major 32x32);
- California housing: ``<root>/scikit_learn_data/cal_housing_py3.pkz``, the joblib-compressed
  table that ``sklearn.datasets.fetch_california_housing`` caches (9 columns, in its order).

The pixels are uniform random; labels cycle through the classes (MNIST) or are random
(CIFAR-10), so that every class occurs.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    """An MNIST 'idx' file: magic 0x0000 08 <ndim> (uint8), big-endian int32 sizes, raw bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def read_idx(path: Path) -> np.ndarray:
    """Read an uncompressed idx file back (the inverse of :func:`write_idx`)."""
    raw = Path(path).read_bytes()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_mnist_like(folder: Path, n_train: int, n_test: int, gz_train: bool = False,
                     gz_test: bool = False, seed: int = 0) -> dict:
    """The four idx files of an MNIST-like set (28x28, 10 classes) in ``folder`` (e.g.
    ``<root>/MNIST/raw``); returns ``{"train": (images, labels), "t10k": (...)}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, gz in (("train", n_train, gz_train), ("t10k", n_test, gz_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(Path(folder) / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(Path(folder) / f"{split}-labels-idx1-ubyte", labels, gz)
        out[split] = (images, labels)
    return out


def write_cifar10(folder: Path, per_batch: int, n_test: int | None = None, seed: int = 1) -> dict:
    """CIFAR-10's python batches in ``folder`` (``<root>/cifar-10-batches-py``): five training
    batches of ``per_batch`` images, a test batch of ``n_test`` (default ``per_batch``) and
    ``batches.meta``; returns ``{batch name: its dict}``."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = per_batch if name != "test_batch" or n_test is None else n_test
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry))
        batches[name] = entry
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_NAMES}))
    return batches


def write_california(home: Path, n: int, seed: int = 2) -> np.ndarray:
    """``cal_housing_py3.pkz`` in ``home`` (``<root>/scikit_learn_data``) with ``n`` rows;
    returns the table. Columns, in the order fetch_california_housing reads them: value ($),
    median income, age, total rooms, total bedrooms, population, households, lat, lon."""
    import joblib

    rng = np.random.default_rng(seed)
    households = rng.integers(50, 500, n).astype(float)
    table = np.column_stack([
        rng.uniform(5e4, 5e5, n), rng.uniform(1, 10, n), rng.integers(1, 52, n),
        households * rng.uniform(3, 7, n), households * rng.uniform(0.8, 1.5, n),
        households * rng.uniform(2, 4, n), households, rng.uniform(32, 42, n),
        rng.uniform(-124, -114, n),
    ])
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    joblib.dump(table, home / "cal_housing_py3.pkz", compress=6)
    return table


def write_all(root: Path, *, n_train: int, n_test: int, n_california: int) -> None:
    """Every online dataset in its real layout under ``root`` (an ``SGDRANK_DATA`` folder):
    MNIST and CIFAR-10 with ``n_train`` / ``n_test`` images (CIFAR-10's five training batches
    share ``n_train``), California housing with ``n_california`` rows."""
    root = Path(root)
    write_mnist_like(root / "MNIST" / "raw", n_train, n_test)
    per_batch = -(-n_train // 5)
    write_cifar10(root / "cifar-10-batches-py", per_batch, n_test)
    write_california(root / "scikit_learn_data", n_california)
