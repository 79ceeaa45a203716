"""Continuous batching over the paged KV cache: which prompts are admitted, which blocks they hold, which
prompt tokens each prefill chunk computes. Pure bookkeeping, no tensors.

Order. Without prefix caching prompts wait longest first, so the prompts admitted together have
similar lengths and a prefill chunk pads little. With it, prompts that share their first block wait
together (then longest first), so a shared prefix is computed by the first of them and reused by the
rest while it is cached.

Admission reserves every block a sequence can need, prompt plus max_new_tokens - 1 positions, less
the blocks of its longest cached prefix, so a running sequence never runs out of blocks and nothing is
ever preempted; memory follows what each sequence can hold, not the longest one. A prompt is admitted
once a slot (a row of the block table) and its blocks are free, and, while others run, once enough
slots are free to make a prefill worth its launch (an eighth of them, or all that are left to admit).
A prompt whose prefix is still being prefilled by another waits for it, so the prefix is computed once.

Prefill in chunks: each step takes up to a budget of padded prompt tokens from the sequences still
prefilling, in admission order, a long prompt a piece at a time (its later pieces attend to its
earlier blocks); the runner interleaves one chunk with one decode step of the running rows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmbatch.engine.blocks import BLOCK_SIZE, BlockPool, blocks_for, prefix_keys


@dataclass
class Sequence:
    index: int
    """Into the engine's prompt list."""
    prompt_len: int
    slot: int
    blocks: list[int]
    """The block table: the block of each BLOCK_SIZE positions, in order."""
    keys: list[tuple]
    """The keys of its full prompt blocks (blocks.prefix_keys)."""
    computed: int = 0
    """Prompt positions in the cache: reused from the prefix cache, or prefilled."""
    tokens: list[int] = field(default_factory=list)
    """Generated so far."""

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len

    @property
    def position(self) -> int:
        """Where the last generated token goes when it is fed back."""
        return self.prompt_len + len(self.tokens) - 1


@dataclass
class Piece:
    """Prompt tokens start .. start+count-1 of a sequence, for one prefill chunk."""

    sequence: Sequence
    start: int
    count: int

    @property
    def last(self) -> bool:
        """Whether it ends the prompt (its logits give the first token)."""
        return self.start + self.count == self.sequence.prompt_len


class Scheduler:
    def __init__(self, prompts: list[list[int]], slots: int, pool: BlockPool, max_new_tokens: int, roots=None):
        """`roots`: per prompt, what its prefix keys start from (None: all None)."""
        self.prompts, self.pool = prompts, pool
        self.lengths = [len(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        roots = roots or [None] * len(prompts)
        self.keys = [prefix_keys(p, root) if pool.caching else [] for p, root in zip(prompts, roots)]
        if pool.caching:  # sharers of a first block together, then longest first
            order = sorted(range(len(prompts)), key=lambda i: (hash(tuple(self.keys[i][:1])), -self.lengths[i], i))
        else:
            order = sorted(range(len(prompts)), key=lambda i: (-self.lengths[i], i))
        self.waiting = deque(order)
        self.free = list(range(slots - 1, -1, -1))  # popped from the end: lowest slot first
        self.running: dict[int, Sequence] = {}  # by slot
        self.prefilling: deque[Sequence] = deque()  # in admission order
        self.admit_at = max(1, slots // 8)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def blocks_needed(self, index: int) -> int:
        return blocks_for(self.lengths[index] + self.max_new_tokens - 1)

    def admit(self) -> list[Sequence]:
        """The prompts admitted now, each with its slot and blocks; often none."""
        wanted = min(self.admit_at, len(self.waiting))
        if not self.waiting or (self.running and len(self.free) < wanted):
            return []
        admitted = []
        while self.waiting and self.free:
            index = self.waiting[0]
            keys = self.keys[index]
            # The last prompt token is always computed: its logits give the first output token.
            shared, pending = self.pool.match(keys[: (self.lengths[index] - 1) // BLOCK_SIZE])
            new = self.blocks_needed(index) - len(shared)
            if pending or not self.pool.can_take(shared, new):
                break
            self.waiting.popleft()
            blocks = self.pool.take(shared, new)
            for block, key in zip(blocks[len(shared) :], keys[len(shared) :]):
                self.pool.register(block, key)
            sequence = Sequence(index, self.lengths[index], self.free.pop(), blocks, keys, len(shared) * BLOCK_SIZE)
            self.running[sequence.slot] = sequence
            self.prefilling.append(sequence)
            admitted.append(sequence)
        return admitted

    def chunk(self, budget: int) -> list[Piece]:
        """The next prefill chunk: pieces of the prefilling sequences, in order, while the padded
        tokens (rows x the longest piece) stay within `budget`; a piece is at most `budget` tokens."""
        pieces: list[Piece] = []
        width = 0
        for sequence in self.prefilling:
            count = min(sequence.prompt_len - sequence.computed, budget)
            if (len(pieces) + 1) * max(width, count) > budget:
                break
            width = max(width, count)
            pieces.append(Piece(sequence, sequence.computed, count))
        return pieces

    def prefilled(self, pieces: list[Piece]) -> None:
        """The chunk's pieces are in the cache: their full blocks may be shared from now on."""
        for piece in pieces:
            sequence = piece.sequence
            done = piece.start + piece.count
            for k in range(piece.start // BLOCK_SIZE, min(done // BLOCK_SIZE, len(sequence.keys))):
                self.pool.mark_ready(sequence.blocks[k])
            sequence.computed = done
        self.prefilling = deque(s for s in self.prefilling if s.prefilling)

    def finish(self, sequence: Sequence) -> None:
        del self.running[sequence.slot]
        self.free.append(sequence.slot)
        self.pool.release(sequence.blocks)

    def rows(self) -> list[Sequence]:
        """The sequences past their prompt, in slot order: the rows of the next decode step."""
        return [self.running[slot] for slot in sorted(self.running) if not self.running[slot].prefilling]
