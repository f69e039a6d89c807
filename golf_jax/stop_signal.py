"""Stopping a run by signal: SIGTERM (a pre-emption) and SIGINT (Ctrl-C) ask
the training loop to stop at the next step boundary with a checkpoint; a
second signal ends the process at once."""

from __future__ import annotations

import os
import signal
import threading


# 128 + the signal: what a shell and a batch scheduler report for a process the
# signal ended, so a pre-empted run reads as pre-empted, not as failed or done.
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
EXIT_SIGINT = 128 + signal.SIGINT  # 130, Ctrl-C


class StopOnSignal:
    """While active (main thread only: Python delivers signals there), SIGTERM
    and SIGINT (Ctrl-C) set `requested` instead of ending the process, so the
    loop stops at the next step boundary with a checkpoint. A compilation under
    way finishes first: a KeyboardInterrupt unwinding through XLA's compiler
    could crash the process (a segmentation fault was seen). A second signal
    of either kind ends the process at once with 128 + its number, leaving the
    earlier checkpoints as they are (a save in flight stays a temporary that
    is never taken for complete). The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        # Another process's signal reaches this one only as "stop" (distributed.StepAgreement).
        return signal.Signals(self.signum).name if self.signum is not None else "SIGTERM"

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum if self.signum is not None else signal.SIGTERM)

    def _handle(self, signum, frame):
        if self.requested:
            os.write(2, f"second {signal.Signals(signum).name}: exiting now; earlier checkpoints are kept\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        if signum == signal.SIGINT:
            os.write(2, b"Ctrl-C: stopping at the next step boundary with a checkpoint (a compilation under way "
                        b"finishes first); Ctrl-C again to exit at once\n")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
