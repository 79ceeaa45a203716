"""GPU check of the inference engine: its Triton decode attention against the torch path, and its
greedy outputs against `generate`'s on the embedded model. Exits 1 on any mismatch.

    PYTHONPATH=src python3 bench/check_engine_gpu.py

1. Attention: random bf16 queries and caches of several shapes (grouped heads, rows of different
   lengths, slots out of order); the kernel's output against the torch path's on fp32 copies.
2. The embedded model: the engine's outputs (every slot in use, and few slots so they are refilled
   many times and several graph buckets run) against `generate` one prompt at a time, in float32
   (must be equal) and in bfloat16 (reported, with generate's own batched-vs-single agreement: in
   bf16 a near-tie between two tokens can go either way with any change of kernel or batch).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from llmbatch.embedded import ensure_embedded_model
from llmbatch.engine.attention import _decode_torch, decode_attention
from llmbatch.engine.runner import Engine
from llmbatch.prompts import encode_texts
from llmbatch.runners.generation import Decoder, eos_token_ids, make_completion
from llmbatch.runners.model_loading import load_model
from llmbatch.runners.sampling import engine_params
from llmbatch.spec import DataSpec, GenerationSpec, ModelSpec


def check_attention(device: torch.device) -> bool:
    ok = True
    g = torch.Generator(device=device).manual_seed(0)
    for rows, q_heads, kv_heads, dim, slot_len, window, softcap in (
        (7, 12, 2, 128, 700, None, None),
        (64, 4, 2, 64, 100, None, None),
        (3, 8, 8, 128, 130, None, None),
        (256, 28, 4, 128, 640, None, None),
        (32, 16, 8, 256, 900, 100, None),
        (32, 16, 8, 256, 900, None, 50.0),
        (48, 32, 8, 128, 700, 129, 30.0),
    ):
        slots = rows + 3
        keys = torch.randn(slots, slot_len, kv_heads, dim, device=device, generator=g, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        q = torch.randn(rows, q_heads, dim, device=device, generator=g, dtype=torch.bfloat16)
        lengths = torch.randint(1, slot_len + 1, (rows,), device=device, generator=g)
        lengths[0] = slot_len
        row_slots = torch.randperm(slots, device=device, generator=g)[:rows]
        got = decode_attention(q, keys, values, row_slots, lengths, dim**-0.5, window, softcap).float()
        ref = _decode_torch(q.float(), keys.float(), values.float(), row_slots, lengths, dim**-0.5, window, softcap)
        error = ((got - ref).norm() / ref.norm()).item()
        good = error < 1e-2 and bool(torch.isfinite(got).all())
        ok &= good
        print(
            f"attention rows={rows} heads={q_heads}/{kv_heads} dim={dim} len<={slot_len} window={window} "
            f"softcap={softcap}: "
            f"relative error {error:.2e} {'ok' if good else 'MISMATCH'}",
            flush=True,
        )
    return ok


def check_outputs(device: torch.device, dtype: str) -> bool:
    model_dir = ensure_embedded_model(Path(tempfile.mkdtemp()))
    model, tokenizer = load_model(ModelSpec(path=str(model_dir), dtype=dtype), device)
    records = [json.loads(line) for line in (REPO / "jobs/data/parity/test.jsonl").open()]
    texts = [f"{r['question']}\nAnswer:" + " and more" * (i % 5) for i, r in enumerate(records[:96])]
    prompts, ids = encode_texts(tokenizer, texts, DataSpec()), [r["id"] for r in records[:96]]
    ok = True
    for generation in (GenerationSpec(max_new_tokens=24), GenerationSpec(max_new_tokens=24, ignore_eos=True)):
        decoder = Decoder(model, tokenizer, generation)
        expected = [decoder.complete([p], [i])[0] for p, i in zip(prompts, ids)]
        batched = decoder.complete(prompts, ids)
        print(
            f"{dtype}, ignore_eos={generation.ignore_eos}: generate in one batch equals generate one at a "
            f"time on {sum(a == b for a, b in zip(batched, expected))}/{len(prompts)} inputs",
            flush=True,
        )
        for batch_tokens in (None, 5 * (max(map(len, prompts)) + 23)):
            spec = GenerationSpec(**{**generation.__dict__, "batch_tokens": batch_tokens})
            eos = eos_token_ids(model, tokenizer)
            engine = Engine(model, engine_params(spec), [len(p) for p in prompts], eos)
            got = {}
            for group in engine.run(prompts, ids, stop=lambda: False):
                got.update((i, make_completion(tokenizer, eos, tokens)) for i, tokens in group)
            same = sum(got[i] == expected[i] for i in range(len(prompts)))
            good = same == len(prompts)
            ok &= good
            print(
                f"{dtype}, ignore_eos={generation.ignore_eos}, {engine.describe()}, "
                f"{engine.stats.decode_steps} steps, graphs {sorted(engine.graphs.graphs)}: "
                f"{same}/{len(prompts)} outputs equal generate's {'ok' if good else 'DIFFER'}",
                flush=True,
            )
            if not good:
                first = next(i for i in range(len(prompts)) if got[i] != expected[i])
                print(f"  first difference, input {ids[first]}: engine {got[first]} generate {expected[first]}")
    return ok


def main() -> int:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), "torch", torch.__version__, flush=True)
    ok = check_attention(device)
    ok = check_outputs(device, "float32") and ok
    check_outputs(device, "bfloat16")  # reported: see the docstring
    print("engine GPU check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
