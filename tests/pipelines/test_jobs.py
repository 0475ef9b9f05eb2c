"""pipelines/transforms/jobs.py: which runner a job's flags give it."""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipelines.transforms import jobs


def test_direct_runner_batch_jobs_skip_the_prism_attempt(caplog):
  for name in ("DirectRunner", "direct", "apache_beam.runners.direct.DirectRunner"):
    p = jobs.make_pipeline([f"--runner={name}"])
    assert isinstance(p.runner, FnApiRunner), name
  with caplog.at_level(logging.INFO):
    p = jobs.make_pipeline(["--runner=DirectRunner", "--direct_num_workers=1"])
    _ = (p | beam.Create([1, 2, 3]) | beam.Map(
        lambda x: beam.metrics.Metrics.counter("t", "n").inc(x)))
    assert jobs.run_and_count(p, "t") == {"n": 6}
  # Beam's DirectRunner would have tried to fetch the Prism binary first
  assert not [r for r in caplog.records if "prism" in r.getMessage().lower()]


def test_other_runners_and_streaming_keep_their_runner(monkeypatch):
  streaming = jobs.make_pipeline(["--runner=DirectRunner", "--streaming"])
  assert not isinstance(streaming.runner, FnApiRunner)
  made = []
  monkeypatch.setattr(jobs.beam, "Pipeline", lambda **kw: made.append(kw))
  jobs.make_pipeline(["--runner=DataflowRunner", "--environment_type=EXTERNAL",
                      "--environment_config=localhost:1"])
  assert list(made[0]) == ["options"]  # no runner object: Beam makes the one named


def test_spread_keeps_every_element_and_one_local_worker_skips_it():
  def collect(flags, values, spread):
    p = jobs.make_pipeline(["--runner=DirectRunner", *flags])
    _ = (p | jobs.CreateSpread(values, spread=spread)
         | beam.Map(lambda x: beam.metrics.Metrics.counter("t", repr(x)).inc()))
    return jobs.run_and_count(p, "t")
  values = [("a", 0, 10), ("a", 10, 20), ("b", 0, 5), ("a", 0, 10)]  # one twice
  want = {repr(("a", 0, 10)): 2, repr(("a", 10, 20)): 1, repr(("b", 0, 5)): 1}
  assert collect([], values, spread=True) == want
  assert collect([], values, spread=False) == want
  p = jobs.make_pipeline(["--runner=DirectRunner"])
  _ = p | "Spread" >> jobs.CreateSpread(values) | beam.Map(str)
  assert any(t.full_label == "Spread/Spread/Group" for t in _transforms(p))
  # one local worker: nothing to spread to; several workers, a pool or another runner: spread
  assert jobs.one_local_worker(jobs.PipelineOptions(["--runner=DirectRunner"]))
  assert jobs.one_local_worker(jobs.PipelineOptions([]))
  for flags in (["--direct_num_workers=2"], ["--runner=DataflowRunner"],
                ["--environment_type=EXTERNAL", "--environment_config=unix:/x"]):
    assert not jobs.one_local_worker(jobs.PipelineOptions(flags)), flags


def _transforms(p):
  out = []
  def walk(node):
    out.append(node)
    for part in node.parts:
      walk(part)
  walk(p._root_transform())
  return out


def test_job_options_reuse_views_that_share_the_values():
  import copy
  import pickle
  from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
  options = jobs.JobOptions(["--runner=DirectRunner", "--direct_num_workers=2"])
  view = options.view_as(DirectOptions)
  assert options.view_as(DirectOptions) is view  # made once
  view.direct_num_workers = 3                     # a write through a view is the options'
  assert options.get_all_options()["direct_num_workers"] == 3
  assert options.view_as(StandardOptions).runner == "DirectRunner"
  # copies and pickles keep their own values, as PipelineOptions do
  clone = copy.deepcopy(options)
  clone.view_as(DirectOptions).direct_num_workers = 5
  assert options.view_as(DirectOptions).direct_num_workers == 3
  assert pickle.loads(pickle.dumps(options)).view_as(DirectOptions).direct_num_workers == 3
  assert isinstance(jobs.make_pipeline(["--runner=DirectRunner"]).options, jobs.JobOptions)
  # Beam gives a copy its own values dict when impersonating a service account: a write
  # through a view of the copy still reaches the copy's options (beam.Pipeline deep-copies
  # its options, then sets the runner through a view)
  options = jobs.JobOptions(["--runner=DataflowRunner", "--impersonate_service_account=sa@x",
                             "--project=p"])
  options.view_as(StandardOptions)
  for clone in (copy.deepcopy(options), pickle.loads(pickle.dumps(options))):
    clone.view_as(StandardOptions).runner = "DirectRunner"
    assert clone.get_all_options()["runner"] == "DirectRunner"
  assert options.get_all_options()["runner"] == "DataflowRunner"


def _sampling_period(x):
  """Counts `x` under the sampling period (ms) of the bundle running it."""
  from apache_beam.runners.worker import statesampler
  period = statesampler.get_current_tracker().sampling_period_ms
  beam.metrics.Metrics.counter("period", str(period)).inc()
  return x


def sampling_periods(*flags: str) -> dict[str, int]:
  """{sampling period in ms: elements} of a local job's bundles."""
  p = jobs.make_pipeline(["--runner=DirectRunner", *flags])
  _ = p | beam.Create(list(range(6))) | beam.Map(_sampling_period)
  return jobs.run_and_count(p, "period")


def test_local_bundles_end_promptly():
  # Beam's bundles end only when their state sampler thread wakes, every 200 ms in a long
  # bundle; local jobs' bundles sample, and so end, at most 20 ms late
  assert sampling_periods() == {str(jobs.LOCAL_SAMPLING_PERIOD_MS): 6}
  assert jobs.LOCAL_SAMPLING_PERIOD_MS <= 20
  from apache_beam.runners.worker import statesampler
  from apache_beam.utils.counters import CounterFactory
  jobs.prompt_bundle_ends(5)  # made again: a subclass of Beam's class, not of the last one
  try:
    assert statesampler.StateSampler("s", CounterFactory()).sampling_period_ms == 5
    assert statesampler.StateSampler.palmflow_base.__module__.endswith("statesampler")
  finally:
    jobs.prompt_bundle_ends()
