"""Shared fixtures: the embedded model in a per-session cache, and ready-made run folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
PYTHON = sys.executable


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the whole session, also seen by the CLI and the ranks it starts."""
    path = tmp_path_factory.mktemp("llmbatch-cache")
    os.environ["LLMBATCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_dir(cache_dir) -> Path:
    from llmbatch.embedded import ensure_embedded_model

    return ensure_embedded_model(cache_dir)


@pytest.fixture
def make_run(tmp_path, model_dir):
    """make_run("infer", spec_path=None, overrides=[...]) -> RunDir holding a resolved spec.

    What the CLI does before launching, minus the launch: tests of a runner start from here.
    """
    from llmbatch.rundir import RunDir, atomic_write
    from llmbatch.spec import apply_override, dump_spec, load_spec

    def make(kind: str, spec_path: str | Path | None = None, overrides: list[str] = ()) -> RunDir:
        spec_path = spec_path or JOBS / f"{kind}.yaml"
        spec = load_spec(spec_path, kind, list(overrides))
        spec = apply_override(spec, "model.path", str(model_dir), tmp_path)
        run = RunDir.create(tmp_path / "runs", spec.name)
        atomic_write(run.spec_file, dump_spec(spec))
        return run

    return make


def submit_cli(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python submit.py ARGS` as a user runs it, in a real process."""
    proc = subprocess.run([PYTHON, str(REPO / "submit.py"), *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"submit.py {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def wait_for(what: str, predicate, timeout: float = 240, poll_s: float = 0.5):
    """predicate()'s first truthy value, polled; an AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_folder(proc: subprocess.CompletedProcess):
    """The run folder a submit.py run printed."""
    from llmbatch.rundir import RunDir

    line = next(line for line in proc.stdout.splitlines() if line.startswith("run folder: "))
    return RunDir(Path(line.split(": ", 1)[1]))


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real local Slurm cluster from slurm/start-cluster.sh (idempotent).

    If it was not up before, it is stopped again after the session. It fails, never skips.
    """
    was_up = subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0 if shutil.which("sinfo") \
        else False
    out = subprocess.run(["bash", str(REPO / "slurm" / "start-cluster.sh")], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"slurm/start-cluster.sh failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    for line in out.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            os.environ["SLURM_CONF"] = line.split("=", 1)[1].strip("'\"")
    yield
    if not was_up:
        subprocess.run(["bash", str(REPO / "slurm" / "stop-cluster.sh")], timeout=300)
