"""A seqio task of arithmetic progressions for trainer tests (learnable in a few steps).

Not a test module: imported by test_train_loop.py and test_multihost.py (whose worker
processes run it before TensorFlow may be imported, so the imports are inside).
"""
from __future__ import annotations

import numpy as np


def register_progressions(name: str, *, vocab: int, length: int, num_examples: int,
                          splits: tuple[str, ...] = ("train",),
                          split_sizes: dict[str, int] | None = None) -> None:
  """Registers (again) task `name`: progressions mod vocab - 2 (ids >= 2) of length/2..length
  tokens; the train split draws from seed 0, every other split from seed 1; each split has
  `num_examples` examples unless `split_sizes` says otherwise."""
  import seqio
  import tensorflow as tf

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = (split_sizes or {}).get(split, num_examples)
    start = rng.integers(0, vocab - 2, n)
    stride = rng.integers(1, 4, n)
    lengths = rng.integers(length // 2, length + 1, n)

    def gen():
      for a, b, n in zip(start, stride, lengths):
        yield {"targets": ((a + b * np.arange(n)) % (vocab - 2) + 2).astype(np.int32)}
    return tf.data.Dataset.from_generator(
        gen, output_signature={"targets": tf.TensorSpec([None], tf.int32)})
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=list(splits)),
      output_features={"targets": seqio.Feature(seqio.PassThroughVocabulary(vocab),
                                                add_eos=False, dtype=tf.int32)},
      metric_fns=[])
