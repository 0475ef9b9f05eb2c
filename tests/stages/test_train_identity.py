"""The train stage's identity: the gin files the binary will read, whatever folder palmflow
runs in, and every one of them even when two share a file name."""
from __future__ import annotations

from pathlib import Path

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


def test_a_misspelt_macro_fails_validate_before_anything_runs(tmp_path, capsys):
  """`palmflow validate` (and plan, and run before its first stage) refuses a gin macro no
  gin file uses, naming the stage's line and the setting; the train binary refused it only
  after the stages upstream of the train stage had run."""
  import yaml
  from palmflow import cli
  repo = Path(__file__).resolve().parents[2]
  raw = yaml.safe_load((repo / "pipelines/examples/stdlib_demo.yaml").read_text())
  raw["stages"]["pretrain"]["settings"]["gin"]["BATCH_SIZ"] = 32
  path = tmp_path / "p.yaml"
  path.write_text(yaml.safe_dump(raw, sort_keys=False))
  assert cli.main(["validate", str(path)]) == 2
  err = capsys.readouterr().err
  assert f"{path}:" in err and "stage 'pretrain', field 'settings.gin.BATCH_SIZ'" in err, err
  assert "macro BATCH_SIZ is not used by any gin file" in err and "BATCH_SIZE" in err
  raw["stages"]["pretrain"]["settings"]["gin"] = {"TRAIN_STEPS": 10}   # with steps: 300
  path.write_text(yaml.safe_dump(raw, sort_keys=False))
  assert cli.main(["validate", str(path)]) == 2
  assert "not both" in capsys.readouterr().err
