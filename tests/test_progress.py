"""The progress reporter: plain throttled lines for logs, an in-place bar for terminals."""

import io

import pytest

from msca_jax import progress as progress_lib


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def test_format_duration():
  assert progress_lib.format_duration(0) == "0:00:00"
  assert progress_lib.format_duration(88.4) == "0:01:28"
  assert progress_lib.format_duration(3 * 3600 + 5 * 60 + 7) == "3:05:07"
  assert progress_lib.format_duration(30 * 3600) == "30:00:00"


@pytest.mark.parametrize("rate,text", [(0.0, "0.000"), (0.1234, "0.123"), (1.234, "1.23"),
                                       (12.34, "12.3"), (1234.4, "1234")])
def test_format_rate(rate, text):
  assert progress_lib.format_rate(rate) == text


def test_plain_lines_are_throttled_and_closed_with_a_final_line():
  clock, stream = FakeClock(), io.StringIO()
  with progress_lib.Progress(total=1000, unit="videos", desc="train", stream=stream,
                             min_interval_s=10, clock=clock) as progress:
    assert not progress.tty  # StringIO is not a terminal
    clock.now += 2
    progress.update(20)               # the first update always prints
    for _ in range(9):
      clock.now += 1
      progress.update(10, failed=3)   # within 10 s of the last line: silent
    clock.now += 1.6
    progress.update(10, failed=4)     # 10.6 s after the last line
  lines = stream.getvalue().splitlines()
  assert lines == [
      "train: 20/1000 videos (2%), 10.0 videos/s, elapsed 0:00:02, ETA 0:01:38",
      "train: 120/1000 videos (12%), 9.52 videos/s, elapsed 0:00:13, ETA 0:01:32, failed=4",
      "train: 120/1000 videos (12%), 9.52 videos/s, elapsed 0:00:13, failed=4",
  ]
  assert "\r" not in stream.getvalue()


def test_unknown_total_and_float_fields():
  clock, stream = FakeClock(), io.StringIO()
  progress = progress_lib.Progress(None, unit="steps", stream=stream, min_interval_s=0, clock=clock)
  clock.now += 4
  progress.update(2, loss=0.123456, lr=0.1)
  progress.close()
  progress.close()  # idempotent
  assert stream.getvalue().splitlines() == [
      "2 steps, 0.500 steps/s, elapsed 0:00:04, loss=0.1235, lr=0.1",
      "2 steps, 0.500 steps/s, elapsed 0:00:04, loss=0.1235, lr=0.1",
  ]


def test_initial_count_does_not_inflate_the_rate():
  clock = FakeClock()
  progress = progress_lib.Progress(100, stream=io.StringIO(), clock=clock, initial=50)
  clock.now += 10
  progress.update(10)
  assert progress.rate == pytest.approx(1.0)
  assert "60/100 it (60%)" in progress.line()
  assert "ETA 0:00:40" in progress.line()


def test_zero_rate_has_unknown_eta():
  clock = FakeClock()
  progress = progress_lib.Progress(10, stream=io.StringIO(), clock=clock)
  assert "ETA ?" in progress.line()


def test_terminal_redraws_one_line_with_a_bar():
  clock, stream = FakeClock(), io.StringIO()
  progress = progress_lib.Progress(4, unit="shards", desc="val", stream=stream, clock=clock,
                                   tty=True, min_interval_s=0)
  clock.now += 1
  progress.update(1)
  progress.write("a message")
  clock.now += 1
  progress.update(3)
  progress.close()
  out = stream.getvalue()
  assert out.endswith("\n") and out.count("\n") == 2  # the message, then the final line
  draws = [d for d in out.split("\r") if d.strip()]
  assert draws[0].startswith("val: [######------------------] 1/4 shards (25%)")
  assert "a message\n" in out
  assert draws[-1].startswith("val: [########################] 4/4 shards (100%), 2.00 shards/s")
