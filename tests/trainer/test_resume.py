"""Resume after SIGKILL: the rerun starts from the latest usable checkpoint (skipping a corrupt
one with a warning, ignoring half-written ones) and ends with the parameters of a run that was
never interrupted. Dropout is on, so the data position and the dropout keys must both resume
exactly for the parameters to match.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from palmflow.trainer import checkpoints as ckpt_lib
from tiny_text_task import REPO, make_task, model_flags, run_binary

TASK = "pf_resume_map"
STEPS = 12


def _flags(task_json: Path, model_dir: Path, keep: str, evals: bool = False) -> list[str]:
  """The run's flags; `evals`: with training and inference evaluations every 2 steps."""
  return ["--gin_file=runs/test_pretrain.gin", *model_flags(task_json, TASK),
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}",
          "--gin.FEATURE_CONVERTER='prefix_lm'", "--gin.DROPOUT_RATE=0.1",
          "--gin.CHECKPOINT_PERIOD=2", f"--gin.CHECKPOINTS_TO_KEEP={keep}", "--gin.LOG_EVERY=2",
          "--gin.LR_FACTORS='constant'", "--gin.BASE_LEARNING_RATE=0.02",
          *([f"--gin.TRAIN_EVAL_MIXTURE_OR_TASK_NAME='{TASK}'",
             f"--gin.INFER_EVAL_MIXTURE_OR_TASK_NAME='{TASK}'"] if evals else [])]


def _logged_steps(path: Path) -> list[int]:
  return [json.loads(l)["step"] for l in path.read_text().splitlines()]


def _tensorboard(directory: Path, tag: str) -> list[tuple[int, float]]:
  """(step, value) of `tag` as TensorBoard shows them (its orphaned-data purge included)."""
  from tensorboard.backend.event_processing import plugin_event_accumulator
  from tensorboard.util import tensor_util
  acc = plugin_event_accumulator.EventAccumulator(str(directory), size_guidance={"tensors": 0})
  acc.Reload()
  return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def _start(flags: list[str], log: Path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "palmflow.trainer.train", *flags], cwd=REPO,
                          stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}/"))
    return out
  return {prefix.rstrip("/"): tree}


@pytest.mark.slow  # two training processes and a resumed run: ~40 s of CPU on 2 cores
def test_killed_run_resumes_to_the_uninterrupted_parameters(tmp_path, caplog):
  task_json = make_task(tmp_path / "data", TASK)
  killed, whole = tmp_path / "killed", tmp_path / "whole"
  victim = _start(_flags(task_json, killed, "3", evals=True), tmp_path / "killed.log")
  reference = _start(_flags(task_json, whole, "None"), tmp_path / "whole.log")
  try:
    deadline = time.time() + 240
    while len(ckpt_lib.finished_steps(killed)) < 2:   # two checkpoints: one to spoil below
      assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
      assert time.time() < deadline, "no checkpoint appeared in time"
      time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert reference.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-3000:]
  finally:
    for proc in (victim, reference):
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  done = ckpt_lib.finished_steps(killed)
  assert done and done[-1] < STEPS, f"the run finished before it was killed: {done}"

  # Spoil the newest checkpoint (a truncated array file) and leave a half-written one.
  latest, previous = done[-1], done[-2]
  for f in glob.glob(str(ckpt_lib.step_dir(killed, latest) / "params" / "**" / "d" / "*"),
                     recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(7)
  half = killed / f"checkpoint_{latest + 1}.orbax-checkpoint-tmp-1234"
  half.mkdir()
  (half / "_CHECKPOINT_METADATA").write_text("{}")

  # What the killed run logged after the checkpoint it resumes from is orphaned.
  assert max(_logged_steps(killed / "train" / "metrics.jsonl")) > previous

  caplog.set_level(logging.INFO, logger="palmflow")
  assert run_binary("train", _flags(task_json, killed, "3", evals=True)) == 0
  text = caplog.text
  assert (f"checkpoint {ckpt_lib.step_dir(killed, latest)} is corrupt or unreadable" in text
          and f"falling back to {ckpt_lib.step_dir(killed, previous)}" in text), text
  assert f"resuming from {ckpt_lib.step_dir(killed, previous)}" in text
  assert not half.exists(), "orbax's temporary directory was not cleaned up"
  # keep-N: the newest three remain.
  assert ckpt_lib.finished_steps(killed) == [STEPS - 4, STEPS - 2, STEPS]
  assert ckpt_lib.finished_steps(whole) == list(range(2, STEPS + 1, 2))

  # Each step is logged once, in metrics.jsonl and as TensorBoard shows the event files:
  # the resumed run's restart marker drops the killed run's orphaned steps.
  for directory, jsonl, tag, key, want_steps in [
      (killed / "train", killed / "train" / "metrics.jsonl", "loss", "loss",
       range(2, STEPS + 1, 2)),
      (killed / "training_eval" / TASK, killed / "training_eval" / TASK / "metrics.jsonl",
       "loss", "loss", range(0, STEPS + 1, 2)),
      (killed / "inference_eval" / TASK, killed / "inference_eval" / f"{TASK}-metrics.jsonl",
       "eval/accuracy", "accuracy", range(2, STEPS + 1, 2))]:
    logged = [json.loads(l) for l in jsonl.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(want_steps), jsonl
    shown = _tensorboard(directory, tag)
    assert [step for step, _ in shown] == list(want_steps), (directory, shown)
    assert [v for _, v in shown] == pytest.approx([r[key] for r in logged]), directory

  meta = ckpt_lib.read_meta(ckpt_lib.step_dir(killed, STEPS))
  assert meta["step"] == STEPS and meta["data_batches_consumed"] == STEPS
  assert meta["vocab_sha256"] and meta["mixture_or_task_name"] == TASK

  got = _flat(ckpt_lib.load_params(ckpt_lib.step_dir(killed, STEPS)))
  want = _flat(ckpt_lib.load_params(ckpt_lib.step_dir(whole, STEPS)))
  earlier = _flat(ckpt_lib.load_params(ckpt_lib.step_dir(whole, STEPS - 2)))
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # The comparison means something: two more steps moved the parameters much further.
  moved = max(float(np.max(np.abs(want[n] - earlier[n]))) for n in want)
  assert moved > 1e-3
