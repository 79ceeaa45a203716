"""GPU check: the fine-tuning runner with Liger-Kernel's kernels (train.liger: auto) against the plain path.

    python3 bench/check_finetune_gpu.py [--layers 4]

Liger-Kernel's kernels are Triton, CUDA only, so the CPU tests cannot run them. This builds a Qwen2.5-1.5B
shaped model (random weights, the real 151,936-token vocabulary, --layers layers), loads it twice through
the runner's own functions, once with train.liger: auto and once with off, gives both the same LoRA
weights, and compares on packed rows (positions restarting inside each row, targets on part of them):
the summed loss (token_loss_sum) and every LoRA gradient, in float32 and in bfloat16.
Prints one line per dtype and exits non-zero when a difference is over its tolerance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from llmbatch.runners.lora import fused_head_loss, token_loss_sum, use_liger_kernels
from llmbatch.runners.packing import IGNORE
from llmbatch.spec import TrainSpec

# Relative tolerances: float32 differs only by summation order; bfloat16 by its rounding as well.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


def batch(vocab: int, rows: int, length: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (rows, length), generator=g)
    positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)]).repeat(rows, 1)
    targets = torch.full_like(ids, IGNORE)
    targets[:, length // 4 : length // 2 - 1] = ids[:, length // 4 + 1 : length // 2]  # completion of sequence 1
    targets[:, length - length // 4 : -1] = ids[:, length - length // 4 + 1 :]  # and of sequence 2
    return {k: v.to(device) for k, v in {"input_ids": ids, "position_ids": positions, "targets": targets}.items()}


def loss_and_grads(folder: str, liger: str, dtype, inputs) -> tuple[float, dict[str, torch.Tensor], bool]:
    device = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    applied = use_liger_kernels(TrainSpec(liger=liger), model, device)
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters an effect, the same on both sides
        g = torch.Generator(device="cpu").manual_seed(1)
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    head_loss = fused_head_loss(model) if applied else None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = token_loss_sum(model, inputs, head_loss)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, head_loss is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    config = Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    failed = False
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        inputs = batch(config.vocab_size, rows=4, length=1024, device="cuda")
        dtypes = (torch.float32, torch.bfloat16)
        # The plain runs first: Liger patches RoPE (and the classes new models are built from) for the
        # whole process, so a plain model loaded after a Liger one would not be plain.
        plain = {dtype: loss_and_grads(folder, "off", dtype, inputs) for dtype in dtypes}
        for dtype in dtypes:
            plain_loss, plain_grads, _ = plain[dtype]
            fused, fused_grads, fused_head = loss_and_grads(folder, "auto", dtype, inputs)
            assert fused_head, "train.liger: auto did not take the fused head and loss on CUDA"
            loss_rel = abs(fused - plain_loss) / abs(plain_loss)
            grad_rel = max(
                (fused_grads[n] - g).norm().item() / max(g.norm().item(), 1e-12) for n, g in plain_grads.items()
            )
            ok = loss_rel <= TOLERANCE[dtype] and grad_rel <= TOLERANCE[dtype]
            failed |= not ok
            print(
                f"{str(dtype):15} loss plain {plain_loss:.6g} liger {fused:.6g} (rel {loss_rel:.2e}); "
                f"worst LoRA gradient rel. error {grad_rel:.2e} over {len(plain_grads)} tensors; "
                f"tolerance {TOLERANCE[dtype]:g}: {'ok' if ok else 'FAILED'}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
