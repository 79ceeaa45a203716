"""Next tokens from logits on the device: greedy, or seeded sampling whose noise depends only on
(seed, input id, step), whatever batch, rank or engine the input runs in.

The noise is counter-based: a 32-bit integer hash of (hash of seed and id, step, token index), made
with int64 tensor ops that give the same bits on CPU and GPU, turned into uniform and then Gumbel
noise. argmax(log-probabilities + Gumbel noise) is a sample of softmax(log-probabilities) (the
Gumbel-max trick). No generator objects, so it runs inside a CUDA graph, for all rows at once.
Both engines use it: the HF path through `SeededSampling` (runners/sampling.py), the engine here.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from llmbatch.engine.params import EngineParams

_MASK32 = 0xFFFFFFFF


def input_key(seed: int, input_id: str) -> int:
    """The 32-bit key of an input's noise: a hash of the run's seed and the input's id."""
    digest = hashlib.blake2b(f"{seed}\0{input_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, in two 16-bit halves of c so no int64 product overflows."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: every input bit flips each output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Float32 Gumbel noise [rows, vocab_size]: row r's depends only on (keys[r], steps[r]).

    keys: int64 input keys (`input_key`); steps: int64, tokens generated so far (0 for the first).
    """
    tokens = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    row = _mix32(keys ^ _mix32((steps + 0x9E3779B9) & _MASK32))
    bits = _mix32(row[:, None] ^ _mix32(tokens)[None, :])
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), 24 exact bits
    return -torch.log(-torch.log(uniform))


def warpers(params: EngineParams) -> list:
    """transformers' own temperature, top-k and top-p warpers, in generate's order: the engine and the
    HF path filter logits the same way. They read only the scores, so they run inside a CUDA graph."""
    found = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        found.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        found.append(TopPLogitsWarper(params.top_p))
    return found


class Sampler:
    """fp32 logits [rows, vocab] -> next tokens [rows], as generate with the same spec chooses them.

    With ignore_eos the end-of-sequence tokens are never chosen (generate's min_new_tokens does the
    same); that mask comes before the warpers, as in generate.
    """

    def __init__(self, params: EngineParams, eos_ids: list[int], device: torch.device):
        self.params = params
        self.warpers = warpers(params) if params.do_sample else []
        # A device tensor made once: a list index would copy from host memory inside a graph capture.
        self.banned = torch.tensor(sorted(eos_ids), device=device) if params.ignore_eos else None

    def __call__(self, logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if self.banned is not None:
            logits = logits.index_fill(1, self.banned, float("-inf"))
        if not self.params.do_sample:
            return logits.argmax(dim=-1)
        for warper in self.warpers:
            logits = warper(None, logits)
        return (logits + gumbel_noise(keys, steps, logits.shape[-1])).argmax(dim=-1)
