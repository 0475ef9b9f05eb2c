"""The train stage's identity: the gin files the binary will read, whatever folder palmflow
runs in, and every one of them even when two share a file name."""
from __future__ import annotations

from palmflow.stages.train import Train, TrainSettings


def _identity(base, **settings):
  return Train().identity(TrainSettings(steps=1, **settings), base_dir=base)


def test_identity_keeps_both_gin_files_of_one_name_and_ignores_the_current_folder(
    tmp_path, monkeypatch):
  conf = tmp_path / "conf"
  (conf / "shared").mkdir(parents=True)
  (conf / "exp.gin").write_text("include 'shared/exp.gin'\nBATCH_SIZE = 8\n")
  (conf / "shared" / "exp.gin").write_text("LOG_EVERY = 5\n")
  ident = _identity(tmp_path, gin_files=["exp.gin", "models/palm_tiny.gin"],
                    gin_search_paths=["conf"])
  assert {"exp.gin", "shared/exp.gin", "palm_tiny.gin", "palm_base.gin"} <= set(
      ident["resolved_gin"]), sorted(ident["resolved_gin"])
  (conf / "shared" / "exp.gin").write_text("LOG_EVERY = 6\n")   # the included one changes
  assert _identity(tmp_path, gin_files=["exp.gin", "models/palm_tiny.gin"],
                   gin_search_paths=["conf"]) != ident
  # A models/palm_tiny.gin in the folder palmflow runs in is not what the binary (run in
  # the repository) reads: the identity hashes the repository's file either way.
  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "palm_tiny.gin").write_text("VOCAB_SIZE = 3\n")
  monkeypatch.chdir(tmp_path)
  again = _identity(tmp_path, gin_files=["exp.gin", "models/palm_tiny.gin"],
                    gin_search_paths=["conf"])
  assert again["resolved_gin"]["palm_tiny.gin"] == ident["resolved_gin"]["palm_tiny.gin"]
