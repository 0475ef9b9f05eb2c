"""Progress of a Beam job while it runs: a pass-through step that reports element counts.

In a terminal it redraws one line (`\\r`); otherwise it writes a plain log line at most every
`every_s` seconds. On Dataflow the lines land in the worker logs, and the job's counters
(`palmflow.progress/<label>`) show in the Dataflow console while the job runs.
"""
from __future__ import annotations

import sys
import time

import apache_beam as beam


class _Report(beam.DoFn):
  def __init__(self, label: str, unit: str, every_s: float):
    self._label, self._unit, self._every = label, unit, every_s
    self._counter = beam.metrics.Metrics.counter("palmflow.progress", label)

  def setup(self):
    self._n, self._start, self._last = 0, time.time(), 0.0
    self._tty = sys.stderr.isatty()

  def process(self, element):
    self._n += 1
    self._counter.inc()
    now = time.time()
    if now - self._last >= (0.5 if self._tty else self._every):
      self._last = now
      rate = self._n / max(now - self._start, 1e-9)
      text = f"{self._label}: {self._n} {self._unit} ({rate:,.0f}/s)"
      print(("\r" + text) if self._tty else text, end="" if self._tty else "\n",
            file=sys.stderr, flush=True)
    yield element

  def teardown(self):
    if getattr(self, "_tty", False) and self._n:
      print(f"\r{self._label}: {self._n} {self._unit}", file=sys.stderr, flush=True)


class Progress(beam.PTransform):
  """Passes elements through, reporting how many went by (per worker)."""

  def __init__(self, label: str, unit: str = "elements", every_s: float = 10.0):
    super().__init__()
    self._label, self._unit, self._every = label, unit, every_s

  def expand(self, pcoll):
    return pcoll | beam.ParDo(_Report(self._label, self._unit, self._every))
