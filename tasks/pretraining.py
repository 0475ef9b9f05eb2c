"""Pretraining tasks over blocked shards written by the `blocks` stage.

Each blocks output is registered under a name carrying its fingerprint
(`<pipeline>_<stage>.<fingerprint>`), so a trainer can never read stale shards by mistake.
The source is lazy: nothing is read at registration.
"""
from __future__ import annotations

import seqio
import tensorflow as tf


def blocked_feature_description(block_length: int) -> dict:
  f = tf.io.FixedLenFeature([block_length], tf.int64)
  return {"targets": f, "targets_segment_ids": f, "targets_positions": f}


@seqio.map_over_dataset
def _to_int32(ex):
  return {k: tf.cast(v, tf.int32) for k, v in ex.items()}


def register_blocked_lm(name: str, *, file_pattern: str, vocab_path: str, block_length: int,
                        fmt: str = "tfrecord") -> seqio.Task:
  """Registers (or re-registers) a decoder-only LM task over pre-blocked shards.

  Args:
    name: the task name (carries the blocks stage fingerprint).
    file_pattern: shard glob, e.g. `/store/blocks/<fp>/blocks.tfrecord-*-of-00004`.
    vocab_path: the SentencePiece model the shards were tokenized with.
    block_length: tokens per block.
    fmt: `tfrecord` or `array_record`.
  Returns:
    The registered task. Examples have `targets`, `targets_segment_ids`,
    `targets_positions`; use `BlockedLMFeatureConverter` so that the segments survive.
  """
  vocab = seqio.SentencePieceVocabulary(vocab_path)
  desc = blocked_feature_description(block_length)
  if fmt == "array_record":
    @seqio.map_over_dataset
    def parse(x):
      return tf.io.parse_single_example(x, desc)
    source = seqio.ArrayRecordDataSource(split_to_filepattern={"train": file_pattern})
    pre = [parse, _to_int32]
  else:
    source = seqio.TFExampleDataSource(split_to_filepattern={"train": file_pattern},
                                       feature_description=desc)
    pre = [_to_int32]
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=pre,
      output_features={"targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
      metric_fns=[])
