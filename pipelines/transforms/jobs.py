"""What every palmflow Beam job does: make its pipeline, run it, read counters, write JSON."""
from __future__ import annotations

import json
import logging
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions


class JobOptions(PipelineOptions):
  """Beam's `PipelineOptions`, with each view (`view_as(cls)`) made once and reused.

  Beam asks for views a few hundred times a job (several for every transform applied and
  again when it runs), and makes each anew: a new argparse parser, the flags parsed again
  (about 60 ms of a local job here). A view shares the options' values (`_all_options`)
  whenever it is made, so a reused one reads and writes the same values as a new one would.
  A view is made again when the options' values dict is no longer its own (a copy or a
  pickle: Beam's __getstate__ gives one a new dict with impersonate_service_account).
  """

  def view_as(self, cls):
    views = self.__dict__.setdefault("_views", {})  # not an option: past __setattr__
    view = views.get(cls)
    if view is None or view._all_options is not self._all_options:
      view = views[cls] = super().view_as(cls)
    return view


# Beam's SDK worker times each bundle's steps with a sampler thread that sleeps between
# samples, 2 ms at first and longer each time up to 200 ms, and a bundle ends only once that
# thread has woken up: a bundle of a few seconds or more ends 0-200 ms late (100 ms on
# average; 2% of a 5 s local job). Local workers sample every 20 ms at most instead: the
# thread then wakes 50 times a second, without the GIL.
LOCAL_SAMPLING_PERIOD_MS = 20


def prompt_bundle_ends(period_ms: int = LOCAL_SAMPLING_PERIOD_MS) -> None:
  """Makes the bundles this process runs from now on end at most `period_ms` late (see
  LOCAL_SAMPLING_PERIOD_MS): Beam's `StateSampler`, with that sampling period by default.
  For the processes that run a local job's bundles (this one with one local worker, the
  worker pool's); Dataflow's workers keep Beam's setting."""
  from apache_beam.runners.worker import statesampler
  base = getattr(statesampler.StateSampler, "palmflow_base", statesampler.StateSampler)

  class PromptStateSampler(base):
    palmflow_base = base

    def __init__(self, prefix, counter_factory, sampling_period_ms=period_ms):
      super().__init__(prefix, counter_factory, sampling_period_ms)

  statesampler.StateSampler = PromptStateSampler


def reject_unknown_flags(job_parser, beam_args: list[str]) -> list[str]:
  """Returns `beam_args`, the flags the job's own parser left, if Beam knows them all.

  Beam drops a flag it does not know with a log line ("Discarding unparseable args"), so a
  misspelt job flag (`--block_lenght=2048`) would run the whole job with the default. Raises
  ValueError naming each flag that neither the job nor any Beam option class defines, with
  the closest names.
  """
  import difflib

  from apache_beam.options.pipeline_options import _BeamArgumentParser
  parser = _BeamArgumentParser(allow_abbrev=False)
  classes = {}
  for cls in PipelineOptions.__subclasses__():  # as Beam collects its options
    classes.setdefault(str(cls), cls)
  for cls in classes.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  _, unknown = parser.parse_known_args(beam_args)
  flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")]
  if flags:
    known = [o for p in (job_parser, parser) for a in p._actions for o in a.option_strings]
    notes = []
    for f in flags:
      close = difflib.get_close_matches(f, known, n=1)
      notes.append(f"{f} (did you mean {close[0]}?)" if close else f)
    raise ValueError(f"unknown flag(s): {', '.join(notes)}; neither this job nor Beam "
                     "defines them (see --help)")
  return beam_args


def make_pipeline(beam_args: list[str]) -> beam.Pipeline:
  """The job's pipeline from its Beam flags.

  A job on DirectRunner (named, or Beam's default) runs on Beam's FnApiRunner, set up as
  DirectRunner sets it up for a batch job, without DirectRunner's first try of the Prism
  runner: Beam 2.77's DirectRunner starts a worker pool and tries to download the Prism
  binary from GitHub before every job, and falls back only when that fails (0.15-0.25 s a
  job here, where the download fails at once; as long as the network takes to refuse
  elsewhere). palmflow's jobs are batch jobs that FnApiRunner runs whole; a streaming job
  keeps Beam's DirectRunner, which then picks its runner as it does. Bundles run in this
  process end promptly (`prompt_bundle_ends`).

  `--environment_type=EXTERNAL --environment_config=ADDRESS` runs the job's workers in a
  worker pool that is already up (`transforms.worker_pool`), as it would on a portable
  runner (Beam's DirectRunner ignores these flags); the pool's processes are the workers, so
  `--direct_running_mode` does not apply and is set aside. Every other runner gets the flags
  as they are.
  """
  from apache_beam.options.pipeline_options import (DirectOptions, PortableOptions,
                                                     StandardOptions)
  from pipelines.transforms.worker_pool import is_direct_runner, pool_environment
  options = JobOptions(beam_args)
  standard = options.view_as(StandardOptions)
  if not is_direct_runner(standard.runner) or standard.streaming:
    return beam.Pipeline(options=options)
  prompt_bundle_ends()
  environment = None
  if _on_worker_pool(options):
    environment = pool_environment(options.view_as(PortableOptions).environment_config)
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "in_memory":
      # FnApiRunner would replace the pool's environment with its own for these modes
      logging.getLogger(__name__).info(
          "--direct_running_mode=%s set aside: the job's workers are the worker pool's "
          "processes", direct.direct_running_mode)
      direct.direct_running_mode = "in_memory"
  return beam.Pipeline(runner=batch_runner(options, environment), options=options)


def _on_worker_pool(options: PipelineOptions) -> bool:
  from apache_beam.options.pipeline_options import PortableOptions
  return (options.view_as(PortableOptions).environment_type or "").upper() == "EXTERNAL"


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


class Spread(beam.PTransform):
  """Spreads a few large units of work (byte ranges, files) over the job's workers, as
  `beam.Reshuffle()` does on every runner (Dataflow, Flink, FnApiRunner's workers), at a
  third of its local cost: one GroupByKey on a key from each element (`repr`'s CRC-32; equal
  elements land together), where Reshuffle adds random keys, timestamps and a window
  reification around its shuffle (about 90 ms a local job here, against 30 ms). For batch
  jobs: in streaming, a GroupByKey in the global window without a trigger never fires.
  """

  def expand(self, pcoll):
    return (pcoll
            | "Key" >> beam.Map(_keyed).with_output_types(
                beam.typehints.Tuple[int, beam.typehints.Any])
            | "Group" >> beam.GroupByKey()
            | "Values" >> beam.FlatMapTuple(_grouped_values).with_output_types(
                beam.typehints.Any))


class CreateSpread(beam.PTransform):
  """`beam.Create(values)` with the values spread over the job's workers (`Spread`); with
  `spread=False` (one local worker: no one to spread to) without the shuffle."""

  def __init__(self, values, spread: bool = True):
    super().__init__()
    self._values, self._spread = list(values), spread

  def expand(self, pbegin):
    values = pbegin | "Create" >> beam.Create(self._values, reshuffle=False)
    return values | "Spread" >> Spread() if self._spread else values


def _keyed(element):
  return zlib.crc32(repr(element).encode()), element


def _grouped_values(_, values):
  return values


def one_local_worker(options: PipelineOptions) -> bool:
  """Whether the job runs on one local worker (DirectRunner, one worker, no worker pool)."""
  from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
  from pipelines.transforms.worker_pool import is_direct_runner
  return (is_direct_runner(options.view_as(StandardOptions).runner)
          and not _on_worker_pool(options)
          and options.view_as(DirectOptions).direct_num_workers == 1)


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
  drop = _drop_pool_job_noise if _on_worker_pool(p.options) else _drop_worker_startup_noise
  for logger in quiet:
    logger.addFilter(drop)
  try:
    result = p.run()
    if p.options.view_as(TestOptions).dry_run:
      return None
    result.wait_until_finish()
  finally:
    for logger in quiet:
      logger.removeFilter(drop)
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
# What the runner says of a worker pool job with several workers, which does not apply to
# one (its workers are the pool's processes, not threads or subprocesses of the runner); it
# stays for every other job, where it does apply.
_POOL_JOB_WARNING = "direct_running_mode should be `multi_processing`"
_NOISY_LOGGERS = ("apache_beam.runners.portability.local_job_service",
                  "apache_beam.runners.portability.fn_api_runner.fn_runner")


def _drop_worker_startup_noise(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not any(text in message for text in _HARMLESS_WORKER_WARNINGS)


def _drop_pool_job_noise(record: logging.LogRecord) -> bool:
  return _drop_worker_startup_noise(record) and _POOL_JOB_WARNING not in record.getMessage()


def write_json(path: str, obj) -> None:
  """Writes JSON through Beam's filesystems (local or gs://) under a temporary name first."""
  with FileSystems.create(path + ".tmp") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
  FileSystems.rename([path + ".tmp"], [path])
