"""What users see in the terminal: aligned tables and progress lines."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable, Sequence, TextIO


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None,
                 floatfmt: str = ".3f") -> str:
    """An aligned plain-text table (numbers right-aligned); ``columns`` picks and orders the keys."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c), floatfmt) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(_is_number(row.get(c)) for row in rows if row.get(c) is not None)
               for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def format_markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None,
                          floatfmt: str = ".3f") -> str:
    """The same table as GitHub markdown."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out.extend("| " + " | ".join(_cell(row.get(c), floatfmt) for c in columns) + " |" for row in rows)
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, floatfmt)
    return str(value)


def warn(message: str, stream: TextIO | None = None) -> None:
    """One ``warning: ...`` line on stderr: something the user should know that does not stop the job."""
    print(f"warning: {message}", file=stream or sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class Progress:
    """Periodic progress lines: ``<label>: 120/480 frames (25%), 31.2 frames/s, ETA 11s``.

    Writes at most every ``interval_s`` seconds (and at ``close``), to stderr by default, so it works in
    logs and Ray Job output as well as in a terminal.
    """

    def __init__(self, label: str, total: int | None, unit: str = "frames", interval_s: float = 2.0,
                 stream: TextIO | None = None, clock=time.monotonic) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._last_print = -math.inf
        self.extra = ""

    @property
    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        text = f"{self.label}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            text += f", {rate:.1f} {self.unit}/s, ETA {format_duration(eta)}"
        else:
            text += f" {self.unit}, {rate:.1f} {self.unit}/s"
        return text + (f", {self.extra}" if self.extra else "")

    def update(self, amount: int = 1, extra: str | None = None) -> None:
        self.done += amount
        if extra is not None:
            self.extra = extra
        now = self.clock()
        finished = bool(self.total) and self.done >= self.total  # ``close`` prints the last line
        if now - self._last_print >= self.interval_s and not finished:
            self._last_print = now
            self._write(self.line())

    def set_done(self, done: int, extra: str | None = None) -> None:
        """Like ``update``, with the absolute count (e.g. the epoch a resumed run reached)."""
        self.update(done - self.done, extra)

    def close(self) -> None:
        elapsed = self.clock() - self.started
        self._write(f"{self.line()} — done in {format_duration(elapsed)}", final=True)

    def _write(self, text: str, final: bool = False) -> None:
        """A new line in a log; in a terminal, the same line redrawn (one line per stage)."""
        if _is_terminal(self.stream):
            end = "\n" if final else ""
            print(f"\r{text}\033[K", end=end, file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
