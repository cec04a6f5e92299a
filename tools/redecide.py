"""Re-decide every claims-page row under another numeric configuration of the machine.

    python tools/redecide.py [chapters/NN_name.ipynb ...]   # default: every chapter
    make redecide

A verdict that a re-run on another CPU flips is not a verdict. This tool copies each chapter into
a temporary folder, executes it there in the ``book`` profile (papermill, the committed notebook
is not touched) under the second numeric configuration of ``make test`` (OpenBLAS ``Prescott``
kernels, PyTorch's non-vectorised kernels, one thread: ``NUMERIC_B``), and compares the claim
records it stores with the committed ones: the row verdict and every sub-claim's verdict. It
prints one line per row and exits 1 when any verdict differs. It costs one ``make execute``
(about 20-30 minutes on a 2-core machine), so it is a tool, not a stage of ``make test``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import booktools  # noqa: E402
import claims  # noqa: E402

NUMERIC_B = {"OPENBLAS_CORETYPE": "Prescott", "ATEN_CPU_CAPABILITY": "default",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def verdicts(nb: dict) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{claim id: (row verdict, (sub-claim verdicts...))}`` of a notebook's records."""
    return {r["id"]: (r["verdict"], tuple(s["verdict"] for s in r.get("subs", [])))
            for r in claims.records(nb)}


def differences(old: dict, new: dict) -> list[str]:
    """One line per claim id whose row or sub-claim verdicts differ between two runs."""
    out = []
    for cid in sorted(set(old) | set(new)):
        a, b = old.get(cid), new.get(cid)
        if a != b:
            out.append(f"{cid}: committed {a} -> re-run {b}")
    return out


def execute(path: Path, folder: Path) -> Path:
    """Execute a copy of chapter ``path`` in ``folder`` under :data:`NUMERIC_B`, in a separate
    process (the environment must be set before numpy and torch load)."""
    out = folder / path.name
    shutil.copy(path, out)
    env = {**os.environ, **NUMERIC_B, "SGDRANK_PROFILE": "book", "SGDRANK_PROGRESS": "summary",
           "SGDRANK_RESULTS": str(folder / "results")}
    code = ("import papermill as pm, sys; pm.execute_notebook(sys.argv[1], sys.argv[1], "
            "cwd=sys.argv[2], progress_bar=False, log_output=False)")
    subprocess.run([sys.executable, "-c", code, str(out), str(path.parent)], env=env, check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path)
    args = ap.parse_args()
    paths = [p.resolve() for p in args.paths] or booktools.chapter_paths()
    flips = []
    with tempfile.TemporaryDirectory(prefix="sgdrank-redecide-") as tmp:
        for p in paths:
            print(f"{p.name}: executing in the book profile under {NUMERIC_B} ...", flush=True)
            new = verdicts(booktools.load(execute(p, Path(tmp))))
            diff = differences(verdicts(booktools.load(p)), new)
            flips += diff
            print(f"{p.name}: " + ("; ".join(diff) if diff else
                                   f"all {len(new)} rows and their sub-claims re-decided alike"),
                  flush=True)
    return 1 if flips else 0


if __name__ == "__main__":
    raise SystemExit(main())
