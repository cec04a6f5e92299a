"""Dry run of the paper and gpu profiles: every chapter executed top to bottom with its paper
settings, and again with its gpu settings, in miniature, through those profiles' own code paths;
and each chapter's cost estimate of the full profiles printed at the end.

    python tools/dryrun.py [chapters/NN_name.ipynb ...] [--keep DIR] [--cell-timeout S]
                           [--profiles paper gpu]
    make dryrun

What it does, in a fresh temporary folder (deleted afterwards unless ``--keep``):

1. writes small files in the real on-disk formats of the online datasets into a temporary
   ``SGDRANK_DATA`` (``tools/realformat.py``): CIFAR-10's python batches
   (``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``), MNIST's idx files
   (``MNIST/raw``) and California housing's ``scikit_learn_data/cal_housing_py3.pkz``;
   Fashion-MNIST comes from Debian's package as always;
2. sets ``SGDRANK_PROFILE=paper SGDRANK_DRYRUN=1 SGDRANK_OFFLINE=1 SGDRANK_DEVICE=cpu``, a
   temporary
   ``SGDRANK_RESULTS`` and ``SGDRANK_EXECUTOR=local`` (with a 30-minute job time limit in
   ``SGDRANK_EXECUTOR_CONFIG``; submitit's local default is 2 minutes), so that the sweeps that go
   through ``sgdrank.dispatch.run`` run as real submitit local jobs (separate processes, real
   pickling); ``OMP_NUM_THREADS=1``, since those jobs run side by side;
3. executes every chapter with papermill (``profile="paper"``, then ``"gpu"``) into the
   temporary folder -- the committed notebooks are never written -- and fails, naming the
   chapter, the profile and the failing cell, when a cell raises;
4. prints, per chapter, the cost record its settings block stored (``sgdrank.cost.show_profiles``:
   runs, steps, FLOPs, SVDs, and time and memory on a Colab T4 by the spec-sheet model of the
   *full* gpu and paper profiles).

With ``SGDRANK_DRYRUN=1`` each chapter's ``profiles.select`` applies the table's ``"dry"``
overrides on top of the paper (or gpu) settings: the same models (full widths), datasets, schedules,
losses, engines and lambda / batch-size grids, with one or two SGD steps per run and small data
(see ``sgdrank.profiles``).

The one thing changed in the code path: torchvision's CIFAR-10 loader checks the md5 sums of
the real files, which small files cannot pass. A ``sitecustomize.py`` on a ``PYTHONPATH`` that
only the dry run sets (so that it also applies in the notebook kernels and in the submitit job
processes) replaces ``torchvision.datasets.cifar.check_integrity`` by a check that the file
exists, when that module is first imported. Nothing else is patched.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import booktools  # noqa: E402
import realformat  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Sizes of the real-format files: enough that the paper profiles' largest batches (B = 512 in
# Chapter 4's noise measurement, 256 in Chapter 5) fit into the training sets, and that the
# California subset of WD2L (1,800 train + 600 test of an 80/20 split) exists.
N_TRAIN, N_TEST, N_CALIFORNIA = 600, 200, 3000

SITECUSTOMIZE = '''\
"""Written by tools/dryrun.py; on PYTHONPATH only during a dry run of the paper profile.

torchvision's CIFAR-10 loader verifies the md5 sums of the real files, which the small files of
the dry run cannot match: when torchvision.datasets.cifar is first imported, its check_integrity
is replaced by a check that the file exists. Nothing else is changed.
"""
import importlib.abc
import importlib.util
import os
import sys

_TARGET = "torchvision.datasets.cifar"


def _exists(fpath, md5=None):
    return os.path.isfile(fpath)


class _PatchCifarIntegrity(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.check_integrity = _exists

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchCifarIntegrity())

# chain to the interpreter's own sitecustomize (e.g. Debian's), which this file shadows
_here = os.path.dirname(os.path.abspath(__file__))
for _p in sys.path:
    _f = os.path.join(_p, "sitecustomize.py")
    if os.path.abspath(_p or ".") != _here and os.path.isfile(_f):
        with open(_f) as _fh:
            exec(compile(_fh.read(), _f, "exec"), {"__name__": "_sitecustomize_chained"})
        break
'''


class ChapterFailed(RuntimeError):
    """A chapter's dry run raised; the message names the chapter and the failing cell."""


@dataclass
class Outcome:
    chapter: str
    seconds: float
    error: str | None = None  # None: ran top to bottom
    profile: str = "paper"
    cost: dict | None = None  # the chapter's cost record (sgdrank.cost.show_profiles), if any


def estimates(nb_path: Path) -> dict | None:
    """The cost record an executed chapter stored under its settings (full gpu and paper
    profiles on the reference GPU, by model), or None."""
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    recs = booktools.mime_records(nb, "application/vnd.sgdrank.cost+json")
    return recs[0] if recs else None


def cost_lines(o: Outcome) -> list[str]:
    """``  gpu: 52 GPU-minutes on a Colab T4 by model, peak 3.1 GB (fits)`` per profile."""
    if not o.cost:
        return []
    out = []
    for name, r in o.cost.items():
        if name == "this":
            continue
        out.append(f"  {name}: {r['seconds'] / 60:,.0f} T4-minutes by model "
                   f"({r['runs']:,} runs, {r['steps']:,} steps, {r['flops']:.1e} FLOPs, "
                   f"{r['svds']:,} SVDs), peak {r['peak_device_bytes'] / 1e9:.2g} GB"
                   f"{'' if r['fits'] else ' -- DOES NOT FIT'}")
    return out


def prepare(base: Path) -> dict[str, str]:
    """Write the real-format data, the sitecustomize and the folders under ``base``; return the
    environment variables of the dry run."""
    data, results, site = base / "data", base / "results", base / "site"
    for d in (data, results, site):
        d.mkdir(parents=True, exist_ok=True)
    realformat.write_all(data, n_train=N_TRAIN, n_test=N_TEST, n_california=N_CALIFORNIA)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # submitit's local executor kills a job after timeout_min (default 2): give jobs room
    executor = base / "executor.json"
    executor.write_text(json.dumps({"folder": str(results / "_jobs"), "timeout_min": 30}))
    pythonpath = os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {
        "SGDRANK_PROFILE": "paper", "SGDRANK_DRYRUN": "1", "SGDRANK_OFFLINE": "1",
        "SGDRANK_DATA": str(data), "SGDRANK_RESULTS": str(results),
        "SGDRANK_EXECUTOR": "local", "SGDRANK_EXECUTOR_CONFIG": str(executor),
        "SGDRANK_PROGRESS": "summary", "PYTHONHASHSEED": "0", "PYTHONPATH": pythonpath,
        # the local jobs of a sweep run side by side: one thread each on a small CI machine
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        # the gpu and paper profiles train on CUDA by default (runtime.profile_device): here the
        # CPU, explicitly
        "SGDRANK_DEVICE": "cpu",
        # small chunks, so that Chapter 5's chunked evaluations and SVDs (twolayer.CHUNK) run
        # their loops on the dry run's small problems, as they do at the papers' sizes: at width
        # 32768, 2^22 elements cut the forwards into chunks of 128 images of one run, the SVDs
        # into one run each, the residuals into 4 and the per-sample factors into 4 (2^16 took
        # one image per chunk, reading all of W per image: 35 s more of Chapter 5's dry run)
        "SGDRANK_CHUNK": str(2**22),
    }


def failing_cell(nb_path: Path) -> str:
    """Describe the first cell with an error output of an executed notebook."""
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for k, c in enumerate(code):
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                first = "".join(c["source"]).strip().splitlines()[:1]
                return (f"code cell {k + 1} (id {c.get('id')}, {first[0][:70] if first else ''!r})"
                        f": {o.get('ename')}: {str(o.get('evalue'))[:600]}")
    return "no cell has an error output"


def execute(chapter: Path, out_dir: Path, cwd: Path, cell_timeout: int | None = None,
            profile: str = "paper") -> Outcome:
    """Execute ``chapter`` in ``profile`` (paper or gpu, shortened by the table's ``"dry"``
    entry) into ``out_dir`` (environment already set)."""
    import papermill as pm

    out = out_dir / chapter.name
    t0 = time.time()
    try:
        pm.execute_notebook(str(chapter), str(out), parameters={"profile": profile},
                            kernel_name="python3", cwd=str(cwd), progress_bar=False,
                            log_output=False, execution_timeout=cell_timeout)
    except pm.PapermillExecutionError as err:
        where = failing_cell(out) if out.exists() else f"cell {err.exec_count}"
        return Outcome(chapter.name, time.time() - t0, where, profile)
    except Exception as err:  # kernel died, timeout, bad notebook
        return Outcome(chapter.name, time.time() - t0, f"{type(err).__name__}: {err}"[:800],
                       profile)
    return Outcome(chapter.name, time.time() - t0, None, profile, estimates(out))


def work_first(chapter: Path, profile: str) -> tuple[float, float]:
    """The order key of the dry run (largest first): the modelled seconds of ``profile`` in the
    cost record of the committed chapter (the training chapters, whose dry runs are the long
    ones), then :func:`book_seconds`. (The committed book run's duration alone misorders: a
    chapter whose runs come from the cache is quick in the book and slow in the dry run.)"""
    rec = estimates(chapter) or {}
    return float(rec.get(profile, {}).get("seconds") or 0.0), book_seconds(chapter)


def book_seconds(chapter: Path) -> float:
    """How long the committed (book-profile) run of ``chapter`` took, from papermill's metadata
    (0 if unknown): the dry run starts the longest chapters first."""
    try:
        meta = json.loads(chapter.read_text(encoding="utf-8"))["metadata"]
        return float(meta.get("papermill", {}).get("duration") or 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


ALIAS = re.compile(r"""["']gpu["']\s*:\s*["']paper["']""")


def gpu_is_paper(chapter: Path) -> bool:
    """True when the chapter's settings table makes its gpu profile the paper profile
    (``"gpu": "paper"``): its gpu dry run would repeat the paper one, so it is left out."""
    nb = json.loads(chapter.read_text(encoding="utf-8"))
    return any("profiles.select(" in "".join(c["source"]) and ALIAS.search("".join(c["source"]))
               for c in booktools.code_cells(nb))


def dry_run(chapters: list[Path], base: Path, cell_timeout: int | None = None,
            log=print, jobs: int = 2, profiles=("paper", "gpu")) -> list[Outcome]:
    """Prepare ``base`` and execute ``chapters`` there in each of ``profiles``, ``jobs`` at a
    time (each in its own kernel); returns one :class:`Outcome` per chapter and profile, in the
    order of ``chapters`` (then ``profiles``). A chapter whose gpu profile names the paper
    profile (``"gpu": "paper"``, :func:`gpu_is_paper`) runs once, as paper."""
    env = prepare(base)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out_dir, cwd = base / "executed", base / "cwd"

    def one(task) -> Outcome:
        ch, prof = task
        log(f"{ch.name} [{prof}]: dry run ...")
        d = out_dir / prof
        d.mkdir(parents=True, exist_ok=True)
        o = execute(ch, d, cwd / f"{ch.stem}-{prof}", cell_timeout, prof)
        log(f"{ch.name} [{prof}]: {'ok' if o.error is None else 'FAILED'} in {o.seconds:.0f} s"
            + (f"\n  {o.error}" if o.error else ""))
        return o

    tasks = [(ch, prof) for ch in chapters for prof in profiles
             if not (prof == "gpu" and "paper" in profiles and gpu_is_paper(ch))]
    for ch, prof in tasks:
        (cwd / f"{ch.stem}-{prof}").mkdir(parents=True, exist_ok=True)
    try:
        # largest first (work_first), `jobs` at a time
        order = sorted(tasks, key=lambda t: work_first(*t), reverse=True)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            done = dict(zip(order, pool.map(one, order)))
        outcomes = [done[t] for t in tasks]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    (base / "dryrun.json").write_text(json.dumps(
        [o.__dict__ for o in outcomes], indent=1) + "\n")
    return outcomes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="chapters (default: every chapter)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (data, results, "
                    "executed notebooks, job logs)")
    ap.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell")
    ap.add_argument("--jobs", type=int, default=2, help="chapters executed at a time (default 2:"
                    " the chapters run one thread each, CI has 2 cores)")
    ap.add_argument("--profiles", nargs="+", default=["paper", "gpu"], choices=["paper", "gpu"],
                    help="the profiles to dry-run (default: both)")
    args = ap.parse_args(argv)
    chapters = [p.resolve() for p in args.paths] or booktools.chapter_paths()
    for p in chapters:
        if not p.is_file():
            raise SystemExit(f"no such chapter: {p}")
    t0 = time.time()
    if args.keep:
        base = args.keep.resolve()
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        outcomes = dry_run(chapters, base, args.cell_timeout, jobs=args.jobs,
                           profiles=args.profiles)
    else:
        with tempfile.TemporaryDirectory(prefix="sgdrank-dryrun-") as tmp:
            outcomes = dry_run(chapters, Path(tmp), args.cell_timeout, jobs=args.jobs,
                               profiles=args.profiles)
    failed = [o for o in outcomes if o.error]
    print("estimated cost of the full profiles (each chapter's settings block):")
    for o in outcomes:
        if o.cost and o.profile == args.profiles[0]:
            print(f"{o.chapter}:")
            print("\n".join(cost_lines(o)))
    times = ", ".join(f"{o.chapter[:2]} {o.profile} {o.seconds:.0f} s" for o in outcomes)
    print(f"dry run: {len(outcomes) - len(failed)} of {len(outcomes)} chapter runs ran "
          f"({times}; {time.time() - t0:.0f} s in all)")
    for o in failed:
        print(f"FAILED {o.chapter} [{o.profile}]: {o.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
