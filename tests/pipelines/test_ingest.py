"""Tests of pipelines/transforms/ingest.py on tiny generated files and the shared real data."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.transforms.ingest import (ReadSource, ReadSources, SourceNotFoundError,
                                         SourceSpec, SourceSpecError, strip_gutenberg_lines)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")


def make_pipeline() -> test_pipeline.TestPipeline:
  return test_pipeline.TestPipeline(options=PipelineOptions(["--runner=DirectRunner"]))


def counter(result, name: str, namespace: str = "palmflow") -> int:
  query = MetricsFilter().with_namespace(namespace).with_name(name)
  return sum(c.committed for c in result.metrics().query(query)["counters"])


def doc(doc_id: str, text: str, **extra) -> dict:
  return {"id": doc_id, "text": text, "source": doc_id.split(":")[0], **extra}


def test_text_units_globs_and_gzip(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.txt").write_text("first line\n\nsecond para l1\nl2\n\n\n")
  with gzip.open(tmp_path / "sub" / "b.txt.gz", "wt") as f:
    f.write("zipped one\nzipped two\n")
  specs = [
      {"name": "files", "format": "text", "path": f"{tmp_path}/**.txt*"},
      {"name": "lines", "format": "text", "unit": "line", "path": str(tmp_path / "**")},
      {"name": "paras", "format": "text", "unit": "paragraph", "path": str(tmp_path / "a.txt")},
  ]
  expected = [
      doc("files:a.txt:0", "first line\n\nsecond para l1\nl2\n\n\n"),
      doc("files:sub/b.txt.gz:0", "zipped one\nzipped two\n"),
      doc("lines:a.txt:1", "first line"), doc("lines:a.txt:3", "second para l1"),
      doc("lines:a.txt:4", "l2"), doc("lines:sub/b.txt.gz:1", "zipped one"),
      doc("lines:sub/b.txt.gz:2", "zipped two"),
      doc("paras:a.txt:1", "first line"), doc("paras:a.txt:3", "second para l1\nl2"),
  ]
  with make_pipeline() as p:
    assert_that(p | ReadSources(specs), equal_to(expected))


def test_relative_paths_resolve_against_base_dir(tmp_path):
  (tmp_path / "x.txt").write_text("hello\n")
  spec = {"name": "rel", "format": "text", "path": "x.txt"}
  with make_pipeline() as p:
    assert_that(p | ReadSource(spec, base_dir=str(tmp_path)),
                equal_to([doc("rel:x.txt:0", "hello\n")]))


def test_jsonl_fields_ids_and_malformed_records(tmp_path):
  lines = [json.dumps({"body": "one", "key": "k1", "lang": "en"}), "{not json",
           json.dumps({"body": 7}), json.dumps(["a list"]), "",
           json.dumps({"body": "two", "key": "k2", "lang": "fr"})]
  with gzip.open(tmp_path / "part.jsonl.gz", "wt") as f:
    f.write("\n".join(lines) + "\n")
  (tmp_path / "plain.jsonl").write_text(json.dumps({"body": "three"}) + "\n")
  p = make_pipeline()
  docs = p | ReadSources([
      {"name": "j", "format": "jsonl", "path": str(tmp_path / "part.jsonl.gz"),
       "text_field": "body", "id_field": "key", "keep_fields": ["lang"]},
      {"name": "n", "format": "jsonl", "path": str(tmp_path / "plain.jsonl"),
       "text_field": "body"}])
  assert_that(docs, equal_to([doc("j:part.jsonl.gz:k1", "one", lang="en"),
                              doc("j:part.jsonl.gz:k2", "two", lang="fr"),
                              doc("n:plain.jsonl:1", "three")]))
  result = p.run()
  assert counter(result, "malformed_records") == 3


def test_csv_and_tsv(tmp_path):
  with open(tmp_path / "data.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["label", "text"])
    writer.writerow(["1", "a, quoted \"text\""])
    writer.writerow(["0", "spans\ntwo lines"])
    writer.writerow(["0"])
  (tmp_path / "data.tsv").write_text('x\t"not quoted\n')
  (tmp_path / "empty.csv").write_text("")       # matched by the glob: nothing to read, no error
  p = make_pipeline()
  docs = p | ReadSources([
      {"name": "c", "format": "csv", "path": str(tmp_path / "*.csv"), "keep_fields": ["label"]},
      {"name": "t", "format": "tsv", "path": str(tmp_path / "data.tsv"), "has_header": False,
       "text_column": 1}])
  assert_that(docs, equal_to([doc("c:data.csv:0", 'a, quoted "text"', label="1"),
                              doc("c:data.csv:1", "spans\ntwo lines", label="0"),
                              doc("t:data.tsv:0", '"not quoted')]))
  assert counter(p.run(), "malformed_records") == 1


def test_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  table = pa.table({"content": ["alpha", None, "gamma"], "year": [1, 2, 3]})
  pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
  spec = {"name": "pq", "format": "parquet", "path": str(tmp_path / "t.parquet"),
          "text_column": "content", "keep_fields": ["year"]}
  with make_pipeline() as p:
    assert_that(p | ReadSource(spec), equal_to([doc("pq:t.parquet:0", "alpha", year=1),
                                                doc("pq:t.parquet:2", "gamma", year=3)]))


def test_tfrecord_plain_and_gzip(tmp_path):
  import tensorflow as tf

  def example(text: bytes) -> bytes:
    feature = {"text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

  with tf.io.TFRecordWriter(str(tmp_path / "a.tfrecord")) as w:
    w.write(example(b"first"))
    w.write(example(b"bad \xff byte"))
    w.write(b"not an example proto")
  options = tf.io.TFRecordOptions(compression_type="GZIP")
  with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord.gz"), options) as w:
    w.write(example("zipped é".encode()))
  truncated = (tmp_path / "a.tfrecord").read_bytes()
  (tmp_path / "c.tfrecord").write_bytes(truncated[:-5])
  p = make_pipeline()
  docs = p | ReadSource({"name": "tfr", "format": "tfrecord",
                         "path": str(tmp_path / "*.tfrecord*")})
  assert_that(docs, equal_to([doc("tfr:a.tfrecord:0", "first"),
                              doc("tfr:a.tfrecord:1", "bad \ufffd byte", had_invalid_utf8=True),
                              doc("tfr:b.tfrecord.gz:0", "zipped é"),
                              doc("tfr:c.tfrecord:0", "first"),
                              doc("tfr:c.tfrecord:1", "bad \ufffd byte", had_invalid_utf8=True)]))
  result = p.run()
  assert counter(result, "malformed_records") == 2  # The bad proto; the cut-off record.
  assert counter(result, "invalid_utf8_docs") == 2


def test_tfds_local_dataset(tmp_path):
  import tensorflow_datasets as tfds

  class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "n": tfds.features.Scalar(np.int32)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"tfds doc {i}", "n": i}

  TinyCorpus(data_dir=str(tmp_path)).download_and_prepare()
  builder = tfds.builder("tiny_corpus", data_dir=str(tmp_path))
  stored = [ex["text"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="train"))]
  spec = {"name": "td", "format": "tfds", "dataset": "tiny_corpus", "split": "train",
          "data_dir": str(tmp_path), "examples_per_shard": 2}
  with make_pipeline() as p:
    assert_that(p | ReadSource(spec), equal_to(
        [doc(f"td:tiny_corpus/train:{i}", text) for i, text in enumerate(stored)]))
  with pytest.raises(SourceNotFoundError, match="'td'.*no_such_set"):
    with make_pipeline() as p:
      _ = p | ReadSource({**spec, "dataset": "no_such_set"})
  # The corpus stage identifies a prepared TFDS dataset by its info files, so preparing a
  # new version in the same data_dir reruns the stage (the name and data_dir alone did not).
  from palmflow.stages.corpus import Corpus, CorpusSettings
  stage_spec = {k: v for k, v in spec.items() if k != "examples_per_shard"}

  def identity():
    return Corpus().identity(CorpusSettings(sources=[stage_spec]), base_dir=tmp_path)
  before = identity()
  assert "1.0.0/dataset_info.json" in str(before)
  TinyCorpus.VERSION = tfds.core.Version("1.0.1")
  TinyCorpus(data_dir=str(tmp_path)).download_and_prepare()
  assert identity() != before


def test_invalid_utf8_and_nul_bytes_are_counted_not_fatal(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"ok line\nbad \xc3\x28 utf8\nnul\x00byte\n\xff\x00both\n")
  # line 3: a JSON escape of half a surrogate pair (cut-off scraped text): no UTF-8 for it
  (tmp_path / "bad.jsonl").write_bytes(b'{"text": "j \xe2\x82 bad"}\n{"text": "j\\u0000nul"}\n'
                                       b'{"text": "half \\ud83d pair"}\n')
  p = make_pipeline()
  docs = p | ReadSources([
      {"name": "t", "format": "text", "unit": "line", "path": str(tmp_path / "bad.txt")},
      {"name": "j", "format": "jsonl", "path": str(tmp_path / "bad.jsonl")}])
  assert_that(docs, equal_to([
      doc("t:bad.txt:1", "ok line"),
      doc("t:bad.txt:2", "bad \ufffd( utf8", had_invalid_utf8=True),
      doc("t:bad.txt:3", "nul\x00byte", had_nul_bytes=True),
      doc("t:bad.txt:4", "\ufffd\x00both", had_invalid_utf8=True, had_nul_bytes=True),
      doc("j:bad.jsonl:1", "j \ufffd bad", had_invalid_utf8=True),
      doc("j:bad.jsonl:2", "j\x00nul", had_nul_bytes=True),
      doc("j:bad.jsonl:3", "half \ufffd\ufffd\ufffd pair", had_invalid_utf8=True)]))
  result = p.run()
  assert counter(result, "invalid_utf8_docs") == 4
  assert counter(result, "nul_bytes_docs") == 3


def test_missing_path_names_source_and_path(tmp_path):
  spec = {"name": "ghost", "format": "text", "path": str(tmp_path / "nothing" / "*.txt")}
  with pytest.raises(SourceNotFoundError, match=r"source 'ghost'.*nothing/\*\.txt"):
    with make_pipeline() as p:
      _ = p | ReadSources([spec])


def test_spec_errors_are_actionable():
  with pytest.raises(SourceSpecError, match="'txt_field'.*closest valid keys: \\['text_field'"):
    SourceSpec.from_dict({"name": "s", "format": "jsonl", "path": "x", "txt_field": "t"})
  with pytest.raises(SourceSpecError, match="format 'xml'"):
    SourceSpec.from_dict({"name": "s", "format": "xml", "path": "x"})
  with pytest.raises(SourceSpecError, match="unit 'page'"):
    SourceSpec.from_dict({"name": "s", "format": "text", "path": "x", "unit": "page"})
  with pytest.raises(SourceSpecError, match="unique"):
    ReadSources([{"name": "s", "format": "text", "path": "x"}] * 2)


def test_strip_gutenberg_lines():
  lines = ["Header\n", "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n", "\n",
           "Produced by Someone\n", "and Others\n", "\n", "Body one\n", "Body two\n", "\n",
           "End of the Project Gutenberg EBook of X\n",
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n", "License\n"]
  lo, hi = strip_gutenberg_lines(lines)
  assert "".join(lines[lo:hi]).strip() == "Body one\nBody two"
  assert strip_gutenberg_lines(["no markers\n"]) is None


@needs_data
def test_real_data_sources():
  specs = [
      {"name": "shakespeare", "format": "text", "unit": "paragraph",
       "path": str(DATA / "tiny_shakespeare" / "input.txt")},
      {"name": "moby", "format": "text", "unit": "paragraph", "strip_gutenberg": True,
       "path": str(DATA / "gutenberg_moby_dick" / "2701-0.txt")},
      {"name": "sst2", "format": "tsv", "text_column": "sentence",
       "path": str(DATA / "glue_sst2" / "train.tsv")},
  ]
  p = make_pipeline()
  docs = p | ReadSources(specs)
  counts = docs | beam.Map(lambda d: d["source"]) | beam.combiners.Count.PerElement()
  assert_that(counts, equal_to([("shakespeare", 7222), ("moby", 2796), ("sst2", 67349)]),
              label="CountPerSource")
  firsts = (docs
            | beam.Map(lambda d: (d["source"], (int(d["id"].rsplit(":", 1)[1]), d["text"])))
            | beam.combiners.Top.SmallestPerKey(1)
            | beam.MapTuple(lambda source, top: (source, top[0][1][:40])))
  assert_that(firsts, equal_to([("shakespeare", "First Citizen:\nBefore we proceed any fur"),
                                ("moby", "MOBY DICK;"),
                                ("sst2", "hide new secretions from the parental un")]),
              label="FirstDocs")
  boilerplate = ("PROJECT GUTENBERG LICENSE", "PROJECT GUTENBERG EBOOK", "*** START",
                 "*** END", "GUTENBERG.ORG", "PRODUCED BY DANIEL LAZARUS")
  licence = docs | beam.Filter(lambda d: d["source"] == "moby" and any(
      b in d["text"].upper() for b in boilerplate))
  assert_that(licence, equal_to([]), label="NoLicence")
  result = p.run()
  assert counter(result, "invalid_utf8_docs") == 0
  assert counter(result, "gutenberg_markers_missing") == 0
