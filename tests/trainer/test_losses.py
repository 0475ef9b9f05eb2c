"""Tests of the cross-entropy loss against a direct numpy transcription of t5x's semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palmflow.trainer import losses


def _reference(logits, targets, weights, label_smoothing, z_loss):
  """Per-token (cross-entropy, z-term), written with explicit one-hot soft targets."""
  logits = np.asarray(logits, np.float64)
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  soft = np.full(logits.shape, low)
  np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  log_probs = logits - log_z[..., None]
  constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
  xent = -np.sum(soft * log_probs, axis=-1) - constant
  return xent * weights, z_loss * log_z ** 2 * weights


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 5))
  weights = np.ones((3, 5), np.float32)
  weights[0, 3:] = 0  # padding
  weights[2, 1:] = 0
  return logits, targets, weights


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.5])
def test_matches_reference_per_real_target_token(batch, label_smoothing, z_loss):
  logits, targets, weights = batch
  xent, z = _reference(logits, targets, weights, label_smoothing, z_loss)
  total, z_part, stats = losses.cross_entropy_loss(
      jnp.asarray(logits), jnp.asarray(targets), weights=jnp.asarray(weights),
      label_smoothing=label_smoothing, z_loss=z_loss)
  np.testing.assert_allclose(total, (xent.sum() + z.sum()) / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(z_part, z.sum() / weights.sum(), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(stats["cross_ent_loss_sum"], xent.sum(), rtol=1e-5)
  np.testing.assert_allclose(stats["z_loss_sum"], z.sum(), rtol=1e-5, atol=1e-9)
  assert stats["normalizing_factor"] == weights.sum()


def test_normalizing_factors(batch):
  logits, targets, weights = batch
  xent, z = _reference(logits, targets, weights, 0.1, 1e-4)
  per_token = xent + z

  def total(factor):
    return losses.cross_entropy_loss(
        jnp.asarray(logits), jnp.asarray(targets), weights=jnp.asarray(weights),
        label_smoothing=0.1, loss_normalizing_factor=factor)[0]

  np.testing.assert_allclose(total(7.0), per_token.sum() / 7.0, rtol=1e-5)
  np.testing.assert_allclose(total("NUM_REAL_TARGET_TOKENS"), total(None), rtol=1e-6)
  np.testing.assert_allclose(total("num_total_target_tokens"), per_token.sum() / 15,
                             rtol=1e-5)
  per_sequence = per_token.sum(-1) / weights.sum(-1)
  np.testing.assert_allclose(total(losses.LossNormalizingFactor.AVERAGE_PER_SEQUENCE),
                             per_sequence.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="NUM_REAL_TARGET_TOKENS"):
    total("per_token")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_predicting_the_smoothed_targets_costs_nothing(label_smoothing):
  vocab = 7
  targets = jnp.array([[0, 3, 6]])
  soft = jax.nn.one_hot(targets, vocab) * (1 - label_smoothing - label_smoothing / (vocab - 1))
  soft = soft + label_smoothing / (vocab - 1)
  logits = jnp.log(jnp.maximum(soft, 1e-30))  # log-normaliser is 0, so z-loss is 0 too
  total, z_part, _ = losses.cross_entropy_loss(logits, targets, label_smoothing=label_smoothing)
  np.testing.assert_allclose(total, 0.0, atol=1e-5)
  np.testing.assert_allclose(z_part, 0.0, atol=1e-9)


def test_accuracy_stats_and_padding_is_ignored(batch):
  logits, targets, weights = batch
  _, _, stats = losses.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets),
                                          weights=jnp.asarray(weights))
  correct = (logits.argmax(-1) == targets) * weights
  assert stats["accuracy_numerator"] == correct.sum()
  assert stats["accuracy_denominator"] == weights.sum()
  scrambled = logits.copy()
  scrambled[weights == 0] = 100.0
  np.testing.assert_allclose(
      losses.cross_entropy_loss(jnp.asarray(scrambled), jnp.asarray(targets),
                                weights=jnp.asarray(weights))[0],
      losses.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets),
                                weights=jnp.asarray(weights))[0], rtol=1e-6)


def test_gradient_is_finite_and_matches_softmax_minus_targets():
  logits = jnp.array([[[1.0, 2.0, 0.5]]])
  targets = jnp.array([[1]])
  grad = jax.grad(lambda x: losses.cross_entropy_loss(x, targets, z_loss=0.0)[0])(logits)
  np.testing.assert_allclose(grad, jax.nn.softmax(logits) - jax.nn.one_hot(targets, 3),
                             atol=1e-6)


def test_all_padding_gives_zero_not_nan():
  total, z_part, _ = losses.cross_entropy_loss(
      jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32), weights=jnp.zeros((1, 2)))
  assert total == 0.0 and z_part == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": jnp.zeros((2, 3), jnp.int32)}, "vocab axis"),
    ({"weights": jnp.ones((2,))}, "weights"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"loss_normalizing_factor": True}, "loss_normalizing_factor"),
])
def test_bad_arguments_are_explained(kwargs, message):
  args = {"logits": jnp.zeros((1, 2, 4)), "targets": jnp.zeros((1, 2), jnp.int32), **kwargs}
  with pytest.raises(ValueError, match=message):
    losses.cross_entropy_loss(args.pop("logits"), args.pop("targets"), **args)
