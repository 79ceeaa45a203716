"""Inference with transformers' `generate`: size batches, complete one, and read its completions.

An input's output must not depend on the batch it lands in (and so not on the rank count):

- batches are left-padded, with an attention mask; transformers derives position ids from the mask,
  so a prompt sees the same positions whatever its padding;
- greedy decoding takes the argmax of each row's own logits;
- sampling is greedy decoding over logits plus noise that depends only on (seed, input id, step):
  see `sampling.SeededSampling`; the engine (engine/) draws the same noise.

What remains are float rounding differences between batch shapes, which can flip an argmax between
two near-tied tokens: the embedded model's logits are peaky enough that it does not happen; a real
model in bf16 on a GPU may, rarely, as in any batched inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from llmbatch.runners.sampling import sampling_processors
from llmbatch.spec import GenerationSpec

CPU_BATCH_TOKENS = 4096
"""Token budget of a batch on CPU, unless the spec sets generation.batch_tokens."""

GPU_MEMORY_FRACTION = 0.7
"""Share of the free GPU memory (after loading the model) that batches may fill; the rest is headroom
for what the estimate leaves out: logits, sampling buffers, allocator fragmentation."""


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    """Output tokens, the end-of-sequence token included."""
    finish_reason: str
    """"eos": the model ended it; "length": it ran to max_new_tokens."""


def batch_token_budget(generation: GenerationSpec, model) -> int:
    """Tokens a batch may hold (rows x padded length): the spec's, else sized to the device."""
    if generation.batch_tokens is not None:
        return generation.batch_tokens
    if model.device.type != "cuda":
        return CPU_BATCH_TOKENS
    free_bytes, _ = torch.cuda.mem_get_info(model.device)
    return max(1, int(free_bytes * GPU_MEMORY_FRACTION) // bytes_per_token(model))


def bytes_per_token(model) -> int:
    """GPU memory a token of a batch takes: its key and value in every layer, plus, while prompts are
    prefilled, one layer's activations (MLP gate, up and output, and a few hidden-size buffers)."""
    config = model.config.get_text_config()
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    kv_cache = 2 * config.num_hidden_layers * kv_heads * head_dim
    activations = 3 * intermediate + 4 * hidden
    return (kv_cache + activations) * model.dtype.itemsize


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a sequence: the model's generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def make_completion(tokenizer, eos_ids: set[int], tokens: list[int]) -> Completion:
    """The text and finish reason of output tokens; anything after the first EOS is padding."""
    end = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
    if end is None:
        return Completion(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), "length")
    return Completion(tokenizer.decode(tokens[:end], skip_special_tokens=True), end + 1, "eos")


class Decoder:
    """Completes batches of encoded prompts with `generate`, as the spec's generation section says."""

    def __init__(self, model, tokenizer, generation: GenerationSpec, synced: bool = False):
        """`synced`: every batch runs max_new_tokens steps, EOS or not (its completions still end at the
        first EOS), so that every rank runs as many forwards: under FSDP each gathers weights from all
        ranks. (generate's own synced_gpus lost step with a peer that had finished, here.)"""
        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.eos_ids = eos_token_ids(model, tokenizer)
        # Replaces the model folder's defaults, which often turn on sampling or a repetition penalty.
        model.generation_config = GenerationConfig(
            max_new_tokens=generation.max_new_tokens,
            min_new_tokens=generation.max_new_tokens if generation.ignore_eos else None,
            do_sample=False,  # sampling is greedy search over noised logits: see sampling.SeededSampling
            eos_token_id=None if synced else sorted(self.eos_ids),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )

    @torch.inference_mode()
    def complete(
        self, prompts: list[list[int]], ids: list[str], seeds: list[int] | None = None, limits: list[int] | None = None
    ) -> list[Completion]:
        """`seeds`, `limits`: each prompt's own sampling seed and most output tokens (at most
        max_new_tokens); None: the spec's. A row's tokens past its limit are dropped: its first ones
        are those a run that stopped there would give (noise depends on the step, not the length)."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        output = self.model.generate(
            input_ids=input_ids.to(self.model.device),
            attention_mask=attention_mask.to(self.model.device),
            logits_processor=sampling_processors(self.generation, ids, width, seeds),
        )
        limits = limits or [self.generation.max_new_tokens] * len(prompts)
        return [
            make_completion(self.tokenizer, self.eos_ids, tokens[:limit])
            for tokens, limit in zip(output[:, width:].tolist(), limits)
        ]
