"""Optimizers and learning-rate schedules (t5x factor-style schedules, PaLM's Adafactor, AdamW).

All return optax objects; gin binds them by name in `gin/models/*.gin` (`OPTIMIZER`).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jax.Array], jax.Array]
FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay",
           "linear_decay", "cosine_decay", "decay_every")


def create_learning_rate_scheduler(*, factors: str = "constant * linear_warmup * rsqrt_decay",
                                   base_learning_rate: float = 1.0, warmup_steps: int = 10000,
                                   decay_steps: int = 100000,
                                   min_learning_rate: float = 0.0, decay_factor: float = 0.5,
                                   steps_per_decay: int = 20000,
                                   steps_per_cycle: int | None = None,
                                   step_offset: int = 0) -> Schedule:
  """A schedule that multiplies named factors, as t5x's `create_learning_rate_scheduler`
  (its argument names; `decay_steps` and a non-cyclic `linear_decay` and `cosine_decay` are
  palmflow's).

  Factors: constant (`base_learning_rate`); linear_warmup (min(1, step / warmup_steps));
  rsqrt_decay (1 / sqrt(max(step, warmup_steps))); rsqrt_normalized_decay (the same times
  sqrt(warmup_steps)); linear_decay and cosine_decay (from 1 to 0 over `decay_steps` after
  `warmup_steps`, then 0; cosine_decay with `steps_per_cycle` set is t5x's instead: cyclic,
  restarting every `steps_per_cycle` steps); decay_every (times `decay_factor` every
  `steps_per_decay` steps).

  Args:
    factors: `*`-separated names from FACTORS.
    base_learning_rate: the `constant` factor.
    warmup_steps: linear warmup length; rsqrt decay starts after it.
    decay_steps: steps after warmup over which linear/cosine decay reach 0.
    min_learning_rate: a floor on the result.
    decay_factor, steps_per_decay: decay_every's factor and period.
    steps_per_cycle: None, or t5x's cyclic cosine decay's period.
    step_offset: the steps count from this step (earlier steps are step 0).
  Returns:
    step -> learning rate.
  Raises:
    ValueError: an unknown factor name.
  """
  names = [f.strip() for f in factors.split("*") if f.strip()]
  for n in names:
    if n not in FACTORS:
      raise ValueError(f"unknown learning-rate factor {n!r}; known: {', '.join(FACTORS)}")

  def schedule(step):
    step = jnp.maximum(jnp.asarray(step, jnp.float32) - step_offset, 0.0)
    lr = jnp.asarray(1.0, jnp.float32)
    w = jnp.maximum(1.0, float(warmup_steps))
    progress = jnp.clip((step - warmup_steps) / max(1, decay_steps), 0.0, 1.0)
    for n in names:
      if n == "constant":
        lr = lr * base_learning_rate
      elif n == "linear_warmup":
        lr = lr * jnp.minimum(1.0, step / w)
      elif n == "rsqrt_decay":
        lr = lr / jnp.sqrt(jnp.maximum(step, w))
      elif n == "rsqrt_normalized_decay":
        lr = lr * jnp.sqrt(w) / jnp.sqrt(jnp.maximum(step, w))
      elif n == "linear_decay":
        lr = lr * (1.0 - progress)
      elif n == "cosine_decay" and steps_per_cycle:
        cycle = jnp.maximum(0.0, (step - warmup_steps) / float(steps_per_cycle)) % 1.0
        lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * cycle))
      elif n == "cosine_decay":
        lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
      elif n == "decay_every":
        lr = lr * decay_factor ** jnp.floor(step / max(1, steps_per_decay))
    return jnp.maximum(lr, min_learning_rate)
  return schedule


class _LrSquaredDecayState(NamedTuple):
  count: jax.Array


def decoupled_lr_squared_weight_decay(schedule: Schedule, *,
                                      exponent: float = 2.0) -> optax.GradientTransformation:
  """PaLM's weight decay: params shrink by lr(step)**exponent, added after the update."""
  def init(params):
    del params
    return _LrSquaredDecayState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    rate = schedule(state.count) ** exponent
    updates = jax.tree.map(lambda u, p: u - rate * p.astype(u.dtype), updates, params)
    return updates, _LrSquaredDecayState(state.count + 1)
  return optax.GradientTransformation(init, update)


def adafactor(*, learning_rate: Schedule | float, factored: bool = True,
              decay_exponent: float = 0.8, clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, momentum: float | None = None,
              weight_decay_exponent: float | None = 2.0,
              global_norm_clip: float | None = 1.0, min_dim_size_to_factor: int = 128,
              epsilon: float = 1e-30,
              stacked_layers_key: str | None = "layers",
              logical_factor_rules: Mapping[str, str] | None = None,
              param_axes: Any = None) -> optax.GradientTransformation:
  """Adafactor as PaLM (PaLM paper, section 5) and t5x use it; the defaults are t5x's, which
  differ from PaLM's in two settings: PaLM trained unfactored (`factored=False`) with
  momentum 0.9 (gin/models/palm_base.gin binds both).

  Per step k = 1, 2, ... and parameter W with gradient G (after global-norm clipping):
    β2 = 1 - k^-decay_exponent (0 at k = 1, so the first step normalises by |G|)
    V = β2 V + (1 - β2) (G² + epsilon); factored into row and column means when W has two
        dimensions of at least `min_dim_size_to_factor` (`factored=False`: always full V)
    U = G / sqrt(V), clipped to RMS(U) <= clipping_threshold (update clipping 1.0)
    ΔW = -lr(k-1) · max(RMS(W), 1e-3) · U  (parameter scaling)
         - lr(k-1)^weight_decay_exponent · W  (decoupled weight decay)

  Parameters stacked along a leading ``layers`` axis (the model's ``nn.scan`` puts every
  layer's matrices in one array) are a stack of separate matrices, as in PaLM, which does not
  stack them: their second moments are factored, their update clipped and scaled, per layer
  (t5x's Adafactor does the same where its ``logical_factor_rules`` map ``layers`` to
  ``batch``). Whole-array statistics would let one layer's large update shrink every
  other's, and scale each layer's step by the RMS of all of them.

  Which axes a second moment is factored over follows t5x's factor rules once the trainer
  has given the parameters' logical axis names (`with_param_axes`, which ``train`` calls):
  each logical axis is a ``row``, ``column``, ``batch`` or ``none`` axis
  (`T5X_FACTOR_RULES` by default, t5x's ``standard_logical_factor_rules``). A parameter
  with a ``batch`` axis (the stacked ``layers``) or more than two axes keeps per-``batch``
  statistics and, when it has both row and column axes, factors its second moment into
  the mean over the column axes and the mean over the row axes, whatever their sizes (the
  query kernel (layers, embed, heads, kv): [layers, embed] and [layers, heads, kv]).
  One with only rows or only columns (a norm's scale) keeps a full second moment. A
  parameter of one or two axes without a batch axis (the embedding) is factored by the
  size heuristic below, as in t5x. Without axis names (``param_axes`` None), the
  heuristic applies to every matrix, per layer below `stacked_layers_key`.

  Args:
    learning_rate: a schedule (step -> lr, step counted from 0) or a constant.
    factored: factor the second moments of large matrices (t5x: yes; PaLM: no, "without
      factorization").
    decay_exponent: the 0.8 of β2 = 1 - k^-0.8.
    clipping_threshold: update clipping (RMS); None disables it.
    multiply_by_parameter_scale: scale the step by RMS(W) (at least 1e-3).
    momentum: first-moment decay, without bias correction (t5x: none; PaLM: 0.9).
    weight_decay_exponent: decoupled weight decay at rate lr**exponent (PaLM: lr²); None
      disables it.
    global_norm_clip: clip the gradients' global norm first (PaLM: 1.0); None disables it.
    min_dim_size_to_factor: the size heuristic: a matrix whose second largest axis is
      smaller keeps a full second moment; otherwise its two largest axes are factored.
    epsilon: added to G² (PaLM/t5x: 1e-30).
    stacked_layers_key: without axis names, parameters below a dict key of this name have
      a leading axis of stacked layers (the model's scan is named ``layers``); None: every
      array is one matrix.
    logical_factor_rules: {logical axis name: "row" | "column" | "batch" | "none"}; None:
      `T5X_FACTOR_RULES`. Used with ``param_axes``.
    param_axes: the parameters' logical axis names (a tree of tuples or PartitionSpecs
      shaped like the parameters), normally given by `with_param_axes`.
  Returns:
    The optax transformation. Its state has the structure of `adafactor_chain`'s (optax's
    global-norm clip, optax's adafactor, the lr² decay), with the second moments of stacked
    parameters held per layer; its update computes the step in fewer passes over memory
    (`_adafactor_update`). Without stacked parameters (and without `param_axes`) both
    compute the same step.
  """
  settings = dict(learning_rate=learning_rate, factored=factored,
                  decay_exponent=decay_exponent, clipping_threshold=clipping_threshold,
                  multiply_by_parameter_scale=multiply_by_parameter_scale, momentum=momentum,
                  weight_decay_exponent=weight_decay_exponent,
                  global_norm_clip=global_norm_clip,
                  min_dim_size_to_factor=min_dim_size_to_factor, epsilon=epsilon)
  arguments = dict(settings, stacked_layers_key=stacked_layers_key,
                   logical_factor_rules=logical_factor_rules)
  chain = adafactor_chain(**settings)
  settings["schedule"] = _as_schedule(settings.pop("learning_rate"))
  rules = _factor_rules(T5X_FACTOR_RULES if logical_factor_rules is None
                        else logical_factor_rules)
  plan = functools.partial(_factor_plan, names=_names_by_path(param_axes), rules=rules,
                           stacked_key=stacked_layers_key, factored=factored,
                           min_dim_size_to_factor=min_dim_size_to_factor)

  def init(params):
    state = list(chain.init(params))
    index = 1 if global_norm_clip else 0
    inner = list(state[index])

    def moments(path, p):
      factors = plan(path, p).factors
      one = jnp.zeros((1,), p.dtype)
      if factors is None:
        return one, one, jnp.zeros_like(p)
      d1, d0 = factors
      drop = lambda axes: jnp.zeros(tuple(np.delete(p.shape, axes)), p.dtype)
      return drop(d0), drop(d1), one

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    vr, vc, v = zip(*[moments(path, p) for path, p in leaves]) if leaves else ((), (), ())
    unflat = lambda xs: jax.tree.unflatten(treedef, list(xs))
    inner[0] = inner[0]._replace(v_row=unflat(vr), v_col=unflat(vc), v=unflat(v))
    state[index] = tuple(inner)
    return tuple(state)

  def update(grads, state, params=None, **extra_args):
    del extra_args  # accepted as optax's chains accept them; Adafactor uses none
    if params is None:
      raise ValueError("adafactor needs the parameters (parameter scaling, weight decay).")
    return _adafactor_update(grads, state, params, plan=plan, **settings)
  tx = _Adafactor(init, update)
  tx.arguments, tx.plan = arguments, plan
  return tx


class _Adafactor(optax.GradientTransformation):
  """`adafactor`'s transformation; it remembers its arguments (for `with_param_axes`) and
  its ``plan(path, param)`` -> `_Plan` (which axes each moment keeps)."""
  arguments: dict
  plan: Callable


def factored_moment_axes(tx: optax.GradientTransformation, param_axes: Any) -> Callable | None:
  """For `adafactor` told `param_axes`: ``axes(param_path, param, moment)``, the parameter's
  axes that its ``v_row`` or ``v_col`` moment keeps, in order (None: the moment is a
  placeholder, the parameter keeps a full one). None for other optimizers."""
  if not isinstance(tx, _Adafactor):
    return None
  plan = with_param_axes(tx, param_axes).plan

  def axes(path, param, moment: str) -> tuple[int, ...] | None:
    factors = plan(path, param).factors
    if factors is None:
      return None
    dropped = factors[1] if moment == "v_row" else factors[0]
    return tuple(a for a in range(len(param.shape)) if a not in dropped)
  return axes


# t5x's standard_logical_factor_rules for the logical axes palmflow's models use.
T5X_FACTOR_RULES: dict[str, str] = {
    "vocab": "column", "embed": "row", "mlp": "column", "heads": "column", "kv": "column",
    "joined_kv": "column", "layers": "batch", "stack": "batch"}
_FACTOR_KINDS = ("row", "column", "batch", "none")


def with_param_axes(tx: optax.GradientTransformation,
                    param_axes: Any) -> optax.GradientTransformation:
  """`tx` told the parameters' logical axis names (t5x's ``set_param_axes``): an `adafactor`
  then factors by `T5X_FACTOR_RULES` (or its ``logical_factor_rules``). Other optimizers
  are returned as they are."""
  if not isinstance(tx, _Adafactor):
    return tx
  return adafactor(**dict(tx.arguments, param_axes=param_axes))


def _factor_rules(rules: Mapping[str, str]) -> dict[str, str]:
  out = {}
  for name, kind in dict(rules).items():
    kind = str(kind).lower()
    if kind not in _FACTOR_KINDS:
      raise ValueError(f"adafactor logical_factor_rules[{name!r}] = {kind!r}: use one of "
                       f"{', '.join(_FACTOR_KINDS)}")
    out[name] = kind
  return out


def _names_by_path(param_axes: Any) -> dict[str, tuple] | None:
  """{keystr(path): logical axis names} of a tree of names (None: no names)."""
  if param_axes is None:
    return None
  leaves = jax.tree_util.tree_flatten_with_path(
      param_axes, is_leaf=lambda x: isinstance(x, (tuple, jax.sharding.PartitionSpec)))[0]
  return {jax.tree_util.keystr(path): tuple(names) for path, names in leaves}


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.getLogger("palmflow.train").warning(message)


class _Plan(NamedTuple):
  """How one parameter's statistics are taken: `batch` axes keep their own statistics (the
  RMS of the update and of the parameter is over the other axes); `factors` is (d1, d0),
  the row axes and the column axes of a factored second moment (v_row: the mean of G² over
  d0; v_col: over d1), or None for a full one."""
  batch: tuple[int, ...]
  factors: tuple[tuple[int, ...], tuple[int, ...]] | None


def _factor_plan(path, leaf, *, names: dict[str, tuple] | None, rules: dict[str, str],
                 stacked_key: str | None, factored: bool,
                 min_dim_size_to_factor: int) -> _Plan:
  """The `_Plan` of the parameter at `path` (see `adafactor`)."""
  shape = tuple(getattr(leaf, "shape", ()))
  axes = None if names is None else names.get(jax.tree_util.keystr(path))
  if names is not None and (axes is None or len(axes) != len(shape)):
    _warn_once(f"adafactor: no logical axis names of {len(shape)} axes for parameter "
               f"{jax.tree_util.keystr(path)} (got {axes!r}): its moments are factored by "
               "size")
    axes = None
  if axes is None:
    nb = 0
    if stacked_key is not None and shape and any(
        getattr(k, "key", None) == stacked_key for k in path):
      nb = 1
    axes = _factored_axes(shape[nb:], factored, min_dim_size_to_factor)
    factors = None if axes is None else ((axes[0] + nb,), (axes[1] + nb,))
    return _Plan(tuple(range(nb)), factors)
  kinds = []
  for i, name in enumerate(axes):
    if name is not None and name not in rules:
      raise ValueError(
          f"adafactor: parameter {jax.tree_util.keystr(path)} axis {i} has logical name "
          f"{name!r}, which logical_factor_rules does not name; add it as row, column, "
          "batch or none")
    kinds.append("none" if name is None else rules[name])
  batch = tuple(i for i, k in enumerate(kinds) if k == "batch")
  if len(shape) <= 2 and not batch:  # t5x: matrices without a batch axis by size
    axes = _factored_axes(shape, factored, min_dim_size_to_factor)
    return _Plan((), None if axes is None else ((axes[0],), (axes[1],)))
  rows = tuple(i for i, k in enumerate(kinds) if k == "row")
  cols = tuple(i for i, k in enumerate(kinds) if k == "column")
  return _Plan(batch, (rows, cols) if factored and rows and cols else None)


def _as_schedule(learning_rate: Schedule | float) -> Schedule:
  return learning_rate if callable(learning_rate) else (lambda _: learning_rate)


def adafactor_chain(*, learning_rate: Schedule | float, factored: bool = True,
                    decay_exponent: float = 0.8, clipping_threshold: float | None = 1.0,
                    multiply_by_parameter_scale: bool = True, momentum: float | None = None,
                    weight_decay_exponent: float | None = 2.0,
                    global_norm_clip: float | None = 1.0, min_dim_size_to_factor: int = 128,
                    epsilon: float = 1e-30) -> optax.GradientTransformation:
  """`adafactor` as a chain of optax transformations (the reference its update is tested
  against, and whose state it keeps): `optax.clip_by_global_norm`, `optax.adafactor`,
  `decoupled_lr_squared_weight_decay`. Same arguments as `adafactor`."""
  sched = _as_schedule(learning_rate)
  parts = []
  if global_norm_clip:
    parts.append(optax.clip_by_global_norm(global_norm_clip))
  parts.append(optax.adafactor(learning_rate=sched, decay_rate=decay_exponent,
                               clipping_threshold=clipping_threshold,
                               multiply_by_parameter_scale=multiply_by_parameter_scale,
                               momentum=momentum, factored=factored,
                               min_dim_size_to_factor=min_dim_size_to_factor, eps=epsilon))
  if weight_decay_exponent:
    parts.append(decoupled_lr_squared_weight_decay(sched, exponent=weight_decay_exponent))
  return optax.chain(*parts)


def _factored_axes(shape: tuple[int, ...], factored: bool,
                   min_dim_size_to_factor: int) -> tuple[int, int] | None:
  """(d1, d0) of a factored second moment, as optax chooses them: the second largest and the
  largest axis (``v_row`` averages G² over d0, ``v_col`` over d1), or None when the second
  largest is under the minimum."""
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def _adafactor_update(grads, state, params, *, schedule, global_norm_clip, decay_exponent,
                      clipping_threshold, multiply_by_parameter_scale, momentum,
                      weight_decay_exponent, factored, min_dim_size_to_factor, epsilon,
                      plan):
  """One step of `adafactor`'s chain, on its state, in as few passes over memory as it needs.

  ``plan(path, leaf)`` is the leaf's `_Plan`: its factoring, update clipping and parameter
  scale are per index of its batch axes (per layer of a stack).

  The chain of optax transformations materialises or re-reads the update between its links
  (a global-norm select, the second moments, the update's RMS, the parameters' RMS, the
  learning rate, the decay). On palm_small's 38M parameters (2-core CPU) its update took
  123-146 ms, where one pass ``p - lr * g`` takes 13-15 ms; this one takes 58-65 ms. Here the
  clipping factor s is applied to the moments' reductions of G² after them (``s (s
  mean(G²))``) instead of to G before, a factored matrix's update is formed anew inside
  each reduction and in the final expression, and the result (new parameters minus old)
  is one elementwise expression of G, W and small vectors that XLA fuses with
  `optax.apply_updates`. For a factored matrix XLA then writes out nothing of its size but
  the new parameters (and a momentum, with one); the tests check it.
  """
  clip_state = ()
  rest = list(state)
  if global_norm_clip:
    clip_state = (rest.pop(0),)
  inner = list(rest.pop(0))
  decay_state = tuple(rest)
  fstate = inner[0]
  lr_index = 1 + (clipping_threshold is not None)
  lr_state = inner[lr_index]
  ema_index = lr_index + 1 + bool(multiply_by_parameter_scale) if momentum is not None else None

  scale = None  # global-norm clipping factor, None when not clipped
  if global_norm_clip:
    norm = optax.tree.norm(grads)
    scale = jnp.where(norm < global_norm_clip, 1.0, global_norm_clip / norm)
  beta = 1.0 - jnp.asarray(fstate.count + 1, jnp.float32) ** (-decay_exponent)
  lr = schedule(lr_state.count)
  decay_rate = None
  if weight_decay_exponent:
    decay_rate = jnp.asarray(schedule(decay_state[0].count)) ** weight_decay_exponent

  leaves, treedef = jax.tree.flatten(grads)
  p_with_paths = treedef.flatten_up_to(
      jax.tree.unflatten(treedef, jax.tree_util.tree_flatten_with_path(params)[0]))
  p_paths = [path for path, _ in p_with_paths]
  p_leaves = [p for _, p in p_with_paths]
  vr_leaves = treedef.flatten_up_to(fstate.v_row)
  vc_leaves = treedef.flatten_up_to(fstate.v_col)
  v_leaves = treedef.flatten_up_to(fstate.v)
  m_leaves = (treedef.flatten_up_to(inner[ema_index].ema) if ema_index is not None
              else [None] * len(leaves))
  out_u, out_vr, out_vc, out_v, out_m = [], [], [], [], []
  # On a CPU, each reduction over a factored matrix reads its own alias of G (one barrier
  # over a tuple: no copy, and XLA cannot merge the aliases back), and the update is formed
  # separately in each reduction and in the final expression. Otherwise XLA shares one G²
  # or one outer product of the factors between them and writes it out in full first (each
  # such array of palm_small's MLP kernels costs ~3 ms more per step). Accelerators fuse
  # sibling reductions themselves.
  on_cpu = jax.default_backend() == "cpu"
  for path, g, p, vr, vc, v, m in zip(p_paths, leaves, p_leaves, vr_leaves, vc_leaves,
                                     v_leaves, m_leaves):
    dtype = p.dtype
    leaf_plan = plan(path, p)
    # The axes of one matrix: statistics over all of them when the leaf is one matrix.
    per = tuple(i for i in range(p.ndim) if i not in leaf_plan.batch)
    keep = dict(axis=per if leaf_plan.batch else None, keepdims=bool(leaf_plan.batch))
    per_size = int(np.prod([p.shape[i] for i in per], dtype=np.int64))
    s = None if scale is None else scale.astype(g.dtype)
    clipped = (lambda x: x) if s is None else (lambda x: x * s)

    def clipped_mean_square(x, axis):
      """mean((s G)²) over `axis`, as s (s mean(G²)): s stays outside the reduction (XLA
      would write a broadcast s out in full first), and in that order s² cannot underflow.
      G² can overflow only where |G| overflows the global norm, which makes s 0."""
      m = jnp.mean(jnp.square(x), axis=axis)
      return m if s is None else jnp.where(s > 0, (s * m) * s, 0.0).astype(m.dtype)

    if leaf_plan.factors is not None:
      d1, d0 = leaf_plan.factors  # the row axes, the column axes
      aliases = list(jax.lax.optimization_barrier((g,) * 3) if on_cpu else (g,) * 3)
      # mean((s G)² + ε) over axes = mean((s G)²) + ε: one reduction per side.
      new_vr = beta * vr + (1 - beta) * (clipped_mean_square(aliases.pop(), d0) + epsilon)
      new_vc = beta * vc + (1 - beta) * (clipped_mean_square(aliases.pop(), d1) + epsilon)
      new_vr, new_vc = new_vr.astype(dtype), new_vc.astype(dtype)
      reduced = tuple(d - sum(e < d for e in d0) for d in d1)  # d1's axes in v_row
      row = jnp.expand_dims(
          jax.lax.rsqrt(new_vr / jnp.mean(new_vr, axis=reduced, keepdims=True)), d0)
      col = jnp.expand_dims(jax.lax.rsqrt(new_vc), d1)
      u = clipped(g) * row * col
      # A YNNPACK reduction takes the broadcast of a vector computed in it inline (the
      # squares of the factors, s times a factor) but writes a bare broadcast (a factor
      # alone, the scalar s) out in full first. s multiplies G inside the square, so that
      # nothing overflows for a tiny s.
      g_for_rms = aliases.pop()
      if s is None:
        sum_u_squared = lambda: jnp.sum(
            jnp.square(g_for_rms) * jnp.square(row) * jnp.square(col), dtype=jnp.float32,
            **keep)
      else:
        sum_u_squared = lambda: jnp.sum(
            jnp.square(g_for_rms * (row * s)) * jnp.square(col), dtype=jnp.float32, **keep)
      new_v = v
    else:
      new_v = (beta * v + (1 - beta) * (jnp.square(clipped(g)) + epsilon)).astype(dtype)
      u = clipped(g) * jax.lax.rsqrt(new_v)
      # The RMS of this u itself, which XLA then writes out once. (From an alias, s would
      # have to be broadcast inside the reduction, which XLA writes out in full too, or
      # factored out as 1/s², which overflows for tiny s.) One more pass over the parameter.
      sum_u_squared = lambda: jnp.sum(jnp.square(u), dtype=jnp.float32, **keep)
      new_vr, new_vc = vr, vc
    if clipping_threshold is not None:  # the RMS in float32 whatever the parameters' dtype
      rms = jnp.sqrt(sum_u_squared() / per_size)
      u = u / jnp.maximum(1.0, rms / clipping_threshold).astype(u.dtype)
    u = u * jnp.asarray(lr, u.dtype)
    if multiply_by_parameter_scale:
      u = u * _rms_at_least(p, 1e-3, **keep).astype(u.dtype)
    if momentum is not None:
      u = momentum * m + (1 - momentum) * u
      out_m.append(u)
    u = -u
    if decay_rate is not None:
      u = u - decay_rate * p.astype(u.dtype)  # as the chain: float32 rate, promoted
    out_u.append(u)
    out_vr.append(new_vr)
    out_vc.append(new_vc)
    out_v.append(new_v)

  unflat = lambda xs: jax.tree.unflatten(treedef, xs)
  inc = optax.safe_increment
  inner[0] = fstate._replace(count=inc(fstate.count), v_row=unflat(out_vr),
                             v_col=unflat(out_vc), v=unflat(out_v))
  inner[lr_index] = lr_state._replace(count=inc(lr_state.count))
  if ema_index is not None:
    ema = inner[ema_index]
    inner[ema_index] = ema._replace(count=inc(ema.count), ema=unflat(out_m))
  if decay_state:
    decay_state = (decay_state[0]._replace(count=inc(decay_state[0].count)),)
  return unflat(out_u), clip_state + (tuple(inner),) + decay_state


def _rms_at_least(x: jax.Array, floor: float, axis=None, keepdims: bool = False) -> jax.Array:
  """max(RMS(x), floor) (over `axis`): `optax.safe_root_mean_squares`'s value without its
  gradient-safe select over x, which XLA:CPU writes out in full (a pass per parameter per
  step)."""
  return jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=keepdims)), floor)


def adamw(*, learning_rate: Schedule | float, b1: float = 0.9, b2: float = 0.99,
          eps: float = 1e-8, weight_decay: float = 0.0,
          global_norm_clip: float | None = 1.0) -> optax.GradientTransformation:
  """AdamW (bias-corrected Adam plus decoupled weight decay lr · weight_decay · W) after
  optional global-norm gradient clipping.

  Args:
    learning_rate: a schedule or a constant.
    b1, b2, eps: Adam's moment decays and denominator epsilon.
    weight_decay: decoupled weight decay coefficient (multiplied by the learning rate).
    global_norm_clip: clip the gradients' global norm first; None disables it.
  Returns:
    The optax transformation.
  """
  parts = []
  if global_norm_clip:
    parts.append(optax.clip_by_global_norm(global_norm_clip))
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


def start_schedules_at(opt_state, step: int):
  """`opt_state` with its learning-rate schedules' step counts set to `step`.

  For fine-tuning from a step-N checkpoint with a fresh optimizer state: the schedule (and
  the lr² weight decay that follows it) continue at the absolute step N, as t5x's schedules
  do and as the trainer logs `learning_rate`, instead of warming up from 0 again. The
  statistics' own counts (Adafactor's β2 = 1 - k^-0.8, Adam's bias correction, momentum)
  stay at 0: their moments are new.
  """
  def reset(node):
    if isinstance(node, (optax.ScaleByScheduleState, _LrSquaredDecayState)):
      return node._replace(count=jnp.full_like(node.count, step))
    return node
  return jax.tree.map(reset, opt_state, is_leaf=lambda n: isinstance(
      n, (optax.ScaleByScheduleState, _LrSquaredDecayState)))
