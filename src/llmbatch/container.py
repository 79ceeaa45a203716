"""Wrap a per-node argv in the spec's container runtime: `apptainer exec`, `docker run` or `podman run`.

Everything stays an argv list (never a shell string), and no variable's value ever goes on the argv,
where `ps` would show it to every user of the node: Docker and Podman get `-e NAME` and read the value
from their own environment; Apptainer reads `APPTAINERENV_NAME`. `ContainerCommand.env` holds those
values, to add to the environment of the process that runs `argv`.
"""

from __future__ import annotations

import os
import posixpath
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmbatch.rundir import current_umask
from llmbatch.spec import ENV_NAME, ContainerSpec, SpecError

# Docker and Podman read `-e NAME` values from their own environment, so those variables also reach the
# client itself. A value for one of these would reconfigure the client (or hide it from PATH) instead.
_CLIENT_VARS = ("PATH", "HOME", "TMPDIR")
_CLIENT_PREFIXES = ("LD_", "DOCKER_", "CONTAINERS_", "PODMAN_", "XDG_")


@dataclass
class ContainerCommand:
    argv: list[str]
    env: dict[str, str]
    """Variables to ADD to the environment of the process that runs `argv`."""
    name: str | None = None
    """Docker/Podman: the container's name. The daemon, not the job, runs a Docker container: if the client
    is SIGKILLed (Slurm's kill after KillWait), the container keeps running; `docker rm -f NAME` stops it."""


@dataclass(frozen=True)
class Bind:
    host: str
    dest: str
    ro: bool = False

    def covers(self, other: Bind) -> bool:
        """True if `other` is already visible through self, at the same place and at least as writable."""
        if self.ro and not other.ro:
            return False
        rel = posixpath.relpath(other.host, self.host)
        if rel == ".." or rel.startswith("../"):
            return False
        return posixpath.normpath(posixpath.join(self.dest, rel)) == other.dest


def parse_bind(spec: str) -> Bind:
    """HOST[:DEST[:ro|rw]] (also HOST:ro) -> Bind; DEST defaults to HOST."""
    parts = spec.split(":")
    if len(parts) == 2 and parts[1] in ("ro", "rw"):
        parts = [parts[0], parts[0], parts[1]]
    if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ValueError(f"container bind {spec!r}: expected HOST[:DEST[:ro]]")
    host, dest = parts[0], parts[1] if len(parts) > 1 else parts[0]
    for path in (host, dest):
        if not posixpath.isabs(path):
            raise ValueError(f"container bind {spec!r}: paths must be absolute")
    return Bind(posixpath.normpath(host), posixpath.normpath(dest), len(parts) == 3 and parts[2] == "ro")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_run_folder_binds(extra: Sequence[str], run_dir: str) -> None:
    """Refuse a spec bind (container.binds) that shows other files where the run folder, a folder above
    it or one in it is: the ranks would write the run's results, logs and checkpoints elsewhere (or
    never see them), and a bind at / hides the image itself. A folder bound at its own path is fine."""
    run_dir = posixpath.normpath(run_dir)
    for i, text in enumerate(extra):
        b = parse_bind(text)
        if b.dest == "/" or (_within(run_dir, b.dest) or _within(b.dest, run_dir)) and b.host != b.dest:
            raise SpecError(
                f"container.binds[{i}]",
                f"{text!r}: its destination {b.dest} covers the run folder "
                f"{run_dir} or lies in it; bind it elsewhere, or at its own path",
            )


def merge_binds(job_binds: Sequence[str], extra: Sequence[str]) -> list[Bind]:
    """The job's folders (same path inside) and the spec's HOST[:DEST[:ro]] binds, without duplicates
    and without a folder that a bound parent already shows at the same place."""
    colons = [p for p in job_binds if ":" in p]
    if colons:
        raise ValueError(f"job folders may not contain ':': {colons}")
    binds = [parse_bind(p) for p in job_binds] + [parse_bind(b) for b in extra]
    kept: list[Bind] = []
    # Shallowest destination first (and read-write before read-only): a parent comes before what it
    # covers, and nested mounts are made in the right order.
    for b in sorted(binds, key=lambda b: (b.dest.count("/"), b.dest, b.ro)):
        if any(k.covers(b) for k in kept):
            continue
        clash = [k for k in kept if k.dest == b.dest]
        if clash:
            raise ValueError(f"two folders bound at {b.dest}: {clash[0].host} and {b.host}")
        kept.append(b)
    return kept


def container_env(env: Mapping[str, str], container: ContainerSpec) -> dict[str, str]:
    """What the process inside sees: the launcher's variables, then the spec's `env`, then the
    `pass_env` names with their values from this environment now (a missing one is skipped)."""
    merged = {**env, **container.env}
    merged.update({name: os.environ[name] for name in container.pass_env if name in os.environ})
    bad = [name for name in merged if not ENV_NAME.match(name)]
    if bad:
        raise ValueError(f"not valid environment variable names: {bad}")
    return merged


def wrap_command(
    argv: list[str],
    container: ContainerSpec,
    *,
    binds: Sequence[str],
    env: Mapping[str, str],
    use_cuda: bool,
    workdir: str,
    name: str | None = None,
) -> ContainerCommand:
    """The argv (and the environment to add for it) that runs `argv` inside `container`.

    binds: absolute host folders the job needs (run folder, data, model, cache), bound at the same path.
    env: variables the process needs inside. use_cuda: expose the node's NVIDIA GPUs.
    workdir: the working directory inside. name: Docker/Podman container name (default: a random one).
    """
    if container.runtime == "none":
        # No container: the spec's variables go straight into the job's environment (pass_env's are
        # there already).
        return ContainerCommand(list(argv), {**env, **container.env})
    if container.image is None:
        raise ValueError(f"container runtime {container.runtime} needs an image")
    variables = container_env(env, container)
    mounts = merge_binds(binds, container.binds)
    if container.runtime == "apptainer":
        return _apptainer(argv, container, mounts, variables, use_cuda, workdir)
    if container.runtime in ("docker", "podman"):
        name = name or f"llmbatch-{secrets.token_hex(6)}"
        return _docker(argv, container, mounts, variables, use_cuda, workdir, name)
    raise ValueError(f"unknown container runtime {container.runtime!r}")


def _apptainer(argv, container, mounts, variables, use_cuda, workdir) -> ContainerCommand:
    # Apptainer runs as the calling user, in the job's cgroup, so Slurm's limits and signals apply as is.
    bad = [m.host for m in mounts if "," in m.host or "," in m.dest]
    if bad:
        raise ValueError(f"apptainer cannot bind paths with ',' in them: {bad}")
    cmd = ["apptainer", "exec"]
    if use_cuda:
        cmd.append("--nv")  # the host's NVIDIA driver libraries and devices
    # --cleanenv: like Docker, the process sees only the variables named here (Apptainer would pass the
    # whole host environment otherwise, host PATH and PYTHONPATH included). APPTAINERENV_* still get in.
    cmd.append("--cleanenv")
    if mounts:
        cmd += ["--bind", ",".join(f"{m.host}:{m.dest}" + (":ro" if m.ro else "") for m in mounts)]
    cmd += ["--pwd", workdir, *container.extra_args, container.image, *argv]
    return ContainerCommand(cmd, {f"APPTAINERENV_{k}": v for k, v in variables.items()})


def _docker(argv, container, mounts, variables, use_cuda, workdir, name) -> ContainerCommand:
    podman = container.runtime == "podman"
    client = [
        k
        for k, v in variables.items()
        if (k in _CLIENT_VARS or k.startswith(_CLIENT_PREFIXES)) and v != os.environ.get(k)
    ]
    if client:
        raise ValueError(
            f"{container.runtime} reads these from its own environment, so they cannot be "
            f"set for the container this way (set them in the image): {client}"
        )
    # Signals: `docker run` proxies the signals it gets to the container (--sig-proxy, on by default, no
    # tty), so the job's SIGUSR2/SIGTERM reach the container's PID 1. --init makes that PID 1 a small init
    # (tini; catatonit for Podman) that forwards them to our process and reaps zombies; without it our
    # process would be PID 1, which ignores SIGTERM unless it installs a handler. The exit status comes back.
    cmd = [container.runtime, "run", "--rm", "--init", "--name", name]
    if use_cuda:
        # Every GPU of the node (Docker: the NVIDIA container toolkit; Podman: its CDI spec, from
        # `nvidia-ctk cdi generate`); the job's CUDA_VISIBLE_DEVICES, passed in `env`, picks its own.
        cmd += ["--device", "nvidia.com/gpu=all"] if podman else ["--gpus", "all"]
    # --network host: the node's own network, so the multi-node rendezvous (host:port) works as is.
    # --shm-size: /dev/shm for NCCL and DataLoader workers; every rank of the node is in this container,
    # so a private IPC namespace is enough. (With --ipc host, --shm-size is silently ignored.)
    cmd += ["--network", "host", "--shm-size", container.shm_size]
    if podman and os.getuid() != 0:
        # Rootless Podman: keep-id maps the caller's uid/gid to the same ids inside (plain --user would
        # map to a subordinate id on the host). Rootful Podman refuses keep-id, and takes --user like Docker.
        cmd += ["--userns", "keep-id"]
    else:
        cmd += ["--user", f"{os.getuid()}:{os.getgid()}"]  # files on shared storage belong to the caller
    if podman:
        cmd += ["--security-opt", "label=disable"]  # SELinux hosts would refuse the bound folders
        # The caller's umask inside (Podman's own default is 0022), so that what the ranks write on shared
        # storage is as readable by the group as what llmbatch writes outside. Docker has no such flag.
        cmd += ["--umask", f"{current_umask():04o}"]
    for m in mounts:
        cmd += ["-v", f"{m.host}:{m.dest}" + (":ro" if m.ro else "")]
    if not podman:
        # tini forwards signals to our process's whole group, as the launcher does without a container
        # (catatonit, Podman's init, has no such switch: there only our process gets them).
        variables = {**variables, "TINI_KILL_PROCESS_GROUP": "1"}
    for k in variables:
        cmd += ["-e", k]  # the value comes from the client's environment, never from the argv
    cmd += ["-w", workdir, *container.extra_args, container.image, *argv]
    return ContainerCommand(cmd, variables, name)
