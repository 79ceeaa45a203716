"""Evaluation during fine-tuning: the validation loss, and the accuracy of greedy answers to the
validation prompts (train.eval_accuracy), each over the whole validation set, spread over the ranks.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from accelerate.utils import DistributedType

from llmbatch import scoring
from llmbatch.prompts import encode_prompts
from llmbatch.runners.generation import Decoder
from llmbatch.runners.lora import HeadLoss, token_loss_sum
from llmbatch.runners.packing import IGNORE
from llmbatch.spec import JobSpec


@torch.no_grad()
def evaluate_loss(accelerator, model, rows, collate_fn, batch_size: int, head_loss: HeadLoss | None) -> float:
    """Mean loss per target token over the whole validation set.

    Each rank takes every N-th row, unprepared: a prepared loader would repeat rows to even out the
    ranks, counting them twice. The unwrapped model runs no DDP collectives, but under FSDP each forward
    gathers weights from every rank, so all ranks run as many batches (lockstep_chunks).
    """
    model = accelerator.unwrap_model(model)
    model.eval()
    shard = rows[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(2, device=accelerator.device)
    for chunk in lockstep_chunks(accelerator, rows, shard, batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate_fn(chunk or rows[:1]).items()}
        loss = token_loss_sum(model, batch, head_loss)
        if chunk:
            totals += torch.stack([loss, (batch["targets"] != IGNORE).sum().float()])
    model.train()
    loss_sum, targets = accelerator.reduce(totals, "sum").tolist()
    return loss_sum / max(targets, 1)


def evaluate_accuracy(accelerator, model, tokenizer, spec: JobSpec, inputs) -> float:
    """Share of validation answers that the inference runner's greedy decoding gets right (by
    output.scoring's rule, as inference scores them).

    Each rank answers every N-th input. Generation runs on the base model with the LoRA layers in
    it: the peft wrapper would hide the decoder's generation settings from generate().
    """
    base = accelerator.unwrap_model(model).get_base_model()
    saved_config = base.generation_config  # the decoder replaces it; merged/ must keep the model's own
    base.eval()
    # synced: under FSDP every rank must run as many forwards (see Decoder).
    sharded = accelerator.distributed_type == DistributedType.FSDP
    decoder = Decoder(base, tokenizer, dataclasses.replace(spec.generation, do_sample=False), synced=sharded)
    shard = inputs[accelerator.process_index :: accelerator.num_processes]
    correct = 0
    for chunk in lockstep_chunks(accelerator, inputs, shard, spec.train.micro_batch_size):
        prompts = encode_prompts(tokenizer, chunk or inputs[:1], spec.data)
        completions = decoder.complete(prompts, [ex.id for ex in chunk or inputs[:1]])
        correct += sum(
            scoring.is_correct(c.text, ex.reference, spec.output.scoring) for c, ex in zip(completions, chunk)
        )
    base.generation_config = saved_config
    base.train()
    totals = accelerator.reduce(torch.tensor([correct, len(shard)], device=accelerator.device), "sum")
    return totals[0].item() / max(totals[1].item(), 1)


def lockstep_chunks(accelerator, items: list, shard: list, batch_size: int):
    """`shard` (this rank's every N-th of `items`) in batches. Under FSDP, padded with empty ones to the
    largest rank's count: a rank with an empty batch runs a forward on the first item and counts nothing."""
    count = math.ceil(len(shard) / batch_size)
    if accelerator.distributed_type == DistributedType.FSDP:
        count = math.ceil(math.ceil(len(items) / accelerator.num_processes) / batch_size)
    for start in range(0, count * batch_size, batch_size):
        yield shard[start : start + batch_size]
