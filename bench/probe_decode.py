"""Decode routes on one GPU, same prompts: which one to build the inference runner on.

    python bench/probe_decode.py --work /tmp/llmbatch-bench --prompts 256

Routes: `generate` with a dynamic cache (what the runner does now), `generate` with a static cache
(transformers compiles the decode step), and continuous batching (`generate_batch`, paged attention).
Greedy, exactly 128 new tokens. Prints tokens/s and how many rows equal the dynamic-cache output.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def padded(prompts, pad_id):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids.cuda(), mask.cuda(), width


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbatch-bench")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--routes", default="dynamic,static,cb")
    args = ap.parse_args()
    model_dir, new = f"{args.work}/model", 128
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["prompt"] for line in open(f"{args.work}/data/infer.jsonl")]
    prompts = sorted(tok(texts)["input_ids"], key=len)
    step = max(1, len(prompts) // args.prompts)
    prompts = prompts[::step][: args.prompts]
    batches = [prompts[k : k + args.batch] for k in range(0, len(prompts), args.batch)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    results, reference = {}, None

    def run_generate(model, **extra):
        outs = []
        for b in batches:
            ids, mask, width = padded(b, pad)
            with torch.inference_mode():
                o = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=pad,
                    **extra,
                )
            outs += o[:, width:].tolist()
        return outs

    for route in args.routes.split(","):
        model = None
        try:
            attn = "paged|eager" if route == "cb" else "sdpa"  # 5.17 pages only eager and flash-attn
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.bfloat16, device_map="cuda", attn_implementation=attn
            ).eval()
            if route in ("dynamic", "static"):
                cache = "static" if route == "static" else None

                def fn(model=model):
                    return run_generate(model, cache_implementation=cache)
            else:
                cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=pad)

                def fn(model=model):
                    with torch.inference_mode():
                        out = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
                    by_id = sorted(out.values(), key=lambda r: int(r.request_id.split("_")[-1]))
                    return [list(r.generated_tokens) for r in by_id]

            warm_out, warm_s = timed(fn)  # compile / graph capture / autotune happen here
            out, secs = timed(fn)
            tokens = sum(map(len, out))
            same = sum(a == b for a, b in zip(out, reference)) if reference else len(out)
            reference = reference or out
            results[route] = {
                "tokens_per_s": round(tokens / secs),
                "first_call_s": round(warm_s, 1),
                "timed_s": round(secs, 2),
                "tokens": tokens,
                "rows_equal_dynamic": same,
                "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            }
        except Exception as e:  # a probe: report and go on
            results[route] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(route, json.dumps(results[route]), flush=True)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
