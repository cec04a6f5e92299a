#!/usr/bin/env bash
# One-time (idempotent) setup on a fresh Debian machine: system packages, the pinned virtual
# environment with the library installed editable, and MathJax for offline math.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
# lib/sgdrank/__init__.py holds __version__, which the editable install's metadata reads
want=$(cat requirements.txt pyproject.toml lib/sgdrank/__init__.py | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv from requirements.txt (a few minutes the first time)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

MATHJAX_VERSION=3.2.2
if [ ! -f _extra/mathjax/tex-chtml.js ]; then
  echo "setup: installing MathJax $MATHJAX_VERSION from npm for offline math"
  mkdir -p .cache/npm
  npm install --silent --no-audit --no-fund --prefix .cache/npm "mathjax@$MATHJAX_VERSION" >/dev/null 2>&1
  rm -rf _extra/mathjax && mkdir -p _extra
  cp -r .cache/npm/node_modules/mathjax/es5 _extra/mathjax
fi
echo "setup: ok"
