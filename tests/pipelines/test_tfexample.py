"""The numpy tf.Example writer gives TensorFlow's own (deterministic) bytes."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipelines.transforms.tfexample import int64_example, varints


def tf_bytes(features) -> bytes:
  return tf.train.Example(features=tf.train.Features(feature={
      k: tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(v).tolist()))
      for k, v in features.items()})).SerializeToString(deterministic=True)


@pytest.mark.parametrize("high", [1, 2, 128, 129, 8000, 1 << 14, (1 << 21) + 3, 1 << 35,
                                  1 << 62])
def test_same_bytes_as_tensorflow(high):
  rng = np.random.default_rng(high)
  feats = {"targets": rng.integers(0, high, 2048), "b_small": np.arange(5),
           "a_empty": np.zeros(0, np.int64),
           "edges": np.array([high - 1, 0, 127, 128, 16383, 16384], np.int64)}
  assert int64_example(feats) == tf_bytes(feats)
  parsed = tf.train.Example.FromString(int64_example(feats)).features.feature
  np.testing.assert_array_equal(parsed["targets"].int64_list.value, feats["targets"])


def test_unsigned_and_bad_values():
  assert varints(np.array([300], np.uint16)) == b"\xac\x02"
  assert varints([]) == b""
  with pytest.raises(ValueError, match="negative"):
    varints(np.array([3, -1]))
  with pytest.raises(TypeError, match="integers"):
    varints(np.array([1.5]))
