"""What every palmflow Beam job does after building its graph: run, read counters, write JSON."""
from __future__ import annotations

import json
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems


def run_and_count(p: beam.Pipeline, namespace: str | None = None) -> dict[str, int] | None:
  """Runs `p` to completion; returns its counters (summed over steps) by name.

  Args:
    p: the built pipeline.
    namespace: only counters of this namespace (names are then bare); None: all, as
      "namespace/name".
  Returns:
    The counters, or None for a `--dry_run` (the job graph was built, nothing ran).
  """
  from apache_beam.options.pipeline_options import TestOptions
  quiet = logging.getLogger("apache_beam.runners.portability.local_job_service")
  quiet.addFilter(_drop_worker_startup_noise)
  try:
    result = p.run()
    if p.options.view_as(TestOptions).dry_run:
      return None
    result.wait_until_finish()
  finally:
    quiet.removeFilter(_drop_worker_startup_noise)
  flt = beam.metrics.MetricsFilter()
  if namespace:
    flt = flt.with_namespace(namespace)
  out: dict[str, int] = {}
  for m in result.metrics().query(flt)["counters"]:
    value = m.committed if m.committed is not None else m.attempted
    key = m.key.metric.name if namespace else f"{m.key.metric.namespace}/{m.key.metric.name}"
    # the same counter can come from several steps: sum them
    out[key] = out.get(key, 0) + (value or 0)
  return out


# What each DirectRunner multi_processing worker logs as a warning when it starts, though
# nothing is wrong: palmflow registers no schemas, and the runner passes its own flags on.
_HARMLESS_WORKER_WARNINGS = ("No semi_persistent_directory found",
                             "Discarding unparseable args")


def _drop_worker_startup_noise(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not any(text in message for text in _HARMLESS_WORKER_WARNINGS)


def write_json(path: str, obj) -> None:
  """Writes JSON through Beam's filesystems (local or gs://) under a temporary name first."""
  with FileSystems.create(path + ".tmp") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
  FileSystems.rename([path + ".tmp"], [path])
