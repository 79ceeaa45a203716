"""The one-screen summary printed when a run ends, read from its metrics.json."""

from __future__ import annotations

from llmbatch.rundir import RunDir, read_json

# metrics.json keys worth a line, in order, with their labels; a run shows the ones it has.
LINES = (
    ("examples", "examples"),
    ("accuracy", "accuracy (exact match)"),
    ("prompt_tokens", "prompt tokens"),
    ("generated_tokens", "generated tokens"),
    ("tokens_per_s", "generated tokens/s"),
    ("wall_s", "wall time (s)"),
    ("load_balance", "load balance (min/max rank time)"),
    ("steps", "optimizer steps"),
    ("train_loss_first", "train loss, first step"),
    ("train_loss_last", "train loss, last step"),
    ("val_loss_first", "val loss, first eval"),
    ("val_loss_last", "val loss, last eval"),
    ("val_accuracy_last", "val accuracy, last eval"),
    ("train_tokens_per_s", "train tokens/s"),
)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarize(run: RunDir) -> str:
    metrics = read_json(run.metrics_file, {})
    lines = [f"run folder: {run.path}"]
    width = max(len(label) for _, label in LINES)
    lines += [f"  {label:<{width}}  {_fmt(metrics[key])}" for key, label in LINES if key in metrics]
    for path in (run.results_file, run.adapter_dir, run.loss_curve_file):
        if path.exists():
            lines.append(f"  {path.name:<{width}}  {path}")
    if not metrics:
        lines.append("  (no metrics.json yet)")
    return "\n".join(lines)
