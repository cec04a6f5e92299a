"""Execute chapters top to bottom on a fresh kernel with papermill and stamp their metadata.

    python tools/run_chapters.py [--profile book] [--jobs 2] [chapters/NN_name.ipynb ...]

With no paths, every chapter runs. The notebook is executed in place from its committed code
(its working directory is ``chapters/``); ``SGDRANK_PROFILE`` is set for the kernel, so the
chapter's ``parameters`` cell (``profile = None``) picks the profile up. After a clean run the
metadata records the profile and the hashes that tests/test_notebooks.py compares; papermill's
``input_path``/``output_path`` are made relative to the repository (no machine's paths are
committed). After the chapters, the claims page (``claims.md``, tools/claims.py) is regenerated
from the executed outputs.

Chapters run ``--jobs`` at a time (default 2, one per core of the book's 2-core machine),
longest first by the duration of their last book run. Every kernel runs with one BLAS/OpenMP
thread (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``) whatever ``--jobs`` is, so the outputs do
not depend on the scheduling.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import booktools  # noqa: E402


def run(path: Path, profile: str, kernel: str) -> float:
    import papermill as pm

    os.environ["SGDRANK_PROFILE"] = profile
    os.environ["SGDRANK_PROGRESS"] = "summary"  # one line per loop in committed outputs
    t0 = time.time()
    pm.execute_notebook(
        str(path), str(path), kernel_name=kernel, cwd=str(path.parent), progress_bar=False,
        request_save_on_cell_execute=False, log_output=False,
    )
    seconds = time.time() - t0
    nb = booktools.load(path)
    booktools.relative_papermill_paths(nb)
    stamped = {**nb["metadata"], booktools.META_KEY: booktools.stamp(nb, profile)}
    bad = booktools.problems({**nb, "metadata": stamped}, profile)
    if bad:
        raise SystemExit(f"{path.name}: ran, but: {'; '.join(bad)}")
    nb["metadata"][booktools.META_KEY] = booktools.stamp(nb, profile)
    nb["metadata"][booktools.META_KEY]["seconds"] = round(seconds, 1)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return seconds


def last_seconds(path: Path) -> float:
    """Duration of the chapter's last recorded run (0 when it has none)."""
    meta = booktools.load(path).get("metadata", {}).get(booktools.META_KEY, {})
    return float(meta.get("seconds", 0.0) or 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--profile", default="book", choices=["smoke", "book", "paper"])
    ap.add_argument("--kernel", default="python3")
    ap.add_argument("--stale-only", action="store_true",
                    help="skip chapters that are already fresh")
    ap.add_argument("--jobs", type=int, default=2,
                    help="chapters executed at a time (default 2: one per core)")
    args = ap.parse_args()
    paths = [p.resolve() for p in args.paths] or booktools.chapter_paths()
    todo = []
    for p in paths:
        if not p.exists():
            raise SystemExit(f"no such chapter: {p}")
        if args.stale_only and not booktools.problems(booktools.load(p), args.profile):
            print(f"{p.name}: fresh, skipped", flush=True)
            continue
        todo.append(p)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # before any kernel starts
    os.environ["SGDRANK_PROFILE"] = args.profile

    def one(p: Path) -> None:
        print(f"{p.name}: executing in profile {args.profile} ...", flush=True)
        secs = run(p, args.profile, args.kernel)
        print(f"{p.name}: done in {secs:.0f} s", flush=True)

    todo.sort(key=last_seconds, reverse=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for f in [pool.submit(one, p) for p in todo]:
            f.result()
    import claims
    import synthesis

    synthesis.PAGE.write_text(synthesis.render(synthesis.collect()), encoding="utf-8")
    print(f"synthesis page rewritten: {synthesis.PAGE.name}", flush=True)
    try:
        text = claims.render(claims.collect())
    except claims.ClaimsError as e:  # the tests fail on it; the executed chapters stay written
        print(f"claims page NOT rewritten: {e}", flush=True)
        return
    claims.PAGE.write_text(text, encoding="utf-8")
    print(f"claims page rewritten: {claims.PAGE.name}", flush=True)


if __name__ == "__main__":
    main()
