"""Sweeps as jobs through submitit's local executor: real processes, real pickling; a job killed
mid-run (deterministically: an exception after an epoch's checkpoint) resumes from its
checkpoint with nothing lost or trained twice; a failed job is reported
with its logs; executor settings are read from the environment with clear errors."""
import json

import pytest
import torch

from sgdrank import cache as cache_mod
from sgdrank import dispatch, sweep

pytest.importorskip("submitit")
BASE = sweep.Config(model="MLP-BN-3-32", dataset="fashion-mnist", n_train=512, n_test=256,
                    batch_size=32, lr=0.1, lam=1e-3, epochs=5)


EPOCHS_LONG = 30
KILL_AT = 7


def _final(res):
    return res.runs[["final_test_loss", "final_train_loss"]].to_numpy()


def test_executor_from_env(tmp_path):
    assert dispatch.executor_from_env({}).kind == "inprocess"
    cfg = tmp_path / "slurm.json"
    cfg.write_text(json.dumps({"folder": str(tmp_path / "logs"), "slurm_partition": "gpu",
                               "gpus_per_node": 1, "timeout_min": 60}))
    env = {"SGDRANK_EXECUTOR": "Slurm", "SGDRANK_EXECUTOR_CONFIG": str(cfg)}
    spec = dispatch.executor_from_env(env)
    assert spec.kind == "slurm" and spec.folder == tmp_path / "logs"
    assert dict(spec.params) == {"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 60}
    with pytest.raises(ValueError, match="unknown SGDRANK_EXECUTOR='pbs'"):
        dispatch.executor_from_env({"SGDRANK_EXECUTOR": "pbs"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dispatch.executor_from_env({"SGDRANK_EXECUTOR": "local",
                                    "SGDRANK_EXECUTOR_CONFIG": str(tmp_path / "none.json")})


def test_groups_follow_the_engine_grouping():
    cfgs = sweep.grid(BASE, seed=[0, 1], batch_size=[32, 64])
    gs = dispatch.groups(cfgs)
    assert [len(g) for g in gs] == [2, 2] and {g[0].batch_size for g in gs} == {32, 64}
    assert all(len({c.group_key() for c in g}) == 1 for g in gs)


class Killed(RuntimeError):
    """Stands for the signal that ends a job mid-run (preemption, a lost runtime)."""


def test_jobs_equal_in_process_and_resume_after_a_kill(tmp_path):
    cfgs = sweep.grid(sweep.replace(BASE, epochs=EPOCHS_LONG), seed=[0, 1])
    cfgs += [sweep.replace(BASE, batch_size=64)]
    spec = dispatch.ExecutorSpec("local", tmp_path / "jobs")
    cache = tmp_path / "cache"
    long_group = cfgs[:2]

    # the long group dies after epoch KILL_AT, deterministically: the checkpoint of that epoch is
    # written before on_epoch is called (a timed SIGINT raced the training and failed both ways:
    # on a loaded machine the group ended before the poll saw its checkpoint, and in fresh clones
    # it finished before the signal took effect)
    def die(epoch, _alive):
        if epoch == KILL_AT:
            raise Killed(f"killed after epoch {epoch}")

    with pytest.raises(Killed):
        sweep.run(long_group, cache=cache, progress=False, checkpoint_every=0, on_epoch=die)
    ckpt = cache_mod.checkpoint_path(cache, [sweep.run_key(c) for c in long_group])
    assert ckpt.exists()
    assert not [p for p in cache.glob("*.pt") if not p.name.startswith("_partial_")]
    # as jobs: both groups are submitted; the killed one resumes from its checkpoint
    jobs = dispatch.submit(cfgs, cache, spec, checkpoint_every=0)
    assert sorted(len(j.group) for j in jobs) == [1, 2]
    counts = {len(j.group): c for j, c in zip(jobs, dispatch.wait(jobs, progress=False))}
    assert counts[2]["runs"] == 2 and counts[2]["trained"] == 2
    assert counts[2]["run_epochs"] == 2 * (EPOCHS_LONG - KILL_AT), counts  # resumed: the rest
    assert not ckpt.exists()  # a finished group removes its checkpoint
    again = dispatch.submit(cfgs, cache, spec, checkpoint_every=0)
    assert again == []  # everything cached: nothing to submit
    res = dispatch.run(cfgs, cache, spec=spec)  # no job, the cached results
    torch.set_num_threads(1)
    ref = sweep.run(cfgs, cache=tmp_path / "inprocess", progress=False)
    assert _final(res) == pytest.approx(_final(ref), rel=1e-5, abs=1e-6)


def test_a_failed_job_names_its_logs(tmp_path):
    bad = sweep.replace(BASE, dataset="digits", n_train=100000)  # too many samples: job fails
    spec = dispatch.ExecutorSpec("local", tmp_path / "jobs")
    msg = r"(?s)failed: .*n_train=100000.*logs: .*\.out and .*\.err"
    with pytest.raises(dispatch.JobFailed, match=msg):
        dispatch.run([bad], tmp_path / "cache", spec=spec, progress=False)


def test_local_jobs_get_a_long_time_limit_unless_configured(tmp_path):
    ex = dispatch.ExecutorSpec("local", tmp_path / "jobs").make()
    assert ex._executor.parameters["timeout_min"] == dispatch.LOCAL_TIMEOUT_MIN
    short = dispatch.ExecutorSpec("local", tmp_path / "jobs", (("timeout_min", 3),)).make()
    assert short._executor.parameters["timeout_min"] == 3


def test_loop_groups_split_into_jobs_that_fit_a_time_limit(tmp_path, monkeypatch):
    conv = sweep.grid(sweep.replace(BASE, model="CONV-2-4", epochs=1), seed=range(15))
    mlp = sweep.grid(BASE, seed=range(15))
    # a batched group is never split (its runs share every step); a loop group is, balanced
    jobs = dispatch.plan_jobs(conv + mlp, runs_per_job=6)
    assert sorted(len(j) for j in jobs) == [5, 5, 5, 15]
    assert dispatch.plan_jobs(conv + mlp) == dispatch.groups(conv + mlp)
    # job_minutes: as many runs as the cost estimate puts within 80% of the limit
    from sgdrank import cost

    class Est:
        runs, cached, seconds = 15, 0, 15 * 60.0  # one minute per run

    monkeypatch.setattr(cost, "estimate", lambda *a, **k: Est())
    jobs = dispatch.plan_jobs(conv, job_minutes=4)  # 3.2 minutes: 3 runs per job
    assert [len(j) for j in jobs] == [3] * 5
    # finished runs of a loop group are not submitted again
    sweep.run(conv[:2], cache=tmp_path, progress=False, device="cpu")
    left = dispatch.plan_jobs(conv, tmp_path, runs_per_job=20)
    assert [len(j) for j in left] == [13]
    assert dispatch._job_devices(dispatch.ExecutorSpec("slurm"), "cuda", 2) == ["cuda", "cuda"]
