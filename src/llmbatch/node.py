"""The node supervisor: what every node of a job runs, under Slurm or on this machine.

`NodeJob` is the submitit callable: on each node it reads that node's place in the job from the Slurm
environment (rendezvous host and port, machine rank, restart count), runs `jobstep.node_command` with
its output in `logs/node-N.log`, forwards signals to it, and fails with the log's tail if a rank fails.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from contextlib import suppress
from itertools import islice
from pathlib import Path

import submitit

from llmbatch import COMMAND
from llmbatch.heartbeat import ERROR_PREFIX, silent_for
from llmbatch.jobstep import LaunchPlan, NodePlace, node_command, rendezvous_ports
from llmbatch.rundir import DamagedRun, RunDir, State, atomic_write, open_append, process_start_ticks
from llmbatch.shards import global_rank


def place_from_environment(plan: LaunchPlan) -> NodePlace:
    """This node's place in the job, from submitit's view of the Slurm environment."""
    # On the node, never in the batch script: each node must see its own SLURM_NODEID.
    env = submitit.JobEnvironment()
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    # One node needs no network: loopback works whatever the hostname resolves to.
    main_host = env.hostnames[0] if plan.nodes > 1 else "127.0.0.1"
    port = rendezvous_port(env.job_id, restarts, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1")), plan.nodes)
    return NodePlace(
        node_rank=env.node,
        main_host=main_host,
        port=port,
        attempt=plan.attempt_base + restarts,
        job_id=env.job_id,
        use_cuda=_cuda_available(),
    )


def rendezvous_port(job_id: str, restarts: int, array_tasks: int, nodes: int) -> int:
    """The job's first choice of `jobstep.rendezvous_ports`; on one node, its first that is free here.

    Every node of a job must reach the same port, so only a job of one node can look for a free one.
    """
    ports = rendezvous_ports(job_id, restarts, array_tasks)
    if nodes > 1:
        return next(ports)
    if (port := next((p for p in islice(ports, 64) if _port_is_free(p)), None)) is None:
        raise RuntimeError("no free rendezvous port on this node among 64 tried: are that many jobs running here?")
    return port


def _port_is_free(port: int) -> bool:
    """Whether nothing listens on `port` here (a connection in TIME_WAIT does not count, as for the
    rendezvous' own SO_REUSEADDR socket)."""
    with socket.socket(socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _cuda_available() -> bool:
    # Slurm sets CUDA_VISIBLE_DEVICES for its (possibly fake) gres; ask the driver instead. Imported
    # here, on the node: the command line imports this module and must start without torch.
    import torch

    return torch.cuda.is_available()


class NodeJob(submitit.helpers.Checkpointable):
    """The submitit callable: the node job, one per node (Slurm's task), each starting that node's ranks.

    Preemption: Slurm sends USR2 (submitit's signal) to every node job, and on the first (Slurm's task 0)
    submitit calls `checkpoint`. Every node writes the run's preempt marker for this attempt and forwards
    the signal to `accelerate launch`; the ranks (which also get Slurm's signal directly) save and exit;
    the first node job waits for that, then submitit requeues the job, and the next attempt resumes from
    the run folder (the pickled callable carries no progress).
    """

    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self._proc: subprocess.Popen | None = None
        self._preempted = False
        self._silent_rank: str | None = None

    def __call__(self) -> str:
        plan, run = self.plan, RunDir(Path(self.plan.run_dir))
        place = place_from_environment(plan)
        # What `status` of a local run reads (never submitit's result pickle), from node 0 of a plain job.
        records = place.node_rank == 0 and plan.task is None
        try:
            outcome = self._run(run, place)
        except BaseException:
            if records and not self._preempted:  # a preempted job is requeued, or resumed by hand
                with suppress(OSError, ValueError):  # the job's own error is what the user must see
                    # Nothing of this attempt will report a full disk any more; `resume` reserves anew.
                    run.release_space()
                    run.update_state(**{State.ENDED: {"job_id": place.job_id, "state": "FAILED"}})
            raise
        if records and outcome == "done":
            run.update_state(**{State.ENDED: {"job_id": place.job_id, "state": "COMPLETED"}})
        return outcome

    def _run(self, run: RunDir, place: NodePlace) -> str:
        plan = self.plan
        if place.node_rank == 0:
            # The same keys in state.json and in an array task's entry (`rundir.State`, `rundir.Task`).
            started = {
                State.ATTEMPT: place.attempt,
                State.ATTEMPT_STARTED: time.time(),
                State.REQUEUES: int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            }
            if plan.task is None:
                run.update_state(**started)
            else:  # an array task: requeued and resumed on its own
                run.update_tasks({plan.task: started})
        cmd = node_command(plan, place)
        host = os.environ.get("SLURMD_NODENAME", os.uname().nodename)
        run.record_command(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "node": place.node_rank,
                "host": host,
                "attempt": place.attempt,
                "job_id": place.job_id,
                "task": plan.task,
                "argv": cmd.argv,
                "shell": shlex.join(cmd.argv),
                "env": sorted(cmd.env),
            }
        )
        log_path = run.node_log(place.node_rank, plan.task)
        with open_append(log_path) as log:
            log.write(f"== attempt {place.attempt} on {host}: {shlex.join(cmd.argv)}\n".encode())
            self._install_signal_handlers(run.preempt_marker(place.attempt, plan.task))
            # Own session: a terminal's Ctrl-C reaches only us, and we forward it (SIGINT/SIGTERM make
            # torch's launcher stop its ranks).
            self._proc = subprocess.Popen(
                cmd.argv,
                env=os.environ | cmd.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_ignore_preempt_signal,
            )
            code = self._wait(lambda: self._watch_heartbeats(run, place, host, log))
            if self._preempted:
                log.write(
                    f"== attempt {place.attempt} stopped at the preemption signal (exit {code}); the "
                    f"ranks saved their work; requeued if requeues are left\n".encode()
                )
        if self._preempted:
            return "preempted"  # the ranks saved; Slurm requeues or ends the job
        if self._silent_rank is not None:
            raise RuntimeError(self._silent_rank)
        if code != 0:
            raise RuntimeError(
                f"node {place.node_rank}: accelerate launch exited with {code}; "
                f"see {log_path}\n--- last lines ---\n{_tail(log_path)}"
            )
        return "done"

    def _install_signal_handlers(self, preempt_marker: Path) -> None:
        # Ctrl-C or a plain kill of this process must reach the ranks too. (A local job starts with
        # SIGINT held: submission.interrupts_held.)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        # Keep submitit's USR2 handler (checkpoint + requeue on the first node job), but forward first, on every node.
        submitit_handler = signal.getsignal(signal.SIGUSR2)

        def on_preempt(signum, frame):
            self._preempted = True
            atomic_write(preempt_marker, f"{signum}\n")
            self._forward(signum)
            if callable(submitit_handler):
                submitit_handler(signum, frame)

        signal.signal(signal.SIGUSR2, on_preempt)

    def _wait(self, watch) -> int:
        # poll(), not wait(): wait() holds a lock while blocked, and `checkpoint` must be able to
        # wait for the same process from inside the signal handler.
        while (code := self._proc.poll()) is None:
            watch()
            time.sleep(0.2)
        return code

    def _watch_heartbeats(self, run: RunDir, place, host: str, log) -> None:
        """Fail the job when a rank of this node has sent no heartbeat for collective_timeout_s.

        A stopped rank holds its peers in their next collective and the allocation until the time
        limit; its launcher sees nothing wrong. It is killed (SIGKILL: a stopped process handles no
        other signal), the launcher then stops the others, and the job fails with one line.
        """
        plan = self.plan
        if self._silent_rank is not None or self._preempted:
            return
        first = global_rank(plan.task, plan.num_processes, place.node_rank * plan.gpus_per_node)
        for rank in range(first, first + plan.gpus_per_node):
            record = run.rank_record(place.attempt, rank)
            silent = silent_for(record)
            if silent is None or silent < plan.collective_timeout_s:
                continue
            try:
                owner = RunDir.read_rank_record(record)
            except DamagedRun:  # then it is not known which process to kill; the job still fails
                owner = {}
            if owner.get("start_ticks") is not None and process_start_ticks(owner["pid"]) == owner["start_ticks"]:
                os.kill(owner["pid"], signal.SIGKILL)
            why = (
                f"rank {rank} on {host} (pid {owner.get('pid')}) sent no heartbeat for {silent:.0f} s "
                f"(resources.collective_timeout_s={plan.collective_timeout_s}): stopped or hung; killed it; "
                f"finish the run with: {COMMAND} resume {run.path}"
            )
            log.write(f"\n{ERROR_PREFIX}{why}\n".encode())  # after a progress bar's unfinished line
            log.flush()
            self._silent_rank = f"node {place.node_rank}: {why}"
            return

    def _forward(self, signum: int, frame=None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signum)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        """On the first node job (Slurm's task 0), from submitit's USR2 handler: let the ranks save, then
        requeue (or not)."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=max(10, self.plan.signal_delay_s - 15))
            except subprocess.TimeoutExpired:
                pass  # Slurm kills us soon; the newest complete checkpoint or flushed shard still counts
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.plan.max_requeues:
            return None  # submitit then ends the job instead of requeueing
        return submitit.helpers.DelayedSubmission(NodeJob(self.plan))


def _ignore_preempt_signal() -> None:
    # Runs in the child before exec: `accelerate launch` would die of SIGUSR2 (default action) and
    # orphan the ranks. Ignored dispositions survive exec; the ranks install their own handlers.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _tail(path: Path, lines: int = 30) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 16384))
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
