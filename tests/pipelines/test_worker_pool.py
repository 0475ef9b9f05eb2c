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


def _pids_of_workers(pool, n: int, *flags: str, spread=None) -> dict[int, int]:
  """Runs a job of `n` elements on the pool, spread by `spread` (Beam's Reshuffle by
  default); returns {pid: elements} of the processes that handled them (from the job's
  counters)."""
  def count_pid(x):
    import os as os_
    beam.metrics.Metrics.counter("pids", str(os_.getpid())).inc()
    return x
  p = jobs.make_pipeline(["--runner=DirectRunner", "--direct_num_workers=2",
                          *pool.beam_args(), *flags])
  _ = (p | beam.Create(list(range(n))) | (spread or beam.Reshuffle()) | beam.Map(count_pid))
  return {int(k): v for k, v in jobs.run_and_count(p, "pids").items()}


def test_jobs_run_in_both_of_the_pools_processes(pool):
  pids = _pids_of_workers(pool, 40)
  assert sum(pids.values()) == 40
  # two workers, neither of them this process: the pool's two processes
  assert len(pids) == 2 and os.getpid() not in pids
  assert set(pids) == {proc.pid for proc in pool._procs}
  # the same processes serve the next job (warm: nothing is started again)
  assert set(_pids_of_workers(pool, 10)) <= set(pids)
  # palmflow's cheaper Spread (one GroupByKey) gives both processes work, as Reshuffle does
  spread = _pids_of_workers(pool, 40, spread=jobs.Spread())
  assert sum(spread.values()) == 40 and set(spread) == set(pids)


def test_pool_bundles_end_promptly(pool):
  from test_jobs import sampling_periods
  periods = sampling_periods("--direct_num_workers=2", *pool.beam_args())
  assert periods == {str(jobs.LOCAL_SAMPLING_PERIOD_MS): 6}


def _tcp_listening_inodes() -> set[str]:
  """The socket inodes of every TCP socket in the LISTEN state (from /proc/net)."""
  inodes = set()
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in Path(table).read_text().splitlines()[1:]:
      fields = line.split()
      if fields[3] == "0A":  # LISTEN
        inodes.add(fields[9])
  return inodes


def test_pool_is_reachable_only_by_this_user(pool):
  """A pool worker runs the code a runner sends it: it listens on Unix sockets in a
  directory only this user can open, and on no TCP port."""
  for address in [pool.address, *pool._addresses]:
    assert address.startswith("unix:"), address
    path = Path(address[len("unix:"):])
    assert path.is_socket()
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.parent.stat().st_uid == os.getuid()
  listening = _tcp_listening_inodes()
  for proc in pool._procs:
    fds = Path(f"/proc/{proc.pid}/fd")
    sockets = {os.readlink(fd)[len("socket:["):-1] for fd in fds.iterdir()
               if os.readlink(fd).startswith("socket:[")}
    assert sockets and not sockets & listening, proc.pid


def test_pool_jobs_do_not_need_the_host_name(pool, monkeypatch):
  """Workers reach a local runner at localhost, whether or not the machine's name resolves
  (Beam's own handler gives them socket.getfqdn())."""
  import socket
  monkeypatch.setattr(socket, "getfqdn", lambda *a: "palmflow-no-such-host.invalid")
  assert sum(_pids_of_workers(pool, 8).values()) == 8


def test_a_running_mode_does_not_take_the_job_off_the_pool(pool):
  pids = _pids_of_workers(pool, 12, "--direct_running_mode=multi_processing")
  assert set(pids) <= {proc.pid for proc in pool._procs} and sum(pids.values()) == 12


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


def test_close_stops_the_processes_and_a_pool_starts_again():
  pool = LocalWorkerPool(1).start()
  procs, folder = list(pool._procs), Path(pool.address[len("unix:"):]).parent
  pool.close()
  assert all(proc.poll() is not None for proc in procs)
  assert not folder.exists()
  pool.start()  # the same object, fresh processes
  assert len(pool._procs) == len(pool._addresses) == 1 and pool._procs[0] not in procs
  pool.close()
  with pytest.raises(WorkerPoolError, match="not started"):
    pool.beam_args()


def test_external_environment_needs_an_address():
  with pytest.raises(WorkerPoolError, match="--environment_config=HOST:PORT"):
    jobs.make_pipeline(["--runner=DirectRunner", "--environment_type=EXTERNAL"])


def test_placement_decides_whether_a_run_uses_a_pool(monkeypatch):
  monkeypatch.setattr(common, "_POOL", None)  # and back, whatever happens here
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
                    {"beam": {"runner": "FlinkRunner", "options": mp}},
                    {"beam": {"options": mp, "worker_pool": False}}, {}):
    args = common.beam_args(placement, job_name="p-s")
    assert not [a for a in args if "EXTERNAL" in a], placement
    assert "pool" not in common.beam_summary(placement)
  assert started == [2, "closed"]
  # Dataflow's workers cannot write the local store: refused, saying what to do instead
  # (the job wrote its outputs on the workers' disks and the stage then found none).
  from palmflow.errors import ConfigError
  with pytest.raises(ConfigError, match=r"field 'placement.beam.runner'.*local folder"
                     r"(.|\n)*hint: run the Beam jobs on Dataflow by hand"):
    common.beam_args({"beam": {"runner": "DataflowRunner", "options": mp}}, job_name="p-d")


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
