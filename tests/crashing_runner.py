"""A runner whose last rank crashes while the others wait in a collective.

Used by the Slurm tests: the launch path (srun, accelerate launch, distributed timeout) must fail the
job quickly with the crash in the logs, not leave the other ranks hanging.
"""

import argparse
from datetime import timedelta

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

parser = argparse.ArgumentParser()
parser.add_argument("--run-dir")
parser.add_argument("--attempt")
parser.parse_args()
# A long timeout: the job must end because of the crash, not because a collective timed out.
accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=30))])
if accelerator.process_index == accelerator.num_processes - 1:
    raise RuntimeError(f"rank {accelerator.process_index} crashed on purpose")
accelerator.wait_for_everyone()
