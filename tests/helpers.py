"""What several test modules share: paths, run folders, launching a runner, the CLI in a process.

Fixtures live in conftest.py (pytest finds them there); plain helpers live here, imported by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

import llmbatch
from llmbatch.cli import main as cli_main
from llmbatch.container import ContainerCommand
from llmbatch.jobstep import NodePlace, make_plan, node_command
from llmbatch.rundir import RunDir, atomic_write
from llmbatch.spec import apply_override, dump_spec, load_resolved, load_spec

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
PYTHON = sys.executable


def new_run(root: Path, model_dir: Path, kind: str, overrides: list[str] = ()) -> RunDir:
    """What the CLI does before launching, minus the launch: a run folder under `root` holding the
    resolved default spec of `kind` with `overrides`, on the embedded model in `model_dir`."""
    spec = load_spec(JOBS / f"{kind}.yaml", kind, list(overrides))
    spec = apply_override(spec, "model.path", str(model_dir), root)
    run = RunDir.create(root, spec.name)
    atomic_write(run.spec_file, dump_spec(spec))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runner_command(run: RunDir, processes: int, attempt: int = 0) -> ContainerCommand:
    """The node command of a one-node job step for `run` with `processes` CPU ranks (one thread each),
    as the node job builds it; the runner is the spec's kind. Run it with os.environ | .env."""
    plan = make_plan(load_resolved(run.spec_file), run.path)
    plan = dataclasses.replace(plan, gpus_per_node=processes, cpu_threads_per_proc=1)
    place = NodePlace(
        node_rank=0, main_host="127.0.0.1", port=free_port(), attempt=attempt, job_id="test", use_cuda=False
    )
    return node_command(plan, place)


def submit_cli(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python submit.py ARGS` as a user runs it, in a real process."""
    proc = subprocess.run([PYTHON, str(REPO / "submit.py"), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"submit.py {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def wait_for(what: str, predicate, timeout: float = 240, poll_s: float = 0.5):
    """predicate()'s first truthy value, polled; an AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_folder(proc: subprocess.CompletedProcess) -> RunDir:
    """The run folder a submit.py run printed."""
    line = next(line for line in proc.stdout.splitlines() if line.startswith("run folder: "))
    return RunDir(Path(line.split(": ", 1)[1]))


# --- containers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerEnv:
    """A private dockerd and the local test image (conftest's `docker_env` fixture).

    The image has no llmbatch and no venv: run `python` (this venv's interpreter) with `binds` bound
    (the venv, the interpreter it points to, and llmbatch's source folder) and `pythonpath` as
    PYTHONPATH, the way HPC users bind a conda env into a base image.
    """

    docker_host: str
    image: str
    python: str
    """This venv's python, which runs inside the container through the bound folders below."""
    binds: tuple[str, ...]
    pythonpath: str
    """llmbatch's source folder: set PYTHONPATH to it inside (llmbatch is not installed in the venv)."""


def llmbatch_source() -> str:
    """The folder that holds the llmbatch package (src/ in a checkout)."""
    return str(Path(llmbatch.__file__).resolve().parent.parent)


def host_python_binds() -> tuple[str, ...]:
    """The venv, the prefix of the interpreter its python links to (e.g. pyenv's version folder), and
    llmbatch's source folder."""
    interpreter_prefix = Path(os.path.realpath(sys.executable)).parent.parent
    return tuple(dict.fromkeys([sys.prefix, str(interpreter_prefix), llmbatch_source()]))


def write_data(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(tmp_path, spec: dict | None, *extra: str, kind: str = "infer", capsys=None):
    args = [kind]
    if spec is not None:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        args.append(str(path))
    code = cli_main(args + ["--executor", "local", "--dry-run", *extra])
    err = capsys.readouterr().err
    return code, err
