"""Submission, with nothing submitted: --dry-run's sbatch script and per-node command (accelerate
flags, rendezvous ports, optional Slurm options), the default specs and output root, and what a
machine without Slurm gets. Container options: test_container.py; job arrays: test_arrays.py.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmbatch.cli import main
from llmbatch.jobstep import RENDEZVOUS_PORTS, rendezvous_ports
from llmbatch.node import rendezvous_port

from helpers import JOBS, PYTHON, REPO, dry_run, flag, submit_cli, with_fake_commands


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 4), (2, 4)])
def test_sbatch_lines_and_accelerate_flags(capsys, tmp_path, nodes, gpus):
    out, argv = dry_run(
        capsys,
        "infer",
        "--executor",
        "slurm",
        "--nodes",
        str(nodes),
        "--gpus",
        str(gpus),
        "--output",
        str(tmp_path / "runs"),
        "--set",
        "resources.cpus_per_gpu=2",
    )
    for line in (
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --cpus-per-task={2 * gpus}",
        "#SBATCH --time=30",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=parity-infer",
    ):
        assert line in out.splitlines()
    assert "srun --unbuffered" in out and "--kill-on-bad-exit=1" in out
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert flag(argv, "--num_machines") == str(nodes)
    assert flag(argv, "--num_processes") == str(nodes * gpus)
    assert flag(argv, "--machine_rank") == "0"
    assert ("--multi_gpu" in argv) == (nodes * gpus > 1)
    assert flag(argv, "--main_process_ip") == ("127.0.0.1" if nodes == 1 else "<first host of SLURM_JOB_NODELIST>")
    assert flag(argv, "--mixed_precision") == "no"  # inference loads bf16 weights itself
    assert argv[-6:-4] == ["-m", "llmbatch.runners.infer"] and argv[-2:] == ["--attempt", "0"]
    assert not (tmp_path / "runs").exists()


def test_rendezvous_port_is_per_job_and_outside_the_ephemeral_range():
    # An ephemeral port may be held by any outgoing connection on the node (EADDRINUSE in CI once).
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {next(rendezvous_ports(str(job_id), 0)) for job_id in range(1, 2001)}
    assert all(1024 < port < low for port in ports)
    assert len(ports) > 1850  # jobs sharing a node rarely share a first choice (about 1,917 expected)


def test_the_tasks_and_attempts_of_an_array_never_share_a_rendezvous_port():
    # Tasks of one array often share a node, and a requeued task runs beside the others' first attempts.
    tasks, attempts = 500, 4
    first = [
        next(rendezvous_ports(f"4242_{task}", restarts, tasks)) for task in range(tasks) for restarts in range(attempts)
    ]
    assert len(set(first)) == tasks * attempts
    # ... nor do the attempts of one job.
    assert len({next(rendezvous_ports("4243", restarts)) for restarts in range(10)}) == 10
    # A job's later choices visit every port once.
    ports = list(rendezvous_ports("4244", 0))
    assert sorted(ports) == list(RENDEZVOUS_PORTS)


def test_a_one_node_job_takes_a_free_rendezvous_port():
    first, second = itertools.islice(rendezvous_ports("4245_3", 1, 8), 2)
    with socket.socket() as busy:  # another job's rendezvous on our first choice
        busy.bind(("127.0.0.1", first))
        busy.listen()
        assert rendezvous_port("4245_3", 1, 8, nodes=1) == second
        assert rendezvous_port("4245_3", 1, 8, nodes=2) == first  # the other nodes could not know


def test_finetune_trains_in_bf16_on_gpus(capsys, tmp_path):
    _, argv = dry_run(capsys, "finetune", "--executor", "slurm", "--output", str(tmp_path))
    assert flag(argv, "--mixed_precision") == "bf16" and "llmbatch.runners.finetune" in argv


def test_optional_slurm_options(capsys, tmp_path):
    out, _ = dry_run(
        capsys,
        "infer",
        "--executor",
        "slurm",
        "--output",
        str(tmp_path),
        "--set",
        "resources.partition=gpu",
        "--set",
        "resources.account=lab",
        "--set",
        "resources.qos=high",
        "--set",
        "resources.constraint=h100",
        "--set",
        "resources.mem=64G",
        "--set",
        "resources.time=1-00:00:00",
        "--set",
        "resources.sbatch_extra={exclusive: '', mail-type: END}",
    )
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --mem=64G",
        "#SBATCH --time=1440",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
    ):
        assert line in out.splitlines()


def test_the_node_command_is_built_without_submitit(tmp_path):
    """The job step (spec -> plan -> node command) is pure: the benchmark imports it from a source tree
    where submitit is not installed. Here submitit is made unimportable in a fresh interpreter."""
    code = (
        "import sys; sys.modules['submitit'] = None\n"
        "from llmbatch.jobstep import NodePlace, make_plan, node_command\n"
        "from llmbatch.spec import load_spec\n"
        f"spec = load_spec({str(JOBS / 'infer.yaml')!r}, 'infer', ['resources.gpus_per_node=2'])\n"
        "place = NodePlace(node_rank=0, main_host='127.0.0.1', port=1, attempt=0, job_id='1', use_cuda=False)\n"
        f"print(node_command(make_plan(spec, {str(tmp_path)!r}), place).argv)\n"
        "assert 'submitit' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "'--num_processes', '2'" in proc.stdout and "llmbatch.runners.infer" in proc.stdout


@pytest.mark.slow
def test_an_installed_package_finds_its_default_specs(tmp_path):
    """Installed from a wheel, away from any checkout: `finetune` without a spec finds the default spec
    and its data, shipped as package data."""
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmbatch.cli",
            "finetune",
            "--dry-run",
            "--executor",
            "local",
            "--output",
            str(tmp_path / "runs"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(site)},
    )
    assert proc.returncode == 0, proc.stderr
    assert str(site / "llmbatch" / "jobs" / "data" / "parity" / "train.jsonl") in proc.stdout


def without_slurm(tmp_path: Path) -> dict[str, str]:
    """The environment of a laptop with no Slurm: a PATH on which neither sbatch nor srun exists."""
    bare = tmp_path / "bin"
    bare.mkdir()
    env = dict(os.environ, PATH=str(bare))
    assert shutil.which("sbatch", path=env["PATH"]) is None and shutil.which("srun", path=env["PATH"]) is None
    return env


def test_dry_run_needs_no_slurm_binaries(tmp_path):
    proc = subprocess.run(
        [
            PYTHON,
            str(REPO / "submit.py"),
            "infer",
            "--executor",
            "slurm",
            "--nodes",
            "2",
            "--gpus",
            "4",
            "--output",
            str(tmp_path / "runs"),
            "--dry-run",
        ],
        env=without_slurm(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout.splitlines() and "srun --unbuffered" in proc.stdout
    assert "nothing was submitted" in proc.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["infer", "--executor", "slurm"], ["finetune", "--executor", "slurm"]])
def test_slurm_executor_without_slurm_is_one_line_and_exit_2(tmp_path, command):
    proc = subprocess.run(
        [PYTHON, str(REPO / "submit.py"), *command, "--output", str(tmp_path / "runs")],
        env=without_slurm(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "llmbatch: error: --executor slurm: sbatch and srun not on PATH (no Slurm "
        "client on this machine); run where Slurm is, or use --executor local"
    ]
    assert not (tmp_path / "runs").exists()


# sbatch where Slurm's packages are installed but no cluster is set up (no slurm.conf, no DNS record).
SBATCH_WITHOUT_A_CLUSTER = """\
sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host
sbatch: error: fetch_config: DNS SRV lookup failed
sbatch: error: _establish_config_source: failed to fetch config
sbatch: fatal: Could not establish a configuration source"""


def failing(stderr: str, code: int = 1) -> str:
    """A fake command's script: `stderr` on stderr, then exit `code`."""
    return f"cat >&2 <<'EOF'\n{stderr}\nEOF\nexit {code}"


def test_a_failing_sbatch_is_one_line_and_leaves_no_run_folder(tmp_path, cache_dir):
    # A plain `submit.py infer` picks Slurm because sbatch is on PATH.
    env = with_fake_commands(tmp_path / "bin", sbatch=failing(SBATCH_WITHOUT_A_CLUSTER), srun="exit 0")
    runs = tmp_path / "runs"
    proc = submit_cli("infer", "--output", str(runs), "--set", "data.max_inputs=4", check=False, env=env)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines() == [
        "llmbatch: error: sbatch failed: Could not establish a configuration source; nothing was submitted "
        "(--executor local runs it on this machine)"
    ]
    assert list(runs.iterdir()) == []
    proc = submit_cli("status", "--root", str(runs), check=False, env=env)
    assert (proc.returncode, proc.stderr) == (2, f"llmbatch: error: no runs under {runs}\n")


def test_a_failing_sbatch_leaves_a_resumed_run_as_it_was(make_run, tmp_path, monkeypatch, capsys):
    run = make_run("infer")
    run.update_state(kind="infer", executor="slurm", job_ids=["41"])
    run.submitit_dir.mkdir()
    (run.submitit_dir / "41_submission.sh").write_text("#!/bin/bash\n")
    before = {p.name: p.read_bytes() for p in (run.state_file, *run.submitit_dir.iterdir())}
    env = with_fake_commands(
        tmp_path / "bin",
        sacct="echo FAILED",  # job 41 failed
        sinfo="exit 0",
        srun="exit 0",
        sbatch=failing("sbatch: error: Batch job submission failed: Invalid account or account/partition combination"),
    )
    monkeypatch.setenv("PATH", env["PATH"])
    assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err == (
        "llmbatch: error: sbatch failed: Batch job submission failed: Invalid account or account/partition "
        "combination; nothing was submitted\n"
    )
    assert {p.name: p.read_bytes() for p in (run.state_file, *run.submitit_dir.iterdir())} == before
    assert not run.space_reserve.exists()


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_the_default_spec_puts_runs_under_the_current_folder(capsys, monkeypatch, tmp_path, where):
    """Not next to the packaged default spec (inside the source tree, or site-packages once installed)."""
    cwd = REPO if where == "checkout" else tmp_path
    monkeypatch.chdir(cwd)
    _, argv = dry_run(capsys, "infer", "--executor", "local")
    assert flag(argv, "--run-dir").startswith(f"{cwd}/runs/parity-infer-")
