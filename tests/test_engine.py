"""The inference engine (engine/): its bookkeeping, its sampler and attention against plain
references, and its outputs against `generate` on the embedded model, on CPU (the same code as on a
GPU, with eager attention and no CUDA graphs). Multi-process runs through the runner are in
test_infer.py, which runs the engine by default (generation.engine: auto).
"""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest
import torch

from llmbatch.engine.attention import decode_attention
from llmbatch.engine.cache import CacheShape, count_slots
from llmbatch.engine.graphs import bucket_sizes
from llmbatch.engine.runner import Engine
from llmbatch.engine.sampler import _mul32, gumbel_noise, input_key
from llmbatch.engine.scheduler import Scheduler
from llmbatch.prompts import encode_texts
from llmbatch.runners.generation import Decoder, eos_token_ids, make_completion
from llmbatch.runners.model_loading import load_model
from llmbatch.runners.sampling import engine_params
from llmbatch.spec import GenerationSpec, ModelSpec

# --- bookkeeping ---------------------------------------------------------------------------------


def test_the_scheduler_refills_slots_and_runs_every_prompt_once():
    lengths = [5, 40, 12, 33, 7, 40, 20, 3, 18, 25]
    scheduler = Scheduler(lengths, slots=3)
    started, rng = [], random.Random(0)
    while not scheduler.done:
        admitted = scheduler.admit()
        started += [s.index for s in admitted]
        rows = scheduler.rows()
        assert 0 < len(rows) <= 3 and len({s.slot for s in rows}) == len(rows)
        assert all(0 <= s.slot < 3 for s in rows)
        for sequence in rows:  # each step ends some sequences at random
            if rng.random() < 0.4:
                scheduler.finish(sequence)
    assert sorted(started) == list(range(len(lengths)))
    assert [lengths[i] for i in started] == sorted(lengths, reverse=True)  # longest first


def test_the_scheduler_waits_for_enough_free_slots_while_others_run():
    scheduler = Scheduler([10] * 40, slots=16)  # admits in groups of 16 // 8 = 2
    assert len(scheduler.admit()) == 16
    first, second, *_ = scheduler.rows()
    scheduler.finish(first)
    assert scheduler.admit() == []  # one free slot: not worth a prefill while 15 run
    scheduler.finish(second)
    assert sorted(s.slot for s in scheduler.admit()) == sorted([first.slot, second.slot])


def test_bucket_sizes_cover_every_row_count_with_little_padding():
    sizes = bucket_sizes(1000)
    assert sizes[0] == 1 and sizes[-1] == 1000 and sizes == sorted(set(sizes))
    for rows in range(1, 1001):
        bucket = next(s for s in sizes if s >= rows)
        assert bucket < 2 * rows or rows == 1
        assert rows < 16 or bucket - rows <= rows // 2


def test_slots_fit_the_memory_cap_and_the_token_budget():
    shape = CacheShape(layers=4, kv_heads=2, head_dim=64, dtype=torch.float32)  # 4 KiB a position
    assert shape.bytes_per_position == 4096
    assert count_slots(shape, 100, 1000, free_bytes=2**30, cap_gb=None, batch_tokens=None) == 1000
    assert count_slots(shape, 100, 1000, free_bytes=2**30, cap_gb=0.01, batch_tokens=None) == 26
    assert count_slots(shape, 100, 1000, free_bytes=10 * 4096 * 100, cap_gb=None, batch_tokens=None) == 10
    assert count_slots(shape, 100, 1000, free_bytes=2**30, cap_gb=None, batch_tokens=350) == 3
    assert count_slots(shape, 100, 1000, free_bytes=0, cap_gb=None, batch_tokens=None) == 1


# --- sampler -------------------------------------------------------------------------------------


def test_mul32_is_multiplication_modulo_2_to_the_32():
    rng = random.Random(0)
    xs = [0, 1, 2**32 - 1] + [rng.randrange(2**32) for _ in range(200)]
    for c in (0x85EBCA6B, 0xC2B2AE35, 3):
        assert _mul32(torch.tensor(xs), c).tolist() == [(x * c) % 2**32 for x in xs]


def test_noise_depends_only_on_input_key_and_step():
    keys = torch.tensor([input_key(0, "a"), input_key(0, "b"), input_key(0, "c")])
    steps = torch.tensor([3, 3, 5])
    together = gumbel_noise(keys, steps, 50)
    assert torch.equal(together[1], gumbel_noise(keys[1:2], steps[1:2], 50)[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(together[1], gumbel_noise(keys[1:2], torch.tensor([4]), 50)[0])
    assert input_key(0, "a") != input_key(1, "a")
    assert torch.isfinite(together).all()


def test_gumbel_max_samples_follow_the_softmax():
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    keys = torch.tensor([input_key(0, str(i)) for i in range(20000)])
    noise = gumbel_noise(keys, torch.zeros_like(keys), 4)
    counts = collections.Counter((probabilities.log() + noise).argmax(dim=-1).tolist())
    frequencies = torch.tensor([counts[i] for i in range(4)]) / len(keys)
    assert torch.allclose(frequencies, probabilities, atol=0.015), frequencies


# --- attention -----------------------------------------------------------------------------------


def test_decode_attention_reads_each_rows_slot_up_to_its_length():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(6, 20, 2, 8, generator=g), torch.randn(6, 20, 2, 8, generator=g)
    q = torch.randn(3, 6, 8, generator=g)  # 3 query heads per KV head
    slots, lengths = torch.tensor([4, 0, 2]), torch.tensor([20, 1, 7])
    got = decode_attention(q, keys, values, slots, lengths, scale=0.3)
    for row in range(3):
        k = keys[slots[row], : lengths[row]].repeat_interleave(3, dim=1)  # [len, 6, 8]
        v = values[slots[row], : lengths[row]].repeat_interleave(3, dim=1)
        weights = (torch.einsum("hd,lhd->hl", q[row], k) * 0.3).softmax(dim=-1)
        assert torch.allclose(got[row], torch.einsum("hl,lhd->hd", weights, v), atol=1e-5)


# --- the engine against generate, on the embedded model ----------------------------------------


@pytest.fixture(scope="module")
def embedded(model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads on a busy machine
    model, tokenizer = load_model(ModelSpec(path=str(model_dir)), torch.device("cpu"))
    questions = [f"Is {n} even or odd?" + " Think." * (n % 6) + "\nAnswer:" for n in range(24)]
    yield model, tokenizer, encode_texts(tokenizer, questions, templated=False), [f"q{n}" for n in range(24)]
    torch.set_num_threads(threads)


def make_engine(model, tokenizer, generation: GenerationSpec, prompts) -> Engine:
    return Engine(model, engine_params(generation), [len(p) for p in prompts], eos_token_ids(model, tokenizer))


def run_engine(model, tokenizer, generation: GenerationSpec, prompts, ids) -> tuple[list, Engine]:
    engine = make_engine(model, tokenizer, generation, prompts)
    engine.warm_up()
    done = {}
    for group in engine.run(prompts, ids, stop=lambda: False):
        assert not done.keys() & dict(group).keys()
        done.update(group)
    eos = eos_token_ids(model, tokenizer)
    return [make_completion(tokenizer, eos, done[i]) for i in range(len(prompts))], engine


def test_first_token_logits_equal_the_models(embedded):
    model, tokenizer, prompts, ids = embedded
    engine = make_engine(model, tokenizer, GenerationSpec(), prompts[:5])
    width = max(len(p) for p in prompts[:5])
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts[:5]])
    with torch.inference_mode():
        logits = engine.model.prefill(
            tokens, torch.tensor([len(p) for p in prompts[:5]]), torch.arange(5), engine.cache
        )
        expected = torch.cat([model(torch.tensor([p])).logits[:, -1] for p in prompts[:5]])
    assert torch.allclose(logits, expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_refilled_slots_give_what_one_prompt_at_a_time_gives(embedded, sampling):
    model, tokenizer, prompts, ids = embedded
    generation = GenerationSpec(max_new_tokens=10, do_sample=sampling, temperature=3.0, top_p=0.9, top_k=50, seed=3)
    # Early ends: a token the model writes often ends a sequence, besides the real EOS.
    greedy, _ = run_engine(model, tokenizer, dataclasses.replace(generation, do_sample=False), prompts, ids)
    frequent = collections.Counter(t for c in greedy for t in tokenizer(c.text, add_special_tokens=False)["input_ids"])
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, frequent.most_common(1)[0][0]]
    try:
        decoder = Decoder(model, tokenizer, generation)
        expected = [decoder.complete([p], [i])[0] for p, i in zip(prompts, ids)]
        slot_len = max(map(len, prompts)) + generation.max_new_tokens - 1
        few = dataclasses.replace(generation, batch_tokens=3 * slot_len)  # 3 slots for 24 prompts
        got, engine = run_engine(model, tokenizer, few, prompts, ids)
    finally:
        model.generation_config.eos_token_id = original
    assert engine.stats.slots == 3 and engine.stats.occupancy > 0.5
    assert got == expected
    reasons = collections.Counter(c.finish_reason for c in got)
    assert reasons["eos"] >= 5 and reasons["length"] >= 1, reasons  # refills came at different steps
    assert len({c.tokens for c in got}) >= 3


def test_ignore_eos_runs_every_sequence_to_its_length(embedded):
    model, tokenizer, prompts, ids = embedded
    generation = GenerationSpec(max_new_tokens=6, ignore_eos=True)
    got, _ = run_engine(model, tokenizer, generation, prompts, ids)
    assert got == Decoder(model, tokenizer, generation).complete(prompts, ids)
    assert all(c.tokens == 6 and c.finish_reason == "length" for c in got)


def test_a_stopped_engine_admits_nothing_more_and_returns_what_finished(embedded):
    model, tokenizer, prompts, ids = embedded
    generation = GenerationSpec(max_new_tokens=5, ignore_eos=True, batch_tokens=2 * (max(map(len, prompts)) + 4))
    engine = make_engine(model, tokenizer, generation, prompts)
    groups = engine.run(prompts, ids, stop=lambda: stopped)
    stopped = False
    first = next(groups)  # two slots, so two sequences at a time
    stopped = True
    rest = [c for group in groups for c in group]
    assert 1 <= len(first) + len(rest) <= 2 + 2
    expected = Decoder(model, tokenizer, generation).complete(prompts, ids)
    eos = eos_token_ids(model, tokenizer)
    assert all(make_completion(tokenizer, eos, tokens) == expected[i] for i, tokens in first + rest)


def test_each_prompt_keeps_its_own_seed_and_length_in_the_engine_and_in_generate(embedded):
    # An OpenAI batch line's seed and max_tokens: as if each prompt ran alone with them as the spec's.
    model, tokenizer, prompts, ids = embedded
    prompts, ids = prompts[:8], ids[:8]
    generation = GenerationSpec(max_new_tokens=8, do_sample=True, temperature=3.0, top_p=0.9, seed=0)
    seeds, limits = [0, 1, 2, 3, 0, 1, 2, 3], [8, 3, 5, 1, 8, 2, 7, 4]
    alone = [
        Decoder(model, tokenizer, dataclasses.replace(generation, seed=seed, max_new_tokens=limit)).complete([p], [i])[
            0
        ]
        for p, i, seed, limit in zip(prompts, ids, seeds, limits)
    ]
    engine = make_engine(model, tokenizer, generation, prompts)
    engine.warm_up()
    done = {}
    for group in engine.run(prompts, ids, lambda: False, seeds, limits):
        done.update(group)
    eos = eos_token_ids(model, tokenizer)
    assert [make_completion(tokenizer, eos, done[i]) for i in range(len(prompts))] == alone
    assert Decoder(model, tokenizer, generation).complete(prompts, ids, seeds, limits) == alone
    assert all(c.tokens <= limit for c, limit in zip(alone, limits)) and alone[3].tokens == 1
    other_seed = Decoder(model, tokenizer, dataclasses.replace(generation, seed=1)).complete(prompts[:1], ids[:1])
    assert other_seed != alone[:1]  # the seed is the line's, not the spec's
