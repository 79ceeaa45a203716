"""What a rank and its node job (node.py) share: the heartbeat by which the node job tells a silent
rank from a busy one, and the prefix of the one line a rank ends with on a failure the user must act
on (runners/faults.py), which the node job also writes for a silent rank it killed.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

ERROR_PREFIX = "llmbatch: error: "


def heartbeat_interval(collective_timeout_s: float) -> float:
    """Several beats per timeout, so one late beat (a slow shared file system) is no alarm."""
    return min(30.0, max(0.5, collective_timeout_s / 5))


def start_heartbeat(record: Path, collective_timeout_s: float) -> None:
    """Touch the rank's record (`RunDir.rank_record`) every little while, from a thread of its own.

    The thread runs between everything the rank does (torch releases Python's lock in its kernels and
    collectives), so the beat stops only when the whole process does: SIGSTOP, a frozen file system,
    a machine that went away. A rank waiting in a collective still beats; the collective's own
    timeout covers that case.
    """
    interval = heartbeat_interval(collective_timeout_s)

    def beat() -> None:
        while True:
            try:
                os.utime(record, follow_symlinks=False)  # a link planted in its place: its own time
            except OSError:
                pass  # a missed beat; the next one may land
            time.sleep(interval)

    threading.Thread(target=beat, name="llmbatch-heartbeat", daemon=True).start()


def silent_for(record: Path) -> float | None:
    """Seconds since the rank's last heartbeat, or None before it first recorded itself."""
    try:
        return time.time() - record.stat().st_mtime
    except FileNotFoundError:
        return None
