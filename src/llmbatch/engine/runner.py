"""The engine's loop: admit prompts into free slots (prefill), decode all running rows a token at a
time, and hand back each sequence's tokens as it ends, in small groups for the shard.

Every sequence's tokens depend only on its own prompt, id and the parameters: greedy tokens are the
argmax of its own logits, sampled ones add noise keyed by (seed, id, step). Which other sequences
share its steps changes nothing but float rounding.

The engine knows nothing of the job's spec: it takes `EngineParams` and the end-of-sequence tokens;
the runner (runners/infer.py) decides whether it runs and turns its tokens into results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from llmbatch.engine.cache import KVCache, count_slots, free_cache_bytes
from llmbatch.engine.graphs import DecodeGraphs
from llmbatch.engine.model import EngineModel, cache_shape, capturable, describe
from llmbatch.engine.params import EngineParams
from llmbatch.engine.sampler import Sampler, input_key
from llmbatch.engine.scheduler import Scheduler, Sequence

MAX_ROWS = 1024
"""Most sequences decoded at once. Past this a step's time grows with its rows (the KV cache it
reads) and the graphs' logits take gigabytes; the weights' cost is well shared already."""

PREFILL_TOKENS = {"cuda": 16384, "cpu": 2048}
"""Padded prompt tokens per prefill chunk: big enough for the matrix units, small enough that its
activations fit beside the cache."""

FLUSH_EVERY_S = 2.0
"""A group of finished sequences goes to the shard when it has an eighth of the slots, or this long
after the last one."""


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
    # A mixture of experts' block holds the tokens' copies for each of their experts.
    intermediate = config.intermediate_size * getattr(config, "num_experts_per_tok", 1)
    per_token = (8 * config.hidden_size + 3 * intermediate) * model.dtype.itemsize
    return prefill_tokens * per_token + rows * config.vocab_size * 16


class Engine:
    def __init__(self, model, params: EngineParams, prompt_lengths: list[int], eos_ids: set[int]):
        """`model`: a transformers causal LM of a family in families.py (model.unsupported_reason is None)."""
        self.params, self.eos_ids = params, eos_ids
        self.device = model.device
        self.prefill_tokens = PREFILL_TOKENS[self.device.type]
        slot_len = max(prompt_lengths, default=1) + params.max_new_tokens - 1
        sequences = min(len(prompt_lengths), MAX_ROWS)
        shape = cache_shape(model)
        reserve = peak_activation_bytes(model, sequences, self.prefill_tokens)
        slots = count_slots(
            shape,
            slot_len,
            sequences,
            free_cache_bytes(self.device, params.kv_cache_gb, reserve),
            params.kv_cache_gb,
            params.batch_tokens,
        )
        self.cache = KVCache(shape, slots, slot_len, self.device)
        self.model = EngineModel(model, slot_len)
        self.sampler = Sampler(params, sorted(eos_ids), self.device)
        use_graphs = self.device.type == "cuda" and capturable(model)
        self.graphs = DecodeGraphs(self._decode_step, slots, self.cache.dummy_slot, self.device, use_graphs)
        if self.device.type != "cuda":
            path = "eager attention on CPU"
        else:
            path = "Triton decode kernel, " + ("CUDA graphs" if use_graphs else "eager decode steps (host syncs)")
        self.path = f"{describe(model)}; {path}"
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
        return f"{self.path}; {s.slots} slots of {s.slot_len} positions ({s.cache_gb:.2f} GiB KV cache)"

    @torch.inference_mode()
    def run(
        self,
        prompts: list[list[int]],
        ids: list[str],
        stop: Callable[[], bool],
        seeds: list[int] | None = None,
        limits: list[int] | None = None,
    ) -> Iterator[list[tuple[int, list[int]]]]:
        """Groups of (index into prompts, output tokens), as sequences end (the last token is an
        end-of-sequence token, or there are its limit's tokens). Once stop() is true no prompt
        is admitted and the loop ends after the step in flight; unfinished sequences are dropped.

        `seeds`, `limits`: each prompt's own sampling seed and most output tokens (at most
        max_new_tokens); None: the parameters' seed and max_new_tokens for every prompt."""
        seeds = seeds or [self.params.seed] * len(prompts)
        limits = limits or [self.params.max_new_tokens] * len(prompts)
        if max(limits, default=0) > self.params.max_new_tokens:  # its slot has no room for more
            raise ValueError(f"a limit of {max(limits)} tokens exceeds max_new_tokens {self.params.max_new_tokens}")
        keys = [input_key(seed, input_id) for seed, input_id in zip(seeds, ids)]
        scheduler = Scheduler([len(p) for p in prompts], self.cache.slots)
        finished: list[tuple[int, list[int]]] = []
        flush_at, last_flush = max(1, self.cache.slots // 8), time.monotonic()
        while not scheduler.done and not stop():
            admitted = scheduler.admit()
            if admitted:
                self._prefill(admitted, prompts, keys)
                finished += self._collect(scheduler, admitted, limits)
            rows = scheduler.rows()
            if rows:
                self._decode(rows, keys)
                finished += self._collect(scheduler, rows, limits)
            if finished and (len(finished) >= flush_at or time.monotonic() - last_flush >= FLUSH_EVERY_S):
                yield finished
                finished, last_flush = [], time.monotonic()
        if finished:
            yield finished

    def _collect(
        self, scheduler: Scheduler, sequences: list[Sequence], limits: list[int]
    ) -> list[tuple[int, list[int]]]:
        """Finish the sequences that just generated EOS or their last token (`limits`, by prompt)."""
        done = []
        for sequence in sequences:
            last = sequence.tokens[-1]
            if len(sequence.tokens) == limits[sequence.index] or (last in self.eos_ids and not self.params.ignore_eos):
                scheduler.finish(sequence)
                done.append((sequence.index, sequence.tokens))
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
            tokens[row, : sequence.prompt_len] = torch.tensor(prompts[sequence.index])
        host = torch.tensor([[s.prompt_len for s in chunk], [s.slot for s in chunk], [keys[s.index] for s in chunk]])
        lengths, slots, row_keys = host.to(self.device)
        logits = self.model.prefill(tokens.to(self.device), lengths, slots, self.cache)
        first = self.sampler(logits, row_keys, torch.zeros_like(row_keys)).tolist()
        for sequence, token in zip(chunk, first):
            sequence.tokens.append(token)
        self.stats.prefill_tokens += len(chunk) * width

    def _decode(self, rows: list[Sequence], keys: list[int]) -> None:
        started = time.monotonic()
        inputs = torch.tensor(
            [
                [s.tokens[-1] for s in rows],
                [s.position for s in rows],
                [s.slot for s in rows],
                [keys[s.index] for s in rows],
                [len(s.tokens) for s in rows],
            ]
        )
        for sequence, token in zip(rows, self.graphs(inputs)):
            sequence.tokens.append(token)
        self.stats.decode_s += time.monotonic() - started
        self.stats.decode_steps += 1
        self.stats.rows_decoded += len(rows)

    def _decode_step(self, inputs: torch.Tensor) -> torch.Tensor:
        tokens, positions, slots, keys, steps = inputs
        return self.sampler(self.model.decode(tokens, positions, slots, self.cache), keys, steps)
