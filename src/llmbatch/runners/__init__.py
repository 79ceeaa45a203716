"""Runners: the programs `accelerate launch` executes on every rank (`infer`, `finetune`)."""
