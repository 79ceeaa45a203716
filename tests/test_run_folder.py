"""Run-folder hardening. A run folder is shared storage that others may write: what they plant there
is never written through, never executed, and an edited spec is checked as at submission before
anything is queued again. A damaged state file, spec, side file or checkpoint manifest gives status,
gather and list one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys

import pytest

from llmbatch.cli import main
from llmbatch.rundir import UnsafeRunFile, append_jsonl, atomic_write_json, open_append, save_folder

from helpers import REPO, finetune_run, local_run

SECRET = b"the victim's own file\n"


@pytest.fixture
def victim(tmp_path):
    """A file outside the run folder that a planted link points to."""
    path = tmp_path / "victim.txt"
    path.write_bytes(SECRET)
    return path


def plant(link, target):
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def shard_writer(run):
    from llmbatch.shards import ShardWriter, shard_for

    with ShardWriter(shard_for(run, 0, 0)) as writer:
        writer.append([{"id": "a"}])


APPENDS = {  # what each writes, and how
    "commands.jsonl": lambda run: run.record_command({"node": 0}),
    ".resume.lock": lambda run: run.exclusive("resume").__enter__(),
    ".gather.lock": lambda run: run.locked("gather").__enter__(),
    ".state.lock": lambda run: run.update_state(x=1),
    "train_metrics.jsonl": lambda run: append_jsonl(run.train_metrics_file, {"step": 1}),
    "shards/attempt-000-rank-00000.jsonl": shard_writer,
    "logs/node-0.log": lambda run: open_append(run.node_log(0)),
}


@pytest.mark.parametrize("name", APPENDS)
def test_an_append_or_lock_never_follows_a_planted_link(make_run, victim, name):
    run = local_run(make_run)
    plant(run.path / name, victim)
    with pytest.raises((UnsafeRunFile, FileExistsError), match="symbolic link|File exists"):
        APPENDS[name](run)
    assert victim.read_bytes() == SECRET


@pytest.mark.parametrize("folder", ["logs", "shards", "ranks"])
def test_a_planted_link_in_place_of_a_folder_is_never_written_through(make_run, tmp_path, folder):
    run = local_run(make_run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plant(run.path / folder, elsewhere)
    with pytest.raises(UnsafeRunFile, match=f"{run.path / folder}: a symbolic link in a run folder"):
        {
            "logs": lambda: open_append(run.node_log(0, task=3)),
            "shards": lambda: shard_writer(run),
            "ranks": lambda: run.record_rank(0, 0),
        }[folder]()
    assert list(elsewhere.iterdir()) == []


WHOLE_FILES = {
    ".space-reserve": lambda run: run.reserve_space(),
    "ranks/attempt-000-rank-00000.json": lambda run: run.record_rank(0, 0),
    "metrics.json": lambda run: atomic_write_json(run.metrics_file, {}),
}


@pytest.mark.parametrize("name", WHOLE_FILES)
def test_a_whole_file_replaces_a_planted_link_never_its_target(make_run, victim, name):
    run = local_run(make_run)
    plant(run.path / name, victim)
    WHOLE_FILES[name](run)
    assert victim.read_bytes() == SECRET
    assert not (run.path / name).is_symlink()


def test_a_saved_folder_never_writes_through_a_planted_temp_link(make_run, tmp_path, victim):
    run = local_run(make_run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chmod(victim, 0o600)
    plant(run.path / ".adapter.tmp", elsewhere)

    def write(folder):
        (folder / "adapter_config.json").write_text("{}")
        (folder / "planted").symlink_to(victim)  # as if planted while the writer ran: chmod passes it by

    save_folder(run.adapter_dir, write)
    assert list(elsewhere.iterdir()) == [] and (run.adapter_dir / "adapter_config.json").is_file()
    assert victim.read_bytes() == SECRET and victim.stat().st_mode & 0o777 == 0o600


def test_resume_with_a_planted_lock_link_is_one_line_and_writes_nothing(make_run, victim, capsys):
    run = local_run(make_run)
    plant(run.path / ".resume.lock", victim)
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmbatch: error: {run.path / '.resume.lock'}: a symbolic link") and err.count("\n") == 1
    assert victim.read_bytes() == SECRET and not run.submitit_dir.exists()


def test_a_node_job_never_writes_its_log_through_a_planted_link(make_run, victim, monkeypatch):
    """The real node job (submitit's local executor): it fails naming the link before launching anything."""
    from llmbatch import slurm
    from llmbatch.jobstep import make_plan
    from llmbatch.spec import load_resolved

    run = local_run(make_run)
    plant(run.node_log(0), victim)
    spec = load_resolved(run.spec_file)
    job = slurm.submit(slurm.make_executor("local", spec, run), make_plan(spec, run.path))
    with pytest.raises(Exception, match="node-0.log: a symbolic link or a FIFO"):
        job.results()
    assert victim.read_bytes() == SECRET


# --- never unpickle what is in a run folder ---------------------------------------------------------


class Planted:
    """Unpickling this creates `marker`: what a planted result pickle could do as whoever reads it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_status_and_list_never_unpickle_a_planted_result(make_run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    run = local_run(make_run)
    run.submitit_dir.mkdir()
    (run.submitit_dir / "1_0_result.pkl").write_bytes(pickle.dumps(("success", Planted(marker))))
    assert main(["status", str(run.path)]) == 0
    assert f"{run.name}  infer  local:1  STOPPED" in capsys.readouterr().out
    assert main(["list", "--root", str(run.path.parent)]) == 0
    assert " STOPPED " in capsys.readouterr().out
    assert not marker.exists()


def test_a_local_run_that_ended_says_so_from_its_own_record(make_run, capsys):
    run = local_run(make_run, ended={"job_id": "1", "state": "FAILED"})
    assert main(["status", str(run.path)]) == 0
    assert " local:1  FAILED " in capsys.readouterr().out
    run.update_state(job_ids=["1", "2"])  # a later job: the record is of the one before
    assert main(["status", str(run.path)]) == 0
    assert " local:2  STOPPED " in capsys.readouterr().out


# --- resume checks the run folder's spec as submission does ------------------------------------------

EDITS = {
    "an #SBATCH line": (
        "  partition: null\n",
        '  partition: "gpu\\n#SBATCH --wrap=id"\n',
        "resources.partition: contains a control character ('\\n')",
    ),
    "a bad time": ("  time: 00:30:00\n", "  time: abc\n", "resources.time: not a Slurm time"),
    "an owned option abbreviated": (
        "  sbatch_extra: {}\n",
        "  sbatch_extra: {outp: /tmp/x}\n",
        "resources.sbatch_extra.outp: 'outp' abbreviates --output",
    ),
    "an image that is a flag": (
        "  image: null\n",
        "  image: --privileged\n",
        "container.image: must not start with '-'",
    ),
}


@pytest.mark.parametrize("edit", EDITS)
def test_resume_of_an_edited_spec_is_one_line_and_queues_nothing(make_run, capsys, edit):
    old, new, message = EDITS[edit]
    run = local_run(make_run, attempt=0)
    text = run.spec_file.read_text()
    assert old in text
    run.spec_file.write_text(text.replace(old, new))
    assert main(["resume", str(run.path), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmbatch: error: {run.spec_file}: {message}") and err.count("\n") == 1, err
    assert not run.submitit_dir.exists() and not run.space_reserve.exists()


def test_resume_refuses_a_bind_over_the_run_folder(make_run, capsys):
    run = local_run(make_run, attempt=0)
    text = (
        run.spec_file.read_text()
        .replace("  runtime: none\n", "  runtime: docker\n")
        .replace("  image: null\n", "  image: img\n")
        .replace("  binds: []\n", f"  binds: ['/tmp:{run.path}']\n")
    )
    run.spec_file.write_text(text)
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"llmbatch: error: container.binds[0]: '/tmp:{run.path}': its destination")
        and err.count("\n") == 1
    ), err
    assert not run.submitit_dir.exists()


# --- a failed run gives its space reserve back -------------------------------------------------------


def test_a_failed_run_leaves_no_space_reserve(make_run, monkeypatch):
    from llmbatch import slurm
    from llmbatch.jobstep import make_plan
    from llmbatch.spec import load_resolved

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    run = local_run(make_run)
    spec = load_resolved(run.spec_file)
    run.reserve_space()  # as submission does
    plan = dataclasses.replace(make_plan(spec, run.path), runner="crashing_runner", python=sys.executable)
    job = slurm.submit(slurm.make_executor("local", spec, run), plan)
    with pytest.raises(Exception, match="failed|crashed"):
        job.results()
    assert not run.space_reserve.exists()
    assert run.read_state()["ended"] == {"job_id": job.job_id, "state": "FAILED"}


# --- a damaged state file -------------------------------------------------------------------------


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


# --- damaged side files: status, gather and list give one line ------------------------------------
# Run folders are built by the code that writes them (ShardWriter, the rank's stats, the merge, the
# state updates), then one side file is damaged as a full disk, a hand edit or a colleague might.


def finished_infer_run(make_run, tmp_path):
    """An inference run of two inputs whose one rank finished: a shard, its stats, the state."""
    from dataclasses import asdict

    from llmbatch.data import load_inputs
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
        result_record(Prompt(e, [1, 2, 3]), Completion(" even", 2, "eos"), "exact")
        for e in load_inputs(load_resolved(run.spec_file).data)
    ]
    stats.add_records(records)
    shard = shard_for(run, 0, 0)
    with ShardWriter(shard) as writer:
        writer.append(records)
    write_stats(shard, asdict(stats))
    return run


def stats_file(run):
    from llmbatch.shards import list_shards

    return list_shards(run)[0].stats_path


def rename_key(path, old, new):
    """A JSON object file as a run written before a key's rename has it: `new` back under its `old` name."""
    obj = json.loads(path.read_text())
    path.write_text(json.dumps({old if key == new else key: value for key, value in obj.items()}))


# --- run folders written before a key was renamed still read (issue 21: one word per concept) ------


def test_a_rank_that_finished_before_output_tokens_was_named_so_still_gathers(make_run, tmp_path, capsys):
    run = finished_infer_run(make_run, tmp_path)
    rename_key(stats_file(run), "generated_tokens", "output_tokens")
    assert main(["gather", str(run.path)]) == 0, capsys.readouterr().err
    assert json.loads(run.metrics_file.read_text())["tokens_per_s"] == 4 / 1.5  # 2 results of 2 tokens in 1.5 s


def test_metrics_written_before_output_tokens_was_named_so_still_summarize(make_run, tmp_path):
    from llmbatch.summary import summarize

    run = finished_infer_run(make_run, tmp_path)
    atomic_write_json(run.metrics_file, {"generated_tokens": 4, "tokens_per_s": 2.5})
    lines = summarize(run).splitlines()
    assert any(line.split() == ["output", "tokens", "4"] for line in lines), lines


def test_a_rank_that_finished_before_inputs_were_named_so_still_gathers(make_run, tmp_path, capsys):
    run = finished_infer_run(make_run, tmp_path)
    rename_key(stats_file(run), "examples", "inputs")
    assert main(["gather", str(run.path)]) == 0, capsys.readouterr().err
    assert json.loads(run.metrics_file.read_text())["inputs_per_s"] == 2 / 1.5


def test_metrics_written_before_inputs_were_named_so_still_summarize(make_run, tmp_path):
    from llmbatch.summary import summarize

    run = finished_infer_run(make_run, tmp_path)
    atomic_write_json(run.metrics_file, {"examples": 2, "examples_per_s": 1.5})
    lines = summarize(run).splitlines()
    assert any(line.split() == ["inputs", "2"] for line in lines), lines


def test_a_run_folder_written_when_max_inputs_was_max_samples_still_resumes(make_run):
    """Its spec.yaml, state.json's inputs fingerprint and checkpoint manifests say data.max_samples."""
    from llmbatch.checkpoints import check_resumable, write_manifest
    from llmbatch.fingerprint import changed_input, spec_fingerprint
    from llmbatch.spec import load_resolved

    run = make_run("finetune", overrides=["data.max_inputs=8"])
    fingerprint = spec_fingerprint(load_resolved(run.spec_file))
    old = {("data.max_samples" if key == "data.max_inputs" else key): value for key, value in fingerprint.items()}
    run.spec_file.write_text(run.spec_file.read_text().replace("  max_inputs: 8\n", "  max_samples: 8\n"))
    spec = load_resolved(run.spec_file)
    assert spec.data.max_inputs == 8
    assert changed_input(old, spec) is None
    folder = run.checkpoints_dir / "step-000004"
    folder.mkdir(parents=True)
    (folder / "optimizer.bin").write_bytes(b"x" * 12)
    write_manifest(folder, old)
    check_resumable(run.checkpoints_dir, spec)  # raises CheckpointMismatch if the old key reads as another


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
    assert json.loads(run.metrics_file.read_text())["inputs"] == 2


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
    from llmbatch.checkpoints import MANIFEST_FILE, CheckpointMismatch, check_resumable, damage, write_manifest
    from llmbatch.fingerprint import spec_fingerprint
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
