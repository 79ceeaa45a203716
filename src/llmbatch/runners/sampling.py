"""The spec's generation section in the engine's terms, and seeded sampling for `generate`.

Both paths sample alike: a row's noise is a function of (seed, input id, step) alone
(`engine.sampler.gumbel_noise`), so an input's tokens depend neither on the batch it lands in nor on
which path completed it.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from llmbatch.engine.params import EngineParams
from llmbatch.engine.sampler import gumbel_noise, input_key, warpers
from llmbatch.openai_batch import RequestSettings
from llmbatch.spec import GenerationSpec


def engine_params(generation: GenerationSpec) -> EngineParams:
    """The spec's generation section in the engine's terms (the engine knows no spec)."""
    g = generation
    return EngineParams(
        max_new_tokens=g.max_new_tokens,
        ignore_eos=g.ignore_eos,
        do_sample=g.do_sample,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        seed=g.seed,
        kv_cache_gb=g.kv_cache_gb,
        batch_tokens=g.batch_tokens,
    )


def input_generation(generation: GenerationSpec, settings: RequestSettings | None) -> GenerationSpec:
    """The settings one input runs with: the spec's, with those its request sets (an OpenAI batch line)
    where generation.allow_overrides lists them. Temperature 0 is greedy; above 0 it samples."""
    if settings is None:
        return generation
    allowed = {name: getattr(settings, name) for name in generation.allow_overrides}
    changes = {}
    if allowed.get("max_tokens") is not None:
        changes["max_new_tokens"] = allowed["max_tokens"]
    if allowed.get("temperature") is not None:
        changes["do_sample"] = allowed["temperature"] > 0
        if changes["do_sample"]:
            changes["temperature"] = allowed["temperature"]
    if allowed.get("top_p") is not None:
        changes["top_p"] = allowed["top_p"]
    if allowed.get("seed") is not None:
        changes["seed"] = allowed["seed"]
    return dataclasses.replace(generation, **changes) if changes else generation


def sampling_key(generation: GenerationSpec) -> tuple:
    """What inputs completed together must share: greedy, or sampling with one temperature and top_p
    (seeds and output lengths may differ per input, in the engine and in generate)."""
    if not generation.do_sample:
        return (False,)
    return (True, generation.temperature, generation.top_p)


def sampling_processors(
    generation: GenerationSpec, ids: list[str], prompt_width: int, seeds: list[int] | None = None
) -> LogitsProcessorList:
    """What turns `generate`'s greedy search over a batch into the spec's sampling (none when greedy).
    `seeds`: each row's own seed; None: generation.seed for every row."""
    if not generation.do_sample:
        return LogitsProcessorList()
    seeds = seeds or [generation.seed] * len(ids)
    return LogitsProcessorList([*warpers(engine_params(generation)), SeededSampling(seeds, ids, prompt_width)])


class SeededSampling(LogitsProcessor):
    """Turns greedy search into sampling, reproducible per input id.

    Gumbel-max trick: the argmax of (log-probabilities + independent Gumbel noise) is distributed as
    softmax(log-probabilities). A row's noise is a function of (seed, input id, step) alone
    (`engine.sampler.gumbel_noise`), so its tokens do not depend on which inputs share its batch, nor
    on the engine. Applied after the temperature, top-k and top-p warpers; tokens they removed (-inf)
    stay removed.
    """

    def __init__(self, seeds: list[int], ids: list[str], prompt_width: int):
        self.keys = torch.tensor([input_key(seed, input_id) for seed, input_id in zip(seeds, ids)])
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        keys = self.keys.to(scores.device)
        noise = gumbel_noise(keys, torch.full_like(keys, step), scores.shape[1])
        return scores + noise.to(scores.dtype)
