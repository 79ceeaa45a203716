"""Runners: the programs `accelerate launch` executes on every rank (`infer`, `finetune`)."""

from datetime import timedelta

# A runner that stopped at a preemption signal after saving its work exits with this
# (EX_TEMPFAIL): the node job then lets submitit requeue instead of failing the job.
PREEMPTED_EXIT = 75

COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""A collective that a dead or stuck peer never joins fails after this, instead of hanging the job."""
