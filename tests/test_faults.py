"""Faults a cluster really has, end to end: two `resume`s of one run at once, a full output file
system, a rank that stops, Ctrl-C, a closed pipe (local processes, no Slurm), and a node lost mid-run
on the real local Slurm cluster. What the user sees, and that nothing is lost or duplicated.

The lost node (slurm/start-cluster.sh, SlurmdTimeout=10): node n2 stops answering: its slurmd, the
job's step daemon and processes there are frozen (SIGSTOP), as on a node that hangs or loses its
network. Slurm marks it DOWN and the job ends NODE_FAIL; being requeueable, it is requeued and waits
for two nodes. Then n2 reboots: the frozen processes are killed and its slurmd starts again; the
requeued job runs as the next attempt and finishes the run.

A damaged run folder: test_run_folder.py; a damaged checkpoint: test_finetune.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from llmbatch.rundir import RunDir, read_jsonl
from llmbatch.shards import read_records

from helpers import PYTHON, REPO, SMALL, run_folder, submit_cli, trajectory, wait_for


def stopped_local_run(make_run, overrides=SMALL):
    """A run whose local job ended before writing anything (its pid is gone): `resume` restarts it."""
    run = make_run("infer", overrides=list(overrides))
    run.update_state(kind="infer", executor="local", job_ids=["1"], inputs=40)
    return run


@pytest.mark.slow
def test_two_resumes_at_once_one_wins_the_other_gets_one_line(make_run):
    run = stopped_local_run(make_run)
    first = subprocess.Popen(
        [PYTHON, str(REPO / "submit.py"), "resume", str(run.path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The first has submitted its job and waits for it, holding the run's lock.
        wait_for(
            "the first resume's job",
            lambda: len(run.read_state().get("job_ids", [])) == 2 or first.poll() is not None,
            timeout=120,
        )
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


# --- a full file system ----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs as the output root: shared storage that the test fills up (mounting needs root)."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "llmbatch-test", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path) -> Path:
    """A file that takes all the free space of `folder`'s file system (it is deleted to free it)."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\xff" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return ballast


INFER_MANY_BATCHES = [
    "--set",
    "data.max_inputs=120",
    "--set",
    "generation.max_new_tokens=16",
    "--set",
    "generation.engine=hf",
    "--set",
    "generation.batch_tokens=160",
]


@pytest.fixture(scope="module")
def infer_reference(tmp_path_factory, cache_dir) -> RunDir:
    """An uninterrupted run of INFER_MANY_BATCHES on one process."""
    return run_folder(
        submit_cli("infer", "--executor", "local", "--output", str(tmp_path_factory.mktemp("ref")), *INFER_MANY_BATCHES)
    )


@pytest.mark.slow
def test_inference_on_a_full_disk_fails_in_one_line_and_resume_completes_it(small_fs, infer_reference):
    reference = infer_reference
    proc = subprocess.Popen(
        [
            PYTHON,
            str(REPO / "submit.py"),
            "infer",
            "--executor",
            "local",
            "--output",
            str(small_fs),
            *INFER_MANY_BATCHES,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    shard = wait_for(
        "the first results in a shard",
        lambda: next(
            (p for p in small_fs.glob("*/shards/attempt-000-rank-00000.jsonl") if p.read_bytes().count(b"\n")), None
        ),
    )
    run = RunDir(shard.parent.parent)
    ballast = fill(small_fs)
    out, err = proc.communicate(timeout=300)

    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    failed = err.splitlines()[-1]
    assert failed.startswith("job failed: node 0: ") and failed.endswith(
        f": no space left on device; free space there, then: python submit.py resume {run.path}"
    ), err[-3000:]
    assert str(run.path) in failed.split(": no space left")[0]
    assert not run.results_file.exists() and not run.metrics_file.exists()
    done = read_records(shard)  # a torn last line is no record; every complete one is
    assert 0 < len(done) < 120

    ballast.unlink()
    submit_cli("resume", str(run.path))
    assert run.results_file.read_bytes() == reference.results_file.read_bytes()


FINETUNE_SMALL = [
    arg
    for setting in (
        "data.max_inputs=60",
        "train.max_steps=12",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
        "train.warmup_steps=2",
        "train.eval_every_steps=100",
        "train.save_every_steps=4",
        "train.keep_last=2",
        "train.eval_accuracy=false",
        "lora.dropout=0.1",
    )
    for arg in ("--set", setting)
]


@pytest.mark.slow
def test_a_checkpoint_save_on_a_full_disk_fails_in_one_line_and_resume_continues_exactly(small_fs, tmp_path, cache_dir):
    reference = run_folder(
        submit_cli("finetune", "--executor", "local", "--output", str(tmp_path / "ref"), *FINETUNE_SMALL)
    )
    proc = subprocess.Popen(
        [
            PYTHON,
            str(REPO / "submit.py"),
            "finetune",
            "--executor",
            "local",
            "--output",
            str(small_fs),
            *FINETUNE_SMALL,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = wait_for(
        "the first checkpoint", lambda: next(small_fs.glob("*/checkpoints/step-000004/manifest.json"), None)
    )
    run = RunDir(first.parent.parent.parent)
    ballast = fill(small_fs)
    # Room for the steps' log lines, not for the next checkpoint (about 1.8 MB).
    os.truncate(ballast, ballast.stat().st_size - (1 << 20))
    out, err = proc.communicate(timeout=300)

    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    failed = err.splitlines()[-1]
    assert failed.startswith("job failed: node 0: ") and failed.endswith(
        f": no space left on device; free space there, then: python submit.py resume {run.path}"
    ), err[-3000:]
    assert sorted(p.name for p in run.checkpoints_dir.glob("step-*")) == ["step-000004"]
    assert not run.adapter_dir.exists() and not run.metrics_file.exists()

    ballast.unlink()
    resumed = submit_cli("resume", str(run.path))
    assert "resuming at step 4" in resumed.stdout
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        reference.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    assert trajectory(run) == trajectory(reference)


# --- a rank that stops -----------------------------------------------------------------------------


def rank_process(run: RunDir, rank: int) -> psutil.Process:
    """The process of one rank of the run (the launcher passes the rank in RANK)."""

    def find():
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if (
                    str(run.path) in (proc.info["cmdline"] or [])
                    and "llmbatch.runners.infer" in proc.info["cmdline"]
                    and proc.environ().get("RANK") == str(rank)
                ):
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return None

    return wait_for(f"rank {rank}", find, timeout=60)


@pytest.mark.slow
def test_a_stopped_rank_fails_the_job_in_one_line_naming_it_and_resume_finishes(tmp_path, infer_reference):
    root = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            PYTHON,
            str(REPO / "submit.py"),
            "infer",
            "--executor",
            "local",
            "--gpus",
            "2",
            "--output",
            str(root),
            "--set",
            "resources.collective_timeout_s=5",
            *INFER_MANY_BATCHES,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    shard = wait_for(
        "rank 1's first results",
        lambda: next(
            (p for p in root.glob("*/shards/attempt-000-rank-00001.jsonl") if p.read_bytes().count(b"\n")), None
        ),
    )
    run = RunDir(shard.parent.parent)
    rank1 = rank_process(run, 1)
    rank1.suspend()  # SIGSTOP: alive, silent, holding its peers and the allocation
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=300)
    took = time.monotonic() - stopped

    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    assert err.splitlines()[-1].startswith(
        f"job failed: node 0: rank 1 on {socket.gethostname()} (pid {rank1.pid}) sent no heartbeat for "
    )
    assert err.splitlines()[-1].endswith(
        f" s (resources.collective_timeout_s=5): stopped or hung; killed it; finish the run with: python submit.py "
        f"resume {run.path}"
    )
    assert took < 60, f"the job took {took:.0f} s to notice"
    assert not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE

    submit_cli("resume", str(run.path))
    assert run.results_file.read_bytes() == infer_reference.results_file.read_bytes()


# --- Ctrl-C and a closed pipe ----------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_of_a_local_run_is_one_line_and_resume_shows_only_its_own_attempt(tmp_path, infer_reference):
    """A terminal sends Ctrl-C to the whole process group: the command line, and the local job it
    started. One line, exit 130, the job cancelled; the resume then prints its own attempt's log, not
    the interrupted one's."""
    root = tmp_path / "runs"
    proc = subprocess.Popen(
        [PYTHON, str(REPO / "submit.py"), "infer", "--executor", "local", "--output", str(root), *INFER_MANY_BATCHES],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # a process group of its own, as a terminal's job
    shard = wait_for(
        "the first results in a shard",
        lambda: next(
            (p for p in root.glob("*/shards/attempt-000-rank-00000.jsonl") if p.read_bytes().count(b"\n")), None
        ),
    )
    run = RunDir(shard.parent.parent)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert err == f"llmbatch: interrupted; cancelled the job; resume with: python submit.py resume {run.path}\n"
    assert not run.results_file.exists()
    assert "Traceback" not in submit_cli("status", str(run.path)).stdout

    resumed = submit_cli("resume", str(run.path))
    assert "Traceback" not in resumed.stdout + resumed.stderr and "KeyboardInterrupt" not in resumed.stdout
    assert "== attempt 0 " not in resumed.stdout and "== attempt 1 " in resumed.stdout
    assert run.results_file.read_bytes() == infer_reference.results_file.read_bytes()


@pytest.mark.slow
def test_a_closed_pipe_is_no_job_failure(tmp_path, infer_reference):
    """`python submit.py infer ... | head -c1`: the reader goes away after one byte. The job runs on and
    its result stands; the command line waits for it, says nothing and exits as the job did (0)."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [
            PYTHON,
            str(REPO / "submit.py"),
            "infer",
            "--executor",
            "local",
            "--output",
            str(tmp_path / "runs"),
            *INFER_MANY_BATCHES,
        ],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    assert os.read(read_end, 1) == b"r"  # "run folder: ..."
    os.close(read_end)
    err = proc.communicate(timeout=300)[1]

    assert proc.returncode == 0 and err == "", err[-3000:]
    [run] = [RunDir(p) for p in (tmp_path / "runs").iterdir()]
    assert run.results_file.read_bytes() == infer_reference.results_file.read_bytes()
    assert " COMPLETED  120/120 inputs " in submit_cli("status", str(run.path)).stdout


# --- a node lost mid-run, on the local Slurm cluster ----------------------------------------------


INFER = [
    "--set",
    "data.max_inputs=120",
    "--set",
    "generation.max_new_tokens=16",
    "--set",
    "generation.engine=hf",
    "--set",
    "generation.batch_tokens=160",
]
FINETUNE = [
    arg
    for setting in (
        "data.max_inputs=60",
        "train.max_steps=16",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        "train.eval_every_steps=100",
        "train.save_every_steps=4",
        "train.keep_last=2",
        "train.eval_accuracy=false",
    )
    for arg in ("--set", setting)
]


def sacct_records(job_id: str) -> list[tuple[str, str]]:
    """(state, nodes) of every run of the job, a requeued job's earlier runs included."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "--format=State,NodeList"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line]


def node_processes(node: str, job_id: str) -> list[psutil.Process]:
    """What runs on `node` of this cluster: its slurmd, and the job's step daemon and processes there."""
    conf = os.environ["SLURM_CONF"]
    slurmd = int((Path(conf).parent.parent / "run" / f"slurmd-{node}.pid").read_text().split()[0])
    found = {slurmd: psutil.Process(slurmd)}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SLURM_CONF") == conf and env.get("SLURMD_NODENAME") == node and env.get("SLURM_JOB_ID") == job_id:
            found[proc.pid] = proc
            parent = proc.parent()
            if parent is not None and parent.name().startswith("slurmstepd"):
                found[parent.pid] = parent
    return list(found.values())


def lose_node_and_bring_it_back(run: RunDir, node: str, job_id: str) -> None:
    frozen = node_processes(node, job_id)
    assert len(frozen) >= 3, frozen  # slurmd, step daemon, node job (and its launcher and rank)
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    wait_for("NODE_FAIL", lambda: any(state == "NODE_FAIL" for state, _ in sacct_records(job_id)), timeout=120)
    status = submit_cli("status", str(run.path)).stdout
    assert "NODE_FAIL on n[1-2]" in status, status
    assert f"{node} is down" in status, status
    for proc in frozen:  # the node reboots
        proc.send_signal(signal.SIGKILL)
    started = subprocess.run(
        ["bash", str(REPO / "slurm" / "start-cluster.sh")], capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, started.stderr[-3000:]


def finished(run: RunDir, job_id: str, done_file: Path) -> bool:
    records = sacct_records(job_id)
    assert not records or records[-1][0] not in ("FAILED", "CANCELLED", "TIMEOUT"), records
    return done_file.exists() and records[-1][0] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_inference_survives_a_lost_node(slurm_cluster, cache_dir, tmp_path):
    reference = run_folder(submit_cli("infer", "--executor", "local", "--output", str(tmp_path / "ref"), *INFER))
    run = run_folder(
        submit_cli(
            "infer", "--executor", "slurm", "--nodes", "2", "--gpus", "1", "--output", str(tmp_path / "runs"), *INFER
        )
    )
    job_id = run.read_state()["job_ids"][-1]
    wait_for(
        "results of the rank on n2",
        lambda: any(read_records(p) for p in run.shards_dir.glob("attempt-000-rank-00001.jsonl")),
        timeout=300,
    )
    lose_node_and_bring_it_back(run, "n2", job_id)

    wait_for("the requeued job", lambda: finished(run, job_id, run.results_file), timeout=400)
    assert run.results_file.read_bytes() == reference.results_file.read_bytes()
    assert run.read_state()["attempt"] == 1  # requeued by Slurm, not resumed by hand
    assert [state for state, _ in sacct_records(job_id)] == ["NODE_FAIL", "COMPLETED"]


@pytest.mark.slurm
@pytest.mark.slow
def test_finetuning_survives_a_lost_node_on_the_exact_trajectory(slurm_cluster, cache_dir, tmp_path):
    reference = run_folder(
        submit_cli("finetune", "--executor", "local", "--gpus", "2", "--output", str(tmp_path / "ref"), *FINETUNE)
    )
    run = run_folder(
        submit_cli(
            "finetune",
            "--executor",
            "slurm",
            "--nodes",
            "2",
            "--gpus",
            "1",
            "--output",
            str(tmp_path / "runs"),
            *FINETUNE,
        )
    )
    job_id = run.read_state()["job_ids"][-1]
    wait_for(
        "a step past the first checkpoint",
        lambda: any(row.get("step", 0) >= 5 for row in read_jsonl(run.train_metrics_file)),
        timeout=300,
    )
    lose_node_and_bring_it_back(run, "n2", job_id)

    wait_for("the requeued job", lambda: finished(run, job_id, run.metrics_file), timeout=400)
    assert [state for state, _ in sacct_records(job_id)] == ["NODE_FAIL", "COMPLETED"]
    assert run.read_state()["attempt"] == 1  # requeued by Slurm, not resumed by hand
    assert "resuming at step " in run.node_log(0).read_text()
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        reference.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "epoch")
    assert [tuple(r.get(k) for k in keys) for r in read_jsonl(run.train_metrics_file)] == [
        tuple(r.get(k) for k in keys) for r in read_jsonl(reference.train_metrics_file)
    ]
    assert json.loads(run.metrics_file.read_text())["world_size"] == 2
