"""Token-level cross-entropy with label smoothing and z-loss, with t5x semantics.

Per target token with vocabulary size V, label smoothing ``ls`` and z-loss weight ``z``::

    confidence = 1 - ls;  low = ls / (V - 1)
    soft = one_hot(target) * confidence + (1 - one_hot(target)) * low
    log_z = logsumexp(logits)
    xent = -sum(soft * (logits - log_z)) - normalizing_constant
    z_term = z * log_z ** 2
    normalizing_constant = -(confidence * log(confidence) + (V - 1) * low * log(low))

so a prediction equal to the smoothed target distribution has cross-entropy 0. The batch loss
is ``sum(weights * (xent + z_term)) / normalizer``.

Local check::

    python -c "import jax.numpy as jnp; from palmflow.trainer import losses; \
print(losses.cross_entropy_loss(jnp.zeros((1, 3, 8)), jnp.ones((1, 3), jnp.int32)))"
"""

from __future__ import annotations

import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class LossNormalizingFactor(str, enum.Enum):
  """Named normalizers of the summed token loss (t5x's ``SpecialLossNormalizingFactor``)."""

  NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
  """Divide by ``sum(weights)``: the mean loss per real (non-padding) target token."""
  NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"
  """Divide by ``batch * length``, padding included."""
  AVERAGE_PER_SEQUENCE = "AVERAGE_PER_SEQUENCE"
  """Average the loss within each sequence, then over the sequences that have any target."""


def _token_weights(weights: Array, factor: Any) -> tuple[Array, Array]:
  """Turns ``loss_normalizing_factor`` into per-token weights and a denominator."""
  if factor is None:
    factor = LossNormalizingFactor.NUM_REAL_TARGET_TOKENS
  if isinstance(factor, str):
    try:
      factor = LossNormalizingFactor(factor.upper())
    except ValueError:
      names = ", ".join(f.value for f in LossNormalizingFactor)
      raise ValueError(
          f"Unknown loss_normalizing_factor {factor!r}; expected a number, None or one "
          f"of: {names}.") from None
  if factor == LossNormalizingFactor.NUM_REAL_TARGET_TOKENS:
    return weights, jnp.sum(weights)
  if factor == LossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS:
    return weights, jnp.asarray(weights.size, jnp.float32)
  if factor == LossNormalizingFactor.AVERAGE_PER_SEQUENCE:
    per_sequence = jnp.sum(weights, axis=-1, keepdims=True)
    scaled = weights / jnp.where(per_sequence > 0, per_sequence, 1.0)
    return scaled, jnp.sum(per_sequence > 0).astype(jnp.float32)
  if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number, jax.Array)):
    raise ValueError(
        f"loss_normalizing_factor must be a number, None or a LossNormalizingFactor name; "
        f"got {factor!r}.")
  return weights, jnp.asarray(factor, jnp.float32)


def cross_entropy_loss(
    logits: Array,
    targets: Array,
    *,
    weights: Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 1e-4,
    loss_normalizing_factor: float | str | LossNormalizingFactor | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
  """Label-smoothed cross-entropy plus z-loss, summed over tokens and normalised.

  Args:
      logits: [..., vocab] unnormalised scores (computed in float32).
      targets: [...] integer target ids.
      weights: [...] per-token weights, 0 on padding; default all ones.
      label_smoothing: probability mass moved from the target to the other V-1 ids, in [0, 1).
      z_loss: coefficient of ``log(Z) ** 2`` (PaLM: 1e-4), pushing log-normalisers to 0.
      loss_normalizing_factor: None or "NUM_REAL_TARGET_TOKENS" divides by ``sum(weights)``;
          "NUM_TOTAL_TARGET_TOKENS" by the number of target positions; "AVERAGE_PER_SEQUENCE"
          averages within sequences, then over sequences; a number divides by that number.

  Returns:
      ``(total_loss, z_loss_part, stats)``: the normalised loss (cross-entropy + z-loss), the
      normalised z-loss part of it, and a dict of sums over tokens for metrics:
      ``cross_ent_loss_sum`` (weighted, without z-loss), ``z_loss_sum``,
      ``accuracy_numerator`` (weighted count of argmax == target), ``accuracy_denominator``
      (sum of weights) and ``normalizing_factor``.

  Raises:
      ValueError: for mismatched shapes, a label smoothing outside [0, 1) or an unknown
          normalizing factor.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
        f"logits {logits.shape} must be targets {targets.shape} plus a vocab axis.")
  if weights is not None and weights.shape != targets.shape:
    raise ValueError(f"weights {weights.shape} must have the shape of targets "
                     f"{targets.shape}.")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  weights = (jnp.ones(targets.shape, jnp.float32) if weights is None
             else weights.astype(jnp.float32))

  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab - 1) if vocab > 1 else 0.0
  normalizing_constant = -confidence * np.log(confidence)
  if low_confidence > 0:
    normalizing_constant -= (vocab - 1) * low_confidence * np.log(low_confidence)

  log_z = jax.nn.logsumexp(logits, axis=-1)
  # The target's logit by a compare-and-select over the vocabulary rather than a gather: its
  # gradient is then elementwise and fuses, where a gather's is a scatter into a
  # zero-filled [..., vocab] array (several passes over the largest array of the step).
  ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  is_target = ids == targets[..., None].astype(jnp.int32)
  target_log_prob = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1) - log_z
  # sum(soft * log_probs) without materialising the one-hot soft targets.
  expected = (confidence - low_confidence) * target_log_prob
  if low_confidence > 0:
    expected += low_confidence * (jnp.sum(logits, axis=-1) - vocab * log_z)
  xent = -expected - normalizing_constant
  z_term = z_loss * jnp.square(log_z)

  token_weights, denominator = _token_weights(weights, loss_normalizing_factor)
  denominator = jnp.where(denominator > 0, denominator, 1.0)
  xent_sum = jnp.sum(xent * token_weights)
  z_sum = jnp.sum(z_term * token_weights)
  total_loss = (xent_sum + z_sum) / denominator
  z_part = z_sum / denominator

  # argmax (the first maximal id) as a max and a float min, two plain reductions that fuse:
  # XLA:CPU runs the (value, index) reduction of jnp.argmax ~4x slower. Float ids are exact
  # below 2**24.
  top = jax.lax.stop_gradient(logits)
  best = jnp.max(top, axis=-1, keepdims=True)
  float_ids = jax.lax.broadcasted_iota(jnp.float32, logits.shape, logits.ndim - 1)
  argmax = jnp.min(jnp.where(top == best, float_ids, float(vocab)), axis=-1)
  correct = (argmax == targets).astype(jnp.float32)
  stats = {
      "cross_ent_loss_sum": jnp.sum(xent * weights),
      "z_loss_sum": jnp.sum(z_term * weights),
      "accuracy_numerator": jnp.sum(correct * weights),
      "accuracy_denominator": jnp.sum(weights),
      "normalizing_factor": denominator,
  }
  return total_loss, z_part, stats
