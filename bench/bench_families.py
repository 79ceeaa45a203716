"""The engine on each model family at a real shape with random weights, on one GPU: the greedy
float32 check against `generate` and the engine against `generate` in batches of 256, in one process.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 bench/bench_families.py --out DIR [--families a,b] [--deadline-s 540]

Per family (SHAPES; MoE shapes with fewer layers so that a run fits the time):
1. check, float32, `--check-layers` layers of the shape: 12 prompts (two longer than Gemma 3's
   window of 1,024), 16 new tokens, EOS ignored; the engine with 4 slots, refilled, against
   `generate` one prompt at a time. Must be equal.
2. bench, bfloat16, the shape's bench layers: 1,024 prompts of 64-512 random tokens, 128 new tokens
   each, EOS ignored, through the engine (all prompts; start-up out of the clock, as in bench.py);
   `generate` in length-sorted, left-padded batches of 256 on 256 of the prompts taken evenly over
   the lengths, after a small warm-up. Tokens/s counts generated tokens.
Writes DIR/families.json (every figure) and prints a markdown table. Exit 1 if a check differs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from llmbatch.engine.params import EngineParams
from llmbatch.engine.runner import Engine

KEEP_GROUPED_EXPERTS = False  # --generate-experts grouped_mm

PHI4_ROTARY_HALF = 48  # Phi-4-mini: head 128, partial rotary 0.75 -> 96 rotary dims

SHAPES = {
    "qwen3-8b": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        36,
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=False,
        ),
    ),
    "gemma-3-12b": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        48,
        dict(
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            vocab_size=262208,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            max_position_embeddings=131072,
        ),
    ),
    "phi-4-mini": (
        "Phi3Config",
        "Phi3ForCausalLM",
        32,
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=24,
            num_key_value_heads=8,
            vocab_size=200064,
            partial_rotary_factor=0.75,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 4096,
                "short_factor": [1.0 + i / 48 for i in range(PHI4_ROTARY_HALF)],
                "long_factor": [1.0 + i for i in range(PHI4_ROTARY_HALF)],
            },
        ),
    ),
    # Gemma 2 9B with its window cut from 4,096 to 1,024, so that the check's two long prompts cross it.
    "gemma-2-9b": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        42,
        dict(
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            vocab_size=256000,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            max_position_embeddings=8192,
        ),
    ),
    # Mistral 7B with a 256-token window, shorter than most prompts: every layer slides.
    "mistral-7b-window-256": (
        "MistralConfig",
        "MistralForCausalLM",
        32,
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            sliding_window=256,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    "mixtral-8x7b": (
        "MixtralConfig",
        "MixtralForCausalLM",
        16,
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        24,
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151936,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=False,
        ),
    ),
}


def release() -> None:
    """Free what the last run held: an Engine and its decode graphs refer to each other, so only the
    cycle collector frees its KV cache."""
    gc.collect()
    torch.cuda.empty_cache()


def build(name: str, layers: int, dtype: torch.dtype):
    config_name, model_name, _, shape = SHAPES[name]
    config = getattr(transformers, config_name)(
        **(shape | {"num_hidden_layers": layers}), pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    if getattr(config, "layer_types", None) is not None and len(config.layer_types) != layers:
        config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(transformers, model_name)._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=[2], pad_token_id=0)
    return model.eval()


def random_prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(low, high))] for _ in range(n)]


def run_engine(model, params: EngineParams, prompts: list[list[int]]) -> tuple[dict, Engine, float, float]:
    started = time.monotonic()
    engine = Engine(model, params, [len(p) for p in prompts], eos_ids={2})
    engine.warm_up()
    torch.cuda.synchronize()
    startup = time.monotonic() - started
    started = time.monotonic()
    got = {}
    for group in engine.run(prompts, [str(i) for i in range(len(prompts))], stop=lambda: False):
        got.update(group)
    torch.cuda.synchronize()
    return got, engine, startup, time.monotonic() - started


@torch.inference_mode()
def generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy, EOS ignored, one batch, left-padded. With `KEEP_GROUPED_EXPERTS`, a MoE model decodes with
    grouped experts: transformers would switch them to `batched_mm`, which gathers every row's expert
    weights (Mixtral b256: 112 GiB) and runs out of memory at the batch sizes the engine is measured against."""
    if KEEP_GROUPED_EXPERTS:
        model._optimize_model_for_decode = contextlib.nullcontext
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids.cuda(),
        attention_mask=mask.cuda(),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    return out[:, width:].tolist()


def check(name: str, layers: int) -> dict:
    model = build(name, layers, torch.float32)
    vocab = model.config.vocab_size
    prompts = random_prompts(10, 20, 300, vocab, seed=1) + random_prompts(2, 1100, 1200, vocab, seed=2)
    new_tokens = 16
    expected = [generate(model, [p], new_tokens)[0] for p in prompts]
    slot_len = max(map(len, prompts)) + new_tokens - 1
    params = EngineParams(max_new_tokens=new_tokens, ignore_eos=True, batch_tokens=4 * slot_len)
    got, engine, _, _ = run_engine(model, params, prompts)
    same = sum(got[i] == expected[i] for i in range(len(prompts)))
    result = {
        "layers": layers,
        "equal": same,
        "inputs": len(prompts),
        "engine": engine.describe(),
        "graphs": sorted(engine.graphs.graphs),
        "steps": engine.stats.decode_steps,
    }
    if same < len(prompts):
        first = next(i for i in range(len(prompts)) if got[i] != expected[i])
        result["first_difference"] = {"input": first, "engine": got[first], "generate": expected[first]}
    del model, engine
    release()
    return result


def bench(name: str, layers: int, prompts_n: int, b256_n: int, new_tokens: int, batch: int = 256) -> dict:
    """`batch`: `generate`'s batch size (256; smaller where 256 runs out of memory, as Mixtral's does)."""
    model = build(name, layers, torch.bfloat16)
    params_b = sum(p.numel() for p in model.parameters())
    prompts = random_prompts(prompts_n, 64, 512, model.config.vocab_size, seed=3)
    params = EngineParams(max_new_tokens=new_tokens, ignore_eos=True)
    got, engine, startup, seconds = run_engine(model, params, prompts)
    engine_tps = sum(len(t) for t in got.values()) / seconds
    stats = engine.stats.summary()
    description = engine.describe()
    del engine, got
    release()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chosen = [order[round(k * (len(order) - 1) / max(b256_n - 1, 1))] for k in range(b256_n)]
    subset = [prompts[i] for i in chosen]
    generate(model, subset[:8], 4)  # warm-up
    torch.cuda.synchronize()
    started = time.monotonic()
    produced = 0
    for start in range(0, len(subset), batch):
        produced += sum(len(t) for t in generate(model, subset[start : start + batch], new_tokens))
    torch.cuda.synchronize()
    generate_tps = produced / (time.monotonic() - started)
    del model
    release()
    return {
        "layers": layers,
        "params": params_b,
        "engine_tokens_per_s": engine_tps,
        "engine_s": seconds,
        "engine_startup_s": startup,
        "engine": description,
        "engine_stats": stats,
        "generate_b256_tokens_per_s": generate_tps,
        "generate_batch": batch,
        "generate_prompts": len(subset),
        "ratio": engine_tps / generate_tps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", default=",".join(SHAPES))
    parser.add_argument("--only", default="check,bench")
    parser.add_argument("--check-layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--b256-prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--deadline-s", type=float, default=540)
    parser.add_argument(
        "--generate-batch",
        type=int,
        default=256,
        help="generate's batch size (Mixtral's b256 needs 112 GiB for its decode experts)",
    )
    parser.add_argument(
        "--generate-experts",
        choices=("transformers", "grouped_mm"),
        default="transformers",
        help="MoE decoding in generate: transformers' own switch to batched_mm, or grouped_mm kept",
    )
    args = parser.parse_args()
    global KEEP_GROUPED_EXPERTS
    KEEP_GROUPED_EXPERTS = args.generate_experts == "grouped_mm"
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "families": {},
    }
    ok = True
    for name in args.families.split(","):
        entry = results["families"].setdefault(name, {})
        for phase in args.only.split(","):
            if time.monotonic() - began > args.deadline_s:
                entry[phase] = {"skipped": "past the deadline"}
                continue
            started = time.monotonic()
            try:
                if phase == "check":
                    # Gemma 3: 6 layers, so that its pattern of 5 windowed layers and 1 global is there.
                    layers = max(args.check_layers, 6) if name.startswith("gemma") else args.check_layers
                    entry[phase] = check(name, layers)
                    ok &= entry[phase]["equal"] == entry[phase]["inputs"]
                else:
                    entry[phase] = bench(
                        name, SHAPES[name][2], args.prompts, args.b256_prompts, args.new_tokens, args.generate_batch
                    )
            except Exception as e:  # one family's failure must not hide the others' figures
                entry[phase] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                ok = False
                release()
            entry[phase]["wall_s"] = round(time.monotonic() - started, 1)
            print(name, phase, json.dumps({k: v for k, v in entry[phase].items() if k != "traceback"}), flush=True)
            (args.out / "families.json").write_text(json.dumps(results, indent=1))
    print("\n| family | shape (layers) | check fp32 | engine tok/s | generate b256 tok/s | ratio | engine path |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in results["families"].items():
        c, b = entry.get("check", {}), entry.get("bench", {})
        check_text = f"{c['equal']}/{c['inputs']}" if "equal" in c else c.get("error", c.get("skipped", "-"))[:60]
        if "ratio" in b:
            print(
                f"| {name} | {b['layers']} | {check_text} | {b['engine_tokens_per_s']:,.0f} | "
                f"{b['generate_b256_tokens_per_s']:,.0f} | {b['ratio']:.1f}x | {b['engine']} |"
            )
        else:
            print(f"| {name} | - | {check_text} | {b.get('error', b.get('skipped', '-'))[:80]} | | | |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
