"""state.json's schema (`rundir.State`, `rundir.Task`): what is written is what is read, old run folders
with keys no longer written still read, and an array task's ranks are numbered by one rule."""

from __future__ import annotations

import json
import subprocess

import pytest

from llmbatch.cli import main
from llmbatch.rundir import STATE_FIELDS, TASK_FIELDS, State, Task, process_start_ticks
from llmbatch.shards import global_rank, task_of


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def keys_of(cls) -> set[str]:
    return {value for name, value in vars(cls).items() if name.isupper()}


def test_every_checked_key_is_a_named_key():
    assert set(STATE_FIELDS) <= keys_of(State) and set(TASK_FIELDS) == keys_of(Task)


def test_cancel_writes_only_keys_of_the_schema(make_run, sleeper, capsys):
    run = make_run("infer")
    run.update_state(
        **{
            State.KIND: "infer",
            State.EXECUTOR: "local",
            State.JOB_IDS: [str(sleeper.pid)],
            State.LOCAL_START_TICKS: process_start_ticks(sleeper.pid),
        }
    )
    assert main(["cancel", str(run.path)]) == 0
    assert f"cancelled local job {sleeper.pid}" in capsys.readouterr().out
    assert set(run.read_state()) <= keys_of(State)


def test_an_old_state_file_with_keys_no_longer_written_still_reads(make_run, capsys):
    """A run from before the schema: its job_id, cancelled and submitted are nobody's business now."""
    run = make_run("infer")
    old = {"kind": "infer", "executor": "slurm", "job_ids": [], "inputs": 7, "requeues": 1, "attempt": 1}
    run.state_file.write_text(json.dumps(old | {"job_id": "not 1 id", "cancelled": "yes", "submitted": None}))
    assert main(["status", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "NOT SUBMITTED" in out and "0/7 inputs" in out and "requeues=1" in out


@pytest.mark.parametrize(("tasks", "ranks_per_task"), [(1, 1), (4, 1), (3, 2), (2, 8)])
def test_an_array_tasks_ranks_follow_those_of_the_tasks_before_it(tasks, ranks_per_task):
    ranks = [global_rank(t, ranks_per_task, r) for t in range(tasks) for r in range(ranks_per_task)]
    assert ranks == list(range(tasks * ranks_per_task))  # no gap, no rank twice
    assert [task_of(rank, ranks_per_task) for rank in ranks] == [r // ranks_per_task for r in ranks]
    assert global_rank(None, ranks_per_task, 0) == 0  # a job that is not an array: task 0's
