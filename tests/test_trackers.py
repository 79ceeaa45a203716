"""Trackers (train.report_to), read back from what they wrote: a real fine-tune (one process, four
steps, through `accelerate launch`) logs to MLflow's file store (`mlruns/`) or to an offline Weights &
Biases run (`wandb/`) in the run folder. What they hold must be train_metrics.jsonl's numbers at its
steps, and the spec's train and lora values as the run's parameters. TensorBoard's test is in
test_finetune.py (it also crosses a resume).

The environment points each tracker elsewhere (MLFLOW_TRACKING_URI, WANDB_DIR; WANDB_MODE=offline
besides, so that nothing could reach the network): the run folder must win. Both packages are in the
`dev` extra: mlflow-skinny (accelerate's MLflow tracker works with it, and it is a fraction of mlflow)
and wandb. Importing either takes seconds, and each test runs a fine-tune: both are slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from llmbatch.rundir import RunDir
from llmbatch.spec import load_resolved

from helpers import new_run, runner_command

TINY = [
    "data.max_inputs=40",
    "train.max_steps=4",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.eval_every_steps=2",
    "train.save_every_steps=100",
    "train.eval_accuracy=false",
]


def finetune_with(tracker: str, root: Path, model_dir: Path, elsewhere: dict[str, str]) -> RunDir:
    run = new_run(root, model_dir, "finetune", [*TINY, f"train.report_to={tracker}"])
    cmd = runner_command(run, 1)
    env = os.environ | cmd.env | elsewhere
    proc = subprocess.run(cmd.argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run


def logged(run: RunDir, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in train_metrics.jsonl."""
    rows = [json.loads(line) for line in run.train_metrics_file.read_text().splitlines()]
    return [(row["step"], row[key]) for row in rows if key in row]


def hyperparameters(run: RunDir) -> dict:
    """The spec's train and lora values as the trackers get them: numbers, strings and booleans as
    they are, anything else (lists, null) as its text."""
    spec = load_resolved(run.spec_file)
    return {
        f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
        for section in ("train", "lora")
        for key, value in dataclasses.asdict(getattr(spec, section)).items()
    }


@pytest.mark.slow
def test_mlflow_file_store_holds_the_loss_per_step_and_the_params(tmp_path, model_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when told

    elsewhere = tmp_path / "elsewhere"
    run = finetune_with("mlflow", tmp_path / "runs", model_dir, {"MLFLOW_TRACKING_URI": elsewhere.as_uri()})
    assert not elsewhere.exists()
    client = MlflowClient(tracking_uri=run.mlflow_dir.as_uri())
    spec = load_resolved(run.spec_file)
    experiment = client.get_experiment_by_name(spec.name)
    (logged_run,) = client.search_runs([experiment.experiment_id])
    assert logged_run.data.tags["mlflow.runName"] == f"{run.name}-attempt-0"
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(logged_run.info.run_id, key))
        assert history == logged(run, key), key
    assert [step for step, _ in logged(run, "loss")] == [1, 2, 3, 4]
    # MLflow keeps parameters as text.
    assert logged_run.data.params == {key: str(value) for key, value in hyperparameters(run).items()}
    assert logged_run.data.params["train.report_to"] == "mlflow"


def wandb_records(path: Path):
    """The records of an offline run's .wandb file, as wandb's protobuf `Record`s. The file is a W&B
    header (":W&B", a 2-byte magic, a version byte) and then LevelDB's log format: 32 KiB blocks of
    chunks, each with a 7-byte header (CRC-32C, length, type: 1 whole, 2 first, 3 middle, 4 last);
    a block's last bytes, fewer than a header, are padding. wandb 0.31 ships no reader of its own."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, header = 32 << 10, 7
    pos, parts = 7, []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if (kind, length) == (0, 0):  # zero padding to the block's end
            pos += left
            continue
        parts.append(data[pos + header : pos + header + length])
        pos += header + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
    assert not parts, "the file ends inside a record"


@pytest.mark.slow
def test_wandb_offline_run_holds_the_loss_per_step_and_the_config(tmp_path, model_dir):
    elsewhere = tmp_path / "elsewhere"
    state = tmp_path / "wandb-state"  # wandb's own cache, config and data folders, not the user's home
    env = {
        "WANDB_DIR": str(elsewhere),
        "WANDB_MODE": "offline",
        **{f"WANDB_{name}_DIR": str(state / name.lower()) for name in ("CACHE", "CONFIG", "DATA")},
    }
    elsewhere.mkdir()
    run = finetune_with("wandb", tmp_path / "runs", model_dir, env)
    assert list(elsewhere.iterdir()) == []
    (offline,) = (run.path / "wandb").glob("offline-run-*")
    (records_file,) = offline.glob("run-*.wandb")
    records = list(wandb_records(records_file))
    (info,) = [r.run for r in records if r.HasField("run")]
    spec = load_resolved(run.spec_file)
    assert (info.project, info.display_name) == (spec.name, f"{run.name}-attempt-0")
    history = [
        {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
        | {"_step": r.history.step.num}
        for r in records
        if r.HasField("history")
    ]
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        assert [(h["_step"], h[key]) for h in history if key in h] == logged(run, key), key
    assert [step for step, _ in logged(run, "loss")] == [1, 2, 3, 4]
    config = {
        item.key: json.loads(item.value_json) for r in records if r.HasField("config") for item in r.config.update
    }
    assert {key: config[key] for key in hyperparameters(run)} == hyperparameters(run)
    assert config["train.report_to"] == "wandb"
