"""The model side of inference: load it, encode prompts, size batches, and complete a batch.

An input's output must not depend on the batch it lands in (and so not on the rank count):

- batches are left-padded, with an attention mask; transformers derives position ids from the mask,
  so a prompt sees the same positions whatever its padding;
- greedy decoding takes the argmax of each row's own logits;
- sampling is greedy decoding over logits plus noise that depends only on (seed, input id, step):
  see `SeededSampling`; the engine (engine/) draws the same noise.

What remains are float rounding differences between batch shapes, which can flip an argmax between
two near-tied tokens: the embedded model's logits are peaky enough that it does not happen; a real
model in bf16 on a GPU may, rarely, as in any batched inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from llmbatch.data import Example, chat
from llmbatch.engine.params import EngineParams
from llmbatch.engine.sampler import gumbel_noise, input_key, warpers
from llmbatch.spec import DataSpec, GenerationSpec, ModelSpec

ENCODE_CHUNK = 4096
"""Prompts encoded in one call of the tokenizer."""

CPU_BATCH_TOKENS = 4096
"""Token budget of a batch on CPU, unless the spec sets generation.batch_tokens."""

GPU_MEMORY_FRACTION = 0.7
"""Share of the free GPU memory (after loading the model) that batches may fill; the rest is headroom
for what the estimate leaves out: logits, sampling buffers, allocator fragmentation."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    """Generated tokens, the end-of-sequence token included."""
    finish_reason: str
    """"eos": the model ended it; "length": it ran to max_new_tokens."""


def load_model(model_spec: ModelSpec, device: torch.device):
    """(model, tokenizer) from a local folder, with the LoRA adapter merged in if the spec names one."""
    if model_spec.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[model_spec.dtype]
    tokenizer = AutoTokenizer.from_pretrained(model_spec.path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out: any token will do
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_spec.path, dtype=dtype, attn_implementation="sdpa", device_map=device
        )
    except ValueError as e:  # Gemma 2 (its attention soft cap) has no sdpa path: transformers' own choice
        if "scaled_dot_product_attention" not in str(e):
            raise
        model = AutoModelForCausalLM.from_pretrained(model_spec.path, dtype=dtype, device_map=device)
    if model_spec.adapter is not None:
        from peft import PeftModel  # seconds to import, so only when there is an adapter

        # Merged: generation then costs what the base model costs.
        model = PeftModel.from_pretrained(model, model_spec.adapter).merge_and_unload()
    return model.eval(), tokenizer


def prompt_texts(tokenizer, examples: list[Example], data: DataSpec) -> list[str]:
    """What the model reads for each example: its prompt as written, or its chat (`llmbatch.data.chat`)
    rendered through the tokenizer's chat template with the generation prompt. The one rendering: the
    runners and the command line's context check both encode these texts."""
    if not data.through_chat_template:
        return [example.prompt for example in examples]
    if not examples:
        return []
    # One call for the lot: the template is compiled and set up once (a third of the time per chat).
    return tokenizer.apply_chat_template(
        [chat(example, data) for example in examples], tokenize=False, add_generation_prompt=True
    )


def encode_texts(tokenizer, texts: list[str], data: DataSpec) -> list[list[int]]:
    """Token ids of `prompt_texts`."""
    if not texts:
        return []  # a resumed run with nothing left; the tokenizer fails on an empty batch
    # Some templates write the BOS token themselves; encoding must not add a second one.
    has_bos = data.through_chat_template and bool(tokenizer.bos_token) and texts[0].startswith(tokenizer.bos_token)
    # In chunks: the tokenizer's encodings (tokens, offsets, masks) of a whole data file at once would
    # take many times the memory of the ids kept.
    return [
        ids
        for start in range(0, len(texts), ENCODE_CHUNK)
        for ids in tokenizer(
            texts[start : start + ENCODE_CHUNK], add_special_tokens=not has_bos, return_attention_mask=False
        )["input_ids"]
    ]


def encode_prompts(tokenizer, examples: list[Example], data: DataSpec) -> list[list[int]]:
    """Token ids of each example's prompt text."""
    return encode_texts(tokenizer, prompt_texts(tokenizer, examples, data), data)


def fit_to_context(prompt: list[int], max_tokens: int, bos_token_id: int | None) -> list[int]:
    """The prompt cut to its last `max_tokens` tokens, keeping a leading BOS (`generation.long_prompts:
    truncate`). The end is what matters most: the question and the answer cue (a chat template's
    assistant turn) are there."""
    if len(prompt) <= max_tokens:
        return prompt
    keep = 1 if bos_token_id is not None and prompt[0] == bos_token_id else 0
    return prompt[:keep] + prompt[len(prompt) - max_tokens + keep :]


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


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a sequence: the model's generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def make_completion(tokenizer, eos_ids: set[int], tokens: list[int]) -> Completion:
    """The text and finish reason of generated tokens; anything after the first EOS is padding."""
    end = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
    if end is None:
        return Completion(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), "length")
    return Completion(tokenizer.decode(tokens[:end], skip_special_tokens=True), end + 1, "eos")


class Decoder:
    """Completes batches of encoded prompts with `generate`, as the spec's generation section says."""

    def __init__(self, model, tokenizer, generation: GenerationSpec):
        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.eos_ids = eos_token_ids(model, tokenizer)
        # Replaces the model folder's defaults, which often turn on sampling or a repetition penalty.
        model.generation_config = GenerationConfig(
            max_new_tokens=generation.max_new_tokens,
            min_new_tokens=generation.max_new_tokens if generation.ignore_eos else None,
            do_sample=False,  # sampling is greedy search over noised logits: see SeededSampling
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )

    @torch.inference_mode()
    def complete(self, prompts: list[list[int]], ids: list[str]) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        output = self.model.generate(
            input_ids=input_ids.to(self.model.device),
            attention_mask=attention_mask.to(self.model.device),
            logits_processor=self._sampling(ids, width),
        )
        return [make_completion(self.tokenizer, self.eos_ids, tokens) for tokens in output[:, width:].tolist()]

    def _sampling(self, ids: list[str], prompt_width: int) -> LogitsProcessorList:
        g = self.generation
        if not g.do_sample:
            return LogitsProcessorList()
        return LogitsProcessorList([*warpers(engine_params(g)), SeededSampling(g.seed, ids, prompt_width)])


class SeededSampling(LogitsProcessor):
    """Turns greedy search into sampling, reproducible per input id.

    Gumbel-max trick: the argmax of (log-probabilities + independent Gumbel noise) is distributed as
    softmax(log-probabilities). A row's noise is a function of (seed, input id, step) alone
    (`engine.sampler.gumbel_noise`), so its tokens do not depend on which inputs share its batch, nor
    on the engine. Applied after the temperature, top-k and top-p warpers; tokens they removed (-inf)
    stay removed.
    """

    def __init__(self, seed: int, ids: list[str], prompt_width: int):
        self.keys = torch.tensor([input_key(seed, example_id) for example_id in ids])
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        keys = self.keys.to(scores.device)
        noise = gumbel_noise(keys, torch.full_like(keys, step), scores.shape[1])
        return scores + noise.to(scores.dtype)
