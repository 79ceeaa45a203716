"""Inference shards: what each rank has finished, on shared storage, safe against a kill at any moment;
and the run's inputs (`run_inputs`), which the shards' ids are of.

    shards/attempt-000-rank-00000.jsonl        one JSON record a line, appended and fsynced per group
    shards/attempt-000-rank-00000.stats.json   written (atomically) when that rank finished its share

Every attempt writes fresh files, so nobody ever appends after a line another process left torn. A
record counts once its newline is on disk: whatever follows the last newline is a write cut short by
a kill, and is ignored, even if it happens to parse.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbatch.data import DataError, Input, load_inputs
from llmbatch.rundir import (
    COUNT,
    FLAG,
    NUMBER,
    OBJECT,
    POSITIVE,
    TEXT,
    DamagedRun,
    RunDir,
    atomic_write_json,
    check_object,
    create_new,
    maybe,
    read_json_object,
    read_jsonl,
    shown,
)
from llmbatch.spec import load_resolved

_SHARD_NAME = re.compile(r"^attempt-(\d+)-rank-(\d+)\.jsonl$")


@dataclass(frozen=True)
class Shard:
    attempt: int
    rank: int
    path: Path

    @property
    def stats_path(self) -> Path:
        return self.path.with_suffix(".stats.json")


def global_rank(task: int | None, ranks_per_task: int, rank_in_task: int) -> int:
    """A rank's number over the whole run, which names its shard: an array task's ranks follow those of
    the tasks before it, so that the shards of different tasks never collide."""
    return (task or 0) * ranks_per_task + rank_in_task


def task_of(rank: int, ranks_per_task: int) -> int:
    """The array task whose rank `rank` (over the whole run, `global_rank`) is."""
    return rank // ranks_per_task


def shard_for(run: RunDir, attempt: int, rank: int) -> Shard:
    return Shard(attempt, rank, run.shards_dir / f"attempt-{attempt:03d}-rank-{rank:05d}.jsonl")


def list_shards(run: RunDir) -> list[Shard]:
    """All shards of a run, by attempt then rank."""
    found = [
        Shard(int(m.group(1)), int(m.group(2)), path)
        for path in run.shards_dir.glob("attempt-*.jsonl")
        if (m := _SHARD_NAME.match(path.name))
    ]
    return sorted(found, key=lambda s: (s.attempt, s.rank))


def record_line(record: dict[str, Any]) -> str:
    """A record as one JSON line, the same bytes in a shard and in results.jsonl.

    ASCII only: model output may hold any character, and escaped, none of them (U+2028, U+0085) can
    look like a line break to a reader that splits lines its own way.
    """
    return json.dumps(record) + "\n"


def complete_lines(path: Path) -> list[bytes]:
    """The lines of `path` that end in a newline; a torn last line is left out."""
    *complete, _torn_or_empty = path.read_bytes().split(b"\n")
    return [line for line in complete if line.strip()]


class Record:
    """The keys of a result record that gather and its metrics read (runners/infer.py writes them,
    with the input's own fields)."""

    ID = "id"
    OUTPUT = "output"
    PROMPT_TOKENS = "prompt_tokens"
    OUTPUT_TOKENS = "output_tokens"
    FINISH_REASON = "finish_reason"
    TRUNCATED = "truncated"
    """The prompt was cut to fit the model's context (`generation.long_prompts: truncate`)."""
    REFERENCE = "reference"
    CORRECT = "correct"
    """Of an input with a reference: whether the output matches it (`llmbatch.scoring`)."""


RECORD_FIELDS = {
    Record.ID: TEXT,
    Record.OUTPUT: TEXT,
    Record.PROMPT_TOKENS: COUNT,
    Record.OUTPUT_TOKENS: COUNT,
    Record.FINISH_REASON: TEXT,
    Record.TRUNCATED: FLAG,
    Record.CORRECT: FLAG,
}


def read_records(path: Path) -> list[dict[str, Any]]:
    """A shard's records, checked; a torn last line is left out, any other bad line is DamagedRun."""
    required = (Record.ID, Record.OUTPUT, Record.PROMPT_TOKENS, Record.OUTPUT_TOKENS, Record.FINISH_REASON)
    records = read_jsonl(path, RECORD_FIELDS, required=required)
    for record in records:
        if Record.REFERENCE in record and Record.CORRECT not in record:
            raise DamagedRun(
                f"{path}: damaged, the record of id {shown(record[Record.ID])} has a reference but no correct"
            )
    return records


def done_ids(run: RunDir, before_attempt: int) -> set[str]:
    """Ids with a record in any shard of an earlier attempt.

    Earlier attempts only: their writers are gone, so every rank of this attempt reads the same set,
    while this attempt's ranks may already be appending to theirs.
    """
    return {
        record[Record.ID]
        for shard in list_shards(run)
        if shard.attempt < before_attempt
        for record in read_records(shard.path)
    }


class ShardWriter:
    """Appends records to a new shard; each group (a batch of generate's, or the sequences the engine
    just finished) is on disk (flushed, fsynced) when append returns."""

    def __init__(self, shard: Shard):
        # New: an attempt's shard is never reused, so an existing one is a mistake, never to be clobbered.
        self._file = create_new(shard.path)

    def append(self, records: list[dict[str, Any]]) -> None:
        self._file.write("".join(map(record_line, records)).encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_stats(shard: Shard, stats: dict[str, Any]) -> None:
    atomic_write_json(shard.stats_path, stats)


STATS_FIELDS = {
    "attempt": COUNT,
    "rank": COUNT,
    "world_size": POSITIVE,
    "task": COUNT,
    "inputs": COUNT,
    "writes": COUNT,
    "prompt_tokens": COUNT,
    "output_tokens": COUNT,
    "load_s": NUMBER,
    "generate_s": NUMBER,
    "wall_s": NUMBER,
    "engine": maybe(OBJECT),
}
"""A rank's stats (runners/infer.py: RankStats); gather needs those it requires."""
OLD_STATS_KEYS = {"generated_tokens": "output_tokens", "examples": "inputs"}
"""Keys of the stats before their rename, read as the new ones: ranks that finished before still gather."""
ENGINE_STATS_FIELDS = {"prefill_s": NUMBER, "decode_s": NUMBER, "decode_steps": COUNT, "occupancy": NUMBER}


def read_stats(shard: Shard) -> dict[str, Any] | None:
    """The rank's stats, checked, or None if it has not finished (or was killed)."""
    stats = read_json_object(
        shard.stats_path,
        STATS_FIELDS,
        required=("rank", "world_size", "inputs", "output_tokens", "generate_s", "wall_s"),
        old_keys=OLD_STATS_KEYS,
    )
    if stats and stats.get("engine"):
        check_object(
            shard.stats_path,
            stats["engine"],
            ENGINE_STATS_FIELDS,
            required=tuple(ENGINE_STATS_FIELDS),
            where="engine: ",
        )
    return stats


def run_inputs(run: RunDir) -> list[Input]:
    """The inputs of an inference run, from the data file its spec names."""
    spec = load_resolved(run.spec_file)
    if spec.kind != "infer":
        raise DataError(f"{run.path}: a {spec.kind} run, not an inference run: it has no results to gather")
    return load_inputs(spec.data)
