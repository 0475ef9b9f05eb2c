"""Training-time augmentation (tasks/augment.py): deterministic for a seed, EOS kept, and the
evaluation task never augmented."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from tasks import augment

EOS = 1


def _dataset(rows):
  return tf.data.Dataset.from_generator(
      lambda: ({"inputs": np.asarray(r, np.int32), "id": np.int32(i)} for i, r in enumerate(rows)),
      output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                        "id": tf.TensorSpec([], tf.int32)})


def _rows(ds):
  return [ex["inputs"].tolist() for ex in ds.as_numpy_iterator()]


ROWS = [list(range(3, 3 + n)) + [EOS] for n in (40, 5, 200, 1, 77)]
FEATURES = {"inputs": seqio.Feature(seqio.PassThroughVocabulary(50))}


def _apply(name, seed, rate=0.3):
  ds = _dataset(ROWS)
  if name == "token_dropout":
    return _rows(augment.token_dropout(ds, rate=rate, seed=seed))
  if name == "token_replacement":
    return _rows(augment.token_replacement(ds, FEATURES, rate=rate, seed=seed))
  return _rows(augment.span_deletion(ds, noise_density=rate, mean_span_length=3, seed=seed))


@pytest.mark.parametrize("name", augment.KNOWN)
def test_same_seed_same_examples_other_seed_other_examples(name):
  a, b, c = _apply(name, 0), _apply(name, 0), _apply(name, 1)
  assert a == b
  assert a != c and a != [r for r in ROWS]
  for out, row in zip(a, ROWS):
    assert out[-1] == EOS and EOS not in out[:-1]          # the final EOS is kept, only it
  assert _apply(name, 0, rate=0.0) == ROWS


@pytest.mark.parametrize("name", ["token_dropout", "span_deletion"])
def test_deletions_keep_order_and_rate(name):
  out = _apply(name, 3)
  for o, row in zip(out, ROWS):
    it = iter(row)
    assert all(t in it for t in o)                          # a subsequence of the original
  long_row = out[2]
  removed = 1 - (len(long_row) - 1) / 200
  assert 0.15 < removed < 0.45, removed


def test_span_deletion_removes_spans():
  kept = set(_apply("span_deletion", 5, rate=0.3)[2])
  gone = [t for t in range(3, 203) if t not in kept]
  runs = np.split(np.asarray(gone), np.nonzero(np.diff(gone) != 1)[0] + 1)
  assert np.mean([len(r) for r in runs]) >= 2.5             # contiguous, ~mean_span_length


def test_token_replacement_draws_real_token_ids():
  out = _apply("token_replacement", 2)
  changed = 0
  for o, row in zip(out, ROWS):
    assert len(o) == len(row)
    new = [a for a, b in zip(o, row) if a != b]
    assert all(3 <= t < 50 for t in new), new               # no pad/EOS/UNK, in the vocab
    changed += len(new)
  assert 0.15 < changed / sum(len(r) - 1 for r in ROWS) < 0.45


def test_from_spec():
  preps = augment.from_spec({"token_dropout": 0.1, "span_deletion": 0.2, "seed": 4})
  assert [p.func.__name__ for p in preps] == ["token_dropout", "span_deletion"]
  assert preps[0].keywords == {"rate": 0.1, "seed": 4, "feature": "inputs"}
  assert augment.from_spec(None) == [] and augment.from_spec({"token_dropout": 0}) == []
  with pytest.raises(ValueError, match="unknown keys 'token_drop' \\(did you mean 'token_dropout'"):
    augment.from_spec({"token_drop": 0.1})
  with pytest.raises(ValueError, match="token_replacement must be in"):
    augment.from_spec({"token_replacement": 1.5})


def test_augmented_task_changes_training_examples_only(tmp_path):
  import sentencepiece as spm
  from tasks import specs
  texts = [f"example number {i} about a red fruit and the blue sky" for i in range(12)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts * 5), model_writer=model, vocab_size=60, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False, num_threads=1)
  (tmp_path / "spm.model").write_bytes(model.getvalue())
  files = {}
  for split in ("train", "validation"):
    files[split] = str(tmp_path / f"{split}.jsonl")
    with open(files[split], "w") as f:
      for t in texts:
        f.write(json.dumps({"inputs": t, "targets": "yes"}) + "\n")
  name = "pf_augment_test"
  specs.register_from_spec({"type": "text_to_text", "name": name, "files": files,
                            "vocab_path": str(tmp_path / "spm.model"),
                            "augment": {"token_dropout": 0.3, "seed": 1}})
  vocab = seqio.SentencePieceVocabulary(str(tmp_path / "spm.model"))
  plain = [list(vocab.encode(t)) + [EOS] for t in texts]

  def inputs(task, split):
    ds = seqio.get_mixture_or_task(task).get_dataset(None, split=split, shuffle=False,
                                                     num_epochs=1)
    return [ex["inputs"].tolist() for ex in ds.as_numpy_iterator()]

  augmented = inputs(f"{name}.augmented", "train")
  assert augmented == inputs(f"{name}.augmented", "train")  # reproducible
  assert augmented != plain and all(a[-1] == EOS for a in augmented)
  assert inputs(name, "train") == plain                      # the task itself is untouched,
  assert inputs(name, "validation") == plain                 # so evaluation never sees noise
  # The augmented twin is for training only: it has no validation split.
  assert list(seqio.get_mixture_or_task(f"{name}.augmented").splits) == ["train"]
