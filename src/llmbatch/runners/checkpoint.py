"""Checkpoints of a fine-tuning run on shared storage.

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

Every rank writes into the same temporary folder (a name derived from the step, so ranks on other
nodes find it on the shared file system), then rank 0 writes the manifest and renames the folder.
The rename alone is not proof: a file system may put a rename on disk before the data (a node that
dies then leaves a step-* folder with a torn file). So `resume` checks every file against the
manifest, newest checkpoint first, and falls back to the previous one that passes, saying so.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbatch.fingerprint import file_sha256, spec_fingerprint
from llmbatch.rundir import (
    COUNT,
    OBJECT,
    TEXT,
    DamagedRun,
    apply_umask,
    atomic_write_json,
    check_object,
    fsync_path,
    make_folder,
    read_json,
    remove_tree,
    shown,
)
from llmbatch.spec import JobSpec

# torch, accelerate and safetensors are imported where they are used: `resume` on the command line
# checks checkpoints through this module and must start without them.

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


class CheckpointMismatch(ValueError):
    """The run's checkpoint was saved under another spec (LoRA shape, model or data): one line."""


@dataclass
class TrainState:
    """Where training stands; with accelerate's state, all a resumed run needs to continue exactly."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batch: int = 0
    """Micro-batches of `epoch` this rank has consumed (the same count on every rank)."""
    tokens: int = 0
    """Tokens trained on, all ranks, padding excluded."""
    train_s: float = 0.0
    """Time spent in training steps, over all attempts."""
    best_val_loss: float | None = None
    best_step: int | None = None
    """The evaluation adapter-best/ is from."""
    evals_since_best: int = 0
    """Evaluations in a row without a better validation loss (for early stopping)."""


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
    saved = read_manifest(folder).get("spec", {})
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


def trainable_state_dict(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def checkpoint_trainable_weights_only(accelerator) -> None:
    """Make save_state/load_state handle only the trainable weights.

    The frozen base weights are in the model folder already; saving them would cost the base model's
    full size per checkpoint (about 16 GB for an 8B model in bf16).
    """

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            weights[i] = trainable_state_dict(accelerator.unwrap_model(model))

    def load_hook(models, input_dir):
        import safetensors.torch

        for i, model in enumerate(models):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            state = safetensors.torch.load_file(Path(input_dir) / name)  # load_state_dict copies to the device
            model = accelerator.unwrap_model(model)
            expected = set(trainable_state_dict(model))
            if set(state) != expected:
                raise RuntimeError(
                    f"{input_dir}/{name} does not hold this model's trainable weights "
                    f"(missing {sorted(expected - set(state))[:3]}, "
                    f"unexpected {sorted(set(state) - expected)[:3]})"
                )
            model.load_state_dict(state, strict=False)  # strict=False: the frozen weights are not there
        models.clear()  # loaded here: accelerate must not load them again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator, checkpoints_dir: Path, state: TrainState, keep_last: int, fingerprint: dict[str, Any]
) -> Path:
    """Every rank calls this at the same step; returns the complete checkpoint folder."""
    final = Path(checkpoints_dir) / f"step-{state.step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        remove_tree(tmp)  # left by an attempt that died while saving this step
        make_folder(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # rank 0 writes the weights, optimizer, scheduler; each rank its RNGs
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, dataclasses.asdict(state) | {"saved_at": time.time()})
        apply_umask(tmp)  # safetensors writes 0600
        for path in tmp.iterdir():  # the rename must not reach the disk before the data
            fsync_path(path)
        write_manifest(tmp, fingerprint)  # last: without it the folder is not a checkpoint
        remove_tree(final)
        os.rename(tmp, final)
        fsync_path(final.parent)
        for old in complete_checkpoints(checkpoints_dir)[:-keep_last]:
            remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, checkpoints_dir: Path, fingerprint: dict[str, Any]) -> TrainState:
    """Load the newest intact checkpoint into the prepared objects; a fresh TrainState if none.

    Rank 0 checks the checkpoints against their manifests, newest first, moves a damaged one aside
    (saying so) and tells the others which one to load, so every rank loads the same one even if a
    shared file system shows them different listings for a moment. A checkpoint of another spec is
    CheckpointMismatch on every rank.
    """
    from accelerate.utils import broadcast_object_list

    chosen = mismatch = None
    if accelerator.is_main_process:
        for tmp in Path(checkpoints_dir).glob(".step-*.tmp"):
            remove_tree(tmp)
        for folder in reversed(step_folders(checkpoints_dir)):
            if (why := damage(folder)) is None:
                chosen = str(folder)
                break
            aside = folder.with_name(f".{folder.name}.damaged")
            remove_tree(aside)
            os.rename(folder, aside)
            print(
                f"finetune: checkpoint {folder.name} is damaged ({why}); moved it to {aside.name} and "
                f"falling back to the previous complete checkpoint",
                flush=True,
            )
        if chosen is not None:
            try:
                check_fingerprint(Path(chosen), fingerprint)
            except CheckpointMismatch as e:
                mismatch = str(e)
    chosen, mismatch = broadcast_object_list([chosen, mismatch])
    if mismatch is not None:
        raise CheckpointMismatch(mismatch)
    if chosen is None:
        return TrainState()
    accelerator.load_state(chosen)
    saved = read_json(Path(chosen) / STATE_FILE)
    # A checkpoint from before a field existed lacks it: the default then.
    return TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
