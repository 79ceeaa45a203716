"""Everything that talks to Slurm: the submitit executor a spec's resources make (Slurm on a cluster, a
local process elsewhere), and every call of the Slurm client commands (sacct, squeue, sinfo, scancel),
whose answers are read by the pure `parse_*` functions beside them.

submitit's private API is touched here only (`SUBMITIT_PRIVATE`), against the version pinned in
pyproject.toml (`SUBMITIT_VERSION`; tests/test_slurm_answers.py checks both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError
from submitit.slurm.slurm import _make_sbatch_string

from llmbatch.jobstep import LaunchPlan
from llmbatch.node import NodeJob
from llmbatch.rundir import RunDir
from llmbatch.spec import JobSpec, slurm_time_seconds

SUBMITIT_VERSION = "1.5.4"
"""The submitit release the private names below were read in; pinned in pyproject.toml."""
SUBMIT_MODULE = "submitit.core._submit"
"""What submitit's batch script runs (with the job folder) to unpickle and run the job."""
SUBMITIT_PRIVATE = (
    "submitit.slurm.slurm._make_sbatch_string",
    SUBMIT_MODULE,
    "submitit.core.utils.FailedJobError",
    "submitit.core.utils.FailedSubmissionError",
)
"""Every private name of submitit that llmbatch relies on (and its habit of printing a failed
sbatch's stderr, which `submit` holds back)."""

# Slurm states after which a job will not run again by itself.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmError(Exception):
    """A Slurm client command (sbatch, squeue, scancel, ...) failed: one line naming its own error."""


def pick_executor(choice: str) -> str:
    """`auto` means Slurm where `sbatch` is on PATH, else this machine."""
    if choice != "auto":
        return choice
    return "slurm" if shutil.which("sbatch") else "local"


def slurm_parameters(spec: JobSpec) -> dict:
    """submitit SlurmExecutor parameters: one node job per node (Slurm's task), which starts all ranks of that node."""
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
    command = " ".join([shlex.quote(sys.executable), f"-u -m {SUBMIT_MODULE}", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=spec.resources.array, **slurm_parameters(spec))


def submit(ex: submitit.Executor, plan: LaunchPlan) -> submitit.Job:
    """Submit the run's job; SlurmError if sbatch refused it (nothing was queued)."""
    with _sbatch_errors():
        return ex.submit(NodeJob(plan))


def submit_array(ex: submitit.Executor, plan: LaunchPlan, tasks: Sequence[int]) -> list[submitit.Job]:
    """One Slurm job array (submitit's batch) whose i-th array task runs the run's array task tasks[i]:
    all of them at first, the unfinished ones on `resume`. The run's task is in each pickle, not read
    from SLURM_ARRAY_TASK_ID, which numbers the array tasks of this submission. (A single array task is
    submitted as a plain job.) SlurmError if sbatch refused it."""
    with _sbatch_errors(), ex.batch():
        jobs = [ex.submit(NodeJob(dataclasses.replace(plan, task=task))) for task in tasks]
    return jobs


@contextlib.contextmanager
def _sbatch_errors():
    """sbatch's failure as a SlurmError naming its own error line, instead of submitit's traceback.

    submitit also prints a failing sbatch's whole stderr on ours: that is held back, and passed on
    only when the submission went through (submitit's own warnings)."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except FailedJobError as e:  # sbatch exited non-zero; the message is its stderr
        returncode = e.__cause__.returncode if isinstance(e.__cause__, subprocess.CalledProcessError) else None
        raise SlurmError(f"sbatch failed: {client_error('sbatch', str(e), returncode)}") from None
    except FailedSubmissionError as e:  # sbatch said something else than "Submitted batch job N"
        raise SlurmError(f"sbatch gave no job id: {client_error('sbatch', str(e), None)}") from None
    except OSError as e:  # sbatch went away from PATH, or cannot be run
        raise SlurmError(f"sbatch: cannot run it: {e.strerror or e}") from None
    sys.stderr.write(held.getvalue())


def client_error(command: str, stderr: str, returncode: int | None) -> str:
    """The line of a Slurm client's stderr that says what went wrong, without its `sbatch: error: `.

    Slurm's clients log their way to a failure (`error:` lines, then one `fatal:`): the fatal line is
    the conclusion; without one, the last error line; else the last line; else the exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return f"exit status {returncode}" if returncode is not None else "no error message"
    pick = next((line for line in lines if " fatal: " in f" {line}"), None) or next(
        (line for line in reversed(lines) if " error: " in f" {line}"), lines[-1]
    )
    return re.sub(rf"^(?:{re.escape(command)}: )?(?:(?:error|fatal): )?", "", pick) or pick


# --- the Slurm client commands and their answers --------------------------------------------------


def array_of(job_id: str) -> str:
    """The job array's id of an array task (`123_4` -> `123`); a plain job's own."""
    return job_id.split("_")[0]


def slurm_state(job_id: str) -> str:
    """The job's state from sacct (accounting), falling back to squeue while sacct lags (or where it
    fails: a cluster without accounting); SlurmError when squeue fails too."""
    with contextlib.suppress(SlurmError):
        if state := parse_sacct_state(_query(["sacct", "-j", job_id, "-X", "-n", "-P", "--format=State"])):
            return state
    return parse_squeue_state(_query(["squeue", "-h", "-j", job_id, "-o", "%T"]))


def parse_sacct_state(out: str) -> str | None:
    """The state of sacct's last line of `--format=State` (the latest run of a requeued job); None
    if sacct knows no such job (yet)."""
    lines = out.strip().splitlines()
    return lines[-1].split()[0] if lines else None  # "CANCELLED by 0" -> CANCELLED


def parse_squeue_state(out: str) -> str:
    """squeue's `-o %T` answer: the state, UNKNOWN if squeue does not know the job."""
    lines = out.strip().splitlines()
    return lines[0] if lines else "UNKNOWN"


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """The states of many jobs and array tasks (`123`, `123_4`) in one sacct call (squeue for those
    sacct does not show yet); UNKNOWN for a job neither knows; SlurmError when both fail."""
    arrays = sorted({array_of(job_id) for job_id in job_ids})
    try:
        states = parse_sacct_states(_query(["sacct", "-j", ",".join(arrays), "-X", "-n", "-P", "--format=JobID,State"]))
    except SlurmError:
        states = {}
    if missing := [job_id for job_id in job_ids if job_id not in states]:
        arrays = sorted({array_of(job_id) for job_id in missing})
        for job, state in parse_squeue_states(
            _query(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T"])
        ).items():
            states.setdefault(job, state)
    return {job_id: states.get(job_id, "UNKNOWN") for job_id in job_ids}


def parse_sacct_states(out: str) -> dict[str, str]:
    """sacct's `--format=JobID,State` lines -> the state of each job and array task; a requeued job's
    later line wins, tasks not started yet (`123_[2-4]`) are expanded."""
    states: dict[str, str] = {}
    for line in out.strip().splitlines():
        job, state = line.split("|", 1)
        for one in expand_array_ids(job):
            states[one] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def parse_squeue_states(out: str) -> dict[str, str]:
    """squeue's `-r -o %i|%T` lines -> the state of each job and array task."""
    return dict(line.split("|", 1) for line in out.strip().splitlines())


def expand_array_ids(job: str) -> list[str]:
    """sacct's `123_[2-4,7%2]` (array tasks not started yet) -> 123_2, 123_3, 123_4, 123_7."""
    m = re.fullmatch(r"(\d+)_\[([\d,-]+)(%\d+)?\]", job)
    if m is None:
        return [job]
    ids = []
    for part in m.group(2).split(","):
        low, _, high = part.partition("-")
        ids += [f"{m.group(1)}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def array_state(states: list[str]) -> str:
    """One state for a job array: COMPLETED when every task is; while any runs, RUNNING (or another
    task's active state); once all ended, the first task's that did not complete."""
    if all(state == "COMPLETED" for state in states):
        return "COMPLETED"
    if active := [state for state in states if state not in FINAL_STATES]:
        return "RUNNING" if "RUNNING" in active else active[0]
    return next(state for state in states if state != "COMPLETED")


def slurm_history(job_id: str) -> dict[str, str]:
    """What Slurm saw happen to the job, for `status`: every run of it (a requeued job has several),
    and the nodes it last ran on that are down now (a lost node: NODE_FAIL). Extra detail: nothing
    where sacct or sinfo fail."""
    try:
        runs = parse_sacct_history(_query(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "--format=State,NodeList"]))
        history = {"slurm history": line} if (line := history_line(runs)) else {}
        if ran_on := [nodes for _, nodes in runs if nodes not in ("", "None assigned")]:
            sinfo = ["sinfo", "-h", "-N", "-n", ran_on[-1], "-t", "down,drain,fail,no_respond", "-o", "%N|%T|%E"]
            if down := parse_sinfo_down(_query(sinfo)):
                history["nodes down"] = down
    except SlurmError:
        return {}
    return history


def parse_sacct_history(out: str) -> list[tuple[str, str]]:
    """sacct's `-D --format=State,NodeList` lines -> (state, nodes) of every run of the job."""
    return [
        (state.split()[0], nodes) for state, nodes in (line.split("|", 1) for line in out.splitlines() if "|" in line)
    ]


def history_line(runs: list[tuple[str, str]]) -> str | None:
    """The job's runs in one line, worth showing when it ran more than once or ended badly."""
    if len(runs) > 1 or runs and runs[-1][0] in FINAL_STATES - {"COMPLETED"}:
        return ", then ".join(f"{state} on {nodes}" for state, nodes in runs)
    return None


def parse_sinfo_down(out: str) -> str | None:
    """sinfo's `-N -o %N|%T|%E` lines for down nodes -> one line naming each, its state and reason."""
    lines = sorted(set(out.strip().splitlines()))
    if not lines:
        return None
    return "; ".join(
        f"{node} is down ({state}: {reason})" for node, state, reason in (line.split("|", 2) for line in lines)
    )


def scancel(job_ids: list[str]) -> None:
    """Cancel Slurm jobs (a whole array by its id); SlurmError if scancel fails."""
    _query(["scancel", *job_ids])


QUERY_TIMEOUT_S = 30


def _query(argv: list[str]) -> str:
    """A Slurm client's answer (stdout); SlurmError naming its own error where it fails.

    squeue's "Invalid job id" is an answer: a job that ended long ago, which squeue no longer knows."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]}: no answer in {QUERY_TIMEOUT_S} s; is the Slurm controller up?") from None
    except OSError as e:
        raise SlurmError(f"{argv[0]}: cannot run it: {e.strerror or e}") from None
    if done.returncode != 0:
        if argv[0] == "squeue" and "Invalid job id" in done.stderr:
            return ""
        raise SlurmError(f"{argv[0]} failed: {client_error(argv[0], done.stderr, done.returncode)}")
    return done.stdout.strip()
