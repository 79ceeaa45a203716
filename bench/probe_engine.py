"""Where the engine's time goes on one GPU, on the benchmark's model and prompts.

    python bench/probe_engine.py --work /tmp/llmbatch-bench

After bench/workloads.py built the assets: times a prefill chunk (with its attention done three
ways), and the graphed decode step at several row counts, each after a warm-up; prints a profile of
the top CUDA kernels of one prefill chunk and of one decode step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from llmbatch.engine import attention
from llmbatch.engine.params import EngineParams
from llmbatch.engine.runner import Engine
from llmbatch.engine.scheduler import Scheduler
from llmbatch.runners.generation import eos_token_ids
from llmbatch.runners.model_loading import load_model
from llmbatch.spec import ModelSpec


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def profile(fn, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- {label}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


def expanded_attention(q, k, v, scale):
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    ).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmbatch-bench"))
    args = parser.parse_args()
    assets = args.work / "assets"
    model, tokenizer = load_model(ModelSpec(path=str(assets / "model")), torch.device("cuda"))
    prompts = tokenizer([json.loads(line)["prompt"] for line in (assets / "data/infer.jsonl").open()])["input_ids"]
    params = EngineParams(max_new_tokens=128, ignore_eos=True)
    engine = Engine(model, params, [len(p) for p in prompts], eos_token_ids(model, tokenizer))
    print(engine.describe(), flush=True)
    keys = list(range(len(prompts)))
    admitted = Scheduler([len(p) for p in prompts], engine.cache.slots).admit()
    # One chunk of the longest prompts, and one of middle length, as the engine forms them.
    for label, start in (("longest", 0), ("middle", len(admitted) // 2)):
        width = admitted[start].prompt_len
        chunk = admitted[start : start + max(1, engine.prefill_tokens // width)]
        run = lambda: engine._prefill_chunk(chunk, prompts, keys)  # noqa: E731
        for name, fn in (
            ("sdpa enable_gqa", attention.prefill_attention),
            ("sdpa, heads expanded", expanded_attention),
        ):
            attention_impl = attention.prefill_attention
            import llmbatch.engine.model as engine_model

            engine_model.prefill_attention = fn
            seconds = timed(run)
            print(
                f"prefill {label}: {len(chunk)} rows x {width}, {name}: {seconds * 1e3:.1f} ms, "
                f"{len(chunk) * width / seconds:,.0f} tokens/s",
                flush=True,
            )
            engine_model.prefill_attention = attention_impl
        profile(run, f"prefill chunk {label}")
    # The decode step at several row counts, context as after prefill.
    for sequence in admitted:
        sequence.tokens = [1]
    for rows in (64, 256, 512, 1024):
        if rows > len(admitted):
            break
        batch = admitted[:rows]
        inputs = torch.tensor(
            [[1] * rows, [s.position for s in batch], [s.slot for s in batch], keys[:rows], [1] * rows]
        )
        engine.graphs(inputs)  # capture
        seconds = timed(lambda: engine.graphs(inputs), reps=20)
        print(f"decode step, {rows} rows: {seconds * 1e3:.2f} ms, {rows / seconds:,.0f} tokens/s", flush=True)
    profile(lambda: engine._decode_step(engine.graphs.inputs[:, :256]), "one eager decode step, 256 rows")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
