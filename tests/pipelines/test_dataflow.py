"""Tests of infra/dataflow.py and setup.py: the corpus and blocks jobs' Dataflow job graphs,
built offline (DataflowRunner, `--dry_run=True`), and the package workers install.

No network and no credentials are needed: inputs are local files (Beam matches them when the
graph is built), outputs and bucket paths are gs:// (only the running job would write them).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from infra import dataflow

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "gs://palmflow-test-bucket"


def settings(**overrides) -> dataflow.DataflowSettings:
  values = dict(project="palmflow-test", region="europe-west4",
                temp_location=f"{BUCKET}/tmp", setup_file=str(ROOT / "setup.py"),
                machine_type="n2-standard-4", max_num_workers=16,
                experiments=("use_runner_v2", "enable_stackdriver_agent_metrics"))
  values.update(overrides)
  return dataflow.DataflowSettings(**values)


def leaf_labels(graph: dataflow.JobGraph) -> set[str]:
  return {s.rsplit("/", 1)[-1] for s in graph.steps}


def check_common(graph: dataflow.JobGraph, job_name: str) -> None:
  assert graph.name == job_name
  assert graph.type == "JOB_TYPE_BATCH"
  o = graph.options
  assert o["runner"] == "DataflowRunner"
  assert o["project"] == "palmflow-test" and o["region"] == "europe-west4"
  assert o["temp_location"].startswith(f"{BUCKET}/tmp")
  assert o["setup_file"] == str(ROOT / "setup.py")
  assert o["machine_type"] == "n2-standard-4" and o["max_num_workers"] == 16
  assert {"use_runner_v2", "enable_stackdriver_agent_metrics"} <= set(o["experiments"])
  assert o["save_main_session"] is False
  # setup_file was really packaged: Beam staged the sdist that every worker pip-installs
  assert "workflow.tar.gz" in graph.staged_files
  assert "pickled_main_session" not in graph.staged_files
  py = f"{sys.version_info.major}.{sys.version_info.minor}"
  assert any(f"beam_python{py}_sdk" in img for img in graph.container_images), \
      graph.container_images


def test_blocks_job_graph(tmp_path):
  docs = tmp_path / "documents.jsonl-00000-of-00001"
  docs.write_text(json.dumps({"id": "s:f:1", "text": "hello"}) + "\n")
  graph = dataflow.dry_run(
      "blocks",
      [f"--documents={tmp_path}/documents*", f"--vocab={BUCKET}/vocab/spm.model",
       f"--output_dir={BUCKET}/blocks", "--block_length=2048", "--num_buckets=64",
       "--num_shards=32"],
      settings(job_name="palmflow-blocks"))
  check_common(graph, "palmflow-blocks")
  top = graph.top_level_steps
  assert top[0] == "ReadDocuments" and top[-1] == "WriteShards", top
  assert "TokenizeAndBlock" in top, top
  assert {"TokenizeAndBlockRanges", "GroupRemainders", "BlockRemainders", "GroupShard",
          "Write"} <= leaf_labels(graph)
  # in graph order: the byte ranges, tokenize and block them, pack the ranges' tails,
  # group by shard, write
  def first(suffix):
    return next(i for i, s in enumerate(graph.steps) if s == suffix or s.endswith("/" + suffix))
  assert (first("ReadDocuments") < first("TokenizeAndBlockRanges") < first("GroupRemainders")
          < first("BlockRemainders") < first("GroupShard") < first("WriteShards/Write")), \
      graph.steps
  assert json.loads(json.dumps(graph.to_json(), default=str))["name"] == "palmflow-blocks"


def test_corpus_job_graph(tmp_path):
  (tmp_path / "a.txt").write_text("To be, or not to be.\n\nThat is the question.\n")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a line of text"}) + "\n")
  sources = [{"name": "books", "format": "text", "unit": "paragraph",
              "path": str(tmp_path / "*.txt")},
             {"name": "web", "format": "jsonl", "path": str(tmp_path / "*.jsonl")}]
  graph = dataflow.dry_run(
      "corpus",
      [f"--sources={json.dumps(sources)}", f"--output_dir={BUCKET}/corpus",
       "--filters=" + json.dumps({"min_chars": 5, "max_line_length": 10000}),
       "--dedup=exact+near", "--num_shards=16"],
      settings(job_name="palmflow-corpus", requirements_file=str(ROOT / "requirements.txt")))
  check_common(graph, "palmflow-corpus")
  assert graph.options["requirements_file"] == str(ROOT / "requirements.txt")
  assert "requirements.txt" in graph.staged_files
  top = graph.top_level_steps
  for label in ("ReadFiles", "CountIn", "Normalize", "Filter", "ExactDedup", "NearDedup",
                "CountOut", "Key", "WriteShards", "Summarize", "WriteRejections"):
    assert label in top, (label, top)
  assert top.index("Filter") < top.index("ExactDedup") < top.index("NearDedup") \
      < top.index("WriteShards")


def test_settings_validation_and_flags():
  flags = settings(num_workers=2, disk_size_gb=50, use_public_ips=False,
                   labels={"team": "lm"}).args()
  assert flags[0] == "--runner=DataflowRunner"
  for f in ("--project=palmflow-test", "--region=europe-west4", "--num_workers=2",
            "--disk_size_gb=50", "--no_use_public_ips", "--labels=team=lm",
            "--no_save_main_session", "--experiments=use_runner_v2"):
    assert f in flags
  with pytest.raises(ValueError, match="temp_location must be a gs:// path"):
    settings(temp_location="/tmp/x")
  with pytest.raises(ValueError, match="job_name 'Bad_Name'"):
    settings(job_name="Bad_Name")
  with pytest.raises(ValueError, match="setup_file must name a file called setup.py"):
    settings(setup_file="pyproject.toml")
  with pytest.raises(ValueError, match=r"unknown Dataflow setting\(s\) \['regoin'\]"):
    dataflow.DataflowSettings.from_mapping({"project": "p", "regoin": "x",
                                            "temp_location": f"{BUCKET}/t"})
  with pytest.raises(KeyError, match="unknown job 'tokenize'"):
    dataflow.dry_run("tokenize", [], settings())


def _pins(path: Path) -> dict[str, str]:
  pins = {}
  for line in path.read_text().splitlines():
    m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line.strip())
    if m:
      pins[m.group(1).lower().replace("_", "-")] = m.group(3)
  return pins


def _norm(requirement: str) -> str:
  return re.sub(r"[-_.]+", "-", requirement.lower())


def test_setup_py_packages_palmflow_and_worker_requirements(tmp_path):
  """What a worker gets from `--setup_file`: Beam runs `setup.py sdist` on submission and the
  worker pip-installs that sdist (built into a wheel, as here)."""
  proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (sdist,) = tmp_path.glob("*.tar.gz")
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                         "--no-build-isolation", str(sdist), "-w", str(tmp_path / "wheel")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (wheel,) = (tmp_path / "wheel").glob("*.whl")
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  for module in ("pipelines/blocks.py", "pipelines/corpus.py", "pipelines/transforms/shards.py",
                 "pipelines/transforms/ingest.py", "tasks/__init__.py", "mixtures/__init__.py",
                 "palmflow/__init__.py", "palmflow/dag/spec.py", "infra/dataflow.py"):
    assert module in names, module
  assert not any(n.startswith(("tests/", "bench/")) for n in names)
  # the worker requirements are pinned as in requirements.txt ...
  sys.path.insert(0, str(ROOT))
  try:
    import setup as setup_module
  finally:
    sys.path.remove(str(ROOT))
  pins = _pins(ROOT / "requirements.txt")
  for req in setup_module.WORKER_REQUIREMENTS:
    name, _, version = req.partition("==")
    assert pins.get(name.lower().replace("_", "-")) == version, (req, "requirements.txt")
  # ... and the installed package requires them, so the worker installs them too. The worker
  # builds the sdist in an isolated environment with pyproject.toml's setuptools (>= 68),
  # which drops setup.py's install_requires unless `dependencies` is declared dynamic
  # (setuptools 65 here only warns, so the wheel built below would not show it).
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert "dependencies" in project.get("dynamic", []), (
      "pyproject.toml's [project] must have dynamic = [\"dependencies\"] so that setup.py's "
      "install_requires (the worker requirements) reach the Dataflow workers")
  requires = {_norm(r) for r in re.findall(r"^Requires-Dist: (\S+)", metadata, re.M)}
  missing = sorted({_norm(r) for r in setup_module.WORKER_REQUIREMENTS} - requires)
  assert not missing, (
      f"the package does not require {missing}: setuptools ignores setup.py's "
      "install_requires unless pyproject.toml's [project] has dynamic = [\"dependencies\"]")


def test_job_module_dry_run_builds_the_graph_and_writes_nothing(tmp_path):
  from pipelines import blocks
  docs = tmp_path / "documents.jsonl-00000-of-00001"
  docs.write_text(json.dumps({"id": "s:f:1", "text": "hello"}) + "\n")
  out = tmp_path / "out"
  stats = blocks.run([f"--documents={tmp_path}/documents*", f"--vocab={BUCKET}/v/spm.model",
                      f"--output_dir={out}", "--dry_run=True", "--no_auth"]
                     + settings(job_name="palmflow-blocks-dry").args())
  assert stats == {} and not (out / "stats.json").exists()
