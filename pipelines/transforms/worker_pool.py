"""Warm SDK worker processes that local Beam jobs share (Beam's EXTERNAL environment).

`--direct_running_mode=multi_processing` starts fresh worker processes for every job, and each
imports Beam before it does any work: 1.2-1.5 s of CPU apiece on the machines seen here, and a
job waited 2.2 s for its first element to be processed and 0.6 s at the end for the workers
to stop. A `palmflow run` runs several Beam jobs (corpus, vocabulary sample, blocks), so it
starts a `LocalWorkerPool` once and every job's workers run in its processes, already past
their imports, as Flink and Spark runners do with Beam's worker pool.

Each pool process hosts one SDK harness per job in a thread (Beam's
`BeamFnExternalWorkerPoolServicer` in thread mode), so `num_workers` processes give
`num_workers` workers that run in parallel, each with its own interpreter. A small
dispatcher in this process gives the jobs' worker requests to the processes in turn.

    with LocalWorkerPool(2) as pool:
      p = jobs.make_pipeline(["--runner=DirectRunner", "--direct_num_workers=2",
                              *pool.beam_args()])

or, for jobs run by hand, `python -m pipelines.transforms.worker_pool --num_workers 2` prints
the flags to give them.

The pool is local: on Dataflow (or any other runner) workers are the runner's own.
"""
from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

_LOG = logging.getLogger(__name__)
_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds `pipelines/`
# modules a pool process imports before it serves (what the jobs' DoFns unpickle into)
PRELOAD = ("pipelines.blocks", "pipelines.corpus", "pipelines.vocab_sample")


class WorkerPoolError(RuntimeError):
  pass


def is_direct_runner(name: str | None) -> bool:
  """Whether a `--runner` value names Beam's DirectRunner (as Beam spells it or abbreviates)."""
  return (name or "").split(".")[-1].lower() in ("direct", "directrunner",
                                                  "switchingdirectrunner")


class LocalWorkerPool:
  """`num_workers` warm worker processes and the address that Beam jobs reach them at."""

  def __init__(self, num_workers: int, preload: tuple[str, ...] = PRELOAD,
               start_timeout_s: float = 120.0):
    if num_workers < 1:
      raise ValueError(f"num_workers must be at least 1, not {num_workers}")
    self.num_workers = num_workers
    self._preload, self._timeout = preload, start_timeout_s
    self._procs: list[subprocess.Popen] = []
    self._addresses: list[str] = []
    self._server = None
    self.address: str | None = None

  # ------------------------------------------------------------------ life cycle

  def start(self) -> "LocalWorkerPool":
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pipelines.transforms.worker_pool", "--serve_child",
           *self._preload]
    try:
      for _ in range(self.num_workers):  # all start at once; their imports overlap
        self._procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, env=env))
      for proc in self._procs:
        self._addresses.append(self._read_address(proc))
      self._start_dispatcher()
    except BaseException:
      self.close()
      raise
    _LOG.info("worker pool: %d processes at %s", self.num_workers, self.address)
    return self

  def _read_address(self, proc: subprocess.Popen) -> str:
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(self._timeout)
    line = result[0].decode().strip() if result else ""
    if line.startswith("ADDRESS "):
      return line.split(" ", 1)[1]
    if result:  # end of output: the process has ended, or is ending
      try:
        status = proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        status = None
      what = f"exited with status {status} before it could serve"
    else:
      what = f"did not start within {self._timeout:.0f} s"
    raise WorkerPoolError(
        f"a worker pool process (pid {proc.pid}) {what}; its error output is above. To run "
        "without the pool, set `placement.beam.worker_pool: false` in the pipeline file (or "
        "leave out --environment_type=EXTERNAL)")

  def _start_dispatcher(self) -> None:
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc
    from apache_beam.utils import thread_pool_executor

    procs, addresses = self._procs, self._addresses
    turn = itertools.count()
    lock = threading.Lock()
    owner: dict[str, int] = {}

    def forward(i: int, call: str, request):
      with grpc.insecure_channel(addresses[i]) as channel:
        return getattr(beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel), call)(
            request)

    class Dispatcher(beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolServicer):
      """Gives each job's StartWorker request to the next pool process in turn."""

      def StartWorker(self, request, context):
        with lock:
          i = next(turn) % len(addresses)
          owner[request.worker_id] = i
        status = procs[i].poll()
        if status is not None:
          return beam_fn_api_pb2.StartWorkerResponse(error=(
              f"worker pool process {i} (pid {procs[i].pid}) has exited with status "
              f"{status}; its error output is above. Start the run again (a new pool "
              "starts with it)"))
        return forward(i, "StartWorker", request)

      def StopWorker(self, request, context):
        with lock:
          i = owner.pop(request.worker_id, None)
        if i is None or procs[i].poll() is not None:
          return beam_fn_api_pb2.StopWorkerResponse()
        return forward(i, "StopWorker", request)

    self._server = grpc.server(thread_pool_executor.shared_unbounded_instance())
    port = self._server.add_insecure_port("localhost:0")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(Dispatcher(),
                                                                        self._server)
    self._server.start()
    self.address = f"localhost:{port}"

  def close(self) -> None:
    """Stops the dispatcher and the processes (closing their stdin tells them to exit)."""
    if self._server is not None:
      self._server.stop(0)
      self._server = None
    for proc in self._procs:
      try:
        proc.stdin.close()
      except OSError:
        pass
    for proc in self._procs:
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      proc.stdout.close()
    self._procs.clear()
    self.address = None

  def __enter__(self) -> "LocalWorkerPool":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------ use

  def beam_args(self) -> list[str]:
    """The Beam flags that send a job's workers here (see `jobs.make_pipeline`)."""
    if self.address is None:
      raise WorkerPoolError("the worker pool is not started")
    return ["--environment_type=EXTERNAL", f"--environment_config={self.address}"]


def pool_environment(address: str):
  """The Beam environment whose workers come from the worker pool at `address`
  (HOST:PORT)."""
  from apache_beam.transforms.environments import ExternalEnvironment
  if not address:
    raise WorkerPoolError("--environment_type=EXTERNAL needs --environment_config=HOST:PORT, "
                          "the address of a worker pool")
  return ExternalEnvironment(address)


def _serve(preload: list[str]) -> None:
  """A pool process: imports, then hosts SDK harness threads until stdin closes."""
  import importlib
  import signal
  # Ctrl-C in a terminal reaches the whole process group: the parent stops the pool (it
  # closes our stdin), so the processes do not each print a KeyboardInterrupt traceback
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  import grpc
  from apache_beam.portability.api import beam_fn_api_pb2_grpc
  from apache_beam.runners.worker import worker_pool_main
  from apache_beam.utils import thread_pool_executor
  for name in preload:
    importlib.import_module(name)
  # Beam's own `BeamFnExternalWorkerPoolServicer.start` listens on every interface; a worker
  # runs whatever code the runner that calls it sends, so this one listens on localhost only
  server = grpc.server(thread_pool_executor.shared_unbounded_instance())
  port = server.add_insecure_port("localhost:0")
  beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
      worker_pool_main.BeamFnExternalWorkerPoolServicer(
          use_process=False, state_cache_size=0, data_buffer_time_limit_ms=0), server)
  server.start()
  address = f"localhost:{port}"
  sys.stdout.write(f"ADDRESS {address}\n")
  sys.stdout.flush()
  os.dup2(2, 1)  # from now on what the jobs print goes to stderr, not to the unread pipe
  sys.stdin.read()  # until the parent closes it, or exits
  server.stop(0)


def main(argv=None) -> int:
  """`python -m pipelines.transforms.worker_pool --num_workers 2`: starts a pool, prints the
  flags that send a DirectRunner job's workers to it, and serves until interrupted."""
  import argparse
  import time
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--serve_child", nargs="*", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.serve_child is not None:
    _serve(args.serve_child)
    return 0
  logging.basicConfig(level=logging.INFO)
  with LocalWorkerPool(args.num_workers) as pool:
    print("Beam flags for jobs on this pool:", " ".join(
        ["--runner=DirectRunner", f"--direct_num_workers={args.num_workers}",
         *pool.beam_args()]), flush=True)
    try:
      while True:
        time.sleep(3600)
    except KeyboardInterrupt:
      pass
  return 0


if __name__ == "__main__":
  sys.exit(main())
