"""The model families the engine runs, by config.json's `model_type`. Torch-free and import-free, so the
checks made before anything is queued can read it too.

Each runs through the model's own modules (model.py): what differs between families (fused
projections, per-head q/k norms, sliding-window layers, soft-capping, extra norms, mixture-of-experts
blocks, rotary variants) is read from the modules and the config, not from this table.
"""

FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
    "phi3": "Phi-3/Phi-4",
    "mixtral": "Mixtral",
    "qwen3_moe": "Qwen3-MoE",
}
"""model_type -> family name, as the logs say it."""

MIXTURE_OF_EXPERTS = frozenset({"mixtral", "qwen3_moe"})
