"""Tests of pipelines/transforms/clean.py: Normalize, Filter, SummarizeRejections."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.transforms.clean import (Filter, FilterConfig, Normalize, SummarizeRejections,
                                        rejection_reason)
from pipelines.transforms.ingest import ReadSource

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")


def make_pipeline() -> test_pipeline.TestPipeline:
  return test_pipeline.TestPipeline(options=PipelineOptions(["--runner=DirectRunner"]))


def counters(result, namespace: str) -> dict[str, int]:
  query = MetricsFilter().with_namespace(namespace)
  out: dict[str, int] = {}
  for c in result.metrics().query(query)["counters"]:
    out[c.key.metric.name] = out.get(c.key.metric.name, 0) + c.committed
  return out


def doc(doc_id: str, text: str, **extra) -> dict:
  return {"id": doc_id, "text": text, "source": "s", **extra}


def test_normalize_forms_nul_and_newlines():
  docs = [doc("a", "Cafe\u0301\r\nx\ry", lang="fr"), doc("b", "nul\x00s"),
          doc("c", "\ufb01ne"), doc("d", "plain")]
  p = make_pipeline()
  nfc = p | "Docs" >> beam.Create(docs) | "NFC" >> Normalize()
  assert_that(nfc, equal_to([doc("a", "Caf\u00e9\nx\ny", lang="fr"), doc("b", "nuls"),
                             doc("c", "\ufb01ne"), doc("d", "plain")]), label="CheckNFC")
  nfkc = p | "Docs2" >> beam.Create(docs[2:]) | "NFKC" >> Normalize("NFKC")
  assert_that(nfkc, equal_to([doc("c", "fine"), doc("d", "plain")]), label="CheckNFKC")
  stats = counters(p.run(), "palmflow.normalize")
  assert stats == {"nul_docs_cleaned": 1, "docs_changed": 3}
  with pytest.raises(ValueError, match="'NFX'"):
    Normalize("NFX")


def test_rejection_reasons_in_rule_order():
  config = FilterConfig(min_chars=5, max_chars=60, min_alpha_fraction=0.5,
                        max_repeated_line_fraction=0.3, max_line_length=30)
  assert rejection_reason(" \n\t", config) == "empty"
  assert rejection_reason("abc", config) == "too_short"
  assert rejection_reason("word " * 20, config) == "too_long"
  assert rejection_reason("1234 5678 ab", config) == "low_alpha_fraction"
  assert rejection_reason("same\nsame\nsame\nother", config) == "repeated_lines"
  assert rejection_reason("x" * 31, config) == "line_too_long"
  assert rejection_reason("A fine line.\nAnother one!", config) is None
  # Repeats are judged on stripped non-blank lines; half repeated is over 0.3.
  assert rejection_reason("a line\n\n  a line  \n", config) == "repeated_lines"
  assert rejection_reason("1 2 3 4 5 6", FilterConfig()) is None


def test_filter_config_is_frozen_and_validated():
  config = FilterConfig(min_chars=3)
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.min_chars = 4  # type: ignore[misc]
  with pytest.raises(ValueError, match="min_alpha_fraction"):
    FilterConfig(min_alpha_fraction=1.5)
  with pytest.raises(ValueError, match="max_chars"):
    FilterConfig(min_chars=10, max_chars=5)
  with pytest.raises(TypeError, match="FilterConfig"):
    Filter({"min_chars": 3})


def test_filter_outputs_and_counters():
  docs = [doc("k1", "A perfectly fine sentence."), doc("k2", "Another good one here."),
          doc("r1", "tiny"), doc("r2", "12345 67890 13579"), doc("r3", "   "),
          doc("r4", "tiny too")]
  p = make_pipeline()
  out = p | beam.Create(docs) | Filter(FilterConfig(min_chars=10, min_alpha_fraction=0.5))
  assert_that(out.kept, equal_to(docs[:2]), label="Kept")
  assert_that(out.rejected, equal_to([
      {"id": "r1", "reason": "too_short"}, {"id": "r2", "reason": "low_alpha_fraction"},
      {"id": "r3", "reason": "empty"}, {"id": "r4", "reason": "too_short"}]), label="Rejected")
  summary = out.rejected | SummarizeRejections(max_samples=1)
  assert_that(summary, equal_to([{
      "empty": {"count": 1, "sample_ids": ["r3"]},
      "low_alpha_fraction": {"count": 1, "sample_ids": ["r2"]},
      "too_short": {"count": 2, "sample_ids": ["r1"]}}]), label="Summary")
  stats = counters(p.run(), "palmflow.filter")
  assert stats == {"kept": 2, "rejected_too_short": 2, "rejected_low_alpha_fraction": 1,
                   "rejected_empty": 1}


def test_summarize_rejections_is_deterministic_and_handles_empty():
  records = [{"id": f"doc{i:03d}", "reason": "too_short" if i % 3 else "too_long"}
             for i in range(50, 0, -1)]
  with make_pipeline() as p:
    summary = p | beam.Create(records) | SummarizeRejections(max_samples=3)
    assert_that(summary, equal_to([{
        "too_long": {"count": 16, "sample_ids": ["doc003", "doc006", "doc009"]},
        "too_short": {"count": 34, "sample_ids": ["doc001", "doc002", "doc004"]}}]))
    empty = p | "NoRecords" >> beam.Create([]) | "SummarizeNone" >> SummarizeRejections()
    assert_that(empty, equal_to([{}]), label="Empty")


@needs_data
def test_clean_real_sst2_dev():
  spec = {"name": "sst2", "format": "tsv", "text_column": "sentence",
          "path": str(DATA / "glue_sst2" / "dev.tsv")}
  p = make_pipeline()
  out = (p | ReadSource(spec) | Normalize("NFKC")
         | Filter(FilterConfig(min_chars=40, min_alpha_fraction=0.7)))
  total = ((out.kept, out.rejected) | beam.Flatten() | beam.combiners.Count.Globally())
  assert_that(total, equal_to([872]), label="EveryDocAccountedFor")
  stats = counters(p.run(), "palmflow.filter")
  assert stats["kept"] + stats["rejected_too_short"] + stats.get(
      "rejected_low_alpha_fraction", 0) == 872
  assert 0 < stats["rejected_too_short"] < 872
