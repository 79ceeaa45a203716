"""Checkpoints of a fine-tuning run on shared storage: what one is, and whether it can be loaded.

    checkpoints/step-000123/      complete: renamed into place after every rank finished writing
        model.safetensors         the trainable weights only (LoRA, modules_to_save), from rank 0
        optimizer.bin             \
        scheduler.bin             /  accelerate's save_state, from rank 0
        random_states_<rank>.pkl  one per rank: python, numpy, torch (and CUDA) generators
        trainer_state.json        step, epoch, batch position, tokens, training time, best validation loss
        manifest.json             written last: every other file's size and SHA-256, and what the
                                  checkpoint is valid for (fingerprint.spec_fingerprint)
    checkpoints/.step-000123.tmp/ a save in progress, or one an attempt died in; never loaded
    checkpoints/.step-000123.damaged/  a step-* folder that failed its manifest at resume, kept for a look

A rename alone is not proof that a checkpoint is whole: a file system may put a rename on disk before
the data (a node that dies then leaves a step-* folder with a torn file). So every file is checked
against the manifest before a checkpoint is loaded. Torch-free: `resume` on the command line checks the
checkpoint it will load before anything is queued. Saving and loading are the ranks' part
(runners/checkpoint.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmbatch.fingerprint import as_named_now, file_sha256, spec_fingerprint
from llmbatch.rundir import COUNT, OBJECT, TEXT, DamagedRun, atomic_write_json, check_object, read_json, shown
from llmbatch.spec import JobSpec

MANIFEST_FILE = "manifest.json"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


class CheckpointMismatch(ValueError):
    """The run's checkpoint was saved under another spec (LoRA shape, model or data): one line."""


def step_folders(checkpoints_dir: Path) -> list[Path]:
    """The step-* folders, oldest first: complete ones, and any a lying rename left torn."""
    found = [(int(m.group(1)), p) for p in Path(checkpoints_dir).glob("step-*") if (m := _STEP_FOLDER.match(p.name))]
    return [p for _, p in sorted(found)]


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints whose save finished (it wrote the manifest), oldest first; their files unchecked."""
    return [p for p in step_folders(checkpoints_dir) if (p / MANIFEST_FILE).is_file()]


def write_manifest(folder: Path, fingerprint: dict[str, Any]) -> None:
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file()
    }
    atomic_write_json(folder / MANIFEST_FILE, {"files": files, "spec": fingerprint})


MANIFEST_FIELDS = {"files": OBJECT, "spec": OBJECT}
MANIFEST_FILE_FIELDS = {"bytes": COUNT, "sha256": TEXT}


def read_manifest(folder: Path) -> dict[str, Any]:
    """A checkpoint's manifest, checked: every file it lists (a plain name in `folder`) with its size
    and SHA-256, and the spec values it is valid for. DamagedRun if it is anything else."""
    path = folder / MANIFEST_FILE
    manifest = check_object(path, read_json(path), MANIFEST_FIELDS, required=("files",))
    for name, recorded in manifest["files"].items():
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise DamagedRun(f"{path}: damaged, files holds {shown(name)}, not a file name")
        check_object(
            path, recorded, MANIFEST_FILE_FIELDS, required=tuple(MANIFEST_FILE_FIELDS), where=f"files.{name}: "
        )
    return manifest


def damage(folder: Path) -> str | None:
    """Why `folder` is not a checkpoint to load, or None when every file matches its manifest."""
    if not (folder / MANIFEST_FILE).is_file():
        return f"it has no {MANIFEST_FILE} (its save never finished)"
    try:
        files = read_manifest(folder)["files"]
    except DamagedRun as e:
        return f"its {MANIFEST_FILE} is {str(e).removeprefix(f'{folder / MANIFEST_FILE}: ')}"
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if (size := path.stat().st_size) != recorded["bytes"]:
            return f"{name} has {size} bytes, its manifest says {recorded['bytes']}"
        if file_sha256(path) != recorded["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def check_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    """CheckpointMismatch naming the first key whose value differs from when `folder` was saved."""
    saved = as_named_now(read_manifest(folder).get("spec", {}))
    for key in sorted(saved.keys() | fingerprint.keys()):
        if saved.get(key) != fingerprint.get(key):
            raise CheckpointMismatch(
                f"{folder}: saved with {key}={saved.get(key)!r}, but the run's spec now gives "
                f"{fingerprint.get(key)!r}; a checkpoint of another spec cannot be resumed (put the value "
                f"back, or start a new run)"
            )


def check_resumable(checkpoints_dir: Path, spec: JobSpec) -> None:
    """Before a resume is queued: the checkpoint it will load must belong to this spec. That is the
    newest whose manifest reads (the ranks set one with a damaged manifest aside, and fall back)."""
    for folder in reversed(complete_checkpoints(checkpoints_dir)):
        try:
            read_manifest(folder)
        except DamagedRun:
            continue
        check_fingerprint(folder, spec_fingerprint(spec))
        return
