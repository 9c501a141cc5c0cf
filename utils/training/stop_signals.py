"""Stop requests by signal: a batch scheduler's SIGTERM/SIGUSR1 before a time limit or a pre-emption.

:class:`StopSignals` installs handlers that only record the signal; the training loop polls
:attr:`StopSignals.received` between steps, saves a checkpoint and exits cleanly, so the job can
be requeued and resumed (see :mod:`utils.training.engine`). The previous handlers come back when
the context ends. Outside the main thread (where Python cannot install handlers) it records nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

logger = logging.getLogger(__name__)

#: The signals that ask a run to checkpoint and stop: ``SIGTERM`` (``scancel``, ``kill``, the
#: scheduler's time limit) and ``SIGUSR1`` (SLURM's ``--signal=USR1@seconds`` warning).
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

#: Exit status of a training command stopped by one of :data:`STOP_SIGNALS` after saving its
#: checkpoint (``EX_TEMPFAIL``): the job should be requeued and resumed.
EXIT_INTERRUPTED = 75


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``DataLoader`` ``worker_init_fn``: loader workers ignore :data:`STOP_SIGNALS`.

    A scheduler signals every process of the job; a worker killed by it would make the training
    process fail before it could save. The training process decides and stops its workers itself.
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class StopSignals:
    """Context manager recording the first stop signal received (``received``: its name, or ``None``)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            logger.warning("%s received: the run saves a checkpoint after the current step and stops", self.received)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
