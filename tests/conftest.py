"""Shared fixtures: the embedded model in a per-session cache, run folders, the Slurm cluster, the
Docker engine and Podman. Plain helpers are in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmbatch.embedded import ensure_embedded_model

from helpers import REPO, ContainerEnv, host_python_binds, llmbatch_source, new_run, write_data

TESTING = REPO / "containers" / "testing"
TEST_IMAGE = "llmbatch-test:latest"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the whole session, also seen by the CLI and the ranks it starts."""
    path = tmp_path_factory.mktemp("llmbatch-cache")
    os.environ["LLMBATCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_dir(cache_dir) -> Path:
    return ensure_embedded_model(cache_dir)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    """The embedded model's tokenizer (it has a chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def make_run(tmp_path, model_dir):
    """make_run("infer", overrides=[...]) -> RunDir holding a resolved spec (helpers.new_run)."""
    return lambda kind, overrides=(): new_run(tmp_path / "runs", model_dir, kind, overrides)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real local Slurm cluster from slurm/start-cluster.sh (idempotent).

    If it was not up before, it is stopped again after the session. It fails, never skips.
    """
    was_up = subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0 if shutil.which("sinfo") else False
    out = subprocess.run(
        ["bash", str(REPO / "slurm" / "start-cluster.sh")], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, f"slurm/start-cluster.sh failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    for line in out.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            os.environ["SLURM_CONF"] = line.split("=", 1)[1].strip("'\"")
    yield
    if not was_up:
        subprocess.run(["bash", str(REPO / "slurm" / "stop-cluster.sh")], timeout=300)


@pytest.fixture(scope="session")
def docker_env() -> ContainerEnv:
    """A real Docker engine and test image (containers/testing/).

    Starts a private dockerd through containers/testing/dockerd.sh, builds the local image
    llmbatch-test:latest (Debian bookworm, no registry), sets DOCKER_HOST for this process and what it
    starts, and stops dockerd at the end of the session. Nothing is skipped: if Docker cannot start,
    every test using it fails.
    """
    started = subprocess.run(["bash", str(TESTING / "dockerd.sh"), "start"], capture_output=True, text=True)
    assert started.returncode == 0, f"dockerd.sh start failed:\n{started.stderr}"
    line = started.stdout.strip().splitlines()[-1]
    assert line.startswith("export DOCKER_HOST="), started.stdout
    docker_host = line.split("=", 1)[1]
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = docker_host
    try:
        built = subprocess.run(["bash", str(TESTING / "build-test-image.sh")], capture_output=True, text=True)
        assert built.returncode == 0, f"build-test-image.sh failed:\n{built.stderr}"
        yield container_env("docker")
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous
        subprocess.run(["bash", str(TESTING / "dockerd.sh"), "stop"], check=True)


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory) -> ContainerEnv:
    """Rootful Podman (Debian's 4.3) and the same test image as Docker's, imported into a private store.

    containers/testing/podman.sh writes a containers.conf and a storage.conf that keep everything
    Podman writes (images, run root, temporary files, network configuration, events) in a folder of
    this session, points CONTAINERS_CONF and CONTAINERS_STORAGE_CONF at them for this process and what
    it starts, and removes the folder at the end. Nothing is skipped: if Podman cannot run, every test
    using it fails.
    """
    folder = tmp_path_factory.mktemp("podman")
    script = str(TESTING / "podman.sh")
    previous = {name: os.environ.get(name) for name in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}
    try:
        started = subprocess.run(["bash", script, "setup", str(folder)], capture_output=True, text=True)
        assert started.returncode == 0, f"podman.sh setup failed:\n{started.stderr}"
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.strip().splitlines())
        assert set(exports) == set(previous), started.stdout
        os.environ.update(exports)
        yield container_env("podman")
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        subprocess.run(["bash", script, "teardown", str(folder)], check=True)


def container_env(runtime: str) -> ContainerEnv:
    return ContainerEnv(
        runtime=runtime,
        image=TEST_IMAGE,
        python=sys.executable,
        binds=host_python_binds(),
        pythonpath=llmbatch_source(),
    )


@pytest.fixture
def good(tmp_path) -> dict:
    """A valid infer spec as a dict, with its own small data file."""
    data = write_data(tmp_path / "in.jsonl", [{"id": i, "question": f"q{i}", "answer": "a"} for i in range(3)])
    return {
        "name": "t",
        "data": {"path": str(data), "prompt_template": "{question}", "reference_field": "answer"},
        "output": {"root": str(tmp_path / "runs")},
    }
