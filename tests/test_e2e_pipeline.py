"""The pulse test: the default pipeline's whole DAG, shrunk to tiny settings, end to end on CPU.

Runs corpus -> vocab -> blocks -> dataset -> pretrain -> finetune -> eval -> report through the
real CLI (Beam DirectRunner, SentencePiece, seqio, the t5x-compatible binaries, Orbax), then
checks reuse (a second run does nothing) and a selective rerun (changing the fine-tuning
steps reruns finetune, eval and report only).
"""
from __future__ import annotations

import html
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from palmflow import cli
from palmflow.dag import executor, spec
from palmflow.dag.store import Store

REPO = Path(__file__).resolve().parents[1]


def tiny_pipeline(tmp_path: Path, finetune_steps: int = 4) -> Path:
  raw = yaml.safe_load((REPO / "pipelines/examples/stdlib_demo.yaml").read_text())
  st = raw["stages"]
  st["corpus"]["settings"]["sources"][0]["sample_fraction"] = 0.04
  st["vocab"]["settings"].update(vocab_size=400, sample_documents=40, max_sentences=5000)
  st["blocks"]["settings"].update(block_length=32, num_shards=2, num_buckets=2)
  st["packages"]["settings"].update(packages=["json", "email"], max_train_examples=64,
                                    max_validation_examples=16, max_input_chars=60,
                                    inputs_length=24)
  tiny = {"BATCH_SIZE": 8, "CHECKPOINT_PERIOD": 2, "EVAL_PERIOD": 2, "EVAL_STEPS": 2,
          "WARMUP_STEPS": 2, "LOG_EVERY": 1}
  st["pretrain"]["settings"].update(steps=4, gin=dict(tiny))
  st["finetune"]["settings"].update(steps=finetune_steps, gin=dict(tiny, DROPOUT_RATE=0.1))
  st["eval"]["settings"].update(num_examples=8, batch_size=8)
  p = tmp_path / "tiny.yaml"
  p.write_text(yaml.safe_dump(raw, sort_keys=False))
  return p


@pytest.mark.slow
def test_whole_dag_end_to_end(tmp_path, capsys):
  store_dir = tmp_path / "store"
  path = tiny_pipeline(tmp_path)
  assert cli.main(["run", str(path), "--store", str(store_dir)]) == 0
  store = Store(store_dir)
  plan = {p.name: p for p in executor.plan(spec.load(path), store)}
  assert all(p.action == "reuse" for p in plan.values())
  m = {n: store.manifest(n, p.fingerprint) for n, p in plan.items()}

  assert m["corpus"]["summary"]["documents"] > 10
  assert m["vocab"]["summary"]["vocab_size"] == 400
  stats = m["blocks"]["summary"]["stats"]
  assert stats["blocks"] > 10 and stats["packing_efficiency"] > 0.99
  assert m["blocks"]["summary"]["task"]["name"].endswith(plan["blocks"].fingerprint)
  pre = m["pretrain"]["summary"]
  assert pre["step"] == 4
  fin = m["finetune"]["summary"]
  assert fin["start_step"] == 4 and fin["step"] == 8   # TRAIN_STEPS is absolute
  pre_dir = store.stage_dir("pretrain", plan["pretrain"].fingerprint)
  for f in ("config.gin", "model-info.txt", "command.sh", "checkpoint_4",
            "train/metrics.jsonl"):
    assert (pre_dir / f).exists(), f
  rows = [json.loads(l) for l in (pre_dir / "train/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert "INITIAL_CHECKPOINT_PATH" in (store.stage_dir("finetune", plan["finetune"].fingerprint)
                                       / "command.sh").read_text()
  script = (pre_dir / "command.sh").read_text()   # rerunnable by hand as it ran: folder, env
  assert "\ncd " in script and "\nexport MALLOC_ARENA_MAX=1\n" in script, script
  assert subprocess.run(["sh", "-n", str(pre_dir / "command.sh")]).returncode == 0
  ev = m["eval"]["summary"]
  assert 0.0 <= ev["metrics"]["accuracy"] <= 100.0 and ev["mode"] == "rank"
  rep = store.stage_dir("report", plan["report"].fingerprint)
  text = (rep / "report.md").read_text()
  for img in ("dag.png", "loss.png", "accuracy.png", "task_metrics.png", "metrics.png"):
    assert (rep / img).stat().st_size > 1000 and img in text
  assert "packing efficiency" in text and "accuracy" in text
  # Sample predictions: the eval's first example, its input text as the table shows it.
  first = json.loads(Path(ev["predictions_file"]).read_text().splitlines()[0])
  shown = html.escape(first["input"]["inputs_pretokenized"][:90]).replace("|", "\\|")
  assert "Sample predictions" in text and f"| {shown} | {html.escape(first['prediction'])}" in text

  # A second run does nothing.
  capsys.readouterr()
  assert cli.main(["run", str(path), "--store", str(store_dir)]) == 0
  assert "all 8 stages are up to date" in capsys.readouterr().out

  # Changing one stage's setting reruns it and its downstream only.
  path2 = tiny_pipeline(tmp_path, finetune_steps=2)
  new_plan = {p.name: p for p in executor.plan(spec.load(path2), store)}
  assert {n for n, p in new_plan.items() if p.action != "reuse"} == {"finetune", "eval",
                                                                      "report"}
  _, ran = executor.run(spec.load(path2), store, log=lambda m: None)
  assert ran == ["finetune", "eval", "report"]
