"""metrics.json: a run's numbers, written once by its runner and read by the summary and `status`.

Its keys are named here, once: the writers (`gather.py` for inference, the fine-tuning recipe), the
summary (`summary.py`) and `lifecycle.progress` all use these names.
"""


class Metric:
    """The keys of metrics.json. A run writes those of its kind (and the optional ones it has)."""

    # Both kinds.
    EXAMPLES = "examples"
    """Inference: inputs with a result. Fine-tuning: training examples."""
    WALL_S = "wall_s"
    """Inference: per attempt the slowest rank's time, summed. Fine-tuning: this attempt's wall time."""
    WORLD_SIZE = "world_size"
    """Ranks of the (last) attempt."""

    # Inference: over all results.
    PROMPT_TOKENS = "prompt_tokens"
    GENERATED_TOKENS = "generated_tokens"
    FINISH_REASONS = "finish_reasons"
    TRUNCATED_PROMPTS = "truncated_prompts"
    """Results whose prompt `generation.long_prompts: truncate` cut to fit the model's context."""
    # Inference, when the inputs have references: see `llmbatch.scoring`.
    ACCURACY = "accuracy"
    CORRECT = "correct"
    SCORED = "scored"
    SCORING = "scoring"
    # Inference, from the stats of ranks that finished.
    GENERATE_S = "generate_s"
    TOKENS_PER_S = "tokens_per_s"
    EXAMPLES_PER_S = "examples_per_s"
    RANKS = "ranks"
    LOAD_BALANCE = "load_balance"
    # Inference, where the engine ran: summed over the finished ranks (occupancy: their mean share
    # of cache slots in use per decode step).
    PREFILL_S = "prefill_s"
    DECODE_S = "decode_s"
    DECODE_STEPS = "decode_steps"
    OCCUPANCY = "occupancy"

    # Fine-tuning.
    STEPS = "steps"
    TOKENS = "tokens"
    TRAIN_S = "train_s"
    TRAIN_TOKENS_PER_S = "train_tokens_per_s"
    TRAIN_LOSS_FIRST = "train_loss_first"
    TRAIN_LOSS_LAST = "train_loss_last"
    VAL_LOSS_FIRST = "val_loss_first"
    VAL_LOSS_LAST = "val_loss_last"
    VAL_LOSS_BEST = "val_loss_best"
    BEST_STEP = "best_step"
    """The step of the best validation loss: the one adapter-best/ is from."""
    STOPPED_EARLY = "stopped_early"
    """True when train.early_stopping_patience ended the run before its last step."""
    VAL_PPL_LAST = "val_ppl_last"
    VAL_ACCURACY_FIRST = "val_accuracy_first"
    VAL_ACCURACY_LAST = "val_accuracy_last"
