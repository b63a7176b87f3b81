"""Ctrl-C and SIGTERM during training: save at the end of the step, then stop.

A run must never lose its last good checkpoint to a signal, and a job scheduler's SIGTERM
(``kill``, ``timeout``, Slurm) deserves the same treatment as Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Optional

from ..errors import Stopped

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def under_torchrun() -> bool:
    """Whether torchrun started this process: it sends its ranks SIGTERM itself, to end them."""
    return "LOCAL_RANK" in os.environ


class StopFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (``kill``, ``timeout``, a job scheduler) into a
    request to save and stop at the end of the step; a second one stops at once.

    Under torchrun only Ctrl-C: torchrun's own SIGTERM ends ranks when another one failed, and
    a rank waiting on a dead peer to save with it would hang.

    Once the loop stopped for a signal (``stopping``: this rank's, or another rank's that they
    agreed on), the handlers stay until :meth:`release` (the end of the run), not only to the
    end of the loop: torchrun passes a terminal's Ctrl-C to the ranks one after another, so it
    may reach a rank after that rank already stopped for another's. Then it is the same
    request, said and absorbed, not a KeyboardInterrupt in the middle of the last save.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the signal that asked to stop
        self.stopping = False  # the loop stopped for a signal
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopFlag":
        def handler(signum, frame):
            if self.requested:  # a second signal: stop now
                raise Stopped(signum)
            self.signum = signum
            name = SIGNAL_NAMES[signum]
            doing = ("the run is stopping already, its checkpoint saved" if self.stopping
                     else "saving a checkpoint at the end of this step")
            print(f"\n{name}: {doing} ({name} again to abort)", file=sys.stderr, flush=True)

        signals = [signal.SIGINT] if under_torchrun() else [signal.SIGINT, signal.SIGTERM]
        try:
            self._previous = {signum: signal.signal(signum, handler) for signum in signals}
        except ValueError:  # not in the main thread: no handlers
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        if not self.stopping:
            self.release()

    def release(self) -> None:
        """Put back the handlers this replaced (once)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class TermAsInterrupt:
    """SIGTERM outside the training loop (preparing data, say) raises :class:`Stopped` as Ctrl-C
    raises KeyboardInterrupt, so that a new run with nothing saved removes its folder."""

    def __enter__(self) -> "TermAsInterrupt":
        def handler(signum, frame):
            raise Stopped(signum)

        self._previous = None
        if not under_torchrun():
            try:
                self._previous = signal.signal(signal.SIGTERM, handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
