#!/usr/bin/env bash
# Set up everything edgeforge needs on a fresh Debian/Ubuntu machine, idempotently:
# a virtual environment in .venv with edgeforge, its host extras and the test tools.
# torch is pinned through .ci/constraints.txt (the CPU wheel); a board picks its own build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c .ci/constraints.txt -e '.[dev]'
.venv/bin/python -c "import torch, yaml, psutil, paho.mqtt, tqdm, matplotlib" \
    || { echo "setup failed: dependencies did not import" >&2; exit 1; }
