"""The model fine-tuning trains and its loss: a frozen base with peft's LoRA adapters, Liger-Kernel's
kernels where they apply, and the summed cross-entropy over a batch's target tokens, through
Liger-Kernel's fused output head and loss on CUDA or the plain head and cross-entropy elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from llmbatch.runners.model_loading import DTYPES
from llmbatch.runners.packing import IGNORE
from llmbatch.spec import JobSpec, TrainSpec


class QuantizationNeedsCuda(Exception):
    """model.quantization: nf4 on a rank without CUDA (a node whose GPUs the driver does not show)."""


def load_lora_model(spec: JobSpec, device: torch.device):
    """The base model, frozen (bf16 on GPU unless model.dtype says otherwise; 4-bit with
    model.quantization: nf4), with LoRA adapters, and whether Liger-Kernel's kernels were patched into
    it (use_liger_kernels).

    peft keeps the adapter weights in float32 whatever the base dtype, so the optimizer updates
    full-precision weights; accelerate's bf16 autocast covers the matmuls.
    """
    dtype = DTYPES.get(spec.model.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quantized = spec.model.quantization == "nf4"
    if quantized and device.type != "cuda":
        raise QuantizationNeedsCuda(
            f"model.quantization: {spec.model.quantization} needs a CUDA GPU (bitsandbytes' 4-bit kernels), "
            f"and this rank has none"
        )
    model = AutoModelForCausalLM.from_pretrained(
        spec.model.path, dtype=dtype, **(quantized_loading(spec, device) if quantized else {})
    )
    liger = use_liger_kernels(spec.train, model, device)
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}  # works with frozen inputs, DDP, FSDP
    if quantized and spec.train.sharding == "ddp":
        # Norms and embeddings to fp32 and input gradients on, as peft recommends for k-bit training. Not
        # under FSDP: it would upcast the bf16 storage FSDP shards too (TRL skips it there likewise).
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.train.gradient_checkpointing, **checkpointing
        )
    elif spec.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(**checkpointing)
        if quantized:
            model.enable_input_require_grads()  # frozen 4-bit inputs: the checkpointed blocks need a grad
    lora = spec.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), liger  # get_peft_model freezes every base weight


def quantized_loading(spec: JobSpec, device: torch.device) -> dict:
    """from_pretrained's arguments for 4-bit NF4 base weights (QLoRA): bf16 compute, double quantization.

    Under FSDP the 4-bit weights are stored in bf16 tensors (bnb_4bit_quant_storage): FSDP2 shards and
    gathers floating-point tensors only, and a frozen uint8 weight would stay whole on every rank
    (accelerate leaves such weights out of the sharding).
    """
    from transformers import BitsAndBytesConfig

    storage = torch.bfloat16 if spec.train.sharding == "fsdp" else torch.uint8
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=storage,
    )
    return {"quantization_config": config, "device_map": {"": device}}


def use_liger_kernels(cfg: TrainSpec, model, device: torch.device) -> bool:
    """Patch Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels into `model` where they apply.

    They apply with train.liger: auto, on CUDA (Triton kernels), with `liger_kernel` installed, and for
    an architecture it knows (Llama, Qwen2, Mistral, ...). They keep less for the backward pass than
    the eager modules (SwiGLU recomputes its product), so a step needs less memory. Its fused linear
    cross-entropy is not patched in here: token_loss_sum calls it itself (fused_head_loss), since it
    needs the targets of only the positions it keeps.
    """
    if cfg.liger == "off" or device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True


class HeadLoss:
    """The output head and the loss in one linear cross-entropy call that takes the head's input.

    `linear_cross_entropy(weight, hidden [N, hidden], targets [N], bias)` is Liger-Kernel's fused kernel
    (fused_head_loss). The head's input is the final norm's output, taken by a forward hook while the
    model runs with no position kept for its head: the model's own outputs cannot carry it, since
    accelerate converts every output of a mixed-precision model to float32, and output_hidden_states
    would convert them all.
    """

    def __init__(self, model, linear_cross_entropy):
        self.head = model.get_output_embeddings()
        self.linear_cross_entropy = linear_cross_entropy
        self.hidden: torch.Tensor | None = None
        model.get_decoder().norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        if self.hidden is not None:  # armed by __call__ only: generation leaves nothing behind
            self.hidden = output

    def __call__(self, model, inputs: dict, keep: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.hidden = torch.empty(0)
        try:
            model(**inputs, logits_to_keep=keep[:0])
            hidden = self.hidden[:, keep].flatten(0, 1).to(self.head.weight.dtype)
        finally:
            self.hidden = None
        return self.linear_cross_entropy(self.head.weight, hidden, targets[:, keep].flatten(), self.head.bias)


def fused_head_loss(model) -> HeadLoss | None:
    """Liger-Kernel's fused linear cross-entropy for the output head and the loss, where it applies.

    It computes the head's matmul and the cross-entropy in chunks, so the full [tokens, vocabulary]
    logits (and their float32 copy) never exist: the biggest activation of a LoRA step. Only for a
    plain linear output head on CUDA (not one LoRA or modules_to_save trains) after a decoder with a
    final `norm`; None otherwise: the plain path. Called once use_liger_kernels has applied.
    """
    head = model.get_output_embeddings()
    if (
        head.weight.device.type != "cuda"
        or type(head) is not torch.nn.Linear
        or not isinstance(getattr(model.get_decoder(), "norm", None), torch.nn.Module)
    ):
        return None
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return HeadLoss(model, LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum"))


def token_loss_sum(model, batch: dict[str, torch.Tensor], head_loss: HeadLoss | None = None) -> torch.Tensor:
    """Sum of the cross-entropy over a batch's target tokens.

    No attention mask, only position ids (see packing.py): that is how transformers keeps attention
    inside each packed sequence. use_cache=False, as a cache would also turn that detection off.
    With `head_loss` (fused_head_loss) the model stops before its head and `head_loss` does head and loss.
    """
    targets = batch["targets"]
    # The output head only at positions where some row has a target: with loss_on: completion the
    # prompt positions never get full-vocabulary logits, the biggest activation of a step.
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if head_loss is not None:
        return head_loss(model, inputs, keep, targets)
    logits = model(**inputs, logits_to_keep=keep).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE, reduction="sum"
    )
