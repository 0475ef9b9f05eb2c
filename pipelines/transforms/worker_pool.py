"""Warm SDK worker processes that local Beam jobs share (Beam's EXTERNAL environment).

`--direct_running_mode=multi_processing` starts fresh worker processes for every job, and each
imports Beam before it does any work: 1.2-1.5 s of CPU apiece on the machines seen here, and a
job waited 2.2 s for its first element to be processed and 0.6 s at the end for the workers
to stop. A `palmflow run` runs several Beam jobs (corpus, vocabulary sample, blocks), so it
starts a `LocalWorkerPool` once and every job's workers run in its processes, already past
their imports, as Flink and Spark runners do with Beam's worker pool.

Each pool process serves Beam's worker pool API and hosts one SDK harness per job in a
thread (as Beam's own pool does in thread mode), so `num_workers` processes give
`num_workers` workers that run in parallel, each with its own interpreter. A small
dispatcher in this process gives the jobs' worker requests to the processes in turn.

    with LocalWorkerPool(2) as pool:
      p = jobs.make_pipeline(["--runner=DirectRunner", "--direct_num_workers=2",
                              *pool.beam_args()])

or, for jobs run by hand, `python -m pipelines.transforms.worker_pool --num_workers 2` prints
the flags to give them.

The pool is local: on Dataflow (or any other runner) workers are the runner's own. A pool
worker runs whatever code the runner that calls it sends, so the dispatcher and the
processes listen on Unix sockets in a directory only this user can open (`unix:` addresses),
not on TCP ports that any local user could reach.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_LOG = logging.getLogger(__name__)
_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds `pipelines/`
# modules a pool process imports before it serves (what the jobs' DoFns unpickle into)
PRELOAD = ("pipelines.blocks", "pipelines.corpus", "pipelines.vocab_sample")


class WorkerPoolError(RuntimeError):
  pass


def is_direct_runner(name: str | None) -> bool:
  """Whether a `--runner` value names Beam's DirectRunner (as Beam spells it or abbreviates;
  no runner at all is Beam's default, DirectRunner)."""
  return (name or "DirectRunner").split(".")[-1].lower() in (
      "direct", "directrunner", "switchingdirectrunner")


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
    self._dir: str | None = None
    self.address: str | None = None

  # ------------------------------------------------------------------ life cycle

  def start(self) -> "LocalWorkerPool":
    if self.address is not None:
      return self
    self._dir = tempfile.mkdtemp(prefix="palmflow-pool-")  # mode 0700: this user only
    env = dict(os.environ)
    # the processes import what this process imports (its sys.path, in its order), and not
    # a `pipelines/` that happens to be in their working directory (-P)
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [p for p in sys.path if p])
    try:
      for i in range(self.num_workers):  # all start at once; their imports overlap
        address = f"unix:{self._dir}/worker-{i}.sock"
        cmd = [sys.executable, "-P", "-m", "pipelines.transforms.worker_pool",
               "--serve_child", address, *self._preload]
        # their own process group: Ctrl-C in a terminal stops the parent, which stops them
        self._procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, env=env,
                                            process_group=0))
        self._addresses.append(address)
      for proc in self._procs:
        self._wait_until_serving(proc)
      self._start_dispatcher()
    except BaseException:
      self.close()
      raise
    _LOG.info("worker pool: %d processes at %s", self.num_workers, self.address)
    return self

  def _wait_until_serving(self, proc: subprocess.Popen) -> None:
    """Waits for the process's `SERVING` line (its stdout carries nothing else)."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(self._timeout)
    if result and result[0].strip() == b"SERVING":
      return
    if not result:
      what = f"did not start within {self._timeout:.0f} s"
    else:
      try:
        what = f"exited with status {proc.wait(timeout=30)} before it could serve"
      except subprocess.TimeoutExpired:
        what = f"closed its output without serving (output: {result[0][:200]!r})"
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

    def forward(i: int, call: str, request):
      with grpc.insecure_channel(addresses[i]) as channel:
        stub = beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel)
        return getattr(stub, call)(request, timeout=_FORWARD_TIMEOUT_S)

    class Dispatcher(beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolServicer):
      """Gives each job's StartWorker request to the next pool process in turn."""

      def StartWorker(self, request, context):
        with lock:
          i = next(turn) % len(addresses)
        status = procs[i].poll()
        if status is not None:
          return beam_fn_api_pb2.StartWorkerResponse(error=(
              f"worker pool process {i} (pid {procs[i].pid}) has exited with status "
              f"{status}; its error output is above. Start the run again (a new pool "
              "starts with it)"))
        try:
          return forward(i, "StartWorker", request)
        except grpc.RpcError as e:
          return beam_fn_api_pb2.StartWorkerResponse(error=(
              f"worker pool process {i} (pid {procs[i].pid}) did not answer: {e}"))

      def StopWorker(self, request, context):
        # A worker ends with its job (its control stream closes); nothing to stop here.
        return beam_fn_api_pb2.StopWorkerResponse()

    self._server = grpc.server(thread_pool_executor.shared_unbounded_instance())
    address = f"unix:{self._dir}/dispatcher.sock"
    self._server.add_insecure_port(address)
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(Dispatcher(),
                                                                        self._server)
    self._server.start()
    self.address = address

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
    self._addresses.clear()
    if self._dir is not None:
      shutil.rmtree(self._dir, ignore_errors=True)
      self._dir = None
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


_FORWARD_TIMEOUT_S = 60.0  # a StartWorker only creates a thread: a minute means it is stuck


def pool_environment(address: str):
  """The Beam environment whose workers come from the worker pool at `address`
  (`unix:PATH` or HOST:PORT)."""
  from apache_beam.transforms.environments import ExternalEnvironment
  if not address:
    raise WorkerPoolError("--environment_type=EXTERNAL needs --environment_config=HOST:PORT, "
                          "the address of a worker pool")
  _register_local_external_handler()
  return ExternalEnvironment(address)


@functools.cache
def _register_local_external_handler() -> None:
  """Workers of a pool on this machine reach the runner at `localhost`.

  Beam's handler for EXTERNAL environments gives workers the runner's address as
  `socket.getfqdn():PORT` (right for a pool on another machine); where the host name does
  not resolve (an offline machine) the workers could not connect. This handler, registered
  for the same environment, uses `localhost` when the pool's address is local.
  """
  from apache_beam.portability import common_urns
  from apache_beam.portability.api import beam_runner_api_pb2
  from apache_beam.runners.portability.fn_api_runner import worker_handlers

  class LocalExternalWorkerHandler(worker_handlers.ExternalWorkerHandler):
    def __init__(self, external_payload, *args, **kwargs):
      # set first: the base class asks host_from_worker() while it is being built
      self._local = external_payload.endpoint.url.startswith(
          ("unix:", "localhost:", "127.0.0.1:"))
      super().__init__(external_payload, *args, **kwargs)

    def host_from_worker(self):
      return "localhost" if self._local else super().host_from_worker()

  worker_handlers.WorkerHandler.register_environment(
      common_urns.environments.EXTERNAL.urn,
      beam_runner_api_pb2.ExternalPayload)(LocalExternalWorkerHandler)


def _serve(address: str, preload: list[str]) -> None:
  """A pool process: imports, then hosts one SDK harness thread a job until stdin closes."""
  import importlib
  import traceback
  out = os.fdopen(os.dup(1), "w")  # only the SERVING line goes to the parent's pipe:
  os.dup2(2, 1)                    # whatever imports or jobs print goes to stderr
  import grpc
  from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc
  from apache_beam.runners.worker import sdk_worker
  from apache_beam.utils import thread_pool_executor
  from pipelines.transforms.jobs import prompt_bundle_ends
  for name in preload:
    importlib.import_module(name)
  prompt_bundle_ends()

  class ThreadWorkers(beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolServicer):
    """Starts an SDK harness for a job in a thread, and keeps no reference to it: it ends,
    and is freed, when its job's control stream closes."""

    def StartWorker(self, request, context):
      try:
        harness = sdk_worker.SdkHarness(request.control_endpoint.url,
                                        worker_id=request.worker_id,
                                        state_cache_size=0, data_buffer_time_limit_ms=0)
        threading.Thread(target=harness.run, name=f"worker-{request.worker_id}",
                         daemon=True).start()
        return beam_fn_api_pb2.StartWorkerResponse()
      except Exception:  # noqa: BLE001 - the runner shows the error
        return beam_fn_api_pb2.StartWorkerResponse(error=traceback.format_exc())

    def StopWorker(self, request, context):
      return beam_fn_api_pb2.StopWorkerResponse()

  server = grpc.server(thread_pool_executor.shared_unbounded_instance())
  server.add_insecure_port(address)
  beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(ThreadWorkers(), server)
  server.start()
  out.write("SERVING\n")
  out.flush()
  sys.stdin.read()  # until the parent closes it, or exits
  server.stop(0)


def main(argv=None) -> int:
  """`python -m pipelines.transforms.worker_pool --num_workers 2`: starts a pool, prints the
  flags that send a DirectRunner job's workers to it, and serves until interrupted."""
  import argparse
  import time
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--serve_child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.serve_child is not None:
    _serve(args.serve_child[0], args.serve_child[1:])
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
