"""Run lifecycle: status, logs, cancel, list, read from the run folder and from Slurm itself."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmbatch.metrics import Metric, TrainRow, read_metrics, read_train_metrics, steps
from llmbatch.rundir import RunDir, process_start_ticks
from llmbatch.shards import finished_tasks, read_progress, task_progress

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
# ... and with the local executor's and the run folder's own: nothing of the run is running.
ENDED_STATES = FINAL_STATES | {"STOPPED", "NOT SUBMITTED"}


@dataclass
class RunStatus:
    run: str
    kind: str
    executor: str
    job_id: str | None
    state: str
    """Slurm's state (sacct/squeue), or for local runs RUNNING / COMPLETED / FAILED / STOPPED."""
    requeues: int
    attempt: int
    progress: dict = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)
    """A job array's tasks: task, job_id, state, attempt, requeues, done, inputs (empty for one job)."""

    def line(self) -> str:
        p = self.progress
        if "done" in p:
            what = f"{p['done']}/{p['total']} inputs"
        elif "step" in p:
            what = f"step {p['step']}/{p.get('total_steps', '?')}"
            if p.get("last_loss") is not None:
                what += f", loss {p['last_loss']:.4f}"
        else:
            what = "-"
        if p.get("eta_s") is not None:
            what += f", ETA {format_duration(p['eta_s'])}"
        if self.tasks:
            finished = sum(t["state"] == "COMPLETED" for t in self.tasks)
            what += f", {finished}/{len(self.tasks)} array tasks completed"
        return (
            f"{Path(self.run).name}  {self.kind}  {self.executor}:{self.job_id}  {self.state}  "
            f"{what}  requeues={self.requeues}"
        )

    def task_lines(self) -> list[str]:
        return [
            f"task {t['task']}  {t['job_id']}  {t['state']}  {t['done']}/{t.get('inputs', '?')} inputs  "
            f"attempt {t['attempt']}  requeues={t['requeues']}"
            for t in self.tasks
        ]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def slurm_state(job_id: str) -> str:
    """The job's state from sacct (accounting), falling back to squeue while sacct lags."""
    out = _query(["sacct", "-j", job_id, "-X", "-n", "-P", "--format=State"])
    if out:
        return out.splitlines()[-1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    out = _query(["squeue", "-h", "-j", job_id, "-o", "%T"])
    return out.splitlines()[0] if out else "UNKNOWN"


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """The states of many jobs and array tasks (`123`, `123_4`) in one sacct call (squeue for those
    sacct does not show yet); UNKNOWN for a job neither knows."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    states: dict[str, str] = {}
    for line in _query(["sacct", "-j", ",".join(arrays), "-X", "-n", "-P", "--format=JobID,State"]).splitlines():
        job, state = line.split("|", 1)
        for one in expand_array_ids(job):
            states[one] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    if missing := [job_id for job_id in job_ids if job_id not in states]:
        arrays = sorted({job_id.split("_")[0] for job_id in missing})
        for line in _query(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T"]).splitlines():
            job, state = line.split("|", 1)
            states.setdefault(job, state)
    return {job_id: states.get(job_id, "UNKNOWN") for job_id in job_ids}


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
    and the nodes it last ran on that are down now (a lost node: NODE_FAIL)."""
    out = _query(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "--format=State,NodeList"])
    records = [line.split("|", 1) for line in out.splitlines() if "|" in line]
    history = {}
    if len(records) > 1 or records and records[-1][0].split()[0] in FINAL_STATES - {"COMPLETED"}:
        history["slurm history"] = ", then ".join(f"{state.split()[0]} on {nodes}" for state, nodes in records)
    ran_on = [nodes for _, nodes in records if nodes not in ("", "None assigned")]
    if ran_on:
        down = _query(["sinfo", "-h", "-N", "-n", ran_on[-1], "-t", "down,drain,fail,no_respond", "-o", "%N|%T|%E"])
        if down:
            history["nodes down"] = "; ".join(
                f"{node} is down ({state}: {reason})"
                for node, state, reason in (line.split("|", 2) for line in sorted(set(down.splitlines())))
            )
    return history


def _query(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def local_job_alive(state: dict, job_id: str) -> bool:
    """Whether the local job `job_id` of this run still runs: its pid alive, with the start time
    recorded at submission."""
    try:
        pid = int(job_id)
    except ValueError:
        return False
    started = process_start_ticks(pid)
    return started is not None and started == state.get("local_start_ticks")


def local_state(run: RunDir, job_id: str) -> str:
    """COMPLETED or FAILED as the node job recorded it in state.json; else RUNNING while its process
    lives, STOPPED after. Never from submitit's result pickle: anyone who can write the run folder can
    plant one, and unpickling it would run their code as whoever looks at the run."""
    state = run.read_state()
    ended = state.get("ended")
    if isinstance(ended, dict) and ended.get("job_id") == job_id and ended.get("state") in ("COMPLETED", "FAILED"):
        return ended["state"]
    return "RUNNING" if local_job_alive(state, job_id) else "STOPPED"


def progress(run: RunDir, kind: str, started: float | None, done_since_started: int | None = None) -> dict:
    """Done/total and ETA for inference (from the shards), step and loss for fine-tuning.

    The rate is of what was done since `started`: by default the latest attempt's records."""
    if kind == "infer":
        p = read_progress(run)
        done, total = p["done"], p["total"]
        rate_base = p.get("done_this_attempt", done) if done_since_started is None else done_since_started
    else:
        step_rows = steps(read_train_metrics(run.train_metrics_file))
        metrics = read_metrics(run.metrics_file)
        last = step_rows[-1] if step_rows else {}
        p = {
            "step": last.get(TrainRow.STEP, 0),
            "total_steps": last.get(TrainRow.TOTAL_STEPS, metrics.get(Metric.STEPS)),
            "last_loss": last.get(TrainRow.LOSS),
            "checkpoints": sorted(c.name for c in run.checkpoints_dir.glob("step-*")),
        }
        done, total, rate_base = p["step"], p["total_steps"], p["step"]
    if started and total and 0 < done < total and rate_base:
        p["eta_s"] = (time.time() - started) / rate_base * (total - done)
    return p


def run_status(run: RunDir) -> RunStatus:
    state = run.read_state()
    if "tasks" in state:
        return array_status(run, state)
    job_id = (state.get("job_ids") or [None])[-1]
    executor = state.get("executor", "?")
    if job_id is None:
        job_state = "NOT SUBMITTED"
    elif executor == "slurm":
        job_state = slurm_state(job_id)
    else:
        job_state = local_state(run, job_id)
    kind = state.get("kind", "?")
    history = slurm_history(job_id) if executor == "slurm" and job_id is not None else {}
    return RunStatus(
        run=str(run.path),
        kind=kind,
        executor=executor,
        job_id=job_id,
        state=job_state,
        requeues=state.get("requeues", 0),
        attempt=state.get("attempt", 0),
        # An ETA only while it runs: a pending or stopped job's rate means nothing.
        progress=progress(run, kind, state.get("attempt_started") if job_state == "RUNNING" else None) | history,
    )


# Anywhere in a line: a progress bar's unfinished line may come first. torchrun's --tee prefixes a
# rank's lines with [defaultN]: (N: the local rank).
_RANK_ERROR = re.compile(r"(?:\[(?:default|rank)(\d+)\]:)?llmbatch: error: (.*)$")


def rank_error(run: RunDir) -> str | None:
    """The one line a rank of the latest attempt ended with (runners/faults.py), naming its node and
    rank, or None if no rank left one."""
    for log in sorted(run.logs_dir.glob("node-*.log")):
        text = log.read_text(errors="replace")
        latest = text[text.rfind("\n== attempt ") + 1 :]  # node logs hold every attempt, each after its header
        for line in latest.splitlines():
            if m := _RANK_ERROR.search(line):
                rank = f", local rank {m.group(1)}" if m.group(1) else ""
                return f"{log.stem.replace('-', ' ')}{rank}: {m.group(2)}"
    return None


def array_status(run: RunDir, state: dict) -> RunStatus:
    """A job array's status: each task's Slurm state and progress, and the array's as a whole."""
    tasks = {int(task): info for task, info in state["tasks"].items()}
    job_states = slurm_states([info["job_id"] for info in tasks.values()])
    counts = task_progress(run, state["ranks_per_task"], {task: info.get("attempt") for task, info in tasks.items()})
    done = {
        task: min(counts.get(task, {}).get("done", 0), info.get("inputs", float("inf"))) for task, info in tasks.items()
    }
    rows = [
        {
            "task": task,
            "job_id": info["job_id"],
            "state": job_states[info["job_id"]],
            "attempt": info.get("attempt", 0),
            "requeues": info.get("requeues", 0),
            "done": done[task],
            **({"inputs": info["inputs"]} if "inputs" in info else {}),
        }
        for task, info in sorted(tasks.items())
    ]
    overall = array_state([row["state"] for row in rows])
    # The rate: what the tasks' current attempts did since the first of them started.
    started = min((info["attempt_started"] for info in tasks.values() if "attempt_started" in info), default=None)
    done_since_started = sum(c["done_this_attempt"] for c in counts.values())
    return RunStatus(
        run=str(run.path),
        kind=state.get("kind", "?"),
        executor=state.get("executor", "?"),
        job_id=(state.get("job_ids") or [None])[-1],
        state=overall,
        requeues=sum(row["requeues"] for row in rows),
        attempt=max(row["attempt"] for row in rows),
        progress=progress(run, "infer", started if overall == "RUNNING" else None, done_since_started),
        tasks=rows,
    )


def unfinished_tasks(run: RunDir) -> list[int]:
    """The array tasks whose share is not done: `resume` submits these again."""
    state = run.read_state()
    finished = finished_tasks(run, state["ranks_per_task"])
    return [task for task in sorted(map(int, state["tasks"])) if task not in finished]


def find_runs(root: Path) -> list[RunDir]:
    runs = [RunDir(p.parent) for p in Path(root).glob("*/spec.yaml")]
    return sorted(runs, key=lambda r: r.spec_file.stat().st_mtime, reverse=True)


def log_file(run: RunDir, node: int, rank: int | None, task: int | None = None) -> Path:
    """A node's launch log, or one rank's stdout (torchrun's --tee layout under logs/node-N/, written
    when a node runs several processes); of an array task, under logs/task-NNNNN/."""
    if rank is None:
        return run.node_log(node, task)
    if not run.rank_log_dir(node, task).exists():
        return run.node_log(node, task)  # one process per node: its output is the node log itself
    candidates = sorted(
        run.rank_log_dir(node, task).glob(f"*/attempt_*/{rank}/stdout.log"), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise FileNotFoundError(f"no log for local rank {rank} on node {node} under {run.rank_log_dir(node, task)}")
    return candidates[-1]


def follow(path: Path, still_running, out=sys.stdout, poll_s: float = 0.5, offset: int = 0) -> None:
    """Print `path` from byte `offset` on and keep printing what is appended while `still_running()`."""
    while True:
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()
        if not still_running():
            return
        time.sleep(poll_s)


def cancel(run: RunDir) -> str:
    status = run_status(run)
    if status.job_id is None:
        return "nothing to cancel"
    if status.state in ENDED_STATES:
        return f"{status.executor} job {status.job_id} already finished ({status.state}); nothing to cancel"
    if status.tasks:  # the whole array: every array job that still has a task queued or running
        arrays = sorted({t["job_id"].split("_")[0] for t in status.tasks if t["state"] not in FINAL_STATES})
        subprocess.run(["scancel", *arrays], check=True, timeout=30)
    elif status.executor == "slurm":
        subprocess.run(["scancel", status.job_id], check=True, timeout=30)
    else:
        # local_state said RUNNING: the pid is still the job's own (start time checked), not a reused one.
        os.kill(int(status.job_id), signal.SIGTERM)
    run.update_state(cancelled=time.time())
    return f"cancelled {status.executor} job {status.job_id}"


def status_json(statuses: list[RunStatus]) -> str:
    return json.dumps([asdict(s) for s in statuses], indent=2)
