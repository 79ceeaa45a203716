"""Lifecycle commands on run folders that are finished, damaged or whose pid was reused, and output
into a closed pipe: one line and the right exit code, never a traceback, never a wrong process killed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from llmbatch.cli import main
from llmbatch.lifecycle import process_start_ticks

from helpers import REPO, run_folder, submit_cli


@pytest.fixture
def sleeper():
    """A process that is not the run's job, though it may hold the pid the job once had."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def local_run(make_run, **state):
    run = make_run("infer")
    run.update_state(kind="infer", executor="local", **state)
    return run


def test_cancel_never_signals_a_process_that_reused_the_jobs_pid(make_run, sleeper, capsys):
    run = local_run(make_run, job_ids=[str(sleeper.pid)], local_start_ticks=process_start_ticks(sleeper.pid) - 1)
    assert main(["cancel", str(run.path)]) == 0
    assert "already finished (STOPPED)" in capsys.readouterr().out
    assert sleeper.poll() is None  # still alive: it was never the job


def test_cancel_stops_the_local_job_it_started(make_run, sleeper, capsys):
    run = local_run(make_run, job_ids=[str(sleeper.pid)], local_start_ticks=process_start_ticks(sleeper.pid))
    assert main(["status", str(run.path)]) == 0
    assert " RUNNING " in capsys.readouterr().out
    assert main(["cancel", str(run.path)]) == 0
    assert f"cancelled local job {sleeper.pid}" in capsys.readouterr().out
    assert sleeper.wait(timeout=10) == -15


def test_cancel_of_a_finished_run_says_so(make_run, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = local_run(make_run, job_ids=[str(gone.pid)], local_start_ticks=12345)
    assert main(["cancel", str(run.path)]) == 0
    assert capsys.readouterr().out.strip() == f"local job {gone.pid} already finished (STOPPED); nothing to cancel"


def test_status_of_a_run_with_a_damaged_state_file_is_one_line(make_run, capsys):
    run = local_run(make_run, job_ids=["1"])
    run.state_file.write_text('{"executor": "loc')  # torn by a full disk, say
    assert main(["status", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmbatch: error: {run.state_file}: damaged, not valid JSON") and len(err.splitlines()) == 1


def test_list_shows_the_other_runs_when_one_is_damaged(make_run, capsys):
    good = local_run(make_run, job_ids=["1"])
    bad = local_run(make_run, job_ids=["1"])
    bad.state_file.write_bytes(b"\xff\xfe[")
    assert main(["list", "--root", str(good.path.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(good.name) and "STOPPED" in line for line in lines)
    assert any(line.startswith(f"{bad.name}  damaged: ") for line in lines)


def test_output_into_a_closed_pipe_ends_quietly(make_run):
    run = local_run(make_run, job_ids=["1"])
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written (`status | head -0`)
    proc = subprocess.run(
        [sys.executable, str(REPO / "submit.py"), "status", str(run.path)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""
    assert json.loads(run.state_file.read_text())["job_ids"] == ["1"]


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


def test_status_counts_inputs_from_the_run_folder_not_the_data_file(make_run, tmp_path, capsys):
    data = tmp_path / "inputs.jsonl"
    data.write_text("".join(f'{{"id": "{i}", "question": "1 0"}}\n' for i in range(7)))
    run = make_run("infer", overrides=[f"data.path={data}"])
    run.update_state(kind="infer", executor="local", job_ids=["1"], inputs=7)
    data.unlink()  # status must not need it (nor read millions of lines for a count)
    assert main(["status", str(run.path)]) == 0
    assert "0/7 inputs" in capsys.readouterr().out


def test_resume_refuses_when_the_data_changed_since_submission(make_run, tmp_path, capsys):
    """It would mix results of old and new inputs (status then said COMPLETED 25/20)."""
    from llmbatch.fingerprint import spec_fingerprint
    from llmbatch.shards import shard_for
    from llmbatch.spec import load_resolved

    data = tmp_path / "inputs.jsonl"
    data.write_text(rows := "".join(f'{{"id": "{i}", "question": "1 0", "answer": "odd"}}\n' for i in range(3)))
    run = make_run("infer", overrides=[f"data.path={data}"])
    fingerprint = spec_fingerprint(load_resolved(run.spec_file))
    run.update_state(
        kind="infer",
        executor="local",
        job_ids=["1"],
        inputs=3,  # as submission records them
        inputs_fingerprint=fingerprint,
    )
    data.write_text(rows.replace('"1 0"', '"0 0"', 1))
    assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err == (
        f"llmbatch: error: {data}: the run's data file (data.path) changed since it "
        f"was submitted; resuming would mix results of old and new inputs (put the "
        f"file back as it was, or start a new run)\n"
    )
    assert not run.submitit_dir.exists()  # nothing was queued
    data.unlink()
    assert main(["resume", str(run.path)]) == 2
    # The run's spec is checked as at submission, data path included.
    assert capsys.readouterr().err == f"llmbatch: error: {run.spec_file}: data.path: no such file: {data}\n"
    data.write_text(rows)
    run.update_state(inputs_fingerprint=fingerprint | {"model config.json (sha256)": "0" * 64})
    assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err == (
        f"llmbatch: error: submitted with model config.json (sha256)={'0' * 64!r}, "
        f"but it is now {fingerprint['model config.json (sha256)']!r}; a resume runs "
        f"on the inputs the run was submitted with (put it back, or start a new run)\n"
    )
    assert not run.submitit_dir.exists()

    # A run resumed over other data before fingerprints existed: more records than inputs.
    shard = shard_for(run, 0, 0)
    shard.path.parent.mkdir()
    shard.path.write_text("".join(f'{{"id": "{i}", "output": "odd"}}\n' for i in range(5)))
    assert main(["status", str(run.path)]) == 0
    assert "3/3 inputs" in capsys.readouterr().out


@pytest.mark.slow
def test_submission_records_the_inputs_fingerprint(tmp_path, cache_dir):
    from llmbatch.fingerprint import spec_fingerprint
    from llmbatch.spec import load_resolved

    data = tmp_path / "inputs.jsonl"
    data.write_text('{"id": "a", "question": "1 0 1", "answer": "even"}\n')
    run = run_folder(
        submit_cli("infer", "--executor", "local", "--output", str(tmp_path / "runs"), "--set", f"data.path={data}")
    )
    fingerprint = run.read_state()["inputs_fingerprint"]
    assert fingerprint == spec_fingerprint(load_resolved(run.spec_file))
    assert fingerprint["data.path contents (sha256)"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_a_second_resume_of_the_same_run_is_refused(make_run, capsys):
    run = local_run(make_run, job_ids=["1"])
    with run.exclusive("resume"):  # as a first `resume`, still waiting for its job, holds it
        assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err.strip() == (f"llmbatch: error: {run.path}: another resume of this run is under way")


def test_resume_refuses_while_a_rank_of_an_earlier_attempt_still_runs(make_run, sleeper, capsys, monkeypatch):
    """After a SIGKILL of the CLI and of the job's process, an orphaned rank may still write shards."""
    import socket

    from llmbatch import submission

    monkeypatch.setattr(submission, "RANK_EXIT_GRACE_S", 1.0)

    from llmbatch.rundir import atomic_write_json

    run = local_run(make_run, job_ids=["1"])
    atomic_write_json(
        run.ranks_dir / "attempt-000-rank-00001.json",
        {"host": socket.gethostname(), "pid": sleeper.pid, "start_ticks": process_start_ticks(sleeper.pid)},
    )
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"llmbatch: error: {run.path}: attempt-000-rank-00001 is still running here (pid {sleeper.pid})")
        and len(err.splitlines()) == 1
    )
    assert not run.submitit_dir.exists()  # nothing was submitted


# --- damaged side files: status, gather and list give one line ------------------------------------
# Run folders are built by the code that writes them (ShardWriter, the rank's stats, the merge, the
# state updates), then one side file is damaged as a full disk, a hand edit or a colleague might.


def finished_infer_run(make_run, tmp_path):
    """An inference run of two inputs whose one rank finished: a shard, its stats, the state."""
    from dataclasses import asdict

    from llmbatch.data import load_examples
    from llmbatch.runners.generation import Completion
    from llmbatch.runners.infer import Prompt, RankStats, result_record
    from llmbatch.shards import ShardWriter, shard_for, write_stats
    from llmbatch.spec import load_resolved

    data = tmp_path / "inputs.jsonl"
    data.write_text(
        '{"id": "a", "question": "1 0 1", "answer": "even"}\n{"id": "b", "question": "1 1 1", "answer": "odd"}\n'
    )
    run = make_run("infer", overrides=[f"data.path={data}"])
    run.update_state(kind="infer", executor="local", job_ids=["1"], inputs=2, attempt=0, requeues=0)
    stats = RankStats(attempt=0, rank=0, world_size=1, generate_s=1.5, wall_s=2.0)
    records = [
        result_record(Prompt(e, [1, 2, 3]), Completion(" even", 2, "eos"))
        for e in load_examples(load_resolved(run.spec_file).data)
    ]
    stats.add_records(records)
    shard = shard_for(run, 0, 0)
    with ShardWriter(shard) as writer:
        writer.append(records)
    write_stats(shard, asdict(stats))
    return run


def finetune_run(make_run):
    """A fine-tuning run some steps in: train_metrics.jsonl rows as the recipe logs them."""
    from llmbatch.rundir import append_jsonl

    run = make_run("finetune")
    run.update_state(kind="finetune", executor="local", job_ids=["1"], attempt=0, requeues=0)
    for step in (1, 2):
        append_jsonl(
            run.train_metrics_file,
            {
                "step": step,
                "total_steps": 10,
                "epoch": 0,
                "loss": 2.5 / step,
                "lr": 0.002,
                "grad_norm": 1.25,
                "tokens": 512 * step,
                "elapsed_s": 0.5 * step,
                "attempt": 0,
            },
        )
    append_jsonl(run.train_metrics_file, {"step": 2, "val_loss": 1.5, "val_ppl": 4.48, "val_accuracy": 0.5})
    return run


def stats_file(run):
    from llmbatch.shards import list_shards

    return list_shards(run)[0].stats_path


def state_of_array(run, **changes):
    """The state of a job array of two tasks (as submission and the tasks write it), with `changes`."""
    state = json.loads(run.state_file.read_text()) | {
        "ranks_per_task": 1,
        "tasks": {
            "0": {"job_id": "7_0", "attempt": 0, "requeues": 0, "inputs": 1},
            "1": {"job_id": "7_1", "attempt": 0, "requeues": 0, "inputs": 1},
        },
    }
    return json.dumps(state | changes)


def edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


INFER_DAMAGE = {  # name: (damage(run), the file named, what the line says after "damaged, ")
    "stats not JSON": (lambda run: stats_file(run).write_text('{"rank": 0, "world'), stats_file, "not valid JSON"),
    "stats a list": (lambda run: stats_file(run).write_text("[1, 2]"), stats_file, "not a JSON object but [1, 2]"),
    "stats times as text": (
        lambda run: edit_json(stats_file(run), generate_s="1.5"),
        stats_file,
        'generate_s is "1.5", not a finite number',
    ),
    "stats without a rank": (
        lambda run: stats_file(run).write_text('{"world_size": 1}'),
        stats_file,
        "rank is missing",
    ),
    "stats engine a number": (
        lambda run: edit_json(stats_file(run), engine=3),
        stats_file,
        "engine is 3, not a JSON object or null",
    ),
    "state a list": (
        lambda run: run.state_file.write_text("[]"),
        lambda run: run.state_file,
        "not a JSON object but []",
    ),
    "state a string": (
        lambda run: run.state_file.write_text('"COMPLETED"'),
        lambda run: run.state_file,
        'not a JSON object but "COMPLETED"',
    ),
    "state requeues as text": (
        lambda run: edit_json(run.state_file, requeues="3"),
        lambda run: run.state_file,
        'requeues is "3", not an integer >= 0',
    ),
    "state inputs NaN": (
        lambda run: run.state_file.write_text('{"kind": "infer", "inputs": NaN}'),
        lambda run: run.state_file,
        "inputs is NaN, not an integer >= 0",
    ),
    "state job ids a string": (
        lambda run: edit_json(run.state_file, job_ids="12"),
        lambda run: run.state_file,
        'job_ids is "12", not a list of job ids',
    ),
    "state attempt_started a string": (
        lambda run: edit_json(run.state_file, attempt_started="now"),
        lambda run: run.state_file,
        'attempt_started is "now", not a finite number',
    ),
    "array state without ranks_per_task": (
        lambda run: run.state_file.write_text(state_of_array(run).replace('"ranks_per_task": 1, ', "")),
        lambda run: run.state_file,
        "ranks_per_task is missing",
    ),
    "array task without a job id": (
        lambda run: run.state_file.write_text(state_of_array(run, tasks={"0": {"attempt": 0}})),
        lambda run: run.state_file,
        "tasks.0: job_id is missing",
    ),
    "array without tasks": (
        lambda run: run.state_file.write_text(state_of_array(run, tasks={})),
        lambda run: run.state_file,
        "tasks is {}, not a JSON object with entries",
    ),
    "array task named oddly": (
        lambda run: run.state_file.write_text(state_of_array(run, tasks={"x": {"job_id": "7_0"}})),
        lambda run: run.state_file,
        'tasks holds "x", not a task number',
    ),
}


def one_error_line(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1, captured.err
    return captured.err.strip()


def assert_listed_as_damaged(run, other, capsys, path, why):
    assert main(["list", "--root", str(run.path.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(other.name) and " STOPPED " in line for line in lines), lines
    assert any(line.startswith(f"{run.name}  damaged: {path}: damaged, {why}") for line in lines), lines


@pytest.mark.parametrize("case", INFER_DAMAGE)
def test_status_gather_and_list_on_a_damaged_inference_side_file_give_one_line(case, make_run, tmp_path, capsys):
    damage, path_of, why = INFER_DAMAGE[case]
    other = finished_infer_run(make_run, tmp_path)
    run = finished_infer_run(make_run, tmp_path)
    path = path_of(run)
    damage(run)
    expected = f"llmbatch: error: {path}: damaged, {why}"
    assert one_error_line(capsys, ["status", str(run.path)]).startswith(expected)
    if "stats" in case:  # the merge reads a rank's stats; the state is not its business
        assert one_error_line(capsys, ["gather", str(run.path)]).startswith(expected)
        assert not run.results_file.exists() and not run.metrics_file.exists()
    assert_listed_as_damaged(run, other, capsys, path, why)


def test_an_undamaged_inference_run_gathers(make_run, tmp_path, capsys):
    """The run folder the damage tests start from is a good one."""
    run = finished_infer_run(make_run, tmp_path)
    assert main(["status", str(run.path)]) == 0
    assert " STOPPED  2/2 inputs " in capsys.readouterr().out
    assert main(["gather", str(run.path)]) == 0
    assert json.loads(run.metrics_file.read_text())["examples"] == 2


def garbage_line(run):
    with run.train_metrics_file.open("ab") as f:
        f.write(b"\x00\xff\xfe\x80garbage\n")


def torn_line_then_more(run):
    text = run.train_metrics_file.read_text()
    run.train_metrics_file.write_text(text.replace('"attempt": 0}\n', '"attem\n', 1))


FINETUNE_DAMAGE = {
    "a loss as text": (
        lambda run: run.train_metrics_file.write_text('{"step": 3, "loss": "low"}\n'),
        lambda run: run.train_metrics_file,
        'line 1: loss is "low", not a number',
    ),
    "a NaN step": (
        lambda run: run.train_metrics_file.write_text('{"step": NaN, "loss": 1.0}\n'),
        lambda run: run.train_metrics_file,
        "line 1: step is NaN, not an integer >= 0",
    ),
    "a row without a step": (
        lambda run: run.train_metrics_file.write_text('{"loss": 1.0}\n'),
        lambda run: run.train_metrics_file,
        "line 1: step is missing",
    ),
    "a row that is a list": (
        lambda run: run.train_metrics_file.write_text("[1]\n"),
        lambda run: run.train_metrics_file,
        "line 1: not a JSON object but [1]",
    ),
    "binary garbage": (garbage_line, lambda run: run.train_metrics_file, "line 4 is not valid JSON"),
    "a torn line mid-file": (torn_line_then_more, lambda run: run.train_metrics_file, "line 1 is not valid JSON"),
    "metrics.json a list": (
        lambda run: run.metrics_file.write_text("[]"),
        lambda run: run.metrics_file,
        "not a JSON object but []",
    ),
    "metrics.json steps as text": (
        lambda run: run.metrics_file.write_text('{"steps": "10"}'),
        lambda run: run.metrics_file,
        'steps is "10", not an integer >= 0',
    ),
    "state total a float": (
        lambda run: edit_json(run.state_file, attempt=1.5),
        lambda run: run.state_file,
        "attempt is 1.5, not an integer >= 0",
    ),
}


@pytest.mark.parametrize("case", FINETUNE_DAMAGE)
def test_status_and_list_on_a_damaged_finetune_side_file_give_one_line(case, make_run, capsys):
    damage, path_of, why = FINETUNE_DAMAGE[case]
    other, run = finetune_run(make_run), finetune_run(make_run)
    path = path_of(run)
    damage(run)
    assert one_error_line(capsys, ["status", str(run.path)]).startswith(f"llmbatch: error: {path}: damaged, {why}")
    assert_listed_as_damaged(run, other, capsys, path, why)


def test_finetune_status_reads_what_a_diverged_or_killed_run_logs(make_run, capsys):
    """A NaN or infinite loss is what a diverging run logs, and a torn last line what a kill leaves:
    neither is damage."""
    run = finetune_run(make_run)
    with run.train_metrics_file.open("a") as f:
        f.write('{"step": 3, "total_steps": 10, "loss": NaN, "grad_norm": Infinity}\n{"step": 4, "loss": 0.')
    assert main(["status", str(run.path)]) == 0
    assert " STOPPED  step 3/10, loss nan " in capsys.readouterr().out


def test_list_shows_the_other_runs_when_a_run_spec_is_damaged(make_run, tmp_path, capsys):
    other = finished_infer_run(make_run, tmp_path)
    run = finished_infer_run(make_run, tmp_path)
    run.state_file.write_text('{"kind": "infer", "executor": "local", "job_ids": ["1"]}')  # no input count
    run.spec_file.write_text("model: [unclosed\n")
    assert main(["list", "--root", str(run.path.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(other.name) and " STOPPED " in line for line in lines), lines
    assert any(line.startswith(f"{run.name}  damaged: {run.spec_file}: invalid YAML at line ") for line in lines), lines


# --- a damaged checkpoint manifest -----------------------------------------------------------------

MANIFEST_DAMAGE = {
    "invalid JSON": ('{"files": {"optimizer.bin": {"bytes": 1', "not valid JSON"),
    "not an object": ("[1, 2]", "not a JSON object but [1, 2]"),
    "files a list": ('{"files": ["optimizer.bin"], "spec": {}}', 'files is ["optimizer.bin"], not a JSON object'),
    "a file entry a string": (
        '{"files": {"optimizer.bin": "12 bytes"}, "spec": {}}',
        'files.optimizer.bin: not a JSON object but "12 bytes"',
    ),
    "a file outside the folder": (
        '{"files": {"../../spec.yaml": {"bytes": 1, "sha256": "0"}}, "spec": {}}',
        'files holds "../../spec.yaml", not a file name',
    ),
}


@pytest.mark.parametrize("case", MANIFEST_DAMAGE)
def test_a_checkpoint_with_a_damaged_manifest_is_damaged_and_resume_falls_back(case, make_run):
    """A manifest that is not one is a damaged checkpoint, as a torn file is: the ranks set it aside
    and load the previous one (runners/checkpoint.py: resume), and `resume` checks that one's spec."""
    from llmbatch.runners.checkpoint import (
        MANIFEST_FILE,
        CheckpointMismatch,
        check_resumable,
        damage,
        spec_fingerprint,
        write_manifest,
    )
    from llmbatch.spec import load_resolved

    run = make_run("finetune")
    spec = load_resolved(run.spec_file)
    older, newer = run.checkpoints_dir / "step-000004", run.checkpoints_dir / "step-000006"
    for folder in (older, newer):
        folder.mkdir(parents=True)
        (folder / "optimizer.bin").write_bytes(b"x" * 12)
        write_manifest(folder, spec_fingerprint(spec))
    text, why = MANIFEST_DAMAGE[case]
    (newer / MANIFEST_FILE).write_text(text)
    assert damage(older) is None
    assert damage(newer).startswith(f"its {MANIFEST_FILE} is damaged, {why}")
    check_resumable(run.checkpoints_dir, spec)  # the older one's spec: this run's
    (older / MANIFEST_FILE).write_text((older / MANIFEST_FILE).read_text().replace('"lora.r": 8', '"lora.r": 4'))
    with pytest.raises(CheckpointMismatch, match=f"^{older}: saved with lora.r=4, but the run's spec now gives 8"):
        check_resumable(run.checkpoints_dir, spec)


# --- Ctrl-C ----------------------------------------------------------------------------------------


def interrupted(argv: list[str], after_s: float) -> subprocess.CompletedProcess:
    """`python submit.py ARGV`, sent SIGINT (as a terminal's Ctrl-C) after `after_s` seconds."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "submit.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=after_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("after_s", [0.2, 0.4, 0.7, 1.0, 1.5])
def test_ctrl_c_while_starting_is_one_line(after_s, make_run):
    """Early: while Python imports llmbatch, or the command has just begun."""
    run = local_run(make_run, job_ids=["1"])
    proc = interrupted(["status", str(run.path)], after_s)
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 1, proc.stderr
    if proc.returncode != 0:  # it may have finished first
        # Before Python set up its handler the signal's default ends the process, quietly too.
        assert proc.returncode in (130, -signal.SIGINT), proc.stderr
        assert proc.stderr in ("", "llmbatch: interrupted\n"), proc.stderr


def test_ctrl_c_of_a_command_that_waits_is_one_line(make_run, sleeper):
    """`logs -f` of a running job follows it until it ends; Ctrl-C ends the command (not the job)."""
    run = local_run(make_run, job_ids=[str(sleeper.pid)], local_start_ticks=process_start_ticks(sleeper.pid))
    run.node_log(0).parent.mkdir()
    run.node_log(0).write_text("== attempt 0 on a host\n")
    proc = interrupted(["logs", str(run.path), "-f"], 8)
    assert proc.returncode == 130 and proc.stderr == "llmbatch: interrupted\n", proc.stderr
    assert proc.stdout == "== attempt 0 on a host\n"
    assert sleeper.poll() is None


def test_ctrl_c_during_submission_leaves_a_run_to_resume_or_nothing(make_run, tmp_path):
    """Ctrl-C at moments of `infer` before its job runs: one line; a run folder it leaves is whole
    (spec and state) and its message says how to go on."""
    for after_s in (1.0, 2.5, 4.0, 6.0):
        root = tmp_path / f"after-{after_s}"
        proc = interrupted(
            ["infer", "--executor", "local", "--output", str(root), "--set", "data.max_samples=4"], after_s
        )
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 1, proc.stderr
        runs = list(root.glob("*")) if root.exists() else []
        assert all((r / "spec.yaml").is_file() and (r / "state.json").is_file() for r in runs), runs
        if proc.returncode == 130 and runs:
            assert proc.stderr.startswith("llmbatch: interrupted; ") and str(runs[0]) in proc.stderr, proc.stderr
        elif proc.returncode == 130:
            assert proc.stderr == "llmbatch: interrupted\n"
        else:
            assert proc.returncode == 0, proc.stderr  # it finished first
