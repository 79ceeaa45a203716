"""The forward passes of the engine, made of the Hugging Face model's own modules and weights.

Llama, Qwen2 and Mistral share one decoder layout: token embeddings; per layer an input RMSNorm,
q/k/v projections (with biases in Qwen2), rotary position embeddings from the model's `rotary_emb`,
attention, an output projection, a post-attention RMSNorm and the MLP; a final norm and the output
head. The engine calls those modules and replaces only the attention and its cache, so a model of
these families (a fine-tuned or adapter-merged one too) computes what transformers computes.
Anything else (another layout, sliding-window attention shorter than the sequences) is not
supported here: `unsupported_reason` says why, and the runner falls back to `generate`.
"""

from __future__ import annotations

import torch

from llmbatch.runners.engine.attention import decode_attention, prefill_attention
from llmbatch.runners.engine.cache import CacheShape, KVCache
from llmbatch.spec import ENGINE_MODEL_TYPES


def unsupported_reason(model, longest_sequence: int) -> str | None:
    """Why the engine cannot run `model` (None: it can)."""
    config = model.config
    if config.model_type not in ENGINE_MODEL_TYPES:
        return f"model type {config.model_type!r} (the engine runs {', '.join(ENGINE_MODEL_TYPES)})"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < longest_sequence:
        return f"sliding-window attention ({window} positions) over sequences of up to {longest_sequence}"
    if model.device.type not in ("cuda", "cpu"):
        return f"device {model.device.type}"
    return None


def cache_shape(model) -> CacheShape:
    config = model.config
    attention = model.model.layers[0].self_attn
    return CacheShape(layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads,
                      head_dim=attention.head_dim, dtype=model.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, dim] with cos/sin [..., dim] (broadcast over heads), as transformers rotates."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class EngineModel:
    def __init__(self, model):
        self.model = model
        self.body = model.model
        attention = self.body.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.q_heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads

    def _qkv(self, attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries and keys, and values: [..., heads, dim] each."""
        shape = x.shape[:-1]
        q = attention.q_proj(x).view(*shape, self.q_heads, self.head_dim)
        k = attention.k_proj(x).view(*shape, self.kv_heads, self.head_dim)
        v = attention.v_proj(x).view(*shape, self.kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.body.norm(hidden)).float()

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """Prompts right-padded to [rows, width] into their slots; fp32 logits [rows, vocab] at each
        prompt's last token."""
        rows, width = tokens.shape
        positions = torch.arange(width, device=tokens.device).expand(rows, width)
        valid = positions < lengths[:, None]
        row_of, position_of = valid.nonzero(as_tuple=True)
        slot_of = slots[row_of]
        hidden = self.body.embed_tokens(tokens)
        cos, sin = self.body.rotary_emb(hidden, positions)
        for index, layer in enumerate(self.body.layers):
            attention = layer.self_attn
            q, k, v = self._qkv(attention, layer.input_layernorm(hidden), cos, sin)
            cache.keys[index][slot_of, position_of] = k[row_of, position_of]
            cache.values[index][slot_of, position_of] = v[row_of, position_of]
            out = prefill_attention(q, k, v, self.scale)
            hidden = hidden + attention.o_proj(out.reshape(rows, width, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = hidden[torch.arange(rows, device=tokens.device), lengths - 1]
        return self._logits(last)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
        """One new token a row, at `positions` of `slots`; fp32 logits [rows, vocab]. Only tensor ops
        with no host sync: this is what the CUDA graphs capture."""
        rows = tokens.shape[0]
        hidden = self.body.embed_tokens(tokens[:, None])  # [rows, 1, hidden]: the modules' layout
        cos, sin = self.body.rotary_emb(hidden, positions[:, None])
        cos, sin = cos[:, 0], sin[:, 0]
        lengths = positions + 1
        for index, layer in enumerate(self.body.layers):
            attention = layer.self_attn
            q, k, v = self._qkv(attention, layer.input_layernorm(hidden)[:, 0], cos, sin)
            cache.keys[index][slots, positions] = k
            cache.values[index][slots, positions] = v
            out = decode_attention(q, cache.keys[index], cache.values[index], slots, lengths, self.scale)
            hidden = hidden + attention.o_proj(out.reshape(rows, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self._logits(hidden[:, 0])
