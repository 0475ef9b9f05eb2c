"""Pipeline file validation: every error names the file, line, stage and field; exit code 2."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from palmflow import cli
from palmflow.dag import spec
from palmflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
pipeline: demo
stages:
  corpus:
    kind: corpus
    settings:
      sources: [{name: stdlib, format: python_stdlib, sample_fraction: 0.1}]
  vocab:
    kind: vocab
    inputs: {documents: corpus}
    settings: {vocab_size: 500}
  blocks:
    kind: blocks
    inputs: {documents: corpus, vocab: vocab}
"""


def write(tmp_path: Path, text: str) -> Path:
  p = tmp_path / "pipeline.yaml"
  p.write_text(textwrap.dedent(text))
  return p


def test_valid_file_orders_stages(tmp_path):
  p = spec.load(write(tmp_path, GOOD))
  assert p.order == ["corpus", "vocab", "blocks"]
  assert p.stages["vocab"].settings.vocab_size == 500


@pytest.mark.parametrize("edit, expect", [
    (("kind: vocab", "kind: vocabulary"), ["pipeline.yaml:8,", "stage 'vocab'", "field 'kind'",
                                           "unknown stage kind 'vocabulary'", "did you mean 'vocab'"]),
    (("{vocab_size: 500}", "{vocab_sise: 500}"), ["pipeline.yaml:10,", "stage 'vocab'",
                                                  "field 'settings.vocab_sise'",
                                                  "did you mean 'vocab_size'"]),
    (("{vocab_size: 500}", "{vocab_size: many}"), ["stage 'vocab'", "settings.vocab_size",
                                                   "'many' is not of type 'integer'"]),
    (("inputs: {documents: corpus, vocab: vocab}", "inputs: {documents: corpus, vocab: vocabb}"),
     ["stage 'blocks'", "field 'inputs.vocab'", "'vocabb', which is not in the file"]),
    (("inputs: {documents: corpus}\n", "inputs: {documents: blocks}\n"),
     ["cycle", "vocab -> blocks -> vocab"]),
    (("inputs: {documents: corpus, vocab: vocab}", "inputs: {documents: corpus, vocab: corpus}"),
     ["needs a stage producing vocabulary", "'corpus' (corpus) produces documents"]),
    (("pipeline: demo", "pipeline: demo\nstagez: {}"), ["pipeline.yaml:2,", "unknown field 'stagez'"]),
    (("format: python_stdlib", "format: pdf"), ["sources.0.format", "unknown format 'pdf'"]),
    # nested settings the Beam job would reject only once built, or silently ignore
    (("sample_fraction: 0.1}", "sample_fraciton: 0.1}"),
     ["stage 'corpus'", "sources.0.sample_fraciton", "did you mean 'sample_fraction'"]),
    (("sample_fraction: 0.1}", "include: '*.py'}"),
     ["field 'settings.sources.0.include'", "expected a list of glob patterns"]),
    (("{name: stdlib, format: python_stdlib, sample_fraction: 0.1}]",
      "{name: b, format: text, path: x.txt, unti: line}]"),
     ["sources.0", "unknown key 'unti'", "'unit'"]),
    (("sample_fraction: 0.1}]", "sample_fraction: 0.1}]\n      filters: {min_char: 5}"),
     ["field 'settings.filters'", "unknown key(s) ['min_char']", "known: min_chars"]),
    (("sample_fraction: 0.1}]", "sample_fraction: 0.1}]\n      normalize: nfc"),
     ["field 'settings.normalize'", "form 'nfc' is not one of"]),
    (("{vocab_size: 500}", "{vocab_size: 500, max_sentences: 0}"),
     ["field 'settings.max_sentences'", "at least 1, or null for no limit"]),
    (("inputs: {documents: corpus, vocab: vocab}",
      "inputs: {documents: corpus, vocab: vocab}\n    settings: {num_shards: 0}"),
     ["stage 'blocks'", "field 'settings.num_shards'", "at least 1"]),
    (("inputs: {documents: corpus, vocab: vocab}", "inputs: {documents: [], vocab: vocab}"),
     ["stage 'blocks'", "inputs.documents"]),
])
def test_invalid_files_are_rejected_with_location(tmp_path, edit, expect):
  old, new = edit
  assert old in GOOD
  path = write(tmp_path, GOOD.replace(old, new, 1))
  with pytest.raises(ConfigError) as e:
    spec.load(path)
  msg = str(e.value)
  assert str(path) in msg
  for part in expect:
    assert part in msg, msg


def test_cli_exit_code_and_nothing_runs(tmp_path, capsys):
  path = write(tmp_path, GOOD.replace("kind: vocab", "kind: nope"))
  store = tmp_path / "store"
  assert cli.main(["run", str(path), "--store", str(store)]) == 2
  assert "unknown stage kind 'nope'" in capsys.readouterr().err
  assert not store.exists()


def test_missing_input_file_is_a_config_error(tmp_path, capsys):
  text = GOOD.replace("{name: stdlib, format: python_stdlib, sample_fraction: 0.1}",
                      "{name: books, format: text, path: missing/*.txt}")
  path = write(tmp_path, text)
  assert cli.main(["plan", str(path), "--store", str(tmp_path / "s")]) == 2
  err = capsys.readouterr().err
  assert "stage 'corpus'" in err and "missing/*.txt" in err


def test_glob_identity_reads_nested_globs_and_folders_are_not_files(tmp_path, capsys):
  """A corpus path's identity matches what the Beam job reads: wildcards in any component
  and `**` at any depth; each file keyed by its path below the glob's base, so two files of
  one name in different folders both count (an edit of either reruns the stage). A plain
  path naming a folder is a config error, not a traceback."""
  from palmflow.stages.common import path_identity
  for rel in ("data/a/x.txt", "data/b/x.txt", "data/b/deep/y.txt"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(rel)
  assert sorted(path_identity(tmp_path, "data/*/x.txt")["files"]) == ["a/x.txt", "b/x.txt"]
  assert sorted(path_identity(tmp_path, "data/**/*.txt")["files"]) == [
      "a/x.txt", "b/deep/y.txt", "b/x.txt"]
  assert sorted(path_identity(tmp_path / "data", "b/*")["files"]) == ["x.txt"]  # not deep/
  before = path_identity(tmp_path, "data/*/x.txt")
  (tmp_path / "data/b/x.txt").write_text("changed")
  assert path_identity(tmp_path, "data/*/x.txt") != before
  text = GOOD.replace("{name: stdlib, format: python_stdlib, sample_fraction: 0.1}",
                      "{name: books, format: text, path: data}")
  (tmp_path / "p").mkdir()
  (tmp_path / "p" / "data").mkdir()
  path = write(tmp_path / "p", text)
  assert cli.main(["validate", str(path)]) == 2
  err = capsys.readouterr().err
  assert "stage 'corpus'" in err and "'data' is a folder" in err and "data/*.txt" in err, err


def test_a_pipeline_file_that_is_a_folder_or_not_utf8_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="cannot read the pipeline file"):
    spec.load(tmp_path)
  bad = tmp_path / "p.yaml"
  bad.write_bytes(b"pipeline: t\nstages:\n  a: {kind: corpus} # caf\xe9\n")
  with pytest.raises(ConfigError, match=r"p.yaml:3: not UTF-8 text"):
    spec.load(bad)


def test_yaml_syntax_error_names_line(tmp_path):
  path = write(tmp_path, GOOD.replace("kind: vocab", "kind: [vocab"))
  with pytest.raises(ConfigError, match=r"pipeline.yaml:\d+"):
    spec.load(path)


def test_every_shipped_pipeline_file_is_valid():
  files = sorted((REPO / "pipelines" / "examples").glob("*.yaml"))
  assert files
  for f in files:
    p = spec.load(f)
    assert p.order, f


def test_a_remote_source_that_cannot_be_listed_fails_planning_naming_it(tmp_path, capsys):
  """Remote inputs are identified by their listed sizes and update times (an object
  rewritten reruns the stage), so planning must be able to list them."""
  text = GOOD.replace("{name: stdlib, format: python_stdlib, sample_fraction: 0.1}",
                      "{name: books, format: text, path: 'zz://bucket/books/*.txt'}")
  path = write(tmp_path, text)
  assert cli.main(["validate", str(path)]) == 2
  err = capsys.readouterr().err
  assert "stage 'corpus'" in err and "cannot list 'zz://bucket/books/*.txt'" in err, err
