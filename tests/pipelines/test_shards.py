"""WriteShards: every shard written, records sorted by key, batched input equal to unbatched."""
from __future__ import annotations

import glob
import random
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.transforms import shards


def records(n: int, seed: int = 0) -> list[tuple[int, bytes]]:
  rng = random.Random(seed)
  return [(rng.getrandbits(40), f"record {i}".encode() * rng.randint(1, 5)) for i in range(n)]


def write(tmp: Path, items, *, batched: bool) -> dict[str, bytes]:
  with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as p:
    _ = (p | beam.Create(items)
         | shards.WriteShards(str(tmp / "out"), num_shards=5, fmt="jsonl", batched=batched))
  return {Path(f).name: Path(f).read_bytes() for f in sorted(glob.glob(str(tmp / "out*")))}


def test_batches_give_the_same_shards_as_records(tmp_path):
  recs = records(300)
  batcher = shards.ShardBatches(5, max_bytes=200)
  batches = [b for key, rec in recs for b in batcher.add(key, rec)] + batcher.finish()
  assert len(batches) > 5  # max_bytes cut some shards' batches short
  assert all(key % 5 == shard for shard, batch in batches for key, _ in batch)
  assert sorted(kv for _, batch in batches for kv in batch) == sorted(recs)
  plain = write(tmp_path / "plain", recs, batched=False)
  batched = write(tmp_path / "batched", batches, batched=True)
  assert len(plain) == 5 and plain == batched
  for name, data in plain.items():  # each shard in key order
    lines = data.splitlines()
    keys = {rec: key for key, rec in recs}
    assert [keys[l] for l in lines] == sorted(keys[l] for l in lines), name


def test_every_shard_is_written_even_empty(tmp_path):
  out = write(tmp_path, [(5, b"only one")], batched=False)
  assert len(out) == 5 and sum(1 for v in out.values() if v) == 1


def test_batches_all_sent_when_they_hold_max_total_bytes():
  batcher = shards.ShardBatches(4, max_bytes=1000, max_total_bytes=100)
  assert batcher.add(0, b"x" * 40) == [] and batcher.add(1, b"y" * 40) == []
  out = batcher.add(6, b"z" * 30)  # 110 bytes held: every batch goes, in shard order
  assert out == [(0, [(0, b"x" * 40)]), (1, [(1, b"y" * 40)]), (2, [(6, b"z" * 30)])]
  assert batcher.add(3, b"w") == [] and batcher.finish() == [(3, [(3, b"w")])]


class Deferred:
  """A part for `resolve`: records made by the shard's writer."""

  def __init__(self, keys):
    self.keys = keys


def expand_deferred(shard, num_shards, parts):
  return [(k, f"deferred {k}".encode()) for p in parts for k in p.keys if k % num_shards == shard]


def test_resolve_turns_other_parts_into_records(tmp_path):
  recs = records(40)
  batcher = shards.ShardBatches(5)
  batches = [b for key, rec in recs for b in batcher.add(key, rec)] + batcher.finish()
  deferred = Deferred([7, 12, 1000003])
  # every shard gets the deferred part (and so is written without markers)
  items = batches + [(shard, deferred) for shard in range(5)]
  with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as p:
    _ = (p | beam.Create(items)
         | shards.WriteShards(str(tmp_path / "out"), num_shards=5, fmt="jsonl", batched=True,
                              resolve=expand_deferred, every_shard_fed=True))
  got = {Path(f).name: Path(f).read_bytes() for f in sorted(glob.glob(str(tmp_path / "out*")))}
  extra = [(k, f"deferred {k}".encode()) for k in deferred.keys]
  assert got == write(tmp_path / "plain", recs + extra, batched=False)


def test_other_parts_without_resolve_are_an_error(tmp_path):
  with pytest.raises(Exception, match="Deferred parts and no `resolve`"):
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as p:
      _ = (p | beam.Create([(0, Deferred([5]))])
           | shards.WriteShards(str(tmp_path / "out"), num_shards=5, batched=True))
  with pytest.raises(ValueError, match="need batched=True"):
    shards.WriteShards(str(tmp_path / "out"), num_shards=5, every_shard_fed=True)
