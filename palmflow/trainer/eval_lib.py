"""Evaluation and inference with seqio: the task's metrics on decoded or ranked predictions.

Modes:
  - `predict`: greedy (or temperature / top-k) decoding after each example's inputs.
  - `rank`: classification by log-likelihood: every label option of the task is scored after
    the inputs and the most likely one is the prediction (robust for small models).
  - `score`: the log-likelihood of each example's target (infer only).
Outputs follow t5x: `<dir>/<task>-<step>.jsonl` (inputs, prediction, target) and
`<dir>/<task>-metrics.jsonl` (one line per evaluated step).
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import seqio

from palmflow.trainer import checkpoints as ckpt_lib
from palmflow.trainer import data as data_lib
from palmflow.trainer.lm import DecoderOnlyModel, strip_after_eos
from palmflow.trainer.partitioning import Partitioner

log = logging.getLogger("palmflow.eval")
MODES = ("predict", "rank", "score")


def load_params(model: DecoderOnlyModel, checkpoint_path: str, partitioner: Partitioner,
                length: int):
  """(step, params) restored from a `checkpoint_<step>` directory, sharded as the rules say."""
  init_fn = functools.partial(model.init, batch_size=1, length=length)
  abstract = partitioner.abstract_init(init_fn, jax.random.PRNGKey(0))
  shardings = partitioner.get_param_shardings(abstract)["params"]
  import flax.linen as nn
  shapes = nn.unbox(abstract)["params"]
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
  got = ckpt_lib.restore_initial(ckpt_lib.RestoreCheckpointConfig(path=checkpoint_path),
                                 target, None)
  step, params, _ = got
  return step, params


def _batches(ds, batch_size):
  rows = list(ds.as_numpy_iterator())
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    idx = [r[0] for r in chunk]
    feats = {k: np.stack([r[1][k] for r in chunk]) for k in chunk[0][1]}
    yield idx, feats


def _pad_rows(feats: dict, batch_size: int) -> tuple[dict, int]:
  n = next(iter(feats.values())).shape[0]
  if n == batch_size:
    return feats, n
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
          for k, v in feats.items()}, n


def _option_batch(inputs: list[np.ndarray], option: np.ndarray, length: int) -> dict:
  """Prefix-LM features for `inputs[i] + option` (loss on the option tokens only)."""
  b = len(inputs)
  out = {k: np.zeros((b, length), np.int32) for k in (
      "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
      "decoder_causal_attention")}
  for i, inp in enumerate(inputs):
    seq = np.concatenate([inp, option])[:length]
    n = len(seq)
    out["decoder_target_tokens"][i, :n] = seq
    out["decoder_input_tokens"][i, 1:n] = seq[:n - 1]
    out["decoder_loss_weights"][i, len(inp):n] = 1
    out["decoder_causal_attention"][i, :min(length, len(inp) + 1)] = 1
  return out


def make_fns(*, model: DecoderOnlyModel, params, partitioner: Partitioner, batch_size: int,
             mode: str, max_decode_length: int, label_options: list[list[int]] | None,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0):
  """seqio predict_fn / score_fn closures over the model and its parameters."""
  score = partitioner.partition(model.score_batch)
  predict = partitioner.partition(functools.partial(
      model.predict_batch, max_decode_length=max_decode_length, temperature=temperature,
      top_k=top_k))

  def predict_fn(ds, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for bi, (idx, feats) in enumerate(_batches(ds, batch_size)):
      padded, n = _pad_rows(feats, batch_size)
      if mode == "rank":
        length = feats["decoder_target_tokens"].shape[1]
        plen = padded["decoder_causal_attention"].sum(-1)
        inputs = [padded["decoder_target_tokens"][i, :max(0, p - 1)] for i, p in
                  enumerate(plen)]
        scores = []
        for opt in label_options:
          ob = _option_batch(inputs, np.asarray(opt, np.int32), length)
          scores.append(np.asarray(score(params, partitioner.shard_batch(ob))))
        best = np.argmax(np.stack(scores, -1), -1)
        toks = [list(label_options[j])[:-1] for j in best[:n]]
      else:
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), bi)
        got = predict(params, partitioner.shard_batch(padded), rng=rng)
        toks = strip_after_eos(np.asarray(got)[:n])
      out.extend(zip(idx, toks))
      _progress(len(out))
    return out

  def score_fn(ds, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for idx, feats in _batches(ds, batch_size):
      padded, n = _pad_rows(feats, batch_size)
      s = np.asarray(score(params, partitioner.shard_batch(padded)))[:n]
      out.extend(zip(idx, s.tolist()))
      _progress(len(out))
    return out
  return predict_fn, score_fn


def _progress(n: int) -> None:
  end = "\r" if sys.stderr.isatty() else "\n"
  if sys.stderr.isatty() or n % 256 == 0:
    print(f"eval: {n} examples", end=end, file=sys.stderr, flush=True)


def evaluate(*, model: DecoderOnlyModel, checkpoint_path: str, partitioner: Partitioner,
             mixture_or_task_name: str, task_feature_lengths: dict[str, int],
             output_dir: str, split: str = "validation", batch_size: int = 32,
             mode: str = "predict", max_decode_length: int | None = None,
             num_examples: int | None = None, json_write_n_results: int | None = None,
             feature_converter: str = "prefix_lm", temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, module: str | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint on a task's split with its seqio metrics.

  Args:
    model: the model (its optimizer is unused).
    checkpoint_path: CHECKPOINT_PATH, a `checkpoint_<step>` directory.
    partitioner: mesh and rules.
    mixture_or_task_name: MIXTURE_OR_TASK_NAME.
    task_feature_lengths: e.g. {"inputs": 128, "targets": 8}.
    output_dir: EVAL_OUTPUT_DIR; predictions and metrics are written here.
    split: the split to evaluate.
    batch_size: examples per model call.
    mode: "predict" (decode) or "rank" (score each label option; classification tasks).
    max_decode_length: decode steps (default: the targets length).
    num_examples: evaluate only the first N examples.
    json_write_n_results: write at most N predictions to the JSONL (None: all).
    feature_converter: "prefix_lm" (text-to-text) or "lm".
    temperature, top_k, seed: sampling (temperature 0 is greedy).
    module: modules to import for task registration.
  Returns:
    {"step", "metrics": {task: {name: value}}, "predictions_file"}.
  """
  if mode not in ("predict", "rank"):
    raise ValueError(f"mode must be predict or rank for evaluation, not {mode!r}")
  task = data_lib.get_task_or_mixture(mixture_or_task_name, module)
  length = sum(task_feature_lengths.values())
  step, params = load_params(model, checkpoint_path, partitioner, length)
  converter = data_lib.make_feature_converter(feature_converter, pack=False)
  evaluator = seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name, feature_converter=converter,
      eval_split=split, sequence_length=dict(task_feature_lengths), num_examples=num_examples,
      use_memory_cache=True, seed=seed)
  options = None
  if mode == "rank":
    labels = getattr(task, "label_names", None)
    if not labels:
      raise ValueError(f"task {mixture_or_task_name} has no label_names; use mode=predict")
    vocab = task.output_features["targets"].vocabulary
    options = [list(vocab.encode(l)) + [1] for l in labels]
  predict_fn, score_fn = make_fns(
      model=model, params=params, partitioner=partitioner, batch_size=batch_size, mode=mode,
      max_decode_length=max_decode_length or task_feature_lengths["targets"],
      label_options=options, temperature=temperature, top_k=top_k, seed=seed)
  metrics_future, outputs = evaluator.evaluate(compute_metrics=True, step=step,
                                               predict_fn=predict_fn, score_fn=score_fn)
  metrics = metrics_future.result()
  metrics = {t: {k: float(getattr(v, "value", v)) for k, v in m.items()}
             for t, m in metrics.items()}
  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = {}
  for t in evaluator.eval_tasks:
    preds = outputs[t.name].get(seqio.metrics.ModelOutputType.PREDICTION, [])
    targets = evaluator._cached_targets[t.name]  # pylint: disable=protected-access
    inputs = [ex.get("inputs_pretokenized", b"")
              for ex in evaluator.cached_task_datasets[t.name].as_numpy_iterator()]
    path = out / f"{t.name}-{step}.jsonl"
    rows = list(zip(inputs, preds, targets))[:json_write_n_results]
    with open(path, "w", encoding="utf-8") as f:
      for inp, p, tgt in rows:
        dec = lambda x: x.decode("utf-8", "replace") if isinstance(x, bytes) else x
        f.write(json.dumps({"inputs": dec(inp), "prediction": dec(p), "target": dec(tgt)},
                           ensure_ascii=False) + "\n")
    with open(out / f"{t.name}-metrics.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, **metrics.get(t.name, {})}) + "\n")
    files[t.name] = str(path)
  log.info("eval at step %d: %s", step, metrics)
  return {"step": step, "metrics": metrics, "predictions_files": files, "mode": mode}
