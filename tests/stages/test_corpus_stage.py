"""The corpus stage on the shared datasets: many sources, filters, dedup, stats.json."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from palmflow.dag import executor, spec
from palmflow.dag.store import Store

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data not present")
def test_corpus_stage_on_shared_data_with_bad_bytes(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"A line of ordinary text that is long enough to keep.\n"
                  b"Broken \xff\xfe bytes and a NUL \x00 inside a long enough line here.\n")
  (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""\
      pipeline: shared_text
      stages:
        corpus:
          kind: corpus
          settings:
            sources:
              - {{name: moby, format: text, path: {DATA}/gutenberg_moby_dick/2701-0.txt,
                 unit: paragraph, strip_gutenberg: true}}
              - {{name: sst2, format: tsv, path: {DATA}/glue_sst2/dev.tsv, text_column: sentence}}
              - {{name: bad, format: text, path: bad.txt, unit: line}}
            filters: {{min_chars: 40, min_alpha_fraction: 0.6}}
            dedup: exact+near
            num_shards: 3
      """))
  store = Store(tmp_path / "store")
  pipeline = spec.load(tmp_path / "p.yaml")
  planned, ran = executor.run(pipeline, store, log=lambda m: None)
  assert ran == ["corpus"]
  d = store.stage_dir("corpus", planned[0].fingerprint)
  stats = json.loads((d / "stats.json").read_text())
  assert stats["in"]["moby"]["docs"] > 2000 and stats["in"]["sst2"]["docs"] == 872
  assert stats["in"]["bad"]["docs"] == 2 and stats["out"]["bad"]["docs"] == 2
  assert stats["documents_out"] < stats["documents_in"]
  rej = stats["rejections"]
  assert rej["too_short"]["count"] > 100 and len(rej["too_short"]["sample_ids"]) == 5
  assert rej["exact_duplicate"]["count"] >= 1
  assert stats["counters"]["palmflow/invalid_utf8_docs"] == 1
  docs = [json.loads(l) for f in sorted(d.glob("documents.jsonl-*")) for l in
          f.read_text().splitlines()]
  assert len(docs) == stats["documents_out"]
  assert not any("\x00" in x["text"] for x in docs)
  moby = " ".join(x["text"] for x in docs if x["source"] == "moby")
  for licence_text in ("terms of the Project Gutenberg License", "*** START", "*** END",
                       "General Terms of Use"):
    assert licence_text not in moby
  assert "Call me Ishmael" in moby
  assert len(sorted(d.glob("documents.jsonl-*"))) == 3


def test_a_corpus_with_no_document_left_stops_there_naming_the_stage(tmp_path):
  """Filters that drop everything used to publish an empty corpus, and the vocabulary and
  blocks stages then failed far from the cause. Now the corpus stage fails (not published),
  naming itself and the rejections."""
  from palmflow.errors import DataError
  (tmp_path / "short.txt").write_text("tiny\nlines\nonly\n")
  (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
      pipeline: empty_text
      stages:
        corpus:
          kind: corpus
          settings:
            sources: [{name: s, format: text, path: short.txt, unit: line}]
            filters: {min_chars: 40}
            num_shards: 1
      """))
  store = Store(tmp_path / "store")
  pipeline = spec.load(tmp_path / "p.yaml")
  with pytest.raises(DataError, match=r"stage 'corpus' \(corpus\): no document left \(3 read; "
                                      r"rejected by reason: \{'too_short'") as e:
    executor.run(pipeline, store, log=lambda m: None)
  assert e.value.exit_code == 4
  planned = executor.plan(pipeline, store)
  assert planned[0].action != "reuse"                 # not published, so not cached


def test_normalize_none_keeps_the_unicode_form_but_still_removes_nuls(tmp_path):
  """``normalize: ''`` skips the Unicode normal form only: NULs are removed and newlines
  unified as with a form (they used to be kept with it)."""
  (tmp_path / "a.txt").write_bytes(
      "Cafe\u0301 au lait, with a NUL \x00 in the middle of a line.\r\nnext line\n\n"
      "Another paragraph of text.\n".encode("utf-8"))
  (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
      pipeline: raw_text
      stages:
        corpus:
          kind: corpus
          settings:
            sources: [{name: s, format: text, path: a.txt, unit: paragraph}]
            normalize: ''
            num_shards: 1
      """))
  store = Store(tmp_path / "store")
  pipeline = spec.load(tmp_path / "p.yaml")
  planned, _ = executor.run(pipeline, store, log=lambda m: None)
  d = store.stage_dir("corpus", planned[0].fingerprint)
  texts = sorted(json.loads(l)["text"] for f in d.glob("documents.jsonl-*")
                 for l in f.read_text().splitlines())
  assert texts == ["Another paragraph of text.",
                   "Cafe\u0301 au lait, with a NUL  in the middle of a line.\nnext line"]


def test_empty_documents_are_rejected_without_filters(tmp_path):
  """An empty file (a package's empty __init__.py in the stdlib corpus) was kept as a
  document of no text, and another empty one was then counted as its exact duplicate."""
  rows = [{"text": "Some text worth keeping."}, {"text": ""}, {"text": "  \n\n"}]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
      pipeline: empties
      stages:
        corpus:
          kind: corpus
          settings:
            sources: [{name: s, format: jsonl, path: docs.jsonl}]
            dedup: exact
            num_shards: 1
      """))
  store = Store(tmp_path / "store")
  planned, _ = executor.run(spec.load(tmp_path / "p.yaml"), store, log=lambda m: None)
  d = store.stage_dir("corpus", planned[0].fingerprint)
  texts = [json.loads(l)["text"] for f in d.glob("documents.jsonl-*")
           for l in f.read_text().splitlines()]
  assert texts == ["Some text worth keeping."]
  stats = json.loads((d / "stats.json").read_text())
  assert stats["rejections"]["empty"]["count"] == 2, stats["rejections"]
  assert "exact_duplicate" not in stats["rejections"]
