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

import dataclasses
import enum
import functools
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
  """Average the loss within each sequence, then over the sequences that have any target.
  In packed rows (with segment ids) a sequence is a document segment, as in t5x."""


def _token_weights(weights: Array, factor: Any,
                   segment_ids: Array | None = None) -> tuple[Array, Array]:
  """Turns ``loss_normalizing_factor`` into per-token weights and a denominator.

  None is t5x's None: no normalisation, the summed token loss (t5x's T5 1.1 configs train
  so); palmflow's default is "NUM_REAL_TARGET_TOKENS", the mean per real target token.
  """
  if factor is None:
    return weights, jnp.asarray(1.0, jnp.float32)
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
    if segment_ids is None:
      per_sequence = jnp.sum(weights, axis=-1, keepdims=True)
      scaled = weights / jnp.where(per_sequence > 0, per_sequence, 1.0)
      return scaled, jnp.sum(per_sequence > 0).astype(jnp.float32)
    # Packed rows: each (row, segment) is a sequence. Segment ids are < length + 1.
    length = weights.shape[-1]
    rows = jnp.arange(weights.size // length).reshape(weights.shape[:-1] + (1,))
    ids = (rows * (length + 1) + segment_ids.astype(jnp.int32)).reshape(-1)
    num = weights.size // length * (length + 1)
    sums = jax.ops.segment_sum(weights.reshape(-1), ids, num_segments=num)
    per_token = sums[ids].reshape(weights.shape)
    scaled = weights / jnp.where(per_token > 0, per_token, 1.0)
    return scaled, jnp.sum(sums > 0).astype(jnp.float32)
  if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number, jax.Array)):
    raise ValueError(
        f"loss_normalizing_factor must be a number, None or a LossNormalizingFactor name; "
        f"got {factor!r}.")
  return weights, jnp.asarray(factor, jnp.float32)


def _checked_weights(targets: Array, weights: Array | None, label_smoothing: float,
                     factor: Any, segment_ids: Array | None = None
                     ) -> tuple[Array, Array, Array]:
  """Checks ``weights`` and ``label_smoothing``; returns the float32 weights, the per-token
  weights of ``factor`` and its (non-zero) denominator."""
  if weights is not None and weights.shape != targets.shape:
    raise ValueError(f"weights {weights.shape} must have the shape of targets "
                     f"{targets.shape}.")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
  weights = (jnp.ones(targets.shape, jnp.float32) if weights is None
             else weights.astype(jnp.float32))
  token_weights, denominator = _token_weights(weights, factor, segment_ids)
  return weights, token_weights, jnp.where(denominator > 0, denominator, 1.0)


def _smoothing(label_smoothing: float, vocab: int) -> tuple[float, float, float]:
  """(target probability, every other id's probability, normalizing constant) of the
  smoothed targets (see the module docstring)."""
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab - 1) if vocab > 1 else 0.0
  normalizing_constant = -confidence * np.log(confidence)
  if low_confidence > 0:
    normalizing_constant -= (vocab - 1) * low_confidence * np.log(low_confidence)
  return confidence, low_confidence, normalizing_constant


def _first_argmax(logits: Array, top: Array) -> Array:
  """The first id whose logit is ``top`` (the max, keepdims), over the last axis.

  A max and a float min, two plain reductions that fuse: XLA:CPU runs the (value, index)
  reduction of jnp.argmax ~4x slower. Float ids are exact below 2**24.
  """
  float_ids = jax.lax.broadcasted_iota(jnp.float32, logits.shape, logits.ndim - 1)
  return jnp.min(jnp.where(logits == top, float_ids, float(logits.shape[-1])), axis=-1)


def cross_entropy_loss(
    logits: Array,
    targets: Array,
    *,
    weights: Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 1e-4,
    loss_normalizing_factor: float | str | LossNormalizingFactor | None = (
        LossNormalizingFactor.NUM_REAL_TARGET_TOKENS),
    segment_ids: Array | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
  """Label-smoothed cross-entropy plus z-loss, summed over tokens and normalised.

  Args:
      logits: [..., vocab] unnormalised scores (computed in float32).
      targets: [...] integer target ids.
      weights: [...] per-token weights, 0 on padding; default all ones.
      label_smoothing: probability mass moved from the target to the other V-1 ids, in [0, 1).
      z_loss: coefficient of ``log(Z) ** 2`` (PaLM: 1e-4), pushing log-normalisers to 0.
      loss_normalizing_factor: "NUM_REAL_TARGET_TOKENS" (default) divides by
          ``sum(weights)``; "NUM_TOTAL_TARGET_TOKENS" by the number of target positions;
          "AVERAGE_PER_SEQUENCE" averages within sequences, then over sequences; a number
          divides by that number; None (as in t5x) does not divide: the summed loss.
      segment_ids: [...] document ids of packed rows (0 on padding): "AVERAGE_PER_SEQUENCE"
          then averages per document, as t5x does.

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
  weights, token_weights, denominator = _checked_weights(
      targets, weights, label_smoothing, loss_normalizing_factor, segment_ids)
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  confidence, low_confidence, normalizing_constant = _smoothing(label_smoothing, vocab)

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

  xent_sum = jnp.sum(xent * token_weights)
  z_sum = jnp.sum(z_term * token_weights)
  total_loss = (xent_sum + z_sum) / denominator
  z_part = z_sum / denominator

  top = jax.lax.stop_gradient(logits)
  argmax = _first_argmax(top, jnp.max(top, axis=-1, keepdims=True))
  correct = (argmax == targets).astype(jnp.float32)
  stats = {
      "cross_ent_loss_sum": jnp.sum(xent * weights),
      "z_loss_sum": jnp.sum(z_term * weights),
      "accuracy_numerator": jnp.sum(correct * weights),
      "accuracy_denominator": jnp.sum(weights),
      "normalizing_factor": denominator,
  }
  return total_loss, z_part, stats


def _chunk_length(batch: int, length: int, chunk_tokens: int) -> int:
  """The largest divisor of `length` with at most `chunk_tokens` tokens a chunk of positions
  over the whole batch (at least 1 position); the whole length when the best divisor is
  under a quarter of that (a prime length would otherwise loop once a position)."""
  want = max(1, chunk_tokens // max(1, batch))
  if want >= length:
    return length
  best = max(d for d in range(1, length + 1) if length % d == 0 and d <= want)
  return best if 4 * best >= want else length


def projected_cross_entropy_loss(
    hidden: Array,
    kernel: Array,
    targets: Array,
    *,
    weights: Array | None = None,
    vocab_major: bool = True,
    scale: float = 1.0,
    dtype: Any = jnp.float32,
    label_smoothing: float = 0.0,
    z_loss: float = 1e-4,
    loss_normalizing_factor: float | str | LossNormalizingFactor | None = (
        LossNormalizingFactor.NUM_REAL_TARGET_TOKENS),
    chunk_tokens: int = 512,
    segment_ids: Array | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
  """`cross_entropy_loss` of the output projection's logits, without materialising them.

  The logits are ``scale * hidden @ kernel^T`` (``kernel`` [vocab, embed], ``vocab_major``:
  a shared embedding) or ``scale * hidden @ kernel`` ([embed, vocab]). They are computed a
  chunk of positions at a time (about `chunk_tokens` tokens of the batch), and when
  differentiated, each chunk's gradient is taken at once from its logits: softmax minus the
  smoothed targets, then the two products into the hidden states' and the kernel's
  gradients. No [batch, length, vocab] array is ever stored (the largest of a training step:
  268 MB of float32 logits, then as many for their gradient, for palm_small), and a chunk's
  logits are still in cache when they are used again.

  Products take ``dtype`` operands and accumulate in float32, as `models.matmul` does
  (a float32 logit gradient under float16). Only the total loss is differentiable: the
  z-loss part and the stats are for metrics. With the batch sharded over devices, the
  kernel gradient's partial sums are all-reduced once a chunk (the chunk loop carries
  them), so `lm.DecoderOnlyModel` uses it on one device by default.

  Args:
      hidden: [batch, length, embed] final hidden states (after the final norm).
      kernel: [vocab, embed] (``vocab_major``) or [embed, vocab] output weights.
      targets, weights, label_smoothing, z_loss, loss_normalizing_factor, segment_ids: as
          for `cross_entropy_loss`.
      scale: multiplies the logits (PaLM's shared embedding: ``1 / sqrt(d_model)``).
      dtype: the products' operand dtype.
      chunk_tokens: tokens of the batch a chunk of positions holds at most.

  Returns:
      What `cross_entropy_loss` returns for the same logits.
  """
  batch, length, _ = hidden.shape
  if targets.shape != (batch, length):
    raise ValueError(f"targets {targets.shape} must be hidden {hidden.shape} without its "
                     "embed axis.")
  weights, token_weights, denominator = _checked_weights(
      targets, weights, label_smoothing, loss_normalizing_factor, segment_ids)
  vocab = kernel.shape[0] if vocab_major else kernel.shape[1]
  settings = _Projection(vocab_major=vocab_major, scale=float(scale),
                         dtype=jnp.dtype(dtype).name, vocab=vocab,
                         label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                         chunk=_chunk_length(batch, length, chunk_tokens))
  sums = _projected_sums(settings, hidden, kernel, targets.astype(jnp.int32),
                         token_weights / denominator, weights)
  total, z_part, xent_sum, z_sum, correct = sums
  stats = {
      "cross_ent_loss_sum": xent_sum,
      "z_loss_sum": z_sum,
      "accuracy_numerator": correct,
      "accuracy_denominator": jnp.sum(weights),
      "normalizing_factor": denominator,
  }
  return total, z_part, stats


@dataclasses.dataclass(frozen=True)
class _Projection:
  """The static settings of `projected_cross_entropy_loss` (hashable, for `custom_vjp`)."""

  vocab_major: bool
  scale: float
  dtype: str
  vocab: int
  label_smoothing: float
  z_loss: float
  chunk: int


def _chunked(x: Array, chunk: int) -> Array:
  """[batch, length, ...] -> [length // chunk, batch, chunk, ...]."""
  b, n = x.shape[:2]
  return jnp.swapaxes(x.reshape(b, n // chunk, chunk, *x.shape[2:]), 0, 1)


def _unchunked(x: Array) -> Array:
  """The inverse of `_chunked`."""
  n, b, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _projected_pass(s: _Projection, hidden, kernel, targets, scaled_weights, weights,
                    with_grad: bool):
  """The per-chunk loop: the five sums, and with `with_grad` the gradients of the first
  (the normalised total loss) for `hidden` and `kernel`."""
  from palmflow.trainer.models import _mm, _transposed
  dtype = jnp.dtype(s.dtype)
  grad_dtype = jnp.float32 if dtype == jnp.float16 else dtype
  k = kernel.astype(dtype)
  kg = kernel.astype(grad_dtype)
  conf, low, const = _smoothing(s.label_smoothing, s.vocab)
  d = hidden.shape[-1]
  on_cpu = jax.default_backend() == "cpu"

  def body(dk, chunk):
    h, t, sw, w = chunk                                   # [b, c, d], [b, c] x3
    rows = h.shape[0] * h.shape[1]
    h = h.reshape(rows, d).astype(dtype)
    t, sw, w = t.reshape(rows), sw.reshape(rows), w.reshape(rows)
    # The scale is applied after the reductions that commute with it (max, sum, the target's
    # logit), so they read the product's output itself: on a CPU, a reduction over a scaled
    # copy (or a select of the target) writes that copy out first, a full [rows, vocab]
    # float32 pass each. The max is the same: rounding is monotonic.
    scale = np.float32(s.scale)
    raw = _mm(h, k, s.vocab_major)                                     # [rows, vocab]
    logits = raw * scale
    top = jnp.max(raw, axis=-1, keepdims=True) * scale
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    log_z = (top + jnp.log(total))[:, 0]
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    is_target = ids == t[:, None]
    target_logit = jnp.take_along_axis(raw, t[:, None], axis=-1, mode="clip")[:, 0] * scale
    xent = -(conf - low) * (target_logit - log_z) - const
    if low > 0:
      xent -= low * (jnp.sum(raw, axis=-1) * scale - s.vocab * log_z)
    z_term = s.z_loss * jnp.square(log_z)
    argmax = _first_argmax(logits, top)
    sums = (jnp.sum(sw * (xent + z_term)), jnp.sum(sw * z_term), jnp.sum(w * xent),
            jnp.sum(w * z_term), jnp.sum(w * (argmax == t)))
    if not with_grad:
      return dk, (sums, None)
    # d total / d logits: softmax (1 + 2 z log_z) - (conf - low) onehot - low, per token
    # weight; times the scale, into both products.
    g = (e / total) * (1.0 + 2.0 * s.z_loss * log_z)[:, None]
    g = g - jnp.where(is_target, conf - low, 0.0) - low
    g = (g * (sw * np.float32(s.scale))[:, None]).astype(grad_dtype)
    dh = _mm(g, kg, not s.vocab_major).astype(grad_dtype)             # [rows, d]
    hg = h.astype(grad_dtype)
    if on_cpu:  # [d, vocab] = h^T g, the smaller operand transposed (see models.matmul)
      dk = dk + _mm(_transposed(hg), g, False)
    else:
      dk = dk + jax.lax.dot_general(hg, g, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
    return dk, (sums, dh.reshape(chunk[0].shape[:2] + (d,)))

  xs = (_chunked(hidden, s.chunk), _chunked(targets, s.chunk),
        _chunked(scaled_weights, s.chunk), _chunked(weights, s.chunk))
  dk0 = jnp.zeros((d, s.vocab), jnp.float32) if with_grad else jnp.zeros((), jnp.float32)
  dk, (sums, dh) = jax.lax.scan(body, dk0, xs)
  sums = tuple(jnp.sum(x) for x in sums)
  if not with_grad:
    return sums, None
  if s.vocab_major:  # [d, vocab] -> [vocab, d]; the barrier keeps the transpose a copy
    dk = jnp.swapaxes(jax.lax.optimization_barrier(dk), 0, 1)
  return sums, (_unchunked(dh), dk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _projected_sums(s, hidden, kernel, targets, scaled_weights, weights):
  return _projected_pass(s, hidden, kernel, targets, scaled_weights, weights, False)[0]


def _projected_sums_fwd(s, hidden, kernel, targets, scaled_weights, weights):
  sums, (dh, dk) = _projected_pass(s, hidden, kernel, targets, scaled_weights, weights,
                                   True)
  # dh stays in the gradient dtype until scaled (under float16, float32: a loss-scaled
  # cotangent would overflow float16, an unscaled gradient underflow it); the empty arrays
  # carry the dtypes the gradients go back in.
  return sums, (dh, dk, jnp.zeros((0,), hidden.dtype), jnp.zeros((0,), kernel.dtype))


def _projected_sums_bwd(s, residuals, cotangents):
  del s
  dh, dk, hidden_like, kernel_like = residuals
  g = cotangents[0].astype(jnp.float32)  # only the total loss is differentiable
  return ((dh.astype(jnp.float32) * g).astype(hidden_like.dtype),
          (dk * g).astype(kernel_like.dtype), None, None, None)


_projected_sums.defvjp(_projected_sums_fwd, _projected_sums_bwd)
