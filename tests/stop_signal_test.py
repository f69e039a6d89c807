"""Stopping by signal: the handlers are installed only while a run is on,
only in the main thread. (Real processes stopped by SIGTERM and Ctrl-C:
tests/faults_test.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time

from golf_jax.stop_signal import StopOnSignal


def test_signal_handlers_are_scoped():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in before:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), sig)
            time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
            assert stop.requested and stop.name == signal.Signals(sig).name and stop.exit_status == 128 + sig
        assert {s: signal.getsignal(s) for s in before} == before
    seen = []

    def in_thread():  # signals are the main thread's: elsewhere nothing is installed
        with StopOnSignal():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == [before[signal.SIGINT]]
