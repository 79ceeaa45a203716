"""A run folder is shared storage that others may write: what they plant there is never written through,
never executed, and an edited spec is checked as at submission before anything is queued again."""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys

import pytest

from llmbatch.cli import main
from llmbatch.rundir import UnsafeRunFile, append_jsonl, atomic_write_json, open_append, save_folder

from helpers import REPO, local_run

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
