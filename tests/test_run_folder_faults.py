"""Lifecycle commands on run folders that are finished, damaged or whose pid was reused, and output
into a closed pipe: one line and the right exit code, never a traceback, never a wrong process killed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, run_folder, submit_cli
from llmbatch.cli import main
from llmbatch.lifecycle import process_start_ticks


@pytest.fixture
def sleeper():
    """A process that is not the run's job, though it may hold the pid the job once had."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def local_run(make_run, **state):
    run = make_run("infer")
    run.update_state(kind="infer", executor="local", **state)
    return run


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


def test_status_of_a_run_with_a_damaged_state_file_is_one_line(make_run, capsys):
    run = local_run(make_run, job_ids=["1"])
    run.state_file.write_text('{"executor": "loc')  # torn by a full disk, say
    assert main(["status", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmbatch: error: {run.state_file}: damaged, not valid JSON") and len(err.splitlines()) == 1


def test_list_shows_the_other_runs_when_one_is_damaged(make_run, capsys):
    good = local_run(make_run, job_ids=["1"])
    bad = local_run(make_run, job_ids=["1"])
    bad.state_file.write_bytes(b"\xff\xfe[")
    assert main(["list", "--root", str(good.path.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(good.name) and "STOPPED" in line for line in lines)
    assert any(line.startswith(f"{bad.name}  damaged: ") for line in lines)


def test_output_into_a_closed_pipe_ends_quietly(make_run):
    run = local_run(make_run, job_ids=["1"])
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written (`status | head -0`)
    proc = subprocess.run([sys.executable, str(REPO / "submit.py"), "status", str(run.path)], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""
    assert json.loads(run.state_file.read_text())["job_ids"] == ["1"]


def gather_error(run, capsys) -> str:
    assert main(["gather", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err.strip()


def test_gather_of_a_finetune_run_says_what_it_is(make_run, capsys):
    run = make_run("finetune")
    assert gather_error(run, capsys) == (f"llmbatch: error: {run.path}: a finetune run, not an inference run: "
                                         f"it has no results to gather")


def test_gather_names_a_damaged_shard(make_run, capsys):
    from llmbatch.shards import shard_for

    run = make_run("infer")
    shard = shard_for(run, 0, 0)
    shard.path.parent.mkdir()
    shard.path.write_bytes(b'{"id": "1", "output": "x"}\n\x00\x00garbage\n{"id": "2"}\n')
    assert gather_error(run, capsys) == (f"llmbatch: error: {shard.path}: damaged, record 2 is not valid JSON "
                                         f"(Expecting value)")


def test_gather_names_a_damaged_run_spec(make_run, capsys):
    run = make_run("infer")
    run.spec_file.write_text("model: [unclosed\n")
    assert gather_error(run, capsys).startswith(f"llmbatch: error: {run.spec_file}: invalid YAML at line ")


def test_gather_says_when_the_data_file_moved(make_run, tmp_path, capsys):
    data = tmp_path / "inputs.jsonl"
    data.write_text('{"id": "a", "question": "1 0 1"}\n')
    run = make_run("infer", overrides=[f"data.path={data}"])
    data.rename(tmp_path / "elsewhere.jsonl")
    assert gather_error(run, capsys) == f"llmbatch: error: {run.spec_file}: data.path: no such file: {data}"


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
    run.update_state(kind="infer", executor="local", job_ids=["1"], inputs=3,  # as submission records them
                     inputs_fingerprint=fingerprint)
    data.write_text(rows.replace('"1 0"', '"0 0"', 1))
    assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err == (f"llmbatch: error: {data}: the run's data file (data.path) changed since it "
                                       f"was submitted; resuming would mix results of old and new inputs (put the "
                                       f"file back as it was, or start a new run)\n")
    assert not run.submitit_dir.exists()  # nothing was queued
    data.unlink()
    assert main(["resume", str(run.path)]) == 2
    # The run's spec is checked as at submission, data path included.
    assert capsys.readouterr().err == f"llmbatch: error: {run.spec_file}: data.path: no such file: {data}\n"
    data.write_text(rows)
    run.update_state(inputs_fingerprint=fingerprint | {"model config.json (sha256)": "0" * 64})
    assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err == (f"llmbatch: error: submitted with model config.json (sha256)={'0' * 64!r}, "
                                       f"but it is now {fingerprint['model config.json (sha256)']!r}; a resume runs "
                                       f"on the inputs the run was submitted with (put it back, or start a new run)\n")
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
    run = run_folder(submit_cli("infer", "--executor", "local", "--output", str(tmp_path / "runs"),
                                "--set", f"data.path={data}"))
    fingerprint = run.read_state()["inputs_fingerprint"]
    assert fingerprint == spec_fingerprint(load_resolved(run.spec_file))
    assert fingerprint["data.path contents (sha256)"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_a_second_resume_of_the_same_run_is_refused(make_run, capsys):
    run = local_run(make_run, job_ids=["1"])
    with run.exclusive("resume"):  # as a first `resume`, still waiting for its job, holds it
        assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err.strip() == (f"llmbatch: error: {run.path}: another resume of this run is "
                                               f"under way")


def test_resume_refuses_while_a_rank_of_an_earlier_attempt_still_runs(make_run, sleeper, capsys, monkeypatch):
    """After a SIGKILL of the CLI and of the job's process, an orphaned rank may still write shards."""
    import socket

    from llmbatch import cli

    monkeypatch.setattr(cli, "RANK_EXIT_GRACE_S", 1.0)

    from llmbatch.rundir import atomic_write_json

    run = local_run(make_run, job_ids=["1"])
    atomic_write_json(run.ranks_dir / "attempt-000-rank-00001.json",
                      {"host": socket.gethostname(), "pid": sleeper.pid,
                       "start_ticks": process_start_ticks(sleeper.pid)})
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmbatch: error: {run.path}: attempt-000-rank-00001 is still running here "
                          f"(pid {sleeper.pid})") and len(err.splitlines()) == 1
    assert not run.submitit_dir.exists()  # nothing was submitted
