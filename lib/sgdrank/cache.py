"""The on-disk cache of sweep runs: one file ``<folder>/<key>.pt`` per run, written atomically.

A run's key (:func:`run_key`) is the sha256 of its configuration and of the source of every file
that determines its numbers (:data:`ENGINE_FILES`): change an engine, a model, the recorder or a
metric and every run is recomputed; change the tables (:mod:`sgdrank.results`), the caching or
the job dispatch and nothing is. Files are written under a temporary name and renamed
(``os.replace``), so a reader or a killed writer never sees half a file; unreadable files are
recomputed, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from . import runtime, stepgraph
from .record import FORMAT
from .runconfig import Config

ENGINE_FILES = ("sweep.py", "runconfig.py", "inputs.py", "record.py", "engine_batched.py",
                "engine_loop.py", "batched.py", "stepgraph.py", "models.py", "zoo.py",
                "metrics.py", "conventions.py", "data.py")
_CODE_HASH: str | None = None


def code_hash() -> str:
    """sha256 of the source files that determine a run's result (:data:`ENGINE_FILES`)."""
    global _CODE_HASH
    if _CODE_HASH is None:
        h = hashlib.sha256()
        here = Path(__file__).resolve().parent
        for name in ENGINE_FILES:
            p = here / name
            h.update(name.encode())
            h.update(p.read_bytes() if p.exists() else b"<missing>")
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH


def run_key(cfg: Config, data_fingerprint: str | None = None) -> str:
    """Cache key of a run: sha256 of the config (JSON), :func:`code_hash`, for data passed in by
    hand a fingerprint of the tensors, and whether the steps are replayed CUDA graphs
    (:func:`sgdrank.stepgraph.requested`: graph runs are cached apart from eager ones, since no
    GPU has yet compared a replay with the eager numbers; the flag follows the environment, so
    loop-engine runs, which never replay, also get their own keys then and train again).
    20 hex digits."""
    payload = (json.dumps(cfg.to_dict(), sort_keys=True) + "|" + code_hash() + "|"
               + (data_fingerprint or "") + ("|cuda-graphs" if stepgraph.requested() else ""))
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def group_id(keys: Sequence[str]) -> str:
    """Identifier of a batch of runs trained together (from their keys, in order)."""
    return hashlib.sha256("".join(keys).encode()).hexdigest()[:20]


def checkpoint_path(folder: Path, keys: Sequence[str]) -> Path:
    """The checkpoint file of the batch of runs with cache keys ``keys`` (deleted when the batch
    is finished: its runs are then in their own files)."""
    return Path(folder) / f"_partial_{group_id(keys)}.pt"


def atomic_save(obj, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def folder(cache) -> Path | None:
    """The cache folder: None/False -> no cache; a path (or a string with a separator or a
    leading dot) as is; a name -> :func:`sgdrank.runtime.results_dir` ``(name)``. Created."""
    if cache is None or cache is False:
        return None
    if isinstance(cache, Path) or (isinstance(cache, str)
                                   and (os.sep in cache or cache.startswith("."))):
        p = Path(cache)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return runtime.results_dir(str(cache))


def load_record(path: Path) -> dict | None:
    """The record in ``path``; None if it is missing, unreadable or of another format."""
    if not path.exists():
        return None
    try:
        rec = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated or foreign file: recompute
        warnings.warn(f"cannot read cached run {path} ({type(err).__name__}); recomputing it")
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None


def _digest(obj, h) -> None:
    """Feed a canonical form of ``obj`` (tensors by dtype, shape and bytes; arrays alike;
    dataclasses by their fields; mappings sorted; sequences in order; other values by ``repr``)
    into the hash ``h``."""
    import dataclasses

    import numpy as np

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"D{type(obj).__qualname__}".encode())
        _digest({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, h)
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            _digest(k, h)
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def memo(cache, fn, *args, files: Sequence[str] = (), ignore: Sequence[str] = (), **kwargs):
    """``fn(*args, **kwargs)``, kept in the cache folder ``cache`` (:func:`folder`) and loaded
    from there when the same call was made before: training outside ``sweep.run`` (Chapter 4's
    weight-normalised network, Chapter 5's two-layer networks) survives a lost Colab runtime.

    The key hashes ``fn``'s qualified name, the arguments (tensors by value), the sources of
    :data:`ENGINE_FILES` and of the library ``files`` named (e.g. ``("twolayer.py",)``, the
    module that holds ``fn``); the keyword arguments named in ``ignore`` (progress text) are
    passed on but left out of the key. ``cache=None`` just calls ``fn``. The result is stored with
    ``torch.save`` (it must pickle) and loaded with ``weights_only=False``: the cache is a
    folder of this book's own results, not a file from elsewhere."""
    where = folder(cache)
    if where is None:
        return fn(*args, **kwargs)
    h = hashlib.sha256()
    h.update(f"{fn.__module__}.{fn.__qualname__}|{code_hash()}".encode())
    here = Path(__file__).resolve().parent
    for name in files:
        h.update((here / name).read_bytes())
    _digest([list(args), {k: v for k, v in kwargs.items() if k not in ignore}], h)
    path = where / f"memo_{fn.__name__}_{h.hexdigest()[:20]}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=False)
        except Exception as err:  # a truncated or foreign file: recompute
            warnings.warn(f"cannot read cached result {path} ({type(err).__name__}); "
                          f"recomputing it")
    out = fn(*args, **kwargs)
    atomic_save(out, path)
    return out
