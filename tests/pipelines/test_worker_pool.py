"""The warm worker pool that local Beam jobs share (pipelines/transforms/worker_pool.py), and
how a palmflow run uses it (placement.beam, palmflow/stages/common.py)."""
from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path

import apache_beam as beam
import pytest

from palmflow.dag import executor, spec
from palmflow.dag.store import Store
from palmflow.stages import common
from pipelines import blocks
from pipelines.transforms import jobs
from pipelines.transforms.worker_pool import LocalWorkerPool, WorkerPoolError
from test_blocks import run_job, shard_bytes, synthetic_docs, vocab, write_docs

__all__ = ["vocab"]  # the module-scoped fixture, shared with test_blocks


@pytest.fixture(scope="module")
def pool():
  with LocalWorkerPool(2) as p:
    yield p


def _pids_of_workers(pool, n: int) -> dict[int, int]:
  """Runs a job of `n` elements on the pool; returns {pid: elements} of the processes that
  handled them (from the job's counters)."""
  def count_pid(x):
    import os as os_
    beam.metrics.Metrics.counter("pids", str(os_.getpid())).inc()
    return x
  p = jobs.make_pipeline(["--runner=DirectRunner", "--direct_num_workers=2",
                          *pool.beam_args()])
  _ = (p | beam.Create(list(range(n))) | beam.Reshuffle() | beam.Map(count_pid))
  return {int(k): v for k, v in jobs.run_and_count(p, "pids").items()}


def test_jobs_run_in_both_of_the_pools_processes(pool):
  pids = _pids_of_workers(pool, 40)
  assert sum(pids.values()) == 40
  # two workers, neither of them this process: the pool's two processes
  assert len(pids) == 2 and os.getpid() not in pids
  assert set(pids) == {proc.pid for proc in pool._procs}
  # the same processes serve the next job (warm: nothing is started again)
  assert set(_pids_of_workers(pool, 10)) <= set(pids)


def _listening_hosts(port: int) -> set[str]:
  """The local addresses (hex, as /proc/net shows them) listening on `port`."""
  hosts = set()
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in Path(table).read_text().splitlines()[1:]:
      local, state = line.split()[1], line.split()[3]
      host, _, hexport = local.partition(":")
      if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
        hosts.add(host)
  return hosts


def test_pool_listens_on_loopback_only(pool):
  """A pool worker runs the code a runner sends it: it must not be reachable from outside."""
  # 127.0.0.1, ::1 and ::ffff:127.0.0.1 (not 0.0.0.0 or ::, every interface)
  loopback = {"0100007F", "00000000000000000000000001000000",
              "0000000000000000FFFF00000100007F"}
  for address in [pool.address, *pool._addresses]:
    hosts = _listening_hosts(int(address.rsplit(":", 1)[1]))
    assert hosts and hosts <= loopback, (address, hosts)


def test_blocks_job_on_the_pool_gives_the_same_bytes(tmp_path, vocab, pool, caplog):
  path = write_docs(tmp_path / "docs.jsonl", synthetic_docs(300, seed=9))
  one = run_job(path, vocab, tmp_path / "one", num_buckets=5)
  with caplog.at_level(logging.WARNING):
    two = blocks.run([f"--documents={path}", f"--vocab={vocab}",
                      f"--output_dir={tmp_path / 'two'}", "--block_length=32",
                      "--num_shards=3", "--num_buckets=5", "--runner=DirectRunner",
                      "--direct_num_workers=2", *pool.beam_args()])
  assert shard_bytes(one["shard_pattern"]) == shard_bytes(two["shard_pattern"])
  assert {k: v for k, v in one.items() if k != "shard_pattern"} == \
      {k: v for k, v in two.items() if k != "shard_pattern"}
  assert not (tmp_path / "two" / "runs.tmp").exists()
  # the runner's advice to pick a running mode does not apply to a pool and is not shown
  assert not [r for r in caplog.records if "direct_running_mode" in r.getMessage()]


def test_job_error_on_the_pool_names_file_and_offset(tmp_path, vocab, pool):
  path = tmp_path / "docs.jsonl"
  good = json.dumps({"id": "s:f:1", "text": "the cat"}) + "\n"
  path.write_text(good + "not json\n")
  with pytest.raises(Exception, match=rf"docs.jsonl: the line at byte {len(good)} is not a "
                                      "JSON document"):
    blocks.run([f"--documents={path}", f"--vocab={vocab}", f"--output_dir={tmp_path / 'o'}",
                "--runner=DirectRunner", "--direct_num_workers=2", *pool.beam_args()])
  # the pool survives a failed job
  assert sum(_pids_of_workers(pool, 6).values()) == 6


def test_pool_that_cannot_start_says_so_and_leaves_nothing_running():
  bad = LocalWorkerPool(1, preload=("palmflow_no_such_module",), start_timeout_s=60)
  with pytest.raises(WorkerPoolError, match=r"exited with status 1 before .*worker_pool: false"):
    bad.start()
  assert bad.address is None and not bad._procs


def test_close_stops_the_processes():
  pool = LocalWorkerPool(1).start()
  procs = list(pool._procs)
  pool.close()
  assert all(proc.poll() is not None for proc in procs)
  with pytest.raises(WorkerPoolError, match="not started"):
    pool.beam_args()


def test_external_environment_needs_an_address():
  with pytest.raises(WorkerPoolError, match="--environment_config=HOST:PORT"):
    jobs.make_pipeline(["--runner=DirectRunner", "--environment_type=EXTERNAL"])


def test_placement_decides_whether_a_run_uses_a_pool(monkeypatch):
  started = []

  class FakePool:
    def __init__(self, n):
      self.num_workers = n
      started.append(n)

    def start(self):
      return self

    def beam_args(self):
      return ["--environment_type=EXTERNAL", "--environment_config=localhost:1"]

    def close(self):
      started.append("closed")

  monkeypatch.setattr("pipelines.transforms.worker_pool.LocalWorkerPool", FakePool)
  mp = {"direct_running_mode": "multi_processing", "direct_num_workers": 2}
  args = common.beam_args({"beam": {"runner": "direct", "options": mp}}, job_name="p-s")
  assert "--environment_config=localhost:1" in args and "--direct_num_workers=2" in args
  assert not [a for a in args if a.startswith("--direct_running_mode")]
  common.beam_args({"beam": {"options": mp}}, job_name="p-t")
  assert started == [2]  # one pool for the run's jobs
  assert common.beam_summary({"beam": {"options": mp}}) == (
      "DirectRunner, 2 workers in the run's worker pool")
  common.close_worker_pool()
  assert started == [2, "closed"]
  # no pool: one worker, other running modes, other runners, or switched off
  for placement in ({"beam": {"options": {**mp, "direct_num_workers": 1}}},
                    {"beam": {"options": {"direct_num_workers": 2}}},
                    {"beam": {"options": {**mp, "direct_running_mode": "multi_threading"}}},
                    {"beam": {"runner": "DataflowRunner", "options": mp}},
                    {"beam": {"options": mp, "worker_pool": False}}, {}):
    args = common.beam_args(placement, job_name="p-s")
    assert not [a for a in args if "EXTERNAL" in a], placement
    assert "pool" not in common.beam_summary(placement)
  assert started == [2, "closed"]


def test_pipeline_run_uses_one_pool_and_stops_it(tmp_path, caplog):
  """A corpus stage with 2 multi_processing workers runs on the run's pool, writes what one
  worker writes, and the pool is gone when the run ends."""
  text = tmp_path / "t.txt"
  text.write_text("\n".join(f"line {i} of a small corpus, long enough to keep"
                            for i in range(400)) + "\n")

  def pipeline(name: str, options: str) -> spec.Pipeline:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        pipeline: {name}
        placement: {{beam: {{runner: DirectRunner, options: {options}}}}}
        stages:
          corpus:
            kind: corpus
            settings:
              sources: [{{name: t, format: text, path: {text}, unit: line}}]
              num_shards: 2
        """))
    return spec.load(path)

  outputs = []
  for name, options in (("one", "{direct_num_workers: 1}"),
                        ("two", "{direct_num_workers: 2, "
                                "direct_running_mode: multi_processing}")):
    store = Store(tmp_path / f"store-{name}")
    with caplog.at_level(logging.INFO, logger="pipelines.transforms.worker_pool"):
      planned, ran = executor.run(pipeline(name, options), store, log=lambda m: None)
    assert ran == ["corpus"]
    d = store.stage_dir("corpus", planned[0].fingerprint)
    outputs.append({f.name: f.read_bytes() for f in sorted(d.glob("documents.jsonl-*"))})
  started = [r for r in caplog.records if r.getMessage().startswith("worker pool: 2")]
  assert len(started) == 1  # only the two-worker run started a pool
  assert common._POOL is None  # and stopped it
  assert outputs[0] == outputs[1] and len(outputs[0]) == 2
