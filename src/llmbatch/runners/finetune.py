"""LoRA fine-tuning recipe: what `accelerate launch -m llmbatch.runners.finetune` runs on every rank.

    accelerate launch [--multi_gpu --num_processes N ...] -m llmbatch.runners.finetune --run-dir RUN --attempt A

The same command runs on 1 process, N processes or N nodes: accelerate reads its launch environment,
and with more than one process wraps the model in DDP. `main` reads top to bottom as a sequence of
steps: setup, data, model, optimizer and schedule, resume, the training loop (evaluation and checkpoints
inside it), outputs. Its parts live beside it: lora.py (the model, Liger-Kernel, the loss), evaluation.py
(validation loss and accuracy), train_log.py (train_metrics.jsonl, the trackers, the curve, metrics.json),
packing.py (rows and batches) and checkpoint.py.

Loss. A step's loss is the mean cross-entropy over the target tokens of the whole step (the completion
tokens, or every token with train.loss_on=all): all micro-batches of the accumulation, all ranks. Each
micro-batch adds sum(its token losses) / (target tokens of the step on all ranks). So every token weighs
the same wherever it lands, and packing, which only changes how sequences share rows, leaves the loss
and gradient of a given set of inputs unchanged (up to float summation order). What packing changes is
how many inputs a step holds: rows are full, so a step sees more inputs and an epoch has fewer
steps. (A per-row or per-micro-batch mean would instead weigh the tokens of short inputs more.)

Checkpoints (see checkpoint.py) are saved every train.save_every_steps, every train.save_every_minutes,
and when a SIGUSR2/SIGTERM arrives; the last then exits with PREEMPTED_EXIT, and the node job, which got
the signal too, has the job requeued. A new attempt resumes from the newest complete checkpoint:
weights, optimizer, scheduler, every rank's RNG states, and the position in the data (the shuffle
depends only on seed and epoch, and the consumed micro-batches are skipped), so it continues the
trajectory an uninterrupted run would have followed.

Best adapter and early stopping. Each evaluation with a lower validation loss than all before it writes
adapter-best/; the best loss, its step and the evaluations since are in the checkpoint's train state, so a
resumed run keeps the same best adapter and stops early at the same step as an uninterrupted one.

Trackers (train.report_to) get the numbers of train_metrics.jsonl under the same names: see train_log.py.

Writes into the run folder: train_metrics.jsonl (a row per step, one per evaluation), loss_curve.png,
metrics.json, adapter/ (peft format: usable as model.adapter in an infer spec), adapter-best/ with
validation data, merged/ with train.merge.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, get_scheduler

from llmbatch.checkpoints import CheckpointMismatch
from llmbatch.data import load_inputs
from llmbatch.fingerprint import spec_fingerprint
from llmbatch.heartbeat import start_heartbeat
from llmbatch.metrics import Metric, TrainRow, rejected_metric
from llmbatch.prompts import encode_prompts, plain_prompt_warning
from llmbatch.rundir import RunDir, atomic_write_json, save_folder
from llmbatch.runners.checkpoint import (
    Sharded,
    TrainState,
    checkpoint_trainable_weights_only,
    full_trainable_state,
    resume,
    save_checkpoint,
)
from llmbatch.runners.evaluation import evaluate_accuracy, evaluate_loss
from llmbatch.runners.faults import run_rank
from llmbatch.runners.lora import HeadLoss, fused_head_loss, load_lora_model, token_loss_sum
from llmbatch.runners.model_loading import load_model
from llmbatch.runners.packing import IGNORE, EpochShuffle, collate, pack, to_sequence
from llmbatch.runners.preemption import PREEMPTED_EXIT, PreemptionFlag
from llmbatch.runners.train_log import TrainLog, training_metrics
from llmbatch.spec import JobSpec, load_resolved

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmbatch.runners.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="the run folder (holds spec.yaml)")
    parser.add_argument("--attempt", type=int, default=0, help="which attempt of the job this is (logged)")
    parser.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="testing: save a checkpoint at this step and exit as if preempted",
    )
    return parser.parse_args(argv)


@dataclass
class Data:
    """The tokenized train and validation sets."""

    tokenizer: Any
    train_inputs: list
    train_rows: list
    val_inputs: list
    val_rows: list
    collate: Callable
    loader: DataLoader
    """The train rows, prepared: this rank's share of every epoch, in micro-batches."""


@dataclass
class Training:
    """What the steps of the recipe share. `state` is what a checkpoint keeps; the rest is this attempt's."""

    spec: JobSpec
    run: RunDir
    attempt: int
    accelerator: Accelerator
    data: Data
    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    head_loss: HeadLoss | None
    """Liger-Kernel's fused output head and loss, where it applies (lora.fused_head_loss)."""
    sharded: Sharded | None
    """Under train.sharding: fsdp, what checkpoints save and load through accelerate's FSDP functions."""
    total_steps: int
    fingerprint: dict[str, Any]
    """What this run's checkpoints are valid for."""
    state: TrainState
    log: TrainLog
    tokens: int = 0
    """Tokens this attempt trained on, all ranks (with train_s: its tokens/s)."""
    train_s: float = 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = RunDir.open(args.run_dir)
    spec = load_resolved(run.spec_file)
    started = time.time()

    accelerator, preemption = start_rank(spec, run, args.attempt)
    data = load_data(spec, accelerator)
    total_steps = spec.train.max_steps or math.ceil(spec.train.epochs * len(data.loader) / spec.train.grad_accum_steps)
    model, liger = load_lora_model(spec, accelerator.device)  # a frozen base, trainable LoRA weights
    t = prepare_training(spec, run, accelerator, data, model, liger, total_steps, args.attempt)
    if not train(t, preemption, args.stop_at_step):
        return PREEMPTED_EXIT
    save_outputs(t, started)
    return 0


# --- setup -----------------------------------------------------------------------------------------


def start_rank(spec: JobSpec, run: RunDir, attempt: int) -> tuple[Accelerator, PreemptionFlag]:
    """This rank's accelerator, its preemption flag, its record and heartbeat; the seed set."""
    plugin = fsdp_plugin(spec)
    accelerator = Accelerator(
        fsdp_plugin=plugin,
        # LoRA trains every weight it adds, so no parameter goes unused: skip DDP's search for them.
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=spec.resources.collective_timeout_s)),
        ],
        # The schedule counts optimizer steps; by default accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        log_with=None if spec.train.report_to == "none" else spec.train.report_to,
        project_dir=run.path,  # the trackers' log folder
    )
    if plugin is not None:
        shard_on_cpu(accelerator, plugin)
    preemption = PreemptionFlag(run.preempt_marker(attempt))
    run.record_rank(attempt, accelerator.process_index)
    start_heartbeat(run.rank_record(attempt, accelerator.process_index), spec.resources.collective_timeout_s)
    set_seed(spec.train.seed)  # the same LoRA init on every rank and in every run
    return accelerator, preemption


def fsdp_plugin(spec: JobSpec) -> FullyShardedDataParallelPlugin | None:
    """FSDP2 for train.sharding: fsdp: a unit per decoder block (the model's _no_split_modules), resharded
    after its forward; state dicts gathered whole (checkpoint.py saves only the LoRA weights and their
    optimizer state, so a checkpoint loads under any rank count). On a GPU the matmuls run in bf16 and
    the LoRA gradients are reduced in fp32, as under DDP with autocast; on CPU all in fp32."""
    if spec.train.sharding != "fsdp":
        return None
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
        mixed_precision_policy=(
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if torch.cuda.is_available()
            else None
        ),
    )


def shard_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """FSDP on CPU ranks (gloo), as the tests run it: accelerate (1.16) keeps CPU processes at MULTI_CPU
    and ignores the FSDP plugin there, though FSDP2 itself runs on gloo. On a GPU this changes nothing."""
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin


def load_data(spec: JobSpec, accelerator: Accelerator) -> Data:
    """The tokenizer, the train and validation inputs as rows (make_rows), the train loader."""
    cfg = spec.train
    tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is its own ignored sequence: any token will do
    if (warning := plain_prompt_warning(spec.data, bool(tokenizer.chat_template))) is not None:
        accelerator.print(warning)
    train_inputs = load_inputs(spec.data)
    train_rows = make_rows(spec, tokenizer, train_inputs, "data.path")
    val_inputs = load_inputs(spec.data, val=True) if spec.data.val_path else []
    val_rows = make_rows(spec, tokenizer, val_inputs, "data.val_path")
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    # Its own generator: each new iterator draws a seed from it, and a resumed run starts iterators at
    # other moments than an uninterrupted one, so that draw must not move the global RNG (dropout's).
    loader = DataLoader(
        train_rows,
        batch_size=cfg.micro_batch_size,
        collate_fn=collate_fn,
        sampler=EpochShuffle(len(train_rows), cfg.seed),
        generator=torch.Generator(),
    )
    # accelerate gives each rank every N-th batch; len() is then this rank's share of an epoch.
    loader = accelerator.prepare(loader)
    return Data(tokenizer, train_inputs, train_rows, val_inputs, val_rows, collate_fn, loader)


def prepare_training(
    spec: JobSpec,
    run: RunDir,
    accelerator: Accelerator,
    data: Data,
    model: torch.nn.Module,
    liger: bool,
    total_steps: int,
    attempt: int,
) -> Training:
    """The optimizer and schedule, everything prepared by accelerate, the train state resumed from the
    newest checkpoint (if any), the log opened at its step."""
    cfg = spec.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    sharded = Sharded(model, optimizer, scheduler) if cfg.sharding == "fsdp" else None
    if sharded is not None:
        trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 made them new (sharded) parameters
    # Not under FSDP: the fused kernel reads the head's weight outside its forward, where FSDP has it sharded.
    head_loss = fused_head_loss(accelerator.unwrap_model(model)) if liger and sharded is None else None

    if sharded is None:
        checkpoint_trainable_weights_only(accelerator)
    fingerprint = spec_fingerprint(spec)
    state = resume(accelerator, run.checkpoints_dir, fingerprint, sharded)
    log = TrainLog.open(accelerator, spec, run, state.step, attempt)
    accelerator.print(
        f"finetune: attempt {attempt}, {accelerator.num_processes} process(es), "
        f"{len(data.train_rows)} train rows from {spec.data.path}, {total_steps} steps, "
        + (f"resuming at step {state.step}" if state.step else "starting")
        + (", FSDP2 sharding the base weights" if sharded else "")
        + (f", {spec.model.quantization} base weights" if spec.model.quantization != "none" else "")
        + (", Liger-Kernel's kernels" if liger else "")
        + (" with the fused head and loss" if head_loss else "")
    )
    return Training(
        spec=spec,
        run=run,
        attempt=attempt,
        accelerator=accelerator,
        data=data,
        model=model,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        head_loss=head_loss,
        sharded=sharded,
        total_steps=total_steps,
        fingerprint=fingerprint,
        state=state,
        log=log,
    )


# --- train -----------------------------------------------------------------------------------------


def train(t: Training, preemption: PreemptionFlag, stop_at_step: int | None) -> bool:
    """Steps until the last (or early stopping); False when preempted, after saving a checkpoint.

    Evaluations and checkpoints happen between steps, as train.eval_every_steps, save_every_steps and
    save_every_minutes say."""
    cfg, state, accelerator = t.spec.train, t.state, t.accelerator
    batches = micro_batches(accelerator, t.data.loader, state.epoch, state.batch)
    last_save = time.monotonic()
    t.model.train()
    if t.data.val_rows and state.step == 0:
        evaluate(t)  # the curve's starting point
    while state.step < t.total_steps:
        train_step(t, batches)

        # A signal may reach only some ranks, and clocks differ: all ranks act on the maximum.
        preempted, save_due = accelerator.reduce(
            torch.tensor(
                [
                    preemption.raised or state.step == stop_at_step,
                    time.monotonic() - last_save >= cfg.save_every_minutes * 60,
                ],
                dtype=torch.float32,
                device=accelerator.device,
            ),
            "max",
        ).tolist()
        if preempted:
            # An evaluation due at this step is skipped: the warning period is for saving.
            path = save_checkpoint(accelerator, t.run.checkpoints_dir, state, cfg.keep_last, t.fingerprint, t.sharded)
            accelerator.print(f"finetune: preempted at step {state.step}; saved {path}; exiting {PREEMPTED_EXIT}")
            t.log.finish()
            return False
        if t.data.val_rows and (state.step % cfg.eval_every_steps == 0 or state.step == t.total_steps):
            evaluate(t)
            if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
                accelerator.print(
                    f"finetune: no better validation loss in {state.evals_since_best} evaluations; "
                    f"stopping early at step {state.step} (best: step {state.best_step})"
                )
                break
        if (save_due or state.step % cfg.save_every_steps == 0) and state.step < t.total_steps:
            save_checkpoint(accelerator, t.run.checkpoints_dir, state, cfg.keep_last, t.fingerprint, t.sharded)
            last_save = time.monotonic()
    return True


def train_step(t: Training, batches: Iterator) -> None:
    """One optimizer step over train.grad_accum_steps micro-batches per rank; logs its row."""
    cfg, state, accelerator, model = t.spec.train, t.state, t.accelerator, t.model
    step_started = time.monotonic()
    step_batches = []
    for _ in range(cfg.grad_accum_steps):
        state.epoch, state.batch, batch = next(batches)
        step_batches.append(batch)
    # Normalize by the step's target tokens on all ranks (see the module docstring).
    targets = accelerator.reduce(sum((b["targets"] != IGNORE).sum() for b in step_batches), "sum")
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(step_batches):
        # DDP averages gradients over ranks; scaling by the rank count turns that into the sum.
        last = i == len(step_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):  # sync once per step
            loss = token_loss_sum(model, batch, t.head_loss)
            accelerator.backward(loss * accelerator.num_processes / targets.clamp(min=1))
        loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(t.trainable, cfg.max_grad_norm or math.inf)
    lr = t.scheduler.get_last_lr()[0]
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    state.step += 1

    step_tokens = sum(b["num_tokens"] for b in step_batches)
    loss_sum, step_tokens = accelerator.reduce(torch.stack([loss_sum, step_tokens.float()]), "sum")
    loss = (loss_sum / targets.clamp(min=1)).item()
    state.tokens += int(step_tokens)
    t.tokens += int(step_tokens)
    step_s = time.monotonic() - step_started
    state.train_s += step_s
    t.train_s += step_s
    t.log.log(
        {
            TrainRow.STEP: state.step,
            TrainRow.TOTAL_STEPS: t.total_steps,
            TrainRow.EPOCH: state.epoch,
            TrainRow.LOSS: loss,
            TrainRow.LR: lr,
            TrainRow.GRAD_NORM: grad_norm.item(),
            TrainRow.TOKENS: state.tokens,
            TrainRow.ELAPSED_S: round(state.train_s, 3),
            TrainRow.ATTEMPT: t.attempt,
        }
    )
    if state.step % cfg.log_every_steps == 0:
        accelerator.print(
            f"  step {state.step}/{t.total_steps}: loss {loss:.4f}, lr {lr:.3g}, {t.tokens / t.train_s:.0f} tokens/s"
        )


def evaluate(t: Training) -> None:
    """Validation loss (and accuracy), logged; adapter-best/ when the loss is lower than all before it."""
    spec, state, accelerator = t.spec, t.state, t.accelerator
    val_loss = evaluate_loss(
        accelerator, t.model, t.data.val_rows, t.data.collate, spec.train.micro_batch_size, t.head_loss
    )
    row = {TrainRow.STEP: state.step, TrainRow.VAL_LOSS: val_loss, TrainRow.VAL_PPL: math.exp(min(val_loss, 50.0))}
    if spec.train.eval_accuracy:
        row[TrainRow.VAL_ACCURACY] = evaluate_accuracy(accelerator, t.model, t.data.tokenizer, spec, t.data.val_inputs)
    t.log.log(row)
    if accelerator.is_main_process:
        t.log.write_loss_curve()
    accelerator.print(
        f"  step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != TrainRow.STEP)
    )
    # Every rank has the same (reduced) loss, so every rank takes the same branch.
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
        save_adapter(t, t.run.adapter_best_dir)
    else:
        state.evals_since_best += 1


# --- outputs ---------------------------------------------------------------------------------------


def save_outputs(t: Training, started: float) -> None:
    """adapter/, metrics.json, the loss curve and merged/ (rank 0), then the end of training on every
    rank (the process group left to the rank's exit: faults.run_rank)."""
    accelerator, state, run = t.accelerator, t.state, t.run
    save_adapter(t, run.adapter_dir)
    if accelerator.is_main_process:
        metrics = training_metrics(
            t.log.rows(),
            state,
            accelerator.num_processes,
            len(t.data.train_inputs),
            t.tokens,
            t.train_s,
            time.time() - started,
        )
        metrics |= rejected_metric(run) | {Metric.STOPPED_EARLY: state.step < t.total_steps}
        atomic_write_json(run.metrics_file, metrics)
        t.log.write_loss_curve()
        if t.spec.train.merge:
            save_merged(t)
        accelerator.print(f"finetune: done at step {state.step}; adapter in {run.adapter_dir}")
        run.release_space()  # the run is complete: nothing more to report a full disk for
    accelerator.wait_for_everyone()
    t.log.finish()


def save_adapter(t: Training, folder) -> None:
    """The LoRA weights in peft's format, written by rank 0. Every rank calls this: under FSDP each holds a
    shard of them, gathered here."""
    accelerator = t.accelerator
    weights = full_trainable_state(accelerator, t.model) if t.sharded else None
    if accelerator.is_main_process:
        save_pretrained = accelerator.unwrap_model(t.model).save_pretrained
        save_folder(folder, lambda out: save_pretrained(out, state_dict=weights))


def save_merged(t: Training) -> None:
    """merged/: the base weights with adapter/ merged in, read anew from the model folder in model.dtype
    (bf16 on a GPU): the ranks' model may be sharded (FSDP) or in 4 bits (nf4), and it keeps the LoRA
    layers for a later evaluation either way."""
    dtype = t.spec.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if t.accelerator.device.type == "cuda" else "float32"
    model_spec = dataclasses.replace(t.spec.model, dtype=dtype, adapter=str(t.run.adapter_dir), quantization="none")
    merged, _ = load_model(model_spec, torch.device("cpu"))
    tokenizer = t.data.tokenizer
    save_folder(t.run.merged_dir, lambda out: (merged.save_pretrained(out), tokenizer.save_pretrained(out)))


# --- data ------------------------------------------------------------------------------------------


class TooShortForData(Exception):
    """train.seq_len leaves no target token of any input: training would learn nothing."""


def make_rows(spec: JobSpec, tokenizer, inputs, source: str) -> list:
    """Inputs -> rows of token sequences: packed up to seq_len, or one per row (padded at batching).

    Prompts are encoded as the inference runner encodes them; the completion is the reference + EOS.
    Sequences longer than seq_len are cut at the end, and the log counts them; one left without any
    target token (a prompt of seq_len tokens or more) is left out, since it would only add a zero loss.
    Packing takes the inputs in a seeded shuffle, so a row mixes inputs from all over the file.
    """
    cfg = spec.train
    prompts = encode_prompts(tokenizer, inputs, spec.data)
    completions = [
        tokenizer(ex.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for ex in inputs
    ]
    sequences = [to_sequence(p, c, cfg.seq_len, cfg.loss_on) for p, c in zip(prompts, completions)]
    cut = sum(len(p) + len(c) > cfg.seq_len + 1 for p, c in zip(prompts, completions))
    learnable = [seq for seq in sequences if any(t != IGNORE for t in seq.targets)]
    if sequences and not learnable:
        raise TooShortForData(
            f"train.seq_len: {cfg.seq_len} tokens leave no target token of any input in "
            f"{source} (prompts take up to {max(map(len, prompts))} tokens); raise it"
        )
    if cut:
        print(
            f"finetune: {cut} of {len(inputs)} inputs of {source} are longer than train.seq_len="
            f"{cfg.seq_len} tokens and are cut at the end; {len(sequences) - len(learnable)} of them keep no "
            f"target token and are left out",
            flush=True,
        )
    sequences = learnable
    if not cfg.packing:
        return [[seq] for seq in sequences]
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return pack([sequences[i] for i in order], cfg.seq_len)


def micro_batches(accelerator, loader, epoch: int, start: int):
    """(epoch, micro-batches consumed in it, batch), from micro-batch `start` of `epoch` on, forever.

    The order of an epoch depends only on (seed, epoch) (EpochShuffle), so skipping the batches a
    previous attempt consumed puts a resumed run exactly where it stopped.
    """
    while True:
        loader.set_epoch(epoch)
        epoch_batches = accelerator.skip_first_batches(loader, start) if start else loader
        for index, batch in enumerate(epoch_batches, start + 1):
            yield epoch, index, batch
        epoch, start = epoch + 1, 0


if __name__ == "__main__":
    run_rank(main, parse_args(sys.argv[1:]).run_dir, spec_errors=(TooShortForData, CheckpointMismatch))
