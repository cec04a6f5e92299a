#!/usr/bin/env bash
# The test command (README, .ci/run): unit tests, freshness of the committed notebooks, every
# chapter executed in the smoke profile with nbval checking the marked outputs, the web book
# built with warnings as errors, then a headless-Chromium check of every page and a
# Colab-alone run of every chapter. Assumes tools/setup.sh has run (make test does that).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export SGDRANK_OFFLINE=1 SGDRANK_PROGRESS=summary PYTHONHASHSEED=0
export SGDRANK_DATA="${SGDRANK_DATA:-$PWD/.cache/data}" SGDRANK_RESULTS="${SGDRANK_RESULTS:-$PWD/.cache/results-smoke}"
t0=$SECONDS
echo "== 1/3 unit tests, notebook freshness, smoke execution of every chapter with nbval =="
SGDRANK_PROFILE=smoke python -m pytest -q -p no:cacheprovider --nbval-lax -m "not slow" tests chapters
echo "== 2/3 web book (jupyter-book build -W -n) =="
rm -rf _build/html
jupyter-book build . -W -n --keep-going -q
echo "== 3/3 built pages in headless Chromium; each chapter alone in a fresh environment =="
python -m pytest -q -p no:cacheprovider -m slow tests
echo "tests finished in $((SECONDS - t0)) s"
