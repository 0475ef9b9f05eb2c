"""Data augmentation preprocessors a fine-tuning task can switch on (training split only)."""
from __future__ import annotations

import tensorflow as tf


def token_dropout(dataset: tf.data.Dataset, *, rate: float, seed: int = 0,
                  feature: str = "inputs") -> tf.data.Dataset:
  """Drops each token of `feature` with probability `rate` (seeded, stateless per example).

  The EOS at the end is kept. Applied after tokenization; evaluation splits are not
  augmented because the registering code only adds this for training.
  """
  def drop(index, ex):
    toks = ex[feature]
    n = tf.shape(toks)[0]
    u = tf.random.stateless_uniform([n], seed=tf.stack([tf.cast(seed, tf.int64), index]))
    keep = tf.logical_or(u >= rate, tf.range(n) == n - 1)
    ex = dict(ex)
    ex[feature] = tf.boolean_mask(toks, keep)
    return ex
  return dataset.enumerate().map(drop, num_parallel_calls=tf.data.AUTOTUNE)
