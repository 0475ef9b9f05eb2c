"""A seqio feature converter for pre-blocked LM data (blocks keep their document segments)."""
from __future__ import annotations

import seqio
import tensorflow as tf


class BlockedLMFeatureConverter(seqio.LMFeatureConverter):
  """Like `seqio.LMFeatureConverter` with packing, but the packing was done offline.

  Examples already have exactly `targets` length tokens plus `targets_segment_ids` and
  `targets_positions` (from the `blocks` stage); they are passed through without repacking,
  so `decoder_segment_ids` marks the documents inside each block.
  """

  BLOCK_FEATURES = ("targets", "targets_segment_ids", "targets_positions")

  def __init__(self, *, task_name: str | None = None, **kwargs):
    """`task_name`: the task or mixture read, named in the error for a dataset of other
    examples."""
    kwargs["pack"] = True
    super().__init__(**kwargs)
    self._task_name = task_name

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths) -> tf.data.Dataset:
    # Checked here, where the examples arrive: without their segment ids and positions
    # (a task that is not the blocks stage's), the conversion failed with a KeyError.
    if not set(self.BLOCK_FEATURES) <= set(ds.element_spec):
      from palmflow.errors import ConfigError
      raise ConfigError(
          "FEATURE_CONVERTER='blocked_lm' reads blocks made by palmflow's blocks stage (with "
          f"targets_segment_ids and targets_positions), and {self._task_name or 'the task'} "
          "has none", field="FEATURE_CONVERTER",
          hint="use FEATURE_CONVERTER='lm' for a task of targets (pretrain.gin packs them "
               "online: train/data.DatasetConfig.pack = True), or 'prefix_lm' for one with "
               "inputs")
    return super().__call__(ds, task_feature_lengths)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths) -> tf.data.Dataset:
    length = task_feature_lengths["targets"]

    def fix(ex):
      return {k: tf.ensure_shape(ex[k][:length], [length]) for k in self.BLOCK_FEATURES}
    ds = ds.map(fix, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)
