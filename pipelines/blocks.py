"""Beam job: tokenize documents and block them into fixed-length sequences (PaLM style).

Documents are tokenized with a SentencePiece model (built in each worker's `DoFn.setup`),
concatenated with EOS after each and cut into blocks of exactly `block_length` tokens: the
documents of each bucket (a seeded hash of the id picks it; the unit of parallelism) are
concatenated in id order, full blocks are cut, and the buckets' shorter tails are packed
together at the end, so the whole output has at most one partly padded block.
Each block carries `targets`, `targets_segment_ids` (1, 2, ... per document inside the block,
0 on padding) and `targets_positions` (restarting at 0 where each document starts; the rest
of a document cut by a block boundary continues as a segment of its own in the next block
(segment 1), or among the packed tails, its positions again from 0, so positions stay below
`block_length`), so a model can confine attention to one document. `--mode=pad` instead trims or pads each document into its own block.
Blocks are shuffled across shards by a seeded hash; the output is identical byte for byte
for the same input, vocabulary and seed. `stats.json` has documents in and out, tokens,
blocks, packing efficiency (non-pad tokens / all tokens), per-source counts and rejections.

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

from pipelines.transforms import jobs, shards
from pipelines.transforms.progress import Progress

EOS_ID, PAD_ID = 1, 0
NS = "palmflow.blocks"


class Tokenize(beam.DoFn):
  """document -> (bucket, (doc_id, int32 token ids)); the model is loaded in setup().

  Documents are encoded `batch_size` at a time, one sentencepiece call per batch on one
  thread: runners give each core its own SDK process (Dataflow, DirectRunner's
  multi_processing), so more threads per call only contend. The output is typed, so the ids
  cross the GroupBuckets shuffle through `Tokenize.IdsCoder` (raw bytes) instead of pickle,
  which cost about 25 µs per document, a third of the encoding itself.
  """

  class IdsCoder(beam.coders.Coder):
    """A numpy array as its dtype, shape and raw bytes; decodes to a writable array."""

    def encode(self, value) -> bytes:
      import pickle
      import struct
      a = np.asarray(value)
      if a.dtype.hasobject:
        return b"\x00" + pickle.dumps(a, protocol=5)
      dtype = a.dtype.str.encode()
      return (bytes([len(dtype)]) + dtype + struct.pack(f"<B{a.ndim}q", a.ndim, *a.shape)
              + np.ascontiguousarray(a).tobytes())

    def decode(self, encoded: bytes):
      import pickle
      import struct
      n = encoded[0]
      if n == 0:
        return pickle.loads(encoded[1:])
      dtype = np.dtype(encoded[1:1 + n].decode())
      ndim = encoded[1 + n]
      shape = struct.unpack_from(f"<{ndim}q", encoded, 2 + n)
      return np.frombuffer(encoded, dtype, offset=2 + n + 8 * ndim).reshape(shape).copy()

    def estimate_size(self, value) -> int:
      # byte-size metrics only: skip encoding just to measure
      return getattr(value, "nbytes", 0) + 12

    def is_deterministic(self) -> bool:
      return True

    def to_type_hint(self):
      return np.ndarray

  def __init__(self, vocab_path: str, num_buckets: int, seed: int, batch_size: int = 256):
    self._vocab_path, self._buckets, self._seed = vocab_path, num_buckets, seed
    self._batch_size = batch_size
    self._docs = beam.metrics.Metrics.counter(NS, "documents")
    self._tokens = beam.metrics.Metrics.counter(NS, "tokens")
    self._empty = beam.metrics.Metrics.counter(NS, "empty_documents")
    # Where the job is built: numpy arrays in typed PCollections use IdsCoder (idempotent).
    beam.coders.registry.register_coder(np.ndarray, Tokenize.IdsCoder)

  def default_type_hints(self):
    return super().default_type_hints().with_output_types(
        beam.typehints.Tuple[int, beam.typehints.Tuple[str, np.ndarray]])

  def setup(self):
    import sentencepiece as spm
    with FileSystems.open(self._vocab_path) as f:
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())

  def start_bundle(self):
    self._batch = []

  def _flush(self):
    batch, self._batch = self._batch, []
    if not batch:
      return
    ids = self._sp.encode([d["text"] for d in batch], num_threads=1)
    self._docs.inc(len(batch))
    empty = tokens = 0
    for d, toks in zip(batch, ids):
      n = len(toks)
      if not n:
        empty += 1
        continue
      tokens += n + 1
      bucket = shards.stable_hash(self._seed, "bucket", d["id"]) % self._buckets
      yield bucket, (d["id"], np.fromiter(toks, np.int32, n))
    self._tokens.inc(tokens)
    if empty:
      self._empty.inc(empty)

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


def block_features(tokens: np.ndarray, docs: np.ndarray, length: int):
  """One block's (targets, segment ids, positions), padded to `length`.

  Args:
    tokens: at most `length` token ids (each document's tokens followed by its EOS).
    docs: for each token, a number naming its document (equal numbers are adjacent).
    length: the block length.
  Returns:
    Three int64 arrays of `length`: the tokens then PAD_ID; segment ids 1, 2, ... for the
    documents in order of appearance, 0 on padding; positions restarting at 0 where each
    document (or the rest of a document cut by the previous block boundary) starts, 0 on
    padding. Positions stay below `length`, so any position scheme sized for the block fits.
  """
  n = len(tokens)
  starts = np.ones(n, dtype=bool)
  starts[1:] = docs[1:] != docs[:-1]
  seg = np.cumsum(starts, dtype=np.int64)
  pos = np.arange(n, dtype=np.int64) - np.flatnonzero(starts)[seg - 1]
  pad = length - n
  return (np.pad(np.asarray(tokens, np.int64), (0, pad)), np.pad(seg, (0, pad)),
          np.pad(pos, (0, pad)))


def source_of(doc_id: str) -> str:
  """The source name of a document id (`<source>:<file>:<key>`, see transforms/ingest.py)."""
  return doc_id.partition(":")[0]


class _CountingBlockFn(beam.DoFn):
  """Counters shared by the blocking DoFns (they feed `stats.json`)."""

  def __init__(self, block_length: int, seed: int):
    self._len, self._seed = block_length, seed
    self._blocks = beam.metrics.Metrics.counter(NS, "blocks")
    self._real = beam.metrics.Metrics.counter(NS, "non_pad_tokens")
    self._all = beam.metrics.Metrics.counter(NS, "block_tokens")
    self._docs_out = beam.metrics.Metrics.counter(NS, "documents_out")
    self._per_source: dict = {}

  def _count_doc(self, doc_id: str, tokens: int) -> None:
    self._docs_out.inc()
    src = source_of(doc_id)
    if src not in self._per_source:
      self._per_source[src] = (beam.metrics.Metrics.counter(NS, f"source_documents[{src}]"),
                               beam.metrics.Metrics.counter(NS, f"source_tokens[{src}]"))
    docs, toks = self._per_source[src]
    docs.inc()
    toks.inc(tokens)

  def _emit(self, key_parts, tokens, segments, positions):
    self._blocks.inc()
    self._real.inc(int((segments > 0).sum()))
    self._all.inc(len(tokens))
    return shards.stable_hash(self._seed, "shuffle", *key_parts), _example(
        tokens, segments, positions)


def _sorted_docs(docs):
  """A bucket's documents in a fixed order (GroupByKey gives them in any order)."""
  return sorted(docs, key=lambda d: (d[0], d[1].tobytes()))


class Block(_CountingBlockFn):
  """(bucket, [(doc_id, ids)]) -> (sort_key, tf.Example bytes) full blocks of `block_length`.

  Documents are concatenated in id order with EOS after each and cut into full blocks; the
  tail shorter than a block goes to the `remainder` output as `(0, (bucket, tokens, docs))`
  so that `BlockRemainders` can pack all buckets' tails together: the whole output then has
  at most one partly padded block. (`mode` is kept for compatibility: `pad` is `PadBlock`.)
  """

  REMAINDER = "remainder"

  def __init__(self, block_length: int, seed: int, mode: str = "concat"):
    super().__init__(block_length, seed)
    if mode != "concat":
      raise ValueError(f"Block does mode 'concat'; mode {mode!r} is PadBlock's")

  def process(self, item):
    bucket, docs = item
    docs = _sorted_docs(docs)
    for doc_id, ids in docs:
      self._count_doc(doc_id, len(ids) + 1)
    L = self._len
    tokens = np.concatenate([np.append(ids, EOS_ID) for _, ids in docs]).astype(np.int64)
    doc_index = np.concatenate([np.full(len(ids) + 1, j, np.int64)
                                for j, (_, ids) in enumerate(docs)])
    full = len(tokens) // L
    for b in range(full):
      sl = slice(b * L, (b + 1) * L)
      yield self._emit((bucket, b), *block_features(tokens[sl], doc_index[sl], L))
    if full * L < len(tokens):
      yield beam.pvalue.TaggedOutput(self.REMAINDER, (0, (bucket, tokens[full * L:],
                                                          doc_index[full * L:])))


class BlockRemainders(_CountingBlockFn):
  """(0, [(bucket, tokens, docs)]) -> blocks of the buckets' tails, in bucket order.

  Only the last block is padded. A document cut at its bucket's last full block continues
  here as a new segment.
  """

  def process(self, item):
    _, tails = item
    tails = sorted(tails, key=lambda t: t[0])
    if not tails:
      return
    L = self._len
    tokens = np.concatenate([t[1] for t in tails])
    # documents numbered across buckets: (bucket index, doc index) -> one increasing number
    offsets = np.cumsum([0] + [int(t[2].max()) + 1 for t in tails[:-1]])
    docs = np.concatenate([t[2] + off for t, off in zip(tails, offsets)])
    for b, start in enumerate(range(0, len(tokens), L)):
      sl = slice(start, start + L)
      yield self._emit(("remainder", b), *block_features(tokens[sl], docs[sl], L))


class PadBlock(_CountingBlockFn):
  """(bucket, (doc_id, ids)) -> one block per document: ids + EOS, trimmed or padded."""

  def __init__(self, block_length: int, seed: int):
    super().__init__(block_length, seed)
    self._trimmed = beam.metrics.Metrics.counter(NS, "trimmed_tokens")
    self._trimmed_docs = beam.metrics.Metrics.counter(NS, "trimmed_documents")

  def process(self, item):
    _, (doc_id, ids) = item
    ids = np.append(ids, EOS_ID).astype(np.int64)
    self._count_doc(doc_id, len(ids))
    if len(ids) > self._len:
      self._trimmed.inc(len(ids) - self._len)
      self._trimmed_docs.inc()
      ids = ids[:self._len]
    yield self._emit(("doc", doc_id),
                     *block_features(ids, np.zeros(len(ids), np.int64), self._len))


class BlockTokens(beam.PTransform):
  """(bucket, (doc_id, token ids)) -> (sort_key, serialized tf.Example) blocks.

  `concat` (PaLM): each bucket's documents joined with EOS and cut into blocks of exactly
  `block_length`, the buckets' tails packed together at the end (at most one padded block
  in all). `pad`: one block per document, trimmed or padded. The sort key is a seeded hash:
  `WriteShards` uses it to shuffle blocks across shards.
  """

  def __init__(self, *, block_length: int, seed: int = 0, mode: str = "concat"):
    super().__init__()
    if mode not in ("concat", "pad"):
      raise ValueError(f"mode must be 'concat' or 'pad', not {mode!r}")
    if block_length < 2:
      raise ValueError(f"block_length must be at least 2, not {block_length}")
    self._len, self._seed, self._mode = block_length, seed, mode

  def expand(self, tokens):
    if self._mode == "pad":
      return tokens | "PadBlock" >> beam.ParDo(PadBlock(self._len, self._seed))
    blocked = (tokens
               | "GroupBuckets" >> beam.GroupByKey()
               | "Block" >> beam.ParDo(Block(self._len, self._seed)).with_outputs(
                   Block.REMAINDER, main="blocks"))
    tails = (blocked[Block.REMAINDER]
             | "GroupRemainders" >> beam.GroupByKey()
             | "BlockRemainders" >> beam.ParDo(BlockRemainders(self._len, self._seed)))
    return (blocked.blocks, tails) | "AllBlocks" >> beam.Flatten()


class TokenizeAndBlock(beam.PTransform):
  """documents -> (sort_key, serialized tf.Example) blocks (see `BlockTokens`)."""

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
            | "Block" >> BlockTokens(block_length=self._len, seed=self._seed,
                                     mode=self._mode))


def build(p: beam.Pipeline, args) -> None:
  """Adds the job's transforms to `p`."""
  prefix = FileSystems.join(args.output_dir, "blocks")
  _ = (p
       | "ReadDocuments" >> beam.io.ReadFromText(args.documents)
       | "Parse" >> beam.Map(json.loads)
       | "Progress" >> Progress("blocks", "documents read")
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
                           "parallelism: a bucket's documents are held by one worker)")
  parser.add_argument("--format", default="tfrecord", choices=["tfrecord", "array_record"])
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_known_args(argv)


def stats_from_counters(c: dict, args) -> dict:
  """`stats.json` from the job's counters (namespace NS) and its arguments."""
  per_source: dict = {}
  for name, value in c.items():
    what, _, src = name.partition("[")
    if what in ("source_documents", "source_tokens") and src:
      per_source.setdefault(src.rstrip("]"), {})[what.split("_")[1]] = value
  docs_in = c.get("documents", 0)
  rejections = {"empty_after_tokenization": c.get("empty_documents", 0)}
  if args.mode == "pad":
    rejections["trimmed_documents"] = c.get("trimmed_documents", 0)
  return {
      "documents": docs_in, "documents_in": docs_in,
      "documents_out": c.get("documents_out", 0),
      "empty_documents": c.get("empty_documents", 0),
      "tokens": c.get("tokens", 0), "blocks": c.get("blocks", 0),
      "block_length": args.block_length, "mode": args.mode,
      "non_pad_tokens": c.get("non_pad_tokens", 0),
      "block_tokens": c.get("block_tokens", 0),
      "trimmed_tokens": c.get("trimmed_tokens", 0),
      "packing_efficiency": c.get("non_pad_tokens", 0) / max(1, c.get("block_tokens", 0)),
      "per_source": per_source, "rejections": rejections,
      "num_shards": args.num_shards, "num_buckets": args.num_buckets,
      "format": args.format, "seed": args.seed,
      "shard_pattern": shards.shard_pattern(FileSystems.join(args.output_dir, "blocks"),
                                            args.num_shards, args.format),
  }


def run(argv=None) -> dict:
  """Runs the job; returns the stats it also writes to `<output_dir>/stats.json`."""
  args, beam_args = parse_args(argv)
  p = beam.Pipeline(options=PipelineOptions(beam_args))
  build(p, args)
  counters = jobs.run_and_count(p, NS)
  if counters is None:  # --dry_run: the job graph was built and nothing ran
    return {}
  stats = stats_from_counters(counters, args)
  jobs.write_json(FileSystems.join(args.output_dir, "stats.json"), stats)
  return stats


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  run()
