"""The Beam progress step passes elements through, counts them and logs plain lines."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipelines.transforms.progress import Progress


def test_progress_passes_through_counts_and_logs(capfd):
  p = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"]))
  out = p | beam.Create(list(range(50))) | Progress("unit", "things", every_s=0.0)
  assert_that(out, equal_to(list(range(50))))
  result = p.run()
  result.wait_until_finish()
  counters = result.metrics().query(beam.metrics.MetricsFilter().with_name("unit"))["counters"]
  assert sum(c.committed for c in counters) == 50
  err = capfd.readouterr().err
  assert "unit: 1 things" in err and "things (" in err
