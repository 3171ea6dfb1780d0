"""Progress of long work: a tqdm bar on a terminal, plain lines in a log file, nothing when turned off.

Every progress display of the package goes through `progress_bar`:

- stderr is a terminal (and tqdm is installed): a tqdm bar, redrawn in place;
- stderr is a file or pipe (a batch job's log, `2> log.txt`, CI): plain lines, one when another tenth of the work
  is done and at least one every `LINE_SECONDS` seconds, never a carriage return, so logs stay readable and short;
- turned off (`--no-progress` on a command, or ``PANOPTICON_NO_PROGRESS=1`` in the environment, which also
  reaches worker processes and the Python API; ``PANOPTICON_NO_TQDM=1``, the earlier name, works too): nothing.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

ENV_VAR = "PANOPTICON_NO_PROGRESS"
OLD_ENV_VAR = "PANOPTICON_NO_TQDM"
LINE_SECONDS = 30.0
LINE_STEPS = 10  # a line per tenth of the work when the total is known


def progress_enabled() -> bool:
    """False when the environment turns progress off (``PANOPTICON_NO_PROGRESS`` or ``PANOPTICON_NO_TQDM`` set to
    anything but empty, 0, false, no or off)."""
    for name in (ENV_VAR, OLD_ENV_VAR):
        if os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return False
    return True


def disable_progress() -> None:
    """Turn progress off for this process and the processes it starts (what a command's `--no-progress` does)."""
    os.environ[ENV_VAR] = "1"


def bars_allowed(enabled: bool = True, stream: Optional[TextIO] = None) -> bool:
    """True when a redrawn bar may be shown: progress is on and `stream` (default stderr) is a terminal. Other
    libraries' bars (torch.hub and Hugging Face downloads) are shown only then."""
    isatty = getattr(stream or sys.stderr, "isatty", None)
    return enabled and progress_enabled() and callable(isatty) and bool(isatty())


def progress_line(text: str, enabled: bool = True, stream: Optional[TextIO] = None) -> None:
    """Write one progress line (when progress is on), e.g. in place of another library's bar."""
    if enabled and progress_enabled():
        print(text, file=stream or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineProgress:
    """tqdm's interface (`update`, `close`, iteration, context manager) writing whole lines to a stream:
    `desc: n/total unit (p%), elapsed mm:ss, ETA mm:ss`; work resumed at `initial` > 0 gets a first line there."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", initial: float = 0, stream: Optional[TextIO] = None, disable: bool = False,
                 min_interval: float = LINE_SECONDS):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._start = initial
        self.disable, self.min_interval = disable, min_interval
        self._stream = stream
        self._t0 = self._last_time = time.monotonic()
        self._last_n = initial
        self._next_step = self._step_of(initial) + 1
        self._closed = False
        if initial and not disable:  # resumed work: say where it starts
            self._write()

    def _step_of(self, n: float) -> int:
        return int(LINE_STEPS * n / self.total) if self.total else 0

    def _write(self) -> None:
        now = time.monotonic()
        elapsed = now - self._t0
        text = f"{self.desc}: " if self.desc else ""
        if self.total:
            text += f"{self.n:g}/{self.total:g} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
            done = self.n - self._start
            eta = elapsed / done * (self.total - self.n) if done > 0 else None
            text += f", elapsed {_duration(elapsed)}" + (f", ETA {_duration(eta)}" if eta is not None else "")
        else:
            text += f"{self.n:g} {self.unit}, elapsed {_duration(elapsed)}"
        print(text, file=self._stream or sys.stderr, flush=True)
        self._last_time, self._last_n = now, self.n

    def update(self, n: float = 1) -> None:
        """Count `n` more units; write a line when another tenth is done or `min_interval` seconds passed."""
        if self.disable or not n:
            return
        self.n += n
        step = self._step_of(self.n)
        if step >= self._next_step:
            self._next_step = step + 1
            self._write()
        elif time.monotonic() - self._last_time >= self.min_interval:
            self._write()

    def close(self) -> None:
        """Write the final count, unless the last line already showed it."""
        if not self._closed and not self.disable and self.n != self._last_n:
            self._write()
        self._closed = True

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for tqdm compatibility; lines show counts and times only."""

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", initial: float = 0, enabled: bool = True, stream: Optional[TextIO] = None) -> Any:
    """A progress display for `iterable` (or for `total` units counted with `.update(n)`): a tqdm bar when
    `stream` (default stderr) is a terminal, plain lines otherwise, nothing when `enabled` is False or the
    environment turns progress off. Use it like tqdm: iterate over it, or call `update` and `close`."""
    if bars_allowed(enabled, stream):
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the train/eval/embed extras; without it, lines on the terminal too
            pass
        else:
            return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream or sys.stderr,
                        dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, stream=stream,
                        disable=not (enabled and progress_enabled()))
