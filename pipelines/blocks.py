"""Beam job: tokenize documents and block them into fixed-length sequences (PaLM style).

Documents (the corpus stage's JSONL, one `{"id", "text", ...}` a line) are tokenized with a
SentencePiece model (built in each worker's `DoFn.setup`), concatenated with EOS after each and
cut into blocks of exactly `block_length` tokens. The input is cut into contiguous byte ranges
of about equal size (`--num_buckets` of them, plus file boundaries; a compressed file is one
range), the unit of parallelism: a worker reads its range, tokenizes its documents in batches
and cuts full blocks as it goes, in file order, so nothing per document crosses a shuffle.
It writes the blocks as sorted per-shard run files under `<output_dir>/runs.tmp/` and only
their names cross the shard shuffle; each shard's writer merges its runs (the folder is
deleted when the job is done).
Each range's tail, shorter than a block, is packed with all the other ranges' tails at the
end, so the whole output has at most one partly padded block: in a step of their own, or
where ranges x shards is small (`TAILS_TO_WRITERS_MAX`), by each shard's writer, which gets
every tail and keeps its own blocks of them (the same bytes, two steps fewer).

Each block carries `targets`, `targets_segment_ids` (1, 2, ... per document inside the block,
0 on padding) and `targets_positions` (restarting at 0 where each document starts; the rest of
a document cut by a block boundary continues as a segment of its own in the next block, or
among the packed tails, its positions again from 0, so positions stay below `block_length`),
so a model can confine attention to one document. `--mode=pad` instead trims or pads each
document into its own block. Blocks are shuffled across shards by a seeded hash; the output is
identical byte for byte for the same input files, vocabulary, `--num_buckets` and seed, on any
runner and any number of workers. `stats.json` has documents in and out, tokens, blocks,
packing efficiency (non-pad tokens / all tokens), per-source counts and rejections.

Records are `tf.train.Example`s serialized with numpy (`transforms/tfexample.py`): the workers
never import TensorFlow.

Local:
    python -m pipelines.blocks --runner=DirectRunner --documents='/tmp/corpus/documents*' \
        --vocab=/tmp/vocab/spm.model --output_dir=/tmp/blocks --block_length=512
Dataflow (workers get palmflow through --setup_file):
    python -m pipelines.blocks --runner=DataflowRunner --project=P --region=R \
        --temp_location=gs://B/tmp --setup_file=./setup.py --documents='gs://B/corpus/doc*' \
        --vocab=gs://B/vocab/spm.model --output_dir=gs://B/blocks --num_buckets=256
"""
from __future__ import annotations

import argparse
import codecs
import itertools
import json
import logging
import uuid
from typing import Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from pipelines.transforms import jobs, shards
from pipelines.transforms.progress import Reporter
from pipelines.transforms.tfexample import int64_example

EOS_ID, PAD_ID = 1, 0
NS = "palmflow.blocks"


class DocumentsError(ValueError):
  """The documents are not what the job reads (no file matched, a line is not a document)."""


# ----------------------------------------------------------------------------- blocks

def serialize_block(tokens, segments, positions) -> bytes:
  """The serialized tf.Example of one block (features `targets`, `targets_segment_ids`,
  `targets_positions`)."""
  return int64_example({"targets": tokens, "targets_segment_ids": segments,
                        "targets_positions": positions})


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


def join_documents(ids: Sequence[Sequence[int]], first_doc: int = 0):
  """Each document's token ids followed by EOS, all concatenated, and each token's document
  number (`first_doc`, `first_doc + 1`, ...); empty documents must be left out before."""
  lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + 1
  total = int(lengths.sum())
  tokens = np.empty(total, np.int64)
  ends = np.cumsum(lengths) - 1
  is_body = np.ones(total, bool)
  is_body[ends] = False
  tokens[ends] = EOS_ID
  tokens[is_body] = np.fromiter(itertools.chain.from_iterable(ids), np.int64,
                                total - len(ids))
  docs = np.repeat(np.arange(first_doc, first_doc + len(ids), dtype=np.int64), lengths)
  return tokens, docs


class ConcatPacker:
  """Cuts a stream of documents into blocks of exactly `length` tokens (concat mode).

  `add` takes the next documents' token ids and returns the blocks completed so far as
  (tokens, doc numbers) pairs; `tail()` is what is left (shorter than a block).
  """

  def __init__(self, length: int):
    self._len = length
    self._tok = np.zeros(0, np.int64)
    self._doc = np.zeros(0, np.int64)
    self._next_doc = 0

  def add(self, ids: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    if not ids:
      return []
    tok, doc = join_documents(ids, self._next_doc)
    self._next_doc += len(ids)
    if len(self._tok):
      tok, doc = np.concatenate([self._tok, tok]), np.concatenate([self._doc, doc])
    L = self._len
    full = len(tok) // L
    out = [(tok[b * L:(b + 1) * L], doc[b * L:(b + 1) * L]) for b in range(full)]
    self._tok, self._doc = tok[full * L:], doc[full * L:]
    return out

  def tail(self) -> tuple[np.ndarray, np.ndarray]:
    return self._tok, self._doc


class _BlockCounters(beam.DoFn):
  """Counters shared by the DoFns that tokenize and block (they feed `stats.json`)."""

  def __init__(self, block_length: int, seed: int, num_shards: int | None = None):
    self._len, self._seed, self._num_shards = block_length, seed, num_shards
    self._docs_in = beam.metrics.Metrics.counter(NS, "documents")
    self._tokens = beam.metrics.Metrics.counter(NS, "tokens")
    self._empty = beam.metrics.Metrics.counter(NS, "empty_documents")
    self._blocks = beam.metrics.Metrics.counter(NS, "blocks")
    self._real = beam.metrics.Metrics.counter(NS, "non_pad_tokens")
    self._all = beam.metrics.Metrics.counter(NS, "block_tokens")
    self._docs_out = beam.metrics.Metrics.counter(NS, "documents_out")
    self._per_source: dict = {}

  def _count_docs(self, doc_ids: Sequence[str], ids: Sequence[Sequence[int]]) -> None:
    """Counts documents going into blocks (each with its EOS), in all and per source."""
    if not doc_ids:
      return
    tokens = sum(map(len, ids)) + len(ids)
    # a document's source: its id's part before the first ":" (`<source>:<file>:<key>`,
    # see transforms/ingest.py)
    first, colon, _ = doc_ids[0].partition(":")
    per: dict[str, list[int]] = {}
    # the common case, one source a batch, checked without a Python loop
    if colon and all(map(str.startswith, doc_ids, itertools.repeat(first + ":"))):
      per[first] = [len(doc_ids), tokens]
    else:
      for doc_id, t in zip(doc_ids, ids):
        c = per.setdefault(doc_id.partition(":")[0], [0, 0])
        c[0] += 1
        c[1] += len(t) + 1
    self._docs_out.inc(len(doc_ids))
    self._tokens.inc(tokens)
    for src, (docs, toks) in per.items():
      if src not in self._per_source:
        self._per_source[src] = (
            beam.metrics.Metrics.counter(NS, f"source_documents[{src}]"),
            beam.metrics.Metrics.counter(NS, f"source_tokens[{src}]"))
      self._per_source[src][0].inc(docs)
      self._per_source[src][1].inc(toks)

  def _emit(self, key_parts, tokens, segments, positions):
    """(shuffle key, serialized block), counted; the key is a seeded hash `WriteShards`
    orders by."""
    self._blocks.inc()
    self._real.inc(int(np.count_nonzero(segments)))
    self._all.inc(len(tokens))
    return self._record(key_parts, tokens, segments, positions)

  def _record(self, key_parts, tokens, segments, positions):
    """(shuffle key, serialized block), not counted (for full blocks counted a batch at a
    time: counters cost a few microseconds an increment)."""
    return (shards.stable_hash(self._seed, "shuffle", *key_parts),
            serialize_block(tokens, segments, positions))

  def _batches(self, run_prefix: str | None = None):
    """A function sending (shuffle key, record) pairs on as they are (no `num_shards`), or
    collecting them into per-shard batches for `WriteShards(batched=True)` (call it with
    None at the end for the last batches). With `run_prefix`, each batch is written to a
    sorted run file `<run_prefix>-s<shard>-<n>` and only `(shard, path)` is sent on."""
    if not self._num_shards:
      return lambda records: records if records is not None else ()
    batcher = shards.ShardBatches(self._num_shards)
    written: dict[int, int] = {}

    def out(batches):
      for shard, batch in batches:
        if run_prefix is None:
          yield shard, batch
          continue
        n = written[shard] = written.get(shard, -1) + 1
        path = f"{run_prefix}-s{shard:05d}-{n:04d}"
        shards.write_run(path, batch)
        yield shard, path

    def send(records):
      if records is None:
        yield from out(batcher.finish())
        return
      for key, record in records:
        yield from out(batcher.add(key, record))
    return send

  def _pad_blocks(self, doc_ids, ids):
    """pad mode: one block per document, ids + EOS trimmed or padded to the block length."""
    for doc_id, toks in zip(doc_ids, ids):
      toks = np.append(np.asarray(toks, np.int64), EOS_ID)
      if len(toks) > self._len:
        self._trimmed.inc(len(toks) - self._len)
        self._trimmed_docs.inc()
        toks = toks[:self._len]
      yield self._emit(("doc", doc_id),
                       *block_features(toks, np.zeros(len(toks), np.int64), self._len))


REMAINDER = "remainder"
# what the DoFns below emit: (shuffle key or shard, record or batch of them or run file)
_KEYED = beam.typehints.Tuple[int, beam.typehints.Any]
_JSON = json.JSONDecoder()


def decode_json(text: str):
  """A JSON document from a decoded line (as `json.loads`, without its type checks)."""
  return _JSON.decode(text)


def tail_blocks(tails, block_length: int):
  """[(range, tokens, docs)] of the ranges' tails -> (b, tokens, docs) for each block `b` of
  them packed together in range order (only the last one short: `block_features` pads it).
  A document cut at its range's last full block continues here as a new segment."""
  tails = sorted(tails, key=lambda t: t[0])
  tails = [t for t in tails if len(t[1])]
  if not tails:
    return
  L = block_length
  tokens = np.concatenate([t[1] for t in tails])
  # documents numbered across ranges: (range, doc number) -> one increasing number
  offsets = np.cumsum([0] + [int(t[2].max()) + 1 for t in tails[:-1]])
  docs = np.concatenate([t[2] + off for t, off in zip(tails, offsets)])
  for b, start in enumerate(range(0, len(tokens), L)):
    yield b, tokens[start:start + L], docs[start:start + L]


@beam.typehints.with_output_types(_KEYED)  # (not inferred from the bytecode)
class BlockRemainders(_BlockCounters):
  """(0, [(range, tokens, docs)]) -> blocks of all the ranges' tails, in range order
  (`tail_blocks`)."""

  def process(self, item):
    _, tails = item
    send = self._batches()
    L = self._len
    yield from send(self._emit(("remainder", b), *block_features(tok, doc, L))
                    for b, tok, doc in tail_blocks(tails, L))
    yield from send(None)


class Tail:
  """A range's tail `(index, tokens, docs)`, sent to every shard's writer (`TailBlocks`)."""

  def __init__(self, index: int, tokens: np.ndarray, docs: np.ndarray):
    self.index, self.tokens, self.docs = index, tokens, docs


class TailBlocks(_BlockCounters):
  """`WriteShards`'s `resolve` for `Tail` parts: each shard's writer gets every range's tail,
  packs them all as `BlockRemainders` does (`tail_blocks`, the same keys and bytes through
  `_emit`) and keeps the blocks of its own shard; each block is counted by the one writer
  that keeps it. (A `_BlockCounters` for its counters and records, called by the writer's
  DoFn, not a step of its own.)

  For small jobs (ranges x shards tails cross the shuffle): it saves the tails' own shuffle
  and step, and the per-shard markers (every shard gets a tail from every range)."""

  def __call__(self, shard: int, num_shards: int, parts: list) -> list[tuple[int, bytes]]:
    bad = [p for p in parts if not isinstance(p, Tail)]
    if bad:
      raise TypeError(f"TailBlocks got a {type(bad[0]).__name__}, not a Tail")
    return [self._emit(("remainder", b), *block_features(tok, doc, self._len))
            for b, tok, doc in tail_blocks([(t.index, t.tokens, t.docs) for t in parts],
                                           self._len)
            if shards.stable_hash(self._seed, "shuffle", "remainder", b) % num_shards == shard]


# ----------------------------------------------------------------------------- reading ranges

def plan_ranges(pattern: str, num_ranges: int,
                max_range_bytes: int | None = None) -> list[tuple[int, str, int, int]]:
  """The input cut into about `num_ranges` contiguous byte ranges of about equal size (more if
  a range would exceed `max_range_bytes`).

  Returns `(index, path, start, end)` in file-name order; a range holds the lines that start
  at a byte offset in `[start, end)`. A compressed file (by extension) is one range with
  `end = -1` (read whole). The ranges depend only on the files' names and sizes and the
  two numbers.
  """
  found = FileSystems.match([pattern])[0].metadata_list
  if not found:
    raise DocumentsError(f"--documents {pattern!r} matches no file: give the corpus stage's "
                         "documents (a JSONL file pattern)")
  files = sorted((m.path, m.size_in_bytes) for m in found)
  total = sum(size for _, size in files)
  if max_range_bytes:
    num_ranges = max(num_ranges, -(-total // max_range_bytes))
  target = total / max(1, num_ranges)  # bytes a range
  out = []
  for path, size in files:
    if CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
      out.append((len(out), path, 0, -1))
      continue
    if not size:
      continue
    k = max(1, round(size / target))  # equal ranges of the file, none left over
    if max_range_bytes:
      k = max(k, -(-size // max_range_bytes))
    bounds = [size * j // k for j in range(k + 1)]
    first = len(out)
    out.extend((first + j, path, lo, hi) for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])))
  return out


def range_chunks(path: str, start: int, end: int,
                 chunk_bytes: int = 4 << 20) -> Iterator[tuple[int, list[bytes]]]:
  """The lines of `path` that start in `[start, end)` (`end = -1`: the whole file,
  decompressed by its extension), as `(byte offset of the first, lines)` a chunk.

  The lines come without their `\\n` (each had one, but for possibly the file's last), so a
  line starts `len(line) + 1` bytes after the one before. A UTF-8 byte order mark at the
  start of the file is skipped. Reading `chunk_bytes` at a time and splitting in C costs the
  job a tenth of what a `readline` a line did on 20 MB of short documents.
  """
  whole = end < 0
  chunk_bytes = max(chunk_bytes, 4)  # room to see a byte order mark and a byte more
  with FileSystems.open(path, compression_type=(CompressionTypes.AUTO if whole
                                                else CompressionTypes.UNCOMPRESSED)) as f:
    pos = 0         # where the next line (`rest` first) starts in the file
    if start > 0:   # the line running through `start - 1` belongs to the previous range
      f.seek(start - 1)
      pos = start - 1 + len(f.readline())
    read_to = pos   # the file position after what was read
    rest = b""      # the start of a line that runs on into the next chunk
    while whole or pos < end:
      want = chunk_bytes if whole else min(chunk_bytes, max(end - read_to, 1 << 16))
      data = f.read(want)
      read_to += len(data)
      if pos == 0 and not rest and data.startswith(codecs.BOM_UTF8):
        data, pos = data[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
        if not whole:  # the first line starts at 0 for which range owns it
          end = max(end, pos + 1)
      if not data:
        if rest:
          yield pos, [rest]
        return
      buf = rest + data if rest else data
      lines = buf.split(b"\n")
      rest = lines.pop()
      complete = len(buf) - len(rest)   # the bytes of the complete lines
      if not whole and end - pos < complete:  # the range ends among these lines
        yield pos, lines[:buf.count(b"\n", 0, max(0, end - pos - 1)) + 1]
        return
      if lines:
        yield pos, lines
      pos += complete


def range_lines(path: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
  """(byte offset, line without its `\\n`) for each line of `path` that starts in
  `[start, end)` (see `range_chunks`)."""
  for offset, lines in range_chunks(path, start, end):
    for line in lines:
      yield offset, line
      offset += len(line) + 1


@beam.typehints.with_output_types(_KEYED)  # (not inferred from the bytecode)
class TokenizeAndBlockRanges(_BlockCounters):
  """(index, path, start, end) byte range -> (shuffle key, serialized tf.Example) blocks.

  Reads the range's JSONL documents, encodes them `batch_size` at a time (one sentencepiece
  call a batch, on one thread: runners give each core its own SDK process) and cuts full
  blocks as it goes (concat mode); the range's tail goes to the `remainder` output as
  `(0, (index, tokens, docs))` for `BlockRemainders`, or with `tails_to_writers` to every
  shard as `(shard, Tail)` on the main output (for `TailBlocks`), empty or not. In pad mode
  each document is a block. With `num_shards`, blocks are collected for the whole bundle
  (`shards.ShardBatches`) and sent on, or written as run files, when it ends or they are
  large.
  """

  def __init__(self, vocab_path: str, block_length: int, seed: int, mode: str = "concat",
               batch_size: int = 256, num_shards: int | None = None,
               run_dir: str | None = None, tails_to_writers: bool = False):
    super().__init__(block_length, seed, num_shards)
    self._vocab_path, self._mode, self._batch_size = vocab_path, mode, batch_size
    self._run_dir, self._tails_to_writers = run_dir, tails_to_writers
    self._trimmed = beam.metrics.Metrics.counter(NS, "trimmed_tokens")
    self._trimmed_docs = beam.metrics.Metrics.counter(NS, "trimmed_documents")
    self._progress = Reporter("blocks", "documents tokenized")

  def setup(self):
    import sentencepiece as spm
    with FileSystems.open(self._vocab_path) as f:
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())
    self._progress.start()

  def teardown(self):
    self._progress.close()

  def start_bundle(self):
    # run files named by bundle (a retried bundle's are new files; the job deletes the folder)
    self._send = self._batches(FileSystems.join(self._run_dir, f"run-{uuid.uuid4().hex}")
                               if self._run_dir and self._num_shards else None)

  def finish_bundle(self):
    for out in self._send(None):
      yield GlobalWindows.windowed_value(out)

  def process(self, element):
    index, path, start, end = element
    packer = ConcatPacker(self._len) if self._mode == "concat" else None
    send = self._send
    block_no = 0
    doc_ids: list[str] = []
    texts: list[str] = []
    nbytes = 0

    def flush():
      nonlocal block_no, nbytes
      ids = self._sp.encode(texts, num_threads=1)
      self._docs_in.inc(len(texts))
      self._progress.add(len(texts), nbytes)
      nbytes = 0
      ids_of = doc_ids
      if not all(ids):  # (the common case checked without a Python loop)
        kept = [j for j, t in enumerate(ids) if t]
        self._empty.inc(len(ids) - len(kept))
        ids, ids_of = [ids[j] for j in kept], [doc_ids[j] for j in kept]
      self._count_docs(ids_of, ids)
      if packer is None:
        yield from send(self._pad_blocks(ids_of, ids))
        return
      blocks = []
      for tok, doc in packer.add(ids):  # full blocks: no padding
        blocks.append(self._record((index, block_no), *block_features(tok, doc, self._len)))
        block_no += 1
      if blocks:
        self._blocks.inc(len(blocks))
        self._real.inc(len(blocks) * self._len)
        self._all.inc(len(blocks) * self._len)
      yield from send(blocks)

    for offset, lines in range_chunks(path, start, end):
      for i, line in enumerate(lines):
        if not line or line.isspace():
          continue
        try:
          try:  # decoded here, not by json.loads(bytes), which sniffs each line's encoding
            doc = decode_json(line.decode("utf-8"))
          except ValueError:  # then as json.loads(bytes) reads it (a BOM, UTF-16/32)
            doc = json.loads(line)
          doc_id, text = doc["id"], doc["text"]
        except (ValueError, KeyError, TypeError) as e:
          at = offset + sum(len(x) + 1 for x in lines[:i])
          raise DocumentsError(
              f"{path}: the line at byte {at} is not a JSON document with 'id' and 'text' "
              f"({type(e).__name__}: {e}); the blocks job reads the corpus stage's "
              "documents") from None
        doc_ids.append(doc_id)
        texts.append(text)
        nbytes += len(line) + 1
        if len(texts) >= self._batch_size:
          yield from flush()
          doc_ids, texts = [], []
    if texts:
      yield from flush()
    if packer is not None:
      tok, doc = packer.tail()
      if self._tails_to_writers:
        tail = Tail(index, tok, doc)
        for shard in range(self._num_shards):
          yield shard, tail
      elif len(tok):
        yield beam.pvalue.TaggedOutput(REMAINDER, (0, (index, tok, doc)))


class TokenizeAndBlockFiles(beam.PTransform):
  """byte ranges (`plan_ranges`) -> (shuffle key, serialized tf.Example) blocks."""

  def __init__(self, *, vocab_path: str, block_length: int, seed: int = 0,
               mode: str = "concat", num_shards: int | None = None,
               run_dir: str | None = None, tails_to_writers: bool = False):
    """With `num_shards`, the output is `(shard_index, [(shuffle key, record), ...])`
    batches for `WriteShards(batched=True)` (few elements cross the shard shuffle); with
    `run_dir` too, the ranges' blocks are written there as sorted run files and only
    `(shard_index, path)` crosses it (the caller deletes `run_dir` after the job). With
    `tails_to_writers` (concat mode, `num_shards`) each range's tail goes to every shard as
    `(shard_index, Tail)`: give `WriteShards` `resolve=TailBlocks(...)` and
    `every_shard_fed=True`."""
    super().__init__()
    _check(block_length, mode)
    if tails_to_writers and (mode != "concat" or not num_shards):
      raise ValueError("tails_to_writers needs mode='concat' and num_shards")
    self._vocab, self._len, self._seed, self._mode = vocab_path, block_length, seed, mode
    self._num_shards, self._run_dir = num_shards, run_dir
    self._tails_to_writers = tails_to_writers

  def expand(self, ranges):
    fn = TokenizeAndBlockRanges(self._vocab, self._len, self._seed, self._mode,
                                num_shards=self._num_shards, run_dir=self._run_dir,
                                tails_to_writers=self._tails_to_writers)
    if self._mode == "pad" or self._tails_to_writers:
      return ranges | "TokenizeAndBlockRanges" >> beam.ParDo(fn)
    blocked = ranges | "TokenizeAndBlockRanges" >> beam.ParDo(fn).with_outputs(
        REMAINDER, main="blocks")
    tails = blocked[REMAINDER] | "Tails" >> PackTails(self._len, self._seed, self._num_shards)
    return (blocked.blocks, tails) | "AllBlocks" >> beam.Flatten()


class PackTails(beam.PTransform):
  """(0, (range, tokens, docs)) tails -> their blocks, packed together in range order."""

  def __init__(self, block_length: int, seed: int, num_shards: int | None = None):
    super().__init__()
    self._len, self._seed, self._num_shards = block_length, seed, num_shards

  def expand(self, tails):
    return (tails
            | "GroupRemainders" >> beam.GroupByKey()
            | "BlockRemainders" >> beam.ParDo(BlockRemainders(self._len, self._seed,
                                                               self._num_shards)))


def _check(block_length: int, mode: str) -> None:
  if mode not in ("concat", "pad"):
    raise ValueError(f"mode must be 'concat' or 'pad', not {mode!r}")
  if block_length < 2:
    raise ValueError(f"block_length must be at least 2, not {block_length}")


# ----------------------------------------------------------------------------- documents in a PCollection

class Tokenize(beam.DoFn):
  """document -> (bucket, (doc_id, int32 token ids)); the model is loaded in setup().

  For documents that are already a PCollection (`TokenizeAndBlock`); the job itself reads
  files with `TokenizeAndBlockFiles`. Documents are encoded `batch_size` at a time; the ids
  cross the bucket shuffle through `Tokenize.IdsCoder` (raw bytes) instead of pickle.
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
    empty = 0
    for d, toks in zip(batch, ids):
      if not toks:
        empty += 1
        continue
      bucket = shards.stable_hash(self._seed, "bucket", d["id"]) % self._buckets
      yield bucket, (d["id"], np.fromiter(toks, np.int32, len(toks)))
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


class Block(_BlockCounters):
  """(bucket, [(doc_id, ids)]) -> (shuffle key, tf.Example bytes) full blocks.

  The bucket's documents are concatenated in id order with EOS after each and cut into full
  blocks; the tail goes to the `remainder` output as `(0, (bucket, tokens, docs))`.
  """

  def process(self, item):
    bucket, docs = item
    docs = sorted(docs, key=lambda d: (d[0], d[1].tobytes()))  # GroupByKey's order is any
    doc_ids, ids = [d[0] for d in docs], [d[1] for d in docs]
    self._count_docs(doc_ids, ids)
    packer = ConcatPacker(self._len)
    for b, (tok, doc) in enumerate(packer.add(ids)):
      yield self._emit((bucket, b), *block_features(tok, doc, self._len))
    tok, doc = packer.tail()
    if len(tok):
      yield beam.pvalue.TaggedOutput(REMAINDER, (0, (bucket, tok, doc)))


class PadBlock(_BlockCounters):
  """(bucket, (doc_id, ids)) -> one block per document: ids + EOS, trimmed or padded."""

  def __init__(self, block_length: int, seed: int):
    super().__init__(block_length, seed)
    self._trimmed = beam.metrics.Metrics.counter(NS, "trimmed_tokens")
    self._trimmed_docs = beam.metrics.Metrics.counter(NS, "trimmed_documents")

  def process(self, item):
    _, (doc_id, ids) = item
    self._count_docs([doc_id], [ids])
    yield from self._pad_blocks([doc_id], [ids])


class BlockTokens(beam.PTransform):
  """(bucket, (doc_id, token ids)) -> (shuffle key, serialized tf.Example) blocks.

  `concat` (PaLM): each bucket's documents joined with EOS and cut into blocks of exactly
  `block_length`, the buckets' tails packed together at the end (at most one padded block
  in all). `pad`: one block per document, trimmed or padded.
  """

  def __init__(self, *, block_length: int, seed: int = 0, mode: str = "concat"):
    super().__init__()
    _check(block_length, mode)
    self._len, self._seed, self._mode = block_length, seed, mode

  def expand(self, tokens):
    if self._mode == "pad":
      return tokens | "PadBlock" >> beam.ParDo(PadBlock(self._len, self._seed))
    blocked = (tokens
               | "GroupBuckets" >> beam.GroupByKey()
               | "Block" >> beam.ParDo(Block(self._len, self._seed)).with_outputs(
                   REMAINDER, main="blocks"))
    tails = blocked[REMAINDER] | "Tails" >> PackTails(self._len, self._seed)
    return (blocked.blocks, tails) | "AllBlocks" >> beam.Flatten()


class TokenizeAndBlock(beam.PTransform):
  """documents (a PCollection of dicts) -> (shuffle key, serialized tf.Example) blocks."""

  def __init__(self, *, vocab_path: str, block_length: int, seed: int = 0,
               num_buckets: int = 8, mode: str = "concat"):
    super().__init__()
    _check(block_length, mode)
    self._vocab, self._len, self._seed = vocab_path, block_length, seed
    self._buckets, self._mode = num_buckets, mode

  def expand(self, docs):
    return (docs
            | "Tokenize" >> beam.ParDo(Tokenize(self._vocab, self._buckets, self._seed))
            | "Block" >> BlockTokens(block_length=self._len, seed=self._seed,
                                     mode=self._mode))


# ----------------------------------------------------------------------------- the job

def run_dir(args) -> str:
  """Where the workers write their sorted runs of blocks (deleted when the job is done)."""
  return FileSystems.join(args.output_dir, "runs.tmp")


def _delete_runs(args) -> None:
  """Deletes the run files (by listing them: on object stores a folder is only a prefix),
  then the local folder if there is one."""
  path = run_dir(args)
  found = FileSystems.match([FileSystems.join(path, "*")])[0].metadata_list
  if found:
    FileSystems.delete([m.path for m in found])
  if FileSystems.exists(path):
    FileSystems.delete([path])


# the most tails (ranges x shards) sent to every shard's writer (`TailBlocks`); past it they
# are packed in a step of their own (`PackTails`), and shards get markers
TAILS_TO_WRITERS_MAX = 256


def build(p: beam.Pipeline, args) -> None:
  """Adds the job's transforms to `p`."""
  prefix = FileSystems.join(args.output_dir, "blocks")
  ranges = plan_ranges(args.documents, args.num_buckets, int(args.max_range_mb * 1e6))
  # small jobs: the writers pack the tails (no tails' shuffle, no markers: each shard gets
  # every range's tail); the output is the same bytes either way
  to_writers = (args.mode == "concat"
                and 0 < len(ranges) * args.num_shards <= TAILS_TO_WRITERS_MAX)
  _ = (p
       | "ReadDocuments" >> jobs.CreateSpread(ranges,
                                              spread=not jobs.one_local_worker(p.options))
       | "TokenizeAndBlock" >> TokenizeAndBlockFiles(
           vocab_path=args.vocab, block_length=args.block_length, seed=args.seed,
           mode=args.mode, num_shards=args.num_shards, run_dir=run_dir(args),
           tails_to_writers=to_writers)
       | "WriteShards" >> shards.WriteShards(
           prefix, num_shards=args.num_shards, fmt=args.format, batched=True,
           resolve=TailBlocks(args.block_length, args.seed) if to_writers else None,
           every_shard_fed=to_writers))


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
                      help="the documents are cut into about this many contiguous byte ranges "
                           "(plus file boundaries), each read, tokenized and blocked by one "
                           "worker: the unit of parallelism")
  parser.add_argument("--max_range_mb", type=float, default=256,
                      help="more ranges than --num_buckets where a range would be larger "
                           "(so a large corpus spreads over workers whatever --num_buckets)")
  parser.add_argument("--format", default="tfrecord", choices=["tfrecord", "array_record"])
  parser.add_argument("--seed", type=int, default=0)
  args, beam_args = parser.parse_known_args(argv)
  return args, jobs.reject_unknown_flags(parser, beam_args)


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
      "max_range_mb": args.max_range_mb,
      "format": args.format, "seed": args.seed,
      "shard_pattern": shards.shard_pattern(FileSystems.join(args.output_dir, "blocks"),
                                            args.num_shards, args.format),
  }


def run(argv=None) -> dict:
  """Runs the job; returns the stats it also writes to `<output_dir>/stats.json`."""
  args, beam_args = parse_args(argv)
  p = jobs.make_pipeline(beam_args)
  build(p, args)
  counters = jobs.run_and_count(p, NS)
  if counters is None:  # --dry_run: the job graph was built and nothing ran
    return {}
  _delete_runs(args)
  stats = stats_from_counters(counters, args)
  jobs.write_json(FileSystems.join(args.output_dir, "stats.json"), stats)
  return stats


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  # run through the importable module, not this `__main__` copy of it: the job's classes
  # then pickle by reference (`pipelines.blocks.X`), which the workers can import
  from pipelines import blocks as job
  job.run()
