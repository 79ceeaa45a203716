"""The Hugging Face fine-tuning peers: Trainer + PEFT LoRA, padded or flattened, with or without Liger-Kernel.

    [torchrun --nproc_per_node N] python bench/hf_trainer.py --model DIR --data ft.jsonl \
        --seq-len 1024 --batch-size 8 --max-steps 25 --skip-steps 5 --out result.json \
        [--collator flatten] [--liger] [--gradient-checkpointing]

--collator padded (the default) is the plain way: DataCollatorForSeq2Seq pads each batch to its longest
example. --collator flatten is Hugging Face's padding-free packing: DataCollatorWithFlattening puts a
batch's examples end to end in one row with restarting position ids. --liger patches Liger-Kernel's
kernels into the model (RMSNorm, SwiGLU, RoPE, and the fused linear cross-entropy in its forward), as
TrainingArguments(use_liger_kernel=True) does.

One GPU: run it as a single process with CUDA_VISIBLE_DEVICES pinned to one GPU (with several visible,
Trainer silently wraps the model in nn.DataParallel). Several GPUs: torchrun, one process per GPU (DDP).

Each example is tokenized as the llmbatch runner does (prompt, then completion + EOS, cut to seq-len + 1,
the model reads all but the last token), so both read the same tokens; labels mask the prompt. Batches
are padded to their longest example by DataCollatorForSeq2Seq, in random order (no length grouping):
the plain way. --grad-accum gives a step more examples than one padded forward pass could hold.
Throughput counts real (non-pad) tokens only, summed over ranks, between the end of step
`skip-steps` and the end of the last step (warm-up excluded). Rank 0 writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


def load_examples(path: str, tokenizer, seq_len: int, attention_mask: bool) -> list[dict]:
    examples = []
    for line in open(path):
        record = json.loads(line)
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + completion)[: seq_len + 1][:-1]
        labels = [-100] * min(len(prompt), len(ids)) + ids[len(prompt) :]
        example = {"input_ids": ids, "labels": labels}
        examples.append(example | {"attention_mask": [1] * len(ids)} if attention_mask else example)
    return examples


class CountingCollator:
    """A collator recording the real tokens of every batch it builds, in order."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, features):
        self.tokens.append(sum(len(f["input_ids"]) for f in features))
        return self.inner(features)


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step, after the GPU has finished it."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="examples per GPU per forward pass")
    parser.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--skip-steps", type=int, default=5, help="warm-up steps left out of the timing")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--collator", choices=("padded", "flatten"), default="padded")
    parser.add_argument("--liger", action="store_true", help="Liger-Kernel's kernels (needs liger-kernel, CUDA)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--find-unused-parameters",
        action="store_true",
        help="DDP's search for unused parameters: Trainer's default for a PeftModel, which it "
        "cannot see is a PreTrainedModel. Off by default: LoRA uses every parameter, and "
        "the search costs time each step, so leaving it off is the stronger peer",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not 1 <= args.skip_steps < args.max_steps:
        parser.error("need 1 <= --skip-steps < --max-steps (the timing starts at the end of a step)")

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "right"
    examples = load_examples(args.data, tokenizer, args.seq_len, attention_mask=args.collator == "padded")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32)
    if args.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)  # what Trainer's use_liger_kernel=True does
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    inner = (
        DataCollatorWithFlattening(return_position_ids=True)
        if args.collator == "flatten"
        else DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    )
    collator = CountingCollator(inner)
    clock = StepClock()
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-trainer-"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        seed=0,
        logging_steps=args.max_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=args.find_unused_parameters,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=examples, data_collator=collator, callbacks=[clock]
    )
    trainer.train()

    # Optimizer step i consumed collated batches (i-1)*accum ... i*accum-1, in order (the loader may
    # build one more ahead: ignored).
    skip, steps, accum = args.skip_steps, len(clock.ends), args.grad_accum
    assert steps == args.max_steps, f"{steps} steps ran, expected {args.max_steps}"
    tokens, elapsed = sum(collator.tokens[skip * accum : steps * accum]), clock.ends[-1] - clock.ends[skip - 1]
    peak_alloc = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peak_reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        totals = torch.tensor([tokens, sum(collator.tokens[: steps * accum])], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        tokens, all_tokens = int(totals[0]), int(totals[1])
        worst = torch.tensor([elapsed, peak_alloc, peak_reserved], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        elapsed, peak_alloc, peak_reserved = worst.tolist()
    else:
        all_tokens = sum(collator.tokens[: steps * accum])
    if int(os.environ.get("RANK", "0")) == 0:
        result = {
            "method": "HF Trainer + PEFT LoRA",
            "collator": args.collator,
            "liger": args.liger,
            "gradient_checkpointing": args.gradient_checkpointing,
            "world_size": world,
            "per_device_batch": args.batch_size,
            "grad_accum": accum,
            "seq_len": args.seq_len,
            "steps": steps,
            "timed_steps": steps - skip,
            "tokens_timed": tokens,
            "tokens_all_steps": all_tokens,
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": tokens / elapsed,
            "train_runtime_s": trainer.state.log_history[-1].get("train_runtime"),
            "ddp_find_unused_parameters": args.find_unused_parameters,
            "lora": {
                "r": args.lora_r,
                "alpha": args.lora_alpha,
                "dropout": args.lora_dropout,
                "target_modules": "all-linear",
            },
            "optim": training_args.optim,
            "attn_implementation": model.config._attn_implementation,
            "torch_peak_allocated_gb": round(peak_alloc, 2),
            "torch_peak_reserved_gb": round(peak_reserved, 2),
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
