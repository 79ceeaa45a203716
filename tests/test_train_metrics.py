"""train_metrics.jsonl: the record the fine-tuning recipe writes and `status` reads (metrics.TrainRow).

The file's format is pinned here by literal lines: a file an earlier version wrote still reads, and the
recipe still writes the same keys in the same order.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from llmbatch.lifecycle import progress
from llmbatch.metrics import TRAIN_ROW_FIELDS, Metric, TrainRow, evaluations, read_train_metrics, steps
from llmbatch.runners.checkpoint import TrainState
from llmbatch.runners.train_log import training_metrics

from helpers import runner_command

STEP_KEYS = ["step", "total_steps", "epoch", "loss", "lr", "grad_norm", "tokens", "elapsed_s", "attempt"]
EVAL_KEYS = ["step", "val_loss", "val_ppl"]

# As the recipe wrote them before TrainRow named the keys (an evaluation, two steps, an evaluation).
EARLIER_RUN = b"""\
{"step": 0, "val_loss": 28.297283015839042, "val_ppl": 1946945822598.0667, "val_accuracy": 0.0}
{"step": 1, "total_steps": 2, "epoch": 0, "loss": 28.272863388061523, "lr": 0.0, "grad_norm": 33.63833999633789, \
"tokens": 427, "elapsed_s": 0.412, "attempt": 0}
{"step": 2, "total_steps": 2, "epoch": 1, "loss": 18.09615707397461, "lr": 0.002, "grad_norm": 36.22958755493164, \
"tokens": 850, "elapsed_s": 0.801, "attempt": 1}
{"step": 2, "val_loss": 0.3158605566852169, "val_ppl": 1.3714390042912115, "val_accuracy": 0.5}
"""


def test_a_train_metrics_file_of_an_earlier_run_still_reads(make_run):
    run = make_run("finetune")
    run.train_metrics_file.write_bytes(EARLIER_RUN)
    rows = read_train_metrics(run.train_metrics_file)
    assert rows == [json.loads(line) for line in EARLIER_RUN.splitlines()]
    assert [list(row) for row in steps(rows)] == [STEP_KEYS, STEP_KEYS]
    assert [row[TrainRow.VAL_ACCURACY] for row in evaluations(rows)] == [0.0, 0.5]

    assert progress(run, "finetune", None) | {"checkpoints": []} == {
        "step": 2,
        "total_steps": 2,
        "last_loss": 18.09615707397461,
        "checkpoints": [],
    }
    state = TrainState(step=2, tokens=850, train_s=0.801, best_val_loss=0.3158605566852169, best_step=2)
    metrics = training_metrics(rows, state, 1, 60, 850, 0.801, 2.0)
    assert (metrics[Metric.TRAIN_LOSS_FIRST], metrics[Metric.TRAIN_LOSS_LAST]) == (
        28.272863388061523,
        18.09615707397461,
    )
    assert (metrics[Metric.VAL_ACCURACY_FIRST], metrics[Metric.VAL_ACCURACY_LAST]) == (0.0, 0.5)
    assert metrics[Metric.VAL_PPL_LAST] == 1.3714390042912115


@pytest.mark.slow
def test_the_recipe_writes_the_rows_that_status_reads(make_run):
    run = make_run(
        "finetune",
        [
            "data.max_inputs=16",
            "train.max_steps=3",
            "train.seq_len=64",
            "train.micro_batch_size=4",
            "train.eval_every_steps=2",
            "train.eval_accuracy=true",
        ],
    )
    cmd = runner_command(run, 1)
    proc = subprocess.run(cmd.argv, env=os.environ | cmd.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    lines = run.train_metrics_file.read_text().splitlines()
    assert [list(json.loads(line)) for line in lines] == [
        [*EVAL_KEYS, "val_accuracy"],
        STEP_KEYS,
        STEP_KEYS,
        [*EVAL_KEYS, "val_accuracy"],
        STEP_KEYS,
        [*EVAL_KEYS, "val_accuracy"],
    ]
    rows = read_train_metrics(run.train_metrics_file)  # every value of the kind the reader checks
    names = {value for key, value in vars(TrainRow).items() if key.isupper()}
    assert {key for row in rows for key in row} == names == set(TRAIN_ROW_FIELDS)
    assert [row[TrainRow.STEP] for row in steps(rows)] == [1, 2, 3]
    assert [row[TrainRow.STEP] for row in evaluations(rows)] == [0, 2, 3]
    p = progress(run, "finetune", None)
    assert (p["step"], p["total_steps"], p["last_loss"]) == (3, 3, rows[-2][TrainRow.LOSS])
