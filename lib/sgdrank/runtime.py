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


#: profiles that train on a CUDA GPU unless ``$SGDRANK_DEVICE`` says otherwise
GPU_PROFILES = ("gpu", "paper")
#: where a Colab reader's results are kept (Colab's own disk is lost with the runtime)
DRIVE_RESULTS = "/content/drive/MyDrive/sgdrank-results"


def profile_device(profile: str, environ=None) -> torch.device:
    """The device a chapter trains on in ``profile``, an explicit setting: ``$SGDRANK_DEVICE``
    if set; else CUDA for the ``gpu`` and ``paper`` profiles and the CPU for ``smoke`` and
    ``book`` (whose committed outputs are CPU numbers). Raises, saying what to do, when the
    gpu or paper profile finds no CUDA device."""
    env = os.environ if environ is None else environ
    name = env.get("SGDRANK_DEVICE")
    if name:
        return pick_device(name)
    if profile in GPU_PROFILES:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"the {profile!r} profile trains on a CUDA GPU and this machine has none: on "
                f"Colab choose Runtime > Change runtime type > T4 GPU; elsewhere run the 'book' "
                f"profile, or set SGDRANK_DEVICE=cpu to run {profile!r} on the CPU (hours)")
        return torch.device("cuda")
    return torch.device("cpu")


def use_profile_device(profile: str) -> torch.device:
    """:func:`profile_device`, also written to ``$SGDRANK_DEVICE`` so that every sweep of the
    chapter (in this process and in its submitit jobs) trains there."""
    dev = profile_device(profile)
    os.environ["SGDRANK_DEVICE"] = str(dev)
    return dev


def on_colab() -> bool:
    """True inside a Google Colab runtime."""
    import importlib.util

    return importlib.util.find_spec("google.colab") is not None


def keep_results_on_drive(profile: str, mount=None) -> Path | None:
    """On Colab, for the ``gpu`` and ``paper`` profiles, when ``$SGDRANK_RESULTS`` is unset:
    mount Google Drive (Colab asks for permission) and keep results in
    :data:`DRIVE_RESULTS`, so that a run that outlives the runtime resumes from its cache.
    Returns that folder, or None where nothing was done (not Colab, another profile, or
    ``$SGDRANK_RESULTS`` already set). ``mount``: the mounting function (tests)."""
    if profile not in GPU_PROFILES or os.environ.get("SGDRANK_RESULTS") or not on_colab():
        return None
    if mount is None:  # pragma: no cover - Colab only
        from google.colab import drive

        mount = drive.mount
    mount("/content/drive")
    os.environ["SGDRANK_RESULTS"] = DRIVE_RESULTS
    Path(DRIVE_RESULTS).mkdir(parents=True, exist_ok=True)
    return Path(DRIVE_RESULTS)
