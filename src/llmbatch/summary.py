"""The one-screen summary printed when a run ends, read from its metrics.json."""

from __future__ import annotations

from llmbatch.metrics import Metric, read_metrics
from llmbatch.rundir import RunDir
from llmbatch.text import printable

# metrics.json keys worth a line, in order, with their labels; a run shows the ones it has.
LINES = (
    (Metric.INPUTS, "inputs"),
    (Metric.REJECTED_RECORDS, "rejected records (rejected.jsonl)"),
    (Metric.ACCURACY, "accuracy"),
    (Metric.PROMPT_TOKENS, "prompt tokens"),
    (Metric.OUTPUT_TOKENS, "output tokens"),
    # What the results tell about the outputs: why each one ended, how many are empty, whose prompt was cut.
    (Metric.FINISH_REASONS, "finish reasons"),
    (Metric.EMPTY_OUTPUTS, "empty outputs"),
    (Metric.TRUNCATED_PROMPTS, "truncated prompts"),
    (Metric.TOKENS_PER_S, "output tokens/s"),
    (Metric.WALL_S, "wall time (s)"),
    (Metric.LOAD_BALANCE, "load balance (min/max rank time)"),
    (Metric.STEPS, "optimizer steps"),
    (Metric.TRAIN_LOSS_FIRST, "train loss, first step"),
    (Metric.TRAIN_LOSS_LAST, "train loss, last step"),
    (Metric.VAL_LOSS_FIRST, "val loss, first eval"),
    (Metric.VAL_LOSS_LAST, "val loss, last eval"),
    (Metric.VAL_LOSS_BEST, "val loss, best eval"),
    (Metric.BEST_STEP, "best eval's step"),
    (Metric.STOPPED_EARLY, "stopped early"),
    (Metric.VAL_ACCURACY_LAST, "val accuracy, last eval"),
    (Metric.TRAIN_TOKENS_PER_S, "train tokens/s"),
)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _shown(metrics: dict, key: str) -> str:
    """A metric's value for its line: accuracy with its counts and rule, finish reasons most first."""
    value = metrics[key]
    if key == Metric.ACCURACY and {Metric.CORRECT, Metric.SCORED, Metric.SCORING} <= metrics.keys():
        counts = f"{metrics[Metric.CORRECT]} of {metrics[Metric.SCORED]}"
        return f"{_fmt(value)} ({counts}, scoring: {printable(metrics[Metric.SCORING])})"
    if key == Metric.FINISH_REASONS:
        return ", ".join(f"{printable(reason)} {n}" for reason, n in sorted(value.items(), key=lambda kv: -kv[1]))
    return _fmt(value)


def summarize(run: RunDir) -> str:
    metrics = read_metrics(run.metrics_file)
    lines = [f"run folder: {run.path}"]
    width = max(len(label) for _, label in LINES)
    lines += [f"  {label:<{width}}  {_shown(metrics, key)}" for key, label in LINES if key in metrics]
    for path in (run.gathered_results(), run.adapter_dir, run.adapter_best_dir, run.loss_curve_file):
        if path is not None and path.exists():
            lines.append(f"  {path.name:<{width}}  {path}")
    if not metrics:
        lines.append("  (no metrics.json yet)")
    return "\n".join(lines)
