#!/usr/bin/env bash
# The test command (README, .ci/run): unit tests, freshness of the committed notebooks and of the
# claims page, every chapter executed in the smoke profile with nbval checking the marked outputs
# -- twice: with the machine's own numeric libraries, then under a second numeric configuration
# (another OpenBLAS kernel, PyTorch's non-vectorised CPU kernels, one thread), so that a checked
# output that depends on the CPU fails here and not on the next machine --, the web book built
# with warnings as errors, then a headless-Chromium check of every page and a Colab-alone run of
# every chapter, and last the dry run of every chapter's gpu profile (tools/dryrun.py). Assumes
# tools/setup.sh has run (make test does that).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export SGDRANK_OFFLINE=1 SGDRANK_PROGRESS=summary PYTHONHASHSEED=0
export SGDRANK_DATA="${SGDRANK_DATA:-$PWD/.cache/data}" SGDRANK_RESULTS="${SGDRANK_RESULTS:-$PWD/.cache/results-smoke}"
t0=$SECONDS
echo "== 0/5 ruff (pyproject.toml: line length 100) =="
ruff check lib tools tests benchmarks
echo "== 1/5 unit tests, notebook and claims-page freshness, smoke execution of every chapter with nbval =="
SGDRANK_PROFILE=smoke python -m pytest -q -p no:cacheprovider --nbval-lax -m "not slow" tests chapters
echo "== 2/5 nbval again under a second numeric configuration (OpenBLAS Prescott, ATEN default, 1 thread) =="
OPENBLAS_CORETYPE=Prescott ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  SGDRANK_PROFILE=smoke SGDRANK_RESULTS="$SGDRANK_RESULTS-numeric-b" \
  python -m pytest -q -p no:cacheprovider --nbval-lax chapters
echo "== 3/5 web book (jupyter-book build -W -n) =="
rm -rf _build/html
jupyter-book build . -W -n --keep-going -q
echo "== 4/5 built pages in headless Chromium; each chapter alone in a fresh environment =="
python -m pytest -q -p no:cacheprovider -m slow tests --ignore=tests/test_dryrun.py
echo "== 5/5 dry run: every chapter's gpu profile in miniature (tools/dryrun.py; both profiles: make dryrun) =="
python -m pytest -q -p no:cacheprovider -m slow tests/test_dryrun.py
echo "tests finished in $((SECONDS - t0)) s"
