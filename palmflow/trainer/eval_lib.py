"""Evaluation and inference with seqio: the task's metrics, predictions and scores.

`evaluate` (the eval binary) runs seqio's Evaluator with the task's metrics:
  - mode `predict`: greedy decoding after each example's inputs (or temperature sampling,
    optionally top-k, with `temperature` > 0, or beam search with `num_beams` > 1 and
    t5x's length penalty alpha 0.6);
  - mode `rank`: classification by log-likelihood: every label option of the task is scored
    after the inputs and the most likely one is the prediction (robust for small models).
It writes what t5x's inference_eval writes (seqio's JSON and TensorBoard loggers):
`<dir>/<task>-<step as 6 digits>.jsonl`, one line per example: {"input": the example's
features (texts, token ids), "target" and "prediction" (or "score") as the metrics saw
them, after decoding and the task's postprocessing; in rank mode "label_scores" too};
`<dir>/<task>-metrics.jsonl`, one line per evaluated step; and TensorBoard events of the
metrics (`eval/<metric>`) in `<dir>/<task>/`.

With several processes (`jax.distributed`), every process reads the whole split, feeds the
rows of each batch its devices hold and gets the whole result back; process 0 writes the files.

`infer` (the infer binary) needs no metrics and writes t5x's infer layout,
`<dir>/<task>-<mode>.jsonl-00000-of-00001`, one JSON per example, whose "inputs" are its
texts (`inputs_pretokenized`, `targets_pretokenized`; every feature with
`include_all_inputs`):
  - `predict`: {"inputs": {...}, "prediction": "decoded text"}
  - `score`: {"inputs": {...}, "score": log-likelihood of the example's targets}
  - `predict_with_aux`: {"inputs": {...}, "prediction": ..., "aux": {"scores": ll}}, where
    `scores` is the log-likelihood of the decoded prediction.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from palmflow.errors import ConfigError
from palmflow.trainer import checkpoints as ckpt_lib
from palmflow.trainer import data as data_lib
from palmflow.trainer import summaries
from palmflow.trainer.lm import DecoderOnlyModel
from palmflow.trainer.partitioning import Partitioner

log = logging.getLogger("palmflow.eval")
EVAL_MODES = ("predict", "rank")
INFER_MODES = ("predict", "score", "predict_with_aux")
EOS_ID = 1


def load_params(model: DecoderOnlyModel, checkpoint_path: str, partitioner: Partitioner,
                length: int, *, vocab_digest: str | None = None, dtype: str | None = None):
  """(step, params) restored from a `checkpoint_<step>` directory, sharded as the rules say
  (cast to `dtype`, unless None).

  Raises:
    ConfigError: the checkpoint's shapes or vocabulary differ from the model's (naming the
      parameter), or there is no finished checkpoint there.
  """
  init_fn = functools.partial(model.init, batch_size=1, length=length)
  abstract = partitioner.abstract_init(init_fn, jax.random.PRNGKey(0))
  shardings = partitioner.get_param_shardings(abstract)["params"]
  import flax.linen as nn
  shapes = nn.unbox(abstract)["params"]
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
  step, params, _ = ckpt_lib.restore_initial(
      ckpt_lib.RestoreCheckpointConfig(path=checkpoint_path, dtype=dtype), target, None,
      vocab_digest=vocab_digest)
  return step, params


def _batches(ds, batch_size):
  """(indices, stacked features) chunks of an enumerated dataset of (index, example)."""
  rows = list(ds.as_numpy_iterator())
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    idx = [int(r[0]) for r in chunk]
    feats = {k: np.stack([r[1][k] for r in chunk]) for k in chunk[0][1]}
    yield idx, feats


def _pad_rows(feats: dict, batch_size: int) -> tuple[dict, int]:
  n = next(iter(feats.values())).shape[0]
  if n == batch_size:
    return feats, n
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
          for k, v in feats.items()}, n


def _prefixes(feats: dict) -> list[np.ndarray]:
  """Each row's prefix tokens (the inputs, with their EOS) of a PrefixLM / LM batch."""
  targets = feats["decoder_target_tokens"]
  if "decoder_causal_attention" in feats:
    # PrefixLM: causal_attention covers the inputs plus the first decoder position.
    plen = feats["decoder_causal_attention"].sum(-1) - 1
  else:
    plen = (targets > 0).sum(-1)
  return [targets[i, :max(0, int(p))] for i, p in enumerate(plen)]


def prefix_batch(prefixes: list[np.ndarray], length: int) -> dict:
  """PrefixLM features of the prefixes alone, as `DecoderOnlyModel.score_options` reads them:
  `option_batch` with a one-token placeholder option (the decoder inputs hold the whole
  prefix only when a target follows it)."""
  return option_batch(prefixes, [np.zeros((1,), np.int32)] * len(prefixes), length)


def option_batch(prefixes: list[np.ndarray], options: list[np.ndarray], length: int) -> dict:
  """PrefixLM features for `prefixes[i] + options[i]`, loss on the option tokens only.

  The layout is the one seqio's PrefixLMFeatureConverter gives a (inputs, targets) pair, so
  `DecoderOnlyModel.score_batch` returns the log-likelihood of each option given its prefix.
  """
  b = len(prefixes)
  out = {k: np.zeros((b, length), np.int32) for k in (
      "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
      "decoder_causal_attention")}
  for i, (inp, opt) in enumerate(zip(prefixes, options)):
    seq = np.concatenate([np.asarray(inp, np.int32), np.asarray(opt, np.int32)])[:length]
    n = len(seq)
    out["decoder_target_tokens"][i, :n] = seq
    out["decoder_input_tokens"][i, 1:n] = seq[:n - 1]
    out["decoder_loss_weights"][i, len(inp):n] = 1
    out["decoder_causal_attention"][i, :min(length, len(inp) + 1)] = 1
  return out


def _through_eos(tokens: np.ndarray) -> np.ndarray:
  """A decoded row up to and including its first EOS (the whole row if none)."""
  row = np.asarray(tokens)
  hits = np.nonzero(row == EOS_ID)[0]
  row = row[:hits[0] + 1] if len(hits) else row
  return row[row != 0]


class ModelFns:
  """seqio-style predict / score / predict_with_aux functions over one set of parameters.

  Each takes an enumerated dataset of (index, model features) and returns [(index, output)]
  (predict_with_aux: that and {"scores": [...]}); predictions are fixed-width token rows
  (EOS, then padding), which seqio decodes and postprocesses for the metrics.

  Attributes:
    option_scores: in rank mode, {example index: [score of each label option]}.
  """

  def __init__(self, *, model: DecoderOnlyModel, params, partitioner: Partitioner,
               batch_size: int, mode: str, max_decode_length: int,
               label_options: list[list[int]] | None = None, temperature: float = 0.0,
               top_k: int = 0, seed: int = 0, num_beams: int = 1):
    if mode == "rank" and not label_options:
      raise ValueError("rank mode needs label options")
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) \
        or num_beams < 1:
      raise ConfigError(f"the number of beams must be an int >= 1, not {num_beams!r}",
                        field="DECODE_NUM_BEAMS")
    if num_beams > 1 and temperature > 0:
      raise ConfigError("beam search is deterministic: DECODE_TEMPERATURE must be 0 with "
                        f"DECODE_NUM_BEAMS={num_beams}", field="DECODE_NUM_BEAMS")
    self._params, self._partitioner = params, partitioner
    self._batch_size, self._mode, self._options = batch_size, mode, label_options
    self._seed = seed
    self._score = partitioner.partition(model.score_batch)
    if mode == "rank":  # the options are constants of the compiled function
      width = max(len(o) for o in label_options)
      table = np.zeros((len(label_options), width), np.int32)
      for i, o in enumerate(label_options):
        table[i, :len(o)] = o
      self._score_options = partitioner.partition(
          functools.partial(model.score_options, options=jnp.asarray(table)))
    self._predict = partitioner.partition(functools.partial(
        model.predict_batch, max_decode_length=max_decode_length, eos_id=EOS_ID,
        temperature=temperature, top_k=top_k, num_beams=int(num_beams)))
    self.option_scores: dict[int, list[float]] = {}

  def set_params(self, params) -> None:
    """Evaluates other parameters (another checkpoint) with the same compiled functions."""
    self._params = params
    self.option_scores = {}

  def _call(self, fn, padded: dict, **kwargs) -> np.ndarray:
    """`fn(params, batch)` on a whole (padded) batch, as a numpy array on every process.

    Every process reads the same examples; each feeds the rows of the batch its devices
    hold (`Partitioner.data_layout`), and the result, spread over the processes, is
    gathered whole on each.
    """
    if jax.process_count() == 1:
      return np.asarray(fn(self._params, self._partitioner.shard_batch(padded), **kwargs))
    from jax.experimental import multihost_utils
    index, count = self._partitioner.data_layout(self._batch_size)
    rows = self._batch_size // count
    mine = {k: v[index * rows:(index + 1) * rows] for k, v in padded.items()}
    got = fn(self._params, self._partitioner.shard_batch(mine), **kwargs)
    return np.asarray(multihost_utils.process_allgather(got, tiled=True))

  def _score_rows(self, prefixes, options, length) -> np.ndarray:
    b = self._batch_size
    rows, n = option_batch(prefixes, options, length), len(prefixes)
    padded, _ = _pad_rows(rows, b)
    return self._call(self._score, padded)[:n]

  def _decode(self, bi: int, padded: dict) -> np.ndarray:
    rng = jax.random.fold_in(jax.random.PRNGKey(self._seed), bi)
    return self._call(self._predict, padded, rng=rng)

  def _rank(self, idx, feats) -> np.ndarray:
    length = feats["decoder_target_tokens"].shape[1]
    prefixes = _prefixes(feats)
    # One prefill per example, its cache shared by every option (`score_options`).
    padded, _ = _pad_rows(prefix_batch(prefixes, length), self._batch_size)
    scores = self._call(self._score_options, padded)[:len(prefixes)]
    for i, s in zip(idx, scores):
      self.option_scores[i] = s.tolist()
    width = max(len(o) for o in self._options)
    return np.stack([np.pad(np.asarray(self._options[j], np.int32),
                            (0, width - len(self._options[j])))
                     for j in np.argmax(scores, -1)])

  def predict(self, ds, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for bi, (idx, feats) in enumerate(_batches(ds, self._batch_size)):
      if self._mode == "rank":
        toks = self._rank(idx, feats)
      else:
        padded, n = _pad_rows(feats, self._batch_size)
        toks = self._decode(bi, padded)[:n]
      out.extend(zip(idx, list(toks)))
      _progress(len(out))
    return out

  def score(self, ds, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for idx, feats in _batches(ds, self._batch_size):
      padded, n = _pad_rows(feats, self._batch_size)
      s = self._call(self._score, padded)[:n]
      out.extend(zip(idx, s.tolist()))
      _progress(len(out))
    return out

  def predict_with_aux(self, ds, model_feature_shapes=None):
    """Predictions and {"scores": log-likelihood of each prediction given its inputs}."""
    del model_feature_shapes
    out, scores = [], []
    for bi, (idx, feats) in enumerate(_batches(ds, self._batch_size)):
      length = feats["decoder_target_tokens"].shape[1]
      if self._mode == "rank":
        toks = self._rank(idx, feats)
        scores.extend(float(np.max(self.option_scores[i])) for i in idx)
      else:
        padded, n = _pad_rows(feats, self._batch_size)
        toks = self._decode(bi, padded)[:n]
        scores.extend(self._score_rows(_prefixes(feats), [_through_eos(t) for t in toks],
                                       length).tolist())
      out.extend(zip(idx, list(toks)))
      _progress(len(out))
    return out, {"scores": scores}


def _progress(n: int) -> None:
  end = "\r" if sys.stderr.isatty() else "\n"
  if sys.stderr.isatty() or n % 256 == 0:
    print(f"eval: {n} examples", end=end, file=sys.stderr, flush=True)


def _text(x):
  if isinstance(x, bytes):
    return x.decode("utf-8", "replace")
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def _label_options(task, mixture_or_task_name: str) -> tuple[list[str], list[list[int]]]:
  labels = getattr(task, "label_names", None)
  if not labels:
    raise ConfigError(f"task {mixture_or_task_name} has no label_names to rank",
                      field="INFERENCE_MODE", hint="use INFERENCE_MODE = 'predict', or give the "
                      "task spec label_names")
  vocab = task.output_features["targets"].vocabulary
  return list(labels), [list(vocab.encode(l)) + [EOS_ID] for l in labels]


def _task_vocab_digest(task) -> str | None:
  feature = task.output_features.get("targets")
  return ckpt_lib.vocabulary_digest(feature.vocabulary) if feature is not None else None


def _capturing_logger():
  """A seqio Logger class that keeps what the metrics saw (decoded, postprocessed)."""
  captured: dict[str, dict] = {}

  class Capture(seqio.Logger):

    def __call__(self, task_name, step, metrics, dataset, inferences, targets):
      captured[task_name] = {"inferences": dict(inferences or {}), "targets": targets}
  return Capture, captured


def evaluate(*, model: DecoderOnlyModel, checkpoint_path: str, partitioner: Partitioner,
             mixture_or_task_name: str, task_feature_lengths: dict[str, int],
             output_dir: str, split: str = "validation", batch_size: int = 32,
             mode: str = "predict", max_decode_length: int | None = None,
             num_examples: int | None = None, json_write_n_results: int | None = None,
             feature_converter: str = "prefix_lm", temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, module: str | None = None,
             checkpoint_mode: str = "specific",
             restore_dtype: str | None = None, num_beams: int = 1,
             use_cached: bool = False) -> dict[str, Any]:
  """Evaluates a checkpoint (or each of a run's) on a task's split with its seqio metrics.

  Args:
    model: the model (its optimizer is unused).
    checkpoint_path: CHECKPOINT_PATH, a `checkpoint_<step>` directory, or with
      `checkpoint_mode` 'latest' or 'all' a directory of them (a MODEL_DIR).
    checkpoint_mode: CHECKPOINT_MODE, t5x's restore modes: 'specific' (CHECKPOINT_PATH
      itself), 'latest' (the newest finished checkpoint under it), 'all' (every finished
      one, oldest first: predictions and a metrics line per step).
    partitioner: mesh and rules.
    mixture_or_task_name: MIXTURE_OR_TASK_NAME.
    task_feature_lengths: e.g. {"inputs": 128, "targets": 8}; None: each feature's longest
      example in the split (as t5x's eval computes them; `data_feature_lengths`).
    output_dir: EVAL_OUTPUT_DIR; predictions and metrics are written here.
    split: the split to evaluate.
    batch_size: examples per model call (a multiple of the data-parallel devices).
    mode: "predict" (decode) or "rank" (score each label option; classification tasks).
    max_decode_length: decode steps (default: the targets length; when decoding with
      measured lengths and the 'lm' converter, the longest example's, and the buffer gets
      that room after it).
    num_examples: evaluate only the first N examples.
    json_write_n_results: write at most N predictions to the JSONL (None: all).
    feature_converter: "prefix_lm" (text-to-text) or "lm".
    temperature, top_k, seed: sampling (temperature 0 is greedy; top_k 0 keeps all tokens).
    module: modules to import for task registration.
    restore_dtype: cast the restored parameters to this dtype (e.g. 'bfloat16': half the
      memory); None keeps the model's.
    num_beams: DECODE_NUM_BEAMS; > 1 decodes by beam search (with temperature 0).
    use_cached: USE_CACHED_TASKS: read the task's seqio cache (made by seqio's cache_tasks
      job) instead of preprocessing it.
  Returns:
    {"step", "metrics": {task: {name: value}}, "predictions_files": {task: path}, "mode"}
    of the last checkpoint evaluated, and "steps": {step: metrics} of each.
  """
  if checkpoint_mode not in ("specific", "latest", "all"):
    raise ConfigError(f"CHECKPOINT_MODE must be 'specific', 'latest' or 'all', not "
                      f"{checkpoint_mode!r}", field="CHECKPOINT_MODE")
  paths = _checkpoint_paths(checkpoint_path, checkpoint_mode)
  evaluator = InferenceEvaluator(
      model=model, partitioner=partitioner, mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths=task_feature_lengths, output_dir=output_dir, split=split,
      batch_size=batch_size, mode=mode, max_decode_length=max_decode_length,
      num_examples=num_examples, json_write_n_results=json_write_n_results,
      feature_converter=feature_converter, temperature=temperature, top_k=top_k, seed=seed,
      module=module, num_beams=num_beams, use_cached=use_cached)
  length = sum(evaluator.task_feature_lengths.values())
  by_step = {}
  for path in paths:
    step, params = load_params(model, path, partitioner, length,
                               vocab_digest=evaluator.vocab_digest, dtype=restore_dtype)
    result = evaluator.evaluate(step, params)
    del params  # one checkpoint's parameters in memory at a time
    by_step[step] = result["metrics"]
  return dict(result, steps=by_step)


def data_feature_lengths(task, split: str, *, num_examples: int | None = None, seed: int = 0,
                         use_cached: bool = False, field: str = "EVAL_SPLIT") -> dict[str, int]:
  """{feature: its longest example} over the split of a task (or of a mixture's tasks), the
  first `num_examples` of each: TASK_FEATURE_LENGTHS = None in eval and infer, as t5x's eval
  lets seqio compute them, so that nothing is cut and no position is wasted."""
  lengths: dict[str, int] = {}
  for t in seqio.get_subtasks(task):
    if split not in t.splits:
      continue
    try:
      ds = t.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                         seed=seed, use_cached=use_cached)
    except ValueError as e:  # a preprocessor that needs the lengths
      raise ConfigError(f"task {t.name!r} cannot be read without feature lengths: {e}",
                        field="TASK_FEATURE_LENGTHS",
                        hint="set TASK_FEATURE_LENGTHS, e.g. {'inputs': 128, 'targets': 8}"
                        ) from None
    if num_examples:
      ds = ds.take(num_examples)
    for ex in ds.as_numpy_iterator():
      for k in t.output_features:
        if k in ex:
          lengths[k] = max(lengths.get(k, 1), len(ex[k]))
  if not lengths:
    splits = sorted({str(s) for t in seqio.get_subtasks(task) for s in t.splits})
    raise NothingToEvaluate(
        f"no example in split {split!r} of {task.name!r} to measure the feature lengths by "
        f"(its splits: {splits})", field=field,
        hint="choose a split with examples, or set TASK_FEATURE_LENGTHS")
  log.info("feature lengths from the %s split's longest examples: %s", split, lengths)
  return lengths


def _room_to_continue(lengths: dict[str, int], max_decode_length: int | None
                      ) -> tuple[dict[str, int], int]:
  """(feature lengths, decode steps) for decoding an 'lm' task with measured lengths.

  With the LM converter an example's targets are the prompt that decoding continues, in
  the same buffer: measured to the longest example, it would leave that example no room.
  The buffer gets `max_decode_length` more positions (default: as many as the longest
  example has).
  """
  room = max_decode_length or lengths["targets"]
  lengths = dict(lengths, targets=lengths["targets"] + room)
  log.info("feature lengths with room to decode %d tokens after each example: %s", room,
           lengths)
  return lengths, room


class NothingToEvaluate(ConfigError):
  """The task (or mixture) has no task with the split and a metric."""


def _nothing_to_evaluate(task, name: str, split: str, field: str) -> NothingToEvaluate:
  why = "; ".join(
      f"{t.name}: splits {sorted(t.splits)}, "
      f"{len(t.metric_fns) + len(getattr(t, 'metric_objs', None) or [])} metric(s)"
      for t in seqio.get_subtasks(task))
  return NothingToEvaluate(
      f"nothing to evaluate in {name!r} on split {split!r}: a task needs that split and at "
      f"least one metric ({why})", field=field,
      hint="choose a split the task has; a task without metrics (e.g. pretraining blocks) is "
      "evaluated during training (TRAIN_EVAL_MIXTURE_OR_TASK_NAME), not by eval")


class InferenceEvaluator:
  """A task's seqio metrics on the model's predictions (or ranked label options), for any
  parameters: the eval binary's, and the trainer's inference evaluation every EVAL_PERIOD
  (t5x's ``infer_eval`` dataset and ``inference_eval/`` files in MODEL_DIR).

  The task, its examples and the compiled model functions are set up once; `evaluate` writes
  ``<task>-<step:06>.jsonl``, a ``<task>-metrics.jsonl`` line and TensorBoard scalars per
  step under `output_dir`.
  Arguments as `evaluate`'s.

  `fields` names the settings in messages: {"split", "converter"} -> macro names (the eval
  binary's EVAL_SPLIT and FEATURE_CONVERTER by default).

  Raises:
    ConfigError: an unknown mode, a vocabulary larger than the model's, a converter that
      drops the task's inputs or packs examples; NothingToEvaluate: no task of it has the
      split and a metric.
  """

  def __init__(self, *, model: DecoderOnlyModel, partitioner: Partitioner,
               mixture_or_task_name: str, task_feature_lengths: dict[str, int] | None,
               output_dir: str, split: str = "validation", batch_size: int = 32,
               mode: str = "predict", max_decode_length: int | None = None,
               num_examples: int | None = None, json_write_n_results: int | None = None,
               feature_converter: str = "prefix_lm", temperature: float = 0.0,
               top_k: int = 0, seed: int = 0, module: str | None = None,
               num_beams: int = 1, use_cached: bool = False,
               fields: dict[str, str] | None = None):
    fields = {"split": "EVAL_SPLIT", "converter": "FEATURE_CONVERTER", **(fields or {})}
    if feature_converter == "blocked_lm":
      raise ConfigError("evaluation decodes examples one by one, and 'blocked_lm' packs "
                        "them into blocks", field=fields["converter"],
                        hint="use 'prefix_lm' (a task with inputs) or 'lm' (targets only)")
    if mode not in EVAL_MODES:
      raise ConfigError(f"mode must be one of {EVAL_MODES} for evaluation, not {mode!r}",
                        field="INFERENCE_MODE", hint="scores are written by the infer binary "
                        "(INFER_MODE = 'score')" if mode == "score" else None)
    task = data_lib.get_task_or_mixture(mixture_or_task_name, module)
    data_lib.check_vocabulary_fits(task, model.config.vocab_size)
    data_lib.check_converter_keeps_inputs(task, feature_converter, fields["converter"])
    self.vocab_digest = _task_vocab_digest(task)
    self._labels, options = (None, None)
    if mode == "rank":
      self._labels, options = _label_options(task, mixture_or_task_name)
    if task_feature_lengths is None:
      try:
        task_feature_lengths = data_feature_lengths(
            task, split, num_examples=num_examples, seed=seed, use_cached=use_cached,
            field=fields["split"])
      except NothingToEvaluate:
        raise _nothing_to_evaluate(task, mixture_or_task_name, split, fields["split"]) from None
      if mode == "rank":  # room for every label option, not only the measured targets
        longest = max(len(o) for o in options)
        task_feature_lengths["targets"] = max(task_feature_lengths.get("targets", 0), longest)
        log.info("feature lengths with the longest label option: %s", task_feature_lengths)
      elif feature_converter == "lm":
        task_feature_lengths, max_decode_length = _room_to_continue(task_feature_lengths,
                                                                    max_decode_length)
    self.task_feature_lengths = dict(task_feature_lengths)
    converter = data_lib.make_feature_converter(feature_converter, pack=False)
    logger_cls, self._captured = _capturing_logger()
    self._out = Path(output_dir)
    self._out.mkdir(parents=True, exist_ok=True)
    self._evaluator = seqio.Evaluator(
        mixture_or_task_name=mixture_or_task_name, feature_converter=converter,
        eval_split=split, sequence_length=dict(task_feature_lengths),
        num_examples=num_examples, use_memory_cache=True, seed=seed, use_cached=use_cached,
        logger_cls=[logger_cls], log_dir=str(self._out))
    if not self._evaluator.eval_tasks:
      # seqio skips such tasks with an info log, and the run would "succeed" with no metrics.
      raise _nothing_to_evaluate(task, mixture_or_task_name, split, fields["split"])
    self._mode, self._json_write_n_results = mode, json_write_n_results
    self._fns_args = dict(
        model=model, partitioner=partitioner, batch_size=batch_size, mode=mode,
        max_decode_length=max_decode_length or task_feature_lengths["targets"],
        label_options=options, temperature=temperature, top_k=top_k, seed=seed,
        num_beams=num_beams)
    self._fns = None
    self._examples: dict[str, list] = {}
    self._summary_writers: dict[str, Any] = {}
    self._restart_steps: dict[str, int] = {}

  def evaluate(self, step: int, params) -> dict[str, Any]:
    """{"step", "metrics": {task: {name: value}}, "predictions_files": {task: path},
    "mode"} of `params` at `step`; the files are written (by process 0)."""
    if self._fns is None:  # compiled once, for every step evaluated
      self._fns = ModelFns(params=params, **self._fns_args)
    fns = self._fns
    fns.set_params(params)
    self._captured.clear()
    try:
      metrics_future, _ = self._evaluator.evaluate(
          compute_metrics=True, step=step, predict_fn=fns.predict, score_fn=fns.score,
          predict_with_aux_fn=fns.predict_with_aux)
      metrics = {t: {k: float(getattr(v, "value", v)) for k, v in m.items()}
                 for t, m in metrics_future.result().items()}
      files = {}
      for t in self._evaluator.eval_tasks:
        path = predictions_path(self._out, t.name, step)
        files[t.name] = str(path)
        if jax.process_index() == 0:  # every process computed the same; one writes
          self._write_predictions(path, t.name, fns.option_scores)
          # The metrics line last: it is what marks the step evaluated (`logged`).
          self._summarize(t.name, step, metrics.get(t.name, {}))
          _append_metrics_line(self._out / f"{t.name}-metrics.jsonl", step,
                               metrics.get(t.name, {}))
    finally:
      fns.set_params(None)  # the parameters are not kept alive here
    log.info("eval at step %d: %s", step, metrics)
    return {"step": step, "metrics": metrics, "predictions_files": files, "mode": self._mode}

  def logged(self, step: int) -> dict[str, dict] | None:
    """{task: metrics} that an earlier evaluation of `step` wrote to `output_dir` (its
    predictions file and metrics line for every task), or None if any is missing."""
    out = {}
    for t in self._evaluator.eval_tasks:
      metrics = summaries.logged_line(self._out / f"{t.name}-metrics.jsonl", step)
      if metrics is None or not predictions_path(self._out, t.name, step).exists():
        return None
      out[t.name] = metrics
    return out

  def resume_after(self, step: int) -> None:
    """For a run that evaluates the steps after `step` (again): drops what an earlier run
    wrote for them (predictions files, metrics lines), and TensorBoard drops their points
    when it reads this run's events (`summaries.EventWriter`'s restart marker at `step` +
    1)."""
    if jax.process_index() != 0:
      return
    for t in self._evaluator.eval_tasks:
      summaries.truncate_metrics(self._out / f"{t.name}-metrics.jsonl", step)
      self._restart_steps[t.name] = step + 1
    for f in self._out.glob("*.jsonl"):
      number = f.stem.rsplit("-", 1)[-1]
      if number.isdigit() and int(number) > step:
        f.unlink()
    for f in self._out.glob("*.jsonl.tmp"):  # a predictions file a killed run was writing
      f.unlink()

  def _summarize(self, task: str, step: int, metrics: dict[str, float]) -> None:
    """TensorBoard scalars `eval/<metric>` in `<output_dir>/<task>/`, as seqio's
    TensorBoardLogger writes t5x's."""
    if task not in self._summary_writers:
      self._summary_writers[task] = summaries.EventWriter(
          self._out / task, restart_step=self._restart_steps.get(task))
    self._summary_writers[task].scalars(step, {f"eval/{k}": v for k, v in metrics.items()})

  def _write_predictions(self, path: Path, task: str, option_scores: dict) -> None:
    """`<task>-<step:06>.jsonl`: the example's features ("input"), target, prediction (or
    score) per example, as seqio's JSONLogger writes them for t5x, written atomically."""
    got = self._captured.get(task, {})
    inf, targets = got.get("inferences", {}), got.get("targets") or []
    if task not in self._examples:  # the split's examples, read once for every step
      self._examples[task] = list(itertools.islice(
          self._evaluator.cached_task_datasets[task].as_numpy_iterator(),
          self._json_write_n_results))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      for i, ex in enumerate(self._examples[task]):
        row = {"input": {k: _text(v) for k, v in ex.items()}}
        if i < len(targets):
          row["target"] = _text(targets[i])
        for key in ("prediction", "score"):
          if key in inf:
            row[key] = _text(inf[key][i])
        if self._mode == "rank" and i in option_scores:
          row["label_scores"] = dict(zip(self._labels, option_scores[i]))
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def predictions_path(directory: Path, task: str, step: int) -> Path:
  """Where the predictions of `task` at `step` go: seqio's and t5x's name for them."""
  return Path(directory) / f"{task}-{step:06}.jsonl"


def _checkpoint_paths(checkpoint_path: str, checkpoint_mode: str) -> list[str]:
  """The `checkpoint_<step>` directories CHECKPOINT_PATH and CHECKPOINT_MODE name."""
  directory, step = ckpt_lib.split_checkpoint_path(checkpoint_path)
  if checkpoint_mode == "specific" or step is not None:
    if checkpoint_mode == "all":
      raise ConfigError("CHECKPOINT_MODE 'all' evaluates every checkpoint under a "
                        "directory, but CHECKPOINT_PATH names one checkpoint",
                        path=str(checkpoint_path), field="CHECKPOINT_PATH",
                        hint="point CHECKPOINT_PATH at the run's MODEL_DIR")
    return [str(checkpoint_path)]
  steps = ckpt_lib.finished_steps(directory)
  if jax.process_count() > 1:  # every process evaluates the same checkpoints (collectives)
    steps = _broadcast_steps(steps)
  if not steps:
    raise ConfigError("no finished checkpoint_<step> in this directory",
                      path=str(checkpoint_path), field="CHECKPOINT_PATH",
                      hint="point CHECKPOINT_PATH at a run's MODEL_DIR")
  if checkpoint_mode == "latest":
    steps = steps[-1:]
  return [str(ckpt_lib.step_dir(directory, s)) for s in steps]


def _broadcast_steps(steps: list[int]) -> list[int]:
  """Process 0's list of checkpoint steps, on every process (a run still saving could show
  the processes different lists)."""
  from jax.experimental import multihost_utils
  count = int(multihost_utils.broadcast_one_to_all(np.asarray(len(steps), np.int32)))
  padded = np.zeros(count, np.int64)
  if jax.process_index() == 0:
    padded[:] = steps
  return [int(x) for x in multihost_utils.broadcast_one_to_all(padded)] if count else []


def _append_metrics_line(path: Path, step: int, metrics: dict) -> None:
  """Adds the metrics line of `step` to `path`, replacing one of the same step (a rerun in
  the same EVAL_OUTPUT_DIR) and keeping the lines in step order, written atomically."""
  lines = []
  if path.exists():
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        at = json.loads(line).get("step")
      except (json.JSONDecodeError, AttributeError):
        at = None  # not ours to judge: kept as it is
      if at != step:
        lines.append((at if isinstance(at, int) else -1, line))
  lines.append((step, json.dumps({"step": step, **metrics})))
  lines = [line for _, line in sorted(lines, key=lambda x: x[0])]
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
  tmp.replace(path)


def infer(*, model: DecoderOnlyModel, checkpoint_path: str, partitioner: Partitioner,
          mixture_or_task_name: str, task_feature_lengths: dict[str, int], output_dir: str,
          mode: str = "predict", split: str = "validation", batch_size: int = 32,
          max_decode_length: int | None = None, num_examples: int | None = None,
          feature_converter: str = "prefix_lm", temperature: float = 0.0, top_k: int = 0,
          seed: int = 0, module: str | None = None,
          restore_dtype: str | None = None, num_beams: int = 1,
          use_cached: bool = False, include_all_inputs: bool = False) -> dict[str, Any]:
  """Predictions or scores of a checkpoint on every task of a mixture (t5x's infer).

  Args:
    model: the model.
    checkpoint_path: CHECKPOINT_PATH, a `checkpoint_<step>` directory.
    partitioner: mesh and rules.
    mixture_or_task_name: MIXTURE_OR_TASK_NAME (a mixture runs each of its tasks).
    task_feature_lengths: e.g. {"inputs": 128, "targets": 8}; None: each feature's longest
      example in the split, over the mixture's tasks (`data_feature_lengths`).
    output_dir: INFER_OUTPUT_DIR.
    mode: "predict", "score" (needs targets) or "predict_with_aux".
    split: the split to run on.
    batch_size: examples per model call (a multiple of the data-parallel devices).
    max_decode_length: decode steps (default: the targets length; when decoding with
      measured lengths and the 'lm' converter, the longest example's, and the buffer gets
      that room after it).
    num_examples: only the first N examples of each task.
    feature_converter: "prefix_lm" (text-to-text) or "lm".
    temperature, top_k, seed: sampling (temperature 0 is greedy).
    module: modules to import for task registration.
    restore_dtype, num_beams, use_cached: as for `evaluate`.
    include_all_inputs: write every feature of an example under "inputs" (token ids too);
      False, as t5x's infer: only its texts (`*_pretokenized`), or every feature of a task
      that has none.
  Returns:
    {"step", "mode", "files": {task: path}, "examples": {task: count}}.
  """
  if mode not in INFER_MODES:
    raise ConfigError(f"mode must be one of {INFER_MODES}, not {mode!r}", field="INFER_MODE")
  top = data_lib.get_task_or_mixture(mixture_or_task_name, module)
  data_lib.check_vocabulary_fits(top, model.config.vocab_size)
  data_lib.check_converter_keeps_inputs(top, feature_converter, "FEATURE_CONVERTER")
  subtasks = seqio.get_subtasks(top)
  if not any(split in t.splits for t in subtasks):  # before the checkpoint's restore
    raise ConfigError(f"no task of {mixture_or_task_name!r} has the split {split!r} (its "
                      f"splits: {sorted({str(s) for t in subtasks for s in t.splits})})",
                      field="INFER_SPLIT", hint="choose a split the tasks have")
  if task_feature_lengths is None:
    task_feature_lengths = data_feature_lengths(top, split, num_examples=num_examples,
                                                seed=seed, use_cached=use_cached,
                                                field="INFER_SPLIT")
    if feature_converter == "lm" and mode != "score":
      task_feature_lengths, max_decode_length = _room_to_continue(task_feature_lengths,
                                                                  max_decode_length)
  length = sum(task_feature_lengths.values())
  step, params = load_params(model, checkpoint_path, partitioner, length,
                             vocab_digest=_task_vocab_digest(top), dtype=restore_dtype)
  converter = data_lib.make_feature_converter(feature_converter, pack=False)
  fns = ModelFns(model=model, params=params, partitioner=partitioner, batch_size=batch_size,
                 mode="predict",
                 max_decode_length=max_decode_length or task_feature_lengths["targets"],
                 temperature=temperature, top_k=top_k, seed=seed, num_beams=num_beams)
  out = Path(output_dir)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
  files, counts = {}, {}
  for task in seqio.get_subtasks(top):
    if split not in task.splits:
      log.warning("task %s has no split %r (it has %s): skipped", task.name, split,
                  list(task.splits))
      continue
    task_ds = task.get_dataset(sequence_length=dict(task_feature_lengths), split=split,
                               shuffle=False, num_epochs=1, seed=seed,
                               use_cached=use_cached)
    if num_examples:
      task_ds = task_ds.take(num_examples)
    task_ds = task_ds.cache()
    model_ds = converter(task_ds, dict(task_feature_lengths)).enumerate()
    vocab = task.output_features["targets"].vocabulary
    if mode == "score":
      results = [{"score": float(s)} for _, s in sorted(fns.score(model_ds))]
    else:
      if mode == "predict":
        idx_toks, aux = fns.predict(model_ds), None
      else:
        idx_toks, aux = fns.predict_with_aux(model_ds)
      order = np.argsort([i for i, _ in idx_toks])
      results = [{"prediction": vocab.decode(_through_eos(idx_toks[j][1]).tolist())}
                 for j in order]
      if aux is not None:
        for r, j in zip(results, order):
          r["aux"] = {"scores": float(aux["scores"][j])}
    path = out / f"{task.name}-{mode}.jsonl-00000-of-00001"
    if jax.process_index() == 0:
      tmp = path.with_name(path.name + ".tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        for ex, r in zip(task_ds.as_numpy_iterator(), results):
          shown = {k: v for k, v in ex.items() if include_all_inputs
                   or k.endswith("_pretokenized")} or ex  # a task without texts: all
          inputs = {k: _text(v) for k, v in shown.items()}
          f.write(json.dumps({"inputs": inputs, **r}, ensure_ascii=False) + "\n")
      tmp.replace(path)
    files[task.name], counts[task.name] = str(path), len(results)
    log.info("infer %s: %d examples -> %s", task.name, len(results), path)
  return {"step": step, "mode": mode, "files": files, "examples": counts}
