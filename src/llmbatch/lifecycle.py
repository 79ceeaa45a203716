"""Run lifecycle: status, logs, cancel, list, read from the run folder and from Slurm itself."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmbatch.metrics import Metric, TrainRow, read_metrics, read_train_metrics, steps
from llmbatch.rundir import RunDir, State, Task, process_start_ticks
from llmbatch.shards import complete_lines, list_shards, read_stats, run_inputs, task_of
from llmbatch.slurm import FINAL_STATES, array_of, array_state, scancel, slurm_history, slurm_state, slurm_states

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


def local_job_alive(state: dict, job_id: str) -> bool:
    """Whether the local job `job_id` of this run still runs: its pid alive, with the start time
    recorded at submission."""
    try:
        pid = int(job_id)
    except ValueError:
        return False
    started = process_start_ticks(pid)
    return started is not None and started == state.get(State.LOCAL_START_TICKS)


def local_state(run: RunDir, job_id: str) -> str:
    """COMPLETED or FAILED as the node job recorded it in state.json; else RUNNING while its process
    lives, STOPPED after. Never from submitit's result pickle: anyone who can write the run folder can
    plant one, and unpickling it would run their code as whoever looks at the run."""
    state = run.read_state()
    ended = state.get(State.ENDED)
    if isinstance(ended, dict) and ended.get("job_id") == job_id and ended.get("state") in ("COMPLETED", "FAILED"):
        return ended["state"]
    return "RUNNING" if local_job_alive(state, job_id) else "STOPPED"


def read_progress(run: RunDir) -> dict[str, Any]:
    """Done/total over all attempts, and this (the latest) attempt's records per rank, for `status`."""
    # Counted at submission: a data file of millions of lines is not read again for each status.
    total = run.read_state().get(State.INPUTS)
    if total is None:
        total = len(run_inputs(run))
    shards = list_shards(run)
    attempt = max((s.attempt for s in shards), default=None)
    ranks = {s.rank: len(complete_lines(s.path)) for s in shards if s.attempt == attempt}
    # Never more than the total: a run from before input fingerprints may have been resumed over other data.
    done = min(sum(len(complete_lines(s.path)) for s in shards), total)
    return {
        "done": done,
        "total": total,
        "attempt": attempt,
        "done_this_attempt": sum(ranks.values()),
        "ranks": ranks,
        "ranks_finished": sum(read_stats(s) is not None for s in shards if s.attempt == attempt),
    }


def task_progress(run: RunDir, ranks_per_task: int, attempts: dict[int, int]) -> dict[int, dict[str, int]]:
    """Records per array task over all its attempts (`done`) and in its attempt `attempts[task]`
    (`done_this_attempt`)."""
    progress: dict[int, dict[str, int]] = {}
    for shard in list_shards(run):
        task, records = task_of(shard.rank, ranks_per_task), len(complete_lines(shard.path))
        counts = progress.setdefault(task, {"done": 0, "done_this_attempt": 0})
        counts["done"] += records
        counts["done_this_attempt"] += records if shard.attempt == attempts.get(task) else 0
    return progress


def finished_tasks(run: RunDir, ranks_per_task: int) -> set[int]:
    """The array tasks that did their whole share: every rank of one of their attempts finished it."""
    finished: dict[tuple[int, int], int] = {}
    for shard in list_shards(run):
        if read_stats(shard) is not None:
            key = (shard.attempt, task_of(shard.rank, ranks_per_task))
            finished[key] = finished.get(key, 0) + 1
    return {task for (_, task), ranks in finished.items() if ranks == ranks_per_task}


def progress(run: RunDir, kind: str, started: float | None, done_since_started: int | None = None) -> dict:
    """Done/total and ETA for inference (from the shards), step and loss for fine-tuning; the records
    data.on_bad_record: skip left out.

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
    if (rejected := run.read_state().get(State.REJECTED_RECORDS)) is not None:
        p["rejected_records"] = rejected  # data.on_bad_record: skip; the records are in rejected.jsonl
    return p


def run_status(run: RunDir) -> RunStatus:
    state = run.read_state()
    if State.TASKS in state:
        return array_status(run, state)
    job_id = (state.get(State.JOB_IDS) or [None])[-1]
    executor = state.get(State.EXECUTOR, "?")
    if job_id is None:
        job_state = "NOT SUBMITTED"
    elif executor == "slurm":
        job_state = slurm_state(job_id)
    else:
        job_state = local_state(run, job_id)
    kind = state.get(State.KIND, "?")
    history = slurm_history(job_id) if executor == "slurm" and job_id is not None else {}
    return RunStatus(
        run=str(run.path),
        kind=kind,
        executor=executor,
        job_id=job_id,
        state=job_state,
        requeues=state.get(State.REQUEUES, 0),
        attempt=state.get(State.ATTEMPT, 0),
        # An ETA only while it runs: a pending or stopped job's rate means nothing.
        progress=progress(run, kind, state.get(State.ATTEMPT_STARTED) if job_state == "RUNNING" else None) | history,
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
    tasks = {int(task): info for task, info in state[State.TASKS].items()}
    job_states = slurm_states([info[Task.JOB_ID] for info in tasks.values()])
    counts = task_progress(
        run, state[State.RANKS_PER_TASK], {task: info.get(Task.ATTEMPT) for task, info in tasks.items()}
    )
    done = {
        task: min(counts.get(task, {}).get("done", 0), info.get(Task.INPUTS, float("inf")))
        for task, info in tasks.items()
    }
    rows = [
        {
            "task": task,
            "job_id": info[Task.JOB_ID],
            "state": job_states[info[Task.JOB_ID]],
            "attempt": info.get(Task.ATTEMPT, 0),
            "requeues": info.get(Task.REQUEUES, 0),
            "done": done[task],
            **({"inputs": info[Task.INPUTS]} if Task.INPUTS in info else {}),
        }
        for task, info in sorted(tasks.items())
    ]
    overall = array_state([row["state"] for row in rows])
    # The rate: what the tasks' current attempts did since the first of them started.
    started = min((info[Task.ATTEMPT_STARTED] for info in tasks.values() if Task.ATTEMPT_STARTED in info), default=None)
    done_since_started = sum(c["done_this_attempt"] for c in counts.values())
    return RunStatus(
        run=str(run.path),
        kind=state.get(State.KIND, "?"),
        executor=state.get(State.EXECUTOR, "?"),
        job_id=(state.get(State.JOB_IDS) or [None])[-1],
        state=overall,
        requeues=sum(row["requeues"] for row in rows),
        attempt=max(row["attempt"] for row in rows),
        progress=progress(run, "infer", started if overall == "RUNNING" else None, done_since_started),
        tasks=rows,
    )


def unfinished_tasks(run: RunDir) -> list[int]:
    """The array tasks whose share is not done: `resume` submits these again."""
    state = run.read_state()
    return tasks_to_resume(map(int, state[State.TASKS]), finished_tasks(run, state[State.RANKS_PER_TASK]))


def tasks_to_resume(tasks: Iterable[int], finished: set[int]) -> list[int]:
    """Of an array's tasks, those to submit again: every one not `finished` (by its shards), in order."""
    return sorted(task for task in tasks if task not in finished)


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
        scancel(sorted({array_of(t["job_id"]) for t in status.tasks if t["state"] not in FINAL_STATES}))
    elif status.executor == "slurm":
        scancel([status.job_id])
    else:
        # local_state said RUNNING: the pid is still the job's own (start time checked), not a reused one.
        os.kill(int(status.job_id), signal.SIGTERM)
    return f"cancelled {status.executor} job {status.job_id}"


def status_json(statuses: list[RunStatus]) -> str:
    return json.dumps([asdict(s) for s in statuses], indent=2)
