"""Runners: the programs `accelerate launch` executes on every rank (`infer`, `finetune`)."""

# A runner that stopped at a preemption signal after saving its work exits with this
# (EX_TEMPFAIL): the node job then lets submitit requeue instead of failing the job.
PREEMPTED_EXIT = 75
