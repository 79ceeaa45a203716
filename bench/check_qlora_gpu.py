"""GPU check: QLoRA (model.quantization: nf4) on a 7B shape trains; its peak memory beside bf16 LoRA.

    pip install 'llmbatch[quantization]'   # bitsandbytes
    python3 bench/check_qlora_gpu.py [--steps 20] [--layers 28]

bitsandbytes' 4-bit kernels are CUDA only, so the CPU tests cannot run them. This builds a Qwen2.5-7B
shaped model (random weights, bf16, --layers layers) in a temporary folder, then for model.quantization
none and nf4 loads it through the runner's own load_lora_model (LoRA r=16 on every linear layer),
trains --steps AdamW steps under bf16 autocast on one fixed batch of packed rows (it must memorise it:
the loss must fall), and prints one row per layout: loss first -> last, peak GPU memory (torch's
max_memory_allocated) and llmbatch.sizing's estimate for the same spec. Exits non-zero when nf4's loss
does not fall or its peak is not below bf16's. About 3 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from llmbatch.runners.lora import load_lora_model, token_loss_sum
from llmbatch.runners.packing import IGNORE
from llmbatch.sizing import GIB, Layout, rank_bytes, shape_of
from llmbatch.spec import load_spec

JOBS = Path(__file__).resolve().parent.parent / "src" / "llmbatch" / "jobs"


def batch(vocab: int, rows: int, length: int, device) -> dict[str, torch.Tensor]:
    """Rows of two packed sequences each, targets on the second half of each (a completion)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (rows, length), generator=g)
    half = length // 2
    positions = torch.cat([torch.arange(half), torch.arange(length - half)]).repeat(rows, 1)
    targets = torch.full_like(ids, IGNORE)
    targets[:, half // 2 : half - 1] = ids[:, half // 2 + 1 : half]
    targets[:, half + half // 2 : -1] = ids[:, half + half // 2 + 1 :]
    return {k: v.to(device) for k, v in {"input_ids": ids, "position_ids": positions, "targets": targets}.items()}


def train(folder: str, quantization: str, args) -> tuple[list[float], float, float]:
    """(losses, peak GiB, sizing's estimate GiB) of --steps steps under `quantization`."""
    spec = load_spec(
        JOBS / "finetune.yaml",
        "finetune",
        [
            f"model.path={folder}",
            f"model.quantization={quantization}",
            "lora.r=16",
            "lora.alpha=32",
            f"train.micro_batch_size={args.rows}",
            f"train.seq_len={args.seq_len}",
            "train.gradient_checkpointing=true",
            "train.liger=off",
        ],
    )
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, _ = load_lora_model(spec, device)
    if quantization == "none":
        model.to(device)  # as accelerate's prepare does; nf4 loads onto the GPU itself
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    inputs = batch(model.config.vocab_size, args.rows, args.seq_len, device)
    targets = (inputs["targets"] != IGNORE).sum()
    losses = []
    model.train()
    for _ in range(args.steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss_sum(model, inputs) / targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / GIB
    shape = shape_of(json.loads((Path(folder) / "config.json").read_text()))
    estimate = sum(rank_bytes(spec, shape, Layout(quantization=quantization)).values()) / GIB
    del model, optimizer
    return losses, peak, estimate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    config = Qwen2Config(  # Qwen2.5-7B
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=args.layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    )
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        print(f"built a {args.layers}-layer Qwen2.5-7B shape in {time.monotonic() - started:.0f} s", flush=True)
        for quantization in ("none", "nf4"):
            started = time.monotonic()
            results[quantization] = losses, peak, estimate = train(folder, quantization, args)
            print(
                f"{'bf16 LoRA' if quantization == 'none' else 'QLoRA nf4':10s}  loss {losses[0]:.3f} -> "
                f"{losses[-1]:.3f} in {args.steps} steps  peak {peak:.1f} GiB  (sizing estimate {estimate:.1f} GiB)  "
                f"{time.monotonic() - started:.0f} s",
                flush=True,
            )
    nf4_losses, nf4_peak, _ = results["nf4"]
    ok = nf4_losses[-1] < 0.5 * nf4_losses[0] and nf4_peak < results["none"][1]
    print("ok" if ok else "FAILED: nf4's loss did not halve, or its peak is not below bf16's")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
