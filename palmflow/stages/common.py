"""Helpers shared by stage kinds: Beam flags from placement, input digests."""
from __future__ import annotations

import atexit
import itertools
from pathlib import Path
from typing import Any, Mapping

from palmflow.dag.store import file_digest


def beam_args(placement: Mapping[str, Any], *, job_name: str) -> list[str]:
  """Beam pipeline flags from the pipeline file's `placement.beam` (runner named explicitly).

  The runner defaults to DirectRunner: Beam's own default first tries to download the
  Prism runner, which fails without internet (and so does Beam's DirectRunner before each
  job: `pipelines.transforms.jobs.make_pipeline` runs DirectRunner batch jobs on FnApiRunner
  directly). On DirectRunner with
  `direct_running_mode: multi_processing` and more than one worker, the jobs' workers are
  the processes of one warm worker pool that every Beam stage of the run shares (started
  at the first such job; `placement.beam.worker_pool: false` gives each job fresh worker
  processes instead, as Beam does).
  """
  runner, options, workers = _beam_placement(placement)
  if runner == "DataflowRunner":
    from palmflow.errors import ConfigError
    raise ConfigError(
        "the store is a local folder, which Dataflow's workers cannot write: a pipeline "
        "file's Beam stages run where the store is (DirectRunner, or a runner whose workers "
        "share its filesystem)", field="placement.beam.runner",
        hint="run the Beam jobs on Dataflow by hand, reading and writing gs:// paths (README, "
             "'At scale'), or set placement.beam.runner: DirectRunner")
  args = [f"--runner={runner}", f"--job_name={job_name.lower().replace('_', '-')}"]
  if workers:
    options.pop("direct_running_mode")
    args += worker_pool(workers).beam_args()
  for k, v in options.items():
    if isinstance(v, bool):
      if v:
        args.append(f"--{k}")
    else:
      args.append(f"--{k}={v}")
  return args


def beam_summary(placement: Mapping[str, Any]) -> str:
  """Where a stage's Beam job runs, for its log line (e.g. "DirectRunner, 2 workers in the
  run's worker pool")."""
  from pipelines.transforms.worker_pool import is_direct_runner
  runner, options, workers = _beam_placement(placement)
  if workers:
    return f"{runner}, {workers} workers in the run's worker pool"
  if not is_direct_runner(runner) or "direct_num_workers" not in options:
    return runner
  n = int(options["direct_num_workers"])
  return f"{runner}, " + ("one worker a core" if n == 0 else f"{n} worker{'s' * (n != 1)}")


def _beam_placement(placement: Mapping[str, Any]) -> tuple[str, dict, int]:
  """(runner, a copy of the Beam options, worker pool processes: 0 for no pool) from
  `placement.beam`. A pool is for DirectRunner with `direct_running_mode:
  multi_processing` and more than one worker, unless `worker_pool: false`."""
  import os
  from pipelines.transforms.worker_pool import is_direct_runner
  beam = dict(placement.get("beam") or {})
  runner = beam.get("runner", "DirectRunner")
  options = dict(beam.get("options") or {})
  if not beam.get("worker_pool", True) or not is_direct_runner(runner) or (
      options.get("direct_running_mode") != "multi_processing"):
    return runner, options, 0
  n = int(options.get("direct_num_workers", 1))
  n = n or os.cpu_count() or 1  # Beam: 0 means one worker a core
  return runner, options, (n if n > 1 else 0)


_POOL = None


def worker_pool(num_workers: int):
  """The run's warm worker pool of `num_workers` processes (started on first use)."""
  global _POOL
  from pipelines.transforms.worker_pool import LocalWorkerPool
  if _POOL is not None and _POOL.num_workers != num_workers:
    close_worker_pool()
  if _POOL is None:
    _POOL = LocalWorkerPool(num_workers).start()
  return _POOL


def close_worker_pool() -> None:
  """Stops the run's worker pool, if one was started (the executor calls this at the end)."""
  global _POOL
  if _POOL is not None:
    pool, _POOL = _POOL, None
    pool.close()


atexit.register(close_worker_pool)  # a pool outlives no process that started it


def remote_path_identity(path: str) -> dict:
  """Identity of a path on a Beam filesystem (gs://, s3://, ...): every matched object's size
  and update time, as the filesystem lists them (reading the objects to hash them would
  cost a download). An object rewritten with new content gets a new update time, so the
  stage reruns.

  Raises:
    FileNotFoundError: nothing matches, or the filesystem cannot list the path (no
      credentials, or its Beam extra is not installed); the message says which.
  """
  from apache_beam.io.filesystems import FileSystems
  try:
    found = FileSystems.match([path])[0].metadata_list
  except Exception as e:  # noqa: BLE001 - Beam raises BeamIOError, ValueError, ImportError
    raise FileNotFoundError(f"cannot list '{path}': {type(e).__name__}: {e} (palmflow "
                            "identifies remote inputs by their listed sizes and update "
                            "times, so planning needs access to them)") from None
  if not found:
    raise FileNotFoundError(f"no object matches '{path}'")
  return {"path": path, "objects": {m.path: [m.size_in_bytes, m.last_updated_in_seconds]
                                    for m in sorted(found, key=lambda m: m.path)}}


def path_identity(base_dir: Path, path: str) -> dict:
  """Identity of an input file: the path as written plus the content digest (not mtime).

  A glob (``*``, ``?``, ``[...]`` in any component; ``**`` for any depth, as the Beam jobs
  read it) is identified by every file it matches, keyed by the path below the glob's first
  wildcard-free folder; folders it matches are not files and are left out.

  Raises:
    FileNotFoundError: nothing matches, or the file does not exist.
    IsADirectoryError: a plain path names a folder.
  """
  import glob as glob_lib
  import os
  from palmflow.dag.executor import resolve_path
  p = resolve_path(base_dir, path)
  if any(ch in path for ch in "*?["):
    files = sorted(f for f in glob_lib.glob(str(p), recursive=True) if os.path.isfile(f))
    base = Path(*[part for part in itertools.takewhile(
        lambda s: not any(ch in s for ch in "*?["), p.parts)])
    if not files:
      raise FileNotFoundError(f"no file matches '{path}' (looked in {base})")
    return {"path": path, "files": {str(Path(f).relative_to(base)): file_digest(Path(f))
                                    for f in files}}
  if p.is_dir():
    raise IsADirectoryError(f"'{path}' is a folder (resolved to {p}); name a file, or a glob "
                            f"such as '{path.rstrip('/')}/*.txt'")
  if not p.exists():
    raise FileNotFoundError(f"file '{path}' not found (resolved to {p})")
  return {"path": path, "sha256": file_digest(p)}


# Malloc settings for the train/eval binaries, read by glibc at process start: one arena, no
# mmap'd chunks, no trimming, so XLA:CPU's per-step buffers stay mapped (otherwise ~600k page
# faults and >1 s of system time per palm_small step on CPU; bench/results_trainer.md). A
# placement's env overrides them.
CPU_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                  "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


# What absl prints once per native library before its logging is set up (TensorFlow's two
# libraries: twice a binary); it says nothing about the run.
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"


def echoed(line: str) -> bool:
  """Whether a line the binary printed is echoed to the pipeline's console: progress
  ("step"), evaluation results, errors and warnings, but not TensorFlow's / XLA's native log
  lines (``I0000 00:00:...``) or absl's preamble. Every line read goes to the stage's log
  file; in a terminal the binary's stderr (its logging, progress bar and native logs) goes
  straight to the console instead and is not read here."""
  low = line.lower()
  native_log = line[:1] in "IWEF" and line[1:5].isdigit()
  if native_log or line.startswith(_ABSL_PREAMBLE):
    return False
  return " step " in line or "error" in low or "eval" in low or "warning" in low


def run_binary(ctx, argv: list[str], *, log_name: str) -> None:
  """Runs a palmflow binary (train/eval) as a subprocess, as a user would run it.

  The command is saved as `command.sh` in the stage directory; output goes to `log_name`
  there, and progress lines are echoed. In a terminal, stderr is passed through so the
  binary's progress bar shows. `placement.train.env` and `.extra_flags` apply (e.g.
  XLA_FLAGS, multi-host flags); they are not part of the stage's identity.
  """
  import os
  import shlex
  import subprocess
  import sys
  from palmflow.dag.store import write_text
  placement = dict(ctx.placement.get("train") or {})
  argv = list(argv) + list(placement.get("extra_flags") or [])
  env = dict(os.environ)
  for name, value in CPU_MALLOC_ENV.items():
    env.setdefault(name, value)
  env.update(placement.get("env") or {})
  repo = str(Path(__file__).resolve().parents[2])
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  # command.sh reruns it by hand as it ran here: the same folder and the environment palmflow
  # set (the malloc settings, placement.train.env such as XLA_FLAGS, PYTHONPATH).
  exports = {k: env[k] for k in [*CPU_MALLOC_ENV, *(placement.get("env") or {})]}
  write_text(ctx.out_dir / "command.sh",
             "#!/bin/sh\n"
             f"# stage {ctx.name}: the command palmflow ran, in its folder and environment\n"
             f"cd {shlex.quote(repo)}\n"
             + "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in exports.items())
             + f"export PYTHONPATH={shlex.quote(repo)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
             + " \\\n  ".join([shlex.join(argv[:3])] + [shlex.quote(a) for a in argv[3:]])
             + "\n")
  ctx.log(f"$ {' '.join(shlex.quote(a) for a in argv[1:3])} ... "
          f"(full command: {ctx.out_dir / 'command.sh'})")
  log_path = ctx.out_dir / log_name
  interactive = sys.stderr.isatty()
  with open(log_path, "a", encoding="utf-8") as logf:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, cwd=repo, text=True,
                            stderr=None if interactive else subprocess.STDOUT)
    for line in proc.stdout:
      logf.write(line)
      logf.flush()
      if echoed(line):
        ctx.log(line.rstrip())
    rc = proc.wait()
  if rc != 0:
    tail = "".join(log_path.read_text(encoding="utf-8").splitlines(True)[-30:])
    where = (" (its error and logging went to the terminal, above; the log has its standard "
             "output)" if interactive else "")
    raise RuntimeError(f"{argv[2]} exited with {rc}{where}; last lines of {log_path}:\n{tail}")
