"""Checkpoints of a fine-tuning run on shared storage.

    checkpoints/step-000123/      complete: renamed into place after every rank finished writing
        model.safetensors         the trainable weights only (LoRA, modules_to_save), from rank 0
        optimizer.bin             \
        scheduler.bin             /  accelerate's save_state, from rank 0
        random_states_<rank>.pkl  one per rank: python, numpy, torch (and CUDA) generators
        trainer_state.json        step, epoch, batch position, tokens, training time, best validation loss
    checkpoints/.step-000123.tmp/ a save in progress, or one an attempt died in; never loaded

Every rank writes into the same temporary folder (a name derived from the step, so ranks on other
nodes find it on the shared file system), then rank 0 renames it: a folder named step-* is complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
from accelerate.utils import broadcast_object_list

from llmbatch.rundir import apply_umask, atomic_write_json, fsync_path, read_json

STATE_FILE = "trainer_state.json"
_COMPLETE = re.compile(r"^step-(\d+)$")


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


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(checkpoints_dir).glob("step-*") if (m := _COMPLETE.match(p.name))]
    return [p for _, p in sorted(found)]


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
        for i, model in enumerate(models):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            state = safetensors.torch.load_file(Path(input_dir) / name)  # load_state_dict copies to the device
            model = accelerator.unwrap_model(model)
            expected = set(trainable_state_dict(model))
            if set(state) != expected:
                raise RuntimeError(f"{input_dir}/{name} does not hold this model's trainable weights "
                                   f"(missing {sorted(expected - set(state))[:3]}, "
                                   f"unexpected {sorted(set(state) - expected)[:3]})")
            model.load_state_dict(state, strict=False)  # strict=False: the frozen weights are not there
        models.clear()  # loaded here: accelerate must not load them again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, checkpoints_dir: Path, state: TrainState, keep_last: int) -> Path:
    """Every rank calls this at the same step; returns the complete checkpoint folder."""
    final = Path(checkpoints_dir) / f"step-{state.step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an attempt that died while saving this step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # rank 0 writes the weights, optimizer, scheduler; each rank its RNGs
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, dataclasses.asdict(state) | {"saved_at": time.time()})
        apply_umask(tmp)  # safetensors writes 0600
        for path in tmp.iterdir():  # the rename must not reach the disk before the data
            fsync_path(path)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_path(final.parent)
        for old in complete_checkpoints(checkpoints_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, checkpoints_dir: Path) -> TrainState:
    """Load the newest complete checkpoint into the prepared objects; a fresh TrainState if none.

    Rank 0 picks the checkpoint and tells the others, so every rank loads the same one even if a
    shared file system shows them different listings for a moment.
    """
    latest = None
    if accelerator.is_main_process:
        for tmp in Path(checkpoints_dir).glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        found = complete_checkpoints(checkpoints_dir)
        latest = str(found[-1]) if found else None
    latest = broadcast_object_list([latest])[0]
    if latest is None:
        return TrainState()
    accelerator.load_state(latest)
    saved = read_json(Path(latest) / STATE_FILE)
    # A checkpoint from before a field existed lacks it: the default then.
    return TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
