"""Registers seqio tasks from palmflow task spec files (`task.json` in a stage's output).

Stage outputs are fingerprinted directories, so their tasks are registered from the spec the
stage wrote rather than from a static module: `register_from_file(path)` reads the spec and
calls the matching declaration in `tasks.pretraining`, `tasks.downstream` or, for a
`"type": "mixture"` spec (the `mixture` stage's), `mixtures.pretraining`.
"""
from __future__ import annotations

import json


def register_from_spec(spec: dict) -> str:
  """Registers the task described by `spec`; returns its name."""
  kind = spec.get("type")
  if kind == "blocked_lm":
    from tasks.pretraining import register_blocked_lm
    register_blocked_lm(spec["name"], file_pattern=spec["file_pattern"],
                        vocab_path=spec["vocab_path"], block_length=spec["block_length"],
                        fmt=spec.get("format", "tfrecord"))
  elif kind == "mixture":
    from mixtures.pretraining import register_from_spec as register_mixture
    register_mixture(spec)
  elif kind == "text_to_text":
    from tasks.downstream import register_text_to_text
    register_text_to_text(spec["name"], files=spec["files"], vocab_path=spec["vocab_path"],
                          label_names=spec.get("label_names"), augment=spec.get("augment"))
  else:
    raise ValueError(f"unknown task spec type {kind!r} (known: blocked_lm, mixture, "
                     "text_to_text)")
  return spec["name"]


def register_from_file(path: str) -> str:
  """Registers the task in a `task.json`; returns its name.

  A missing or unreadable file, one that is not a JSON object, or a spec without a field its
  type needs (or of an unknown type) is a ConfigError naming the file (and the line, for
  JSON syntax).
  """
  from palmflow.errors import ConfigError
  hint = "pass the task.json of a finished blocks, dataset or mixture stage"
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise ConfigError("task spec not found", path=path, field="--task_spec",
                      hint=hint) from None
  except IsADirectoryError:
    raise ConfigError("task spec is a directory", path=path, field="--task_spec",
                      hint=f"{hint}, e.g. {path.rstrip('/')}/task.json") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"task spec is not valid JSON: {e}", path=path,
                      line=getattr(e, "lineno", None), field="--task_spec",
                      hint=hint) from None
  if not isinstance(spec, dict):
    raise ConfigError("task spec is not a JSON object", path=path, field="--task_spec",
                      hint=hint)
  try:
    return register_from_spec(spec)
  except KeyError as e:
    raise ConfigError(f"task spec of type {spec.get('type')!r} lacks the field {e}",
                      path=path, field=str(e.args[0]), hint=hint) from None
  except ValueError as e:  # an unknown type, or a value the task's declaration rejects
    raise ConfigError(str(e), path=path, hint=hint) from None
