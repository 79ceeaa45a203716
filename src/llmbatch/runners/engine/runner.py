"""The engine's loop: admit prompts into free slots (prefill), decode all running rows a token at a
time, and hand back each sequence as it ends, in small groups for the shard.

Every sequence's tokens depend only on its own prompt, id and the spec: greedy tokens are the argmax
of its own logits, sampled ones add noise keyed by (seed, id, step). Which other sequences share its
steps changes nothing but float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from llmbatch.runners.engine.cache import KVCache, count_slots, free_cache_bytes
from llmbatch.runners.engine.graphs import DecodeGraphs
from llmbatch.runners.engine.model import EngineModel, cache_shape, unsupported_reason
from llmbatch.runners.engine.sampler import Sampler, input_key
from llmbatch.runners.engine.scheduler import Scheduler, Sequence
from llmbatch.runners.generation import Completion, eos_token_ids, make_completion
from llmbatch.spec import GenerationSpec

MAX_ROWS = 1024
"""Most sequences decoded at once. Past this a step's time grows with its rows (the KV cache it
reads) and the graphs' logits take gigabytes; the weights' cost is well shared already."""

PREFILL_TOKENS = {"cuda": 16384, "cpu": 2048}
"""Padded prompt tokens per prefill chunk: big enough for the matrix units, small enough that its
activations fit beside the cache."""

FLUSH_EVERY_S = 2.0
"""A group of finished sequences goes to the shard when it has an eighth of the slots, or this long
after the last one."""


def choose_engine(choice: str, model, longest_sequence: int) -> tuple[bool, str]:
    """(use the engine?, why) for `generation.engine` = auto | fast | hf. `fast` on a model the engine
    cannot run is an error; `auto` falls back to `generate`."""
    if choice == "hf":
        return False, "generate (generation.engine: hf)"
    reason = unsupported_reason(model, longest_sequence)
    if reason is None:
        return True, f"the engine ({'Triton decode kernel, CUDA graphs' if model.device.type == 'cuda' else 'eager attention on CPU'})"
    if choice == "fast":
        raise ValueError(f"generation.engine: fast cannot run this model: {reason}")
    return False, f"generate: the engine does not support {reason}"


@dataclass
class EngineStats:
    slots: int = 0
    slot_len: int = 0
    cache_gb: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
    decode_steps: int = 0
    rows_decoded: int = 0
    """Sum over decode steps of the rows running in them."""

    @property
    def occupancy(self) -> float:
        """Mean share of the slots busy in a decode step."""
        return self.rows_decoded / (self.decode_steps * self.slots) if self.decode_steps else 0.0

    def summary(self) -> dict:
        return asdict(self) | {"occupancy": self.occupancy}


def peak_activation_bytes(model, rows: int, prefill_tokens: int) -> int:
    """Memory beside the cache: a prefill chunk's activations (hidden states, MLP and attention
    buffers of one layer at a time) and the decode step's logits with the sampler's fp32 copies."""
    config = model.config
    per_token = (8 * config.hidden_size + 3 * config.intermediate_size) * model.dtype.itemsize
    return prefill_tokens * per_token + rows * config.vocab_size * 16


class Engine:
    def __init__(self, model, tokenizer, generation: GenerationSpec, prompt_lengths: list[int]):
        self.tokenizer, self.generation = tokenizer, generation
        self.device = model.device
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.prefill_tokens = PREFILL_TOKENS[self.device.type]
        slot_len = max(prompt_lengths, default=1) + generation.max_new_tokens - 1
        sequences = min(len(prompt_lengths), MAX_ROWS)
        shape = cache_shape(model)
        reserve = peak_activation_bytes(model, sequences, self.prefill_tokens)
        slots = count_slots(shape, slot_len, sequences, free_cache_bytes(self.device, generation.kv_cache_gb, reserve),
                            generation.kv_cache_gb, generation.batch_tokens)
        self.cache = KVCache(shape, slots, slot_len, self.device)
        self.model = EngineModel(model)
        self.sampler = Sampler(generation, sorted(self.eos_ids), self.device)
        self.graphs = DecodeGraphs(self._decode_step, slots, self.cache.dummy_slot, self.device)
        self.stats = EngineStats(slots=slots, slot_len=slot_len, cache_gb=self.cache.nbytes / 2**30)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Start-up work out of the timed loop: a prefill of one token and the capture of the widest
        decode graph (kernel loading, Triton compilation, cuBLAS set-up), all in the dummy slot."""
        dummy = torch.tensor([self.cache.dummy_slot], device=self.device)
        one = torch.ones(1, dtype=torch.int64, device=self.device)
        self.model.prefill(one[:, None], one, dummy, self.cache)
        self.graphs(self.graphs.padding.expand(-1, self.cache.slots))

    def describe(self) -> str:
        s = self.stats
        return f"{s.slots} slots of {s.slot_len} positions ({s.cache_gb:.2f} GiB KV cache)"

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], ids: list[str],
            stop: Callable[[], bool]) -> Iterator[list[tuple[int, Completion]]]:
        """Groups of (index into prompts, completion), as sequences end. Once stop() is true no prompt
        is admitted and the loop ends after the step in flight; unfinished sequences are dropped."""
        keys = [input_key(self.generation.seed, example_id) for example_id in ids]
        scheduler = Scheduler([len(p) for p in prompts], self.cache.slots)
        finished: list[tuple[int, Completion]] = []
        flush_at, last_flush = max(1, self.cache.slots // 8), time.monotonic()
        while not scheduler.done and not stop():
            admitted = scheduler.admit()
            if admitted:
                self._prefill(admitted, prompts, keys)
                finished += self._collect(scheduler, admitted)
            rows = scheduler.rows()
            if rows:
                self._decode(rows, keys)
                finished += self._collect(scheduler, rows)
            if finished and (len(finished) >= flush_at or time.monotonic() - last_flush >= FLUSH_EVERY_S):
                yield finished
                finished, last_flush = [], time.monotonic()
        if finished:
            yield finished

    def _collect(self, scheduler: Scheduler, sequences: list[Sequence]) -> list[tuple[int, Completion]]:
        """Finish the sequences that just generated EOS or their last token."""
        done = []
        for sequence in sequences:
            last = sequence.tokens[-1]
            if len(sequence.tokens) == self.generation.max_new_tokens or (
                    last in self.eos_ids and not self.generation.ignore_eos):
                scheduler.finish(sequence)
                done.append((sequence.index, make_completion(self.tokenizer, self.eos_ids, sequence.tokens)))
        return done

    def _prefill(self, admitted: list[Sequence], prompts: list[list[int]], keys: list[int]) -> None:
        """Prompts into their slots and their first tokens, in chunks of similar length (the
        scheduler admits longest first)."""
        started = time.monotonic()
        chunks: list[list[Sequence]] = []
        for sequence in admitted:  # longest first: a chunk's first prompt sets its width
            if chunks and (len(chunks[-1]) + 1) * chunks[-1][0].prompt_len <= self.prefill_tokens:
                chunks[-1].append(sequence)
            else:
                chunks.append([sequence])
        for chunk in chunks:
            self._prefill_chunk(chunk, prompts, keys)
        self.stats.prefill_s += time.monotonic() - started

    def _prefill_chunk(self, chunk: list[Sequence], prompts: list[list[int]], keys: list[int]) -> None:
        width = max(s.prompt_len for s in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.int64)
        for row, sequence in enumerate(chunk):
            tokens[row, :sequence.prompt_len] = torch.tensor(prompts[sequence.index])
        host = torch.tensor([[s.prompt_len for s in chunk], [s.slot for s in chunk], [keys[s.index] for s in chunk]])
        lengths, slots, row_keys = host.to(self.device)
        logits = self.model.prefill(tokens.to(self.device), lengths, slots, self.cache)
        first = self.sampler(logits, row_keys, torch.zeros_like(row_keys)).tolist()
        for sequence, token in zip(chunk, first):
            sequence.tokens.append(token)
        self.stats.prefill_tokens += len(chunk) * width

    def _decode(self, rows: list[Sequence], keys: list[int]) -> None:
        started = time.monotonic()
        inputs = torch.tensor([[s.tokens[-1] for s in rows], [s.position for s in rows], [s.slot for s in rows],
                               [keys[s.index] for s in rows], [len(s.tokens) for s in rows]])
        for sequence, token in zip(rows, self.graphs(inputs)):
            sequence.tokens.append(token)
        self.stats.decode_s += time.monotonic() - started
        self.stats.decode_steps += 1
        self.stats.rows_decoded += len(rows)

    def _decode_step(self, inputs: torch.Tensor) -> torch.Tensor:
        tokens, positions, slots, keys, steps = inputs
        return self.sampler(self.model.decode(tokens, positions, slots, self.cache), keys, steps)
