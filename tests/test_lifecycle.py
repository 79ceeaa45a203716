"""Preemption, requeue, hard kills and the lifecycle commands, on the real local Slurm cluster.

Every job here is started, signalled, killed and inspected the way a user would: `submit.py` for
submission, `status`, `logs`, `list`, `cancel` and `resume`, and `scancel --signal=...` for what
Slurm sends before a preemption or the time limit (USR2, submitit's signal) and for a node that dies
(KILL). The GPUs are Slurm's fake gres, so the ranks run on CPU with gloo.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from llmbatch.rundir import read_jsonl
from llmbatch.slurm import FINAL_STATES

from helpers import JOBS, run_folder, submit_cli, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# 1,000 inputs, one per batch: about 10 s on two ranks, so a signal lands mid-run.
INFER = [
    "--set",
    f"data.path={JOBS / 'data/parity/train.jsonl'}",
    "--set",
    "data.max_samples=1000",
    "--set",
    "generation.batch_tokens=32",
]
# Only the signal (or the end) saves a checkpoint; 40 steps of 2 ranks take about 30 s.
FINETUNE = [
    "--set",
    "train.max_steps=40",
    "--set",
    "train.save_every_steps=1000",
    "--set",
    "train.eval_every_steps=1000",
    "--set",
    "train.eval_accuracy=false",
    "--set",
    "data.max_samples=400",
]


def status(run) -> dict:
    [s] = json.loads(submit_cli("status", str(run.path), "--json").stdout)
    return s


def inputs_done(run) -> int:
    return status(run)["progress"].get("done", 0)


def steps_done(run) -> int:
    return max((row.get("step", 0) for row in read_jsonl(run.train_metrics_file)), default=0)


def job_id(proc) -> str:
    return next(line.split(": ")[1] for line in proc.stdout.splitlines() if line.startswith("slurm job: "))


def final_state(run) -> str:
    return wait_for("the job to end", lambda: (s := status(run)["state"]) in FINAL_STATES and s)


def result_ids(run) -> list[str]:
    return [json.loads(line)["id"] for line in run.results_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def infer_reference(slurm_cluster, cache_dir, tmp_path_factory):
    """The same inputs, uninterrupted, on this machine (greedy results do not depend on the rank count)."""
    return run_folder(
        submit_cli(
            "infer", "--executor", "local", "--gpus", "2", "--output", str(tmp_path_factory.mktemp("reference")), *INFER
        )
    )


def test_infer_signalled_twice_is_requeued_twice_and_matches_an_uninterrupted_run(infer_reference, tmp_path):
    proc = submit_cli("infer", "--executor", "slurm", "--nodes", "2", "--gpus", "1", "--output", str(tmp_path), *INFER)
    run, job = run_folder(proc), job_id(proc)
    done_before = 0
    for attempt in (0, 1):
        # Mid-run in this attempt: it has done more than the attempts before it, and not everything.
        wait_for(
            f"progress in attempt {attempt}",
            lambda: status(run)["attempt"] == attempt and done_before < inputs_done(run) < 900,
            poll_s=0.2,
        )
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        wait_for(f"the requeue after signal {attempt + 1}", lambda: status(run)["attempt"] == attempt + 1)
        done_before = inputs_done(run)
        assert done_before < 1000
        assert run.preempt_marker(attempt).exists()

    assert final_state(run) == "COMPLETED"
    s = status(run)
    assert s["requeues"] == 2 and s["attempt"] == 2
    assert s["progress"]["done"] == 1000  # no input done twice across the shards of three attempts
    assert run.results_file.read_bytes() == infer_reference.results_file.read_bytes()
    assert len(set(result_ids(run))) == 1000
    log = submit_cli("logs", str(run.path), "--node", "1").stdout
    assert [f"== attempt {a} on n2" in log for a in range(3)] == [True] * 3
    assert "stopped at the preemption signal" in log


def test_finetune_signalled_mid_epoch_resumes_from_the_signal_checkpoint(slurm_cluster, cache_dir, tmp_path):
    reference = run_folder(
        submit_cli("finetune", "--executor", "local", "--gpus", "2", "--output", str(tmp_path / "reference"), *FINETUNE)
    )
    proc = submit_cli(
        "finetune",
        "--executor",
        "slurm",
        "--nodes",
        "2",
        "--gpus",
        "1",
        "--output",
        str(tmp_path / "signalled"),
        *FINETUNE,
    )
    run, job = run_folder(proc), job_id(proc)
    wait_for("a few steps", lambda: steps_done(run) >= 5, poll_s=0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert final_state(run) == "COMPLETED"

    log = submit_cli("logs", str(run.path)).stdout
    stopped_at = int(log.split("preempted at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 40  # mid-epoch: an epoch of 400 examples is longer than 40 steps here
    assert f"resuming at step {stopped_at}" in log
    assert status(run)["requeues"] == 1
    # Bit for bit: the same adapter and the same loss at every step as the uninterrupted run.
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        reference.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    assert losses(run) == losses(reference)


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in run.train_metrics_file.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_killed_job_is_finished_by_resume(infer_reference, tmp_path):
    """SIGKILL gives no warning: the shards keep what was flushed, and `resume` does the rest."""
    proc = submit_cli("infer", "--executor", "slurm", "--nodes", "2", "--gpus", "1", "--output", str(tmp_path), *INFER)
    run, job = run_folder(proc), job_id(proc)
    wait_for("progress", lambda: 0 < inputs_done(run) < 900, poll_s=0.2)
    subprocess.run(["scancel", "--signal=KILL", job], check=True)
    assert final_state(run) in ("FAILED", "CANCELLED")
    assert not run.results_file.exists()
    kept = inputs_done(run)
    assert 0 < kept < 1000

    resumed = submit_cli("resume", str(run.path), "--wait")
    assert "attempt 1" in resumed.stdout and "1000" in resumed.stdout  # the summary counts every input
    assert run.results_file.read_bytes() == infer_reference.results_file.read_bytes()
    assert final_state(run) == "COMPLETED"  # sacct may still say RUNNING for a moment
    assert f"inputs left ({kept} done earlier)" in submit_cli("logs", str(run.path), "--rank", "0").stdout


def test_status_list_logs_cancel_and_resume_on_a_finetune_job(slurm_cluster, cache_dir, tmp_path):
    root = tmp_path / "runs"
    proc = submit_cli(
        "finetune", "--executor", "slurm", "--nodes", "1", "--gpus", "2", "--output", str(root), *FINETUNE
    )
    run = run_folder(proc)
    assert f"python submit.py status {run.path}" in proc.stdout

    wait_for("a few steps", lambda: steps_done(run) >= 3, poll_s=0.2)
    text = submit_cli("status", str(run.path)).stdout
    assert f"{run.path.name}  finetune  slurm:{job_id(proc)}  RUNNING  step " in text and "/40, loss " in text

    # cancel: scancel sends SIGTERM first, which the ranks treat like the preemption signal.
    assert submit_cli("cancel", str(run.path)).stdout.strip() == f"cancelled slurm job {job_id(proc)}"
    assert final_state(run) == "CANCELLED"
    saved = status(run)["progress"]["checkpoints"]
    assert saved, "the ranks save a checkpoint at the SIGTERM of scancel"
    listing = submit_cli("list", "--root", str(root)).stdout.splitlines()
    assert len(listing) == 1 and "CANCELLED" in listing[0] and run.path.name in listing[0]
    [listed] = json.loads(submit_cli("list", "--root", str(root), "--json").stdout)
    assert listed["state"] == "CANCELLED" and listed["kind"] == "finetune"

    resumed = submit_cli("resume", str(run.path), "--wait")
    assert "val loss" in resumed.stdout  # the summary
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    resumed_at = int(saved[-1].removeprefix("step-"))
    assert f"resuming at step {resumed_at}" in submit_cli("logs", str(run.path), "--rank", "0").stdout
    assert final_state(run) == "COMPLETED"
    s = status(run)
    assert s["progress"]["step"] == 40 and s["attempt"] == 1
    # A finished run is not resubmitted.
    assert "already complete" in submit_cli("resume", str(run.path)).stdout


def test_logs_of_a_one_process_local_run(cache_dir, tmp_path):
    run = run_folder(
        submit_cli("infer", "--executor", "local", "--output", str(tmp_path), "--set", "data.max_samples=8")
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
