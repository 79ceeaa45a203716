"""What a run's inputs were: the model, the LoRA shape, the data (the files' contents too) and how
fine-tuning cuts it into steps, by key path.

Recorded twice: in state.json at submission (`resume` refuses when the inputs changed since, or it would
mix results of old and new inputs), and in each checkpoint's manifest (`checkpoints.py`: a
checkpoint loads only into the run it was saved for).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from llmbatch.data import dataset_files
from llmbatch.rundir import renamed_keys
from llmbatch.spec import OLD_KEYS, DataSpec, JobSpec, LoraSpec

FINGERPRINT_TRAIN_KEYS = ("seed", "seq_len", "packing", "loss_on", "micro_batch_size", "grad_accum_steps")
"""train.* values that decide which rows a step holds: a checkpoint's data position means nothing under others."""

DATA_CONTENTS = "data.{} contents (sha256)"
"""The fingerprint's key of a data file's contents (data.path, data.val_path)."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def data_sha256(path: Path, split: str | None) -> str:
    """A data file's digest; of a Hugging Face dataset folder, that of the files its split is read from."""
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in dataset_files(path, split):
        digest.update(f"{file.relative_to(path)}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def spec_fingerprint(spec: JobSpec) -> dict[str, Any]:
    """The run's inputs, by key path. Under other values a checkpoint would load into other shapes, or
    continue from a place in other data; a resumed inference would answer other inputs."""
    model_config = Path(spec.model.path) / "config.json"
    fingerprint = {
        "model.path": spec.model.path,
        "model config.json (sha256)": file_sha256(model_config) if model_config.is_file() else None,
    }
    fingerprint |= {f"lora.{key}": value for key, value in dataclasses.asdict(spec.lora).items()}
    fingerprint |= {f"data.{key}": value for key, value in dataclasses.asdict(spec.data).items()}
    for key, split in (("path", spec.data.split), ("val_path", spec.data.val_split)):
        path = getattr(spec.data, key)
        fingerprint[DATA_CONTENTS.format(key)] = data_sha256(Path(path), split) if path else None
    fingerprint |= {f"train.{key}": getattr(spec.train, key) for key in FINGERPRINT_TRAIN_KEYS}
    # A checkpoint's files differ between DDP and FSDP, and nf4 trains another trajectory. Recorded only
    # when not the default, so that runs recorded before these keys existed still match.
    if spec.train.sharding != "ddp":
        fingerprint["train.sharding"] = spec.train.sharding
    if spec.model.quantization != "none":
        fingerprint["model.quantization"] = spec.model.quantization
    return json.loads(json.dumps(fingerprint))  # as JSON gives it back (lists, not tuples)


ADDED_KEYS = {"data.on_bad_record": "error"}
"""Keys added to the fingerprint later, with the value that does what runs recorded before them did."""


def as_named_now(saved: dict[str, Any]) -> dict[str, Any]:
    """A recorded fingerprint with today's key names: one recorded before a spec key was renamed
    (`llmbatch.spec.OLD_KEYS`) or added (`ADDED_KEYS`) still matches the same spec."""
    return ADDED_KEYS | renamed_keys(saved, OLD_KEYS)


_SECTIONS = {"data": DataSpec, "lora": LoraSpec}
"""The spec sections whose every key is in the fingerprint."""


def _default(key: str) -> Any:
    """The default of a fingerprint's spec key (`data.format`); MISSING for other keys."""
    section, _, name = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(_SECTIONS[section])} if section in _SECTIONS else {}
    return fields[name].default if name in fields else dataclasses.MISSING


def changed_input(saved: dict[str, Any], spec: JobSpec) -> str | None:
    """Why `spec`'s inputs are not those of `saved` (a fingerprint recorded at submission), in words
    naming the first that changed; None when none did. A changed data file is named by its path (a data file
    that is gone was refused by the spec's own check)."""
    saved, now = as_named_now(saved), spec_fingerprint(spec)
    for key in ("path", "val_path"):
        if saved.get(DATA_CONTENTS.format(key)) != now.get(DATA_CONTENTS.format(key)):
            return (
                f"{getattr(spec.data, key)}: the run's data file (data.{key}) changed since it was submitted; "
                f"resuming would mix results of old and new inputs (put the file back as it was, or start "
                f"a new run)"
            )
    for key in sorted(saved.keys() | now.keys()):
        if key not in saved and now[key] == _default(key):
            continue  # a key added since the run was submitted, at the value that changes nothing
        if saved.get(key) != now.get(key):
            return (
                f"submitted with {key}={saved.get(key)!r}, but it is now {now.get(key)!r}; a resume runs on "
                f"the inputs the run was submitted with (put it back, or start a new run)"
            )
    return None
