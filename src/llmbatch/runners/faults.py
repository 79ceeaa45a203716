"""How a rank ends on a failure the user must act on: one line on stderr, which lands in its node's log
and which the command line shows (`lifecycle.rank_error`), instead of a traceback.

    llmbatch: error: <what>          a mistake in the spec or the run folder found on the node (exit 2),
    llmbatch: error: <path>: damaged, ...   a file of the run folder it cannot read (exit 1),
    llmbatch: error: interrupted (SIGINT); ...   Ctrl-C of a local run (exit 130), or
    llmbatch: error: <path>: no space left on device; ...   the run's file system is full (exit 1)

A full file system shows up as an OSError (ENOSPC) from Python's own writes, but as a RuntimeError
from torch.save ("file write failed") or a SafetensorError from safetensors, so the run folder's
free space decides too. The rank first gives back the run's space reserve, so the line fits in the log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from llmbatch import COMMAND
from llmbatch.heartbeat import ERROR_PREFIX
from llmbatch.rundir import DamagedRun, RunDir

FULL_BELOW_BYTES = 64 << 10
"""A file system with less free space than this counts as full."""


def out_of_space(error: BaseException, folder: Path) -> bool:
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


def run_rank(main: Callable[[], int], run_dir: str, spec_errors: tuple[type[Exception], ...] = ()) -> NoReturn:
    """Run a rank's main() and end the process with its exit code, without Python's teardown.

    When main() returns, the rank's outputs are on disk and every rank has passed its last collective.
    Python's teardown would then only destroy objects, and one of them can hang; so the rank flushes
    its output and leaves with os._exit; the node job, a process above it, is what reports the job's
    end (submitit's result).

    The process groups must outlive main() too: main() never destroys them (no destroy_process_group,
    no accelerator.end_training), so torch's registry holds them until os._exit. Destroying a gloo
    group (~ProcessGroupGloo) joins its worker threads while holding Python's lock, and a worker may
    still be freeing the last collective's work (a barrier holds the allreduce before it, whose tensors
    Python owns), for which it waits for that lock: both wait forever. It hung about 1 run in 20 (1 in
    4 on a busy machine): the last reference went when main() returned and freed the DDP model (its
    reducer), after end_training had dropped the registry's; then the launcher's exit barrier held the
    job.
    """
    try:
        code = _exit_code(main, run_dir, spec_errors)
    except SystemExit as e:  # sys.exit(code or message), as Python would end
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # a crash: its traceback, in the rank's log, as Python would print it
        traceback.print_exc()
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe loses only what it cannot take
            stream.flush()
    os._exit(code)


def _exit_code(main: Callable[[], int], run_dir: str, spec_errors: tuple[type[Exception], ...]) -> int:
    """main()'s exit code; `spec_errors`, a damaged run folder (a planted link, say) and a full file
    system as one line on stderr."""
    try:
        return main()
    except (DamagedRun, *spec_errors) as e:  # the spec's or the run folder's mistake, not a crash
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C of a local run, forwarded by the node job
        print(
            f"{ERROR_PREFIX}interrupted (SIGINT); finish the run with: {COMMAND} resume {run_dir}",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except Exception as e:
        run = RunDir(Path(run_dir))
        if not out_of_space(e, run.path):
            raise
        run.release_space()
        where = getattr(e, "filename", None) or run.path
        print(
            f"{ERROR_PREFIX}{where}: no space left on device; free space there, then: {COMMAND} resume {run.path}",
            file=sys.stderr,
            flush=True,
        )
        return 1
