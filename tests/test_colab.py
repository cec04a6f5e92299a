"""Each chapter runs alone, as on Colab: copied into an empty folder, executed (smoke profile)
in a fresh virtual environment where `sgdrank` is not installed, so that the chapter's first
cell installs it -- from this repository's committed HEAD, through SGDRANK_PIP_URL standing in
for the GitHub URL. The fresh environment sees the project's third-party packages (torch etc.,
as Colab preinstalls them) through a view of the project's site-packages with sgdrank left out."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

import booktools

pytestmark = pytest.mark.slow
CHAPTERS = booktools.chapter_paths()


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("colab")
    env = root / "env"
    base = getattr(sys, "_base_executable", None) or shutil.which("python3")
    subprocess.run([base, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    site = subprocess.run([str(py), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    project_site = sysconfig.get_paths()["purelib"]
    view = root / "site-view"
    view.mkdir()
    for entry in os.scandir(project_site):
        low = entry.name.lower()
        if "sgdrank" in low or low.startswith("__editable__") or low.endswith(".pth") \
                or low in {"pip", "setuptools", "_distutils_hack"} \
                or low.startswith(("pip-", "setuptools-")):
            continue
        (view / entry.name).symlink_to(entry.path)
    with open(os.path.join(site, "colab-preinstalled.pth"), "w") as f:
        f.write(str(view) + "\n")
    probe = ("import importlib.util as u; "
             "print(u.find_spec('sgdrank') is None, u.find_spec('torch') is not None)")
    r = subprocess.run([str(py), "-c", probe],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["True", "True"], \
        "the fresh environment must see torch but not sgdrank"
    kernels = root / "jupyter" / "kernels" / "alone"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(py), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh env", "language": "python"}))
    envvars = {k: v for k, v in os.environ.items()
               if not k.startswith(("VIRTUAL_ENV", "PYTHON", "JUPYTER"))}
    envvars.update({
        "PATH": f"{env / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "JUPYTER_PATH": str(root / "jupyter"),
        "SGDRANK_PIP_URL": f"git+file://{booktools.ROOT}",
        "SGDRANK_PROFILE": "smoke",
        "SGDRANK_PROGRESS": "summary",
        "SGDRANK_DATA": str(root / "data"),
        "SGDRANK_RESULTS": str(root / "results"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    })
    return {"root": root, "python": py, "env": envvars}


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_runs_alone(fresh_env, nb_path):
    alone = fresh_env["root"] / f"alone-{nb_path.stem}"
    alone.mkdir()
    shutil.copy(nb_path, alone / nb_path.name)
    out = alone / "executed.ipynb"
    r = subprocess.run(
        [str(fresh_env["python"]), "-m", "papermill", nb_path.name, str(out), "-k", "alone",
         "--cwd", str(alone), "--no-progress-bar"],
        cwd=alone, env=fresh_env["env"], capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, f"{nb_path.name} failed alone:\n{r.stderr[-4000:]}"
    where = subprocess.run([str(fresh_env["python"]), "-c",
                            "import sgdrank; print(sgdrank.__file__)"],
                           env=fresh_env["env"], capture_output=True, text=True, check=True).stdout
    assert str(fresh_env["root"] / "env") in where, \
        f"sgdrank was not installed into the fresh env: {where}"
    executed = booktools.load(out)
    stamped = {**executed, "metadata": {booktools.META_KEY: booktools.stamp(executed, "smoke")}}
    assert not booktools.problems(stamped, "smoke")
