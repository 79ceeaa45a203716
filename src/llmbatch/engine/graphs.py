"""The decode step, replayed from CUDA graphs: one graph per batch-size bucket, captured on first use.

A decode step launches hundreds of small kernels (every layer's projections, norms, attention,
sampling); replaying them as one graph removes the Python and launch overhead that otherwise
dominates at these sizes. A graph replays fixed shapes at fixed addresses, so the step reads its
inputs from one static buffer, rows padded up to the bucket (padding rows decode a dummy token in the
cache's dummy slot), and its outputs stay where the capture put them. On CPU, and for a step that
syncs with the host (a mixture of experts outside bfloat16: see model.capturable), the same step
runs eagerly, at the exact row count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

INPUTS = ("tokens", "positions", "slots", "keys", "steps")
"""The rows of the step's input buffer: last token, its position, cache slot, sampling key, step."""


def bucket_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... up to max_rows: a row count pads by a third at most."""
    sizes, power = [], 1
    while not sizes or sizes[-1] < max_rows:
        sizes += [power] if power < 16 else [power, power * 3 // 2]
        power *= 2
    return sorted({min(s, max_rows) for s in sizes})


class DecodeGraphs:
    def __init__(
        self,
        step: Callable[[torch.Tensor], torch.Tensor],
        max_rows: int,
        dummy_slot: int,
        device: torch.device,
        use_graphs: bool,
    ):
        self.step, self.device = step, device
        self.use_graphs = use_graphs
        self.sizes = bucket_sizes(max_rows)
        width = self.sizes[-1]
        self.inputs = torch.zeros(len(INPUTS), width, dtype=torch.int64, device=device)
        self.staging = torch.zeros(len(INPUTS), width, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.padding = torch.zeros(len(INPUTS), 1, dtype=torch.int64)
        self.padding[INPUTS.index("slots")] = dummy_slot
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def __call__(self, rows: torch.Tensor) -> list[int]:
        """rows: int64 [len(INPUTS), n] on the host -> the n next tokens."""
        n = rows.shape[1]
        size = next(s for s in self.sizes if s >= n) if self.use_graphs else n
        staged = self.staging[:, :size]
        staged[:, :n] = rows
        staged[:, n:] = self.padding
        self.inputs[:, :size].copy_(staged, non_blocking=True)
        if not self.use_graphs:
            return self.step(self.inputs[:, :size]).tolist()
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, tokens = self.graphs[size]
        graph.replay()
        return tokens[:n].tolist()  # the step's one host sync

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs = self.inputs[:, :size]
        # A first run outside the capture compiles the Triton kernel and sets up cuBLAS. It computes
        # what the replay will, into the same cache positions, so it changes nothing.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.step(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One memory pool for all buckets: only one graph runs at a time, and its output is read first.
        with torch.cuda.graph(graph, pool=self.pool):
            tokens = self.step(inputs)
        self.pool = graph.pool()
        return graph, tokens
