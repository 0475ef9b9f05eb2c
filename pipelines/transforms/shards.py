"""Deterministic sharded output: the same input and seed give the same bytes in every shard.

Elements are `(sort_key: int, record: bytes)`. A record goes to shard `sort_key % num_shards`
and each shard is written in `sort_key` order (ties by record bytes), under a temporary name
renamed into place, so a shard file either is whole or does not exist. Every shard is written,
empty or not, so the shard pattern always matches `num_shards` files.

Formats: `tfrecord`, `jsonl` and `text` (one record per line; records must not contain a
newline) work with local paths and any Beam filesystem (gs://...); `array_record` writes
through the library's own C++ I/O, so local (or FUSE-mounted) paths only.
"""
from __future__ import annotations

import hashlib
import heapq
import struct

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

FORMATS = ("tfrecord", "jsonl", "text", "array_record")
_EXT = {"tfrecord": "tfrecord", "jsonl": "jsonl", "text": "txt", "array_record": "array_record"}


def stable_hash(*parts) -> int:
  """A 63-bit hash of the parts that is the same on every machine and Python run."""
  h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
  return int.from_bytes(h, "big") >> 1


def shard_name(prefix: str, index: int, count: int, fmt: str) -> str:
  """The file name of shard `index` of `count` (e.g. `blocks.tfrecord-00001-of-00004`)."""
  return f"{prefix}.{_EXT[fmt]}-{index:05d}-of-{count:05d}"


def shard_pattern(prefix: str, count: int, fmt: str) -> str:
  """A glob matching all `count` shards written under `prefix` in format `fmt`."""
  return f"{prefix}.{_EXT[fmt]}-*-of-{count:05d}"


@beam.typehints.with_output_types(beam.typehints.Tuple[int, int])
class _WriteShard(beam.DoFn):
  def __init__(self, prefix: str, num_shards: int, fmt: str, resolve=None):
    self._prefix, self._n, self._fmt, self._resolve = prefix, num_shards, fmt, resolve

  def process(self, item):
    index, parts = item
    # in-memory (key, record) pairs, sorted run files (`write_run`) to merge with them, and
    # parts for `resolve` to turn into more pairs
    runs, keyed, other = [], [], []
    for x in parts:
      (runs if isinstance(x, str) else keyed if isinstance(x, (tuple, list)) else other
       ).append(x)
    if other:
      if self._resolve is None:
        raise TypeError(f"WriteShards got {type(other[0]).__name__} parts and no `resolve`")
      keyed.extend(self._resolve(index, self._n, other))
    keyed = sorted(map(tuple, keyed))
    records = [r for _, r in heapq.merge(keyed, *(read_run(path) for path in sorted(runs)))]
    final = shard_name(self._prefix, index, self._n, self._fmt)
    tmp = final + ".tmp"
    if self._fmt == "tfrecord":
      from apache_beam.io.tfrecordio import _TFRecordUtil
      with FileSystems.create(tmp) as f:
        for r in records:
          _TFRecordUtil.write_record(f, r)
    elif self._fmt in ("jsonl", "text"):
      with FileSystems.create(tmp) as f:
        for r in records:
          f.write(r + b"\n")
    else:  # array_record: local paths only (the library writes through its own C++ I/O)
      import os
      from array_record.python.array_record_module import ArrayRecordWriter
      os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
      w = ArrayRecordWriter(tmp, "group_size:1")
      for r in records:
        w.write(r)
      w.close()
    FileSystems.rename([tmp], [final])
    yield index, len(records)


class WriteShards(beam.PTransform):
  """(sort_key, bytes) -> shard files; outputs (shard_index, record_count) per shard.

  With `batched=True` the input is instead `(shard_index, part)`, where a part is a batch
  `[(sort_key, bytes), ...]` (`ShardBatches` makes them) or the path of a run file of such
  pairs (`write_run`): the producer has already picked each record's shard
  (`sort_key % num_shards`), and a few elements cross the shuffle instead of one per record
  (with run files, only their names). A shard's writer merges its batches and runs in key
  order; run files are the producer's to delete once the job is done.

  A batched part may also be any other object (not a str, list or tuple): a shard's writer
  hands all of its such parts to `resolve(shard_index, num_shards, parts)`, which returns
  more `(sort_key, bytes)` pairs for that shard (the blocks job sends each range's last,
  partial block to every writer this way, and each writer packs them and keeps its own).
  `every_shard_fed=True` says the producer sends each shard at least one part, so no
  per-shard markers are needed (one step less).
  """

  def __init__(self, prefix: str, *, num_shards: int, fmt: str = "tfrecord",
               batched: bool = False, resolve=None, every_shard_fed: bool = False):
    super().__init__()
    if fmt not in FORMATS:
      raise ValueError(f"unknown shard format {fmt!r}; use one of {FORMATS}")
    if (resolve is not None or every_shard_fed) and not batched:
      raise ValueError("resolve and every_shard_fed need batched=True")
    self._prefix, self._n, self._fmt, self._batched = prefix, num_shards, fmt, batched
    self._resolve, self._fed = resolve, every_shard_fed

  def expand(self, pcoll):
    n = self._n
    # named functions with type hints: Beam need not infer types from the bytecode of lambdas
    if self._batched:
      keyed, join = pcoll, _join_batches
    else:
      keyed = pcoll | "ByShard" >> beam.Map(_by_shard, n).with_output_types(
          beam.typehints.Tuple[int, beam.typehints.Any])
      join = _drop_markers
    if not self._fed:
      # a marker per shard, so that every shard is written even when it gets no record
      # (few elements: no reshuffle, which would add steps to the job for nothing)
      empty = (pcoll.pipeline
               | "AllShards" >> beam.Create([(i, None) for i in range(n)], reshuffle=False))
      keyed = (keyed, empty) | "Merge" >> beam.Flatten()
    return (keyed
            | "GroupShard" >> beam.GroupByKey()
            | "DropMarkers" >> beam.MapTuple(join).with_output_types(
                beam.typehints.Tuple[int, beam.typehints.List[beam.typehints.Any]])
            | "Write" >> beam.ParDo(_WriteShard(self._prefix, n, self._fmt, self._resolve)))


_RUN_HEADER = struct.Struct("<QI")  # sort key, record length


def write_run(path: str, keyed) -> None:
  """Writes (sort_key, record) pairs sorted by (key, record) to a run file (atomically)."""
  with FileSystems.create(path + ".tmp") as f:
    for key, record in sorted(keyed):
      f.write(_RUN_HEADER.pack(key, len(record)))
      f.write(record)
  FileSystems.rename([path + ".tmp"], [path])


def read_run(path: str):
  """The (sort_key, record) pairs of a run file, in order."""
  with FileSystems.open(path) as f:
    data = f.read()
  at, n = 0, len(data)
  while at < n:
    key, size = _RUN_HEADER.unpack_from(data, at)
    at += _RUN_HEADER.size
    yield key, data[at:at + size]
    at += size


class ShardBatches:
  """Collects (sort_key, bytes) records into `(shard_index, [(sort_key, bytes), ...])`
  batches for `WriteShards(batched=True)`: `add` returns the batches that reached about
  `max_bytes` (all of them once they hold `max_total_bytes` together), `finish` the rest (in
  shard order)."""

  def __init__(self, num_shards: int, max_bytes: int = 64 << 20,
               max_total_bytes: int = 128 << 20):
    self._n, self._max, self._max_total = num_shards, max_bytes, max_total_bytes
    self._batches: dict[int, list] = {}
    self._sizes: dict[int, int] = {}
    self._total = 0

  def add(self, key: int, record: bytes) -> list[tuple[int, list]]:
    shard = key % self._n
    self._batches.setdefault(shard, []).append((key, record))
    self._sizes[shard] = self._sizes.get(shard, 0) + len(record)
    self._total += len(record)
    if self._total >= self._max_total:
      return self.finish()
    if self._sizes[shard] < self._max:
      return []
    self._total -= self._sizes.pop(shard)
    return [(shard, self._batches.pop(shard))]

  def finish(self) -> list[tuple[int, list]]:
    out = [(shard, self._batches[shard]) for shard in sorted(self._batches)]
    self._batches, self._sizes, self._total = {}, {}, 0
    return out


def _by_shard(kv, n: int):
  return kv[0] % n, kv


def _drop_markers(index: int, items):
  return index, [x for x in items if x]


def _join_batches(index: int, parts):
  out = []
  for part in parts:
    if isinstance(part, list):
      out.extend(part)       # a batch of (key, record)
    elif part is not None:   # (None: a marker)
      out.append(part)       # a run file, or a part for `resolve`
  return index, out
