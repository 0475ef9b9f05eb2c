"""The pipeline file: loading, schema validation and the stage graph.

A pipeline file is YAML:

    pipeline: stdlib_demo            # a name (letters, digits, _)
    placement:                       # where things run; never part of a stage's identity
      beam: {runner: DirectRunner, options: {direct_num_workers: 1}}
      train: {env: {}}
    stages:
      corpus: {kind: corpus, settings: {sources: [{name: stdlib, format: python_stdlib}]}}
      vocab:  {kind: vocab, inputs: {documents: corpus}, settings: {vocab_size: 4000}}

Every error names the file, the line, the stage and the field, and is raised before anything
runs (`ConfigError`, exit code 2).
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from palmflow.dag import kinds as kinds_lib
from palmflow.errors import ConfigError

NAME_RE = r"^[A-Za-z][A-Za-z0-9_]*$"

TOP_SCHEMA = {
    "type": "object",
    "properties": {
        "pipeline": {"type": "string", "pattern": NAME_RE,
                     "description": "The pipeline's name."},
        "description": {"type": "string"},
        "placement": {
            "type": "object",
            "description": "Runner settings (Beam runner and options; the training "
                           "binaries' environment and extra flags). "
                           "Not part of any stage's identity.",
            "properties": {
                "beam": {"type": "object", "properties": {
                    "runner": {"type": "string"},
                    "options": {"type": "object"},
                    "worker_pool": {
                        "type": "boolean",
                        "description": "DirectRunner multi_processing: run every Beam "
                                       "stage's workers in one warm pool of processes "
                                       "(default true)"}},
                    "additionalProperties": False},
                "train": {"type": "object", "properties": {
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "extra_flags": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False},
            },
            "additionalProperties": False,
        },
        "stages": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": NAME_RE},
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "kind": {"type": "string"},
                    "description": {"type": "string"},
                    "inputs": {"type": "object", "additionalProperties": {
                        "anyOf": [{"type": "string"},
                                  {"type": "array", "items": {"type": "string"},
                                   "minItems": 1}]}},
                    "settings": {"type": "object"},
                },
                "required": ["kind"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["pipeline", "stages"],
    "additionalProperties": False,
}


@dataclasses.dataclass
class Stage:
  name: str
  kind: str
  settings: Any                      # the kind's frozen settings dataclass
  inputs: dict[str, str | list[str]]  # slot -> upstream stage name(s)
  line: int | None = None

  def upstream_names(self) -> list[str]:
    out = []
    for v in self.inputs.values():
      out.extend(v if isinstance(v, list) else [v])
    return out


@dataclasses.dataclass
class Pipeline:
  name: str
  path: Path
  stages: dict[str, Stage]
  order: list[str]          # topological order, stable w.r.t. file order
  placement: dict[str, Any]
  raw: dict

  @property
  def base_dir(self) -> Path:
    return self.path.parent


# ------------------------------------------------------------------ line numbers
def _line_map(text: str) -> dict[tuple, int]:
  """Maps each key path (tuple of keys/indices) to its 1-based line in the YAML text."""
  out: dict[tuple, int] = {}

  def walk(node, path):
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
      for k, v in node.value:
        out[path + (k.value,)] = k.start_mark.line + 1
        walk(v, path + (k.value,))
    elif isinstance(node, yaml.SequenceNode):
      for i, v in enumerate(node.value):
        walk(v, path + (i,))
  try:
    root = yaml.compose(text, Loader=yaml.SafeLoader)
  except yaml.YAMLError:
    return out
  if root is not None:
    walk(root, ())
  return out


def _closest(word: str, options) -> str | None:
  m = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
  return ("did you mean " + " or ".join(f"'{x}'" for x in m) + "?") if m else None


def load(path: str | Path) -> Pipeline:
  """Loads and validates a pipeline file.

  Args:
    path: the YAML file.
  Returns:
    A validated `Pipeline` whose stages carry built settings dataclasses.
  Raises:
    ConfigError: naming the file, line, stage and field of the first problem.
  """
  path = Path(path)
  if not path.exists():
    raise ConfigError("pipeline file not found", path=str(path),
                      hint="pass the path of a pipeline YAML file, e.g. "
                           "pipelines/examples/stdlib_demo.yaml")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    line = path.read_bytes()[:e.start].count(b"\n") + 1
    raise ConfigError(f"not UTF-8 text (byte {e.start})", path=str(path), line=line,
                      hint="save the pipeline file as UTF-8") from None
  except OSError as e:  # a folder, no permission
    raise ConfigError(f"cannot read the pipeline file: {e.strerror or e}", path=str(path),
                      hint="pass the path of a pipeline YAML file") from None
  try:
    raw = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    raise ConfigError(f"not valid YAML: {getattr(e, 'problem', e)}", path=str(path),
                      line=mark.line + 1 if mark else None) from None
  lines = _line_map(text)
  return from_dict(raw, path=path, lines=lines)


def from_dict(raw: Any, *, path: Path, lines: dict[tuple, int] | None = None) -> Pipeline:
  """Validates an already-parsed pipeline dict (see `load`)."""
  lines = lines or {}
  spath = str(path)

  def err(msg, keypath=(), stage=None, field=None, hint=None):
    line = None
    kp = tuple(keypath)
    while kp and kp not in lines:
      kp = kp[:-1]
    line = lines.get(kp)
    return ConfigError(msg, path=spath, line=line, stage=stage, field=field, hint=hint)

  if not isinstance(raw, dict):
    raise err("the file must be a mapping with 'pipeline' and 'stages'")
  validator = jsonschema.Draft202012Validator(TOP_SCHEMA)
  for e in sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.path))):
    kp = tuple(e.path)
    stage = kp[1] if len(kp) >= 2 and kp[0] == "stages" else None
    if e.validator == "additionalProperties":
      extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
      hint = _closest(extra[0], e.schema.get("properties", {})) if extra else None
      field = ".".join(map(str, kp[2:] + (extra[0],))) if stage else ".".join(
          map(str, kp + (extra[0],)))
      raise err(f"unknown field '{extra[0]}' (allowed: "
                f"{', '.join(e.schema.get('properties', {}))})", kp + tuple(extra[:1]),
                stage=stage, field=field, hint=hint)
    field = ".".join(map(str, kp[2:] if stage else kp)) or None
    raise err(e.message, kp, stage=stage, field=field)

  registry = kinds_lib.registry()
  stages: dict[str, Stage] = {}
  for name, body in raw["stages"].items():
    kp = ("stages", name)
    kind = registry.get(body["kind"])
    if kind is None:
      raise err(f"unknown stage kind '{body['kind']}' (known: {', '.join(sorted(registry))})",
                kp + ("kind",), stage=name, field="kind",
                hint=_closest(body["kind"], registry))
    settings_raw = body.get("settings") or {}
    schema = kinds_lib.settings_schema(kind.settings_cls)
    for e in sorted(jsonschema.Draft202012Validator(schema).iter_errors(settings_raw),
                    key=lambda e: list(map(str, e.path))):
      skp = tuple(e.path)
      if e.validator == "additionalProperties" and not skp:
        extra = sorted(set(e.instance) - set(schema["properties"]))[0]
        raise err(f"unknown setting '{extra}' for kind '{body['kind']}'",
                  kp + ("settings", extra), stage=name, field=f"settings.{extra}",
                  hint=_closest(extra, schema["properties"]) or
                  f"valid settings: {', '.join(schema['properties'])}")
      if e.validator == "required":
        missing = e.message.split("'")[1]
        raise err(f"missing required setting '{missing}'", kp + ("settings",), stage=name,
                  field=f"settings.{missing}",
                  hint=schema["properties"][missing].get("description"))
      fld = "settings." + ".".join(map(str, skp)) if skp else "settings"
      raise err(f"{e.message}", kp + ("settings",) + skp, stage=name, field=fld)
    try:
      settings = kinds_lib.build_settings(kind.settings_cls, settings_raw)
    except (TypeError, ValueError) as ex:
      raise err(str(ex), kp + ("settings",), stage=name, field="settings") from None
    check = getattr(settings, "validate", None)
    if check:
      try:
        check()
      except ValueError as ex:
        fld, _, msg = str(ex).partition(": ")
        raise err(msg or fld, kp + ("settings", fld), stage=name,
                  field=f"settings.{fld}") from None
    inputs = dict(body.get("inputs") or {})
    for slot in inputs:
      if slot not in kind.slots:
        raise err(f"kind '{body['kind']}' has no input '{slot}' (inputs: "
                  f"{', '.join(kind.slots) or 'none'})", kp + ("inputs", slot),
                  stage=name, field=f"inputs.{slot}", hint=_closest(slot, kind.slots))
    for slot, spec in kind.slots.items():
      if spec.required and slot not in inputs:
        raise err(f"missing input '{slot}' (accepts a stage producing "
                  f"{' or '.join(spec.accepts)})", kp + ("inputs",), stage=name,
                  field=f"inputs.{slot}")
      if slot in inputs and isinstance(inputs[slot], list) and not spec.many:
        raise err(f"input '{slot}' takes one stage, not a list", kp + ("inputs", slot),
                  stage=name, field=f"inputs.{slot}")
      if isinstance(inputs.get(slot), list) and len(set(inputs[slot])) != len(inputs[slot]):
        raise err(f"input '{slot}' lists a stage twice: {inputs[slot]}", kp + ("inputs", slot),
                  stage=name, field=f"inputs.{slot}")
    try:
      kind.check_inputs(settings, inputs)
    except ValueError as ex:
      fld, _, msg = str(ex).partition(": ")
      raise err(msg or fld, kp + ("settings", fld), stage=name,
                field=f"settings.{fld}") from None
    stages[name] = Stage(name=name, kind=body["kind"], settings=settings, inputs=inputs,
                         line=lines.get(kp))

  # references, then cycles, then types
  for st in stages.values():
    for slot, ref in st.inputs.items():
      for r in (ref if isinstance(ref, list) else [ref]):
        if r not in stages:
          raise err(f"input '{slot}' refers to stage '{r}', which is not in the file",
                    ("stages", st.name, "inputs", slot), stage=st.name,
                    field=f"inputs.{slot}", hint=_closest(r, stages))
  order = _toposort(stages, err)
  for st in stages.values():
    kind = registry[st.kind]
    for slot, ref in st.inputs.items():
      for r in (ref if isinstance(ref, list) else [ref]):
        kp = ("stages", st.name, "inputs", slot)
        produced = registry[stages[r].kind].produces
        if produced not in kind.slots[slot].accepts:
          raise err(f"input '{slot}' needs a stage producing "
                    f"{' or '.join(kind.slots[slot].accepts)}, but '{r}' ({stages[r].kind}) "
                    f"produces {produced}", kp, stage=st.name, field=f"inputs.{slot}")
  return Pipeline(name=raw["pipeline"], path=path.resolve(), stages=stages, order=order,
                  placement=raw.get("placement") or {}, raw=raw)


def _toposort(stages: dict[str, Stage], err) -> list[str]:
  state: dict[str, int] = {}
  order: list[str] = []

  def visit(n, chain):
    if state.get(n) == 2:
      return
    if state.get(n) == 1:
      cyc = chain[chain.index(n):] + [n]
      raise err("the stages form a cycle: " + " -> ".join(cyc), ("stages", n), stage=n,
                field="inputs", hint="remove one of these inputs")
    state[n] = 1
    for u in stages[n].upstream_names():
      visit(u, chain + [n])
    state[n] = 2
    order.append(n)

  for n in stages:
    visit(n, [])
  return order


def downstream_of(pipeline: Pipeline, name: str) -> set[str]:
  """Names of every stage that (transitively) consumes `name`."""
  out: set[str] = set()
  changed = True
  while changed:
    changed = False
    for st in pipeline.stages.values():
      if st.name not in out and ({name} | out) & set(st.upstream_names()):
        out.add(st.name)
        changed = True
  return out

