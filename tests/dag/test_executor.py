"""Reuse, selective reruns, atomic publication and plans, with small in-test stage kinds."""
from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from palmflow.dag import executor, kinds, spec
from palmflow.dag.store import Store
from palmflow.errors import StageFailed

RUNS: list[str] = []


@dataclasses.dataclass(frozen=True)
class CountSettings:
  n: int = kinds.setting(1, doc="a number")
  fail: bool = kinds.setting(False, doc="raise while running")


@kinds.register
class Count(kinds.StageKind):
  kind = "test_count"
  produces = "documents"
  settings_cls = CountSettings
  slots = {"up": kinds.Slot(("documents",), required=False)}

  def run(self, ctx):
    RUNS.append(ctx.name)
    (ctx.out_dir / "partial.txt").write_text("x")
    if ctx.settings.fail:
      raise RuntimeError("boom")
    total = ctx.settings.n
    if "up" in ctx.inputs:
      total += ctx.inputs["up"].manifest["summary"]["total"]
    return {"total": total}


PIPE = """\
pipeline: t
placement: {beam: {runner: DirectRunner}}
stages:
  a: {kind: test_count, settings: {n: 1}}
  b: {kind: test_count, inputs: {up: a}, settings: {n: 10}}
  c: {kind: test_count, inputs: {up: b}, settings: {n: 100}}
  d: {kind: test_count, settings: {n: 1000}}
"""


def load(tmp_path, text=PIPE):
  p = tmp_path / "p.yaml"
  p.write_text(textwrap.dedent(text))
  return spec.load(p)


def test_rerun_reuses_and_changes_rerun_downstream_only(tmp_path):
  store = Store(tmp_path / "store")
  RUNS.clear()
  _, ran = executor.run(load(tmp_path), store, log=lambda m: None)
  assert ran == ["a", "b", "c", "d"] and RUNS == ran
  c_fp = [p for p in executor.plan(load(tmp_path), store) if p.name == "c"][0].fingerprint
  assert store.manifest("c", c_fp)["summary"]["total"] == 111

  RUNS.clear()
  planned, ran = executor.run(load(tmp_path), store, log=lambda m: None)
  assert ran == [] and RUNS == [] and all(p.action == "reuse" for p in planned)

  changed = PIPE.replace("settings: {n: 10}", "settings: {n: 20}")
  plan = {p.name: p for p in executor.plan(load(tmp_path, changed), store)}
  assert plan["a"].action == "reuse" and plan["d"].action == "reuse"
  assert plan["b"].action == "run" and "setting n: 10 -> 20" in plan["b"].reasons
  assert plan["c"].action == "run" and any("input 'up' (b) will run" in r
                                           for r in plan["c"].reasons)
  RUNS.clear()
  _, ran = executor.run(load(tmp_path, changed), store, log=lambda m: None)
  assert ran == ["b", "c"] == RUNS


def test_placement_is_not_identity(tmp_path):
  store = Store(tmp_path / "store")
  executor.run(load(tmp_path), store, log=lambda m: None)
  moved = PIPE.replace("runner: DirectRunner", "runner: DataflowRunner, options: {region: x}")
  assert all(p.action == "reuse" for p in executor.plan(load(tmp_path, moved), store))


def test_failed_stage_is_not_published_and_reruns(tmp_path):
  store = Store(tmp_path / "store")
  failing = PIPE.replace("settings: {n: 100}", "settings: {n: 100, fail: true}")
  with pytest.raises(StageFailed, match="stage 'c' .*boom"):
    executor.run(load(tmp_path, failing), store, log=lambda m: None)
  plan = {p.name: p for p in executor.plan(load(tmp_path, failing), store)}
  assert plan["a"].action == plan["b"].action == "reuse"
  c_dir = store.stage_dir("c", plan["c"].fingerprint)
  assert (c_dir / "partial.txt").exists() and not (c_dir / "COMPLETED").exists()
  assert "boom" in (c_dir / "error.txt").read_text()
  assert plan["c"].action == "run"   # not resumable: its partial dir is wiped on rerun
  RUNS.clear()
  with pytest.raises(StageFailed):
    executor.run(load(tmp_path, failing), store, log=lambda m: None)
  assert RUNS == ["c"]


def test_completed_marker_is_last_and_manifest_complete(tmp_path):
  store = Store(tmp_path / "store")
  planned, _ = executor.run(load(tmp_path), store, log=lambda m: None)
  for p in planned:
    d = store.stage_dir(p.name, p.fingerprint)
    m = json.loads((d / "manifest.json").read_text())
    assert m["fingerprint"] == p.fingerprint == d.name
    assert (d / "COMPLETED").stat().st_mtime_ns >= (d / "manifest.json").stat().st_mtime_ns
    assert not list(d.glob(".*.tmp"))


def test_plan_cli_output(tmp_path, capsys):
  from palmflow import cli
  (tmp_path / "p.yaml").write_text(PIPE)
  assert cli.main(["plan", str(tmp_path / "p.yaml"), "--store", str(tmp_path / "s")]) == 0
  out = capsys.readouterr().out
  assert out.count("RUN") == 4 and "never run" in out
  assert cli.main(["run", str(tmp_path / "p.yaml"), "--store", str(tmp_path / "s")]) == 0
  assert cli.main(["run", str(tmp_path / "p.yaml"), "--store", str(tmp_path / "s")]) == 0
  assert "all 4 stages are up to date" in capsys.readouterr().out


def test_store_env_var(tmp_path, monkeypatch, capsys):
  from palmflow import cli
  (tmp_path / "p.yaml").write_text(PIPE)
  monkeypatch.setenv("PALMFLOW_STORE", str(tmp_path / "envstore"))
  assert cli.main(["run", str(tmp_path / "p.yaml")]) == 0
  assert (tmp_path / "envstore" / "a").is_dir()


def test_only_runs_the_selected_stages_and_rejects_unknown_or_unfinished_upstream(tmp_path):
  """`palmflow run --only` runs the selected stages whatever their place in the order (an
  unselected pending stage before them is skipped, not a stop), refuses a selected stage
  whose upstream is neither finished nor selected, and rejects a name that is no stage."""
  from palmflow.errors import ConfigError
  store = Store(tmp_path / "store")
  pipe = load(tmp_path)
  RUNS.clear()
  _, ran = executor.run(pipe, store, only={"d"}, log=lambda s: None)
  assert ran == RUNS == ["d"]
  with pytest.raises(ConfigError, match="stage b needs a, not finished and not selected"):
    executor.run(pipe, store, only={"b"}, log=lambda s: None)
  _, ran = executor.run(pipe, store, only={"a", "b"}, log=lambda s: None)
  assert ran == ["a", "b"]
  with pytest.raises(ConfigError, match=r"(?s)--only names no stage of this pipeline: bb.*"
                                        r"did you mean 'b'"):
    executor.run(pipe, store, only={"bb"}, log=lambda s: None)
  _, ran = executor.run(pipe, store, only={"c"}, log=lambda s: None)
  assert ran == ["c"]


def test_validate_checks_the_files_stages_name(tmp_path, capsys):
  """`palmflow validate` rejects what `plan` and `run` would: here a gin file that is not
  found, named with the pipeline file, the stage and its line."""
  from pathlib import Path

  from palmflow import cli
  demo = Path(__file__).resolve().parents[2] / "pipelines" / "examples" / "stdlib_demo.yaml"
  text = demo.read_text()
  assert "models/palm_tiny.gin]" in text
  bad = tmp_path / "p.yaml"
  bad.write_text(text.replace("[runs/pretrain.gin, models/palm_tiny.gin]",
                              "[runs/pretrain.gin, models/palm_tinny.gin]", 1))
  assert cli.main(["validate", str(demo)]) == 0
  assert cli.main(["validate", str(bad)]) == 2
  err = capsys.readouterr().err
  line = next(i for i, l in enumerate(bad.read_text().splitlines(), 1) if l == "  pretrain:")
  assert f"{bad}:{line}, stage 'pretrain'" in err and "models/palm_tinny.gin" in err, err
  assert "gin file not found" in err


@kinds.register
class Gather(kinds.StageKind):
  kind = "test_gather"
  produces = "report"
  settings_cls = CountSettings
  slots = {"up": kinds.Slot(("documents",), many=True)}

  def run(self, ctx):
    return {"total": 0}


MANY = "  e: {kind: test_gather, inputs: {up: [a, d]}}\n"


def test_plan_reasons_name_the_kind_version_the_inputs_that_run_and_changed_lines(
    tmp_path, monkeypatch):
  """A kind's new version is named (it was shown only when nothing else changed, without
  the versions); a stage with several inputs names those that will run; a changed text
  setting (a gin file) shows the lines that differ, not both whole texts."""
  from palmflow.dag import fingerprint
  store = Store(tmp_path / "store")
  executor.run(load(tmp_path, PIPE + MANY),
               store, log=lambda m: None)
  monkeypatch.setattr(Count, "version", "7")
  changed = PIPE.replace("settings: {n: 1000}", "settings: {n: 2000}")
  plan = {p.name: p for p in executor.plan(
      load(tmp_path, changed + MANY), store)}
  assert plan["a"].reasons == ["kind test_count version 1 -> 7"]
  assert "kind test_count version 1 -> 7" in plan["d"].reasons
  assert "setting n: 1000 -> 2000" in plan["d"].reasons
  assert "input 'up' (a, d) will run" in plan["e"].reasons
  monkeypatch.setattr(Count, "version", "1")
  plan = {p.name: p for p in executor.plan(
      load(tmp_path, changed + MANY), store)}
  assert plan["e"].reasons == ["input 'up' (d) will run"]
  old = "from x import y\n\nmodels.PaLMConfig:\n  num_layers = 2\n  d_model = 64\n"
  assert fingerprint.diff({"gin": old}, {"gin": old.replace("= 2", "= 3")}) == [
      "gin: 'num_layers = 2' -> 'num_layers = 3'"]
  assert fingerprint.diff({"n": 1}, {"n": 2}) == ["n: 1 -> 2"]
