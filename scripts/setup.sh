#!/usr/bin/env bash
# Idempotent set-up: .venv/ at the repository root with the CPU build of torch installed
# first (a bare torch requirement would pull a multi-GB CUDA build), then this package
# (editable, so the mergekit/lm-eval plugin hook points at this checkout) and test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.meav-installed
want=$(cat pyproject.toml hatch_build.py scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "$want" > "$stamp"
echo "set-up done: .venv/"
