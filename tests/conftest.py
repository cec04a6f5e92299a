import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("SGDRANK_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: end-to-end checks run by tools/test.sh after the build")


@contextlib.contextmanager
def default_dtype(dtype):
    """Set torch's default dtype for a block and restore it (test modules differ: exact ranks
    need float64, the engine's reference modules float32), whatever the collection order."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def float32_default():
    with default_dtype(torch.float32):
        yield


@pytest.fixture
def float64_default():
    with default_dtype(torch.float64):
        yield


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, name)`` wraps ``module.name`` so that each call is counted; returns
    the list that grows by one entry per call (undone after the test)."""
    def wrap(module, name):
        calls, real = [], getattr(module, name)

        def counting(*a, **k):
            calls.append(1)
            return real(*a, **k)

        monkeypatch.setattr(module, name, counting)
        return calls
    return wrap
