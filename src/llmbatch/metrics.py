"""metrics.json: a run's numbers, written once by its runner and read by the summary and `status`;
and train_metrics.jsonl, fine-tuning's row per step and evaluation.

Their keys are named here, once: the writers (`gather.py` for inference, the fine-tuning recipe), the
summary (`summary.py`) and `lifecycle.progress` all use these names, and read both files through the
readers at the end, which check the values they use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmbatch.rundir import (
    COUNT,
    FLAG,
    MEASURE,
    NUMBER,
    TEXT,
    Kind,
    RunDir,
    State,
    check_object,
    maybe,
    read_json,
    read_jsonl,
    renamed_keys,
)


class Metric:
    """The keys of metrics.json. A run writes those of its kind (and the optional ones it has)."""

    # Both kinds.
    INPUTS = "inputs"
    """Inference: inputs with a result. Fine-tuning: training inputs."""
    WALL_S = "wall_s"
    """Inference: per attempt the slowest rank's time, summed. Fine-tuning: this attempt's wall time."""
    WORLD_SIZE = "world_size"
    """Ranks of the (last) attempt."""
    REJECTED_RECORDS = "rejected_records"
    """With data.on_bad_record: skip, the records left out (rejected.jsonl); counted at submission."""

    # Inference: over all results.
    PROMPT_TOKENS = "prompt_tokens"
    OUTPUT_TOKENS = "output_tokens"
    FINISH_REASONS = "finish_reasons"
    TRUNCATED_PROMPTS = "truncated_prompts"
    """Results whose prompt `generation.long_prompts: truncate` cut to fit the model's context."""
    EMPTY_OUTPUTS = "empty_outputs"
    """Results whose output is empty or only whitespace (absent from runs gathered before it was counted)."""
    # Inference, when the inputs have references: see `llmbatch.scoring`.
    ACCURACY = "accuracy"
    CORRECT = "correct"
    SCORED = "scored"
    SCORING = "scoring"
    """The rule: output.scoring's mode (runs gathered before the modes: the exact rule in words)."""
    # Inference, from the stats of ranks that finished.
    GENERATE_S = "generate_s"
    TOKENS_PER_S = "tokens_per_s"
    INPUTS_PER_S = "inputs_per_s"
    RANKS = "ranks"
    LOAD_BALANCE = "load_balance"
    # Inference, where the engine ran: summed over the finished ranks (occupancy: their mean share
    # of cache slots in use per decode step).
    PREFILL_S = "prefill_s"
    DECODE_S = "decode_s"
    DECODE_STEPS = "decode_steps"
    OCCUPANCY = "occupancy"

    # Fine-tuning.
    STEPS = "steps"
    TOKENS = "tokens"
    TRAIN_S = "train_s"
    TRAIN_TOKENS_PER_S = "train_tokens_per_s"
    TRAIN_LOSS_FIRST = "train_loss_first"
    TRAIN_LOSS_LAST = "train_loss_last"
    VAL_LOSS_FIRST = "val_loss_first"
    VAL_LOSS_LAST = "val_loss_last"
    VAL_LOSS_BEST = "val_loss_best"
    BEST_STEP = "best_step"
    """The step of the best validation loss: the one adapter-best/ is from."""
    STOPPED_EARLY = "stopped_early"
    """True when train.early_stopping_patience ended the run before its last step."""
    VAL_PPL_LAST = "val_ppl_last"
    VAL_ACCURACY_FIRST = "val_accuracy_first"
    VAL_ACCURACY_LAST = "val_accuracy_last"


COUNTS = Kind("a JSON object of integers >= 0", lambda v: isinstance(v, dict) and all(map(COUNT.test, v.values())))

# What the readers check: the values the summary and `status` compute with or format as numbers.
METRICS_FIELDS = {
    Metric.INPUTS: COUNT,
    Metric.REJECTED_RECORDS: COUNT,
    Metric.STEPS: COUNT,
    Metric.WORLD_SIZE: COUNT,
    Metric.PROMPT_TOKENS: COUNT,
    Metric.OUTPUT_TOKENS: COUNT,
    # What the results tell about the outputs (the summary shows them).
    Metric.TRUNCATED_PROMPTS: COUNT,
    Metric.EMPTY_OUTPUTS: COUNT,
    Metric.FINISH_REASONS: COUNTS,
    Metric.CORRECT: COUNT,
    Metric.SCORED: COUNT,
    Metric.SCORING: TEXT,
    Metric.ACCURACY: NUMBER,
    Metric.TOKENS_PER_S: maybe(NUMBER),
    Metric.WALL_S: NUMBER,
    Metric.LOAD_BALANCE: NUMBER,
    Metric.TRAIN_LOSS_FIRST: MEASURE,
    Metric.TRAIN_LOSS_LAST: MEASURE,
    Metric.VAL_LOSS_FIRST: MEASURE,
    Metric.VAL_LOSS_LAST: MEASURE,
    Metric.VAL_LOSS_BEST: maybe(MEASURE),
    Metric.BEST_STEP: maybe(COUNT),
    Metric.STOPPED_EARLY: FLAG,
    Metric.VAL_ACCURACY_LAST: NUMBER,
    Metric.TRAIN_TOKENS_PER_S: maybe(NUMBER),
}


class TrainRow:
    """The keys of a train_metrics.jsonl row. The recipe writes two kinds: a step's row (STEP to ATTEMPT,
    after every optimizer step) and an evaluation's (STEP and the VAL_ keys); `steps` and `evaluations`
    tell them apart. The trackers (train.report_to) get the same names."""

    STEP = "step"
    """Both kinds: optimizer steps done (0 for the evaluation before the first step)."""

    # A step's row.
    TOTAL_STEPS = "total_steps"
    EPOCH = "epoch"
    LOSS = "loss"
    """Mean cross-entropy per target token of the step, over every micro-batch and rank."""
    LR = "lr"
    """The learning rate the step used."""
    GRAD_NORM = "grad_norm"
    """Before clipping."""
    TOKENS = "tokens"
    """Tokens trained on so far, all ranks and attempts, padding excluded."""
    ELAPSED_S = "elapsed_s"
    """Time spent in training steps so far, all attempts."""
    ATTEMPT = "attempt"

    # An evaluation's row.
    VAL_LOSS = "val_loss"
    VAL_PPL = "val_ppl"
    VAL_ACCURACY = "val_accuracy"
    """Only with train.eval_accuracy."""


TRAIN_ROW_FIELDS = {
    TrainRow.STEP: COUNT,
    TrainRow.TOTAL_STEPS: COUNT,
    TrainRow.EPOCH: COUNT,
    TrainRow.LOSS: MEASURE,
    TrainRow.LR: MEASURE,
    TrainRow.GRAD_NORM: MEASURE,
    TrainRow.TOKENS: COUNT,
    TrainRow.ELAPSED_S: NUMBER,
    TrainRow.ATTEMPT: COUNT,
    TrainRow.VAL_LOSS: MEASURE,
    TrainRow.VAL_PPL: MEASURE,
    TrainRow.VAL_ACCURACY: NUMBER,
}
"""What read_train_metrics checks."""


OLD_METRIC_KEYS = {
    "generated_tokens": Metric.OUTPUT_TOKENS,
    "examples": Metric.INPUTS,
    "examples_per_s": Metric.INPUTS_PER_S,
}
"""Keys of metrics.json before their rename, read as the new ones: runs written before still summarize."""


def rejected_metric(run: RunDir) -> dict[str, Any]:
    """metrics.json's count of the records data.on_bad_record: skip left out, as submission recorded it
    in state.json (none without skip)."""
    count = run.read_state().get(State.REJECTED_RECORDS)
    return {} if count is None else {Metric.REJECTED_RECORDS: count}


def read_metrics(path: Path) -> dict[str, Any]:
    """metrics.json, checked; {} before the run wrote it."""
    return check_object(path, renamed_keys(read_json(path, {}), OLD_METRIC_KEYS), METRICS_FIELDS)


def read_train_metrics(path: Path) -> list[dict[str, Any]]:
    """train_metrics.jsonl's rows, checked; a torn last line is left out."""
    return read_jsonl(path, TRAIN_ROW_FIELDS, required=(TrainRow.STEP,))


def steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step rows of train_metrics.jsonl's `rows`."""
    return [row for row in rows if TrainRow.LOSS in row]


def evaluations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation rows of train_metrics.jsonl's `rows`."""
    return [row for row in rows if TrainRow.VAL_LOSS in row]
