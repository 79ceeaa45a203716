"""The plain Hugging Face inference peers: `model.generate`, one prompt at a time or in batches.

    python bench/hf_generate.py --model DIR --data infer.jsonl --batch-size 1|64|256 --prompts N \
        --max-new-tokens 128 --out result.json

What a user writes without a serving engine: greedy decoding, batches of prompts sorted by length
(so a batch pads little), left padding, `min_new_tokens = max_new_tokens` so EOS never ends a sequence
early. Runs on one device (pin CUDA_VISIBLE_DEVICES). The slow settings run on a subset of the prompts,
taken evenly across the length-sorted list so it keeps the length distribution. Writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def subset(prompts: list[str], lengths: list[int], n: int) -> list[int]:
    """Indices of n prompts spread evenly over the length-sorted order."""
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    if n >= len(order):
        return order
    return [order[round(k * (len(order) - 1) / max(n - 1, 1))] for k in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="1: one prompt at a time, no padding")
    parser.add_argument("--prompts", type=int, required=True, help="how many of the prompts to run")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=device).eval()

    prompts = [json.loads(line)["prompt"] for line in open(args.data)]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    chosen = subset(prompts, lengths, args.prompts)
    # Longest first: the biggest batch comes first, so an out-of-memory shows at once.
    chosen.sort(key=lambda i: -lengths[i])
    batches = [chosen[k : k + args.batch_size] for k in range(0, len(chosen), args.batch_size)]
    gen = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )

    def generate(texts: list[str], **overrides) -> int:
        inputs = tokenizer(texts, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(**inputs, **(gen | overrides))
        new = out.shape[1] - inputs["input_ids"].shape[1]
        return new * len(texts)

    # Warm-up outside the timing (kernel selection, allocator, cuBLAS handles): one small batch of the
    # real batch size, a few tokens.
    warm = [prompts[i] for i in batches[0]]
    generate([" ".join(t.split()[:32]) for t in warm], max_new_tokens=4, min_new_tokens=4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    sync(device)
    started = time.perf_counter()
    generated = 0
    for batch in batches:
        generated += generate([prompts[i] for i in batch])
    sync(device)
    elapsed = time.perf_counter() - started

    expected = len(chosen) * args.max_new_tokens
    assert generated == expected, f"generated {generated} tokens, expected {expected}"
    t = args.max_new_tokens
    result = {
        "method": "generate, one prompt at a time"
        if args.batch_size == 1
        else f"generate, batches of {args.batch_size}",
        "batch_size": args.batch_size,
        "prompts": len(chosen),
        "prompts_total": len(prompts),
        "prompt_tokens": sum(lengths[i] for i in chosen),
        "generated_tokens": generated,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": generated / elapsed,
        # For the bandwidth model: forward passes (each reads the weights once) and K/V positions read.
        "decode_steps": len(batches) * t,
        "kv_positions": sum(t * lengths[i] + t * (t - 1) // 2 for i in chosen),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attn_implementation": model.config._attn_implementation,
    }
    if device.type == "cuda":
        result |= {
            "torch_peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "torch_peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
