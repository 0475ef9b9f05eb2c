"""Task lookup misses say which registration modules were imported and the closest names."""
from __future__ import annotations

import seqio
import pytest

from palmflow.errors import ConfigError
from palmflow.trainer import data as data_lib


def test_unknown_task_names_close_matches_and_modules():
  seqio.TaskRegistry.remove("lookup_probe_v001")
  seqio.TaskRegistry.add(
      "lookup_probe_v001",
      source=seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: None,
                                      splits=["train"]),
      output_features={})
  try:
    with pytest.raises(ConfigError) as e:
      data_lib.get_task_or_mixture("lookup_probe_v01", module="json")
    msg = str(e.value)
    assert "no seqio task or mixture named 'lookup_probe_v01'" in msg
    assert "lookup_probe_v001" in msg and "modules imported: json" in msg
    assert "--task_spec" in msg and e.value.exit_code == 2
  finally:
    seqio.TaskRegistry.remove("lookup_probe_v001")


def test_missing_task_spec_file_names_path(tmp_path):
  from tasks import specs
  with pytest.raises(ConfigError, match=str(tmp_path / "nope.json")):
    specs.register_from_file(str(tmp_path / "nope.json"))
