"""End to end on the real local Slurm cluster (slurm/start-cluster.sh): 2 nodes, 4 fake GPUs each.

The GPUs are fake (gres on character devices), so the ranks run on CPU with gloo; everything else is
the path a cluster job takes: sbatch through submitit, srun on both nodes, `accelerate launch` with
the rendezvous from each node's Slurm environment.

Jobs are started, signalled, killed and inspected the way a user would: `submit.py` for submission,
`status`, `logs`, `list`, `cancel` and `resume`, and `scancel --signal=...` for what Slurm sends
before a preemption or the time limit (USR2, submitit's signal) and for a node that dies (KILL).

Jobs end once their outputs are on disk: a 2-node fine-tuning job could hang at exit in gloo's
teardown (the process group, destroyed when the rank's main returned and freed DDP's reducer, joined a
gloo thread that waited for Python's lock); torchrun's exit barrier then held the allocation 300 s.
The hang came in some runs only (about 1 in 20), so that job runs several times; the mechanism is
checked on every run by test_finetune.py. Job arrays: test_arrays.py; a lost node: test_faults.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time

import pytest

from llmbatch.rundir import read_jsonl
from llmbatch.slurm import FINAL_STATES, slurm_state

from helpers import JOBS, REPO, job_id, run_folder, status, submit_cli, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


SMALL = ["--set", "data.max_inputs=48", "--set", "generation.max_new_tokens=8"]


def test_infer_on_two_nodes_matches_one_local_process(slurm_cluster, cache_dir, tmp_path):
    local = run_folder(
        submit_cli("infer", "--executor", "local", "--gpus", "1", "--output", str(tmp_path / "a"), *SMALL)
    )
    proc = submit_cli(
        "infer", "--executor", "slurm", "--nodes", "2", "--gpus", "2", "--wait", "--output", str(tmp_path / "b"), *SMALL
    )
    run = run_folder(proc)
    commands = [json.loads(line) for line in run.commands_file.read_text().splitlines()]
    assert sorted((c["node"], c["host"]) for c in commands) == [(0, "n1"), (1, "n2")]
    for c in commands:
        argv = c["argv"]
        assert argv[argv.index("--num_processes") + 1] == "4"
        assert argv[argv.index("--machine_rank") + 1] == str(c["node"])
        assert argv[argv.index("--main_process_ip") + 1] == "n1"
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["world_size"] == 4
    assert run.results_file.read_bytes() == local.results_file.read_bytes()
    assert len(run.results_file.read_text().splitlines()) == 48
    assert "accuracy" in proc.stdout  # the summary
    # --dry-run's preview (built without Slurm binaries) is the script that sbatch really got.
    from llmbatch.slurm import sbatch_script
    from llmbatch.spec import load_resolved

    job_id = run.read_state()["job_ids"][0]
    submitted = (run.submitit_dir / f"{job_id}_submission.sh").read_text()
    assert sbatch_script(load_resolved(run.spec_file), run) == submitted


def test_finetune_on_two_nodes_saves_an_adapter(slurm_cluster, cache_dir, tmp_path):
    proc = submit_cli(
        "finetune",
        "--executor",
        "slurm",
        "--nodes",
        "2",
        "--gpus",
        "2",
        "--wait",
        "--output",
        str(tmp_path),
        "--set",
        "train.max_steps=6",
        "--set",
        "train.eval_every_steps=3",
        "--set",
        "data.max_inputs=200",
    )
    run = run_folder(proc)
    assert (run.adapter_dir / "adapter_config.json").is_file()
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads(run.metrics_file.read_text())["world_size"] == 4


def test_a_crashing_rank_fails_the_job_quickly(slurm_cluster, make_run, monkeypatch):
    """Rank 3 (on node n2) raises while ranks 0-2 wait in a collective: FAILED, with the error logged."""
    from llmbatch import slurm
    from llmbatch.jobstep import make_plan
    from llmbatch.spec import load_resolved

    run = make_run("infer", overrides=["resources.nodes=2", "resources.gpus_per_node=2"])
    spec = load_resolved(run.spec_file)
    plan = dataclasses.replace(make_plan(spec, run.path), runner="crashing_runner")
    # sbatch passes the environment on to the nodes, and the node job to the ranks.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    job = slurm.submit(slurm.make_executor("slurm", spec, run), plan)
    with pytest.raises(Exception, match="crashed on purpose|failed"):
        job.results()
    elapsed = time.monotonic() - started
    # sacct lags the job's end by a moment.
    final = wait_for(
        "a final state in sacct", lambda: (state := slurm_state(job.job_id)) in FINAL_STATES and state, timeout=30
    )
    assert final == "FAILED"
    assert elapsed < 120, f"the job took {elapsed:.0f} s to fail"
    assert "rank 3 crashed on purpose" in run.node_log(1).read_text()


# --- preemption, requeue, kills and the lifecycle commands ----------------------------------------


# 1,000 inputs, one per batch: about 10 s on two ranks, so a signal lands mid-run.
INFER = [
    "--set",
    f"data.path={JOBS / 'data/parity/train.jsonl'}",
    "--set",
    "data.max_inputs=1000",
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
    "data.max_inputs=400",
]


def inputs_done(run) -> int:
    return status(run)["progress"].get("done", 0)


def steps_done(run) -> int:
    return max((row.get("step", 0) for row in read_jsonl(run.train_metrics_file)), default=0)


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
    assert 5 <= stopped_at < 40  # mid-epoch: an epoch of 400 inputs is longer than 40 steps here
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


# --- jobs end once their outputs are on disk ------------------------------------------------------


RUNS = 5
EXIT_BOUND_S = 60
"""From metrics.json on disk to the job's end: a clean exit takes seconds; a hang held the job 300 s."""
FINETUNE_3_STEPS = [
    arg
    for setting in (
        "data.max_inputs=40",
        "train.max_steps=3",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every_steps=100",
        "train.save_every_steps=100",
        "train.eval_accuracy=false",
    )
    for arg in ("--set", setting)
]


def test_two_node_finetuning_ends_after_its_outputs_every_time(slurm_cluster, cache_dir, tmp_path):
    exits = []
    for i in range(RUNS):
        run = run_folder(
            submit_cli(
                "finetune",
                "--executor",
                "slurm",
                "--nodes",
                "2",
                "--gpus",
                "1",
                "--output",
                str(tmp_path / str(i)),
                *FINETUNE_3_STEPS,
            )
        )
        job_id = run.read_state()["job_ids"][-1]
        wait_for(f"run {i}'s metrics.json", run.metrics_file.exists, timeout=300)
        written = time.time()
        try:
            state = wait_for(
                f"run {i}'s job {job_id} to end within {EXIT_BOUND_S} s of its outputs (exits so far: {exits})",
                lambda: (s := slurm_state(job_id)) in FINAL_STATES and s,
                timeout=EXIT_BOUND_S,
                poll_s=1,
            )
        finally:
            submit_cli("cancel", str(run.path), check=False)  # a hung job must not hold the cluster
        exits.append(round(time.time() - written))
        assert state == "COMPLETED", (i, state, run.node_log(0).read_text()[-3000:])
        assert (run.adapter_dir / "adapter_model.safetensors").is_file()
