"""Preemption, as every rank sees it: the flag a signal or the run's marker raises, and the exit code of
a rank that stopped at it.
"""

from __future__ import annotations

import signal
from pathlib import Path

PREEMPTED_EXIT = 75
"""A rank that stopped at a preemption signal after saving its work exits with this (EX_TEMPFAIL), so
its log and status say so. The node job does not act on it: it got the signal too, and requeues or
not from its own flag."""


class PreemptionFlag:
    """Set by SIGUSR2 (Slurm's warning before preemption or the time limit), SIGTERM, or the run's
    preempt marker for this attempt.

    The marker is how the node job reaches ranks that its signal cannot: torch's launcher starts each
    rank in a session of its own. Signals only set a flag; the runner looks at it between batches or
    steps, where stopping is consistent (a save inside a handler could interrupt a collective or an
    optimizer step).
    """

    def __init__(self, marker: Path | None = None):
        self.marker = marker
        self._signalled = False
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._raise)

    def _raise(self, signum, frame) -> None:
        self._signalled = True

    @property
    def raised(self) -> bool:
        if not self._signalled and self.marker is not None and self.marker.exists():
            self._signalled = True
        return self._signalled
