"""The job step: spec -> launch plan -> the command each node runs. Pure: no submitit, no torch.

`make_plan` fixes at submission everything the nodes need (`LaunchPlan`, pickled into the job).
`NodePlace` is where one node stands in the job, read on the node itself (`llmbatch.node`).
`node_command(plan, place)` is the one place that builds a node's command: the `accelerate launch`
argv, wrapped in the container runtime, with the variables the ranks need. The node job runs it, the
dry run prints it, and the tests and the benchmark launch runners with it.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmbatch.container import ContainerCommand, check_run_folder_binds, wrap_command
from llmbatch.models import host_folder
from llmbatch.rundir import RunDir
from llmbatch.spec import ContainerSpec, JobSpec

RUNNERS = {"infer": "llmbatch.runners.infer", "finetune": "llmbatch.runners.finetune"}


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the nodes need, decided once at submission."""

    run_dir: str
    runner: str
    """The runner module every rank executes: llmbatch.runners.infer or llmbatch.runners.finetune."""
    nodes: int
    gpus_per_node: int
    """One rank per GPU (CPU processes where there is none)."""
    mixed_precision: str
    """For the GPU path (bf16 for training); CPU always runs without."""
    container: ContainerSpec
    binds: tuple[str, ...]
    """Host folders the ranks need inside a container: run folder, data, model, cache."""
    cpu_threads_per_proc: int = 1
    max_requeues: int = 3
    signal_delay_s: int = 120
    """Slurm's warning before the kill: the ranks have most of it to save."""
    collective_timeout_s: int = 600
    """A rank whose heartbeat is older than this fails the job (`llmbatch.node`)."""
    attempt_base: int = 0
    """`resume` resubmits with this past the attempts already made; Slurm's restart count adds to it."""
    task: int | None = None
    """The array task this job runs (`resources.array`): its share of the inputs; None: not an array."""
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def num_processes(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class NodePlace:
    """Where this node stands in the job: read from the environment on the node itself."""

    node_rank: int
    main_host: str
    port: int
    attempt: int
    job_id: str
    use_cuda: bool


def example_place(nodes: int) -> NodePlace:
    """Node 0 of a job not yet submitted, on GPUs: for the dry run, and for building the node command
    once before anything is queued, so that a container mistake is found here, not on the node."""
    return NodePlace(
        node_rank=0,
        main_host="<first host of SLURM_JOB_NODELIST>" if nodes > 1 else "127.0.0.1",
        port=0,
        attempt=0,
        job_id="<job id>",
        use_cuda=True,
    )


def binds_for(spec: JobSpec, run_path: Path) -> tuple[str, ...]:
    """Host folders the ranks read or write: bound into a container at the same path."""
    paths = [run_path, host_folder(spec.model.path)]
    paths += [Path(p).parent for p in (spec.data.path, spec.data.val_path) if p]
    if spec.model.adapter:
        paths.append(host_folder(spec.model.adapter))
    return tuple(dict.fromkeys(str(p) for p in paths))


def make_plan(spec: JobSpec, run_path: Path, attempt_base: int = 0) -> LaunchPlan:
    res = spec.resources
    return LaunchPlan(
        run_dir=str(run_path),
        runner=RUNNERS[spec.kind],
        nodes=res.nodes,
        gpus_per_node=res.gpus_per_node,
        mixed_precision="bf16" if spec.kind == "finetune" else "no",
        container=spec.container,
        binds=binds_for(spec, run_path),
        cpu_threads_per_proc=res.cpus_per_gpu,
        max_requeues=res.max_requeues,
        signal_delay_s=res.signal_delay_s,
        collective_timeout_s=res.collective_timeout_s,
        attempt_base=attempt_base,
        **({"python": spec.container.python} if spec.container.runtime != "none" else {}),
    )


RENDEZVOUS_PORTS = range(10000, 32768)
"""Below Linux's ephemeral range (32768-60999): a port there can be held by any outgoing connection on
the node, and the rendezvous then fails with EADDRINUSE."""
PORT_STRIDE = 7919
"""Between a job's later choices: prime to the range's size, so they visit every port."""


def rendezvous_ports(job_id: str, restarts: int, array_tasks: int = 1) -> Iterator[int]:
    """A job's rendezvous ports, its first choice first, from its Slurm job id (`123`, or an array
    task's `123_4`), Slurm's restart count and the array's task count.

    The array's id picks a base; the task and the attempt pick a slot after it, a different slot for
    every (task, attempt) of the array, so that the tasks of one array, which often share a node, and
    a requeued attempt (whose predecessor's port may not yet be free) never get the same first choice.
    Different jobs still may: a node job of one node takes the first port that is free on it.
    """
    array_id, _, index = job_id.partition("_")
    first = zlib.crc32(array_id.encode()) + int(index or 0) + restarts * array_tasks
    for k in range(len(RENDEZVOUS_PORTS)):
        yield RENDEZVOUS_PORTS.start + (first + k * PORT_STRIDE) % len(RENDEZVOUS_PORTS)


def build_launch_argv(plan: LaunchPlan, place: NodePlace) -> list[str]:
    """The `accelerate launch` argv for one node."""
    argv = [
        plan.python,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        str(plan.nodes),
        "--num_processes",
        str(plan.num_processes),
        "--machine_rank",
        str(place.node_rank),
        "--main_process_ip",
        place.main_host,
        "--main_process_port",
        str(place.port),
        "--mixed_precision",
        plan.mixed_precision if place.use_cuda else "no",
        "--dynamo_backend",
        "no",
    ]
    if plan.num_processes > 1:
        # --multi_gpu is also what starts several processes on CPU (with ACCELERATE_USE_CPU).
        argv += [
            "--multi_gpu",
            "--max_restarts",
            "0",
            "--monitor_interval",
            "1",
            "--tee",
            "3",
            "--log_dir",
            str(RunDir(Path(plan.run_dir)).rank_log_dir(place.node_rank, plan.task)),
        ]
    if not place.use_cuda:
        argv += ["--num_cpu_threads_per_process", str(plan.cpu_threads_per_proc)]
    argv += ["-m", plan.runner, "--run-dir", plan.run_dir, "--attempt", str(place.attempt)]
    return argv + (["--task", str(plan.task)] if plan.task is not None else [])


def launch_env(place: NodePlace) -> dict[str, str]:
    """Variables the ranks need, passed by name into a container."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # A dead NCCL peer raises instead of hanging until the distributed timeout.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    if place.use_cuda:
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def node_command(plan: LaunchPlan, place: NodePlace) -> ContainerCommand:
    """What one node runs: its `accelerate launch` argv in the container runtime, and the variables
    to add to its environment."""
    check_run_folder_binds(plan.container.binds, plan.run_dir)
    return wrap_command(
        build_launch_argv(plan, place),
        plan.container,
        binds=plan.binds,
        env=launch_env(place),
        use_cuda=place.use_cuda,
        workdir=plan.run_dir,
    )
