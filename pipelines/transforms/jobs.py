"""What every palmflow Beam job does: make its pipeline, run it, read counters, write JSON."""
from __future__ import annotations

import json
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions


def make_pipeline(beam_args: list[str]) -> beam.Pipeline:
  """The job's pipeline from its Beam flags.

  A batch job on DirectRunner runs on Beam's FnApiRunner, the runner that DirectRunner picks
  for batch jobs, without DirectRunner's first try of the Prism runner: Beam 2.77's
  DirectRunner starts a worker pool and tries to download the Prism binary from GitHub
  before every job, and falls back only when that fails (0.15-0.25 s a job here, where the
  download fails at once; as long as the network takes to refuse elsewhere).
  `--environment_type=EXTERNAL --environment_config=HOST:PORT` runs the job's workers in a
  worker pool that is already up (`transforms.worker_pool`), as it would on a portable
  runner (DirectRunner itself ignores these flags). Every other runner, and a streaming job,
  gets the flags as they are.
  """
  from apache_beam.options.pipeline_options import PortableOptions, StandardOptions
  options = PipelineOptions(beam_args)
  from pipelines.transforms.worker_pool import is_direct_runner, pool_environment
  standard = options.view_as(StandardOptions)
  if not is_direct_runner(standard.runner) or standard.streaming:
    return beam.Pipeline(options=options)
  portable = options.view_as(PortableOptions)
  environment = None
  if (portable.environment_type or "").upper() == "EXTERNAL":
    environment = pool_environment(portable.environment_config)
  return beam.Pipeline(runner=batch_runner(options, environment), options=options)


def batch_runner(options: PipelineOptions, environment=None):
  """Beam's FnApiRunner set up as DirectRunner sets it up for a batch job (the pipeline
  options go to the workers through the provision info), with `environment` as the
  workers' environment if given."""
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  info = fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
  return fn_runner.FnApiRunner(default_environment=environment, provision_info=info)


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
  quiet = [logging.getLogger(name) for name in _NOISY_LOGGERS]
  for logger in quiet:
    logger.addFilter(_drop_worker_startup_noise)
  try:
    result = p.run()
    if p.options.view_as(TestOptions).dry_run:
      return None
    result.wait_until_finish()
  finally:
    for logger in quiet:
      logger.removeFilter(_drop_worker_startup_noise)
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
# nothing is wrong: palmflow registers no schemas, and the runner passes its own flags on;
# and what the runner says of a worker pool job (its workers are the pool's processes, not
# threads or subprocesses of the runner, so direct_running_mode has nothing to say).
_HARMLESS_WORKER_WARNINGS = ("No semi_persistent_directory found",
                             "Discarding unparseable args",
                             "direct_running_mode should be `multi_processing`")
_NOISY_LOGGERS = ("apache_beam.runners.portability.local_job_service",
                  "apache_beam.runners.portability.fn_api_runner.fn_runner")


def _drop_worker_startup_noise(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not any(text in message for text in _HARMLESS_WORKER_WARNINGS)


def write_json(path: str, obj) -> None:
  """Writes JSON through Beam's filesystems (local or gs://) under a temporary name first."""
  with FileSystems.create(path + ".tmp") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
  FileSystems.rename([path + ".tmp"], [path])
