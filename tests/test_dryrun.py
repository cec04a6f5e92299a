"""The dry run of the paper profile (tools/dryrun.py): its data files, its one patch, its error
reports, and (marked slow; tools/test.sh runs it as its own stage) every chapter's dry run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import booktools
import dryrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("dryrun")
    return base, dryrun.prepare(base)


def _python(code: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_environment_names_paper_dry_run_and_temporary_folders(prepared):
    base, env = prepared
    assert env["SGDRANK_PROFILE"] == "paper" and env["SGDRANK_DRYRUN"] == "1"
    assert env["SGDRANK_OFFLINE"] == "1" and env["SGDRANK_EXECUTOR"] == "local"
    assert env["SGDRANK_DEVICE"] == "cpu"  # gpu and paper profiles default to CUDA
    assert int(env["SGDRANK_CHUNK"]) < 2**27  # Chapter 5 runs its chunk loops
    for key in ("SGDRANK_DATA", "SGDRANK_RESULTS"):
        assert Path(env[key]).is_relative_to(base)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(base / "site")


LOAD_ALL = """
import json
from sgdrank import data
out = {}
for name, kw in [("mnist", {}), ("cifar10", {}), ("california", dict(n_train=1800, n_test=600))]:
    d = data.load_dataset(name, download=False, **kw)
    out[name] = [d.n_train, d.n_test, list(d.input_shape), int(d.y_train.unique().numel())]
print(json.dumps(out))
"""


def test_real_format_files_load_at_the_paper_sizes(prepared):
    _, env = prepared
    r = _python(LOAD_ALL, env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    n, t = dryrun.N_TRAIN, dryrun.N_TEST
    assert got["mnist"] == [n, t, [1, 28, 28], 10]
    assert got["cifar10"][:3] == [5 * -(-n // 5), t, [3, 32, 32]] and got["cifar10"][3] == 10
    assert got["california"][:3] == [1800, 600, [8]]
    assert n >= 512  # Chapter 4's paper profile measures noise at B = 512


def test_sitecustomize_changes_only_the_cifar_md5_check(prepared):
    _, env = prepared
    # lazily: torchvision is not imported at start-up
    r = _python("import sys; print('torchvision' in sys.modules)", env)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    probe = ("import torchvision.datasets.cifar as c, torchvision.datasets.utils as u, inspect\n"
             "print(c.check_integrity.__module__, u.check_integrity.__module__)")
    r = _python(probe, env)
    assert r.stdout.split() == ["sitecustomize", "torchvision.datasets.utils"], r.stderr
    # without the dry run's PYTHONPATH the same small files fail torchvision's md5 check
    plain = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    r = _python("from sgdrank import data; data.load_dataset('cifar10', download=False)",
                {**plain, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert r.returncode != 0 and "corrupted" in r.stderr


def _notebook(path: Path, cells: list[str]) -> Path:
    nb = {"cells": [], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                   "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    for i, src in enumerate(cells):
        meta = {"tags": ["parameters"]} if i == 0 else {}
        nb["cells"].append({"cell_type": "code", "id": f"c{i}", "metadata": meta,
                            "source": src, "outputs": [], "execution_count": None})
    path.write_text(json.dumps(nb))
    return path


def test_a_failing_chapter_is_named_with_its_cell(tmp_path, capsys):
    ok = _notebook(tmp_path / "98_fine.ipynb", [
        "profile = None",
        "import os\nassert profile in ('paper', 'gpu') and os.environ['SGDRANK_DRYRUN'] == '1'\n"
        "assert os.environ['SGDRANK_EXECUTOR'] == 'local'"])
    bad = _notebook(tmp_path / "99_broken.ipynb", [
        "profile = None", "x = 1",
        "values = [] if profile == 'gpu' else [1]\nprint(max(values))  # an empty selection"])
    before = bad.read_text()
    code = dryrun.main([str(ok), str(bad), "--keep", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 1
    assert "98_fine.ipynb [paper]: ok" in out and "98_fine.ipynb [gpu]: ok" in out
    assert "99_broken.ipynb [paper]: ok" in out  # only the gpu profile's run breaks
    assert "FAILED 99_broken.ipynb [gpu]" in out and "id c2" in out and "ValueError" in out
    assert "3 of 4 chapter runs ran" in out
    assert bad.read_text() == before  # the chapter itself is never written
    assert (tmp_path / "work" / "executed" / "gpu" / "99_broken.ipynb").is_file()
    assert os.environ.get("SGDRANK_DRYRUN") != "1"  # the caller's environment is restored


# Chapters left out of this stage, with the reason (none at present). Chapter 4 was, until its
# E6 analysis (weightnorm.run_rows: 30 sharpness power iterations whatever the run's length)
# got a dry-run setting, e6_sharp_iters (tests/test_weightnorm.py).
DRY_SKIP = {}


#: the profile the test stage dry-runs: the one a reader runs on Colab (a chapter whose gpu
#: profile is its paper profile runs that). Both profiles: ``make dryrun`` (about 3x longer: the
#: paper profiles' full-width grids on one CPU core each)
CI_PROFILES = ("gpu",)


def _dry(tmp_path, capsys, paths, profiles=CI_PROFILES):
    code = dryrun.main([str(p) for p in paths] + ["--keep", str(tmp_path / "work"),
                                                  "--profiles", *profiles])
    out = capsys.readouterr().out
    print(out)
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert code == 0 and not failed, "\n".join(failed)
    ran = json.loads((tmp_path / "work" / "dryrun.json").read_text())
    assert [(r["chapter"], r["profile"]) for r in ran] == [
        (p.name, prof) for p in paths for prof in profiles
        if prof == "paper" or "paper" not in profiles or not dryrun.gpu_is_paper(p)]
    # every training chapter printed its cost record
    assert all(r["cost"] for r in ran if r["chapter"].startswith(("03", "04", "05", "06")))


@pytest.mark.slow
def test_every_chapter_runs_its_gpu_profile_in_miniature(tmp_path, capsys):
    _dry(tmp_path, capsys, [p for p in booktools.chapter_paths() if p.name not in DRY_SKIP])


SETTINGS = '''
from sgdrank import cost, profiles
TABLE = {"smoke": {"runs": 2}, "book": {"runs": 2}, "gpu": {"runs": 20}, "paper": {"runs": 200},
         "dry": {"runs": 1}}
P = profiles.select(TABLE, profile)
'''
COST = '''
def plan(S):
    return {"main": [cost.Work("w", runs=S.runs, k=1, steps=10, step_flops=1e6,
                               probe=lambda n: 1e-4)]}
cost.show_profiles(plan, TABLE, P)
'''


def test_a_gpu_profile_that_is_the_paper_profile_runs_once(tmp_path):
    alias = _notebook(tmp_path / "95_alias.ipynb", [
        "profile = None", "from sgdrank import profiles\nP = profiles.select({'smoke': {}, "
        "'book': {}, 'paper': {}, 'gpu': 'paper', 'dry': {}}, profile)"])
    own = _notebook(tmp_path / "94_own.ipynb", [
        "profile = None", "from sgdrank import profiles\nP = profiles.select({'smoke': {}, "
        "'book': {}, 'paper': {}, 'gpu': {}, 'dry': {}}, profile)"])
    assert dryrun.gpu_is_paper(alias) and not dryrun.gpu_is_paper(own)
    assert dryrun.gpu_is_paper(booktools.ROOT / "chapters" / "01_rank_one_gradients.ipynb")
    dryrun.dry_run([alias, own], tmp_path / "work", log=lambda *a: None,
                   profiles=("paper", "gpu"))
    ran = json.loads((tmp_path / "work" / "dryrun.json").read_text())
    assert [(r["chapter"], r["profile"], r["error"]) for r in ran] == [
        ("95_alias.ipynb", "paper", None), ("94_own.ipynb", "paper", None),
        ("94_own.ipynb", "gpu", None)]


def test_chapter_cost_runs_the_settings_and_cost_cells_only(tmp_path, capsys, monkeypatch):
    import chapter_cost

    monkeypatch.delenv("SGDRANK_DRYRUN", raising=False)
    nb = _notebook(tmp_path / "97_cost.ipynb", [
        "profile = None", SETTINGS, COST, "raise RuntimeError('training: never reached')"])
    nb_json = json.loads(nb.read_text())
    nb_json["cells"].insert(0, {"cell_type": "code", "id": "inst", "metadata": {}, "outputs": [],
                                "execution_count": None,
                                "source": f"raise SystemExit('{booktools.REPO_URL}')"})
    nb.write_text(json.dumps(nb_json))
    rec = chapter_cost.run(nb, "book")
    out = capsys.readouterr().out
    assert rec["this"]["profile"] == "book" and rec["gpu"]["runs"] == 20
    assert rec["paper"]["runs"] == 200 and "| `paper` | 200 |" in out
    no_block = _notebook(tmp_path / "96_none.ipynb", ["profile = None", SETTINGS])
    with pytest.raises(ValueError, match="no cost block"):
        chapter_cost.run(no_block, "book")
