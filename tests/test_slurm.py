"""End to end on the real local Slurm cluster (slurm/start-cluster.sh): 2 nodes, 4 fake GPUs each.

The GPUs are fake (gres on character devices), so the ranks run on CPU with gloo; everything else is
the path a cluster job takes: sbatch through submitit, srun on both nodes, `accelerate launch` with
the rendezvous from each node's Slurm environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from llmbatch.slurm import FINAL_STATES, slurm_state

from helpers import REPO, run_folder, submit_cli, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SMALL = ["--set", "data.max_samples=48", "--set", "generation.max_new_tokens=8"]


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
        "data.max_samples=200",
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
