"""Command line: wires spec -> run folder -> launch plan -> executor, and the lifecycle commands.

Exit codes: 0 done, 1 the job failed, 2 bad input (nothing was queued).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from llmbatch import COMMAND, embedded, lifecycle, slurm
from llmbatch.data import DataError, Rejected, check_settings, load_inputs, resolve_datasets
from llmbatch.gather import gather_run
from llmbatch.jobstep import example_place, make_plan, node_command
from llmbatch.models import check_model, resolve_models, template_warning
from llmbatch.rundir import DamagedRun, RunBusy, RunDir
from llmbatch.sizing import check_memory
from llmbatch.spec import (
    EMBEDDED_MODEL,
    JobSpec,
    SpecError,
    apply_override,
    blame,
    dump_spec,
    load_resolved,
    load_spec,
)
from llmbatch.submission import Interrupted, UsageError, check_job, quiet_stdout, resume_run, submit_new_run
from llmbatch.text import printable

DEFAULT_JOBS = Path(__file__).resolve().parent / "jobs"
"""The default specs, shipped with the package (a checkout's jobs/ links here)."""


def default_spec_path(kind: str) -> Path:
    """jobs/KIND.yaml in the current folder, else the default that ships with llmbatch."""
    local = Path.cwd() / "jobs" / f"{kind}.yaml"
    return local if local.is_file() else DEFAULT_JOBS / f"{kind}.yaml"


def load_job_spec(kind: str, args: argparse.Namespace) -> tuple[JobSpec, int, list[Rejected]]:
    """The spec with the command line's overrides, validated, its data files checked, how many inputs
    it has, and the records data.on_bad_record: skip leaves out."""
    overrides, origins = list(args.set or []), {}
    for option, key, value in (
        ("--gpus", "resources.gpus_per_node", args.gpus),
        ("--nodes", "resources.nodes", args.nodes),
        ("--output", "output.root", args.output),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
            origins[overrides[-1]] = f"{option} {value}"
    if args.array is not None:
        if not (m := re.fullmatch(r"(\d+)(?:%(\d+))?", args.array)):
            raise UsageError(f"--array {args.array}: expected N or N%M (N tasks, at most M running at once)")
        for key, value in (("resources.array", m.group(1)), ("resources.array_max_running", m.group(2))):
            if value is not None:
                overrides.append(f"{key}={value}")
                origins[overrides[-1]] = f"--array {args.array}"
    spec_path = args.spec or default_spec_path(kind)
    spec = resolve_models(load_spec(spec_path, kind, overrides, origins=origins), spec_path, overrides, origins)
    try:
        spec = resolve_datasets(spec)
    except SpecError as e:
        e.source = blame(e, overrides, origins) or str(spec_path)
        raise
    rejected: list[Rejected] = []
    inputs = load_inputs(spec.data, rejected=rejected)
    check_settings(inputs, spec.data, spec.generation)
    if spec.data.val_path:
        load_inputs(spec.data, val=True, rejected=rejected)
    if spec.resources.array is not None and spec.resources.array > len(inputs):
        # A task without inputs would hold a node for nothing; Slurm would queue it all the same.
        counted = f"{len(inputs)} input{'s' if len(inputs) > 1 else ''}"
        fix = f"use at most {len(inputs)}" if len(inputs) >= 2 else "drop the array"
        error = SpecError(
            "resources.array",
            f"{spec.resources.array} array tasks for {counted}: each task needs at least one ({fix})",
            related=("data",),
        )
        error.source = blame(error, overrides, origins) or str(spec_path)
        raise error
    try:  # from config.json alone, before the model's other files are checked
        check_memory(spec)
    except SpecError as error:
        error.source = blame(error, overrides, origins) or str(spec_path)
        raise
    check_model(spec, inputs)
    return spec, len(inputs), rejected


def resolve_model(spec: JobSpec, build: bool) -> JobSpec:
    """Point model.path at a real folder, building the embedded default on first use."""
    if spec.model.path != EMBEDDED_MODEL:
        return spec
    cache = embedded.default_cache_dir()
    # A placeholder a bind can hold (apptainer refuses ',' in a bind): the dry run shows the command.
    path = embedded.ensure_embedded_model(cache) if build else cache / "<embedded-model-built-on-first-run>"
    return apply_override(spec, "model.path", str(path.resolve()), Path.cwd())


def cmd_run(kind: str, args: argparse.Namespace) -> int:
    spec, inputs, rejected = load_job_spec(kind, args)
    executor = slurm.pick_executor(args.executor)
    # Checked before the embedded model is built (its first use takes a while), with its placeholder.
    check_job(resolve_model(spec, build=False), executor, planned_run_path(spec), dry_run=args.dry_run)
    warning = template_warning(spec)
    spec = resolve_model(spec, build=not args.dry_run)
    if rejected:
        print(
            f"llmbatch: warning: data.on_bad_record: skip leaves out {len(rejected)} bad record"
            f"{'s' if len(rejected) > 1 else ''}, the first: {printable(str(rejected[0]))}",
            file=sys.stderr,
        )
    if args.dry_run:
        print_dry_run(spec, executor)
        code = 0
    else:
        code = submit_new_run(spec, kind, executor, inputs, rejected, wait=args.wait)
    # Once submitted (after a local run's summary), so that an error before stays the one line; the
    # run's log says it too.
    if warning is not None:
        print(f"llmbatch: {warning}", file=sys.stderr)
    return code


def planned_run_path(spec: JobSpec) -> Path:
    """Where the run folder will be, with placeholders for what only its creation decides."""
    return Path(spec.output.root).resolve() / f"{spec.name}-<timestamp>-<id>"


def print_dry_run(spec: JobSpec, executor: str) -> None:
    run = RunDir(planned_run_path(spec))
    plan = make_plan(spec, run.path)
    print(f"# resolved spec ({spec.kind})\n{dump_spec(spec)}")
    if executor == "slurm":
        print("# sbatch script\n" + slurm.sbatch_script(spec, run))
    which = "node 0"
    if spec.resources.array is not None:
        plan = dataclasses.replace(plan, task=0)
        which = (
            f"array task 0 of {spec.resources.array} (each task passes its own --task and runs its share of "
            f"the inputs on one node)"
        )
    cmd = node_command(plan, example_place(spec.resources.nodes))
    print(
        f"# per-node command, {which} on GPUs (each node passes its own --machine_rank; the port comes from "
        f"the job id; a node without CUDA drops to --mixed_precision no with ACCELERATE_USE_CPU=true)"
    )
    print(shlex.join(cmd.argv))
    print("# environment passed by name: " + " ".join(sorted(cmd.env)))
    print("# nothing was submitted (--dry-run)")


def cmd_gather(args: argparse.Namespace) -> int:
    return gather_run(open_run(args.run))


def cmd_resume(args: argparse.Namespace) -> int:
    """Resubmit a stopped run from its folder; runners pick up shards and checkpoints there."""
    return resume_run(open_run(args.run), args.executor, wait=args.wait)


def cmd_status(args: argparse.Namespace) -> int:
    if args.run:
        runs = [open_run(args.run)]
    else:
        runs = lifecycle.find_runs(Path(args.root))[:1]
        if not runs:
            raise UsageError(f"no runs under {args.root}")
    statuses = [lifecycle.run_status(r) for r in runs]
    if args.json:
        print(lifecycle.status_json(statuses))
    else:
        for s in statuses:
            print(s.line())
            for key, value in s.progress.items():
                print(f"  {key}: {value}")
            for line in s.task_lines():
                print(f"  {line}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    statuses, damaged = [], []
    for run in lifecycle.find_runs(Path(args.root))[: args.limit]:
        try:  # one damaged run folder must not hide the others
            statuses.append(lifecycle.run_status(run))
        except (DamagedRun, SpecError, DataError) as e:  # a side file; its spec or data (for an input count)
            damaged.append(f"{run.name}  damaged: {e}")
        except slurm.SlurmError as e:
            damaged.append(f"{run.name}  state unknown: {e}")
    if args.json:
        print(lifecycle.status_json(statuses))
    else:
        print("\n".join([s.line() for s in statuses] + damaged) or f"no runs under {args.root}")
    for line in damaged if args.json else ():
        print(line, file=sys.stderr)
    return 0


def check_log_choice(run: RunDir, args: argparse.Namespace) -> None:
    """--task, --node and --rank name ones the run has: a log that can never exist is not `no log yet`."""
    res = load_resolved(run.spec_file).resources
    if args.task is not None and res.array is None:
        raise UsageError(f"--task {args.task}: {run.path} is one job, not a job array (leave --task out)")
    for option, value, count, what, has in (
        ("--task", args.task, res.array, "array task", "this run has {}"),
        ("--node", args.node, 1 if res.array else res.nodes, "node", "this run has {}"),
        (
            "--rank",
            args.rank,
            res.gpus_per_node,
            "local rank",
            f"each node runs {{}} (resources.gpus_per_node: {res.gpus_per_node})",
        ),
    ):
        if value is not None and not 0 <= value < count:
            which = f"{what} 0 only" if count == 1 else f"{what}s 0-{count - 1}"
            raise UsageError(f"{option} {value}: no such {what}: {has.format(which)}")


def cmd_logs(args: argparse.Namespace) -> int:
    run = open_run(args.run)
    check_log_choice(run, args)
    try:
        path = lifecycle.log_file(run, args.node, args.rank, args.task)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if not args.follow:
        if not path.exists():
            raise UsageError(f"no log yet: {path}")
        sys.stdout.write(path.read_text(errors="replace"))
        return 0
    lifecycle.follow(path, lambda: lifecycle.run_status(run).state not in lifecycle.ENDED_STATES)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    print(lifecycle.cancel(open_run(args.run)))
    return 0


def open_run(path: str) -> RunDir:
    try:
        return RunDir.open(path)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


# --- argument parsing ----------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with its errors on one line like every other error here (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"llmbatch: error: {printable(message)} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def add_run_options(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("spec", nargs="?", help=f"YAML spec (default: jobs/{kind}.yaml)")
    p.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="GPUs per node = processes per node (CPU processes where there is no GPU); sets resources.gpus_per_node",
    )
    p.add_argument("--nodes", type=int, metavar="N", help="number of nodes (Slurm only); sets resources.nodes")
    p.add_argument(
        "--array",
        metavar="N[%M]",
        help="inference as a Slurm job array of N one-node tasks, each on its share of the inputs, "
        "at most M running at once; sets resources.array (and resources.array_max_running)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override one spec value, typed by the schema, e.g. --set generation.max_new_tokens=16 "
        "(repeatable; paths resolve against the current folder)",
    )
    p.add_argument(
        "--executor",
        choices=("auto", "slurm", "local"),
        default="auto",
        help="where to run: slurm (sbatch via submitit), local (this machine, via submitit's local "
        "executor), auto = slurm when sbatch is on PATH, else local (default: auto)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved spec, the sbatch script and the per-node command; submit nothing",
    )
    p.add_argument("--output", metavar="DIR", help="output root for the run folder; sets output.root")
    p.add_argument(
        "--wait",
        action="store_true",
        help="with Slurm, wait for the job and print the summary (local runs always wait)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=COMMAND,
        description="LLM batch inference and LoRA fine-tuning on Slurm or this machine, from one YAML spec.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for kind, text in (
        ("infer", "run batch inference: every input once, gathered into results.jsonl"),
        ("finetune", "LoRA fine-tuning with checkpoints; the adapter lands in <run>/adapter"),
    ):
        add_run_options(sub.add_parser(kind, help=text, description=text), kind)
    p = sub.add_parser(
        "gather",
        help="gather an inference run's shards into results.jsonl by hand",
        description="Gather the shards of an inference run into results.jsonl (results.parquet with "
        "output.format: parquet) and metrics.json. "
        "Exits 1 and names the missing ids if the run is incomplete.",
    )
    p.add_argument("run", help="the run folder")

    p = sub.add_parser("status", help="Slurm state and progress of a run (default: the newest under --root)")
    p.add_argument("run", nargs="?", help="the run folder (default: the newest run under --root)")
    p.add_argument("--root", default="runs", help="output root to look in (default: runs)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("list", help="recent runs under the output root, newest first")
    p.add_argument("--root", default="runs", help="output root (default: runs)")
    p.add_argument("--limit", type=positive_int, default=20, help="how many runs (default: 20)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("logs", help="print a run's logs: a node's launch log, or one rank's output")
    p.add_argument("run", help="the run folder")
    p.add_argument("--node", type=int, default=0, help="node index (default: 0)")
    p.add_argument("--rank", type=int, help="local rank on that node (default: the whole node log)")
    p.add_argument("--task", type=int, help="of a job array: that task's logs")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")

    p = sub.add_parser("cancel", help="cancel a run's job (scancel, or stop the local job)")
    p.add_argument("run", help="the run folder")

    p = sub.add_parser("resume", help="resubmit a stopped, failed or killed run; it continues where it stopped")
    p.add_argument("run", help="the run folder")
    p.add_argument(
        "--executor", choices=("auto", "slurm", "local"), help="where to run (default: where the run ran before)"
    )
    p.add_argument("--wait", action="store_true", help="with Slurm, wait and print the summary")
    return parser


COMMANDS = {
    "infer": lambda a: cmd_run("infer", a),
    "finetune": lambda a: cmd_run("finetune", a),
    "gather": cmd_gather,
    "status": cmd_status,
    "list": cmd_list,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "resume": cmd_resume,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SpecError, DataError, UsageError, DamagedRun, RunBusy, slurm.SlurmError) as e:
        print(f"llmbatch: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`status | head`): stop quietly, as Unix tools do
        quiet_stdout()
        return 141
    except (Interrupted, KeyboardInterrupt) as e:  # Ctrl-C
        # After the terminal's ^C, on a line of its own.
        print(f"{chr(10) if sys.stderr.isatty() else ''}llmbatch: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
