"""The lifecycle commands on local run folders: status, list, logs, cancel and resume (their options,
what they refuse, what they read), and Ctrl-C or a closed pipe while a command runs: one line and the
right exit code, never a traceback, never a wrong process killed.

The same commands on Slurm jobs: test_slurm.py and test_arrays.py; on damaged or planted run
folders: test_run_folder.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from llmbatch.cli import main
from llmbatch.lifecycle import process_start_ticks
from llmbatch.rundir import RunDir, atomic_write
from llmbatch.spec import dump_spec, load_spec

from helpers import REPO, finetune_run, local_run, run_folder, status, submit_cli, with_fake_commands, write_text

# --- lifecycle commands' options ---------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", "-1", "x"])
def test_list_refuses_a_limit_below_one(tmp_path, limit):
    proc = submit_cli("list", "--root", str(tmp_path), "--limit", limit, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"llmbatch: error: argument --limit: must be a whole number of at least 1, got "
        f"'{limit}' (see python submit.py list --help)\n"
    )


def run_without_job(tmp_path, *overrides: str) -> RunDir:
    """A run folder as submission leaves it (spec and node log), without running anything."""
    run = RunDir.create(tmp_path / "runs", "r")
    atomic_write(run.spec_file, dump_spec(load_spec(REPO / "jobs" / "infer.yaml", "infer", list(overrides))))
    write_text(run.node_log(0), "the node log\n")
    return run


@pytest.mark.parametrize(
    "overrides,args,message",
    [
        (
            [],
            ["--rank", "99"],
            "--rank 99: no such local rank: each node runs local rank 0 only (resources.gpus_per_node: 1)",
        ),
        (
            ["resources.gpus_per_node=2"],
            ["--rank", "2"],
            "--rank 2: no such local rank: each node runs local ranks 0-1 (resources.gpus_per_node: 2)",
        ),
        (
            [],
            ["--rank", "-1"],
            "--rank -1: no such local rank: each node runs local rank 0 only (resources.gpus_per_node: 1)",
        ),
        ([], ["--node", "1"], "--node 1: no such node: this run has node 0 only"),
        (["resources.nodes=3"], ["--node", "3"], "--node 3: no such node: this run has nodes 0-2"),
        ([], ["--task", "0"], "--task 0: {run} is one job, not a job array (leave --task out)"),
        (["resources.array=4"], ["--task", "4"], "--task 4: no such array task: this run has array tasks 0-3"),
        (["resources.array=4"], ["--task", "0", "--node", "1"], "--node 1: no such node: this run has node 0 only"),
    ],
)
def test_logs_of_a_rank_node_or_task_the_run_does_not_have(tmp_path, capsys, overrides, args, message):
    run = run_without_job(tmp_path, *overrides)
    assert main(["logs", str(run.path), *args]) == 2
    assert capsys.readouterr().err == f"llmbatch: error: {message.format(run=run.path)}\n"


def test_logs_of_the_only_rank_is_the_node_log(tmp_path, capsys):
    run = run_without_job(tmp_path)
    assert main(["logs", str(run.path), "--rank", "0"]) == 0
    assert capsys.readouterr().out == "the node log\n"


# --- Slurm's commands failing ----------------------------------------------------------------------


NO_CONTROLLER = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
"""squeue where the Slurm controller is down."""


def slurm_run(make_run, tmp_path, monkeypatch, **commands: str) -> RunDir:
    """A run whose Slurm job 42 was submitted, where PATH finds these fake Slurm commands first."""
    run = make_run("infer")
    run.update_state(kind="infer", executor="slurm", job_ids=["42"])
    monkeypatch.setenv("PATH", with_fake_commands(tmp_path / "bin", **commands)["PATH"])
    return run


@pytest.mark.parametrize("command", ["status", "cancel", "resume"])
def test_an_unreachable_slurm_controller_is_one_line(make_run, tmp_path, monkeypatch, capsys, command):
    run = slurm_run(
        make_run,
        tmp_path,
        monkeypatch,
        sacct="echo 'sacct: error: Problem talking to the database: Connection refused' >&2; exit 1",
        squeue=f"echo '{NO_CONTROLLER}' >&2; exit 1",
        sbatch="exit 0",
        srun="exit 0",
    )
    assert main([command, str(run.path)]) == 2
    tail = "; nothing was submitted" if command == "resume" else ""
    assert capsys.readouterr().err == f"llmbatch: error: squeue failed: {NO_CONTROLLER}{tail}\n"
    assert main(["list", "--root", str(run.path.parent)]) == 0
    assert capsys.readouterr().out == f"{run.name}  state unknown: squeue failed: {NO_CONTROLLER}\n"


def test_a_failing_scancel_is_one_line(make_run, tmp_path, monkeypatch, capsys):
    run = slurm_run(
        make_run,
        tmp_path,
        monkeypatch,
        sacct="exit 0",  # accounting lags: squeue answers
        squeue="echo RUNNING",
        scancel="echo 'scancel: error: Kill job error on job id 42: Access/permission denied' >&2; exit 1",
    )
    assert main(["cancel", str(run.path)]) == 2
    assert capsys.readouterr().err == (
        "llmbatch: error: scancel failed: Kill job error on job id 42: Access/permission denied\n"
    )


def test_a_job_squeue_forgot_is_unknown_not_an_error(make_run, tmp_path, monkeypatch, capsys):
    # Without accounting, squeue forgets a job some minutes after it ended.
    run = slurm_run(
        make_run,
        tmp_path,
        monkeypatch,
        sacct="echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1",
        squeue="echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
    )
    assert main(["status", str(run.path)]) == 0
    assert f"{run.name}  infer  slurm:42  UNKNOWN  " in capsys.readouterr().out


# --- cancel, status and resume of local runs ------------------------------------------------------


@pytest.fixture
def sleeper():
    """A process that is not the run's job, though it may hold the pid the job once had."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_cancel_never_signals_a_process_that_reused_the_jobs_pid(make_run, sleeper, capsys):
    run = local_run(make_run, job_ids=[str(sleeper.pid)], local_start_ticks=process_start_ticks(sleeper.pid) - 1)
    assert main(["cancel", str(run.path)]) == 0
    assert "already finished (STOPPED)" in capsys.readouterr().out
    assert sleeper.poll() is None  # still alive: it was never the job


def test_cancel_stops_the_local_job_it_started(make_run, sleeper, capsys):
    run = local_run(make_run, job_ids=[str(sleeper.pid)], local_start_ticks=process_start_ticks(sleeper.pid))
    assert main(["status", str(run.path)]) == 0
    assert " RUNNING " in capsys.readouterr().out
    assert main(["cancel", str(run.path)]) == 0
    assert f"cancelled local job {sleeper.pid}" in capsys.readouterr().out
    assert sleeper.wait(timeout=10) == -15


def test_cancel_of_a_finished_run_says_so(make_run, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = local_run(make_run, job_ids=[str(gone.pid)], local_start_ticks=12345)
    assert main(["cancel", str(run.path)]) == 0
    assert capsys.readouterr().out.strip() == f"local job {gone.pid} already finished (STOPPED); nothing to cancel"


def test_output_into_a_closed_pipe_ends_quietly(make_run):
    run = local_run(make_run, job_ids=["1"])
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written (`status | head -0`)
    proc = subprocess.run(
        [sys.executable, str(REPO / "submit.py"), "status", str(run.path)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""
    assert json.loads(run.state_file.read_text())["job_ids"] == ["1"]


def test_status_counts_inputs_from_the_run_folder_not_the_data_file(make_run, tmp_path, capsys):
    data = tmp_path / "inputs.jsonl"
    data.write_text("".join(f'{{"id": "{i}", "question": "1 0"}}\n' for i in range(7)))
    run = make_run("infer", overrides=[f"data.path={data}"])
    run.update_state(kind="infer", executor="local", job_ids=["1"], inputs=7)
    data.unlink()  # status must not need it (nor read millions of lines for a count)
    assert main(["status", str(run.path)]) == 0
    assert "0/7 inputs" in capsys.readouterr().out


def test_resume_refuses_when_the_data_changed_since_submission(make_run, tmp_path, capsys):
    """It would mix results of old and new inputs (status then said COMPLETED 25/20)."""
    from llmbatch.fingerprint import spec_fingerprint
    from llmbatch.shards import shard_for
    from llmbatch.spec import load_resolved

    data = tmp_path / "inputs.jsonl"
    data.write_text(rows := "".join(f'{{"id": "{i}", "question": "1 0", "answer": "odd"}}\n' for i in range(3)))
    run = make_run("infer", overrides=[f"data.path={data}"])
    fingerprint = spec_fingerprint(load_resolved(run.spec_file))
    run.update_state(
        kind="infer",
        executor="local",
        job_ids=["1"],
        inputs=3,  # as submission records them
        inputs_fingerprint=fingerprint,
    )
    data.write_text(rows.replace('"1 0"', '"0 0"', 1))
    assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err == (
        f"llmbatch: error: {data}: the run's data file (data.path) changed since it "
        f"was submitted; resuming would mix results of old and new inputs (put the "
        f"file back as it was, or start a new run)\n"
    )
    assert not run.submitit_dir.exists()  # nothing was queued
    data.unlink()
    assert main(["resume", str(run.path)]) == 2
    # The run's spec is checked as at submission, data path included.
    assert capsys.readouterr().err == f"llmbatch: error: {run.spec_file}: data.path: no such file: {data}\n"
    data.write_text(rows)
    run.update_state(inputs_fingerprint=fingerprint | {"model config.json (sha256)": "0" * 64})
    assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err == (
        f"llmbatch: error: submitted with model config.json (sha256)={'0' * 64!r}, "
        f"but it is now {fingerprint['model config.json (sha256)']!r}; a resume runs "
        f"on the inputs the run was submitted with (put it back, or start a new run)\n"
    )
    assert not run.submitit_dir.exists()

    # A run resumed over other data before fingerprints existed: more records than inputs.
    shard = shard_for(run, 0, 0)
    shard.path.parent.mkdir()
    shard.path.write_text("".join(f'{{"id": "{i}", "output": "odd"}}\n' for i in range(5)))
    assert main(["status", str(run.path)]) == 0
    assert "3/3 inputs" in capsys.readouterr().out


@pytest.mark.slow
def test_submission_records_the_inputs_fingerprint(tmp_path, cache_dir):
    from llmbatch.fingerprint import spec_fingerprint
    from llmbatch.spec import load_resolved

    data = tmp_path / "inputs.jsonl"
    data.write_text('{"id": "a", "question": "1 0 1", "answer": "even"}\n')
    run = run_folder(
        submit_cli("infer", "--executor", "local", "--output", str(tmp_path / "runs"), "--set", f"data.path={data}")
    )
    fingerprint = run.read_state()["inputs_fingerprint"]
    assert fingerprint == spec_fingerprint(load_resolved(run.spec_file))
    assert fingerprint["data.path contents (sha256)"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_a_second_resume_of_the_same_run_is_refused(make_run, capsys):
    run = local_run(make_run, job_ids=["1"])
    with run.exclusive("resume"):  # as a first `resume`, still waiting for its job, holds it
        assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err.strip() == (f"llmbatch: error: {run.path}: another resume of this run is under way")


def test_resume_refuses_while_a_rank_of_an_earlier_attempt_still_runs(make_run, sleeper, capsys, monkeypatch):
    """After a SIGKILL of the CLI and of the job's process, an orphaned rank may still write shards."""
    import socket

    from llmbatch import submission

    monkeypatch.setattr(submission, "RANK_EXIT_GRACE_S", 1.0)

    from llmbatch.rundir import atomic_write_json

    run = local_run(make_run, job_ids=["1"])
    atomic_write_json(
        run.ranks_dir / "attempt-000-rank-00001.json",
        {"host": socket.gethostname(), "pid": sleeper.pid, "start_ticks": process_start_ticks(sleeper.pid)},
    )
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"llmbatch: error: {run.path}: attempt-000-rank-00001 is still running here (pid {sleeper.pid})")
        and len(err.splitlines()) == 1
    )
    assert not run.submitit_dir.exists()  # nothing was submitted


def test_finetune_status_reads_what_a_diverged_or_killed_run_logs(make_run, capsys):
    """A NaN or infinite loss is what a diverging run logs, and a torn last line what a kill leaves:
    neither is damage."""
    run = finetune_run(make_run)
    with run.train_metrics_file.open("a") as f:
        f.write('{"step": 3, "total_steps": 10, "loss": NaN, "grad_norm": Infinity}\n{"step": 4, "loss": 0.')
    assert main(["status", str(run.path)]) == 0
    assert " STOPPED  step 3/10, loss nan " in capsys.readouterr().out


# --- Ctrl-C ----------------------------------------------------------------------------------------


def interrupted(argv: list[str], after_s: float) -> subprocess.CompletedProcess:
    """`python submit.py ARGV`, sent SIGINT (as a terminal's Ctrl-C) after `after_s` seconds."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "submit.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=after_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("after_s", [0.2, 0.4, 0.7, 1.0, 1.5])
def test_ctrl_c_while_starting_is_one_line(after_s, make_run):
    """Early: while Python imports llmbatch, or the command has just begun."""
    run = local_run(make_run, job_ids=["1"])
    proc = interrupted(["status", str(run.path)], after_s)
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 1, proc.stderr
    if proc.returncode != 0:  # it may have finished first
        # Before Python set up its handler the signal's default ends the process, quietly too.
        assert proc.returncode in (130, -signal.SIGINT), proc.stderr
        assert proc.stderr in ("", "llmbatch: interrupted\n"), proc.stderr


def test_ctrl_c_of_a_command_that_waits_is_one_line(make_run, sleeper):
    """`logs -f` of a running job follows it until it ends; Ctrl-C ends the command (not the job)."""
    run = local_run(make_run, job_ids=[str(sleeper.pid)], local_start_ticks=process_start_ticks(sleeper.pid))
    run.node_log(0).parent.mkdir()
    run.node_log(0).write_text("== attempt 0 on a host\n")
    proc = interrupted(["logs", str(run.path), "-f"], 8)
    assert proc.returncode == 130 and proc.stderr == "llmbatch: interrupted\n", proc.stderr
    assert proc.stdout == "== attempt 0 on a host\n"
    assert sleeper.poll() is None


def test_ctrl_c_during_submission_leaves_a_run_to_resume_or_nothing(make_run, tmp_path):
    """Ctrl-C at moments of `infer` before its job runs: one line; a run folder it leaves is whole
    (spec and state) and its message says how to go on."""
    for after_s in (1.0, 2.5, 4.0, 6.0):
        root = tmp_path / f"after-{after_s}"
        proc = interrupted(
            ["infer", "--executor", "local", "--output", str(root), "--set", "data.max_inputs=4"], after_s
        )
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 1, proc.stderr
        runs = list(root.glob("*")) if root.exists() else []
        assert all((r / "spec.yaml").is_file() and (r / "state.json").is_file() for r in runs), runs
        if proc.returncode == 130 and runs:
            assert proc.stderr.startswith("llmbatch: interrupted; ") and str(runs[0]) in proc.stderr, proc.stderr
        elif proc.returncode == 130:
            assert proc.stderr == "llmbatch: interrupted\n"
        else:
            assert proc.returncode == 0, proc.stderr  # it finished first


# --- logs -----------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_logs_of_a_one_process_local_run(cache_dir, tmp_path):
    run = run_folder(
        submit_cli("infer", "--executor", "local", "--output", str(tmp_path), "--set", "data.max_inputs=8")
    )
    node_log = submit_cli("logs", str(run.path)).stdout
    assert "rank 0 of 1, attempt 0: 8 of 8 inputs left" in node_log
    assert submit_cli("logs", str(run.path), "--rank", "0").stdout == node_log  # the only rank's output
    missing = submit_cli("logs", str(run.path), "--node", "1", check=False)
    assert missing.returncode == 2 and missing.stderr == (
        "llmbatch: error: --node 1: no such node: this run has node 0 only\n"
    )
    s = status(run)
    assert s["state"] == "COMPLETED" and s["progress"]["done"] == 8
