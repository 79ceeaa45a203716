"""The inference runner: how inputs are split over ranks and batches, seeded sampling, adapters,
and real multi-process runs on CPU, killed, preempted and resumed.

Launches go through `accelerate launch` as on a node (ACCELERATE_USE_CPU, `--multi_gpu` for more than
one process), so ranks, the gloo process group and the final merge are the real ones. Shards and
gather: test_gather.py; prompt rendering and encoding: test_prompts.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmbatch.lifecycle import read_progress
from llmbatch.prompts import encode_prompts, fit_to_context
from llmbatch.runners.generation import Completion, Decoder
from llmbatch.runners.infer import encode_share, prompt_lengths, result_record, token_balanced_share
from llmbatch.runners.model_loading import load_model
from llmbatch.runners.preemption import PREEMPTED_EXIT
from llmbatch.runners.sampling import SeededSampling
from llmbatch.runners.split import assign_to_ranks, plan_batches
from llmbatch.shards import list_shards, read_records
from llmbatch.spec import DataSpec, GenerationSpec, ModelSpec

from helpers import SMALL, as_inputs, infer, inputs_of, runner_command, submit_cli

# Hot enough that samples differ from greedy outputs even where the model is sure.
SAMPLING = ["generation.do_sample=true", "generation.temperature=3.0", "generation.top_p=0.95", "generation.seed=7"]


# --- sharding and batching -----------------------------------------------------------------------


def test_ranks_are_balanced_by_tokens_not_by_count():
    costs = [400] + [40] * 10
    shares = assign_to_ranks(costs, 2)
    assert sorted(sum(costs[i] for i in share) for share in shares) == [400, 400]
    assert sorted(len(share) for share in shares) == [1, 10]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 50])
def test_every_input_goes_to_exactly_one_rank(world_size):
    costs = [(i * 37) % 23 + 1 for i in range(41)]
    shares = assign_to_ranks(costs, world_size)
    assert len(shares) == world_size
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    assert shares == assign_to_ranks(costs, world_size)
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)


class CountingTokenizer:
    """A real tokenizer that counts the texts it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encoded = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.encoded += len(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("limit", [None, 12])
def test_each_rank_encodes_only_its_share_and_the_split_is_that_of_encoding_every_prompt(model_dir, limit):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = as_inputs([f"Question {i}: " + "is it even or odd " * (i * 7 % 5) + "?" for i in range(53)])
    data, max_new, tasks, ranks, done = DataSpec(), 8, 3, 2, {"q4", "q9", "q30"}
    # The split as it was: every rank encoded every prompt, then split all of them.
    whole = encode_prompts(tokenizer, inputs, data)
    encoded = [ids if limit is None else fit_to_context(ids, limit, tokenizer.bos_token_id) for ids in whole]
    costs = [len(ids) + max_new for ids in encoded]
    expected = {}
    for task, share in enumerate(assign_to_ranks(costs, tasks)):
        todo = [i for i in share if inputs[i].id not in done]
        for rank, picked in enumerate(assign_to_ranks([costs[i] for i in todo], ranks)):
            expected[task * ranks + rank] = [
                (inputs[i].id, encoded[i], encoded[i] != whole[i]) for i in (todo[j] for j in picked)
            ]

    # Each rank counts every ranks-th prompt; all_gather would bring the others' counts.
    counting = [CountingTokenizer(tokenizer) for _ in range(ranks)]
    counts = [
        prompt_lengths(counting[rank], inputs[rank::ranks], data, limit, 0, 1, lambda c: [c]) for rank in range(ranks)
    ]
    for task in range(tasks):
        for rank in range(ranks):
            tokenizer_here = CountingTokenizer(tokenizer)
            lengths = prompt_lengths(
                tokenizer_here,
                inputs,
                data,
                limit,
                rank,
                ranks,
                lambda mine, rank=rank: [mine if r == rank else counts[r] for r in range(ranks)],
            )
            share = token_balanced_share(lengths, task, tasks, max_new)
            todo = [i for i in share if inputs[i].id not in done]
            picked = token_balanced_share([lengths[i] for i in todo], rank, ranks, max_new)
            mine = encode_share(tokenizer_here, [inputs[todo[i]] for i in picked], data, limit)
            assert [(p.input.id, p.token_ids, p.truncated) for p in mine] == expected[task * ranks + rank]
            # Its stride of the counts and its own inputs: not every prompt.
            assert tokenizer_here.encoded == len(inputs[rank::ranks]) + len(mine) < len(inputs)
    assert sorted(id for share in expected.values() for id, _, _ in share) == sorted(
        e.id for e in inputs if e.id not in done
    )
    assert any(cut for share in expected.values() for _, _, cut in share) == (limit is not None)


def test_with_include_rendered_prompt_a_result_holds_the_text_the_model_read(tokenizer):
    inputs, chat = as_inputs(["Is 7 even or odd?", "Is 12 even or odd?"]), DataSpec(chat_template=True)
    rendered = [f"User: {item.prompt}\nAssistant:" for item in inputs]
    assert [p.text for p in encode_share(tokenizer, inputs, chat, None, keep_texts=True)] == rendered
    assert [p.text for p in encode_share(tokenizer, inputs, DataSpec(), None, keep_texts=True)] == [
        item.prompt for item in inputs
    ]
    cut = encode_share(tokenizer, inputs, chat, 5, keep_texts=True)
    done = Completion(" odd", 2, "eos")
    records = [result_record(prompt, done, "exact") for prompt in cut]
    # As rendered: a truncated prompt's record says so, and holds the whole text.
    assert [(r["rendered_prompt"], r["truncated"], r["prompt_tokens"]) for r in records] == [
        (text, True, 5) for text in rendered
    ]
    assert "rendered_prompt" not in result_record(encode_share(tokenizer, inputs, chat, None)[0], done, "exact")


def test_batches_stay_within_the_token_budget():
    lengths = [(i * 13) % 50 + 5 for i in range(60)]
    batches = plan_batches(lengths, max_new_tokens=10, budget=300)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert (max(lengths[i] for i in batch) + 10) * len(batch) <= 300
    assert [lengths[i] for batch in batches for i in batch] == sorted(lengths, reverse=True)


def test_a_prompt_over_the_budget_gets_a_batch_of_its_own():
    assert plan_batches([500, 3, 3], max_new_tokens=10, budget=100) == [[0], [1, 2]]


def test_sampling_noise_of_an_input_does_not_depend_on_its_batch():
    scores = torch.randn(3, 50)
    input_ids = torch.zeros(3, 7, dtype=torch.long)  # prompt width 5, step 2
    together = SeededSampling([0] * 3, ["a", "b", "c"], prompt_width=5)(input_ids, scores.clone())
    alone = SeededSampling([0], ["b"], prompt_width=3)(input_ids[1:2, 2:], scores[1:2].clone())
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0] - scores[0], together[1] - scores[1])
    other_step = SeededSampling([0] * 3, ["a", "b", "c"], prompt_width=4)(input_ids, scores.clone())
    assert not torch.equal(together, other_step)


@pytest.fixture
def one_torch_thread():
    """A tiny model gains nothing from threads, and a busy machine makes them spin: one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_completion_does_not_depend_on_its_batch(model_dir, one_torch_thread):
    model, tokenizer = load_model(ModelSpec(path=str(model_dir)), torch.device("cpu"))
    questions = [f"Is {n} even or odd?\nAnswer:" for n in (7, 1234, 99, 500001, 42, 86420)]
    prompts, ids = encode_prompts(tokenizer, as_inputs(questions), DataSpec()), [f"q{i}" for i in range(6)]

    def outputs(generation: GenerationSpec) -> list:
        decoder = Decoder(model, tokenizer, generation)
        # Prompts of different lengths: each grouping pads them differently.
        together = decoder.complete(prompts, ids)
        assert decoder.complete(prompts[:3], ids[:3]) + decoder.complete(prompts[3:], ids[3:]) == together
        assert [decoder.complete([p], [i])[0] for p, i in zip(prompts, ids)] == together
        return together

    greedy = outputs(GenerationSpec(max_new_tokens=6))
    sampled = outputs(GenerationSpec(max_new_tokens=6, do_sample=True, temperature=3.0, top_p=0.95, seed=7))
    assert sampled != greedy
    assert sampled != outputs(GenerationSpec(max_new_tokens=6, do_sample=True, temperature=3.0, top_p=0.95, seed=8))
    assert all(c.finish_reason == "length" and c.tokens == 6 for c in greedy)


def test_an_adapter_is_loaded_and_merged(model_dir, tmp_path, one_torch_thread):
    from peft import LoraConfig, PeftModel, get_peft_model  # slow to import: only here

    input_ids = torch.tensor([[1, 50, 60, 70]])
    tuned = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    tuned.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = tuned(input_ids).logits
        base = tuned.get_base_model()
        with tuned.disable_adapter():
            untuned = tuned(input_ids).logits
    model, _ = load_model(ModelSpec(path=str(model_dir), adapter=str(tmp_path / "adapter")), torch.device("cpu"))
    assert not isinstance(model, PeftModel) and type(model) is type(base)
    with torch.no_grad():
        logits = model(input_ids).logits
    assert torch.allclose(logits, expected, atol=1e-4) and not torch.allclose(logits, untuned, atol=1e-2)


# --- real runs ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_results_do_not_depend_on_rank_count_batches_or_engine(make_run):
    # generate's results, then the engine's on 1, 2 and 3 ranks, with budgets that give each rank a
    # few slots (refilled many times) or none to spare.
    generate = infer(make_run("infer", overrides=[*SMALL, "generation.engine=hf", "generation.batch_tokens=70"]), 1)
    one = infer(make_run("infer", overrides=[*SMALL, "generation.engine=fast"]), 1)
    two = infer(make_run("infer", overrides=[*SMALL, "generation.batch_tokens=70"]), 2)
    run = make_run("infer", overrides=[*SMALL, "generation.batch_tokens=150"])
    three = infer(run, 3)
    assert generate == one == two == three
    results = [json.loads(line) for line in three.decode().splitlines()]
    assert len(results) == 40 and len({r["id"] for r in results}) == 40
    assert {r["finish_reason"] for r in results} <= {"eos", "length"}
    assert all(0 < r["output_tokens"] <= 8 and "correct" in r for r in results)
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["world_size"] == 3 and len(metrics["ranks"]) == 3
    assert metrics["inputs"] == 40 and metrics["scored"] == 40 and 0 <= metrics["accuracy"] <= 1
    assert metrics["output_tokens"] == sum(r["output_tokens"] for r in results)
    assert 0 < metrics["load_balance"] <= 1 and metrics["tokens_per_s"] > 0
    assert all(r["engine"]["slots"] > 0 for r in metrics["ranks"]) and 0 < metrics["occupancy"] <= 1
    assert metrics["decode_steps"] > 0 and metrics["prefill_s"] > 0 and metrics["decode_s"] > 0


@pytest.mark.slow
def test_sampled_results_do_not_depend_on_rank_count_or_engine(make_run):
    sampling = [*SMALL, *SAMPLING]
    one = infer(make_run("infer", overrides=sampling), 1)
    two = infer(make_run("infer", overrides=[*sampling, "generation.batch_tokens=70"]), 2)
    generate = infer(make_run("infer", overrides=[*sampling, "generation.engine=hf"]), 1)
    assert one == two == generate


def shard_lines(run) -> int:
    return sum(len(read_records(s.path)) for s in list_shards(run))


def wait_for_first_record(run, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while not run.shards_dir.exists() or shard_lines(run) == 0:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)


@pytest.mark.slow
def test_a_killed_run_resumed_with_another_rank_count_gives_the_same_results(make_run, tmp_path):
    data = ["data.max_inputs=100", "generation.max_new_tokens=8"]
    expected = infer(make_run("infer", overrides=data), 1)

    # Two rows a batch: many small batches, so the kill lands mid-run.
    run = make_run("infer", overrides=[*data, "generation.batch_tokens=60"])
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        cmd = runner_command(run, 2, attempt=0)
        proc = subprocess.Popen(cmd.argv, env=os.environ | cmd.env, stdout=out, stderr=out)
        wait_for_first_record(run, proc, log)
        # The launcher starts each rank in a session of its own: kill them by id, writers first.
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            process.kill()
        proc.wait()
    assert not run.results_file.exists()

    # Tear the longest shard's last record in half, as a kill during the write would.
    longest = max(list_shards(run), key=lambda s: s.path.stat().st_size).path
    content = longest.read_bytes()
    last_start = content.rstrip(b"\n").rfind(b"\n") + 1
    longest.write_bytes(content[: last_start + (len(content) - last_start) // 2])
    done = shard_lines(run)
    assert 0 < done < 100

    progress = read_progress(run)
    assert (progress["done"], progress["total"]) == (done, 100)
    gather = submit_cli("gather", str(run.path), check=False)
    assert gather.returncode != 0 and not run.results_file.exists()
    written = {r["id"] for s in list_shards(run) for r in read_records(s.path)}
    first_missing = next(e.id for e in inputs_of(run) if e.id not in written)
    assert f"{100 - done} of 100 inputs have no result" in gather.stderr and first_missing in gather.stderr

    assert infer(run, 3, attempt=1) == expected
    assert shard_lines(run) == 100  # nothing generated twice


@pytest.mark.slow
def test_a_preempted_rank_stops_after_its_batch_and_the_run_resumes(make_run, tmp_path):
    run = make_run("infer", overrides=[*SMALL, "generation.batch_tokens=30"])  # one cache slot
    argv = [sys.executable, "-m", "llmbatch.runners.infer", "--run-dir", str(run.path), "--attempt", "0"]
    log = tmp_path / "preempted.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=out, stderr=out)
        wait_for_first_record(run, proc, log)
        proc.send_signal(signal.SIGUSR2)
        assert proc.wait(timeout=60) == PREEMPTED_EXIT, log.read_text()
    assert "with the engine" in log.read_text() and "stopped at a preemption signal" in log.read_text()
    assert 0 < shard_lines(run) < 40
    assert not run.results_file.exists()
    results = infer(run, 1, attempt=1)
    assert len(results.splitlines()) == 40
    # Killed after the last record but before the merge: the next attempt has nothing left but that.
    run.results_file.unlink()
    assert infer(run, 1, attempt=2) == results
