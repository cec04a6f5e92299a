"""Progress bars that read well both live and in a committed notebook.

Interactive use (Colab, Jupyter, a terminal): a tqdm bar (a widget where ipywidgets exists).
Non-interactive execution (``SGDRANK_PROGRESS=summary``, set by the book's runner and CI): no
bar at all, one line when the loop ends -- ``"<desc>: 400/400 in 12.3 s"`` -- so the committed
outputs hold no hundreds of carriage-return updates.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def summary_mode() -> bool:
    return os.environ.get("SGDRANK_PROGRESS", "").strip().lower() == "summary"


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None,
             leave: bool = True) -> Iterator[T]:
    """Iterate over ``iterable`` with a progress bar (or a one-line summary, see module doc)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if summary_mode():
        return _summary(iterable, desc, total, leave)
    return iter(_bar()(iterable, desc=desc, total=total, leave=leave))


def _summary(iterable, desc, total, leave):
    t0, n = time.perf_counter(), 0
    for item in iterable:
        n += 1
        yield item
    if leave:
        of = f"/{total}" if total else ""
        print(f"{desc}: {n}{of} in {time.perf_counter() - t0:.1f} s", flush=True)


def _bar():
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm.std import tqdm
    return tqdm


class _SummaryBar:
    """A tqdm stand-in for summary mode: counts, and prints one line when closed."""

    def __init__(self, total: int | None, initial: int, desc: str, unit: str):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.t0 = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        of = f"/{self.total}" if self.total else ""
        secs = time.perf_counter() - self.t0
        print(f"{self.desc}: {self.n}{of} {self.unit}s in {secs:.1f} s", flush=True)


def counter(total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it"):
    """A manually updated progress bar (``update(n)``, ``set_description(s)``, ``close()``):
    a tqdm bar interactively, a one-line summary in summary mode (see module doc)."""
    if summary_mode():
        return _SummaryBar(total, initial, desc, unit)
    return _bar()(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
