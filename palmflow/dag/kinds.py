"""Stage kinds: a name, a frozen settings dataclass, typed input slots and a run function.

A stage kind declares everything the validator and the fingerprint need without importing
heavy libraries: settings are a frozen dataclass whose fields carry their documentation,
inputs are slots that accept upstream outputs of given types. `run()` does the work and
may import TensorFlow, Beam or JAX lazily.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping


def setting(default: Any = dataclasses.MISSING, *, doc: str,
            default_factory: Any = dataclasses.MISSING):
  """A settings field with its documentation (shown by `palmflow kinds`)."""
  kw = {"metadata": {"doc": doc}}
  if default_factory is not dataclasses.MISSING:
    return dataclasses.field(default_factory=default_factory, **kw)
  return dataclasses.field(default=default, **kw)


@dataclasses.dataclass(frozen=True)
class Slot:
  """An input slot: which upstream output types it accepts."""

  accepts: tuple[str, ...]
  required: bool = True
  many: bool = False  # takes a list of stages
  doc: str = ""


@dataclasses.dataclass
class Upstream:
  """A finished upstream stage as seen by a downstream one."""

  name: str
  kind: str
  fingerprint: str
  path: Path
  manifest: dict


@dataclasses.dataclass
class StageContext:
  """What a running stage gets: its settings, inputs, output dir and placement."""

  name: str
  pipeline: str
  out_dir: Path
  settings: Any
  inputs: dict[str, Upstream | list[Upstream]]
  placement: Mapping[str, Any]
  fingerprint: str
  all_upstream: dict[str, Upstream]
  log: Callable[[str], None]
  store_root: Path
  base_dir: Path          # the pipeline file's folder: relative settings paths start here


class StageKind(abc.ABC):
  """Base class of stage kinds. Subclasses set the class attributes and `run`."""

  kind: ClassVar[str]
  version: ClassVar[str] = "1"  # bump when the kind's output changes for the same settings
  produces: ClassVar[str]
  settings_cls: ClassVar[type]
  slots: ClassVar[Mapping[str, Slot]] = {}
  resumable: ClassVar[bool] = False  # a partial output dir is resumed rather than wiped
  runs_beam: ClassVar[bool] = False  # runs Beam jobs (through `stages.common.beam_args`)
  doc: ClassVar[str] = ""
  # Settings that change what the stage warns about, not what it writes (e.g. a mixture's
  # planned run): the identity holds their defaults whatever they are set to (see
  # `executor.stage_identity`), so changing one reruns nothing downstream; `advise` checks
  # them again whenever the stage is reused.
  advisory: ClassVar[tuple[str, ...]] = ()

  def advise(self, settings: Any, inputs: Mapping[str, Any]) -> list[str]:
    """Warnings about the `advisory` settings, for a finished stage that is reused.

    Args:
      settings: the validated settings dataclass.
      inputs: slot -> `Upstream` (or a list of them), as `StageContext.inputs`.
    Returns:
      Warning messages (the executor logs them).
    """
    del settings, inputs
    return []

  def identity(self, settings: Any, *, base_dir: Path) -> dict:
    """The semantic settings that define this stage's output (hashed into its fingerprint).

    Args:
      settings: the validated settings dataclass.
      base_dir: the pipeline file's folder (relative paths are resolved against it).
    Returns:
      A JSON-able dict. Placement (runner, machine, bucket) never belongs here.
    """
    del base_dir
    return dataclasses.asdict(settings)

  def check_inputs(self, settings: Any, inputs: Mapping[str, Any]) -> None:
    """Checks settings that refer to the stage's inputs, when the pipeline file is loaded.

    Args:
      settings: the validated settings dataclass.
      inputs: slot -> upstream stage name (or a list of names), as written in the file.
    Raises:
      ValueError: "<settings field>: <what is wrong>" (reported with the file and line).
    """
    del settings, inputs

  @abc.abstractmethod
  def run(self, ctx: StageContext) -> dict:
    """Runs the stage, writing into ctx.out_dir; returns a summary for the manifest."""


_KIND_MODULES = (
    "palmflow.stages.corpus",
    "palmflow.stages.vocab",
    "palmflow.stages.blocks",
    "palmflow.stages.mixture",
    "palmflow.stages.dataset",
    "palmflow.stages.train",
    "palmflow.stages.evaluate",
    "palmflow.stages.report",
)
_REGISTRY: dict[str, StageKind] = {}


def register(cls: type[StageKind]) -> type[StageKind]:
  """Class decorator adding a stage kind to the registry."""
  _REGISTRY[cls.kind] = cls()
  return cls


def registry() -> dict[str, StageKind]:
  """All stage kinds, importing the built-in kind modules on first use."""
  if not _REGISTRY or not all(m in _loaded for m in _KIND_MODULES):
    for m in _KIND_MODULES:
      if m not in _loaded:
        importlib.import_module(m)
        _loaded.add(m)
  return _REGISTRY


_loaded: set[str] = set()


# ---------------------------------------------------------------- settings schema
def _json_type(tp: Any) -> dict:
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return {}
  if origin in (typing.Union, types.UnionType):
    return {"anyOf": [_json_type(a) for a in args]}
  if tp is type(None):
    return {"type": "null"}
  if tp is bool:
    return {"type": "boolean"}
  if tp is int:
    return {"type": "integer"}
  if tp is float:
    return {"type": "number"}
  if tp is str:
    return {"type": "string"}
  if origin in (list, tuple) or tp in (list, tuple):
    schema: dict = {"type": "array"}
    if args and args[-1] is not Ellipsis:
      schema["items"] = _json_type(args[0])
    elif args:
      schema["items"] = _json_type(args[0])
    return schema
  if origin is dict or tp is dict:
    schema = {"type": "object"}
    if len(args) == 2:
      schema["additionalProperties"] = _json_type(args[1])
    return schema
  if typing.get_origin(tp) is typing.Literal:
    return {"enum": list(args)}
  raise TypeError(f"no JSON schema for settings type {tp!r}")


def settings_schema(cls: type) -> dict:
  """A JSON schema for a settings dataclass (no unknown fields, typed values)."""
  hints = typing.get_type_hints(cls)
  props, required = {}, []
  for f in dataclasses.fields(cls):
    props[f.name] = dict(_json_type(hints[f.name]),
                         description=f.metadata.get("doc", ""))
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
      required.append(f.name)
  return {"type": "object", "properties": props, "required": required,
          "additionalProperties": False}


def build_settings(cls: type, raw: Mapping[str, Any]) -> Any:
  """Builds the frozen settings dataclass (lists become tuples so it hashes)."""
  def freeze(v):
    if isinstance(v, list):
      return tuple(freeze(x) for x in v)
    return v
  return cls(**{k: freeze(v) for k, v in raw.items()})
