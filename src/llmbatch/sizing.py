"""Memory per rank, estimated before queueing from the model's config.json alone (no weights read).

A rank needs its share of the weights (all of them under data parallelism; 1/N of the frozen base
under FSDP over N ranks, plus the blocks it gathers to run them; 4-bit base layers with nf4), and:
- fine-tuning: the LoRA weights with their gradients and AdamW's two moments (fp32: 16 bytes per LoRA
  parameter, sharded too under FSDP), and the activations a step keeps for its backward pass;
- inference: a KV cache big enough to be useful (the engine sizes its own from what is free, so here
  a floor: generation.kv_cache_gb, else MIN_KV_TOKENS tokens).
Plus a fixed allowance for the CUDA context, the allocator's slack and communication buffers.

The rule of thumb this encodes is in the README (Choosing a layout). It is an estimate, meant to
catch a spec that cannot fit (a 70B model in bf16 on 80 GB cards), not to promise that one fits.
`check_memory` refuses such a spec in one line naming the smallest layout that would fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmbatch.models import model_folder, read_json_object, text_config
from llmbatch.spec import JobSpec, SpecError

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB
"""CUDA context, allocator slack, NCCL buffers: per rank, whatever the model."""
MIN_KV_TOKENS = 16_384
"""Inference: the least KV cache worth running with (e.g. 32 sequences of 512 tokens)."""
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)
"""Per 4-bit parameter: the nibble, an 8-bit absmax per block of 64 (double quantization) and an fp32
constant per 256 blocks."""
LORA_BYTES = 16
"""Per LoRA parameter: fp32 weight, its gradient and AdamW's two moments."""
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_GPUS = 4096
"""The most GPUs a suggested FSDP layout may span."""


@dataclass(frozen=True)
class Shape:
    """A decoder's sizes, from its config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    """Routed experts of a mixture-of-experts MLP (1: a dense MLP)."""
    tied: bool

    @property
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of a block, by its usual name; MoE experts' MLPs counted once each."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def block_params(self) -> int:
        """The linear weights of one decoder block (what nf4 quantizes; norms are negligible)."""
        shapes = self.projection_shapes
        attention = sum(a * b for name, (a, b) in shapes.items() if name in PROJECTIONS[:4])
        mlp = sum(a * b for name, (a, b) in shapes.items() if name in PROJECTIONS[4:])
        return attention + mlp * self.experts + (self.hidden * self.experts if self.experts > 1 else 0)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        shapes = self.projection_shapes
        names = PROJECTIONS if targets == "all-linear" else [t for t in targets if t in shapes]
        per_block = sum(r * sum(shapes[n]) * (self.experts if n in PROJECTIONS[4:] else 1) for n in names)
        return per_block * self.layers

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token in every layer: 2 x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def shape_of(config: dict) -> Shape | None:
    """The decoder's sizes, or None where the config lacks what the estimate needs."""
    text = text_config(config)
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if not all(isinstance(text.get(k), int) and text[k] > 0 for k in needed):
        return None
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    experts = next((text[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if text.get(k)), 1)
    intermediate = (text.get("moe_intermediate_size") if experts > 1 else None) or text.get("intermediate_size")
    return Shape(
        hidden=hidden,
        intermediate=intermediate or 4 * hidden,
        layers=text["num_hidden_layers"],
        heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or hidden // heads,
        vocab=text["vocab_size"],
        experts=experts,
        tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    )


@dataclass(frozen=True)
class Layout:
    """How a rank holds the model: its sharding over `world` ranks, its base weights' precision, and
    the tensor-parallel degree of an inference replica."""

    sharding: str = "ddp"
    world: int = 1
    quantization: str = "none"
    tensor_parallel: int = 1

    def describe(self) -> str:
        parts = []
        if self.sharding == "fsdp":
            parts.append(f"train.sharding: fsdp over {self.world} GPUs")
        if self.quantization != "none":
            parts.append(f"model.quantization: {self.quantization}")
        if self.tensor_parallel > 1:
            parts.append(f"the model split over {self.tensor_parallel} GPUs of a node (tensor parallel)")
        return " and ".join(parts) or "every rank holding the whole model"


def dtype_bytes(spec: JobSpec) -> int:
    return 4 if spec.model.dtype == "float32" else 2  # auto: bfloat16 on a GPU


def rank_bytes(spec: JobSpec, shape: Shape, layout: Layout) -> dict[str, float]:
    """The estimate for one rank, by part (bytes)."""
    width = dtype_bytes(spec)
    blocks = shape.block_params() * shape.layers
    block_bytes = NF4_BYTES if layout.quantization == "nf4" else width
    weights = blocks * block_bytes + shape.embedding_params() * width
    parts: dict[str, float] = {}
    if layout.sharding == "fsdp":
        # Its shard, plus the block running and the next one prefetched, gathered whole.
        parts["weights"] = weights / layout.world + 2 * shape.block_params() * block_bytes
    else:
        parts["weights"] = weights / layout.tensor_parallel
    if spec.kind == "finetune":
        lora = shape.lora_params(spec.lora.r, spec.lora.target_modules) * LORA_BYTES
        parts["LoRA and AdamW"] = lora / (layout.world if layout.sharding == "fsdp" else 1)
        parts["activations"] = activation_bytes(spec, shape)
    else:
        kv = (
            spec.generation.kv_cache_gb * GIB
            if spec.generation.kv_cache_gb
            else MIN_KV_TOKENS * shape.kv_bytes_per_token(width)
        )
        parts["KV cache"] = kv / layout.tensor_parallel
    parts["overhead"] = OVERHEAD_BYTES
    return parts


def activation_bytes(spec: JobSpec, shape: Shape) -> float:
    """What a step keeps for its backward pass, in bf16: per token and block its inputs and the
    projections' outputs (about 8 hidden-size and 4 intermediate-size vectors), or with gradient
    checkpointing only each block's input plus one block's worth; and the logits of the step's tokens
    in fp32 with their gradient."""
    tokens = spec.train.micro_batch_size * spec.train.seq_len
    per_block = (8 * shape.hidden + 4 * shape.intermediate) * 2
    if spec.train.gradient_checkpointing:
        kept = tokens * (shape.layers * shape.hidden * 2 + per_block)
    else:
        kept = tokens * shape.layers * per_block
    return kept + tokens * shape.vocab * (2 + 4 + 4)


def layouts_to_try(spec: JobSpec) -> list[Layout]:
    """The layouts a refusal may suggest, fewest GPUs and least change first."""
    world = spec.resources.nodes * spec.resources.gpus_per_node
    if spec.kind == "infer":
        return [Layout(tensor_parallel=n) for n in (2, 4, 8, 16, 32, 64)]
    same_gpus = [
        Layout("fsdp", world, spec.model.quantization),
        Layout(spec.train.sharding, world, "nf4"),
        Layout("fsdp", world, "nf4"),
    ]
    more_gpus = [
        Layout("fsdp", n, quantization) for quantization in ("none", "nf4") for n in range(world + 1, MAX_GPUS + 1)
    ]
    return [layout for layout in same_gpus if layout.world > 1 or layout.sharding == "ddp"] + more_gpus


def current_layout(spec: JobSpec) -> Layout:
    if spec.kind == "infer":
        return Layout()
    return Layout(spec.train.sharding, spec.resources.nodes * spec.resources.gpus_per_node, spec.model.quantization)


def check_memory(spec: JobSpec) -> None:
    """SpecError (resources.gpu_memory_gb) when the estimate for one rank exceeds the GPUs' memory, naming
    the first layout of `layouts_to_try` that fits. Nothing to check without resources.gpu_memory_gb, or
    for a model whose config lacks the sizes (the embedded model before its first build)."""
    limit_gb = spec.resources.gpu_memory_gb
    folder = model_folder(spec.model.path)
    if limit_gb is None or folder is None or not (Path(folder) / "config.json").is_file():
        return
    shape = shape_of(read_json_object(Path(folder) / "config.json", "model.path"))
    if shape is None:
        return
    layout = current_layout(spec)
    parts = rank_bytes(spec, shape, layout)
    if sum(parts.values()) <= limit_gb * GIB:
        return
    fits = next(
        (
            (candidate, total)
            for candidate in layouts_to_try(spec)
            if candidate != layout and (total := sum(rank_bytes(spec, shape, candidate).values())) <= limit_gb * GIB
        ),
        None,
    )
    detail = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts.items())
    if fits is None:
        remedy = "no layout llmbatch knows fits it (a smaller model, train.seq_len or micro_batch_size?)"
    else:
        candidate, total = fits
        remedy = f"it fits with {candidate.describe()} (about {total / GIB:.1f} GiB each)"
    raise SpecError(
        "resources.gpu_memory_gb",
        f"{spec.model.path} needs about {sum(parts.values()) / GIB:.1f} GiB per GPU ({detail}) with "
        f"{layout.describe()}, more than the {limit_gb:g} GiB given: {remedy}",
    )
