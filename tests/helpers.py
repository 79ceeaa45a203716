"""What several test modules share: paths, run folders, launching a runner, the CLI in a process.

Fixtures live in conftest.py (pytest finds them there); plain helpers live here, imported by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import llmbatch
from llmbatch.cli import main as cli_main
from llmbatch.container import ContainerCommand
from llmbatch.data import Input, load_inputs
from llmbatch.jobstep import NodePlace, make_plan, node_command
from llmbatch.rundir import RunDir, append_jsonl, atomic_write, read_jsonl
from llmbatch.spec import apply_override, dump_spec, load_resolved, load_spec

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
PYTHON = sys.executable

SMALL = ["data.max_inputs=40", "generation.max_new_tokens=8"]
"""Overrides that make a default infer run small: a few seconds on CPU."""


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


def submit_cli(
    *args: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python submit.py ARGS` as a user runs it, in a real process."""
    proc = subprocess.run(
        [PYTHON, str(REPO / "submit.py"), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"submit.py {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def submit_local(kind: str, output: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python submit.py KIND --executor local --output OUTPUT ARGS`: a real run on this machine."""
    return submit_cli(kind, "--executor", "local", "--output", str(output), *args, **kwargs)


def with_fake_commands(folder: Path, **scripts: str) -> dict[str, str]:
    """This environment, with PATH finding first these commands (name=shell script body) in `folder`:
    a Slurm client that fails as a real one does, say."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return dict(os.environ, PATH=os.pathsep.join([str(folder), os.environ.get("PATH", "")]))


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


def status(run) -> dict:
    """`submit.py status --json` of `run`."""
    [s] = json.loads(submit_cli("status", str(run.path), "--json").stdout)
    return s


def job_id(proc) -> str:
    """The Slurm job id a submit.py run printed."""
    return next(line.split(": ")[1] for line in proc.stdout.splitlines() if line.startswith("slurm job: "))


def local_run(make_run, **state):
    """An infer run folder whose state says a local job (job id 1 unless `state` says otherwise) ran it."""
    run = make_run("infer")
    run.update_state(kind="infer", executor="local", **({"job_ids": ["1"]} | state))
    return run


def finetune_run(make_run):
    """A fine-tuning run some steps in: train_metrics.jsonl rows as the recipe logs them."""
    run = make_run("finetune")
    run.update_state(kind="finetune", executor="local", job_ids=["1"], attempt=0, requeues=0)
    for step in (1, 2):
        append_jsonl(
            run.train_metrics_file,
            {
                "step": step,
                "total_steps": 10,
                "epoch": 0,
                "loss": 2.5 / step,
                "lr": 0.002,
                "grad_norm": 1.25,
                "tokens": 512 * step,
                "elapsed_s": 0.5 * step,
                "attempt": 0,
            },
        )
    append_jsonl(run.train_metrics_file, {"step": 2, "val_loss": 1.5, "val_ppl": 4.48, "val_accuracy": 0.5})
    return run


def infer(run, processes: int, attempt: int = 0) -> bytes:
    """Run the infer runner of `run` to the end on `processes` CPU ranks; results.jsonl's bytes."""
    cmd = runner_command(run, processes, attempt)
    proc = subprocess.run(cmd.argv, env=os.environ | cmd.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run.results_file.read_bytes()


def trajectory(run: RunDir) -> list[tuple]:
    """Every logged number that depends on the training, by step (times and attempts left out)."""
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "epoch", "val_loss")
    return [tuple(row.get(k) for k in keys) for row in read_jsonl(run.train_metrics_file)]


def inputs_of(run) -> list:
    """The inputs of `run`, read from its spec's data file."""
    return load_inputs(load_resolved(run.spec_file).data)


def as_inputs(prompts: list[str]) -> list[Input]:
    return [Input(f"q{i}", prompt, None, i + 1) for i, prompt in enumerate(prompts)]


# --- containers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerEnv:
    """A container runtime and the local test image (conftest's `docker_env` and `podman_env` fixtures).

    The image has no llmbatch and no venv: run `python` (this venv's interpreter) with `binds` bound
    (the venv, the interpreter it points to, and llmbatch's source folder) and `pythonpath` as
    PYTHONPATH, the way HPC users bind a conda env into a base image.
    """

    runtime: str
    """container.runtime: docker or podman."""
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


# --- specs, data files and dry runs -----------------------------------------------------------------


def set_key(spec: dict, key: str, value) -> dict:
    """`spec` (a dict) with the dotted `key` set to `value`."""
    *sections, leaf = key.split(".")
    target = spec
    for s in sections:
        target = target.setdefault(s, {})
    target[leaf] = value
    return spec


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


CHATS = [
    [{"role": "user", "content": "Is 7 even or odd?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Is 12 even or odd?"}],
    [
        {"role": "user", "content": "Is 3 even or odd?"},
        {"role": "assistant", "content": "odd"},
        {"role": "user", "content": "And 4?"},
    ],
    [{"role": "user", "content": "Is 100 even or odd?"}],
]
"""Chats for data.messages_field: with and without a system message, and one with an earlier turn."""


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


def dry_run(capsys, *args: str) -> tuple[str, list[str]]:
    """`ARGS --dry-run` through the CLI in this process: what it printed, and the per-node command's argv."""
    assert cli_main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    command = lines[next(i for i, line in enumerate(lines) if line.startswith("# per-node command")) + 1]
    return out, shlex.split(command)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]
