"""A model and its tokenizer from a local folder, as the spec's model section says."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmbatch.spec import ModelSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
