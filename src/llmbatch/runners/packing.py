"""Training data for the fine-tuning recipe: inputs -> token sequences -> rows -> batches.

One input becomes one `Sequence`: the prompt's tokens then the completion's (reference + EOS), with
`targets[i]` the token that should follow `input_ids[i]`, or IGNORE where no loss is taken (the prompt,
when only the completion is learned).

A row is what the model sees as one line of a batch. Without packing a row holds one sequence and short
rows are padded. With packing, consecutive sequences share a row up to seq_len. Either way the collated
batch has `position_ids` that restart at 0 for every sequence (and for the padding at a row's end), and no
attention mask: transformers (>= 4.54, `masking_utils.find_packed_sequence_indices`) then builds a
block-diagonal causal mask for sdpa/eager/flex attention and cu_seqlens for flash-attention, so no token
attends across a sequence boundary and RoPE positions are those of the sequence alone. A padded batch and
a packed batch of the same sequences therefore compute the same per-token losses; only the float
summation order differs. Passing a 2D attention_mask would turn that detection off, which is why the
batches have none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
"""Target of a position without loss (cross_entropy's default ignore_index)."""


@dataclass(frozen=True)
class Sequence:
    input_ids: list[int]
    targets: list[int]


def to_sequence(prompt_ids: list[int], completion_ids: list[int], seq_len: int, loss_on: str) -> Sequence:
    """One input's tokens, prompt then completion: the model reads all but the last and predicts all
    but the first. Sequences longer than seq_len are cut at the end.

    The caller encodes prompt and completion separately, so the prompt's tokens are exactly those
    inference feeds (a joint encoding could merge tokens across the boundary).
    """
    tokens = (prompt_ids + completion_ids)[: seq_len + 1]
    targets = tokens[1:]
    if loss_on == "completion":
        # targets[i] is tokens[i + 1]: the first len(prompt_ids) - 1 targets are prompt tokens.
        masked = len(prompt_ids) - 1
        targets = [IGNORE] * min(masked, len(targets)) + targets[masked:]
    return Sequence(input_ids=tokens[:-1], targets=targets)


def pack(sequences: list[Sequence], seq_len: int) -> list[list[Sequence]]:
    """Rows of consecutive sequences, each row at most seq_len tokens; a sequence is never split."""
    rows: list[list[Sequence]] = []
    used = seq_len  # forces a new row for the first sequence
    for seq in sequences:
        if used + len(seq.input_ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(seq)
        used += len(seq.input_ids)
    return rows


def collate(rows: list[list[Sequence]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch: rows right-padded to the longest, position ids restarting per sequence.

    The padding gets its own positions 0, 1, ... so it reads as one more (ignored) sequence: real tokens
    never attend to it, and its targets are IGNORE.
    """
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    input_ids, targets, position_ids = [], [], []
    for row in rows:
        ids = [t for s in row for t in s.input_ids]
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        targets.append([t for s in row for t in s.targets] + [IGNORE] * pad)
        position_ids.append([p for s in row for p in range(len(s.input_ids))] + list(range(pad)))
    return {
        "input_ids": torch.tensor(input_ids),
        "targets": torch.tensor(targets),
        "position_ids": torch.tensor(position_ids),
        "num_tokens": torch.tensor(sum(len(s.input_ids) for row in rows for s in row)),
    }


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation of the rows that depends only on (seed, epoch): no generator state to save, so a
    resumed run finds its place from the epoch and the batch index alone."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())
