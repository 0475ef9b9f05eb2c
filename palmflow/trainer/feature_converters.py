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

  def __init__(self, **kwargs):
    kwargs["pack"] = True
    super().__init__(**kwargs)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths) -> tf.data.Dataset:
    length = task_feature_lengths["targets"]

    def fix(ex):
      return {k: tf.ensure_shape(ex[k][:length], [length])
              for k in ("targets", "targets_segment_ids", "targets_positions")}
    ds = ds.map(fix, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)
