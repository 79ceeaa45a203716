"""llmbatch: LLM batch inference and LoRA fine-tuning on Slurm or locally, from one YAML spec."""

__version__ = "0.1.0"

COMMAND = "python submit.py"
"""How a user runs the command line: the hints on both sides (the CLI's, the ranks') name it, and so
does --help."""
