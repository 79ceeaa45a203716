"""The run folder on shared storage: one place per run for its spec, commands, logs and results.

<root>/<name>-<YYYYmmdd-HHMMSS>-<short id>/
    spec.yaml          the resolved spec (absolute paths, all defaults filled in)
    commands.jsonl     every per-node command that ran, one JSON line each
    state.json         executor, Slurm job ids, requeue count, input count; an array's tasks
    ranks/             which process (host, pid, start time) ran each rank of each attempt
    submitit/          submitit's pickles and per-task stdout/stderr
    logs/node-N.log    what `accelerate launch` printed on node N
    logs/node-N/       per-rank stdout/stderr (torchrun's --tee), for multi-process nodes
    logs/task-NNNNN/   an array task's node-0.log and node-0/
    shards/            inference: one JSONL shard per rank and attempt
    results.jsonl      inference: gathered results, written once complete (or results.parquet, or
                       results.openai-batch.jsonl: output.format)
    metrics.json       both kinds: the run's numbers
    rejected.jsonl     with data.on_bad_record: skip, the records left out: file, line (or row), reason
    checkpoints/       fine-tuning: accelerate states, step-NNNNNN/
    adapter/           fine-tuning: the final peft adapter
    adapter-best/      fine-tuning with validation data: the adapter of the best validation loss
    tensorboard/, mlruns/, wandb/   fine-tuning with train.report_to: the tracker's offline logs
    merged/            fine-tuning with train.merge: the adapter merged into the base weights
    train_metrics.jsonl, loss_curve.png   fine-tuning: per-step and eval numbers, their curves
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

RESULT_FILES = {"jsonl": "results.jsonl", "parquet": "results.parquet", "openai-batch": "results.openai-batch.jsonl"}
"""output.format: how an inference run's gathered results are written, and the file's name."""


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    # Read, not set-and-restore, where Linux allows: os.umask() would change it for every thread.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give a folder made through private temp names the modes a plain open/mkdir would have given.

    On a lab's shared storage colleagues read results as the umask allows; mkstemp/mkdtemp (and some
    writers) make 0600/0700 entries. A symbolic link is left alone: chmod would change its target.
    """
    mask = current_umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            if not os.path.islink(path := os.path.join(root, name)):
                os.chmod(path, 0o666 & ~mask)


# --- writing into a run folder ---------------------------------------------------------------
# A run folder is shared storage that others may be able to write. Whatever llmbatch writes there goes
# through these helpers, which never follow a symbolic link someone planted: whole files are created
# anew and renamed over the name (a link is replaced, its target untouched), appends and locks open
# with O_NOFOLLOW, new files with O_EXCL, and folders are walked without following links.


class DamagedRun(ValueError):
    """A run folder file that exists but cannot be read: one line naming the file."""


class UnsafeRunFile(DamagedRun):
    """A symbolic link (or a FIFO, a device) where llmbatch writes in a run folder: never written through."""


def _refuse(path: Path | str, what: str) -> UnsafeRunFile:
    return UnsafeRunFile(
        f"{path}: {what}; not writing through it (anyone who can write the run folder can "
        f"plant one: remove it and check the run folder)"
    )


def check_folder(folder: Path) -> None:
    """Refuse a symbolic link on the way from the run folder (the nearest folder up holding spec.yaml)
    down to `folder`. Folders above the run folder are the user's own and are not checked; outside any
    run folder nothing is."""
    links = []
    for part in [Path(folder), *Path(folder).parents]:
        try:
            mode = os.lstat(part).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode):
            links.append(part)
        elif os.path.lexists(part / "spec.yaml"):  # the run folder
            break
    else:
        return  # not inside a run folder
    if links:
        raise _refuse(links[-1], "a symbolic link in a run folder")


def make_folder(folder: Path) -> Path:
    """`mkdir -p` inside a run folder that never creates or writes through a planted symbolic link."""
    folder = Path(folder)
    check_folder(folder)
    missing = []
    for part in [folder, *folder.parents]:
        if os.path.lexists(part):
            break
        missing.append(part)
    for part in reversed(missing):
        try:
            os.mkdir(part)
        except FileExistsError:  # made by another rank at the same moment, or planted: look again
            pass
    check_folder(folder)
    if not folder.is_dir():
        raise _refuse(folder, "not a folder")
    return folder


def _open_plain(path: Path, flags: int) -> int:
    """os.open on a plain file in a run folder, never through a symbolic link, never blocking on a FIFO."""
    make_folder(Path(path).parent)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # ELOOP: a link; ENXIO: a FIFO without a reader
            raise _refuse(path, "a symbolic link or a FIFO, not a plain file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(path, "not a plain file")
    os.set_blocking(fd, True)
    return fd


def open_append(path: Path) -> BinaryIO:
    """A log, lock or JSON-lines file of a run folder, opened to append (created if missing)."""
    # Unbuffered: each write is one write(2), so O_APPEND keeps lines from several writers whole.
    return os.fdopen(_open_plain(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab", buffering=0)


def create_new(path: Path) -> BinaryIO:
    """A file that must not exist yet (an existing one, or a link in its place, is never reused)."""
    return os.fdopen(_open_plain(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")


def remove_tree(path: Path) -> None:
    """Remove a folder, or a file or symbolic link in its place (never what a link points to)."""
    if os.path.islink(path) or os.path.isfile(path):
        Path(path).unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the block ends, and only if it ends without an error:
    written as a temp file in the same folder, fsynced, renamed. Readers see the old file or the
    whole new one, never half.

    The file gets the mode a plain open() would give (mkstemp's is 0600).
    """
    path = Path(path)
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` atomically (`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


SPACE_RESERVE_BYTES = 1 << 20
"""Held in every run folder while its job runs (`RunDir.reserve_space`), given back by a process that
finds the file system full, so that its error line, the node's log and submitit's result still fit."""


class RunBusy(Exception):
    """Another process holds this run's lock for the same work (a second `resume`, say)."""


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None if there is none.

    A pid alone does not name a process for long: once it ended, the number can belong to any other
    process. The pid and its start time together do.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces


def save_folder(target: Path, write) -> None:
    """Call write(folder) on a temporary folder, then rename it to `target` (replacing an older one)."""
    tmp = target.with_name(f".{target.name}.tmp")
    remove_tree(tmp)
    make_folder(tmp)
    write(tmp)
    apply_umask(tmp)
    old = target.with_name(f".{target.name}.old")
    if os.path.lexists(target):
        remove_tree(old)
        os.rename(target, old)
    os.rename(tmp, target)
    remove_tree(old)
    fsync_path(target.parent)


def append_jsonl(path: Path, row: dict) -> None:
    """One more JSON line (a single writer's log: readers drop a torn last line, see read_jsonl)."""
    with open_append(path) as f:
        f.write((json.dumps(row) + "\n").encode())


# --- reading side files ----------------------------------------------------------------------------
# A run folder lives on shared storage: its files can be torn by a full disk, edited by hand, or
# written by someone else. Every file the lifecycle commands and the ranks read back goes through a
# reader that checks what it holds and raises DamagedRun (one line naming the file and the key) for
# anything else, so no odd value travels on into a traceback.


@dataclass(frozen=True)
class Kind:
    """What a value in a side file must be; `name` completes "..., not <name>"."""

    name: str
    test: Callable[[Any], bool]


def _finite(v: Any) -> bool:
    return type(v) is int or type(v) is float and math.isfinite(v)


COUNT = Kind("an integer >= 0", lambda v: type(v) is int and v >= 0)
POSITIVE = Kind("an integer > 0", lambda v: type(v) is int and v > 0)
NUMBER = Kind("a finite number", _finite)
MEASURE = Kind("a number", lambda v: type(v) in (int, float))
"""A loss or a gradient norm: NaN and infinity are what a diverging run really logs."""
TEXT = Kind("a string", lambda v: isinstance(v, str))
FLAG = Kind("true or false", lambda v: isinstance(v, bool))
OBJECT = Kind("a JSON object", lambda v: isinstance(v, dict))
SOME = Kind("a JSON object with entries", lambda v: isinstance(v, dict) and bool(v))
JOB_ID = Kind(
    "a job id (123, or 123_4 of an array)",
    lambda v: isinstance(v, str) and re.fullmatch(r"\d+(_\d+)?", v, re.ASCII) is not None,
)
JOB_IDS = Kind("a list of job ids", lambda v: isinstance(v, list) and all(map(JOB_ID.test, v)))


def maybe(kind: Kind) -> Kind:
    return Kind(f"{kind.name} or null", lambda v: v is None or kind.test(v))


def one_of(*values: str) -> Kind:
    return Kind(" or ".join(map(json.dumps, values)), lambda v: v in values)


def shown(value: Any, width: int = 40) -> str:
    """A value as one short, escaped line (JSON's escapes: no newline or control character gets out)."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):  # an integer of more digits than Python converts, a deep nest
        text = type(value).__name__
    return text if len(text) <= width else text[: width - 3] + "..."


def check_object(
    path: Path, obj: Any, fields: dict[str, Kind], required: tuple[str, ...] = (), where: str = ""
) -> dict[str, Any]:
    """`obj`, if it is a JSON object that has every `required` key and whose `fields` are of their
    kinds; else DamagedRun naming `path`, `where` in it and the key. Other keys are not looked at."""
    if not isinstance(obj, dict):
        raise DamagedRun(f"{path}: damaged, {where}not a JSON object but {shown(obj)}")
    for key in required:
        if key not in obj:
            raise DamagedRun(f"{path}: damaged, {where}{key} is missing")
    for key, kind in fields.items():
        if key in obj and not kind.test(obj[key]):
            raise DamagedRun(f"{path}: damaged, {where}{key} is {shown(obj[key])}, not {kind.name}")
    return obj


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's value, `default` if there is no file; DamagedRun if it cannot be read as JSON."""
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return default
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DamagedRun(f"{path}: damaged, not valid JSON ({getattr(e, 'msg', None) or type(e).__name__})") from None
    except OSError as e:  # a folder, say
        raise DamagedRun(f"{path}: cannot be read ({e.strerror})") from None


def read_json_object(
    path: Path, fields: dict[str, Kind], required: tuple[str, ...] = (), old_keys: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """A JSON object file checked by `check_object`, or None if there is no file. `old_keys` (old: new)
    are read as their new names (`renamed_keys`)."""
    obj = read_json(path)
    if obj is None and not Path(path).exists():
        return None
    return check_object(path, renamed_keys(obj, old_keys or {}), fields, required)


def renamed_keys(obj: Any, old_keys: dict[str, str]) -> Any:
    """`obj` with the keys it has of `old_keys` (old: new) under their new names, where the new one is
    absent: files written before a key was renamed read as new ones. Anything but an object as it is."""
    if not isinstance(obj, dict):
        return obj
    return {(old_keys[key] if key in old_keys and old_keys[key] not in obj else key): v for key, v in obj.items()}


def read_jsonl(path: Path, fields: dict[str, Kind] | None = None, required: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a JSONL file ([] if there is none), each a JSON object checked by `check_object`.

    A row counts once its newline is on disk: what follows the last newline is a write cut short by a
    kill, and is ignored. A complete line that is not a JSON object means damage (one writer appends,
    and a resumed attempt rewrites the file before appending)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DamagedRun(f"{path}: cannot be read ({e.strerror})") from None
    rows = []
    *complete, _torn_or_empty = data.split(b"\n")
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            why = getattr(e, "msg", None) or type(e).__name__
            raise DamagedRun(f"{path}: damaged, line {number} is not valid JSON ({why})") from None
        rows.append(check_object(path, row, fields or {}, required, where=f"line {number}: "))
    return rows


RANK_RECORD_FIELDS = {"host": TEXT, "pid": POSITIVE, "start_ticks": maybe(COUNT)}


class State:
    """The keys of state.json. The command line writes the run's own at its creation and each job's at
    submission; node 0 of each attempt writes the attempt's (of an array task: under its TASKS entry,
    `Task`), and writes ENDED for a local job. Old files' other keys (job_id, cancelled) are ignored."""

    KIND = "kind"
    EXECUTOR = "executor"
    INPUTS = "inputs"
    """How many inputs the spec's data has, counted at submission."""
    REJECTED_RECORDS = "rejected_records"
    """With data.on_bad_record: skip, how many records were left out (rejected.jsonl), counted at submission."""
    INPUTS_FINGERPRINT = "inputs_fingerprint"
    """What `resume` checks the inputs against (`llmbatch.fingerprint`)."""
    JOB_IDS = "job_ids"
    """Every job submitted for the run, the latest last (of an array: the array's id)."""
    LOCAL_START_TICKS = "local_start_ticks"
    """Of a local job: its process's start time, which tells it from a later one with its pid."""
    ATTEMPT = "attempt"
    ATTEMPT_STARTED = "attempt_started"
    REQUEUES = "requeues"
    """Slurm's restart count of the latest attempt."""
    ENDED = "ended"
    """Of a local job: {"job_id": ..., "state": "COMPLETED" or "FAILED"}, from its node job."""
    RANKS_PER_TASK = "ranks_per_task"
    TASKS = "tasks"
    """Of a job array: each task's `Task` keys, by task number."""


class Task:
    """The keys of a job array task's entry under state.json's `tasks`."""

    JOB_ID = "job_id"
    """`123_4`: the array's id and the task's index in its submission."""
    ATTEMPT = "attempt"
    ATTEMPT_STARTED = "attempt_started"
    REQUEUES = "requeues"
    INPUTS = "inputs"
    """The size of the task's share of the inputs, written by its main rank."""


STATE_FIELDS = {
    State.EXECUTOR: one_of("local", "slurm"),
    State.KIND: one_of("infer", "finetune"),
    State.JOB_IDS: JOB_IDS,
    State.INPUTS: COUNT,
    State.REJECTED_RECORDS: COUNT,
    State.ATTEMPT: COUNT,
    State.ATTEMPT_STARTED: NUMBER,
    State.REQUEUES: COUNT,
    State.LOCAL_START_TICKS: maybe(COUNT),
    State.RANKS_PER_TASK: POSITIVE,
    State.TASKS: SOME,
}
"""What state.json may hold (`RunDir.read_state`); an array's `tasks` each hold TASK_FIELDS."""
TASK_FIELDS = {
    Task.JOB_ID: JOB_ID,
    Task.ATTEMPT: COUNT,
    Task.ATTEMPT_STARTED: NUMBER,
    Task.REQUEUES: COUNT,
    Task.INPUTS: COUNT,
}


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, root: str | Path, name: str) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root).resolve() / f"{name}-{stamp}-{secrets.token_hex(3)}"
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path).resolve()
        if not (path / "spec.yaml").is_file():
            raise FileNotFoundError(f"not a run folder (no spec.yaml): {path}")
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.name

    spec_file = property(lambda self: self.path / "spec.yaml")
    commands_file = property(lambda self: self.path / "commands.jsonl")
    state_file = property(lambda self: self.path / "state.json")
    submitit_dir = property(lambda self: self.path / "submitit")
    logs_dir = property(lambda self: self.path / "logs")
    shards_dir = property(lambda self: self.path / "shards")
    results_file = property(lambda self: self.path / "results.jsonl")
    metrics_file = property(lambda self: self.path / "metrics.json")
    rejected_file = property(lambda self: self.path / "rejected.jsonl")
    train_metrics_file = property(lambda self: self.path / "train_metrics.jsonl")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    adapter_dir = property(lambda self: self.path / "adapter")
    adapter_best_dir = property(lambda self: self.path / "adapter-best")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")
    mlflow_dir = property(lambda self: self.path / "mlruns")
    merged_dir = property(lambda self: self.path / "merged")
    loss_curve_file = property(lambda self: self.path / "loss_curve.png")

    space_reserve = property(lambda self: self.path / ".space-reserve")

    def reserve_space(self) -> None:
        # Random bytes: a compressing file system (ZFS, btrfs) would store zeros in almost no space.
        try:
            atomic_write(self.space_reserve, os.urandom(SPACE_RESERVE_BYTES))
        except OSError:
            self.release_space()
            raise

    def release_space(self) -> None:
        self.space_reserve.unlink(missing_ok=True)

    def results_for(self, output_format: str) -> Path:
        """Where gather writes the results in an output.format (`RESULT_FILES`)."""
        return self.path / RESULT_FILES[output_format]

    def gathered_results(self) -> Path | None:
        """The gathered results, whichever format they were written in; None before the run is complete."""
        return next((p for p in map(self.results_for, RESULT_FILES) if p.exists()), None)

    def node_log(self, node: int, task: int | None = None) -> Path:
        return self._task_logs_dir(task) / f"node-{node}.log"

    def rank_log_dir(self, node: int, task: int | None = None) -> Path:
        return self._task_logs_dir(task) / f"node-{node}"

    def _task_logs_dir(self, task: int | None) -> Path:
        """logs/ of a job; logs/task-NNNNN/ of an array task (all tasks run a node 0)."""
        return self.logs_dir if task is None else self.logs_dir / f"task-{task:05d}"

    def preempt_marker(self, attempt: int, task: int | None = None) -> Path:
        """Written by the node job at the preemption signal; the ranks of that attempt (of that array
        task: each is preempted on its own) stop and save.

        A file, not only a signal: torch's launcher starts each rank in a session of its own, and in a
        container, so a signal the node job sends to its child does not reach them.
        """
        return self.path / (
            f"preempt-task-{task:05d}-attempt-{attempt:03d}" if task is not None else f"preempt-attempt-{attempt:03d}"
        )

    ranks_dir = property(lambda self: self.path / "ranks")

    def rank_record(self, attempt: int, rank: int) -> Path:
        """Which process runs this rank of this attempt; its mtime is the rank's heartbeat."""
        return self.ranks_dir / f"attempt-{attempt:03d}-rank-{rank:05d}.json"

    def record_rank(self, attempt: int, rank: int) -> None:
        """Which process runs this rank of this attempt, so that `resume` can make sure that no rank
        of an earlier attempt still writes into the run."""
        atomic_write_json(
            self.rank_record(attempt, rank),
            {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid())},
        )

    @staticmethod
    def read_rank_record(path: Path) -> dict[str, Any]:
        """A rank record (`record_rank`), checked; {} before the rank wrote it."""
        return read_json_object(path, RANK_RECORD_FIELDS, required=("host", "pid")) or {}

    def live_ranks(self) -> list[dict[str, Any]]:
        """The recorded ranks whose process still runs on this host (same pid, same start time).

        Ranks on other nodes are Slurm's to account for: they live only while their job does.
        """
        host, alive = socket.gethostname(), []
        for path in sorted(self.ranks_dir.glob("attempt-*-rank-*.json")):
            record = self.read_rank_record(path)
            if (
                record.get("host") == host
                and record.get("start_ticks") is not None
                and process_start_ticks(record["pid"]) == record["start_ticks"]
            ):
                alive.append(record | {"name": path.stem})
        return alive

    @contextmanager
    def exclusive(self, work: str) -> Iterator[None]:
        """Hold the run's lock for `work` while the block runs; RunBusy if another process holds it.

        The kernel drops an flock when its holder dies, so a killed holder never leaves a stale lock.
        """
        with open_append(self.path / f".{work}.lock") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusy(f"{self.path}: another {work} of this run is under way") from None
            yield

    @contextmanager
    def locked(self, work: str) -> Iterator[None]:
        """Hold the run's lock for `work` while the block runs, waiting for another holder to finish."""
        with open_append(self.path / f".{work}.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read_state(self) -> dict[str, Any]:
        """state.json, checked (STATE_FIELDS); {} before the first submission."""
        state = check_object(self.state_file, read_json(self.state_file, {}), STATE_FIELDS)
        if State.TASKS in state:  # a job array's: its tasks and how many ranks each runs
            check_object(self.state_file, state, {}, required=(State.RANKS_PER_TASK,))
            for task, info in state[State.TASKS].items():
                if not (task.isascii() and task.isdigit()):
                    raise DamagedRun(f"{self.state_file}: damaged, tasks holds {shown(task)}, not a task number")
                check_object(self.state_file, info, TASK_FIELDS, required=(Task.JOB_ID,), where=f"tasks.{task}: ")
        return state

    def update_state(self, **changes: Any) -> dict[str, Any]:
        return self._rewrite_state(lambda state: state | changes)

    def update_tasks(self, changes: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Update what state.json records of array tasks (under `tasks`, by task number)."""

        def change(state: dict[str, Any]) -> dict[str, Any]:
            tasks = dict(state.get(State.TASKS, {}))
            for task, task_changes in changes.items():
                tasks[str(task)] = tasks.get(str(task), {}) | task_changes
            return state | {State.TASKS: tasks}

        return self._rewrite_state(change)

    def _rewrite_state(self, change) -> dict[str, Any]:
        # Read-modify-write by several processes (the CLI, node 0's job, array tasks): serialized by a lock file.
        with open_append(self.path / ".state.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = change(self.read_state())
            atomic_write_json(self.state_file, state)
        return state

    def record_command(self, entry: dict[str, Any]) -> None:
        # One short line per node and attempt, from several nodes at once (open_append).
        with open_append(self.commands_file) as f:
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            os.fsync(f.fileno())
