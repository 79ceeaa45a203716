"""A node lost mid-run, on the real local Slurm cluster (slurm/start-cluster.sh, SlurmdTimeout=10).

Node n2 stops answering: its slurmd, the job's step daemon and processes there are frozen (SIGSTOP), as
on a node that hangs or loses its network. Slurm marks it DOWN and the job ends NODE_FAIL; being
requeueable, it is requeued and waits for two nodes. Then n2 reboots: the frozen processes are killed
and its slurmd starts again; the requeued job runs as the next attempt and finishes the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from llmbatch.rundir import RunDir, read_jsonl
from llmbatch.shards import read_records

from helpers import REPO, run_folder, submit_cli, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

INFER = [
    "--set",
    "data.max_samples=120",
    "--set",
    "generation.max_new_tokens=16",
    "--set",
    "generation.engine=hf",
    "--set",
    "generation.batch_tokens=160",
]
FINETUNE = [
    arg
    for setting in (
        "data.max_samples=60",
        "train.max_steps=16",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        "train.eval_every_steps=100",
        "train.save_every_steps=4",
        "train.keep_last=2",
        "train.eval_accuracy=false",
    )
    for arg in ("--set", setting)
]


def sacct_records(job_id: str) -> list[tuple[str, str]]:
    """(state, nodes) of every run of the job, a requeued job's earlier runs included."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "--format=State,NodeList"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line]


def node_processes(node: str, job_id: str) -> list[psutil.Process]:
    """What runs on `node` of this cluster: its slurmd, and the job's step daemon and processes there."""
    conf = os.environ["SLURM_CONF"]
    slurmd = int((Path(conf).parent.parent / "run" / f"slurmd-{node}.pid").read_text().split()[0])
    found = {slurmd: psutil.Process(slurmd)}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SLURM_CONF") == conf and env.get("SLURMD_NODENAME") == node and env.get("SLURM_JOB_ID") == job_id:
            found[proc.pid] = proc
            parent = proc.parent()
            if parent is not None and parent.name().startswith("slurmstepd"):
                found[parent.pid] = parent
    return list(found.values())


def lose_node_and_bring_it_back(run: RunDir, node: str, job_id: str) -> None:
    frozen = node_processes(node, job_id)
    assert len(frozen) >= 3, frozen  # slurmd, step daemon, node job (and its launcher and rank)
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    wait_for("NODE_FAIL", lambda: any(state == "NODE_FAIL" for state, _ in sacct_records(job_id)), timeout=120)
    status = submit_cli("status", str(run.path)).stdout
    assert "NODE_FAIL on n[1-2]" in status, status
    assert f"{node} is down" in status, status
    for proc in frozen:  # the node reboots
        proc.send_signal(signal.SIGKILL)
    started = subprocess.run(
        ["bash", str(REPO / "slurm" / "start-cluster.sh")], capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, started.stderr[-3000:]


def finished(run: RunDir, job_id: str, done_file: Path) -> bool:
    records = sacct_records(job_id)
    assert not records or records[-1][0] not in ("FAILED", "CANCELLED", "TIMEOUT"), records
    return done_file.exists() and records[-1][0] == "COMPLETED"


def test_inference_survives_a_lost_node(slurm_cluster, cache_dir, tmp_path):
    reference = run_folder(submit_cli("infer", "--executor", "local", "--output", str(tmp_path / "ref"), *INFER))
    run = run_folder(
        submit_cli(
            "infer", "--executor", "slurm", "--nodes", "2", "--gpus", "1", "--output", str(tmp_path / "runs"), *INFER
        )
    )
    job_id = run.read_state()["job_ids"][-1]
    wait_for(
        "results of the rank on n2",
        lambda: any(read_records(p) for p in run.shards_dir.glob("attempt-000-rank-00001.jsonl")),
        timeout=300,
    )
    lose_node_and_bring_it_back(run, "n2", job_id)

    wait_for("the requeued job", lambda: finished(run, job_id, run.results_file), timeout=400)
    assert run.results_file.read_bytes() == reference.results_file.read_bytes()
    assert run.read_state()["attempt"] == 1  # requeued by Slurm, not resumed by hand
    assert [state for state, _ in sacct_records(job_id)] == ["NODE_FAIL", "COMPLETED"]


def test_finetuning_survives_a_lost_node_on_the_exact_trajectory(slurm_cluster, cache_dir, tmp_path):
    reference = run_folder(
        submit_cli("finetune", "--executor", "local", "--gpus", "2", "--output", str(tmp_path / "ref"), *FINETUNE)
    )
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
            str(tmp_path / "runs"),
            *FINETUNE,
        )
    )
    job_id = run.read_state()["job_ids"][-1]
    wait_for(
        "a step past the first checkpoint",
        lambda: any(row.get("step", 0) >= 5 for row in read_jsonl(run.train_metrics_file)),
        timeout=300,
    )
    lose_node_and_bring_it_back(run, "n2", job_id)

    wait_for("the requeued job", lambda: finished(run, job_id, run.metrics_file), timeout=400)
    assert [state for state, _ in sacct_records(job_id)] == ["NODE_FAIL", "COMPLETED"]
    assert run.read_state()["attempt"] == 1  # requeued by Slurm, not resumed by hand
    assert "resuming at step " in run.node_log(0).read_text()
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        reference.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "epoch")
    assert [tuple(r.get(k) for k in keys) for r in read_jsonl(run.train_metrics_file)] == [
        tuple(r.get(k) for k in keys) for r in read_jsonl(reference.train_metrics_file)
    ]
    assert json.loads(run.metrics_file.read_text())["world_size"] == 2
