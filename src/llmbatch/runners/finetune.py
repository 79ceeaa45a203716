"""LoRA fine-tuning recipe: what `accelerate launch -m llmbatch.runners.finetune` runs on every rank.

    accelerate launch [--multi_gpu --num_processes N ...] -m llmbatch.runners.finetune --run-dir RUN --attempt A

The same command runs on 1 process, N processes or N nodes: accelerate reads its launch environment,
and with more than one process wraps the model in DDP. The recipe reads top to bottom: setup, data,
model, optimizer and schedule, resume, the training loop (evaluation and checkpoints inside it), outputs.

Loss. A step's loss is the mean cross-entropy over the target tokens of the whole step (the completion
tokens, or every token with train.loss_on=all): all micro-batches of the accumulation, all ranks. Each
micro-batch adds sum(its token losses) / (target tokens of the step on all ranks). So every token weighs
the same wherever it lands, and packing, which only changes how sequences share rows, leaves the loss
and gradient of a given set of examples unchanged (up to float summation order). What packing changes is
how many examples a step holds: rows are full, so a step sees more examples and an epoch has fewer
steps. (A per-row or per-micro-batch mean would instead weigh the tokens of short examples more.)

Checkpoints (see checkpoint.py) are saved every train.save_every_steps, every train.save_every_minutes,
and when a SIGUSR2/SIGTERM arrives; the last then exits with PREEMPTED_EXIT, and the node job, which got
the signal too, has the job requeued. A new attempt resumes from the newest complete checkpoint:
weights, optimizer, scheduler, every rank's RNG states, and the position in the data (the shuffle
depends only on seed and epoch, and the consumed micro-batches are skipped), so it continues the
trajectory an uninterrupted run would have followed.

Best adapter and early stopping. Each evaluation with a lower validation loss than all before it writes
adapter-best/; the best loss, its step and the evaluations since are in the checkpoint's train state, so a
resumed run keeps the same best adapter and stops early at the same step as an uninterrupted one.

Trackers (train.report_to) get the numbers of train_metrics.jsonl under the same names, through
accelerate's trackers, offline, in the run folder: tensorboard/ (event files), mlruns/ (MLflow's file
store, no server), wandb/ (offline runs, `wandb sync` uploads them). A resumed attempt opens a new
TensorBoard event file that purges the steps after the checkpoint, which a dead attempt may have
logged, so TensorBoard shows each step once; MLflow and wandb get one run per attempt.

Writes into the run folder: train_metrics.jsonl (a row per step, one per evaluation), loss_curve.png,
metrics.json, adapter/ (peft format: usable as model.adapter in an infer spec), adapter-best/ with
validation data, merged/ with train.merge.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import InitProcessGroupKwargs, set_seed
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from llmbatch import scoring
from llmbatch.checkpoints import CheckpointMismatch
from llmbatch.data import load_examples
from llmbatch.fingerprint import spec_fingerprint
from llmbatch.heartbeat import start_heartbeat
from llmbatch.metrics import Metric, read_train_metrics
from llmbatch.prompts import encode_prompts
from llmbatch.rundir import RunDir, append_jsonl, atomic_write, atomic_write_json, save_folder
from llmbatch.runners.checkpoint import checkpoint_trainable_weights_only, resume, save_checkpoint
from llmbatch.runners.faults import run_rank
from llmbatch.runners.generation import Decoder
from llmbatch.runners.model_loading import DTYPES
from llmbatch.runners.packing import IGNORE, EpochShuffle, collate, pack, to_sequence
from llmbatch.runners.preemption import PREEMPTED_EXIT, PreemptionFlag
from llmbatch.spec import JobSpec, TrainSpec, load_resolved

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = RunDir.open(args.run_dir)
    spec = load_resolved(run.spec_file)
    cfg = spec.train
    started = time.time()

    # --- setup -------------------------------------------------------------------------------------
    accelerator = Accelerator(
        # LoRA trains every weight it adds, so no parameter goes unused: skip DDP's search for them.
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=spec.resources.collective_timeout_s)),
        ],
        # The schedule counts optimizer steps; by default accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=run.path,  # the trackers' log folder
    )
    preemption = PreemptionFlag(run.preempt_marker(args.attempt))
    run.record_rank(args.attempt, accelerator.process_index)
    start_heartbeat(run.rank_record(args.attempt, accelerator.process_index), spec.resources.collective_timeout_s)
    set_seed(cfg.seed)  # the same LoRA init on every rank and in every run
    metrics_log = run.train_metrics_file

    # --- data --------------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is its own ignored sequence: any token will do
    train_examples = load_examples(spec.data)
    train_rows = make_rows(spec, tokenizer, train_examples, "data.path")
    val_examples = load_examples(spec.data, spec.data.val_path) if spec.data.val_path else []
    val_rows = make_rows(spec, tokenizer, val_examples, "data.val_path")
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    # Its own generator: each new iterator draws a seed from it, and a resumed run starts iterators at
    # other moments than an uninterrupted one, so that draw must not move the global RNG (dropout's).
    train_loader = DataLoader(
        train_rows,
        batch_size=cfg.micro_batch_size,
        collate_fn=collate_fn,
        sampler=EpochShuffle(len(train_rows), cfg.seed),
        generator=torch.Generator(),
    )
    # accelerate gives each rank every N-th batch; len() is then this rank's share of an epoch.
    train_loader = accelerator.prepare(train_loader)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_loader) / cfg.grad_accum_steps)

    # --- model: a frozen base, trainable LoRA weights ----------------------------------------------
    model, liger = load_lora_model(spec, accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # --- optimizer and schedule --------------------------------------------------------------------
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    head_loss = fused_head_loss(accelerator.unwrap_model(model)) if liger else None  # after prepare: on its device

    # --- resume ------------------------------------------------------------------------------------
    checkpoint_trainable_weights_only(accelerator)
    fingerprint = spec_fingerprint(spec)  # what this run's checkpoints are valid for
    state = resume(accelerator, run.checkpoints_dir, fingerprint)
    if accelerator.is_main_process:
        # Rows past the checkpoint were logged by an attempt that died: this one logs those steps again.
        keep = [row for row in read_train_metrics(metrics_log) if row["step"] <= state.step] if state.step else []
        atomic_write(metrics_log, "".join(json.dumps(row) + "\n" for row in keep))
    start_tracker(accelerator, spec, run, state.step, args.attempt)
    accelerator.print(
        f"finetune: attempt {args.attempt}, {accelerator.num_processes} process(es), "
        f"{len(train_rows)} train rows from {spec.data.path}, {total_steps} steps, "
        + (f"resuming at step {state.step}" if state.step else "starting")
        + (", Liger-Kernel's kernels" if liger else "")
        + (" with the fused head and loss" if head_loss else "")
    )

    def log(row: dict) -> None:
        if accelerator.is_main_process:
            append_jsonl(metrics_log, row)
        accelerator.log({k: v for k, v in row.items() if k not in ("step", "total_steps", "attempt")}, step=row["step"])

    def evaluate_and_log() -> None:
        row = {"step": state.step, "val_loss": evaluate_loss(accelerator, model, val_rows, collate_fn, cfg, head_loss)}
        row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
        if cfg.eval_accuracy:
            row["val_accuracy"] = evaluate_accuracy(accelerator, model, tokenizer, spec, val_examples)
        log(row)
        if accelerator.is_main_process:
            write_loss_curve(metrics_log, run.loss_curve_file)
        accelerator.print(f"  step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
        # Every rank has the same (reduced) loss, so every rank takes the same branch.
        if state.best_val_loss is None or row["val_loss"] < state.best_val_loss:
            state.best_val_loss, state.best_step, state.evals_since_best = row["val_loss"], state.step, 0
            if accelerator.is_main_process:
                save_folder(run.adapter_best_dir, accelerator.unwrap_model(model).save_pretrained)
        else:
            state.evals_since_best += 1

    # --- train -------------------------------------------------------------------------------------
    batches = micro_batches(accelerator, train_loader, state.epoch, state.batch)
    attempt_tokens, attempt_train_s, last_save = 0, 0.0, time.monotonic()
    model.train()
    if val_rows and state.step == 0:
        evaluate_and_log()  # the curve's starting point
    while state.step < total_steps:
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
                loss = token_loss_sum(model, batch, head_loss)
                accelerator.backward(loss * accelerator.num_processes / targets.clamp(min=1))
            loss_sum += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        step_tokens = sum(b["num_tokens"] for b in step_batches)
        loss_sum, step_tokens = accelerator.reduce(torch.stack([loss_sum, step_tokens.float()]), "sum")
        loss = (loss_sum / targets.clamp(min=1)).item()
        state.tokens += int(step_tokens)
        attempt_tokens += int(step_tokens)
        step_s = time.monotonic() - step_started
        state.train_s += step_s
        attempt_train_s += step_s
        log(
            {
                "step": state.step,
                "total_steps": total_steps,
                "epoch": state.epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens": state.tokens,
                "elapsed_s": round(state.train_s, 3),
                "attempt": args.attempt,
            }
        )
        if state.step % cfg.log_every_steps == 0:
            accelerator.print(
                f"  step {state.step}/{total_steps}: loss {loss:.4f}, lr {lr:.3g}, "
                f"{attempt_tokens / attempt_train_s:.0f} tokens/s"
            )

        # A signal may reach only some ranks, and clocks differ: all ranks act on the maximum.
        preempted, save_due = accelerator.reduce(
            torch.tensor(
                [
                    preemption.raised or state.step == args.stop_at_step,
                    time.monotonic() - last_save >= cfg.save_every_minutes * 60,
                ],
                dtype=torch.float32,
                device=accelerator.device,
            ),
            "max",
        ).tolist()
        if preempted:
            # An evaluation due at this step is skipped: the warning period is for saving.
            path = save_checkpoint(accelerator, run.checkpoints_dir, state, cfg.keep_last, fingerprint)
            accelerator.print(f"finetune: preempted at step {state.step}; saved {path}; exiting {PREEMPTED_EXIT}")
            accelerator.end_training()
            return PREEMPTED_EXIT
        if val_rows and (state.step % cfg.eval_every_steps == 0 or state.step == total_steps):
            evaluate_and_log()
            if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
                accelerator.print(
                    f"finetune: no better validation loss in {state.evals_since_best} evaluations; "
                    f"stopping early at step {state.step} (best: step {state.best_step})"
                )
                break
        if (save_due or state.step % cfg.save_every_steps == 0) and state.step < total_steps:
            save_checkpoint(accelerator, run.checkpoints_dir, state, cfg.keep_last, fingerprint)
            last_save = time.monotonic()

    # --- outputs -----------------------------------------------------------------------------------
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_folder(run.adapter_dir, unwrapped.save_pretrained)
        rows = read_train_metrics(metrics_log)
        metrics = training_metrics(
            rows,
            state,
            accelerator.num_processes,
            len(train_examples),
            attempt_tokens,
            attempt_train_s,
            time.time() - started,
        )
        atomic_write_json(run.metrics_file, metrics | {Metric.STOPPED_EARLY: state.step < total_steps})
        write_loss_curve(metrics_log, run.loss_curve_file)
        if cfg.merge:
            merged = unwrapped.merge_and_unload()
            save_folder(run.merged_dir, lambda out: (merged.save_pretrained(out), tokenizer.save_pretrained(out)))
        accelerator.print(f"finetune: done at step {state.step}; adapter in {run.adapter_dir}")
        run.release_space()  # the run is complete: nothing more to report a full disk for
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


# --- data ------------------------------------------------------------------------------------------


class TooShortForData(Exception):
    """train.seq_len leaves no target token of any example: training would learn nothing."""


def make_rows(spec: JobSpec, tokenizer, examples, source: str) -> list:
    """Examples -> rows of token sequences: packed up to seq_len, or one per row (padded at batching).

    Prompts are encoded as the inference runner encodes them; the completion is the reference + EOS.
    Sequences longer than seq_len are cut at the end, and the log counts them; one left without any
    target token (a prompt of seq_len tokens or more) is left out, since it would only add a zero loss.
    Packing takes the examples in a seeded shuffle, so a row mixes examples from all over the file.
    """
    cfg = spec.train
    prompts = encode_prompts(tokenizer, examples, spec.data)
    completions = [
        tokenizer(ex.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for ex in examples
    ]
    sequences = [to_sequence(p, c, cfg.seq_len, cfg.loss_on) for p, c in zip(prompts, completions)]
    cut = sum(len(p) + len(c) > cfg.seq_len + 1 for p, c in zip(prompts, completions))
    learnable = [seq for seq in sequences if any(t != IGNORE for t in seq.targets)]
    if sequences and not learnable:
        raise TooShortForData(
            f"train.seq_len: {cfg.seq_len} tokens leave no target token of any example in "
            f"{source} (prompts take up to {max(map(len, prompts))} tokens); raise it"
        )
    if cut:
        print(
            f"finetune: {cut} of {len(examples)} examples of {source} are longer than train.seq_len="
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


# --- model -----------------------------------------------------------------------------------------


def load_lora_model(spec: JobSpec, device: torch.device):
    """The base model, frozen (bf16 on GPU unless model.dtype says otherwise), with LoRA adapters, and
    whether Liger-Kernel's kernels were patched into it (use_liger_kernels).

    peft keeps the adapter weights in float32 whatever the base dtype, so the optimizer updates
    full-precision weights; accelerate's bf16 autocast covers the matmuls.
    """
    dtype = DTYPES.get(spec.model.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(spec.model.path, dtype=dtype)
    liger = use_liger_kernels(spec.train, model, device)
    if spec.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and with DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = spec.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), liger  # get_peft_model freezes every base weight


def use_liger_kernels(cfg: TrainSpec, model, device: torch.device) -> bool:
    """Patch Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels into `model` where they apply.

    They apply with train.liger: auto, on CUDA (Triton kernels), with `liger_kernel` installed, and for
    an architecture it knows (Llama, Qwen2, Mistral, ...). They keep less for the backward pass than
    the eager modules (SwiGLU recomputes its product), so a step needs less memory. Its fused linear
    cross-entropy is not patched in here: token_loss_sum calls it itself (fused_head_loss), since it
    needs the targets of only the positions it keeps.
    """
    if cfg.liger == "off" or device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True


class HeadLoss:
    """The output head and the loss in one linear cross-entropy call that takes the head's input.

    `linear_cross_entropy(weight, hidden [N, hidden], targets [N], bias)` is Liger-Kernel's fused kernel
    (fused_head_loss). The head's input is the final norm's output, taken by a forward hook while the
    model runs with no position kept for its head: the model's own outputs cannot carry it, since
    accelerate converts every output of a mixed-precision model to float32, and output_hidden_states
    would convert them all.
    """

    def __init__(self, model, linear_cross_entropy):
        self.head = model.get_output_embeddings()
        self.linear_cross_entropy = linear_cross_entropy
        self.hidden: torch.Tensor | None = None
        model.get_decoder().norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        if self.hidden is not None:  # armed by __call__ only: generation leaves nothing behind
            self.hidden = output

    def __call__(self, model, inputs: dict, keep: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.hidden = torch.empty(0)
        try:
            model(**inputs, logits_to_keep=keep[:0])
            hidden = self.hidden[:, keep].flatten(0, 1).to(self.head.weight.dtype)
        finally:
            self.hidden = None
        return self.linear_cross_entropy(self.head.weight, hidden, targets[:, keep].flatten(), self.head.bias)


def fused_head_loss(model) -> HeadLoss | None:
    """Liger-Kernel's fused linear cross-entropy for the output head and the loss, where it applies.

    It computes the head's matmul and the cross-entropy in chunks, so the full [tokens, vocabulary]
    logits (and their float32 copy) never exist: the biggest activation of a LoRA step. Only for a
    plain linear output head on CUDA (not one LoRA or modules_to_save trains) after a decoder with a
    final `norm`; None otherwise: the plain path. Called once use_liger_kernels has applied.
    """
    head = model.get_output_embeddings()
    if (
        head.weight.device.type != "cuda"
        or type(head) is not torch.nn.Linear
        or not isinstance(getattr(model.get_decoder(), "norm", None), torch.nn.Module)
    ):
        return None
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return HeadLoss(model, LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum"))


def token_loss_sum(model, batch: dict[str, torch.Tensor], head_loss: HeadLoss | None = None) -> torch.Tensor:
    """Sum of the cross-entropy over a batch's target tokens.

    No attention mask, only position ids (see packing.py): that is how transformers keeps attention
    inside each packed sequence. use_cache=False, as a cache would also turn that detection off.
    With `head_loss` (fused_head_loss) the model stops before its head and `head_loss` does head and loss.
    """
    targets = batch["targets"]
    # The output head only at positions where some row has a target: with loss_on: completion the
    # prompt positions never get full-vocabulary logits, the biggest activation of a step.
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if head_loss is not None:
        return head_loss(model, inputs, keep, targets)
    logits = model(**inputs, logits_to_keep=keep).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE, reduction="sum"
    )


# --- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(accelerator, model, rows, collate_fn, cfg, head_loss: HeadLoss | None) -> float:
    """Mean loss per target token over the whole validation set.

    Each rank takes every N-th row, unprepared: a prepared loader would repeat rows to even out the
    ranks, counting them twice. The unwrapped model runs no DDP collectives, so uneven shares are fine.
    """
    model = accelerator.unwrap_model(model)
    model.eval()
    shard = rows[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(2, device=accelerator.device)
    for start in range(0, len(shard), cfg.micro_batch_size):
        batch = {
            k: v.to(accelerator.device) for k, v in collate_fn(shard[start : start + cfg.micro_batch_size]).items()
        }
        totals += torch.stack([token_loss_sum(model, batch, head_loss), (batch["targets"] != IGNORE).sum().float()])
    model.train()
    loss_sum, targets = accelerator.reduce(totals, "sum").tolist()
    return loss_sum / max(targets, 1)


def evaluate_accuracy(accelerator, model, tokenizer, spec: JobSpec, examples) -> float:
    """Share of validation answers that the inference runner's greedy decoding gets right.

    Each rank answers every N-th example. Generation runs on the base model with the LoRA layers in
    it: the peft wrapper would hide the decoder's generation settings from generate().
    """
    base = accelerator.unwrap_model(model).get_base_model()
    saved_config = base.generation_config  # the decoder replaces it; merged/ must keep the model's own
    base.eval()
    decoder = Decoder(base, tokenizer, dataclasses.replace(spec.generation, do_sample=False))
    shard = examples[accelerator.process_index :: accelerator.num_processes]
    prompts = encode_prompts(tokenizer, shard, spec.data)
    correct = 0
    for start in range(0, len(shard), spec.train.micro_batch_size):
        chunk = shard[start : start + spec.train.micro_batch_size]
        completions = decoder.complete(prompts[start : start + len(chunk)], [ex.id for ex in chunk])
        correct += sum(scoring.is_correct(c.text, ex.reference) for c, ex in zip(completions, chunk))
    base.generation_config = saved_config
    base.train()
    totals = accelerator.reduce(torch.tensor([correct, len(shard)], device=accelerator.device), "sum")
    return totals[0].item() / max(totals[1].item(), 1)


# --- outputs ---------------------------------------------------------------------------------------


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


def write_loss_curve(metrics_log: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_train_metrics(metrics_log)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
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
    atomic_write(png, buffer.getvalue())


def training_metrics(
    rows: list[dict],
    state,
    world_size: int,
    train_examples: int,
    attempt_tokens: int,
    attempt_train_s: float,
    wall_s: float,
) -> dict:
    """metrics.json: the run's numbers; tokens/s and wall time are this attempt's."""
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    metrics = {
        Metric.STEPS: state.step,
        Metric.WORLD_SIZE: world_size,
        Metric.EXAMPLES: train_examples,
        Metric.TOKENS: state.tokens,
        Metric.TRAIN_S: round(state.train_s, 2),
        Metric.WALL_S: round(wall_s, 2),
        Metric.TRAIN_TOKENS_PER_S: attempt_tokens / attempt_train_s if attempt_train_s else None,
    }
    if steps:
        metrics |= {Metric.TRAIN_LOSS_FIRST: steps[0]["loss"], Metric.TRAIN_LOSS_LAST: steps[-1]["loss"]}
    if evals:
        metrics |= {
            Metric.VAL_LOSS_FIRST: evals[0]["val_loss"],
            Metric.VAL_LOSS_LAST: evals[-1]["val_loss"],
            Metric.VAL_LOSS_BEST: state.best_val_loss,
            Metric.BEST_STEP: state.best_step,
            Metric.VAL_PPL_LAST: evals[-1]["val_ppl"],
        }
        if "val_accuracy" in evals[-1]:
            metrics |= {
                Metric.VAL_ACCURACY_FIRST: evals[0]["val_accuracy"],
                Metric.VAL_ACCURACY_LAST: evals[-1]["val_accuracy"],
            }
    return metrics


if __name__ == "__main__":
    run_rank(main, parse_args(sys.argv[1:]).run_dir, spec_errors=(TooShortForData, CheckpointMismatch))
