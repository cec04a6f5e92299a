"""Datasets by name, as tensors: ``load_dataset(name, ...) -> Dataset``.

Conventions (the same for every dataset):

- **Images** are float32 of shape ``(n, c, h, w)``, first scaled to ``[0, 1]`` (uint8 pixels / 255;
  the 0..16 ``digits`` pixels / 16), then, with ``standardize=True``, standardised *per channel*
  with the mean and (population) standard deviation of the returned training images.
- **Tabular inputs** are float32 of shape ``(n, d)``; with ``standardize=True`` every feature is
  standardised with the training mean / standard deviation.
- **Targets**: classification labels are int64 in ``0 .. n_classes - 1``; regression targets are
  float32 of shape ``(n,)`` and, with ``standardize=True``, are standardised too (training mean
  and standard deviation; they are kept in :attr:`Dataset.y_mean` / :attr:`Dataset.y_std`).
- Statistics are always those of the *returned* training set (after the class filter and the
  subset), and the test set is transformed with them; a zero standard deviation is replaced by 1.
- **Order of operations**: official split (or, for datasets without one, a seeded split) ->
  class filter and relabelling (``classes``) -> seeded subset (``n_train`` / ``n_test``) ->
  scaling and standardisation.
- **Subsets** are drawn with a ``torch.Generator`` seeded with ``seed``: the same seed gives the
  same examples, subsets of one seed are nested (``n_train=1000`` is contained in
  ``n_train=2000``), and the kept examples stay in file order. ``Dataset.train_index`` /
  ``test_index`` are their positions in the source (the official split, or the whole dataset).
- **Downloads** happen only for the online datasets, only when their files are missing, and only
  when ``download`` is true (default: ``not sgdrank.runtime.offline()``). ``SGDRANK_OFFLINE=1``
  forbids downloads even when ``download=True`` is passed. Missing files with downloads off
  raise :class:`DataNotFoundError`, saying where the loader looked and how to get the files.

Files live under ``root`` (default :func:`sgdrank.runtime.data_root`, i.e. ``$SGDRANK_DATA``),
in the layouts torchvision and scikit-learn expect; see ``data/README.md``. The raw tensors of
each split are cached in memory per process, keyed by ``(name, root, split)``.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import numbers
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import runtime

__all__ = [
    "Dataset",
    "DatasetInfo",
    "DataNotFoundError",
    "DATASETS",
    "available",
    "load_dataset",
    "clear_cache",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing and may not be downloaded; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """What :data:`DATASETS` knows about one dataset (no data is loaded)."""

    name: str
    description: str
    offline: bool  # True: loadable on a machine without internet (embedded or a Debian package)
    task: str  # "classification" or "regression"
    input_shape: tuple[int, ...]
    n_classes: int | None
    size: str  # full train / test sizes
    how_to_get: str
    options: tuple[str, ...] = ()  # keys accepted in ``load_dataset(..., options=...)``


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        "Fashion-MNIST: 28x28 grey-scale images of clothes, 10 classes (Xiao et al. 2017).",
        True, "classification", (1, 28, 28), 10, "60,000 train / 10,000 test",
        "Offline from Debian's package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist, "
        "or $SGDRANK_FASHION_MNIST_SRC), gunzipped once into <root>/FashionMNIST/raw/; "
        "downloaded by torchvision when neither exists and downloads are allowed.",
    ),
    "digits": DatasetInfo(
        "digits",
        "scikit-learn's 8x8 hand-written digits (UCI), pixels 0..16, 10 classes.",
        True, "classification", (1, 8, 8), 10, "1,797 in all; seeded 80/20 split",
        "Embedded in scikit-learn (sklearn.datasets.load_digits).",
        ("test_fraction",),
    ),
    "diabetes": DatasetInfo(
        "diabetes",
        "scikit-learn's diabetes regression: 10 raw (unscaled) baseline features, disease "
        "progression after one year as target.",
        True, "regression", (10,), None, "442 in all; seeded 80/20 split",
        "Embedded in scikit-learn (sklearn.datasets.load_diabetes(scaled=False)).",
        ("test_fraction",),
    ),
    "synthetic-regression": DatasetInfo(
        "synthetic-regression",
        "Linear teacher: x ~ N(0, I_d), y = x @ w_star + noise * N(0, 1), ||w_star|| = 1.",
        True, "regression", (20,), None, "1,000 train / 1,000 test by default",
        "Generated from the seed; nothing to get.",
        ("d", "noise", "w_seed"),
    ),
    "mnist": DatasetInfo(
        "mnist",
        "MNIST: 28x28 grey-scale hand-written digits, 10 classes.",
        False, "classification", (1, 28, 28), 10, "60,000 train / 10,000 test",
        "Online: torchvision.datasets.MNIST downloads into <root>/MNIST/raw/; or copy the four "
        "idx files (gzipped or not) there.",
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        "CIFAR-10: 32x32 colour images, 10 classes.",
        False, "classification", (3, 32, 32), 10, "50,000 train / 10,000 test",
        "Online: torchvision.datasets.CIFAR10 downloads and unpacks cifar-10-python.tar.gz into "
        "<root>/cifar-10-batches-py/.",
    ),
    "california": DatasetInfo(
        "california",
        "California housing (1990 census block groups): 8 features, median house value in "
        "units of $100,000 as target. WD2L use n_train=1800, n_test=600.",
        False, "regression", (8,), None, "20,640 in all; seeded 80/20 split",
        "Online: sklearn.datasets.fetch_california_housing caches "
        "<root>/scikit_learn_data/cal_housing_py3.pkz.",
        ("test_fraction",),
    ),
}


def available() -> list[str]:
    """Names of all registered datasets (offline and online), in registry order."""
    return list(DATASETS)


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        offline = [n for n, i in DATASETS.items() if i.offline]
        online = [n for n, i in DATASETS.items() if not i.offline]
        raise ValueError(
            f"unknown dataset {name!r}; available: {', '.join(DATASETS)} "
            f"(offline: {', '.join(offline)}; online: {', '.join(online)})"
        )
    return DATASETS[name]


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------
@dataclass(eq=False, repr=False)
class Dataset:
    """One loaded dataset. Shapes: ``x_*`` ``(n, *input_shape)`` float32; ``y_*`` ``(n,)``,
    int64 labels (classification) or float32 targets (regression). ``train_index`` /
    ``test_index`` (int64) locate the kept examples in the source; ``x_mean`` / ``x_std``
    (per channel or per feature) and ``y_mean`` / ``y_std`` are the statistics used to
    standardise (``None`` when ``standardize=False``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    task: str
    n_classes: int | None
    input_shape: tuple[int, ...]
    train_index: torch.Tensor | None = None
    test_index: torch.Tensor | None = None
    x_mean: torch.Tensor | None = None
    x_std: torch.Tensor | None = None
    y_mean: float | None = None
    y_std: float | None = None

    @property
    def in_dim(self) -> int:
        """Flattened input size, ``prod(input_shape)`` (784 for Fashion-MNIST)."""
        return math.prod(self.input_shape)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        kind = f"{self.n_classes} classes" if self.task == "classification" else "regression"
        return (
            f"Dataset({self.name!r}, {kind}, input {self.input_shape}, "
            f"train {self.n_train}, test {self.n_test})"
        )


# --------------------------------------------------------------------------------------------
# Files on disk
# --------------------------------------------------------------------------------------------
def _copy_into(src: Path, dst: Path) -> None:
    """Copy ``src`` (gunzipping a ``.gz``) to ``dst`` atomically (temp file + rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)
    os.replace(tmp, dst)


def _prepare_idx(raw_dir: Path, sources: Sequence[Path] = ()) -> bool:
    """Make the four uncompressed MNIST-format idx files exist in ``raw_dir`` (torchvision's
    layout), taking ``<file>.gz`` from ``raw_dir`` or ``<file>[.gz]`` from a source folder.
    True when all four are there afterwards."""
    for fname in IDX_FILES:
        dst = raw_dir / fname
        if dst.is_file():
            continue
        candidates = [raw_dir / f"{fname}.gz"]
        for src in sources:
            candidates += [src / f"{fname}.gz", src / fname]
        found = next((c for c in candidates if c.is_file()), None)
        if found is not None:
            _copy_into(found, dst)
    return all((raw_dir / f).is_file() for f in IDX_FILES)


def _downloads_allowed(download: bool | None) -> bool:
    if runtime.offline():
        return False
    return True if download is None else bool(download)


def _why_no_download(download: bool | None) -> str:
    if runtime.offline():
        extra = "; it overrides download=True" if download else ""
        return f"downloads are off (SGDRANK_OFFLINE=1 is set{extra})"
    return "downloads are off (download=False was passed)"


def _missing(name: str, where: str, download: bool | None, how: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"dataset {name!r}: files not found in {where}, and {_why_no_download(download)}.\n{how}"
    )


def _fashion_src() -> Path:
    return Path(os.environ.get("SGDRANK_FASHION_MNIST_SRC") or DEBIAN_FASHION_MNIST)


def _load_mnist_like(cls_name: str, name: str, root: Path, train: bool, download: bool | None,
                     sources: Sequence[Path], how: str):
    import torchvision

    raw = root / cls_name / "raw"
    ready = _prepare_idx(raw, sources)
    if not ready and not _downloads_allowed(download):
        looked = " or ".join(str(p) for p in [raw, *sources])
        raise _missing(name, looked, download, how)
    ds = getattr(torchvision.datasets, cls_name)(str(root), train=train, download=not ready)
    return ds.data.unsqueeze(1), ds.targets.to(torch.int64)  # uint8 (n,1,28,28), int64 (n,)


def _raw_fashion_mnist(root: Path, train: bool, download: bool | None):
    src = _fashion_src()
    how = (
        "Do one of:\n"
        "  - install Debian's package: sudo apt-get install dataset-fashion-mnist\n"
        f"    (it puts the four *-ubyte.gz files in {DEBIAN_FASHION_MNIST});\n"
        "  - set SGDRANK_FASHION_MNIST_SRC to a folder holding train-images-idx3-ubyte.gz,\n"
        "    train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz;\n"
        "  - on a machine with internet, unset SGDRANK_OFFLINE (and do not pass download=False)\n"
        "    and torchvision downloads it."
    )
    return _load_mnist_like("FashionMNIST", "fashion-mnist", root, train, download, [src], how)


def _raw_mnist(root: Path, train: bool, download: bool | None):
    how = (
        "MNIST is an online dataset: on a machine with internet (e.g. Colab) unset "
        "SGDRANK_OFFLINE\n"
        "and torchvision downloads it; or copy train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte,\n"
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (gzipped or not) into "
        f"{root / 'MNIST' / 'raw'}."
    )
    return _load_mnist_like("MNIST", "mnist", root, train, download, [], how)


def _raw_cifar10(root: Path, train: bool, download: bool | None):
    import torchvision

    folder = root / "cifar-10-batches-py"
    ready = all((folder / f).is_file() for f in CIFAR10_FILES)
    if not ready and not _downloads_allowed(download):
        how = (
            "CIFAR-10 is an online dataset: on a machine with internet (e.g. Colab) unset\n"
            "SGDRANK_OFFLINE and torchvision downloads it; or unpack cifar-10-python.tar.gz\n"
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) into {root}."
        )
        raise _missing("cifar10", str(folder), download, how)
    ds = torchvision.datasets.CIFAR10(str(root), train=train, download=not ready)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (n,32,32,3) -> (n,3,32,32)
    return x, torch.as_tensor(ds.targets, dtype=torch.int64)


def _raw_california(root: Path, download: bool | None):
    from sklearn.datasets import fetch_california_housing

    home = root / "scikit_learn_data"
    allowed = _downloads_allowed(download)
    try:
        x, y = fetch_california_housing(data_home=str(home), download_if_missing=allowed,
                                        return_X_y=True)
    except OSError as err:
        if allowed:
            raise
        how = (
            "California housing is an online dataset: on a machine with internet (e.g. Colab)\n"
            "unset SGDRANK_OFFLINE and scikit-learn downloads it (about 0.5 MB); or copy a\n"
            f"cal_housing_py3.pkz made by fetch_california_housing into {home}."
        )
        raise _missing("california", str(home), download, how) from err
    return torch.from_numpy(x), torch.from_numpy(y)  # float64 (20640, 8), (20640,)


def _raw_digits(root: Path, download: bool | None):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.from_numpy(x / 16.0).reshape(-1, 1, 8, 8), torch.from_numpy(y).to(torch.int64)


def _raw_diabetes(root: Path, download: bool | None):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    return torch.from_numpy(x), torch.from_numpy(y)


# name -> loader of one official split (root, train, download) -> (x, y)
_SPLIT_LOADERS: dict[str, Callable] = {
    "fashion-mnist": _raw_fashion_mnist,
    "mnist": _raw_mnist,
    "cifar10": _raw_cifar10,
}
# name -> loader of the whole dataset (root, download) -> (x, y); split here with the seed
_WHOLE_LOADERS: dict[str, Callable] = {
    "digits": _raw_digits,
    "diabetes": _raw_diabetes,
    "california": _raw_california,
}
_EMBEDDED = {"digits", "diabetes"}  # do not depend on root

_CACHE: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def clear_cache() -> None:
    """Forget the raw tensors cached by :func:`load_dataset` in this process."""
    _CACHE.clear()


def _cached(name: str, root: Path, split: str, load: Callable[[], tuple]) -> tuple:
    key = (name, "" if name in _EMBEDDED else str(root), split)
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


# --------------------------------------------------------------------------------------------
# Pipeline: split -> classes -> subset -> scale / standardise
# --------------------------------------------------------------------------------------------
_Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, y, index into the source


def _seeded_split(x, y, test_fraction: float, g: torch.Generator) -> tuple[_Part, _Part]:
    n = x.shape[0]
    n_test = int(round(n * test_fraction))
    if not 0 < test_fraction < 1 or n_test < 1 or n_test >= n:
        raise ValueError(f"test_fraction must leave both splits non-empty, got {test_fraction}")
    perm = torch.randperm(n, generator=g)
    tr, te = perm[n_test:].sort().values, perm[:n_test].sort().values
    return (x[tr], y[tr], tr), (x[te], y[te], te)


def _filter_classes(part: _Part, classes: Sequence[int]) -> _Part:
    """Keep the examples whose label is in ``classes``; relabel ``classes[k] -> k``."""
    x, y, idx = part
    size = max(int(y.max()) if y.numel() else 0, max(classes)) + 1
    lookup = torch.full((size,), -1, dtype=torch.int64)
    lookup[list(classes)] = torch.arange(len(classes))
    new = lookup[y]
    keep = new >= 0
    return x[keep], new[keep], idx[keep]


def _is_int(n) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def _check_size(n, what: str, name: str, lo: int, hi: int | None) -> int:
    if not (_is_int(n) and n >= lo and (hi is None or n <= hi)):
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{what}={n!r} for {name!r}: must be an int in {span}")
    return int(n)


def _subset(part: _Part, n: int | None, g: torch.Generator, what: str, name: str) -> _Part:
    """A seeded random subset of size ``n`` (kept in source order). The permutation is drawn even
    when ``n`` is None, so that the generator's stream does not depend on ``n``."""
    x, y, idx = part
    perm = torch.randperm(x.shape[0], generator=g)
    if n is None:
        return part
    n = _check_size(n, what, name, 1 if what == "n_train" else 0, x.shape[0])
    keep = perm[:n].sort().values
    return x[keep], y[keep], idx[keep]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; anything else -> float32 (always a fresh tensor)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32, copy=True)


def _stats(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over ``dims`` in ``x``'s dtype (no float64 copy of 60k images);
    a std of (almost) zero becomes 1."""
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    std = var.sqrt()
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def _standardize_x(x_tr: torch.Tensor, x_te: torch.Tensor):
    """Per channel ((n,c,h,w): over n,h,w) or per feature ((n,d): over n), train statistics."""
    dims = (0, 2, 3) if x_tr.ndim == 4 else (0,)
    mean, std = _stats(x_tr, dims)
    shape = (1, -1, 1, 1) if x_tr.ndim == 4 else (1, -1)
    m, s = mean.view(shape), std.view(shape)
    return x_tr.sub_(m).div_(s), x_te.sub_(m).div_(s), mean, std


def _check_options(info: DatasetInfo, options: Mapping | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - set(info.options)
    if unknown:
        allowed = ", ".join(info.options) or "none"
        raise ValueError(f"unknown options {sorted(unknown)} for {info.name!r}; allowed: {allowed}")
    return options


def _check_classes(info: DatasetInfo, classes: Sequence[int] | None) -> tuple[int, ...] | None:
    if classes is None:
        return None
    if info.task != "classification":
        raise ValueError(f"classes= only applies to classification datasets, not {info.name!r}")
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be non-empty and distinct, got {classes}")
    bad = [c for c in classes if not 0 <= c < info.n_classes]
    if bad:
        raise ValueError(f"classes {bad} out of range for {info.name!r} (0..{info.n_classes - 1})")
    return classes


def _synthetic(n_train, n_test, g, d=20, noise=0.1, w_seed=0) -> tuple[_Part, _Part]:
    """``w_star = v / ||v||`` with ``v ~ N(0, I_d)`` from ``w_seed`` (fixed across ``seed``);
    ``x ~ N(0, I_d)`` and the noise from ``g``; ``y = x @ w_star + noise * N(0, 1)``."""
    d = _check_size(d, "options['d']", "synthetic-regression", 1, None)
    w = torch.randn(d, generator=torch.Generator().manual_seed(int(w_seed)), dtype=torch.float64)
    w = w / w.norm()
    n_train = 1000 if n_train is None else n_train
    n_test = 1000 if n_test is None else n_test
    n_train = _check_size(n_train, "n_train", "synthetic-regression", 1, None)
    n_test = _check_size(n_test, "n_test", "synthetic-regression", 0, None)
    parts = []
    for n in (n_train, n_test):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = x @ w + float(noise) * torch.randn(n, generator=g, dtype=torch.float64)
        parts.append((x, y, torch.arange(n)))
    return parts[0], parts[1]


def _source_parts(info, root, download, g, n_train, n_test, options) -> tuple[_Part, _Part]:
    name = info.name
    if name == "synthetic-regression":
        return _synthetic(n_train, n_test, g, **options)
    if name in _SPLIT_LOADERS:
        load = _SPLIT_LOADERS[name]
        parts = []
        for train in (True, False):
            split = "train" if train else "test"
            x, y = _cached(name, root, split, lambda t=train: load(root, t, download))
            parts.append((x, y, torch.arange(x.shape[0])))
        return parts[0], parts[1]
    x, y = _cached(name, root, "all", lambda: _WHOLE_LOADERS[name](root, download))
    return _seeded_split(x, y, float(options.get("test_fraction", 0.2)), g)


def avg_pool(ds: Dataset, k: int) -> Dataset:
    """``ds`` with its images average-pooled ``k x k`` (``(n, c, h, w)`` -> ``(n, c, h//k, w//k)``)
    and standardised again per channel with the pooled training statistics (``x_mean`` /
    ``x_std`` then describe the pooled inputs). ``k = 1`` returns ``ds`` itself."""
    if not _is_int(k) or k < 1:
        raise ValueError(f"avg_pool: k must be a positive integer, got {k!r}")
    if k == 1:
        return ds
    if ds.x_train.ndim != 4:
        raise ValueError(f"avg_pool: {ds.name!r} has inputs of shape "
                         f"{tuple(ds.input_shape)}, not images")
    x_tr = torch.nn.functional.avg_pool2d(ds.x_train, k)
    x_te = torch.nn.functional.avg_pool2d(ds.x_test, k)
    x_tr, x_te, mean, std = _standardize_x(x_tr, x_te)
    return dataclasses.replace(ds, x_train=x_tr, x_test=x_te, input_shape=tuple(x_tr.shape[1:]),
                               x_mean=mean, x_std=std)


def load_dataset(
    name: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool | None = None,
    classes: Sequence[int] | None = None,
    standardize: bool = True,
    options: Mapping | None = None,
) -> Dataset:
    """Load dataset ``name`` (see :data:`DATASETS`, :func:`available`) as tensors.

    Args:
        name: ``fashion-mnist``, ``digits``, ``diabetes``, ``synthetic-regression`` (offline);
            ``mnist``, ``cifar10``, ``california`` (online).
        n_train, n_test: sizes of seeded random subsets of the (class-filtered) train / test
            split; ``None`` keeps all (``synthetic-regression``: 1000 each). California: WD2L
            use ``n_train=1800, n_test=600``.
        seed: seeds the subsets and, for ``digits`` / ``diabetes`` / ``california`` (which have
            no official split), the train/test split; for ``synthetic-regression`` the inputs
            and noise.
        root: data folder; default :func:`sgdrank.runtime.data_root` (``$SGDRANK_DATA``).
        download: allow downloading missing online files; default ``not runtime.offline()``.
            ``SGDRANK_OFFLINE=1`` always wins.
        classes: e.g. ``(0, 9)``: keep those classes only and relabel them ``0..k-1`` in the
            given order (applied before subsetting). Classification only.
        standardize: standardise inputs (per channel / per feature) and regression targets with
            the returned training set's mean and std. ``False``: images in ``[0, 1]``, tabular
            inputs and targets in their original units.
        options: dataset-specific settings.
            ``synthetic-regression``: ``d`` (input dimension, default 20), ``noise`` (std of the
            label noise, default 0.1), ``w_seed`` (seed of the unit-norm teacher ``w_star``,
            default 0, so that different ``seed`` values sample the same problem);
            ``digits`` / ``diabetes`` / ``california``: ``test_fraction`` (default 0.2).

    Returns:
        :class:`Dataset` with ``x_*`` float32 ``(n, *input_shape)`` and ``y_*`` int64 labels or
        float32 targets ``(n,)``.

    Raises:
        ValueError: unknown name (the message lists the available ones) or bad arguments.
        DataNotFoundError: files missing and downloads off; the message says what to do.
    """
    info = _info(name)
    options = _check_options(info, options)
    classes = _check_classes(info, classes)
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    root = Path(root).expanduser() if root is not None else runtime.data_root()
    g = torch.Generator().manual_seed(seed)

    train, test = _source_parts(info, root, download, g, n_train, n_test, options)
    if classes is not None:
        train, test = _filter_classes(train, classes), _filter_classes(test, classes)
    if name != "synthetic-regression":  # synthetic data is drawn at the requested sizes
        train = _subset(train, n_train, g, "n_train", name)
        test = _subset(test, n_test, g, "n_test", name)

    (x_tr, y_tr, i_tr), (x_te, y_te, i_te) = train, test
    x_tr, x_te = _as_float(x_tr), _as_float(x_te)
    out = dict(x_mean=None, x_std=None, y_mean=None, y_std=None)
    if standardize:
        x_tr, x_te, out["x_mean"], out["x_std"] = _standardize_x(x_tr, x_te)
    if info.task == "classification":
        y_tr, y_te = y_tr.to(torch.int64, copy=True), y_te.to(torch.int64, copy=True)
    else:
        y_tr, y_te = y_tr.to(torch.float64), y_te.to(torch.float64)
        if standardize:
            mean, std = _stats(y_tr, (0,))
            y_tr, y_te = (y_tr - mean) / std, (y_te - mean) / std
            out["y_mean"], out["y_std"] = float(mean), float(std)
        y_tr, y_te = y_tr.to(torch.float32, copy=True), y_te.to(torch.float32, copy=True)

    n_classes = len(classes) if classes is not None else info.n_classes
    return Dataset(x_tr, y_tr, x_te, y_te, name=name, task=info.task, n_classes=n_classes,
                   input_shape=tuple(x_tr.shape[1:]), train_index=i_tr, test_index=i_te, **out)
