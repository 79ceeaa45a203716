"""Gather an inference run's shards into results.jsonl (or results.parquet, or an OpenAI batch output
file: output.format) and metrics.json: every input exactly once.

The runner's main process calls `gather_shards` once every rank is done; `python submit.py gather RUN`
runs it again by hand (`gather_run`). The results are written last, atomically, and only when every
input has a result, so their existence means the run is complete. jsonl and parquet hold the same
columns, the keys of a shard record; openai-batch a response per custom_id (`openai_batch.output_line`).
Scoring: see `llmbatch.scoring`.

metrics.json (keys: `llmbatch.metrics`) holds:
    inputs, prompt_tokens, output_tokens, finish_reasons   over all results
    rejected_records         records data.on_bad_record: skip left out (state.json, from submission)
    truncated_prompts        results whose prompt generation.long_prompts: truncate cut
    empty_outputs            results whose output is empty or only whitespace
    accuracy, correct, scored, scoring   when the inputs have references (scoring: output.scoring)
    wall_s, generate_s       per attempt the slowest rank's time (all of it / generating), summed
                             over the attempts whose ranks finished (and over an array's tasks);
                             time lost to a kill is not known
    tokens_per_s, inputs_per_s   what those ranks generated, per second of generate_s
    world_size, ranks, load_balance   the last attempt (of each array task): per-rank stats, min/max rank
                             generating time (1.0: perfectly balanced)
    prefill_s, decode_s, decode_steps, occupancy   where the engine ran: summed over the finished
                             ranks (occupancy: their mean share of cache slots in use per step)
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from llmbatch import openai_batch
from llmbatch.data import Input
from llmbatch.metrics import Metric, rejected_metric
from llmbatch.rundir import RunDir, atomic_file, atomic_write, atomic_write_json
from llmbatch.shards import list_shards, read_records, read_stats, record_line, run_inputs
from llmbatch.spec import OutputSpec, load_resolved

LISTED_IDS = 20
"""Missing ids named in an error; the rest are counted."""


class IncompleteRun(Exception):
    """Some inputs have no result in any shard."""

    def __init__(self, missing: list[str], total: int):
        self.missing = missing
        named = ", ".join(missing[:LISTED_IDS])
        more = f" and {len(missing) - LISTED_IDS} more" if len(missing) > LISTED_IDS else ""
        super().__init__(f"{len(missing)} of {total} inputs have no result: {named}{more}")


def gather_shards(run: RunDir, inputs: list[Input], output: OutputSpec) -> dict[str, Any]:
    """Write metrics.json, then the results (the inputs' records in input order, as output.format
    says); return the metrics.

    Raises IncompleteRun, writing nothing, if an input has no record.
    """
    records: dict[str, dict] = {}
    for shard in list_shards(run):
        for record in read_records(shard.path):
            records.setdefault(record["id"], record)  # resumed attempts skip done ids: one record each
    missing = [e.id for e in inputs if e.id not in records]
    if missing:
        raise IncompleteRun(missing, len(inputs))
    results = [records[e.id] for e in inputs]
    metrics = result_metrics(results, output.scoring) | rejected_metric(run) | timing_metrics(run)
    atomic_write_json(run.metrics_file, metrics)
    try:
        write_results(run, results, output.format)
    except OSError:  # a full disk, say: no metrics.json of a run that has no results
        run.metrics_file.unlink(missing_ok=True)
        raise
    return metrics


def write_results(run: RunDir, results: list[dict], output_format: str) -> None:
    path = run.results_for(output_format)
    if output_format == "jsonl":
        atomic_write(path, "".join(map(record_line, results)))
        return
    if output_format == openai_batch.FORMAT:
        # created: the run's submission (its spec.yaml's time), so that gathering again writes the same bytes
        model, created = openai_batch.model_name(load_resolved(run.spec_file).model.path), run.spec_file.stat()
        lines = (openai_batch.output_line(r, run.name, model, int(created.st_mtime)) for r in results)
        atomic_write(path, "".join(map(record_line, lines)))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Columns from every record, not the first one's keys only (shards of older attempts may lack one).
    names = list(dict.fromkeys(key for record in results for key in record))
    table = pa.table({name: [record.get(name) for record in results] for name in names})
    with atomic_file(path) as f:
        pq.write_table(table, f)


def gather_when_complete(run: RunDir, inputs: list[Input], output: OutputSpec) -> dict[str, Any] | None:
    """For the tasks of a job array: gather if every input has a record and no task gathered yet; return
    the metrics, or None if another task gathered or some inputs are still to come.

    Each task calls this once its shards are on disk, so the last task to finish finds them complete.
    Two tasks finishing together take turns (the lock waits): exactly one of them gathers.
    """
    with run.locked("gather"):
        if run.gathered_results() is not None:
            return None
        try:
            return gather_shards(run, inputs, output)
        except IncompleteRun:
            return None


def result_metrics(results: list[dict], scoring_mode: str) -> dict[str, Any]:
    metrics = {
        Metric.INPUTS: len(results),
        Metric.PROMPT_TOKENS: sum(r["prompt_tokens"] for r in results),
        Metric.OUTPUT_TOKENS: sum(r["output_tokens"] for r in results),
        Metric.FINISH_REASONS: dict(Counter(r["finish_reason"] for r in results)),
        # generation.long_prompts: truncate; shards written before this key count none
        Metric.TRUNCATED_PROMPTS: sum(r.get("truncated", False) for r in results),
        Metric.EMPTY_OUTPUTS: sum(not r["output"].strip() for r in results),
    }
    scored = [r for r in results if "reference" in r]
    if scored:
        correct = sum(r["correct"] for r in scored)
        metrics |= {
            Metric.ACCURACY: correct / len(scored),
            Metric.CORRECT: correct,
            Metric.SCORED: len(scored),
            Metric.SCORING: scoring_mode,
        }
    return metrics


def timing_metrics(run: RunDir) -> dict[str, Any]:
    """From the stats of ranks that finished; empty if none did (every attempt was killed).

    A job's attempts ran one after another: their times add up. So do an array's tasks' (the time
    its jobs held, not how long the array took); `ranks` holds each task's last attempt.
    """
    by_attempt: dict[tuple[int, int], list[dict]] = {}
    for shard in list_shards(run):
        if (stats := read_stats(shard)) is not None:
            by_attempt.setdefault((stats.get("task", 0), shard.attempt), []).append(stats)
    if not by_attempt:
        return {}
    generate_s = sum(max(s["generate_s"] for s in ranks) for ranks in by_attempt.values())
    all_stats = [s for ranks in by_attempt.values() for s in ranks]
    last_attempt = {task: attempt for task, attempt in sorted(by_attempt)}
    last = sorted((s for key in last_attempt.items() for s in by_attempt[key]), key=lambda s: s["rank"])
    times = [s["generate_s"] for s in last]
    engine = [s["engine"] for s in all_stats if s.get("engine")]
    engine_metrics = (
        {
            Metric.PREFILL_S: sum(s["prefill_s"] for s in engine),
            Metric.DECODE_S: sum(s["decode_s"] for s in engine),
            Metric.DECODE_STEPS: sum(s["decode_steps"] for s in engine),
            Metric.OCCUPANCY: sum(s["occupancy"] for s in engine) / len(engine),
        }
        if engine
        else {}
    )
    return engine_metrics | {
        Metric.WALL_S: sum(max(s["wall_s"] for s in ranks) for ranks in by_attempt.values()),
        Metric.GENERATE_S: generate_s,
        Metric.TOKENS_PER_S: sum(s["output_tokens"] for s in all_stats) / generate_s if generate_s else None,
        Metric.INPUTS_PER_S: sum(s["inputs"] for s in all_stats) / generate_s if generate_s else None,
        Metric.WORLD_SIZE: last[0]["world_size"],
        Metric.RANKS: last,
        Metric.LOAD_BALANCE: min(times) / max(times) if max(times) else 1.0,
    }


def gather_run(run: RunDir) -> int:
    """`submit.py gather RUN`: gather by hand; prints one line, returns the exit code."""
    inputs = run_inputs(run)
    output = load_resolved(run.spec_file).output
    try:
        metrics = gather_shards(run, inputs, output)
    except IncompleteRun as e:
        print(f"{run.path}: not gathered: {e}", file=sys.stderr)
        return 1
    accuracy = f", accuracy {metrics[Metric.ACCURACY]:.4f}" if Metric.ACCURACY in metrics else ""
    print(f"{run.results_for(output.format)}: {metrics[Metric.INPUTS]} results{accuracy}")
    return 0
