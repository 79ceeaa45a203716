"""A fine-tuning rank's side of its checkpoints (their layout and manifest: llmbatch/checkpoints.py).

Every rank writes into the same temporary folder (a name derived from the step, so ranks on other
nodes find it on the shared file system), then rank 0 writes the manifest and renames the folder.
At resume rank 0 checks every file against the manifest, newest checkpoint first, and falls back to
the previous one that passes, saying so.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from accelerate.utils import broadcast_object_list
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from llmbatch.checkpoints import (
    CheckpointMismatch,
    check_fingerprint,
    complete_checkpoints,
    damage,
    step_folders,
    write_manifest,
)
from llmbatch.rundir import apply_umask, atomic_write_json, fsync_path, make_folder, read_json, remove_tree

STATE_FILE = "trainer_state.json"


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


@dataclass
class Sharded:
    """The prepared objects of an FSDP run: accelerate's save_state would save the whole model (frozen
    base included) under FSDP, so its checkpoints are written by save_sharded_state instead."""

    model: Any
    optimizer: Any
    scheduler: Any


def save_sharded_state(accelerator, sharded: Sharded, folder: Path) -> None:
    """Under FSDP, every rank: the LoRA weights (model.safetensors, as under DDP) and their AdamW state
    (optimizer.bin, keyed by parameter name) gathered whole and written by rank 0, so they load under any
    rank count; the scheduler (rank 0) and each rank's RNG states, as save_state writes them. Not
    accelerate's FSDP functions: they save a tied output head too, and their load lost step on gloo."""
    weights = full_trainable_state(accelerator, sharded.model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer = get_optimizer_state_dict(sharded.model, unwrapped(sharded.optimizer), options=options)
    if accelerator.is_main_process:
        safetensors.torch.save_file(weights, folder / "model.safetensors")
        torch.save(optimizer, folder / "optimizer.bin")
    save_accelerator_state(str(folder), [], [], [sharded.scheduler], [], accelerator.process_index, accelerator.step)


def load_sharded_state(accelerator, sharded: Sharded, folder: Path) -> None:
    """Every rank reads the whole state and keeps its shard of it."""
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    with torch.no_grad():
        for name, param in sharded.model.named_parameters():
            if param.requires_grad:
                whole = weights[name].to(param.device, param.dtype)
                if isinstance(param, DTensor):  # src_data_rank=None: every rank has it, nothing to send
                    whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
                    param.to_local().copy_(whole.to_local())
                else:
                    param.copy_(whole)
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(sharded.model, unwrapped(sharded.optimizer), optimizer, options=options)
    load_accelerator_state(str(folder), [], [], [sharded.scheduler], [], accelerator.process_index)


def unwrapped(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def full_trainable_state(accelerator, model) -> dict | None:
    """Under FSDP, the trainable weights gathered whole on rank 0 (None elsewhere); every rank calls it.

    One parameter at a time, in the same order on every rank: torch's get_model_state_dict would also
    gather a frozen output head tied to the embeddings (its ignore_frozen_params misses the alias)."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            state[name] = whole.cpu()
    return state if accelerator.is_main_process else None


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
    accelerator,
    checkpoints_dir: Path,
    state: TrainState,
    keep_last: int,
    fingerprint: dict[str, Any],
    sharded: Sharded | None = None,
) -> Path:
    """Every rank calls this at the same step; returns the complete checkpoint folder."""
    final = Path(checkpoints_dir) / f"step-{state.step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        remove_tree(tmp)  # left by an attempt that died while saving this step
        make_folder(tmp)
    accelerator.wait_for_everyone()
    if sharded is None:
        accelerator.save_state(str(tmp))  # rank 0 writes the weights, optimizer, scheduler; each rank its RNGs
    else:
        save_sharded_state(accelerator, sharded, tmp)
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


def resume(
    accelerator, checkpoints_dir: Path, fingerprint: dict[str, Any], sharded: Sharded | None = None
) -> TrainState:
    """Load the newest intact checkpoint into the prepared objects; a fresh TrainState if none.

    Rank 0 checks the checkpoints against their manifests, newest first, moves a damaged one aside
    (saying so) and tells the others which one to load, so every rank loads the same one even if a
    shared file system shows them different listings for a moment. A checkpoint of another spec is
    CheckpointMismatch on every rank.
    """
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
    if sharded is None:
        accelerator.load_state(chosen)
    else:
        load_sharded_state(accelerator, sharded, Path(chosen))
    saved = read_json(Path(chosen) / STATE_FILE)
    # A checkpoint from before a field existed lacks it: the default then.
    return TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
