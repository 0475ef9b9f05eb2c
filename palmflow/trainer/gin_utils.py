"""t5x-style flags for the train/eval/infer binaries: gin files, bindings, search paths.

    --gin_file=runs/pretrain.gin --gin_file=models/palm_tiny.gin      (repeatable, in order)
    --gin.TRAIN_STEPS=1000 --gin.MODEL_DIR=\"/tmp/run\"                (macro shorthand)
    --gin_bindings='train_lib.train.eval_period = 50'                 (repeatable)
    --gin_search_paths=/my/configs,/other                             (relative files/includes)

The repository's `gin/` folder is always searched last. A `--gin.NAME` override of a macro
that no parsed file references is an error naming the closest macros (gin would otherwise
accept a misspelt macro silently).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import gin

from palmflow.errors import ConfigError

REPO_GIN_DIR = Path(__file__).resolve().parents[2] / "gin"
_INCLUDE = re.compile(r"^\s*include\s+['\"]([^'\"]+)['\"]", re.M)
_MACRO_REF = re.compile(r"%([A-Za-z_][A-Za-z0-9_./]*)")
_MACRO_DEF = re.compile(r"^([A-Z_][A-Z0-9_]*)\s*=", re.M)


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable; relative paths use --gin_search_paths)")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a gin binding (repeatable)")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated folders for relative gin files and includes")
  parser.add_argument("--tfds_data_dir", default=None, help="TFDS data directory")
  parser.add_argument("--seqio_additional_cache_dirs", default="",
                      help="comma-separated extra seqio cache directories")
  parser.add_argument("--task_spec", action="append", default=[],
                      help="palmflow task.json to register as a seqio task (repeatable)")
  parser.add_argument("--coordinator_address", default=None,
                      help="multi-host: host:port of process 0")
  parser.add_argument("--process_count", type=int, default=None,
                      help="multi-host: the number of processes (with --coordinator_address)")
  parser.add_argument("--process_index", type=int, default=None,
                      help="multi-host: this process's index, 0 to process_count - 1")


def split_gin_shorthand(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--gin.NAME=VALUE` flags (returned as bindings) from the rest."""
  rest, bindings = [], []
  for a in argv:
    if a.startswith("--gin.") and "=" in a:
      name, value = a[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {value}")
    else:
      rest.append(a)
  return rest, bindings


def search_paths(flag: str) -> list[Path]:
  paths = [Path(p) for p in flag.split(",") if p.strip()]
  return paths + [REPO_GIN_DIR]


def resolve(name: str, paths: Sequence[Path], cwd: Path | None = None) -> Path:
  """A gin file: absolute, else the first of `cwd` (default: the current folder) and the
  search paths that has it."""
  p = Path(name)
  if p.is_absolute() and p.exists():
    return p
  for base in [cwd or Path.cwd()] + list(paths):
    if (base / p).exists():
      return base / p
  raise ConfigError("gin file not found", path=name, field="--gin_file",
                    hint=f"searched {', '.join(str(x) for x in paths)}")


def gin_texts(files: Sequence[str], paths: Sequence[Path],
              cwd: Path | None = None) -> dict[str, str]:
  """Every file's text, includes followed (for fingerprints and macro checks), found as the
  binary run in `cwd` (default: the current folder) would find them."""
  out: dict[str, str] = {}

  def visit(name):
    p = resolve(name, paths, cwd)
    key = str(p)
    if key in out:
      return
    out[key] = p.read_text(encoding="utf-8")
    for inc in _INCLUDE.findall(out[key]):
      visit(inc)
  for f in files:
    visit(f)
  return out


def check_macro_overrides(bindings: Sequence[str], texts: dict[str, str]) -> None:
  """Raises ConfigError for a macro override (`NAME = v`) that no gin file references."""
  all_text = "\n".join(texts.values()) + "\n" + "\n".join(bindings)
  referenced = set(_MACRO_REF.findall(all_text)) | set(_MACRO_DEF.findall(
      "\n".join(texts.values())))
  for b in bindings:
    name = b.split("=", 1)[0].strip()
    if re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) and name not in referenced:
      close = difflib.get_close_matches(name, sorted(referenced), n=3, cutoff=0.5)
      raise ConfigError(f"macro {name} is not used by any gin file", field=f"--gin.{name}",
                        hint=(f"did you mean {' or '.join(close)}?" if close else
                              f"macros in these files: {', '.join(sorted(referenced))}"))


class _IncludeProbeFilter(logging.Filter):
  """Drops gin's "Path not found: <include>" records.

  For every `include`, gin first asks whether the name is a file inside a Python package and
  logs an ERROR when it is not, before it finds the file on the search paths as intended.
  Every train/eval log then began with false errors. `gin_texts` has already resolved every
  include (a missing one is a `ConfigError`), so the probe's record says nothing.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.ERROR
                and str(record.msg).startswith("Path not found:")
                and Path(record.pathname).parts[-2:] == ("gin", "resource_reader.py"))


@contextlib.contextmanager
def _quiet_include_probes():
  root = logging.getLogger()
  probe_filter = _IncludeProbeFilter()
  root.addFilter(probe_filter)
  try:
    yield
  finally:
    root.removeFilter(probe_filter)


def _is_required(value, depth: int = 0) -> bool:
  """Whether a macro's value is `%gin.REQUIRED`, directly or through other macros."""
  if not isinstance(value, gin.config.ConfigurableReference) or depth > 50:
    return False
  if value.scoped_selector == "gin.REQUIRED/gin.constant":
    return True
  if value.selector == "gin.macro":
    return _is_required(gin.query_parameter(f"%{value.scopes[-1]}"), depth + 1)
  return False


def check_required_macros(texts: dict[str, str]) -> None:
  """Raises ConfigError naming every macro still bound to `%gin.REQUIRED` after parsing.

  Gin reports an unset `%gin.REQUIRED` only when the configuration is finalized; these
  binaries parse without finalizing (so that tests and stages can add bindings), so it is
  checked here, before anything runs: a missing MODEL_DIR or TRAIN_STEPS would otherwise
  surface as a type error deep inside the run.
  """
  missing = []
  for name in sorted(set(_MACRO_DEF.findall("\n".join(texts.values())))):
    try:
      value = gin.query_parameter(f"%{name}")
    except ValueError:
      continue
    if _is_required(value):
      missing.append(name)
  if missing:
    where = [Path(p).name for p, t in texts.items()
             if re.search(rf"^{re.escape(missing[0])}\s*=\s*%gin\.REQUIRED", t, re.M)]
    raise ConfigError(
        f"required setting{'s' if len(missing) > 1 else ''} not given: {', '.join(missing)}",
        field=f"--gin.{missing[0]}",
        hint=(" ".join(f"--gin.{m}=..." for m in missing)
              + (f" (see the 'Required' header of {where[0]})" if where else "")))


def check_local_paths() -> None:
  """Raises ConfigError for a path macro (MODEL_DIR, CHECKPOINT_PATH, ...) bound to a URI,
  before anything is written (`checkpoints.check_local_path`)."""
  from palmflow.trainer import checkpoints
  for name in checkpoints.PATH_MACROS:
    try:
      value = gin.query_parameter(f"%{name}")
    except ValueError:  # not a macro of this binary's files
      continue
    if isinstance(value, (str, Path)):
      checkpoints.check_local_path(value, f"--gin.{name}")


def parse(files: Sequence[str], bindings: Sequence[str], search: str = "", *,
          check_required: bool = False) -> None:
  """Parses gin files then bindings (after checking macro overrides), with clear errors.

  Raises ConfigError for a missing file, a macro override that no file uses, a binding gin
  rejects, or (with `check_required`, as the binaries do) a `%gin.REQUIRED` macro left
  unset; code that takes only parts of a run's configuration (a model, a partitioner)
  parses without that check."""
  paths = search_paths(search)
  texts = gin_texts(files, paths)
  check_macro_overrides(bindings, texts)
  for p in paths:
    gin.add_config_file_search_path(str(p))
  try:
    with _quiet_include_probes():
      gin.parse_config_files_and_bindings([str(resolve(f, paths)) for f in files],
                                          list(bindings), finalize_config=False,
                                          skip_unknown=False)
  except (ValueError, KeyError, ImportError, SyntaxError, NameError) as e:
    bare = _unquoted_string_binding(bindings)
    if bare is not None:
      name, value = bare
      raise ConfigError(f"gin cannot read the value {value!r}: a string needs quotes that "
                        "reach gin (the shell removes one pair)", field=f"--gin.{name}",
                        hint=f"--gin.{name}=\"'{value}'\"") from None
    raise ConfigError(f"gin configuration error: {e}", field="--gin_file/--gin_bindings",
                      hint="check the binding's name against the gin files' configurables"
                      ) from None
  if check_required:
    check_required_macros(texts)


def _unquoted_string_binding(bindings: Sequence[str]) -> tuple[str, str] | None:
  """(name, value) of the first `NAME = value` whose value is no gin value: not a Python
  literal, reference (@, %) or name of a constant, e.g. a string whose quotes the shell
  removed (`--gin.MIXTURE_OR_TASK_NAME="my_task"`)."""
  import ast
  for b in bindings:
    name, _, value = b.partition("=")
    value = value.strip()
    if not _ or value[:1] in ("@", "%", "(", "[", "{") or value in ("None", "True", "False"):
      continue
    try:
      ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return name.strip(), value
  return None


def parse_flags(argv: Sequence[str], description: str,
                prog: str | None = None) -> argparse.Namespace:
  """Parses the t5x flags; `--gin.NAME=V` become bindings appended after --gin_bindings."""
  rest, shorthand = split_gin_shorthand(argv)
  parser = argparse.ArgumentParser(
      prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="--gin.NAME=VALUE sets the gin macro NAME, e.g. --gin.BATCH_SIZE=32 (repeatable;\n"
             "applied after --gin_bindings). A string keeps its quotes past the shell:\n"
             "  --gin.MIXTURE_OR_TASK_NAME=\"'my_task'\"\n"
             "  --gin.MIXTURE_OR_TASK_NAME=\\\"my_task\\\"")
  add_flags(parser)
  args = parser.parse_args(rest)
  args.gin_bindings = list(args.gin_bindings) + shorthand
  return args


def setup_runtime(args: argparse.Namespace) -> None:
  """Multi-host init, TFDS dir, seqio cache dirs and task specs, before gin is parsed."""
  import jax
  if args.coordinator_address:
    # CPU hosts need a cross-process collectives backend (gloo); it must be chosen before the
    # CPU client starts. GPU/TPU ignore it. JAX_CPU_COLLECTIVES_IMPLEMENTATION still wins.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.process_count,
                               process_id=args.process_index)
  if args.tfds_data_dir:
    import seqio
    seqio.set_tfds_data_dir_override(args.tfds_data_dir)
  if args.seqio_additional_cache_dirs:
    import seqio
    seqio.add_global_cache_dirs(args.seqio_additional_cache_dirs.split(","))
  if args.task_spec:
    from tasks import specs
    for p in args.task_spec:
      specs.register_from_file(p)


def run_main(argv: list[str], *, name: str, doc: str, fn_path: str, output_macro: str,
             result_file: str) -> int:
  """The body of the train/eval/infer binaries.

  Parses the t5x flags, sets up the runtime (multi-host, TFDS, seqio caches, task specs),
  parses gin, writes `config.gin` to the output directory (the `output_macro` value), calls
  the gin-configured library function `fn_path` ("module:function") and writes its JSON
  result to `result_file` there (process 0 only). Errors a person can act on print one line
  and return their exit code: palmflow's own errors, and a `ValueError` (how the library and
  its dependencies reject a setting, e.g. a model dimension or a schedule name), which
  prints where it was raised and exits 2; PALMFLOW_TRACEBACK=1 re-raises it instead.
  """
  import importlib
  import json
  import logging
  import sys
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("palmflow").setLevel(logging.INFO)
  from palmflow.errors import PalmflowError
  try:
    args = parse_flags(argv[1:], doc, prog=f"palmflow {name}")
    setup_runtime(args)
    parse(args.gin_file, args.gin_bindings, args.gin_search_paths, check_required=True)
    check_local_paths()
    module, func = fn_path.split(":")
    configured = gin.get_configurable(getattr(importlib.import_module(module), func))
    out = Path(gin.query_parameter(f"%{output_macro}"))
    import jax
    lead = jax.process_index() == 0
    if lead:
      out.mkdir(parents=True, exist_ok=True)
      (out / "config.gin").write_text(gin.config_str())
    result = configured()
    if lead:
      (out / result_file).write_text(json.dumps(result, indent=2, default=str))
  except PalmflowError as e:
    print(f"palmflow {name}: error: {e}", file=sys.stderr)
    return e.exit_code
  except ValueError as e:
    if os.environ.get("PALMFLOW_TRACEBACK"):
      raise
    import traceback
    frame = traceback.extract_tb(e.__traceback__)[-1]
    print(f"palmflow {name}: error: {e}\n  raised at {frame.filename}:{frame.lineno} "
          f"(PALMFLOW_TRACEBACK=1 shows the whole traceback)", file=sys.stderr)
    return 2
  return 0
