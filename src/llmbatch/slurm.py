"""Turn a spec's resources into a submitit executor: Slurm on a cluster, a local process elsewhere."""

from __future__ import annotations

import dataclasses
import math
import shlex
import shutil
import sys
from collections.abc import Sequence

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from llmbatch.jobstep import LaunchPlan
from llmbatch.node import NodeJob
from llmbatch.rundir import RunDir
from llmbatch.spec import JobSpec, slurm_time_seconds


def pick_executor(choice: str) -> str:
    """`auto` means Slurm where `sbatch` is on PATH, else this machine."""
    if choice != "auto":
        return choice
    return "slurm" if shutil.which("sbatch") else "local"


def slurm_parameters(spec: JobSpec) -> dict:
    """submitit SlurmExecutor parameters: one task per node, which starts all ranks of that node."""
    res = spec.resources
    params = {
        "job_name": spec.name,
        "nodes": res.nodes,
        "ntasks_per_node": 1,
        "gpus_per_node": res.gpus_per_node,
        "cpus_per_task": res.cpus_per_gpu * res.gpus_per_node,
        "time": math.ceil(slurm_time_seconds(res.time) / 60),
        # Slurm sends submitit's preemption signal (USR2) this long before the time limit.
        "signal_delay_s": res.signal_delay_s,
        # One node's failure ends the step at once instead of leaving the others waiting on it.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if res.array is not None:  # used by array submissions only: #SBATCH --array=0-(N-1)%M
        params["array_parallelism"] = res.array_max_running or res.array
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(res, key) is not None:
            params[key] = getattr(res, key)
    if res.sbatch_extra:
        # A flag without a value (`exclusive: ""`) is written as a bare `#SBATCH --exclusive`.
        params["additional_parameters"] = {
            k.replace("-", "_"): v if v != "" else True for k, v in res.sbatch_extra.items()
        }
    return params


def make_executor(executor: str, spec: JobSpec, run: RunDir) -> submitit.Executor:
    res = spec.resources
    if executor == "slurm":
        ex = submitit.SlurmExecutor(folder=run.submitit_dir, max_num_timeout=res.max_requeues)
        ex.update_parameters(**slurm_parameters(spec))
        return ex
    ex = submitit.LocalExecutor(folder=run.submitit_dir)
    ex.update_parameters(
        timeout_min=math.ceil(slurm_time_seconds(res.time) / 60),
        nodes=1,
        tasks_per_node=1,
        gpus_per_node=res.gpus_per_node,
        signal_delay_s=res.signal_delay_s,
    )
    return ex


def sbatch_script(spec: JobSpec, run: RunDir) -> str:
    """The batch script that `submit` hands to sbatch for this spec (for --dry-run).

    Needs no Slurm binaries: submitit's SlurmExecutor refuses to exist where `srun` is missing, so
    this renders submitit's own template with the executor's parameters and command line.
    """
    folder = run.submitit_dir
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=spec.resources.array, **slurm_parameters(spec))


def submit(ex: submitit.Executor, plan: LaunchPlan) -> submitit.Job:
    return ex.submit(NodeJob(plan))


def submit_array(ex: submitit.Executor, plan: LaunchPlan, tasks: Sequence[int]) -> list[submitit.Job]:
    """One Slurm job array (submitit's batch) whose i-th job runs array task tasks[i]: all tasks at
    first, the unfinished ones on `resume`. The task is in each job's pickle, not read from
    SLURM_ARRAY_TASK_ID, which counts the jobs of this submission. (One task is a plain job.)"""
    with ex.batch():
        jobs = [ex.submit(NodeJob(dataclasses.replace(plan, task=task))) for task in tasks]
    return jobs
