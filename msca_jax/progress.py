"""A small progress reporter: count / total, rate, ETA and extra fields on one line.

On a terminal the line is redrawn in place with a bar; in a log file (not a TTY) a plain line is
written at most every `min_interval_s` seconds, plus a final line on `close()`, so that batch-job
logs stay readable:

    with Progress(total=1000, unit="videos", desc="train") as progress:
      for ...:
        progress.update(1, failed=3)

    train: 120/1000 videos (12%), 10.0 videos/s, elapsed 0:00:12, ETA 0:01:28, failed=3
"""

from __future__ import annotations

import logging as std_logging
import sys
import time
from typing import Any, Callable, TextIO

_BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
  """H:MM:SS (hours are not wrapped at 24)."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_rate(rate: float) -> str:
  """Three significant digits without exponents: 0.123, 1.23, 12.3, 123, 1234."""
  if rate >= 100:
    return f"{rate:.0f}"
  if rate >= 10:
    return f"{rate:.1f}"
  if rate >= 1:
    return f"{rate:.2f}"
  return f"{rate:.3f}"


def _format_field(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


class Progress:
  """Reports progress of `total` units (None when unknown) to `stream`.

  The rate is the average since the reporter was created (minus `initial`, the units already done
  when it starts, e.g. a resumed training step), so create it right before the work starts.
  """

  def __init__(self, total: int | None, unit: str = "it", desc: str = "",
               stream: TextIO | None = None, min_interval_s: float | None = None,
               clock: Callable[[], float] = time.monotonic, initial: int = 0,
               tty: bool | None = None):
    self.total = total
    self.unit = unit
    self.desc = desc
    # Resolved now rather than at import, so redirected or captured stderr is honoured.
    self.stream = sys.stderr if stream is None else stream
    if tty is None:
      isatty = getattr(self.stream, "isatty", None)
      tty = bool(isatty and isatty())
    self.tty = tty
    if min_interval_s is None:
      min_interval_s = 0.1 if tty else 10.0
    self.min_interval_s = min_interval_s
    self.count = initial
    self.fields: dict[str, Any] = {}
    self._clock = clock
    self._initial = initial
    self._start = clock()
    self._last_print: float | None = None
    self._last_width = 0
    self._closed = False

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close()

  @property
  def elapsed(self) -> float:
    return self._clock() - self._start

  @property
  def rate(self) -> float:
    """Units per second since the start (0 before any time has passed)."""
    elapsed = self.elapsed
    return (self.count - self._initial) / elapsed if elapsed > 0 else 0.0

  def update(self, n: int = 1, **fields: Any) -> None:
    """Adds `n` units; `fields` (e.g. loss=0.3) are shown after the counts until replaced."""
    self.count += n
    self.fields.update(fields)
    now = self._clock()
    if self._last_print is None or now - self._last_print >= self.min_interval_s:
      self._emit(final=False)
      self._last_print = now

  def write(self, message: str) -> None:
    """Prints a message on its own line without garbling a terminal progress line."""
    if self.tty and self._last_width:
      self.stream.write("\r" + " " * self._last_width + "\r")
    self.stream.write(message.rstrip("\n") + "\n")
    if self.tty and self._last_width and not self._closed:
      self._last_width = 0
      self._emit(final=False)
    self.stream.flush()

  def close(self) -> None:
    """Writes the final line (once)."""
    if self._closed:
      return
    self._emit(final=True)
    self._closed = True

  def line(self, final: bool = False) -> str:
    """The current status line, without a bar."""
    parts = []
    if self.total:
      percent = 100.0 * self.count / self.total
      parts.append(f"{self.count}/{self.total} {self.unit} ({percent:.0f}%)")
    else:
      parts.append(f"{self.count} {self.unit}")
    rate = self.rate
    parts.append(f"{format_rate(rate)} {self.unit}/s")
    parts.append(f"elapsed {format_duration(self.elapsed)}")
    if not final and self.total:
      remaining = max(0, self.total - self.count)
      parts.append(f"ETA {format_duration(remaining / rate)}" if rate > 0 else "ETA ?")
    parts.extend(f"{k}={_format_field(v)}" for k, v in self.fields.items())
    prefix = f"{self.desc}: " if self.desc else ""
    return prefix + ", ".join(parts)

  def _bar(self) -> str:
    if not self.total:
      return ""
    filled = min(_BAR_WIDTH, int(_BAR_WIDTH * self.count / self.total))
    return "[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "] "

  def _emit(self, final: bool) -> None:
    text = self.line(final)
    if self.tty:
      if self.desc:
        text = text[:len(self.desc) + 2] + self._bar() + text[len(self.desc) + 2:]
      else:
        text = self._bar() + text
      # Pad over the previous, possibly longer, line instead of relying on ANSI escapes.
      padded = text.ljust(self._last_width)
      self._last_width = len(text)
      self.stream.write("\r" + padded + ("\n" if final else ""))
    else:
      self.stream.write(text + "\n")
    self.stream.flush()


def quiet_library_logs() -> None:
  """Drops orbax's INFO chatter (a dozen lines per checkpoint) from absl logging; keeps warnings."""
  from absl import logging as absl_logging

  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname
  absl_logging.get_absl_logger().addFilter(keep)
