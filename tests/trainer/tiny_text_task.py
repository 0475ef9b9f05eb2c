"""A tiny text-to-text task for trainer tests: a SentencePiece vocabulary made here, JSONL
splits and the palmflow `task.json` the train/eval/infer binaries take with --task_spec.

Not a test module: imported by test_resume.py, test_binaries.py and test_eval_infer.py.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import gin

REPO = Path(__file__).resolve().parents[2]
PAIRS = [("red fruit", "apple"), ("yellow fruit", "banana"), ("blue sky", "ocean"),
         ("green leaf", "tree")]
LENGTHS = "{'inputs': 12, 'targets': 8}"
VOCAB_SIZE = 64  # the model's embedding rows (>= the vocabulary's ~44 pieces)


def make_vocab(path: Path, lines: list[str], vocab_size: int = 60) -> Path:
  """A SentencePiece unigram model with seqio's ids (pad 0, eos 1, unk 2)."""
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
      hard_vocab_limit=False, num_threads=1)
  path.write_bytes(model.getvalue())
  return path


def make_task(directory: Path, name: str, *, pairs=PAIRS, augment: dict | None = None,
              extra_vocab_text: str = "the quick brown fox jumps over the lazy dog") -> Path:
  """Writes vocabulary, splits (validation = train) and task.json; returns task.json."""
  directory.mkdir(parents=True, exist_ok=True)
  lines = [f"{a} {b}" for a, b in pairs] * 20 + [extra_vocab_text] * 5
  vocab = make_vocab(directory / "spm.model", lines)
  rows = "".join(json.dumps({"inputs": a, "targets": b}) + "\n" for a, b in pairs)
  files = {}
  for split in ("train", "validation"):
    files[split] = str(directory / f"{split}.jsonl")
    Path(files[split]).write_text(rows, encoding="utf-8")
  spec = {"type": "text_to_text", "name": name, "files": files, "vocab_path": str(vocab),
          "label_names": sorted(b for _, b in pairs), "augment": augment}
  path = directory / "task.json"
  path.write_text(json.dumps(spec), encoding="utf-8")
  return path


def model_flags(task_json: Path, task_name: str) -> list[str]:
  """Flags shared by train/eval/infer runs on the tiny task with the tiny model."""
  return ["--gin_file=models/palm_tiny.gin", f"--task_spec={task_json}",
          f"--gin.MIXTURE_OR_TASK_NAME='{task_name}'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          f"--gin.VOCAB_SIZE={VOCAB_SIZE}", "--gin.BATCH_SIZE=8"]


def run_binary(name: str, argv: list[str]) -> int:
  """Runs palmflow's `train`/`eval`/`infer` in this process (as `palmflow NAME ...`)."""
  from palmflow import cli
  gin.clear_config()
  try:
    return cli.main([name] + list(argv))
  finally:
    gin.clear_config()
