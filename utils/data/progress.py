"""Progress display that suits both a terminal and a log file.

:func:`progress` returns a tqdm bar when its stream (stderr by default) is a terminal, or runs in a
Jupyter kernel (tqdm's notebook widget). Otherwise (output redirected into a SLURM ``.out`` file, a
pipe to ``tee`` as in ``scripts/launch_tmux.sh``, ``console.log``) the carriage returns of a bar
would bury the log lines between its redraws, so it returns a :class:`LineProgress`, which writes
plain lines through the same stream now and then::

    epoch 3/100: 40/120 (33%) 12.1 batch/s, eta 7 s, loss=0.4213

Both answer the part of tqdm's interface the project uses: iteration, ``update``,
``set_postfix``/``set_postfix_str``, ``set_description``, ``close``, ``with``, ``total``,
``initial``, ``leave`` and ``disable``.

The environment variable ``KITS19_PROGRESS`` overrides the choice: ``bar`` (tqdm always),
``lines`` (plain lines always) or ``off`` (nothing).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

from tqdm import tqdm

#: Environment variable forcing a style: ``bar``, ``lines`` or ``off``.
STYLE_VARIABLE = "KITS19_PROGRESS"
_STYLES = ("bar", "lines", "off")

#: Defaults of :class:`LineProgress`: a line at every 10 % of the total, not more often than every
#: 5 s, and at least every 60 s while the loop runs (also without a known total).
EVERY_PERCENT = 10.0
MIN_SECONDS = 5.0
MAX_SECONDS = 60.0


def progress(iterable: Iterable[Any] | None = None, *, desc: str = "", total: float | None = None,
             unit: str = "it", disable: bool | None = False, leave: bool = True, initial: float = 0,
             file: IO[str] | None = None, every_percent: float = EVERY_PERCENT, min_seconds: float = MIN_SECONDS,
             max_seconds: float = MAX_SECONDS, **tqdm_options: Any) -> tqdm | LineProgress:
    """A progress display over ``iterable`` (or updated by hand): a tqdm bar on a terminal, log lines elsewhere.

    Args:
        iterable: what to iterate over; ``None`` for a display advanced with ``update``.
        desc: the label in front of the counts.
        total: the expected count (default ``len(iterable)`` where it has one).
        unit: the name of one step (``case``, ``batch``).
        disable: ``True``: show nothing (the object still counts, iterates and accepts every
            call). ``False`` or ``None``: show progress; unlike tqdm, ``None`` does not turn it off
            on a stream that is not a terminal, it writes lines there instead.
        leave: keep the final state: tqdm leaves the bar; the lines end with a summary line. With
            ``False`` the bar disappears and no summary line is written.
        initial: the count to start from (a resumed loop).
        file: the stream (default ``sys.stderr`` at the time of the call).
        every_percent, min_seconds, max_seconds: how often lines are written (see :class:`LineProgress`).
        **tqdm_options: further tqdm arguments (``position``, ``dynamic_ncols``, ...), used by the bar only.

    Returns:
        A ``tqdm`` bar, or a :class:`LineProgress`.
    """
    stream = sys.stderr if file is None else file
    style = os.environ.get(STYLE_VARIABLE, "").strip().lower()
    if style and style not in _STYLES:
        raise ValueError(f"{STYLE_VARIABLE} must be one of {', '.join(_STYLES)}, got {style!r}")
    if disable or style == "off":
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True, leave=leave, initial=initial,
                    file=stream)
    bar_class: type[tqdm] | None = None
    if style == "bar":
        bar_class = tqdm
    elif style != "lines":
        if file is None and _in_notebook():
            bar_class = _notebook_tqdm()
        elif _is_terminal(stream):
            bar_class = tqdm
    if bar_class is not None:
        return bar_class(iterable, desc=desc, total=total, unit=unit, leave=leave, initial=initial, file=stream,
                         **tqdm_options)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, leave=leave, initial=initial, file=stream,
                        every_percent=every_percent, min_seconds=min_seconds, max_seconds=max_seconds)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where tqdm shows a widget), as ``tqdm.auto`` decides."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # an IPython too old or half imported: no widget
        return False


def _notebook_tqdm() -> type[tqdm]:
    from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm


class LineProgress:
    """Progress written as whole lines, for streams that are not terminals (a tqdm-compatible subset).

    A line is written when the count passes the next multiple of ``every_percent`` of the total,
    provided ``min_seconds`` have passed since the previous line, and whenever ``max_seconds`` have
    passed without one (with or without a total); ``close`` writes a summary line when ``leave``.
    The count, rate and estimated time left are computed from the whole run so far.

    Attributes:
        n: the count so far (``initial`` included).
        total: the expected count, or ``None``.
        desc: the label.
        postfix: the text after the counts (``set_postfix``), or ``""``.
        disable: always ``False`` (for code written for tqdm).
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str = "", total: float | None = None,
                 unit: str = "it", leave: bool = True, initial: float = 0, file: IO[str] | None = None,
                 every_percent: float = EVERY_PERCENT, min_seconds: float = MIN_SECONDS,
                 max_seconds: float = MAX_SECONDS, clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        if every_percent <= 0 or min_seconds < 0 or max_seconds <= 0:
            raise ValueError(f"every_percent and max_seconds must be > 0 and min_seconds >= 0, got "
                             f"{every_percent}, {max_seconds}, {min_seconds}")
        self.iterable = iterable
        self.desc = desc
        self.total = total
        self.unit = unit
        self.leave = leave
        self.initial = initial
        self.n = initial
        self.file = file
        self.postfix = ""
        self.disable = False
        self.every_percent = every_percent
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self._clock = clock
        self._start = clock()
        self._last_line = self._start
        self._next_mark = self._mark_after(initial)
        self._closed = False

    # --- counting ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress display has no iterable; advance it with update()")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is not None:
            return int(self.total)
        if self.iterable is not None:
            return len(self.iterable)  # type: ignore[arg-type]
        raise TypeError("this progress display has no length")

    def update(self, n: float = 1) -> bool | None:
        """Advance the count by ``n``; writes a line when one is due. Returns whether it wrote one."""
        self.n += n
        if self._closed:
            return None
        now = self._clock()
        since = now - self._last_line
        due = since >= self.max_seconds
        if self._next_mark is not None and self.n >= self._next_mark:
            self._next_mark = self._mark_after(self.n)
            due = due or since >= self.min_seconds
        if not due:
            return False
        self._write(self._status(now))
        self._last_line = now
        return True

    def _mark_after(self, count: float) -> float | None:
        """The first multiple of ``every_percent`` of the total above ``count`` (``None``: none left)."""
        if not self.total or self.total <= 0:
            return None
        step = self.total * self.every_percent / 100.0
        mark = (math.floor(count / step + 1e-9) + 1) * step
        return mark if mark <= self.total + 1e-9 else None

    # --- what is shown ----------------------------------------------------------------------------

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        """The text after the counts, as ``key=value`` pairs (numbers with 4 significant digits)."""
        values = dict(ordered_dict or {})
        values.update(kwargs)
        self.postfix = ", ".join(f"{key}={_format_value(value)}" for key, value in values.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    set_description_str = set_description

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to redraw: lines are written as they become due."""

    def clear(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to clear: written lines stay."""

    def reset(self, total: float | None = None) -> None:
        """Start counting again from 0 (with a new ``total`` when given)."""
        if total is not None:
            self.total = total
        self.n = self.initial = 0
        self._start = self._last_line = self._clock()
        self._next_mark = self._mark_after(0)
        self._closed = False

    def write(self, s: str, file: IO[str] | None = None, end: str = "\n") -> None:
        """Write a message through the stream (tqdm's ``tqdm.write``)."""
        self._write(s, end=end, stream=file)

    def close(self) -> None:
        """End the display; with ``leave``, write the summary line (count, time, rate)."""
        if self._closed:
            return
        self._closed = True
        if self.leave:
            self._write(self._status(self._clock(), final=True))

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the stream may be gone
            pass

    def __repr__(self) -> str:
        return self._status(self._clock())

    def _status(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self._start, 0.0)
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else None
        if self.total:
            counts = f"{_format_count(self.n)}/{_format_count(self.total)} ({100.0 * self.n / self.total:.0f}%)"
        else:
            counts = f"{_format_count(self.n)} {self.unit}"
        text = f"{counts} in {_format_seconds(elapsed)}," if final else counts
        if rate:
            text += f" {rate:.3g} {self.unit}/s" if rate >= 1 else f" {1 / rate:.3g} s/{self.unit}"
        text = text.rstrip(",")
        if not final and rate and self.total and self.total > self.n:
            text += f", eta {_format_seconds((self.total - self.n) / rate)}"
        if self.postfix:
            text += f", {self.postfix}"
        return f"{self.desc}: {text}" if self.desc else text

    def _write(self, line: str, end: str = "\n", stream: IO[str] | None = None) -> None:
        target = stream or self.file or sys.stderr
        try:
            target.write(line + end)
            target.flush()
        except (ValueError, OSError):  # a closed or broken stream: progress is not worth failing for
            pass


def _format_count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _format_seconds(seconds: float) -> str:
    """``7 s``, ``2 min 05 s``, ``3 h 12 min``."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
