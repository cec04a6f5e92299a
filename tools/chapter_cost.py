"""A chapter's cost block alone: its settings and cost cells, in a profile, on this device.

    python tools/chapter_cost.py chapters/03_rank_sweeps.ipynb [--profile gpu]

Executes, in one fresh namespace, the chapter's code cells from the top down to the cell that
calls ``cost.show_profiles`` (the install cell is skipped, the parameters cell is replaced by
``profile = "<profile>"``) and prints what that block shows: the estimate of this profile's run
on this device, with its timed probe, and the spec-sheet model's table of the gpu and paper
profiles. Nothing trains. ``benchmarks/gpu_check.sh`` runs it for every training chapter in the
gpu profile on a GPU: the probe then times the chapter's own groups on that GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import booktools  # noqa: E402

MARK = "cost.show_profiles("


def cost_cells(nb: dict) -> list[str]:
    """Sources of the code cells up to the cost block (install cell dropped, parameters cell
    left out: the caller sets ``profile``). Raises when the chapter has no cost block."""
    code = booktools.code_cells(nb)
    srcs = ["".join(c["source"]) for c in code]
    end = next((i for i, s in enumerate(srcs) if MARK in s), None)
    if end is None:
        raise ValueError("this chapter has no cost block (no cell calls cost.show_profiles)")
    keep = []
    for c, s in zip(code[:end + 1], srcs[:end + 1]):
        if booktools.REPO_URL in s or "parameters" in c["metadata"].get("tags", []):
            continue
        keep.append(s)
    return keep


def run(path: Path, profile: str) -> dict:
    """Execute ``path``'s settings and cost cells in ``profile``; print the block and return
    the cost record it stored."""
    import IPython.display as disp

    shown: list = []

    def display(*objs, raw=False, **kw):
        for o in objs:
            shown.append(o)
            if isinstance(o, dict):
                print(o.get("text/markdown") or o.get("text/plain", ""))
            elif hasattr(o, "_repr_markdown_"):
                print(o._repr_markdown_())
            else:
                print(repr(o))

    saved = disp.display
    disp.display = display
    ns: dict = {"profile": profile, "__name__": "__chapter__"}
    t0 = time.perf_counter()
    try:
        for src in cost_cells(json.loads(path.read_text(encoding="utf-8"))):
            exec(compile(src, f"<{path.name}>", "exec"), ns)
    finally:
        disp.display = saved
    print(f"\n({path.name}, profile {profile}: {time.perf_counter() - t0:.1f} s)")
    recs = [json.loads(o["application/vnd.sgdrank.cost+json"]) for o in shown
            if isinstance(o, dict) and "application/vnd.sgdrank.cost+json" in o]
    if not recs:
        raise RuntimeError(f"{path.name}: the cost block stored no record")
    return recs[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--profile", default=os.environ.get("SGDRANK_PROFILE") or "gpu",
                    choices=["smoke", "book", "gpu", "paper"])
    args = ap.parse_args(argv)
    for p in args.paths:
        print(f"## {p.name} ({args.profile} profile)\n")
        run(p, args.profile)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
