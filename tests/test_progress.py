"""Progress display: tqdm bars on a terminal, plain periodic lines in redirected output."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from tqdm import tqdm

from utils.data.progress import STYLE_VARIABLE, LineProgress, progress

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def no_style_override(monkeypatch):
    monkeypatch.delenv(STYLE_VARIABLE, raising=False)


def test_a_stream_that_is_not_a_terminal_gets_plain_lines_at_every_ten_percent_without_carriage_returns():
    stream = io.StringIO()
    bar = progress(range(120), desc="preprocess", unit="case", file=stream, min_seconds=0)
    assert isinstance(bar, LineProgress) and len(bar) == 120
    seen = [item for item in bar]
    assert seen == list(range(120))
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    counts = [int(re.match(r"preprocess: (\d+)/120 \(\d+%\)", line).group(1)) for line in lines]
    assert counts == [12, 24, 36, 48, 60, 72, 84, 96, 108, 120, 120]  # every 10 %, then the summary
    assert "(50%)" in lines[4] and "case/s" in lines[4] and ", eta " in lines[4]
    assert lines[-1].startswith("preprocess: 120/120 (100%) in ") and "eta" not in lines[-1]


def test_lines_are_spaced_in_time_and_carry_rate_eta_and_postfix():
    clock, stream = FakeClock(), io.StringIO()
    bar = LineProgress(desc="epoch 3/100", total=100, unit="batch", file=stream, clock=clock,
                       min_seconds=5, max_seconds=60)
    for _ in range(10):  # 10 % after 1 s: too soon after the start for a line
        clock.now += 0.1
        bar.update()
    assert stream.getvalue() == ""
    for _ in range(10):  # 20 % after 6 s: a line
        clock.now += 0.5
        bar.update()
    assert stream.getvalue().splitlines() == ["epoch 3/100: 20/100 (20%) 3.33 batch/s, eta 24 s"]
    bar.set_postfix(loss=0.421337, note="resumed")
    clock.now += 70  # no mark passed, but more than a minute without a line
    bar.update(1)
    assert stream.getvalue().splitlines()[1] == "epoch 3/100: 21/100 (21%) 3.62 s/batch, eta 4 min 46 s, " \
                                                "loss=0.4213, note=resumed"


def test_lines_follow_percent_marks_and_time():
    clock, stream = FakeClock(), io.StringIO()
    bar = LineProgress(desc="segment", total=4, unit="case", file=stream, clock=clock, min_seconds=5)
    clock.now += 30
    bar.update()  # 25 %: past the 10 % mark and 30 s after the start
    assert stream.getvalue().splitlines() == ["segment: 1/4 (25%) 30 s/case, eta 1 min 30 s"]
    clock.now += 30
    bar.set_postfix_str("case_00007")
    bar.update()
    bar.close()
    bar.close()  # closing twice writes one summary
    assert stream.getvalue().splitlines()[1:] == ["segment: 2/4 (50%) 30 s/case, eta 1 min 00 s, case_00007",
                                                  "segment: 2/4 (50%) in 1 min 00 s, 30 s/case, case_00007"]


def test_unknown_total_writes_counts_every_max_seconds():
    clock, stream = FakeClock(), io.StringIO()
    bar = LineProgress(iter(range(1000)), desc="slices", unit="slice", file=stream, clock=clock, max_seconds=60)
    assert bar.total is None
    for _ in bar:
        clock.now += 0.25  # 4 slices per second: a line every 240 slices
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["slices: 240 slice 4 slice/s", "slices: 480 slice 4 slice/s"]
    assert lines[-1] == "slices: 1000 slice in 4 min 10 s, 4 slice/s" and len(lines) == 5


def test_update_by_hand_as_a_context_manager_with_initial_and_leave_false():
    stream = io.StringIO()
    with progress(total=10, desc="checking cases", unit="case", file=stream, min_seconds=0, initial=5,
                  leave=False) as bar:
        assert bar.n == 5
        for _ in range(5):
            bar.update()
    text = stream.getvalue()
    assert text.splitlines()[0].startswith("checking cases: 6/10 (60%)")
    assert text.splitlines()[-1].startswith("checking cases: 10/10 (100%)") and " in " not in text  # no summary
    assert "\r" not in text


def test_disable_shows_nothing_but_still_iterates_and_takes_every_call():
    stream = io.StringIO()
    bar = progress([1, 2, 3], desc="quiet", file=stream, disable=True)
    assert list(bar) == [1, 2, 3]
    with progress(total=3, desc="quiet", file=stream, disable=True) as manual:
        manual.update(2)
        manual.set_postfix(loss=1.0)
        manual.set_postfix_str("x")
    assert stream.getvalue() == ""


def test_the_environment_variable_forces_a_style(monkeypatch):
    monkeypatch.setenv(STYLE_VARIABLE, "bar")
    assert isinstance(progress(range(3), desc="x", file=io.StringIO()), tqdm)
    stream = io.StringIO()
    monkeypatch.setenv(STYLE_VARIABLE, "off")
    assert list(progress(range(3), desc="x", file=stream)) == [0, 1, 2] and stream.getvalue() == ""
    monkeypatch.setenv(STYLE_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match=STYLE_VARIABLE):
        progress(range(3), file=stream)


_CHILD = ("import time\n"
          "from utils.data.progress import progress\n"
          "bar = progress(range(50), desc='work', unit='case', min_seconds=0)\n"
          "print(type(bar).__module__, type(bar).__name__, flush=True)\n"
          "for _ in bar:\n"
          "    time.sleep(0.002)\n")


def test_redirected_stderr_of_a_real_process_gets_lines():
    env = {key: value for key, value in os.environ.items() if key != STYLE_VARIABLE}
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**env, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["utils.data.progress", "LineProgress"]
    assert "\r" not in run.stderr and re.search(r"^work: 25/50 \(50%\) ", run.stderr, re.MULTILINE), run.stderr
    assert run.stderr.splitlines()[-1].startswith("work: 50/50 (100%) in ")


def test_a_terminal_gets_the_tqdm_bar():
    env = {key: value for key, value in os.environ.items() if key != STYLE_VARIABLE}
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    process = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=REPO, stdin=secondary, stdout=secondary,
                               stderr=secondary, env={**env, "PYTHONPATH": str(REPO), "TERM": "xterm"},
                               close_fds=True)
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    data = os.read(primary, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        assert process.wait(timeout=30) == 0
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
    output = b"".join(chunks).decode("utf-8", "replace")
    assert "tqdm.std tqdm" in output  # the class of the returned object, printed by the child
    assert "\r" in output.replace("\r\n", "\n") and "work: 100%" in output and "50/50" in output, output
