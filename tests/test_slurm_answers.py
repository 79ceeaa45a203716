"""What llmbatch reads from Slurm's client commands, on answers recorded from a real cluster (sacct,
squeue, sinfo as `status`, `cancel` and `resume` call them), and the submitit version whose private
names `llmbatch.slurm` relies on. The cluster tier (test_slurm.py, test_arrays.py, test_lifecycle.py)
runs the same code against the real commands.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path

import pytest

from llmbatch.lifecycle import tasks_to_resume
from llmbatch.slurm import (
    FINAL_STATES,
    SUBMITIT_PRIVATE,
    SUBMITIT_VERSION,
    array_of,
    array_state,
    expand_array_ids,
    history_line,
    parse_sacct_history,
    parse_sacct_state,
    parse_sacct_states,
    parse_sinfo_down,
    parse_squeue_state,
    parse_squeue_states,
)
from llmbatch.submission import ACTIVE_STATES

# `sacct -j 4242 -X -n -P --format=JobID,State` of an array of 6 tasks, at most 2 running: two done,
# one requeued after its node failed and running again, one cancelled, two not started yet.
SACCT_ARRAY = """\
4242_0|COMPLETED
4242_1|COMPLETED
4242_2|NODE_FAIL
4242_2|RUNNING
4242_3|CANCELLED by 1000
4242_[4-5%2]|PENDING
"""
# `squeue -h -r -j 4242 -o %i|%T` while sacct lags behind the same array.
SQUEUE_ARRAY = """\
4242_2|RUNNING
4242_4|PENDING
4242_5|PENDING
"""
# `sacct -j 77 -X -D -n -P --format=State,NodeList` of a job preempted, then requeued when its node
# failed, then running on another node.
SACCT_HISTORY = """\
PREEMPTED|c1
NODE_FAIL|c1
RUNNING|c2
"""
# `sinfo -h -N -n c1 -t down,drain,fail,no_respond -o %N|%T|%E`: the node in two partitions.
SINFO_DOWN = """\
c1|down*|Not responding
c1|down*|Not responding
"""


def test_array_ids_and_their_expansion():
    assert expand_array_ids("12_[2-4,7%2]") == ["12_2", "12_3", "12_4", "12_7"]
    assert expand_array_ids("12_[0-1,3]") == ["12_0", "12_1", "12_3"]
    assert expand_array_ids("12_[5]") == ["12_5"]
    assert expand_array_ids("12_3") == ["12_3"] and expand_array_ids("12") == ["12"]
    assert array_of("4242_3") == "4242" and array_of("4242") == "4242"


def test_sacct_states_of_an_array_with_requeued_cancelled_and_pending_tasks():
    assert parse_sacct_states(SACCT_ARRAY) == {
        "4242_0": "COMPLETED",
        "4242_1": "COMPLETED",
        "4242_2": "RUNNING",  # the latest run of a requeued task wins
        "4242_3": "CANCELLED",
        "4242_4": "PENDING",
        "4242_5": "PENDING",
    }
    assert parse_sacct_states("") == {}


def test_squeue_lines():
    assert parse_squeue_states(SQUEUE_ARRAY) == {"4242_2": "RUNNING", "4242_4": "PENDING", "4242_5": "PENDING"}
    assert parse_squeue_states("") == {}
    assert parse_squeue_state("PENDING\n") == "PENDING"
    assert parse_squeue_state("") == "UNKNOWN"


def test_the_state_of_one_job_is_its_latest_run():
    assert parse_sacct_state("NODE_FAIL\nREQUEUED\nCANCELLED by 0\n") == "CANCELLED"
    assert parse_sacct_state("") is None  # sacct does not know it yet: squeue is asked


def test_one_state_for_an_array():
    states = parse_sacct_states(SACCT_ARRAY)
    assert array_state(list(states.values())) == "RUNNING"
    assert array_state(["COMPLETED", "PENDING", "REQUEUED"]) == "PENDING"
    assert array_state(["COMPLETED", "CANCELLED", "NODE_FAIL"]) == "CANCELLED"
    assert array_state(["COMPLETED"] * 3) == "COMPLETED"


def test_history_of_a_preempted_requeued_job_and_its_lost_node():
    runs = parse_sacct_history(SACCT_HISTORY)
    assert runs == [("PREEMPTED", "c1"), ("NODE_FAIL", "c1"), ("RUNNING", "c2")]
    assert history_line(runs) == "PREEMPTED on c1, then NODE_FAIL on c1, then RUNNING on c2"
    assert parse_sinfo_down(SINFO_DOWN) == "c1 is down (down*: Not responding)"
    assert parse_sinfo_down("") is None


def test_history_is_shown_only_when_the_job_ran_again_or_ended_badly():
    assert history_line(parse_sacct_history("COMPLETED|c1\n")) is None
    assert history_line(parse_sacct_history("PENDING|None assigned\n")) is None
    assert history_line(parse_sacct_history("CANCELLED by 1000|c3\n")) == "CANCELLED on c3"
    assert history_line(parse_sacct_history("NODE_FAIL|c1\n")) == "NODE_FAIL on c1"
    assert history_line([]) is None


@pytest.mark.parametrize(
    ("answer", "refused"),
    [("RUNNING", True), ("PENDING", True), ("REQUEUED", True), ("COMPLETING", True), ("CONFIGURING", True)]
    + [(state, False) for state in sorted(FINAL_STATES)],
)
def test_resume_waits_for_a_job_that_is_still_active(answer, refused):
    assert (parse_sacct_state(f"NODE_FAIL\n{answer}\n") in ACTIVE_STATES) is refused


def test_resume_submits_again_the_tasks_that_did_not_finish_their_share():
    # Slurm's word is not what counts: task 1 COMPLETED without its shards finished, task 3 was cancelled
    # after it finished them.
    tasks = [int(job_id.split("_")[1]) for job_id in parse_sacct_states(SACCT_ARRAY)]
    assert tasks_to_resume(reversed(tasks), finished={0, 3}) == [1, 2, 4, 5]
    assert tasks_to_resume(tasks, finished=set(tasks)) == []


def test_submitit_is_the_version_its_private_names_were_read_in():
    assert importlib.metadata.version("submitit") == SUBMITIT_VERSION
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert f"submitit=={SUBMITIT_VERSION}" in pyproject["project"]["dependencies"]


@pytest.mark.parametrize("name", SUBMITIT_PRIVATE)
def test_submitits_private_names_exist(name):
    module, _, attribute = name.rpartition(".")
    # A function llmbatch calls, or a module submitit's batch script runs.
    assert callable(getattr(importlib.import_module(module), attribute, None)) or importlib.util.find_spec(name), name


def test_the_private_names_are_used_in_llmbatch_slurm_only():
    src = Path(__file__).resolve().parents[1] / "src" / "llmbatch"
    users = {
        path.relative_to(src).as_posix()
        for path in src.rglob("*.py")
        for name in SUBMITIT_PRIVATE
        if name.rpartition(".")[2] in path.read_text()
    }
    assert users == {"slurm.py"}
