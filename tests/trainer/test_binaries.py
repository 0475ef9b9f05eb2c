"""The t5x surface of the train binary: --gin_file / --gin.NAME=VALUE / --gin_bindings /
--gin_search_paths, config.gin and model-info.txt in MODEL_DIR, TRAIN_STEPS as an absolute
step when fine-tuning, clear exits for misspelt macros and mismatched checkpoints, and run
files whose "Required" headers tell the truth."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from palmflow.trainer import checkpoints as ckpt_lib
from palmflow.trainer import gin_utils
from tiny_text_task import LENGTHS, PAIRS, REPO, make_task, model_flags, run_binary

TASK = "pf_binaries_map"
RUNS = sorted((REPO / "gin" / "runs").glob("*.gin"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 4-step run configured by a gin file found only through --gin_search_paths."""
  root = tmp_path_factory.mktemp("binaries")
  task_json = make_task(root / "data", TASK)
  configs = root / "configs"
  configs.mkdir()
  (configs / "my_experiment.gin").write_text(
      "include 'runs/pretrain.gin'\n"
      "include 'models/palm_tiny.gin'\n"
      "VOCAB_SIZE = 64\nBATCH_SIZE = 8\nFEATURE_CONVERTER = 'prefix_lm'\n"
      "CHECKPOINT_PERIOD = 2\n"
      "checkpoints.SaveCheckpointConfig.checkpoint_steps = [3]\n")
  model_dir = root / "pretrain"
  rc = run_binary("train", [
      "--gin_file=my_experiment.gin", f"--gin_search_paths={configs}",
      f"--task_spec={task_json}", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
      f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.TRAIN_STEPS=4",
      f"--gin.MODEL_DIR='{model_dir}'", "--gin_bindings=train_lib.train.log_every = 1"])
  assert rc == 0
  return root, task_json, model_dir


def _tensorboard_tags(directory: Path) -> set[str]:
  import tensorflow as tf
  return {v.tag for f in directory.glob("events.out.tfevents.*")
          for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value}


def _metric_steps(model_dir: Path) -> list[int]:
  lines = (model_dir / "train" / "metrics.jsonl").read_text().splitlines()
  return [json.loads(l)["step"] for l in lines]


def test_gin_files_bindings_and_search_paths(pretrained):
  _, _, model_dir = pretrained
  # CHECKPOINT_PERIOD and checkpoint_steps from the file
  assert ckpt_lib.finished_steps(model_dir) == [2, 3, 4]
  assert _metric_steps(model_dir) == [1, 2, 3, 4]               # the --gin_bindings override
  config = (model_dir / "config.gin").read_text()
  for line in ("TRAIN_STEPS = 4", "VOCAB_SIZE = 64", "BATCH_SIZE = 8",
               f"MIXTURE_OR_TASK_NAME = '{TASK}'"):
    assert re.search(rf"^{re.escape(line)}$", config, re.M), line


def test_model_info_lists_every_parameter_with_shape_and_partition_spec(pretrained):
  _, _, model_dir = pretrained
  info = (model_dir / "model-info.txt").read_text()
  params = ckpt_lib._flat(ckpt_lib.load_params(ckpt_lib.step_dir(model_dir, 4)))
  assert len(params) >= 8
  for name, value in params.items():
    shape = "(" + ", ".join(str(d) for d in value.shape) + ("," if value.ndim == 1 else "") + ")"
    row = re.search(rf"^\s+{re.escape(name)}\s+{re.escape(shape)}\s+float32\s+(\(.*?\))\s+"
                    rf"(\(.*?\))\s", info, re.M)
    assert row, f"{name} {shape} is not in model-info.txt:\n{info}"
    logical, mesh = row.groups()
    assert logical.count(",") == mesh.count(",") == value.ndim - 1, row[0]
  assert "Mesh: data=" in info


def _finetune(pretrained, model_dir: Path, *extra: str, task_json=None, task=TASK) -> int:
  _, default_json, pre = pretrained
  return run_binary("train", [
      "--gin_file=runs/finetune.gin", *model_flags(task_json or default_json, task),
      f"--gin.INITIAL_CHECKPOINT_PATH='{ckpt_lib.step_dir(pre, 4)}'",
      f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_EVAL_MIXTURE_OR_TASK_NAME=None",
      "--gin.LOG_EVERY=1", *extra])


def test_the_test_twin_of_finetune_checkpoints_evaluates_and_logs_every_step_or_two(
    pretrained, tmp_path):
  """runs/test_finetune.gin is finetune.gin sized for a smoke test: given only what its
  header requires, 4 steps from the checkpoint at 4 log every step, checkpoint and evaluate
  (training loss and the task's metrics on decoded predictions) every 2 steps."""
  _, task_json, pre = pretrained
  assert run_binary("train", [
      "--gin_file=runs/test_finetune.gin", "--gin_file=models/palm_tiny.gin",
      f"--task_spec={task_json}", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
      f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.VOCAB_SIZE=64", "--gin.TRAIN_STEPS=8",
      f"--gin.INITIAL_CHECKPOINT_PATH='{ckpt_lib.step_dir(pre, 4)}'",
      f"--gin.MODEL_DIR='{tmp_path}'"]) == 0
  assert _metric_steps(tmp_path) == [5, 6, 7, 8]
  assert ckpt_lib.finished_steps(tmp_path) == [6, 8]
  evals = (tmp_path / "training_eval" / TASK / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in evals] == [6, 8]
  inferred = (tmp_path / "inference_eval" / f"{TASK}-metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in inferred] == [6, 8]
  rows = (tmp_path / "inference_eval" / f"{TASK}-000008.jsonl").read_text().splitlines()
  assert len(rows) == len(PAIRS)                  # the whole split: 4 examples, under 8
  config = (tmp_path / "config.gin").read_text()
  assert re.search(r"^BATCH_SIZE = 8$", config, re.M) and "DROPOUT_RATE = 0.1" in config


def test_fine_tuning_with_adamw_is_one_flag(pretrained, tmp_path):
  """Another optimizer for fine-tuning (t5x#569): the model file binds AdamW's schedule, so
  --gin.OPTIMIZER=@optimizers.adamw() is all it takes; the parameters are restored and
  AdamW's moments start from scratch (model-info.txt lists them)."""
  assert _finetune(pretrained, tmp_path, "--gin.TRAIN_STEPS=6",
                   "--gin.OPTIMIZER=@optimizers.adamw()", "--gin.BASE_LEARNING_RATE=0.1") == 0
  rows = [json.loads(l) for l in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["learning_rate"] == pytest.approx(1e-3)     # 0.1 / sqrt(10000)
  state = (tmp_path / "model-info.txt").read_text().split("Optimizer state")[1]
  assert re.search(r"\bmu/embedding ", state) and re.search(r"\bnu/embedding ", state), state
  assert "v_row" not in state and _metric_steps(tmp_path) == [5, 6]


def test_rates_count_the_steps_since_the_last_log_line_off_the_log_grid(pretrained, tmp_path):
  """Fine-tuning from step 4 with LOG_EVERY=3 logs at 6 (2 steps ran) and at the final 7
  (1 step ran): the rates count those steps, not LOG_EVERY (which read 3, and 0 at the
  end, so the last line showed 0 steps/s)."""
  assert _finetune(pretrained, tmp_path, "--gin.TRAIN_STEPS=7", "--gin.LOG_EVERY=3") == 0
  rows = [json.loads(l) for l in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [6, 7]
  for r in rows:
    assert r["steps_per_second"] > 0, r
    # BATCH_SIZE 8 of inputs 12 + targets 8
    assert r["tokens_per_second"] == pytest.approx(r["steps_per_second"] * 8 * 20)
    # the targets the loss counts, over the same steps: fewer than the positions
    assert 0 < r["target_tokens_per_second"] < r["tokens_per_second"] / 2


def test_train_steps_is_absolute_when_fine_tuning(pretrained, tmp_path, caplog):
  # Stop after one step (a checkpoint is saved there), then rerun: the run resumes from
  # MODEL_DIR's checkpoint, not from INITIAL_CHECKPOINT_PATH, and stops at TRAIN_STEPS.
  assert _finetune(pretrained, tmp_path, "--gin.TRAIN_STEPS=6",
                   "--gin_bindings=train_lib.train.stop_after_steps = 1") == 0
  assert ckpt_lib.finished_steps(tmp_path) == [5]
  caplog.set_level("INFO", logger="palmflow")
  assert _finetune(pretrained, tmp_path, "--gin.TRAIN_STEPS=6") == 0
  assert f"resuming from {ckpt_lib.step_dir(tmp_path, 5)}" in caplog.text
  result = json.loads((tmp_path / "train_result.json").read_text())
  assert result["step"] == 6
  assert _metric_steps(tmp_path) == [5, 6]          # 2 steps ran, from the checkpoint's step 4
  assert ckpt_lib.finished_steps(tmp_path) == [5, 6]
  meta = ckpt_lib.read_meta(ckpt_lib.step_dir(tmp_path, 6))
  assert meta["data_batches_consumed"] == 2          # fine-tuning data started afresh at 4


def test_fine_tuning_evaluates_the_predictions_every_eval_period(pretrained, tmp_path):
  """t5x's inference evaluation in finetune.gin: the task's metrics on decoded predictions
  every EVAL_PERIOD steps and at the end, in MODEL_DIR/inference_eval/."""
  flags = ["--gin.TRAIN_STEPS=6", "--gin.EVAL_PERIOD=5", "--gin.JSON_WRITE_N_RESULTS=3",
           f"--gin.INFER_EVAL_MIXTURE_OR_TASK_NAME='{TASK}'",
           f"--gin.TRAIN_EVAL_MIXTURE_OR_TASK_NAME='{TASK}'"]
  assert _finetune(pretrained, tmp_path, *flags) == 0
  out = tmp_path / "inference_eval"
  lines = (out / f"{TASK}-metrics.jsonl").read_text().splitlines()
  metrics = [json.loads(l) for l in lines]
  assert [m["step"] for m in metrics] == [5, 6]
  assert all(0 <= m["accuracy"] <= 100 for m in metrics), metrics
  rows = [json.loads(l) for l in (out / f"{TASK}-000006.jsonl").read_text().splitlines()]
  assert len(rows) == 3                                   # JSON_WRITE_N_RESULTS
  assert {"input", "prediction", "target"} <= set(rows[0])          # seqio's JSONLogger layout
  assert rows[0]["input"]["inputs_pretokenized"] in [a for a, _ in PAIRS]
  assert "eval/accuracy" in _tensorboard_tags(out / TASK)         # seqio's TensorBoardLogger
  result = json.loads((tmp_path / "train_result.json").read_text())
  assert result["infer_eval"][TASK]["accuracy"] == metrics[-1]["accuracy"]
  # What a run wrote beyond the step it resumes from is dropped (it will be evaluated again).
  with open(out / f"{TASK}-metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 9, "accuracy": 1.0}) + "\n")
  (out / f"{TASK}-000009.jsonl").write_text("{}\n")
  assert _finetune(pretrained, tmp_path, *flags) == 0   # resumes at 6: nothing to train
  lines = (out / f"{TASK}-metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [5, 6]
  assert not (out / f"{TASK}-000009.jsonl").exists() and (out / f"{TASK}-000006.jsonl").exists()
  # ... and a resumed run reports the results logged at its step (a run resumed at its end
  # reported nothing: the stage read "loss nan").
  rerun = json.loads((tmp_path / "train_result.json").read_text())
  assert rerun["infer_eval"] == result["infer_eval"] and rerun["train"]["loss"] > 0
  assert rerun["train"] == result["train"] and rerun["eval"] == result["eval"]
  written = (out / f"{TASK}-000006.jsonl").stat().st_mtime_ns
  # Killed while decoding step 6 (its checkpoint was saved before): the rerun evaluates it.
  (out / f"{TASK}-000006.jsonl").unlink()
  (out / f"{TASK}-metrics.jsonl").write_text(lines[0] + "\n")
  training_eval = tmp_path / "training_eval" / TASK / "metrics.jsonl"
  training_eval.write_text(training_eval.read_text().splitlines()[0] + "\n")
  assert _finetune(pretrained, tmp_path, *flags) == 0
  lines = (out / f"{TASK}-metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [5, 6]
  assert (out / f"{TASK}-000006.jsonl").stat().st_mtime_ns != written
  assert [json.loads(l)["step"] for l in training_eval.read_text().splitlines()] == [5, 6]
  again = json.loads((tmp_path / "train_result.json").read_text())
  assert again["infer_eval"] == result["infer_eval"] and again["eval"] == result["eval"]


def test_train_steps_not_beyond_the_checkpoint_is_an_error(pretrained, tmp_path, capsys):
  assert _finetune(pretrained, tmp_path, "--gin.TRAIN_STEPS=4") == 2
  err = capsys.readouterr().err
  assert "TRAIN_STEPS=4 is not beyond the initial checkpoint's step 4" in err
  assert "TRAIN_STEPS is absolute" in err


def test_fine_tuning_with_another_vocabulary_size_names_the_parameter(pretrained, tmp_path,
                                                                       capsys):
  assert _finetune(pretrained, tmp_path, "--gin.TRAIN_STEPS=6", "--gin.VOCAB_SIZE=128") == 2
  err = capsys.readouterr().err
  assert ("parameter embedding has shape (64, 128) in the checkpoint but (128, 128) in the "
          "model" in err), err


def test_an_assignment_map_trains_a_resized_embedding_from_scratch(pretrained, tmp_path):
  """t5x's assignment_map through gin: the embedding (another size now) is not restored and
  starts from its initialization; every other parameter is the checkpoint's."""
  assert _finetune(
      pretrained, tmp_path, "--gin.TRAIN_STEPS=5", "--gin.VOCAB_SIZE=128",
      "--gin_bindings=checkpoints.RestoreCheckpointConfig.assignment_map = "
      "[('embedding', None)]",
      "--gin_bindings=checkpoints.RestoreCheckpointConfig.strict = False") == 0
  _, _, pre = pretrained
  before = ckpt_lib._flat(ckpt_lib.load_params(ckpt_lib.step_dir(pre, 4)))
  after = ckpt_lib._flat(ckpt_lib.load_params(ckpt_lib.step_dir(tmp_path, 5)))
  assert before["embedding"].shape == (64, 128) and after["embedding"].shape == (128, 128)
  assert set(before) == set(after)
  # One fine-tuning step moved the restored parameters a little, not to somewhere else.
  for name in before:
    if name != "embedding":
      rel = abs(after[name] - before[name]).max() / (abs(before[name]).max() + 1e-12)
      assert 0 < rel < 0.1, (name, rel)


def test_restoring_parameters_in_another_dtype_for_training_is_refused(pretrained, tmp_path,
                                                                         capsys):
  assert _finetune(pretrained, tmp_path, "--gin.TRAIN_STEPS=5",
                   "--gin_bindings=checkpoints.RestoreCheckpointConfig.dtype = 'bfloat16'") == 2
  err = capsys.readouterr().err
  assert ("field 'RestoreCheckpointConfig.dtype': restoring parameters as bfloat16 into a "
          "model whose parameters are float32" in err), err
  assert not ckpt_lib.finished_steps(tmp_path)


def test_fine_tuning_with_another_vocabulary_names_the_embedding(pretrained, tmp_path, capsys):
  other = make_task(tmp_path / "other", TASK + "_other_vocab",
                    pairs=[(b, a) for a, b in PAIRS], extra_vocab_text="zebra quartz jumps")
  assert _finetune(pretrained, tmp_path / "run", "--gin.TRAIN_STEPS=6", task_json=other,
                   task=TASK + "_other_vocab") == 2
  err = capsys.readouterr().err
  assert "parameter embedding was trained with vocabulary" in err, err


def test_misspelt_macro_exits_2_naming_the_closest(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "palmflow.cli", "train", "--gin_file=runs/pretrain.gin",
       "--gin_file=models/palm_tiny.gin", "--gin.TRAIN_STEP=5",
       f"--gin.MODEL_DIR='{tmp_path}'"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "macro TRAIN_STEP is not used by any gin file" in proc.stderr
  assert "did you mean TRAIN_STEPS" in proc.stderr
  assert not list(tmp_path.iterdir())                # nothing ran


def test_missing_required_settings_exit_2_naming_them(tmp_path, capsys):
  """A `%gin.REQUIRED` macro left unset is named before anything runs (gin itself would
  report it only on finalizing, which the binaries do not do)."""
  rc = run_binary("train", ["--gin_file=runs/pretrain.gin", "--gin_file=models/palm_tiny.gin",
                            f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=5"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert ("required settings not given: MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS"
          in err), err
  assert "'Required' header of pretrain.gin" in err
  assert not (tmp_path / "run").exists()              # nothing ran, nothing was written


@pytest.mark.parametrize("binary,run_file,macro", [
    ("train", "runs/test_pretrain.gin", "MODEL_DIR"),
    ("train", "runs/test_finetune.gin", "INITIAL_CHECKPOINT_PATH"),
    ("eval", "runs/test_eval.gin", "EVAL_OUTPUT_DIR"),
    ("infer", "runs/test_infer.gin", "CHECKPOINT_PATH")])
def test_a_cloud_storage_path_is_refused_before_anything_is_written(
    binary, run_file, macro, tmp_path, capsys, monkeypatch):
  """A gs:// path would become a local folder named 'gs:' (pathlib), and the run would seem
  to work: it is refused naming the flag, with what to do, and nothing is written."""
  monkeypatch.chdir(tmp_path)
  settings = {"MODEL_DIR": f"'{tmp_path / 'run'}'", "CHECKPOINT_PATH": f"'{tmp_path / 'c'}'",
              "INITIAL_CHECKPOINT_PATH": f"'{tmp_path / 'c'}'",
              "EVAL_OUTPUT_DIR": f"'{tmp_path / 'eval'}'",
              "INFER_OUTPUT_DIR": f"'{tmp_path / 'infer'}'",
              "MIXTURE_OR_TASK_NAME": "'some_task'", "TRAIN_STEPS": "4",
              "TASK_FEATURE_LENGTHS": LENGTHS, macro: "'gs://bucket/dir'"}
  files = [run_file, "models/palm_tiny.gin"]
  text = "\n".join(gin_utils.gin_texts(files, gin_utils.search_paths("")).values())
  rc = run_binary(binary, [f"--gin_file={f}" for f in files] + [
      f"--gin.{name}={value}" for name, value in settings.items()
      if re.search(rf"^{name} = ", text, re.M)])     # the macros this binary's files define
  err = capsys.readouterr().err
  assert rc == 2, err
  assert (f"field '--gin.{macro}': 'gs://bucket/dir' is a gs:// URI; palmflow's trainer "
          "reads and writes its directories through the local filesystem") in err, err
  assert "hint: mount the bucket (e.g. gcsfuse for gs://)" in err
  assert not list(tmp_path.iterdir())                # no 'gs:' folder, no config.gin


def test_a_string_without_quotes_names_the_flag_and_how_to_quote_it(tmp_path, capsys):
  """`--gin.MIXTURE_OR_TASK_NAME="my_task"` reaches gin as my_task (the shell ate the
  quotes): the error names the flag and shows the quoting, not gin's parse error."""
  rc = run_binary("train", ["--gin_file=runs/test_pretrain.gin",
                            "--gin_file=models/palm_tiny.gin",
                            "--gin.MIXTURE_OR_TASK_NAME=my.task", f"--gin.MODEL_DIR='{tmp_path}'",
                            f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "field '--gin.MIXTURE_OR_TASK_NAME': gin cannot read the value 'my.task'" in err, err
  assert "hint: --gin.MIXTURE_OR_TASK_NAME=\"'my.task'\"" in err


def test_a_setting_the_library_rejects_exits_2_in_one_line(pretrained, tmp_path, capsys):
  """Settings checked inside the run (here NUM_MICROBATCHES against BATCH_SIZE, and an
  odd head_dim that PaLMConfig rejects with a ValueError) end with one line naming them and
  exit 2, not a traceback."""
  _, task_json, _ = pretrained
  common = ["--gin_file=runs/pretrain.gin", "--gin_file=models/palm_tiny.gin",
            f"--task_spec={task_json}", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
            f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.TRAIN_STEPS=2",
            "--gin.VOCAB_SIZE=64", "--gin.BATCH_SIZE=8", "--gin.FEATURE_CONVERTER='prefix_lm'"]
  rc = run_binary("train", common + [f"--gin.MODEL_DIR='{tmp_path / 'a'}'",
                                     "--gin.NUM_MICROBATCHES=3"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "field 'NUM_MICROBATCHES': BATCH_SIZE 8 is not divisible by NUM_MICROBATCHES 3" in err
  assert "Traceback" not in err
  rc = run_binary("train", common + [f"--gin.MODEL_DIR='{tmp_path / 'b'}'",
                                     "--gin_bindings=models.PaLMConfig.head_dim = 7"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "PaLMConfig.head_dim must be even" in err and "raised at " in err, err
  assert "Traceback" not in err


def test_a_vocabulary_larger_than_the_embedding_is_named(pretrained, tmp_path, capsys):
  """Ids past the embedding's rows read NaNs: the loss would be NaN from the first step."""
  _, task_json, _ = pretrained
  rc = run_binary("train", ["--gin_file=runs/pretrain.gin", "--gin_file=models/palm_tiny.gin",
                            f"--task_spec={task_json}", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
                            f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.TRAIN_STEPS=2",
                            "--gin.VOCAB_SIZE=16", f"--gin.MODEL_DIR='{tmp_path / 'm'}'"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert re.search(r"field 'VOCAB_SIZE': the task's '(inputs|targets)' vocabulary has \d+ ids "
                   r"but the model's embedding has 16 rows", err), err


def test_includes_found_on_the_search_paths_log_no_errors(caplog, tmp_path):
  """gin first probes every include as a file inside a Python package and logs "Path not
  found" at ERROR before finding it on the search paths: every train and eval log began
  with such false errors. Parsing files with includes logs no error now, and leaves no
  filter behind, even when parsing fails; other modules' errors pass the filter; a missing
  include is still an error (found before gin parses)."""
  import gin
  from palmflow.errors import ConfigError
  gin.clear_config()
  try:
    with caplog.at_level(logging.INFO):
      gin_utils.parse(["models/palm_small.gin", "partitioning/data_parallel.gin"], [])
  finally:
    gin.clear_config()
  assert "models/palm_base.gin" in caplog.text                # gin did open the include
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
  assert not [f for f in logging.getLogger().filters
              if isinstance(f, gin_utils._IncludeProbeFilter)]
  gin.clear_config()
  try:                                   # a failing parse leaves no filter behind either
    with pytest.raises(ConfigError):
      gin_utils.parse(["models/palm_small.gin"], ["models.PaLMConfig.no_such_field = 1"])
  finally:
    gin.clear_config()
  assert not [f for f in logging.getLogger().filters
              if isinstance(f, gin_utils._IncludeProbeFilter)]
  other = logging.LogRecord("root", logging.ERROR, __file__, 1, "Path not found: x", None, None)
  assert gin_utils._IncludeProbeFilter().filter(other)
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'nope/missing.gin'\n")
  with pytest.raises(ConfigError, match="nope/missing.gin"):
    gin_utils.parse([str(bad)], [])


_NAME = re.compile(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def _header_sections(text: str) -> tuple[set[str], set[str]]:
  """Macro names in a run file's header comment: (Required, Commonly overridden)."""
  header = []
  for line in text.splitlines():
    if not line.startswith("#"):
      break
    header.append(line.lstrip("#"))
  required, common, section = [], [], None
  for line in header:
    if line.strip().startswith("Required"):
      section = required
      continue  # the section's title line names the model file, not macros
    if line.strip().startswith("Commonly overridden"):
      section = common
      continue
    if section is not None:
      if not line.startswith(" "):   # an unindented comment ends the section
        section = None
        continue
      section.append(line)
  return set(_NAME.findall("\n".join(required))), set(_NAME.findall("\n".join(common)))


def _final_bindings(path: Path) -> dict[str, str]:
  """Macro -> its last bound value, following includes in order as gin does."""
  out: dict[str, str] = {}
  paths = gin_utils.search_paths("")

  def visit(p: Path):
    for line in p.read_text().splitlines():
      inc = re.match(r"\s*include\s+['\"]([^'\"]+)['\"]", line)
      if inc:
        visit(gin_utils.resolve(inc.group(1), paths))
        continue
      m = re.match(r"^([A-Z_][A-Z0-9_]*)\s*=\s*(.*?)\s*(#.*)?$", line)
      if m:
        out[m.group(1)] = m.group(2)
  visit(path)
  return out


@pytest.mark.parametrize("run_file", RUNS, ids=[p.name for p in RUNS])
def test_run_file_headers_tell_the_truth(run_file):
  required, common = _header_sections(run_file.read_text())
  bindings = _final_bindings(run_file)
  actually_required = {k for k, v in bindings.items() if v == "%gin.REQUIRED"}
  assert required == actually_required, (
      f"{run_file.name}: header lists {sorted(required)} as Required but the bindings "
      f"require {sorted(actually_required)}")
  # Every commonly overridden macro exists (in the run file's includes or the model file).
  model_macros = _final_bindings(REPO / "gin" / "models" / "palm_base.gin")
  unknown = {n for n in common if "_" in n} - set(bindings) - set(model_macros)
  assert not unknown, f"{run_file.name}: header names macros no file binds: {sorted(unknown)}"


def test_fine_tuning_evaluates_predictions_on_the_task_of_its_training_eval():
  """The train stage trains an augmented dataset on its '<task>.augmented' twin (a train
  split only) and points TRAIN_EVAL_MIXTURE_OR_TASK_NAME at the task itself; the inference
  evaluation must follow it there, not to the twin."""
  import gin
  gin.clear_config()
  try:
    gin_utils.parse(["runs/finetune.gin", "models/palm_tiny.gin"],
                    ["MIXTURE_OR_TASK_NAME = 'x.augmented'",
                     "TRAIN_EVAL_MIXTURE_OR_TASK_NAME = 'x'"])
    value = lambda m: gin.query_parameter(m).scoped_configurable_fn()
    assert value("%INFER_EVAL_MIXTURE_OR_TASK_NAME") == "x"
    assert value("%INFER_EVAL_FEATURE_CONVERTER") == "prefix_lm"
  finally:
    gin.clear_config()


def test_every_run_file_has_a_required_header():
  names = {p.name for p in RUNS}
  assert {"pretrain.gin", "finetune.gin", "eval.gin", "infer.gin"} <= names
  for p in RUNS:
    assert _header_sections(p.read_text())[0], f"{p.name} has no Required list"
