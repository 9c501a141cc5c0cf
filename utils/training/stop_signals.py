"""Stop requests by signal: a batch scheduler's SIGTERM/SIGUSR1 before a time limit or a pre-emption.

:class:`StopSignals` installs handlers that record the first signal; the training loop polls
:attr:`StopSignals.received` between steps, saves a checkpoint and exits cleanly, so the job can
be requeued and resumed (see :mod:`utils.training.engine`). Should a step (or a validation) take
too long, a second stop signal, sent at least :data:`REPEAT_SECONDS` after the first, stops the
run at once without saving: it raises :class:`ForcedStop` (exit status 128 + the signal's number,
as for a process killed by it; ``last.pt`` keeps the last save). Copies of the first signal that
arrive sooner (a scheduler signals every process of a job, a batch script or a launcher passes it
on as well) are the same request. SIGINT (Ctrl-C) is not handled: it stops at once, as always.
The previous handlers come back when the context ends. Outside the main thread (where Python
cannot install handlers) it records nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback as traceback_module
from types import FrameType, TracebackType

logger = logging.getLogger(__name__)

#: The signals that ask a run to checkpoint and stop: ``SIGTERM`` (``scancel``, ``kill``, the
#: scheduler's time limit) and ``SIGUSR1`` (SLURM's ``--signal=USR1@seconds`` warning).
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

#: Exit status of a training command stopped by one of :data:`STOP_SIGNALS` after saving its
#: checkpoint (``EX_TEMPFAIL``): the job should be requeued and resumed.
EXIT_INTERRUPTED = 75

#: Seconds after the first stop signal during which another one counts as a copy of it; a stop
#: signal after that forces an immediate stop (:class:`ForcedStop`).
REPEAT_SECONDS = 5.0


class ForcedStop(SystemExit):
    """A second stop signal arrived before the run could stop at the end of its step: stop now.

    A ``SystemExit`` (not an ``Exception``), so handlers of errors let it through and the process
    exits with :attr:`code` ``128 + signal number`` unless someone catches it on purpose.

    Attributes:
        signal_name: the second signal, e.g. ``"SIGTERM"``.
    """

    def __init__(self, signal_name: str, number: int):
        super().__init__(128 + number)
        self.signal_name = signal_name


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``DataLoader`` ``worker_init_fn``: loader workers ignore :data:`STOP_SIGNALS`.

    A scheduler signals every process of the job; a worker killed by it would make the training
    process fail before it could save. The training process decides and stops its workers itself.
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class StopSignals:
    """Context manager recording the first stop signal received (``received``: its name, or ``None``).

    Args:
        signals: the signals to handle.
        repeat_seconds: after the first signal, how long further ones count as copies of it; one
            arriving later raises :class:`ForcedStop` in the main thread, wherever it is.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, *, repeat_seconds: float = REPEAT_SECONDS):
        self.signals = signals
        self.repeat_seconds = repeat_seconds
        self.received: str | None = None
        self._received_at: float | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        now = time.monotonic()
        if self.received is None or self._received_at is None:
            self.received, self._received_at = name, now
            logger.warning("%s received: the run saves a checkpoint after the current step and stops "
                           "(another stop signal from %g s on stops it at once, without saving)",
                           name, self.repeat_seconds)
            return
        waited = now - self._received_at
        if waited < self.repeat_seconds:
            logger.info("%s received %.1f s after %s: the same stop request", name, waited, self.received)
            return
        where = "".join(traceback_module.format_stack(frame, limit=6)).rstrip() if frame is not None else "?"
        logger.warning("%s received %.0f s after %s, before the run could stop after its step: stopping now "
                       "without saving (the last saved checkpoint stays); it was at:\n%s",
                       name, waited, self.received, where)
        raise ForcedStop(name, number)

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
