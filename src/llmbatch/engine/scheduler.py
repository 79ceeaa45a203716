"""Continuous batching: which prompts enter which cache slots, and when. Pure bookkeeping, no tensors.

Prompts wait longest first, so the prompts admitted together have similar lengths and a prefill
chunk pads little, and a slot too short shows at once. When sequences end (EOS or length) their
slots go back to the free list; new prompts are admitted once enough slots are free to make a
prefill worth its launch (an eighth of the slots, or all that are left to admit), or at once when
nothing is running.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Sequence:
    index: int
    """Into the engine's prompt list."""
    prompt_len: int
    slot: int
    tokens: list[int] = field(default_factory=list)
    """Generated so far."""

    @property
    def position(self) -> int:
        """Where the last generated token goes when it is fed back."""
        return self.prompt_len + len(self.tokens) - 1


class Scheduler:
    def __init__(self, prompt_lengths: list[int], slots: int):
        self.lengths = prompt_lengths
        self.waiting = deque(sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i)))
        self.free = list(range(slots - 1, -1, -1))  # popped from the end: lowest slot first
        self.running: dict[int, Sequence] = {}  # by slot
        self.admit_at = max(1, slots // 8)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> list[Sequence]:
        """The prompts to prefill now, each with its slot; often none."""
        wanted = min(self.admit_at, len(self.waiting))
        if not self.waiting or (self.running and len(self.free) < wanted):
            return []
        admitted = []
        while self.waiting and self.free:
            index = self.waiting.popleft()
            sequence = Sequence(index, self.lengths[index], self.free.pop())
            self.running[sequence.slot] = sequence
            admitted.append(sequence)
        return admitted

    def finish(self, sequence: Sequence) -> None:
        del self.running[sequence.slot]
        self.free.append(sequence.slot)

    def rows(self) -> list[Sequence]:
        """The running sequences, in slot order: the rows of the next decode step."""
        return [self.running[slot] for slot in sorted(self.running)]
