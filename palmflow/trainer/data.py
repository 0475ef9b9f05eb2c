"""Datasets for training and evaluation: t5x's DatasetConfig over seqio, seeded by default.

seqio and TensorFlow are imported where a dataset is built, not with this module: the train
step (`train_lib`) then imports with jax, flax, optax and orbax alone, as on an accelerator
machine that has no TensorFlow (`bench/gpu_train_mfu.py`).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from palmflow.errors import ConfigError

if TYPE_CHECKING:
  import seqio
  import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read (the fields and names of t5x's `utils.DatasetConfig`).

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: e.g. {"targets": 512} or {"inputs": 256, "targets": 16}.
    split: dataset split.
    batch_size: global batch size (all hosts together).
    shuffle: shuffle examples (seeded).
    seed: the shuffle seed; runs are reproducible by default (never None here).
    use_cached: read a seqio cache made by seqio's cache_tasks job.
    pack: pack examples (online, seqio) when the feature converter supports it.
    module: modules to import before looking the task up (registrations).
    use_memory_cache: keep the evaluation's preprocessed batches in memory: the trainer's
      periodic training evaluation reads them once, not at every evaluation (the
      inference evaluation and the eval binary keep their examples anyway, as seqio's
      Evaluator does).
    trim_output_features: trim features longer than their lengths.
    feature_converter: "lm", "blocked_lm" (blocks of the blocks stage) or "prefix_lm".
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 128
  shuffle: bool = True
  seed: int = 0
  use_cached: bool = False
  pack: bool = False
  module: str | Sequence[str] | None = None
  use_memory_cache: bool = True
  trim_output_features: bool = True
  feature_converter: str = "lm"


FEATURE_CONVERTERS = ("lm", "blocked_lm", "prefix_lm")


def make_feature_converter(name: str, *, pack: bool,
                           task_name: str | None = None) -> seqio.FeatureConverter:
  """The seqio feature converter called `name` (decoder-only models); `task_name`, the
  task or mixture it converts, is named in its errors."""
  import seqio
  from palmflow.trainer.feature_converters import BlockedLMFeatureConverter
  if name == "blocked_lm":
    return BlockedLMFeatureConverter(task_name=task_name)
  if name == "lm":
    return seqio.LMFeatureConverter(pack=pack)
  if name == "prefix_lm":
    return seqio.PrefixLMFeatureConverter(pack=pack, loss_on_targets_only=True)
  raise ConfigError(f"unknown feature converter {name!r} (known: {FEATURE_CONVERTERS})",
                    field="DatasetConfig.feature_converter")


def import_modules(module: str | Sequence[str] | None) -> None:
  """Imports the task-registration module(s) (MIXTURE_OR_TASK_MODULE); a module that cannot
  be found is a ConfigError."""
  if not module:
    return
  for m in ([module] if isinstance(module, str) else module):
    try:
      importlib.import_module(m)
    except ModuleNotFoundError as e:
      raise ConfigError(f"cannot import task module {m!r}: {e}", field="MIXTURE_OR_TASK_MODULE",
                        hint="give an importable module name (on PYTHONPATH), e.g. "
                        "'tasks.downstream'") from None


def register_task_specs(paths: Sequence[str]) -> list[str]:
  """Registers tasks described by palmflow `task.json` files; returns their names."""
  from tasks import specs
  return [specs.register_from_file(p) for p in paths]


def get_task_or_mixture(name: str, module=None):
  """Looks a task or mixture up; a miss says which modules were imported and close names."""
  import seqio
  import_modules(module)
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    import difflib
    known = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.3)
    raise ConfigError(
        f"no seqio task or mixture named {name!r}; registration modules imported: "
        f"{module or 'none'}; close names: {close or 'none'}; registered: {len(known)}",
        field="MIXTURE_OR_TASK_NAME",
        hint="import the module that registers it (--gin.MIXTURE_OR_TASK_MODULE=\"'my.tasks'\"), "
             "or pass its palmflow task spec with --task_spec") from None


def check_converter_keeps_inputs(task, feature_converter: str, field: str) -> None:
  """Raises ConfigError if `feature_converter` would drop a task's "inputs" when decoding.

  The LM converters read only "targets": a text-to-text task's inputs would be dropped,
  the decoder would continue after the target itself, and the metrics would mean nothing.
  """
  import seqio
  if feature_converter not in ("lm", "blocked_lm"):
    return
  with_inputs = [t.name for t in seqio.get_subtasks(task) if "inputs" in t.output_features]
  if with_inputs:
    raise ConfigError(
        f"FEATURE_CONVERTER={feature_converter!r} reads only 'targets', but "
        f"{', '.join(with_inputs)} has 'inputs': they would be dropped and decoding would "
        "start after the target", field=field,
        hint="use FEATURE_CONVERTER='prefix_lm' for a task with inputs")


def check_vocabulary_fits(task, vocab_size: int) -> None:
  """Raises ConfigError if a feature's vocabulary has more ids than the model's embedding.

  An id past the embedding's rows would read NaNs (`jnp.take` fills out-of-range rows), and
  the loss would be NaN from the first step (under float16, every step skipped).
  """
  for name, feature in task.output_features.items():
    n = getattr(feature.vocabulary, "vocab_size", None)
    if n is not None and n > vocab_size:
      raise ConfigError(
          f"the task's {name!r} vocabulary has {n} ids but the model's embedding has "
          f"{vocab_size} rows", field="VOCAB_SIZE",
          hint=f"set --gin.VOCAB_SIZE={n} (or more; a multiple of 128 suits accelerators)")


def get_dataset(cfg: DatasetConfig, *, shard_index: int = 0, num_shards: int = 1,
                num_epochs: int | None = None, skip_batches: int = 0) -> tf.data.Dataset:
  """The batched, converted dataset for this host.

  Args:
    cfg: what to read.
    shard_index: this host's index (jax.process_index()).
    num_shards: number of hosts (jax.process_count()).
    num_epochs: None repeats forever (training); 1 for evaluation.
    skip_batches: batches to skip (resuming at a step).
  Returns:
    A tf.data.Dataset of dicts of [per_host_batch, length] int32 arrays.
  """
  import seqio
  import tensorflow as tf
  get_task_or_mixture(cfg.mixture_or_task_name, cfg.module)
  if cfg.batch_size % num_shards:
    raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {num_shards} "
                      "hosts", field="BATCH_SIZE")
  converter = make_feature_converter(cfg.feature_converter, pack=cfg.pack,
                                     task_name=cfg.mixture_or_task_name)
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name, task_feature_lengths=dict(cfg.task_feature_lengths),
      dataset_split=cfg.split, shuffle=cfg.shuffle, num_epochs=num_epochs,
      feature_converter=converter, shard_info=seqio.ShardInfo(shard_index, num_shards),
      use_cached=cfg.use_cached, seed=cfg.seed,
      trim_output_features=cfg.trim_output_features)
  ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=num_epochs is None)
  if skip_batches:
    ds = ds.skip(skip_batches)
  # No tf.data autotuning thread: with TF 2.21, a training run's iterator often kept its
  # destructor waiting on that thread's sleep (13-16 s of 50 s demo runs, after the last
  # step; the thread sleeps up to a minute between tunings), and the steps were as fast
  # without it. The parallel maps take TF's default parallelism; the prefetch buffer keeps
  # its own tuning.
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def as_numpy(batch: Mapping[str, tf.Tensor]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items()}


def read_jsonl(path: str | Path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def data_config_or_none(*, mixture_or_task_name: str | None, **kwargs) -> DatasetConfig | None:
  """A DatasetConfig, or None when no task is named (e.g. to switch periodic eval off)."""
  if not mixture_or_task_name:
    return None
  return DatasetConfig(mixture_or_task_name=mixture_or_task_name, **kwargs)
