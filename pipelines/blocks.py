"""Beam job: tokenize documents and block them into fixed-length sequences (PaLM style).

Documents are tokenized with a SentencePiece model (built in each worker's `DoFn.setup`),
concatenated with EOS between them and cut into blocks of exactly `block_length` tokens.
Each block carries `targets`, `targets_segment_ids` (1, 2, ... per document inside the block,
0 on padding) and `targets_positions` (restarting at 0 for each document), so a model can
confine attention to one document. `--mode=pad` instead trims or pads each document into its
own block(s). Blocks are shuffled across shards by a seeded hash; the output is identical
byte for byte for the same input, vocabulary and seed.

Local:
    python -m pipelines.blocks --runner=DirectRunner --documents='/tmp/corpus/documents*' \
        --vocab=/tmp/vocab/spm.model --output_dir=/tmp/blocks --block_length=512
Dataflow (workers get palmflow through --setup_file):
    python -m pipelines.blocks --runner=DataflowRunner --project=P --region=R \
        --temp_location=gs://B/tmp --setup_file=./setup.py --documents='gs://B/corpus/doc*' \
        --vocab=gs://B/vocab/spm.model --output_dir=gs://B/blocks
"""
from __future__ import annotations

import argparse
import json
import logging

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.transforms import shards

EOS_ID, PAD_ID = 1, 0
NS = "palmflow.blocks"


class Tokenize(beam.DoFn):
  """document -> (bucket, (doc_id, int32 token ids)); the model is loaded in setup()."""

  def __init__(self, vocab_path: str, num_buckets: int, seed: int, batch_size: int = 256):
    self._vocab_path, self._buckets, self._seed = vocab_path, num_buckets, seed
    self._batch_size = batch_size
    self._docs = beam.metrics.Metrics.counter(NS, "documents")
    self._tokens = beam.metrics.Metrics.counter(NS, "tokens")
    self._empty = beam.metrics.Metrics.counter(NS, "empty_documents")

  def setup(self):
    import sentencepiece as spm
    with FileSystems.open(self._vocab_path) as f:
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())

  def start_bundle(self):
    self._batch = []

  def _flush(self):
    batch, self._batch = self._batch, []
    ids = self._sp.encode([d["text"] for d in batch])
    for d, toks in zip(batch, ids):
      self._docs.inc()
      if not toks:
        self._empty.inc()
        continue
      self._tokens.inc(len(toks) + 1)
      bucket = shards.stable_hash(self._seed, "bucket", d["id"]) % self._buckets
      yield bucket, (d["id"], np.asarray(toks, dtype=np.int32))

  def process(self, doc):
    self._batch.append(doc)
    if len(self._batch) >= self._batch_size:
      yield from self._flush()

  def finish_bundle(self):
    from apache_beam.utils.windowed_value import WindowedValue
    from apache_beam.transforms.window import GlobalWindow
    for kv in self._flush():
      yield WindowedValue(kv, 0, [GlobalWindow()])


def _example(tokens, segments, positions) -> bytes:
  import tensorflow as tf
  feat = lambda a: tf.train.Feature(int64_list=tf.train.Int64List(value=a.tolist()))
  return tf.train.Example(features=tf.train.Features(feature={
      "targets": feat(tokens), "targets_segment_ids": feat(segments),
      "targets_positions": feat(positions)})).SerializeToString()


class Block(beam.DoFn):
  """(bucket, [(doc_id, ids)]) -> (sort_key, tf.Example bytes) blocks of `block_length`."""

  def __init__(self, block_length: int, seed: int, mode: str):
    self._len, self._seed, self._mode = block_length, seed, mode
    self._blocks = beam.metrics.Metrics.counter(NS, "blocks")
    self._real = beam.metrics.Metrics.counter(NS, "non_pad_tokens")
    self._all = beam.metrics.Metrics.counter(NS, "block_tokens")
    self._trimmed = beam.metrics.Metrics.counter(NS, "trimmed_tokens")

  def _emit(self, bucket, index, tokens, segments, positions):
    self._blocks.inc()
    self._real.inc(int((segments > 0).sum()))
    self._all.inc(len(tokens))
    key = shards.stable_hash(self._seed, "shuffle", bucket, index)
    return key, _example(tokens, segments, positions)

  def process(self, item):
    bucket, docs = item
    docs = sorted(docs, key=lambda d: d[0])
    L = self._len
    if self._mode == "pad":
      for i, (_, ids) in enumerate(docs):
        ids = np.append(ids, EOS_ID).astype(np.int64)
        if len(ids) > L:
          self._trimmed.inc(len(ids) - L)
          ids = ids[:L]
        n = len(ids)
        pad = L - n
        yield self._emit(bucket, i, np.pad(ids, (0, pad)),
                         np.pad(np.ones(n, np.int64), (0, pad)),
                         np.pad(np.arange(n, dtype=np.int64), (0, pad)))
      return
    tokens = np.concatenate([np.append(ids, EOS_ID) for _, ids in docs]).astype(np.int64)
    doc_index = np.concatenate([np.full(len(ids) + 1, j, np.int64)
                                for j, (_, ids) in enumerate(docs)])
    positions = np.concatenate([np.arange(len(ids) + 1, dtype=np.int64) for _, ids in docs])
    for b, start in enumerate(range(0, len(tokens), L)):
      t, d, p = tokens[start:start + L], doc_index[start:start + L], positions[start:start + L]
      # segment ids restart at 1 inside each block; a document cut by a block boundary
      # continues in the next block with its positions carried over.
      seg = (d - d[0] + 1).astype(np.int64)
      pad = L - len(t)
      yield self._emit(bucket, b, np.pad(t, (0, pad)), np.pad(seg, (0, pad)),
                       np.pad(p, (0, pad)))


class TokenizeAndBlock(beam.PTransform):
  """documents -> (sort_key, serialized tf.Example) blocks."""

  def __init__(self, *, vocab_path: str, block_length: int, seed: int = 0,
               num_buckets: int = 8, mode: str = "concat"):
    super().__init__()
    if mode not in ("concat", "pad"):
      raise ValueError(f"mode must be 'concat' or 'pad', not {mode!r}")
    self._vocab, self._len, self._seed = vocab_path, block_length, seed
    self._buckets, self._mode = num_buckets, mode

  def expand(self, docs):
    return (docs
            | "Tokenize" >> beam.ParDo(Tokenize(self._vocab, self._buckets, self._seed))
            | "GroupBuckets" >> beam.GroupByKey()
            | "Block" >> beam.ParDo(Block(self._len, self._seed, self._mode)))


def build(p: beam.Pipeline, args) -> None:
  """Adds the job's transforms to `p`."""
  prefix = FileSystems.join(args.output_dir, "blocks")
  _ = (p
       | "ReadDocuments" >> beam.io.ReadFromText(args.documents)
       | "Parse" >> beam.Map(json.loads)
       | "TokenizeAndBlock" >> TokenizeAndBlock(
           vocab_path=args.vocab, block_length=args.block_length, seed=args.seed,
           num_buckets=args.num_buckets, mode=args.mode)
       | "WriteShards" >> shards.WriteShards(prefix, num_shards=args.num_shards,
                                             fmt=args.format))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--documents", required=True, help="JSONL document file pattern")
  parser.add_argument("--vocab", required=True, help="SentencePiece .model path")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--block_length", type=int, default=512)
  parser.add_argument("--mode", default="concat", choices=["concat", "pad"])
  parser.add_argument("--num_shards", type=int, default=4)
  parser.add_argument("--num_buckets", type=int, default=8,
                      help="documents are concatenated within each bucket (a unit of "
                           "parallelism); more buckets, more partial final blocks")
  parser.add_argument("--format", default="tfrecord", choices=["tfrecord", "array_record"])
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_known_args(argv)


def run(argv=None) -> dict:
  """Runs the job; returns the stats it also writes to `<output_dir>/stats.json`."""
  args, beam_args = parse_args(argv)
  p = beam.Pipeline(options=PipelineOptions(beam_args))
  build(p, args)
  result = p.run()
  result.wait_until_finish()
  c = {}
  for m in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NS))["counters"]:
    c[m.key.metric.name] = m.committed if m.committed is not None else m.attempted
  stats = {
      "documents": c.get("documents", 0), "empty_documents": c.get("empty_documents", 0),
      "tokens": c.get("tokens", 0), "blocks": c.get("blocks", 0),
      "block_length": args.block_length, "mode": args.mode,
      "non_pad_tokens": c.get("non_pad_tokens", 0),
      "trimmed_tokens": c.get("trimmed_tokens", 0),
      "packing_efficiency": c.get("non_pad_tokens", 0) / max(1, c.get("block_tokens", 0)),
      "num_shards": args.num_shards, "format": args.format, "seed": args.seed,
      "shard_pattern": shards.shard_pattern(FileSystems.join(args.output_dir, "blocks"),
                                            args.num_shards, args.format),
  }
  with FileSystems.create(FileSystems.join(args.output_dir, "stats.json.tmp")) as f:
    f.write(json.dumps(stats, indent=2, sort_keys=True).encode())
  FileSystems.rename([FileSystems.join(args.output_dir, "stats.json.tmp")],
                     [FileSystems.join(args.output_dir, "stats.json")])
  return stats


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  run()
