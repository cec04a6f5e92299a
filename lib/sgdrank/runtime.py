"""Where things run and where files go: device selection, seeding, data and results folders."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """The device to train on: ``prefer`` (or ``$SGDRANK_DEVICE``) if given, else cuda, mps, cpu."""
    name = prefer or os.environ.get("SGDRANK_DEVICE")
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available here")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {name!r} requested but MPS is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU ``torch.Generator`` seeded alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def data_root() -> Path:
    """Folder for datasets: ``$SGDRANK_DATA``, else ``~/.cache/sgdrank/data``. Never committed."""
    root = Path(os.environ.get("SGDRANK_DATA") or Path.home() / ".cache" / "sgdrank" / "data")
    root.mkdir(parents=True, exist_ok=True)
    return root


def results_dir(chapter: str) -> Path:
    """Folder for one chapter's cached results: ``$SGDRANK_RESULTS/<chapter>``, else
    ``~/.cache/sgdrank/results/<chapter>``. Results are caches, recomputable from code + config."""
    base = Path(os.environ.get("SGDRANK_RESULTS") or Path.home() / ".cache" / "sgdrank" / "results")
    path = base / chapter
    path.mkdir(parents=True, exist_ok=True)
    return path


def offline() -> bool:
    """True when downloads are forbidden (``SGDRANK_OFFLINE=1``, set by the Makefile and CI)."""
    return os.environ.get("SGDRANK_OFFLINE", "0").strip().lower() in {"1", "true", "yes"}
