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
  """Registers the task in a `task.json`; returns its name."""
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except FileNotFoundError:
    from palmflow.errors import ConfigError
    raise ConfigError("task spec not found", path=path,
                      hint="pass the task.json of a finished blocks or dataset stage") from None
  return register_from_spec(spec)
