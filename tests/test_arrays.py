"""Inference as a Slurm job array (resources.array, --array N[%M]).

The spec and command-line checks and the dry run need no Slurm. The rest runs on the real local
cluster (slurm/start-cluster.sh: 2 nodes, 4 fake GPUs each): the tasks are sbatch'ed as one array
through submitit, signalled and killed with `scancel` as Slurm would, and inspected and resumed
through `submit.py`.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from llmbatch.cli import main
from llmbatch.shards import complete_lines, shard_for
from llmbatch.slurm import FINAL_STATES, array_state, expand_array_ids

from helpers import JOBS, job_id, run_folder, status, submit_cli, wait_for

ARRAY = ["--executor", "slurm", "--array", "4", "--gpus", "1", "--set", "resources.cpus_per_gpu=1"]
# 8 CPUs a task: Slurm fits two tasks on a node (16 CPUs), so four tasks spread over both nodes (each
# rank then runs 8 threads, too many for long runs on a small test machine).
SPREAD = [*ARRAY, "--set", "resources.cpus_per_gpu=8"]
SMALL = ["--set", "data.max_inputs=48", "--set", "generation.max_new_tokens=8"]
# 1,000 inputs, a few per step: each task's 250 take long enough for a signal to land mid-run.
INFER = [
    "--set",
    f"data.path={JOBS / 'data/parity/train.jsonl'}",
    "--set",
    "data.max_inputs=1000",
    "--set",
    "generation.batch_tokens=32",
]


# --- no Slurm needed ------------------------------------------------------------------------


def test_dry_run_shows_the_array_line_and_the_per_task_command(capsys, tmp_path):
    assert (
        main(["infer", "--executor", "slurm", "--array", "8%3", "--gpus", "2", "--output", str(tmp_path), "--dry-run"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --array=0-7%3" in lines and "#SBATCH --nodes=1" in lines
    assert "#SBATCH --gpus-per-node=2" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("# per-node command"))
    assert "array task 0 of 8" in lines[header]
    argv = lines[header + 1].split()
    assert argv[-2:] == ["--task", "0"] and argv[argv.index("--num_processes") + 1] == "2"
    assert "/logs/task-00000/node-0" in argv[argv.index("--log_dir") + 1]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_without_an_array_there_is_no_array_line(capsys, tmp_path):
    assert main(["infer", "--executor", "slurm", "--output", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--array" not in out and "--task" not in out


@pytest.mark.parametrize(
    "args,error",
    [
        (
            ["finetune", "--executor", "slurm", "--array", "4"],
            "--array 4: resources.array: job arrays are for inference (data-parallel); fine-tuning runs as one job",
        ),
        (
            ["infer", "--executor", "local", "--array", "4"],
            "resources.array: a job array (4 tasks) needs Slurm; the local executor runs one job (drop the array, or "
            "use --executor slurm on a cluster)",
        ),
        (
            ["infer", "--executor", "slurm", "--array", "4", "--nodes", "2"],
            "--nodes 2: resources.nodes: an array task runs on one node, got 2 with resources.array: 4 "
            "(use more tasks, or more GPUs per task)",
        ),
        (
            ["infer", "--executor", "slurm", "--array", "4x"],
            "--array 4x: expected N or N%M (N tasks, at most M running at once)",
        ),
        (["infer", "--executor", "slurm", "--array", "1"], "--array 1: resources.array: must be in [2, 100000], got 1"),
        (
            ["infer", "--executor", "slurm", "--array", "4%0"],
            "--array 4%0: resources.array_max_running: must be in (0, 100000], got 0",
        ),
        (
            ["infer", "--executor", "slurm", "--set", "resources.array_max_running=2"],
            "--set resources.array_max_running=2: resources.array_max_running: needs resources.array (the number of "
            "array tasks)",
        ),
        (
            ["infer", "--executor", "slurm", "--set", "resources.sbatch_extra={array: 0-3}"],
            "--set resources.sbatch_extra={array: 0-3}: resources.sbatch_extra.array: set by the spec, not through "
            "sbatch_extra: use resources.array",
        ),
        (
            ["infer", "--executor", "slurm", "--array", "50", "--set", "data.max_inputs=2"],
            "--array 50: resources.array: 50 array tasks for 2 inputs: each task needs at least one (use at most 2)",
        ),
        (
            ["infer", "--executor", "slurm", "--array", "3", "--set", "data.max_inputs=1"],
            "--array 3: resources.array: 3 array tasks for 1 input: each task needs at least one (drop the array)",
        ),
    ],
)
def test_bad_arrays_are_one_line_and_exit_2(capsys, tmp_path, args, error):
    assert main([*args, "--output", str(tmp_path / "runs"), "--dry-run"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"llmbatch: error: {error}"
    assert not (tmp_path / "runs").exists()


def test_an_array_from_the_spec_file_over_fewer_inputs_names_the_file(capsys, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"data:\n  path: {JOBS / 'data/parity/test.jsonl'}\n  prompt_field: question\n"
        f"  max_inputs: 3\nresources:\n  array: 4\n"
    )
    assert main(["infer", str(spec), "--executor", "slurm", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"llmbatch: error: {spec}: resources.array: 4 array tasks for 3 inputs: "
        f"each task needs at least one (use at most 3)\n"
    )
    assert main(["infer", str(spec), "--executor", "slurm", "--array", "3", "--dry-run"]) == 0


def test_sacct_array_ids_and_the_state_of_an_array():
    assert expand_array_ids("12_[2-4,7%2]") == ["12_2", "12_3", "12_4", "12_7"]
    assert expand_array_ids("12_[5]") == ["12_5"] and expand_array_ids("12_3") == ["12_3"]
    assert array_state(["COMPLETED"] * 3) == "COMPLETED"
    assert array_state(["COMPLETED", "PENDING", "RUNNING"]) == "RUNNING"
    assert array_state(["COMPLETED", "REQUEUED"]) == "REQUEUED"
    assert array_state(["COMPLETED", "FAILED", "COMPLETED"]) == "FAILED"


# --- on the local Slurm cluster -------------------------------------------------------------


def task(run, index: int) -> dict:
    return status(run)["tasks"][index]


def final_state(run) -> str:
    return wait_for("the array to end", lambda: (s := status(run)["state"]) in FINAL_STATES and s, timeout=600)


def task_log(run, index: int) -> str:
    return submit_cli("logs", str(run.path), "--task", str(index)).stdout


def commands(run) -> list[dict]:
    return [json.loads(line) for line in run.commands_file.read_text().splitlines()]


@pytest.mark.slurm
@pytest.mark.slow
def test_an_array_of_four_one_gpu_tasks_matches_one_local_process(slurm_cluster, cache_dir, tmp_path):
    local = run_folder(
        submit_cli("infer", "--executor", "local", "--gpus", "1", "--output", str(tmp_path / "a"), *SMALL)
    )
    proc = submit_cli("infer", *SPREAD, "--wait", "--output", str(tmp_path / "b"), *SMALL)
    run = run_folder(proc)
    assert "array tasks: 0 1 2 3" in proc.stdout and "accuracy" in proc.stdout  # the summary
    assert run.results_file.read_bytes() == local.results_file.read_bytes()

    ran = commands(run)
    assert sorted(c["task"] for c in ran) == [0, 1, 2, 3]
    assert {c["host"] for c in ran} == {"n1", "n2"}
    assert {c["job_id"] for c in ran} == {f"{job_id(proc)}_{i}" for i in range(4)}
    for c in ran:
        assert c["argv"][-2:] == ["--task", str(c["task"])]
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["world_size"] == 4 and [r["rank"] for r in metrics["ranks"]] == [0, 1, 2, 3]
    assert metrics["inputs"] == 48
    # Each task did its own quarter (token-balanced: 12 inputs each here); exactly one merged.
    logs = [task_log(run, i) for i in range(4)]
    assert all(f"task {i} of 4, rank {i} of 4, attempt 0: 12 of 12 inputs left" in log for i, log in enumerate(logs))
    assert sum("gathered 48 results" in log for log in logs) == 1
    s = status(run)
    assert s["state"] == "COMPLETED" and [t["state"] for t in s["tasks"]] == ["COMPLETED"] * 4
    assert [(t["done"], t["inputs"]) for t in s["tasks"]] == [(12, 12)] * 4
    # --dry-run's preview is the script that sbatch really got.
    from llmbatch.slurm import sbatch_script
    from llmbatch.spec import load_resolved

    submitted = (run.submitit_dir / f"{job_id(proc)}_submission.sh").read_text()
    assert "#SBATCH --array=0-3%4" in submitted.splitlines()
    assert sbatch_script(load_resolved(run.spec_file), run) == submitted


@pytest.fixture(scope="module")
def infer_reference(slurm_cluster, cache_dir, tmp_path_factory):
    """The same inputs, uninterrupted, on this machine (greedy results do not depend on the split)."""
    return run_folder(
        submit_cli(
            "infer", "--executor", "local", "--gpus", "2", "--output", str(tmp_path_factory.mktemp("reference")), *INFER
        )
    )


def signal_task_mid_run(output, index: int, signal: str):
    """Submit the array of four tasks on INFER and send task `index` `signal` mid-run: (run, array id)."""
    proc = submit_cli("infer", *ARRAY, "--output", str(output), *INFER)
    run, array = run_folder(proc), job_id(proc)

    def mid_run() -> bool:
        t = task(run, index)
        return t["state"] == "RUNNING" and 0 < t["done"] < t.get("inputs", 0) - 50

    wait_for(f"task {index} mid-run", mid_run, poll_s=0.2)
    subprocess.run(["scancel", f"--signal={signal}", f"{array}_{index}"], check=True)
    return run, array


@pytest.mark.slurm
@pytest.mark.slow
def test_one_task_signalled_is_requeued_alone_and_the_run_matches(infer_reference, tmp_path):
    run, _ = signal_task_mid_run(tmp_path, 1, "USR2")
    wait_for("task 1's requeue", lambda: task(run, 1)["attempt"] == 1)

    assert final_state(run) == "COMPLETED"
    s = status(run)
    assert [t["requeues"] for t in s["tasks"]] == [0, 1, 0, 0]
    assert [t["attempt"] for t in s["tasks"]] == [0, 1, 0, 0]
    assert s["progress"]["done"] == 1000  # no input done twice across the shards
    assert run.results_file.read_bytes() == infer_reference.results_file.read_bytes()
    assert run.preempt_marker(0, task=1).exists()
    assert sorted(p.name for p in run.path.glob("preempt-*")) == ["preempt-task-00001-attempt-000"]
    log = task_log(run, 1)
    assert "rank 1: stopped at a preemption signal" in log and "== attempt 1 on " in log
    kept = len(complete_lines(shard_for(run, 0, 1).path))  # what attempt 0 saved at the signal
    share = s["tasks"][1]["inputs"]
    assert f"task 1 of 4, rank 1 of 4, attempt 1: {share - kept} of {share} inputs left ({kept} done earlier)" in log
    for other in (0, 2, 3):
        assert "== attempt 1" not in task_log(run, other)


@pytest.mark.slurm
@pytest.mark.slow
def test_one_task_killed_is_redone_alone_by_resume(infer_reference, tmp_path):
    run, _ = signal_task_mid_run(tmp_path, 2, "KILL")

    assert final_state(run) in ("FAILED", "CANCELLED")
    s = status(run)
    assert [t["state"] for t in s["tasks"]][:2] == ["COMPLETED"] * 2 and s["tasks"][3]["state"] == "COMPLETED"
    assert s["tasks"][2]["state"] in ("FAILED", "CANCELLED")
    assert not run.results_file.exists()
    kept = s["tasks"][2]["done"]
    assert 0 < kept < s["tasks"][2]["inputs"]

    resumed = submit_cli("resume", str(run.path), "--wait")
    assert "array tasks: 2\n" in resumed.stdout and "(attempt 1)" in resumed.stdout
    assert run.results_file.read_bytes() == infer_reference.results_file.read_bytes()
    # Only task 2 ran again, and only the inputs of its share that the kill had left undone.
    again = [c for c in commands(run) if c["attempt"] > 0]
    assert [(c["task"], c["attempt"]) for c in again] == [(2, 1)]
    log = task_log(run, 2)
    left = s["tasks"][2]["inputs"] - kept
    assert (
        f"task 2 of 4, rank 2 of 4, attempt 1: {left} of {s['tasks'][2]['inputs']} inputs left ({kept} done "
        f"earlier)" in log
    )
    assert "gathered 1000 results" in log
    for other in (0, 1, 3):
        assert "== attempt 1" not in task_log(run, other)
    s = status(run)
    assert s["state"] == "COMPLETED" or final_state(run) == "COMPLETED"  # sacct may lag a moment
    assert s["progress"]["done"] == 1000
    assert "already complete" in submit_cli("resume", str(run.path)).stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_cancel_cancels_every_task_running_or_pending(slurm_cluster, cache_dir, tmp_path):
    # At most two at once: two tasks wait in the queue when cancel comes (the last --array counts).
    proc = submit_cli("infer", *ARRAY, "--array", "4%2", "--output", str(tmp_path), *INFER)
    run = run_folder(proc)
    assert "#SBATCH --array=0-3%2" in (run.submitit_dir / f"{job_id(proc)}_submission.sh").read_text()
    wait_for("a task running", lambda: any(t["state"] == "RUNNING" for t in status(run)["tasks"]))
    assert submit_cli("cancel", str(run.path)).stdout.strip() == f"cancelled slurm job {job_id(proc)}"
    assert final_state(run) == "CANCELLED"
    assert [t["state"] for t in status(run)["tasks"]] == ["CANCELLED"] * 4
