"""What the model reads: each input's prompt rendered (as written, or through the tokenizer's chat
template) and encoded into token ids. The one rendering: the runners and the check before queueing
(`models.check_prompt_lengths`) both use it. Torch-free: the tokenizer is passed in.
"""

from __future__ import annotations

from llmbatch.data import Input, chat
from llmbatch.spec import DataSpec

ENCODE_CHUNK = 4096
"""Prompts encoded in one call of the tokenizer."""


def templated(inputs: list[Input], data: DataSpec) -> bool:
    """Whether these inputs go through the chat template (`llmbatch.data.chat`): a file's inputs all do
    (data.chat_template, data.messages_field, an OpenAI batch file of chats), or none do."""
    return data.chat_template or any(item.messages is not None for item in inputs)


def prompt_texts(tokenizer, inputs: list[Input], data: DataSpec) -> list[str]:
    """What the model reads for each input: its prompt as written, or its chat (`llmbatch.data.chat`)
    rendered through the tokenizer's chat template with the generation prompt."""
    if not templated(inputs, data):
        return [item.prompt for item in inputs]
    if not inputs:
        return []
    # One call for the lot: the template is compiled and set up once (a third of the time per chat).
    return tokenizer.apply_chat_template(
        [chat(item, data) for item in inputs], tokenize=False, add_generation_prompt=True
    )


def plain_prompt_warning(data: DataSpec, has_template: bool) -> str | None:
    """A warning when plain prompts go to a model with a chat template and the spec did not say so
    (data.chat_template unset): an instruct model often answers a bare prompt with nothing at all."""
    if data.chat_template is not None or data.messages_field is not None or not has_template:
        return None
    if data.is_openai_batch():  # its lines say chat or completion themselves
        return None
    return (
        "warning: data.chat_template: the model has a chat template, but the prompts reach it as plain "
        "text; an instruct model may answer them poorly or with nothing. Set data.chat_template: true to "
        "send each prompt as a user turn, or false to keep them plain and silence this"
    )


def encode_texts(tokenizer, texts: list[str], templated: bool) -> list[list[int]]:
    """Token ids of `prompt_texts`; `templated`: whether they went through the chat template."""
    if not texts:
        return []  # a resumed run with nothing left; the tokenizer fails on an empty batch
    # Some templates write the BOS token themselves; encoding must not add a second one.
    has_bos = templated and bool(tokenizer.bos_token) and texts[0].startswith(tokenizer.bos_token)
    # In chunks: the tokenizer's encodings (tokens, offsets, masks) of a whole data file at once would
    # take many times the memory of the ids kept.
    return [
        ids
        for start in range(0, len(texts), ENCODE_CHUNK)
        for ids in tokenizer(
            texts[start : start + ENCODE_CHUNK], add_special_tokens=not has_bos, return_attention_mask=False
        )["input_ids"]
    ]


def encode_prompts(tokenizer, inputs: list[Input], data: DataSpec) -> list[list[int]]:
    """Token ids of each input's prompt text."""
    return encode_texts(tokenizer, prompt_texts(tokenizer, inputs, data), templated(inputs, data))


def fit_to_context(prompt: list[int], max_tokens: int, bos_token_id: int | None) -> list[int]:
    """The prompt cut to its last `max_tokens` tokens, keeping a leading BOS (`generation.long_prompts:
    truncate`). The end is what matters most: the question and the answer cue (a chat template's
    assistant turn) are there."""
    if len(prompt) <= max_tokens:
        return prompt
    keep = 1 if bos_token_id is not None and prompt[0] == bos_token_id else 0
    return prompt[:keep] + prompt[len(prompt) - max_tokens + keep :]
