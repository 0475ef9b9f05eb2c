"""A corpus every machine has: the source text of the running Python's standard library.

Each module file becomes one document `{"id": "stdlib:<relative path>", "text": ...,
"source": <name>}`. The file list is taken when the pipeline is built (on the launcher);
workers read the files, so on Dataflow the launcher and workers must share the Python
version (the stage's identity includes it).
"""
from __future__ import annotations

import fnmatch
import hashlib
import platform
import sysconfig
from pathlib import Path

import apache_beam as beam

DEFAULT_EXCLUDE = ("test/*", "tests/*", "*/test/*", "*/tests/*", "idlelib/*", "lib2to3/*",
                   "site-packages/*", "dist-packages/*", "ensurepip/*", "turtledemo/*",
                   "pydoc_data/*", "__phello__/*", "config-*/*")


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
  return platform.python_version()


def list_stdlib_files(*, include: tuple[str, ...] = ("*.py",),
                      exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
                      sample_fraction: float = 1.0, seed: int = 0) -> list[str]:
  """Relative paths of stdlib modules, sorted; a deterministic hash sample if asked.

  Args:
    include: glob patterns a relative path must match (any).
    exclude: glob patterns that drop a path (any).
    sample_fraction: keep this fraction of files, chosen by a seeded hash of the path.
    seed: the sampling seed.
  Returns:
    Sorted POSIX relative paths under `stdlib_root()`.
  """
  root = stdlib_root()
  out = []
  for p in root.rglob("*"):
    if not p.is_file():
      continue
    rel = p.relative_to(root).as_posix()
    if not any(fnmatch.fnmatch(rel, pat) for pat in include):
      continue
    if any(fnmatch.fnmatch(rel, pat) for pat in exclude):
      continue
    if sample_fraction < 1.0:
      h = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big")
      if h / 2**64 >= sample_fraction:
        continue
    out.append(rel)
  return sorted(out)


class _ReadModule(beam.DoFn):
  def __init__(self, source: str):
    self._source = source
    self._invalid = beam.metrics.Metrics.counter("palmflow", "invalid_utf8_docs")

  def process(self, rel: str):
    raw = (stdlib_root() / rel).read_bytes()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      self._invalid.inc()
      text = raw.decode("utf-8", errors="replace")
    yield {"id": f"{self._source}:{rel}", "text": text, "source": self._source}


class ReadPythonStdlib(beam.PTransform):
  """PBegin -> documents, one per standard-library module."""

  def __init__(self, *, name: str = "stdlib", include=("*.py",), exclude=DEFAULT_EXCLUDE,
               sample_fraction: float = 1.0, seed: int = 0):
    super().__init__()
    self._source = name
    self._files = list_stdlib_files(include=tuple(include), exclude=tuple(exclude),
                                    sample_fraction=sample_fraction, seed=seed)

  def expand(self, pbegin):
    return (pbegin
            | "ListModules" >> beam.Create(self._files)
            | "ReadModules" >> beam.ParDo(_ReadModule(self._source)))
