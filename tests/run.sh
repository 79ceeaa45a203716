#!/usr/bin/env bash
# Install what the test suite needs and run it: the venv and packages, a real local Slurm cluster
# (slurm/), and a Docker engine with a locally built test image (containers/testing/).
# Everything this starts is stopped again on exit. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch pinned: an open range would pull a multi-GB CUDA build onto CPU-only machines.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'

bash slurm/start-cluster.sh
source "${LLMBATCH_SLURM_DIR:-/tmp/llmbatch-slurm}/env.sh"
eval "$(bash containers/testing/dockerd.sh start)"
cleanup() {
    bash containers/testing/dockerd.sh stop || true
    bash slurm/stop-cluster.sh || true
}
trap cleanup EXIT

.venv/bin/python -m pytest -ra "$@"
