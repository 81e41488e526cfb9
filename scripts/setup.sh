#!/usr/bin/env bash
# Install topofx and everything its main job and tests need, on a fresh Python 3.11 machine.
# torch is pinned to the CPU build (an open range may pull a multi-GB CUDA build); xautodl 1.0.0
# pins an ancient numpy, so it is installed without its dependencies (it only needs torch + pyyaml).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
$PIP torch==2.13.0
$PIP -e ".[dev]"
$PIP --no-deps xautodl==1.0.0
if ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq graphviz >/dev/null) || echo "note: could not install Graphviz 'dot'; pictures will be written as .dot files only"
  fi
fi
