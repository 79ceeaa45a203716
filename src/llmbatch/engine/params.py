"""What the engine is asked to do, in its own terms: the runner translates the job's spec into this
(runners/sampling.py, `engine_params`), so the engine knows nothing of the app's spec."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineParams:
    max_new_tokens: int = 32
    ignore_eos: bool = False
    """Never choose an end-of-sequence token: every sequence runs to max_new_tokens."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0: no top-k filter."""
    top_p: float = 1.0
    seed: int = 0
    kv_cache_gb: float | None = None
    """Most memory the KV cache may take (GiB); None: what is free (GPU), cache.CPU_CACHE_GB (CPU)."""
    batch_tokens: int | None = None
    """Most positions in the cache (slots x slot length); None: no cap."""
