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


def read_array_record(path: tf.Tensor, *, chunk: int = 1024) -> tf.data.Dataset:
  """The records of one ArrayRecord file, in order, as a dataset of serialized strings.

  seqio's `FileDataSource` calls this once per shard file (its `read_file_fn`); the file is
  read sequentially in chunks of `chunk` records by the array_record library.
  """
  def records(p):
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(p.decode() if isinstance(p, bytes) else str(p))
    try:
      n = reader.num_records()
      for start in range(0, n, chunk):
        yield from reader.read(start, min(n, start + chunk))
    finally:
      reader.close()
  return tf.data.Dataset.from_generator(
      records, args=(path,), output_signature=tf.TensorSpec([], tf.string))


def blocked_source(file_pattern: str, *, block_length: int,
                   fmt: str = "tfrecord") -> seqio.DataSource:
  """The data source of pre-blocked shards, TFRecord or ArrayRecord of tf.Example.

  Both formats yield the same examples in the same order for the same shards: a
  `TFExampleDataSource` for TFRecord; for ArrayRecord a `FileDataSource` reading each file
  with `read_array_record` and parsing the same feature description.
  """
  desc = blocked_feature_description(block_length)
  split = {"train": file_pattern}
  if fmt == "tfrecord":
    return seqio.TFExampleDataSource(split_to_filepattern=split, feature_description=desc)
  if fmt == "array_record":
    def read(path):
      return read_array_record(path).map(lambda x: tf.io.parse_single_example(x, desc),
                                         num_parallel_calls=tf.data.AUTOTUNE)
    return seqio.FileDataSource(read_file_fn=read, split_to_filepattern=split)
  raise ValueError(f"unknown blocked shard format {fmt!r} (known: tfrecord, array_record)")


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
  source = blocked_source(file_pattern, block_length=block_length, fmt=fmt)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=[_to_int32],
      output_features={"targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
      metric_fns=[])
