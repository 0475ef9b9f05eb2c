"""WriteShards: every shard written, records sorted by key, batched input equal to unbatched."""
from __future__ import annotations

import glob
import random
from pathlib import Path

import apache_beam as beam
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
