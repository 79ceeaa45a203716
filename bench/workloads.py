"""What the benchmark runs on, and the cost model behind its "% of ceiling" column.

    python bench/workloads.py --shape qwen2.5-1.5b --out DIR [--smoke]

writes DIR/model (random weights in a real architecture's shape, bf16 safetensors, with a tokenizer)
and DIR/data (the inference prompts and the two fine-tuning sets as JSONL), then a manifest.json.
It runs as its own process so that the benchmark's driver never holds a GPU context.

The model is random, so any tokenizer with the right vocabulary size will do. This one (see
build_tokenizer) makes every word of the generated texts exactly one token and adds no BOS or EOS, so
each prompt and example has exactly the length the workload asks for (checked at the end of the build,
by tokenizing everything with the tokenizer as the runners load it).

The rest of this module (imported by bench.py; standard library only) counts FLOPs and bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# Shapes from the models' config.json files (Hugging Face), only the keys that set the cost.
SHAPES = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # --smoke: small enough for a CPU, same code paths.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
}

PAD, EOS = "<|pad|>", "<|endoftext|>"  # ids 0 and 1


# --- workload sizes ---------------------------------------------------------------------------------


def workload_sizes(smoke: bool) -> dict:
    """Lengths and counts of the data sets (the issue's numbers; tiny ones for --smoke)."""
    if smoke:
        return dict(
            prompts=16,
            prompt_min=8,
            prompt_max=48,
            new_tokens=8,
            fixed_len=64,
            fixed_prompt=16,
            fixed_examples=64,
            var_examples=256,
            var_median=24,
            var_max=128,
        )
    return dict(
        prompts=1024,
        prompt_min=64,
        prompt_max=512,
        new_tokens=128,
        # Enough rows for ~40 steps at 8 sequences per GPU on 2 GPUs before an epoch ends.
        fixed_len=1024,
        fixed_prompt=256,
        fixed_examples=768,
        var_examples=3072,
        var_median=180,
        var_max=2048,
    )


def variable_lengths(rng, n: int, median: int, max_len: int, min_len: int = 16):
    """Instruction-data-like lengths: log-normal, median `median`, sigma 0.8, clipped to [16, max_len].

    With median 180: about 74% under 300 tokens, mean about 250, 1.5% over 1,000, a few at 2,048
    (about the shape of Alpaca/Dolly-style sets with a ShareGPT-like tail).
    """
    lengths = rng.lognormal(mean=math.log(median), sigma=0.8, size=n)
    return [int(min(max(round(x), min_len), max_len)) for x in lengths]


# --- building ---------------------------------------------------------------------------------------


def tokenizer_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]], int]:
    """A byte-level BPE vocabulary of exactly `vocab_size` tokens: the two specials, the 256 byte
    symbols, then words " a" ... " z", " aa" ..., each one token through a chain of merges
    (" a"+"b" -> " ab", " ab"+"c" -> " abc"). Returns (vocab, merges, id of the first word)."""
    import itertools
    import string

    from tokenizers import pre_tokenizers

    vocab = {PAD: 0, EOS: 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    first_word, merges = len(vocab), []
    for n in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            if len(vocab) == vocab_size:
                return vocab, merges, first_word
            word = "\u0120" + "".join(letters)  # byte-level BPE writes a leading space as U+0120
            vocab[word] = len(vocab)
            merges.append((word[:-1], word[-1]))


def build_tokenizer(vocab_size: int):
    """Qwen2's own tokenizer class over that vocabulary, so that every loader (AutoTokenizer picks
    Qwen2Tokenizer for a qwen2 config and rebuilds it from vocab and merges; PreTrainedTokenizerFast
    reads tokenizer.json as is) tokenizes the same way: a text of n words, each with its leading
    space, is exactly n tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges, _ = tokenizer_vocab(vocab_size)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, pad_token=PAD, eos_token=EOS, unk_token=None)


def build_model(shape: dict, out: Path, device: str) -> int:
    """Random weights (transformers' own init, seeded) saved as bf16 safetensors; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    config = Qwen2Config(
        **shape, max_position_embeddings=32768, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=None
    )
    torch.manual_seed(0)
    # Built on the GPU when there is one: initializing 1.5B parameters on the CPU takes much longer.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def words(rng, n: int, vocab: list[str]) -> str:
    """n random words, each with its leading space (so each is one token)."""
    return "".join(" " + vocab[i] for i in rng.integers(0, len(vocab), size=n))


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def build_data(out: Path, sizes: dict, vocab_size: int, seed: int = 0) -> dict:
    """infer.jsonl {id, prompt}; ft_fixed.jsonl and ft_var.jsonl {id, prompt, completion}.

    A fine-tuning example of S tokens is a prompt of P words and a completion of S - P words: the
    runner feeds prompt + completion + EOS minus the last token, i.e. exactly S tokens; the Trainer
    peer feeds the same S tokens.
    """
    import numpy as np

    vocab, _, first_word = tokenizer_vocab(vocab_size)
    vocab = [w[1:] for w, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= first_word]
    rng = np.random.default_rng(seed)
    prompt_lens = [int(x) for x in rng.integers(sizes["prompt_min"], sizes["prompt_max"] + 1, size=sizes["prompts"])]
    write_jsonl(
        out / "infer.jsonl", [{"id": f"p{i:05d}", "prompt": words(rng, n, vocab)} for i, n in enumerate(prompt_lens)]
    )
    fixed = [(sizes["fixed_prompt"], sizes["fixed_len"] - sizes["fixed_prompt"])] * sizes["fixed_examples"]
    var_lens = variable_lengths(rng, sizes["var_examples"], sizes["var_median"], sizes["var_max"])
    # Instruction data: the response is usually the longer part; 40% prompt, at least one token each.
    var = [(p, s - p) for s in var_lens for p in [min(max(1, round(0.4 * s)), s - 1)]]
    for name, parts in (("ft_fixed", fixed), ("ft_var", var)):
        write_jsonl(
            out / f"{name}.jsonl",
            [
                {"id": f"{name}{i:05d}", "prompt": words(rng, p, vocab), "completion": words(rng, c, vocab)}
                for i, (p, c) in enumerate(parts)
            ],
        )
    return {"infer_prompt_lens": prompt_lens, "fixed_lens": [p + c for p, c in fixed], "var_lens": var_lens}


def check_lengths(tokenizer, data: Path, lens: dict) -> None:
    """Every text tokenizes to exactly the length it was built for."""

    def lengths(texts, **kw):
        return [len(ids) for ids in tokenizer(texts, **kw)["input_ids"]]

    prompts = [json.loads(line)["prompt"] for line in (data / "infer.jsonl").open()]
    assert lengths(prompts) == lens["infer_prompt_lens"], "infer prompts: token counts differ from the plan"
    for name, key in (("ft_fixed", "fixed_lens"), ("ft_var", "var_lens")):
        recs = [json.loads(line) for line in (data / f"{name}.jsonl").open()]
        got = [
            a + b
            for a, b in zip(
                lengths([r["prompt"] for r in recs]), lengths([r["completion"] for r in recs], add_special_tokens=False)
            )
        ]
        assert got == lens[key], f"{name}: token counts differ from the plan"


def length_stats(lengths: list[int]) -> dict:
    s = sorted(lengths)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {
        "n": len(s),
        "mean": round(sum(s) / len(s), 1),
        "median": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": s[-1],
        "share_under_300": round(sum(x < 300 for x in s) / len(s), 3),
        "sum": sum(s),
        "sum_sq": sum(x * x for x in s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny data sets (CPU check of the pipeline)")
    args = parser.parse_args()

    import torch

    shape, sizes = SHAPES[args.shape], workload_sizes(args.smoke)
    (args.out / "model").mkdir(parents=True, exist_ok=True)
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    build_tokenizer(shape["vocab_size"]).save_pretrained(args.out / "model")
    params = build_model(shape, args.out / "model", "cuda" if torch.cuda.is_available() else "cpu")
    lens = build_data(args.out / "data", sizes, shape["vocab_size"])
    # Checked with the tokenizer as the runners and the peers load it, on this machine's transformers.
    from transformers import AutoTokenizer

    check_lengths(AutoTokenizer.from_pretrained(args.out / "model"), args.out / "data", lens)
    manifest = {
        "shape_name": args.shape,
        "shape": shape,
        "params": params,
        "sizes": sizes,
        "infer_prompts": length_stats(lens["infer_prompt_lens"]),
        "ft_fixed": length_stats(lens["fixed_lens"]),
        "ft_var": length_stats(lens["var_lens"]),
        "model": str(args.out / "model"),
        "data": str(args.out / "data"),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: manifest[k] for k in ("shape_name", "params", "infer_prompts", "ft_var")}))


# --- cost model (used by bench.py) ----------------------------------------------------------------


def head_dim(shape: dict) -> int:
    return shape["hidden_size"] // shape["num_attention_heads"]


def layer_linears(shape: dict) -> list[tuple[int, int]]:
    """(in, out) of every linear layer in one decoder layer: q, k, v, o, gate, up, down."""
    d, i, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"] * head_dim(shape)
    return [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]


def matmul_params(shape: dict) -> int:
    """Weights that take part in a matrix product per token: every layer's linears plus the output head
    (tied or not; the embedding lookup is no product). Biases and norms are negligible."""
    per_layer = sum(a * b for a, b in layer_linears(shape))
    return shape["num_hidden_layers"] * per_layer + shape["vocab_size"] * shape["hidden_size"]


def lora_params(shape: dict, r: int) -> int:
    """LoRA on all linear layers but the head (peft's `all-linear`): r * (in + out) each."""
    return shape["num_hidden_layers"] * sum(r * (a + b) for a, b in layer_linears(shape))


def kv_bytes_per_position(shape: dict, dtype_bytes: int = 2) -> int:
    """K and V of one token position, all layers, bf16."""
    return shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * head_dim(shape) * dtype_bytes


def train_flops_per_token(shape: dict, r: int, mean_len_weighted: float) -> float:
    """Useful FLOPs per trained token for LoRA on a frozen base.

    - frozen base: forward 2*N, backward 2*N for the activation gradients; no weight gradients.
    - LoRA weights: 6 * N_lora (forward, activation and weight gradients).
    - attention: a causal sequence of S tokens costs 2*S^2*d per layer forward (QK^T and AV, half the
      square), times 3 with the backward: per token 6*d*L*S. Over sequences of several lengths S is
      sum(S^2)/sum(S) (`mean_len_weighted`). Padding is not counted: these are useful FLOPs.
    """
    d, layers = shape["num_attention_heads"] * head_dim(shape), shape["num_hidden_layers"]
    return 4 * matmul_params(shape) + 6 * lora_params(shape, r) + 6 * d * layers * mean_len_weighted


def decode_bytes(shape: dict, decode_steps: int, kv_positions: int) -> float:
    """Bytes a decode must read at the least: all weights once per forward pass (a pass serves the whole
    batch) plus each sequence's K/V cache once per generated token. `kv_positions` is the sum over
    generated tokens of the context length they attend to (padding not counted); prefill is counted as
    one pass. Activations and the new K/V written are negligible next to these."""
    return decode_steps * matmul_params(shape) * 2 + kv_positions * kv_bytes_per_position(shape)


def kv_positions(prompt_lens: list[int], new_tokens: int) -> int:
    """Sum over sequences and generated tokens t of (prompt length + t)."""
    t = new_tokens
    return sum(t * n + t * (t - 1) // 2 for n in prompt_lens)


if __name__ == "__main__":
    main()
