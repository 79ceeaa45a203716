"""Faults a cluster really has, end to end on this machine, where Slurm plays no part: two `resume`s of
one run at once, and a full output file system. What the user sees, and that nothing is lost or
duplicated. (A damaged checkpoint: test_finetune.py.)"""

from __future__ import annotations

import subprocess

import pytest

from helpers import PYTHON, REPO, submit_cli, wait_for

pytestmark = pytest.mark.slow

SMALL = ["data.max_samples=40", "generation.max_new_tokens=8"]


def stopped_local_run(make_run, overrides=SMALL):
    """A run whose local job ended before writing anything (its pid is gone): `resume` restarts it."""
    run = make_run("infer", overrides=list(overrides))
    run.update_state(kind="infer", executor="local", job_ids=["1"], inputs=40)
    return run


def test_two_resumes_at_once_one_wins_the_other_gets_one_line(make_run):
    run = stopped_local_run(make_run)
    first = subprocess.Popen([PYTHON, str(REPO / "submit.py"), "resume", str(run.path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        # The first has submitted its job and waits for it, holding the run's lock.
        wait_for("the first resume's job", lambda: len(run.read_state().get("job_ids", [])) == 2
                 or first.poll() is not None, timeout=120)
        assert first.poll() is None, first.communicate()
        second = submit_cli("resume", str(run.path), check=False)
        assert second.returncode == 2
        assert second.stderr == f"llmbatch: error: {run.path}: another resume of this run is under way\n"
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert len(run.results_file.read_text().splitlines()) == 40
    assert len(run.read_state()["job_ids"]) == 2  # the second submitted nothing
