"""Run a sweep's groups as jobs: on a Slurm cluster, or as separate local processes, through
`submitit <https://github.com/facebookincubator/submitit>`_.

A *group* is the set of configurations that :func:`sgdrank.sweep.run` trains as one batched
computation (equal :meth:`sweep.Config.group_key`: same architecture, data, batch size, epochs).
:func:`run` submits one job per group that is not finished in the on-disk cache; each job calls
``sweep.run(group, cache=<folder>)``, which writes every finished run to the cache with an atomic
rename and checkpoints an unfinished group every ``checkpoint_every`` seconds. The caller waits
with a progress bar over jobs and then reads the results from the cache. So:

- a job that was killed or pre-empted loses at most the epochs since its last checkpoint: calling
  :func:`run` again submits a job for that group only, and it resumes from the checkpoint; runs
  that had finished are loaded, not trained again;
- a job that fails raises :class:`JobFailed`, naming the job, its group and its log files.

Which executor (:func:`executor_from_env`): ``SGDRANK_EXECUTOR`` = ``inprocess`` (default:
no jobs, plain ``sweep.run``), ``local`` (submitit's local executor: one process per job on this
machine) or ``slurm``; ``SGDRANK_EXECUTOR_CONFIG`` names a JSON file of submitit parameters,
e.g. ``{"folder": "/scratch/me/sgdrank-jobs", "slurm_partition": "gpu", "gpus_per_node": 1,
"cpus_per_task": 8, "mem_gb": 32, "timeout_min": 240, "slurm_array_parallelism": 16}``
(``folder``: where job logs go; default ``$SGDRANK_RESULTS/_jobs``). The cache folder and the
data folder (``SGDRANK_DATA``) must be on a file system that the jobs see. The groups of one
call are submitted together, as one job array on Slurm, so ``slurm_array_parallelism`` caps how
many run at once. The local executor starts every job at once, one process each (give each
few threads: ``OMP_NUM_THREADS``), and kills a job after ``timeout_min`` (submitit's default is
2 minutes; here :data:`LOCAL_TIMEOUT_MIN` unless the config sets it).

Jobs and time limits: a group of runs that the loop engine trains one after another (VGG,
ResNet, ViT, CONV) can be split across jobs (``runs_per_job``, or ``job_minutes``: the number of
runs per job that :mod:`sgdrank.cost` estimates to fit 80% of the limit, measured by a probe on
this machine's ``probe_device``). A batched group is not split (its runs share every step, so a
smaller chunk takes as long); a job that outlives its limit loses at most ``checkpoint_every``
seconds, and calling :func:`run` again resumes it. Every run of either engine checkpoints.

Devices: ``device`` (default ``$SGDRANK_DEVICE`` in the job, else the CPU; see
:func:`sgdrank.sweep.resolve_device`) is passed to every job; with the local executor and
``device="cuda"`` on a machine with several GPUs, job ``i`` trains on ``cuda:(i mod n)``.

submitit is imported only when jobs are used (``pip install submitit``; it is pinned in the
project's requirements.txt, and an optional extra ``sgdrank[cluster]``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import cache as _cache
from . import runtime, sweep

EXECUTORS = ("inprocess", "local", "slurm")
ENV_EXECUTOR = "SGDRANK_EXECUTOR"
ENV_CONFIG = "SGDRANK_EXECUTOR_CONFIG"
LOCAL_TIMEOUT_MIN = 24 * 60  # local jobs: a day unless the config says otherwise


class JobFailed(RuntimeError):
    """A job of :func:`run` failed; the message names its group and log files."""


@dataclass(frozen=True)
class ExecutorSpec:
    """Which executor and its submitit parameters (see the module docstring)."""

    kind: str = "inprocess"
    folder: Path | None = None
    params: tuple = ()  # sorted (name, value) pairs passed to update_parameters

    def make(self):
        """The submitit executor (None for ``inprocess``)."""
        if self.kind == "inprocess":
            return None
        try:
            import submitit
        except ImportError as err:
            raise ImportError(f"{ENV_EXECUTOR}={self.kind} needs submitit: pip install submitit "
                              f"(or pip install 'sgdrank[cluster]')") from err
        folder = self.folder or runtime.results_dir("_jobs")
        ex = submitit.AutoExecutor(folder=str(folder), cluster=self.kind)
        params = dict(self.params)
        if self.kind == "local":  # submitit kills a local job after 2 minutes by default
            params.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)
        if params:
            ex.update_parameters(**params)
        return ex


def executor_from_env(environ: dict | None = None) -> ExecutorSpec:
    """Read ``SGDRANK_EXECUTOR`` and ``SGDRANK_EXECUTOR_CONFIG`` (see the module docstring)."""
    env = os.environ if environ is None else environ
    kind = (env.get(ENV_EXECUTOR) or "inprocess").strip().lower()
    if kind not in EXECUTORS:
        raise ValueError(f"unknown {ENV_EXECUTOR}={kind!r}: use one of {', '.join(EXECUTORS)}")
    params: dict[str, Any] = {}
    folder = None
    path = env.get(ENV_CONFIG)
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{ENV_CONFIG}={path!r} does not exist: write a JSON file of "
                                    f"submitit parameters there, or unset the variable")
        params = json.loads(p.read_text())
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected a JSON object of submitit parameters")
        folder = params.pop("folder", None)
    return ExecutorSpec(kind, Path(folder) if folder else None, tuple(sorted(params.items())))


def groups(configs: Iterable[sweep.Config]) -> list[list[sweep.Config]]:
    """The configurations split into sweep groups (equal ``group_key``), in first-seen order."""
    out: dict[tuple, list[sweep.Config]] = {}
    for c in configs:
        out.setdefault(c.group_key(), []).append(c)
    return list(out.values())


def train_group(configs: list[dict], folder: str, checkpoint_every: float,
                device: str | None = None) -> dict:
    """The body of one job: train one group into the cache ``folder``. Takes plain dicts (so
    the pickle holds no tensors) and returns counts: runs in the group, runs trained (not loaded
    from the cache), epochs trained in this job. ``device``: see :func:`sweep.resolve_device`."""
    cfgs = [sweep.Config.from_dict(d) for d in configs]
    epochs = [0]
    res = sweep.run(cfgs, cache=Path(folder), progress=False, checkpoint_every=checkpoint_every,
                    device=device,
                    on_epoch=lambda e, batch: epochs.__setitem__(0, epochs[0] + len(batch)))
    return {"runs": len(cfgs), "trained": res.n_trained, "run_epochs": epochs[0]}


def _cached(cfg: sweep.Config, folder: Path) -> bool:
    return (folder / f"{sweep.run_key(cfg)}.pt").exists()


def _loop_group(g: list[sweep.Config]) -> bool:
    from .batched import Arch, supported

    c0 = g[0]  # supported() reads the model family and activation only
    return not supported(Arch(c0.model, (1,), 1, c0.bias, c0.detach_var, c0.activation))


def plan_jobs(configs: Iterable[sweep.Config], folder: Path | None = None, *,
              runs_per_job: int | None = None, job_minutes: float | None = None,
              probe_device: str | None = None) -> list[list[sweep.Config]]:
    """The jobs of a sweep: one per group with a run missing from ``folder``, a loop-engine
    group split into balanced jobs of at most ``runs_per_job`` runs, or of as many runs as
    :func:`sgdrank.cost.estimate` (probed on ``probe_device``) puts within 80% of
    ``job_minutes`` (see the module docstring)."""
    jobs = []
    for g in groups(configs):
        if folder is not None and all(_cached(c, folder) for c in g):
            continue
        n = len(g)
        if (runs_per_job or job_minutes) and _loop_group(g):
            if folder is not None:  # runs trained one at a time: only the missing ones
                g = [c for c in g if not _cached(c, folder)]
                n = len(g)
            if runs_per_job:
                n = int(runs_per_job)
            if job_minutes:
                from . import cost

                est = cost.estimate(g, device=probe_device, check=False)
                per_run = est.seconds / max(1, est.runs - est.cached)
                n = min(n, max(1, int(0.8 * 60 * job_minutes // max(per_run, 1e-9))))
        jobs.extend(sweep.split_group(g, max(1, n)))
    return jobs


def _job_devices(spec: ExecutorSpec, device: str | None, n: int) -> list[str | None]:
    if spec.kind == "local" and device in ("cuda", "auto"):
        import torch

        k = torch.cuda.device_count()
        if k > 1:
            return [f"cuda:{i % k}" for i in range(n)]
    return [device] * n


def submit(configs: Iterable[sweep.Config], cache: str | Path, spec: ExecutorSpec, *,
           checkpoint_every: float = 60.0, device: str | None = None,
           runs_per_job: int | None = None, job_minutes: float | None = None) -> list:
    """Submit the jobs of :func:`plan_jobs` (one per group of ``configs`` that has a run missing
    from ``cache``, loop-engine groups split to fit a job's time); returns the submitit jobs
    (each with ``.group``, its configs, attached)."""
    folder = _cache.folder(cache)
    if folder is None:
        raise ValueError("jobs need an on-disk cache: pass cache='<chapter name>' or a folder")
    ex = spec.make()
    if ex is None:
        raise ValueError("submit() needs a job executor (SGDRANK_EXECUTOR=local or slurm)")
    todo = plan_jobs(configs, folder, runs_per_job=runs_per_job, job_minutes=job_minutes,
                     probe_device=device if device not in (None, "auto") else None)
    if not todo:
        return []
    devices = _job_devices(spec, device, len(todo))
    with ex.batch():  # one submission: a job array on Slurm (slurm_array_parallelism applies)
        jobs = [ex.submit(train_group, [c.to_dict() for c in g], str(folder.resolve()),
                          checkpoint_every, dev) for g, dev in zip(todo, devices)]
    for job, g in zip(jobs, todo):
        job.group = g
    return jobs


def wait(jobs: list, *, poll: float = 1.0, progress: bool = True) -> list[dict]:
    """Wait for ``jobs`` (progress over jobs); returns their results, raises :class:`JobFailed`
    for the first that failed, with its log files."""
    from .progress import counter

    bar = counter(total=len(jobs), desc="jobs", unit="job") if progress and jobs else None
    left = list(range(len(jobs)))
    try:
        while left:
            done = [i for i in left if jobs[i].done()]
            for i in done:
                left.remove(i)
                if bar is not None:
                    bar.update(1)
            if left:
                time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()
    out = []
    for job in jobs:
        try:
            out.append(job.result())
        except Exception as err:  # submitit raises FailedJobError / UncompletedJobError
            c0 = job.group[0]
            raise JobFailed(
                f"job {job.job_id} ({len(job.group)} runs of {c0.model}, B={c0.batch_size}) "
                f"failed: {type(err).__name__}: {str(err)[-800:]}\n  logs: {job.paths.stdout} "
                f"and {job.paths.stderr}\n  calling the sweep again resumes from its checkpoint"
            ) from err
    return out


def run(configs: sweep.Config | Iterable[sweep.Config], cache: str | Path, *,
        spec: ExecutorSpec | None = None, progress: bool = True, checkpoint_every: float = 60.0,
        poll: float = 1.0, device: str | None = None, runs_per_job: int | None = None,
        job_minutes: float | None = None, **inprocess_kw) -> sweep.Result:
    """``sweep.run(configs, cache)``, with the groups trained as jobs when ``spec`` (default:
    :func:`executor_from_env`) names an executor; in-process otherwise (``inprocess_kw`` go to
    ``sweep.run`` then). Returns the :class:`sweep.Result` read from the cache."""
    cfgs = [configs] if isinstance(configs, sweep.Config) else list(configs)
    spec = executor_from_env() if spec is None else spec
    if spec.kind == "inprocess":
        return sweep.run(cfgs, cache=cache, progress=progress, checkpoint_every=checkpoint_every,
                         device=device, **inprocess_kw)
    if inprocess_kw:
        raise ValueError(f"{sorted(inprocess_kw)} apply in-process only; jobs load data by name")
    wait(submit(cfgs, cache, spec, checkpoint_every=checkpoint_every, device=device,
                runs_per_job=runs_per_job, job_minutes=job_minutes), poll=poll,
         progress=progress)
    return sweep.load(cfgs, cache)
