# sgdrank: the book and its tests. `make book` and `make test` are the two commands of README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export SGDRANK_OFFLINE ?= 1
export SGDRANK_DATA ?= $(CURDIR)/.cache/data
export SGDRANK_RESULTS ?= $(CURDIR)/.cache/results
export PYTHONHASHSEED := 0
export SGDRANK_PROGRESS ?= summary
PY := $(CURDIR)/.venv/bin/python
# A second numeric configuration of the same machine (another OpenBLAS kernel, PyTorch's
# non-vectorised kernels, one thread): a checked output that depends on the CPU fails here.
NUMERIC_B := OPENBLAS_CORETYPE=Prescott ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

.PHONY: help setup book execute chapter claims html test unit smoke dryrun redecide clean lock

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' Makefile | sed 's/:.*## /\t/'

setup:  ## install system packages, the pinned .venv and MathJax (idempotent)
	bash tools/setup.sh

book: setup execute html  ## the main job: execute every chapter (book profile), build the HTML

execute:  ## execute every chapter in the book profile with papermill, in place
	$(PY) tools/run_chapters.py --profile book

chapter:  ## execute one chapter in the book profile: make chapter NB=chapters/01_....ipynb
	@test -n "$(NB)" || { echo "usage: make chapter NB=chapters/NN_name.ipynb"; exit 2; }
	$(PY) tools/run_chapters.py --profile book $(NB)

claims:  ## regenerate the claims and synthesis pages (claims.md, synthesis.md) from the chapters
	$(PY) tools/claims.py
	$(PY) tools/synthesis.py

html: claims  ## build the web book into _build/html (warnings are errors)
	rm -rf _build/html
	jupyter-book build . -W -n --keep-going

test: setup  ## the test command: unit tests, smoke nbval, book build, browser, freshness, Colab-alone
	bash tools/test.sh

unit:  ## library unit tests only
	$(PY) -m pytest -q tests -m "not slow"

smoke:  ## execute every chapter in the smoke profile and check marked outputs (nbval), twice
	SGDRANK_PROFILE=smoke $(PY) -m pytest -q --nbval-lax -p no:cacheprovider chapters
	$(NUMERIC_B) SGDRANK_PROFILE=smoke $(PY) -m pytest -q --nbval-lax -p no:cacheprovider chapters

redecide:  ## re-execute the chapters under a second numeric configuration; exit 1 if a verdict flips
	$(PY) tools/redecide.py

dryrun:  ## every chapter's paper and gpu profiles in miniature (SGDRANK_DRYRUN=1, local jobs)
	$(PY) tools/dryrun.py

.PHONY: release
release: html  ## a tagged edition: built HTML + executed notebooks in _build/release/sgdrank-<version>.tar.gz
	$(PY) tools/release.py

clean:  ## remove builds and caches (not the .venv)
	rm -rf _build .cache/results .pytest_cache

lock:  ## re-pin requirements.txt from the current .venv
	{ head -3 requirements.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^sgdrank'; } > requirements.lock.tmp && mv requirements.lock.tmp requirements.txt
