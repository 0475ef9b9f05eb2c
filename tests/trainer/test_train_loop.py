"""The train loop end to end on a synthetic seqio task: metrics, TensorBoard, MFU, float16 loss
scaling in the loop and in checkpoints, progress output, and regularization wired from gin
(DROPOUT_RATE, LABEL_SMOOTHING, Z_LOSS).
"""

import dataclasses
import functools
import io
import json
import logging
import pathlib
import re
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
import pytest
import seqio
import tensorflow as tf

import progressions
from palmflow.errors import ConfigError
from palmflow.trainer import (checkpoints, data, gin_utils, lm, models, optimizers, partitioning,
                              precision, summaries, train_lib)

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin"
VOCAB, LENGTH, BATCH = 64, 32, 8
TASK = "palmflow_test_train_loop_progressions"


def register_progressions(name: str) -> None:
  progressions.register_progressions(name, vocab=VOCAB, length=LENGTH, num_examples=256,
                                     splits=("train", "validation"))


def dataset_cfg(split="train", batch_size=BATCH):
  return data.DatasetConfig(mixture_or_task_name=TASK, task_feature_lengths={"targets": LENGTH},
                            split=split, batch_size=batch_size, shuffle=False, seed=0,
                            feature_converter="lm")


def tiny_model(dtype="float32", **kw) -> lm.DecoderOnlyModel:
  config = models.PaLMConfig(vocab_size=VOCAB, num_layers=2, d_model=64, num_heads=4,
                             head_dim=16, d_ff=128, dtype=dtype)
  return lm.DecoderOnlyModel(config=config, optimizer=optimizers.adafactor(learning_rate=0.05),
                             **kw)


def read_metrics(path: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def tensorboard_tags(directory: pathlib.Path) -> set[str]:
  tags = set()
  for f in directory.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(f)):
      tags |= {v.tag for v in event.summary.value}
  return tags


@pytest.fixture(scope="module", autouse=True)
def _task():
  register_progressions(TASK)
  yield
  seqio.TaskRegistry.remove(TASK)


PEAK = 1e9
SHRINK = ["VOCAB_SIZE = 64", "models.PaLMConfig.d_model = 64", "models.PaLMConfig.d_ff = 128",
          "models.PaLMConfig.num_heads = 4", "models.PaLMConfig.head_dim = 16"]


@pytest.fixture(scope="module")
def float16_run(tmp_path_factory):
  """8 steps driven by the gin files as the train binary does (runs/pretrain.gin,
  models/palm_tiny.gin shrunk, precision/float16.gin), starting at an overflowing loss scale
  (2**30; backing off by 2**-16 gives 2**14) that grows after every 3 finite steps.

  Returns (model_dir, train() result, MODEL, PRECISION).
  """
  model_dir = tmp_path_factory.mktemp("fp16_run")
  bindings = SHRINK + [
      f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{TASK}'",
      f"TASK_FEATURE_LENGTHS = {{'targets': {LENGTH}}}", "TRAIN_STEPS = 8",
      f"BATCH_SIZE = {BATCH}", "FEATURE_CONVERTER = 'lm'", "SHUFFLE_TRAIN_EXAMPLES = False",
      "LOG_EVERY = 1", f"TRAIN_EVAL_MIXTURE_OR_TASK_NAME = '{TASK}'", "EVAL_PERIOD = 8",
      "EVAL_STEPS = 2", "LR_FACTORS = 'constant'", "BASE_LEARNING_RATE = 0.05",
      f"PEAK_FLOPS_PER_SECOND = {PEAK}", f"INITIAL_LOSS_SCALE = {2.0 ** 30}",
      "LOSS_SCALE_GROWTH_INTERVAL = 3",
      f"precision.DynamicLossScaleConfig.max_scale = {2.0 ** 30}",
      f"precision.DynamicLossScaleConfig.backoff_factor = {2.0 ** -16}",
      # t5x's Adafactor (factored), for the factored moments' listing below
      "optimizers.adafactor.factored = True", "optimizers.adafactor.momentum = None"]
  gin.clear_config()
  try:
    gin_utils.parse(["runs/pretrain.gin", "models/palm_tiny.gin", "precision/float16.gin"],
                    bindings)
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    policy = gin.query_parameter("%PRECISION").scoped_configurable_fn()
    result = gin.get_configurable(train_lib.train)()
  finally:
    gin.clear_config()
  return model_dir, result, model, policy


def test_metrics_jsonl_and_tensorboard_have_loss_accuracy_lr_grad_norm_tokens_and_mfu(
    float16_run):
  model_dir, result, model, _ = float16_run
  rows = read_metrics(model_dir / "train" / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 9))
  wanted = {"loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_second",
            "steps_per_second", "model_flops_per_second", "mfu", "loss_scale", "skipped_steps",
            "target_tokens", "target_tokens_per_second", "cross_ent_loss", "z_loss"}
  for r in rows:
    assert wanted <= set(r), wanted - set(r)
    assert r["learning_rate"] == pytest.approx(0.05)
    assert r["tokens_per_second"] == pytest.approx(r["steps_per_second"] * BATCH * LENGTH)
    flops = train_lib.model_flops_per_token(model.config, num_params=result["num_params"],
                                            length=LENGTH)
    assert r["model_flops_per_second"] == pytest.approx(flops * r["tokens_per_second"])
    assert r["mfu"] == pytest.approx(r["model_flops_per_second"] / (PEAK * 8))
    assert 0 < r["target_tokens"] < BATCH * LENGTH  # padding is not counted
    # LOG_EVERY = 1: the target tokens of one step over its time
    assert r["target_tokens_per_second"] == pytest.approx(
        r["steps_per_second"] * r["target_tokens"])
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
  assert tensorboard_tags(model_dir / "train") >= {"loss", "accuracy", "learning_rate",
                                                   "grad_norm", "tokens_per_second", "mfu"}
  eval_dir = model_dir / "training_eval" / TASK
  last_eval = read_metrics(eval_dir / "metrics.jsonl")[-1]
  assert {"loss", "accuracy", "cross_ent_loss", "z_loss"} <= set(last_eval)
  # The loss the model trains on, as in training: cross-entropy plus z-loss, per token.
  assert last_eval["z_loss"] > 0
  assert last_eval["loss"] == pytest.approx(last_eval["cross_ent_loss"] + last_eval["z_loss"])
  assert list(eval_dir.glob("events.out.tfevents.*"))
  info = (model_dir / "model-info.txt").read_text()
  assert "Mesh: data=8 x model=1" in info
  # The optimizer state is listed too; factored, Adafactor factors the query kernel (layers,
  # embed, heads, kv) by its logical axes (t5x's rules): per layer, embed x (heads, kv).
  state = info[info.index("Optimizer state:"):]
  assert re.search(r"v_row/layers/attention/query +\(2, 64\) ", state), state
  assert re.search(r"v_col/layers/attention/query +\(2, 4, 16\) ", state), state
  # Standard rules: vocab -> model (of size 1 here), embed replicated.
  assert result["param_partition_specs"]["embedding"] == "(model, None)"


def test_float16_loop_skips_overflows_grows_the_scale_and_checkpoints_it(float16_run):
  model_dir, _, model, policy = float16_run
  assert model.config.dtype == "float16" and policy.dynamic_loss_scale.initial_scale == 2.0 ** 30
  rows = read_metrics(model_dir / "train" / "metrics.jsonl")
  assert [r["loss_scale"] for r in rows] == [2.0 ** 30] + [2.0 ** 14] * 3 + [2.0 ** 15] * 3 + [
      2.0 ** 16]
  assert [r["skipped_steps"] for r in rows] == [1] * 8
  # The loss scale is part of the optimizer state in the checkpoint: after step 8 it is 2**16
  # with one finite step counted towards the next growth.
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), batch_size=1, length=LENGTH)["params"])
  tx = train_lib.train_optimizer(model, policy, boxed)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with_sharding = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), t)
  ckpt = checkpoints.Checkpointer(model_dir, checkpoints.SaveCheckpointConfig())
  step, params, opt_state, _ = ckpt.restore_latest(with_sharding(abstract_params),
                                                   with_sharding(abstract_opt))
  ckpt.close()
  assert step == 8 and isinstance(opt_state, precision.LossScaledState)
  assert float(opt_state.loss_scale.scale) == 2.0 ** 16
  assert int(opt_state.loss_scale.good_steps) == 1
  assert int(opt_state.loss_scale.skipped_steps) == 1
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float32"}


def test_precision_policy_must_match_the_model_dtype(tmp_path):
  with pytest.raises(ConfigError, match="ACTIVATION_DTYPE"):
    train_lib.train(model=tiny_model("float32"), train_dataset_cfg=dataset_cfg(),
                    partitioner=partitioning.Partitioner(num_partitions=1),
                    model_dir=str(tmp_path), total_steps=1,
                    precision=precision.PrecisionPolicy("bfloat16"))


def test_an_inference_evaluation_with_nothing_to_evaluate_is_skipped_with_a_warning(
    tmp_path, caplog):
  """As t5x: a task without metrics (here the progressions) gets no inference evaluation,
  and training goes on; a packing converter is refused before anything runs."""
  common = dict(model=tiny_model(), train_dataset_cfg=dataset_cfg(),
                partitioner=partitioning.Partitioner(num_partitions=1), total_steps=1)
  with pytest.raises(ConfigError, match="field 'INFER_EVAL_FEATURE_CONVERTER'.*packs"):
    train_lib.train(model_dir=str(tmp_path / "blocked"), **common,
                    infer_eval_dataset_cfg=dataclasses.replace(
                        dataset_cfg("validation"), feature_converter="blocked_lm"))
  caplog.set_level(logging.WARNING, logger="palmflow")
  result = train_lib.train(model_dir=str(tmp_path / "run"), **common,
                           infer_eval_dataset_cfg=dataset_cfg("validation"))
  assert result["step"] == 1 and result["infer_eval"] == {}
  assert "no inference evaluation: field 'INFER_EVAL_SPLIT': nothing to evaluate" in caplog.text
  assert not (tmp_path / "run" / "inference_eval").exists() or not list(
      (tmp_path / "run" / "inference_eval").glob("*.jsonl"))


def test_model_flops_per_token_formula():
  c = models.PaLMConfig(vocab_size=64, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                        d_ff=128)
  n = c.num_params()
  assert train_lib.model_flops_per_token(c, num_params=n, length=32) == (
      6 * n + 12 * 2 * 4 * 16 * 32)
  unshared = dataclasses.replace(c, shared_embedding=False)
  assert train_lib.model_flops_per_token(unshared, num_params=unshared.num_params(),
                                         length=32) == 6 * n + 12 * 2 * 4 * 16 * 32
  # PaLM 540B at 2048 tokens: ~3.28 TFLOP per token, attention only ~1% of it.
  big = models.PaLMConfig(vocab_size=256000, num_layers=118, d_model=18432, num_heads=48,
                          head_dim=256, d_ff=73728)
  flops = train_lib.model_flops_per_token(big, num_params=big.num_params(), length=2048)
  assert flops == 6 * big.num_params() + 12 * 118 * 48 * 256 * 2048
  assert flops == pytest.approx(3.28e12, rel=0.01)


def test_mfu_denominator_from_the_device_kind():
  """Without PEAK_FLOPS_PER_SECOND, known accelerators get their data-sheet bf16 peak (the
  kinds as jax names them); a CPU, or float32 compute, gets none (MFU is not logged)."""
  peak = train_lib.device_peak_flops
  assert peak("TPU v4", "bfloat16") == 275e12
  assert peak("TPU v5 lite", "bfloat16") == 197e12 and peak("TPU v5p", "float16") == 459e12
  assert peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert peak("NVIDIA A100-SXM4-40GB", "bfloat16") == 312e12
  assert peak("NVIDIA H100 80GB HBM3", "float32") is None
  assert peak(jax.devices()[0].device_kind, "bfloat16") is None   # this CPU


def test_progress_plain_lines_without_a_terminal_and_tqdm_in_one(monkeypatch, capsys):
  p = train_lib.Progress(start=0, total=5, every=2, desc="train")
  for step in range(1, 6):
    p.update(step, {"loss": 1.0 / step})
  p.close()
  lines = capsys.readouterr().err.splitlines()
  assert lines == ["train step 2/5 loss=0.5", "train step 4/5 loss=0.25",
                   "train step 5/5 loss=0.2"]

  class Tty(io.StringIO):
    def isatty(self):
      return True
  fake = Tty()
  monkeypatch.setattr(sys, "stderr", fake)
  p = train_lib.Progress(start=0, total=4, every=2, desc="train")
  for step in range(1, 5):
    p.update(step, {"loss": 0.5})
  p.close()
  out = fake.getvalue()
  assert "train: 100%" in out and "4/4" in out and "loss=0.5" in out


# ---------------------------------------------------------------- regularization from gin


def _gin_model(run_file: str, bindings=()) -> lm.DecoderOnlyModel:
  """MODEL from a run file + models/palm_tiny.gin (shrunk for speed), through the binary's
  flag parsing (so a misspelt macro fails as it would on the command line)."""
  gin.clear_config()
  shrink = ["VOCAB_SIZE = 64", "models.PaLMConfig.d_model = 32", "models.PaLMConfig.d_ff = 64",
            "models.PaLMConfig.num_heads = 4", "models.PaLMConfig.head_dim = 8"]
  try:
    gin_utils.parse([run_file, "models/palm_tiny.gin"], shrink + list(bindings))
    return gin.query_parameter("%MODEL").scoped_configurable_fn()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("run_file,bindings,rate", [
    ("runs/pretrain.gin", [], 0.0),
    ("runs/finetune.gin", [], 0.1),
    ("runs/finetune.gin", ["DROPOUT_RATE = 0.3"], 0.3),
])
def test_dropout_rate_reaches_the_model(run_file, bindings, rate):
  assert _gin_model(run_file, bindings).config.dropout_rate == rate


def test_misspelt_regularization_macro_is_rejected():
  with pytest.raises(ConfigError, match="LABEL_SMOOTHING"):
    _gin_model("runs/pretrain.gin", ["LABEL_SMOOTING = 0.1"])


def _lm_batch():
  rng = np.random.default_rng(3)
  tokens = rng.integers(2, VOCAB, size=(4, 17)).astype(np.int32)
  weights = np.ones((4, 16), np.float32)
  weights[1, 10:] = 0
  return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
          "decoder_loss_weights": weights}


def test_dropout_is_used_by_the_train_step_and_varies_with_the_step():
  model = _gin_model("runs/finetune.gin", ["DROPOUT_RATE = 0.3"])
  params = nn.unbox(jax.jit(functools.partial(model.init, batch_size=1, length=16))(
      jax.random.PRNGKey(0)))["params"]
  batch = _lm_batch()
  sgd = optax.sgd(0.0)
  step = train_lib.make_train_step(model, sgd, num_microbatches=1, dropout_seed=0,
                                   learning_rate_fn=None)

  @jax.jit
  def run(params, step_number):
    return (step(params, sgd.init(params), batch, step_number)[2]["loss"],
            model.loss_fn(params, batch)[0])
  (loss0, deterministic), (loss1, _) = run(params, 0), run(params, 1)  # one compilation
  assert float(loss0) != pytest.approx(float(deterministic), abs=1e-4)
  assert float(loss0) != pytest.approx(float(loss1), abs=1e-4)


def test_label_smoothing_and_z_loss_macros_change_the_loss_as_defined():
  batch = _lm_batch()
  plain = _gin_model("runs/pretrain.gin", ["Z_LOSS = 0.0", "LABEL_SMOOTHING = 0.0"])
  z = _gin_model("runs/pretrain.gin", ["Z_LOSS = 0.01", "LABEL_SMOOTHING = 0.0"])
  smooth = _gin_model("runs/pretrain.gin", ["Z_LOSS = 0.0", "LABEL_SMOOTHING = 0.1"])
  assert (z.z_loss, smooth.label_smoothing) == (0.01, 0.1)
  assert _gin_model("runs/pretrain.gin").z_loss == 1e-4  # PaLM's default
  params = nn.unbox(jax.jit(functools.partial(plain.init, batch_size=1, length=16))(
      jax.random.PRNGKey(0)))["params"]

  @jax.jit
  def losses(params):
    logits = plain.module.apply({"params": params}, batch["decoder_input_tokens"])
    return (logits, plain.loss_fn(params, batch)[0], z.loss_fn(params, batch)[0],
            smooth.loss_fn(params, batch)[0])
  logits, l_plain, l_z, l_smooth = (np.asarray(x, np.float64) for x in losses(params))
  w = batch["decoder_loss_weights"]
  log_z = np.log(np.sum(np.exp(logits), axis=-1))
  logp = logits - log_z[..., None]
  target = np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  mean = lambda x: np.sum(x * w) / np.sum(w)
  assert l_plain == pytest.approx(mean(-target), rel=1e-5)
  assert l_z - l_plain == pytest.approx(0.01 * mean(log_z ** 2), rel=1e-4)
  conf, low = 0.9, 0.1 / (VOCAB - 1)
  const = -(conf * np.log(conf) + (VOCAB - 1) * low * np.log(low))
  smoothed = -(conf - low) * target - low * np.sum(logp, axis=-1) - const
  assert l_smooth == pytest.approx(mean(smoothed), rel=1e-5)
  assert l_smooth != pytest.approx(l_plain, rel=1e-3)


def test_a_resume_drops_a_half_written_metrics_line_and_later_steps(tmp_path, caplog):
  """A run killed while appending to metrics.jsonl leaves a partial last line: the resumed
  run drops it (with a warning naming the file and line) and the steps after its
  checkpoint, keeping the rest."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                  '{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
  caplog.set_level("WARNING", logger="palmflow")
  summaries.truncate_metrics(path, 2)
  assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
  assert f"{path}:4: dropping a partly written metrics line" in caplog.text
  assert not list(tmp_path.glob("*.tmp"))


def test_training_eval_of_an_empty_split_reports_nothing_not_zeros():
  """No target token seen: no loss or accuracy (it logged loss 0 and accuracy 0, which a
  curve shows as real); `train` then stops with a DataError naming the split."""
  empty = tf.data.Dataset.from_tensor_slices(
      {"decoder_target_tokens": np.zeros((0, 4), np.int32)}).batch(2)
  never = lambda params, batch: pytest.fail("no batch to evaluate")
  assert train_lib.evaluate_loss(never, None, empty, None, max_batches=3) == {}


def test_pretraining_packs_a_task_of_targets_online_and_blocked_lm_refuses_it():
  """pretrain.gin packs the 'lm' converter's examples, as t5x's pretrain.gin does (unpacked,
  a task of short texts wasted most of each row), and fine-tuning keeps one example a row;
  'blocked_lm' on a task that is not the blocks stage's fails naming FEATURE_CONVERTER (it
  failed inside tf.data with a KeyError)."""
  name = TASK + "_short"
  progressions.register_progressions(name, vocab=VOCAB, length=8, num_examples=64)
  try:
    for run_file, packs in (("runs/pretrain.gin", True), ("runs/finetune.gin", False)):
      gin.clear_config()
      try:
        gin_utils.parse([run_file, "models/palm_tiny.gin"], [])
        assert gin.query_parameter("train/data.DatasetConfig.pack") is packs, run_file
        assert gin.query_parameter("train_eval/data.data_config_or_none.pack") is packs
      finally:
        gin.clear_config()
    cfg = data.DatasetConfig(mixture_or_task_name=name, task_feature_lengths={"targets": 32},
                             batch_size=4, shuffle=False, feature_converter="lm", pack=True)
    batch = next(data.get_dataset(cfg, num_epochs=1).as_numpy_iterator())
    # 4..8 tokens an example: several examples a row, each its own segment from position 0
    assert batch["decoder_segment_ids"].max(axis=1).min() >= 3
    first = batch["decoder_segment_ids"][0]
    assert (batch["decoder_positions"][0][first == 2] == np.arange((first == 2).sum())).all()
    with pytest.raises(ConfigError, match=rf"field 'FEATURE_CONVERTER'.*'blocked_lm' reads "
                       rf"blocks .*{name} has none"):
      data.get_dataset(dataclasses.replace(cfg, feature_converter="blocked_lm"))
  finally:
    seqio.TaskRegistry.remove(name)


def test_training_eval_reads_its_batches_once_with_use_memory_cache(tmp_path, monkeypatch):
  """DatasetConfig.use_memory_cache (t5x's field, default True): the periodic training
  evaluation preprocesses its batches once and keeps them; without it, every evaluation
  reads the split again. The metrics are the same either way."""
  calls = []
  read = data.get_dataset
  monkeypatch.setattr(data, "get_dataset",
                      lambda cfg, **kw: calls.append(cfg.split) or read(cfg, **kw))
  logged = {}
  for cache in (True, False):
    calls.clear()
    train_lib.train(
        model=tiny_model(), train_dataset_cfg=dataset_cfg(),
        train_eval_dataset_cfg=dataclasses.replace(dataset_cfg("validation"),
                                                   use_memory_cache=cache),
        partitioner=partitioning.Partitioner(num_partitions=1), model_dir=tmp_path / str(cache),
        total_steps=4, eval_period=2, eval_steps=2,
        checkpoint_cfg=checkpoints.SaveCheckpointConfig(period=100))
    assert calls.count("validation") == (1 if cache else 3), calls  # at steps 0, 2 and 4
    logged[cache] = read_metrics(tmp_path / str(cache) / "training_eval" / TASK / "metrics.jsonl")
  assert [r["step"] for r in logged[True]] == [0, 2, 4]
  assert logged[True] == logged[False]


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
  """A rerun that starts over at step 0 evaluates step 0 again: the killed run's lines and
  TensorBoard points of step 0 and after are dropped (step 0's was kept, and then showed
  twice)."""
  from tensorboard.backend.event_processing import plugin_event_accumulator

  def run():
    return train_lib.train(
        model=tiny_model(), train_dataset_cfg=dataset_cfg(),
        train_eval_dataset_cfg=dataset_cfg("validation"),
        partitioner=partitioning.Partitioner(num_partitions=1), model_dir=tmp_path,
        total_steps=4, eval_period=2, eval_steps=1, log_every=1,
        checkpoint_cfg=checkpoints.SaveCheckpointConfig(period=100))
  first = run()
  import shutil
  shutil.rmtree(checkpoints.step_dir(tmp_path, 4))      # as if killed before saving it
  second = run()
  assert second["eval"] == pytest.approx(first["eval"])
  for directory, want in [(tmp_path / "train", [1, 2, 3, 4]),
                          (tmp_path / "training_eval" / TASK, [0, 2, 4])]:
    assert [r["step"] for r in read_metrics(directory / "metrics.jsonl")] == want
    acc = plugin_event_accumulator.EventAccumulator(str(directory),
                                                    size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("loss")] == want, directory


def test_the_training_data_runs_without_the_tf_data_autotuning_thread():
  """get_dataset turns tf.data's autotuning thread off: with TF 2.21 it often kept a
  finished run's iterator waiting for its sleep (up to a minute) before the binary could
  exit. The batches come as before."""
  ds = data.get_dataset(dataset_cfg(), num_epochs=1)
  assert ds.options().autotune.enabled is False
  assert next(ds.as_numpy_iterator())["decoder_target_tokens"].shape == (BATCH, LENGTH)
