"""The forward passes of the engine, made of the Hugging Face model's own modules and weights.

The families of families.py share one decoder layout: token embeddings (Gemma's embedding module
scales itself by sqrt(hidden)); per layer an input norm, the query/key/value projections (fused in
Phi-3's `qkv_proj`; with biases in Qwen2), per-head q/k norms where the attention has them (Qwen3,
Gemma 3), rotary embeddings, attention, the output projection, then either a post-attention norm and
the MLP (Llama style) or Gemma's sandwich (post-attention norm on the attention's output, and
pre/post-feedforward norms around the MLP); a final norm, the output head and, where the config sets
one, Gemma's final soft cap. The MLP is the layer's own module: Phi-3's fused gate/up, and the
mixture-of-experts blocks of Mixtral and Qwen3-MoE (routing and experts as transformers runs them).
The engine calls those modules and replaces only the attention and its cache, so a model of these
families (a fine-tuned or adapter-merged one too) computes what transformers computes.

What is read per layer from the modules: the scaling (`query_pre_attn_scalar` for Gemma), the sliding
window (`sliding_window` of windowed layers: Gemma's alternating layers, Qwen's `layer_types`,
Mistral's and Phi-3's one window), the attention soft cap (Gemma 2), the rotary table (Gemma 3's local
and global bases).

Rotary embeddings: the cos/sin of every position a slot can hold, made once by the model's own
`rotary_emb` (default, linear, Llama 3 and YaRN scaling are functions of the position alone). LongRoPE
(Phi-3/Phi-4) switches from its short to its long factors once a sequence is longer than the original
context: a second table, chosen per row by the row's own length, as `generate` chooses it for one
sequence. Dynamic NTK scaling depends on the batch's longest sequence, so it is not supported.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from llmbatch.engine.attention import decode_attention, prefill_attention
from llmbatch.engine.cache import CacheShape, KVCache
from llmbatch.engine.families import FAMILIES, MIXTURE_OF_EXPERTS

UNSUPPORTED_ROPE = ("dynamic",)


def unsupported_reason(model) -> str | None:
    """Why the engine cannot run `model` (None: it can)."""
    config = model.config
    if config.model_type not in FAMILIES:
        return f"model type {config.model_type!r} (the engine runs {', '.join(FAMILIES)})"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    for rope_type in _rope_types(model.model.rotary_emb).values():
        if rope_type in UNSUPPORTED_ROPE:
            return f"rotary scaling {rope_type!r} (it changes with the batch's longest sequence)"
    if model.device.type not in ("cuda", "cpu"):
        return f"device {model.device.type}"
    return None


def describe(model) -> str:
    """The family and what the engine does for it, for the log."""
    config = model.config
    layers = model.model.layers
    windows = [_window(layer.self_attn, config) for layer in layers]
    parts = [FAMILIES[config.model_type]]
    windowed = [w for w in windows if w is not None]
    if windowed:
        parts.append(f"sliding window {min(windowed)} on {len(windowed)} of {len(layers)} layers")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        parts.append("soft-capping")
    if config.model_type in MIXTURE_OF_EXPERTS:
        parts.append(f"mixture of experts ({experts_implementation(model)})")
    rope = sorted(set(_rope_types(model.model.rotary_emb).values()) - {"default"})
    if rope:
        parts.append(f"rotary {', '.join(rope)}")
    return ", ".join(parts)


def experts_implementation(model) -> str | None:
    return getattr(model.config, "_experts_implementation", None)


def capturable(model) -> bool:
    """Whether the decode step may be captured in a CUDA graph: no host sync in it. transformers'
    grouped experts (sort, histc, grouped_mm) have none in bfloat16; other experts paths loop over
    the experts on the host."""
    if model.config.model_type not in MIXTURE_OF_EXPERTS:
        return True
    return experts_implementation(model) == "grouped_mm" and model.dtype == torch.bfloat16


def cache_shape(model) -> CacheShape:
    config = model.config
    attention = model.model.layers[0].self_attn
    return CacheShape(
        layers=config.num_hidden_layers,
        kv_heads=config.num_key_value_heads,
        head_dim=attention.head_dim,
        dtype=model.dtype,
    )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, dim] with cos/sin [..., rotary_dim] (broadcast over heads), as transformers
    rotates; a rotary_dim under dim (Phi-4's partial rotary) leaves the rest of each head as it is."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rotary_dim = cos.shape[-1]
    x, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    out = x * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def _rope_types(rotary) -> dict:
    """{layer type or None: rope type} of a rotary module (Gemma 3's has one per layer type)."""
    rope_type = getattr(rotary, "rope_type", "default")
    return dict(rope_type) if isinstance(rope_type, dict) else {None: rope_type}


def _window(attention, config) -> int | None:
    """The layer's sliding window, as the model's masks apply it; None: full attention."""
    if hasattr(attention, "layer_type") and getattr(config, "layer_types", None) is not None:
        window = attention.sliding_window if attention.layer_type == "sliding_attention" else None
    else:  # Mistral, Mixtral, Phi-3, Qwen3-MoE: one window for all layers, or none
        window = getattr(config, "sliding_window", None)
    return int(window) if window else None


class Rotary:
    """cos/sin tables [positions, rotary_dim] per layer type, from the model's own rotary_emb."""

    def __init__(self, rotary, config, positions: int, dtype: torch.dtype, device: torch.device):
        self.tables: dict = {}
        self.long: dict = {}
        self.original = None
        takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
        probe = torch.zeros(1, dtype=dtype, device=device)
        for layer_type, rope_type in _rope_types(rotary).items():

            def table(count: int, layer_type=layer_type):
                ids = torch.arange(count, device=device)[None]
                cos, sin = rotary(probe, ids, layer_type) if takes_type else rotary(probe, ids)
                return cos[0], sin[0]

            if rope_type == "longrope":
                parameters = config.rope_parameters
                parameters = parameters[layer_type] if layer_type is not None else parameters
                self.original = parameters["original_max_position_embeddings"]
                # transformers picks the factors by the forward's longest sequence: a call up to the
                # original context gives the short ones, a longer call the long ones.
                short = table(min(positions, self.original))
                if positions <= self.original:  # no sequence gets past the original context
                    self.tables[layer_type] = short
                    continue
                long = table(positions)
                self.long[layer_type] = long
                self.tables[layer_type] = tuple(torch.cat((s, whole[len(s) :])) for s, whole in zip(short, long))
            else:
                self.tables[layer_type] = table(positions)

    def __call__(self, layer_type, positions: torch.Tensor, lengths: torch.Tensor):
        """cos, sin [*positions.shape, rotary_dim]; `lengths` [rows]: each row's sequence length, which
        picks LongRoPE's factors."""
        cos, sin = (t[positions] for t in self.tables[layer_type])
        if layer_type in self.long:
            long = (lengths > self.original).view(-1, *[1] * (positions.dim()))
            cos, sin = (torch.where(long, t[positions], c) for t, c in zip(self.long[layer_type], (cos, sin)))
        return cos, sin


@dataclass
class Layer:
    layer: torch.nn.Module
    attention: torch.nn.Module
    window: int | None
    rope: object
    """The rotary table's key (Gemma 3: the layer type)."""


class EngineModel:
    def __init__(self, model, max_positions: int):
        self.model = model
        self.body = model.model
        config = model.config
        attention = self.body.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.q_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.sandwich = hasattr(self.body.layers[0], "pre_feedforward_layernorm")
        self.rotary = Rotary(self.body.rotary_emb, config, max_positions, model.dtype, model.device)
        per_type = len(self.rotary.tables) > 1
        self.layers = [
            Layer(
                layer,
                layer.self_attn,
                _window(layer.self_attn, config),
                layer.self_attn.layer_type if per_type else None,
            )
            for layer in self.body.layers
        ]

    def _qkv(self, attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries and keys, and values: [..., heads, dim] each."""
        shape = x.shape[:-1]
        if hasattr(attention, "qkv_proj"):  # Phi-3: one product, split as its attention splits it
            q, k, v = attention.qkv_proj(x).split(
                [self.q_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
            )
        else:
            q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        q = q.view(*shape, self.q_heads, self.head_dim)
        k = k.view(*shape, self.kv_heads, self.head_dim)
        v = v.view(*shape, self.kv_heads, self.head_dim)
        if hasattr(attention, "q_norm"):  # per-head RMSNorm before the rotation (Qwen3, Gemma 3)
            q, k = attention.q_norm(q), attention.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _block(self, entry: Layer, hidden: torch.Tensor, attend) -> torch.Tensor:
        """One decoder layer around `attend(normed hidden) -> attention output projected`."""
        layer = entry.layer
        out = attend(layer.input_layernorm(hidden))
        if self.sandwich:  # Gemma: norms on the attention's output and around the MLP
            hidden = hidden + layer.post_attention_layernorm(out)
            return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        hidden = hidden + out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.body.norm(hidden))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Prompts right-padded to [rows, width] into their slots; fp32 logits [rows, vocab] at each
        prompt's last token."""
        rows, width = tokens.shape
        positions = torch.arange(width, device=tokens.device).expand(rows, width)
        valid = positions < lengths[:, None]
        row_of, position_of = valid.nonzero(as_tuple=True)
        slot_of = slots[row_of]
        hidden = self.body.embed_tokens(tokens)
        rotary = {key: self.rotary(key, positions, lengths) for key in self.rotary.tables}
        for index, entry in enumerate(self.layers):

            def attend(x, index=index, entry=entry):
                q, k, v = self._qkv(entry.attention, x, *rotary[entry.rope])
                cache.keys[index][slot_of, position_of] = k[row_of, position_of]
                cache.values[index][slot_of, position_of] = v[row_of, position_of]
                out = prefill_attention(q, k, v, self.scale, entry.window, self.softcap)
                return entry.attention.o_proj(out.reshape(rows, width, -1))

            hidden = self._block(entry, hidden, attend)
        last = hidden[torch.arange(rows, device=tokens.device), lengths - 1]
        return self._logits(last)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """One new token a row, at `positions` of `slots`; fp32 logits [rows, vocab]. Only tensor ops
        with no host sync (for a mixture of experts, see `capturable`): this is what the CUDA graphs
        capture."""
        rows = tokens.shape[0]
        hidden = self.body.embed_tokens(tokens[:, None])  # [rows, 1, hidden]: the modules' layout
        lengths = positions + 1
        rotary = {key: self.rotary(key, positions, lengths) for key in self.rotary.tables}
        for index, entry in enumerate(self.layers):

            def attend(x, index=index, entry=entry):
                q, k, v = self._qkv(entry.attention, x[:, 0], *rotary[entry.rope])
                cache.keys[index][slots, positions] = k
                cache.values[index][slots, positions] = v
                out = decode_attention(
                    q, cache.keys[index], cache.values[index], slots, lengths, self.scale, entry.window, self.softcap
                )
                return entry.attention.o_proj(out.reshape(rows, 1, -1))

            hidden = self._block(entry, hidden, attend)
        return self._logits(hidden[:, 0])
