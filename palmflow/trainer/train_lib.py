"""The training loop (library code: no gin here; `palmflow.trainer.train` binds it).

    train(model=..., train_dataset_cfg=..., partitioner=..., model_dir=..., total_steps=...)

Restore order at start (t5x): the latest valid checkpoint in `model_dir`, else
`restore_cfg.path` (INITIAL_CHECKPOINT_PATH), else from scratch. `total_steps` is absolute:
fine-tuning 1000 steps from a step-20000 checkpoint means total_steps=21000. A resumed run
skips the batches already consumed and folds the step into the dropout key, so it ends with
the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from palmflow.errors import ConfigError, DataError
from palmflow.trainer import checkpoints as ckpt_lib
from palmflow.trainer import data as data_lib
from palmflow.trainer import optimizers
from palmflow.trainer import precision as precision_lib
from palmflow.trainer import summaries
from palmflow.trainer.lm import DecoderOnlyModel
from palmflow.trainer.partitioning import Partitioner

log = logging.getLogger("palmflow.train")


class MetricsWriter:
  """Appends metrics to `<dir>/metrics.jsonl` and TensorBoard event files in `<dir>`.

  `restart_step`: the first step this run logs (a fresh run too); TensorBoard drops what an
  interrupted run logged there and after (`summaries.EventWriter`).
  """

  def __init__(self, directory: Path, *, tensorboard: bool = True,
               restart_step: int | None = None):
    self.dir = Path(directory)
    self.dir.mkdir(parents=True, exist_ok=True)
    self._tb = None
    self._enabled = jax.process_index() == 0
    if tensorboard and self._enabled:
      self._tb = summaries.EventWriter(self.dir, restart_step=restart_step)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    # The events first: a run killed between the two has not logged the step (its line is
    # missing), so the resumed run logs it again and its marker drops the stray points.
    if self._tb is not None:
      self._tb.scalars(step, metrics)
    with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}})
              + "\n")


def _inference_evaluator(cfg: data_lib.DatasetConfig, *, model, partitioner, output_dir: Path,
                         **settings):
  """The trainer's inference evaluation on `cfg`'s task (None, with a warning, for a task
  with nothing to evaluate, as t5x skips it)."""
  from palmflow.trainer import eval_lib
  try:
    evaluator = eval_lib.InferenceEvaluator(
        model=model, partitioner=partitioner, mixture_or_task_name=cfg.mixture_or_task_name,
        task_feature_lengths=dict(cfg.task_feature_lengths), output_dir=str(output_dir),
        split=cfg.split, batch_size=cfg.batch_size, feature_converter=cfg.feature_converter,
        seed=cfg.seed, module=cfg.module, use_cached=cfg.use_cached,
        fields={"split": "INFER_EVAL_SPLIT", "converter": "INFER_EVAL_FEATURE_CONVERTER"},
        **settings)
  except eval_lib.NothingToEvaluate as e:
    log.warning("no inference evaluation: %s (set INFER_EVAL_MIXTURE_OR_TASK_NAME = None to "
                "silence this)", e)
    return None
  return evaluator


def _agreed(flag: bool) -> bool:
  """Process 0's `flag` on every process (they must take the same branches around
  collectives, and only process 0 writes the files the flag is read from)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def format_metrics(metrics: dict[str, float]) -> str:
  """``loss=3.283 accuracy=0.3687``: how step and eval lines show metrics."""
  return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class Progress:
  """A tqdm bar in a terminal, a plain log line every `every` steps otherwise."""

  def __init__(self, *, start: int, total: int, every: int, desc: str):
    self._tty = sys.stderr.isatty() and jax.process_index() == 0
    self._every, self._desc, self._total = every, desc, total
    self._bar = None
    if self._tty:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

  def update(self, step: int, metrics: dict[str, float]) -> None:
    text = format_metrics(metrics)
    if self._bar is not None:
      self._bar.update(1)
      if step % self._every == 0:
        self._bar.set_postfix_str(text)
    elif step % self._every == 0 or step == self._total:
      if jax.process_index() == 0:
        print(f"{self._desc} step {step}/{self._total} {text}", file=sys.stderr, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def _split_microbatches(batch, n: int):
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def _constant_normalizer(loss_normalizing_factor) -> float | None:
  """The number a numeric `loss_normalizing_factor` divides by: the number itself, 1 for
  None (t5x's summed loss), None for the named ones (which count per microbatch)."""
  f = loss_normalizing_factor
  if f is None:
    return 1.0
  if isinstance(f, (int, float, np.number)) and not isinstance(f, bool):
    return float(f)
  return None


def make_train_step(model: DecoderOnlyModel, tx: optax.GradientTransformation, *,
                    num_microbatches: int, dropout_seed: int,
                    learning_rate_fn: Callable | None) -> Callable:
  """(params, opt_state, batch, step) -> (params, opt_state, metrics).

  The gradient is that of the whole batch's loss: each microbatch contributes its summed token
  loss and its normalizer (for NUM_REAL_TARGET_TOKENS, its count of non-padding tokens), and
  the sums are divided once at the end, so microbatches with unequal numbers of real tokens
  give the same update as the large batch. With a numeric `loss_normalizing_factor` the sum is
  divided by that number, as for one batch.

  If `opt_state` carries a loss scale (`precision.with_dynamic_loss_scale`), the loss is
  multiplied by it before differentiation and the gradients divided by it afterwards; the
  wrapped optimizer then skips non-finite steps. Metrics then include `loss_scale` (the scale
  this step used) and `skipped_steps` (the total so far), and `learning_rate` is the
  schedule at the number of updates applied before this step (skipped steps do not count).
  """
  use_dropout = model.config.dropout_rate > 0
  constant_nf = _constant_normalizer(model.loss_normalizing_factor)

  def grads_of(params, batch, rng, scale):
    """(summed loss, normalizer, gradient of the summed loss * scale, stats)."""
    def f(p):
      loss, stats = model.loss_fn(p, batch, dropout_rng=rng)
      return loss * scale, (loss, stats)
    # The scale multiplies the *normalised* loss, as usual for float16 recipes; the gradient
    # is then turned into that of the summed loss so that microbatches add up.
    (_, (loss, stats)), g = jax.value_and_grad(f, has_aux=True)(params)
    nf = jax.lax.stop_gradient(stats["normalizing_factor"])
    return loss * nf, nf, jax.tree.map(lambda x: x * nf.astype(x.dtype), g), stats

  def step_fn(params, opt_state, batch, step):
    rng = jax.random.fold_in(jax.random.PRNGKey(dropout_seed), step) if use_dropout else None
    loss_scale = precision_lib.loss_scale_of(opt_state)
    scale = loss_scale.scale if loss_scale is not None else jnp.ones([], jnp.float32)
    if num_microbatches <= 1:
      weighted, nf, grads, stats = grads_of(params, batch, rng, scale)
    else:
      micro = _split_microbatches(batch, num_microbatches)

      def body(carry, xs):
        i, mb = xs
        r = jax.random.fold_in(rng, i) if rng is not None else None
        w, n, g, s = grads_of(params, mb, r, scale)
        acc_w, acc_n, acc_g, acc_s = carry
        return (acc_w + w, acc_n + n, jax.tree.map(jnp.add, acc_g, g),
                jax.tree.map(jnp.add, acc_s, s)), None
      zeros_g = jax.tree.map(jnp.zeros_like, params)
      s_shape = jax.eval_shape(lambda: grads_of(
          params, jax.tree.map(lambda x: x[0], micro), None, scale)[3])
      zeros_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), s_shape)
      (weighted, nf, grads, stats), _ = jax.lax.scan(
          body, (jnp.zeros([]), jnp.zeros([]), zeros_g, zeros_s),
          (jnp.arange(num_microbatches), micro))
    if constant_nf is not None:
      nf = jnp.asarray(constant_nf, jnp.float32)
    nf = jnp.maximum(nf, 1e-8)
    grads = jax.tree.map(lambda g: (g / (nf * scale)).astype(g.dtype), grads)
    # The schedule counts applied updates: a step skipped for non-finite float16 gradients
    # leaves the optimizer's state (its step count included) as it was.
    applied_steps = step
    if loss_scale is not None:
      applied_steps = step - loss_scale.skipped_steps
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {
        "loss": weighted / nf,
        "cross_ent_loss": stats["cross_ent_loss_sum"] / jnp.maximum(
            stats["accuracy_denominator"], 1e-8),
        "z_loss": stats["z_loss_sum"] / jnp.maximum(stats["accuracy_denominator"], 1e-8),
        "accuracy": stats["accuracy_numerator"] / jnp.maximum(
            stats["accuracy_denominator"], 1e-8),
        "grad_norm": optax.global_norm(grads),
        "target_tokens": stats["accuracy_denominator"],  # the tokens the loss counts
    }
    if loss_scale is not None:
      metrics["loss_scale"] = scale
      metrics["skipped_steps"] = precision_lib.loss_scale_of(opt_state).skipped_steps
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(applied_steps)
    return params, opt_state, metrics
  return step_fn


# Dense bfloat16 (and float16) peak FLOP/s of one JAX device, from the vendors' data sheets:
# MFU's denominator when PEAK_FLOPS_PER_SECOND is not set. The first entry whose text is in
# the device's `device_kind` wins (TPU v2/v3 show each core as a device).
DEVICE_PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 61.5e12), ("TPU v2", 22.5e12),
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
)


def device_peak_flops(device_kind: str, compute_dtype: str) -> float | None:
  """One device's peak FLOP/s for `compute_dtype` from `DEVICE_PEAK_FLOPS`, or None: an
  unknown device (a CPU's peak depends on its units and clock: measure it, as bench/ does)
  or float32 compute (whether a GPU's float32 matmuls run as TF32 is a setting)."""
  if compute_dtype not in ("bfloat16", "float16"):
    return None
  return next((peak for kind, peak in DEVICE_PEAK_FLOPS if kind in device_kind), None)


def model_flops_per_token(config, *, num_params: int, length: int) -> float:
  """Training FLOPs per token of a decoder (PaLM paper, appendix B).

      6 * N + 12 * L * H * Q * T

  N parameters taking part in matmuls (each in one multiply-add forward and two backward: 6
  FLOPs; a shared embedding counts once, as the output projection; an unshared input
  embedding is a lookup and is not counted), L layers, H query heads of size Q (H * Q =
  d_model in PaLM) and T = `length` tokens of context (attention scores and weighted values:
  2 * 2 * H * Q * T forward per token, times 3 with the backward). Rematerialisation is not
  counted: this is *model* FLOPs, the numerator of MFU. The trainer multiplies it by every
  position of its batches (`tokens_per_second`): padding too, which the step computes as
  well (blocks of the blocks stage, and examples packed online, have little or none).

  Args:
    config: the PaLMConfig.
    num_params: all parameters of the model.
    length: T, the sequence length.
  Returns:
    FLOPs per trained token.
  """
  lookup = 0 if config.shared_embedding else config.vocab_size * config.d_model
  attention = 12 * config.num_layers * config.num_heads * config.head_dim * length
  return float(6 * (num_params - lookup) + attention)


def _partition_specs(params) -> dict[str, str]:
  """{parameter path: mesh axis of each dimension, e.g. "(model, None)"} as actually placed
  (the arrays' shardings, for train_result.json; model-info.txt has what the rules say)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    spec = tuple(getattr(x.sharding, "spec", ()))
    spec += (None,) * (x.ndim - len(spec))
    out["/".join(str(getattr(k, "key", k)) for k in path)] = (
        "(" + ", ".join(str(a) for a in spec) + ")")
  return out


def _vocab_digest(cfg: data_lib.DatasetConfig, vocab_size: int) -> str | None:
  """The digest of the training task's targets vocabulary (recorded in checkpoints); checks
  first that the vocabularies fit the model's `vocab_size`."""
  task = data_lib.get_task_or_mixture(cfg.mixture_or_task_name, cfg.module)
  data_lib.check_vocabulary_fits(task, vocab_size)
  feature = task.output_features.get("targets")
  return ckpt_lib.vocabulary_digest(feature.vocabulary) if feature is not None else None


def place_on_mesh(tree, mesh):
  """Leaves not placed on `mesh` (e.g. optimizer step counters) replicated over it, so a
  partitioned step sees the same shardings on every call."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(x):
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
      return x
    return jax.device_put(x, rep)
  return jax.tree.map(place, tree)


def optimizer_state_shardings(abstract_state, params, mesh, moment_axes=None):
  """Shardings for an optimizer state that follow its parameters' (t5x partitions the
  optimizer state as the parameters): a leaf of a parameter's shape whose path ends with
  that parameter's path (Adam's moments, Adafactor's unfactored moments or momentum) is
  sharded like it; a factored moment (the parameter's shape with axes dropped) keeps the
  remaining axes' mesh axes; anything else (step counts, loss scale) is replicated.
  Otherwise the whole state would be replicated on every device, which model-parallel and
  fully sharded training cannot afford.

  Args:
    abstract_state: the state's shapes (`jax.eval_shape` of the optimizer's init).
    params: the parameters as placed on `mesh`.
    mesh: the device mesh.
    moment_axes: `optimizers.factored_moment_axes` of the optimizer: which axes each
      factored moment keeps (None: factored moments are replicated).
  """
  specs = {}
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    sh = getattr(p, "sharding", None)
    spec = tuple(sh.spec) if isinstance(sh, jax.sharding.NamedSharding) else ()
    specs[jax.tree_util.keystr(path)] = (path, p, spec + (None,) * (p.ndim - len(spec)))
  by_length = sorted(specs, key=len, reverse=True)  # the longest matching path wins

  def kept_axes(name: str, leaf, param_path, param) -> tuple[int, ...] | None:
    """The parameter's axes that the leaf keeps, in order (None: not the parameter's)."""
    if tuple(leaf.shape) == tuple(param.shape):
      return tuple(range(param.ndim))
    moment = name[:-len(jax.tree_util.keystr(param_path))].rsplit(".", 1)[-1]
    if moment_axes is None or moment not in ("v_row", "v_col"):
      return None
    axes = moment_axes(param_path, param, moment)
    if axes is None or [param.shape[a] for a in axes] != list(leaf.shape):
      return None
    return axes

  def sharding(path, leaf):
    spec = ()
    name = jax.tree_util.keystr(path)
    match = next((k for k in by_length if name.endswith(k)), None)
    if match is not None and leaf.shape:
      param_path, param, param_spec = specs[match]
      kept = kept_axes(name, leaf, param_path, param)
      if kept is not None:
        spec = tuple(param_spec[a] for a in kept)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def train_optimizer(model: DecoderOnlyModel, policy: precision_lib.PrecisionPolicy,
                    abstract_params) -> optax.GradientTransformation:
  """The optimizer `train` steps with (and whose state its checkpoints hold): the model's,
  told the parameters' logical axes (boxed `abstract_params`: Adafactor factors each second
  moment by them, t5x's rules), wrapped by the precision policy (float16's loss scaling)."""
  tx = optimizers.with_param_axes(model.optimizer, nn.get_partition_spec(abstract_params))
  return policy.wrap_optimizer(tx)


def partition_train_step(partitioner: Partitioner, step: Callable, abstract_params,
                         opt_state, compiler_options: dict | None = None) -> Callable:
  """`step` (from `make_train_step`) jitted over the mesh, its state donated and its outputs
  pinned to the inputs' shardings: parameters stay sharded as the rules say.

  Args:
    partitioner: the mesh and rules.
    step: (params, opt_state, batch, step) -> (params, opt_state, metrics).
    abstract_params: the boxed abstract parameters (`Partitioner.sharded_init`).
    opt_state: the optimizer state as it will be passed (on the mesh: `place_on_mesh`).
    compiler_options: XLA options for this step only (`Partitioner.partition`).
  """
  state_shardings = (partitioner.get_param_shardings(abstract_params),
                     jax.tree.map(lambda x: x.sharding, opt_state))
  return partitioner.partition(step, out_shardings=state_shardings + (None,),
                               donate_argnums=(0, 1), compiler_options=compiler_options)


def restore_train_state(checkpointer: ckpt_lib.Checkpointer, params, opt_state, *, mesh,
                        restore_cfg: ckpt_lib.RestoreCheckpointConfig | None,
                        total_steps: int, vocab_digest: str | None = None):
  """Where a run starts: (step, params, opt_state, data batches already consumed).

  t5x's order: the latest usable checkpoint in MODEL_DIR (resume: step, state and data
  position as saved), else `restore_cfg.path` (INITIAL_CHECKPOINT_PATH: its step and
  parameters, fresh data), else the freshly initialized state at step 0.

  Raises:
    ConfigError: the initial checkpoint's shapes or vocabulary differ from the model's, or
      TRAIN_STEPS is not beyond its step (TRAIN_STEPS is absolute).
  """
  opt_state = place_on_mesh(opt_state, mesh)
  abstract_of = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
  restored = checkpointer.restore_latest(abstract_of(params), abstract_of(opt_state))
  if restored is not None:
    step, params, opt_state, meta = restored
    consumed = int(meta.get("data_batches_consumed", step))
    log.info("resuming from %s (data position: %d batches consumed)",
             ckpt_lib.step_dir(checkpointer.dir, step), consumed)
    return step, params, opt_state, consumed
  if restore_cfg is not None and restore_cfg.path:
    got = ckpt_lib.restore_initial(restore_cfg, abstract_of(params), abstract_of(opt_state),
                                   vocab_digest=vocab_digest, init_params=params)
    if got is not None:
      step, params, init_opt = got
      if step >= total_steps:
        from palmflow.errors import ConfigError
        raise ConfigError(
            f"TRAIN_STEPS={total_steps} is not beyond the initial checkpoint's step {step}",
            field="TRAIN_STEPS", path=str(restore_cfg.path),
            hint=f"TRAIN_STEPS is absolute: to fine-tune N steps set it to {step} + N")
      log.info("initialized from %s (step %d); training until step %d", restore_cfg.path,
               step, total_steps)
      if init_opt is None:  # a fresh optimizer state: its schedules continue at the step
        init_opt = place_on_mesh(optimizers.start_schedules_at(opt_state, step), mesh)
      return step, params, init_opt, 0
  return 0, params, opt_state, 0


def make_eval_step(model: DecoderOnlyModel) -> Callable:
  def eval_fn(params, batch):
    _, stats = model.loss_fn(params, batch)
    return {"cross_ent_loss_sum": stats["cross_ent_loss_sum"],
            "z_loss_sum": stats["z_loss_sum"],
            "accuracy_numerator": stats["accuracy_numerator"],
            "weights": stats["accuracy_denominator"]}
  return eval_fn


def _batch_multiple(partitioner: Partitioner) -> int:
  """Rows a host batch must be a multiple of: the local devices along the batch axis."""
  spec = partitioner.data_sharding(2).spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  size = int(np.prod([partitioner.mesh.shape[a] for a in axes])) if axes else 1
  return max(1, size // jax.process_count())


class InMemoryBatches:
  """The first `n` batches of a dataset, read once and kept on the host, for
  `evaluate_loss` (what it reads of a tf.data.Dataset: `element_spec`, and
  `as_numpy_iterator`)."""

  def __init__(self, ds, n: int):
    self.element_spec = ds.element_spec
    self._batches = list(itertools.islice(ds.as_numpy_iterator(), n))

  def as_numpy_iterator(self):
    return iter(self._batches)


def evaluate_loss(eval_fn, params, ds, partitioner: Partitioner, *, max_batches: int,
                  host_batch_size: int | None = None) -> dict:
  """Token-level loss and accuracy over up to `max_batches` batches of `ds`.

  Per target token: ``loss`` (cross-entropy, label smoothing included, plus z-loss: what the
  model trains on), ``cross_ent_loss``, ``z_loss`` and ``accuracy``. The training metrics of
  these names are the same with the default LOSS_NORMALIZING_FACTOR
  ('NUM_REAL_TARGET_TOKENS'); with another, the training ``loss`` is divided by it instead.

  A short last batch is padded with rows of zero weight: to `host_batch_size` rows when
  given (every process then feeds the same shapes), else to a multiple of the local
  devices. With several processes, whose shards of the split may hold different numbers
  of batches, all run as many steps as the longest (the others feed batches of zero
  weight): every process must take part in every step's collectives.
  """
  tot = {"cross_ent_loss_sum": 0.0, "z_loss_sum": 0.0, "accuracy_numerator": 0.0,
         "weights": 0.0}
  batches = [b for _, b in zip(range(max_batches), ds.as_numpy_iterator())]
  steps = len(batches)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    steps = int(np.max(multihost_utils.process_allgather(np.asarray(len(batches)))))
  multiple = _batch_multiple(partitioner) if steps else 1
  zero = None
  for i in range(steps):
    if i < len(batches):
      batch = batches[i]
    else:  # this process's shard ran out: a batch of zero weight, shaped as the others
      if zero is None:
        zero = {k: np.zeros((host_batch_size or multiple,) + tuple(s.shape[1:]),
                            s.dtype.as_numpy_dtype) for k, s in ds.element_spec.items()}
      batch = zero
    n = len(batch["decoder_target_tokens"])
    full = host_batch_size or -(-n // multiple) * multiple
    if full != n:  # a short last batch: pad with rows of zero weight
      batch = {k: np.concatenate([v, np.zeros((full - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    out = eval_fn(params, partitioner.shard_batch(batch))
    for k in tot:
      tot[k] += float(out[k])
  if not tot["weights"]:
    return {}  # no target token: no loss or accuracy to report (not 0 and 0)
  w = tot["weights"]
  return {"loss": (tot["cross_ent_loss_sum"] + tot["z_loss_sum"]) / w,
          "cross_ent_loss": tot["cross_ent_loss_sum"] / w, "z_loss": tot["z_loss_sum"] / w,
          "accuracy": tot["accuracy_numerator"] / w}


def train(*, model: DecoderOnlyModel, train_dataset_cfg: data_lib.DatasetConfig,
          partitioner: Partitioner, model_dir: str, total_steps: int,
          train_eval_dataset_cfg: data_lib.DatasetConfig | None = None,
          checkpoint_cfg: ckpt_lib.SaveCheckpointConfig = ckpt_lib.SaveCheckpointConfig(),
          restore_cfg: ckpt_lib.RestoreCheckpointConfig | None = None,
          num_microbatches: int = 1, eval_period: int = 100, eval_steps: int = 20,
          log_every: int = 10, random_seed: int = 0,
          learning_rate_fn: Callable | None = None,
          precision: precision_lib.PrecisionPolicy | None = None,
          peak_flops_per_second: float | None = None,
          stop_after_steps: int | None = None,
          infer_eval_dataset_cfg: data_lib.DatasetConfig | None = None,
          infer_eval_mode: str = "predict", evaluator_num_examples: int | None = None,
          json_write_n_results: int | None = None) -> dict[str, Any]:
  """Trains `model` until step `total_steps`, checkpointing into `model_dir`.

  Args:
    model: the model, with its optimizer.
    train_dataset_cfg: training data.
    partitioner: mesh and logical axis rules.
    model_dir: MODEL_DIR (checkpoints, metrics, model-info.txt).
    total_steps: TRAIN_STEPS, an absolute step.
    train_eval_dataset_cfg: data for periodic loss/accuracy evaluation (None: none).
    infer_eval_dataset_cfg: a task (or mixture) with metrics to evaluate on the model's
      predictions every `eval_period` steps, as the eval binary does (t5x's inference
      evaluation): ``inference_eval/<task>-<step:06>.jsonl`` and ``<task>-metrics.jsonl`` in
      MODEL_DIR. None: none.
    infer_eval_mode: INFERENCE_MODE, 'predict' (decode) or 'rank' (label options).
    evaluator_num_examples: EVALUATOR_NUM_EXAMPLES, the examples evaluated (None: all).
    json_write_n_results: JSON_WRITE_N_RESULTS, predictions written per step (None: all).
    checkpoint_cfg: save period, keep-N, dtype.
    restore_cfg: INITIAL_CHECKPOINT_PATH and how to restore it.
    num_microbatches: gradient accumulation; the same update as the whole batch.
    eval_period: steps between evaluations (and the last step).
    eval_steps: batches per evaluation.
    log_every: steps between log lines / progress updates.
    random_seed: RANDOM_SEED (parameter init and dropout).
    learning_rate_fn: the schedule, for logging the learning rate.
    precision: compute dtype and loss scaling (gin: PRECISION from gin/precision/*.gin);
      None means the model's own dtype without loss scaling.
    peak_flops_per_second: peak FLOP/s of one device for the compute dtype; `mfu` =
      model_flops_per_second / (peak * devices in the mesh) is logged. None: the device's
      data-sheet peak for bfloat16/float16 compute on known TPUs and GPUs
      (`device_peak_flops`); elsewhere only model_flops_per_second (see
      `model_flops_per_token`). Rates: `tokens_per_second` counts every position of the
      batches (padding included), `target_tokens_per_second` the target tokens the loss
      counts (`target_tokens` per step).
    stop_after_steps: stop (after a checkpoint) once this many steps ran in this call
      (for tests of interruption; None runs to `total_steps`).
  Returns:
    {"step", "train": last train metrics, "eval": last eval metrics, "infer_eval": the last
     inference evaluation's {task: {metric: value}}, "num_params",
     "param_partition_specs": {parameter path: mesh axes of the trained array}}.
  """
  if model.optimizer is None:
    raise ConfigError("the model has no optimizer", field="OPTIMIZER",
                      hint="bind OPTIMIZER in the model gin file (see gin/models/palm_base.gin)")
  if (restore_cfg is not None and restore_cfg.dtype
      and restore_cfg.dtype != model.config.param_dtype):
    raise ConfigError(
        f"restoring parameters as {restore_cfg.dtype} into a model whose parameters are "
        f"{model.config.param_dtype}: the optimizer state follows the parameters' dtype",
        field="RestoreCheckpointConfig.dtype",
        hint="leave it None (a bfloat16 checkpoint restores into float32 parameters); the "
             "compute dtype is the precision policy's (gin/precision/*.gin)")
  for name, value, macro in (("num_microbatches", num_microbatches, "NUM_MICROBATCHES"),
                             ("eval_period", eval_period, "EVAL_PERIOD"),
                             ("log_every", log_every, "LOG_EVERY")):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ConfigError(f"train.{name} must be an int >= 1, got {value!r}", field=macro)
  ckpt_lib.check_local_path(model_dir, "MODEL_DIR")
  model_dir = Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  policy = precision or precision_lib.PrecisionPolicy(compute_dtype=model.config.dtype)
  policy.check_model_dtype(model.config.dtype)
  if policy.compute_dtype == "float16" and policy.dynamic_loss_scale is None:
    log.warning("float16 compute without loss scaling: small gradients may flush to zero "
                "(include gin/precision/float16.gin for dynamic loss scaling)")
  cfg = train_dataset_cfg
  length = sum(cfg.task_feature_lengths.values())
  if num_microbatches > 1 and cfg.batch_size % num_microbatches:
    raise ConfigError(f"BATCH_SIZE {cfg.batch_size} is not divisible by NUM_MICROBATCHES "
                      f"{num_microbatches}", field="NUM_MICROBATCHES",
                      hint="choose a number of microbatches that divides BATCH_SIZE")

  init_fn = functools.partial(model.init, batch_size=1, length=length)
  variables, abstract = partitioner.sharded_init(init_fn, jax.random.PRNGKey(random_seed))
  params = variables["params"]
  tx = train_optimizer(model, policy, abstract["params"])
  moment_axes = optimizers.factored_moment_axes(model.optimizer,
                                                nn.get_partition_spec(abstract["params"]))
  opt_state = jax.jit(tx.init, out_shardings=optimizer_state_shardings(
      jax.eval_shape(tx.init, params), params, partitioner.mesh, moment_axes))(params)
  if jax.process_index() == 0:
    (model_dir / "model-info.txt").write_text(
        partitioner.describe(abstract["params"]) + "\n"
        + partitioner.describe(opt_state, title="Optimizer state", header=False,
                               skip_scalars=True))

  checkpointer = ckpt_lib.Checkpointer(model_dir, checkpoint_cfg)
  try:  # closed on errors too: an open orbax manager's threads outlive the call
    vocab_digest = _vocab_digest(cfg, model.config.vocab_size)
    start_step, params, opt_state, consumed = restore_train_state(
        checkpointer, params, opt_state, mesh=partitioner.mesh, restore_cfg=restore_cfg,
        total_steps=total_steps, vocab_digest=vocab_digest)
    first_step = start_step - consumed  # the step this run's data started at

    # What an earlier run logged after `start_step` is dropped (this run logs those steps
    # again), and so is `start_step`'s evaluation where this run evaluates it again: at
    # step 0, and when resumed at an evaluation step whose evaluation was not (wholly)
    # logged. The killed run saved that step's checkpoint before its inference evaluation
    # (and may have died in it); what it logged is read back, and a run resumed at its end
    # still reports the end's results.
    writes = jax.process_index() == 0  # one process writes the files, as MetricsWriter
    resumed_at_eval = bool(consumed) and (start_step % eval_period == 0
                                          or start_step == total_steps)
    train_writer = MetricsWriter(model_dir / "train", restart_step=start_step + 1)
    if writes:
      summaries.truncate_metrics(model_dir / "train" / "metrics.jsonl", start_step)
    eval_writer, logged_eval, eval_again = None, None, False
    if train_eval_dataset_cfg is not None:
      eval_dir = model_dir / "training_eval" / train_eval_dataset_cfg.mixture_or_task_name
      if resumed_at_eval:
        logged_eval = summaries.logged_line(eval_dir / "metrics.jsonl", start_step)
      eval_again = ((start_step == 0 and total_steps > 0)
                    or (resumed_at_eval and not _agreed(logged_eval is not None)))
      if writes:
        summaries.truncate_metrics(eval_dir / "metrics.jsonl", start_step - eval_again)
      eval_writer = MetricsWriter(eval_dir, restart_step=start_step - eval_again + 1)
    infer_evaluator, logged_infer, infer_again = None, None, False
    if infer_eval_dataset_cfg is not None:
      infer_evaluator = _inference_evaluator(
          infer_eval_dataset_cfg, model=model, partitioner=partitioner,
          output_dir=model_dir / "inference_eval", mode=infer_eval_mode,
          num_examples=evaluator_num_examples, json_write_n_results=json_write_n_results)
    if infer_evaluator is not None:
      if resumed_at_eval:
        logged_infer = infer_evaluator.logged(start_step)
      infer_again = resumed_at_eval and not _agreed(logged_infer is not None)
      infer_evaluator.resume_after(start_step - infer_again)

    step_fn = partition_train_step(
        partitioner, make_train_step(model, tx, num_microbatches=num_microbatches,
                                     dropout_seed=random_seed, learning_rate_fn=learning_rate_fn),
        abstract["params"], opt_state)
    eval_fn = partitioner.partition(make_eval_step(model))
    # Each process reads the rows of the batch its devices hold (t5x's data layout).
    shard_index, num_shards = partitioner.data_layout(cfg.batch_size)
    ds = data_lib.get_dataset(cfg, shard_index=shard_index, num_shards=num_shards,
                              skip_batches=consumed)
    it = ds.as_numpy_iterator()

    eval_data = []  # the training evaluation's batches, kept when use_memory_cache

    def run_eval(step, params):
      if train_eval_dataset_cfg is None:
        return {}
      if eval_data:
        eds = eval_data[0]
      else:
        eds = data_lib.get_dataset(train_eval_dataset_cfg, shard_index=shard_index,
                                   num_shards=num_shards, num_epochs=1)
        if train_eval_dataset_cfg.use_memory_cache:  # read once, not at every evaluation
          eds = InMemoryBatches(eds, eval_steps)
          eval_data.append(eds)
      m = evaluate_loss(eval_fn, params, eds, partitioner, max_batches=eval_steps,
                        host_batch_size=train_eval_dataset_cfg.batch_size // num_shards)
      if not m:
        raise DataError(
            f"training evaluation on {train_eval_dataset_cfg.mixture_or_task_name!r} split "
            f"{train_eval_dataset_cfg.split!r} saw no target token: the split is empty; "
            "point TRAIN_EVAL_SPLIT at a split with examples, or set "
            "TRAIN_EVAL_MIXTURE_OR_TASK_NAME = None")
      eval_writer.write(step, m)
      log.info("eval step %d: %s", step, format_metrics(m))
      return m

    def save(step):
      checkpointer.save(step, params, opt_state,
                        {"step": step, "data_batches_consumed": step - first_step,
                         "mixture_or_task_name": cfg.mixture_or_task_name,
                         "vocab_sha256": vocab_digest})

    step = start_step
    last_train, last_eval, last_infer_eval = {}, {}, {}
    progress = Progress(start=start_step, total=total_steps, every=log_every, desc="train")
    tokens_per_batch = cfg.batch_size * length
    if peak_flops_per_second is None:
      kind = jax.devices()[0].device_kind
      peak_flops_per_second = device_peak_flops(kind, policy.compute_dtype)
      if peak_flops_per_second:
        log.info("MFU against %s's %s peak, %.0f TFLOP/s a device (PEAK_FLOPS_PER_SECOND "
                 "sets another)", kind, policy.compute_dtype, peak_flops_per_second / 1e12)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    flops_per_token = model_flops_per_token(model.config, num_params=n_params, length=length)
    if resumed_at_eval:
      last_train = summaries.logged_line(model_dir / "train" / "metrics.jsonl", start_step) or {}
      last_eval = logged_eval or {}
      last_infer_eval = logged_infer or {}
    if eval_again:
      last_eval = run_eval(start_step, params)
    if infer_again:
      last_infer_eval = infer_evaluator.evaluate(start_step, params)["metrics"]
    # Rates count the steps since the last log line (a resumed run need not start on the
    # LOG_EVERY grid) over the time spent training them: evaluations and checkpoint saves
    # in between are left out.
    t_last, logged_step, paused, ran = time.time(), step, 0.0, 0
    target_tokens = jnp.zeros([], jnp.float32)  # since the last log line, on the device
    while step < total_steps:
      batch = partitioner.shard_batch(next(it))
      params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.asarray(step))
      target_tokens = target_tokens + metrics["target_tokens"]
      step += 1
      ran += 1
      if step % log_every == 0 or step == total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        steps_done = step - logged_step
        dt = max(now - t_last - paused, 1e-9)
        metrics["steps_per_second"] = steps_done / dt
        metrics["tokens_per_second"] = steps_done * tokens_per_batch / dt
        metrics["target_tokens_per_second"] = float(target_tokens) / dt
        metrics["model_flops_per_second"] = flops_per_token * metrics["tokens_per_second"]
        if peak_flops_per_second:
          metrics["mfu"] = metrics["model_flops_per_second"] / (
              peak_flops_per_second * partitioner.mesh.devices.size)
        t_last, logged_step, paused = now, step, 0.0
        target_tokens = jnp.zeros([], jnp.float32)
        train_writer.write(step, metrics)
        last_train = metrics
        progress.update(step, {k: metrics[k] for k in ("loss", "accuracy")})
      else:
        progress.update(step, {})
      evaluates = (step % eval_period == 0 or step == total_steps) and (
          train_eval_dataset_cfg is not None or infer_evaluator is not None)
      periodic = checkpoint_cfg.saves_at(step, total_steps)
      stops = stop_after_steps is not None and ran >= stop_after_steps
      if evaluates or periodic or stops:
        # The steps still queued on the device count as training, not as the pause.
        jax.block_until_ready(params)
      t_pause = time.time()
      if evaluates:
        last_eval = run_eval(step, params) or last_eval
      if periodic:
        save(step)
      # After the save: a failure while decoding (memory, a metric's code) loses no step.
      if evaluates and infer_evaluator is not None:
        last_infer_eval = infer_evaluator.evaluate(step, params)["metrics"]
      paused += time.time() - t_pause
      if stops:
        if not periodic:
          save(step)
        break
    progress.close()
    return {"step": step, "train": last_train, "eval": last_eval,
            "infer_eval": last_infer_eval,
            "num_params": n_params, "param_partition_specs": _partition_specs(params)}
  finally:
    checkpointer.close()
