"""Progress of a long stage on stderr, one helper for every long command (preprocess, the scorers).

On a terminal it is a tqdm bar. Anywhere else (a log file, a pipe, a Slurm ``.out``) a bar's carriage
returns are noise, so it prints one plain line at the first update and then one every ``every_s`` seconds:

    score perplexity (rank 0/1): 1.2M/3.4M tok (35.3%), 41.2k tok/s, 12 docs/s, ETA 2m13s

The rate is measured from the start of this run (work done by an earlier, resumed run is not counted as
speed), and the ETA is what is left divided by that rate. ``enabled=False`` (``--quiet``,
``--no-progress``, ranks other than 0) prints nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def human(x: float, unit: str = "") -> str:
    """1234567 -> '1.2M' (SI prefixes; bytes too: '12.3MB')."""
    for scale, prefix in _SI:
        if abs(x) >= scale:
            return f"{x / scale:.1f}{prefix}{unit}"
    return f"{x:.0f}{unit}" if float(x).is_integer() or abs(x) >= 10 else f"{x:.1f}{unit}"


def duration(seconds: float) -> str:
    """Seconds as '7s', '2m05s' or '3h07m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_s(done: float, total: float | None, elapsed: float) -> float | None:
    """Seconds left at the rate so far; None when it cannot be known (no total, nothing done yet)."""
    if total is None or done <= 0 or elapsed <= 0:
        return None
    return max(total - done, 0) * elapsed / done


class Progress:
    """``update(n, **counts)`` as work is done; ``close()`` at the end (prints the final line).

    ``total``/``unit`` describe the main counter (what the ETA is computed on); ``counts`` are other
    counters shown as rates beside it (``docs=...`` -> "12.1 docs/s"). ``done``/``start_done`` may be set
    after construction for a resumed run (``start_done`` is excluded from the rate).
    """

    def __init__(self, name: str, total: int | float | None = None, unit: str = "docs", every_s: float = 5.0,
                 stream: TextIO | None = None, enabled: bool = True, bar: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.stream, self.enabled, self.clock = stream, enabled, clock
        self.done = self.start_done = 0
        self.counts: dict[str, float] = {}
        self.t0 = clock()
        self._last: float | None = None   # when a line was last printed (None: never)
        self._printed = -1
        self._closed = False
        self._tqdm = None
        out = self._out()
        if enabled and (bar if bar is not None else _isatty(out)):
            from tqdm import tqdm

            scale = unit == "B" or total is None or total >= 10_000   # 1.2M tok, but 5/10 docs
            self._tqdm = tqdm(total=total, unit=unit, unit_scale=scale, desc=name,
                              file=out, dynamic_ncols=True, mininterval=min(every_s, 1.0))

    def _out(self) -> TextIO:
        return self.stream or sys.stderr   # looked up now, not at import (tests and the demo redirect it)

    def update(self, n: float = 1, force: bool = False, **counts: float) -> None:
        self.done += n
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if not self.enabled:
            return
        if self._tqdm is not None:
            if counts or self.counts:
                self._tqdm.set_postfix_str(self._rates(self.clock() - self.t0, main=False), refresh=False)
            self._tqdm.update(n)
            return
        now = self.clock()
        due = self._last is None or now - self._last >= self.every_s
        if (due and n) or (force and self.done != self._printed):
            self._last, self._printed = now, self.done
            print(self.line(now), file=self._out(), flush=True)

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The progress line as of ``now``: done[/total] (pct), rates, and the ETA (or, ``final``, the time
        taken)."""
        elapsed = max((self.clock() if now is None else now) - self.t0, 1e-9)
        u = "" if self.unit == "B" else f" {self.unit}"   # bytes: the prefix carries it (12.3MB)
        if self.total is not None:
            pct = 100.0 * self.done / max(self.total, 1)
            head = f"{self._num(self.done)}/{self._num(self.total)}{u} ({pct:.1f}%)"
        else:
            head = f"{self._num(self.done)}{u}"
        if final:
            return f"{self.name}: {head}, {self._rates(elapsed)}, took {duration(elapsed)}"
        eta = eta_s(self.done - self.start_done, None if self.total is None else self.total - self.start_done,
                    elapsed)
        tail = "" if eta is None or self.done >= (self.total or 0) else f", ETA {duration(eta)}"
        return f"{self.name}: {head}, {self._rates(elapsed)}{tail}"

    def _num(self, x: float) -> str:
        return human(x, "B") if self.unit == "B" else (f"{x:,.0f}" if x < 1e6 else human(x))

    def _rates(self, elapsed: float, main: bool = True) -> str:
        elapsed = max(elapsed, 1e-9)
        parts = [f"{human((self.done - self.start_done) / elapsed, 'B' if self.unit == 'B' else '')}"
                 f"{'' if self.unit == 'B' else ' ' + self.unit}/s"] if main else []
        parts += [f"{human(v / elapsed)} {k}/s" for k, v in self.counts.items()]
        return ", ".join(parts)

    def close(self) -> None:
        """The final line (done, average rates, time taken); a bar is closed. Once."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
            return
        print(self.line(final=True), file=self._out(), flush=True)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # a closed or minimal stream
        return False
