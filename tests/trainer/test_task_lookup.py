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


@pytest.mark.parametrize("content, message", [
    ('{"type": "blocked_lm",\n "name": "x",, }', r":2, .*task spec is not valid JSON"),
    ('["blocked_lm"]', "task spec is not a JSON object"),
    ('{"type": "blocked_lm", "name": "x"}', "type 'blocked_lm' lacks the field 'file_pattern'"),
    ('{"type": "blocked_llm", "name": "x"}', "unknown task spec type 'blocked_llm'"),
])
def test_bad_task_spec_files_are_config_errors_naming_the_file(tmp_path, content, message):
  from tasks import specs
  path = tmp_path / "task.json"
  path.write_text(content)
  with pytest.raises(ConfigError, match=f"{path}{message}" if message.startswith(":")
                     else message) as e:
    specs.register_from_file(str(path))
  assert str(path) in str(e.value)
  with pytest.raises(ConfigError, match="task spec is a directory"):
    specs.register_from_file(str(tmp_path))


def test_mixture_or_task_module_reaches_the_datasets_and_a_missing_one_is_named():
  """MIXTURE_OR_TASK_MODULE (t5x's macro) sets the registration module of the training and
  training-eval datasets; a module that cannot be imported is a ConfigError."""
  import gin
  from palmflow.trainer import gin_utils
  gin.clear_config()
  try:
    gin_utils.parse(["runs/pretrain.gin", "models/palm_tiny.gin"],
                    ["MIXTURE_OR_TASK_MODULE = 'json'", "MIXTURE_OR_TASK_NAME = 't'",
                     "TRAIN_EVAL_MIXTURE_OR_TASK_NAME = 't'",
                     "TASK_FEATURE_LENGTHS = {'targets': 8}"])
    with gin.config_scope("train"):
      assert gin.get_configurable(data_lib.DatasetConfig)().module == "json"
    with gin.config_scope("train_eval"):
      assert gin.get_configurable(data_lib.data_config_or_none)().module == "json"
  finally:
    gin.clear_config()
  with pytest.raises(ConfigError, match="field 'MIXTURE_OR_TASK_MODULE': cannot import task "
                                        "module 'no_such_tasks_module'"):
    data_lib.get_task_or_mixture("t", module="no_such_tasks_module")
