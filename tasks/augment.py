"""Data augmentation preprocessors a fine-tuning task can switch on (training only).

A task spec's `augment` field, e.g. `{"token_dropout": 0.1, "seed": 0}`, makes
`tasks.downstream` register a second task `<name>.augmented` whose preprocessors end with
these; train on that one and evaluate on `<name>`, which is never augmented.

    augment: {token_dropout: 0.1}                          drop tokens
    augment: {token_replacement: 0.05}                     replace tokens by random ones
    augment: {span_deletion: 0.15, mean_span_length: 3}    delete spans (span-corruption style)

Every preprocessor runs after tokenization, on `inputs` by default, keeps the final EOS, and is
stateless: the noise of an example depends only on `seed` and the example's position in this
host's stream of the split. seqio reads a task without a cache through its epochs (and takes
the host's shard) before the preprocessors run, so each epoch draws a new noisy version of an
example; a run with the same seed and number of hosts gets the same noise, a resumed run
included (the data position is restored); another number of hosts draws other noise.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping

import tensorflow as tf

KNOWN = ("token_dropout", "token_replacement", "span_deletion")
OPTIONS = ("seed", "feature", "mean_span_length")


def _noise(index, seed: int, n, salt: int):
  """[n] uniform floats from (seed, example index, salt), identical on every run."""
  s = tf.stack([tf.cast(seed, tf.int64) * 1000003 + salt, tf.cast(index, tf.int64)])
  return tf.random.stateless_uniform([n], seed=s)


def _not_last(n):
  """True everywhere except the last position (the EOS that append_eos put there)."""
  return tf.range(n) < n - 1


def _per_example(dataset: tf.data.Dataset, fn: Callable) -> tf.data.Dataset:
  return dataset.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def token_dropout(dataset: tf.data.Dataset, *, rate: float, seed: int = 0,
                  feature: str = "inputs") -> tf.data.Dataset:
  """Drops each token of `feature` with probability `rate` (the final EOS is kept)."""
  def drop(index, ex):
    toks = ex[feature]
    n = tf.shape(toks)[0]
    keep = tf.logical_or(_noise(index, seed, n, 1) >= rate, tf.logical_not(_not_last(n)))
    return {**ex, feature: tf.boolean_mask(toks, keep)}
  return _per_example(dataset, drop)


def token_replacement(dataset: tf.data.Dataset, output_features: Mapping, *, rate: float,
                      seed: int = 0, feature: str = "inputs",
                      first_id: int = 3) -> tf.data.Dataset:
  """Replaces each token of `feature` with probability `rate` by a random vocabulary id.

  Replacement ids are drawn uniformly from [first_id, vocabulary size): pad, EOS and UNK
  (ids 0-2 in seqio's SentencePiece vocabularies) are never inserted; the final EOS is kept.
  `output_features` is passed by seqio (the task's features, for the vocabulary size).
  """
  vocab_size = int(output_features[feature].vocabulary.vocab_size)
  if vocab_size <= first_id:
    raise ValueError(f"token_replacement: vocabulary of {feature!r} has only {vocab_size} ids")

  def replace(index, ex):
    toks = ex[feature]
    n = tf.shape(toks)[0]
    hit = tf.logical_and(_noise(index, seed, n, 2) < rate, _not_last(n))
    u = _noise(index, seed, n, 3)
    random_ids = first_id + tf.cast(u * (vocab_size - first_id), toks.dtype)
    random_ids = tf.minimum(random_ids, tf.cast(vocab_size - 1, toks.dtype))
    return {**ex, feature: tf.where(hit, random_ids, toks)}
  return _per_example(dataset, replace)


def span_deletion(dataset: tf.data.Dataset, *, noise_density: float,
                  mean_span_length: int = 3, seed: int = 0,
                  feature: str = "inputs") -> tf.data.Dataset:
  """Deletes contiguous spans of `mean_span_length` tokens covering ~`noise_density` of them.

  The noise of T5's span corruption without its sentinels and targets: a span starts at
  each position with probability noise_density / mean_span_length and removes that many
  tokens (overlapping spans merge, so slightly fewer are removed). The final EOS is kept.
  """
  if mean_span_length < 1:
    raise ValueError(f"span_deletion: mean_span_length must be >= 1, not {mean_span_length}")
  p_start = noise_density / mean_span_length

  def delete(index, ex):
    toks = ex[feature]
    n = tf.shape(toks)[0]
    starts = tf.cast(_noise(index, seed, n, 4) < p_start, tf.int32)
    c = tf.cumsum(starts)
    before = tf.concat([tf.zeros([mean_span_length], tf.int32), c], 0)[:n]
    covered = (c - before) > 0          # a span started within the last mean_span_length
    keep = tf.logical_or(tf.logical_not(covered), tf.logical_not(_not_last(n)))
    return {**ex, feature: tf.boolean_mask(toks, keep)}
  return _per_example(dataset, delete)


def from_spec(spec: Mapping | None) -> list[Callable]:
  """seqio preprocessors for a task spec's `augment` mapping (empty for None or {}).

  Args:
    spec: e.g. {"token_dropout": 0.1, "token_replacement": 0.05, "span_deletion": 0.15,
      "mean_span_length": 3, "seed": 0, "feature": "inputs"}; rates of 0 are skipped.
  Returns:
    Preprocessors to append after tokenization, in the order of KNOWN.
  Raises:
    ValueError: an unknown key or a rate outside [0, 1).
  """
  spec = dict(spec or {})
  unknown = sorted(set(spec) - set(KNOWN) - set(OPTIONS))
  if unknown:
    import difflib
    close = {k: difflib.get_close_matches(k, KNOWN + OPTIONS, n=1) for k in unknown}
    raise ValueError("augment: unknown keys " + ", ".join(
        f"{k!r}" + (f" (did you mean {close[k][0]!r}?)" if close[k] else "") for k in unknown)
        + f"; known: {', '.join(KNOWN + OPTIONS)}")
  for k in KNOWN:
    if k in spec and not 0 <= float(spec[k]) < 1:
      raise ValueError(f"augment: {k} must be in [0, 1), not {spec[k]}")
  seed, feature = int(spec.get("seed", 0)), spec.get("feature", "inputs")
  out = []
  if float(spec.get("token_dropout", 0)):
    out.append(functools.partial(token_dropout, rate=float(spec["token_dropout"]), seed=seed,
                                 feature=feature))
  if float(spec.get("token_replacement", 0)):
    out.append(functools.partial(token_replacement, rate=float(spec["token_replacement"]),
                                 seed=seed, feature=feature))
  if float(spec.get("span_deletion", 0)):
    out.append(functools.partial(span_deletion, noise_density=float(spec["span_deletion"]),
                                 mean_span_length=int(spec.get("mean_span_length", 3)),
                                 seed=seed, feature=feature))
  return out
