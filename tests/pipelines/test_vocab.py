"""Tests of the vocabulary: the Beam sample job (pipelines/vocab_sample.py) and the `vocab`
stage (palmflow/stages/vocab.py) training SentencePiece unigram and BPE models.

The corpus is tiny-shakespeare from ../shared/data when present, otherwise the text of a few
standard-library modules (every machine has those), so these tests never skip.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from palmflow.dag.kinds import StageContext, Upstream
from palmflow.stages.vocab import Vocab, VocabSettings, read_sample, train_sentencepiece
from pipelines import vocab_sample
from pipelines.transforms.shards import stable_hash

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SHAKESPEARE = DATA / "tiny_shakespeare" / "input.txt"


def corpus_docs() -> list[dict]:
  """Paragraph documents of tiny-shakespeare (or, without ../shared, of stdlib modules)."""
  if SHAKESPEARE.exists():
    name, texts = "shakespeare", [SHAKESPEARE.read_text(encoding="utf-8")]
  else:
    import argparse, inspect, json as json_mod, textwrap  # noqa: E401 - stdlib text
    name = "stdlib"
    texts = [inspect.getsource(m) for m in (argparse, inspect, json_mod, textwrap)]
  docs = []
  for t, text in enumerate(texts):
    for n, para in enumerate(re.split(r"\n\s*\n", text)):
      if para.strip():
        docs.append({"id": f"{name}:{t}:{n}", "text": para, "source": name})
  return docs


def write_shards(dir_: Path, docs: list[dict], num: int) -> str:
  """Writes `docs` round-robin into `num` JSONL files; returns their glob."""
  dir_.mkdir(parents=True, exist_ok=True)
  files = [open(dir_ / f"documents.jsonl-{i:05d}-of-{num:05d}", "w", encoding="utf-8")
           for i in range(num)]
  for i, d in enumerate(docs):
    files[i % num].write(json.dumps(d) + "\n")
  for f in files:
    f.close()
  return str(dir_ / f"documents.jsonl-*-of-{num:05d}")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
  return corpus_docs()


def run_sample(pattern: str, out: Path, *extra: str) -> tuple[dict, bytes]:
  stats = vocab_sample.run([f"--documents={pattern}", f"--output_dir={out}",
                            "--runner=DirectRunner", *extra])
  return stats, Path(stats["sample_path"]).read_bytes()


def test_split_text_lines_and_sentences():
  text = "First line.\n    indented code\n\n\nA sentence. Another one! 'Quoted.' End\n"
  assert vocab_sample.split_text(text, split="line", max_chars=100) == [
      "First line.", "    indented code", "A sentence. Another one! 'Quoted.' End"]
  assert vocab_sample.split_text(text, split="sentence", max_chars=100) == [
      "First line.", "indented code", "A sentence.", "Another one!", "'Quoted.'", "End"]
  assert vocab_sample.split_text("abcdefghij", split="line", max_chars=4) == [
      "abcd", "efgh", "ij"]


def test_sample_is_deterministic_and_independent_of_input_layout(tmp_path, docs):
  n = 300
  one = write_shards(tmp_path / "one", docs, 1)
  three = write_shards(tmp_path / "three", list(reversed(docs)), 3)
  args = (f"--sample_documents={n}", "--max_lines=1000", "--seed=7")
  a, bytes_a = run_sample(one, tmp_path / "a", *args)
  _, bytes_b = run_sample(three, tmp_path / "b", *args, "--direct_num_workers=2",
                          "--direct_running_mode=multi_threading")
  _, bytes_c = run_sample(one, tmp_path / "c", f"--sample_documents={n}", "--max_lines=1000",
                          "--seed=8")
  assert bytes_a == bytes_b, "the sample depends on the input files' layout or the workers"
  assert bytes_c != bytes_a, "the seed does not change the sample"
  assert a["documents_read"] == len(docs) and a["documents_sampled"] == n
  assert a["lines_split"] > 1000 and a["lines"] == 1000 == len(read_sample(a["sample_path"]))
  # the documents are the n smallest seeded hashes: every line comes from one of them
  chosen = sorted(docs, key=lambda d: (stable_hash(7, "vocab_doc", d["id"]), d["id"]))[:n]
  allowed = {l for d in chosen for l in d["text"].splitlines()}
  assert set(read_sample(a["sample_path"])) <= allowed
  assert json.loads((tmp_path / "a" / vocab_sample.STATS).read_text()) == a


def test_sample_by_hash_fraction(tmp_path, docs):
  pattern = write_shards(tmp_path / "docs", docs, 2)
  stats, data = run_sample(pattern, tmp_path / "f", "--sample_fraction=0.25", "--seed=3")
  expected = [d for d in docs if stable_hash(3, "vocab_doc", d["id"]) < 0.25 * 2 ** 63]
  assert stats["documents_sampled"] == len(expected)
  assert 0.15 * len(docs) < len(expected) < 0.35 * len(docs)
  lines = sorted(l for d in expected for l in d["text"].splitlines() if l.strip())
  assert sorted(data.decode("utf-8").split("\n")[:-1]) == lines


def stage_context(tmp_path: Path, pattern: str, settings: VocabSettings, name: str):
  out = tmp_path / name
  out.mkdir()
  corpus = Upstream(name="corpus", kind="corpus", fingerprint="c0", path=tmp_path,
                    manifest={"summary": {"shard_pattern": pattern}})
  return StageContext(
      name="vocab", pipeline="test", out_dir=out, settings=settings,
      inputs={"documents": corpus}, placement={"beam": {"runner": "DirectRunner"}},
      fingerprint="v0", all_upstream={"corpus": corpus}, log=lambda m: None,
      store_root=tmp_path, base_dir=tmp_path)


HELD_OUT = ["Now is the winter of our discontent, made glorious summer.",
            "Café 東京 — naïve résumé: 12345!", "<sep> tokens <sep> stay whole"]


def check_model(path: Path, *, symbols=()) -> spm.SentencePieceProcessor:
  sp = spm.SentencePieceProcessor(model_file=str(path))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  for i, s in enumerate(symbols):
    assert sp.id_to_piece(3 + i) == s
  for text in HELD_OUT:
    ids = sp.encode(text)
    assert 2 not in ids, f"unk in {text!r}: byte fallback should cover every character"
    assert sp.decode(ids) == text
  for s in symbols:
    assert sp.piece_to_id(s) in sp.encode(f"a {s} b")
  return sp


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_vocab_stage_trains_round_trips_and_is_deterministic(tmp_path, docs, model_type):
  pattern = write_shards(tmp_path / "docs", docs, 2)
  settings = VocabSettings(vocab_size=600, model_type=model_type, sample_documents=2000,
                           max_sentences=12000, user_defined_symbols=("<sep>",), seed=0)
  kind = Vocab()
  a = kind.run(stage_context(tmp_path, pattern, settings, "a"))
  b = kind.run(stage_context(tmp_path, pattern, settings, "b"))
  model_a, model_b = tmp_path / "a" / "spm.model", tmp_path / "b" / "spm.model"
  assert model_a.read_bytes() == model_b.read_bytes(), "same input and seed, other model"
  assert a == b and a["sha256"] == json.loads((tmp_path / "a" / "vocab.json").read_text())[
      "sha256"]
  assert a["model_type"] == model_type and 550 <= a["vocab_size"] <= 600
  assert 1000 < a["sample"]["lines"] <= 12000
  sp = check_model(model_a, symbols=["<sep>"])
  assert sp.get_piece_size() == a["vocab_size"]
  # another sample, another model
  sample = read_sample(str(tmp_path / "a" / "sample.txt-00000-of-00001"))
  other = train_sentencepiece(sample[: len(sample) // 2], settings)
  assert other != model_a.read_bytes()


def test_settings_validation():
  with pytest.raises(ValueError, match="model_type"):
    VocabSettings(model_type="wordpiece").validate()
  with pytest.raises(ValueError, match="vocab_size"):
    VocabSettings(vocab_size=100).validate()
  with pytest.raises(ValueError, match="split"):
    VocabSettings(split="word").validate()
  with pytest.raises(ValueError, match="sample_fraction"):
    VocabSettings(sample_fraction=0).validate()
