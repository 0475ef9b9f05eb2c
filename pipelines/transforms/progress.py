"""Progress of a Beam job while it runs: counts reported as they grow.

`Reporter` is what a DoFn uses to report work done inside it (documents tokenized, bytes
read); `Progress` is a pass-through step that reports the elements going by. In a terminal
the report redraws one line (`\\r`); otherwise it is a plain log line every `every_s` seconds
and a last one with the worker's totals when it is done. On Dataflow the lines land in the
worker logs, and the counters (`palmflow.progress/<label>`) show in the Dataflow console
while the job runs.
"""
from __future__ import annotations

import sys
import time

import apache_beam as beam


class Reporter:
  """Counts `unit`s (and optionally bytes) in one worker and reports them as they grow.

  Create it in the DoFn's `__init__` (the counter must be declared where the job is built)
  and call `start()` in `setup()`.
  """

  def __init__(self, label: str, unit: str, every_s: float = 10.0):
    self._label, self._unit, self._every = label, unit, every_s
    self._counter = beam.metrics.Metrics.counter("palmflow.progress", label)

  def start(self) -> None:
    self._n = self._bytes = 0
    self._start = self._last = time.time()  # the first line after a period, not at once
    self._tty = sys.stderr.isatty()

  def _text(self, now: float) -> str:
    dt = max(now - self._start, 1e-9)
    text = f"{self._label}: {self._n:,} {self._unit} ({self._n / dt:,.0f}/s"
    if self._bytes:
      text += f", {self._bytes / 1e6:,.1f} MB at {self._bytes / 1e6 / dt:,.2f} MB/s"
    return text + ")"

  def add(self, n: int = 1, nbytes: int = 0) -> None:
    self._n += n
    self._bytes += nbytes
    self._counter.inc(n)
    now = time.time()
    if now - self._last >= (0.5 if self._tty else self._every):
      self._last = now
      print(("\r" + self._text(now)) if self._tty else self._text(now),
            end="" if self._tty else "\n", file=sys.stderr, flush=True)

  def close(self) -> None:
    """Reports the totals, ending a redrawn terminal line (call from `teardown()`)."""
    if getattr(self, "_n", 0):
      print(("\r" if self._tty else "") + self._text(time.time()), file=sys.stderr,
            flush=True)
      self._n = 0


class _Report(beam.DoFn):
  def __init__(self, label: str, unit: str, every_s: float):
    self._reporter = Reporter(label, unit, every_s)

  def setup(self):
    self._reporter.start()

  def process(self, element):
    self._reporter.add()
    yield element

  def teardown(self):
    self._reporter.close()


class Progress(beam.PTransform):
  """Passes elements through, reporting how many went by (per worker)."""

  def __init__(self, label: str, unit: str = "elements", every_s: float = 10.0):
    super().__init__()
    self._label, self._unit, self._every = label, unit, every_s

  def expand(self, pcoll):
    return pcoll | beam.ParDo(_Report(self._label, self._unit, self._every))
