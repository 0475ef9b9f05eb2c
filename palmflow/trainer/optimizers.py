"""Optimizers and learning-rate schedules (t5x factor-style schedules, PaLM's Adafactor, AdamW).

All return optax objects; gin binds them by name in `gin/models/*.gin` (`OPTIMIZER`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay",
           "linear_decay", "cosine_decay")


def create_learning_rate_scheduler(*, factors: str = "constant * linear_warmup * rsqrt_decay",
                                   base_learning_rate: float = 1.0, warmup_steps: int = 10000,
                                   decay_steps: int = 100000,
                                   min_learning_rate: float = 0.0) -> Schedule:
  """A schedule that multiplies named factors, as t5x's `create_learning_rate_scheduler`.

  Args:
    factors: `*`-separated names from FACTORS.
    base_learning_rate: the `constant` factor.
    warmup_steps: linear warmup length; rsqrt decay starts after it.
    decay_steps: steps after warmup over which linear/cosine decay reach 0.
    min_learning_rate: a floor on the result.
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
    step = jnp.asarray(step, jnp.float32)
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
      elif n == "cosine_decay":
        lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
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
              epsilon: float = 1e-30) -> optax.GradientTransformation:
  """Adafactor with PaLM's settings by default (PaLM paper, section 5).

  Per step k = 1, 2, ... and parameter W with gradient G (after global-norm clipping):
    β2 = 1 - k^-decay_exponent (0 at k = 1, so the first step normalises by |G|)
    V = β2 V + (1 - β2) (G² + epsilon); factored into row and column means when W has two
        dimensions of at least `min_dim_size_to_factor` (`factored=False`: always full V)
    U = G / sqrt(V), clipped to RMS(U) <= clipping_threshold (update clipping 1.0)
    ΔW = -lr(k-1) · max(RMS(W), 1e-3) · U  (parameter scaling)
         - lr(k-1)^weight_decay_exponent · W  (decoupled weight decay)

  Args:
    learning_rate: a schedule (step -> lr, step counted from 0) or a constant.
    factored: factor the second moments of large matrices (PaLM: yes).
    decay_exponent: the 0.8 of β2 = 1 - k^-0.8.
    clipping_threshold: update clipping (RMS); None disables it.
    multiply_by_parameter_scale: scale the step by RMS(W) (at least 1e-3).
    momentum: first-moment decay (PaLM: none).
    weight_decay_exponent: decoupled weight decay at rate lr**exponent (PaLM: lr²); None
      disables it.
    global_norm_clip: clip the gradients' global norm first (PaLM: 1.0); None disables it.
    min_dim_size_to_factor: smaller matrices keep a full second moment.
    epsilon: added to G² (PaLM/t5x: 1e-30).
  Returns:
    The optax transformation (a chain: clip, adafactor, weight decay).
  """
  sched = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
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
