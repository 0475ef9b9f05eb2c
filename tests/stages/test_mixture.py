"""Tests of the `mixture` stage kind (palmflow/stages/mixture.py) and mixtures/pretraining.py.

A pipeline made here runs through the real executor: two tiny synthetic corpora (one written
in lowercase, one in UPPERCASE, so every block tells its source), a vocabulary trained on
them, two blocks stages, and mixtures of the two blocks outputs. seqio then samples the
registered Mixture and the proportions are checked.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import yaml

from palmflow.dag import executor, spec as spec_lib
from palmflow.dag.store import Store
from palmflow.errors import ConfigError
from palmflow.stages import mixture as mixture_lib
from tasks import specs

WORDS = "cat dog sat on the mat ran far away big small red blue green house tree".split()
BLOCK = 32


def write_corpus(path: Path, n: int, *, upper: bool, seed: int) -> None:
  rng = random.Random(seed)
  lines = []
  for _ in range(n):
    line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25)))
    lines.append(line.upper() if upper else line)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def pipeline_dict(**mixes) -> dict:
  text = lambda name: {"kind": "corpus", "settings": {"num_shards": 1, "sources": [
      {"name": name, "format": "text", "unit": "line", "path": f"{name}.txt"}]}}
  stages = {
      "corpus_lower": text("lower"), "corpus_upper": text("upper"),
      "corpus_both": {"kind": "corpus", "settings": {"num_shards": 1, "sources": [
          {"name": "lower", "format": "text", "unit": "line", "path": "lower.txt"},
          {"name": "upper", "format": "text", "unit": "line", "path": "upper.txt"}]}},
      "vocab": {"kind": "vocab", "inputs": {"documents": "corpus_both"},
                "settings": {"vocab_size": 320, "max_sentences": 5000}},
      "blocks_a": {"kind": "blocks", "inputs": {"documents": "corpus_lower", "vocab": "vocab"},
                   "settings": {"block_length": BLOCK, "num_shards": 2, "num_buckets": 2}},
      "blocks_b": {"kind": "blocks", "inputs": {"documents": "corpus_upper", "vocab": "vocab"},
                   "settings": {"block_length": BLOCK, "num_shards": 2, "num_buckets": 2}},
  }
  for name, settings in mixes.items():
    stages[name] = {"kind": "mixture", "inputs": {"tasks": ["blocks_a", "blocks_b"]},
                    "settings": settings}
  return {"pipeline": "mixtest", "placement": {"beam": {"runner": "DirectRunner"}},
          "stages": stages}


def four_mixtures(*, mix_plan: tuple[int, int], starved_plan: tuple[int, int]) -> dict:
  """The pipeline with mixtures by examples (3:1), tokens, token shares and a starved one
  (1000:1), the first and the last planned for (train steps, batch size)."""
  plan = lambda p: {"planned_train_steps": p[0], "planned_batch_size": p[1]}
  return pipeline_dict(
      mix={"rates": {"blocks_a": 3, "blocks_b": 1}, "rate_by": "examples", **plan(mix_plan)},
      mix_tokens={"rates": {"blocks_a": 2}, "rate_by": "tokens"},
      mix_share={"rates": {"blocks_a": 3, "blocks_b": 1}, "rate_by": "token_share"},
      mix_starved={"rates": {"blocks_a": 1000, "blocks_b": 1}, "min_examples_per_source": 1,
                   **plan(starved_plan)})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """Runs the pipeline once; returns (Store, {stage: manifest})."""
  root = tmp_path_factory.mktemp("mixtest")
  write_corpus(root / "lower.txt", 600, upper=False, seed=0)
  write_corpus(root / "upper.txt", 300, upper=True, seed=1)
  raw = four_mixtures(mix_plan=(1000, 8), starved_plan=(10, 8))
  path = root / "pipeline.yaml"
  path.write_text(yaml.safe_dump(raw), encoding="utf-8")
  pipeline = spec_lib.load(path)
  st = Store(root / "store")
  logs = []
  planned, _ = executor.run(pipeline, st, log=logs.append)
  manifests = {p.name: st.manifest(p.name, p.fingerprint) for p in planned}
  return root, st, manifests, logs


def sample_sources(task_json: Path, n: int) -> tuple[str, list[str]]:
  """Registers the mixture from its task.json and draws n examples the way the trainer does
  (seqio.get_dataset with the blocked feature converter); says which corpus each is from."""
  from palmflow.trainer.feature_converters import BlockedLMFeatureConverter
  name = specs.register_from_file(str(task_json))
  spec = json.loads(task_json.read_text())
  sp = spm.SentencePieceProcessor(model_file=spec["vocab_path"])
  ds = seqio.get_dataset(name, task_feature_lengths={"targets": BLOCK},
                         feature_converter=BlockedLMFeatureConverter(), shuffle=True, seed=0,
                         num_epochs=None)
  out = []
  for ex in ds.take(n).as_numpy_iterator():
    seg = ex["decoder_segment_ids"]
    assert seg.max() >= 1 and (seg[seg > 0] >= 1).all()
    t = ex["decoder_target_tokens"][seg > 0]
    text = sp.decode(t[t != 1].tolist())
    assert text.upper() == text or text.lower() == text, text
    out.append("b" if text.upper() == text and text.lower() != text else "a")
  return name, out


def test_mixture_samples_at_three_to_one(store):
  _, _, manifests, _ = store
  m = manifests["mix"]
  assert m["produces"] == "task" and m["summary"]["warnings"] == []
  spec = m["summary"]["task"]
  assert spec["type"] == "mixture" and spec["name"].endswith(m["fingerprint"])
  assert [r for _, r in spec["rates"]] == [3.0, 1.0]
  assert [c["name"] for c in spec["components"]] == [
      manifests["blocks_a"]["summary"]["task"]["name"],
      manifests["blocks_b"]["summary"]["task"]["name"]]
  rows = {r["stage"]: r for r in m["summary"]["sources"]}
  assert rows["blocks_a"]["share"] == pytest.approx(0.75)
  assert rows["blocks_b"]["expected_examples"] == pytest.approx(0.25 * 1000 * 8)
  _, st, _, _ = store
  task_json = st.stage_dir("mix", m["fingerprint"]) / "task.json"
  name, sources = sample_sources(task_json, 400)
  share_b = sources.count("b") / len(sources)
  print(f"mixture {name}: {share_b:.3f} of 400 examples from blocks_b (expected 0.25)")
  assert abs(share_b - 0.25) < 0.07


def test_token_rates_come_from_the_blocks_stats(store):
  _, _, manifests, _ = store
  stats = {s: manifests[s]["summary"]["stats"] for s in ("blocks_a", "blocks_b")}
  tok = dict(manifests["mix_tokens"]["summary"]["task"]["rates"])
  names = {s: manifests[s]["summary"]["task"]["name"] for s in stats}
  assert tok[names["blocks_a"]] == 2 * stats["blocks_a"]["non_pad_tokens"]
  assert tok[names["blocks_b"]] == stats["blocks_b"]["non_pad_tokens"]
  share = dict(manifests["mix_share"]["summary"]["task"]["rates"])
  per_block = {s: stats[s]["non_pad_tokens"] / stats[s]["blocks"] for s in stats}
  # token_share: expected tokens drawn from a and b are 3:1
  ratio = (share[names["blocks_a"]] * per_block["blocks_a"]) / (
      share[names["blocks_b"]] * per_block["blocks_b"])
  assert ratio == pytest.approx(3.0)


def test_starvation_warning(store):
  _, _, manifests, logs = store
  warnings = manifests["mix_starved"]["summary"]["warnings"]
  assert len(warnings) == 1 and "blocks_b" in warnings[0] and "0.08 examples" in warnings[0]
  assert any("WARNING" in l and "blocks_b" in l for l in logs)
  assert manifests["mix"]["summary"]["warnings"] == []


def test_a_new_plan_reruns_nothing_and_its_warnings_follow_it(store):
  # The planned run is advisory: changing it keeps every fingerprint (nothing reruns, the
  # training that reads the mixture would not either), and the reused mixtures check the
  # new plan: the starved source now gets enough, the other mixture's plan starves one.
  root, st, manifests, _ = store
  raw = four_mixtures(mix_plan=(1, 2), starved_plan=(1000, 8))
  path = root / "replanned.yaml"
  path.write_text(yaml.safe_dump(raw), encoding="utf-8")
  logs = []
  planned, ran = executor.run(spec_lib.load(path), st, log=logs.append)
  assert ran == []
  assert {p.name: p.fingerprint for p in planned} == {
      n: m["fingerprint"] for n, m in manifests.items()}
  warnings = [l for l in logs if "WARNING" in l]
  assert len(warnings) == 1, logs
  assert "mix: WARNING: source 'blocks_b' would get 0.50 examples" in warnings[0]


def test_train_stage_takes_the_mixture_as_data(store):
  from palmflow.dag.kinds import StageContext, Upstream
  from palmflow.stages.train import Train, TrainSettings
  root, st, manifests, _ = store
  m = manifests["mix"]
  data = Upstream(name="mix", kind="mixture", fingerprint=m["fingerprint"],
                  path=st.stage_dir("mix", m["fingerprint"]), manifest=m)
  ctx = StageContext(name="pretrain", pipeline="mixtest", out_dir=root / "train",
                     settings=TrainSettings(gin_files=["runs/pretrain.gin"], steps=2),
                     inputs={"data": data}, placement={}, fingerprint="t0",
                     all_upstream={"mix": data}, log=print, store_root=root, base_dir=root)
  argv, facts = Train().command(ctx)
  assert facts["task"] == m["summary"]["task"]["name"]
  assert f"--task_spec={data.path / 'task.json'}" in argv
  assert f"--gin.TASK_FEATURE_LENGTHS={{'targets': {BLOCK}}}" in argv


def test_rates_naming_a_missing_input_fail(store, tmp_path):
  root, _, _, _ = store
  raw = pipeline_dict(bad={"rates": {"blocks_c": 1}})
  path = root / "bad.yaml"
  path.write_text(yaml.safe_dump(raw), encoding="utf-8")
  # refused when the file is loaded, naming the file, the line and the field: nothing runs
  with pytest.raises(ConfigError, match="'blocks_c' is not among inputs.tasks") as e:
    spec_lib.load(path)
  assert "bad.yaml:" in str(e.value) and "settings.rates" in str(e.value), str(e.value)


def test_settings_validation_and_rate_functions():
  with pytest.raises(ValueError, match="rate_by"):
    mixture_lib.MixtureSettings(rate_by="bytes").validate()
  with pytest.raises(ValueError, match="negative"):
    mixture_lib.MixtureSettings(rates={"a": -1}).validate()
  with pytest.raises(ValueError, match="planned_batch_size"):
    mixture_lib.MixtureSettings(planned_train_steps=10).validate()
  comps = [("a", {"name": "ta"}, {"non_pad_tokens": 1000, "blocks": 10}),
           ("b", {"name": "tb"}, {"non_pad_tokens": 300, "blocks": 5})]
  assert mixture_lib.source_rates(comps, rates={"a": 2}, rate_by="examples") == [2.0, 1.0]
  assert mixture_lib.source_rates(comps, rates={}, rate_by="tokens") == [1000.0, 300.0]
  np.testing.assert_allclose(
      mixture_lib.source_rates(comps, rates={"a": 1, "b": 1}, rate_by="token_share"),
      [10 / 1000, 5 / 300])
  rows, warnings = mixture_lib.starvation_report(comps, [999.0, 1.0], steps=10, batch=10,
                                                 min_examples=1.0)
  assert rows[1]["expected_examples"] == pytest.approx(0.1) and len(warnings) == 1
  with pytest.raises(ValueError, match="no token/block counts"):
    mixture_lib.source_rates([("c", {"name": "tc"}, {})], rates={}, rate_by="tokens")
