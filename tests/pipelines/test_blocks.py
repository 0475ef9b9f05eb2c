"""Tests of pipelines/blocks.py: tokenize, block (concat and pad), shuffle, shard, stats.

Blocks are checked on small inputs with TestPipeline; the job as a whole (`blocks.run`) for
byte-identical output, shuffling across shards, TFRecord vs ArrayRecord through the registered
seqio Task, and packing efficiency on the shared corpora.
"""
from __future__ import annotations

import codecs
import glob
import json
import random
import re
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from palmflow.stages.vocab import VocabSettings, train_sentencepiece
from pipelines import blocks
from pipelines.transforms.ingest import strip_gutenberg_lines
from tasks.pretraining import register_blocked_lm

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason="../shared/data not present")
EOS = blocks.EOS_ID
WORDS = ("the a cat dog sat on mat ran far away big small red blue green house tree "
         "river stone cloud").split()


def make_pipeline() -> test_pipeline.TestPipeline:
  return test_pipeline.TestPipeline(options=PipelineOptions(["--runner=DirectRunner"]))


def parse(record: bytes) -> dict[str, np.ndarray]:
  ex = tf.train.Example.FromString(record)
  return {k: np.array(v.int64_list.value) for k, v in ex.features.feature.items()}


def synthetic_docs(n: int, seed: int = 0, max_words: int = 40) -> list[dict]:
  rng = random.Random(seed)
  return [{"id": f"syn:f.txt:{i}", "source": "syn",
           "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))}
          for i in range(n)]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> str:
  """A tiny SentencePiece model trained here on the synthetic words."""
  path = tmp_path_factory.mktemp("vocab") / "spm.model"
  lines = [d["text"] for d in synthetic_docs(300, seed=1)]
  path.write_bytes(train_sentencepiece(lines, VocabSettings(
      vocab_size=60, byte_fallback=False, character_coverage=1.0)))
  return str(path)


def unique_token_docs(lengths, start: int = 1000) -> list[tuple[str, np.ndarray]]:
  """Documents whose tokens are increasing and distinct from every other document's."""
  out = []
  for j, n in enumerate(lengths):
    out.append((f"src{j % 2}:f:{j:03d}", np.arange(start + 100 * j, start + 100 * j + n,
                                                   dtype=np.int32)))
  return out


def check_concat_blocks(records, docs, length):
  """Every structural promise of concat mode, on the serialized blocks of `docs`."""
  exs = [parse(r) for _, r in records]
  assert exs, "no blocks"
  padded = lone_eos = 0
  runs: dict[int, list[np.ndarray]] = {}
  for ex in exs:
    t, seg, pos = ex["targets"], ex["targets_segment_ids"], ex["targets_positions"]
    assert len(t) == len(seg) == len(pos) == length
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any(), "padding must be a suffix"
    assert (t[n:] == 0).all() and (pos[n:] == 0).all()
    padded += n < length
    segs = seg[:n]
    assert segs[0] == 1 and (np.diff(segs) >= 0).all() and (np.diff(segs) <= 1).all()
    for s in range(1, int(segs.max()) + 1):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart per document
      piece = t[idx]
      body = piece[piece != EOS]
      assert (piece[:-1] != EOS).all(), "EOS only at a document's end"
      if s < segs.max() or n < length:
        assert piece[-1] == EOS, "only the last document of a full block may be cut"
      if len(body):
        j = next(j for j, (_, ids) in enumerate(docs) if ids[0] <= body[0] <= ids[-1])
        runs.setdefault(j, []).append(piece)
      else:  # a lone EOS: its document was cut just before it
        lone_eos += 1
  assert padded <= 1, f"{padded} padded blocks; at most the very last one may be"
  for j, (_, ids) in enumerate(docs):
    whole = np.concatenate(sorted(runs[j], key=lambda p: p[0]))
    if whole[-1] != EOS:
      whole, lone_eos = np.append(whole, EOS), lone_eos - 1
    np.testing.assert_array_equal(whole, np.append(ids, EOS),
                                  err_msg=f"document {j} is not whole across blocks")
  assert lone_eos == 0
  return exs


def test_block_features_segments_and_positions():
  tokens = np.array([5, 6, 1, 7, 1, 8, 9])
  docs = np.array([3, 3, 3, 4, 4, 9, 9])
  t, seg, pos = blocks.block_features(tokens, docs, 10)
  np.testing.assert_array_equal(t, [5, 6, 1, 7, 1, 8, 9, 0, 0, 0])
  np.testing.assert_array_equal(seg, [1, 1, 1, 2, 2, 3, 3, 0, 0, 0])
  np.testing.assert_array_equal(pos, [0, 1, 2, 0, 1, 0, 1, 0, 0, 0])


def test_concat_blocks_exact_length_eos_segments_and_cut_documents():
  # Two buckets; lengths chosen so documents cross block boundaries, one spans 3 blocks.
  lengths = [3, 7, 20, 2, 9, 1, 5, 11, 4, 6]
  docs = unique_token_docs(lengths)
  length = 8
  items = [(j % 2, d) for j, d in enumerate(docs)]
  with make_pipeline() as p:
    out = p | beam.Create(items) | blocks.BlockTokens(block_length=length, seed=3)

    def check(records):
      check_concat_blocks(records, docs, length)
      total = sum(n + 1 for n in lengths)
      assert len(records) == -(-total // length)
    assert_that(out, check)


def test_continued_document_is_segment_one_of_the_next_block():
  docs = unique_token_docs([5, 6])  # 6 + 7 = 13 tokens -> blocks of 8: [d0 + 2 of d1], [5 of d1]
  with make_pipeline() as p:
    out = p | beam.Create([(0, d) for d in docs]) | blocks.BlockTokens(block_length=8)

    def check(records):
      exs = sorted((parse(r) for _, r in records), key=lambda e: e["targets"][0])
      first, second = exs
      np.testing.assert_array_equal(first["targets"], [1000, 1001, 1002, 1003, 1004, EOS,
                                                       1100, 1101])
      np.testing.assert_array_equal(first["targets_segment_ids"], [1] * 6 + [2, 2])
      np.testing.assert_array_equal(first["targets_positions"], [0, 1, 2, 3, 4, 5, 0, 1])
      np.testing.assert_array_equal(second["targets"], [1102, 1103, 1104, 1105, EOS, 0, 0, 0])
      np.testing.assert_array_equal(second["targets_segment_ids"], [1] * 5 + [0] * 3)
      np.testing.assert_array_equal(second["targets_positions"], [0, 1, 2, 3, 4, 0, 0, 0])
    assert_that(out, check)


def test_pad_mode_one_document_per_block_trimmed_or_padded():
  docs = unique_token_docs([2, 7, 12])
  with make_pipeline() as p:
    out = (p | beam.Create([(0, d) for d in docs])
           | blocks.BlockTokens(block_length=8, mode="pad"))
    got = out | beam.Map(lambda kv: tuple(tuple(v.tolist()) for v in (
        parse(kv[1])["targets"], parse(kv[1])["targets_segment_ids"],
        parse(kv[1])["targets_positions"])))
    assert_that(got, equal_to([
        ((1000, 1001, EOS, 0, 0, 0, 0, 0), (1, 1, 1, 0, 0, 0, 0, 0), (0, 1, 2, 0, 0, 0, 0, 0)),
        ((1100, 1101, 1102, 1103, 1104, 1105, 1106, EOS), (1,) * 8, tuple(range(8))),
        ((1200, 1201, 1202, 1203, 1204, 1205, 1206, 1207), (1,) * 8, tuple(range(8))),
    ]))


def check_sentencepiece_blocks(exs, ids, length) -> None:
  """Blocks of real documents (token ids `ids`, in any order): every document's tokens and
  EOS are in the blocks, whole or cut at block boundaries, with at most one padded block."""
  assert all(len(e["targets"]) == length for e in exs)
  real = np.concatenate([e["targets"][e["targets_segment_ids"] > 0] for e in exs])
  assert len(real) == sum(len(v) + 1 for v in ids)
  assert (real == EOS).sum() == len(ids)
  assert sum((e["targets_segment_ids"] == 0).any() for e in exs) <= 1
  # a segment that ends with EOS is a whole document or the rest of a cut one (the rest of
  # a document cut at its bucket's last full block continues in the blocks packed from all
  # buckets' tails, as any segment)
  seqs = [tuple(v) for v in ids]
  whole = rest = 0
  for e in exs:
    seg, t = e["targets_segment_ids"], e["targets"]
    for s in set(seg[seg > 0].tolist()):
      piece = tuple(t[seg == s].tolist())
      if piece[-1] != EOS:
        continue
      if piece[:-1] in seqs:
        whole += 1
      else:
        assert any(q[len(q) - len(piece) + 1:] == piece[:-1] for q in seqs)
        rest += 1
  if whole + rest != len(ids) or not whole:
    raise BeamAssertException(f"{whole} whole documents and {rest} rests of {len(ids)} "
                              "documents")


def test_tokenize_and_block_with_sentencepiece(vocab):
  docs = synthetic_docs(60)
  sp = spm.SentencePieceProcessor(model_file=vocab)
  ids = {d["id"]: sp.encode(d["text"]) for d in docs}
  with make_pipeline() as p:
    out = (p | beam.Create(docs)
           | blocks.TokenizeAndBlock(vocab_path=vocab, block_length=32, num_buckets=3))

    def check(records):
      check_sentencepiece_blocks([parse(r) for _, r in records], list(ids.values()), 32)
    assert_that(out, check)


def write_docs(path: Path, docs) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps(d) + "\n")
  return str(path)


def run_job(docs_path, vocab, out_dir, **flags) -> dict:
  args = {"block_length": 32, "num_shards": 3, "num_buckets": 4, "seed": 0, **flags}
  argv = [f"--documents={docs_path}", f"--vocab={vocab}", f"--output_dir={out_dir}",
          "--runner=DirectRunner"] + [f"--{k}={v}" for k, v in args.items()]
  return blocks.run(argv)


def shard_bytes(pattern: str) -> dict[str, bytes]:
  return {Path(f).name: Path(f).read_bytes() for f in sorted(glob.glob(pattern))}


def read_tfrecords(pattern: str) -> list[list[dict]]:
  out = []
  for f in sorted(glob.glob(pattern)):
    out.append([parse(r.numpy()) for r in tf.data.TFRecordDataset(f)])
  return out


def test_job_is_byte_identical_shuffled_and_counts(tmp_path, vocab):
  docs = synthetic_docs(120) + [{"id": "syn:f.txt:empty", "text": "", "source": "syn"}]
  path = write_docs(tmp_path / "docs.jsonl", docs)
  a = run_job(path, vocab, tmp_path / "a")
  b = run_job(path, vocab, tmp_path / "b")
  c = run_job(path, vocab, tmp_path / "c", seed=1)
  files_a, files_b = shard_bytes(a["shard_pattern"]), shard_bytes(b["shard_pattern"])
  assert len(files_a) == 3 and files_a == files_b
  assert shard_bytes(c["shard_pattern"]) != files_a  # the seed changes the shuffle
  stats = json.loads((tmp_path / "a" / "stats.json").read_text())
  assert stats == a
  assert not (tmp_path / "a" / "runs.tmp").exists()  # the workers' sorted runs are gone
  assert stats["documents_in"] == 121 and stats["documents_out"] == 120
  assert stats["rejections"] == {"empty_after_tokenization": 1}
  assert stats["per_source"] == {"syn": {"documents": 120, "tokens": stats["tokens"]}}
  assert stats["non_pad_tokens"] == stats["tokens"]
  assert stats["blocks"] == -(-stats["tokens"] // 32)


def test_per_source_counts_with_sources_mixed_in_a_batch(tmp_path, vocab):
  docs = synthetic_docs(90, seed=5)
  # a source is the id's part before the first ":" (the whole id if it has none); "a" and
  # "a:..." are one source, "ab:..." another
  names = ["a:f:{}", "ab:f:{}", "a", "c:{}"]
  for i, d in enumerate(docs):
    d["id"] = names[i % 4].format(i)
  docs.insert(0, {"id": "a", "text": ""})  # empty: counted as a rejection, not a source's
  sp = spm.SentencePieceProcessor(model_file=vocab)
  expected: dict = {}
  for d in docs[1:]:
    c = expected.setdefault(d["id"].partition(":")[0], {"documents": 0, "tokens": 0})
    c["documents"] += 1
    c["tokens"] += len(sp.encode(d["text"])) + 1
  stats = run_job(write_docs(tmp_path / "docs.jsonl", docs), vocab, tmp_path / "out",
                  num_buckets=1)
  assert stats["per_source"] == expected and set(expected) == {"a", "ab", "c"}
  assert stats["rejections"] == {"empty_after_tokenization": 1}


def test_one_bucket_matches_reference_stream_and_is_shuffled_across_shards(tmp_path, vocab):
  docs = synthetic_docs(150)
  sp = spm.SentencePieceProcessor(model_file=vocab)
  # one range: the documents in file order, each followed by EOS, cut every 32 tokens
  stream = np.concatenate([np.append(sp.encode(d["text"]), EOS) for d in docs])
  expected = [tuple(stream[i:i + 32]) + (0,) * max(0, i + 32 - len(stream))
              for i in range(0, len(stream), 32)]
  path = write_docs(tmp_path / "docs.jsonl", docs)
  stats = run_job(path, vocab, tmp_path / "one", num_buckets=1, num_shards=3)
  per_shard = [[tuple(e["targets"].tolist()) for e in shard]
               for shard in read_tfrecords(stats["shard_pattern"])]
  assert sorted(b for shard in per_shard for b in shard) == sorted(expected)
  index = {b: i for i, b in enumerate(expected)}
  order = [[index[b] for b in shard] for shard in per_shard]
  assert all(len(o) >= len(expected) // 6 for o in order), "a shard got too few blocks"
  assert all(o != sorted(o) for o in order), "blocks in a shard are in stream order"


def test_ranges_cover_every_line_once(tmp_path):
  import gzip
  rng = random.Random(4)
  lines = [("x" * rng.randint(0, 40) + "\n").encode() for _ in range(300)]
  lines[-1] = lines[-1].rstrip(b"\n")  # the last file's last line without its newline
  (tmp_path / "a.jsonl").write_bytes(b"".join(lines[:170]))
  (tmp_path / "b.jsonl").write_bytes(b"".join(lines[170:250]))
  (tmp_path / "c.jsonl").write_bytes(b"")
  with gzip.open(tmp_path / "d.jsonl.gz", "wb") as f:
    f.write(b"".join(lines[250:]))
  want = [line.rstrip(b"\n") for line in lines]
  for n in (1, 2, 7, 50, 10_000):
    ranges = blocks.plan_ranges(str(tmp_path / "*.jsonl*"), n)
    assert [r[0] for r in ranges] == list(range(len(ranges)))
    assert ranges[-1][1:] == (str(tmp_path / "d.jsonl.gz"), 0, -1)  # compressed: whole
    got = [line for _, path, start, end in ranges
           for _, line in blocks.range_lines(path, start, end)]
    assert got == want, f"{n} ranges"
    # read a few bytes at a time, lines run over many chunks: the same lines, offsets right
    for chunk in (1, 5, 64):
      pieces = []
      for _, path, start, end in ranges:
        for offset, chunk_lines in blocks.range_chunks(path, start, end, chunk_bytes=chunk):
          for line in chunk_lines:
            if end >= 0:
              with open(path, "rb") as f:
                f.seek(offset)
                assert f.read(len(line)) == line
            pieces.append(line)
            offset += len(line) + 1
      assert pieces == want, f"{n} ranges, {chunk}-byte chunks"
    if n == 7:
      assert len(ranges) >= 7
  # a cap on a range's size adds ranges whatever the requested number
  capped = blocks.plan_ranges(str(tmp_path / "*.jsonl*"), 1, max_range_bytes=1000)
  uncompressed = sum(len(l) for l in lines[:250])
  assert len(capped) >= -(-uncompressed // 1000) + 1
  assert all(end - start <= 1000 for _, _, start, end in capped if end >= 0)
  assert [line for _, path, start, end in capped
          for _, line in blocks.range_lines(path, start, end)] == want
  with pytest.raises(blocks.DocumentsError, match="matches no file"):
    blocks.plan_ranges(str(tmp_path / "nothing*"), 4)
  # a UTF-8 byte order mark at the start of a file is not part of its first line
  (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + b"first\nsecond\n")
  assert list(blocks.range_lines(str(tmp_path / "bom.jsonl"), 0, 100)) == [
      (3, b"first"), (9, b"second")]
  # ... and that line belongs to the first range even when it ends within the mark
  small = tmp_path / "small"
  small.mkdir()
  (small / "a.jsonl").write_bytes(codecs.BOM_UTF8 + b"only line")
  (small / "b.jsonl").write_bytes(b"x" * 30 + b"\n")
  for n in (1, 4, 40):
    ranges = blocks.plan_ranges(str(small / "*.jsonl"), n)
    got = [line for _, path, start, end in ranges
           for _, line in blocks.range_lines(path, start, end)]
    assert got == [b"only line", b"x" * 30], f"{n} ranges"


def test_lines_that_json_loads_reads_are_read(tmp_path, vocab):
  """A line that json.loads(bytes) reads but is not plain UTF-8 JSON (a byte order mark
  in mid-file, from concatenated files; UTF-16) is read as json.loads reads it."""
  docs = [json.dumps({"id": f"s:f:{i}", "text": f"the cat sat {i}"}) for i in range(3)]
  path = tmp_path / "docs.jsonl"
  path.write_bytes(docs[0].encode() + b"\n" + codecs.BOM_UTF8 + docs[1].encode() + b"\n"
                   + docs[2].encode("utf-16"))
  stats = run_job(str(path), vocab, tmp_path / "out")
  assert stats["documents"] == 3 and stats["documents_out"] == 3


def test_job_over_many_ranges_keeps_every_document(tmp_path, vocab):
  docs = synthetic_docs(200, seed=7)
  write_docs(tmp_path / "docs-0.jsonl", docs[:130])
  write_docs(tmp_path / "docs-1.jsonl", docs[130:])
  stats = run_job(str(tmp_path / "docs-*.jsonl"), vocab, tmp_path / "out", num_buckets=6)
  sp = spm.SentencePieceProcessor(model_file=vocab)
  ids = [sp.encode(d["text"]) for d in docs]
  exs = [e for shard in read_tfrecords(stats["shard_pattern"]) for e in shard]
  check_sentencepiece_blocks(exs, ids, 32)
  assert stats["documents_in"] == stats["documents_out"] == 200
  assert stats["tokens"] == stats["non_pad_tokens"] == sum(len(v) + 1 for v in ids)


def job_steps(docs_path, vocab, out_dir, **flags) -> set[str]:
  """The labels of the blocks job's steps and their parts, built (not run) as `run_job`
  would."""
  args = {"block_length": 32, "num_shards": 3, "num_buckets": 4, "seed": 0, **flags}
  job_args, _ = blocks.parse_args(
      [f"--documents={docs_path}", f"--vocab={vocab}", f"--output_dir={out_dir}"]
      + [f"--{k}={v}" for k, v in args.items()])
  p = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"]))
  blocks.build(p, job_args)
  labels = set()

  class Visit(beam.pipeline.PipelineVisitor):
    def visit_transform(self, node):
      labels.update(node.full_label.split("/"))
  p.visit(Visit())
  return labels


def test_tails_packed_by_the_writers_or_in_a_step_of_their_own_give_the_same_bytes(
    tmp_path, vocab, monkeypatch):
  docs = synthetic_docs(200, seed=3)
  write_docs(tmp_path / "docs-0.jsonl", docs[:70])
  write_docs(tmp_path / "docs-1.jsonl", docs[70:])
  pattern = str(tmp_path / "docs-*.jsonl")
  # small: every shard's writer packs all the ranges' tails; no markers, no tails' step
  small = job_steps(pattern, vocab, tmp_path / "w", num_buckets=6)
  assert "Write" in small and not {"GroupRemainders", "BlockRemainders", "AllShards"} & small
  writers = run_job(pattern, vocab, tmp_path / "w", num_buckets=6)
  monkeypatch.setattr(blocks, "TAILS_TO_WRITERS_MAX", 6)  # fewer than ranges x shards
  assert {"GroupRemainders", "BlockRemainders", "AllShards"} <= job_steps(
      pattern, vocab, tmp_path / "s", num_buckets=6)
  step = run_job(pattern, vocab, tmp_path / "s", num_buckets=6)
  assert shard_bytes(writers["shard_pattern"]) == shard_bytes(step["shard_pattern"])
  assert {k: v for k, v in writers.items() if k != "shard_pattern"} == \
      {k: v for k, v in step.items() if k != "shard_pattern"}
  # several ranges had tails, packed together: one padded block in all
  assert 0 < writers["block_tokens"] - writers["non_pad_tokens"] < 32
  assert writers["blocks"] == -(-writers["tokens"] // 32)


def test_every_shard_written_without_markers(tmp_path, vocab):
  # one short document: one range, one block (a tail), three shards; two shards get only
  # the tail (which their writers drop) and are written empty
  path = write_docs(tmp_path / "docs.jsonl", [{"id": "s:f:0", "text": "a few words"}])
  assert "AllShards" not in job_steps(path, vocab, tmp_path / "out")
  stats = run_job(path, vocab, tmp_path / "out")
  files = shard_bytes(stats["shard_pattern"])
  assert len(files) == 3 and sum(1 for v in files.values() if v) == 1
  assert stats["blocks"] == 1


def test_documented_command_runs_the_job_in_worker_processes(tmp_path, vocab):
  # `python -m pipelines.blocks ...` (the module docstring's command): the job's classes
  # must reach separate worker processes by an importable name, not as `__main__.X`
  import subprocess
  import sys
  path = write_docs(tmp_path / "docs.jsonl", synthetic_docs(120, seed=11))
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "pipelines.blocks", f"--documents={path}", f"--vocab={vocab}",
       f"--output_dir={out}", "--block_length=32", "--num_shards=3", "--num_buckets=4",
       "--runner=DirectRunner", "--direct_num_workers=2",
       "--direct_running_mode=multi_processing"],
      cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stats = json.loads((out / "stats.json").read_text())
  here = run_job(path, vocab, tmp_path / "here")
  assert shard_bytes(str(out / "blocks.tfrecord-*")) == shard_bytes(here["shard_pattern"])
  assert stats["blocks"] == here["blocks"] and stats["tokens"] == here["tokens"]


def test_same_bytes_with_two_worker_processes(tmp_path, vocab, caplog):
  path = write_docs(tmp_path / "docs.jsonl", synthetic_docs(300, seed=9))
  one = run_job(path, vocab, tmp_path / "one", num_buckets=5)
  two = blocks.run([f"--documents={path}", f"--vocab={vocab}", f"--output_dir={tmp_path / 'two'}",
                    "--block_length=32", "--num_shards=3", "--num_buckets=5",
                    "--runner=DirectRunner", "--direct_num_workers=2",
                    "--direct_running_mode=multi_processing"])
  assert shard_bytes(one["shard_pattern"]) == shard_bytes(two["shard_pattern"])
  # the workers' harmless start-up warnings are not passed on to the user
  assert not [r for r in caplog.records if "semi_persistent_directory" in r.getMessage()]
  assert {k: v for k, v in one.items() if k != "shard_pattern"} == \
      {k: v for k, v in two.items() if k != "shard_pattern"}


def test_malformed_document_line_names_file_and_offset(tmp_path, vocab):
  path = tmp_path / "docs.jsonl"
  good = json.dumps({"id": "s:f:1", "text": "the cat"}) + "\n"
  # a blank line between (skipped, still counted in the byte offset)
  path.write_text(good + "\n" + good + '{"id": "s:f:2", "text": "the d\n')
  with pytest.raises(Exception, match=rf"docs.jsonl: the line at byte {2 * len(good) + 1} is "
                                      "not a JSON document"):
    run_job(str(path), vocab, tmp_path / "out")
  assert not (tmp_path / "out" / "stats.json").exists()


def test_a_misspelt_flag_is_an_error_not_a_default(tmp_path):
  """Beam drops flags it does not know with a log line: `--block_lenght=2048` would run the
  whole job with the default block length. The job rejects it, with the closest name; Beam's
  own flags still pass."""
  common = [f"--documents={tmp_path}/d.jsonl", "--vocab=v.model", f"--output_dir={tmp_path}"]
  with pytest.raises(ValueError, match=r"unknown flag\(s\): --block_lenght \(did you mean "
                                       r"--block_length\?\)"):
    blocks.parse_args(common + ["--block_lenght=2048"])
  with pytest.raises(ValueError, match=r"--runer \(did you mean --runner\?\)"):
    blocks.parse_args(common + ["--runer", "DirectRunner"])
  args, beam_args = blocks.parse_args(common + ["--block_length=64", "--runner=DirectRunner",
                                                "--direct_num_workers=2"])
  assert args.block_length == 64
  assert beam_args == ["--runner=DirectRunner", "--direct_num_workers=2"]
  assert not list(tmp_path.iterdir())


def test_pad_mode_job_stats(tmp_path, vocab):
  docs = synthetic_docs(40, max_words=60)
  path = write_docs(tmp_path / "docs.jsonl", docs)
  stats = run_job(path, vocab, tmp_path / "pad", mode="pad", block_length=16)
  assert stats["blocks"] == 40 and stats["documents_out"] == 40
  assert stats["trimmed_tokens"] > 0
  assert stats["tokens"] == stats["non_pad_tokens"] + stats["trimmed_tokens"]
  assert stats["rejections"]["trimmed_documents"] > 0


def task_examples(name: str, *, shuffle: bool) -> list[dict]:
  """The examples seqio.get_dataset gives for a registered task, as the trainer reads them."""
  from palmflow.trainer.feature_converters import BlockedLMFeatureConverter
  ds = seqio.get_dataset(name, task_feature_lengths={"targets": 32},
                         feature_converter=BlockedLMFeatureConverter(), shuffle=shuffle,
                         seed=5, num_epochs=1)
  return [{k: v.tolist() for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def test_tfrecord_and_array_record_give_the_same_task_examples(tmp_path, vocab):
  path = write_docs(tmp_path / "docs.jsonl", synthetic_docs(80))
  tfr = run_job(path, vocab, tmp_path / "tfr", format="tfrecord")
  arr = run_job(path, vocab, tmp_path / "arr", format="array_record")
  arr2 = run_job(path, vocab, tmp_path / "arr2", format="array_record")
  assert shard_bytes(arr["shard_pattern"]) == shard_bytes(arr2["shard_pattern"])
  register_blocked_lm("test_blocks_tfr", file_pattern=tfr["shard_pattern"], vocab_path=vocab,
                      block_length=32, fmt="tfrecord")
  register_blocked_lm("test_blocks_arr", file_pattern=arr["shard_pattern"], vocab_path=vocab,
                      block_length=32, fmt="array_record")
  try:
    for shuffle in (False, True):
      a = task_examples("test_blocks_tfr", shuffle=shuffle)
      b = task_examples("test_blocks_arr", shuffle=shuffle)
      assert len(a) == tfr["blocks"] and a == b
  finally:
    seqio.TaskRegistry.remove("test_blocks_tfr")
    seqio.TaskRegistry.remove("test_blocks_arr")
  assert {"decoder_target_tokens", "decoder_segment_ids", "decoder_positions"} <= set(a[0])
  assert max(max(ex["decoder_segment_ids"]) for ex in a) > 1  # packed documents survive


def shared_corpus_docs() -> list[dict]:
  """tiny-shakespeare and Moby Dick (Gutenberg header/footer stripped), one doc a paragraph."""
  docs = []
  books = [("shakespeare", DATA / "tiny_shakespeare" / "input.txt", False),
           ("moby_dick", DATA / "gutenberg_moby_dick" / "2701-0.txt", True)]
  for name, path, gutenberg in books:
    lines = path.read_text(encoding="utf-8-sig").splitlines(keepends=True)
    if gutenberg:
      lo, hi = strip_gutenberg_lines(lines)
      lines = lines[lo:hi]
    for n, para in enumerate(re.split(r"\n\s*\n", "".join(lines))):
      if para.strip():
        docs.append({"id": f"{name}:{path.name}:{n}", "text": para.strip(), "source": name})
  return docs


@needs_data
def test_packing_efficiency_on_shared_corpora(tmp_path):
  docs = shared_corpus_docs()
  rng = random.Random(0)
  sample = [l for d in rng.sample(docs, 3000) for l in d["text"].splitlines() if l.strip()]
  model = tmp_path / "spm.model"
  model.write_bytes(train_sentencepiece(sample, VocabSettings(vocab_size=1000,
                                                              model_type="bpe")))
  path = write_docs(tmp_path / "docs.jsonl", docs)
  stats = run_job(path, str(model), tmp_path / "out", block_length=512, num_shards=2,
                  num_buckets=8)
  print(f"packing efficiency {stats['packing_efficiency']:.5f} over {stats['blocks']} blocks "
        f"of 512 ({stats['tokens']} tokens)")
  assert json.loads((tmp_path / "out" / "stats.json").read_text())["packing_efficiency"] \
      == stats["packing_efficiency"] >= 0.999
  assert set(stats["per_source"]) == {"shakespeare", "moby_dick"}
  assert sum(s["documents"] for s in stats["per_source"].values()) == stats["documents_out"]
  assert stats["documents_in"] == len(docs)
