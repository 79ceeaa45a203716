"""Slurm's own formats, as a spec's resources are checked against them: time and memory strings, option
and resource names, and the sbatch options the spec sets itself (so `sbatch_extra` may not)."""

from __future__ import annotations

import re

# Options the spec sets itself: through sbatch_extra they would bypass its checks (or break the job).
SPEC_OWNED_SBATCH_OPTIONS = {
    "time": "resources.time",
    "nodes": "resources.nodes",
    "gpus-per-node": "resources.gpus_per_node",
    "gpus": "resources.gpus_per_node",
    "gres": "resources.gpus_per_node",
    "ntasks": "nothing (llmbatch runs one node job per node)",
    "ntasks-per-node": "nothing (llmbatch runs one node job per node)",
    "cpus-per-task": "resources.cpus_per_gpu",
    "mem": "resources.mem",
    "partition": "resources.partition",
    "account": "resources.account",
    "qos": "resources.qos",
    "constraint": "resources.constraint",
    "job-name": "name",
    "output": "the run folder",
    "error": "the run folder",
    "signal": "resources.signal_delay_s",
    "array": "resources.array",
    "requeue": "resources.max_requeues",
    "no-requeue": "resources.max_requeues",
    "wrap": "the job step",
}
SBATCH_OPTION = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
SLURM_NAME = re.compile(r"^[^\s]+$")  # partition, account, qos, constraint: one word, no spaces

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|\d+(:\d{1,2}(:\d{1,2})?)?)$")
SLURM_MEM = re.compile(r"^\d+[KMGT]?$")


def slurm_time_seconds(value: str) -> int:
    """Seconds in a Slurm time string (already validated)."""
    days, _, rest = value.rpartition("-") if "-" in value else ("0", "", value)
    parts = [int(p) for p in rest.split(":")]
    if days != "0" or "-" in value:
        parts += [0] * (3 - len(parts))  # D-H, D-H:M, D-H:M:S
        h, m, s = parts
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0  # plain minutes
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = parts
    return ((int(days) * 24 + h) * 60 + m) * 60 + s
