"""The `palmflow` command.

    palmflow run pipelines/examples/stdlib_demo.yaml          # run what is not done
    palmflow plan pipelines/examples/stdlib_demo.yaml         # what would run, and why
    palmflow validate FILE                                    # check a file, run nothing
    palmflow kinds                                            # stage kinds and their settings
    palmflow train|eval|infer --gin_file=... --gin.MACRO=...  # the t5x-compatible binaries

The store (where outputs go) is `--store DIR`, else `$PALMFLOW_STORE`, else ./palmflow_store.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from palmflow.errors import PalmflowError


def _store(args):
  from palmflow.dag.store import Store, default_root
  return Store(args.store or default_root())


def cmd_plan(args) -> int:
  from palmflow.dag import executor, spec
  pipeline = spec.load(args.file)
  store = _store(args)
  print(executor.format_plan(executor.plan(pipeline, store), store))
  return 0


def cmd_run(args) -> int:
  from palmflow.dag import executor, spec
  pipeline = spec.load(args.file)
  store = _store(args)
  only = set(args.only.split(",")) if args.only else None
  planned, ran = executor.run(pipeline, store, only=only)
  if not ran and all(p.action == "reuse" for p in planned):
    print(f"all {len(planned)} stages are up to date (store {store.root})")
  else:
    print(f"ran {len(ran)} of {len(planned)} stages: {', '.join(ran) or 'none'}")
  report = [p for p in planned if p.kind == "report"]
  for p in report:
    print(f"report: {store.stage_dir(p.name, p.fingerprint) / 'report.md'}")
  return 0


def cmd_validate(args) -> int:
  from palmflow.dag import executor, spec
  p = spec.load(args.file)
  for name in p.order:  # the files each stage names exist (as `plan` and `run` check)
    executor.stage_identity(p, name)
  print(f"{args.file}: valid ({len(p.stages)} stages: {' -> '.join(p.order)})")
  return 0


def cmd_kinds(args) -> int:
  from palmflow.dag import kinds
  for name, k in sorted(kinds.registry().items()):
    print(f"{name}  (produces {k.produces})  {k.doc}")
    for slot, s in k.slots.items():
      print(f"    input {slot}: {' | '.join(s.accepts)}{'' if s.required else ' (optional)'}")
    hints = typing.get_type_hints(k.settings_cls)
    for f in dataclasses.fields(k.settings_cls):
      if f.default is not dataclasses.MISSING:
        default = f" = {f.default!r}"
      elif f.default_factory is not dataclasses.MISSING:  # e.g. an empty dict or list
        default = f" = {f.default_factory()!r}"
      else:
        default = "  (required)"
      advisory = (" (advisory: warnings only, not part of the stage's identity)"
                  if f.name in k.advisory else "")
      print(f"    {f.name}: {getattr(hints[f.name], '__name__', hints[f.name])}{default}"
            f"  -- {f.metadata.get('doc', '')}{advisory}")
  if args.json:
    print(json.dumps({n: kinds.settings_schema(k.settings_cls)
                      for n, k in kinds.registry().items()}, indent=2))
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ("train", "eval", "infer"):
    import importlib
    mod = importlib.import_module(f"palmflow.trainer.{argv[0]}")
    return mod.main([f"palmflow {argv[0]}"] + argv[1:]) or 0
  parser = argparse.ArgumentParser(prog="palmflow", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  for name, fn, what in (
      ("run", cmd_run, "run the stages that are not done (reusing the others, resuming training)"),
      ("plan", cmd_plan, "show which stages would run or be reused, and why; runs nothing"),
      ("validate", cmd_validate, "check a pipeline file and the files it names; runs nothing")):
    p = sub.add_parser(name, help=what, description=what)
    p.add_argument("file", help="the pipeline file (YAML)")
    if name != "validate":
      p.add_argument("--store",
                     help="output root (default $PALMFLOW_STORE or ./palmflow_store)")
    if name == "run":
      p.add_argument("--only", help="comma-separated stages to run; others are skipped (a "
                     "selected stage's upstream must be finished or selected too)")
    p.set_defaults(fn=fn)
  p = sub.add_parser("kinds", help="list the stage kinds, their inputs and settings")
  p.add_argument("--json", action="store_true", help="also print the JSON schemas")
  p.set_defaults(fn=cmd_kinds)
  sub.add_parser("train", help="t5x-compatible train binary (flags as t5x)")
  sub.add_parser("eval", help="t5x-compatible eval binary")
  sub.add_parser("infer", help="t5x-compatible infer binary")
  args = parser.parse_args(argv)
  try:
    return args.fn(args)
  except PalmflowError as e:
    print(f"palmflow: error: {e}", file=sys.stderr)
    return e.exit_code
  except BrokenPipeError:  # `palmflow plan ... | head`: the reader has what it wanted
    import os
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
  sys.exit(main())
