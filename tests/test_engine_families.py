"""The engine on every model family it runs (engine/families.py), on CPU: tiny random models
built from each family's transformers config class, with several layers, grouped-query heads and a
sliding window shorter than the sequences where the family has one; the output head scaled up so
that greedy choices never hinge on float rounding.

- logits: the engine's prefill and each decode step against the model's own forward;
- in one process: the engine's greedy tokens against `generate`'s, with more prompts than slots;
- real runs (slow): the runner with generation.engine=fast on 2 ranks against engine=hf on 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
import transformers
from transformers import GenerationConfig

from llmbatch.engine.attention import decode_attention, prefill_attention
from llmbatch.engine.cache import KVCache
from llmbatch.engine.model import EngineModel, cache_shape, capturable, describe
from llmbatch.engine.params import EngineParams
from llmbatch.engine.runner import Engine
from llmbatch.runners.infer import choose_engine

from helpers import new_run, runner_command

TINY = dict(
    num_hidden_layers=3,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)
WINDOW = 4
"""Shorter than every prompt-plus-output below but the shortest."""

LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    original_max_position_embeddings=8,
    short_factor=[1.0, 1.3, 1.7, 2.2],
    long_factor=[2.0, 3.5, 5.0, 9.0],
)

FAMILIES = {
    # name: (config class, model class, config beyond TINY)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            )
        ),
    ),
    "yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8)
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=20.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(partial_rotary_factor=0.5, sliding_window=WINDOW + 1, rope_parameters=LONGROPE),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            norm_topk_prob=True,
            use_sliding_window=True,
            sliding_window=WINDOW,
        ),
    ),
}


def tiny_model(name: str, **config):
    config_name, model_name, extra = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**(TINY | extra | config)))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaky logits: greedy choices far from ties
    return model.eval()


def full_forward_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    return torch.cat([model(torch.tensor([s])).logits[:, -1] for s in sequences]).float()


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_and_decode_logits_equal_the_models(name):
    model = tiny_model(name)
    # phi3: prompts over LongRoPE's original context (8) and under it in one batch, each with its
    # own factors; the short ones stay under it for all their steps, as the full forward then agrees.
    prompts = (
        [[3, 5, 7, 9, 11, 13, 15, 17, 19, 21], [4, 6, 8], [10, 12]]
        if name == "phi3"
        else [[3, 5, 7, 9, 11, 13, 15, 17, 19], [4, 6, 8], [10, 12, 14, 16, 18, 20]]
    )
    steps = 5
    slot_len = max(map(len, prompts)) + steps
    engine_model = EngineModel(model, slot_len)
    cache = KVCache(cache_shape(model), slots=4, slot_len=slot_len, device=torch.device("cpu"))
    slots = torch.tensor([2, 0, 3])
    lengths = torch.tensor([len(p) for p in prompts])
    width = max(map(len, prompts))
    padded = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    sequences = [list(p) for p in prompts]
    with torch.inference_mode():
        logits = engine_model.prefill(padded, lengths, slots, cache)
        torch.testing.assert_close(logits, full_forward_logits(model, sequences), rtol=1e-4, atol=1e-4)
        for _ in range(steps):
            tokens = logits.argmax(dim=-1)
            positions = torch.tensor([len(s) for s in sequences])
            for sequence, token in zip(sequences, tokens.tolist()):
                sequence.append(token)
            logits = engine_model.decode(tokens, positions, slots, cache)
            torch.testing.assert_close(logits, full_forward_logits(model, sequences), rtol=1e-4, atol=1e-4)
    assert len({t for s in sequences for t in s[-steps:]}) > 2  # the outputs are not one repeated token


def test_the_families_layers_are_read_from_the_modules():
    windows = {
        name: [layer.window for layer in EngineModel(tiny_model(name), 32).layers]
        for name in ("qwen2", "mistral", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "llama")
    }
    assert windows["qwen3"] == windows["qwen2"] == [None, WINDOW, WINDOW]  # from max_window_layers on
    assert windows["gemma2"] == [WINDOW, None, WINDOW]  # alternating, sliding first
    assert windows["gemma3"] == [WINDOW, None, WINDOW]
    assert windows["mistral"] == windows["mixtral"] == windows["qwen3_moe"] == [WINDOW] * 3
    assert windows["phi3"] == [WINDOW + 1] * 3 and windows["llama"] == [None] * 3
    gemma3 = EngineModel(tiny_model("gemma3"), 32)
    local, full = (gemma3.rotary.tables[t][0] for t in ("sliding_attention", "full_attention"))
    assert not torch.equal(local, full)  # Gemma 3's own rotary base per layer type
    assert gemma3.scale == 24**-0.5 and gemma3.sandwich
    assert describe(tiny_model("gemma2")) == f"Gemma 2, sliding window {WINDOW} on 2 of 3 layers, soft-capping"
    assert describe(tiny_model("phi3")) == f"Phi-3/Phi-4, sliding window {WINDOW + 1} on 3 of 3 layers, rotary longrope"
    assert describe(tiny_model("mixtral")).startswith(
        f"Mixtral, sliding window {WINDOW} on 3 of 3 layers, mixture of experts ("
    )


def test_llama3_and_yarn_rotary_tables_are_the_models_own_scaled_ones():
    # The engine takes cos/sin from the model's rotary_emb: Llama 3's and YaRN's scaling are in them
    # (they differ from the unscaled table), so the logits test above covers those models.
    plain = EngineModel(tiny_model("llama"), 64).rotary.tables[None]
    for name in ("llama3-rope", "yarn"):
        model = tiny_model(name)
        assert model.model.rotary_emb.rope_type == name.split("-")[0]
        table = EngineModel(model, 64).rotary.tables[None]
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(64)[None])
        assert torch.equal(table[0], cos[0]) and torch.equal(table[1], sin[0])
        assert not torch.allclose(table[0], plain[0])


def test_windowed_and_soft_capped_attention_equal_a_plain_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 9, 4, 8, generator=g),
        torch.randn(2, 9, 2, 8, generator=g),
        torch.randn(2, 9, 2, 8, generator=g),
    )

    def reference(q, k, v, window, softcap):
        k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i, j = torch.arange(q.shape[1])[:, None], torch.arange(k.shape[1])[None, :]
        seen = (j <= i) & ((j > i - window) if window else True)
        return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~seen, float("-inf")).softmax(-1), v)

    for window, softcap in [(3, None), (None, 2.0), (4, 2.0), (20, None)]:
        expected = reference(q, k, v, window, softcap)
        torch.testing.assert_close(prefill_attention(q, k, v, 0.3, window, softcap), expected, rtol=1e-5, atol=1e-5)
        # decode: the last position of each row, its keys read from slots
        lengths = torch.tensor([9, 6])
        got = decode_attention(
            q[torch.arange(2), lengths - 1], k, v, torch.tensor([0, 1]), lengths, 0.3, window, softcap
        )
        want = torch.stack(
            [
                reference(q[r : r + 1, :n], k[r : r + 1, :n], v[r : r + 1, :n], window, softcap)[0, -1]
                for r, n in enumerate(lengths.tolist())
            ]
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def generate_one_at_a_time(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model.generation_config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=[1], pad_token_id=0
    )
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]))[0, len(p) :].tolist() for p in prompts]


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in ("llama", "qwen2")])
def test_engine_greedy_tokens_equal_generates_with_refilled_slots(name):
    torch.set_num_threads(1)
    model = (
        tiny_model(name, rope_parameters=dict(LONGROPE, original_max_position_embeddings=64))
        if name == "phi3"
        else tiny_model(name)
    )
    prompts = [[(7 * i + 3 * j) % 120 + 2 for j in range(3 + (5 * i) % 9)] for i in range(10)]
    new_tokens = 7
    slot_len = max(map(len, prompts)) + new_tokens - 1
    params = EngineParams(max_new_tokens=new_tokens, ignore_eos=True, batch_tokens=3 * slot_len)  # 3 slots
    engine = Engine(model, params, [len(p) for p in prompts], eos_ids={1})
    engine.warm_up()
    got = {}
    for group in engine.run(prompts, [str(i) for i in range(len(prompts))], stop=lambda: False):
        got.update(group)
    assert engine.stats.slots == 3
    assert [got[i] for i in range(len(prompts))] == generate_one_at_a_time(model, prompts, new_tokens)


def test_auto_names_the_family_and_falls_back_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert choose_engine("auto", gpt2) == (
        False,
        "generate: the engine does not support model type 'gpt2' (the engine runs llama, mistral, qwen2, "
        "qwen3, gemma2, gemma3_text, phi3, mixtral, qwen3_moe)",
    )
    with pytest.raises(ValueError, match="generation.engine: fast cannot run this model: model type 'gpt2'"):
        choose_engine("fast", gpt2)
    dynamic = tiny_model("llama", rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    use, why = choose_engine("auto", dynamic)
    assert not use and why == (
        "generate: the engine does not support rotary scaling 'dynamic' (it changes with the batch's longest sequence)"
    )
    mistral = tiny_model("mistral")
    assert choose_engine("auto", mistral) == (True, "the engine")  # a window shorter than the sequences runs
    assert choose_engine("hf", mistral) == (False, "generate (generation.engine: hf)")
    engine = Engine(tiny_model("gemma3"), EngineParams(), [5, 9], eos_ids={1})
    assert engine.describe().startswith(f"Gemma 3, sliding window {WINDOW} on 2 of 3 layers; eager attention on CPU; ")


def test_only_grouped_bfloat16_experts_are_captured_in_cuda_graphs():
    mixtral = tiny_model("mixtral")
    assert capturable(tiny_model("gemma3")) and not capturable(mixtral)  # float32: no graphs for experts
    mixtral.to(torch.bfloat16)
    mixtral.set_experts_implementation("grouped_mm")
    assert capturable(mixtral)
    mixtral.set_experts_implementation("eager")  # a loop over the experts, syncing with the host
    assert not capturable(mixtral)


# --- real runs: the runner, engine=fast on 2 ranks against generate ---------------------------------

RUNNER_FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def tokenizer_files(model_dir):
    return [model_dir / name for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")]


def infer(run, processes: int) -> bytes:
    cmd = runner_command(run, processes)
    proc = subprocess.run(cmd.argv, env=os.environ | cmd.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr, run.results_file.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNER_FAMILIES)
def test_the_runner_gives_generates_greedy_results_with_the_engine_on_2_ranks(tmp_path, tokenizer_files, name):
    # phi3: LongRoPE's switch is per batch in generate, per sequence in the engine; with an original
    # context longer than the sequences both keep the short factors.
    extra = dict(rope_parameters=dict(LONGROPE, original_max_position_embeddings=200)) if name == "phi3" else {}
    model = tiny_model(name, vocab_size=1024, **extra)
    folder = tmp_path / name
    model.save_pretrained(folder)
    for file in tokenizer_files:
        shutil.copy(file, folder)
    common = ["data.max_inputs=24", "generation.max_new_tokens=8"]
    _, generate = infer(new_run(tmp_path / "runs", folder, "infer", [*common, "generation.engine=hf"]), 1)
    # 60 positions: a few slots per rank for its 12 prompts, refilled as sequences end.
    log, fast = infer(
        new_run(tmp_path / "runs", folder, "infer", [*common, "generation.engine=fast", "generation.batch_tokens=60"]),
        2,
    )
    assert fast == generate
    family = FAMILIES[name][1].removesuffix("ForCausalLM")
    assert "with the engine (" in log and "eager attention on CPU" in log, log[-2000:]
    assert family.lower()[:5] in log.lower().replace(" ", "").replace("-", ""), log[-2000:]
