"""Shards and gather (llmbatch.shards, llmbatch.gather): torn and broken shard lines, one shard per
attempt, results in input order exactly once, what metrics.json and the summary count, output.format
(JSONL or Parquet), and gather's one-line errors on incomplete, damaged or moved runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmbatch.cli import main
from llmbatch.gather import IncompleteRun, gather_run, gather_shards
from llmbatch.lifecycle import read_progress
from llmbatch.rundir import RunDir, current_umask
from llmbatch.scoring import is_correct
from llmbatch.shards import ShardWriter, done_ids, read_records, shard_for
from llmbatch.spec import OutputSpec
from llmbatch.summary import summarize

from helpers import SMALL, inputs_of, run_cli, run_folder, submit_cli, submit_local

# --- shards -------------------------------------------------------------------------------------


def write_shard(run, attempt: int, rank: int, ids: list[str], torn: str = "") -> Path:
    shard = shard_for(run, attempt, rank)
    with ShardWriter(shard) as writer:
        writer.append([record(i) for i in ids])
    with shard.path.open("a") as f:
        f.write(torn)
    return shard.path


def record(input_id: str) -> dict:
    return {
        "id": input_id,
        "prompt": "p",
        "output": "o",
        "prompt_tokens": 3,
        "output_tokens": 2,
        "finish_reason": "eos",
    }


def test_a_torn_last_line_is_ignored(make_run):
    run = make_run("infer", overrides=SMALL)
    torn = write_shard(run, 0, 0, ["a", "b"], torn='{"id": "c", "prompt": "p", "out')
    write_shard(run, 0, 1, ["d"], torn='{"id": "e"}')  # parses, but its newline never made it
    assert [r["id"] for r in read_records(torn)] == ["a", "b"]
    assert done_ids(run, before_attempt=1) == {"a", "b", "d"}
    assert done_ids(run, before_attempt=0) == set()  # this attempt's own shards are not read


def test_a_broken_line_before_the_end_is_an_error(make_run):
    run = make_run("infer", overrides=SMALL)
    path = write_shard(run, 0, 0, ["a"], torn='{"id": "b", "pro\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_records(path)


def test_an_attempt_never_reuses_a_shard(make_run):
    run = make_run("infer", overrides=SMALL)
    write_shard(run, 0, 0, ["a"])
    with pytest.raises(FileExistsError):
        ShardWriter(shard_for(run, 0, 0))


# --- gather -------------------------------------------------------------------------------------


def test_gather_refuses_an_incomplete_run_and_names_what_is_missing(make_run, capsys):
    run = make_run("infer", overrides=SMALL)
    inputs = inputs_of(run)
    write_shard(run, 0, 0, [e.id for e in inputs[:-3]])
    with pytest.raises(IncompleteRun) as error:
        gather_shards(run, inputs, OutputSpec())
    assert error.value.missing == [e.id for e in inputs[-3:]]
    assert gather_run(run) == 1
    printed = capsys.readouterr().err
    assert all(e.id in printed for e in inputs[-3:])
    assert not run.results_file.exists() and not run.metrics_file.exists()


def test_a_long_list_of_missing_ids_is_cut_short():
    message = str(IncompleteRun([f"id-{i}" for i in range(100)], 120))
    assert message.startswith("100 of 120 inputs have no result: id-0, id-1")
    assert message.endswith("and 80 more") and "id-20" not in message


def test_gather_writes_results_in_input_order_exactly_once(make_run):
    run = make_run("infer", overrides=SMALL)
    ids = [e.id for e in inputs_of(run)]
    write_shard(run, 0, 0, ids[1::2], torn='{"id": "' + ids[0])
    write_shard(run, 1, 2, ids[0::2])
    assert gather_run(run) == 0
    assert [json.loads(line)["id"] for line in run.results_file.read_text().splitlines()] == ids
    progress = read_progress(run)
    assert (progress["done"], progress["total"], progress["attempt"]) == (40, 40, 1)
    assert progress["ranks"] == {2: 20}


def test_the_summary_counts_finish_reasons_empty_outputs_and_truncated_prompts(make_run):
    """37 of 40 answers came back empty, and nothing said so."""
    run = make_run("infer", overrides=[*SMALL, "output.scoring=contains"])
    records = [
        record(input_id)
        | {
            "output": ["", " \n", "odd", "It is even."][n % 4],
            "finish_reason": "length" if n % 3 == 0 else "eos",
            "truncated": n < 5,
            "reference": "even",
            "correct": n % 4 == 3,
        }
        for n, input_id in enumerate(e.id for e in inputs_of(run))
    ]
    with ShardWriter(shard_for(run, 0, 0)) as writer:
        writer.append(records)
    assert gather_run(run) == 0
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["finish_reasons"] == {"length": 14, "eos": 26}
    assert (metrics["empty_outputs"], metrics["truncated_prompts"]) == (20, 5)
    assert (metrics["correct"], metrics["scored"], metrics["scoring"]) == (10, 40, "contains")
    lines = [line.split() for line in summarize(run).splitlines()]
    assert ["accuracy", "0.25", "(10", "of", "40,", "scoring:", "contains)"] in lines
    assert ["finish", "reasons", "eos", "26,", "length", "14"] in lines
    assert ["empty", "outputs", "20"] in lines and ["truncated", "prompts", "5"] in lines


@pytest.mark.slow
def test_a_run_says_how_its_outputs_ended(tmp_path):
    """A real run whose max_new_tokens cuts outputs short: the summary it prints counts what results.jsonl
    holds; plain prompts to the embedded model (it has a chat template) are warned of, at submission
    and in the run log."""
    proc = submit_local(
        "infer",
        tmp_path / "runs",
        *("--set", "data.max_inputs=40", "--set", "generation.max_new_tokens=2", "--set", "data.chat_template=null"),
        *("--set", "output.scoring=normalized", "--set", "output.include_rendered_prompt=true"),
    )
    warning = "warning: data.chat_template: the model has a chat template, but the prompts reach it as plain text"
    assert proc.stderr.startswith(f"llmbatch: {warning}") and proc.stderr.count("\n") == 1, proc.stderr
    run: RunDir = run_folder(proc)
    assert warning in submit_cli("logs", str(run.path)).stdout
    results = [json.loads(line) for line in run.results_file.read_text().splitlines()]
    reasons = {reason: sum(r["finish_reason"] == reason for r in results) for reason in ("eos", "length")}
    empty = sum(r["output"].strip() == "" for r in results)
    correct = sum(r["correct"] for r in results)
    assert reasons["length"] > 0 and all(r["rendered_prompt"] == r["prompt"] for r in results)
    assert all(r["correct"] == is_correct(r["output"], r["reference"], "normalized") for r in results)
    lines = [line.split() for line in proc.stdout.splitlines()]
    [finish] = [line[2:] for line in lines if line[:2] == ["finish", "reasons"]]  # eos 30, length 10
    assert {reason: int(n.rstrip(",")) for reason, n in zip(finish[::2], finish[1::2])} == {
        reason: n for reason, n in reasons.items() if n
    }
    assert ["empty", "outputs", str(empty)] in lines and ["truncated", "prompts", "0"] in lines, proc.stdout
    assert any(line[:4] == ["accuracy", f"{correct / 40:.4g}", f"({correct}", "of"] for line in lines), proc.stdout
    assert ["40,", "scoring:", "normalized)"] in [line[-3:] for line in lines]


# --- output.format --------------------------------------------------------------------------------


def test_output_format_is_jsonl_parquet_or_openai_batch(tmp_path, good, capsys):
    good["output"]["format"] = "csv"
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "output.format: must be 'jsonl' or 'parquet' or 'openai-batch', got 'csv'" in err, err


# --- output.format: parquet ----------------------------------------------------------------------


def test_parquet_results_hold_the_jsonl_records(make_run):
    run = make_run("infer", overrides=["data.max_inputs=40", "output.format=parquet"])
    inputs = inputs_of(run)
    ids = [e.id for e in inputs]
    write_shard(run, 0, 0, ids[1::2])
    write_shard(run, 0, 1, ids[0::2])
    assert gather_run(run) == 0 and not run.results_file.exists()
    parquet = run.results_for("parquet")
    assert oct(parquet.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert "results.parquet" in summarize(run)
    gather_shards(run, inputs, OutputSpec())
    assert pq.read_table(parquet).to_pylist() == [
        json.loads(line) for line in run.results_file.read_text().splitlines()
    ]


def test_parquet_results_appear_only_when_complete(make_run, monkeypatch):
    """A merge that dies while writing leaves no results.parquet (a complete-looking run) and no temp file."""
    run = make_run("infer", overrides=["data.max_inputs=40", "output.format=parquet"])
    write_shard(run, 0, 0, [e.id for e in inputs_of(run)])
    real_write_table = pq.write_table
    seen = []

    def write_then_die(table, where, **kwargs):
        real_write_table(table.slice(0, 5), where, **kwargs)  # bytes on disk, then the process dies
        seen.append(run.results_for("parquet").exists())
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        gather_run(run)
    assert seen == [False] and run.gathered_results() is None
    assert not [p for p in os.listdir(run.path) if p.startswith(".results")]
    monkeypatch.setattr(pq, "write_table", real_write_table)
    assert gather_run(run) == 0 and pq.read_table(run.results_for("parquet")).num_rows == 40


# --- gather's errors ------------------------------------------------------------------------------


def gather_error(run, capsys) -> str:
    assert main(["gather", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err.strip()


def test_gather_of_a_finetune_run_says_what_it_is(make_run, capsys):
    run = make_run("finetune")
    assert gather_error(run, capsys) == (
        f"llmbatch: error: {run.path}: a finetune run, not an inference run: it has no results to gather"
    )


def test_gather_names_a_damaged_shard(make_run, capsys):
    from llmbatch.shards import shard_for

    run = make_run("infer")
    shard = shard_for(run, 0, 0)
    shard.path.parent.mkdir()
    record = b'{"id": "1", "output": "x", "prompt_tokens": 3, "output_tokens": 1, "finish_reason": "eos"}\n'
    shard.path.write_bytes(record + b'\x00\x00garbage\n{"id": "2"}\n')
    assert gather_error(run, capsys) == (
        f"llmbatch: error: {shard.path}: damaged, line 2 is not valid JSON (Expecting value)"
    )
    shard.path.write_bytes(record.replace(b'"prompt_tokens": 3', b'"prompt_tokens": "3"'))
    assert gather_error(run, capsys) == (
        f'llmbatch: error: {shard.path}: damaged, line 1: prompt_tokens is "3", not an integer >= 0'
    )


def test_gather_names_a_damaged_run_spec(make_run, capsys):
    run = make_run("infer")
    run.spec_file.write_text("model: [unclosed\n")
    assert gather_error(run, capsys).startswith(f"llmbatch: error: {run.spec_file}: invalid YAML at line ")


def test_gather_says_when_the_data_file_moved(make_run, tmp_path, capsys):
    data = tmp_path / "inputs.jsonl"
    data.write_text('{"id": "a", "question": "1 0 1"}\n')
    run = make_run("infer", overrides=[f"data.path={data}"])
    data.rename(tmp_path / "elsewhere.jsonl")
    assert gather_error(run, capsys) == f"llmbatch: error: {run.spec_file}: data.path: no such file: {data}"
