"""Batch inference on every rank: `accelerate launch -m llmbatch.runners.infer --run-dir RUN --attempt A`.

The recipe: load the spec, data and model; skip inputs an earlier attempt finished; split the rest
over the ranks by tokens; complete them with the engine (continuous batching, engine/) or,
where it cannot run the model, with `generate` in length-sorted batches within a token budget;
append finished inputs to this rank's shard in small groups; when every rank is done, the main
process gathers the shards. An array task (`--task T`, resources.array) first takes its own share of
the inputs, split over the tasks by tokens, and its main process gathers only if it is the last task
to finish.

At a preemption signal (SIGUSR2, forwarded by the node job) or SIGTERM a rank admits no more inputs,
writes what has finished, and exits with PREEMPTED_EXIT within a decode step (the engine) or a batch
(generate); the next attempt redoes the unfinished ones, with any rank count.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm import tqdm

from llmbatch import scoring
from llmbatch.data import Input, check_settings, load_inputs
from llmbatch.engine.model import unsupported_reason
from llmbatch.engine.runner import Engine, EngineStats
from llmbatch.gather import gather_shards, gather_when_complete
from llmbatch.heartbeat import start_heartbeat
from llmbatch.metrics import Metric
from llmbatch.models import prompt_token_limit
from llmbatch.prompts import encode_prompts, encode_texts, fit_to_context, plain_prompt_warning, prompt_texts, templated
from llmbatch.rundir import RunDir
from llmbatch.runners.faults import run_rank
from llmbatch.runners.generation import Completion, Decoder, batch_token_budget, eos_token_ids, make_completion
from llmbatch.runners.model_loading import load_model
from llmbatch.runners.preemption import PREEMPTED_EXIT, PreemptionFlag
from llmbatch.runners.sampling import engine_params, input_generation, sampling_key
from llmbatch.runners.split import assign_to_ranks, plan_batches
from llmbatch.shards import ShardWriter, done_ids, global_rank, shard_for, write_stats
from llmbatch.spec import DataSpec, GenerationSpec, JobSpec, OutputSpec, load_resolved, slurm_time_seconds


@dataclass(frozen=True)
class Prompt:
    input: Input
    token_ids: list[int]
    truncated: bool = False
    text: str | None = None
    """The text the model read (through the chat template, if any): only with output.include_rendered_prompt."""


@dataclass
class RankStats:
    """What one rank did in one attempt: the sidecar beside its shard, read by gather."""

    attempt: int
    rank: int
    """Over the whole run: an array task's ranks follow those of the tasks before it."""
    world_size: int
    task: int = 0
    """The array task (0 for a job that is not an array)."""
    inputs: int = 0
    writes: int = 0
    """Groups of records appended to the shard (a batch each with generate)."""
    prompt_tokens: int = 0
    output_tokens: int = 0
    load_s: float = 0.0
    """Start-up to the first batch: spec, data, model, tokenization, the engine's cache and warm-up."""
    generate_s: float = 0.0
    wall_s: float = 0.0
    engine: dict | None = None
    """The engine's `EngineStats.summary()`; None where generate ran."""

    def add_records(self, records: list[dict]) -> None:
        self.inputs += len(records)
        self.writes += 1
        self.prompt_tokens += sum(r["prompt_tokens"] for r in records)
        self.output_tokens += sum(r["output_tokens"] for r in records)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmbatch.runners.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--attempt", type=int, required=True, help="0 for the first launch, +1 per resume")
    parser.add_argument("--task", type=int, help="the array task (resources.array) whose share this job runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    run = RunDir.open(args.run_dir)
    spec = load_resolved(run.spec_file)
    collective_timeout = timedelta(seconds=spec.resources.collective_timeout_s)
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout)])
    finish_line = FinishLine(spec)
    preemption = PreemptionFlag(run.preempt_marker(args.attempt, args.task))
    task, tasks = args.task or 0, spec.resources.array or 1
    stats = RankStats(
        args.attempt,
        global_rank(task, accelerator.num_processes, accelerator.process_index),
        tasks * accelerator.num_processes,
        task=task,
    )
    run.record_rank(args.attempt, stats.rank)
    start_heartbeat(run.rank_record(args.attempt, stats.rank), spec.resources.collective_timeout_s)

    inputs = load_inputs(spec.data)
    check_settings(inputs, spec.data, spec.generation)  # a spec.yaml edited since submission
    model, tokenizer = load_model(spec.model, accelerator.device)
    if accelerator.is_main_process and (warning := plain_prompt_warning(spec.data, bool(tokenizer.chat_template))):
        print(warning, flush=True)
    limit = prompt_token_limit(model.config.to_dict(), spec.generation.max_new_tokens)
    truncate = limit if spec.generation.long_prompts == "truncate" else None  # "error": refused before queueing
    lengths = prompt_lengths(
        tokenizer,
        inputs,
        spec.data,
        truncate,
        accelerator.process_index,
        accelerator.num_processes,
        finish_line.all_gather,
    )
    # The task's share is fixed (from every input), so a requeued or resumed task redoes only its own.
    share = token_balanced_share(lengths, task, tasks, spec.generation.max_new_tokens)
    done = done_ids(run, before_attempt=args.attempt)
    todo = [i for i in share if inputs[i].id not in done]
    picked = token_balanced_share(
        [lengths[i] for i in todo], accelerator.process_index, accelerator.num_processes, spec.generation.max_new_tokens
    )
    mine = encode_share(
        tokenizer, [inputs[todo[i]] for i in picked], spec.data, truncate, spec.output.include_rendered_prompt
    )
    completions, how, engine_stats = start_completing(
        spec.generation, model, tokenizer, mine, stop=lambda: preemption.raised
    )
    where = f"task {task} of {tasks}, " if args.task is not None else ""
    print(
        f"{where}rank {stats.rank} of {stats.world_size}, attempt {args.attempt}: {len(todo)} of {len(share)} "
        f"inputs left ({len(share) - len(todo)} done earlier); {len(mine)} here, with {how}",
        flush=True,
    )
    if args.task is not None and accelerator.is_main_process:
        run.update_tasks({task: {"inputs": len(share)}})

    shard = shard_for(run, args.attempt, stats.rank)
    stats.load_s = time.monotonic() - started
    with ShardWriter(shard) as writer, progress_bar(accelerator, len(mine)) as bar:
        for group in completions:
            records = [result_record(mine[i], c, spec.output.scoring) for i, c in group]
            writer.append(records)
            stats.add_records(records)
            bar.update(len(records))
    if engine_stats is not None:
        stats.engine = engine_summary(engine_stats)
    if preemption.raised:
        print(f"rank {stats.rank}: stopped at a preemption signal after {stats.inputs} inputs", flush=True)
        return PREEMPTED_EXIT
    stats.wall_s = time.monotonic() - started
    stats.generate_s = stats.wall_s - stats.load_s
    write_stats(shard, asdict(stats))

    finish_line.wait()
    if accelerator.is_main_process:
        gather(run, inputs, args.task, spec.output)
    return 0  # the process groups stay until the rank exits (faults.run_rank)


def gather(run: RunDir, inputs: list[Input], task: int | None, output: OutputSpec) -> None:
    """A job gathers its shards; of an array's tasks, the last to finish does (see `gather_when_complete`)."""
    if task is None:
        metrics = gather_shards(run, inputs, output)
    elif (metrics := gather_when_complete(run, inputs, output)) is None:
        print(f"task {task} done; the last task to finish gathers the results", flush=True)
        return
    print(f"gathered {metrics[Metric.INPUTS]} results into {run.results_for(output.format)}", flush=True)
    run.release_space()  # the run is complete: nothing more to report a full disk for


def prompt_lengths(
    tokenizer,
    inputs: list[Input],
    data: DataSpec,
    limit: int | None,
    rank: int,
    ranks: int,
    gather: Callable[[list[int]], list[list[int]]],
) -> list[int]:
    """Every input's prompt tokens (cut to `limit` where prompts are truncated to fit the context).

    Each of the `ranks` processes encodes every ranks-th prompt and `gather` (`FinishLine.all_gather`)
    shares the counts, so every process holds the same counts (the split's only input) after encoding
    1/ranks of the inputs instead of all of them.
    """
    counts = [
        len(ids) if limit is None else min(len(ids), limit)
        for ids in encode_prompts(tokenizer, inputs[rank::ranks], data)
    ]
    lengths = [0] * len(inputs)
    for part, part_counts in enumerate(gather(counts)):
        lengths[part::ranks] = part_counts
    return lengths


def token_balanced_share(lengths: list[int], part: int, parts: int, max_new_tokens: int) -> list[int]:
    """Indices into `lengths` (prompt tokens) of part `part` of `parts` (an array task's share of the
    inputs, a rank's of its task's): every process computes the same split, from token counts alone.

    An input costs the tokens its sequence may hold: its prompt plus max_new_tokens.
    """
    return assign_to_ranks([n + max_new_tokens for n in lengths], parts)[part]


def encode_share(
    tokenizer, inputs: list[Input], data: DataSpec, limit: int | None, keep_texts: bool = False
) -> list[Prompt]:
    """The rank's own inputs, encoded (and cut to `limit` where prompts are truncated); with
    `keep_texts` (output.include_rendered_prompt), with the text each was encoded from."""
    texts = prompt_texts(tokenizer, inputs, data)
    kept = texts if keep_texts else [None] * len(texts)
    return [
        Prompt(item, ids, False, text)
        if limit is None or len(ids) <= limit
        else Prompt(item, fit_to_context(ids, limit, tokenizer.bos_token_id), True, text)
        for item, ids, text in zip(inputs, encode_texts(tokenizer, texts, templated(inputs, data)), kept)
    ]


def choose_engine(choice: str, model) -> tuple[bool, str]:
    """(use the engine?, why) for `generation.engine` = auto | fast | hf. `fast` on a model the engine
    cannot run is an error; `auto` falls back to `generate`."""
    if choice == "hf":
        return False, "generate (generation.engine: hf)"
    reason = unsupported_reason(model)
    if reason is None:
        return True, "the engine"
    if choice == "fast":
        raise ValueError(f"generation.engine: fast cannot run this model: {reason}")
    return False, f"generate: the engine does not support {reason}"


@dataclass(frozen=True)
class SamplingGroup:
    """Inputs completed together: the engine and generate take one sampling setting at a time.

    Without per-input settings (anything but an OpenAI batch file) there is one group of every input."""

    generation: GenerationSpec
    """The spec's settings with the group's sampling; max_new_tokens: the most any of its inputs may take."""
    members: list[int]
    """Indices into the rank's prompts."""
    seeds: list[int]
    limits: list[int]
    """Each member's own seed and most output tokens."""


def sampling_groups(generation: GenerationSpec, mine: list[Prompt]) -> list[SamplingGroup]:
    """The rank's prompts by sampling setting (`sampling.sampling_key`), in order of first appearance."""
    own = [input_generation(generation, p.input.settings) for p in mine]
    by_key: dict[tuple, list[int]] = {}
    for i, settings in enumerate(own):
        by_key.setdefault(sampling_key(settings), []).append(i)
    groups = [
        SamplingGroup(
            dataclasses.replace(own[members[0]], max_new_tokens=max(own[i].max_new_tokens for i in members)),
            members,
            [own[i].seed for i in members],
            [own[i].max_new_tokens for i in members],
        )
        for members in by_key.values()
    ]
    return groups or [SamplingGroup(generation, [], [], [])]


def start_completing(generation: GenerationSpec, model, tokenizer, mine: list[Prompt], stop: Callable[[], bool]):
    """(groups of (index into mine, completion) as they finish, how, the engines' stats or None).

    The engine where it can run the model, else generate in batches; a sampling group at a time.
    """
    use_engine, how = choose_engine(generation.engine, model)
    groups = sampling_groups(generation, mine)
    several = f"; {len(groups)} sampling groups (the batch file's own settings)" if len(groups) > 1 else ""
    if use_engine:
        eos_ids = eos_token_ids(model, tokenizer)
        stats: list[EngineStats] = []

        def engine_for(group: SamplingGroup) -> Engine:
            engine = Engine(
                model, engine_params(group.generation), [len(mine[i].token_ids) for i in group.members], eos_ids
            )
            engine.warm_up()  # counted in the start-up time (of the first group), as loading the model is
            stats.append(engine.stats)
            return engine

        first = [engine_for(groups[0])]
        completions = complete_with_engines(tokenizer, eos_ids, mine, groups, first, engine_for, stop)
        return completions, f"{how} ({first[0].describe()}){several}", stats
    budget = batch_token_budget(generation, model)
    planned = [
        (group, plan_batches([len(mine[i].token_ids) for i in group.members], group.generation.max_new_tokens, budget))
        for group in groups
    ]
    batches = sum(len(b) for _, b in planned)
    completions = complete_in_batches(model, tokenizer, mine, planned, stop)
    return completions, f"{how}, {batches} batches of <= {budget} tokens{several}", None


def complete_with_engines(
    tokenizer,
    eos_ids: set[int],
    mine: list[Prompt],
    groups: list[SamplingGroup],
    first: list[Engine],
    engine_for: Callable[[SamplingGroup], Engine],
    stop: Callable[[], bool],
) -> Iterator[list[tuple[int, Completion]]]:
    """The engine's way: (index into mine, completion) as sequences finish, a group at a time; each
    group's engine is made once the one before it is gone (its KV cache freed). `first`: the first
    group's engine, already warm, in a list this generator empties."""
    for n, group in enumerate(groups):
        if n and stop():
            return
        engine = first.pop() if n == 0 else engine_for(group)
        prompts = [mine[i].token_ids for i in group.members]
        ids = [mine[i].input.id for i in group.members]
        for finished in engine.run(prompts, ids, stop, group.seeds, group.limits):
            yield [(group.members[j], make_completion(tokenizer, eos_ids, tokens)) for j, tokens in finished]
        del engine
        release_memory()


def release_memory() -> None:
    """Free a finished engine's cache and graphs before the next is sized from free memory (its
    graphs and bound methods hold it in reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_summary(stats: list[EngineStats]) -> dict:
    """The engines' stats of a rank as one `EngineStats.summary()`: times, tokens and steps add up;
    occupancy is over all their decode steps; slots and cache are the largest engine's."""
    if len(stats) == 1:
        return stats[0].summary()
    summaries = [s.summary() for s in stats]
    total = {key: sum(s[key] for s in summaries) for key in summaries[0]}
    slot_steps = sum(s.decode_steps * s.slots for s in stats)
    return total | {
        "slots": max(s.slots for s in stats),
        "slot_len": max(s.slot_len for s in stats),
        "cache_gb": max(s.cache_gb for s in stats),
        "occupancy": sum(s.rows_decoded for s in stats) / slot_steps if slot_steps else 0.0,
    }


def complete_in_batches(
    model, tokenizer, mine: list[Prompt], planned: list[tuple[SamplingGroup, list[list[int]]]], stop: Callable[[], bool]
) -> Iterator[list[tuple[int, Completion]]]:
    """generate's way: (index into mine, completion) a batch at a time, a group at a time, until stop()
    says so. `planned`: each group's batches, as indices into its members."""
    for group, batches in planned:
        decoder = Decoder(model, tokenizer, group.generation)  # sets the model's generation config: one at a time
        for batch in batches:
            if stop():
                return
            rows = [group.members[j] for j in batch]
            completions = decoder.complete(
                [mine[i].token_ids for i in rows],
                [mine[i].input.id for i in rows],
                [group.seeds[j] for j in batch],
                [group.limits[j] for j in batch],
            )
            yield list(zip(rows, completions))


def result_record(prompt: Prompt, completion: Completion, scoring_mode: str) -> dict:
    item = prompt.input
    given = {"prompt": item.prompt} if item.messages is None else {"messages": item.messages}
    rendered = {} if prompt.text is None else {"rendered_prompt": prompt.text}
    record = {
        "id": item.id,
        **given,
        **rendered,
        "output": completion.text,
        "prompt_tokens": len(prompt.token_ids),
        "output_tokens": completion.tokens,
        "finish_reason": completion.finish_reason,
        "truncated": prompt.truncated,
    }
    if item.reference is not None:
        correct = scoring.is_correct(completion.text, item.reference, scoring_mode)
        record |= {"reference": item.reference, "correct": correct}
    return record


def progress_bar(accelerator: Accelerator, my_inputs: int) -> tqdm:
    """The main process's own inputs; ranks carry balanced shares, so its ETA is the run's.

    Rare updates when the output is a log file: every update there is another line's worth of text.
    """
    interactive = sys.stderr.isatty()
    return tqdm(
        total=my_inputs,
        desc=f"rank 0 of {accelerator.num_processes}",
        unit="input",
        file=sys.stderr,
        mininterval=1 if interactive else 30,
        disable=not accelerator.is_main_process,
    )


class FinishLine:
    """Where ranks wait for each other before gather (and share their token counts at start-up), for
    as long as the job may run.

    Ranks finish at different times (outputs stop at different lengths), possibly far apart, so the
    wait must not share resources.collective_timeout_s. A gloo group still fails at once when a peer dies: its
    connection to that peer closes. Created at start-up, while every rank is at the same point.
    """

    def __init__(self, spec: JobSpec):
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            timeout = timedelta(seconds=slurm_time_seconds(spec.resources.time))
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    def wait(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def all_gather(self, counts: list[int]) -> list[list[int]]:
        """Each process's `counts`, in rank order, on every process. On this group: ranks that load
        and read at different speeds may wait for each other here longer than collective_timeout_s."""
        if self.group is None:
            return [counts]
        gathered: list[list[int]] = [[] for _ in range(dist.get_world_size(self.group))]
        dist.all_gather_object(gathered, counts, group=self.group)
        return gathered


if __name__ == "__main__":
    run_rank(main, parse_args(sys.argv[1:]).run_dir)
