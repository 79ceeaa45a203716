"""llmbatch: LLM batch inference and LoRA fine-tuning on Slurm or locally, from one YAML spec."""

__version__ = "0.1.0"
