"""The Beam progress step passes elements through, counts them and logs plain lines."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from pipelines.transforms import jobs
from pipelines.transforms.progress import Progress


def test_progress_passes_through_counts_and_logs(capfd):
  p = jobs.make_pipeline(["--runner=DirectRunner"])
  out = p | beam.Create(list(range(50))) | Progress("unit", "things", every_s=3600)
  assert_that(out, equal_to(list(range(50))))
  result = p.run()
  result.wait_until_finish()
  counters = result.metrics().query(beam.metrics.MetricsFilter().with_name("unit"))["counters"]
  assert sum(c.committed for c in counters) == 50
  # no line within the period; the worker's totals, once, when it is done
  lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("unit:")]
  assert len(lines) == 1 and lines[0].startswith("unit: 50 things (")


def test_reporter_waits_a_period_before_its_first_line(capfd):
  from pipelines.transforms.progress import Reporter
  r = Reporter("r", "docs", every_s=3600)
  r.start()
  for _ in range(5):
    r.add(1, nbytes=10)
  assert capfd.readouterr().err == ""  # not "r: 1 docs" at once
  r.close()
  assert capfd.readouterr().err.startswith("r: 5 docs (")
