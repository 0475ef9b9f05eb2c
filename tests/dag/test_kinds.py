"""Every stage kind documents its settings and inputs, and `palmflow kinds` shows them."""
from __future__ import annotations

import dataclasses

from palmflow import cli
from palmflow.dag import kinds


def test_every_setting_and_slot_is_documented_and_has_a_schema():
  reg = kinds.registry()
  for name in ("corpus", "vocab", "blocks", "dataset", "mixture", "train", "eval", "report"):
    assert name in reg, name
  for name, kind in reg.items():
    if name.startswith("test_"):
      continue
    assert kind.doc, name
    for f in dataclasses.fields(kind.settings_cls):
      assert f.metadata.get("doc"), f"{name}.{f.name} has no doc"
    schema = kinds.settings_schema(kind.settings_cls)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(kind.settings_cls)}


def test_kinds_command_lists_settings(capsys):
  assert cli.main(["kinds"]) == 0
  out = capsys.readouterr().out
  assert "block_length: int = 512" in out and "input documents: documents" in out
  line = next(l for l in out.splitlines() if l.strip().startswith("planned_train_steps:"))
  assert "(advisory: warnings only, not part of the stage's identity)" in line
  line = next(l for l in out.splitlines() if l.strip().startswith("rate_by:"))
  assert "advisory" not in line
