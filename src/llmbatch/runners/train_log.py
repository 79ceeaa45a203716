"""What fine-tuning reports as it goes: train_metrics.jsonl (a row per step and per evaluation, the
record `metrics.TrainRow` defines), the tracker of train.report_to, loss_curve.png, and at the end
metrics.json from those rows.

Trackers get the numbers of train_metrics.jsonl under the same names, through accelerate's trackers,
offline, in the run folder: tensorboard/ (event files), mlruns/ (MLflow's file store, no server), wandb/
(offline runs, `wandb sync` uploads them). A resumed attempt opens a new TensorBoard event file that
purges the steps after the checkpoint, which a dead attempt may have logged, so TensorBoard shows each
step once; MLflow and wandb get one run per attempt.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

from llmbatch.metrics import Metric, TrainRow, evaluations, read_train_metrics, steps
from llmbatch.rundir import RunDir, append_jsonl, atomic_write
from llmbatch.runners.checkpoint import TrainState
from llmbatch.spec import JobSpec

UNTRACKED = (TrainRow.STEP, TrainRow.TOTAL_STEPS, TrainRow.ATTEMPT)
"""Row keys the trackers do not get as values: the step is their x axis, the others are no curves."""


class TrainLog:
    """train_metrics.jsonl, which rank 0 writes, and the tracker, which every rank feeds (accelerate
    passes only the main process's values on)."""

    def __init__(self, accelerator, run: RunDir):
        self.accelerator = accelerator
        self.path = run.train_metrics_file
        self.loss_curve = run.loss_curve_file

    @classmethod
    def open(cls, accelerator, spec: JobSpec, run: RunDir, resumed_step: int, attempt: int) -> TrainLog:
        """The log of an attempt that starts at `resumed_step`, its tracker started."""
        log = cls(accelerator, run)
        if accelerator.is_main_process:
            # Rows past the checkpoint were logged by an attempt that died: this one logs those steps again.
            rows = read_train_metrics(log.path) if resumed_step else []
            keep = [row for row in rows if row[TrainRow.STEP] <= resumed_step]
            atomic_write(log.path, "".join(json.dumps(row) + "\n" for row in keep))
        start_tracker(accelerator, spec, run, resumed_step, attempt)
        return log

    def log(self, row: dict[str, Any]) -> None:
        """A row (TrainRow's keys) into train_metrics.jsonl and the tracker. Every rank calls it."""
        if self.accelerator.is_main_process:
            append_jsonl(self.path, row)
        self.accelerator.log({k: v for k, v in row.items() if k not in UNTRACKED}, step=row[TrainRow.STEP])

    def finish(self) -> None:
        """The trackers' end: accelerate's end_training without its destroy_process_group, which must
        not run before the rank exits (see faults.run_rank)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def rows(self) -> list[dict[str, Any]]:
        return read_train_metrics(self.path)

    def write_loss_curve(self) -> None:
        """loss_curve.png from the rows so far (rank 0)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        train = [(r[TrainRow.STEP], r[TrainRow.LOSS]) for r in steps(rows)]
        val = [(r[TrainRow.STEP], r[TrainRow.VAL_LOSS]) for r in evaluations(rows)]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set(xlabel="optimizer step", ylabel="loss per target token", yscale="log")
        ax.legend()
        ax.grid(alpha=0.3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write(self.loss_curve, buffer.getvalue())


def start_tracker(accelerator, spec: JobSpec, run: RunDir, resumed_step: int, attempt: int) -> None:
    """accelerate's tracker for train.report_to, offline, logging into the run folder; the spec's
    train and lora values as its hyperparameters."""
    tracker = spec.train.report_to
    if tracker == "none":
        return
    if tracker == "tensorboard":
        # A resumed attempt hides what a dead attempt logged after the checkpoint: it logs those steps again.
        project, options = run.tensorboard_dir.name, {"purge_step": resumed_step + 1} if resumed_step else {}
    elif tracker == "mlflow":
        project, options = spec.name, {"run_name": f"{run.name}-attempt-{attempt}"}
        if accelerator.is_main_process:
            import mlflow

            # A file store in the run folder, no server. MLflow 3 keeps that store in maintenance mode and
            # refuses it unless this opt-out is set (a database store would need SQLAlchemy and a lock-safe
            # file system); it still reads and writes it as before.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(run.mlflow_dir.as_uri())
    else:
        project, options = spec.name, {"mode": "offline", "dir": str(run.path), "name": f"{run.name}-attempt-{attempt}"}
    # Trackers take numbers, strings and booleans: lists and null as their text.
    config = {
        f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
        for section in ("train", "lora")
        for key, value in dataclasses.asdict(getattr(spec, section)).items()
    }
    accelerator.init_trackers(project, config=config, init_kwargs={tracker: options})


def training_metrics(
    rows: list[dict],
    state: TrainState,
    world_size: int,
    train_inputs: int,
    attempt_tokens: int,
    attempt_train_s: float,
    wall_s: float,
) -> dict:
    """metrics.json from train_metrics.jsonl's rows and the train state; tokens/s and wall time are this
    attempt's."""
    step_rows, evals = steps(rows), evaluations(rows)
    metrics = {
        Metric.STEPS: state.step,
        Metric.WORLD_SIZE: world_size,
        Metric.INPUTS: train_inputs,
        Metric.TOKENS: state.tokens,
        Metric.TRAIN_S: round(state.train_s, 2),
        Metric.WALL_S: round(wall_s, 2),
        Metric.TRAIN_TOKENS_PER_S: attempt_tokens / attempt_train_s if attempt_train_s else None,
    }
    if step_rows:
        metrics |= {
            Metric.TRAIN_LOSS_FIRST: step_rows[0][TrainRow.LOSS],
            Metric.TRAIN_LOSS_LAST: step_rows[-1][TrainRow.LOSS],
        }
    if evals:
        metrics |= {
            Metric.VAL_LOSS_FIRST: evals[0][TrainRow.VAL_LOSS],
            Metric.VAL_LOSS_LAST: evals[-1][TrainRow.VAL_LOSS],
            Metric.VAL_LOSS_BEST: state.best_val_loss,
            Metric.BEST_STEP: state.best_step,
            Metric.VAL_PPL_LAST: evals[-1][TrainRow.VAL_PPL],
        }
        if TrainRow.VAL_ACCURACY in evals[-1]:
            metrics |= {
                Metric.VAL_ACCURACY_FIRST: evals[0][TrainRow.VAL_ACCURACY],
                Metric.VAL_ACCURACY_LAST: evals[-1][TrainRow.VAL_ACCURACY],
            }
    return metrics
