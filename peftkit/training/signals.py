"""SIGINT/SIGTERM during training: stop at the next step boundary, after a checkpoint."""

from __future__ import annotations

import signal
import threading

from peftkit.errors import UserError
from peftkit.log import warn


class Interrupted(UserError):
    """SIGINT/SIGTERM: the run stopped at a step boundary after saving a checkpoint."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.exit_code = 128 + signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """SIGINT/SIGTERM set ``signum``; the trainer checkpoints at the next step and stops.

    A second signal interrupts at once (KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        warn(f"{name(signum)}: stopping after this step (a checkpoint is saved); "
             "press Ctrl-C again to stop at once")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
