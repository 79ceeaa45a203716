"""Containers (llmbatch.container): the container keys checked before queueing, the exact argv for
each runtime, binds and env, dry runs in Apptainer, real runs under a private Docker engine, and a
whole inference job step under Docker and under rootful Podman (Debian's 4.3, a private store).

Apptainer has no Debian package, nothing on PyPI ships it, and building it needs Go modules these
machines cannot reach: its argv is checked exactly, and the same entrypoint runs for real under
Docker and Podman. Rootless Podman (`--userns keep-id`) is checked as argv only: the tests run as root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from llmbatch.cli import main
from llmbatch.container import Bind, ContainerCommand, check_run_folder_binds, merge_binds, parse_bind, wrap_command
from llmbatch.spec import ContainerSpec, SpecError

from helpers import JOBS, dry_run, flag, run_cli, run_folder, set_key, submit_local

ARGV = ["python3", "-m", "accelerate.commands.launch", "-m", "llmbatch.runners.infer", "--run-dir", "/runs/r1"]
BINDS = ["/runs/r1", "/data", "/models/m"]
ENV = {"PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true"}


@pytest.fixture
def uid_1000(monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "getgid", lambda: 100)


def wrap(runtime: str, use_cuda: bool = False, **spec) -> ContainerCommand:
    image = "/images/llmbatch.sif" if runtime == "apptainer" else "llmbatch:latest"
    container = ContainerSpec(runtime=runtime, image=image, **spec)
    return wrap_command(ARGV, container, binds=BINDS, env=ENV, use_cuda=use_cuda, workdir="/runs/r1", name="llmbatch-t")


# --- argv, exactly ---------------------------------------------------------------------------------


def test_none_leaves_argv_alone_and_adds_the_specs_env():
    # container.env applies with no container too (it was once dropped silently); pass_env's variables
    # are in the job's environment already.
    cmd = wrap_command(
        ARGV, ContainerSpec(env={"X": "1"}, pass_env=["HOME"]), binds=BINDS, env=ENV, use_cuda=True, workdir="/runs/r1"
    )
    assert cmd.argv == ARGV and cmd.argv is not ARGV
    assert cmd.env == {**ENV, "X": "1"}


@pytest.mark.parametrize("use_cuda", [False, True])
def test_apptainer_argv(use_cuda):
    """Apptainer is not packaged for these machines (no Debian package, nothing on PyPI, and its build
    needs Go modules they cannot reach), so its argv is checked exactly and never run here."""
    cmd = wrap("apptainer", use_cuda=use_cuda, env={"NCCL_DEBUG": "INFO"}, extra_args=["--writable-tmpfs"])
    assert cmd.argv == [
        "apptainer",
        "exec",
        *(["--nv"] if use_cuda else []),
        "--cleanenv",
        "--bind",
        "/data:/data,/models/m:/models/m,/runs/r1:/runs/r1",
        "--pwd",
        "/runs/r1",
        "--writable-tmpfs",
        "/images/llmbatch.sif",
        *ARGV,
    ]
    assert cmd.env == {
        "APPTAINERENV_PYTHONUNBUFFERED": "1",
        "APPTAINERENV_ACCELERATE_USE_CPU": "true",
        "APPTAINERENV_NCCL_DEBUG": "INFO",
    }


@pytest.mark.parametrize("use_cuda", [False, True])
def test_docker_argv(use_cuda, uid_1000):
    cmd = wrap("docker", use_cuda=use_cuda, shm_size="8g", env={"NCCL_DEBUG": "INFO"}, extra_args=["--pull", "never"])
    assert cmd.argv == [
        "docker",
        "run",
        "--rm",
        "--init",
        "--name",
        "llmbatch-t",
        *(["--gpus", "all"] if use_cuda else []),
        "--network",
        "host",
        "--shm-size",
        "8g",
        "--user",
        "1000:100",
        "-v",
        "/data:/data",
        "-v",
        "/models/m:/models/m",
        "-v",
        "/runs/r1:/runs/r1",
        "-e",
        "PYTHONUNBUFFERED",
        "-e",
        "ACCELERATE_USE_CPU",
        "-e",
        "NCCL_DEBUG",
        "-e",
        "TINI_KILL_PROCESS_GROUP",
        "-w",
        "/runs/r1",
        "--pull",
        "never",
        "llmbatch:latest",
        *ARGV,
    ]
    assert cmd.env == {**ENV, "NCCL_DEBUG": "INFO", "TINI_KILL_PROCESS_GROUP": "1"}
    assert cmd.name == "llmbatch-t"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


@pytest.mark.parametrize("use_cuda", [False, True])
def test_podman_argv_rootless(use_cuda, uid_1000, umask_027):
    cmd = wrap("podman", use_cuda=use_cuda)
    assert cmd.argv == [
        "podman",
        "run",
        "--rm",
        "--init",
        "--name",
        "llmbatch-t",
        *(["--device", "nvidia.com/gpu=all"] if use_cuda else []),
        "--network",
        "host",
        "--shm-size",
        "16g",
        "--userns",
        "keep-id",
        "--security-opt",
        "label=disable",
        "--umask",
        "0027",
        "-v",
        "/data:/data",
        "-v",
        "/models/m:/models/m",
        "-v",
        "/runs/r1:/runs/r1",
        "-e",
        "PYTHONUNBUFFERED",
        "-e",
        "ACCELERATE_USE_CPU",
        "-w",
        "/runs/r1",
        "llmbatch:latest",
        *ARGV,
    ]
    assert cmd.env == ENV


def test_podman_as_root_uses_user(monkeypatch):
    # keep-id is refused by rootful Podman ("keep-id is only supported in rootless mode").
    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(os, "getgid", lambda: 0)
    argv = wrap("podman").argv
    assert "--userns" not in argv
    assert argv[argv.index("--user") + 1] == "0:0"
    assert argv[argv.index("--security-opt") + 1] == "label=disable"


def test_default_name_is_unique():
    container = ContainerSpec(runtime="docker", image="img")
    names = {wrap_command(ARGV, container, binds=[], env={}, use_cuda=False, workdir="/").name for _ in range(5)}
    assert len(names) == 5 and all(n.startswith("llmbatch-") for n in names)


# --- environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["apptainer", "docker", "podman"])
def test_env_values_never_on_argv(runtime, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    cmd = wrap(runtime, env={"WANDB_API_KEY": "wandb_secret_value"}, pass_env=["HF_TOKEN"])
    joined = "\n".join(cmd.argv)
    for value in ("hf_secret_token_value", "wandb_secret_value", "true"):
        assert value not in joined
    prefix = "APPTAINERENV_" if runtime == "apptainer" else ""
    assert cmd.env[f"{prefix}HF_TOKEN"] == "hf_secret_token_value"
    assert cmd.env[f"{prefix}WANDB_API_KEY"] == "wandb_secret_value"


@pytest.mark.parametrize("runtime", ["apptainer", "docker"])
def test_pass_env_reads_now_and_skips_missing(runtime, monkeypatch):
    monkeypatch.setenv("PRESENT", "here")
    monkeypatch.delenv("ABSENT", raising=False)
    cmd = wrap(runtime, pass_env=["PRESENT", "ABSENT"])
    prefix = "APPTAINERENV_" if runtime == "apptainer" else ""
    assert cmd.env[f"{prefix}PRESENT"] == "here"
    assert f"{prefix}ABSENT" not in cmd.env
    assert "ABSENT" not in cmd.argv
    if runtime == "docker":
        assert cmd.argv[cmd.argv.index("PRESENT") - 1] == "-e"


def test_env_precedence_launcher_then_spec_then_pass_env(monkeypatch):
    monkeypatch.setenv("B", "from-environment")
    cmd = wrap("docker", env={"A": "spec", "B": "spec"}, pass_env=["B"])
    assert cmd.env["PYTHONUNBUFFERED"] == "1"
    assert cmd.env["A"] == "spec" and cmd.env["B"] == "from-environment"


def test_env_rejects_bad_names_and_client_variables(monkeypatch):
    with pytest.raises(ValueError, match="not valid environment variable names"):
        wrap("docker", env={"A=B": "1"})
    # Docker would read PATH from its own environment: the client itself would run with it.
    with pytest.raises(ValueError, match="PATH"):
        wrap("docker", env={"PATH": "/opt/conda/bin:/usr/bin"})
    monkeypatch.setenv("HOME", "/home/me")
    assert "HOME" in wrap("docker", pass_env=["HOME"]).env  # same value as the client's: harmless
    assert wrap("apptainer", env={"PATH": "/opt/x/bin"}).env["APPTAINERENV_PATH"] == "/opt/x/bin"


# --- binds ---------------------------------------------------------------------------------------


def test_parse_bind_forms():
    assert parse_bind("/a") == Bind("/a", "/a")
    assert parse_bind("/a:/b") == Bind("/a", "/b")
    assert parse_bind("/a:/b:ro") == Bind("/a", "/b", ro=True)
    assert parse_bind("/a:ro") == Bind("/a", "/a", ro=True)
    assert parse_bind("/a/b/../c/") == Bind("/a/c", "/a/c")
    for bad in ("a", "/a:b", "/a:/b:rx", "/a:/b:ro:x"):
        with pytest.raises(ValueError):
            parse_bind(bad)


def test_binds_dedupe_and_covered_by_parent():
    binds = merge_binds(
        ["/runs/r1", "/shared/data", "/shared/data/train", "/runs/r1", "/cache"],
        ["/shared", "/models:/models:ro", "/models/m1:ro", "/cache/hf:/hf"],
    )
    # Shallowest destination first, then by name; /shared/data*, /models/m1 and the 2nd /runs/r1 are gone.
    assert binds == [
        Bind("/cache", "/cache"),
        Bind("/cache/hf", "/hf"),
        Bind("/models", "/models", ro=True),
        Bind("/shared", "/shared"),
        Bind("/runs/r1", "/runs/r1"),
    ]


def test_binds_ro_parent_does_not_cover_rw_child():
    assert merge_binds(["/data/out"], ["/data:ro"]) == [Bind("/data", "/data", ro=True), Bind("/data/out", "/data/out")]
    assert merge_binds(["/data"], ["/data:ro"]) == [Bind("/data", "/data")]


def test_binds_parent_elsewhere_does_not_cover():
    # /x is bound at /y: /x/z is visible at /y/z, not at /x/z.
    assert merge_binds(["/x/z"], ["/x:/y"]) == [Bind("/x", "/y"), Bind("/x/z", "/x/z")]


def test_binds_errors():
    with pytest.raises(ValueError, match="absolute"):
        merge_binds(["runs/r1"], [])
    with pytest.raises(ValueError, match="two folders bound at /d"):
        merge_binds(["/d"], ["/e:/d"])
    with pytest.raises(ValueError, match="','"):
        wrap_command(
            ARGV, ContainerSpec(runtime="apptainer", image="x.sif"), binds=["/a,b"], env={}, use_cuda=False, workdir="/"
        )


@pytest.mark.parametrize("bind", ["/tmp/x:/", "/tmp/x:/runs", "/tmp/x:/runs/r1", "/tmp/x:/runs/r1/shards:ro", "/:/"])
def test_a_bind_over_the_run_folder_or_a_parent_is_refused(bind):
    """The ranks would write the run's results elsewhere, or the image would be hidden (/)."""
    with pytest.raises(SpecError, match=r"^container.binds\[1\]: .*its destination .* covers the run folder /runs/r1"):
        check_run_folder_binds(["/data:/data", bind], "/runs/r1")


@pytest.mark.parametrize(
    "bind", ["/runs", "/runs:ro", "/runs/r1/adapter:/runs/r1/adapter:ro", "/tmp/x:/runs2", "/tmp/x:/data"]
)
def test_a_bind_beside_the_run_folder_or_at_its_own_path_is_kept(bind):
    check_run_folder_binds([bind], "/runs/r1")


# --- real runs under Docker ----------------------------------------------------------------------


def in_docker(docker_env, tmp_path: Path, script: str, launcher_env=None, python=None, **spec) -> ContainerCommand:
    """Run `script` with the host venv's python (bound in) inside the test image, workdir tmp_path/work."""
    (tmp_path / "work").mkdir(exist_ok=True)
    container = ContainerSpec(runtime="docker", image=docker_env.image, **spec)
    return wrap_command(
        [python or docker_env.python, "-c", textwrap.dedent(script)],
        container,
        binds=[*docker_env.binds, str(tmp_path)],
        env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": docker_env.pythonpath, **(launcher_env or {})},
        use_cuda=False,
        workdir=str(tmp_path / "work"),
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited early with {proc.returncode}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


@pytest.mark.container
@pytest.mark.slow
def test_docker_runs_host_python(docker_env, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_TEST_SECRET", "s3cret-by-name-only")
    out_file = tmp_path / "out.json"
    cmd = in_docker(
        docker_env,
        tmp_path,
        f"""
        import json, os, sys
        import llmbatch.container  # llmbatch's bound source folder is importable
        st = os.statvfs("/dev/shm")
        out = {{"cwd": os.getcwd(), "secret": os.environ.get("LLMBATCH_TEST_SECRET"),
               "launcher": os.environ.get("FROM_LAUNCHER"), "spec": os.environ.get("FROM_SPEC"),
               "shm": st.f_blocks * st.f_frsize, "prefix": sys.prefix}}
        with open({str(out_file)!r}, "w") as f:
            json.dump(out, f)
        sys.exit(3)
    """,
        launcher_env={"FROM_LAUNCHER": "yes"},
        env={"FROM_SPEC": "spec"},
        pass_env=["LLMBATCH_TEST_SECRET"],
        shm_size="256m",
    )
    assert not any("s3cret" in a for a in cmd.argv)

    proc = subprocess.run(cmd.argv, env=os.environ | cmd.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # the exit status comes back through `docker run`
    out = json.loads(out_file.read_text())  # written inside, read here
    assert out["cwd"] == str(tmp_path / "work")
    assert (out["secret"], out["launcher"], out["spec"]) == ("s3cret-by-name-only", "yes", "spec")
    assert out["prefix"] == docker_env.binds[0]  # the bound venv, not the image's python
    assert out["shm"] == 256 * 2**20  # --shm-size took effect
    assert (out_file.stat().st_uid, out_file.stat().st_gid) == (os.getuid(), os.getgid())
    # --rm: nothing is left under that name.
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"name=^{cmd.name}$"], capture_output=True, text=True, check=True
    )
    assert left.stdout.strip() == ""


@pytest.mark.container
@pytest.mark.slow
def test_docker_files_belong_to_the_caller(docker_env, tmp_path, monkeypatch):
    # As root here, the calling uid is 0 anyway: pretend to be 4321:4322 to see --user act.
    monkeypatch.setattr(os, "getuid", lambda: 4321)
    monkeypatch.setattr(os, "getgid", lambda: 4322)
    tmp_path.chmod(0o755)  # bound as is: uid 4321 must get through it
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    # The image's own python3: uid 4321 could not read the venv under /root.
    cmd = in_docker(docker_env, tmp_path, f"open({str(shared / 'f')!r}, 'w').write('x')", python="python3")
    proc = subprocess.run(cmd.argv, env=os.environ | cmd.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    st = (shared / "f").stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)


def _ignore_usr2():  # what launch.py does before exec'ing the command
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_docker_signal_reaches_the_process_inside(docker_env, tmp_path, sig):
    """The launcher sends SIGTERM/SIGUSR2 to the `docker run` client's process group (its own session,
    SIGUSR2 ignored, as launch.py starts it); the process inside must get it and its exit status return.
    A child in the process's group must get it too (tini -g), as the launcher's killpg does without Docker."""
    ready, marker, child_marker = tmp_path / "ready", tmp_path / "marker", tmp_path / "child-marker"
    cmd = in_docker(
        docker_env,
        tmp_path,
        f"""
        import os, signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", '''
        import signal, sys, time
        def on(signum, frame):
            open({str(child_marker)!r}, "w").write(str(signum)); sys.exit(0)
        signal.signal({int(sig)}, on)
        open({str(ready)!r} + ".child", "w").close()
        time.sleep(120)
        '''])
        def on(signum, frame):
            child.wait(30)
            open({str(marker)!r}, "w").write(str(signum))
            sys.exit(7)
        signal.signal({int(sig)}, on)
        while not os.path.exists({str(ready)!r} + ".child"):
            time.sleep(0.01)
        open({str(ready)!r}, "w").close()
        time.sleep(120)
        sys.exit(1)
    """,
    )
    proc = subprocess.Popen(
        cmd.argv,
        env=os.environ | cmd.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_ignore_usr2,
    )
    try:
        wait_for(ready, proc)
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=60) == 7, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["docker", "rm", "-f", cmd.name], capture_output=True)
    assert marker.read_text() == str(int(sig))
    assert child_marker.read_text() == str(int(sig))


@pytest.mark.parametrize(
    "bind,message",
    [
        ("/data:/in:/x:ro", "container: container bind '/data:/in:/x:ro': expected HOST[:DEST[:ro]]"),
        ("/data:in", "container: container bind '/data:in': paths must be absolute"),
    ],
)
# --- checks before queueing, dry runs -------------------------------------------------------------


def test_container_binds_are_checked_before_anything_is_queued(tmp_path, good, capsys, bind, message):
    set_key(good, "container", {"runtime": "docker", "image": "llmbatch:latest", "binds": [bind]})
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err == f"llmbatch: error: {message}\n"


def test_docker_client_variables_in_container_env_are_refused_before_queueing(tmp_path, good, capsys):
    set_key(good, "container", {"runtime": "docker", "image": "llmbatch:latest", "env": {"DOCKER_HOST": "tcp://x"}})
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.startswith("llmbatch: error: container: docker reads these from its own environment")


def test_container_env_reaches_the_job_without_a_container():
    from llmbatch.jobstep import LaunchPlan, example_place, node_command
    from llmbatch.spec import ContainerSpec

    plan = LaunchPlan(
        run_dir="/runs/r",
        runner="llmbatch.runners.infer",
        nodes=1,
        gpus_per_node=1,
        mixed_precision="no",
        container=ContainerSpec(env={"HF_DATASETS_CACHE": "/scratch/hf"}),
        binds=(),
    )
    assert node_command(plan, example_place(1)).env["HF_DATASETS_CACHE"] == "/scratch/hf"


def test_cluster_example_runs_in_apptainer(capsys, tmp_path, model_dir):
    image = tmp_path / "llmbatch.sif"
    image.write_bytes(b"not a real image: apptainer cannot run here, only its argv is checked")
    data = JOBS / "data" / "parity" / "test.jsonl"
    out, argv = dry_run(
        capsys,
        "infer",
        str(JOBS / "cluster-infer.yaml"),
        "--executor",
        "slurm",
        "--set",
        f"model.path={model_dir}",
        "--set",
        f"data.path={data}",
        "--set",
        "data.prompt_field=question",
        "--set",
        f"container.image={image}",
        "--output",
        str(tmp_path / "runs"),
    )
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=4" in out and "#SBATCH --partition=gpu" in out
    assert argv[:3] == ["apptainer", "exec", "--nv"]
    assert str(image) in argv and flag(argv, "--num_processes") == "8"
    assert "HF_TOKEN" not in " ".join(argv)  # forwarded by name through the environment only


def test_apptainer_with_the_default_model_dry_runs_without_the_image(capsys, tmp_path):
    """The dry run shows the command (the embedded model's placeholder path bound); a real run checks the image."""
    image = tmp_path / "not-built-yet.sif"
    args = [
        "infer",
        "--executor",
        "local",
        "--set",
        "container.runtime=apptainer",
        "--set",
        f"container.image={image}",
        "--output",
        str(tmp_path / "runs"),
    ]
    _, argv = dry_run(capsys, *args)
    assert argv[:2] == ["apptainer", "exec"] and str(image) in argv
    assert main(args) == 2
    assert capsys.readouterr().err == f"llmbatch: error: container.image: no such Apptainer image: {image}\n"
    assert not (tmp_path / "runs").exists()


def test_a_bind_over_the_output_root_is_refused(capsys, tmp_path):
    assert (
        main(
            [
                "infer",
                "--executor",
                "local",
                "--dry-run",
                "--set",
                "container.runtime=docker",
                "--set",
                "container.image=img",
                "--set",
                f"container.binds=['/tmp:{tmp_path}']",
                "--output",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"llmbatch: error: container.binds[0]: '/tmp:{tmp_path}': its destination {tmp_path} covers the run folder"
        )
        and err.count("\n") == 1
    )


# --- a whole job step in a container -------------------------------------------------------------

STEP_UMASK = 0o027


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_infer_step_runs_inside_a_container(runtime, request, cache_dir, tmp_path):
    """`submit.py infer` with the step in a container (Podman: rootful, as root runs it here): the
    results equal a plain run's, and every file of the run folder, most written inside the container,
    belongs to the caller. Under Podman they also have the modes the caller's umask gives (--umask);
    Docker has no such flag, so inside it the image's umask (0022) applies."""
    env = request.getfixturevalue(f"{runtime}_env")
    container = {
        "runtime": runtime,
        "image": env.image,
        "python": env.python,
        "binds": [f"{b}:{b}:ro" for b in env.binds],
        "env": {"PYTHONPATH": env.pythonpath},
    }
    args = ["--gpus", "2", "--set", "data.max_inputs=12", "--set", "generation.max_new_tokens=4"]
    old_umask = os.umask(STEP_UMASK)  # submit.py and the container's client inherit it
    try:
        proc = submit_local(
            "infer",
            tmp_path / runtime,
            *args,
            "--set",
            f"container={yaml.safe_dump(container, default_flow_style=True).strip()}",
        )
    finally:
        os.umask(old_umask)
    run = run_folder(proc)
    (command,) = [json.loads(line) for line in run.commands_file.read_text().splitlines()]
    assert command["argv"][:3] == [runtime, "run", "--rm"] and env.image in command["argv"]
    assert "--multi_gpu" in command["argv"]
    # The same inputs without a container give the same results: the step really ran, inside.
    plain = run_folder(submit_local("infer", tmp_path / "plain", *args))
    assert run.results_file.read_bytes() == plain.results_file.read_bytes()
    assert len(run.results_file.read_text().splitlines()) == 12
    entries = [run.path, *run.path.rglob("*")]
    assert {run.results_file, run.metrics_file} <= set(entries)
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in entries}
    assert owners == {(os.getuid(), os.getgid())}
    # Left out: the folder torch's elastic launcher makes for its logs in logs/node-N/ with mkdtemp, 0700
    # whatever the umask, with or without a container.
    elastic = {p for p in run.logs_dir.glob("node-*/*") if p.is_dir()}
    wrong = {
        str(p.relative_to(run.path)): oct(p.stat().st_mode & 0o777)
        for p in entries
        if not p.is_symlink()
        and p not in elastic
        and p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~STEP_UMASK
    }
    assert not wrong or runtime == "docker", wrong
