"""Dataflow pipeline options for palmflow's Beam jobs, and an offline check of their job graph.

The Beam jobs (`pipelines/corpus.py`, `pipelines/blocks.py`) run unchanged on DirectRunner and
DataflowRunner: only the pipeline options differ. `DataflowSettings` holds the Dataflow ones
(project, region, bucket paths, how workers get palmflow, machine shape, experiments) and turns
them into Beam flags; none of them is part of a stage's identity. Workers get palmflow through
`--setup_file=./setup.py` (Beam builds a source distribution of the repository and every worker
pip-installs it) and, optionally, more packages through `--requirements_file`.

`dry_run` builds a job's Dataflow job graph offline, as submission would, without contacting
Google Cloud (`--dry_run=True`, `--no_auth`, `--requirements_cache=skip`): the step labels, the options the service would receive and the
files staged for the workers can be checked before anything is spent. Input files are matched
when the graph is built, so point the job's inputs at local files for an offline dry run;
output and bucket paths may be gs:// (they are only written by the running job). Beam writes a
`--dataflow_job_file` only after staging to the bucket during a real submission, so offline the
job description comes from the dry run's result (`JobGraph`).

Local check of the blocks job's graph (no network, no credentials):
    python -m infra.dataflow blocks --project=my-project --region=us-central1 \
        --temp_location=gs://my-bucket/tmp -- \
        --documents='/tmp/corpus/documents*' --vocab=gs://my-bucket/vocab/spm.model \
        --output_dir=gs://my-bucket/blocks
Submission: see infra/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

JOBS = {"corpus": "pipelines.corpus", "blocks": "pipelines.blocks"}
"""The Beam jobs palmflow submits, by short name -> module (each has parse_args and build)."""

_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class DataflowSettings:
  """Where and how a Beam job runs on Dataflow. Turned into flags by `args()`."""

  project: str
  """Google Cloud project that runs (and pays for) the job."""
  region: str
  """Dataflow regional endpoint, e.g. `us-central1`; workers run there."""
  temp_location: str
  """gs:// path for Beam's temporary files (Dataflow requires a bucket path)."""
  staging_location: str | None = None
  """gs:// path for staged files (the palmflow sdist, the pipeline); default: temp_location."""
  setup_file: str | None = "./setup.py"
  """Packaging of palmflow that every worker installs; None to rely on the worker image."""
  requirements_file: str | None = None
  """Extra PyPI packages for the workers, pinned, one a line (in addition to setup_file)."""
  job_name: str | None = None
  """Lower-case letters, digits and '-', starting with a letter; default: Beam makes one."""
  machine_type: str | None = None
  """Worker machine type, e.g. `n2-standard-4` (tokenizing is CPU bound: 1 core per SDK
  process)."""
  num_workers: int | None = None
  """Workers at the start."""
  max_num_workers: int | None = None
  """Autoscaling cap. The blocks job's Block step has at most `--num_buckets` parallel units."""
  disk_size_gb: int | None = None
  """Boot disk per worker."""
  experiments: tuple[str, ...] = ()
  """Dataflow experiments (`--experiments=...`), e.g. `use_runner_v2` (already the default)."""
  service_account_email: str | None = None
  """Worker service account (it needs read/write access to the buckets)."""
  subnetwork: str | None = None
  """Worker subnetwork, e.g. `regions/us-central1/subnetworks/default`."""
  use_public_ips: bool = True
  """False: workers get private IPs only (they then need Private Google Access, and can't
  reach PyPI: bake the dependencies into `sdk_container_image` instead)."""
  sdk_container_image: str | None = None
  """A custom worker image with palmflow's dependencies preinstalled (faster start-up)."""
  labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
  """Job labels (key=value) for billing and search."""

  def __post_init__(self):
    problems = []
    for name in ("project", "region", "temp_location"):
      if not getattr(self, name):
        problems.append(f"{name} is required")
    for name in ("temp_location", "staging_location"):
      value = getattr(self, name)
      if value and not value.startswith("gs://"):
        problems.append(f"{name} must be a gs:// path, not {value!r}")
    if self.setup_file is not None and os.path.basename(self.setup_file) != "setup.py":
      problems.append(f"setup_file must name a file called setup.py, not {self.setup_file!r}")
    if self.job_name is not None and not _JOB_NAME.match(self.job_name):
      problems.append(f"job_name {self.job_name!r} must be 1-63 lower-case letters, digits "
                      "or '-', starting with a letter and not ending with '-'")
    for name in ("num_workers", "max_num_workers", "disk_size_gb"):
      value = getattr(self, name)
      if value is not None and value < 1:
        problems.append(f"{name} must be >= 1, not {value}")
    if (self.num_workers and self.max_num_workers
        and self.num_workers > self.max_num_workers):
      problems.append("num_workers must not exceed max_num_workers")
    if problems:
      raise ValueError("invalid Dataflow settings: " + "; ".join(problems))

  def args(self) -> list[str]:
    """The Beam flags for these settings, DataflowRunner named explicitly.

    `--no_save_main_session`: the jobs' functions live in installed modules, never in
    `__main__`, so nothing of the submitting process is pickled for the workers.
    """
    out = ["--runner=DataflowRunner", f"--project={self.project}",
           f"--region={self.region}", f"--temp_location={self.temp_location}",
           "--no_save_main_session"]
    optional = {
        "staging_location": self.staging_location, "setup_file": self.setup_file,
        "requirements_file": self.requirements_file, "job_name": self.job_name,
        "machine_type": self.machine_type, "num_workers": self.num_workers,
        "max_num_workers": self.max_num_workers, "disk_size_gb": self.disk_size_gb,
        "service_account_email": self.service_account_email,
        "subnetwork": self.subnetwork, "sdk_container_image": self.sdk_container_image,
    }
    out += [f"--{k}={v}" for k, v in optional.items() if v is not None]
    if not self.use_public_ips:
      out.append("--no_use_public_ips")
    out += [f"--experiments={e}" for e in self.experiments]
    out += [f"--labels={k}={v}" for k, v in sorted(self.labels.items())]
    return out

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "DataflowSettings":
    """From a mapping (e.g. a pipeline file's placement); unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown Dataflow setting(s) {unknown}; known: {sorted(fields)}")
    values = dict(values)
    if "experiments" in values:
      values["experiments"] = tuple(values["experiments"])
    return cls(**values)


@dataclasses.dataclass
class JobGraph:
  """What a dry run of a job on DataflowRunner built (nothing was submitted)."""

  name: str
  """The job's name."""
  type: str
  """`JOB_TYPE_BATCH` or `JOB_TYPE_STREAMING`."""
  steps: list[str]
  """Full labels of every transform, e.g. `TokenizeAndBlock/TokenizeAndBlockRanges` (the
  top-level ones have no "/")."""
  options: dict
  """The pipeline options the service would receive (defaults left out)."""
  staged_files: list[str]
  """Files staged for the workers, e.g. `workflow.tar.gz` (the sdist of setup_file)."""
  container_images: list[str]
  """The worker images of the job's environments."""
  job: Any = dataclasses.field(repr=False, default=None)
  """Beam's `apiclient.Job` (its `.proto_pipeline` is the portable pipeline)."""

  @property
  def top_level_steps(self) -> list[str]:
    """The labels of the steps `build()` applies directly, in graph order."""
    return [s for s in self.steps if "/" not in s]

  def to_json(self) -> dict:
    """A JSON-ready description (without the Beam objects)."""
    return {"name": self.name, "type": self.type, "steps": self.steps,
            "options": self.options, "staged_files": self.staged_files,
            "container_images": self.container_images}


def dry_run(job: str, job_argv: Sequence[str], settings: DataflowSettings,
            extra_beam_args: Sequence[str] = ()) -> JobGraph:
  """Builds `job`'s Dataflow job graph offline and describes it.

  Args:
    job: a key of `JOBS` ("corpus", "blocks").
    job_argv: the job's own flags (e.g. `--documents=...`); inputs must be readable here.
    settings: the Dataflow settings; the setup_file is really packaged (as on submission).
    extra_beam_args: more Beam flags, e.g. `--experiments=...`.
  Returns:
    The graph's description.
  Raises:
    KeyError: unknown job. ValueError (from the job's argument parser): bad job flags.
  """
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.runners.dataflow.internal import apiclient  # noqa: F401 (needs [gcp])
  if job not in JOBS:
    raise KeyError(f"unknown job {job!r}; known: {sorted(JOBS)}")
  module = importlib.import_module(JOBS[job])
  args, beam_args = module.parse_args(list(job_argv))
  # --no_auth: a dry run needs no credentials (without it Beam retries the lookup ~30 s);
  # --requirements_cache=skip: nor does it download the requirements_file's packages (on
  # submission Beam downloads them to stage them; skipped, workers install them from PyPI).
  flags = settings.args() + list(beam_args) + list(extra_beam_args) + [
      "--dry_run=True", "--no_auth", "--requirements_cache=skip"]
  p = beam.Pipeline(options=PipelineOptions(flags))
  module.build(p, args)
  result = p.run()
  dj = result.job
  proto = dj.proto_pipeline
  by_id = proto.components.transforms
  steps: list[str] = []

  def walk(tid):
    t = by_id[tid]
    if t.unique_name and not t.unique_name.startswith("ref_"):
      steps.append(t.unique_name)
    for sub in t.subtransforms:
      walk(sub)

  for root in proto.root_transform_ids:
    walk(root)
  staged, images = [], []
  from apache_beam.portability.api import beam_runner_api_pb2
  for env in proto.components.environments.values():
    if env.payload:
      images.append(beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image)
    for dep in env.dependencies:
      if dep.role_urn == "beam:artifact:role:staging_to:v1":
        staged.append(beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(
            dep.role_payload).staged_name)
  return JobGraph(name=dj.proto.name, type=dj.proto.type_.name, steps=steps,
                  options=dj.options.get_all_options(drop_default=True),
                  staged_files=sorted(staged), container_images=sorted(set(images)), job=dj)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m infra.dataflow JOB [settings] -- [job flags]`: prints the dry run's graph."""
  argv = list(sys.argv[1:] if argv is None else argv)
  job_argv: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, job_argv = argv[:i], argv[i + 1:]
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("job", choices=sorted(JOBS))
  parser.add_argument("--project", required=True)
  parser.add_argument("--region", required=True)
  parser.add_argument("--temp_location", required=True)
  parser.add_argument("--setup_file", default="./setup.py")
  parser.add_argument("--requirements_file")
  parser.add_argument("--machine_type")
  parser.add_argument("--max_num_workers", type=int)
  parser.add_argument("--job_name")
  parser.add_argument("--experiments", action="append", default=[])
  ns = parser.parse_args(argv)
  settings = DataflowSettings(
      project=ns.project, region=ns.region, temp_location=ns.temp_location,
      setup_file=ns.setup_file, requirements_file=ns.requirements_file,
      machine_type=ns.machine_type, max_num_workers=ns.max_num_workers,
      job_name=ns.job_name, experiments=tuple(ns.experiments))
  graph = dry_run(ns.job, job_argv, settings)
  print(json.dumps(graph.to_json(), indent=2, sort_keys=True, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
