"""How inference inputs split over the ranks, and each rank's share into batches: pure functions of
token counts, so every rank computes the same plan on its own and no rank ever has to tell another.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def assign_to_ranks(costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices into `costs` for each rank: every index exactly once, the costs' sums balanced.

    Longest-processing-time first: the costliest item goes to the rank with the least work so far.
    Ties break by index and by rank, so the result depends only on the costs and the world size.
    """
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (work so far, rank)
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        assigned[rank].append(index)
        heapq.heappush(loads, (load + costs[index], rank))
    return [sorted(indices) for indices in assigned]


def plan_batches(prompt_lengths: Sequence[int], max_new_tokens: int, budget: int) -> list[list[int]]:
    """Indices into `prompt_lengths`, grouped into batches within a token budget.

    A batch is left-padded to its longest prompt and grows by max_new_tokens, so it holds
    (longest prompt + max_new_tokens) * rows tokens; that stays within `budget`, except for a prompt
    too long to share a batch, which gets one of its own. Longest prompts first: rows of similar
    length waste little padding, and a batch too big for memory fails at the start, not the end.
    """
    batches: list[list[int]] = []
    width = 0  # padded length of the current batch: its first (longest) prompt + max_new_tokens
    for index in sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i)):
        if batches and width * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
            width = prompt_lengths[index] + max_new_tokens
    return batches
