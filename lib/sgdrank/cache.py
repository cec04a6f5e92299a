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

from . import runtime
from .record import FORMAT
from .runconfig import Config

ENGINE_FILES = ("sweep.py", "runconfig.py", "inputs.py", "record.py", "engine_batched.py",
                "engine_loop.py", "batched.py", "models.py", "zoo.py", "metrics.py",
                "conventions.py", "data.py")
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
    """Cache key of a run: sha256 of the config (JSON), :func:`code_hash` and, for data passed
    in by hand, a fingerprint of the tensors. 20 hex digits."""
    payload = (json.dumps(cfg.to_dict(), sort_keys=True) + "|" + code_hash() + "|"
               + (data_fingerprint or ""))
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
