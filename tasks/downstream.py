"""Downstream text-to-text tasks over local JSONL files (written by the `dataset` stage).

Examples are `{"inputs": str, "targets": str}`; sources are lazy (read when a dataset is
built). Metrics: accuracy (exact match after stripping) and, for classification, macro F1.
"""
from __future__ import annotations

import functools
import json

import seqio
import tensorflow as tf

from tasks import augment as augment_lib


def _jsonl_dataset(split: str, shuffle_files: bool, seed=None, *, files: dict[str, str]):
  del shuffle_files, seed
  with tf.io.gfile.GFile(files[split]) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return tf.data.Dataset.from_tensor_slices({
      "inputs": [r["inputs"] for r in rows], "targets": [r["targets"] for r in rows]})


def accuracy(targets, predictions) -> dict:
  """Exact-match accuracy in percent (seqio metric_fn signature)."""
  n = max(1, len(targets))
  return {"accuracy": 100.0 * sum(t.strip() == p.strip()
                                  for t, p in zip(targets, predictions)) / n}


def macro_f1(targets, predictions) -> dict:
  """Macro-averaged F1 over the target classes, in percent."""
  labels = sorted(set(t.strip() for t in targets))
  f1s = []
  for c in labels:
    tp = sum(t.strip() == c and p.strip() == c for t, p in zip(targets, predictions))
    fp = sum(t.strip() != c and p.strip() == c for t, p in zip(targets, predictions))
    fn = sum(t.strip() == c and p.strip() != c for t, p in zip(targets, predictions))
    f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return {"macro_f1": 100.0 * sum(f1s) / max(1, len(f1s))}


def _decode_str(x):
  return x.decode("utf-8") if isinstance(x, bytes) else x


def register_text_to_text(name: str, *, files: dict[str, str], vocab_path: str,
                          label_names: list[str] | None = None,
                          augment: dict | None = None) -> seqio.Task:
  """Registers (or re-registers) a text-to-text task over JSONL split files.

  Args:
    name: the task name.
    files: split -> JSONL path.
    vocab_path: SentencePiece model for inputs and targets.
    label_names: for classification: the possible targets (used for ranking evaluation).
    augment: data augmentation for training (see `tasks.augment.from_spec`), e.g.
      {"token_dropout": 0.1, "span_deletion": 0.15, "seed": 0}: a second task
      `<name>.augmented` with only a train split is registered with it; train on that one
      and evaluate on `<name>`, which is never augmented.
  Returns:
    The registered (unaugmented) task.
  """
  vocab = seqio.SentencePieceVocabulary(vocab_path)
  source = seqio.FunctionDataSource(
      functools.partial(_jsonl_dataset, files=dict(files)), splits=list(files))
  pre = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
  metrics = [accuracy] + ([macro_f1] if label_names else [])
  features = {"inputs": seqio.Feature(vocab, add_eos=True),
              "targets": seqio.Feature(vocab, add_eos=True)}
  variants = {name: (source, pre)}
  extra = augment_lib.from_spec(augment)
  if extra:
    # Train-only: the augmented twin has no validation split to evaluate on by mistake.
    train_source = seqio.FunctionDataSource(
        functools.partial(_jsonl_dataset, files=dict(files)), splits=["train"])
    variants[f"{name}.augmented"] = (train_source, pre + extra)
  for task_name, (task_source, preprocessors) in variants.items():
    seqio.TaskRegistry.remove(task_name)
    task = seqio.TaskRegistry.add(
        task_name, source=task_source, preprocessors=preprocessors, output_features=features,
        postprocess_fn=lambda x, **_: _decode_str(x).strip(), metric_fns=metrics)
    task.label_names = list(label_names or [])
  return seqio.get_mixture_or_task(name)
