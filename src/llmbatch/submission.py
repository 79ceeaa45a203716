"""Submission and resume: a new run folder and its job, a stopped run's next job, and the wait for
either. What is checked before anything is queued raises UsageError (one line, exit code 2); Ctrl-C
raises Interrupted, naming what became of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmbatch import COMMAND, lifecycle, slurm
from llmbatch.checkpoints import CheckpointMismatch, check_resumable
from llmbatch.data import Rejected
from llmbatch.fingerprint import changed_input, spec_fingerprint
from llmbatch.gather import gather_run
from llmbatch.jobstep import example_place, make_plan, node_command
from llmbatch.rundir import DamagedRun, RunDir, State, Task, atomic_write, process_start_ticks
from llmbatch.shards import list_shards
from llmbatch.spec import JobSpec, dump_spec, load_resolved
from llmbatch.summary import summarize


class UsageError(Exception):
    """Bad input found before anything was queued: one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C, and what became of the run: one line, exit code 130."""


ACTIVE_STATES = ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING")
"""Slurm states of a job that `resume` must not run beside."""
RANK_EXIT_GRACE_S = 15.0
"""How long `resume` lets the ranks of a job that was just killed take to exit."""
CANCEL_WAIT_S = 60.0
"""How long Ctrl-C waits for a local job to end."""


@contextmanager
def interrupts_held(then_drop: bool = False) -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) while the block runs, for work that must happen whole (a job submitted and
    recorded, or neither); it arrives after the block as KeyboardInterrupt, or not at all with `then_drop`.

    Processes started in the block inherit the held signal: a terminal sends Ctrl-C to its whole process
    group, and the local job's controller (submitit's) would die of it with a traceback on our stderr.
    The command line stops the job itself (`lifecycle.cancel`); the node job takes SIGINT again.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if then_drop and signal.SIGINT in signal.sigpending():
            signal.sigwait({signal.SIGINT})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def quiet_stdout() -> None:
    """The reader of our output went away (`| head`): send what is still to come nowhere, so that
    neither a later print nor the interpreter's flush at exit fails again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def require_slurm_commands(executor: str) -> None:
    """Submitting to Slurm needs its client commands here; a dry run does not."""
    missing = [name for name in ("sbatch", "srun") if not shutil.which(name)]
    if executor == "slurm" and missing:
        raise UsageError(
            f"--executor slurm: {' and '.join(missing)} not on PATH (no Slurm client on this "
            f"machine); run where Slurm is, or use --executor local"
        )


def check_job(spec: JobSpec, executor: str, run_path: Path, dry_run: bool = False) -> None:
    """What submission checks past the spec itself, and `resume` again before resubmitting a run
    folder's spec (anyone who can write the run folder can have edited it)."""
    if executor == "local" and spec.resources.nodes > 1:
        raise UsageError(
            f"resources.nodes: {spec.resources.nodes} nodes need Slurm; the local executor "
            f"runs one node (use --executor slurm on a cluster)"
        )
    if executor == "local" and spec.resources.array is not None:
        raise UsageError(
            f"resources.array: a job array ({spec.resources.array} tasks) needs Slurm; the local "
            f"executor runs one job (drop the array, or use --executor slurm on a cluster)"
        )
    if spec.model.quantization != "none" and executor == "local" and not local_cuda():
        # A Slurm job always asks for GPUs (resources.gpus_per_node is at least 1): its nodes have CUDA.
        raise UsageError(
            f"model.quantization: {spec.model.quantization} needs a CUDA GPU (bitsandbytes' 4-bit kernels), "
            f"and this machine, where the local executor runs the job, has none (use --executor slurm, or "
            f"model.quantization: none)"
        )
    try:  # the node command, once here: its container mistakes (binds, variables) must not wait for a node
        node_command(make_plan(spec, run_path), example_place(spec.resources.nodes))
    except ValueError as e:
        raise UsageError(f"container: {e}") from None
    if dry_run:
        return  # it shows the command: the image need not be there yet
    require_slurm_commands(executor)
    image = spec.container.image
    if spec.container.runtime == "apptainer" and image is not None and not Path(image).is_file():
        raise UsageError(f"container.image: no such Apptainer image: {image}")


def local_cuda() -> bool:
    """Whether a job of the local executor would see a CUDA GPU, as its ranks ask (node.py)."""
    import torch  # only here: the command line starts without torch

    return torch.cuda.is_available()


def submit_new_run(
    spec: JobSpec, kind: str, executor: str, inputs: int, rejected: list[Rejected], *, wait: bool
) -> int:
    """Create the run folder for a checked spec, submit its job and (see `submit_and_wait`) wait.
    `rejected`: the records data.on_bad_record: skip left out, for rejected.jsonl."""
    with interrupts_held():  # a run folder is whole (spec and state), or not there
        try:
            run = RunDir.create(spec.output.root, spec.name)
        except OSError as e:
            raise UsageError(
                f"output.root: cannot create a run folder in {spec.output.root}: {e.strerror or e}"
            ) from None
        atomic_write(run.spec_file, dump_spec(spec))
        skipping = spec.data.on_bad_record == "skip"
        if skipping:  # written even when empty: the run says none was left out
            atomic_write(run.rejected_file, "".join(json.dumps(r.as_json()) + "\n" for r in rejected))
        # What `resume` needs if none was submitted, and the inputs a resume must find unchanged.
        run.update_state(
            **{
                State.KIND: kind,
                State.EXECUTOR: executor,
                State.INPUTS: inputs,
                **({State.REJECTED_RECORDS: len(rejected)} if skipping else {}),
                State.INPUTS_FINGERPRINT: spec_fingerprint(spec),
            }
        )
    try:
        return submit_and_wait(spec, run, executor, wait=wait, header=f"run folder: {run.path}")
    except KeyboardInterrupt:  # before the job was submitted (submit_and_wait says what happened after)
        raise Interrupted(
            f"interrupted; nothing was submitted; submit the run with: {COMMAND} resume {run.path}"
        ) from None
    except slurm.SlurmError as e:  # sbatch refused the job: a run folder that never ran is no run
        shutil.rmtree(run.path, ignore_errors=True)
        raise UsageError(f"{e}; nothing was submitted (--executor local runs it on this machine)") from None


def local_identity(executor: str, job) -> dict:
    """What tells a local job's process from a later one that reuses its pid (`status`, `cancel`)."""
    if executor != "local":
        return {}
    return {State.LOCAL_START_TICKS: process_start_ticks(int(job.job_id))}


def submit_and_wait(
    spec: JobSpec,
    run: RunDir,
    executor: str,
    *,
    wait: bool,
    header: str,
    attempt_base: int = 0,
    tasks: list[int] | None = None,
) -> int:
    """Submit the run's job step (of a job array, `tasks`: all of them by default) and record its job
    id; then, unless it went to Slurm without --wait, wait for it and print the summary."""
    try:  # so that a job that fills the file system can still say so (runners/faults.py)
        run.reserve_space()
    except OSError as e:
        raise UsageError(f"{run.path}: cannot write there: {e.strerror}") from None
    ex, plan = slurm.make_executor(executor, spec, run), make_plan(spec, run.path, attempt_base)
    log_start = run.node_log(0).stat().st_size if run.node_log(0).exists() else 0  # earlier attempts' end
    with interrupts_held():  # a job is submitted and recorded, or none is
        submitit_files = _files(run.submitit_dir)
        try:
            if spec.resources.array is None:
                jobs = [slurm.submit(ex, plan)]
                job_id = jobs[0].job_id
            else:
                tasks = list(range(spec.resources.array)) if tasks is None else tasks
                # Before any task records itself.
                run.update_state(**{State.RANKS_PER_TASK: spec.resources.gpus_per_node})
                jobs = slurm.submit_array(ex, plan, tasks)
                job_id = slurm.array_of(jobs[0].job_id)  # the array's; its tasks are <id>_<index>
                run.update_tasks({task: {Task.JOB_ID: job.job_id} for task, job in zip(tasks, jobs)})
        except slurm.SlurmError:
            # Nothing was queued: the run folder stays as it was, less submitit's pickle and script.
            for path in _files(run.submitit_dir) - submitit_files:
                path.unlink(missing_ok=True)
            run.release_space()
            raise
        run.update_state(
            **{
                State.EXECUTOR: executor,
                State.JOB_IDS: run.read_state().get(State.JOB_IDS, []) + [job_id],
                **local_identity(executor, jobs[0]),
            }
        )
    attempt = f" (attempt {attempt_base})" if attempt_base else ""
    lines = [header, f"{executor} job: {job_id}{attempt}"] + (
        [f"array tasks: {' '.join(map(str, tasks))}"] if tasks is not None else []
    )
    if executor == "slurm" and not wait:
        try:
            print("\n".join(lines + [f"follow it with: {COMMAND} status {run.path}"]))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {executor} job {job_id} is queued: {COMMAND} status {run.path}") from None
        return 0
    return wait_and_summarize(jobs, run, "\n".join(lines), show_log_from=log_start if executor == "local" else None)


def _files(folder: Path) -> set[Path]:
    return set(folder.iterdir()) if folder.is_dir() else set()


def wait_and_summarize(jobs: list, run: RunDir, header: str, show_log_from: int | None) -> int:
    """Print `header` (and node 0's log from byte `show_log_from` as it grows: this attempt's), wait for
    the jobs, print the summary.

    A reader of our output that goes away (`| head`) is no failure of the job: it runs on, and its
    outcome decides the exit code. Ctrl-C cancels the job."""
    try:
        try:
            print(header, flush=True)
            if show_log_from is not None:
                lifecycle.follow(run.node_log(0), lambda: not jobs[0].done(), offset=show_log_from)
        except BrokenPipeError:
            quiet_stdout()
        while not all(job.done() for job in jobs):
            time.sleep(0.5)
        for job in jobs:
            job.results()  # one result per node; any node's error is raised here
    except KeyboardInterrupt:
        with interrupts_held(then_drop=True):  # a second Ctrl-C must not stop the cancel halfway
            ended = cancel_jobs(run, jobs)
        if not ended:
            raise Interrupted(
                f"interrupted; cancelled the job, which is still ending; see: {COMMAND} status {run.path}"
            ) from None
        raise Interrupted(f"interrupted; cancelled the job; resume with: {COMMAND} resume {run.path}") from None
    except Exception as e:  # the job's own error, already logged in the run folder
        # A rank's own line says it all (a full disk, a silent rank); else the job's error and log tail.
        print(f"run folder: {run.path}\njob failed: {lifecycle.rank_error(run) or e}", file=sys.stderr)
        return 1
    print(summarize(run))
    return 0


def cancel_jobs(run: RunDir, jobs: list) -> bool:
    """Cancel the run's job (`cancel RUN`'s way); whether it has ended.

    A local job that is still starting does not take the signal yet (submitit's start-up passes SIGTERM
    by until the node job runs), so it is sent again until the job ends. Slurm's scancel needs once."""
    deadline = time.monotonic() + CANCEL_WAIT_S
    while True:
        lifecycle.cancel(run)
        if run.read_state().get(State.EXECUTOR) == "slurm":
            return True
        time.sleep(1.0)
        if all(job.done() for job in jobs):
            return True
        if time.monotonic() > deadline:
            return False


def wait_for_ranks_to_end(run: RunDir, grace_s: float) -> list[dict]:
    """The ranks of earlier attempts still alive here after `grace_s` seconds ([] once all ended)."""
    deadline = time.monotonic() + grace_s
    while (live := run.live_ranks()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return live


def resume_run(run: RunDir, executor_choice: str | None, *, wait: bool) -> int:
    """Resubmit a stopped run from its folder (on `executor_choice`, else where it ran before); the
    runners pick up shards and checkpoints there."""
    try:
        return _resume(run, executor_choice, wait=wait)
    except slurm.SlurmError as e:  # asking for the job's state, or sbatch
        raise UsageError(f"{e}; nothing was submitted") from None
    except KeyboardInterrupt:  # before a job was submitted (submit_and_wait says what happened after)
        raise Interrupted(f"interrupted; nothing was submitted; resume with: {COMMAND} resume {run.path}") from None


def _resume(run: RunDir, executor_choice: str | None, *, wait: bool) -> int:
    with run.exclusive("resume"):  # held until this resume's job is submitted (and waited for)
        status = lifecycle.run_status(run)
        if status.state in ACTIVE_STATES:
            raise UsageError(f"{run.path}: job {status.job_id} is {status.state}; cancel it first")
        if run.gathered_results() is not None or (status.kind == "finetune" and run.adapter_dir.exists()):
            print(f"{run.path}: already complete, nothing to resume")
            return 0
        spec = load_resolved(run.spec_file)
        saved = run.read_state().get(State.INPUTS_FINGERPRINT)  # none in a run from before fingerprints
        if saved is not None and not isinstance(saved, dict):
            raise DamagedRun(f"{run.state_file}: damaged, inputs_fingerprint is not a JSON object")
        if saved and (why := changed_input(saved, spec)):
            raise UsageError(why)
        executor = slurm.pick_executor(executor_choice) if executor_choice else status.executor
        check_job(spec, executor, run.path)
        if spec.kind == "finetune":
            try:
                check_resumable(run.checkpoints_dir, spec)
            except CheckpointMismatch as e:
                raise UsageError(str(e)) from None
        if live := wait_for_ranks_to_end(run, RANK_EXIT_GRACE_S):
            raise UsageError(
                f"{run.path}: {live[0]['name']} is still running here (pid {live[0]['pid']}), "
                f"though its job has ended; stop it before resuming, or two attempts would "
                f"write the same results"
            )
        if not status.tasks:
            return submit_and_wait(
                spec, run, executor, wait=wait, header=f"resumed {run.path}", attempt_base=status.attempt + 1
            )
        if executor != "slurm":
            raise UsageError(f"{run.path}: a job array resumes on Slurm only (--executor slurm)")
        if not (tasks := lifecycle.unfinished_tasks(run)):
            print(f"{run.path}: every array task finished its share; gathering here")
            return gather_run(run)
        # Past every attempt of every task: a task's shards of earlier attempts are what it skips.
        attempt_base = max([status.attempt, *(s.attempt for s in list_shards(run))]) + 1
        return submit_and_wait(
            spec, run, executor, wait=wait, header=f"resumed {run.path}", attempt_base=attempt_base, tasks=tasks
        )
