"""A real Docker engine and test image for container tests (containers/testing/).

Use it from a test module with

    from container_fixtures import docker_env  # noqa: F401  (a pytest fixture)

`docker_env` starts a private dockerd through containers/testing/dockerd.sh, builds the local image
llmbatch-test:latest (Debian bookworm, no registry), sets DOCKER_HOST for this process and what it
starts, and stops dockerd at the end of the session. Nothing is skipped: if Docker cannot start, every
test using it fails.

The image has no llmbatch and no venv: run `docker_env.python` (this venv's interpreter) with
`docker_env.binds` bound (the venv, the interpreter it points to, and llmbatch's source folder) and
`docker_env.pythonpath` as PYTHONPATH, the way HPC users bind a conda env into a base image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTING = REPO / "containers" / "testing"
IMAGE = "llmbatch-test:latest"


@dataclass(frozen=True)
class DockerEnv:
    docker_host: str
    image: str
    python: str
    """This venv's python, which runs inside the container through the bound folders below."""
    binds: tuple[str, ...]
    pythonpath: str
    """llmbatch's source folder: set PYTHONPATH to it inside (llmbatch is not installed in the venv)."""


def llmbatch_source() -> str:
    """The folder that holds the llmbatch package (src/ in a checkout)."""
    import llmbatch.spec

    return str(Path(llmbatch.spec.__file__).resolve().parent.parent)


def host_python_binds() -> tuple[str, ...]:
    """The venv, the prefix of the interpreter its python links to (e.g. pyenv's version folder), and
    llmbatch's source folder."""
    interpreter_prefix = Path(os.path.realpath(sys.executable)).parent.parent
    return tuple(dict.fromkeys([sys.prefix, str(interpreter_prefix), llmbatch_source()]))


@pytest.fixture(scope="session")
def docker_env() -> DockerEnv:
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
        yield DockerEnv(docker_host=docker_host, image=IMAGE, python=sys.executable, binds=host_python_binds(),
                        pythonpath=llmbatch_source())
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous
        subprocess.run(["bash", str(TESTING / "dockerd.sh"), "stop"], check=True)
